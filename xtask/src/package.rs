//! `package`, `list-outputs`, `check`, `clean`, `stamp`, `dot` and `target`.

use xshell::Shell;

use crate::{cli, Context};

pub fn package(_sh: &Shell, _ctx: &Context, _args: cli::PackageArgs) -> anyhow::Result<()> {
    anyhow::bail!("package: being written")
}
pub fn list_outputs(_sh: &Shell, _ctx: &Context, _args: cli::ManifestArgs) -> anyhow::Result<()> {
    anyhow::bail!("list-outputs: being written")
}
pub fn check(_sh: &Shell, _ctx: &Context, _args: cli::ManifestArgs) -> anyhow::Result<()> {
    anyhow::bail!("check: being written")
}
pub fn clean(_sh: &Shell, _ctx: &Context, _args: cli::ManifestArgs) -> anyhow::Result<()> {
    anyhow::bail!("clean: being written")
}
pub fn stamp(_sh: &Shell, _ctx: &Context, _args: cli::StampArgs) -> anyhow::Result<()> {
    anyhow::bail!("stamp: being written")
}
pub fn dot(_sh: &Shell, _ctx: &Context, _args: cli::ManifestArgs) -> anyhow::Result<()> {
    anyhow::bail!("dot: being written")
}
pub fn target(_sh: &Shell, _ctx: &Context, _args: cli::TargetArgs) -> anyhow::Result<()> {
    anyhow::bail!("target: being written")
}
