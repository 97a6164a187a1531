//! YubiKeys reached natively: the PIV application over PC/SC, through the
//! `yubikey` crate, with no PKCS#11 module in between.
//!
//! The key slots, and the `CKA_ID`s naming them, are those ykcs11 shows (01
//! = 9a, 02 = 9c, 03 = 9d, 04 = 9e, 05 to 18 = retired 82 to 95), and the
//! label is ykcs11's (`YubiKey PIV #<serial>`), so the same URIs and the
//! same token selectors name the same keys either way, and a vault made
//! through ykcs11 opens here and the other way round (the vault's recipient
//! is the key's public point).
//!
//! The card is shared, not held: every operation connects to the card (in
//! PC/SC shared mode), does its work inside one PC/SC transaction, and
//! disconnects. Between operations `ykman`, `yubico-piv-tool` or gpg use
//! the card as if Keyholder were not there. A card forgets a verified PIN
//! when it is reset or when another program selects an application, so the
//! session keeps the PIN (a [`SecretString`], wiped on [`Session::close`],
//! that is on lock) and verifies it again at the start of each private-key
//! operation; after one it resets the card so the verification is not left
//! behind for other programs. A PIN the card refuses then is dropped at
//! once, so a PIN changed behind Keyholder's back costs at most one try.
//!
//! What PIV cannot do: free-form objects (so no rollback record: such a
//! vault is made with `--without-rollback-protection`), keys outside the
//! fixed slots (plain key generation is refused with a pointer to
//! `--piv-slot`), and AES management keys (the `yubikey` crate 0.8 speaks
//! 3DES only).

use std::collections::HashMap;
use std::sync::Mutex;

use p256::elliptic_curve::sec1::ToEncodedPoint;
use secrecy::{ExposeSecret, SecretString};
use yubikey::certificate::{CertInfo, Certificate};
use yubikey::piv::{self, AlgorithmId, ManagementAlgorithmId, SlotId};
use yubikey::{MgmKey, PinPolicy, Serial, TouchPolicy, YubiKey};
use zeroize::Zeroizing;

use crate::backend::{Backend, Session};
use crate::{
    Error, KeyPurpose, ObjectSelector, PinStatus, PivGeneration, PivKeyFacts, PivKeyOrigin,
    PivPinPolicy, PivSlot, PivTouchPolicy, Result, Selector, SlotCertifier, TokenDescription,
    TokenKey,
};

/// The manufacturer every YubiKey reports here.
pub const MANUFACTURER: &str = "Yubico";

/// The PIV management key YubiKeys leave the factory with (3DES).
pub const DEFAULT_MANAGEMENT_KEY: &str = "010203040506070801020304050607080102030405060708";

/// PIV tries a YubiKey's PIN has out of the box.
const DEFAULT_PIN_TRIES: u8 = 3;

/// The YubiKeys on this machine's PC/SC readers.
#[derive(Clone, Debug, Default)]
pub struct YubiKeyBackend {
    _private: (),
}

impl YubiKeyBackend {
    /// The backend; nothing is opened until a call needs the card.
    pub fn new() -> Self {
        Self::default()
    }
}

/// Whether a PC/SC error says the reader, the card or pcscd is gone.
fn pcsc_gone(e: pcsc::Error) -> bool {
    matches!(
        e,
        pcsc::Error::NoService
            | pcsc::Error::ServiceStopped
            | pcsc::Error::ReaderUnavailable
            | pcsc::Error::RemovedCard
            | pcsc::Error::NoSmartcard
            | pcsc::Error::UnknownReader
            | pcsc::Error::NoReadersAvailable
            | pcsc::Error::ResetCard
            | pcsc::Error::UnpoweredCard
            | pcsc::Error::UnresponsiveCard
            | pcsc::Error::InvalidHandle
            | pcsc::Error::CommError
    )
}

fn map_err(e: yubikey::Error) -> Error {
    match e {
        yubikey::Error::PcscError { inner: Some(p) } if pcsc_gone(p) => {
            Error::TokenRemoved(format!("PC/SC: {p}"))
        }
        yubikey::Error::PcscError {
            inner: Some(pcsc::Error::SharingViolation),
        } => Error::Piv(
            "another program holds the card exclusively (PC/SC sharing violation); \
             try again when it is done"
                .into(),
        ),
        other => Error::Piv(format!(
            "{other} ({})",
            other.name().unwrap_or("YKPIV_ERROR")
        )),
    }
}

fn slot_id(slot: PivSlot) -> Result<SlotId> {
    SlotId::try_from(slot.number()).map_err(|_| Error::Piv(format!("no PIV slot {slot}")))
}

/// Connects to the YubiKey with this serial (shared mode).
fn connect(serial: Serial) -> Result<YubiKey> {
    YubiKey::open_by_serial(serial).map_err(|e| match e {
        yubikey::Error::NotFound => {
            Error::TokenRemoved(format!("no YubiKey with serial {serial} is present"))
        }
        e => map_err(e),
    })
}

/// Disconnects; `reset` clears what this connection verified (the PIN), so
/// it is not left behind for other programs.
fn release(yk: YubiKey, reset: bool) {
    let how = if reset {
        pcsc::Disposition::ResetCard
    } else {
        pcsc::Disposition::LeaveCard
    };
    if let Err((_, e)) = yk.disconnect(how) {
        tracing::debug!(error = %e, "disconnecting from the YubiKey failed");
    }
}

fn describe(index: usize, yk: &mut YubiKey) -> TokenDescription {
    let slot = cryptoki::slot::Slot::try_from(u64::try_from(index).unwrap_or(u64::MAX))
        .unwrap_or_else(|_| unreachable!("any u64 is a slot id"));
    let pin = match yk.get_pin_retries() {
        Ok(tries) => PinStatus {
            count_low: tries < DEFAULT_PIN_TRIES,
            final_try: tries == 1,
            locked: tries == 0,
        },
        Err(e) => {
            tracing::debug!(error = %e, "cannot read the PIN retry counter");
            PinStatus::default()
        }
    };
    TokenDescription {
        slot,
        label: format!("YubiKey PIV #{}", yk.serial()),
        serial: yk.serial().to_string(),
        manufacturer: MANUFACTURER.to_owned(),
        model: format!("YubiKey {}", yk.version()),
        pin,
    }
}

impl Backend for YubiKeyBackend {
    fn tokens(&self) -> Result<Vec<TokenDescription>> {
        let mut ctx = match yubikey::reader::Context::open() {
            Ok(ctx) => ctx,
            Err(yubikey::Error::PcscError {
                inner: Some(pcsc::Error::NoReadersAvailable),
            }) => return Ok(Vec::new()),
            Err(yubikey::Error::PcscError {
                inner: Some(e @ (pcsc::Error::NoService | pcsc::Error::ServiceStopped)),
            }) => {
                return Err(Error::Piv(format!(
                    "cannot reach the PC/SC service (is pcscd running?): {e}"
                )));
            }
            Err(e) => return Err(map_err(e)),
        };
        let readers = match ctx.iter() {
            Ok(r) => r,
            Err(yubikey::Error::PcscError {
                inner: Some(pcsc::Error::NoReadersAvailable),
            }) => return Ok(Vec::new()),
            Err(e) => return Err(map_err(e)),
        };
        let mut out = Vec::new();
        for (index, reader) in readers.enumerate() {
            match reader.open() {
                Ok(mut yk) => {
                    out.push(describe(index, &mut yk));
                    release(yk, false);
                }
                Err(e) => {
                    tracing::debug!(reader = %reader.name(), error = %e, "not a usable YubiKey");
                }
            }
        }
        Ok(out)
    }

    fn select(&self, selector: &Selector) -> Result<TokenDescription> {
        crate::select_from(self.tokens()?, selector)
    }

    fn open(&self, token: &TokenDescription) -> Result<Box<dyn Session>> {
        let serial: Serial = token
            .serial
            .parse()
            .map_err(|_| Error::Piv(format!("{:?} is not a YubiKey serial", token.serial)))?;
        let yk = connect(serial)?;
        let reader = yk.name().to_owned();
        release(yk, false);
        let events = reader_events(&reader)?;
        Ok(Box::new(YubiKeySession {
            token: token.clone(),
            serial,
            pin: Mutex::new(None),
            touch: Mutex::new(HashMap::new()),
            reader,
            events,
        }))
    }
}

/// The reader's card-event counter (pcsc-lite counts insertions and
/// removals), failing when the reader or its card is gone.
fn reader_events(reader: &str) -> Result<u32> {
    let gone = |why: String| Error::TokenRemoved(format!("YubiKey reader {reader:?}: {why}"));
    let ctx = pcsc::Context::establish(pcsc::Scope::System).map_err(|e| gone(e.to_string()))?;
    let name = std::ffi::CString::new(reader).map_err(|_| gone("bad reader name".into()))?;
    let mut states = [pcsc::ReaderState::new(name, pcsc::State::UNAWARE)];
    ctx.get_status_change(std::time::Duration::ZERO, &mut states)
        .map_err(|e| gone(e.to_string()))?;
    let state = states[0].event_state();
    if state.intersects(pcsc::State::UNKNOWN | pcsc::State::UNAVAILABLE | pcsc::State::IGNORE) {
        return Err(gone("the reader is gone".into()));
    }
    if !state.contains(pcsc::State::PRESENT) || state.contains(pcsc::State::MUTE) {
        return Err(gone("no card in it".into()));
    }
    Ok(states[0].event_count())
}

/// A session on one YubiKey. Holds no connection: see the module docs.
pub struct YubiKeySession {
    token: TokenDescription,
    serial: Serial,
    /// The PIN while logged in, to verify again on each connection.
    pin: Mutex<Option<SecretString>>,
    /// The touch policy of each slot whose key was looked at, to say
    /// "touch the key" before an operation that waits for one.
    touch: Mutex<HashMap<u8, TouchPolicy>>,
    /// The reader the card sat in at open, and its event counter then.
    reader: String,
    events: u32,
}

impl std::fmt::Debug for YubiKeySession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("YubiKeySession")
            .field("token", &self.token.label)
            .field("reader", &self.reader)
            .finish_non_exhaustive()
    }
}

/// A P-256 key found in a slot, with its policies and origin when the
/// card says.
struct SlotKey {
    public: p256::PublicKey,
    pin_policy: Option<PinPolicy>,
    touch_policy: Option<TouchPolicy>,
    origin: Option<piv::Origin>,
}

/// The P-256 key in `slot`, if any: from the slot's metadata (firmware
/// 5.2.3 and later), else from the certificate stored with it.
fn key_in_slot(yk: &mut YubiKey, slot: PivSlot) -> Result<Option<SlotKey>> {
    let id = slot_id(slot)?;
    match piv::metadata(yk, id) {
        Ok(m) => {
            if m.algorithm != ManagementAlgorithmId::Asymmetric(AlgorithmId::EccP256) {
                return Ok(None);
            }
            let pin_policy = m.policy.map(|(pin, _)| pin);
            let touch_policy = m.policy.map(|(_, touch)| touch);
            let origin = m.origin;
            let from_metadata = m
                .public
                .as_ref()
                .and_then(|spki| spki.subject_public_key.as_bytes())
                .and_then(|point| p256::PublicKey::from_sec1_bytes(point).ok());
            let public = match from_metadata {
                Some(p) => Some(p),
                None => certificate_key(yk, id)?,
            };
            Ok(public.map(|public| SlotKey {
                public,
                pin_policy,
                touch_policy,
                origin,
            }))
        }
        // Older firmware: no metadata, so the certificate tells.
        Err(yubikey::Error::NotSupported) => Ok(certificate_key(yk, id)?.map(|public| SlotKey {
            public,
            pin_policy: None,
            touch_policy: None,
            origin: None,
        })),
        Err(e @ yubikey::Error::PcscError { .. }) => Err(map_err(e)),
        // The card says there is no key there.
        Err(_) => Ok(None),
    }
}

/// The P-256 key the slot's certificate carries, if any.
fn certificate_key(yk: &mut YubiKey, id: SlotId) -> Result<Option<p256::PublicKey>> {
    match Certificate::read(yk, id) {
        Ok(cert) => Ok(cert
            .subject_pki()
            .subject_public_key
            .as_bytes()
            .and_then(|point| p256::PublicKey::from_sec1_bytes(point).ok())),
        Err(e @ yubikey::Error::PcscError { .. }) => Err(map_err(e)),
        Err(_) => Ok(None),
    }
}

/// Whether the slot's certificate names `label` as its subject's CN (the
/// certificate Keyholder stores with a key it generates).
fn certificate_names(yk: &mut YubiKey, slot: PivSlot, label: &str) -> Result<bool> {
    match Certificate::read(yk, slot_id(slot)?) {
        Ok(cert) => Ok(cert.subject() == format!("CN={label}")),
        Err(e @ yubikey::Error::PcscError { .. }) => Err(map_err(e)),
        Err(_) => Ok(false),
    }
}

/// The management key from its hex form: 3DES (24 bytes) only.
fn management_key(hex: &SecretString) -> Result<MgmKey> {
    let text = hex.expose_secret().trim();
    let bytes = Zeroizing::new(decode_hex(text).ok_or_else(|| {
        Error::Piv("the management key is not hex (48 hex digits for 3DES)".into())
    })?);
    match bytes.len() {
        24 => MgmKey::from_bytes(bytes.as_slice()).map_err(|_| {
            Error::Piv("the card's library refused this 3DES management key (a weak key)".into())
        }),
        16 | 32 => Err(Error::Piv(
            "this is an AES management key, which the native YubiKey backend (yubikey crate \
             0.8) cannot use: generate the vault key through ykcs11 (keyholderd \
             --pkcs11-module .../libykcs11.so), after which the vault opens natively too, or \
             set a 3DES management key (ykman piv access change-management-key -a TDES)"
                .into(),
        )),
        n => Err(Error::Piv(format!(
            "the management key is {n} bytes; a 3DES PIV management key is 24 (48 hex digits)"
        ))),
    }
}

fn decode_hex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    let digits: Option<Vec<u8>> = text
        .chars()
        .map(|c| c.to_digit(16).and_then(|d| u8::try_from(d).ok()))
        .collect();
    let digits = Zeroizing::new(digits?);
    Some(digits.chunks(2).map(|p| (p[0] << 4) | p[1]).collect())
}

/// Why a key whose PIN policy is "always" is not used.
const PIN_ALWAYS: &str = "the key's PIN policy is \"always\" (the PIN before every use; PIV slot \
     9c's default, which ykcs11 shows as CKA_ALWAYS_AUTHENTICATE, and which Keyholder refuses \
     there), so a vault or key using it would not work through ykcs11: use a key whose PIN \
     policy is once per session (PIV slot 9a or a retired slot 82 to 95)";

/// A PIN policy's name, `None` for the slot's default (which the card
/// reports only for keys it did not make).
fn pin_policy_name(p: PinPolicy, slot: PivSlot) -> Option<&'static str> {
    match p {
        PinPolicy::Never => Some("never"),
        PinPolicy::Once => Some("once"),
        PinPolicy::Always => Some("always"),
        // Slot 9c's default is "always", every other slot's "once".
        PinPolicy::Default if slot.number() == 0x9c => Some("always"),
        PinPolicy::Default => Some("once"),
    }
}

fn touch_policy_name(t: TouchPolicy) -> &'static str {
    match t {
        TouchPolicy::Always => "always",
        TouchPolicy::Cached => "cached",
        TouchPolicy::Never | TouchPolicy::Default => "never",
    }
}

/// The data object of the attestation certificate (slot f9).
const OBJ_ATTESTATION_CERTIFICATE: u32 = 0x005f_ff01;

/// The value of the first BER-TLV in `data` if its tag is `tag` (one-byte
/// tag, definite length of up to two bytes).
fn first_tlv(data: &[u8], tag: u8) -> Option<&[u8]> {
    let (&t, rest) = data.split_first()?;
    if t != tag {
        return None;
    }
    let (&l, rest) = rest.split_first()?;
    let (len, rest) = match l {
        0x00..=0x7f => (usize::from(l), rest),
        0x81 => {
            let (&n, rest) = rest.split_first()?;
            (usize::from(n), rest)
        }
        0x82 => {
            let (n, rest) = rest.split_at_checked(2)?;
            (usize::from(u16::from_be_bytes([n[0], n[1]])), rest)
        }
        _ => return None,
    };
    rest.get(..len)
}

/// Where the PIN-protected management key lives: PIV's "printed
/// information" object, readable only after PIN verification.
const OBJ_PROTECTED_DATA: u32 = 0x005f_c109;

/// Replaces the card's management key (authenticated already with the
/// current one) by a random 3DES key kept in the PIN-protected data object
/// and flagged in the PIVMAN data object, as `ykman ... --protect` does.
/// The object is written first, so a card that cannot hold it keeps its old
/// key; the key is read back after PIN verification before it is relied on.
fn protect_management_key(yk: &mut YubiKey, pin: &SecretString) -> Result<MgmKey> {
    let new = MgmKey::generate();
    let key: &[u8; 24] = new.as_ref();
    let mut object = Zeroizing::new(Vec::with_capacity(28));
    object.extend_from_slice(&[0x88, 26, 0x89, 24]);
    object.extend_from_slice(key);
    yk.save_object(OBJ_PROTECTED_DATA, object.as_mut_slice())
        .map_err(|e| {
            Error::Piv(format!(
                "this card cannot store a PIN-protected management key (writing its \
                 protected data object failed: {e}); its management key is unchanged: set \
                 one with yubico-piv-tool -a set-mgm-key and give it with \
                 --management-key-file"
            ))
        })?;
    new.set_protected(yk).map_err(map_err)?;
    yk.verify_pin(pin.expose_secret().as_bytes())
        .map_err(map_err)?;
    let stored = MgmKey::get_protected(yk).map_err(map_err)?;
    if stored.as_ref() != new.as_ref() {
        return Err(Error::Piv(
            "the PIN-protected management key read back from the card differs from the one \
             set"
            .into(),
        ));
    }
    tracing::info!(
        "the card's management key is now a random one, kept on the card behind the PIN"
    );
    if !pivman_says_protected(yk) {
        tracing::warn!(
            "the card did not keep the PIVMAN flag that marks its management key as \
             PIN-protected (data object 5FFF00): ykman will not know the key is on the card; \
             Keyholder reads it all the same (init --management-key-on-card)"
        );
    }
    Ok(new)
}

/// PIVMAN data object (ykman's admin data): 80 { 81 flags, ... }.
const OBJ_PIVMAN_DATA: u32 = 0x005f_ff00;
/// Its flag "the management key is stored in the protected data object".
const PIVMAN_PROTECTED_MGM: u8 = 0x02;

/// Whether the PIVMAN data object flags the management key as PIN-protected.
fn pivman_says_protected(yk: &mut YubiKey) -> bool {
    let Ok(data) = yk.fetch_object(OBJ_PIVMAN_DATA) else {
        return false;
    };
    // 80 len { 81 01 flags ... }, short lengths only (the object is small).
    let inner = match data.as_slice() {
        [0x80, len, rest @ ..] if usize::from(*len) <= rest.len() => &rest[..usize::from(*len)],
        _ => return false,
    };
    let mut rest = inner;
    while let [tag, len, tail @ ..] = rest {
        let n = usize::from(*len);
        let Some(value) = tail.get(..n) else {
            return false;
        };
        if *tag == 0x81 {
            return value.first().is_some_and(|f| f & PIVMAN_PROTECTED_MGM != 0);
        }
        rest = tail.get(n..).unwrap_or_default();
    }
    false
}

/// The management key stored on the card behind the PIN (after verifying
/// it), as `ykman ... --protect` leaves it.
fn protected_management_key(yk: &mut YubiKey, pin: &SecretString, label: &str) -> Result<MgmKey> {
    match yk.verify_pin(pin.expose_secret().as_bytes()) {
        Ok(()) => {}
        Err(yubikey::Error::WrongPin { tries }) => {
            return Err(Error::PinIncorrect {
                label: label.to_owned(),
                count_low: true,
                final_try: tries == 1,
            });
        }
        Err(e) => return Err(map_err(e)),
    }
    MgmKey::get_protected(yk).map_err(|e| {
        Error::Piv(format!(
            "no management key given, and the card keeps no PIN-protected one ({e}): give \
             the management key with --management-key-file, or, on a card still on the \
             factory key, add --protect-management-key"
        ))
    })
}

impl YubiKeySession {
    /// Remembers the touch policy of the key in `slot`.
    fn note_touch(&self, slot: PivSlot, touch: Option<TouchPolicy>) {
        if let Some(t) = touch {
            self.touch
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(slot.number(), t);
        }
    }

    /// Says, in the log, that the card waits for a touch before using the
    /// key in `id` (when its touch policy asks for one).
    fn say_touch(&self, id: SlotId, what: &str) {
        let number: u8 = id.into();
        let policy = self
            .touch
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&number)
            .copied();
        if let Some(p @ (TouchPolicy::Always | TouchPolicy::Cached)) = policy {
            tracing::info!(
                slot = %format!("{number:02x}"),
                touch_policy = touch_policy_name(p),
                "touch the YubiKey {:?} now: its key in slot {number:02x} waits for a touch before {what}",
                self.token.label
            );
        }
    }

    /// Runs `f` on a fresh connection to the card, after verifying the PIN
    /// when `with_pin`; disconnects after (resetting the card when the PIN
    /// was verified).
    fn with_card<T>(&self, with_pin: bool, f: impl FnOnce(&mut YubiKey) -> Result<T>) -> Result<T> {
        let mut yk = connect(self.serial)?;
        let result = (|| {
            if with_pin {
                self.verify_again(&mut yk)?;
            }
            f(&mut yk)
        })();
        release(yk, with_pin);
        result
    }

    /// Verifies the kept PIN on a new connection. A refusal drops it, so a
    /// PIN changed since unlock costs one try, not one per operation.
    fn verify_again(&self, yk: &mut YubiKey) -> Result<()> {
        let mut kept = self.pin.lock().unwrap_or_else(|p| p.into_inner());
        let Some(pin) = kept.as_ref() else {
            return Err(Error::Piv("not logged in to the YubiKey".into()));
        };
        match yk.verify_pin(pin.expose_secret().as_bytes()) {
            Ok(()) => Ok(()),
            Err(yubikey::Error::WrongPin { tries }) => {
                *kept = None;
                let label = self.token.label.clone();
                if tries == 0 {
                    return Err(Error::PinLocked { label });
                }
                Err(Error::PinIncorrect {
                    label,
                    count_low: true,
                    final_try: tries == 1,
                })
            }
            Err(e) => Err(map_err(e)),
        }
    }

    fn key_slot(key: &TokenKey) -> Result<SlotId> {
        let slot = PivSlot::from_pkcs11_id(&key.id).ok_or_else(|| {
            Error::KeyNotFound(format!(
                "key id {:02x?} names no PIV slot (01 to 18)",
                key.id
            ))
        })?;
        slot_id(slot)
    }

    fn find_key(&self, object: &ObjectSelector) -> Result<TokenKey> {
        let slot = object
            .id
            .as_deref()
            .and_then(PivSlot::from_pkcs11_id)
            .ok_or_else(|| {
                Error::KeyNotFound(
                    "name the PIV slot with id= in the URI: %01 = 9a, %02 = 9c, %03 = 9d, \
                     %04 = 9e, %05 to %18 = retired slots 82 to 95"
                        .into(),
                )
            })?;
        let found = self.with_card(false, |yk| key_in_slot(yk, slot))?;
        let key = found
            .ok_or_else(|| Error::KeyNotFound(format!("PIV slot {slot} holds no P-256 key")))?;
        self.note_touch(slot, key.touch_policy);
        let always = match key.pin_policy {
            Some(PinPolicy::Always) => true,
            // The slot's default: "always" for 9c only.
            Some(PinPolicy::Default) | None => slot.number() == 0x9c,
            Some(_) => false,
        };
        if always {
            return Err(Error::KeyNotFound(PIN_ALWAYS.into()));
        }
        Ok(TokenKey {
            id: vec![slot.pkcs11_id()],
            public: key.public,
        })
    }
}

impl Session for YubiKeySession {
    fn token(&self) -> &TokenDescription {
        &self.token
    }

    fn login(&mut self, pin: &SecretString, allow_final_try: bool) -> Result<()> {
        let label = self.token.label.clone();
        let mut yk = connect(self.serial)?;
        let result = (|| {
            let tries = yk.get_pin_retries().map_err(map_err)?;
            if tries == 0 {
                return Err(Error::PinLocked { label });
            }
            if tries == 1 && !allow_final_try {
                return Err(Error::PinFinalTry { label });
            }
            match yk.verify_pin(pin.expose_secret().as_bytes()) {
                Ok(()) => Ok(()),
                Err(yubikey::Error::WrongPin { tries: 0 } | yubikey::Error::PinLocked) => {
                    Err(Error::PinLocked { label })
                }
                Err(yubikey::Error::WrongPin { tries }) => Err(Error::PinIncorrect {
                    label,
                    count_low: true,
                    final_try: tries == 1,
                }),
                // Longer than a PIV PIN can be (8): refused before the card.
                Err(yubikey::Error::SizeError) => Err(Error::PinIncorrect {
                    label,
                    count_low: false,
                    final_try: false,
                }),
                Err(e) => Err(map_err(e)),
            }
        })();
        release(yk, true);
        result?;
        *self.pin.lock().unwrap_or_else(|p| p.into_inner()) = Some(pin.clone());
        Ok(())
    }

    fn generate_p256(&self, _label: &str, _purpose: KeyPurpose) -> Result<TokenKey> {
        Err(Error::Unsupported {
            function: "PIV GENERATE ASYMMETRIC KEY PAIR".into(),
            code: "NO_SLOT_GIVEN (a PIV card keeps keys in fixed slots)".into(),
        })
    }

    fn generate_p256_in_piv_slot(
        &mut self,
        label: &str,
        purpose: KeyPurpose,
        slot: PivSlot,
        management_key_hex: &SecretString,
        pin: &SecretString,
        certify: &SlotCertifier<'_>,
    ) -> Result<TokenKey> {
        self.generate_p256_in_piv_slot_with(
            label,
            purpose,
            slot,
            management_key_hex,
            pin,
            &PivGeneration::default(),
            certify,
        )
    }

    fn generate_p256_in_piv_slot_with(
        &mut self,
        _label: &str,
        _purpose: KeyPurpose,
        slot: PivSlot,
        management_key_hex: &SecretString,
        pin: &SecretString,
        how: &PivGeneration,
        certify: &SlotCertifier<'_>,
    ) -> Result<TokenKey> {
        let id = slot_id(slot)?;
        let label = self.token.label.clone();
        let mut yk = connect(self.serial)?;
        let result = (|| {
            if key_in_slot(&mut yk, slot)?.is_some() {
                return Err(Error::SlotInUse {
                    slot: slot.to_string(),
                    id: format!("%{:02x}", slot.pkcs11_id()),
                });
            }
            let mgm = if management_key_hex.expose_secret().trim().is_empty() {
                protected_management_key(&mut yk, pin, &label)?
            } else {
                management_key(management_key_hex)?
            };
            let authenticated = yk.authenticate(mgm.clone());
            match authenticated {
                Ok(()) => {}
                Err(yubikey::Error::AuthenticationError) => {
                    return Err(Error::ManagementKeyIncorrect { label });
                }
                Err(e) => return Err(map_err(e)),
            }
            if how.protect_management_key {
                let new = protect_management_key(&mut yk, pin)?;
                yk.authenticate(new).map_err(map_err)?;
            }
            let pin_policy = match how.pin_policy {
                PivPinPolicy::Once => PinPolicy::Once,
                PivPinPolicy::Always => PinPolicy::Always,
            };
            let touch_policy = match how.touch_policy {
                PivTouchPolicy::Never => TouchPolicy::Never,
                PivTouchPolicy::Cached => TouchPolicy::Cached,
                PivTouchPolicy::Always => TouchPolicy::Always,
            };
            let spki = piv::generate(&mut yk, id, AlgorithmId::EccP256, pin_policy, touch_policy)
                .map_err(map_err)?;
            let public = spki
                .subject_public_key
                .as_bytes()
                .and_then(|p| p256::PublicKey::from_sec1_bytes(p).ok())
                .ok_or_else(|| Error::Piv("the card returned no P-256 public key".into()))?;
            let der = certify(&public).map_err(Error::Piv)?;
            let cert = Certificate::from_bytes(der).map_err(map_err)?;
            cert.write(&mut yk, id, CertInfo::Uncompressed)
                .map_err(map_err)?;
            self.note_touch(slot, Some(touch_policy));
            Ok(TokenKey {
                id: vec![slot.pkcs11_id()],
                public,
            })
        })();
        // Reset: the PIN may have been verified (to read or check a
        // PIN-protected management key), and the management key was.
        release(yk, true);
        result
    }

    fn piv_key_facts(&self, key: &TokenKey, attest: bool) -> Result<Option<PivKeyFacts>> {
        let slot = PivSlot::from_pkcs11_id(&key.id).ok_or_else(|| {
            Error::KeyNotFound(format!(
                "key id {:02x?} names no PIV slot (01 to 18)",
                key.id
            ))
        })?;
        let id = slot_id(slot)?;
        self.with_card(false, |yk| {
            let found = key_in_slot(yk, slot)?;
            let mut facts = PivKeyFacts {
                slot: slot.to_string(),
                serial: yk.serial().to_string(),
                firmware: yk.version().to_string(),
                ..PivKeyFacts::default()
            };
            if let Some(k) = &found {
                facts.pin_policy = k
                    .pin_policy
                    .and_then(|p| pin_policy_name(p, slot))
                    .map(str::to_owned);
                facts.touch_policy = k.touch_policy.map(|t| touch_policy_name(t).to_owned());
                facts.origin = k.origin.map(|o| match o {
                    piv::Origin::Generated => PivKeyOrigin::Generated,
                    piv::Origin::Imported => PivKeyOrigin::Imported,
                });
                self.note_touch(slot, k.touch_policy);
            }
            if !attest {
                return Ok(Some(facts));
            }
            match yk.fetch_object(OBJ_ATTESTATION_CERTIFICATE) {
                Ok(object) => {
                    // 70 { certificate } 71 { info } ...: a certificate the
                    // object does not hold in that form goes to the
                    // verifier as it is, which refuses it.
                    let der = first_tlv(&object, 0x70).unwrap_or(object.as_slice());
                    facts.card_certificate = Some(der.to_vec());
                }
                Err(e @ yubikey::Error::PcscError { .. }) => return Err(map_err(e)),
                Err(e) => {
                    // NotFound: no f9 certificate, so no attestation.
                    tracing::debug!(error = %e, "no attestation certificate in slot f9");
                    return Ok(Some(facts));
                }
            }
            facts.attestation = Some(match piv::attest(yk, id) {
                Ok(der) => Ok(der.to_vec()),
                Err(e @ yubikey::Error::PcscError { .. }) => return Err(map_err(e)),
                Err(e) => Err(format!("{e} ({})", e.name().unwrap_or("YKPIV_ERROR"))),
            });
            Ok(Some(facts))
        })
    }

    fn find_p256_keys(&self, label: Option<&str>) -> Result<Vec<TokenKey>> {
        self.with_card(false, |yk| {
            let mut keys = Vec::new();
            for slot in PivSlot::all() {
                let Some(key) = key_in_slot(yk, slot)? else {
                    continue;
                };
                if let Some(label) = label
                    && !certificate_names(yk, slot, label)?
                {
                    continue;
                }
                self.note_touch(slot, key.touch_policy);
                keys.push(TokenKey {
                    id: vec![slot.pkcs11_id()],
                    public: key.public,
                });
            }
            Ok(keys)
        })
    }

    fn find_p256_signing_key(&self, object: &ObjectSelector) -> Result<TokenKey> {
        self.find_key(object)
    }

    fn find_p256_derive_key(&self, object: &ObjectSelector) -> Result<TokenKey> {
        self.find_key(object)
    }

    fn ecdh(&self, key: &TokenKey, peer: &p256::PublicKey) -> Result<Zeroizing<[u8; 32]>> {
        let id = Self::key_slot(key)?;
        let point = peer.to_encoded_point(false);
        self.say_touch(id, "ECDH (opening the vault)");
        let shared = self.with_card(true, |yk| {
            piv::decrypt_data(yk, point.as_bytes(), AlgorithmId::EccP256, id).map_err(map_err)
        })?;
        let mut out = Zeroizing::new([0u8; 32]);
        if shared.len() != 32 {
            return Err(Error::Piv(format!(
                "ECDH through the card returned {} bytes, not 32",
                shared.len()
            )));
        }
        out.copy_from_slice(&shared);
        Ok(out)
    }

    fn sign_p256_digest(&self, key: &TokenKey, digest: &[u8; 32]) -> Result<[u8; 64]> {
        let id = Self::key_slot(key)?;
        self.say_touch(id, "signing");
        let der = self.with_card(true, |yk| {
            piv::sign_data(yk, digest, AlgorithmId::EccP256, id).map_err(map_err)
        })?;
        let sig = p256::ecdsa::Signature::from_der(&der)
            .map_err(|_| Error::Piv("the card's ECDSA signature is not DER".into()))?;
        Ok(sig.to_bytes().into())
    }

    fn read_generation(&self, _label: &str) -> Result<Option<u64>> {
        Err(no_records())
    }

    fn store_generation(&self, _label: &str, _generation: u64) -> Result<()> {
        Err(no_records())
    }

    fn delete_generation(&self, _label: &str) -> Result<()> {
        Err(no_records())
    }

    fn check_present(&self) -> Result<()> {
        let now = reader_events(&self.reader)?;
        if now != self.events {
            return Err(Error::TokenRemoved(format!(
                "a card was removed from or put into reader {:?} since unlock",
                self.reader
            )));
        }
        Ok(())
    }

    fn close(self: Box<Self>) {
        // The PIN goes with the session (SecretString wipes it on drop);
        // no connection is held.
        drop(self);
    }
}

fn no_records() -> Error {
    Error::Unsupported {
        function: "PIV data objects".into(),
        code: "NO_FREE_OBJECTS (a PIV card has no objects for Keyholder's record)".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn management_keys_are_3des_hex_and_aes_is_refused_by_name() {
        let key = |s: &str| management_key(&SecretString::from(s.to_owned()));
        assert!(key(DEFAULT_MANAGEMENT_KEY).is_ok());
        assert!(key(&format!(" {DEFAULT_MANAGEMENT_KEY}\n")).is_ok());
        let aes = key(&"00".repeat(32)).err().expect("AES-256");
        assert!(aes.to_string().contains("AES"), "{aes}");
        let aes = key(&"00".repeat(16)).err().expect("AES-128");
        assert!(aes.to_string().contains("ykcs11"), "{aes}");
        for bad in ["", "0", "zz", "0102", &"g0".repeat(24)] {
            assert!(key(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_tlv_value_is_read_with_short_and_long_lengths() {
        assert_eq!(
            first_tlv(&[0x70, 2, 0xaa, 0xbb, 0x71], 0x70),
            Some(&[0xaa, 0xbb][..])
        );
        let long: Vec<u8> = [0x70, 0x82, 0x01, 0x00]
            .into_iter()
            .chain(std::iter::repeat_n(7, 256))
            .collect();
        assert_eq!(first_tlv(&long, 0x70).map(<[u8]>::len), Some(256));
        let mid: Vec<u8> = [0x70, 0x81, 0x80].into_iter().chain([1; 128]).collect();
        assert_eq!(first_tlv(&mid, 0x70).map(<[u8]>::len), Some(128));
        for bad in [
            &[][..],
            &[0x70],
            &[0x71, 0],
            &[0x70, 3, 1],
            &[0x70, 0x83, 0, 0, 1],
        ] {
            assert_eq!(first_tlv(bad, 0x70), None, "{bad:?}");
        }
    }

    #[test]
    fn hex_decodes_pairs() {
        assert_eq!(decode_hex("00ff1A"), Some(vec![0x00, 0xff, 0x1a]));
        assert_eq!(decode_hex("0"), None);
        assert_eq!(decode_hex("0x"), None);
    }
}
