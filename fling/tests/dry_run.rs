//! Golden tests of every command's dry run: what `cargo xtask fling --dry-run <command>` prints,
//! per host one line per step, for a fixed config and run id, compared with
//! `tests/golden/<command>.txt`. `UPDATE_GOLDEN=1 cargo test -p flotilla-fling --test dry_run`
//! rewrites them. Every builder-side script of every plan, and each plan's builder session, is
//! also parsed by `sh -n`. No root, ssh or network needed.

use camino::{Utf8Path, Utf8PathBuf};
use flotilla_fling::{
    batch,
    config::Config,
    flags::{Artifacts, Build, ManifestFlags, PackageFlags, PackageName, TargetName},
    plan::{self, Context, DeployAction, Plan},
    ssh::BuilderHop,
};

const CONFIG: &str = r#"
[builder]
server = "builder"
source_path = "$HOME/flotilla"
excludes = ["*.swp"]

[deployment]
servers = ["node1", "node2"]
staging_dir = "/var/tmp/flotilla-staging"
prefix = "/opt/acme"

[ssh]
known_hosts = "/etc/fling/known_hosts"

[overlay]
identity_services = ["greeter"]

[artifacts]
endpoint = "http://192.0.2.1:8333"
bucket = "acme-artifacts"
prefix = "rack1"
credentials_file = "$HOME/.config/flotilla/store.toml"

[servers.builder]
username = "builder"
addr = "builder.example.com"

[servers.node1]
username = "root"
addr = "192.0.2.11"

[servers.node2]
username = "root"
addr = "2001:db8::12"
port = 2222
"#;

/// A workspace with one service that runs as its own user, removed on drop.
struct Workspace(Utf8PathBuf);

impl Workspace {
    fn new() -> Workspace {
        let dir = std::env::temp_dir().join(format!("fling-golden-{}", std::process::id()));
        let root = Utf8PathBuf::try_from(dir).unwrap();
        std::fs::create_dir_all(root.join("smf/greeter")).unwrap();
        std::fs::write(root.join("smf/greeter/greeter.service"), "[Service]\nUser=acme-greeter\n")
            .unwrap();
        Workspace(root)
    }
}

impl Drop for Workspace {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn context<'a>(config: &'a Config, local_source: &Utf8Path) -> Context<'a> {
    Context {
        config,
        builder: BuilderHop::new(config, Utf8Path::new("/tmp/fling-RUN")).unwrap(),
        run_id: "RUN".into(),
        builder_control_dir: "/tmp/fling-b-RUN".into(),
        local_source: local_source.to_owned(),
        who: "dev@client".into(),
        lock_wait: 0,
    }
}

/// The same deployment with thing-flinger's `debug` and `rss_config_path`.
fn debug_config() -> Config {
    let text = format!("debug = true\nrss_config_path = \"rack/config-rss.toml\"\n{CONFIG}")
        .replace("prefix = \"/opt/acme\"", "prefix = \"/opt/acme\"\nrss_server = \"node1\"");
    Config::parse(Utf8Path::new("deployment.toml"), &text).unwrap()
}

/// What a store step signs, as a fixed example.
fn fetch_list() -> flotilla_contracts::store::FetchList {
    let object = |file: &str, seed: &str| flotilla_contracts::store::FetchObject {
        file: file.into(),
        digest: seed.repeat(64),
        size: 1000,
        url: format!(
            "http://192.0.2.1:8333/flotilla/blake3/{}?X-Amz-Signature=00",
            seed.repeat(64)
        ),
    };
    flotilla_contracts::store::FetchList {
        packages: vec![object("greeter.tar.gz", "a")],
        installer: object("flotilla-installer", "b"),
        installer_sha256: Some("c".repeat(64)),
        expires_at: 1_796_300_900,
    }
}

/// Every command's plan, by the name of its golden file.
fn plans<'a>(
    config: &'a Config,
    debug: &'a Config,
    workspace: &Utf8Path,
) -> Vec<(&'static str, Plan)> {
    let cx = context(config, Utf8Path::new("/src/flotilla"));
    let debug_cx = context(debug, Utf8Path::new("/src/flotilla"));
    let prereqs_cx = context(config, workspace);
    let servers = config.select_servers(&[]).unwrap();
    let one = config.select_servers(&["node2".to_owned()]).unwrap();
    let debug_servers = debug.select_servers(&[]).unwrap();
    let dev = ManifestFlags {
        target: Some(TargetName::new("dev").unwrap()),
        artifacts: Some(Artifacts::new("out/dev").unwrap()),
    };
    let package = PackageFlags {
        only: vec![PackageName::new("greeter").unwrap(), PackageName::new("ledger").unwrap()],
        disable_cache: true,
        jobs: std::num::NonZeroUsize::new(2),
        ..PackageFlags::default()
    };
    let install = || DeployAction::Install(Artifacts::default());
    vec![
        ("sync", plan::sync(&cx)),
        ("install-prereqs", plan::install_prereqs(&prereqs_cx, &servers)),
        ("build-check", plan::build(&cx, &Build::Check(ManifestFlags::default()))),
        ("build-package", plan::build(&cx, &Build::Package(dev.clone(), package))),
        ("build-dot", plan::build(&cx, &Build::Dot(dev))),
        ("overlay", plan::overlay(&cx, false)),
        ("overlay-rotate", plan::overlay(&cx, true)),
        ("deploy-install", plan::deploy(&cx, install(), &servers)),
        ("deploy-install-node2", plan::deploy(&cx, install(), &one)),
        (
            "deploy-install-artifacts",
            plan::deploy(&cx, DeployAction::Install(Artifacts::new("out/dev").unwrap()), &one),
        ),
        ("deploy-uninstall", plan::deploy(&cx, DeployAction::Uninstall, &servers)),
        ("deploy-status", plan::deploy(&cx, DeployAction::Status, &servers)),
        ("deploy-rollback", plan::deploy(&cx, DeployAction::Rollback, &servers)),
        ("deploy-clean", plan::deploy(&cx, DeployAction::Clean, &servers)),
        ("exec", plan::exec(&cx, &servers, "systemctl is-active 'greeter.service'")),
        ("deploy-plan", plan::survey(&cx, &servers, &Artifacts::default())),
        (
            "deploy-install-held-to-plan",
            plan::deploy_with(
                &cx,
                install(),
                &one,
                &plan::DeployOptions {
                    locking: plan::Locking::Lock,
                    confirm_timeout: &|_| None,
                    expect: &|_| {
                        Some(plan::Expectation {
                            active: Some("0123456789abcdef".into()),
                            release: "fedcba9876543210".into(),
                            installer: "ab".repeat(32),
                        })
                    },
                    fetch: None,
                },
            ),
        ),
        (
            "deploy-install-store",
            plan::deploy_with(
                &cx,
                install(),
                &one,
                &plan::DeployOptions {
                    locking: plan::Locking::Lock,
                    confirm_timeout: &|_| None,
                    expect: &|_| None,
                    fetch: Some(&fetch_list()),
                },
            ),
        ),
        ("store-sync", plan::store_sync(&cx, &Artifacts::default())),
        ("history", plan::history(&cx)),
        ("lock-status", plan::lock(&cx, false)),
        ("lock-release", plan::lock(&cx, true)),
        ("debug-sync", plan::sync(&debug_cx)),
        ("debug-overlay", plan::overlay(&debug_cx, false)),
        ("debug-deploy-install", plan::deploy(&debug_cx, install(), &debug_servers)),
    ]
}

#[test]
fn every_commands_dry_run_matches_its_golden_file() {
    let config = Config::parse(Utf8Path::new("deployment.toml"), CONFIG).unwrap();
    let debug = debug_config();
    let workspace = Workspace::new();
    let golden = Utf8Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    let update = std::env::var("UPDATE_GOLDEN").is_ok();
    let mut differ = Vec::new();
    for (name, plan) in plans(&config, &debug, &workspace.0) {
        let text = plan::describe(&plan);
        assert!(!text.contains(workspace.0.as_str()), "{name} names this machine's path");
        for line in text.lines().skip(1) {
            assert!(line.starts_with('['), "{name}: {line}");
            assert!(!line.ends_with(": "), "{name}: a step without a description: {line}");
        }
        let path = golden.join(format!("{name}.txt"));
        if update {
            std::fs::create_dir_all(&golden).unwrap();
            std::fs::write(&path, &text).unwrap();
            continue;
        }
        let expected = std::fs::read_to_string(&path).unwrap_or_default();
        if expected != text {
            differ.push(format!("{path}:\n--- expected\n{expected}--- actual\n{text}"));
        }
    }
    assert!(
        differ.is_empty(),
        "dry runs differ from their golden files (UPDATE_GOLDEN=1 rewrites them):\n{}",
        differ.join("\n")
    );
}

#[test]
fn every_builder_script_and_session_is_valid_shell() {
    let config = Config::parse(Utf8Path::new("deployment.toml"), CONFIG).unwrap();
    let debug = debug_config();
    let workspace = Workspace::new();
    for (name, plan) in plans(&config, &debug, &workspace.0) {
        let mut scripts: Vec<String> = plan
            .setup
            .iter()
            .chain(plan.hosts.iter().flat_map(|h| &h.steps))
            .chain(&plan.teardown)
            .filter_map(|s| s.script.clone())
            .collect();
        if plan.session.is_some() {
            scripts.push(batch::script(&plan, 10, 8));
        }
        assert!(!scripts.is_empty(), "{name}");
        for script in scripts {
            let out =
                std::process::Command::new("sh").args(["-n", "-c", &script]).output().unwrap();
            assert!(
                out.status.success(),
                "{name}: {}\n{script}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}
