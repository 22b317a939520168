//! The node agent's config file.
//!
//! ```toml
//! listen = "[::]:12220"                # required, here or in the node config
//! node = "node1"                       # optional; the host name when unset
//! node_config = "/etc/flotilla/node-agent.toml"  # optional per-node file, see below
//! [tls]                                # optional; all three paths must exist
//! cert = "node.crt"
//! key = "node.key"
//! ca = "ca.crt"
//! tls_listen = "[::]:12223"            # optional; the mutually authenticated API, with [tls]
//! [secret]                             # optional; the node's share of the rack secret
//! share_path = "share.json"
//! ```
//!
//! The per-node file has the same keys except `node_config`; each top-level key it sets replaces
//! the main file's. Relative paths are relative to the file that names them.

use camino::{Utf8Path, Utf8PathBuf};
use serde::Deserialize;
use service_common::config::{read_node_config, ConfigError, Source, Spanned, TlsFile, TlsPaths};
use std::net::SocketAddr;

/// The checked configuration of the node agent.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct Config {
    /// The address the HTTP API listens on.
    pub listen: SocketAddr,
    /// The node identity; `None` means the host name.
    pub node: Option<String>,
    /// This node's TLS certificate, key and the cluster CA.
    pub tls: Option<TlsPaths>,
    /// This node's share of the rack secret.
    pub secret: Option<SecretPaths>,
    /// The address of the mutually authenticated TLS API (`GET /share`); only with `tls`.
    pub tls_listen: Option<SocketAddr>,
    /// The per-node file that was merged in, if any.
    pub node_config: Option<Utf8PathBuf>,
}

/// The TLS API's address when `[tls]` is set and `tls_listen` is not.
pub const DEFAULT_TLS_LISTEN: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED), 12223);

/// The checked `[secret]` table.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct SecretPaths {
    pub share: Utf8PathBuf,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AgentFile {
    listen: Option<SocketAddr>,
    node: Option<Spanned<String>>,
    node_config: Option<Spanned<Utf8PathBuf>>,
    tls: Option<TlsFile>,
    tls_listen: Option<SocketAddr>,
    secret: Option<SecretFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SecretFile {
    share_path: Spanned<Utf8PathBuf>,
}

/// One file's checked values, before the node file is merged over the main file.
struct Layer {
    listen: Option<SocketAddr>,
    node: Option<String>,
    tls: Option<TlsPaths>,
    tls_listen: Option<SocketAddr>,
    secret: Option<SecretPaths>,
}

/// Loads and checks the config at `path`, merging the node config it names.
pub fn load(path: &Utf8Path) -> Result<Config, ConfigError> {
    let main = Source::read(path)?;
    let file: AgentFile = main.parse()?;
    let mut layer = check(&file, &main)?;
    let mut node_config = None;
    if let Some(include) = &file.node_config {
        let (source, node_file) =
            read_node_config(&main, include, |f: &AgentFile| f.node_config.as_ref())?;
        let node = check(&node_file, &source)?;
        layer = Layer {
            listen: node.listen.or(layer.listen),
            node: node.node.or(layer.node),
            tls: node.tls.or(layer.tls),
            tls_listen: node.tls_listen.or(layer.tls_listen),
            secret: node.secret.or(layer.secret),
        };
        node_config = Some(source.path().to_owned());
    }
    let Some(listen) = layer.listen else {
        return Err(main.invalid("listen", None, "missing; set it here or in the node config"));
    };
    let tls_listen = match (&layer.tls, layer.tls_listen) {
        (Some(_), listen) => Some(listen.unwrap_or(DEFAULT_TLS_LISTEN)),
        (None, Some(_)) => {
            return Err(main.invalid("tls_listen", None, "set only together with [tls]"));
        }
        (None, None) => None,
    };
    Ok(Config {
        listen,
        node: layer.node,
        tls: layer.tls,
        secret: layer.secret,
        tls_listen,
        node_config,
    })
}

fn check(file: &AgentFile, source: &Source) -> Result<Layer, ConfigError> {
    let node = match &file.node {
        Some(node) => Some(source.node_name(node)?),
        None => None,
    };
    let tls = match &file.tls {
        Some(tls) => Some(tls.check(source)?),
        None => None,
    };
    let secret = match &file.secret {
        Some(s) => {
            Some(SecretPaths { share: source.existing_file("secret.share_path", &s.share_path)? })
        }
        None => None,
    };
    Ok(Layer { listen: file.listen, node, tls, tls_listen: file.tls_listen, secret })
}

#[cfg(test)]
mod tests {
    use super::*;
    use service_common::testing::TempDir;

    #[test]
    fn minimal_config() {
        let dir = TempDir::new("agent-config");
        let path = dir.write("config.toml", "listen = \"[::]:12220\"\n");
        let config = load(&path).unwrap();
        assert_eq!(config.listen, "[::]:12220".parse().unwrap());
        assert_eq!(
            (config.node, config.tls, config.secret, config.node_config),
            (None, None, None, None)
        );
    }

    #[test]
    fn the_tls_api_listens_only_with_tls() {
        let dir = TempDir::new("agent-config");
        for file in ["c.pem", "k.pem", "a.pem"] {
            dir.write(file, "x");
        }
        let tls = "[tls]\ncert = \"c.pem\"\nkey = \"k.pem\"\nca = \"a.pem\"\n";
        let path = dir.write("tls.toml", &format!("listen = \"[::]:1\"\n{tls}"));
        assert_eq!(load(&path).unwrap().tls_listen, Some(DEFAULT_TLS_LISTEN));
        let path = dir.write(
            "port.toml",
            &format!("listen = \"[::]:1\"\ntls_listen = \"127.0.0.1:9\"\n{tls}"),
        );
        assert_eq!(load(&path).unwrap().tls_listen, Some("127.0.0.1:9".parse().unwrap()));
        let path = dir.write("bare.toml", "listen = \"[::]:1\"\ntls_listen = \"127.0.0.1:9\"\n");
        let err = load(&path).unwrap_err().to_string();
        assert_eq!(err, format!("config {path}: tls_listen: set only together with [tls]"));
    }

    #[test]
    fn the_shipped_config_loads() {
        let path =
            Utf8Path::new(env!("CARGO_MANIFEST_DIR")).join("../../smf/node-agent/config.toml");
        let config = load(&path).unwrap();
        assert_eq!(config.listen, "[::]:12220".parse().unwrap());
        // The shipped node file is empty: nothing is replaced until an overlay brings one.
        assert_eq!(config.node_config, Some(path.parent().unwrap().join("node.toml")));
        assert_eq!(
            (config.node, config.tls, config.secret, config.tls_listen),
            (None, None, None, None)
        );
    }

    #[test]
    fn node_config_overrides_and_paths_are_relative_to_their_file() {
        let dir = TempDir::new("agent-config");
        std::fs::create_dir(dir.path().join("node")).unwrap();
        for name in ["node/cert.pem", "node/key.pem", "node/ca.pem", "node/share.json"] {
            dir.write(name, "x");
        }
        dir.write(
            "node/node.toml",
            "node = \"node2\"\n[tls]\ncert = \"cert.pem\"\nkey = \"key.pem\"\nca = \"ca.pem\"\n\
             [secret]\nshare_path = \"share.json\"\n",
        );
        let path = dir.write(
            "config.toml",
            "listen = \"127.0.0.1:12220\"\nnode = \"default\"\nnode_config = \"node/node.toml\"\n",
        );
        let config = load(&path).unwrap();
        let node_dir = dir.path().join("node");
        assert_eq!(config.node.as_deref(), Some("node2"));
        assert_eq!(config.listen, "127.0.0.1:12220".parse().unwrap());
        assert_eq!(config.tls.unwrap().key, node_dir.join("key.pem"));
        assert_eq!(config.secret.unwrap().share, node_dir.join("share.json"));
        assert_eq!(config.node_config, Some(node_dir.join("node.toml")));
    }

    #[test]
    fn errors_name_file_line_and_field() {
        let dir = TempDir::new("agent-config");
        let path = dir.write("config.toml", "listen = \"[::]:1\"\nlisten_addr = \"x\"\n");
        let err = load(&path).unwrap_err().to_string();
        assert!(
            err.starts_with(&format!("parse config {path}:2:1: unknown field `listen_addr`")),
            "{err}"
        );

        let path = dir.write("missing.toml", "node = \"n1\"\n");
        let err = load(&path).unwrap_err().to_string();
        assert_eq!(
            err,
            format!("config {path}: listen: missing; set it here or in the node config")
        );

        let path = dir.write(
            "share.toml",
            "listen = \"[::]:1\"\n[secret]\nshare_path = \"/nonexistent/s\"\n",
        );
        let err = load(&path).unwrap_err().to_string();
        assert_eq!(
            err,
            format!("config {path}:3:14: secret.share_path: /nonexistent/s does not exist")
        );

        let path = dir.write("include.toml", "listen = \"[::]:1\"\nnode_config = \"nope.toml\"\n");
        let err = load(&path).unwrap_err().to_string();
        let want =
            format!("config {path}:2:15: node_config: {}/nope.toml does not exist", dir.path());
        assert_eq!(err, want);

        dir.write("loop.toml", "node_config = \"loop.toml\"\n");
        let path = dir.write("outer.toml", "listen = \"[::]:1\"\nnode_config = \"loop.toml\"\n");
        let err = load(&path).unwrap_err().to_string();
        let want = format!(
            "config {}/loop.toml:1:15: node_config: a node config file cannot name another node config file",
            dir.path()
        );
        assert_eq!(err, want);

        let err = load(&dir.path().join("absent.toml")).unwrap_err().to_string();
        assert!(err.starts_with(&format!("read config {}/absent.toml: ", dir.path())), "{err}");
    }
}
