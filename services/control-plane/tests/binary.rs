//! Drives the real `control-plane` binary against node agents: a running agent (the real
//! node-agent code, served in this test process) is healthy, a closed port is down, and an agent
//! that stops is seen going down.

use service_common::client;
use service_common::http::Stopper;
use service_common::testing::{ServiceProcess, TempDir};
use std::net::{SocketAddr, TcpListener};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_control-plane");

/// A node agent serving on an ephemeral loopback port in this process; stopped when dropped.
struct InProcessAgent {
    addr: SocketAddr,
    stopper: Stopper,
    thread: Option<JoinHandle<()>>,
}

impl InProcessAgent {
    fn start(node: &str) -> InProcessAgent {
        let config = node_agent::config::Config {
            listen: "127.0.0.1:0".parse().unwrap(),
            node: Some(node.to_owned()),
            tls: None,
            secret: None,
            tls_listen: None,
            node_config: None,
        };
        let service = node_agent::start(config).unwrap();
        let addr = service.server.local_addr();
        let stopper = service.server.stopper();
        let thread = thread::spawn(move || service.server.serve(service.handler));
        InProcessAgent { addr, stopper, thread: Some(thread) }
    }

    fn stop(&mut self) {
        if let Some(thread) = self.thread.take() {
            self.stopper.stop().unwrap();
            thread.join().unwrap();
        }
    }
}

impl Drop for InProcessAgent {
    fn drop(&mut self) {
        if let Some(thread) = self.thread.take() {
            let _ = self.stopper.stop();
            let _ = thread.join();
        }
    }
}

fn status(addr: SocketAddr) -> serde_json::Value {
    let response = client::get(&addr.to_string(), "/status", Duration::from_secs(5)).unwrap();
    assert_eq!(response.status, 200);
    serde_json::from_slice(&response.body).unwrap()
}

/// Polls `/status` until `done` holds, or panics with the last status.
fn wait_for_status(
    addr: SocketAddr,
    done: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let status = status(addr);
        if done(&status) {
            return status;
        }
        assert!(Instant::now() < deadline, "status never settled: {status:#}");
        thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn sees_running_agents_healthy_and_missing_ones_down() {
    let mut agent = InProcessAgent::start("agent-a");
    // Binding and dropping a listener leaves a loopback port with nothing listening.
    let closed = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let dir = TempDir::new("control-plane-bin");
    let config = dir.write(
        "config.toml",
        &format!(
            "listen = \"127.0.0.1:0\"\nnode = \"cp-1\"\npoll_interval_ms = 100\n\
             request_timeout_ms = 500\n\
             [[agents]]\nname = \"up\"\naddress = \"{}\"\n\
             [[agents]]\nname = \"gone\"\naddress = \"{closed}\"\n",
            agent.addr
        ),
    );
    let mut cp = ServiceProcess::start(BIN, &["--config", config.as_str()]);
    let addr = cp.listening_addr();

    let health = client::get(&addr.to_string(), "/health", Duration::from_secs(5)).unwrap();
    let health: serde_json::Value = serde_json::from_slice(&health.body).unwrap();
    assert_eq!(
        health,
        serde_json::json!({
            "service": "control-plane",
            "version": env!("CARGO_PKG_VERSION"),
            "node": "cp-1",
            "status": "ok",
        })
    );

    let status = wait_for_status(addr, |s| s["summary"]["unknown"] == 0);
    assert_eq!(
        status["summary"],
        serde_json::json!({"total": 2, "healthy": 1, "down": 1, "unknown": 0})
    );
    let up = &status["agents"][0];
    assert_eq!((up["name"].as_str(), up["state"].as_str()), (Some("up"), Some("healthy")));
    assert_eq!(up["node"], "agent-a");
    assert_eq!(up["version"], env!("CARGO_PKG_VERSION"));
    let gone = &status["agents"][1];
    assert_eq!((gone["name"].as_str(), gone["state"].as_str()), (Some("gone"), Some("down")));
    let error = gone["error"].as_str().unwrap();
    assert!(error.starts_with(&format!("connect to {closed}: ")), "{error}");
    cp.wait_for_line(
        &format!("agent up at {} is healthy (node agent-a", agent.addr),
        Duration::from_secs(5),
    );
    cp.wait_for_line("agent gone at ", Duration::from_secs(5));

    // The agent stops: the next polls see it down.
    agent.stop();
    let status = wait_for_status(addr, |s| s["agents"][0]["state"] == "down");
    assert_eq!(status["summary"]["down"], 2);
    cp.wait_for_line(&format!("agent up at {} is down", agent.addr), Duration::from_secs(5));

    cp.sigterm();
    let exit = cp.wait_exit(Duration::from_secs(5));
    assert_eq!(exit.code(), Some(0), "{}", cp.output());
}

#[test]
fn no_agents_by_default_and_bad_config_exits_non_zero() {
    let dir = TempDir::new("control-plane-bin");
    let config = dir.write("config.toml", "listen = \"127.0.0.1:0\"\n");
    let mut cp = ServiceProcess::start(BIN, &["--config", config.as_str()]);
    let addr = cp.listening_addr();
    let status = status(addr);
    assert_eq!(status["agents"], serde_json::json!([]));
    assert_eq!(status["summary"]["total"], 0);
    cp.sigterm();
    assert_eq!(cp.wait_exit(Duration::from_secs(5)).code(), Some(0), "{}", cp.output());

    let bad = dir.write(
        "bad.toml",
        "listen = \"127.0.0.1:0\"\n[[agents]]\nname = \"n1\"\naddress = \"no-port\"\n",
    );
    let mut cp = ServiceProcess::start(BIN, &["--config", bad.as_str()]);
    assert_eq!(cp.wait_exit(Duration::from_secs(10)).code(), Some(78), "{}", cp.output());
    let want = format!("config {bad}:4:11: agents.address: `no-port` is not host:port");
    assert!(cp.output().contains(&want), "{}", cp.output());
}
