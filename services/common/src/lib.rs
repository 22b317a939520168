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
#[cfg(any(test, feature = "test-support"))]
pub mod testing;

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
