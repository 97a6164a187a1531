//! Where keyholderd listens by default, and how a client dials it: the one
//! place both the daemon and its clients take these from.

use std::path::{Path, PathBuf};

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

/// A gRPC channel to keyholderd over the Unix socket at `path`. The
/// connection is made before this returns, so a daemon that is not there
/// is reported here rather than at the first call.
pub async fn connect(path: impl AsRef<Path>) -> Result<Channel, tonic::transport::Error> {
    let path = path.as_ref().to_owned();
    // The URI is required by the API but unused: the connector dials the socket.
    Endpoint::from_static("http://keyholderd.invalid")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(path).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
            }
        }))
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sockets_live_in_the_runtime_dir() {
        let dir = runtime_dir();
        assert_eq!(default_socket(), dir.join("keyholder.sock"));
        assert_eq!(default_agent_socket(), dir.join("ssh-agent.sock"));
    }

    #[tokio::test]
    async fn a_missing_socket_fails_to_connect() {
        let dir = std::env::temp_dir().join(format!("keyholder-proto-{}", std::process::id()));
        assert!(connect(dir.join("absent.sock")).await.is_err());
    }
}
