use super::*;

fn parse(text: &str) -> Result<Manifest, Error> {
    Manifest::parse(Utf8Path::new("m.toml"), text)
}

fn err(text: &str) -> String {
    parse(text).expect_err("the manifest should be rejected").to_string()
}

const ZONE: &str = r#"
[package.agent]
service_name = "agent"
source.type = "local"
source.rust.binary_names = ["agent"]
source.rust.release = true
source.paths = [{ from = "smf/agent", to = "/opt/flotilla/agent/pkg" }]
output.type = "zone"
"#;

#[test]
fn parses_a_local_zone_package() {
    let m = parse(ZONE).unwrap();
    let name = PackageName::new("agent").unwrap();
    let pkg = &m.packages[&name];
    assert_eq!(pkg.service_name.as_str(), "agent");
    assert_eq!(pkg.output_file(&name), "agent.tar.gz");
    assert_eq!(
        pkg.rust(),
        Some(&RustPackage { binary_names: vec!["agent".into()], release: true })
    );
    let PackageSource::Local { paths, .. } = &pkg.source else { panic!("local expected") };
    assert_eq!(paths[0].to.raw(), "/opt/flotilla/agent/pkg");
    assert!(!pkg.is_intermediate_only());
}

#[test]
fn malformed_toml_gives_line_and_column() {
    let text = "[package.a]\nservice_name = \"a\"\nsource.type = \n";
    let e = err(text);
    assert!(e.starts_with("m.toml:3:15: "), "{e}");
}

#[test]
fn unknown_field_names_package_line_and_field() {
    let text =
        ZONE.replace("output.type = \"zone\"", "output.type = \"zone\"\noutput.compress = 9");
    let e = err(&text);
    // Inside the internally tagged `output` table toml points at the table; the message's key
    // is found in it.
    assert!(
        e.starts_with("m.toml:9:8: package `agent`: output.compress: unknown field `compress`"),
        "{e}"
    );
    let e = err(&ZONE.replace("source.rust.release", "source.rust.relase"));
    assert!(
        e.contains("m.toml:6:13: package `agent`: source.rust.relase: unknown field `relase`"),
        "{e}"
    );
    let e = err("[package.a]\nservice_name = \"a\"\nsource.type = \"manual\"\nsource.x = 1\noutput.type = \"zone\"\n");
    assert!(e.contains("unknown field `x`"), "{e}");
    let e = err("[packages.a]\n");
    assert!(e.starts_with("m.toml:1:2: packages: unknown field `packages`"), "{e}");
}

#[test]
fn bad_service_name_is_refused() {
    let e = err(&ZONE.replace("service_name = \"agent\"", "service_name = \"9agent\""));
    assert!(
        e.starts_with(
            "m.toml:3:16: package `agent`: service_name: service name `9agent` must start"
        ),
        "{e}"
    );
}

#[test]
fn malformed_sha256_is_refused_with_its_field() {
    let text = r#"
[package.pre]
service_name = "pre"
source.type = "prebuilt"
source.path = "x.tar.gz"
source.sha256 = "1234"
output.type = "zone"
"#;
    let e = err(text);
    assert!(
        e.starts_with("m.toml:6:17: package `pre`: source.sha256: malformed sha256 `1234`"),
        "{e}"
    );
    let blob = ZONE.replace(
        "output.type",
        "source.blobs = [{ path = \"b.bin\", sha256 = \"zz\" }]\noutput.type",
    );
    let e = err(&blob);
    assert!(e.contains("package `agent`: source.blobs[0].sha256: malformed sha256 `zz`"), "{e}");
}

#[test]
fn unknown_composite_member_is_refused() {
    let text = format!(
        "{ZONE}\n[package.all]\nservice_name = \"all\"\nsource.type = \"composite\"\n\
         source.packages = [\"agent.tar.gz\", \"agent\"]\noutput.type = \"zone\"\n"
    );
    assert_eq!(
        err(&text),
        "m.toml:13:36: package `all`: source.packages[1]: `agent` is not the output of any package \
         in this manifest (did you mean `agent.tar.gz`?)"
    );
}

#[test]
fn dependency_cycle_is_refused() {
    let text = r#"
[package.a]
service_name = "a"
source.type = "composite"
source.packages = ["b.tar.gz"]
output.type = "zone"

[package.b]
service_name = "b"
source.type = "composite"
source.packages = ["a.tar.gz"]
output.type = "zone"
"#;
    assert_eq!(
        err(text),
        "m.toml:5:19: package `a`: source.packages: dependency cycle: a -> b -> a"
    );
}

#[test]
fn duplicate_outputs_are_refused() {
    // The same table twice is a TOML error with a position.
    let twice = format!("{ZONE}{ZONE}");
    assert_eq!(err(&twice), "m.toml:10:10: package `agent`: duplicate key");
    // Names differing only in case collide on case-insensitive file systems.
    let text = format!("{ZONE}{}", ZONE.replace("[package.agent]", "[package.Agent]"));
    assert_eq!(
        err(&text),
        "m.toml:8:1: package `agent`: output: output file `agent.tar.gz` is also the output of \
         package `Agent`"
    );
}

#[test]
fn prebuilt_needs_exactly_one_origin() {
    let base = "[package.p]\nservice_name = \"p\"\nsource.type = \"prebuilt\"\n\
                source.sha256 = \"%\"\noutput.type = \"zone\"\n"
        .replace('%', &"a".repeat(64));
    assert_eq!(
        err(&base),
        "m.toml:3:1: package `p`: source: a prebuilt needs exactly one origin: `repo` + `commit`, \
         `url` or `path`"
    );
    let half = base.replace("output.type", "source.repo = \"crucible\"\noutput.type");
    assert_eq!(
        err(&half),
        "m.toml:3:1: package `p`: source.commit: a buildomat prebuilt needs both `repo` and `commit`"
    );
}

#[test]
fn composite_must_be_a_zone_of_zones() {
    let text = format!(
        "{ZONE}\n[package.t]\nservice_name = \"t\"\nsource.type = \"local\"\noutput.type = \
         \"tarball\"\n\n[package.all]\nservice_name = \"all\"\nsource.type = \"composite\"\n\
         source.packages = [\"t.tar\"]\noutput.type = \"zone\"\n"
    );
    assert_eq!(
        err(&text),
        "m.toml:18:20: package `all`: source.packages[0]: `t` is a tarball; composites merge zone \
         images only"
    );
}

#[test]
fn tarball_takes_no_intermediate_only() {
    let text = "[package.t]\nservice_name = \"t\"\nsource.type = \"local\"\n\
                output.type = \"tarball\"\noutput.intermediate_only = true\n";
    assert!(err(text).contains("unknown field `intermediate_only`"), "{}", err(text));
}

#[test]
fn presets_are_read() {
    let text = format!("{ZONE}\n[target.preset.default]\nimage = \"standard\"\n");
    let m = parse(&text).unwrap();
    assert_eq!(m.presets["default"].get("image"), Some("standard"));
}

#[test]
fn the_omicron_style_fixture_parses() {
    let path = Utf8Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/omicron-style.toml");
    let m = Manifest::load(&path).unwrap();
    assert!(m.packages.len() >= 8);
    let kinds: BTreeSet<&str> = m.packages.values().map(|p| p.source.kind()).collect();
    assert_eq!(kinds, ["composite", "local", "manual", "prebuilt"].into_iter().collect());
}

#[test]
fn the_project_manifest_parses() {
    let path = Utf8Path::new(env!("CARGO_MANIFEST_DIR")).join("../package-manifest.toml");
    let m = Manifest::load(&path).unwrap();
    assert!(m.packages.keys().any(|n| n.as_str() == "node-agent"));
}

/// The text at an error's `file:line:column:`, to the end of that line.
pub(crate) fn pointed_at<'a>(text: &'a str, error: &str) -> &'a str {
    let mut numbers = error.split(':').skip_while(|p| p.parse::<usize>().is_err());
    let line: usize = numbers.next().and_then(|n| n.parse().ok()).expect("a line");
    let column: usize = numbers.next().and_then(|n| n.parse().ok()).expect("a column");
    let line = text.lines().nth(line - 1).expect("the line is in the text");
    let start = line.char_indices().nth(column - 1).map_or(line.len(), |(i, _)| i);
    &line[start..]
}

/// Every schema and validation error gives the file, the line and column of the offending
/// key or value, the package and the field, wherever toml itself could place it.
#[test]
fn every_manifest_error_points_at_its_key_or_value() {
    let pre = "[package.pre]\nservice_name = \"pre\"\nsource.type = \"prebuilt\"\n\
               source.path = \"x.tar.gz\"\nsource.sha256 = \"1234\"\noutput.type = \"zone\"\n";
    let blob = |b: &str| ZONE.replace("output.type", &format!("source.blobs = [{b}]\noutput.type"));
    let sha = "a".repeat(64);
    let cases: Vec<(String, &str, &str)> = vec![
        // Inside `source`, an internally tagged table toml can only blame as a whole.
        (ZONE.replace("source.rust.release", "source.rust.relase"), "relase", "package `agent`: source.rust.relase: unknown field `relase`"),
        (ZONE.replace("source.type = \"local\"", "source.type = \"locale\""), "\"locale\"", "package `agent`: source.type: unknown variant `locale`"),
        (blob(&format!("{{ path = \"b.bin\", sha256 = \"{sha}\", nmae = \"x\" }}")), "nmae", "package `agent`: source.blobs[0].nmae: unknown field `nmae`"),
        ("[package.a]\nservice_name = \"a\"\noutput.type = \"zone\"\n[package.a.source]\ntype = \"manual\"\nx = 1\n".to_owned(), "x = 1", "package `a`: source.x: unknown field `x`"),
        // A malformed digest names its field.
        (pre.to_owned(), "\"1234\"", "package `pre`: source.sha256: malformed sha256 `1234`"),
        (blob("{ path = \"b.bin\", sha256 = \"zz\" }"), "\"zz\"", "package `agent`: source.blobs[0].sha256: malformed sha256 `zz`"),
        // A missing field names its package, at the package's header.
        (ZONE.replace("service_name = \"agent\"\n", ""), "[package.agent]", "package `agent`: service_name: missing field `service_name`"),
        (ZONE.replace("output.type = \"zone\"\n", ""), "[package.agent]", "package `agent`: output: missing field `output`"),
        // Validation, after the schema: at the value.
        (ZONE.replace("binary_names = [\"agent\"]", "binary_names = []"), "[]", "package `agent`: source.rust.binary_names: lists no binaries"),
        (blob(&format!("{{ path = \"b.bin\", url = \"https://x/b\", sha256 = \"{sha}\" }}")), "{ path", "package `agent`: source.blobs[0]: give exactly one of"),
        (blob(&format!("{{ deb = {{ package = \"-x\", version = \"1\", file = \"f\" }}, sha256 = \"{sha}\" }}")), "\"-x\"", "package `agent`: source.blobs[0].deb: `-x` is not a Debian package name"),
    ];
    for (text, at, expected) in cases {
        let e = err(&text);
        assert!(e.starts_with("m.toml:"), "{e}");
        assert!(e.contains(expected), "wanted {expected:?} in {e}");
        assert!(
            pointed_at(&text, &e).starts_with(at),
            "{e}\npoints at {:?}",
            pointed_at(&text, &e)
        );
    }
}
