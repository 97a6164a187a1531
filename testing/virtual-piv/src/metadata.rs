//! GET METADATA (INS 0xF7) for the asymmetric key slots, which piv-authenticator does not
//! answer: what a key was generated with, recorded from GENERATE ASYMMETRIC KEY PAIR
//! (INS 0x47) as it passes, and kept in a file beside the card's storage.
//!
//! Answer layout (Yubico's PIV extension): 01 algorithm, 02 PIN and touch policy,
//! 03 origin (1: generated on the card), 04 the public key as GENERATE returns it inside
//! 7F49 (86 point for EC, 81 modulus 82 exponent for RSA).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// PIN policy "once", "always"; touch policy "never" (Yubico's encoding).
const PIN_ONCE: u8 = 0x02;
const PIN_ALWAYS: u8 = 0x03;
const TOUCH_NEVER: u8 = 0x01;
const ORIGIN_GENERATED: u8 = 0x01;
/// The digital signature slot, whose default PIN policy is "always".
const SLOT_SIGNATURE: u8 = 0x9C;

#[derive(Clone, Debug, PartialEq, Eq)]
struct Entry {
    algorithm: u8,
    pin_policy: u8,
    touch_policy: u8,
    public: Vec<u8>,
}

pub struct Metadata {
    file: Option<PathBuf>,
    slots: BTreeMap<u8, Entry>,
}

/// Reads one BER-TLV at the start of `data` (tags of one or two bytes, definite lengths
/// of up to two bytes): (tag, value, rest).
fn tlv(data: &[u8]) -> Option<(u16, &[u8], &[u8])> {
    let (&first, rest) = data.split_first()?;
    let (tag, rest) = if first & 0x1F == 0x1F {
        let (&second, rest) = rest.split_first()?;
        (u16::from_be_bytes([first, second]), rest)
    } else {
        (u16::from(first), rest)
    };
    let (&len0, rest) = rest.split_first()?;
    let (len, rest) = match len0 {
        0x00..=0x7F => (usize::from(len0), rest),
        0x81 => {
            let (&l, rest) = rest.split_first()?;
            (usize::from(l), rest)
        }
        0x82 => {
            let (l, rest) = rest.split_at_checked(2)?;
            (usize::from(u16::from_be_bytes([l[0], l[1]])), rest)
        }
        _ => return None,
    };
    let (value, rest) = rest.split_at_checked(len)?;
    Some((tag, value, rest))
}

fn find(mut data: &[u8], wanted: u16) -> Option<&[u8]> {
    while !data.is_empty() {
        let (tag, value, rest) = tlv(data)?;
        if tag == wanted {
            return Some(value);
        }
        data = rest;
    }
    None
}

fn push_tlv(out: &mut Vec<u8>, tag: u8, value: &[u8]) {
    out.push(tag);
    match value.len() {
        n @ 0..=0x7F => out.push(n as u8),
        n @ 0x80..=0xFF => out.extend_from_slice(&[0x81, n as u8]),
        n => {
            let n = u16::try_from(n).unwrap_or(u16::MAX);
            out.push(0x82);
            out.extend_from_slice(&n.to_be_bytes());
        }
    }
    out.extend_from_slice(value);
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

impl Metadata {
    /// Loads the records kept in `file` (none if it does not exist yet).
    pub fn load(file: Option<&Path>) -> Result<Self, String> {
        let mut slots = BTreeMap::new();
        if let Some(path) = file {
            match std::fs::read_to_string(path) {
                Ok(text) => {
                    for line in text.lines().filter(|l| !l.trim().is_empty()) {
                        let (slot, entry) = Self::parse_line(line)
                            .ok_or_else(|| format!("{}: bad line {line:?}", path.display()))?;
                        slots.insert(slot, entry);
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(format!("{}: {e}", path.display())),
            }
        }
        Ok(Self {
            file: file.map(Path::to_path_buf),
            slots,
        })
    }

    fn parse_line(line: &str) -> Option<(u8, Entry)> {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [slot, algorithm, pin_policy, touch_policy, public] = fields.as_slice() else {
            return None;
        };
        let byte = |s: &str| u8::from_str_radix(s, 16).ok();
        Some((
            byte(slot)?,
            Entry {
                algorithm: byte(algorithm)?,
                pin_policy: byte(pin_policy)?,
                touch_policy: byte(touch_policy)?,
                public: unhex(public)?,
            },
        ))
    }

    fn save(&self) -> Result<(), String> {
        let Some(path) = &self.file else {
            return Ok(());
        };
        let mut text = String::new();
        for (slot, e) in &self.slots {
            text.push_str(&format!(
                "{slot:02x} {:02x} {:02x} {:02x} {}\n",
                e.algorithm,
                e.pin_policy,
                e.touch_policy,
                hex(&e.public)
            ));
        }
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, text)
            .and_then(|()| std::fs::rename(&tmp, path))
            .map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Records a key pair the card generated: `command` is GENERATE's data (AC { 80 alg,
    /// [AA pin policy], [AB touch policy] }), `answer` its answer (7F49 { public key }).
    pub fn generated(&mut self, slot: u8, command: &[u8], answer: &[u8]) -> Result<(), String> {
        let template = find(command, 0xAC).ok_or("GENERATE without control template")?;
        let algorithm = find(template, 0x80)
            .and_then(|a| a.first().copied())
            .ok_or("GENERATE without algorithm")?;
        let default_pin = if slot == SLOT_SIGNATURE {
            PIN_ALWAYS
        } else {
            PIN_ONCE
        };
        // 0 is "default" in a request.
        let policy = |tag, default| match find(template, tag).and_then(|p| p.first().copied()) {
            None | Some(0) => default,
            Some(p) => p,
        };
        let public = find(answer, 0x7F49).ok_or("GENERATE answer without public key")?;
        self.slots.insert(
            slot,
            Entry {
                algorithm,
                pin_policy: policy(0xAA, default_pin),
                touch_policy: policy(0xAB, TOUCH_NEVER),
                public: public.to_vec(),
            },
        );
        self.save()
    }

    /// Forgets a slot's key (replaced by an imported one, whose public key is not known).
    pub fn forget(&mut self, slot: u8) -> Result<(), String> {
        if self.slots.remove(&slot).is_some() {
            self.save()?;
        }
        Ok(())
    }

    /// Forgets everything (the PIV application was reset).
    pub fn clear(&mut self) -> Result<(), String> {
        self.slots.clear();
        self.save()
    }

    /// The answer to GET METADATA for `slot`, if a key generated there is known.
    pub fn answer(&self, slot: u8) -> Option<Vec<u8>> {
        let e = self.slots.get(&slot)?;
        let mut out = Vec::new();
        push_tlv(&mut out, 0x01, &[e.algorithm]);
        push_tlv(&mut out, 0x02, &[e.pin_policy, e.touch_policy]);
        push_tlv(&mut out, 0x03, &[ORIGIN_GENERATED]);
        push_tlv(&mut out, 0x04, &e.public);
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_and_answers_a_generated_p256_key() {
        let mut m = Metadata::load(None).unwrap();
        let point: Vec<u8> = std::iter::once(4).chain(1..=64).collect();
        let mut answer = vec![0x7F, 0x49, 67, 0x86, 65];
        answer.extend_from_slice(&point);
        m.generated(0x9D, &[0xAC, 3, 0x80, 1, 0x11], &answer)
            .unwrap();
        let got = m.answer(0x9D).unwrap();
        let mut want = vec![
            1,
            1,
            0x11,
            2,
            2,
            PIN_ONCE,
            TOUCH_NEVER,
            3,
            1,
            1,
            4,
            67,
            0x86,
            65,
        ];
        want.extend_from_slice(&point);
        assert_eq!(got, want);
        assert_eq!(m.answer(0x9A), None);
        assert_eq!(
            Metadata::parse_line(&format!("9d 11 02 01 {}", hex(&answer[3..]))),
            Some((0x9D, m.slots[&0x9D].clone()))
        );
    }

    #[test]
    fn signature_slot_defaults_to_pin_always_and_policies_are_kept() {
        let mut m = Metadata::load(None).unwrap();
        let answer = [0x7F, 0x49, 3, 0x86, 1, 4];
        m.generated(0x9C, &[0xAC, 3, 0x80, 1, 0x11], &answer)
            .unwrap();
        assert_eq!(m.slots[&0x9C].pin_policy, PIN_ALWAYS);
        m.generated(
            0x82,
            &[0xAC, 9, 0x80, 1, 0x14, 0xAA, 1, 1, 0xAB, 1, 2],
            &answer,
        )
        .unwrap();
        assert_eq!(
            (m.slots[&0x82].pin_policy, m.slots[&0x82].touch_policy),
            (1, 2)
        );
    }

    #[test]
    fn rejects_truncated_input() {
        let mut m = Metadata::load(None).unwrap();
        assert!(m.generated(0x9D, &[0xAC, 5, 0x80], &[]).is_err());
        assert!(m
            .generated(0x9D, &[0xAC, 3, 0x80, 1, 0x11], &[0x7F, 0x49, 9])
            .is_err());
        assert_eq!(tlv(&[0x82]), None);
        assert_eq!(Metadata::parse_line("9d 11 02"), None);
    }
}
