//! Per-server config files rendered from templates with `minijinja` (Jinja2 syntax).
//!
//! A template sees:
//! - `node`: this server: `name`, `index` (from 1), `address` (the first), `host` (the address,
//!   bracketed when it is an IPv6 literal, ready for `host:port`), `addresses`, `vars`;
//! - `peers`: every other server, each with the same fields;
//! - `cluster`: `nodes` (every server), `size`, `threshold`, `vars`.
//!
//! An undefined variable is an error rather than an empty string, because a config with a hole
//! in it would only fail later, on the server.

use std::collections::BTreeMap;
use std::fs;

use camino::{Utf8Path, Utf8PathBuf};
use minijinja::{Environment, UndefinedBehavior};
use serde::Serialize;

use super::{Cluster, Node, OverlayError};

/// A template and where its rendering goes in each server's overlay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    /// Where the template was read from, for messages.
    pub source: Utf8PathBuf,
    /// Relative to the server's overlay directory.
    pub dest: Utf8PathBuf,
    pub text: String,
}

#[derive(Serialize)]
struct NodeVars<'a> {
    name: &'a str,
    index: usize,
    address: &'a str,
    host: String,
    addresses: &'a [String],
    vars: &'a BTreeMap<String, String>,
}

#[derive(Serialize)]
struct ClusterVars<'a> {
    nodes: &'a [NodeVars<'a>],
    size: usize,
    threshold: u8,
    vars: &'a BTreeMap<String, String>,
}

#[derive(Serialize)]
struct Context<'a> {
    node: &'a NodeVars<'a>,
    peers: Vec<&'a NodeVars<'a>>,
    cluster: ClusterVars<'a>,
}

impl Template {
    /// Renders the template for the server at `index` (from 0) of the cluster.
    pub fn render(&self, cluster: &Cluster, index: usize) -> Result<String, OverlayError> {
        let nodes: Vec<NodeVars<'_>> =
            cluster.nodes.iter().enumerate().map(|(i, node)| node_vars(node, i)).collect();
        let context = Context {
            node: &nodes[index],
            peers: nodes.iter().enumerate().filter(|(i, _)| *i != index).map(|(_, n)| n).collect(),
            cluster: ClusterVars {
                nodes: &nodes,
                size: nodes.len(),
                threshold: cluster.threshold,
                vars: &cluster.vars,
            },
        };
        let mut env = Environment::new();
        env.set_undefined_behavior(UndefinedBehavior::Strict);
        env.set_keep_trailing_newline(true);
        env.render_str(&self.text, context).map_err(|e| {
            let line = e.line().map(|l| format!("line {l}: ")).unwrap_or_default();
            OverlayError::Template {
                template: self.source.clone(),
                node: cluster.nodes[index].name.clone(),
                message: format!("{line}{e}"),
            }
        })
    }
}

/// Reads every template under `dir`: the file `<dir>/<service>/<path>` renders to
/// `<prefix>/<service>/pkg/<path>` in each server's overlay. A missing directory means no
/// templates.
pub fn load_dir(dir: &Utf8Path, prefix: &str) -> Result<Vec<Template>, OverlayError> {
    let mut templates = Vec::new();
    if !dir.exists() {
        return Ok(templates);
    }
    let mut stack = vec![dir.to_owned()];
    while let Some(current) = stack.pop() {
        let entries = current.read_dir_utf8().map_err(|source| OverlayError::Io {
            what: "read the template directory",
            path: current.clone(),
            source,
        })?;
        for entry in entries {
            let entry = entry.map_err(|source| OverlayError::Io {
                what: "read the template directory",
                path: current.clone(),
                source,
            })?;
            let path = entry.path().to_owned();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            let relative = path.strip_prefix(dir).expect("walked under dir");
            let mut parts = relative.components();
            let service = parts.next().expect("a file has a name").as_str();
            let rest = parts.as_path();
            if rest.as_str().is_empty() {
                return Err(OverlayError::Invalid(format!(
                    "template {path}: put templates in a directory named after their service"
                )));
            }
            let text = fs::read_to_string(&path).map_err(|source| OverlayError::Io {
                what: "read the template",
                path: path.clone(),
                source,
            })?;
            let dest = Utf8PathBuf::from(format!("{prefix}/{service}/pkg")).join(rest);
            templates.push(Template { source: path, dest, text });
        }
    }
    templates.sort_by(|a, b| a.dest.cmp(&b.dest));
    Ok(templates)
}

fn node_vars(node: &Node, index: usize) -> NodeVars<'_> {
    let address = node.addresses[0].as_str();
    let host = if address.contains(':') { format!("[{address}]") } else { address.to_owned() };
    NodeVars {
        name: &node.name,
        index: index + 1,
        address,
        host,
        addresses: &node.addresses,
        vars: &node.vars,
    }
}
