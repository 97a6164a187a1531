//! Every key that signs, in one home: [`Signer`] over "in memory" (decrypted
//! from the vault) and "on the token", doing X.509, SSH and raw signatures;
//! the [`Keyring`] that caches them while unlocked, keyed by kind and name;
//! and [`off_worker`], the one rule for when a signature leaves the async
//! workers.
//!
//! A token failure inside an X.509 signature is kept beside rcgen's error
//! (rcgen's trait only carries its own error type), so that
//! [`signing_result`] can report the token error itself: a token that went away
//! is UNAVAILABLE, not an internal error.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use keyholder_pki::ecdsa::PreparedSigner;
use keyholder_pki::keys::{SignAlgorithm, SoftKey, ecdsa_ssh_signature};
use keyholder_pki::rcgen::{self, SignatureAlgorithm};
use keyholder_pki::{CaIssuer, KeyAlgorithm, PkiError, PublicKeyData, SigningKey};
use keyholder_token::{Session, TokenKey};
use keyholder_vault::{Body, CaEntry, CaKey, CaKind, KeyEntry, VaultError};
use p256::elliptic_curve::sec1::ToEncodedPoint;
use sha2::{Digest, Sha256};
use ssh_key::public::KeyData;

use crate::error::{Error, Result};
use crate::keypool::KeyPool;
use crate::names::lookup;

/// The logged-in token session while unlocked, shared by the session and
/// every token-backed signer. Behind a mutex: a token session may move
/// between threads but not be shared.
pub type TokenSlot = Arc<Mutex<Option<Box<dyn Session>>>>;

fn damaged(what: String) -> Error {
    Error::Vault(VaultError::Damaged(what))
}

/// Runs `sign` where a signature of that speed belongs: in place when it
/// takes microseconds (Ed25519, P-256 in memory), on the blocking pool when
/// it takes milliseconds or more (a token round trip, an RSA private-key
/// operation, RSA key generation), so that many slow ones queue fairly
/// instead of starving the runtime's few workers.
pub async fn off_worker<T: Send + 'static>(
    slow: bool,
    sign: impl FnOnce() -> T + Send + 'static,
) -> Result<T> {
    if !slow {
        return Ok(sign());
    }
    tokio::task::spawn_blocking(sign)
        .await
        .map_err(|e| Error::Internal(format!("signing task failed: {e}")))
}

thread_local! {
    /// The token error behind the last failed token signature on this
    /// thread (rcgen's `SigningKey::sign` cannot return it).
    static TOKEN_FAILURE: RefCell<Option<keyholder_token::Error>> = const { RefCell::new(None) };
}

/// Runs an X.509 or SSH certificate operation that signs through
/// [`Signer`]'s rcgen or SSH trait on this thread, and maps its failure: the
/// token's own error when a token signature failed, the PKI error otherwise.
pub fn signing_result<T>(build: impl FnOnce() -> Result<T, PkiError>) -> Result<T> {
    TOKEN_FAILURE.with(|f| f.borrow_mut().take());
    build().map_err(|e| match TOKEN_FAILURE.with(|f| f.borrow_mut().take()) {
        Some(token) => Error::Token(token),
        None => Error::Pki(e),
    })
}

/// Where a signer's private key is.
enum Place {
    /// In memory. P-256 keys may sign X.509 with nonces from the stock.
    Memory {
        key: Box<SoftKey>,
        prepared: Option<PreparedSigner>,
        nonces: Option<Arc<KeyPool>>,
    },
    /// A P-256 key on the token; each signature is a token operation.
    Token { slot: TokenSlot, key: TokenKey },
}

/// A key that signs: X.509 (through rcgen's [`SigningKey`]), SSH, and raw
/// `Signer.Sign` signatures, wherever the private key is.
pub struct Signer {
    algorithm: KeyAlgorithm,
    /// The public key as X.509 encoders take it.
    public_raw: Vec<u8>,
    ssh_public: KeyData,
    public_pem: String,
    place: Place,
}

impl Signer {
    /// A signer for a key in memory.
    pub fn memory(key: SoftKey) -> Self {
        Self {
            algorithm: key.kind(),
            public_raw: key.public_raw().to_vec(),
            ssh_public: key.ssh_public().clone(),
            public_pem: key.public_pem().to_owned(),
            place: Place::Memory {
                key: Box::new(key),
                prepared: None,
                nonces: None,
            },
        }
    }

    /// A signer for the P-256 key `key` on the token in `slot`.
    pub fn token(slot: TokenSlot, key: TokenKey) -> Result<Self> {
        let point = key.public.to_encoded_point(false);
        let public_pem = p256::pkcs8::EncodePublicKey::to_public_key_pem(
            &key.public,
            p256::pkcs8::LineEnding::LF,
        )
        .map_err(|e| Error::Internal(e.to_string()))?;
        Ok(Self {
            algorithm: KeyAlgorithm::EcdsaP256,
            public_raw: point.as_bytes().to_vec(),
            ssh_public: KeyData::Ecdsa(ssh_key::public::EcdsaPublicKey::NistP256(point)),
            public_pem,
            place: Place::Token { slot, key },
        })
    }

    /// A signer for a key stored in the vault as `stored`; `public` is the
    /// key's public half as the vault records it (needed for token keys),
    /// `what` names it in errors.
    pub fn load(
        what: &str,
        stored: &CaKey,
        public: PublicHint<'_>,
        slot: &TokenSlot,
    ) -> Result<Self> {
        match stored {
            CaKey::Vault { private_key_pem } => SoftKey::from_pkcs8_pem(private_key_pem)
                .map(Self::memory)
                .map_err(|e| damaged(format!("{what} does not load ({e})"))),
            CaKey::Token { key_id, .. } => {
                let id =
                    unhex(key_id).ok_or_else(|| damaged(format!("{what}: key id is not hex")))?;
                let point = match public {
                    PublicHint::Certificate(pem) => keyholder_pki::certificate_public_key(pem)
                        .map_err(|e| damaged(format!("{what}: {e}")))?,
                    PublicHint::OpenSsh(line) => {
                        let parsed = ssh_key::PublicKey::from_openssh(line)
                            .map_err(|e| damaged(format!("{what}: public key ({e})")))?;
                        match parsed.key_data() {
                            KeyData::Ecdsa(ssh_key::public::EcdsaPublicKey::NistP256(p)) => {
                                p.as_bytes().to_vec()
                            }
                            _ => {
                                return Err(damaged(format!(
                                    "{what}: a token key that is not P-256"
                                )));
                            }
                        }
                    }
                };
                let public = p256::PublicKey::from_sec1_bytes(&point)
                    .map_err(|_| damaged(format!("{what}: a token key that is not P-256")))?;
                Self::token(slot.clone(), TokenKey { id, public })
            }
        }
    }

    /// Lets an in-memory P-256 key sign X.509 with nonces from `nonces`,
    /// when it is the key of `certificate_pem`.
    fn with_nonces(mut self, certificate_pem: &str, nonces: &Arc<KeyPool>) -> Self {
        if let Place::Memory {
            key,
            prepared,
            nonces: stock,
        } = &mut self.place
            && key.kind() == KeyAlgorithm::EcdsaP256
        {
            let der = key.pkcs8_der();
            let signs_for = keyholder_pki::certificate_public_key(certificate_pem)
                .and_then(|point| PreparedSigner::from_pkcs8_der(der, &point));
            match signs_for {
                Ok(signer) => {
                    *prepared = Some(signer);
                    *stock = Some(nonces.clone());
                }
                // Signing still works, without the stock.
                Err(e) => {
                    tracing::warn!(error = %crate::escape::Escaped(&e), "CA key cannot sign with prepared nonces")
                }
            }
        }
        self
    }

    /// The key algorithm.
    pub fn algorithm(&self) -> KeyAlgorithm {
        self.algorithm
    }

    /// Whether the private key is on the token.
    pub fn on_token(&self) -> bool {
        matches!(self.place, Place::Token { .. })
    }

    /// Whether a signature takes milliseconds or more (see [`off_worker`]).
    pub fn slow(&self) -> bool {
        self.on_token() || self.algorithm.is_rsa()
    }

    /// The SSH public key.
    pub fn ssh_public(&self) -> &KeyData {
        &self.ssh_public
    }

    /// SubjectPublicKeyInfo PEM.
    pub fn public_pem(&self) -> &str {
        &self.public_pem
    }

    fn token_sign(slot: &TokenSlot, key: &TokenKey, digest: &[u8; 32]) -> Result<[u8; 64]> {
        let guard = slot.lock().unwrap_or_else(|p| p.into_inner());
        let session = guard.as_ref().ok_or(Error::Locked)?;
        Ok(session.sign_p256_digest(key, digest)?)
    }

    /// An SSH signature over `data`; `flags` picks the RSA hash.
    pub fn sign_ssh(&self, data: &[u8], flags: u32) -> Result<ssh_key::Signature> {
        match &self.place {
            Place::Memory { key, .. } => Ok(key.sign_ssh(data, flags)?),
            Place::Token { slot, key } => {
                let rs = Self::token_sign(slot, key, &Sha256::digest(data).into())?;
                Ok(ecdsa_ssh_signature(&rs)?)
            }
        }
    }

    /// A `Signer.Sign` signature over `input`, or over the digest `input`
    /// when `prehashed`.
    pub fn sign(&self, alg: SignAlgorithm, input: &[u8], prehashed: bool) -> Result<Vec<u8>> {
        match &self.place {
            Place::Memory { key, .. } => Ok(key.sign(alg, input, prehashed)?),
            Place::Token { slot, key } => {
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
                let rs = Self::token_sign(slot, key, &digest)?;
                der_signature(&rs).map_err(|e| Error::Internal(e.to_string()))
            }
        }
    }
}

fn der_signature(rs: &[u8; 64]) -> std::result::Result<Vec<u8>, p256::ecdsa::Error> {
    Ok(p256::ecdsa::Signature::from_slice(rs)?
        .to_der()
        .as_bytes()
        .to_vec())
}

/// Where a token key's public half is recorded.
#[derive(Clone, Copy)]
pub enum PublicHint<'a> {
    /// In the CA certificate (PEM).
    Certificate(&'a str),
    /// In an OpenSSH public key line.
    OpenSsh(&'a str),
}

impl PublicKeyData for Signer {
    fn der_bytes(&self) -> &[u8] {
        &self.public_raw
    }

    fn algorithm(&self) -> &'static SignatureAlgorithm {
        match self.algorithm {
            KeyAlgorithm::Ed25519 => &rcgen::PKCS_ED25519,
            KeyAlgorithm::EcdsaP256 => &rcgen::PKCS_ECDSA_P256_SHA256,
            KeyAlgorithm::Rsa2048 | KeyAlgorithm::Rsa3072 | KeyAlgorithm::Rsa4096 => {
                &rcgen::PKCS_RSA_SHA256
            }
        }
    }
}

impl SigningKey for Signer {
    fn sign(&self, msg: &[u8]) -> std::result::Result<Vec<u8>, rcgen::Error> {
        match &self.place {
            Place::Memory {
                key,
                prepared,
                nonces,
            } => {
                if let (Some(prepared), Some(nonces)) = (prepared, nonces)
                    && let Some(nonce) = nonces.take_nonce()
                    && let Some(sig) = prepared.sign(nonce, msg)
                {
                    return Ok(sig);
                }
                let alg = match self.algorithm {
                    KeyAlgorithm::Ed25519 => SignAlgorithm::Ed25519,
                    KeyAlgorithm::EcdsaP256 => SignAlgorithm::EcdsaSha256,
                    _ => SignAlgorithm::RsaPkcs1Sha256,
                };
                key.sign(alg, msg, false)
                    .map_err(|_| rcgen::Error::RingUnspecified)
            }
            Place::Token { slot, key } => {
                let signed = Self::token_sign(slot, key, &Sha256::digest(msg).into());
                let rs = match signed {
                    Ok(rs) => rs,
                    Err(e) => {
                        keep_token_failure(e);
                        return Err(rcgen::Error::RemoteKeyError);
                    }
                };
                der_signature(&rs).map_err(|_| rcgen::Error::RemoteKeyError)
            }
        }
    }
}

/// Logs a failed signature and keeps its token error for [`signing_result`].
fn keep_token_failure(e: Error) -> String {
    tracing::warn!(error = %crate::escape::Escaped(&e), "signature failed");
    let text = e.to_string();
    if let Error::Token(t) = e {
        TOKEN_FAILURE.with(|f| *f.borrow_mut() = Some(t));
    }
    text
}

impl keyholder_pki::ssh::SshSigner for Signer {
    fn ssh_public(&self) -> &KeyData {
        &self.ssh_public
    }

    fn sign_ssh_message(&self, msg: &[u8]) -> std::result::Result<ssh_key::Signature, PkiError> {
        self.sign_ssh(msg, 0x04)
            .map_err(|e| PkiError::Build(keep_token_failure(e)))
    }
}

/// Parses lower-case or upper-case hex.
pub fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// An X.509 CA ready to issue.
pub struct X509Ca {
    /// Name, certificate and signer.
    pub issuer: CaIssuer<Signer>,
    /// The CA certificate, PEM.
    pub certificate_pem: String,
    /// The CA certificate's end; nothing it issues outlives it.
    pub not_after: SystemTime,
    /// Longest certificate it issues.
    pub max_ttl: Duration,
    /// Whether its signature is slow (see [`off_worker`]).
    pub slow: bool,
}

impl X509Ca {
    /// Prepares `entry` to sign; an in-memory P-256 key takes nonces from
    /// `nonces`.
    pub fn load(
        name: &str,
        entry: &CaEntry,
        slot: &TokenSlot,
        nonces: &Arc<KeyPool>,
    ) -> Result<Self> {
        let info = keyholder_pki::certificate_info(&entry.certificate_pem)?;
        let signer = Signer::load(
            &format!("CA {name:?}"),
            &entry.key,
            PublicHint::Certificate(&entry.certificate_pem),
            slot,
        )?
        .with_nonces(&entry.certificate_pem, nonces);
        let slow = signer.slow();
        Ok(Self {
            issuer: keyholder_pki::issuer(&entry.certificate_pem, signer)?,
            certificate_pem: entry.certificate_pem.clone(),
            not_after: info.not_after,
            max_ttl: Duration::from_secs(entry.max_ttl_seconds),
            slow,
        })
    }
}

/// An SSH CA ready to sign certificates.
pub struct SshCa {
    /// Its key.
    pub signer: Signer,
    /// Longest certificate it issues.
    pub max_ttl: Duration,
}

/// Loaded entries of one kind, by name.
struct Cache<T>(Mutex<HashMap<String, Arc<T>>>);

impl<T> Default for Cache<T> {
    fn default() -> Self {
        Self(Mutex::new(HashMap::new()))
    }
}

impl<T> Cache<T> {
    /// The cached entry, or `load` it once and cache it.
    fn get(&self, name: &str, load: impl FnOnce() -> Result<T>) -> Result<Arc<T>> {
        let mut cache = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(found) = cache.get(name) {
            return Ok(found.clone());
        }
        let loaded = Arc::new(load()?);
        cache.insert(name.to_owned(), loaded.clone());
        Ok(loaded)
    }

    fn clear(&mut self) {
        self.0.get_mut().unwrap_or_else(|p| p.into_inner()).clear();
    }
}

/// Signers loaded from the open vault on first use, by kind (X.509 CA, SSH
/// CA, key) and name. Lives in the unlocked state, so it is dropped on lock
/// and emptied after every write.
#[derive(Default)]
pub struct Keyring {
    x509_cas: Cache<X509Ca>,
    ssh_cas: Cache<SshCa>,
    keys: Cache<Signer>,
}

/// What loading a signer needs besides the vault body.
pub struct KeyringContext<'a> {
    /// The token session, for token keys.
    pub slot: &'a TokenSlot,
    /// The nonce stock, for in-memory P-256 CAs.
    pub nonces: &'a Arc<KeyPool>,
}

impl Keyring {
    /// Forgets everything (after the vault changed).
    pub fn clear(&mut self) {
        self.x509_cas.clear();
        self.ssh_cas.clear();
        self.keys.clear();
    }

    /// The X.509 CA `name`.
    pub fn x509_ca(&self, name: &str, body: &Body, cx: &KeyringContext<'_>) -> Result<Arc<X509Ca>> {
        self.x509_cas.get(name, || {
            let entry = lookup(&body.cas, "CA", name)?;
            if entry.kind != CaKind::X509 {
                return Err(Error::InvalidArgument {
                    field: "ca",
                    reason: format!(
                        "{name:?} is an {} CA, not an X.509 one",
                        entry.kind.as_str()
                    ),
                });
            }
            X509Ca::load(name, entry, cx.slot, cx.nonces)
        })
    }

    /// The SSH CA `name`.
    pub fn ssh_ca(&self, name: &str, body: &Body, cx: &KeyringContext<'_>) -> Result<Arc<SshCa>> {
        self.ssh_cas.get(name, || {
            let entry = lookup(&body.cas, "CA", name)?;
            if entry.kind != CaKind::Ssh {
                return Err(Error::InvalidArgument {
                    field: "ca",
                    reason: format!("{name:?} is an X.509 CA; create one with --kind ssh"),
                });
            }
            let public = entry.public_openssh.as_deref().unwrap_or_default();
            Ok(SshCa {
                signer: Signer::load(
                    &format!("CA {name:?}"),
                    &entry.key,
                    PublicHint::OpenSsh(public),
                    cx.slot,
                )?,
                max_ttl: Duration::from_secs(entry.max_ttl_seconds),
            })
        })
    }

    /// The signing key `name`.
    pub fn key(&self, name: &str, body: &Body, cx: &KeyringContext<'_>) -> Result<Arc<Signer>> {
        self.keys.get(name, || {
            let entry: &KeyEntry = lookup(&body.keys, "key", name)?;
            Signer::load(
                &format!("key {name:?}"),
                &entry.key,
                PublicHint::OpenSsh(&entry.public_openssh),
                cx.slot,
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::signature::{ECDSA_P256_SHA256_ASN1, ED25519, UnparsedPublicKey};

    fn sign_and_verify(signer: &Signer, alg: &'static dyn ring::signature::VerificationAlgorithm) {
        let public = UnparsedPublicKey::new(alg, signer.der_bytes().to_vec());
        for i in 0..4 {
            let msg = format!("tbsCertificate {i}");
            let sig = SigningKey::sign(signer, msg.as_bytes()).expect("signature");
            public.verify(msg.as_bytes(), &sig).expect("verifies");
        }
    }

    fn ca_signer(alg: KeyAlgorithm, pool: &Arc<KeyPool>) -> Signer {
        let key = SoftKey::generate(alg).expect("key");
        let signer = Signer::memory(key);
        let cert = keyholder_pki::create_ca_certificate("t", &signer, Duration::from_secs(3600))
            .expect("certificate");
        signer.with_nonces(&cert, pool)
    }

    fn uses_stock(signer: &Signer) -> bool {
        matches!(
            signer.place,
            Place::Memory {
                prepared: Some(_),
                ..
            }
        )
    }

    #[test]
    fn p256_ca_signs_with_stocked_nonces_and_without() {
        let pool = KeyPool::start(16);
        let signer = ca_signer(KeyAlgorithm::EcdsaP256, &pool);
        assert!(uses_stock(&signer));

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
    fn other_algorithms_sign_without_the_stock() {
        let pool = KeyPool::start(16);
        pool.fill();
        let signer = ca_signer(KeyAlgorithm::Ed25519, &pool);
        assert!(!uses_stock(&signer));
        sign_and_verify(&signer, &ED25519);
        pool.stop();
    }

    #[test]
    fn a_key_that_is_not_the_certificates_signs_without_the_stock() {
        let pool = KeyPool::start(16);
        let other = Signer::memory(SoftKey::generate(KeyAlgorithm::EcdsaP256).expect("key"));
        let cert = keyholder_pki::create_ca_certificate("t", &other, Duration::from_secs(3600))
            .expect("certificate");
        let signer = Signer::memory(SoftKey::generate(KeyAlgorithm::EcdsaP256).expect("key"))
            .with_nonces(&cert, &pool);
        assert!(!uses_stock(&signer));
        pool.stop();
    }

    #[test]
    fn a_token_that_went_away_is_reported_as_the_token_error() {
        use keyholder_token::Backend;
        let token = keyholder_token::software::SoftwareToken::new("t", "1234");
        let desc = token.tokens().expect("tokens").remove(0);
        let mut session = token.open(&desc).expect("session");
        session
            .login(&secrecy::SecretString::from("1234".to_owned()), false)
            .expect("login");
        let key = session
            .generate_p256("ca", keyholder_token::KeyPurpose::Sign)
            .expect("key");
        let slot: TokenSlot = Arc::new(Mutex::new(Some(session)));
        let signer = Signer::token(slot, key).expect("signer");
        let made = signing_result(|| {
            keyholder_pki::create_ca_certificate("t", &signer, Duration::from_secs(60))
        });
        assert!(made.is_ok());
        token.set_present(false);
        let err = signing_result(|| {
            keyholder_pki::create_ca_certificate("t", &signer, Duration::from_secs(60))
        })
        .expect_err("fails without the token");
        assert!(
            matches!(err, Error::Token(keyholder_token::Error::TokenRemoved(_))),
            "{err:?}"
        );
        assert_eq!(tonic::Status::from(err).code(), tonic::Code::Unavailable);
    }
}
