//! Signing keys ready to use: in memory (decrypted from the vault) or on the
//! token. The Signer service and the ssh-agent see one type either way.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use keyholder_pki::keys::{KeyType, SignAlgorithm, SoftKey, ecdsa_ssh_signature};
use keyholder_vault::{CaKey, KeyEntry};
use sha2::{Digest, Sha256};
use ssh_key::public::KeyData;

use crate::ca::{TokenSigner, TokenSlot};
use crate::core::Core;
use crate::error::{Error, Result};

/// A key of either kind.
pub enum LoadedKey {
    /// Held in memory.
    Soft(SoftKey),
    /// A P-256 key on the token; every signature is a `C_Sign`.
    Token {
        /// Signs through the token session.
        signer: TokenSigner,
        /// Its SSH public key.
        ssh_public: KeyData,
        /// SubjectPublicKeyInfo PEM.
        pem: String,
    },
}

fn damaged(what: String) -> Error {
    Error::Vault(keyholder_vault::VaultError::Damaged(what))
}

impl LoadedKey {
    /// Prepares `entry` for signing.
    pub fn load(name: &str, entry: &KeyEntry, slot: &TokenSlot) -> Result<Self> {
        match &entry.key {
            CaKey::Vault { private_key_pem } => SoftKey::import(private_key_pem, None)
                .map(Self::Soft)
                .map_err(|e| damaged(format!("key {name:?} does not load ({e})"))),
            CaKey::Token { key_id, .. } => {
                let public = ssh_key::PublicKey::from_openssh(&entry.public_openssh)
                    .map_err(|e| damaged(format!("key {name:?} public key ({e})")))?;
                let KeyData::Ecdsa(ssh_key::public::EcdsaPublicKey::NistP256(point)) =
                    public.key_data()
                else {
                    return Err(damaged(format!("token key {name:?} is not P-256")));
                };
                let id = crate::ca::unhex(key_id)
                    .ok_or_else(|| damaged(format!("key {name:?} id is not hex")))?;
                let signer = crate::ca::token_signer(slot.clone(), id, point.as_bytes().to_vec())?;
                let p = p256::PublicKey::from_sec1_bytes(point.as_bytes())
                    .map_err(|_| damaged(format!("token key {name:?} point")))?;
                let pem = p256::pkcs8::EncodePublicKey::to_public_key_pem(
                    &p,
                    p256::pkcs8::LineEnding::LF,
                )
                .map_err(|e| Error::Internal(e.to_string()))?;
                Ok(Self::Token {
                    signer,
                    ssh_public: public.key_data().clone(),
                    pem,
                })
            }
        }
    }

    /// Whether signing is a token operation (and so blocks).
    pub fn on_token(&self) -> bool {
        matches!(self, Self::Token { .. })
    }

    /// The key type.
    pub fn kind(&self) -> KeyType {
        match self {
            Self::Soft(k) => k.kind(),
            Self::Token { .. } => KeyType::EcdsaP256,
        }
    }

    /// Its SSH public key.
    pub fn ssh_public(&self) -> &KeyData {
        match self {
            Self::Soft(k) => k.ssh_public(),
            Self::Token { ssh_public, .. } => ssh_public,
        }
    }

    /// SubjectPublicKeyInfo PEM.
    pub fn public_pem(&self) -> &str {
        match self {
            Self::Soft(k) => k.public_pem(),
            Self::Token { pem, .. } => pem,
        }
    }

    fn token_sign(signer: &TokenSigner, digest: &[u8; 32]) -> Result<[u8; 64]> {
        // Hands the worker's other tasks off while the token works (a no-op
        // wrapper on blocking-pool threads).
        tokio::task::block_in_place(|| signer.sign_digest(digest))
    }

    /// An SSH signature.
    pub fn sign_ssh(&self, data: &[u8], flags: u32) -> Result<ssh_key::Signature> {
        match self {
            Self::Soft(k) => Ok(k.sign_ssh(data, flags)?),
            Self::Token { signer, .. } => {
                let rs = Self::token_sign(signer, &Sha256::digest(data).into())?;
                Ok(ecdsa_ssh_signature(&rs)?)
            }
        }
    }

    /// A `Signer.Sign` signature.
    pub fn sign(&self, alg: SignAlgorithm, input: &[u8], prehashed: bool) -> Result<Vec<u8>> {
        match self {
            Self::Soft(k) => Ok(k.sign(alg, input, prehashed)?),
            Self::Token { signer, .. } => {
                if alg != SignAlgorithm::EcdsaSha256 {
                    return Err(Error::InvalidArgument {
                        field: "algorithm",
                        reason: "token keys are P-256 and sign ecdsa-sha256".into(),
                    });
                }
                let digest: [u8; 32] = if prehashed {
                    input.try_into().map_err(|_| Error::InvalidArgument {
                        field: "data",
                        reason: format!("a SHA-256 digest is 32 bytes, not {}", input.len()),
                    })?
                } else {
                    Sha256::digest(input).into()
                };
                let rs = Self::token_sign(signer, &digest)?;
                let sig = p256::ecdsa::Signature::from_slice(&rs)
                    .map_err(|e| Error::Internal(e.to_string()))?;
                Ok(sig.to_der().as_bytes().to_vec())
            }
        }
    }
}

/// What the agent offers, built once per vault change.
#[derive(Default)]
pub struct AgentIndex {
    /// (blob, comment, key name, valid_before for certificates).
    pub entries: Vec<(Vec<u8>, String, String, Option<u64>)>,
    by_blob: HashMap<Vec<u8>, usize>,
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl AgentIndex {
    fn build(body: &keyholder_vault::Body) -> Self {
        let mut index = Self::default();
        for (name, key) in &body.keys {
            if !key.usages.iter().any(|u| u == "ssh") {
                continue;
            }
            let Ok(public) = ssh_key::PublicKey::from_openssh(&key.public_openssh) else {
                tracing::warn!(key = %name, "key has an unreadable public key; not offered by the agent");
                continue;
            };
            if let Ok(blob) = keyholder_pki::keys::ssh_blob(public.key_data()) {
                index.entries.push((blob, name.clone(), name.clone(), None));
            }
            for cert in body.ssh_certificates.iter().filter(|c| c.key == *name) {
                let Ok(parsed) = ssh_key::Certificate::from_openssh(&cert.certificate) else {
                    continue;
                };
                let mut blob = Vec::new();
                if ssh_encoding::Encode::encode(&parsed, &mut blob).is_ok() {
                    let comment = format!(
                        "{name} (certificate {}, serial {})",
                        parsed.key_id(),
                        cert.serial
                    );
                    index
                        .entries
                        .push((blob, comment, name.clone(), Some(cert.valid_before)));
                }
            }
        }
        index.by_blob = index
            .entries
            .iter()
            .enumerate()
            .map(|(i, e)| (e.0.clone(), i))
            .collect();
        index
    }

    /// Identities valid now.
    pub fn identities(&self) -> Vec<keyholder_agent::Identity> {
        let now = now_unix();
        self.entries
            .iter()
            .filter(|e| e.3.is_none_or(|before| before > now))
            .map(|e| keyholder_agent::Identity {
                blob: e.0.clone(),
                comment: e.1.clone(),
            })
            .collect()
    }

    /// The key name behind a blob offered now.
    pub fn key_for(&self, blob: &[u8]) -> Option<&str> {
        let e = &self.entries[*self.by_blob.get(blob)?];
        e.3.is_none_or(|before| before > now_unix())
            .then_some(e.2.as_str())
    }
}

impl Core {
    /// The key `name`, loaded and ready to sign.
    pub fn loaded_key(&self, name: &str) -> Result<Arc<LoadedKey>> {
        self.with_unlocked(|u| {
            let mut cache = u.keys.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(k) = cache.get(name) {
                return Ok(k.clone());
            }
            let entry = u.vault.body.keys.get(name).ok_or_else(|| Error::NotFound {
                kind: "key",
                name: name.to_owned(),
            })?;
            let loaded = Arc::new(LoadedKey::load(name, entry, &self.token_slot_handle())?);
            cache.insert(name.to_owned(), loaded.clone());
            Ok(loaded)
        })
    }

    /// What the agent offers now.
    pub fn agent_index(&self) -> Result<Arc<AgentIndex>> {
        self.with_unlocked(|u| {
            let mut slot = u.agent_index.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(i) = &*slot {
                return Ok(i.clone());
            }
            let index = Arc::new(AgentIndex::build(&u.vault.body));
            *slot = Some(index.clone());
            Ok(index)
        })
    }
}
