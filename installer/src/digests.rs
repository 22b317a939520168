//! The digest list written by `cargo xtask package` (`digests.b3`, b3sum format) and the check
//! of every package against it.

use std::collections::BTreeMap;
use std::io::Read;

use camino::{Utf8Path, Utf8PathBuf};

use crate::error::{io, Error, Result};

/// The name of the digest list inside a packages directory.
pub const DIGEST_LIST: &str = "digests.b3";

/// A blake3 digest as 64 lowercase hex characters.
pub type Digest = String;

/// Parses a digest list: one `<64-hex blake3>  <file name>` line per package.
pub fn parse(path: &Utf8Path, text: &str) -> Result<BTreeMap<String, Digest>> {
    let mut digests = BTreeMap::new();
    for (index, line) in text.lines().enumerate() {
        let line_no = index + 1;
        let bad =
            |message: String| Error::DigestList { path: path.to_owned(), line: line_no, message };
        if line.trim().is_empty() {
            continue;
        }
        let Some((digest, name)) = line.split_once("  ") else {
            return Err(bad("expected `<blake3 hex>  <file name>`".into()));
        };
        if digest.len() != 64 || !digest.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(bad(format!("`{digest}` is not a blake3 digest (64 lowercase hex)")));
        }
        // A name with a separator could make the installer read a file outside the packages
        // directory, so only plain file names are accepted.
        if name.is_empty() || name.contains('/') || name == "." || name == ".." {
            return Err(bad(format!("`{name}` is not a plain file name")));
        }
        if digests.insert(name.to_owned(), digest.to_owned()).is_some() {
            return Err(bad(format!("`{name}` is listed twice")));
        }
    }
    Ok(digests)
}

/// Computes the blake3 digest of a file, reading it in large blocks.
pub fn file_digest(path: &Utf8Path) -> Result<Digest> {
    let mut file = std::fs::File::open(path).map_err(io("open", path))?;
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(io("read", path))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher.finalize().to_hex().to_string())
}

/// One package of a packages directory, verified against the digest list.
#[derive(Debug, Clone)]
pub struct VerifiedPackage {
    /// The file name, for example `node-agent.tar.gz`.
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

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262";

    #[test]
    fn parses_b3sum_lines() {
        let text = format!("{D}  a.tar.gz\n{D}  b.tar\n");
        let map = parse(Utf8Path::new("d.b3"), &text).unwrap();
        assert_eq!(map.keys().collect::<Vec<_>>(), ["a.tar.gz", "b.tar"]);
    }

    #[test]
    fn rejects_bad_lines_with_line_numbers() {
        let cases = [
            (format!("{D}  a\nxyz"), "line 2: expected"),
            (format!("{}  a", &D[..10]), "line 1: `af1349b9f5` is not a blake3"),
            (format!("{D}  ../a"), "is not a plain file name"),
            (format!("{D}  a\n{D}  a"), "line 2: `a` is listed twice"),
        ];
        for (text, expected) in cases {
            let err = parse(Utf8Path::new("d.b3"), &text).unwrap_err().to_string();
            assert!(err.contains(expected), "{err:?} should contain {expected:?}");
        }
    }
}
