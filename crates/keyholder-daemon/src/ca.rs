//! CA keys ready to sign: vault keys held in memory, token keys reached
//! through the open token session. Issuance code sees one type either way.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use keyholder_pki::ecdsa::PreparedSigner;
use keyholder_pki::{CaIssuer, PkiError, PublicKeyData, SigningKey};
use keyholder_token::{TokenKey, TokenSession};
use keyholder_vault::{CaEntry, CaKey};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::error::{Error, Result};
use crate::keypool::KeyPool;

/// The token session slot shared with [`crate::core::Core`].
pub type TokenSlot = Arc<Mutex<Option<TokenSession>>>;

/// A CA private key on the token: each signature is a `C_Sign`.
pub struct TokenSigner {
    slot: TokenSlot,
    key: TokenKey,
    /// Uncompressed SEC1 point, as the certificate's public key.
    point: Vec<u8>,
}

impl PublicKeyData for TokenSigner {
    fn der_bytes(&self) -> &[u8] {
        &self.point
    }

    fn algorithm(&self) -> &'static rcgen_alg::SignatureAlgorithm {
        &rcgen_alg::PKCS_ECDSA_P256_SHA256
    }
}

impl TokenSigner {
    /// Signs a SHA-256 digest on the token; r||s. Blocks.
    pub fn sign_digest(&self, digest: &[u8; 32]) -> Result<[u8; 64]> {
        let guard = self.slot.lock().unwrap_or_else(|p| p.into_inner());
        let session = guard.as_ref().ok_or(Error::Locked)?;
        Ok(session.sign_p256_digest(&self.key, digest)?)
    }
}

impl SigningKey for TokenSigner {
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, rcgen_alg::Error> {
        let digest: [u8; 32] = Sha256::digest(msg).into();
        let rs = self.sign_digest(&digest).map_err(|e| {
            tracing::warn!(error = %e, "token signature failed");
            rcgen_alg::Error::RemoteKeyError
        })?;
        let sig = p256::ecdsa::Signature::from_slice(&rs)
            .map_err(|_| rcgen_alg::Error::RemoteKeyError)?;
        Ok(sig.to_der().as_bytes().to_vec())
    }
}

/// rcgen's types, re-exported through keyholder-pki.
mod rcgen_alg {
    pub use keyholder_pki::rcgen::{
        Error, PKCS_ECDSA_P256_SHA256, PKCS_RSA_SHA256, SignatureAlgorithm,
    };
}

/// A CA key of either kind.
pub enum CaSigner {
    /// Held in memory (decrypted from the vault).
    Memory {
        key: Box<keyholder_pki::rcgen::KeyPair>,
        /// For a P-256 key: the same key, signing with nonces from the
        /// stock when it has one.
        prepared: Option<PreparedSigner>,
        nonces: Arc<KeyPool>,
    },
    /// On the token.
    Token(TokenSigner),
}

impl PublicKeyData for CaSigner {
    fn der_bytes(&self) -> &[u8] {
        match self {
            Self::Memory { key, .. } => key.der_bytes(),
            Self::Token(t) => t.der_bytes(),
        }
    }

    fn algorithm(&self) -> &'static rcgen_alg::SignatureAlgorithm {
        match self {
            Self::Memory { key, .. } => key.algorithm(),
            Self::Token(t) => t.algorithm(),
        }
    }
}

impl SigningKey for CaSigner {
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, rcgen_alg::Error> {
        match self {
            Self::Memory {
                key,
                prepared,
                nonces,
            } => {
                if let Some(prepared) = prepared
                    && let Some(nonce) = nonces.take_nonce()
                    && let Some(sig) = prepared.sign(nonce, msg)
                {
                    return Ok(sig);
                }
                key.sign(msg)
            }
            Self::Token(t) => t.sign(msg),
        }
    }
}

/// A CA ready to issue.
pub struct LoadedCa {
    /// Name, certificate and signer.
    pub issuer: CaIssuer<CaSigner>,
    /// The CA certificate, PEM.
    pub certificate_pem: String,
    /// The CA certificate's end; nothing it issues outlives it.
    pub not_after: SystemTime,
    /// Longest certificate it issues.
    pub max_ttl: Duration,
    /// Whether a signature takes long enough to block a worker: a token
    /// operation, or an RSA private-key operation (milliseconds).
    pub slow: bool,
}

fn pki(e: PkiError) -> Error {
    Error::from(e)
}

pub fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// A token signer for a key whose public point is `point`.
pub fn token_signer(slot: TokenSlot, key_id: Vec<u8>, point: Vec<u8>) -> Result<TokenSigner> {
    let public = p256::PublicKey::from_sec1_bytes(&point)
        .map_err(|_| Error::Internal("token CA certificate does not hold a P-256 key".into()))?;
    let uncompressed = p256::elliptic_curve::sec1::ToEncodedPoint::to_encoded_point(&public, false)
        .as_bytes()
        .to_vec();
    Ok(TokenSigner {
        slot,
        key: TokenKey { id: key_id, public },
        point: uncompressed,
    })
}

/// A CA signer for a key held in memory (PKCS#8 PEM from the vault).
/// `certificate_pem` is the CA's certificate, whose key the fast path
/// checks it signs with.
fn memory_signer(
    private_key_pem: &str,
    certificate_pem: &str,
    nonces: &Arc<KeyPool>,
) -> Result<CaSigner> {
    let key = keyholder_pki::rcgen::KeyPair::from_pem(private_key_pem).map_err(|e| {
        Error::Vault(keyholder_vault::VaultError::Damaged(format!(
            "CA key does not parse ({e})"
        )))
    })?;
    Ok(CaSigner::Memory {
        prepared: prepared_signer(&key, certificate_pem),
        key: Box::new(key),
        nonces: nonces.clone(),
    })
}

/// The nonce-stock signer for an in-memory P-256 CA key; `None` for other
/// algorithms, which sign through rcgen, and for a key that is not the
/// certificate's.
fn prepared_signer(
    key: &keyholder_pki::rcgen::KeyPair,
    certificate_pem: &str,
) -> Option<PreparedSigner> {
    if key.algorithm() != &rcgen_alg::PKCS_ECDSA_P256_SHA256 {
        return None;
    }
    let der = Zeroizing::new(key.serialize_der());
    let signs_for = keyholder_pki::certificate_public_key(certificate_pem)
        .and_then(|point| PreparedSigner::from_pkcs8_der(&der, &point));
    match signs_for {
        Ok(signer) => Some(signer),
        Err(e) => {
            // Signing still works through rcgen, without the stock.
            tracing::warn!(error = %e, "CA key cannot sign with prepared nonces");
            None
        }
    }
}

/// Prepares the CA `entry` to sign; in-memory P-256 keys take nonces from
/// `nonces`.
pub fn load(entry: &CaEntry, slot: &TokenSlot, nonces: &Arc<KeyPool>) -> Result<LoadedCa> {
    let info = keyholder_pki::certificate_info(&entry.certificate_pem).map_err(pki)?;
    let (signer, on_token) = match &entry.key {
        CaKey::Vault { private_key_pem } => (
            memory_signer(private_key_pem, &entry.certificate_pem, nonces)?,
            false,
        ),
        CaKey::Token { key_id, .. } => {
            let id = unhex(key_id).ok_or_else(|| {
                Error::Vault(keyholder_vault::VaultError::Damaged(
                    "CA key id is not hex".into(),
                ))
            })?;
            let point =
                keyholder_pki::certificate_public_key(&entry.certificate_pem).map_err(pki)?;
            (
                CaSigner::Token(token_signer(slot.clone(), id, point)?),
                true,
            )
        }
    };
    let signer_is_rsa = signer.algorithm() == &rcgen_alg::PKCS_RSA_SHA256;
    let issuer = keyholder_pki::issuer(&entry.certificate_pem, signer).map_err(pki)?;
    Ok(LoadedCa {
        issuer,
        certificate_pem: entry.certificate_pem.clone(),
        not_after: info.not_after,
        max_ttl: Duration::from_secs(entry.max_ttl_seconds),
        slow: on_token || signer_is_rsa,
    })
}

/// Checks a CA or cluster name: 1-64 bytes of A-Z a-z 0-9 . _ -
pub fn validate_name(field: &'static str, name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
        && name != "."
        && name != "..";
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidArgument {
            field,
            reason: format!("{name:?} must be 1-64 characters of A-Z a-z 0-9 . _ -"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keyholder_pki::KeyAlgorithm;
    use ring::signature::{ECDSA_P256_SHA256_ASN1, ED25519, UnparsedPublicKey};

    fn sign_and_verify(
        signer: &CaSigner,
        alg: &'static dyn ring::signature::VerificationAlgorithm,
    ) {
        let public = UnparsedPublicKey::new(alg, signer.der_bytes().to_vec());
        for i in 0..4 {
            let msg = format!("tbsCertificate {i}");
            let sig = signer.sign(msg.as_bytes()).expect("signature");
            public.verify(msg.as_bytes(), &sig).expect("verifies");
        }
    }

    fn signer_for(alg: KeyAlgorithm, pool: &Arc<KeyPool>) -> CaSigner {
        let key = alg.generate().expect("key");
        let cert = keyholder_pki::create_ca_certificate("t", &key, Duration::from_secs(3600))
            .expect("certificate");
        memory_signer(&key.serialize_pem(), &cert, pool).expect("signer")
    }

    #[test]
    fn p256_ca_signs_with_stocked_nonces_and_without() {
        let pool = KeyPool::start(16);
        let signer = signer_for(KeyAlgorithm::P256, &pool);
        assert!(matches!(
            signer,
            CaSigner::Memory {
                prepared: Some(_),
                ..
            }
        ));

        // Locked: no nonces, so ring signs.
        sign_and_verify(&signer, &ECDSA_P256_SHA256_ASN1);

        pool.fill();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while pool.stocked_nonces() < 16 {
            assert!(std::time::Instant::now() < deadline, "nonces were not made");
            std::thread::sleep(Duration::from_millis(5));
        }
        // Unlocked: each signature takes a nonce from the stock.
        sign_and_verify(&signer, &ECDSA_P256_SHA256_ASN1);
        // One nonce per signature, unless the filling thread held the lock
        // at that moment (the signature is then ring's).
        assert!(pool.stocked_nonces() < 16, "no stocked nonce was used");
        pool.stop();
    }

    #[test]
    fn other_algorithms_sign_through_rcgen() {
        let pool = KeyPool::start(16);
        pool.fill();
        let signer = signer_for(KeyAlgorithm::Ed25519, &pool);
        assert!(matches!(signer, CaSigner::Memory { prepared: None, .. }));
        sign_and_verify(&signer, &ED25519);
        pool.stop();
    }

    #[test]
    fn a_key_that_is_not_the_certificates_signs_without_the_stock() {
        let pool = KeyPool::start(16);
        let key = KeyAlgorithm::P256.generate().expect("key");
        let other = KeyAlgorithm::P256.generate().expect("key");
        let cert = keyholder_pki::create_ca_certificate("t", &other, Duration::from_secs(3600))
            .expect("certificate");
        let signer = memory_signer(&key.serialize_pem(), &cert, &pool).expect("signer");
        assert!(matches!(signer, CaSigner::Memory { prepared: None, .. }));
        pool.stop();
    }
}
