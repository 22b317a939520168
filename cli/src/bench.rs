//! `cargo xtask bench`: the project measured against its baselines, side by side in one run.
//!
//! Every measurement is interleaved with its baseline (round 1 of each, then round 2 of each,
//! ...) so that load from anything else on the machine falls on both sides alike, and the
//! tables report medians.

use std::fs;
use std::io::Read;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use camino::{Utf8Path, Utf8PathBuf};
use flotilla_package::archive::{ArchiveOptions, ArchiveWriter, Compression, GZIP_LEVEL};
use xshell::{cmd, Shell};

use crate::cli::{BenchArgs, BenchCommand};
use crate::Context;

pub fn run(sh: &Shell, ctx: &Context, args: BenchArgs) -> anyhow::Result<()> {
    match args.command {
        BenchCommand::Archive { size_mb, rounds, full } => archive(sh, ctx, size_mb, rounds, full),
        BenchCommand::NoopPackage { runs } => noop_package(sh, ctx, runs),
    }
}

/// One row of a results table: a name and its timed runs.
struct Row {
    name: String,
    times: Vec<Duration>,
    size: u64,
}

impl Row {
    fn new(name: impl Into<String>) -> Row {
        Row { name: name.into(), times: Vec::new(), size: 0 }
    }

    fn median(&self) -> Duration {
        let mut times = self.times.clone();
        times.sort();
        times[times.len() / 2]
    }
}

/// A directory under `target/` that is removed when the benchmark ends, even on error.
struct WorkDir(Utf8PathBuf);

impl WorkDir {
    fn new(ctx: &Context, name: &str) -> anyhow::Result<WorkDir> {
        let path = ctx.root().join("target").join(format!("{name}-{}", std::process::id()));
        fs::create_dir_all(&path).with_context(|| format!("create {path}"))?;
        Ok(WorkDir(path))
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// What one way of archiving the payload does.
enum Method {
    TarGzip,
    TarPipeGzip1,
    Flotilla { threads: usize, level: u32 },
}

fn archive(sh: &Shell, ctx: &Context, size_mb: u64, rounds: u32, full: bool) -> anyhow::Result<()> {
    if rounds == 0 {
        bail!("bench archive: --rounds must be at least 1");
    }
    let work = WorkDir::new(ctx, "bench-archive")?;
    let files = gather_payload(size_mb * 1_000_000)?;
    let total: u64 = files.iter().map(|(_, len)| len).sum();
    let list = work.0.join("files.txt");
    let mut text = String::new();
    for (path, _) in &files {
        text.push_str(path.as_str().trim_start_matches('/'));
        text.push('\n');
    }
    fs::write(&list, text).with_context(|| format!("write {list}"))?;
    eprintln!(
        "payload: {} files, {:.0} MB (shared libraries and /usr/share/doc); reading it once so every run starts from a warm page cache",
        files.len(),
        mb(total)
    );
    for (path, _) in &files {
        let mut file = fs::File::open(path).with_context(|| format!("open {path}"))?;
        std::io::copy(&mut file, &mut std::io::sink()).with_context(|| format!("read {path}"))?;
    }

    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut methods = vec![
        ("tar -czf".to_owned(), Method::TarGzip),
        ("tar -cf - | gzip -1".to_owned(), Method::TarPipeGzip1),
        (
            format!("flotilla, level {GZIP_LEVEL}, {threads} threads"),
            Method::Flotilla { threads, level: GZIP_LEVEL },
        ),
    ];
    if full {
        methods.push((
            format!("flotilla, level {GZIP_LEVEL}, 1 thread"),
            Method::Flotilla { threads: 1, level: GZIP_LEVEL },
        ));
        for level in [1u32, 2, 3, 4, 6].into_iter().filter(|&l| l != GZIP_LEVEL) {
            methods.push((
                format!("flotilla, level {level}, {threads} threads"),
                Method::Flotilla { threads, level },
            ));
        }
    }
    let mut rows: Vec<Row> = methods.iter().map(|(name, _)| Row::new(name.clone())).collect();
    let mut digests: Vec<(String, String)> = Vec::new();
    for round in 1..=rounds {
        for ((name, method), row) in methods.iter().zip(&mut rows) {
            let out = work.0.join("out.tar.gz");
            let start = Instant::now();
            match method {
                Method::TarGzip => {
                    cmd!(sh, "tar -C / -czf {out} -T {list}").quiet().run()?;
                }
                Method::TarPipeGzip1 => {
                    // A fixed script: the paths reach it as positional parameters.
                    let script = r#"set -o pipefail; tar -C / -cf - -T "$1" | gzip -1 > "$2""#;
                    cmd!(sh, "bash -c {script} bench {list} {out}").quiet().run()?;
                }
                Method::Flotilla { threads, level } => {
                    let summary = flotilla_archive(&out, &files, *threads, *level)?;
                    digests.push((name.clone(), summary.blake3));
                }
            }
            row.times.push(start.elapsed());
            row.size = fs::metadata(&out).with_context(|| format!("stat {out}"))?.len();
            eprintln!("round {round}: {name}: {:.2} s", start.elapsed().as_secs_f64());
            fs::remove_file(&out).with_context(|| format!("remove {out}"))?;
        }
    }
    // The level-1 outputs must be the same bytes whatever the number of threads.
    let level1: Vec<&String> = digests
        .iter()
        .filter(|(name, _)| name.contains(&format!("level {GZIP_LEVEL},")))
        .map(|(_, d)| d)
        .collect();
    if level1.windows(2).any(|w| w[0] != w[1]) {
        bail!("bench archive: the outputs differ between runs or thread counts");
    }

    println!(
        "\npayload {} files, {:.0} MB; {rounds} interleaved rounds, median times; {threads} cores",
        files.len(),
        mb(total)
    );
    print_table(&rows, true);
    if full {
        println!();
        deflate_backends(&files)?;
    }
    Ok(())
}

fn print_table(rows: &[Row], sizes: bool) {
    let base = &rows[0];
    if sizes {
        println!(
            "{:<36} {:>9} {:>10} {:>9} {:>11}",
            "method", "time (s)", "size (MB)", "speed-up", "size ratio"
        );
    } else {
        println!("{:<92} {:>9} {:>7}", "command", "time (s)", "ratio");
    }
    for row in rows {
        let speedup = base.median().as_secs_f64() / row.median().as_secs_f64();
        if sizes {
            println!(
                "{:<36} {:>9.2} {:>10.1} {:>8.2}x {:>10.3}x",
                row.name,
                row.median().as_secs_f64(),
                mb(row.size),
                speedup,
                row.size as f64 / base.size as f64
            );
        } else {
            println!(
                "{:<92} {:>9.3} {:>6.2}x",
                row.name,
                row.median().as_secs_f64(),
                row.median().as_secs_f64() / base.median().as_secs_f64()
            );
        }
    }
}

fn mb(bytes: u64) -> f64 {
    bytes as f64 / 1e6
}

fn flotilla_archive(
    out: &Utf8Path,
    files: &[(Utf8PathBuf, u64)],
    threads: usize,
    level: u32,
) -> anyhow::Result<flotilla_package::archive::ArchiveSummary> {
    let opts = ArchiveOptions { compression: Compression::Gzip, mtime: 0, threads };
    let mut writer = ArchiveWriter::create_with_level(out, &opts, level)?;
    for (path, _) in files {
        writer.append_file(Utf8Path::new(path.as_str().trim_start_matches('/')), path)?;
    }
    Ok(writer.finish()?)
}

/// A deterministic selection of about `budget` bytes from this machine: the regular files of
/// /usr/share/doc (up to a third of the budget), then the largest shared libraries of
/// /usr/lib/x86_64-linux-gnu and /usr/lib, largest first, ties by path.
fn gather_payload(budget: u64) -> anyhow::Result<Vec<(Utf8PathBuf, u64)>> {
    let mut docs = Vec::new();
    walk_files(Utf8Path::new("/usr/share/doc"), true, &mut docs)?;
    docs.sort();
    let mut libs = Vec::new();
    for dir in ["/usr/lib/x86_64-linux-gnu", "/usr/lib"] {
        walk_files(Utf8Path::new(dir), false, &mut libs)?;
    }
    libs.retain(|(path, _)| path.file_name().is_some_and(|n| n.contains(".so")));
    libs.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    libs.dedup();

    let mut chosen = Vec::new();
    let mut total = 0;
    for (path, len) in docs {
        if total + len > budget / 3 {
            break;
        }
        total += len;
        chosen.push((path, len));
    }
    for (path, len) in libs {
        if total >= budget {
            break;
        }
        total += len;
        chosen.push((path, len));
    }
    if total < budget / 2 {
        bail!("bench archive: only {:.0} MB of libraries and documentation found", mb(total));
    }
    Ok(chosen)
}

/// Collects the regular files (not symlinks) under `dir`, recursively or not.
fn walk_files(
    dir: &Utf8Path,
    recursive: bool,
    out: &mut Vec<(Utf8PathBuf, u64)>,
) -> anyhow::Result<()> {
    let Ok(entries) = fs::read_dir(dir) else { return Ok(()) };
    for entry in entries {
        let entry = entry.with_context(|| format!("list {dir}"))?;
        let Ok(path) = Utf8PathBuf::try_from(entry.path()) else { continue };
        let meta = entry.metadata().with_context(|| format!("stat {path}"))?;
        if meta.is_file() && fs::File::open(&path).is_ok() {
            out.push((path, meta.len()));
        } else if meta.is_dir() && recursive {
            walk_files(&path, recursive, out)?;
        }
    }
    Ok(())
}

/// Single-thread throughput and ratio of each deflate backend and level on a sample of the
/// payload, to choose the backend and level.
fn deflate_backends(files: &[(Utf8PathBuf, u64)]) -> anyhow::Result<()> {
    const SAMPLE: usize = 64 << 20;
    // Every fourth file, so the sample mixes documentation and libraries like the payload.
    let mut sample = Vec::with_capacity(SAMPLE);
    for (path, _) in files.iter().step_by(4) {
        if sample.len() >= SAMPLE {
            break;
        }
        fs::File::open(path)
            .and_then(|f| f.take((SAMPLE - sample.len()) as u64).read_to_end(&mut sample))
            .with_context(|| format!("read {path}"))?;
    }
    println!(
        "deflate backends, one thread, {:.0} MB sample (one file in four of the payload)",
        mb(sample.len() as u64)
    );
    println!("{:<28} {:>9} {:>8} {:>7}", "backend", "MB/s", "ratio", "level");
    for level in [1u32, 2, 3, 6] {
        let start = Instant::now();
        let mut enc = flate2::write::DeflateEncoder::new(
            Vec::with_capacity(sample.len()),
            flate2::Compression::new(level),
        );
        std::io::Write::write_all(&mut enc, &sample)?;
        let out = enc.finish()?;
        report_backend("flate2 + zlib-rs", level, &sample, out.len(), start.elapsed());

        let start = Instant::now();
        let out = miniz_oxide::deflate::compress_to_vec(&sample, level as u8);
        report_backend("miniz_oxide", level, &sample, out.len(), start.elapsed());
    }
    Ok(())
}

fn report_backend(name: &str, level: u32, sample: &[u8], out: usize, time: Duration) {
    println!(
        "{:<28} {:>9.1} {:>8.3} {:>7}",
        name,
        mb(sample.len() as u64) / time.as_secs_f64(),
        out as f64 / sample.len() as f64,
        level
    );
}

/// Times a no-op `cargo xtask package` against a no-op `cargo build` of the packaged binaries.
/// A no-op `cargo xtask package` next to a no-op `cargo build --release --workspace`, the
/// build developers run all day, measured both ways: alternating with it (build, package,
/// build, package: each sees what the other left) and on its own (the packages again and
/// again, then the builds again and again).
fn noop_package(sh: &Shell, ctx: &Context, runs: u32) -> anyhow::Result<()> {
    if runs == 0 {
        bail!("bench noop-package: --runs must be at least 1");
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let work = WorkDir::new(ctx, "bench-noop")?;
    let out = &work.0;
    let build = || -> anyhow::Result<Duration> {
        let start = Instant::now();
        without_cargo_env(cmd!(sh, "{cargo} build --release --workspace"))
            .quiet()
            .ignore_stderr()
            .run()?;
        Ok(start.elapsed())
    };
    let package = || -> anyhow::Result<Duration> {
        let start = Instant::now();
        without_cargo_env(cmd!(sh, "{cargo} xtask package --out {out}"))
            .quiet()
            .ignore_stdout()
            .ignore_stderr()
            .run()
            .context("cargo xtask package failed; run it alone to see why")?;
        Ok(start.elapsed())
    };
    // The warm-up: the first of each builds, then writes the packages.
    build()?;
    package()?;
    let build_name = "cargo build --release --workspace";
    let package_name = "cargo xtask package";
    let mut alternating = vec![
        Row::new(format!("{build_name} (alternating)")),
        Row::new(format!("{package_name} (alternating)")),
    ];
    for run in 1..=runs {
        let b = build()?;
        let p = package()?;
        eprintln!(
            "alternating run {run}: build {:.3} s, package {:.3} s",
            b.as_secs_f64(),
            p.as_secs_f64()
        );
        alternating[0].times.push(b);
        alternating[1].times.push(p);
    }
    let mut alone = vec![
        Row::new(format!("{build_name} (on its own)")),
        Row::new(format!("{package_name} (on its own)")),
    ];
    for _ in 0..runs {
        alone[1].times.push(package()?);
    }
    for _ in 0..runs {
        alone[0].times.push(build()?);
    }
    println!("\nno-op runs after one warm-up of each, {runs} runs of each, medians");
    print_table(&alternating, false);
    print_table(&alone, false);
    Ok(())
}

/// Removes the variables cargo sets for the program it runs, so the nested cargo behaves as
/// if started from a terminal and does not rebuild because its environment differs.
fn without_cargo_env(mut cmd: xshell::Cmd<'_>) -> xshell::Cmd<'_> {
    for (key, _) in std::env::vars_os() {
        let Some(key) = key.to_str() else { continue };
        let keep =
            matches!(key, "CARGO_HOME" | "CARGO_TARGET_DIR") || key.starts_with("CARGO_BUILD_");
        if key.starts_with("CARGO_") && !keep {
            cmd = cmd.env_remove(key);
        }
    }
    cmd
}
