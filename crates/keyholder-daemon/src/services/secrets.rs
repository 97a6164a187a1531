//! `keyholder.v1.Secrets`: Put, Get, List, Delete, History, Rollback.

use std::sync::Arc;

use keyholder_proto::v1;
use keyholder_vault::SecretEntry;
use keyholder_vault::document::now_rfc3339;
use tonic::{Request, Response, Status};
use zeroize::Zeroizing;

use super::convert::rfc3339_timestamp;
use super::enter;
use crate::access::Access;
use crate::core::Core;
use crate::error::{Error, Result};
use crate::gate::Needs;
use crate::names::{MAX_SECRET_NAME_BYTES, SecretName, lookup};

/// What one attempt of a write saw of a secret: its number, when it was
/// created and last replaced (`None`: absent).
type Seen = Option<(u64, String, String)>;

/// On a write's first attempt, notes what `name` is; on an attempt
/// re-applied after another keyholderd wrote the shared vault first,
/// refuses (ABORTED) if that secret changed meanwhile, so that a
/// rollback, a delete or a forced put never silently undoes the other
/// daemon's write to it. Other secrets' changes do not matter.
fn unchanged_since_first(
    first: &mut Option<Seen>,
    secrets: &std::collections::BTreeMap<String, SecretEntry>,
    name: &str,
) -> Result<()> {
    let now = secrets.get(name).map(|e| {
        (
            e.version(),
            e.created_at().to_owned(),
            e.updated_at().to_owned(),
        )
    });
    match first {
        None => {
            *first = Some(now);
            Ok(())
        }
        Some(was) if *was == now => Ok(()),
        Some(_) => Err(Error::ChangedMeanwhile(format!("secret {name:?}"))),
    }
}

/// The Secrets service.
pub struct SecretsService(pub Arc<Core>);

fn metadata(name: &str, e: &SecretEntry) -> v1::SecretMetadata {
    v1::SecretMetadata {
        name: name.to_owned(),
        size: e.size(),
        created_at: rfc3339_timestamp(e.created_at()),
        updated_at: rfc3339_timestamp(e.updated_at()),
        version: e.version(),
    }
}

/// A Put, checked.
struct Put {
    name: SecretName,
    value: Zeroizing<Vec<u8>>,
    overwrite: bool,
}

impl Put {
    fn parse(req: v1::PutSecretRequest, limit: usize) -> Result<Self> {
        let value = Zeroizing::new(req.value);
        let name = SecretName::parse(req.name)?;
        if value.len() > limit {
            return Err(Error::TooLarge {
                field: "value",
                size: value.len(),
                limit,
            });
        }
        Ok(Self {
            name,
            value,
            overwrite: req.overwrite,
        })
    }
}

#[tonic::async_trait]
impl v1::secrets_server::Secrets for SecretsService {
    async fn put(
        &self,
        request: Request<v1::PutSecretRequest>,
    ) -> Result<Response<v1::PutSecretResponse>, Status> {
        const OP: &str = "Secrets.Put";
        let caller = enter(&self.0, &request, OP, Needs::Unlocked).await?;
        let put = Put::parse(request.into_inner(), self.0.config.max_secret_bytes)?;
        let max_secrets = self.0.config.max_secrets;
        let keep = self.0.config.secret_history;
        let name = put.name.as_str();
        let access = Access::SecretWrite {
            name: name.to_owned(),
        };
        let ticket = self.0.authorize(&caller, OP, access).await?;
        let mut first = None;
        let written = self
            .0
            .write_retrying(|body| {
                if put.overwrite {
                    unchanged_since_first(&mut first, &body.secrets, name)?;
                }
                let now = now_rfc3339();
                let mut entry = SecretEntry::new(&put.value, &now);
                match body.secrets.get(name) {
                    Some(_) if !put.overwrite => {
                        return Err(Error::AlreadyExists {
                            kind: "secret",
                            name: name.to_owned(),
                        });
                    }
                    Some(old) => entry = SecretEntry::superseding(old, &put.value, &now, keep),
                    None if body.secrets.len() >= max_secrets => {
                        return Err(Error::LimitReached(format!(
                            "the vault holds {max_secrets} secrets, the configured maximum"
                        )));
                    }
                    None => {}
                }
                let meta = metadata(name, &entry);
                body.secrets.insert(name.to_owned(), entry);
                Ok(meta)
            })
            .await
            .map(|(meta, generation)| {
                tracing::info!(name = ?meta.name, generation, "secret stored");
                let details = vec![
                    ("size", meta.size.to_string()),
                    ("generation", generation.to_string()),
                ];
                let response = v1::PutSecretResponse {
                    metadata: Some(meta),
                    generation,
                };
                (response, details)
            });
        Ok(Response::new(ticket.finish(written).await?))
    }

    async fn get(
        &self,
        request: Request<v1::GetSecretRequest>,
    ) -> Result<Response<v1::GetSecretResponse>, Status> {
        const OP: &str = "Secrets.Get";
        let caller = enter(&self.0, &request, OP, Needs::Unlocked).await?;
        let request = request.into_inner();
        let version = request.version;
        let name = SecretName::parse(request.name)?;
        let access = Access::SecretRead {
            name: name.as_str().to_owned(),
        };
        let ticket = self.0.authorize(&caller, OP, access).await?;
        let response = self.0.with_body(|body| {
            let entry = lookup(&body.secrets, "secret", name.as_str())?;
            if version != 0 && version != entry.version() {
                let old = old_value(entry, name.as_str(), version, self.0.config.secret_history)?;
                let value = old.value().ok_or_else(|| damaged(name.as_str()))?;
                let mut meta = metadata(name.as_str(), entry);
                meta.size = old.size;
                meta.updated_at = rfc3339_timestamp(&old.stored_at);
                meta.version = old.version;
                return Ok(v1::GetSecretResponse {
                    value: value.to_vec(),
                    metadata: Some(meta),
                });
            }
            let value = entry.value().ok_or_else(|| {
                Error::Vault(keyholder_vault::VaultError::Damaged(format!(
                    "secret {:?} has a value that is not valid base64",
                    name.as_str()
                )))
            })?;
            Ok(v1::GetSecretResponse {
                // The response buffer is handed to the transport, which does
                // not zeroize; the vault's own copy stays wiped on lock.
                value: value.to_vec(),
                metadata: Some(metadata(name.as_str(), entry)),
            })
        });
        let response = response.map(|r| {
            let size = r.value.len().to_string();
            let mut details = vec![("size", size)];
            if version != 0 {
                details.push(("version", version.to_string()));
            }
            (r, details)
        });
        Ok(Response::new(ticket.finish(response).await?))
    }

    async fn list(
        &self,
        request: Request<v1::ListSecretsRequest>,
    ) -> Result<Response<v1::ListSecretsResponse>, Status> {
        const OP: &str = "Secrets.List";
        let caller = enter(&self.0, &request, OP, Needs::Unlocked).await?;
        let prefix = request.into_inner().prefix;
        if prefix.len() > MAX_SECRET_NAME_BYTES {
            return Err(Error::TooLarge {
                field: "prefix",
                size: prefix.len(),
                limit: MAX_SECRET_NAME_BYTES,
            }
            .into());
        }
        let access = Access::List {
            what: "secrets",
            prefix: prefix.clone(),
        };
        let ticket = self.0.authorize(&caller, OP, access).await?;
        let secrets = self.0.with_body(|body| {
            let secrets: Vec<_> = body
                .secrets
                .range(prefix.clone()..)
                .take_while(|(name, _)| name.starts_with(&prefix))
                .map(|(name, e)| metadata(name, e))
                .collect();
            let count = secrets.len().to_string();
            Ok((v1::ListSecretsResponse { secrets }, vec![("count", count)]))
        });
        Ok(Response::new(ticket.finish(secrets).await?))
    }

    async fn delete(
        &self,
        request: Request<v1::DeleteSecretRequest>,
    ) -> Result<Response<v1::DeleteSecretResponse>, Status> {
        const OP: &str = "Secrets.Delete";
        let caller = enter(&self.0, &request, OP, Needs::Unlocked).await?;
        let name = SecretName::parse(request.into_inner().name)?;
        let access = Access::SecretWrite {
            name: name.as_str().to_owned(),
        };
        let ticket = self.0.authorize(&caller, OP, access).await?;
        let mut first = None;
        let deleted = self
            .0
            .write_retrying(|body| {
                unchanged_since_first(&mut first, &body.secrets, name.as_str())?;
                let history = lookup(&body.secrets, "secret", name.as_str())?
                    .history()
                    .len();
                body.secrets.remove(name.as_str());
                Ok(u32::try_from(history).unwrap_or(u32::MAX))
            })
            .await
            .map(|(history_removed, generation)| {
                tracing::info!(name = ?name, generation, history_removed, "secret deleted");
                (
                    v1::DeleteSecretResponse {
                        generation,
                        history_removed,
                    },
                    vec![
                        ("generation", generation.to_string()),
                        ("history_removed", history_removed.to_string()),
                    ],
                )
            });
        Ok(Response::new(ticket.finish(deleted).await?))
    }

    async fn history(
        &self,
        request: Request<v1::SecretHistoryRequest>,
    ) -> Result<Response<v1::SecretHistoryResponse>, Status> {
        const OP: &str = "Secrets.History";
        let caller = enter(&self.0, &request, OP, Needs::Unlocked).await?;
        let name = SecretName::parse(request.into_inner().name)?;
        let access = Access::SecretRead {
            name: name.as_str().to_owned(),
        };
        let ticket = self.0.authorize(&caller, OP, access).await?;
        let response = self.0.with_body(|body| {
            let entry = lookup(&body.secrets, "secret", name.as_str())?;
            let mut versions = vec![v1::SecretVersion {
                version: entry.version(),
                size: entry.size(),
                stored_at: rfc3339_timestamp(entry.updated_at()),
                replaced_at: None,
                current: true,
            }];
            let keep = self.0.config.secret_history;
            versions.extend(
                entry
                    .history()
                    .iter()
                    .take(keep)
                    .map(|o| v1::SecretVersion {
                        version: o.version,
                        size: o.size,
                        stored_at: rfc3339_timestamp(&o.stored_at),
                        replaced_at: rfc3339_timestamp(&o.replaced_at),
                        current: false,
                    }),
            );
            let count = versions.len().to_string();
            Ok((
                v1::SecretHistoryResponse { versions },
                vec![("versions", count)],
            ))
        });
        Ok(Response::new(ticket.finish(response).await?))
    }

    async fn rollback(
        &self,
        request: Request<v1::RollbackSecretRequest>,
    ) -> Result<Response<v1::RollbackSecretResponse>, Status> {
        const OP: &str = "Secrets.Rollback";
        let caller = enter(&self.0, &request, OP, Needs::Unlocked).await?;
        let request = request.into_inner();
        let to = request.to;
        let name = SecretName::parse(request.name)?;
        if to == 0 {
            return Err(Error::InvalidArgument {
                field: "to",
                reason: "name an earlier version (see `keyholder secret history`)".into(),
            }
            .into());
        }
        let access = Access::SecretWrite {
            name: name.as_str().to_owned(),
        };
        let ticket = self.0.authorize(&caller, OP, access).await?;
        let keep = self.0.config.secret_history;
        let mut first = None;
        let written = self
            .0
            .write_retrying(|body| {
                unchanged_since_first(&mut first, &body.secrets, name.as_str())?;
                let entry = lookup(&body.secrets, "secret", name.as_str())?;
                if to == entry.version() {
                    return Err(Error::InvalidArgument {
                        field: "to",
                        reason: format!("version {to} is the current value already"),
                    });
                }
                let old = old_value(entry, name.as_str(), to, keep)?;
                let value = old.value().ok_or_else(|| damaged(name.as_str()))?;
                let now = now_rfc3339();
                let rolled = SecretEntry::superseding(entry, &value, &now, keep);
                let meta = metadata(name.as_str(), &rolled);
                body.secrets.insert(name.as_str().to_owned(), rolled);
                Ok(meta)
            })
            .await
            .map(|(meta, generation)| {
                tracing::info!(name = ?meta.name, to, version = meta.version, generation, "secret rolled back");
                let details = vec![
                    ("to", to.to_string()),
                    ("version", meta.version.to_string()),
                    ("generation", generation.to_string()),
                ];
                let response = v1::RollbackSecretResponse {
                    metadata: Some(meta),
                    generation,
                };
                (response, details)
            });
        Ok(Response::new(ticket.finish(written).await?))
    }
}

/// Version `version` among the `keep` most recent of `entry`'s earlier
/// values (values kept under a larger `secret_history` than today's are
/// not served; they go at the secret's next write).
fn old_value<'a>(
    entry: &'a SecretEntry,
    name: &str,
    version: u64,
    keep: usize,
) -> Result<&'a keyholder_vault::OldValue> {
    entry
        .history()
        .iter()
        .take(keep)
        .find(|o| o.version == version)
        .ok_or_else(|| Error::NotFound {
            kind: "secret version",
            name: format!("{name} version {version} (see `keyholder secret history {name}`)"),
        })
}

/// A stored value that does not decode: a hand-edited vault.
fn damaged(name: &str) -> Error {
    Error::Vault(keyholder_vault::VaultError::Damaged(format!(
        "secret {name:?} has a value that is not valid base64"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reapplied_write_refuses_a_secret_another_daemon_changed_meanwhile() {
        let mut secrets = std::collections::BTreeMap::new();
        let v1 = SecretEntry::new(b"one", "2026-01-01T00:00:00Z");
        secrets.insert("db".to_owned(), v1.clone());
        secrets.insert("other".to_owned(), v1.clone());
        let mut first = None;
        unchanged_since_first(&mut first, &secrets, "db").unwrap();
        // Another secret changed: re-applying is fine.
        let other = SecretEntry::superseding(&v1, b"two", "2026-01-01T00:00:01Z", 5);
        secrets.insert("other".to_owned(), other);
        unchanged_since_first(&mut first, &secrets, "db").unwrap();
        // This one changed: refused, ABORTED.
        let v2 = SecretEntry::superseding(&v1, b"two", "2026-01-01T00:00:02Z", 5);
        secrets.insert("db".to_owned(), v2);
        let e = unchanged_since_first(&mut first, &secrets, "db").unwrap_err();
        assert_eq!(
            e.to_string(),
            "another keyholderd changed secret \"db\" meanwhile; check it and retry"
        );
        assert_eq!(Status::from(e).code(), tonic::Code::Aborted);
        // Deleted and stored anew at the same version number: refused too.
        secrets.insert(
            "db".to_owned(),
            SecretEntry::new(b"three", "2026-01-01T00:00:03Z"),
        );
        assert!(unchanged_since_first(&mut first, &secrets, "db").is_err());
        // Deleted meanwhile: refused.
        secrets.remove("db");
        assert!(unchanged_since_first(&mut first, &secrets, "db").is_err());
    }
}
