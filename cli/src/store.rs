//! The builder's side of the artifact store (`[artifacts]`): uploads every output and the
//! installer once, keyed by its blake3 digest (an object already there is not sent again),
//! and signs, for one deploy, short-lived `GET` URLs of exactly those objects for the servers.
//! Requests are signed with SigV4 by `rusty-s3` and sent with `ureq`. The credentials come
//! from the builder's environment (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`) or the
//! builder's `credentials_file`; they never leave the builder: servers get URLs, not keys.

use std::time::Duration;

use anyhow::{bail, Context as _};
use camino::{Utf8Path, Utf8PathBuf};
use flotilla_contracts::digests::{file_digest, DIGEST_LIST};
use flotilla_contracts::store::{object_key, FetchList, FetchObject, StoreSync};
use flotilla_fling::config::Store;
use rusty_s3::actions::{CreateBucket, HeadBucket, HeadObject, PutObject};
use rusty_s3::{Bucket, Credentials, S3Action as _, UrlStyle};

/// How long the builder's own signed requests stay valid: they are sent at once.
const REQUEST_TTL: Duration = Duration::from_secs(300);

/// The store as the builder reaches it.
pub struct Client {
    store: Store,
    bucket: Bucket,
    credentials: Credentials,
    agent: ureq::Agent,
}

/// The credentials file's format.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct CredentialsFile {
    access_key_id: String,
    secret_access_key: String,
}

/// The builder's credentials: its environment first, else `file` (which must be private to
/// its owner, as ssh keys are).
pub fn credentials(file: Option<&Utf8Path>) -> anyhow::Result<Credentials> {
    if let (Ok(key), Ok(secret)) =
        (std::env::var("AWS_ACCESS_KEY_ID"), std::env::var("AWS_SECRET_ACCESS_KEY"))
    {
        return Ok(Credentials::new(key, secret));
    }
    let Some(path) = file else {
        bail!(
            "no store credentials on the builder: set AWS_ACCESS_KEY_ID and \
             AWS_SECRET_ACCESS_KEY in its environment, or name a file with access_key_id and \
             secret_access_key in [artifacts] credentials_file"
        );
    };
    use std::os::unix::fs::MetadataExt;
    let meta =
        std::fs::metadata(path).with_context(|| format!("read the store credentials {path}"))?;
    if meta.mode() & 0o077 != 0 {
        bail!(
            "{path}: the store credentials are readable by others (mode {:o}): chmod 600 {path}",
            meta.mode() & 0o777
        );
    }
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("read the store credentials {path}"))?;
    // The error names the file and the field, never the values.
    let parsed: CredentialsFile =
        toml::from_str(&text).map_err(|e| anyhow::anyhow!("{path}: {}", e.message()))?;
    Ok(Credentials::new(parsed.access_key_id, parsed.secret_access_key))
}

/// Why the store could not be used: unreachable (a deploy falls back to pushing) or anything
/// else (always an error).
#[derive(Debug)]
pub enum StoreError {
    Unreachable(String),
    Other(anyhow::Error),
}

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreError::Unreachable(why) => write!(f, "the store cannot be reached: {why}"),
            StoreError::Other(e) => write!(f, "{e:#}"),
        }
    }
}

impl std::error::Error for StoreError {}

fn other(e: impl Into<anyhow::Error>) -> StoreError {
    StoreError::Other(e.into())
}

impl Client {
    /// The store of `[artifacts]` with the builder's credentials (see [`credentials`]).
    pub fn for_builder(store: &Store) -> anyhow::Result<Client> {
        let file = match &store.credentials_file {
            Some(p) => {
                Some(p.local().map_err(|e| anyhow::anyhow!("artifacts.credentials_file: {e}"))?)
            }
            None => None,
        };
        Client::new(store, credentials(file.as_deref())?)
    }

    pub fn new(store: &Store, credentials: Credentials) -> anyhow::Result<Client> {
        let endpoint: url::Url = store
            .endpoint
            .parse()
            .with_context(|| format!("artifacts.endpoint {}", store.endpoint))?;
        let bucket =
            Bucket::new(endpoint, UrlStyle::Path, store.bucket.clone(), store.region.clone())
                .with_context(|| format!("artifacts.bucket {}", store.bucket))?;
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_connect(Some(Duration::from_secs(5)))
            .timeout_global(Some(Duration::from_secs(600)))
            .http_status_as_error(false)
            .build()
            .into();
        Ok(Client { store: store.clone(), bucket, credentials, agent })
    }

    fn key(&self, digest: &str) -> String {
        object_key(&self.store.prefix, digest)
    }

    /// Sends a signed request: its status, and the body of an error.
    fn send(
        &self,
        method: &str,
        url: &url::Url,
        body: Option<&Utf8Path>,
    ) -> Result<(u16, String), StoreError> {
        let unreachable = |e: ureq::Error| match e {
            ureq::Error::Io(_)
            | ureq::Error::ConnectionFailed
            | ureq::Error::HostNotFound
            | ureq::Error::Timeout(_) => {
                StoreError::Unreachable(format!("{method} {}: {e}", self.store.endpoint))
            }
            e => other(anyhow::anyhow!("{method} {}: {e}", self.store.endpoint)),
        };
        let mut response = match (method, body) {
            ("HEAD", _) => self.agent.head(url.as_str()).call().map_err(unreachable)?,
            ("PUT", Some(path)) => {
                let file = std::fs::File::open(path)
                    .with_context(|| format!("read {path}"))
                    .map_err(other)?;
                let len = file.metadata().map_err(other)?.len();
                self.agent
                    .put(url.as_str())
                    .header("Content-Length", len.to_string())
                    .send(ureq::SendBody::from_reader(&mut std::io::BufReader::new(file)))
                    .map_err(unreachable)?
            }
            ("PUT", None) => self.agent.put(url.as_str()).send_empty().map_err(unreachable)?,
            _ => unreachable!("the store client sends HEAD and PUT"),
        };
        let status = response.status().as_u16();
        let text = if (200..300).contains(&status) || method == "HEAD" {
            String::new()
        } else {
            response.body_mut().read_to_string().unwrap_or_default()
        };
        Ok((status, text))
    }

    /// Creates the bucket when the store does not have it.
    fn ensure_bucket(&self) -> Result<(), StoreError> {
        let url = HeadBucket::new(&self.bucket, Some(&self.credentials)).sign(REQUEST_TTL);
        let (status, _) = self.send("HEAD", &url, None)?;
        match status {
            200..=299 => Ok(()),
            404 => {
                let url = CreateBucket::new(&self.bucket, &self.credentials).sign(REQUEST_TTL);
                let (status, body) = self.send("PUT", &url, None)?;
                if (200..300).contains(&status) || body.contains("BucketAlreadyOwnedByYou") {
                    Ok(())
                } else {
                    Err(other(anyhow::anyhow!(
                        "create the bucket {}: the store answered {status}: {}",
                        self.store.bucket,
                        s3_message(&body)
                    )))
                }
            }
            403 => Err(other(anyhow::anyhow!(
                "the store refused the builder's credentials for bucket {} (403)",
                self.store.bucket
            ))),
            s => Err(other(anyhow::anyhow!(
                "HEAD bucket {}: the store answered {s}",
                self.store.bucket
            ))),
        }
    }

    /// Uploads `path` as the object of `digest` unless the store has it. Returns whether it
    /// uploaded.
    fn upload(&self, path: &Utf8Path, digest: &str) -> Result<bool, StoreError> {
        let key = self.key(digest);
        let head = HeadObject::new(&self.bucket, Some(&self.credentials), &key).sign(REQUEST_TTL);
        let (status, _) = self.send("HEAD", &head, None)?;
        match status {
            200..=299 => return Ok(false),
            404 => {}
            s => {
                return Err(other(anyhow::anyhow!("HEAD {key}: the store answered {s}")));
            }
        }
        let put = PutObject::new(&self.bucket, Some(&self.credentials), &key).sign(REQUEST_TTL);
        let (status, body) = self.send("PUT", &put, Some(path))?;
        if !(200..300).contains(&status) {
            return Err(other(anyhow::anyhow!(
                "upload {path} as {key}: the store answered {status}: {}",
                s3_message(&body)
            )));
        }
        Ok(true)
    }

    /// A `GET` URL of the object of `digest`, valid for `ttl`.
    fn sign_get(&self, digest: &str, ttl: Duration) -> String {
        let key = self.key(digest);
        rusty_s3::actions::GetObject::new(&self.bucket, Some(&self.credentials), &key)
            .sign(ttl)
            .to_string()
    }
}

/// The `<Message>` of an S3 error document, or its first line.
fn s3_message(body: &str) -> String {
    match (body.find("<Message>"), body.find("</Message>")) {
        (Some(a), Some(b)) if a + 9 <= b => body[a + 9..b].to_owned(),
        _ => body.lines().next().unwrap_or("").chars().take(200).collect(),
    }
}

/// A file to upload: its path, digest and size.
type Object = (Utf8PathBuf, String, u64);

/// The outputs of `artifacts` (what its digest list names) and the installer, each with its
/// digest and size.
fn objects(artifacts: &Utf8Path, installer: &Utf8Path) -> anyhow::Result<(Vec<Object>, Object)> {
    let list_path = artifacts.join(DIGEST_LIST);
    let text = std::fs::read_to_string(&list_path)
        .with_context(|| format!("read {list_path}: run `fling build package` first"))?;
    let listed = flotilla_contracts::digests::parse(&list_path, &text)?;
    let mut out = Vec::new();
    for (file, digest) in listed {
        let path = artifacts.join(&file);
        let size = std::fs::metadata(&path).with_context(|| format!("read {path}"))?.len();
        out.push((path, digest, size));
    }
    let digest = file_digest(installer)
        .with_context(|| format!("read {installer}: run `fling build package` first"))?;
    let size = std::fs::metadata(installer)?.len();
    Ok((out, (installer.to_owned(), digest, size)))
}

/// Uploads what the store lacks of `artifacts` and the installer; with `sign`, signs the
/// servers' URLs valid for the store's `url_ttl_secs`.
pub fn sync(
    client: &Client,
    artifacts: &Utf8Path,
    installer: &Utf8Path,
    sign: bool,
) -> Result<StoreSync, StoreError> {
    let (packages, installer) = objects(artifacts, installer).map_err(other)?;
    client.ensure_bucket()?;
    let mut done =
        StoreSync { uploaded: Vec::new(), uploaded_bytes: 0, present: Vec::new(), fetch: None };
    for (path, digest, size) in packages.iter().chain([&installer]) {
        let name = path.file_name().unwrap_or(path.as_str()).to_owned();
        if client.upload(path, digest)? {
            done.uploaded.push(name);
            done.uploaded_bytes += size;
        } else {
            done.present.push(name);
        }
    }
    if sign {
        let ttl = Duration::from_secs(client.store.url_ttl_secs);
        let expires_at = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
            + client.store.url_ttl_secs;
        let object = |(path, digest, size): &(Utf8PathBuf, String, u64)| FetchObject {
            file: path.file_name().unwrap_or(path.as_str()).to_owned(),
            digest: digest.clone(),
            size: *size,
            url: client.sign_get(digest, ttl),
        };
        // A server without an installer fetches it with curl or wget and checks it with
        // sha256sum, which every POSIX server has; blake3 is the installer's own business.
        let sha256 = flotilla_package::sha256_file(&installer.0)
            .map_err(|e| other(anyhow::anyhow!("{e}")))?;
        done.fetch = Some(FetchList {
            packages: packages.iter().map(object).collect(),
            installer: object(&installer),
            installer_sha256: Some(sha256),
            expires_at,
        });
    }
    Ok(done)
}
