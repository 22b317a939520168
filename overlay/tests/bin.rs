//! The `flotilla-overlay` binary as xtask runs it: a request on stdin, one summary line on
//! stdout, errors on stderr with a non-zero exit.

use std::io::Write;
use std::process::{Command, Output, Stdio};

fn run(args: &[&str], stdin: &str) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_flotilla-overlay"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start flotilla-overlay");
    // The binary may exit before reading (a usage error), so a broken pipe is not a failure.
    let _ = child.stdin.take().unwrap().write_all(stdin.as_bytes());
    child.wait_with_output().unwrap()
}

fn request(dir: &std::path::Path, threshold: u8) -> String {
    serde_json::json!({
        "servers": [
            {"name": "a", "addresses": ["10.0.0.1"], "vars": {"secret": "of-a"},
             "files": [{"path": "opt/flotilla/node-agent/pkg/identity.toml",
                        "contents": b"name = \"a\"\n".to_vec()}]},
            {"name": "b", "addresses": ["fd00::2"], "vars": {}, "files": []},
        ],
        "threshold": threshold,
        "vars": {},
        "state_dir": dir.join("out/overlay-state"),
        "identities": "keep",
        "tls_services": ["node-agent"],
        "secret_services": ["node-agent"],
        "prefix": "opt/flotilla",
        "templates_dir": dir.join("no-templates"),
        "out_dir": dir.join("out/overlay"),
    })
    .to_string()
}

#[test]
fn a_request_on_stdin_writes_the_overlays_and_prints_one_line_without_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let out = run(&["generate"], &request(dir.path(), 2));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let overlay = dir.path().join("out/overlay");
    assert_eq!(
        stdout,
        format!(
            "wrote the overlay of 2 servers under {}: ca created, server identities 0 kept 2 \
             created 0 reissued, rack secret 2 of 2 created\n",
            overlay.display()
        )
    );
    let pkg = overlay.join("a/opt/flotilla/node-agent/pkg");
    assert_eq!(std::fs::read_to_string(pkg.join("identity.toml")).unwrap(), "name = \"a\"\n");
    assert!(pkg.join("tls/node.key").exists() && pkg.join("secret/share.json").exists());
    assert!(!overlay.join("b/opt/flotilla/node-agent/pkg/identity.toml").exists());
    let again = run(&["generate"], &request(dir.path(), 2));
    assert!(String::from_utf8_lossy(&again.stdout).contains("ca kept"));
}

#[test]
fn bad_input_fails_with_the_reason_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let out = run(&["generate"], &request(dir.path(), 3));
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.starts_with("error: overlay: threshold 3 does not fit 2 servers"), "{stderr}");
    let out = run(&["generate"], "{\"servers\": [}");
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.starts_with("error: read the overlay request from stdin: "), "{stderr}");
    assert!(stderr.contains("line 1 column 14"), "{stderr}");
    let out = run(&["make"], "");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).starts_with("usage: flotilla-overlay generate"));
    assert!(!dir.path().join("out").exists(), "a refused request wrote files");
}
