//! The on-host installer: verifies packages against their digest list, unpacks them into a new
//! release directory, switches the `current` link atomically, (re)starts exactly the services
//! whose files changed under systemd or SMF, waits for them to be healthy and restores the
//! previous release when they are not.
//!
//! This library runs on servers, so it stays small: no CLI parsing, no terminal UI, and every
//! process goes through a [`runner::Runner`] so the command sequences are testable as data.

pub mod accounts;
pub mod confirm;
pub mod digests;
pub mod error;
pub mod fetch;
pub mod health;
pub mod install;
pub mod lock;
pub mod manager;
pub mod release;
pub mod runner;
pub mod staging;
pub mod survey;
pub mod unpack;

pub use confirm::Awaiting;
pub use digests::DIGEST_LIST;
pub use error::{Error, Result};
pub use flotilla_contracts::Prefix;
pub use install::{Config, Installer, Outcome, Status};
pub use manager::{detect, ManagerKind};
pub use release::{Layout, Releases, DEFAULT_PREFIX};
