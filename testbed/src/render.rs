//! The files `up` hands to users and to `cargo xtask fling`: known_hosts, an ssh config and a
//! deployment config. Rendering is kept pure so it is tested without a testbed.

use std::fmt::Write as _;
use std::net::{Ipv4Addr, Ipv6Addr};

use camino::Utf8Path;

/// What the rendered files need to know about one node.
pub struct NodeEntry<'a> {
    pub name: &'a str,
    pub ipv4: Ipv4Addr,
    pub ipv6: Ipv6Addr,
    /// The node's public host key, `<type> <base64>`.
    pub host_key: &'a str,
}

/// The builder: this machine, reached over ssh on loopback.
pub struct BuilderEntry<'a> {
    pub port: u16,
    pub username: &'a str,
    pub host_key: &'a str,
    /// Where the builder keeps its copy of the workspace.
    pub source_path: &'a Utf8Path,
}

/// The paths written into the configs.
pub struct Files<'a> {
    pub identity: &'a Utf8Path,
    pub known_hosts: &'a Utf8Path,
    pub ssh_config: &'a Utf8Path,
}

/// The name of the builder in the ssh config and the deployment config.
pub const BUILDER: &str = "builder";

/// One known_hosts line per node, naming it by its aliases, IPv4 and IPv6, so strict host key
/// checking succeeds whichever way a tool addresses it; then the builder by `[127.0.0.1]:port`.
pub fn known_hosts(nodes: &[NodeEntry<'_>], builder: Option<&BuilderEntry<'_>>) -> String {
    let mut out = String::new();
    for node in nodes {
        let key = node.host_key.trim();
        let _ = writeln!(out, "{0},{0}-v6,{1},{2} {key}", node.name, node.ipv4, node.ipv6);
    }
    if let Some(b) = builder {
        let _ =
            writeln!(out, "[127.0.0.1]:{},[{BUILDER}]:{} {}", b.port, b.port, b.host_key.trim());
    }
    out
}

/// An ssh config with a Host entry per node (`nodeN` over IPv4, `nodeN-v6` over IPv6) and one
/// for the builder; every entry checks host keys strictly against the testbed's known_hosts.
pub fn ssh_config(
    testbed: &str,
    nodes: &[NodeEntry<'_>],
    builder: Option<&BuilderEntry<'_>>,
    files: &Files<'_>,
) -> String {
    let mut out = format!(
        "# Written by `cargo xtask testbed up --name {testbed}`; use it with `ssh -F {}`.\n",
        files.ssh_config
    );
    let mut host = |alias: &str, addr: &str, port: u16, user: &str| {
        let _ = write!(
            out,
            "\nHost {alias}\n    HostName {addr}\n    Port {port}\n    User {user}\n    \
             IdentityFile {}\n    IdentitiesOnly yes\n    UserKnownHostsFile {}\n    \
             GlobalKnownHostsFile /dev/null\n    StrictHostKeyChecking yes\n    \
             ConnectTimeout 5\n",
            files.identity, files.known_hosts
        );
    };
    for node in nodes {
        host(node.name, &node.ipv4.to_string(), 22, "root");
        host(&format!("{}-v6", node.name), &node.ipv6.to_string(), 22, "root");
    }
    if let Some(b) = builder {
        host(BUILDER, "127.0.0.1", b.port, b.username);
    }
    out
}

/// The deployment config in the format of `deployment-example.toml`, extended with what a real
/// deploy to the testbed needs: ports, IPv6 addresses and the ssh files.
pub fn deployment(
    testbed: &str,
    source_path: &Utf8Path,
    nodes: &[NodeEntry<'_>],
    builder: &BuilderEntry<'_>,
    files: &Files<'_>,
    address: AddressFamily,
) -> String {
    let q = |s: &str| toml::Value::from(s).to_string();
    let mut out = format!(
        "# Written by `cargo xtask testbed up --name {testbed}` for `cargo xtask fling`.\n\
         # The builder is this machine over ssh on loopback; the servers are the testbed's nodes.\n\
         source_path = {}\n\n[builder]\nserver = {}\nsource_path = {}\n\n",
        q(source_path.as_str()),
        q(BUILDER),
        q(builder.source_path.as_str()),
    );
    let names: Vec<String> = nodes.iter().map(|n| q(n.name)).collect();
    let _ = write!(
        out,
        "[deployment]\nservers = [{}]\nstaging_dir = \"/var/tmp/flotilla-staging\"\n\n",
        names.join(", ")
    );
    let _ = write!(
        out,
        "# Every server is reached with these files and strict host key checking.\n[ssh]\n\
         identity_file = {}\nknown_hosts = {}\nconfig = {}\n\n",
        q(files.identity.as_str()),
        q(files.known_hosts.as_str()),
        q(files.ssh_config.as_str()),
    );
    let _ = write!(
        out,
        "[servers.{BUILDER}]\nusername = {}\naddr = \"127.0.0.1\"\nport = {}\n",
        q(builder.username),
        builder.port
    );
    for node in nodes {
        let (addr, other_key, other) = match address {
            AddressFamily::V4 => (node.ipv4.to_string(), "addr_v6", node.ipv6.to_string()),
            AddressFamily::V6 => (node.ipv6.to_string(), "addr_v4", node.ipv4.to_string()),
        };
        let _ = write!(
            out,
            "\n[servers.{}]\nusername = \"root\"\naddr = {}\nport = 22\n{other_key} = {}\n",
            node.name,
            q(&addr),
            q(&other)
        );
    }
    out
}

/// What a workspace's example config says of its own system: `[deployment] prefix` and the
/// `[overlay]` table of `<workspace>/deployment-example.toml`, when it has them.
#[derive(Debug, Default)]
pub struct System {
    pub prefix: Option<toml::Value>,
    pub overlay: Option<toml::Value>,
    /// The `[quorum.*]` tables: the workspace's quorum groups, whose members default to every
    /// deployment server, so they fit a testbed of any size.
    pub quorum: Option<toml::Value>,
}

pub fn system_tables(workspace: &Utf8Path) -> anyhow::Result<System> {
    let path = workspace.join("deployment-example.toml");
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(System::default()),
        Err(e) => anyhow::bail!("read {path}: {e}"),
    };
    let doc: toml::Table = text.parse().map_err(|e| anyhow::anyhow!("parse {path}: {e}"))?;
    Ok(System {
        prefix: doc.get("deployment").and_then(|d| d.get("prefix")).cloned(),
        overlay: doc.get("overlay").cloned(),
        quorum: doc.get("quorum").cloned(),
    })
}

/// `deployment` (the text [`deployment`] rendered) with the workspace's system tables: the
/// prefix in the `[deployment]` table, the `[overlay]` table at the end.
pub fn with_system(deployment: &str, system: &System) -> String {
    let mut text = deployment.to_owned();
    if let Some(prefix) = &system.prefix {
        text = text.replacen("[deployment]\n", &format!("[deployment]\nprefix = {prefix}\n"), 1);
    }
    let mut table = toml::Table::new();
    if let Some(overlay) = &system.overlay {
        table.insert("overlay".into(), overlay.clone());
    }
    if let Some(quorum) = &system.quorum {
        // Members named for the example's servers would not be the testbed's: every node is.
        let mut quorum = quorum.clone();
        if let Some(groups) = quorum.as_table_mut() {
            for (_, group) in groups.iter_mut() {
                if let Some(g) = group.as_table_mut() {
                    g.remove("members");
                }
            }
        }
        table.insert("quorum".into(), quorum);
    }
    if !table.is_empty() {
        text.push_str("\n# From the workspace's deployment-example.toml.\n");
        text.push_str(&toml::to_string(&table).expect("a table serializes"));
    }
    text
}

/// Which address of each node a deployment config uses as `addr`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddressFamily {
    V4,
    V6,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nodes() -> Vec<NodeEntry<'static>> {
        vec![
            NodeEntry {
                name: "node1",
                ipv4: "10.200.1.11".parse().unwrap(),
                ipv6: "fd00:1:2::b".parse().unwrap(),
                host_key: "ssh-ed25519 AAAAone root@x\n",
            },
            NodeEntry {
                name: "node2",
                ipv4: "10.200.1.12".parse().unwrap(),
                ipv6: "fd00:1:2::c".parse().unwrap(),
                host_key: "ssh-ed25519 AAAAtwo",
            },
        ]
    }

    fn builder() -> BuilderEntry<'static> {
        BuilderEntry {
            port: 40022,
            username: "root",
            host_key: "ssh-ed25519 AAAAb",
            source_path: Utf8Path::new("/t/builder/flotilla"),
        }
    }

    fn files() -> Files<'static> {
        Files {
            identity: Utf8Path::new("/t/id_ed25519"),
            known_hosts: Utf8Path::new("/t/known_hosts"),
            ssh_config: Utf8Path::new("/t/ssh_config"),
        }
    }

    #[test]
    fn known_hosts_names_every_address() {
        let text = known_hosts(&nodes(), Some(&builder()));
        assert_eq!(
            text,
            "node1,node1-v6,10.200.1.11,fd00:1:2::b ssh-ed25519 AAAAone root@x\n\
             node2,node2-v6,10.200.1.12,fd00:1:2::c ssh-ed25519 AAAAtwo\n\
             [127.0.0.1]:40022,[builder]:40022 ssh-ed25519 AAAAb\n"
        );
    }

    #[test]
    fn ssh_config_is_strict_and_complete() {
        let text = ssh_config("t", &nodes(), Some(&builder()), &files());
        assert!(text.contains(
            "\nHost node2\n    HostName 10.200.1.12\n    Port 22\n    User root\n    \
             IdentityFile /t/id_ed25519\n    IdentitiesOnly yes\n    \
             UserKnownHostsFile /t/known_hosts\n"
        ));
        assert!(text.contains("\nHost node1-v6\n    HostName fd00:1:2::b\n"));
        assert!(text.contains("\nHost builder\n    HostName 127.0.0.1\n    Port 40022\n"));
        assert_eq!(text.matches("StrictHostKeyChecking yes").count(), 5);
        assert!(!text.to_lowercase().contains("stricthostkeychecking no"));
    }

    fn v4_deployment() -> String {
        deployment("t", Utf8Path::new("/src"), &nodes(), &builder(), &files(), AddressFamily::V4)
    }

    #[test]
    fn deployment_config_parses_and_names_every_server() {
        let text = v4_deployment();
        let doc: toml::Table = text.parse().expect(&text);
        assert_eq!(doc["source_path"].as_str(), Some("/src"));
        assert_eq!(doc["builder"]["server"].as_str(), Some("builder"));
        assert_eq!(doc["builder"]["source_path"].as_str(), Some("/t/builder/flotilla"));
        let servers = doc["deployment"]["servers"].as_array().unwrap();
        assert_eq!(servers.len(), 2);
        assert_eq!(doc["servers"]["node2"]["addr"].as_str(), Some("10.200.1.12"));
        assert_eq!(doc["servers"]["node2"]["addr_v6"].as_str(), Some("fd00:1:2::c"));
        assert_eq!(doc["servers"]["node2"]["port"].as_integer(), Some(22));
        assert_eq!(doc["servers"]["builder"]["port"].as_integer(), Some(40022));
        assert_eq!(doc["ssh"]["known_hosts"].as_str(), Some("/t/known_hosts"));

        let text = deployment(
            "t",
            Utf8Path::new("/src"),
            &nodes(),
            &builder(),
            &files(),
            AddressFamily::V6,
        );
        let doc: toml::Table = text.parse().unwrap();
        assert_eq!(doc["servers"]["node1"]["addr"].as_str(), Some("fd00:1:2::b"));
        assert_eq!(doc["servers"]["node1"]["addr_v4"].as_str(), Some("10.200.1.11"));
    }

    #[test]
    fn fling_reads_the_deployment_configs() {
        for family in [AddressFamily::V4, AddressFamily::V6] {
            let text =
                deployment("t", Utf8Path::new("/src"), &nodes(), &builder(), &files(), family);
            let config =
                flotilla_fling::config::Config::parse(Utf8Path::new("deployment.toml"), &text)
                    .unwrap_or_else(|err| {
                        panic!("fling rejects the testbed's config: {err}\n{text}")
                    });
            assert_eq!(config.deployment.servers.len(), 2);
            assert_eq!(config.builder_server().port, 40022);
        }
    }

    #[test]
    fn the_workspaces_system_tables_are_copied_from_its_example_config() {
        let workspace = Utf8Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."));
        let system = system_tables(workspace).unwrap();
        let text = with_system(&v4_deployment(), &system);
        let config = flotilla_fling::config::Config::parse(Utf8Path::new("d.toml"), &text)
            .unwrap_or_else(|err| panic!("{err}\n{text}"));
        assert_eq!(config.overlay.secret_services, ["node-agent"]);
        assert_eq!(config.overlay.identity_services, ["node-agent"]);
        assert_eq!(config.deployment.prefix.as_str(), "/opt/flotilla");
        // The example's quorum groups, with every testbed node a member whatever it names.
        let group = &config.quorum[0];
        assert_eq!(group.members, config.deployment.servers);
        assert!(group.leader.is_some());
        let mut named = system;
        named.quorum.as_mut().unwrap()["etcd"]
            .as_table_mut()
            .unwrap()
            .insert("members".into(), toml::Value::Array(vec!["elsewhere".into()]));
        let text = with_system(&v4_deployment(), &named);
        let config = flotilla_fling::config::Config::parse(Utf8Path::new("d.toml"), &text)
            .unwrap_or_else(|err| panic!("{err}\n{text}"));
        assert_eq!(config.quorum[0].members, config.deployment.servers);
        let none = system_tables(Utf8Path::new("/nonexistent")).unwrap();
        assert!(none.prefix.is_none() && none.overlay.is_none() && none.quorum.is_none());
    }
}
