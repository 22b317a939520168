//! Fetching prebuilt packages and blobs: local paths and `file://` URLs offline, `http(s)://`
//! through `curl` with a bounded number of retries, always checked against the pinned sha256.

use std::process::Command;
use std::str::FromStr;
use std::time::Duration;

use camino::{Utf8Path, Utf8PathBuf};
use sha2::{Digest, Sha256};

use crate::manifest::DebFile;
use crate::plan::{Fetch, Origin};

/// How often and how patiently a download is retried.
#[derive(Debug, Clone, Copy)]
pub struct Retry {
    /// Retries after the first attempt.
    pub count: u32,
    pub delay: Duration,
}

/// Seconds between download retries (`cargo xtask package --retry-duration`): a finite number
/// from 0 to 3600. `fling build package` checks it with this same type on the client.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryDuration(f64);

impl RetryDuration {
    pub fn new(seconds: f64) -> Result<RetryDuration, String> {
        if !(0.0..=3600.0).contains(&seconds) {
            return Err(format!("{seconds}: give a number of seconds between 0 and 3600"));
        }
        Ok(RetryDuration(seconds))
    }

    pub fn seconds(self) -> f64 {
        self.0
    }
}

impl FromStr for RetryDuration {
    type Err = String;
    fn from_str(s: &str) -> Result<RetryDuration, String> {
        let seconds: f64 = s.parse().map_err(|_| format!("{s:?} is not a number of seconds"))?;
        RetryDuration::new(seconds)
    }
}

/// Makes the artifact available locally and returns its path: the local file itself, or the
/// download under `out/downloads/`, which is reused while it still has the pinned digest.
pub fn fetch(spec: &Fetch, retry: &Retry, message: &dyn Fn(&str)) -> Result<Utf8PathBuf, String> {
    match &spec.origin {
        Origin::Local(path) => {
            if !path.is_file() {
                return Err(format!("fetch {path}: no such file"));
            }
            check(path, spec)?;
            Ok(path.clone())
        }
        Origin::Url(_) | Origin::Deb(_) => {
            let dest = &spec.download_path;
            if dest.is_file() {
                match &spec.sha256 {
                    Some(_) if verified_before(dest, spec) => return Ok(dest.clone()),
                    Some(_) if check(dest, spec).is_ok() => {
                        record_verified(dest, spec);
                        return Ok(dest.clone());
                    }
                    // Unpinned bucket blobs are kept once downloaded, as omicron does.
                    None => return Ok(dest.clone()),
                    Some(_) => message(&format!("{dest} has another digest; downloading again")),
                }
            }
            match &spec.origin {
                Origin::Url(url) => download(url, dest, retry, message)?,
                Origin::Deb(deb) => fetch_deb(deb, spec, dest, message)?,
                Origin::Local(_) => unreachable!("handled above"),
            }
            if let Err(e) = check(dest, spec) {
                // A download with the wrong content must not be reused by the next run.
                let _ = std::fs::remove_file(dest);
                return Err(e);
            }
            record_verified(dest, spec);
            Ok(dest.clone())
        }
    }
}

/// The record, beside a download, of the digest it had when last checked, with its size and
/// modification time then. Hashing a large artifact on every no-op run costs more than the
/// rest of the run together; while the file's size and modification time are unchanged, its
/// earlier check still holds.
fn verified_path(path: &Utf8Path) -> Utf8PathBuf {
    let name = path.file_name().unwrap_or("download");
    path.with_file_name(format!(".{name}.verified"))
}

fn verified_line(path: &Utf8Path, sha256: &str) -> Option<String> {
    use std::os::unix::fs::MetadataExt as _;
    let meta = std::fs::metadata(path).ok()?;
    Some(format!("{sha256} {} {} {}\n", meta.len(), meta.mtime(), meta.mtime_nsec()))
}

fn verified_before(path: &Utf8Path, spec: &Fetch) -> bool {
    let Some(wanted) = &spec.sha256 else { return false };
    let Ok(recorded) = std::fs::read_to_string(verified_path(path)) else { return false };
    verified_line(path, wanted.as_str()).is_some_and(|now| now == recorded)
}

fn record_verified(path: &Utf8Path, spec: &Fetch) {
    let Some(wanted) = &spec.sha256 else { return };
    if let Some(line) = verified_line(path, wanted.as_str()) {
        // Best effort: without the record the next run hashes the file again.
        let _ = flotilla_contracts::atomic::write_atomic(
            &verified_path(path),
            line.as_bytes(),
            flotilla_contracts::atomic::PUBLIC,
        );
    }
}

fn check(path: &Utf8Path, spec: &Fetch) -> Result<(), String> {
    let Some(wanted) = &spec.sha256 else { return Ok(()) };
    let actual = sha256_file(path)?;
    if actual != wanted.as_str() {
        return Err(format!("{path}: sha256 is {actual}, but the manifest pins {wanted}"));
    }
    Ok(())
}

pub fn sha256_file(path: &Utf8Path) -> Result<String, String> {
    let mut file = std::fs::File::open(path).map_err(|e| format!("open {path}: {e}"))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n =
            std::io::Read::read(&mut file, &mut buf).map_err(|e| format!("read {path}: {e}"))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

fn download(
    url: &str,
    dest: &Utf8Path,
    retry: &Retry,
    message: &dyn Fn(&str),
) -> Result<(), String> {
    let dir = dest.parent().unwrap_or(Utf8Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| format!("create {dir}: {e}"))?;
    // curl writes to a temporary name that is renamed only after a complete transfer, so an
    // interrupted download is never mistaken for the artifact.
    let partial = dir.join(format!(".{}.partial", dest.file_name().unwrap_or("download")));
    let mut last = String::new();
    for attempt in 0..=retry.count {
        if attempt > 0 {
            message(&format!("retrying {url} ({attempt}/{}): {last}", retry.count));
            std::thread::sleep(retry.delay);
        } else {
            message(&format!("downloading {url}"));
        }
        let out = Command::new("curl")
            .args(["-fsSL", "--connect-timeout", "30", "-o"])
            .arg(partial.as_str())
            .arg(url)
            .output()
            .map_err(|e| format!("run curl for {url}: {e}"))?;
        if out.status.success() {
            return std::fs::rename(&partial, dest)
                .map_err(|e| format!("rename {partial} to {dest}: {e}"));
        }
        last = String::from_utf8_lossy(&out.stderr).trim().to_owned();
    }
    let _ = std::fs::remove_file(&partial);
    Err(format!("download {url}: failed after {} attempt(s): {last}", retry.count + 1))
}

/// The directory shared by every checkout of this user that keeps the files extracted from
/// Debian packages, by sha256: `$FLOTILLA_CACHE_DIR`, else `$XDG_CACHE_HOME/flotilla`, else
/// `$HOME/.cache/flotilla`. A fresh checkout (a builder's copy, a test's) finds a pinned file
/// there without reaching the network; `cargo xtask testbed prereqs` fills it ahead of tests.
pub fn shared_cache_dir() -> Option<Utf8PathBuf> {
    let var = |name| std::env::var(name).ok().filter(|v| !v.is_empty()).map(Utf8PathBuf::from);
    var("FLOTILLA_CACHE_DIR")
        .or_else(|| var("XDG_CACHE_HOME").map(|d| d.join("flotilla")))
        .or_else(|| var("HOME").map(|d| d.join(".cache/flotilla")))
}

/// Fetches every Debian file the manifest pins into the shared cache, so that packaging in any
/// checkout of this user then works offline. Returns the cached files.
pub fn prefetch_debs(
    manifest: &crate::manifest::Manifest,
    message: &dyn Fn(&str),
) -> Result<Vec<Utf8PathBuf>, String> {
    use crate::manifest::{Blob, PackageSource};
    let Some(dir) = shared_cache_dir() else {
        return Err(
            "prefetch Debian files: no cache directory (set HOME or FLOTILLA_CACHE_DIR)".into()
        );
    };
    let mut cached = Vec::new();
    for (name, package) in &manifest.packages {
        let PackageSource::Local { blobs, .. } = &package.source else { continue };
        for blob in blobs {
            let Blob::Pinned(pinned) = blob else { continue };
            let Some(deb) = &pinned.deb else { continue };
            let file = Utf8Path::new(&deb.file).file_name().unwrap_or("file");
            let path = dir.join("deb").join(pinned.sha256.as_str()).join(file);
            let spec = Fetch {
                origin: Origin::Deb(deb.clone()),
                sha256: Some(pinned.sha256.clone()),
                download_path: path,
            };
            let retry = Retry { count: 0, delay: Duration::ZERO };
            let path = fetch(&spec, &retry, message).map_err(|e| format!("package {name}: {e}"))?;
            cached.push(path);
        }
    }
    Ok(cached)
}

fn shared_path(spec: &Fetch, dest: &Utf8Path) -> Option<Utf8PathBuf> {
    let sha = spec.sha256.as_ref()?;
    Some(shared_cache_dir()?.join("deb").join(sha.as_str()).join(dest.file_name()?))
}

/// Copies the pinned file from the shared cache when it is there with the right digest, else
/// fetches and extracts the package and keeps a copy in the shared cache.
fn fetch_deb(
    deb: &DebFile,
    spec: &Fetch,
    dest: &Utf8Path,
    message: &dyn Fn(&str),
) -> Result<(), String> {
    let shared = shared_path(spec, dest);
    if let Some(shared) = shared.as_ref().filter(|p| p.is_file() && check(p, spec).is_ok()) {
        let dir = dest.parent().unwrap_or(Utf8Path::new("."));
        std::fs::create_dir_all(dir).map_err(|e| format!("create {dir}: {e}"))?;
        let partial = dir.join(format!(".{}.partial", dest.file_name().unwrap_or("deb")));
        std::fs::copy(shared, &partial).map_err(|e| format!("copy {shared} to {partial}: {e}"))?;
        return std::fs::rename(&partial, dest)
            .map_err(|e| format!("rename {partial} to {dest}: {e}"));
    }
    extract_deb(deb, dest, message)?;
    check(dest, spec)?;
    if let Some(shared) = shared.filter(|s| s != dest) {
        // The shared copy only saves a later download, so failing to write it is not an error
        // of this build; it is written under a temporary name so no reader sees half a file.
        if let Some(dir) = shared.parent() {
            let partial = dir.join(".partial");
            let stored = std::fs::create_dir_all(dir)
                .and_then(|()| std::fs::copy(dest, &partial))
                .and_then(|_| std::fs::rename(&partial, &shared));
            if let Err(e) = stored {
                message(&format!("could not keep a copy in {shared}: {e}"));
            }
        }
    }
    Ok(())
}

/// Fetches a Debian package with `apt-get download` (no root needed: it only writes into its
/// working directory) and extracts one file of it with `dpkg-deb -x`. The package and its
/// unpacked tree live in a scratch directory beside `dest` that is removed afterwards, so only
/// the pinned file is kept.
fn extract_deb(deb: &DebFile, dest: &Utf8Path, message: &dyn Fn(&str)) -> Result<(), String> {
    let dir = dest.parent().unwrap_or(Utf8Path::new("."));
    let name = dest.file_name().unwrap_or("deb");
    let work = dir.join(format!(".{name}.deb-work"));
    if work.exists() {
        std::fs::remove_dir_all(&work).map_err(|e| format!("remove {work}: {e}"))?;
    }
    std::fs::create_dir_all(&work).map_err(|e| format!("create {work}: {e}"))?;
    let result = extract_deb_in(deb, &work, dest, message);
    let _ = std::fs::remove_dir_all(&work);
    result
}

/// Whether this process runs as root: the owner of `/proc/self` is its effective user.
fn running_as_root() -> bool {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

fn extract_deb_in(
    deb: &DebFile,
    work: &Utf8Path,
    dest: &Utf8Path,
    message: &dyn Fn(&str),
) -> Result<(), String> {
    let pinned = format!("{}={}", deb.package, deb.version);
    message(&format!("downloading Debian package {pinned}"));
    let download = || {
        Command::new("apt-get")
            .args(["download", "--quiet"])
            .arg(&pinned)
            .current_dir(work)
            .output()
            .map_err(|e| format!("run apt-get download {pinned} (a Debian or Ubuntu host): {e}"))
    };
    let mut out = download()?;
    // apt answers from its local package lists. "Unable to locate package" means the lists do
    // not know the package at all: never fetched on a fresh machine, or out of date. As root,
    // refresh them once and ask again; otherwise say what to run.
    let unknown_package = |out: &std::process::Output| {
        String::from_utf8_lossy(&out.stderr).contains("Unable to locate package")
    };
    if !out.status.success() && unknown_package(&out) && running_as_root() {
        message("apt's package lists do not know it: running apt-get update");
        let update = Command::new("apt-get")
            .args(["update", "--quiet"])
            .output()
            .map_err(|e| format!("run apt-get update: {e}"))?;
        if !update.status.success() {
            let stderr = String::from_utf8_lossy(&update.stderr).trim().to_owned();
            return Err(format!("apt-get update (to find {pinned}): {stderr}"));
        }
        out = download()?;
    }
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
        if unknown_package(&out) {
            return Err(format!(
                "apt-get download {pinned}: apt's package lists do not know {}: run \
                 `sudo apt-get update` once, then package again: {stderr}",
                deb.package
            ));
        }
        if stderr.contains("was not found") {
            return Err(format!(
                "apt-get download {pinned}: the archive no longer has this version; Debian \
                 superseded it: update the pin (version and sha256) in the manifest: {stderr}"
            ));
        }
        return Err(format!("apt-get download {pinned}: {stderr}"));
    }
    let debs: Vec<Utf8PathBuf> = work
        .read_dir_utf8()
        .map_err(|e| format!("list {work}: {e}"))?
        .filter_map(|e| e.ok().map(|e| e.into_path()))
        .filter(|p| p.extension() == Some("deb"))
        .collect();
    let [package] = debs.as_slice() else {
        return Err(format!(
            "apt-get download {pinned}: expected one .deb in {work}, found {debs:?}"
        ));
    };
    let tree = work.join("tree");
    let out = Command::new("dpkg-deb")
        .arg("-x")
        .arg(package.as_str())
        .arg(tree.as_str())
        .output()
        .map_err(|e| format!("run dpkg-deb -x {package}: {e}"))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
        return Err(format!("extract {package} with dpkg-deb: {stderr}"));
    }
    let source = tree.join(&deb.file);
    if !source.is_file() {
        return Err(format!("Debian package {pinned} has no file {}", deb.file));
    }
    // The copy keeps the file's mode, so an executable stays one in the archive. It is renamed
    // into place only when complete.
    let partial = work.join("partial");
    std::fs::copy(&source, &partial).map_err(|e| format!("copy {source} to {partial}: {e}"))?;
    std::fs::rename(&partial, dest).map_err(|e| format!("rename {partial} to {dest}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_durations_are_the_builders_range() {
        assert_eq!("0.5".parse::<RetryDuration>().unwrap().seconds(), 0.5);
        for bad in ["-1", "3601", "NaN", "inf", "soon"] {
            assert!(bad.parse::<RetryDuration>().is_err(), "{bad}");
        }
    }

    fn deb(version: &str) -> DebFile {
        DebFile {
            package: "etcd-server".into(),
            version: version.into(),
            file: "usr/bin/etcd".into(),
        }
    }

    fn spec(dir: &Utf8Path, version: &str, sha256: &str) -> Fetch {
        Fetch {
            origin: Origin::Deb(deb(version)),
            sha256: Some(crate::manifest::Sha256Digest::new(sha256).unwrap()),
            download_path: dir.join("etcd"),
        }
    }

    fn temp() -> (tempfile::TempDir, Utf8PathBuf) {
        let tmp = tempfile::tempdir().unwrap();
        let dir = Utf8PathBuf::try_from(tmp.path().to_owned()).unwrap();
        (tmp, dir)
    }

    const RETRY: Retry = Retry { count: 0, delay: Duration::ZERO };

    /// A file with the pinned digest is the cache: no apt-get runs, so this works offline (the
    /// version pinned here does not exist, and running apt-get would fail).
    #[test]
    fn a_cached_deb_file_with_the_pinned_digest_is_reused() {
        let (_tmp, dir) = temp();
        std::fs::write(dir.join("etcd"), b"cached etcd").unwrap();
        let sha = sha256_file(&dir.join("etcd")).unwrap();
        let spec = spec(&dir, "0.0.0-flotilla-test", &sha);
        let messages = std::cell::RefCell::new(Vec::new());
        let path = fetch(&spec, &RETRY, &|m| messages.borrow_mut().push(m.to_owned())).unwrap();
        assert_eq!(path, dir.join("etcd"));
        assert_eq!(std::fs::read(&path).unwrap(), b"cached etcd");
        assert!(messages.borrow().is_empty(), "{:?}", messages.borrow());
    }

    /// A verified download is not hashed again while its size and mtime are unchanged; a file
    /// changed since then is checked again and its wrong digest noticed (here it leads to a
    /// download attempt of a version that does not exist, which fails).
    #[test]
    fn a_verified_download_is_rechecked_only_when_it_changed() {
        let (_tmp, dir) = temp();
        std::fs::write(dir.join("etcd"), b"cached etcd").unwrap();
        let sha = sha256_file(&dir.join("etcd")).unwrap();
        let spec = spec(&dir, "0.0.0-flotilla-test", &sha);
        fetch(&spec, &RETRY, &|_| {}).unwrap();
        assert!(verified_before(&dir.join("etcd"), &spec), "the check was recorded");
        fetch(&spec, &RETRY, &|_| {}).unwrap();
        std::fs::write(dir.join("etcd"), b"tampered etcd!").unwrap();
        assert!(!verified_before(&dir.join("etcd"), &spec), "a changed file is not trusted");
        let messages = std::cell::RefCell::new(Vec::new());
        let err = fetch(&spec, &RETRY, &|m| messages.borrow_mut().push(m.to_owned())).unwrap_err();
        assert!(messages.borrow().iter().any(|m| m.contains("has another digest")), "{err}");
    }

    /// A version the archive does not have (as after a Debian point release superseded it) is
    /// an error that says to update the pin, and a stale cached file is not used instead. apt
    /// answers this from its local package lists.
    #[test]
    fn a_version_debian_no_longer_has_asks_to_update_the_pin() {
        let (_tmp, dir) = temp();
        std::fs::write(dir.join("etcd"), b"another etcd").unwrap();
        let spec = spec(&dir, "0.0.0-flotilla-test", &"0".repeat(64));
        let err = fetch(&spec, &RETRY, &|_| {}).unwrap_err();
        assert!(err.contains("apt-get download etcd-server=0.0.0-flotilla-test"), "{err}");
        assert!(err.contains("Debian superseded it: update the pin"), "{err}");
        assert!(!dir.join(".etcd.deb-work").exists(), "the scratch directory was left behind");
    }

    /// A fresh checkout finds the pinned file in the user's shared cache and copies it, again
    /// without apt-get (the version pinned here does not exist).
    #[test]
    fn a_fresh_checkout_takes_the_pinned_file_from_the_shared_cache() {
        let (_tmp, dir) = temp();
        let (_cache_tmp, cache) = temp();
        std::fs::write(cache.join("etcd"), b"shared etcd").unwrap();
        let sha = sha256_file(&cache.join("etcd")).unwrap();
        let shared_dir = cache.join("deb").join(&sha);
        std::fs::create_dir_all(&shared_dir).unwrap();
        std::fs::rename(cache.join("etcd"), shared_dir.join("etcd")).unwrap();
        // Only this test sets the variable; the others pin digests no cache holds.
        std::env::set_var("FLOTILLA_CACHE_DIR", &cache);
        let spec = spec(&dir.join("downloads"), "0.0.0-flotilla-test", &sha);
        let path = fetch(&spec, &RETRY, &|_| {}).unwrap();
        assert_eq!(path, dir.join("downloads/etcd"));
        assert_eq!(std::fs::read(&path).unwrap(), b"shared etcd");
    }
}
