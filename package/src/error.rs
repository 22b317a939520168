//! The library's error type: every variant says what was being done and names the file, line,
//! package or field involved.

use std::io;

use camino::Utf8PathBuf;

use crate::manifest::PackageName;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The manifest is not valid TOML or does not fit the schema (unknown key, bad name, ...).
    #[error("{path}:{line}:{column}: {message}")]
    Parse { path: Utf8PathBuf, line: usize, column: usize, message: String },

    /// The manifest parses but one package's field is wrong.
    /// With the package's `setup_hint`, printed on a line of its own.
    #[error("{location}package `{package}`: {field}: {message}{}", Hint(hint))]
    Invalid {
        location: String,
        package: PackageName,
        field: String,
        message: String,
        hint: Option<String>,
    },

    /// A stored target is missing or malformed, or a preset is unknown.
    #[error("{0}")]
    Target(String),

    /// A request that does not fit the manifest (an unknown `--only` package, ...).
    #[error("{0}")]
    Request(String),

    #[error("{what} {path}: {source}")]
    Io {
        what: String,
        path: Utf8PathBuf,
        #[source]
        source: io::Error,
    },

    #[error(transparent)]
    Atomic(#[from] flotilla_contracts::atomic::AtomicWriteError),

    /// Packaging one output failed; the message names the step.
    #[error("package `{package}`: {message}")]
    Package { package: PackageName, message: String },

    /// A cargo invocation failed; `stderr` is the end of what it printed.
    #[error("{description} failed: {message}")]
    Cargo { description: String, message: String },

    /// Some packages failed; each was reported through the progress trait.
    #[error("{} package(s) failed: {}", .0.len(), .0.iter().map(|p| p.as_str()).collect::<Vec<_>>().join(", "))]
    Failed(Vec<PackageName>),
}

/// A package's `setup_hint` after an error's message: `\n  hint: ...`, or nothing.
pub struct Hint<'a>(pub &'a Option<String>);

impl std::fmt::Display for Hint<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(hint) => write!(f, "\n  hint: {hint}"),
            None => Ok(()),
        }
    }
}
