//! One install at a time per host: an advisory lock on `<prefix>/install.lock` that also
//! records who holds it, since when and for what, so a refused second install can say so.
//!
//! `flock` rather than a create-exclusive file: the kernel drops the lock when its holder dies,
//! so a killed installer never leaves a host locked.

use std::fs;
use std::io::{Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use camino::{Utf8Path, Utf8PathBuf};

use crate::error::{io, Error, Result};

/// How long a lock with an empty record is given to go away before a second install is refused.
const RELEASE_GRACE: Duration = Duration::from_secs(1);

/// A held install lock; released when dropped.
#[derive(Debug)]
pub struct InstallLock {
    file: fs::File,
    path: Utf8PathBuf,
}

impl InstallLock {
    /// Takes the lock at `path`, waiting up to `wait` for another holder to finish. `what` says
    /// what this process is about to do.
    pub fn acquire(path: &Utf8Path, what: &str, wait: Duration) -> Result<InstallLock> {
        let mut file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(io("open install lock", path))?;
        let started = Instant::now();
        let deadline = started + wait;
        loop {
            // SAFETY: flock on a file descriptor this function owns for the call's duration.
            let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
            if rc == 0 {
                break;
            }
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::EWOULDBLOCK) {
                return Err(Error::Io { action: "lock", path: path.to_owned(), source: err });
            }
            if Instant::now() >= deadline {
                let mut holder = String::new();
                let _ = file.rewind().and_then(|()| file.read_to_string(&mut holder));
                let holder = holder.trim().replace('\n', ", ");
                // An empty record means the holder has just released the lock (it clears the
                // record first) or has not written its record yet. A released lock can also
                // linger for a moment in a process forked by the holder before that process
                // runs `exec` and closes the descriptor. Either way it is about to change, so
                // look again briefly before refusing.
                if holder.is_empty() && started.elapsed() < RELEASE_GRACE {
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                }
                let holder =
                    if holder.is_empty() { "no details recorded".to_owned() } else { holder };
                return Err(Error::Locked { path: path.to_owned(), holder });
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let record = format!(
            "by={}\npid={}\nsince={} (unix seconds)\nwhat={what}\n",
            who(),
            std::process::id(),
            crate::release::now()
        );
        file.set_len(0).map_err(io("write install lock", path))?;
        file.rewind().map_err(io("write install lock", path))?;
        file.write_all(record.as_bytes()).map_err(io("write install lock", path))?;
        Ok(InstallLock { file, path: path.to_owned() })
    }

    /// The lock file's path.
    pub fn path(&self) -> &Utf8Path {
        &self.path
    }
}

impl Drop for InstallLock {
    fn drop(&mut self) {
        // The record is cleared so a later reader does not mistake it for a live holder; the
        // lock itself goes with the file descriptor.
        let _ = self.file.set_len(0);
    }
}

/// `user@host` of this process: the user who ran sudo when there is one.
pub fn who() -> String {
    let user = std::env::var("SUDO_USER")
        .or_else(|_| std::env::var("USER"))
        .unwrap_or_else(|_| format!("uid {}", unsafe { libc::getuid() }));
    let host = fs::read_to_string("/etc/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_owned());
    format!("{user}@{host}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_with_the_first_holders_record() {
        let dir = std::env::temp_dir().join(format!("flotilla-lock-{}", std::process::id()));
        let dir = Utf8PathBuf::try_from(dir).unwrap();
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("install.lock");
        let first = InstallLock::acquire(&path, "install r1", Duration::ZERO).unwrap();
        let start = Instant::now();
        let err = InstallLock::acquire(&path, "install r2", Duration::from_millis(300))
            .unwrap_err()
            .to_string();
        assert!(start.elapsed() >= Duration::from_millis(300), "it waited");
        assert!(err.contains("held by another install"), "{err}");
        assert!(err.contains("what=install r1"), "{err}");
        assert!(err.contains(&format!("pid={}", std::process::id())), "{err}");
        drop(first);
        let again = InstallLock::acquire(&path, "install r3", Duration::ZERO).unwrap();
        drop(again);
        fs::remove_dir_all(&dir).unwrap();
    }
}
