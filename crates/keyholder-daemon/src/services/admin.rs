//! `keyholder.v1.Admin`: Init, ListTokens.

use std::sync::Arc;

use keyholder_proto::v1;
use keyholder_token::Selector;
use secrecy::SecretString;
use tonic::{Request, Response, Status};

use std::time::{Duration, SystemTime};

use keyholder_pki::hex;
use keyholder_pki::keys::{KeyType, SoftKey};
use keyholder_vault::document::now_rfc3339;
use keyholder_vault::{CaEntry, CaKey, ClusterEntry, KeyEntry};

use crate::ca::validate_name;
use crate::core::Core;
use crate::error::{Error, Result};
use crate::gate::Needs;

/// Default CA certificate lifetime: 10 years.
const DEFAULT_CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 86400);
/// Default longest certificate a CA issues: 1 year.
const DEFAULT_CA_MAX_TTL: Duration = Duration::from_secs(365 * 86400);
/// Default longest kubeconfig credential of a cluster: 1 hour.
const DEFAULT_CLUSTER_MAX_TTL: Duration = Duration::from_secs(3600);

fn ts(t: SystemTime) -> Option<prost_types::Timestamp> {
    Some(prost_types::Timestamp::from(t))
}

fn ca_info(name: &str, entry: &CaEntry) -> Result<v1::CaInfo> {
    if entry.kind == "ssh" {
        let public = entry.public_openssh.clone().unwrap_or_default();
        let fingerprint = ssh_key::PublicKey::from_openssh(&public)
            .map(|p| p.fingerprint(Default::default()).to_string())
            .unwrap_or_default();
        return Ok(v1::CaInfo {
            name: name.to_owned(),
            kind: entry.kind.clone(),
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
        not_before: ts(info.not_before),
        not_after: ts(info.not_after),
        on_token: matches!(entry.key, CaKey::Token { .. }),
        max_ttl_seconds: entry.max_ttl_seconds,
        kind: entry.kind.clone(),
        public_key_openssh: String::new(),
    })
}

/// Validates key usages; empty means `["sign"]`.
fn usages(requested: Vec<String>) -> Result<Vec<String>> {
    if requested.is_empty() {
        return Ok(vec!["sign".into()]);
    }
    let mut out = Vec::new();
    for u in requested {
        if !matches!(u.as_str(), "ssh" | "sign" | "ca") {
            return Err(Error::InvalidArgument {
                field: "usages",
                reason: format!("{u:?} is not one of ssh, sign, ca"),
            });
        }
        if !out.contains(&u) {
            out.push(u);
        }
    }
    Ok(out)
}

/// A new key: on the token (P-256, sign only) or in memory.
/// Returns the stored form and the OpenSSH public key line.
fn new_key(
    core: &Core,
    name: &str,
    kind: KeyType,
    on_token: bool,
    label_prefix: &str,
) -> Result<(CaKey, String)> {
    if on_token {
        if kind != KeyType::EcdsaP256 {
            return Err(Error::InvalidArgument {
                field: "type",
                reason: "keys on the token are ecdsa-p256".into(),
            });
        }
        let label = format!("{label_prefix}:{name}");
        let key = core.with_token(|session| {
            Ok(session.generate_p256_for(&label, keyholder_token::KeyPurpose::Sign)?)
        })?;
        let point =
            p256::elliptic_curve::sec1::ToEncodedPoint::to_encoded_point(&key.public, false);
        let data =
            ssh_key::public::KeyData::Ecdsa(ssh_key::public::EcdsaPublicKey::NistP256(point));
        let openssh = keyholder_pki::keys::openssh_public(&data, name).map_err(Error::from)?;
        return Ok((
            CaKey::Token {
                key_id: hex(&key.id),
                label,
            },
            openssh,
        ));
    }
    let key = tokio::task::block_in_place(|| SoftKey::generate(kind)).map_err(Error::from)?;
    stored(&key, name)
}

fn stored(key: &SoftKey, name: &str) -> Result<(CaKey, String)> {
    let openssh =
        keyholder_pki::keys::openssh_public(key.ssh_public(), name).map_err(Error::from)?;
    let pem = key.pkcs8_pem().map_err(Error::from)?;
    Ok((
        CaKey::Vault {
            private_key_pem: pem,
        },
        openssh,
    ))
}

async fn store_key(core: &Core, name: &str, entry: KeyEntry) -> Result<v1::KeyInfo> {
    let info = crate::services::signer::key_info(name, &entry);
    core.write(|body| {
        if body.keys.contains_key(name) {
            return Err(Error::AlreadyExists {
                kind: "key",
                name: name.to_owned(),
            });
        }
        body.keys.insert(name.to_owned(), entry);
        Ok(())
    })
    .await?;
    tracing::info!(key = name, r#type = %info.r#type, on_token = info.on_token, fingerprint = %info.fingerprint, "key stored");
    Ok(info)
}

fn cluster_info(name: &str, c: &ClusterEntry) -> v1::ClusterInfo {
    v1::ClusterInfo {
        name: name.to_owned(),
        server: c.server.clone(),
        ca: c.ca.clone(),
        default_groups: c.default_groups.clone(),
        max_ttl_seconds: c.max_ttl_seconds,
    }
}

fn or_default(seconds: u64, default: Duration) -> u64 {
    if seconds == 0 {
        default.as_secs()
    } else {
        seconds
    }
}

/// Stores a new CA unless the name is taken.
async fn store_ca(core: &Core, name: &str, entry: CaEntry) -> Result<v1::CaInfo> {
    let info = ca_info(name, &entry)?;
    core.write(|body| {
        if body.cas.contains_key(name) {
            return Err(Error::AlreadyExists {
                kind: "CA",
                name: name.to_owned(),
            });
        }
        body.cas.insert(name.to_owned(), entry);
        Ok(())
    })
    .await?;
    tracing::info!(ca = name, on_token = info.on_token, fingerprint = %info.fingerprint_sha256, "CA stored");
    Ok(info)
}

/// The Admin service.
pub struct AdminService(pub Arc<Core>);

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

#[tonic::async_trait]
impl v1::admin_server::Admin for AdminService {
    async fn init(
        &self,
        request: Request<v1::InitRequest>,
    ) -> Result<Response<v1::InitResponse>, Status> {
        self.0.enter(&request, "Admin.Init", Needs::Nothing)?;
        let mut req = request.into_inner();
        let selector = selector(req.token.take())?;
        let pin = SecretString::from(std::mem::take(&mut req.pin));
        let recovery: Vec<String> = Some(req.recovery_recipient)
            .filter(|r| !r.is_empty())
            .into_iter()
            .collect();
        let response = self
            .0
            .init(selector, pin, req.allow_final_pin_try, recovery)
            .await?;
        Ok(Response::new(response))
    }

    async fn list_tokens(
        &self,
        request: Request<v1::ListTokensRequest>,
    ) -> Result<Response<v1::ListTokensResponse>, Status> {
        self.0.enter(&request, "Admin.ListTokens", Needs::Nothing)?;
        let tokens = self.0.list_tokens()?;
        Ok(Response::new(v1::ListTokensResponse { tokens }))
    }

    async fn create_ca(
        &self,
        request: Request<v1::CreateCaRequest>,
    ) -> Result<Response<v1::CaInfo>, Status> {
        self.0.enter(&request, "Admin.CreateCa", Needs::Unlocked)?;
        let req = request.into_inner();
        validate_name("name", &req.name)?;
        let exists = self
            .0
            .with_unlocked(|u| Ok(u.vault.body.cas.contains_key(&req.name)))?;
        if exists {
            return Err(Error::AlreadyExists {
                kind: "CA",
                name: req.name,
            }
            .into());
        }
        match req.kind.as_str() {
            "" | "x509" => {}
            "ssh" => {
                let kind = match req.key_algorithm.as_str() {
                    "" | "ed25519" if !req.on_token => KeyType::Ed25519,
                    "" | "p256" | "ecdsa-p256" => KeyType::EcdsaP256,
                    other => {
                        return Err(Error::InvalidArgument {
                            field: "key_algorithm",
                            reason: format!("{other:?}: SSH CAs are ed25519 or ecdsa-p256 (on the token: ecdsa-p256)"),
                        }
                        .into());
                    }
                };
                let (key, openssh) =
                    new_key(&self.0, &req.name, kind, req.on_token, "keyholder-ca")?;
                let entry = CaEntry {
                    kind: "ssh".into(),
                    certificate_pem: String::new(),
                    key,
                    max_ttl_seconds: or_default(req.max_ttl_seconds, DEFAULT_CA_MAX_TTL),
                    created_at: now_rfc3339(),
                    public_openssh: Some(openssh),
                };
                return Ok(Response::new(store_ca(&self.0, &req.name, entry).await?));
            }
            other => {
                return Err(Error::InvalidArgument {
                    field: "kind",
                    reason: format!("{other:?} is not x509 or ssh"),
                }
                .into());
            }
        }
        let alg = keyholder_pki::KeyAlgorithm::parse(&req.key_algorithm).map_err(Error::from)?;
        let validity = Duration::from_secs(or_default(req.validity_seconds, DEFAULT_CA_VALIDITY));
        let cn = if req.common_name.is_empty() {
            req.name.clone()
        } else {
            req.common_name.clone()
        };
        let (certificate_pem, key) = if req.on_token {
            if alg != keyholder_pki::KeyAlgorithm::P256 {
                return Err(Error::InvalidArgument {
                    field: "key_algorithm",
                    reason: "keys on the token are P-256".into(),
                }
                .into());
            }
            let label = format!("keyholder-ca:{}", req.name);
            let key = self.0.with_token(|session| {
                Ok(session.generate_p256_for(&label, keyholder_token::KeyPurpose::Sign)?)
            })?;
            let point =
                p256::elliptic_curve::sec1::ToEncodedPoint::to_encoded_point(&key.public, false)
                    .as_bytes()
                    .to_vec();
            let signer =
                crate::ca::token_signer(self.0.token_slot_handle(), key.id.clone(), point)?;
            let pem = tokio::task::block_in_place(|| {
                keyholder_pki::create_ca_certificate(&cn, &signer, validity)
            })
            .map_err(Error::from)?;
            (
                pem,
                CaKey::Token {
                    key_id: hex(&key.id),
                    label,
                },
            )
        } else {
            // RSA generation takes up to seconds and an RSA signature
            // milliseconds: off the async worker.
            let (kp, pem) = tokio::task::block_in_place(|| {
                let kp = alg.generate()?;
                let pem = keyholder_pki::create_ca_certificate(&cn, &kp, validity)?;
                Ok::<_, keyholder_pki::PkiError>((kp, pem))
            })
            .map_err(Error::from)?;
            (
                pem,
                CaKey::Vault {
                    private_key_pem: zeroize::Zeroizing::new(kp.serialize_pem()),
                },
            )
        };
        let entry = CaEntry {
            kind: "x509".into(),
            certificate_pem,
            key,
            max_ttl_seconds: or_default(req.max_ttl_seconds, DEFAULT_CA_MAX_TTL),
            created_at: now_rfc3339(),
            public_openssh: None,
        };
        Ok(Response::new(store_ca(&self.0, &req.name, entry).await?))
    }

    async fn import_ca(
        &self,
        request: Request<v1::ImportCaRequest>,
    ) -> Result<Response<v1::CaInfo>, Status> {
        self.0.enter(&request, "Admin.ImportCa", Needs::Unlocked)?;
        let req = request.into_inner();
        validate_name("name", &req.name)?;
        let key_pem = zeroize::Zeroizing::new(req.private_key_pem);
        keyholder_pki::import_ca(&req.certificate_pem, &key_pem).map_err(Error::from)?;
        let entry = CaEntry {
            kind: "x509".into(),
            certificate_pem: req.certificate_pem,
            key: CaKey::Vault {
                private_key_pem: key_pem,
            },
            max_ttl_seconds: or_default(req.max_ttl_seconds, DEFAULT_CA_MAX_TTL),
            created_at: now_rfc3339(),
            public_openssh: None,
        };
        Ok(Response::new(store_ca(&self.0, &req.name, entry).await?))
    }

    async fn list_cas(
        &self,
        request: Request<v1::ListCasRequest>,
    ) -> Result<Response<v1::ListCasResponse>, Status> {
        self.0.enter(&request, "Admin.ListCas", Needs::Unlocked)?;
        let cas = self.0.with_unlocked(|u| {
            u.vault
                .body
                .cas
                .iter()
                .map(|(n, e)| ca_info(n, e))
                .collect::<Result<Vec<_>>>()
        })?;
        Ok(Response::new(v1::ListCasResponse { cas }))
    }

    async fn get_ca(
        &self,
        request: Request<v1::GetCaRequest>,
    ) -> Result<Response<v1::CaInfo>, Status> {
        self.0.enter(&request, "Admin.GetCa", Needs::Unlocked)?;
        let name = request.into_inner().name;
        let info = self.0.with_unlocked(|u| {
            let entry = u.vault.body.cas.get(&name).ok_or_else(|| Error::NotFound {
                kind: "CA",
                name: name.clone(),
            })?;
            ca_info(&name, entry)
        })?;
        Ok(Response::new(info))
    }

    async fn add_cluster(
        &self,
        request: Request<v1::AddClusterRequest>,
    ) -> Result<Response<v1::ClusterInfo>, Status> {
        self.0
            .enter(&request, "Admin.AddCluster", Needs::Unlocked)?;
        let req = request.into_inner();
        validate_name("name", &req.name)?;
        let server_ok = req.server.strip_prefix("https://").is_some_and(|rest| {
            !rest.is_empty() && !rest.chars().any(|c| c.is_whitespace() || c.is_control())
        });
        if !server_ok {
            return Err(Error::InvalidArgument {
                field: "server",
                reason: format!("{:?} is not an https:// URL", req.server),
            }
            .into());
        }
        for g in &req.default_groups {
            if g.is_empty() || g.chars().any(char::is_control) {
                return Err(Error::InvalidArgument {
                    field: "default_groups",
                    reason: format!("{g:?} is not a group name"),
                }
                .into());
            }
        }
        let entry = ClusterEntry {
            server: req.server,
            ca: req.ca,
            default_groups: req.default_groups,
            max_ttl_seconds: or_default(req.max_ttl_seconds, DEFAULT_CLUSTER_MAX_TTL),
            created_at: now_rfc3339(),
        };
        let info = cluster_info(&req.name, &entry);
        let name = req.name;
        self.0
            .write(|body| {
                if !body.cas.contains_key(&entry.ca) {
                    return Err(Error::NotFound {
                        kind: "CA",
                        name: entry.ca.clone(),
                    });
                }
                if body.clusters.contains_key(&name) && !req.overwrite {
                    return Err(Error::AlreadyExists {
                        kind: "cluster",
                        name: name.clone(),
                    });
                }
                body.clusters.insert(name.clone(), entry);
                Ok(())
            })
            .await?;
        Ok(Response::new(info))
    }

    async fn generate_key(
        &self,
        request: Request<v1::GenerateKeyRequest>,
    ) -> Result<Response<v1::KeyInfo>, Status> {
        self.0
            .enter(&request, "Admin.GenerateKey", Needs::Unlocked)?;
        let req = request.into_inner();
        validate_name("name", &req.name)?;
        let kind = KeyType::parse(&req.r#type).map_err(Error::from)?;
        let usages = usages(req.usages)?;
        if self
            .0
            .with_unlocked(|u| Ok(u.vault.body.keys.contains_key(&req.name)))?
        {
            return Err(Error::AlreadyExists {
                kind: "key",
                name: req.name,
            }
            .into());
        }
        let (key, public_openssh) =
            new_key(&self.0, &req.name, kind, req.on_token, "keyholder-key")?;
        let entry = KeyEntry {
            key_type: kind.as_str().into(),
            usages,
            key,
            public_openssh,
            created_at: now_rfc3339(),
        };
        Ok(Response::new(store_key(&self.0, &req.name, entry).await?))
    }

    async fn import_key(
        &self,
        request: Request<v1::ImportKeyRequest>,
    ) -> Result<Response<v1::KeyInfo>, Status> {
        self.0.enter(&request, "Admin.ImportKey", Needs::Unlocked)?;
        let req = request.into_inner();
        validate_name("name", &req.name)?;
        let usages = usages(req.usages)?;
        if !req.pkcs11_uri.is_empty() {
            let object =
                keyholder_token::ObjectSelector::from_uri(&req.pkcs11_uri).map_err(|e| {
                    Error::InvalidArgument {
                        field: "pkcs11_uri",
                        reason: e.to_string(),
                    }
                })?;
            let selector =
                keyholder_token::Selector::from_uri(&req.pkcs11_uri).map_err(Error::from)?;
            let key = self.0.with_token(|session| {
                if !selector.matches(session.token()) {
                    return Err(Error::InvalidArgument {
                        field: "pkcs11_uri",
                        reason: format!(
                            "names {selector}, but the session runs on token {:?}",
                            session.token().label
                        ),
                    });
                }
                Ok(session.find_p256_signing_key(&object)?)
            })?;
            let point =
                p256::elliptic_curve::sec1::ToEncodedPoint::to_encoded_point(&key.public, false);
            let data =
                ssh_key::public::KeyData::Ecdsa(ssh_key::public::EcdsaPublicKey::NistP256(point));
            let entry = KeyEntry {
                key_type: KeyType::EcdsaP256.as_str().into(),
                usages,
                key: CaKey::Token {
                    key_id: hex(&key.id),
                    label: object.label.unwrap_or_default(),
                },
                public_openssh: keyholder_pki::keys::openssh_public(&data, &req.name)
                    .map_err(Error::from)?,
                created_at: now_rfc3339(),
            };
            return Ok(Response::new(store_key(&self.0, &req.name, entry).await?));
        }
        let text = zeroize::Zeroizing::new(req.private_key);
        let pass = zeroize::Zeroizing::new(req.passphrase);
        let key = SoftKey::import(&text, (!pass.is_empty()).then_some(pass.as_str()))
            .map_err(Error::from)?;
        let (stored_key, public_openssh) = stored(&key, &req.name)?;
        let entry = KeyEntry {
            key_type: key.kind().as_str().into(),
            usages,
            key: stored_key,
            public_openssh,
            created_at: now_rfc3339(),
        };
        Ok(Response::new(store_key(&self.0, &req.name, entry).await?))
    }

    async fn delete_key(
        &self,
        request: Request<v1::DeleteKeyRequest>,
    ) -> Result<Response<v1::DeleteKeyResponse>, Status> {
        self.0.enter(&request, "Admin.DeleteKey", Needs::Unlocked)?;
        let name = request.into_inner().name;
        self.0
            .write(|body| {
                body.keys.remove(&name).ok_or_else(|| Error::NotFound {
                    kind: "key",
                    name: name.clone(),
                })?;
                body.ssh_certificates.retain(|c| c.key != name);
                Ok(())
            })
            .await?;
        tracing::info!(key = %name, "key deleted");
        Ok(Response::new(v1::DeleteKeyResponse {}))
    }

    async fn list_clusters(
        &self,
        request: Request<v1::ListClustersRequest>,
    ) -> Result<Response<v1::ListClustersResponse>, Status> {
        self.0
            .enter(&request, "Admin.ListClusters", Needs::Unlocked)?;
        let clusters = self.0.with_unlocked(|u| {
            Ok(u.vault
                .body
                .clusters
                .iter()
                .map(|(n, c)| cluster_info(n, c))
                .collect())
        })?;
        Ok(Response::new(v1::ListClustersResponse { clusters }))
    }

    async fn remove_cluster(
        &self,
        request: Request<v1::RemoveClusterRequest>,
    ) -> Result<Response<v1::RemoveClusterResponse>, Status> {
        self.0
            .enter(&request, "Admin.RemoveCluster", Needs::Unlocked)?;
        let name = request.into_inner().name;
        self.0
            .write(|body| {
                body.clusters
                    .remove(&name)
                    .map(drop)
                    .ok_or_else(|| Error::NotFound {
                        kind: "cluster",
                        name: name.clone(),
                    })
            })
            .await?;
        Ok(Response::new(v1::RemoveClusterResponse {}))
    }
}
