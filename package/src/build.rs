//! Executing a plan: cargo once per profile, then every output assembled in dependency order,
//! independent outputs concurrently, each one looked up in the cache first.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use camino::{Utf8Path, Utf8PathBuf};
use flotilla_contracts::atomic::{write_atomic, PUBLIC};
use flotilla_contracts::digests as digest_list;

use crate::archive::{ArchiveOptions, ArchiveSummary, ArchiveWriter, Compression};
use crate::cache::{digest_file, Cache, CacheInput, CacheKey, CacheStatus};
use crate::fetch::{fetch, Retry};
use crate::manifest::PackageName;
use crate::plan::{
    metadata_file, CargoBuild, Format, Input, OutputPlan, Plan, TreeEntryKind, Verdict, Work,
};
use crate::Error;

/// Receives progress; every method has a no-op default so a front end implements what it shows.
pub trait Progress: Sync {
    fn cargo_started(&self, _build: &CargoBuild) {}
    fn cargo_finished(&self, _build: &CargoBuild, _elapsed: Duration) {}
    fn started(&self, _package: &PackageName, _inputs: usize) {}
    fn message(&self, _package: &PackageName, _message: &str) {}
    fn cache_hit(&self, _package: &PackageName) {}
    fn done(&self, _report: &OutputReport) {}
    fn failed(&self, _package: &PackageName, _error: &Error, _setup_hint: Option<&str>) {}
}

/// Progress that shows nothing.
pub struct NoProgress;
impl Progress for NoProgress {}

/// Runs a planned cargo build. The front end owns process execution (the CLI runs cargo through
/// its shell, with cargo's own `CARGO_*` variables removed); the error is what it printed.
pub trait CargoRunner {
    fn run(&self, build: &CargoBuild) -> Result<(), String>;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheMode {
    Enabled,
    Disabled,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rebuild {
    /// Run the planned cargo builds first.
    Cargo,
    /// Package the binaries already in the target directory.
    No,
}

pub struct ExecuteConfig<'a> {
    pub plan: &'a Plan,
    pub out_dir: &'a Utf8Path,
    /// How many outputs are assembled at once.
    pub jobs: usize,
    pub cache: CacheMode,
    pub rebuild: Rebuild,
    /// Entry mtime for archives (`SOURCE_DATE_EPOCH` or the default).
    pub mtime: u64,
    pub retry: Retry,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Built,
    Cached,
    Fetched,
    Manual,
}

#[derive(Debug, Clone)]
pub struct OutputReport {
    pub package: PackageName,
    pub path: Utf8PathBuf,
    pub size: u64,
    pub blake3: String,
    pub outcome: Outcome,
    pub elapsed: Duration,
}

#[derive(Debug, Default)]
pub struct BuildReport {
    pub cargo: Vec<(CargoBuild, Duration)>,
    pub outputs: Vec<OutputReport>,
    /// Packages that failed, and those skipped because a component failed.
    pub failed: Vec<(PackageName, String)>,
}

/// The digest list every later step verifies outputs against.
pub const DIGESTS_FILE: &str = digest_list::DIGEST_LIST;

/// Executes `plan`. Failed outputs are reported through `progress` and listed in the report;
/// they never replace a previous good output. Errors before assembly (cargo, the output
/// directory) end the run.
pub fn execute(
    config: &ExecuteConfig<'_>,
    cargo: &dyn CargoRunner,
    progress: &dyn Progress,
) -> Result<BuildReport, Error> {
    let mut report = BuildReport::default();
    if config.rebuild == Rebuild::Cargo {
        for build in &config.plan.cargo_builds {
            progress.cargo_started(build);
            let start = Instant::now();
            cargo
                .run(build)
                .map_err(|message| Error::Cargo { description: build.description(), message })?;
            progress.cargo_finished(build, start.elapsed());
            report.cargo.push((build.clone(), start.elapsed()));
        }
    }
    std::fs::create_dir_all(config.out_dir).map_err(|source| Error::Io {
        what: "create the output directory".into(),
        path: config.out_dir.to_owned(),
        source,
    })?;
    let cache = Cache::new(config.out_dir);
    let failed: Mutex<BTreeMap<PackageName, String>> = Mutex::new(BTreeMap::new());
    let done: Mutex<Vec<OutputReport>> = Mutex::new(Vec::new());
    for batch in &config.plan.batches {
        let queue = Mutex::new(batch.iter());
        let workers = config.jobs.clamp(1, batch.len().max(1));
        std::thread::scope(|scope| {
            for _ in 0..workers {
                scope.spawn(|| loop {
                    let Some(name) = queue.lock().unwrap().next() else { break };
                    let output = &config.plan.outputs[name];
                    let broken: Vec<String> = {
                        let failed = failed.lock().unwrap();
                        output
                            .deps
                            .iter()
                            .filter(|d| failed.contains_key(*d))
                            .map(|d| d.to_string())
                            .collect()
                    };
                    if !broken.is_empty() {
                        let message = format!("skipped: component {} failed", broken.join(", "));
                        failed.lock().unwrap().insert(name.clone(), message);
                        continue;
                    }
                    match build_output(config, &cache, output, progress) {
                        Ok(r) => {
                            progress.done(&r);
                            done.lock().unwrap().push(r);
                        }
                        Err(e) => {
                            progress.failed(name, &e, output.setup_hint.as_deref());
                            failed.lock().unwrap().insert(name.clone(), e.to_string());
                        }
                    }
                });
            }
        });
    }
    report.outputs = done.into_inner().unwrap();
    report.outputs.sort_by(|a, b| a.package.cmp(&b.package));
    report.failed = failed.into_inner().unwrap().into_iter().collect();
    write_digests(config.out_dir, &report.outputs)?;
    cache.save_memo().map_err(|e| Error::Request(e.to_string()))?;
    Ok(report)
}

/// What the cache would say about each output now, without writing anything (`--dry-run`).
pub fn cache_status(plan: &Plan, out_dir: &Utf8Path) -> BTreeMap<PackageName, Verdict> {
    let cache = Cache::new(out_dir);
    plan.outputs
        .iter()
        .map(|(name, output)| {
            let verdict = match &output.work {
                Work::Manual => Verdict::Manual { present: output.path.is_file() },
                Work::Fetch(_) => Verdict::Prebuilt,
                Work::Assemble(inputs) => match cache_key(&cache, output, inputs, None) {
                    Err(e) => Verdict::Miss(e.to_string()),
                    Ok(key) => match cache.lookup(&output.path, &key) {
                        Ok(CacheStatus::Hit { .. }) => Verdict::Hit,
                        Ok(CacheStatus::Miss { reason }) => Verdict::Miss(reason.to_string()),
                        Err(e) => Verdict::Miss(e.to_string()),
                    },
                },
            };
            (name.clone(), verdict)
        })
        .collect()
}

fn build_output(
    config: &ExecuteConfig<'_>,
    cache: &Cache,
    output: &OutputPlan,
    progress: &dyn Progress,
) -> Result<OutputReport, Error> {
    let start = Instant::now();
    let name = &output.package;
    let fail = |message: String| Error::Package { package: name.clone(), message };
    let report = |summary: ArchiveSummary, outcome| OutputReport {
        package: name.clone(),
        path: summary.path,
        size: summary.size,
        blake3: summary.blake3,
        outcome,
        elapsed: start.elapsed(),
    };
    match &output.work {
        Work::Manual => {
            progress.started(name, 0);
            if !output.path.is_file() {
                return Err(fail(format!(
                    "manual package: {} is missing; put it in place by hand",
                    output.path
                )));
            }
            let (size, blake3) = digest_file(&output.path).map_err(|e| fail(e.to_string()))?;
            let summary = ArchiveSummary { path: output.path.clone(), size, blake3 };
            Ok(report(summary, Outcome::Manual))
        }
        Work::Fetch(spec) => {
            progress.started(name, 1);
            let fetched =
                fetch(spec, &config.retry, &|m| progress.message(name, m)).map_err(&fail)?;
            // An output that already has the pinned content stays untouched.
            if let Ok((size, blake3)) = digest_file(&output.path) {
                if let Ok((_, wanted)) = digest_file(&fetched) {
                    if wanted == blake3 {
                        progress.cache_hit(name);
                        let summary = ArchiveSummary { path: output.path.clone(), size, blake3 };
                        return Ok(report(summary, Outcome::Cached));
                    }
                }
            }
            let bytes =
                std::fs::read(&fetched).map_err(|e| fail(format!("read {fetched}: {e}")))?;
            write_atomic(&output.path, &bytes, PUBLIC).map_err(|e| fail(e.to_string()))?;
            let summary = ArchiveSummary {
                path: output.path.clone(),
                size: bytes.len() as u64,
                blake3: blake3::hash(&bytes).to_hex().to_string(),
            };
            Ok(report(summary, Outcome::Fetched))
        }
        Work::Assemble(inputs) => {
            progress.started(name, inputs.len());
            // Blobs are fetched before the cache lookup: their content is part of the key.
            let mut blobs = BTreeMap::new();
            for (i, input) in inputs.iter().enumerate() {
                if let Input::Blob { fetch: spec, .. } = input {
                    let path = fetch(spec, &config.retry, &|m| progress.message(name, m))
                        .map_err(&fail)?;
                    blobs.insert(i, path);
                }
            }
            let key = cache_key(cache, output, inputs, Some(&blobs)).map_err(&fail)?;
            if config.cache == CacheMode::Enabled {
                match cache.lookup(&output.path, &key) {
                    Ok(CacheStatus::Hit { size, blake3 }) => {
                        progress.cache_hit(name);
                        let summary = ArchiveSummary { path: output.path.clone(), size, blake3 };
                        return Ok(report(summary, Outcome::Cached));
                    }
                    Ok(CacheStatus::Miss { reason }) => {
                        progress.message(name, &format!("cache miss: {reason}"))
                    }
                    Err(e) => progress.message(name, &format!("cache unreadable: {e}")),
                }
            }
            let summary = assemble(config, output, inputs, &blobs, progress)?;
            cache.record(&output.path, &key, &summary).map_err(|e| fail(e.to_string()))?;
            Ok(report(summary, Outcome::Built))
        }
    }
}

fn assemble(
    config: &ExecuteConfig<'_>,
    output: &OutputPlan,
    inputs: &[Input],
    blobs: &BTreeMap<usize, Utf8PathBuf>,
    progress: &dyn Progress,
) -> Result<ArchiveSummary, Error> {
    let name = &output.package;
    let fail = |message: String| Error::Package { package: name.clone(), message };
    let options = ArchiveOptions {
        compression: match output.format {
            Format::Zone => Compression::Gzip,
            Format::Tarball => Compression::None,
        },
        mtime: config.mtime,
        threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
    };
    // Dropping the writer on any error removes its temporary file; the previous output stays.
    let mut writer =
        ArchiveWriter::create(&output.path, &options).map_err(|e| fail(e.to_string()))?;
    for (i, input) in inputs.iter().enumerate() {
        let result = match input {
            Input::Bytes { dest, contents } => writer.append_bytes(dest, contents, 0o644),
            Input::Dir { dest } => writer.append_dir(dest),
            Input::File { dest, source, .. } => {
                progress.message(name, &format!("adding {source}"));
                writer.append_file(dest, source)
            }
            Input::Tree { dest, source, .. } => {
                progress.message(name, &format!("adding {source}/"));
                writer.append_tree(dest, source)
            }
            Input::Blob { dest, .. } => writer.append_file(dest, &blobs[&i]),
            Input::Archive { package, source } => {
                progress.message(name, &format!("merging {package}"));
                // Each component's own metadata file is left out: the composite has its own.
                let skip = metadata_file(Format::Zone);
                writer.append_archive(source, |p| (p.as_str() != skip).then(|| p.to_owned()))
            }
        };
        result.map_err(|e| fail(e.to_string()))?;
    }
    writer.finish().map_err(|e| fail(e.to_string()))
}

/// The cache key of an output: its entry and, in archive order, every input with its digest.
/// Labels carry the destination and mode, so moving or chmod-ing a file is a change too.
fn cache_key(
    cache: &Cache,
    output: &OutputPlan,
    inputs: &[Input],
    blobs: Option<&BTreeMap<usize, Utf8PathBuf>>,
) -> Result<CacheKey, String> {
    let mut keyed = Vec::new();
    let from_file = |label: String, source: &Utf8Path| {
        cache.input_from_file(label, source).map_err(|e| e.to_string())
    };
    let mode = |x: bool| if x { "0755" } else { "0644" };
    for (i, input) in inputs.iter().enumerate() {
        match input {
            Input::Bytes { dest, contents } => keyed.push(CacheInput {
                label: format!("{dest} 0644 generated"),
                source: Utf8PathBuf::new(),
                len: contents.len() as u64,
                blake3: blake3::hash(contents).to_hex().to_string(),
            }),
            Input::Dir { dest } => keyed.push(marker(format!("{dest}/ dir"))),
            Input::File { dest, source, executable } => {
                keyed.push(from_file(format!("{dest} {}", mode(*executable)), source)?)
            }
            Input::Tree { dest, source, entries } => {
                keyed.push(marker(format!("{dest}/ dir")));
                for e in entries {
                    match &e.kind {
                        TreeEntryKind::Dir => keyed.push(marker(format!("{dest}/{}/ dir", e.rel))),
                        TreeEntryKind::File { executable } => keyed.push(from_file(
                            format!("{dest}/{} {}", e.rel, mode(*executable)),
                            &source.join(&e.rel),
                        )?),
                        TreeEntryKind::Symlink { target } => {
                            keyed.push(marker(format!("{dest}/{} -> {target}", e.rel)))
                        }
                    }
                }
            }
            Input::Blob { dest, fetch } => match blobs.and_then(|b| b.get(&i)) {
                Some(path) => keyed.push(from_file(format!("{dest} 0644 blob"), path)?),
                // Without fetching (dry run): the file a fetch would use when it is there, so
                // the verdict is the one the build reaches (an unpinned bucket blob is kept
                // once downloaded, as omicron does); else a pinned digest still identifies
                // the content.
                None => match (&fetch.sha256, fetch.origin.present_at(&fetch.download_path)) {
                    (_, Some(path)) => keyed.push(from_file(format!("{dest} 0644 blob"), path)?),
                    (Some(sha), None) => {
                        keyed.push(marker(format!("{dest} 0644 blob sha256 {sha}")))
                    }
                    (None, None) => return Err(format!("blob {dest} is not downloaded yet")),
                },
            },
            Input::Archive { source, .. } => keyed
                .push(from_file(format!("archive {}", source.file_name().unwrap_or("")), source)?),
        }
    }
    Ok(CacheKey { entry: output.entry.clone(), inputs: keyed })
}

fn marker(label: String) -> CacheInput {
    CacheInput {
        label,
        source: Utf8PathBuf::new(),
        len: 0,
        blake3: blake3::hash(b"").to_hex().to_string(),
    }
}

/// Writes `<out>/digests.b3`: one `<blake3>  <file>` line per output in `out/`, sorted by name,
/// as `b3sum` prints them. Outputs not built in this run (after `--only`) are digested here.
fn write_digests(out_dir: &Utf8Path, reports: &[OutputReport]) -> Result<(), Error> {
    let mut digests: BTreeMap<String, String> = reports
        .iter()
        .filter_map(|r| Some((r.path.file_name()?.to_owned(), r.blake3.clone())))
        .collect();
    let known: BTreeSet<String> = digests.keys().cloned().collect();
    let entries = std::fs::read_dir(out_dir).map_err(|source| Error::Io {
        what: "list".into(),
        path: out_dir.to_owned(),
        source,
    })?;
    for entry in entries.filter_map(|e| e.ok()) {
        let Ok(file) = entry.file_name().into_string() else { continue };
        let is_output = file.ends_with(".tar.gz") || file.ends_with(".tar");
        if !is_output || known.contains(&file) || !entry.path().is_file() {
            continue;
        }
        let path = out_dir.join(&file);
        let (_, blake3) = digest_file(&path).map_err(|e| Error::Request(e.to_string()))?;
        digests.insert(file, blake3);
    }
    let text = digest_list::render(&digests);
    let path = out_dir.join(DIGESTS_FILE);
    // A no-op run leaves the list as it is: no write, no fsync, the same mtime.
    if std::fs::read(&path).is_ok_and(|old| old == text.as_bytes()) {
        return Ok(());
    }
    write_atomic(&path, text.as_bytes(), PUBLIC)?;
    Ok(())
}

/// Writes `<out>/versioned/<file>`: a new archive whose metadata carries `version`, followed by
/// the entries of the built output. The built output is never modified.
pub fn stamp(
    output: &OutputPlan,
    out_dir: &Utf8Path,
    version: &semver::Version,
    mtime: u64,
) -> Result<ArchiveSummary, Error> {
    let name = &output.package;
    let fail = |message: String| Error::Package { package: name.clone(), message };
    if !output.path.is_file() {
        return Err(fail(format!(
            "stamp: {} does not exist; run `cargo xtask package` first",
            output.path
        )));
    }
    let dir = out_dir.join("versioned");
    std::fs::create_dir_all(&dir).map_err(|source| Error::Io {
        what: "create".into(),
        path: dir.clone(),
        source,
    })?;
    let options = ArchiveOptions {
        compression: match output.format {
            Format::Zone => Compression::Gzip,
            Format::Tarball => Compression::None,
        },
        mtime,
        threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
    };
    let dest = dir.join(&output.file_name);
    let mut writer = ArchiveWriter::create(&dest, &options).map_err(|e| fail(e.to_string()))?;
    let Input::Bytes { dest: meta, contents } =
        crate::plan::metadata_input(name, output.format, &version.to_string())
    else {
        unreachable!("metadata inputs are generated bytes")
    };
    writer.append_bytes(&meta, &contents, 0o644).map_err(|e| fail(e.to_string()))?;
    let skip = metadata_file(output.format);
    writer
        .append_archive(&output.path, |p| (p.as_str() != skip).then(|| p.to_owned()))
        .map_err(|e| fail(e.to_string()))?;
    writer.finish().map_err(|e| fail(e.to_string()))
}
