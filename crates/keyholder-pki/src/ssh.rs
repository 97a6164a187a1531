//! OpenSSH user and host certificates.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ssh_key::certificate::{Builder, CertType};
use ssh_key::public::KeyData;

use crate::PkiError;

/// Extensions OpenSSH's `ssh-keygen -s` gives user certificates by default.
pub const DEFAULT_USER_EXTENSIONS: [&str; 5] = [
    "permit-X11-forwarding",
    "permit-agent-forwarding",
    "permit-port-forwarding",
    "permit-pty",
    "permit-user-rc",
];

/// A CA key that makes SSH signatures, wherever it is held (the daemon
/// adapts in-memory and token keys to it).
pub trait SshSigner {
    /// The CA's public key.
    fn ssh_public(&self) -> &KeyData;
    /// An SSH signature over `msg` (RSA keys: rsa-sha2-512).
    fn sign_ssh_message(&self, msg: &[u8]) -> Result<ssh_key::Signature, PkiError>;
}

impl SshSigner for crate::keys::SoftKey {
    fn ssh_public(&self) -> &KeyData {
        crate::keys::SoftKey::ssh_public(self)
    }

    fn sign_ssh_message(&self, msg: &[u8]) -> Result<ssh_key::Signature, PkiError> {
        self.sign_ssh(msg, 0x04)
    }
}

/// ssh-key's builder wants `signature::Signer` and `KeyData: From<&S>`.
struct Adapter<'a, S: SshSigner + ?Sized>(&'a S);

impl<S: SshSigner + ?Sized> signature::Signer<ssh_key::Signature> for Adapter<'_, S> {
    fn try_sign(&self, msg: &[u8]) -> Result<ssh_key::Signature, signature::Error> {
        self.0
            .sign_ssh_message(msg)
            .map_err(signature::Error::from_source)
    }
}

impl<S: SshSigner + ?Sized> From<&Adapter<'_, S>> for KeyData {
    fn from(s: &Adapter<'_, S>) -> KeyData {
        s.0.ssh_public().clone()
    }
}

/// What to certify.
#[derive(Clone, Debug)]
pub struct SshCertRequest {
    /// User or host certificate.
    pub host: bool,
    /// Key id (shown in sshd's logs).
    pub key_id: String,
    /// Principals: user names, or host names for host certificates. At least one.
    pub principals: Vec<String>,
    /// Validity from now.
    pub ttl: Duration,
    /// `valid_after` is set this far in the past, for clock skew.
    pub backdate: Duration,
    /// Critical options, e.g. `force-command`, `source-address`.
    pub critical_options: Vec<(String, String)>,
    /// Extensions; empty means the OpenSSH defaults for user certificates.
    pub extensions: Vec<String>,
}

/// Issues a certificate for `subject`, signed by `ca`. Returns it with its serial.
pub fn issue<S: SshSigner + ?Sized>(
    ca: &S,
    subject: &KeyData,
    req: &SshCertRequest,
) -> Result<(ssh_key::Certificate, u64), PkiError> {
    let invalid = |field: &'static str, reason: String| PkiError::Invalid { field, reason };
    if req.principals.is_empty() {
        return Err(invalid(
            "principals",
            "at least one principal is required".into(),
        ));
    }
    for p in &req.principals {
        if p.is_empty()
            || p.len() > 255
            || p.chars()
                .any(|c| c.is_control() || c == ',' || c.is_whitespace())
        {
            return Err(invalid(
                "principals",
                format!("{p:?} is not a valid principal"),
            ));
        }
    }
    if req.ttl < Duration::from_secs(1) {
        return Err(invalid("ttl_seconds", "must be at least 1s".into()));
    }
    let now = SystemTime::now();
    let secs = |t: SystemTime| {
        t.duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
    };
    let valid_after = secs(crate::backdated(now, req.backdate));
    let valid_before = secs(crate::deadline(now, req.ttl, "ttl_seconds")?);
    let mut seen = std::collections::BTreeSet::new();
    for e in &req.extensions {
        if e.is_empty() || e.len() > 255 || e.chars().any(|c| c.is_control()) {
            return Err(invalid(
                "extensions",
                format!("{e:?} is not an extension name"),
            ));
        }
        if !seen.insert(e.as_str()) {
            return Err(invalid("extensions", format!("{e:?} is given twice")));
        }
    }
    let mut seen = std::collections::BTreeSet::new();
    for (name, _) in &req.critical_options {
        if name.is_empty() || name.len() > 255 || name.chars().any(|c| c.is_control()) {
            return Err(invalid(
                "critical_options",
                format!("{name:?} is not an option name"),
            ));
        }
        if !seen.insert(name.as_str()) {
            return Err(invalid(
                "critical_options",
                format!("{name:?} is given twice"),
            ));
        }
    }
    let mut nonce = vec![0u8; 16];
    rand::Rng::fill(&mut rand::rngs::OsRng, nonce.as_mut_slice());
    let serial: u64 = rand::Rng::r#gen(&mut rand::rngs::OsRng);
    let build = |e: ssh_key::Error| PkiError::Build(e.to_string());
    let mut b = Builder::new(nonce, subject.clone(), valid_after, valid_before).map_err(build)?;
    b.serial(serial).map_err(build)?;
    b.cert_type(if req.host {
        CertType::Host
    } else {
        CertType::User
    })
    .map_err(build)?;
    b.key_id(req.key_id.clone()).map_err(build)?;
    for p in &req.principals {
        b.valid_principal(p.clone()).map_err(build)?;
    }
    for (name, value) in &req.critical_options {
        b.critical_option(name.clone(), value.clone())
            .map_err(build)?;
    }
    if req.extensions.is_empty() && !req.host {
        for e in DEFAULT_USER_EXTENSIONS {
            b.extension(e, "").map_err(build)?;
        }
    } else {
        for e in &req.extensions {
            b.extension(e.clone(), "").map_err(build)?;
        }
    }
    let cert = b.sign(&Adapter(ca)).map_err(build)?;
    Ok((cert, serial))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::KeyAlgorithm;
    use crate::keys::SoftKey;

    #[test]
    fn certificate_validates_against_its_ca() {
        let ca_key = SoftKey::generate(KeyAlgorithm::Ed25519).unwrap();
        let user = SoftKey::generate(KeyAlgorithm::EcdsaP256).unwrap();
        let ca = &ca_key;
        let req = SshCertRequest {
            host: false,
            key_id: "alice".into(),
            principals: vec!["root".into()],
            ttl: Duration::from_secs(3600),
            backdate: Duration::from_secs(300),
            critical_options: vec![],
            extensions: vec![],
        };
        let (cert, _) = issue(ca, user.ssh_public(), &req).unwrap();
        let fp = ca_key.ssh_public().fingerprint(Default::default());
        cert.validate(&[fp]).unwrap();
        assert_eq!(cert.valid_principals(), ["root".to_string()]);
        assert_eq!(cert.valid_before() - cert.valid_after(), 3900);
        let mut empty = req.clone();
        empty.principals.clear();
        assert!(issue(ca, user.ssh_public(), &empty).is_err());

        // Extreme lifetimes and repeated extensions are field errors, not panics.
        for ttl in [u64::MAX, u64::MAX / 2, 101 * 365 * 86400] {
            let mut long = req.clone();
            long.ttl = Duration::from_secs(ttl);
            let e = issue(ca, user.ssh_public(), &long).unwrap_err();
            assert!(e.to_string().starts_with("ttl_seconds:"), "{e}");
        }
        let mut huge_backdate = req.clone();
        huge_backdate.backdate = Duration::from_secs(u64::MAX);
        assert!(issue(ca, user.ssh_public(), &huge_backdate).is_ok());
        let mut twice = req.clone();
        twice.extensions = vec!["permit-pty".into(), "permit-pty".into()];
        let e = issue(ca, user.ssh_public(), &twice).unwrap_err();
        assert!(e.to_string().starts_with("extensions:"), "{e}");
    }
}
