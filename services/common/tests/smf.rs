//! Tidy checks of the service definitions under `smf/`: each service has its config, an SMF
//! manifest with what svccfg needs, and a systemd unit that runs the right binary with the right
//! config; and each is packaged by `package-manifest.toml` with its binary and these files.

use camino::{Utf8Path, Utf8PathBuf};
use std::collections::BTreeMap;

fn repo_root() -> Utf8PathBuf {
    Utf8Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Every service directory under `smf/`, by name.
fn services() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(repo_root().join("smf"))
        .expect("read smf/")
        .map(|entry| entry.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert!(names.len() >= 2, "expected the example services under smf/, found {names:?}");
    names
}

fn binary(service: &str) -> String {
    format!("/opt/flotilla/current/{service}/bin/{service}")
}

/// Whether the service's binary is built from this workspace (its package has `source.rust`),
/// rather than taken prebuilt, like Debian's etcd.
fn built_here(service: &str) -> bool {
    let path = repo_root().join("package-manifest.toml");
    let manifest: toml::Table = toml::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let package = manifest["package"].get(service);
    package.and_then(|p| p["source"].get("rust")).is_some()
}

/// The config file under `pkg/` and the flag that passes it: the workspace's services take
/// `--config config.toml`; a prebuilt binary keeps its own convention (etcd's `--config-file`
/// with YAML).
fn config_file(service: &str) -> (&'static str, &'static str) {
    if built_here(service) {
        ("--config", "config.toml")
    } else {
        ("--config-file", "config.yaml")
    }
}

fn config(service: &str) -> String {
    format!("/opt/flotilla/current/{service}/pkg/{}", config_file(service).1)
}

#[test]
fn every_service_has_its_three_files() {
    for service in services() {
        let dir = repo_root().join("smf").join(&service);
        let config = config_file(&service).1;
        for file in [config.to_owned(), "manifest.xml".to_owned(), format!("{service}.service")] {
            assert!(dir.join(&file).is_file(), "smf/{service}/{file} is missing");
        }
        if !built_here(&service) {
            // A prebuilt binary's config has its own format, checked by its end-to-end test.
            continue;
        }
        let text = std::fs::read_to_string(dir.join("config.toml")).unwrap();
        let parsed: toml::Table =
            toml::from_str(&text).unwrap_or_else(|e| panic!("smf/{service}/config.toml: {e}"));
        assert!(parsed.contains_key("listen"), "smf/{service}/config.toml has no listen address");
    }
}

#[test]
fn smf_manifests_have_what_svccfg_requires() {
    for service in services() {
        let path = repo_root().join("smf").join(&service).join("manifest.xml");
        let text = std::fs::read_to_string(&path).unwrap();
        let doc = roxmltree::Document::parse_with_options(
            &text,
            roxmltree::ParsingOptions { allow_dtd: true, ..Default::default() },
        )
        .unwrap_or_else(|e| panic!("{path}: {e}"));
        let bundle = doc.root_element();
        assert_eq!(bundle.tag_name().name(), "service_bundle", "{path}");
        assert_eq!(bundle.attribute("type"), Some("manifest"), "{path}");
        assert!(bundle.attribute("name").is_some(), "{path}: service_bundle has no name");

        let svc = child(bundle, "service", &path);
        assert_eq!(svc.attribute("name"), Some(format!("flotilla/{service}").as_str()), "{path}");
        assert_eq!(svc.attribute("type"), Some("service"), "{path}");
        assert_eq!(svc.attribute("version"), Some("1"), "{path}");
        child(svc, "create_default_instance", &path);

        let deps: Vec<&str> = children(svc, "dependency")
            .into_iter()
            .flat_map(|d| children(d, "service_fmri"))
            .filter_map(|f| f.attribute("value"))
            .collect();
        for fmri in ["svc:/milestone/network:default", "svc:/milestone/multi-user:default"] {
            assert!(deps.contains(&fmri), "{path}: no dependency on {fmri}");
        }
        for dep in children(svc, "dependency") {
            for attr in ["name", "grouping", "restart_on", "type"] {
                assert!(dep.attribute(attr).is_some(), "{path}: a dependency has no {attr}");
            }
        }

        let methods: BTreeMap<&str, roxmltree::Node> = children(svc, "exec_method")
            .into_iter()
            .map(|m| (m.attribute("name").unwrap_or(""), m))
            .collect();
        let start = methods.get("start").unwrap_or_else(|| panic!("{path}: no start method"));
        let exec = start.attribute("exec").unwrap();
        let flag = config_file(&service).0;
        assert_eq!(exec, format!("{} {flag} %{{config/file}}", binary(&service)), "{path}");
        let stop = methods.get("stop").unwrap_or_else(|| panic!("{path}: no stop method"));
        assert_eq!(stop.attribute("exec"), Some(":kill"), "{path}");
        for method in methods.values() {
            assert_eq!(method.attribute("type"), Some("method"), "{path}");
            assert!(
                method.attribute("timeout_seconds").is_some(),
                "{path}: method without timeout"
            );
        }

        // The binary runs in the foreground, so startd must treat it as a child, not a daemon.
        assert_eq!(propval(svc, "startd", "duration", &path), "child", "{path}");
        assert_eq!(propval(svc, "config", "file", &path), config(&service), "{path}");

        child(svc, "stability", &path);
        let template = child(svc, "template", &path);
        let name = child(child(template, "common_name", &path), "loctext", &path);
        assert!(!name.text().unwrap_or("").trim().is_empty(), "{path}: empty common_name");

        // The DTD fixes the order of a service's children; svccfg rejects any other.
        let order = [
            "create_default_instance",
            "single_instance",
            "restarter",
            "dependency",
            "dependent",
            "method_context",
            "exec_method",
            "property_group",
            "instance",
            "stability",
            "template",
        ];
        let ranks: Vec<usize> = svc
            .children()
            .filter(|n| n.is_element())
            .map(|n| {
                let tag = n.tag_name().name();
                order
                    .iter()
                    .position(|o| *o == tag)
                    .unwrap_or_else(|| panic!("{path}: unexpected <{tag}>"))
            })
            .collect();
        assert!(ranks.windows(2).all(|w| w[0] <= w[1]), "{path}: children out of DTD order");
    }
}

#[test]
fn systemd_units_run_the_right_binary_and_config() {
    for service in services() {
        let path = repo_root().join("smf").join(&service).join(format!("{service}.service"));
        let unit = parse_unit(&std::fs::read_to_string(&path).unwrap(), &path);
        let get = |section: &str, key: &str| -> Vec<String> {
            unit.get(&(section.to_owned(), key.to_owned())).cloned().unwrap_or_default()
        };
        let exec = format!("{} {} {}", binary(&service), config_file(&service).0, config(&service));
        assert_eq!(get("Service", "ExecStart"), [exec], "{path}");
        let kind = get("Service", "Type");
        assert!(kind == ["simple"] || kind == ["exec"], "{path}: Type={kind:?}");
        assert_eq!(get("Service", "Restart"), ["on-failure"], "{path}");
        if built_here(&service) {
            // The workspace's services exit 78 (EX_CONFIG) on a bad config.
            assert_eq!(get("Service", "RestartPreventExitStatus"), ["78"], "{path}");
        }
        assert_eq!(get("Service", "NoNewPrivileges"), ["yes"], "{path}");
        assert!(
            get("Unit", "After")
                .iter()
                .any(|v| v.split_whitespace().any(|u| u == "network-online.target")),
            "{path}"
        );
        assert!(get("Unit", "Wants").iter().any(|v| v.contains("network-online.target")), "{path}");
        assert_eq!(get("Install", "WantedBy"), ["multi-user.target"], "{path}");
        assert!(!get("Unit", "Description").is_empty(), "{path}: no Description");
    }
}

#[test]
fn every_service_is_packaged_with_its_binary_and_smf_files() {
    let path = repo_root().join("package-manifest.toml");
    let manifest: toml::Table = toml::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let packages = manifest["package"].as_table().unwrap();
    for service in services() {
        let package =
            packages.get(&service).unwrap_or_else(|| panic!("{path}: no [package.{service}]"));
        assert_eq!(package["service_name"].as_str(), Some(service.as_str()), "{path}: {service}");
        let source = &package["source"];
        let bin = format!("/opt/flotilla/{service}/bin/{service}");
        if built_here(&service) {
            let binaries = source["rust"]["binary_names"].as_array().unwrap();
            assert!(
                binaries.iter().any(|b| b.as_str() == Some(&service)),
                "{path}: {service} binary"
            );
        } else {
            // A prebuilt binary is a pinned blob placed at the same path.
            let blobs = source["blobs"].as_array().unwrap();
            assert!(
                blobs.iter().any(|b| b.get("to").and_then(|t| t.as_str()) == Some(&bin)),
                "{path}: {service} has no blob placed at {bin}"
            );
        }
        let paths = source["paths"].as_array().unwrap();
        let smf = paths.iter().find(|p| p["from"].as_str() == Some(&format!("smf/{service}")));
        let smf = smf.unwrap_or_else(|| panic!("{path}: {service} does not package smf/{service}"));
        assert_eq!(
            smf["to"].as_str(),
            Some(format!("/opt/flotilla/{service}/pkg").as_str()),
            "{path}"
        );
    }
}

fn child<'a, 'i>(
    node: roxmltree::Node<'a, 'i>,
    tag: &str,
    path: &Utf8Path,
) -> roxmltree::Node<'a, 'i> {
    children(node, tag)
        .into_iter()
        .next()
        .unwrap_or_else(|| panic!("{path}: <{}> has no <{tag}>", node.tag_name().name()))
}

fn children<'a, 'i>(node: roxmltree::Node<'a, 'i>, tag: &str) -> Vec<roxmltree::Node<'a, 'i>> {
    node.children().filter(|n| n.is_element() && n.tag_name().name() == tag).collect()
}

fn propval<'a>(svc: roxmltree::Node<'a, '_>, group: &str, name: &str, path: &Utf8Path) -> &'a str {
    let group = children(svc, "property_group")
        .into_iter()
        .find(|g| g.attribute("name") == Some(group))
        .unwrap_or_else(|| panic!("{path}: no property group {group}"));
    assert!(group.attribute("type").is_some(), "{path}: property group without type");
    let val = children(group, "propval")
        .into_iter()
        .find(|p| p.attribute("name") == Some(name))
        .unwrap_or_else(|| panic!("{path}: no propval {name}"));
    assert!(val.attribute("type").is_some(), "{path}: propval {name} without type");
    val.attribute("value").unwrap_or_else(|| panic!("{path}: propval {name} without value"))
}

/// Parses a unit file into (section, key) -> values, in order; keys may repeat.
fn parse_unit(text: &str, path: &Utf8Path) -> BTreeMap<(String, String), Vec<String>> {
    let mut section = String::new();
    let mut out: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        assert!(!line.ends_with('\\'), "{path}:{}: keep each setting on one line", i + 1);
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.to_owned();
            continue;
        }
        let (key, value) =
            line.split_once('=').unwrap_or_else(|| panic!("{path}:{}: not key=value", i + 1));
        assert!(!section.is_empty(), "{path}:{}: setting outside a section", i + 1);
        out.entry((section.clone(), key.trim().to_owned()))
            .or_default()
            .push(value.trim().to_owned());
    }
    out
}
