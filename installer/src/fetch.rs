//! `fetch`: downloads what a deploy needs from an S3-compatible store, with the presigned URLs
//! the builder signed for this server ([`FetchList`]), into the staging directory.
//!
//! Every object is written under a temporary name and its blake3 digest checked before it
//! takes its file's name: a tampered or truncated object is refused with a digest error and
//! never reaches `install`, which verifies everything against the digest list once more. A
//! download cut short resumes where it stopped (an HTTP range) and is retried a bounded number
//! of times; a file already staged with the right digest is not downloaded again. The store's
//! refusals are reported as they are (an expired URL says so).

use std::fs;
use std::io::{Read, Write};
use std::time::Duration;

use camino::{Utf8Path, Utf8PathBuf};
use flotilla_contracts::digests::{file_digest, render, DIGEST_LIST};
use flotilla_contracts::store::{FetchList, FetchObject};

use crate::error::{io, Error, Result};

/// What a fetch did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Fetched {
    /// Files downloaded now, and their bytes.
    pub downloaded: Vec<String>,
    pub bytes: u64,
    /// Files already staged with the right digest.
    pub kept: Vec<String>,
    /// Archives removed because this deploy does not list them.
    pub removed: Vec<String>,
}

/// How a fetch runs.
#[derive(Debug, Clone)]
pub struct FetchOptions {
    /// Tries per object (resuming each time), at least 1.
    pub attempts: u32,
    /// Pause between tries.
    pub backoff: Duration,
    /// How long one request may take as a whole.
    pub timeout: Duration,
}

impl Default for FetchOptions {
    fn default() -> FetchOptions {
        FetchOptions {
            attempts: 5,
            backoff: Duration::from_millis(500),
            timeout: Duration::from_secs(600),
        }
    }
}

/// Fetches the packages of `list` into `packages` (writing its digest list, removing archives
/// it does not name) and, with `installer`, the installer binary to that path (mode 0755).
pub fn fetch(
    list: &FetchList,
    packages: &Utf8Path,
    installer: Option<&Utf8Path>,
    options: &FetchOptions,
) -> Result<Fetched> {
    for object in list.packages.iter().chain([&list.installer]) {
        if !flotilla_contracts::digests::is_digest(&object.digest)
            || !flotilla_contracts::digests::is_plain_file_name(&object.file)
        {
            return Err(Error::Fetch {
                file: object.file.clone(),
                message: "the fetch list names it with a bad file name or digest".into(),
            });
        }
    }
    flotilla_contracts::atomic::create_dir_all(packages, 0o700).map_err(io("create", packages))?;
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(options.timeout))
        .http_status_as_error(false)
        .build()
        .into();
    let mut done = Fetched::default();
    if let Some(path) = installer {
        let dir = path.parent().unwrap_or(Utf8Path::new("."));
        flotilla_contracts::atomic::create_dir_all(dir, 0o700).map_err(io("create", dir))?;
        let name = path.file_name().unwrap_or("installer");
        get(&agent, &list.installer, dir, name, list.expires_at, options, &mut done)?;
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(path, fs::Permissions::from_mode(0o755))
            .map_err(io("set the mode of", path))?;
    }
    for object in &list.packages {
        get(&agent, object, packages, &object.file, list.expires_at, options, &mut done)?;
    }
    // The digest list names exactly what was fetched; archives of earlier deploys go, so the
    // installer's check that every archive is listed holds.
    let listed: std::collections::BTreeMap<String, String> =
        list.packages.iter().map(|o| (o.file.clone(), o.digest.clone())).collect();
    for entry in packages.read_dir_utf8().map_err(io("list", packages))? {
        let entry = entry.map_err(io("list", packages))?;
        let name = entry.file_name();
        let archive = name.ends_with(".tar.gz") || name.ends_with(".tar");
        if (archive && !listed.contains_key(name)) || name.starts_with(".fetch-") {
            fs::remove_file(entry.path()).map_err(io("remove", entry.path()))?;
            if archive {
                done.removed.push(name.to_owned());
            }
        }
    }
    flotilla_contracts::atomic::write_atomic(
        &packages.join(DIGEST_LIST),
        render(&listed).as_bytes(),
        0o600,
    )
    .map_err(|e| Error::Io { action: "write", path: e.path, source: e.source })?;
    Ok(done)
}

/// Downloads one object to `dir/name` unless it is there with its digest already.
fn get(
    agent: &ureq::Agent,
    object: &FetchObject,
    dir: &Utf8Path,
    name: &str,
    expires_at: u64,
    options: &FetchOptions,
    done: &mut Fetched,
) -> Result<()> {
    let target = dir.join(name);
    if target.is_file() && file_digest(&target).ok().as_deref() == Some(object.digest.as_str()) {
        done.kept.push(name.to_owned());
        return Ok(());
    }
    let part = dir.join(format!(".fetch-{name}"));
    let _ = fs::remove_file(&part);
    let fail = |message: String| Error::Fetch { file: object.file.clone(), message };
    let mut last = String::new();
    for attempt in 0..options.attempts.max(1) {
        if attempt > 0 {
            std::thread::sleep(options.backoff);
        }
        match download(agent, object, &part, expires_at) {
            Ok(bytes) => {
                done.bytes += bytes;
                last.clear();
                break;
            }
            Err(Attempt::Final(message)) => return Err(fail(message)),
            Err(Attempt::Again(message)) => last = message,
        }
    }
    if !last.is_empty() {
        let _ = fs::remove_file(&part);
        return Err(fail(format!("gave up after {} tries: {last}", options.attempts.max(1))));
    }
    let size = fs::metadata(&part).map_err(io("inspect", &part))?.len();
    let digest = file_digest(&part).map_err(io("read", &part))?;
    if digest != object.digest || size != object.size {
        let _ = fs::remove_file(&part);
        return Err(Error::Digest {
            file: target,
            message: format!(
                "the store's object has digest {digest} ({size} bytes), the deploy expects {} \
                 ({} bytes): refused, nothing was unpacked; {}",
                object.digest,
                object.size,
                flotilla_contracts::store::damaged_object_hint(&object.digest)
            ),
        });
    }
    fs::rename(&part, &target).map_err(io("move into place", &target))?;
    done.downloaded.push(name.to_owned());
    Ok(())
}

/// Why one try did not finish: worth another try (resuming), or not.
enum Attempt {
    Again(String),
    Final(String),
}

/// One try: appends to `part` from where it ends. Returns the bytes received.
fn download(
    agent: &ureq::Agent,
    object: &FetchObject,
    part: &Utf8Path,
    expires_at: u64,
) -> std::result::Result<u64, Attempt> {
    let have = fs::metadata(part).map(|m| m.len()).unwrap_or(0);
    if have >= object.size && object.size > 0 {
        return Ok(0);
    }
    let mut request = agent.get(&object.url);
    if have > 0 {
        request = request.header("Range", format!("bytes={have}-"));
    }
    let mut response = request.call().map_err(|e| Attempt::Again(format!("GET: {e}")))?;
    let status = response.status().as_u16();
    if !(200..300).contains(&status) {
        let body = response.body_mut().read_to_string().unwrap_or_default();
        let message = store_message(&body);
        let now = crate::release::now();
        let expired =
            message.to_ascii_lowercase().contains("expired") || (status == 403 && now > expires_at);
        if expired {
            return Err(Attempt::Final(format!(
                "the store refused the URL ({status}): it expired (valid until {expires_at}, now \
                 {now}): deploy again for new URLs{}",
                if message.is_empty() {
                    String::new()
                } else {
                    format!("; the store said: {message}")
                }
            )));
        }
        let what = format!(
            "the store answered {status}{}",
            if message.is_empty() { String::new() } else { format!(": {message}") }
        );
        return Err(if status >= 500 || status == 429 {
            Attempt::Again(what)
        } else {
            Attempt::Final(what)
        });
    }
    // A server that ignores the range sends everything again: start over.
    let append = have > 0 && status == 206;
    let mut file = fs::OpenOptions::new()
        .create(true)
        .write(true)
        .append(append)
        .truncate(!append)
        .open(part)
        .map_err(|e| Attempt::Final(format!("open {part}: {e}")))?;
    let mut reader = response.into_body().into_reader();
    let mut buf = vec![0u8; 1 << 16];
    let mut received = 0u64;
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) => return Err(Attempt::Again(format!("receive: {e}"))),
        };
        file.write_all(&buf[..n]).map_err(|e| Attempt::Final(format!("write {part}: {e}")))?;
        received += n as u64;
    }
    file.sync_all().map_err(|e| Attempt::Final(format!("write {part}: {e}")))?;
    let total = fs::metadata(part).map(|m| m.len()).unwrap_or(0);
    if total < object.size {
        return Err(Attempt::Again(format!(
            "the download ended at {total} of {} bytes",
            object.size
        )));
    }
    Ok(received)
}

/// The `<Message>` of an S3 error document, or the body's first line.
fn store_message(body: &str) -> String {
    if let (Some(start), Some(end)) = (body.find("<Message>"), body.find("</Message>")) {
        if start + 9 <= end {
            return body[start + 9..end].trim().to_owned();
        }
    }
    body.lines().next().unwrap_or("").trim().chars().take(200).collect()
}

/// The fetch list on standard input.
pub fn read_list(text: &str) -> Result<FetchList> {
    serde_json::from_str(text).map_err(|e| Error::Fetch {
        file: "<standard input>".into(),
        message: format!("not a fetch list: {e}"),
    })
}

/// The staging directory's key file next to `packages`: removed before a fetch changes what
/// the directory holds, as a push removes it.
pub fn unstage_key(packages: &Utf8Path) -> Result<()> {
    let staging: Utf8PathBuf = packages.parent().map(Utf8Path::to_owned).unwrap_or_default();
    let key = staging.join(flotilla_contracts::layout::staging::KEY);
    match fs::remove_file(&key) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(Error::Io { action: "remove", path: key, source: e })
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_messages_are_read_from_s3_error_documents() {
        let body = "<?xml version=\"1.0\"?><Error><Code>AccessDenied</Code><Message>Request has \
                    expired</Message></Error>";
        assert_eq!(store_message(body), "Request has expired");
        assert_eq!(store_message("plain text\nmore"), "plain text");
    }

    /// A loopback HTTP server that answers its n-th request with `answer(n, request head)`
    /// (raw response bytes) and closes; the request heads it saw.
    struct Scripted {
        url: String,
        seen: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    }

    fn scripted(answer: impl Fn(usize, &str) -> Vec<u8> + Send + 'static) -> Scripted {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url =
            format!("http://{}/bucket/blake3/x?X-Amz-Signature=0", listener.local_addr().unwrap());
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let log = seen.clone();
        std::thread::spawn(move || {
            for (n, stream) in listener.incoming().enumerate() {
                let Ok(mut stream) = stream else { continue };
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && stream.read(&mut byte).unwrap_or(0) == 1 {
                    head.push(byte[0]);
                }
                let head = String::from_utf8_lossy(&head).into_owned();
                let answer = answer(n, &head);
                // Recorded before the answer, so the test sees it once its request returned.
                log.lock().unwrap().push(head);
                let _ = stream.write_all(&answer);
            }
        });
        Scripted { url, seen }
    }

    fn ok(status: &str, headers: &str, body: &[u8]) -> Vec<u8> {
        let mut out =
            format!("HTTP/1.1 {status}\r\n{headers}Connection: close\r\n\r\n").into_bytes();
        out.extend_from_slice(body);
        out
    }

    fn list(url: &str, body: &[u8]) -> FetchList {
        let digest = blake3::hash(body).to_hex().to_string();
        FetchList {
            packages: vec![FetchObject {
                file: "app.tar.gz".into(),
                digest: digest.clone(),
                size: body.len() as u64,
                url: url.to_owned(),
            }],
            installer: FetchObject {
                file: "flotilla-installer".into(),
                digest,
                size: body.len() as u64,
                url: url.to_owned(),
            },
            installer_sha256: None,
            expires_at: u64::MAX,
        }
    }

    fn options(attempts: u32) -> FetchOptions {
        FetchOptions {
            attempts,
            backoff: Duration::from_millis(10),
            timeout: Duration::from_secs(10),
        }
    }

    /// A staging directory of the test's own, removed when the guard drops, also on failure.
    fn staging() -> (tempfile::TempDir, Utf8PathBuf) {
        let guard = tempfile::tempdir().unwrap();
        let dir = Utf8PathBuf::try_from(guard.path().to_owned()).unwrap();
        (guard, dir)
    }

    #[test]
    fn a_cut_download_resumes_where_it_stopped() {
        let body: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let served = body.clone();
        let server = scripted(move |n, head| {
            let len = served.len();
            if n == 0 {
                // Promises everything, sends 40 kB, hangs up.
                return ok("200 OK", &format!("Content-Length: {len}\r\n"), &served[..40_000]);
            }
            let from: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("range: bytes=").or(l.strip_prefix("Range: bytes=")))
                .and_then(|r| r.trim().trim_end_matches('-').parse().ok())
                .unwrap_or(0);
            let rest = &served[from..];
            ok(
                "206 Partial Content",
                &format!(
                    "Content-Length: {}\r\nContent-Range: bytes {from}-{}/{len}\r\n",
                    rest.len(),
                    len - 1
                ),
                rest,
            )
        });
        let (_guard, dir) = staging();
        let done =
            fetch(&list(&server.url, &body), &dir.join("packages"), None, &options(3)).unwrap();
        assert_eq!(fs::read(dir.join("packages/app.tar.gz")).unwrap(), body);
        assert_eq!(done.downloaded, ["app.tar.gz"]);
        let seen = server.seen.lock().unwrap().clone();
        assert_eq!(seen.len(), 2, "{seen:?}");
        assert!(seen[1].to_ascii_lowercase().contains("range: bytes=40000-"), "{}", seen[1]);
        // The digest list names what was fetched; nothing temporary is left.
        let listed = fs::read_to_string(dir.join("packages").join(DIGEST_LIST)).unwrap();
        assert!(listed.contains("app.tar.gz"), "{listed}");
        let names: Vec<String> = fs::read_dir(dir.join("packages"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(names.iter().all(|n| !n.starts_with(".fetch-")), "{names:?}");
    }

    #[test]
    fn other_bytes_than_the_digest_are_refused_and_leave_nothing() {
        let body = b"the real package".to_vec();
        let server = scripted(|_, _| ok("200 OK", "Content-Length: 16\r\n", b"the fake package"));
        let (_guard, dir) = staging();
        let err = fetch(&list(&server.url, &body), &dir.join("packages"), None, &options(3))
            .unwrap_err()
            .to_string();
        assert!(err.contains("refused, nothing was unpacked"), "{err}");
        let digest = blake3::hash(&body).to_hex().to_string();
        assert!(err.contains(&format!("delete the object blake3/{digest}")), "{err}");
        let left: Vec<_> = fs::read_dir(dir.join("packages")).unwrap().collect();
        assert!(left.is_empty(), "{left:?}");
        // Not a transient failure: one request, no retries.
        assert_eq!(server.seen.lock().unwrap().len(), 1);
    }

    #[test]
    fn retries_are_bounded_and_expired_urls_are_final() {
        let failing = scripted(|_, _| ok("503 Slow Down", "Content-Length: 0\r\n", b""));
        let (_guard, dir) = staging();
        let err = fetch(&list(&failing.url, b"x"), &dir.join("packages"), None, &options(3))
            .unwrap_err()
            .to_string();
        assert!(err.contains("gave up after 3 tries") && err.contains("503"), "{err}");
        assert_eq!(failing.seen.lock().unwrap().len(), 3);

        let expired =
            "<Error><Code>AccessDenied</Code><Message>Request has expired</Message></Error>";
        let refusing = scripted(move |_, _| {
            ok(
                "403 Forbidden",
                &format!("Content-Length: {}\r\n", expired.len()),
                expired.as_bytes(),
            )
        });
        let mut old = list(&refusing.url, b"x");
        old.expires_at = 1;
        let err = fetch(&old, &dir.join("packages"), None, &options(3)).unwrap_err().to_string();
        assert!(err.contains("it expired") && err.contains("deploy again"), "{err}");
        assert_eq!(refusing.seen.lock().unwrap().len(), 1);
    }
}
