//! The command line, as clap types only. Each command's module converts these into the
//! configuration structs of the library that does the work.

use camino::Utf8PathBuf;
use clap::{Args, Parser, Subcommand};

mod fling;
pub use fling::*;

/// Build, package and deploy the workspace's services.
#[derive(Debug, Parser)]
#[command(name = "cargo xtask", bin_name = "cargo xtask", version, propagate_version = true)]
pub struct Cli {
    #[command(flatten)]
    pub globals: Globals,
    #[command(subcommand)]
    pub command: Command,
}

impl Command {
    /// The command with the options given before it ([`Globals`]) merged into its own; only
    /// the packaging commands take them.
    pub fn with_globals(self, globals: &Globals) -> Result<Command, String> {
        let merge = |args: ManifestArgs| args.with_globals(globals);
        Ok(match self {
            Command::Package(mut a) => {
                a.manifest = merge(a.manifest)?;
                Command::Package(a)
            }
            Command::ListOutputs(mut a) => {
                a.manifest = merge(a.manifest)?;
                Command::ListOutputs(a)
            }
            Command::ShowCargoCommands(a) => Command::ShowCargoCommands(merge(a)?),
            Command::Check(a) => Command::Check(merge(a)?),
            Command::Clean(a) => Command::Clean(merge(a)?),
            Command::Dot(a) => Command::Dot(merge(a)?),
            Command::Stamp(mut a) => {
                a.manifest = merge(a.manifest)?;
                Command::Stamp(a)
            }
            Command::Target(mut a) => {
                let merged = merge(a.scope.clone().into())?;
                a.scope = TargetScope {
                    manifest: merged.manifest,
                    out: merged.out,
                    target: merged.target,
                };
                Command::Target(a)
            }
            other => {
                if globals.manifest.is_some() || globals.out.is_some() || globals.target.is_some() {
                    return Err("-m/--manifest, --out/--artifacts and -t/--target before the \
                                command apply to the packaging commands only (package, \
                                list-outputs, show-cargo-commands, check, clean, stamp, dot, \
                                target)"
                        .into());
                }
                other
            }
        })
    }
}

/// `-m`, `-t` and `--artifacts` before the command, as omicron-package takes them
/// (`cargo xtask -t dev package`); the packaging commands take them after it too.
#[derive(Debug, Args, Clone, Default, PartialEq, Eq)]
pub struct Globals {
    // Ids of their own: clap hands a subcommand's global value up to a parent argument of the
    // same id, which would hide the same option given twice.
    /// The package manifest [default: package-manifest.toml].
    #[arg(id = "globals_manifest", short = 'm', long = "manifest", value_name = "MANIFEST")]
    pub manifest: Option<Utf8PathBuf>,
    /// The directory that receives the packages [default: out].
    #[arg(id = "globals_out", long = "out", visible_alias = "artifacts", value_name = "OUT")]
    pub out: Option<Utf8PathBuf>,
    /// The named target to build for (see `cargo xtask target`).
    #[arg(id = "globals_target", short = 't', long = "target", value_name = "TARGET")]
    pub target: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Build the services once, then write one cached, deterministic archive per package
    /// [runs on: this machine].
    Package(PackageArgs),
    /// Print the path of every output the manifest describes for the active target
    /// (intermediate ones with `--intermediate`).
    ListOutputs(ListOutputsArgs),
    /// Print the cargo command lines `package` would run for the active target.
    ShowCargoCommands(ManifestArgs),
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
#[derive(Debug, Args, Clone, Default)]
pub struct ManifestArgs {
    /// The package manifest [default: package-manifest.toml].
    #[arg(short, long, global = true)]
    pub manifest: Option<Utf8PathBuf>,
    /// The directory that receives the packages [default: out].
    #[arg(long = "out", visible_alias = "artifacts", global = true)]
    pub out: Option<Utf8PathBuf>,
    /// The named target to build for (see `cargo xtask target`); the active target, or the
    /// manifest's `default` preset, when not given.
    #[arg(short, long, global = true)]
    pub target: Option<String>,
}

impl ManifestArgs {
    /// The manifest's path, given or the default.
    pub fn manifest(&self) -> &camino::Utf8Path {
        self.manifest.as_deref().unwrap_or("package-manifest.toml".into())
    }

    /// The outputs directory, given or the default.
    pub fn out(&self) -> &camino::Utf8Path {
        self.out.as_deref().unwrap_or("out".into())
    }

    /// These arguments with the ones given before the command filled in; the same option
    /// given in both places with different values is an error.
    pub fn with_globals(mut self, globals: &Globals) -> Result<ManifestArgs, String> {
        self.manifest = before_or_after("--manifest", &globals.manifest, self.manifest.take())?;
        self.out = before_or_after("--out/--artifacts", &globals.out, self.out.take())?;
        self.target = before_or_after("--target", &globals.target, self.target.take())?;
        Ok(self)
    }
}

/// An option given before the command, after it, or in both places with the same value; two
/// different values are an error. (omicron-package and thing-flinger take their options
/// before the command, flotilla after it: both places work.)
pub fn before_or_after<T: PartialEq + Clone + std::fmt::Display>(
    flag: &str,
    before: &Option<T>,
    after: Option<T>,
) -> Result<Option<T>, String> {
    match (before, after) {
        (Some(a), Some(b)) if *a != b => Err(format!(
            "{flag} is given before the command ({a}) and after it ({b}): give it once"
        )),
        (Some(a), _) => Ok(Some(a.clone())),
        (None, b) => Ok(b),
    }
}

#[derive(Debug, Args)]
pub struct ListOutputsArgs {
    #[command(flatten)]
    pub manifest: ManifestArgs,
    /// List the intermediate packages too (`output.intermediate_only`: parts of composite
    /// packages, never deployed themselves).
    #[arg(long)]
    pub intermediate: bool,
}

#[derive(Debug, Args)]
pub struct PackageArgs {
    #[command(flatten)]
    pub manifest: ManifestArgs,
    /// Only these packages, and the packages they are composed of.
    #[arg(long, num_args = 1.., value_name = "PACKAGE")]
    pub only: Vec<String>,
    /// Rebuild every output even where the cache says it is up to date.
    #[arg(short, long)]
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
    pub scope: TargetScope,
    #[command(subcommand)]
    pub command: TargetCommand,
}

/// [`ManifestArgs`] for `target`, whose `create` takes `-m` as omicron's `--machine`: the
/// manifest is `--manifest` here (or `-m` before `target`).
#[derive(Debug, Args, Clone)]
pub struct TargetScope {
    /// The package manifest [default: package-manifest.toml].
    #[arg(long, global = true)]
    pub manifest: Option<Utf8PathBuf>,
    /// The directory that holds the targets (`<out>/target/`) [default: out].
    #[arg(long = "out", visible_alias = "artifacts", global = true)]
    pub out: Option<Utf8PathBuf>,
    /// The target's name, as omicron-package takes it (`-t <name> target create ...`).
    #[arg(short, long, global = true)]
    pub target: Option<String>,
}

impl From<TargetScope> for ManifestArgs {
    fn from(scope: TargetScope) -> ManifestArgs {
        ManifestArgs { manifest: scope.manifest, out: scope.out, target: scope.target }
    }
}

#[derive(Debug, Subcommand)]
pub enum TargetCommand {
    /// Create (or replace) a named target and make it active: from a preset, omicron's target
    /// flags (`-i standard -m non-gimlet -s stub -r multi-sled`, with omicron's defaults and
    /// checks) and `key=value` pairs, later ones overriding earlier ones.
    Create {
        /// `[NAME] [KEY=VALUE]...`: the name (else `-t`'s, else `default`, as in omicron), then
        /// the pairs.
        #[arg(value_name = "NAME|KEY=VALUE")]
        words: Vec<String>,
        /// The `[target.preset.<name>]` of the manifest to start from.
        #[arg(short, long)]
        preset: Option<String>,
        #[command(flatten)]
        omicron: OmicronTarget,
    },
    /// List the named targets; the active one is marked.
    List,
    /// Make a named target the active one.
    Set {
        /// The name of the target (else `-t`'s).
        name: Option<String>,
    },
    /// Delete a named target.
    Delete {
        /// The name of the target (else `-t`'s).
        name: Option<String>,
    },
}

/// omicron-package's target keys, one short flag each.
#[derive(Debug, Args, Clone, Default, PartialEq, Eq)]
pub struct OmicronTarget {
    /// The kind of OS image (omicron's `image`) [default with any of these flags: standard].
    #[arg(short, long, value_parser = ["standard", "trampoline"])]
    pub image: Option<String>,
    /// The machine (omicron's `machine`) [default for a standard image: non-gimlet].
    #[arg(short, long, value_parser = ["gimlet", "gimlet-standalone", "non-gimlet"])]
    pub machine: Option<String>,
    /// The switch (omicron's `switch`) [default for a standard image: stub].
    #[arg(short, long, value_parser = ["asic", "stub", "softnpu"])]
    pub switch: Option<String>,
    /// The rack topology (omicron's `rack-topology`) [default: multi-sled].
    #[arg(short, long, value_parser = ["multi-sled", "single-sled"])]
    pub rack_topology: Option<String>,
    /// The ClickHouse topology (omicron's `clickhouse-topology`) [default: single-node].
    #[arg(short, long, value_parser = ["single-node", "replicated-cluster"])]
    pub clickhouse_topology: Option<String>,
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
        /// Also start an S3-compatible artifact store (SeaweedFS) on the testbed's bridge and
        /// name it in `[artifacts]` of the deployment configs, so deploys fetch through it.
        #[arg(long)]
        store: bool,
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
