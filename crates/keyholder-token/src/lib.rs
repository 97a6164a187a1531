//! Hardware tokens for Keyholder, through PKCS#11 (`cryptoki`), behind the
//! [`Backend`] / [`Session`] seam the daemon holds them by.
//!
//! What this crate does: load the PKCS#11 module the daemon was configured
//! with, choose a token by label, serial or RFC 7512 `pkcs11:` URI (never by
//! slot index, since slots move), read the PIN flags before logging in,
//! generate a P-256 key that is sensitive and not extractable, and run ECDH
//! (`CKM_ECDH1_DERIVE`) with a peer point.
//!
//! What it does not do: decide *when* to log in or which module to load (the
//! daemon decides, from its own configuration only), or keep any secret
//! beyond the lifetime of one call. Derived secrets are returned in
//! [`Zeroizing`] buffers.
//!
//! Thread safety: a [`TokenSession`] is `Send` but not `Sync`; callers that
//! share one put it behind a mutex and call it from a blocking thread, since
//! token calls can block on a PIN pad or a touch.

// One call has no safe form: passing a module its init arguments
// (`Module::load_with_args`).
#![deny(unsafe_code)]

mod backend;
mod piv;
#[cfg(feature = "software")]
pub mod software;
mod uri;
#[cfg(feature = "yubikey")]
mod yubikey_piv;

use std::fmt;
use std::path::{Path, PathBuf};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::mechanism::elliptic_curve::{EcKdf, Ecdh1DeriveParams};
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session as CkSession, UserType};
use cryptoki::slot::Slot;
use p256::elliptic_curve::sec1::ToEncodedPoint;
use secrecy::{ExposeSecret, SecretString};
use zeroize::Zeroizing;

pub use backend::{Backend, Session};
pub use piv::{PivGeneration, PivKeyFacts, PivKeyOrigin, PivPinPolicy, PivSlot, PivTouchPolicy};
pub use uri::{ObjectSelector, Selector};
#[cfg(feature = "yubikey")]
pub use yubikey_piv::{DEFAULT_MANAGEMENT_KEY, YubiKeyBackend, YubiKeySession};

/// DER encoding of the P-256 curve OID (1.2.840.10045.3.1.7), as `CKA_EC_PARAMS`.
const P256_EC_PARAMS: [u8; 10] = [0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];

/// `CKA_APPLICATION` of the generation records Keyholder keeps on a token.
const GENERATION_APPLICATION: &[u8] = b"keyholder";

/// What a generation record is made and found with (its value aside): a
/// private token data object, so only the PIN holder makes one, marked with
/// Keyholder's application name and labelled for its vault.
fn record_template(label: &str) -> [Attribute; 5] {
    [
        Attribute::Class(ObjectClass::DATA),
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Application(GENERATION_APPLICATION.to_vec()),
        Attribute::Label(label.as_bytes().to_vec()),
    ]
}

/// Errors from the token. Messages name tokens and functions, never PINs.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The module file is missing or is not a PKCS#11 library.
    #[error("cannot use PKCS#11 module {path}: {reason}")]
    ModuleLoad {
        /// The configured module path.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// No token matches the selector.
    #[error("no token matches {selector}; tokens present: {present}")]
    TokenNotFound {
        /// The selector, as the user gave it.
        selector: String,
        /// Labels of the tokens that are present.
        present: String,
    },
    /// More than one token matches the selector.
    #[error("{count} tokens match {selector}; choose one by label, serial or pkcs11: URI")]
    TokenAmbiguous {
        /// The selector, as the user gave it.
        selector: String,
        /// How many matched.
        count: usize,
    },
    /// The selector could not be parsed.
    #[error("invalid token selector: {0}")]
    InvalidSelector(String),
    /// The token refused the PIN.
    #[error("token {label:?} did not accept the PIN{}", pin_hint(*.count_low, *.final_try))]
    PinIncorrect {
        /// The token's label.
        label: String,
        /// The token now says some tries failed.
        count_low: bool,
        /// The token now says the next wrong PIN locks it.
        final_try: bool,
    },
    /// The token says the next wrong PIN locks it, and the caller did not allow spending it.
    #[error(
        "token {label:?} has one PIN try left; Keyholder will not spend it unless asked \
         (pass --allow-final-pin-try if you are sure of the PIN)"
    )]
    PinFinalTry {
        /// The token's label.
        label: String,
    },
    /// The user PIN is locked.
    #[error(
        "token {label:?} has its user PIN locked; unlock it with the token's own tools (the SO \
         PIN, or a PIV card's PUK; a TPM unlocks after its lockout interval or with \
         tpm2_dictionarylockout --clear-lockout)"
    )]
    PinLocked {
        /// The token's label.
        label: String,
    },
    /// The token went away (unplugged, or its session was closed under us).
    #[error("the token is no longer available ({0})")]
    TokenRemoved(String),
    /// The token holds no key with this id, or the key is not P-256.
    #[error("the token holds no usable Keyholder key: {0}")]
    KeyNotFound(String),
    /// The token refused an operation it cannot do: a mechanism, an
    /// attribute or a template it does not support.
    #[error(
        "the token cannot do this: {function} returned {code}; see docs/tokens.md for what each token supports"
    )]
    Unsupported {
        /// The PKCS#11 function.
        function: String,
        /// The `CKR_*` return value.
        code: String,
    },
    /// A PKCS#11 call failed with this return value.
    #[error("PKCS#11 {function} failed with {code}")]
    Call {
        /// The PKCS#11 function.
        function: String,
        /// The `CKR_*` return value.
        code: String,
    },
    /// A PIV slot already holds a key: Keyholder never overwrites one.
    #[error(
        "PIV slot {slot} already holds a key, which Keyholder will not overwrite: \
         adopt it with a URI naming it (id={id}), or choose an empty slot"
    )]
    SlotInUse {
        /// The slot, as PIV names it (9d).
        slot: String,
        /// Its `CKA_ID`, URI-encoded (%03).
        id: String,
    },
    /// The card refused the management key given as the SO PIN.
    #[error("token {label:?} did not accept the management key")]
    ManagementKeyIncorrect {
        /// The token's label.
        label: String,
    },
    /// Any other failure talking to the token.
    #[error("PKCS#11 call failed: {0}")]
    Pkcs11(String),
    /// A failure talking to a PIV card natively (a YubiKey over PC/SC).
    #[error("YubiKey (PIV): {0}")]
    Piv(String),
}

fn pin_hint(count_low: bool, final_try: bool) -> &'static str {
    if final_try {
        "; the token says ONE try remains before the PIN locks"
    } else if count_low {
        "; the token says earlier tries failed and few remain"
    } else {
        ""
    }
}

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

fn is_removal(rv: RvError) -> bool {
    matches!(
        rv,
        RvError::TokenNotPresent
            | RvError::DeviceRemoved
            | RvError::SessionHandleInvalid
            | RvError::SessionClosed
            | RvError::SlotIdInvalid
            | RvError::TokenNotRecognized
            | RvError::CryptokiNotInitialized
    )
}

/// The `CKR_*` name of a return value (cryptoki's variant names are the
/// PKCS#11 names in camel case), with its number for vendor codes.
pub fn ckr_name(rv: RvError) -> String {
    match rv {
        RvError::VendorDefined(code) => format!("CKR_VENDOR_DEFINED({code:#x})"),
        RvError::UnknownErrorCode(code) => format!("CKR_{code:#x}"),
        other => {
            let camel = format!("{other:?}");
            let mut out = String::from("CKR_");
            for (i, c) in camel.chars().enumerate() {
                if c.is_ascii_uppercase() && i > 0 {
                    out.push('_');
                }
                out.push(c.to_ascii_uppercase());
            }
            out
        }
    }
}

/// Whether `rv` says the token cannot do what was asked (rather than that
/// it failed or went away).
fn is_refusal(rv: RvError) -> bool {
    matches!(
        rv,
        RvError::FunctionNotSupported
            | RvError::MechanismInvalid
            | RvError::MechanismParamInvalid
            | RvError::AttributeValueInvalid
            | RvError::AttributeTypeInvalid
            | RvError::AttributeReadOnly
            | RvError::TemplateInconsistent
            | RvError::TemplateIncomplete
            | RvError::KeyTypeInconsistent
            | RvError::KeyFunctionNotPermitted
            | RvError::DomainParamsInvalid
            | RvError::CurveNotSupported
    )
}

fn map_err(e: CkError) -> Error {
    map_err_in(e, false)
}

/// Maps a cryptoki error by meaning; `generating` counts CKR_GENERAL_ERROR
/// as a refusal, which is how some tokens answer a key template they
/// cannot make.
fn map_err_in(e: CkError, generating: bool) -> Error {
    match e {
        CkError::Pkcs11(rv, function) => {
            let (function, code) = (function.to_string(), ckr_name(rv));
            if is_removal(rv) {
                Error::TokenRemoved(format!("{function} returned {code}"))
            } else if is_refusal(rv) || (generating && rv == RvError::GeneralError) {
                Error::Unsupported { function, code }
            } else {
                Error::Call { function, code }
            }
        }
        other => Error::Pkcs11(other.to_string()),
    }
}

/// What a token says about itself, read without logging in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenDescription {
    /// The slot it sits in right now (slots are not stable identifiers).
    pub slot: Slot,
    /// `CKA_LABEL` of the token, trimmed.
    pub label: String,
    /// Serial number, trimmed.
    pub serial: String,
    /// Manufacturer id, trimmed.
    pub manufacturer: String,
    /// Model, trimmed.
    pub model: String,
    /// PIN flags from `C_GetTokenInfo`.
    pub pin: PinStatus,
}

/// The user-PIN flags a token reports. PKCS#11 has no try counter, only
/// these flags; "final try" means exactly one try remains.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PinStatus {
    /// `CKF_USER_PIN_COUNT_LOW`: a wrong PIN was entered since the last success.
    pub count_low: bool,
    /// `CKF_USER_PIN_FINAL_TRY`: one wrong PIN more locks the token.
    pub final_try: bool,
    /// `CKF_USER_PIN_LOCKED`.
    pub locked: bool,
}

/// A loaded PKCS#11 module. Cloning shares the module.
#[derive(Clone)]
pub struct Module {
    ctx: Pkcs11,
    path: PathBuf,
    /// The init arguments handed to `C_Initialize`, kept alive as long as
    /// the module is loaded (a module may keep the pointer).
    _init_args: Option<std::sync::Arc<std::ffi::CString>>,
}

impl fmt::Debug for Module {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Module").field("path", &self.path).finish()
    }
}

impl Module {
    /// Loads and initialises the module at `path`. Only the daemon's own
    /// configuration may name this path: loading a library chosen by a
    /// client is how an agent gets turned into a code-execution service.
    pub fn load(path: &Path) -> Result<Self> {
        Self::load_with_args(path, None)
    }

    /// Like [`Module::load`], passing `init_args` to `C_Initialize` as its
    /// reserved argument: a NUL-terminated string, the form NSS softokn
    /// reads its database configuration from (`configdir='sql:DIR'
    /// certPrefix='' keyPrefix='' secmod='secmod.db' flags=`). Modules that
    /// take no arguments must be loaded without.
    pub fn load_with_args(path: &Path, init_args: Option<&str>) -> Result<Self> {
        let fail = |reason: String| Error::ModuleLoad {
            path: path.to_owned(),
            reason,
        };
        match std::fs::metadata(path) {
            Ok(m) if m.is_file() => {}
            Ok(_) => return Err(fail("not a regular file".into())),
            Err(e) => return Err(fail(e.to_string())),
        }
        let init_args = init_args
            .map(|a| {
                std::ffi::CString::new(a)
                    .map(std::sync::Arc::new)
                    .map_err(|_| fail("the init arguments contain a NUL byte".into()))
            })
            .transpose()?;
        let ctx = Pkcs11::new(path).map_err(|e| fail(e.to_string()))?;
        let flags = CInitializeFlags::OS_LOCKING_OK;
        let args = match &init_args {
            None => CInitializeArgs::new(flags),
            Some(text) => {
                let reserved = std::ptr::NonNull::new(text.as_ptr().cast_mut().cast())
                    .ok_or_else(|| fail("the init arguments have no address".into()))?;
                // SAFETY: `pReserved` is handed to the module as is; the
                // modules this is for (NSS softokn) read it as a
                // NUL-terminated string, which a CString is. The string is
                // kept in the returned `Module` (shared by its clones), so it
                // outlives every use the module can make of it.
                #[allow(unsafe_code)]
                unsafe {
                    CInitializeArgs::new_with_reserved(flags, reserved)
                }
            }
        };
        match ctx.initialize(args) {
            Ok(()) => {}
            Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
            Err(CkError::Pkcs11(RvError::ArgumentsBad, _)) if init_args.is_none() => {
                return Err(fail(
                    "C_Initialize returned CKR_ARGUMENTS_BAD: this module needs init arguments \
                     (--pkcs11-init-args, or pkcs11_init_args in the config; NSS softokn takes \
                     \"configdir='sql:DIR' certPrefix='' keyPrefix='' secmod='secmod.db' flags=\")"
                        .into(),
                ));
            }
            Err(e) => return Err(fail(e.to_string())),
        }
        Ok(Self {
            ctx,
            path: path.to_owned(),
            _init_args: init_args,
        })
    }

    /// The module's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Every initialised token present now.
    pub fn tokens(&self) -> Result<Vec<TokenDescription>> {
        // Slots with a token, each read once: cryptoki's
        // `get_slots_with_initialized_token` reads every token's info, and
        // describing it would read it again.
        let slots = self.ctx.get_slots_with_token().map_err(map_err)?;
        let mut out = Vec::with_capacity(slots.len());
        for slot in slots {
            let info = self.ctx.get_token_info(slot).map_err(map_err)?;
            if info.token_initialized() {
                out.push(describe_info(slot, &info));
            }
        }
        Ok(out)
    }

    /// Reads the token in `slot`.
    pub fn describe(&self, slot: Slot) -> Result<TokenDescription> {
        let info = self.ctx.get_token_info(slot).map_err(map_err)?;
        Ok(describe_info(slot, &info))
    }
}

/// A P-256 public key from `CKA_EC_POINT`: a DER OCTET STRING around the
/// SEC1 point (04 41 04 ...), or the bare point, as some modules return it.
fn parse_ec_point(raw: &[u8]) -> Result<p256::PublicKey> {
    let sec1 = match raw {
        [0x04, 0x41, rest @ ..] if rest.len() == 0x41 => rest,
        bare => bare,
    };
    p256::PublicKey::from_sec1_bytes(sec1)
        .map_err(|_| Error::KeyNotFound("CKA_EC_POINT is not a P-256 point".into()))
}

fn describe_info(slot: Slot, info: &cryptoki::slot::TokenInfo) -> TokenDescription {
    TokenDescription {
        slot,
        label: info.label().trim().to_owned(),
        serial: info.serial_number().trim().to_owned(),
        manufacturer: info.manufacturer_id().trim().to_owned(),
        model: info.model().trim().to_owned(),
        pin: PinStatus {
            count_low: info.user_pin_count_low(),
            final_try: info.user_pin_final_try(),
            locked: info.user_pin_locked(),
        },
    }
}

impl Module {
    /// The one token `selector` names.
    pub fn select(&self, selector: &Selector) -> Result<TokenDescription> {
        select_from(self.tokens()?, selector)
    }

    /// Opens a read-write session on the token (not logged in yet).
    pub fn open(&self, token: &TokenDescription) -> Result<TokenSession> {
        let session = self.ctx.open_rw_session(token.slot).map_err(map_err)?;
        Ok(TokenSession {
            module: self.clone(),
            session,
            token: token.clone(),
            logged_in: false,
            last_record: std::sync::Mutex::new(None),
            private_handles: std::sync::Mutex::new(Vec::new()),
        })
    }
}

/// The one token of `all` that `selector` names.
pub(crate) fn select_from(
    all: Vec<TokenDescription>,
    selector: &Selector,
) -> Result<TokenDescription> {
    let present = if all.is_empty() {
        "none".to_owned()
    } else {
        all.iter()
            .map(|t| format!("{:?} (serial {})", t.label, t.serial))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut matching: Vec<_> = all.into_iter().filter(|t| selector.matches(t)).collect();
    match matching.len() {
        0 => Err(Error::TokenNotFound {
            selector: selector.to_string(),
            present,
        }),
        1 => Ok(matching.remove(0)),
        count => Err(Error::TokenAmbiguous {
            selector: selector.to_string(),
            count,
        }),
    }
}

/// Makes the certificate (DER) a PIV slot holds for its new key.
pub type SlotCertifier<'a> = dyn Fn(&p256::PublicKey) -> std::result::Result<Vec<u8>, String> + 'a;

/// What a key generated on the token may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyPurpose {
    /// ECDH only (the vault key).
    Derive,
    /// ECDSA signatures only (CA keys).
    Sign,
}

/// A P-256 key pair on a token, named by its `CKA_ID`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenKey {
    /// `CKA_ID` shared by the private and public key objects.
    pub id: Vec<u8>,
    /// The public key.
    pub public: p256::PublicKey,
}

/// An open session on one token.
pub struct TokenSession {
    module: Module,
    session: CkSession,
    token: TokenDescription,
    logged_in: bool,
    /// The record this session wrote last (label and handle), so the next
    /// write replaces it without searching the token first: a search makes
    /// some modules (SoftHSM2) re-read every object file.
    last_record: std::sync::Mutex<Option<(String, ObjectHandle)>>,
    /// Private key handles found in this session, by `CKA_ID`.
    private_handles: std::sync::Mutex<Vec<(Vec<u8>, ObjectHandle)>>,
}

impl fmt::Debug for TokenSession {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenSession")
            .field("token", &self.token.label)
            .field("logged_in", &self.logged_in)
            .finish()
    }
}

impl TokenSession {
    /// The token this session runs on.
    pub fn token(&self) -> &TokenDescription {
        &self.token
    }

    /// Logs in as the user. Reads the PIN flags first: a locked PIN is
    /// reported without trying, and the final try is spent only when
    /// `allow_final_try` is set. A refused PIN is never retried here.
    pub fn login(&mut self, pin: &SecretString, allow_final_try: bool) -> Result<()> {
        // The PIN flags were read when the token was listed, just before
        // this session opened; reading them again would cost a call.
        let now = &self.token;
        let label = now.label.clone();
        if now.pin.locked {
            return Err(Error::PinLocked { label });
        }
        if now.pin.final_try && !allow_final_try {
            return Err(Error::PinFinalTry { label });
        }
        let auth = cryptoki::types::AuthPin::new(pin.expose_secret().into());
        match self.session.login(UserType::User, Some(&auth)) {
            Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {
                self.logged_in = true;
                Ok(())
            }
            Err(CkError::Pkcs11(RvError::PinIncorrect | RvError::PinLenRange, _)) => {
                let after = self.module.describe(self.token.slot).map(|d| d.pin);
                let after = after.unwrap_or_default();
                if after.locked {
                    return Err(Error::PinLocked { label });
                }
                Err(Error::PinIncorrect {
                    label,
                    count_low: after.count_low,
                    final_try: after.final_try,
                })
            }
            Err(CkError::Pkcs11(RvError::PinLocked, _)) => Err(Error::PinLocked { label }),
            Err(e) => Err(map_err(e)),
        }
    }

    /// Generates a P-256 key pair on the token for key agreement: the
    /// private half is sensitive, not extractable, and may only derive (ECDH).
    pub fn generate_p256(&self, label: &str) -> Result<TokenKey> {
        self.generate_p256_for(label, KeyPurpose::Derive)
    }

    /// Generates a P-256 key pair on the token, sensitive and not
    /// extractable, usable only for `purpose`.
    pub fn generate_p256_for(&self, label: &str, purpose: KeyPurpose) -> Result<TokenKey> {
        let mut id = vec![0u8; 16];
        rand::Rng::fill(&mut rand::rngs::OsRng, id.as_mut_slice());
        self.generate_p256_with_id(label, purpose, id, false)
    }

    /// Generates a P-256 key pair in a PIV card's `slot`, through a PIV
    /// module (ykcs11): there only the security officer, whose PIN is the
    /// card's management key, may generate, and the key's `CKA_ID` is the
    /// slot's. A slot that already holds a key is refused, never
    /// overwritten. The session is logged in as the user again (with `pin`)
    /// afterwards, whatever happened.
    pub fn generate_p256_in_piv_slot(
        &mut self,
        label: &str,
        purpose: KeyPurpose,
        slot: PivSlot,
        management_key: &SecretString,
        pin: &SecretString,
        certify: &SlotCertifier<'_>,
    ) -> Result<TokenKey> {
        let id = vec![slot.pkcs11_id()];
        let occupied = self
            .session
            .find_objects(&[
                Attribute::Class(ObjectClass::PRIVATE_KEY),
                Attribute::Id(id.clone()),
            ])
            .map_err(map_err)?;
        if !occupied.is_empty() {
            return Err(Error::SlotInUse {
                slot: slot.to_string(),
                id: format!("%{:02x}", slot.pkcs11_id()),
            });
        }
        if self.logged_in {
            self.session.logout().map_err(map_err)?;
            self.logged_in = false;
        }
        let auth = cryptoki::types::AuthPin::new(management_key.expose_secret().into());
        let label_now = self.token.label.clone();
        let generated = match self.session.login(UserType::So, Some(&auth)) {
            Ok(()) => {
                let key = self
                    .generate_p256_with_id(label, purpose, id.clone(), true)
                    .and_then(|key| {
                        self.store_slot_certificate(&key, id, certify)?;
                        Ok(key)
                    });
                if let Err(e) = self.session.logout() {
                    tracing::debug!(error = %e, "logout after generating in a PIV slot failed");
                }
                key
            }
            Err(CkError::Pkcs11(RvError::PinIncorrect | RvError::PinLenRange, _)) => {
                Err(Error::ManagementKeyIncorrect { label: label_now })
            }
            Err(e) => Err(map_err(e)),
        };
        self.login(pin, true)?;
        generated
    }

    /// Stores the certificate `certify` makes for `key` in its PIV slot.
    fn store_slot_certificate(
        &self,
        key: &TokenKey,
        id: Vec<u8>,
        certify: &SlotCertifier<'_>,
    ) -> Result<()> {
        let der = certify(&key.public).map_err(Error::Pkcs11)?;
        self.session
            .create_object(&[
                Attribute::Class(ObjectClass::CERTIFICATE),
                Attribute::CertificateType(cryptoki::object::CertificateType::X_509),
                Attribute::Token(true),
                Attribute::Id(id),
                Attribute::Value(der),
            ])
            .map_err(map_err)?;
        Ok(())
    }

    /// `piv`: the module is a PIV card's, which refuses `CKA_EXTRACTABLE`
    /// in the template (ykcs11: CKR_ATTRIBUTE_TYPE_INVALID); a PIV card
    /// never lets a private key out anyway.
    fn generate_p256_with_id(
        &self,
        label: &str,
        purpose: KeyPurpose,
        id: Vec<u8>,
        piv: bool,
    ) -> Result<TokenKey> {
        let derive = purpose == KeyPurpose::Derive;
        let public_template = [
            Attribute::Token(true),
            Attribute::Private(false),
            Attribute::EcParams(P256_EC_PARAMS.to_vec()),
            Attribute::Label(label.as_bytes().to_vec()),
            Attribute::Id(id.clone()),
            Attribute::Derive(derive),
            // True even for the ECDH-only vault key: tpm2-pkcs11 maps the
            // public CKA_VERIFY to the TPM key's usage and ignores
            // CKA_DERIVE, so `false` there leaves a key with no usage (key
            // generation fails, CKR_GENERAL_ERROR). Verifying with a public
            // key grants nothing; the private half still cannot sign.
            Attribute::Verify(true),
        ];
        let mut private_template = vec![
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Derive(derive),
            Attribute::Sign(!derive),
            Attribute::Label(label.as_bytes().to_vec()),
            Attribute::Id(id.clone()),
        ];
        if !piv {
            private_template.push(Attribute::Extractable(false));
        }
        let (public, _private) = self
            .session
            .generate_key_pair(
                &Mechanism::EccKeyPairGen,
                &public_template,
                &private_template,
            )
            .map_err(|e| map_err_in(e, true))?;
        let point = self.ec_point(public)?;
        Ok(TokenKey { id, public: point })
    }

    /// The generation recorded on the token under `label` (private data
    /// objects, so the session must be logged in), or `None` if there is no
    /// record yet. Where a crash left two records, the higher counts. A
    /// record that is not 8 bytes is an error, not a panic.
    pub fn read_generation(&self, label: &str) -> Result<Option<u64>> {
        let mut highest = None;
        for handle in self.generation_objects(label)? {
            let value = self.generation_value(handle)?.ok_or_else(|| {
                Error::Pkcs11(format!(
                    "the generation record {label:?} on the token is malformed"
                ))
            })?;
            highest = highest.max(Some(value));
        }
        Ok(highest)
    }

    /// Records `generation` on the token under `label`, as a private data
    /// object holding 8 bytes big-endian. A record is replaced, not edited:
    /// tokens need not let `CKA_VALUE` change (SoftHSM2 refuses), so the new
    /// object is created first and the old ones destroyed after, and a crash
    /// in between leaves two records, of which the reader takes the higher.
    pub fn store_generation(&self, label: &str, generation: u64) -> Result<()> {
        let mut last = self
            .last_record
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        // The record this session wrote last is the only one, unless a
        // crash or another process left more: those are found (and removed)
        // by the search on a session's first write.
        let old = match last.take() {
            // Handles can be reused once an object is gone (removed outside
            // this session): destroy the remembered one only while it is
            // still this record.
            Some((l, handle)) if l == label && self.is_generation_record(handle, label) => {
                vec![handle]
            }
            _ => self.generation_objects(label)?,
        };
        let new = self
            .session
            .create_object(
                &[
                    record_template(label).as_slice(),
                    &[Attribute::Value(generation.to_be_bytes().to_vec())],
                ]
                .concat(),
            )
            .map_err(map_err)?;
        for handle in old {
            if handle != new {
                match self.session.destroy_object(handle) {
                    Ok(()) => {}
                    // Gone already (removed outside this session): search
                    // once more and remove what is left.
                    Err(cryptoki::error::Error::Pkcs11(
                        cryptoki::error::RvError::ObjectHandleInvalid,
                        _,
                    )) => {
                        for other in self.generation_objects(label)? {
                            if other != new {
                                self.session.destroy_object(other).map_err(map_err)?;
                            }
                        }
                    }
                    Err(e) => return Err(map_err(e)),
                }
            }
        }
        *last = Some((label.to_owned(), new));
        Ok(())
    }

    /// A record's value, `None` if it is not 8 bytes.
    fn generation_value(&self, handle: ObjectHandle) -> Result<Option<u64>> {
        let attrs = self
            .session
            .get_attributes(handle, &[AttributeType::Value])
            .map_err(map_err)?;
        Ok(attrs.into_iter().find_map(|a| match a {
            Attribute::Value(v) => v.as_slice().try_into().ok().map(u64::from_be_bytes),
            _ => None,
        }))
    }

    /// Removes every record under `label`.
    pub fn delete_generation(&self, label: &str) -> Result<()> {
        let mut last = self
            .last_record
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if last.as_ref().is_some_and(|(l, _)| l == label) {
            *last = None;
        }
        for handle in self.generation_objects(label)? {
            self.session.destroy_object(handle).map_err(map_err)?;
        }
        Ok(())
    }

    /// Whether `handle` is (still) Keyholder's generation record `label`:
    /// it has every attribute a record is made and found with.
    fn is_generation_record(&self, handle: ObjectHandle, label: &str) -> bool {
        let template = record_template(label);
        let types: Vec<AttributeType> = template.iter().map(Attribute::attribute_type).collect();
        self.session
            .get_attributes(handle, &types)
            .is_ok_and(|found| template.iter().all(|a| found.contains(a)))
    }

    /// Keyholder's records only: private (so made by the PIN holder) and
    /// marked with Keyholder's application name.
    fn generation_objects(&self, label: &str) -> Result<Vec<ObjectHandle>> {
        self.session
            .find_objects(&record_template(label))
            .map_err(map_err)
    }

    /// Signs a SHA-256 `digest` with the token's P-256 key (`CKM_ECDSA` on
    /// the pre-computed hash, since not every token has `CKM_ECDSA_SHA256`).
    /// Returns the 64-byte r||s form.
    pub fn sign_p256_digest(&self, key: &TokenKey, digest: &[u8; 32]) -> Result<[u8; 64]> {
        let sig = self.with_private(key, |private| {
            self.session.sign(&Mechanism::Ecdsa, private, digest)
        })?;
        sig.as_slice()
            .try_into()
            .map_err(|_| Error::Pkcs11(format!("ECDSA signature is {} bytes, not 64", sig.len())))
    }

    /// The P-256 public keys with this label (found without logging in,
    /// since public key objects are public).
    pub fn find_p256_keys(&self, label: Option<&str>) -> Result<Vec<TokenKey>> {
        let mut template = vec![
            Attribute::Class(ObjectClass::PUBLIC_KEY),
            Attribute::KeyType(KeyType::EC),
        ];
        if let Some(label) = label {
            template.push(Attribute::Label(label.as_bytes().to_vec()));
        }
        let handles = self.session.find_objects(&template).map_err(map_err)?;
        let mut keys = Vec::new();
        for handle in handles {
            // Id and point in one read.
            let attrs = self
                .session
                .get_attributes(handle, &[AttributeType::Id, AttributeType::EcPoint])
                .map_err(map_err)?;
            let (mut id, mut point) = (None, None);
            for a in attrs {
                match a {
                    Attribute::Id(v) => id = Some(v),
                    Attribute::EcPoint(v) => point = Some(v),
                    _ => {}
                }
            }
            // A key without an id, on another curve, or with a malformed
            // point is not ours: skip it.
            if let (Some(id), Some(Ok(public))) = (id, point.as_deref().map(parse_ec_point)) {
                keys.push(TokenKey { id, public });
            }
        }
        Ok(keys)
    }

    /// The one P-256 key pair on this token that `object` names, usable for
    /// signing (needs a logged-in session to see the private key).
    pub fn find_p256_signing_key(&self, object: &ObjectSelector) -> Result<TokenKey> {
        self.find_p256_key(object, KeyPurpose::Sign)
    }

    /// The one P-256 key pair on this token that `object` names, whose
    /// private half may do `purpose` (CKA_SIGN or CKA_DERIVE).
    pub fn find_p256_key(&self, object: &ObjectSelector, purpose: KeyPurpose) -> Result<TokenKey> {
        let mut template = vec![
            Attribute::Class(ObjectClass::PRIVATE_KEY),
            Attribute::KeyType(KeyType::EC),
        ];
        if let Some(l) = &object.label {
            template.push(Attribute::Label(l.as_bytes().to_vec()));
        }
        if let Some(id) = &object.id {
            template.push(Attribute::Id(id.clone()));
        }
        let found = self.session.find_objects(&template).map_err(map_err)?;
        let private = match found.as_slice() {
            [one] => *one,
            [] => {
                return Err(Error::KeyNotFound(
                    "no EC private key matches the URI".into(),
                ));
            }
            many => {
                return Err(Error::KeyNotFound(format!(
                    "{} EC private keys match the URI; add id=",
                    many.len()
                )));
            }
        };
        let attrs = self
            .session
            .get_attributes(
                private,
                &[
                    AttributeType::Id,
                    AttributeType::Sign,
                    AttributeType::Derive,
                    AttributeType::AlwaysAuthenticate,
                ],
            )
            .map_err(map_err)?;
        let mut id = None;
        let (mut can_sign, mut can_derive, mut pin_each_time) = (false, false, false);
        for a in attrs {
            match a {
                Attribute::Id(v) => id = Some(v),
                Attribute::Sign(b) => can_sign = b,
                Attribute::Derive(b) => can_derive = b,
                Attribute::AlwaysAuthenticate(b) => pin_each_time = b,
                _ => {}
            }
        }
        let id = id.ok_or_else(|| Error::KeyNotFound("the private key has no CKA_ID".into()))?;
        if pin_each_time {
            // Keyholder does not keep the PIN, so it could not give it again.
            return Err(Error::KeyNotFound(
                "the private key needs the PIN again before every use \
                 (CKA_ALWAYS_AUTHENTICATE, as PIV slot 9c does), and Keyholder does not keep \
                 the PIN: use a key whose PIN policy is once per session (PIV slot 9a or a \
                 retired slot 82 to 95)"
                    .into(),
            ));
        }
        match purpose {
            KeyPurpose::Sign if !can_sign => {
                return Err(Error::KeyNotFound(
                    "the private key may not sign (CKA_SIGN is false)".into(),
                ));
            }
            KeyPurpose::Derive if !can_derive => {
                return Err(Error::KeyNotFound(
                    "the private key may not do ECDH (CKA_DERIVE is false)".into(),
                ));
            }
            _ => {}
        }
        let public = self
            .session
            .find_objects(&[
                Attribute::Class(ObjectClass::PUBLIC_KEY),
                Attribute::Id(id.clone()),
            ])
            .map_err(map_err)?
            .into_iter()
            .next()
            .ok_or_else(|| {
                Error::KeyNotFound("no public key object shares the private key's CKA_ID".into())
            })?;
        Ok(TokenKey {
            public: self.ec_point(public)?,
            id,
        })
    }

    fn ec_point(&self, handle: ObjectHandle) -> Result<p256::PublicKey> {
        let attrs = self
            .session
            .get_attributes(handle, &[AttributeType::EcPoint])
            .map_err(map_err)?;
        let raw = attrs
            .into_iter()
            .find_map(|a| match a {
                Attribute::EcPoint(p) => Some(p),
                _ => None,
            })
            .ok_or_else(|| Error::KeyNotFound("public key has no CKA_EC_POINT".into()))?;
        parse_ec_point(&raw)
    }

    /// The private key object with `key`'s id. Handles are remembered for
    /// the session (an unlock derives twice, a token key signs many times):
    /// a remembered one is used after reading back its `CKA_ID` (one call
    /// instead of a search's three), since a module may give a destroyed
    /// object's handle to a new object; one the token no longer knows is
    /// searched for again through [`Self::with_private`].
    fn private_handle(&self, key: &TokenKey) -> Result<ObjectHandle> {
        let mut known = self
            .private_handles
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(i) = known.iter().position(|(id, _)| *id == key.id) {
            let handle = known[i].1;
            let still = self
                .session
                .get_attributes(handle, &[AttributeType::Id])
                .is_ok_and(|attrs| attrs.contains(&Attribute::Id(key.id.clone())));
            if still {
                return Ok(handle);
            }
            known.swap_remove(i);
        }
        let found = self
            .session
            .find_objects(&[
                Attribute::Class(ObjectClass::PRIVATE_KEY),
                Attribute::Id(key.id.clone()),
            ])
            .map_err(map_err)?;
        let handle = found
            .into_iter()
            .next()
            .ok_or_else(|| Error::KeyNotFound("no private key with the expected CKA_ID".into()))?;
        // A session uses a handful of keys; the bound only keeps a
        // misbehaving caller from growing the list.
        if known.len() >= 64 {
            known.clear();
        }
        known.push((key.id.clone(), handle));
        Ok(handle)
    }

    /// Runs `op` with the private key's handle; if the token says the
    /// remembered handle is not valid (the key was deleted and perhaps made
    /// again by another program), forgets it and tries once more with a
    /// fresh search.
    fn with_private<T>(
        &self,
        key: &TokenKey,
        op: impl Fn(ObjectHandle) -> Result<T, CkError>,
    ) -> Result<T> {
        let handle = self.private_handle(key)?;
        match op(handle) {
            Err(CkError::Pkcs11(RvError::ObjectHandleInvalid | RvError::KeyHandleInvalid, _)) => {
                self.private_handles
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .retain(|(id, _)| *id != key.id);
                let handle = self.private_handle(key)?;
                op(handle).map_err(map_err)
            }
            other => other.map_err(map_err),
        }
    }

    /// ECDH between the token's private key and `peer`: the raw X
    /// coordinate of the shared point. The peer point is sent uncompressed
    /// (65 bytes), the one form every token accepts.
    pub fn ecdh(&self, key: &TokenKey, peer: &p256::PublicKey) -> Result<Zeroizing<[u8; 32]>> {
        let peer_point = peer.to_encoded_point(false);
        let template = [
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::GENERIC_SECRET),
            Attribute::Token(false),
            Attribute::Sensitive(false),
            Attribute::Extractable(true),
            Attribute::ValueLen(32.into()),
        ];
        let derived = self.with_private(key, |private| {
            let params = Ecdh1DeriveParams::new(EcKdf::null(), peer_point.as_bytes());
            self.session
                .derive_key(&Mechanism::Ecdh1Derive(params), private, &template)
        })?;
        let value = self
            .session
            .get_attributes(derived, &[AttributeType::Value])
            .map_err(map_err);
        // The derived object lives only in this session; remove it at once.
        let destroyed = self.session.destroy_object(derived).map_err(map_err);
        let mut out = Zeroizing::new([0u8; 32]);
        let mut found = false;
        for attr in value? {
            if let Attribute::Value(mut v) = attr {
                if v.len() == 32 {
                    out.copy_from_slice(&v);
                    found = true;
                }
                zeroize::Zeroize::zeroize(&mut v);
            }
        }
        destroyed?;
        if !found {
            return Err(Error::Pkcs11(
                "ECDH derive returned no 32-byte value".into(),
            ));
        }
        Ok(out)
    }

    /// Checks that the token and this session still exist.
    pub fn check_present(&self) -> Result<()> {
        self.session.get_session_info().map_err(map_err)?;
        self.module.describe(self.token.slot)?;
        Ok(())
    }

    /// Logs out and closes the session.
    pub fn close(self) {
        if self.logged_in
            && let Err(e) = self.session.logout()
        {
            tracing::debug!(error = %e, "logout on close failed");
        }
        // Dropping the session closes it.
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On a real token (SoftHSM2, installed by scripts/install-deps): the
    /// record a session wrote is recognised as such for the next write,
    /// replaced there, and found, read and removed by its label.
    #[test]
    #[allow(unsafe_code)]
    fn generation_records_are_replaced_in_place_on_softhsm() {
        let dir = tempfile::tempdir().expect("tempdir");
        let conf = dir.path().join("softhsm2.conf");
        std::fs::write(
            &conf,
            format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
                dir.path().display()
            ),
        )
        .expect("conf");
        // SAFETY: the only test in this crate that reads the environment,
        // and no other thread of it touches SOFTHSM2_CONF.
        unsafe { std::env::set_var("SOFTHSM2_CONF", &conf) };
        let init = std::process::Command::new("softhsm2-util")
            .env("SOFTHSM2_CONF", &conf)
            .args(["--init-token", "--free", "--label", "records"])
            .args(["--pin", "1234", "--so-pin", "5678"])
            .output()
            .expect("softhsm2-util runs");
        assert!(init.status.success(), "{init:?}");
        let module = Module::load(Path::new("/usr/lib/softhsm/libsofthsm2.so")).expect("module");
        let token = module.select(&Selector::label("records")).expect("token");
        let mut session = module.open(&token).expect("session");
        session
            .login(&SecretString::from("1234".to_owned()), false)
            .expect("login");
        session.store_generation("g", 1).expect("store 1");
        let first = session.generation_objects("g").expect("find");
        assert_eq!(first.len(), 1);
        assert!(session.is_generation_record(first[0], "g"));
        assert!(!session.is_generation_record(first[0], "other"));
        session.store_generation("g", 2).expect("store 2");
        session.store_generation("g", 3).expect("store 3");
        assert_eq!(session.generation_objects("g").expect("find").len(), 1);
        assert_eq!(session.read_generation("g").expect("read"), Some(3));
        session.delete_generation("g").expect("delete");
        assert_eq!(session.read_generation("g").expect("read"), None);
        session.close();
    }

    #[test]
    fn return_values_are_named_and_mapped_by_meaning() {
        assert_eq!(
            ckr_name(RvError::FunctionNotSupported),
            "CKR_FUNCTION_NOT_SUPPORTED"
        );
        assert_eq!(
            ckr_name(RvError::AttributeValueInvalid),
            "CKR_ATTRIBUTE_VALUE_INVALID"
        );
        assert_eq!(ckr_name(RvError::DeviceRemoved), "CKR_DEVICE_REMOVED");
        assert_eq!(
            ckr_name(RvError::VendorDefined(0x8000_0001)),
            "CKR_VENDOR_DEFINED(0x80000001)"
        );
        let f = cryptoki::context::Function::GenerateKeyPair;
        let refused = map_err_in(CkError::Pkcs11(RvError::TemplateInconsistent, f), false);
        assert!(matches!(refused, Error::Unsupported { .. }), "{refused}");
        assert!(
            refused.to_string().contains("CKR_TEMPLATE_INCONSISTENT"),
            "{refused}"
        );
        let general = map_err_in(CkError::Pkcs11(RvError::GeneralError, f), true);
        assert!(matches!(general, Error::Unsupported { .. }), "{general}");
        let general = map_err_in(CkError::Pkcs11(RvError::GeneralError, f), false);
        assert!(matches!(general, Error::Call { .. }), "{general}");
        let gone = map_err_in(CkError::Pkcs11(RvError::DeviceRemoved, f), false);
        assert!(matches!(gone, Error::TokenRemoved(_)), "{gone}");
        assert!(gone.to_string().contains("CKR_DEVICE_REMOVED"), "{gone}");
    }
}
