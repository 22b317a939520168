//! `cargo xtask rollout-bench`: an etcd upgrade all at once against the same upgrade rolling,
//! measured side by side on one testbed per size, under the same write load (one `etcdctl put`
//! every 50 ms): failed writes, the longest gap between successful writes, and the deploy's
//! time. Both install the same kind of change (a comment in etcd's unit, so every member
//! restarts); the rolling one also checks the quorum before and after each batch and confirms
//! each server over a new connection, which is the work it exists to do.

use anyhow::{bail, Context as _};
use flotilla_cli::cli::{FlingArgs, FlingBuildCommand, FlingCommand};
use flotilla_cli::Context;
use flotilla_testbed::TestbedName;
use xshell::Shell;

use crate::upgrade::{upgrade, Upgrade};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The testbed sizes, each a testbed of its own.
    #[arg(long, value_delimiter = ',', default_value = "3,5")]
    pub nodes: Vec<u32>,
    /// Upgrades of each kind per size, alternating; the table shows each run.
    #[arg(long, default_value_t = 1)]
    pub runs: usize,
}

pub fn run(sh: &Shell, ctx: &Context, args: Args) -> anyhow::Result<()> {
    if !flotilla_testbed::is_root() {
        bail!("cargo xtask rollout-bench: run as root (it boots testbeds)");
    }
    flotilla_cli::testbed::prereqs(sh, ctx).context("install the testbed's prerequisites")?;
    let mut rows = Vec::new();
    for &nodes in &args.nodes {
        if nodes < 3 {
            bail!("--nodes: a quorum to keep needs at least 3 nodes, not {nodes}");
        }
        let name = TestbedName::new(&format!("rb{nodes}-{}", std::process::id() % 10000))?;
        let testbeds = flotilla_cli::testbed::testbeds(ctx);
        let _down = Down { sh, ctx, name: name.clone() };
        let up = flotilla_testbed::up(sh, &testbeds, &name, nodes).context("testbed up")?;
        let config = up.paths.deployment.clone();
        for (what, command) in [
            ("install-prereqs", FlingCommand::InstallPrereqs),
            ("sync", FlingCommand::Sync),
            ("build package", FlingCommand::Build { command: FlingBuildCommand::package() }),
            ("overlay", FlingCommand::Overlay { generate_here: false, rotate: false }),
            ("install", FlingCommand::Install { rollout: Default::default() }),
        ] {
            eprintln!("rollout-bench: {nodes} nodes: {what}");
            let code =
                flotilla_cli::fling::run_code(sh, ctx, FlingArgs::new(config.clone(), command))?;
            if code != 0 {
                bail!("{what} on {nodes} nodes: fling exited with {code}");
            }
        }
        for run in 0..args.runs {
            for rolling in [false, true] {
                let kind = if rolling { "rolling" } else { "all at once" };
                eprintln!("rollout-bench: {nodes} nodes: upgrade {kind} (run {})", run + 1);
                let tag = format!("{}-{run}", if rolling { "rolling" } else { "parallel" });
                // A failed upgrade all at once is the point of the comparison, not an error.
                let measured = upgrade(sh, ctx, &config, rolling, &tag)?;
                rows.push((nodes, kind, measured));
            }
        }
    }
    println!("{}", table(&rows));
    Ok(())
}

fn table(rows: &[(u32, &str, Upgrade)]) -> String {
    let mut out = String::from(
        "| nodes | upgrade | writes | failed | retried | longest gap between writes | deploy | exit |\n\
         |---|---|---|---|---|---|---|---|\n",
    );
    for (nodes, kind, u) in rows {
        out.push_str(&format!(
            "| {nodes} | {kind} | {} | {} | {} | {} ms | {:.1} s | {} |\n",
            u.load.writes,
            u.load.failed,
            u.load.retried,
            u.load.longest_outage.as_millis(),
            u.deploy.as_secs_f64(),
            u.exit_code
        ));
    }
    out
}

/// Tears a bench testbed down however the bench ends.
struct Down<'a> {
    sh: &'a Shell,
    ctx: &'a Context,
    name: TestbedName,
}

impl Drop for Down<'_> {
    fn drop(&mut self) {
        let testbeds = flotilla_cli::testbed::testbeds(self.ctx);
        if let Err(e) = flotilla_testbed::down(self.sh, &testbeds, &self.name) {
            eprintln!("error: tear the bench testbed {} down: {e:#}", self.name);
        }
    }
}
