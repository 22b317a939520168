//! `flotilla-installer`: the on-host half of a deploy. It is copied to each server next to the
//! packages and run there (by `cargo xtask fling`, or by `cargo xtask install` locally).
//!
//! Exit codes: 0 success; 1 any error before activation (nothing changed on the host); 2 the
//! install lock is held by someone else; 3 a service was not healthy after activation and the
//! previous release was restored.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use camino::Utf8PathBuf;
use clap::{Parser, Subcommand};
use flotilla_contracts::installer::{
    EXIT_FAILED, EXIT_LOCKED, EXIT_NOT_STAGED, EXIT_OK, EXIT_UNHEALTHY,
};
use installer::runner::SystemRunner;
use installer::{detect, Config, Error, Installer, ManagerKind, Prefix, DEFAULT_PREFIX};

/// Install, activate, roll back and remove flotilla releases on this host [runs on: servers].
#[derive(Debug, Parser)]
#[command(name = "flotilla-installer", version)]
struct Cli {
    /// Where releases are installed.
    #[arg(long, default_value = DEFAULT_PREFIX, global = true)]
    prefix: Prefix,
    /// The prefix the packages were built for (their zone root is `root<prefix>`, their
    /// overlays sit under it); the install prefix when not given.
    #[arg(long, global = true)]
    packages_prefix: Option<Prefix>,
    /// Where systemd unit files are written.
    #[arg(long, default_value = installer::manager::DEFAULT_UNIT_DIR, global = true)]
    unit_dir: Utf8PathBuf,
    /// The service manager (`systemd` or `smf`); detected when not given.
    #[arg(long, global = true)]
    service_manager: Option<ManagerKind>,
    /// How many releases to keep, the active one included.
    #[arg(long, default_value_t = 3, global = true)]
    keep: usize,
    /// Seconds to wait for another install on this host to finish before giving up.
    #[arg(long, default_value_t = 0, global = true)]
    lock_wait: u64,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Verify, unpack and activate the packages of a directory holding `digests.b3`.
    Install {
        /// The directory with the `*.tar.gz`/`*.tar` packages and `digests.b3`.
        packages: Utf8PathBuf,
        /// This server's overlay: files under `<packages prefix>/<service>/` placed into
        /// the release before any service starts.
        #[arg(long)]
        overlay: Option<Utf8PathBuf>,
        /// The staging directory fling filled: with `--staged-key`, where the key of what it
        /// holds is recorded.
        #[arg(long, requires = "staged_key")]
        staging: Option<Utf8PathBuf>,
        /// Record this key (64 hex digits, fling's digest of what it pushed) in the staging
        /// directory once the install succeeded; remove it when the install fails.
        #[arg(long, requires = "staging")]
        staged_key: Option<installer::staging::StagedKey>,
        /// Install only when the staging directory holds `--staged-key`; otherwise, or when
        /// installing from it fails before anything changed, exit with status 4 (push first).
        #[arg(long, requires = "staged_key")]
        if_staged: bool,
        /// Create the users and groups the services declare when this host lacks them
        /// (`useradd --system`, no home, no login shell), before anything is placed.
        #[arg(long)]
        create_users: bool,
    },
    /// Activate the previous release, or the one given.
    Rollback {
        /// The release id to activate (see `status`).
        #[arg(long)]
        to: Option<String>,
    },
    /// Show the active release, every release, and each service's state and health.
    Status {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Stop and disable the services; keep the files.
    Deactivate,
    /// Stop the services and remove them, every release and the state.
    Uninstall {
        /// Remove the services' data directory too.
        #[arg(long)]
        purge: bool,
    },
    /// Remove every release except the active one.
    Clean,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => ExitCode::from(code),
        Err(err) => {
            eprintln!("error: {err:#}");
            match err.downcast_ref::<Error>() {
                Some(Error::Locked { .. }) => ExitCode::from(EXIT_LOCKED),
                Some(Error::Unhealthy { .. }) => ExitCode::from(EXIT_UNHEALTHY),
                _ => ExitCode::from(EXIT_FAILED),
            }
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<u8> {
    let manager = match cli.service_manager {
        Some(kind) => kind,
        None => detect("/".into())?,
    };
    let config = Config {
        packages_prefix: cli.packages_prefix.unwrap_or_else(|| cli.prefix.clone()),
        prefix: cli.prefix.as_path().to_owned(),
        unit_dir: cli.unit_dir,
        manager,
        keep: cli.keep,
        lock_wait: Duration::from_secs(cli.lock_wait),
        create_users: matches!(cli.command, Command::Install { create_users: true, .. }),
    };
    let installer =
        Installer::new(config, Arc::new(SystemRunner)).with_log(|line| eprintln!("{line}"));
    match cli.command {
        Command::Install { packages, overlay, staging, staged_key, if_staged, .. } => {
            let outcome = match (&staging, &staged_key) {
                (Some(staging), Some(key)) => {
                    match installer::staging::install_staged(
                        &installer,
                        staging,
                        &packages,
                        overlay.as_deref(),
                        key,
                        if_staged,
                    )? {
                        installer::staging::Staged::Installed(outcome) => outcome,
                        installer::staging::Staged::NotStaged(why) => {
                            eprintln!("not staged: {why}");
                            return Ok(EXIT_NOT_STAGED);
                        }
                    }
                }
                _ => installer.install(&packages, overlay.as_deref())?,
            };
            println!("{outcome}");
        }
        Command::Rollback { to } => {
            let outcome = installer.rollback(to.as_deref())?;
            println!("{outcome}");
        }
        Command::Status { json } => {
            let status = installer.status()?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&status).context("write the status as JSON")?
                );
            } else {
                println!("{status}");
            }
        }
        Command::Deactivate => {
            let services = installer.deactivate()?;
            println!("stopped and disabled: {}", services.join(", "));
        }
        Command::Uninstall { purge } => {
            let services = installer.uninstall(purge)?;
            println!("uninstalled; removed services: {}", services.join(", "));
        }
        Command::Clean => {
            let removed = installer.clean()?;
            println!("removed releases: {}", removed.join(", "));
        }
    }
    Ok(EXIT_OK)
}
