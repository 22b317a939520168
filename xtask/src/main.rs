//! `cargo xtask`: build, package and deploy the workspace's services.
//!
//! This file parses the command line, prepares the shell and dispatches; the work lives in one
//! module per command.

mod bench;
mod cli;
mod demo;
mod fling;
mod install;
mod package;
mod progress;
mod testbed;
mod workflow;

use std::process::ExitCode;

use camino::{Utf8Path, Utf8PathBuf};
use clap::Parser;
use xshell::Shell;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: cli::Cli) -> anyhow::Result<()> {
    let sh = Shell::new()?;
    // Relative paths given on the command line are taken from where the user stands, before
    // every command moves to the project root (as omicron-package does).
    let invoked_from = Utf8PathBuf::try_from(sh.current_dir())?;
    sh.change_dir(project_root());
    let ctx = Context { invoked_from };
    use cli::Command;
    match cli.command {
        Command::Package(args) => package::package(&sh, &ctx, args),
        Command::ListOutputs(args) => package::list_outputs(&sh, &ctx, args),
        Command::Check(args) => package::check(&sh, &ctx, args),
        Command::Clean(args) => package::clean(&sh, &ctx, args),
        Command::Stamp(args) => package::stamp(&sh, &ctx, args),
        Command::Dot(args) => package::dot(&sh, &ctx, args),
        Command::Target(args) => package::target(&sh, &ctx, args),
        Command::Ci => workflow::ci(&sh),
        Command::Hooks(args) => workflow::hooks(&sh, args),
        Command::Completions(args) => workflow::completions(args),
        Command::Bench(args) => bench::run(&sh, &ctx, args),
        Command::Testbed(args) => testbed::run(&sh, args),
        Command::Demo(args) => demo::run(&sh, args),
        Command::Fling(args) => fling::run(&sh, &ctx, args),
        Command::Install(args) => install::install(&ctx, args),
        Command::Rollback(args) => install::rollback(&ctx, args),
        Command::Status(args) => install::status(&ctx, args),
        Command::Deactivate(args) => install::deactivate(&ctx, args),
        Command::Uninstall(args) => install::uninstall(&ctx, args),
        Command::CleanReleases(args) => install::clean_releases(&ctx, args),
    }
}

/// What every command may need to know about how it was invoked.
pub struct Context {
    /// The directory `cargo xtask` was started from; relative paths on the command line are
    /// resolved against it.
    pub invoked_from: Utf8PathBuf,
}

impl Context {
    /// Resolves a path given on the command line.
    pub fn user_path(&self, path: &Utf8Path) -> Utf8PathBuf {
        if path.is_absolute() {
            path.to_owned()
        } else {
            self.invoked_from.join(path)
        }
    }
}

/// The root of the workspace, found from where this crate was compiled.
pub fn project_root() -> Utf8PathBuf {
    Utf8Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_owned()
}

/// Whether this process runs as root, which the testbed and local installs need.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { geteuid() == 0 }
}

extern "C" {
    fn geteuid() -> u32;
}
