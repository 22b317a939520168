//! The cluster CA and each server's key and certificate, made with `rcgen` on its `ring`
//! backend (ECDSA P-256).
//!
//! The CA's certificate is rebuilt from fixed parameters and its stored key whenever a server
//! certificate is issued, so the issuer name and key identifier always match the stored CA
//! certificate without parsing it back.

use camino::Utf8Path;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

use super::{read_state, write_state, Fate, Identities, Node, OverlayError};

/// The common name of the cluster CA.
pub const CA_NAME: &str = "flotilla cluster CA";

/// Names every server certificate carries besides the server's own, so that a service on the
/// server can be reached (health checks, a database client) over loopback with the same certificate.
pub const LOOPBACK_NAMES: [&str; 3] = ["localhost", "127.0.0.1", "::1"];

/// The cluster CA: its key stays in the state directory, its certificate goes everywhere.
pub struct Ca {
    key: KeyPair,
    pub cert_pem: String,
    pub fate: Fate,
}

/// One server's identity.
pub struct NodeIdentity {
    pub key_pem: String,
    pub cert_pem: String,
    pub fate: Fate,
}

/// The subject alternative names of a server's certificate: its name, its addresses, then the
/// loopback names.
pub fn subject_alt_names(node: &Node) -> Vec<String> {
    let mut names = vec![node.name.clone()];
    for name in node.addresses.iter().map(String::as_str).chain(LOOPBACK_NAMES) {
        if !names.iter().any(|n| n == name) {
            names.push(name.to_owned());
        }
    }
    names
}

/// Loads the CA from the state directory, or makes one when there is none or on rotation.
pub(super) fn ensure_ca(state_dir: &Utf8Path, identities: Identities) -> Result<Ca, OverlayError> {
    let key_path = state_dir.join("ca.key");
    let cert_path = state_dir.join("ca.crt");
    if identities == Identities::Keep {
        if let (Some(key), Some(cert_pem)) = (read_state(&key_path)?, read_state(&cert_path)?) {
            let key = KeyPair::from_pem(&key)
                .map_err(|e| OverlayError::State { path: key_path, message: e.to_string() })?;
            return Ok(Ca { key, cert_pem, fate: Fate::Kept });
        }
    }
    let key = KeyPair::generate().map_err(cert_error(CA_NAME))?;
    let cert = ca_params().self_signed(&key).map_err(cert_error(CA_NAME))?;
    write_state(&key_path, key.serialize_pem().as_bytes())?;
    write_state(&cert_path, cert.pem().as_bytes())?;
    Ok(Ca { key, cert_pem: cert.pem(), fate: Fate::Created })
}

/// Keeps a server's key and certificate when the CA was kept and the names are unchanged;
/// issues a new certificate for the same key when only the names changed; makes a new key when
/// there is none or on rotation.
pub(super) fn ensure_node(
    state_dir: &Utf8Path,
    ca: &Ca,
    node: &Node,
    identities: Identities,
) -> Result<NodeIdentity, OverlayError> {
    let dir = state_dir.join("nodes");
    let key_path = dir.join(format!("{}.key", node.name));
    let cert_path = dir.join(format!("{}.crt", node.name));
    let sans_path = dir.join(format!("{}.names", node.name));
    let sans = subject_alt_names(node);
    let sans_text = sans.join("\n") + "\n";
    let mut kept_key = None;
    if identities == Identities::Keep {
        if let Some(key_pem) = read_state(&key_path)? {
            let same_names = read_state(&sans_path)?.as_deref() == Some(sans_text.as_str());
            if let (true, Fate::Kept, Some(cert_pem)) =
                (same_names, ca.fate, read_state(&cert_path)?)
            {
                return Ok(NodeIdentity { key_pem, cert_pem, fate: Fate::Kept });
            }
            kept_key = Some(key_pem);
        }
    }
    let (key, fate) = match kept_key {
        Some(pem) => {
            let key = KeyPair::from_pem(&pem).map_err(|e| OverlayError::State {
                path: key_path.clone(),
                message: e.to_string(),
            })?;
            (key, Fate::Reissued)
        }
        None => (KeyPair::generate().map_err(cert_error(&node.name))?, Fate::Created),
    };
    let mut params = CertificateParams::new(sans).map_err(cert_error(&node.name))?;
    params.distinguished_name.push(DnType::CommonName, node.name.as_str());
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    // Every service is both a server (its API) and a client (of its peers), so one certificate
    // serves both roles in mutual TLS.
    params.extended_key_usages =
        vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    let issuer = Issuer::new(ca_params(), &ca.key);
    let cert = params.signed_by(&key, &issuer).map_err(cert_error(&node.name))?;
    let identity = NodeIdentity { key_pem: key.serialize_pem(), cert_pem: cert.pem(), fate };
    write_state(&key_path, identity.key_pem.as_bytes())?;
    write_state(&cert_path, identity.cert_pem.as_bytes())?;
    write_state(&sans_path, sans_text.as_bytes())?;
    Ok(identity)
}

/// The CA's parameters: fixed, so the issuer of every server certificate matches the stored
/// CA certificate.
fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, CA_NAME);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params
}

fn cert_error(subject: &str) -> impl Fn(rcgen::Error) -> OverlayError + '_ {
    move |e| OverlayError::Certificate { subject: subject.to_owned(), message: e.to_string() }
}
