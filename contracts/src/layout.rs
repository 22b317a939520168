//! Where things live: the install prefix and the zone root it maps, the release layout under the
//! prefix, the staging directory a server receives a deploy in, and the rule that every
//! directory flotilla writes into or deletes must be one dedicated to it.
//!
//! ```text
//! <prefix>/                      /opt/flotilla unless configured
//!   current -> releases/<id>     the active release; switched with a rename, never rewritten
//!   releases/<id>/               one directory per unpacked release
//!     release.json               packages and digests, services, fingerprints, health checks
//!     <service>/bin/, pkg/       from the zone images (root<prefix>/<service>/...)
//!     <package>/                 from plain tarballs
//!   state.json                   activation history (which release, when, by whom)
//!   install.lock                 held while a command changes anything; says who holds it
//!   data/                        the services' data; kept by `uninstall` unless --purge
//!
//! <staging>/                     what a deploy sends a server (fling's `deployment.staging_dir`)
//!   .flotilla-staging            the marker: this directory is flotilla's to replace
//!   .staged-key                  the key of what was pushed and installed last
//!   packages/                    the archives and digests.b3
//!   overlay/                     this server's own files, under <prefix without the leading />
//!   bin/flotilla-installer       the installer
//!   .tools/                      what install-prereqs carried (rsync, when the server had none)
//! ```

use std::fmt;

use camino::{Utf8Component, Utf8Path, Utf8PathBuf};

/// The install prefix used unless the manifest, the deployment config or `--prefix` says
/// otherwise.
pub const DEFAULT_PREFIX: &str = "/opt/flotilla";

/// The name of the installer binary, on the builder and in a server's staging directory.
pub const INSTALLER: &str = "flotilla-installer";

/// A validated install prefix: an absolute, normalized path of plain characters that is a
/// directory of its own (see [`check_dedicated`]).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Prefix(Utf8PathBuf);

impl Prefix {
    pub fn new(path: &str) -> Result<Prefix, String> {
        let path = path.strip_suffix('/').filter(|p| !p.is_empty()).unwrap_or(path);
        check_plain_path(path)?;
        if !path.starts_with('/') {
            return Err(format!("the install prefix {path:?} must be an absolute path"));
        }
        check_dedicated(path, None)?;
        Ok(Prefix(Utf8PathBuf::from(path)))
    }

    pub fn as_path(&self) -> &Utf8Path {
        &self.0
    }

    pub fn as_str(&self) -> &str {
        self.0.as_str()
    }

    /// Where zone images keep the files that map into a release: `root<prefix>`, for example
    /// `root/opt/flotilla` (and `root/opt/oxide` for Omicron's layout).
    pub fn zone_root(&self) -> String {
        format!("root{}", self.0)
    }

    /// The prefix relative to `/`: where a server's overlay tree holds the files of the
    /// release, `opt/flotilla/<service>/pkg/...`.
    pub fn relative(&self) -> &str {
        self.0.as_str().trim_start_matches('/')
    }

    /// The overlay directory of a service, relative to the server's overlay root.
    pub fn overlay_service_dir(&self, service: &str) -> Utf8PathBuf {
        Utf8Path::new(self.relative()).join(service)
    }

    /// The paths of the installation under this prefix.
    pub fn layout(&self) -> Layout {
        Layout { prefix: self.0.clone() }
    }
}

impl Default for Prefix {
    fn default() -> Prefix {
        Prefix(Utf8PathBuf::from(DEFAULT_PREFIX))
    }
}

impl fmt::Display for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0.as_str())
    }
}

impl std::str::FromStr for Prefix {
    type Err = String;
    fn from_str(s: &str) -> Result<Prefix, String> {
        Prefix::new(s)
    }
}

/// The paths of an installation.
#[derive(Debug, Clone)]
pub struct Layout {
    pub prefix: Utf8PathBuf,
}

/// The name of a release's record, in its directory.
pub const RELEASE_RECORD: &str = "release.json";

impl Layout {
    pub fn releases(&self) -> Utf8PathBuf {
        self.prefix.join("releases")
    }
    pub fn release(&self, id: &str) -> Utf8PathBuf {
        self.releases().join(id)
    }
    pub fn current(&self) -> Utf8PathBuf {
        self.prefix.join("current")
    }
    pub fn state_file(&self) -> Utf8PathBuf {
        self.prefix.join("state.json")
    }
    pub fn lock_file(&self) -> Utf8PathBuf {
        self.prefix.join("install.lock")
    }
    pub fn data(&self) -> Utf8PathBuf {
        self.prefix.join("data")
    }
}

/// The names inside a server's staging directory (see the module comment).
pub mod staging {
    /// The marker fling writes into a staging directory it creates. A directory that exists
    /// without it is never replaced or removed: it may hold someone else's files.
    pub const MARKER: &str = ".flotilla-staging";
    /// The key of what was pushed there and installed from it last.
    pub const KEY: &str = ".staged-key";
    /// The archives and the digest list.
    pub const PACKAGES: &str = "packages";
    /// The server's own overlay.
    pub const OVERLAY: &str = "overlay";
    /// The installer's directory.
    pub const BIN: &str = "bin";
    /// What `install-prereqs` carried to a server that lacked it.
    pub const TOOLS: &str = ".tools";
}

/// The marker fling writes into the builder's copy of the workspace when it creates it: `sync`
/// mirrors with `--delete` only into a directory that holds it.
pub const SOURCE_MARKER: &str = ".flotilla-source";

/// Directories of the system that are never a dedicated directory themselves.
const SYSTEM_DIRS: &[&str] = &[
    "bin",
    "boot",
    "dev",
    "etc",
    "home",
    "lib",
    "lost+found",
    "media",
    "mnt",
    "opt",
    "proc",
    "root",
    "run",
    "sbin",
    "snap",
    "srv",
    "sys",
    "tmp",
    "usr",
    "var",
];

/// Top-level directories whose direct children belong to the system or to other users (a user's
/// home, `/var/lib`, `/etc/ssh`, ...): a directory right below them is not dedicated either.
/// Below `/opt`, `/srv`, `/tmp`, `/mnt` and `/media` (and a home), a directory of its own is
/// the usual place for one: `/opt/flotilla`, `/tmp/flotilla-staging`.
const SYSTEM_PARENTS: &[&str] =
    &["bin", "boot", "dev", "etc", "home", "proc", "run", "sbin", "sys", "usr", "var"];

/// Whether `path` (absolute, normalized) may be a directory that flotilla fills, replaces or
/// removes as a whole: not `/`, not a directory of the system or its direct child where that
/// is the system's or another user's (see [`SYSTEM_DIRS`] and [`SYSTEM_PARENTS`]), not below
/// `/usr`, `/etc`, `/boot`, `/dev`, `/proc`, `/sys`, `/bin`, `/sbin` or `/lib*` at all, and not
/// `home`, the home directory of the user it belongs to, when known.
pub fn check_dedicated(path: &str, home: Option<&str>) -> Result<(), String> {
    let trimmed = path.trim_end_matches('/');
    if trimmed.is_empty() {
        return Err("`/` is the whole system, not a directory of its own".into());
    }
    if let Some(home) = home.map(|h| h.trim_end_matches('/')) {
        if trimmed == home {
            return Err(format!(
                "{path} is the user's home directory itself; name a directory inside it"
            ));
        }
    }
    let parts: Vec<&str> = trimmed.trim_start_matches('/').split('/').collect();
    let top = parts[0];
    let lib = top.starts_with("lib");
    if parts.len() == 1 && (SYSTEM_DIRS.contains(&top) || lib) {
        return Err(format!(
            "{path} is a directory of the system; name a directory dedicated to flotilla"
        ));
    }
    let never_below = ["usr", "etc", "boot", "dev", "proc", "sys", "bin", "sbin"];
    if never_below.contains(&top) || lib {
        return Err(format!("{path} is inside /{top}, which belongs to the system"));
    }
    if parts.len() == 2 && SYSTEM_PARENTS.contains(&top) {
        let what =
            if top == "home" { "a user's home directory" } else { "a directory of the system" };
        return Err(format!("{path} is {what}; name a directory dedicated to flotilla inside it"));
    }
    Ok(())
}

/// The directories every caller's tests refuse as dedicated ones: `/` and the system's own
/// top-level directories that flotilla is most likely to be pointed at by mistake.
#[doc(hidden)]
pub const SYSTEM_EXAMPLES: &[&str] = &[
    "/", "/etc", "/usr", "/var", "/opt", "/home", "/root", "/tmp", "/boot", "/dev", "/proc",
    "/sys", "/run", "/lib", "/lib64", "/bin", "/sbin",
];

/// Whether `inner` is `outer` or lies inside it (both absolute and normalized).
pub fn overlaps(a: &str, b: &str) -> bool {
    let a = a.trim_end_matches('/');
    let b = b.trim_end_matches('/');
    let inside = |inner: &str, outer: &str| {
        inner == outer || inner.strip_prefix(outer).is_some_and(|rest| rest.starts_with('/'))
    };
    inside(a, b) || inside(b, a)
}

/// Checks that a path is made of plain characters and normal components: no `..` or `.`, no
/// doubled `/`, no control characters. `$` is not allowed either: the caller expands `$HOME`.
pub fn check_plain_path(path: &str) -> Result<(), String> {
    if let Some(c) = path.chars().find(|c| c.is_control()) {
        return Err(format!("the path {path:?} holds the control character {c:?}"));
    }
    if path.is_empty() {
        return Err("the path is empty".into());
    }
    if path.contains("//") {
        return Err(format!("the path {path:?} holds an empty component (`//`)"));
    }
    for component in Utf8Path::new(path).components() {
        match component {
            Utf8Component::RootDir | Utf8Component::Normal(_) => {}
            Utf8Component::ParentDir | Utf8Component::CurDir | Utf8Component::Prefix(_) => {
                return Err(format!("the path {path:?} holds `.` or `..`: write it normalized"));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn system_directories_are_refused_and_dedicated_ones_accepted() {
        for bad in SYSTEM_EXAMPLES.iter().copied().chain([
            "/etc/flotilla",
            "/usr/local",
            "/usr/local/flotilla",
            "/var/lib",
            "/var/tmp",
            "/home/bob",
            "/run/user",
            "/lib/x",
        ]) {
            assert!(check_dedicated(bad, None).is_err(), "{bad} was accepted");
        }
        for good in [
            "/opt/flotilla",
            "/opt/oxide",
            "/var/tmp/flotilla-staging",
            "/tmp/flotilla-staging",
            "/var/lib/flotilla",
            "/home/bob/flotilla",
            "/root/flotilla",
            "/srv/deploy",
            "/data/flotilla",
        ] {
            assert!(check_dedicated(good, None).is_ok(), "{good} was refused");
        }
        let err = check_dedicated("/home/bob/", Some("/home/bob")).unwrap_err();
        assert!(err.contains("home directory"), "{err}");
        assert!(check_dedicated("/srv/bob", Some("/srv/bob")).is_err());
    }

    #[test]
    fn overlap_is_either_way_round_and_by_component() {
        assert!(overlaps("/opt/flotilla", "/opt/flotilla/staging"));
        assert!(overlaps("/opt/flotilla/staging", "/opt/flotilla"));
        assert!(overlaps("/opt/flotilla", "/opt/flotilla/"));
        assert!(!overlaps("/opt/flotilla", "/opt/flotilla-staging"));
    }

    #[test]
    fn prefixes_map_their_zone_root() {
        let p = Prefix::new("/opt/oxide/").unwrap();
        assert_eq!(p.as_str(), "/opt/oxide");
        assert_eq!(p.zone_root(), "root/opt/oxide");
        assert_eq!(p.overlay_service_dir("nexus"), "opt/oxide/nexus");
        assert_eq!(Prefix::default().zone_root(), "root/opt/flotilla");
        for bad in ["opt/x", "/opt/../etc", "/opt//x", "/etc", "/opt/a\nb", "/"] {
            assert!(Prefix::new(bad).is_err(), "{bad:?}");
        }
    }
}
