//! The control plane's config file.
//!
//! ```toml
//! listen = "[::]:12221"            # required, here or in the node config
//! node = "node1"                   # optional; the host name when unset
//! node_config = "/etc/flotilla/control-plane.toml"  # optional per-node file
//! poll_interval_ms = 2000          # how often every agent's /health is polled
//! request_timeout_ms = 1000        # the deadline of one poll
//!
//! [[agents]]                       # the node agents to poll; none by default
//! name = "node1"
//! address = "192.0.2.11:12220"     # host:port, or [v6]:port
//! tls_address = "192.0.2.11:12223" # optional: the agent's TLS API, to gather its share
//!
//! [tls]                            # optional; the client certificate for mutual TLS
//! cert = "cp.crt"
//! key = "cp.key"
//! ca = "ca.crt"
//! ```
//!
//! As for the node agent, each top-level key of the node config replaces the main file's, and
//! relative paths are relative to the file that names them.

use camino::{Utf8Path, Utf8PathBuf};
use serde::Deserialize;
use service_common::config::{read_node_config, ConfigError, Source, Spanned, TlsFile, TlsPaths};
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

/// The poll interval when the config sets none.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(2);
/// The poll deadline when the config sets none.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(1);

/// The checked configuration of the control plane.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct Config {
    pub listen: SocketAddr,
    /// The node identity; `None` means the host name.
    pub node: Option<String>,
    pub poll_interval: Duration,
    pub request_timeout: Duration,
    /// The agents to poll, in config order, with unique names.
    pub agents: Vec<Agent>,
    pub tls: Option<TlsPaths>,
    /// The etcd member the rack unlock is recorded in (`host:port` of its client URL), reached
    /// over TLS with `tls`' certificate; the unlock is not recorded when unset.
    pub etcd: Option<String>,
    /// The per-node file that was merged in, if any.
    pub node_config: Option<Utf8PathBuf>,
}

/// A node agent to poll.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct Agent {
    pub name: String,
    /// `host:port` or `[v6]:port`, resolved at each poll so that DNS changes are followed.
    pub address: String,
    /// The agent's mutually authenticated TLS API (`host:port`), where its share is gathered;
    /// its certificate must name the agent's `name`.
    pub tls_address: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ControlPlaneFile {
    listen: Option<SocketAddr>,
    node: Option<Spanned<String>>,
    node_config: Option<Spanned<Utf8PathBuf>>,
    poll_interval_ms: Option<Spanned<u64>>,
    request_timeout_ms: Option<Spanned<u64>>,
    agents: Option<Vec<AgentFile>>,
    tls: Option<TlsFile>,
    etcd: Option<EtcdFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EtcdFile {
    endpoint: Spanned<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AgentFile {
    name: Spanned<String>,
    address: Spanned<String>,
    tls_address: Option<Spanned<String>>,
}

/// One file's checked values, before the node file is merged over the main file.
#[derive(Default)]
struct Layer {
    listen: Option<SocketAddr>,
    node: Option<String>,
    poll_interval: Option<Duration>,
    request_timeout: Option<Duration>,
    agents: Option<Vec<Agent>>,
    tls: Option<TlsPaths>,
    etcd: Option<String>,
}

/// Loads and checks the config at `path`, merging the node config it names.
pub fn load(path: &Utf8Path) -> Result<Config, ConfigError> {
    let main = Source::read(path)?;
    let file: ControlPlaneFile = main.parse()?;
    let mut layer = check(&file, &main)?;
    let mut node_config = None;
    if let Some(include) = &file.node_config {
        let (source, node_file) =
            read_node_config(&main, include, |f: &ControlPlaneFile| f.node_config.as_ref())?;
        let node = check(&node_file, &source)?;
        layer = Layer {
            listen: node.listen.or(layer.listen),
            node: node.node.or(layer.node),
            poll_interval: node.poll_interval.or(layer.poll_interval),
            request_timeout: node.request_timeout.or(layer.request_timeout),
            agents: node.agents.or(layer.agents),
            tls: node.tls.or(layer.tls),
            etcd: node.etcd.or(layer.etcd),
        };
        node_config = Some(source.path().to_owned());
    }
    let Some(listen) = layer.listen else {
        return Err(main.invalid("listen", None, "missing; set it here or in the node config"));
    };
    Ok(Config {
        listen,
        node: layer.node,
        poll_interval: layer.poll_interval.unwrap_or(DEFAULT_POLL_INTERVAL),
        request_timeout: layer.request_timeout.unwrap_or(DEFAULT_REQUEST_TIMEOUT),
        agents: layer.agents.unwrap_or_default(),
        tls: layer.tls,
        etcd: layer.etcd,
        node_config,
    })
}

fn check(file: &ControlPlaneFile, source: &Source) -> Result<Layer, ConfigError> {
    let mut layer = Layer { listen: file.listen, ..Layer::default() };
    if let Some(node) = &file.node {
        layer.node = Some(source.node_name(node)?);
    }
    if let Some(ms) = &file.poll_interval_ms {
        layer.poll_interval = Some(millis(source, "poll_interval_ms", ms, 100, 3_600_000)?);
    }
    if let Some(ms) = &file.request_timeout_ms {
        layer.request_timeout = Some(millis(source, "request_timeout_ms", ms, 50, 60_000)?);
    }
    if let Some(tls) = &file.tls {
        layer.tls = Some(tls.check(source)?);
    }
    if let Some(etcd) = &file.etcd {
        if let Err(message) = check_address(etcd.endpoint.get_ref()) {
            return Err(source.invalid("etcd.endpoint", Some(etcd.endpoint.span()), message));
        }
        layer.etcd = Some(etcd.endpoint.get_ref().clone());
    }
    if let Some(agents) = &file.agents {
        let mut names = BTreeSet::new();
        let mut checked = Vec::with_capacity(agents.len());
        for agent in agents {
            let name = agent.name.get_ref();
            if source.node_name(&agent.name).is_err() {
                let message =
                    format!("`{name}` is not a node name (1 to 253 of A-Z a-z 0-9 - _ .)");
                return Err(source.invalid("agents.name", Some(agent.name.span()), message));
            }
            if !names.insert(name.clone()) {
                let message = format!("agent `{name}` is listed twice");
                return Err(source.invalid("agents.name", Some(agent.name.span()), message));
            }
            if let Err(message) = check_address(agent.address.get_ref()) {
                return Err(source.invalid("agents.address", Some(agent.address.span()), message));
            }
            if let Some(tls_address) = &agent.tls_address {
                if let Err(message) = check_address(tls_address.get_ref()) {
                    let span = Some(tls_address.span());
                    return Err(source.invalid("agents.tls_address", span, message));
                }
            }
            checked.push(Agent {
                name: name.clone(),
                address: agent.address.get_ref().clone(),
                tls_address: agent.tls_address.as_ref().map(|a| a.get_ref().clone()),
            });
        }
        layer.agents = Some(checked);
    }
    Ok(layer)
}

fn millis(
    source: &Source,
    field: &str,
    value: &Spanned<u64>,
    min: u64,
    max: u64,
) -> Result<Duration, ConfigError> {
    let ms = *value.get_ref();
    if !(min..=max).contains(&ms) {
        let message = format!("{ms} is out of range ({min} to {max})");
        return Err(source.invalid(field, Some(value.span()), message));
    }
    Ok(Duration::from_millis(ms))
}

/// Checks the shape of `host:port`: resolving is left to each poll, since a name that does not
/// resolve yet (a server still booting) must not stop the control plane from starting.
fn check_address(address: &str) -> Result<(), String> {
    let Some((host, port)) = address.rsplit_once(':') else {
        return Err(format!("`{address}` is not host:port"));
    };
    if host.is_empty() {
        return Err(format!("`{address}` has no host"));
    }
    if host.contains(':') && !(host.starts_with('[') && host.ends_with(']')) {
        return Err(format!("`{address}`: write an IPv6 address in brackets, as [addr]:port"));
    }
    match port.parse::<u16>() {
        Ok(port) if port != 0 => Ok(()),
        _ => Err(format!("`{address}` has no valid port (1 to 65535)")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use service_common::testing::TempDir;

    #[test]
    fn the_shipped_config_loads_with_no_agents() {
        let path =
            Utf8Path::new(env!("CARGO_MANIFEST_DIR")).join("../../smf/control-plane/config.toml");
        let config = load(&path).unwrap();
        assert_eq!(config.listen, "[::]:12221".parse().unwrap());
        assert!(config.agents.is_empty());
        assert_eq!(config.poll_interval, DEFAULT_POLL_INTERVAL);
    }

    #[test]
    fn agents_and_intervals() {
        let dir = TempDir::new("cp-config");
        let path = dir.write(
            "config.toml",
            "listen = \"127.0.0.1:0\"\npoll_interval_ms = 500\nrequest_timeout_ms = 200\n\
             [[agents]]\nname = \"node1\"\naddress = \"192.0.2.11:12220\"\n\
             [[agents]]\nname = \"node2\"\naddress = \"[fd00::2]:12220\"\n\
             [[agents]]\nname = \"node3\"\naddress = \"node3.example:12220\"\n",
        );
        let config = load(&path).unwrap();
        assert_eq!(config.poll_interval, Duration::from_millis(500));
        assert_eq!(config.request_timeout, Duration::from_millis(200));
        let names: Vec<_> = config.agents.iter().map(|a| a.name.as_str()).collect();
        assert_eq!(names, ["node1", "node2", "node3"]);
        assert_eq!(config.agents[1].address, "[fd00::2]:12220");
    }

    #[test]
    fn node_config_replaces_the_agent_list() {
        let dir = TempDir::new("cp-config");
        dir.write("node.toml", "node = \"cp2\"\n[[agents]]\nname = \"b\"\naddress = \"h:2\"\n");
        let path = dir.write(
            "config.toml",
            "listen = \"127.0.0.1:0\"\nnode_config = \"node.toml\"\n\
             [[agents]]\nname = \"a\"\naddress = \"h:1\"\n",
        );
        let config = load(&path).unwrap();
        assert_eq!(config.node.as_deref(), Some("cp2"));
        assert_eq!(
            config.agents,
            [Agent { name: "b".into(), address: "h:2".into(), tls_address: None }]
        );
        assert_eq!(config.node_config, Some(dir.path().join("node.toml")));
    }

    #[test]
    fn the_etcd_endpoint_comes_from_the_node_config_and_is_checked() {
        let dir = TempDir::new("cp-config");
        dir.write("node.toml", "[etcd]\nendpoint = \"127.0.0.1:2379\"\n");
        let path =
            dir.write("config.toml", "listen = \"127.0.0.1:0\"\nnode_config = \"node.toml\"\n");
        assert_eq!(load(&path).unwrap().etcd.as_deref(), Some("127.0.0.1:2379"));
        let path = dir.write("plain.toml", "listen = \"127.0.0.1:0\"\n");
        assert_eq!(load(&path).unwrap().etcd, None);
        let path = dir.write("bad.toml", "listen = \"127.0.0.1:0\"\n[etcd]\nendpoint = \"etcd\"\n");
        let err = load(&path).unwrap_err().to_string();
        assert!(err.contains("etcd.endpoint: `etcd` is not host:port"), "{err}");
    }

    #[test]
    fn errors_name_file_line_and_field() {
        let dir = TempDir::new("cp-config");
        let cases = [
            (
                "listen = \"[::]:1\"\n[[agents]]\nname = \"a\"\naddress = \"fd00::1:80\"\n",
                ":4:11: agents.address: `fd00::1:80`: write an IPv6 address in brackets, as [addr]:port",
            ),
            (
                "listen = \"[::]:1\"\n[[agents]]\nname = \"a\"\naddress = \"host\"\n",
                ":4:11: agents.address: `host` is not host:port",
            ),
            (
                "listen = \"[::]:1\"\n[[agents]]\nname = \"a\"\naddress = \"h:0\"\n",
                ":4:11: agents.address: `h:0` has no valid port (1 to 65535)",
            ),
            (
                "listen = \"[::]:1\"\n[[agents]]\nname = \"a\"\naddress = \"h:1\"\n\
                 [[agents]]\nname = \"a\"\naddress = \"h:2\"\n",
                ":6:8: agents.name: agent `a` is listed twice",
            ),
            (
                "listen = \"[::]:1\"\n[[agents]]\nname = \"a b\"\naddress = \"h:1\"\n",
                ":3:8: agents.name: `a b` is not a node name",
            ),
            ("listen = \"[::]:1\"\npoll_interval_ms = 5\n", ":2:20: poll_interval_ms: 5 is out of range (100 to 3600000)"),
        ];
        for (i, (text, want)) in cases.iter().enumerate() {
            let path = dir.write(&format!("case{i}.toml"), text);
            let err = load(&path).unwrap_err().to_string();
            let want = format!("config {path}{want}");
            assert!(err.starts_with(&want), "case {i}:\n got {err}\nwant {want}");
        }
        let path = dir
            .write("typo.toml", "listen = \"[::]:1\"\n[[agents]]\nname = \"a\"\naddr = \"h:1\"\n");
        let err = load(&path).unwrap_err().to_string();
        assert!(
            err.starts_with(&format!("parse config {path}:4:1: unknown field `addr`")),
            "{err}"
        );
    }
}
