//! `package`, `list-outputs`, `check`, `clean`, `stamp`, `dot` and `target`.
//!
//! Each command loads the manifest and target, asks the library for a plan and either prints it
//! or executes it. Every process (cargo) runs here, through xshell.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use camino::{Utf8Path, Utf8PathBuf};
use flotilla_package::build::{self, CacheMode, CargoRunner, ExecuteConfig, Outcome, Rebuild};
use flotilla_package::manifest::{
    Manifest, PackageName, PackageSource, Target, TargetName, TargetOrigin, TargetStore,
};
use flotilla_package::plan::{self, CargoBuild, Plan, PlanConfig, Workspace};
use flotilla_package::{cargo_stamp, Retry};
use xshell::{cmd, Shell};

use crate::progress::{human_size, TermProgress};
use crate::{cli, Context};

/// The manifest, where outputs go and the target, as every command needs them.
struct Loaded {
    manifest: Manifest,
    /// The manifest's directory: cargo runs there, so it builds the workspace that holds the
    /// manifest, whichever workspace's `cargo xtask` reads it.
    dir: Utf8PathBuf,
    out: Utf8PathBuf,
    target: Target,
    origin: TargetOrigin,
}

fn load(ctx: &Context, args: &cli::ManifestArgs) -> anyhow::Result<Loaded> {
    let path = ctx.user_path(args.manifest());
    let manifest = Manifest::load(&path)?;
    let dir = path.parent().map_or_else(|| ctx.user_path(Utf8Path::new(".")), Utf8Path::to_owned);
    let dir = if dir.as_str().is_empty() { ctx.user_path(Utf8Path::new(".")) } else { dir };
    let out = ctx.user_path(args.out());
    let name = match &args.target {
        Some(name) => Some(TargetName::new(name.as_str()).map_err(anyhow::Error::msg)?),
        None => None,
    };
    let (target, origin) = TargetStore::new(&out).resolve(&manifest, name.as_ref())?;
    Ok(Loaded { manifest, dir, out, target, origin })
}

pub fn package(sh: &Shell, ctx: &Context, args: cli::PackageArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    let loaded = load(ctx, &args.manifest)?;
    let _in_workspace = sh.push_dir(&loaded.dir);
    let only = parse_names(&args.only)?;
    // A fresh stamp answers for both `cargo metadata` and the nested `cargo build` (see the
    // library's cargo_stamp module): a no-op run then costs little more than its own start.
    let env = cargo_stamp::env_digest();
    let stamped = if args.no_rebuild { None } else { cargo_stamp::fresh(&loaded.out, &env) };
    let has_rust = has_rust(&loaded);
    let (workspace, extra) = match &stamped {
        Some((workspace, _)) => (workspace.clone(), Vec::new()),
        None => workspace_of(sh, &loaded)?,
    };
    let plan = plan::plan(&PlanConfig {
        manifest: &loaded.manifest,
        target: &loaded.target,
        workspace: &workspace,
        out_dir: &loaded.out,
        only: &only,
    })?;
    let planned: Vec<Vec<String>> = plan.cargo_builds.iter().map(CargoBuild::args).collect();
    let cargo_is_fresh = stamped.as_ref().is_some_and(|(_, builds)| *builds == planned);
    if args.dry_run {
        let status = build::cache_status(&plan, &loaded.out);
        println!("{}", plan.render(&status).trim_end());
        return Ok(());
    }
    eprintln!("packaging for {} ({})", loaded.origin, loaded.target);
    let jobs =
        args.jobs.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let retry_delay = flotilla_package::RetryDuration::new(args.retry_duration)
        .map_err(|e| anyhow::anyhow!("--retry-duration {e}"))?;
    let config = ExecuteConfig {
        plan: &plan,
        out_dir: &loaded.out,
        jobs,
        cache: if args.disable_cache { CacheMode::Disabled } else { CacheMode::Enabled },
        rebuild: if args.no_rebuild || cargo_is_fresh { Rebuild::No } else { Rebuild::Cargo },
        mtime: flotilla_package::archive::source_date_epoch()?,
        retry: Retry {
            count: args.retry_count,
            delay: Duration::from_secs_f64(retry_delay.seconds()),
        },
    };
    if cargo_is_fresh {
        eprintln!("[cargo] binaries up to date (no source, manifest or toolchain changed)");
    }
    let progress = TermProgress::new();
    let report = build::execute(&config, &XshellCargo { sh }, &progress)?;
    if config.rebuild == Rebuild::Cargo && has_rust {
        // A stamp is written only from a fresh `cargo metadata` and a successful build.
        let extra = if stamped.is_some() { cargo_metadata(sh)?.1 } else { extra };
        cargo_stamp::record(&loaded.out, &workspace, &plan.cargo_builds, &extra, &env)?;
    }
    print_summary(&plan, &report, started.elapsed());
    if !report.failed.is_empty() {
        for (name, message) in &report.failed {
            eprintln!("error: package {name}: {message}");
        }
        bail!("{} of {} packages failed", report.failed.len(), plan.outputs.len());
    }
    Ok(())
}

fn print_summary(plan: &Plan, report: &build::BuildReport, elapsed: Duration) {
    println!("{:<40} {:>10}  {:<12}  {:<7} {:>7}", "OUTPUT", "SIZE", "BLAKE3", "STATUS", "TIME");
    for r in &report.outputs {
        let file = r.path.file_name().unwrap_or("");
        let status = match r.outcome {
            Outcome::Built => "built",
            Outcome::Cached => "cached",
            Outcome::Fetched => "fetched",
            Outcome::Manual => "manual",
        };
        let note = if plan.outputs[&r.package].intermediate_only { " (intermediate)" } else { "" };
        println!(
            "{:<40} {:>10}  {:<12}  {:<7} {:>6.2}s{note}",
            file,
            human_size(r.size),
            &r.blake3[..12.min(r.blake3.len())],
            status,
            r.elapsed.as_secs_f64(),
        );
    }
    for (name, _) in &report.failed {
        println!("{:<40} {:>10}  {:<12}  {:<7}", plan.outputs[name].file_name, "-", "-", "FAILED");
    }
    println!("{} outputs in {:.2}s", report.outputs.len(), elapsed.as_secs_f64());
}

pub fn list_outputs(_sh: &Shell, ctx: &Context, args: cli::ListOutputsArgs) -> anyhow::Result<()> {
    let loaded = load(ctx, &args.manifest)?;
    for (name, pkg) in &loaded.manifest.packages {
        if loaded.target.includes(pkg.only_for_targets.as_ref())
            && (args.intermediate || !pkg.is_intermediate_only())
        {
            println!("{}", loaded.out.join(pkg.output_file(name)));
        }
    }
    Ok(())
}

pub fn check(sh: &Shell, ctx: &Context, args: cli::ManifestArgs) -> anyhow::Result<()> {
    let loaded = load(ctx, &args)?;
    let _in_workspace = sh.push_dir(&loaded.dir);
    let crates: BTreeSet<String> = loaded
        .manifest
        .packages
        .iter()
        .filter(|(_, p)| loaded.target.includes(p.only_for_targets.as_ref()) && p.rust().is_some())
        .map(|(n, _)| n.to_string())
        .collect();
    if crates.is_empty() {
        println!("the manifest is valid; no rust package to check");
        return Ok(());
    }
    let packages: Vec<String> =
        crates.iter().flat_map(|c| ["--package".to_owned(), c.clone()]).collect();
    let cargo = crate::workflow::cargo();
    scrub(cmd!(sh, "{cargo} check {packages...}")).run().with_context(|| {
        format!("cargo check of {}", crates.into_iter().collect::<Vec<_>>().join(", "))
    })?;
    Ok(())
}

pub fn clean(_sh: &Shell, ctx: &Context, args: cli::ManifestArgs) -> anyhow::Result<()> {
    let out = ctx.user_path(args.out());
    let entries = match std::fs::read_dir(&out) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            println!("{out} does not exist; nothing to clean");
            return Ok(());
        }
        Err(e) => return Err(e).with_context(|| format!("list {out}")),
    };
    // Named targets are configuration, not build output: they survive a clean.
    for entry in entries {
        let entry = entry.with_context(|| format!("list {out}"))?;
        if entry.file_name() == "target" {
            continue;
        }
        let path = entry.path();
        let result = if entry.file_type()?.is_dir() {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
        result.with_context(|| format!("remove {}", path.display()))?;
    }
    println!("removed the outputs, cache records and downloads under {out}");
    Ok(())
}

pub fn stamp(sh: &Shell, ctx: &Context, args: cli::StampArgs) -> anyhow::Result<()> {
    let loaded = load(ctx, &args.manifest)?;
    let name = PackageName::new(args.package.as_str()).map_err(anyhow::Error::msg)?;
    let version = semver::Version::parse(&args.semver)
        .with_context(|| format!("stamp {name}: `{}` is not a semver version", args.semver))?;
    let _in_workspace = sh.push_dir(&loaded.dir);
    let (workspace, _) = workspace_of(sh, &loaded)?;
    let plan = plan::plan(&PlanConfig {
        manifest: &loaded.manifest,
        target: &loaded.target,
        workspace: &workspace,
        out_dir: &loaded.out,
        only: std::slice::from_ref(&name),
    })?;
    let mtime = flotilla_package::archive::source_date_epoch()?;
    let summary = build::stamp(&plan.outputs[&name], &loaded.out, &version, mtime)?;
    println!("{}  {}", summary.blake3, summary.path);
    Ok(())
}

pub fn dot(_sh: &Shell, ctx: &Context, args: cli::ManifestArgs) -> anyhow::Result<()> {
    let loaded = load(ctx, &args)?;
    let m = &loaded.manifest;
    println!("digraph packages {{");
    println!("  rankdir=LR;");
    for (name, pkg) in &m.packages {
        if !loaded.target.includes(pkg.only_for_targets.as_ref()) {
            continue;
        }
        let shape = match pkg.source {
            PackageSource::Composite { .. } => "box3d",
            PackageSource::Prebuilt { .. } => "cylinder",
            PackageSource::Manual {} => "note",
            PackageSource::Local { .. } => "box",
        };
        println!("  \"{name}\" [shape={shape}, label=\"{}\"];", pkg.output_file(name));
        if let Some(rust) = pkg.rust() {
            for bin in &rust.binary_names {
                println!("  \"bin:{bin}\" [shape=ellipse, label=\"{bin}\"];");
                println!("  \"bin:{bin}\" -> \"{name}\";");
            }
        }
        for component in m.components(name) {
            println!("  \"{component}\" -> \"{name}\";");
        }
    }
    println!("}}");
    Ok(())
}

/// `show-cargo-commands`: the cargo command lines of the plan, as `package` would run them
/// (in the manifest's directory, with cargo's own variables removed from the environment).
pub fn show_cargo_commands(
    sh: &Shell,
    ctx: &Context,
    args: cli::ManifestArgs,
) -> anyhow::Result<()> {
    let loaded = load(ctx, &args)?;
    let _in_workspace = sh.push_dir(&loaded.dir);
    let (workspace, _) = workspace_of(sh, &loaded)?;
    let plan = plan::plan(&PlanConfig {
        manifest: &loaded.manifest,
        target: &loaded.target,
        workspace: &workspace,
        out_dir: &loaded.out,
        only: &[],
    })?;
    if plan.cargo_builds.is_empty() {
        eprintln!("no cargo build: no package of target {} builds Rust", loaded.target);
    }
    for build in &plan.cargo_builds {
        let words: Vec<String> =
            build.args().iter().map(|w| flotilla_fling::quote::quote(w)).collect();
        println!("{}: cargo {}", build.profile(), words.join(" "));
    }
    Ok(())
}

pub fn target(_sh: &Shell, ctx: &Context, args: cli::TargetArgs) -> anyhow::Result<()> {
    let scope: cli::ManifestArgs = args.scope.into();
    let manifest = Manifest::load(&ctx.user_path(scope.manifest()))?;
    let store = TargetStore::new(&ctx.user_path(scope.out()));
    let parse = |n: &str| TargetName::new(n).map_err(anyhow::Error::msg);
    // The name: the one given with the command, else `-t`'s; both must agree.
    let named = |given: Option<String>, default: Option<&str>| -> anyhow::Result<TargetName> {
        let name = match (given, &scope.target) {
            (Some(a), Some(b)) if &a != b => {
                bail!("the target is named twice, `{a}` and `-t {b}`: name it once")
            }
            (Some(a), _) => a,
            (None, Some(b)) => b.clone(),
            (None, None) => match default {
                Some(d) => d.to_owned(),
                None => bail!("name the target: `target <command> NAME` or `-t NAME`"),
            },
        };
        parse(&name)
    };
    match args.command {
        cli::TargetCommand::Create { words, preset, omicron } => {
            // `[NAME] [KEY=VALUE]...`: a first word without `=` is the name.
            let (name, pairs) = match words.split_first() {
                Some((first, rest)) if !first.contains('=') => (Some(first.clone()), rest),
                _ => (None, &words[..]),
            };
            // omicron names the target `default` when no `-t` is given.
            let name = named(name, Some("default"))?;
            let flags =
                omicron.pairs().map_err(|e| anyhow::anyhow!("target create {name}: {e}"))?;
            let pairs = Target::parse_pairs(pairs.iter().map(String::as_str))
                .map_err(|e| anyhow::anyhow!("target create {name}: {e}"))?;
            let overrides = Target::from_pairs(flags.into_iter().chain(pairs.pairs().clone()));
            let target = store.create(&manifest, &name, preset.as_deref(), &overrides)?;
            println!("created target {name} ({target}) and made it active");
        }
        cli::TargetCommand::List => {
            let active = store.active()?;
            let targets = store.list()?;
            if targets.is_empty() {
                let fallback = if manifest.presets.contains_key("default") {
                    "the manifest's default preset"
                } else {
                    "the empty target"
                };
                println!("no named targets; builds use {fallback}");
            }
            for (name, target) in targets {
                let mark = if active.as_ref() == Some(&name) { "*" } else { " " };
                println!("{mark} {name}: {target}");
            }
        }
        cli::TargetCommand::Set { name } => {
            let name = named(name, None)?;
            store.set_active(&name)?;
            println!("target {name} is now active");
        }
        cli::TargetCommand::Delete { name } => {
            let name = named(name, None)?;
            store.delete(&name)?;
            println!("deleted target {name}");
        }
    }
    Ok(())
}

fn parse_names(names: &[String]) -> anyhow::Result<Vec<PackageName>> {
    names
        .iter()
        .map(|n| PackageName::new(n.as_str()).map_err(|e| anyhow::anyhow!("--only {n}: {e}")))
        .collect()
}

/// Runs planned cargo builds through xshell with cargo's variables scrubbed.
struct XshellCargo<'a> {
    sh: &'a Shell,
}

impl CargoRunner for XshellCargo<'_> {
    fn run(&self, build: &CargoBuild) -> Result<(), String> {
        let cargo = crate::workflow::cargo();
        let args = build.args();
        scrub(cmd!(self.sh, "{cargo} {args...}")).run().map_err(|e| e.to_string())
    }
}

/// Removes the `CARGO_*` variables cargo sets for the process it runs; see
/// `cargo_stamp::is_set_by_cargo` for which and why.
fn scrub(mut cmd: xshell::Cmd<'_>) -> xshell::Cmd<'_> {
    for (key, _) in std::env::vars_os() {
        let Some(key) = key.to_str() else { continue };
        if cargo_stamp::is_set_by_cargo(key) {
            cmd = cmd.env_remove(key);
        }
    }
    cmd
}

fn has_rust(loaded: &Loaded) -> bool {
    loaded.manifest.packages.values().any(|p| p.rust().is_some())
}

/// The cargo workspace around the manifest (see [`cargo_metadata`]); a manifest that builds
/// nothing with cargo needs none, and gets an empty one without asking cargo.
fn workspace_of(sh: &Shell, loaded: &Loaded) -> anyhow::Result<(Workspace, Vec<Utf8PathBuf>)> {
    if !has_rust(loaded) {
        let empty = Workspace { target_dir: loaded.dir.join("target"), crates: BTreeMap::new() };
        return Ok((empty, Vec::new()));
    }
    cargo_metadata(sh)
}

/// The workspace's target directory and each crate's binaries, from `cargo metadata`, with the
/// files besides sources that a cargo build reads (for the stamp).
fn cargo_metadata(sh: &Shell) -> anyhow::Result<(Workspace, Vec<Utf8PathBuf>)> {
    #[derive(serde::Deserialize)]
    struct Metadata {
        target_directory: Utf8PathBuf,
        workspace_root: Utf8PathBuf,
        packages: Vec<MetaPackage>,
    }
    #[derive(serde::Deserialize)]
    struct MetaPackage {
        name: String,
        manifest_path: Utf8PathBuf,
        targets: Vec<MetaTarget>,
    }
    #[derive(serde::Deserialize)]
    struct MetaTarget {
        name: String,
        kind: Vec<String>,
    }
    let cargo = crate::workflow::cargo();
    let json = scrub(cmd!(sh, "{cargo} metadata --format-version 1 --no-deps"))
        .quiet()
        .read()
        .with_context(|| {
            format!(
                "read the workspace layout with cargo metadata in {} (the manifest's directory)",
                sh.current_dir().display()
            )
        })?;
    let meta: Metadata = serde_json::from_str(&json).context("parse cargo metadata output")?;
    let root = &meta.workspace_root;
    let mut extra: Vec<Utf8PathBuf> = vec![root.join("Cargo.toml"), root.join("Cargo.lock")];
    extra.extend(meta.packages.iter().map(|p| p.manifest_path.clone()));
    // Cargo reads configuration from every ancestor directory and from CARGO_HOME; the
    // toolchain is chosen by rust-toolchain files and is identified by its binaries.
    for dir in root.ancestors() {
        for name in [".cargo/config.toml", ".cargo/config", "rust-toolchain", "rust-toolchain.toml"]
        {
            extra.push(dir.join(name));
        }
    }
    if let Some(home) = std::env::var_os("CARGO_HOME").or_else(|| {
        std::env::var_os("HOME").map(|h| std::path::PathBuf::from(h).join(".cargo").into())
    }) {
        if let Ok(home) = Utf8PathBuf::try_from(std::path::PathBuf::from(home)) {
            extra.extend([home.join("config.toml"), home.join("config")]);
        }
    }
    if let Ok(cargo_bin) = which(&cargo) {
        extra.push(cargo_bin.with_file_name("rustc"));
        extra.push(cargo_bin);
    }
    let crates: BTreeMap<String, BTreeSet<String>> = meta
        .packages
        .into_iter()
        .map(|p| {
            let bins =
                p.targets.into_iter().filter(|t| t.kind.iter().any(|k| k == "bin")).map(|t| t.name);
            (p.name, bins.collect())
        })
        .collect();
    Ok((Workspace { target_dir: meta.target_directory, crates }, extra))
}

/// The absolute path of a program, as the shell would find it.
fn which(program: &str) -> anyhow::Result<Utf8PathBuf> {
    let path = Utf8Path::new(program);
    if path.is_absolute() {
        return Ok(path.to_owned());
    }
    let dirs = std::env::var("PATH").unwrap_or_default();
    for dir in dirs.split(':') {
        let candidate = Utf8Path::new(dir).join(program);
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    bail!("{program} is not on PATH")
}
