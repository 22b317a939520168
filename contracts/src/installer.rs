//! The installer's command line as the deploy side relies on it: its exit codes. fling reads
//! them from a server's step; the installer binary returns them.

/// Every asked-for change is done.
pub const EXIT_OK: u8 = 0;
/// Anything else failed; the previous release stays active.
pub const EXIT_FAILED: u8 = 1;
/// Another install holds the host's lock.
pub const EXIT_LOCKED: u8 = 2;
/// The new release was activated but a service did not become healthy; the previous release
/// was restored.
pub const EXIT_UNHEALTHY: u8 = 3;
/// `install --if-staged`: the staging directory does not hold what the given staged key names
/// (or installing from it failed before anything changed), so the deploy must push first.
pub const EXIT_NOT_STAGED: u8 = 4;
