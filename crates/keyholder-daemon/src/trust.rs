//! What the session knows about trust: the vault's policy (parsed once per
//! generation), the grants of the open session, the step-up PIN check and
//! the audit sink. [`Core::decide`] is the one place a request's access is
//! decided.

use std::fmt;
use std::sync::{Arc, Mutex, RwLock};

use hmac::{Hmac, Mac};
use rand::RngCore;
use secrecy::{ExposeSecret, SecretString};
use sha2::Sha256;
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

use crate::access::{Access, AuditSink};
use crate::core::Core;
use crate::error::{Error, Result};
use crate::gate::Caller;
use crate::grants::Grants;
use crate::policy::Policy;
use crate::status::LockReason;

/// Wrong step-up PINs after which the session locks: the token's own retry
/// counter does not see these, so the daemon keeps its own, lower one.
pub const MAX_STEP_UP_FAILURES: u32 = 3;

/// A refusal by policy or a grant.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Denied {
    /// The rule, rules or grant that decided (`default` when no rule matched).
    pub rule: String,
    /// Why.
    pub reason: String,
}

impl fmt::Display for Denied {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "denied by {}: {}", self.rule, self.reason)
    }
}

/// A keyed hash of the PIN the session was opened with, so a step-up can be
/// checked without another token login (which a PKCS#11 session that is
/// already logged in cannot do) and without keeping the PIN.
struct PinCheck {
    key: Zeroizing<[u8; 32]>,
    mac: [u8; 32],
    failures: u32,
}

fn pin_mac(key: &[u8; 32], pin: &SecretString) -> [u8; 32] {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key).unwrap_or_else(|_| {
        // HMAC takes keys of any length; this cannot fail.
        unreachable!("HMAC key length")
    });
    mac.update(pin.expose_secret().as_bytes());
    mac.finalize().into_bytes().into()
}

/// The session's trust state.
#[derive(Default)]
pub struct Trust {
    audit: RwLock<Option<Arc<dyn AuditSink>>>,
    /// The parsed policy and the generation it was parsed from.
    policy: Mutex<Option<(u64, Option<Arc<Policy>>)>>,
    /// The grants of the open session.
    pub grants: Grants,
    pin: Mutex<Option<PinCheck>>,
    /// Counters for the metrics endpoint.
    pub metrics: crate::metrics::Metrics,
    /// Raised at every lock: TCP connections made before it are refused.
    tcp_epoch: std::sync::atomic::AtomicU64,
}

impl Trust {
    /// Remembers a keyed hash of the PIN that opened the session.
    pub(crate) fn remember_pin(&self, pin: &SecretString) {
        let mut key = Zeroizing::new([0u8; 32]);
        rand::rngs::OsRng.fill_bytes(key.as_mut());
        let mac = pin_mac(&key, pin);
        *self.pin.lock().unwrap_or_else(|p| p.into_inner()) = Some(PinCheck {
            key,
            mac,
            failures: 0,
        });
    }

    /// Forgets everything of the session: grants, the PIN check, the
    /// parsed policy.
    /// The TCP epoch now (see `tcp_epoch`).
    pub fn tcp_epoch(&self) -> u64 {
        self.tcp_epoch.load(std::sync::atomic::Ordering::SeqCst)
    }

    pub(crate) fn on_lock(&self) {
        self.tcp_epoch
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.grants.clear();
        *self.pin.lock().unwrap_or_else(|p| p.into_inner()) = None;
        *self.policy.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }
}

impl Core {
    /// Sends every event to `sink` from now on.
    pub fn set_audit_sink(&self, sink: Arc<dyn AuditSink>) {
        *self
            .trust()
            .audit
            .write()
            .unwrap_or_else(|p| p.into_inner()) = Some(sink);
    }

    /// The audit sink, if one is configured.
    pub fn audit_sink(&self) -> Option<Arc<dyn AuditSink>> {
        self.trust()
            .audit
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The vault's policy, `None` when it has none. Needs the open vault.
    pub fn policy(&self) -> Result<Option<Arc<Policy>>> {
        self.with_body(|body| {
            let mut slot = self
                .trust()
                .policy
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if let Some((generation, policy)) = &*slot
                && *generation == body.generation
            {
                return Ok(policy.clone());
            }
            let policy = match &body.policy {
                None => None,
                Some(text) => Some(Arc::new(Policy::parse(text).map_err(|e| {
                    // Only a valid policy is ever stored; a vault that holds
                    // an invalid one was written by something else.
                    Error::Vault(keyholder_vault::VaultError::Damaged(format!(
                        "the vault's policy does not parse: {e}"
                    )))
                })?)),
            };
            *slot = Some((body.generation, policy.clone()));
            Ok(policy)
        })
    }

    /// Whether `caller` may have `access`: the grant it presented, else the
    /// vault's policy. Status, lock and unlock are never refused here (the
    /// PIN guards unlock); policy and grant changes are decided by the PIN
    /// (step-up), never by a grant.
    pub fn decide(&self, caller: &Caller, access: &Access) -> Result<(), Denied> {
        if caller.channel == crate::gate::Channel::Tcp {
            return self.decide_remote(caller, access);
        }
        if matches!(access, Access::Session | Access::Unlock) {
            return Ok(());
        }
        if let Some(grant) = &caller.grant {
            if matches!(access, Access::Trust { .. }) {
                return Err(Denied {
                    rule: format!("grant {:?}", grant.name),
                    reason: "a grant cannot change policy or grants".into(),
                });
            }
            return grant.decide(caller, access).map_err(|reason| Denied {
                rule: format!("grant {:?}", grant.name),
                reason,
            });
        }
        if matches!(access, Access::Trust { .. }) {
            return Ok(());
        }
        let policy = match self.policy() {
            Ok(p) => p,
            // Locked or not created: operations that need the vault fail on
            // that already.
            Err(Error::Locked | Error::NotInitialized(_)) => return Ok(()),
            // A policy that cannot be read allows nothing.
            Err(e) => {
                return Err(Denied {
                    rule: "the policy".into(),
                    reason: format!("it cannot be read: {e}"),
                });
            }
        };
        let Some(policy) = policy else {
            return Ok(());
        };
        let d = policy.decide(caller, access);
        if d.allowed {
            Ok(())
        } else {
            Err(Denied {
                rule: if d.rule == "default" {
                    "the policy's default".into()
                } else {
                    format!("policy rule {}", d.rule)
                },
                reason: d.reason,
            })
        }
    }

    /// A caller from another machine: only what a rule naming its client
    /// certificate allows; nothing at all without a policy.
    fn decide_remote(&self, caller: &Caller, access: &Access) -> Result<(), Denied> {
        let denied = |reason: &str| Denied {
            rule: "the TCP listener".into(),
            reason: reason.into(),
        };
        let policy = self.policy().ok().flatten().ok_or_else(|| {
            denied("the vault has no policy: nothing but health is served over TCP")
        })?;
        match access {
            Access::Session => Ok(()),
            Access::Unlock | Access::Trust { .. } => Err(denied("not served over TCP")),
            _ => {
                let d = policy.decide(caller, access);
                if d.allowed {
                    Ok(())
                } else {
                    Err(Denied {
                        rule: if d.rule == "default" {
                            "the TCP listener".into()
                        } else {
                            format!("policy rule {}", d.rule)
                        },
                        reason: d.reason,
                    })
                }
            }
        }
    }

    /// What a TCP connection's every request must still satisfy, not only
    /// its handshake: made in this session (no lock since), its client
    /// certificate unexpired and not on the deny list.
    pub fn check_remote_peer(&self, peer: &crate::remote::RemotePeer) -> Result<()> {
        let refuse = |why: &str| {
            tracing::warn!(peer = %peer.addr, client = ?peer.name, why, "TCP request refused");
            Err(Error::PermissionDenied(format!("TCP listener: {why}")))
        };
        if peer.epoch != self.trust().tcp_epoch() {
            return refuse("the session was locked since this connection was made: connect again");
        }
        if std::time::SystemTime::now() > peer.not_after {
            return refuse("the client certificate has expired");
        }
        let denied = self.policy().ok().flatten().is_some_and(|p| {
            p.deny_serials
                .iter()
                .any(|s| s.eq_ignore_ascii_case(&peer.serial))
        });
        if denied {
            return refuse("the client certificate's serial is on the deny list");
        }
        Ok(())
    }

    /// The PIN again, for changing policy, grants or the vault's tokens:
    /// checked against the PIN that opened the session. After
    /// [`MAX_STEP_UP_FAILURES`] wrong ones in a row the session locks.
    pub fn step_up(&self, pin: &SecretString) -> Result<()> {
        self.require_unlocked()?;
        let lock_now = {
            let mut slot = self.trust().pin.lock().unwrap_or_else(|p| p.into_inner());
            let Some(check) = slot.as_mut() else {
                return Err(self.locked());
            };
            // Never another guess once the limit is reached, even while the
            // lock it started is still under way.
            if check.failures >= MAX_STEP_UP_FAILURES {
                return Err(self.locked());
            }
            let mac = pin_mac(&check.key, pin);
            if bool::from(mac.ct_eq(&check.mac)) {
                check.failures = 0;
                return Ok(());
            }
            check.failures = check.failures.saturating_add(1);
            let spent = check.failures >= MAX_STEP_UP_FAILURES;
            if spent {
                *slot = None;
            }
            spent
        };
        if lock_now {
            tracing::warn!(
                "wrong PIN for a policy, grant or token change {MAX_STEP_UP_FAILURES} times; locking"
            );
            self.lock(LockReason::Request);
            return Err(Error::PermissionDenied(format!(
                "wrong PIN; after {MAX_STEP_UP_FAILURES} wrong PINs the session was locked"
            )));
        }
        Err(Error::PermissionDenied(
            "wrong PIN: changing policy, grants or the vault's tokens needs the PIN that unlocked \
             the session"
                .into(),
        ))
    }
}
