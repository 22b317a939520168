//! The project's own service definitions (`smf/<service>/`), packaged the way `cargo xtask
//! package` lays them out, go through the installer under systemd and SMF.

mod support;

use std::fs;
use std::sync::Arc;
use std::time::Duration;

use camino::Utf8Path;
use installer::runner::{Output, RecordingRunner};
use installer::{Config, Installer, ManagerKind};
use support::{packages_dir, zone_bytes, Entry, TempDir};

fn running() -> Arc<RecordingRunner> {
    Arc::new(RecordingRunner::with(|cmd| {
        let stdout = match cmd.args.first().map(String::as_str) {
            Some("is-active") => "active\n",
            Some("-H") => "online\n",
            _ => "",
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
        unit_dir: root.join("units"),
        manager,
        keep: 3,
        lock_wait: Duration::ZERO,
    };
    Installer::new(config, runner.clone())
}

fn listing(dir: &Utf8Path) -> Vec<String> {
    let mut names: Vec<String> =
        dir.read_dir_utf8().unwrap().map(|e| e.unwrap().file_name().to_owned()).collect();
    names.sort();
    names
}

#[test]
fn the_projects_service_definitions_install_under_systemd_and_smf() {
    let smf = Utf8Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().join("smf");
    let mut services: Vec<String> = listing(&smf);
    services.retain(|s| smf.join(s).is_dir());
    assert!(!services.is_empty(), "no service under {smf}");
    let tmp = TempDir::new("project-smf");
    let root = tmp.path();
    let mut files = Vec::new();
    for service in &services {
        let dir = smf.join(service);
        for required in ["manifest.xml", &format!("{service}.service"), "config.toml"] {
            assert!(dir.join(required).is_file(), "{dir} has no {required}");
        }
        let base = format!("root/opt/flotilla/{service}");
        let mut entries = vec![Entry::exe(&format!("{base}/bin/{service}"), "#!/bin/sh\n")];
        for file in listing(&dir) {
            let contents = fs::read_to_string(dir.join(&file)).unwrap();
            entries.push(Entry::file(&format!("{base}/pkg/{file}"), &contents));
        }
        files.push((format!("{service}.tar.gz"), zone_bytes(service, entries)));
    }
    let files: Vec<(&str, Vec<u8>)> = files.iter().map(|(n, b)| (n.as_str(), b.clone())).collect();
    let packages = packages_dir(root, "packages", &files);

    let runner = running();
    let smf_root = root.join("smf");
    fs::create_dir_all(&smf_root).unwrap();
    let inst = installer(&smf_root, ManagerKind::Smf, &runner);
    let outcome = inst.install(&packages, None).unwrap();
    let commands = runner.take();
    let release = smf_root.join("prefix/releases").join(&outcome.release);
    for service in &services {
        let manifest = fs::read_to_string(release.join(service).join("pkg/manifest.xml")).unwrap();
        let parsed = installer::manager::parse_manifest(&manifest).unwrap();
        let import = format!("/usr/sbin/svccfg import {release}/{service}/pkg/manifest.xml");
        assert!(commands.contains(&import), "{commands:?}");
        assert!(
            commands.contains(&format!("/usr/sbin/svcadm enable -s {}", parsed.fmri)),
            "{commands:?}"
        );
        // The start method runs the packaged binary through `current`, under this prefix.
        let bin = format!("{}/current/{service}/bin/{service}", smf_root.join("prefix"));
        assert!(manifest.contains(&bin), "{service}: manifest does not start {bin}");
    }

    let runner = running();
    let sd_root = root.join("systemd");
    fs::create_dir_all(&sd_root).unwrap();
    let inst = installer(&sd_root, ManagerKind::Systemd, &runner);
    inst.install(&packages, None).unwrap();
    for service in &services {
        let unit =
            fs::read_to_string(sd_root.join("units").join(format!("{service}.service"))).unwrap();
        let current = format!("{}/current/{service}", sd_root.join("prefix"));
        let exec = format!("ExecStart={current}/bin/{service} --config {current}/pkg/config.toml");
        assert!(unit.contains(&exec), "{service}.service does not contain {exec}:\n{unit}");
    }
}
