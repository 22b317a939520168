//! Drives the real `node-agent` binary: serve `/health`, stop on SIGTERM, refuse bad configs.

use service_common::client;
use service_common::testing::{ServiceProcess, TempDir};
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_node-agent");

#[test]
fn serves_health_and_exits_zero_on_sigterm() {
    let dir = TempDir::new("node-agent-bin");
    let config = dir.write("config.toml", "listen = \"127.0.0.1:0\"\nnode = \"test-node-1\"\n");
    let mut agent = ServiceProcess::start(BIN, &["--config", config.as_str()]);
    let addr = agent.listening_addr();
    assert!(addr.ip().is_loopback() && addr.port() != 0, "{addr}");

    let response = client::get(&addr.to_string(), "/health", Duration::from_secs(5)).unwrap();
    assert_eq!(response.status, 200);
    let health: serde_json::Value = serde_json::from_slice(&response.body).unwrap();
    assert_eq!(
        health,
        serde_json::json!({
            "service": "node-agent",
            "version": env!("CARGO_PKG_VERSION"),
            "node": "test-node-1",
            "status": "ok",
        })
    );
    agent.wait_for_line("\"GET /health\" 200", Duration::from_secs(5));
    let missing = client::get(&addr.to_string(), "/nope", Duration::from_secs(5)).unwrap();
    assert_eq!(missing.status, 404);

    agent.sigterm();
    let status = agent.wait_exit(Duration::from_secs(5));
    assert_eq!(status.code(), Some(0), "{}", agent.output());
    assert!(agent.output().contains("received SIGTERM, shutting down"), "{}", agent.output());
}

#[test]
fn node_defaults_to_the_host_name() {
    let dir = TempDir::new("node-agent-bin");
    let config = dir.write("config.toml", "listen = \"127.0.0.1:0\"\n");
    let mut agent = ServiceProcess::start(BIN, &["--config", config.as_str()]);
    let addr = agent.listening_addr();
    let response = client::get(&addr.to_string(), "/health", Duration::from_secs(5)).unwrap();
    let health: serde_json::Value = serde_json::from_slice(&response.body).unwrap();
    assert_eq!(health["node"], service_common::hostname().unwrap().as_str());
}

#[test]
fn bad_config_exits_non_zero_naming_the_file() {
    let dir = TempDir::new("node-agent-bin");
    let config = dir.write("config.toml", "listen = \"127.0.0.1:0\"\nnod = \"typo\"\n");
    let mut agent = ServiceProcess::start(BIN, &["--config", config.as_str()]);
    let status = agent.wait_exit(Duration::from_secs(10));
    assert_eq!(status.code(), Some(78), "{}", agent.output());
    let want = format!("parse config {config}:2:1: unknown field `nod`");
    assert!(agent.output().contains(&want), "{}", agent.output());

    let absent = dir.path().join("absent.toml");
    let mut agent = ServiceProcess::start(BIN, &["--config", absent.as_str()]);
    assert_eq!(agent.wait_exit(Duration::from_secs(10)).code(), Some(78));
    assert!(agent.output().contains(&format!("read config {absent}: ")), "{}", agent.output());
}

#[test]
fn check_validates_without_serving() {
    let dir = TempDir::new("node-agent-bin");
    let config = dir.write("config.toml", "listen = \"127.0.0.1:0\"\n");
    let mut agent = ServiceProcess::start(BIN, &["--check", "--config", config.as_str()]);
    assert_eq!(agent.wait_exit(Duration::from_secs(10)).code(), Some(0), "{}", agent.output());
    assert!(agent.output().contains(&format!("config {config} is valid")), "{}", agent.output());
    assert!(!agent.output().contains("listening on"), "{}", agent.output());

    let mut agent = ServiceProcess::start(BIN, &["--bogus"]);
    assert_eq!(agent.wait_exit(Duration::from_secs(10)).code(), Some(2));
    assert!(agent.output().contains("unexpected argument `--bogus`"), "{}", agent.output());
}
