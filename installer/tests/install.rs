//! The installer on a temporary prefix, with a recording runner standing in for systemd and
//! SMF: what is unpacked where, which commands run in which order, what is restarted, and that
//! every bad input leaves the previous release active and nothing half-installed.

mod support;

use std::fs;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use camino::Utf8Path;
use installer::runner::{Output, RecordingRunner};
use installer::{Config, Error, Installer, ManagerKind};
use support::{packages_dir, smf_manifest, tar_bytes, zone_bytes, Entry, Service, TempDir};

/// `systemctl show` output for the units after `--`, each in `active` and `unit_file` state.
fn show_output(cmd: &installer::runner::Cmd, active: &str, unit_file: &str) -> String {
    let units = cmd.args.iter().skip_while(|a| *a != "--").skip(1);
    let blocks: Vec<String> = units
        .map(|u| format!("Id={u}\nActiveState={active}\nUnitFileState={unit_file}\n"))
        .collect();
    blocks.join("\n")
}

/// A runner where every command succeeds and every service reports itself running (and
/// enabled).
fn running() -> Arc<RecordingRunner> {
    Arc::new(RecordingRunner::with(|cmd| {
        let show;
        let stdout = if cmd.args.first().map(String::as_str) == Some("is-active") {
            "active\n"
        } else if cmd.program == "systemctl" && cmd.args.first().map(String::as_str) == Some("show")
        {
            show = show_output(cmd, "active", "enabled");
            show.as_str()
        } else if cmd.program.ends_with("svcs")
            && cmd.args.first().map(String::as_str) == Some("-H")
        {
            "online\n"
        } else {
            ""
        };
        Output {
            success: true,
            status: "exit status: 0".into(),
            stdout: stdout.into(),
            stderr: String::new(),
        }
    }))
}

fn installer(root: &Utf8Path, manager: ManagerKind, runner: &Arc<RecordingRunner>) -> Installer {
    let config = Config {
        prefix: root.join("prefix"),
        packages_prefix: installer::Prefix::default(),
        unit_dir: root.join("units"),
        manager,
        keep: 3,
        lock_wait: Duration::ZERO,
        create_users: false,
        confirm_timeout: None,
    };
    Installer::new(config, runner.clone())
}

fn listing(dir: &Utf8Path) -> Vec<String> {
    let mut names: Vec<String> = match dir.read_dir_utf8() {
        Ok(entries) => entries.map(|e| e.unwrap().file_name().to_owned()).collect(),
        Err(_) => Vec::new(),
    };
    names.sort();
    names
}

/// Two services, `a` and `b` (b starts after a), each in its own zone image.
fn two_services(
    root: &Utf8Path,
    tag: &str,
    b_config: &str,
    b_health: Option<&str>,
) -> camino::Utf8PathBuf {
    let a = Service::new("a");
    let b = Service {
        config: b_config,
        health: b_health,
        unit_extra: "After=a.service",
        ..Service::new("b")
    };
    packages_dir(root, tag, &[("a.tar.gz", a.zone()), ("b.tar.gz", b.zone())])
}

#[test]
fn install_is_idempotent_and_restarts_only_what_changed() {
    let tmp = TempDir::new("install");
    let root = tmp.path();
    let runner = running();
    let inst = installer(root, ManagerKind::Systemd, &runner);
    let v1 = two_services(root, "v1", "v = 1\n", None);

    let first = inst.install(&v1, None).unwrap();
    assert!(first.unpacked);
    assert_eq!(first.restarted, ["a", "b"]);
    let prefix = root.join("prefix");
    let units = root.join("units");
    let release = prefix.join("releases").join(&first.release);
    assert_eq!(
        fs::read_link(prefix.join("current")).unwrap().to_str().unwrap(),
        format!("releases/{}", first.release)
    );
    assert_eq!(fs::read_to_string(release.join("b/pkg/config.toml")).unwrap(), "v = 1\n");
    assert!(release.join("a/bin/a").is_file());
    // Unit files name paths under the default prefix; under another one they are rewritten.
    let unit = fs::read_to_string(units.join("a.service")).unwrap();
    assert!(unit.contains(&format!(
        "ExecStart={prefix}/current/a/bin/a --config {prefix}/current/a/pkg/config.toml"
    )));
    assert_eq!(listing(&units), ["a.service", "b.service"]);
    // Units are in place before the one reload (`enable` does not reload again); a and b
    // restart in one transaction, where systemd starts b after a because b's unit says
    // `After=a.service`. One `systemctl show` then finds both running.
    assert_eq!(
        runner.take(),
        [
            "systemctl enable --no-reload a.service b.service",
            "systemctl daemon-reload",
            "systemctl restart a.service b.service",
            "systemctl show --property=Id,ActiveState,UnitFileState -- a.service b.service",
        ]
    );

    // The same packages again: the same release, nothing reloaded, nothing restarted.
    let again = inst.install(&v1, None).unwrap();
    assert_eq!(again.release, first.release);
    assert!(!again.unpacked);
    assert!(again.restarted.is_empty(), "{again:?}");
    // Everything runs and is enabled, so one question to systemd is all it takes.
    assert_eq!(
        runner.take(),
        ["systemctl show --property=Id,ActiveState,UnitFileState -- a.service b.service"]
    );

    // One package changed: only its service restarts.
    let v2 = two_services(root, "v2", "v = 2\n", None);
    let second = inst.install(&v2, None).unwrap();
    assert_ne!(second.release, first.release);
    assert_eq!(second.restarted, ["b"]);
    assert_eq!(second.unchanged, ["a"]);
    let commands = runner.take();
    assert!(commands.contains(&"systemctl restart b.service".to_owned()), "{commands:?}");
    assert!(commands.contains(&"systemctl start a.service".to_owned()), "{commands:?}");
    assert!(!commands.iter().any(|c| c.contains("restart a.service")), "{commands:?}");
    // Neither unit file changed, so systemd is not reloaded.
    assert!(!commands.iter().any(|c| c.contains("daemon-reload")), "{commands:?}");

    // Rollback goes to the first release and restarts b again; rollback --to returns.
    let back = inst.rollback(None).unwrap();
    assert_eq!(back.release, first.release);
    assert_eq!(back.restarted, ["b"]);
    assert_eq!(fs::read_to_string(prefix.join("current/b/pkg/config.toml")).unwrap(), "v = 1\n");
    let forward = inst.rollback(Some(&second.release)).unwrap();
    assert_eq!(forward.release, second.release);
    let err = inst.rollback(Some("nonexistent")).unwrap_err().to_string();
    assert!(err.starts_with("rollback: no release nonexistent on this host"), "{err}");

    // Status reads the state of each service through the manager.
    runner.take();
    let status = inst.status().unwrap();
    assert_eq!(status.active.as_deref(), Some(second.release.as_str()));
    assert_eq!(status.releases.len(), 2);
    assert!(status.services.iter().all(|s| s.running && s.state == "active"));

    // Deactivate stops in reverse dependency order and keeps the files.
    runner.take();
    assert_eq!(inst.deactivate().unwrap(), ["b", "a"]);
    assert_eq!(
        runner.take(),
        ["systemctl disable --now b.service", "systemctl disable --now a.service"]
    );
    assert!(prefix.join("current/a/bin/a").is_file());

    // Uninstall removes units, releases and state, and keeps the data directory.
    fs::create_dir_all(prefix.join("data/a")).unwrap();
    fs::write(prefix.join("data/a/db"), "keep").unwrap();
    inst.uninstall(false).unwrap();
    assert_eq!(listing(&units), Vec::<String>::new());
    assert_eq!(listing(&prefix), ["data"]);
    inst.uninstall(true).unwrap();
    assert!(!prefix.exists());
}

#[test]
fn keeps_the_configured_number_of_releases() {
    let tmp = TempDir::new("keep");
    let root = tmp.path();
    let runner = running();
    let mut config = Config {
        prefix: root.join("prefix"),
        packages_prefix: installer::Prefix::default(),
        unit_dir: root.join("units"),
        manager: ManagerKind::Systemd,
        keep: 2,
        lock_wait: Duration::ZERO,
        create_users: false,
        confirm_timeout: None,
    };
    let inst = Installer::new(config.clone(), runner.clone());
    let mut ids = Vec::new();
    for v in 1..=3 {
        let dir = two_services(root, &format!("v{v}"), &format!("v = {v}\n"), None);
        // Release creation times are whole seconds; the order among equal times is by id,
        // so each install waits for a new second to keep "oldest" unambiguous.
        std::thread::sleep(Duration::from_millis(1100));
        ids.push(inst.install(&dir, None).unwrap());
    }
    assert_eq!(ids[2].pruned, [ids[0].release.clone()]);
    let mut expected = vec![ids[1].release.clone(), ids[2].release.clone()];
    expected.sort();
    assert_eq!(listing(&root.join("prefix/releases")), expected);
    config.keep = 1;
    let removed = Installer::new(config, runner).clean().unwrap();
    assert_eq!(removed, [ids[1].release.clone()]);
}

#[test]
fn an_unhealthy_upgrade_restores_the_previous_release() {
    let tmp = TempDir::new("unhealthy");
    let root = tmp.path();
    let runner = running();
    let inst = installer(root, ManagerKind::Systemd, &runner);
    let good = inst.install(&two_services(root, "v1", "v = 1\n", None), None).unwrap();
    runner.take();

    let never = "command = [\"false\"]\ntimeout_secs = 1\n";
    let bad = two_services(root, "v2", "v = 2\n", Some(never));
    let err = inst.install(&bad, None).unwrap_err();
    assert!(matches!(err, Error::Unhealthy { .. }), "{err:?}");
    let text = err.to_string();
    assert!(text.contains("service b is not healthy: health check failed"), "{text}");
    assert!(text.contains(&format!("reverted to release {}", good.release)), "{text}");
    let commands = runner.take();
    // b was restarted into the new release, its log read, then restarted into the old one.
    let restarts = commands.iter().filter(|c| *c == "systemctl restart b.service").count();
    assert_eq!(restarts, 2, "{commands:?}");
    assert!(
        commands.contains(&"journalctl -u b.service -n 20 --no-pager".to_owned()),
        "{commands:?}"
    );
    assert!(!commands.iter().any(|c| c.contains("restart a.service")), "{commands:?}");
    assert_previous_active(root, &good.release);
}

#[test]
fn an_unhealthy_first_install_leaves_nothing_active() {
    let tmp = TempDir::new("unhealthy-first");
    let root = tmp.path();
    let runner = running();
    let inst = installer(root, ManagerKind::Systemd, &runner);
    let never = "command = [\"false\"]\ntimeout_secs = 1\n";
    let err = inst
        .install(&two_services(root, "v1", "v = 1\n", Some(never)), None)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("no previous release: the new services were stopped and removed"),
        "{err}"
    );
    assert!(fs::symlink_metadata(root.join("prefix/current")).is_err());
    assert_eq!(listing(&root.join("units")), Vec::<String>::new());
    assert_eq!(listing(&root.join("prefix/releases")), Vec::<String>::new());
    let commands = runner.take();
    assert!(commands.contains(&"systemctl disable --now b.service".to_owned()), "{commands:?}");
}

/// The previous release is active, its units are in place, and nothing else was left.
fn assert_previous_active(root: &Utf8Path, id: &str) {
    let prefix = root.join("prefix");
    assert_eq!(
        fs::read_link(prefix.join("current")).unwrap().to_str().unwrap(),
        format!("releases/{id}")
    );
    assert_eq!(listing(&prefix.join("releases")), [id.to_owned()]);
    assert_eq!(listing(&root.join("units")), ["a.service", "b.service"]);
    assert_eq!(fs::read_to_string(prefix.join("current/b/pkg/config.toml")).unwrap(), "v = 1\n");
}

#[test]
fn every_bad_input_is_refused_and_the_previous_release_stays_active() {
    let tmp = TempDir::new("bad");
    let root = tmp.path();
    let runner = running();
    let inst = installer(root, ManagerKind::Systemd, &runner);
    let good = inst.install(&two_services(root, "good", "v = 1\n", None), None).unwrap();
    let a = Service::new("a").zone();
    let svc = "root/opt/flotilla/b";
    let b_with = |extra: Vec<Entry>| {
        let mut entries = Service { config: "v = 1\n", ..Service::new("b") }.entries();
        entries.extend(extra);
        zone_bytes("b", entries)
    };

    let mut corrupt = Service::new("b").zone();
    let middle = corrupt.len() / 2;
    corrupt.truncate(middle);
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("corrupt", corrupt, "unpack"),
        (
            "dotdot",
            b_with(vec![Entry::file(&format!("{svc}/../../../../../evil"), "x")]),
            "contains `..`",
        ),
        ("absolute", b_with(vec![Entry::file("/etc/evil", "x")]), "an absolute path"),
        (
            "outside",
            b_with(vec![Entry::file("root/etc/evil", "x")]),
            "lands outside root/opt/flotilla/",
        ),
        (
            "symlink-abs",
            b_with(vec![Entry::Symlink { path: format!("{svc}/l"), target: "/etc".into() }]),
            "a symbolic link to the absolute path /etc",
        ),
        (
            "symlink-up",
            b_with(vec![Entry::Symlink { path: format!("{svc}/l"), target: "../../..".into() }]),
            "outside the release",
        ),
        (
            "through-symlink",
            b_with(vec![
                Entry::Symlink { path: format!("{svc}/l"), target: ".".into() },
                Entry::file(&format!("{svc}/l/x"), "x"),
            ]),
            "goes through the symbolic link",
        ),
        (
            "hardlink-out",
            b_with(vec![Entry::HardLink {
                path: format!("{svc}/h"),
                target: "/etc/passwd".into(),
            }]),
            "hard link target: an absolute path",
        ),
        (
            "hardlink-missing",
            b_with(vec![Entry::HardLink {
                path: format!("{svc}/h"),
                target: format!("{svc}/nothing"),
            }]),
            "not earlier in the archive",
        ),
        (
            "device",
            b_with(vec![Entry::CharDevice { path: format!("{svc}/null") }]),
            "a device file",
        ),
        (
            "no-oxide-json",
            support::gzip(&tar_bytes(&Service::new("b").entries())),
            "the first entry is `root/`, not the file oxide.json",
        ),
        (
            "no-unit",
            Service { with_unit: false, ..Service::new("b") }.zone(),
            "package b: service b has no systemd service definition: pkg/b.service is missing",
        ),
        (
            "bad-manifest",
            zone_bytes("b", {
                let mut e = Service { with_manifest: false, ..Service::new("b") }.entries();
                e.push(Entry::file(&format!("{svc}/pkg/manifest.xml"), "<service_bundle"));
                e
            }),
            "pkg/manifest.xml: not valid XML",
        ),
        (
            "bad-health",
            Service { health: Some("http = \"ftp://x\""), ..Service::new("b") }.zone(),
            "service b: pkg/health.toml: field `http`",
        ),
    ];
    for (tag, b, expected) in cases {
        let dir = packages_dir(root, tag, &[("a.tar.gz", a.clone()), ("b.tar.gz", b)]);
        let err = inst.install(&dir, None).unwrap_err().to_string();
        assert!(err.contains(expected), "{tag}: {err:?} should contain {expected:?}");
        assert_previous_active(root, &good.release);
    }

    // A digest mismatch, a package missing from the list, a listed package that is missing.
    let dir = packages_dir(root, "mismatch", &[("a.tar.gz", a.clone())]);
    fs::write(dir.join("a.tar.gz"), Service { config: "tampered", ..Service::new("a") }.zone())
        .unwrap();
    let err = inst.install(&dir, None).unwrap_err().to_string();
    assert!(err.contains("a.tar.gz: digest mismatch"), "{err}");
    fs::write(dir.join("stray.tar"), tar_bytes(&[])).unwrap();
    let err = inst.install(&dir, None).unwrap_err().to_string();
    assert!(err.contains("stray.tar: not listed in"), "{err}");
    fs::remove_file(dir.join("stray.tar")).unwrap();
    fs::remove_file(dir.join("a.tar.gz")).unwrap();
    let err = inst.install(&dir, None).unwrap_err().to_string();
    assert!(err.contains("a.tar.gz: listed in") && err.contains("but missing"), "{err}");
    assert_previous_active(root, &good.release);
}

#[test]
fn a_second_install_is_refused_while_the_lock_is_held() {
    let tmp = TempDir::new("lock");
    let root = tmp.path();
    let runner = running();
    let inst = installer(root, ManagerKind::Systemd, &runner);
    fs::create_dir_all(root.join("prefix")).unwrap();
    let held = installer::lock::InstallLock::acquire(
        &root.join("prefix/install.lock"),
        "install from a test",
        Duration::ZERO,
    )
    .unwrap();
    let err = inst.install(&two_services(root, "v1", "v = 1\n", None), None).unwrap_err();
    assert!(matches!(err, Error::Locked { .. }), "{err:?}");
    assert!(err.to_string().contains("what=install from a test"), "{err}");
    assert!(runner.take().is_empty(), "nothing ran");
    drop(held);
    inst.install(&two_services(root, "v1b", "v = 1\n", None), None).unwrap();
}

#[test]
fn the_overlay_is_in_place_before_services_start() {
    let tmp = TempDir::new("overlay");
    let root = tmp.path();
    let runner = running();
    let inst = installer(root, ManagerKind::Systemd, &runner);
    let packages = two_services(root, "v1", "v = 1\n", None);
    let plain = inst.install(&packages, None).unwrap();
    let overlay = root.join("overlay");
    fs::create_dir_all(overlay.join("opt/flotilla/b/pkg")).unwrap();
    fs::write(overlay.join("opt/flotilla/b/pkg/config.toml"), "v = 'node1'\n").unwrap();
    fs::write(overlay.join("opt/flotilla/b/pkg/share.json"), "{}").unwrap();
    let with = inst.install(&packages, Some(&overlay)).unwrap();
    assert_ne!(with.release, plain.release, "the overlay is part of the release");
    assert_eq!(with.restarted, ["b"], "only the service whose files the overlay changed");
    let current = root.join("prefix/current/b/pkg");
    assert_eq!(fs::read_to_string(current.join("config.toml")).unwrap(), "v = 'node1'\n");
    assert!(current.join("share.json").is_file());

    fs::write(overlay.join("stray"), "x").unwrap();
    let err = inst.install(&packages, Some(&overlay)).unwrap_err().to_string();
    assert!(err.contains("stray: outside opt/flotilla/"), "{err}");
    fs::remove_file(overlay.join("stray")).unwrap();
    std::os::unix::fs::symlink("/etc/passwd", overlay.join("opt/flotilla/b/pkg/link")).unwrap();
    let err = inst.install(&packages, Some(&overlay)).unwrap_err().to_string();
    assert!(err.contains("a symbolic link"), "{err}");
}

#[test]
fn smf_command_sequences() {
    let tmp = TempDir::new("smf");
    let root = tmp.path();
    let runner = running();
    let inst = installer(root, ManagerKind::Smf, &runner);
    let mut b = Service { with_manifest: false, with_unit: false, ..Service::new("b") }.entries();
    b.push(Entry::file("root/opt/flotilla/b/pkg/manifest.xml", &smf_manifest("b", &["a"])));
    let v1 = packages_dir(
        root,
        "v1",
        &[
            ("a.tar.gz", Service { with_unit: false, ..Service::new("a") }.zone()),
            ("b.tar.gz", zone_bytes("b", b)),
        ],
    );
    let first = inst.install(&v1, None).unwrap();
    let rel = root.join("prefix/releases").join(&first.release);
    assert_eq!(
        runner.take(),
        [
            format!("/usr/sbin/svccfg import {rel}/a/pkg/manifest.xml"),
            format!("/usr/sbin/svccfg import {rel}/b/pkg/manifest.xml"),
            "/usr/sbin/svcadm enable -s svc:/flotilla/a:default".into(),
            "/usr/sbin/svcadm restart svc:/flotilla/a:default".into(),
            "/usr/sbin/svcadm enable -s svc:/flotilla/b:default".into(),
            "/usr/sbin/svcadm restart svc:/flotilla/b:default".into(),
            "/usr/bin/svcs -H -o state svc:/flotilla/a:default".into(),
            "/usr/bin/svcs -H -o state svc:/flotilla/b:default".into(),
        ]
    );
    // The manifest is imported from the release with the prefix rewritten.
    let manifest = fs::read_to_string(rel.join("a/pkg/manifest.xml")).unwrap();
    assert!(
        manifest.contains(&format!("exec=\"{}/current/a/bin/a &amp;\"", root.join("prefix"))),
        "{manifest}"
    );

    // The same packages: enable (a no-op for online services), nothing imported or restarted.
    inst.install(&v1, None).unwrap();
    assert_eq!(
        runner.take(),
        [
            "/usr/sbin/svcadm enable -s svc:/flotilla/a:default",
            "/usr/sbin/svcadm enable -s svc:/flotilla/b:default",
            "/usr/bin/svcs -H -o state svc:/flotilla/a:default",
            "/usr/bin/svcs -H -o state svc:/flotilla/b:default",
        ]
    );

    inst.uninstall(false).unwrap();
    assert_eq!(
        runner.take(),
        [
            "/usr/sbin/svcadm disable -s svc:/flotilla/b:default",
            "/usr/sbin/svcadm disable -s svc:/flotilla/a:default",
            "/usr/sbin/svccfg delete -f svc:/flotilla/a",
            "/usr/sbin/svccfg delete -f svc:/flotilla/b",
        ]
    );
}

#[test]
fn smf_failure_reports_svcs_diagnosis() {
    let tmp = TempDir::new("smf-fail");
    let root = tmp.path();
    let runner = Arc::new(RecordingRunner::with(|cmd| {
        let stdout = match cmd.args.first().map(String::as_str) {
            Some("-H") => "maintenance\n",
            Some("-xv") => "svc:/flotilla/a:default (a)\n State: maintenance since now\nReason: Start method failed.\n",
            _ => "",
        };
        Output {
            success: true,
            status: "exit status: 0".into(),
            stdout: stdout.into(),
            stderr: String::new(),
        }
    }));
    let inst = installer(root, ManagerKind::Smf, &runner);
    let a = Service {
        with_unit: false,
        health: Some("command = [\"true\"]\ntimeout_secs = 1"),
        ..Service::new("a")
    };
    let dir = packages_dir(root, "v1", &[("a.tar.gz", a.zone())]);
    let err = inst.install(&dir, None).unwrap_err().to_string();
    assert!(err.contains("service a is not healthy: its state is `maintenance`"), "{err}");
    assert!(err.contains("Reason: Start method failed."), "{err}");
    let commands = runner.take();
    assert!(
        commands.contains(&"/usr/bin/svcs -xv svc:/flotilla/a:default".to_owned()),
        "{commands:?}"
    );
    assert!(
        commands.contains(&"/usr/sbin/svccfg delete -f svc:/flotilla/a".to_owned()),
        "{commands:?}"
    );
}

#[test]
fn the_binary_refuses_an_unknown_service_manager() {
    // This machine runs neither systemd as init nor SMF, which is the case under test; on a
    // host that does, the override flag is checked instead.
    let tmp = TempDir::new("bin");
    let root = tmp.path();
    let dir = two_services(root, "v1", "v = 1\n", None);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_flotilla-installer"))
        .args(["--prefix", root.join("prefix").as_str(), "install", dir.as_str()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    if Utf8Path::new("/run/systemd/system").is_dir() || Utf8Path::new("/usr/sbin/svcadm").exists() {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_flotilla-installer"))
            .args(["--service-manager", "upstart", "status"])
            .output()
            .unwrap();
        assert!(!out.status.success());
        assert!(String::from_utf8_lossy(&out.stderr).contains("unknown service manager `upstart`"));
        return;
    }
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("detect the service manager: neither /run/systemd/system"), "{stderr}");
    assert!(!root.join("prefix").exists(), "nothing was written");
}

#[test]
fn a_rerun_after_an_interrupted_activation_restarts_what_the_interrupted_one_had_to() {
    let tmp = TempDir::new("interrupted");
    let root = tmp.path();
    let runner = running();
    let inst = installer(root, ManagerKind::Systemd, &runner);
    let v1 = inst.install(&two_services(root, "v1", "v = 1\n", None), None).unwrap();
    let v2_dir = two_services(root, "v2", "v = 2\n", None);
    let v2 = inst.install(&v2_dir, None).unwrap();
    // What a killed installer leaves: `current` switched, the activation still pending.
    let layout = inst.layout().clone();
    let mut state = installer::release::State::read(&layout).unwrap();
    state.pending = Some(installer::release::Pending {
        from: Some(v1.release.clone()),
        to: v2.release.clone(),
    });
    state.write(&layout).unwrap();
    runner.take();
    let rerun = inst.install(&v2_dir, None).unwrap();
    assert_eq!(rerun.restarted, ["b"], "b may still run the old release");
    assert!(runner.take().contains(&"systemctl restart b.service".to_owned()));
    assert_eq!(installer::release::State::read(&layout).unwrap().pending, None);
    // And a normal rerun restarts nothing.
    assert!(inst.install(&v2_dir, None).unwrap().restarted.is_empty());
}

#[test]
fn a_redeploy_repairs_a_disabled_or_stopped_service() {
    let tmp = TempDir::new("settle");
    let root = tmp.path();
    let v1 = two_services(root, "v1", "v = 1\n", None);
    let first = installer(root, ManagerKind::Systemd, &running()).install(&v1, None).unwrap();
    // The same release again, but systemd reports b disabled and stopped: the full
    // activation runs (enable, start) instead of the no-op path.
    // b runs once something has started it.
    let started = Arc::new(AtomicBool::new(false));
    let seen = started.clone();
    let runner = Arc::new(RecordingRunner::with(move |cmd| {
        let stdout = match cmd.args.first().map(String::as_str) {
            Some("start") => {
                seen.store(cmd.args.iter().any(|a| a == "b.service"), Ordering::SeqCst);
                String::new()
            }
            Some("show") if seen.load(Ordering::SeqCst) => show_output(cmd, "active", "enabled"),
            Some("show") => show_output(cmd, "active", "enabled").replace(
                "Id=b.service\nActiveState=active\nUnitFileState=enabled",
                "Id=b.service\nActiveState=inactive\nUnitFileState=disabled",
            ),
            _ => String::new(),
        };
        Output { success: true, status: "exit status: 0".into(), stdout, stderr: String::new() }
    }));
    let again = installer(root, ManagerKind::Systemd, &runner).install(&v1, None).unwrap();
    assert_eq!(again.release, first.release);
    assert!(started.load(Ordering::SeqCst));
    assert_eq!(
        runner.take(),
        [
            "systemctl show --property=Id,ActiveState,UnitFileState -- a.service b.service",
            "systemctl enable a.service b.service",
            "systemctl start a.service b.service",
            "systemctl show --property=Id,ActiveState,UnitFileState -- a.service b.service",
        ]
    );
    // A unit file removed by hand is put back even though systemd would report the
    // service running: the definitions are compared before systemd is asked.
    fs::remove_file(root.join("units/a.service")).unwrap();
    let runner = running();
    installer(root, ManagerKind::Systemd, &runner).install(&v1, None).unwrap();
    let commands = runner.take();
    assert_eq!(
        commands[..2],
        ["systemctl enable --no-reload a.service b.service", "systemctl daemon-reload"]
    );
    assert!(root.join("units/a.service").is_file());
}

#[test]
fn health_waits_ask_systemd_once_per_round_for_every_service() {
    let tmp = TempDir::new("poll");
    let root = tmp.path();
    // b is still `activating` for the first two rounds; a runs at once.
    let shows = Arc::new(AtomicUsize::new(0));
    let counted = shows.clone();
    let runner = Arc::new(RecordingRunner::with(move |cmd| {
        let stdout = match cmd.args.first().map(String::as_str) {
            Some("show") if counted.fetch_add(1, Ordering::SeqCst) < 2 => {
                show_output(cmd, "activating", "enabled")
            }
            Some("show") => show_output(cmd, "active", "enabled"),
            _ => String::new(),
        };
        Output { success: true, status: "exit status: 0".into(), stdout, stderr: String::new() }
    }));
    let inst = installer(root, ManagerKind::Systemd, &runner);
    inst.install(&two_services(root, "v1", "v = 1\n", None), None).unwrap();
    let commands = runner.take();
    let show = "systemctl show --property=Id,ActiveState,UnitFileState --";
    // The first two rounds ask for both services; the third finds both running.
    assert_eq!(
        commands[3..],
        [
            format!("{show} a.service b.service"),
            format!("{show} a.service b.service"),
            format!("{show} a.service b.service")
        ],
        "{commands:?}"
    );
    assert!(!commands.iter().any(|c| c.contains("is-active")), "{commands:?}");
}

#[test]
fn a_failed_restart_of_several_units_names_the_one_systemd_reports() {
    let tmp = TempDir::new("restart-fails");
    let root = tmp.path();
    let runner = Arc::new(RecordingRunner::with(|cmd| {
        if cmd.args.first().map(String::as_str) == Some("restart") {
            return Output {
                success: false,
                status: "exit status: 1".into(),
                stdout: String::new(),
                stderr: "Job for a.service failed because the control process exited with error \
                         code.\nSee \"systemctl status a.service\" and \"journalctl -xeu \
                         a.service\" for details.\n"
                    .into(),
            };
        }
        Output { success: true, status: "exit status: 0".into(), ..Output::default() }
    }));
    let inst = installer(root, ManagerKind::Systemd, &runner);
    let err = inst.install(&two_services(root, "v1", "v = 1\n", None), None).unwrap_err();
    let Error::Unhealthy { service, reason, .. } = &err else { panic!("{err:?}") };
    assert_eq!(service, "a", "{err}");
    assert!(reason.contains("Job for a.service failed"), "{reason}");
    let commands = runner.take();
    assert!(
        commands.contains(&"journalctl -u a.service -n 20 --no-pager".to_owned()),
        "{commands:?}"
    );
    // Nothing is left active after the failed first install.
    assert!(fs::symlink_metadata(root.join("prefix/current")).is_err());
}

/// The uid and primary gid of `user` and the gid of `group`, read from /etc/passwd and
/// /etc/group directly rather than through the installer's own lookup.
fn ids_from_files(user: &str, group: &str) -> (u32, u32, u32) {
    let field = |file: &str, name: &str, index: usize| -> u32 {
        let text = fs::read_to_string(file).unwrap();
        let line = text
            .lines()
            .find(|l| l.split(':').next() == Some(name))
            .unwrap_or_else(|| panic!("{file} has no entry {name}"));
        line.split(':').nth(index).unwrap().parse().unwrap()
    };
    (field("/etc/passwd", user, 2), field("/etc/passwd", user, 3), field("/etc/group", group, 2))
}

/// Handing files to another user needs root; the installer runs as root on servers.
fn root_or_skip(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    assert_ne!(
        std::env::var("CI").as_deref(),
        Ok("true"),
        "{test} needs root to give files to another user, and CI=true requires it to run"
    );
    eprintln!("skipping {test}: it needs root to give files to another user (CI is not \"true\")");
    false
}

#[test]
fn overlay_files_belong_to_the_services_user_with_mode_0600() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    if !root_or_skip("overlay_files_belong_to_the_services_user_with_mode_0600") {
        return;
    }
    // `nobody` and `nogroup` exist on every Debian host; the test creates no accounts.
    let (uid, primary_gid, nogroup) = ids_from_files("nobody", "nogroup");
    let tmp = TempDir::new("owners");
    let root = tmp.path();
    let runner = running();
    let inst = installer(root, ManagerKind::Systemd, &runner);
    let a = Service { service_extra: "User=nobody\n", ..Service::new("a") };
    let b = Service { service_extra: "User=nobody\nGroup=nogroup\n", ..Service::new("b") };
    let c = Service::new("c");
    let packages = packages_dir(
        root,
        "v1",
        &[("a.tar.gz", a.zone()), ("b.tar.gz", b.zone()), ("c.tar.gz", c.zone())],
    );
    let overlay = root.join("overlay");
    for service in ["a", "b", "c"] {
        let pkg = overlay.join(format!("opt/flotilla/{service}/pkg"));
        fs::create_dir_all(pkg.join("tls")).unwrap();
        // The overlay's own modes do not matter: secrets land 0600 whatever they were.
        fs::write(pkg.join("config.toml"), "v = 2\n").unwrap();
        fs::set_permissions(pkg.join("config.toml"), fs::Permissions::from_mode(0o644)).unwrap();
        fs::write(pkg.join("tls/node.key"), "key").unwrap();
    }
    inst.install(&packages, Some(&overlay)).unwrap();

    let current = root.join("prefix/current");
    let expect = [("a", uid, primary_gid), ("b", uid, nogroup), ("c", 0, 0)];
    for (service, uid, gid) in expect {
        let pkg = current.join(service).join("pkg");
        for file in ["config.toml", "tls/node.key"] {
            let meta = fs::metadata(pkg.join(file)).unwrap();
            assert_eq!(meta.mode() & 0o7777, 0o600, "{service}/pkg/{file}");
            assert_eq!((meta.uid(), meta.gid()), (uid, gid), "{service}/pkg/{file}");
        }
        let tls = fs::metadata(pkg.join("tls")).unwrap();
        assert_eq!(tls.mode() & 0o7777, 0o700, "{service}/pkg/tls");
        assert_eq!((tls.uid(), tls.gid()), (uid, gid), "{service}/pkg/tls");
        // The package's own directories and files stay root's and readable.
        let meta = fs::metadata(&pkg).unwrap();
        assert_eq!((meta.mode() & 0o777, meta.uid()), (0o755, 0), "{service}/pkg");
        let unit = fs::metadata(pkg.join(format!("{service}.service"))).unwrap();
        assert_eq!((unit.mode() & 0o777, unit.uid()), (0o644, 0), "{service}.service");
        // Nothing is left under a temporary name.
        let names = listing(&pkg).into_iter().chain(listing(&pkg.join("tls")));
        assert!(names.clone().all(|n| !n.contains(".tmp")), "{:?}", names.collect::<Vec<_>>());
    }
    let record = fs::read_to_string(current.join("release.json")).unwrap();
    let record: serde_json::Value = serde_json::from_str(&record).unwrap();
    let users: Vec<&serde_json::Value> =
        record["services"].as_array().unwrap().iter().map(|s| &s["user"]).collect();
    assert_eq!(users[0]["user"], "nobody");
    assert_eq!(users[1]["group"], "nogroup");
    assert!(users[2].is_null(), "c declares no user: {record}");
}

#[test]
fn a_missing_user_is_refused_before_anything_is_activated() {
    let tmp = TempDir::new("nouser");
    let root = tmp.path();
    let runner = running();
    let inst = installer(root, ManagerKind::Systemd, &runner);
    let good = inst.install(&two_services(root, "good", "v = 1\n", None), None).unwrap();
    runner.take();
    let missing = format!("flotilla-missing-{}", std::process::id());
    let extra = format!("User={missing}\n");
    let b = Service { service_extra: &extra, unit_extra: "After=a.service", ..Service::new("b") };
    let packages =
        packages_dir(root, "v2", &[("a.tar.gz", Service::new("a").zone()), ("b.tar.gz", b.zone())]);
    let overlay = root.join("overlay");
    fs::create_dir_all(overlay.join("opt/flotilla/b/pkg/tls")).unwrap();
    fs::write(overlay.join("opt/flotilla/b/pkg/tls/node.key"), "key").unwrap();

    let err = inst.install(&packages, Some(&overlay)).unwrap_err();
    assert!(matches!(err, Error::Service { .. }), "{err:?}");
    let err = err.to_string();
    let expected = format!(
        "service b: user {missing} (declared in opt/flotilla/b/pkg/b.service) does not exist on \
         this host, so it cannot own the overlay file {overlay}/opt/flotilla/b/pkg/tls/node.key; \
         install with --create-users"
    );
    assert!(err.starts_with(&expected), "{err}\nshould start with\n{expected}");
    assert!(runner.take().is_empty(), "no service manager command ran");
    assert_previous_active(root, &good.release);

    // The binary exits 1, the status of "nothing changed", with the same message.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_flotilla-installer"))
        .args(["--prefix", root.join("prefix").as_str(), "--unit-dir", root.join("units").as_str()])
        .args(["--packages-prefix", "/opt/flotilla"])
        .args(["--service-manager", "systemd", "install", packages.as_str()])
        .args(["--overlay", overlay.as_str()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains(&expected), "{stderr}");
    assert_previous_active(root, &good.release);

    // Without an overlay the user is still required: the service could not start without it.
    let err = inst.install(&packages, None).unwrap_err().to_string();
    assert!(err.contains(&format!("service b: user {missing} (declared in")), "{err}");
    // A missing group is refused the same way.
    let b = Service { service_extra: "User=root\nGroup=flotilla-no-group\n", ..Service::new("b") };
    let packages = packages_dir(root, "v3", &[("b.tar.gz", b.zone())]);
    let err = inst.install(&packages, None).unwrap_err().to_string();
    assert!(err.contains("service b: group flotilla-no-group (declared in"), "{err}");
    assert_previous_active(root, &good.release);
    // A name no `useradd` would take is refused with its file and line, never created.
    let b = Service { service_extra: "User=Bad;Name\n", ..Service::new("b") };
    let packages = packages_dir(root, "v4", &[("b.tar.gz", b.zone())]);
    let err = inst.install(&packages, None).unwrap_err().to_string();
    assert!(
        err.starts_with("service b: pkg/b.service: line ") && err.contains("`Bad;Name` is not a"),
        "{err}"
    );
    assert_previous_active(root, &good.release);
}

/// A user table that `useradd` and `groupadd`, as the recording runner sees them, add to.
#[derive(Default)]
struct Created(std::sync::Mutex<(Vec<String>, Vec<String>)>);

impl installer::accounts::Accounts for Created {
    fn user(&self, name: &str) -> Result<Option<installer::accounts::Account>, String> {
        let users = &self.0.lock().unwrap().0;
        Ok(users
            .iter()
            .position(|u| u == name)
            .map(|i| installer::accounts::Account { uid: 900 + i as u32, gid: 900 + i as u32 }))
    }
    fn group(&self, name: &str) -> Result<Option<u32>, String> {
        let groups = &self.0.lock().unwrap().1;
        Ok(groups.iter().position(|g| g == name).map(|i| 800 + i as u32))
    }
}

#[test]
fn create_users_makes_the_declared_users_before_anything_is_placed() {
    let tmp = TempDir::new("mkuser");
    let root = tmp.path();
    let table = Arc::new(Created::default());
    let recorded = table.clone();
    let runner = Arc::new(RecordingRunner::with(move |cmd| {
        let name = cmd.args.last().cloned().unwrap_or_default();
        let mut t = recorded.0.lock().unwrap();
        match cmd.program.as_str() {
            "useradd" => {
                t.0.push(name.clone());
                if cmd.args.iter().any(|a| a == "--user-group") {
                    t.1.push(name);
                }
            }
            "groupadd" => t.1.push(name),
            _ => {}
        }
        let stdout = if cmd.args.first().map(String::as_str) == Some("show") {
            show_output(cmd, "active", "enabled")
        } else {
            String::new()
        };
        Output { success: true, status: "exit status: 0".into(), stdout, ..Output::default() }
    }));
    let config = Config {
        prefix: root.join("prefix"),
        packages_prefix: installer::Prefix::default(),
        unit_dir: root.join("units"),
        manager: ManagerKind::Systemd,
        keep: 3,
        lock_wait: Duration::ZERO,
        create_users: true,
        confirm_timeout: None,
    };
    let lines = Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = lines.clone();
    let inst = Installer::new(config, runner.clone())
        .with_accounts(table.clone())
        .with_log(move |line| log.lock().unwrap().push(line.to_owned()));
    let a = Service { service_extra: "User=svc-a\n", ..Service::new("a") };
    let b = Service { service_extra: "User=svc-b\nGroup=shared\n", ..Service::new("b") };
    let packages = packages_dir(root, "v1", &[("a.tar.gz", a.zone()), ("b.tar.gz", b.zone())]);
    let overlay = root.join("overlay");
    fs::create_dir_all(overlay.join("opt/flotilla/b/pkg")).unwrap();
    fs::write(overlay.join("opt/flotilla/b/pkg/secret"), "s").unwrap();

    inst.install(&packages, Some(&overlay)).unwrap();
    let commands = runner.take();
    let made: Vec<&String> =
        commands.iter().filter(|c| c.starts_with("useradd") || c.starts_with("groupadd")).collect();
    assert_eq!(
        made,
        [
            "useradd --system --user-group --no-create-home --home-dir /nonexistent --shell \
             /usr/sbin/nologin svc-a",
            "groupadd --system shared",
            "useradd --system --gid shared --no-create-home --home-dir /nonexistent --shell \
             /usr/sbin/nologin svc-b",
        ]
    );
    // The accounts come before any service manager command.
    let first_manager = commands.iter().position(|c| c.starts_with("systemctl")).unwrap();
    assert!(commands.iter().rposition(|c| c.starts_with("useradd")).unwrap() < first_manager);
    // The overlay file belongs to the user just made, in its declared group.
    let meta = fs::metadata(root.join("prefix/current/b/pkg/secret")).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!((meta.uid(), meta.gid()), (901, 801));
    let logged = lines.lock().unwrap().clone();
    assert!(logged.contains(&"created user svc-a for a".to_owned()), "{logged:?}");
    assert!(logged.contains(&"created group shared for b".to_owned()), "{logged:?}");

    // A second install finds them and creates nothing.
    let packages = packages_dir(root, "v2", &[("a.tar.gz", a.zone()), ("b.tar.gz", b.zone())]);
    inst.install(&packages, Some(&overlay)).unwrap();
    assert!(runner.take().iter().all(|c| !c.starts_with("useradd") && !c.starts_with("groupadd")));
}

/// A runner where the service manager cannot be asked anything: `systemctl` fails the way it
/// does when PID 1 is not systemd. Every other command succeeds.
fn no_systemd() -> Arc<RecordingRunner> {
    Arc::new(RecordingRunner::with(|cmd| {
        if cmd.program == "systemctl" && cmd.args.first().map(String::as_str) != Some("--version") {
            return Output {
                success: false,
                status: "exit status: 1".into(),
                stdout: String::new(),
                stderr: "System has not been booted with systemd as init system (PID 1). Can't \
                         operate.\nFailed to connect to bus: Host is down\n"
                    .into(),
            };
        }
        Output {
            success: true,
            status: "exit status: 0".into(),
            stdout: String::new(),
            stderr: String::new(),
        }
    }))
}

#[test]
fn a_failing_service_manager_is_an_error_never_active_and_healthy() {
    let tmp = TempDir::new("no-systemd");
    let root = tmp.path();
    let v1 = two_services(root, "v1", "v = 1\n", None);
    // A first install: activation itself fails, nothing is left active.
    let err = installer(root, ManagerKind::Systemd, &no_systemd()).install(&v1, None).unwrap_err();
    assert!(err.to_string().contains("System has not been booted with systemd"), "{err}");
    assert!(!root.join("prefix/current").exists(), "a failed install left a release active");

    // Installed once with a working systemd; asked again when systemd cannot answer, the
    // no-op path must not call the release active and healthy.
    let first = installer(root, ManagerKind::Systemd, &running()).install(&v1, None).unwrap();
    let err = installer(root, ManagerKind::Systemd, &no_systemd()).install(&v1, None).unwrap_err();
    assert!(err.to_string().contains("System has not been booted with systemd"), "{err}");
    assert_eq!(
        fs::read_link(root.join("prefix/current")).unwrap().display().to_string(),
        format!("releases/{}", first.release),
        "the previous release stays active"
    );

    // status reports the error instead of a state.
    let err = installer(root, ManagerKind::Systemd, &no_systemd()).status().unwrap_err();
    assert!(err.to_string().contains("System has not been booted with systemd"), "{err}");
}

#[test]
fn a_release_without_services_makes_no_service_manager_calls() {
    let tmp = TempDir::new("no-services");
    let root = tmp.path();
    let plain = tar_bytes(&[Entry::file("tool/README", "a plain tarball\n")]);
    let dir = packages_dir(root, "plain", &[("tool.tar", plain)]);
    let runner = no_systemd();
    let outcome = installer(root, ManagerKind::Systemd, &runner).install(&dir, None).unwrap();
    assert!(
        root.join(format!("prefix/releases/{}/tool/tool/README", outcome.release)).is_file()
            || root.join(format!("prefix/releases/{}/tool/README", outcome.release)).is_file()
    );
    assert_eq!(runner.take(), Vec::<String>::new(), "a release without services");
    installer(root, ManagerKind::Systemd, &runner).install(&dir, None).unwrap();
    let status = installer(root, ManagerKind::Systemd, &runner).status().unwrap();
    assert!(status.services.is_empty());
    installer(root, ManagerKind::Systemd, &runner).uninstall(false).unwrap();
    assert_eq!(runner.take(), Vec::<String>::new(), "reinstall, status and uninstall");
}

#[test]
fn a_staged_key_is_recorded_after_an_install_and_checked_by_if_staged() {
    use installer::staging::{install_staged, Staged, StagedKey};
    let tmp = TempDir::new("staged");
    let root = tmp.path();
    let staging = root.join("staging");
    fs::create_dir_all(&staging).unwrap();
    let packages = two_services(root, "v1", "v = 1\n", None);
    let key = StagedKey::new(&"a".repeat(64)).unwrap();
    let other = StagedKey::new(&"b".repeat(64)).unwrap();
    let runner = running();
    let inst = installer(root, ManagerKind::Systemd, &runner);
    // Nothing recorded yet: --if-staged asks for a push, and changes nothing.
    let staged = install_staged(&inst, &staging, &packages, None, &key, true).unwrap();
    assert!(matches!(staged, Staged::NotStaged(_)), "{staged:?}");
    assert_eq!(runner.take(), Vec::<String>::new());
    assert!(!root.join("prefix/current").exists());
    // After the push: installed, then recorded.
    let staged = install_staged(&inst, &staging, &packages, None, &key, false).unwrap();
    assert!(matches!(staged, Staged::Installed(_)), "{staged:?}");
    assert_eq!(
        fs::read_to_string(staging.join(".staged-key")).unwrap(),
        format!("{}\n", "a".repeat(64))
    );
    // The same deploy again installs at once; another one asks for a push.
    assert!(matches!(
        install_staged(&inst, &staging, &packages, None, &key, true).unwrap(),
        Staged::Installed(_)
    ));
    assert!(matches!(
        install_staged(&inst, &staging, &packages, None, &other, true).unwrap(),
        Staged::NotStaged(_)
    ));
    // An install from a matching key that fails before changing anything (a staged package
    // went missing) forgets the key and asks for a push.
    fs::remove_file(packages.join("a.tar.gz")).unwrap();
    let staged = install_staged(&inst, &staging, &packages, None, &key, true).unwrap();
    assert!(matches!(staged, Staged::NotStaged(ref why) if why.contains("failed")), "{staged:?}");
    assert!(!staging.join(".staged-key").exists());
    for bad in ["", "A".repeat(64).as_str(), &"a".repeat(63), "none", &"g".repeat(64)] {
        assert!(StagedKey::new(bad).is_err(), "{bad}");
    }
}

#[test]
fn an_unconfirmed_install_is_reverted_at_its_deadline_and_a_confirmed_one_stays() {
    let tmp = TempDir::new("confirm");
    let root = tmp.path();
    let runner = running();
    let with_timeout = |secs: u64| {
        Installer::new(
            Config {
                prefix: root.join("prefix"),
                packages_prefix: installer::Prefix::default(),
                unit_dir: root.join("units"),
                manager: ManagerKind::Systemd,
                keep: 3,
                lock_wait: Duration::from_secs(5),
                create_users: false,
                confirm_timeout: Some(Duration::from_secs(secs)),
            },
            runner.clone(),
        )
    };
    let v1 = two_services(root, "v1", "v = 1\n", None);
    let v2 = two_services(root, "v2", "v = 2\n", None);
    let v3 = two_services(root, "v3", "v = 3\n", None);
    // A first install has nothing to go back to: no confirmation is asked for.
    let first = with_timeout(1).install(&v1, None).unwrap();
    assert_eq!(first.awaiting, None);

    // v2 is never confirmed: at its deadline the watcher puts v1 back.
    let second = with_timeout(1).install(&v2, None).unwrap();
    let awaiting = second.awaiting.clone().expect("v2 awaits its confirmation");
    assert_eq!(
        (awaiting.release.as_str(), awaiting.previous.as_str()),
        (&*second.release, &*first.release)
    );
    let inst = with_timeout(1);
    assert_eq!(inst.status().unwrap().awaiting_confirmation, Some(awaiting.clone()));
    let current = || fs::read_link(root.join("prefix/current")).unwrap();
    assert_eq!(current(), Utf8Path::new("releases").join(&second.release));
    let what = inst.await_confirmation(&second.release, Duration::from_millis(50)).unwrap();
    assert!(what.contains("was not confirmed within 1 s: reverted"), "{what}");
    assert_eq!(current(), Utf8Path::new("releases").join(&first.release));
    let status = inst.status().unwrap();
    assert_eq!(status.last_activation.unwrap().kind, installer::confirm::REVERT_KIND);
    assert_eq!(status.awaiting_confirmation, None);
    // Too late now: the confirmation is refused, and says so.
    let late = installer::confirm::confirm(inst.layout()).unwrap();
    assert!(
        matches!(late, installer::confirm::Confirmation::TooLate(a) if a.release == second.release)
    );

    // v3 is confirmed in time: the watcher finds nothing to revert.
    let third = with_timeout(30).install(&v3, None).unwrap();
    assert!(third.awaiting.is_some());
    let done = installer::confirm::confirm(inst.layout()).unwrap();
    assert!(
        matches!(done, installer::confirm::Confirmation::Confirmed(a) if a.release == third.release)
    );
    let what = inst.await_confirmation(&third.release, Duration::from_millis(50)).unwrap();
    assert!(what.contains("confirmed"), "{what}");
    assert_eq!(current(), Utf8Path::new("releases").join(&third.release));
}

#[test]
fn the_payload_predicts_the_release_state_reports_it_and_expect_release_guards_it() {
    use installer::survey;
    let tmp = TempDir::new("survey");
    let root = tmp.path();
    let runner = running();
    let v1 = two_services(root, "v1", "v = 1\n", None);
    let overlay = root.join("overlay");
    fs::create_dir_all(overlay.join("opt/flotilla/b/pkg")).unwrap();
    fs::write(overlay.join("opt/flotilla/b/pkg/node.toml"), "n = 1\n").unwrap();
    let layout = installer::Layout { prefix: root.join("prefix") };

    let nothing = survey::host_state(&layout, "i".repeat(64)).unwrap();
    assert_eq!(nothing.active, None);
    let payload = survey::payload(&v1, Some(&overlay), "opt/flotilla", "i".repeat(64)).unwrap();
    assert_eq!(payload.packages.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(), ["a", "b"]);
    assert_eq!(payload.overlay.len(), 1);
    assert_eq!(payload.overlay[0].service, "b");

    // An install that expects another active release changes nothing.
    let refused = installer(root, ManagerKind::Systemd, &runner)
        .expecting_release(Some("0123456789abcdef".into()))
        .install(&v1, Some(&overlay))
        .unwrap_err();
    assert!(matches!(refused, Error::StateChanged { .. }), "{refused}");
    assert!(refused.to_string().contains("the active release is none"), "{refused}");
    assert!(!root.join("prefix/current").exists());

    let outcome = installer(root, ManagerKind::Systemd, &runner)
        .expecting_release(None)
        .install(&v1, Some(&overlay))
        .unwrap();
    assert_eq!(outcome.release, payload.release, "the payload names the release it makes");
    let state = survey::host_state(&layout, "i".repeat(64)).unwrap();
    let active = state.active.unwrap();
    assert_eq!(active.id, payload.release);
    assert_eq!(active.packages, payload.packages);
    assert_eq!(active.overlay.as_deref(), Some(payload.overlay.as_slice()));
    assert_eq!(
        active.services.iter().map(|s| (s.name.as_str(), s.packages.clone())).collect::<Vec<_>>(),
        [("a", vec!["a".to_owned()]), ("b", vec!["b".to_owned()])]
    );

    // Expecting none once something is active is refused too, naming what is.
    let again = installer(root, ManagerKind::Systemd, &runner)
        .expecting_release(None)
        .install(&v1, None)
        .unwrap_err()
        .to_string();
    assert!(again.contains(&format!("the active release is {}", payload.release)), "{again}");
}
