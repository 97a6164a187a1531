//! Certificates and keys for Keyholder, as pure functions: no I/O, no
//! token, no daemon state.
//!
//! The crate's map:
//! - [`algorithm`]: the one list of key algorithms ([`KeyAlgorithm`]).
//! - [`x509`]: CA certificates and issuance by profile; signing goes through
//!   rcgen's [`SigningKey`] trait, so a CA key may live in memory or on a
//!   token (the daemon adapts `C_Sign` to the trait).
//! - [`keys`]: signing keys held in memory ([`keys::SoftKey`]).
//! - [`ecdsa`]: P-256 signatures with nonces prepared ahead of time.
//! - [`ssh`]: OpenSSH user and host certificates.
//! - [`kube`]: kubeconfigs and Kubernetes ExecCredentials.
//! - [`attestation`]: YubiKey PIV attestation verification.

#![forbid(unsafe_code)]

use std::time::{Duration, SystemTime};

pub mod algorithm;
pub mod attestation;
pub mod ecdsa;
pub mod keys;
pub mod kube;
pub mod ssh;
pub mod x509;

pub use algorithm::KeyAlgorithm;
pub use rcgen;
pub use rcgen::{PublicKeyData, SigningKey};
pub use x509::{
    CaIssuer, CertificateInfo, FreshP256, IssueRequest, Issued, Profile, PublicKeySource,
    certificate_bundle, certificate_info, certificate_public_key, create_ca_certificate, import_ca,
    issue, issuer, with_csr_names,
};

/// Errors from building or parsing certificates. Messages name fields.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PkiError {
    /// A request field is not acceptable; `field` names it.
    #[error("{field}: {reason}")]
    Invalid {
        /// The field.
        field: &'static str,
        /// Why.
        reason: String,
    },
    /// The CSR does not parse, its signature does not verify, or its key type is unsupported.
    #[error("csr: {0}")]
    Csr(String),
    /// A certificate or key did not parse.
    #[error("{0}")]
    Parse(String),
    /// Signing or encoding failed.
    #[error("cannot build the certificate: {0}")]
    Build(String),
}

pub(crate) type Result<T, E = PkiError> = std::result::Result<T, E>;

pub(crate) fn invalid(field: &'static str, reason: impl Into<String>) -> PkiError {
    PkiError::Invalid {
        field,
        reason: reason.into(),
    }
}

/// The longest validity Keyholder puts in any certificate (X.509 or SSH):
/// 100 years. Lifetimes from requests, CA caps and configuration are
/// checked against it before any time arithmetic, so no request can make
/// a deadline overflow.
pub const MAX_VALIDITY: Duration = Duration::from_secs(100 * 365 * 86400);

/// `now + ttl`, refused (naming `field`) when `ttl` is over
/// [`MAX_VALIDITY`] or the clock cannot represent the result.
pub fn deadline(now: SystemTime, ttl: Duration, field: &'static str) -> Result<SystemTime> {
    if ttl > MAX_VALIDITY {
        return Err(invalid(
            field,
            format!(
                "is {} seconds; the longest Keyholder issues is {} seconds (100 years)",
                ttl.as_secs(),
                MAX_VALIDITY.as_secs()
            ),
        ));
    }
    now.checked_add(ttl)
        .ok_or_else(|| invalid(field, "is beyond what the clock can represent"))
}

/// `now - backdate`, never before the Unix epoch.
pub fn backdated(now: SystemTime, backdate: Duration) -> SystemTime {
    now.checked_sub(backdate)
        .filter(|t| *t >= SystemTime::UNIX_EPOCH)
        .unwrap_or(SystemTime::UNIX_EPOCH)
}

/// Lower-case hex of `bytes`, without a `format!` per byte (serials are
/// written on every issuance).
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    out
}
