//! Admin: the tokens the daemon sees, creating the vault on one, and
//! enrolling and revoking the further tokens that open it (docs/team.md).

use std::path::{Path, PathBuf};

use keyholder_proto::v1;
use keyholder_token::{
    Backend, KeyPurpose, Module, ObjectSelector, PivGeneration, Selector, YubiKeyBackend,
};
use keyholder_vault::{TokenAgreement, TokenRecipient};
use secrecy::{ExposeSecret, SecretString};

use crate::access::Details;
use crate::config::TokenBackend;
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
    let adopt = adopted(&uri)?;
    let native = core.config.token_backend == crate::config::TokenBackend::Yubikey;
    let vault_key = new_vault_key(
        adopt,
        KeyRequest {
            piv_slot: &req.piv_slot,
            management_key: SecretString::from(std::mem::take(&mut req.management_key)),
            pin_policy: &req.pin_policy,
            touch_policy: &req.touch_policy,
            protect_management_key: req.protect_management_key,
            allow_default_management_key: req.allow_default_management_key,
        },
        native,
    )?;
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

/// The parts of a request that say how the vault key is made.
struct KeyRequest<'a> {
    piv_slot: &'a str,
    management_key: SecretString,
    pin_policy: &'a str,
    touch_policy: &'a str,
    protect_management_key: bool,
    allow_default_management_key: bool,
}

/// The key a URI names (object= or id=), to adopt instead of generating.
fn adopted(uri: &str) -> Result<Option<ObjectSelector>> {
    if uri.is_empty() {
        return Ok(None);
    }
    let object = ObjectSelector::from_uri(uri).map_err(|e| Error::InvalidArgument {
        field: "token.uri",
        reason: e.to_string(),
    })?;
    Ok((object.label.is_some() || object.id.is_some()).then_some(object))
}

/// How the vault key is made, as Init and EnrolToken ask: generated,
/// adopted, or generated in a PIV slot with its policies. `native` is the
/// YubiKey backend, which reads a PIN-protected management key itself.
fn new_vault_key(
    adopt: Option<ObjectSelector>,
    req: KeyRequest<'_>,
    native: bool,
) -> Result<NewVaultKey> {
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
    Ok(match (adopt, req.piv_slot) {
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
            if req.management_key.expose_secret().is_empty()
                && (!native || req.protect_management_key)
            {
                return Err(Error::InvalidArgument {
                    field: "management_key",
                    reason: "generating in a PIV slot needs the card's management key".into(),
                });
            }
            NewVaultKey::PivSlot {
                slot,
                management_key: req.management_key,
                allow_default_management_key: req.allow_default_management_key,
                generation,
            }
        }
    })
}

/// An entry of the vault's token list, for the API.
fn enrolled(t: &TokenRecipient, current: &str) -> v1::EnrolledToken {
    v1::EnrolledToken {
        label: t.label.clone(),
        serial: t.serial.clone(),
        backend: t.backend.clone(),
        module: t.module.clone(),
        recipient: t.recipient.clone(),
        key_id: t.key_id.clone(),
        vault_key: t.piv.as_ref().map(crate::services::convert::piv_key_info),
        enrolled_at: t.enrolled_at.clone(),
        last_used: t.last_used.clone(),
        rollback_record: t.rollback_record,
        current: t.recipient == current,
    }
}

/// Admin.ListEnrolledTokens.
pub fn list_enrolled(core: &Core) -> Result<v1::ListEnrolledTokensResponse> {
    core.with_unlocked(|u| {
        let current = u.vault.token_recipient();
        Ok(v1::ListEnrolledTokensResponse {
            tokens: u
                .vault
                .body
                .recipients
                .tokens
                .iter()
                .map(|t| enrolled(t, current))
                .collect(),
        })
    })
}

/// A backend loaded for one enrolment (`None`: the daemon's own), its kind
/// and the module's path as recorded.
type EnrolBackend = (Option<Box<dyn Backend>>, TokenBackend, String);

/// Where the token to enrol is reached: the daemon's own backend, or one
/// loaded for this request (another PKCS#11 module, or YubiKeys natively).
fn enrol_backend(core: &Core, req: &v1::EnrolTokenRequest) -> Result<EnrolBackend> {
    let own = core.config.token_backend;
    let wanted = match req.token_backend.as_str() {
        "" => own,
        b => b.parse().map_err(|reason| Error::InvalidArgument {
            field: "token_backend",
            reason,
        })?,
    };
    match wanted {
        TokenBackend::Yubikey if own == TokenBackend::Yubikey => Ok((None, wanted, String::new())),
        TokenBackend::Yubikey => Ok((Some(Box::new(YubiKeyBackend::new())), wanted, String::new())),
        TokenBackend::Pkcs11 => {
            let configured = core.config.pkcs11_module.as_deref();
            let module = if req.pkcs11_module.is_empty() {
                configured
                    .map(Path::to_path_buf)
                    .ok_or(Error::InvalidArgument {
                        field: "pkcs11_module",
                        reason: "keyholderd runs without a PKCS#11 module: name the token's module"
                            .into(),
                    })?
            } else {
                PathBuf::from(&req.pkcs11_module)
            };
            let same_file = |a: &Path, b: &Path| match (a.canonicalize(), b.canonicalize()) {
                (Ok(a), Ok(b)) => a == b,
                _ => a == b,
            };
            let init_args = Some(req.pkcs11_init_args.as_str()).filter(|a| !a.is_empty());
            let is_own = own == TokenBackend::Pkcs11
                && configured.is_some_and(|c| same_file(c, &module))
                && (init_args.is_none() || init_args == core.config.pkcs11_init_args.as_deref());
            let name = module.display().to_string();
            if is_own {
                return Ok((None, wanted, name));
            }
            // Only a module the configuration names is ever loaded.
            if !core
                .config
                .enrol_modules
                .iter()
                .any(|m| same_file(m, &module))
            {
                return Err(Error::PermissionDenied(format!(
                    "keyholderd loads only the PKCS#11 modules its configuration names: add \
                     {name:?} to enrol_modules in keyholderd's config file (docs/team.md)"
                )));
            }
            let loaded = crate::core::token_call(|| Module::load_with_args(&module, init_args))?;
            Ok((Some(Box::new(loaded)), wanted, name))
        }
    }
}

/// What enrolment made on the new token, with its session still open for
/// the rollback record.
struct NewToken {
    session: Box<dyn keyholder_token::Session>,
    entry: TokenRecipient,
    mac_key: keyholder_vault::TeamKey,
}

/// Admin.EnrolToken: the PIN again, then the token's key (generated or
/// adopted), its attestation for a PIV key, its MAC key; the vault written
/// with the new recipient, then the token's rollback record.
pub async fn enrol(
    core: &Core,
    mut req: v1::EnrolTokenRequest,
) -> Result<(v1::EnrolTokenResponse, Details)> {
    core.step_up(&SecretString::from(std::mem::take(&mut req.pin)))?;
    let mut enrollment = Enrollment {
        allow_imported_key: req.allow_imported_key,
        attestation_roots_pem: std::mem::take(&mut req.attestation_roots_pem),
    };
    if let Some(path) = &core.config.attestation_roots {
        let pem = std::fs::read_to_string(path).map_err(|e| Error::InvalidArgument {
            field: "attestation_roots",
            reason: format!("keyholderd's attestation_roots {}: {e}", path.display()),
        })?;
        enrollment.attestation_roots_pem.push('\n');
        enrollment.attestation_roots_pem.push_str(&pem);
    }
    let roots = enrollment.roots()?;
    let (loaded, backend_kind, module) = enrol_backend(core, &req)?;
    let backend: &dyn Backend = match &loaded {
        Some(b) => b.as_ref(),
        None => core.backend(),
    };
    let uri = req
        .token
        .as_ref()
        .map(|t| t.uri.clone())
        .unwrap_or_default();
    let how = new_vault_key(
        adopted(&uri)?,
        KeyRequest {
            piv_slot: &req.piv_slot,
            management_key: SecretString::from(std::mem::take(&mut req.management_key)),
            pin_policy: &req.pin_policy,
            touch_policy: &req.touch_policy,
            protect_management_key: req.protect_management_key,
            allow_default_management_key: req.allow_default_management_key,
        },
        backend_kind == TokenBackend::Yubikey,
    )?;
    let sel = selector(req.token.take())?;
    let token_pin = SecretString::from(std::mem::take(&mut req.token_pin));
    let enrolled_recipients: Vec<String> = core.with_body(|b| {
        Ok(b.recipients
            .tokens
            .iter()
            .map(|t| t.recipient.clone())
            .collect())
    })?;
    let vault_id = core.with_unlocked(|u| Ok(u.vault.vault_id().to_owned()))?;
    let made = crate::core::token_call(|| {
        let token = backend.select(&sel)?;
        let mut session = backend.open(&token)?;
        let result = (|| {
            // A token whose key is enrolled already: nothing to add (a
            // second key on it would only be a second way in).
            let held = session.find_p256_keys(None).unwrap_or_default();
            if let Some(k) = held.iter().find(|k| {
                enrolled_recipients.contains(&keyholder_vault::recipient_string(&k.public))
            }) {
                return Err(Error::AlreadyExists {
                    kind: "enrolled token",
                    name: format!(
                        "{} (key {})",
                        token.label,
                        keyholder_vault::recipient_string(&k.public)
                    ),
                });
            }
            session.login(&token_pin, req.allow_final_pin_try)?;
            let rollback_record = match crate::rollback::token_can_record(session.as_ref()) {
                Ok(()) => true,
                Err(e) if req.without_rollback_record => {
                    tracing::warn!(token = ?token.label, error = %crate::escape::Escaped(&e), "token enrolled without a rollback record, as requested");
                    false
                }
                Err(e) => {
                    return Err(Error::NotEnrolled {
                        token: token.label.clone(),
                        reason: format!(
                            "it cannot store Keyholder's rollback record ({e}): a daemon \
                             opening the vault with it would not notice an older copy of the \
                             vault file. To enrol it anyway, pass --without-rollback-record"
                        ),
                    });
                }
            };
            let key = match &how {
                NewVaultKey::Adopt(object) => session.find_p256_derive_key(object)?,
                NewVaultKey::Generate => session
                    .generate_p256(crate::core::KEY_LABEL, KeyPurpose::Derive)
                    .map_err(|e| crate::core::piv_hint(&token, e, crate::core::PIV_INIT_ADVICE))?,
                NewVaultKey::PivSlot {
                    slot,
                    management_key,
                    allow_default_management_key,
                    generation,
                } => {
                    core.check_management_key(
                        &token,
                        management_key,
                        *allow_default_management_key,
                        generation.protect_management_key,
                    )?;
                    session.generate_p256_in_piv_slot_with(
                        crate::core::KEY_LABEL,
                        KeyPurpose::Derive,
                        *slot,
                        management_key,
                        &token_pin,
                        generation,
                        &|public| {
                            use p256::elliptic_curve::sec1::ToEncodedPoint;
                            let point = public.to_encoded_point(false);
                            keyholder_pki::x509::slot_certificate(
                                point.as_bytes(),
                                crate::core::KEY_LABEL,
                            )
                            .map_err(|e| e.to_string())
                        },
                    )?
                }
            };
            let piv = core.enroll(&token, session.as_ref(), &key, &how, &roots, &enrollment)?;
            let agreement = TokenAgreement {
                session: session.as_ref(),
                key: &key,
            };
            // Not under the session's state lock: the token may wait for
            // a touch.
            let mac_key = keyholder_vault::team_key(&agreement, &vault_id)?;
            let entry = TokenRecipient {
                recipient: keyholder_vault::recipient_string(&key.public),
                label: token.label.clone(),
                serial: token.serial.clone(),
                key_id: keyholder_pki::hex(&key.id),
                piv,
                backend: backend_kind.as_str().to_owned(),
                module: module.clone(),
                enrolled_at: keyholder_vault::document::now_rfc3339(),
                last_used: String::new(),
                rollback_record,
            };
            Ok((entry, mac_key))
        })();
        match result {
            Ok((entry, mac_key)) => Ok(NewToken {
                session,
                entry,
                mac_key,
            }),
            Err(e) => {
                session.close();
                Err(e)
            }
        }
    })?;
    let NewToken {
        session,
        entry,
        mac_key,
    } = made;
    let written = async {
        let team = core.with_unlocked(|u| {
            Ok(u.vault
                .team_keys_with(&u.vault.body, &entry.recipient, mac_key))
        })?;
        let seen = enrolled_recipients.clone();
        let new_entry = entry.clone();
        let ((), generation) = core
            .write(move |body| {
                let now: Vec<&String> = body
                    .recipients
                    .tokens
                    .iter()
                    .map(|t| &t.recipient)
                    .collect();
                if now.len() != seen.len() || now.iter().zip(&seen).any(|(a, b)| *a != b) {
                    return Err(Error::Storage(keyholder_vault::StorageError::Conflict(
                        "the vault's tokens changed during the enrolment: run it again".into(),
                    )));
                }
                body.recipients.tokens.push(new_entry);
                body.team_keys = Some(team);
                Ok(())
            })
            .await?;
        Ok::<_, Error>(generation)
    }
    .await;
    let result = match written {
        Ok(generation) => {
            if entry.rollback_record {
                crate::core::token_call(|| {
                    crate::rollback::record(session.as_ref(), &vault_id, generation)
                });
            }
            Ok(generation)
        }
        Err(e) => Err(e),
    };
    crate::core::token_call(|| session.close());
    drop(loaded);
    let generation = result?;
    tracing::info!(token = ?entry.label, recipient = %entry.recipient, generation, "token enrolled");
    let current = core.with_unlocked(|u| Ok(u.vault.token_recipient().to_owned()))?;
    let details = vec![
        ("token", entry.label.clone()),
        ("serial", entry.serial.clone()),
        ("backend", entry.backend.clone()),
        ("recipient", entry.recipient.clone()),
        ("generation", generation.to_string()),
    ];
    Ok((
        v1::EnrolTokenResponse {
            token: Some(enrolled(&entry, &current)),
            generation,
        },
        details,
    ))
}

/// Whether `what` names `t`: its label, serial, recipient or key id.
fn names(t: &TokenRecipient, what: &str) -> bool {
    t.label == what || t.serial == what || t.recipient == what || t.key_id == what
}

/// Admin.RevokeToken: the PIN again, then the vault written without the
/// token (under a fresh file key, as every write is).
pub async fn revoke(
    core: &Core,
    mut req: v1::RevokeTokenRequest,
) -> Result<(v1::RevokeTokenResponse, Details)> {
    core.step_up(&SecretString::from(std::mem::take(&mut req.pin)))?;
    let what = req.token.trim().to_owned();
    if what.is_empty() {
        return Err(Error::InvalidArgument {
            field: "token",
            reason: "name the token: its label, serial, recipient or key id".into(),
        });
    }
    let ((removed, remaining), generation) = core
        .write(|body| {
            let matching: Vec<usize> = body
                .recipients
                .tokens
                .iter()
                .enumerate()
                .filter(|(_, t)| names(t, &what))
                .map(|(i, _)| i)
                .collect();
            let index = match matching.as_slice() {
                [] => {
                    return Err(Error::NotFound {
                        kind: "enrolled token",
                        name: what.clone(),
                    });
                }
                [one] => *one,
                _ => {
                    return Err(Error::InvalidArgument {
                        field: "token",
                        reason: format!(
                            "{what:?} names {} enrolled tokens: give its recipient or key id \
                             (keyholder token list)",
                            matching.len()
                        ),
                    });
                }
            };
            if body.recipients.tokens.len() <= 1 {
                return Err(Error::NotEnrolled {
                    token: what.clone(),
                    reason: "it is the only token enrolled in the vault, and a vault without \
                             a token cannot be opened: enrol another token first"
                        .into(),
                });
            }
            let removed = body.recipients.tokens.remove(index);
            if let Some(team) = &mut body.team_keys {
                team.tokens.remove(&removed.recipient);
            }
            Ok((removed, body.recipients.tokens.len()))
        })
        .await?;
    tracing::info!(token = ?removed.label, recipient = %removed.recipient, generation, "token revoked");
    let current = core.with_unlocked(|u| Ok(u.vault.token_recipient().to_owned()))?;
    let details = vec![
        ("token", removed.label.clone()),
        ("serial", removed.serial.clone()),
        ("recipient", removed.recipient.clone()),
        ("generation", generation.to_string()),
    ];
    Ok((
        v1::RevokeTokenResponse {
            token: Some(enrolled(&removed, &current)),
            generation,
            remaining: u32::try_from(remaining).unwrap_or(u32::MAX),
        },
        details,
    ))
}

impl Core {
    /// After an unlock, in a vault with more than one token: records when
    /// this token last opened it (a failure is only logged).
    pub(crate) async fn record_last_used(&self) {
        let team = self
            .with_body(|b| Ok(b.team_keys.is_some()))
            .unwrap_or(false);
        if !team {
            return;
        }
        let Ok(own) = self.with_unlocked(|u| Ok(u.vault.token_recipient().to_owned())) else {
            return;
        };
        let now = keyholder_vault::document::now_rfc3339();
        let written = self
            .write(|body| {
                if let Some(t) = body
                    .recipients
                    .tokens
                    .iter_mut()
                    .find(|t| t.recipient == own)
                {
                    t.last_used = now;
                }
                Ok(())
            })
            .await;
        if let Err(e) = written {
            tracing::warn!(error = %crate::escape::Escaped(&e), "the token's last use was not recorded in the vault");
        }
    }
}
