//! The ssh and rsync command lines of both hops: client -> builder and builder -> server.
//!
//! Everything goes through the system OpenSSH client, so users' `~/.ssh/config` (ProxyJump,
//! Match, agents) keeps working. Each hop shares one connection per host for the whole run
//! (`ControlMaster=auto` with a socket in a private directory), host keys are always checked
//! strictly, and agent forwarding is asked for only on the client -> builder hop of commands
//! whose builder must reach the servers.

use camino::Utf8Path;

use super::{
    config::{Config, Server},
    quote::{quote_words, RemotePath},
};

/// How long an idle shared connection outlives its last session. Every run closes its masters
/// explicitly; this only bounds how long one lingers after a crash.
const CONTROL_PERSIST: &str = "ControlPersist=60";

/// Options every hop gets that no config may change. ssh takes the first value it sees of an
/// option, so these come before the config's options on every command line.
const FIXED: &[&str] = &["-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes"];

/// Defaults the config's options may tune, placed after them. `ServerAlive*` notices a cut
/// link within about ten seconds instead of waiting for TCP to give up.
const TUNABLE: &[&str] =
    &["-o", "ConnectTimeout=10", "-o", "ServerAliveInterval=3", "-o", "ServerAliveCountMax=3"];

/// Whether a session may use the agent of the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Agent {
    Forward,
    NoForward,
}

/// The client -> builder hop.
#[derive(Debug, Clone)]
pub struct BuilderHop {
    /// Words of `ssh` up to, not including, the destination.
    options: Vec<String>,
    /// The destination and the `--` before it.
    destination: Vec<String>,
    /// `user@host` for rsync, IPv6 in brackets.
    rsync_destination: String,
    /// The `-e` option of rsync: the shared connection, strict host keys.
    rsync_shell: String,
}

/// The builder -> server hop, as words for the builder's shell.
#[derive(Debug, Clone)]
pub struct ServerHop {
    /// `ssh ... -- addr`, to be followed by the remote command.
    pub ssh: Vec<String>,
    /// rsync's `-e` value: ssh through the builder's shared connection to this server.
    pub rsync_shell: String,
    /// `user@host` for rsync, IPv6 in brackets.
    pub rsync_destination: String,
}

impl BuilderHop {
    pub fn new(config: &Config, control_dir: &Utf8Path) -> crate::Result<BuilderHop> {
        let server = config.builder_server();
        let control_path = control_dir.join("builder");
        let shared = [
            "-o".to_owned(),
            "ControlMaster=auto".to_owned(),
            "-o".to_owned(),
            format!("ControlPath={control_path}"),
        ];
        // fling's own options first, so that no option of the config overrides them, then the
        // config's, then the defaults they may tune.
        let mut fixed: Vec<String> = FIXED.iter().map(|s| s.to_string()).collect();
        if let Some(kh) = &config.ssh.known_hosts {
            let kh = kh
                .local()
                .map_err(|message| crate::Error::Path { field: "ssh.known_hosts", message })?;
            fixed.extend(["-o".into(), format!("UserKnownHostsFile={kh}")]);
        }
        fixed.extend(shared.iter().cloned());
        let user_options = user_options(config, server);
        let mut options: Vec<String> = vec!["ssh".into()];
        if let Some(file) = &config.ssh.config {
            options.extend(["-F".into(), file.to_string()]);
        }
        options.extend(fixed.iter().cloned());
        options.extend(["-o".into(), CONTROL_PERSIST.into()]);
        if let Some(identity) = server.identity_file.as_ref().or(config.ssh.identity_file.as_ref())
        {
            options.extend(["-i".into(), identity.to_string()]);
            options.extend(["-o".into(), "IdentitiesOnly=yes".into()]);
        }
        options.extend(user_options.iter().cloned());
        options.extend(TUNABLE.iter().map(|s| s.to_string()));
        options.extend([
            "-p".into(),
            server.port.to_string(),
            "-l".into(),
            server.username.clone(),
        ]);

        // rsync splits `-e` on whitespace; every word here is free of it (validated config
        // paths and options, a control directory `fling` names itself).
        let mut rsync_shell: Vec<String> = vec!["ssh".into()];
        if let Some(file) = &config.ssh.config {
            rsync_shell.extend(["-F".into(), file.to_string()]);
        }
        rsync_shell.extend(fixed);
        rsync_shell.extend(user_options);
        rsync_shell.extend(TUNABLE.iter().map(|s| s.to_string()));
        rsync_shell.extend(["-p".into(), server.port.to_string()]);
        Ok(BuilderHop {
            options,
            destination: vec!["--".into(), server.addr.for_ssh()],
            rsync_destination: format!("{}@{}", server.username, server.addr.for_rsync()),
            rsync_shell: rsync_shell.join(" "),
        })
    }

    /// The local command that runs `remote` (one string for the builder's shell) there.
    pub fn run(&self, agent: Agent, remote: &str) -> Vec<String> {
        let mut argv = self.options.clone();
        argv.push(match agent {
            Agent::Forward => "-A".into(),
            Agent::NoForward => "-a".into(),
        });
        argv.extend(self.destination.iter().cloned());
        argv.push(remote.to_owned());
        argv
    }

    /// The local command that closes the shared connection.
    pub fn close(&self) -> Vec<String> {
        let mut argv = self.options.clone();
        argv.extend(["-q".into(), "-O".into(), "exit".into()]);
        argv.extend(self.destination.iter().cloned());
        argv
    }

    /// rsync's `-e` value and the `user@host:path` of a path on the builder.
    pub fn rsync_target(&self, path: &RemotePath) -> (String, String) {
        (self.rsync_shell.clone(), format!("{}:{}", self.rsync_destination, path.for_rsync()))
    }
}

impl ServerHop {
    /// The hop from the builder to `server`, sharing one connection per server through
    /// sockets under `control_dir` on the builder.
    pub fn new(config: &Config, server: &Server, control_dir: &str) -> ServerHop {
        let known_hosts =
            config.deployment.known_hosts.as_ref().or(config.ssh.known_hosts.as_ref());
        // fling's own options first (see `FIXED`), then the config's, then the tunable
        // defaults.
        let mut common: Vec<String> = FIXED.iter().map(|s| s.to_string()).collect();
        if let Some(kh) = known_hosts {
            // ssh expands `~` itself, so the path needs no help from the builder's shell.
            let path = match kh {
                RemotePath::Absolute(path) => path.clone(),
                RemotePath::Home(rest) => format!("~/{rest}"),
            };
            common.extend(["-o".into(), format!("UserKnownHostsFile={path}")]);
        }
        common.extend([
            "-o".into(),
            "ControlMaster=auto".into(),
            "-o".into(),
            format!("ControlPath={control_dir}/%C"),
        ]);
        common.extend(user_options(config, server));
        common.extend(TUNABLE.iter().map(|s| s.to_string()));
        common.extend(["-p".into(), server.port.to_string()]);

        let mut ssh = vec!["ssh".to_owned()];
        ssh.extend(common.iter().cloned());
        ssh.extend(["-o".into(), CONTROL_PERSIST.into()]);
        // The last hop never forwards the agent: servers have no business with the user's keys.
        ssh.extend(["-a".into(), "-l".into(), server.username.clone()]);
        ssh.extend(["--".into(), server.addr.for_ssh()]);

        let mut rsync_shell = vec!["ssh".to_owned()];
        rsync_shell.extend(common);
        rsync_shell.push("-a".into());
        ServerHop {
            ssh,
            rsync_shell: rsync_shell.join(" "),
            rsync_destination: format!("{}@{}", server.username, server.addr.for_rsync()),
        }
    }

    /// The builder-side command that opens the shared connection to the server and returns
    /// once it is up: no session, so no login shell runs for it on the server.
    pub fn open(&self) -> String {
        let mut words = self.ssh.clone();
        let addr = words.pop().expect("the destination ends the command");
        let dashes = words.pop().expect("`--` precedes the destination");
        words.extend(["-N".into(), "-f".into(), dashes, addr]);
        quote_words(&words)
    }

    /// The builder-side command that closes the shared connection to the server.
    pub fn close(&self) -> String {
        let mut words = self.ssh.clone();
        let addr = words.pop().expect("the destination ends the command");
        let dashes = words.pop().expect("`--` precedes the destination");
        words.extend(["-q".into(), "-O".into(), "exit".into(), dashes, addr]);
        quote_words(&words)
    }

    /// The builder-side command that runs `remote` (one string for the server's shell).
    pub fn run(&self, remote: &str) -> String {
        let mut words = self.ssh.clone();
        words.push(remote.to_owned());
        quote_words(&words)
    }

    /// `run`, with the server's shell variable `k` set first to the value of the builder's
    /// `$k`, which the builder script has checked to be lowercase hex: the one value computed
    /// at run time that a remote command carries.
    pub fn run_with_key(&self, remote: &str) -> String {
        format!("{} \"k=$k; \"{}", quote_words(&self.ssh), super::quote::quote(remote))
    }
}

/// The `-o` options of the config for a server: `[ssh] options` then the server's own.
fn user_options(config: &Config, server: &Server) -> Vec<String> {
    config
        .ssh
        .options
        .iter()
        .chain(&server.ssh_options)
        .flat_map(|o| ["-o".to_owned(), o.clone()])
        .collect()
}

#[cfg(test)]
mod tests {
    use camino::Utf8Path;

    use super::*;

    /// The position of the first `-o` option whose key is `key`.
    fn position(words: &[String], key: &str) -> usize {
        words
            .windows(2)
            .position(|w| w[0] == "-o" && w[1].starts_with(&format!("{key}=")))
            .unwrap_or_else(|| panic!("no {key} in {words:?}"))
    }

    #[test]
    fn flings_own_options_come_before_the_configs_and_the_tunable_defaults_after() {
        let text = r#"
[builder]
server = "b"
source_path = "$HOME/flotilla"
[deployment]
servers = ["n1"]
staging_dir = "/var/tmp/staging"
[ssh]
known_hosts = "/etc/fling/known_hosts"
options = ["ConnectTimeout=30"]
[servers.b]
username = "root"
addr = "127.0.0.1"
ssh_options = ["ServerAliveInterval=9"]
[servers.n1]
username = "root"
addr = "127.0.0.2"
ssh_options = ["LogLevel=ERROR"]
"#;
        let config = Config::parse(Utf8Path::new("t.toml"), text).unwrap();
        let builder = BuilderHop::new(&config, Utf8Path::new("/tmp/c")).unwrap();
        let argv = builder.run(Agent::NoForward, "true");
        let (shell, _) = builder.rsync_target(&config.builder.source_path);
        let rsync: Vec<String> = shell.split(' ').map(String::from).collect();
        let n1 = ServerHop::new(
            &config,
            &config.servers[&crate::config::ServerName::new("n1").unwrap()],
            "/c",
        );
        let n1_rsync: Vec<String> = n1.rsync_shell.split(' ').map(String::from).collect();
        for (words, user) in [
            (&argv, "ServerAliveInterval"),
            (&rsync, "ServerAliveInterval"),
            (&n1.ssh, "LogLevel"),
            (&n1_rsync, "LogLevel"),
        ] {
            let user_at = position(words, user);
            for own in ["BatchMode", "StrictHostKeyChecking", "UserKnownHostsFile", "ControlPath"] {
                assert!(position(words, own) < user_at, "{own} after {user}: {words:?}");
            }
            assert!(position(words, "ConnectTimeout") < user_at, "the config's first: {words:?}");
            let defaults = words.iter().rposition(|w| w == "ConnectTimeout=10").unwrap();
            assert!(defaults > user_at, "the defaults after the config's options: {words:?}");
        }
    }
}
