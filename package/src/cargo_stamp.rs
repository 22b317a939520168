//! Skipping the nested `cargo build` (and `cargo metadata`) when nothing cargo looks at changed.
//!
//! After a successful build we record the size and modification time of every file cargo's
//! answer depends on: each binary, its dep-info file (`target/<profile>/<bin>.d`, which cargo
//! writes listing every source file the binary was compiled from, path and registry crates
//! alike), every file that dep-info names, the workspace's `Cargo.toml`s and `Cargo.lock`, the
//! cargo configuration files, the toolchain files and binaries, plus a digest of the
//! environment the nested cargo sees. If all of them are unchanged, cargo would find nothing to
//! do, so we do not ask it. Any difference, or anything unreadable, means "ask cargo": the fast
//! path can only be skipped wrongly, never taken wrongly, by a change cargo would also miss.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::MetadataExt;

use camino::{Utf8Path, Utf8PathBuf};
use serde::{Deserialize, Serialize};

use crate::plan::{CargoBuild, Workspace};
use crate::Error;

const STAMP_VERSION: u32 = 2;
const STAMP_FILE: &str = "cargo-stamp.json";

#[derive(Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Stamp {
    version: u32,
    builds: Vec<Vec<String>>,
    target_dir: Utf8PathBuf,
    crates: BTreeMap<String, BTreeSet<String>>,
    env: String,
    files: Vec<(Utf8PathBuf, Option<FileState>)>,
    /// Dep-info files by content: cargo rewrites them on every build, even a no-op one, so
    /// their mtime says nothing.
    dep_infos: Vec<(Utf8PathBuf, String)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct FileState {
    size: u64,
    mtime_ns: i128,
}

fn state(path: &Utf8Path) -> Option<FileState> {
    let meta = std::fs::metadata(path).ok()?;
    Some(FileState {
        size: meta.len(),
        mtime_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
    })
}

fn stamp_path(out_dir: &Utf8Path) -> Utf8PathBuf {
    out_dir.join(".cache").join(STAMP_FILE)
}

/// The workspace recorded with a stamp that is still fresh for `env`, and the cargo builds it
/// covered (as argument lists); `None` when anything changed.
pub fn fresh(out_dir: &Utf8Path, env: &str) -> Option<(Workspace, Vec<Vec<String>>)> {
    let text = std::fs::read_to_string(stamp_path(out_dir)).ok()?;
    let stamp: Stamp = serde_json::from_str(&text).ok()?;
    if stamp.version != STAMP_VERSION || stamp.env != env {
        return None;
    }
    if stamp.files.iter().any(|(path, recorded)| state(path) != *recorded) {
        return None;
    }
    for (path, digest) in &stamp.dep_infos {
        let text = std::fs::read(path).ok()?;
        if blake3::hash(&text).to_hex().as_str() != digest {
            return None;
        }
    }
    Some((Workspace { target_dir: stamp.target_dir, crates: stamp.crates }, stamp.builds))
}

/// Records a stamp after `builds` succeeded. `extra` are the files outside the binaries'
/// dep-info that cargo reads (manifests, lock file, configuration, toolchain).
pub fn record(
    out_dir: &Utf8Path,
    workspace: &Workspace,
    builds: &[CargoBuild],
    extra: &[Utf8PathBuf],
    env: &str,
) -> Result<(), Error> {
    let mut files: BTreeSet<Utf8PathBuf> = extra.iter().cloned().collect();
    let mut dep_infos = Vec::new();
    for build in builds {
        let dir = workspace.target_dir.join(build.profile());
        for bin in &build.bins {
            let dep_info = dir.join(format!("{bin}.d"));
            let Ok(text) = std::fs::read_to_string(&dep_info) else {
                // Without dep-info we cannot know the sources: record nothing, so the next run
                // asks cargo.
                forget(out_dir);
                return Ok(());
            };
            files.insert(dir.join(bin));
            files.extend(dep_info_sources(&text));
            dep_infos.push((dep_info, blake3::hash(text.as_bytes()).to_hex().to_string()));
        }
    }
    let stamp = Stamp {
        version: STAMP_VERSION,
        builds: builds.iter().map(CargoBuild::args).collect(),
        target_dir: workspace.target_dir.clone(),
        crates: workspace.crates.clone(),
        env: env.to_owned(),
        files: files.into_iter().map(|f| (f.clone(), state(&f))).collect(),
        dep_infos,
    };
    let path = stamp_path(out_dir);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|source| Error::Io {
            what: "create".into(),
            path: dir.to_owned(),
            source,
        })?;
    }
    let json = serde_json::to_vec(&stamp).expect("a stamp always serialises");
    flotilla_contracts::atomic::write_atomic(&path, &json, flotilla_contracts::atomic::PUBLIC)?;
    Ok(())
}

/// Whether cargo set `key` for the process it runs (`CARGO_PKG_*`, `CARGO_MANIFEST_DIR`, ...),
/// as opposed to a variable a user sets to configure cargo. A nested cargo that sees cargo's own
/// variables rebuilds needlessly (omicron PR 7945), so they are removed from its environment;
/// user configuration is kept, or the nested build would use another configuration.
pub fn is_set_by_cargo(key: &str) -> bool {
    const USER_CONFIG: [&str; 11] = [
        "CARGO_HOME",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_",
        "CARGO_PROFILE_",
        "CARGO_TERM_",
        "CARGO_NET_",
        "CARGO_HTTP_",
        "CARGO_REGISTRIES_",
        "CARGO_REGISTRY_",
        "CARGO_INCREMENTAL",
        "CARGO_LOG",
    ];
    key.starts_with("CARGO_") && !USER_CONFIG.iter().any(|k| key.starts_with(k))
}

/// A digest of the environment a nested cargo sees, leaving out cargo's own variables and those
/// of an interactive shell that no build reads. Only the digest is stored: the environment may
/// hold secrets.
pub fn env_digest() -> String {
    const SHELL_ONLY: [&str; 12] = [
        "PWD",
        "OLDPWD",
        "SHLVL",
        "_",
        "TERM",
        "COLUMNS",
        "LINES",
        "PS1",
        "DISPLAY",
        "WINDOWID",
        "LS_COLORS",
        "HISTFILE",
    ];
    let mut vars: Vec<(String, String)> = std::env::vars_os()
        .map(|(k, v)| (k.to_string_lossy().into_owned(), v.to_string_lossy().into_owned()))
        .filter(|(k, _)| !is_set_by_cargo(k) && !SHELL_ONLY.contains(&k.as_str()))
        .filter(|(k, _)| !k.starts_with("SSH_"))
        .collect();
    vars.sort();
    let mut hasher = blake3::Hasher::new();
    for (k, v) in vars {
        hasher.update(k.as_bytes());
        hasher.update(b"=");
        hasher.update(v.as_bytes());
        hasher.update(b"\0");
    }
    hasher.finalize().to_hex().to_string()
}

/// Removes the stamp, so the next run asks cargo.
pub fn forget(out_dir: &Utf8Path) {
    let _ = std::fs::remove_file(stamp_path(out_dir));
}

/// The prerequisites of a make-style dep-info file: every path after the `target:` of each
/// rule, with `\ ` standing for a space in a path.
fn dep_info_sources(text: &str) -> Vec<Utf8PathBuf> {
    let mut out = Vec::new();
    for line in text.lines() {
        let Some((_, deps)) = split_rule(line) else { continue };
        let mut current = String::new();
        let mut chars = deps.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '\\' if chars.peek() == Some(&' ') => {
                    current.push(' ');
                    chars.next();
                }
                ' ' | '\t' => {
                    if !current.is_empty() {
                        out.push(Utf8PathBuf::from(std::mem::take(&mut current)));
                    }
                }
                c => current.push(c),
            }
        }
        if !current.is_empty() {
            out.push(Utf8PathBuf::from(current));
        }
    }
    out
}

/// Splits `target: deps` at the first colon that is followed by a space or the end of the line
/// (paths may contain colons).
fn split_rule(line: &str) -> Option<(&str, &str)> {
    let bytes = line.as_bytes();
    (0..bytes.len())
        .find(|&i| bytes[i] == b':' && (i + 1 == bytes.len() || bytes[i + 1] == b' '))
        .map(|i| (&line[..i], &line[i + 1..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dep_info_paths_are_split_with_escaped_spaces() {
        let text = "/t/release/agent: /src/main.rs /src/my\\ dir/lib.rs\n\n/src/main.rs:\n";
        assert_eq!(
            dep_info_sources(text),
            [Utf8PathBuf::from("/src/main.rs"), Utf8PathBuf::from("/src/my dir/lib.rs")]
        );
    }

    #[test]
    fn a_changed_source_or_environment_invalidates_the_stamp() {
        let dir = Utf8PathBuf::try_from(std::env::temp_dir())
            .unwrap()
            .join(format!("flotilla-stamp-{}", std::process::id()));
        struct Guard(Utf8PathBuf);
        impl Drop for Guard {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
        let _guard = Guard(dir.clone());
        let release = dir.join("target/release");
        std::fs::create_dir_all(&release).unwrap();
        let src = dir.join("main.rs");
        std::fs::write(&src, "fn main() {}").unwrap();
        std::fs::write(release.join("agent"), "binary").unwrap();
        std::fs::write(release.join("agent.d"), format!("{release}/agent: {src}\n")).unwrap();
        let workspace = Workspace {
            target_dir: dir.join("target"),
            crates: [("agent".to_owned(), ["agent".to_owned()].into())].into(),
        };
        let build = CargoBuild {
            release: true,
            packages: vec!["agent".into()],
            bins: vec!["agent".into()],
            workspace: true,
        };
        let out = dir.join("out");
        record(&out, &workspace, std::slice::from_ref(&build), &[dir.join("Cargo.lock")], "e1")
            .unwrap();
        let (ws, builds) = fresh(&out, "e1").expect("nothing changed");
        assert_eq!(ws.crates, workspace.crates);
        assert_eq!(builds, [build.args()]);
        assert!(fresh(&out, "e2").is_none(), "another environment");
        // A file that did not exist and now does (a new lock file) is a change.
        std::fs::write(dir.join("Cargo.lock"), "").unwrap();
        assert!(fresh(&out, "e1").is_none());
        record(&out, &workspace, std::slice::from_ref(&build), &[dir.join("Cargo.lock")], "e1")
            .unwrap();
        assert!(fresh(&out, "e1").is_some());
        // Cargo rewrites dep-info on every build; the same content keeps the stamp fresh.
        let dep_info = std::fs::read(release.join("agent.d")).unwrap();
        std::fs::write(release.join("agent.d"), &dep_info).unwrap();
        assert!(fresh(&out, "e1").is_some());
        std::fs::write(&src, "fn main() { println!() }").unwrap();
        assert!(fresh(&out, "e1").is_none(), "a source file changed");
    }
}
