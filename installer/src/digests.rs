//! The digest list written by `cargo xtask package` (`digests.b3`, b3sum format) and the check
//! of every package against it.

use std::collections::BTreeMap;

use camino::{Utf8Path, Utf8PathBuf};

use crate::error::{io, Error, Result};

pub use flotilla_contracts::digests::{Digest, DIGEST_LIST};

/// Parses a digest list (see [`flotilla_contracts::digests::parse`]).
pub fn parse(path: &Utf8Path, text: &str) -> Result<BTreeMap<String, Digest>> {
    flotilla_contracts::digests::parse(path, text).map_err(|e| Error::DigestList {
        path: e.path,
        line: e.line,
        message: e.message,
    })
}

/// The blake3 digest of a file.
pub fn file_digest(path: &Utf8Path) -> Result<Digest> {
    flotilla_contracts::digests::file_digest(path).map_err(io("read", path))
}

/// One package of a packages directory, verified against the digest list.
#[derive(Debug, Clone)]
pub struct VerifiedPackage {
    /// The file name, for example `nexus.tar.gz`.
    pub file: String,
    /// The full path of the archive.
    pub path: Utf8PathBuf,
    /// Its blake3 digest.
    pub digest: Digest,
}

/// Verifies every archive (`*.tar.gz`, `*.tar`) of a packages directory against its digest
/// list. Every archive must be listed and every listed file must be present: a file that is
/// missing on either side means an incomplete transfer or a stray file, and installing either
/// would install something nobody built together.
pub fn verify_dir(dir: &Utf8Path) -> Result<Vec<VerifiedPackage>> {
    let list_path = dir.join(DIGEST_LIST);
    let text = std::fs::read_to_string(&list_path).map_err(io("read digest list", &list_path))?;
    let listed = parse(&list_path, &text)?;
    let mut archives = Vec::new();
    for entry in dir.read_dir_utf8().map_err(io("list packages directory", dir))? {
        let entry = entry.map_err(io("list packages directory", dir))?;
        let name = entry.file_name();
        if name.ends_with(".tar.gz") || name.ends_with(".tar") {
            archives.push(name.to_owned());
        }
    }
    archives.sort();
    for name in &archives {
        if !listed.contains_key(name) {
            return Err(Error::Digest {
                file: dir.join(name),
                message: format!("not listed in {list_path}"),
            });
        }
    }
    let mut verified = Vec::new();
    for (name, expected) in &listed {
        let path = dir.join(name);
        if !path.is_file() {
            return Err(Error::Digest {
                file: path,
                message: format!("listed in {list_path} but missing"),
            });
        }
        let actual = file_digest(&path)?;
        if &actual != expected {
            return Err(Error::Digest {
                file: path,
                message: format!("digest mismatch: {list_path} says {expected}, file has {actual}"),
            });
        }
        verified.push(VerifiedPackage { file: name.clone(), path, digest: actual });
    }
    if verified.is_empty() {
        return Err(Error::Digest {
            file: list_path,
            message: "lists no packages: nothing to install".into(),
        });
    }
    Ok(verified)
}
