//! A cgroup of its own for each node, in the hierarchies systemd inside the node uses.
//!
//! Each node's cgroup is `flotilla/<machine name>` in the `name=systemd` hierarchy of a legacy
//! or hybrid host, and in the unified (cgroup2) one. `down` removes them once the node's
//! processes have stopped.

use anyhow::{bail, Context as _};
use camino::{Utf8Path, Utf8PathBuf};

/// The parent directories, below each hierarchy, of the nodes' cgroups.
fn parents() -> Vec<Utf8PathBuf> {
    let root = Utf8Path::new("/sys/fs/cgroup");
    let mut parents = Vec::new();
    for hierarchy in [root.join("systemd"), root.join("unified"), root.to_owned()] {
        // A cgroup hierarchy root has a `cgroup.procs`; the tmpfs holding v1 mounts does not.
        if hierarchy.join("cgroup.procs").is_file() {
            parents.push(hierarchy.join("flotilla"));
        }
    }
    parents
}

/// Creates the cgroups of a node and returns the `cgroup.procs` files its first process
/// writes its pid into.
pub fn create(machine: &str) -> anyhow::Result<Vec<Utf8PathBuf>> {
    let mut procs = Vec::new();
    for parent in parents() {
        let dir = parent.join(machine);
        std::fs::create_dir_all(&dir).with_context(|| format!("create the cgroup {dir}"))?;
        procs.push(dir.join("cgroup.procs"));
    }
    if procs.is_empty() {
        bail!("create a cgroup for {machine}: no cgroup hierarchy found under /sys/fs/cgroup");
    }
    Ok(procs)
}

/// Removes the cgroups of the nodes whose machine names `select` accepts, including the
/// cgroups their systemd made inside. A cgroup still holding a process stays, and is reported.
pub fn remove(select: impl Fn(&str) -> bool) -> anyhow::Result<()> {
    for parent in parents() {
        let Ok(entries) = parent.read_dir_utf8() else { continue };
        for entry in entries.flatten() {
            if entry.path().is_dir() && select(entry.file_name()) {
                remove_retrying(entry.path())?;
            }
        }
    }
    Ok(())
}

/// Processes killed a moment ago may still be leaving their cgroup, which is busy until then.
fn remove_retrying(dir: &Utf8Path) -> anyhow::Result<()> {
    let mut attempts = 0;
    loop {
        match remove_tree(dir) {
            Ok(()) => return Ok(()),
            Err(_) if attempts < 50 => {
                attempts += 1;
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            Err(err) => return Err(err),
        }
    }
}

/// cgroup directories are removed with rmdir, children first; their files go with them.
fn remove_tree(dir: &Utf8Path) -> anyhow::Result<()> {
    for entry in dir.read_dir_utf8().with_context(|| format!("read the cgroup {dir}"))?.flatten() {
        if entry.path().is_dir() {
            remove_tree(entry.path())?;
        }
    }
    match std::fs::remove_dir(dir) {
        Ok(()) => Ok(()),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(err) => bail!("remove the cgroup {dir}: {err}"),
    }
}
