//! Overlays: the files that differ from server to server, generated on the builder under
//! `out/overlay/<server>/` and shipped to that server only.
//!
//! A generator is a function from the config and one server to the files of that server. The
//! installer places an overlay's `opt/flotilla/<service>/...` into the release before any
//! service starts. The first generator writes a node identity file for the node agent; real
//! generators (secrets, per-node device configs) are added next to it.

use std::{io::Write, os::unix::fs::OpenOptionsExt};

use anyhow::{bail, Context as _};
use camino::{Utf8Path, Utf8PathBuf};

use super::config::{Config, Server};

/// One file of a server's overlay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OverlayFile {
    /// Relative to the server's overlay directory.
    pub path: Utf8PathBuf,
    pub contents: String,
}

/// A generator of per-server files.
type Generator = fn(&Config, &Server) -> Vec<OverlayFile>;

/// Every generator, in order.
const GENERATORS: &[Generator] = &[node_identity];

/// The files of one server's overlay.
pub fn files_for(config: &Config, server: &Server) -> Vec<OverlayFile> {
    GENERATORS.iter().flat_map(|generate| generate(config, server)).collect()
}

/// Writes every deployment server's overlay under `<out>/overlay/`, replacing the previous
/// overlays as a whole: the new tree is written beside the old one and renamed into place,
/// so a failed run never leaves a mix. Directories are 0700 and files 0600, since overlays
/// carry secrets.
pub fn generate(config: &Config, out: &Utf8Path) -> anyhow::Result<()> {
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
            for file in files_for(config, server) {
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
    result
}

/// The node agent's identity: the server's name, address and config variables, in TOML.
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
        path: "opt/flotilla/node-agent/pkg/node.toml".into(),
        contents: format!(
            "# Written by `cargo xtask fling overlay` for {}.\n{}",
            server.name,
            toml::to_string(&doc).expect("a table serializes")
        ),
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
fn write_private(path: &Utf8Path, contents: &str) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .and_then(|mut f| f.write_all(contents.as_bytes()).and_then(|()| f.sync_all()));
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
        generate(&config, &out).unwrap();
        // Twice: a rerun replaces the tree.
        generate(&config, &out).unwrap();
        let n1 = out.join("overlay/n1/opt/flotilla/node-agent/pkg/node.toml");
        let n2 = out.join("overlay/n2/opt/flotilla/node-agent/pkg/node.toml");
        let text1 = std::fs::read_to_string(&n1).unwrap();
        let text2 = std::fs::read_to_string(&n2).unwrap();
        let doc: toml::Table = text1.parse().unwrap();
        assert_eq!(doc["node"]["name"].as_str(), Some("n1"));
        assert_eq!(doc["node"]["vars"]["quote"].as_str(), Some("a\"b'c"));
        assert_eq!(doc["node"]["rss"].as_bool(), Some(false));
        assert!(text2.contains("rss = true"));
        assert!(!text2.contains("only-n1"), "n2's overlay holds n1's secret:\n{text2}");
        assert_eq!(std::fs::metadata(&n1).unwrap().permissions().mode() & 0o777, 0o600);
        let d = std::fs::metadata(out.join("overlay/n1")).unwrap().permissions().mode();
        assert_eq!(d & 0o777, 0o700);
        let entries: Vec<_> =
            std::fs::read_dir(&out).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(entries, ["overlay"], "temporary trees are gone");
    }
}
