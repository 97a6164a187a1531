//! `keyholder.v1.Signer`: ListKeys, GetPublicKey, Sign.

use std::sync::Arc;

use keyholder_pki::keys::SignAlgorithm;
use keyholder_proto::v1;
use keyholder_vault::{CaKey, KeyEntry, KeyUsage};
use tonic::{Request, Response, Status};

use super::admit;
use super::convert::rfc3339_timestamp;
use crate::access::Access;
use crate::core::Core;
use crate::error::{Error, Result};
use crate::gate::Needs;
use crate::names::lookup;
use crate::signers::off_worker;
use sha2::Digest;

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
        let access = Access::List {
            what: "keys",
            prefix: String::new(),
        };
        let ticket = admit(
            &self.0,
            &request,
            "Signer.ListKeys",
            Needs::Unlocked,
            access,
        )
        .await?;
        let keys = self.0.with_body(|body| {
            let keys = body.keys.iter().map(|(n, e)| key_info(n, e)).collect();
            Ok((v1::ListKeysResponse { keys }, Vec::new()))
        });
        Ok(Response::new(ticket.finish(keys).await?))
    }

    async fn get_public_key(
        &self,
        request: Request<v1::GetPublicKeyRequest>,
    ) -> Result<Response<v1::GetPublicKeyResponse>, Status> {
        let access = Access::Describe {
            object: format!("key:{}", request.get_ref().name),
        };
        let ticket = admit(
            &self.0,
            &request,
            "Signer.GetPublicKey",
            Needs::Unlocked,
            access,
        )
        .await?;
        let req = request.into_inner();
        let result = (|| {
            let e = entry(&self.0, &req.name)?;
            let public_key = match req.format.as_str() {
                "" | "openssh" => e.public_openssh.clone(),
                "pem" => self.0.key(&req.name)?.public_pem().to_owned(),
                other => {
                    return Err(Error::InvalidArgument {
                        field: "format",
                        reason: format!("{other:?} is not openssh or pem"),
                    });
                }
            };
            Ok((
                v1::GetPublicKeyResponse {
                    public_key,
                    key: Some(key_info(&req.name, &e)),
                },
                Vec::new(),
            ))
        })();
        Ok(Response::new(ticket.finish(result).await?))
    }

    async fn sign(
        &self,
        request: Request<v1::SignRequest>,
    ) -> Result<Response<v1::SignResponse>, Status> {
        let access = Access::Sign {
            key: request.get_ref().key.clone(),
        };
        let ticket = admit(&self.0, &request, "Signer.Sign", Needs::Unlocked, access).await?;
        let pid = ticket.caller().pid;
        let req = request.into_inner();
        let result = async {
        let e = entry(&self.0, &req.key)?;
        if !e.usages.contains(&KeyUsage::Sign) {
            return Err(Error::PermissionDenied(format!(
                "key {:?} is not for general signing (usages: {}); add the \"sign\" usage when creating it",
                req.key,
                e.usages.iter().map(|u| u.as_str()).collect::<Vec<_>>().join(", ")
            )));
        }
        let key = self.0.key(&req.key)?;
        let alg = SignAlgorithm::parse(&req.algorithm, key.algorithm()).map_err(Error::from)?;
        let (data, prehashed) = (req.data, req.prehashed);
        let digest = if prehashed {
            keyholder_pki::hex(&data)
        } else {
            keyholder_pki::hex(&sha2::Sha256::digest(&data))
        };
        let signature = off_worker(key.slow(), move || key.sign(alg, &data, prehashed)).await??;
        tracing::info!(key = ?req.key, algorithm = alg.as_str(), pid = ?pid, "signed");
        let details = vec![
            ("algorithm", alg.as_str().to_owned()),
            (if prehashed { "prehash" } else { "sha256" }, digest),
        ];
        Ok((
            v1::SignResponse {
                signature,
                algorithm: alg.as_str().to_owned(),
            },
            details,
        ))
        }
        .await;
        Ok(Response::new(ticket.finish(result).await?))
    }
}
