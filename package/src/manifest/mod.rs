//! The package manifest in the omicron-zone-package format, as typed data.
//!
//! `[package.<name>]` tables with `service_name`, an internally tagged `source` (`local`,
//! `prebuilt`, `composite`, `manual`) and `output` (`zone`, `tarball`), `only_for_targets`,
//! `setup_hint`, plus `[target.preset.<name>]` maps. Every table refuses unknown keys, so a typo
//! is an error with its line and column instead of a silently ignored setting.

mod interpolate;
mod locate;
mod names;
mod target;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use camino::{Utf8Path, Utf8PathBuf};
use serde::{Deserialize, Serialize};

pub use interpolate::InterpolatedString;
pub use names::{PackageName, ServiceName, Sha256Digest, TargetName};
pub use target::{Target, TargetOrigin, TargetStore};

use crate::Error;

/// A parsed and validated manifest.
#[derive(Debug, Clone)]
pub struct Manifest {
    /// The file it was read from, for error messages.
    pub path: Utf8PathBuf,
    pub packages: BTreeMap<PackageName, Package>,
    /// `[target.preset.<name>]`: named starting points for `target create -p`.
    pub presets: BTreeMap<String, Target>,
    /// The text it was parsed from, so that later errors can point at the offending value.
    text: std::sync::Arc<str>,
    /// Where the packages install: zone images hold a service's files under
    /// `root<install_prefix>/<service>/`, its binaries in `bin/` there. `install_prefix` at the
    /// top of the manifest; `/opt/flotilla` when not given (`/opt/oxide` for Omicron's layout).
    pub install_prefix: flotilla_contracts::layout::Prefix,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Package {
    pub service_name: ServiceName,
    pub source: PackageSource,
    pub output: PackageOutput,
    /// The package is built only for targets with all of these `key = value` pairs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub only_for_targets: Option<BTreeMap<String, String>>,
    /// Printed when the package fails to build: what the user probably has to do first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub setup_hint: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
pub enum PackageSource {
    /// Assembled here from rust binaries of this workspace, files and blobs.
    Local {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        rust: Option<RustPackage>,
        #[serde(default)]
        paths: Vec<MappedPath>,
        /// Omicron's build-bucket blobs (a path in the bucket) or our own by path or URL.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        blobs: Vec<Blob>,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        buildomat_blobs: Vec<BuildomatBlob>,
    },
    /// A finished archive fetched from elsewhere and checked against its sha256.
    Prebuilt {
        /// Omicron's buildomat origin: `repo` and `commit` name the image.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        repo: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        commit: Option<String>,
        /// An `http(s)://` or `file://` URL.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        url: Option<String>,
        /// A local file, relative to the manifest's directory; works offline.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        path: Option<InterpolatedString>,
        sha256: Sha256Digest,
    },
    /// The merge of other packages' zone images, named by their output files.
    Composite { packages: Vec<String> },
    /// Put into `out/` by hand; only checked for presence.
    Manual {},
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
pub enum PackageOutput {
    /// A zone image: `<name>.tar.gz`, `oxide.json` first, files under `root/`.
    Zone {
        /// Only used to build composites; not installed by itself.
        #[serde(default)]
        intermediate_only: bool,
    },
    /// An uncompressed `<name>.tar`, `VERSION` first, files at the archive root.
    Tarball {},
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RustPackage {
    /// Binaries of the crate named like the package.
    pub binary_names: Vec<String>,
    /// Built with `--release` (from `target/release`) rather than the debug profile.
    pub release: bool,
}

/// A file or directory of this machine and where it lands in the archive.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MappedPath {
    pub from: InterpolatedString,
    pub to: InterpolatedString,
}

/// An artifact placed under `<service>/blob/` in the package.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Blob {
    /// Omicron's form: a path in Oxide's public build bucket, fetched over https.
    Bucket(Utf8PathBuf),
    /// Our form: a local file or a URL, pinned by its sha256.
    Pinned(PinnedBlob),
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PinnedBlob {
    /// A local file, relative to the manifest's directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<InterpolatedString>,
    /// An `http(s)://` or `file://` URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// One file of a Debian package, fetched with `apt-get download` and extracted; `sha256`
    /// is the digest of that file, so the pin holds whatever the package's own packaging.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deb: Option<DebFile>,
    pub sha256: Sha256Digest,
    /// The file name inside `blob/`; the last component of the path or URL when not given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Where the file lands instead of `blob/`, like a `paths` entry's `to` (for example a
    /// prebuilt binary under the service's `bin/`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<InterpolatedString>,
}

/// A file inside a Debian package of an exact version.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DebFile {
    /// The binary package's name, as `apt-get download` takes it.
    pub package: String,
    /// The exact version; a point release of Debian may remove it from the archive.
    pub version: String,
    /// The file's path inside the package, without a leading `/`.
    pub file: String,
}

/// An artifact published by Oxide's buildomat CI.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BuildomatBlob {
    pub repo: String,
    pub series: String,
    pub commit: String,
    pub artifact: String,
    pub sha256: Sha256Digest,
}

// A hand-written deserializer keeps the inner error (a malformed sha256, an unknown key) that an
// untagged enum would replace with "data did not match any variant".
impl<'de> Deserialize<'de> for Blob {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct BlobVisitor;
        impl<'de> serde::de::Visitor<'de> for BlobVisitor {
            type Value = Blob;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a bucket path or a table { path | url, sha256 }")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Blob, E> {
                Ok(Blob::Bucket(Utf8PathBuf::from(v)))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<Blob, A::Error> {
                PinnedBlob::deserialize(serde::de::value::MapAccessDeserializer::new(map))
                    .map(Blob::Pinned)
            }
        }
        deserializer.deserialize_any(BlobVisitor)
    }
}

impl DebFile {
    /// Refuses names that `apt-get` would read as options and file paths that leave the
    /// extracted package.
    fn check(&self) -> Result<(), String> {
        let word = |w: &str| {
            !w.is_empty()
                && !w.starts_with('-')
                && w.chars().all(|c| c.is_ascii_alphanumeric() || "+-.:~_".contains(c))
        };
        if !word(&self.package) {
            return Err(format!("`{}` is not a Debian package name", self.package));
        }
        if !word(&self.version) {
            return Err(format!("`{}` is not a Debian version", self.version));
        }
        let path = Utf8Path::new(&self.file);
        let plain = path.components().all(|c| matches!(c, camino::Utf8Component::Normal(_)));
        if self.file.is_empty() || !plain {
            return Err(format!("file `{}` is not a relative path inside the package", self.file));
        }
        Ok(())
    }
}

impl Package {
    /// The file name of this package's output under `out/`.
    pub fn output_file(&self, name: &PackageName) -> String {
        match self.output {
            PackageOutput::Zone { .. } => format!("{name}.tar.gz"),
            PackageOutput::Tarball {} => format!("{name}.tar"),
        }
    }

    pub fn is_intermediate_only(&self) -> bool {
        matches!(self.output, PackageOutput::Zone { intermediate_only: true })
    }

    pub fn rust(&self) -> Option<&RustPackage> {
        match &self.source {
            PackageSource::Local { rust, .. } => rust.as_ref(),
            _ => None,
        }
    }
}

impl PackageSource {
    pub fn kind(&self) -> &'static str {
        match self {
            PackageSource::Local { .. } => "local",
            PackageSource::Prebuilt { .. } => "prebuilt",
            PackageSource::Composite { .. } => "composite",
            PackageSource::Manual {} => "manual",
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawManifest {
    install_prefix: Option<toml::Spanned<String>>,
    #[serde(default)]
    package: BTreeMap<PackageName, Package>,
    #[serde(default)]
    target: RawTargetSection,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawTargetSection {
    #[serde(default)]
    preset: BTreeMap<String, BTreeMap<String, String>>,
}

impl Manifest {
    pub fn load(path: &Utf8Path) -> Result<Self, Error> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            what: "read manifest".into(),
            path: path.to_owned(),
            source,
        })?;
        Self::parse(path, &text)
    }

    /// Parses and validates manifest text; `path` is only used in messages.
    pub fn parse(path: &Utf8Path, text: &str) -> Result<Self, Error> {
        let raw: RawManifest = match toml::from_str(text) {
            Ok(raw) => raw,
            Err(err) => return Err(parse_error(path, text, &err)),
        };
        let presets = raw
            .target
            .preset
            .into_iter()
            .map(|(name, pairs)| (name, Target::from_pairs(pairs)))
            .collect();
        let install_prefix = match &raw.install_prefix {
            None => flotilla_contracts::layout::Prefix::default(),
            Some(p) => flotilla_contracts::layout::Prefix::new(p.get_ref()).map_err(|m| {
                let (line, column) = locate::line_column(text, p.span().start);
                Error::Parse {
                    path: path.to_owned(),
                    line,
                    column,
                    message: format!("install_prefix: {m}"),
                }
            })?,
        };
        let manifest = Manifest {
            path: path.to_owned(),
            packages: raw.package,
            presets,
            text: text.into(),
            install_prefix,
        };
        manifest.validate()?;
        Ok(manifest)
    }

    /// The package whose output file is `file`, if any.
    pub fn package_by_output(&self, file: &str) -> Option<(&PackageName, &Package)> {
        self.packages.iter().find(|(name, pkg)| pkg.output_file(name) == file)
    }

    /// The packages a composite is made of, by name, in manifest order.
    pub fn components(&self, name: &PackageName) -> Vec<&PackageName> {
        match self.packages.get(name).map(|p| &p.source) {
            Some(PackageSource::Composite { packages }) => packages
                .iter()
                .filter_map(|file| self.package_by_output(file).map(|(n, _)| n))
                .collect(),
            _ => Vec::new(),
        }
    }

    /// An error about one field of one package (`source.blobs[1].sha256`), located at the
    /// field's value in the text (at the nearest enclosing key when the field is absent), with
    /// the package's `setup_hint`.
    pub fn invalid(&self, package: &PackageName, field: &str, message: impl Into<String>) -> Error {
        let message = message.into();
        let location = match locate::field_span(&self.text, package.as_str(), field, &message) {
            Some(span) => {
                let (line, column) = locate::line_column(&self.text, span.start);
                format!("{}:{line}:{column}: ", self.path)
            }
            None => format!("{}: ", self.path),
        };
        Error::Invalid {
            location,
            package: package.clone(),
            field: field.to_owned(),
            message,
            hint: self.packages.get(package).and_then(|p| p.setup_hint.clone()),
        }
    }

    fn validate(&self) -> Result<(), Error> {
        let mut outputs: BTreeMap<String, &PackageName> = BTreeMap::new();
        for (name, pkg) in &self.packages {
            // Output files are compared case-insensitively: on a case-insensitive file system
            // (macOS developer machines) two such outputs would overwrite each other.
            let file = pkg.output_file(name);
            if let Some(other) = outputs.insert(file.to_ascii_lowercase(), name) {
                return Err(self.invalid(
                    name,
                    "output",
                    format!("output file `{file}` is also the output of package `{other}`"),
                ));
            }
            self.validate_package(name, pkg)?;
        }
        self.check_cycles()
    }

    fn validate_package(&self, name: &PackageName, pkg: &Package) -> Result<(), Error> {
        match &pkg.source {
            PackageSource::Local { rust, blobs, .. } => {
                if let Some(rust) = rust {
                    if rust.binary_names.is_empty() {
                        return Err(self.invalid(
                            name,
                            "source.rust.binary_names",
                            "lists no binaries; remove `source.rust` or name at least one",
                        ));
                    }
                }
                for (i, blob) in blobs.iter().enumerate() {
                    if let Blob::Pinned(p) = blob {
                        let origins = [p.path.is_some(), p.url.is_some(), p.deb.is_some()];
                        if origins.iter().filter(|o| **o).count() != 1 {
                            return Err(self.invalid(
                                name,
                                &format!("source.blobs[{i}]"),
                                "give exactly one of `path`, `url` and `deb`",
                            ));
                        }
                        if let Some(deb) = &p.deb {
                            if let Err(e) = deb.check() {
                                return Err(self.invalid(
                                    name,
                                    &format!("source.blobs[{i}].deb"),
                                    e,
                                ));
                            }
                        }
                    }
                }
            }
            PackageSource::Prebuilt { repo, commit, url, path, .. } => {
                let buildomat = repo.is_some() || commit.is_some();
                if buildomat && (repo.is_none() || commit.is_none()) {
                    return Err(self.invalid(
                        name,
                        if repo.is_none() { "source.repo" } else { "source.commit" },
                        "a buildomat prebuilt needs both `repo` and `commit`",
                    ));
                }
                let origins = [buildomat, url.is_some(), path.is_some()];
                if origins.iter().filter(|o| **o).count() != 1 {
                    return Err(self.invalid(
                        name,
                        "source",
                        "a prebuilt needs exactly one origin: `repo` + `commit`, `url` or `path`",
                    ));
                }
            }
            PackageSource::Composite { packages } => {
                if !matches!(pkg.output, PackageOutput::Zone { .. }) {
                    return Err(self.invalid(
                        name,
                        "output.type",
                        "a composite merges zone images, so its output must be a zone",
                    ));
                }
                for (i, file) in packages.iter().enumerate() {
                    let field = format!("source.packages[{i}]");
                    let Some((member, member_pkg)) = self.package_by_output(file) else {
                        let hint = match PackageName::new(file.as_str()) {
                            Ok(n) if self.packages.contains_key(&n) => {
                                format!(" (did you mean `{}`?)", self.packages[&n].output_file(&n))
                            }
                            _ => String::new(),
                        };
                        return Err(self.invalid(
                            name,
                            &field,
                            format!(
                                "`{file}` is not the output of any package in this manifest{hint}"
                            ),
                        ));
                    };
                    if !matches!(member_pkg.output, PackageOutput::Zone { .. }) {
                        return Err(self.invalid(
                            name,
                            &field,
                            format!("`{member}` is a tarball; composites merge zone images only"),
                        ));
                    }
                }
            }
            PackageSource::Manual {} => {}
        }
        Ok(())
    }

    fn check_cycles(&self) -> Result<(), Error> {
        // Depth-first search with the current path on a stack: meeting a package that is on the
        // stack closes a cycle, which is reported in full.
        fn visit<'a>(
            m: &'a Manifest,
            name: &'a PackageName,
            stack: &mut Vec<&'a PackageName>,
            done: &mut BTreeSet<&'a PackageName>,
        ) -> Result<(), Error> {
            if done.contains(name) {
                return Ok(());
            }
            if let Some(pos) = stack.iter().position(|n| *n == name) {
                let mut cycle: Vec<String> = stack[pos..].iter().map(|n| n.to_string()).collect();
                cycle.push(name.to_string());
                return Err(m.invalid(
                    stack[pos],
                    "source.packages",
                    format!("dependency cycle: {}", cycle.join(" -> ")),
                ));
            }
            stack.push(name);
            for component in m.components(name) {
                visit(m, component, stack, done)?;
            }
            stack.pop();
            done.insert(name);
            Ok(())
        }
        let mut done = BTreeSet::new();
        for name in self.packages.keys() {
            visit(self, name, &mut Vec::new(), &mut done)?;
        }
        Ok(())
    }
}

/// Turns a toml error into `file:line:column: package `p`: field: message`, at the key or
/// value the error is about (see `locate::refine`).
fn parse_error(path: &Utf8Path, text: &str, err: &toml::de::Error) -> Error {
    let message = err.message().trim_end_matches('.').to_owned();
    let Some(span) = err.span() else {
        return Error::Parse { path: path.to_owned(), line: 1, column: 1, message };
    };
    let (start, message) = match locate::refine(text, span.clone(), &message) {
        Some(place) => {
            let mut prefix = String::new();
            if let Some(package) = &place.package {
                prefix.push_str(&format!("package `{package}`: "));
            }
            if !place.field.is_empty() {
                prefix.push_str(&format!("{}: ", place.field));
            }
            (place.span.start, format!("{prefix}{message}"))
        }
        // The text is not a TOML document (a syntax error, a duplicate key): toml's own
        // position, and the package from the last header before it.
        None => {
            let before = &text[..span.start.min(text.len())];
            let message = match enclosing_package(before) {
                Some(package) => format!("package `{package}`: {message}"),
                None => message,
            };
            (span.start, message)
        }
    };
    let (line, column) = locate::line_column(text, start);
    Error::Parse { path: path.to_owned(), line, column, message }
}

/// The package whose table contains the text just before an error: the last `[package.<name>]`
/// (or `[package.<name>.<sub>]`) header before it.
fn enclosing_package(before: &str) -> Option<String> {
    before.lines().rev().find_map(|line| {
        let header = line.trim().strip_prefix('[')?.strip_suffix(']')?.trim();
        let rest = header.strip_prefix("package.")?;
        let name = rest.split('.').next()?.trim().trim_matches('"');
        Some(name.to_owned())
    })
}

#[cfg(test)]
pub(crate) mod tests;
