//! The one gate every operation passes, gRPC and ssh-agent alike: it
//! checks who is calling, runs the hooks that policy and audit plug into,
//! and checks the session state.

use std::sync::Arc;

use crate::core::Core;
use crate::error::{Error, Result};

/// Which listener a request came through.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Channel {
    /// The gRPC socket.
    #[default]
    Grpc,
    /// The ssh-agent socket.
    Agent,
    /// The TCP listener (mutual TLS).
    Tcp,
}

/// Who is calling, taken once at the gate for every request: what policy
/// decides on and audit records. docs/policy.md says what each field proves
/// and what it does not.
#[derive(Clone, Debug, Default)]
pub struct Caller {
    /// Peer uid from `SO_PEERCRED` (the kernel's; cannot be forged).
    pub uid: u32,
    /// Peer pid from `SO_PEERCRED`, when the kernel gave one.
    pub pid: Option<i32>,
    /// The listener.
    pub channel: Channel,
    /// The peer's executable as the kernel reports it (`/proc/PID/exe`),
    /// when readable.
    pub exe: Option<String>,
    /// The executable's file was replaced or removed since the process
    /// started (the kernel marks the link "(deleted)").
    pub exe_replaced: bool,
    /// The systemd unit the process runs in (`deploy.service`), from its
    /// cgroup, when there is one.
    pub unit: Option<String>,
    /// The process's cgroup v2 path.
    pub cgroup: Option<String>,
    /// Agent connections: the destination host key's fingerprint from the
    /// last verified `session-bind@openssh.com`.
    pub host_key: Option<String>,
    /// Agent connections: a `session-bind` marked the connection forwarded.
    pub forwarded: bool,
    /// The grant the request presented (gRPC bearer metadata).
    pub grant: Option<std::sync::Arc<crate::grants::Grant>>,
    /// TCP connections: the peer, from its verified client certificate.
    pub remote: Option<std::sync::Arc<crate::remote::RemotePeer>>,
}

impl Caller {
    /// The caller behind a socket's peer credentials, with what `/proc`
    /// says of the process. Reading `/proc` by pid is racy (the process may
    /// exit and its pid be reused between accept and the read); policy that
    /// needs more than the uid takes that into account (docs/policy.md).
    pub fn from_peer(uid: u32, pid: Option<i32>, channel: Channel) -> Self {
        let mut caller = Self {
            uid,
            pid,
            channel,
            ..Self::default()
        };
        if let Some(pid) = pid.filter(|p| *p > 0) {
            if let Ok(link) = std::fs::read_link(format!("/proc/{pid}/exe")) {
                let text = link.to_string_lossy().into_owned();
                match text.strip_suffix(" (deleted)") {
                    Some(path) => {
                        caller.exe = Some(path.to_owned());
                        caller.exe_replaced = true;
                    }
                    None => caller.exe = Some(text),
                }
            }
            if let Ok(cgroup) = std::fs::read_to_string(format!("/proc/{pid}/cgroup")) {
                caller.cgroup = cgroup_v2_path(&cgroup).map(str::to_owned);
                caller.unit = caller.cgroup.as_deref().and_then(systemd_unit);
            }
        }
        caller
    }

    /// The peer's executable path.
    pub fn exe(&self) -> Option<&str> {
        self.exe.as_deref()
    }
}

/// The cgroup v2 path from `/proc/PID/cgroup` (the `0::` line).
fn cgroup_v2_path(text: &str) -> Option<&str> {
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(str::trim)
        .filter(|p| !p.is_empty() && p.len() <= 4096)
}

/// The innermost systemd unit in a cgroup path: the last component that
/// ends in `.service` or `.scope` (`/user.slice/.../app-deploy.service`).
fn systemd_unit(path: &str) -> Option<String> {
    path.rsplit('/')
        .find(|c| c.ends_with(".service") || c.ends_with(".scope"))
        .map(str::to_owned)
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
        if caller.channel == Channel::Tcp {
            let Some(peer) = &caller.remote else {
                return Err(Error::PermissionDenied(
                    "a TCP request without a client certificate".into(),
                ));
            };
            self.check_remote_peer(peer)?;
            if !crate::remote::TCP_OPS.contains(&op) {
                tracing::warn!(op, peer = %peer.addr, client = ?peer.name, "request refused: not served over TCP");
                return Err(Error::PermissionDenied(format!(
                    "{op} is not served over TCP: run it on the machine where keyholderd runs"
                )));
            }
            for hook in self.gate_hooks().iter() {
                hook.check(caller, op)?;
            }
            if needs == Needs::Unlocked {
                self.require_unlocked()?;
            }
            return Ok(());
        }
        let own = rustix::process::getuid().as_raw();
        if caller.uid != own {
            tracing::warn!(op, uid = caller.uid, pid = ?caller.pid, "request from another uid refused");
            return Err(Error::PermissionDenied(format!(
                "uid {} may not use this keyholderd (it serves uid {own})",
                caller.uid
            )));
        }
        if tracing::enabled!(tracing::Level::DEBUG) {
            tracing::debug!(op, uid = caller.uid, pid = ?caller.pid, channel = ?caller.channel, exe = ?caller.exe, unit = ?caller.unit, "request");
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unit_and_cgroup_come_from_the_v2_line() {
        let text = "0::/system.slice/deploy.service\n";
        assert_eq!(cgroup_v2_path(text), Some("/system.slice/deploy.service"));
        assert_eq!(
            systemd_unit("/user.slice/user-1000.slice/user@1000.service/app.slice/run-u12.scope")
                .as_deref(),
            Some("run-u12.scope")
        );
        assert_eq!(systemd_unit("/"), None);
        assert_eq!(cgroup_v2_path("1:name=systemd:/x\n"), None);
    }

    #[test]
    fn own_process_is_described() {
        let me = Caller::from_peer(0, Some(std::process::id() as i32), Channel::Grpc);
        let exe = std::env::current_exe().unwrap();
        assert_eq!(me.exe.as_deref(), exe.to_str());
        assert!(!me.exe_replaced);
    }
}
