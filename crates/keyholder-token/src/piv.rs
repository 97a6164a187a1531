//! PIV key slots as PKCS#11 modules for PIV cards show them.
//!
//! A PIV card (a YubiKey, a smart card) has fixed key slots instead of free
//! object storage. Yubico's `ykcs11` and OpenSC's PIV driver both give the
//! key in a slot a fixed one-byte `CKA_ID`: 01 for 9a (authentication), 02
//! for 9c (signature), 03 for 9d (key management), 04 for 9e (card
//! authentication), and 05 to 18 for the retired key-management slots 82 to
//! 95. A key can be generated only with that id, and only by the security
//! officer, whose PIN is the card's management key (hex).

use std::fmt;
use std::str::FromStr;

/// A PIV key slot: 9a, 9c, 9d, 9e, or a retired slot 82–95.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PivSlot(u8);

impl PivSlot {
    /// The key-management slot, where a PIV card keeps its ECDH key.
    pub const KEY_MANAGEMENT: Self = Self(0x9d);

    /// The slot's number as PIV names it (0x9d for "9d").
    pub fn number(self) -> u8 {
        self.0
    }

    /// Every key slot, in the order of their `CKA_ID`s (9a, 9c, 9d, 9e, 82
    /// to 95).
    pub fn all() -> impl Iterator<Item = Self> {
        [0x9a, 0x9c, 0x9d, 0x9e]
            .into_iter()
            .chain(0x82..=0x95)
            .map(Self)
    }

    /// The slot whose key ykcs11 and OpenSC show with this `CKA_ID`.
    pub fn from_pkcs11_id(id: &[u8]) -> Option<Self> {
        match id {
            [0x01] => Some(Self(0x9a)),
            [0x02] => Some(Self(0x9c)),
            [0x03] => Some(Self(0x9d)),
            [0x04] => Some(Self(0x9e)),
            [n @ 0x05..=0x18] => Some(Self(n - 0x05 + 0x82)),
            _ => None,
        }
    }

    /// The `CKA_ID` ykcs11 and OpenSC give the key in this slot.
    pub fn pkcs11_id(self) -> u8 {
        match self.0 {
            0x9a => 0x01,
            0x9c => 0x02,
            0x9d => 0x03,
            0x9e => 0x04,
            // 0x82..=0x95, checked when the slot was made.
            n => n - 0x82 + 0x05,
        }
    }
}

impl fmt::Display for PivSlot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:02x}", self.0)
    }
}

impl FromStr for PivSlot {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let hex = s.trim().trim_start_matches("0x").trim_start_matches("0X");
        let n = u8::from_str_radix(hex, 16).ok().filter(|_| hex.len() == 2);
        match n {
            Some(n @ (0x9a | 0x9c | 0x9d | 0x9e | 0x82..=0x95)) => Ok(Self(n)),
            _ => Err(format!(
                "{s:?} is not a PIV key slot: use 9a, 9c, 9d, 9e or a retired slot 82 to 95"
            )),
        }
    }
}

/// A PIV key's PIN policy, as chosen at generation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PivPinPolicy {
    /// The PIN once per session (what ykcs11 can use).
    #[default]
    Once,
    /// The PIN before every use of the key (the native backend verifies it
    /// again before each operation; ykcs11 cannot use such a vault key).
    Always,
}

impl fmt::Display for PivPinPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Once => "once",
            Self::Always => "always",
        })
    }
}

impl FromStr for PivPinPolicy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "" | "once" => Ok(Self::Once),
            "always" => Ok(Self::Always),
            other => Err(format!("{other:?} is not a PIN policy: use once or always")),
        }
    }
}

/// A PIV key's touch policy, as chosen at generation (YubiKey 4 and 5).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PivTouchPolicy {
    /// No touch.
    #[default]
    Never,
    /// A touch, then none for 15 seconds.
    Cached,
    /// A touch for every operation with the key.
    Always,
}

impl PivTouchPolicy {
    /// Whether an operation with the key may wait for a touch.
    pub fn needs_touch(self) -> bool {
        self != Self::Never
    }
}

impl fmt::Display for PivTouchPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Never => "never",
            Self::Cached => "cached",
            Self::Always => "always",
        })
    }
}

impl FromStr for PivTouchPolicy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "" | "never" => Ok(Self::Never),
            "cached" => Ok(Self::Cached),
            "always" => Ok(Self::Always),
            other => Err(format!(
                "{other:?} is not a touch policy: use never, cached or always"
            )),
        }
    }
}

/// How a key is generated in a PIV slot.
#[derive(Clone, Debug, Default)]
pub struct PivGeneration {
    /// PIN policy of the new key.
    pub pin_policy: PivPinPolicy,
    /// Touch policy of the new key.
    pub touch_policy: PivTouchPolicy,
    /// Before generating, replace the factory default management key by a
    /// random one kept in the card's PIN-protected data object (the scheme
    /// `ykman piv access change-management-key --protect` uses).
    pub protect_management_key: bool,
}

impl PivGeneration {
    /// Whether this asks for nothing beyond what any PIV module can do.
    pub fn is_plain(&self) -> bool {
        self.pin_policy == PivPinPolicy::Once
            && self.touch_policy == PivTouchPolicy::Never
            && !self.protect_management_key
    }
}

/// Where a PIV key came from, as the card says (GET METADATA).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PivKeyOrigin {
    /// Generated on the card.
    Generated,
    /// Imported into the card: it existed outside it.
    Imported,
}

/// What a PIV card tells about one of its keys, for enrollment: the card,
/// the key's policies and origin, and the material to verify its
/// attestation with.
#[derive(Clone, Debug, Default)]
pub struct PivKeyFacts {
    /// The key's slot, as PIV names it ("9d").
    pub slot: String,
    /// The card's serial.
    pub serial: String,
    /// The card's firmware version ("5.4.3").
    pub firmware: String,
    /// The key's PIN policy as the card reports it ("once"), if it does.
    pub pin_policy: Option<String>,
    /// The key's touch policy as the card reports it ("cached"), if it does.
    pub touch_policy: Option<String>,
    /// Generated or imported, if the card says.
    pub origin: Option<PivKeyOrigin>,
    /// DER of the card's attestation certificate (slot f9), when it has one.
    pub card_certificate: Option<Vec<u8>>,
    /// DER of the card's attestation of the key (ATTEST), or why the card
    /// gave none; `None` when there is no f9 certificate to check it with.
    pub attestation: Option<Result<Vec<u8>, String>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_map_to_the_ids_piv_modules_use() {
        let id = |s: &str| s.parse::<PivSlot>().map(PivSlot::pkcs11_id);
        assert_eq!(id("9a"), Ok(0x01));
        assert_eq!(id("9c"), Ok(0x02));
        assert_eq!(id("9d"), Ok(0x03));
        assert_eq!(id("9E"), Ok(0x04));
        assert_eq!(id("82"), Ok(0x05));
        assert_eq!(id("0x95"), Ok(0x18));
        assert_eq!(PivSlot::KEY_MANAGEMENT.to_string(), "9d");
    }

    #[test]
    fn ids_map_back_to_their_slots() {
        for slot in PivSlot::all() {
            assert_eq!(PivSlot::from_pkcs11_id(&[slot.pkcs11_id()]), Some(slot));
        }
        assert_eq!(PivSlot::all().count(), 24);
        for bad in [&[][..], &[0x00], &[0x19], &[0x01, 0x01]] {
            assert_eq!(PivSlot::from_pkcs11_id(bad), None);
        }
    }

    #[test]
    fn anything_else_is_refused_by_name() {
        for bad in ["9b", "f9", "81", "96", "9", "09d", "", "zz", "9d9d"] {
            let err = bad.parse::<PivSlot>().expect_err(bad);
            assert!(err.contains("not a PIV key slot"), "{err}");
        }
    }
}
