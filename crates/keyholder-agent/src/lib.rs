//! Keyholder's ssh-agent: the protocol codec ([`proto`]) and a Unix-socket
//! server over a [`Backend`] that knows the keys.
//!
//! What the server does itself: framing (messages over 256 KiB close the
//! connection; a partial message, length header included, that does not
//! arrive within [`READ_TIMEOUT`] closes it too), bounded connections (idle
//! ones time out and give way to new ones), refusing peers of another uid, refusing
//! every request that would add keys or load a provider library, and
//! verifying `session-bind@openssh.com`. What it leaves to the backend:
//! which keys exist, signing, and what LOCK/UNLOCK mean.
//!
//! The `ssh-agent-lib` crate was not used: it does not bound its framing,
//! and Keyholder needs only five message types, which [`proto`] decodes
//! strictly in a page of code that the fuzz target covers.

#![forbid(unsafe_code)]

pub mod proto;
pub mod slots;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use proto::{Request, Response, SessionBind};
use slots::{AcceptBackoff, Slot, Slots};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use zeroize::Zeroizing;

/// A started message, from the first byte of its length header, must
/// arrive in full within this time (and its answer be taken).
pub const READ_TIMEOUT: Duration = Duration::from_secs(30);
/// A connection with no message for this long is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// Most simultaneous agent connections (fewer under a low open file limit);
/// when all are taken, an idle one is closed to make room for a new one
/// ([`slots::Slots::evict_one`]).
pub const MAX_CONNECTIONS: usize = 256;
/// Most session bindings one connection may record.
pub const MAX_BINDINGS: usize = 16;

/// One identity the agent offers.
#[derive(Clone, Debug)]
pub struct Identity {
    /// Public key or certificate blob.
    pub blob: Vec<u8>,
    /// Comment shown by `ssh-add -l`.
    pub comment: String,
}

/// Who is on the other end of a connection.
#[derive(Clone, Copy, Debug)]
pub struct Peer {
    /// Peer uid.
    pub uid: u32,
    /// Peer pid.
    pub pid: Option<i32>,
    /// A `session-bind` marked the connection as a forwarded agent (a host
    /// reached with `ssh -A` speaks through it).
    pub forwarded: bool,
    /// SHA-256 of the destination host key of the last verified
    /// `session-bind` (the host the user's ssh is logging in to).
    pub host_key: Option<[u8; 32]>,
    /// A number unique to the connection in this process.
    pub connection: u64,
}

impl Peer {
    /// The destination host key's fingerprint as OpenSSH prints it
    /// (`SHA256:...`), when the connection is bound.
    pub fn host_key_fingerprint(&self) -> Option<String> {
        self.host_key
            .map(|d| ssh_key::Fingerprint::Sha256(d).to_string())
    }
}

/// What the agent asks of Keyholder.
pub trait Backend: Send + Sync + 'static {
    /// The identities to list for `peer`; empty while locked.
    fn identities(&self, peer: Peer) -> impl Future<Output = Vec<Identity>> + Send;
    /// An SSH signature blob over `data` by the key (or certificate's key)
    /// `key_blob`, or `None` to refuse.
    fn sign(
        &self,
        key_blob: &[u8],
        data: &[u8],
        flags: u32,
        peer: Peer,
    ) -> impl Future<Output = Option<Vec<u8>>> + Send;
    /// Whether the backend is locked now. While locked, `session-bind` is
    /// refused like every request other than UNLOCK.
    fn is_locked(&self) -> bool;
    /// LOCK by `peer`: whether it locked. Already locked, it must answer
    /// `false` (draft-ietf-sshm-ssh-agent §3.7).
    fn lock(&self, peer: Peer) -> impl Future<Output = bool> + Send;
    /// UNLOCK by `peer` with a passphrase: whether it unlocked. Already
    /// unlocked, it must answer `false` without checking the passphrase.
    fn unlock(
        &self,
        passphrase: Zeroizing<String>,
        peer: Peer,
    ) -> impl Future<Output = bool> + Send;
    /// A verified session binding, for audit.
    fn record_binding(&self, peer: Peer, host_key_fingerprint: &str, forwarding: bool);
    /// A connection from `peer` was accepted, before any of its messages is
    /// read: where the backend learns who is calling (the process may exec
    /// another program before its first request).
    fn connected(&self, _peer: Peer) {}
    /// The connection `peer.connection` is gone.
    fn closed(&self, _peer: Peer) {}
}

/// Tells the backend a connection is gone when its task ends, however it
/// ends.
struct Closing<'a, B: Backend> {
    backend: &'a B,
    peer: Peer,
}

impl<B: Backend> Drop for Closing<'_, B> {
    fn drop(&mut self) {
        self.backend.closed(self.peer);
    }
}

/// Per-connection state.
#[derive(Default)]
struct Connection {
    /// Session ids bound on this connection, with their forwarding flag.
    bindings: Vec<(Vec<u8>, bool)>,
    /// A `session-bind` marked this connection as a forwarded agent. Set by
    /// any binding with the forwarding flag, even one that is refused (locked,
    /// or a signature that does not verify): the mark only takes rights away,
    /// so it needs no proof, and a forwarding ssh must not escape it by
    /// binding while Keyholder is locked.
    forwarded: bool,
    /// The destination host key of the last verified binding.
    host_key: Option<[u8; 32]>,
}

/// Verifies a session binding; returns the host key's fingerprint.
pub fn verify_session_bind(bind: &SessionBind) -> Result<String, String> {
    use signature::Verifier;
    let key = parse_key_blob(&bind.host_key)?;
    let mut sig_bytes = bind.signature.as_slice();
    let sig = <ssh_key::Signature as ssh_encoding::Decode>::decode(&mut sig_bytes)
        .map_err(|e| format!("signature does not parse: {e}"))?;
    if !sig_bytes.is_empty() {
        return Err("trailing bytes after the signature".into());
    }
    key.verify(&bind.session_id, &sig)
        .map_err(|_| "the host's signature over the session id does not verify".to_string())?;
    Ok(key.fingerprint(Default::default()).to_string())
}

/// Parses a public key blob, refusing trailing bytes.
pub fn parse_key_blob(mut bytes: &[u8]) -> Result<ssh_key::public::KeyData, String> {
    let key = <ssh_key::public::KeyData as ssh_encoding::Decode>::decode(&mut bytes)
        .map_err(|e| format!("key blob does not parse: {e}"))?;
    if bytes.is_empty() {
        Ok(key)
    } else {
        Err("trailing bytes after the key blob".into())
    }
}

impl Connection {
    fn bind(&mut self, bind: &SessionBind) -> Result<String, String> {
        if self.bindings.iter().any(|(id, _)| *id == bind.session_id) {
            return Err("session id already bound on this connection".into());
        }
        if let Some((_, false)) = self.bindings.last() {
            return Err(
                "connection is bound to a non-forwarded session; refusing to re-bind".into(),
            );
        }
        if self.bindings.len() >= MAX_BINDINGS {
            return Err("too many session bindings".into());
        }
        let fingerprint = verify_session_bind(bind)?;
        self.bindings
            .push((bind.session_id.clone(), bind.forwarding));
        self.host_key = parse_key_blob(&bind.host_key)
            .ok()
            .and_then(|k| k.fingerprint(ssh_key::HashAlg::Sha256).sha256());
        Ok(fingerprint)
    }
}

async fn handle<B: Backend>(
    backend: &B,
    conn: &mut Connection,
    peer: Peer,
    message: &[u8],
) -> Response {
    let peer = Peer {
        forwarded: conn.forwarded,
        host_key: conn.host_key,
        ..peer
    };
    let request = match proto::decode(message) {
        Ok(r) => r,
        Err(e) => {
            tracing::debug!(error = ?e, "malformed agent message");
            return Response::Failure;
        }
    };
    match request {
        Request::RequestIdentities => Response::Identities(
            backend
                .identities(peer)
                .await
                .into_iter()
                .map(|i| (i.blob, i.comment))
                .collect(),
        ),
        Request::Sign {
            key_blob,
            data,
            flags,
        } => match backend.sign(&key_blob, &data, flags, peer).await {
            Some(sig) => Response::Signature(sig),
            None => Response::Failure,
        },
        Request::Lock(_) | Request::Unlock(_) if conn.forwarded => {
            // A host reached with `ssh -A` must not spend PIN tries or lock
            // the owner's session; it may only ask for signatures.
            let request = if matches!(request, Request::Lock(_)) {
                "LOCK"
            } else {
                "UNLOCK"
            };
            tracing::warn!(uid = peer.uid, pid = ?peer.pid, request, "agent request refused on a forwarded connection");
            Response::Failure
        }
        Request::Lock(_passphrase) => {
            if backend.lock(peer).await {
                Response::Success
            } else {
                Response::Failure
            }
        }
        Request::Unlock(passphrase) => {
            if backend.unlock(passphrase, peer).await {
                Response::Success
            } else {
                Response::Failure
            }
        }
        Request::Extension { name, contents } if name == "session-bind@openssh.com" => {
            let decoded = proto::decode_session_bind(&contents);
            if let Ok(b) = &decoded
                && b.forwarding
            {
                conn.forwarded = true;
            }
            if backend.is_locked() {
                tracing::info!(uid = peer.uid, pid = ?peer.pid, forwarding = conn.forwarded, "session-bind refused: locked");
                return Response::Failure;
            }
            let bound = decoded
                .map_err(|e| format!("{e:?}"))
                .and_then(|b| conn.bind(&b).map(|fp| (fp, b.forwarding)));
            match bound {
                Ok((fingerprint, forwarding)) => {
                    tracing::info!(uid = peer.uid, pid = ?peer.pid, host_key = %fingerprint, forwarding, "agent session bound");
                    backend.record_binding(peer, &fingerprint, forwarding);
                    Response::Success
                }
                Err(e) => {
                    tracing::warn!(uid = peer.uid, pid = ?peer.pid, error = ?e, "session-bind refused");
                    Response::Failure
                }
            }
        }
        Request::Extension { name, .. } => {
            tracing::debug!(name = ?name, "unsupported agent extension");
            Response::Failure
        }
        Request::Refused(kind) => {
            tracing::warn!(uid = peer.uid, pid = ?peer.pid, kind, "refused agent request that adds, removes or loads keys");
            Response::Failure
        }
        Request::Unknown(kind) => {
            tracing::debug!(kind, "unknown agent message");
            Response::Failure
        }
    }
}

/// Serves one connection until the peer closes it, breaks the framing,
/// stays idle for [`IDLE_TIMEOUT`], stalls mid-message for
/// [`READ_TIMEOUT`], or is evicted to make room for a new one.
async fn serve_connection<B: Backend>(
    mut stream: UnixStream,
    backend: Arc<B>,
    peer: Peer,
    slot: Slot,
) {
    backend.connected(peer);
    let _closing = Closing {
        backend: &*backend,
        peer,
    };
    let mut conn = Connection::default();
    loop {
        // Between messages a client may wait (an ssh between requests), but
        // not forever, and an idle connection gives way to a new one.
        let mut first = [0u8; 1];
        let waited = tokio::select! {
            () = slot.evicted() => {
                tracing::debug!(pid = ?peer.pid, "idle agent connection evicted to make room");
                return;
            }
            r = tokio::time::timeout(IDLE_TIMEOUT, stream.read(&mut first)) => r,
        };
        match waited {
            Ok(Ok(1)) => {}
            Ok(_) => return,
            Err(_) => {
                tracing::debug!(pid = ?peer.pid, "agent connection idle too long; closing it");
                return;
            }
        }
        // From its first byte on, the rest of the length header and the
        // message must arrive within READ_TIMEOUT.
        let deadline = tokio::time::Instant::now() + READ_TIMEOUT;
        let mut len = [first[0], 0, 0, 0];
        let header = tokio::select! {
            () = slot.evicted() => return,
            r = tokio::time::timeout_at(deadline, stream.read_exact(&mut len[1..])) => r,
        };
        if !matches!(header, Ok(Ok(_))) {
            return;
        }
        let len = u32::from_be_bytes(len);
        let Some(len) = usize::try_from(len)
            .ok()
            .filter(|l| *l <= proto::MAX_MESSAGE)
        else {
            tracing::warn!(uid = peer.uid, pid = ?peer.pid, len, "agent message over 256 KiB; closing the connection");
            return;
        };
        let mut message = Zeroizing::new(vec![0u8; len]);
        let body = tokio::select! {
            () = slot.evicted() => return,
            r = tokio::time::timeout_at(deadline, stream.read_exact(&mut message)) => r,
        };
        if !matches!(body, Ok(Ok(_))) {
            return;
        }
        slot.busy();
        let response = handle(&*backend, &mut conn, peer, &message).await;
        // A client that does not read its answer must not hold the slot.
        let written =
            tokio::time::timeout(READ_TIMEOUT, stream.write_all(&proto::encode(&response))).await;
        if !matches!(written, Ok(Ok(()))) {
            return;
        }
        slot.idle();
    }
}

/// Accepts agent connections on `listener` (peers of another uid are
/// refused and logged) until `shutdown` resolves. At most
/// [`MAX_CONNECTIONS`] are held; when all are taken, an idle one is closed
/// to make room. Accept errors (out of file descriptors and the like) never
/// end the loop.
pub async fn serve<B: Backend>(
    listener: UnixListener,
    backend: Arc<B>,
    shutdown: impl Future<Output = ()>,
) {
    let own_uid = rustix::process::getuid().as_raw();
    let slots = Slots::new(slots::capacity_within_fd_limit(MAX_CONNECTIONS, 33));
    tracing::debug!(connections = slots.capacity(), "agent connection slots");
    let mut backoff = AcceptBackoff::new("ssh-agent");
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            () = &mut shutdown => return,
            a = listener.accept() => a,
        };
        let stream = match accepted {
            Ok((s, _)) => {
                backoff.accepted();
                s
            }
            Err(e) => {
                tokio::select! {
                    () = &mut shutdown => return,
                    () = backoff.failed(&e, &slots) => continue,
                }
            }
        };
        let peer = match stream.peer_cred() {
            Ok(c) if c.uid() == own_uid => Peer {
                uid: c.uid(),
                pid: c.pid(),
                forwarded: false,
                host_key: None,
                connection: {
                    static NEXT: std::sync::atomic::AtomicU64 =
                        std::sync::atomic::AtomicU64::new(1);
                    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                },
            },
            Ok(c) => {
                tracing::warn!(uid = c.uid(), pid = ?c.pid(), "refused agent connection from another uid");
                continue;
            }
            Err(e) => {
                tracing::warn!(error = %e, "refused agent connection without peer credentials");
                continue;
            }
        };
        let Some(slot) = slots.admit() else {
            tracing::warn!("every agent connection is busy serving a request; refusing one");
            continue;
        };
        let backend = backend.clone();
        tokio::spawn(serve_connection(stream, backend, peer, slot));
    }
}

/// Decodes `bytes` every way the agent would; the fuzz target and the
/// corpus replay test call this.
#[doc(hidden)]
pub fn fuzz_one(bytes: &[u8]) {
    let _ = parse_key_blob(bytes);
    if let Ok(Request::Extension { contents, .. }) = proto::decode(bytes)
        && let Ok(bind) = proto::decode_session_bind(&contents)
    {
        let _ = verify_session_bind(&bind);
    }
    if let Ok(b) = proto::decode_session_bind(bytes) {
        let _ = verify_session_bind(&b);
    }
}
