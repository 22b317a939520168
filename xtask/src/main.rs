//! `cargo xtask` of this repository: flotilla's own commands (`flotilla-cli`), as any workspace
//! that adopts flotilla has them, and `demo`, which shows this repository's example system.

mod demo;
mod etcd_load;
mod rollout_bench;
mod upgrade;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use flotilla_cli::Workspace;

/// Build, package and deploy the workspace's services.
#[derive(Debug, Parser)]
#[command(name = "cargo xtask", bin_name = "cargo xtask", version, propagate_version = true)]
struct Cli {
    #[command(flatten)]
    globals: flotilla_cli::cli::Globals,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    #[command(flatten)]
    Flotilla(Box<flotilla_cli::cli::Command>),
    /// The whole system on a three-node testbed: package, boot, overlay, deploy, wait for
    /// health, print the nodes, services and the rack unlock; torn down unless `--keep`
    /// [runs on: this machine, as root, Linux].
    Demo(demo::DemoArgs),
    /// Failed writes and the longest write outage of an etcd upgrade, all at once against
    /// rolling, on testbeds of 3 and 5 nodes, with each deploy's time [runs on: this machine,
    /// as root, Linux].
    RolloutBench(rollout_bench::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The cluster test asks the nodes' etcd members for their health from this side.
    let workspace = Workspace::of_xtask(env!("CARGO_MANIFEST_DIR"))
        .with_test_tools(&[("etcdctl", "etcd-client")]);
    flotilla_cli::exit(flotilla_cli::start(workspace).and_then(|(sh, ctx)| match cli.command {
        Command::Flotilla(command) => {
            let command = (*command).with_globals(&cli.globals).map_err(anyhow::Error::msg)?;
            flotilla_cli::run(&sh, &ctx, command)
        }
        Command::Demo(args) => {
            if cli.globals != flotilla_cli::cli::Globals::default() {
                anyhow::bail!("-m, -t and --artifacts do not apply to demo");
            }
            demo::run(&sh, &ctx, args).map(|()| ExitCode::SUCCESS)
        }
        Command::RolloutBench(args) => {
            if cli.globals != flotilla_cli::cli::Globals::default() {
                anyhow::bail!("-m, -t and --artifacts do not apply to rollout-bench");
            }
            rollout_bench::run(&sh, &ctx, args).map(|()| ExitCode::SUCCESS)
        }
    }))
}
