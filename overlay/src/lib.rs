//! Overlay generators: the files that differ from server to server, computed on the builder.
//!
//! This crate is separate from `flotilla-package` so that `cargo xtask` does not link the
//! certificate, random-number and template crates: every `cargo xtask` command, a no-op
//! `package` included, first has `cargo run` check the freshness of xtask's whole dependency
//! graph, and these crates were about a quarter of it. xtask starts the `flotilla-overlay`
//! binary with a [`Request`] in JSON on its standard input instead (see [`request`]).
//!
//! Three generators make a real cluster out of identical packages:
//! - [`secret`]: a fresh rack secret split into k-of-n threshold shares with a verifier, one share
//!   per server;
//! - [`tls`]: a cluster CA and, per server, a private key and a certificate whose subject
//!   alternative names are the server's name and addresses;
//! - [`template`]: per-server config files rendered from templates with per-server and
//!   cluster-wide variables.
//!
//! Identities (the CA, each server's key and certificate, the shares) live in a builder-only
//! state directory (0700 directories, 0600 files) so that regenerating the overlays keeps them;
//! [`Identities::Rotate`] replaces them. The overlay of one server holds only that server's
//! secrets and mirrors the install paths (`<prefix>/<service>/pkg/...`), so the installer can
//! place it into the release before the services start. Nothing here logs secret bytes: the
//! [`Summary`] only says what was created or kept.

pub mod request;
pub mod secret;
pub mod template;
pub mod tls;

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::os::unix::fs::DirBuilderExt;

use camino::{Utf8Path, Utf8PathBuf};
use flotilla_contracts::atomic::{write_atomic, AtomicWriteError};
use serde::Serialize;

pub use request::{config_of, describe, parse_request, run, Request, ServerRequest};
pub use secret::ShareFile;
pub use template::Template;

/// The mode of every secret file the generators write, on the builder and in overlays.
pub const SECRET_FILE_MODE: u32 = 0o600;
/// The mode of every directory holding secrets.
pub const SECRET_DIR_MODE: u32 = 0o700;

pub use flotilla_contracts::overlay::{Identities, OverlayFile};

/// The servers of a cluster, as the overlay generators see them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cluster {
    /// In deployment order: a server's index is its position, counting from 1.
    pub nodes: Vec<Node>,
    /// How many shares reconstruct the rack secret (k of n).
    pub threshold: u8,
    /// Cluster-wide template variables.
    pub vars: BTreeMap<String, String>,
}

/// One server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    /// Used as a directory name and a certificate name: ASCII letters, digits, `-`, `_` and
    /// `.`, starting with a letter or digit.
    pub name: String,
    /// Host names or IP literals (IPv6 without brackets); the first one is the node's address
    /// in templates. Every one is a subject alternative name of the node's certificate.
    pub addresses: Vec<String>,
    /// Per-server template variables.
    pub vars: BTreeMap<String, String>,
}

/// What to generate and where identities are kept.
#[derive(Debug, Clone)]
pub struct Config {
    pub cluster: Cluster,
    /// The builder-only directory holding the CA and every server's identity.
    pub state_dir: Utf8PathBuf,
    pub identities: Identities,
    /// The services that receive the node's key, certificate and the cluster CA under
    /// `<prefix>/<service>/pkg/tls/`.
    pub tls_services: Vec<String>,
    /// The services that receive the node's share under `<prefix>/<service>/pkg/secret/`.
    pub secret_services: Vec<String>,
    /// The install prefix relative to `/`: `opt/flotilla`, `opt/oxide`.
    pub prefix: String,
    pub templates: Vec<Template>,
}

/// Every server's overlay files, and what was created or kept.
#[derive(Debug, Clone)]
pub struct Overlay {
    pub servers: BTreeMap<String, Vec<OverlayFile>>,
    pub summary: Summary,
}

/// What a generation did, safe to print: names and counts, never secret bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Summary {
    pub ca: Fate,
    /// Each server's key and certificate.
    pub nodes: BTreeMap<String, Fate>,
    pub shares: Fate,
    pub threshold: u8,
    pub total_shares: u8,
}

/// Whether an identity was kept from the state directory or made now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Fate {
    Kept,
    Created,
    /// The key was kept and the certificate issued again (the addresses changed).
    Reissued,
}

/// A failure of an overlay generator, naming the file, server or field involved.
#[derive(Debug, thiserror::Error)]
pub enum OverlayError {
    /// The cluster description does not fit (a bad name, a threshold out of range, ...).
    #[error("overlay: {0}")]
    Invalid(String),
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: Utf8PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Atomic(#[from] AtomicWriteError),
    /// A state file exists but cannot be read back; the message names the file.
    #[error("read the overlay state {path}: {message}")]
    State { path: Utf8PathBuf, message: String },
    #[error("make the certificate of {subject}: {message}")]
    Certificate { subject: String, message: String },
    #[error("render the template {template} for {node}: {message}")]
    Template { template: Utf8PathBuf, node: String, message: String },
    /// The request on standard input is not valid JSON or does not fit [`Request`]; the
    /// message names the field, line and column.
    #[error("read the overlay request from {source_name}: {message}")]
    Request { source_name: String, message: String },
}

/// Computes every server's overlay, creating or keeping identities in the state directory.
pub fn generate(config: &Config) -> Result<Overlay, OverlayError> {
    validate(config)?;
    create_private_dir(&config.state_dir)?;
    let ca = tls::ensure_ca(&config.state_dir, config.identities)?;
    let ca_fate = ca.fate;
    let mut nodes = BTreeMap::new();
    let mut servers: BTreeMap<String, Vec<OverlayFile>> = BTreeMap::new();
    for node in &config.cluster.nodes {
        let identity = tls::ensure_node(&config.state_dir, &ca, node, config.identities)?;
        nodes.insert(node.name.clone(), identity.fate);
        let files = servers.entry(node.name.clone()).or_default();
        for service in &config.tls_services {
            let dir = Utf8PathBuf::from(format!("{}/{service}/pkg/tls", config.prefix));
            files.push(OverlayFile {
                path: dir.join("ca.crt"),
                contents: ca.cert_pem.clone().into(),
            });
            files.push(OverlayFile {
                path: dir.join("node.crt"),
                contents: identity.cert_pem.clone().into(),
            });
            files.push(OverlayFile {
                path: dir.join("node.key"),
                contents: identity.key_pem.clone().into(),
            });
        }
    }
    let (shares, shares_fate) =
        secret::ensure_shares(&config.state_dir, &config.cluster, config.identities)?;
    for (name, share) in &shares {
        for service in &config.secret_services {
            let path = format!("{}/{service}/pkg/secret/share.json", config.prefix);
            let contents = serde_json::to_vec_pretty(share).expect("a share serializes");
            let files = servers.entry(name.clone()).or_default();
            files.push(OverlayFile { path: path.into(), contents });
        }
    }
    for (index, node) in config.cluster.nodes.iter().enumerate() {
        let files = servers.entry(node.name.clone()).or_default();
        for template in &config.templates {
            let contents = template.render(&config.cluster, index)?;
            files.push(OverlayFile { path: template.dest.clone(), contents: contents.into() });
        }
        files.sort_by(|a, b| a.path.cmp(&b.path));
        if let Some(pair) = files.windows(2).find(|w| w[0].path == w[1].path) {
            return Err(OverlayError::Invalid(format!(
                "two generators write {} for {}",
                pair[0].path, node.name
            )));
        }
    }
    let summary = Summary {
        ca: ca_fate,
        nodes,
        shares: shares_fate,
        threshold: config.cluster.threshold,
        total_shares: config.cluster.nodes.len() as u8,
    };
    Ok(Overlay { servers, summary })
}

/// Writes each server's files under `<dir>/<server>/`: directories 0700, files 0600, each
/// written to a temporary name and renamed into place.
pub fn write(overlay: &Overlay, dir: &Utf8Path) -> Result<(), OverlayError> {
    for (server, files) in &overlay.servers {
        let root = dir.join(server);
        create_private_dir(&root)?;
        for file in files {
            let path = root.join(&file.path);
            if let Some(parent) = path.parent() {
                create_private_dir(parent)?;
            }
            write_atomic(&path, &file.contents, SECRET_FILE_MODE)?;
        }
    }
    Ok(())
}

fn validate(config: &Config) -> Result<(), OverlayError> {
    let cluster = &config.cluster;
    let n = cluster.nodes.len();
    if n == 0 {
        return Err(OverlayError::Invalid("the cluster has no servers".into()));
    }
    if n > 255 {
        return Err(OverlayError::Invalid(format!("{n} servers; shares allow at most 255")));
    }
    if cluster.threshold == 0 || usize::from(cluster.threshold) > n {
        return Err(OverlayError::Invalid(format!(
            "threshold {} does not fit {n} servers: it must be between 1 and {n}",
            cluster.threshold
        )));
    }
    let mut seen = std::collections::BTreeSet::new();
    for node in &cluster.nodes {
        check_name("server", &node.name)?;
        if !seen.insert(node.name.as_str()) {
            return Err(OverlayError::Invalid(format!("server `{}` is listed twice", node.name)));
        }
        if node.addresses.is_empty() {
            return Err(OverlayError::Invalid(format!("server `{}` has no address", node.name)));
        }
    }
    for service in config.tls_services.iter().chain(&config.secret_services) {
        check_name("service", service)?;
    }
    let prefix_ok = !config.prefix.is_empty()
        && !config.prefix.starts_with('/')
        && config.prefix.split('/').all(|part| check_name("prefix component", part).is_ok());
    if !prefix_ok {
        return Err(OverlayError::Invalid(format!(
            "the prefix `{}` must be a relative path of plain components, like opt/flotilla",
            config.prefix
        )));
    }
    Ok(())
}

/// Names become path components and certificate names, so only a safe alphabet is allowed.
fn check_name(what: &str, name: &str) -> Result<(), OverlayError> {
    let ok = !name.is_empty()
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && name.starts_with(|c: char| c.is_ascii_alphanumeric());
    if ok {
        Ok(())
    } else {
        Err(OverlayError::Invalid(format!(
            "{what} name `{name}`: use ASCII letters, digits, `-`, `_` and `.`, starting with a \
             letter or digit"
        )))
    }
}

/// Creates a directory (and its parents) with mode 0700, and tightens an existing one.
pub(crate) fn create_private_dir(dir: &Utf8Path) -> Result<(), OverlayError> {
    use std::os::unix::fs::PermissionsExt;
    fs::DirBuilder::new().recursive(true).mode(SECRET_DIR_MODE).create(dir).map_err(|source| {
        OverlayError::Io { what: "create the directory", path: dir.to_owned(), source }
    })?;
    fs::set_permissions(dir, fs::Permissions::from_mode(SECRET_DIR_MODE)).map_err(|source| {
        OverlayError::Io { what: "set the mode of", path: dir.to_owned(), source }
    })
}

/// Reads a state file, `None` when it does not exist.
pub(crate) fn read_state(path: &Utf8Path) -> Result<Option<String>, OverlayError> {
    match fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(OverlayError::Io { what: "read", path: path.to_owned(), source }),
    }
}

/// Writes a state file 0600 through a temporary name.
pub(crate) fn write_state(path: &Utf8Path, contents: &[u8]) -> Result<(), OverlayError> {
    if let Some(parent) = path.parent() {
        create_private_dir(parent)?;
    }
    write_atomic(path, contents, SECRET_FILE_MODE)?;
    Ok(())
}

#[cfg(test)]
mod tests;
