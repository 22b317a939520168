//! The installer's errors. Each names what was being done and the file, archive entry, service
//! or command involved, so a message read in a deploy log on another machine is enough to act on.

use camino::Utf8PathBuf;

/// Everything that can go wrong while installing or managing releases.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A filesystem operation failed.
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: Utf8PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The digest list is malformed.
    #[error("read digest list {path}: line {line}: {message}")]
    DigestList { path: Utf8PathBuf, line: usize, message: String },
    /// A package does not match the digest list, is missing, or is not listed.
    #[error("verify {file}: {message}")]
    Digest { file: Utf8PathBuf, message: String },
    /// An archive is corrupt or holds an entry that is not allowed.
    #[error("unpack {archive}: {message}")]
    Archive { archive: Utf8PathBuf, message: String },
    /// A package is well formed as an archive but not as a package of this project.
    #[error("package {package}: {message}")]
    Package { package: String, message: String },
    /// The overlay directory holds something that cannot be placed into a release.
    #[error("overlay {path}: {message}")]
    Overlay { path: Utf8PathBuf, message: String },
    /// A service definition or health check declaration cannot be used.
    #[error("service {service}: {message}")]
    Service { service: String, message: String },
    /// Neither systemd nor SMF was found and no override was given.
    #[error(
        "detect the service manager: neither {systemd} (systemd) nor {smf} (SMF) exists; \
         pass --service-manager systemd|smf"
    )]
    UnknownServiceManager { systemd: Utf8PathBuf, smf: Utf8PathBuf },
    /// A command could not be started.
    #[error("{description}: run `{command}`: {source}")]
    Spawn {
        description: String,
        command: String,
        #[source]
        source: std::io::Error,
    },
    /// A command ran and failed.
    #[error("{description}: `{command}` failed ({status}): {stderr}")]
    Command { description: String, command: String, status: String, stderr: String },
    /// Another install holds the host's lock.
    #[error("take the install lock {path}: held by another install ({holder})")]
    Locked { path: Utf8PathBuf, holder: String },
    /// A release id does not name an unpacked release, or there is none to act on.
    #[error("{action}: {message}")]
    Release { action: &'static str, message: String },
    /// The on-host state file cannot be read or written.
    #[error("state {path}: {message}")]
    State { path: Utf8PathBuf, message: String },
    /// A service did not become active and healthy; the previous release was restored.
    #[error(
        "activate release {release}: service {service} is not healthy: {reason}; {outcome}\n\
         last log lines of {service}:\n{logs}"
    )]
    Unhealthy { release: String, service: String, reason: String, outcome: String, logs: String },
    /// `fetch`: an object could not be downloaded from the store.
    #[error("fetch {file} from the store: {message}")]
    Fetch { file: String, message: String },
    /// `install --expect-release`: the active release is not the one the deploy plan saw.
    #[error(
        "the active release is {found}, not {expected} as the deploy plan saw: nothing was \
         changed; plan again"
    )]
    StateChanged { expected: String, found: String },
}

/// The installer's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Builds the closure that `map_err` needs to turn an I/O error into [`Error::Io`].
pub(crate) fn io(
    action: &'static str,
    path: impl Into<Utf8PathBuf>,
) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.into();
    move |source| Error::Io { action, path, source }
}
