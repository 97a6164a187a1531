//! YubiKey PIV attestation: proof that a key was generated on a genuine
//! YubiKey, and with which PIN and touch policies.
//!
//! A YubiKey answers the PIV ATTEST command for a slot with an X.509
//! certificate (the *slot attestation*) for that slot's public key, signed by
//! the key in the special slot f9. Slot f9 holds a per-device *attestation
//! certificate* issued at the factory under Yubico's PIV CA, so the chain is
//! `root → [intermediates] → f9 → slot attestation`. Firmware before 5.7.4
//! has f9 issued directly by "Yubico PIV Root CA Serial 263751"; later
//! firmware puts Yubico-published intermediates between f9 and a newer root,
//! "Yubico Attestation Root 1". Both roots are built in; the intermediates
//! are not on the card, so the caller passes them in `intermediates`.
//!
//! Facts used here, from Yubico's documentation (the PIV attestation OID arc
//! at docs.yubico.com/hardware/oid/oid-piv-arc.html, and
//! developers.yubico.com/PIV/Introduction/PIV_attestation.html):
//! - the card makes an attestation only for a key generated on it, never for
//!   an imported one (yubico-piv-tool's attest action fails on imported keys);
//! - the slot attestation's issuer is the f9 certificate's subject and its
//!   dates are copied from the f9 certificate; its subject is
//!   "YubiKey PIV Attestation" followed by the slot;
//! - it is signed with SHA-256 PKCS#1 v1.5 when the f9 key is RSA and with
//!   ECDSA-SHA256 when it is EC;
//! - Yubico's extensions live under 1.3.6.1.4.1.41482.3: `.3` firmware version
//!   as three bytes (major, minor, patch), `.7` the serial number as an
//!   INTEGER, `.8` two bytes (PIN policy then touch policy), `.9` the form
//!   factor as one byte.
//!
//! What is checked and what is not is described in `ATTESTATION.md` next to
//! this crate's manifest.

use std::fmt;

use serde::{Deserialize, Serialize};
use x509_parser::certificate::X509Certificate;
use x509_parser::der_parser::asn1_rs::FromDer;
use x509_parser::der_parser::oid::Oid;
use x509_parser::oid_registry::{
    OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_NIST_EC_P384, OID_PKCS1_RSAENCRYPTION,
    OID_PKCS1_SHA256WITHRSA, OID_PKCS1_SHA384WITHRSA, OID_PKCS1_SHA512WITHRSA,
    OID_SIG_ECDSA_WITH_SHA256, OID_SIG_ECDSA_WITH_SHA384, OID_SIG_ED25519,
};
use x509_parser::x509::SubjectPublicKeyInfo;

/// Yubico's PIV attestation root, "CN=Yubico PIV Root CA Serial 263751".
///
/// Source: the PEM Yubico publishes at
/// developers.yubico.com/PIV/Introduction/piv-attestation-ca.pem, as embedded
/// in go-piv/piv-go (`v2/piv/key.go`, `yubicoPIVCAPEMAfter2018`). This is the
/// 2018 re-issue of the root (same key as the 2016 one, path length 1).
/// Subject and issuer `CN=Yubico PIV Root CA Serial 263751`, serial 0x040647
/// (263751), valid 2016-03-14 to 2052-04-17, RSA 2048, SHA-256 fingerprint
/// [`YUBICO_PIV_ROOT_CA_SHA256`] (checked by a unit test).
pub const YUBICO_PIV_ROOT_CA_PEM: &str = "-----BEGIN CERTIFICATE-----
MIIDFzCCAf+gAwIBAgIDBAZHMA0GCSqGSIb3DQEBCwUAMCsxKTAnBgNVBAMMIFl1
YmljbyBQSVYgUm9vdCBDQSBTZXJpYWwgMjYzNzUxMCAXDTE2MDMxNDAwMDAwMFoY
DzIwNTIwNDE3MDAwMDAwWjArMSkwJwYDVQQDDCBZdWJpY28gUElWIFJvb3QgQ0Eg
U2VyaWFsIDI2Mzc1MTCCASIwDQYJKoZIhvcNAQEBBQADggEPADCCAQoCggEBAMN2
cMTNR6YCdcTFRxuPy31PabRn5m6pJ+nSE0HRWpoaM8fc8wHC+Tmb98jmNvhWNE2E
ilU85uYKfEFP9d6Q2GmytqBnxZsAa3KqZiCCx2LwQ4iYEOb1llgotVr/whEpdVOq
joU0P5e1j1y7OfwOvky/+AXIN/9Xp0VFlYRk2tQ9GcdYKDmqU+db9iKwpAzid4oH
BVLIhmD3pvkWaRA2H3DA9t7H/HNq5v3OiO1jyLZeKqZoMbPObrxqDg+9fOdShzgf
wCqgT3XVmTeiwvBSTctyi9mHQfYd2DwkaqxRnLbNVyK9zl+DzjSGp9IhVPiVtGet
X02dxhQnGS7K6BO0Qe8CAwEAAaNCMEAwHQYDVR0OBBYEFMpfyvLEojGc6SJf8ez0
1d8Cv4O/MA8GA1UdEwQIMAYBAf8CAQEwDgYDVR0PAQH/BAQDAgEGMA0GCSqGSIb3
DQEBCwUAA4IBAQBc7Ih8Bc1fkC+FyN1fhjWioBCMr3vjneh7MLbA6kSoyWF70N3s
XhbXvT4eRh0hvxqvMZNjPU/VlRn6gLVtoEikDLrYFXN6Hh6Wmyy1GTnspnOvMvz2
lLKuym9KYdYLDgnj3BeAvzIhVzzYSeU77/Cupofj093OuAswW0jYvXsGTyix6B3d
bW5yWvyS9zNXaqGaUmP3U9/b6DlHdDogMLu3VLpBB9bm5bjaKWWJYgWltCVgUbFq
Fqyi4+JE014cSgR57Jcu3dZiehB6UtAPgad9L5cNvua/IWRmm+ANy3O2LH++Pyl8
SREzU8onbBsjMg9QDiSf5oJLKvd/Ren+zGY7
-----END CERTIFICATE-----
";

/// SHA-256 of the DER of [`YUBICO_PIV_ROOT_CA_PEM`], hex, upper case.
pub const YUBICO_PIV_ROOT_CA_SHA256: &str =
    "63ECE914E54DD87915F34033C85AF4C0696BA1512F8ADD66CED738331207B546";

/// Yubico's newer attestation root, "CN=Yubico Attestation Root 1", under
/// which firmware 5.7.4 and later is attested.
///
/// Source: Yubico's CA list developers.yubico.com/PKI/yubico-ca-certs.txt
/// (as copied into go-piv/piv-go, `v2/piv/certs/yubico-ca-certs.txt`,
/// "Last Update: 2025-02-03"), published as
/// developers.yubico.com/PKI/yubico-ca-1.pem. Subject and issuer
/// `CN=Yubico Attestation Root 1`, serial 5F37A2103244393B75E05E67D28E997FF6C1C225,
/// valid from 2024-12-01 with no end (9999-12-31), RSA 2048 signed with
/// SHA-512, path length 3, SHA-256 fingerprint [`YUBICO_ATTESTATION_ROOT_1_SHA256`].
///
/// A card under this root does not carry the whole chain: between its f9
/// certificate and this root sit Yubico's PIV and attestation intermediates,
/// which Yubico publishes (developers.yubico.com/PKI/yubico-intermediate.pem,
/// "to be used as untrusted certificates") and the caller passes as
/// `intermediates`.
pub const YUBICO_ATTESTATION_ROOT_1_PEM: &str = "-----BEGIN CERTIFICATE-----
MIIDPjCCAiagAwIBAgIUXzeiEDJEOTt14F5n0o6Zf/bBwiUwDQYJKoZIhvcNAQEN
BQAwJDEiMCAGA1UEAwwZWXViaWNvIEF0dGVzdGF0aW9uIFJvb3QgMTAgFw0yNDEy
MDEwMDAwMDBaGA85OTk5MTIzMTIzNTk1OVowJDEiMCAGA1UEAwwZWXViaWNvIEF0
dGVzdGF0aW9uIFJvb3QgMTCCASIwDQYJKoZIhvcNAQEBBQADggEPADCCAQoCggEB
AMZ6/TxM8rIT+EaoPvG81ontMOo/2mQ2RBwJHS0QZcxVaNXvl12LUhBZ5LmiBScI
Zd1Rnx1od585h+/dhK7hEm7JAALkKKts1fO53KGNLZujz5h3wGncr4hyKF0G74b/
U3K9hE5mGND6zqYchCRAHfrYMYRDF4YL0X4D5nGdxvppAy6nkEmtWmMnwO3i0TAu
csrbE485HvGM4r0VpgVdJpvgQjiTJCTIq+D35hwtT8QDIv+nGvpcyi5wcIfCkzyC
imJukhYy6KoqNMKQEdpNiSOvWyDMTMt1bwCvEzpw91u+msUt4rj0efnO9s0ZOwdw
MRDnH4xgUl5ZLwrrPkfC1/0CAwEAAaNmMGQwHQYDVR0OBBYEFNLu71oijTptXCOX
PfKF1SbxJXuSMB8GA1UdIwQYMBaAFNLu71oijTptXCOXPfKF1SbxJXuSMBIGA1Ud
EwEB/wQIMAYBAf8CAQMwDgYDVR0PAQH/BAQDAgGGMA0GCSqGSIb3DQEBDQUAA4IB
AQC3IW/sgB9pZ8apJNjxuGoX+FkILks0wMNrdXL/coUvsrhzsvl6mePMrbGJByJ1
XnquB5sgcRENFxdQFma3mio8Upf1owM1ZreXrJ0mADG2BplqbJnxiyYa+R11reIF
TWeIhMNcZKsDZrFAyPuFjCWSQvJmNWe9mFRYFgNhXJKkXIb5H1XgEDlwiedYRM7V
olBNlld6pRFKlX8ust6OTMOeADl2xNF0m1LThSdeuXvDyC1g9+ILfz3S6OIYgc3i
roRcFD354g7rKfu67qFAw9gC4yi0xBTPrY95rh4/HqaUYCA/L8ldRk6H7Xk35D+W
Vpmq2Sh/xT5HiFuhf4wJb0bK
-----END CERTIFICATE-----
";

/// SHA-256 of the DER of [`YUBICO_ATTESTATION_ROOT_1_PEM`], hex, upper case.
pub const YUBICO_ATTESTATION_ROOT_1_SHA256: &str =
    "62760C6A6EF91679F454C8902B80FD009825B3F25DA90F1FBACE2EC6586CD5A8";

/// Yubico's PIV intermediates for firmware 5.7.4 and later, which the
/// card does not carry: `CN=Yubico PIV Attestation A 1` and `B 1` (the
/// issuers of f9 certificates) and their issuers `CN=Yubico Attestation
/// Intermediate A 1` and `B 1` (issued by Attestation Root 1).
///
/// Source: Yubico's bundle developers.yubico.com/PKI/yubico-intermediate.pem,
/// as embedded in smallstep's crypto library (`kms/yubikey/yubikey.go`,
/// `yubicoPIVAttestationA1` and `B1`). SHA-256 fingerprints, checked by a
/// unit test against [`YUBICO_PIV_INTERMEDIATES_SHA256`], match those
/// published independently alongside the bundle. Yubico's bundle also holds
/// `CN=Yubico PIV Attestation B2 1`, which is not here (its bytes were not
/// at hand): a card whose f9 it issued verifies once Yubico's bundle is
/// given as extra intermediates (see `ATTESTATION.md`).
pub const YUBICO_PIV_INTERMEDIATES_PEM: &str =
    include_str!("attestation/yubico-piv-intermediates.pem");

/// SHA-256 of each certificate of [`YUBICO_PIV_INTERMEDIATES_PEM`], in order.
pub const YUBICO_PIV_INTERMEDIATES_SHA256: [&str; 4] = [
    "6DE693F05376F5D8CA29069261E1C8626C75D503BD2EDBFD75354CAD1F722870",
    "4698A1D3389C3EC60016C216250F1D0439922832D65142327436376DC2942B55",
    "2D55B7998F4E42569D6D8FA382B6DC77D1DACF07358B19701163892922B17052",
    "D4CC3F456FDAF4E7812A21AAB1DFE9D8E27D24E2FD2D6F21C9940109F0DAA754",
];

/// At most this many intermediates between f9 and a root. Yubico's newer
/// chain uses two, but its published bundle holds the intermediates of all
/// its applications, and passing it whole is expected; the bound keeps the
/// signature checks a hostile input can cause small.
pub const MAX_INTERMEDIATES: usize = 16;

const OID_FIRMWARE: &[u64] = &[1, 3, 6, 1, 4, 1, 41482, 3, 3];
const OID_SERIAL: &[u64] = &[1, 3, 6, 1, 4, 1, 41482, 3, 7];
const OID_POLICY: &[u64] = &[1, 3, 6, 1, 4, 1, 41482, 3, 8];
const OID_FORM_FACTOR: &[u64] = &[1, 3, 6, 1, 4, 1, 41482, 3, 9];

/// Which certificate a parse error is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertRole {
    /// The slot attestation (the card's answer to ATTEST for a slot).
    Slot,
    /// The card's attestation certificate from slot f9.
    Card,
    /// An intermediate between f9 and a root.
    Intermediate,
    /// A trusted root.
    Root,
}

impl fmt::Display for CertRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Slot => "the key attestation certificate",
            Self::Card => "the card's attestation certificate (slot f9)",
            Self::Intermediate => "an intermediate attestation certificate",
            Self::Root => "a trusted attestation root",
        })
    }
}

/// Why an attestation was not accepted.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AttestationError {
    /// A certificate is not DER X.509 (or has trailing bytes).
    #[error("{role} is not a valid DER X.509 certificate: {reason}")]
    Parse {
        /// Which certificate.
        role: CertRole,
        /// The parser's complaint.
        reason: String,
    },
    /// The slot attestation's signature does not verify under the f9 key.
    #[error("the key attestation is not signed by the card's attestation key (slot f9): {0}")]
    NotSignedByCard(String),
    /// No path from f9 through the given intermediates to a trusted root.
    #[error(
        "the card's attestation certificate (slot f9, issuer \"{issuer}\") is not issued by a trusted root"
    )]
    UntrustedCard {
        /// The f9 certificate's issuer, to tell the user which root is missing.
        issuer: String,
    },
    /// The attested public key is not the key being enrolled.
    #[error("the key in the attestation is not the enrolled key")]
    KeyMismatch,
    /// A required Yubico extension is absent.
    #[error("the key attestation has no {name} extension ({oid})")]
    MissingExtension {
        /// What the extension carries.
        name: &'static str,
        /// Its OID.
        oid: String,
    },
    /// A Yubico extension is present but not in the documented layout.
    #[error("the key attestation's {name} extension ({oid}) is malformed: {reason}")]
    MalformedExtension {
        /// What the extension carries.
        name: &'static str,
        /// Its OID.
        oid: String,
        /// What is wrong.
        reason: String,
    },
    /// More intermediates than [`MAX_INTERMEDIATES`].
    #[error("{0} intermediate certificates given; at most {MAX_INTERMEDIATES} are accepted")]
    TooManyIntermediates(usize),
    /// A configured root is not usable.
    #[error("trusted attestation root: {0}")]
    BadRoot(String),
}

type Result<T, E = AttestationError> = std::result::Result<T, E>;

/// The roots an attestation chain may end at.
#[derive(Clone, Debug)]
pub struct AttestationRoots {
    /// DER and whether it is built in.
    roots: Vec<(Vec<u8>, bool)>,
}

impl Default for AttestationRoots {
    fn default() -> Self {
        Self::yubico()
    }
}

impl AttestationRoots {
    /// Yubico's roots: the PIV root ([`YUBICO_PIV_ROOT_CA_PEM`]) and
    /// Attestation Root 1 ([`YUBICO_ATTESTATION_ROOT_1_PEM`]).
    pub fn yubico() -> Self {
        let roots = [YUBICO_PIV_ROOT_CA_PEM, YUBICO_ATTESTATION_ROOT_1_PEM]
            .iter()
            .filter_map(|pem| pem_to_der(pem.as_bytes()).ok())
            .map(|der| (der, true))
            .collect();
        Self { roots }
    }

    /// No root at all: only roots added with [`Self::with_root_der`] or
    /// [`Self::with_root_pem`] are trusted (a test setup that must not accept
    /// real cards).
    pub fn none() -> Self {
        Self { roots: Vec::new() }
    }

    /// Also trust this root (DER). It must parse as a certificate.
    pub fn with_root_der(mut self, der: &[u8]) -> Result<Self> {
        parse(der, CertRole::Root)?;
        self.roots.push((der.to_vec(), false));
        Ok(self)
    }

    /// Also trust this root (one PEM certificate).
    pub fn with_root_pem(self, pem: &str) -> Result<Self> {
        let der = pem_to_der(pem.as_bytes())?;
        self.with_root_der(&der)
    }

    /// The DER of each trusted root, built-in ones first.
    pub fn roots_der(&self) -> impl Iterator<Item = &[u8]> {
        self.roots.iter().map(|(d, _)| d.as_slice())
    }
}

/// The DER of each certificate in a PEM bundle, in order, such as Yubico's
/// published intermediates (`yubico-intermediate.pem`), to pass as
/// `intermediates`. Blocks other than CERTIFICATE, or an empty bundle, are an
/// error; at most 64 certificates are read.
pub fn pem_certificates(pem: &str) -> Result<Vec<Vec<u8>>> {
    let mut out = Vec::new();
    for block in x509_parser::pem::Pem::iter_from_buffer(pem.as_bytes()).take(65) {
        let block = block.map_err(|e| AttestationError::Parse {
            role: CertRole::Intermediate,
            reason: format!("not PEM: {e}"),
        })?;
        if block.label != "CERTIFICATE" {
            return Err(AttestationError::Parse {
                role: CertRole::Intermediate,
                reason: format!("PEM block is {:?}, not CERTIFICATE", block.label),
            });
        }
        out.push(block.contents);
    }
    if out.is_empty() || out.len() > 64 {
        return Err(AttestationError::Parse {
            role: CertRole::Intermediate,
            reason: format!("expected 1 to 64 PEM certificates, found {}", out.len()),
        });
    }
    Ok(out)
}

fn pem_to_der(pem: &[u8]) -> Result<Vec<u8>> {
    let (_, p) = x509_parser::pem::parse_x509_pem(pem)
        .map_err(|e| AttestationError::BadRoot(format!("not a PEM certificate: {e}")))?;
    if p.label != "CERTIFICATE" {
        return Err(AttestationError::BadRoot(format!(
            "PEM block is {:?}, not CERTIFICATE",
            p.label
        )));
    }
    Ok(p.contents)
}

/// PIN policy of the attested key (first byte of extension `.8`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PinPolicy {
    /// 1: no PIN for operations with the key.
    Never,
    /// 2: the PIN once per session.
    Once,
    /// 3: the PIN before every operation.
    Always,
    /// 4: a fingerprint match (or the PIN) once per session; YubiKey Bio.
    MatchOnce,
    /// 5: a fingerprint match (or the PIN) before every operation; YubiKey Bio.
    MatchAlways,
}

impl fmt::Display for PinPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Never => "never",
            Self::Once => "once",
            Self::Always => "always",
            Self::MatchOnce => "match-once",
            Self::MatchAlways => "match-always",
        })
    }
}

/// Touch policy of the attested key (second byte of extension `.8`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TouchPolicy {
    /// 1: no touch.
    Never,
    /// 2: a touch for every operation.
    Always,
    /// 3: a touch, then no other for 15 seconds.
    Cached,
}

impl fmt::Display for TouchPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Never => "never",
            Self::Always => "always",
            Self::Cached => "cached",
        })
    }
}

/// The YubiKey's firmware version (extension `.3`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct FirmwareVersion {
    /// Major.
    pub major: u8,
    /// Minor.
    pub minor: u8,
    /// Patch.
    pub patch: u8,
}

impl fmt::Display for FirmwareVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

/// The device's shape (low bits of extension `.9`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FormFactorKind {
    /// 0: the device does not say.
    Unspecified,
    /// 1.
    UsbAKeychain,
    /// 2.
    UsbANano,
    /// 3.
    UsbCKeychain,
    /// 4.
    UsbCNano,
    /// 5: USB-C and Lightning.
    UsbCLightning,
    /// 6: YubiKey Bio, USB-A.
    UsbABio,
    /// 7: YubiKey Bio, USB-C.
    UsbCBio,
    /// A value not documented when this was written.
    Other(u8),
}

/// Extension `.9`: the shape, and the FIPS (0x80) and CSPN (0x40) flags that
/// newer devices set in the same byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FormFactor {
    /// The shape.
    pub kind: FormFactorKind,
    /// A FIPS series device.
    pub fips: bool,
    /// A CSPN series device.
    pub cspn: bool,
}

impl FormFactor {
    /// Decodes the extension's byte.
    pub fn from_byte(b: u8) -> Self {
        let kind = match b & 0x3f {
            0 => FormFactorKind::Unspecified,
            1 => FormFactorKind::UsbAKeychain,
            2 => FormFactorKind::UsbANano,
            3 => FormFactorKind::UsbCKeychain,
            4 => FormFactorKind::UsbCNano,
            5 => FormFactorKind::UsbCLightning,
            6 => FormFactorKind::UsbABio,
            7 => FormFactorKind::UsbCBio,
            other => FormFactorKind::Other(other),
        };
        Self {
            kind,
            fips: b & 0x80 != 0,
            cspn: b & 0x40 != 0,
        }
    }
}

impl fmt::Display for FormFactor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            FormFactorKind::Unspecified => f.write_str("unspecified")?,
            FormFactorKind::UsbAKeychain => f.write_str("USB-A keychain")?,
            FormFactorKind::UsbANano => f.write_str("USB-A nano")?,
            FormFactorKind::UsbCKeychain => f.write_str("USB-C keychain")?,
            FormFactorKind::UsbCNano => f.write_str("USB-C nano")?,
            FormFactorKind::UsbCLightning => f.write_str("USB-C/Lightning keychain")?,
            FormFactorKind::UsbABio => f.write_str("USB-A Bio")?,
            FormFactorKind::UsbCBio => f.write_str("USB-C Bio")?,
            FormFactorKind::Other(v) => write!(f, "unknown (0x{v:02x})")?,
        }
        if self.fips {
            f.write_str(", FIPS")?;
        }
        if self.cspn {
            f.write_str(", CSPN")?;
        }
        Ok(())
    }
}

/// Which kind of root the chain ended at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Anchor {
    /// A root built into Keyholder (Yubico's).
    BuiltIn,
    /// A root from the configuration (a test root, or the issuer of an
    /// organisation's own f9 certificate).
    Configured,
}

/// What a verified attestation says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attestation {
    /// The YubiKey's serial number (extension `.7`).
    pub serial: u64,
    /// Firmware version (extension `.3`).
    pub firmware: FirmwareVersion,
    /// PIN policy of the attested key.
    pub pin_policy: PinPolicy,
    /// Touch policy of the attested key.
    pub touch_policy: TouchPolicy,
    /// Form factor (extension `.9`); older firmware does not include it.
    pub form_factor: Option<FormFactor>,
    /// Subject of the slot attestation, e.g. `CN=YubiKey PIV Attestation 9d`.
    pub subject: String,
    /// Subject of the root the chain ended at.
    pub root_subject: String,
    /// Whether that root is built in or configured.
    pub anchor: Anchor,
}

impl Attestation {
    /// The slot named in the subject (Yubico writes "YubiKey PIV
    /// Attestation" followed by the slot in hex), if the subject has that
    /// form. The subject is signed by the card, so this tells a caller which
    /// slot the card attested.
    pub fn slot(&self) -> Option<u8> {
        let hex = self.subject.strip_prefix("CN=YubiKey PIV Attestation ")?;
        if hex.is_empty() || hex.len() > 2 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        u8::from_str_radix(hex, 16).ok()
    }
}

/// Verifies a YubiKey PIV attestation and returns what it attests.
///
/// - `slot_cert`: DER of the card's answer to ATTEST for the key's slot.
/// - `card_cert`: DER of the card's attestation certificate (slot f9).
/// - `intermediates`: DER of certificates between f9 and the root, in any
///   order (empty for firmware before 5.7.4); at most [`MAX_INTERMEDIATES`].
/// - `roots`: the trusted roots ([`AttestationRoots::yubico`] by default).
/// - `enrolled_key`: the public key being enrolled, as the card returned it at
///   generation: for EC keys the SEC1 point (uncompressed or compressed), for
///   RSA the PKCS#1 `RSAPublicKey`, for Ed25519 the 32 bytes.
///
/// Validity periods are not checked (see `ATTESTATION.md`).
pub fn verify_piv_attestation(
    slot_cert: &[u8],
    card_cert: &[u8],
    intermediates: &[&[u8]],
    roots: &AttestationRoots,
    enrolled_key: &[u8],
) -> Result<Attestation> {
    if intermediates.len() > MAX_INTERMEDIATES {
        return Err(AttestationError::TooManyIntermediates(intermediates.len()));
    }
    let slot = parse(slot_cert, CertRole::Slot)?;
    let card = parse(card_cert, CertRole::Card)?;
    let inters = intermediates
        .iter()
        .map(|d| parse(d, CertRole::Intermediate))
        .collect::<Result<Vec<_>>>()?;
    let trusted = roots
        .roots
        .iter()
        .map(|(d, builtin)| parse(d, CertRole::Root).map(|c| (c, *builtin)))
        .collect::<Result<Vec<_>>>()?;

    verify_signed_by(&slot, card.public_key()).map_err(AttestationError::NotSignedByCard)?;

    let (root, builtin) = chain_to_root(&card, &inters, &trusted)?;

    if !same_key(slot.public_key(), enrolled_key) {
        return Err(AttestationError::KeyMismatch);
    }

    let ext = read_extensions(&slot)?;
    Ok(Attestation {
        serial: ext.serial,
        firmware: ext.firmware,
        pin_policy: ext.pin_policy,
        touch_policy: ext.touch_policy,
        form_factor: ext.form_factor,
        subject: slot.subject().to_string(),
        root_subject: root.subject().to_string(),
        anchor: if builtin {
            Anchor::BuiltIn
        } else {
            Anchor::Configured
        },
    })
}

fn parse(der: &[u8], role: CertRole) -> Result<X509Certificate<'_>> {
    match X509Certificate::from_der(der) {
        Ok(([], cert)) => Ok(cert),
        Ok((rest, _)) => Err(AttestationError::Parse {
            role,
            reason: format!("{} trailing bytes", rest.len()),
        }),
        Err(e) => Err(AttestationError::Parse {
            role,
            reason: e.to_string(),
        }),
    }
}

/// Walks from f9 up: at each step a root that signed the current certificate
/// ends the walk; otherwise an unused intermediate that signed it becomes
/// current. Each intermediate is used at most once, so the walk is bounded.
fn chain_to_root<'c, 'a>(
    card: &'c X509Certificate<'a>,
    inters: &'c [X509Certificate<'a>],
    roots: &'c [(X509Certificate<'a>, bool)],
) -> Result<(&'c X509Certificate<'a>, bool)> {
    let mut used = vec![false; inters.len()];
    let mut current = card;
    for _ in 0..=inters.len() {
        if let Some((root, builtin)) = roots
            .iter()
            .find(|(r, _)| verify_signed_by(current, r.public_key()).is_ok())
        {
            return Ok((root, *builtin));
        }
        let next = inters.iter().enumerate().find(|(i, c)| {
            !used.get(*i).copied().unwrap_or(true)
                && verify_signed_by(current, c.public_key()).is_ok()
        });
        match next {
            Some((i, c)) => {
                if let Some(u) = used.get_mut(i) {
                    *u = true;
                }
                current = c;
            }
            None => break,
        }
    }
    Err(AttestationError::UntrustedCard {
        issuer: card.issuer().to_string(),
    })
}

fn ec_curve(spki: &SubjectPublicKeyInfo<'_>) -> Option<Oid<'static>> {
    if spki.algorithm.algorithm != OID_KEY_TYPE_EC_PUBLIC_KEY {
        return None;
    }
    let params = spki.algorithm.parameters.as_ref()?;
    let oid = params.as_oid().ok()?;
    if oid == OID_EC_P256 {
        Some(OID_EC_P256)
    } else if oid == OID_NIST_EC_P384 {
        Some(OID_NIST_EC_P384)
    } else {
        None
    }
}

/// Checks `cert`'s signature under `issuer_key`. SHA-1 and RSA keys under
/// 2048 bits are refused; the error says why in words.
fn verify_signed_by(
    cert: &X509Certificate<'_>,
    issuer_key: &SubjectPublicKeyInfo<'_>,
) -> std::result::Result<(), String> {
    use ring::signature as rs;
    let alg = &cert.signature_algorithm.algorithm;
    let is_rsa_key = issuer_key.algorithm.algorithm == OID_PKCS1_RSAENCRYPTION;
    let curve = ec_curve(issuer_key);
    let p256 = curve.as_ref() == Some(&OID_EC_P256);
    let p384 = curve.as_ref() == Some(&OID_NIST_EC_P384);
    let verifier: &dyn rs::VerificationAlgorithm = if *alg == OID_PKCS1_SHA256WITHRSA && is_rsa_key
    {
        &rs::RSA_PKCS1_2048_8192_SHA256
    } else if *alg == OID_PKCS1_SHA384WITHRSA && is_rsa_key {
        &rs::RSA_PKCS1_2048_8192_SHA384
    } else if *alg == OID_PKCS1_SHA512WITHRSA && is_rsa_key {
        &rs::RSA_PKCS1_2048_8192_SHA512
    } else if *alg == OID_SIG_ECDSA_WITH_SHA256 && p256 {
        &rs::ECDSA_P256_SHA256_ASN1
    } else if *alg == OID_SIG_ECDSA_WITH_SHA256 && p384 {
        &rs::ECDSA_P384_SHA256_ASN1
    } else if *alg == OID_SIG_ECDSA_WITH_SHA384 && p256 {
        &rs::ECDSA_P256_SHA384_ASN1
    } else if *alg == OID_SIG_ECDSA_WITH_SHA384 && p384 {
        &rs::ECDSA_P384_SHA384_ASN1
    } else if *alg == OID_SIG_ED25519 && issuer_key.algorithm.algorithm == OID_SIG_ED25519 {
        &rs::ED25519
    } else {
        return Err(format!(
            "signature algorithm {alg} with an issuer key of type {} is not supported",
            issuer_key.algorithm.algorithm
        ));
    };
    rs::UnparsedPublicKey::new(verifier, &issuer_key.subject_public_key.data)
        .verify(cert.tbs_certificate.as_ref(), &cert.signature_value.data)
        .map_err(|_| "the signature does not verify".to_owned())
}

fn same_key(spki: &SubjectPublicKeyInfo<'_>, enrolled: &[u8]) -> bool {
    let attested: &[u8] = &spki.subject_public_key.data;
    if attested == enrolled {
        return true;
    }
    // A P-256 point may be given compressed on one side and not the other.
    if ec_curve(spki).as_ref() != Some(&OID_EC_P256) {
        return false;
    }
    match (
        p256::PublicKey::from_sec1_bytes(attested),
        p256::PublicKey::from_sec1_bytes(enrolled),
    ) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

struct Extensions {
    serial: u64,
    firmware: FirmwareVersion,
    pin_policy: PinPolicy,
    touch_policy: TouchPolicy,
    form_factor: Option<FormFactor>,
}

fn malformed(name: &'static str, oid: &[u64], reason: impl Into<String>) -> AttestationError {
    AttestationError::MalformedExtension {
        name,
        oid: oid_text(oid),
        reason: reason.into(),
    }
}

fn oid_text(oid: &[u64]) -> String {
    oid.iter().map(u64::to_string).collect::<Vec<_>>().join(".")
}

/// The raw bytes of a Yubico byte-string extension. The documented layout is
/// the bytes themselves as the extension value; some firmware is reported to
/// wrap them in a DER OCTET STRING, which is told apart by length and
/// accepted too.
fn fixed_bytes<'a>(
    value: &'a [u8],
    len: usize,
    name: &'static str,
    oid: &[u64],
) -> Result<&'a [u8]> {
    if value.len() == len {
        return Ok(value);
    }
    if value.len() == len + 2 && value.first() == Some(&0x04) && value.get(1) == Some(&(len as u8))
    {
        return Ok(value.get(2..).unwrap_or_default());
    }
    Err(malformed(
        name,
        oid,
        format!("expected {len} bytes, found {}", value.len()),
    ))
}

fn read_extensions(cert: &X509Certificate<'_>) -> Result<Extensions> {
    let mut serial = None;
    let mut firmware = None;
    let mut policy = None;
    let mut form_factor = None;
    for ext in cert.extensions() {
        let arcs: Option<Vec<u64>> = ext.oid.iter().map(|i| i.collect());
        let Some(arcs) = arcs else { continue };
        let slot: &mut Option<&[u8]> = if arcs == OID_SERIAL {
            &mut serial
        } else if arcs == OID_FIRMWARE {
            &mut firmware
        } else if arcs == OID_POLICY {
            &mut policy
        } else if arcs == OID_FORM_FACTOR {
            &mut form_factor
        } else {
            continue;
        };
        if slot.is_some() {
            return Err(malformed(
                ext_name(&arcs),
                &arcs,
                "the extension appears twice",
            ));
        }
        *slot = Some(ext.value);
    }

    let missing = |name: &'static str, oid: &[u64]| AttestationError::MissingExtension {
        name,
        oid: oid_text(oid),
    };

    let serial_der = serial.ok_or_else(|| missing("serial number", OID_SERIAL))?;
    let serial = match u64::from_der(serial_der) {
        Ok(([], v)) => v,
        Ok(_) => {
            return Err(malformed(
                "serial number",
                OID_SERIAL,
                "trailing bytes after the INTEGER",
            ));
        }
        Err(e) => {
            return Err(malformed(
                "serial number",
                OID_SERIAL,
                format!("not a non-negative DER INTEGER: {e}"),
            ));
        }
    };

    let fw = fixed_bytes(
        firmware.ok_or_else(|| missing("firmware version", OID_FIRMWARE))?,
        3,
        "firmware version",
        OID_FIRMWARE,
    )?;
    let firmware = match fw {
        [major, minor, patch] => FirmwareVersion {
            major: *major,
            minor: *minor,
            patch: *patch,
        },
        _ => return Err(malformed("firmware version", OID_FIRMWARE, "not 3 bytes")),
    };

    let pol = fixed_bytes(
        policy.ok_or_else(|| missing("PIN and touch policy", OID_POLICY))?,
        2,
        "PIN and touch policy",
        OID_POLICY,
    )?;
    let (pin_policy, touch_policy) = match pol {
        [p, t] => (
            match p {
                1 => PinPolicy::Never,
                2 => PinPolicy::Once,
                3 => PinPolicy::Always,
                4 => PinPolicy::MatchOnce,
                5 => PinPolicy::MatchAlways,
                other => {
                    return Err(malformed(
                        "PIN and touch policy",
                        OID_POLICY,
                        format!("unknown PIN policy {other}"),
                    ));
                }
            },
            match t {
                1 => TouchPolicy::Never,
                2 => TouchPolicy::Always,
                3 => TouchPolicy::Cached,
                other => {
                    return Err(malformed(
                        "PIN and touch policy",
                        OID_POLICY,
                        format!("unknown touch policy {other}"),
                    ));
                }
            },
        ),
        _ => return Err(malformed("PIN and touch policy", OID_POLICY, "not 2 bytes")),
    };

    let form_factor = match form_factor {
        None => None,
        Some(v) => match fixed_bytes(v, 1, "form factor", OID_FORM_FACTOR)? {
            [b] => Some(FormFactor::from_byte(*b)),
            _ => return Err(malformed("form factor", OID_FORM_FACTOR, "not 1 byte")),
        },
    };

    Ok(Extensions {
        serial,
        firmware,
        pin_policy,
        touch_policy,
        form_factor,
    })
}

fn ext_name(arcs: &[u64]) -> &'static str {
    if arcs == OID_SERIAL {
        "serial number"
    } else if arcs == OID_FIRMWARE {
        "firmware version"
    } else if arcs == OID_POLICY {
        "PIN and touch policy"
    } else {
        "form factor"
    }
}

pub mod enroll;

#[cfg(test)]
mod tests;
