//! An etcd upgrade under a steady write load, on a testbed whose builder is this machine: a
//! change to the etcd package in the builder's copy of the workspace, `fling build package`,
//! then `fling install` (all at once) or `fling install --rolling` while [`etcd_load`] writes
//! every 50 ms. What `demo` shows and `rollout-bench` measures.

use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use camino::{Utf8Path, Utf8PathBuf};
use flotilla_cli::cli::{FlingArgs, FlingBuildCommand, FlingCommand, FlingRolloutArgs};
use flotilla_cli::Context;
use flotilla_fling::config::Config;
use xshell::Shell;

use crate::etcd_load::{Load, Target, Writer};

/// How often the client writes.
pub const INTERVAL: Duration = Duration::from_millis(50);

/// One upgrade as measured.
pub struct Upgrade {
    pub load: Load,
    /// How long the install took.
    pub deploy: Duration,
    /// fling's exit code.
    pub exit_code: i32,
}

/// The testbed's builder copy of the workspace (this machine), where packages are built.
fn builder_source(config: &Config) -> anyhow::Result<Utf8PathBuf> {
    let flotilla_fling::quote::RemotePath::Absolute(source) = &config.builder.source_path else {
        bail!("the testbed's builder keeps its workspace at an absolute path");
    };
    Ok(Utf8PathBuf::from(source))
}

/// Every member's client URL, with the first server's client certificate from the overlay.
pub fn target(config: &Config) -> anyhow::Result<Target> {
    let source = builder_source(config)?;
    let Some(first) = config.deployment.servers.first() else {
        bail!("no deployment server");
    };
    let tls = source.join("out/overlay").join(first.as_str()).join("opt/flotilla/etcd/pkg/tls");
    Ok(Target {
        endpoints: config
            .deployment
            .servers
            .iter()
            .map(|name| format!("https://{}:2379", config.server(name).addr.for_rsync()))
            .collect(),
        ca: tls.join("ca.crt").into(),
        cert: tls.join("node.crt").into(),
        key: tls.join("node.key").into(),
    })
}

/// Changes the etcd package (a comment in its unit, so every member restarts), builds, and
/// installs, rolling or all at once, under the write load: from a second before the install to
/// a second after.
pub fn upgrade(
    sh: &Shell,
    ctx: &Context,
    config_path: &Utf8Path,
    rolling: bool,
    tag: &str,
) -> anyhow::Result<Upgrade> {
    let config = Config::load(config_path)?;
    let unit = builder_source(&config)?.join("smf/etcd/etcd.service");
    let mut text = std::fs::read_to_string(&unit).with_context(|| format!("read {unit}"))?;
    text.push_str(&format!("# upgraded: {tag}\n"));
    std::fs::write(&unit, text).with_context(|| format!("write {unit}"))?;
    let build = FlingArgs::new(
        config_path.to_owned(),
        FlingCommand::Build { command: FlingBuildCommand::package() },
    );
    match flotilla_cli::fling::run_code(sh, ctx, build)? {
        0 => {}
        code => bail!("build package: fling exited with {code}"),
    }
    let rollout = FlingRolloutArgs { rolling, ..FlingRolloutArgs::default() };
    let install = FlingArgs::new(config_path.to_owned(), FlingCommand::Install { rollout });
    let writer = Writer::start(target(&config)?, &format!("flotilla/load/{tag}"), INTERVAL);
    std::thread::sleep(Duration::from_secs(1));
    let started = Instant::now();
    let exit_code = flotilla_cli::fling::run_code(sh, ctx, install);
    let deploy = started.elapsed();
    std::thread::sleep(Duration::from_secs(1));
    let load = writer.stop();
    Ok(Upgrade { load, deploy, exit_code: exit_code? })
}
