//! `keyholder.v1.Secrets`: Put, Get, List, Delete.

use std::sync::Arc;

use keyholder_proto::v1;
use keyholder_vault::SecretEntry;
use keyholder_vault::document::now_rfc3339;
use tonic::{Request, Response, Status};

use crate::core::Core;
use crate::error::{Error, Result};
use crate::gate::Needs;

/// Longest secret name, in bytes.
pub const MAX_NAME_BYTES: usize = 256;

/// The Secrets service.
pub struct SecretsService(pub Arc<Core>);

/// Checks a secret name: 1 to 256 bytes of `A-Z a-z 0-9 . _ - + @ = : ,`
/// in segments separated by single `/`, none of them `.` or `..`.
pub fn validate_name(name: &str) -> Result<()> {
    let bad = |reason: String| Error::InvalidArgument {
        field: "name",
        reason,
    };
    if name.is_empty() {
        return Err(bad("must not be empty".into()));
    }
    if name.len() > MAX_NAME_BYTES {
        return Err(bad(format!(
            "is {} bytes; the limit is {MAX_NAME_BYTES}",
            name.len()
        )));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || "._-+@=:,/".contains(*c)))
    {
        return Err(bad(format!(
            "contains {c:?}; allowed are A-Z a-z 0-9 . _ - + @ = : , and / between segments"
        )));
    }
    for segment in name.split('/') {
        match segment {
            "" => {
                return Err(bad(
                    "has an empty segment (leading, trailing or double '/')".into(),
                ));
            }
            "." | ".." => return Err(bad("must not contain '.' or '..' segments".into())),
            _ => {}
        }
    }
    Ok(())
}

fn metadata(name: &str, e: &SecretEntry) -> v1::SecretMetadata {
    let ts = |s: &str| {
        humantime::parse_rfc3339(s)
            .ok()
            .map(prost_types::Timestamp::from)
    };
    v1::SecretMetadata {
        name: name.to_owned(),
        size: e.size,
        created_at: ts(&e.created_at),
        updated_at: ts(&e.updated_at),
    }
}

#[tonic::async_trait]
impl v1::secrets_server::Secrets for SecretsService {
    async fn put(
        &self,
        request: Request<v1::PutSecretRequest>,
    ) -> Result<Response<v1::PutSecretResponse>, Status> {
        self.0.enter(&request, "Secrets.Put", Needs::Unlocked)?;
        let req = request.into_inner();
        validate_name(&req.name)?;
        let limit = self.0.config.max_secret_bytes;
        if req.value.len() > limit {
            return Err(Error::TooLarge {
                field: "value",
                size: req.value.len(),
                limit,
            }
            .into());
        }
        let value = zeroize::Zeroizing::new(req.value);
        let max_secrets = self.0.config.max_secrets;
        let name = req.name;
        let (meta, generation) = self
            .0
            .write(|body| {
                let now = now_rfc3339();
                let mut entry = SecretEntry::new(&value, &now);
                match body.secrets.get(&name) {
                    Some(_) if !req.overwrite => {
                        return Err(Error::AlreadyExists {
                            kind: "secret",
                            name: name.clone(),
                        });
                    }
                    Some(old) => entry.created_at = old.created_at.clone(),
                    None if body.secrets.len() >= max_secrets => {
                        return Err(Error::LimitReached(format!(
                            "the vault holds {max_secrets} secrets, the configured maximum"
                        )));
                    }
                    None => {}
                }
                let meta = metadata(&name, &entry);
                body.secrets.insert(name.clone(), entry);
                Ok(meta)
            })
            .await?;
        tracing::info!(name = %meta.name, generation, "secret stored");
        Ok(Response::new(v1::PutSecretResponse {
            metadata: Some(meta),
            generation,
        }))
    }

    async fn get(
        &self,
        request: Request<v1::GetSecretRequest>,
    ) -> Result<Response<v1::GetSecretResponse>, Status> {
        self.0.enter(&request, "Secrets.Get", Needs::Unlocked)?;
        let name = request.into_inner().name;
        validate_name(&name)?;
        let response = self.0.with_unlocked(|u| {
            let entry = u
                .vault
                .body
                .secrets
                .get(&name)
                .ok_or_else(|| Error::NotFound {
                    kind: "secret",
                    name: name.clone(),
                })?;
            let value = entry.value().ok_or_else(|| {
                Error::Vault(keyholder_vault::VaultError::Damaged(format!(
                    "secret {name:?} has a value that is not valid base64"
                )))
            })?;
            Ok(v1::GetSecretResponse {
                // The response buffer is handed to the transport, which does
                // not zeroize; the vault's own copy stays wiped on lock.
                value: value.to_vec(),
                metadata: Some(metadata(&name, entry)),
            })
        })?;
        Ok(Response::new(response))
    }

    async fn list(
        &self,
        request: Request<v1::ListSecretsRequest>,
    ) -> Result<Response<v1::ListSecretsResponse>, Status> {
        self.0.enter(&request, "Secrets.List", Needs::Unlocked)?;
        let prefix = request.into_inner().prefix;
        if prefix.len() > MAX_NAME_BYTES {
            return Err(Error::TooLarge {
                field: "prefix",
                size: prefix.len(),
                limit: MAX_NAME_BYTES,
            }
            .into());
        }
        let secrets = self.0.with_unlocked(|u| {
            Ok(u.vault
                .body
                .secrets
                .range(prefix.clone()..)
                .take_while(|(name, _)| name.starts_with(&prefix))
                .map(|(name, e)| metadata(name, e))
                .collect())
        })?;
        Ok(Response::new(v1::ListSecretsResponse { secrets }))
    }

    async fn delete(
        &self,
        request: Request<v1::DeleteSecretRequest>,
    ) -> Result<Response<v1::DeleteSecretResponse>, Status> {
        self.0.enter(&request, "Secrets.Delete", Needs::Unlocked)?;
        let name = request.into_inner().name;
        validate_name(&name)?;
        let ((), generation) = self
            .0
            .write(|body| {
                body.secrets
                    .remove(&name)
                    .map(drop)
                    .ok_or_else(|| Error::NotFound {
                        kind: "secret",
                        name: name.clone(),
                    })
            })
            .await?;
        tracing::info!(%name, generation, "secret deleted");
        Ok(Response::new(v1::DeleteSecretResponse { generation }))
    }
}

#[cfg(test)]
mod tests {
    use super::validate_name;

    #[test]
    fn names() {
        for good in ["db/prod/password", "a", "k8s:prod/admin@x", "x.y_z-1"] {
            assert!(validate_name(good).is_ok(), "{good}");
        }
        let long = "a".repeat(257);
        for bad in [
            "",
            "/a",
            "a/",
            "a//b",
            "a/../b",
            "..",
            ".",
            "a b",
            "a\0b",
            "ü",
            long.as_str(),
        ] {
            assert!(validate_name(bad).is_err(), "{bad:?}");
        }
        assert!(validate_name(&"a".repeat(256)).is_ok());
    }
}
