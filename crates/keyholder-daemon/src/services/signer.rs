//! `keyholder.v1.Signer`: ListKeys, GetPublicKey, Sign.

use std::sync::Arc;

use keyholder_pki::keys::SignAlgorithm;
use keyholder_proto::v1;
use keyholder_vault::{CaKey, KeyEntry, KeyUsage};
use tonic::{Request, Response, Status};

use super::convert::rfc3339_timestamp;
use super::enter;
use crate::core::Core;
use crate::error::{Error, Result};
use crate::gate::Needs;
use crate::names::lookup;
use crate::signers::off_worker;

/// The Signer service.
pub struct SignerService(pub Arc<Core>);

/// The API view of a key.
pub fn key_info(name: &str, entry: &KeyEntry) -> v1::KeyInfo {
    let fingerprint = ssh_key::PublicKey::from_openssh(&entry.public_openssh)
        .map(|p| p.fingerprint(Default::default()).to_string())
        .unwrap_or_default();
    v1::KeyInfo {
        name: name.to_owned(),
        r#type: entry.key_type.as_str().to_owned(),
        usages: entry.usages.iter().map(|u| u.as_str().to_owned()).collect(),
        on_token: matches!(entry.key, CaKey::Token { .. }),
        public_key_openssh: entry.public_openssh.clone(),
        fingerprint,
        created_at: rfc3339_timestamp(&entry.created_at),
    }
}

fn entry(core: &Core, name: &str) -> Result<KeyEntry> {
    core.with_body(|body| lookup(&body.keys, "key", name).cloned())
}

#[tonic::async_trait]
impl v1::signer_server::Signer for SignerService {
    async fn list_keys(
        &self,
        request: Request<v1::ListKeysRequest>,
    ) -> Result<Response<v1::ListKeysResponse>, Status> {
        enter(&self.0, &request, "Signer.ListKeys", Needs::Unlocked).await?;
        let keys = self
            .0
            .with_body(|body| Ok(body.keys.iter().map(|(n, e)| key_info(n, e)).collect()))?;
        Ok(Response::new(v1::ListKeysResponse { keys }))
    }

    async fn get_public_key(
        &self,
        request: Request<v1::GetPublicKeyRequest>,
    ) -> Result<Response<v1::GetPublicKeyResponse>, Status> {
        enter(&self.0, &request, "Signer.GetPublicKey", Needs::Unlocked).await?;
        let req = request.into_inner();
        let e = entry(&self.0, &req.name)?;
        let public_key = match req.format.as_str() {
            "" | "openssh" => e.public_openssh.clone(),
            "pem" => self.0.key(&req.name)?.public_pem().to_owned(),
            other => {
                return Err(Error::InvalidArgument {
                    field: "format",
                    reason: format!("{other:?} is not openssh or pem"),
                }
                .into());
            }
        };
        Ok(Response::new(v1::GetPublicKeyResponse {
            public_key,
            key: Some(key_info(&req.name, &e)),
        }))
    }

    async fn sign(
        &self,
        request: Request<v1::SignRequest>,
    ) -> Result<Response<v1::SignResponse>, Status> {
        let caller = enter(&self.0, &request, "Signer.Sign", Needs::Unlocked).await?;
        let req = request.into_inner();
        let e = entry(&self.0, &req.key)?;
        if !e.usages.contains(&KeyUsage::Sign) {
            return Err(Error::PermissionDenied(format!(
                "key {:?} is not for general signing (usages: {}); add the \"sign\" usage when creating it",
                req.key,
                e.usages.iter().map(|u| u.as_str()).collect::<Vec<_>>().join(", ")
            ))
            .into());
        }
        let key = self.0.key(&req.key)?;
        let alg = SignAlgorithm::parse(&req.algorithm, key.algorithm()).map_err(Error::from)?;
        let (data, prehashed) = (req.data, req.prehashed);
        let signature = off_worker(key.slow(), move || key.sign(alg, &data, prehashed)).await??;
        tracing::info!(key = ?req.key, algorithm = alg.as_str(), pid = ?caller.pid, "signed");
        Ok(Response::new(v1::SignResponse {
            signature,
            algorithm: alg.as_str().to_owned(),
        }))
    }
}
