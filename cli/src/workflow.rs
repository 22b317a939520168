//! The developer workflow around the code: `ci`, `hooks`, `completions`.

use anyhow::Context as _;
use clap::CommandFactory;
use xshell::{cmd, Shell};

use crate::cli;

/// Runs what CI runs. The tests include the end-to-end ones, which need the testbed's system
/// packages: as root they are installed first; elsewhere those tests skip, saying why (with
/// `CI=true` they never skip).
pub fn ci(sh: &Shell, ctx: &crate::Context) -> anyhow::Result<()> {
    let cargo = cargo();
    if flotilla_testbed::is_root() {
        crate::testbed::prereqs(sh, ctx).context("install the testbed's prerequisites")?;
    }
    cmd!(sh, "{cargo} fmt --all --check")
        .run()
        .context("formatting check failed; run `cargo fmt --all`")?;
    clippy(sh)?;
    cmd!(sh, "{cargo} test --workspace --locked").run().context("tests failed")?;
    Ok(())
}

fn clippy(sh: &Shell) -> anyhow::Result<()> {
    let cargo = cargo();
    cmd!(sh, "{cargo} clippy --workspace --all-targets --locked -- -D warnings")
        .run()
        .context("clippy found warnings")?;
    Ok(())
}

const HOOK_MARKER: &str = "# installed by `cargo xtask hooks install`";

pub fn hooks(sh: &Shell, args: cli::HooksArgs) -> anyhow::Result<()> {
    let git_dir = cmd!(sh, "git rev-parse --git-path hooks")
        .read()
        .context("find the git hooks directory")?;
    let hook = sh.current_dir().join(git_dir.trim()).join("pre-commit");
    match args.command {
        cli::HooksCommand::Install => {
            if let Ok(existing) = sh.read_file(&hook) {
                if !existing.contains(HOOK_MARKER) {
                    anyhow::bail!(
                        "{} exists and was not installed by xtask; move it away first",
                        hook.display()
                    );
                }
            }
            let script = format!(
                "#!/bin/sh\n{HOOK_MARKER}\n\
                 # Fast checks before each commit. Bypass once with `git commit --no-verify`;\n\
                 # remove with `cargo xtask hooks uninstall`.\n\
                 set -e\n\
                 cargo fmt --all --check || {{ echo 'pre-commit: run `cargo fmt --all`' >&2; exit 1; }}\n\
                 cargo clippy --workspace --all-targets --quiet -- -D warnings\n"
            );
            sh.write_file(&hook, script)?;
            set_executable(&hook)?;
            println!("installed {} (bypass with `git commit --no-verify`)", hook.display());
        }
        cli::HooksCommand::Uninstall => match sh.read_file(&hook) {
            Ok(existing) if existing.contains(HOOK_MARKER) => {
                sh.remove_path(&hook)?;
                println!("removed {}", hook.display());
            }
            Ok(_) => anyhow::bail!("{} was not installed by xtask; leaving it", hook.display()),
            Err(_) => println!("no pre-commit hook installed"),
        },
    }
    Ok(())
}

fn set_executable(path: &std::path::Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))
        .with_context(|| format!("make {} executable", path.display()))
}

pub fn completions(args: cli::CompletionsArgs) -> anyhow::Result<()> {
    let mut command = cli::Cli::command();
    clap_complete::generate(args.shell, &mut command, "cargo-xtask", &mut std::io::stdout());
    Ok(())
}

/// The cargo that runs us, as cargo asks its subprocesses to use.
pub fn cargo() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned())
}
