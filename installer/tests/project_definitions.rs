//! The project's own service definitions (`smf/<service>/`), packaged the way `cargo xtask
//! package` lays them out, go through the installer under systemd and SMF.

mod support;

use std::fs;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use camino::Utf8Path;
use installer::accounts::{Account, Accounts, ServiceUser};
use installer::release::ReleaseInfo;
use installer::runner::{Output, RecordingRunner};
use installer::{Config, Installer, ManagerKind};
use support::{packages_dir, zone_bytes, Entry, TempDir};

fn running() -> Arc<RecordingRunner> {
    Arc::new(RecordingRunner::with(|cmd| {
        let stdout = match cmd.args.first().map(String::as_str) {
            Some("is-active") => "active\n".to_owned(),
            Some("-H") => "online\n".to_owned(),
            // `systemctl show` for the units after `--`: each one active and enabled.
            Some("show") => {
                let units = cmd.args.iter().skip_while(|a| *a != "--").skip(1);
                let blocks: Vec<String> = units
                    .map(|u| format!("Id={u}\nActiveState=active\nUnitFileState=enabled\n"))
                    .collect();
                blocks.join("\n")
            }
            _ => String::new(),
        };
        Output { success: true, status: "exit status: 0".into(), stdout, stderr: String::new() }
    }))
}

fn installer(root: &Utf8Path, manager: ManagerKind, runner: &Arc<RecordingRunner>) -> Installer {
    let config = Config {
        prefix: root.join("prefix"),
        packages_prefix: installer::Prefix::default(),
        unit_dir: root.join("units"),
        manager,
        keep: 3,
        lock_wait: Duration::ZERO,
        create_users: false,
        confirm_timeout: None,
    };
    Installer::new(config, runner.clone()).with_accounts(Arc::new(ServiceUsers))
}

/// The accounts fling's deploys create on servers (`install --create-users`), `flotilla-<service>`
/// with a group of the same name, standing in for the host's (which need not have them).
struct ServiceUsers;

impl Accounts for ServiceUsers {
    fn user(&self, name: &str) -> Result<Option<Account>, String> {
        Ok(name.starts_with("flotilla-").then_some(Account { uid: 990, gid: 990 }))
    }
    fn group(&self, name: &str) -> Result<Option<u32>, String> {
        Ok(name.starts_with("flotilla-").then_some(990))
    }
}

/// The user each service declares in the release record, by service.
fn recorded_users(release: &Utf8Path) -> Vec<(String, Option<ServiceUser>)> {
    let text = fs::read_to_string(release.join("release.json")).unwrap();
    let info: ReleaseInfo = serde_json::from_str(&text).unwrap();
    info.services.into_iter().map(|s| (s.name, s.user)).collect()
}

/// A loopback HTTP server standing in for a service's `/health` endpoint, counting the GETs it
/// answered. The fake binaries in the packages run nothing, so the installer's probe is pointed
/// here instead of the service's real port.
struct HealthServer {
    url: String,
    hits: Arc<AtomicUsize>,
}

impl HealthServer {
    fn start() -> HealthServer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/health", listener.local_addr().unwrap());
        let hits = Arc::new(AtomicUsize::new(0));
        let counter = hits.clone();
        // The thread lives until the test binary exits; it only ever answers on loopback.
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let mut buf = [0u8; 1024];
                let n = stream.read(&mut buf).unwrap_or(0);
                if String::from_utf8_lossy(&buf[..n]).starts_with("GET /health ") {
                    counter.fetch_add(1, Ordering::SeqCst);
                    let _ = stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
                } else {
                    let _ =
                        stream.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n");
                }
            }
        });
        HealthServer { url, hits }
    }
}

/// The port of a `listen = "host:port"` or `"[v6]:port"` address.
fn listen_port(config: &str) -> u16 {
    let table: toml::Table = toml::from_str(config).unwrap();
    let listen = table["listen"].as_str().unwrap();
    listen.rsplit_once(':').unwrap().1.parse().unwrap()
}

/// How the unit passes the config: the workspace's services take `--config config.toml`;
/// Debian's etcd, the one prebuilt binary, takes `--config-file config.yaml`.
fn launch(dir: &Utf8Path, service: &str) -> (&'static str, &'static str) {
    let unit = fs::read_to_string(dir.join(format!("{service}.service"))).unwrap();
    if unit.contains(" --config-file ") {
        ("--config-file", "config.yaml")
    } else {
        ("--config", "config.toml")
    }
}

/// The port of etcd's plain-HTTP `listen-metrics-urls`, which serves its `/health`.
fn metrics_port(config: &str) -> u16 {
    let line = config.lines().find_map(|l| l.strip_prefix("listen-metrics-urls:"));
    let url = line.expect("etcd's config has no listen-metrics-urls").trim();
    url.rsplit_once(':').unwrap().1.trim_end_matches('/').parse().unwrap()
}

fn listing(dir: &Utf8Path) -> Vec<String> {
    let mut names: Vec<String> =
        dir.read_dir_utf8().unwrap().map(|e| e.unwrap().file_name().to_owned()).collect();
    names.sort();
    names
}

#[test]
fn the_projects_service_definitions_install_under_systemd_and_smf() {
    let smf = Utf8Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().join("smf");
    let mut services: Vec<String> = listing(&smf);
    services.retain(|s| smf.join(s).is_dir());
    assert!(!services.is_empty(), "no service under {smf}");
    let tmp = TempDir::new("project-smf");
    let root = tmp.path();
    let mut files = Vec::new();
    let mut health_servers = Vec::new();
    for service in &services {
        let dir = smf.join(service);
        let (flag, config_file) = launch(&dir, service);
        for required in ["manifest.xml", &format!("{service}.service"), config_file] {
            assert!(dir.join(required).is_file(), "{dir} has no {required}");
        }
        let base = format!("root/opt/flotilla/{service}");
        // Each service declares an HTTP health check of its own API on loopback, at the port
        // its config listens on.
        let config = fs::read_to_string(dir.join(config_file)).unwrap();
        let declared = fs::read_to_string(dir.join(installer::health::HEALTH_FILE))
            .unwrap_or_else(|e| panic!("{dir} has no health.toml: {e}"));
        let check = installer::health::parse(&declared)
            .unwrap_or_else(|e| panic!("{dir}/health.toml: {e}"));
        let installer::health::Probe::Http(url) = &check.probe else {
            panic!("{dir}/health.toml: expected an http probe, got {:?}", check.probe)
        };
        let port = if flag == "--config" { listen_port(&config) } else { metrics_port(&config) };
        assert!(
            url == &format!("http://[::1]:{port}/health")
                || url == &format!("http://127.0.0.1:{port}/health"),
            "{dir}/health.toml probes {url}, not /health on loopback port {port}"
        );
        let server = HealthServer::start();
        let mut entries = vec![Entry::exe(&format!("{base}/bin/{service}"), "#!/bin/sh\n")];
        for file in listing(&dir) {
            let mut contents = fs::read_to_string(dir.join(&file)).unwrap();
            if file == installer::health::HEALTH_FILE {
                contents = contents.replace(url.as_str(), &server.url);
                assert!(contents.contains(&server.url), "{dir}/health.toml: URL not replaced");
            }
            entries.push(Entry::file(&format!("{base}/pkg/{file}"), &contents));
        }
        health_servers.push(server);
        files.push((format!("{service}.tar.gz"), zone_bytes(service, entries)));
    }
    let files: Vec<(&str, Vec<u8>)> = files.iter().map(|(n, b)| (n.as_str(), b.clone())).collect();
    let packages = packages_dir(root, "packages", &files);

    let runner = running();
    let smf_root = root.join("smf");
    fs::create_dir_all(&smf_root).unwrap();
    let inst = installer(&smf_root, ManagerKind::Smf, &runner);
    let outcome = inst.install(&packages, None).unwrap();
    let commands = runner.take();
    let release = smf_root.join("prefix/releases").join(&outcome.release);
    for service in &services {
        let manifest = fs::read_to_string(release.join(service).join("pkg/manifest.xml")).unwrap();
        let parsed = installer::manager::parse_manifest(&manifest).unwrap();
        let import = format!("/usr/sbin/svccfg import {release}/{service}/pkg/manifest.xml");
        assert!(commands.contains(&import), "{commands:?}");
        assert!(
            commands.contains(&format!("/usr/sbin/svcadm enable -s {}", parsed.fmri)),
            "{commands:?}"
        );
        // The start method runs the packaged binary through `current`, under this prefix.
        let bin = format!("{}/current/{service}/bin/{service}", smf_root.join("prefix"));
        assert!(manifest.contains(&bin), "{service}: manifest does not start {bin}");
        // ... as the service's own user, which the installer reads from the credential.
        let own = ServiceUser {
            user: format!("flotilla-{service}"),
            group: Some(format!("flotilla-{service}")),
        };
        assert_eq!(parsed.credential.as_ref(), Some(&own), "{service}: manifest.xml");
    }
    for (service, user) in recorded_users(&release) {
        assert_eq!(user.map(|u| u.user), Some(format!("flotilla-{service}")), "{service} (smf)");
    }

    // The installer waited for every service's health check before calling the release active.
    for (service, server) in services.iter().zip(&health_servers) {
        assert!(server.hits.load(Ordering::SeqCst) >= 1, "{service}: health check never probed");
    }
    let probed: Vec<usize> = health_servers.iter().map(|s| s.hits.load(Ordering::SeqCst)).collect();

    let runner = running();
    let sd_root = root.join("systemd");
    fs::create_dir_all(&sd_root).unwrap();
    let inst = installer(&sd_root, ManagerKind::Systemd, &runner);
    let outcome = inst.install(&packages, None).unwrap();
    let release = sd_root.join("prefix/releases").join(&outcome.release);
    for (service, user) in recorded_users(&release) {
        let own = format!("flotilla-{service}");
        let expected = ServiceUser { user: own.clone(), group: Some(own) };
        assert_eq!(user, Some(expected), "{service}.service: User= and Group=");
    }
    for ((service, server), before) in services.iter().zip(&health_servers).zip(&probed) {
        assert!(
            server.hits.load(Ordering::SeqCst) > *before,
            "{service}: not probed under systemd"
        );
    }
    for service in &services {
        let unit =
            fs::read_to_string(sd_root.join("units").join(format!("{service}.service"))).unwrap();
        let current = format!("{}/current/{service}", sd_root.join("prefix"));
        let (flag, config_file) = launch(&smf.join(service), service);
        let exec = format!("ExecStart={current}/bin/{service} {flag} {current}/pkg/{config_file}");
        assert!(unit.contains(&exec), "{service}.service does not contain {exec}:\n{unit}");
    }
}
