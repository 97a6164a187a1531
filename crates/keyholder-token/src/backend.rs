//! The token seam: what Keyholder asks of a family of tokens, so that the
//! daemon holds "a token" and not a PKCS#11 type. PKCS#11 ([`crate::Module`])
//! implements it; a PIV backend and the in-memory [`crate::software`] token
//! plug in the same way.

use std::fmt;

use secrecy::SecretString;
use zeroize::Zeroizing;

use crate::{
    Error, KeyPurpose, ObjectSelector, PivGeneration, PivKeyFacts, PivSlot, Result, Selector,
    SlotCertifier, TokenDescription, TokenKey,
};

/// A family of tokens: lists them and opens sessions on them.
pub trait Backend: Send + Sync {
    /// Every usable token present now.
    fn tokens(&self) -> Result<Vec<TokenDescription>>;
    /// The one token `selector` names.
    fn select(&self, selector: &Selector) -> Result<TokenDescription>;
    /// Opens a session on `token`, not logged in yet.
    fn open(&self, token: &TokenDescription) -> Result<Box<dyn Session>>;
}

/// An open session on one token. `Send` but not `Sync`: callers that share
/// one put it behind a mutex, and call it from a blocking thread.
pub trait Session: Send + fmt::Debug {
    /// The token this session runs on.
    fn token(&self) -> &TokenDescription;
    /// Logs in as the user; the final PIN try is spent only when
    /// `allow_final_try` is set.
    fn login(&mut self, pin: &SecretString, allow_final_try: bool) -> Result<()>;
    /// Generates a P-256 key pair, sensitive and not extractable, for `purpose`.
    fn generate_p256(&self, label: &str, purpose: KeyPurpose) -> Result<TokenKey>;
    /// Generates a P-256 key pair in a PIV card's `slot`, logged in as the
    /// security officer with the card's management key for that call only,
    /// then as the user again with `pin`. A slot that holds a key is refused.
    /// `certify` makes the certificate (DER) stored in the slot with the
    /// key, without which PIV modules do not show the key again.
    fn generate_p256_in_piv_slot(
        &mut self,
        label: &str,
        purpose: KeyPurpose,
        slot: PivSlot,
        management_key: &SecretString,
        pin: &SecretString,
        certify: &SlotCertifier<'_>,
    ) -> Result<TokenKey>;
    /// Like [`Session::generate_p256_in_piv_slot`], with the key's PIN and
    /// touch policies and the management-key handling of `how`. An empty
    /// `management_key` means the PIN-protected one stored on the card.
    /// Backends that cannot choose policies (a PKCS#11 module) accept only
    /// the plain defaults.
    #[allow(clippy::too_many_arguments)]
    fn generate_p256_in_piv_slot_with(
        &mut self,
        label: &str,
        purpose: KeyPurpose,
        slot: PivSlot,
        management_key: &SecretString,
        pin: &SecretString,
        how: &PivGeneration,
        certify: &SlotCertifier<'_>,
    ) -> Result<TokenKey> {
        if !how.is_plain() {
            return Err(Error::Piv(
                "PIN and touch policies and a PIN-protected management key are set by the \
                 native YubiKey backend only (keyholderd --token-backend yubikey); through a \
                 PKCS#11 module the key gets PIN policy once and touch policy never"
                    .into(),
            ));
        }
        if secrecy::ExposeSecret::expose_secret(management_key).is_empty() {
            return Err(Error::Piv(
                "a PIN-protected management key is read by the native YubiKey backend only: \
                 give the management key"
                    .into(),
            ));
        }
        self.generate_p256_in_piv_slot(label, purpose, slot, management_key, pin, certify)
    }
    /// What a PIV card says about `key` (slot, policies, origin, firmware)
    /// and, when `attest`, its attestation material; `None` for tokens that
    /// are not PIV cards reached natively.
    fn piv_key_facts(&self, _key: &TokenKey, _attest: bool) -> Result<Option<PivKeyFacts>> {
        Ok(None)
    }
    /// The P-256 key-agreement keys labelled `label` (any label: `None`).
    fn find_p256_keys(&self, label: Option<&str>) -> Result<Vec<TokenKey>>;
    /// The one P-256 signing key `object` names.
    fn find_p256_signing_key(&self, object: &ObjectSelector) -> Result<TokenKey>;
    /// The one P-256 key-agreement key `object` names (a key made outside
    /// Keyholder, adopted as a vault key).
    fn find_p256_derive_key(&self, object: &ObjectSelector) -> Result<TokenKey>;
    /// ECDH: the raw X coordinate of `private * peer`.
    fn ecdh(&self, key: &TokenKey, peer: &p256::PublicKey) -> Result<Zeroizing<[u8; 32]>>;
    /// An ECDSA signature (r||s) over a SHA-256 digest.
    fn sign_p256_digest(&self, key: &TokenKey, digest: &[u8; 32]) -> Result<[u8; 64]>;
    /// The vault generation recorded under `label`, if any.
    fn read_generation(&self, label: &str) -> Result<Option<u64>>;
    /// Records `generation` under `label`.
    fn store_generation(&self, label: &str, generation: u64) -> Result<()>;
    /// Removes the records under `label`.
    fn delete_generation(&self, label: &str) -> Result<()>;
    /// Fails when the token or this session is gone.
    fn check_present(&self) -> Result<()>;
    /// Logs out and closes the session.
    fn close(self: Box<Self>);
}

impl Backend for crate::Module {
    fn tokens(&self) -> Result<Vec<TokenDescription>> {
        crate::Module::tokens(self)
    }

    fn select(&self, selector: &Selector) -> Result<TokenDescription> {
        crate::Module::select(self, selector)
    }

    fn open(&self, token: &TokenDescription) -> Result<Box<dyn Session>> {
        Ok(Box::new(crate::Module::open(self, token)?))
    }
}

impl Session for crate::TokenSession {
    fn token(&self) -> &TokenDescription {
        crate::TokenSession::token(self)
    }

    fn login(&mut self, pin: &SecretString, allow_final_try: bool) -> Result<()> {
        crate::TokenSession::login(self, pin, allow_final_try)
    }

    fn generate_p256(&self, label: &str, purpose: KeyPurpose) -> Result<TokenKey> {
        self.generate_p256_for(label, purpose)
    }

    fn generate_p256_in_piv_slot(
        &mut self,
        label: &str,
        purpose: KeyPurpose,
        slot: PivSlot,
        management_key: &SecretString,
        pin: &SecretString,
        certify: &SlotCertifier<'_>,
    ) -> Result<TokenKey> {
        crate::TokenSession::generate_p256_in_piv_slot(
            self,
            label,
            purpose,
            slot,
            management_key,
            pin,
            certify,
        )
    }

    fn find_p256_keys(&self, label: Option<&str>) -> Result<Vec<TokenKey>> {
        crate::TokenSession::find_p256_keys(self, label)
    }

    fn find_p256_signing_key(&self, object: &ObjectSelector) -> Result<TokenKey> {
        crate::TokenSession::find_p256_signing_key(self, object)
    }

    fn find_p256_derive_key(&self, object: &ObjectSelector) -> Result<TokenKey> {
        crate::TokenSession::find_p256_key(self, object, KeyPurpose::Derive)
    }

    fn ecdh(&self, key: &TokenKey, peer: &p256::PublicKey) -> Result<Zeroizing<[u8; 32]>> {
        crate::TokenSession::ecdh(self, key, peer)
    }

    fn sign_p256_digest(&self, key: &TokenKey, digest: &[u8; 32]) -> Result<[u8; 64]> {
        crate::TokenSession::sign_p256_digest(self, key, digest)
    }

    fn read_generation(&self, label: &str) -> Result<Option<u64>> {
        crate::TokenSession::read_generation(self, label)
    }

    fn store_generation(&self, label: &str, generation: u64) -> Result<()> {
        crate::TokenSession::store_generation(self, label, generation)
    }

    fn delete_generation(&self, label: &str) -> Result<()> {
        crate::TokenSession::delete_generation(self, label)
    }

    fn check_present(&self) -> Result<()> {
        crate::TokenSession::check_present(self)
    }

    fn close(self: Box<Self>) {
        crate::TokenSession::close(*self);
    }
}
