//! The rack secret: 32 random bytes split into k-of-n Shamir shares over GF(256) by the
//! `blahaj` crate (a maintained fork of `sharks`), plus a verifier (a SHA-256 of the secret
//! under a fixed domain prefix) with which whoever reconstructs can tell the right secret from
//! a wrong one. The secret itself is never stored: the shares in the state directory are what
//! is kept between generations.

use std::collections::BTreeMap;

use camino::Utf8Path;
use serde::{Deserialize, Serialize};

use super::{read_state, write_state, Cluster, Fate, Identities, OverlayError};

pub use rack_secret::{combine, verifier, ShareFile, SECRET_LEN};

/// The shares kept in the state directory, by server name.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct State {
    threshold: u8,
    shares: BTreeMap<String, ShareFile>,
}

/// Splits a fresh random secret into one share per server, `threshold` of which reconstruct it.
pub fn deal(threshold: u8, names: &[&str]) -> Result<BTreeMap<String, ShareFile>, OverlayError> {
    let mut secret = [0u8; SECRET_LEN];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut secret)
        .map_err(|_| OverlayError::Invalid("the system random source failed".into()))?;
    let verifier = verifier(&secret);
    let total = names.len() as u8;
    let shares = blahaj::Sharks(threshold).dealer(&secret).take(names.len());
    let shares = names
        .iter()
        .zip(shares)
        .map(|(name, share)| {
            let bytes: Vec<u8> = Vec::from(&share);
            let file = ShareFile {
                threshold,
                total_shares: total,
                verifier: verifier.clone(),
                share: hex(&bytes),
            };
            (name.to_string(), file)
        })
        .collect();
    // The secret only lived in this stack frame; clearing it is cheap insurance.
    secret.fill(0);
    Ok(shares)
}

/// Keeps the shares in the state directory when they were dealt to the same servers with the
/// same threshold, and deals new ones otherwise.
pub(super) fn ensure_shares(
    state_dir: &Utf8Path,
    cluster: &Cluster,
    identities: Identities,
) -> Result<(BTreeMap<String, ShareFile>, Fate), OverlayError> {
    let path = state_dir.join("rack-shares.json");
    let names: Vec<&str> = cluster.nodes.iter().map(|n| n.name.as_str()).collect();
    if identities == Identities::Keep {
        if let Some(text) = read_state(&path)? {
            let state: State = serde_json::from_str(&text)
                .map_err(|e| OverlayError::State { path: path.clone(), message: e.to_string() })?;
            let same_servers = state.shares.keys().map(String::as_str).eq(sorted(&names));
            if state.threshold == cluster.threshold && same_servers {
                return Ok((state.shares, Fate::Kept));
            }
        }
    }
    let shares = deal(cluster.threshold, &names)?;
    let state = State { threshold: cluster.threshold, shares };
    write_state(&path, &serde_json::to_vec_pretty(&state).expect("shares serialize"))?;
    Ok((state.shares, Fate::Created))
}

fn sorted<'a>(names: &[&'a str]) -> Vec<&'a str> {
    let mut names = names.to_vec();
    names.sort_unstable();
    names
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
