//! Mutually authenticated TLS between the services, with rustls on its `ring` provider.
//!
//! Every service holds its node's key and certificate and the cluster CA (from the overlay, see
//! the `[tls]` config table). A server built here accepts only clients whose certificate the
//! cluster CA signed, and a client trusts only servers the cluster CA signed, so a certificate
//! from any other CA is refused in both directions.

use std::sync::Arc;

use camino::{Utf8Path, Utf8PathBuf};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;

use crate::config::TlsPaths;

/// A failure to load the TLS files or build a TLS configuration, naming the file.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("load {what} {path}: {message}")]
    Load { what: &'static str, path: Utf8PathBuf, message: String },
    #[error("set up TLS with {path}: {message}")]
    Setup { path: Utf8PathBuf, message: String },
}

/// A server configuration that requires a client certificate signed by the cluster CA.
pub fn server_config(paths: &TlsPaths) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let roots = Arc::new(roots(&paths.ca)?);
    let verifier = WebPkiClientVerifier::builder_with_provider(roots, Arc::clone(&provider))
        .build()
        .map_err(|e| setup(&paths.ca, e))?;
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| setup(&paths.cert, e))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs(&paths.cert)?, key(&paths.key)?)
        .map_err(|e| setup(&paths.cert, e))?;
    Ok(Arc::new(config))
}

/// A client configuration that trusts only the cluster CA and presents the node's certificate.
pub fn client_config(paths: &TlsPaths) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| setup(&paths.cert, e))?
        .with_root_certificates(roots(&paths.ca)?)
        .with_client_auth_cert(certs(&paths.cert)?, key(&paths.key)?)
        .map_err(|e| setup(&paths.cert, e))?;
    Ok(Arc::new(config))
}

fn roots(path: &Utf8Path) -> Result<RootCertStore, TlsError> {
    let mut store = RootCertStore::empty();
    for cert in certs(path)? {
        store.add(cert).map_err(|e| load("the CA certificate", path, e))?;
    }
    Ok(store)
}

fn certs(path: &Utf8Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
        .map_err(|e| load("certificates", path, e))?;
    if certs.is_empty() {
        return Err(load("certificates", path, "no certificate in the file"));
    }
    Ok(certs)
}

fn key(path: &Utf8Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| load("the private key", path, e))
}

fn load(what: &'static str, path: &Utf8Path, e: impl std::fmt::Display) -> TlsError {
    TlsError::Load { what, path: path.to_owned(), message: e.to_string() }
}

fn setup(path: &Utf8Path, e: impl std::fmt::Display) -> TlsError {
    TlsError::Setup { path: path.to_owned(), message: e.to_string() }
}
