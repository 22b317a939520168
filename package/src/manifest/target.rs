//! Build targets: `key=value` maps that select packages (`only_for_targets`) and fill `{{key}}`
//! placeholders. Named targets are stored under `<out>/target/<name>`, one `key=value` a line, and
//! one of them may be active (`<out>/target/.active` holds its name), as omicron-package does.

use std::collections::BTreeMap;
use std::fmt;

use camino::{Utf8Path, Utf8PathBuf};

use super::names::TargetName;
use super::Manifest;
use crate::Error;
use flotilla_contracts::atomic::{write_atomic, PUBLIC};

/// A build target: an ordered `key=value` map.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Target(BTreeMap<String, String>);

impl Target {
    pub fn from_pairs(pairs: impl IntoIterator<Item = (String, String)>) -> Self {
        Self(pairs.into_iter().collect())
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    pub fn pairs(&self) -> &BTreeMap<String, String> {
        &self.0
    }

    /// Whether a package restricted to `only_for_targets` belongs to this target: every key it
    /// names must be present here with the same value.
    pub fn includes(&self, only_for: Option<&BTreeMap<String, String>>) -> bool {
        only_for.is_none_or(|only| only.iter().all(|(k, v)| self.get(k) == Some(v.as_str())))
    }

    /// Parses `key=value` words, as given to `target create -i` or stored in a target file.
    pub fn parse_pairs<'a>(words: impl IntoIterator<Item = &'a str>) -> Result<Self, String> {
        let mut map = BTreeMap::new();
        for word in words {
            let Some((key, value)) = word.split_once('=') else {
                return Err(format!("`{word}` is not of the form key=value"));
            };
            let key = key.trim();
            if key.is_empty() {
                return Err(format!("`{word}` has an empty key"));
            }
            map.insert(key.to_owned(), value.trim().to_owned());
        }
        Ok(Self(map))
    }

    fn to_file_text(&self) -> String {
        self.0.iter().map(|(k, v)| format!("{k}={v}\n")).collect()
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str("empty");
        }
        let words: Vec<String> = self.0.iter().map(|(k, v)| format!("{k}={v}")).collect();
        f.write_str(&words.join(" "))
    }
}

/// Where a resolved target came from, so the CLI can say which one it uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetOrigin {
    Named(TargetName),
    DefaultPreset,
    Empty,
}

impl fmt::Display for TargetOrigin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TargetOrigin::Named(name) => write!(f, "target `{name}`"),
            TargetOrigin::DefaultPreset => f.write_str("the manifest's default preset"),
            TargetOrigin::Empty => f.write_str("the empty target"),
        }
    }
}

/// The named targets stored under `<out>/target/`.
pub struct TargetStore {
    dir: Utf8PathBuf,
}

const ACTIVE_FILE: &str = ".active";

impl TargetStore {
    pub fn new(out_dir: &Utf8Path) -> Self {
        Self { dir: out_dir.join("target") }
    }

    /// Picks the target to build for: the one named, else the active one, else the manifest's
    /// `[target.preset.default]`, else the empty target, so a fresh checkout builds without setup.
    pub fn resolve(
        &self,
        manifest: &Manifest,
        name: Option<&TargetName>,
    ) -> Result<(Target, TargetOrigin), Error> {
        let name = match name {
            Some(name) => Some(name.clone()),
            None => self.active()?,
        };
        if let Some(name) = name {
            return Ok((self.load(&name)?, TargetOrigin::Named(name)));
        }
        match manifest.presets.get("default") {
            Some(preset) => Ok((preset.clone(), TargetOrigin::DefaultPreset)),
            None => Ok((Target::default(), TargetOrigin::Empty)),
        }
    }

    pub fn load(&self, name: &TargetName) -> Result<Target, Error> {
        let path = self.dir.join(name.as_str());
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::Target(format!(
                    "target `{name}` does not exist (create it with `cargo xtask target create \
                     {name}`)"
                )))
            }
            Err(source) => return Err(Error::Io { what: "read target".into(), path, source }),
        };
        Target::parse_pairs(text.lines().filter(|l| !l.trim().is_empty()))
            .map_err(|e| Error::Target(format!("{path}: {e}")))
    }

    /// Creates (or replaces) a named target from a preset plus overrides, and makes it active.
    pub fn create(
        &self,
        manifest: &Manifest,
        name: &TargetName,
        preset: Option<&str>,
        overrides: &Target,
    ) -> Result<Target, Error> {
        let mut target = match preset {
            Some(preset) => manifest.presets.get(preset).cloned().ok_or_else(|| {
                let known: Vec<&str> = manifest.presets.keys().map(String::as_str).collect();
                Error::Target(format!(
                    "create target `{name}`: the manifest has no preset `{preset}` (known: {})",
                    if known.is_empty() { "none".to_owned() } else { known.join(", ") }
                ))
            })?,
            None => Target::default(),
        };
        target.0.extend(overrides.0.clone());
        self.write(&self.dir.join(name.as_str()), target.to_file_text().as_bytes())?;
        self.set_active(name)?;
        Ok(target)
    }

    pub fn list(&self) -> Result<Vec<(TargetName, Target)>, Error> {
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => {
                return Err(Error::Io {
                    what: "list targets".into(),
                    path: self.dir.clone(),
                    source,
                })
            }
        };
        let mut names: Vec<TargetName> = entries
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().to_str().and_then(|n| TargetName::new(n).ok()))
            .collect();
        names.sort();
        names.into_iter().map(|n| Ok((n.clone(), self.load(&n)?))).collect()
    }

    pub fn active(&self) -> Result<Option<TargetName>, Error> {
        let path = self.dir.join(ACTIVE_FILE);
        match std::fs::read_to_string(&path) {
            Ok(text) => TargetName::new(text.trim())
                .map(Some)
                .map_err(|e| Error::Target(format!("{path}: {e}"))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(Error::Io { what: "read the active target".into(), path, source }),
        }
    }

    pub fn set_active(&self, name: &TargetName) -> Result<(), Error> {
        self.load(name)?;
        self.write(&self.dir.join(ACTIVE_FILE), format!("{name}\n").as_bytes())
    }

    pub fn delete(&self, name: &TargetName) -> Result<(), Error> {
        let path = self.dir.join(name.as_str());
        if let Err(source) = std::fs::remove_file(&path) {
            if source.kind() == std::io::ErrorKind::NotFound {
                return Err(Error::Target(format!("delete target `{name}`: it does not exist")));
            }
            return Err(Error::Io { what: "delete target".into(), path, source });
        }
        // A deleted target must not stay active, or every later command would fail to load it.
        if self.active()?.as_ref() == Some(name) {
            let active = self.dir.join(ACTIVE_FILE);
            std::fs::remove_file(&active).map_err(|source| Error::Io {
                what: "clear the active target".into(),
                path: active,
                source,
            })?;
        }
        Ok(())
    }

    fn write(&self, path: &Utf8Path, bytes: &[u8]) -> Result<(), Error> {
        std::fs::create_dir_all(&self.dir).map_err(|source| Error::Io {
            what: "create the targets directory".into(),
            path: self.dir.clone(),
            source,
        })?;
        write_atomic(path, bytes, PUBLIC).map_err(Error::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_for_targets_needs_every_key_equal() {
        let t = Target::parse_pairs(["image=standard", "switch=asic"]).unwrap();
        let only = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
        };
        assert!(t.includes(None));
        assert!(t.includes(Some(&only(&[("image", "standard")]))));
        assert!(!t.includes(Some(&only(&[("image", "trampoline")]))));
        assert!(!t.includes(Some(&only(&[("machine", "gimlet")]))));
    }

    #[test]
    fn pairs_must_have_an_equals_sign() {
        assert_eq!(
            Target::parse_pairs(["image"]).unwrap_err(),
            "`image` is not of the form key=value"
        );
        assert_eq!(Target::parse_pairs(["=x"]).unwrap_err(), "`=x` has an empty key");
    }
}
