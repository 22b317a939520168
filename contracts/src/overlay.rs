//! The overlay request: what the `flotilla-overlay` binary is asked to generate, in the JSON
//! form it reads on its standard input. fling builds it on the builder from the deployment
//! config; the generators read it. Unknown fields are refused, so a caller and a binary from
//! different commits fail loudly instead of dropping a setting.

use std::collections::BTreeMap;

use camino::Utf8PathBuf;
use serde::{Deserialize, Serialize};

/// Whether existing identities are kept or replaced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Identities {
    /// Reuse the CA, keys, certificates and shares already in the state directory when they
    /// still fit the cluster (same servers, addresses and threshold).
    Keep,
    /// Make a new CA, new keys and certificates and a new rack secret.
    Rotate,
}

/// The generators' whole input.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    /// The deployment servers in deployment order: a server's index is its position.
    pub servers: Vec<ServerRequest>,
    /// How many shares reconstruct the rack secret (k of n).
    pub threshold: u8,
    /// Cluster-wide template variables.
    pub vars: BTreeMap<String, String>,
    /// The builder-only directory of the kept identities.
    pub state_dir: Utf8PathBuf,
    pub identities: Identities,
    /// The services that receive the node's key, certificate and the cluster CA.
    pub tls_services: Vec<String>,
    /// The services that receive the node's share of the rack secret.
    pub secret_services: Vec<String>,
    /// The install prefix relative to `/` (`opt/flotilla`, `opt/oxide`): a service's files sit
    /// under `<prefix>/<service>/pkg/` in a server's overlay.
    pub prefix: String,
    /// The templates: `<dir>/<service>/<path>` renders to `<prefix>/<service>/pkg/<path>`.
    /// A missing directory means no templates.
    pub templates_dir: Utf8PathBuf,
    /// Where the overlays go, one directory per server; replaced as a whole.
    pub out_dir: Utf8PathBuf,
}

/// One server of a [`Request`].
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerRequest {
    pub name: String,
    /// Host names or IP literals; the first is the node's address in templates.
    pub addresses: Vec<String>,
    /// Per-server template variables.
    pub vars: BTreeMap<String, String>,
    /// Files the caller made for this server alone, added to its overlay as they are.
    pub files: Vec<OverlayFile>,
}

/// One file of a server's overlay.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OverlayFile {
    /// Relative to the server's overlay directory, e.g. `opt/flotilla/<service>/pkg/node.toml`.
    pub path: Utf8PathBuf,
    pub contents: Vec<u8>,
}

// Overlay files may be secrets: their contents are never printed, not even in debug output.
impl std::fmt::Debug for OverlayFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "OverlayFile {{ path: {:?}, {} bytes }}", self.path, self.contents.len())
    }
}
