//! What the `flotilla-overlay` binary is asked to do, and doing it.
//!
//! `cargo xtask fling overlay --generate-here` parses the deployment config, runs its own
//! simple generators and hands everything the cluster generators need to this crate's binary
//! as one JSON [`Request`] on standard input. Unknown fields are refused, so an xtask and a
//! binary from different commits fail loudly instead of dropping a setting. [`run`] generates
//! the overlays and replaces `out_dir` as a whole, so a failed run never leaves a mix of old
//! and new files for the deploy to push.

use std::fs;
use std::io;

use camino::{Utf8Component, Utf8Path};

use crate::{
    generate, template, write, Cluster, Config, Fate, Node, Overlay, OverlayError, Summary,
};

pub use flotilla_contracts::overlay::{Request, ServerRequest};

/// Parses a request; `source_name` (such as `stdin`) is named in the error, along with the
/// field, line and column serde reports.
pub fn parse_request(source_name: &str, text: &str) -> Result<Request, OverlayError> {
    serde_json::from_str(text).map_err(|e| OverlayError::Request {
        source_name: source_name.to_owned(),
        message: e.to_string(),
    })
}

/// The cluster generators' configuration, with the templates read from `templates_dir`.
pub fn config_of(request: &Request) -> Result<Config, OverlayError> {
    let nodes = request
        .servers
        .iter()
        .map(|s| Node {
            name: s.name.clone(),
            addresses: s.addresses.clone(),
            vars: s.vars.clone(),
        })
        .collect();
    Ok(Config {
        cluster: Cluster { nodes, threshold: request.threshold, vars: request.vars.clone() },
        state_dir: request.state_dir.clone(),
        identities: request.identities,
        tls_services: request.tls_services.clone(),
        secret_services: request.secret_services.clone(),
        prefix: request.prefix.clone(),
        templates: template::load_dir(&request.templates_dir, &request.prefix)?,
    })
}

/// Generates every server's overlay, adds the caller's own files, and replaces `out_dir` with
/// the result: the new tree is written beside the old one (0700 directories, 0600 files) and
/// renamed into place.
pub fn run(request: &Request) -> Result<Summary, OverlayError> {
    let mut overlay = generate(&config_of(request)?)?;
    for server in &request.servers {
        let files = overlay.servers.entry(server.name.clone()).or_default();
        for file in &server.files {
            check_relative(&server.name, &file.path)?;
            files.push(file.clone());
        }
        files.sort_by(|a, b| a.path.cmp(&b.path));
        if let Some(pair) = files.windows(2).find(|w| w[0].path == w[1].path) {
            return Err(OverlayError::Invalid(format!(
                "two generators write {} for {}",
                pair[0].path, server.name
            )));
        }
    }
    replace_tree(&overlay, &request.out_dir)?;
    Ok(overlay.summary)
}

/// One line saying what the cluster generators kept and made; never a secret.
pub fn describe(summary: &Summary) -> String {
    let count = |fate| summary.nodes.values().filter(|f| **f == fate).count();
    format!(
        "CA {:?}, server identities {} kept {} created {} reissued, rack secret {} of {} {:?}",
        summary.ca,
        count(Fate::Kept),
        count(Fate::Created),
        count(Fate::Reissued),
        summary.threshold,
        summary.total_shares,
        summary.shares
    )
    .to_lowercase()
}

/// Writes the overlay to a staging directory beside `target`, then swaps it in. The previous
/// tree is moved aside first and put back if the swap fails, so `target` is always either the
/// old overlay or the complete new one.
pub fn replace_tree(overlay: &Overlay, target: &Utf8Path) -> Result<(), OverlayError> {
    let (Some(parent), Some(name)) = (target.parent(), target.file_name()) else {
        return Err(OverlayError::Invalid(format!("the overlay directory {target} has no parent")));
    };
    let pid = std::process::id();
    let staging = parent.join(format!(".{name}.tmp-{pid}"));
    let old = parent.join(format!(".{name}.old-{pid}"));
    remove_tree(&staging)?;
    remove_tree(&old)?;
    let result = (|| {
        write(overlay, &staging)?;
        let had_old = target.exists();
        if had_old {
            rename(target, &old)?;
        }
        if let Err(err) = rename(&staging, target) {
            if had_old {
                let _ = fs::rename(&old, target);
            }
            return Err(err);
        }
        remove_tree(&old)
    })();
    if result.is_err() {
        let _ = fs::remove_dir_all(&staging);
    }
    result
}

/// A caller's file lands under the server's directory: its path must stay inside it.
fn check_relative(server: &str, path: &Utf8Path) -> Result<(), OverlayError> {
    let inside = !path.as_str().is_empty()
        && path.components().all(|c| matches!(c, Utf8Component::Normal(_)));
    if inside {
        Ok(())
    } else {
        Err(OverlayError::Invalid(format!(
            "servers.{server}.files: the path `{path}` must be relative, without `..`"
        )))
    }
}

fn remove_tree(dir: &Utf8Path) -> Result<(), OverlayError> {
    match fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(OverlayError::Io { what: "remove", path: dir.to_owned(), source }),
    }
}

fn rename(from: &Utf8Path, to: &Utf8Path) -> Result<(), OverlayError> {
    fs::rename(from, to).map_err(|source| OverlayError::Io {
        what: "rename into place",
        path: to.to_owned(),
        source,
    })
}
