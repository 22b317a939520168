//! The output cache: inputs with their digests, hit or miss.
//!
//! For every output the cache keeps one JSON record under `<out>/.cache/`: the canonical
//! manifest entry (with the target), the ordered list of inputs with their lengths and blake3
//! digests, and what the output looked like when it was written (size, blake3, and the file's
//! inode and mtime). A lookup is a hit only when the entry and the ordered inputs are equal and
//! the output is still the file that was recorded.
//!
//! Checking the output: outputs are only ever renamed into place complete (see
//! [`flotilla_contracts::atomic`]), and a record is written after its output. A rename always gives the
//! output a new inode, so an output replaced by a later (possibly interrupted) run never matches
//! an older record's inode and mtime; then its blake3 is compared, which costs one read of the
//! file and catches anything else. A truncated or edited output therefore never counts as a hit.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, Read};
use std::os::unix::fs::MetadataExt;
use std::sync::Mutex;

use camino::{Utf8Path, Utf8PathBuf};
use serde::{Deserialize, Serialize};

use crate::archive::ArchiveSummary;
use flotilla_contracts::atomic::{write_atomic, AtomicWriteError, PUBLIC};

/// The version of the record format; records of another version are misses.
const RECORD_VERSION: u32 = 1;

/// One input of an output: a file and where its content goes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheInput {
    /// What the input is for, for example its destination path in the archive.
    pub label: String,
    pub source: Utf8PathBuf,
    pub len: u64,
    /// blake3 of the content, 64 lowercase hex digits.
    pub blake3: String,
}

/// Everything an output is built from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheKey {
    /// The canonical form of the manifest entry and the target.
    pub entry: String,
    pub inputs: Vec<CacheInput>,
}

/// The outcome of a lookup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CacheStatus {
    /// The output is the one recorded: its size and blake3, from the record (a hit has just
    /// checked that the file is that output, so nobody needs to read it again).
    Hit { size: u64, blake3: String },
    /// The output must be rebuilt; `reason` says why, for people.
    Miss { reason: String },
}

/// What went wrong in the cache; every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: Utf8PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Write(#[from] AtomicWriteError),
    #[error("output {path} has no file name to key a cache record")]
    NoFileName { path: Utf8PathBuf },
}

/// The cache of one output directory.
#[derive(Debug)]
pub struct Cache {
    dir: Utf8PathBuf,
    /// The digests of input files, remembered across runs (see `input_from_file`).
    memo: Mutex<Memo>,
}

/// The name of the file under `.cache/` that remembers input digests.
const MEMO_FILE: &str = "input-digests.json";

/// How long after its last change a file must have stayed unchanged before its digest is
/// remembered: a write in the same clock tick as the hashing could otherwise go unseen.
const SETTLED_NS: i128 = 2_000_000_000;

/// Input digests keyed by path: the ones read from the last run, and the ones this run used.
#[derive(Debug, Default)]
struct Memo {
    previous: BTreeMap<Utf8PathBuf, MemoEntry>,
    used: BTreeMap<Utf8PathBuf, MemoEntry>,
}

/// A file's identity when it was hashed, and its digest. Any write changes the ctime, which
/// nobody can set back, so an unchanged identity means unchanged content.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct MemoEntry {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i128,
    ctime_ns: i128,
    blake3: String,
}

impl MemoEntry {
    fn identity(meta: &fs::Metadata, blake3: String) -> MemoEntry {
        MemoEntry {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.len(),
            mtime_ns: mtime_ns(meta),
            ctime_ns: i128::from(meta.ctime()) * 1_000_000_000 + i128::from(meta.ctime_nsec()),
            blake3,
        }
    }

    fn same_file(&self, other: &MemoEntry) -> bool {
        (self.dev, self.ino, self.size, self.mtime_ns, self.ctime_ns)
            == (other.dev, other.ino, other.size, other.mtime_ns, other.ctime_ns)
    }

    /// Whether the file had stopped changing well before `now_ns`.
    fn settled(&self, now_ns: i128) -> bool {
        now_ns - self.mtime_ns.max(self.ctime_ns) >= SETTLED_NS
    }
}

/// The record stored for one output.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Record {
    version: u32,
    entry: String,
    inputs: Vec<CacheInput>,
    output: OutputStamp,
}

/// How the output looked when it was recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct OutputStamp {
    size: u64,
    blake3: String,
    dev: u64,
    ino: u64,
    mtime_ns: i128,
}

impl CacheKey {
    /// Describes a file input by digesting its content.
    pub fn input_from_file(
        label: impl Into<String>,
        source: &Utf8Path,
    ) -> Result<CacheInput, CacheError> {
        let (len, blake3) = digest_file(source)?;
        Ok(CacheInput { label: label.into(), source: source.to_owned(), len, blake3 })
    }
}

impl Cache {
    /// The cache for outputs written to `out_dir`; records live in `out_dir/.cache/`.
    pub fn new(out_dir: &Utf8Path) -> Cache {
        let dir = out_dir.join(".cache");
        // A missing or damaged memo only means hashing again.
        let previous = fs::read_to_string(dir.join(MEMO_FILE))
            .ok()
            .and_then(|text| serde_json::from_str(&text).ok())
            .unwrap_or_default();
        Cache { dir, memo: Mutex::new(Memo { previous, used: BTreeMap::new() }) }
    }

    /// Describes a file input by its content's digest. A file whose identity (device, inode,
    /// size, mtime and ctime) is the one it had when an earlier run hashed it, long after its
    /// last change, is not read again: a no-op run then reads no input.
    pub fn input_from_file(
        &self,
        label: impl Into<String>,
        source: &Utf8Path,
    ) -> Result<CacheInput, CacheError> {
        let stat = |path: &Utf8Path| {
            fs::metadata(path).map_err(|source| CacheError::Io {
                action: "read metadata of",
                path: path.to_owned(),
                source,
            })
        };
        let now_ns = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as i128);
        let before = MemoEntry::identity(&stat(source)?, String::new());
        let remembered = self.memo.lock().unwrap().previous.get(source).cloned();
        let entry = match remembered {
            Some(entry) if entry.same_file(&before) && entry.settled(now_ns) => entry,
            _ => {
                let (_, blake3) = digest_file(source)?;
                // Remember it only if the file did not change while it was read.
                let after = MemoEntry::identity(&stat(source)?, blake3);
                if !after.same_file(&before) || !after.settled(now_ns) {
                    return Ok(CacheInput {
                        label: label.into(),
                        source: source.to_owned(),
                        len: after.size,
                        blake3: after.blake3,
                    });
                }
                after
            }
        };
        let input = CacheInput {
            label: label.into(),
            source: source.to_owned(),
            len: entry.size,
            blake3: entry.blake3.clone(),
        };
        self.memo.lock().unwrap().used.insert(source.to_owned(), entry);
        Ok(input)
    }

    /// Writes the digests this run used for the next run, when they differ from what the
    /// last run left.
    pub fn save_memo(&self) -> Result<(), CacheError> {
        let memo = self.memo.lock().unwrap();
        if memo.used == memo.previous {
            return Ok(());
        }
        let text = serde_json::to_string(&memo.used).expect("the memo serializes");
        fs::create_dir_all(&self.dir).map_err(|source| CacheError::Io {
            action: "create",
            path: self.dir.clone(),
            source,
        })?;
        write_atomic(&self.dir.join(MEMO_FILE), text.as_bytes(), PUBLIC)?;
        Ok(())
    }

    /// The directory holding the records.
    pub fn dir(&self) -> &Utf8Path {
        &self.dir
    }

    /// Says whether `output` can be kept as it is for `key`.
    ///
    /// A missing, unreadable or malformed record is a miss with a reason, never an error:
    /// the worst a damaged cache can do is cause a rebuild.
    pub fn lookup(&self, output: &Utf8Path, key: &CacheKey) -> Result<CacheStatus, CacheError> {
        let record_path = self.record_path(output)?;
        let miss = |reason: String| Ok(CacheStatus::Miss { reason });
        let text = match fs::read_to_string(&record_path) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return miss("no cache record".to_owned());
            }
            Err(e) => return miss(format!("cache record {record_path} unreadable: {e}")),
        };
        let record: Record = match serde_json::from_str(&text) {
            Ok(record) => record,
            Err(e) => return miss(format!("cache record {record_path} is corrupt: {e}")),
        };
        if record.version != RECORD_VERSION {
            return miss(format!(
                "cache record {record_path} has format version {}",
                record.version
            ));
        }
        if record.entry != key.entry {
            return miss("manifest entry changed".to_owned());
        }
        if let Some(reason) = compare_inputs(&record.inputs, &key.inputs) {
            return miss(reason);
        }
        let meta = match fs::metadata(output) {
            Ok(meta) => meta,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return miss("output missing".to_owned());
            }
            Err(e) => {
                return Err(CacheError::Io {
                    action: "read metadata of",
                    path: output.to_owned(),
                    source: e,
                })
            }
        };
        if meta.len() != record.output.size {
            return miss(format!(
                "output changed since it was recorded (size {} instead of {})",
                meta.len(),
                record.output.size
            ));
        }
        let matches = stamp_matches(&meta, &record.output);
        let hit = CacheStatus::Hit { size: record.output.size, blake3: record.output.blake3 };
        if matches {
            return Ok(hit);
        }
        let (size, blake3) = digest_file(output)?;
        if (CacheStatus::Hit { size, blake3 }) != hit {
            return miss("output changed since it was recorded (content)".to_owned());
        }
        Ok(hit)
    }

    /// Records that `output`, described by `summary`, was built from `key`. Call it only after
    /// the output is in place.
    pub fn record(
        &self,
        output: &Utf8Path,
        key: &CacheKey,
        summary: &ArchiveSummary,
    ) -> Result<(), CacheError> {
        let record_path = self.record_path(output)?;
        let meta = fs::metadata(output).map_err(|e| CacheError::Io {
            action: "read metadata of",
            path: output.to_owned(),
            source: e,
        })?;
        let record = Record {
            version: RECORD_VERSION,
            entry: key.entry.clone(),
            inputs: key.inputs.clone(),
            output: OutputStamp {
                size: summary.size,
                blake3: summary.blake3.clone(),
                dev: meta.dev(),
                ino: meta.ino(),
                mtime_ns: mtime_ns(&meta),
            },
        };
        fs::create_dir_all(&self.dir).map_err(|e| CacheError::Io {
            action: "create",
            path: self.dir.clone(),
            source: e,
        })?;
        let json = serde_json::to_vec_pretty(&record).expect("a record always serialises");
        write_atomic(&record_path, &json, PUBLIC)?;
        Ok(())
    }

    /// Forgets the record of `output`, if any.
    pub fn forget(&self, output: &Utf8Path) -> Result<(), CacheError> {
        let record_path = self.record_path(output)?;
        match fs::remove_file(&record_path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(CacheError::Io { action: "remove", path: record_path, source: e }),
        }
    }

    fn record_path(&self, output: &Utf8Path) -> Result<Utf8PathBuf, CacheError> {
        let Some(name) = output.file_name() else {
            return Err(CacheError::NoFileName { path: output.to_owned() });
        };
        Ok(self.dir.join(format!("{name}.json")))
    }
}

/// The blake3 digest of a file, with its length.
pub fn digest_file(path: &Utf8Path) -> Result<(u64, String), CacheError> {
    let err = |action, source| CacheError::Io { action, path: path.to_owned(), source };
    let mut file = File::open(path).map_err(|e| err("open", e))?;
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut len = 0u64;
    loop {
        let n = match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(err("read", e)),
        };
        hasher.update(&buf[..n]);
        len += n as u64;
    }
    Ok((len, hasher.finalize().to_hex().to_string()))
}

/// Explains the first difference between the recorded and the current inputs, if any.
fn compare_inputs(old: &[CacheInput], new: &[CacheInput]) -> Option<String> {
    for input in new {
        if !old.iter().any(|o| o.label == input.label) {
            return Some(format!("input {} added", input.label));
        }
    }
    for input in old {
        if !new.iter().any(|n| n.label == input.label) {
            return Some(format!("input {} removed", input.label));
        }
    }
    for input in new {
        let same = |o: &&CacheInput| o.label == input.label;
        if let Some(o) = old.iter().find(same) {
            if o.len != input.len || o.blake3 != input.blake3 {
                return Some(format!("input {} changed", input.label));
            }
        }
    }
    let old_labels: Vec<&str> = old.iter().map(|i| i.label.as_str()).collect();
    let new_labels: Vec<&str> = new.iter().map(|i| i.label.as_str()).collect();
    if old_labels != new_labels {
        return Some("inputs reordered".to_owned());
    }
    None
}

fn stamp_matches(meta: &fs::Metadata, stamp: &OutputStamp) -> bool {
    meta.dev() == stamp.dev && meta.ino() == stamp.ino && mtime_ns(meta) == stamp.mtime_ns
}

fn mtime_ns(meta: &fs::Metadata) -> i128 {
    i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::archive::{ArchiveOptions, ArchiveWriter, Compression, DEFAULT_MTIME};

    struct Fixture {
        _guard: tempfile::TempDir,
        dir: Utf8PathBuf,
        out: Utf8PathBuf,
        cache: Cache,
    }

    fn fixture() -> Fixture {
        let guard = tempfile::tempdir().unwrap();
        let dir = Utf8PathBuf::try_from(guard.path().to_owned()).unwrap();
        fs::write(dir.join("a"), b"binary a").unwrap();
        fs::write(dir.join("b"), b"config b").unwrap();
        let out = dir.join("out");
        fs::create_dir(&out).unwrap();
        let cache = Cache::new(&out);
        Fixture { _guard: guard, dir, out, cache }
    }

    fn key(f: &Fixture, labels: &[&str]) -> CacheKey {
        let inputs = labels
            .iter()
            .map(|l| CacheKey::input_from_file(format!("/opt/{l}"), &f.dir.join(l)).unwrap())
            .collect();
        CacheKey { entry: "package svc, target default".to_owned(), inputs }
    }

    /// Builds the output from the key's inputs, as a package run would.
    fn build(f: &Fixture, key: &CacheKey) -> (Utf8PathBuf, ArchiveSummary) {
        let output = f.out.join("svc.tar.gz");
        let opts =
            ArchiveOptions { compression: Compression::Gzip, mtime: DEFAULT_MTIME, threads: 1 };
        let mut w = ArchiveWriter::create(&output, &opts).unwrap();
        for input in &key.inputs {
            w.append_file(Utf8Path::new(input.label.trim_start_matches('/')), &input.source)
                .unwrap();
        }
        let summary = w.finish().unwrap();
        (output, summary)
    }

    fn built_and_recorded(f: &Fixture, key: &CacheKey) -> Utf8PathBuf {
        let (output, summary) = build(f, key);
        f.cache.record(&output, key, &summary).unwrap();
        output
    }

    #[test]
    fn input_digests_are_remembered_only_for_settled_unchanged_files() {
        let guard = tempfile::tempdir().unwrap();
        let dir = Utf8PathBuf::try_from(guard.path().to_owned()).unwrap();
        let input = dir.join("input");
        let fresh = dir.join("fresh");
        fs::write(&input, "one").unwrap();
        // Files younger than SETTLED_NS are hashed every time.
        std::thread::sleep(std::time::Duration::from_millis(2100));
        fs::write(&fresh, "new").unwrap();
        let real = |path: &Utf8Path| digest_file(path).unwrap().1;

        let first = Cache::new(&dir);
        assert_eq!(first.input_from_file("a", &input).unwrap().blake3, real(&input));
        assert_eq!(first.input_from_file("b", &fresh).unwrap().blake3, real(&fresh));
        first.save_memo().unwrap();
        let memo_path = dir.join(".cache").join(MEMO_FILE);
        let memo = fs::read_to_string(&memo_path).unwrap();
        assert!(memo.contains(input.as_str()) && !memo.contains(fresh.as_str()), "{memo}");

        // The next run trusts the remembered digest without reading the file: a doctored memo
        // shows through.
        let doctored = memo.replace(&real(&input), &"0".repeat(64));
        fs::write(&memo_path, doctored).unwrap();
        let second = Cache::new(&dir);
        assert_eq!(second.input_from_file("a", &input).unwrap().blake3, "0".repeat(64));

        // Any write changes the ctime, even when size and mtime are put back.
        let mtime = fs::metadata(&input).unwrap().modified().unwrap();
        fs::write(&input, "two").unwrap();
        File::options().write(true).open(&input).unwrap().set_modified(mtime).unwrap();
        let third = Cache::new(&dir);
        assert_eq!(third.input_from_file("a", &input).unwrap().blake3, real(&input));
    }

    /// A hit reporting the output's real size and digest.
    fn hit(output: &Utf8Path) -> CacheStatus {
        let (size, blake3) = digest_file(output).unwrap();
        CacheStatus::Hit { size, blake3 }
    }

    fn reason(status: CacheStatus) -> String {
        match status {
            CacheStatus::Hit { .. } => "hit".to_owned(),
            CacheStatus::Miss { reason } => reason,
        }
    }

    #[test]
    fn an_unchanged_output_is_a_hit() {
        let f = fixture();
        let k = key(&f, &["a", "b"]);
        let output = built_and_recorded(&f, &k);
        assert_eq!(f.cache.lookup(&output, &k).unwrap(), hit(&output));
        // A new key computed from the same files is equal.
        assert_eq!(f.cache.lookup(&output, &key(&f, &["a", "b"])).unwrap(), hit(&output));
    }

    #[test]
    fn no_record_is_a_miss() {
        let f = fixture();
        let k = key(&f, &["a"]);
        let (output, _) = build(&f, &k);
        assert_eq!(reason(f.cache.lookup(&output, &k).unwrap()), "no cache record");
    }

    #[test]
    fn each_change_of_the_key_is_a_miss_with_its_reason() {
        let f = fixture();
        let k = key(&f, &["a", "b"]);
        let output = built_and_recorded(&f, &k);

        let mut entry = k.clone();
        entry.entry.push_str(", target other");
        assert_eq!(reason(f.cache.lookup(&output, &entry).unwrap()), "manifest entry changed");
        assert_eq!(
            reason(f.cache.lookup(&output, &key(&f, &["b", "a"])).unwrap()),
            "inputs reordered"
        );
        assert_eq!(
            reason(f.cache.lookup(&output, &key(&f, &["a"])).unwrap()),
            "input /opt/b removed"
        );
        fs::write(f.dir.join("c"), b"new").unwrap();
        assert_eq!(
            reason(f.cache.lookup(&output, &key(&f, &["a", "b", "c"])).unwrap()),
            "input /opt/c added"
        );
        fs::write(f.dir.join("a"), b"binary A").unwrap();
        assert_eq!(
            reason(f.cache.lookup(&output, &key(&f, &["a", "b"])).unwrap()),
            "input /opt/a changed"
        );
    }

    #[test]
    fn a_missing_truncated_or_edited_output_is_a_miss() {
        let f = fixture();
        let k = key(&f, &["a", "b"]);
        let output = built_and_recorded(&f, &k);
        let good = fs::read(&output).unwrap();

        // Truncated in place (same inode).
        File::options().write(true).open(&output).unwrap().set_len(good.len() as u64 - 8).unwrap();
        let r = reason(f.cache.lookup(&output, &k).unwrap());
        assert!(r.starts_with("output changed since it was recorded (size"), "{r}");

        // Same size, different bytes, written in place.
        let mut edited = good.clone();
        let last = edited.len() - 1;
        edited[last] ^= 0xff;
        fs::write(&output, &edited).unwrap();
        let r = reason(f.cache.lookup(&output, &k).unwrap());
        assert_eq!(r, "output changed since it was recorded (content)");

        // The same bytes again under a new inode: still the recorded content, so a hit.
        let copy = f.dir.join("copy");
        fs::write(&copy, &good).unwrap();
        fs::rename(&copy, &output).unwrap();
        assert_eq!(f.cache.lookup(&output, &k).unwrap(), hit(&output));

        fs::remove_file(&output).unwrap();
        assert_eq!(reason(f.cache.lookup(&output, &k).unwrap()), "output missing");
    }

    #[test]
    fn an_output_from_a_run_that_stopped_before_recording_is_not_a_hit() {
        let f = fixture();
        let old = key(&f, &["a", "b"]);
        let output = built_and_recorded(&f, &old);
        // A later run builds from changed inputs and dies before writing its record...
        fs::write(f.dir.join("a"), b"binary A, version 2").unwrap();
        build(&f, &key(&f, &["a", "b"]));
        // ...then the inputs go back: the record matches them, the output does not.
        fs::write(f.dir.join("a"), b"binary a").unwrap();
        let r = reason(f.cache.lookup(&output, &key(&f, &["a", "b"])).unwrap());
        assert!(r.starts_with("output changed since it was recorded"), "{r}");
    }

    #[test]
    fn a_corrupt_record_is_a_miss_not_an_error() {
        let f = fixture();
        let k = key(&f, &["a"]);
        let output = built_and_recorded(&f, &k);
        let record = f.cache.dir().join("svc.tar.gz.json");
        let text = fs::read_to_string(&record).unwrap();
        fs::write(&record, &text[..text.len() / 2]).unwrap();
        let r = reason(f.cache.lookup(&output, &k).unwrap());
        assert!(r.starts_with(&format!("cache record {record} is corrupt: ")), "{r}");
        fs::write(&record, text.replace("\"version\": 1", "\"version\": 99")).unwrap();
        let r = reason(f.cache.lookup(&output, &k).unwrap());
        assert!(r.ends_with("has format version 99"), "{r}");
        f.cache.forget(&output).unwrap();
        assert_eq!(reason(f.cache.lookup(&output, &k).unwrap()), "no cache record");
    }
}
