//! The ssh-agent's view of Keyholder: the vault's `ssh` keys and their
//! certificates while unlocked, nothing while locked. Every agent request
//! passes the same gate as gRPC calls, as operation `Agent.*` with the
//! connection's peer.
//!
//! LOCK and UNLOCK map onto the Keyholder session: `ssh-add -x` locks the
//! whole session (the passphrase is ignored, as the vault is encrypted
//! anyway), and `ssh-add -X` unlocks it with the passphrase as the token PIN.
//! LOCK while locked and UNLOCK while unlocked answer FAILURE, the latter
//! without looking at the passphrase; on a forwarded connection the agent
//! server refuses both before they get here.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use keyholder_agent::{Backend, Identity, Peer};
use keyholder_vault::Body;
use secrecy::SecretString;
use zeroize::Zeroizing;

use crate::access::Access;
use crate::core::{Core, LockReason};
use crate::error::Result;
use crate::gate::{Caller, Channel, Needs};
use crate::signers::off_worker;
use sha2::Digest;

/// One identity the agent offers.
struct Offered {
    blob: Vec<u8>,
    comment: String,
    /// The vault key that signs for it.
    key: String,
    /// For certificates: Unix seconds after which it is not offered.
    valid_before: Option<u64>,
}

/// What the agent offers, built once per vault generation.
#[derive(Default)]
struct AgentIndex {
    entries: Vec<Offered>,
    by_blob: HashMap<Vec<u8>, usize>,
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl AgentIndex {
    fn build(body: &Body) -> Self {
        let mut index = Self::default();
        for (name, key) in &body.keys {
            if !key.usages.contains(&keyholder_vault::KeyUsage::Ssh) {
                continue;
            }
            let Ok(public) = ssh_key::PublicKey::from_openssh(&key.public_openssh) else {
                tracing::warn!(key = ?name, "key has an unreadable public key; not offered by the agent");
                continue;
            };
            if let Ok(blob) = keyholder_pki::keys::ssh_blob(public.key_data()) {
                index.entries.push(Offered {
                    blob,
                    comment: name.clone(),
                    key: name.clone(),
                    valid_before: None,
                });
            }
            for cert in body.ssh_certificates.iter().filter(|c| c.key == *name) {
                let Ok(parsed) = ssh_key::Certificate::from_openssh(&cert.certificate) else {
                    continue;
                };
                let mut blob = Vec::new();
                if ssh_encoding::Encode::encode(&parsed, &mut blob).is_ok() {
                    index.entries.push(Offered {
                        blob,
                        comment: format!(
                            "{name} (certificate {}, serial {})",
                            parsed.key_id(),
                            cert.serial
                        ),
                        key: name.clone(),
                        valid_before: Some(cert.valid_before),
                    });
                }
            }
        }
        index.by_blob = index
            .entries
            .iter()
            .enumerate()
            .map(|(i, e)| (e.blob.clone(), i))
            .collect();
        index
    }

    /// Identities valid now whose key `allowed` accepts.
    fn identities_where(&self, allowed: impl Fn(&str) -> bool) -> Vec<Identity> {
        let now = now_unix();
        self.entries
            .iter()
            .filter(|e| e.valid_before.is_none_or(|before| before > now))
            .filter(|e| allowed(&e.key))
            .map(|e| Identity {
                blob: e.blob.clone(),
                comment: e.comment.clone(),
            })
            .collect()
    }

    /// The key name behind a blob offered now.
    fn key_for(&self, blob: &[u8]) -> Option<&str> {
        let e = self.entries.get(*self.by_blob.get(blob)?)?;
        e.valid_before
            .is_none_or(|before| before > now_unix())
            .then_some(e.key.as_str())
    }
}

/// Open connections whose caller identity the agent keeps (as many as the
/// agent serves at once; a connection past it is read again at each request).
const CALLER_CACHE: usize = keyholder_agent::MAX_CONNECTIONS;

/// Adapts [`Core`] to the agent server.
pub struct AgentBackend {
    core: Arc<Core>,
    /// Caller identities of recent connections, oldest first.
    callers: Mutex<std::collections::VecDeque<(u64, Caller)>>,
    /// The index and the vault generation it was built from.
    index: Mutex<Option<(u64, Arc<AgentIndex>)>>,
}

impl AgentBackend {
    /// The agent's backend over `core`.
    pub fn new(core: Arc<Core>) -> Self {
        Self {
            core,
            callers: Mutex::new(std::collections::VecDeque::new()),
            index: Mutex::new(None),
        }
    }

    /// Reads who is on the other end of a new connection from `/proc`,
    /// once, at accept.
    fn remember(&self, peer: Peer) -> Caller {
        self.core.trust().metrics.agent_connection();
        let fresh = Caller::from_peer(peer.uid, peer.pid, Channel::Agent);
        let mut cache = self.callers.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= CALLER_CACHE {
            cache.pop_front();
        }
        cache.push_back((peer.connection, fresh.clone()));
        fresh
    }

    /// Who is calling: the process as read at accept, the connection's
    /// binding as it is now.
    fn caller(&self, peer: Peer) -> Caller {
        let known = {
            let cache = self.callers.lock().unwrap_or_else(|p| p.into_inner());
            cache
                .iter()
                .find(|(c, _)| *c == peer.connection)
                .map(|(_, known)| known.clone())
        };
        let mut caller = match known {
            Some(known) => known,
            // Only a connection evicted from a full cache: read again.
            None => Caller::from_peer(peer.uid, peer.pid, Channel::Agent),
        };
        caller.forwarded = peer.forwarded;
        caller.host_key = peer.host_key_fingerprint();
        caller
    }

    fn enter(&self, peer: Peer, op: &'static str, needs: Needs) -> Result<()> {
        self.core.enter(&self.caller(peer), op, needs)
    }

    /// Like `enter`, but with `unlock_on_demand` a locked session is first
    /// offered one PIN prompt, unless the connection is forwarded: a host
    /// reached with `ssh -A` never makes a prompt appear.
    async fn enter_or_prompt(&self, peer: Peer, op: &'static str, needs: Needs) -> Result<()> {
        self.core
            .enter_or_prompt(&self.caller(peer), op, needs, !peer.forwarded)
            .await
    }

    /// What the agent offers now, rebuilt when the vault changed.
    fn index(&self) -> Result<Arc<AgentIndex>> {
        self.core.with_body(|body| {
            let mut slot = self.index.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((generation, index)) = &*slot
                && *generation == body.generation
            {
                return Ok(index.clone());
            }
            let index = Arc::new(AgentIndex::build(body));
            *slot = Some((body.generation, index.clone()));
            Ok(index)
        })
    }
}

impl Backend for AgentBackend {
    async fn identities(&self, peer: Peer) -> Vec<Identity> {
        // Listing is not activity: ssh lists at every connection, and that
        // alone should not keep an idle session open. With unlock on demand,
        // a locked session is offered a prompt first: ssh lists before it
        // signs, and while locked there is nothing to list.
        let prompt =
            self.core.config.unlock_on_demand && !peer.forwarded && !self.core.is_unlocked();
        let entered = if prompt {
            self.enter_or_prompt(peer, "Agent.RequestIdentities", Needs::Unlocked)
                .await
        } else {
            self.enter(peer, "Agent.RequestIdentities", Needs::Nothing)
        };
        if entered.is_err() {
            return Vec::new();
        }
        let Ok(index) = self.index() else {
            return Vec::new();
        };
        // Only the keys this caller (and the host it is logging in to) may
        // sign with: ssh then never offers a key the policy would refuse.
        let caller = self.caller(peer);
        index.identities_where(|key| {
            self.core
                .decide(
                    &caller,
                    &Access::AgentSign {
                        key: key.to_owned(),
                    },
                )
                .is_ok()
        })
    }

    async fn sign(&self, key_blob: &[u8], data: &[u8], flags: u32, peer: Peer) -> Option<Vec<u8>> {
        const OP: &str = "Agent.Sign";
        let caller = self.caller(peer);
        self.core
            .enter_or_prompt(&caller, OP, Needs::Unlocked, !peer.forwarded)
            .await
            .ok()?;
        let index = self.index().ok()?;
        let Some(name) = index.key_for(key_blob) else {
            tracing::debug!(
                uid = peer.uid,
                "agent sign request for a key Keyholder does not offer"
            );
            return None;
        };
        let access = Access::AgentSign {
            key: name.to_owned(),
        };
        let ticket = match self.core.authorize(&caller, OP, access).await {
            Ok(t) => t,
            Err(e) => {
                tracing::info!(key = ?name, pid = ?peer.pid, host_key = ?caller.host_key, forwarded = peer.forwarded, error = %crate::escape::Escaped(&e), "agent signature refused");
                return None;
            }
        };
        let digest = keyholder_pki::hex(&sha2::Sha256::digest(data));
        let signed = async {
            let key = self.core.key(name)?;
            let data = data.to_vec();
            let sig = off_worker(key.slow(), move || key.sign_ssh(&data, flags)).await??;
            let blob = keyholder_pki::keys::ssh_signature_blob(&sig)?;
            Ok((blob, vec![("sha256", digest)]))
        }
        .await;
        match ticket.finish(signed).await {
            Ok(blob) => Some(blob),
            Err(e) => {
                tracing::info!(key = ?name, pid = ?peer.pid, error = %crate::escape::Escaped(&e), "agent signature refused");
                None
            }
        }
    }

    fn is_locked(&self) -> bool {
        !self.core.is_unlocked()
    }

    async fn lock(&self, peer: Peer) -> bool {
        if self.enter(peer, "Agent.Lock", Needs::Nothing).is_err() {
            return false;
        }
        let locked = self.core.lock(LockReason::Request);
        if !locked {
            tracing::info!(pid = ?peer.pid, "agent LOCK refused: already locked");
        }
        locked
    }

    async fn unlock(&self, passphrase: Zeroizing<String>, peer: Peer) -> bool {
        if self.enter(peer, "Agent.Unlock", Needs::Nothing).is_err() {
            return false;
        }
        let pin = SecretString::from(passphrase.to_string());
        match self
            .core
            .unlock_if_locked(pin, false, None, None, false)
            .await
        {
            Ok(Some(_)) => true,
            Ok(None) => {
                // Answering SUCCESS here would confirm any passphrase.
                tracing::info!(pid = ?peer.pid, "agent UNLOCK refused: already unlocked");
                false
            }
            Err(e) => {
                tracing::info!(error = %crate::escape::Escaped(&e), "agent UNLOCK refused");
                false
            }
        }
    }

    fn connected(&self, peer: Peer) {
        self.remember(peer);
    }

    fn closed(&self, peer: Peer) {
        let mut cache = self.callers.lock().unwrap_or_else(|p| p.into_inner());
        cache.retain(|(c, _)| *c != peer.connection);
    }

    fn record_binding(&self, _peer: Peer, _host_key_fingerprint: &str, _forwarding: bool) {
        // The agent server logs every verified binding; nothing else keeps
        // them until the audit log exists.
    }
}
