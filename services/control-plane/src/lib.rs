//! The control plane: runs on one or more servers (like Omicron's nexus), polls every configured
//! node agent's `/health` in the background and serves the aggregated view at `GET /status`.
//! With `[tls]` configured it also unlocks the rack: it gathers the agents' shares of the rack
//! secret over mutually authenticated TLS (see [`rack`]) and reports the result in `/status`.

pub mod config;
pub mod rack;

use config::{Agent, Config};
use rack::{RackStatus, Unlocker};
use serde::Serialize;
use service_common::http::{Request, Response, Server};
use service_common::{client, info, log, warn, Health, Service};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, SystemTime};

/// The service name, as in `/health` and the package manifest.
pub const SERVICE: &str = "control-plane";
/// The version of this binary.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// The service name a node agent reports in its `/health`.
const AGENT_SERVICE: &str = "node-agent";

/// The body of `GET /status`.
#[derive(Clone, Debug, Serialize)]
pub struct Status {
    pub service: String,
    pub version: String,
    pub node: String,
    /// Every configured agent, in config order.
    pub agents: Vec<AgentStatus>,
    pub summary: Summary,
    /// The rack unlock.
    pub rack: RackStatus,
}

/// How many agents are in each state.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Summary {
    pub total: usize,
    pub healthy: usize,
    pub down: usize,
    pub unknown: usize,
}

/// The last poll of one agent.
#[derive(Clone, Debug, Serialize)]
pub struct AgentStatus {
    pub name: String,
    pub address: String,
    pub state: AgentState,
    /// The node and version the agent reported, when healthy.
    pub node: Option<String>,
    pub version: Option<String>,
    /// Why the agent is down.
    pub error: Option<String>,
    /// When the last poll finished (RFC 3339, UTC).
    pub checked_at: Option<String>,
}

/// An agent's health as seen by the control plane.
#[derive(Clone, Copy, Debug, Eq, PartialEq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AgentState {
    /// Not polled yet.
    Unknown,
    /// Answered `/health` with status `ok`.
    Healthy,
    /// Unreachable, or answered something other than a healthy node agent.
    Down,
}

/// Binds the control plane's listener, starts the poller and builds the request handler.
pub fn start(config: Config) -> Result<Service, String> {
    let node = match config.node {
        Some(node) => node,
        None => service_common::hostname().map_err(|e| {
            format!("determine the node name from the host name: {e}; set `node` in the config")
        })?,
    };
    let server = Server::bind(config.listen).map_err(|e| e.to_string())?;
    let health = Health::ok(SERVICE, VERSION, &node);
    let agents: Vec<AgentStatus> = config.agents.iter().map(AgentStatus::unknown).collect();
    let unlock = Unlock {
        agents: config.agents.clone(),
        tls: config.tls.clone(),
        interval: config.poll_interval,
        timeout: config.request_timeout,
        etcd: config.etcd.clone(),
        node: node.clone(),
    };
    let shared = Arc::new(Mutex::new(agents));
    if !config.agents.is_empty() {
        let poller = Poller {
            agents: config.agents,
            interval: config.poll_interval,
            timeout: config.request_timeout,
            shared: Arc::clone(&shared),
        };
        thread::Builder::new()
            .name("poller".to_owned())
            .spawn(move || poller.run())
            .map_err(|e| format!("start the agent poller thread: {e}"))?;
    }
    let rack = start_unlock(unlock)?;
    let handler = move |req: &Request| match req.path() {
        "/health" if req.is_get() => Response::json(200, &health),
        "/status" if req.is_get() => {
            let agents = lock(&shared).clone();
            let rack_status = rack::lock(&rack).clone();
            Response::json(200, &Status::new(&node, agents, rack_status))
        }
        "/health" | "/status" => Response::method_not_allowed("GET, HEAD"),
        path => Response::not_found(path),
    };
    Ok(Service { server, handler: Box::new(handler) })
}

/// What the rack unlock needs from the config.
struct Unlock {
    agents: Vec<Agent>,
    tls: Option<service_common::config::TlsPaths>,
    interval: Duration,
    timeout: Duration,
    /// Where to record the unlock, if anywhere.
    etcd: Option<String>,
    node: String,
}

/// Starts gathering shares when there is something to unlock with; the returned status is
/// what `/status` serves.
fn start_unlock(unlock: Unlock) -> Result<Arc<Mutex<RackStatus>>, String> {
    let with_share: Vec<Agent> =
        unlock.agents.into_iter().filter(|a| a.tls_address.is_some()).collect();
    let Some(paths) = unlock.tls else {
        return Ok(Arc::new(Mutex::new(RackStatus::disabled("no [tls] configured"))));
    };
    if with_share.is_empty() {
        return Ok(Arc::new(Mutex::new(RackStatus::disabled("no agent has a tls_address"))));
    }
    let tls = service_common::tls::client_config(&paths).map_err(|e| e.to_string())?;
    let mut initial = RackStatus::disabled("rack locked: no share gathered yet");
    initial.state = rack::RackState::Locked;
    let shared = Arc::new(Mutex::new(initial));
    let recorder = unlock.etcd.map(|endpoint| rack::EtcdRecorder {
        endpoint,
        node: unlock.node,
        tls: Arc::clone(&tls),
        timeout: unlock.timeout.max(Duration::from_secs(5)),
        attempts: 60,
        interval: Duration::from_secs(2),
    });
    let status = Arc::clone(&shared);
    let on_unlock = move |unlocked: &RackStatus| {
        if let Some(recorder) = &recorder {
            let report = |line: String| rack::lock(&status).etcd = Some(line);
            let line = recorder.record(unlocked, &report);
            rack::lock(&status).etcd = Some(line);
        }
    };
    let unlocker = Unlocker {
        agents: with_share,
        interval: unlock.interval,
        timeout: unlock.timeout,
        tls,
        shared: Arc::clone(&shared),
        on_unlock: Box::new(on_unlock),
    };
    thread::Builder::new()
        .name("unlock".to_owned())
        .spawn(move || unlocker.run())
        .map_err(|e| format!("start the rack unlock thread: {e}"))?;
    Ok(shared)
}

impl Status {
    fn new(node: &str, agents: Vec<AgentStatus>, rack: RackStatus) -> Status {
        let mut summary = Summary { total: agents.len(), ..Summary::default() };
        for agent in &agents {
            match agent.state {
                AgentState::Unknown => summary.unknown += 1,
                AgentState::Healthy => summary.healthy += 1,
                AgentState::Down => summary.down += 1,
            }
        }
        Status {
            service: SERVICE.to_owned(),
            version: VERSION.to_owned(),
            node: node.to_owned(),
            agents,
            summary,
            rack,
        }
    }
}

impl AgentStatus {
    fn unknown(agent: &Agent) -> AgentStatus {
        AgentStatus {
            name: agent.name.clone(),
            address: agent.address.clone(),
            state: AgentState::Unknown,
            node: None,
            version: None,
            error: None,
            checked_at: None,
        }
    }
}

/// Polls every agent each interval, all agents of a round concurrently so that one slow agent
/// delays the others by at most the request timeout.
struct Poller {
    agents: Vec<Agent>,
    interval: Duration,
    timeout: Duration,
    shared: Arc<Mutex<Vec<AgentStatus>>>,
}

impl Poller {
    fn run(self) {
        loop {
            let results: Vec<AgentStatus> = thread::scope(|scope| {
                let polls: Vec<_> = self
                    .agents
                    .iter()
                    .map(|agent| scope.spawn(move || poll(agent, self.timeout)))
                    .collect();
                polls
                    .into_iter()
                    .zip(&self.agents)
                    .map(|(poll, agent)| {
                        poll.join().unwrap_or_else(|_| AgentStatus {
                            state: AgentState::Down,
                            error: Some("the poll thread panicked".to_owned()),
                            ..AgentStatus::unknown(agent)
                        })
                    })
                    .collect()
            });
            let mut shared = lock(&self.shared);
            for (old, new) in shared.iter_mut().zip(results) {
                log_change(old, &new);
                *old = new;
            }
            drop(shared);
            thread::sleep(self.interval);
        }
    }
}

/// Logs an agent's state only when it changes, so a steady cluster keeps the log quiet.
fn log_change(old: &AgentStatus, new: &AgentStatus) {
    match (old.state, new.state) {
        (a, b) if a == b && old.error == new.error => {}
        (_, AgentState::Healthy) => info!(
            "agent {} at {} is healthy (node {}, version {})",
            new.name,
            new.address,
            new.node.as_deref().unwrap_or("?"),
            new.version.as_deref().unwrap_or("?")
        ),
        _ => warn!(
            "agent {} at {} is down: {}",
            new.name,
            new.address,
            new.error.as_deref().unwrap_or("unknown error")
        ),
    }
}

/// Checks one agent's `/health`.
fn poll(agent: &Agent, timeout: Duration) -> AgentStatus {
    let result = check_health(agent, timeout);
    let checked_at = Some(log::timestamp(SystemTime::now()));
    match result {
        Ok(health) => AgentStatus {
            state: AgentState::Healthy,
            node: Some(health.node),
            version: Some(health.version),
            checked_at,
            ..AgentStatus::unknown(agent)
        },
        Err(error) => AgentStatus {
            state: AgentState::Down,
            error: Some(error),
            checked_at,
            ..AgentStatus::unknown(agent)
        },
    }
}

fn check_health(agent: &Agent, timeout: Duration) -> Result<Health, String> {
    let response = client::get(&agent.address, "/health", timeout).map_err(|e| e.to_string())?;
    if response.status != 200 {
        return Err(format!("GET /health answered {}", response.status));
    }
    let health: Health = serde_json::from_slice(&response.body)
        .map_err(|e| format!("GET /health: not a health document: {e}"))?;
    if health.service != AGENT_SERVICE {
        return Err(format!("GET /health: service is `{}`, not `{AGENT_SERVICE}`", health.service));
    }
    if health.status != "ok" {
        return Err(format!("GET /health: status is `{}`", health.status));
    }
    Ok(health)
}

/// Locks the shared agent list; a poisoned lock still holds a consistent list, because each
/// writer replaces whole entries.
fn lock(shared: &Mutex<Vec<AgentStatus>>) -> std::sync::MutexGuard<'_, Vec<AgentStatus>> {
    shared.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}
