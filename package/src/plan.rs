//! The plan: everything `package` will do, computed up front as data.
//!
//! The plan names the cargo builds (one per profile), every output with its ordered inputs and
//! the order outputs are assembled in. `--dry-run` prints it, cache keys are computed from it and
//! execution walks it; nothing is written while planning, so a bad manifest leaves `out/` alone.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::{self, Write as _};
use std::os::unix::fs::PermissionsExt;

use camino::{Utf8Component, Utf8Path, Utf8PathBuf};

use crate::manifest::{
    Blob, DebFile, Manifest, Package, PackageName, PackageOutput, PackageSource, ServiceName,
    Sha256Digest, Target,
};
use crate::Error;

/// Bumped whenever the layout of outputs changes, so old cache records become misses.
const LAYOUT_VERSION: u32 = 1;

/// The version written into unstamped packages, as omicron does.
pub const UNSTAMPED_VERSION: &str = "0.0.0";

/// What the planner needs to know about the cargo workspace (from `cargo metadata`).
#[derive(Debug, Clone)]
pub struct Workspace {
    pub target_dir: Utf8PathBuf,
    /// Each workspace crate with the names of its binary targets.
    pub crates: BTreeMap<String, BTreeSet<String>>,
}

/// What to plan.
pub struct PlanConfig<'a> {
    pub manifest: &'a Manifest,
    pub target: &'a Target,
    pub workspace: &'a Workspace,
    pub out_dir: &'a Utf8Path,
    /// Build only these packages and what they are composed of; all packages when empty.
    pub only: &'a [PackageName],
}

#[derive(Debug, Clone)]
pub struct Plan {
    pub target: Target,
    pub cargo_builds: Vec<CargoBuild>,
    pub outputs: BTreeMap<PackageName, OutputPlan>,
    /// Outputs in build order: each batch only depends on earlier batches.
    pub batches: Vec<Vec<PackageName>>,
}

/// One `cargo build` for all binaries of one profile.
///
/// Features are resolved for the packages cargo is asked to build, so `cargo build -p a -p b`
/// links other binaries than `cargo build --workspace`, and alternating the two relinks both
/// every time. When every binary name belongs to one workspace crate only, the build is
/// `--workspace --bin <name>...`: features unified as `cargo build --workspace` unifies them,
/// so the developer's own workspace builds and the packages share one set of binaries. A name
/// two crates share would build both (cargo issue 8157); then the packages are named too.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CargoBuild {
    pub release: bool,
    pub packages: Vec<String>,
    pub bins: Vec<String>,
    /// `--workspace` rather than `--package` for each of `packages`.
    pub workspace: bool,
}

#[derive(Debug, Clone)]
pub struct OutputPlan {
    pub package: PackageName,
    pub service: ServiceName,
    pub file_name: String,
    pub path: Utf8PathBuf,
    pub format: Format,
    pub intermediate_only: bool,
    pub setup_hint: Option<String>,
    /// Packages that must be built first (composite members).
    pub deps: Vec<PackageName>,
    /// The canonical manifest entry and target: part of the cache key.
    pub entry: String,
    pub work: Work,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `.tar.gz`, `oxide.json` first, files under `root/`.
    Zone,
    /// Uncompressed `.tar`, `VERSION` first, files at the root.
    Tarball,
}

#[derive(Debug, Clone)]
pub enum Work {
    /// Written here from these inputs, in order.
    Assemble(Vec<Input>),
    /// Fetched whole and checked against its digest.
    Fetch(Fetch),
    /// Expected in `out/` already.
    Manual,
}

#[derive(Debug, Clone)]
pub enum Input {
    /// A generated file (`oxide.json`, `VERSION`).
    Bytes { dest: Utf8PathBuf, contents: Vec<u8> },
    /// A directory entry.
    Dir { dest: Utf8PathBuf },
    /// A file of this machine; `executable` decides 0755 or 0644.
    File { dest: Utf8PathBuf, source: Utf8PathBuf, executable: bool },
    /// A directory of this machine, added recursively; `entries` is its sorted listing, taken
    /// when planning, so the cache key covers every file in it.
    Tree { dest: Utf8PathBuf, source: Utf8PathBuf, entries: Vec<TreeEntry> },
    /// A blob: fetched (or found locally), checked, then added like a file.
    Blob { dest: Utf8PathBuf, fetch: Fetch },
    /// The entries of another package's output (composites), minus its metadata file.
    Archive { package: PackageName, source: Utf8PathBuf },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreeEntry {
    /// Relative to the tree's root.
    pub rel: Utf8PathBuf,
    pub kind: TreeEntryKind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TreeEntryKind {
    Dir,
    File { executable: bool },
    Symlink { target: String },
}

/// Where an artifact comes from and how it is checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fetch {
    pub origin: Origin,
    /// Omicron's bucket blobs carry no digest; everything else must.
    pub sha256: Option<Sha256Digest>,
    /// Where a download is kept between runs (`out/downloads/...`); unused for local files.
    pub download_path: Utf8PathBuf,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    Local(Utf8PathBuf),
    Url(String),
    /// One file of a Debian package, by `apt-get download` and extraction.
    Deb(DebFile),
}

impl Origin {
    /// The file a fetch from here would use, when it is already there: the local file itself,
    /// or the download at `download_path`.
    pub fn present_at<'a>(&'a self, download_path: &'a Utf8Path) -> Option<&'a Utf8Path> {
        let path = match self {
            Origin::Local(path) => path.as_path(),
            Origin::Url(_) | Origin::Deb(_) => download_path,
        };
        path.is_file().then_some(path)
    }
}

const BUILDOMAT: &str = "https://buildomat.eng.oxide.computer/public/file/oxidecomputer";
const BLOB_BUCKET: &str = "https://oxide-omicron-build.s3.amazonaws.com";

impl CargoBuild {
    /// The arguments after `cargo`.
    pub fn args(&self) -> Vec<String> {
        let mut args = vec!["build".to_owned()];
        if self.release {
            args.push("--release".to_owned());
        }
        if self.workspace {
            args.push("--workspace".to_owned());
        } else {
            for p in &self.packages {
                args.extend(["--package".to_owned(), p.clone()]);
            }
        }
        for b in &self.bins {
            args.extend(["--bin".to_owned(), b.clone()]);
        }
        args
    }

    pub fn profile(&self) -> &'static str {
        if self.release {
            "release"
        } else {
            "debug"
        }
    }

    /// A human description, used in progress and error messages.
    pub fn description(&self) -> String {
        format!("cargo {}", self.args().join(" "))
    }
}

impl Input {
    /// The path in the archive this input is written to, for listings.
    pub fn dest(&self) -> Option<&Utf8Path> {
        match self {
            Input::Bytes { dest, .. }
            | Input::Dir { dest }
            | Input::File { dest, .. }
            | Input::Tree { dest, .. }
            | Input::Blob { dest, .. } => Some(dest),
            Input::Archive { .. } => None,
        }
    }
}

impl Origin {
    fn describe(&self) -> String {
        match self {
            Origin::Local(p) => p.to_string(),
            Origin::Url(u) => u.clone(),
            Origin::Deb(d) => format!("deb {}={} {}", d.package, d.version, d.file),
        }
    }
}

/// Plans a build; see the module documentation.
pub fn plan(config: &PlanConfig<'_>) -> Result<Plan, Error> {
    let manifest = config.manifest;
    let selected = select(config)?;
    let base = manifest.path.parent().map_or_else(|| Utf8PathBuf::from("."), ToOwned::to_owned);
    let base = if base.as_str().is_empty() { Utf8PathBuf::from(".") } else { base };

    let mut outputs = BTreeMap::new();
    let mut groups: BTreeMap<bool, (BTreeSet<String>, BTreeSet<String>)> = BTreeMap::new();
    for name in &selected {
        let pkg = &manifest.packages[name];
        if let Some(rust) = pkg.rust() {
            check_rust(config, name, &rust.binary_names)?;
            let group = groups.entry(rust.release).or_default();
            group.0.insert(name.to_string());
            group.1.extend(rust.binary_names.iter().cloned());
        }
        let planner = Planner { config, base: &base, name, pkg };
        outputs.insert(name.clone(), planner.output()?);
    }
    // Debug builds first, then release: the order is fixed so the plan prints the same way.
    let cargo_builds = groups
        .into_iter()
        .map(|(release, (packages, bins))| {
            let owners = |bin: &String| {
                config.workspace.crates.values().filter(|bins| bins.contains(bin)).count()
            };
            let workspace = bins.iter().all(|b| owners(b) == 1);
            CargoBuild {
                release,
                packages: packages.into_iter().collect(),
                bins: bins.into_iter().collect(),
                workspace,
            }
        })
        .collect();
    let batches = batches(&outputs);
    Ok(Plan { target: config.target.clone(), cargo_builds, outputs, batches })
}

/// The packages to build: those for the target, narrowed to `--only` and their components.
fn select(config: &PlanConfig<'_>) -> Result<BTreeSet<PackageName>, Error> {
    let manifest = config.manifest;
    let in_target = |name: &PackageName| {
        config.target.includes(manifest.packages[name].only_for_targets.as_ref())
    };
    let roots: Vec<PackageName> = if config.only.is_empty() {
        manifest.packages.keys().filter(|n| in_target(n)).cloned().collect()
    } else {
        for name in config.only {
            if !manifest.packages.contains_key(name) {
                return Err(Error::Request(format!(
                    "--only {name}: the manifest {} has no package `{name}`",
                    manifest.path
                )));
            }
            if !in_target(name) {
                return Err(Error::Request(format!(
                    "--only {name}: package `{name}` is not built for target {} (see its \
                     only_for_targets)",
                    config.target
                )));
            }
        }
        config.only.to_vec()
    };
    let mut selected = BTreeSet::new();
    let mut stack = roots;
    while let Some(name) = stack.pop() {
        if !selected.insert(name.clone()) {
            continue;
        }
        for (i, component) in manifest.components(&name).into_iter().enumerate() {
            if !in_target(component) {
                return Err(manifest.invalid(
                    &name,
                    &format!("source.packages[{i}]"),
                    format!(
                        "component `{component}` is not built for target {} (see its \
                         only_for_targets)",
                        config.target
                    ),
                ));
            }
            stack.push(component.clone());
        }
    }
    Ok(selected)
}

fn check_rust(config: &PlanConfig<'_>, name: &PackageName, bins: &[String]) -> Result<(), Error> {
    let manifest = config.manifest;
    let Some(crate_bins) = config.workspace.crates.get(name.as_str()) else {
        return Err(manifest.invalid(
            name,
            "source.rust",
            format!(
                "the workspace has no crate named `{name}` (the crate that builds a package's \
                 binaries must be named like the package)"
            ),
        ));
    };
    for (i, bin) in bins.iter().enumerate() {
        if !crate_bins.contains(bin) {
            let known: Vec<&str> = crate_bins.iter().map(String::as_str).collect();
            return Err(manifest.invalid(
                name,
                &format!("source.rust.binary_names[{i}]"),
                format!(
                    "crate `{name}` has no binary `{bin}` (its binaries: {})",
                    if known.is_empty() { "none".to_owned() } else { known.join(", ") }
                ),
            ));
        }
    }
    Ok(())
}

struct Planner<'a> {
    config: &'a PlanConfig<'a>,
    base: &'a Utf8Path,
    name: &'a PackageName,
    pkg: &'a Package,
}

impl Planner<'_> {
    fn output(&self) -> Result<OutputPlan, Error> {
        let (name, pkg, manifest) = (self.name, self.pkg, self.config.manifest);
        let format = match pkg.output {
            PackageOutput::Zone { .. } => Format::Zone,
            PackageOutput::Tarball {} => Format::Tarball,
        };
        let file_name = pkg.output_file(name);
        let path = self.config.out_dir.join(&file_name);
        let deps: Vec<PackageName> = manifest.components(name).into_iter().cloned().collect();
        let work = match &pkg.source {
            PackageSource::Local { .. } | PackageSource::Composite { .. } => {
                Work::Assemble(self.inputs(format)?)
            }
            PackageSource::Prebuilt { repo, commit, url, path, sha256 } => {
                let origin = match (repo, commit, url, path) {
                    (Some(repo), Some(commit), _, _) => {
                        Origin::Url(format!("{BUILDOMAT}/{repo}/image/{commit}/{file_name}"))
                    }
                    (_, _, Some(url), _) => self.url_origin(url, "source.url")?,
                    (_, _, _, Some(p)) => {
                        let p = self.interpolate(p.raw(), "source.path")?;
                        Origin::Local(self.base.join(p))
                    }
                    _ => unreachable!("validated when the manifest was parsed"),
                };
                Work::Fetch(Fetch {
                    origin,
                    sha256: Some(sha256.clone()),
                    download_path: self.config.out_dir.join("downloads").join(&file_name),
                })
            }
            PackageSource::Manual {} => Work::Manual,
        };
        // The entry is the package as parsed plus the target and layout version: any change in
        // the manifest entry or the target changes the key, so the output is rebuilt.
        let entry = serde_json::json!({
            "layout": LAYOUT_VERSION,
            "package": name,
            "manifest": pkg,
            "target": self.config.target,
        })
        .to_string();
        Ok(OutputPlan {
            package: name.clone(),
            service: pkg.service_name.clone(),
            file_name,
            path,
            format,
            intermediate_only: pkg.is_intermediate_only(),
            setup_hint: pkg.setup_hint.clone(),
            deps,
            entry,
            work,
        })
    }

    fn inputs(&self, format: Format) -> Result<Vec<Input>, Error> {
        let (name, pkg) = (self.name, self.pkg);
        let mut inputs = vec![metadata_input(name, format, UNSTAMPED_VERSION)];
        let service_dir =
            self.config.manifest.install_prefix.as_path().join(pkg.service_name.as_str());
        match &pkg.source {
            PackageSource::Local { rust, paths, blobs, buildomat_blobs } => {
                for (i, mapped) in paths.iter().enumerate() {
                    let from_field = format!("source.paths[{i}].from");
                    let to_field = format!("source.paths[{i}].to");
                    let from = self.base.join(self.interpolate(mapped.from.raw(), &from_field)?);
                    let to = self.interpolate(mapped.to.raw(), &to_field)?;
                    let dest = self.dest(format, &to, &to_field)?;
                    inputs.push(self.path_input(&from, dest, &from_field)?);
                }
                if let Some(rust) = rust {
                    let dir = self.config.workspace.target_dir.join(if rust.release {
                        "release"
                    } else {
                        "debug"
                    });
                    for bin in &rust.binary_names {
                        let dest = match format {
                            Format::Zone => zone_path(&service_dir.join("bin").join(bin)),
                            Format::Tarball => Utf8PathBuf::from(bin),
                        };
                        inputs.push(Input::File { dest, source: dir.join(bin), executable: true });
                    }
                }
                let blob_dir = match format {
                    Format::Zone => zone_path(&service_dir.join("blob")),
                    Format::Tarball => Utf8PathBuf::from("blob"),
                };
                let downloads = self.config.out_dir.join("downloads").join(name.as_str());
                for (i, blob) in blobs.iter().enumerate() {
                    let field = format!("source.blobs[{i}]");
                    let (file, fetch) = match blob {
                        Blob::Bucket(path) => {
                            let file = self.blob_file_name(path.as_str(), None, &field, true)?;
                            let origin = Origin::Url(format!("{BLOB_BUCKET}/{path}"));
                            (
                                file.clone(),
                                Fetch { origin, sha256: None, download_path: downloads.join(file) },
                            )
                        }
                        Blob::Pinned(p) => {
                            let (origin, from) = match (&p.path, &p.url, &p.deb) {
                                (Some(path), _, _) => {
                                    let path =
                                        self.base.join(self.interpolate(path.raw(), &field)?);
                                    (Origin::Local(path.clone()), path.to_string())
                                }
                                (_, Some(url), _) => (self.url_origin(url, &field)?, url.clone()),
                                (_, _, Some(deb)) => (Origin::Deb(deb.clone()), deb.file.clone()),
                                _ => unreachable!("validated when the manifest was parsed"),
                            };
                            let file =
                                self.blob_file_name(&from, p.name.as_deref(), &field, false)?;
                            let download_path = downloads.join(&file);
                            let fetch =
                                Fetch { origin, sha256: Some(p.sha256.clone()), download_path };
                            if let Some(to) = &p.to {
                                let to_field = format!("{field}.to");
                                let to = self.interpolate(to.raw(), &to_field)?;
                                let dest = self.dest(format, &to, &to_field)?;
                                inputs.push(Input::Blob { dest, fetch });
                                continue;
                            }
                            (file, fetch)
                        }
                    };
                    inputs.push(Input::Blob { dest: blob_dir.join(file), fetch });
                }
                for (i, blob) in buildomat_blobs.iter().enumerate() {
                    let field = format!("source.buildomat_blobs[{i}].artifact");
                    let file = self.blob_file_name(&blob.artifact, None, &field, false)?;
                    let origin = Origin::Url(format!(
                        "{BUILDOMAT}/{}/{}/{}/{}",
                        blob.repo, blob.series, blob.commit, blob.artifact
                    ));
                    let fetch = Fetch {
                        origin,
                        sha256: Some(blob.sha256.clone()),
                        download_path: downloads.join(&file),
                    };
                    inputs.push(Input::Blob { dest: blob_dir.join(file), fetch });
                }
            }
            PackageSource::Composite { .. } => {
                for component in self.config.manifest.components(name) {
                    let file = self.config.manifest.packages[component].output_file(component);
                    inputs.push(Input::Archive {
                        package: component.clone(),
                        source: self.config.out_dir.join(file),
                    });
                }
            }
            PackageSource::Prebuilt { .. } | PackageSource::Manual {} => {}
        }
        Ok(inputs)
    }

    fn interpolate(&self, raw: &str, field: &str) -> Result<String, Error> {
        crate::manifest::InterpolatedString::new(raw)
            .interpolate(self.config.target)
            .map_err(|e| self.config.manifest.invalid(self.name, field, e))
    }

    fn url_origin(&self, url: &str, field: &str) -> Result<Origin, Error> {
        if let Some(path) = url.strip_prefix("file://") {
            return Ok(Origin::Local(Utf8PathBuf::from(path)));
        }
        if url.starts_with("https://") || url.starts_with("http://") {
            return Ok(Origin::Url(url.to_owned()));
        }
        Err(self.config.manifest.invalid(
            self.name,
            field,
            format!("`{url}` is not an http(s):// or file:// URL"),
        ))
    }

    /// Where a blob lands inside `blob/`. A bucket path keeps its directories, as omicron's
    /// do (`alpine/alpine.iso` lands at `blob/alpine/alpine.iso`); a `name` may name
    /// directories too; otherwise the last component of the path or URL is the file's name.
    /// Each is a plain relative path: nothing that leaves `blob/`.
    fn blob_file_name(
        &self,
        from: &str,
        name: Option<&str>,
        field: &str,
        nested: bool,
    ) -> Result<String, Error> {
        let invalid =
            |field: String, msg: String| self.config.manifest.invalid(self.name, &field, msg);
        let plain = |p: &str| {
            !p.is_empty()
                && !p.starts_with('/')
                && p.split('/').all(|c| !c.is_empty() && c != "." && c != "..")
        };
        if let Some(name) = name {
            if !plain(name) {
                return Err(invalid(
                    format!("{field}.name"),
                    format!("`{name}` is not a relative path inside blob/ (no `..`, `.`, `//`, or leading `/`)"),
                ));
            }
            return Ok(name.to_owned());
        }
        if nested {
            if !plain(from) {
                return Err(invalid(
                    field.to_owned(),
                    format!("`{from}` is not a relative path in the bucket (no `..`, `.`, `//`, or leading `/`)"),
                ));
            }
            return Ok(from.to_owned());
        }
        let file = from.rsplit('/').next().unwrap_or("");
        if !plain(file) {
            return Err(invalid(
                field.to_owned(),
                format!("cannot take a file name from `{from}`; give `name`"),
            ));
        }
        Ok(file.to_owned())
    }

    /// Checks a `to` path and maps it into the archive. Zone images need absolute paths (they
    /// land under `root/`); tarballs take paths relative to their root, as omicron's do. `..`
    /// is refused in both, because it would write outside the package when unpacked.
    fn dest(&self, format: Format, to: &str, field: &str) -> Result<Utf8PathBuf, Error> {
        let to = Utf8Path::new(to);
        let invalid = |msg: String| self.config.manifest.invalid(self.name, field, msg);
        if to.components().any(|c| c == Utf8Component::ParentDir) {
            return Err(invalid(format!("`{to}` must not contain `..`")));
        }
        match format {
            Format::Zone if !to.is_absolute() => Err(invalid(format!(
                "`{to}` is relative; zone images need an absolute path (it lands under root/)"
            ))),
            Format::Zone => Ok(zone_path(to)),
            Format::Tarball => {
                let rel: Utf8PathBuf =
                    to.components().filter(|c| matches!(c, Utf8Component::Normal(_))).collect();
                if rel.as_str().is_empty() {
                    return Err(invalid(format!("`{to}` names the archive root itself")));
                }
                Ok(rel)
            }
        }
    }

    fn path_input(&self, from: &Utf8Path, dest: Utf8PathBuf, field: &str) -> Result<Input, Error> {
        let invalid = |msg: String| self.config.manifest.invalid(self.name, field, msg);
        let meta = match std::fs::metadata(from) {
            Ok(meta) => meta,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(invalid(format!("`{from}` does not exist")))
            }
            Err(e) => return Err(invalid(format!("`{from}`: {e}"))),
        };
        if meta.is_dir() {
            let mut entries = Vec::new();
            list_tree(from, Utf8Path::new(""), &mut entries).map_err(invalid)?;
            return Ok(Input::Tree { dest, source: from.to_owned(), entries });
        }
        if !meta.is_file() {
            return Err(invalid(format!("`{from}` is neither a file nor a directory")));
        }
        let executable = meta.permissions().mode() & 0o111 != 0;
        Ok(Input::File { dest, source: from.to_owned(), executable })
    }
}

/// The generated first entry: `oxide.json` for zones (the format omicron's installer reads),
/// `VERSION` for tarballs.
pub fn metadata_input(name: &PackageName, format: Format, version: &str) -> Input {
    match format {
        Format::Zone => Input::Bytes {
            dest: "oxide.json".into(),
            contents: serde_json::json!({"v": "1", "t": "layer", "pkg": name, "version": version})
                .to_string()
                .into_bytes(),
        },
        Format::Tarball => Input::Bytes { dest: "VERSION".into(), contents: version.into() },
    }
}

/// The name of the metadata entry of an output format.
pub fn metadata_file(format: Format) -> &'static str {
    match format {
        Format::Zone => "oxide.json",
        Format::Tarball => "VERSION",
    }
}

fn zone_path(abs: &Utf8Path) -> Utf8PathBuf {
    let rel: Utf8PathBuf =
        abs.components().filter(|c| matches!(c, Utf8Component::Normal(_))).collect();
    Utf8PathBuf::from("root").join(rel)
}

/// Lists a directory as the archive writer walks it: sorted by byte order, depth first.
fn list_tree(root: &Utf8Path, rel: &Utf8Path, out: &mut Vec<TreeEntry>) -> Result<(), String> {
    let dir = root.join(rel);
    let mut names = Vec::new();
    for entry in std::fs::read_dir(&dir).map_err(|e| format!("list `{dir}`: {e}"))? {
        let entry = entry.map_err(|e| format!("list `{dir}`: {e}"))?;
        let name =
            entry.file_name().into_string().map_err(|n| format!("`{dir}/{n:?}` is not UTF-8"))?;
        names.push(name);
    }
    names.sort_unstable();
    for name in names {
        let rel = rel.join(&name);
        let path = root.join(&rel);
        let meta = std::fs::symlink_metadata(&path).map_err(|e| format!("`{path}`: {e}"))?;
        let kind = if meta.is_symlink() {
            let target = std::fs::read_link(&path).map_err(|e| format!("`{path}`: {e}"))?;
            TreeEntryKind::Symlink { target: target.to_string_lossy().into_owned() }
        } else if meta.is_dir() {
            TreeEntryKind::Dir
        } else if meta.is_file() {
            TreeEntryKind::File { executable: meta.permissions().mode() & 0o111 != 0 }
        } else {
            return Err(format!("`{path}` is neither a file, a directory nor a symlink"));
        };
        let is_dir = kind == TreeEntryKind::Dir;
        out.push(TreeEntry { rel: rel.clone(), kind });
        if is_dir {
            list_tree(root, &rel, out)?;
        }
    }
    Ok(())
}

/// Groups outputs into batches: a package lands in the batch after its last dependency.
fn batches(outputs: &BTreeMap<PackageName, OutputPlan>) -> Vec<Vec<PackageName>> {
    let mut level: BTreeMap<&PackageName, usize> = BTreeMap::new();
    fn depth<'a>(
        name: &'a PackageName,
        outputs: &'a BTreeMap<PackageName, OutputPlan>,
        level: &mut BTreeMap<&'a PackageName, usize>,
    ) -> usize {
        if let Some(l) = level.get(name) {
            return *l;
        }
        // The manifest was checked for cycles, so this recursion ends.
        let l = outputs[name].deps.iter().map(|d| depth(d, outputs, level) + 1).max().unwrap_or(0);
        level.insert(name, l);
        l
    }
    for name in outputs.keys() {
        depth(name, outputs, &mut level);
    }
    let mut batches: Vec<Vec<PackageName>> = Vec::new();
    for (name, l) in level {
        if batches.len() <= l {
            batches.resize(l + 1, Vec::new());
        }
        batches[l].push(name.clone());
    }
    batches
}

/// What a run would do with one output, as far as can be known without doing it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Assembled before from the same inputs: nothing to do.
    Hit,
    /// Assembled again, for this reason.
    Miss(String),
    /// Put in place by hand; `present` says whether it is.
    Manual { present: bool },
    /// A finished archive, fetched unless present with its sha256.
    Prebuilt,
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Verdict::Hit => f.write_str("(cache hit)"),
            Verdict::Miss(reason) => write!(f, "(cache miss: {reason})"),
            Verdict::Manual { present: true } => f.write_str("(manual: in place)"),
            Verdict::Manual { present: false } => f.write_str("(manual: MISSING)"),
            Verdict::Prebuilt => f.write_str("(prebuilt: fetched unless present with its sha256)"),
        }
    }
}

impl Plan {
    /// Renders the plan for `--dry-run`, ending with a summary; `status` gives each output's
    /// verdict (an output without one is counted as not checked).
    pub fn render(&self, status: &BTreeMap<PackageName, Verdict>) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "target: {}", self.target);
        if self.cargo_builds.is_empty() {
            let _ = writeln!(s, "cargo: nothing to build");
        }
        for build in &self.cargo_builds {
            let _ = writeln!(s, "cargo: {}", build.description());
        }
        for (i, batch) in self.batches.iter().enumerate() {
            let _ = writeln!(
                s,
                "batch {}: {}",
                i + 1,
                batch.iter().map(|p| p.as_str()).collect::<Vec<_>>().join(" ")
            );
        }
        for batch in &self.batches {
            for name in batch {
                let out = &self.outputs[name];
                let verdict = status.get(name).map_or_else(String::new, |v| v.to_string());
                let _ = writeln!(s, "\n{} [{}] {verdict}", out.path, name);
                match &out.work {
                    Work::Manual => {
                        let _ = writeln!(s, "  manual: expected in place, put there by hand");
                        if let (Some(Verdict::Manual { present: false }), Some(hint)) =
                            (status.get(name), &out.setup_hint)
                        {
                            let _ = writeln!(s, "  hint: {hint}");
                        }
                    }
                    Work::Fetch(fetch) => {
                        let _ = writeln!(s, "  fetch {}", describe_fetch(fetch));
                    }
                    Work::Assemble(inputs) => {
                        for input in inputs {
                            let _ = writeln!(s, "  {}", describe_input(input));
                        }
                    }
                }
            }
        }
        let _ = writeln!(s, "\n{}", self.summary(status));
        s
    }

    /// One line for the end of a long plan: the packages, what the cache says of them, the
    /// cargo commands, the downloads.
    pub fn summary(&self, status: &BTreeMap<PackageName, Verdict>) -> String {
        let (mut hits, mut misses, mut prebuilt, mut manual, mut missing, mut unchecked) =
            (0, 0, 0, 0, 0, 0);
        for name in self.outputs.keys() {
            match status.get(name) {
                Some(Verdict::Hit) => hits += 1,
                Some(Verdict::Miss(_)) => misses += 1,
                Some(Verdict::Prebuilt) => prebuilt += 1,
                Some(Verdict::Manual { present }) => {
                    manual += 1;
                    missing += usize::from(!present);
                }
                None => unchecked += 1,
            }
        }
        let intermediate = self.outputs.values().filter(|o| o.intermediate_only).count();
        let fetches = self.outputs.values().flat_map(|o| match &o.work {
            Work::Fetch(fetch) => vec![fetch],
            Work::Assemble(inputs) => inputs
                .iter()
                .filter_map(|i| match i {
                    Input::Blob { fetch, .. } => Some(fetch),
                    _ => None,
                })
                .collect(),
            Work::Manual => Vec::new(),
        });
        let (mut downloads, mut local) = (0, 0);
        for fetch in fetches {
            match fetch.origin {
                Origin::Local(_) => local += 1,
                Origin::Url(_) | Origin::Deb(_) => downloads += 1,
            }
        }
        let plural =
            |n: usize, one: &str, many: &str| format!("{n} {}", if n == 1 { one } else { many });
        let mut cache = vec![
            plural(hits, "hit", "hits"),
            plural(misses, "miss", "misses"),
            format!("{prebuilt} prebuilt"),
            format!("{manual} manual"),
        ];
        if missing > 0 {
            cache.push(format!("{missing} manual MISSING"));
        }
        if unchecked > 0 {
            cache.push(format!("{unchecked} not checked"));
        }
        format!(
            "summary: {} ({intermediate} intermediate) for target {}; cache: {}; cargo: {}; \
             downloads: {} (fetched unless present with their sha256), {}",
            plural(self.outputs.len(), "package", "packages"),
            self.target,
            cache.join(", "),
            plural(self.cargo_builds.len(), "command", "commands"),
            downloads,
            plural(local, "local file", "local files"),
        )
    }
}

fn describe_fetch(fetch: &Fetch) -> String {
    match &fetch.sha256 {
        Some(sha) => format!("{} (sha256 {sha})", fetch.origin.describe()),
        None => fetch.origin.describe(),
    }
}

fn describe_input(input: &Input) -> String {
    let mode = |x: bool| if x { "0755" } else { "0644" };
    match input {
        Input::Bytes { dest, contents } => {
            format!("{dest} 0644 <- generated: {}", String::from_utf8_lossy(contents))
        }
        Input::Dir { dest } => format!("{dest}/ 0755"),
        Input::File { dest, source, executable } => {
            format!("{dest} {} <- {source}", mode(*executable))
        }
        Input::Tree { dest, source, entries } => {
            let mut s = format!("{dest}/ 0755 <- {source}/");
            for e in entries {
                let _ = match &e.kind {
                    TreeEntryKind::Dir => write!(s, "\n    {dest}/{}/ 0755", e.rel),
                    TreeEntryKind::File { executable } => {
                        write!(s, "\n    {dest}/{} {}", e.rel, mode(*executable))
                    }
                    TreeEntryKind::Symlink { target } => {
                        write!(s, "\n    {dest}/{} -> {target}", e.rel)
                    }
                };
            }
            s
        }
        Input::Blob { dest, fetch } => format!("{dest} 0644 <- blob {}", describe_fetch(fetch)),
        Input::Archive { package, source } => format!("entries of {source} (package {package})"),
    }
}

#[cfg(test)]
#[path = "plan_tests.rs"]
mod tests;
