//! Dialing keyholderd's TCP listener: TLS 1.3, the server checked against
//! a CA and its name, a client certificate presented (docs/remote.md).
//! Shared by the CLI's `--remote` and Rust clients.

use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tonic::transport::{Channel, Endpoint, Uri};

/// Why a TLS channel could not be made: bad input (the files) or an
/// unreachable or refusing server.
#[derive(Debug)]
pub enum TlsError {
    /// A certificate, key or CA that does not parse, or a bad address.
    Input(String),
    /// The server could not be reached or refused the handshake.
    Unreachable(String),
}

impl std::fmt::Display for TlsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Input(s) | Self::Unreachable(s) => f.write_str(s),
        }
    }
}

/// The client side of the listener's TLS: `server_ca_pem` as the only trust
/// anchor, the client certificate chain and key (PEM) presented, ALPN h2.
pub fn client_config(
    server_ca_pem: &[u8],
    cert_pem: &[u8],
    key_pem: &[u8],
) -> Result<rustls::ClientConfig, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(server_ca_pem) {
        let c = c.map_err(|e| TlsError::Input(format!("server CA: {e}")))?;
        roots
            .add(c)
            .map_err(|e| TlsError::Input(format!("server CA: {e}")))?;
    }
    let chain = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Input(format!("client certificate: {e}")))?;
    let key = PrivateKeyDer::from_pem_slice(key_pem)
        .map_err(|e| TlsError::Input(format!("client key: {e}")))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Input(format!("TLS: {e}")))?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .map_err(|e| TlsError::Input(format!("client certificate: {e}")))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// A gRPC channel to `host:port` over TLS with `config`.
pub async fn connect(
    host: &str,
    port: u16,
    config: rustls::ClientConfig,
) -> Result<Channel, TlsError> {
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let name = ServerName::try_from(host.to_owned())
        .map_err(|e| TlsError::Input(format!("host {host:?}: {e}")))?;
    let host = host.to_owned();
    // The URI is required by the API but unused: the connector dials.
    Endpoint::from_static("http://keyholderd.invalid")
        .connect_timeout(Duration::from_secs(10))
        .timeout(Duration::from_secs(60))
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let (connector, name, host) = (connector.clone(), name.clone(), host.clone());
            async move {
                let tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
                let _ = tcp.set_nodelay(true);
                let tls = connector.connect(name, tcp).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
            }
        }))
        .await
        .map_err(|e| {
            let mut detail = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                detail = format!("{detail}: {s}");
                source = s.source();
            }
            TlsError::Unreachable(detail)
        })
}
