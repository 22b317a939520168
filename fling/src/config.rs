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
use super::rollout::{BatchSize, Budget};

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
    /// What the overlay generators make for the servers.
    pub overlay: OverlaySettings,
    /// Every server of the topology, by name.
    pub servers: BTreeMap<ServerName, Server>,
    /// `[quorum.<service>]`: the services whose members across servers form one cluster,
    /// which a rolling deploy never takes below its quorum.
    pub quorum: Vec<Quorum>,
    /// `[artifacts]`: the S3-compatible store the servers fetch packages from.
    pub artifacts: Option<Store>,
    /// thing-flinger's `debug`: verbose remote output. Every command a step runs on the
    /// builder, or from it on a server, is echoed (`+ <command>`) before it runs, and every
    /// rsync lists each file it sends or deletes. (thing-flinger built its own tools in the
    /// debug profile; here the packages' profiles come from the manifest.)
    pub debug: bool,
    /// thing-flinger's `rss_config_path`: a file of the workspace, relative to its root, that
    /// `fling overlay` places in the rss server's overlay alone, as
    /// `<prefix>/<service>/pkg/config-rss.toml` of every `[overlay] identity_services`
    /// service ([`RSS_CONFIG_FILE`]).
    pub rss_config_path: Option<String>,
}

/// An S3-compatible store of content-addressed artifacts (`[artifacts]`): the builder uploads
/// each output once, keyed by its digest, and signs short-lived `GET` URLs for the servers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Store {
    /// `http://` or `https://` host and port, as both the builder and the servers reach it.
    pub endpoint: String,
    pub bucket: String,
    /// The key prefix, without leading or trailing `/`; empty for none.
    pub prefix: String,
    pub region: String,
    /// A file on the builder with `access_key_id` and `secret_access_key` (TOML, mode 0600),
    /// read when the builder's environment has no `AWS_ACCESS_KEY_ID`.
    pub credentials_file: Option<RemotePath>,
    /// How long the URLs a deploy signs stay valid.
    pub url_ttl_secs: u64,
}

/// The presigned URLs' lifetime unless `url_ttl_secs` says otherwise.
pub const DEFAULT_URL_TTL_SECS: u64 = 900;

/// The name under which the file `rss_config_path` names reaches the rss server, in
/// `<prefix>/<service>/pkg/` (thing-flinger's name for it).
pub const RSS_CONFIG_FILE: &str = "config-rss.toml";

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
    /// The cargo workspace's directory inside `source_path`, when it is not the whole of it (a
    /// workspace inside a larger repository, whose path dependencies lie beside it).
    pub workspace: Option<String>,
}

impl Builder {
    /// The builder's cargo workspace: `source_path`, or `workspace` inside it.
    pub fn workspace_path(&self) -> RemotePath {
        match &self.workspace {
            Some(dir) => self.source_path.join(dir),
            None => self.source_path.clone(),
        }
    }
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
    /// Where the servers install releases, and the prefix the packages were built for.
    pub prefix: flotilla_contracts::layout::Prefix,
    /// `[deployment.rollout]`: how `install --rolling` batches the servers.
    pub rollout: Rollout,
}

/// How a rolling deploy proceeds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rollout {
    /// The batch sizes, the last one repeating: `batches = [1, "25%", "100%"]` [default: 1].
    pub ramp: Vec<BatchSize>,
    /// Servers of the whole fleet that may fail before no further batch starts [default: 0].
    pub max_failed: Budget,
    /// Seconds to wait between batches, once the quorum checks passed [default: 0].
    pub pause_secs: u64,
    /// Seconds each server waits for the deployer's confirmation over a new connection before
    /// it puts its previous release back; 0 asks for none [default: 30].
    pub confirm_timeout_secs: u64,
}

/// How long a server waits for the confirmation of a rolling deploy when the config does not
/// say.
pub const DEFAULT_CONFIRM_TIMEOUT_SECS: u64 = 30;

impl Default for Rollout {
    fn default() -> Rollout {
        Rollout {
            ramp: vec![BatchSize::Count(std::num::NonZeroUsize::MIN)],
            max_failed: Budget::Count(0),
            pause_secs: 0,
            confirm_timeout_secs: DEFAULT_CONFIRM_TIMEOUT_SECS,
        }
    }
}

/// A service whose members on several servers form one quorum.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quorum {
    /// The service's name, for messages.
    pub service: String,
    /// The servers that run a member, in the order of `deployment.servers`.
    pub members: Vec<ServerName>,
    /// The cluster's health, checked on a member: it must pass before a rolling deploy starts
    /// and after every batch that restarted a member.
    pub check: Check,
    /// Passes on the member that leads, which a rolling deploy restarts last.
    pub leader: Option<Check>,
    /// Seconds the check may take to pass after a batch [default: 60].
    pub timeout_secs: u64,
}

/// How long a quorum check may take to pass when the config does not say.
pub const DEFAULT_QUORUM_TIMEOUT_SECS: u64 = 60;

/// A check run on a server by `flotilla-installer probe`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Check {
    /// A program and its arguments (no shell) that must exit 0.
    Command(Vec<String>),
    /// An `http://` URL that must answer 2xx, and hold `contains` when given.
    Http { url: String, contains: Option<String> },
}

impl Check {
    /// The words after `flotilla-installer probe`, unquoted: the check, tried until it
    /// passes within `timeout` seconds.
    pub fn probe_args(&self, timeout: u64) -> Vec<String> {
        let mut args = vec!["--timeout".to_owned(), timeout.to_string()];
        match self {
            Check::Http { url, contains } => {
                args.extend(["--http".to_owned(), url.clone()]);
                if let Some(text) = contains {
                    args.extend(["--contains".to_owned(), text.clone()]);
                }
            }
            Check::Command(argv) => {
                args.push("--".to_owned());
                args.extend(argv.iter().cloned());
            }
        }
        args
    }
}

impl fmt::Display for Check {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Check::Command(argv) => write!(f, "`{}`", argv.join(" ")),
            Check::Http { url, contains: None } => write!(f, "GET {url}"),
            Check::Http { url, contains: Some(text) } => write!(f, "GET {url} holding {text:?}"),
        }
    }
}

/// The overlay generators' part of the config: which services receive what. Nothing is
/// generated for a service no list names, so a workspace declares its own.
#[derive(Debug, Clone, Default)]
pub struct OverlaySettings {
    /// The services that receive the node's TLS key and certificate and the cluster CA.
    pub tls_services: Vec<String>,
    /// The services that receive the node's share of the rack secret.
    pub secret_services: Vec<String>,
    /// The services that receive `identity.toml`: the node's name, address and variables.
    pub identity_services: Vec<String>,
    /// The templates' directory, relative to the workspace root.
    pub templates: String,
}

/// The templates' directory when `[overlay] templates` does not say.
pub const DEFAULT_TEMPLATES: &str = "overlay-templates";

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
    /// This server's own `[deployment.rollout] confirm_timeout_secs` (a slow machine).
    pub confirm_timeout_secs: Option<u64>,
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
            write!(f, "{}: ", escape_controls(&self.field))?;
        }
        f.write_str(&escape_controls(&self.message))
    }
}

impl std::error::Error for ConfigError {}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Utf8Path) -> crate::Result<Config> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| crate::Error::ReadConfig { path: path.to_owned(), source })?;
        Ok(Config::parse(path, &text)?)
    }

    /// Parses and validates the text of a config file; `path` is only used in messages.
    pub fn parse(path: &Utf8Path, text: &str) -> Result<Config, ConfigError> {
        let errors = Errors { path, text };
        let raw: RawConfig = match toml::from_str(text) {
            Ok(raw) => raw,
            Err(err) => {
                let span = err.span().unwrap_or(0..0);
                let field = field_at(text, span.start);
                return Err(errors.at(span, &field, err.message().trim_end().to_owned()));
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

    /// The deployment servers, or the subset named on the command line: each value may hold
    /// several names, separated by commas or whitespace (`a,b`, thing-flinger's `"a b"`).
    pub fn select_servers(&self, only: &[String]) -> crate::Result<Vec<&Server>> {
        if only.is_empty() {
            return Ok(self.deployment.servers.iter().map(|name| self.server(name)).collect());
        }
        let names: Vec<&str> = only
            .iter()
            .flat_map(|value| value.split(|c: char| c == ',' || c.is_whitespace()))
            .filter(|name| !name.is_empty())
            .collect();
        if names.is_empty() {
            return Err(crate::Error::Select(format!("{only:?} names no server")));
        }
        let mut selected = Vec::new();
        for name in names {
            let Some(server) = self.deployment.servers.iter().find(|s| s.as_str() == name) else {
                return Err(crate::Error::Select(format!(
                    "{name:?} is not one of the deployment servers of {} ({})",
                    self.path,
                    self.deployment
                        .servers
                        .iter()
                        .map(|s| s.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )));
            };
            if selected.iter().any(|s: &&Server| &s.name == server) {
                return Err(crate::Error::Select(format!("{name:?} is given twice")));
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
    #[serde(default)]
    overlay: RawOverlay,
    servers: BTreeMap<Spanned<String>, RawServer>,
    #[serde(default)]
    quorum: BTreeMap<Spanned<String>, RawQuorum>,
    artifacts: Option<Spanned<RawArtifacts>>,
    #[serde(default)]
    debug: bool,
    rss_config_path: Option<Spanned<String>>,
}

/// `[artifacts]`: the store. Credentials are not among its fields, by design.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawArtifacts {
    endpoint: Spanned<String>,
    bucket: Spanned<String>,
    #[serde(default)]
    prefix: Option<Spanned<String>>,
    #[serde(default)]
    region: Option<Spanned<String>>,
    #[serde(default)]
    credentials_file: Option<Spanned<String>>,
    #[serde(default)]
    url_ttl_secs: Option<Spanned<u64>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawOverlay {
    #[serde(default)]
    tls_services: Vec<Spanned<String>>,
    #[serde(default)]
    secret_services: Vec<Spanned<String>>,
    #[serde(default)]
    identity_services: Vec<Spanned<String>>,
    templates: Option<Spanned<String>>,
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
    workspace: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDeployment {
    servers: Spanned<Vec<Spanned<String>>>,
    staging_dir: Spanned<String>,
    rss_server: Option<Spanned<String>>,
    known_hosts: Option<Spanned<String>>,
    service_manager: Option<ServiceManager>,
    parallel: Option<Spanned<usize>>,
    connect_parallel: Option<Spanned<usize>>,
    rack_threshold: Option<Spanned<usize>>,
    prefix: Option<Spanned<String>>,
    #[serde(default)]
    rollout: RawRollout,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawRollout {
    batches: Option<Spanned<Vec<Spanned<RawSize>>>>,
    max_failed: Option<Spanned<RawSize>>,
    pause_secs: Option<Spanned<u64>>,
    confirm_timeout_secs: Option<Spanned<u64>>,
}

/// A batch size or budget: a number, or a string (`"25%"`).
#[derive(Deserialize)]
#[serde(untagged)]
enum RawSize {
    Count(i64),
    Text(String),
}

impl RawSize {
    fn text(&self) -> String {
        match self {
            RawSize::Count(n) => n.to_string(),
            RawSize::Text(t) => t.clone(),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawQuorum {
    members: Option<Vec<Spanned<String>>>,
    check: Spanned<RawCheck>,
    leader: Option<Spanned<RawCheck>>,
    timeout_secs: Option<Spanned<u64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCheck {
    command: Option<Vec<String>>,
    http: Option<String>,
    contains: Option<String>,
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
    port: Option<Spanned<u16>>,
    addr_v4: Option<Spanned<String>>,
    addr_v6: Option<Spanned<String>>,
    #[serde(default)]
    ssh_options: Vec<Spanned<String>>,
    identity_file: Option<Spanned<String>>,
    #[serde(default)]
    vars: BTreeMap<Spanned<String>, Spanned<String>>,
    confirm_timeout_secs: Option<Spanned<u64>>,
}

/// The ssh options a config may set: what a deploy legitimately tunes about its connections
/// (timeouts, keep-alives, algorithms, compression, address family, attempts, log level),
/// lowercase. Everything else is refused with [`refusal`]'s reason: fling owns host-key
/// checking, batch mode, connection sharing and agent forwarding, and an option that names a
/// program, a library, another host or another key to check would change who is reached or
/// what runs on the client.
pub const ALLOWED_SSH_OPTIONS: &[&str] = &[
    "addressfamily",
    "casignaturealgorithms",
    "ciphers",
    "compression",
    "connectionattempts",
    "connecttimeout",
    "fingerprinthash",
    "hostbasedacceptedalgorithms",
    "hostkeyalgorithms",
    "ipqos",
    "kexalgorithms",
    "loglevel",
    "macs",
    "pubkeyacceptedalgorithms",
    "pubkeyacceptedkeytypes",
    "rekeylimit",
    "serveralivecountmax",
    "serveraliveinterval",
    "tcpkeepalive",
];

/// Why an ssh option outside [`ALLOWED_SSH_OPTIONS`] is refused.
fn refusal(key: &str) -> String {
    let lower = key.to_ascii_lowercase();
    let why = match lower.as_str() {
        "stricthostkeychecking"
        | "userknownhostsfile"
        | "globalknownhostsfile"
        | "knownhostscommand"
        | "checkhostip"
        | "updatehostkeys"
        | "verifyhostkeydns"
        | "hashknownhosts" => {
            "it changes how host keys are checked, which fling always does strictly against \
             the configured known_hosts"
        }
        "hostkeyalias" | "hostname" => {
            "it changes which host is reached or whose key is checked; put the real address \
             in the server's `addr`"
        }
        "proxyjump"
        | "proxycommand"
        | "localcommand"
        | "permitlocalcommand"
        | "remotecommand"
        | "sessiontype"
        | "stdinnull"
        | "forkafterauthentication" => {
            "it runs a command or routes the connection elsewhere; a jump host belongs in the \
             ssh config file named by `[ssh] config`"
        }
        "pkcs11provider"
        | "securitykeyprovider"
        | "identityagent"
        | "certificatefile"
        | "identityfile"
        | "identitiesonly"
        | "addkeystoagent" => {
            "it loads a library or chooses keys; use `identity_file` for the key of a server"
        }
        "batchmode"
        | "passwordauthentication"
        | "kbdinteractiveauthentication"
        | "challengeresponseauthentication"
        | "numberofpasswordprompts" => "fling never prompts: BatchMode is always on",
        "controlmaster" | "controlpath" | "controlpersist" => {
            "fling manages connection sharing itself"
        }
        "forwardagent"
        | "forwardx11"
        | "forwardx11trusted"
        | "localforward"
        | "remoteforward"
        | "dynamicforward"
        | "tunnel"
        | "tunneldevice"
        | "gatewayports"
        | "clearallforwardings"
        | "exitonforwardfailure"
        | "streamlocalbindunlink" => {
            "fling decides what each hop forwards: the agent to the builder only, nothing else"
        }
        "user" | "port" | "include" | "match" | "host" | "setenv" | "sendenv" => {
            "it belongs in the server's table (`username`, `port`) or the ssh config file"
        }
        _ => "it is not one of the options a deploy may tune",
    };
    format!("{key} cannot be set here: {why} (allowed: {})", ALLOWED_SSH_OPTIONS.join(", "))
}

/// Home directories' own hidden directories that belong to other programs: never a directory
/// fling fills or empties.
const HOME_TOOL_DIRS: &[&str] =
    &[".ssh", ".config", ".cargo", ".rustup", ".local", ".cache", ".gnupg", ".profile"];

/// The characters a remote path may hold: it is read by the shells and by rsync on two other
/// machines, so anything beyond the portable file name characters is refused rather than
/// trusted to quoting alone.
pub(crate) fn remote_path_chars_ok(path: &str) -> bool {
    path.chars().all(|c| c.is_ascii_alphanumeric() || "/._-+@,=%".contains(c))
}

/// `s` with control characters written as escapes, so a message never moves the terminal's
/// cursor or rings its bell.
pub fn escape_controls(s: &str) -> String {
    if !s.chars().any(char::is_control) {
        return s.to_owned();
    }
    s.chars()
        .map(|c| if c.is_control() { c.escape_default().to_string() } else { c.to_string() })
        .collect()
}

/// The dotted name of the field whose value starts at byte `offset` of a TOML text: the
/// innermost table header above it and the key on its line. For the messages of errors the
/// TOML parser reports (a bad port, a duplicate key, an unknown variant), which name no field.
/// A table header's key (`servers."n1"`) as a dotted field name (`servers.n1`).
fn dotted(header: &str) -> String {
    header.split('.').map(|p| p.trim().trim_matches('"')).collect::<Vec<_>>().join(".")
}

fn field_at(text: &str, offset: usize) -> String {
    let offset = offset.min(text.len());
    let mut table = String::new();
    let line_start = text[..offset].rfind('\n').map_or(0, |i| i + 1);
    for line in text[..line_start].lines() {
        let line = line.trim();
        if let Some(header) = line.strip_prefix('[') {
            let header = header.trim_start_matches('[');
            if let Some(end) = header.find(']') {
                table = dotted(&header[..end]);
            }
        }
    }
    let line = &text[line_start..];
    let line = line.split('\n').next().unwrap_or("");
    let trimmed = line.trim_start();
    if trimmed.starts_with('[') {
        let header = trimmed.trim_start_matches('[');
        let end = header.find(']').unwrap_or(header.len());
        return dotted(&header[..end]);
    }
    let key = match line.split_once('=') {
        Some((key, _)) if line_start + key.len() <= offset || offset == line_start => {
            key.trim().trim_matches('"').to_owned()
        }
        _ => String::new(),
    };
    match (table.is_empty(), key.is_empty()) {
        (true, _) => key,
        (false, true) => table,
        (false, false) => format!("{table}.{key}"),
    }
}

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
        if exclude.get_ref().is_empty() || exclude.get_ref().contains(char::is_control) {
            return Err(errors.at(
                exclude.span(),
                "builder.excludes",
                format!(
                    "{:?}: an exclude pattern must be one non-empty line without control \
                     characters",
                    exclude.get_ref()
                ),
            ));
        }
        excludes.push(exclude.into_inner());
    }
    let source_path = dedicated_path(errors, &raw.builder.source_path, "builder.source_path")?;
    let lock_dir = match &raw.builder.lock_dir {
        Some(dir) => {
            let lock = dedicated_path(errors, dir, "builder.lock_dir")?;
            // `sync --delete` mirrors the workspace into source_path: a lock inside it would be
            // deleted by the next sync, unless it is the default one, which sync excludes.
            if paths_overlap(&lock, &source_path) && lock != source_path.join(DEFAULT_LOCK_DIR) {
                return Err(errors.at(
                    dir.span(),
                    "builder.lock_dir",
                    format!(
                        "{lock} overlaps builder.source_path ({source_path}), which `sync` \
                         mirrors with --delete; leave lock_dir out for {source_path}/\
                         {DEFAULT_LOCK_DIR} or name a directory outside it"
                    ),
                ));
            }
            lock
        }
        None => source_path.join(DEFAULT_LOCK_DIR),
    };
    let workspace = match &raw.builder.workspace {
        Some(dir) => {
            let text = dir.get_ref();
            let ok = !text.starts_with('/')
                && remote_path_chars_ok(text)
                && flotilla_contracts::layout::check_plain_path(text).is_ok();
            if !ok {
                return Err(errors.at(
                    dir.span(),
                    "builder.workspace",
                    format!(
                        "{text:?}: name the workspace's directory relative to source_path, \
                         normalized, of ASCII letters, digits and / . _ - + @ , = %"
                    ),
                ));
            }
            Some(text.trim_end_matches('/').to_owned())
        }
        None => None,
    };
    let builder = Builder { server: builder_server, source_path, excludes, lock_dir, workspace };

    let d = raw.deployment;
    let mut deployment_servers: Vec<ServerName> = Vec::new();
    let mut endpoints: BTreeMap<(String, String, u16), ServerName> = BTreeMap::new();
    if d.servers.get_ref().is_empty() {
        return Err(errors.at(
            d.servers.span(),
            "deployment.servers",
            "no server to deploy to: name at least one server of [servers]".into(),
        ));
    }
    for name in d.servers.get_ref() {
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
    let staging_dir = dedicated_path(errors, &d.staging_dir, "deployment.staging_dir")?;
    // The builder may be one of the servers, so its directories and the staging directory
    // must not overlap either; nor may the staging directory and the install prefix, which
    // the installer replaces release by release.
    let install_prefix = match &d.prefix {
        Some(p) => flotilla_contracts::layout::Prefix::new(p.get_ref())
            .map_err(|m| errors.at(p.span(), "deployment.prefix", m))?,
        None => flotilla_contracts::layout::Prefix::default(),
    };
    let prefix = RemotePath::Absolute(install_prefix.as_str().to_owned());
    for (other, what) in [
        (&builder.source_path, "builder.source_path"),
        (&builder.lock_dir, "builder.lock_dir"),
        (&prefix, "the install prefix"),
    ] {
        if paths_overlap(&staging_dir, other) {
            return Err(errors.at(
                d.staging_dir.span(),
                "deployment.staging_dir",
                format!(
                    "{staging_dir} overlaps {what} ({other}): the staging directory is replaced \
                     by every deploy, so it must be a directory of its own"
                ),
            ));
        }
    }
    if paths_overlap(&builder.source_path, &prefix) {
        return Err(errors.at(
            raw.builder.source_path.span(),
            "builder.source_path",
            format!("{} overlaps the install prefix ({prefix})", builder.source_path),
        ));
    }
    let mut deployment = Deployment {
        servers: deployment_servers,
        staging_dir: staging_dir.clone(),
        rss_server,
        known_hosts: None,
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
        prefix: install_prefix,
        rollout: validate_rollout(errors, d.rollout)?,
    };
    let quorum = validate_quorum(errors, raw.quorum, &deployment)?;
    let artifacts = raw.artifacts.map(|a| validate_store(errors, a.into_inner())).transpose()?;
    let overlay = validate_overlay(errors, raw.overlay)?;
    let rss_config_path = match &raw.rss_config_path {
        Some(path) => Some(rss_config_path(errors, path, &deployment, &overlay)?),
        None => None,
    };
    let ssh = SshSettings {
        config: raw.ssh.config.as_ref().map(|p| ssh_file(errors, p, "ssh.config")).transpose()?,
        known_hosts: raw
            .ssh
            .known_hosts
            .as_ref()
            .map(|p| known_hosts(errors, p, "ssh.known_hosts"))
            .transpose()?,
        identity_file: raw
            .ssh
            .identity_file
            .as_ref()
            .map(|p| ssh_file(errors, p, "ssh.identity_file"))
            .transpose()?,
        options: ssh_options(errors, "ssh.options", raw.ssh.options)?,
    };
    deployment.known_hosts = d
        .known_hosts
        .as_ref()
        .map(|p| known_hosts(errors, p, "deployment.known_hosts"))
        .transpose()?;

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
        overlay,
        servers,
        quorum,
        artifacts,
        debug: raw.debug,
        rss_config_path,
    })
}

/// `[artifacts]`: an endpoint URL without path, query or credentials; a bucket name as S3
/// allows it; a prefix of plain key characters.
fn validate_store(errors: &Errors<'_>, raw: RawArtifacts) -> Result<Store, ConfigError> {
    let endpoint = raw.endpoint.get_ref().trim_end_matches('/').to_owned();
    let bad_endpoint = |m: &str| errors.at(raw.endpoint.span(), "artifacts.endpoint", m.to_owned());
    let rest = endpoint
        .strip_prefix("http://")
        .or_else(|| endpoint.strip_prefix("https://"))
        .ok_or_else(|| bad_endpoint("an http:// or https:// URL of the store"))?;
    if rest.is_empty()
        || rest.contains(['/', '?', '#', '@'])
        || !rest.chars().all(|c| c.is_ascii_alphanumeric() || "-.:[]".contains(c))
    {
        return Err(bad_endpoint(
            "the store's scheme, host and port only (http://10.0.0.1:8333), no path, query or \
             credentials: credentials come from the builder's environment or credentials_file",
        ));
    }
    let bucket = raw.bucket.get_ref().clone();
    let bucket_ok = (3..=63).contains(&bucket.len())
        && bucket.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "-.".contains(c))
        && !bucket.starts_with(['-', '.'])
        && !bucket.ends_with(['-', '.']);
    if !bucket_ok {
        return Err(errors.at(
            raw.bucket.span(),
            "artifacts.bucket",
            format!("{bucket:?}: 3 to 63 lowercase letters, digits, - and ., as S3 names buckets"),
        ));
    }
    let prefix = match &raw.prefix {
        Some(p) => {
            let text = p.get_ref().trim_matches('/').to_owned();
            let ok = text.split('/').all(|part| {
                !part.is_empty()
                    && part != "."
                    && part != ".."
                    && part.chars().all(|c| c.is_ascii_alphanumeric() || "-._".contains(c))
            });
            if !text.is_empty() && !ok {
                return Err(errors.at(
                    p.span(),
                    "artifacts.prefix",
                    format!("{text:?}: /-separated parts of ASCII letters, digits, - . _"),
                ));
            }
            text
        }
        None => String::new(),
    };
    let region = match &raw.region {
        Some(r) => {
            let text = r.get_ref();
            if text.is_empty() || !text.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
                return Err(errors.at(
                    r.span(),
                    "artifacts.region",
                    format!("{text:?}: letters, digits and - (us-east-1)"),
                ));
            }
            text.clone()
        }
        None => "us-east-1".into(),
    };
    let url_ttl_secs = match &raw.url_ttl_secs {
        Some(t) if !(1..=604_800).contains(t.get_ref()) => {
            return Err(errors.at(
                t.span(),
                "artifacts.url_ttl_secs",
                "between 1 and 604800 seconds (S3's limit for presigned URLs)".into(),
            ));
        }
        Some(t) => *t.get_ref(),
        None => DEFAULT_URL_TTL_SECS,
    };
    Ok(Store {
        endpoint,
        bucket,
        prefix,
        region,
        credentials_file: raw
            .credentials_file
            .as_ref()
            .map(|p| remote_path(errors, p, "artifacts.credentials_file"))
            .transpose()?,
        url_ttl_secs,
    })
}

/// The longest confirmation a server may be asked to wait for (the installer's bound).
pub const MAX_CONFIRM_TIMEOUT_SECS: u64 = 86400;

fn validate_rollout(errors: &Errors<'_>, raw: RawRollout) -> Result<Rollout, ConfigError> {
    let mut rollout = Rollout::default();
    if let Some(batches) = &raw.batches {
        if batches.get_ref().is_empty() {
            return Err(errors.at(
                batches.span(),
                "deployment.rollout.batches",
                "give at least one batch size: `[1, \"25%\", \"100%\"]`".into(),
            ));
        }
        rollout.ramp = batches
            .get_ref()
            .iter()
            .map(|b| {
                BatchSize::parse(&b.get_ref().text())
                    .map_err(|m| errors.at(b.span(), "deployment.rollout.batches", m))
            })
            .collect::<Result<_, _>>()?;
    }
    if let Some(budget) = &raw.max_failed {
        rollout.max_failed = Budget::parse(&budget.get_ref().text())
            .map_err(|m| errors.at(budget.span(), "deployment.rollout.max_failed", m))?;
    }
    if let Some(pause) = raw.pause_secs {
        if *pause.get_ref() > 3600 {
            return Err(errors.at(
                pause.span(),
                "deployment.rollout.pause_secs",
                "at most 3600 seconds between batches".into(),
            ));
        }
        rollout.pause_secs = pause.into_inner();
    }
    if let Some(confirm) = raw.confirm_timeout_secs {
        if *confirm.get_ref() > MAX_CONFIRM_TIMEOUT_SECS {
            return Err(errors.at(
                confirm.span(),
                "deployment.rollout.confirm_timeout_secs",
                format!("at most {MAX_CONFIRM_TIMEOUT_SECS} seconds; 0 asks for none"),
            ));
        }
        rollout.confirm_timeout_secs = confirm.into_inner();
    }
    Ok(rollout)
}

fn validate_check(
    errors: &Errors<'_>,
    raw: &Spanned<RawCheck>,
    field: &str,
    leader: bool,
) -> Result<Check, ConfigError> {
    let at = |m: String| errors.at(raw.span(), field, m);
    let check = raw.get_ref();
    let control = |t: &str| t.contains(char::is_control);
    match (&check.command, &check.http) {
        (Some(argv), None) => {
            if check.contains.is_some() {
                return Err(at("`contains` goes with `http`, not with `command`".into()));
            }
            if argv.is_empty() || !argv[0].starts_with('/') {
                return Err(at(
                    "`command` is a program, by its absolute path, and its arguments (no shell)"
                        .into(),
                ));
            }
            if argv.iter().any(|a| control(a)) {
                return Err(at("a control character in `command`".into()));
            }
            Ok(Check::Command(argv.clone()))
        }
        (None, Some(url)) => {
            let plain = url
                .strip_prefix("http://")
                .is_some_and(|rest| !rest.is_empty() && rest.chars().all(|c| c.is_ascii_graphic()));
            if !plain {
                return Err(at(format!("{url:?}: give an http:// URL, as the server sees it")));
            }
            if check.contains.as_deref().is_some_and(|t| t.is_empty() || control(t)) {
                return Err(at("`contains` is one non-empty line of text".into()));
            }
            Ok(Check::Http { url: url.clone(), contains: check.contains.clone() })
        }
        _ => Err(at(format!(
            "give `command = [\"/path/to/program\", ...]` or `http = \"http://...\"`{}",
            if leader { " (passing on the member that leads)" } else { "" }
        ))),
    }
}

fn validate_quorum(
    errors: &Errors<'_>,
    raw: BTreeMap<Spanned<String>, RawQuorum>,
    deployment: &Deployment,
) -> Result<Vec<Quorum>, ConfigError> {
    let mut groups: Vec<Quorum> = Vec::new();
    for (name, q) in raw {
        let field = format!("quorum.{}", name.get_ref());
        let name_ok = !name.get_ref().is_empty()
            && name.get_ref().chars().all(|c| c.is_ascii_alphanumeric() || "-_".contains(c));
        if !name_ok {
            return Err(errors.at(
                name.span(),
                &field,
                "name the service: ASCII letters, digits, `-` and `_`".into(),
            ));
        }
        let members = match &q.members {
            None => deployment.servers.clone(),
            Some(list) => {
                let mut members = Vec::new();
                for m in list {
                    let server = ServerName::new(m.get_ref())
                        .ok()
                        .filter(|s| deployment.servers.contains(s))
                        .ok_or_else(|| {
                            errors.at(
                                m.span(),
                                &format!("{field}.members"),
                                format!("{:?} is not one of deployment.servers", m.get_ref()),
                            )
                        })?;
                    if members.contains(&server) {
                        return Err(errors.at(
                            m.span(),
                            &format!("{field}.members"),
                            format!("{server} is listed twice"),
                        ));
                    }
                    members.push(server);
                }
                if members.is_empty() {
                    return Err(errors.at(
                        name.span(),
                        &format!("{field}.members"),
                        "a quorum has at least one member (leave `members` out for every \
                         deployment server)"
                            .into(),
                    ));
                }
                // The order of the deployment, whatever the order of the list.
                deployment.servers.iter().filter(|s| members.contains(s)).cloned().collect()
            }
        };
        if let Some(other) = groups.iter().find(|g| g.members.iter().any(|m| members.contains(m))) {
            let shared = members.iter().find(|m| other.members.contains(m)).expect("found");
            return Err(errors.at(
                name.span(),
                &field,
                format!(
                    "{shared} is a member of quorum.{} too: a server belongs to one quorum \
                     group, since a batch restarts all of its services",
                    other.service
                ),
            ));
        }
        let timeout_secs = match &q.timeout_secs {
            Some(t) if *t.get_ref() == 0 || *t.get_ref() > 3600 => {
                return Err(errors.at(
                    t.span(),
                    &format!("{field}.timeout_secs"),
                    "between 1 and 3600 seconds".into(),
                ));
            }
            Some(t) => *t.get_ref(),
            None => DEFAULT_QUORUM_TIMEOUT_SECS,
        };
        groups.push(Quorum {
            service: name.get_ref().clone(),
            check: validate_check(errors, &q.check, &format!("{field}.check"), false)?,
            leader: q
                .leader
                .as_ref()
                .map(|l| validate_check(errors, l, &format!("{field}.leader"), true))
                .transpose()?,
            members,
            timeout_secs,
        });
    }
    Ok(groups)
}

/// `rss_config_path`: a file of the workspace, relative to its root, normalized and of
/// portable characters, for a config that names the rss server and the services to receive
/// it. The overlay is generated on the builder, from its synced copy of the workspace, so the
/// file is read there (thing-flinger read it on the client).
fn rss_config_path(
    errors: &Errors<'_>,
    value: &Spanned<String>,
    deployment: &Deployment,
    overlay: &OverlaySettings,
) -> Result<String, ConfigError> {
    let field = "rss_config_path";
    let text = value.get_ref();
    let err = |m: String| errors.at(value.span(), field, m);
    flotilla_contracts::layout::check_plain_path(text).map_err(err)?;
    if text.starts_with('/') || text.ends_with('/') || !remote_path_chars_ok(text) {
        return Err(err(format!(
            "{text:?}: name a file of the workspace, relative to its root, of ASCII letters, \
             digits and / . _ - + @ , = % (the overlay is made on the builder, from the \
             workspace `fling sync` sent it)"
        )));
    }
    if deployment.rss_server.is_none() {
        return Err(err(
            "the file goes to the rss server alone: name it in deployment.rss_server".into()
        ));
    }
    if overlay.identity_services.is_empty() {
        return Err(err(format!(
            "no service would receive it: it is placed as {RSS_CONFIG_FILE} in the pkg/ \
             directory of every [overlay] identity_services service, and that list is empty"
        )));
    }
    Ok(text.clone())
}

fn validate_overlay(errors: &Errors<'_>, raw: RawOverlay) -> Result<OverlaySettings, ConfigError> {
    let services = |list: Vec<Spanned<String>>, field: &str| -> Result<Vec<String>, ConfigError> {
        let mut names = Vec::new();
        for name in list {
            let ok = name.get_ref().starts_with(|c: char| c.is_ascii_alphanumeric())
                && name.get_ref().len() <= 64
                && name.get_ref().chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
            if !ok {
                return Err(errors.at(
                    name.span(),
                    field,
                    format!(
                        "{:?} is not a service name: use ASCII letters, digits, '-', '_' and \
                         '.', starting with a letter or digit",
                        name.get_ref()
                    ),
                ));
            }
            if names.contains(name.get_ref()) {
                return Err(errors.at(
                    name.span(),
                    field,
                    format!("{} is listed twice", name.get_ref()),
                ));
            }
            names.push(name.into_inner());
        }
        Ok(names)
    };
    let templates = match raw.templates {
        Some(dir) => {
            let text = dir.get_ref();
            let plain = flotilla_contracts::layout::check_plain_path(text);
            if let Err(m) = plain {
                return Err(errors.at(dir.span(), "overlay.templates", m));
            }
            if text.starts_with('/') || !remote_path_chars_ok(text) {
                return Err(errors.at(
                    dir.span(),
                    "overlay.templates",
                    format!(
                        "{text:?}: name a directory of the workspace, relative to its root, of \
                         ASCII letters, digits and / . _ - + @ , = %"
                    ),
                ));
            }
            dir.into_inner()
        }
        None => DEFAULT_TEMPLATES.to_owned(),
    };
    Ok(OverlaySettings {
        tls_services: services(raw.tls_services, "overlay.tls_services")?,
        secret_services: services(raw.secret_services, "overlay.secret_services")?,
        identity_services: services(raw.identity_services, "overlay.identity_services")?,
        templates,
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
        if value.get_ref().contains(char::is_control) {
            return Err(errors.at(
                value.span(),
                &format!("{field}.vars.{}", key.get_ref()),
                format!(
                    "{:?} holds a control character; a variable is one line of text",
                    value.get_ref()
                ),
            ));
        }
        vars.insert(key.into_inner(), value.into_inner());
    }
    Ok(Server {
        name,
        username: username.clone(),
        addr,
        port: match &raw.port {
            Some(port) if *port.get_ref() == 0 => {
                return Err(errors.at(
                    port.span(),
                    &format!("{field}.port"),
                    "port 0 is not a port to connect to: use 1-65535".into(),
                ));
            }
            Some(port) => *port.get_ref(),
            None => 22,
        },
        ssh_options,
        identity_file: raw
            .identity_file
            .as_ref()
            .map(|p| ssh_file(errors, p, &format!("{field}.identity_file")))
            .transpose()?,
        vars,
        confirm_timeout_secs: match raw.confirm_timeout_secs {
            Some(v) if *v.get_ref() > MAX_CONFIRM_TIMEOUT_SECS => {
                return Err(errors.at(
                    v.span(),
                    &format!("{field}.confirm_timeout_secs"),
                    format!("at most {MAX_CONFIRM_TIMEOUT_SECS} seconds; 0 asks for none"),
                ));
            }
            Some(v) => Some(v.into_inner()),
            None => None,
        },
    })
}

/// Validates `Key=Value` ssh options against [`ALLOWED_SSH_OPTIONS`].
fn ssh_options(
    errors: &Errors<'_>,
    field: &str,
    raw: Vec<Spanned<String>>,
) -> Result<Vec<String>, ConfigError> {
    let mut options = Vec::new();
    for option in raw {
        let (key, value) = option.get_ref().split_once('=').unwrap_or(("", ""));
        let key_ok = !key.is_empty() && key.chars().all(|c| c.is_ascii_alphanumeric());
        // ssh and rsync's `-e` split on whitespace, and every allowed option takes a number, a
        // word or a list of algorithm names, so a value is made of these characters alone.
        let value_ok = !value.is_empty()
            && value.chars().all(|c| c.is_ascii_alphanumeric() || ",.:@+_^-".contains(c));
        if key_ok
            && !value.is_empty()
            && !ALLOWED_SSH_OPTIONS.contains(&key.to_ascii_lowercase().as_str())
        {
            return Err(errors.at(option.span(), field, refusal(key)));
        }
        if !key_ok || !value_ok {
            return Err(errors.at(
                option.span(),
                field,
                format!(
                    "{:?} is not of the form Key=Value, with a value of ASCII letters, digits \
                     and , . : @ + _ ^ -",
                    option.get_ref()
                ),
            ));
        }
        options.push(option.into_inner());
    }
    Ok(options)
}

/// A path on a remote machine: absolute or `$HOME`-relative, expanded there, of plain
/// characters and normalized.
fn remote_path(
    errors: &Errors<'_>,
    value: &Spanned<String>,
    field: &str,
) -> Result<RemotePath, ConfigError> {
    let text = value.get_ref();
    let err = |m: String| errors.at(value.span(), field, m);
    let path = RemotePath::parse(text).map_err(err)?;
    let rest = match &path {
        RemotePath::Absolute(p) => p.as_str(),
        RemotePath::Home(rest) => rest.as_str(),
    };
    if !remote_path_chars_ok(rest) {
        return Err(err(format!(
            "{text:?}: use only ASCII letters, digits and / . _ - + @ , = % in a path on \
             another machine (after a leading $HOME/): it is read by the shells and by rsync \
             of two other machines"
        )));
    }
    if !rest.is_empty() {
        flotilla_contracts::layout::check_plain_path(rest).map_err(err)?;
    }
    Ok(path)
}

/// A remote directory that fling fills, replaces or removes as a whole: it must be dedicated
/// to it (see `flotilla_contracts::layout::check_dedicated`), and not `$HOME` itself nor one
/// of the home's directories that belong to other tools.
fn dedicated_path(
    errors: &Errors<'_>,
    value: &Spanned<String>,
    field: &str,
) -> Result<RemotePath, ConfigError> {
    let path = remote_path(errors, value, field)?;
    let why = match &path {
        RemotePath::Absolute(p) => flotilla_contracts::layout::check_dedicated(p, None).err(),
        RemotePath::Home(rest) if rest.is_empty() => Some(
            "$HOME is the user's home directory itself; name a directory inside it, such as \
             $HOME/flotilla"
                .to_owned(),
        ),
        RemotePath::Home(rest) => {
            let top = rest.split('/').next().unwrap_or_default();
            HOME_TOOL_DIRS.contains(&top).then(|| {
                format!("$HOME/{top} belongs to another program; name a directory of its own")
            })
        }
    };
    match why {
        Some(why) => Err(errors.at(
            value.span(),
            field,
            format!("{why} (fling writes into this directory and deletes what it does not send)"),
        )),
        None => Ok(path),
    }
}

/// Whether two remote paths are the same directory or one lies inside the other. Paths of
/// different kinds (absolute and `$HOME`-relative) are compared only when both are absolute
/// or both are relative to the same home.
fn paths_overlap(a: &RemotePath, b: &RemotePath) -> bool {
    match (a, b) {
        (RemotePath::Absolute(a), RemotePath::Absolute(b)) => {
            flotilla_contracts::layout::overlaps(a, b)
        }
        (RemotePath::Home(a), RemotePath::Home(b)) => {
            flotilla_contracts::layout::overlaps(&format!("/{a}"), &format!("/{b}"))
        }
        _ => false,
    }
}

/// A file that travels inside ssh's `-o` options and rsync's `-e` option, which ssh and rsync
/// split on whitespace themselves: plain characters keep that split trivially right. The same
/// rules hold for every such file: `[ssh] config`, `identity_file` and each server's own.
fn ssh_file(
    errors: &Errors<'_>,
    value: &Spanned<String>,
    field: &str,
) -> Result<Utf8PathBuf, ConfigError> {
    plain_file(errors, value, field)?;
    local_path(errors, value, field)
}

/// A known_hosts file (on the client for the builder, on the builder for the servers).
fn known_hosts(
    errors: &Errors<'_>,
    value: &Spanned<String>,
    field: &str,
) -> Result<RemotePath, ConfigError> {
    // A known_hosts of /dev/null holds no key to trust and is the usual first step to
    // turning checking off: name the file that holds the keys.
    if value.get_ref() == "/dev/null" {
        return Err(errors.at(
            value.span(),
            field,
            "known_hosts cannot be /dev/null: name the file that holds the host keys".into(),
        ));
    }
    plain_file(errors, value, field)?;
    remote_path(errors, value, field)
}

fn plain_file(
    errors: &Errors<'_>,
    value: &Spanned<String>,
    field: &str,
) -> Result<(), ConfigError> {
    let path = value.get_ref();
    let rest = ["${HOME}", "$HOME"].iter().find_map(|h| path.strip_prefix(h)).unwrap_or(path);
    if rest.chars().all(|c| c.is_ascii_alphanumeric() || "/._-+@,".contains(c)) {
        return Ok(());
    }
    Err(errors.at(
        value.span(),
        field,
        format!(
            "{:?}: use only ASCII letters, digits and / . _ - + @ , in this path (after a \
             leading $HOME)",
            value.get_ref()
        ),
    ))
}

/// A path on the client: absolute or `$HOME`-relative, expanded here and now. It is used only
/// here, as one argument of a local program, so only control characters are refused.
fn local_path(
    errors: &Errors<'_>,
    value: &Spanned<String>,
    field: &str,
) -> Result<Utf8PathBuf, ConfigError> {
    if value.get_ref().contains(char::is_control) {
        return Err(errors.at(
            value.span(),
            field,
            format!("{:?} holds a control character", value.get_ref()),
        ));
    }
    let path = RemotePath::parse(value.get_ref()).map_err(|m| errors.at(value.span(), field, m))?;
    let local = path.local().map_err(|m| errors.at(value.span(), field, m))?;
    flotilla_contracts::layout::check_plain_path(local.as_str())
        .map_err(|m| errors.at(value.span(), field, m))?;
    Ok(local)
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
    fn thing_flingers_debug_and_rss_config_path_are_accepted_with_a_meaning() {
        let config = parse(GOOD).unwrap();
        assert!(!config.debug);
        assert_eq!(config.rss_config_path, None);
        let staging = "staging_dir = \"/var/tmp/staging\"";
        let rss = GOOD.replace(staging, &format!("{staging}\nrss_server = \"n2\""));
        let with = |top: &str, overlay: &str| format!("{top}\n{rss}\n[overlay]\n{overlay}\n");
        let services = "identity_services = [\"agent\"]";
        let config =
            parse(&with("debug = true\nrss_config_path = \"smf/rss/config-rss.toml\"", services))
                .unwrap();
        assert!(config.debug);
        assert_eq!(config.rss_config_path.as_deref(), Some("smf/rss/config-rss.toml"));

        let err = error(&format!("debug = \"yes\"\n{GOOD}"));
        assert!(err.starts_with("deploy.toml:1:9: debug: "), "{err}");
        for (bad, why) in [
            ("/home/me/config-rss.toml", "relative to its root"),
            ("../config-rss.toml", "`.` or `..`"),
            ("rack/", "relative to its root"),
            ("rack/$(reboot).toml", "relative to its root"),
        ] {
            let err = error(&with(&format!("rss_config_path = {bad:?}"), services));
            assert!(err.starts_with("deploy.toml:1:19: rss_config_path: "), "{bad}: {err}");
            assert!(err.contains(why), "{bad}: {err}");
        }
        // The file goes to the rss server's identity services: both must be named.
        let err = error(&format!("rss_config_path = \"rss.toml\"\n{GOOD}"));
        assert!(err.contains("rss_config_path: the file goes to the rss server alone"), "{err}");
        let err = error(&with("rss_config_path = \"rss.toml\"", ""));
        assert!(err.contains("rss_config_path: no service would receive it"), "{err}");
    }

    #[test]
    fn servers_are_selected_by_name_in_any_of_the_habitual_forms() {
        let text = format!("{GOOD}[servers.n3]\nusername = \"root\"\naddr = \"n3.example.com\"\n")
            .replace("servers = [\"n1\", \"n2\"]", "servers = [\"n1\", \"n2\", \"n3\"]");
        let config = parse(&text).unwrap();
        let names = |values: &[&str]| -> Result<Vec<String>, String> {
            let values: Vec<String> = values.iter().map(|v| v.to_string()).collect();
            match config.select_servers(&values) {
                Ok(servers) => Ok(servers.iter().map(|s| s.name.to_string()).collect()),
                Err(e) => Err(e.to_string()),
            }
        };
        assert_eq!(names(&[]).unwrap(), ["n1", "n2", "n3"]);
        for forms in [&["n3", "n1"][..], &["n3,n1"], &["n3 n1"], &["n3, n1"], &[" n3\tn1 "]] {
            assert_eq!(names(forms).unwrap(), ["n3", "n1"], "{forms:?}");
        }
        assert_eq!(names(&["n3,n1", "n2"]).unwrap(), ["n3", "n1", "n2"]);
        let err = names(&["n1", "n9"]).unwrap_err();
        assert!(err.starts_with("--servers: \"n9\" is not one of the deployment servers"), "{err}");
        assert_eq!(names(&["n1,n2", "n1"]).unwrap_err(), "--servers: \"n1\" is given twice");
        assert!(names(&["b"]).unwrap_err().contains("\"b\" is not one of"), "the builder");
        assert_eq!(names(&[", "]).unwrap_err(), "--servers: [\", \"] names no server");
    }

    #[test]
    fn the_store_is_checked_and_never_holds_credentials() {
        let store = |body: &str| format!("{GOOD}\n[artifacts]\n{body}\n");
        let ok = parse(&store(
            "endpoint = \"http://10.0.0.1:8333/\"\nbucket = \"acme-artifacts\"\nprefix = \"/rack1/\"",
        ))
        .unwrap();
        let a = ok.artifacts.unwrap();
        assert_eq!(
            (a.endpoint.as_str(), a.prefix.as_str(), a.region.as_str(), a.url_ttl_secs),
            ("http://10.0.0.1:8333", "rack1", "us-east-1", DEFAULT_URL_TTL_SECS)
        );
        assert!(parse(GOOD).unwrap().artifacts.is_none());
        for (body, field, says) in [
            ("endpoint = \"ftp://x\"\nbucket = \"abc\"", "artifacts.endpoint", "http://"),
            (
                "endpoint = \"http://key:secret@x:1\"\nbucket = \"abc\"",
                "artifacts.endpoint",
                "no path, query or credentials",
            ),
            ("endpoint = \"http://x\"\nbucket = \"AB\"", "artifacts.bucket", "3 to 63"),
            (
                "endpoint = \"http://x\"\nbucket = \"abc\"\nprefix = \"a/../b\"",
                "artifacts.prefix",
                "parts",
            ),
            (
                "endpoint = \"http://x\"\nbucket = \"abc\"\nurl_ttl_secs = 0",
                "artifacts.url_ttl_secs",
                "between",
            ),
        ] {
            let err = error(&store(body));
            assert!(err.contains(&format!(": {field}: ")) && err.contains(says), "{body}: {err}");
            assert!(err.starts_with("deploy.toml:"), "{err}");
        }
        let err = error(&store(
            "endpoint = \"http://x\"\nbucket = \"abc\"\nsecret_access_key = \"hunter2\"",
        ));
        assert!(err.contains("unknown field `secret_access_key`"), "{err}");
        assert!(!err.contains("hunter2"), "a refused secret is echoed: {err}");
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
    fn rollouts_and_quorum_groups_parse_and_bad_ones_name_their_field_and_line() {
        let config = parse(GOOD).unwrap();
        assert_eq!(config.deployment.rollout, Rollout::default());
        assert!(config.quorum.is_empty());
        let text = GOOD.replace(
            "staging_dir = \"/var/tmp/staging\"",
            "staging_dir = \"/var/tmp/staging\"\n[deployment.rollout]\nbatches = [1, \"50%\"]\n\
             max_failed = \"10%\"\npause_secs = 2\nconfirm_timeout_secs = 0",
        )
            + "[quorum.etcd]\nmembers = [\"n2\", \"n1\"]\ncheck = { command = [\"/bin/etcdctl\", \
             \"endpoint\", \"health\"] }\nleader = { http = \"http://127.0.0.1:2381/metrics\", \
             contains = \"etcd_server_is_leader 1\" }\n";
        let config = parse(&text).unwrap();
        let rollout = &config.deployment.rollout;
        assert_eq!(rollout.ramp, [BatchSize::parse("1").unwrap(), BatchSize::Percent(50)]);
        assert_eq!(rollout.max_failed, Budget::Percent(10));
        assert_eq!((rollout.pause_secs, rollout.confirm_timeout_secs), (2, 0));
        let etcd = &config.quorum[0];
        // Members come in the deployment's order.
        let members: Vec<&str> = etcd.members.iter().map(ServerName::as_str).collect();
        assert_eq!(members, ["n1", "n2"]);
        assert_eq!(etcd.timeout_secs, DEFAULT_QUORUM_TIMEOUT_SECS);
        assert_eq!(
            etcd.leader.as_ref().unwrap().probe_args(0),
            [
                "--timeout",
                "0",
                "--http",
                "http://127.0.0.1:2381/metrics",
                "--contains",
                "etcd_server_is_leader 1"
            ]
        );
        for (bad, expected) in [
            ("batches = [0]", "deployment.rollout.batches: \"0\": give a number"),
            ("batches = [\"150%\"]", "deployment.rollout.batches: \"150%\": a percentage"),
            ("batches = []", "deployment.rollout.batches: give at least one"),
            ("max_failed = \"x\"", "deployment.rollout.max_failed: \"x\""),
            ("serial = 1", "unknown field `serial`"),
        ] {
            let text = GOOD.replace(
                "staging_dir = \"/var/tmp/staging\"",
                &format!("staging_dir = \"/var/tmp/staging\"\n[deployment.rollout]\n{bad}"),
            );
            let err = error(&text);
            assert!(err.contains(expected), "{bad}: {err}");
            assert!(err.starts_with("deploy.toml:"), "{err}");
        }
        for (bad, expected) in [
            (
                "members = [\"b\"]\ncheck = { http = \"http://x/\" }",
                "quorum.etcd.members: \"b\" is not one",
            ),
            (
                "check = { command = [\"etcdctl\"] }",
                "quorum.etcd.check: `command` is a program, by its absolute path",
            ),
            (
                "check = { http = \"https://x/\" }",
                "quorum.etcd.check: \"https://x/\": give an http://",
            ),
            (
                "check = { command = [\"/bin/true\"], contains = \"x\" }",
                "`contains` goes with `http`",
            ),
            ("check = {}", "quorum.etcd.check: give `command"),
            ("check = { http = \"http://x/\" }\nleader = {}", "quorum.etcd.leader: give `command"),
            ("check = { http = \"http://x/\" }\ntimeout_secs = 0", "quorum.etcd.timeout_secs"),
        ] {
            let text = format!("{GOOD}[quorum.etcd]\n{bad}\n");
            let err = error(&text);
            assert!(err.contains(expected), "{bad}: {err}");
        }
        let two = format!(
            "{GOOD}[quorum.a]\ncheck = {{ http = \"http://x/\" }}\n[quorum.b]\nmembers = [\"n2\"]\n\
             check = {{ http = \"http://x/\" }}\n"
        );
        assert!(error(&two).contains("n2 is a member of quorum.a too"), "{}", error(&two));
        let text = GOOD.replace(
            "addr = \"node2.example.com\"",
            "addr = \"node2.example.com\"\nconfirm_timeout_secs = 90",
        );
        let config = parse(&text).unwrap();
        let n2 = ServerName::new("n2").unwrap();
        assert_eq!(config.servers[&n2].confirm_timeout_secs, Some(90));
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
        assert!(error(&text).contains("StrictHostKeyChecking cannot be set here"));
        let text = format!("{GOOD}\n[ssh]\nknown_hosts = \"/dev/null\"\n");
        assert!(error(&text).contains("ssh.known_hosts: known_hosts cannot be /dev/null"));
        let text = GOOD.replace("port = 2222", "port = 70000");
        assert!(error(&text).starts_with("deploy.toml:12:8:"), "{}", error(&text));
    }

    #[test]
    fn directories_fling_fills_or_empties_must_be_dedicated() {
        let staging = "staging_dir = \"/var/tmp/staging\"";
        let examples = flotilla_contracts::layout::SYSTEM_EXAMPLES.iter().copied();
        for bad in examples.chain([
            "/etc/ssh",
            "/var/lib",
            "/usr/local",
            "/home/bob",
            "$HOME",
            "$HOME/",
            "${HOME}",
            "$HOME/.ssh",
            "$HOME/.cargo/x",
        ]) {
            for (field, text) in [
                (
                    "deployment.staging_dir",
                    GOOD.replace(staging, &format!("staging_dir = {bad:?}")),
                ),
                (
                    "builder.source_path",
                    GOOD.replace(
                        "source_path = \"$HOME/flotilla\"",
                        &format!("source_path = {bad:?}"),
                    ),
                ),
                (
                    "builder.lock_dir",
                    GOOD.replace("[deployment]", &format!("lock_dir = {bad:?}\n[deployment]")),
                ),
            ] {
                let err = error(&text);
                assert!(err.contains(&format!(": {field}: ")), "{bad} as {field}: {err}");
                assert!(
                    err.contains("fling writes into this directory"),
                    "{bad} as {field}: {err}"
                );
            }
        }
        let err = error(&GOOD.replace(staging, "staging_dir = \"/etc\""));
        assert!(
            err.starts_with(
                "deploy.toml:8:15: deployment.staging_dir: /etc is a directory of the system"
            ),
            "{err}"
        );
        let err = error(&GOOD.replace(staging, "staging_dir = \"/opt/flotilla\""));
        assert!(err.contains("overlaps the install prefix (/opt/flotilla)"), "{err}");
        let err = error(&GOOD.replace(staging, "staging_dir = \"/opt/flotilla/staging\""));
        assert!(err.contains("overlaps the install prefix"), "{err}");
        let err = error(&GOOD.replace(staging, "staging_dir = \"$HOME/flotilla/staging\""));
        assert!(err.contains("overlaps builder.source_path ($HOME/flotilla)"), "{err}");
        let err = error(
            &GOOD.replace("[deployment]", "lock_dir = \"$HOME/flotilla/lock\"\n[deployment]"),
        );
        assert!(
            err.contains("builder.lock_dir: $HOME/flotilla/lock overlaps builder.source_path"),
            "{err}"
        );
        let ok =
            GOOD.replace("[deployment]", "lock_dir = \"$HOME/flotilla/.fling-lock\"\n[deployment]");
        assert_eq!(parse(&ok).unwrap().builder.lock_dir.as_str(), "$HOME/flotilla/.fling-lock");
        for good in
            ["/opt/flotilla-staging", "/var/tmp/flotilla-staging", "$HOME/staging", "/srv/x"]
        {
            assert!(
                parse(&GOOD.replace(staging, &format!("staging_dir = {good:?}"))).is_ok(),
                "{good}"
            );
        }
    }

    #[test]
    fn only_the_ssh_options_a_deploy_tunes_are_accepted_each_refusal_with_its_reason() {
        let with = |option: &str| {
            GOOD.replace("port = 2222", &format!("port = 2222\nssh_options = [{option:?}]"))
        };
        for (option, reason) in [
            ("PKCS11Provider=/tmp/evil.so", "loads a library"),
            ("SecurityKeyProvider=/tmp/evil.so", "loads a library"),
            ("ProxyJump=evil.example.com", "routes the connection elsewhere"),
            ("ProxyCommand=nc", "runs a command"),
            ("LocalCommand=id", "runs a command"),
            ("HostName=evil.example.com", "which host is reached"),
            ("HostKeyAlias=other", "whose key is checked"),
            ("VerifyHostKeyDNS=yes", "how host keys are checked"),
            ("StrictHostKeyChecking=no", "how host keys are checked"),
            ("UserKnownHostsFile=/dev/null", "how host keys are checked"),
            ("BatchMode=no", "BatchMode is always on"),
            ("ControlPath=/tmp/x", "connection sharing"),
            ("ForwardAgent=yes", "forwards"),
            ("RemoteForward=1:x:2", "forwards"),
            ("IdentityFile=/tmp/k", "identity_file"),
            ("User=root", "username"),
            ("Bogus=1", "not one of the options a deploy may tune"),
        ] {
            let err = error(&with(option));
            let key = option.split('=').next().unwrap();
            assert!(
                err.contains(&format!("servers.b.ssh_options: {key} cannot be set here")),
                "{err}"
            );
            assert!(err.contains(reason), "{option}: {err}");
            assert!(err.contains("(allowed: addressfamily,"), "{err}");
            let global =
                GOOD.replace("[servers.b]", &format!("[ssh]\noptions = [{option:?}]\n[servers.b]"));
            assert!(error(&global).contains("ssh.options: "), "{option}");
        }
        for option in [
            "ConnectTimeout=5",
            "ServerAliveInterval=10",
            "ServerAliveCountMax=2",
            "TCPKeepAlive=yes",
            "KexAlgorithms=curve25519-sha256,sntrup761x25519-sha512@openssh.com",
            "Ciphers=^aes256-gcm@openssh.com",
            "MACs=hmac-sha2-256-etm@openssh.com",
            "HostKeyAlgorithms=ssh-ed25519",
            "PubkeyAcceptedAlgorithms=+ssh-rsa",
            "Compression=yes",
            "AddressFamily=inet6",
            "ConnectionAttempts=3",
            "LogLevel=ERROR",
        ] {
            let config = parse(&with(option)).unwrap_or_else(|e| panic!("{option}: {e}"));
            assert_eq!(config.builder_server().ssh_options, [option]);
        }
        for bad in [
            "ConnectTimeout=5 -oProxyCommand=x",
            "ConnectTimeout=$(id)",
            "ConnectTimeout",
            "=5",
            "LogLevel=a;b",
        ] {
            assert!(error(&with(bad)).contains("is not of the form Key=Value"), "{bad}");
        }
    }

    #[test]
    fn errors_the_toml_parser_finds_name_their_field_and_line() {
        let err = error(&GOOD.replace("port = 2222", "port = 70000"));
        assert!(err.starts_with("deploy.toml:12:8: servers.b.port: "), "{err}");
        let err = error(&GOOD.replace("port = 2222", "port = 0"));
        assert!(err.starts_with("deploy.toml:12:8: servers.b.port: port 0"), "{err}");
        let err = error(&GOOD.replace("port = 2222", "port = -1"));
        assert!(err.starts_with("deploy.toml:12:8: servers.b.port: "), "{err}");
        let err = error(&GOOD.replace(
            "staging_dir = \"/var/tmp/staging\"",
            "staging_dir = \"/var/tmp/staging\"\nservice_manager = \"launchd\"",
        ));
        assert!(err.starts_with("deploy.toml:9:19: deployment.service_manager: "), "{err}");
        assert!(err.contains("launchd"), "{err}");
        let err = error(&GOOD.replace("servers = [\"n1\", \"n2\"]", "servers = []"));
        assert!(
            err.starts_with("deploy.toml:7:11: deployment.servers: no server to deploy to"),
            "{err}"
        );
        let err = error(&GOOD.replace("port = 2222", "port = 2222\nport = 2223"));
        assert!(err.starts_with("deploy.toml:13:1: servers.b.port: "), "{err}");
        let err = error(&GOOD.replace("port = 2222", "port = \"22\""));
        assert!(err.starts_with("deploy.toml:12:8: servers.b.port: "), "{err}");
    }

    #[test]
    fn control_characters_are_refused_in_every_string_field_and_escaped_in_messages() {
        let cases = [
            (
                "source_path = \"$HOME/src/flotilla\"",
                "source_path = \"$HOME/src/a\\u001b[2Jb\"",
                "source_path",
            ),
            (
                "source_path = \"$HOME/flotilla\"",
                "source_path = \"$HOME/a\\nb\"",
                "builder.source_path",
            ),
            (
                "staging_dir = \"/var/tmp/staging\"",
                "staging_dir = \"/var/tmp/a\\tb\"",
                "deployment.staging_dir",
            ),
            ("[deployment]", "excludes = [\"a\\rb\"]\n[deployment]", "builder.excludes"),
            ("[deployment]", "lock_dir = \"/var/tmp/l\\u0007\"\n[deployment]", "builder.lock_dir"),
            ("role = \"control\"", "role = \"con\\ntrol\"", "servers.n1.vars.role"),
            ("username = \"builder\"", "username = \"bu\\nilder\"", "servers.b.username"),
            ("addr = \"127.0.0.1\"", "addr = \"127.0.0.1\\n\"", "servers.b.addr"),
            (
                "port = 2222",
                "port = 2222\nidentity_file = \"/k\\u001b\"",
                "servers.b.identity_file",
            ),
            ("[servers.b]", "[ssh]\nidentity_file = \"/k\\n\"\n[servers.b]", "ssh.identity_file"),
            ("[servers.b]", "[ssh]\nknown_hosts = \"/k\\n\"\n[servers.b]", "ssh.known_hosts"),
            ("[servers.b]", "[ssh]\nconfig = \"/k\\n\"\n[servers.b]", "ssh.config"),
            (
                "[servers.n2]",
                "[servers.\"n\\u001b[31m\"]\nusername = \"root\"\naddr = \"x\"\n[servers.n2]",
                "servers.n\\u{1b}[31m",
            ),
        ];
        for (from, to, field) in cases {
            let text = GOOD.replace(from, to);
            assert_ne!(text, GOOD, "{from}");
            let err = error(&text);
            assert!(err.contains(&format!(": {field}: ")), "{field}: {err}");
            assert!(!err.contains(|c: char| c.is_control()), "{field}: unescaped {err:?}");
        }
    }

    #[test]
    fn every_ssh_file_has_the_same_rules() {
        for field in ["identity_file", "config"] {
            let text =
                GOOD.replace("[servers.b]", &format!("[ssh]\n{field} = \"/a b\"\n[servers.b]"));
            assert!(
                error(&text).contains(&format!("ssh.{field}: \"/a b\": use only")),
                "{}",
                error(&text)
            );
        }
        let text = GOOD.replace("port = 2222", "port = 2222\nidentity_file = \"/a b\"");
        assert!(
            error(&text).contains("servers.b.identity_file: \"/a b\": use only"),
            "{}",
            error(&text)
        );
        let text = GOOD.replace("port = 2222", "port = 2222\nidentity_file = \"/keys/id_ed25519\"");
        assert_eq!(
            parse(&text).unwrap().builder_server().identity_file.as_ref().unwrap(),
            "/keys/id_ed25519"
        );
    }

    #[test]
    fn field_at_finds_the_table_and_key() {
        let text = "a = 1\n[x.y]\nk = 2\n[servers.\"n1\"]\nport = 3\n";
        assert_eq!(field_at(text, 4), "a");
        assert_eq!(field_at(text, text.find("2").unwrap()), "x.y.k");
        assert_eq!(field_at(text, text.find("3").unwrap()), "servers.n1.port");
        assert_eq!(field_at(text, text.find("[x").unwrap()), "x.y");
    }

    #[test]
    fn the_builders_workspace_may_be_a_directory_of_its_sources() {
        let config = parse(GOOD).unwrap();
        assert_eq!(config.builder.workspace_path().as_str(), "$HOME/flotilla");
        let text = GOOD.replace("[deployment]", "workspace = \"fixtures/adopter/\"\n[deployment]");
        let config = parse(&text).unwrap();
        assert_eq!(config.builder.workspace.as_deref(), Some("fixtures/adopter"));
        assert_eq!(config.builder.workspace_path().as_str(), "$HOME/flotilla/fixtures/adopter");
        for bad in ["/abs", "../up", "a//b", "a b", "a;b"] {
            let text = GOOD.replace("[deployment]", &format!("workspace = {bad:?}\n[deployment]"));
            assert!(error(&text).contains(": builder.workspace: "), "{bad}: {}", error(&text));
        }
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
