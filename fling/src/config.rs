//! The deployment config: thing-flinger's topology format, extended, parsed into validated types.
//!
//! Parsing happens in two passes. serde reads the file into `Raw*` structs whose fields keep
//! their byte spans, then `validate` turns them into the types the rest of `fling` uses, so every
//! message can name the file, line, column and field that is wrong.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::{IpAddr, Ipv6Addr},
    ops::Range,
};

use camino::{Utf8Path, Utf8PathBuf};
use serde::Deserialize;
use toml::Spanned;

use super::quote::RemotePath;

/// How many servers are worked on at once when neither the config nor `--parallel` says.
pub const DEFAULT_PARALLEL: usize = 10;
/// How many ssh connections may be starting at once when neither the config nor
/// `--connect-parallel` says. Handshakes are the expensive part of a connection, so they are
/// bounded separately from the work that follows them.
pub const DEFAULT_CONNECT_PARALLEL: usize = 8;
/// Where the deploy lock lives on the builder when the config does not say: inside the
/// builder's workspace, which is what it protects, so deploys from different workspaces on
/// one builder (several testbeds) do not refuse each other. `sync` never deletes it.
pub const DEFAULT_LOCK_DIR: &str = ".fling-lock";

/// A validated deployment config.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it was read from, for messages.
    pub path: Utf8PathBuf,
    /// The raw text, which the overlay command hands to the builder.
    pub text: String,
    /// The client's checkout of the workspace; `None` means the workspace `cargo xtask` runs in.
    pub source_path: Option<Utf8PathBuf>,
    pub builder: Builder,
    pub deployment: Deployment,
    pub ssh: SshSettings,
    /// Every server of the topology, by name.
    pub servers: BTreeMap<ServerName, Server>,
}

/// The machine that builds the packages and pushes them to the servers.
#[derive(Debug, Clone)]
pub struct Builder {
    /// One of the servers of the topology.
    pub server: ServerName,
    /// The builder's copy of the workspace (a path on the builder).
    pub source_path: RemotePath,
    /// Patterns `sync` never sends, in addition to `.gitignore`, `target/`, `out/` and `.git/`.
    pub excludes: Vec<String>,
    /// The deploy lock's directory (a path on the builder).
    pub lock_dir: RemotePath,
}

/// Where the packages go and how.
#[derive(Debug, Clone)]
pub struct Deployment {
    /// The servers that receive the packages, in the order of the config.
    pub servers: Vec<ServerName>,
    /// The directory on each server that receives packages and overlay files.
    pub staging_dir: RemotePath,
    /// thing-flinger's `rss_server`: accepted for compatibility, must be a deployment server.
    pub rss_server: Option<ServerName>,
    /// The known_hosts file on the builder that holds the servers' host keys; `[ssh]
    /// known_hosts` when not given.
    pub known_hosts: Option<RemotePath>,
    pub service_manager: ServiceManager,
    pub parallel: usize,
    pub connect_parallel: usize,
    /// How many servers' shares unlock the rack (k of n); a majority when not given.
    pub rack_threshold: u8,
}

/// How every hop connects. The testbed writes this table.
#[derive(Debug, Clone, Default)]
pub struct SshSettings {
    /// An ssh config file on the client, passed to ssh with `-F` on the client->builder hop.
    pub config: Option<Utf8PathBuf>,
    /// A known_hosts file: on the client for the builder, and at the same path on the builder
    /// for the servers unless `[deployment] known_hosts` names another.
    pub known_hosts: Option<RemotePath>,
    /// A private key on the client for every server without its own `identity_file`.
    pub identity_file: Option<Utf8PathBuf>,
    /// `-o Key=Value` options for every hop.
    pub options: Vec<String>,
}

/// The service manager of the servers, which the installer drives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ServiceManager {
    Systemd,
    Smf,
}

impl ServiceManager {
    pub fn as_str(self) -> &'static str {
        match self {
            ServiceManager::Systemd => "systemd",
            ServiceManager::Smf => "smf",
        }
    }
}

/// One server of the topology.
#[derive(Debug, Clone)]
pub struct Server {
    pub name: ServerName,
    pub username: String,
    pub addr: Addr,
    pub port: u16,
    /// Extra `-o Key=Value` options for ssh.
    pub ssh_options: Vec<String>,
    /// A private key on the client that authenticates to this server. For deployment servers
    /// it is loaded into a private agent that only the client->builder hop forwards.
    pub identity_file: Option<Utf8PathBuf>,
    /// Per-server values for the overlay generators.
    pub vars: BTreeMap<String, String>,
}

/// A validated server name: ASCII letters, digits, `-`, `_` and `.`, starting with a letter or
/// digit, so it is safe as a file name under `out/overlay/` and in messages.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServerName(String);

/// A server address: a host name or an IP literal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Addr {
    Name(String),
    Ip(IpAddr),
}

/// A config error, rendered as `file:line:column: field: message`.
#[derive(Debug)]
pub struct ConfigError {
    pub path: Utf8PathBuf,
    pub line: usize,
    pub column: usize,
    pub field: String,
    pub message: String,
}

impl ServerName {
    pub fn new(name: &str) -> Result<ServerName, String> {
        let mut chars = name.chars();
        let Some(first) = chars.next() else {
            return Err("a server name cannot be empty".into());
        };
        if !first.is_ascii_alphanumeric()
            || !chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            || name.len() > 64
        {
            return Err(format!(
                "invalid server name {name:?}: use at most 64 ASCII letters, digits, '-', '_' \
                 and '.', starting with a letter or digit"
            ));
        }
        Ok(ServerName(name.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ServerName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Addr {
    /// Parses a host name, an IPv4 literal or an IPv6 literal (bare or in brackets).
    pub fn parse(addr: &str) -> Result<Addr, String> {
        let unbracketed = addr.strip_prefix('[').and_then(|a| a.strip_suffix(']'));
        if let Some(inner) = unbracketed {
            return match inner.parse::<Ipv6Addr>() {
                Ok(ip) => Ok(Addr::Ip(IpAddr::V6(ip))),
                Err(_) => Err(format!("{addr:?} is in brackets but is not an IPv6 address")),
            };
        }
        if let Ok(ip) = addr.parse::<IpAddr>() {
            return Ok(Addr::Ip(ip));
        }
        // A host name as RFC 1123 allows it. This also keeps ssh from reading the address as
        // an option (a leading `-`) and the remote shell from seeing anything but a word.
        let label_ok = |l: &str| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        };
        let name = addr.strip_suffix('.').unwrap_or(addr);
        if name.is_empty() || name.len() > 253 || !name.split('.').all(label_ok) {
            return Err(format!("{addr:?} is neither an IP address nor a valid host name"));
        }
        Ok(Addr::Name(addr.to_owned()))
    }

    /// The address as ssh takes it: IPv6 literals bare.
    pub fn for_ssh(&self) -> String {
        match self {
            Addr::Name(name) => name.clone(),
            Addr::Ip(ip) => ip.to_string(),
        }
    }

    /// The address as rsync and scp take it in `user@host:path`: IPv6 literals in brackets.
    pub fn for_rsync(&self) -> String {
        match self {
            Addr::Name(name) => name.clone(),
            Addr::Ip(IpAddr::V4(ip)) => ip.to_string(),
            Addr::Ip(IpAddr::V6(ip)) => format!("[{ip}]"),
        }
    }
}

impl fmt::Display for Addr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.for_ssh())
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}: ", self.path, self.line, self.column)?;
        if !self.field.is_empty() {
            write!(f, "{}: ", self.field)?;
        }
        f.write_str(&self.message)
    }
}

impl std::error::Error for ConfigError {}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Utf8Path) -> anyhow::Result<Config> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(err) => anyhow::bail!("read deployment config {path}: {err}"),
        };
        Ok(Config::parse(path, &text)?)
    }

    /// Parses and validates the text of a config file; `path` is only used in messages.
    pub fn parse(path: &Utf8Path, text: &str) -> Result<Config, ConfigError> {
        let errors = Errors { path, text };
        let raw: RawConfig = match toml::from_str(text) {
            Ok(raw) => raw,
            Err(err) => {
                let span = err.span().unwrap_or(0..0);
                return Err(errors.at(span, "", err.message().to_owned()));
            }
        };
        validate(&errors, raw, text)
    }

    pub fn server(&self, name: &ServerName) -> &Server {
        // Validation guarantees every name held by the config refers to a defined server.
        &self.servers[name]
    }

    pub fn builder_server(&self) -> &Server {
        self.server(&self.builder.server)
    }

    /// The deployment servers, or the subset named on the command line.
    pub fn select_servers(&self, only: &[String]) -> anyhow::Result<Vec<&Server>> {
        if only.is_empty() {
            return Ok(self.deployment.servers.iter().map(|name| self.server(name)).collect());
        }
        let mut selected = Vec::new();
        for name in only {
            let Some(server) = self.deployment.servers.iter().find(|s| s.as_str() == name) else {
                anyhow::bail!(
                    "--servers: {name:?} is not one of the deployment servers of {} ({})",
                    self.path,
                    self.deployment
                        .servers
                        .iter()
                        .map(|s| s.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            };
            if selected.iter().any(|s: &&Server| &s.name == server) {
                anyhow::bail!("--servers: {name:?} is given twice");
            }
            selected.push(self.server(server));
        }
        Ok(selected)
    }
}

/// Builds errors that point into the config text.
struct Errors<'a> {
    path: &'a Utf8Path,
    text: &'a str,
}

impl Errors<'_> {
    fn at(&self, span: Range<usize>, field: &str, message: String) -> ConfigError {
        let before = &self.text[..span.start.min(self.text.len())];
        let line = before.matches('\n').count() + 1;
        let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
        ConfigError { path: self.path.to_owned(), line, column, field: field.to_owned(), message }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(alias = "omicron_path")]
    source_path: Option<Spanned<String>>,
    builder: RawBuilder,
    deployment: RawDeployment,
    #[serde(default)]
    ssh: RawSsh,
    servers: BTreeMap<Spanned<String>, RawServer>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBuilder {
    server: Spanned<String>,
    #[serde(alias = "omicron_path")]
    source_path: Spanned<String>,
    #[serde(default)]
    excludes: Vec<Spanned<String>>,
    lock_dir: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDeployment {
    servers: Vec<Spanned<String>>,
    staging_dir: Spanned<String>,
    rss_server: Option<Spanned<String>>,
    known_hosts: Option<Spanned<String>>,
    service_manager: Option<ServiceManager>,
    parallel: Option<Spanned<usize>>,
    connect_parallel: Option<Spanned<usize>>,
    rack_threshold: Option<Spanned<usize>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawSsh {
    config: Option<Spanned<String>>,
    known_hosts: Option<Spanned<String>>,
    identity_file: Option<Spanned<String>>,
    #[serde(default)]
    options: Vec<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    username: Spanned<String>,
    addr: Spanned<String>,
    port: Option<u16>,
    addr_v4: Option<Spanned<String>>,
    addr_v6: Option<Spanned<String>>,
    #[serde(default)]
    ssh_options: Vec<Spanned<String>>,
    identity_file: Option<Spanned<String>>,
    #[serde(default)]
    vars: BTreeMap<Spanned<String>, Spanned<String>>,
}

/// ssh options a config may not set: they would weaken host-key checking, run local commands
/// or fight the connection sharing `fling` manages itself.
const FORBIDDEN_SSH_OPTIONS: &[&str] = &[
    "stricthostkeychecking",
    "userknownhostsfile",
    "globalknownhostsfile",
    "knownhostscommand",
    "checkhostip",
    "controlmaster",
    "controlpath",
    "controlpersist",
    "proxycommand",
    "localcommand",
    "permitlocalcommand",
    "forwardagent",
    "remotecommand",
];

fn validate(errors: &Errors<'_>, raw: RawConfig, text: &str) -> Result<Config, ConfigError> {
    let mut servers = BTreeMap::new();
    for (name, raw_server) in raw.servers {
        let field = format!("servers.{}", name.get_ref());
        let server_name =
            ServerName::new(name.get_ref()).map_err(|m| errors.at(name.span(), &field, m))?;
        let server = validate_server(errors, &field, server_name.clone(), raw_server)?;
        servers.insert(server_name, server);
    }

    let lookup = |name: &Spanned<String>, field: &str| -> Result<ServerName, ConfigError> {
        match ServerName::new(name.get_ref()) {
            Ok(server) if servers.contains_key(&server) => Ok(server),
            _ => Err(errors.at(
                name.span(),
                field,
                format!("server {:?} is not defined in [servers]", name.get_ref()),
            )),
        }
    };

    let builder_server = lookup(&raw.builder.server, "builder.server")?;
    let mut excludes = Vec::new();
    for exclude in raw.builder.excludes {
        if exclude.get_ref().is_empty() || exclude.get_ref().contains(['\n', '\0']) {
            return Err(errors.at(
                exclude.span(),
                "builder.excludes",
                "an exclude pattern must be one non-empty line".into(),
            ));
        }
        excludes.push(exclude.into_inner());
    }
    let builder = Builder {
        server: builder_server,
        source_path: remote_path(errors, &raw.builder.source_path, "builder.source_path")?,
        excludes,
        lock_dir: match &raw.builder.lock_dir {
            Some(dir) => remote_path(errors, dir, "builder.lock_dir")?,
            None => remote_path(errors, &raw.builder.source_path, "builder.source_path")?
                .join(DEFAULT_LOCK_DIR),
        },
    };

    let d = raw.deployment;
    let mut deployment_servers: Vec<ServerName> = Vec::new();
    let mut endpoints: BTreeMap<(String, String, u16), ServerName> = BTreeMap::new();
    for name in &d.servers {
        let server = lookup(name, "deployment.servers")?;
        if deployment_servers.contains(&server) {
            return Err(errors.at(
                name.span(),
                "deployment.servers",
                format!("server {server} is listed twice"),
            ));
        }
        // Two names for one account on one host would install twice at once on it.
        let s = &servers[&server];
        let endpoint = (s.username.clone(), s.addr.for_ssh(), s.port);
        if let Some(other) = endpoints.insert(endpoint, server.clone()) {
            return Err(errors.at(
                name.span(),
                "deployment.servers",
                format!("servers {other} and {server} are the same account on the same host"),
            ));
        }
        deployment_servers.push(server);
    }
    if deployment_servers.is_empty() {
        return Err(errors.at(0..0, "deployment.servers", "no server to deploy to".into()));
    }
    let rss_server = match &d.rss_server {
        Some(name) => {
            let server = lookup(name, "deployment.rss_server")?;
            if !deployment_servers.contains(&server) {
                return Err(errors.at(
                    name.span(),
                    "deployment.rss_server",
                    format!("server {server} is not one of deployment.servers"),
                ));
            }
            Some(server)
        }
        None => None,
    };
    let positive = |value: &Option<Spanned<usize>>, field: &str, default: usize| match value {
        Some(v) if *v.get_ref() == 0 => {
            Err(errors.at(v.span(), field, "must be at least 1".into()))
        }
        Some(v) => Ok(*v.get_ref()),
        None => Ok(default),
    };
    let deployment_servers_len = deployment_servers.len();
    let deployment = Deployment {
        servers: deployment_servers,
        staging_dir: remote_path(errors, &d.staging_dir, "deployment.staging_dir")?,
        rss_server,
        known_hosts: d
            .known_hosts
            .as_ref()
            .map(|p| remote_path(errors, p, "deployment.known_hosts"))
            .transpose()?,
        service_manager: d.service_manager.unwrap_or(ServiceManager::Systemd),
        parallel: positive(&d.parallel, "deployment.parallel", DEFAULT_PARALLEL)?,
        connect_parallel: positive(
            &d.connect_parallel,
            "deployment.connect_parallel",
            DEFAULT_CONNECT_PARALLEL,
        )?,
        rack_threshold: match &d.rack_threshold {
            Some(v) if *v.get_ref() == 0 || *v.get_ref() > deployment_servers_len => {
                return Err(errors.at(
                    v.span(),
                    "deployment.rack_threshold",
                    format!("must be between 1 and the {deployment_servers_len} servers"),
                ));
            }
            Some(v) => *v.get_ref() as u8,
            None => (deployment_servers_len / 2 + 1) as u8,
        },
    };
    let ssh = SshSettings {
        config: raw.ssh.config.as_ref().map(|p| local_path(errors, p, "ssh.config")).transpose()?,
        known_hosts: raw
            .ssh
            .known_hosts
            .as_ref()
            .map(|p| remote_path(errors, p, "ssh.known_hosts"))
            .transpose()?,
        identity_file: raw
            .ssh
            .identity_file
            .as_ref()
            .map(|p| local_path(errors, p, "ssh.identity_file"))
            .transpose()?,
        options: ssh_options(errors, "ssh.options", raw.ssh.options)?,
    };
    // These paths travel inside ssh's `-o` options and rsync's `-e` option, which ssh and
    // rsync split on whitespace themselves; plain characters keep that split trivially right.
    for (field, raw_path) in [
        ("ssh.known_hosts", &raw.ssh.known_hosts),
        ("deployment.known_hosts", &d.known_hosts),
        ("ssh.config", &raw.ssh.config),
        ("ssh.identity_file", &raw.ssh.identity_file),
    ] {
        if let Some(path) = raw_path {
            // A known_hosts of /dev/null holds no key to trust and is the usual first step to
            // turning checking off: name the file that holds the keys.
            if field.ends_with("known_hosts") && path.get_ref() == "/dev/null" {
                return Err(errors.at(
                    path.span(),
                    field,
                    "known_hosts cannot be /dev/null: name the file that holds the host keys"
                        .into(),
                ));
            }
            if !path
                .get_ref()
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "/${}._-+@,".contains(c))
            {
                return Err(errors.at(
                    path.span(),
                    field,
                    "use only ASCII letters, digits and / . _ - + @ , in this path".into(),
                ));
            }
        }
    }

    Ok(Config {
        path: errors.path.to_owned(),
        text: text.to_owned(),
        source_path: raw
            .source_path
            .as_ref()
            .map(|p| local_path(errors, p, "source_path"))
            .transpose()?,
        builder,
        deployment,
        ssh,
        servers,
    })
}

fn validate_server(
    errors: &Errors<'_>,
    field: &str,
    name: ServerName,
    raw: RawServer,
) -> Result<Server, ConfigError> {
    let username = raw.username.get_ref();
    let username_ok = username.len() <= 32
        && username.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
        && username
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "_.-".contains(c));
    if !username_ok {
        return Err(errors.at(
            raw.username.span(),
            &format!("{field}.username"),
            format!(
                "invalid user name {username:?}: use lowercase ASCII letters, digits, '_', '.' \
                 and '-', starting with a letter or '_'"
            ),
        ));
    }
    let addr = Addr::parse(raw.addr.get_ref())
        .map_err(|m| errors.at(raw.addr.span(), &format!("{field}.addr"), m))?;
    let ssh_options = ssh_options(errors, &format!("{field}.ssh_options"), raw.ssh_options)?;
    // The testbed names both address families; the other one is checked but not used.
    for (key, value) in [("addr_v4", &raw.addr_v4), ("addr_v6", &raw.addr_v6)] {
        let Some(value) = value else { continue };
        let ip_ok = match value.get_ref().parse::<IpAddr>() {
            Ok(IpAddr::V4(_)) => key == "addr_v4",
            Ok(IpAddr::V6(_)) => key == "addr_v6",
            Err(_) => false,
        };
        if !ip_ok {
            return Err(errors.at(
                value.span(),
                &format!("{field}.{key}"),
                format!("{:?} is not an {} address", value.get_ref(), &key[5..]),
            ));
        }
    }
    let mut vars = BTreeMap::new();
    for (key, value) in raw.vars {
        let key_ok = key.get_ref().starts_with(|c: char| c.is_ascii_alphabetic())
            && key.get_ref().chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !key_ok {
            return Err(errors.at(
                key.span(),
                &format!("{field}.vars"),
                format!("invalid variable name {:?}", key.get_ref()),
            ));
        }
        vars.insert(key.into_inner(), value.into_inner());
    }
    Ok(Server {
        name,
        username: username.clone(),
        addr,
        port: raw.port.unwrap_or(22),
        ssh_options,
        identity_file: raw
            .identity_file
            .as_ref()
            .map(|p| local_path(errors, p, &format!("{field}.identity_file")))
            .transpose()?,
        vars,
    })
}

/// Validates `Key=Value` ssh options.
fn ssh_options(
    errors: &Errors<'_>,
    field: &str,
    raw: Vec<Spanned<String>>,
) -> Result<Vec<String>, ConfigError> {
    let mut options = Vec::new();
    for option in raw {
        let (key, value) = option.get_ref().split_once('=').unwrap_or(("", ""));
        let key_ok = !key.is_empty() && key.chars().all(|c| c.is_ascii_alphanumeric());
        // ssh and rsync's `-e` split on whitespace, so a value with whitespace would not stay
        // one option.
        if !key_ok || value.is_empty() || value.contains(char::is_whitespace) {
            return Err(errors.at(
                option.span(),
                field,
                format!("{:?} is not of the form Key=Value without whitespace", option.get_ref()),
            ));
        }
        if FORBIDDEN_SSH_OPTIONS.contains(&key.to_ascii_lowercase().as_str()) {
            return Err(errors.at(
                option.span(),
                field,
                format!("{key} is managed by fling and cannot be set here"),
            ));
        }
        options.push(option.into_inner());
    }
    Ok(options)
}

/// A path on a remote machine: absolute or `$HOME`-relative, expanded there.
fn remote_path(
    errors: &Errors<'_>,
    value: &Spanned<String>,
    field: &str,
) -> Result<RemotePath, ConfigError> {
    RemotePath::parse(value.get_ref()).map_err(|m| errors.at(value.span(), field, m))
}

/// A path on the client: absolute or `$HOME`-relative, expanded here and now.
fn local_path(
    errors: &Errors<'_>,
    value: &Spanned<String>,
    field: &str,
) -> Result<Utf8PathBuf, ConfigError> {
    let path = RemotePath::parse(value.get_ref()).map_err(|m| errors.at(value.span(), field, m))?;
    path.local().map_err(|m| errors.at(value.span(), field, m))
}

/// Server names that appear in the config but are not deployment servers or the builder: a
/// likely typo the caller may want to warn about.
pub fn unused_servers(config: &Config) -> BTreeSet<&ServerName> {
    config
        .servers
        .keys()
        .filter(|n| **n != config.builder.server && !config.deployment.servers.contains(n))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
source_path = "$HOME/src/flotilla"
[builder]
server = "b"
source_path = "$HOME/flotilla"
[deployment]
servers = ["n1", "n2"]
staging_dir = "/var/tmp/staging"
[servers.b]
username = "builder"
addr = "127.0.0.1"
port = 2222
[servers.n1]
username = "root"
addr = "fd77:1::11"
[servers.n1.vars]
role = "control"
[servers.n2]
username = "root"
addr = "node2.example.com"
"#;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Utf8Path::new("deploy.toml"), text)
    }

    fn error(text: &str) -> String {
        parse(text).expect_err("the config should be refused").to_string()
    }

    #[test]
    fn a_good_config_parses() {
        let config = parse(GOOD).unwrap();
        assert_eq!(config.builder.server.as_str(), "b");
        assert_eq!(config.builder_server().port, 2222);
        assert_eq!(config.deployment.servers.len(), 2);
        let n1 = config.server(&ServerName::new("n1").unwrap());
        assert_eq!(n1.addr.for_ssh(), "fd77:1::11");
        assert_eq!(n1.addr.for_rsync(), "[fd77:1::11]");
        assert_eq!(n1.vars["role"], "control");
        assert_eq!(config.deployment.parallel, DEFAULT_PARALLEL);
        assert_eq!(config.deployment.service_manager, ServiceManager::Systemd);
    }

    #[test]
    fn thing_flinger_field_names_are_accepted() {
        let text = GOOD.replace("source_path", "omicron_path").replace(
            "staging_dir = \"/var/tmp/staging\"",
            "staging_dir = \"/var/tmp/staging\"\nrss_server = \"n1\"",
        );
        let config = parse(&text).unwrap();
        assert_eq!(config.deployment.rss_server.unwrap().as_str(), "n1");
    }

    #[test]
    fn an_undefined_server_is_named_with_its_line() {
        let text = GOOD.replace("servers = [\"n1\", \"n2\"]", "servers = [\"n1\", \"n3\"]");
        assert_eq!(
            error(&text),
            "deploy.toml:7:18: deployment.servers: server \"n3\" is not defined in [servers]"
        );
        let text = GOOD.replace("server = \"b\"", "server = \"nope\"");
        assert!(error(&text).starts_with("deploy.toml:4:10: builder.server:"), "{}", error(&text));
    }

    #[test]
    fn the_rack_threshold_is_a_majority_unless_given_within_the_servers() {
        assert_eq!(parse(GOOD).unwrap().deployment.rack_threshold, 2, "two servers need both");
        let staging = "staging_dir = \"/var/tmp/staging\"";
        let one = GOOD.replace(staging, &format!("{staging}\nrack_threshold = 1"));
        assert_eq!(parse(&one).unwrap().deployment.rack_threshold, 1);
        for bad in ["0", "3"] {
            let text = GOOD.replace(staging, &format!("{staging}\nrack_threshold = {bad}"));
            let err = error(&text);
            assert!(
                err.contains("deployment.rack_threshold: must be between 1 and the 2 servers"),
                "{err}"
            );
        }
    }

    #[test]
    fn duplicates_are_errors() {
        let text = GOOD.replace("[\"n1\", \"n2\"]", "[\"n1\", \"n2\", \"n1\"]");
        assert!(error(&text).contains("server n1 is listed twice"), "{}", error(&text));
        let text = GOOD.replace("node2.example.com", "fd77:1:0::11");
        assert!(error(&text).contains("same account on the same host"), "{}", error(&text));
        // A table defined twice is refused by the TOML parser itself, with its position.
        let text = format!("{GOOD}\n[servers.n2]\nusername = \"root\"\naddr = \"x\"\n");
        let line = text[..text.rfind("[servers.n2]").unwrap()].matches('\n').count() + 1;
        assert!(error(&text).starts_with(&format!("deploy.toml:{line}:")), "{}", error(&text));
    }

    #[test]
    fn paths_must_be_absolute_or_home_relative() {
        let text = GOOD.replace("/var/tmp/staging", "var/tmp/staging");
        assert!(error(&text).starts_with("deploy.toml:8:15: deployment.staging_dir:"));
        let text = GOOD.replace("$HOME/flotilla", "~bob/flotilla");
        assert!(error(&text).contains("builder.source_path"), "{}", error(&text));
    }

    #[test]
    fn unknown_fields_and_bad_values_are_refused_with_their_field() {
        let text = GOOD.replace("port = 2222", "prot = 2222");
        assert!(error(&text).contains("unknown field `prot`"), "{}", error(&text));
        let text = GOOD.replace("username = \"builder\"", "username = \"-oProxyCommand=x\"");
        assert!(error(&text).contains("servers.b.username: invalid user name"));
        let text = GOOD.replace("node2.example.com", "-oProxyCommand=touch");
        assert!(error(&text).contains("servers.n2.addr:"), "{}", error(&text));
        let text = GOOD.replace("node2.example.com", "host;reboot");
        assert!(error(&text).contains("servers.n2.addr:"), "{}", error(&text));
        let text = GOOD
            .replace("port = 2222", "port = 2222\nssh_options = [\"StrictHostKeyChecking=no\"]");
        assert!(error(&text).contains("StrictHostKeyChecking is managed by fling"));
        let text = format!("{GOOD}\n[ssh]\nknown_hosts = \"/dev/null\"\n");
        assert!(error(&text).contains("ssh.known_hosts: known_hosts cannot be /dev/null"));
        let text = GOOD.replace("port = 2222", "port = 70000");
        assert!(error(&text).starts_with("deploy.toml:12:8:"), "{}", error(&text));
    }

    #[test]
    fn addresses() {
        assert_eq!(Addr::parse("[::1]").unwrap().for_rsync(), "[::1]");
        assert_eq!(Addr::parse("10.0.0.1").unwrap().for_rsync(), "10.0.0.1");
        assert!(Addr::parse("a..b").is_err());
        assert!(Addr::parse("").is_err());
        assert!(Addr::parse("[10.0.0.1]").is_err());
        assert!(Addr::parse("$(reboot)").is_err());
    }
}
