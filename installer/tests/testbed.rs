//! The installer for real, under systemd inside a testbed node: first install, a no-op
//! reinstall, an upgrade where one package changed, a failed upgrade that reverts while the old
//! release keeps serving, rollback, status and uninstall.
//!
//! It needs root (the testbed uses network namespaces and systemd-nspawn). Elsewhere it skips
//! and says why, except with `CI=true`, where it must run.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use camino::{Utf8Path, Utf8PathBuf};
use flotilla_testbed::test_support::{can_run, Testbed};
use support::{packages_dir, zone_bytes, Entry, TempDir};

const INSTALLER: &str = env!("CARGO_BIN_EXE_flotilla-installer");
const STAGING: &str = "/var/tmp/flotilla-e2e";

/// Builds the test service; returns its path.
fn build_helpers() -> PathBuf {
    let cargo = env!("CARGO");
    let args = ["build", "-p", "flotilla-installer", "--example", "test-service"];
    let out =
        Command::new(cargo).args(args).current_dir(env!("CARGO_MANIFEST_DIR")).output().unwrap();
    assert!(out.status.success(), "cargo {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    // The installer binary this test was built with sits next to the other binaries of the
    // same profile.
    let bin_dir = Path::new(INSTALLER).parent().unwrap();
    bin_dir.join("examples/test-service")
}

/// A zone image of one test service: the binary, its config, a systemd unit, an SMF manifest
/// and an HTTP health check.
fn service_zone(
    name: &str,
    binary: &[u8],
    port: u16,
    version: &str,
    status: u16,
    after: &str,
) -> Vec<u8> {
    let base = format!("root/opt/flotilla/{name}");
    let unit = format!(
        "[Unit]\nDescription=flotilla test service {name}\nAfter=network.target {after}\n\n[Service]\n\
         Type=exec\nExecStart=/opt/flotilla/current/{name}/bin/{name} --config \
         /opt/flotilla/current/{name}/pkg/config.toml\nRestart=on-failure\n\n[Install]\n\
         WantedBy=multi-user.target\n"
    );
    zone_bytes(
        name,
        vec![
            Entry::File {
                path: format!("{base}/bin/{name}"),
                contents: binary.to_vec(),
                mode: 0o755,
            },
            Entry::file(
                &format!("{base}/pkg/config.toml"),
                &format!(
                    "listen = \"0.0.0.0:{port}\"\nversion = \"{version}\"\nstatus = {status}\n"
                ),
            ),
            Entry::file(&format!("{base}/pkg/{name}.service"), &unit),
            Entry::file(&format!("{base}/pkg/manifest.xml"), &support::smf_manifest(name, &[])),
            Entry::file(
                &format!("{base}/pkg/health.toml"),
                &format!("http = \"http://127.0.0.1:{port}/health\"\ntimeout_secs = 5\n"),
            ),
        ],
    )
}

/// A packages directory with svc-a (version `a`) and svc-b (version `b`, answering `b_status`).
fn release(
    root: &Utf8Path,
    tag: &str,
    binary: &[u8],
    a: &str,
    b: &str,
    b_status: u16,
) -> Utf8PathBuf {
    packages_dir(
        root,
        tag,
        &[
            ("svc-a.tar.gz", service_zone("svc-a", binary, 7001, a, 200, "")),
            ("svc-b.tar.gz", service_zone("svc-b", binary, 7002, b, b_status, "svc-a.service")),
        ],
    )
}

struct Node<'a> {
    testbed: &'a Testbed,
    name: String,
    addr: String,
}

impl Node<'_> {
    fn scp(&self, from: &Path, to: &str) {
        let out = Command::new("scp")
            .arg("-F")
            .arg(&self.testbed.ssh_config)
            .args(["-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes", "-q", "-r"])
            .arg(from)
            .arg(format!("{}:{to}", self.name))
            .output()
            .unwrap();
        assert!(out.status.success(), "scp {from:?}: {}", String::from_utf8_lossy(&out.stderr));
    }

    fn ssh(&self, script: &str) -> Output {
        self.testbed.ssh(&self.name, script)
    }

    fn ssh_ok(&self, script: &str) -> String {
        self.testbed.ssh_ok(&self.name, script)
    }

    /// Copies a packages directory to the node and runs the installer on it.
    fn install(&self, dir: &Utf8Path) -> Output {
        let tag = dir.file_name().unwrap();
        self.scp(dir.as_std_path(), &format!("{STAGING}/{tag}"));
        self.ssh(&format!("{STAGING}/flotilla-installer install {STAGING}/{tag}"))
    }

    fn invocation(&self, unit: &str) -> String {
        self.ssh_ok(&format!("systemctl show -p InvocationID --value {unit}"))
    }

    /// GETs `/health` on the node from this machine; returns the status line and body.
    fn get(&self, port: u16) -> Result<String, String> {
        let mut stream = TcpStream::connect_timeout(
            &format!("{}:{port}", self.addr).parse().unwrap(),
            Duration::from_secs(3),
        )
        .map_err(|e| e.to_string())?;
        stream.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        stream
            .write_all(b"GET /health HTTP/1.1\r\nHost: node\r\nConnection: close\r\n\r\n")
            .map_err(|e| e.to_string())?;
        let mut text = String::new();
        stream.read_to_string(&mut text).map_err(|e| e.to_string())?;
        let status = text.lines().next().unwrap_or_default().to_owned();
        let body = text.split("\r\n\r\n").nth(1).unwrap_or_default();
        Ok(format!("{status} {body}"))
    }
}

fn text(out: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The IPv4 address `ssh_config` gives for `host`.
fn host_addr(ssh_config: &Path, host: &str) -> String {
    let config = std::fs::read_to_string(ssh_config).unwrap();
    let block = config
        .split("\nHost ")
        .find(|b| b.lines().next() == Some(host))
        .expect("host in ssh config");
    block.lines().find_map(|l| l.trim().strip_prefix("HostName ")).unwrap().trim().to_owned()
}

#[test]
fn install_upgrade_revert_rollback_uninstall_on_a_systemd_node() {
    if !can_run("install_upgrade_revert_rollback_uninstall_on_a_systemd_node") {
        return;
    }
    let service = build_helpers();
    let binary = std::fs::read(&service).unwrap();
    let tmp = TempDir::new("e2e");
    let root = tmp.path();
    let v1 = release(root, "v1", &binary, "1", "1", 200);
    let v2 = release(root, "v2", &binary, "1", "2", 200);
    let broken = release(root, "v3-broken", &binary, "1", "3", 500);

    let testbed = Testbed::up(&workspace(), "inst", 1);
    let node = Node {
        testbed: &testbed,
        name: "node1".into(),
        addr: host_addr(&testbed.ssh_config, "node1"),
    };
    node.ssh_ok(&format!("mkdir -p {STAGING}"));
    node.scp(Path::new(INSTALLER), &format!("{STAGING}/flotilla-installer"));

    // First install: both services run the new release and answer over HTTP.
    let start = Instant::now();
    let out = node.install(&v1);
    assert!(out.status.success(), "first install: {}", text(&out));
    eprintln!("first install took {:?}", start.elapsed());
    assert!(node.get(7001).unwrap().contains("\"version\":\"1\""));
    assert!(node.get(7002).unwrap().contains("\"version\":\"1\""));
    assert_eq!(node.ssh_ok("readlink /opt/flotilla/current").split('/').next(), Some("releases"));
    let (a1, b1) = (node.invocation("svc-a.service"), node.invocation("svc-b.service"));

    // The same packages again: nothing restarts.
    let start = Instant::now();
    let out = node.install(&v1);
    assert!(out.status.success(), "reinstall: {}", text(&out));
    eprintln!("no-op reinstall took {:?}", start.elapsed());
    assert!(String::from_utf8_lossy(&out.stdout).contains("restarted: none"), "{}", text(&out));
    assert_eq!(
        (node.invocation("svc-a.service"), node.invocation("svc-b.service")),
        (a1.clone(), b1.clone())
    );

    // svc-b changed: only svc-b restarts.
    let start = Instant::now();
    let out = node.install(&v2);
    assert!(out.status.success(), "upgrade: {}", text(&out));
    eprintln!("upgrade of one service took {:?}", start.elapsed());
    assert!(String::from_utf8_lossy(&out.stdout).contains("restarted: svc-b"), "{}", text(&out));
    assert_eq!(node.invocation("svc-a.service"), a1, "svc-a was restarted");
    assert_ne!(node.invocation("svc-b.service"), b1, "svc-b was not restarted");
    assert!(node.get(7002).unwrap().contains("\"version\":\"2\""));
    let v2_link = node.ssh_ok("readlink /opt/flotilla/current");

    // A release whose svc-b answers 500: the installer reverts, exits 3, names the service with
    // its journal, and the old release keeps serving.
    let out = node.install(&broken);
    assert_eq!(out.status.code(), Some(3), "broken upgrade: {}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("service svc-b is not healthy"), "{}", text(&out));
    assert!(stderr.contains("reverted to release"), "{}", text(&out));
    // The journal's last lines follow; journald inside a container sometimes has not indexed
    // them yet, so only the section is required.
    assert!(stderr.contains("last log lines of svc-b:"), "{}", text(&out));
    assert!(node.get(7002).unwrap().starts_with("HTTP/1.1 200"), "the old release serves");
    assert!(node.get(7002).unwrap().contains("\"version\":\"2\""));
    assert_eq!(node.ssh_ok("readlink /opt/flotilla/current"), v2_link);
    assert_eq!(node.invocation("svc-a.service"), a1, "svc-a was never touched");

    // Rollback to the first release.
    let out = node.ssh(&format!("{STAGING}/flotilla-installer rollback"));
    assert!(out.status.success(), "rollback: {}", text(&out));
    assert!(node.get(7002).unwrap().contains("\"version\":\"1\""));
    let status = node.ssh_ok(&format!("{STAGING}/flotilla-installer status"));
    assert!(
        status.contains("svc-a: active (healthy)") && status.contains("svc-b: active (healthy)"),
        "{status}"
    );

    // Uninstall: no unit, no release, nothing listening.
    let out = node.ssh(&format!("{STAGING}/flotilla-installer uninstall"));
    assert!(out.status.success(), "uninstall: {}", text(&out));
    let left = node.ssh_ok(
        "ls /etc/systemd/system/svc-a.service /etc/systemd/system/svc-b.service /opt/flotilla 2>/dev/null; \
         systemctl is-active svc-a.service svc-b.service || true",
    );
    assert_eq!(left.lines().collect::<Vec<_>>(), ["inactive", "inactive"], "left behind: {left}");
    assert!(node.get(7001).is_err() && node.get(7002).is_err(), "nothing serves after uninstall");
}

/// The root of this repository's workspace.
fn workspace() -> camino::Utf8PathBuf {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    camino::Utf8PathBuf::try_from(dir.canonicalize().unwrap()).unwrap()
}
