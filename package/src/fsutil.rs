//! Atomic file replacement: a reader sees either the previous file or the complete new one.
//!
//! Every file this project writes into `out/` (archives, the digest list, cache records) or onto a
//! server (secrets, configs) goes through a temporary file beside its destination, is flushed to
//! disk, then renamed over the destination. A crash at any point leaves the previous good file in
//! place and at worst a stray temporary file, never a truncated destination.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::sync::atomic::{AtomicU64, Ordering};

use camino::{Utf8Path, Utf8PathBuf};

/// A failure to write a file atomically, naming the step and the path.
#[derive(Debug, thiserror::Error)]
#[error("{action} {path}: {source}")]
pub struct AtomicWriteError {
    pub action: &'static str,
    pub path: Utf8PathBuf,
    #[source]
    pub source: io::Error,
}

/// Writes `bytes` to `path` atomically with mode 0644.
pub fn write_atomic(path: &Utf8Path, bytes: &[u8]) -> Result<(), AtomicWriteError> {
    write_atomic_with_mode(path, bytes, 0o644)
}

/// Writes `bytes` to `path` atomically; the file is created with `mode` from the start, so a
/// secret written with 0600 is never readable by others, not even briefly.
pub fn write_atomic_with_mode(
    path: &Utf8Path,
    bytes: &[u8],
    mode: u32,
) -> Result<(), AtomicWriteError> {
    let mut temp = TempFile::create(path, mode)?;
    let temp_path = temp.path.clone();
    let err = |source| AtomicWriteError { action: "write", path: temp_path, source };
    temp.file_mut().write_all(bytes).map_err(err)?;
    temp.persist()
}

/// A temporary file beside its destination that is removed when dropped unless persisted.
#[derive(Debug)]
pub struct TempFile {
    path: Utf8PathBuf,
    dest: Utf8PathBuf,
    file: Option<File>,
}

impl TempFile {
    /// Creates a new, empty temporary file in the directory of `dest`.
    ///
    /// The name starts with a dot and carries the process id and a counter, so concurrent
    /// writers (threads or processes) never share a temporary file, and `create_new` guarantees
    /// a stale file left by a killed run is never reused.
    pub fn create(dest: &Utf8Path, mode: u32) -> Result<TempFile, AtomicWriteError> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let Some(name) = dest.file_name() else {
            return Err(AtomicWriteError {
                action: "choose a temporary file for",
                path: dest.to_owned(),
                source: io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"),
            });
        };
        let dir = parent_dir(dest);
        let mut attempt = 0;
        loop {
            let n = COUNTER.fetch_add(1, Ordering::Relaxed);
            let path = dir.join(format!(".{name}.tmp.{}.{n}", std::process::id()));
            match OpenOptions::new().write(true).create_new(true).mode(mode).open(&path) {
                Ok(file) => {
                    return Ok(TempFile { path, dest: dest.to_owned(), file: Some(file) });
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists && attempt < 16 => {
                    attempt += 1;
                }
                Err(source) => {
                    return Err(AtomicWriteError { action: "create temporary file", path, source });
                }
            }
        }
    }

    /// The temporary file's path.
    pub fn path(&self) -> &Utf8Path {
        &self.path
    }

    /// The open temporary file.
    pub fn file_mut(&mut self) -> &mut File {
        self.file.as_mut().expect("the file is only taken by persist")
    }

    /// Flushes the file to disk, renames it over the destination and flushes the directory, so
    /// the rename itself survives a power loss.
    pub fn persist(mut self) -> Result<(), AtomicWriteError> {
        let file = self.file.take().expect("the file is only taken by persist");
        file.sync_all().map_err(|source| AtomicWriteError {
            action: "flush",
            path: self.path.clone(),
            source,
        })?;
        drop(file);
        fs::rename(&self.path, &self.dest).map_err(|source| AtomicWriteError {
            action: "rename into place",
            path: self.dest.clone(),
            source,
        })?;
        // The temporary name no longer exists; nothing is left for Drop to remove.
        self.path = Utf8PathBuf::new();
        sync_dir(parent_dir(&self.dest))
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.path.as_str().is_empty() {
            drop(self.file.take());
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// The directory holding `path`, `.` for a bare file name.
fn parent_dir(path: &Utf8Path) -> &Utf8Path {
    match path.parent() {
        Some(p) if !p.as_str().is_empty() => p,
        _ => Utf8Path::new("."),
    }
}

/// Flushes a directory's entries to disk.
fn sync_dir(dir: &Utf8Path) -> Result<(), AtomicWriteError> {
    let err = |source| AtomicWriteError { action: "flush directory", path: dir.to_owned(), source };
    File::open(dir).map_err(err)?.sync_all().map_err(err)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn temp_dir() -> (tempfile::TempDir, Utf8PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = Utf8PathBuf::try_from(dir.path().to_owned()).unwrap();
        (dir, path)
    }

    fn entries(dir: &Utf8Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn replaces_the_file_and_leaves_no_temporary() {
        let (_guard, dir) = temp_dir();
        let path = dir.join("digests.b3");
        write_atomic(&path, b"one").unwrap();
        write_atomic(&path, b"two").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two");
        assert_eq!(entries(&dir), ["digests.b3"]);
    }

    #[test]
    fn secrets_get_their_mode_from_the_start() {
        let (_guard, dir) = temp_dir();
        let path = dir.join("share.json");
        write_atomic_with_mode(&path, b"{}", 0o600).unwrap();
        assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    }

    #[test]
    fn a_dropped_temporary_file_is_removed_and_the_old_file_kept() {
        let (_guard, dir) = temp_dir();
        let path = dir.join("out.tar");
        write_atomic(&path, b"good").unwrap();
        let mut temp = TempFile::create(&path, 0o644).unwrap();
        temp.file_mut().write_all(b"half").unwrap();
        assert_eq!(entries(&dir).len(), 2);
        drop(temp);
        assert_eq!(entries(&dir), ["out.tar"]);
        assert_eq!(fs::read(&path).unwrap(), b"good");
    }

    #[test]
    fn a_missing_directory_is_reported_with_its_path() {
        let (_guard, dir) = temp_dir();
        let path = dir.join("missing/out.tar");
        let err = write_atomic(&path, b"x").unwrap_err().to_string();
        assert!(err.starts_with("create temporary file "), "{err}");
        assert!(err.contains("missing/.out.tar.tmp."), "{err}");
    }
}
