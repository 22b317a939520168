//! `testbed prereqs|up|status|ssh|down`: the arguments to the testbed library, its report to
//! the terminal.

use camino::Utf8Path;
use flotilla_testbed::{TestbedName, Testbeds};
use xshell::Shell;

use crate::cli::{TestbedArgs, TestbedCommand};
use crate::Context;

fn log(line: &str) {
    eprintln!("{line}");
}

/// The testbeds of the workspace.
pub fn testbeds(ctx: &Context) -> Testbeds<'static> {
    let mut tb = Testbeds::new(ctx.root(), &log);
    tb.extra_tools = ctx.workspace.test_tools.clone();
    tb
}

pub fn run(sh: &Shell, ctx: &Context, args: TestbedArgs) -> anyhow::Result<()> {
    let tb = testbeds(ctx);
    match args.command {
        TestbedCommand::Prereqs => prereqs(sh, ctx),
        TestbedCommand::Up { nodes, name, store } => {
            let options = flotilla_testbed::Options { nodes, store };
            let up = flotilla_testbed::up_with(sh, &tb, &TestbedName::new(&name)?, options)?;
            println!("{up}");
            Ok(())
        }
        TestbedCommand::Status { name } => {
            print!("{}", flotilla_testbed::status(&tb, &TestbedName::new(&name)?)?);
            Ok(())
        }
        TestbedCommand::Ssh { name, node, command } => {
            flotilla_testbed::ssh(sh, &tb, &TestbedName::new(&name)?, &node, &command)
        }
        TestbedCommand::Down { name, all } => {
            if all {
                flotilla_testbed::down_all(sh, &tb)
            } else {
                flotilla_testbed::down(sh, &tb, &TestbedName::new(&name)?)
            }
        }
    }
}

/// Installs what the testbed needs and caches the Debian files the workspace's manifest pins.
pub fn prereqs(sh: &Shell, ctx: &Context) -> anyhow::Result<()> {
    let manifest = ctx.root().join("package-manifest.toml");
    let manifest = manifest.is_file().then_some(manifest);
    flotilla_testbed::prereqs(sh, &testbeds(ctx), manifest.as_deref().map(Utf8Path::new))
}
