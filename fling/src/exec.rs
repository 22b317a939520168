//! Walks a plan: setup against the builder, then every host concurrently (bounded, with a
//! separate bound on connection starts), then teardown; streams host-prefixed output, keeps
//! what the recap needs, and turns the results into an exit code.
//!
//! One host failing never stops the others: a host stops at its own first failing step.
//!
//! With `--json`, stdout carries one object per line: `{"event":"step", host, step, runs_on,
//! status: started|ok|failed|unreachable, exit_code, duration_ms}`, `{"event":"output", host,
//! step, stream, line}`, and last `{"event":"summary", command, exit_code, duration_ms,
//! setup_failure, hosts: [{host, last_step, result, exit_code, duration_ms, bytes_sent,
//! stderr_tail, reason}]}`. `--dry-run --json` writes `{"event":"plan", host, step, runs_on,
//! argv}` objects instead.

use std::{
    collections::VecDeque,
    io::{BufRead, BufReader, Read, Write},
    process::{Command, Stdio},
    sync::Mutex,
    time::{Duration, Instant},
};

use serde_json::json;
use xshell::{cmd, Shell};

use super::{
    batch, interrupt,
    plan::{Plan, Session, Step, StepKind},
    protocol::LOCK_HELD_STATUS,
};

/// Every host succeeded.
pub const EXIT_OK: i32 = 0;
// Exit code 1 is `cargo xtask`'s own: fling could not run at all (a bad config, bad
// arguments, a local error).
/// At least one host failed a step (and none was unreachable).
pub const EXIT_FAILED: i32 = 2;
/// Another run holds the deploy lock on the builder.
pub const EXIT_LOCKED: i32 = 3;
/// At least one host could not be reached (and none failed otherwise).
pub const EXIT_UNREACHABLE: i32 = 4;
/// Some hosts failed and some could not be reached.
pub const EXIT_FAILED_AND_UNREACHABLE: i32 = 6;
/// `install --plan`: the builder's outputs or a server's active release are no longer what the
/// plan saw; nothing was installed.
pub const EXIT_PLAN_STALE: i32 = 7;

/// How many stderr lines of a failed step the recap shows.
const TAIL_LINES: usize = 8;

/// How a run is carried out.
pub struct Options {
    pub parallel: usize,
    pub connect_parallel: usize,
    /// Environment for every command (the private agent's socket).
    pub env: Vec<(String, String)>,
}

/// How one host ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    Failed {
        code: Option<i32>,
    },
    Unreachable,
    /// Never started, with the reason.
    Skipped(String),
}

/// The recap line of one host.
#[derive(Debug, Clone)]
pub struct HostReport {
    pub host: String,
    /// The last step that ran (or would have).
    pub step: String,
    pub outcome: Outcome,
    pub duration: Duration,
    pub bytes_sent: u64,
    /// The last lines the failing step wrote to stderr.
    pub stderr_tail: Vec<String>,
}

/// The result of a run.
#[derive(Debug, Clone)]
pub struct Report {
    pub command: String,
    pub hosts: Vec<HostReport>,
    /// Set when setup failed: why every host was skipped.
    pub setup_failure: Option<HostReport>,
    pub exit_code: i32,
    pub duration: Duration,
}

/// Runs the plan and reports. Teardown runs whenever the builder was reached.
pub fn execute(sh: &Shell, plan: &Plan, options: &Options, events: &dyn Events) -> Report {
    let started = Instant::now();
    interrupt::install();
    let ui = events;
    if let Some(session) = &plan.session {
        let (setup_failure, hosts) = run_session(sh, plan, session, options, ui);
        let exit_code = if interrupt::interrupted() {
            interrupt::EXIT_INTERRUPTED
        } else {
            exit_code(setup_failure.as_ref(), &hosts)
        };
        let report = Report {
            command: plan.command.clone(),
            hosts,
            setup_failure,
            exit_code,
            duration: started.elapsed(),
        };
        // An unreachable builder has no journal to write to.
        let reached = !matches!(
            &report.setup_failure,
            Some(HostReport { outcome: Outcome::Unreachable, .. })
        );
        if let (Some(journal), true) = (&plan.journal, reached) {
            if let Err(why) = write_journal(sh, journal, &report, options) {
                ui.output(&plan.builder, None, "warning", &format!("journal not written: {why}"));
            }
        }
        // The session released the lock and closed the server connections itself; what is
        // left is the client's shared connection to the builder.
        for step in plan.teardown.iter().filter(|s| s.script.is_none()) {
            let _ = command(sh, &step.argv).output();
        }
        ui.finish();
        return report;
    }
    let mut setup_report = HostReport::new(&plan.builder);
    // A plan without setup is only a teardown (a rollout's release of its lock): it runs
    // even after an interrupt.
    let mut builder_reached = plan.setup.is_empty();
    for step in &plan.setup {
        run_step(sh, &plan.builder, step, options, ui, Stop::OnInterrupt, &mut setup_report);
        // A setup step that got as far as the builder's shell may have created what the
        // teardown removes, even when it failed (a held lock, say).
        if setup_report.outcome != Outcome::Unreachable {
            builder_reached = true;
        }
        if setup_report.outcome != Outcome::Ok {
            break;
        }
    }
    let setup_failure = (setup_report.outcome != Outcome::Ok).then(|| setup_report.clone());

    let hosts: Vec<HostReport> = if let Some(failure) = &setup_failure {
        skipped(plan, &plan.builder, &failure.step)
    } else if interrupt::interrupted() {
        skip_all(plan, INTERRUPTED)
    } else {
        fan_out(sh, plan, options, ui)
    };

    if builder_reached {
        for step in &plan.teardown {
            let mut report = HostReport::new(&plan.builder);
            // The teardown runs to its end even after an interrupt: it releases the lock.
            run_step(sh, &plan.builder, step, options, ui, Stop::Never, &mut report);
            if report.outcome != Outcome::Ok {
                ui.output(
                    &plan.builder,
                    None,
                    "warning",
                    &format!("{} did not succeed", step.name),
                );
            }
        }
    } else if let Some(close) = plan.teardown.last() {
        // The shared connection may exist even when its first session failed.
        let _ = command(sh, &close.argv).output();
    }
    ui.finish();

    let exit_code = if interrupt::interrupted() {
        interrupt::EXIT_INTERRUPTED
    } else {
        exit_code(setup_failure.as_ref(), &hosts)
    };
    Report {
        command: plan.command.clone(),
        hosts,
        setup_failure,
        exit_code,
        duration: started.elapsed(),
    }
}

/// Appends the run's lines to the journal on the builder.
fn write_journal(
    sh: &Shell,
    journal: &super::plan::JournalSink,
    report: &Report,
    options: &Options,
) -> Result<(), String> {
    let lines = super::journal::lines(&journal.info, report);
    let mut child = command(sh, &journal.argv)
        .envs(options.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| e.to_string())?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(lines.as_bytes()).map_err(|e| e.to_string())?;
    }
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_owned())
    }
}

/// A run's exit code from its setup and its hosts (see the crate's exit codes).
pub fn exit_code(setup_failure: Option<&HostReport>, hosts: &[HostReport]) -> i32 {
    if let Some(failure) = setup_failure {
        return match failure.outcome {
            Outcome::Unreachable => EXIT_UNREACHABLE,
            Outcome::Failed { code: Some(LOCK_HELD_STATUS) } => EXIT_LOCKED,
            _ => EXIT_FAILED,
        };
    }
    let failed = hosts.iter().any(|h| matches!(h.outcome, Outcome::Failed { .. }));
    let unreachable = hosts.iter().any(|h| h.outcome == Outcome::Unreachable);
    match (failed, unreachable) {
        (false, false) => EXIT_OK,
        (true, false) => EXIT_FAILED,
        (false, true) => EXIT_UNREACHABLE,
        (true, true) => EXIT_FAILED_AND_UNREACHABLE,
    }
}

/// Runs every host's steps on at most `parallel` threads.
fn fan_out(sh: &Shell, plan: &Plan, options: &Options, ui: &dyn Events) -> Vec<HostReport> {
    let next = Mutex::new(0usize);
    let reports: Mutex<Vec<Option<HostReport>>> = Mutex::new(vec![None; plan.hosts.len()]);
    let workers = options.parallel.min(plan.hosts.len()).max(1);
    std::thread::scope(|scope| {
        for _ in 0..workers {
            // xshell's Shell is not Sync; each worker builds its commands from its own copy.
            let sh = sh.clone();
            scope.spawn(|| {
                let sh = sh;
                loop {
                    let index = {
                        let mut next = next.lock().unwrap();
                        let index = *next;
                        *next += 1;
                        index
                    };
                    let Some(host) = plan.hosts.get(index) else { break };
                    let mut report = HostReport::new(&host.host);
                    if interrupt::interrupted() {
                        report.outcome = Outcome::Skipped(INTERRUPTED.into());
                        reports.lock().unwrap()[index] = Some(report);
                        continue;
                    }
                    for step in &host.steps {
                        run_step(
                            &sh,
                            &host.host,
                            step,
                            options,
                            ui,
                            Stop::OnInterrupt,
                            &mut report,
                        );
                        if report.outcome != Outcome::Ok {
                            break;
                        }
                    }
                    ui.host_done(&report);
                    reports.lock().unwrap()[index] = Some(report);
                }
            });
        }
    });
    reports.into_inner().unwrap().into_iter().map(|r| r.expect("every host ran")).collect()
}

/// Runs a plan as one builder session (see `batch`): the session's tagged lines become the
/// steps of the setup and of every host. Returns the setup's failure, if any, and every
/// host's report.
fn run_session(
    sh: &Shell,
    plan: &Plan,
    session: &Session,
    options: &Options,
    ui: &dyn Events,
) -> (Option<HostReport>, Vec<HostReport>) {
    let script = batch::script(plan, options.parallel, options.connect_parallel);
    let setup_step = plan.setup.first().expect("a plan has a setup step");
    let release = plan.teardown.iter().find(|s| s.script.is_some());
    let mut setup_report = HostReport::new(&plan.builder);
    let setup = Tracker::start(&plan.builder, setup_step, ui);
    let mut command = command(sh, &session.argv);
    for (key, value) in &options.env {
        command.env(key, value);
    }
    command.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(err) => {
            setup.line("stderr", &format!("start {}: {err}", session.argv[0]));
            setup.finish(Status::Failed(None), &mut setup_report);
            return (Some(setup_report), skipped(plan, &plan.builder, "connect"));
        }
    };
    let mut stdin = child.stdin.take().expect("piped");
    std::thread::spawn(move || {
        // A builder that goes away early closes the pipe; its status says why.
        let _ = stdin.write_all(script.as_bytes());
    });
    let stdout = child.stdout.take().expect("piped");
    let stderr = child.stderr.take().expect("piped");

    let mut setup_status = None;
    let mut trackers: Vec<Option<Tracker<'_>>> = (0..plan.hosts.len()).map(|_| None).collect();
    let mut reports: Vec<Option<HostReport>> = vec![None; plan.hosts.len()];
    let mut release_tracker = None;
    // What the session itself wrote to stderr (ssh's own messages: a refused host key, a
    // connection that failed), for the setup's recap when the builder was never reached.
    let session_errors = Mutex::new(VecDeque::new());
    interrupt::wait_or_stop(&child, || {
        std::thread::scope(|scope| {
            scope.spawn(|| {
                for_each_line(stderr, |line| {
                    ui.output(&plan.builder, None, "stderr", line);
                    let mut tail = session_errors.lock().unwrap();
                    if tail.len() == TAIL_LINES {
                        tail.pop_front();
                    }
                    tail.push_back(line.to_owned());
                })
            });
            for_each_line(stdout, |line| match batch::parse(line) {
                batch::Line::Untagged(text) => ui.output(&plan.builder, None, "stdout", text),
                batch::Line::Started(tag) => {
                    if let Some(index) = host_index(plan, tag) {
                        let host = &plan.hosts[index];
                        trackers[index] = Some(Tracker::start(&host.host, &host.steps[0], ui));
                    } else if tag == batch::TEARDOWN {
                        release_tracker = release.map(|r| Tracker::start(&plan.builder, r, ui));
                    }
                }
                batch::Line::Output(tag, stream, text) => {
                    if tag == batch::SETUP {
                        setup.line(stream, text);
                    } else if tag == batch::TEARDOWN {
                        if release_tracker.is_none() {
                            release_tracker = release.map(|r| Tracker::start(&plan.builder, r, ui));
                        }
                        if let Some(tracker) = &release_tracker {
                            tracker.line(stream, text);
                        }
                    } else if let Some(tracker) =
                        host_index(plan, tag).and_then(|i| trackers[i].as_ref())
                    {
                        tracker.line(stream, text);
                    }
                }
                batch::Line::Exited(tag, code) => {
                    let status = code.map_or(Status::Failed(None), Status::Exited);
                    if tag == batch::SETUP {
                        setup_status = Some(status);
                        setup.finish(status, &mut setup_report);
                    } else if tag == batch::TEARDOWN {
                        let mut report = HostReport::new(&plan.builder);
                        // A release that wrote nothing has no tracker yet.
                        if release_tracker.is_none() {
                            release_tracker = release.map(|r| Tracker::start(&plan.builder, r, ui));
                        }
                        if let Some(tracker) = &release_tracker {
                            tracker.finish(status, &mut report);
                        }
                        if report.outcome != Outcome::Ok {
                            ui.output(&plan.builder, None, "warning", "release did not succeed");
                        }
                    } else if let Some(index) = host_index(plan, tag) {
                        if let Some(tracker) = trackers[index].take() {
                            let mut report = HostReport::new(&plan.hosts[index].host);
                            tracker.finish(status, &mut report);
                            ui.host_done(&report);
                            reports[index] = Some(report);
                        }
                    }
                }
            });
        })
    });
    let session_status = Status::of(child.wait());
    let session_errors: Vec<String> = session_errors.into_inner().unwrap().into();

    if setup_status.is_none() {
        // The session ended before the setup did: the builder was not reached (ssh's 255),
        // or the session failed before its first step.
        if session_status == Status::Exited(0) {
            setup.finish(Status::Failed(None), &mut setup_report);
        } else {
            setup.finish(session_status, &mut setup_report);
        }
        if setup_report.stderr_tail.is_empty() {
            setup_report.stderr_tail = session_errors.clone();
        }
    }
    if setup_report.outcome != Outcome::Ok {
        let hosts = skipped(plan, &plan.builder, &setup_report.step);
        return (Some(setup_report), hosts);
    }

    let lost = if interrupt::interrupted() {
        INTERRUPTED
    } else {
        "the builder session ended before this host finished"
    };
    let hosts = reports
        .into_iter()
        .zip(trackers)
        .zip(&plan.hosts)
        .map(|((report, tracker), host)| {
            if let Some(report) = report {
                return report;
            }
            let mut report = HostReport::new(&host.host);
            match tracker {
                Some(tracker) => {
                    tracker.line("stderr", lost);
                    tracker.finish(Status::Failed(None), &mut report);
                }
                None if interrupt::interrupted() => {
                    report.outcome = Outcome::Skipped(INTERRUPTED.into());
                }
                None => {
                    report.outcome = Outcome::Failed { code: None };
                    report.stderr_tail = vec![format!("{lost} (it never started)")];
                    report.stderr_tail.extend(session_errors.iter().cloned());
                }
            }
            ui.host_done(&report);
            report
        })
        .collect();
    (None, hosts)
}

/// Why a host did not run or did not finish when the user interrupted the run.
const INTERRUPTED: &str = "interrupted";

/// The index of a host's tag in the session script.
fn host_index(plan: &Plan, tag: &str) -> Option<usize> {
    tag.parse().ok().filter(|i| *i < plan.hosts.len())
}

/// Every host of the plan, skipped because the builder's `step` did not succeed.
fn skipped(plan: &Plan, builder: &str, step: &str) -> Vec<HostReport> {
    skip_all(plan, &format!("the builder {builder}: {step} did not succeed"))
}

/// Every host of the plan, skipped for `reason`.
fn skip_all(plan: &Plan, reason: &str) -> Vec<HostReport> {
    plan.hosts
        .iter()
        .map(|h| {
            let mut report = HostReport::new(&h.host);
            report.outcome = Outcome::Skipped(reason.to_owned());
            report
        })
        .collect()
}

impl HostReport {
    fn new(host: &str) -> HostReport {
        HostReport {
            host: host.to_owned(),
            step: String::new(),
            outcome: Outcome::Ok,
            duration: Duration::ZERO,
            bytes_sent: 0,
            stderr_tail: Vec::new(),
        }
    }
}

/// Runs one step, streaming its output, and records the result in `report`.
fn run_step(
    sh: &Shell,
    host: &str,
    step: &Step,
    options: &Options,
    ui: &dyn Events,
    stop: Stop,
    report: &mut HostReport,
) {
    let tracker = Tracker::start(host, step, ui);
    let mut command = command(sh, &step.argv);
    for (key, value) in &options.env {
        command.env(key, value);
    }
    command
        .stdin(if step.stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(err) => {
            tracker.line("stderr", &format!("start {}: {err}", step.argv[0]));
            tracker.finish(Status::Failed(None), report);
            return;
        }
    };
    if let (Some(text), Some(mut stdin)) = (&step.stdin, child.stdin.take()) {
        // Written from a thread so a child that fills its output pipes first cannot deadlock.
        let text = text.clone();
        std::thread::spawn(move || {
            let _ = stdin.write_all(text.as_bytes());
        });
    }
    let stdout = child.stdout.take().expect("piped");
    let stderr = child.stderr.take().expect("piped");
    let read = || {
        std::thread::scope(|scope| {
            scope.spawn(|| for_each_line(stdout, |line| tracker.line("stdout", line)));
            for_each_line(stderr, |line| tracker.line("stderr", line));
        })
    };
    match stop {
        Stop::OnInterrupt => interrupt::wait_or_stop(&child, read),
        Stop::Never => read(),
    }
    tracker.finish(Status::of(child.wait()), report);
}

/// Whether an interrupt stops a running step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    OnInterrupt,
    Never,
}

/// How a step's command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    Exited(i32),
    /// Killed by a signal, never started, or its status is unknown.
    Failed(Option<i32>),
}

impl Status {
    fn of(status: std::io::Result<std::process::ExitStatus>) -> Status {
        match status {
            Ok(status) => status.code().map_or(Status::Failed(None), Status::Exited),
            Err(_) => Status::Failed(None),
        }
    }
}

pub use super::protocol::PHASE_MARKER;

/// A running step: its phase, output and what it sent, reported to the UI as lines arrive.
///
/// A step may go through several phases (connect, push, install) in one builder session; the
/// builder script announces each on stderr with a `PHASE_MARKER` line, and the step is
/// reported phase by phase. rsync's summary lines (`sent N bytes received M bytes ...`,
/// `total size is ...`) are counted, not shown.
struct Tracker<'a> {
    host: &'a str,
    step: &'a Step,
    ui: &'a dyn Events,
    started: Instant,
    current: Mutex<(&'static str, Instant)>,
    sent: Mutex<u64>,
    /// The last stderr lines of the current phase.
    tail: Mutex<VecDeque<String>>,
}

impl<'a> Tracker<'a> {
    fn start(host: &'a str, step: &'a Step, ui: &'a dyn Events) -> Tracker<'a> {
        let first = step.phases.first().copied().unwrap_or(step.name);
        ui.step_started(host, first, &step.runs_on);
        Tracker {
            host,
            step,
            ui,
            started: Instant::now(),
            current: Mutex::new((first, Instant::now())),
            sent: Mutex::new(0),
            tail: Mutex::new(VecDeque::new()),
        }
    }

    /// Moves to the phase a marker names; unknown names are ignored.
    fn advance(&self, name: &str) {
        let Some(next) = self.step.phases.iter().copied().find(|p| *p == name) else { return };
        let mut current = self.current.lock().unwrap();
        let (previous, since) = *current;
        if previous == next {
            return;
        }
        let runs_on = &self.step.runs_on;
        self.ui.step_finished(self.host, previous, runs_on, &Outcome::Ok, since.elapsed());
        *current = (next, Instant::now());
        self.tail.lock().unwrap().clear();
        self.ui.step_started(self.host, next, runs_on);
    }

    /// One line the step wrote to `stream`.
    fn line(&self, stream: &str, line: &str) {
        let line = line.trim_end_matches('\r');
        if let Some(next) = line.strip_prefix(PHASE_MARKER) {
            self.advance(next.trim());
            return;
        }
        let transfer = self.step.kind == StepKind::Transfer || self.step.phases.contains(&"push");
        if transfer {
            if let Some(bytes) = rsync_bytes_sent(line) {
                *self.sent.lock().unwrap() += bytes;
                return;
            }
            if line.is_empty() || line.starts_with("total size is ") {
                return;
            }
        }
        let phase = self.current.lock().unwrap().0;
        self.ui.output(self.host, Some(phase), stream, line);
        if stream == "stderr" {
            let mut tail = self.tail.lock().unwrap();
            if tail.len() == TAIL_LINES {
                tail.pop_front();
            }
            tail.push_back(line.to_owned());
        }
    }

    /// Records how the step ended in `report`.
    fn finish(&self, status: Status, report: &mut HostReport) {
        let (phase, phase_started) = *self.current.lock().unwrap();
        report.step = phase.to_owned();
        report.bytes_sent += *self.sent.lock().unwrap();
        report.duration += self.started.elapsed();
        report.outcome = match status {
            Status::Exited(0) => Outcome::Ok,
            // ssh says 255 when it could not connect; in a connect phase that is the host.
            Status::Exited(255) if phase == "connect" => Outcome::Unreachable,
            Status::Exited(code) => Outcome::Failed { code: Some(code) },
            Status::Failed(code) => Outcome::Failed { code },
        };
        if report.outcome != Outcome::Ok {
            report.stderr_tail = self.tail.lock().unwrap().iter().cloned().collect();
        }
        let took = phase_started.elapsed();
        self.ui.step_finished(self.host, phase, &self.step.runs_on, &report.outcome, took);
    }
}

/// The process of a step, built by xshell from the plan's words (no shell involved) and
/// turned into a std `Command` so its output can be streamed line by line.
fn command(sh: &Shell, argv: &[String]) -> Command {
    let (program, args) = argv.split_first().expect("a step has a program");
    Command::from(cmd!(sh, "{program} {args...}"))
}

/// Calls `f` with every line of `pipe`, invalid UTF-8 replaced.
fn for_each_line(pipe: impl Read, mut f: impl FnMut(&str)) {
    for line in BufReader::new(pipe).split(b'\n') {
        let Ok(line) = line else { break };
        f(&String::from_utf8_lossy(&line));
    }
}

/// Parses rsync's `sent 1,234 bytes  received 56 bytes  ...` line.
pub fn rsync_bytes_sent(line: &str) -> Option<u64> {
    let rest = line.strip_prefix("sent ")?;
    let (number, rest) = rest.split_once(' ')?;
    if !rest.starts_with("bytes") {
        return None;
    }
    let digits: String = number.chars().filter(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// What happens during a run, as it happens: the caller shows it (spinners, plain lines,
/// JSON events) or ignores it. Every method has a no-op default.
pub trait Events: Sync {
    /// A host (or the builder, for setup and teardown) starts a step or a phase of one.
    fn step_started(&self, _host: &str, _step: &str, _runs_on: &str) {}
    /// A step or phase ended, with its outcome and how long it took.
    fn step_finished(
        &self,
        _host: &str,
        _step: &str,
        _runs_on: &str,
        _outcome: &Outcome,
        _took: Duration,
    ) {
    }
    /// A line a step wrote (`stream` is `stdout` or `stderr`), or a note of the run's own
    /// (`warning`); `step` is `None` for lines the builder wrote outside any step.
    fn output(&self, _host: &str, _step: Option<&str>, _stream: &str, _line: &str) {}
    /// A host is done, with its recap line.
    fn host_done(&self, _report: &HostReport) {}
    /// The run is over.
    fn finish(&self) {}
}

/// Events nobody watches.
pub struct Quiet;

impl Events for Quiet {}

pub fn outcome_name(outcome: &Outcome) -> &'static str {
    match outcome {
        Outcome::Ok => "ok",
        Outcome::Failed { .. } => "failed",
        Outcome::Unreachable => "unreachable",
        Outcome::Skipped(_) => "skipped",
    }
}

pub fn exit_status(outcome: &Outcome) -> Option<i32> {
    match outcome {
        Outcome::Ok => Some(0),
        Outcome::Failed { code } => *code,
        Outcome::Unreachable => Some(255),
        Outcome::Skipped(_) => None,
    }
}

impl Report {
    /// The recap table and, for every host that did not succeed, its step and last stderr
    /// lines.
    pub fn recap(&self) -> String {
        use std::fmt::Write as _;
        let mut rows: Vec<&HostReport> = self.setup_failure.iter().collect();
        rows.extend(&self.hosts);
        let width = rows.iter().map(|r| r.host.len()).max().unwrap_or(4).max(4);
        let mut out = format!(
            "\n{:<width$}  {:<10}  {:<11}  {:>9}  {:>10}\n",
            "HOST", "STEP", "RESULT", "DURATION", "SENT"
        );
        for row in &rows {
            let _ = writeln!(
                out,
                "{:<width$}  {:<10}  {:<11}  {:>8.2}s  {:>10}",
                row.host,
                if row.step.is_empty() { "-" } else { &row.step },
                outcome_name(&row.outcome),
                row.duration.as_secs_f64(),
                human_bytes(row.bytes_sent)
            );
        }
        for row in &rows {
            match &row.outcome {
                Outcome::Ok => {}
                Outcome::Skipped(reason) => {
                    let _ = writeln!(out, "\n{}: skipped: {reason}", row.host);
                }
                Outcome::Failed { code } => {
                    let code =
                        code.map_or("killed by a signal".to_owned(), |c| format!("exit {c}"));
                    let _ = writeln!(
                        out,
                        "\n{}: {} failed ({code}); last stderr lines:",
                        row.host, row.step
                    );
                    for line in &row.stderr_tail {
                        let _ = writeln!(out, "    {line}");
                    }
                }
                Outcome::Unreachable => {
                    let _ = writeln!(
                        out,
                        "\n{}: {} unreachable; last stderr lines:",
                        row.host, row.step
                    );
                    for line in &row.stderr_tail {
                        let _ = writeln!(out, "    {line}");
                    }
                }
            }
        }
        let _ = writeln!(
            out,
            "\n{}: {} of {} hosts ok in {:.2}s (exit code {})",
            self.command,
            self.hosts.iter().filter(|h| h.outcome == Outcome::Ok).count(),
            self.hosts.len(),
            self.duration.as_secs_f64(),
            self.exit_code
        );
        out
    }

    /// The final JSON object of `--json`.
    pub fn summary(&self) -> serde_json::Value {
        let host = |r: &HostReport| {
            json!({
                "host": r.host,
                "last_step": r.step,
                "result": outcome_name(&r.outcome),
                "exit_code": exit_status(&r.outcome),
                "duration_ms": r.duration.as_millis() as u64,
                "bytes_sent": r.bytes_sent,
                "stderr_tail": r.stderr_tail,
                "reason": match &r.outcome { Outcome::Skipped(why) => Some(why.as_str()), _ => None },
            })
        };
        json!({
            "event": "summary",
            "command": self.command,
            "exit_code": self.exit_code,
            "duration_ms": self.duration.as_millis() as u64,
            "setup_failure": self.setup_failure.as_ref().map(host),
            "hosts": self.hosts.iter().map(host).collect::<Vec<_>>(),
        })
    }
}

fn human_bytes(bytes: u64) -> String {
    match bytes {
        0..1_000 => format!("{bytes} B"),
        1_000..1_000_000 => format!("{:.1} kB", bytes as f64 / 1e3),
        _ => format!("{:.1} MB", bytes as f64 / 1e6),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::HostPlan;

    #[test]
    fn rsync_summary_lines_are_parsed() {
        assert_eq!(
            rsync_bytes_sent("sent 10,812,345 bytes  received 35 bytes  7,208,253.33 bytes/sec"),
            Some(10_812_345)
        );
        assert_eq!(
            rsync_bytes_sent("sent 64 bytes  received 12 bytes  152.00 bytes/sec"),
            Some(64)
        );
        assert_eq!(rsync_bytes_sent("sent the file"), None);
    }

    fn report(host: &str, outcome: Outcome) -> HostReport {
        HostReport { outcome, ..HostReport::new(host) }
    }

    #[test]
    fn exit_codes_tell_failed_from_unreachable() {
        let ok = report("a", Outcome::Ok);
        let failed = report("b", Outcome::Failed { code: Some(1) });
        let gone = report("c", Outcome::Unreachable);
        assert_eq!(exit_code(None, std::slice::from_ref(&ok)), EXIT_OK);
        assert_eq!(exit_code(None, &[ok.clone(), failed.clone()]), EXIT_FAILED);
        assert_eq!(exit_code(None, &[ok, gone.clone()]), EXIT_UNREACHABLE);
        assert_eq!(exit_code(None, &[failed, gone.clone()]), EXIT_FAILED_AND_UNREACHABLE);
        assert_eq!(exit_code(Some(&gone), &[]), EXIT_UNREACHABLE);
        let locked = report("b", Outcome::Failed { code: Some(LOCK_HELD_STATUS) });
        assert_eq!(exit_code(Some(&locked), &[]), EXIT_LOCKED);
    }

    #[test]
    fn an_interrupt_stops_the_running_step_skips_the_rest_and_still_tears_down() {
        let dir = std::env::temp_dir().join(format!("fling-interrupt-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // Removed however the test ends.
        struct Remove<'a>(&'a std::path::Path);
        impl Drop for Remove<'_> {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(self.0);
            }
        }
        let _remove = Remove(&dir);
        let d = dir.display();
        let step = |name: &'static str, script: String| Step {
            name,
            runs_on: "client".into(),
            argv: vec!["sh".into(), "-c".into(), script],
            kind: StepKind::Work,
            stdin: None,
            phases: Vec::new(),
            what: Vec::new(),
            script: None,
        };
        let plan = Plan {
            command: "test".into(),
            builder: "builder".into(),
            setup: vec![step("connect", format!("mkdir {d}/lock"))],
            hosts: vec![
                HostPlan { host: "a".into(), steps: vec![step("work", "exec sleep 20".into())] },
                HostPlan { host: "b".into(), steps: vec![step("work", format!("touch {d}/b"))] },
            ],
            teardown: vec![step("release", format!("rmdir {d}/lock"))],
            session: None,
            journal: None,
        };
        let options = Options { parallel: 1, connect_parallel: 1, env: Vec::new() };
        let interrupter = std::thread::spawn(|| {
            std::thread::sleep(Duration::from_millis(500));
            interrupt::interrupt();
        });
        let started = Instant::now();
        let report = execute(&Shell::new().unwrap(), &plan, &options, &Quiet);
        interrupter.join().unwrap();
        assert!(started.elapsed() < Duration::from_secs(10), "the running step was not stopped");
        assert_eq!(report.exit_code, interrupt::EXIT_INTERRUPTED);
        assert!(matches!(report.hosts[0].outcome, Outcome::Failed { .. }), "{:?}", report.hosts);
        assert_eq!(report.hosts[1].outcome, Outcome::Skipped(INTERRUPTED.into()));
        assert!(!dir.join("b").exists(), "a host started after the interrupt");
        assert!(!dir.join("lock").exists(), "the teardown did not run");
    }

    #[test]
    fn the_recap_names_failed_hosts_with_their_stderr() {
        let mut failed = report("node2", Outcome::Failed { code: Some(3) });
        failed.step = "install".into();
        failed.stderr_tail = vec!["health check failed".into()];
        let report = Report {
            command: "deploy install".into(),
            hosts: vec![report("node1", Outcome::Ok), failed],
            setup_failure: None,
            exit_code: EXIT_FAILED,
            duration: Duration::from_secs(1),
        };
        let recap = report.recap();
        assert!(
            recap.contains(
                "node2: install failed (exit 3); last stderr lines:\n    health check failed"
            ),
            "{recap}"
        );
        assert!(recap.contains("1 of 2 hosts ok"), "{recap}");
        assert_eq!(report.summary()["hosts"][1]["result"], "failed");
    }
}
