//! The dead-man's switch: after an install that activated a new release, the installer can wait
//! for the deployer to confirm over a new connection, and put the previous release back by
//! itself when no confirmation comes in time (the release broke the host's network or sshd, so
//! the deployer can no longer reach it to repair anything).
//!
//! The protocol is three names in the prefix, decided by `rename`, which is atomic:
//! `install --confirm-timeout` writes [`PENDING`] (under the install lock) and starts the
//! watcher; `confirm` renames it to [`DONE`]; the watcher, at the deadline and under the install
//! lock, renames it to [`EXPIRED`] and reverts. Whichever rename happens first wins, so a
//! confirmation that arrives as the deadline passes is either in time (no revert) or refused
//! as too late (the revert runs), never both. A later install replaces a pending record, and
//! the earlier watcher then finds nothing of its own to expire.

use std::fs;
use std::io::Write as _;

use camino::Utf8PathBuf;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::release::{now, write_atomic, Layout};

/// The record of an activation awaiting its confirmation.
pub const PENDING: &str = "confirm.json";
/// The last confirmed record.
pub const DONE: &str = "confirm.done";
/// The last record whose deadline passed unconfirmed.
pub const EXPIRED: &str = "confirm.expired";
/// The watcher's log, appended to.
pub const LOG: &str = "confirm.log";
/// The activation kind of a revert for want of a confirmation, in the host's history.
pub const REVERT_KIND: &str = "revert-unconfirmed";

/// An activation awaiting confirmation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Awaiting {
    /// The release that was activated.
    pub release: String,
    /// The release that was active before, which the watcher restores.
    pub previous: String,
    /// Seconds since the epoch after which it is too late to confirm.
    pub deadline: u64,
    pub timeout_secs: u64,
}

/// What `confirm` found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Confirmation {
    /// The pending activation is confirmed: the watcher will not revert it.
    Confirmed(Awaiting),
    /// Nothing awaits confirmation (the install changed nothing, or it was confirmed before).
    Nothing,
    /// The deadline passed first: the watcher has reverted, or is reverting, this activation.
    TooLate(Awaiting),
}

fn path(layout: &Layout, name: &str) -> Utf8PathBuf {
    layout.prefix.join(name)
}

fn read(layout: &Layout, name: &str) -> Result<Option<Awaiting>> {
    let path = path(layout, name);
    match fs::read_to_string(&path) {
        Ok(text) => serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| Error::State { path, message: e.to_string() }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::Io { action: "read", path, source: e }),
    }
}

/// The activation awaiting confirmation, if any.
pub fn pending(layout: &Layout) -> Result<Option<Awaiting>> {
    read(layout, PENDING)
}

/// The last activation whose deadline passed unconfirmed, if any.
pub fn expired(layout: &Layout) -> Result<Option<Awaiting>> {
    read(layout, EXPIRED)
}

/// Records `awaiting` (call with the install lock held); it replaces any earlier one.
pub fn arm(layout: &Layout, awaiting: &Awaiting) -> Result<()> {
    let text = serde_json::to_string_pretty(awaiting).expect("the record serializes");
    write_atomic(&path(layout, PENDING), text.as_bytes(), 0o644)
}

/// Drops a pending record (call with the install lock held): a new install supersedes it.
pub fn disarm(layout: &Layout) -> Result<Option<Awaiting>> {
    let found = pending(layout)?;
    if found.is_some() {
        let p = path(layout, PENDING);
        match fs::remove_file(&p) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::Io { action: "remove", path: p, source: e }),
        }
    }
    Ok(found)
}

/// Confirms the pending activation; takes no lock, so it answers at once even while an
/// install runs.
pub fn confirm(layout: &Layout) -> Result<Confirmation> {
    let Some(awaiting) = pending(layout)? else {
        return Ok(match expired(layout)? {
            Some(e) if e.deadline + 600 > now() => Confirmation::TooLate(e),
            _ => Confirmation::Nothing,
        });
    };
    match fs::rename(path(layout, PENDING), path(layout, DONE)) {
        Ok(()) => Ok(Confirmation::Confirmed(awaiting)),
        // The watcher expired it between the read and the rename.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Confirmation::TooLate(awaiting)),
        Err(e) => Err(Error::Io { action: "confirm", path: path(layout, PENDING), source: e }),
    }
}

/// At the deadline, with the install lock held: takes the pending record of `release` for the
/// watcher to revert. `None` when it was confirmed or superseded.
pub fn expire(layout: &Layout, release: &str) -> Result<Option<Awaiting>> {
    let Some(awaiting) = pending(layout)? else { return Ok(None) };
    if awaiting.release != release {
        return Ok(None);
    }
    match fs::rename(path(layout, PENDING), path(layout, EXPIRED)) {
        Ok(()) => Ok(Some(awaiting)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::Io { action: "expire", path: path(layout, PENDING), source: e }),
    }
}

/// Appends a line to the watcher's log, with the time; best effort.
pub fn log(layout: &Layout, line: &str) {
    let p = path(layout, LOG);
    if let Ok(mut file) = fs::OpenOptions::new().create(true).append(true).open(&p) {
        let _ = writeln!(file, "{} {line}", now());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(tag: &str) -> Layout {
        let dir =
            std::env::temp_dir().join(format!("flotilla-confirm-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        Layout { prefix: Utf8PathBuf::from_path_buf(dir).unwrap() }
    }

    fn awaiting(release: &str) -> Awaiting {
        Awaiting {
            release: release.into(),
            previous: "a".into(),
            deadline: now() + 30,
            timeout_secs: 30,
        }
    }

    #[test]
    fn a_confirmation_in_time_wins_and_the_watcher_finds_nothing_to_expire() {
        let layout = layout("in-time");
        assert_eq!(confirm(&layout).unwrap(), Confirmation::Nothing);
        arm(&layout, &awaiting("b")).unwrap();
        assert_eq!(pending(&layout).unwrap(), Some(awaiting("b")));
        assert_eq!(confirm(&layout).unwrap(), Confirmation::Confirmed(awaiting("b")));
        assert_eq!(expire(&layout, "b").unwrap(), None);
        assert_eq!(confirm(&layout).unwrap(), Confirmation::Nothing);
        fs::remove_dir_all(&layout.prefix).unwrap();
    }

    #[test]
    fn an_expired_activation_refuses_a_late_confirmation() {
        let layout = layout("late");
        arm(&layout, &awaiting("b")).unwrap();
        assert_eq!(expire(&layout, "b").unwrap(), Some(awaiting("b")));
        assert_eq!(confirm(&layout).unwrap(), Confirmation::TooLate(awaiting("b")));
        assert_eq!(pending(&layout).unwrap(), None);
        fs::remove_dir_all(&layout.prefix).unwrap();
    }

    #[test]
    fn a_newer_install_supersedes_an_earlier_watcher() {
        let layout = layout("superseded");
        arm(&layout, &awaiting("b")).unwrap();
        assert_eq!(disarm(&layout).unwrap(), Some(awaiting("b")));
        arm(&layout, &awaiting("c")).unwrap();
        // The watcher of b wakes: the pending record is c's, not its own.
        assert_eq!(expire(&layout, "b").unwrap(), None);
        assert_eq!(pending(&layout).unwrap(), Some(awaiting("c")));
        fs::remove_dir_all(&layout.prefix).unwrap();
    }
}
