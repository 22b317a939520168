//! Content-addressed artifacts in an S3-compatible store, as the builder and the installer
//! agree on them: every object's key is its blake3 digest under a prefix, and the builder hands
//! each server a [`FetchList`] of short-lived presigned URLs for exactly the objects it needs.

use serde::{Deserialize, Serialize};

/// The key of the object holding the file whose digest is `digest`, under `prefix` (no leading
/// or trailing `/`; empty for none).
pub fn object_key(prefix: &str, digest: &str) -> String {
    if prefix.is_empty() {
        format!("blake3/{digest}")
    } else {
        format!("{prefix}/blake3/{digest}")
    }
}

/// What to do about an object of the store whose bytes do not match its digest: the builder
/// finds it present and would never upload it again by itself.
pub fn damaged_object_hint(digest: &str) -> String {
    format!(
        "the store's copy is damaged: delete the object blake3/{digest} (under the store's \
         prefix) and run `fling build package` to upload it again"
    )
}

/// One object a server downloads: the file it becomes, its digest and size, and a presigned
/// `GET` URL valid until `expires_at`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FetchObject {
    pub file: String,
    pub digest: String,
    pub size: u64,
    pub url: String,
}

/// What a server fetches for one deploy: the packages (the digest list is written from them)
/// and the installer binary.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FetchList {
    pub packages: Vec<FetchObject>,
    pub installer: FetchObject,
    /// The installer's sha256 (lowercase hex): what a server without an installer checks the
    /// binary against, with `sha256sum`, after downloading it with curl or wget. Lists signed
    /// by an older builder lack it; such servers get the installer pushed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub installer_sha256: Option<String>,
    /// Seconds since the epoch after which the URLs no longer work.
    pub expires_at: u64,
}

/// What the builder's store step did and what it signed, printed as one line after
/// [`SYNC_LINE`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreSync {
    /// The files uploaded now, and their bytes.
    pub uploaded: Vec<String>,
    pub uploaded_bytes: u64,
    /// The files the store already held.
    pub present: Vec<String>,
    /// Absent when the step only uploaded (`fling build package`).
    pub fetch: Option<FetchList>,
}

/// The line prefix before a [`StoreSync`]'s JSON on the builder's standard output.
pub const SYNC_LINE: &str = "flotilla-store ";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_digests_under_the_prefix() {
        assert_eq!(object_key("", "ab"), "blake3/ab");
        assert_eq!(object_key("rack1/out", "ab"), "rack1/out/blake3/ab");
    }
}
