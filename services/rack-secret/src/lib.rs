//! The rack secret's share format, shared by the overlay generator on the builder, which deals
//! the shares, and the services: each node agent holds one share, and the control plane
//! reconstructs the secret from `threshold` of them and checks it against the verifier that
//! every share carries. One crate, so both sides always agree on the format.
//!
//! Shares are Shamir shares over GF(256) from the `blahaj` crate, the same crate the builder
//! dealt them with; the verifier is a SHA-256 of a fixed domain prefix and the secret.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The length of the rack secret in bytes.
pub const SECRET_LEN: usize = 32;

/// The domain prefix of the verifier, so that the hash cannot be confused with any other use
/// of SHA-256 over the same bytes.
const VERIFIER_DOMAIN: &[u8] = b"flotilla rack secret verifier v1\0";

/// One node's share, as the overlay ships it (`share.json`).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShareFile {
    pub threshold: u8,
    pub total_shares: u8,
    /// The hex SHA-256 of the verifier domain followed by the secret.
    pub verifier: String,
    /// The hex bytes of the share.
    pub share: String,
}

// A share must never reach a log line, even through `{:?}`.
impl std::fmt::Debug for ShareFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ShareFile {{ {} of {}, share: <secret> }}", self.threshold, self.total_shares)
    }
}

impl ShareFile {
    /// Parses and checks a share file's JSON.
    pub fn parse(bytes: &[u8]) -> Result<ShareFile, String> {
        let share: ShareFile = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        if share.threshold == 0 || share.threshold > share.total_shares {
            return Err(format!(
                "threshold {} does not fit {} shares",
                share.threshold, share.total_shares
            ));
        }
        if unhex(&share.verifier).is_none_or(|v| v.len() != 32) {
            return Err("the verifier is not 64 hex digits".into());
        }
        if unhex(&share.share).is_none_or(|s| s.len() < 2) {
            return Err("the share is not hex of at least 2 bytes".into());
        }
        Ok(share)
    }
}

/// The hex verifier of a secret.
pub fn verifier(secret: &[u8]) -> String {
    let mut hasher = Sha256::new();
    hasher.update(VERIFIER_DOMAIN);
    hasher.update(secret);
    hasher.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// Reconstructs the secret from shares of one secret and checks it against the verifier.
pub fn combine(shares: &[ShareFile]) -> Result<Vec<u8>, String> {
    let Some(first) = shares.first() else { return Err("no shares".into()) };
    if shares.iter().any(|s| s.verifier != first.verifier || s.threshold != first.threshold) {
        return Err("the shares belong to different secrets".into());
    }
    let parsed = shares
        .iter()
        .map(|s| {
            let bytes = unhex(&s.share).ok_or("a share is not hex")?;
            blahaj::Share::try_from(bytes.as_slice()).map_err(str::to_owned)
        })
        .collect::<Result<Vec<_>, String>>()?;
    let secret = blahaj::Sharks(first.threshold).recover(&parsed).map_err(|e| {
        format!("{} of {} shares needed: {}", first.threshold, first.total_shares, e.to_lowercase())
    })?;
    if verifier(&secret) != first.verifier {
        return Err("the reconstructed secret does not match the verifier".into());
    }
    Ok(secret)
}

/// The bytes of a hex string, or `None` if it is not hex.
pub fn unhex(text: &str) -> Option<Vec<u8>> {
    if text.len() % 2 != 0 || !text.is_ascii() {
        return None;
    }
    (0..text.len()).step_by(2).map(|i| u8::from_str_radix(&text[i..i + 2], 16).ok()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shares(secret: &[u8], k: u8, n: usize) -> Vec<ShareFile> {
        blahaj::Sharks(k)
            .dealer(secret)
            .take(n)
            .map(|s| ShareFile {
                threshold: k,
                total_shares: n as u8,
                verifier: verifier(secret),
                share: Vec::from(&s).iter().map(|b| format!("{b:02x}")).collect(),
            })
            .collect()
    }

    #[test]
    fn k_shares_combine_and_fewer_or_foreign_do_not() {
        let secret = [7u8; 32];
        let all = shares(&secret, 2, 3);
        assert_eq!(combine(&all[1..]).unwrap(), secret);
        assert_eq!(combine(&all).unwrap(), secret);
        assert!(combine(&all[..1]).unwrap_err().contains("2 of 3 shares needed"));
        let other = shares(&[8u8; 32], 2, 3);
        let mixed = [all[0].clone(), other[1].clone()];
        assert!(combine(&mixed).unwrap_err().contains("different secrets"));
        let mut wrong = all.clone();
        wrong[0].verifier = verifier(b"another");
        wrong[1].verifier = wrong[0].verifier.clone();
        assert!(combine(&wrong[..2]).unwrap_err().contains("does not match the verifier"));
    }

    #[test]
    fn share_files_are_checked() {
        let good = serde_json::to_vec(&shares(&[1; 32], 2, 3)[0]).unwrap();
        ShareFile::parse(&good).unwrap();
        let text = String::from_utf8(good).unwrap();
        let bad = text.replace("\"threshold\":2", "\"threshold\":4");
        assert!(ShareFile::parse(bad.as_bytes()).unwrap_err().contains("threshold 4"));
        assert!(ShareFile::parse(b"{}").unwrap_err().contains("missing field"));
        assert!(!format!("{:?}", shares(&[1; 32], 2, 3)[0]).contains("share: \""));
    }
}
