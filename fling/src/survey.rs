//! `deploy plan`: what a deploy would change on each server, from the server's real state
//! (`flotilla-installer state`) and what the builder would send it (`flotilla-installer
//! payload`), before anything runs; and `install --plan`'s check that neither moved since.
//!
//! For each server: the release it runs and the one it would run, the packages whose digest
//! differs, the overlay files added, changed or removed (paths and digests, never contents),
//! the services that would restart (a package of theirs or a file of their overlay changed:
//! the installer restarts a service exactly when its directory's files change, so a package
//! rebuilt to the same files is predicted as a restart it may not need) and those that would
//! not; servers where nothing would change, and servers that could not be reached.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::sync::Mutex;
use std::time::Duration;

use flotilla_contracts::installer::{HostState, Payload, PAYLOAD_LINE, STATE_LINE};
use serde::{Deserialize, Serialize};

use super::exec::{Events, HostReport, Outcome, Report};
use super::plan::{short, Expectation};

/// The version of the plan file's format.
pub const FORMAT: u32 = 1;

/// A deploy plan: what `deploy plan --json` prints and `--out` writes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeployPlan {
    pub format: u32,
    /// The command the plan is for: `deploy install`.
    pub command: String,
    /// The builder's outputs directory.
    pub artifacts: String,
    pub builder: String,
    /// Seconds since the epoch.
    pub planned_at: u64,
    pub servers: Vec<ServerPlan>,
}

/// What a plan says of one server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    /// An install would change something.
    Changes,
    /// The server already runs what the builder would send.
    Unchanged,
    Unreachable,
    /// The server or the builder could not say (see `detail`).
    Failed,
}

/// Old and new of one thing; `None` where there is none.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    pub from: Option<String>,
    pub to: Option<String>,
}

/// A package whose digest differs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackageChange {
    pub name: String,
    #[serde(flatten)]
    pub change: Change,
}

/// An overlay file added, changed or removed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileChange {
    pub path: String,
    pub service: String,
    /// `added`, `changed` or `removed`.
    pub change: String,
    pub from: Option<String>,
    pub to: Option<String>,
}

/// One server's part of the plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerPlan {
    pub server: String,
    pub verdict: Verdict,
    /// Why it could not be surveyed, or a note on what the plan could not know.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
    /// The release it runs and the one it would run.
    pub release: Change,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub packages: Vec<PackageChange>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub overlay: Vec<FileChange>,
    /// Services that would restart.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub restart: Vec<String>,
    /// Services of the active release that would not.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unchanged: Vec<String>,
    /// Services of the active release the new one would not have.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub removed: Vec<String>,
    /// The installer binary, when the one sent differs from the one the server holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub installer: Option<Change>,
    /// What the builder would send (the digests of everything), which `install --plan` holds
    /// the builder to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload: Option<Payload>,
}

/// What a survey run found for one server.
#[derive(Debug, Clone)]
pub enum Seen {
    Found { payload: Box<Payload>, state: Box<HostState> },
    Unreachable(String),
    Failed(String),
}

/// The changes of one server from what the builder would send and what it runs.
pub fn compare(server: &str, payload: Payload, state: HostState) -> ServerPlan {
    let mut plan = ServerPlan {
        server: server.to_owned(),
        verdict: Verdict::Unchanged,
        notes: Vec::new(),
        release: Change {
            from: state.active.as_ref().map(|a| a.id.clone()),
            to: Some(payload.release.clone()),
        },
        packages: Vec::new(),
        overlay: Vec::new(),
        restart: Vec::new(),
        unchanged: Vec::new(),
        removed: Vec::new(),
        installer: None,
        payload: None,
    };
    if state.installer != payload.installer {
        plan.installer = Some(Change {
            from: Some(state.installer.clone()).filter(|d| !d.is_empty()),
            to: Some(payload.installer.clone()),
        });
    }
    if let Some(release) = &state.awaiting_confirmation {
        plan.notes
            .push(format!("release {release} awaits its confirmation: this install supersedes it"));
    }
    let (no_packages, no_files) = (Vec::new(), Vec::new());
    let (old_packages, old_overlay, services) = match &state.active {
        Some(a) => (&a.packages, a.overlay.as_ref(), a.services.as_slice()),
        None => {
            plan.notes.push("nothing installed yet: every service starts".into());
            (&no_packages, Some(&no_files), &[][..])
        }
    };
    let old: BTreeMap<&str, &str> =
        old_packages.iter().map(|p| (p.name.as_str(), p.digest.as_str())).collect();
    let new: BTreeMap<&str, &str> =
        payload.packages.iter().map(|p| (p.name.as_str(), p.digest.as_str())).collect();
    let names: BTreeSet<&str> = old.keys().chain(new.keys()).copied().collect();
    let mut changed_packages = BTreeSet::new();
    for name in names {
        let (from, to) = (old.get(name), new.get(name));
        if from != to {
            changed_packages.insert(name);
            plan.packages.push(PackageChange {
                name: name.to_owned(),
                change: Change { from: from.map(|d| d.to_string()), to: to.map(|d| d.to_string()) },
            });
        }
    }
    let mut changed_services: BTreeSet<String> = BTreeSet::new();
    match old_overlay {
        Some(old_files) => {
            let old: BTreeMap<&str, _> = old_files.iter().map(|f| (f.path.as_str(), f)).collect();
            let new: BTreeMap<&str, _> =
                payload.overlay.iter().map(|f| (f.path.as_str(), f)).collect();
            let paths: BTreeSet<&str> = old.keys().chain(new.keys()).copied().collect();
            for path in paths {
                let (from, to) = (old.get(path), new.get(path));
                let change = match (from, to) {
                    (None, Some(_)) => "added",
                    (Some(_), None) => "removed",
                    (Some(a), Some(b)) if a.digest != b.digest => "changed",
                    _ => continue,
                };
                let service = to.or(from).map(|f| f.service.clone()).unwrap_or_default();
                changed_services.insert(service.clone());
                plan.overlay.push(FileChange {
                    path: path.to_owned(),
                    service,
                    change: change.to_owned(),
                    from: from.map(|f| f.digest.clone()),
                    to: to.map(|f| f.digest.clone()),
                });
            }
        }
        None => {
            plan.notes.push(
                "the active release was installed before releases recorded their overlay's \
                 files: the overlay is compared as a whole"
                    .into(),
            );
            if plan.release.from != plan.release.to && changed_packages.is_empty() {
                changed_services.extend(payload.overlay.iter().map(|f| f.service.clone()));
            }
        }
    }
    for service in services {
        let touched = service.packages.iter().any(|p| changed_packages.contains(p.as_str()))
            || changed_services.contains(&service.name);
        let gone = !service.packages.is_empty()
            && service.packages.iter().all(|p| !new.contains_key(p.as_str()));
        if gone {
            plan.removed.push(service.name.clone());
        } else if touched {
            plan.restart.push(service.name.clone());
        } else {
            plan.unchanged.push(service.name.clone());
        }
    }
    let known: BTreeSet<&str> =
        services.iter().flat_map(|s| s.packages.iter().map(String::as_str)).collect();
    for p in &plan.packages {
        if state.active.is_some() && p.change.from.is_none() && !known.contains(p.name.as_str()) {
            plan.notes.push(format!("new package {}: its services start", p.name));
        }
    }
    let release_changes = plan.release.from != plan.release.to;
    if release_changes && plan.packages.is_empty() && plan.overlay.is_empty() {
        plan.notes.push(
            "the release differs by something other than file contents (an overlay file's mode)"
                .into(),
        );
    }
    if release_changes || plan.installer.is_some() {
        plan.verdict = Verdict::Changes;
    }
    plan.payload = Some(payload);
    plan
}

/// A server's plan from what its survey found.
pub fn server_plan(server: &str, seen: Seen) -> ServerPlan {
    match seen {
        Seen::Found { payload, state } => compare(server, *payload, *state),
        Seen::Unreachable(why) => absent(server, Verdict::Unreachable, why),
        Seen::Failed(why) => absent(server, Verdict::Failed, why),
    }
}

/// The plan of a server the survey could not read.
fn absent(server: &str, verdict: Verdict, why: String) -> ServerPlan {
    ServerPlan {
        server: server.to_owned(),
        verdict,
        notes: vec![why],
        release: Change { from: None, to: None },
        packages: Vec::new(),
        overlay: Vec::new(),
        restart: Vec::new(),
        unchanged: Vec::new(),
        removed: Vec::new(),
        installer: None,
        payload: None,
    }
}

const UNREACHABLE: &str = "unreachable";

/// A server's payload line and state line, as they arrive.
type Lines = (Option<String>, Option<String>);

/// Collects the payload and state lines of a survey run, passing every other event on.
pub struct Collector<'a> {
    inner: &'a dyn Events,
    found: Mutex<BTreeMap<String, Lines>>,
}

impl<'a> Collector<'a> {
    pub fn new(inner: &'a dyn Events) -> Collector<'a> {
        Collector { inner, found: Mutex::new(BTreeMap::new()) }
    }

    /// What the run found for each of `servers`, with the run's report.
    pub fn seen(&self, report: &Report) -> Vec<(String, Seen)> {
        let found = self.found.lock().expect("collector lock");
        report
            .hosts
            .iter()
            .map(|host| {
                let lines = found.get(&host.host);
                let seen = match (&host.outcome, lines) {
                    (Outcome::Ok, Some((Some(payload), Some(state)))) => {
                        match (serde_json::from_str(payload), serde_json::from_str(state)) {
                            (Ok(payload), Ok(state)) => {
                                Seen::Found { payload: Box::new(payload), state: Box::new(state) }
                            }
                            (Err(e), _) => Seen::Failed(format!("the builder's payload: {e}")),
                            (_, Err(e)) => Seen::Failed(format!("the server's state: {e}")),
                        }
                    }
                    (Outcome::Ok, _) => Seen::Failed(
                        "the survey ended without the builder's payload and the server's state"
                            .into(),
                    ),
                    (Outcome::Unreachable, _) => {
                        Seen::Unreachable(format!("{UNREACHABLE}: {}", why(host)))
                    }
                    (Outcome::Skipped(reason), _) => Seen::Failed(format!("skipped: {reason}")),
                    (Outcome::Failed { .. }, _) => {
                        Seen::Failed(format!("{} failed: {}", host.step, why(host)))
                    }
                };
                (host.host.clone(), seen)
            })
            .collect()
    }
}

fn why(host: &HostReport) -> String {
    host.stderr_tail.last().cloned().unwrap_or_else(|| "no message".into())
}

impl Events for Collector<'_> {
    fn step_started(&self, host: &str, step: &str, runs_on: &str) {
        self.inner.step_started(host, step, runs_on);
    }
    fn step_finished(
        &self,
        host: &str,
        step: &str,
        runs_on: &str,
        outcome: &Outcome,
        took: Duration,
    ) {
        self.inner.step_finished(host, step, runs_on, outcome, took);
    }
    fn output(&self, host: &str, step: Option<&str>, stream: &str, line: &str) {
        if stream == "stdout" {
            let mut found = self.found.lock().expect("collector lock");
            if let Some(json) = line.strip_prefix(PAYLOAD_LINE) {
                found.entry(host.to_owned()).or_default().0 = Some(json.to_owned());
                return;
            }
            if let Some(json) = line.strip_prefix(STATE_LINE) {
                found.entry(host.to_owned()).or_default().1 = Some(json.to_owned());
                return;
            }
        }
        self.inner.output(host, step, stream, line);
    }
    fn host_done(&self, report: &HostReport) {
        self.inner.host_done(report);
    }
    fn finish(&self) {
        self.inner.finish();
    }
}

impl DeployPlan {
    /// The servers an install of this plan touches: those with changes.
    pub fn to_apply(&self) -> Vec<&ServerPlan> {
        self.servers.iter().filter(|s| s.verdict == Verdict::Changes).collect()
    }

    /// What `install --plan` holds each server's install to.
    pub fn expectations(&self) -> BTreeMap<String, Expectation> {
        self.to_apply()
            .into_iter()
            .filter_map(|s| {
                let payload = s.payload.as_ref()?;
                Some((
                    s.server.clone(),
                    Expectation {
                        active: s.release.from.clone(),
                        release: payload.release.clone(),
                        installer: payload.installer.clone(),
                    },
                ))
            })
            .collect()
    }

    /// Reads a plan file; `path` names it in errors.
    pub fn parse(path: &str, text: &str) -> Result<DeployPlan, String> {
        let plan: DeployPlan = serde_json::from_str(text).map_err(|e| {
            format!("{path}: line {}, column {}: not a deploy plan: {e}", e.line(), e.column())
        })?;
        if plan.format != FORMAT {
            return Err(format!(
                "{path}: format {} is not this flotilla's ({FORMAT}): plan again",
                plan.format
            ));
        }
        if plan.command != "deploy install" {
            return Err(format!(
                "{path}: command: a plan for `{}`, not for `deploy install`",
                plan.command
            ));
        }
        Ok(plan)
    }
}

/// Why `fresh` (surveyed now) is not the plan `saved` saw, server by server, for every server
/// the saved plan would change; empty when it still is.
pub fn stale(saved: &DeployPlan, fresh: &DeployPlan) -> Vec<String> {
    let mut problems = Vec::new();
    for was in saved.to_apply() {
        let name = &was.server;
        let Some(now) = fresh.servers.iter().find(|s| &s.server == name) else {
            problems.push(format!("{name}: not surveyed"));
            continue;
        };
        let Some(now_payload) = &now.payload else {
            problems.push(format!("{name}: {}", now.notes.join("; ")));
            continue;
        };
        let Some(was_payload) = &was.payload else {
            problems.push(format!("{name}: the plan holds no payload for it"));
            continue;
        };
        let mut what = Vec::new();
        if now.release.from != was.release.from {
            what.push(format!(
                "the server's active release is {}, the plan saw {}",
                now.release.from.as_deref().unwrap_or("none"),
                was.release.from.as_deref().unwrap_or("none")
            ));
        }
        what.extend(payload_differences(was_payload, now_payload));
        if !what.is_empty() {
            problems.push(format!("{name}: {}", what.join("; ")));
        }
    }
    problems
}

/// What differs between the payload a plan saw and the builder's payload now.
fn payload_differences(was: &Payload, now: &Payload) -> Vec<String> {
    let mut what = Vec::new();
    let digests = |p: &Payload| -> BTreeMap<String, String> {
        p.packages.iter().map(|p| (p.name.clone(), p.digest.clone())).collect()
    };
    let (a, b) = (digests(was), digests(now));
    for name in a.keys().chain(b.keys()).collect::<BTreeSet<_>>() {
        match (a.get(name), b.get(name)) {
            (Some(x), Some(y)) if x != y => what.push(format!(
                "package {name} is now {} on the builder, the plan has {}",
                short(y),
                short(x)
            )),
            (Some(_), None) => what.push(format!("package {name} is no longer on the builder")),
            (None, Some(_)) => what.push(format!("package {name} is new on the builder")),
            _ => {}
        }
    }
    let files = |p: &Payload| -> BTreeMap<String, String> {
        p.overlay.iter().map(|f| (f.path.clone(), f.digest.clone())).collect()
    };
    let (a, b) = (files(was), files(now));
    for path in a.keys().chain(b.keys()).collect::<BTreeSet<_>>() {
        match (a.get(path), b.get(path)) {
            (Some(x), Some(y)) if x != y => what.push(format!(
                "overlay file {path} is now {} on the builder, the plan has {}",
                short(y),
                short(x)
            )),
            (Some(_), None) => what.push(format!("overlay file {path} is gone from the builder")),
            (None, Some(_)) => what.push(format!("overlay file {path} is new on the builder")),
            _ => {}
        }
    }
    if was.installer != now.installer {
        what.push(format!(
            "the installer is now {}, the plan has {}",
            short(&now.installer),
            short(&was.installer)
        ));
    }
    if what.is_empty() && was.release != now.release {
        what.push(format!("the release would be {}, the plan has {}", now.release, was.release));
    }
    what
}

/// A release id in full (what `status` shows and `rollback --to` takes), or `none`.
fn release(id: &Option<String>) -> &str {
    id.as_deref().unwrap_or("none")
}

/// A digest, short, or `-` where there is none.
fn opt(d: &Option<String>) -> &str {
    d.as_deref().map_or("-", short)
}

/// The plan as a table for people.
pub fn render(plan: &DeployPlan) -> String {
    let count = |v: Verdict| plan.servers.iter().filter(|s| s.verdict == v).count();
    let mut out = format!(
        "deploy plan: {} servers: {} would change, {} unchanged, {} unreachable{} (outputs: \
         {}/ on {})\n",
        plan.servers.len(),
        count(Verdict::Changes),
        count(Verdict::Unchanged),
        count(Verdict::Unreachable),
        match count(Verdict::Failed) {
            0 => String::new(),
            n => format!(", {n} failed"),
        },
        plan.artifacts,
        plan.builder,
    );
    for s in &plan.servers {
        match s.verdict {
            Verdict::Unreachable | Verdict::Failed => {
                let _ = writeln!(
                    out,
                    "{}: {}",
                    s.server,
                    if s.verdict == Verdict::Failed {
                        format!("not surveyed: {}", s.notes.join("; "))
                    } else {
                        s.notes.join("; ")
                    }
                );
                continue;
            }
            Verdict::Unchanged => {
                let _ = writeln!(
                    out,
                    "{}: nothing would change (release {})",
                    s.server,
                    release(&s.release.from)
                );
                for note in &s.notes {
                    let _ = writeln!(out, "  note: {note}");
                }
                continue;
            }
            Verdict::Changes => {}
        }
        if s.release.from == s.release.to {
            let _ = writeln!(out, "{}: release {} stays", s.server, release(&s.release.from));
        } else {
            let _ = writeln!(
                out,
                "{}: release {} -> {}",
                s.server,
                release(&s.release.from),
                release(&s.release.to)
            );
        }
        let width = s.packages.iter().map(|p| p.name.len()).max().unwrap_or(0);
        for p in &s.packages {
            let _ = writeln!(
                out,
                "  package  {:<width$}  {} -> {}",
                p.name,
                opt(&p.change.from),
                opt(&p.change.to)
            );
        }
        for f in &s.overlay {
            let _ = writeln!(
                out,
                "  overlay  {:<7}  {}  {} -> {}",
                f.change,
                f.path,
                opt(&f.from),
                opt(&f.to)
            );
        }
        if let Some(i) = &s.installer {
            let _ = writeln!(out, "  installer  {} -> {}", opt(&i.from), opt(&i.to));
        }
        let list = |v: &[String]| if v.is_empty() { "none".to_owned() } else { v.join(", ") };
        if !s.restart.is_empty() || !s.unchanged.is_empty() {
            let _ = writeln!(out, "  restarts: {}", list(&s.restart));
            let _ = writeln!(out, "  unchanged: {}", list(&s.unchanged));
        }
        if !s.removed.is_empty() {
            let _ = writeln!(out, "  removed: {}", list(&s.removed));
        }
        for note in &s.notes {
            let _ = writeln!(out, "  note: {note}");
        }
    }
    out
}
