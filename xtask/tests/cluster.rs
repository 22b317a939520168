//! The overlay generators end to end on a three-node testbed: after `fling overlay` and
//! `fling install`, every control plane unlocks the rack over mutual TLS; each node holds its
//! own share and key and no other node's (its whole file system layer is scanned for every
//! secret's bytes); the first install creates each service's user, once; the services run as
//! those users, and secret files are 0600 and owned by them; a redeploy keeps the identities,
//! `--rotate` replaces them and the cluster unlocks again; with one node's agent stopped the
//! remaining two shares still unlock.
//!
//! etcd runs as a three-member cluster with peer and client TLS from the overlay: `etcdctl`
//! (from the host, with the cluster CA and a node's client certificate) finds every member
//! healthy, a client certificate from another CA is refused, a redeploy keeps etcd's data, the
//! cluster comes back healthy after `--rotate`, two members keep quorum when one stops, and
//! every control plane records its unlock in etcd.
//!
//! Needs root (the testbed); skipped without it unless CI is "true".

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use flotilla_testbed::test_support::Testbed;

#[path = "../src/etcd_load.rs"]
mod etcd_load;

const SERVICES_WITH_KEYS: [&str; 3] = ["node-agent", "control-plane", "etcd"];

struct Cluster {
    tb: Testbed,
}

impl Cluster {
    fn fling(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_xtask"))
            .arg("fling")
            .arg("--config")
            .arg(&self.tb.deployment)
            .args(args)
            .env_remove("SSH_AUTH_SOCK")
            .stdin(Stdio::null())
            .output()
            .expect("run cargo xtask fling")
    }

    fn fling_ok(&self, args: &[&str]) -> String {
        let out = self.fling(args);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(out.status.code(), Some(0), "fling {args:?}: {text}");
        text
    }

    fn config(&self) -> toml::Table {
        std::fs::read_to_string(&self.tb.deployment).unwrap().parse().unwrap()
    }

    fn addr(&self, node: &str) -> String {
        let addr = self.config()["servers"][node]["addr"].as_str().unwrap().to_owned();
        if addr.contains(':') {
            format!("[{addr}]")
        } else {
            addr
        }
    }

    /// The builder's copy of the workspace, where `fling overlay` writes.
    fn builder_source(&self) -> PathBuf {
        PathBuf::from(self.config()["builder"]["source_path"].as_str().unwrap())
    }

    /// A file of a node's overlay on the builder.
    fn overlay_file(&self, node: &str, path: &str) -> Vec<u8> {
        let path = self.builder_source().join("out/overlay").join(node).join(path);
        std::fs::read(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
    }

    /// Each node's secrets as the builder made them: its private key and its share.
    fn secrets(&self) -> Vec<(String, &'static str, Vec<u8>)> {
        let mut secrets = Vec::new();
        for node in &self.tb.nodes {
            let key = self.overlay_file(node, "opt/flotilla/node-agent/pkg/tls/node.key");
            secrets.push((node.clone(), "private key", key));
            let share = self.overlay_file(node, "opt/flotilla/node-agent/pkg/secret/share.json");
            let share: serde_json::Value = serde_json::from_slice(&share).unwrap();
            let hex = share["share"].as_str().unwrap().as_bytes().to_vec();
            secrets.push((node.clone(), "share", hex));
        }
        secrets
    }

    /// The rack section of a node's control-plane `/status`, once `done` holds.
    fn wait_for_rack(
        &self,
        node: &str,
        done: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let address = format!("{}:12221", self.addr(node));
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let last = match get_json(&address, "/status") {
                Ok(status) if done(&status["rack"]) => return status["rack"].clone(),
                Ok(status) => status["rack"].to_string(),
                Err(e) => e,
            };
            assert!(Instant::now() < deadline, "{node}: the rack never settled: {last}");
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    /// Runs `etcdctl` on this side against `nodes`' client URLs with the cluster CA and the
    /// client certificate and key at `cert` and `key` (node1's own, unless a test says
    /// otherwise).
    fn etcdctl(&self, nodes: &[String], cert: &Path, key: &Path, args: &[&str]) -> Output {
        let tls = self.builder_source().join("out/overlay/node1/opt/flotilla/etcd/pkg/tls");
        let endpoints: Vec<String> =
            nodes.iter().map(|n| format!("https://{}:2379", self.addr(n))).collect();
        Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .arg("--cacert")
            .arg(tls.join("ca.crt"))
            .arg("--cert")
            .arg(cert)
            .arg("--key")
            .arg(key)
            .arg(format!("--endpoints={}", endpoints.join(",")))
            .args(["--dial-timeout=5s", "--command-timeout=10s"])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run etcdctl (cargo xtask testbed prereqs installs etcd-client)")
    }

    /// `etcdctl` with node1's own client certificate; it must succeed.
    fn etcdctl_ok(&self, nodes: &[String], args: &[&str]) -> String {
        let tls = self.builder_source().join("out/overlay/node1/opt/flotilla/etcd/pkg/tls");
        let out = self.etcdctl(nodes, &tls.join("node.crt"), &tls.join("node.key"), args);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "etcdctl {args:?} on {nodes:?}: {text}");
        text
    }

    /// Waits until every member of `nodes` reports healthy (a member of a new cluster is
    /// healthy only once a leader is elected).
    fn wait_for_etcd(&self, nodes: &[String], cluster_wide: bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut args = vec!["endpoint", "health"];
        if cluster_wide {
            args.push("--cluster");
        }
        loop {
            let tls = self.builder_source().join("out/overlay/node1/opt/flotilla/etcd/pkg/tls");
            let out = self.etcdctl(nodes, &tls.join("node.crt"), &tls.join("node.key"), &args);
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            let healthy = text.matches("is healthy").count();
            if out.status.success() && healthy == if cluster_wide { 3 } else { nodes.len() } {
                return text;
            }
            assert!(Instant::now() < deadline, "etcd on {nodes:?} never became healthy: {text}");
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// Appends `line` to a file of the builder's copy of the workspace.
    fn change_builder_file(&self, path: &str, line: &str) {
        let path = self.builder_source().join(path);
        let mut text = std::fs::read_to_string(&path).unwrap();
        text.push_str(line);
        std::fs::write(&path, text).unwrap();
    }

    /// The release a node runs.
    fn current(&self, node: &str) -> String {
        self.tb.ssh_ok(node, "readlink /opt/flotilla/current")
    }

    /// Waits until a node's control plane answers `/status` over HTTP.
    fn wait_for_status(&self, node: &str) {
        let address = format!("{}:12221", self.addr(node));
        let deadline = Instant::now() + Duration::from_secs(60);
        while let Err(e) = get_json(&address, "/status") {
            assert!(Instant::now() < deadline, "{node} does not serve /status: {e}");
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    /// Runs fling with `args` while a client writes to etcd every 50 ms, from a second before
    /// to a second after, and at least 10 s in all (200 writes). Returns fling's output, what
    /// the writes saw and how long fling took.
    fn under_load(&self, tag: &str, args: &[&str]) -> (Output, etcd_load::Load, Duration) {
        let tls = self.builder_source().join("out/overlay/node1/opt/flotilla/etcd/pkg/tls");
        let target = etcd_load::Target {
            endpoints: self
                .tb
                .nodes
                .iter()
                .map(|n| format!("https://{}:2379", self.addr(n)))
                .collect(),
            ca: tls.join("ca.crt"),
            cert: tls.join("node.crt"),
            key: tls.join("node.key"),
        };
        let started = Instant::now();
        let writer = etcd_load::Writer::start(
            target,
            &format!("flotilla/test/load-{tag}"),
            Duration::from_millis(50),
        );
        std::thread::sleep(Duration::from_secs(1));
        let deploy = Instant::now();
        let out = self.fling(args);
        let took = deploy.elapsed();
        std::thread::sleep(Duration::from_secs(1));
        if let Some(rest) = Duration::from_secs(11).checked_sub(started.elapsed()) {
            std::thread::sleep(rest);
        }
        (out, writer.stop(), took)
    }

    fn main_pid(&self, node: &str, service: &str) -> String {
        self.tb.ssh_ok(node, &format!("systemctl show -p MainPID --value {service}.service"))
    }
}

fn unlocked(rack: &serde_json::Value) -> bool {
    rack["state"] == "unlocked"
}

#[test]
fn a_three_node_cluster_unlocks_keeps_secrets_apart_rotates_and_survives_a_lost_node() {
    let test = "a_three_node_cluster_unlocks_keeps_secrets_apart_rotates_and_survives_a_lost_node";
    if !flotilla_testbed::test_support::can_run(test) {
        return;
    }
    let cluster = Cluster { tb: Testbed::up(&workspace(), "cluster", 3) };
    let nodes = cluster.tb.nodes.clone();
    cluster.fling_ok(&["install-prereqs"]);
    cluster.fling_ok(&["sync"]);
    cluster.fling_ok(&["build", "package"]);
    let overlay = cluster.fling_ok(&["overlay"]);
    assert!(overlay.contains("rack secret 2 of 3 created"), "{overlay}");
    // The first install creates each service's user on every node, before anything is
    // placed; a redeploy (below) finds them and creates nothing.
    let install = cluster.fling_ok(&["install"]);
    for service in SERVICES_WITH_KEYS {
        let created = format!("created user flotilla-{service} for {service}");
        assert_eq!(install.matches(&created).count(), nodes.len(), "{created}: {install}");
    }

    // Every control plane gathers the shares over mutual TLS and unlocks.
    let mut first_unlock = Vec::new();
    for node in &nodes {
        let rack = cluster.wait_for_rack(node, unlocked);
        assert_eq!(rack["message"], "rack unlocked (2 of 3)", "{node}: {rack}");
        // Whichever agents answered first: at least the threshold, all of them cluster nodes
        // (a node's own agent may still be starting when its control plane unlocks).
        let from: Vec<&str> =
            rack["shares_from"].as_array().unwrap().iter().map(|n| n.as_str().unwrap()).collect();
        assert!(from.len() >= 2, "{node}: {rack}");
        assert!(from.iter().all(|n| nodes.iter().any(|m| m == n)), "{node}: {rack}");
        first_unlock.push(rack["unlocked_at"].clone());
    }

    // etcd: all three members healthy over client TLS, asked from this side.
    let health = cluster.wait_for_etcd(&nodes, true);
    for node in &nodes {
        let url = format!("https://{}:2379 is healthy", cluster.addr(node));
        assert!(health.contains(&url), "{node} missing from {health}");
    }
    // A client certificate from another CA is refused, though the server is trusted.
    let foreign = ForeignIdentity::new();
    let out = cluster.etcdctl(&nodes[..1], &foreign.cert, &foreign.key, &["get", "flotilla"]);
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "etcd accepted a foreign client certificate: {text}");
    // etcdctl reports a refused handshake only as a failed connection; the same request with
    // the cluster's own certificate succeeds, so the certificate is what was refused.
    cluster.etcdctl_ok(&nodes[..1], &["get", "flotilla"]);
    // Every control plane recorded its unlock in etcd, and says so in /status.
    for node in &nodes {
        let recorded =
            |r: &serde_json::Value| r["etcd"].as_str().is_some_and(|l| l.starts_with("recorded"));
        let rack = cluster.wait_for_rack(node, recorded);
        let line = format!("recorded in etcd at 127.0.0.1:2379 as flotilla/rack/unlocked/{node}");
        assert_eq!(rack["etcd"], line.as_str(), "{node}: {rack}");
        let key = format!("flotilla/rack/unlocked/{node}");
        let value = cluster.etcdctl_ok(&nodes, &["get", "--print-value-only", &key]);
        let value: serde_json::Value = serde_json::from_str(value.trim()).unwrap();
        assert_eq!(value["node"], node.as_str(), "{value}");
        assert_eq!(value["message"], "rack unlocked (2 of 3)", "{value}");
    }
    // A key written now must survive the redeploy below.
    cluster.etcdctl_ok(&nodes, &["put", "flotilla/test/kept", "before-redeploy"]);

    // Each node's file system layer holds its own secrets and no other node's. The layer is
    // everything the node wrote on top of the shared image, read from this side.
    let secrets = cluster.secrets();
    for node in &nodes {
        let layer = cluster.tb.dir.join("nodes").join(node).join("upper");
        assert!(layer.is_dir(), "{} is not a directory", layer.display());
        let found = scan(&layer, &secrets);
        for (owner, what, _) in &secrets {
            let holds = found.iter().any(|(o, w)| o == owner && w == what);
            assert_eq!(holds, owner == node, "{node} holding {owner}'s {what}: {holds}");
        }
    }

    // Every service runs as its own user, and its secret files are 0600 and that user's.
    for node in &nodes {
        for service in SERVICES_WITH_KEYS {
            let user = format!("flotilla-{service}");
            let pkg = format!("/opt/flotilla/current/{service}/pkg");
            let stat =
                cluster.tb.ssh_ok(node, &format!("stat -L -c '%a %U %G' {pkg}/tls/node.key"));
            assert_eq!(stat, format!("600 {user} {user}"), "{node} {service} node.key");
            // A process's /proc directory belongs to its effective user.
            let pid = cluster.main_pid(node, service);
            assert_ne!(pid, "0", "{node}: {service} is not running");
            let runs_as = cluster.tb.ssh_ok(node, &format!("stat -c %U /proc/{pid}"));
            assert_eq!(runs_as, user, "{node}: the user {service} (pid {pid}) runs as");
        }
        let stat = cluster.tb.ssh_ok(
            node,
            "stat -L -c '%a %U %G' /opt/flotilla/current/node-agent/pkg/secret/share.json",
        );
        assert_eq!(stat, "600 flotilla-node-agent flotilla-node-agent", "{node} share.json");
        // etcd's data directory, which systemd makes for the unit's user.
        let stat = cluster.tb.ssh_ok(node, "stat -c '%a %U %G' /var/lib/flotilla/etcd");
        assert_eq!(stat, "700 flotilla-etcd flotilla-etcd", "{node} etcd data directory");
    }

    // Regenerating and redeploying keeps every identity: same bytes, no service restarted.
    let pids: Vec<String> = nodes.iter().map(|n| cluster.main_pid(n, "node-agent")).collect();
    let overlay = cluster.fling_ok(&["overlay"]);
    assert!(overlay.contains("server identities 3 kept"), "{overlay}");
    let again = cluster.fling_ok(&["install"]);
    assert!(!again.contains("created user"), "a redeploy created users again: {again}");
    assert_eq!(cluster.secrets(), secrets, "a plain overlay changed an identity");
    for (node, pid) in nodes.iter().zip(&pids) {
        assert_eq!(&cluster.main_pid(node, "node-agent"), pid, "node-agent restarted on {node}");
    }
    let kept = cluster.etcdctl_ok(&nodes, &["get", "--print-value-only", "flotilla/test/kept"]);
    assert_eq!(kept.trim(), "before-redeploy", "etcd lost its data in a redeploy");

    // --rotate replaces every identity; the services restart with them and unlock again.
    let overlay = cluster.fling_ok(&["overlay", "--rotate"]);
    assert!(overlay.contains("server identities 0 kept 3 created"), "{overlay}");
    cluster.fling_ok(&["install"]);
    let rotated = cluster.secrets();
    for ((node, what, old), (_, _, new)) in secrets.iter().zip(&rotated) {
        assert_ne!(old, new, "{node}'s {what} survived --rotate");
    }
    for (node, before) in nodes.iter().zip(&first_unlock) {
        let rack = cluster.wait_for_rack(node, |r| unlocked(r) && &r["unlocked_at"] != before);
        assert_eq!(rack["message"], "rack unlocked (2 of 3)", "{node}: {rack}");
    }

    // etcd comes back healthy with the rotated identities (the CA too), and kept its data.
    cluster.wait_for_etcd(&nodes, true);
    let kept = cluster.etcdctl_ok(&nodes, &["get", "--print-value-only", "flotilla/test/kept"]);
    assert_eq!(kept.trim(), "before-redeploy", "etcd lost its data in a rotation");

    // One etcd member stops: the other two keep quorum, and a write and a read succeed.
    cluster.tb.ssh_ok(&nodes[2], "systemctl stop etcd.service");
    let two = &nodes[..2];
    cluster.wait_for_etcd(two, false);
    cluster.etcdctl_ok(two, &["put", "flotilla/test/quorum", "two-of-three"]);
    let value = cluster.etcdctl_ok(two, &["get", "--print-value-only", "flotilla/test/quorum"]);
    assert_eq!(value.trim(), "two-of-three");

    // One node's agent stops: a restarted control plane still unlocks with the other two.
    let lost = &nodes[2];
    cluster.tb.ssh_ok(lost, "systemctl stop node-agent.service");
    cluster.tb.ssh_ok(&nodes[0], "systemctl restart control-plane.service");
    let rack = cluster.wait_for_rack(&nodes[0], |r| {
        unlocked(r) && r["shares_from"].as_array().is_some_and(|a| a.len() == 2)
    });
    assert_eq!(rack["message"], "rack unlocked (2 of 3)");
    assert_eq!(rack["shares_from"], serde_json::json!([nodes[0], nodes[1]]));

    // The stopped member and agent come back: the cluster is whole for the rollouts below.
    cluster.tb.ssh_ok(lost, "systemctl start etcd.service node-agent.service");
    cluster.wait_for_etcd(&nodes, true);
    rolling_upgrades(&cluster);
}

/// Rolling upgrades on the same cluster: an etcd upgrade under a steady write load loses no
/// write (the same upgrade all at once is measured and reported); a canary whose health check
/// fails stops the rollout after the first batch; `max_failed` counts across batches; a release
/// that stops sshd is reverted by the node itself when its confirmation cannot arrive.
fn rolling_upgrades(cluster: &Cluster) {
    let nodes = cluster.tb.nodes.clone();

    // etcd, one member at a time, while a client writes every 50 ms.
    cluster.change_builder_file("smf/etcd/etcd.service", "# changed by the test: rolling\n");
    cluster.fling_ok(&["build", "package"]);
    let pids: Vec<String> = nodes.iter().map(|n| cluster.main_pid(n, "etcd")).collect();
    let (rolled, rolling, rolling_took) = cluster.under_load("rolling", &["install", "--rolling"]);
    assert_eq!(rolled.status.code(), Some(0), "{}", text(&rolled));
    let recap = text(&rolled);
    eprintln!(
        "etcd on 3 nodes, rolling: {} of {} writes failed ({} retried once after a timeout), \
         longest outage {:?}, deploy {:.1} s",
        rolling.failed,
        rolling.writes,
        rolling.retried,
        rolling.longest_outage,
        rolling_took.as_secs_f64()
    );
    assert!(rolling.writes >= 200, "only {} writes", rolling.writes);
    assert_eq!(rolling.failed, 0, "writes failed during the rolling upgrade: {:?}", rolling.errors);
    assert!(recap.contains("complete: 3 server(s) in 3 batch(es)"), "{recap}");
    // One member per batch, the cluster healthy after each, the leader last.
    let batches: Vec<&str> =
        recap.lines().filter(|l| l.trim_start().starts_with("batch ")).collect();
    assert_eq!(batches.len(), 3, "{recap}");
    assert!(
        batches.iter().all(|b| b.contains("installed") && b.contains("quorum etcd healthy")),
        "{recap}"
    );
    let leader_line = recap.lines().find(|l| l.contains("quorum etcd: healthy before the rollout"));
    let leader = leader_line
        .and_then(|l| l.split("leader ").nth(1))
        .and_then(|l| l.split(',').next())
        .unwrap_or_else(|| panic!("no leader found: {recap}"));
    assert!(
        batches[2].contains(&format!("[{leader}]")),
        "the leader {leader} was not last: {recap}"
    );
    for (node, pid) in nodes.iter().zip(&pids) {
        assert_ne!(&cluster.main_pid(node, "etcd"), pid, "etcd did not restart on {node}");
    }
    cluster.wait_for_etcd(&nodes, true);

    // The same kind of upgrade, all at once: measured, not asserted.
    cluster.change_builder_file("smf/etcd/etcd.service", "# changed by the test: all at once\n");
    cluster.fling_ok(&["build", "package"]);
    let (parallel, at_once, at_once_took) = cluster.under_load("parallel", &["install"]);
    eprintln!(
        "etcd on 3 nodes, all at once: {} of {} writes failed ({} retried), longest outage {:?}, \
         deploy {:.1} s (exit {:?})",
        at_once.failed,
        at_once.writes,
        at_once.retried,
        at_once.longest_outage,
        at_once_took.as_secs_f64(),
        parallel.status.code()
    );
    cluster.wait_for_etcd(&nodes, true);

    // A canary that fails its health check stops the rollout after the first batch.
    let health = "smf/control-plane/health.toml";
    let original_health = std::fs::read_to_string(cluster.builder_source().join(health)).unwrap();
    std::fs::write(
        cluster.builder_source().join(health),
        "command = [\"/usr/bin/test\", \"!\", \"-e\", \"/run/fail-canary\"]\ntimeout_secs = 5\n",
    )
    .unwrap();
    cluster.fling_ok(&["build", "package"]);
    for node in &nodes {
        cluster.tb.ssh_ok(node, "touch /run/fail-canary");
    }
    let before: Vec<String> = nodes.iter().map(|n| cluster.current(n)).collect();
    let cp_pids: Vec<String> = nodes.iter().map(|n| cluster.main_pid(n, "control-plane")).collect();
    let out = cluster.fling(&["install", "--rolling"]);
    let recap = text(&out);
    assert_eq!(out.status.code(), Some(5), "{recap}");
    assert!(recap.contains("batch 1/3 stopped the rollout: 1 server(s) failed ("), "{recap}");
    let canary = batch_servers(&recap, 1);
    assert_eq!(canary.len(), 1, "{recap}");
    let untouched = not_reached(&recap);
    assert_eq!(untouched.len(), 2, "{recap}");
    for (i, node) in nodes.iter().enumerate() {
        // The canary reverted; the others were never touched. All keep their release and serve.
        assert_eq!(cluster.current(node), before[i], "{node} changed release: {recap}");
        cluster.wait_for_status(node);
        if untouched.contains(node) {
            assert_eq!(cluster.main_pid(node, "control-plane"), cp_pids[i], "{node} restarted");
        }
    }

    // max_failed = 1 counts across batches: the first batch's failure is within it, the second
    // one's is not, and the third batch never starts.
    let out = cluster.fling(&["install", "--rolling", "--max-failed", "1"]);
    let recap = text(&out);
    assert_eq!(out.status.code(), Some(5), "{recap}");
    assert!(recap.contains("batch 1/3 ["), "{recap}");
    assert!(recap.contains("batch 2/3 stopped the rollout: 2 server(s) failed ("), "{recap}");
    assert!(recap.contains("more than max_failed allows (1)"), "{recap}");
    let third = not_reached(&recap);
    assert_eq!(third.len(), 1, "{recap}");
    let i = nodes.iter().position(|n| n == &third[0]).unwrap();
    assert_eq!(
        cluster.main_pid(&third[0], "control-plane"),
        cp_pids[i],
        "{} was reached",
        third[0]
    );
    for (i, node) in nodes.iter().enumerate() {
        assert_eq!(cluster.current(node), before[i], "{node} changed release: {recap}");
    }
    for node in &nodes {
        cluster.tb.ssh_ok(node, "rm -f /run/fail-canary");
    }
    std::fs::write(cluster.builder_source().join(health), original_health).unwrap();

    // The dead-man's switch. Release A's control plane wants sshd; release B's conflicts with
    // it, so activating B stops the node's sshd and no confirmation can reach it: the node
    // puts A back by itself, which starts sshd again.
    let unit = "smf/control-plane/control-plane.service";
    let original_unit = std::fs::read_to_string(cluster.builder_source().join(unit)).unwrap();
    let with = |dependency: &str| {
        original_unit.replacen("[Unit]\n", &format!("[Unit]\n{dependency}\n"), 1)
    };
    std::fs::write(cluster.builder_source().join(unit), with("Wants=ssh.service")).unwrap();
    cluster.fling_ok(&["build", "package"]);
    cluster.fling_ok(&["install"]);
    let node = &nodes[0];
    let release_a = cluster.current(node);
    std::fs::write(cluster.builder_source().join(unit), with("Conflicts=ssh.service")).unwrap();
    cluster.fling_ok(&["build", "package"]);
    let out = cluster.fling(&["install", "--confirm-timeout", "10", "--servers", node]);
    let recap = text(&out);
    assert_eq!(out.status.code(), Some(4), "the confirmation should not reach {node}: {recap}");
    assert!(recap.contains("awaits confirmation within 10 s"), "{recap}");
    let deadline = Instant::now() + Duration::from_secs(120);
    while !cluster.tb.ssh(node, "true").status.success() {
        assert!(Instant::now() < deadline, "{node} never came back: {recap}");
        std::thread::sleep(Duration::from_millis(500));
    }
    assert_eq!(cluster.current(node), release_a, "{node} is not back on release A");
    let log = cluster.tb.ssh_ok(node, "cat /opt/flotilla/confirm.log");
    assert!(log.contains("was not confirmed within 10 s: reverted to release"), "{log}");
    let status = cluster.fling_ok(&["deploy", "status", "--servers", node]);
    assert!(status.contains("revert-unconfirmed"), "{status}");
    assert_eq!(cluster.tb.ssh_ok(node, "systemctl is-active ssh.service"), "active");
    cluster.wait_for_status(node);
    std::fs::write(cluster.builder_source().join(unit), original_unit).unwrap();
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// The servers of batch `n` in a rollout's recap.
fn batch_servers(recap: &str, n: usize) -> Vec<String> {
    let line = recap
        .lines()
        .find(|l| l.trim_start().starts_with(&format!("batch {n}/")) && l.contains(" ["))
        .unwrap_or_else(|| panic!("no batch {n} in {recap}"));
    let inside = line.split('[').nth(1).and_then(|r| r.split(']').next()).unwrap_or_default();
    inside.split(", ").map(str::to_owned).collect()
}

/// The servers a stopped rollout never reached.
fn not_reached(recap: &str) -> Vec<String> {
    let Some(rest) = recap.split("not reached, still on their release: ").nth(1) else {
        return Vec::new();
    };
    let list = rest.split(" (").next().unwrap_or_default();
    list.split(", ").map(|s| s.trim().to_owned()).collect()
}

/// A client key and certificate signed by a CA of its own, not the cluster's, removed with the
/// value.
struct ForeignIdentity {
    dir: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

impl ForeignIdentity {
    fn new() -> ForeignIdentity {
        use flotilla_overlay as gen;
        let dir = std::env::temp_dir().join(format!("flotilla-foreign-ca-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let state = camino::Utf8PathBuf::try_from(dir.join("state")).unwrap();
        let node = |name: &str| gen::Node {
            name: name.to_owned(),
            addresses: vec!["127.0.0.1".to_owned()],
            vars: Default::default(),
        };
        let config = gen::Config {
            cluster: gen::Cluster {
                nodes: vec![node("intruder1"), node("intruder2")],
                threshold: 2,
                vars: Default::default(),
            },
            state_dir: state,
            identities: gen::Identities::Rotate,
            tls_services: vec!["etcd".to_owned()],
            secret_services: vec!["etcd".to_owned()],
            prefix: "opt/flotilla".to_owned(),
            templates: Vec::new(),
        };
        let overlay = gen::generate(&config).expect("generate a foreign CA and identity");
        let identity =
            ForeignIdentity { cert: dir.join("foreign.crt"), key: dir.join("foreign.key"), dir };
        for file in &overlay.servers["intruder1"] {
            match file.path.file_name() {
                Some("node.crt") => std::fs::write(&identity.cert, &file.contents).unwrap(),
                Some("node.key") => {
                    // A private key, even a throwaway one, is written 0600.
                    let mut out = std::fs::OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .mode(0o600)
                        .open(&identity.key)
                        .unwrap();
                    out.write_all(&file.contents).unwrap();
                }
                _ => {}
            }
        }
        assert!(identity.cert.is_file() && identity.key.is_file(), "no foreign identity");
        identity
    }
}

impl Drop for ForeignIdentity {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Which secrets (owner, kind) occur in any regular file under `dir`.
fn scan(dir: &Path, secrets: &[(String, &'static str, Vec<u8>)]) -> Vec<(String, &'static str)> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(current) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&current) else { continue };
        for entry in entries.flatten() {
            let Ok(kind) = entry.file_type() else { continue };
            if kind.is_dir() {
                stack.push(entry.path());
            } else if kind.is_file() {
                let Ok(bytes) = std::fs::read(entry.path()) else { continue };
                for (owner, what, secret) in secrets {
                    let pair = (owner.clone(), *what);
                    if !found.contains(&pair) && bytes.windows(secret.len()).any(|w| w == secret) {
                        found.push(pair);
                    }
                }
            }
        }
    }
    found
}

/// A GET over plain HTTP/1.1 to the testbed network, returning the JSON body.
fn get_json(address: &str, path: &str) -> Result<serde_json::Value, String> {
    let addr = address
        .to_socket_addrs()
        .map_err(|e| format!("resolve {address}: {e}"))?
        .next()
        .ok_or(format!("resolve {address}: no address"))?;
    let timeout = Duration::from_secs(5);
    let mut stream = TcpStream::connect_timeout(&addr, timeout)
        .map_err(|e| format!("connect {address}: {e}"))?;
    stream.set_read_timeout(Some(timeout)).unwrap();
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n")
        .map_err(|e| format!("GET {path}: {e}"))?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).map_err(|e| format!("GET {path}: {e}"))?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").ok_or("an incomplete response")?;
    if !head.starts_with("HTTP/1.1 200") {
        return Err(format!("GET {path}: {}", head.lines().next().unwrap_or_default()));
    }
    serde_json::from_str(body).map_err(|e| format!("GET {path}: {e}"))
}

/// The root of this repository's workspace.
fn workspace() -> camino::Utf8PathBuf {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    camino::Utf8PathBuf::try_from(dir.canonicalize().unwrap()).unwrap()
}
