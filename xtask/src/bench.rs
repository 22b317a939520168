//! `cargo xtask bench`: the project measured against its baselines, side by side in one run.

use xshell::Shell;

use crate::{cli, Context};

pub fn run(_sh: &Shell, _ctx: &Context, _args: cli::BenchArgs) -> anyhow::Result<()> {
    anyhow::bail!("bench: being written")
}
