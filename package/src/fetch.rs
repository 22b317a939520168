//! Fetching prebuilt packages and blobs: local paths and `file://` URLs offline, `http(s)://`
//! through `curl` with a bounded number of retries, always checked against the pinned sha256.

use std::process::Command;
use std::time::Duration;

use camino::{Utf8Path, Utf8PathBuf};
use sha2::{Digest, Sha256};

use crate::plan::{Fetch, Origin};

/// How often and how patiently a download is retried.
#[derive(Debug, Clone, Copy)]
pub struct Retry {
    /// Retries after the first attempt.
    pub count: u32,
    pub delay: Duration,
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
        Origin::Url(url) => {
            let dest = &spec.download_path;
            if dest.is_file() {
                match &spec.sha256 {
                    Some(_) if check(dest, spec).is_ok() => return Ok(dest.clone()),
                    // Unpinned bucket blobs are kept once downloaded, as omicron does.
                    None => return Ok(dest.clone()),
                    Some(_) => message(&format!("{dest} has another digest; downloading again")),
                }
            }
            download(url, dest, retry, message)?;
            if let Err(e) = check(dest, spec) {
                // A download with the wrong content must not be reused by the next run.
                let _ = std::fs::remove_file(dest);
                return Err(e);
            }
            Ok(dest.clone())
        }
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
