//! Atomic file replacement: a reader sees either the previous file or the complete new one.
//!
//! Every file flotilla writes into `out/` (archives, the digest list, cache records), into a
//! release on a server (records, secrets, configs) or into an overlay goes through a temporary
//! file beside its destination, is flushed to disk, then renamed over the destination. A crash
//! at any point leaves the previous good file in place and at worst a stray temporary file,
//! never a truncated destination.
//!
//! The mode of the result is exactly the one asked for, whatever the umask of the calling
//! process: the temporary file is created 0600 (so a secret is never readable by others, not
//! even briefly), handed to its owner when one is given, then given its mode with `fchmod`,
//! which the umask does not narrow.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::sync::atomic::{AtomicU64, Ordering};

use camino::{Utf8Path, Utf8PathBuf};

/// The mode of files anyone may read: packages, records, configs.
pub const PUBLIC: u32 = 0o644;
/// The mode of secrets and of everything in an overlay.
pub const SECRET: u32 = 0o600;

/// A failure to write a file atomically, naming the step and the path.
#[derive(Debug, thiserror::Error)]
#[error("{action} {path}: {source}")]
pub struct AtomicWriteError {
    pub action: &'static str,
    pub path: Utf8PathBuf,
    #[source]
    pub source: io::Error,
}

/// A user and group by number, the owner a file is handed to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owner {
    pub uid: u32,
    pub gid: u32,
}

/// Writes `bytes` to `path` atomically with exactly `mode`.
pub fn write_atomic(path: &Utf8Path, bytes: &[u8], mode: u32) -> Result<(), AtomicWriteError> {
    write_atomic_owned(path, bytes, mode, None)
}

/// [`write_atomic`] for a file that must belong to `owner` (when given): the temporary file is
/// handed to the owner and given its mode before any byte is written, and only then renamed
/// into place, so the file never exists under its name with the wrong owner or mode.
pub fn write_atomic_owned(
    path: &Utf8Path,
    bytes: &[u8],
    mode: u32,
    owner: Option<Owner>,
) -> Result<(), AtomicWriteError> {
    let mut temp = TempFile::create(path, mode)?;
    if let Some(owner) = owner {
        let file = temp.file.as_ref().expect("open until persisted");
        std::os::unix::fs::fchown(file, Some(owner.uid), Some(owner.gid)).map_err(|source| {
            AtomicWriteError { action: "change the owner of", path: temp.path.clone(), source }
        })?;
        // Changing the owner clears the set-id bits; the mode is set again to be exact.
        temp.set_mode(mode)?;
    }
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
    /// Creates a new, empty temporary file in the directory of `dest`, with exactly `mode`.
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
            match OpenOptions::new().write(true).create_new(true).mode(0o600).open(&path) {
                Ok(file) => {
                    let temp = TempFile { path, dest: dest.to_owned(), file: Some(file) };
                    temp.set_mode(mode)?;
                    return Ok(temp);
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

    fn set_mode(&self, mode: u32) -> Result<(), AtomicWriteError> {
        let file = self.file.as_ref().expect("open until persisted");
        file.set_permissions(fs::Permissions::from_mode(mode)).map_err(|source| AtomicWriteError {
            action: "set the mode of",
            path: self.path.clone(),
            source,
        })
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

/// Flushes a directory so that a rename in it survives a crash; best effort, for callers whose
/// rename is not the commit point of their work (some file systems refuse it).
pub fn sync_dir_best_effort(dir: &Utf8Path) {
    let _ = sync_dir(dir);
}

/// Creates the directory `path` with exactly `mode`, whatever the umask; an existing one is an
/// error (`AlreadyExists`), as for `mkdir`.
pub fn create_dir(path: &Utf8Path, mode: u32) -> io::Result<()> {
    fs::create_dir(path)?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
}

/// Creates `path` and its missing parents, each new one with exactly `mode`; directories that
/// exist keep theirs.
pub fn create_dir_all(path: &Utf8Path, mode: u32) -> io::Result<()> {
    if path.is_dir() {
        return Ok(());
    }
    if let Some(parent) = path.parent().filter(|p| !p.as_str().is_empty()) {
        create_dir_all(parent, mode)?;
    }
    match create_dir(path, mode) {
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && path.is_dir() => Ok(()),
        other => other,
    }
}

/// Sets the mode of an open file exactly, whatever the umask it was created under.
pub fn set_file_mode(file: &File, mode: u32) -> io::Result<()> {
    file.set_permissions(fs::Permissions::from_mode(mode))
}

#[cfg(test)]
mod tests {
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

    fn mode(path: &Utf8Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn replaces_the_file_and_leaves_no_temporary() {
        let (_guard, dir) = temp_dir();
        let path = dir.join("digests.b3");
        write_atomic(&path, b"one", PUBLIC).unwrap();
        write_atomic(&path, b"two", PUBLIC).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two");
        assert_eq!(entries(&dir), ["digests.b3"]);
    }

    #[test]
    fn the_mode_is_exact_whatever_the_umask() {
        let (_guard, dir) = temp_dir();
        // Both extremes of the process's umask; the test restores it.
        for umask in [0o077, 0o000] {
            // SAFETY: umask only sets this process's file creation mask.
            let old = unsafe { umask_set(umask) };
            let public = dir.join(format!("public-{umask:o}"));
            let secret = dir.join(format!("secret-{umask:o}"));
            let written = write_atomic(&public, b"{}", PUBLIC)
                .and_then(|()| write_atomic(&secret, b"{}", SECRET));
            unsafe { umask_set(old) };
            written.unwrap();
            assert_eq!(mode(&public), 0o644, "umask {umask:o}");
            assert_eq!(mode(&secret), 0o600, "umask {umask:o}");
        }
    }

    extern "C" {
        #[link_name = "umask"]
        fn umask_set(mask: u32) -> u32;
    }

    #[test]
    fn a_dropped_temporary_file_is_removed_and_the_old_file_kept() {
        let (_guard, dir) = temp_dir();
        let path = dir.join("out.tar");
        write_atomic(&path, b"good", PUBLIC).unwrap();
        let mut temp = TempFile::create(&path, PUBLIC).unwrap();
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
        let err = write_atomic(&path, b"x", PUBLIC).unwrap_err().to_string();
        assert!(err.starts_with("create temporary file "), "{err}");
        assert!(err.contains("missing/.out.tar.tmp."), "{err}");
    }

    #[test]
    fn an_owned_file_gets_its_owner_and_mode() {
        let (_guard, dir) = temp_dir();
        let path = dir.join("share.json");
        // Our own ids: allowed without privileges.
        let meta = fs::metadata(&dir).unwrap();
        use std::os::unix::fs::MetadataExt;
        let owner = Owner { uid: meta.uid(), gid: meta.gid() };
        write_atomic_owned(&path, b"{}", SECRET, Some(owner)).unwrap();
        let written = fs::metadata(&path).unwrap();
        assert_eq!((written.uid(), written.gid()), (owner.uid, owner.gid));
        assert_eq!(mode(&path), 0o600);
    }
}
