//! `keyholder.v1.Credentials`: short-lived credentials. IssueCertificate
//! (X.509 by profile), IssueKubeconfig and IssueExecCredential (from a
//! cluster profile, with the kubectl plugin's cache of credentials), and
//! IssueSshCertificate.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use keyholder_pki::kube::{self, ExecApiVersion, KubeUser};
use keyholder_pki::{FreshP256, IssueRequest, Issued, KeyAlgorithm, Profile, PublicKeySource};
use keyholder_proto::v1;
use tonic::{Request, Response, Status};

use super::admin::clusters;
use super::convert::{CertificateOrder, check_ttl, timestamp, ttl_or, unix_timestamp};
use super::enter;
use crate::access::Access;
use crate::core::Core;
use crate::error::{Error, Result};
use crate::gate::Needs;
use crate::names::lookup;
use crate::signers::{X509Ca, off_worker, signing_result};

/// Kubeconfigs and exec credentials (for humans) live 15 minutes unless asked otherwise.
pub const DEFAULT_CLIENT_TTL: Duration = Duration::from_secs(15 * 60);
/// Certificates for cluster components (`IssueCertificate`, every profile)
/// live 30 days unless asked otherwise, capped by the CA's maximum: a
/// component certificate that dies before the component is deployed helps
/// nobody. Humans' kubeconfigs and exec credentials keep the 15 minutes above.
pub const DEFAULT_COMPONENT_TTL: Duration = Duration::from_secs(30 * 86400);
/// SSH certificates live an hour unless asked otherwise.
pub const DEFAULT_SSH_TTL: Duration = Duration::from_secs(3600);

/// Identifies one kind of exec credential: cluster, user, sorted groups, TTL.
type ExecKey = (String, String, Vec<String>, u64);

/// A certificate and key served to the kubectl credential plugin.
struct CachedCredential {
    certificate_pem: String,
    /// Wiped when dropped.
    private_key_pem: zeroize::Zeroizing<String>,
    expires: SystemTime,
    /// Full lifetime, to decide when to renew.
    ttl: Duration,
}

/// Exec credentials by request, shared until shortly before they expire;
/// one issuance per key at a time. Emptied on every lock.
type ExecCache = Mutex<HashMap<ExecKey, Arc<tokio::sync::Mutex<Option<CachedCredential>>>>>;

/// The Credentials service.
pub struct CredentialsService {
    core: Arc<Core>,
    exec_cache: Arc<ExecCache>,
}

impl CredentialsService {
    /// The service over `core`; its credential cache is wiped on lock.
    pub fn new(core: Arc<Core>) -> Self {
        let exec_cache: Arc<ExecCache> = Arc::default();
        let cache = Arc::downgrade(&exec_cache);
        core.on_lock(move || {
            if let Some(cache) = cache.upgrade() {
                cache.lock().unwrap_or_else(|p| p.into_inner()).clear();
            }
        });
        Self { core, exec_cache }
    }
}

/// Where the certified key comes from, owned so that issuance can move to
/// a blocking thread.
pub(crate) enum KeySource {
    Generate(KeyAlgorithm),
    Stocked(FreshP256),
    Csr(String),
}

/// Issues from `ca`, on a blocking thread when the CA's signature or the
/// key generation is slow.
pub(crate) async fn issue(
    ca: Arc<X509Ca>,
    request: IssueRequest,
    source: KeySource,
) -> Result<Issued> {
    let slow = ca.slow || matches!(source, KeySource::Generate(alg) if alg.is_rsa());
    off_worker(slow, move || {
        let csr: String;
        let source = match source {
            KeySource::Generate(alg) => PublicKeySource::Generate(alg),
            KeySource::Stocked(key) => PublicKeySource::Pregenerated(key),
            KeySource::Csr(pem) => {
                csr = pem;
                PublicKeySource::Csr(&csr)
            }
        };
        signing_result(|| keyholder_pki::issue(&ca.issuer, ca.not_after, &request, source))
    })
    .await?
}

/// What audit records of an issued X.509 certificate.
fn issued_details(request: &IssueRequest, issued: &Issued) -> crate::access::Details {
    vec![
        ("serial", issued.serial.clone()),
        ("subject", request.common_name.clone()),
        ("ttl_seconds", request.ttl.as_secs().to_string()),
        (
            "not_after",
            humantime::format_rfc3339_seconds(issued.not_after).to_string(),
        ),
    ]
}

fn log_issued(ca: &str, request: &IssueRequest, issued: &Issued) {
    tracing::info!(
        ca,
        profile = ?request.profile,
        cn = ?request.common_name,
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
    ca: Arc<X509Ca>,
    /// The cluster's server CA bundle; empty means `ca`'s certificate.
    server_ca_pem: String,
    user: String,
    groups: Vec<String>,
    ttl: Duration,
}

impl ClusterRequest {
    /// What policy decides on for this request.
    fn access(&self, profile_groups: bool, ttl: Duration) -> Access {
        Access::Kubeconfig {
            cluster: self.name.clone(),
            user: self.user.clone(),
            groups: self.groups.clone(),
            profile_groups,
            ttl,
        }
    }

    /// What a kubeconfig trusts for the API server: `requested` (from the
    /// request) if given, else the cluster's server CA, else the client CA.
    fn server_trust<'a>(&'a self, requested: &'a str) -> &'a str {
        [requested, self.server_ca_pem.as_str()]
            .into_iter()
            .find(|p| !p.is_empty())
            .unwrap_or(&self.ca.certificate_pem)
    }
}

fn api_version(s: &str) -> Result<ExecApiVersion> {
    if s.is_empty() {
        return Ok(ExecApiVersion::V1);
    }
    ExecApiVersion::parse(s).map_err(Error::from)
}

impl CredentialsService {
    /// A key from the stock made ahead of time when there is one (P-256
    /// only), else generated during the request.
    fn fresh_key(&self, alg: KeyAlgorithm) -> KeySource {
        if alg == KeyAlgorithm::EcdsaP256
            && let Some(key) = self.core.key_pool().take()
        {
            return KeySource::Stocked(key);
        }
        KeySource::Generate(alg)
    }

    fn resolve(
        &self,
        cluster: &str,
        user: &str,
        groups: Vec<String>,
        ttl_seconds: u64,
    ) -> Result<ClusterRequest> {
        let c = self
            .core
            .with_body(|body| lookup(&body.clusters, "cluster", cluster).cloned())?;
        if user.is_empty() {
            return Err(Error::InvalidArgument {
                field: "user",
                reason: "must not be empty".into(),
            });
        }
        let ca = self.core.x509_ca(&c.ca)?;
        let ttl = ttl_or(ttl_seconds, DEFAULT_CLIENT_TTL);
        check_ttl(ttl, Duration::from_secs(c.max_ttl_seconds), "the cluster's")?;
        check_ttl(ttl, ca.max_ttl, "the CA's")?;
        let mut groups = if groups.is_empty() {
            c.default_groups
        } else {
            groups
        };
        groups.sort();
        groups.dedup();
        Ok(ClusterRequest {
            name: cluster.to_owned(),
            server: c.server,
            ca_name: c.ca,
            ca,
            server_ca_pem: c.server_ca_pem,
            user: user.to_owned(),
            groups,
            ttl,
        })
    }

    async fn issue_client(&self, c: &ClusterRequest) -> Result<Issued> {
        let request = IssueRequest {
            profile: Profile::Client,
            common_name: c.user.clone(),
            organizations: c.groups.clone(),
            dns_names: Vec::new(),
            ip_addresses: Vec::new(),
            ttl: c.ttl,
            backdate: self.core.config.clock_skew,
        };
        let issued = issue(
            c.ca.clone(),
            request.clone(),
            self.fresh_key(KeyAlgorithm::EcdsaP256),
        )
        .await?;
        log_issued(&c.ca_name, &request, &issued);
        Ok(issued)
    }
}

#[tonic::async_trait]
impl v1::credentials_server::Credentials for CredentialsService {
    async fn issue_ssh_certificate(
        &self,
        request: Request<v1::IssueSshCertificateRequest>,
    ) -> Result<Response<v1::IssueSshCertificateResponse>, Status> {
        const OP: &str = "Credentials.IssueSshCertificate";
        let caller = enter(&self.core, &request, OP, Needs::Unlocked).await?;
        let req = request.into_inner();
        let access = Access::SshCertificate {
            ca: req.ca.clone(),
            principals: req.principals.clone(),
            host: req.host,
            ttl: ttl_or(req.ttl_seconds, DEFAULT_SSH_TTL),
        };
        let ticket = self.core.authorize(&caller, OP, access).await?;
        let result = async {
            let ca = self.core.ssh_ca(&req.ca)?;
            let subject_line = if req.key.is_empty() {
                req.public_key.clone()
            } else {
                self.core.with_body(|body| {
                    Ok(lookup(&body.keys, "key", &req.key)?.public_openssh.clone())
                })?
            };
            if subject_line.is_empty() {
                return Err(Error::InvalidArgument {
                    field: "key",
                    reason: "name a key in the vault or give public_key".into(),
                });
            }
            let subject = ssh_key::PublicKey::from_openssh(subject_line.trim()).map_err(|e| {
                Error::InvalidArgument {
                    field: "public_key",
                    reason: format!("not an OpenSSH public key ({e})"),
                }
            })?;
            let ttl = ttl_or(req.ttl_seconds, DEFAULT_SSH_TTL);
            check_ttl(ttl, ca.max_ttl, "the CA's")?;
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
                backdate: self.core.config.clock_skew,
                critical_options,
                extensions: req.extensions,
            };
            let (cert, serial) = {
                let (ca, cert_request) = (ca.clone(), cert_request.clone());
                off_worker(ca.signer.slow(), move || {
                    signing_result(|| {
                        keyholder_pki::ssh::issue(&ca.signer, subject.key_data(), &cert_request)
                    })
                })
                .await??
            };
            let line = cert
                .to_openssh()
                .map_err(|e| Error::Internal(e.to_string()))?;
            let valid_before = cert.valid_before();
            if !req.key.is_empty() {
                let now = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0);
                let entry = keyholder_vault::SshCertificateEntry {
                    key: req.key.clone(),
                    ca: req.ca.clone(),
                    certificate: line.clone(),
                    valid_before,
                    serial,
                };
                self.core
                    .write(|body| {
                        body.ssh_certificates.retain(|c| c.valid_before > now);
                        body.ssh_certificates.push(entry);
                        Ok(())
                    })
                    .await?;
            }
            tracing::info!(
                ca = ?req.ca,
                key_id = ?cert_request.key_id,
                principals = ?cert_request.principals,
                serial,
                host = req.host,
                "ssh certificate issued"
            );
            let details = vec![
                ("serial", serial.to_string()),
                ("key_id", cert_request.key_id.clone()),
                ("principals", cert_request.principals.join(",")),
                ("ttl_seconds", ttl.as_secs().to_string()),
                ("valid_before", valid_before.to_string()),
            ];
            Ok((
                v1::IssueSshCertificateResponse {
                    certificate: line,
                    serial,
                    valid_after: unix_timestamp(cert.valid_after()),
                    valid_before: unix_timestamp(valid_before),
                },
                details,
            ))
        }
        .await;
        Ok(Response::new(ticket.finish(result).await?))
    }

    async fn issue_certificate(
        &self,
        request: Request<v1::IssueCertificateRequest>,
    ) -> Result<Response<v1::IssueCertificateResponse>, Status> {
        const OP: &str = "Credentials.IssueCertificate";
        let caller = enter(&self.core, &request, OP, Needs::Unlocked).await?;
        let order = CertificateOrder::try_from(request.into_inner())?;
        let ca = self.core.x509_ca(&order.ca)?;
        let ttl = order.ttl.unwrap_or(DEFAULT_COMPONENT_TTL.min(ca.max_ttl));
        // Policy decides on the names the certificate will carry: with a
        // CSR, those the CSR adds too.
        let named = IssueRequest {
            profile: order.profile,
            common_name: order.common_name.clone(),
            organizations: order.organizations.clone(),
            dns_names: order.dns_names.clone(),
            ip_addresses: order.ip_addresses.clone(),
            ttl,
            backdate: self.core.config.clock_skew,
        };
        let named = match &order.csr_pem {
            Some(csr) => keyholder_pki::with_csr_names(&named, csr).map_err(Error::from)?,
            None => named,
        };
        let access = Access::Certificate {
            ca: order.ca.clone(),
            profile: format!("{:?}", order.profile).to_lowercase(),
            names: std::iter::once(named.common_name.clone())
                .filter(|n| !n.is_empty())
                .chain(named.dns_names.iter().cloned())
                .chain(named.ip_addresses.iter().map(|ip| ip.to_string()))
                .collect(),
            organizations: named.organizations,
            ttl,
        };
        let misuse = crate::remote::listener_ca_misuse(
            &self.core.config.tcp,
            &order.ca,
            order.profile,
            &access,
        );
        let ticket = self.core.authorize(&caller, OP, access).await?;
        let result = async {
            if let Some(why) = misuse {
                return Err(Error::PermissionDenied(why));
            }
            check_ttl(ttl, ca.max_ttl, "the CA's")?;
            let request = IssueRequest {
                profile: order.profile,
                common_name: order.common_name,
                organizations: order.organizations,
                dns_names: order.dns_names,
                ip_addresses: order.ip_addresses,
                ttl,
                backdate: self.core.config.clock_skew,
            };
            let source = match order.csr_pem {
                Some(csr) => KeySource::Csr(csr),
                None => self.fresh_key(order.key_algorithm),
            };
            let issued = issue(ca.clone(), request.clone(), source).await?;
            log_issued(&order.ca, &request, &issued);
            let details = issued_details(&request, &issued);
            Ok((
                v1::IssueCertificateResponse {
                    certificate_pem: issued.certificate_pem.clone(),
                    private_key_pem: issued
                        .private_key_pem
                        .as_ref()
                        .map(|k| k.to_string())
                        .unwrap_or_default(),
                    ca_certificate_pem: ca.certificate_pem.clone(),
                    serial: issued.serial.clone(),
                    not_before: timestamp(issued.not_before),
                    not_after: timestamp(issued.not_after),
                },
                details,
            ))
        }
        .await;
        Ok(Response::new(ticket.finish(result).await?))
    }

    async fn issue_kubeconfig(
        &self,
        request: Request<v1::IssueKubeconfigRequest>,
    ) -> Result<Response<v1::IssueKubeconfigResponse>, Status> {
        const OP: &str = "Credentials.IssueKubeconfig";
        let caller = enter(&self.core, &request, OP, Needs::Unlocked).await?;
        let mut req = request.into_inner();
        let server_ca_pem = clusters::server_ca(std::mem::take(&mut req.server_ca_pem))?;
        let profile_groups = req.groups.is_empty();
        let c = self.resolve(&req.cluster, &req.user, req.groups, req.ttl_seconds)?;
        let ttl = if req.exec { Duration::ZERO } else { c.ttl };
        let ticket = self
            .core
            .authorize(&caller, OP, c.access(profile_groups, ttl))
            .await?;
        let result = async {
            let trust = c.server_trust(&server_ca_pem);
            if req.exec {
                if req.exec_command.is_empty() {
                    return Err(Error::InvalidArgument {
                        field: "exec_command",
                        reason: "must name the credential plugin command".into(),
                    });
                }
                let version = api_version(&req.exec_api_version)?;
                let kubeconfig = kube::kubeconfig(
                    &c.name,
                    &c.server,
                    trust,
                    &c.user,
                    &KubeUser::Exec {
                        command: &req.exec_command,
                        args: &req.exec_args,
                        api_version: version,
                    },
                );
                return Ok((
                    v1::IssueKubeconfigResponse {
                        kubeconfig: kubeconfig.to_string(),
                        expires_at: None,
                    },
                    vec![("exec", "true".to_owned())],
                ));
            }
            let issued = self.issue_client(&c).await?;
            let key = issued
                .private_key_pem
                .as_deref()
                .map(String::as_str)
                .unwrap_or_default();
            let kubeconfig = kube::kubeconfig(
                &c.name,
                &c.server,
                trust,
                &c.user,
                &KubeUser::Certificate {
                    certificate_pem: &issued.certificate_pem,
                    private_key_pem: key,
                },
            );
            let details = vec![
                ("serial", issued.serial.clone()),
                ("groups", c.groups.join(",")),
                ("ttl_seconds", c.ttl.as_secs().to_string()),
                (
                    "not_after",
                    humantime::format_rfc3339_seconds(issued.not_after).to_string(),
                ),
            ];
            Ok((
                v1::IssueKubeconfigResponse {
                    kubeconfig: kubeconfig.to_string(),
                    expires_at: timestamp(issued.not_after),
                },
                details,
            ))
        }
        .await;
        Ok(Response::new(ticket.finish(result).await?))
    }

    async fn issue_exec_credential(
        &self,
        request: Request<v1::IssueExecCredentialRequest>,
    ) -> Result<Response<v1::IssueExecCredentialResponse>, Status> {
        const OP: &str = "Credentials.IssueExecCredential";
        let caller = enter(&self.core, &request, OP, Needs::Nothing).await?;
        let req = request.into_inner();
        // A version kubectl cannot read is a setup error, reported even
        // while the session is locked.
        let version = api_version(&req.api_version)?;
        self.core.require_unlocked_or_prompt(&caller, OP).await?;
        let profile_groups = req.groups.is_empty();
        let c = self.resolve(&req.cluster, &req.user, req.groups, req.ttl_seconds)?;
        let ticket = self
            .core
            .authorize(&caller, OP, c.access(profile_groups, c.ttl))
            .await?;
        let result = async {
            let key = (
                c.name.clone(),
                c.user.clone(),
                c.groups.clone(),
                c.ttl.as_secs(),
            );
            let slot = {
                let mut cache = self.exec_cache.lock().unwrap_or_else(|p| p.into_inner());
                cache.entry(key).or_default().clone()
            };
            // Concurrent identical requests queue here and share one issuance.
            let mut entry = slot.lock().await;
            let now = SystemTime::now();
            let cached = entry.as_ref().is_some_and(|cached| {
                let renew_before = (cached.ttl / 3).min(Duration::from_secs(300));
                cached
                    .expires
                    .duration_since(now)
                    .is_ok_and(|left| left > renew_before)
            });
            if !cached {
                let issued = self.issue_client(&c).await?;
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
            let details = vec![
                ("cached", cached.to_string()),
                ("groups", c.groups.join(",")),
                (
                    "not_after",
                    humantime::format_rfc3339_seconds(credential.expires).to_string(),
                ),
            ];
            Ok((
                v1::IssueExecCredentialResponse {
                    exec_credential: json.to_string(),
                    expires_at: timestamp(credential.expires),
                    cached,
                },
                details,
            ))
        }
        .await;
        Ok(Response::new(ticket.finish(result).await?))
    }
}
