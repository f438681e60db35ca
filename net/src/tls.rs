//! TLS on the gRPC connections (rustls through tonic): a server presents the
//! certificate and key given to it; a client connecting to an `https://` URL checks
//! the server against the system's roots and, when given, a private CA.

use std::path::{Path, PathBuf};

use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity, ServerTlsConfig};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("TLS needs both a certificate and its key: {given} was given, {missing} was not")]
    Half {
        given: &'static str,
        missing: &'static str,
    },
    #[error("`{url}` is not a usable URL: {reason}")]
    Url { url: String, reason: String },
}

/// A server's certificate chain and private key (PEM files).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerIdentity {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl ServerIdentity {
    /// Both paths, neither (no TLS), or an error naming the missing one.
    pub fn from_paths(
        cert: Option<PathBuf>,
        key: Option<PathBuf>,
    ) -> Result<Option<ServerIdentity>, TlsError> {
        match (cert, key) {
            (Some(cert), Some(key)) => Ok(Some(ServerIdentity { cert, key })),
            (None, None) => Ok(None),
            (Some(_), None) => Err(TlsError::Half {
                given: "a certificate (SHOAL_TLS_CERT)",
                missing: "its key (SHOAL_TLS_KEY)",
            }),
            (None, Some(_)) => Err(TlsError::Half {
                given: "a key (SHOAL_TLS_KEY)",
                missing: "its certificate (SHOAL_TLS_CERT)",
            }),
        }
    }

    /// The server side of TLS, reading the files now.
    pub fn server_config(&self) -> Result<ServerTlsConfig, TlsError> {
        let cert = read(&self.cert, "the TLS certificate")?;
        let key = read(&self.key, "the TLS key")?;
        Ok(ServerTlsConfig::new().identity(Identity::from_pem(cert, key)))
    }
}

fn read(path: &Path, what: &'static str) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.to_path_buf(),
        source,
    })
}

/// An endpoint for `url`: plain for `http://`, TLS for `https://`, checking the
/// server against the system's roots and the PEM CA certificate `ca`, if given.
pub fn endpoint(url: &str, ca: Option<&Path>) -> Result<Endpoint, TlsError> {
    let endpoint = Endpoint::from_shared(url.to_string()).map_err(|e| TlsError::Url {
        url: url.to_string(),
        reason: e.to_string(),
    })?;
    if !url.starts_with("https://") {
        return Ok(endpoint);
    }
    let mut tls = ClientTlsConfig::new().with_native_roots();
    if let Some(ca) = ca {
        tls = tls.ca_certificate(Certificate::from_pem(read(ca, "the TLS CA certificate")?));
    }
    endpoint.tls_config(tls).map_err(|e| TlsError::Url {
        url: url.to_string(),
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_an_identity_names_what_is_missing() {
        let err = ServerIdentity::from_paths(Some("c.pem".into()), None).unwrap_err();
        assert!(err.to_string().contains("SHOAL_TLS_KEY"), "{err}");
        assert!(ServerIdentity::from_paths(None, None).unwrap().is_none());
        let id = ServerIdentity::from_paths(Some("/nope/c.pem".into()), Some("k.pem".into()))
            .unwrap()
            .unwrap();
        let err = id.server_config().unwrap_err();
        assert!(err.to_string().contains("/nope/c.pem"), "{err}");
    }

    #[test]
    fn endpoints_follow_the_scheme() {
        endpoint("http://127.0.0.1:7070", None).unwrap();
        endpoint("https://localhost:7070", None).unwrap();
        let err = endpoint("https://localhost:7070", Some(Path::new("/nope/ca.pem"))).unwrap_err();
        assert!(err.to_string().contains("/nope/ca.pem"), "{err}");
        assert!(endpoint("not a url", None).is_err());
    }
}
