//! `cargo xtask fling` driven for real: the xtask binary, the system OpenSSH client and rsync,
//! against an sshd each test starts on loopback with its own host key and authorized key.
//!
//! The builder is `127.0.0.1`; the servers are `127.0.0.2`, `127.0.0.3` and `::1`, all the same
//! sshd, so every hop (client -> builder -> server) is a real ssh connection with strict host
//! key checking. The builder's workspace is a fixture with packages, a digest list and an
//! installer that records what it was given. The end-to-end tests on real nodes live with the
//! testbed.
//!
//! These tests need root (sshd) and skip otherwise, unless CI is "true".

use std::{
    net::{Ipv4Addr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::atomic::{AtomicUsize, Ordering},
    time::{Duration, Instant},
};

/// Whether the test can run here; prints why not when it cannot.
fn can_run(test: &str) -> bool {
    let root = unsafe_is_root();
    let ssh = Path::new("/usr/sbin/sshd").exists() && which("rsync") && which("ssh");
    if root && ssh {
        return true;
    }
    let why = if !root { "it needs root to run sshd" } else { "sshd, ssh or rsync is missing" };
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{test}: {why}, and CI=true forbids skipping");
    }
    eprintln!("skipping {test}: {why} (set CI=true to make this a failure)");
    false
}

fn unsafe_is_root() -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status.lines().any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some("0"))
}

fn which(program: &str) -> bool {
    std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .any(|dir| Path::new(dir).join(program).is_file())
}

/// A directory removed on drop, failure or not.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let path = std::env::temp_dir().join(format!("fling-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// An sshd on loopback, stopped by pid on drop.
struct Sshd {
    child: Child,
    port: u16,
    host_key_pub: String,
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn run_ok(command: &mut Command) {
    let out = command.output().unwrap_or_else(|e| panic!("run {command:?}: {e}"));
    assert!(out.status.success(), "{command:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// Everything one test needs: keys, an sshd, a builder workspace and a config.
struct Fixture {
    sshd: Sshd,
    // Declared after `sshd` so the sshd stops before its files go.
    dir: TempDir,
}

/// The servers of the fixture config: name, address (each a distinct loopback address).
const SERVERS: &[(&str, &str)] = &[("n1", "127.0.0.2"), ("n2", "127.0.0.3"), ("n3", "::1")];

impl Fixture {
    fn new(tag: &str) -> Fixture {
        let dir = TempDir::new(tag);
        let d = &dir.0;
        run_ok(
            Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-f"])
                .arg(d.join("host_key")),
        );
        run_ok(
            Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-f"])
                .arg(d.join("id")),
        );
        std::fs::copy(d.join("id.pub"), d.join("authorized_keys")).unwrap();
        let port = {
            let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
            listener.local_addr().unwrap().port()
        };
        let config = format!(
            "Port {port}\nListenAddress 127.0.0.1\nListenAddress 127.0.0.2\nListenAddress 127.0.0.3\n\
             ListenAddress ::1\nHostKey {d}/host_key\nAuthorizedKeysFile {d}/authorized_keys\n\
             PidFile {d}/sshd.pid\nPermitRootLogin prohibit-password\nPasswordAuthentication no\n\
             KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\nAllowAgentForwarding yes\n\
             MaxStartups 100\nMaxSessions 100\nLogLevel ERROR\n",
            d = d.display()
        );
        std::fs::write(d.join("sshd_config"), config).unwrap();
        std::fs::create_dir_all("/run/sshd").unwrap();
        let child = Command::new("/usr/sbin/sshd")
            .args(["-D", "-e", "-f"])
            .arg(d.join("sshd_config"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start sshd");
        let host_key_pub = std::fs::read_to_string(d.join("host_key.pub")).unwrap();
        let sshd = Sshd { child, port, host_key_pub };
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.3", port)).is_err() {
            assert!(Instant::now() < deadline, "sshd did not start listening on port {port}");
            std::thread::sleep(Duration::from_millis(20));
        }
        let fixture = Fixture { sshd, dir };
        fixture.write_known_hosts(
            &fixture.sshd.host_key_pub.clone(),
            &fixture.sshd.host_key_pub.clone(),
        );
        fixture.make_builder();
        fixture
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.0.join(rel)
    }

    fn p(&self, rel: &str) -> String {
        self.path(rel).display().to_string()
    }

    /// known_hosts with `builder_key` for the builder and `server_key` for every server.
    fn write_known_hosts(&self, builder_key: &str, server_key: &str) {
        let port = self.sshd.port;
        let servers: Vec<String> = SERVERS.iter().map(|(_, a)| format!("[{a}]:{port}")).collect();
        let text = format!(
            "[127.0.0.1]:{port} {}\n{} {}\n",
            builder_key.trim(),
            servers.join(","),
            server_key.trim()
        );
        std::fs::write(self.path("known_hosts"), text).unwrap();
    }

    /// The builder's workspace: two packages, their digests, and an installer that writes
    /// what it received to a log and fails or sleeps when asked to by marker files.
    fn make_builder(&self) {
        let b = self.path("builder");
        std::fs::create_dir_all(b.join("out")).unwrap();
        std::fs::create_dir_all(b.join("target/release")).unwrap();
        let payload: Vec<u8> =
            (0..2_000_000u32).map(|i| (i.wrapping_mul(2654435761) >> 24) as u8).collect();
        std::fs::write(b.join("out/node-agent.tar.gz"), &payload).unwrap();
        std::fs::write(b.join("out/control-plane.tar.gz"), &payload[..1000]).unwrap();
        std::fs::write(b.join("out/digests.b3"), "0000  node-agent.tar.gz\n").unwrap();
        std::fs::write(b.join("out/unrelated.log"), "not a package").unwrap();
        // It keeps the installer's staged-key contract: with --if-staged it installs only when
        // the staging directory holds the key (else exit 4); it records the key after an
        // install and removes it after a failure.
        let installer = format!(
            "#!/bin/sh\nset -e\nstaging=$(dirname \"$(dirname \"$0\")\")\n\
             [ -e {d}/installer-sleep ] && sleep 4\n\
             key=; if_staged=; prev=\n\
             for a in \"$@\"; do [ \"$prev\" = --staged-key ] && key=$a; \
             [ \"$a\" = --if-staged ] && if_staged=1; prev=$a; done\n\
             if [ -n \"$if_staged\" ] && [ \"$(cat \"$staging/.staged-key\" 2>/dev/null)\" != \"$key\" ]; \
             then echo 'not staged' >&2; exit 4; fi\n\
             echo \"$SSH_CONNECTION | $*\" >> {d}/installer.log\n\
             [ -e \"$staging/packages/node-agent.tar.gz\" ] || \
             {{ rm -f \"$staging/.staged-key\"; echo 'verify node-agent.tar.gz: missing' >&2; \
             [ -n \"$if_staged\" ] && exit 4; exit 1; }}\n\
             [ -e {d}/installer-fail ] && {{ rm -f \"$staging/.staged-key\"; \
             echo 'health check failed' >&2; exit 3; }}\n\
             find \"$staging/overlay\" -type f | sort >> {d}/installer.log\n\
             if [ -n \"$key\" ]; then printf '%s\\n' \"$key\" > \"$staging/.staged-key\"; fi\nexit 0\n",
            d = self.dir.0.display()
        );
        let bin = b.join("target/release/flotilla-installer");
        std::fs::write(&bin, installer).unwrap();
        run_ok(Command::new("chmod").arg("755").arg(&bin));
    }

    /// The config, with `extra` appended to the [deployment] table and server overrides.
    fn config(&self, name: &str, deployment_extra: &str, servers: &[(&str, &str, u16)]) -> PathBuf {
        let mut text = format!(
            "[builder]\nserver = \"b\"\nsource_path = {builder:?}\nlock_dir = {lock:?}\n\n\
             [deployment]\nservers = [{names}]\nstaging_dir = {staging:?}\n{deployment_extra}\n\n\
             [ssh]\nknown_hosts = {kh:?}\nidentity_file = {id:?}\n\n\
             [overlay]\nidentity_services = [\"node-agent\"]\n\n\
             [servers.b]\nusername = \"root\"\naddr = \"127.0.0.1\"\nport = {port}\n",
            builder = self.p("builder"),
            lock = self.p("lock"),
            staging = self.p("staging"),
            kh = self.p("known_hosts"),
            id = self.p("id"),
            port = self.sshd.port,
            names = servers.iter().map(|(n, _, _)| format!("{n:?}")).collect::<Vec<_>>().join(", "),
        );
        for (server, addr, port) in servers {
            text.push_str(&format!(
                "\n[servers.{server}]\nusername = \"root\"\naddr = {addr:?}\nport = {port}\n\
                 vars = {{ secret = \"secret-of-{server}\" }}\n"
            ));
        }
        let path = self.path(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    fn default_servers(&self) -> Vec<(&'static str, &'static str, u16)> {
        SERVERS.iter().map(|(n, a)| (*n, *a, self.sshd.port)).collect()
    }

    /// Runs `cargo xtask fling --config <config> <args>` without the user's agent.
    fn fling(&self, config: &Path, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_xtask"))
            .arg("fling")
            .arg("--config")
            .arg(config)
            .args(args)
            .env_remove("SSH_AUTH_SOCK")
            .current_dir(self.path("builder"))
            .stdin(Stdio::null())
            .output()
            .expect("run cargo xtask fling")
    }

    /// Starts `cargo xtask fling --config <config> <args>` in the background, without output;
    /// in a process group of its own when `own_group`. Killed and reaped when dropped.
    fn spawn_fling(&self, config: &Path, args: &[&str], own_group: bool) -> Reap {
        use std::os::unix::process::CommandExt as _;
        let mut command = Command::new(env!("CARGO_BIN_EXE_xtask"));
        command
            .arg("fling")
            .arg("--config")
            .arg(config)
            .args(args)
            .env_remove("SSH_AUTH_SOCK")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if own_group {
            command.process_group(0);
        }
        Reap(command.spawn().expect("start cargo xtask fling"))
    }

    /// Writes the overlays into the builder's workspace, as `fling overlay` has the builder do.
    fn generate_overlay(&self, config: &Path) {
        let out = self.fling(config, &["overlay", "--generate-here"]);
        assert!(out.status.success(), "overlay: {}", String::from_utf8_lossy(&out.stderr));
    }
}

/// A process a test started: killed and reaped when dropped, even when the test fails.
struct Reap(Child);

impl Drop for Reap {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn text(output: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout\n{}\n--- stderr\n{}",
        output.status.code(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

fn json_lines(output: &Output) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l:?}: {e}")))
        .collect()
}

#[test]
fn exec_runs_on_every_server_through_the_builder_and_reports_json() {
    if !can_run("exec_runs_on_every_server_through_the_builder_and_reports_json") {
        return;
    }
    let f = Fixture::new("exec");
    let config = f.config("deploy.toml", "", &f.default_servers());
    let out = f.fling(&config, &["--json", "exec", "--", "echo", "on", "$SSH_CONNECTION"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let events = json_lines(&out);
    let summary = events.last().unwrap();
    assert_eq!(summary["event"], "summary");
    assert_eq!(summary["exit_code"], 0);
    assert_eq!(summary["hosts"].as_array().unwrap().len(), 3);
    for (name, addr) in SERVERS {
        let line = events
            .iter()
            .find(|e| e["event"] == "output" && e["host"] == *name)
            .unwrap_or_else(|| panic!("no output from {name}: {}", text(&out)));
        // The remote shell expanded the variable: the command ran on the server, reached
        // at its own address from the builder.
        let line = line["line"].as_str().unwrap();
        assert!(line.starts_with("on ") && line.contains(&format!(" {addr} ")), "{name}: {line}");
        assert!(events.iter().any(|e| e["event"] == "step"
            && e["host"] == *name
            && e["step"] == "exec"
            && e["status"] == "ok"
            && e["duration_ms"].is_u64()));
    }
}

#[test]
fn failed_and_unreachable_hosts_have_their_own_exit_codes_and_the_others_finish() {
    if !can_run("failed_and_unreachable_hosts_have_their_own_exit_codes_and_the_others_finish") {
        return;
    }
    let f = Fixture::new("faults");
    let closed_port = {
        let listener = TcpListener::bind((Ipv4Addr::new(127, 0, 0, 4), 0)).unwrap();
        listener.local_addr().unwrap().port()
    };
    let mut servers = f.default_servers();
    servers.push(("gone", "127.0.0.4", closed_port));
    let config = f.config("deploy.toml", "", &servers);
    // n2 fails its command; `gone` has nothing listening.
    let fail_on_n2 = "case \"$SSH_CONNECTION\" in *127.0.0.3*) echo boom-on-n2 >&2; exit 7;; esac";

    let out = f.fling(&config, &["exec", "--", fail_on_n2]);
    assert_eq!(out.status.code(), Some(6), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("n2: exec failed (exit 7); last stderr lines:\n    boom-on-n2"),
        "{}",
        text(&out)
    );
    assert!(stdout.contains("gone: connect unreachable"), "{}", text(&out));
    assert!(stdout.contains("2 of 4 hosts ok"), "{}", text(&out));

    let out = f.fling(&config, &["--servers", "n1,n2", "exec", "--", fail_on_n2]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let out = f.fling(&config, &["--servers", "n3,gone", "exec", "--", "true"]);
    assert_eq!(out.status.code(), Some(4), "{}", text(&out));
    let out = f.fling(&config, &["--servers", "n1,n3", "exec", "--", fail_on_n2]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let out = f.fling(&config, &["--servers", "nope", "exec", "--", "true"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("\"nope\" is not one of the deployment servers"), "{}", text(&out));

    // thing-flinger's forms: servers as separate words or in one quoted word, the command
    // line as `--cmd`; the same selections and exit codes as above.
    let out = f.fling(&config, &["--servers", "n1", "n2", "exec", "--cmd", fail_on_n2]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("1 of 2 hosts ok"), "{}", text(&out));
    let out = f.fling(&config, &["exec", "--servers", "n3 gone", "--cmd", "true"]);
    assert_eq!(out.status.code(), Some(4), "{}", text(&out));
    let out = f.fling(&config, &["-s", "n1", "n3", "exec", "--cmd", fail_on_n2]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("2 of 2 hosts ok"), "{}", text(&out));
}

/// What fling forwards to the builder is checked on the client, before any host is reached:
/// a bad value or a flag the builder's `cargo xtask` would not take fails with exit code 1 and
/// names the flag, in a dry run as in a real one. Needs no testbed: the config's builder does
/// not exist.
#[test]
fn flags_forwarded_to_the_builder_are_checked_on_the_client() {
    let dir = std::env::temp_dir().join(format!("fling-flags-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    struct Cleanup(PathBuf);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let _cleanup = Cleanup(dir.clone());
    let config = dir.join("deploy.toml");
    let example = workspace().join("deployment-example.toml");
    std::fs::copy(&example, &config).unwrap();
    let fling = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_xtask"))
            .arg("fling")
            .arg("--config")
            .arg(&config)
            .args(args)
            .env_remove("SSH_AUTH_SOCK")
            .stdin(Stdio::null())
            .output()
            .expect("run cargo xtask fling")
    };
    // 2: clap refused the command line; 1: fling refused the combination.
    for (args, code, says) in [
        (&["build", "package", "--jobs", "0"][..], 2, "--jobs"),
        (&["build", "package", "--retry-duration", "4000"], 2, "between 0 and 3600"),
        (&["build", "package", "--only", "a b"], 2, "--only"),
        (&["build", "package", "--frobnicate"], 2, "--frobnicate"),
        (&["build", "package", "-t", "no such target"], 2, "--target"),
        (&["build", "package", "--artifacts", "/srv/out"], 2, "is absolute"),
        (&["build", "package", "--artifacts", "dist"], 2, "deleted by the next sync"),
        (&["build", "dot", "--artifacts", "out/../src"], 2, "`.` or `..`"),
        (&["exec", "--cmd", "true", "--", "true"], 2, "cannot be used with"),
        (&["exec"], 2, "required"),
        (&["--artifacts", "out/a", "build", "check", "--artifacts", "out/b"], 1, "give it once"),
        (&["-t", "dev", "deploy", "status"], 1, "applies to `build`"),
        (&["-t", "dev", "deploy", "install"], 1, "applies to `build` only"),
        (&["--artifacts", "out/a", "exec", "--cmd", "true"], 1, "not to exec"),
    ] {
        for dry in [true, false] {
            let mut all = Vec::new();
            if dry {
                all.push("--dry-run");
            }
            all.extend_from_slice(args);
            let out = fling(&all);
            assert_eq!(out.status.code(), Some(code), "{all:?}: {}", text(&out));
            assert!(text(&out).contains(says), "{all:?}: {}", text(&out));
            assert!(out.stdout.is_empty(), "{all:?} printed a plan: {}", text(&out));
        }
    }
    // The same flags, well formed, in either place: the dry run shows what the builder runs.
    for args in [
        &["--dry-run", "-t", "dev", "--artifacts", "out/dev", "build", "package", "-d"][..],
        &["--dry-run", "build", "package", "-t", "dev", "--artifacts", "out/dev", "-d"],
    ] {
        let out = fling(args);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {}", text(&out));
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            stdout.contains("cargo xtask package --target dev --out out/dev --disable-cache"),
            "{args:?}: {stdout}"
        );
    }
    let out = fling(&["--dry-run", "--servers", "node1", "node2", "deploy", "clean"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    for node in ["node1", "node2"] {
        assert!(stdout.contains(&format!("[{node}] releases ")), "{stdout}");
        assert!(stdout.contains(&format!("[{node}] unstage ")), "{stdout}");
    }
    assert!(!stdout.contains("[node3]"), "{stdout}");
}

#[test]
fn unknown_and_changed_host_keys_are_refused() {
    if !can_run("unknown_and_changed_host_keys_are_refused") {
        return;
    }
    let f = Fixture::new("hostkeys");
    let config = f.config("deploy.toml", "", &f.default_servers());
    run_ok(
        Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(f.path("other")),
    );
    let other = std::fs::read_to_string(f.path("other.pub")).unwrap();
    let real = f.sshd.host_key_pub.clone();

    // The builder's key is unknown: nothing at all happens.
    std::fs::write(f.path("known_hosts"), "").unwrap();
    let out = f.fling(&config, &["exec", "--", "touch", &f.p("ran")]);
    assert_eq!(out.status.code(), Some(4), "{}", text(&out));
    assert!(text(&out).contains("Host key verification failed"), "{}", text(&out));
    // The builder's key changed.
    f.write_known_hosts(&other, &real);
    let out = f.fling(&config, &["exec", "--", "touch", &f.p("ran")]);
    assert_eq!(out.status.code(), Some(4), "{}", text(&out));
    assert!(text(&out).contains("REMOTE HOST IDENTIFICATION HAS CHANGED"), "{}", text(&out));
    // The builder is known but the servers' keys changed: the builder refuses them.
    f.write_known_hosts(&real, &other);
    let out = f.fling(&config, &["exec", "--", "touch", &f.p("ran")]);
    assert_eq!(out.status.code(), Some(4), "{}", text(&out));
    assert!(text(&out).contains("n1: connect unreachable"), "{}", text(&out));
    assert!(text(&out).contains("Host key verification failed"), "{}", text(&out));
    assert!(!f.path("ran").exists(), "a command ran on a host with the wrong key");
}

#[test]
fn deploy_pushes_each_server_only_its_own_overlay_and_a_rerun_sends_no_payload() {
    if !can_run("deploy_pushes_each_server_only_its_own_overlay_and_a_rerun_sends_no_payload") {
        return;
    }
    let f = Fixture::new("deploy");
    let config = f.config("deploy.toml", "", &f.default_servers());

    // Without an overlay the push fails with a message that says what to run.
    let out = f.fling(&config, &["--servers", "n1", "install"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("run `fling overlay` first"), "{}", text(&out));

    f.generate_overlay(&config);
    // The servers share this machine, so deploy them one at a time and look at what each
    // one's staging directory received.
    for (name, addr) in SERVERS {
        let out = f.fling(&config, &["--json", "--servers", name, "deploy", "install"]);
        assert_eq!(out.status.code(), Some(0), "{}", text(&out));
        let staging = f.path("staging");
        let overlay = std::fs::read_to_string(
            staging.join("overlay/opt/flotilla/node-agent/pkg/identity.toml"),
        )
        .unwrap();
        assert!(overlay.contains(&format!("secret-of-{name}")), "{overlay}");
        for (other, _) in SERVERS.iter().filter(|(o, _)| o != name) {
            assert!(
                !overlay.contains(&format!("secret-of-{other}")),
                "{name} got {other}'s overlay"
            );
        }
        let mut packages: Vec<String> = std::fs::read_dir(staging.join("packages"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        packages.sort();
        assert_eq!(packages, ["control-plane.tar.gz", "digests.b3", "node-agent.tar.gz"]);
        let log = std::fs::read_to_string(f.path("installer.log")).unwrap();
        let last = log.lines().rev().find(|l| l.contains(" | ")).unwrap();
        assert!(last.contains(&format!(" {addr} ")), "the installer ran elsewhere: {last}");
        assert!(
            last.contains(&format!(
                "| --prefix /opt/flotilla --packages-prefix /opt/flotilla --service-manager systemd \
                 install --create-users {0}/packages --overlay {0}/overlay --staging {0} --staged-key ",
                staging.display()
            )),
            "{last}"
        );
    }

    // Everything is in place: the first deploy to n1 after n3's pushes (they share the
    // staging directory here) sends only rsync's file lists; the rerun after it sends nothing
    // and still runs the installer.
    let installs =
        || std::fs::read_to_string(f.path("installer.log")).unwrap().matches(" | ").count();
    let sent_by = |out: &Output| {
        let summary = json_lines(out).pop().unwrap();
        summary["hosts"][0]["bytes_sent"].as_u64().unwrap()
    };
    let out = f.fling(&config, &["--json", "--servers", "n1", "install"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(sent_by(&out) < 20_000, "a redeploy of the same files sent {} bytes", sent_by(&out));
    let before = installs();
    let out = f.fling(&config, &["--json", "--servers", "n1", "install"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(sent_by(&out), 0, "a no-op redeploy transferred files: {}", text(&out));
    assert!(!text(&out).contains("\"step\":\"push\""), "a no-op redeploy pushed: {}", text(&out));
    assert_eq!(installs(), before + 1, "the installer runs on a no-op redeploy too");

    // A staged package lost after the last push: the installer refuses the staging directory,
    // and the same deploy pushes again and installs.
    std::fs::remove_file(f.path("staging/packages/node-agent.tar.gz")).unwrap();
    let out = f.fling(&config, &["--json", "--servers", "n1", "install"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(text(&out).contains("verify node-agent.tar.gz: missing"), "{}", text(&out));
    assert!(f.path("staging/packages/node-agent.tar.gz").exists(), "the package was not pushed");
    assert_eq!(installs(), before + 3, "a failed and a successful install");

    // A failing installer is reported with its stderr and exit status.
    std::fs::write(f.path("installer-fail"), "").unwrap();
    let out = f.fling(&config, &["--servers", "n2", "install"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        text(&out)
            .contains("n2: install failed (exit 3); last stderr lines:\n    health check failed"),
        "{}",
        text(&out)
    );
}

#[test]
fn a_concurrent_deploy_is_refused_with_the_holders_information() {
    if !can_run("a_concurrent_deploy_is_refused_with_the_holders_information") {
        return;
    }
    let f = Fixture::new("lock");
    let config = f.config("deploy.toml", "", &f.default_servers());
    f.generate_overlay(&config);
    std::fs::write(f.path("installer-sleep"), "").unwrap();
    let mut first = f.spawn_fling(&config, &["--servers", "n1", "deploy", "install"], false);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !f.path("lock/info").exists() {
        assert!(Instant::now() < deadline, "the first deploy never took the lock");
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = f.fling(&config, &["--servers", "n2", "deploy", "install"]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    let all = text(&out);
    assert!(all.contains("is held: run="), "{all}");
    assert!(all.contains("what=cargo xtask fling deploy install"), "{all}");
    assert!(all.contains("who=") && all.contains("when=20"), "{all}");

    let status = f.fling(&config, &["lock", "status"]);
    assert!(text(&status).contains("the deploy lock is held:"), "{}", text(&status));

    // Waiting for the lock succeeds once the first deploy is done.
    let out = f.fling(&config, &["--lock-wait", "60", "--servers", "n2", "deploy", "install"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(first.0.wait().unwrap().success(), "the first deploy failed");
    assert!(!f.path("lock").exists(), "the lock outlived its deploys");

    // A lock left by a crashed run is released by hand.
    std::fs::create_dir_all(f.path("lock")).unwrap();
    std::fs::write(f.path("lock/info"), "run=crashed\n").unwrap();
    let out = f.fling(&config, &["lock", "release"]);
    assert!(
        text(&out).contains("[b] released the deploy lock:\n[b] run=crashed"),
        "{}",
        text(&out)
    );
    assert!(!f.path("lock").exists());
}

#[test]
fn an_interrupted_deploy_releases_the_lock_on_the_builder() {
    if !can_run("an_interrupted_deploy_releases_the_lock_on_the_builder") {
        return;
    }
    let f = Fixture::new("interrupt");
    let config = f.config("deploy.toml", "", &f.default_servers());
    f.generate_overlay(&config);
    std::fs::write(f.path("installer-sleep"), "").unwrap();
    // Its own process group, so that the interrupt reaches fling and its ssh processes, as
    // Ctrl-C in a terminal does.
    let mut child = f.spawn_fling(&config, &["--servers", "n1", "deploy", "install"], true);
    let deadline = Instant::now() + Duration::from_secs(20);
    // Once the push is done the installer starts, and sleeps 4 s: interrupt the deploy then.
    while !(f.path("lock/info").exists() && f.path("staging/bin/flotilla-installer").exists()) {
        assert!(Instant::now() < deadline, "the deploy never took the lock and pushed");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(500));
    assert!(f.path("lock/info").exists(), "the deploy ended before it was interrupted");
    let group = format!("-{}", child.0.id());
    run_ok(Command::new("kill").args(["-INT", "--", &group]));
    let status = child.0.wait().unwrap();
    assert_eq!(status.code(), Some(130), "fling ends an interrupted run with 130: {status}");
    // The builder's script notices that its client is gone when the server's step ends, then
    // releases the lock and closes the server connection.
    let deadline = Instant::now() + Duration::from_secs(30);
    while f.path("lock").exists() {
        assert!(Instant::now() < deadline, "the lock outlived the interrupted deploy");
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = f.fling(&config, &["--servers", "n1", "deploy", "install"]);
    assert_eq!(out.status.code(), Some(0), "a deploy after the interrupted one: {}", text(&out));
}

/// The hostile-input corpus: each value would create `marker` if any shell, ssh or rsync on
/// its way read it as more than data. Metacharacters, quotes of both kinds, newlines and other
/// control bytes, leading dashes and option-like values, path traversal, globs, expansions.
fn hostile_corpus(marker: &str) -> Vec<String> {
    let m = marker;
    vec![
        format!("$(touch {m})"),
        format!("`touch {m}`"),
        format!("; touch {m};"),
        format!("' ; touch {m} ; '"),
        format!("\" ; touch {m} ; \""),
        format!("'\\''; touch {m}; #"),
        format!("\n touch {m}\n"),
        format!("\r touch {m}"),
        format!("\t; touch {m}"),
        format!("\u{1b}]0;x\u{7}; touch {m}"),
        format!("\u{0}; touch {m}"),
        format!("&& touch {m} ||"),
        format!("| touch {m}"),
        format!("> {m}"),
        format!("$(touch${{IFS}}{m})"),
        format!("${{IFS}}touch${{IFS}}{m}"),
        format!("-oProxyCommand=touch {m}"),
        format!("-oProxyCommand=touch${{IFS}}{m}"),
        format!("--rsh=touch {m}"),
        format!("--rsync-path=touch {m}"),
        format!("-e touch {m}"),
        "--".to_owned(),
        "-".to_owned(),
        format!("../../../../../tmp; touch {m}"),
        "../../../etc".to_owned(),
        "..".to_owned(),
        format!("~root/; touch {m}"),
        format!("$HOME/$(touch {m})"),
        format!("{{touch,{m}}}"),
        "*".to_owned(),
        format!("\\; touch {m}"),
        format!("!!; touch {m}"),
        format!("#; touch {m}"),
        format!("é ü; touch {m}"),
        format!("%s%n%x; touch {m}"),
        format!("a b\\ c; touch {m}"),
    ]
}

/// Every string field of the config, as a way to put a value `v` into a config table. Paths
/// get the value as a component below a directory of the fixture, `base`.
/// Puts a value into a config table, given a base directory for paths.
type Put = fn(&mut toml::Table, &str, &str);

fn hostile_fields() -> Vec<(&'static str, Put)> {
    fn table<'a>(t: &'a mut toml::Table, path: &[&str]) -> &'a mut toml::Table {
        let mut t = t;
        for key in path {
            t = t
                .entry(key.to_string())
                .or_insert(toml::Table::new().into())
                .as_table_mut()
                .unwrap();
        }
        t
    }
    fn set(t: &mut toml::Table, path: &[&str], key: &str, value: toml::Value) {
        table(t, path).insert(key.to_owned(), value);
    }
    vec![
        ("source_path", |t, v, base| set(t, &[], "source_path", format!("{base}/src/{v}").into())),
        ("builder.source_path", |t, v, base| {
            set(t, &["builder"], "source_path", format!("{base}/b{v}").into())
        }),
        ("builder.lock_dir", |t, v, base| {
            set(t, &["builder"], "lock_dir", format!("{base}/l{v}").into())
        }),
        ("builder.excludes", |t, v, _| {
            set(t, &["builder"], "excludes", vec![toml::Value::from(v)].into())
        }),
        ("builder.server", |t, v, _| set(t, &["builder"], "server", v.into())),
        ("deployment.servers", |t, v, _| {
            set(t, &["deployment"], "servers", vec![toml::Value::from(v)].into())
        }),
        ("deployment.staging_dir", |t, v, base| {
            set(t, &["deployment"], "staging_dir", format!("{base}/s{v}").into())
        }),
        ("deployment.known_hosts", |t, v, base| {
            set(t, &["deployment"], "known_hosts", format!("{base}/k{v}").into())
        }),
        ("deployment.rss_server", |t, v, _| set(t, &["deployment"], "rss_server", v.into())),
        ("ssh.config", |t, v, base| set(t, &["ssh"], "config", format!("{base}/c{v}").into())),
        ("ssh.known_hosts", |t, v, base| {
            set(t, &["ssh"], "known_hosts", format!("{base}/k{v}").into())
        }),
        ("ssh.identity_file", |t, v, base| {
            set(t, &["ssh"], "identity_file", format!("{base}/i{v}").into())
        }),
        ("ssh.options", |t, v, _| set(t, &["ssh"], "options", vec![toml::Value::from(v)].into())),
        ("ssh.options", |t, v, _| {
            set(
                t,
                &["ssh"],
                "options",
                vec![toml::Value::from(format!("ConnectTimeout={v}"))].into(),
            )
        }),
        ("servers.n1.username", |t, v, _| set(t, &["servers", "n1"], "username", v.into())),
        ("servers.n1.addr", |t, v, _| set(t, &["servers", "n1"], "addr", v.into())),
        ("servers.n1.ssh_options", |t, v, _| {
            set(t, &["servers", "n1"], "ssh_options", vec![toml::Value::from(v)].into())
        }),
        ("servers.n1.ssh_options", |t, v, _| {
            set(
                t,
                &["servers", "n1"],
                "ssh_options",
                vec![toml::Value::from(format!("ServerAliveInterval={v}"))].into(),
            )
        }),
        ("servers.n1.identity_file", |t, v, base| {
            set(t, &["servers", "n1"], "identity_file", format!("{base}/i{v}").into())
        }),
        ("servers.n1.vars", |t, v, _| set(t, &["servers", "n1", "vars"], v, "x".into())),
        ("servers.n1.vars.v", |t, v, _| set(t, &["servers", "n1", "vars"], "v", v.into())),
        ("servers.", |t, v, _| {
            let n1 = table(t, &["servers"]).remove("n1").unwrap();
            table(t, &["servers"]).insert(v.to_owned(), n1);
            set(t, &["deployment"], "servers", vec![toml::Value::from(v)].into());
        }),
    ]
}

#[test]
fn hostile_config_strings_never_execute_anything() {
    if !can_run("hostile_config_strings_never_execute_anything") {
        return;
    }
    let f = Fixture::new("hostile");
    // Short, so the hostile paths below stay within file name limits; removed on drop.
    let marker_dir = TempDir::new("pwn");
    let marker = format!("{}/PWNED", marker_dir.0.display());
    let corpus = hostile_corpus(&marker);
    assert!(corpus.len() >= 30);
    let base_path = f.config("base.toml", "", &f.default_servers()[..1]);
    let base: toml::Table = std::fs::read_to_string(&base_path).unwrap().parse().unwrap();
    std::fs::create_dir_all(f.path("client")).unwrap();
    std::fs::write(f.path("client/file"), "").unwrap();
    let config = f.path("hostile.toml");
    let refused_marker = |out: &Output, what: &str| {
        assert!(!Path::new(&marker).exists(), "{what} executed a config string: {}", text(out));
    };
    let fields = hostile_fields();
    let (mut refused, mut accepted) = (0, Vec::new());
    for value in &corpus {
        for (index, (field, put)) in fields.iter().enumerate() {
            let mut table = base.clone();
            put(&mut table, value, &f.p("h"));
            std::fs::write(&config, toml::to_string(&table).unwrap()).unwrap();
            let what = format!("{field} = {value:?}");
            let out = f.fling(&config, &["--dry-run", "deploy", "install"]);
            refused_marker(&out, &what);
            match out.status.code() {
                Some(1) => {
                    let err = String::from_utf8_lossy(&out.stderr);
                    assert!(
                        err.contains("hostile.toml:") && err.contains(&format!(": {field}")),
                        "{what}: {err}"
                    );
                    assert!(
                        !err.contains(|c: char| c.is_control() && c != '\n'),
                        "{what}: {err:?}"
                    );
                    refused += 1;
                }
                Some(0) => accepted.push((*field, value.clone(), index)),
                _ => panic!("{what}: {}", text(&out)),
            }
        }
    }
    // What is accepted is data: the variables, the exclude patterns and the client's own
    // path, which only local programs read as one argument.
    // Elsewhere, only values of plain characters, such as a path component `--`.
    let data_fields = ["servers.n1.vars.v", "builder.excludes", "source_path"];
    for (field, value, _) in &accepted {
        assert!(
            data_fields.contains(field)
                || value.chars().all(|c| c.is_ascii_alphanumeric() || "-_.,+@=%".contains(c)),
            "{field} accepted {value:?}"
        );
    }
    let mut by_field = std::collections::BTreeMap::<&str, usize>::new();
    for (field, ..) in &accepted {
        *by_field.entry(field).or_default() += 1;
    }
    eprintln!(
        "hostile corpus: {} values through {} fields: {refused} refused, accepted as data: \
         {by_field:?}",
        corpus.len(),
        fields.len()
    );

    // Every accepted value in a real run: the variables and excludes all at once, through
    // every command; each client path through a real sync.
    let mut table = base.clone();
    let mut vars = toml::Table::new();
    let mut excludes = Vec::new();
    for (i, (field, value, _)) in accepted.iter().enumerate() {
        match *field {
            "servers.n1.vars.v" => drop(vars.insert(format!("v{i}"), value.as_str().into())),
            "builder.excludes" => excludes.push(toml::Value::from(value.as_str())),
            _ => {}
        }
    }
    assert!(!vars.is_empty() && !excludes.is_empty());
    table["servers"]["n1"].as_table_mut().unwrap().insert("vars".into(), vars.into());
    table["builder"].as_table_mut().unwrap().insert("excludes".into(), excludes.into());
    table.insert("source_path".into(), f.p("client").into());
    std::fs::write(&config, toml::to_string(&table).unwrap()).unwrap();
    f.generate_overlay(&config);
    std::fs::write(f.path("builder/.flotilla-source"), "").unwrap();
    for args in [
        &["sync"][..],
        &["deploy", "install"],
        &["deploy", "status"],
        &["exec", "--", "true"],
        &["deploy", "uninstall"],
        &["lock", "status"],
        &["install-prereqs"],
    ] {
        let out = f.fling(&config, args);
        assert!(out.status.code().is_some(), "{args:?}: {}", text(&out));
        refused_marker(&out, &format!("{args:?}"));
    }
    for (field, value, index) in accepted.iter().filter(|(f, ..)| !data_fields.contains(f)) {
        let put = fields[*index].1;
        let mut table = base.clone();
        put(&mut table, value, &f.p("h"));
        std::fs::write(&config, toml::to_string(&table).unwrap()).unwrap();
        for args in [&["deploy", "install"][..], &["deploy", "uninstall"]] {
            let out = f.fling(&config, args);
            assert!(out.status.code().is_some(), "{field} = {value:?}: {}", text(&out));
            refused_marker(&out, &format!("{args:?} with {field} = {value:?}"));
        }
    }
    for (field, value, _) in accepted.iter().filter(|(field, ..)| *field == "source_path") {
        let link = f.path(&format!("h/src/{value}"));
        std::fs::create_dir_all(link.parent().unwrap()).unwrap();
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(f.path("client"), &link).unwrap();
        let mut table = base.clone();
        put_source(&mut table, &link);
        std::fs::write(&config, toml::to_string(&table).unwrap()).unwrap();
        let out = f.fling(&config, &["sync"]);
        assert_eq!(out.status.code(), Some(0), "{field} = {value:?}: {}", text(&out));
        assert!(f.path("builder/file").exists(), "{value:?}: the client's file did not arrive");
        std::fs::remove_file(f.path("builder/file")).unwrap();
        refused_marker(&out, &format!("sync from {value:?}"));
    }
}

fn put_source(table: &mut toml::Table, path: &Path) {
    table.insert("source_path".into(), path.to_str().unwrap().into());
}

#[test]
fn a_directory_flotilla_did_not_create_is_never_filled_or_removed() {
    if !can_run("a_directory_flotilla_did_not_create_is_never_filled_or_removed") {
        return;
    }
    let f = Fixture::new("marker");
    let config = f.config("deploy.toml", "", &f.default_servers());
    f.generate_overlay(&config);
    std::fs::create_dir_all(f.path("staging")).unwrap();
    std::fs::write(f.path("staging/precious"), "keep").unwrap();
    let expected = format!(
        "refusing {} (deployment.staging_dir): it exists but flotilla did not create it (it \
         holds no .flotilla-staging)",
        f.p("staging")
    );
    for (args, what) in [
        (&["--servers", "n1", "deploy", "install"][..], "fills it with --delete"),
        (&["--servers", "n1", "deploy", "uninstall"], "removes it on uninstall"),
    ] {
        let out = f.fling(&config, args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", text(&out));
        assert!(text(&out).contains(&format!("{expected}, and fling {what}")), "{}", text(&out));
        assert_eq!(std::fs::read_to_string(f.path("staging/precious")).unwrap(), "keep");
        assert!(!f.path("staging/.flotilla-staging").exists());
    }
    // Told so by the message, the user marks the directory as flotilla's: deploys proceed.
    std::fs::write(f.path("staging/.flotilla-staging"), "").unwrap();
    let out = f.fling(&config, &["--servers", "n1", "deploy", "install"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(!f.path("staging/precious").exists(), "the push mirrors the directory");
    assert!(f.path("staging/.flotilla-staging").exists(), "the push deleted its marker");
    let out = f.fling(&config, &["--servers", "n1", "deploy", "uninstall"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(!f.path("staging").exists());
    // A directory fling creates gets its marker.
    let out = f.fling(&config, &["--servers", "n1", "deploy", "install"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(f.path("staging/.flotilla-staging").exists());
}

#[test]
fn building_before_any_sync_says_that_sync_comes_first() {
    if !can_run("building_before_any_sync_says_that_sync_comes_first") {
        return;
    }
    let f = Fixture::new("nosync");
    let config = f.config("deploy.toml", "", &f.default_servers());
    // The builder's directory lies inside a workspace (this fixture's parent has none, so
    // make one): cargo must never be asked to run there.
    std::fs::write(f.path("Cargo.toml"), "[workspace]\n").unwrap();
    let message = format!(
        "the builder has no copy of the workspace at {} (builder.source_path): run `cargo xtask \
         fling sync` first",
        f.p("builder")
    );
    for args in [&["build", "package"][..], &["build", "check"], &["overlay"]] {
        let out = f.fling(&config, args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", text(&out));
        // Once as the builder said it, once in the recap; never cargo's own words.
        let (stdout, stderr) =
            (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert_eq!(stdout.matches(&message).count(), 1, "{args:?}: {}", text(&out));
        assert_eq!(stderr.matches(&message).count(), 1, "{args:?}: {}", text(&out));
        let rest = text(&out).replace(&message, "");
        assert!(!rest.contains("cargo") && !rest.contains("error:"), "{args:?} ran cargo: {rest}");
    }
}

#[test]
fn sync_honours_gitignore_and_never_sends_target_out_or_git() {
    if !can_run("sync_honours_gitignore_and_never_sends_target_out_or_git") {
        return;
    }
    let f = Fixture::new("sync");
    let src = f.path("client");
    for (path, contents) in [
        ("Cargo.toml", "[workspace]\n"),
        (".gitignore", "/target\n/out\n*.secret\n"),
        ("src/main.rs", "fn main() {}\n"),
        ("src/key.secret", "no"),
        ("target/debug/big", "no"),
        ("out/pkg.tar.gz", "no"),
        (".git/HEAD", "no"),
        ("notes.swp", "no"),
    ] {
        std::fs::create_dir_all(src.join(path).parent().unwrap()).unwrap();
        std::fs::write(src.join(path), contents).unwrap();
    }
    let config = f.config("deploy.toml", "", &f.default_servers());
    let text_config = std::fs::read_to_string(&config).unwrap().replace(
        "[builder]\n",
        &format!("source_path = {:?}\n[builder]\nexcludes = [\"*.swp\"]\n", src.display()),
    );
    std::fs::write(&config, text_config.replace(&f.p("builder"), &f.p("builder-src"))).unwrap();
    // Files only the builder has: a stale source file goes, its own build outputs stay.
    std::fs::create_dir_all(f.path("builder-src/target")).unwrap();
    std::fs::write(f.path("builder-src/target/keep"), "").unwrap();
    std::fs::write(f.path("builder-src/stale.rs"), "").unwrap();

    // The directory exists and flotilla did not create it: `--delete` would remove what is
    // there, so sync refuses it, saying how to proceed, and deletes nothing.
    let out = f.fling(&config, &["sync"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let expected = format!(
        "refusing {} (builder.source_path): it exists but flotilla did not create it (it holds \
         no .flotilla-source), and fling fills it with --delete",
        f.p("builder-src")
    );
    assert!(text(&out).contains(&expected), "{}", text(&out));
    assert!(text(&out).contains(&format!("touch {}/.flotilla-source", f.p("builder-src"))));
    assert!(f.path("builder-src/stale.rs").exists(), "a refused sync deleted a file");
    std::fs::write(f.path("builder-src/.flotilla-source"), "").unwrap();

    let out = f.fling(&config, &["sync"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let dst = f.path("builder-src");
    assert!(dst.join(".flotilla-source").exists(), "sync deleted its own marker");
    assert!(dst.join("src/main.rs").is_file());
    assert!(dst.join(".gitignore").is_file());
    for absent in ["src/key.secret", "target/debug", "out", ".git", "notes.swp", "stale.rs"] {
        assert!(!dst.join(absent).exists(), "{absent} is on the builder");
    }
    assert!(dst.join("target/keep").exists(), "sync deleted the builder's target/");
}

#[test]
fn dry_run_prints_every_command_and_runs_none() {
    if !can_run("dry_run_prints_every_command_and_runs_none") {
        return;
    }
    let f = Fixture::new("dry");
    let config = f.config("deploy.toml", "", &f.default_servers());
    // The plan for people: one line per step and host, what runs where.
    let out = f.fling(&config, &["--dry-run", "deploy", "install"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    for (name, _) in SERVERS {
        for phase in ["connect", "check", "push", "install"] {
            let line = format!("[{name}] {phase} (builder -> {name}): ");
            assert_eq!(stdout.matches(&line).count(), 1, "{line}: {stdout}");
        }
    }
    assert!(stdout.lines().all(|l| l.len() < 300), "{stdout}");
    assert!(stdout.contains("[client] agent (client): a private ssh-agent"), "{stdout}");
    // With every command line and script.
    let out = f.fling(&config, &["--dry-run", "--show-commands", "deploy", "install"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    for (name, _) in SERVERS {
        let step = format!("[{name}] connect, check, push, install (runs on builder -> {name})");
        assert!(stdout.contains(&step), "{stdout}");
    }
    assert!(stdout.contains("ssh-agent -D -a"), "{stdout}");
    assert!(stdout.contains("'root@[::1]:"), "IPv6 in brackets for rsync: {stdout}");
    assert!(!stdout.contains("StrictHostKeyChecking=no"));
    assert!(!f.path("staging").exists() && !f.path("lock").exists(), "the dry run did something");
    let out = f.fling(&config, &["--dry-run", "--json", "exec", "--", "uptime"]);
    let events = json_lines(&out);
    assert!(events.iter().all(|e| e["event"] == "plan" && e["argv"].is_array()));
}

// End to end on a testbed of three nspawn nodes: the real builder sshd, real nodes with
// systemd, the real packages and installer.

/// A testbed's deployment config and the xtask binary, with helpers for the fault tests.
struct Bed<'a> {
    tb: &'a flotilla_testbed::test_support::Testbed,
    config: PathBuf,
}

impl Bed<'_> {
    fn fling(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_xtask"))
            .arg("fling")
            .arg("--config")
            .arg(&self.config)
            .args(args)
            .env_remove("SSH_AUTH_SOCK")
            .stdin(Stdio::null())
            .output()
            .expect("run cargo xtask fling")
    }

    fn fling_ok(&self, args: &[&str]) -> Output {
        let out = self.fling(args);
        assert_eq!(out.status.code(), Some(0), "fling {args:?}: {}", text(&out));
        out
    }

    /// The builder's copy of the workspace.
    fn builder_source(&self) -> PathBuf {
        let config = std::fs::read_to_string(&self.config).unwrap();
        let doc: toml::Table = config.parse().unwrap();
        PathBuf::from(doc["builder"]["source_path"].as_str().unwrap())
    }

    /// A node's address from the deployment config.
    fn addr(&self, node: &str) -> String {
        let config = std::fs::read_to_string(&self.config).unwrap();
        let doc: toml::Table = config.parse().unwrap();
        doc["servers"][node]["addr"].as_str().unwrap().to_owned()
    }

    /// The network namespace holding a node: the one whose interfaces carry its address.
    fn netns(&self, node: &str) -> String {
        let addr = self.addr(node);
        let list = Command::new("ip").args(["netns", "list"]).output().unwrap();
        for line in String::from_utf8_lossy(&list.stdout).lines() {
            let ns = line.split_whitespace().next().unwrap_or_default();
            let out = Command::new("ip")
                .args(["netns", "exec", ns, "ip", "-o", "addr"])
                .output()
                .unwrap();
            if String::from_utf8_lossy(&out.stdout).contains(&format!(" {addr}/")) {
                return ns.to_owned();
            }
        }
        panic!("no network namespace holds {node}'s address {addr}");
    }

    /// The host end of a node's link: the interface whose index is the peer of its eth0.
    fn host_veth(&self, node: &str) -> String {
        let ns = self.netns(node);
        let out = Command::new("ip")
            .args(["netns", "exec", &ns, "cat", "/sys/class/net/eth0/iflink"])
            .output()
            .unwrap();
        let index = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        let links = Command::new("ip").args(["-o", "link"]).output().unwrap();
        let links = String::from_utf8_lossy(&links.stdout).into_owned();
        let line = links
            .lines()
            .find(|l| l.starts_with(&format!("{index}: ")))
            .unwrap_or_else(|| panic!("no interface {index} for {node}"));
        line.split(": ").nth(1).unwrap().split('@').next().unwrap().to_owned()
    }

    fn ip(&self, args: &[&str]) {
        run_ok(Command::new("ip").args(args));
    }

    fn ssh_ok(&self, node: &str, script: &str) -> String {
        self.tb.ssh_ok(node, script)
    }

    /// The active release of a node, or "none".
    fn current(&self, node: &str) -> String {
        self.ssh_ok(node, "readlink /opt/flotilla/current || echo none")
    }

    /// The main pid of a service on a node.
    fn main_pid(&self, node: &str, service: &str) -> String {
        self.ssh_ok(node, &format!("systemctl show -p MainPID --value {service}.service"))
    }

    fn assert_healthy(&self) {
        for node in &self.tb.nodes {
            for service in ["node-agent", "control-plane"] {
                let state =
                    self.ssh_ok(node, &format!("systemctl is-active {service}.service || true"));
                assert_eq!(state, "active", "{service} on {node}");
            }
        }
    }

    /// Changes one service's packaged config on the builder and packages again, so the next
    /// deploy carries a new release in which only that service differs.
    fn change_control_plane(&self, tag: &str) {
        let config = self.builder_source().join("smf/control-plane/config.toml");
        let mut text = std::fs::read_to_string(&config).unwrap();
        text.push_str(&format!("# changed by the test: {tag}\n"));
        std::fs::write(&config, text).unwrap();
        self.fling_ok(&["build", "package"]);
    }

    /// Every node runs a release and its services are healthy. Returns each node's release;
    /// they differ from node to node since a release includes the node's own overlay.
    fn assert_converged(&self) -> Vec<String> {
        let currents: Vec<String> = self.tb.nodes.iter().map(|n| self.current(n)).collect();
        assert!(currents.iter().all(|c| c != "none"), "{currents:?}");
        self.assert_healthy();
        currents
    }
}

fn host_line<'a>(output: &'a str, host: &str) -> &'a str {
    output
        .lines()
        .find(|l| l.starts_with(&format!("{host} ")))
        .unwrap_or_else(|| panic!("no recap line for {host} in:\n{output}"))
}

/// The full flow, then each fault, on one testbed so the packages are built once:
/// sync, build package, overlay, install, every service healthy; a change to one service
/// restarts only it; a no-op redeploy sends no payload; a link down before the deploy, a
/// link cut during the transfer, a stopped sshd and a killed installer each fail only their
/// node, with the right exit code and recap, leave that node on its previous release, and a
/// rerun after healing converges; uninstall leaves nothing.
#[test]
fn full_flow_and_faults_on_a_three_node_testbed() {
    if !flotilla_testbed::test_support::can_run("full_flow_and_faults_on_a_three_node_testbed") {
        return;
    }
    let options = flotilla_testbed::Options { nodes: 3, store: true };
    let tb = flotilla_testbed::test_support::Testbed::up_with(&workspace(), "fling", options);
    let bed = Bed { config: tb.deployment.clone(), tb: &tb };
    // Every server carries the whole hostile corpus in its variables, as data, through the
    // real deploy below: nothing it spells runs anywhere.
    let marker = format!("/tmp/fling-pwned-flow-{}", std::process::id());
    let _ = std::fs::remove_file(&marker);
    add_hostile_vars(&bed.config, &bed.tb.nodes, &marker);
    // The testbed's configs name its store; the flow pushes, and the store's part of it uses
    // a copy that keeps `[artifacts]`.
    let store_bed = Bed { config: tb.dir.join("deployment-store.toml"), tb: &tb };
    std::fs::copy(&bed.config, &store_bed.config).unwrap();
    for config in [&bed.config, &tb.deployment_v6] {
        let mut table: toml::Table = std::fs::read_to_string(config).unwrap().parse().unwrap();
        assert!(table.remove("artifacts").is_some(), "testbed up --store named no store");
        std::fs::write(config, toml::to_string(&table).unwrap()).unwrap();
    }

    // The third node has no rsync (and no route to a mirror): install-prereqs carries the
    // builder's there, every deploy below uses it, and uninstall removes it.
    let third = &bed.tb.nodes[2];
    bed.ssh_ok(third, "mv /usr/bin/rsync /usr/bin/rsync.hidden");
    let out = bed.fling_ok(&["install-prereqs"]);
    let carried = format!("[{third}] this server has no rsync: carrying the builder's");
    assert!(text(&out).contains(&carried), "{}", text(&out));
    assert!(text(&out).contains(&format!("[{third}] rsync  version")), "{}", text(&out));
    let out = bed.fling_ok(&["install-prereqs"]);
    assert!(!text(&out).contains("carrying"), "install-prereqs is not idempotent: {}", text(&out));
    bed.fling_ok(&["sync"]);
    bed.fling_ok(&["build", "package"]);
    bed.fling_ok(&["overlay"]);
    bed.fling_ok(&["install"]);
    let release_zero = bed.assert_converged();
    let out = bed.fling_ok(&["deploy", "status"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("3 of 3 hosts ok"));
    // Each node got its own overlay.
    for node in &bed.tb.nodes {
        let identity = bed.ssh_ok(node, "cat /opt/flotilla/current/node-agent/pkg/identity.toml");
        assert!(identity.contains(&format!("name = \"{node}\"")), "{node}: {identity}");
    }

    // Only the changed service restarts.
    let before: Vec<(String, String)> = bed
        .tb
        .nodes
        .iter()
        .map(|n| (bed.main_pid(n, "node-agent"), bed.main_pid(n, "control-plane")))
        .collect();
    bed.change_control_plane("one");
    bed.fling_ok(&["install"]);
    let release_one = bed.assert_converged();
    for (node, (agent, plane)) in bed.tb.nodes.iter().zip(&before) {
        assert_eq!(bed.main_pid(node, "node-agent"), *agent, "node-agent restarted on {node}");
        assert_ne!(bed.main_pid(node, "control-plane"), *plane, "control-plane kept on {node}");
    }

    // Rollback returns every node to its previous release; installing again returns to the
    // new one.
    bed.fling_ok(&["deploy", "rollback"]);
    assert_eq!(bed.assert_converged(), release_zero, "rollback did not return");
    bed.fling_ok(&["install"]);
    assert_eq!(bed.assert_converged(), release_one);

    // A no-op redeploy sends no payload: only rsync's file lists.
    let out = bed.fling_ok(&["--json", "install"]);
    let summary = json_lines(&out).pop().unwrap();
    for host in summary["hosts"].as_array().unwrap() {
        let sent = host["bytes_sent"].as_u64().unwrap();
        assert!(sent < 20_000, "a no-op redeploy sent {sent} bytes to {}", host["host"]);
    }

    // Fault: node2's link is down before the deploy. It is cut on the host's side: taking the
    // node's own interface down would also flush its IPv6 addresses and routes.
    bed.change_control_plane("two");
    let veth = bed.host_veth("node2");
    bed.ip(&["link", "set", &veth, "down"]);
    let out = bed.fling(&["install"]);
    bed.ip(&["link", "set", &veth, "up"]);
    assert_eq!(out.status.code(), Some(4), "{}", text(&out));
    let recap = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(host_line(&recap, "node2").contains("unreachable"), "{recap}");
    assert!(recap.contains("node2: connect unreachable"), "{recap}");
    assert!(host_line(&recap, "node1").contains(" ok "), "{recap}");
    assert_eq!(bed.current("node2"), release_one[1], "node2 left its release");
    assert_ne!(bed.current("node1"), release_one[0], "node1 did not get the new release");
    // IPv6 from here on: the nodes' other address family works the same way.
    let bed = Bed { config: tb.deployment_v6.clone(), tb: &tb };
    bed.fling_ok(&["install"]);
    let release_two = bed.assert_converged();
    assert_ne!(release_two[1], release_one[1], "node2 did not converge");

    // Fault: node2's link is cut in the middle of the transfer. The link is slowed first so
    // the transfer is still under way when it goes.
    bed.change_control_plane("three");
    // rsync would send only the changed blocks; an empty staging directory makes node2
    // receive everything, slowly, so the cut lands in the middle of it.
    bed.ssh_ok("node2", "rm -rf /var/tmp/flotilla-staging");
    run_ok(Command::new("tc").args([
        "qdisc", "add", "dev", &veth, "root", "tbf", "rate", "100kbit", "burst", "4kb", "latency",
        "2s",
    ]));
    let child = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .arg("fling")
        .arg("--config")
        .arg(&bed.config)
        .arg("install")
        .env_remove("SSH_AUTH_SOCK")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(4));
    bed.ip(&["link", "set", &veth, "down"]);
    let out = child.wait_with_output().unwrap();
    bed.ip(&["link", "set", &veth, "up"]);
    run_ok(Command::new("tc").args(["qdisc", "del", "dev", &veth, "root"]));
    assert!(matches!(out.status.code(), Some(2) | Some(4)), "{}", text(&out));
    let recap = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(host_line(&recap, "node2").contains("push"), "{recap}");
    assert!(host_line(&recap, "node3").contains(" ok "), "{recap}");
    assert_eq!(bed.current("node2"), release_two[1], "node2 left its release");
    bed.fling_ok(&["install"]);
    let release_three = bed.assert_converged();

    // Fault: sshd is stopped on node2. It is started again from the host, inside the node.
    bed.change_control_plane("four");
    bed.ssh_ok("node2", "systemctl stop ssh.socket ssh.service 2>/dev/null; true");
    let out = bed.fling(&["install"]);
    let leader = node_leader(&bed, "node2");
    run_ok(Command::new("nsenter").args(["-t", &leader, "-m", "-u", "-i", "-n", "-p"]).args([
        "systemctl",
        "start",
        "ssh.service",
    ]));
    assert_eq!(out.status.code(), Some(4), "{}", text(&out));
    let recap = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(recap.contains("node2: connect unreachable"), "{recap}");
    assert_eq!(bed.current("node2"), release_three[1]);
    bed.fling_ok(&["install"]);
    let release_four = bed.assert_converged();

    // Fault: the installer is killed on node2 during activation: once the new release is
    // unpacked next to the active one. The pid is the one the installer recorded in its lock,
    // the process this deploy started.
    bed.change_control_plane("five");
    let killer = bed
        .tb
        .ssh_command("node2", &[])
        .arg(
            "before=$(ls /opt/flotilla/releases | sort | tr '\\n' ' '); \
             for i in $(seq 1 1000); do now=$(ls /opt/flotilla/releases | sort | tr '\\n' ' '); \
             pid=$(sed -n 's/^pid=//p' /opt/flotilla/install.lock 2>/dev/null); \
             if [ \"$now\" != \"$before\" ] && [ -n \"$pid\" ] && \
             grep -q flotilla-installer /proc/$pid/cmdline 2>/dev/null; then \
             kill -9 \"$pid\"; echo killed; exit 0; fi; sleep 0.01; done; exit 1",
        )
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let out = bed.fling(&["install"]);
    let killed = killer.wait_with_output().unwrap();
    assert_eq!(String::from_utf8_lossy(&killed.stdout).trim(), "killed", "{}", text(&out));
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let recap = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(recap.contains("node2: install failed"), "{recap}");
    assert!(host_line(&recap, "node1").contains(" ok "), "{recap}");
    assert_ne!(bed.current("node1"), release_four[0], "node1 did not get the new release");
    // Whether the kill came before or after the switch of `current`, node2 still runs a
    // release and its services.
    let node2 = bed.current("node2");
    assert_ne!(node2, "none");
    for service in ["node-agent", "control-plane"] {
        let state = bed.ssh_ok("node2", &format!("systemctl is-active {service}.service || true"));
        assert_eq!(state, "active", "{service} on node2 after the installer was killed");
    }
    bed.fling_ok(&["install"]);
    let release_five = bed.assert_converged();
    assert_ne!(release_five[1], release_four[1], "node2 did not converge");

    plans_journal_and_retry(&bed);
    through_the_store(&store_bed);
    let release_five = bed.assert_converged();

    // thing-flinger's forms on the real builder: the package graph on standard output;
    // packages built into another outputs directory and pushed from it.
    let out = bed.fling_ok(&["build", "dot"]);
    let graph = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(graph.starts_with("digraph"), "not a graph on stdout:\n{graph}");
    assert!(graph.contains("control-plane") && graph.trim_end().ends_with('}'), "{graph}");
    let config = bed.builder_source().join("smf/control-plane/config.toml");
    let mut changed = std::fs::read_to_string(&config).unwrap();
    changed.push_str("# changed by the test: six\n");
    std::fs::write(&config, changed).unwrap();
    bed.fling_ok(&["--artifacts", "out/six", "build", "package"]);
    assert!(bed.builder_source().join("out/six/digests.b3").is_file());
    bed.fling_ok(&["deploy", "install", "--artifacts", "out/six"]);
    let release_six = bed.assert_converged();
    assert_ne!(release_six, release_five, "the packages of out/six were not installed");

    // deploy clean: every release but the active one, and the staged packages and overlay,
    // go; the active release keeps serving and the installer stays for status and uninstall.
    bed.fling_ok(&["deploy", "clean"]);
    for (node, current) in bed.tb.nodes.iter().zip(&release_six) {
        let releases = bed.ssh_ok(node, "ls /opt/flotilla/releases");
        let current_name = current.rsplit('/').next().unwrap();
        assert_eq!(releases, current_name, "{node} kept more than its active release");
        let staged = bed.ssh_ok(node, "ls -A /var/tmp/flotilla-staging | sort | tr '\\n' ' '");
        assert!(!staged.contains("packages") && !staged.contains("overlay"), "{node}: {staged}");
        assert!(staged.contains("bin"), "{node}: {staged}");
    }
    assert_eq!(bed.assert_converged(), release_six);
    let out = bed.fling_ok(&["deploy", "status"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("3 of 3 hosts ok"));

    // Uninstall leaves nothing: no release, no unit, no staging directory.
    bed.fling_ok(&["uninstall"]);
    for node in &bed.tb.nodes {
        let left = bed.ssh_ok(
            node,
            "ls -d /opt/flotilla /var/tmp/flotilla-staging /etc/systemd/system/node-agent.service \
             /etc/systemd/system/control-plane.service 2>/dev/null || true",
        );
        assert_eq!(left, "", "uninstall left on {node}:\n{left}");
        let found = bed.ssh_ok(node, &format!("test -e {marker} && echo found || echo absent"));
        assert_eq!(found, "absent", "a hostile variable ran on {node}");
    }
    assert!(!Path::new(&marker).exists(), "a hostile variable ran on the client or builder");
}

/// Deploys through the testbed's artifact store (SeaweedFS): the servers fetch the packages
/// from it and the builder sends no package bytes over ssh; an object tampered with in the
/// store is refused by every installer with a digest error while the old release keeps
/// serving; an expired URL fails clearly; with the store stopped, the deploy falls back to
/// pushing (and `--require-store` refuses to).
fn through_the_store(bed: &Bed) {
    let store = bed.tb.store.clone().expect("the testbed has a store");
    let nodes = &bed.tb.nodes;
    let digests = || std::fs::read_to_string(bed.builder_source().join("out/digests.b3")).unwrap();
    let control_plane_digest = || {
        let list = digests();
        let line = list.lines().find(|l| l.ends_with("  control-plane.tar.gz")).unwrap();
        line.split_whitespace().next().unwrap().to_owned()
    };
    let sent = |out: &Output| -> Vec<u64> {
        let summary = json_lines(out).pop().unwrap();
        summary["hosts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|h| h["bytes_sent"].as_u64().unwrap())
            .collect()
    };

    // A new control-plane goes to the store once, at packaging; each server fetches it. The
    // first node lost its staging directory, installer included, as a new server has none:
    // it downloads the installer from the store too (curl, checked by sha256).
    bed.change_control_plane("store");
    bed.ssh_ok(&nodes[0], "rm -rf /var/tmp/flotilla-staging");
    let out = bed.fling_ok(&["--json", "install"]);
    let before = bed.assert_converged();
    for (node, bytes) in nodes.iter().zip(sent(&out)) {
        // The package is 1.4 MB and the installer 4 MB; what ssh carried is the check and the
        // overlay's file lists.
        assert!(bytes < 100_000, "{node}: {bytes} bytes over ssh in a deploy through the store");
    }
    assert!(text(&out).contains("from the store"), "{}", text(&out));
    assert!(!text(&out).contains("pushed over ssh instead"), "{}", text(&out));
    let builder_installer = bed.builder_source().join("target/release/flotilla-installer");
    let wanted = Command::new("sha256sum").arg(&builder_installer).output().unwrap();
    let fetched =
        bed.ssh_ok(&nodes[0], "sha256sum < /var/tmp/flotilla-staging/bin/flotilla-installer");
    assert_eq!(fetched[..64], String::from_utf8_lossy(&wanted.stdout)[..64], "node1's installer");
    let staged = bed.ssh_ok(&nodes[0], "cat /var/tmp/flotilla-staging/packages/digests.b3");
    assert_eq!(staged.trim(), digests().trim(), "node1 staged other packages");

    // Tampered: the store's copy of the next control-plane has one byte flipped.
    bed.change_control_plane("tampered");
    let key = format!("/buckets/flotilla/testbed/blake3/{}", control_plane_digest());
    let (status, original) = http(&store.filer, "GET", &key, &[]);
    assert_eq!(status, 200, "the filer has no {key}");
    let mut bad = original.clone();
    bad[original.len() / 2] ^= 0xff;
    let (status, _) = http(&store.filer, "PUT", &key, &bad);
    assert!((200..300).contains(&status), "tamper with {key}: {status}");
    let out = bed.fling(&["install"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    for (node, current) in nodes.iter().zip(&before) {
        let line = host_line(&String::from_utf8_lossy(&out.stdout), node).to_owned();
        assert!(line.contains("fetch") && line.contains("failed"), "{line}");
        assert_eq!(&bed.current(node), current, "{node} left its release for a tampered one");
    }
    let err = text(&out);
    assert!(
        err.contains("the store's object has digest") && err.contains("nothing was unpacked"),
        "{err}"
    );
    // The refusal says how to recover: the builder finds the object present and would not
    // upload it again by itself.
    assert!(err.contains(&format!("delete the object blake3/{}", control_plane_digest())), "{err}");
    bed.assert_healthy();
    // The good bytes back, the same deploy converges.
    let (status, _) = http(&store.filer, "PUT", &key, &original);
    assert!((200..300).contains(&status), "restore {key}: {status}");
    bed.fling_ok(&["install"]);
    assert_ne!(bed.assert_converged(), before);

    // Expired: URLs signed for one second, used after two.
    let short = bed.tb.dir.join("deployment-short-urls.toml");
    let config = std::fs::read_to_string(&bed.config).unwrap();
    std::fs::write(&short, config.replace("[artifacts]\n", "[artifacts]\nurl_ttl_secs = 1\n"))
        .unwrap();
    let source = bed.builder_source();
    let signed = Command::new(source.join("target/debug/xtask"))
        .current_dir(&source)
        .args(["fling", "--config"])
        .arg(&short)
        .args(["store-sync", "--artifacts", "out", "--sign"])
        .output()
        .unwrap();
    assert!(signed.status.success(), "store-sync: {}", text(&signed));
    let answer: serde_json::Value = String::from_utf8_lossy(&signed.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("flotilla-store "))
        .map(|j| serde_json::from_str(j).unwrap())
        .unwrap_or_else(|| panic!("no answer from store-sync: {}", text(&signed)));
    let list = answer["fetch"].to_string();
    std::thread::sleep(Duration::from_secs(2));
    let dir = format!("/var/tmp/fling-expired-{}", std::process::id());
    let mut fetch = bed.tb.ssh_command(&nodes[0], &[]);
    fetch
        .arg(format!("/var/tmp/flotilla-staging/bin/flotilla-installer fetch --packages {dir}; rc=$?; rm -rf {dir}; exit $rc"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = fetch.spawn().unwrap();
    use std::io::Write as _;
    child.stdin.take().unwrap().write_all(list.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success(), "an expired URL was served: {}", text(&out));
    assert!(text(&out).contains("it expired"), "{}", text(&out));

    // The store gone (killed, as a crash would): packaging warns, the deploy pushes instead, unless told not to.
    let killed = Command::new("kill").args(["-KILL", &store.pid.to_string()]).status().unwrap();
    assert!(killed.success(), "stop the store (pid {})", store.pid);
    let deadline = Instant::now() + Duration::from_secs(15);
    while flotilla_testbed::store::http_status(
        store.endpoint.trim_start_matches("http://").parse().unwrap(),
        "GET",
        "/",
        &[],
    )
    .is_some()
    {
        assert!(Instant::now() < deadline, "the store still answers");
        std::thread::sleep(Duration::from_millis(100));
    }
    bed.change_control_plane("fallback");
    let out = bed.fling(&["install", "--require-store"]);
    assert_ne!(out.status.code(), Some(0), "--require-store deployed without the store");
    assert!(text(&out).contains("cannot be reached"), "{}", text(&out));
    let unchanged = bed.assert_converged();
    let out = bed.fling_ok(&["--json", "install"]);
    assert!(text(&out).contains("pushing"), "{}", text(&out));
    for (node, bytes) in nodes.iter().zip(sent(&out)) {
        // rsync sends the blocks of the new control-plane that differ from the staged one:
        // hundreds of kB, against about 1 kB through the store.
        assert!(bytes > 20_000, "{node}: the fallback pushed only {bytes} bytes");
    }
    assert_ne!(bed.assert_converged(), unchanged);
}

/// One HTTP/1.0 request to `base` (`http://host:port`): the status and the body.
fn http(base: &str, method: &str, path: &str, body: &[u8]) -> (u16, Vec<u8>) {
    use std::io::{Read as _, Write as _};
    let addr = base.trim_start_matches("http://");
    let mut stream = TcpStream::connect(addr).unwrap();
    let head = format!(
        "{method} {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).unwrap();
    stream.write_all(body).unwrap();
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).unwrap();
    let split = answer.windows(4).position(|w| w == b"\r\n\r\n").expect("an HTTP answer");
    let status_line = String::from_utf8_lossy(&answer[..split]).lines().next().unwrap().to_owned();
    let status = status_line.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, answer[split + 4..].to_vec())
}

/// The connections a node's sshd accepted so far, counted from its journal inside the node
/// (through its init's namespaces, not over ssh, so counting adds none).
fn accepted_connections(bed: &Bed, node: &str) -> usize {
    let leader = node_leader(bed, node);
    let out = Command::new("nsenter")
        .args(["-t", &leader, "-m", "-u", "-i", "-n", "-p"])
        .args(["journalctl", "--no-pager", "-o", "cat"])
        .output()
        .unwrap();
    assert!(out.status.success(), "journalctl on {node}: {}", text(&out));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains("Accepted publickey"))
        .count()
}

/// `deploy plan`, `install --plan` and the journal on the shared testbed: a plan after one
/// service changed shows only that service changing and restarting on every server; a file
/// changed on the builder after planning, and a server rolled back after planning, each make
/// the apply refuse (exit 7) naming the server and what differs, installing nothing; a fresh
/// plan applies and installs exactly what it showed; an install with one node's link down,
/// then `install --retry-failed` after healing reaches only that node (the others' sshd
/// accepts no connection), and `history` shows both runs.
fn plans_journal_and_retry(bed: &Bed) {
    let nodes = &bed.tb.nodes;
    let dir = std::env::temp_dir().join(format!("fling-plan-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let plan_file = dir.join("plan.json");
    let plan_arg = plan_file.to_str().unwrap();
    let before = bed.assert_converged();

    // Nothing to do: every server unchanged.
    let out = bed.fling_ok(&["deploy", "plan"]);
    let table = String::from_utf8_lossy(&out.stdout).into_owned();
    for node in nodes {
        assert!(table.contains(&format!("{node}: nothing would change")), "{table}");
    }

    bed.change_control_plane("planned");
    let out = bed.fling_ok(&["deploy", "plan", "--out", plan_arg]);
    let table = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        table.contains(&format!("{} servers: {} would change", nodes.len(), nodes.len())),
        "{table}"
    );
    let out = bed.fling_ok(&["--json", "deploy", "plan"]);
    let plan: serde_json::Value = serde_json::from_slice(&out.stdout).expect("the plan is JSON");
    let saved: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&plan_file).unwrap()).unwrap();
    for (i, node) in nodes.iter().enumerate() {
        let server = &plan["servers"][i];
        assert_eq!(server["server"], node.as_str());
        assert_eq!(server["verdict"], "changes", "{server}");
        let packages: Vec<&str> = server["packages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["name"].as_str().unwrap())
            .collect();
        assert_eq!(packages, ["control-plane"], "{node}: only control-plane changes");
        assert!(server["overlay"].is_null(), "{node}: no overlay file changes: {server}");
        assert_eq!(server["restart"], serde_json::json!(["control-plane"]), "{server}");
        let unchanged = server["unchanged"].as_array().unwrap();
        assert!(unchanged.contains(&serde_json::json!("node-agent")), "{server}");
        assert!(!unchanged.contains(&serde_json::json!("control-plane")), "{server}");
        assert_eq!(
            server["release"]["from"].as_str().unwrap(),
            before[i].rsplit('/').next().unwrap(),
            "{node}: the plan's current release is the node's"
        );
        let line = table.lines().position(|l| l.starts_with(&format!("{node}: release "))).unwrap();
        let package_line = table.lines().nth(line + 1).unwrap();
        assert!(package_line.trim_start().starts_with("package  control-plane"), "{table}");
        // The table shows only short digests; the file keeps them whole.
        assert_eq!(saved["servers"][i]["payload"], server["payload"]);
    }

    // Another file changes on the builder after planning: the apply refuses, installing
    // nothing.
    let agent_config = bed.builder_source().join("smf/node-agent/config.toml");
    let original = std::fs::read_to_string(&agent_config).unwrap();
    std::fs::write(&agent_config, format!("{original}# changed after the plan\n")).unwrap();
    bed.fling_ok(&["build", "package"]);
    let out = bed.fling(&["deploy", "install", "--plan", plan_arg]);
    assert_eq!(out.status.code(), Some(7), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    for node in nodes {
        assert!(err.contains(&format!("{node}: package node-agent is now")), "{err}");
    }
    assert_eq!(bed.assert_converged(), before, "a refused plan installed something");
    std::fs::write(&agent_config, &original).unwrap();
    bed.fling_ok(&["build", "package"]);

    // A server rolled back after planning: refused, naming that server's active release.
    bed.fling_ok(&["deploy", "plan", "--out", plan_arg]);
    bed.fling_ok(&["-s", "node2", "deploy", "rollback"]);
    let rolled = bed.current("node2");
    let out = bed.fling(&["deploy", "install", "--plan", plan_arg]);
    assert_eq!(out.status.code(), Some(7), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(err.contains("node2: the server's active release is"), "{err}");
    assert!(!err.contains("node1:"), "{err}");
    assert_eq!(bed.current("node2"), rolled);
    bed.fling_ok(&["-s", "node2", "install"]);

    // A fresh plan applies: exactly its releases, only control-plane restarted.
    bed.fling_ok(&["deploy", "plan", "--out", plan_arg]);
    let saved: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&plan_file).unwrap()).unwrap();
    let agents: Vec<String> = nodes.iter().map(|n| bed.main_pid(n, "node-agent")).collect();
    bed.fling_ok(&["deploy", "install", "--plan", plan_arg]);
    let after = bed.assert_converged();
    for (i, node) in nodes.iter().enumerate() {
        let to = saved["servers"][i]["release"]["to"].as_str().unwrap();
        assert_eq!(after[i].rsplit('/').next().unwrap(), to, "{node} is not on the plan's release");
        assert_eq!(bed.main_pid(node, "node-agent"), agents[i], "node-agent restarted on {node}");
    }
    // A plan is spent once applied: the servers no longer run what it saw.
    let out = bed.fling(&["deploy", "install", "--plan", plan_arg]);
    assert_eq!(out.status.code(), Some(7), "{}", text(&out));

    // The journal: an install with node2's link down, then only node2 is retried.
    bed.change_control_plane("retried");
    let veth = bed.host_veth("node2");
    bed.ip(&["link", "set", &veth, "down"]);
    let out = bed.fling(&["install"]);
    bed.ip(&["link", "set", &veth, "up"]);
    assert_eq!(out.status.code(), Some(4), "{}", text(&out));
    let others: Vec<&String> = nodes.iter().filter(|n| n.as_str() != "node2").collect();
    let accepted: Vec<usize> = others.iter().map(|n| accepted_connections(bed, n)).collect();
    let out = bed.fling_ok(&["install", "--retry-failed"]);
    let recap = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(recap.contains("did not finish on: node2\n"), "{recap}");
    assert!(host_line(&recap, "node2").contains(" ok "), "{recap}");
    for (node, was) in others.iter().zip(&accepted) {
        assert!(!recap.lines().any(|l| l.starts_with(&format!("{node} "))), "{recap}");
        assert_eq!(accepted_connections(bed, node), *was, "the retry connected to {node}");
    }
    let out = bed.fling_ok(&["install", "--retry-failed"]);
    assert!(text(&out).contains("nothing to retry"), "{}", text(&out));
    let out = bed.fling_ok(&["history", "--last", "3"]);
    let history = String::from_utf8_lossy(&out.stdout).into_owned();
    let installs: Vec<&str> =
        history.lines().filter(|l| l.starts_with("  ") && l.contains("deploy install")).collect();
    assert_eq!(installs.len(), nodes.len() + 1, "{history}");
    assert!(
        installs.iter().any(|l| l.starts_with("  node2 ") && l.contains("unreachable")),
        "{history}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The process id of a node's init: the child of its systemd-nspawn.
fn node_leader(bed: &Bed, node: &str) -> String {
    let state = std::fs::read_to_string(bed.tb.dir.join("state.json")).unwrap();
    let state: serde_json::Value = serde_json::from_str(&state).unwrap();
    let pid = state["node_pids"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p[0] == node)
        .unwrap_or_else(|| panic!("no pid for {node} in {state}"))[1]
        .as_u64()
        .unwrap();
    let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap();
    children.split_whitespace().next().unwrap_or_else(|| panic!("{node} has no init")).to_owned()
}

/// On real nodes: an unknown and a changed host key are refused for that node alone, and
/// hostile strings in the config never run anything on the builder or any node.
#[test]
fn host_keys_and_hostile_strings_on_a_three_node_testbed() {
    if !flotilla_testbed::test_support::can_run(
        "host_keys_and_hostile_strings_on_a_three_node_testbed",
    ) {
        return;
    }
    let tb = flotilla_testbed::test_support::Testbed::up(&workspace(), "flsec", 3);
    let dir = TempDir::new("testbed-sec");
    let real = std::fs::read_to_string(&tb.known_hosts).unwrap();
    let config_text = std::fs::read_to_string(&tb.deployment).unwrap();
    let with_known_hosts = |name: &str, known_hosts: &str| -> Bed {
        let kh = dir.0.join(format!("{name}.known_hosts"));
        std::fs::write(&kh, known_hosts).unwrap();
        let config = dir.0.join(format!("{name}.toml"));
        let text = config_text.replace(
            &toml::Value::from(tb.known_hosts.to_str().unwrap()).to_string(),
            &toml::Value::from(kh.to_str().unwrap()).to_string(),
        );
        assert_ne!(text, config_text, "the testbed config names no known_hosts file");
        std::fs::write(&config, text).unwrap();
        Bed { config, tb: &tb }
    };

    // node2's key is unknown.
    let unknown: String =
        real.lines().filter(|l| !l.starts_with("node2")).map(|l| format!("{l}\n")).collect();
    let bed = with_known_hosts("unknown", &unknown);
    let out = bed.fling(&["exec", "--", "true"]);
    assert_eq!(out.status.code(), Some(4), "{}", text(&out));
    assert!(text(&out).contains("node2: connect unreachable"), "{}", text(&out));
    assert!(text(&out).contains("Host key verification failed"), "{}", text(&out));
    assert!(host_line(&String::from_utf8_lossy(&out.stdout), "node1").contains(" ok "));

    // node2's key changed: it is node3's key now.
    let node3_key = real
        .lines()
        .find(|l| l.starts_with("node3"))
        .unwrap()
        .split_whitespace()
        .skip(1)
        .collect::<Vec<_>>()
        .join(" ");
    let changed: String = real
        .lines()
        .map(|l| {
            if l.starts_with("node2") {
                format!("{} {node3_key}\n", l.split_whitespace().next().unwrap())
            } else {
                format!("{l}\n")
            }
        })
        .collect();
    let bed = with_known_hosts("changed", &changed);
    let out = bed.fling(&["exec", "--", "true"]);
    assert_eq!(out.status.code(), Some(4), "{}", text(&out));
    assert!(text(&out).contains("REMOTE HOST IDENTIFICATION HAS CHANGED"), "{}", text(&out));

    // The hostile corpus in every server's variables and in the builder's excludes, all that
    // the config accepts of it: nothing it spells runs, on the builder or on any node.
    let marker = format!("/tmp/fling-pwned-{}", std::process::id());
    let _ = std::fs::remove_file(&marker);
    let config = dir.0.join("hostile.toml");
    std::fs::write(&config, &config_text).unwrap();
    add_hostile_vars(&config, &tb.nodes, &marker);
    let mut table: toml::Table = std::fs::read_to_string(&config).unwrap().parse().unwrap();
    let excludes: Vec<toml::Value> = hostile_corpus(&marker)
        .into_iter()
        .filter(|v| !v.contains(char::is_control))
        .map(toml::Value::from)
        .collect();
    table["builder"].as_table_mut().unwrap().insert("excludes".into(), excludes.into());
    std::fs::write(&config, toml::to_string(&table).unwrap()).unwrap();
    let bed = Bed { config, tb: &tb };
    for args in [
        &["sync"][..],
        &["exec", "--", "true"],
        &["deploy", "status"],
        &["uninstall"],
        &["install-prereqs"],
    ] {
        let out = bed.fling(args);
        assert!(out.status.code().is_some(), "{}", text(&out));
        assert!(!Path::new(&marker).exists(), "{args:?} ran a config string here");
    }
    for node in &bed.tb.nodes {
        let found = bed.ssh_ok(node, &format!("test -e {marker} && echo found || echo absent"));
        assert_eq!(found, "absent", "a config string ran on {node}");
    }
}

/// Gives every node of the config at `path` the hostile corpus (what the config accepts of
/// it: no control characters) as variables `hostile0`, `hostile1`, ...
fn add_hostile_vars(path: &Path, nodes: &[String], marker: &str) {
    let mut table: toml::Table = std::fs::read_to_string(path).unwrap().parse().unwrap();
    let corpus = hostile_corpus(marker);
    for node in nodes {
        let server = table["servers"][node.as_str()].as_table_mut().unwrap();
        let vars = server.entry("vars").or_insert(toml::Table::new().into());
        for (i, value) in corpus.iter().filter(|v| !v.contains(char::is_control)).enumerate() {
            vars.as_table_mut().unwrap().insert(format!("hostile{i}"), value.as_str().into());
        }
    }
    std::fs::write(path, toml::to_string(&table).unwrap()).unwrap();
}

/// The root of this repository's workspace.
fn workspace() -> camino::Utf8PathBuf {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    camino::Utf8PathBuf::try_from(dir.canonicalize().unwrap()).unwrap()
}
