//! The rack unlock: gather the agents' shares of the rack secret over mutually authenticated
//! TLS, reconstruct the secret from `threshold` of them, and check it against the verifier.
//!
//! Agents are asked again every poll interval until enough shares are in, so an unlock
//! succeeds as soon as any `threshold` agents are reachable, whichever they are. The secret
//! itself is kept only long enough to check it; nothing about it is logged or served.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, SystemTime};

use serde::Serialize;
use service_common::rack::{self, ShareFile};
use service_common::{client, info, log, warn};

use crate::config::Agent;

/// The rack's state in `/status`.
#[derive(Clone, Debug, Serialize)]
pub struct RackStatus {
    pub state: RackState,
    /// One line for people: `rack unlocked (2 of 3)`, or why it is still locked.
    pub message: String,
    pub threshold: Option<u8>,
    pub total_shares: Option<u8>,
    /// The agents whose shares were used, by name.
    pub shares_from: Vec<String>,
    /// Why each agent that did not contribute did not, by name.
    pub errors: BTreeMap<String, String>,
    /// When the rack was unlocked (RFC 3339, UTC).
    pub unlocked_at: Option<String>,
    /// Whether the unlock was recorded in etcd, and where, or why not; `None` without an
    /// `[etcd]` endpoint or before the unlock.
    pub etcd: Option<String>,
}

/// Whether the rack is unlocked.
#[derive(Clone, Copy, Debug, Eq, PartialEq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RackState {
    /// No `[tls]` or no agent with a `tls_address`: there is nothing to unlock with.
    Disabled,
    Locked,
    Unlocked,
}

impl RackStatus {
    pub fn disabled(reason: &str) -> RackStatus {
        RackStatus {
            state: RackState::Disabled,
            message: reason.to_owned(),
            threshold: None,
            total_shares: None,
            shares_from: Vec::new(),
            errors: BTreeMap::new(),
            unlocked_at: None,
            etcd: None,
        }
    }
}

/// Gathers shares until the rack is unlocked.
pub struct Unlocker {
    pub agents: Vec<Agent>,
    pub interval: Duration,
    pub timeout: Duration,
    pub tls: Arc<rustls::ClientConfig>,
    pub shared: Arc<Mutex<RackStatus>>,
    /// Called once with the message after a successful unlock (records it, e.g. in etcd).
    pub on_unlock: Box<dyn Fn(&RackStatus) + Send + Sync>,
}

impl Unlocker {
    pub fn run(self) {
        loop {
            let status = self.attempt();
            let unlocked = status.state == RackState::Unlocked;
            let changed = {
                let mut shared = lock(&self.shared);
                let changed = shared.message != status.message;
                *shared = status.clone();
                changed
            };
            if unlocked {
                info!("{}", status.message);
                (self.on_unlock)(&status);
                return;
            }
            if changed {
                warn!("{}", status.message);
            }
            thread::sleep(self.interval);
        }
    }

    /// Asks every agent for its share, all at once, and tries to reconstruct.
    fn attempt(&self) -> RackStatus {
        let results: Vec<(String, Result<ShareFile, String>)> = thread::scope(|scope| {
            let asks: Vec<_> = self
                .agents
                .iter()
                .filter_map(|agent| Some((agent, agent.tls_address.as_deref()?)))
                .map(|(agent, address)| {
                    let handle = scope.spawn(move || self.ask(agent, address));
                    (agent.name.clone(), handle)
                })
                .collect();
            asks.into_iter()
                .map(|(name, handle)| {
                    let result =
                        handle.join().unwrap_or_else(|_| Err("the thread panicked".into()));
                    (name, result)
                })
                .collect()
        });
        let mut errors = BTreeMap::new();
        let mut shares = Vec::new();
        let mut names = Vec::new();
        for (name, result) in results {
            match result {
                Ok(share) => {
                    names.push(name);
                    shares.push(share);
                }
                Err(e) => {
                    errors.insert(name, e);
                }
            }
        }
        let mut status = RackStatus {
            state: RackState::Locked,
            message: String::new(),
            threshold: shares.first().map(|s| s.threshold),
            total_shares: shares.first().map(|s| s.total_shares),
            shares_from: Vec::new(),
            errors,
            unlocked_at: None,
            etcd: None,
        };
        let Some(first) = shares.first() else {
            status.message = "rack locked: no share gathered yet".to_owned();
            return status;
        };
        let (k, n) = (first.threshold, first.total_shares);
        if shares.len() < usize::from(k) {
            status.message =
                format!("rack locked: {} of the {k} shares needed gathered", shares.len());
            return status;
        }
        match rack::combine(&shares) {
            Ok(_secret) => {
                status.state = RackState::Unlocked;
                status.message = format!("rack unlocked ({k} of {n})");
                status.shares_from = names;
                status.unlocked_at = Some(log::timestamp(SystemTime::now()));
            }
            Err(e) => status.message = format!("rack locked: {e}"),
        }
        status
    }

    fn ask(&self, agent: &Agent, address: &str) -> Result<ShareFile, String> {
        let response = client::get_tls(address, &agent.name, "/share", self.timeout, &self.tls)
            .map_err(|e| e.to_string())?;
        if response.status != 200 {
            return Err(format!("GET /share from {address} answered {}", response.status));
        }
        ShareFile::parse(&response.body).map_err(|e| format!("GET /share from {address}: {e}"))
    }
}

/// Locks the shared rack status; a poisoned lock still holds a whole status.
pub fn lock(shared: &Mutex<RackStatus>) -> std::sync::MutexGuard<'_, RackStatus> {
    shared.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Records a rack unlock in etcd through its v3 JSON gateway (`POST /v3/kv/put`, key and value
/// in base64) over mutual TLS with the node's certificate. Best-effort: the unlock stands
/// whether or not etcd takes the record.
pub struct EtcdRecorder {
    /// `host:port` of the member's client URL.
    pub endpoint: String,
    pub node: String,
    pub tls: Arc<rustls::ClientConfig>,
    pub timeout: Duration,
    /// How often a failed put is tried again, and how long apart: etcd may still be waiting for
    /// a quorum of its peers when the rack unlocks.
    pub attempts: u32,
    pub interval: Duration,
}

/// Where each control plane records its unlock, one key per node.
pub fn etcd_key(node: &str) -> String {
    format!("flotilla/rack/unlocked/{node}")
}

impl EtcdRecorder {
    /// Puts the unlock and returns the line `/status` shows; `report` gets the reason of each
    /// failed attempt while it retries, so `/status` says why it is not recorded yet.
    pub fn record(&self, status: &RackStatus, report: &dyn Fn(String)) -> String {
        use base64::Engine as _;
        let b64 = |bytes: &[u8]| base64::engine::general_purpose::STANDARD.encode(bytes);
        let key = etcd_key(&self.node);
        let value = serde_json::json!({
            "node": self.node,
            "message": status.message,
            "unlocked_at": status.unlocked_at,
            "shares_from": status.shares_from,
        });
        let body = serde_json::json!({ "key": b64(key.as_bytes()), "value": b64(value.to_string().as_bytes()) });
        let body = body.to_string().into_bytes();
        let mut last = String::new();
        for attempt in 1..=self.attempts.max(1) {
            match self.put(&body) {
                Ok(()) => {
                    let line = format!("recorded in etcd at {} as {key}", self.endpoint);
                    info!("rack unlock {line}");
                    return line;
                }
                Err(e) => {
                    if attempt == 1 {
                        warn!("record the rack unlock in etcd at {}: {e}; retrying", self.endpoint);
                    }
                    report(format!("not recorded in etcd at {} yet: {e}; retrying", self.endpoint));
                    last = e;
                }
            }
            thread::sleep(self.interval);
        }
        let line = format!("not recorded in etcd at {}: {last}", self.endpoint);
        warn!("rack unlock {line}");
        line
    }

    fn put(&self, body: &[u8]) -> Result<(), String> {
        let host = self.endpoint.rsplit_once(':').map_or(self.endpoint.as_str(), |(h, _)| h);
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let response = client::post_json_tls(
            &self.endpoint,
            host,
            "/v3/kv/put",
            body,
            self.timeout,
            &self.tls,
        )
        .map_err(|e| e.to_string())?;
        if response.status != 200 {
            let text = String::from_utf8_lossy(&response.body);
            let text: String = text.chars().take(200).collect();
            return Err(format!("POST /v3/kv/put answered {}: {}", response.status, text.trim()));
        }
        Ok(())
    }
}
