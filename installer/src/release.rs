//! The on-host layout, the record of each release, and the activation history.
//!
//! ```text
//! <prefix>/                      /opt/flotilla unless configured
//!   current -> releases/<id>     the active release; switched with a rename, never rewritten
//!   releases/<id>/               one directory per unpacked release
//!     release.json               packages and digests, services, fingerprints, health checks
//!     <service>/bin/, pkg/       from the zone images (root/opt/flotilla/<service>/...)
//!     <package>/                 from plain tarballs
//!   releases/.tmp-<id>-<pid>/    a release being unpacked; never activated, removed by `clean`
//!   state.json                   activation history (which release, when, by whom)
//!   install.lock                 held while a command changes anything; says who holds it
//!   data/                        the services' data; kept by `uninstall` unless --purge
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::fs;

use camino::{Utf8Path, Utf8PathBuf};
use serde::{Deserialize, Serialize};

use crate::error::{io, Error, Result};
use crate::health::HealthCheck;
use crate::manager::ServiceRef;

pub use flotilla_contracts::layout::{Layout, DEFAULT_PREFIX, RELEASE_RECORD};

/// What the installer reads and switches in a [`Layout`]: the active release and the list of
/// releases.
pub trait Releases {
    /// The id of the active release, from the `current` link.
    fn active(&self) -> Result<Option<String>>;
    /// Points `current` at a release, or removes it.
    fn switch_current(&self, id: Option<&str>) -> Result<()>;
    /// Every unpacked release, oldest first.
    fn releases_list(&self) -> Result<Vec<ReleaseInfo>>;
}

impl Releases for Layout {
    /// The id of the active release, from the `current` link.
    fn active(&self) -> Result<Option<String>> {
        let link = self.current();
        match fs::read_link(&link) {
            Ok(target) => {
                let target = Utf8PathBuf::try_from(target).map_err(|e| Error::State {
                    path: link.clone(),
                    message: format!("the link target is not UTF-8: {e}"),
                })?;
                match target.file_name() {
                    Some(id) => Ok(Some(id.to_owned())),
                    None => {
                        Err(Error::State { path: link, message: format!("points at {target}") })
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::Io { action: "read link", path: link, source: e }),
        }
    }

    /// Points `current` at a release, or removes it. The new link is made under a temporary
    /// name and renamed over the old one, so every reader sees either the old release or the
    /// new one, never a missing link.
    fn switch_current(&self, id: Option<&str>) -> Result<()> {
        let link = self.current();
        let Some(id) = id else {
            return match fs::remove_file(&link) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    Err(Error::Io { action: "remove link", path: link, source: e })
                }
                _ => Ok(()),
            };
        };
        let temp = self.prefix.join(format!(".current-{}", std::process::id()));
        let _ = fs::remove_file(&temp);
        // A relative target keeps the installation valid if the prefix is moved or mounted
        // elsewhere (a chroot, a container image).
        std::os::unix::fs::symlink(format!("releases/{id}"), &temp)
            .map_err(io("create link", &temp))?;
        fs::rename(&temp, &link).map_err(io("switch link", &link))?;
        fsync_dir(&self.prefix);
        Ok(())
    }

    /// Every unpacked release, oldest first.
    fn releases_list(&self) -> Result<Vec<ReleaseInfo>> {
        let dir = self.releases();
        let mut list = Vec::new();
        let entries = match dir.read_dir_utf8() {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(list),
            Err(e) => return Err(Error::Io { action: "list releases", path: dir, source: e }),
        };
        for entry in entries {
            let entry = entry.map_err(io("list releases", &dir))?;
            if entry.file_name().starts_with('.') {
                continue;
            }
            list.push(ReleaseInfo::read(entry.path())?);
        }
        list.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
        Ok(list)
    }
}

/// Flushes a directory so a rename in it survives a crash; best effort, as some filesystems
/// do not support it.
pub(crate) fn fsync_dir(dir: &Utf8Path) {
    if let Ok(file) = fs::File::open(dir) {
        let _ = file.sync_all();
    }
}

/// Writes a file atomically with exactly `mode` (see [`flotilla_contracts::atomic`]).
pub(crate) fn write_atomic(path: &Utf8Path, contents: &[u8], mode: u32) -> Result<()> {
    write_atomic_owned(path, contents, mode, None)
}

/// [`write_atomic`] for a file that must belong to `owner` (when given).
pub(crate) fn write_atomic_owned(
    path: &Utf8Path,
    contents: &[u8],
    mode: u32,
    owner: Option<crate::accounts::Owner>,
) -> Result<()> {
    flotilla_contracts::atomic::write_atomic_owned(path, contents, mode, owner)
        .map_err(|e| Error::Io { action: e.action, path: e.path, source: e.source })
}

/// A package of a release.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackageInfo {
    /// The package name (the file name without `.tar.gz` or `.tar`).
    pub name: String,
    pub file: String,
    pub digest: String,
}

/// A service of a release.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceInfo {
    pub name: String,
    /// The packages that put files into the service's directory.
    pub packages: Vec<String>,
    /// A digest over every file of the service's directory (after the overlay): equal
    /// fingerprints mean nothing about the service changed, so it is not restarted.
    pub fingerprint: String,
    /// Services of the same release that must be started before this one.
    pub after: Vec<String>,
    pub health: Option<HealthCheck>,
    /// The SMF instance FMRI, when the service has a manifest.
    pub fmri: Option<String>,
    /// The user the service runs as, from its definition for this host's manager; `None` is
    /// root. Recorded by releases unpacked since services declare users.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<crate::accounts::ServiceUser>,
}

/// The record of one release, `releases/<id>/release.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleaseInfo {
    pub id: String,
    /// Seconds since the Unix epoch when the release was unpacked.
    pub created_at: u64,
    pub packages: Vec<PackageInfo>,
    /// The digest of the overlay tree placed into the release, if any.
    pub overlay: Option<String>,
    /// Each file of the overlay, by path and digest (empty without an overlay); `None` in the
    /// records of releases unpacked before the installer kept it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overlay_files: Option<Vec<flotilla_contracts::installer::OverlayFile>>,
    /// The services, in the order they are started.
    pub services: Vec<ServiceInfo>,
}

impl ReleaseInfo {
    /// Reads the record of the release in `dir`.
    pub fn read(dir: &Utf8Path) -> Result<ReleaseInfo> {
        let path = dir.join(RELEASE_RECORD);
        let text = fs::read_to_string(&path).map_err(io("read release record", &path))?;
        serde_json::from_str(&text).map_err(|e| Error::State { path, message: e.to_string() })
    }

    /// Writes the record into `dir`.
    pub fn write(&self, dir: &Utf8Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self).expect("a release record serializes");
        write_atomic(&dir.join(RELEASE_RECORD), text.as_bytes(), 0o644)
    }

    /// The services as the drivers see them, with directories in `release_dir`.
    pub fn service_refs(&self, release_dir: &Utf8Path) -> Vec<ServiceRef> {
        self.services
            .iter()
            .map(|s| ServiceRef {
                name: s.name.clone(),
                dir: release_dir.join(&s.name),
                fmri: s.fmri.clone(),
            })
            .collect()
    }
}

/// The release id for a set of verified packages and an overlay: a digest over both, so the
/// same packages with the same overlay are the same release and installing them again is a
/// no-op.
pub fn release_id(packages: &[PackageInfo], overlay: Option<&str>) -> String {
    let mut hasher = blake3::Hasher::new();
    for p in packages {
        hasher.update(format!("{}  {}\n", p.digest, p.file).as_bytes());
    }
    if let Some(overlay) = overlay {
        hasher.update(format!("overlay {overlay}\n").as_bytes());
    }
    hasher.finalize().to_hex()[..16].to_owned()
}

/// A digest over a directory tree: relative paths, file types, modes, contents and link
/// targets, in sorted order.
pub fn tree_digest(root: &Utf8Path) -> Result<String> {
    let mut hasher = blake3::Hasher::new();
    hash_tree(root, Utf8Path::new(""), &mut hasher)?;
    Ok(hasher.finalize().to_hex().to_string())
}

fn hash_tree(root: &Utf8Path, rel: &Utf8Path, hasher: &mut blake3::Hasher) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let dir = root.join(rel);
    let mut names: Vec<String> = dir
        .read_dir_utf8()
        .map_err(io("list", &dir))?
        .map(|e| e.map(|e| e.file_name().to_owned()))
        .collect::<Result<_, _>>()
        .map_err(io("list", &dir))?;
    names.sort();
    for name in names {
        let rel = rel.join(&name);
        let path = root.join(&rel);
        let meta = fs::symlink_metadata(&path).map_err(io("inspect", &path))?;
        let mode = meta.permissions().mode() & 0o777;
        if meta.file_type().is_symlink() {
            let target = fs::read_link(&path).map_err(io("read link", &path))?;
            hasher.update(format!("L {rel} {}\n", target.display()).as_bytes());
        } else if meta.is_dir() {
            hasher.update(format!("D {rel} {mode:o}\n").as_bytes());
            hash_tree(root, &rel, hasher)?;
        } else {
            hasher.update(format!("F {rel} {mode:o} {}\n", meta.len()).as_bytes());
            let mut file = fs::File::open(&path).map_err(io("open", &path))?;
            std::io::copy(&mut file, hasher).map_err(io("read", &path))?;
        }
    }
    Ok(())
}

/// Orders services so that each comes after the services it names in `after`; ties are broken
/// by name so the order is the same on every host.
pub fn dependency_order(services: Vec<ServiceInfo>) -> Result<Vec<ServiceInfo>> {
    let names: BTreeSet<String> = services.iter().map(|s| s.name.clone()).collect();
    let mut pending: BTreeMap<String, ServiceInfo> =
        services.into_iter().map(|s| (s.name.clone(), s)).collect();
    let mut ordered: Vec<ServiceInfo> = Vec::new();
    while !pending.is_empty() {
        let ready = pending
            .values()
            .find(|s| {
                s.after.iter().all(|d| !names.contains(d) || ordered.iter().any(|o| &o.name == d))
            })
            .map(|s| s.name.clone());
        let Some(name) = ready else {
            let cycle: Vec<&str> = pending.keys().map(String::as_str).collect();
            return Err(Error::Service {
                service: cycle.join(", "),
                message: "the services depend on each other in a cycle".into(),
            });
        };
        ordered.push(pending.remove(&name).expect("found above"));
    }
    Ok(ordered)
}

/// One activation, as recorded in `state.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Activation {
    pub release: String,
    /// Seconds since the Unix epoch.
    pub at: u64,
    /// Who ran the installer (`user@host`).
    pub by: String,
    /// What the activation was: `install`, `rollback`, `revert`.
    pub kind: String,
}

/// The activation history of a host.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    pub history: Vec<Activation>,
    /// An activation under way: written before `current` is switched and cleared when it
    /// ends, so an installer killed half-way is recognised by the next run, which then treats
    /// the release it started from as the running one and restarts what it must.
    #[serde(default)]
    pub pending: Option<Pending>,
}

/// An activation that has started and not finished.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pending {
    /// The release that was active when it started, if any.
    pub from: Option<String>,
    /// The release being activated.
    pub to: String,
}

impl State {
    pub fn read(layout: &Layout) -> Result<State> {
        let path = layout.state_file();
        match fs::read_to_string(&path) {
            Ok(text) => serde_json::from_str(&text)
                .map_err(|e| Error::State { path, message: e.to_string() }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(State::default()),
            Err(e) => Err(Error::Io { action: "read state", path, source: e }),
        }
    }

    pub fn write(&self, layout: &Layout) -> Result<()> {
        let text = serde_json::to_string_pretty(self).expect("the state serializes");
        write_atomic(&layout.state_file(), text.as_bytes(), 0o644)
    }

    /// The release that was active before `current`: the latest one in the history that is not
    /// `current` and still exists.
    pub fn previous(&self, current: Option<&str>, layout: &Layout) -> Option<String> {
        self.history
            .iter()
            .rev()
            .map(|a| a.release.as_str())
            .find(|r| Some(*r) != current && layout.release(r).join(RELEASE_RECORD).is_file())
            .map(str::to_owned)
    }
}

/// Seconds since the Unix epoch.
pub fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(name: &str, after: &[&str]) -> ServiceInfo {
        ServiceInfo {
            name: name.into(),
            packages: vec![],
            fingerprint: String::new(),
            after: after.iter().map(|s| (*s).to_owned()).collect(),
            health: None,
            fmri: None,
            user: None,
        }
    }

    #[test]
    fn orders_by_dependencies_then_name() {
        let ordered = dependency_order(vec![
            svc("a", &["c"]),
            svc("b", &[]),
            svc("c", &["b", "network.target"]),
        ])
        .unwrap();
        let names: Vec<&str> = ordered.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["b", "c", "a"]);
        let err =
            dependency_order(vec![svc("a", &["b"]), svc("b", &["a"])]).unwrap_err().to_string();
        assert_eq!(err, "service a, b: the services depend on each other in a cycle");
    }

    #[test]
    fn release_id_depends_on_packages_and_overlay() {
        let p =
            |d: &str| PackageInfo { name: "a".into(), file: "a.tar.gz".into(), digest: d.into() };
        let a = release_id(&[p("00")], None);
        assert_eq!(a, release_id(&[p("00")], None));
        assert_ne!(a, release_id(&[p("01")], None));
        assert_ne!(a, release_id(&[p("00")], Some("ff")));
        assert_eq!(a.len(), 16);
    }
}
