//! Where keyholderd listens by default, and how a client dials it: the one
//! place both the daemon and its clients take these from.
//!
//! A client checks what it talks to before it sends a byte: the socket's
//! directory must belong to the caller and not be writable by group or
//! others, and the process listening on the socket (`SO_PEERCRED`) must run
//! as the caller or as root. Without `XDG_RUNTIME_DIR` the socket lives under
//! `/tmp`, where another local user could create the directory first and
//! listen there to collect PINs and secrets.

use std::fmt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tonic::transport::{Channel, Endpoint, Uri};

/// `$XDG_RUNTIME_DIR/keyholder`, or `/tmp/keyholder-<uid>` without it.
pub fn runtime_dir() -> PathBuf {
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d).join("keyholder"),
        _ => PathBuf::from(format!(
            "/tmp/keyholder-{}",
            rustix::process::getuid().as_raw()
        )),
    }
}

/// The calling process's real uid.
pub fn own_uid() -> u32 {
    rustix::process::getuid().as_raw()
}

/// The gRPC socket: `runtime_dir()/keyholder.sock`.
pub fn default_socket() -> PathBuf {
    runtime_dir().join("keyholder.sock")
}

/// The ssh-agent socket: `runtime_dir()/ssh-agent.sock`.
pub fn default_agent_socket() -> PathBuf {
    runtime_dir().join("ssh-agent.sock")
}

/// Why [`connect`] failed.
#[derive(Debug)]
pub enum ConnectError {
    /// The socket's directory or the process behind the socket is not the
    /// caller's; nothing was sent. The message names the path and the owner.
    Untrusted(String),
    /// The process behind the socket runs as another uid (root) and closed
    /// the connection: keyholderd serves only its own uid.
    OtherUid {
        /// The socket dialled.
        path: PathBuf,
        /// The uid of the process behind it.
        peer: u32,
        /// The caller's uid.
        own: u32,
    },
    /// The socket could not be reached (no daemon, no such file, ...).
    Unreachable(tonic::transport::Error),
}

impl ConnectError {
    /// The message for a daemon of uid `peer` that refused a client of uid `own`.
    pub fn other_uid_message(path: &Path, peer: u32, own: u32) -> String {
        format!(
            "keyholderd at {} refused the connection: it serves only uid {peer}; you are uid {own} \
             (run as uid {peer}, or start a keyholderd of your own)",
            path.display()
        )
    }
}

impl fmt::Display for ConnectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Untrusted(why) => f.write_str(why),
            Self::OtherUid { path, peer, own } => {
                f.write_str(&Self::other_uid_message(path, *peer, *own))
            }
            Self::Unreachable(e) => match std::error::Error::source(e) {
                Some(cause) => write!(f, "{cause}"),
                None => write!(f, "{e}"),
            },
        }
    }
}

impl std::error::Error for ConnectError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Untrusted(_) | Self::OtherUid { .. } => None,
            Self::Unreachable(e) => Some(e),
        }
    }
}

/// The socket's directory: the parent of `path`, or `.`.
fn socket_dir(path: &Path) -> PathBuf {
    path.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Refuses a socket whose directory belongs to another uid or may be
/// written by group or others. A directory that cannot be read is left to
/// the dial, which reports it.
pub fn check_socket_dir(path: &Path) -> Result<(), ConnectError> {
    let dir = socket_dir(path);
    let Ok(meta) = std::fs::metadata(&dir) else {
        return Ok(());
    };
    let uid = rustix::process::getuid().as_raw();
    if meta.uid() != uid {
        return Err(ConnectError::Untrusted(format!(
            "refusing to use {}: its directory {} belongs to uid {}, not to you (uid {uid}); \
             another user may be impersonating keyholderd, so nothing was sent",
            path.display(),
            dir.display(),
            meta.uid()
        )));
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o022 != 0 {
        return Err(ConnectError::Untrusted(format!(
            "refusing to use {}: its directory {} is writable by group or others (mode {mode:04o}); \
             make it private with `chmod 700 {}`; nothing was sent",
            path.display(),
            dir.display(),
            dir.display()
        )));
    }
    Ok(())
}

/// Refuses a connected socket whose listening process runs as neither the
/// caller nor root; returns the peer's uid.
pub fn check_peer(path: &Path, stream: &tokio::net::UnixStream) -> Result<u32, String> {
    let uid = rustix::process::getuid().as_raw();
    let cred = stream.peer_cred().map_err(|e| {
        format!(
            "refusing to use {}: cannot read the credentials of the process behind it ({e}); nothing was sent",
            path.display()
        )
    })?;
    if cred.uid() != uid && cred.uid() != 0 {
        return Err(format!(
            "refusing to use {}: the process listening on it runs as uid {}, not as you (uid {uid}) or root; \
             another user may be impersonating keyholderd, so nothing was sent",
            path.display(),
            cred.uid()
        ));
    }
    Ok(cred.uid())
}

/// A gRPC channel to keyholderd over the Unix socket at `path`. The
/// connection is made before this returns, so a daemon that is not there
/// is reported here rather than at the first call. The socket's directory
/// and the peer are checked first ([`check_socket_dir`], [`check_peer`]),
/// on every (re)connection, before any byte is written.
pub async fn connect(path: impl AsRef<Path>) -> Result<Channel, ConnectError> {
    connect_with_peer(path).await.map(|(channel, _)| channel)
}

/// Like [`connect`], and also returns the uid of the process behind the
/// socket (the caller's, or root's), so that a later failure can be
/// explained: keyholderd closes connections from any uid but its own.
pub async fn connect_with_peer(path: impl AsRef<Path>) -> Result<(Channel, u32), ConnectError> {
    let path = path.as_ref().to_owned();
    check_socket_dir(&path)?;
    let refused: Arc<Mutex<Option<String>>> = Arc::default();
    let peer: Arc<Mutex<Option<u32>>> = Arc::default();
    let (refused_slot, peer_slot, dial_path) = (refused.clone(), peer.clone(), path.clone());
    // The URI is required by the API but unused: the connector dials the socket.
    let channel = Endpoint::from_static("http://keyholderd.invalid")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = dial_path.clone();
            let refused = refused_slot.clone();
            let peer = peer_slot.clone();
            async move {
                if let Err(ConnectError::Untrusted(why)) = check_socket_dir(&path) {
                    return Err(refuse(&refused, why));
                }
                let stream = tokio::net::UnixStream::connect(&path).await?;
                // Again now that the socket is connected and before any byte
                // is sent: a directory that did not exist at the first check
                // may have been made by someone else in between.
                let dir_now = match std::fs::metadata(socket_dir(&path)) {
                    Ok(_) => check_socket_dir(&path),
                    Err(_) => Err(ConnectError::Untrusted(format!(
                        "refusing to use {}: its directory changed while connecting; nothing was sent",
                        path.display()
                    ))),
                };
                if let Err(ConnectError::Untrusted(why)) = dir_now {
                    drop(stream);
                    return Err(refuse(&refused, why));
                }
                match check_peer(&path, &stream) {
                    Ok(uid) => {
                        if let Ok(mut p) = peer.lock() {
                            *p = Some(uid);
                        }
                    }
                    Err(why) => {
                        drop(stream);
                        return Err(refuse(&refused, why));
                    }
                }
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
            }
        }))
        .await;
    let own = rustix::process::getuid().as_raw();
    let peer = peer.lock().ok().and_then(|p| *p);
    match channel {
        Ok(channel) => Ok((channel, peer.unwrap_or(own))),
        Err(e) => Err(
            match (refused.lock().ok().and_then(|mut s| s.take()), peer) {
                (Some(why), _) => ConnectError::Untrusted(why),
                (None, Some(peer)) if peer != own => ConnectError::OtherUid { path, peer, own },
                _ => ConnectError::Unreachable(e),
            },
        ),
    }
}

/// Records why a connection was refused and returns the error the dial fails with.
fn refuse(slot: &Mutex<Option<String>>, why: String) -> std::io::Error {
    if let Ok(mut s) = slot.lock() {
        *s = Some(why.clone());
    }
    std::io::Error::new(std::io::ErrorKind::PermissionDenied, why)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn sockets_live_in_the_runtime_dir() {
        let dir = runtime_dir();
        assert_eq!(default_socket(), dir.join("keyholder.sock"));
        assert_eq!(default_agent_socket(), dir.join("ssh-agent.sock"));
    }

    fn private_dir(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("keyholder-proto-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).expect("chmod");
        dir
    }

    #[tokio::test]
    async fn a_missing_socket_fails_to_connect() {
        let dir = private_dir("absent");
        let e = connect(dir.join("absent.sock"))
            .await
            .expect_err("no socket");
        assert!(matches!(e, ConnectError::Unreachable(_)), "{e}");
        let _ = std::fs::remove_dir(&dir);
    }

    #[tokio::test]
    async fn a_directory_others_may_write_is_refused() {
        let dir = private_dir("loose");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).expect("chmod");
        let e = connect(dir.join("k.sock")).await.expect_err("loose dir");
        assert!(matches!(e, ConnectError::Untrusted(_)), "{e}");
        assert!(e.to_string().contains("mode 0777"), "{e}");
        let _ = std::fs::remove_dir(&dir);
    }
}
