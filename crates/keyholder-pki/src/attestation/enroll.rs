//! The decision at enrollment: given what a PIV card says about a key (its
//! origin, its attestation certificate in slot f9, its attestation of the
//! key), is the key enrolled, as attested or not, or refused?
//!
//! - A key the card reports as imported is refused unless allowed.
//! - A card with no attestation certificate (no f9, as on the virtual card
//!   or on cards that are not YubiKeys) enrolls the key "not attested".
//! - A card with one that refuses to attest the key is treated as having
//!   an imported key (a YubiKey attests every key generated on it, never an
//!   imported one): refused unless allowed.
//! - An attestation that does not verify (chain, signature, key, slot, or
//!   Yubico's extensions) is refused: it means the card or the key is not
//!   what it claims, or a root is missing (`--attestation-root`).

use super::{
    Anchor, Attestation, AttestationError, AttestationRoots, MAX_INTERMEDIATES,
    YUBICO_PIV_INTERMEDIATES_PEM, pem_certificates, verify_piv_attestation,
};

/// What the card said about the key being enrolled.
#[derive(Clone, Copy, Debug)]
pub struct Evidence<'a> {
    /// The key's slot (0x9d).
    pub slot: u8,
    /// The key as the card returned it (SEC1 point).
    pub enrolled_key: &'a [u8],
    /// `Some(true)` when the card says the key was imported, `Some(false)`
    /// when it says generated on it, `None` when it does not say.
    pub imported: Option<bool>,
    /// DER of the card's attestation certificate (slot f9), if it has one.
    pub card_certificate: Option<&'a [u8]>,
    /// The card's attestation of the key (DER), or why it gave none; `None`
    /// when not asked.
    pub attestation: Option<Result<&'a [u8], &'a str>>,
}

/// The key is enrolled; this is what is known of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The attestation verified.
    Attested(Attestation),
    /// No attestation, and why.
    NotAttested {
        /// In words, for the user and the vault.
        reason: String,
    },
}

/// Why a key is not enrolled.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Refusal {
    /// The card says the key was imported.
    #[error(
        "the key in PIV slot {slot:02x} was imported into the card, not generated on it, so a \
         copy of it may exist elsewhere; to enroll it anyway add --allow-imported-key"
    )]
    Imported {
        /// The slot.
        slot: u8,
    },
    /// The card has an attestation certificate but would not attest the key.
    #[error(
        "the card would not attest the key in PIV slot {slot:02x} ({reason}); a YubiKey attests \
         every key generated on it and no imported one, so this key was most likely imported \
         (a copy of it may exist elsewhere); to enroll it anyway add --allow-imported-key"
    )]
    NotAttestable {
        /// The slot.
        slot: u8,
        /// What the card answered.
        reason: String,
    },
    /// The attestation does not verify.
    #[error(
        "the card's attestation of the key does not verify: {0}; a card whose attestation \
         certificate (slot f9) an organisation issued needs that issuer configured \
         (--attestation-root)"
    )]
    Invalid(AttestationError),
    /// The card attested another slot than the key's.
    #[error("the card's attestation is for {attested}, not for PIV slot {slot:02x}")]
    WrongSlot {
        /// The key's slot.
        slot: u8,
        /// The attestation's subject.
        attested: String,
    },
}

/// The built-in Yubico intermediates (DER), followed by `extra`.
fn intermediates(extra: &[Vec<u8>]) -> Vec<Vec<u8>> {
    let mut out = pem_certificates(YUBICO_PIV_INTERMEDIATES_PEM).unwrap_or_default();
    out.extend(extra.iter().cloned());
    out.truncate(MAX_INTERMEDIATES);
    out
}

/// Decides whether the key is enrolled (see the module docs).
/// `extra_intermediates` are passed to the chain check after Yubico's
/// built-in ones (at most [`MAX_INTERMEDIATES`] in all are used).
pub fn decide(
    evidence: &Evidence<'_>,
    roots: &AttestationRoots,
    extra_intermediates: &[Vec<u8>],
    allow_imported: bool,
) -> Result<Outcome, Refusal> {
    let slot = evidence.slot;
    if evidence.imported == Some(true) {
        if !allow_imported {
            return Err(Refusal::Imported { slot });
        }
        return Ok(Outcome::NotAttested {
            reason: "the key was imported into the card (enrolled with --allow-imported-key)"
                .into(),
        });
    }
    let Some(card) = evidence.card_certificate else {
        return Ok(Outcome::NotAttested {
            reason: "the card has no attestation certificate (slot f9)".into(),
        });
    };
    let attestation = match evidence.attestation {
        None => {
            return Ok(Outcome::NotAttested {
                reason: "the card was not asked for an attestation".into(),
            });
        }
        Some(Err(reason)) if allow_imported => {
            return Ok(Outcome::NotAttested {
                reason: format!(
                    "the card would not attest the key ({reason}; enrolled with \
                     --allow-imported-key)"
                ),
            });
        }
        Some(Err(reason)) => {
            return Err(Refusal::NotAttestable {
                slot,
                reason: reason.to_owned(),
            });
        }
        Some(Ok(der)) => der,
    };
    let inters = intermediates(extra_intermediates);
    let inter_refs: Vec<&[u8]> = inters.iter().map(Vec::as_slice).collect();
    let verified =
        verify_piv_attestation(attestation, card, &inter_refs, roots, evidence.enrolled_key)
            .map_err(Refusal::Invalid)?;
    if verified.slot() != Some(slot) {
        return Err(Refusal::WrongSlot {
            slot,
            attested: verified.subject.clone(),
        });
    }
    Ok(Outcome::Attested(verified))
}

/// One line saying what a verified attestation showed.
pub fn describe(a: &Attestation) -> String {
    let anchor = match a.anchor {
        Anchor::BuiltIn => "built-in Yubico root",
        Anchor::Configured => "configured root",
    };
    let form = a.form_factor.map(|f| format!(", {f}")).unwrap_or_default();
    format!(
        "generated on the card: YubiKey serial {}, firmware {}{form}, PIN policy {}, touch \
         policy {}; chain to {anchor} \"{}\"",
        a.serial, a.firmware, a.pin_policy, a.touch_policy, a.root_subject
    )
}
