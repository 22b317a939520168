//! The command line, as clap types only. Each command's module converts these into the
//! configuration structs of the library that does the work.

use camino::Utf8PathBuf;
use clap::{Args, Parser, Subcommand};

/// Build, package and deploy the workspace's services.
#[derive(Debug, Parser)]
#[command(name = "cargo xtask", bin_name = "cargo xtask", version, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Build the services once, then write one cached, deterministic archive per package
    /// [runs on: this machine].
    Package(PackageArgs),
    /// Print the path of every output the manifest describes for the active target.
    ListOutputs(ManifestArgs),
    /// Validate the manifest and `cargo check` every crate that is packaged.
    Check(ManifestArgs),
    /// Remove the outputs directory (packages, cache records, downloads).
    Clean(ManifestArgs),
    /// Write a copy of a package stamped with a version under `<out>/versioned/`.
    Stamp(StampArgs),
    /// Print the package graph in graphviz `dot` format.
    Dot(ManifestArgs),
    /// Create, list, select or delete named build targets (`key=value` maps for `{{key}}`
    /// interpolation and `only_for_targets`).
    Target(TargetArgs),
    /// Run what CI runs: format check, clippy with warnings denied, every test.
    Ci,
    /// Manage the git hooks of this repository.
    Hooks(HooksArgs),
    /// Print a shell completion script for `cargo xtask` to stdout.
    Completions(CompletionsArgs),
    /// Measure the project against its baselines, side by side in one run.
    Bench(BenchArgs),
    /// A local fleet of real servers: network namespaces and systemd-nspawn containers with
    /// their own sshd and systemd.
    Testbed(TestbedArgs),
    /// Deploy from this machine (the client) through a builder to many servers over OpenSSH
    /// (thing-flinger's workflow).
    Fling(FlingArgs),
    /// Verify, unpack and activate packages on this machine, health-checked, with automatic
    /// revert [runs on: a server, as root].
    Install(InstallArgs),
    /// Activate the previous release on this machine, or the one given [runs on: a server].
    Rollback(RollbackArgs),
    /// This machine's active release, releases, and each service's state and health
    /// [runs on: a server].
    Status(StatusArgs),
    /// Stop and disable this machine's services; keep their files [runs on: a server].
    Deactivate(HostArgs),
    /// Remove this machine's services, releases and state [runs on: a server].
    Uninstall(UninstallArgs),
    /// Remove every release on this machine except the active one [runs on: a server].
    CleanReleases(HostArgs),
}

/// Where the manifest and the outputs are, and which target is used.
#[derive(Debug, Args, Clone)]
pub struct ManifestArgs {
    /// The package manifest.
    #[arg(short, long, default_value = "package-manifest.toml", global = true)]
    pub manifest: Utf8PathBuf,
    /// The directory that receives the packages.
    #[arg(long = "out", visible_alias = "artifacts", default_value = "out", global = true)]
    pub out: Utf8PathBuf,
    /// The named target to build for (see `cargo xtask target`); the active target, or the
    /// manifest's `default` preset, when not given.
    #[arg(short, long, global = true)]
    pub target: Option<String>,
}

#[derive(Debug, Args)]
pub struct PackageArgs {
    #[command(flatten)]
    pub manifest: ManifestArgs,
    /// Only these packages, and the packages they are composed of.
    #[arg(long, num_args = 1.., value_name = "PACKAGE")]
    pub only: Vec<String>,
    /// Rebuild every output even where the cache says it is up to date.
    #[arg(long)]
    pub disable_cache: bool,
    /// Do not run cargo: package the binaries already built.
    #[arg(long)]
    pub no_rebuild: bool,
    /// Print the plan (cargo commands, every output with its inputs, cache hit or miss) and
    /// write nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// How many packages are assembled at once; the number of CPUs when not given.
    #[arg(short, long)]
    pub jobs: Option<usize>,
    /// How many times a download is retried before the package fails.
    #[arg(long, default_value_t = 3)]
    pub retry_count: u32,
    /// Seconds to wait between download retries.
    #[arg(long, default_value_t = 1.0)]
    pub retry_duration: f64,
}

#[derive(Debug, Args)]
pub struct StampArgs {
    #[command(flatten)]
    pub manifest: ManifestArgs,
    /// The package to stamp.
    pub package: String,
    /// The version to stamp it with (semver).
    #[arg(value_name = "VERSION")]
    pub semver: String,
}

#[derive(Debug, Args)]
pub struct TargetArgs {
    #[command(flatten)]
    pub manifest: ManifestArgs,
    #[command(subcommand)]
    pub command: TargetCommand,
}

#[derive(Debug, Subcommand)]
pub enum TargetCommand {
    /// Create (or replace) a named target from a preset and `key=value` overrides.
    Create {
        /// The name of the target.
        name: String,
        /// The `[target.preset.<name>]` of the manifest to start from.
        #[arg(short, long)]
        preset: Option<String>,
        /// `key=value` pairs that override the preset.
        #[arg(short = 'i', long = "image", value_name = "KEY=VALUE", num_args = 1..)]
        values: Vec<String>,
    },
    /// List the named targets; the active one is marked.
    List,
    /// Make a named target the active one.
    Set {
        /// The name of the target.
        name: String,
    },
    /// Delete a named target.
    Delete {
        /// The name of the target.
        name: String,
    },
}

#[derive(Debug, Args)]
pub struct HooksArgs {
    #[command(subcommand)]
    pub command: HooksCommand,
}

#[derive(Debug, Subcommand)]
pub enum HooksCommand {
    /// Install a pre-commit hook that runs the fast checks (fmt, clippy).
    Install,
    /// Remove the pre-commit hook installed by `hooks install`.
    Uninstall,
}

#[derive(Debug, Args)]
pub struct CompletionsArgs {
    /// The shell to generate completions for.
    pub shell: clap_complete::Shell,
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub command: BenchCommand,
}

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// A no-op `cargo xtask package` next to a no-op `cargo build --release` of the same
    /// binaries.
    NoopPackage {
        /// How many runs of each to time.
        #[arg(long, default_value_t = 10)]
        runs: u32,
    },
    /// Archive a large payload with the project's writer next to `tar -czf` and
    /// `tar -cf - | gzip -1`.
    Archive {
        /// Approximate payload size in MB, gathered from this machine's shared libraries and
        /// documentation.
        #[arg(long, default_value_t = 400)]
        size_mb: u64,
        /// How many interleaved rounds of every measurement; the table shows medians.
        #[arg(long, default_value_t = 3)]
        rounds: u32,
        /// Also measure the alternatives: other gzip levels, one thread, and the deflate
        /// backends on a sample of the payload.
        #[arg(long)]
        full: bool,
    },
}

#[derive(Debug, Args)]
pub struct TestbedArgs {
    #[command(subcommand)]
    pub command: TestbedCommand,
}

#[derive(Debug, Subcommand)]
pub enum TestbedCommand {
    /// Install what the testbed needs with apt (as root), or print the command to run.
    Prereqs,
    /// Build the node image if needed, then boot a testbed of N nodes.
    Up {
        /// How many nodes to boot.
        #[arg(long, default_value_t = 3)]
        nodes: u32,
        /// The testbed's name; several testbeds with different names can run at once.
        #[arg(long, default_value = "default")]
        name: String,
    },
    /// Show the nodes of a testbed, their addresses and whether sshd answers.
    Status {
        /// The testbed's name.
        #[arg(long, default_value = "default")]
        name: String,
    },
    /// Open an ssh session on a node, or run a command there.
    Ssh {
        /// The testbed's name.
        #[arg(long, default_value = "default")]
        name: String,
        /// The node, for example `node1`.
        node: String,
        /// The command to run; an interactive shell when empty.
        #[arg(last = true)]
        command: Vec<String>,
    },
    /// Tear a testbed down, leaving nothing behind.
    Down {
        /// The testbed's name.
        #[arg(long, default_value = "default", conflicts_with = "all")]
        name: String,
        /// Tear down every testbed this project created, including the remains of crashed runs.
        #[arg(long)]
        all: bool,
    },
}

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

/// Where and how releases are installed on this machine.
#[derive(Debug, Args, Clone)]
pub struct HostArgs {
    /// The installation prefix.
    #[arg(long, default_value = installer::DEFAULT_PREFIX)]
    pub prefix: Utf8PathBuf,
    /// The prefix the packages were built for (their zone root is `root<prefix>`); the
    /// installation prefix when not given.
    #[arg(long)]
    pub packages_prefix: Option<installer::Prefix>,
    /// Where systemd unit files are written.
    #[arg(long, default_value = installer::manager::DEFAULT_UNIT_DIR)]
    pub unit_dir: Utf8PathBuf,
    /// The service manager; detected when not given.
    #[arg(long, value_parser = ["systemd", "smf"])]
    pub service_manager: Option<String>,
    /// How many releases to keep, the active one included.
    #[arg(long, default_value_t = 3)]
    pub keep: usize,
    /// Seconds to wait for another install on this machine to finish.
    #[arg(long, default_value_t = 0)]
    pub lock_wait: u64,
}

#[derive(Debug, Args)]
pub struct InstallArgs {
    #[command(flatten)]
    pub host: HostArgs,
    /// The directory with the packages and `digests.b3`.
    #[arg(long, default_value = "out")]
    pub packages: Utf8PathBuf,
    /// This machine's overlay: files under `opt/flotilla/<service>/`, placed into the release
    /// before any service starts.
    #[arg(long)]
    pub overlay: Option<Utf8PathBuf>,
    /// Create the users and groups the services declare when this machine lacks them.
    #[arg(long)]
    pub create_users: bool,
}

#[derive(Debug, Args)]
pub struct RollbackArgs {
    #[command(flatten)]
    pub host: HostArgs,
    /// The release to activate; the previous one when not given.
    #[arg(long)]
    pub to: Option<String>,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub host: HostArgs,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct UninstallArgs {
    #[command(flatten)]
    pub host: HostArgs,
    /// Remove the services' data directory too.
    #[arg(long)]
    pub purge: bool,
}
