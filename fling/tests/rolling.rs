//! The rolling deploy's decisions with a scripted runner in place of the hosts: which plans run
//! in which order, on which servers, and where a rollout stops. The plans themselves are the
//! ones a real run executes (their scripts are checked by `sh -n`); no ssh, root or network.

use std::time::Duration;

use camino::Utf8Path;
use flotilla_fling::{
    config::Config,
    exec::{HostReport, Outcome, Report},
    flags::Artifacts,
    plan::{Context, Plan},
    rolling::{Rolling, Stopped, EXIT_ROLLOUT_STOPPED},
    ssh::BuilderHop,
};

const CONFIG: &str = r#"
[builder]
server = "builder"
source_path = "$HOME/flotilla"

[deployment]
servers = ["node1", "node2", "node3", "node4"]
staging_dir = "/var/tmp/flotilla-staging"

[deployment.rollout]
batches = [1, "100%"]
max_failed = 1

[quorum.etcd]
members = ["node1", "node2", "node3"]
check = { command = ["/opt/flotilla/current/etcd/bin/etcdctl", "endpoint", "health", "--cluster"] }
leader = { http = "http://127.0.0.1:2381/metrics", contains = "etcd_server_is_leader 1" }

[servers.builder]
username = "builder"
addr = "127.0.0.1"

[servers.node1]
username = "root"
addr = "192.0.2.11"

[servers.node2]
username = "root"
addr = "192.0.2.12"
confirm_timeout_secs = 90

[servers.node3]
username = "root"
addr = "192.0.2.13"

[servers.node4]
username = "root"
addr = "192.0.2.14"
"#;

fn context(config: &Config) -> Context<'_> {
    Context {
        config,
        builder: BuilderHop::new(config, Utf8Path::new("/tmp/fling-RUN")).unwrap(),
        run_id: "RUN".into(),
        builder_control_dir: "/tmp/fling-b-RUN".into(),
        local_source: "/src/flotilla".into(),
        who: "dev@client".into(),
        lock_wait: 0,
    }
}

fn report(plan: &Plan, outcome: impl Fn(&str) -> Outcome) -> Report {
    let hosts: Vec<HostReport> = plan
        .hosts
        .iter()
        .map(|h| HostReport {
            host: h.host.clone(),
            step: "x".into(),
            outcome: outcome(&h.host),
            duration: Duration::ZERO,
            bytes_sent: 0,
            stderr_tail: Vec::new(),
        })
        .collect();
    let failed = hosts.iter().any(|h| h.outcome != Outcome::Ok);
    Report {
        command: plan.command.clone(),
        hosts,
        setup_failure: None,
        exit_code: if failed { 2 } else { 0 },
        duration: Duration::ZERO,
    }
}

/// Every plan's scripts parse.
fn check_scripts(plan: &Plan) {
    let scripts = plan
        .setup
        .iter()
        .chain(plan.hosts.iter().flat_map(|h| &h.steps))
        .chain(&plan.teardown)
        .filter_map(|s| s.script.as_deref());
    for script in scripts {
        let out = std::process::Command::new("sh").args(["-n", "-c", script]).output().unwrap();
        assert!(out.status.success(), "sh -n: {}\n{script}", String::from_utf8_lossy(&out.stderr));
    }
}

/// Runs a rollout where `outcome(what, host)` decides each host's result; returns the report
/// and the plans as `what: hosts` lines.
fn roll(
    config: &Config,
    outcome: impl Fn(&str, &str) -> Outcome,
) -> (flotilla_fling::rolling::RolloutReport, Vec<String>) {
    let cx = context(config);
    let servers = config.select_servers(&[]).unwrap();
    let rolling = Rolling::new(config, Artifacts::default(), servers);
    let mut seen = Vec::new();
    let report = rolling.run(&cx, &mut |what, plan| {
        check_scripts(plan);
        let hosts: Vec<&str> = plan.hosts.iter().map(|h| h.host.as_str()).collect();
        seen.push(format!("{what}: {}", hosts.join(" ")));
        report(plan, |h| outcome(what, h))
    });
    (report, seen)
}

fn parse(text: &str) -> Config {
    Config::parse(Utf8Path::new("deployment.toml"), text).unwrap()
}

#[test]
fn a_rollout_checks_the_quorum_restarts_one_member_at_a_time_and_the_leader_last() {
    let config = parse(CONFIG);
    let (report, seen) = roll(&config, |what, host| {
        if what.contains("leads") && host != "node1" {
            Outcome::Failed { code: Some(1) }
        } else {
            Outcome::Ok
        }
    });
    assert_eq!(report.stopped, None, "{}", report.recap());
    assert_eq!(report.exit_code, 0);
    assert_eq!(report.leaders, [("etcd".to_owned(), Some("node1".to_owned()))]);
    // The ramp says 1, then all the rest, but the quorum of three allows one member at a time:
    // node4, outside the group, joins a batch; the leader, node1, goes last.
    assert_eq!(report.planned, [vec!["node2"], vec!["node3", "node4"], vec!["node1"]]);
    assert_eq!(
        seen,
        [
            "check quorum etcd before the rollout: node1 node2 node3",
            "ask which member of etcd leads: node1 node2 node3",
            "batch 1/3: install: node2",
            "batch 1/3: confirm: node2",
            "batch 1/3: quorum etcd: node1 node2 node3",
            "batch 2/3: install: node3 node4",
            "batch 2/3: confirm: node3 node4",
            "batch 2/3: quorum etcd: node1 node2 node3",
            "batch 3/3: install: node1",
            "batch 3/3: confirm: node1",
            "batch 3/3: quorum etcd: node1 node2 node3",
            "release the deploy lock: ",
        ]
    );
    assert!(report.recap().contains("complete: 4 server(s) in 3 batch(es)"), "{}", report.recap());
}

#[test]
fn max_failed_counts_across_batches_and_a_stop_leaves_the_rest_untouched() {
    let text = CONFIG.replace("[quorum.etcd]", "[quorum.unused]\nmembers = []\n[quorum.etcd]");
    assert!(Config::parse(Utf8Path::new("d.toml"), &text).is_err(), "an empty quorum is refused");
    let text = CONFIG.replace("batches = [1, \"100%\"]", "batches = [1]");
    let config = parse(&text);
    // node2 fails its install (batch 1), node3 its confirmation (batch 2): two failures, one
    // more than max_failed = 1 allows, so batch 3 never starts.
    let (report, seen) = roll(&config, |what, host| match (what, host) {
        (w, "node2") if w.ends_with("install") => Outcome::Failed { code: Some(3) },
        (w, "node3") if w.ends_with("confirm") => Outcome::Unreachable,
        (w, h) if w.contains("leads") && h != "node1" => Outcome::Failed { code: Some(1) },
        _ => Outcome::Ok,
    });
    assert_eq!(report.exit_code, EXIT_ROLLOUT_STOPPED);
    assert_eq!(
        report.stopped,
        Some(Stopped::Budget {
            batch: 2,
            failed: vec!["node2".into(), "node3".into()],
            allowed: 1
        })
    );
    assert!(!seen.iter().any(|s| s.contains("node4") || s.starts_with("batch 3")), "{seen:?}");
    assert_eq!(seen.last().unwrap(), "release the deploy lock: ");
    let recap = report.recap();
    assert!(
        recap.contains("batch 2/4 stopped the rollout: 2 server(s) failed (node2, node3)"),
        "{recap}"
    );
    assert!(recap.contains("not reached, still on their release: node4, node1"), "{recap}");
}

#[test]
fn an_unhealthy_cluster_is_not_rolled_and_a_failed_quorum_gate_stops_the_rollout() {
    let config = parse(CONFIG);
    let (report, seen) = roll(&config, |what, host| match (what, host) {
        (w, "node3") if w.contains("before the rollout") => Outcome::Failed { code: Some(1) },
        _ => Outcome::Ok,
    });
    assert_eq!(report.exit_code, EXIT_ROLLOUT_STOPPED);
    assert!(matches!(&report.stopped, Some(Stopped::Unhealthy { group, .. }) if group == "etcd"));
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert!(report.recap().contains("a rolling deploy upgrades a healthy cluster"));

    let (report, seen) = roll(&config, |what, _| {
        if what == "batch 1/3: quorum etcd" {
            Outcome::Failed { code: Some(1) }
        } else {
            Outcome::Ok
        }
    });
    // Two members said they lead: no leader known, the order stays the deployment's.
    assert_eq!(report.leaders, [("etcd".to_owned(), None)]);
    assert!(
        matches!(&report.stopped, Some(Stopped::Quorum { batch: 1, .. })),
        "{:?}",
        report.stopped
    );
    assert_eq!(report.batches.len(), 1);
    assert!(!seen.iter().any(|s| s.starts_with("batch 2")), "{seen:?}");
}

#[test]
fn the_dry_run_shows_the_batches_the_rules_and_each_servers_confirmation() {
    let config = parse(CONFIG);
    let servers = config.select_servers(&[]).unwrap();
    let rolling = Rolling::new(&config, Artifacts::default(), servers);
    let text = rolling.describe(&config);
    for line in [
        "rolling install of 4 server(s) in 3 batch(es); no further batch starts once more than 1 server(s) failed",
        "quorum etcd: 3 member(s), at most 1 restarting at once",
        "the leader (GET http://127.0.0.1:2381/metrics holding \"etcd_server_is_leader 1\" passes on it) goes last",
        "batch 1/3: node1",
        "batch 2/3: node2, node4",
        "batch 3/3: node3",
        "(node1 30 s, node2 90 s, node3 30 s, node4 30 s)",
    ] {
        assert!(text.contains(line), "{line:?} missing from:\n{text}");
    }
}
