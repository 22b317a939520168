//! `cargo xtask fling`'s command line, as clap types only.

use camino::Utf8PathBuf;
use clap::{Args, Subcommand};

/// `fling`'s options. Exit codes: 0 every host succeeded; 1 fling could not run; 2 some hosts
/// failed; 3 the deploy lock is held; 4 some hosts were unreachable; 6 both failed and
/// unreachable hosts; 130 interrupted.
#[derive(Debug, Args)]
#[command(after_help = "Exit codes: 0 every host succeeded; 1 fling could not run (config, \
    arguments); 2 some hosts failed; 3 the deploy lock is held by another run; 4 some hosts \
    were unreachable; 6 some failed and some were unreachable; 130 interrupted (Ctrl-C: the \
    running steps stop, the deploy lock is released; a second Ctrl-C exits at once).")]
pub struct FlingArgs {
    /// The deployment config (the format of `deployment-example.toml`); `-` reads stdin.
    #[arg(short, long, global = true, default_value = "deployment.toml")]
    pub config: Utf8PathBuf,
    /// Only these deployment servers (comma-separated), instead of all of them.
    #[arg(long, global = true, value_delimiter = ',', value_name = "NAME,...")]
    pub servers: Vec<String>,
    /// Print, per host, one line per step (where it runs, what it does), and run nothing.
    #[arg(long, global = true)]
    pub dry_run: bool,
    /// With --dry-run: print every command line and script too.
    #[arg(long, global = true, requires = "dry_run")]
    pub show_commands: bool,
    /// Write one JSON event per line and a final summary object to stdout.
    #[arg(long, global = true)]
    pub json: bool,
    /// How many servers are worked on at once [default: deployment.parallel or 10].
    #[arg(long, global = true)]
    pub parallel: Option<usize>,
    /// How many ssh connections may be starting at once [default: deployment.connect_parallel
    /// or 8].
    #[arg(long, global = true)]
    pub connect_parallel: Option<usize>,
    /// Seconds to wait for the deploy lock on the builder before giving up.
    #[arg(long, global = true, default_value_t = 0)]
    pub lock_wait: u64,
    #[command(subcommand)]
    pub command: FlingCommand,
}

impl FlingArgs {
    /// `fling --config <config> <command>` with every other flag at its default, for callers
    /// that run fling from code (the demo, the bench).
    pub fn new(config: Utf8PathBuf, command: FlingCommand) -> FlingArgs {
        FlingArgs {
            config,
            servers: Vec::new(),
            dry_run: false,
            show_commands: false,
            json: false,
            parallel: None,
            connect_parallel: None,
            lock_wait: 0,
            command,
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum FlingCommand {
    /// Copy the client's workspace to the builder with rsync, honouring `.gitignore` and never
    /// sending `target/`, `out/` or `.git/` [runs on: client -> builder].
    Sync,
    /// Check and prepare what the builder and the servers need; a Linux server without rsync
    /// gets the builder's, with its libraries; idempotent [runs on: builder, servers].
    InstallPrereqs,
    /// `cargo xtask check` or `cargo xtask package` on the builder [runs on: builder].
    Build {
        #[command(subcommand)]
        command: FlingBuildCommand,
    },
    /// Generate each server's own files under `out/overlay/<server>/` [runs on: builder].
    Overlay {
        /// Generate here rather than asking the builder: what the builder runs.
        #[arg(long, hide = true)]
        generate_here: bool,
        /// Replace the cluster CA, every server's key and certificate and the rack secret's
        /// shares; without it, the ones made before are kept.
        #[arg(long)]
        rotate: bool,
    },
    /// Install, uninstall, inspect or roll back the servers; the builder pushes to each
    /// server [runs on: builder -> servers].
    Deploy {
        #[command(subcommand)]
        command: FlingDeployCommand,
    },
    /// Same as `deploy install` [runs on: builder -> servers].
    Install,
    /// Same as `deploy uninstall` [runs on: builder -> servers].
    Uninstall,
    /// Run a shell command line on every server, in parallel [runs on: servers].
    Exec {
        /// The command line, after `--`.
        #[arg(last = true, required = true, num_args = 1..)]
        command: Vec<String>,
    },
    /// Inspect or release the deploy lock [runs on: builder].
    Lock {
        #[command(subcommand)]
        command: FlingLockCommand,
    },
    /// Time `install` to the first 1, 4 and 8 servers next to a plain parallel ssh/scp
    /// baseline; uninstalls first. Needs a testbed whose builder is this machine.
    Bench {
        /// How many servers, for each measurement.
        #[arg(long, value_delimiter = ',', default_value = "1,4,8")]
        nodes: Vec<usize>,
        /// How many runs of each; the table shows the median.
        #[arg(long, default_value_t = 1)]
        runs: usize,
    },
}

#[derive(Debug, Subcommand)]
pub enum FlingBuildCommand {
    /// `cargo xtask check` on the builder, with these flags.
    Check {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// `cargo xtask package` on the builder, with these flags, then the installer binary.
    Package {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum FlingDeployCommand {
    /// Push the packages, the installer and each server's overlay, then install.
    Install,
    /// Stop and remove the services and every release, then the staging directory.
    Uninstall,
    /// Show each server's releases and services.
    Status,
    /// Activate each server's previous release.
    Rollback,
}

#[derive(Debug, Subcommand)]
pub enum FlingLockCommand {
    /// Show who holds the deploy lock, since when, for what.
    Status,
    /// Remove the deploy lock (after a crashed run).
    Release,
}
