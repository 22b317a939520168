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

use crate::fsutil::{AtomicWriteError, TempFile};

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
pub const GZIP_LEVEL: u32 = 1;

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
            Compression::None => Sink::Plain(out),
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
                    let exec = entry.header().mode().map_or(false, |m| m & 0o111 != 0);
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
            Sink::Plain(out) => out,
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
        self.append_dir(&parent.to_owned())
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
    Plain(HashingFile),
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
    /// The compressor used when there is no pool.
    local: Compress,
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
            local: Compress::new(flate2::Compression::new(level), false),
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
                let done = compress_job(&mut self.local, job);
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
                std::thread::spawn(move || {
                    let mut compress = Compress::new(flate2::Compression::new(level), false);
                    loop {
                        let job = match job_rx.lock() {
                            Ok(rx) => rx.recv(),
                            Err(_) => return,
                        };
                        let Ok(job) = job else { return };
                        if done_tx.send(compress_job(&mut compress, job)).is_err() {
                            return;
                        }
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
fn compress_job(compress: &mut Compress, job: Job) -> Done {
    let mut crc = crc32fast::Hasher::new();
    crc.update(&job.data);
    let deflated = deflate_chunk(compress, &job.data, tail(&job.dict, DICT_SIZE));
    Done { seq: job.seq, deflated, crc, len: job.data.len() as u64 }
}

fn tail(bytes: &[u8], n: usize) -> &[u8] {
    &bytes[bytes.len().saturating_sub(n)..]
}

fn deflate_chunk(compress: &mut Compress, input: &[u8], dict: &[u8]) -> io::Result<Vec<u8>> {
    compress.reset();
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
