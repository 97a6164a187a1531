//! The Keyholder vault: one age file, opened through a token.
//!
//! The file is standard age, encrypted to the token's P-256 key as a C2SP
//! `p256tag` recipient (see [`tag`]) and optionally to recovery X25519
//! recipients, so `age -d -i recovery.key vault.age` prints the JSON document
//! described in [`document`] and `docs/vault-format.md`.
//!
//! age does not say who wrote a file: anyone who knows the token's public key
//! can encrypt a vault to it. So the document carries an HMAC over its body,
//! keyed by a secret only the token can compute: the ECDH between the token
//! key and a per-vault point obtained by hashing the vault id to the curve
//! (RFC 9380), whose discrete log nobody knows. Opening a vault therefore
//! costs exactly two token operations (the unwrap and the MAC key), and
//! writing costs none (the MAC key stays in memory, zeroized on drop).
//!
//! This crate does not talk to the network or decide policy; storage is
//! behind the [`storage::Storage`] trait.

#![forbid(unsafe_code)]

pub mod cluster_pki;
pub mod document;
pub mod storage;
pub mod tag;

use std::io::{Read, Write};
use std::sync::atomic::Ordering;

use base64::Engine;
use base64::prelude::BASE64_STANDARD;
use hmac::{Hmac, Mac};
use p256::elliptic_curve::hash2curve::{ExpandMsgXmd, GroupDigest};
use p256::elliptic_curve::sec1::ToEncodedPoint;
use sha2::Sha256;
use zeroize::Zeroizing;

pub use document::{
    AuditHead, Body, CaEntry, CaKey, CaKind, ClusterEntry, KeyEntry, KeyUsage, OldValue,
    PivKeyRecord, Recipients, SecretEntry, SshCertificateEntry, TeamKey, TeamKeys, TokenRecipient,
};
pub use storage::{BACKUPS_KEPT, FileStorage, Revision, Storage, StorageError, export_history};
pub use tag::{
    KeyAgreement, SoftwareKey, TagStanza, TokenAgreement, addressed_to, recipient_string,
};

/// Domain separation tag for hashing the vault id to a P-256 point.
const AUTH_POINT_DST: &[u8] = b"keyholder-vault-auth-point-v1_P256_XMD:SHA-256_SSWU_RO_";
/// HKDF salt for the MAC key.
const AUTH_KEY_SALT: &[u8] = b"keyholder-vault-auth-key-v1";
/// HKDF salt of the audit anchor key (a label distinct from every other use
/// of the MAC key).
const AUDIT_KEY_SALT: &[u8] = b"keyholder-audit-anchor-key-v1";
/// Prefix of the MACed message.
const MAC_CONTEXT: &[u8] = b"keyholder-vault-mac-v1\n";
/// The MAC algorithm name written in the file.
const MAC_ALG: &str = "HMAC-SHA256";

/// Why a vault could not be created, opened or sealed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VaultError {
    /// Not an age file, or the file is truncated or corrupt.
    #[error(
        "the vault file is damaged: {0}; restore the newest <vault>.gen-N backup or recover with the recovery identity"
    )]
    Damaged(String),
    /// The file is not encrypted to this token.
    #[error("the vault is not encrypted to this token's Keyholder key")]
    NotForThisToken,
    /// The MAC does not verify: someone other than the token holder wrote the file.
    #[error(
        "the vault was not written by the holder of this token (authentication failed); refusing to use it"
    )]
    NotAuthentic,
    /// Written by a newer Keyholder.
    #[error("the vault has format version {0}; this Keyholder reads versions 1 to 4")]
    UnsupportedVersion(u32),
    /// A recipient string did not parse.
    #[error("invalid recipient {0:?}: expected an X25519 age recipient (age1...)")]
    InvalidRecipient(String),
    /// The token failed during the operation.
    #[error(transparent)]
    Token(#[from] keyholder_token::Error),
    /// Encrypting failed.
    #[error("cannot encrypt the vault: {0}")]
    Encrypt(String),
    /// The body lists no token: no token may open it (every one was
    /// revoked, or the file was made by hand).
    #[error(
        "the vault lists no enrolled token, so no token may open it; open a copy that lists \
         one, or recover it with the recovery identity"
    )]
    NoTokens,
}

/// The age file's `p256tag` stanzas, read without any token operation; see
/// [`tag::addressed_to`]. A malformed `p256tag` stanza is damage.
pub fn probe(file: &[u8]) -> Result<Vec<TagStanza>, VaultError> {
    let decryptor = age::Decryptor::new(file).map_err(damaged)?;
    let probe = tag::StanzaProbe::default();
    let _ = decryptor.decrypt(std::iter::once(&probe as &dyn age::Identity));
    probe
        .into_stanzas()
        .map_err(|why| VaultError::Damaged(why.to_owned()))
}

/// Checks that `r` is an X25519 age recipient (`age1...`), as recovery
/// recipients must be.
pub fn check_recovery_recipient(r: &str) -> Result<(), VaultError> {
    r.parse::<age::x25519::Recipient>()
        .map(|_| ())
        .map_err(|_| VaultError::InvalidRecipient(r.to_owned()))
}

fn damaged(e: age::DecryptError) -> VaultError {
    VaultError::Damaged(match e {
        age::DecryptError::Io(ref io) if io.kind() == std::io::ErrorKind::UnexpectedEof => {
            "the file is truncated".into()
        }
        other => other.to_string(),
    })
}

/// The point whose ECDH with the token key yields the MAC secret.
fn auth_point(vault_id: &str) -> Result<p256::PublicKey, VaultError> {
    let point = p256::NistP256::hash_from_bytes::<ExpandMsgXmd<Sha256>>(
        &[vault_id.as_bytes()],
        &[AUTH_POINT_DST],
    )
    .map_err(|_| VaultError::Damaged("vault id cannot be hashed to a point".into()))?;
    p256::PublicKey::from_affine(point.to_affine())
        .map_err(|_| VaultError::Damaged("vault id hashes to the identity point".into()))
}

fn mac_key<K: KeyAgreement>(key: &K, vault_id: &str) -> Result<Zeroizing<[u8; 32]>, VaultError> {
    let dh = key.agree(&auth_point(vault_id)?)?;
    let mut info = vault_id.as_bytes().to_vec();
    info.extend_from_slice(key.public_key().to_encoded_point(true).as_bytes());
    let hk = hkdf::Hkdf::<Sha256>::new(Some(AUTH_KEY_SALT), dh.as_ref());
    let mut out = Zeroizing::new([0u8; 32]);
    hk.expand(&info, out.as_mut())
        .map_err(|_| VaultError::Encrypt("HKDF output length".into()))?;
    Ok(out)
}

/// The MAC over a body still to be fed in.
fn mac_init(key: &[u8; 32], vault_id: &str) -> Hmac<Sha256> {
    // HMAC accepts keys of any length; a 32-byte key cannot be refused.
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(key).unwrap_or_else(|_| unreachable!());
    m.update(MAC_CONTEXT);
    m.update(vault_id.as_bytes());
    m.update(b"\n");
    m
}

fn mac(key: &[u8; 32], vault_id: &str, body: &[u8]) -> Hmac<Sha256> {
    let mut m = mac_init(key, vault_id);
    m.update(body);
    m
}

/// The MAC key of the token `key` for the vault `vault_id` (one token
/// operation), as the vault's team keys keep it: what the token checks its
/// authentication entry with.
pub fn team_key<K: KeyAgreement>(key: &K, vault_id: &str) -> Result<TeamKey, VaultError> {
    let k = mac_key(key, vault_id)?;
    Ok(TeamKey(Zeroizing::new(BASE64_STANDARD.encode(&k[..]))))
}

/// An open vault: the decrypted body and what is needed to write it back.
pub struct OpenVault {
    /// The decrypted, authenticated content.
    pub body: Body,
    vault_id: String,
    token_recipient: String,
    mac_key: Zeroizing<[u8; 32]>,
    /// The body's recipients, parsed once when the vault is opened or
    /// created; `None` if one did not parse (reported at the next write).
    parsed: Option<ParsedRecipients>,
    /// The plaintext's size at the last read or write: the next write's
    /// buffer is sized from it, so it is rarely reallocated (which would
    /// leave a copy of the plaintext in freed memory).
    size_hint: std::sync::atomic::AtomicUsize,
}

/// Recipients parsed for encryption, with the list they were parsed from.
struct ParsedRecipients {
    from: Recipients,
    list: Vec<Box<dyn age::Recipient + Send + Sync>>,
}

impl ParsedRecipients {
    fn parse(recipients: &Recipients) -> Result<Self, VaultError> {
        let mut list: Vec<Box<dyn age::Recipient + Send + Sync>> = Vec::new();
        for t in &recipients.tokens {
            let r: age::tag::Recipient = t
                .recipient
                .parse()
                .map_err(|_| VaultError::InvalidRecipient(t.recipient.clone()))?;
            list.push(Box::new(r));
        }
        for r in &recipients.recovery {
            let x: age::x25519::Recipient = r
                .parse()
                .map_err(|_| VaultError::InvalidRecipient(r.clone()))?;
            list.push(Box::new(x));
        }
        Ok(Self {
            from: recipients.clone(),
            list,
        })
    }
}

impl std::fmt::Debug for OpenVault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenVault")
            .field("vault_id", &self.vault_id)
            .field("body", &self.body)
            .finish_non_exhaustive()
    }
}

impl OpenVault {
    /// A new, empty vault for the token `key` (one token operation), at
    /// generation 0: seal it with [`OpenVault::next`] before storing.
    pub fn create<K: KeyAgreement>(
        key: &K,
        token: TokenRecipient,
        recovery: Vec<String>,
    ) -> Result<Self, VaultError> {
        for r in &recovery {
            check_recovery_recipient(r)?;
        }
        let mut id = [0u8; 16];
        rand::Rng::fill(&mut rand::rngs::OsRng, &mut id);
        let vault_id: String = id.iter().map(|b| format!("{b:02x}")).collect();
        let token_recipient = recipient_string(&key.public_key());
        let mac_key = mac_key(key, &vault_id)?;
        let now = document::now_rfc3339();
        let recipients = Recipients {
            tokens: vec![token],
            recovery,
        };
        let parsed = Some(ParsedRecipients::parse(&recipients)?);
        Ok(Self {
            body: Body {
                generation: 0,
                created_at: now.clone(),
                updated_at: now,
                recipients,
                secrets: Default::default(),
                cas: Default::default(),
                clusters: Default::default(),
                keys: Default::default(),
                ssh_certificates: Default::default(),
                rollback_protection: true,
                policy: None,
                audit_head: None,
                cluster_pki: Default::default(),
                team_keys: None,
            },
            vault_id,
            token_recipient,
            mac_key,
            parsed,
            size_hint: Default::default(),
        })
    }

    /// Decrypts and authenticates `file` with the token `key`: two token
    /// operations.
    pub fn open<K: KeyAgreement>(file: &[u8], key: &K) -> Result<Self, VaultError> {
        let decryptor = age::Decryptor::new(file).map_err(damaged)?;
        let identity = tag::TagIdentity::new(key);
        let mut reader = match decryptor.decrypt(std::iter::once(&identity as &dyn age::Identity)) {
            Ok(r) => r,
            Err(age::DecryptError::NoMatchingKeys) => return Err(VaultError::NotForThisToken),
            Err(e) => {
                return Err(match identity.take_token_error() {
                    Some(t) => VaultError::Token(t),
                    None => damaged(e),
                });
            }
        };
        let mut plain = Zeroizing::new(Vec::with_capacity(file.len()));
        reader
            .read_to_end(&mut plain)
            .map_err(|e| damaged(age::DecryptError::Io(e)))?;
        let text = std::str::from_utf8(&plain)
            .map_err(|_| VaultError::Damaged("the document is not UTF-8".into()))?;
        let envelope: document::EnvelopeIn<'_> = serde_json::from_str(text)
            .map_err(|e| VaultError::Damaged(format!("not a Keyholder vault document ({e})")))?;
        if envelope.format != document::FORMAT {
            return Err(VaultError::Damaged(format!(
                "format is {:?}, not {:?}",
                envelope.format,
                document::FORMAT
            )));
        }
        if !(document::MIN_VERSION..=document::TEAM_VERSION).contains(&envelope.version) {
            return Err(VaultError::UnsupportedVersion(envelope.version));
        }
        let token_recipient = recipient_string(&key.public_key());
        let tag = envelope
            .auth
            .iter()
            .find(|a| a.recipient == token_recipient && a.alg == MAC_ALG)
            .ok_or(VaultError::NotAuthentic)?;
        let expected = BASE64_STANDARD
            .decode(&tag.mac)
            .map_err(|_| VaultError::NotAuthentic)?;
        let mac_key = mac_key(key, &envelope.vault_id)?;
        mac(&mac_key, &envelope.vault_id, envelope.body.get().as_bytes())
            .verify_slice(&expected)
            .map_err(|_| VaultError::NotAuthentic)?;
        let body: Body = serde_json::from_str(envelope.body.get())
            .map_err(|e| VaultError::Damaged(format!("body does not parse ({e})")))?;
        if body.recipients.tokens.is_empty() {
            return Err(VaultError::NoTokens);
        }
        let parsed = ParsedRecipients::parse(&body.recipients).ok();
        Ok(Self {
            body,
            vault_id: envelope.vault_id,
            token_recipient,
            mac_key,
            parsed,
            size_hint: plain.len().into(),
        })
    }

    /// The key that anchors the audit log (docs/audit.md): derived from the
    /// vault's MAC key, so it exists only while the vault is open, and only
    /// the token's holder can make it.
    pub fn audit_key(&self) -> Zeroizing<[u8; 32]> {
        // A vault with several tokens keeps the key it had before the
        // second token came, so the chain verifies whichever token opens it.
        if let Some(key) = self
            .body
            .team_keys
            .as_ref()
            .and_then(|t| decode_key(&t.audit))
        {
            return key;
        }
        let hk = hkdf::Hkdf::<Sha256>::new(Some(AUDIT_KEY_SALT), self.mac_key.as_ref());
        let mut out = Zeroizing::new([0u8; 32]);
        // 32 bytes is far below HKDF-SHA256's limit of 8160.
        if hk.expand(self.vault_id.as_bytes(), out.as_mut()).is_err() {
            unreachable!("HKDF output length");
        }
        out
    }

    /// The vault's id (random, fixed at creation).
    pub fn vault_id(&self) -> &str {
        &self.vault_id
    }

    /// The token recipient this vault was opened with.
    pub fn token_recipient(&self) -> &str {
        &self.token_recipient
    }

    /// The body's entry for the token this vault was opened with.
    pub fn own_entry(&self) -> Option<&TokenRecipient> {
        self.body
            .recipients
            .tokens
            .iter()
            .find(|t| t.recipient == self.token_recipient)
    }

    /// The MAC key of another token `key` for this vault (one token
    /// operation on that token): what it checks this vault's
    /// authentication entry with once enrolled.
    pub fn mac_key_of<K: KeyAgreement>(&self, key: &K) -> Result<TeamKey, VaultError> {
        team_key(key, &self.vault_id)
    }

    /// The team keys of `body` with `recipient`'s key added: on the first
    /// enrolment, with this token's own MAC key and the audit key the vault
    /// had so far, so neither changes for the tokens already there.
    pub fn team_keys_with(&self, body: &Body, recipient: &str, key: TeamKey) -> TeamKeys {
        let mut team = body.team_keys.clone().unwrap_or_else(|| TeamKeys {
            audit: Zeroizing::new(BASE64_STANDARD.encode(&self.audit_key()[..])),
            tokens: Default::default(),
        });
        team.tokens
            .entry(self.token_recipient.clone())
            .or_insert_with(|| TeamKey(Zeroizing::new(BASE64_STANDARD.encode(&self.mac_key[..]))));
        team.tokens.insert(recipient.to_owned(), key);
        team
    }

    /// The MAC key of every token of `body` this vault can write an
    /// authentication entry for: its own, and those of the team keys.
    fn mac_keys(&self, body: &Body) -> Result<Vec<MacKey>, VaultError> {
        let mut out = Vec::with_capacity(body.recipients.tokens.len().max(1));
        let Some(team) = &body.team_keys else {
            // A single-token vault: the entry of the token that opened it.
            out.push((self.token_recipient.clone(), self.mac_key.clone()));
            return Ok(out);
        };
        for t in &body.recipients.tokens {
            if t.recipient == self.token_recipient {
                out.push((t.recipient.clone(), self.mac_key.clone()));
            } else if let Some(k) = team.tokens.get(&t.recipient) {
                let key = decode_key(&k.0).ok_or_else(|| {
                    VaultError::Encrypt(format!("the MAC key of {} is malformed", t.recipient))
                })?;
                out.push((t.recipient.clone(), key));
            }
        }
        Ok(out)
    }

    /// Encrypts `body` with generation and update time set for the next
    /// write. Returns the file bytes; `body` is left as it was sealed.
    pub fn next(&self, body: &mut Body) -> Result<Vec<u8>, VaultError> {
        body.generation = self.body.generation + 1;
        body.updated_at = document::now_rfc3339();
        self.seal(body)
    }

    /// Encrypts `body` as-is.
    ///
    /// One pass, and the whole plaintext never sits in one buffer: the
    /// document is serialized into a small staging buffer that is flushed,
    /// 64 KiB at a time, into the MAC (while the body is being written) and
    /// into age's encryptor. The body is indented one level so the whole
    /// file reads naturally after `age -d`; the MAC covers the body's bytes
    /// exactly as they stand there.
    pub fn seal(&self, body: &Body) -> Result<Vec<u8>, VaultError> {
        let parsed;
        let recipients = match &self.parsed {
            Some(p) if p.from == body.recipients => &p.list,
            // The body names other recipients than the vault was opened
            // with (or one did not parse): parse them for this write.
            _ => {
                parsed = ParsedRecipients::parse(&body.recipients)?;
                &parsed.list
            }
        };
        let encryptor = age::Encryptor::with_recipients(
            recipients.iter().map(|b| b.as_ref() as &dyn age::Recipient),
        )
        .map_err(encrypt_err)?;
        // age adds a 16-byte tag per 64 KiB chunk and a header: sized from
        // the last write so the output is rarely reallocated.
        let hint = self.size_hint.load(Ordering::Relaxed);
        let mut out = Vec::with_capacity(hint.saturating_add(hint / 64) + 4096);
        let mut age_writer = encryptor.wrap_output(&mut out).map_err(encrypt_err)?;
        let plain_len = if hint < PIPELINE_FROM {
            let mut doc = Staged::new(&mut age_writer);
            self.write_document(&mut doc, body)?;
            doc.finish().map_err(encrypt_err)?.1
        } else {
            // Serializing and MACing on this thread, encrypting on another:
            // the two halves of a large write's CPU work overlap.
            std::thread::scope(|scope| {
                let (tx, rx) = std::sync::mpsc::sync_channel::<Zeroizing<Vec<u8>>>(4);
                let encrypting = scope.spawn(|| {
                    for block in rx {
                        age_writer.write_all(&block)?;
                    }
                    Ok::<_, std::io::Error>(())
                });
                // The sender is dropped at the end of this block whatever
                // happened, which closes the channel and ends the encrypting
                // loop: the join below cannot wait forever.
                let written = {
                    let mut doc = Staged::new(Blocks(tx));
                    self.write_document(&mut doc, body)
                        .and_then(|()| doc.finish().map_err(encrypt_err))
                        .map(|(_, total)| total)
                };
                let encrypted = encrypting
                    .join()
                    .map_err(|_| VaultError::Encrypt("the encrypting thread panicked".into()))?;
                // The encryptor's own error explains a closed channel.
                encrypted.map_err(encrypt_err)?;
                written
            })?
        };
        age_writer.finish().map_err(encrypt_err)?;
        self.size_hint.store(plain_len, Ordering::Relaxed);
        Ok(out)
    }

    /// Writes the document (head, MACed body, MAC, tail) into `doc`.
    fn write_document<W: Write>(&self, doc: &mut Staged<W>, body: &Body) -> Result<(), VaultError> {
        let keys = self.mac_keys(body)?;
        let version = if body.team_keys.is_some() {
            document::TEAM_VERSION
        } else {
            document::VERSION
        };
        document::write_head(doc, &self.vault_id, version).map_err(encrypt_err)?;
        doc.start_macs(
            keys.iter()
                .map(|(_, k)| mac_init(k, &self.vault_id))
                .collect(),
        )
        .map_err(encrypt_err)?;
        document::write_body(doc, body).map_err(encrypt_err)?;
        let macs = doc.take_macs().map_err(encrypt_err)?;
        let auth: Vec<document::AuthTag> = keys
            .into_iter()
            .zip(macs)
            .map(|((recipient, _), m)| document::AuthTag {
                recipient,
                alg: MAC_ALG.into(),
                mac: BASE64_STANDARD.encode(m.finalize().into_bytes()),
            })
            .collect();
        document::write_tail(doc, &auth).map_err(encrypt_err)
    }
}

/// From this plaintext size on (as of the last write), encryption runs on a
/// thread of its own, beside serialization.
const PIPELINE_FROM: usize = 512 * 1024;

/// Passes each block written to it over a channel, as a wiped buffer.
struct Blocks(std::sync::mpsc::SyncSender<Zeroizing<Vec<u8>>>);

impl Write for Blocks {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.0
            .send(Zeroizing::new(data.to_vec()))
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::BrokenPipe))?;
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A token's recipient and its MAC key.
type MacKey = (String, Zeroizing<[u8; 32]>);

/// A 32-byte key from its base64.
fn decode_key(b64: &str) -> Option<Zeroizing<[u8; 32]>> {
    let bytes = Zeroizing::new(BASE64_STANDARD.decode(b64.as_bytes()).ok()?);
    let mut out = Zeroizing::new([0u8; 32]);
    if bytes.len() != out.len() {
        return None;
    }
    out.copy_from_slice(&bytes);
    Some(out)
}

fn encrypt_err(e: impl std::fmt::Display) -> VaultError {
    VaultError::Encrypt(e.to_string())
}

/// How much plaintext [`Staged`] holds before passing it on.
const STAGE: usize = 64 * 1024;

/// A writer that gathers serde_json's many small writes into one wiped
/// buffer and passes it on in large blocks: to the MAC while one runs, and
/// always to the encryptor.
struct Staged<W: Write> {
    out: W,
    buf: Zeroizing<Vec<u8>>,
    macs: Vec<Hmac<Sha256>>,
    total: usize,
}

impl<W: Write> Staged<W> {
    fn new(out: W) -> Self {
        Self {
            out,
            buf: Zeroizing::new(Vec::with_capacity(STAGE)),
            macs: Vec::new(),
            total: 0,
        }
    }

    fn pass_on(&mut self) -> std::io::Result<()> {
        for m in &mut self.macs {
            m.update(&self.buf);
        }
        self.out.write_all(&self.buf)?;
        self.total = self.total.saturating_add(self.buf.len());
        // `clear` keeps the capacity: the buffer is never reallocated, so
        // no copy of it is left behind; it is wiped when dropped.
        self.buf.clear();
        Ok(())
    }

    /// Everything written from now on is also MACed, by each of `macs`
    /// (one per token).
    fn start_macs(&mut self, macs: Vec<Hmac<Sha256>>) -> std::io::Result<()> {
        self.pass_on()?;
        if macs.is_empty() {
            return Err(std::io::Error::other("no MAC key"));
        }
        self.macs = macs;
        Ok(())
    }

    /// The MACs over what was written since [`Staged::start_macs`].
    fn take_macs(&mut self) -> std::io::Result<Vec<Hmac<Sha256>>> {
        self.pass_on()?;
        if self.macs.is_empty() {
            return Err(std::io::Error::other("no MAC was started"));
        }
        Ok(std::mem::take(&mut self.macs))
    }

    /// The inner writer, and how many bytes went through.
    fn finish(mut self) -> std::io::Result<(W, usize)> {
        self.pass_on()?;
        Ok((self.out, self.total))
    }
}

impl<W: Write> Staged<W> {
    /// A write that does not fit the stage: pass the stage on, then keep
    /// `data` or, if it is larger than the stage, pass it straight on.
    #[cold]
    fn write_slow(&mut self, data: &[u8]) -> std::io::Result<()> {
        self.pass_on()?;
        if data.len() < STAGE {
            self.buf.extend_from_slice(data);
            return Ok(());
        }
        for m in &mut self.macs {
            m.update(data);
        }
        self.out.write_all(data)?;
        self.total = self.total.saturating_add(data.len());
        Ok(())
    }
}

impl<W: Write> Write for Staged<W> {
    #[inline]
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.write_all(data)?;
        Ok(data.len())
    }

    #[inline]
    fn write_all(&mut self, data: &[u8]) -> std::io::Result<()> {
        // serde_json writes many small pieces: the common case is a copy.
        if data.len() <= STAGE - self.buf.len() {
            self.buf.extend_from_slice(data);
            Ok(())
        } else {
            self.write_slow(data)
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> SoftwareKey {
        SoftwareKey(p256::SecretKey::random(&mut rand::rngs::OsRng))
    }

    fn token(k: &SoftwareKey) -> TokenRecipient {
        TokenRecipient {
            recipient: recipient_string(&k.public_key()),
            label: "test".into(),
            serial: "1".into(),
            key_id: "00".into(),
            piv: None,
            backend: String::new(),
            module: String::new(),
            enrolled_at: String::new(),
            last_used: String::new(),
            rollback_record: true,
        }
    }

    #[test]
    fn recipient_entries_without_or_with_piv_details_read() {
        // As written before the PIV details existed: no "piv", and none
        // written back.
        let old = r#"{"recipient":"age1tag1x","label":"t","serial":"1","key_id":"03"}"#;
        let entry: TokenRecipient = serde_json::from_str(old).unwrap();
        assert_eq!(entry.piv, None);
        assert_eq!(serde_json::to_string(&entry).unwrap(), old);
        // With them, including fields a later version may add.
        let new = r#"{"recipient":"age1tag1x","label":"t","serial":"1","key_id":"03",
            "piv":{"slot":"9d","touch_policy":"cached","attested":false,
                   "attestation":"the card has no attestation certificate (slot f9)",
                   "later":"ignored"}}"#;
        let entry: TokenRecipient = serde_json::from_str(new).unwrap();
        let piv = entry.piv.clone().unwrap();
        assert_eq!(piv.slot, "9d");
        assert_eq!(piv.touch_policy, "cached");
        assert_eq!(piv.pin_policy, "");
        assert!(!piv.attested);
        let again: TokenRecipient =
            serde_json::from_str(&serde_json::to_string(&entry).unwrap()).unwrap();
        assert_eq!(again, entry);
    }

    fn new_vault(k: &SoftwareKey, recovery: Vec<String>) -> (OpenVault, Vec<u8>) {
        let v = OpenVault::create(k, token(k), recovery).unwrap();
        let mut body = v.body.clone();
        body.secrets.insert(
            "db/pw".into(),
            SecretEntry::new(b"hunter2", "2026-01-01T00:00:00Z"),
        );
        let bytes = v.next(&mut body).unwrap();
        (v, bytes)
    }

    /// A document as a version 1 writer made it: `"version": 1` and
    /// secrets without a number or history.
    fn version_1_file(k: &SoftwareKey, version: u32) -> Vec<u8> {
        let v = OpenVault::create(k, token(k), vec![]).unwrap();
        let recipients = serde_json::to_string(&v.body.recipients).unwrap();
        let body = format!(
            "{{\n    \"generation\": 4,\n    \"created_at\": \"2026-11-21T22:15:12Z\",\n    \"updated_at\": \"2026-11-21T22:15:12Z\",\n    \"recipients\": {recipients},\n    \"secrets\": {{\n      \"db/prod/password\": {{ \"value\": \"hunter2\", \"encoding\": \"utf8\", \"size\": 7, \"created_at\": \"2026-11-21T22:15:12Z\", \"updated_at\": \"2026-11-21T22:15:12Z\" }}\n    }}\n  }}"
        );
        let tag = mac(&v.mac_key, v.vault_id(), body.as_bytes())
            .finalize()
            .into_bytes();
        let doc = format!(
            "{{\n  \"format\": \"keyholder-vault\",\n  \"version\": {version},\n  \"vault_id\": \"{}\",\n  \"body\": {body},\n  \"auth\": [{{ \"recipient\": \"{}\", \"alg\": \"HMAC-SHA256\", \"mac\": \"{}\" }}]\n}}\n",
            v.vault_id(),
            v.token_recipient(),
            BASE64_STANDARD.encode(tag)
        );
        let parsed = ParsedRecipients::parse(&v.body.recipients).unwrap();
        let enc = age::Encryptor::with_recipients(
            parsed
                .list
                .iter()
                .map(|b| b.as_ref() as &dyn age::Recipient),
        )
        .unwrap();
        let mut out = Vec::new();
        let mut w = enc.wrap_output(&mut out).unwrap();
        w.write_all(doc.as_bytes()).unwrap();
        w.finish().unwrap();
        out
    }

    #[test]
    fn a_version_1_vault_opens_and_is_written_back_as_version_2() {
        let k = key();
        let opened = OpenVault::open(&version_1_file(&k, 1), &k).unwrap();
        let e = &opened.body.secrets["db/prod/password"];
        assert_eq!(e.value().unwrap().as_slice(), b"hunter2");
        assert_eq!(e.version(), 1);
        assert!(e.history().is_empty());
        let mut body = opened.body.clone();
        let replaced = SecretEntry::superseding(e, b"hunter3", "2026-12-01T00:00:00Z", 5);
        body.secrets.insert("db/prod/password".into(), replaced);
        let bytes = opened.next(&mut body).unwrap();
        let again = OpenVault::open(&bytes, &k).unwrap();
        let e = &again.body.secrets["db/prod/password"];
        assert_eq!(e.version(), 2);
        assert_eq!(e.history()[0].value().unwrap().as_slice(), b"hunter2");
        let err = OpenVault::open(&version_1_file(&k, 5), &k).unwrap_err();
        assert!(matches!(err, VaultError::UnsupportedVersion(5)), "{err}");
    }

    #[test]
    fn an_enrolled_token_opens_and_writes_for_every_token_and_a_revoked_one_does_not() {
        let (a, b) = (key(), key());
        let recovery = age::x25519::Identity::generate();
        let (_, bytes) = new_vault(&a, vec![recovery.to_public().to_string()]);
        let version = |file: &[u8]| {
            let plain = age::decrypt(&recovery, file).unwrap();
            serde_json::from_slice::<serde_json::Value>(&plain).unwrap()["version"].clone()
        };
        assert_eq!(version(&bytes), document::VERSION);
        let va = OpenVault::open(&bytes, &a).unwrap();
        let audit_before = va.audit_key();
        // Enrol b: its MAC key, its entry, the team keys.
        let mut body = va.body.clone();
        let entry_b = token(&b);
        body.team_keys =
            Some(va.team_keys_with(&body, &entry_b.recipient, va.mac_key_of(&b).unwrap()));
        body.recipients.tokens.push(entry_b.clone());
        let two = va.next(&mut body).unwrap();
        assert_eq!(probe(&two).unwrap().len(), 2);
        // Written as the version a reader without team keys refuses.
        assert_eq!(version(&two), document::TEAM_VERSION);
        let by_a = OpenVault::open(&two, &a).unwrap();
        let by_b = OpenVault::open(&two, &b).unwrap();
        assert_eq!(
            by_b.body.secrets["db/pw"].value().unwrap().as_slice(),
            b"hunter2"
        );
        assert_eq!(by_b.own_entry().unwrap().recipient, entry_b.recipient);
        // The audit key is the one the vault had, whoever opens it.
        assert_eq!(*by_a.audit_key(), *audit_before);
        assert_eq!(*by_b.audit_key(), *audit_before);
        // b writes; a still authenticates it.
        let mut body = by_b.body.clone();
        body.secrets.insert(
            "b/wrote".into(),
            SecretEntry::new(b"yes", "2026-01-01T00:00:00Z"),
        );
        let written_by_b = by_b.next(&mut body).unwrap();
        let again = OpenVault::open(&written_by_b, &a).unwrap();
        assert_eq!(
            again.body.secrets["b/wrote"].value().unwrap().as_slice(),
            b"yes"
        );
        // b revokes a: the new file does not open with a, the old one does.
        let mut body = again.body.clone();
        body.recipients
            .tokens
            .retain(|t| t.recipient != va.token_recipient());
        if let Some(team) = &mut body.team_keys {
            team.tokens.remove(va.token_recipient());
        }
        let without_a = by_b.next(&mut body).unwrap();
        assert!(matches!(
            OpenVault::open(&without_a, &a),
            Err(VaultError::NotForThisToken)
        ));
        OpenVault::open(&without_a, &b).unwrap();
        OpenVault::open(&written_by_b, &a).unwrap();
        // No token left: refused on open, even by a token that decrypts it.
        let mut body = by_b.body.clone();
        body.recipients.tokens.clear();
        body.team_keys = None;
        let to_b = Recipients {
            tokens: vec![entry_b.clone()],
            recovery: vec![],
        };
        let empty = seal_to(&by_b, &body, &to_b);
        assert!(matches!(
            OpenVault::open(&empty, &b),
            Err(VaultError::NoTokens)
        ));
    }

    /// `body` as `v` writes it, encrypted to `to` whatever it lists.
    fn seal_to(v: &OpenVault, body: &Body, to: &Recipients) -> Vec<u8> {
        let parsed = ParsedRecipients::parse(to).unwrap();
        let enc = age::Encryptor::with_recipients(
            parsed
                .list
                .iter()
                .map(|b| b.as_ref() as &dyn age::Recipient),
        )
        .unwrap();
        let mut out = Vec::new();
        let mut w = enc.wrap_output(&mut out).unwrap();
        let mut doc = Staged::new(&mut w);
        v.write_document(&mut doc, body).unwrap();
        doc.finish().unwrap();
        w.finish().unwrap();
        out
    }

    #[test]
    fn round_trip_and_generation() {
        let k = key();
        let (_, bytes) = new_vault(&k, vec![]);
        let opened = OpenVault::open(&bytes, &k).unwrap();
        assert_eq!(opened.body.generation, 1);
        assert_eq!(
            opened.body.secrets["db/pw"].value().unwrap().as_slice(),
            b"hunter2"
        );
    }

    #[test]
    fn a_large_vault_sealed_on_two_threads_opens_and_reads_with_age() {
        let k = key();
        let recovery = age::x25519::Identity::generate();
        let (v, _) = new_vault(&k, vec![recovery.to_public().to_string()]);
        let mut body = v.body.clone();
        body.secrets.insert(
            "db/pw".into(),
            SecretEntry::new(b"hunter2", "2026-01-01T00:00:00Z"),
        );
        for i in 0..8_000 {
            let value = format!("value-{i:06}-{}", "y".repeat(100));
            body.secrets.insert(
                format!("bulk/{i:06}"),
                SecretEntry::new(value.as_bytes(), "2026-01-01T00:00:00Z"),
            );
        }
        // The first seal sizes the next one (past the pipeline threshold).
        let first = v.next(&mut body).unwrap();
        assert!(first.len() > PIPELINE_FROM);
        let second = v.next(&mut body).unwrap();
        for bytes in [&first, &second] {
            let opened = OpenVault::open(bytes, &k).unwrap();
            assert_eq!(opened.body.secrets.len(), 8_001);
            assert_eq!(
                opened.body.secrets["bulk/004242"]
                    .value()
                    .unwrap()
                    .as_slice(),
                format!("value-004242-{}", "y".repeat(100)).as_bytes()
            );
            let plain = age::decrypt(&recovery, bytes).unwrap();
            let doc: serde_json::Value = serde_json::from_slice(&plain).unwrap();
            assert_eq!(doc["body"]["secrets"]["db/pw"]["value"], "hunter2");
        }
    }

    #[test]
    fn another_token_cannot_open_it() {
        let (_, bytes) = new_vault(&key(), vec![]);
        assert!(matches!(
            OpenVault::open(&bytes, &key()),
            Err(VaultError::NotForThisToken)
        ));
    }

    #[test]
    fn a_vault_forged_with_only_the_public_key_is_refused() {
        // The attacker knows the token's public key (it is in the age
        // recipient) and a genuine vault's layout, and writes their own.
        let k = key();
        let (genuine, _) = new_vault(&k, vec![]);
        let attacker_key = key();
        let forger = OpenVault {
            body: genuine.body.clone(),
            vault_id: genuine.vault_id.clone(),
            token_recipient: genuine.token_recipient.clone(),
            // Without the token the attacker can only guess the MAC key.
            mac_key: mac_key(&attacker_key, &genuine.vault_id).unwrap(),
            parsed: None,
            size_hint: Default::default(),
        };
        let mut body = genuine.body.clone();
        body.secrets.insert(
            "db/pw".into(),
            SecretEntry::new(b"attacker", "2026-01-01T00:00:00Z"),
        );
        let forged = forger.next(&mut body).unwrap();
        assert!(matches!(
            OpenVault::open(&forged, &k),
            Err(VaultError::NotAuthentic)
        ));
    }

    #[test]
    fn truncated_and_corrupt_files_are_damage_not_panics() {
        let k = key();
        let (_, bytes) = new_vault(&k, vec![]);
        for cut in [0, 10, bytes.len() / 2, bytes.len() - 1] {
            let err = OpenVault::open(&bytes[..cut], &k).unwrap_err();
            assert!(matches!(err, VaultError::Damaged(_)), "cut {cut}: {err}");
        }
        let mut flipped = bytes.clone();
        let last = flipped.len() - 5;
        flipped[last] ^= 0x40;
        assert!(matches!(
            OpenVault::open(&flipped, &k),
            Err(VaultError::Damaged(_))
        ));
    }

    #[test]
    fn recovery_identity_reads_the_json() {
        let k = key();
        let recovery = age::x25519::Identity::generate();
        let (_, bytes) = new_vault(&k, vec![recovery.to_public().to_string()]);
        let plain = age::decrypt(&recovery, &bytes).unwrap();
        let doc: serde_json::Value = serde_json::from_slice(&plain).unwrap();
        assert_eq!(doc["format"], "keyholder-vault");
        assert_eq!(doc["body"]["secrets"]["db/pw"]["value"], "hunter2");
        assert_eq!(doc["body"]["generation"], 1);
    }

    #[test]
    fn bad_recovery_recipient_is_named() {
        let k = key();
        let err = OpenVault::create(&k, token(&k), vec!["age1nope".into()]).unwrap_err();
        assert!(err.to_string().contains("age1nope"));
    }

    #[test]
    fn the_document_keeps_serde_json_s_pretty_layout() {
        let k = key();
        let recovery = age::x25519::Identity::generate();
        let (v, bytes) = new_vault(&k, vec![recovery.to_public().to_string()]);
        let opened = OpenVault::open(&bytes, &k).unwrap();
        let plain = String::from_utf8(age::decrypt(&recovery, &bytes).unwrap()).unwrap();
        let body = serde_json::to_string_pretty(&opened.body)
            .unwrap()
            .replace('\n', "\n  ");
        let expected_head = format!(
            "{{\n  \"format\": \"keyholder-vault\",\n  \"version\": 3,\n  \"vault_id\": \"{}\",\n  \"body\": {body},\n  \"auth\": [\n    {{\n      \"recipient\": ",
            v.vault_id()
        );
        assert!(plain.starts_with(&expected_head), "{plain}");
        assert!(plain.ends_with("\"\n    }\n  ]\n}\n"), "{plain}");
    }

    /// Rewrites the file's `p256tag` stanza line with `edit`.
    fn with_stanza_line(file: &[u8], edit: impl Fn(&str) -> String) -> Vec<u8> {
        let text = String::from_utf8_lossy(file);
        let start = text.find("-> p256tag ").expect("p256tag stanza");
        let end = start + text[start..].find('\n').expect("line end");
        let mut out = file[..start].to_vec();
        out.extend_from_slice(edit(&text[start..end]).as_bytes());
        out.extend_from_slice(&file[end..]);
        out
    }

    #[test]
    fn a_malformed_p256tag_stanza_is_damage_not_another_token() {
        let k = key();
        let (_, bytes) = new_vault(&k, vec![]);
        assert_eq!(probe(&bytes).unwrap().len(), 1);
        type Edit = fn(&str) -> String;
        let edits: [(&str, Edit); 5] = [
            ("one argument", |l| l.rsplit_once(' ').unwrap().0.to_owned()),
            ("three arguments", |l| format!("{l} extra")),
            ("short share", |l| l[..l.len() - 4].to_owned()),
            ("short tag", |l| {
                let parts: Vec<&str> = l.split(' ').collect();
                format!("-> p256tag {} {}", &parts[2][..4], parts[3])
            }),
            // Flips the last character: a base64 string whose unused bits
            // are set, or a share that is no longer a point.
            ("non-canonical share", |l| {
                let mut s = l.to_owned();
                let last = s.pop().unwrap();
                s.push(if last == 'A' { 'B' } else { 'A' });
                s
            }),
        ];
        for (what, edit) in edits {
            let broken = with_stanza_line(&bytes, edit);
            let err = probe(&broken).unwrap_err();
            assert!(matches!(err, VaultError::Damaged(_)), "{what}: {err}");
            assert!(err.to_string().contains("p256tag"), "{what}: {err}");
        }
    }
}
