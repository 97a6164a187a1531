//! `keyholder.v1.Trust`: the vault's policy and the session's grants.

use std::sync::Arc;
use std::time::Duration;

use keyholder_proto::v1;
use secrecy::SecretString;
use tonic::{Request, Response, Status};

use super::convert::timestamp;
use super::enter;
use crate::access::Access;
use crate::core::Core;
use crate::error::{Error, Result};
use crate::gate::{Caller, Channel, Needs};
use crate::grants::{Grant, NewGrant};
use crate::policy::{MAX_POLICY_BYTES, Policy};

/// The Trust service.
pub struct TrustService(pub Arc<Core>);

fn grant_info(g: &Grant) -> v1::GrantInfo {
    v1::GrantInfo {
        name: g.name.clone(),
        allow: g.caps.iter().map(|c| c.to_string()).collect(),
        max_ttl_seconds: g.limits.max_ttl.map(|d| d.as_secs()).unwrap_or(0),
        created_at: timestamp(g.created_at),
        expires_at: timestamp(g.expires_at),
        exe: g.exe.as_ref().map(|e| e.to_string()).unwrap_or_default(),
        unit: g.unit.as_ref().map(|e| e.to_string()).unwrap_or_default(),
        uses: g.uses.load(std::sync::atomic::Ordering::Relaxed),
        groups: g
            .limits
            .groups
            .iter()
            .flatten()
            .map(|g| g.to_string())
            .collect(),
    }
}

/// The access `explain` asks about.
fn explained_access(req: &v1::ExplainPolicyRequest) -> Result<Access> {
    let bad = |reason: String| Error::InvalidArgument {
        field: "object",
        reason,
    };
    let ttl = Duration::from_secs(req.ttl_seconds);
    let object = req.object.clone();
    let two = |what: &str| -> Result<(String, String)> {
        object
            .split_once(':')
            .map(|(a, b)| (a.to_owned(), b.to_owned()))
            .ok_or_else(|| bad(format!("{what} takes an object of the form {what}")))
    };
    Ok(match req.op.as_str() {
        "secret-read" => Access::SecretRead { name: object },
        "secret-write" => Access::SecretWrite { name: object },
        "kubeconfig" => {
            let (cluster, user) = two("CLUSTER:USER")?;
            Access::Kubeconfig {
                cluster,
                user,
                profile_groups: req.names.is_empty(),
                groups: req.names.clone(),
                ttl,
            }
        }
        "cert" => {
            let (ca, profile) = two("CA:PROFILE")?;
            Access::Certificate {
                ca,
                profile,
                names: req.names.clone(),
                organizations: Vec::new(),
                ttl,
            }
        }
        "sign" => Access::Sign { key: object },
        "ssh" | "ssh-host" => {
            let (ca, principal) = two("CA:PRINCIPAL")?;
            Access::SshCertificate {
                ca,
                principals: vec![principal],
                host: req.op == "ssh-host",
                ttl,
            }
        }
        "agent" => Access::AgentSign { key: object },
        "admin" => Access::Admin { object },
        "list" => Access::List {
            what: "secrets",
            prefix: object,
        },
        other => {
            return Err(Error::InvalidArgument {
                field: "op",
                reason: format!(
                    "{other:?} is not one of secret-read, secret-write, kubeconfig, cert, sign, \
                     ssh, ssh-host, agent, admin, list"
                ),
            });
        }
    })
}

fn pin(text: String) -> SecretString {
    SecretString::from(text)
}

#[tonic::async_trait]
impl v1::trust_server::Trust for TrustService {
    async fn get_policy(
        &self,
        request: Request<v1::GetPolicyRequest>,
    ) -> Result<Response<v1::GetPolicyResponse>, Status> {
        const OP: &str = "Trust.GetPolicy";
        let caller = enter(&self.0, &request, OP, Needs::Unlocked).await?;
        let access = Access::Describe {
            object: "policy".into(),
        };
        let ticket = self.0.authorize(&caller, OP, access).await?;
        let result = self.0.with_body(|body| {
            Ok((
                v1::GetPolicyResponse {
                    policy_toml: body.policy.clone().unwrap_or_default(),
                    generation: body.generation,
                },
                Vec::new(),
            ))
        });
        Ok(Response::new(ticket.finish(result).await?))
    }

    async fn set_policy(
        &self,
        request: Request<v1::SetPolicyRequest>,
    ) -> Result<Response<v1::SetPolicyResponse>, Status> {
        const OP: &str = "Trust.SetPolicy";
        let caller = enter(&self.0, &request, OP, Needs::Unlocked).await?;
        let req = request.into_inner();
        let access = Access::Trust {
            object: "policy".into(),
        };
        let ticket = self.0.authorize(&caller, OP, access).await?;
        let result = async {
            self.0.step_up(&pin(req.pin))?;
            if req.policy_toml.len() > MAX_POLICY_BYTES {
                return Err(Error::TooLarge {
                    field: "policy_toml",
                    size: req.policy_toml.len(),
                    limit: MAX_POLICY_BYTES,
                });
            }
            let text = req.policy_toml;
            let rules = if text.trim().is_empty() {
                0
            } else {
                Policy::parse(&text)
                    .map_err(|reason| Error::InvalidArgument {
                        field: "policy",
                        reason,
                    })?
                    .rules
                    .len()
            };
            let stored = (!text.trim().is_empty()).then_some(text);
            let ((), generation) = self
                .0
                .write(|body| {
                    body.policy = stored;
                    Ok(())
                })
                .await?;
            tracing::info!(rules, generation, "policy set");
            let rules = u32::try_from(rules).unwrap_or(u32::MAX);
            Ok((
                v1::SetPolicyResponse { generation, rules },
                vec![
                    ("rules", rules.to_string()),
                    ("generation", generation.to_string()),
                ],
            ))
        }
        .await;
        Ok(Response::new(ticket.finish(result).await?))
    }

    async fn explain_policy(
        &self,
        request: Request<v1::ExplainPolicyRequest>,
    ) -> Result<Response<v1::ExplainPolicyResponse>, Status> {
        const OP: &str = "Trust.ExplainPolicy";
        let caller = enter(&self.0, &request, OP, Needs::Unlocked).await?;
        let req = request.into_inner();
        let ticket = self
            .0
            .authorize(
                &caller,
                OP,
                Access::Describe {
                    object: "policy".into(),
                },
            )
            .await?;
        let result = (|| {
            let access = explained_access(&req)?;
            let channel = match req.channel.as_str() {
                "" | "grpc" => Channel::Grpc,
                "agent" => Channel::Agent,
                "tcp" => Channel::Tcp,
                other => {
                    return Err(Error::InvalidArgument {
                        field: "channel",
                        reason: format!("{other:?} is not grpc, agent or tcp"),
                    });
                }
            };
            let remote = (channel == Channel::Tcp).then(|| {
                std::sync::Arc::new(crate::remote::RemotePeer {
                    addr: std::net::SocketAddr::from(([0, 0, 0, 0], 0)),
                    name: req.client.clone(),
                    serial: String::new(),
                    not_after: std::time::SystemTime::now() + Duration::from_secs(3600),
                    epoch: self.0.trust().tcp_epoch(),
                })
            });
            let subject = Caller {
                uid: caller.uid,
                channel,
                exe: (!req.exe.is_empty()).then(|| req.exe.clone()),
                unit: (!req.unit.is_empty()).then(|| req.unit.clone()),
                host_key: (!req.host_key.is_empty()).then(|| req.host_key.clone()),
                forwarded: req.forwarded,
                remote,
                ..Caller::default()
            };
            let policy = if req.policy_toml.is_empty() {
                self.0.policy()?
            } else {
                Some(Arc::new(Policy::parse(&req.policy_toml).map_err(
                    |reason| Error::InvalidArgument {
                        field: "policy",
                        reason,
                    },
                )?))
            };
            let response = match policy {
                None => v1::ExplainPolicyResponse {
                    allowed: true,
                    rule: String::new(),
                    reason: "the vault has no policy: every process of the admin's uid may do \
                             everything"
                        .into(),
                    has_policy: false,
                },
                Some(p) => {
                    let d = p.decide(&subject, &access);
                    v1::ExplainPolicyResponse {
                        allowed: d.allowed,
                        rule: d.rule,
                        reason: d.reason,
                        has_policy: true,
                    }
                }
            };
            Ok((response, Vec::new()))
        })();
        Ok(Response::new(ticket.finish(result).await?))
    }

    async fn create_grant(
        &self,
        request: Request<v1::CreateGrantRequest>,
    ) -> Result<Response<v1::CreateGrantResponse>, Status> {
        const OP: &str = "Trust.CreateGrant";
        let caller = enter(&self.0, &request, OP, Needs::Unlocked).await?;
        let req = request.into_inner();
        let access = Access::Trust {
            object: format!("grant:{}", req.name),
        };
        let ticket = self.0.authorize(&caller, OP, access).await?;
        let result = (|| {
            self.0.step_up(&pin(req.pin))?;
            let (grant, token) = self.0.trust().grants.create(NewGrant {
                name: req.name,
                allow: req.allow,
                max_ttl: super::convert::ttl(req.max_ttl_seconds),
                groups: req.groups,
                lifetime: Duration::from_secs(req.expires_seconds),
                exe: Some(req.exe),
                unit: Some(req.unit),
            })?;
            // A lock between the PIN check and here would have cleared
            // the grants before this one joined them.
            if !self.0.is_unlocked() {
                self.0.trust().grants.revoke(&grant.name);
                return Err(self.0.locked());
            }
            tracing::info!(grant = ?grant.name, allow = ?grant.caps.iter().map(|c| c.to_string()).collect::<Vec<_>>(), "grant created");
            let info = grant_info(&grant);
            let details = vec![
                ("allow", info.allow.join(" ")),
                ("expires_seconds", req.expires_seconds.to_string()),
            ];
            Ok((
                v1::CreateGrantResponse {
                    grant: Some(info),
                    token,
                },
                details,
            ))
        })();
        Ok(Response::new(ticket.finish(result).await?))
    }

    async fn list_grants(
        &self,
        request: Request<v1::ListGrantsRequest>,
    ) -> Result<Response<v1::ListGrantsResponse>, Status> {
        const OP: &str = "Trust.ListGrants";
        let caller = enter(&self.0, &request, OP, Needs::Unlocked).await?;
        let access = Access::List {
            what: "grants",
            prefix: String::new(),
        };
        let ticket = self.0.authorize(&caller, OP, access).await?;
        let grants = self.0.trust().grants.list();
        let response = v1::ListGrantsResponse {
            grants: grants.iter().map(|g| grant_info(g)).collect(),
        };
        Ok(Response::new(
            ticket.finish(Ok((response, Vec::new()))).await?,
        ))
    }

    async fn revoke_grant(
        &self,
        request: Request<v1::RevokeGrantRequest>,
    ) -> Result<Response<v1::RevokeGrantResponse>, Status> {
        const OP: &str = "Trust.RevokeGrant";
        let caller = enter(&self.0, &request, OP, Needs::Unlocked).await?;
        let name = request.into_inner().name;
        let access = Access::Trust {
            object: format!("grant:{name}"),
        };
        let ticket = self.0.authorize(&caller, OP, access).await?;
        // Revoking only takes rights away: no PIN needed.
        let result = if self.0.trust().grants.revoke(&name) {
            tracing::info!(grant = ?name, "grant revoked");
            Ok((v1::RevokeGrantResponse {}, Vec::new()))
        } else {
            Err(Error::NotFound {
                kind: "grant",
                name,
            })
        };
        Ok(Response::new(ticket.finish(result).await?))
    }
}
