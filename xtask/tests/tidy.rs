//! Tidy checks: the repository's files agree with each other. They run as ordinary tests so a
//! plain `cargo test` catches them.

use std::{collections::BTreeSet, path::PathBuf, process::Command};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_owned()
}

fn read_toml(path: &str) -> toml::Table {
    let path = root().join(path);
    let text =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    text.parse().unwrap_or_else(|e| panic!("parse {}: {e}", path.display()))
}

/// Every service of a locally built package has its three service files: the SMF manifest, the
/// systemd unit and the config file the unit passes to it.
#[test]
fn every_service_has_its_smf_files() {
    let manifest = read_toml("package-manifest.toml");
    let packages = manifest["package"].as_table().expect("[package.*] tables");
    let mut checked = 0;
    for (name, package) in packages {
        if package["source"]["type"].as_str() != Some("local") {
            continue;
        }
        let Some(service) = package.get("service_name").and_then(|s| s.as_str()) else {
            panic!("package {name}: no service_name");
        };
        // A prebuilt binary (etcd) has a config file of its own format and name.
        let config =
            if package["source"].get("rust").is_some() { "config.toml" } else { "config.yaml" };
        let dir = root().join("smf").join(service);
        for file in ["manifest.xml", &format!("{service}.service"), config] {
            assert!(dir.join(file).is_file(), "package {name}: missing smf/{service}/{file}");
        }
        checked += 1;
    }
    assert!(checked >= 3, "expected at least three packaged services, found {checked}");
}

/// Every directory under `smf/` belongs to a package: stale service files are removed with
/// their service.
#[test]
fn every_smf_directory_belongs_to_a_package() {
    let manifest = read_toml("package-manifest.toml");
    let services: BTreeSet<String> = manifest["package"]
        .as_table()
        .unwrap()
        .values()
        .filter_map(|p| p.get("service_name").and_then(|s| s.as_str()).map(str::to_owned))
        .collect();
    for entry in std::fs::read_dir(root().join("smf")).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        assert!(services.contains(&name), "smf/{name} has no package in package-manifest.toml");
    }
}

/// The example deployment config passes `fling`'s own parser and validation (every server it
/// refers to exists, no duplicates, paths absolute or `$HOME`-relative), and plans a deploy
/// to every one of its servers. `--dry-run` runs nothing.
#[test]
fn deployment_example_refers_to_defined_servers() {
    let output = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(["fling", "--config", "deployment-example.toml", "--dry-run", "deploy", "install"])
        .current_dir(root())
        .output()
        .expect("run cargo xtask fling --dry-run");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "deployment-example.toml was refused:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    for server in ["node1", "node2", "node3"] {
        for phase in ["connect", "check", "push", "install"] {
            let step = format!("[{server}] {phase} (builder -> {server}): ");
            assert!(stdout.contains(&step), "{stdout}");
        }
    }
}

/// The code is formatted: `cargo fmt --all --check` passes.
#[test]
fn formatting() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let output = Command::new(cargo)
        .args(["fmt", "--all", "--check"])
        .current_dir(root())
        .output()
        .expect("run cargo fmt");
    assert!(
        output.status.success(),
        "cargo fmt --all --check failed; run `cargo fmt --all`:\n{}",
        String::from_utf8_lossy(&output.stdout)
    );
}

/// The `.ci/run` script runs the test command the README gives.
#[test]
fn ci_runs_the_readme_test_command() {
    let readme = std::fs::read_to_string(root().join("README.md")).expect("README.md");
    let ci = std::fs::read_to_string(root().join(".ci/run")).expect(".ci/run");
    assert!(readme.contains("cargo xtask ci"), "README.md does not give `cargo xtask ci`");
    assert!(ci.contains("cargo xtask ci"), ".ci/run does not call `cargo xtask ci`");
}

/// The engine crates know nothing of the example system: no name or path of its services
/// appears in their code (their tests may use them as examples). A workspace that adopts
/// flotilla declares its own services in its manifest and deployment config.
#[test]
fn engine_crates_name_nothing_of_the_example_system() {
    const ENGINE: &[&str] =
        &["contracts", "package", "installer", "overlay", "fling", "testbed", "cli"];
    const EXAMPLE: &[&str] =
        &["node-agent", "node_agent", "control-plane", "control_plane", "etcd", "rack-secret"];
    let mut found = Vec::new();
    let mut checked = 0;
    for krate in ENGINE {
        let mut stack = vec![root().join(krate).join("src")];
        while let Some(dir) = stack.pop() {
            for entry in std::fs::read_dir(&dir).unwrap() {
                let path = entry.unwrap().path();
                let name = path.file_name().unwrap().to_str().unwrap().to_owned();
                if path.is_dir() {
                    stack.push(path);
                    continue;
                }
                // Test modules in files of their own.
                if !name.ends_with(".rs") || name == "tests.rs" || name.ends_with("_tests.rs") {
                    continue;
                }
                checked += 1;
                let text = std::fs::read_to_string(&path).unwrap();
                for (number, line) in text.lines().enumerate() {
                    // Inline test modules come last in a file.
                    if line.trim_start().starts_with("#[cfg(test)]") {
                        break;
                    }
                    if let Some(word) = EXAMPLE.iter().find(|w| line.contains(*w)) {
                        let rel = path.strip_prefix(root()).unwrap().display().to_string();
                        found.push(format!("{rel}:{}: {word}: {}", number + 1, line.trim()));
                    }
                }
            }
        }
    }
    assert!(checked > 50, "only {checked} files checked");
    assert!(found.is_empty(), "the engine names the example system:\n{}", found.join("\n"));
}
