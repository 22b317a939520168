//! Fixtures shared by the installer's integration tests: a private temporary directory, zone
//! images and tarballs built in the test (including deliberately malicious entries), and the
//! digest list.

#![allow(dead_code)]

use std::fs;
use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};

use camino::{Utf8Path, Utf8PathBuf};

/// A temporary directory removed when dropped, even when the test fails.
pub struct TempDir(pub Utf8PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let path = std::env::temp_dir().join(format!("flotilla-{tag}-{}-{n}", std::process::id()));
        let path = Utf8PathBuf::try_from(path).expect("temp dir is UTF-8");
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }

    pub fn path(&self) -> &Utf8Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// One tar entry, written header by header so tests can build entries that `tar::Builder`
/// would refuse (`..`, absolute paths, links out, devices).
pub enum Entry {
    File { path: String, contents: Vec<u8>, mode: u32 },
    Dir { path: String },
    Symlink { path: String, target: String },
    HardLink { path: String, target: String },
    CharDevice { path: String },
}

impl Entry {
    pub fn file(path: &str, contents: &str) -> Entry {
        Entry::File { path: path.into(), contents: contents.as_bytes().to_vec(), mode: 0o644 }
    }
    pub fn exe(path: &str, contents: &str) -> Entry {
        Entry::File { path: path.into(), contents: contents.as_bytes().to_vec(), mode: 0o755 }
    }
}

fn header(path: &str, kind: tar::EntryType, size: u64, mode: u32) -> tar::Header {
    let mut header = tar::Header::new_gnu();
    let name = &mut header.as_old_mut().name;
    assert!(path.len() < name.len(), "test paths are short");
    name[..path.len()].copy_from_slice(path.as_bytes());
    header.set_entry_type(kind);
    header.set_size(size);
    header.set_mode(mode);
    header.set_mtime(0);
    header.set_uid(0);
    header.set_gid(0);
    header
}

fn set_link(header: &mut tar::Header, target: &str) {
    let link = &mut header.as_old_mut().linkname;
    link[..target.len()].copy_from_slice(target.as_bytes());
}

/// The bytes of an uncompressed tar stream of `entries`.
pub fn tar_bytes(entries: &[Entry]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for entry in entries {
        match entry {
            Entry::File { path, contents, mode } => {
                let mut h = header(path, tar::EntryType::Regular, contents.len() as u64, *mode);
                h.set_cksum();
                builder.append(&h, contents.as_slice()).unwrap();
            }
            Entry::Dir { path } => {
                let mut h = header(path, tar::EntryType::Directory, 0, 0o755);
                h.set_cksum();
                builder.append(&h, std::io::empty()).unwrap();
            }
            Entry::Symlink { path, target } => {
                let mut h = header(path, tar::EntryType::Symlink, 0, 0o777);
                set_link(&mut h, target);
                h.set_cksum();
                builder.append(&h, std::io::empty()).unwrap();
            }
            Entry::HardLink { path, target } => {
                let mut h = header(path, tar::EntryType::Link, 0, 0o644);
                set_link(&mut h, target);
                h.set_cksum();
                builder.append(&h, std::io::empty()).unwrap();
            }
            Entry::CharDevice { path } => {
                let mut h = header(path, tar::EntryType::Char, 0, 0o644);
                h.set_cksum();
                builder.append(&h, std::io::empty()).unwrap();
            }
        }
    }
    builder.into_inner().unwrap()
}

/// Gzip-compresses bytes.
pub fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    encoder.write_all(bytes).unwrap();
    encoder.finish().unwrap()
}

/// A zone image: `oxide.json` first, then `entries`.
pub fn zone_bytes(name: &str, entries: Vec<Entry>) -> Vec<u8> {
    let mut all = vec![Entry::file(
        "oxide.json",
        &format!("{{\"v\":\"1\",\"t\":\"layer\",\"pkg\":\"{name}\"}}"),
    )];
    all.extend(entries);
    gzip(&tar_bytes(&all))
}

/// The files of one service in a zone image, the layout `cargo xtask package` writes.
pub struct Service<'a> {
    pub name: &'a str,
    /// The binary's contents (a shell script in tests that run it).
    pub binary: &'a str,
    pub config: &'a str,
    /// `health.toml`, if any.
    pub health: Option<&'a str>,
    /// Extra lines for the unit's `[Unit]` section, for example `After=a.service`.
    pub unit_extra: &'a str,
    /// Extra lines for the unit's `[Service]` section, for example `User=nobody`.
    pub service_extra: &'a str,
    pub with_unit: bool,
    pub with_manifest: bool,
}

impl<'a> Service<'a> {
    pub fn new(name: &'a str) -> Service<'a> {
        Service {
            name,
            binary: "#!/bin/sh\nexec sleep 1000\n",
            config: "v = 1\n",
            health: None,
            unit_extra: "",
            service_extra: "",
            with_unit: true,
            with_manifest: true,
        }
    }

    pub fn entries(&self) -> Vec<Entry> {
        let n = self.name;
        let base = format!("root/opt/flotilla/{n}");
        let mut entries = vec![
            Entry::Dir { path: "root/".into() },
            Entry::Dir { path: "root/opt/".into() },
            Entry::Dir { path: "root/opt/flotilla/".into() },
            Entry::Dir { path: format!("{base}/") },
            Entry::Dir { path: format!("{base}/bin/") },
            Entry::exe(&format!("{base}/bin/{n}"), self.binary),
            Entry::Dir { path: format!("{base}/pkg/") },
            Entry::file(&format!("{base}/pkg/config.toml"), self.config),
        ];
        if self.with_unit {
            let unit = format!(
                "[Unit]\nDescription={n}\n{}\n[Service]\nExecStart=/opt/flotilla/current/{n}/bin/{n} \
                 --config /opt/flotilla/current/{n}/pkg/config.toml\n{}\n[Install]\nWantedBy=multi-user.target\n",
                self.unit_extra, self.service_extra
            );
            entries.push(Entry::file(&format!("{base}/pkg/{n}.service"), &unit));
        }
        if self.with_manifest {
            entries.push(Entry::file(&format!("{base}/pkg/manifest.xml"), &smf_manifest(n, &[])));
        }
        if let Some(health) = self.health {
            entries.push(Entry::file(&format!("{base}/pkg/health.toml"), health));
        }
        entries
    }

    pub fn zone(&self) -> Vec<u8> {
        zone_bytes(self.name, self.entries())
    }
}

/// A minimal valid SMF manifest for service `name` depending on `deps`.
pub fn smf_manifest(name: &str, deps: &[&str]) -> String {
    let deps: String = deps
        .iter()
        .map(|d| {
            format!(
                "<dependency name=\"{d}\" grouping=\"require_all\" restart_on=\"none\" type=\"service\">\
                 <service_fmri value=\"svc:/flotilla/{d}:default\"/></dependency>"
            )
        })
        .collect();
    format!(
        "<?xml version=\"1.0\"?>\n<!DOCTYPE service_bundle SYSTEM \"/usr/share/lib/xml/dtd/service_bundle.dtd.1\">\n\
         <service_bundle type=\"manifest\" name=\"{name}\"><service name=\"flotilla/{name}\" type=\"service\" version=\"1\">\
         <create_default_instance enabled=\"false\"/>{deps}\
         <exec_method type=\"method\" name=\"start\" exec=\"/opt/flotilla/current/{name}/bin/{name} &amp;\" timeout_seconds=\"60\"/>\
         <exec_method type=\"method\" name=\"stop\" exec=\":kill\" timeout_seconds=\"60\"/>\
         </service></service_bundle>\n"
    )
}

/// Writes `files` (name, bytes) into a fresh packages directory with their digest list.
pub fn packages_dir(root: &Utf8Path, tag: &str, files: &[(&str, Vec<u8>)]) -> Utf8PathBuf {
    let dir = root.join(tag);
    fs::create_dir_all(&dir).unwrap();
    let mut list = String::new();
    let mut names: Vec<&(&str, Vec<u8>)> = files.iter().collect();
    names.sort_by_key(|(n, _)| *n);
    for (name, bytes) in names {
        fs::write(dir.join(name), bytes).unwrap();
        list.push_str(&format!("{}  {name}\n", blake3::hash(bytes).to_hex()));
    }
    fs::write(dir.join("digests.b3"), list).unwrap();
    dir
}
