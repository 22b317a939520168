use super::*;

fn data_dir() -> Utf8PathBuf {
    Utf8Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data")
}

fn omicron_workspace() -> Workspace {
    let crates = [
        ("omicron-sled-agent", &["sled-agent", "zone-bundle"][..]),
        ("installinator", &["installinator"][..]),
        ("omicron-nexus", &["nexus", "schema-updater", "nexus-db-dev"][..]),
    ];
    Workspace {
        target_dir: "/ws/target".into(),
        crates: crates
            .iter()
            .map(|(c, bins)| (c.to_string(), bins.iter().map(|b| b.to_string()).collect()))
            .collect(),
    }
}

fn names(list: &[&str]) -> Vec<PackageName> {
    list.iter().map(|n| PackageName::new(*n).unwrap()).collect()
}

fn plan_omicron(preset: &str, only: &[&str]) -> Result<Plan, Error> {
    let manifest = Manifest::load(&data_dir().join("omicron-style.toml")).unwrap();
    let target = manifest.presets[preset].clone();
    let only = names(only);
    let config = PlanConfig {
        manifest: &manifest,
        target: &target,
        workspace: &omicron_workspace(),
        out_dir: Utf8Path::new("/ws/out"),
        only: &only,
    };
    plan(&config)
}

fn dests(plan: &Plan, pkg: &str) -> Vec<String> {
    let Work::Assemble(inputs) = &plan.outputs[&names(&[pkg])[0]].work else {
        panic!("{pkg} is not assembled");
    };
    inputs.iter().map(|i| i.dest().map_or("<archive>".to_owned(), |d| d.to_string())).collect()
}

#[test]
fn omicron_manifest_plans_for_the_default_preset() {
    let plan = plan_omicron("default", &[]).unwrap();
    let planned: Vec<&str> = plan.outputs.keys().map(|n| n.as_str()).collect();
    // installinator is trampoline-only and the asic switch needs switch=asic.
    assert_eq!(
        planned,
        ["crucible", "mg-ddm-gz", "nexus", "omicron-nexus", "omicron-sled-agent", "zone-setup"]
    );
    assert_eq!(
        plan.cargo_builds,
        [CargoBuild {
            release: true,
            packages: vec!["omicron-nexus".into(), "omicron-sled-agent".into()],
            bins: ["nexus", "schema-updater", "sled-agent", "zone-bundle"]
                .map(String::from)
                .to_vec(),
            workspace: true,
        }]
    );
    // Features unified over the workspace, as `cargo build --workspace` unifies them.
    assert_eq!(
        plan.cargo_builds[0].args().join(" "),
        "build --release --workspace --bin nexus --bin schema-updater --bin sled-agent --bin \
         zone-bundle"
    );
    // A binary name two crates share would build both: then the packages are named.
    let shared = CargoBuild { workspace: false, ..plan.cargo_builds[0].clone() };
    assert_eq!(
        shared.args().join(" "),
        "build --release --package omicron-nexus --package omicron-sled-agent --bin nexus \
         --bin schema-updater --bin sled-agent --bin zone-bundle"
    );
    assert_eq!(
        plan.batches,
        vec![
            names(&["crucible", "mg-ddm-gz", "omicron-nexus", "omicron-sled-agent", "zone-setup"]),
            names(&["nexus"]),
        ]
    );
    // A tarball: VERSION first, relative destinations, binaries at the root.
    assert_eq!(
        dests(&plan, "omicron-sled-agent"),
        ["VERSION", "pkg/manifest.xml", "pkg", "sled-agent", "zone-bundle"]
    );
    // A zone: oxide.json first, everything under root/, blobs under the service's blob/.
    assert_eq!(
        dests(&plan, "omicron-nexus"),
        [
            "oxide.json",
            "root/var/svc/manifest/site/nexus/manifest.xml",
            "root/var/svc/manifest/site/nexus",
            "root/opt/flotilla/omicron-nexus/bin/nexus",
            "root/opt/flotilla/omicron-nexus/bin/schema-updater",
            "root/opt/flotilla/omicron-nexus/blob/alpine.tar.gz",
            "root/opt/flotilla/omicron-nexus/blob/console.tar.gz",
        ]
    );
    assert_eq!(dests(&plan, "nexus"), ["oxide.json", "<archive>", "<archive>", "<archive>"]);
    let Work::Fetch(fetch) = &plan.outputs[&names(&["crucible"])[0]].work else { panic!() };
    assert_eq!(
        fetch.origin,
        Origin::Url(
            "https://buildomat.eng.oxide.computer/public/file/oxidecomputer/crucible/image/\
             2bfe090eb5318ec8c467157018db2429d4df535b/crucible.tar.gz"
                .into()
        )
    );
    let Work::Assemble(inputs) = &plan.outputs[&names(&["omicron-nexus"])[0]].work else {
        panic!()
    };
    let Input::Blob { fetch, .. } = &inputs[6] else { panic!() };
    assert_eq!(
        fetch.origin,
        Origin::Url(
            "https://buildomat.eng.oxide.computer/public/file/oxidecomputer/console/assets/\
             0123456789abcdef0123456789abcdef01234567/console.tar.gz"
                .into()
        )
    );
    // The interpolated directory was listed at planning time.
    let Input::Tree { entries, source, .. } = &inputs[2] else { panic!() };
    assert!(source.ends_with("smf/nexus/single-sled"));
    assert_eq!(entries[0].rel, "config.toml");
}

#[test]
fn asic_target_selects_the_manual_package_and_its_composite() {
    let plan = plan_omicron("asic", &["switch-asic"]).unwrap();
    let planned: Vec<&str> = plan.outputs.keys().map(|n| n.as_str()).collect();
    assert_eq!(planned, ["dendrite-asic", "switch-asic", "zone-setup"]);
    assert!(plan.cargo_builds.is_empty());
    assert!(matches!(plan.outputs[&names(&["dendrite-asic"])[0]].work, Work::Manual));
}

#[test]
fn only_pulls_in_composite_members() {
    let plan = plan_omicron("default", &["nexus"]).unwrap();
    let planned: Vec<&str> = plan.outputs.keys().map(|n| n.as_str()).collect();
    assert_eq!(planned, ["crucible", "nexus", "omicron-nexus", "zone-setup"]);
    let e = plan_omicron("default", &["switch-asic"]).unwrap_err().to_string();
    assert_eq!(
        e,
        "--only switch-asic: package `switch-asic` is not built for target image=standard \
         machine=non-gimlet rack-topology=single-sled switch=stub (see its only_for_targets)"
    );
    let e = plan_omicron("default", &["nope"]).unwrap_err().to_string();
    assert!(e.starts_with("--only nope: the manifest "), "{e}");
}

#[test]
fn entry_changes_with_the_target() {
    let a = plan_omicron("default", &["zone-setup"]).unwrap();
    let b = plan_omicron("asic", &["zone-setup"]).unwrap();
    let n = &names(&["zone-setup"])[0];
    assert_ne!(a.outputs[n].entry, b.outputs[n].entry);
}

/// A scratch directory with a manifest, removed when dropped.
struct Scratch(Utf8PathBuf);

impl Scratch {
    fn new(manifest: &str) -> Scratch {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = Utf8PathBuf::try_from(std::env::temp_dir())
            .unwrap()
            .join(format!("flotilla-plan-{}-{n}", std::process::id()));
        std::fs::create_dir_all(dir.join("smf/agent")).unwrap();
        std::fs::write(dir.join("smf/agent/config.toml"), "x = 1\n").unwrap();
        std::fs::write(dir.join("package-manifest.toml"), manifest).unwrap();
        Scratch(dir)
    }

    fn plan(&self) -> Result<Plan, Error> {
        let manifest = Manifest::load(&self.0.join("package-manifest.toml"))?;
        let workspace = Workspace {
            target_dir: self.0.join("target"),
            crates: [("agent".to_owned(), ["agent".to_owned()].into())].into(),
        };
        let target = Target::default();
        plan(&PlanConfig {
            manifest: &manifest,
            target: &target,
            workspace: &workspace,
            out_dir: &self.0.join("out"),
            only: &[],
        })
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn agent(paths: &str, bins: &str) -> String {
    format!(
        "[package.agent]\nservice_name = \"agent\"\nsource.type = \"local\"\n\
         source.rust.binary_names = [{bins}]\nsource.rust.release = false\n\
         source.paths = [{paths}]\noutput.type = \"zone\"\n"
    )
}

#[test]
fn local_zone_layout_and_debug_build() {
    let s = Scratch::new(&agent(
        r#"{ from = "smf/agent", to = "/opt/flotilla/agent/pkg" }"#,
        r#""agent""#,
    ));
    let plan = s.plan().unwrap();
    assert_eq!(plan.cargo_builds[0].args(), ["build", "--workspace", "--bin", "agent"]);
    assert_eq!(
        dests(&plan, "agent"),
        ["oxide.json", "root/opt/flotilla/agent/pkg", "root/opt/flotilla/agent/bin/agent"]
    );
    let Work::Assemble(inputs) = &plan.outputs[&names(&["agent"])[0]].work else { panic!() };
    let Input::Bytes { contents, .. } = &inputs[0] else { panic!() };
    assert_eq!(
        String::from_utf8_lossy(contents),
        r#"{"pkg":"agent","t":"layer","v":"1","version":"0.0.0"}"#
    );
    let Input::File { source, executable, .. } = &inputs[2] else { panic!() };
    assert_eq!(source, &s.0.join("target/debug/agent"));
    assert!(executable);
    let rendered = plan.render(&BTreeMap::new());
    assert!(rendered.contains("cargo: cargo build --workspace --bin agent"), "{rendered}");
    assert!(rendered.contains("root/opt/flotilla/agent/pkg/config.toml 0644"), "{rendered}");
}

#[test]
fn the_manifests_install_prefix_places_every_services_binaries() {
    let s = Scratch::new(&format!(
        "install_prefix = \"/opt/oxide\"\n{}",
        agent(r#"{ from = "smf/agent", to = "/opt/oxide/agent/pkg" }"#, r#""agent""#)
    ));
    let plan = s.plan().unwrap();
    assert_eq!(
        dests(&plan, "agent"),
        ["oxide.json", "root/opt/oxide/agent/pkg", "root/opt/oxide/agent/bin/agent"]
    );
    for bad in ["/etc", "opt/x", "/opt/../etc"] {
        let text = format!("install_prefix = {bad:?}\n{}", agent("", r#""agent""#));
        let err = Manifest::parse(Utf8Path::new("m.toml"), &text).unwrap_err().to_string();
        assert!(err.contains("m.toml:1:18") && err.contains("install_prefix: "), "{bad}: {err}");
    }
}

#[test]
fn bad_paths_and_binaries_are_refused() {
    let cases = [
        (
            agent(r#"{ from = "smf/agent", to = "opt/agent" }"#, r#""agent""#),
            "\"opt/agent\"",
            "source.paths[0].to: `opt/agent` is relative; zone images need an absolute path \
             (it lands under root/)",
        ),
        (
            agent(r#"{ from = "smf/agent", to = "/opt/../etc" }"#, r#""agent""#),
            "\"/opt/../etc\"",
            "source.paths[0].to: `/opt/../etc` must not contain `..`",
        ),
        (
            agent(r#"{ from = "smf/missing", to = "/opt/x" }"#, r#""agent""#),
            "\"smf/missing\"",
            "source.paths[0].from: `{dir}/smf/missing` does not exist",
        ),
        (
            agent(r#"{ from = "smf/{{machine}}", to = "/opt/x" }"#, r#""agent""#),
            "\"smf/{{machine}}\"",
            "source.paths[0].from: `smf/{{machine}}` uses `{{machine}}` but the target (empty) \
             does not define `machine`",
        ),
        (
            agent("", r#""agent", "agentd""#),
            "\"agentd\"",
            "source.rust.binary_names[1]: crate `agent` has no binary `agentd` (its binaries: \
             agent)",
        ),
    ];
    for (manifest, at, expected) in cases {
        let s = Scratch::new(&manifest);
        let e = s.plan().unwrap_err().to_string();
        let expected = expected.replace("{dir}", s.0.as_str());
        assert!(
            e.ends_with(&format!(": package `agent`: {expected}")),
            "got: {e}\nwanted: {expected}"
        );
        // The location is the offending value's own line and column.
        assert!(
            crate::manifest::tests::pointed_at(&manifest, &e).starts_with(at),
            "{e} points at {:?}",
            crate::manifest::tests::pointed_at(&manifest, &e)
        );
        assert!(!s.0.join("out").exists(), "nothing may be written for a bad manifest");
    }
    let s = Scratch::new(&agent("", r#""agent""#).replace("[package.agent]", "[package.agent2]"));
    let e = s.plan().unwrap_err().to_string();
    assert!(
        e.ends_with(
            "package `agent2`: source.rust: the workspace has no crate named `agent2` (the crate \
             that builds a package's binaries must be named like the package)"
        ),
        "{e}"
    );
}

/// The project's own etcd package: one file of a pinned Debian package, placed under the
/// service's `bin/`.
#[test]
fn the_etcd_package_takes_its_binary_from_a_pinned_debian_package() {
    let root = Utf8Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let manifest = Manifest::load(&root.join("package-manifest.toml")).unwrap();
    let workspace = Workspace { target_dir: "/ws/target".into(), crates: BTreeMap::new() };
    let only = names(&["etcd"]);
    let config = PlanConfig {
        manifest: &manifest,
        target: &Target::parse_pairs([]).unwrap(),
        workspace: &workspace,
        out_dir: Utf8Path::new("/ws/out"),
        only: &only,
    };
    let plan = plan(&config).unwrap();
    let Work::Assemble(inputs) = &plan.outputs[&only[0]].work else { panic!() };
    let blob = inputs.iter().find_map(|i| match i {
        Input::Blob { dest, fetch } => Some((dest, fetch)),
        _ => None,
    });
    let (dest, fetch) = blob.expect("a blob input");
    assert_eq!(dest, "root/opt/flotilla/etcd/bin/etcd");
    let Origin::Deb(deb) = &fetch.origin else { panic!("{:?}", fetch.origin) };
    assert_eq!((deb.package.as_str(), deb.file.as_str()), ("etcd-server", "usr/bin/etcd"));
    assert_eq!(fetch.download_path, "/ws/out/downloads/etcd/etcd");
    assert!(fetch.sha256.is_some());
}

#[test]
fn a_deb_blob_is_refused_with_another_origin_or_an_unsafe_name() {
    let sha = "a45de16600eafc57939b84013b0522c4670435471eb4073dd963d01e0eb5a217";
    let case = |blob: &str| {
        let text = format!(
            "[package.db]\nservice_name = \"db\"\nsource.type = \"local\"\n\
             source.blobs = [{{ {blob}, sha256 = \"{sha}\" }}]\noutput.type = \"zone\"\n"
        );
        match Manifest::parse(Utf8Path::new("m.toml"), &text) {
            Ok(_) => "accepted".to_owned(),
            Err(e) => e.to_string(),
        }
    };
    let deb =
        r#"deb = { package = "etcd-server", version = "3.4.23-4+b4", file = "usr/bin/etcd" }"#;
    assert_eq!(case(deb), "accepted");
    let both = case(&format!("{deb}, url = \"https://example.com/etcd\""));
    assert!(both.contains("give exactly one of `path`, `url` and `deb`"), "{both}");
    let option = case(r#"deb = { package = "-oDir=/", version = "1", file = "a" }"#);
    assert!(option.contains("is not a Debian package name"), "{option}");
    let escape = case(r#"deb = { package = "etcd", version = "1", file = "../../etc/shadow" }"#);
    assert!(escape.contains("is not a relative path inside the package"), "{escape}");
}

#[test]
fn a_binary_name_two_crates_share_names_the_packages() {
    let manifest = Manifest::load(&data_dir().join("omicron-style.toml")).unwrap();
    let target = manifest.presets["default"].clone();
    let mut workspace = omicron_workspace();
    workspace.crates.insert("nexus-twin".into(), ["nexus".to_owned()].into());
    let config = PlanConfig {
        manifest: &manifest,
        target: &target,
        workspace: &workspace,
        out_dir: Utf8Path::new("/ws/out"),
        only: &[],
    };
    let plan = plan(&config).unwrap();
    assert!(!plan.cargo_builds[0].workspace);
    assert!(plan.cargo_builds[0].args().contains(&"--package".to_owned()));
}
