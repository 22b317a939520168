//! fling: from a client, through a builder, to many servers, over OpenSSH.
//!
//! `config` reads the topology, `flags` holds the builder's flags that fling forwards, `quote`
//! is the one quoting helper for remote shells, `ssh` builds the command lines of both hops,
//! `plan` turns each command into per-host steps as data, `rollout` orders a rolling deploy's
//! batches and `rolling` runs them plan after plan, `batch` is the builder session that
//! runs a plan's steps, `exec` walks a plan concurrently and returns a report, `overlay` asks
//! the generators for each server's own files, `survey` turns a `deploy plan` run into each
//! server's changes, `journal` keeps every run's per-host outcome on the builder. Nothing here
//! prints or exits: progress goes
//! through [`exec::Events`].
//!
//! Exit codes of a run: 0 every host succeeded; 1 fling could not run (config, arguments, local
//! error); 2 some hosts failed; 3 the deploy lock is held by another run; 4 some hosts were
//! unreachable; 5 a rolling install stopped before its last batch (`rolling`); 6 some failed and
//! some were unreachable; 7 `install --plan` found its plan stale (`survey`); 130 interrupted.

pub mod batch;
pub mod config;
pub mod error;
pub mod exec;
pub mod flags;
pub mod interrupt;
pub mod journal;
pub mod overlay;
pub mod plan;
pub mod protocol;
pub mod quote;
pub mod rolling;
pub mod rollout;
pub mod ssh;
pub mod survey;

pub use error::{Error, Result};
