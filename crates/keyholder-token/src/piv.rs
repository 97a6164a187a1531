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
