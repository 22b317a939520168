//! The unlock record in a real etcd on loopback: Debian's etcd binary from the user's shared
//! cache (`cargo xtask testbed prereqs` or `cargo xtask package` puts it there), with client
//! TLS from the builder's real overlay generators; the control plane's recorder puts the record
//! and it reads back through the same JSON gateway.
//!
//! Skipped when the binary is not cached, unless CI is "true".

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use camino::{Utf8Path, Utf8PathBuf};
use control_plane::rack::{etcd_key, EtcdRecorder, RackStatus};
use flotilla_overlay::{self as overlay, Cluster, Identities, Node};
use flotilla_package::manifest::{Blob, Manifest, PackageSource};
use service_common::client;
use service_common::config::TlsPaths;
use service_common::testing::TempDir;

/// The cached etcd binary, at the digest the project's manifest pins.
fn cached_etcd() -> Option<Utf8PathBuf> {
    let root = Utf8Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let manifest = Manifest::load(&root.join("package-manifest.toml")).unwrap();
    let sha = manifest
        .packages
        .values()
        .filter_map(|p| match &p.source {
            PackageSource::Local { blobs, .. } => Some(blobs),
            _ => None,
        })
        .flatten()
        .find_map(|b| match b {
            Blob::Pinned(p) if p.deb.as_ref().is_some_and(|d| d.file == "usr/bin/etcd") => {
                Some(p.sha256.as_str().to_owned())
            }
            _ => None,
        })
        .expect("the manifest pins etcd");
    let path = flotilla_package::shared_cache_dir()?.join("deb").join(sha).join("etcd");
    path.is_file().then_some(path)
}

/// A free loopback port: bound, read and released.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// The etcd process this test started, stopped by its pid when dropped.
struct Etcd(Child);

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn the_recorder_puts_the_unlock_into_a_real_etcd_over_mutual_tls() {
    let Some(etcd) = cached_etcd() else {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("etcd is not in the shared cache; CI runs `cargo xtask testbed prereqs` first");
        }
        eprintln!("skipped: etcd is not cached; run `cargo xtask testbed prereqs` (CI != true)");
        return;
    };
    let dir = TempDir::new("cp-etcd");
    let config = overlay::Config {
        cluster: Cluster {
            nodes: ["cp1", "cp2"]
                .iter()
                .map(|name| Node {
                    name: name.to_string(),
                    addresses: vec!["127.0.0.1".to_string()],
                    vars: BTreeMap::new(),
                })
                .collect(),
            threshold: 2,
            vars: BTreeMap::new(),
        },
        state_dir: dir.path().join("state"),
        identities: Identities::Keep,
        tls_services: vec!["control-plane".into()],
        secret_services: vec!["control-plane".into()],
        prefix: "opt/flotilla".into(),
        templates: Vec::new(),
    };
    overlay::write(&overlay::generate(&config).unwrap(), &dir.path().join("overlay")).unwrap();
    let tls = dir.path().join("overlay/cp1/opt/flotilla/control-plane/pkg/tls");
    let paths =
        TlsPaths { cert: tls.join("node.crt"), key: tls.join("node.key"), ca: tls.join("ca.crt") };

    let (client_port, peer_port) = (free_port(), free_port());
    let client_url = format!("https://127.0.0.1:{client_port}");
    let peer_url = format!("http://127.0.0.1:{peer_port}");
    let _etcd = Etcd(
        Command::new(etcd.as_str())
            .args(["--name", "cp1", "--data-dir"])
            .arg(dir.path().join("data").as_str())
            .args(["--listen-client-urls", &client_url, "--advertise-client-urls", &client_url])
            .args(["--listen-peer-urls", &peer_url, "--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &format!("cp1={peer_url}")])
            .args(["--cert-file", paths.cert.as_str(), "--key-file", paths.key.as_str()])
            .args(["--trusted-ca-file", paths.ca.as_str(), "--client-cert-auth"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start etcd"),
    );

    let recorder = EtcdRecorder {
        endpoint: format!("127.0.0.1:{client_port}"),
        node: "cp1".into(),
        tls: service_common::tls::client_config(&paths).unwrap(),
        timeout: Duration::from_secs(5),
        attempts: 50,
        interval: Duration::from_millis(200),
    };
    let mut status = RackStatus::disabled("rack unlocked (2 of 2)");
    status.shares_from = vec!["cp1".into(), "cp2".into()];
    let started = Instant::now();
    let line = recorder.record(&status, &|_| {});
    assert_eq!(line, format!("recorded in etcd at 127.0.0.1:{client_port} as {}", etcd_key("cp1")));
    assert!(started.elapsed() < Duration::from_secs(30));

    // Read it back through the gateway's range call.
    let b64 = base64::engine::general_purpose::STANDARD;
    let body = serde_json::json!({ "key": b64.encode(etcd_key("cp1")) }).to_string();
    let response = client::post_json_tls(
        &recorder.endpoint,
        "127.0.0.1",
        "/v3/kv/range",
        body.as_bytes(),
        Duration::from_secs(5),
        &recorder.tls,
    )
    .unwrap();
    assert_eq!(response.status, 200);
    let range: serde_json::Value = serde_json::from_slice(&response.body).unwrap();
    let value = b64.decode(range["kvs"][0]["value"].as_str().unwrap()).unwrap();
    let value: serde_json::Value = serde_json::from_slice(&value).unwrap();
    assert_eq!(value["node"], "cp1");
    assert_eq!(value["message"], "rack unlocked (2 of 2)");
    assert_eq!(value["shares_from"], serde_json::json!(["cp1", "cp2"]));
}
