//! How a fling run shows itself: spinners on a terminal, host-prefixed lines otherwise, or one
//! JSON event per line with `--json`.

use std::io::{IsTerminal, Write};
use std::sync::Mutex;
use std::time::Duration;

use flotilla_fling::exec::{exit_status, outcome_name, Events, HostReport, Outcome};
use flotilla_fling::plan::Plan;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use serde_json::json;

/// Where progress goes: spinners on a terminal, host-prefixed lines otherwise, or JSON events.
pub enum Ui {
    Json(Mutex<std::io::Stdout>),
    Bars { multi: MultiProgress, bars: Vec<(String, ProgressBar)> },
    Plain(Mutex<std::io::Stderr>),
}

impl Ui {
    pub fn new(json: bool, plan: &Plan) -> Ui {
        if json {
            return Ui::Json(Mutex::new(std::io::stdout()));
        }
        if !std::io::stderr().is_terminal() {
            return Ui::Plain(Mutex::new(std::io::stderr()));
        }
        let multi = MultiProgress::new();
        let style = ProgressStyle::with_template("{spinner} {prefix:>12} {wide_msg} {elapsed:>4}")
            .expect("the template is valid");
        let mut names = vec![plan.builder.clone()];
        names.extend(plan.hosts.iter().map(|h| h.host.clone()).filter(|h| *h != plan.builder));
        let bars = names
            .into_iter()
            .map(|name| {
                let bar = multi.add(ProgressBar::new_spinner());
                bar.set_style(style.clone());
                bar.set_prefix(name.clone());
                bar.set_message("waiting");
                bar.enable_steady_tick(Duration::from_millis(120));
                (name, bar)
            })
            .collect();
        Ui::Bars { multi, bars }
    }

    fn bar(&self, host: &str) -> Option<&ProgressBar> {
        match self {
            Ui::Bars { bars, .. } => bars.iter().find(|(n, _)| n == host).map(|(_, b)| b),
            _ => None,
        }
    }

    fn event(&self, value: serde_json::Value) {
        if let Ui::Json(out) = self {
            let mut out = out.lock().unwrap();
            let _ = writeln!(out, "{value}");
        }
    }
}

impl Events for Ui {
    fn output(&self, host: &str, step: Option<&str>, stream: &str, text: &str) {
        match self {
            Ui::Json(_) => {
                let mut event =
                    json!({"event": "output", "host": host, "stream": stream, "line": text});
                if let Some(step) = step {
                    event["step"] = step.into();
                }
                self.event(event)
            }
            Ui::Bars { multi, .. } => {
                let _ = multi.println(format!("[{host}] {text}"));
            }
            Ui::Plain(err) => {
                let _ = writeln!(err.lock().unwrap(), "[{host}] {text}");
            }
        }
    }

    fn step_started(&self, host: &str, step: &str, runs_on: &str) {
        match self {
            Ui::Json(_) => self.event(json!({
                "event": "step", "host": host, "step": step, "runs_on": runs_on,
                "status": "started",
            })),
            Ui::Bars { .. } => {
                if let Some(bar) = self.bar(host) {
                    bar.set_message(format!("{step} (on {runs_on})"));
                }
            }
            Ui::Plain(err) => {
                let _ = writeln!(err.lock().unwrap(), "[{host}] {step} ...");
            }
        }
    }

    fn step_finished(
        &self,
        host: &str,
        step: &str,
        runs_on: &str,
        outcome: &Outcome,
        took: Duration,
    ) {
        let status = outcome_name(outcome);
        match self {
            Ui::Json(_) => self.event(json!({
                "event": "step", "host": host, "step": step, "runs_on": runs_on,
                "status": status, "exit_code": exit_status(outcome),
                "duration_ms": took.as_millis() as u64,
            })),
            Ui::Bars { .. } => {}
            Ui::Plain(err) => {
                let _ = writeln!(
                    err.lock().unwrap(),
                    "[{host}] {step} {status} in {:.2}s",
                    took.as_secs_f64()
                );
            }
        }
    }

    fn host_done(&self, report: &HostReport) {
        if let Some(bar) = self.bar(&report.host) {
            bar.finish_with_message(format!("{} {}", report.step, outcome_name(&report.outcome)));
        }
    }

    fn finish(&self) {
        if let Ui::Bars { bars, .. } = self {
            for (_, bar) in bars {
                if !bar.is_finished() {
                    bar.finish_with_message("done");
                }
            }
        }
    }
}

/// A UI that writes what one step prints on its standard output to this process's standard
/// output as it is, with no host prefix (the graph of `build dot`, for graphviz), and
/// everything else to `ui`.
pub struct StdoutOf<E> {
    pub step: &'static str,
    pub ui: E,
}

impl<E: Events> Events for StdoutOf<E> {
    fn output(&self, host: &str, step: Option<&str>, stream: &str, text: &str) {
        if step == Some(self.step) && stream == "stdout" {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{text}");
            return;
        }
        self.ui.output(host, step, stream, text)
    }

    fn step_started(&self, host: &str, step: &str, runs_on: &str) {
        self.ui.step_started(host, step, runs_on)
    }

    fn step_finished(
        &self,
        host: &str,
        step: &str,
        runs_on: &str,
        outcome: &Outcome,
        took: Duration,
    ) {
        self.ui.step_finished(host, step, runs_on, outcome, took)
    }

    fn host_done(&self, report: &HostReport) {
        self.ui.host_done(report)
    }

    fn finish(&self) {
        self.ui.finish()
    }
}
