//! Drives the real `cargo xtask` binary on fixture manifests in temporary directories and checks
//! its outputs with GNU tar: layout, modes, determinism, the cache and bad input.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};

/// A temporary directory removed on drop, even when the test fails.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("flotilla-xt-{tag}-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn xtask(dir: &Path, args: &[&str]) -> Output {
    // The manifest and out flags go right after the subcommand, before any `--`.
    Command::new(env!("CARGO_BIN_EXE_xtask"))
        .arg(args[0])
        .args(["--manifest", dir.join("m.toml").to_str().unwrap()])
        .args(["--out", dir.join("out").to_str().unwrap()])
        .args(&args[1..])
        .output()
        .unwrap()
}

fn ok(dir: &Path, args: &[&str]) -> String {
    let out = xtask(dir, args);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "xtask {args:?} failed\nstdout:\n{stdout}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

fn write(path: &Path, contents: &str, mode: u32) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, contents).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
}

fn sha256(path: &Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().unwrap();
    String::from_utf8(out.stdout).unwrap().split_whitespace().next().unwrap().to_owned()
}

/// Names, modes and sizes of every entry, in archive order, as GNU tar lists them.
fn listing(archive: &Path) -> Vec<String> {
    let out = Command::new("tar").arg("--numeric-owner").arg("-tvf").arg(archive).output().unwrap();
    assert!(
        out.status.success(),
        "tar -tvf {}: {}",
        archive.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            // mode owner size date time name...
            format!("{} {} {} {}", f[0], f[1], f[2], f[5..].join(" "))
        })
        .collect()
}

const MANIFEST: &str = r#"
[package.web]
service_name = "web"
source.type = "local"
source.paths = [
  { from = "smf/web", to = "/opt/flotilla/web/pkg" },
  { from = "notes.txt", to = "/etc/web/notes.txt" },
]
output.type = "zone"
setup_hint = "create smf/web first"

[package.tools]
service_name = "tools"
source.type = "local"
source.paths = [{ from = "tool.sh", to = "bin/tool" }]
output.type = "tarball"

[package.pre]
service_name = "pre"
source.type = "prebuilt"
source.path = "vendor/pre.tar.gz"
source.sha256 = "@PRE_SHA@"
output.type = "zone"
output.intermediate_only = true

[package.bundle]
service_name = "bundle"
source.type = "composite"
source.packages = ["web.tar.gz", "pre.tar.gz"]
output.type = "zone"
"#;

/// Writes the fixture: sources created in the given order with the given non-executable mode,
/// so two fixtures can differ in everything that must not matter.
fn fixture(dir: &Path, reverse: bool, plain_mode: u32) {
    let mut files: Vec<(&str, &str, u32)> = vec![
        ("smf/web/config.toml", "listen = \"[::]:8080\"\n", plain_mode),
        ("smf/web/run.sh", "#!/bin/sh\nexec web\n", 0o755),
        ("smf/web/sub/data.txt", "0123456789", plain_mode),
        ("notes.txt", "notes\n", plain_mode),
        ("tool.sh", "#!/bin/sh\necho tool\n", 0o755),
    ];
    if reverse {
        files.reverse();
    }
    for (path, contents, mode) in files {
        write(&dir.join(path), contents, mode);
    }
    // The prebuilt is a zone image made by GNU tar itself.
    let stage = dir.join("stage");
    write(
        &stage.join("oxide.json"),
        r#"{"v":"1","t":"layer","pkg":"pre","version":"0.0.0"}"#,
        0o644,
    );
    write(&stage.join("root/opt/flotilla/pre/blob/data.bin"), "prebuilt bytes", 0o644);
    fs::create_dir_all(dir.join("vendor")).unwrap();
    let status = Command::new("tar")
        .args(["--sort=name", "--mtime=@0", "--owner=0", "--group=0", "--numeric-owner", "-czf"])
        .arg(dir.join("vendor/pre.tar.gz"))
        .arg("-C")
        .arg(&stage)
        .args(["oxide.json", "root"])
        .status()
        .unwrap();
    assert!(status.success());
    fs::remove_dir_all(&stage).unwrap();
    let sha = sha256(&dir.join("vendor/pre.tar.gz"));
    fs::write(dir.join("m.toml"), MANIFEST.replace("@PRE_SHA@", &sha)).unwrap();
}

#[test]
fn golden_listings_extraction_and_digests() {
    let t = TempDir::new("golden");
    fixture(&t.0, false, 0o644);
    let stdout = ok(&t.0, &["package"]);
    assert!(stdout.contains("web.tar.gz"), "{stdout}");
    let out = t.0.join("out");
    assert_eq!(
        listing(&out.join("web.tar.gz")),
        [
            "-rw-r--r-- 0/0 51 oxide.json",
            "drwxr-xr-x 0/0 0 root",
            "drwxr-xr-x 0/0 0 root/opt",
            "drwxr-xr-x 0/0 0 root/opt/flotilla",
            "drwxr-xr-x 0/0 0 root/opt/flotilla/web",
            "drwxr-xr-x 0/0 0 root/opt/flotilla/web/pkg",
            "-rw-r--r-- 0/0 21 root/opt/flotilla/web/pkg/config.toml",
            "-rwxr-xr-x 0/0 19 root/opt/flotilla/web/pkg/run.sh",
            "drwxr-xr-x 0/0 0 root/opt/flotilla/web/pkg/sub",
            "-rw-r--r-- 0/0 10 root/opt/flotilla/web/pkg/sub/data.txt",
            "drwxr-xr-x 0/0 0 root/etc",
            "drwxr-xr-x 0/0 0 root/etc/web",
            "-rw-r--r-- 0/0 6 root/etc/web/notes.txt",
        ]
    );
    assert_eq!(
        listing(&out.join("tools.tar")),
        ["-rw-r--r-- 0/0 5 VERSION", "drwxr-xr-x 0/0 0 bin", "-rwxr-xr-x 0/0 20 bin/tool"]
    );
    let bundle = listing(&out.join("bundle.tar.gz"));
    assert_eq!(bundle[0], "-rw-r--r-- 0/0 54 oxide.json");
    assert_eq!(bundle.iter().filter(|l| l.ends_with("oxide.json")).count(), 1, "{bundle:?}");
    assert!(bundle.contains(&"-rw-r--r-- 0/0 14 root/opt/flotilla/pre/blob/data.bin".to_owned()));
    assert!(bundle.contains(&"-rw-r--r-- 0/0 6 root/etc/web/notes.txt".to_owned()));

    // GNU tar extracts every output, with the content and modes of the sources.
    for file in ["web.tar.gz", "tools.tar", "bundle.tar.gz", "pre.tar.gz"] {
        let x = t.0.join("x").join(file);
        fs::create_dir_all(&x).unwrap();
        let status =
            Command::new("tar").arg("-xf").arg(out.join(file)).arg("-C").arg(&x).status().unwrap();
        assert!(status.success(), "tar -xf {file}");
    }
    let web = t.0.join("x/web.tar.gz/root/opt/flotilla/web/pkg");
    assert_eq!(fs::read_to_string(web.join("sub/data.txt")).unwrap(), "0123456789");
    assert_eq!(fs::metadata(web.join("run.sh")).unwrap().mode() & 0o777, 0o755);
    let oxide = fs::read_to_string(t.0.join("x/bundle.tar.gz/oxide.json")).unwrap();
    assert_eq!(oxide, r#"{"pkg":"bundle","t":"layer","v":"1","version":"0.0.0"}"#);
    assert_eq!(fs::read_to_string(t.0.join("x/tools.tar/VERSION")).unwrap(), "0.0.0");

    // The digest list names every output, sorted, in b3sum's format.
    let digests = fs::read_to_string(out.join("digests.b3")).unwrap();
    let names: Vec<&str> = digests.lines().map(|l| l.split_once("  ").unwrap().1).collect();
    assert_eq!(names, ["bundle.tar.gz", "pre.tar.gz", "tools.tar", "web.tar.gz"]);
    assert!(digests.lines().all(|l| l.split_once("  ").unwrap().0.len() == 64));
    if Command::new("b3sum").arg("--version").output().is_ok() {
        let check = Command::new("b3sum")
            .arg("--check")
            .arg("digests.b3")
            .current_dir(&out)
            .output()
            .unwrap();
        assert!(check.status.success(), "{}", String::from_utf8_lossy(&check.stdout));
    }
}

#[test]
fn outputs_do_not_depend_on_mtimes_modes_order_or_directory() {
    let a = TempDir::new("det-a");
    let b = TempDir::new("det-b");
    fixture(&a.0, false, 0o644);
    fixture(&b.0, true, 0o600);
    // Perturb mtimes of b's sources.
    let status = Command::new("find")
        .arg(&b.0)
        .args(["-exec", "touch", "-h", "-d", "2001-02-03 04:05:06", "{}", "+"])
        .status()
        .unwrap();
    assert!(status.success());
    ok(&a.0, &["package"]);
    ok(&b.0, &["package"]);
    for file in ["web.tar.gz", "tools.tar", "bundle.tar.gz", "digests.b3"] {
        let (x, y) = (
            fs::read(a.0.join("out").join(file)).unwrap(),
            fs::read(b.0.join("out").join(file)).unwrap(),
        );
        assert!(x == y, "{file} differs between the two builds");
    }
}

fn status_of(stdout: &str, file: &str) -> String {
    let line = stdout
        .lines()
        .find(|l| l.starts_with(file))
        .unwrap_or_else(|| panic!("{file} not in\n{stdout}"));
    line.split_whitespace().nth(4).unwrap().to_owned()
}

fn stamp(path: &Path) -> (u64, i64, i64) {
    let m = fs::metadata(path).unwrap();
    (m.ino(), m.mtime(), m.mtime_nsec())
}

#[test]
fn cache_hits_and_every_kind_of_miss() {
    let t = TempDir::new("cache");
    fixture(&t.0, false, 0o644);
    let web = t.0.join("out/web.tar.gz");
    let digests = t.0.join("out/digests.b3");
    ok(&t.0, &["package"]);
    let before = stamp(&web);
    let digests_before = stamp(&digests);

    // A hit leaves the output untouched, and the digest list too.
    let s = ok(&t.0, &["package"]);
    assert_eq!(status_of(&s, "web.tar.gz"), "cached");
    assert_eq!(status_of(&s, "tools.tar"), "cached");
    assert_eq!(stamp(&web), before);
    assert_eq!(stamp(&digests), digests_before, "a no-op rewrote digests.b3");

    // Content change.
    write(&t.0.join("smf/web/sub/data.txt"), "9876543210", 0o644);
    let s = ok(&t.0, &["package"]);
    assert_eq!(status_of(&s, "web.tar.gz"), "built");
    assert_eq!(status_of(&s, "tools.tar"), "cached");
    // The composite follows its component.
    assert_eq!(status_of(&s, "bundle.tar.gz"), "built");
    assert_ne!(stamp(&digests), digests_before, "digests.b3 kept an old digest");

    // Input order change.
    let m = fs::read_to_string(t.0.join("m.toml")).unwrap();
    let swapped = m.replace(
        "  { from = \"smf/web\", to = \"/opt/flotilla/web/pkg\" },\n  { from = \"notes.txt\", to = \"/etc/web/notes.txt\" },",
        "  { from = \"notes.txt\", to = \"/etc/web/notes.txt\" },\n  { from = \"smf/web\", to = \"/opt/flotilla/web/pkg\" },",
    );
    assert_ne!(m, swapped);
    fs::write(t.0.join("m.toml"), &swapped).unwrap();
    assert_eq!(status_of(&ok(&t.0, &["package"]), "web.tar.gz"), "built");

    // Manifest entry change that touches no file.
    fs::write(t.0.join("m.toml"), swapped.replace("create smf/web first", "another hint")).unwrap();
    assert_eq!(status_of(&ok(&t.0, &["package"]), "web.tar.gz"), "built");
    assert_eq!(status_of(&ok(&t.0, &["package"]), "web.tar.gz"), "cached");

    // Target change.
    ok(&t.0, &["target", "create", "blue", "flavour=blue"]);
    assert_eq!(status_of(&ok(&t.0, &["package"]), "web.tar.gz"), "built");

    // A truncated output (an interrupted writer elsewhere) is not a hit.
    let f = fs::OpenOptions::new().write(true).open(&web).unwrap();
    f.set_len(100).unwrap();
    drop(f);
    let s = ok(&t.0, &["package"]);
    assert_eq!(status_of(&s, "web.tar.gz"), "built");
    assert!(fs::metadata(&web).unwrap().len() > 100);

    // --disable-cache rebuilds everything.
    let s = ok(&t.0, &["package", "--disable-cache"]);
    assert_eq!(status_of(&s, "tools.tar"), "built");
}

#[test]
fn dry_run_stamp_and_only() {
    let t = TempDir::new("dry");
    fixture(&t.0, false, 0o644);
    let s = ok(&t.0, &["package", "--dry-run"]);
    assert!(s.contains("batch 2: bundle"), "{s}");
    assert!(s.contains("root/opt/flotilla/web/pkg/sub/data.txt 0644"), "{s}");
    assert!(s.contains("(cache miss"), "{s}");
    assert!(!t.0.join("out").exists(), "--dry-run wrote to out/");

    ok(&t.0, &["package", "--only", "bundle"]);
    assert!(t.0.join("out/web.tar.gz").exists());
    assert!(!t.0.join("out/tools.tar").exists(), "--only built an unrelated package");

    let before = fs::read(t.0.join("out/web.tar.gz")).unwrap();
    ok(&t.0, &["stamp", "web", "1.2.3"]);
    assert_eq!(fs::read(t.0.join("out/web.tar.gz")).unwrap(), before, "stamp edited the archive");
    let x = t.0.join("stamped");
    fs::create_dir_all(&x).unwrap();
    let status = Command::new("tar")
        .arg("-xzf")
        .arg(t.0.join("out/versioned/web.tar.gz"))
        .arg("-C")
        .arg(&x)
        .status()
        .unwrap();
    assert!(status.success());
    let oxide = fs::read_to_string(x.join("oxide.json")).unwrap();
    assert_eq!(oxide, r#"{"pkg":"web","t":"layer","v":"1","version":"1.2.3"}"#);
    assert_eq!(listing(&t.0.join("out/versioned/web.tar.gz"))[0], "-rw-r--r-- 0/0 51 oxide.json");
    let bad = xtask(&t.0, &["stamp", "web", "1.2"]);
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("stamp web: `1.2` is not a semver version")
    );
}

fn fails(dir: &Path, args: &[&str]) -> String {
    let out = xtask(dir, args);
    assert!(!out.status.success(), "xtask {args:?} should fail");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn bad_input_is_reported_and_nothing_is_written() {
    let t = TempDir::new("bad");
    fixture(&t.0, false, 0o644);
    let m = fs::read_to_string(t.0.join("m.toml")).unwrap();
    let m_path = t.0.join("m.toml");
    let cases: Vec<(String, String)> = vec![
        (m.replace("output.type = \"tarball\"", "output.type = \"tarball\"\noutput.level = 9"), ":17:8: package `tools`: output.level: unknown field `level`".into()),
        (m.replace("\"web.tar.gz\", \"pre.tar.gz\"", "\"web.tar.gz\", \"nope.tar.gz\""), ":29:34: package `bundle`: source.packages[1]: `nope.tar.gz` is not the output of any package in this manifest".into()),
        (m.replace("from = \"notes.txt\"", "from = \"missing.txt\""), ":7:12: package `web`: source.paths[1].from: ".into()),
        (m.replace("to = \"/etc/web/notes.txt\"", "to = \"etc/web/notes.txt\""), ":7:30: package `web`: source.paths[1].to: `etc/web/notes.txt` is relative".into()),
        (m.replace("to = \"bin/tool\"", "to = \"../bin/tool\""), ":15:42: package `tools`: source.paths[0].to: `../bin/tool` must not contain `..`".into()),
        (m.replace("source.sha256 = \"", "source.sha256 = \"0"), ":22:17: package `pre`: source.sha256: malformed sha256".into()),
        (m.replace("[package.bundle]", "[package.Web]\nservice_name = \"w\"\nsource.type = \"manual\"\noutput.type = \"zone\"\n\n[package.bundle]"), ":9:1: package `web`: output: output file `web.tar.gz` is also the output of package `Web`".into()),
        (m.replace("[package.web]", "[package.web]\n[package.web]"), ":3:10: package `web`: duplicate key".into()),
    ];
    for (manifest, expected) in cases {
        fs::write(&m_path, &manifest).unwrap();
        let e = fails(&t.0, &["package"]);
        assert!(e.contains(&expected), "wanted {expected:?} in:\n{e}");
        assert!(e.contains(m_path.to_str().unwrap()), "the error names the manifest: {e}");
        assert!(!t.0.join("out").exists(), "a bad manifest wrote to out/: {expected}");
    }
    // A package's setup_hint comes with its error, in a dry run too.
    fs::write(&m_path, m.replace("from = \"notes.txt\"", "from = \"missing.txt\"")).unwrap();
    for args in [&["package"][..], &["package", "--dry-run"]] {
        let e = fails(&t.0, args);
        assert!(e.contains("does not exist\n  hint: create smf/web first"), "{args:?}: {e}");
    }
    // A wrong digest of a prebuilt is an error naming the package; the other outputs are built.
    let sha = sha256(&t.0.join("vendor/pre.tar.gz"));
    let wrong: String = sha.chars().rev().collect();
    fs::write(&m_path, m.replace(&sha, &wrong)).unwrap();
    let e = fails(&t.0, &["package"]);
    assert!(e.contains(&format!("sha256 is {sha}, but the manifest pins {wrong}")), "{e}");
    assert!(e.contains("package bundle: skipped: component pre failed"), "{e}");
    assert!(t.0.join("out/web.tar.gz").exists());
    assert!(!t.0.join("out/pre.tar.gz").exists());
}

#[test]
fn the_project_manifest_packages_the_services() {
    let t = TempDir::new("project");
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let out = t.0.join("out");
    let run = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(["package", "--out", out.to_str().unwrap()])
        .current_dir(root)
        .output()
        .unwrap();
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    for service in ["node-agent", "control-plane"] {
        let list = listing(&out.join(format!("{service}.tar.gz")));
        assert!(list[0].ends_with(" oxide.json"), "{list:?}");
        let bin = format!("root/opt/flotilla/{service}/bin/{service}");
        assert!(
            list.iter().any(|l| l.starts_with("-rwxr-xr-x 0/0 ") && l.ends_with(&bin)),
            "{list:?}"
        );
        assert!(
            list.iter().any(|l| l.ends_with(&format!("root/opt/flotilla/{service}/pkg"))),
            "{list:?}"
        );
    }
}

const TARGETED: &str = r#"
[package.sled]
service_name = "sled"
only_for_targets.image = "standard"
source.type = "local"
source.paths = [{ from = "f.txt", to = "/opt/flotilla/sled/f.txt" }]
output.type = "zone"

[package.switch-part]
service_name = "switch-part"
only_for_targets.switch = "asic"
source.type = "local"
source.paths = [{ from = "f.txt", to = "/opt/flotilla/switch-part/f.txt" }]
output.type = "zone"
output.intermediate_only = true

[package.recovery]
service_name = "recovery"
only_for_targets.image = "trampoline"
source.type = "local"
source.paths = [{ from = "f.txt", to = "/opt/flotilla/recovery/f.txt" }]
output.type = "tarball"
"#;

/// `cargo xtask <args>` in `dir`, exactly as given.
fn raw(dir: &Path, args: &[&str]) -> (bool, String, String) {
    let out =
        Command::new(env!("CARGO_BIN_EXE_xtask")).args(args).current_dir(dir).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn omicron_package_command_lines_work_as_typed() {
    let t = TempDir::new("omicron-cli");
    let dir = &t.0;
    write(&dir.join("f.txt"), "f\n", 0o644);
    write(&dir.join("m.toml"), TARGETED, 0o644);
    let run = |args: &[&str]| raw(dir, args);
    let good = |args: &[&str]| {
        let (ok, stdout, stderr) = run(args);
        assert!(ok, "xtask {args:?} failed:\n{stderr}");
        stdout
    };
    let bad = |args: &[&str]| {
        let (ok, _, stderr) = run(args);
        assert!(!ok, "xtask {args:?} should fail");
        stderr
    };

    // omicron's form of `target create`: one short flag per key, `-m` is the machine, and the
    // global options go before the command. The combinations omicron refuses are refused with
    // its reasons, and nothing is created.
    let e = bad(&["-m", "m.toml", "--artifacts", "out", "target", "create", "-i", "standard"]
        .iter()
        .chain(&["-m", "non-gimlet", "-s", "asic", "-r", "multi-sled"])
        .copied()
        .collect::<Vec<_>>());
    assert!(e.contains("'switch=asic' is only valid with 'machine=gimlet'"), "{e}");
    assert!(!dir.join("out").exists(), "a refused target was written");
    let e =
        bad(&["-m", "m.toml", "-t", "r", "target", "create", "-i", "trampoline", "-m", "gimlet"]);
    assert!(e.contains("Trampoline image does not execute the sled agent"), "{e}");
    let e = bad(&["-m", "m.toml", "target", "create", "-i", "trampoline", "-s", "stub"]);
    assert!(e.contains("Trampoline image does not contain switch zone"), "{e}");
    let e = bad(&["-m", "m.toml", "target", "create", "-s", "tofino"]);
    assert!(e.contains("invalid value 'tofino' for '--switch <SWITCH>'"), "{e}");

    // Without `-t` the target is `default`, as in omicron; omicron's defaults fill the rest.
    let s =
        good(&["-m", "m.toml", "target", "create", "-i", "standard", "-m", "gimlet", "-s", "asic"]);
    assert_eq!(
        s.trim(),
        "created target default (clickhouse-topology=single-node image=standard machine=gimlet \
         rack-topology=multi-sled switch=asic) and made it active"
    );
    let s = good(&["-m", "m.toml", "-t", "recovery", "target", "create", "-i", "trampoline"]);
    assert!(s.starts_with("created target recovery (clickhouse-topology=single-node image=trampoline rack-topology=multi-sled)"), "{s}");
    // The generic form: a name and key=value pairs.
    let s = good(&["target", "create", "--manifest", "m.toml", "plain", "flavour=blue"]);
    assert!(s.starts_with("created target plain (flavour=blue)"), "{s}");
    let e = bad(&["-m", "m.toml", "-t", "a", "target", "create", "b"]);
    assert!(e.contains("the target is named twice, `b` and `-t a`"), "{e}");

    // list-outputs hides intermediate packages unless asked, as omicron does; `-t` before
    // the command picks the target.
    let names = |s: String| -> Vec<String> {
        s.lines().map(|l| Path::new(l).file_name().unwrap().to_str().unwrap().to_owned()).collect()
    };
    assert_eq!(names(good(&["-m", "m.toml", "-t", "default", "list-outputs"])), ["sled.tar.gz"]);
    assert_eq!(
        names(good(&["-t", "default", "list-outputs", "-m", "m.toml", "--intermediate"])),
        ["sled.tar.gz", "switch-part.tar.gz"]
    );
    assert_eq!(names(good(&["-m", "m.toml", "-t", "recovery", "list-outputs"])), ["recovery.tar"]);

    // `--artifacts` before the command (targets live in it, as in omicron) and `-d` for
    // --disable-cache.
    good(&[
        "-m",
        "m.toml",
        "--artifacts",
        "arts",
        "-t",
        "std",
        "target",
        "create",
        "-i",
        "standard",
    ]);
    let s = good(&["-m", "m.toml", "--artifacts", "arts", "-t", "std", "package", "-d"]);
    assert!(s.contains("sled.tar.gz"), "{s}");
    assert!(dir.join("arts/sled.tar.gz").is_file());
    assert!(!dir.join("out/sled.tar.gz").exists());

    // The same option before and after the command must agree; the options before it belong
    // to the packaging commands.
    let e = bad(&["-m", "m.toml", "package", "-m", "other.toml"]);
    assert!(e.contains("--manifest is given before the command"), "{e}");
    let e = bad(&["-t", "default", "testbed", "down", "--name", "none"]);
    assert!(e.contains("apply to the packaging commands only"), "{e}");

    // An error's cause is printed once.
    let e = bad(&["-m", "missing.toml", "package"]);
    assert_eq!(e.matches("No such file or directory").count(), 1, "{e}");
}

#[test]
fn show_cargo_commands_prints_the_plans_cargo_lines() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let (ok, stdout, stderr) = raw(root, &["show-cargo-commands"]);
    assert!(ok, "{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 1, "one build of every release binary: {stdout}");
    assert!(lines[0].starts_with("release: cargo build --release --workspace --bin "), "{stdout}");
    for bin in ["node-agent", "control-plane"] {
        assert!(lines[0].contains(&format!("--bin {bin}")), "{stdout}");
    }
}
