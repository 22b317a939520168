//! What flotilla's crates agree on, each in one place: the digest list (`digests.b3`), the
//! install prefix with the release and staging layouts, the service-manager kind, the users
//! service definitions declare, the overlay request, and atomic writes with exact modes.
//!
//! Every other crate (the packager, the installer, the overlay generators, fling) uses these
//! instead of a copy of its own, so that two readers of one file can never disagree. The crate
//! is shipped inside the installer to every server, so it stays small.

pub mod atomic;
pub mod digests;
pub mod installer;
pub mod layout;
pub mod manager;
pub mod overlay;
pub mod services;
pub mod store;

pub use layout::{Prefix, DEFAULT_PREFIX, INSTALLER};
pub use manager::ManagerKind;
