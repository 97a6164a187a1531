//! The ssh-agent's view of Keyholder: the vault's `ssh` keys and their
//! certificates while unlocked, nothing while locked.
//!
//! LOCK and UNLOCK map onto the Keyholder session: `ssh-add -x` locks the
//! whole session (the passphrase is ignored, as the vault is encrypted
//! anyway), and `ssh-add -X` unlocks it with the passphrase as the token PIN.

use std::sync::Arc;

use keyholder_agent::{Backend, Identity, Peer};
use keyholder_pki::keys::KeyType;
use secrecy::SecretString;
use zeroize::Zeroizing;

use crate::core::{Core, LockReason};

/// Adapts [`Core`] to the agent server.
pub struct AgentBackend(pub Arc<Core>);

impl Backend for AgentBackend {
    async fn identities(&self) -> Vec<Identity> {
        match self.0.agent_index() {
            Ok(index) => index.identities(),
            Err(_) => Vec::new(),
        }
    }

    async fn sign(&self, key_blob: &[u8], data: &[u8], flags: u32, peer: Peer) -> Option<Vec<u8>> {
        let index = self.0.agent_index().ok()?;
        let Some(name) = index.key_for(key_blob) else {
            tracing::debug!(
                uid = peer.uid,
                "agent sign request for a key Keyholder does not offer"
            );
            return None;
        };
        let key = self.0.loaded_key(name).ok()?;
        self.0.touch();
        let name = name.to_owned();
        let signed = if matches!(key.kind(), KeyType::Rsa3072 | KeyType::Rsa4096) || key.on_token()
        {
            // Slow signatures (RSA: milliseconds; token: a device round
            // trip) run on the blocking pool, so that many of them queue
            // fairly instead of starving the runtime's two workers.
            let data = data.to_vec();
            tokio::task::spawn_blocking(move || key.sign_ssh(&data, flags))
                .await
                .ok()?
        } else {
            key.sign_ssh(data, flags)
        };
        match signed {
            Ok(sig) => keyholder_pki::keys::ssh_signature_blob(&sig).ok(),
            Err(e) => {
                tracing::info!(key = %name, pid = ?peer.pid, error = %e, "agent signature refused");
                None
            }
        }
    }

    async fn lock(&self) -> bool {
        self.0.lock(LockReason::Request);
        true
    }

    async fn unlock(&self, passphrase: Zeroizing<String>) -> bool {
        let pin = SecretString::from(passphrase.to_string());
        match self.0.unlock(pin, false, None, None, false).await {
            Ok(_) => true,
            Err(e) => {
                tracing::info!(error = %e, "agent UNLOCK refused");
                false
            }
        }
    }

    fn record_binding(&self, _peer: Peer, _host_key_fingerprint: &str, _forwarding: bool) {
        // The agent server logs every verified binding; nothing else keeps
        // them until the audit log exists.
    }
}
