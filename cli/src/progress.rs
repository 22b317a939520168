//! Packaging progress on the terminal: one indicatif line per package on a terminal, plain
//! `[package] message` lines otherwise (CI logs, pipes), so both read well.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::Duration;

use flotilla_package::build::{OutputReport, Progress};
use flotilla_package::manifest::PackageName;
use flotilla_package::plan::CargoBuild;
use flotilla_package::Error;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

pub enum TermProgress {
    Bars { multi: MultiProgress, bars: Mutex<HashMap<PackageName, ProgressBar>> },
    Lines,
}

impl TermProgress {
    pub fn new() -> Self {
        if std::io::stderr().is_terminal() {
            TermProgress::Bars { multi: MultiProgress::new(), bars: Mutex::new(HashMap::new()) }
        } else {
            TermProgress::Lines
        }
    }

    fn line(&self, package: &PackageName, message: &str) {
        match self {
            TermProgress::Bars { bars, .. } => {
                if let Some(bar) = bars.lock().unwrap().get(package) {
                    bar.set_message(message.to_owned());
                }
            }
            TermProgress::Lines => eprintln!("[{package}] {message}"),
        }
    }

    fn finish(&self, package: &PackageName, message: String) {
        match self {
            TermProgress::Bars { bars, .. } => {
                if let Some(bar) = bars.lock().unwrap().remove(package) {
                    bar.finish_with_message(message);
                }
            }
            TermProgress::Lines => eprintln!("[{package}] {message}"),
        }
    }
}

impl Progress for TermProgress {
    fn cargo_started(&self, build: &CargoBuild) {
        eprintln!("[cargo] {}", build.description());
    }

    fn cargo_finished(&self, build: &CargoBuild, elapsed: Duration) {
        eprintln!("[cargo] {} profile done in {:.1}s", build.profile(), elapsed.as_secs_f64());
    }

    fn started(&self, package: &PackageName, inputs: usize) {
        match self {
            TermProgress::Bars { multi, bars } => {
                let bar = multi.add(ProgressBar::new_spinner());
                bar.set_style(
                    ProgressStyle::with_template("{spinner} {prefix:.bold} {wide_msg}")
                        .expect("the template is valid"),
                );
                bar.set_prefix(package.to_string());
                bar.set_message(format!("{inputs} inputs"));
                bar.enable_steady_tick(Duration::from_millis(120));
                bars.lock().unwrap().insert(package.clone(), bar);
            }
            TermProgress::Lines => eprintln!("[{package}] started ({inputs} inputs)"),
        }
    }

    fn message(&self, package: &PackageName, message: &str) {
        self.line(package, message);
    }

    fn cache_hit(&self, package: &PackageName) {
        self.line(package, "cache hit");
    }

    fn done(&self, report: &OutputReport) {
        let outcome = format!("{:?}", report.outcome).to_lowercase();
        let file = report.path.file_name().unwrap_or("");
        let message = format!("{outcome} {file} ({})", human_size(report.size));
        self.finish(&report.package, message);
    }

    fn failed(&self, package: &PackageName, error: &Error, setup_hint: Option<&str>) {
        let mut message = format!("FAILED: {error}");
        if let Some(hint) = setup_hint {
            message.push_str(&format!("\n  hint: {}", hint.trim().replace('\n', "\n  ")));
        }
        self.finish(package, message);
    }
}

pub fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut size = bytes as f64;
    let mut unit = 0;
    while size >= 1024.0 && unit + 1 < UNITS.len() {
        size /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{size:.1} {}", UNITS[unit])
    }
}
