//! Admin: signing keys. Generated in memory or on the token, imported from
//! a file or adopted from the token by URI, deleted.

use keyholder_pki::KeyAlgorithm;
use keyholder_pki::hex;
use keyholder_pki::keys::SoftKey;
use keyholder_proto::v1;
use keyholder_token::KeyPurpose;
use keyholder_vault::document::now_rfc3339;
use keyholder_vault::{CaKey, KeyEntry, KeyUsage};
use p256::elliptic_curve::sec1::ToEncodedPoint;

use crate::core::Core;
use crate::error::{Error, Result};
use crate::names::{ObjectName, lookup};
use crate::services::signer::key_info;
use crate::signers::off_worker;

/// Validates key usages; empty means `["sign"]`.
fn usages(requested: Vec<String>) -> Result<Vec<KeyUsage>> {
    if requested.is_empty() {
        return Ok(vec![KeyUsage::Sign]);
    }
    let mut out = Vec::new();
    for name in requested {
        let u = KeyUsage::parse(&name).ok_or_else(|| Error::InvalidArgument {
            field: "usages",
            reason: format!("{name:?} is not one of ssh, sign, ca"),
        })?;
        if !out.contains(&u) {
            out.push(u);
        }
    }
    Ok(out)
}

/// The OpenSSH line of a P-256 key made on the token.
fn token_openssh(public: &p256::PublicKey, name: &str) -> Result<String> {
    let data = ssh_key::public::KeyData::Ecdsa(ssh_key::public::EcdsaPublicKey::NistP256(
        public.to_encoded_point(false),
    ));
    Ok(keyholder_pki::keys::openssh_public(&data, name)?)
}

/// The P-256 signing key on the session's token that `uri` names, made by
/// another tool, and the label to store with it.
pub(super) fn adopt_signing_key(
    core: &Core,
    uri: &str,
) -> Result<(keyholder_token::TokenKey, String)> {
    let object =
        keyholder_token::ObjectSelector::from_uri(uri).map_err(|e| Error::InvalidArgument {
            field: "pkcs11_uri",
            reason: e.to_string(),
        })?;
    let selector = keyholder_token::Selector::from_uri(uri)?;
    let key = core.with_token(|session| {
        if !selector.matches(session.token()) {
            return Err(Error::InvalidArgument {
                field: "pkcs11_uri",
                reason: format!(
                    "names {selector}, but the session runs on token {:?}",
                    session.token().label
                ),
            });
        }
        session.find_p256_signing_key(&object).map_err(|e| match e {
            // ykcs11's view of the card; the native backend reads the card
            // on every call.
            keyholder_token::Error::KeyNotFound(m)
                if crate::core::is_piv(session.token())
                    && core.config.token_backend == crate::config::TokenBackend::Pkcs11 =>
            {
                keyholder_token::Error::KeyNotFound(format!(
                    "{m}. A PIV card's module shows a slot's key only when the slot holds a \
                     certificate, and reads the card when the session opens: a key made since \
                     is seen after `keyholder lock` and `keyholder unlock`"
                ))
                .into()
            }
            e => e.into(),
        })
    })?;
    Ok((key, object.label.unwrap_or_default()))
}

/// A new key: on the token (P-256, sign only) or in memory. Returns the
/// stored form and the OpenSSH public key line.
pub(super) async fn new_key(
    core: &Core,
    name: &ObjectName,
    alg: KeyAlgorithm,
    on_token: bool,
    label_prefix: &str,
) -> Result<(CaKey, String)> {
    if on_token {
        if alg != KeyAlgorithm::EcdsaP256 {
            return Err(Error::InvalidArgument {
                field: "type",
                reason: "keys on the token are ecdsa-p256".into(),
            });
        }
        let label = format!("{label_prefix}:{name}");
        let key = core.with_token(|session| {
            session
                .generate_p256(&label, KeyPurpose::Sign)
                .map_err(|e| crate::core::piv_hint(session.token(), e, crate::core::PIV_KEY_ADVICE))
        })?;
        let openssh = token_openssh(&key.public, name.as_str())?;
        return Ok((
            CaKey::Token {
                key_id: hex(&key.id),
                label,
            },
            openssh,
        ));
    }
    let key = off_worker(alg.is_rsa(), move || SoftKey::generate(alg)).await??;
    stored(&key, name.as_str())
}

fn stored(key: &SoftKey, name: &str) -> Result<(CaKey, String)> {
    let openssh = keyholder_pki::keys::openssh_public(key.ssh_public(), name)?;
    Ok((
        CaKey::Vault {
            private_key_pem: key.pkcs8_pem()?,
        },
        openssh,
    ))
}

async fn store(core: &Core, name: &ObjectName, entry: KeyEntry) -> Result<v1::KeyInfo> {
    let info = key_info(name.as_str(), &entry);
    core.write(|body| {
        if body.keys.contains_key(name.as_str()) {
            return Err(Error::AlreadyExists {
                kind: "key",
                name: name.to_string(),
            });
        }
        body.keys.insert(name.to_string(), entry);
        Ok(())
    })
    .await?;
    tracing::info!(key = name.as_str(), r#type = info.r#type, on_token = info.on_token, fingerprint = %info.fingerprint, "key stored");
    Ok(info)
}

/// Admin.GenerateKey.
pub async fn generate(core: &Core, req: v1::GenerateKeyRequest) -> Result<v1::KeyInfo> {
    let name = ObjectName::parse("name", req.name)?;
    let alg = KeyAlgorithm::parse_signing_key(&req.r#type)?;
    let usages = usages(req.usages)?;
    if core.with_body(|body| Ok(body.keys.contains_key(name.as_str())))? {
        return Err(Error::AlreadyExists {
            kind: "key",
            name: name.to_string(),
        });
    }
    let (key, public_openssh) = new_key(core, &name, alg, req.on_token, "keyholder-key").await?;
    let entry = KeyEntry {
        key_type: alg,
        usages,
        key,
        public_openssh,
        created_at: now_rfc3339(),
    };
    store(core, &name, entry).await
}

/// Admin.ImportKey: a private key file, or a key on the token by URI.
pub async fn import(core: &Core, req: v1::ImportKeyRequest) -> Result<v1::KeyInfo> {
    let name = ObjectName::parse("name", req.name)?;
    let usages = usages(req.usages)?;
    if !req.pkcs11_uri.is_empty() {
        let (key, label) = adopt_signing_key(core, &req.pkcs11_uri)?;
        let entry = KeyEntry {
            key_type: KeyAlgorithm::EcdsaP256,
            usages,
            key: CaKey::Token {
                key_id: hex(&key.id),
                label,
            },
            public_openssh: token_openssh(&key.public, name.as_str())?,
            created_at: now_rfc3339(),
        };
        return store(core, &name, entry).await;
    }
    let text = zeroize::Zeroizing::new(req.private_key);
    let pass = zeroize::Zeroizing::new(req.passphrase);
    let key = SoftKey::import(&text, (!pass.is_empty()).then_some(pass.as_str()))?;
    let (stored_key, public_openssh) = stored(&key, name.as_str())?;
    let entry = KeyEntry {
        key_type: key.kind(),
        usages,
        key: stored_key,
        public_openssh,
        created_at: now_rfc3339(),
    };
    store(core, &name, entry).await
}

/// Admin.DeleteKey, with the key's SSH certificates.
pub async fn delete(core: &Core, name: String) -> Result<()> {
    core.write(|body| {
        lookup(&body.keys, "key", &name)?;
        body.keys.remove(&name);
        body.ssh_certificates.retain(|c| c.key != name);
        Ok(())
    })
    .await?;
    tracing::info!(key = ?name, "key deleted");
    Ok(())
}
