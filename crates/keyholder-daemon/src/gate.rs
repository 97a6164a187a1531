//! The one place every RPC passes through: it identifies the caller and
//! checks the session state, so that policy and audit hook in here.

use std::path::PathBuf;

use tonic::Request;
use tonic::transport::server::UdsConnectInfo;

use crate::core::Core;
use crate::error::{Error, Result};

/// Who is calling.
#[derive(Clone, Debug)]
pub struct Caller {
    /// Peer uid from `SO_PEERCRED`.
    pub uid: u32,
    /// Peer pid from `SO_PEERCRED`, when the kernel gave one.
    pub pid: Option<i32>,
}

impl Caller {
    /// The peer's executable, when readable. Read on demand: it costs a
    /// `/proc` lookup, and most requests only need it when policy or audit ask.
    pub fn exe(&self) -> Option<PathBuf> {
        self.pid
            .and_then(|p| std::fs::read_link(format!("/proc/{p}/exe")).ok())
    }
}

/// What an RPC needs from the session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Needs {
    /// Works locked or unlocked (Status, Lock, Unlock, Init, ListTokens).
    Nothing,
    /// Needs the open vault; counts as activity for the idle timer.
    Unlocked,
}

impl Core {
    /// Identifies the caller of `request`, logs the operation, and checks
    /// that the session allows it.
    pub fn enter<T>(&self, request: &Request<T>, op: &'static str, needs: Needs) -> Result<Caller> {
        let cred = request
            .extensions()
            .get::<UdsConnectInfo>()
            .and_then(|info| info.peer_cred);
        let Some(cred) = cred else {
            // Every listener Keyholder runs is a Unix socket; a request
            // without peer credentials did not come through one.
            tracing::warn!(op, "request without peer credentials refused");
            return Err(Error::PermissionDenied(
                "peer credentials unavailable".into(),
            ));
        };
        let own = rustix::process::getuid().as_raw();
        if cred.uid() != own {
            tracing::warn!(op, uid = cred.uid(), pid = ?cred.pid(), "request from another uid refused");
            return Err(Error::PermissionDenied(format!(
                "uid {} may not use this keyholderd (it serves uid {own})",
                cred.uid()
            )));
        }
        let caller = Caller {
            uid: cred.uid(),
            pid: cred.pid(),
        };
        if tracing::enabled!(tracing::Level::DEBUG) {
            tracing::debug!(op, uid = caller.uid, pid = ?caller.pid, exe = ?caller.exe(), "request");
        }
        if needs == Needs::Unlocked {
            if !self.is_unlocked() {
                return Err(Error::Locked);
            }
            self.touch();
        }
        Ok(caller)
    }
}
