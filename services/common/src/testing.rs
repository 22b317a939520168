//! Helpers for the services' tests: a temporary directory and a running service process, both
//! cleaned up when dropped, even when a test fails. Compiled only with the `test-support` feature.

use camino::{Utf8Path, Utf8PathBuf};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

/// A directory under the system temp dir with a unique name, removed when dropped.
pub struct TempDir(Utf8PathBuf);

impl TempDir {
    /// Creates `<tmp>/flotilla-<label>-<pid>-<n>`.
    pub fn new(label: &str) -> TempDir {
        static COUNT: AtomicUsize = AtomicUsize::new(0);
        let n = COUNT.fetch_add(1, Ordering::SeqCst);
        let tmp = Utf8PathBuf::from_path_buf(std::env::temp_dir()).expect("temp dir is UTF-8");
        let dir = tmp.join(format!("flotilla-{label}-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create {dir}: {e}"));
        TempDir(dir)
    }

    pub fn path(&self) -> &Utf8Path {
        &self.0
    }

    /// Writes `text` to `name` inside the directory and returns the file's path.
    pub fn write(&self, name: &str, text: &str) -> Utf8PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, text).unwrap_or_else(|e| panic!("write {path}: {e}"));
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A service binary started by a test, with its stderr collected line by line. Dropping it kills
/// the process (by its own pid) if it still runs.
pub struct ServiceProcess {
    child: Child,
    lines: Receiver<String>,
    seen: Vec<String>,
}

impl ServiceProcess {
    /// Starts `binary` with `args`.
    pub fn start(binary: &str, args: &[&str]) -> ServiceProcess {
        let mut child = Command::new(binary)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("start {binary}: {e}"));
        let stderr = child.stderr.take().expect("stderr is piped");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        ServiceProcess { child, lines, seen: Vec::new() }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for a log line containing `needle` and returns it; panics with every line seen so
    /// far on timeout.
    pub fn wait_for_line(&mut self, needle: &str, timeout: Duration) -> String {
        if let Some(line) = self.seen.iter().find(|l| l.contains(needle)) {
            return line.clone();
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => {
                    panic!("no log line containing {needle:?}; saw:\n{}", self.seen.join("\n"))
                }
            }
        }
    }

    /// Waits for the `listening on <addr>` line and returns the address.
    pub fn listening_addr(&mut self) -> SocketAddr {
        let line = self.wait_for_line("listening on ", Duration::from_secs(20));
        let addr = line.rsplit("listening on ").next().unwrap_or_default();
        addr.trim().parse().unwrap_or_else(|e| panic!("parse address in {line:?}: {e}"))
    }

    /// Sends SIGTERM to this process.
    pub fn sigterm(&self) {
        let pid = libc::pid_t::try_from(self.child.id()).expect("pid fits pid_t");
        // SAFETY: kill has no memory-safety preconditions; the pid is our own child's, which
        // has not been reaped yet, so it cannot name another process.
        let rc = unsafe { libc::kill(pid, libc::SIGTERM) };
        assert_eq!(rc, 0, "kill -TERM {pid}: {}", std::io::Error::last_os_error());
    }

    /// Waits for the process to exit, collecting the rest of its stderr.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => {
                    // The reader thread ends at EOF, which follows the exit closely.
                    while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(2)) {
                        self.seen.push(line);
                    }
                    return status;
                }
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Ok(None) => panic!(
                    "pid {} still running after {timeout:?}; saw:\n{}",
                    self.child.id(),
                    self.seen.join("\n")
                ),
                Err(e) => panic!("wait for pid {}: {e}", self.child.id()),
            }
        }
    }

    /// Every stderr line collected so far.
    pub fn output(&self) -> String {
        self.seen.join("\n")
    }
}

impl Drop for ServiceProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
