//! Build-side packaging: the manifest model, planning, the cache and the archive writer.
//!
//! The API takes configuration structs and reports progress through a trait; it has no command
//! line, terminal or shell dependencies, so other front ends can drive it.

pub mod archive;
pub mod build;
pub mod cache;
pub mod cargo_stamp;
mod error;
mod fetch;
pub mod manifest;
pub mod plan;

pub use error::Error;
pub use fetch::{prefetch_debs, sha256_file, shared_cache_dir, Retry, RetryDuration};
