//! The node agent: runs on every server (like Omicron's sled-agent) and reports the node's
//! health to the control plane. With `[tls]` configured it also serves, on a second listener
//! that requires a client certificate from the cluster CA, the node's share of the rack secret
//! (`GET /share`), which the control plane gathers to unlock the rack.

pub mod config;

use std::net::SocketAddr;

use config::{Config, SecretPaths};
use service_common::config::TlsPaths;
use service_common::http::{Request, Response, Server};
use service_common::rack::ShareFile;
use service_common::{info, warn, Health, Service};

/// The service name, as in `/health` and the package manifest.
pub const SERVICE: &str = "node-agent";
/// The version of this binary.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Binds the agent's listeners and builds its request handler.
pub fn start(config: Config) -> Result<Service, String> {
    let node = match config.node {
        Some(node) => node,
        None => service_common::hostname().map_err(|e| {
            format!("determine the node name from the host name: {e}; set `node` in the config")
        })?,
    };
    let share = load_share(config.secret.as_ref())?;
    if let (Some(tls), Some(listen)) = (&config.tls, config.tls_listen) {
        let Service { server, handler } = tls_service(&node, tls, listen, share)?;
        info!("serving the TLS API on {}", server.local_addr());
        // The TLS listener lives as long as the process; SIGTERM stops the plain listener,
        // after which the process exits and takes this thread with it.
        std::thread::Builder::new()
            .name("tls-api".to_owned())
            .spawn(move || server.serve(handler))
            .map_err(|e| format!("start the TLS API thread: {e}"))?;
    } else if share.is_some() {
        warn!("a share is configured but no [tls]: the share is not served");
    }
    let server = Server::bind(config.listen).map_err(|e| e.to_string())?;
    let health = Health::ok(SERVICE, VERSION, &node);
    let handler = move |req: &Request| match req.path() {
        "/health" if req.is_get() => Response::json(200, &health),
        "/health" => Response::method_not_allowed("GET, HEAD"),
        path => Response::not_found(path),
    };
    Ok(Service { server, handler: Box::new(handler) })
}

/// Reads the node's share. It is read once at start: a service that cannot read its own secret
/// should fail its start (and so the deploy's health check) rather than fail at unlock time.
pub fn load_share(secret: Option<&SecretPaths>) -> Result<Option<ShareFile>, String> {
    let Some(secret) = secret else { return Ok(None) };
    let bytes = std::fs::read(&secret.share)
        .map_err(|e| format!("read the rack secret share {}: {e}", secret.share))?;
    let share = ShareFile::parse(&bytes)
        .map_err(|e| format!("read the rack secret share {}: {e}", secret.share))?;
    info!(
        "loaded a share of the rack secret ({} of {} unlock it)",
        share.threshold, share.total_shares
    );
    Ok(Some(share))
}

/// The mutually authenticated API: `GET /health` and `GET /share`, only to clients whose
/// certificate the cluster CA signed.
pub fn tls_service(
    node: &str,
    tls: &TlsPaths,
    listen: SocketAddr,
    share: Option<ShareFile>,
) -> Result<Service, String> {
    let tls_config = service_common::tls::server_config(tls).map_err(|e| e.to_string())?;
    let server = Server::bind(listen).map_err(|e| e.to_string())?.with_tls(tls_config);
    let health = Health::ok(SERVICE, VERSION, node);
    let handler = move |req: &Request| match (req.path(), &share) {
        ("/health", _) if req.is_get() => Response::json(200, &health),
        ("/share", Some(share)) if req.is_get() => {
            info!("handing the rack secret share to {}", req.peer);
            Response::json(200, share)
        }
        ("/share", None) if req.is_get() => Response::text(404, "this node holds no share"),
        ("/health" | "/share", _) => Response::method_not_allowed("GET, HEAD"),
        (path, _) => Response::not_found(path),
    };
    Ok(Service { server, handler: Box::new(handler) })
}
