//! The one gate every operation passes, gRPC and ssh-agent alike: it
//! checks who is calling, runs the hooks that policy and audit plug into,
//! and checks the session state.

use std::path::PathBuf;
use std::sync::Arc;

use crate::core::Core;
use crate::error::{Error, Result};

/// Which listener a request came through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Channel {
    /// The gRPC socket.
    Grpc,
    /// The ssh-agent socket.
    Agent,
}

/// Who is calling.
#[derive(Clone, Debug)]
pub struct Caller {
    /// Peer uid from `SO_PEERCRED`.
    pub uid: u32,
    /// Peer pid from `SO_PEERCRED`, when the kernel gave one.
    pub pid: Option<i32>,
    /// The listener.
    pub channel: Channel,
}

impl Caller {
    /// The peer's executable, when readable. Read on demand: it costs a
    /// `/proc` lookup, and most requests only need it when policy or audit ask.
    pub fn exe(&self) -> Option<PathBuf> {
        self.pid
            .and_then(|p| std::fs::read_link(format!("/proc/{p}/exe")).ok())
    }
}

/// What an operation needs from the session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Needs {
    /// Works locked or unlocked (Status, Lock, Unlock, Init, ListTokens).
    Nothing,
    /// Needs the open vault; counts as activity for the idle timer.
    Unlocked,
}

/// Something that sees every operation at the gate and may refuse it
/// (policy), or must record it before it runs (audit).
pub trait GateHook: Send + Sync {
    /// Called for every operation `op` by `caller`, after the peer check
    /// and before the session check; an error refuses the operation.
    fn check(&self, caller: &Caller, op: &'static str) -> Result<()>;
}

/// The hooks the gate runs, in order.
pub type GateHooks = Vec<Arc<dyn GateHook>>;

impl Core {
    /// Lets `caller` run `op` if the peer is served, every hook agrees and
    /// the session allows it.
    pub fn enter(&self, caller: &Caller, op: &'static str, needs: Needs) -> Result<()> {
        let own = rustix::process::getuid().as_raw();
        if caller.uid != own {
            tracing::warn!(op, uid = caller.uid, pid = ?caller.pid, "request from another uid refused");
            return Err(Error::PermissionDenied(format!(
                "uid {} may not use this keyholderd (it serves uid {own})",
                caller.uid
            )));
        }
        if tracing::enabled!(tracing::Level::DEBUG) {
            tracing::debug!(op, uid = caller.uid, pid = ?caller.pid, channel = ?caller.channel, exe = ?caller.exe(), "request");
        }
        for hook in self.gate_hooks().iter() {
            hook.check(caller, op)?;
        }
        if needs == Needs::Unlocked {
            self.require_unlocked()?;
        }
        Ok(())
    }

    /// Fails with [`Core::locked`] unless unlocked; counts as activity.
    pub fn require_unlocked(&self) -> Result<()> {
        if !self.is_unlocked() {
            return Err(self.locked());
        }
        self.touch();
        Ok(())
    }
}
