//! What the example services (`node-agent` and `control-plane`) share: command-line handling,
//! configuration loading with errors that name the file, line and field, one-line logging, a small
//! HTTP/1.1 server and client over std sockets, and clean shutdown on SIGTERM.
//!
//! Everything here is synchronous on purpose: the services handle a handful of requests a second,
//! and threads keep the packaged binaries small and their build fast.

pub mod cli;
pub mod client;
pub mod config;
pub mod http;
pub mod log;
pub mod shutdown;
/// The rack secret's share format (its own crate, shared with the overlay generator).
pub use rack_secret as rack;
#[cfg(any(test, feature = "test-support"))]
pub mod testing;
pub mod tls;

use serde::{Deserialize, Serialize};
use std::io;

/// The exit status for a bad or missing configuration (`EX_CONFIG` from sysexits.h).
///
/// The systemd units list it in `RestartPreventExitStatus=` so that a broken config file stops
/// the service instead of restarting it in a loop.
pub const EXIT_CONFIG: u8 = 78;

/// The body of `GET /health`, served by every service and read by the control plane.
#[derive(Clone, Debug, Deserialize, Eq, PartialEq, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Health {
    /// The service name, such as `node-agent`.
    pub service: String,
    /// The version of the running binary.
    pub version: String,
    /// The node identity: `node` from the config, or the host name when unset.
    pub node: String,
    /// `ok` while the service serves requests.
    pub status: String,
}

impl Health {
    /// The health document of a running service.
    pub fn ok(service: &str, version: &str, node: &str) -> Health {
        Health {
            service: service.to_owned(),
            version: version.to_owned(),
            node: node.to_owned(),
            status: "ok".to_owned(),
        }
    }
}

/// The host name of this machine, used as the node identity when the config sets none.
pub fn hostname() -> io::Result<String> {
    // POSIX limits host names to 255 bytes; one more keeps room for the terminating NUL.
    let mut buf = [0u8; 256];
    // SAFETY: the pointer and length describe `buf`, which outlives the call, and gethostname
    // writes at most `len` bytes into it.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    match String::from_utf8(buf[..end].to_vec()) {
        Ok(name) if !name.is_empty() => Ok(name),
        Ok(_) => Err(io::Error::new(io::ErrorKind::InvalidData, "the host name is empty")),
        Err(_) => Err(io::Error::new(io::ErrorKind::InvalidData, "the host name is not UTF-8")),
    }
}

/// A bound service ready to serve: its listener and its request handler.
pub struct Service {
    pub server: http::Server,
    pub handler: Box<dyn Fn(&http::Request) -> http::Response + Send + Sync>,
}

/// The whole life of a service binary: parse the command line, load the config with `load`, and
/// either stop there (`--check`) or bind with `start`, serve until SIGTERM, and exit 0.
///
/// Config problems exit with [`EXIT_CONFIG`], anything else that stops the service from starting
/// with 1, each after one log line that says what failed.
pub fn main<C>(
    service: &'static str,
    version: &'static str,
    load: impl FnOnce(&camino::Utf8Path) -> Result<C, config::ConfigError>,
    start: impl FnOnce(C) -> Result<Service, String>,
) -> std::process::ExitCode {
    use std::process::ExitCode;

    log::init(service);
    let (path, check) = match cli::parse(std::env::args_os().skip(1)) {
        Ok(cli::Command::Run { config, check }) => (config, check),
        Ok(cli::Command::Help) => {
            print!("{}", cli::usage(service));
            return ExitCode::SUCCESS;
        }
        Ok(cli::Command::Version) => {
            println!("{service} {version}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprint!("{service}: {e}\n\n{}", cli::usage(service));
            return ExitCode::from(2);
        }
    };
    info!("{service} {version} starting with config {path}");
    let config = match load(&path) {
        Ok(config) => config,
        Err(e) => {
            error!("{e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if check {
        info!("config {path} is valid");
        return ExitCode::SUCCESS;
    }
    let Service { server, handler } = match start(config) {
        Ok(service) => service,
        Err(e) => {
            error!("{e}");
            return ExitCode::FAILURE;
        }
    };
    if let Err(e) = shutdown::stop_on_signal(server.stopper()) {
        error!("install the SIGTERM handler: {e}");
        return ExitCode::FAILURE;
    }
    info!("listening on {}", server.local_addr());
    server.serve(handler);
    info!("{service} stopped");
    ExitCode::SUCCESS
}
