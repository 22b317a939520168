//! `cargo xtask testbed`: a local fleet of real servers.

use xshell::Shell;

use crate::cli;

pub fn run(_sh: &Shell, _args: cli::TestbedArgs) -> anyhow::Result<()> {
    anyhow::bail!("testbed: being written")
}
