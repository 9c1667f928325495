//! Facade TLS: builds the rustls server config for the configured
//! [`TlsMode`]: none, a self-signed certificate generated once with rcgen and
//! persisted in `DATA_DIR/tls/`, or PEM files. ACME is a reserved mode: it
//! will slot in here as another way to obtain the certificate resolver.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::TlsMode;
use crate::error::NodeError;

/// The rustls config for `mode`, or `None` for plain HTTP.
pub fn server_config(
    mode: &TlsMode,
    data_dir: &Path,
) -> Result<Option<Arc<rustls::ServerConfig>>, NodeError> {
    let (cert_path, key_path) = match mode {
        TlsMode::None => return Ok(None),
        TlsMode::SelfSigned { names } => {
            let dir = data_dir.join("tls");
            let (cert, key) = (dir.join("self-signed.pem"), dir.join("self-signed.key"));
            if !cert.exists() || !key.exists() {
                generate_self_signed(names, &cert, &key)?;
            }
            (cert, key)
        }
        TlsMode::Files { cert, key } => (cert.clone(), key.clone()),
    };
    let certs = load_certs(&cert_path)?;
    let key = load_key(&key_path)?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| NodeError::Tls(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| NodeError::Tls(format!("{}: {e}", cert_path.display())))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Some(Arc::new(config)))
}

/// Generates and persists a self-signed certificate (key file mode 0600).
pub fn generate_self_signed(names: &[String], cert: &Path, key: &Path) -> Result<(), NodeError> {
    let ck = rcgen::generate_simple_self_signed(names.to_vec())
        .map_err(|e| NodeError::Tls(format!("generating a self-signed certificate: {e}")))?;
    if let Some(dir) = cert.parent() {
        std::fs::create_dir_all(dir)?;
    }
    hubmesh_store::write_private(key, ck.key_pair.serialize_pem().as_bytes())?;
    std::fs::write(cert, ck.cert.pem())?;
    tracing::info!(cert = %cert.display(), "generated a self-signed facade certificate");
    Ok(())
}

fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, NodeError> {
    let bytes =
        std::fs::read(path).map_err(|e| NodeError::Tls(format!("{}: {e}", path.display())))?;
    let certs = rustls_pemfile::certs(&mut bytes.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| NodeError::Tls(format!("{}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(NodeError::Tls(format!(
            "{}: no certificate",
            path.display()
        )));
    }
    Ok(certs)
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, NodeError> {
    let bytes =
        std::fs::read(path).map_err(|e| NodeError::Tls(format!("{}: {e}", path.display())))?;
    rustls_pemfile::private_key(&mut bytes.as_slice())
        .map_err(|e| NodeError::Tls(format!("{}: {e}", path.display())))?
        .ok_or_else(|| NodeError::Tls(format!("{}: no private key", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn self_signed_is_generated_once_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let mode = TlsMode::SelfSigned {
            names: vec!["localhost".into()],
        };
        assert!(server_config(&mode, dir.path()).unwrap().is_some());
        let pem = std::fs::read(dir.path().join("tls/self-signed.pem")).unwrap();
        assert!(server_config(&mode, dir.path()).unwrap().is_some());
        assert_eq!(
            pem,
            std::fs::read(dir.path().join("tls/self-signed.pem")).unwrap()
        );
        assert!(server_config(&TlsMode::None, dir.path()).unwrap().is_none());
        let bad = TlsMode::Files {
            cert: dir.path().join("missing.pem"),
            key: dir.path().join("missing.key"),
        };
        assert!(server_config(&bad, dir.path()).is_err());
    }
}
