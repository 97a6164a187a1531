//! The C2SP age `p256tag` recipient type, decrypted through a key that
//! never leaves its token.
//!
//! The `age` crate encrypts to `p256tag` recipients (`age::tag::Recipient`)
//! but has no identity for them, and no HPKE library can help: they all want
//! the private key in memory. So the receiver side of HPKE base mode
//! (RFC 9180, DHKEM(P-256, HKDF-SHA256), HKDF-SHA256, ChaCha20Poly1305) is
//! written out here, with the one Diffie-Hellman step delegated to
//! [`KeyAgreement`], which the token implements with `CKM_ECDH1_DERIVE`.
//!
//! Stanza: `-> p256tag <tag> <enc>` with a 32-byte body, where `enc` is the
//! uncompressed ephemeral point and `tag` the first 4 bytes of
//! `HKDF-Extract(salt = "age-encryption.org/p256tag", enc || SHA-256(pk)[..4])`,
//! `pk` being the compressed recipient point. The tag lets a token identity
//! skip stanzas for other tokens without spending a token operation.

use std::sync::Mutex;

use age_core::format::{FileKey, Stanza};
use base64::Engine;
use base64::prelude::BASE64_STANDARD_NO_PAD;
use chacha20poly1305::ChaCha20Poly1305;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use hkdf::Hkdf;
use p256::elliptic_curve::sec1::ToEncodedPoint;
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

/// The stanza type and HPKE `info` string of the recipient type.
const STANZA_TYPE: &str = "p256tag";
const LABEL: &str = "age-encryption.org/p256tag";
const RECIPIENT_HRP: &str = "age1tag";

/// RFC 9180 suite ids: KEM 0x0010 (DHKEM(P-256, HKDF-SHA256)), KDF 0x0001
/// (HKDF-SHA256), AEAD 0x0003 (ChaCha20Poly1305).
const KEM_SUITE: &[u8] = b"KEM\x00\x10";
const HPKE_SUITE: &[u8] = b"HPKE\x00\x10\x00\x01\x00\x03";

/// One Diffie-Hellman on P-256 with a private key held elsewhere (a token).
pub trait KeyAgreement {
    /// The public half of the key.
    fn public_key(&self) -> p256::PublicKey;
    /// The raw X coordinate of `private * peer`.
    fn agree(&self, peer: &p256::PublicKey) -> Result<Zeroizing<[u8; 32]>, keyholder_token::Error>;
}

/// The `age1tag1...` string for a P-256 public key.
pub fn recipient_string(public: &p256::PublicKey) -> String {
    let compressed = public.to_encoded_point(true);
    let hrp = bech32::Hrp::parse_unchecked(RECIPIENT_HRP);
    // Encoding a 33-byte payload with a valid HRP cannot fail; fall back to
    // an empty string rather than panic should the library ever disagree.
    bech32::encode::<bech32::Bech32>(hrp, compressed.as_bytes()).unwrap_or_default()
}

fn static_tag(public: &p256::PublicKey) -> [u8; 4] {
    let digest = Sha256::digest(public.to_encoded_point(true).as_bytes());
    [digest[0], digest[1], digest[2], digest[3]]
}

fn stanza_tag(enc: &[u8], public: &p256::PublicKey) -> [u8; 4] {
    let mut ikm = enc.to_vec();
    ikm.extend_from_slice(&static_tag(public));
    let (prk, _) = Hkdf::<Sha256>::extract(Some(LABEL.as_bytes()), &ikm);
    [prk[0], prk[1], prk[2], prk[3]]
}

/// The public arguments of a `p256tag` stanza.
#[derive(Clone, Debug)]
pub struct TagStanza {
    tag: [u8; 4],
    enc: Vec<u8>,
}

/// Parses a `p256tag` stanza strictly: two arguments, a 4-byte tag and a
/// 65-byte uncompressed point on the curve (canonical unpadded base64 both),
/// and a 32-byte body. Anything else is damage, not "another recipient".
fn check(stanza: &Stanza) -> Result<TagStanza, &'static str> {
    let [tag, enc] = stanza.args.as_slice() else {
        return Err("a p256tag stanza does not have two arguments");
    };
    let tag: [u8; 4] = BASE64_STANDARD_NO_PAD
        .decode(tag)
        .ok()
        .and_then(|t| t.try_into().ok())
        .ok_or("a p256tag stanza's tag is not 4 bytes of canonical base64")?;
    let enc = BASE64_STANDARD_NO_PAD
        .decode(enc)
        .ok()
        .filter(|e| e.len() == 65)
        .ok_or("a p256tag stanza's share is not 65 bytes of canonical base64")?;
    if p256::PublicKey::from_sec1_bytes(&enc).is_err() {
        return Err("a p256tag stanza's share is not a P-256 point");
    }
    if stanza.body.len() != 32 {
        return Err("a p256tag stanza's body is not 32 bytes");
    }
    Ok(TagStanza { tag, enc })
}

fn parse(stanza: &Stanza) -> Option<Result<TagStanza, age::DecryptError>> {
    if stanza.tag != STANZA_TYPE {
        return None;
    }
    // age's error type carries no text; `probe` reports the reason.
    Some(check(stanza).map_err(|_| age::DecryptError::InvalidHeader))
}

/// Whether any `p256tag` stanza in the file header at the start of `file`
/// is addressed to `public`. Costs no token operation.
pub fn addressed_to(stanzas: &[TagStanza], public: &p256::PublicKey) -> bool {
    stanzas.iter().any(|s| stanza_tag(&s.enc, public) == s.tag)
}

/// An identity that unwraps nothing and records the `p256tag` stanzas it is
/// shown, so that the daemon can tell which token a vault is addressed to
/// before logging in. A malformed `p256tag` stanza is recorded as damage.
#[derive(Default)]
pub struct StanzaProbe {
    seen: Mutex<Vec<TagStanza>>,
    malformed: Mutex<Option<&'static str>>,
}

impl StanzaProbe {
    /// The stanzas seen, or why one of them is malformed.
    pub fn into_stanzas(self) -> Result<Vec<TagStanza>, &'static str> {
        let malformed = self
            .malformed
            .into_inner()
            .unwrap_or_else(|p| p.into_inner());
        match malformed {
            Some(why) => Err(why),
            None => Ok(self.seen.into_inner().unwrap_or_else(|p| p.into_inner())),
        }
    }
}

impl age::Identity for StanzaProbe {
    fn unwrap_stanza(&self, stanza: &Stanza) -> Option<Result<FileKey, age::DecryptError>> {
        if stanza.tag != STANZA_TYPE {
            return None;
        }
        match check(stanza) {
            Ok(s) => {
                if let Ok(mut seen) = self.seen.lock() {
                    seen.push(s);
                }
            }
            Err(why) => {
                if let Ok(mut slot) = self.malformed.lock() {
                    slot.get_or_insert(why);
                }
            }
        }
        None
    }
}

/// The token-backed identity for `p256tag` stanzas.
pub struct TagIdentity<'a, K: KeyAgreement> {
    key: &'a K,
    public: p256::PublicKey,
    /// A token failure seen while unwrapping, kept so the caller can report
    /// "token removed" rather than a bare decryption failure.
    token_error: Mutex<Option<keyholder_token::Error>>,
}

impl<'a, K: KeyAgreement> TagIdentity<'a, K> {
    /// An identity over `key`.
    pub fn new(key: &'a K) -> Self {
        Self {
            public: key.public_key(),
            key,
            token_error: Mutex::new(None),
        }
    }

    /// The token error that stopped an unwrap, if any.
    pub fn take_token_error(&self) -> Option<keyholder_token::Error> {
        self.token_error.lock().ok().and_then(|mut e| e.take())
    }
}

impl<K: KeyAgreement> age::Identity for TagIdentity<'_, K> {
    fn unwrap_stanza(&self, stanza: &Stanza) -> Option<Result<FileKey, age::DecryptError>> {
        let parsed = match parse(stanza)? {
            Ok(p) => p,
            Err(e) => return Some(Err(e)),
        };
        if stanza_tag(&parsed.enc, &self.public) != parsed.tag {
            return None;
        }
        let Ok(ephemeral) = p256::PublicKey::from_sec1_bytes(&parsed.enc) else {
            return Some(Err(age::DecryptError::InvalidHeader));
        };
        let dh = match self.key.agree(&ephemeral) {
            Ok(dh) => dh,
            Err(e) => {
                if let Ok(mut slot) = self.token_error.lock() {
                    *slot = Some(e);
                }
                return Some(Err(age::DecryptError::KeyDecryptionFailed));
            }
        };
        let recipient = self.public.to_encoded_point(false);
        Some(
            open(&dh, &parsed.enc, recipient.as_bytes(), &stanza.body)
                .ok_or(age::DecryptError::DecryptionFailed),
        )
    }
}

fn labeled_extract(salt: &[u8], suite: &[u8], label: &[u8], ikm: &[u8]) -> Zeroizing<Vec<u8>> {
    let mut input = Zeroizing::new(Vec::with_capacity(
        7 + suite.len() + label.len() + ikm.len(),
    ));
    input.extend_from_slice(b"HPKE-v1");
    input.extend_from_slice(suite);
    input.extend_from_slice(label);
    input.extend_from_slice(ikm);
    let (prk, _) = Hkdf::<Sha256>::extract(Some(salt), &input);
    Zeroizing::new(prk.to_vec())
}

fn labeled_expand<const L: usize>(
    prk: &[u8],
    suite: &[u8],
    label: &[u8],
    info: &[u8],
) -> Option<Zeroizing<[u8; L]>> {
    let hkdf = Hkdf::<Sha256>::from_prk(prk).ok()?;
    let length = u16::try_from(L).ok()?.to_be_bytes();
    let mut out = Zeroizing::new([0u8; L]);
    hkdf.expand_multi_info(&[&length, b"HPKE-v1", suite, label, info], out.as_mut())
        .ok()?;
    Some(out)
}

/// HPKE `OpenBase` with the DH result already computed.
fn open(dh: &[u8; 32], enc: &[u8], recipient: &[u8], ciphertext: &[u8]) -> Option<FileKey> {
    // DHKEM Decap: ExtractAndExpand(dh, enc || pkRm).
    let eae_prk = labeled_extract(b"", KEM_SUITE, b"eae_prk", dh);
    let mut kem_context = enc.to_vec();
    kem_context.extend_from_slice(recipient);
    let shared = labeled_expand::<32>(&eae_prk, KEM_SUITE, b"shared_secret", &kem_context)?;
    // KeySchedule, mode_base, empty PSK.
    let psk_id_hash = labeled_extract(b"", HPKE_SUITE, b"psk_id_hash", b"");
    let info_hash = labeled_extract(b"", HPKE_SUITE, b"info_hash", LABEL.as_bytes());
    let mut context = vec![0u8];
    context.extend_from_slice(&psk_id_hash);
    context.extend_from_slice(&info_hash);
    let secret = labeled_extract(shared.as_ref(), HPKE_SUITE, b"secret", b"");
    let key = labeled_expand::<32>(&secret, HPKE_SUITE, b"key", &context)?;
    let nonce = labeled_expand::<12>(&secret, HPKE_SUITE, b"base_nonce", &context)?;
    let aead = ChaCha20Poly1305::new_from_slice(key.as_ref()).ok()?;
    let plain = Zeroizing::new(
        aead.decrypt(
            chacha20poly1305::Nonce::from_slice(nonce.as_ref()),
            Payload {
                msg: ciphertext,
                aad: b"",
            },
        )
        .ok()?,
    );
    let bytes: &[u8; 16] = plain.as_slice().try_into().ok()?;
    Some(FileKey::init_with_mut(|k| k.copy_from_slice(bytes)))
}

/// A software P-256 key, for tests and for tools that hold the key in memory.
pub struct SoftwareKey(pub p256::SecretKey);

impl KeyAgreement for SoftwareKey {
    fn public_key(&self) -> p256::PublicKey {
        self.0.public_key()
    }

    fn agree(&self, peer: &p256::PublicKey) -> Result<Zeroizing<[u8; 32]>, keyholder_token::Error> {
        let shared = p256::ecdh::diffie_hellman(self.0.to_nonzero_scalar(), peer.as_affine());
        let mut out = Zeroizing::new([0u8; 32]);
        out.copy_from_slice(shared.raw_secret_bytes());
        Ok(out)
    }
}

/// A token key reached through an open (logged-in) token session.
pub struct TokenAgreement<'a> {
    /// The session to run ECDH in.
    pub session: &'a dyn keyholder_token::Session,
    /// The key on that token.
    pub key: &'a keyholder_token::TokenKey,
}

impl KeyAgreement for TokenAgreement<'_> {
    fn public_key(&self) -> p256::PublicKey {
        self.key.public
    }

    fn agree(&self, peer: &p256::PublicKey) -> Result<Zeroizing<[u8; 32]>, keyholder_token::Error> {
        self.session.ecdh(self.key, peer)
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    use super::*;

    fn encrypt_with_age(recipient: &str, plaintext: &[u8]) -> Vec<u8> {
        let r: age::tag::Recipient = recipient.parse().expect("recipient parses");
        let enc = age::Encryptor::with_recipients(std::iter::once(&r as &dyn age::Recipient))
            .expect("encryptor");
        let mut out = Vec::new();
        let mut w = enc.wrap_output(&mut out).expect("wrap");
        w.write_all(plaintext).expect("write");
        w.finish().expect("finish");
        out
    }

    #[test]
    fn decrypts_what_the_age_crate_encrypts_to_p256tag() {
        let key = SoftwareKey(p256::SecretKey::random(&mut rand::rngs::OsRng));
        let file = encrypt_with_age(&recipient_string(&key.public_key()), b"hello vault");
        let identity = TagIdentity::new(&key);
        let dec = age::Decryptor::new(&file[..]).expect("header");
        let mut r = dec
            .decrypt(std::iter::once(&identity as &dyn age::Identity))
            .expect("decrypts");
        let mut plain = Vec::new();
        r.read_to_end(&mut plain).expect("read");
        assert_eq!(plain, b"hello vault");
    }

    #[test]
    fn a_file_for_another_key_is_not_ours_and_the_probe_tells() {
        let ours = SoftwareKey(p256::SecretKey::random(&mut rand::rngs::OsRng));
        let theirs = SoftwareKey(p256::SecretKey::random(&mut rand::rngs::OsRng));
        let file = encrypt_with_age(&recipient_string(&theirs.public_key()), b"x");
        let identity = TagIdentity::new(&ours);
        let dec = age::Decryptor::new(&file[..]).expect("header");
        assert!(matches!(
            dec.decrypt(std::iter::once(&identity as &dyn age::Identity)),
            Err(age::DecryptError::NoMatchingKeys)
        ));
        let probe = StanzaProbe::default();
        let dec = age::Decryptor::new(&file[..]).expect("header");
        let _ = dec.decrypt(std::iter::once(&probe as &dyn age::Identity));
        let stanzas = probe.into_stanzas().expect("well-formed");
        assert!(addressed_to(&stanzas, &theirs.public_key()));
        assert!(!addressed_to(&stanzas, &ours.public_key()));
    }

    #[test]
    fn recipient_string_round_trips_through_age() {
        let key = SoftwareKey(p256::SecretKey::random(&mut rand::rngs::OsRng));
        let s = recipient_string(&key.public_key());
        assert!(s.starts_with("age1tag1"));
        let parsed: age::tag::Recipient = s.parse().expect("age accepts it");
        assert_eq!(parsed.to_string(), s);
    }
}
