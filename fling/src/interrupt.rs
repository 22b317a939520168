//! Ctrl-C during a run: the first interrupt lets the run end cleanly, the second ends it now.
//!
//! A terminal's Ctrl-C reaches fling and the ssh and rsync processes it started. Left to the
//! default action, fling would die with them and never release the deploy lock it took on
//! the builder in an earlier session. Instead the first SIGINT (or SIGTERM) is recorded: the
//! running steps' processes are stopped (they may not have received the signal, when it was
//! sent to fling alone), no further host starts, the teardown releases the lock, the recap is
//! printed and fling exits with 130. A second signal ends fling at once.

use std::{
    process::Child,
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

/// The exit code of an interrupted run, as a shell reports a process ended by SIGINT.
pub const EXIT_INTERRUPTED: i32 = 130;

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(signal: libc::c_int) {
    if INTERRUPTED.swap(true, Ordering::SeqCst) {
        // The second one: the default action, now. Both calls are async-signal-safe.
        unsafe {
            libc::signal(signal, libc::SIG_DFL);
            libc::raise(signal);
        }
    }
}

/// Routes SIGINT and SIGTERM to the handler above, for the rest of the process.
pub fn install() {
    INTERRUPTED.store(false, Ordering::SeqCst);
    let handler = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
    for signal in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only touches an atomic and calls async-signal-safe functions.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = handler;
            // Interrupted reads and waits are restarted rather than failing.
            action.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(signal, &action, std::ptr::null_mut());
        }
    }
}

/// Whether the run was interrupted.
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// Records an interruption as the signal handler does, for tests.
#[cfg(test)]
pub fn interrupt() {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Stops `child` (SIGTERM) if the run is interrupted while `wait` runs, so that a step whose
/// processes never saw the signal does not hold up the teardown.
pub fn wait_or_stop<T>(child: &Child, wait: impl FnOnce() -> T) -> T {
    let pid = child.id() as libc::pid_t;
    let done = AtomicBool::new(false);
    std::thread::scope(|scope| {
        scope.spawn(|| {
            while !done.load(Ordering::SeqCst) {
                if interrupted() {
                    // SAFETY: the child has not been reaped while `done` is false, so the pid
                    // is still this child's.
                    unsafe { libc::kill(pid, libc::SIGTERM) };
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        let result = wait();
        done.store(true, Ordering::SeqCst);
        result
    })
}
