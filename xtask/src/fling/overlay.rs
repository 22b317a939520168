//! Overlays: the files that differ from server to server, generated on the builder under
//! `out/overlay/<server>/` and shipped to that server only.
//!
//! Two kinds of generators run. The simple ones here are functions from the config and one
//! server to that server's files (the node identity). The cluster generators of
//! `flotilla_package::overlay` make the rack secret's shares, the cluster CA with each server's
//! key and certificate, and per-server configs rendered from the templates under
//! `overlay-templates/<service>/`. Their identities are kept in `out/overlay-state/`, which
//! never leaves the builder, so regenerating keeps them unless `--rotate` is given. The
//! installer places an overlay's `opt/flotilla/<service>/...` into the release before any
//! service starts.

use std::{io::Write, os::unix::fs::OpenOptionsExt};

use anyhow::{bail, Context as _};
use camino::Utf8Path;
use flotilla_package::overlay::{self as cluster, Identities};

use super::config::{Config, Server};

/// The directory of the config templates, relative to the workspace root.
pub const TEMPLATES_DIR: &str = "overlay-templates";
/// The builder-only directory of the kept identities, relative to the workspace root.
pub const STATE_DIR: &str = "out/overlay-state";
/// The services that get the node's key, certificate and the cluster CA.
pub const TLS_SERVICES: &[&str] = &["node-agent", "control-plane", "etcd"];
/// The service that gets the node's share of the rack secret.
pub const SHARE_SERVICE: &str = "node-agent";

/// One file of a server's overlay: the library's type, whose debug output hides the contents.
pub use flotilla_package::overlay::OverlayFile;

/// A generator of per-server files.
type Generator = fn(&Config, &Server) -> Vec<OverlayFile>;

/// Every simple generator, in order.
const GENERATORS: &[Generator] = &[node_identity];

/// The files of one server's overlay from the simple generators.
pub fn files_for(config: &Config, server: &Server) -> Vec<OverlayFile> {
    GENERATORS.iter().flat_map(|generate| generate(config, server)).collect()
}

/// The cluster generators' input: the deployment servers in order, their address and
/// variables, and the rack threshold.
pub fn cluster_config(
    config: &Config,
    root: &Utf8Path,
    identities: Identities,
) -> anyhow::Result<cluster::Config> {
    let nodes = config
        .deployment
        .servers
        .iter()
        .map(|name| {
            let server = config.server(name);
            cluster::Node {
                name: server.name.as_str().to_owned(),
                addresses: vec![server.addr.for_ssh()],
                vars: server.vars.clone(),
            }
        })
        .collect();
    let templates_dir = root.join(TEMPLATES_DIR);
    let templates = cluster::template::load_dir(&templates_dir)
        .with_context(|| format!("load the overlay templates under {templates_dir}"))?;
    Ok(cluster::Config {
        cluster: cluster::Cluster {
            nodes,
            threshold: config.deployment.rack_threshold,
            vars: Default::default(),
        },
        state_dir: root.join(STATE_DIR),
        identities,
        tls_services: TLS_SERVICES.iter().map(|s| s.to_string()).collect(),
        share_service: SHARE_SERVICE.to_owned(),
        templates,
    })
}

/// One line saying what the cluster generators kept and made; never a secret.
pub fn describe(summary: &cluster::Summary) -> String {
    let count = |fate| summary.nodes.values().filter(|f| **f == fate).count();
    format!(
        "CA {:?}, server identities {} kept {} created {} reissued, rack secret {} of {} {:?}",
        summary.ca,
        count(cluster::Fate::Kept),
        count(cluster::Fate::Created),
        count(cluster::Fate::Reissued),
        summary.threshold,
        summary.total_shares,
        summary.shares
    )
    .to_lowercase()
}

/// Writes every deployment server's overlay under `<root>/out/overlay/`, replacing the
/// previous overlays as a whole: the new tree is written beside the old one and renamed into
/// place, so a failed run never leaves a mix. Directories are 0700 and files 0600, since
/// overlays carry secrets.
pub fn generate(
    config: &Config,
    root: &Utf8Path,
    identities: Identities,
) -> anyhow::Result<cluster::Summary> {
    let out = root.join("out");
    let generated = cluster::generate(&cluster_config(config, root, identities)?)
        .context("generate the cluster's shares, certificates and configs")?;
    let target = out.join("overlay");
    let staging = out.join(format!(".overlay.tmp-{}", std::process::id()));
    let old = out.join(format!(".overlay.old-{}", std::process::id()));
    if staging.exists() {
        std::fs::remove_dir_all(&staging).with_context(|| format!("remove {staging}"))?;
    }
    let result = (|| {
        for name in &config.deployment.servers {
            let server = config.server(name);
            let dir = staging.join(name.as_str());
            create_private_dir(&dir)?;
            let mut files = files_for(config, server);
            let own = generated.servers.get(name.as_str()).into_iter().flatten();
            files.extend(
                own.map(|f| OverlayFile { path: f.path.clone(), contents: f.contents.clone() }),
            );
            for file in files {
                let path = dir.join(&file.path);
                if let Some(parent) = path.parent() {
                    create_private_dir(parent)?;
                }
                write_private(&path, &file.contents)?;
            }
        }
        if target.exists() {
            std::fs::rename(&target, &old).with_context(|| format!("move aside {target}"))?;
        }
        std::fs::rename(&staging, &target).with_context(|| format!("rename into {target}"))?;
        if old.exists() {
            std::fs::remove_dir_all(&old).with_context(|| format!("remove {old}"))?;
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&staging);
    }
    result.map(|()| generated.summary)
}

/// The node's identity for people and scripts on the server: its name, address, role and
/// config variables, in TOML (the services read their own `node.toml`, from a template).
fn node_identity(config: &Config, server: &Server) -> Vec<OverlayFile> {
    let mut node = toml::Table::new();
    node.insert("name".into(), server.name.as_str().into());
    node.insert("addr".into(), server.addr.for_ssh().into());
    let is_rss = config.deployment.rss_server.as_ref() == Some(&server.name);
    node.insert("rss".into(), is_rss.into());
    let vars: toml::Table =
        server.vars.iter().map(|(k, v)| (k.clone(), toml::Value::from(v.as_str()))).collect();
    node.insert("vars".into(), vars.into());
    let mut doc = toml::Table::new();
    doc.insert("node".into(), node.into());
    vec![OverlayFile {
        path: "opt/flotilla/node-agent/pkg/identity.toml".into(),
        contents: format!(
            "# Written by `cargo xtask fling overlay` for {}.\n{}",
            server.name,
            toml::to_string(&doc).expect("a table serializes")
        )
        .into_bytes(),
    }]
}

fn create_private_dir(dir: &Utf8Path) -> anyhow::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    match std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir) {
        Ok(()) => Ok(()),
        Err(err) => bail!("create the overlay directory {dir}: {err}"),
    }
}

/// Writes a file 0600 under a temporary name, then renames it into place.
fn write_private(path: &Utf8Path, contents: &[u8]) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .and_then(|mut f| f.write_all(contents).and_then(|()| f.sync_all()));
    if let Err(err) = written {
        let _ = std::fs::remove_file(&tmp);
        bail!("write the overlay file {path}: {err}");
    }
    if let Err(err) = std::fs::rename(&tmp, path) {
        bail!("rename {tmp} to {path}: {err}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use camino::Utf8PathBuf;

    use super::*;

    const CONFIG: &str = r#"
[builder]
server = "b"
source_path = "/src"
[deployment]
servers = ["n1", "n2"]
staging_dir = "/var/tmp/staging"
rss_server = "n2"
[servers.b]
username = "root"
addr = "127.0.0.1"
[servers.n1]
username = "root"
addr = "10.0.0.1"
vars = { secret = "only-n1", quote = "a\"b'c" }
[servers.n2]
username = "root"
addr = "fd00::2"
"#;

    #[test]
    fn each_server_gets_only_its_own_files_privately() {
        let config = Config::parse(Utf8Path::new("t.toml"), CONFIG).unwrap();
        let dir = std::env::temp_dir().join(format!("fling-overlay-test-{}", std::process::id()));
        let out = Utf8PathBuf::try_from(dir.clone()).unwrap();
        struct Cleanup(std::path::PathBuf);
        impl Drop for Cleanup {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
        let _cleanup = Cleanup(dir);
        let first = generate(&config, &out, Identities::Keep).unwrap();
        // Twice: a rerun replaces the tree and keeps the identities.
        let second = generate(&config, &out, Identities::Keep).unwrap();
        assert_eq!(first.ca, cluster::Fate::Created);
        assert_eq!(second.ca, cluster::Fate::Kept);
        assert_eq!(second.shares, cluster::Fate::Kept);
        assert_eq!(second.threshold, 2, "a majority of two servers");
        let out_dir = out.join("out");
        let n1 = out_dir.join("overlay/n1/opt/flotilla/node-agent/pkg/identity.toml");
        let n2 = out_dir.join("overlay/n2/opt/flotilla/node-agent/pkg/identity.toml");
        let text1 = std::fs::read_to_string(&n1).unwrap();
        let text2 = std::fs::read_to_string(&n2).unwrap();
        let doc: toml::Table = text1.parse().unwrap();
        assert_eq!(doc["node"]["name"].as_str(), Some("n1"));
        assert_eq!(doc["node"]["vars"]["quote"].as_str(), Some("a\"b'c"));
        assert_eq!(doc["node"]["rss"].as_bool(), Some(false));
        assert!(text2.contains("rss = true"));
        assert!(!text2.contains("only-n1"), "n2's overlay holds n1's secret:\n{text2}");
        assert_eq!(std::fs::metadata(&n1).unwrap().permissions().mode() & 0o777, 0o600);
        let d = std::fs::metadata(out_dir.join("overlay/n1")).unwrap().permissions().mode();
        assert_eq!(d & 0o777, 0o700);
        let n1_pkg = out_dir.join("overlay/n1/opt/flotilla/node-agent/pkg");
        for file in ["tls/node.key", "tls/node.crt", "tls/ca.crt", "secret/share.json"] {
            let mode = std::fs::metadata(n1_pkg.join(file)).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "{file}");
        }
        let key1 = std::fs::read(n1_pkg.join("tls/node.key")).unwrap();
        let key2 =
            std::fs::read(out_dir.join("overlay/n2/opt/flotilla/node-agent/pkg/tls/node.key"));
        assert_ne!(key1, key2.unwrap());
        let mut entries: Vec<_> =
            std::fs::read_dir(&out_dir).unwrap().map(|e| e.unwrap().file_name()).collect();
        entries.sort();
        assert_eq!(entries, ["overlay", "overlay-state"], "temporary trees are gone");
        let rotated = generate(&config, &out, Identities::Rotate).unwrap();
        assert_eq!(rotated.ca, cluster::Fate::Created);
        assert_ne!(std::fs::read(n1_pkg.join("tls/node.key")).unwrap(), key1);
    }
}
