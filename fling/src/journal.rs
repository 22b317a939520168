//! The journal of runs, kept on the builder: one JSON line per host of every run that reached
//! servers (`fling history` shows the last runs; `install --retry-failed` reruns only the
//! servers that failed or were unreachable in the last install). The file stays under
//! [`MAX_BYTES`]: appending beyond it drops the oldest half.
//!
//! A line: `{"run", "at" (seconds since the epoch), "who", "command", "host", "result"
//! (ok|failed|unreachable|skipped), "step", "exit_code", "duration_ms", "bytes_sent",
//! "reason"}`.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use super::exec::{self, HostReport, Outcome, Report};

/// The journal's file name in the builder's copy of the sources.
pub const JOURNAL_FILE: &str = ".fling-journal.jsonl";
/// The bound on the journal's size.
pub const MAX_BYTES: u64 = 1 << 20;

/// One host's outcome in one run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub run: String,
    pub at: u64,
    pub who: String,
    pub command: String,
    pub host: String,
    pub result: String,
    pub step: String,
    pub exit_code: Option<i32>,
    pub duration_ms: u64,
    pub bytes_sent: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// What a run's journal lines share.
#[derive(Debug, Clone)]
pub struct RunInfo {
    pub run: String,
    pub who: String,
    pub at: u64,
}

fn entry(info: &RunInfo, command: &str, host: &HostReport) -> Entry {
    Entry {
        run: info.run.clone(),
        at: info.at,
        who: info.who.clone(),
        command: command.to_owned(),
        host: host.host.clone(),
        result: exec::outcome_name(&host.outcome).to_owned(),
        step: host.step.clone(),
        exit_code: exec::exit_status(&host.outcome),
        duration_ms: host.duration.as_millis() as u64,
        bytes_sent: host.bytes_sent,
        reason: match &host.outcome {
            Outcome::Skipped(reason) => Some(reason.clone()),
            _ => host.stderr_tail.last().cloned(),
        },
    }
}

/// The journal lines of a run's report: the builder's when setup failed, then every host's.
pub fn lines(info: &RunInfo, report: &Report) -> String {
    let mut out = String::new();
    for host in report.setup_failure.iter().chain(&report.hosts) {
        let line = serde_json::to_string(&entry(info, &report.command, host))
            .expect("a journal entry serializes");
        out.push_str(&line);
        out.push('\n');
    }
    out
}

/// The entries of a journal's text; lines that are not entries (a line cut by the size bound,
/// say) are left out.
pub fn parse(text: &str) -> Vec<Entry> {
    text.lines().filter_map(|line| serde_json::from_str(line).ok()).collect()
}

/// The entries grouped by run, in the order the runs began, the last `count` runs only.
pub fn last_runs(entries: &[Entry], count: usize) -> Vec<Vec<&Entry>> {
    let mut runs: Vec<Vec<&Entry>> = Vec::new();
    for e in entries {
        match runs.iter_mut().find(|r| r[0].run == e.run) {
            Some(run) => run.push(e),
            None => runs.push(vec![e]),
        }
    }
    let skip = runs.len().saturating_sub(count);
    runs.into_iter().skip(skip).collect()
}

/// The servers to retry: those that failed or were unreachable in any plan of the last run
/// that installed (a rolling install's batches, confirmations and quorum checks are one run),
/// in the order the journal names them; with that run's id. `None` when no run installed.
pub fn to_retry<'a>(entries: &'a [Entry], command: &str) -> Option<(&'a Entry, Vec<String>)> {
    let last = entries.iter().rev().find(|e| e.command == command)?;
    let mut hosts: Vec<String> = Vec::new();
    for e in entries.iter().filter(|e| e.run == last.run) {
        if matches!(e.result.as_str(), "failed" | "unreachable") && !hosts.contains(&e.host) {
            hosts.push(e.host.clone());
        }
    }
    Some((last, hosts))
}

/// A time since the epoch as `YYYY-MM-DD HH:MM:SS` UTC.
pub fn utc(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// `history` for people: per run, when, who, what, and each host's result.
pub fn render(runs: &[Vec<&Entry>]) -> String {
    if runs.is_empty() {
        return "no runs in the journal yet\n".to_owned();
    }
    let mut out = String::new();
    for run in runs {
        let first = run[0];
        let mut commands: Vec<&str> = Vec::new();
        for e in run {
            if !commands.contains(&e.command.as_str()) {
                commands.push(&e.command);
            }
        }
        let _ = writeln!(
            out,
            "{}  {}  by {}  (run {})",
            utc(first.at),
            commands.join(", "),
            first.who,
            first.run
        );
        for e in run {
            let mut line = format!("  {:<14} {:<12} {:<14}", e.host, e.result, e.command);
            if e.result != "ok" {
                let _ = write!(line, " at {}", e.step);
                if let Some(code) = e.exit_code.filter(|c| *c != 0) {
                    let _ = write!(line, ", exit {code}");
                }
                if let Some(reason) = &e.reason {
                    let _ = write!(line, ": {reason}");
                }
            } else {
                let _ = write!(line, " {:.1} s", e.duration_ms as f64 / 1000.0);
            }
            let _ = writeln!(out, "{}", line.trim_end());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(run: &str, command: &str, host: &str, result: &str) -> Entry {
        Entry {
            run: run.into(),
            at: 1_796_300_000,
            who: "me@client".into(),
            command: command.into(),
            host: host.into(),
            result: result.into(),
            step: "install".into(),
            exit_code: Some(if result == "ok" { 0 } else { 2 }),
            duration_ms: 1200,
            bytes_sent: 0,
            reason: None,
        }
    }

    #[test]
    fn retry_takes_the_failed_and_unreachable_of_the_last_install_run() {
        let entries = vec![
            e("r1", "deploy install", "node1", "failed"),
            e("r2", "deploy install", "node1", "ok"),
            e("r2", "deploy install", "node2", "unreachable"),
            e("r2", "deploy install", "node3", "skipped"),
            e("r2", "deploy confirm", "node1", "failed"),
            e("r3", "deploy status", "node3", "failed"),
        ];
        let (last, hosts) = to_retry(&entries, "deploy install").unwrap();
        assert_eq!(last.run, "r2");
        assert_eq!(hosts, ["node2", "node1"]);
        assert!(to_retry(&entries, "deploy uninstall").is_none());
        let runs = last_runs(&entries, 2);
        assert_eq!(runs.len(), 2);
        assert_eq!(runs[0][0].run, "r2");
        assert_eq!(runs[1].len(), 1);
    }

    #[test]
    fn lines_round_trip_and_cut_lines_are_skipped() {
        let one = serde_json::to_string(&e("r1", "deploy install", "node1", "ok")).unwrap();
        let text = format!("{{\"run\":\"cut\n{one}\n");
        assert_eq!(parse(&text), [e("r1", "deploy install", "node1", "ok")]);
    }

    #[test]
    fn utc_dates() {
        assert_eq!(utc(0), "1970-01-01 00:00:00");
        assert_eq!(utc(951_782_400), "2000-02-29 00:00:00");
        assert_eq!(utc(1_796_300_000), "2026-12-03 12:13:20");
    }
}
