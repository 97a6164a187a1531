//! Admin: the tokens the daemon sees, and creating the vault on one.

use keyholder_proto::v1;
use keyholder_token::{ObjectSelector, PivGeneration, Selector};
use secrecy::{ExposeSecret, SecretString};

use crate::core::{Core, Enrollment, NewVaultKey};
use crate::error::{Error, Result};

/// The token a request names: by one of label, serial or URI, or any.
fn selector(s: Option<v1::TokenSelector>) -> Result<Selector> {
    let s = s.unwrap_or_default();
    let set = [&s.label, &s.serial, &s.uri]
        .iter()
        .filter(|v| !v.is_empty())
        .count();
    if set > 1 {
        return Err(Error::InvalidArgument {
            field: "token",
            reason: "give one of label, serial or uri".into(),
        });
    }
    Ok(if !s.uri.is_empty() {
        Selector::from_uri(&s.uri).map_err(|e| Error::InvalidArgument {
            field: "token.uri",
            reason: e.to_string(),
        })?
    } else if !s.serial.is_empty() {
        Selector::serial(s.serial)
    } else if !s.label.is_empty() {
        Selector::label(s.label)
    } else {
        Selector::any()
    })
}

/// Admin.Init.
pub async fn init(core: &Core, mut req: v1::InitRequest) -> Result<v1::InitResponse> {
    // A URI that names a key (object= or id=) adopts that key as the vault
    // key instead of generating one.
    let uri = req
        .token
        .as_ref()
        .map(|t| t.uri.clone())
        .unwrap_or_default();
    let adopt = if uri.is_empty() {
        None
    } else {
        let object = ObjectSelector::from_uri(&uri).map_err(|e| Error::InvalidArgument {
            field: "token.uri",
            reason: e.to_string(),
        })?;
        (object.label.is_some() || object.id.is_some()).then_some(object)
    };
    let management_key = SecretString::from(std::mem::take(&mut req.management_key));
    let generation = PivGeneration {
        pin_policy: req
            .pin_policy
            .parse()
            .map_err(|reason| Error::InvalidArgument {
                field: "pin_policy",
                reason,
            })?,
        touch_policy: req
            .touch_policy
            .parse()
            .map_err(|reason| Error::InvalidArgument {
                field: "touch_policy",
                reason,
            })?,
        protect_management_key: req.protect_management_key,
    };
    let native = core.config.token_backend == crate::config::TokenBackend::Yubikey;
    let vault_key = match (adopt, req.piv_slot.as_str()) {
        (_, "") if !generation.is_plain() => {
            return Err(Error::InvalidArgument {
                field: "piv_slot",
                reason: "PIN and touch policies and --protect-management-key apply to a key \
                         generated in a PIV slot: give the slot"
                    .into(),
            });
        }
        (None, "") => NewVaultKey::Generate,
        (Some(object), "") => NewVaultKey::Adopt(object),
        (Some(_), _) => {
            return Err(Error::InvalidArgument {
                field: "piv_slot",
                reason: "give a slot to generate in, or a URI naming a key to adopt, not both"
                    .into(),
            });
        }
        (None, slot) => {
            let slot = slot.parse().map_err(|reason| Error::InvalidArgument {
                field: "piv_slot",
                reason,
            })?;
            // Natively, no key means the PIN-protected one on the card.
            if management_key.expose_secret().is_empty() && (!native || req.protect_management_key)
            {
                return Err(Error::InvalidArgument {
                    field: "management_key",
                    reason: "generating in a PIV slot needs the card's management key".into(),
                });
            }
            NewVaultKey::PivSlot {
                slot,
                management_key,
                allow_default_management_key: req.allow_default_management_key,
                generation,
            }
        }
    };
    let selector = selector(req.token.take())?;
    let pin = SecretString::from(std::mem::take(&mut req.pin));
    let recovery: Vec<String> = Some(req.recovery_recipient)
        .filter(|r| !r.is_empty())
        .into_iter()
        .collect();
    let enrollment = Enrollment {
        allow_imported_key: req.allow_imported_key,
        attestation_roots_pem: std::mem::take(&mut req.attestation_roots_pem),
    };
    Ok(core
        .init_with(
            selector,
            pin,
            req.allow_final_pin_try,
            recovery,
            req.without_rollback_protection,
            vault_key,
            enrollment,
        )
        .await?
        .into())
}

/// Admin.ListTokens.
pub fn list(core: &Core) -> Result<v1::ListTokensResponse> {
    let tokens = core.list_tokens()?.iter().map(Into::into).collect();
    Ok(v1::ListTokensResponse { tokens })
}
