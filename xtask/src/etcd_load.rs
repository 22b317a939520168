//! A client that writes to the testbed's etcd cluster on a fixed schedule while a deploy runs:
//! one `etcdctl put` started every `interval` (each in its own thread, so a slow write does not
//! delay the next), against every member's client URL with a node's client certificate. What a
//! rolling upgrade is measured by: how many writes failed, and the longest time between two
//! writes that succeeded (the outage a client saw). Shared by the cluster test and
//! `cargo xtask rollout-bench`.
//!
//! A write that etcd answers with a timeout is tried once more, as an etcd client must: a
//! proposal in flight while the leader hands over its leadership (which a leader does when it
//! is stopped, so once in every rolling upgrade) is dropped without a reply and can only time
//! out (etcd-io/etcd#8975). Such writes count as retried, not failed; a write fails when its
//! second try fails too, or at once for any other error.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Where and as whom to write.
#[derive(Debug, Clone)]
pub struct Target {
    /// `https://<addr>:2379` of every member.
    pub endpoints: Vec<String>,
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// What the writes saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Load {
    pub writes: usize,
    pub failed: usize,
    /// Writes that timed out once and succeeded when tried again.
    pub retried: usize,
    /// The longest time between two successful writes' completions (or from the start to the
    /// first, or from the last to the end).
    pub longest_outage: Duration,
    /// The first failures' messages, for a test's assertion message.
    pub errors: Vec<String>,
}

/// One write under way: when it completed and whether it took a second try, or why it failed.
type Write = JoinHandle<Result<(Instant, bool), String>>;

/// A running writer; [`Writer::stop`] ends it and reports.
pub struct Writer {
    stop: Arc<AtomicBool>,
    ticker: Option<JoinHandle<Vec<Write>>>,
    started: Instant,
}

impl Writer {
    /// Starts writing `<prefix>/<n>` every `interval`.
    pub fn start(target: Target, prefix: &str, interval: Duration) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let started = Instant::now();
        let prefix = prefix.to_owned();
        let flag = stop.clone();
        let target = Arc::new(target);
        let ticker = std::thread::spawn(move || {
            let mut writes = Vec::new();
            let mut n = 0u64;
            let mut next = Instant::now();
            while !flag.load(Ordering::SeqCst) {
                let target = target.clone();
                let key = format!("{prefix}/{n}");
                writes.push(std::thread::spawn(move || put(&target, &key)));
                n += 1;
                next += interval;
                if let Some(wait) = next.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
            }
            writes
        });
        Writer { stop, ticker: Some(ticker), started }
    }

    /// Stops starting writes, waits for the ones under way, and reports.
    pub fn stop(mut self) -> Load {
        self.stop.store(true, Ordering::SeqCst);
        let ended = Instant::now();
        let handles = self.ticker.take().expect("stopped once").join().expect("the ticker ran");
        let mut done = Vec::new();
        let mut errors = Vec::new();
        let mut failed = 0;
        let mut retried = 0;
        let writes = handles.len();
        for handle in handles {
            match handle.join().expect("a write ran") {
                Ok((at, again)) => {
                    done.push(at);
                    retried += usize::from(again);
                }
                Err(e) => {
                    failed += 1;
                    if errors.len() < 5 {
                        errors.push(e);
                    }
                }
            }
        }
        done.sort();
        let mut longest = Duration::ZERO;
        let mut last = self.started;
        for at in done.iter().copied().chain([ended]) {
            longest = longest.max(at.saturating_duration_since(last));
            last = last.max(at);
        }
        Load { writes, failed, retried, longest_outage: longest, errors }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// One write, tried again once after a timeout; the time it completed and whether it was
/// tried again, or why it failed.
fn put(target: &Target, key: &str) -> Result<(Instant, bool), String> {
    match put_once(target, key) {
        Ok(at) => Ok((at, false)),
        Err(e) if timed_out(&e) => put_once(target, key)
            .map(|at| (at, true))
            .map_err(|again| format!("{e}; tried again: {again}")),
        Err(e) => Err(e),
    }
}

/// Whether etcd's answer is a timeout, which is also how a dropped proposal ends.
fn timed_out(error: &str) -> bool {
    error.contains("request timed out") || error.contains("context deadline exceeded")
}

fn put_once(target: &Target, key: &str) -> Result<Instant, String> {
    let out = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .arg("--cacert")
        .arg(&target.ca)
        .arg("--cert")
        .arg(&target.cert)
        .arg("--key")
        .arg(&target.key)
        .arg(format!("--endpoints={}", target.endpoints.join(",")))
        .args(["--dial-timeout=2s", "--command-timeout=5s", "put", key, "v"])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("run etcdctl: {e}"))?;
    if out.status.success() {
        Ok(Instant::now())
    } else {
        Err(format!("put {key}: {}", String::from_utf8_lossy(&out.stderr).trim()))
    }
}
