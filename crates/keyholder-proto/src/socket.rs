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
    /// The socket could not be reached (no daemon, no such file, ...).
    Unreachable(tonic::transport::Error),
}

impl fmt::Display for ConnectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Untrusted(why) => f.write_str(why),
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
            Self::Untrusted(_) => None,
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
/// caller nor root.
pub fn check_peer(path: &Path, stream: &tokio::net::UnixStream) -> Result<(), String> {
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
    Ok(())
}

/// A gRPC channel to keyholderd over the Unix socket at `path`. The
/// connection is made before this returns, so a daemon that is not there
/// is reported here rather than at the first call. The socket's directory
/// and the peer are checked first ([`check_socket_dir`], [`check_peer`]),
/// on every (re)connection, before any byte is written.
pub async fn connect(path: impl AsRef<Path>) -> Result<Channel, ConnectError> {
    let path = path.as_ref().to_owned();
    check_socket_dir(&path)?;
    let refused: Arc<Mutex<Option<String>>> = Arc::default();
    let slot = refused.clone();
    // The URI is required by the API but unused: the connector dials the socket.
    let channel = Endpoint::from_static("http://keyholderd.invalid")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            let slot = slot.clone();
            async move {
                if let Err(ConnectError::Untrusted(why)) = check_socket_dir(&path) {
                    return Err(refuse(&slot, why));
                }
                let stream = tokio::net::UnixStream::connect(&path).await?;
                if let Err(why) = check_peer(&path, &stream) {
                    drop(stream);
                    return Err(refuse(&slot, why));
                }
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
            }
        }))
        .await;
    channel.map_err(|e| {
        let why = refused.lock().ok().and_then(|mut s| s.take());
        match why {
            Some(why) => ConnectError::Untrusted(why),
            None => ConnectError::Unreachable(e),
        }
    })
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
