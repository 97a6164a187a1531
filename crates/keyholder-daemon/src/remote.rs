//! The TCP listener: gRPC over TLS 1.3 with a client certificate required,
//! for admin tools on other machines (docs/remote.md).
//!
//! - The listener's certificate is issued from a Keyholder CA at every
//!   unlock (a fresh key, in memory only) and renewed when a third of its
//!   life is left; while the session is locked no handshake completes.
//! - Client certificates must chain to the configured client CA (a Keyholder
//!   CA) and carry the clientAuth usage; a serial on the policy's deny list
//!   is refused in the handshake. The certificate's common name is the
//!   caller's identity that policy matches (`clients = [...]`).
//! - Connections are capped ([`crate::config::TcpConfig::max_connections`]);
//!   when all are taken, one that has not completed a handshake and a request
//!   gives way. Handshakes have a deadline; unauthenticated connections
//!   never reach a handler; every refusal is logged with the peer address.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use keyholder_agent::slots::{AcceptBackoff, SlotHandle, Slots};

use crate::listen::Counted;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tonic::transport::server::Connected;

use crate::core::Core;
use crate::error::{Error, Result};

/// Who is on the other end of a TCP connection, from its verified client
/// certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemotePeer {
    /// The peer's address.
    pub addr: SocketAddr,
    /// The client certificate's common name.
    pub name: String,
    /// The client certificate's serial (hex).
    pub serial: String,
    /// The client certificate's end.
    pub not_after: SystemTime,
    /// The session epoch the connection was made in
    /// ([`crate::trust::Trust::tcp_epoch`]).
    pub epoch: u64,
}

/// What a gRPC request over TCP knows of its connection.
#[derive(Clone)]
pub struct TcpConnectInfo {
    /// The authenticated peer.
    pub peer: Arc<RemotePeer>,
    /// The connection's slot.
    pub slot: SlotHandle,
}

/// The TLS configuration of the moment: `None` while locked.
#[derive(Default)]
pub struct TlsState {
    current: RwLock<Option<Current>>,
}

struct Current {
    config: Arc<rustls::ServerConfig>,
    /// Renew from this instant on.
    renew_at: Instant,
}

impl TlsState {
    fn config(&self) -> Option<Arc<rustls::ServerConfig>> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|c| c.config.clone())
    }

    fn due(&self) -> bool {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .is_none_or(|c| Instant::now() >= c.renew_at)
    }

    fn renew_at(&self) -> Option<Instant> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|c| c.renew_at)
    }

    fn clear(&self) {
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = None;
    }
}

/// Checks client certificates: the chain (to the client CA, with the
/// clientAuth usage, within validity) by webpki, then the policy's deny
/// list of serials, read at every handshake.
struct Verifier {
    inner: Arc<dyn ClientCertVerifier>,
    core: std::sync::Weak<Core>,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier").finish_non_exhaustive()
    }
}

impl ClientCertVerifier for Verifier {
    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> std::result::Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        let serial = identity(end_entity)
            .map(|(_, serial, _)| serial)
            .map_err(|_| {
                rustls::Error::InvalidCertificate(rustls::CertificateError::BadEncoding)
            })?;
        let denied = self
            .core
            .upgrade()
            .and_then(|core| core.policy().ok().flatten())
            .is_some_and(|p| {
                p.deny_serials
                    .iter()
                    .any(|s| s.eq_ignore_ascii_case(&serial))
            });
        if denied {
            return Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::Revoked,
            ));
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> std::result::Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> std::result::Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The common name, hex serial and end of validity of a certificate.
fn identity(
    cert: &CertificateDer<'_>,
) -> std::result::Result<(String, String, SystemTime), String> {
    let (_, parsed) =
        x509_parser::parse_x509_certificate(cert.as_ref()).map_err(|e| e.to_string())?;
    let name = parsed
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .unwrap_or_default()
        .to_owned();
    let not_after = u64::try_from(parsed.validity().not_after.timestamp())
        .ok()
        .and_then(|secs| SystemTime::UNIX_EPOCH.checked_add(Duration::from_secs(secs)))
        .unwrap_or(SystemTime::UNIX_EPOCH);
    Ok((name, keyholder_pki::hex(parsed.raw_serial()), not_after))
}

fn pem_certs(pem: &str) -> Result<Vec<CertificateDer<'static>>> {
    use rustls_pki_types::pem::PemObject;
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| Error::Internal(format!("certificate PEM: {e}")))
}

/// Builds the TLS configuration: a fresh listener certificate from the
/// server CA, and the client CA as the only trust anchor.
async fn build(core: &Arc<Core>) -> Result<(Arc<rustls::ServerConfig>, Duration)> {
    use rustls_pki_types::pem::PemObject;
    let tcp = &core.config.tcp;
    let client_ca = core.x509_ca(&tcp.client_ca)?;
    let server_ca = core.x509_ca(tcp.server_ca())?;
    let (mut dns_names, mut ip_addresses) = (Vec::new(), Vec::new());
    for name in &tcp.server_names {
        match name.parse::<std::net::IpAddr>() {
            Ok(ip) => ip_addresses.push(ip),
            Err(_) => dns_names.push(name.clone()),
        }
    }
    let ttl = tcp.server_cert_ttl.min(server_ca.max_ttl);
    let request = keyholder_pki::IssueRequest {
        profile: keyholder_pki::Profile::Server,
        common_name: tcp.server_names.first().cloned().unwrap_or_default(),
        organizations: Vec::new(),
        dns_names,
        ip_addresses,
        ttl,
        backdate: core.config.clock_skew,
    };
    let issued = crate::services::credentials::issue(
        server_ca.clone(),
        request,
        crate::services::credentials::KeySource::Generate(keyholder_pki::KeyAlgorithm::EcdsaP256),
    )
    .await?;
    let mut chain = pem_certs(&issued.certificate_pem)?;
    chain.extend(pem_certs(&server_ca.certificate_pem)?);
    let key_pem = issued
        .private_key_pem
        .as_ref()
        .ok_or_else(|| Error::Internal("no key for the listener certificate".into()))?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|e| Error::Internal(format!("listener key: {e}")))?;
    let mut roots = rustls::RootCertStore::empty();
    for c in pem_certs(&client_ca.certificate_pem)? {
        roots
            .add(c)
            .map_err(|e| Error::Internal(format!("client CA: {e}")))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let inner = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .map_err(|e| Error::Internal(format!("client verifier: {e}")))?;
    let verifier = Arc::new(Verifier {
        inner,
        core: Arc::downgrade(core),
    });
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| Error::Internal(format!("TLS versions: {e}")))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| Error::Internal(format!("listener certificate: {e}")))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    // Resumption would let a client skip the certificate check on a later
    // connection after its certificate was put on the deny list.
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    let life = issued
        .not_after
        .duration_since(SystemTime::now())
        .unwrap_or_default();
    Ok((Arc::new(config), life))
}

/// Keeps `state` current: a configuration while unlocked, renewed when a
/// third of the certificate's life is left; none while locked.
pub async fn keep_current(core: Arc<Core>, state: Arc<TlsState>) {
    let mut status = core.watch_status();
    let mut shutdown = core.shutdown_signal();
    loop {
        if core.is_unlocked() {
            if state.due() {
                match build(&core).await {
                    Ok((config, life)) => {
                        let renew_at = Instant::now() + life.saturating_sub(life / 3);
                        *state.current.write().unwrap_or_else(|p| p.into_inner()) =
                            Some(Current { config, renew_at });
                        tracing::info!(
                            names = ?core.config.tcp.server_names,
                            valid_for = %humantime::format_duration(Duration::from_secs(life.as_secs())),
                            "TCP listener certificate issued"
                        );
                    }
                    Err(e) => {
                        state.clear();
                        tracing::warn!(error = %crate::escape::Escaped(&e), client_ca = ?core.config.tcp.client_ca, "TCP listener cannot serve: no certificate (create the CAs named in [tcp])");
                    }
                }
            }
        } else {
            state.clear();
        }
        let wait = state.renew_at().map_or(Duration::from_secs(30), |at| {
            at.saturating_duration_since(Instant::now())
                .clamp(Duration::from_secs(1), Duration::from_secs(30))
        });
        tokio::select! {
            _ = status.changed() => {}
            _ = shutdown.changed() => return,
            () = tokio::time::sleep(wait) => {}
        }
    }
}

/// Accepts TCP connections, completes the TLS handshake within the
/// deadline, and yields authenticated connections for the gRPC server.
pub fn incoming(
    core: Arc<Core>,
    listener: TcpListener,
    state: Arc<TlsState>,
) -> tokio_stream::wrappers::ReceiverStream<io::Result<TlsConn>> {
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(async move {
        let tcp = core.config.tcp.clone();
        let slots = Slots::new(keyholder_agent::slots::capacity_within_fd_limit(
            tcp.max_connections,
            25,
        ));
        let mut backoff = AcceptBackoff::new("tcp");
        loop {
            let accepted = tokio::select! {
                () = tx.closed() => return,
                a = listener.accept() => a,
            };
            let (stream, addr) = match accepted {
                Ok(a) => {
                    backoff.accepted();
                    a
                }
                Err(e) => {
                    backoff.failed(&e, &slots).await;
                    continue;
                }
            };
            let epoch = core.trust().tcp_epoch();
            let Some(config) = state.config() else {
                tracing::info!(peer = %addr, "TCP connection refused: the session is locked");
                continue;
            };
            let Some(slot) = slots.admit() else {
                tracing::warn!(peer = %addr, "TCP connection refused: no free slot");
                continue;
            };
            let _ = stream.set_nodelay(true);
            let tx = tx.clone();
            let deadline = tcp.handshake_timeout;
            tokio::spawn(async move {
                let counted = Counted::new(stream, slot, false);
                let acceptor = tokio_rustls::TlsAcceptor::from(config);
                let tls = match tokio::time::timeout(deadline, acceptor.accept(counted)).await {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(e)) => {
                        tracing::warn!(peer = %addr, error = %crate::escape::Escaped(&e), "TCP connection refused in the TLS handshake");
                        return;
                    }
                    Err(_) => {
                        tracing::warn!(peer = %addr, "TCP connection refused: no TLS handshake within the deadline");
                        return;
                    }
                };
                let peer = tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .map(identity);
                let (name, serial, not_after) = match peer {
                    Some(Ok(id)) => id,
                    _ => {
                        tracing::warn!(peer = %addr, "TCP connection refused: no readable client certificate");
                        return;
                    }
                };
                tls.get_ref().0.slot().proven();
                tracing::debug!(peer = %addr, client = ?name, serial = %serial, "TCP client authenticated");
                let conn = TlsConn {
                    info: TcpConnectInfo {
                        peer: Arc::new(RemotePeer {
                            addr,
                            name,
                            serial,
                            not_after,
                            epoch,
                        }),
                        slot: tls.get_ref().0.slot().handle(),
                    },
                    tls,
                };
                let _ = tx.send(Ok(conn)).await;
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// An authenticated TLS connection for the gRPC server.
pub struct TlsConn {
    tls: tokio_rustls::server::TlsStream<Counted<TcpStream>>,
    info: TcpConnectInfo,
}

impl Connected for TlsConn {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.info.clone()
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tls).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().tls).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tls).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tls).poll_shutdown(cx)
    }
}

/// Operations served over TCP: issuing, signing and reading within the
/// policy, and status. Never Unlock (the PIN never crosses the network),
/// Init, Lock, policy or grant administration, or changes to the vault.
pub const TCP_OPS: &[&str] = &[
    "Session.Status",
    "Secrets.Get",
    "Secrets.List",
    "Secrets.History",
    "Admin.ListCas",
    "Admin.GetCa",
    "Admin.ListClusters",
    "Signer.ListKeys",
    "Signer.GetPublicKey",
    "Signer.Sign",
    "Credentials.IssueCertificate",
    "Credentials.IssueKubeconfig",
    "Credentials.IssueExecCredential",
    "Credentials.IssueSshCertificate",
];

/// Why a certificate asked of the API from one of the TCP listener's CAs
/// would undermine the listener, if it would: from the client CA only
/// client certificates (a server or peer certificate also carries
/// clientAuth, so it would log in as whatever client its name says), and
/// from the server CA no server or peer certificate for a name the
/// listener answers to (remote CLIs would take it for the listener).
pub fn listener_ca_misuse(
    tcp: &crate::config::TcpConfig,
    ca: &str,
    profile: keyholder_pki::Profile,
    access: &crate::access::Access,
) -> Option<String> {
    use keyholder_pki::Profile;
    if profile == Profile::Client {
        return None;
    }
    if ca == tcp.client_ca {
        return Some(format!(
            "CA {ca:?} signs the TCP listener's client certificates (tcp.client_ca): it issues only the client profile here"
        ));
    }
    if ca == tcp.server_ca() {
        let crate::access::Access::Certificate { names, .. } = access else {
            return None;
        };
        if let Some(name) = names
            .iter()
            .find(|n| tcp.server_names.iter().any(|s| s.eq_ignore_ascii_case(n)))
        {
            return Some(format!(
                "{name:?} is a name of the TCP listener, whose certificates CA {ca:?} signs (tcp.server_ca): only keyholderd issues those"
            ));
        }
    }
    None
}
