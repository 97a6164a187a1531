//! The listeners: binding the sockets, serving the gRPC services and the
//! ssh-agent until shutdown, and the tick task that enforces TTL, idle and
//! token-removal locking.

use std::future::Future;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use keyholder_proto::v1;
use tokio::net::UnixListener;

use crate::core::Core;
use crate::{agent, services};

/// How long in-flight requests get to finish once shutdown begins.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Process hardening done before any secret exists: no core dumps, and the
/// process is not dumpable (no ptrace by same-uid processes, no /proc/pid/mem).
pub fn harden_process() -> std::io::Result<()> {
    rustix::process::set_dumpable_behavior(rustix::process::DumpableBehavior::NotDumpable)?;
    rustix::process::setrlimit(
        rustix::process::Resource::Core,
        rustix::process::Rlimit {
            current: Some(0),
            maximum: Some(0),
        },
    )?;
    Ok(())
}

/// Binds the gRPC socket: its directory is created (or tightened) to 0700
/// and must belong to us; a stale socket is replaced, a live one is an error;
/// the socket itself is 0600.
pub fn bind_socket(path: &Path) -> std::io::Result<UnixListener> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)?;
    }
    let meta = std::fs::metadata(&dir)?;
    let uid = rustix::process::getuid().as_raw();
    if meta.uid() != uid {
        return Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!(
                "socket directory {} belongs to uid {}, not {uid}",
                dir.display(),
                meta.uid()
            ),
        ));
    }
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                format!("another keyholderd is serving on {}", path.display()),
            ));
        }
        std::fs::remove_file(path)?;
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Serves the API on `listener` until `shutdown` resolves, then locks the
/// session, lets in-flight requests finish (up to a grace period) and
/// returns. The caller removes the socket file.
pub async fn run(
    core: Arc<Core>,
    listener: UnixListener,
    agent: Option<UnixListener>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let agent_task = agent.map(|listener| {
        let mut stop = core.shutdown_signal();
        let backend = Arc::new(agent::AgentBackend::new(core.clone()));
        tokio::spawn(keyholder_agent::serve(listener, backend, async move {
            let _ = stop.wait_for(|s| *s).await;
        }))
    });
    // Peers of another uid are dropped at accept, before any byte is read;
    // connections are capped and accept errors retried (crate::listen).
    let incoming = crate::listen::grpc_incoming(listener);

    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<v1::session_server::SessionServer<services::session::SessionService>>()
        .await;
    health_reporter
        .set_serving::<v1::secrets_server::SecretsServer<services::secrets::SecretsService>>()
        .await;
    health_reporter
        .set_serving::<v1::admin_server::AdminServer<services::admin::AdminService>>()
        .await;
    health_reporter
        .set_serving::<v1::signer_server::SignerServer<services::signer::SignerService>>()
        .await;
    health_reporter
        .set_serving::<v1::credentials_server::CredentialsServer<services::credentials::CredentialsService>>()
        .await;
    health_reporter
        .set_serving::<v1::trust_server::TrustServer<services::trust::TrustService>>()
        .await;
    health_reporter
        .set_serving::<v1::audit_server::AuditServer<services::audit::AuditService>>()
        .await;
    // Both reflection versions: grpcurl and most tools speak v1, some
    // client libraries still only v1alpha.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(v1::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection().build_v1()?;
    let reflection_v1alpha = reflection().build_v1alpha()?;

    let max_message = core.config.max_secret_bytes + 64 * 1024;
    let ticker = tokio::spawn(supervised_ticks(core.clone()));
    // A shared store (etcd): other daemons' writes are picked up while unlocked.
    core.follow_storage();
    let metrics_task = match core.config.metrics_listen {
        // A port another local user took first costs the metrics, not the
        // daemon: refusing to start would hand any user a way to stop it.
        Some(addr) => match tokio::net::TcpListener::bind(addr).await {
            Ok(listener) => {
                tracing::info!(%addr, "metrics served at /metrics");
                Some(tokio::spawn(crate::metrics::serve(core.clone(), listener)))
            }
            Err(e) => {
                tracing::error!(%addr, error = %e, "cannot listen for metrics (metrics_listen); serving without them");
                None
            }
        },
        None => None,
    };
    let tcp_task = match core.config.listen_tcp {
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| format!("cannot listen on {addr} (listen_tcp): {e}"))?;
            tracing::info!(%addr, client_ca = ?core.config.tcp.client_ca, "TCP listener (mutual TLS) bound; it serves while the session is unlocked");
            Some(tokio::spawn(serve_tcp(
                core.clone(),
                listener,
                health.clone(),
                max_message,
            )))
        }
        None => None,
    };

    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let shutdown_core = core.clone();
    let signal = async move {
        shutdown.await;
        tracing::info!("shutting down");
        shutdown_core.begin_shutdown();
        let _ = stop_tx.send(());
    };
    let server = tonic::transport::Server::builder()
        .layer(crate::listen::InFlightLayer)
        .layer(crate::oversize::layer(
            max_message,
            core.config.max_secret_bytes,
        ))
        .add_service(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(v1::trust_server::TrustServer::new(
            services::trust::TrustService(core.clone()),
        ))
        .add_service(v1::audit_server::AuditServer::new(
            services::audit::AuditService(core.clone()),
        ));
    let server =
        vault_services(server, &core, max_message).serve_with_incoming_shutdown(incoming, signal);
    tokio::pin!(server);
    let result = tokio::select! {
        r = &mut server => r,
        () = async {
            let _ = stop_rx.await;
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        } => {
            tracing::warn!("in-flight requests did not finish within the grace period");
            Ok(())
        }
    };
    ticker.abort();
    if let Some(t) = agent_task {
        t.abort();
    }
    if let Some(t) = tcp_task {
        t.abort();
    }
    if let Some(t) = metrics_task {
        t.abort();
    }
    core.lock(crate::core::LockReason::Shutdown);
    if let Some(sink) = core.audit_sink()
        && let Some(log) = sink.log()
    {
        log.close();
    }
    result.map_err(Into::into)
}

/// The services both listeners serve (the TCP listener then refuses, at
/// the gate, the operations it does not serve).
fn vault_services<L>(
    router: tonic::transport::server::Router<L>,
    core: &Arc<Core>,
    max_message: usize,
) -> tonic::transport::server::Router<L> {
    router
        .add_service(
            v1::session_server::SessionServer::new(services::session::SessionService(core.clone()))
                .max_decoding_message_size(max_message),
        )
        .add_service(
            v1::secrets_server::SecretsServer::new(services::secrets::SecretsService(core.clone()))
                .max_decoding_message_size(max_message),
        )
        .add_service(
            v1::admin_server::AdminServer::new(services::admin::AdminService(core.clone()))
                .max_decoding_message_size(max_message),
        )
        .add_service(
            v1::signer_server::SignerServer::new(services::signer::SignerService(core.clone()))
                .max_decoding_message_size(max_message),
        )
        .add_service(
            v1::credentials_server::CredentialsServer::new(
                services::credentials::CredentialsService::new(core.clone()),
            )
            .max_decoding_message_size(max_message),
        )
}

/// Serves gRPC over TCP with mutual TLS (crate::remote): the services that
/// make sense remotely, with HTTP/2 limits a remote peer cannot push past.
async fn serve_tcp<H>(
    core: Arc<Core>,
    listener: tokio::net::TcpListener,
    health: H,
    max_message: usize,
) where
    H: tower::Service<
            tonic::codegen::http::Request<tonic::body::Body>,
            Response = tonic::codegen::http::Response<tonic::body::Body>,
            Error = std::convert::Infallible,
        > + tonic::server::NamedService
        + Clone
        + Send
        + Sync
        + 'static,
    H::Future: Send + 'static,
{
    let state = Arc::new(crate::remote::TlsState::default());
    tokio::spawn(crate::remote::keep_current(core.clone(), state.clone()));
    let incoming = crate::remote::incoming(core.clone(), listener, state);
    let tcp = &core.config.tcp;
    let mut stop = core.shutdown_signal();
    let served = tonic::transport::Server::builder()
        // Bounds a peer cannot push past: streams per connection (and
        // concurrent handlers), header list size (CONTINUATION floods),
        // pending resets (HTTP/2 rapid reset), a deadline per request and
        // keepalive pings that close dead connections.
        .max_concurrent_streams(Some(tcp.max_streams))
        .concurrency_limit_per_connection(tcp.max_streams as usize)
        .http2_max_header_list_size(Some(16 * 1024))
        .http2_max_pending_accept_reset_streams(Some(20))
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .timeout(Duration::from_secs(60))
        .layer(crate::listen::InFlightLayer)
        .layer(crate::oversize::layer(
            max_message,
            core.config.max_secret_bytes,
        ))
        .add_service(health)
        .add_optional_service(
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(v1::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
                .build_v1()
                .ok(),
        );
    let served = vault_services(served, &core, max_message)
        .serve_with_incoming_shutdown(incoming, async move {
            let _ = stop.wait_for(|s| *s).await;
        })
        .await;
    if let Err(e) = served {
        tracing::error!(error = %crate::escape::Escaped(&e), "the TCP listener stopped");
    }
}

/// Runs [`tick_loop`] for as long as the daemon serves; should it ever end,
/// the session locks (fail closed), the reason is logged, and it restarts.
async fn supervised_ticks(core: Arc<Core>) {
    loop {
        let ended = tokio::spawn(tick_loop(core.clone())).await;
        tracing::error!(ended = ?ended.err(), "the session check task ended; locking and restarting it");
        core.lock(crate::core::LockReason::CheckFailed);
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Checks session expiry every second and token presence every
/// `token_poll_interval` (no module here offers a blocking slot-event wait).
pub async fn tick_loop(core: Arc<Core>) {
    let poll = core.config.token_poll_interval;
    let step = poll.min(Duration::from_secs(1));
    let mut since_token_check = Duration::ZERO;
    let mut interval = tokio::time::interval(step);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        since_token_check = since_token_check.saturating_add(step);
        let check_token = since_token_check >= poll;
        if check_token {
            since_token_check = Duration::ZERO;
        }
        // The checks must never stop silently: a failure locks the session
        // (fail closed) and the loop goes on.
        let ticked =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| core.tick(check_token)));
        if ticked.is_err() {
            tracing::error!("the session check failed; locking the session");
            core.lock(crate::core::LockReason::CheckFailed);
        }
    }
}
