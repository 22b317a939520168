//! The node agent: runs on every server (like Omicron's sled-agent) and reports the node's
//! health to the control plane. Later it serves the node's share of the rack secret over mutually
//! authenticated TLS; its config already names the files for that.

pub mod config;

use config::Config;
use service_common::http::{Request, Response, Server};
use service_common::{Health, Service};

/// The service name, as in `/health` and the package manifest.
pub const SERVICE: &str = "node-agent";
/// The version of this binary.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Binds the agent's listener and builds its request handler.
pub fn start(config: Config) -> Result<Service, String> {
    let node = match config.node {
        Some(node) => node,
        None => service_common::hostname().map_err(|e| {
            format!("determine the node name from the host name: {e}; set `node` in the config")
        })?,
    };
    let server = Server::bind(config.listen).map_err(|e| e.to_string())?;
    let health = Health::ok(SERVICE, VERSION, &node);
    let handler = move |req: &Request| match req.path() {
        "/health" if req.is_get() => Response::json(200, &health),
        "/health" => Response::method_not_allowed("GET, HEAD"),
        path => Response::not_found(path),
    };
    Ok(Service { server, handler: Box::new(handler) })
}
