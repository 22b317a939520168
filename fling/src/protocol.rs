//! The builder session's protocol, in one place: what the scripts fling sends write and use,
//! and what the client reads back. `plan` writes the steps' scripts, `batch` the session around
//! them, `exec` reads the session's output; each takes these from here.

/// The prefix of every line the session script writes (`@@fling <host> <o|e|s|x> <text>`).
pub const TAG: &str = "@@fling ";

/// The line a builder script writes to stderr when a step enters its next phase.
pub const PHASE_MARKER: &str = "@@fling-phase ";

/// The exit status the lock script uses when another run holds the deploy lock.
pub const LOCK_HELD_STATUS: i32 = 75;

/// The descriptor of the connection-start tokens inside a host's step.
pub const CONNECT_FD: u32 = 7;
