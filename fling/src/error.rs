//! The errors of the fling library: what went wrong before any host was reached. What happens
//! on hosts is reported per host in [`crate::exec::Report`], not as an error.

use camino::Utf8PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The deployment config could not be read.
    #[error("read deployment config {path}: {source}")]
    ReadConfig { path: Utf8PathBuf, source: std::io::Error },
    /// The deployment config is invalid: file, line, column and field.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// `--servers` names a server the config does not deploy to, or one twice.
    #[error("--servers: {0}")]
    Select(String),
    /// A path of the config cannot be resolved on this machine.
    #[error("{field}: {message}")]
    Path { field: &'static str, message: String },
    /// The overlay generators could not be built or run.
    #[error("{what}: {message}")]
    Overlay { what: String, message: String },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
