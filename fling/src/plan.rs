//! Every command of `fling` as data: the steps each host goes through, each a local command
//! line, computed before anything runs. `--dry-run` prints the plan; execution walks it.

use std::fmt::Write as _;

use camino::Utf8PathBuf;

use super::{
    config::{Config, Server},
    flags::{Artifacts, Build},
    quote::{quote, quote_words, RemotePath},
    ssh::{Agent, BuilderHop, ServerHop},
};

pub use super::protocol::LOCK_HELD_STATUS;

/// The name of the installer binary on the builder and in each server's staging directory.
pub const INSTALLER: &str = "flotilla-installer";

/// One command of the plan.
#[derive(Debug, Clone)]
pub struct Step {
    /// A short name shown in progress, the recap and JSON events: `connect`, `push`, ...
    pub name: &'static str,
    /// Where the work of the step happens, for people reading a dry run: `client`,
    /// `builder`, `builder -> node1`, ...
    pub runs_on: String,
    /// The local command line: the program and its arguments.
    pub argv: Vec<String>,
    pub kind: StepKind,
    /// Text fed to the command's standard input.
    pub stdin: Option<String>,
    /// The phases of a step that does several things in one session, in order; empty for a
    /// step that is one thing, `name`. The script announces each with `protocol::PHASE_MARKER`.
    pub phases: Vec<&'static str>,
    /// The builder-side script of a step that runs on the builder.
    pub script: Option<String>,
    /// What the step does, for people, one line per phase (or one for a step without
    /// phases): what `--dry-run` prints.
    pub what: Vec<String>,
}

impl Step {
    fn what(mut self, what: impl IntoIterator<Item = String>) -> Step {
        self.what = what.into_iter().collect();
        self
    }
}

/// What a step's exit status means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepKind {
    /// The first contact with a host: ssh's status 255 means the host is unreachable.
    Connect,
    /// Moves files with rsync: the bytes it reports are counted as sent.
    Transfer,
    /// Anything else.
    Work,
}

/// The steps of one host.
#[derive(Debug, Clone)]
pub struct HostPlan {
    pub host: String,
    pub steps: Vec<Step>,
}

/// A whole run.
#[derive(Debug, Clone)]
pub struct Plan {
    /// What the run does, for the lock and the summary: `deploy install`, `sync`, ...
    pub command: String,
    /// The builder's name, the host of `setup` and `teardown`.
    pub builder: String,
    /// Run first, in order, against the builder; a failure skips every host.
    pub setup: Vec<Step>,
    /// Run concurrently, each host's steps in order until one fails.
    pub hosts: Vec<HostPlan>,
    /// Run last, whatever happened, when the builder was reached: releases and closes.
    pub teardown: Vec<Step>,
    /// The one builder session that runs a plan reaching servers: setup, every host and the
    /// release. `None` for plans whose steps are sessions of their own.
    pub session: Option<Session>,
    /// Where a plan that reaches servers records each host's outcome: the journal on the
    /// builder (`journal`), written after the hosts and before the connection closes.
    pub journal: Option<JournalSink>,
}

/// The journal of a plan's run: the client command that appends to it, and what the run's
/// lines share.
#[derive(Debug, Clone)]
pub struct JournalSink {
    pub argv: Vec<String>,
    pub info: super::journal::RunInfo,
}

/// A builder session that runs a whole plan, with the script of `batch::script` on its
/// standard input.
#[derive(Debug, Clone)]
pub struct Session {
    /// The client command: `ssh ... builder 'exec sh -s'`.
    pub argv: Vec<String>,
    /// The builder-side private directory of this run: the server connections' sockets, the
    /// session's token pipes and exit statuses.
    pub dir: String,
}

/// What every plan is computed from.
pub struct Context<'a> {
    pub config: &'a Config,
    pub builder: BuilderHop,
    /// A unique id of this run, recorded in the lock.
    pub run_id: String,
    /// The builder-side directory of this run's shared connections to the servers.
    pub builder_control_dir: String,
    /// The client's workspace, the source of `sync`.
    pub local_source: Utf8PathBuf,
    /// Who runs this: `user@host` of the client.
    pub who: String,
    /// How long to wait for the deploy lock, in seconds.
    pub lock_wait: u64,
}

/// Whether a command takes the deploy lock on the builder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Locking {
    /// Take it (or wait for it), release it at the end.
    Lock,
    NoLock,
    /// Take it, or find it held by this very run, and keep it: one plan of a rollout, whose
    /// last plan ([`release`]) releases it.
    Keep,
}

/// What a deploy does on each server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeployAction {
    /// Push the packages of this outputs directory of the builder's workspace, the installer
    /// and the server's overlay, then install.
    Install(Artifacts),
    Uninstall,
    Status,
    Rollback,
    /// Remove the staged packages and overlay, and every release but the active one.
    Clean,
}

impl DeployAction {
    pub fn name(&self) -> &'static str {
        match self {
            DeployAction::Install(_) => "install",
            DeployAction::Uninstall => "uninstall",
            DeployAction::Status => "status",
            DeployAction::Rollback => "rollback",
            DeployAction::Clean => "clean",
        }
    }
}

impl Context<'_> {
    /// The client's cargo workspace: `builder.workspace` of its sources, or all of them.
    pub fn local_workspace(&self) -> Utf8PathBuf {
        match &self.config.builder.workspace {
            Some(dir) => self.local_source.join(dir),
            None => self.local_source.clone(),
        }
    }

    fn builder_name(&self) -> String {
        self.config.builder.server.to_string()
    }

    /// The builder's cargo workspace: its copy of the sources, or the directory of it that
    /// `builder.workspace` names.
    fn workspace(&self) -> String {
        self.config.builder.workspace_path().shell_word()
    }

    /// A step that runs `remote` in the builder's shell.
    fn on_builder(&self, name: &'static str, kind: StepKind, agent: Agent, remote: &str) -> Step {
        Step {
            name,
            runs_on: "builder".into(),
            argv: self.builder.run(agent, remote),
            kind,
            stdin: None,
            phases: Vec::new(),
            script: Some(remote.to_owned()),
            what: Vec::new(),
        }
    }

    fn server_hop(&self, server: &Server) -> ServerHop {
        ServerHop::new(self.config, server, &self.builder_control_dir)
    }

    fn staging(&self) -> &RemotePath {
        &self.config.deployment.staging_dir
    }

    /// With `debug = true`, the command that writes `+ <command>` to standard output before
    /// `command` runs, followed by `; `; nothing otherwise.
    fn echo(&self, command: &str) -> String {
        if self.config.debug {
            format!("{}; ", echo(command))
        } else {
            String::new()
        }
    }

    /// `echo`, to standard error: for a step whose standard output is its result.
    fn echo_to_stderr(&self, command: &str) -> String {
        if self.config.debug {
            format!("{} >&2; ", echo(command))
        } else {
            String::new()
        }
    }

    /// With `debug = true`, rsync's flag that lists every file it sends or deletes.
    fn itemize(&self) -> Option<&'static str> {
        self.config.debug.then_some("--itemize-changes")
    }

    /// The plan skeleton every command shares: reach the builder (creating the directory of
    /// the server connections when servers are involved), take the lock if asked, and undo
    /// both at the end.
    fn plan(&self, command: String, locking: Locking, servers: bool, agent: Agent) -> Plan {
        self.plan_with(command, locking, servers, agent, None, None)
    }

    /// `plan`, with `prepare` run on the builder right after connecting. Reaching the
    /// builder, preparing and taking the lock are one session: one round trip, not three.
    /// A plan that reaches servers runs whole in one builder session (`Plan::session`), whose
    /// prologue creates the private directory of the server connections and whose epilogue
    /// closes them.
    fn plan_with(
        &self,
        command: String,
        locking: Locking,
        servers: bool,
        agent: Agent,
        prepare: Option<String>,
        prepare_what: Option<String>,
    ) -> Plan {
        let mut connect = vec!["set -e".to_owned()];
        connect.extend(prepare);
        let takes = matches!(locking, Locking::Lock | Locking::Keep);
        if takes {
            connect.push(self.lock_script(&command));
        }
        let connect = if connect.len() == 1 { "true".to_owned() } else { connect.join("; ") };
        let mut reach = "reach the builder".to_owned();
        if let Some(prepare) = &prepare_what {
            reach.push_str("; ");
            reach.push_str(prepare);
        }
        if takes {
            reach.push_str(&format!("; take the deploy lock {}", self.config.builder.lock_dir));
        }
        if locking == Locking::Keep {
            reach.push_str(" (or find it this run's) and keep it for the rollout's next step");
        }
        if self.config.debug {
            reach.push_str(
                " (debug: every command echoed as `+ ...` before it runs, every file rsync \
                 changes listed)",
            );
        }
        let setup =
            vec![self.on_builder("connect", StepKind::Connect, agent, &connect).what([reach])];
        let mut teardown = Vec::new();
        if locking == Locking::Lock {
            teardown.push(self.release_step());
        }
        teardown.push(Step {
            name: "disconnect",
            runs_on: "client".into(),
            argv: self.builder.close(),
            kind: StepKind::Work,
            stdin: None,
            phases: Vec::new(),
            script: None,
            what: vec!["close the shared ssh connection to the builder".into()],
        });
        let session = servers.then(|| Session {
            argv: self.builder.run(agent, "exec sh -s"),
            dir: self.builder_control_dir.clone(),
        });
        let (setup, teardown) = if servers {
            let builder_steps = |steps: Vec<Step>| {
                steps.into_iter().map(|s| if s.script.is_some() { in_session(s) } else { s })
            };
            (builder_steps(setup).collect(), builder_steps(teardown).collect())
        } else {
            (setup, teardown)
        };
        let journal = servers.then(|| JournalSink {
            argv: journal_append(self),
            info: super::journal::RunInfo {
                run: self.run_id.clone(),
                who: self.who.clone(),
                at: std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs()),
            },
        });
        Plan {
            command,
            builder: self.builder_name(),
            setup,
            hosts: Vec::new(),
            teardown,
            session,
            journal,
        }
    }

    /// The builder step that releases the deploy lock if this run holds it.
    fn release_step(&self) -> Step {
        let lock = self.config.builder.lock_dir.shell_word();
        let release = format!(
            "if grep -qx {} {lock}/info 2>/dev/null; then rm -rf -- {lock}; fi",
            quote(&format!("run={}", self.run_id))
        );
        let what = format!(
            "release the deploy lock {} if this run holds it",
            self.config.builder.lock_dir
        );
        self.on_builder("release", StepKind::Work, Agent::NoForward, &release).what([what])
    }

    /// Takes the deploy lock: a directory created atomically by `mkdir`, holding who, when
    /// and what. A held lock is waited for up to `lock_wait` seconds, then refused with the
    /// holder's record; a lock this run holds already (a rollout's earlier plan) is taken
    /// again at once.
    fn lock_script(&self, command: &str) -> String {
        let lock = self.config.builder.lock_dir.shell_word();
        let record =
            format!("run={}\nwho={}\nwhat=cargo xtask fling {command}\n", self.run_id, self.who);
        // The default lock lives in the builder's copy of the workspace: creating it creates
        // that directory, which then gets its marker as if `sync` had created it.
        let source = &self.config.builder.source_path;
        let claim = if self.config.builder.lock_dir == source.join(super::config::DEFAULT_LOCK_DIR)
        {
            format!("{}; ", claim_if_new(source, SOURCE_MARKER))
        } else {
            String::new()
        };
        format!(
            "{claim}l={lock}; mkdir -p -- \"$(dirname -- \"$l\")\" || exit 1; n=0; \
             while ! mkdir -- \"$l\" 2>/dev/null; do \
             if grep -qx {run} \"$l/info\" 2>/dev/null; then break; fi; \
             if [ \"$n\" -ge {wait} ]; then echo \"the deploy lock $l is held: \
             $(tr '\\n' ' ' < \"$l/info\" 2>/dev/null)\" >&2; exit {held}; fi; \
             n=$((n+1)); sleep 1; done; \
             {{ printf %s {record}; printf 'when=%s\\n' \"$(date -u +%Y-%m-%dT%H:%M:%SZ)\"; }} \
             > \"$l/info\"",
            wait = self.lock_wait,
            held = LOCK_HELD_STATUS,
            record = quote(&record),
            run = quote(&format!("run={}", self.run_id)),
        )
    }

    /// The one step of a server: a builder script that opens the shared connection to the
    /// server (the `connect` phase, whose ssh status 255 means unreachable), then runs each
    /// phase's builder-side command, stopping at the first that fails. It runs inside the
    /// plan's builder session (`batch::script`), which bounds connection starts with tokens
    /// read from `protocol::CONNECT_FD`; the background ssh master gets none of the session's
    /// descriptors beyond its standard ones, which it points at /dev/null.
    fn server_step(&self, server: &Server, phases: Vec<(&'static str, String, String)>) -> Step {
        let mut body = Vec::new();
        let mut names = Vec::new();
        let mut what = Vec::new();
        for (name, command, description) in phases {
            body.push(format!("{}; {}{command}", phase(name), self.echo(&command)));
            names.push(name);
            what.push(description);
        }
        self.server_step_with(server, names, &body.join(" || exit $?; "), what)
    }

    /// `server_step` with the script that follows the connection as one piece, `body`, which
    /// announces `phases` itself.
    fn server_step_with(
        &self,
        server: &Server,
        phases: Vec<&'static str>,
        body: &str,
        what: Vec<String>,
    ) -> Step {
        let hop = self.server_hop(server);
        let fd = super::protocol::CONNECT_FD;
        // Each server's shared connection closes with its step, in parallel with the others,
        // rather than one after the other at the end of the run.
        let script = format!(
            "trap {} EXIT; read -r _ <&{fd}; {} {fd}>&-; rc=$?; echo >&{fd}; \
             [ \"$rc\" -eq 0 ] || exit \"$rc\"; {body}",
            quote(&format!("{} 2>/dev/null", hop.close())),
            hop.open()
        );
        let mut names = vec!["connect"];
        names.extend(phases);
        let mut descriptions = vec![format!(
            "open the shared ssh connection to {}@{} port {} (host key checked strictly)",
            server.username, server.addr, server.port
        )];
        descriptions.extend(what);
        in_session(Step {
            name: "connect",
            runs_on: format!("builder -> {}", server.name),
            argv: Vec::new(),
            kind: StepKind::Connect,
            stdin: None,
            phases: names,
            script: Some(script),
            what: descriptions,
        })
    }

    /// The installer in the staging directory with `words`, each already one shell word,
    /// after the install prefix (the packages are built for the same one).
    fn installer(&self, words: &[String]) -> String {
        let bin = self.staging().join("bin").join(INSTALLER).shell_word();
        let prefix = quote(self.config.deployment.prefix.as_str());
        format!("{bin} --prefix {prefix} --packages-prefix {prefix} {}", words.join(" "))
    }
}

/// The command that writes `+ <command>` to standard output: `debug = true`'s echo.
fn echo(command: &str) -> String {
    format!("printf '+ %s\\n' {}", quote(command))
}

/// The command that announces a phase of a server step (see `protocol::PHASE_MARKER`).
fn phase(name: &str) -> String {
    format!("echo {} >&2", quote(&format!("{}{name}", super::protocol::PHASE_MARKER)))
}

/// The marker of a staging directory fling created (see `flotilla_contracts::layout`).
const STAGING_MARKER: &str = flotilla_contracts::layout::staging::MARKER;
/// The marker of the builder's copy of the workspace.
const SOURCE_MARKER: &str = flotilla_contracts::layout::SOURCE_MARKER;

/// The shell command that makes `dir` a directory of fling's: creates it with `marker` in it,
/// or accepts it when it already holds `marker`. A directory that exists without the marker
/// may hold someone else's files, which a `--delete` transfer would remove: it is refused,
/// saying why and how to proceed.
fn claim(dir: &RemotePath, marker: &str, field: &str) -> String {
    let d = dir.shell_word();
    let m = dir.join(marker).shell_word();
    format!(
        "if [ -e {d} ] && [ ! -e {m} ]; then {refuse}; fi && mkdir -p -- {d} && \
         {{ [ -e {m} ] || : > {m}; }}",
        refuse =
            refusal(dir, marker, field, "fills it with --delete, removing what it does not send"),
    )
}

/// The shell command that creates `dir` with `marker` in it unless it exists; an existing one
/// is left as it is, for the command that would fill it to judge.
fn claim_if_new(dir: &RemotePath, marker: &str) -> String {
    let d = dir.shell_word();
    format!("{{ [ -e {d} ] || {{ mkdir -p -- {d} && : > {}; }}; }}", dir.join(marker).shell_word())
}

/// The shell command that fails, with the reason, when `dir` exists without `marker`.
fn check_owned(dir: &RemotePath, marker: &str, field: &str, what: &str) -> String {
    format!(
        "if [ -e {d} ] && [ ! -e {m} ]; then {refuse}; fi",
        d = dir.shell_word(),
        m = dir.join(marker).shell_word(),
        refuse = refusal(dir, marker, field, what),
    )
}

fn refusal(dir: &RemotePath, marker: &str, field: &str, what: &str) -> String {
    let message = format!(
        "refusing {dir} ({field}): it exists but flotilla did not create it (it holds no \
         {marker}), and fling {what}. Name a directory of its own in {field}, or, if this one \
         is flotilla's, create the marker: touch {dir}/{marker}"
    );
    format!("{{ echo {} >&2; exit 1; }}", quote(&message))
}

/// The file in a server's staging directory that holds the key of what was last pushed there
/// and installed from it; the installer writes it.
const STAGED_KEY: &str = flotilla_contracts::layout::staging::KEY;

/// The directory in a server's staging directory of what `install-prereqs` carried there.
const TOOLS: &str = ".tools";

/// A builder step as it runs inside a plan's builder session: the builder's `sh -c` of its
/// script, which is what `--dry-run` shows.
fn in_session(mut step: Step) -> Step {
    let script = step.script.clone().expect("a builder step has a script");
    step.argv = vec!["sh".into(), "-c".into(), script];
    step
}

/// `sync`: the client's workspace to the builder, honouring `.gitignore`.
pub fn sync(cx: &Context<'_>) -> Plan {
    let claim = claim(&cx.config.builder.source_path, SOURCE_MARKER, "builder.source_path");
    let claim_what = format!(
        "create {} with its marker {SOURCE_MARKER}, or check it holds it",
        cx.config.builder.source_path
    );
    let mut plan = cx.plan_with(
        "sync".into(),
        Locking::Lock,
        false,
        Agent::NoForward,
        Some(claim),
        Some(claim_what),
    );
    let (rsh, target) = cx.builder.rsync_target(&cx.config.builder.source_path);
    // `--protect-args`: the remote path travels inside rsync's protocol, never through the
    // builder's shell, whatever the rsync versions.
    let mut argv: Vec<String> =
        ["rsync", "-az", "--protect-args", "--delete", "--info=stats1", "-e", &rsh]
            .map(String::from)
            .to_vec();
    // `target/`, `out/` and `.git/` never travel: the builder builds its own, and `.git/`
    // is large and unused there. `--delete` leaves excluded files on the builder alone.
    argv.extend(cx.itemize().map(String::from));
    argv.extend(
        ["--filter=:- .gitignore", "--exclude=/target/", "--exclude=/out/", "--exclude=/.git/"]
            .map(String::from),
    );
    argv.extend(cx.config.builder.excludes.iter().map(|e| format!("--exclude={e}")));
    // The default deploy lock lives in the builder's workspace: excluded, so it is neither
    // sent nor deleted by `--delete`.
    argv.push(format!("--exclude=/{}/", super::config::DEFAULT_LOCK_DIR));
    // So does the journal of runs.
    argv.push(format!("--exclude=/{}", super::journal::JOURNAL_FILE));
    // The marker that makes the directory fling's is not in the client's workspace.
    argv.push(format!("--exclude=/{SOURCE_MARKER}"));
    argv.extend(["--".into(), format!("{}/", cx.local_source), format!("{target}/")]);
    plan.hosts.push(HostPlan {
        host: cx.builder_name(),
        steps: vec![Step {
            name: "sync",
            runs_on: "client".into(),
            argv,
            kind: StepKind::Transfer,
            stdin: None,
            phases: Vec::new(),
            script: None,
            what: vec![format!(
                "rsync {}/ to the builder's {}/ (--delete, --protect-args), leaving out \
                 .gitignore's files, target/, out/, .git/{}",
                cx.local_source,
                cx.config.builder.source_path,
                cx.config.builder.excludes.iter().map(|e| format!(", {e}")).collect::<String>()
            )],
        }],
    });
    plan
}

/// `build check|package|dot`: `cargo xtask check|package|dot` on the builder with the flags
/// the client validated (`flags::Build`). `package` also builds the installer that `deploy`
/// ships to every server; `dot` writes the package graph to its standard output.
pub fn build(cx: &Context<'_>, build: &Build) -> Plan {
    let command = build.command();
    // `dot` only reads the manifest: it need not wait for, nor hold off, a deploy.
    let locking = if let Build::Dot(_) = build { Locking::NoLock } else { Locking::Lock };
    let mut plan = cx.plan(format!("build {command}"), locking, false, Agent::NoForward);
    let words = build.words();
    let mut xtask = format!("cargo xtask {command}");
    if !words.is_empty() {
        xtask.push(' ');
        xtask.push_str(&quote_words(&words));
    }
    // `dot`'s standard output is the graph: its echo goes to standard error.
    let echo = if let Build::Dot(_) = build { cx.echo_to_stderr(&xtask) } else { cx.echo(&xtask) };
    let mut script = format!(
        "{} && cd -- {} && PATH=\"$HOME/.cargo/bin:$PATH\" && {echo}{xtask}",
        synced(cx),
        cx.workspace(),
    );
    let mut what = format!("in {}: {xtask}", cx.config.builder.workspace_path());
    let mut store_stdin = false;
    if let Build::Package(_, flags) = build {
        let artifacts = build.manifest().artifacts.clone().unwrap_or_default();
        if artifacts != Artifacts::default() {
            what.push_str(&format!(
                " (packages into {artifacts}/, which deploy install pushes when given \
                 --artifacts {artifacts} too)"
            ));
        }
        // The installer ships to every server; the overlay generators run on the builder in
        // `fling overlay` (`cargo run`, the dev profile), so building them here keeps that
        // step from compiling. A plan-only run builds nothing.
        if !flags.plan_only {
            let tools = format!(
                "cargo build --release --package {INSTALLER} --bin {INSTALLER} && cargo build \
                 --package flotilla-overlay --bin flotilla-overlay"
            );
            let _ = write!(script, " && {}{tools}", cx.echo(&tools));
            what.push_str(&format!(", then build {INSTALLER} (release) and flotilla-overlay"));
            if let Some(store) = &cx.config.artifacts {
                let upload = format!(
                    "{{ cargo xtask fling --config - store-sync --artifacts {} >/dev/null || {{ \
                     rc=$?; [ \"$rc\" -eq {STORE_UNREACHABLE} ] || exit \"$rc\"; echo 'warning: \
                     the store cannot be reached now: deploy install will push over ssh' >&2; \
                     }}; }}",
                    quote(artifacts.as_str())
                );
                let _ = write!(script, " && {}{upload}", cx.echo(&upload));
                what.push_str(&format!(
                    ", then upload to the store {}/{} what it lacks of them and of the \
                     installer, keyed by digest",
                    store.endpoint, store.bucket
                ));
                store_stdin = true;
            }
        }
    }
    if let Build::Dot(_) = build {
        what.push_str(" (the graph in graphviz's format, on standard output)");
    }
    let mut step = cx.on_builder(command, StepKind::Work, Agent::NoForward, &script).what([what]);
    if store_stdin {
        // The store step reads the config from standard input, as `overlay` does.
        step.stdin = Some(cx.config.text.clone());
    }
    plan.hosts.push(HostPlan { host: cx.builder_name(), steps: vec![step] });
    plan
}

/// The exit status of the builder's `store-sync` when the store cannot be reached: a deploy
/// then pushes over ssh (unless `--require-store`).
pub const STORE_UNREACHABLE: i32 = 75;

/// `deploy install` through the store, first: the builder uploads what the store lacks and
/// signs this run's URLs, printed as one `flotilla-store {json}` line.
pub fn store_sync(cx: &Context<'_>, artifacts: &Artifacts) -> Plan {
    let mut plan = cx.plan("store sync".into(), Locking::NoLock, false, Agent::NoForward);
    let sync = format!(
        "cargo xtask fling --config - store-sync --artifacts {} --sign",
        quote(artifacts.as_str())
    );
    let script = format!(
        "{} && cd -- {} && PATH=\"$HOME/.cargo/bin:$PATH\" && {}{sync}",
        synced(cx),
        cx.workspace(),
        cx.echo_to_stderr(&sync),
    );
    let store = cx.config.artifacts.as_ref();
    let what = format!(
        "upload to the store {} what it lacks of {artifacts}/ and the installer (keyed by \
         blake3 digest), and sign this run's GET URLs for the servers (valid {} s); \
         credentials stay on the builder",
        store.map_or(String::new(), |s| format!("{}/{}", s.endpoint, s.bucket)),
        store.map_or(0, |s| s.url_ttl_secs)
    );
    let mut step = cx.on_builder("store", StepKind::Work, Agent::NoForward, &script).what([what]);
    step.stdin = Some(cx.config.text.clone());
    plan.hosts.push(HostPlan { host: cx.builder_name(), steps: vec![step] });
    plan
}

/// The builder-side check that `sync` has put the workspace at `builder.source_path`: its
/// marker and its `Cargo.toml`. Without it, cargo would look for a workspace further up, and
/// may run another one's xtask.
fn synced(cx: &Context<'_>) -> String {
    let source = &cx.config.builder.source_path;
    let message = format!(
        "the builder has no copy of the workspace at {source} (builder.source_path): run \
         `cargo xtask fling sync` first"
    );
    format!(
        "{{ [ -e {} ] && [ -f {} ] || {{ echo {} >&2; exit 1; }}; }}",
        source.join(SOURCE_MARKER).shell_word(),
        cx.config.builder.workspace_path().join("Cargo.toml").shell_word(),
        quote(&message)
    )
}

/// `overlay`: the builder generates every server's own files under `out/overlay/<server>/`
/// from the config, which travels on standard input.
pub fn overlay(cx: &Context<'_>, rotate: bool) -> Plan {
    let mut plan = cx.plan("overlay".into(), Locking::Lock, false, Agent::NoForward);
    let generate = format!(
        "cargo xtask fling --config - overlay --generate-here{}",
        if rotate { " --rotate" } else { "" }
    );
    let script = format!(
        "{} && cd -- {} && PATH=\"$HOME/.cargo/bin:$PATH\" && {}{generate}",
        synced(cx),
        cx.workspace(),
        cx.echo(&generate),
    );
    let mut what = format!(
        "in {}: generate each server's files into out/overlay/<server>/ from the config on \
         standard input ({}identities kept in out/overlay-state/)",
        cx.config.builder.workspace_path(),
        if rotate { "new " } else { "" }
    );
    if let (Some(path), Some(rss)) = (&cx.config.rss_config_path, &cx.config.deployment.rss_server)
    {
        what.push_str(&format!(
            "; {path} of the workspace to {rss} alone, as {} of {}",
            super::config::RSS_CONFIG_FILE,
            cx.config
                .overlay
                .identity_services
                .iter()
                .map(|s| format!("{}/pkg/", cx.config.deployment.prefix.as_path().join(s)))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    let mut step = cx.on_builder("overlay", StepKind::Work, Agent::NoForward, &script).what([what]);
    step.stdin = Some(cx.config.text.clone());
    plan.hosts.push(HostPlan { host: cx.builder_name(), steps: vec![step] });
    plan
}

/// `install-prereqs`: checks and prepares what the builder and the servers need. Every step
/// is idempotent. The services' users are not made here: the installer creates those its
/// packages declare (`install --create-users`), so they follow the packages, not this command.
pub fn install_prereqs(cx: &Context<'_>, servers: &[&Server]) -> Plan {
    let mut plan = cx.plan("install-prereqs".into(), Locking::Lock, true, Agent::Forward);
    let builder_script = format!(
        "PATH=\"$HOME/.cargo/bin:$PATH\"; missing=; for t in cargo rsync ssh; do command -v \
         \"$t\" >/dev/null || missing=\"$missing $t\"; done; if [ -n \"$missing\" ]; then echo \
         \"the builder lacks:$missing (install them, e.g. apt-get install rsync openssh-client, \
         and rustup for cargo)\" >&2; exit 1; fi; {rsync_check}; echo \"rsync $v on the builder\"; \
         {claim}",
        rsync_check = rsync_version_check("rsync", "the builder"),
        claim = claim_if_new(&cx.config.builder.source_path, SOURCE_MARKER),
    );
    plan.hosts.push(HostPlan {
        host: cx.builder_name(),
        steps: vec![in_session(
            cx.on_builder("prereqs", StepKind::Work, Agent::NoForward, &builder_script).what([
                format!(
                    "check cargo, rsync (3.0.0 or later) and ssh; create {} with its marker \
                     unless it exists",
                    cx.config.builder.source_path
                ),
            ]),
        )],
    });
    let smf = cx.config.deployment.service_manager == super::config::ServiceManager::Smf;
    let manager = if smf { "svcadm" } else { "systemctl" };
    // Servers may have no route to the internet, so nothing is fetched there: the installer
    // travels with every deploy, and rsync, when a server lacks it, with this command.
    for server in servers {
        plan.hosts.push(HostPlan {
            host: server.name.to_string(),
            steps: vec![cx.server_step_with(
                server,
                vec!["prereqs"],
                &server_prereqs(cx, server, manager),
                vec![format!(
                    "check {manager} and rsync (3.0.0 or later; carry the builder's into {} \
                     when there is none)",
                    cx.staging().join(TOOLS),
                )],
            )],
        });
    }
    plan
}

/// The builder script of `install-prereqs` for one server, after the connection: the service
/// manager must be there; rsync, when missing, is carried from the builder.
///
/// A server without rsync (and perhaps without a route to any package mirror) gets the
/// builder's own rsync as a self-contained bundle in `<staging>/.tools/`: the binary, every
/// library `ldd` lists, and the builder's dynamic loader, started through a wrapper script
/// that runs the binary with that loader and those libraries only. It needs the same kernel
/// and machine on both ends (Linux, same `uname -m`), which is checked first. The push uses
/// the server's own rsync when it has one, the bundle otherwise; `uninstall` removes it with
/// the staging directory.
fn server_prereqs(cx: &Context<'_>, server: &Server, manager: &str) -> String {
    let hop = cx.server_hop(server);
    let tools = cx.staging().join(TOOLS);
    let carried = tools.join("rsync");
    let probe = hop.run(&format!(
        "command -v {manager} >/dev/null 2>&1 || {{ echo 'this server lacks {manager}' >&2; \
         exit 1; }}; if command -v rsync >/dev/null 2>&1; then R=rsync; elif [ -x {t} ]; then \
         R={t}; else uname -sm; exit 0; fi; {check}; echo \"ok $v\"",
        t = carried.shell_word(),
        check = rsync_version_check("\"$R\"", "this server"),
    ));
    let unpack = hop.run(&format!(
        "umask 077 && {claim} && mkdir -p -- {dir} && tar -xf - -C {dir}",
        claim = claim(cx.staging(), STAGING_MARKER, "deployment.staging_dir"),
        dir = tools.shell_word()
    ));
    let version = hop.run(&format!("{} --version", carried.shell_word()));
    // The wrapper finds the loader and libraries next to itself; `$0` is its own path.
    let wrapper = "#!/bin/sh\nd=$(dirname \"$0\")\nexec \"$d/lib/%s\" --library-path \"$d/lib\" \
                   \"$d/rsync.bin\" \"$@\"\n";
    format!(
        "{phase}; r=$({probe}) || exit $?; case \"$r\" in 'ok '*) echo \
         \"rsync ${{r#ok }} on this server\"; exit 0 ;; esac; \
         here=$(uname -sm); \
         echo \"this server has no rsync: carrying the builder's ($here)\" >&2; \
         if [ \"$r\" != \"$here\" ]; then echo \"the builder ($here) cannot carry rsync to this \
         server ($r): install rsync there\" >&2; exit 1; fi; \
         case \"$here\" in Linux\\ *) ;; *) echo 'carrying rsync needs Linux on both ends: \
         install rsync on this server' >&2; exit 1 ;; esac; \
         ( b=$(command -v rsync) || {{ echo 'the builder has no rsync to carry' >&2; exit 1; }}; \
         t=$(mktemp -d) || exit 1; trap 'rm -rf -- \"$t\"' EXIT; set -e; mkdir -- \"$t/lib\"; \
         cp -L -- \"$b\" \"$t/rsync.bin\"; loader=; \
         for l in $(ldd \"$b\" | awk '{{ for (i = 1; i <= NF; i++) if ($i ~ /^\\//) print $i }}'); \
         do cp -L -- \"$l\" \"$t/lib/\"; case \"$l\" in */ld-linux*) loader=${{l##*/}} ;; esac; done; \
         [ -n \"$loader\" ] || {{ echo \"no dynamic loader among the libraries of $b\" >&2; exit 1; }}; \
         printf '{wrapper}' \"$loader\" > \"$t/rsync\"; chmod 755 \"$t/rsync\" \"$t/rsync.bin\"; \
         tar -C \"$t\" -cf - . | {unpack} ) || exit $?; \
         v=$({version}) || {{ echo 'the carried rsync does not run on this server' >&2; exit 1; }}; \
         echo \"$v\" | head -n 1",
        phase = phase("prereqs"),
    )
}

/// The shell command that sets `v` to the version of the rsync `bin` (a shell word) and
/// fails, naming `place`, when it is older than 3.0.0, the first to honour `--protect-args`.
fn rsync_version_check(bin: &str, place: &str) -> String {
    format!(
        "v=$({bin} --version 2>/dev/null | sed -n '1s/^rsync *version \\([0-9][0-9.]*\\).*/\\1/p'); \
         case \"$v\" in [3-9].* | [1-9][0-9]*) ;; *) echo \"rsync ${{v:-of an unknown version}} \
         on {place} is older than 3.0.0 and cannot keep paths from the remote shell \
         (--protect-args): install a newer rsync\" >&2; exit 1 ;; esac"
    )
}

/// `deploy install|uninstall|status|rollback|clean`.
pub fn deploy(cx: &Context<'_>, action: DeployAction, servers: &[&Server]) -> Plan {
    let locking = if action == DeployAction::Status { Locking::NoLock } else { Locking::Lock };
    deploy_with(
        cx,
        action,
        servers,
        &DeployOptions { locking, confirm_timeout: &|_| None, expect: &|_| None, fetch: None },
    )
}

/// How [`deploy_with`] runs beyond its action.
pub struct DeployOptions<'a> {
    pub locking: Locking,
    /// Each server's `install --confirm-timeout`, in seconds; `None` asks for no confirmation.
    pub confirm_timeout: &'a dyn Fn(&Server) -> Option<u64>,
    /// What a deploy plan saw for each server (`install --plan`); `None` installs whatever
    /// the builder holds over whatever the server runs.
    pub expect: &'a dyn Fn(&Server) -> Option<Expectation>,
    /// Through the store: the URLs the builder signed for this run; servers fetch the packages
    /// and the installer, and only their overlay travels over ssh.
    pub fetch: Option<&'a flotilla_contracts::store::FetchList>,
}

/// What `install --plan` holds a server's install to: the builder must still be about to send
/// `release` with `installer`, and the server must still run `active`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expectation {
    /// The server's active release the plan saw; `None`: none.
    pub active: Option<String>,
    /// The release the builder's outputs and the server's overlay make.
    pub release: String,
    /// The digest of the installer the builder sends.
    pub installer: String,
}

/// [`deploy`], with its locking and each server's confirmation timeout given: one batch of a
/// rollout, or an install that asks for confirmation.
pub fn deploy_with(
    cx: &Context<'_>,
    action: DeployAction,
    servers: &[&Server],
    options: &DeployOptions<'_>,
) -> Plan {
    let locking = options.locking;
    let mut plan = cx.plan(format!("deploy {}", action.name()), locking, true, Agent::Forward);
    let manager = cx.config.deployment.service_manager.as_str();
    let packages = cx.staging().join("packages");
    let overlay = cx.staging().join("overlay");
    for server in servers {
        let hop = cx.server_hop(server);
        let phases = match &action {
            DeployAction::Install(artifacts) => {
                let confirm = (options.confirm_timeout)(server).filter(|&secs| secs > 0);
                let mut words = vec![
                    quote("--service-manager"),
                    quote(manager),
                    quote("install"),
                    quote("--create-users"),
                    packages.shell_word(),
                    quote("--overlay"),
                    overlay.shell_word(),
                ];
                if let Some(secs) = confirm {
                    words.extend([quote("--confirm-timeout"), quote(&secs.to_string())]);
                }
                let expect = (options.expect)(server);
                if let Some(expect) = &expect {
                    words.extend([
                        quote("--expect-release"),
                        quote(expect.active.as_deref().unwrap_or("none")),
                    ]);
                }
                let install = cx.installer(&words);
                let (mut names, mut body) =
                    install_body(cx, server, artifacts, &install, options.fetch);
                let mut what = Vec::new();
                if let Some(expect) = &expect {
                    names.insert(0, "verify");
                    body = format!(
                        "{}; {} || exit $?; {body}",
                        phase("verify"),
                        verify_payload(cx, server, artifacts, expect)
                    );
                    what.push(format!(
                        "check on the builder that {artifacts}/ and out/overlay/{}/ still make \
                         release {} with installer {} (the plan's); the install below also \
                         requires the server's active release to be {} still",
                        server.name,
                        expect.release,
                        short(&expect.installer),
                        expect.active.as_deref().unwrap_or("none")
                    ));
                }
                what.extend([format!(
                    "when {} already holds what this deploy sends (its staged key), only \
                         install",
                    cx.staging()
                )]);
                match options.fetch {
                    None => what.push(format!(
                        "rsync the packages and digests.b3 of {artifacts}/, {INSTALLER} and \
                         out/overlay/{}/ to {} (--delete, --checksum, --protect-args; refused \
                         without its marker)",
                        server.name,
                        cx.staging()
                    )),
                    Some(list) => what.extend([
                        format!(
                            "{INSTALLER} fetch on the server: the {} package(s) of {artifacts}/ \
                             and {INSTALLER} from the store with this run's presigned URLs, \
                             each verified against its digest before it takes its name, resumed \
                             and retried; a server without an installer first downloads it with \
                             curl or wget and checks its sha256, and one that cannot (or whose \
                             installer cannot fetch) gets it pushed first",
                            list.packages.len()
                        ),
                        format!(
                            "rsync out/overlay/{}/ to {} (only the overlay: it never goes to \
                             the store; --delete, --checksum, --protect-args; refused without \
                             its marker)",
                            server.name,
                            cx.staging()
                        ),
                    ]),
                }
                what.extend([format!(
                    "{INSTALLER} install --create-users {packages} --overlay {overlay} \
                         (prefix {}, {manager}; creates the services' missing users), then \
                         record the staged key{}",
                    cx.config.deployment.prefix,
                    match confirm {
                        Some(secs) => format!(
                            "; a new release awaits confirmation within {secs} s, else the \
                                 server puts its previous release back"
                        ),
                        None => String::new(),
                    }
                )]);
                plan.hosts.push(HostPlan {
                    host: server.name.to_string(),
                    steps: vec![cx.server_step_with(server, names, &body, what)],
                });
                continue;
            }
            DeployAction::Uninstall => {
                // A server that never received the installer has nothing installed.
                let bin = cx.staging().join("bin").join(INSTALLER).shell_word();
                let remote = format!(
                    "{} && if [ -x {bin} ]; then {}; fi && rm -rf -- {}",
                    check_owned(
                        cx.staging(),
                        STAGING_MARKER,
                        "deployment.staging_dir",
                        "removes it on uninstall"
                    ),
                    cx.installer(&[quote("--service-manager"), quote(manager), quote("uninstall")]),
                    cx.staging().shell_word()
                );
                let what = format!(
                    "{INSTALLER} uninstall (prefix {}, {manager}), then remove {} (refused \
                     without its marker)",
                    cx.config.deployment.prefix,
                    cx.staging()
                );
                vec![("uninstall", hop.run(&remote), what)]
            }
            DeployAction::Status => {
                let remote =
                    cx.installer(&[quote("--service-manager"), quote(manager), quote("status")]);
                let what =
                    format!("{INSTALLER} status: the active release and each service's state");
                vec![("status", hop.run(&remote), what)]
            }
            DeployAction::Rollback => {
                let remote =
                    cx.installer(&[quote("--service-manager"), quote(manager), quote("rollback")]);
                let what = format!("{INSTALLER} rollback to the previous release");
                vec![("rollback", hop.run(&remote), what)]
            }
            DeployAction::Clean => clean_phases(cx, server, manager),
        };
        let steps = vec![cx.server_step(server, phases)];
        plan.hosts.push(HostPlan { host: server.name.to_string(), steps });
    }
    plan
}

/// The phases of `deploy clean` on one server: the installer removes every release but the
/// active one, then the staged files go.
///
/// What goes and what stays in the staging directory: the packages, the overlay (the server's
/// secrets among them: the active release holds its own copies) and the staged key (it
/// describes what the directory no longer holds, so the next install pushes again) go. The
/// installer in `bin/` stays, since `deploy status`, `rollback` and `uninstall` run it to manage
/// the active release; so do `.tools/` (the rsync `install-prereqs` carried to a server without
/// one, which the next push needs) and the marker that makes the directory flotilla's. Only
/// the names flotilla puts there are removed, never anything else in the directory, and a
/// directory without the marker is refused before anything runs. A server that never received
/// the installer has no release to clean.
fn clean_phases(
    cx: &Context<'_>,
    server: &Server,
    manager: &str,
) -> Vec<(&'static str, String, String)> {
    use flotilla_contracts::layout::staging::{OVERLAY, PACKAGES};
    let hop = cx.server_hop(server);
    let (releases, unstage) = clean_commands(cx, manager);
    vec![
        (
            "releases",
            hop.run(&releases),
            format!(
                "{INSTALLER} clean: remove every release but the active one (prefix {}, \
                 {manager}; refused when {} lacks its marker)",
                cx.config.deployment.prefix,
                cx.staging()
            ),
        ),
        (
            "unstage",
            hop.run(&unstage),
            format!(
                "remove {PACKAGES}/, {OVERLAY}/ and {STAGED_KEY} from {}; keep bin/{INSTALLER} \
                 (status, rollback, uninstall), {TOOLS}/ and {STAGING_MARKER}",
                cx.staging()
            ),
        ),
    ]
}

/// The server-side commands of `deploy clean`'s two phases (see `clean_phases`).
fn clean_commands(cx: &Context<'_>, manager: &str) -> (String, String) {
    use flotilla_contracts::layout::staging::{OVERLAY, PACKAGES};
    let owned = check_owned(cx.staging(), STAGING_MARKER, "deployment.staging_dir", "cleans it");
    let bin = cx.staging().join("bin").join(INSTALLER).shell_word();
    let releases = format!(
        "{owned} && if [ -x {bin} ]; then {}; else echo {}; fi",
        cx.installer(&[quote("--service-manager"), quote(manager), quote("clean")]),
        quote(&format!("no {INSTALLER} in {}: no release installed from it", cx.staging()))
    );
    let staged = [PACKAGES, OVERLAY, STAGED_KEY].map(|name| cx.staging().join(name).shell_word());
    let unstage = format!(
        "{owned} && rm -rf -- {} && echo {}",
        staged.join(" "),
        quote(&format!("removed {PACKAGES}/, {OVERLAY}/ and {STAGED_KEY} from {}", cx.staging()))
    );
    (releases, unstage)
}

/// `exec`: one shell command line on every selected server, through the builder.
pub fn exec(cx: &Context<'_>, servers: &[&Server], command: &str) -> Plan {
    let mut plan = cx.plan("exec".into(), Locking::NoLock, true, Agent::Forward);
    for server in servers {
        plan.hosts.push(HostPlan {
            host: server.name.to_string(),
            steps: vec![cx.server_step(
                server,
                vec![(
                    "exec",
                    cx.server_hop(server).run(command),
                    format!("run {}", quote(command)),
                )],
            )],
        });
    }
    plan
}

/// `flotilla-installer confirm` on each server, each over a connection of its own opened now:
/// the proof that a newly activated release left the server reachable.
pub fn confirm(cx: &Context<'_>, servers: &[&Server]) -> Plan {
    let mut plan = cx.plan("deploy confirm".into(), Locking::NoLock, true, Agent::Forward);
    for server in servers {
        let remote = cx.installer(&[quote("confirm")]);
        let what = format!(
            "{INSTALLER} confirm, over a new connection: the new release stays (without it, the \
             server puts its previous release back at the deadline)"
        );
        plan.hosts.push(HostPlan {
            host: server.name.to_string(),
            steps: vec![
                cx.server_step(server, vec![("confirm", cx.server_hop(server).run(&remote), what)])
            ],
        });
    }
    plan
}

/// `flotilla-installer probe` of `check` on each server, tried until it passes within
/// `timeout` seconds: a quorum group's health, or which member leads. The lock is kept, as the
/// rollout that asks holds it.
pub fn probe(
    cx: &Context<'_>,
    command: &str,
    servers: &[&Server],
    check: &super::config::Check,
    timeout: u64,
) -> Plan {
    let mut plan = cx.plan(command.to_owned(), Locking::Keep, true, Agent::Forward);
    let mut words = vec![quote("probe")];
    words.extend(check.probe_args(timeout).iter().map(|w| quote(w)));
    for server in servers {
        let what = if timeout == 0 {
            format!("{INSTALLER} probe: {check}")
        } else {
            format!("{INSTALLER} probe: {check}, until it passes, at most {timeout} s")
        };
        plan.hosts.push(HostPlan {
            host: server.name.to_string(),
            steps: vec![cx.server_step(
                server,
                vec![("probe", cx.server_hop(server).run(&cx.installer(&words)), what)],
            )],
        });
    }
    plan
}

/// The end of a rollout: releases the deploy lock if this run holds it, whatever happened
/// before (an interrupt too), and closes the connection to the builder.
pub fn release(cx: &Context<'_>) -> Plan {
    let mut plan = cx.plan("rollout release".into(), Locking::NoLock, false, Agent::NoForward);
    plan.setup.clear();
    plan.teardown.insert(0, cx.release_step());
    plan
}

/// The first characters of a digest or release id, as plans and tables show them.
pub fn short(digest: &str) -> &str {
    &digest[..digest.len().min(8)]
}

/// The builder's `flotilla-installer payload` for one server, in the builder's workspace:
/// what its outputs and the server's overlay would install. `expect` makes it exit 5 when they
/// no longer are what a deploy plan saw.
fn payload_command(
    cx: &Context<'_>,
    server: &Server,
    artifacts: &Artifacts,
    expect: Option<&Expectation>,
) -> String {
    let prefix = quote(cx.config.deployment.prefix.as_str());
    let mut words = vec![
        format!("target/release/{INSTALLER}"),
        "--prefix".into(),
        prefix.clone(),
        "--packages-prefix".into(),
        prefix,
        "payload".into(),
        quote(artifacts.as_str()),
        "--overlay".into(),
        quote(&format!("out/overlay/{}", server.name)),
    ];
    if let Some(expect) = expect {
        words.extend([
            "--expect-release".into(),
            quote(&expect.release),
            "--expect-installer".into(),
            quote(&expect.installer),
        ]);
    }
    format!(
        "( cd -- {src} || exit 1; [ -x target/release/{INSTALLER} ] || {{ echo 'no \
         target/release/{INSTALLER} on the builder: run `fling build package` first' >&2; \
         exit 1; }}; {} )",
        words.join(" "),
        src = cx.workspace(),
    )
}

/// `install --plan`'s check before a server's install: the builder's outputs are still the
/// plan's.
fn verify_payload(
    cx: &Context<'_>,
    server: &Server,
    artifacts: &Artifacts,
    expect: &Expectation,
) -> String {
    format!("{} >/dev/null", payload_command(cx, server, artifacts, Some(expect)))
}

/// The state `deploy plan` reports for a server without an installer: nothing installed.
pub fn never_installed() -> serde_json::Value {
    serde_json::json!({"installer": "", "active": null, "awaiting_confirmation": null})
}

/// `deploy plan`: for each server, what the builder would send it (`flotilla-installer payload`
/// on the builder) and what it runs now (`flotilla-installer state` there), each one JSON line
/// on standard output; `survey::compare` turns the two into the server's changes. Nothing is
/// pushed, installed or locked.
pub fn survey(cx: &Context<'_>, servers: &[&Server], artifacts: &Artifacts) -> Plan {
    let mut plan = cx.plan("deploy plan".into(), Locking::NoLock, true, Agent::Forward);
    let bin = cx.staging().join("bin").join(INSTALLER).shell_word();
    let never = serde_json::json!({"installer": "", "active": null, "awaiting_confirmation": null});
    for server in servers {
        let hop = cx.server_hop(server);
        let state = format!(
            "if [ -x {bin} ]; then {}; else echo {}; fi",
            cx.installer(&[quote("state")]),
            quote(&format!("{}{never}", flotilla_contracts::installer::STATE_LINE))
        );
        let phases = vec![
            (
                "outputs",
                payload_command(cx, server, artifacts, None),
                format!(
                    "{INSTALLER} payload on the builder: the release {artifacts}/ and \
                     out/overlay/{}/ would make, each package and overlay file by digest",
                    server.name
                ),
            ),
            (
                "state",
                hop.run(&state),
                format!(
                    "{INSTALLER} state: the active release, its packages and overlay files by \
                     digest (nothing changes on the server)"
                ),
            ),
        ];
        plan.hosts.push(HostPlan {
            host: server.name.to_string(),
            steps: vec![cx.server_step(server, phases)],
        });
    }
    plan
}

/// The journal's file on the builder: one JSON line per host of every run that reached
/// servers, in the builder's copy of the sources (which `sync` leaves alone).
pub fn journal_path(cx: &Context<'_>) -> RemotePath {
    cx.config.builder.source_path.join(super::journal::JOURNAL_FILE)
}

/// The client command that appends its standard input to the journal on the builder, over the
/// run's shared connection, then keeps the file within `journal::MAX_BYTES` by dropping its
/// oldest lines.
pub fn journal_append(cx: &Context<'_>) -> Vec<String> {
    let file = journal_path(cx).shell_word();
    let dir = cx.config.builder.source_path.shell_word();
    let script = format!(
        "[ -d {dir} ] || exit 0; umask 077; cat >> {file} && s=$(wc -c < {file}) && if [ \"$s\" \
         -gt {max} ]; then tail -c {keep} {file} | sed 1d > {file}.tmp && mv -f -- {file}.tmp \
         {file}; fi",
        max = super::journal::MAX_BYTES,
        keep = super::journal::MAX_BYTES / 2,
    );
    cx.builder.run(Agent::NoForward, &script)
}

/// `history`: the journal's last lines, read on the builder.
pub fn history(cx: &Context<'_>) -> Plan {
    let mut plan = cx.plan("history".into(), Locking::NoLock, false, Agent::NoForward);
    let file = journal_path(cx).shell_word();
    let script = format!("if [ -f {file} ]; then tail -n 20000 {file}; fi");
    plan.hosts.push(HostPlan {
        host: cx.builder_name(),
        steps: vec![cx.on_builder("journal", StepKind::Work, Agent::NoForward, &script).what([
            format!("read the journal {} (the last runs' outcome on each host)", journal_path(cx)),
        ])],
    });
    plan
}

/// `lock status|release`.
pub fn lock(cx: &Context<'_>, release: bool) -> Plan {
    let mut plan = cx.plan(
        format!("lock {}", if release { "release" } else { "status" }),
        Locking::NoLock,
        false,
        Agent::NoForward,
    );
    let lock = cx.config.builder.lock_dir.shell_word();
    let script = if release {
        format!(
            "if [ -d {lock} ]; then echo 'released the deploy lock:'; cat {lock}/info 2>/dev/null; \
             rm -rf -- {lock}; else echo 'the deploy lock is not held'; fi"
        )
    } else {
        format!(
            "if [ -d {lock} ]; then echo 'the deploy lock is held:'; cat {lock}/info 2>/dev/null; \
             else echo 'the deploy lock is not held'; fi"
        )
    };
    plan.hosts.push(HostPlan {
        host: cx.builder_name(),
        steps: vec![cx.on_builder("lock", StepKind::Work, Agent::NoForward, &script).what([
            if release {
                format!("remove the deploy lock {}, whoever holds it", cx.config.builder.lock_dir)
            } else {
                format!("show who holds the deploy lock {}", cx.config.builder.lock_dir)
            },
        ])],
    });
    plan
}

/// The phases and builder script of `deploy install` to one server, after the connection.
///
/// A redeploy of what a server already has should cost one session there, not a transfer
/// session and an install session. The builder computes a key of what it would push: the
/// digest list (which names every package by its digest), the installer binary's digest, the
/// server's overlay files and the install command. `check` runs the installer with that key and
/// `--if-staged`: it installs at once when the staging directory holds that key (the
/// installer's own no-op path then decides whether anything changes), and otherwise exits with
/// `EXIT_NOT_STAGED`, as it does when installing from the staging directory failed before
/// anything changed (say a staged package went missing); so does a shell that finds no
/// installer to run (126, 127). Then the builder pushes (the push removes the key before
/// changing anything) and installs with the key, which the installer records once it
/// succeeded and removes when it failed.
fn install_body(
    cx: &Context<'_>,
    server: &Server,
    artifacts: &Artifacts,
    install: &str,
    fetch: Option<&flotilla_contracts::store::FetchList>,
) -> (Vec<&'static str>, String) {
    let hop = cx.server_hop(server);
    let digests = quote(&format!("{artifacts}/digests.b3"));
    let staging = cx.staging().shell_word();
    let overlay_dir = quote(&format!("out/overlay/{}", server.name));
    let key = format!(
        "k=none; if cd -- {src} && [ -f {digests} ] && [ -x target/release/{INSTALLER} ] \
         && [ -d {overlay_dir} ]; then k=$({{ cat {digests} && sha256sum < \
         target/release/{INSTALLER} && printf '%s\\n' {command} && ( cd -- {overlay_dir} && \
         find . -type f -exec sha256sum {{}} + | LC_ALL=C sort -k 2 ); }} | sha256sum | \
         cut -c 1-64); fi; case \"$k\" in '' | *[!0-9a-f]*) k=none ;; esac",
        src = cx.workspace(),
        command = quote(install),
    );
    // `$k` is lowercase hex, set in the server's shell by `run_with_key`.
    let with_key = format!("{install} --staging {staging} --staged-key \"$k\"");
    let check = hop.run_with_key(&format!("{with_key} --if-staged"));
    let install_and_record = format!(
        "if [ \"$k\" = none ]; then {}; else {}; fi",
        hop.run(install),
        hop.run_with_key(&with_key)
    );
    let body = format!(
        "( {key}; if [ \"$k\" != none ]; then {check_phase}; {echo_check}{check}; rc=$?; case $rc \
         in {not_staged} | 126 | 127) ;; *) exit \"$rc\" ;; esac; fi; {push_phase}; {push} || \
         exit $?; {install_phase}; {echo_install}{install_and_record} )",
        not_staged = flotilla_contracts::installer::EXIT_NOT_STAGED,
        check_phase = phase("check"),
        echo_check = cx.echo(&check),
        push_phase = phase("push"),
        push = push(cx, server, artifacts),
        install_phase = phase("install"),
        echo_install = cx.echo(&install_and_record),
    );
    let Some(list) = fetch else {
        return (vec!["check", "push", "install"], body);
    };
    // Through the store: the server's installer fetches the packages and the new installer
    // with this run's URLs. One without an installer downloads it first with curl or wget and
    // checks its sha256 (`bootstrap_installer`); one that cannot (no curl, no wget, no
    // sha256sum, or an installer too old to fetch) gets the installer pushed, then fetches the
    // packages with it. Only the overlay travels over ssh.
    let bin = cx.staging().join("bin").join(INSTALLER).shell_word();
    let packages = cx.staging().join("packages").shell_word();
    let json = quote(&serde_json::to_string(list).expect("a fetch list serializes"));
    let bootstrap = bootstrap_installer(cx.staging(), list);
    let fetch_with = |installer: bool| {
        let words = if installer {
            format!("fetch --packages {packages} --installer {bin}")
        } else {
            format!("fetch --packages {packages}")
        };
        let otherwise = match (&bootstrap, installer) {
            (Some(fetch_installer), true) => {
                format!("{fetch_installer} && exec {bin} {words}")
            }
            _ => "exit 127".to_owned(),
        };
        let remote = format!("if [ -x {bin} ]; then exec {bin} {words}; fi; {otherwise}");
        format!("printf '%s' {json} | {}", hop.run(&remote))
    };
    let body = format!(
        "( {key}; if [ \"$k\" != none ]; then {check_phase}; {echo_check}{check}; rc=$?; case $rc \
         in {not_staged} | 126 | 127) ;; *) exit \"$rc\" ;; esac; fi; {fetch_phase}; {fetch}; \
         rc=$?; case $rc in 0) i=fetched ;; 2 | 126 | 127) i=pushed ;; *) exit \"$rc\" ;; esac; \
         {push_phase}; if [ \"$i\" = pushed ]; then {push_installer} && {fetch_packages}; else \
         {push_overlay}; fi || exit $?; {install_phase}; {echo_install}{install_and_record} )",
        not_staged = flotilla_contracts::installer::EXIT_NOT_STAGED,
        check_phase = phase("check"),
        echo_check = cx.echo(&check),
        fetch_phase = phase("fetch"),
        fetch = fetch_with(true),
        push_phase = phase("push"),
        push_installer = push_with(cx, server, artifacts, PushMode::OverlayAndInstaller),
        fetch_packages = fetch_with(false),
        push_overlay = push_with(cx, server, artifacts, PushMode::Overlay),
        install_phase = phase("install"),
        echo_install = cx.echo(&install_and_record),
    );
    (vec!["check", "fetch", "push", "install"], body)
}

/// The server-side commands that put the installer of `list` into the staging directory of a
/// server that has none, from the store: curl (or wget) downloads it under a temporary name,
/// `sha256sum` checks it against the digest the builder computed from its own copy, and only
/// then does it take the installer's name. `None` when the list carries no sha256 (signed by
/// an older builder): such servers get the installer pushed.
///
/// A server that cannot fetch it (no curl or wget, no sha256sum, the store out of its reach)
/// exits 127, and the builder pushes the installer instead, as it does for a server whose
/// installer predates `fetch`. A download whose digest differs is refused (exit 1): the store
/// holds a damaged or tampered object, which no server may run.
fn bootstrap_installer(
    staging: &RemotePath,
    list: &flotilla_contracts::store::FetchList,
) -> Option<String> {
    let sha256 = list.installer_sha256.as_deref()?;
    if !flotilla_contracts::digests::is_digest(sha256) {
        return None;
    }
    let dir = staging.join("bin");
    let part = dir.join(&format!(".{INSTALLER}.fetching")).shell_word();
    let bin = dir.join(INSTALLER).shell_word();
    let url = quote(&list.installer.url);
    let pushed = |why: &str| {
        let why = quote(&format!("{INSTALLER}: {why}: it is pushed over ssh instead"));
        format!("{{ rm -f -- {part}; echo {why} >&2; exit 127; }}")
    };
    Some(format!(
        "umask 077 && {claim} && mkdir -p -- {dir} || exit 1; rm -f -- {part}; \
         if command -v curl >/dev/null 2>&1; then curl -fsS --retry 2 --connect-timeout 10 \
         --max-time 600 -o {part} -- {url}; elif command -v wget >/dev/null 2>&1; then wget -q \
         -T 60 -t 5 -O {part} -- {url}; else false; fi || {no_download}; \
         s=$(sha256sum < {part} 2>/dev/null | cut -c 1-64) && [ -n \"$s\" ] || {no_sum}; \
         if [ \"$s\" != {sha256} ]; then rm -f -- {part}; echo {refused}\"$s\"{expected} >&2; \
         exit 1; fi; chmod 755 {part} && mv -f -- {part} {bin}",
        claim = claim(staging, STAGING_MARKER, "deployment.staging_dir"),
        dir = dir.shell_word(),
        no_download = pushed(
            "not downloaded from the store here (no curl or wget, or the store out of reach)"
        ),
        no_sum = pushed("no sha256sum here to check the download"),
        sha256 = quote(sha256),
        refused = quote(&format!("{INSTALLER}: the store's object has sha256 ")),
        expected = quote(&format!(
            ", the deploy expects {sha256}: refused, nothing was installed; {}",
            flotilla_contracts::store::damaged_object_hint(&list.installer.digest)
        )),
    ))
}

/// The builder-side command that pushes the packages, the digest list, the installer and this
/// server's overlay (nothing of any other server's) to the server's staging directory. rsync
/// sends only what changed, so a redeploy of the same packages sends no payload.
fn push(cx: &Context<'_>, server: &Server, artifacts: &Artifacts) -> String {
    push_with(cx, server, artifacts, PushMode::Everything)
}

/// What a push sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PushMode {
    /// The packages, the digest list, the installer and the overlay.
    Everything,
    /// Through the store, to a server without a fetching installer: the installer and the
    /// overlay; the packages the server fetched stay.
    OverlayAndInstaller,
    /// Through the store: the overlay alone; the fetched packages and installer stay.
    Overlay,
}

/// [`push`] of what `mode` names.
fn push_with(cx: &Context<'_>, server: &Server, artifacts: &Artifacts, mode: PushMode) -> String {
    let hop = cx.server_hop(server);
    let overlay_dir = format!("out/overlay/{}", server.name);
    // One rsync per server moves everything: the builder assembles the server's staging tree
    // from hard links (a copy where links cannot cross file systems) and rsync mirrors it.
    // `--checksum` compares contents, so identical packages rebuilt with new mtimes and
    // overlays that share size and mtime are both judged right; reading a few MB to hash them
    // costs far less than a needless transfer.
    let view = format!("out/.fling-push/{}", server.name);
    // The server creates the staging directory, private, in the same session as the transfer.
    // It removes the key of the last install before anything in the directory changes, and
    // runs the server's rsync, or the one `install-prereqs` carried there.
    let carried = cx.staging().join(TOOLS).join("rsync").shell_word();
    let rsync_path = format!(
        "umask 077 && {} && rm -f -- {} && if command -v rsync >/dev/null 2>&1; \
         then R=rsync; elif [ -x {carried} ]; then R={carried}; else echo 'this server has no \
         rsync: run `cargo xtask fling install-prereqs`' >&2; exit 127; fi && exec \"$R\"",
        claim(cx.staging(), STAGING_MARKER, "deployment.staging_dir"),
        cx.staging().join(STAGED_KEY).shell_word()
    );
    let mut rsync_words = vec![
        "rsync",
        "-a",
        // The remote path travels inside rsync's protocol, never through the server's shell.
        "--protect-args",
        "--delete",
        "--checksum",
        "--info=stats1",
    ];
    rsync_words.extend(cx.itemize());
    let exclude_marker = format!("--exclude=/{STAGING_MARKER}");
    let exclude_tools = format!("--exclude=/{TOOLS}/");
    // Through the store, what the server fetched is neither sent nor deleted.
    let kept: &[&str] = match mode {
        PushMode::Everything => &[],
        PushMode::OverlayAndInstaller => &["--exclude=/packages/"],
        PushMode::Overlay => &["--exclude=/packages/", "--exclude=/bin/"],
    };
    rsync_words.extend(kept);
    let rsync_path = format!("--rsync-path={rsync_path}");
    let source = format!("{view}/");
    let destination = format!("{}:{}/", hop.rsync_destination, cx.staging().for_rsync());
    rsync_words.extend([
        // The marker that makes the staging directory fling's is not part of the push.
        &exclude_marker,
        // The rsync `install-prereqs` carried lives in the staging directory: not part of the
        // push, and not deleted by it.
        &exclude_tools,
        "-e",
        &hop.rsync_shell,
        &rsync_path,
        "--",
        &source,
        &destination,
    ]);
    let rsync = quote_words(&rsync_words);
    let script = format!(
        "set -e; cd -- {src}; \
         [ -f {out}/digests.b3 ] || {{ echo {no_digests} >&2; exit 1; }}; \
         [ -x target/release/{INSTALLER} ] || {{ echo 'no target/release/{INSTALLER} on the \
         builder: run `fling build package` first' >&2; exit 1; }}; \
         [ -d {od} ] || {{ echo {missing} >&2; exit 1; }}; \
         v={view}; rm -rf -- \"$v\"; mkdir -p -m 700 -- \"$v\"; mkdir -- \"$v/packages\" \"$v/bin\"; \
         {copy_packages}{copy_installer}cp -al -- {od} \"$v/overlay\" 2>/dev/null || cp -a -- {od} \"$v/overlay\"; \
         rc=0; {echo}{rsync} || rc=$?; rm -rf -- \"$v\"; exit $rc",
        src = cx.workspace(),
        // Plain: `Artifacts` holds only characters no shell treats specially, so the globs
        // above stay globs.
        out = quote(artifacts.as_str()),
        no_digests = quote(&format!(
            "no {artifacts}/digests.b3 on the builder: run `fling build package{}` first",
            if *artifacts == Artifacts::default() {
                String::new()
            } else {
                format!(" --artifacts {artifacts}")
            }
        )),
        echo = cx.echo(&rsync),
        od = quote(&overlay_dir),
        view = quote(&view),
        missing = quote(&format!("no {overlay_dir} on the builder: run `fling overlay` first")),
        copy_packages = if mode == PushMode::Everything {
            format!(
                "for f in {out}/*.tar.gz {out}/*.tar {out}/digests.b3; do [ -e \"$f\" ] || \
                 continue; ln -- \"$f\" \"$v/packages/\" 2>/dev/null || cp -p -- \"$f\" \
                 \"$v/packages/\"; done; ",
                out = quote(artifacts.as_str())
            )
        } else {
            String::new()
        },
        copy_installer = if mode == PushMode::Overlay {
            String::new()
        } else {
            format!(
                "ln -- target/release/{INSTALLER} \"$v/bin/\" 2>/dev/null || cp -p -- \
                 target/release/{INSTALLER} \"$v/bin/\"; "
            )
        },
    );
    // A subshell, so `set -e` and `cd` stay inside this phase.
    format!("( {script} )")
}

/// A plan for people: per host, one line per step (or phase) saying where it runs and what
/// it does, in the order a run takes them. `render` has the commands themselves.
pub fn describe(plan: &Plan) -> String {
    let mut out = format!("fling {}: what each host would do (nothing runs)\n", plan.command);
    describe_steps(&mut out, &plan.builder, &plan.setup);
    for host in &plan.hosts {
        describe_steps(&mut out, &host.host, &host.steps);
    }
    if plan.journal.is_some() {
        let _ = writeln!(
            out,
            "[{}] journal (client): append each host's outcome to the builder's {} (at most \
             {} KiB, oldest runs dropped)",
            plan.builder,
            super::journal::JOURNAL_FILE,
            super::journal::MAX_BYTES / 1024
        );
    }
    describe_steps(&mut out, &plan.builder, &plan.teardown);
    out
}

/// One line per step (or phase) of `steps` of `host`, for [`describe`].
fn describe_steps(out: &mut String, host: &str, steps: &[Step]) {
    for step in steps {
        let names: Vec<&str> =
            if step.phases.is_empty() { vec![step.name] } else { step.phases.clone() };
        for (i, name) in names.iter().enumerate() {
            let what = step.what.get(i).map_or("", String::as_str);
            let _ = writeln!(out, "[{host}] {name} ({}): {what}", step.runs_on);
        }
    }
}

/// Prints a plan as the commands it would run, host by host, and the builder session that
/// runs them when there is one, with its script.
pub fn render(plan: &Plan, session_script: Option<&str>) -> String {
    let mut out = String::new();
    let mut section = |host: &str, steps: &[Step]| {
        for step in steps {
            let name =
                if step.phases.is_empty() { step.name.to_owned() } else { step.phases.join(", ") };
            let _ = writeln!(out, "[{host}] {name} (runs on {}):", step.runs_on);
            let _ = writeln!(out, "    {}", quote_words(&step.argv));
            if step.stdin.is_some() {
                let _ = writeln!(out, "    (the deployment config on standard input)");
            }
        }
    };
    section(&plan.builder, &plan.setup);
    for host in &plan.hosts {
        section(&host.host, &host.steps);
    }
    section(&plan.builder, &plan.teardown);
    if let (Some(session), Some(script)) = (&plan.session, session_script) {
        let _ = writeln!(out, "[{}] session (runs on client):", plan.builder);
        let _ = writeln!(out, "    {}", quote_words(&session.argv));
        let _ =
            writeln!(out, "    with this script on standard input, which runs the steps above:");
        for line in script.lines() {
            let _ = writeln!(out, "    | {line}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A workspace with one `smf/<name>/<name>.service` per (name, unit text).
    struct Workspace(Utf8PathBuf);

    impl Workspace {
        fn new(tag: &str, units: &[(&str, &str)]) -> Workspace {
            let dir =
                std::env::temp_dir().join(format!("flotilla-users-{tag}-{}", std::process::id()));
            let root = Utf8PathBuf::try_from(dir).unwrap();
            let _ = std::fs::remove_dir_all(&root);
            for (name, text) in units {
                std::fs::create_dir_all(root.join("smf").join(name)).unwrap();
                std::fs::write(root.join(format!("smf/{name}/{name}.service")), text).unwrap();
                std::fs::write(root.join(format!("smf/{name}/manifest.xml")), "User=not-read")
                    .unwrap();
            }
            Workspace(root)
        }
    }

    impl Drop for Workspace {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn sh(script: &str) -> std::process::Output {
        std::process::Command::new("sh").args(["-c", script]).output().unwrap()
    }

    /// Serves `body` to every request on a loopback port until the test ends: the address.
    fn serve(body: Vec<u8>) -> String {
        use std::io::{Read as _, Write as _};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let mut request = Vec::new();
                let mut byte = [0u8; 1];
                while !request.ends_with(b"\r\n\r\n") && stream.read(&mut byte).unwrap_or(0) == 1 {
                    request.push(byte[0]);
                }
                let head = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = stream.write_all(head.as_bytes());
                let _ = stream.write_all(&body);
            }
        });
        format!("http://{addr}")
    }

    fn installer_list(url: &str, sha256: &str) -> flotilla_contracts::store::FetchList {
        flotilla_contracts::store::FetchList {
            packages: Vec::new(),
            installer: flotilla_contracts::store::FetchObject {
                file: INSTALLER.into(),
                digest: "b".repeat(64),
                size: 12,
                url: format!(
                    "{url}/flotilla/blake3/{}?X-Amz-Signature=0&x='quoted'",
                    "b".repeat(64)
                ),
            },
            installer_sha256: Some(sha256.into()),
            expires_at: 0,
        }
    }

    #[test]
    fn a_server_without_an_installer_downloads_it_and_checks_its_sha256() {
        let ws = Workspace::new("bootstrap", &[]);
        std::fs::create_dir_all(&ws.0).unwrap();
        let body = b"#!/bin/sh\nexit 0\n".to_vec();
        std::fs::write(ws.0.join("body"), &body).unwrap();
        let sum = sh(&format!("sha256sum < {}", ws.0.join("body")));
        let sha256 = String::from_utf8_lossy(&sum.stdout)[..64].to_owned();
        let url = serve(body.clone());
        let staging = RemotePath::Absolute(ws.0.join("staging dir").to_string());
        let bin = ws.0.join("staging dir/bin").join(INSTALLER);
        let leftover = ws.0.join("staging dir/bin").join(format!(".{INSTALLER}.fetching"));

        // The right bytes take the installer's name, executable, in a directory fling claimed.
        let script = bootstrap_installer(&staging, &installer_list(&url, &sha256)).unwrap();
        let out = sh(&script);
        assert!(out.status.success(), "{out:?}");
        assert_eq!(std::fs::read(&bin).unwrap(), body);
        use std::os::unix::fs::PermissionsExt as _;
        assert_eq!(std::fs::metadata(&bin).unwrap().permissions().mode() & 0o777, 0o755);
        assert!(ws.0.join("staging dir").join(STAGING_MARKER).is_file());
        std::fs::remove_file(&bin).unwrap();

        // Other bytes than the builder's are refused for good, and leave nothing behind.
        let other = "0".repeat(64);
        let script = bootstrap_installer(&staging, &installer_list(&url, &other)).unwrap();
        let out = sh(&script);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(err.contains(&format!("the store's object has sha256 {sha256}")), "{err}");
        assert!(err.contains(&format!("delete the object blake3/{}", "b".repeat(64))), "{err}");
        assert!(!bin.exists() && !leftover.exists());

        // A store out of reach means a push, not a failure.
        let closed = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            format!("http://{}", listener.local_addr().unwrap())
        };
        let script = bootstrap_installer(&staging, &installer_list(&closed, &sha256)).unwrap();
        let out = sh(&script);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(127), "{err}");
        assert!(err.contains("it is pushed over ssh instead"), "{err}");
        assert!(!bin.exists() && !leftover.exists());

        // So does a server with neither curl nor wget: its PATH holds every other tool.
        let tools = ws.0.join("tools");
        std::fs::create_dir_all(&tools).unwrap();
        for tool in ["mkdir", "rm", "cut", "chmod", "mv", "sha256sum"] {
            let found = sh(&format!("command -v {tool}"));
            let path = String::from_utf8_lossy(&found.stdout).trim().to_owned();
            std::os::unix::fs::symlink(path, tools.join(tool)).unwrap();
        }
        let script = bootstrap_installer(&staging, &installer_list(&url, &sha256)).unwrap();
        let out = std::process::Command::new("/bin/sh")
            .args(["-c", &script])
            .env("PATH", tools.as_str())
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(127), "{out:?}");
        assert!(!bin.exists());

        // A list signed by an older builder carries no sha256: no download, a push.
        let mut old = installer_list(&url, &sha256);
        old.installer_sha256 = None;
        assert_eq!(bootstrap_installer(&staging, &old), None);
    }

    #[test]
    fn a_directory_is_claimed_only_when_new_or_already_flings() {
        let ws = Workspace::new("claim", &[]);
        std::fs::create_dir_all(&ws.0).unwrap();
        let dir = RemotePath::Absolute(ws.0.join("staging it's").to_string());
        let script = claim(&dir, STAGING_MARKER, "deployment.staging_dir");
        let out = sh(&script);
        assert!(out.status.success(), "{out:?}");
        assert!(ws.0.join("staging it's").join(STAGING_MARKER).is_file());
        assert!(sh(&script).status.success(), "a directory with the marker is accepted again");

        let foreign = ws.0.join("foreign");
        std::fs::create_dir_all(&foreign).unwrap();
        std::fs::write(foreign.join("precious"), "keep").unwrap();
        let foreign_dir = RemotePath::Absolute(foreign.to_string());
        for script in [
            claim(&foreign_dir, STAGING_MARKER, "deployment.staging_dir"),
            check_owned(&foreign_dir, STAGING_MARKER, "deployment.staging_dir", "removes it"),
        ] {
            let out = sh(&script);
            assert_eq!(out.status.code(), Some(1), "{out:?}");
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(
                err.starts_with(&format!(
                    "refusing {foreign} (deployment.staging_dir): it exists but flotilla did not \
                     create it (it holds no .flotilla-staging)"
                )),
                "{err}"
            );
            assert!(err.contains(&format!("touch {foreign}/.flotilla-staging")), "{err}");
            assert_eq!(std::fs::read_to_string(foreign.join("precious")).unwrap(), "keep");
            assert!(!foreign.join(STAGING_MARKER).exists());
        }
        let missing = RemotePath::Absolute(ws.0.join("missing").to_string());
        assert!(sh(&check_owned(&missing, STAGING_MARKER, "f", "removes it")).status.success());
    }

    /// A context of `config`'s text, for plans built in tests.
    fn with_context<T>(config: &str, f: impl FnOnce(&Context<'_>) -> T) -> T {
        let config = Config::parse(camino::Utf8Path::new("t.toml"), config).unwrap();
        let cx = Context {
            config: &config,
            builder: BuilderHop::new(&config, camino::Utf8Path::new("/tmp/fling-T")).unwrap(),
            run_id: "T".into(),
            builder_control_dir: "/tmp/fling-b-T".into(),
            local_source: "/src".into(),
            who: "t@client".into(),
            lock_wait: 0,
        };
        f(&cx)
    }

    fn config_text(staging: &str, top: &str) -> String {
        format!(
            "{top}\n[builder]\nserver = \"b\"\nsource_path = \"$HOME/w\"\n[deployment]\n\
             servers = [\"n1\"]\nstaging_dir = {staging:?}\n[servers.b]\nusername = \"b\"\n\
             addr = \"b.example\"\n[servers.n1]\nusername = \"root\"\naddr = \"n1.example\"\n"
        )
    }

    #[test]
    fn clean_removes_only_what_flotilla_staged_and_runs_the_installers_clean() {
        let ws = Workspace::new("clean", &[]);
        let staging = ws.0.join("staging");
        let text = config_text(staging.as_str(), "");
        let (releases, unstage) = with_context(&text, |cx| clean_commands(cx, "systemd"));

        // A staging directory without the marker is refused by both phases, untouched.
        std::fs::create_dir_all(staging.join("packages")).unwrap();
        for script in [&releases, &unstage] {
            let out = sh(script);
            assert_eq!(out.status.code(), Some(1), "{out:?}");
            assert!(String::from_utf8_lossy(&out.stderr).contains("fling cleans it"));
        }
        assert!(staging.join("packages").is_dir());

        // Without an installer there is no release to clean; the staged files still go.
        std::fs::write(staging.join(STAGING_MARKER), "").unwrap();
        let out = sh(&releases);
        assert!(out.status.success(), "{out:?}");
        assert!(String::from_utf8_lossy(&out.stdout).contains("no release installed from it"));

        // The installer is run with the prefix, the manager and `clean`.
        let log = ws.0.join("installer.log");
        std::fs::create_dir_all(staging.join("bin")).unwrap();
        let installer = staging.join("bin").join(INSTALLER);
        std::fs::write(&installer, format!("#!/bin/sh\necho \"$*\" >> '{log}'\n")).unwrap();
        sh(&format!("chmod 755 '{installer}'"));
        for dir in ["packages", "overlay/opt/flotilla/a/pkg", ".tools/lib"] {
            std::fs::create_dir_all(staging.join(dir)).unwrap();
        }
        for file in ["packages/a.tar.gz", "overlay/opt/flotilla/a/pkg/key", ".staged-key", "mine"] {
            std::fs::write(staging.join(file), "x").unwrap();
        }
        let out = sh(&releases);
        assert!(out.status.success(), "{out:?}");
        assert_eq!(
            std::fs::read_to_string(&log).unwrap(),
            "--prefix /opt/flotilla --packages-prefix /opt/flotilla --service-manager systemd \
             clean\n"
        );
        let out = sh(&unstage);
        assert!(out.status.success(), "{out:?}");
        let mut left: Vec<String> = std::fs::read_dir(&staging)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(left, [".flotilla-staging", ".tools", "bin", "mine"]);
        assert!(installer.is_file() && staging.join(".tools/lib").is_dir());
        assert!(sh(&unstage).status.success(), "cleaning twice is no error");
    }

    #[test]
    fn debug_echoes_every_command_exactly_and_rsync_lists_its_files() {
        for command in ["true", "it's $(reboot) `x` \\n %s\"", "a\nb"] {
            let out = sh(&format!("{}; true", echo(command)));
            assert_eq!(String::from_utf8_lossy(&out.stdout), format!("+ {command}\n"));
        }
        let plain = config_text("/var/tmp/st", "");
        let debug = config_text("/var/tmp/st", "debug = true");
        let scripts = |text: &str| {
            with_context(text, |cx| {
                let server = cx.config.server(&cx.config.deployment.servers[0]);
                let install = deploy(cx, DeployAction::Install(Artifacts::default()), &[server]);
                let sync = sync(cx);
                let build = build(cx, &Build::Check(Default::default()));
                (
                    install.hosts[0].steps[0].script.clone().unwrap(),
                    sync.hosts[0].steps[0].argv.join(" "),
                    build.hosts[0].steps[0].script.clone().unwrap(),
                )
            })
        };
        let (install, sync, build) = scripts(&plain);
        assert!(!install.contains("printf '+ %s"), "{install}");
        assert!(!install.contains("--itemize-changes") && !sync.contains("--itemize-changes"));
        assert!(!build.contains("printf '+ %s"), "{build}");
        let (install, sync, build) = scripts(&debug);
        // The check, the push's rsync and the install are each echoed.
        assert_eq!(install.matches("printf '+ %s").count(), 3, "{install}");
        assert!(install.contains("--itemize-changes") && sync.contains("--itemize-changes"));
        assert!(build.contains("printf '+ %s\\n' 'cargo xtask check'"), "{build}");
    }

    #[test]
    fn the_rsync_version_check_reads_this_machines_rsync_and_refuses_an_old_one() {
        if std::process::Command::new("rsync").arg("--version").output().is_ok() {
            let out = sh(&format!("{}; echo \"$v\"", rsync_version_check("rsync", "here")));
            assert!(out.status.success(), "{out:?}");
            assert!(String::from_utf8_lossy(&out.stdout).starts_with('3'), "{out:?}");
        }
        let old = sh(&format!(
            "old() {{ printf 'rsync  version 2.6.9  protocol version 29\\n'; }}; {}",
            rsync_version_check("old", "the builder")
        ));
        assert_eq!(old.status.code(), Some(1));
        let err = String::from_utf8_lossy(&old.stderr);
        assert!(err.contains("rsync 2.6.9 on the builder is older than 3.0.0"), "{err}");
        let none = sh(&rsync_version_check("false", "this server"));
        assert!(String::from_utf8_lossy(&none.stderr)
            .contains("rsync of an unknown version on this server"));
    }
}
