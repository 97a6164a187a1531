//! A token in memory, for tests that run the daemon in-process: one token
//! with a PIN, P-256 keys, ECDH, ECDSA and generation records, like a
//! PKCS#11 token, plus the faults no software token here can produce on
//! request (the token vanishing, the PIN on its final try).
//!
//! Not a security boundary: its keys are ordinary heap memory. Built only
//! with the `software` feature, which nothing but tests enables.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use p256::ecdsa::signature::hazmat::PrehashSigner;
use secrecy::{ExposeSecret, SecretString};
use zeroize::Zeroizing;

use crate::backend::{Backend, Session};
use crate::{
    Error, KeyPurpose, ObjectSelector, PinStatus, Result, Selector, TokenDescription, TokenKey,
};

struct Key {
    label: String,
    purpose: KeyPurpose,
    public: TokenKey,
    secret: p256::SecretKey,
}

struct State {
    description: TokenDescription,
    pin: SecretString,
    present: bool,
    keys: Vec<Key>,
    records: HashMap<String, u64>,
    logins: u64,
}

/// One software token, shared by every session opened on it.
#[derive(Clone)]
pub struct SoftwareToken {
    state: Arc<Mutex<State>>,
}

impl std::fmt::Debug for SoftwareToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SoftwareToken").finish_non_exhaustive()
    }
}

impl SoftwareToken {
    /// A token labelled `label` whose user PIN is `pin`.
    pub fn new(label: &str, pin: &str) -> Self {
        let slot = cryptoki::slot::Slot::try_from(0u64).unwrap_or_else(|_| unreachable!());
        Self {
            state: Arc::new(Mutex::new(State {
                description: TokenDescription {
                    slot,
                    label: label.to_owned(),
                    serial: "0000soft".to_owned(),
                    manufacturer: "Keyholder".to_owned(),
                    model: "software".to_owned(),
                    pin: PinStatus::default(),
                },
                pin: SecretString::from(pin.to_owned()),
                present: true,
                keys: Vec::new(),
                records: HashMap::new(),
                logins: 0,
            })),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes the token away (every call fails as a removed token would), or
    /// puts it back.
    pub fn set_present(&self, present: bool) {
        self.state().present = present;
    }

    /// Sets the PIN flags the token reports.
    pub fn set_pin_status(&self, pin: PinStatus) {
        self.state().description.pin = pin;
    }

    /// How many logins succeeded.
    pub fn logins(&self) -> u64 {
        self.state().logins
    }
}

fn removed() -> Error {
    Error::TokenRemoved("the software token was taken away".into())
}

impl Backend for SoftwareToken {
    fn tokens(&self) -> Result<Vec<TokenDescription>> {
        let state = self.state();
        Ok(if state.present {
            vec![state.description.clone()]
        } else {
            Vec::new()
        })
    }

    fn select(&self, selector: &Selector) -> Result<TokenDescription> {
        let all = self.tokens()?;
        all.into_iter()
            .find(|t| selector.matches(t))
            .ok_or_else(|| Error::TokenNotFound {
                selector: selector.to_string(),
                present: "none matching".into(),
            })
    }

    fn open(&self, token: &TokenDescription) -> Result<Box<dyn Session>> {
        if !self.state().present {
            return Err(removed());
        }
        Ok(Box::new(SoftwareSession {
            token: self.clone(),
            description: token.clone(),
            logged_in: false,
        }))
    }
}

/// A session on a [`SoftwareToken`].
#[derive(Debug)]
pub struct SoftwareSession {
    token: SoftwareToken,
    description: TokenDescription,
    logged_in: bool,
}

impl SoftwareSession {
    fn state(&self) -> Result<MutexGuard<'_, State>> {
        let state = self.token.state();
        if !state.present {
            return Err(removed());
        }
        Ok(state)
    }

    fn user(&self) -> Result<MutexGuard<'_, State>> {
        let state = self.state()?;
        if !self.logged_in {
            return Err(Error::Pkcs11("CKR_USER_NOT_LOGGED_IN".into()));
        }
        Ok(state)
    }

    /// The one key `object` names, made for `purpose`.
    fn find_key(&self, object: &ObjectSelector, purpose: KeyPurpose) -> Result<TokenKey> {
        let state = self.user()?;
        let mut found = state.keys.iter().filter(|k| {
            k.purpose == purpose
                && object.label.as_deref().is_none_or(|l| l == k.label)
                && object.id.as_deref().is_none_or(|id| id == k.public.id)
        });
        match (found.next(), found.next()) {
            (Some(k), None) => Ok(k.public.clone()),
            (None, _) => Err(Error::KeyNotFound(format!("nothing matches {object:?}"))),
            (Some(_), Some(_)) => Err(Error::KeyNotFound(format!(
                "more than one key matches {object:?}"
            ))),
        }
    }
}

fn key_by_id<'a>(state: &'a State, key: &TokenKey) -> Result<&'a Key> {
    state
        .keys
        .iter()
        .find(|k| k.public.id == key.id)
        .ok_or_else(|| Error::KeyNotFound("no private key with the expected CKA_ID".into()))
}

impl Session for SoftwareSession {
    fn token(&self) -> &TokenDescription {
        &self.description
    }

    fn login(&mut self, pin: &SecretString, allow_final_try: bool) -> Result<()> {
        let mut state = self.state()?;
        let label = state.description.label.clone();
        let flags = state.description.pin;
        if flags.locked {
            return Err(Error::PinLocked { label });
        }
        if flags.final_try && !allow_final_try {
            return Err(Error::PinFinalTry { label });
        }
        if pin.expose_secret() != state.pin.expose_secret() {
            state.description.pin.count_low = true;
            return Err(Error::PinIncorrect {
                label,
                count_low: true,
                final_try: flags.final_try,
            });
        }
        state.description.pin = PinStatus::default();
        state.logins += 1;
        drop(state);
        self.logged_in = true;
        Ok(())
    }

    fn generate_p256(&self, label: &str, purpose: KeyPurpose) -> Result<TokenKey> {
        let mut state = self.user()?;
        let secret = p256::SecretKey::random(&mut rand::rngs::OsRng);
        let mut id = vec![0u8; 16];
        rand::Rng::fill(&mut rand::rngs::OsRng, id.as_mut_slice());
        let public = TokenKey {
            id,
            public: secret.public_key(),
        };
        state.keys.push(Key {
            label: label.to_owned(),
            purpose,
            public: public.clone(),
            secret,
        });
        Ok(public)
    }

    /// The software token has no PIV slots.
    fn generate_p256_in_piv_slot(
        &mut self,
        _label: &str,
        _purpose: KeyPurpose,
        _slot: crate::PivSlot,
        _management_key: &SecretString,
        _pin: &SecretString,
        _certify: &crate::SlotCertifier<'_>,
    ) -> Result<TokenKey> {
        Err(Error::Unsupported {
            function: "C_GenerateKeyPair".into(),
            code: "CKR_FUNCTION_NOT_SUPPORTED".into(),
        })
    }

    fn find_p256_keys(&self, label: Option<&str>) -> Result<Vec<TokenKey>> {
        let state = self.state()?;
        Ok(state
            .keys
            .iter()
            .filter(|k| label.is_none_or(|l| k.label == l) && k.purpose == KeyPurpose::Derive)
            .map(|k| k.public.clone())
            .collect())
    }

    fn find_p256_signing_key(&self, object: &ObjectSelector) -> Result<TokenKey> {
        self.find_key(object, KeyPurpose::Sign)
    }

    fn find_p256_derive_key(&self, object: &ObjectSelector) -> Result<TokenKey> {
        self.find_key(object, KeyPurpose::Derive)
    }

    fn ecdh(&self, key: &TokenKey, peer: &p256::PublicKey) -> Result<Zeroizing<[u8; 32]>> {
        let state = self.user()?;
        let k = key_by_id(&state, key)?;
        if k.purpose != KeyPurpose::Derive {
            return Err(Error::Pkcs11("CKR_KEY_FUNCTION_NOT_PERMITTED".into()));
        }
        let shared = p256::ecdh::diffie_hellman(k.secret.to_nonzero_scalar(), peer.as_affine());
        let mut out = Zeroizing::new([0u8; 32]);
        out.copy_from_slice(shared.raw_secret_bytes());
        Ok(out)
    }

    fn sign_p256_digest(&self, key: &TokenKey, digest: &[u8; 32]) -> Result<[u8; 64]> {
        let state = self.user()?;
        let k = key_by_id(&state, key)?;
        if k.purpose != KeyPurpose::Sign {
            return Err(Error::Pkcs11("CKR_KEY_FUNCTION_NOT_PERMITTED".into()));
        }
        let signing = p256::ecdsa::SigningKey::from(&k.secret);
        let sig: p256::ecdsa::Signature = signing
            .sign_prehash(digest)
            .map_err(|e| Error::Pkcs11(format!("ECDSA: {e}")))?;
        let mut out = [0u8; 64];
        out.copy_from_slice(&sig.to_bytes());
        Ok(out)
    }

    fn read_generation(&self, label: &str) -> Result<Option<u64>> {
        Ok(self.user()?.records.get(label).copied())
    }

    fn store_generation(&self, label: &str, generation: u64) -> Result<()> {
        self.user()?.records.insert(label.to_owned(), generation);
        Ok(())
    }

    fn delete_generation(&self, label: &str) -> Result<()> {
        self.user()?.records.remove(label);
        Ok(())
    }

    fn check_present(&self) -> Result<()> {
        self.state().map(drop)
    }

    fn close(self: Box<Self>) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_agree_sign_and_vanish_with_the_token() {
        let token = SoftwareToken::new("soft", "1234");
        let desc = token.select(&Selector::label("soft")).unwrap();
        let mut session = token.open(&desc).unwrap();
        assert!(matches!(
            session.login(&SecretString::from("0000".to_owned()), false),
            Err(Error::PinIncorrect { .. })
        ));
        session
            .login(&SecretString::from("1234".to_owned()), false)
            .unwrap();
        let derive = session.generate_p256("v", KeyPurpose::Derive).unwrap();
        let peer = p256::SecretKey::random(&mut rand::rngs::OsRng);
        let ours = session.ecdh(&derive, &peer.public_key()).unwrap();
        let theirs =
            p256::ecdh::diffie_hellman(peer.to_nonzero_scalar(), derive.public.as_affine());
        assert_eq!(ours.as_slice(), theirs.raw_secret_bytes().as_slice());
        let sign = session.generate_p256("s", KeyPurpose::Sign).unwrap();
        let digest = [7u8; 32];
        let rs = session.sign_p256_digest(&sign, &digest).unwrap();
        let sig = p256::ecdsa::Signature::from_slice(&rs).unwrap();
        let verifying = p256::ecdsa::VerifyingKey::from(&sign.public);
        p256::ecdsa::signature::hazmat::PrehashVerifier::verify_prehash(&verifying, &digest, &sig)
            .unwrap();
        token.set_present(false);
        assert!(matches!(
            session.check_present(),
            Err(Error::TokenRemoved(_))
        ));
        assert!(matches!(
            session.sign_p256_digest(&sign, &digest),
            Err(Error::TokenRemoved(_))
        ));
    }
}
