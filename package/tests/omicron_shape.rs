//! The manifest of `tests/omicron-shape/`, in the shape of Omicron's, planned and packaged for
//! each of its presets: the plans (`--dry-run`'s text) and the listings of every archive
//! built are compared with golden files. `UPDATE_GOLDEN=1` rewrites them.
//!
//! Everything is local: the test writes the binaries cargo would have built, the buildomat and
//! bucket blobs into `out/downloads/` (where a fetch looks first), the prebuilt image and the
//! manual package; the digests the manifest pins are those of what it wrote.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read as _;
use std::os::unix::fs::PermissionsExt as _;

use camino::{Utf8Path, Utf8PathBuf};
use flotilla_package::build::{self, CacheMode, CargoRunner, ExecuteConfig, Progress, Rebuild};
use flotilla_package::manifest::Manifest;
use flotilla_package::plan::{self, CargoBuild, PlanConfig, Workspace};
use flotilla_package::Retry;
use sha2::Digest as _;

const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/omicron-shape");

/// The binaries each crate of the pretended workspace builds.
const CRATES: &[(&str, &str)] = &[
    ("omicron-sled-agent", "sled-agent"),
    ("installinator", "installinator"),
    ("omicron-nexus", "nexus"),
];

struct Scratch(Utf8PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The cargo builds already happened: the test wrote their binaries.
struct NoCargo;
impl CargoRunner for NoCargo {
    fn run(&self, build: &CargoBuild) -> Result<(), String> {
        Err(format!("the test runs no cargo, but was asked for {}", build.description()))
    }
}

struct Quiet;
impl Progress for Quiet {}

fn sha256(bytes: &[u8]) -> String {
    sha2::Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// A small zone image: `oxide.json` first, then one file under `root/`.
fn zone_image(service: &str, file: &str) -> Vec<u8> {
    let mut tar = tar::Builder::new(flate2::write::GzEncoder::new(
        Vec::new(),
        flate2::Compression::default(),
    ));
    let json = format!(r#"{{"v":"1","t":"layer","pkg":"{service}","version":"0.0.0"}}"#);
    for (path, contents, mode) in
        [("oxide.json", json.as_bytes(), 0o644), (file, b"#!/bin/sh\n".as_slice(), 0o755)]
    {
        let mut header = tar::Header::new_ustar();
        header.set_size(contents.len() as u64);
        header.set_mode(mode);
        header.set_mtime(0);
        header.set_uid(0);
        header.set_gid(0);
        header.set_cksum();
        tar.append_data(&mut header, path, contents).unwrap();
    }
    tar.into_inner().unwrap().finish().unwrap()
}

fn write(path: &Utf8Path, contents: &[u8], mode: u32) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, contents).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn copy_tree(from: &Utf8Path, to: &Utf8Path) {
    for entry in from.read_dir_utf8().unwrap() {
        let entry = entry.unwrap();
        let dest = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_tree(entry.path(), &dest);
        } else if entry.file_name() != "golden" {
            write(&dest, &std::fs::read(entry.path()).unwrap(), 0o644);
        }
    }
}

/// `mode uid/gid size path` of every entry, in archive order.
fn listing(path: &Utf8Path) -> Vec<String> {
    let file = std::fs::File::open(path).unwrap();
    let reader: Box<dyn std::io::Read> = if path.as_str().ends_with(".gz") {
        Box::new(flate2::read::GzDecoder::new(file))
    } else {
        Box::new(file)
    };
    let mut archive = tar::Archive::new(reader);
    archive
        .entries()
        .unwrap()
        .map(|e| {
            let mut e = e.unwrap();
            let h = e.header().clone();
            let kind = if h.entry_type().is_dir() { 'd' } else { '-' };
            let path = e.path().unwrap().display().to_string();
            let mut rest = Vec::new();
            e.read_to_end(&mut rest).unwrap();
            format!(
                "{kind}{:04o} {}/{} {} {path}",
                h.mode().unwrap(),
                h.uid().unwrap(),
                h.gid().unwrap(),
                h.size().unwrap()
            )
        })
        .collect()
}

/// Compares `actual` with the golden file `name`, or rewrites it under `UPDATE_GOLDEN`.
fn golden(name: &str, actual: &str, differ: &mut Vec<String>) {
    let path = Utf8Path::new(FIXTURE).join("golden").join(name);
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, actual).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_default();
    if expected != actual {
        differ.push(format!("{path}:\n--- expected\n{expected}--- actual\n{actual}"));
    }
}

#[test]
fn omicrons_shapes_plan_and_package_for_every_preset() {
    let mut differ = Vec::new();
    for preset in ["default", "dev", "recovery"] {
        let dir =
            std::env::temp_dir().join(format!("flotilla-shape-{preset}-{}", std::process::id()));
        let dir = Utf8PathBuf::try_from(dir).unwrap();
        let _cleanup = Scratch(dir.clone());
        let _ = std::fs::remove_dir_all(&dir);
        copy_tree(Utf8Path::new(FIXTURE), &dir);
        let out = dir.join("out");
        let target_dir = dir.join("target");
        for (_, bin) in CRATES {
            write(
                &target_dir.join("release").join(bin),
                format!("#!/bin/sh\necho {bin}\n").as_bytes(),
                0o755,
            );
        }
        // What the fetches would have downloaded, where they look first.
        let console = b"console assets\n".to_vec();
        write(&out.join("downloads/omicron-nexus/console.tar.gz"), &console, 0o644);
        write(&out.join("downloads/omicron-nexus/alpine/alpine.tar.gz"), b"alpine\n", 0o644);
        let crucible = zone_image("crucible_prebuilt", "root/opt/oxide/crucible/bin/crucible");
        write(&out.join("downloads/crucible.tar.gz"), &crucible, 0o644);
        let shas = [("@CONSOLE_SHA@", sha256(&console)), ("@CRUCIBLE_SHA@", sha256(&crucible))];
        let manifest_path = dir.join("package-manifest.toml");
        let mut text = std::fs::read_to_string(&manifest_path).unwrap();
        for (placeholder, sha) in &shas {
            text = text.replace(placeholder, sha);
        }
        std::fs::write(&manifest_path, &text).unwrap();
        let normalize = |s: &str| {
            let mut s = s.replace(dir.as_str(), "<fixture>");
            for (placeholder, sha) in &shas {
                s = s.replace(sha, placeholder);
            }
            s
        };

        let manifest = Manifest::load(&manifest_path).unwrap();
        let target = manifest.presets[preset].clone();
        let workspace = Workspace {
            target_dir: target_dir.clone(),
            crates: CRATES
                .iter()
                .map(|(krate, bin)| (krate.to_string(), BTreeSet::from([bin.to_string()])))
                .collect(),
        };
        let plan = plan::plan(&PlanConfig {
            manifest: &manifest,
            target: &target,
            workspace: &workspace,
            out_dir: &out,
            only: &[],
        })
        .unwrap();
        let manual = plan.outputs.keys().any(|n| n.as_str() == "dendrite-asic");
        assert_eq!(
            manual,
            preset != "dev",
            "{preset}: only switch=asic selects the manual package"
        );

        // Before anything is built: every assembled output misses, a manual one is missing
        // and its setup_hint is shown.
        let before = normalize(&plan.render(&build::cache_status(&plan, &out)));
        golden(&format!("plan-{preset}.txt"), &before, &mut differ);
        if manual {
            assert!(before.contains("(manual: MISSING)\n  manual: expected in place, put there by hand\n  hint: Build dendrite"), "{before}");
            write(
                &out.join("dendrite-asic.tar.gz"),
                &zone_image("dendrite", "root/opt/oxide/dendrite/bin/dpd"),
                0o644,
            );
        }

        let report = build::execute(
            &ExecuteConfig {
                plan: &plan,
                out_dir: &out,
                jobs: 2,
                cache: CacheMode::Enabled,
                rebuild: Rebuild::No,
                mtime: 1_700_000_000,
                retry: Retry { count: 0, delay: std::time::Duration::ZERO },
            },
            &NoCargo,
            &Quiet,
        )
        .unwrap();
        assert!(report.failed.is_empty(), "{preset}: {:?}", report.failed);
        let mut listings = String::new();
        let files: BTreeMap<String, Utf8PathBuf> =
            plan.outputs.values().map(|o| (o.file_name.clone(), o.path.clone())).collect();
        for (file, path) in files {
            listings.push_str(&format!("== {file}\n"));
            for line in listing(&path) {
                listings.push_str(&line);
                listings.push('\n');
            }
        }
        golden(&format!("listing-{preset}.txt"), &listings, &mut differ);

        // Planned again: every assembled output is a cache hit.
        let status = build::cache_status(&plan, &out);
        let after = plan.summary(&status);
        let misses: Vec<String> = status
            .iter()
            .filter(|(_, v)| matches!(v, plan::Verdict::Miss(_)))
            .map(|(n, v)| format!("{n} {v}"))
            .collect();
        let assembled =
            plan.outputs.values().filter(|o| matches!(o.work, plan::Work::Assemble(_))).count();
        assert!(misses.is_empty(), "{preset}: {misses:?}");
        assert!(after.contains(&format!("cache: {assembled} hit")), "{preset}: {after}");
        assert!(after.contains(" 0 misses"), "{preset}: {after}");
    }
    assert!(
        differ.is_empty(),
        "differ from golden files (UPDATE_GOLDEN=1 rewrites them):\n{}",
        differ.join("\n")
    );
}
