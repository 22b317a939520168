//! The `cargo xtask` commands of flotilla, as a library any workspace's `xtask` calls.
//!
//! A workspace adopts flotilla with an `xtask` crate whose `main` is one call,
//! `flotilla_cli::main(flotilla_cli::Workspace::of_xtask(env!("CARGO_MANIFEST_DIR")))`, or
//! which adds commands of its own next to [`cli::Command`] (this repository's xtask adds
//! `demo`). `cli` holds the clap types; each command's module turns them into the config of
//! the library that does the work (`flotilla-package`, `flotilla-installer`, `flotilla-fling`,
//! `flotilla-testbed`), calls it and prints. Only here is there a terminal.

mod bench;
pub mod cli;
pub mod fling;
mod fling_bench;
mod fling_ui;
mod install;
mod package;
mod progress;
pub mod store;
mod target_flags;
pub mod testbed;
mod workflow;

use std::process::ExitCode;

use camino::{Utf8Path, Utf8PathBuf};
use clap::Parser;
use xshell::Shell;

/// The workspace the commands work on.
#[derive(Debug, Clone)]
pub struct Workspace {
    /// Its root: the directory of its `Cargo.toml`, where `package-manifest.toml` is by default.
    pub root: Utf8PathBuf,
    /// Commands the workspace's own tests need beside the testbed (command, Debian package):
    /// `testbed prereqs` and `ci` install them.
    pub test_tools: Vec<(String, String)>,
}

impl Workspace {
    /// The workspace of an `xtask` crate that lives in a direct subdirectory of the root, as
    /// the xtask convention has it: pass `env!("CARGO_MANIFEST_DIR")`.
    pub fn of_xtask(manifest_dir: &str) -> Workspace {
        let dir = Utf8Path::new(manifest_dir);
        Workspace { root: dir.parent().unwrap_or(dir).to_owned(), test_tools: Vec::new() }
    }

    /// The workspace, whose tests also need `tools` (command, Debian package).
    pub fn with_test_tools(mut self, tools: &[(&str, &str)]) -> Workspace {
        self.test_tools.extend(tools.iter().map(|(b, p)| (b.to_string(), p.to_string())));
        self
    }
}

/// What every command may need to know about how it was invoked.
pub struct Context {
    /// The directory `cargo xtask` was started from; relative paths on the command line are
    /// resolved against it.
    pub invoked_from: Utf8PathBuf,
    pub workspace: Workspace,
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

    /// The workspace's root.
    pub fn root(&self) -> &Utf8Path {
        &self.workspace.root
    }
}

/// Parses the command line as flotilla's own commands and runs it: the whole `main` of an
/// adopting workspace's xtask.
pub fn main(workspace: Workspace) -> ExitCode {
    let cli = cli::Cli::parse();
    exit(start(workspace).and_then(|(sh, ctx)| {
        let command = cli.command.with_globals(&cli.globals).map_err(anyhow::Error::msg)?;
        run(&sh, &ctx, command)
    }))
}

/// The shell and context every command runs with: the current directory is remembered, then
/// left for the workspace root (as omicron-package does).
pub fn start(workspace: Workspace) -> anyhow::Result<(Shell, Context)> {
    let sh = Shell::new()?;
    let invoked_from = Utf8PathBuf::try_from(sh.current_dir())?;
    sh.change_dir(&workspace.root);
    Ok((sh, Context { invoked_from, workspace }))
}

/// Turns a command's result into the process's exit code, printing an error once.
pub fn exit(result: anyhow::Result<ExitCode>) -> ExitCode {
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {}", message(&err));
            ExitCode::FAILURE
        }
    }
}

/// An error and its causes on one line, each cause once: a library error that already shows
/// its cause (`read manifest m.toml: No such file ...`) does not get it appended again.
pub fn message(err: &anyhow::Error) -> String {
    let mut text = err.to_string();
    for cause in err.chain().skip(1) {
        let cause = cause.to_string();
        if !text.contains(&cause) {
            text.push_str(": ");
            text.push_str(&cause);
        }
    }
    text
}

/// Runs one of flotilla's commands.
pub fn run(sh: &Shell, ctx: &Context, command: cli::Command) -> anyhow::Result<ExitCode> {
    use cli::Command;
    let done = |r: anyhow::Result<()>| r.map(|()| ExitCode::SUCCESS);
    match command {
        Command::Package(args) => done(package::package(sh, ctx, args)),
        Command::ListOutputs(args) => done(package::list_outputs(sh, ctx, args)),
        Command::ShowCargoCommands(args) => done(package::show_cargo_commands(sh, ctx, args)),
        Command::Check(args) => done(package::check(sh, ctx, args)),
        Command::Clean(args) => done(package::clean(sh, ctx, args)),
        Command::Stamp(args) => done(package::stamp(sh, ctx, args)),
        Command::Dot(args) => done(package::dot(sh, ctx, args)),
        Command::Target(args) => done(package::target(sh, ctx, args)),
        Command::Ci => done(workflow::ci(sh, ctx)),
        Command::Hooks(args) => done(workflow::hooks(sh, args)),
        Command::Completions(args) => done(workflow::completions(args)),
        Command::Bench(args) => done(bench::run(sh, ctx, args)),
        Command::Testbed(args) => done(testbed::run(sh, ctx, args)),
        Command::Fling(args) => fling::run(sh, ctx, args),
        Command::Install(args) => done(install::install(ctx, args)),
        Command::Rollback(args) => done(install::rollback(ctx, args)),
        Command::Status(args) => done(install::status(ctx, args)),
        Command::Deactivate(args) => done(install::deactivate(ctx, args)),
        Command::Uninstall(args) => done(install::uninstall(ctx, args)),
        Command::CleanReleases(args) => done(install::clean_releases(ctx, args)),
    }
}
