//! Signing keys held in memory: Ed25519, ECDSA P-256, RSA 3072/4096.
//!
//! Keys are stored as PKCS#8 and signed with ring (about 8x faster than the
//! RustCrypto implementations for ECDSA and 4x for RSA on this project's
//! machines), except where ring has no API: signing a pre-computed digest,
//! which goes through RustCrypto (`p256`, `rsa` with blinding). RSA keys are
//! generated with the `rsa` crate, since ring cannot generate them.

use std::fmt;

use ring::rand::SystemRandom;
use ring::signature::{self as rs, KeyPair as _};
use ssh_key::public::KeyData;
use ssh_key::{Algorithm, HashAlg};
use zeroize::Zeroizing;

use crate::{KeyAlgorithm, PkiError, invalid};

type Result<T, E = PkiError> = std::result::Result<T, E>;

/// The PKCS#8 DER of a PKCS#1 `RSA PRIVATE KEY` or SEC1 `EC PRIVATE KEY`
/// PEM, the forms `openssl genrsa -traditional`, `openssl ecparam -genkey`
/// and kubeadm write. Encrypted legacy PEM (`Proc-Type: 4,ENCRYPTED`) is
/// refused: convert it with `openssl pkcs8 -topk8` first.
fn legacy_to_pkcs8(text: &str) -> Result<Zeroizing<Vec<u8>>> {
    if text.contains("Proc-Type: 4,ENCRYPTED") {
        return Err(invalid(
            "key",
            "encrypted legacy PEM keys are not supported; convert with `openssl pkcs8 -topk8`",
        ));
    }
    let der = if text.starts_with("-----BEGIN RSA PRIVATE KEY-----") {
        let key = <rsa::RsaPrivateKey as rsa::pkcs1::DecodeRsaPrivateKey>::from_pkcs1_pem(text)
            .map_err(|e| invalid("key", format!("PKCS#1 RSA key does not parse: {e}")))?;
        pkcs8::EncodePrivateKey::to_pkcs8_der(&key)
    } else {
        let key = p256::SecretKey::from_sec1_pem(text).map_err(|_| {
            invalid(
                "key",
                "SEC1 EC key does not parse (only P-256 keys are supported)",
            )
        })?;
        pkcs8::EncodePrivateKey::to_pkcs8_der(&key)
    }
    .map_err(|e| PkiError::Build(format!("key encoding: {e}")))?;
    Ok(Zeroizing::new(der.as_bytes().to_vec()))
}

/// A private key PEM in any form [`SoftKey`] reads without a passphrase
/// (PKCS#8, PKCS#1 RSA, SEC1 EC), as PKCS#8 PEM: what the vault stores.
pub fn private_key_pkcs8_pem(text: &str) -> Result<Zeroizing<String>> {
    let text = text.trim_start();
    let der = if text.starts_with("-----BEGIN RSA PRIVATE KEY-----")
        || text.starts_with("-----BEGIN EC PRIVATE KEY-----")
    {
        legacy_to_pkcs8(text)?
    } else if text.starts_with("-----BEGIN PRIVATE KEY-----") {
        let (_, doc) =
            pkcs8::SecretDocument::from_pem(text).map_err(|e| invalid("key", e.to_string()))?;
        Zeroizing::new(doc.as_bytes().to_vec())
    } else {
        return Err(invalid(
            "key",
            "expected a PEM private key: BEGIN PRIVATE KEY (PKCS#8), BEGIN RSA PRIVATE KEY (PKCS#1) or BEGIN EC PRIVATE KEY (SEC1)",
        ));
    };
    let doc = pkcs8::SecretDocument::try_from(der.as_slice())
        .map_err(|e| invalid("key", e.to_string()))?;
    doc.to_pem("PRIVATE KEY", pkcs8::LineEnding::LF)
        .map_err(|e| PkiError::Build(e.to_string()))
}

/// A new RSA key of `alg`'s size as PKCS#8 DER (ring signs RSA but cannot
/// generate keys; the rsa crate does). Takes tenths of a second to seconds.
pub(crate) fn rsa_pkcs8(alg: KeyAlgorithm) -> Result<Zeroizing<Vec<u8>>> {
    let bits = alg
        .rsa_bits()
        .ok_or_else(|| PkiError::Build(format!("{} is not RSA", alg.as_str())))?;
    let key = rsa::RsaPrivateKey::new(&mut rand::rngs::OsRng, bits)
        .map_err(|e| PkiError::Build(format!("RSA key generation: {e}")))?;
    let der = pkcs8::EncodePrivateKey::to_pkcs8_der(&key)
        .map_err(|e| PkiError::Build(format!("RSA key encoding: {e}")))?;
    Ok(Zeroizing::new(der.as_bytes().to_vec()))
}

/// Signature algorithms of `Signer.Sign`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SignAlgorithm {
    /// Ed25519 (messages only); 64 raw bytes.
    Ed25519,
    /// ECDSA P-256 with SHA-256; DER `ECDSA-Sig-Value`.
    EcdsaSha256,
    /// RSASSA-PKCS1-v1_5 with SHA-256.
    RsaPkcs1Sha256,
    /// RSASSA-PKCS1-v1_5 with SHA-512.
    RsaPkcs1Sha512,
    /// RSASSA-PSS with SHA-256, MGF1-SHA-256, salt length 32.
    RsaPssSha256,
    /// RSASSA-PSS with SHA-512, MGF1-SHA-512, salt length 64.
    RsaPssSha512,
}

impl SignAlgorithm {
    /// Parses the names in the API; empty picks the key type's default.
    pub fn parse(s: &str, key: KeyAlgorithm) -> Result<Self> {
        Ok(match s {
            "" => match key {
                KeyAlgorithm::Ed25519 => Self::Ed25519,
                KeyAlgorithm::EcdsaP256 => Self::EcdsaSha256,
                KeyAlgorithm::Rsa2048 | KeyAlgorithm::Rsa3072 | KeyAlgorithm::Rsa4096 => {
                    Self::RsaPkcs1Sha256
                }
            },
            "ed25519" => Self::Ed25519,
            "ecdsa-sha256" => Self::EcdsaSha256,
            "rsa-pkcs1-sha256" => Self::RsaPkcs1Sha256,
            "rsa-pkcs1-sha512" => Self::RsaPkcs1Sha512,
            "rsa-pss-sha256" => Self::RsaPssSha256,
            "rsa-pss-sha512" => Self::RsaPssSha512,
            other => {
                return Err(invalid(
                    "algorithm",
                    format!("{other:?} is not a known algorithm"),
                ));
            }
        })
    }

    /// The API name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ed25519 => "ed25519",
            Self::EcdsaSha256 => "ecdsa-sha256",
            Self::RsaPkcs1Sha256 => "rsa-pkcs1-sha256",
            Self::RsaPkcs1Sha512 => "rsa-pkcs1-sha512",
            Self::RsaPssSha256 => "rsa-pss-sha256",
            Self::RsaPssSha512 => "rsa-pss-sha512",
        }
    }

    fn fits(self, key: KeyAlgorithm) -> bool {
        matches!(
            (self, key),
            (Self::Ed25519, KeyAlgorithm::Ed25519)
                | (Self::EcdsaSha256, KeyAlgorithm::EcdsaP256)
                | (
                    Self::RsaPkcs1Sha256
                        | Self::RsaPkcs1Sha512
                        | Self::RsaPssSha256
                        | Self::RsaPssSha512,
                    KeyAlgorithm::Rsa2048 | KeyAlgorithm::Rsa3072 | KeyAlgorithm::Rsa4096
                )
        )
    }

    /// Length of the digest this algorithm signs, when it signs digests.
    pub fn digest_len(self) -> Option<usize> {
        match self {
            Self::Ed25519 => None,
            Self::EcdsaSha256 | Self::RsaPkcs1Sha256 | Self::RsaPssSha256 => Some(32),
            Self::RsaPkcs1Sha512 | Self::RsaPssSha512 => Some(64),
        }
    }
}

enum Inner {
    Ed25519(rs::Ed25519KeyPair),
    EcdsaP256 {
        /// r||s output, for SSH.
        fixed: Box<rs::EcdsaKeyPair>,
        /// DER output, for X.509-style consumers (openssl).
        asn1: Box<rs::EcdsaKeyPair>,
    },
    Rsa(rs::RsaKeyPair),
}

/// A private key in memory. Its PKCS#8 copy is zeroized on drop; ring's
/// internal key schedule is not (ring offers no way to), which
/// docs/threat-model.md records.
pub struct SoftKey {
    kind: KeyAlgorithm,
    pkcs8: Zeroizing<Vec<u8>>,
    inner: Inner,
    ssh_public: KeyData,
    spki_pem: String,
    /// The public key as ring gives it (an Ed25519 key, an uncompressed
    /// P-256 point, or a PKCS#1 RSAPublicKey): what X.509 encoders take.
    public_raw: Vec<u8>,
    rng: SystemRandom,
}

impl fmt::Debug for SoftKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SoftKey")
            .field("kind", &self.kind)
            .finish_non_exhaustive()
    }
}

fn reject(what: &str) -> impl FnOnce(ring::error::KeyRejected) -> PkiError + '_ {
    move |e| invalid("key", format!("{what}: {e}"))
}

impl SoftKey {
    /// A new key of `kind`. RSA generation takes a second or more.
    pub fn generate(kind: KeyAlgorithm) -> Result<Self> {
        let rng = SystemRandom::new();
        let pkcs8 = match kind {
            KeyAlgorithm::Ed25519 => {
                rs::Ed25519KeyPair::generate_pkcs8(&rng).map(|d| d.as_ref().to_vec())
            }
            KeyAlgorithm::EcdsaP256 => {
                rs::EcdsaKeyPair::generate_pkcs8(&rs::ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
                    .map(|d| d.as_ref().to_vec())
            }
            KeyAlgorithm::Rsa2048 | KeyAlgorithm::Rsa3072 | KeyAlgorithm::Rsa4096 => {
                return Self::from_pkcs8_der(rsa_pkcs8(kind)?);
            }
        }
        .map_err(|_| PkiError::Build("key generation failed".into()))?;
        Self::from_pkcs8_der(Zeroizing::new(pkcs8))
    }

    /// Loads a PKCS#8 DER private key of a supported type.
    pub fn from_pkcs8_der(der: Zeroizing<Vec<u8>>) -> Result<Self> {
        let rng = SystemRandom::new();
        // The algorithm OID tells the type; try each parser in turn.
        if let Ok(kp) = rs::Ed25519KeyPair::from_pkcs8_maybe_unchecked(&der) {
            let public: [u8; 32] = kp
                .public_key()
                .as_ref()
                .try_into()
                .map_err(|_| invalid("key", "Ed25519 public key length"))?;
            let vk = ed25519_dalek::VerifyingKey::from_bytes(&public)
                .map_err(|e| invalid("key", e.to_string()))?;
            let spki_pem = pkcs8::EncodePublicKey::to_public_key_pem(&vk, pkcs8::LineEnding::LF)
                .map_err(|e| PkiError::Build(e.to_string()))?;
            let public_raw = kp.public_key().as_ref().to_vec();
            return Ok(Self {
                public_raw,
                kind: KeyAlgorithm::Ed25519,
                ssh_public: KeyData::Ed25519(ssh_key::public::Ed25519PublicKey(public)),
                inner: Inner::Ed25519(kp),
                pkcs8: der,
                spki_pem,
                rng,
            });
        }
        if let Ok(fixed) =
            rs::EcdsaKeyPair::from_pkcs8(&rs::ECDSA_P256_SHA256_FIXED_SIGNING, &der, &rng)
        {
            let asn1 =
                rs::EcdsaKeyPair::from_pkcs8(&rs::ECDSA_P256_SHA256_ASN1_SIGNING, &der, &rng)
                    .map_err(reject("ECDSA key"))?;
            let point = fixed.public_key().as_ref().to_vec();
            let public = p256::PublicKey::from_sec1_bytes(&point)
                .map_err(|_| invalid("key", "bad P-256 point"))?;
            let spki_pem =
                pkcs8::EncodePublicKey::to_public_key_pem(&public, pkcs8::LineEnding::LF)
                    .map_err(|e| PkiError::Build(e.to_string()))?;
            let encoded = p256::EncodedPoint::from_bytes(&point)
                .map_err(|_| invalid("key", "bad P-256 point"))?;
            return Ok(Self {
                public_raw: point.clone(),
                kind: KeyAlgorithm::EcdsaP256,
                ssh_public: KeyData::Ecdsa(ssh_key::public::EcdsaPublicKey::NistP256(encoded)),
                inner: Inner::EcdsaP256 {
                    fixed: Box::new(fixed),
                    asn1: Box::new(asn1),
                },
                pkcs8: der,
                spki_pem,
                rng,
            });
        }
        if let Ok(kp) = rs::RsaKeyPair::from_pkcs8(&der) {
            let bits = kp.public().modulus_len() * 8;
            let kind = KeyAlgorithm::rsa(bits).ok_or_else(|| {
                invalid(
                    "key",
                    format!("RSA keys must be 2048, 3072 or 4096 bits, not {bits}"),
                )
            })?;
            let private = <rsa::RsaPrivateKey as pkcs8::DecodePrivateKey>::from_pkcs8_der(&der)
                .map_err(|e| invalid("key", format!("RSA key: {e}")))?;
            let public = private.to_public_key();
            let spki_pem =
                pkcs8::EncodePublicKey::to_public_key_pem(&public, pkcs8::LineEnding::LF)
                    .map_err(|e| PkiError::Build(e.to_string()))?;
            let ssh_rsa = ssh_key::public::RsaPublicKey::try_from(&public)
                .map_err(|e| PkiError::Build(format!("RSA public key: {e}")))?;
            let public_raw = kp.public().as_ref().to_vec();
            return Ok(Self {
                public_raw,
                kind,
                ssh_public: KeyData::Rsa(ssh_rsa),
                inner: Inner::Rsa(kp),
                pkcs8: der,
                spki_pem,
                rng,
            });
        }
        Err(invalid(
            "key",
            "not an Ed25519, ECDSA P-256 or RSA 2048/3072/4096 PKCS#8 private key",
        ))
    }

    /// Imports an OpenSSH private key file or a PKCS#8 PEM file, either
    /// possibly encrypted with `passphrase`.
    /// Signing keys are RSA 3072 or 4096, never 2048.
    pub fn import(text: &str, passphrase: Option<&str>) -> Result<Self> {
        let key = Self::import_any(text, passphrase)?;
        if key.kind == KeyAlgorithm::Rsa2048 {
            return Err(invalid(
                "key",
                "RSA keys must be 3072 or 4096 bits, not 2048",
            ));
        }
        Ok(key)
    }

    fn import_any(text: &str, passphrase: Option<&str>) -> Result<Self> {
        let text = text.trim_start();
        if text.starts_with("-----BEGIN OPENSSH PRIVATE KEY-----") {
            let mut key = ssh_key::PrivateKey::from_openssh(text)
                .map_err(|e| invalid("key", format!("OpenSSH key does not parse: {e}")))?;
            if key.is_encrypted() {
                let pass = passphrase.ok_or_else(|| {
                    invalid("passphrase", "the key is encrypted; give its passphrase")
                })?;
                key = key
                    .decrypt(pass)
                    .map_err(|_| invalid("passphrase", "does not decrypt the key"))?;
            }
            return Self::from_pkcs8_der(openssh_to_pkcs8(&key)?);
        }
        if text.starts_with("-----BEGIN ENCRYPTED PRIVATE KEY-----") {
            let pass = passphrase.ok_or_else(|| {
                invalid("passphrase", "the key is encrypted; give its passphrase")
            })?;
            let (_, doc) =
                pkcs8::SecretDocument::from_pem(text).map_err(|e| invalid("key", e.to_string()))?;
            let enc = pkcs8::EncryptedPrivateKeyInfo::try_from(doc.as_bytes())
                .map_err(|e| invalid("key", e.to_string()))?;
            let plain = enc
                .decrypt(pass)
                .map_err(|_| invalid("passphrase", "does not decrypt the key"))?;
            return Self::from_pkcs8_der(Zeroizing::new(plain.as_bytes().to_vec()));
        }
        if text.starts_with("-----BEGIN RSA PRIVATE KEY-----")
            || text.starts_with("-----BEGIN EC PRIVATE KEY-----")
        {
            return Self::from_pkcs8_der(legacy_to_pkcs8(text)?);
        }
        if text.starts_with("-----BEGIN PRIVATE KEY-----") {
            let (_, doc) =
                pkcs8::SecretDocument::from_pem(text).map_err(|e| invalid("key", e.to_string()))?;
            return Self::from_pkcs8_der(Zeroizing::new(doc.as_bytes().to_vec()));
        }
        Err(invalid(
            "key",
            "expected an OpenSSH private key, a PKCS#8 PEM (BEGIN PRIVATE KEY / BEGIN ENCRYPTED PRIVATE KEY), a PKCS#1 RSA key (BEGIN RSA PRIVATE KEY) or a SEC1 P-256 key (BEGIN EC PRIVATE KEY)",
        ))
    }

    /// A PKCS#8 PEM private key (`BEGIN PRIVATE KEY`) of any supported
    /// algorithm and size, as the vault stores CA and signing keys.
    pub fn from_pkcs8_pem(pem: &str) -> Result<Self> {
        let (label, doc) = pkcs8::SecretDocument::from_pem(pem.trim_start())
            .map_err(|e| invalid("key", e.to_string()))?;
        if label != "PRIVATE KEY" {
            return Err(invalid(
                "key",
                format!("expected a PKCS#8 PRIVATE KEY, not {label}"),
            ));
        }
        Self::from_pkcs8_der(Zeroizing::new(doc.as_bytes().to_vec()))
    }

    /// The PKCS#8 DER private key.
    pub fn pkcs8_der(&self) -> &[u8] {
        &self.pkcs8
    }

    /// The public key as ring gives it: 32 Ed25519 bytes, an uncompressed
    /// P-256 point, or a PKCS#1 RSAPublicKey (what rcgen's `der_bytes` is).
    pub fn public_raw(&self) -> &[u8] {
        &self.public_raw
    }

    /// The key type.
    pub fn kind(&self) -> KeyAlgorithm {
        self.kind
    }

    /// PKCS#8 PEM, for storage in the vault.
    pub fn pkcs8_pem(&self) -> Result<Zeroizing<String>> {
        let doc = pkcs8::SecretDocument::try_from(self.pkcs8.as_slice())
            .map_err(|e| PkiError::Build(e.to_string()))?;
        doc.to_pem("PRIVATE KEY", pkcs8::LineEnding::LF)
            .map_err(|e| PkiError::Build(e.to_string()))
    }

    /// The SSH public key.
    pub fn ssh_public(&self) -> &KeyData {
        &self.ssh_public
    }

    /// The public key as SubjectPublicKeyInfo PEM (what `openssl` reads).
    pub fn public_pem(&self) -> &str {
        &self.spki_pem
    }

    /// An SSH signature over `data`. For RSA, `flags` picks the hash
    /// (`0x02` rsa-sha2-256, `0x04` rsa-sha2-512); SHA-1 `ssh-rsa`
    /// signatures are refused.
    pub fn sign_ssh(&self, data: &[u8], flags: u32) -> Result<ssh_key::Signature> {
        let build = |alg: Algorithm, bytes: Vec<u8>| {
            ssh_key::Signature::new(alg, bytes).map_err(|e| PkiError::Build(e.to_string()))
        };
        match &self.inner {
            Inner::Ed25519(kp) => build(Algorithm::Ed25519, kp.sign(data).as_ref().to_vec()),
            Inner::EcdsaP256 { fixed, .. } => {
                let sig = fixed
                    .sign(&self.rng, data)
                    .map_err(|_| PkiError::Build("ECDSA signing failed".into()))?;
                ecdsa_ssh_signature(sig.as_ref())
            }
            Inner::Rsa(kp) => {
                let (hash, padding): (HashAlg, &'static dyn rs::RsaEncoding) = if flags & 0x04 != 0
                {
                    (HashAlg::Sha512, &rs::RSA_PKCS1_SHA512)
                } else if flags & 0x02 != 0 {
                    (HashAlg::Sha256, &rs::RSA_PKCS1_SHA256)
                } else {
                    return Err(invalid(
                        "flags",
                        "ssh-rsa (SHA-1) signatures are refused; ask for rsa-sha2-256 or rsa-sha2-512",
                    ));
                };
                let mut sig = vec![0u8; kp.public().modulus_len()];
                kp.sign(padding, &self.rng, data, &mut sig)
                    .map_err(|_| PkiError::Build("RSA signing failed".into()))?;
                build(Algorithm::Rsa { hash: Some(hash) }, sig)
            }
        }
    }

    /// A signature for `Signer.Sign`: over `input`, or over the digest
    /// `input` when `prehashed`.
    pub fn sign(&self, alg: SignAlgorithm, input: &[u8], prehashed: bool) -> Result<Vec<u8>> {
        if !alg.fits(self.kind) {
            return Err(invalid(
                "algorithm",
                format!("{alg:?} does not fit a {} key", self.kind.as_str()),
            ));
        }
        if prehashed {
            return self.sign_digest(alg, input);
        }
        let fail = |_| PkiError::Build("signing failed".into());
        match (&self.inner, alg) {
            (Inner::Ed25519(kp), _) => Ok(kp.sign(input).as_ref().to_vec()),
            (Inner::EcdsaP256 { asn1, .. }, _) => {
                Ok(asn1.sign(&self.rng, input).map_err(fail)?.as_ref().to_vec())
            }
            (Inner::Rsa(kp), alg) => {
                let padding: &'static dyn rs::RsaEncoding = match alg {
                    SignAlgorithm::RsaPkcs1Sha512 => &rs::RSA_PKCS1_SHA512,
                    SignAlgorithm::RsaPssSha256 => &rs::RSA_PSS_SHA256,
                    SignAlgorithm::RsaPssSha512 => &rs::RSA_PSS_SHA512,
                    _ => &rs::RSA_PKCS1_SHA256,
                };
                let mut sig = vec![0u8; kp.public().modulus_len()];
                kp.sign(padding, &self.rng, input, &mut sig).map_err(fail)?;
                Ok(sig)
            }
        }
    }

    fn sign_digest(&self, alg: SignAlgorithm, digest: &[u8]) -> Result<Vec<u8>> {
        let Some(len) = alg.digest_len() else {
            return Err(invalid("prehashed", "Ed25519 signs messages, not digests"));
        };
        if digest.len() != len {
            return Err(invalid(
                "data",
                format!("a digest for {alg:?} is {len} bytes, not {}", digest.len()),
            ));
        }
        let build = |e: String| PkiError::Build(e);
        match self.kind {
            KeyAlgorithm::EcdsaP256 => {
                let key = <p256::ecdsa::SigningKey as pkcs8::DecodePrivateKey>::from_pkcs8_der(
                    &self.pkcs8,
                )
                .map_err(|e| build(e.to_string()))?;
                let sig: p256::ecdsa::Signature =
                    signature::hazmat::PrehashSigner::sign_prehash(&key, digest)
                        .map_err(|e| build(e.to_string()))?;
                Ok(sig.to_der().as_bytes().to_vec())
            }
            _ => {
                let key =
                    <rsa::RsaPrivateKey as pkcs8::DecodePrivateKey>::from_pkcs8_der(&self.pkcs8)
                        .map_err(|e| build(e.to_string()))?;
                let mut rng = rand::rngs::OsRng;
                // With an RNG the rsa crate blinds the private-key operation.
                let sig = match alg {
                    SignAlgorithm::RsaPkcs1Sha256 => key.sign_with_rng(
                        &mut rng,
                        rsa::Pkcs1v15Sign::new::<sha2::Sha256>(),
                        digest,
                    ),
                    SignAlgorithm::RsaPkcs1Sha512 => key.sign_with_rng(
                        &mut rng,
                        rsa::Pkcs1v15Sign::new::<sha2::Sha512>(),
                        digest,
                    ),
                    SignAlgorithm::RsaPssSha256 => key.sign_with_rng(
                        &mut rng,
                        rsa::Pss::new_with_salt::<sha2::Sha256>(32),
                        digest,
                    ),
                    _ => key.sign_with_rng(
                        &mut rng,
                        rsa::Pss::new_with_salt::<sha2::Sha512>(64),
                        digest,
                    ),
                };
                sig.map_err(|e| build(e.to_string()))
            }
        }
    }
}

/// The SSH form of a P-256 ECDSA signature given as r||s.
pub fn ecdsa_ssh_signature(rs_bytes: &[u8]) -> Result<ssh_key::Signature> {
    let sig = p256::ecdsa::Signature::from_slice(rs_bytes)
        .map_err(|_| PkiError::Build("ECDSA signature length".into()))?;
    ssh_key::Signature::try_from(sig).map_err(|e| PkiError::Build(e.to_string()))
}

fn openssh_to_pkcs8(key: &ssh_key::PrivateKey) -> Result<Zeroizing<Vec<u8>>> {
    use ssh_key::private::KeypairData;
    let der = match key.key_data() {
        KeypairData::Ed25519(kp) => {
            let sk = ed25519_dalek::SigningKey::from_bytes(&kp.private.to_bytes());
            pkcs8::EncodePrivateKey::to_pkcs8_der(&sk)
        }
        KeypairData::Ecdsa(ssh_key::private::EcdsaKeypair::NistP256 { private, .. }) => {
            let sk = p256::SecretKey::from_slice(private.as_slice())
                .map_err(|_| invalid("key", "bad P-256 private key"))?;
            pkcs8::EncodePrivateKey::to_pkcs8_der(&sk)
        }
        KeypairData::Rsa(kp) => {
            let big = |m: &ssh_key::Mpint| {
                m.as_positive_bytes()
                    .map(rsa::BigUint::from_bytes_be)
                    .ok_or_else(|| invalid("key", "bad RSA component"))
            };
            let key = rsa::RsaPrivateKey::from_components(
                big(&kp.public.n)?,
                big(&kp.public.e)?,
                big(&kp.private.d)?,
                vec![big(&kp.private.p)?, big(&kp.private.q)?],
            )
            .map_err(|e| invalid("key", format!("RSA key: {e}")))?;
            pkcs8::EncodePrivateKey::to_pkcs8_der(&key)
        }
        _ => {
            return Err(invalid(
                "key",
                format!(
                    "{} keys are not supported; use Ed25519, ECDSA P-256 or RSA",
                    key.algorithm()
                ),
            ));
        }
    }
    .map_err(|e| PkiError::Build(e.to_string()))?;
    Ok(Zeroizing::new(der.as_bytes().to_vec()))
}

/// The OpenSSH one-line public key (`ssh-ed25519 AAAA... comment`).
pub fn openssh_public(key: &KeyData, comment: &str) -> Result<String> {
    let public = ssh_key::PublicKey::new(key.clone(), comment);
    public
        .to_openssh()
        .map_err(|e| PkiError::Build(e.to_string()))
}

/// The SSH wire encoding of a public key (the agent's key blob).
pub fn ssh_blob(key: &KeyData) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    ssh_encoding::Encode::encode(key, &mut out).map_err(|e| PkiError::Build(e.to_string()))?;
    Ok(out)
}

/// The SSH wire encoding of a signature.
pub fn ssh_signature_blob(sig: &ssh_key::Signature) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    ssh_encoding::Encode::encode(sig, &mut out).map_err(|e| PkiError::Build(e.to_string()))?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use signature::Verifier;

    #[test]
    fn ssh_signatures_verify_for_every_type() {
        for kind in [
            KeyAlgorithm::Ed25519,
            KeyAlgorithm::EcdsaP256,
            KeyAlgorithm::Rsa3072,
        ] {
            let key = SoftKey::generate(kind).unwrap();
            let sig = key.sign_ssh(b"hello", 0x02).unwrap();
            key.ssh_public().verify(b"hello", &sig).unwrap();
            assert!(key.ssh_public().verify(b"hellO", &sig).is_err());
            let reloaded = SoftKey::import(&key.pkcs8_pem().unwrap(), None).unwrap();
            assert_eq!(reloaded.ssh_public(), key.ssh_public());
        }
    }

    #[test]
    fn rsa_flags_pick_the_hash_and_sha1_is_refused() {
        let key = SoftKey::generate(KeyAlgorithm::Rsa3072).unwrap();
        assert_eq!(
            key.sign_ssh(b"x", 0x04).unwrap().algorithm().as_str(),
            "rsa-sha2-512"
        );
        assert_eq!(
            key.sign_ssh(b"x", 0x02).unwrap().algorithm().as_str(),
            "rsa-sha2-256"
        );
        assert!(key.sign_ssh(b"x", 0).is_err());
    }

    #[test]
    fn openssh_keys_import_with_and_without_passphrase() {
        let mut rng = rand::rngs::OsRng;
        let key = ssh_key::PrivateKey::random(&mut rng, ssh_key::Algorithm::Ed25519).unwrap();
        let plain = key.to_openssh(ssh_key::LineEnding::LF).unwrap();
        let imported = SoftKey::import(&plain, None).unwrap();
        assert_eq!(imported.ssh_public(), key.public_key().key_data());
        let enc = key
            .encrypt(&mut rng, "s3cret")
            .unwrap()
            .to_openssh(ssh_key::LineEnding::LF)
            .unwrap();
        assert!(SoftKey::import(&enc, None).is_err());
        assert!(SoftKey::import(&enc, Some("wrong")).is_err());
        assert_eq!(
            SoftKey::import(&enc, Some("s3cret")).unwrap().ssh_public(),
            key.public_key().key_data()
        );
        assert!(SoftKey::import("garbage", None).is_err());
    }
}
