//! Admin: certificate authorities, X.509 and SSH, with keys in the vault or
//! on the token.

use std::time::Duration;

use keyholder_pki::KeyAlgorithm;
use keyholder_pki::hex;
use keyholder_pki::keys::SoftKey;
use keyholder_proto::v1;
use keyholder_token::KeyPurpose;
use keyholder_vault::document::now_rfc3339;
use keyholder_vault::{CaEntry, CaKey, CaKind};

use super::keys::new_key;
use crate::core::Core;
use crate::error::{Error, Result};
use crate::names::{ObjectName, lookup};
use crate::services::convert::{timestamp, ttl_or};
use crate::signers::{Signer, off_worker, signing_result};

/// Default CA certificate lifetime: 10 years.
const DEFAULT_CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 86400);
/// Default longest certificate a CA issues: 1 year.
const DEFAULT_CA_MAX_TTL: Duration = Duration::from_secs(365 * 86400);

fn ca_info(name: &str, entry: &CaEntry) -> Result<v1::CaInfo> {
    if entry.kind == CaKind::Ssh {
        let public = entry.public_openssh.clone().unwrap_or_default();
        let fingerprint = ssh_key::PublicKey::from_openssh(&public)
            .map(|p| p.fingerprint(Default::default()).to_string())
            .unwrap_or_default();
        return Ok(v1::CaInfo {
            name: name.to_owned(),
            kind: entry.kind.as_str().to_owned(),
            fingerprint_sha256: fingerprint,
            on_token: matches!(entry.key, CaKey::Token { .. }),
            max_ttl_seconds: entry.max_ttl_seconds,
            public_key_openssh: public,
            ..Default::default()
        });
    }
    let info = keyholder_pki::certificate_info(&entry.certificate_pem)?;
    Ok(v1::CaInfo {
        name: name.to_owned(),
        certificate_pem: entry.certificate_pem.clone(),
        subject: info.subject,
        fingerprint_sha256: info.fingerprint_sha256,
        not_before: timestamp(info.not_before),
        not_after: timestamp(info.not_after),
        on_token: matches!(entry.key, CaKey::Token { .. }),
        max_ttl_seconds: entry.max_ttl_seconds,
        kind: entry.kind.as_str().to_owned(),
        public_key_openssh: String::new(),
    })
}

/// Stores a new CA unless the name is taken.
async fn store(core: &Core, name: &ObjectName, entry: CaEntry) -> Result<v1::CaInfo> {
    let info = ca_info(name.as_str(), &entry)?;
    core.write(|body| {
        if body.cas.contains_key(name.as_str()) {
            return Err(Error::AlreadyExists {
                kind: "CA",
                name: name.to_string(),
            });
        }
        body.cas.insert(name.to_string(), entry);
        Ok(())
    })
    .await?;
    tracing::info!(ca = name.as_str(), on_token = info.on_token, fingerprint = %info.fingerprint_sha256, "CA stored");
    Ok(info)
}

fn max_ttl_seconds(requested: u64) -> u64 {
    ttl_or(requested, DEFAULT_CA_MAX_TTL).as_secs()
}

/// Admin.CreateCa.
pub async fn create(core: &Core, req: v1::CreateCaRequest) -> Result<v1::CaInfo> {
    let name = ObjectName::parse("name", req.name)?;
    if core.with_body(|body| Ok(body.cas.contains_key(name.as_str())))? {
        return Err(Error::AlreadyExists {
            kind: "CA",
            name: name.to_string(),
        });
    }
    if !req.pkcs11_uri.is_empty() && (!req.on_token || req.kind == "ssh") {
        return Err(Error::InvalidArgument {
            field: "pkcs11_uri",
            reason: "adopting a token key is for X.509 CAs on the token (on_token)".into(),
        });
    }
    match req.kind.as_str() {
        "" | "x509" => {}
        "ssh" => {
            let alg = match req.key_algorithm.as_str() {
                "" | "ed25519" if !req.on_token => KeyAlgorithm::Ed25519,
                "" | "p256" | "ecdsa-p256" => KeyAlgorithm::EcdsaP256,
                other => {
                    return Err(Error::InvalidArgument {
                        field: "key_algorithm",
                        reason: format!(
                            "{other:?}: SSH CAs are ed25519 or ecdsa-p256 (on the token: ecdsa-p256)"
                        ),
                    });
                }
            };
            let (key, openssh) = new_key(core, &name, alg, req.on_token, "keyholder-ca").await?;
            let entry = CaEntry {
                kind: CaKind::Ssh,
                certificate_pem: String::new(),
                key,
                max_ttl_seconds: max_ttl_seconds(req.max_ttl_seconds),
                created_at: now_rfc3339(),
                public_openssh: Some(openssh),
            };
            return store(core, &name, entry).await;
        }
        other => {
            return Err(Error::InvalidArgument {
                field: "kind",
                reason: format!("{other:?} is not x509 or ssh"),
            });
        }
    }
    let alg = KeyAlgorithm::parse_certificate_key(&req.key_algorithm)?;
    let validity = ttl_or(req.validity_seconds, DEFAULT_CA_VALIDITY);
    let cn = if req.common_name.is_empty() {
        name.to_string()
    } else {
        req.common_name.clone()
    };
    let (signer, key) = if req.on_token {
        if alg != KeyAlgorithm::EcdsaP256 {
            return Err(Error::InvalidArgument {
                field: "key_algorithm",
                reason: "keys on the token are P-256".into(),
            });
        }
        let (key, label) = if req.pkcs11_uri.is_empty() {
            let label = format!("keyholder-ca:{name}");
            let key = core.with_token(|session| {
                session
                    .generate_p256(&label, KeyPurpose::Sign)
                    .map_err(|e| {
                        crate::core::piv_hint(session.token(), e, crate::core::PIV_KEY_ADVICE)
                    })
            })?;
            (key, label)
        } else {
            super::keys::adopt_signing_key(core, &req.pkcs11_uri)?
        };
        let stored = CaKey::Token {
            key_id: hex(&key.id),
            label,
        };
        (Signer::token(core.token_slot_handle(), key)?, stored)
    } else {
        let key = off_worker(alg.is_rsa(), move || SoftKey::generate(alg)).await??;
        let stored = CaKey::Vault {
            private_key_pem: key.pkcs8_pem()?,
        };
        (Signer::memory(key), stored)
    };
    let certificate_pem = off_worker(signer.slow(), move || {
        signing_result(|| keyholder_pki::create_ca_certificate(&cn, &signer, validity))
    })
    .await??;
    let entry = CaEntry {
        kind: CaKind::X509,
        certificate_pem,
        key,
        max_ttl_seconds: max_ttl_seconds(req.max_ttl_seconds),
        created_at: now_rfc3339(),
        public_openssh: None,
    };
    store(core, &name, entry).await
}

/// Admin.ImportCa: an X.509 CA certificate and its private key.
pub async fn import(core: &Core, req: v1::ImportCaRequest) -> Result<v1::CaInfo> {
    let name = ObjectName::parse("name", req.name)?;
    let given = zeroize::Zeroizing::new(req.private_key_pem);
    keyholder_pki::import_ca(&req.certificate_pem, &given)?;
    // Stored as PKCS#8, whichever PEM form it came in.
    let key_pem = keyholder_pki::keys::private_key_pkcs8_pem(&given)?;
    // Refused now rather than at the first issuance.
    SoftKey::from_pkcs8_pem(&key_pem)?;
    let entry = CaEntry {
        kind: CaKind::X509,
        certificate_pem: req.certificate_pem,
        key: CaKey::Vault {
            private_key_pem: key_pem,
        },
        max_ttl_seconds: max_ttl_seconds(req.max_ttl_seconds),
        created_at: now_rfc3339(),
        public_openssh: None,
    };
    store(core, &name, entry).await
}

/// Admin.ListCas.
pub fn list(core: &Core) -> Result<v1::ListCasResponse> {
    let cas = core.with_body(|body| {
        body.cas
            .iter()
            .map(|(n, e)| ca_info(n, e))
            .collect::<Result<Vec<_>>>()
    })?;
    Ok(v1::ListCasResponse { cas })
}

/// Admin.GetCa.
pub fn get(core: &Core, name: &str) -> Result<v1::CaInfo> {
    core.with_body(|body| ca_info(name, lookup(&body.cas, "CA", name)?))
}
