//! `deploy plan`'s table and JSON from fixed server states and payloads (golden files in
//! `tests/golden/plan-*`; `UPDATE_GOLDEN=1` rewrites them), and `install --plan`'s staleness
//! check. No ssh, no root.

use flotilla_contracts::installer::{
    ActiveRelease, HostState, OverlayFile, PackageDigest, Payload, ReleaseService,
};
use flotilla_fling::survey::{self, DeployPlan, Seen, Verdict};

fn digest(seed: char) -> String {
    seed.to_string().repeat(64)
}

fn package(name: &str, seed: char) -> PackageDigest {
    PackageDigest { name: name.into(), file: format!("{name}.tar.gz"), digest: digest(seed) }
}

fn file(path: &str, service: &str, seed: char) -> OverlayFile {
    OverlayFile { path: path.into(), service: service.into(), digest: digest(seed) }
}

fn services() -> Vec<ReleaseService> {
    ["etcd", "node-agent", "control-plane"]
        .map(|s| ReleaseService { name: s.into(), packages: vec![s.into()] })
        .to_vec()
}

/// What a server running release 1111... holds.
fn running(overlay: Vec<OverlayFile>) -> HostState {
    HostState {
        installer: digest('9'),
        active: Some(ActiveRelease {
            id: "1111222233334444".into(),
            packages: vec![
                package("control-plane", 'a'),
                package("etcd", 'b'),
                package("node-agent", 'c'),
            ],
            overlay: Some(overlay),
            services: services(),
        }),
        awaiting_confirmation: None,
    }
}

fn overlay(node: &str, seed: char) -> Vec<OverlayFile> {
    vec![
        file(&format!("opt/flotilla/control-plane/pkg/{node}.toml"), "control-plane", seed),
        file("opt/flotilla/node-agent/pkg/identity.toml", "node-agent", 'e'),
    ]
}

fn payload(release: &str, control_plane: char, overlay: Vec<OverlayFile>) -> Payload {
    Payload {
        release: release.into(),
        installer: digest('9'),
        packages: vec![
            package("control-plane", control_plane),
            package("etcd", 'b'),
            package("node-agent", 'c'),
        ],
        overlay,
    }
}

fn fixture() -> DeployPlan {
    let mut node4 = payload("5555666677778888", 'd', overlay("node4", 'f'));
    node4.installer = digest('8');
    let mut changed_overlay = overlay("node1", 'f');
    changed_overlay.push(file("opt/flotilla/control-plane/pkg/extra.pem", "control-plane", '7'));
    let seen = vec![
        (
            "node1",
            Seen::Found {
                payload: Box::new(payload("aaaabbbbccccdddd", 'd', changed_overlay)),
                state: Box::new(running(overlay("node1", '0'))),
            },
        ),
        (
            "node2",
            Seen::Found {
                payload: Box::new(payload("1111222233334444", 'a', overlay("node2", '0'))),
                state: Box::new(running(overlay("node2", '0'))),
            },
        ),
        (
            "node3",
            Seen::Unreachable(
                "unreachable: ssh: connect to host 10.0.0.3 port 22: No route to host".into(),
            ),
        ),
        (
            "node4",
            Seen::Found {
                payload: Box::new(node4),
                state: Box::new(HostState {
                    installer: String::new(),
                    active: None,
                    awaiting_confirmation: None,
                }),
            },
        ),
    ];
    DeployPlan {
        format: survey::FORMAT,
        command: "deploy install".into(),
        artifacts: "out".into(),
        builder: "builder".into(),
        planned_at: 1_796_300_000,
        servers: seen.into_iter().map(|(name, seen)| survey::server_plan(name, seen)).collect(),
    }
}

fn golden(name: &str, actual: &str) {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden").join(name);
    if std::env::var("UPDATE_GOLDEN").is_ok() {
        std::fs::write(&path, actual).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (UPDATE_GOLDEN=1 writes it)", path.display()));
    assert_eq!(
        actual, expected,
        "{name} differs from its golden file (UPDATE_GOLDEN=1 rewrites it)"
    );
}

#[test]
fn the_plan_table_and_json_match_their_golden_files() {
    let plan = fixture();
    let table = survey::render(&plan);
    golden("plan-table.txt", &table);
    let json = serde_json::to_string_pretty(&plan).unwrap() + "\n";
    golden("plan.json", &json);

    let [node1, node2, node3, node4] = &plan.servers[..] else { panic!() };
    assert_eq!(node1.verdict, Verdict::Changes);
    assert_eq!(node1.restart, ["control-plane"]);
    assert_eq!(node1.unchanged, ["etcd", "node-agent"]);
    assert_eq!(node1.packages.len(), 1);
    assert_eq!(
        node1.overlay.iter().map(|f| f.change.as_str()).collect::<Vec<_>>(),
        ["added", "changed"]
    );
    assert_eq!(node2.verdict, Verdict::Unchanged);
    assert_eq!(node3.verdict, Verdict::Unreachable);
    assert_eq!(node4.verdict, Verdict::Changes);
    assert!(node4.installer.is_some());
    // The file reads back as the same plan.
    assert_eq!(DeployPlan::parse("plan.json", &json).unwrap(), plan);
}

#[test]
fn a_server_without_an_installer_reads_as_nothing_installed() {
    let state: HostState = serde_json::from_value(flotilla_fling::plan::never_installed()).unwrap();
    let plan = survey::compare("node9", payload("5555666677778888", 'd', Vec::new()), state);
    assert_eq!(plan.verdict, Verdict::Changes);
    assert_eq!(plan.release.from, None);
    assert_eq!(plan.installer.as_ref().and_then(|i| i.from.clone()), None);
}

#[test]
fn a_plan_is_stale_when_the_builder_or_a_server_moved() {
    let saved = fixture();
    assert!(survey::stale(&saved, &saved).is_empty());
    assert_eq!(
        saved.to_apply().iter().map(|s| s.server.as_str()).collect::<Vec<_>>(),
        ["node1", "node4"]
    );

    let mut moved = fixture();
    let node1 = &mut moved.servers[0];
    let payload = node1.payload.as_mut().unwrap();
    payload.packages[2].digest = digest('5');
    payload.release = "ffffeeeeddddcccc".into();
    moved.servers[3].release.from = Some("0000000000000000".into());
    let problems = survey::stale(&saved, &moved);
    assert_eq!(
        problems,
        [
            "node1: package node-agent is now 55555555 on the builder, the plan has cccccccc",
            "node4: the server's active release is 0000000000000000, the plan saw none",
        ]
    );

    let mut gone = fixture();
    gone.servers[0] =
        survey::server_plan("node1", Seen::Unreachable("unreachable: timeout".into()));
    assert_eq!(survey::stale(&saved, &gone), ["node1: unreachable: timeout"]);

    let err = DeployPlan::parse("p.json", "{\"format\": 1,\n \"command\": 3}").unwrap_err();
    assert!(err.starts_with("p.json: line 2, column"), "{err}");
    let mut other = serde_json::to_value(&saved).unwrap();
    other["format"] = 9.into();
    let err = DeployPlan::parse("p.json", &other.to_string()).unwrap_err();
    assert!(err.contains("format 9"), "{err}");
}
