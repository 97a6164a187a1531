//! The one boundary between the wire (`keyholder.v1`) and the domain:
//! `TryFrom` for requests that need checking, `From` (or a function, where
//! both sides are foreign types) for responses, and the rule that a TTL of
//! 0 means the default.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use keyholder_proto::v1;
use keyholder_token::TokenDescription;
use secrecy::SecretString;

use crate::core::{Initialized, SessionState, SessionStatus, TokenListing};
use crate::error::{Error, Result};

/// A protobuf timestamp.
pub fn timestamp(t: SystemTime) -> Option<prost_types::Timestamp> {
    Some(prost_types::Timestamp::from(t))
}

/// A protobuf timestamp from the vault's RFC 3339 text (none if unreadable).
pub fn rfc3339_timestamp(s: &str) -> Option<prost_types::Timestamp> {
    humantime::parse_rfc3339(s)
        .ok()
        .map(prost_types::Timestamp::from)
}

/// A protobuf timestamp from Unix seconds.
pub fn unix_timestamp(seconds: u64) -> Option<prost_types::Timestamp> {
    UNIX_EPOCH
        .checked_add(Duration::from_secs(seconds))
        .and_then(timestamp)
}

/// A TTL field: 0 means "the default".
pub fn ttl(seconds: u64) -> Option<Duration> {
    (seconds > 0).then(|| Duration::from_secs(seconds))
}

/// A TTL field, with 0 meaning `default`.
pub fn ttl_or(seconds: u64, default: Duration) -> Duration {
    ttl(seconds).unwrap_or(default)
}

/// Refuses `ttl` over `cap` ("the CA's", "the cluster's" maximum).
pub fn check_ttl(ttl: Duration, cap: Duration, whose: &str) -> Result<()> {
    if ttl > cap {
        return Err(Error::InvalidArgument {
            field: "ttl_seconds",
            reason: format!(
                "{} is over {whose} maximum of {}",
                humantime::format_duration(ttl),
                humantime::format_duration(cap)
            ),
        });
    }
    Ok(())
}

/// The API view of a token.
pub fn token_info(t: &TokenDescription, recipients: Vec<String>) -> v1::TokenInfo {
    v1::TokenInfo {
        label: t.label.clone(),
        serial: t.serial.clone(),
        manufacturer: t.manufacturer.clone(),
        model: t.model.clone(),
        pin_count_low: t.pin.count_low,
        pin_final_try: t.pin.final_try,
        pin_locked: t.pin.locked,
        recipients,
        rollback_protection: String::new(),
        vault_key: None,
    }
}

/// The API view of a PIV vault key's record.
pub fn piv_key_info(r: &keyholder_vault::PivKeyRecord) -> v1::PivKeyInfo {
    v1::PivKeyInfo {
        slot: r.slot.clone(),
        firmware: r.firmware.clone(),
        pin_policy: r.pin_policy.clone(),
        touch_policy: r.touch_policy.clone(),
        form_factor: r.form_factor.clone(),
        origin: r.origin.clone(),
        attested: r.attested,
        attestation: r.attestation.clone(),
        management_key: r.management_key.clone(),
    }
}

impl From<&TokenListing> for v1::TokenInfo {
    fn from(t: &TokenListing) -> Self {
        let mut info = token_info(&t.token, t.recipients.clone());
        info.rollback_protection = match t.rollback_protection {
            None => String::new(),
            Some(true) => "on".into(),
            Some(false) => "off".into(),
        };
        info.vault_key = t.vault_key.as_ref().map(piv_key_info);
        info
    }
}

impl From<Initialized> for v1::InitResponse {
    fn from(i: Initialized) -> Self {
        Self {
            vault_path: i.vault_path,
            token_recipient: i.token_recipient,
            token: Some(token_info(&i.token, Vec::new())),
            vault_key: i.vault_key.as_ref().map(piv_key_info),
        }
    }
}

impl From<&SessionStatus> for v1::StatusResponse {
    fn from(s: &SessionStatus) -> Self {
        let mut out = Self {
            vault_path: s.vault_path.clone(),
            ssh_agent_socket: s
                .ssh_agent_socket
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            vault_key: s.vault_key.as_ref().map(piv_key_info),
            ..Default::default()
        };
        match &s.state {
            SessionState::Uninitialized => {
                out.state = v1::SessionState::Uninitialized as i32;
                out.lock_reason = crate::core::LockReason::Start.as_str().to_owned();
            }
            SessionState::Locked(reason) => {
                out.state = v1::SessionState::Locked as i32;
                out.lock_reason = reason.as_str().to_owned();
            }
            SessionState::Unlocked(u) => {
                out.state = v1::SessionState::Unlocked as i32;
                let mut token = token_info(&u.token, vec![u.recipient.clone()]);
                token.vault_key = out.vault_key.clone();
                out.token = Some(token);
                out.unlocked_at = timestamp(u.unlocked_at);
                out.expires_at = timestamp(u.expires_at);
                out.idle_deadline = timestamp(u.idle_deadline);
                out.generation = u.generation;
                out.secret_count = u.secret_count;
                out.rollback_protection = u.rollback_protection;
            }
        }
        out
    }
}

/// An unlock request, checked.
pub struct Unlock {
    /// The PIN.
    pub pin: SecretString,
    /// Spend the final PIN try.
    pub allow_final_try: bool,
    /// Session lifetime; `None`: the configured default.
    pub ttl: Option<Duration>,
    /// Idle timeout; `None`: the configured default.
    pub idle: Option<Duration>,
    /// Accept a vault older than the token's record.
    pub accept_older: bool,
}

impl From<v1::UnlockRequest> for Unlock {
    fn from(mut req: v1::UnlockRequest) -> Self {
        Self {
            pin: SecretString::from(std::mem::take(&mut req.pin)),
            allow_final_try: req.allow_final_pin_try,
            ttl: ttl(req.ttl_seconds),
            idle: ttl(req.idle_timeout_seconds),
            accept_older: req.accept_older_vault,
        }
    }
}

/// An X.509 issuance request, checked.
pub struct CertificateOrder {
    /// The issuing CA's name.
    pub ca: String,
    /// The profile (empty means client).
    pub profile: keyholder_pki::Profile,
    /// Requested lifetime; `None`: the profile's default.
    pub ttl: Option<Duration>,
    /// Subject CN.
    pub common_name: String,
    /// Subject O entries.
    pub organizations: Vec<String>,
    /// DNS SANs.
    pub dns_names: Vec<String>,
    /// IP SANs.
    pub ip_addresses: Vec<std::net::IpAddr>,
    /// A CSR, or `None` for a key generated for the caller.
    pub csr_pem: Option<String>,
    /// The algorithm of a generated key.
    pub key_algorithm: keyholder_pki::KeyAlgorithm,
}

impl TryFrom<v1::IssueCertificateRequest> for CertificateOrder {
    type Error = Error;

    fn try_from(req: v1::IssueCertificateRequest) -> Result<Self> {
        let profile = keyholder_pki::Profile::parse(if req.profile.is_empty() {
            "client"
        } else {
            &req.profile
        })?;
        let mut ip_addresses = Vec::with_capacity(req.ip_addresses.len());
        for ip in &req.ip_addresses {
            ip_addresses.push(ip.parse().map_err(|_| Error::InvalidArgument {
                field: "ip_addresses",
                reason: format!("{ip:?} is not an IP address"),
            })?);
        }
        let csr_pem = (!req.csr_pem.is_empty()).then_some(req.csr_pem);
        let key_algorithm = if csr_pem.is_some() {
            keyholder_pki::KeyAlgorithm::EcdsaP256
        } else {
            keyholder_pki::KeyAlgorithm::parse_certificate_key(&req.key_algorithm)?
        };
        Ok(Self {
            ca: req.ca,
            profile,
            ttl: ttl(req.ttl_seconds),
            common_name: req.common_name,
            organizations: req.organizations,
            dns_names: req.dns_names,
            ip_addresses,
            csr_pem,
            key_algorithm,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_means_default_and_caps_name_the_field() {
        assert_eq!(ttl(0), None);
        assert_eq!(ttl_or(0, Duration::from_secs(9)), Duration::from_secs(9));
        assert_eq!(ttl_or(5, Duration::from_secs(9)), Duration::from_secs(5));
        let e =
            check_ttl(Duration::from_secs(61), Duration::from_secs(60), "the CA's").unwrap_err();
        assert!(
            e.to_string()
                .starts_with("ttl_seconds: 1m 1s is over the CA's maximum"),
            "{e}"
        );
        assert_eq!(unix_timestamp(60).map(|t| t.seconds), Some(60));
    }
}
