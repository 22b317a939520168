//! `cargo xtask fling`'s command line, as clap types only.

use std::num::NonZeroUsize;

use camino::Utf8PathBuf;
use clap::{Args, Subcommand};
use flotilla_fling::flags::{Artifacts, PackageName, RetryDuration, TargetName};

/// `fling`'s options. Exit codes: 0 every host succeeded; 1 fling could not run; 2 some hosts
/// failed; 3 the deploy lock is held; 4 some hosts were unreachable; 5 a rolling install
/// stopped before its last batch; 6 both failed and unreachable hosts; 7 `install --plan`
/// found the plan stale; 130 interrupted.
#[derive(Debug, Args)]
#[command(after_help = "Exit codes: 0 every host succeeded; 1 fling could not run (config, \
    arguments); 2 some hosts failed; 3 the deploy lock is held by another run; 4 some hosts \
    were unreachable; 5 a rolling install stopped before its last batch (a batch failed beyond \
    max_failed, or a quorum did not come back); 6 some failed and some were unreachable; 7 \
    `install --plan` refused a plan that no longer matches the builder or a server; 130 \
    interrupted (Ctrl-C: the \
    running steps stop, the deploy lock is released; a second Ctrl-C exits at once).")]
// `--servers a b install`: the command's name ends the list of servers instead of joining it.
#[command(subcommand_precedence_over_arg = true)]
pub struct FlingArgs {
    /// The deployment config (the format of `deployment-example.toml`); `-` reads stdin.
    #[arg(short, long, global = true, default_value = "deployment.toml")]
    pub config: Utf8PathBuf,
    /// Only these deployment servers, instead of all of them: `-s a b`, `-s a,b` and
    /// `-s "a b"` (thing-flinger's form) all name two.
    #[arg(short, long, global = true, num_args = 1.., value_name = "NAME")]
    pub servers: Vec<String>,
    /// As thing-flinger took it before the command: `build`'s `--target` (see `build package
    /// --help`).
    // Ids of their own: the build commands take the same flags after their name.
    #[arg(id = "fling_target", short = 't', long = "target", value_name = "TARGET")]
    pub target: Option<TargetName>,
    /// As thing-flinger took it before the command: `build`'s and `deploy install`'s
    /// `--artifacts`.
    #[arg(id = "fling_artifacts", long = "artifacts", value_name = "DIR")]
    pub artifacts: Option<Artifacts>,
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
            target: None,
            artifacts: None,
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
    /// `cargo xtask check`, `package` or `dot` on the builder, with flags checked here first
    /// [runs on: builder].
    #[command(subcommand_precedence_over_arg = true)]
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
    /// What the builder runs for a deploy through the artifact store ([artifacts]): upload
    /// what the store lacks of the outputs and the installer, and with --sign print the
    /// servers' presigned URLs [runs on: builder].
    #[command(hide = true)]
    StoreSync {
        #[arg(long, value_name = "DIR", default_value = "out")]
        artifacts: Artifacts,
        #[arg(long)]
        sign: bool,
    },
    /// Install, uninstall, inspect or roll back the servers; the builder pushes to each
    /// server [runs on: builder -> servers].
    #[command(subcommand_precedence_over_arg = true)]
    Deploy {
        #[command(subcommand)]
        command: FlingDeployCommand,
    },
    /// Same as `deploy install` [runs on: builder -> servers].
    Install {
        #[command(flatten)]
        rollout: FlingRolloutArgs,
    },
    /// Same as `deploy uninstall` [runs on: builder -> servers].
    Uninstall,
    /// The last runs that reached servers and each host's outcome, from the builder's journal
    /// [runs on: builder].
    History {
        /// How many runs to show.
        #[arg(long, default_value_t = 10)]
        last: usize,
    },
    /// Run a shell command line on every server, in parallel [runs on: servers].
    Exec {
        /// The command line as one argument (thing-flinger's form), instead of after `--`.
        #[arg(long, value_name = "COMMAND", conflicts_with = "command")]
        cmd: Option<String>,
        /// The command line, after `--`; its words are joined with spaces.
        #[arg(last = true, num_args = 1.., required_unless_present = "cmd")]
        command: Vec<String>,
    },
    /// Inspect or release the deploy lock [runs on: builder].
    #[command(subcommand_precedence_over_arg = true)]
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

/// Every flag is checked here, on the client, and sent to the builder's `cargo xtask` as it
/// takes it; a flag `cargo xtask` would not take is refused before anything runs.
#[derive(Debug, Subcommand)]
pub enum FlingBuildCommand {
    /// `cargo xtask check` on the builder: the manifest, and `cargo check` of what is packaged.
    Check {
        #[command(flatten)]
        manifest: FlingManifestArgs,
    },
    /// `cargo xtask package` on the builder, then the installer and the overlay generators.
    Package {
        #[command(flatten)]
        manifest: FlingManifestArgs,
        #[command(flatten)]
        package: FlingPackageArgs,
    },
    /// `cargo xtask dot` on the builder: the package graph in graphviz's format, written to
    /// standard output (`fling build dot | dot -Tsvg > packages.svg`).
    Dot {
        #[command(flatten)]
        manifest: FlingManifestArgs,
    },
}

impl FlingBuildCommand {
    /// `build package` with the builder's defaults.
    pub fn package() -> FlingBuildCommand {
        FlingBuildCommand::Package {
            manifest: FlingManifestArgs::default(),
            package: FlingPackageArgs::default(),
        }
    }
}

/// The target and outputs directory of the builder's packaging commands.
#[derive(Debug, Args, Clone, Default)]
pub struct FlingManifestArgs {
    /// The named target to build for (see `cargo xtask target`); the builder's active target
    /// when not given.
    #[arg(short, long, value_name = "TARGET")]
    pub target: Option<TargetName>,
    /// The builder's outputs directory, `out` or one below it (`fling sync` deletes anything
    /// else it did not send) [default: out]. `deploy install --artifacts` pushes from it.
    #[arg(long, visible_alias = "out", value_name = "DIR")]
    pub artifacts: Option<Artifacts>,
}

/// `cargo xtask package`'s own flags, forwarded to the builder.
#[derive(Debug, Args, Clone, Default)]
pub struct FlingPackageArgs {
    /// Only these packages, and the packages they are composed of.
    #[arg(long, num_args = 1.., value_name = "PACKAGE")]
    pub only: Vec<PackageName>,
    /// Rebuild every output even where the cache says it is up to date.
    #[arg(short, long)]
    pub disable_cache: bool,
    /// Do not run cargo: package the binaries already built.
    #[arg(long)]
    pub no_rebuild: bool,
    /// `cargo xtask package --dry-run` on the builder: print its plan (cargo commands, every
    /// output with its inputs, cache hit or miss there) and write nothing. (`--dry-run` is
    /// fling's own: it prints fling's plan and reaches no host.)
    #[arg(long)]
    pub builder_dry_run: bool,
    /// How many packages are assembled at once; the builder's number of CPUs when not given.
    #[arg(short, long, value_name = "N")]
    pub jobs: Option<NonZeroUsize>,
    /// How many times a download is retried before the package fails [builder's default: 3].
    #[arg(long, value_name = "N")]
    pub retry_count: Option<u32>,
    /// Seconds between download retries, 0 to 3600 [builder's default: 1].
    #[arg(long, value_name = "SECONDS")]
    pub retry_duration: Option<RetryDuration>,
}

#[derive(Debug, Subcommand)]
pub enum FlingDeployCommand {
    /// Push the packages, the installer and each server's overlay, then install.
    Install {
        /// The builder's outputs directory to push the packages from (`build package
        /// --artifacts`) [default: out].
        #[arg(long, value_name = "DIR")]
        artifacts: Option<Artifacts>,
        #[command(flatten)]
        rollout: FlingRolloutArgs,
    },
    /// What `deploy install` would change on each server, from its real state, before
    /// anything runs: packages and overlay files whose digest differs, services that would
    /// restart, servers where nothing would change or that cannot be reached. `--json` for
    /// tools; `--out` keeps it for `deploy install --plan`.
    Plan {
        /// The builder's outputs directory the install would push [default: out].
        #[arg(long, value_name = "DIR")]
        artifacts: Option<Artifacts>,
        /// Write the plan (JSON) to this file too, for `deploy install --plan`.
        #[arg(long, value_name = "PLAN.json")]
        out: Option<Utf8PathBuf>,
    },
    /// Stop and remove the services and every release, then the staging directory.
    Uninstall,
    /// Show each server's releases and services.
    Status,
    /// Activate each server's previous release.
    Rollback,
    /// Remove the staged packages and overlay (the installer, the carried rsync and the
    /// marker stay) and every release but the active one, on servers whose staging directory
    /// flotilla created.
    Clean,
}

/// How `install` reaches the servers: all at once (the default) or in batches.
#[derive(Debug, Args, Clone, Default, PartialEq, Eq)]
pub struct FlingRolloutArgs {
    /// Install in batches ([deployment.rollout]), never taking a quorum group
    /// ([quorum.<service>]) below its quorum, each batch only once the last one is confirmed
    /// and its groups are healthy again; exit 5 when a batch stops the rollout.
    #[arg(long)]
    pub rolling: bool,
    /// The batch sizes, the last repeating: `1`, `25%` or `1,25%,100%` [default:
    /// deployment.rollout.batches or 1]; implies --rolling.
    #[arg(long, value_name = "SIZES", value_delimiter = ',', value_parser = batch_size)]
    pub batch: Vec<flotilla_fling::rollout::BatchSize>,
    /// Servers of the whole fleet that may fail before no further batch starts: a count or
    /// a percentage [default: deployment.rollout.max_failed or 0]; implies --rolling.
    #[arg(long, value_name = "N|P%", value_parser = budget)]
    pub max_failed: Option<flotilla_fling::rollout::Budget>,
    /// Seconds between batches [default: deployment.rollout.pause_secs or 0]; implies
    /// --rolling.
    #[arg(long, value_name = "SECONDS", value_parser = clap::value_parser!(u64).range(0..=3600))]
    pub pause: Option<u64>,
    /// Seconds each server waits for a confirmation over a new connection before it puts its
    /// previous release back by itself; 0 asks for none [default: a server's
    /// confirm_timeout_secs, else deployment.rollout.confirm_timeout_secs (30) when rolling,
    /// else none].
    #[arg(long, value_name = "SECONDS", value_parser = clap::value_parser!(u64).range(0..=86400))]
    pub confirm_timeout: Option<u64>,
    /// Apply this plan (`deploy plan --out`): install exactly on the servers it would change,
    /// and refuse, naming the server and what differs, when the builder's outputs or a
    /// server's active release are no longer what it saw (exit 7).
    #[arg(long, value_name = "PLAN.json", conflicts_with = "retry_failed")]
    pub plan: Option<Utf8PathBuf>,
    /// Install only on the servers that failed or were unreachable in the last install, as
    /// the builder's journal recorded it (`fling history`).
    #[arg(long)]
    pub retry_failed: bool,
    /// With [artifacts]: fail when the store cannot be reached, instead of pushing over ssh.
    #[arg(long)]
    pub require_store: bool,
}

impl FlingRolloutArgs {
    /// Whether the install is a rolling one.
    pub fn rolling(&self) -> bool {
        self.rolling || !self.batch.is_empty() || self.max_failed.is_some() || self.pause.is_some()
    }
}

fn batch_size(text: &str) -> Result<flotilla_fling::rollout::BatchSize, String> {
    flotilla_fling::rollout::BatchSize::parse(text)
}

fn budget(text: &str) -> Result<flotilla_fling::rollout::Budget, String> {
    flotilla_fling::rollout::Budget::parse(text)
}

#[derive(Debug, Subcommand)]
pub enum FlingLockCommand {
    /// Show who holds the deploy lock, since when, for what.
    Status,
    /// Remove the deploy lock (after a crashed run).
    Release,
}
