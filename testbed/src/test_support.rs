//! A testbed for tests (the `test-support` feature): [`Testbed::up`] boots one under a unique
//! name, and dropping it tears it down, even when the test panics.

use std::path::PathBuf;
use std::process::{Command, Output};

use camino::Utf8Path;
use xshell::Shell;

use crate::{TestbedName, Testbeds};

/// A running testbed, torn down on drop.
pub struct Testbed {
    pub name: String,
    /// The workspace the testbed's deployment configs sync.
    pub workspace: PathBuf,
    /// `target/testbed/beds/<name>` (or under `FLOTILLA_TESTBED_DIR`).
    pub dir: PathBuf,
    pub ssh_config: PathBuf,
    pub known_hosts: PathBuf,
    pub identity: PathBuf,
    pub deployment: PathBuf,
    pub deployment_v6: PathBuf,
    /// `node1` to `nodeN`, the Host aliases of the ssh config.
    pub nodes: Vec<String>,
    /// What `up` reported.
    pub up_output: String,
    /// The artifact store, when the testbed has one.
    pub store: Option<crate::store::StoreState>,
}

/// Whether a test that needs root and the testbed may run here. Without root it is skipped
/// (returns false, printing why) unless `CI` is `true`, where skipping would hide a failure.
pub fn can_run(test: &str) -> bool {
    if crate::is_root() {
        return true;
    }
    let reason = "needs root (network namespaces and systemd-nspawn)";
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{test}: {reason}, and CI=true forbids skipping");
    }
    eprintln!("skipping {test}: {reason}; run the tests as root to include it");
    false
}

fn log(line: &str) {
    eprintln!("{line}");
}

impl Testbed {
    /// Boots `nodes` nodes for `workspace` under a name made of `prefix` and a unique suffix.
    /// Panics with the error when it fails (`up` removes what it created).
    pub fn up(workspace: &Utf8Path, prefix: &str, nodes: u32) -> Testbed {
        Testbed::up_with(workspace, prefix, crate::Options { nodes, store: false })
    }

    /// Like `up`, as `options` say: with `store`, the deployment configs name the testbed's
    /// artifact store in `[artifacts]`.
    pub fn up_with(workspace: &Utf8Path, prefix: &str, options: crate::Options) -> Testbed {
        let nodes = options.nodes;
        let name = unique_name(prefix);
        let sh = Shell::new().expect("a shell");
        let testbeds = Testbeds::new(workspace, &log);
        let testbed_name = TestbedName::new(&name).expect("a valid testbed name");
        let up = crate::up_with(&sh, &testbeds, &testbed_name, options)
            .unwrap_or_else(|e| panic!("testbed up {name} failed: {e:#}"));
        let paths = &up.paths;
        Testbed {
            workspace: workspace.into(),
            dir: paths.dir.clone().into(),
            ssh_config: paths.ssh_config.clone().into(),
            known_hosts: paths.known_hosts.clone().into(),
            identity: paths.identity.clone().into(),
            deployment: paths.deployment.clone().into(),
            deployment_v6: paths.deployment_v6.clone().into(),
            nodes: (1..=nodes).map(|i| format!("node{i}")).collect(),
            up_output: up.to_string(),
            store: up.store.clone(),
            name,
        }
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

    /// Tears the testbed down now; dropping afterwards is harmless.
    pub fn down(&self) -> anyhow::Result<()> {
        let sh = Shell::new()?;
        let workspace = Utf8Path::from_path(&self.workspace).expect("a UTF-8 workspace path");
        let testbeds = Testbeds::new(workspace, &log);
        crate::down(&sh, &testbeds, &TestbedName::new(&self.name)?)
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        if let Err(err) = self.down() {
            eprintln!("testbed down {} failed: {err:#}", self.name);
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
