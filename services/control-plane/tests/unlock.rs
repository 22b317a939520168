//! The rack unlock on loopback, with material from the builder's real overlay generators: the
//! control-plane binary gathers shares from node agents (the real agent code, served in this
//! process) over mutually authenticated TLS, and a certificate from another CA is refused on
//! either side.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use camino::{Utf8Path, Utf8PathBuf};
use flotilla_overlay::{self as overlay, Cluster, Identities, Node};
use service_common::config::TlsPaths;
use service_common::http::Stopper;
use service_common::testing::{ServiceProcess, TempDir};
use service_common::{client, rack::ShareFile};

const BIN: &str = env!("CARGO_BIN_EXE_control-plane");
const NODES: [&str; 3] = ["node1", "node2", "node3"];

fn repo() -> Utf8PathBuf {
    Utf8Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Generates a 2-of-3 cluster's overlay under `<dir>/overlay/<node>/`, with its state in
/// `<dir>/state`.
fn generate(dir: &Utf8Path) {
    generate_with(dir, Vec::new(), &["127.0.0.1"; 3]);
}

fn generate_with(dir: &Utf8Path, templates: Vec<overlay::Template>, addresses: &[&str; 3]) {
    let config = overlay::Config {
        cluster: Cluster {
            nodes: NODES
                .iter()
                .zip(addresses)
                .map(|(name, address)| Node {
                    name: name.to_string(),
                    addresses: vec![address.to_string()],
                    vars: BTreeMap::new(),
                })
                .collect(),
            threshold: 2,
            vars: BTreeMap::new(),
        },
        state_dir: dir.join("state"),
        identities: Identities::Keep,
        tls_services: vec!["node-agent".into(), "control-plane".into()],
        secret_services: vec!["node-agent".into()],
        prefix: "opt/flotilla".into(),
        templates,
    };
    let generated = overlay::generate(&config).unwrap();
    overlay::write(&generated, &dir.join("overlay")).unwrap();
}

fn tls_paths(dir: &Utf8Path, node: &str, service: &str) -> TlsPaths {
    let tls = dir.join(format!("overlay/{node}/opt/flotilla/{service}/pkg/tls"));
    TlsPaths { cert: tls.join("node.crt"), key: tls.join("node.key"), ca: tls.join("ca.crt") }
}

fn share_path(dir: &Utf8Path, node: &str) -> Utf8PathBuf {
    dir.join(format!("overlay/{node}/opt/flotilla/node-agent/pkg/secret/share.json"))
}

/// A node agent's TLS API on an ephemeral loopback port in this process; stopped when dropped.
struct TlsAgent {
    addr: SocketAddr,
    stopper: Stopper,
    thread: Option<JoinHandle<()>>,
}

impl TlsAgent {
    fn start(dir: &Utf8Path, node: &str) -> TlsAgent {
        let secret = node_agent::config::SecretPaths { share: share_path(dir, node) };
        let share = node_agent::load_share(Some(&secret)).unwrap();
        let tls = tls_paths(dir, node, "node-agent");
        let service =
            node_agent::tls_service(node, &tls, "127.0.0.1:0".parse().unwrap(), share).unwrap();
        let addr = service.server.local_addr();
        let stopper = service.server.stopper();
        let thread = thread::spawn(move || service.server.serve(service.handler));
        TlsAgent { addr, stopper, thread: Some(thread) }
    }
}

impl Drop for TlsAgent {
    fn drop(&mut self) {
        if let Some(thread) = self.thread.take() {
            let _ = self.stopper.stop();
            let _ = thread.join();
        }
    }
}

/// Starts the control plane with `tls` as its identity, gathering from `agents`.
fn control_plane(dir: &TempDir, tls: &TlsPaths, agents: &[(&str, SocketAddr)]) -> ServiceProcess {
    let mut text = format!(
        "listen = \"127.0.0.1:0\"\nnode = \"cp\"\npoll_interval_ms = 100\nrequest_timeout_ms = 2000\n\
         [tls]\ncert = \"{}\"\nkey = \"{}\"\nca = \"{}\"\n",
        tls.cert, tls.key, tls.ca
    );
    for (name, addr) in agents {
        // The plain address is the TLS one too: the health poll fails there, which does not
        // matter to the unlock.
        text.push_str(&format!(
            "[[agents]]\nname = \"{name}\"\naddress = \"{addr}\"\ntls_address = \"{addr}\"\n"
        ));
    }
    static COUNT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = COUNT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let config = dir.write(&format!("cp-{n}.toml"), &text);
    ServiceProcess::start(BIN, &["--config", config.as_str()])
}

fn rack(addr: SocketAddr) -> serde_json::Value {
    let response = client::get(&addr.to_string(), "/status", Duration::from_secs(5)).unwrap();
    assert_eq!(response.status, 200);
    let status: serde_json::Value = serde_json::from_slice(&response.body).unwrap();
    status["rack"].clone()
}

fn wait_for_rack(addr: SocketAddr, done: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let rack = rack(addr);
        if done(&rack) {
            return rack;
        }
        assert!(Instant::now() < deadline, "the rack never settled: {rack:#}");
        thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn the_control_plane_unlocks_the_rack_with_any_two_of_three_shares() {
    let dir = TempDir::new("unlock");
    generate(dir.path());
    let agents: Vec<TlsAgent> = NODES.iter().map(|n| TlsAgent::start(dir.path(), n)).collect();
    let cp_tls = tls_paths(dir.path(), "node1", "control-plane");

    let all: Vec<(&str, SocketAddr)> =
        NODES.iter().copied().zip(agents.iter().map(|a| a.addr)).collect();
    let mut cp = control_plane(&dir, &cp_tls, &all);
    let addr = cp.listening_addr();
    let rack = wait_for_rack(addr, |r| r["state"] == "unlocked");
    assert_eq!(rack["message"], "rack unlocked (2 of 3)");
    assert_eq!((rack["threshold"].as_u64(), rack["total_shares"].as_u64()), (Some(2), Some(3)));
    assert_eq!(rack["shares_from"], serde_json::json!(NODES));
    cp.wait_for_line("rack unlocked (2 of 3)", Duration::from_secs(5));
    // No share reaches the log.
    for node in NODES {
        let share =
            ShareFile::parse(&std::fs::read(share_path(dir.path(), node)).unwrap()).unwrap();
        assert!(!cp.output().contains(&share.share), "{}", cp.output());
    }
    cp.sigterm();
    assert_eq!(cp.wait_exit(Duration::from_secs(5)).code(), Some(0), "{}", cp.output());

    // Two agents are enough, whichever two.
    let two = [all[1], all[2]];
    let mut cp = control_plane(&dir, &cp_tls, &two);
    let rack = wait_for_rack(cp.listening_addr(), |r| r["state"] == "unlocked");
    assert_eq!(rack["message"], "rack unlocked (2 of 3)");
    assert_eq!(rack["shares_from"], serde_json::json!(["node2", "node3"]));
    cp.sigterm();
    cp.wait_exit(Duration::from_secs(5));

    // One is not: the rack stays locked and says why.
    let mut cp = control_plane(&dir, &cp_tls, &all[..1]);
    let rack = wait_for_rack(cp.listening_addr(), |r| {
        r["message"] != "rack locked: no share gathered yet"
    });
    assert_eq!(rack["state"], "locked");
    assert_eq!(rack["message"], "rack locked: 1 of the 2 shares needed gathered");
    thread::sleep(Duration::from_millis(500));
    assert_eq!(self::rack(cp.listening_addr())["state"], "locked");
    cp.sigterm();
    cp.wait_exit(Duration::from_secs(5));

    // The agent's name must be in its certificate: an agent answering under another name is
    // not trusted with a share.
    let swapped = [("node2", all[0].1), ("node1", all[1].1)];
    let mut cp = control_plane(&dir, &cp_tls, &swapped);
    let rack = wait_for_rack(cp.listening_addr(), |r| {
        r["errors"].as_object().is_some_and(|e| e.len() == 2)
    });
    assert_eq!(rack["state"], "locked");
    let error = rack["errors"]["node2"].as_str().unwrap();
    assert!(error.contains("certificate"), "{error}");
    cp.sigterm();
    cp.wait_exit(Duration::from_secs(5));
}

#[test]
fn certificates_from_another_ca_are_refused_both_ways() {
    let dir = TempDir::new("unlock-foreign");
    let cluster = dir.path().join("cluster");
    let foreign = dir.path().join("foreign");
    generate(&cluster);
    generate(&foreign);
    let agent = TlsAgent::start(&cluster, "node1");
    let address = agent.addr.to_string();

    // The cluster's own certificate gets the share.
    let own =
        service_common::tls::client_config(&tls_paths(&cluster, "node2", "control-plane")).unwrap();
    let response =
        client::get_tls(&address, "node1", "/share", Duration::from_secs(5), &own).unwrap();
    assert_eq!(response.status, 200);
    let served = ShareFile::parse(&response.body).unwrap();
    let on_disk = ShareFile::parse(&std::fs::read(share_path(&cluster, "node1")).unwrap()).unwrap();
    assert_eq!(served, on_disk);

    // A client certificate from another CA that trusts the cluster CA: the agent refuses it.
    let mut mixed = tls_paths(&foreign, "node2", "control-plane");
    mixed.ca = tls_paths(&cluster, "node2", "control-plane").ca;
    let mixed = service_common::tls::client_config(&mixed).unwrap();
    let err = client::get_tls(&address, "node1", "/share", Duration::from_secs(5), &mixed)
        .unwrap_err()
        .to_string();
    assert!(err.starts_with(&format!("request /share from {address}: ")), "{err}");

    // A client of another cluster does not trust the agent's certificate.
    let other =
        service_common::tls::client_config(&tls_paths(&foreign, "node2", "control-plane")).unwrap();
    let err = client::get_tls(&address, "node1", "/share", Duration::from_secs(5), &other)
        .unwrap_err()
        .to_string();
    // Both CAs carry the same name, so rustls finds a candidate issuer and rejects its
    // signature; a differently named CA would be an unknown issuer. Either is a refusal.
    assert!(err.contains("invalid peer certificate"), "{err}");

    // The control plane of the other cluster never unlocks with this agent.
    let mut cp = control_plane(
        &dir,
        &tls_paths(&foreign, "node1", "control-plane"),
        &[("node1", agent.addr)],
    );
    let rack = wait_for_rack(cp.listening_addr(), |r| {
        r["errors"].as_object().is_some_and(|e| !e.is_empty())
    });
    assert_eq!(rack["state"], "locked");
    cp.sigterm();
    cp.wait_exit(Duration::from_secs(5));
}

/// The repository's templates render, for every server, node files that the services load on
/// top of the shipped configs, as the installer lays them out: the package's `pkg/` directory
/// with the server's overlay placed over it.
#[test]
fn the_repositorys_templates_make_configs_the_services_load() {
    let dir = TempDir::new("unlock-templates");
    let templates =
        overlay::template::load_dir(&repo().join("overlay-templates"), "opt/flotilla").unwrap();
    assert!(templates.len() >= 2, "{templates:?}");
    generate_with(dir.path(), templates, &["fd00::11", "10.0.0.12", "node3.example"]);
    for node in NODES {
        let release = dir.path().join(format!("release-{node}"));
        for service in ["node-agent", "control-plane"] {
            let pkg = release.join(service).join("pkg");
            std::fs::create_dir_all(&pkg).unwrap();
            for entry in repo().join("smf").join(service).read_dir_utf8().unwrap() {
                let entry = entry.unwrap();
                std::fs::copy(entry.path(), pkg.join(entry.file_name())).unwrap();
            }
            let overlay = dir.path().join(format!("overlay/{node}/opt/flotilla/{service}/pkg"));
            copy_tree(&overlay, &pkg);
        }
        let agent = node_agent::config::load(&release.join("node-agent/pkg/config.toml")).unwrap();
        assert_eq!(agent.node.as_deref(), Some(node));
        assert_eq!(agent.tls_listen, Some(node_agent::config::DEFAULT_TLS_LISTEN));
        let share = node_agent::load_share(agent.secret.as_ref()).unwrap().unwrap();
        assert_eq!((share.threshold, share.total_shares), (2, 3));
        service_common::tls::server_config(agent.tls.as_ref().unwrap()).unwrap();

        let cp =
            control_plane::config::load(&release.join("control-plane/pkg/config.toml")).unwrap();
        assert_eq!(cp.node.as_deref(), Some(node));
        let agents: Vec<(&str, &str, Option<&str>)> = cp
            .agents
            .iter()
            .map(|a| (a.name.as_str(), a.address.as_str(), a.tls_address.as_deref()))
            .collect();
        assert_eq!(
            agents,
            [
                ("node1", "[fd00::11]:12220", Some("[fd00::11]:12223")),
                ("node2", "10.0.0.12:12220", Some("10.0.0.12:12223")),
                ("node3", "node3.example:12220", Some("node3.example:12223")),
            ]
        );
        service_common::tls::client_config(cp.tls.as_ref().unwrap()).unwrap();
    }
}

fn copy_tree(from: &Utf8Path, to: &Utf8Path) {
    for entry in from.read_dir_utf8().unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.path().is_dir() {
            std::fs::create_dir_all(&target).unwrap();
            copy_tree(entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}
