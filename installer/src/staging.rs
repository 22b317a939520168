//! Installing from a staging directory that fling filled: the staged key records what was
//! pushed there and installed from it last, so a redeploy of the same thing costs one session
//! on the server (`--if-staged`) instead of a transfer and an install.
//!
//! The key is fling's digest of what it would push (the digest list, the installer, the
//! server's overlay, the install command); the installer only compares and records it, in
//! `<staging>/.staged-key`.

use camino::{Utf8Path, Utf8PathBuf};

use crate::{Error, Installer, Outcome, Result};
use flotilla_contracts::layout::staging::KEY;

/// A staged key: 64 lowercase hex digits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StagedKey(String);

impl StagedKey {
    pub fn new(key: &str) -> std::result::Result<StagedKey, String> {
        let ok =
            key.len() == 64 && key.chars().all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c));
        if ok {
            Ok(StagedKey(key.to_owned()))
        } else {
            Err(format!("{key:?} is not a staged key (64 lowercase hex digits)"))
        }
    }
}

impl std::str::FromStr for StagedKey {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<StagedKey, String> {
        StagedKey::new(s)
    }
}

/// What `install_staged` did.
#[derive(Debug)]
pub enum Staged {
    Installed(Outcome),
    /// `if_staged` and the staging directory does not hold `key`, or installing from it failed
    /// before changing anything: the caller pushes, then installs again. The key is gone.
    NotStaged(String),
}

fn key_file(staging: &Utf8Path) -> Utf8PathBuf {
    staging.join(KEY)
}

/// Installs `packages` (in `staging`) with `overlay`, recording `key` once the install
/// succeeded and removing it when it failed. With `if_staged`, installs only when the staging
/// directory's key is `key`.
pub fn install_staged(
    installer: &Installer,
    staging: &Utf8Path,
    packages: &Utf8Path,
    overlay: Option<&Utf8Path>,
    key: &StagedKey,
    if_staged: bool,
) -> Result<Staged> {
    let file = key_file(staging);
    if if_staged {
        let current = std::fs::read_to_string(&file).unwrap_or_default();
        if current.trim() != key.0 {
            return Ok(Staged::NotStaged(format!("{staging} does not hold this deploy")));
        }
    }
    match installer.install(packages, overlay) {
        Ok(outcome) => {
            flotilla_contracts::atomic::write_atomic(
                &file,
                format!("{}\n", key.0).as_bytes(),
                0o600,
            )
            .map_err(|e| Error::Io {
                action: "record the staged key",
                path: e.path,
                source: e.source,
            })?;
            Ok(Staged::Installed(outcome))
        }
        Err(err) => {
            let _ = std::fs::remove_file(&file);
            // Pushing again helps only when the staged files were the trouble: not when the
            // install changed something, another holds the lock, or the host is no longer in
            // the state the deploy plan saw.
            let final_answer = matches!(
                err,
                Error::Locked { .. } | Error::Unhealthy { .. } | Error::StateChanged { .. }
            );
            if if_staged && !final_answer {
                return Ok(Staged::NotStaged(format!("installing from {staging} failed: {err}")));
            }
            Err(err)
        }
    }
}
