//! The state file of a testbed, `<testbed dir>/beds/<name>/state.json`.
//!
//! It is written before anything is created and rewritten after every process is started, so
//! `down` always knows which process ids are the testbed's. Interfaces and namespaces need no
//! record: their names follow from the testbed's name (see `layout`).

use anyhow::Context as _;
use camino::{Utf8Path, Utf8PathBuf};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct State {
    pub name: String,
    pub nodes: u32,
    /// The image's root filesystem the nodes boot from.
    pub image: Utf8PathBuf,
    /// The systemd-nspawn process of each node, by node name, once started.
    pub node_pids: Vec<(String, u32)>,
    /// The builder's sshd on loopback, once started.
    pub builder: Option<Builder>,
    /// The artifact store of `up --store`, once started.
    #[serde(default)]
    pub store: Option<super::store::StoreState>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Builder {
    pub port: u16,
    pub pid: u32,
}

impl State {
    pub fn load(path: &Utf8Path) -> anyhow::Result<Option<State>> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(err) => return Err(err).with_context(|| format!("read {path}")),
        };
        let state = serde_json::from_str(&text).with_context(|| format!("parse {path}"))?;
        Ok(Some(state))
    }

    /// Writes the state atomically: a crash leaves the old file or the new one, never half.
    pub fn save(&self, path: &Utf8Path) -> anyhow::Result<()> {
        let tmp = path.with_extension("json.tmp");
        let text = serde_json::to_string_pretty(self)?;
        std::fs::write(&tmp, text).with_context(|| format!("write {tmp}"))?;
        std::fs::rename(&tmp, path).with_context(|| format!("rename {tmp} to {path}"))?;
        Ok(())
    }
}
