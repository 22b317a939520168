//! A testbed for tests: `Testbed::up` boots one under a unique name through the real
//! `cargo xtask` binary, and dropping it runs `down`, even when the test panics.
//!
//! Integration tests of xtask include this file with
//! `#[path = "../src/testbed/test_support.rs"] mod testbed_support;` and pass
//! `env!("CARGO_BIN_EXE_xtask")`. It uses only std so it compiles in any test crate.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A running testbed, torn down on drop.
pub struct Testbed {
    pub name: String,
    pub xtask: PathBuf,
    /// `target/testbed/beds/<name>` (or under `FLOTILLA_TESTBED_DIR`).
    pub dir: PathBuf,
    pub ssh_config: PathBuf,
    pub known_hosts: PathBuf,
    pub identity: PathBuf,
    pub deployment: PathBuf,
    pub deployment_v6: PathBuf,
    /// `node1` to `nodeN`, the Host aliases of the ssh config.
    pub nodes: Vec<String>,
    /// What `up` printed.
    pub up_output: String,
}

/// Whether a test that needs root and the testbed may run here. Without root it is skipped
/// (returns false, printing why) unless `CI` is `true`, where skipping would hide a failure.
pub fn can_run(test: &str) -> bool {
    if is_root() {
        return true;
    }
    let reason = "needs root (network namespaces and systemd-nspawn)";
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{test}: {reason}, and CI=true forbids skipping");
    }
    eprintln!("skipping {test}: {reason}; run the tests as root to include it");
    false
}

impl Testbed {
    /// Boots `nodes` nodes under a name made of `prefix` and a unique suffix. Panics with
    /// `up`'s output when it fails.
    pub fn up(xtask: &Path, prefix: &str, nodes: u32) -> Testbed {
        let name = unique_name(prefix);
        let out = Command::new(xtask)
            .args(["testbed", "up", "--nodes", &nodes.to_string(), "--name", &name])
            .output()
            .expect("run xtask testbed up");
        let dir = testbed_root().join("beds").join(&name);
        let testbed = Testbed {
            xtask: xtask.to_owned(),
            ssh_config: dir.join("ssh_config"),
            known_hosts: dir.join("known_hosts"),
            identity: dir.join("id_ed25519"),
            deployment: dir.join("deployment.toml"),
            deployment_v6: dir.join("deployment-v6.toml"),
            nodes: (1..=nodes).map(|i| format!("node{i}")).collect(),
            up_output: String::from_utf8_lossy(&out.stdout).into_owned(),
            dir,
            name,
        };
        // The guard exists before the check, so a failed `up` is torn down as well.
        assert!(
            out.status.success(),
            "testbed up {} failed:\n{}\n{}",
            testbed.name,
            testbed.up_output,
            String::from_utf8_lossy(&out.stderr)
        );
        testbed
    }

    /// Runs `script` on `host` through the system ssh with the written config, strict host key
    /// checking and no prompt.
    pub fn ssh(&self, host: &str, script: &str) -> Output {
        self.ssh_command(host, &[]).arg(script).output().expect("run ssh")
    }

    /// Like `ssh`, but panics unless the command succeeds; returns its trimmed stdout.
    pub fn ssh_ok(&self, host: &str, script: &str) -> String {
        let out = self.ssh(host, script);
        assert!(
            out.status.success(),
            "ssh {host} {script:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// An ssh command for `host` with the testbed's config and extra options before the host.
    pub fn ssh_command(&self, host: &str, options: &[&str]) -> Command {
        let mut cmd = Command::new("ssh");
        cmd.arg("-F").arg(&self.ssh_config).args([
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=yes",
        ]);
        cmd.args(options).arg(host);
        cmd
    }

    /// Runs `down` now and reports whether it succeeded; dropping afterwards is harmless.
    pub fn down(&self) -> Output {
        Command::new(&self.xtask)
            .args(["testbed", "down", "--name", &self.name])
            .output()
            .expect("run xtask testbed down")
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        let out = self.down();
        if !out.status.success() {
            eprintln!(
                "testbed down {} failed: {}",
                self.name,
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

/// A testbed name no other run uses: the prefix, this process id and a counter.
pub fn unique_name(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "{prefix}-{}-{}-{:x}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed),
        nanos & 0xffff
    )
}

/// Where testbeds live: the same rule as the testbed module.
pub fn testbed_root() -> PathBuf {
    match std::env::var("FLOTILLA_TESTBED_DIR") {
        Ok(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("workspace")
            .join("target/testbed"),
    }
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|u| u == "0"))
        })
        .unwrap_or(false)
}
