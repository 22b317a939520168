//! The deterministic archive writer.
//!
//! An archive's bytes depend only on what is appended and in which order, never on the machine,
//! the clock, the umask, file ownership, source mtimes, directory order or the number of
//! threads:
//!
//! - Headers are GNU tar headers (as tar-rs writes and omicron-zone-package uses), because the
//!   GNU long-name extension is what GNU tar, bsdtar and tar-rs all read; names longer than 100
//!   bytes get a `././@LongLink` entry, which is itself fixed (mtime 0, uid/gid 0, mode 0644).
//! - Every entry has the same mtime (`SOURCE_DATE_EPOCH` when set), uid/gid 0, empty user and
//!   group names, and a normalised mode: 0755 for directories and executables, 0644 for other
//!   files, 0777 for symlinks (what GNU tar stores for them).
//! - Tree walks are sorted by file name bytes; missing parent directories are added once, in the
//!   order they are first needed.
//! - Gzip output is one gzip member with no timestamp, no file name and a fixed OS byte. The tar
//!   stream is cut into fixed-size chunks, each deflated independently with the previous chunk's
//!   last 32 KiB as a preset dictionary and ended with a sync flush; chunks are concatenated in
//!   order and the stream closed with an empty final block. A chunk's compressed bytes depend
//!   only on its own input and the previous chunk's input, so the output is identical whether
//!   one thread compresses everything or many compress chunks concurrently.
//!
//! The archive is written to a temporary file beside its destination and renamed into place by
//! [`ArchiveWriter::finish`]; a writer dropped before that removes its temporary file, so the
//! previous good output is never touched by a failed or interrupted run.

use std::collections::{BTreeMap, HashSet};
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use camino::{Utf8Component, Utf8Path, Utf8PathBuf};
use flate2::{Compress, FlushCompress};

use flotilla_contracts::atomic::{AtomicWriteError, TempFile};

/// How the tar stream is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// A plain `.tar` (omicron's tarball packages).
    None,
    /// A `.tar.gz` (omicron's zone images).
    Gzip,
}

/// How an archive is written.
#[derive(Debug, Clone)]
pub struct ArchiveOptions {
    pub compression: Compression,
    /// The mtime of every entry, in seconds since the epoch; see [`source_date_epoch`].
    pub mtime: u64,
    /// How many threads compress; 0 or 1 compresses on the calling thread. The output does not
    /// depend on it.
    pub threads: usize,
}

/// The mtime used when `SOURCE_DATE_EPOCH` is not set: the one tar-rs uses for its
/// deterministic header mode (2006-07-24), because an mtime of 0 makes extracted files look
/// older than anything a build tool compares them with.
pub const DEFAULT_MTIME: u64 = 1153704088;

/// The gzip level: the fastest of zlib-rs's levels that keeps outputs within 10% of
/// `gzip -6` on the benchmark payload (see BENCHMARKS.md).
pub const GZIP_LEVEL: u32 = 2;

/// The size of the independently compressed chunks of a gzip stream. Part of the output format:
/// changing it changes every archive's bytes.
const CHUNK_SIZE: usize = 1 << 20;

/// The preset dictionary carried from one chunk to the next (deflate's whole window).
const DICT_SIZE: usize = 32 * 1024;

/// The mtime for archive entries: `SOURCE_DATE_EPOCH` when set, otherwise [`DEFAULT_MTIME`].
pub fn source_date_epoch() -> Result<u64, ArchiveError> {
    match std::env::var("SOURCE_DATE_EPOCH") {
        Ok(value) => match value.trim().parse::<u64>() {
            Ok(secs) => Ok(secs),
            Err(_) => Err(ArchiveError::SourceDateEpoch { value }),
        },
        Err(std::env::VarError::NotPresent) => Ok(DEFAULT_MTIME),
        Err(std::env::VarError::NotUnicode(raw)) => {
            Err(ArchiveError::SourceDateEpoch { value: raw.to_string_lossy().into_owned() })
        }
    }
}

impl ArchiveOptions {
    /// Options for `compression` with the mtime from `SOURCE_DATE_EPOCH` and one compression
    /// thread per available core.
    pub fn from_env(compression: Compression) -> Result<ArchiveOptions, ArchiveError> {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        Ok(ArchiveOptions { compression, mtime: source_date_epoch()?, threads })
    }
}

/// What went wrong while writing an archive; every variant names the file concerned.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: Utf8PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Atomic(#[from] AtomicWriteError),
    #[error("archive {archive}: entry path {path:?} {reason}")]
    InvalidPath { archive: Utf8PathBuf, path: String, reason: &'static str },
    #[error("archive {archive}: {path} is added twice")]
    Duplicate { archive: Utf8PathBuf, path: Utf8PathBuf },
    #[error("archive {archive}: symlink {path} -> {target}: {reason}")]
    Symlink { archive: Utf8PathBuf, path: Utf8PathBuf, target: String, reason: &'static str },
    #[error("archive {archive}: {path} is a {kind}, which packages cannot contain")]
    Unsupported { archive: Utf8PathBuf, path: Utf8PathBuf, kind: String },
    #[error("read archive {source_archive}: entry {path}: {reason}")]
    Source { source_archive: Utf8PathBuf, path: String, reason: String },
    #[error("SOURCE_DATE_EPOCH={value:?} is not a number of seconds")]
    SourceDateEpoch { value: String },
}

/// A finished archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArchiveSummary {
    pub path: Utf8PathBuf,
    pub size: u64,
    /// The blake3 digest of the archive file, 64 lowercase hex digits.
    pub blake3: String,
}

/// Writes one deterministic archive; see the module documentation.
pub struct ArchiveWriter {
    dest: Utf8PathBuf,
    mtime: u64,
    builder: Option<tar::Builder<Sink>>,
    /// Every path already in the archive, to add parent directories once and refuse duplicates.
    seen: HashSet<Utf8PathBuf>,
}

// Dropping an unfinished writer needs no code of its own: the sink owns the temporary file,
// whose Drop removes it, and stops the compression threads first.

impl ArchiveWriter {
    /// Starts an archive that [`finish`](Self::finish) will rename to `dest`.
    pub fn create(dest: &Utf8Path, opts: &ArchiveOptions) -> Result<ArchiveWriter, ArchiveError> {
        ArchiveWriter::create_with_level(dest, opts, GZIP_LEVEL)
    }

    /// [`create`](Self::create) with another gzip level; for benchmarks only, because packages
    /// must all use [`GZIP_LEVEL`] to stay reproducible.
    #[doc(hidden)]
    pub fn create_with_level(
        dest: &Utf8Path,
        opts: &ArchiveOptions,
        level: u32,
    ) -> Result<ArchiveWriter, ArchiveError> {
        let temp = TempFile::create(dest, 0o644)?;
        let out = HashingFile {
            temp,
            buf: Vec::with_capacity(OUT_BUF),
            len: 0,
            hasher: blake3::Hasher::new(),
        };
        let sink = match opts.compression {
            Compression::None => Sink::Plain(Box::new(out)),
            Compression::Gzip => Sink::Gzip(Box::new(GzipSink::new(out, level, opts.threads)?)),
        };
        Ok(ArchiveWriter {
            dest: dest.to_owned(),
            mtime: opts.mtime,
            builder: Some(tar::Builder::new(sink)),
            seen: HashSet::new(),
        })
    }

    /// Adds a directory entry (mode 0755), and its missing parents. Adding a directory that is
    /// already present does nothing, so composites can merge trees that share directories.
    pub fn append_dir(&mut self, path_in_archive: &Utf8Path) -> Result<(), ArchiveError> {
        let path = self.check_path(path_in_archive.as_str())?;
        self.add_parents(&path)?;
        if self.seen.contains(&path) {
            return Ok(());
        }
        let mut header = self.header(tar::EntryType::Directory, 0o755, 0);
        self.append_raw(&path, &mut header, io::empty())?;
        self.seen.insert(path);
        Ok(())
    }

    /// Adds a regular file read from `source`: mode 0755 if the source is executable by anyone,
    /// 0644 otherwise. Symlinks are followed, because a file named explicitly is meant by its
    /// content.
    pub fn append_file(
        &mut self,
        path_in_archive: &Utf8Path,
        source: &Utf8Path,
    ) -> Result<(), ArchiveError> {
        let path = self.check_path(path_in_archive.as_str())?;
        let file = File::open(source).map_err(|e| io_err("open", source, e))?;
        let meta = file.metadata().map_err(|e| io_err("read metadata of", source, e))?;
        if !meta.is_file() {
            return Err(ArchiveError::Io {
                action: "add",
                path: source.to_owned(),
                source: io::Error::new(io::ErrorKind::InvalidInput, "not a regular file"),
            });
        }
        let mode = if meta.permissions().mode() & 0o111 != 0 { 0o755 } else { 0o644 };
        self.add_file(path, source, file, meta.len(), mode)
    }

    /// Adds a regular file with the given content; `mode` is normalised like a source file's.
    pub fn append_bytes(
        &mut self,
        path_in_archive: &Utf8Path,
        bytes: &[u8],
        mode: u32,
    ) -> Result<(), ArchiveError> {
        let path = self.check_path(path_in_archive.as_str())?;
        self.add_parents(&path)?;
        self.claim(&path)?;
        let mode = if mode & 0o111 != 0 { 0o755 } else { 0o644 };
        let mut header = self.header(tar::EntryType::Regular, mode, bytes.len() as u64);
        self.append_raw(&path, &mut header, bytes)
    }

    /// Adds `source_dir` as `path_in_archive`, and everything under it, sorted by name.
    ///
    /// A symlink is stored as a symlink when its target is relative and stays inside
    /// `source_dir`; any other symlink is an error, because following it would silently package
    /// files from outside the tree and storing it would install a link that dangles on the
    /// server.
    pub fn append_tree(
        &mut self,
        path_in_archive: &Utf8Path,
        source_dir: &Utf8Path,
    ) -> Result<(), ArchiveError> {
        let root = self.check_path(path_in_archive.as_str())?;
        self.append_dir(&root)?;
        self.walk(&root, source_dir, Utf8Path::new(""))
    }

    /// Copies the entries of another `.tar` or `.tar.gz` (detected by content), in their order,
    /// for composite packages. `rename` maps each entry's path to its path in this archive, or
    /// to `None` to leave it out (for example a component's own `oxide.json`). Modes and
    /// metadata are normalised as for every other entry.
    pub fn append_archive(
        &mut self,
        source: &Utf8Path,
        mut rename: impl FnMut(&Utf8Path) -> Option<Utf8PathBuf>,
    ) -> Result<(), ArchiveError> {
        let mut file = File::open(source).map_err(|e| io_err("open", source, e))?;
        let mut magic = [0u8; 2];
        let gzipped = match file.read_exact(&mut magic) {
            Ok(()) => magic == [0x1f, 0x8b],
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => false,
            Err(e) => return Err(io_err("read", source, e)),
        };
        let file = File::open(source).map_err(|e| io_err("open", source, e))?;
        let reader: Box<dyn Read> = if gzipped {
            Box::new(flate2::read::MultiGzDecoder::new(io::BufReader::with_capacity(1 << 16, file)))
        } else {
            Box::new(io::BufReader::with_capacity(1 << 16, file))
        };
        let mut archive = tar::Archive::new(reader);
        let entries = archive.entries().map_err(|e| io_err("read", source, e))?;
        for entry in entries {
            let mut entry = entry.map_err(|e| io_err("read", source, e))?;
            let raw_path = entry.path().map_err(|e| io_err("read an entry name in", source, e))?;
            let Some(name) = raw_path.to_str().map(Utf8PathBuf::from) else {
                return Err(ArchiveError::Source {
                    source_archive: source.to_owned(),
                    path: raw_path.to_string_lossy().into_owned(),
                    reason: "the name is not UTF-8".to_owned(),
                });
            };
            let Some(target) = rename(&name) else { continue };
            let kind = entry.header().entry_type();
            match kind {
                tar::EntryType::Directory => self.append_dir(&target)?,
                tar::EntryType::Regular | tar::EntryType::Continuous => {
                    let exec = entry.header().mode().is_ok_and(|m| m & 0o111 != 0);
                    let size = entry.size();
                    let path = self.check_path(target.as_str())?;
                    self.add_file(
                        path,
                        source,
                        &mut entry,
                        size,
                        if exec { 0o755 } else { 0o644 },
                    )?;
                }
                tar::EntryType::Symlink => {
                    let link = entry
                        .link_name()
                        .map_err(|e| io_err("read a link name in", source, e))?
                        .and_then(|l| l.to_str().map(str::to_owned));
                    let Some(link) = link else {
                        return Err(ArchiveError::Source {
                            source_archive: source.to_owned(),
                            path: name.into_string(),
                            reason: "the symlink target is missing or not UTF-8".to_owned(),
                        });
                    };
                    let path = self.check_path(target.as_str())?;
                    self.add_symlink(path, &link)?;
                }
                other => {
                    return Err(ArchiveError::Source {
                        source_archive: source.to_owned(),
                        path: name.into_string(),
                        reason: format!("unsupported entry type {other:?}"),
                    });
                }
            }
        }
        Ok(())
    }

    /// Ends the archive, flushes it to disk and renames it into place.
    pub fn finish(mut self) -> Result<ArchiveSummary, ArchiveError> {
        let builder = self.builder.take().expect("the builder is only taken by finish");
        let sink = builder.into_inner().map_err(|e| self.write_err(e))?;
        let out = match sink {
            Sink::Plain(out) => *out,
            Sink::Gzip(gz) => gz.finish()?,
        };
        out.persist(&self.dest)
    }

    fn walk(
        &mut self,
        root: &Utf8Path,
        source_root: &Utf8Path,
        rel: &Utf8Path,
    ) -> Result<(), ArchiveError> {
        let dir = source_root.join(rel);
        let mut names = Vec::new();
        for entry in fs::read_dir(&dir).map_err(|e| io_err("list", &dir, e))? {
            let entry = entry.map_err(|e| io_err("list", &dir, e))?;
            let Ok(name) = entry.file_name().into_string() else {
                return Err(ArchiveError::InvalidPath {
                    archive: self.dest.clone(),
                    path: dir.join(entry.file_name().to_string_lossy().as_ref()).into_string(),
                    reason: "is not UTF-8",
                });
            };
            names.push(name);
        }
        // Byte order, not locale order, so every machine walks the same way.
        names.sort_unstable();
        for name in names {
            let rel_child = rel.join(&name);
            let source = source_root.join(&rel_child);
            let in_archive = root.join(&rel_child);
            let meta = fs::symlink_metadata(&source)
                .map_err(|e| io_err("read metadata of", &source, e))?;
            let ft = meta.file_type();
            if ft.is_symlink() {
                let target = fs::read_link(&source).map_err(|e| io_err("read link", &source, e))?;
                let Some(target) = target.to_str() else {
                    return Err(ArchiveError::Symlink {
                        archive: self.dest.clone(),
                        path: source,
                        target: target.to_string_lossy().into_owned(),
                        reason: "the target is not UTF-8",
                    });
                };
                check_link_inside(&self.dest, &source, &rel_child, target)?;
                let path = self.check_path(in_archive.as_str())?;
                self.add_symlink(path, target)?;
            } else if ft.is_dir() {
                self.append_dir(&in_archive)?;
                self.walk(root, source_root, &rel_child)?;
            } else if ft.is_file() {
                self.append_file(&in_archive, &source)?;
            } else {
                return Err(ArchiveError::Unsupported {
                    archive: self.dest.clone(),
                    path: source,
                    kind: format!("{ft:?}"),
                });
            }
        }
        Ok(())
    }

    fn add_file(
        &mut self,
        path: Utf8PathBuf,
        source: &Utf8Path,
        data: impl Read,
        size: u64,
        mode: u32,
    ) -> Result<(), ArchiveError> {
        self.add_parents(&path)?;
        self.claim(&path)?;
        let mut header = self.header(tar::EntryType::Regular, mode, size);
        let builder = self.builder.as_mut().expect("the builder is only taken by finish");
        // A file that changes size while it is read would make tar-rs write a wrong entry; the
        // reader is limited to the size in the header and a short read is an error.
        let mut data = ExactReader { inner: data.take(size), left: size };
        match builder.append_data(&mut header, &path, &mut data) {
            Ok(()) => Ok(()),
            Err(e) if data.left != 0 => {
                Err(io_err("read (it shrank while being archived)", source, e))
            }
            Err(e) => Err(io_err("archive", source, e)),
        }
    }

    fn add_symlink(&mut self, path: Utf8PathBuf, target: &str) -> Result<(), ArchiveError> {
        self.add_parents(&path)?;
        self.claim(&path)?;
        let mut header = self.header(tar::EntryType::Symlink, 0o777, 0);
        let builder = self.builder.as_mut().expect("the builder is only taken by finish");
        builder.append_link(&mut header, &path, target).map_err(|e| self.write_err(e))
    }

    fn add_parents(&mut self, path: &Utf8Path) -> Result<(), ArchiveError> {
        let Some(parent) = path.parent() else { return Ok(()) };
        if parent.as_str().is_empty() || self.seen.contains(parent) {
            return Ok(());
        }
        self.append_dir(parent)
    }

    fn claim(&mut self, path: &Utf8Path) -> Result<(), ArchiveError> {
        if !self.seen.insert(path.to_owned()) {
            return Err(ArchiveError::Duplicate {
                archive: self.dest.clone(),
                path: path.to_owned(),
            });
        }
        Ok(())
    }

    fn header(&self, kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(kind);
        header.set_mode(mode);
        header.set_size(size);
        header.set_mtime(self.mtime);
        header.set_uid(0);
        header.set_gid(0);
        header
    }

    fn append_raw(
        &mut self,
        path: &Utf8Path,
        header: &mut tar::Header,
        data: impl Read,
    ) -> Result<(), ArchiveError> {
        let builder = self.builder.as_mut().expect("the builder is only taken by finish");
        builder.append_data(header, path, data).map_err(|e| self.write_err(e))
    }

    /// Normalises and checks a path inside the archive: relative, no `..`, no empty name.
    fn check_path(&self, raw: &str) -> Result<Utf8PathBuf, ArchiveError> {
        let invalid = |reason| ArchiveError::InvalidPath {
            archive: self.dest.clone(),
            path: raw.to_owned(),
            reason,
        };
        let mut out = Utf8PathBuf::new();
        for component in Utf8Path::new(raw).components() {
            match component {
                Utf8Component::Normal(c) => out.push(c),
                Utf8Component::CurDir => {}
                Utf8Component::ParentDir => return Err(invalid("contains `..`")),
                Utf8Component::RootDir | Utf8Component::Prefix(_) => {
                    return Err(invalid("is absolute"));
                }
            }
        }
        if out.as_str().is_empty() {
            return Err(invalid("is empty"));
        }
        Ok(out)
    }

    fn write_err(&self, source: io::Error) -> ArchiveError {
        ArchiveError::Io { action: "write", path: self.dest.clone(), source }
    }
}

/// Refuses symlinks that are absolute or lead outside the tree being archived.
fn check_link_inside(
    archive: &Utf8Path,
    source: &Utf8Path,
    rel: &Utf8Path,
    target: &str,
) -> Result<(), ArchiveError> {
    let err = |reason| ArchiveError::Symlink {
        archive: archive.to_owned(),
        path: source.to_owned(),
        target: target.to_owned(),
        reason,
    };
    if target.starts_with('/') {
        return Err(err("absolute symlinks are not packaged; make it relative"));
    }
    // Depth of the link's directory below the tree root, then walk the target lexically.
    let mut depth = rel.components().count() as i64 - 1;
    for component in Utf8Path::new(target).components() {
        match component {
            Utf8Component::ParentDir => depth -= 1,
            Utf8Component::Normal(_) => depth += 1,
            _ => {}
        }
        if depth < 0 {
            return Err(err("the target leaves the packaged directory"));
        }
    }
    Ok(())
}

fn io_err(action: &'static str, path: &Utf8Path, source: io::Error) -> ArchiveError {
    ArchiveError::Io { action, path: path.to_owned(), source }
}

/// A reader that records how much of the expected size is still missing.
struct ExactReader<R> {
    inner: R,
    left: u64,
}

impl<R: Read> Read for ExactReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.left -= n as u64;
        Ok(n)
    }
}

const OUT_BUF: usize = 1 << 18;

/// The temporary output file, with the size and blake3 digest of what was written to it.
struct HashingFile {
    temp: TempFile,
    buf: Vec<u8>,
    len: u64,
    hasher: blake3::Hasher,
}

impl HashingFile {
    fn write_bytes(&mut self, bytes: &[u8]) -> io::Result<()> {
        if self.buf.len() + bytes.len() > OUT_BUF {
            self.flush_buf()?;
        }
        if bytes.len() >= OUT_BUF {
            self.hasher.update(bytes);
            self.len += bytes.len() as u64;
            return self.temp.file_mut().write_all(bytes);
        }
        self.buf.extend_from_slice(bytes);
        Ok(())
    }

    fn flush_buf(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        self.hasher.update(&self.buf);
        self.len += self.buf.len() as u64;
        self.temp.file_mut().write_all(&self.buf)?;
        self.buf.clear();
        Ok(())
    }

    fn persist(mut self, dest: &Utf8Path) -> Result<ArchiveSummary, ArchiveError> {
        self.flush_buf().map_err(|e| io_err("write", self.temp.path(), e))?;
        let blake3 = self.hasher.finalize().to_hex().to_string();
        self.temp.persist()?;
        Ok(ArchiveSummary { path: dest.to_owned(), size: self.len, blake3 })
    }
}

/// Where tar-rs writes the tar stream.
enum Sink {
    Plain(Box<HashingFile>),
    Gzip(Box<GzipSink>),
}

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Sink::Plain(out) => out.write_bytes(buf)?,
            Sink::Gzip(gz) => gz.write_bytes(buf)?,
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The fixed gzip header: no flags, mtime 0, no extra flags, OS 3 (Unix), so the bytes do not
/// depend on the machine or the clock.
const GZIP_HEADER: [u8; 10] = [0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 3];

/// An empty final deflate block with fixed codes, which ends a stream of sync-flushed chunks.
const DEFLATE_END: [u8; 2] = [0x03, 0x00];

/// One chunk of the tar stream to compress.
struct Job {
    seq: u64,
    dict: Arc<Vec<u8>>,
    data: Arc<Vec<u8>>,
}

/// One compressed chunk.
struct Done {
    seq: u64,
    deflated: io::Result<Vec<u8>>,
    crc: crc32fast::Hasher,
    len: u64,
}

/// Gzip compression of fixed-size chunks, on worker threads when more than one is asked for.
struct GzipSink {
    out: HashingFile,
    /// The chunk being filled.
    chunk: Vec<u8>,
    /// The previous chunk, whose tail is the next chunk's dictionary.
    prev: Arc<Vec<u8>>,
    next_seq: u64,
    /// The next chunk to write to the output.
    write_seq: u64,
    crc: crc32fast::Hasher,
    /// The length of the tar stream written so far.
    total_in: u64,
    pool: Option<Pool>,
    level: u32,
}

struct Pool {
    jobs: Option<SyncSender<Job>>,
    results: Receiver<Done>,
    pending: BTreeMap<u64, Done>,
    in_flight: usize,
    max_in_flight: usize,
    workers: Vec<JoinHandle<()>>,
}

impl GzipSink {
    fn new(mut out: HashingFile, level: u32, threads: usize) -> Result<GzipSink, ArchiveError> {
        out.write_bytes(&GZIP_HEADER).map_err(|e| io_err("write", out.temp.path(), e))?;
        let pool = (threads > 1).then(|| Pool::start(threads, level));
        Ok(GzipSink {
            out,
            chunk: Vec::with_capacity(CHUNK_SIZE),
            prev: Arc::new(Vec::new()),
            next_seq: 0,
            write_seq: 0,
            crc: crc32fast::Hasher::new(),
            total_in: 0,
            pool,
            level,
        })
    }

    fn write_bytes(&mut self, mut bytes: &[u8]) -> io::Result<()> {
        while !bytes.is_empty() {
            let room = CHUNK_SIZE - self.chunk.len();
            let n = room.min(bytes.len());
            self.chunk.extend_from_slice(&bytes[..n]);
            bytes = &bytes[n..];
            if self.chunk.len() == CHUNK_SIZE {
                self.submit()?;
            }
        }
        Ok(())
    }

    /// Hands the current chunk to a worker, or compresses it here without a pool.
    fn submit(&mut self) -> io::Result<()> {
        if self.chunk.is_empty() {
            return Ok(());
        }
        let data = Arc::new(std::mem::replace(&mut self.chunk, Vec::with_capacity(CHUNK_SIZE)));
        let dict = std::mem::replace(&mut self.prev, Arc::clone(&data));
        let seq = self.next_seq;
        self.next_seq += 1;
        let job = Job { seq, dict, data };
        match &mut self.pool {
            None => {
                let done = compress_job(self.level, job);
                self.write_done(done)
            }
            Some(pool) => {
                pool.send(job)?;
                // Bounding the chunks in flight bounds memory; waiting here also keeps the
                // output in order without buffering the whole archive.
                while self.pool.as_ref().is_some_and(|p| p.in_flight >= p.max_in_flight) {
                    self.pool.as_mut().expect("checked above").receive_one()?;
                    self.drain_ready()?;
                }
                self.drain_ready()
            }
        }
    }

    /// Writes every finished chunk that is next in order.
    fn drain_ready(&mut self) -> io::Result<()> {
        loop {
            let Some(pool) = &mut self.pool else { return Ok(()) };
            let Some(done) = pool.pending.remove(&self.write_seq) else { return Ok(()) };
            self.write_done(done)?;
        }
    }

    fn write_done(&mut self, done: Done) -> io::Result<()> {
        debug_assert_eq!(done.seq, self.write_seq);
        let deflated = done.deflated?;
        self.out.write_bytes(&deflated)?;
        self.crc.combine(&done.crc);
        self.total_in += done.len;
        self.write_seq += 1;
        Ok(())
    }

    fn finish(mut self: Box<Self>) -> Result<HashingFile, ArchiveError> {
        let path = self.out.temp.path().to_owned();
        let err = |e| io_err("write", &path, e);
        self.submit().map_err(err)?;
        while self.write_seq < self.next_seq {
            if let Some(pool) = &mut self.pool {
                pool.receive_one().map_err(err)?;
            }
            self.drain_ready().map_err(err)?;
        }
        let total = self.total_in;
        let crc = self.crc.clone().finalize();
        let mut out = self.out_take();
        out.write_bytes(&DEFLATE_END).map_err(err)?;
        out.write_bytes(&crc.to_le_bytes()).map_err(err)?;
        // ISIZE is the input length modulo 2^32, as RFC 1952 defines it.
        out.write_bytes(&(total as u32).to_le_bytes()).map_err(err)?;
        Ok(out)
    }

    fn out_take(self: Box<Self>) -> HashingFile {
        let GzipSink { out, pool, .. } = *self;
        drop(pool);
        out
    }
}

impl Pool {
    fn start(threads: usize, level: u32) -> Pool {
        let (job_tx, job_rx) = mpsc::sync_channel::<Job>(threads);
        let (done_tx, done_rx) = mpsc::channel::<Done>();
        let job_rx = Arc::new(Mutex::new(job_rx));
        let workers = (0..threads)
            .map(|_| {
                let job_rx = Arc::clone(&job_rx);
                let done_tx = done_tx.clone();
                std::thread::spawn(move || loop {
                    let job = match job_rx.lock() {
                        Ok(rx) => rx.recv(),
                        Err(_) => return,
                    };
                    let Ok(job) = job else { return };
                    if done_tx.send(compress_job(level, job)).is_err() {
                        return;
                    }
                })
            })
            .collect();
        Pool {
            jobs: Some(job_tx),
            results: done_rx,
            pending: BTreeMap::new(),
            in_flight: 0,
            max_in_flight: threads * 2,
            workers,
        }
    }

    fn send(&mut self, job: Job) -> io::Result<()> {
        let jobs = self.jobs.as_ref().expect("jobs are only closed on drop");
        if jobs.send(job).is_err() {
            return Err(io::Error::other("a compression thread stopped"));
        }
        self.in_flight += 1;
        Ok(())
    }

    fn receive_one(&mut self) -> io::Result<()> {
        let Ok(done) = self.results.recv() else {
            return Err(io::Error::other("a compression thread stopped"));
        };
        self.in_flight -= 1;
        self.pending.insert(done.seq, done);
        Ok(())
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        // Closing the job channel ends the workers once they finish their current chunk.
        self.jobs = None;
        for worker in self.workers.drain(..) {
            let _ = worker.join();
        }
    }
}

/// Deflates one chunk with the previous chunk's tail as its dictionary, ending byte-aligned
/// with a sync flush and no final block.
fn compress_job(level: u32, job: Job) -> Done {
    let mut crc = crc32fast::Hasher::new();
    crc.update(&job.data);
    let deflated = deflate_chunk(level, &job.data, tail(&job.dict, DICT_SIZE));
    Done { seq: job.seq, deflated, crc, len: job.data.len() as u64 }
}

fn tail(bytes: &[u8], n: usize) -> &[u8] {
    &bytes[bytes.len().saturating_sub(n)..]
}

fn deflate_chunk(level: u32, input: &[u8], dict: &[u8]) -> io::Result<Vec<u8>> {
    // A fresh compressor per chunk: zlib-rs's reset leaves state behind that changes the
    // output of the next chunk (measured: outputs then depend on which worker compressed which
    // chunk), and allocating one costs far less than compressing a chunk.
    let mut compress = Compress::new(flate2::Compression::new(level), false);
    if !dict.is_empty() {
        compress.set_dictionary(dict).map_err(io::Error::other)?;
    }
    let start_in = compress.total_in();
    let mut out = Vec::with_capacity(input.len() + input.len() / 16 + 1024);
    loop {
        let consumed = (compress.total_in() - start_in) as usize;
        if out.len() == out.capacity() {
            out.reserve(64 * 1024);
        }
        compress
            .compress_vec(&input[consumed..], &mut out, FlushCompress::Sync)
            .map_err(io::Error::other)?;
        let consumed = (compress.total_in() - start_in) as usize;
        // The flush is complete once all input is taken and the compressor stopped with room
        // left in the output.
        if consumed == input.len() && out.len() < out.capacity() {
            return Ok(out);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::process::Command;
    use std::time::{Duration, SystemTime};

    use super::*;

    struct Dir {
        _guard: tempfile::TempDir,
        path: Utf8PathBuf,
    }

    fn temp_dir() -> Dir {
        let guard = tempfile::tempdir().unwrap();
        let path = Utf8PathBuf::try_from(guard.path().to_owned()).unwrap();
        Dir { _guard: guard, path }
    }

    fn opts(compression: Compression, threads: usize) -> ArchiveOptions {
        ArchiveOptions { compression, mtime: DEFAULT_MTIME, threads }
    }

    /// Bytes that compress somewhat, like a binary: a little structure and some noise.
    fn payload(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (0..len)
            .map(|i| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                if i % 3 == 0 {
                    (x % 7) as u8
                } else {
                    b"flotilla packages deterministic archives\n"[i % 41]
                }
            })
            .collect()
    }

    const LONG_NAME: &str = "a-directory-name-that-is-quite-long/another-directory-name-that-is-long/and-a-file-name-past-one-hundred-bytes.txt";

    /// Writes the same tree with a given creation order, file modes (as different umasks
    /// would give) and mtimes.
    fn make_tree(root: &Utf8Path, reverse: bool, loose_modes: bool, mtime: SystemTime) {
        let mut files: Vec<(&str, Vec<u8>, bool)> = vec![
            ("bin/node-agent", payload(3 * CHUNK_SIZE + 1234, 1), true),
            ("pkg/config.toml", b"listen = \"[::1]:8080\"\n".to_vec(), false),
            ("pkg/empty", Vec::new(), false),
            ("pkg/b/z.txt", payload(5000, 2), false),
            ("pkg/b/a.txt", payload(70_000, 3), false),
            (LONG_NAME, b"long\n".to_vec(), false),
        ];
        if reverse {
            files.reverse();
        }
        for (name, bytes, exec) in &files {
            let path = root.join(name);
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(&path, bytes).unwrap();
            let mode = match (exec, loose_modes) {
                (true, true) => 0o775,
                (true, false) => 0o700,
                (false, true) => 0o664,
                (false, false) => 0o600,
            };
            fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
            File::options().write(true).open(&path).unwrap().set_modified(mtime).unwrap();
        }
        std::os::unix::fs::symlink("b/a.txt", root.join("pkg/link")).unwrap();
        let dir_mode = if loose_modes { 0o775 } else { 0o700 };
        fs::set_permissions(root.join("pkg/b"), fs::Permissions::from_mode(dir_mode)).unwrap();
    }

    /// A zone-shaped archive of `tree`.
    fn build(dest: &Utf8Path, tree: &Utf8Path, opts: &ArchiveOptions) -> ArchiveSummary {
        let mut w = ArchiveWriter::create(dest, opts).unwrap();
        w.append_bytes(Utf8Path::new("oxide.json"), br#"{"v":"1"}"#, 0o600).unwrap();
        w.append_tree(Utf8Path::new("root/opt/flotilla/node-agent"), tree).unwrap();
        w.finish().unwrap()
    }

    #[test]
    fn bytes_do_not_depend_on_mtimes_modes_order_or_threads() {
        let work = temp_dir();
        let a = work.path.join("a");
        let b = work.path.join("b");
        make_tree(&a, false, false, SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000));
        make_tree(&b, true, true, SystemTime::now());
        for compression in [Compression::None, Compression::Gzip] {
            let first = build(&work.path.join("1.out"), &a, &opts(compression, 1));
            let bytes = fs::read(&first.path).unwrap();
            assert_eq!(first.size, bytes.len() as u64);
            assert_eq!(first.blake3, blake3::hash(&bytes).to_hex().to_string());
            for (i, threads) in [1, 2, 3, 8].into_iter().enumerate() {
                let dest = work.path.join(format!("{i}.again"));
                let other = build(&dest, &b, &opts(compression, threads));
                assert_eq!(other.blake3, first.blake3, "{compression:?} with {threads} threads");
                assert_eq!(fs::read(&dest).unwrap(), bytes);
            }
        }
    }

    #[test]
    fn gzip_output_is_the_plain_tar_and_has_a_fixed_header() {
        let work = temp_dir();
        let tree = work.path.join("tree");
        make_tree(&tree, false, false, SystemTime::now());
        let plain = build(&work.path.join("p.tar"), &tree, &opts(Compression::None, 1));
        let gz = build(&work.path.join("p.tar.gz"), &tree, &opts(Compression::Gzip, 2));
        let gz_bytes = fs::read(&gz.path).unwrap();
        assert_eq!(gz_bytes[..10], GZIP_HEADER);
        let mut unpacked = Vec::new();
        flate2::read::GzDecoder::new(&gz_bytes[..]).read_to_end(&mut unpacked).unwrap();
        assert_eq!(unpacked, fs::read(&plain.path).unwrap());
        // GNU gzip checks the CRC and the length in the trailer.
        let status = Command::new("gzip").arg("-t").arg(&gz.path).status().unwrap();
        assert!(status.success());
    }

    #[test]
    fn gnu_tar_lists_and_extracts_every_entry() {
        let work = temp_dir();
        let tree = work.path.join("tree");
        make_tree(&tree, false, false, SystemTime::now());
        let summary = build(&work.path.join("zone.tar.gz"), &tree, &opts(Compression::Gzip, 2));
        let out = Command::new("tar")
            .args(["--numeric-owner", "--utc", "-tvzf"])
            .arg(&summary.path)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let listing: Vec<String> = String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(|l| {
                // Mode, owner, size and name; the date column is the same for every entry.
                let f: Vec<&str> = l.split_whitespace().collect();
                assert_eq!(f[3..5], ["2006-07-24", "01:21"], "{l}");
                format!("{} {} {} {}", f[0], f[1], f[2], f[5..].join(" "))
            })
            .collect();
        let base = "root/opt/flotilla/node-agent";
        let expected = [
            "-rw-r--r-- 0/0 9 oxide.json".to_owned(),
            "drwxr-xr-x 0/0 0 root".to_owned(),
            "drwxr-xr-x 0/0 0 root/opt".to_owned(),
            "drwxr-xr-x 0/0 0 root/opt/flotilla".to_owned(),
            format!("drwxr-xr-x 0/0 0 {base}"),
            format!("drwxr-xr-x 0/0 0 {base}/a-directory-name-that-is-quite-long"),
            format!("drwxr-xr-x 0/0 0 {base}/a-directory-name-that-is-quite-long/another-directory-name-that-is-long"),
            format!("-rw-r--r-- 0/0 5 {base}/{LONG_NAME}"),
            format!("drwxr-xr-x 0/0 0 {base}/bin"),
            format!("-rwxr-xr-x 0/0 {} {base}/bin/node-agent", 3 * CHUNK_SIZE + 1234),
            format!("drwxr-xr-x 0/0 0 {base}/pkg"),
            format!("drwxr-xr-x 0/0 0 {base}/pkg/b"),
            format!("-rw-r--r-- 0/0 70000 {base}/pkg/b/a.txt"),
            format!("-rw-r--r-- 0/0 5000 {base}/pkg/b/z.txt"),
            format!("-rw-r--r-- 0/0 22 {base}/pkg/config.toml"),
            format!("-rw-r--r-- 0/0 0 {base}/pkg/empty"),
            format!("lrwxrwxrwx 0/0 0 {base}/pkg/link -> b/a.txt"),
        ];
        assert_eq!(listing, expected);

        let dest = work.path.join("x");
        fs::create_dir(&dest).unwrap();
        let status = Command::new("tar")
            .arg("-xzf")
            .arg(&summary.path)
            .arg("-C")
            .arg(&dest)
            .status()
            .unwrap();
        assert!(status.success());
        let extracted = dest.join(base);
        for name in ["bin/node-agent", "pkg/config.toml", "pkg/empty", "pkg/b/a.txt", LONG_NAME] {
            assert_eq!(fs::read(extracted.join(name)).unwrap(), fs::read(tree.join(name)).unwrap());
        }
        let mode = |p: &str| fs::metadata(extracted.join(p)).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode("bin/node-agent") & 0o111, 0o111);
        assert_eq!(mode("pkg/config.toml") & 0o111, 0);
        assert_eq!(fs::read_link(extracted.join("pkg/link")).unwrap().to_str(), Some("b/a.txt"));
    }

    #[test]
    fn a_dropped_writer_leaves_no_temporary_file_and_keeps_the_old_output() {
        let work = temp_dir();
        let dest = work.path.join("svc.tar.gz");
        fs::write(&dest, b"previous good output").unwrap();
        for threads in [1, 2] {
            let mut w = ArchiveWriter::create(&dest, &opts(Compression::Gzip, threads)).unwrap();
            w.append_bytes(Utf8Path::new("big"), &payload(5 * CHUNK_SIZE, 4), 0o644).unwrap();
            drop(w);
            let names: Vec<_> =
                fs::read_dir(&work.path).unwrap().map(|e| e.unwrap().file_name()).collect();
            assert_eq!(names, ["svc.tar.gz"]);
            assert_eq!(fs::read(&dest).unwrap(), b"previous good output");
        }
    }

    #[test]
    fn composites_copy_entries_renamed_and_merge_directories() {
        let work = temp_dir();
        let tree = work.path.join("tree");
        make_tree(&tree, false, false, SystemTime::now());
        let part = build(&work.path.join("part.tar.gz"), &tree, &opts(Compression::Gzip, 2));
        let dest = work.path.join("composite.tar.gz");
        let mut w = ArchiveWriter::create(&dest, &opts(Compression::Gzip, 2)).unwrap();
        w.append_bytes(Utf8Path::new("oxide.json"), b"{}", 0o644).unwrap();
        w.append_dir(Utf8Path::new("root/opt")).unwrap();
        w.append_archive(&part.path, |p| (p != "oxide.json").then(|| p.to_owned())).unwrap();
        let summary = w.finish().unwrap();

        let mut names = Vec::new();
        let file = File::open(&summary.path).unwrap();
        let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(file));
        for entry in archive.entries().unwrap() {
            let mut entry = entry.unwrap();
            let name = entry.path().unwrap().to_str().unwrap().to_owned();
            if name.ends_with("bin/node-agent") {
                assert_eq!(entry.header().mode().unwrap(), 0o755);
                let mut bytes = Vec::new();
                entry.read_to_end(&mut bytes).unwrap();
                assert_eq!(bytes, fs::read(tree.join("bin/node-agent")).unwrap());
            }
            names.push(name);
        }
        assert_eq!(names.iter().filter(|n| *n == "oxide.json").count(), 1);
        assert_eq!(names.iter().filter(|n| *n == "root/opt").count(), 1);
        assert!(names.iter().any(|n| n.ends_with(LONG_NAME)), "{names:?}");

        // The same file from two parts is a mistake in the manifest, not something to merge.
        let mut w =
            ArchiveWriter::create(&work.path.join("dup.tar"), &opts(Compression::None, 1)).unwrap();
        w.append_archive(&part.path, |p| Some(p.to_owned())).unwrap();
        let err = w.append_archive(&part.path, |p| Some(p.to_owned())).unwrap_err().to_string();
        assert!(err.ends_with("oxide.json is added twice"), "{err}");
    }

    #[test]
    fn bad_paths_and_escaping_symlinks_are_refused() {
        let work = temp_dir();
        let dest = work.path.join("bad.tar");
        let mut w = ArchiveWriter::create(&dest, &opts(Compression::None, 1)).unwrap();
        let err = w.append_bytes(Utf8Path::new("/etc/passwd"), b"", 0o644).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("archive {dest}: entry path \"/etc/passwd\" is absolute")
        );
        let err = w.append_bytes(Utf8Path::new("a/../../b"), b"", 0o644).unwrap_err();
        assert!(err.to_string().ends_with("contains `..`"), "{err}");

        let tree = work.path.join("tree");
        fs::create_dir_all(tree.join("sub")).unwrap();
        std::os::unix::fs::symlink("../../outside", tree.join("sub/escape")).unwrap();
        let err = w.append_tree(Utf8Path::new("t"), &tree).unwrap_err().to_string();
        assert!(err.contains("sub/escape -> ../../outside: the target leaves"), "{err}");
        fs::remove_file(tree.join("sub/escape")).unwrap();
        std::os::unix::fs::symlink("/etc/hosts", tree.join("sub/abs")).unwrap();
        let err = w.append_tree(Utf8Path::new("u"), &tree).unwrap_err().to_string();
        assert!(err.contains("absolute symlinks are not packaged"), "{err}");
    }
}
