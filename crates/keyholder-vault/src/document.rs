//! The vault's plaintext: a versioned JSON document (see `docs/vault-format.md`).
//!
//! ```json
//! {
//!   "format": "keyholder-vault",
//!   "version": 1,
//!   "vault_id": "4f1c...",
//!   "body": { "generation": 7, "secrets": { ... }, ... },
//!   "auth": [ { "recipient": "age1tag1...", "alg": "HMAC-SHA256", "mac": "..." } ]
//! }
//! ```
//!
//! `body` is MACed byte for byte as it appears in the file (it is kept as a
//! raw JSON value while parsing), so no canonical JSON form is needed.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::SystemTime;

use base64::Engine;
use base64::prelude::BASE64_STANDARD;
use keyholder_pki::KeyAlgorithm;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use zeroize::Zeroizing;

/// The `format` value of every vault.
pub const FORMAT: &str = "keyholder-vault";
/// The document version this code writes.
pub const VERSION: u32 = 3;
/// The version a vault with more than one enrolled token is written as
/// (its `team_keys`): a reader of version 3 refuses it rather than rewrite
/// it without them, which would shut every other token out.
pub const TEAM_VERSION: u32 = 4;
/// The oldest document version this code reads (version 1 has no secret
/// history, version 2 no cluster PKI records; both open as they are and are
/// written back as version 3).
pub const MIN_VERSION: u32 = 1;

/// The outer document, as parsed (before the MAC is checked).
#[derive(Deserialize)]
pub(crate) struct EnvelopeIn<'a> {
    pub format: String,
    pub version: u32,
    pub vault_id: String,
    #[serde(borrow)]
    pub body: &'a serde_json::value::RawValue,
    pub auth: Vec<AuthTag>,
}

/// Writes the document's head, up to the body.
pub(crate) fn write_head(
    out: &mut impl std::io::Write,
    vault_id: &str,
    version: u32,
) -> serde_json::Result<()> {
    out.write_all(b"{\n  \"format\": ")
        .map_err(serde_json::Error::io)?;
    serde_json::to_writer(&mut *out, FORMAT)?;
    out.write_all(format!(",\n  \"version\": {version},\n  \"vault_id\": ").as_bytes())
        .map_err(serde_json::Error::io)?;
    serde_json::to_writer(&mut *out, vault_id)?;
    out.write_all(b",\n  \"body\": ")
        .map_err(serde_json::Error::io)
}

/// Writes the body, indented as the envelope's member: exactly the bytes the
/// MAC covers.
pub(crate) fn write_body(out: &mut impl std::io::Write, body: &Body) -> serde_json::Result<()> {
    body.serialize(&mut serde_json::Serializer::with_formatter(
        out,
        Indented::at(1),
    ))
}

/// Writes the MACs and closes the document.
pub(crate) fn write_tail(
    out: &mut impl std::io::Write,
    auth: &[AuthTag],
) -> serde_json::Result<()> {
    out.write_all(b",\n  \"auth\": ")
        .map_err(serde_json::Error::io)?;
    auth.serialize(&mut serde_json::Serializer::with_formatter(
        &mut *out,
        Indented::at(1),
    ))?;
    out.write_all(b"\n}\n").map_err(serde_json::Error::io)
}

/// serde_json's pretty layout (two spaces per level), starting `level`
/// levels deep: the body is written in place inside the envelope, indented
/// as the envelope's member it is, without a second pass over its bytes.
/// (`serde_json::ser::PrettyFormatter` always starts at level 0.)
struct Indented {
    level: usize,
    has_value: bool,
}

impl Indented {
    fn at(level: usize) -> Self {
        Self {
            level,
            has_value: false,
        }
    }

    fn newline<W: ?Sized + std::io::Write>(&self, w: &mut W) -> std::io::Result<()> {
        // A newline and the indentation in one write, for the usual depths.
        const LINE: &[u8; 33] = b"\n                                ";
        match LINE.get(..self.level.saturating_mul(2).saturating_add(1)) {
            Some(line) => w.write_all(line),
            None => {
                w.write_all(b"\n")?;
                for _ in 0..self.level {
                    w.write_all(b"  ")?;
                }
                Ok(())
            }
        }
    }

    fn open<W: ?Sized + std::io::Write>(&mut self, w: &mut W, c: &[u8]) -> std::io::Result<()> {
        self.level += 1;
        self.has_value = false;
        w.write_all(c)
    }

    fn close<W: ?Sized + std::io::Write>(&mut self, w: &mut W, c: &[u8]) -> std::io::Result<()> {
        self.level = self.level.saturating_sub(1);
        if self.has_value {
            self.newline(w)?;
        }
        w.write_all(c)
    }

    fn item<W: ?Sized + std::io::Write>(&self, w: &mut W, first: bool) -> std::io::Result<()> {
        if !first {
            w.write_all(b",")?;
        }
        self.newline(w)
    }
}

impl serde_json::ser::Formatter for Indented {
    fn begin_array<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.open(w, b"[")
    }
    fn end_array<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.close(w, b"]")
    }
    fn begin_array_value<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        self.item(w, first)
    }
    fn end_array_value<W: ?Sized + std::io::Write>(&mut self, _: &mut W) -> std::io::Result<()> {
        self.has_value = true;
        Ok(())
    }
    fn begin_object<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.open(w, b"{")
    }
    fn end_object<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.close(w, b"}")
    }
    fn begin_object_key<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        self.item(w, first)
    }
    fn begin_object_value<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        w.write_all(b": ")
    }
    fn end_object_value<W: ?Sized + std::io::Write>(&mut self, _: &mut W) -> std::io::Result<()> {
        self.has_value = true;
        Ok(())
    }
}

/// One MAC over the body, keyed by a secret that only one token can derive.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct AuthTag {
    /// The token's age recipient (`age1tag1...`).
    pub recipient: String,
    /// Always `HMAC-SHA256` in version 1.
    pub alg: String,
    /// Base64 of the MAC.
    pub mac: String,
}

/// Who the vault is encrypted to. Part of the authenticated body, so a
/// recipient cannot be slipped in without the token.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Recipients {
    /// Token recipients (`p256tag`).
    pub tokens: Vec<TokenRecipient>,
    /// Recovery X25519 recipients (`age1...`), whose identities are kept offline.
    #[serde(default)]
    pub recovery: Vec<String>,
}

/// One enrolled token.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct TokenRecipient {
    /// `age1tag1...`
    pub recipient: String,
    /// The token's label when it was enrolled (informational).
    pub label: String,
    /// The token's serial when it was enrolled (informational).
    pub serial: String,
    /// Hex of the key's `CKA_ID` on the token.
    pub key_id: String,
    /// For a key in a PIV card's slot enrolled through the native YubiKey
    /// backend: what the card and its attestation said at enrollment.
    /// Absent in vaults made before it existed, or on other tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub piv: Option<PivKeyRecord>,
    /// How the token is reached: `pkcs11` or `yubikey` (native PIV).
    /// Empty in entries written before enrolment existed (informational).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub backend: String,
    /// The PKCS#11 module the token was enrolled through (informational;
    /// empty when not recorded).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub module: String,
    /// When the token was enrolled by `keyholder token enrol`, RFC 3339 UTC
    /// (empty for the token the vault was created on).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub enrolled_at: String,
    /// When the token last opened the vault, RFC 3339 UTC; recorded only in
    /// vaults with more than the token they were created on.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub last_used: String,
    /// Whether the token holds the vault's generation record (rollback
    /// detection while it is the token in use). `false` only for a token
    /// enrolled, on request, though it cannot store the record.
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub rollback_record: bool,
}

/// The MAC keys of every enrolled token and the audit key, for a vault
/// with more than the token it was created on: whoever opens the vault
/// with one token writes an authentication entry for every token, and
/// keeps the audit chain's key whatever token opened it. Kept in the
/// authenticated, encrypted body; absent from single-token vaults.
#[derive(Clone, Default, Serialize, Deserialize)]
pub struct TeamKeys {
    /// Base64 of the audit anchor key (see `OpenVault::audit_key`).
    #[serde(serialize_with = "ser_secret", deserialize_with = "de_secret")]
    pub audit: Zeroizing<String>,
    /// Base64 of each token's MAC key, by its recipient (`age1tag1...`).
    #[serde(default)]
    pub tokens: BTreeMap<String, TeamKey>,
}

/// One token's MAC key, base64.
#[derive(Clone, Serialize, Deserialize)]
#[serde(transparent)]
pub struct TeamKey(
    #[serde(serialize_with = "ser_secret", deserialize_with = "de_secret")] pub Zeroizing<String>,
);

impl fmt::Debug for TeamKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TeamKeys")
            .field("tokens", &self.tokens.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

/// What was known of a PIV card's key when it was enrolled. Every field is
/// text, and defaults when absent, so entries written by later versions
/// still read.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct PivKeyRecord {
    /// The slot, as PIV names it ("9d").
    pub slot: String,
    /// The card's firmware version ("5.4.3").
    pub firmware: String,
    /// "once", "always", ...; empty when not known.
    pub pin_policy: String,
    /// "never", "cached" or "always"; empty when not known.
    pub touch_policy: String,
    /// The device's form factor from its attestation ("USB-C keychain").
    #[serde(skip_serializing_if = "String::is_empty")]
    pub form_factor: String,
    /// "generated" or "imported" as the card said; empty when it did not.
    pub origin: String,
    /// Whether the card's attestation of the key was verified.
    pub attested: bool,
    /// What the attestation showed, or why there was none.
    pub attestation: String,
    /// "pin-protected" when the card's management key is kept on the card
    /// behind the PIN (set at enrollment or found there).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub management_key: String,
}

fn yes() -> bool {
    true
}

fn is_true(b: &bool) -> bool {
    *b
}

/// The authenticated content.
#[derive(Clone, Serialize, Deserialize)]
pub struct Body {
    /// Increases by one with every write.
    pub generation: u64,
    /// RFC 3339, UTC.
    pub created_at: String,
    /// RFC 3339, UTC.
    pub updated_at: String,
    /// Who can decrypt.
    pub recipients: Recipients,
    /// Secrets by name.
    #[serde(default)]
    pub secrets: BTreeMap<String, SecretEntry>,
    /// X.509 CAs by name.
    #[serde(default)]
    pub cas: BTreeMap<String, CaEntry>,
    /// Kubernetes cluster profiles by name.
    #[serde(default)]
    pub clusters: BTreeMap<String, ClusterEntry>,
    /// Signing keys by name.
    #[serde(default)]
    pub keys: BTreeMap<String, KeyEntry>,
    /// SSH certificates the agent serves, until they expire.
    #[serde(default)]
    pub ssh_certificates: Vec<SshCertificateEntry>,
    /// Whether the token records the vault's generation (rollback
    /// detection). `false` only for a vault created, on the user's explicit
    /// request, on a token that cannot store the record; written only then.
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub rollback_protection: bool,
    /// The access policy (TOML, as the admin wrote it), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    /// The audit log's last durable record at this write (or at the last
    /// lock): what `keyholder audit verify` detects truncation against.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audit_head: Option<AuditHead>,
    /// What `cluster pki` issued, by cluster name (version 3; absent when
    /// empty).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub cluster_pki: crate::cluster_pki::ClusterPkis,
    /// The keys a vault with several tokens needs (see [`TeamKeys`]);
    /// absent until a second token is enrolled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub team_keys: Option<TeamKeys>,
}

/// The head of the audit log's chain (docs/audit.md).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditHead {
    /// The record's sequence number.
    pub seq: u64,
    /// The record's hash (hex SHA-256).
    pub hash: String,
}

/// What a signing key may be used for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyUsage {
    /// Offered by the ssh-agent.
    Ssh,
    /// `Signer.Sign`.
    Sign,
    /// Signing certificates.
    Ca,
}

impl KeyUsage {
    /// The name in the document and the API.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ssh => "ssh",
            Self::Sign => "sign",
            Self::Ca => "ca",
        }
    }

    /// Parses a name of [`KeyUsage::as_str`].
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "ssh" => Some(Self::Ssh),
            "sign" => Some(Self::Sign),
            "ca" => Some(Self::Ca),
            _ => None,
        }
    }
}

/// A signing key.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct KeyEntry {
    /// `ed25519`, `ecdsa-p256`, `rsa-3072`, `rsa-4096`.
    pub key_type: KeyAlgorithm,
    /// `ssh`, `sign`, `ca`.
    pub usages: Vec<KeyUsage>,
    /// Where the private key is (the same two places as a CA key).
    pub key: CaKey,
    /// OpenSSH public key line.
    pub public_openssh: String,
    /// RFC 3339, UTC.
    pub created_at: String,
}

/// An SSH certificate for a key in this vault.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SshCertificateEntry {
    /// The certified key's name.
    pub key: String,
    /// The issuing CA's name.
    pub ca: String,
    /// OpenSSH certificate line.
    pub certificate: String,
    /// Unix seconds.
    pub valid_before: u64,
    /// The certificate's serial.
    pub serial: u64,
}

/// What a CA certifies.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CaKind {
    /// X.509 certificates.
    X509,
    /// OpenSSH certificates.
    Ssh,
}

impl CaKind {
    /// The name in the document and the API.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::X509 => "x509",
            Self::Ssh => "ssh",
        }
    }
}

/// A certificate authority: X.509 (with its certificate) or SSH (with its
/// public key line).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CaEntry {
    /// `x509` or `ssh`.
    pub kind: CaKind,
    /// The CA certificate, PEM (empty for SSH CAs).
    pub certificate_pem: String,
    /// Where the private key is.
    pub key: CaKey,
    /// Longest certificate it issues, in seconds.
    pub max_ttl_seconds: u64,
    /// RFC 3339, UTC.
    pub created_at: String,
    /// For `ssh` CAs: the OpenSSH public key line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_openssh: Option<String>,
}

/// Where a CA's private key lives.
#[derive(Clone, Serialize, Deserialize)]
#[serde(tag = "store", rename_all = "lowercase")]
pub enum CaKey {
    /// In this vault, as PKCS#8 PEM.
    Vault {
        /// The key.
        #[serde(serialize_with = "ser_secret", deserialize_with = "de_secret")]
        private_key_pem: Zeroizing<String>,
    },
    /// On the token (P-256, sign only, not extractable).
    Token {
        /// Hex `CKA_ID`.
        key_id: String,
        /// `CKA_LABEL`.
        label: String,
    },
}

impl fmt::Debug for CaKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Vault { .. } => f.write_str("CaKey::Vault(<redacted>)"),
            Self::Token { key_id, label } => f
                .debug_struct("CaKey::Token")
                .field("key_id", key_id)
                .field("label", label)
                .finish(),
        }
    }
}

/// A Kubernetes cluster profile.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ClusterEntry {
    /// API server URL.
    pub server: String,
    /// Name of the CA in this vault.
    pub ca: String,
    /// Groups used when a request names none.
    #[serde(default)]
    pub default_groups: Vec<String>,
    /// Longest credential, in seconds.
    pub max_ttl_seconds: u64,
    /// RFC 3339, UTC.
    pub created_at: String,
    /// PEM certificates of the API server's CA, when it is not `ca`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub server_ca_pem: String,
}

impl fmt::Debug for Body {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Body")
            .field("generation", &self.generation)
            .field("recipients", &self.recipients)
            .field("secrets", &self.secrets.len())
            .field("cas", &self.cas.keys().collect::<Vec<_>>())
            .field("clusters", &self.clusters.keys().collect::<Vec<_>>())
            .field("keys", &self.keys.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// How a secret's value is written in the JSON.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Encoding {
    /// The value is the UTF-8 text itself.
    Utf8,
    /// The value is standard base64 of arbitrary bytes.
    Base64,
}

/// One secret. Shared, not copied, between the body a write starts from
/// and the new one (a write copies the map, not every value in it).
#[derive(Clone, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SecretEntry(Arc<SecretData>);

#[derive(Serialize, Deserialize)]
struct SecretData {
    #[serde(serialize_with = "ser_secret", deserialize_with = "de_secret")]
    value: Zeroizing<String>,
    encoding: Encoding,
    /// Decoded length in bytes.
    size: u64,
    /// RFC 3339, UTC.
    created_at: String,
    /// RFC 3339, UTC.
    updated_at: String,
    /// The number of this value: 1 for the first, one more with every
    /// replacement. Absent when 1, so a secret never replaced is written
    /// exactly as a version 1 document had it.
    #[serde(default = "first_version", skip_serializing_if = "is_first_version")]
    version: u64,
    /// Earlier values, newest first (version 2 on; absent when empty).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    history: Vec<OldValue>,
}

impl SecretData {
    /// `value` at version 1 without history; text stays readable in the
    /// JSON, other bytes are base64.
    fn holding(value: &[u8], created_at: &str, now: &str) -> Self {
        let (text, encoding) = match std::str::from_utf8(value) {
            Ok(t) => (Zeroizing::new(t.to_owned()), Encoding::Utf8),
            Err(_) => (
                Zeroizing::new(BASE64_STANDARD.encode(value)),
                Encoding::Base64,
            ),
        };
        Self {
            value: text,
            encoding,
            size: value.len() as u64,
            created_at: created_at.to_owned(),
            updated_at: now.to_owned(),
            version: 1,
            history: Vec::new(),
        }
    }
}

fn first_version() -> u64 {
    1
}

fn is_first_version(v: &u64) -> bool {
    *v == 1
}

/// A value a secret held before it was replaced.
#[derive(Clone, Serialize, Deserialize)]
pub struct OldValue {
    /// Its number (see [`SecretEntry::version`]).
    pub version: u64,
    #[serde(serialize_with = "ser_secret", deserialize_with = "de_secret")]
    value: Zeroizing<String>,
    encoding: Encoding,
    /// Decoded length in bytes.
    pub size: u64,
    /// When it was stored, RFC 3339 UTC.
    pub stored_at: String,
    /// When it was replaced, RFC 3339 UTC.
    pub replaced_at: String,
}

impl fmt::Debug for OldValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OldValue")
            .field("version", &self.version)
            .field("value", &"<redacted>")
            .field("size", &self.size)
            .finish()
    }
}

impl OldValue {
    /// The value's bytes; `None` when a base64 value does not decode.
    pub fn value(&self) -> Option<Zeroizing<Vec<u8>>> {
        decode(&self.value, self.encoding)
    }
}

fn decode(value: &str, encoding: Encoding) -> Option<Zeroizing<Vec<u8>>> {
    match encoding {
        Encoding::Utf8 => Some(Zeroizing::new(value.as_bytes().to_vec())),
        Encoding::Base64 => BASE64_STANDARD
            .decode(value.as_bytes())
            .ok()
            .map(Zeroizing::new),
    }
}

impl fmt::Debug for SecretEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SecretEntry")
            .field("value", &"<redacted>")
            .field("size", &self.0.size)
            .field("version", &self.0.version)
            .field("history", &self.0.history.len())
            .finish()
    }
}

pub(crate) fn ser_secret<S: Serializer>(v: &Zeroizing<String>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(v)
}

pub(crate) fn de_secret<'de, D: Deserializer<'de>>(d: D) -> Result<Zeroizing<String>, D::Error> {
    String::deserialize(d).map(Zeroizing::new)
}

impl SecretEntry {
    /// A new entry holding `value`, created and updated `now`; text stays
    /// readable in the JSON, other bytes are base64.
    pub fn new(value: &[u8], now: &str) -> Self {
        Self::replacing(value, now, now)
    }

    /// An entry holding `value`, updated `now`, first created `created_at`
    /// (the entry it replaces).
    pub fn replacing(value: &[u8], created_at: &str, now: &str) -> Self {
        Self(Arc::new(SecretData::holding(value, created_at, now)))
    }

    /// `old` replaced by `value` at `now`: the new value is numbered one
    /// above `old`'s, and `old`'s value leads the history, which keeps at
    /// most `keep` earlier values (the oldest are dropped).
    pub fn superseding(old: &SecretEntry, value: &[u8], now: &str, keep: usize) -> Self {
        let mut data = SecretData::holding(value, old.created_at(), now);
        data.version = old.0.version.saturating_add(1);
        let mut history = Vec::with_capacity(keep.min(old.0.history.len().saturating_add(1)));
        if keep > 0 {
            history.push(OldValue {
                version: old.0.version,
                value: old.0.value.clone(),
                encoding: old.0.encoding,
                size: old.0.size,
                stored_at: old.0.updated_at.clone(),
                replaced_at: now.to_owned(),
            });
            history.extend(old.0.history.iter().take(keep - 1).cloned());
        }
        data.history = history;
        Self(Arc::new(data))
    }

    /// This value's number: 1 for the first value stored under the name,
    /// one more with every replacement.
    pub fn version(&self) -> u64 {
        self.0.version
    }

    /// Earlier values, newest first.
    pub fn history(&self) -> &[OldValue] {
        &self.0.history
    }

    /// Decoded length in bytes.
    pub fn size(&self) -> u64 {
        self.0.size
    }

    /// When the secret was first stored, RFC 3339 UTC.
    pub fn created_at(&self) -> &str {
        &self.0.created_at
    }

    /// When the value was last replaced, RFC 3339 UTC.
    pub fn updated_at(&self) -> &str {
        &self.0.updated_at
    }

    /// The value's bytes. `None` when a base64 value does not decode (a
    /// hand-edited vault), which callers report as damage.
    pub fn value(&self) -> Option<Zeroizing<Vec<u8>>> {
        decode(&self.0.value, self.0.encoding)
    }
}

/// Now, as RFC 3339 UTC with seconds.
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_stays_text_and_bytes_round_trip() {
        let t = SecretEntry::new(b"p@ss word", "2026-01-01T00:00:00Z");
        assert_eq!(t.0.encoding, Encoding::Utf8);
        assert_eq!(t.value().unwrap().as_slice(), b"p@ss word");
        let b = SecretEntry::new(&[0xff, 0, 1], "2026-01-01T00:00:00Z");
        assert_eq!(b.0.encoding, Encoding::Base64);
        assert_eq!(b.value().unwrap().as_slice(), &[0xff, 0, 1]);
        assert!(!format!("{t:?}").contains("word"));
    }

    #[test]
    fn replacing_keeps_numbered_old_values_up_to_the_limit() {
        let mut e = SecretEntry::new(b"v1", "2026-01-01T00:00:00Z");
        for (i, v) in ["v2", "v3", "v4"].iter().enumerate() {
            e = SecretEntry::superseding(
                &e,
                v.as_bytes(),
                &format!("2026-01-0{}T00:00:00Z", i + 2),
                2,
            );
        }
        assert_eq!(e.version(), 4);
        assert_eq!(e.value().unwrap().as_slice(), b"v4");
        let h: Vec<_> = e
            .history()
            .iter()
            .map(|o| (o.version, o.value().unwrap().to_vec()))
            .collect();
        assert_eq!(h, [(3, b"v3".to_vec()), (2, b"v2".to_vec())]);
        assert_eq!(e.history()[0].stored_at, "2026-01-03T00:00:00Z");
        assert_eq!(e.history()[0].replaced_at, "2026-01-04T00:00:00Z");
        assert_eq!(e.created_at(), "2026-01-01T00:00:00Z");
        let none = SecretEntry::superseding(&e, b"v5", "2026-01-05T00:00:00Z", 0);
        assert!(none.history().is_empty());
        assert_eq!(none.version(), 5);
        assert!(!format!("{e:?}").contains("v3"));
    }

    #[test]
    fn a_version_1_secret_reads_as_version_1_without_history() {
        let e: SecretEntry = serde_json::from_str(
            r#"{ "value": "hunter2", "encoding": "utf8", "size": 7,
                 "created_at": "2026-11-21T22:15:12Z", "updated_at": "2026-11-21T22:15:12Z" }"#,
        )
        .unwrap();
        assert_eq!(e.version(), 1);
        assert!(e.history().is_empty());
        let text = serde_json::to_string(&e).unwrap();
        assert_eq!(
            text,
            r#"{"value":"hunter2","encoding":"utf8","size":7,"created_at":"2026-11-21T22:15:12Z","updated_at":"2026-11-21T22:15:12Z"}"#
        );
    }
}
