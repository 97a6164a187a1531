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

#![forbid(unsafe_code)]

pub mod algorithm;
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
    certificate_info, certificate_public_key, create_ca_certificate, import_ca, issue, issuer,
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
