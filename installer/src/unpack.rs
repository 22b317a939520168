//! Safe extraction of one package archive into a release directory.
//!
//! Archives come from the build machine over the network, so every entry is checked before it
//! touches the disk: no absolute paths, no `..`, no symbolic or hard links that point outside the
//! release, no device files, nothing written through a symbolic link, and no entry that would
//! overwrite another (two packages claiming the same file is a packaging error, not a merge).

use std::collections::BTreeSet;
use std::fs;
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;

use camino::{Utf8Component, Utf8Path, Utf8PathBuf};
use tar::EntryType;

use crate::error::{io, Error, Result};

/// The two archive formats of `cargo xtask package`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArchiveKind {
    /// A gzip-compressed zone image: `oxide.json` first, files under `root/`.
    Zone,
    /// An uncompressed tarball of files for another package to use.
    Tarball,
}

impl ArchiveKind {
    /// Tells the kind from the file name, and returns the package name without the extension.
    pub fn from_file_name(name: &str) -> Option<(ArchiveKind, &str)> {
        if let Some(stem) = name.strip_suffix(".tar.gz") {
            Some((ArchiveKind::Zone, stem))
        } else {
            name.strip_suffix(".tar").map(|stem| (ArchiveKind::Tarball, stem))
        }
    }
}

/// What one archive put into the release.
#[derive(Debug, Default)]
pub struct Unpacked {
    /// The top-level directories of the release that the archive created files in; for a zone
    /// image each one is a service.
    pub top_dirs: BTreeSet<String>,
    /// The zone image's `oxide.json`, kept verbatim.
    pub metadata: Option<serde_json::Value>,
}

/// Extracts `archive` into `dest` (the release directory being built).
///
/// Zone images map `<zone_root>/<X>/...` (`root/opt/flotilla/<X>/...` for the default prefix,
/// see [`flotilla_contracts::Prefix::zone_root`]) to `<dest>/<X>/...`; tarballs go to
/// `<dest>/<package>/...`.
pub fn unpack(
    archive: &Utf8Path,
    kind: ArchiveKind,
    package: &str,
    dest: &Utf8Path,
    zone_root: &str,
) -> Result<Unpacked> {
    let file = fs::File::open(archive).map_err(io("open archive", archive))?;
    let reader: Box<dyn Read> = match kind {
        ArchiveKind::Zone => Box::new(flate2::read::GzDecoder::new(std::io::BufReader::new(file))),
        ArchiveKind::Tarball => Box::new(std::io::BufReader::new(file)),
    };
    let mut tar = tar::Archive::new(reader);
    let bad = |message: String| Error::Archive { archive: archive.to_owned(), message };
    let mut unpacked = Unpacked::default();
    let entries = tar.entries().map_err(|e| bad(format!("read archive: {e}")))?;
    for (index, entry) in entries.enumerate() {
        let mut entry = entry.map_err(|e| bad(format!("read entry {}: {e}", index + 1)))?;
        let raw = entry.path_bytes().into_owned();
        let Ok(name) = String::from_utf8(raw) else {
            return Err(bad(format!("entry {}: the path is not UTF-8", index + 1)));
        };
        let bad_entry = |message: &str| Error::Archive {
            archive: archive.to_owned(),
            message: format!("entry `{name}`: {message}"),
        };
        let path = clean_relative(&name).map_err(|m| bad_entry(&m))?;
        if kind == ArchiveKind::Zone && index == 0 {
            if path.as_str() != "oxide.json" || entry.header().entry_type() != EntryType::Regular {
                return Err(bad(format!("the first entry is `{name}`, not the file oxide.json")));
            }
            let mut text = String::new();
            entry.read_to_string(&mut text).map_err(|e| bad_entry(&e.to_string()))?;
            let value: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| bad_entry(&format!("not valid JSON: {e}")))?;
            unpacked.metadata = Some(value);
            continue;
        }
        if kind == ArchiveKind::Zone && index > 0 && path.as_str() == "oxide.json" {
            return Err(bad_entry("a second oxide.json"));
        }
        let Some(rel) = map_entry(kind, package, &path, zone_root).map_err(|m| bad_entry(&m))?
        else {
            continue;
        };
        if let Some(Utf8Component::Normal(top)) = rel.components().next() {
            unpacked.top_dirs.insert(top.to_owned());
        }
        let target = dest.join(&rel);
        let entry_type = entry.header().entry_type();
        match entry_type {
            EntryType::Directory => {
                ensure_dirs(dest, &rel).map_err(|m| bad_entry(&m))?;
            }
            EntryType::Regular | EntryType::Continuous => {
                if let Some(parent) = rel.parent() {
                    ensure_dirs(dest, parent).map_err(|m| bad_entry(&m))?;
                }
                // Set-id and sticky bits are dropped: nothing in a package needs them and they
                // would turn a packaging mistake into a privilege problem on every server.
                let mode = entry.header().mode().map_err(|e| bad_entry(&e.to_string()))? & 0o777;
                let mut out = fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(mode)
                    .open(&target)
                    .map_err(|e| bad_entry(&format!("create {target}: {e}")))?;
                // The archive's mode exactly, whatever the umask of the process.
                flotilla_contracts::atomic::set_file_mode(&out, mode)
                    .map_err(|e| bad_entry(&format!("set the mode of {target}: {e}")))?;
                std::io::copy(&mut entry, &mut out)
                    .map_err(|e| bad_entry(&format!("write {target}: {e}")))?;
            }
            EntryType::Symlink => {
                let link = entry
                    .link_name()
                    .map_err(|e| bad_entry(&e.to_string()))?
                    .ok_or_else(|| bad_entry("a symbolic link without a target"))?;
                let link = Utf8PathBuf::try_from(link.into_owned())
                    .map_err(|_| bad_entry("the link target is not UTF-8"))?;
                check_symlink_target(&rel, &link).map_err(|m| bad_entry(&m))?;
                if let Some(parent) = rel.parent() {
                    ensure_dirs(dest, parent).map_err(|m| bad_entry(&m))?;
                }
                std::os::unix::fs::symlink(&link, &target)
                    .map_err(|e| bad_entry(&format!("create symlink {target}: {e}")))?;
            }
            EntryType::Link => {
                let link = entry
                    .link_name()
                    .map_err(|e| bad_entry(&e.to_string()))?
                    .ok_or_else(|| bad_entry("a hard link without a target"))?;
                let link = Utf8PathBuf::try_from(link.into_owned())
                    .map_err(|_| bad_entry("the link target is not UTF-8"))?;
                let link = clean_relative(link.as_str())
                    .map_err(|m| bad_entry(&format!("hard link target: {m}")))?;
                let Some(link_rel) = map_entry(kind, package, &link, zone_root)
                    .map_err(|m| bad_entry(&format!("hard link target: {m}")))?
                else {
                    return Err(bad_entry("a hard link to a directory of the archive"));
                };
                let source = dest.join(&link_rel);
                // Only links to regular files this release already holds: linking to anything
                // else could expose a file of the host under the release.
                match fs::symlink_metadata(&source) {
                    Ok(meta) if meta.file_type().is_file() => {}
                    _ => return Err(bad_entry("a hard link to a file not earlier in the archive")),
                }
                if let Some(parent) = rel.parent() {
                    ensure_dirs(dest, parent).map_err(|m| bad_entry(&m))?;
                }
                fs::hard_link(&source, &target)
                    .map_err(|e| bad_entry(&format!("create hard link {target}: {e}")))?;
            }
            EntryType::Char | EntryType::Block | EntryType::Fifo => {
                return Err(bad_entry("a device file or fifo, which packages must not contain"));
            }
            other => {
                return Err(bad_entry(&format!("unsupported entry type {other:?}")));
            }
        }
    }
    if kind == ArchiveKind::Zone && unpacked.metadata.is_none() {
        return Err(bad("an empty archive: a zone image starts with oxide.json".into()));
    }
    Ok(unpacked)
}

/// Turns an archive path into a clean relative path: `.` components dropped, absolute paths and
/// `..` rejected.
pub fn clean_relative(name: &str) -> Result<Utf8PathBuf, String> {
    let mut clean = Utf8PathBuf::new();
    for component in Utf8Path::new(name).components() {
        match component {
            Utf8Component::Normal(part) => clean.push(part),
            Utf8Component::CurDir => {}
            Utf8Component::ParentDir => return Err("the path contains `..`".into()),
            Utf8Component::RootDir | Utf8Component::Prefix(_) => {
                return Err("an absolute path".into());
            }
        }
    }
    Ok(clean)
}

/// Maps a clean archive path to a path inside the release, or `None` for the directories that
/// only lead to the mapped root.
fn map_entry(
    kind: ArchiveKind,
    package: &str,
    path: &Utf8Path,
    zone_root: &str,
) -> Result<Option<Utf8PathBuf>, String> {
    match kind {
        ArchiveKind::Tarball => {
            if path.as_str().is_empty() {
                return Ok(None);
            }
            Ok(Some(Utf8Path::new(package).join(path)))
        }
        ArchiveKind::Zone => {
            // The directories that lead to the zone root map to nothing.
            let leads_to_root = path.as_str().is_empty()
                || zone_root
                    .strip_prefix(path.as_str())
                    .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'));
            if leads_to_root {
                return Ok(None);
            }
            match path.strip_prefix(zone_root) {
                Ok(rel) => Ok(Some(rel.to_owned())),
                Err(_) => {
                    Err(format!("lands outside {zone_root}/, the only tree the installer manages"))
                }
            }
        }
    }
}

/// Checks that a symbolic link at `rel` (relative to the release) with target `target` resolves
/// inside the release.
fn check_symlink_target(rel: &Utf8Path, target: &Utf8Path) -> Result<(), String> {
    if target.is_absolute() {
        return Err(format!("a symbolic link to the absolute path {target}"));
    }
    let mut depth: usize = rel.components().count().saturating_sub(1);
    for component in target.components() {
        match component {
            Utf8Component::Normal(_) => depth += 1,
            Utf8Component::CurDir => {}
            Utf8Component::ParentDir => {
                if depth == 0 {
                    return Err(format!("a symbolic link to {target}, outside the release"));
                }
                depth -= 1;
            }
            Utf8Component::RootDir | Utf8Component::Prefix(_) => {
                return Err(format!("a symbolic link to the absolute path {target}"));
            }
        }
    }
    Ok(())
}

/// Creates the directories of `rel` under `dest`, refusing to go through a symbolic link (an
/// earlier entry could have planted one that points out of the release).
pub(crate) fn ensure_dirs(dest: &Utf8Path, rel: &Utf8Path) -> Result<(), String> {
    let mut path = dest.to_owned();
    for component in rel.components() {
        path.push(component);
        match fs::symlink_metadata(&path) {
            Ok(meta) if meta.file_type().is_symlink() => {
                return Err(format!("goes through the symbolic link {path}"));
            }
            Ok(meta) if meta.is_dir() => {}
            Ok(_) => return Err(format!("{path} exists and is not a directory")),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                flotilla_contracts::atomic::create_dir(&path, 0o755)
                    .map_err(|e| format!("create directory {path}: {e}"))?;
            }
            Err(e) => return Err(format!("inspect {path}: {e}")),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn symlink_targets_must_stay_inside() {
        let ok = [("a/b/link", "../c"), ("a/link", "b/c"), ("a/b/link", "../../x")];
        for (rel, target) in ok {
            assert!(check_symlink_target(rel.into(), target.into()).is_ok(), "{rel} -> {target}");
        }
        let bad = [("a/link", "../../x"), ("link", ".."), ("a/link", "/etc/passwd")];
        for (rel, target) in bad {
            assert!(check_symlink_target(rel.into(), target.into()).is_err(), "{rel} -> {target}");
        }
    }

    #[test]
    fn zone_entries_map_under_the_flotilla_root() {
        let map =
            |p: &str| map_entry(ArchiveKind::Zone, "pkg", Utf8Path::new(p), "root/opt/flotilla");
        assert_eq!(map("root").unwrap(), None);
        assert_eq!(map("root/opt").unwrap(), None);
        assert_eq!(map("root/opt/flotilla").unwrap(), None);
        assert_eq!(map("root/opt/flotilla/svc/bin/x").unwrap().unwrap(), "svc/bin/x");
        assert!(map("root/etc/passwd").unwrap_err().contains("lands outside"));
        assert!(map("root/opt/flotillax/y").is_err());
        assert!(map("root/op").is_err());
        // Omicron's layout: another prefix, another zone root.
        let oxide =
            |p: &str| map_entry(ArchiveKind::Zone, "pkg", Utf8Path::new(p), "root/opt/oxide");
        assert_eq!(oxide("root/opt/oxide/nexus/bin/x").unwrap().unwrap(), "nexus/bin/x");
        assert!(oxide("root/opt/flotilla/svc/bin/x").unwrap_err().contains("root/opt/oxide/"));
        assert_eq!(
            map_entry(ArchiveKind::Tarball, "data", Utf8Path::new("a/b"), "root/opt/flotilla")
                .unwrap()
                .unwrap(),
            "data/a/b"
        );
    }

    #[test]
    fn clean_relative_rejects_escapes() {
        assert_eq!(clean_relative("./a/./b").unwrap(), "a/b");
        assert!(clean_relative("/a").is_err());
        assert!(clean_relative("a/../../b").is_err());
    }
}
