//! The digest list, `digests.b3`: what `cargo xtask package` built, by file name and blake3
//! digest, in the format of `b3sum` (`<64 lowercase hex>  <file name>` per line, sorted by
//! name). The packager writes it with [`render`]; the installer reads it with [`parse`] and
//! checks every archive against it; fling keys what a server already holds by it.

use std::collections::BTreeMap;
use std::io::Read;

use camino::{Utf8Path, Utf8PathBuf};

/// The name of the digest list inside a packages directory.
pub const DIGEST_LIST: &str = "digests.b3";

/// A blake3 digest as 64 lowercase hex characters.
pub type Digest = String;

/// A digest list that cannot be read, with its line.
#[derive(Debug, thiserror::Error)]
#[error("read digest list {path}: line {line}: {message}")]
pub struct DigestListError {
    pub path: Utf8PathBuf,
    pub line: usize,
    pub message: String,
}

/// Whether `text` is a 256-bit digest as flotilla writes one, 64 lowercase hex characters: the
/// blake3 digests of `digests.b3` and the store's keys, and the installer's sha256.
pub fn is_digest(text: &str) -> bool {
    text.len() == 64 && text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Whether `name` may be listed: a plain file name, so that a list can never make a reader
/// open a file outside its packages directory.
pub fn is_plain_file_name(name: &str) -> bool {
    !name.is_empty() && !name.contains(['/', '\0', '\n']) && name != "." && name != ".."
}

/// Parses a digest list; `path` is only used in messages.
pub fn parse(path: &Utf8Path, text: &str) -> Result<BTreeMap<String, Digest>, DigestListError> {
    let mut digests = BTreeMap::new();
    for (index, line) in text.lines().enumerate() {
        let bad =
            |message: String| DigestListError { path: path.to_owned(), line: index + 1, message };
        if line.trim().is_empty() {
            continue;
        }
        let Some((digest, name)) = line.split_once("  ") else {
            return Err(bad("expected `<blake3 hex>  <file name>`".into()));
        };
        if !is_digest(digest) {
            return Err(bad(format!("`{digest}` is not a blake3 digest (64 lowercase hex)")));
        }
        if !is_plain_file_name(name) {
            return Err(bad(format!("`{name}` is not a plain file name")));
        }
        if digests.insert(name.to_owned(), digest.to_owned()).is_some() {
            return Err(bad(format!("`{name}` is listed twice")));
        }
    }
    Ok(digests)
}

/// The text of a digest list: one line per file, sorted by name (the map's order).
pub fn render(digests: &BTreeMap<String, Digest>) -> String {
    digests.iter().map(|(file, digest)| format!("{digest}  {file}\n")).collect()
}

/// The blake3 digest of a file, read in large blocks.
pub fn file_digest(path: &Utf8Path) -> std::io::Result<Digest> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher.finalize().to_hex().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262";

    #[test]
    fn parses_what_it_renders() {
        let text = format!("{D}  a.tar.gz\n{D}  b.tar\n");
        let map = parse(Utf8Path::new("d.b3"), &text).unwrap();
        assert_eq!(map.keys().collect::<Vec<_>>(), ["a.tar.gz", "b.tar"]);
        assert_eq!(render(&map), text);
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
