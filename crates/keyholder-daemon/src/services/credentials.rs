//! `keyholder.v1.Credentials`: IssueCertificate, IssueKubeconfig, IssueExecCredential.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use keyholder_pki::kube::{self, ExecApiVersion, KubeUser};
use keyholder_pki::{IssueRequest, Issued, KeyAlgorithm, Profile, PublicKeySource};
use keyholder_proto::v1;
use tonic::{Request, Response, Status};

use crate::ca::LoadedCa;
use crate::core::{CachedCredential, Core};
use crate::error::{Error, Result};
use crate::gate::Needs;

/// Client certificates and kubeconfigs live 15 minutes unless asked otherwise.
pub const DEFAULT_CLIENT_TTL: Duration = Duration::from_secs(15 * 60);
/// Server and peer certificates live 30 days unless asked otherwise.
pub const DEFAULT_SERVER_TTL: Duration = Duration::from_secs(30 * 86400);

/// The Credentials service.
pub struct CredentialsService(pub Arc<Core>);

fn ts(t: SystemTime) -> Option<prost_types::Timestamp> {
    Some(prost_types::Timestamp::from(t))
}

fn ttl_or(seconds: u64, default: Duration) -> Duration {
    if seconds == 0 {
        default
    } else {
        Duration::from_secs(seconds)
    }
}

fn check_ttl(ttl: Duration, cap: Duration, whose: &str) -> Result<()> {
    if ttl > cap {
        return Err(Error::InvalidArgument {
            field: "ttl_seconds",
            reason: format!(
                "{} is over {whose} maximum of {}",
                humantime::format_duration(ttl),
                humantime::format_duration(cap)
            ),
        });
    }
    Ok(())
}

/// Signs, on a blocking thread when the CA's signature or the caller's key
/// generation takes milliseconds (a token CA, an RSA CA or RSA key).
fn sign(ca: &LoadedCa, request: &IssueRequest, source: PublicKeySource<'_>) -> Result<Issued> {
    let slow = ca.slow || matches!(source, PublicKeySource::Generate(KeyAlgorithm::Rsa(_)));
    let run = || keyholder_pki::issue(&ca.issuer, ca.not_after, request, source);
    let issued = if slow {
        tokio::task::block_in_place(run)
    } else {
        run()
    };
    issued.map_err(Error::from)
}

fn log_issued(ca: &str, request: &IssueRequest, issued: &Issued) {
    tracing::info!(
        ca,
        profile = ?request.profile,
        cn = %request.common_name,
        serial = %issued.serial,
        not_after = %humantime::format_rfc3339_seconds(issued.not_after),
        "certificate issued"
    );
}

/// A cluster profile resolved for a request: its CA, the groups and TTL to use.
struct ClusterRequest {
    name: String,
    server: String,
    ca_name: String,
    ca: Arc<LoadedCa>,
    user: String,
    groups: Vec<String>,
    ttl: Duration,
}

impl CredentialsService {
    /// A key from the stock made ahead of time when there is one (P-256
    /// only), else generated during the request.
    fn fresh_key(&self, alg: KeyAlgorithm) -> PublicKeySource<'static> {
        if alg == KeyAlgorithm::P256
            && let Some(key) = self.0.key_pool.take()
        {
            return PublicKeySource::Pregenerated(key);
        }
        PublicKeySource::Generate(alg)
    }

    fn resolve(
        &self,
        cluster: &str,
        user: &str,
        groups: Vec<String>,
        ttl_seconds: u64,
    ) -> Result<ClusterRequest> {
        let (server, ca_name, default_groups, max_ttl) = self.0.with_unlocked(|u| {
            let c = u
                .vault
                .body
                .clusters
                .get(cluster)
                .ok_or_else(|| Error::NotFound {
                    kind: "cluster",
                    name: cluster.to_owned(),
                })?;
            Ok((
                c.server.clone(),
                c.ca.clone(),
                c.default_groups.clone(),
                c.max_ttl_seconds,
            ))
        })?;
        if user.is_empty() {
            return Err(Error::InvalidArgument {
                field: "user",
                reason: "must not be empty".into(),
            });
        }
        let ca = self.0.loaded_ca(&ca_name)?;
        let ttl = ttl_or(ttl_seconds, DEFAULT_CLIENT_TTL);
        check_ttl(ttl, Duration::from_secs(max_ttl), "the cluster's")?;
        check_ttl(ttl, ca.max_ttl, "the CA's")?;
        let mut groups = if groups.is_empty() {
            default_groups
        } else {
            groups
        };
        groups.sort();
        groups.dedup();
        Ok(ClusterRequest {
            name: cluster.to_owned(),
            server,
            ca_name,
            ca,
            user: user.to_owned(),
            groups,
            ttl,
        })
    }

    fn issue_client(&self, c: &ClusterRequest) -> Result<Issued> {
        let request = IssueRequest {
            profile: Profile::Client,
            common_name: c.user.clone(),
            organizations: c.groups.clone(),
            dns_names: Vec::new(),
            ip_addresses: Vec::new(),
            ttl: c.ttl,
            backdate: self.0.config.clock_skew,
        };
        let issued = sign(&c.ca, &request, self.fresh_key(KeyAlgorithm::P256))?;
        log_issued(&c.ca_name, &request, &issued);
        Ok(issued)
    }
}

fn api_version(s: &str) -> Result<ExecApiVersion> {
    if s.is_empty() {
        return Ok(ExecApiVersion::V1);
    }
    ExecApiVersion::parse(s).map_err(Error::from)
}

/// SSH certificates live an hour unless asked otherwise.
pub const DEFAULT_SSH_TTL: Duration = Duration::from_secs(3600);

#[tonic::async_trait]
impl v1::credentials_server::Credentials for CredentialsService {
    async fn issue_ssh_certificate(
        &self,
        request: Request<v1::IssueSshCertificateRequest>,
    ) -> Result<Response<v1::IssueSshCertificateResponse>, Status> {
        self.0
            .enter(&request, "Credentials.IssueSshCertificate", Needs::Unlocked)?;
        let req = request.into_inner();
        let (ca_entry, subject_line) = self.0.with_unlocked(|u| {
            let ca = u
                .vault
                .body
                .cas
                .get(&req.ca)
                .cloned()
                .ok_or_else(|| Error::NotFound {
                    kind: "CA",
                    name: req.ca.clone(),
                })?;
            let subject = if !req.key.is_empty() {
                u.vault
                    .body
                    .keys
                    .get(&req.key)
                    .map(|k| k.public_openssh.clone())
                    .ok_or_else(|| Error::NotFound {
                        kind: "key",
                        name: req.key.clone(),
                    })?
            } else {
                req.public_key.clone()
            };
            Ok((ca, subject))
        })?;
        if ca_entry.kind != "ssh" {
            return Err(Error::InvalidArgument {
                field: "ca",
                reason: format!("{:?} is an X.509 CA; create one with --kind ssh", req.ca),
            }
            .into());
        }
        if subject_line.is_empty() {
            return Err(Error::InvalidArgument {
                field: "key",
                reason: "name a key in the vault or give public_key".into(),
            }
            .into());
        }
        let subject = ssh_key::PublicKey::from_openssh(subject_line.trim()).map_err(|e| {
            Error::InvalidArgument {
                field: "public_key",
                reason: format!("not an OpenSSH public key ({e})"),
            }
        })?;
        let ttl = ttl_or(req.ttl_seconds, DEFAULT_SSH_TTL);
        check_ttl(
            ttl,
            Duration::from_secs(ca_entry.max_ttl_seconds),
            "the CA's",
        )?;
        let ca_key = crate::keys::LoadedKey::load(
            &req.ca,
            &keyholder_vault::KeyEntry {
                key_type: String::new(),
                usages: vec!["ca".into()],
                key: ca_entry.key.clone(),
                public_openssh: ca_entry.public_openssh.clone().unwrap_or_default(),
                created_at: String::new(),
            },
            &self.0.token_slot_handle(),
        )?;
        let mut critical_options: Vec<(String, String)> =
            req.critical_options.into_iter().collect();
        critical_options.sort();
        let cert_request = keyholder_pki::ssh::SshCertRequest {
            host: req.host,
            key_id: if req.key_id.is_empty() {
                if req.key.is_empty() {
                    "keyholder".into()
                } else {
                    req.key.clone()
                }
            } else {
                req.key_id
            },
            principals: req.principals,
            ttl,
            backdate: self.0.config.clock_skew,
            critical_options,
            extensions: req.extensions,
        };
        let (cert, serial) = {
            let signer = keyholder_pki::ssh::CaSigner {
                public: ca_key.ssh_public().clone(),
                sign: Box::new(|m| {
                    ca_key
                        .sign_ssh(m, 0x04)
                        .map_err(|e| keyholder_pki::PkiError::Build(e.to_string()))
                }),
            };
            keyholder_pki::ssh::issue(&signer, subject.key_data(), &cert_request)
                .map_err(Error::from)?
        };
        let line = cert
            .to_openssh()
            .map_err(|e| Error::Internal(e.to_string()))?;
        let valid_before = cert.valid_before();
        if !req.key.is_empty() {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            let entry = keyholder_vault::SshCertificateEntry {
                key: req.key.clone(),
                ca: req.ca.clone(),
                certificate: line.clone(),
                valid_before,
                serial,
            };
            self.0
                .write(|body| {
                    body.ssh_certificates.retain(|c| c.valid_before > now);
                    body.ssh_certificates.push(entry);
                    Ok(())
                })
                .await?;
        }
        tracing::info!(
            ca = %req.ca,
            key_id = %cert_request.key_id,
            principals = %cert_request.principals.join(","),
            serial,
            host = req.host,
            "ssh certificate issued"
        );
        let at = |s: u64| ts(std::time::UNIX_EPOCH + Duration::from_secs(s));
        Ok(Response::new(v1::IssueSshCertificateResponse {
            certificate: line,
            serial,
            valid_after: at(cert.valid_after()),
            valid_before: at(valid_before),
        }))
    }

    async fn issue_certificate(
        &self,
        request: Request<v1::IssueCertificateRequest>,
    ) -> Result<Response<v1::IssueCertificateResponse>, Status> {
        self.0
            .enter(&request, "Credentials.IssueCertificate", Needs::Unlocked)?;
        let req = request.into_inner();
        let ca = self.0.loaded_ca(&req.ca)?;
        let profile = Profile::parse(if req.profile.is_empty() {
            "client"
        } else {
            &req.profile
        })
        .map_err(Error::from)?;
        let default_ttl = match profile {
            Profile::Client => DEFAULT_CLIENT_TTL,
            Profile::Server | Profile::Peer => DEFAULT_SERVER_TTL,
        };
        let ttl = ttl_or(req.ttl_seconds, default_ttl);
        check_ttl(ttl, ca.max_ttl, "the CA's")?;
        let mut ip_addresses = Vec::with_capacity(req.ip_addresses.len());
        for ip in &req.ip_addresses {
            ip_addresses.push(ip.parse::<IpAddr>().map_err(|_| Error::InvalidArgument {
                field: "ip_addresses",
                reason: format!("{ip:?} is not an IP address"),
            })?);
        }
        let request = IssueRequest {
            profile,
            common_name: req.common_name,
            organizations: req.organizations,
            dns_names: req.dns_names,
            ip_addresses,
            ttl,
            backdate: self.0.config.clock_skew,
        };
        let source = if req.csr_pem.is_empty() {
            self.fresh_key(KeyAlgorithm::parse(&req.key_algorithm).map_err(Error::from)?)
        } else {
            PublicKeySource::Csr(&req.csr_pem)
        };
        let issued = sign(&ca, &request, source)?;
        log_issued(&req.ca, &request, &issued);
        Ok(Response::new(v1::IssueCertificateResponse {
            certificate_pem: issued.certificate_pem.clone(),
            private_key_pem: issued
                .private_key_pem
                .as_ref()
                .map(|k| k.to_string())
                .unwrap_or_default(),
            ca_certificate_pem: ca.certificate_pem.clone(),
            serial: issued.serial.clone(),
            not_before: ts(issued.not_before),
            not_after: ts(issued.not_after),
        }))
    }

    async fn issue_kubeconfig(
        &self,
        request: Request<v1::IssueKubeconfigRequest>,
    ) -> Result<Response<v1::IssueKubeconfigResponse>, Status> {
        self.0
            .enter(&request, "Credentials.IssueKubeconfig", Needs::Unlocked)?;
        let req = request.into_inner();
        let c = self.resolve(&req.cluster, &req.user, req.groups, req.ttl_seconds)?;
        if req.exec {
            if req.exec_command.is_empty() {
                return Err(Error::InvalidArgument {
                    field: "exec_command",
                    reason: "must name the credential plugin command".into(),
                }
                .into());
            }
            let version = api_version(&req.exec_api_version)?;
            let kubeconfig = kube::kubeconfig(
                &c.name,
                &c.server,
                &c.ca.certificate_pem,
                &c.user,
                &KubeUser::Exec {
                    command: &req.exec_command,
                    args: &req.exec_args,
                    api_version: version,
                },
            );
            return Ok(Response::new(v1::IssueKubeconfigResponse {
                kubeconfig: kubeconfig.to_string(),
                expires_at: None,
            }));
        }
        let issued = self.issue_client(&c)?;
        let key = issued
            .private_key_pem
            .as_deref()
            .map(String::as_str)
            .unwrap_or_default();
        let kubeconfig = kube::kubeconfig(
            &c.name,
            &c.server,
            &c.ca.certificate_pem,
            &c.user,
            &KubeUser::Certificate {
                certificate_pem: &issued.certificate_pem,
                private_key_pem: key,
            },
        );
        Ok(Response::new(v1::IssueKubeconfigResponse {
            kubeconfig: kubeconfig.to_string(),
            expires_at: ts(issued.not_after),
        }))
    }

    async fn issue_exec_credential(
        &self,
        request: Request<v1::IssueExecCredentialRequest>,
    ) -> Result<Response<v1::IssueExecCredentialResponse>, Status> {
        self.0
            .enter(&request, "Credentials.IssueExecCredential", Needs::Unlocked)?;
        let req = request.into_inner();
        let version = api_version(&req.api_version)?;
        let c = self.resolve(&req.cluster, &req.user, req.groups, req.ttl_seconds)?;
        let key = (
            c.name.clone(),
            c.user.clone(),
            c.groups.clone(),
            c.ttl.as_secs(),
        );
        let slot = {
            let mut cache = self.0.exec_cache.lock().unwrap_or_else(|p| p.into_inner());
            cache.entry(key).or_default().clone()
        };
        // Concurrent identical requests queue here and share one issuance.
        let mut entry = slot.lock().await;
        let now = SystemTime::now();
        let fresh = entry.as_ref().is_some_and(|cached| {
            let renew_before = (cached.ttl / 3).min(Duration::from_secs(300));
            cached
                .expires
                .duration_since(now)
                .is_ok_and(|left| left > renew_before)
        });
        let cached = fresh;
        if !fresh {
            let issued = self.issue_client(&c)?;
            *entry = Some(CachedCredential {
                certificate_pem: issued.certificate_pem,
                private_key_pem: issued.private_key_pem.unwrap_or_default(),
                expires: issued.not_after,
                ttl: c.ttl,
            });
        }
        let credential = entry
            .as_ref()
            .ok_or_else(|| Error::Internal("exec credential cache empty".into()))?;
        let json = kube::exec_credential(
            version,
            &credential.certificate_pem,
            &credential.private_key_pem,
            credential.expires,
        );
        Ok(Response::new(v1::IssueExecCredentialResponse {
            exec_credential: json.to_string(),
            expires_at: ts(credential.expires),
            cached,
        }))
    }
}
