//! `keyholder ca`, `cluster`, `kubeconfig`, `kube-credential` and `cert`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Subcommand;
use keyholder_proto::v1;
use tonic::transport::Channel;
use zeroize::Zeroizing;

use crate::{CliResult, Failure, io_failure, rfc3339, when, write_private_file};

#[derive(Subcommand, Debug)]
pub enum CaCommand {
    /// Create a CA: a new key in the vault (or on the token) and a self-signed certificate.
    Create {
        /// The CA's name, e.g. kube-prod.
        name: String,
        /// x509 (TLS) or ssh (OpenSSH certificates).
        #[arg(long, default_value = "x509", value_parser = ["x509", "ssh"])]
        kind: String,
        /// x509: p256 (default), ed25519, rsa-2048, rsa-3072 or rsa-4096;
        /// ssh: ed25519 (default) or p256. On the token: p256.
        #[arg(long)]
        key_algorithm: Option<String>,
        /// Generate the key on the token; every signature is then a token operation.
        #[arg(long)]
        on_token: bool,
        /// Subject CN (default: the name).
        #[arg(long)]
        cn: Option<String>,
        /// CA certificate lifetime (default 10 years).
        #[arg(long, value_parser = humantime::parse_duration)]
        validity: Option<Duration>,
        /// Longest certificate it issues (default 1 year).
        #[arg(long, value_parser = humantime::parse_duration)]
        max_ttl: Option<Duration>,
    },
    /// Import a CA certificate and its PKCS#8 key (then delete the key file).
    Import {
        /// The CA's name.
        name: String,
        /// The CA certificate (PEM).
        #[arg(long)]
        cert: PathBuf,
        /// The private key (PKCS#8 PEM).
        #[arg(long)]
        key: PathBuf,
        /// Longest certificate it issues (default 1 year).
        #[arg(long, value_parser = humantime::parse_duration)]
        max_ttl: Option<Duration>,
    },
    /// List CAs.
    List,
    /// Show a CA: subject, fingerprint, validity, where its key is.
    Show {
        /// The CA's name.
        name: String,
    },
    /// Print a CA's certificate (PEM).
    Export {
        /// The CA's name.
        name: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum ClusterCommand {
    /// Add a Kubernetes cluster profile.
    Add {
        /// The cluster's name, e.g. prod.
        name: String,
        /// The API server, e.g. https://10.0.0.1:6443.
        #[arg(long)]
        server: String,
        /// The CA (in the vault) the API server trusts for client certificates.
        #[arg(long)]
        ca: String,
        /// Default groups (repeatable).
        #[arg(long = "group")]
        groups: Vec<String>,
        /// Longest credential (default 1h).
        #[arg(long, value_parser = humantime::parse_duration)]
        max_ttl: Option<Duration>,
        /// Replace an existing profile.
        #[arg(long)]
        force: bool,
    },
    /// List cluster profiles.
    List,
    /// Remove a cluster profile.
    Rm {
        /// The cluster's name.
        name: String,
    },
}

/// Who a Kubernetes credential is for, and for how long.
#[derive(clap::Args, Debug)]
pub struct KubeIdentity {
    /// The Kubernetes user (certificate CN). Default: $USER.
    #[arg(long)]
    user: Option<String>,
    /// Kubernetes groups (certificate O; repeatable). Default: the cluster's.
    #[arg(long = "group")]
    groups: Vec<String>,
    /// Certificate lifetime (default 15m).
    #[arg(long, value_parser = humantime::parse_duration)]
    ttl: Option<Duration>,
}

/// `keyholder kubeconfig` arguments.
#[derive(clap::Args, Debug)]
pub struct KubeconfigArgs {
    /// The cluster profile.
    cluster: String,
    #[command(flatten)]
    who: KubeIdentity,
    /// Write a kubeconfig that runs `keyholder kube-credential` instead of embedding a certificate.
    #[arg(long)]
    exec: bool,
    /// ExecCredential version for --exec: v1 (kubectl >= 1.22) or v1beta1.
    #[arg(long, default_value = "v1")]
    exec_api_version: String,
    /// Write to this file (mode 0600) instead of stdout.
    #[arg(long)]
    out: Option<PathBuf>,
}

/// `keyholder kube-credential` arguments.
#[derive(clap::Args, Debug)]
pub struct KubeCredentialArgs {
    /// The cluster profile.
    #[arg(long)]
    cluster: String,
    #[command(flatten)]
    who: KubeIdentity,
    /// ExecCredential version when KUBERNETES_EXEC_INFO does not say: v1 or v1beta1.
    #[arg(long, default_value = "v1")]
    api_version: String,
}

#[derive(Subcommand, Debug)]
pub enum CertCommand {
    /// Issue an X.509 certificate from a CA in the vault.
    Issue {
        /// The CA.
        #[arg(long)]
        ca: String,
        /// client, server or peer.
        #[arg(long, default_value = "client")]
        profile: String,
        /// Subject CN (default: the CSR's).
        #[arg(long)]
        cn: Option<String>,
        /// Subject O (repeatable).
        #[arg(long = "o")]
        organizations: Vec<String>,
        /// A DNS name or IP address (repeatable).
        #[arg(long = "san")]
        sans: Vec<String>,
        /// Lifetime (default 15m for client, 720h for server and peer).
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: Option<Duration>,
        /// Certify this CSR (PEM) instead of generating a key.
        #[arg(long)]
        csr: Option<PathBuf>,
        /// For generated keys: p256 (default), ed25519, rsa-2048, rsa-3072 or rsa-4096.
        #[arg(long, default_value = "p256")]
        key_algorithm: String,
        /// Write cert.pem, key.pem (0600) and ca.pem here instead of printing.
        #[arg(long)]
        out_dir: Option<PathBuf>,
    },
}

fn seconds(d: Option<Duration>) -> u64 {
    d.map_or(0, |d| d.as_secs().max(1))
}

fn default_user(user: Option<String>) -> CliResult<String> {
    user.or_else(|| std::env::var("USER").ok().filter(|u| !u.is_empty()))
        .ok_or_else(|| Failure::new(6, "no --user given and $USER is not set"))
}

fn ca_text(ca: &v1::CaInfo) -> String {
    if ca.kind == "ssh" {
        return format!(
            "name:        {}\nkind:        ssh\nfingerprint: {}\nkey:         {}\npublic key:  {}\n",
            ca.name,
            ca.fingerprint_sha256,
            if ca.on_token {
                "on the token"
            } else {
                "in the vault"
            },
            ca.public_key_openssh
        );
    }
    format!(
        "name:        {}\nsubject:     {}\nsha256:      {}\nnot before:  {}\nnot after:   {}\nkey:         {}\nmax ttl:     {}\n",
        ca.name,
        ca.subject,
        ca.fingerprint_sha256,
        when(ca.not_before.as_ref()),
        when(ca.not_after.as_ref()),
        if ca.on_token {
            "on the token"
        } else {
            "in the vault"
        },
        humantime::format_duration(Duration::from_secs(ca.max_ttl_seconds)),
    )
}

fn ca_json(ca: &v1::CaInfo) -> serde_json::Value {
    serde_json::json!({
        "name": ca.name,
        "subject": ca.subject,
        "fingerprint_sha256": ca.fingerprint_sha256,
        "not_before": rfc3339(ca.not_before.as_ref()),
        "not_after": rfc3339(ca.not_after.as_ref()),
        "on_token": ca.on_token,
        "max_ttl_seconds": ca.max_ttl_seconds,
        "certificate_pem": ca.certificate_pem,
        "kind": ca.kind,
        "public_key_openssh": ca.public_key_openssh,
    })
}

fn read_text(path: &Path) -> CliResult<String> {
    std::fs::read_to_string(path).map_err(|e| io_failure("cannot read", path, e))
}

pub async fn ca(channel: Channel, cmd: CaCommand, json: bool) -> CliResult {
    let mut admin = v1::admin_client::AdminClient::new(channel);
    let show = |ca: &v1::CaInfo| {
        if json {
            println!("{}", ca_json(ca));
        } else {
            print!("{}", ca_text(ca));
        }
    };
    match cmd {
        CaCommand::Create {
            name,
            kind,
            key_algorithm,
            on_token,
            cn,
            validity,
            max_ttl,
        } => {
            let ca = admin
                .create_ca(v1::CreateCaRequest {
                    name,
                    kind,
                    key_algorithm: key_algorithm.unwrap_or_default(),
                    on_token,
                    common_name: cn.unwrap_or_default(),
                    validity_seconds: seconds(validity),
                    max_ttl_seconds: seconds(max_ttl),
                })
                .await?
                .into_inner();
            show(&ca);
        }
        CaCommand::Import {
            name,
            cert,
            key,
            max_ttl,
        } => {
            let certificate_pem = read_text(&cert)?;
            let key_pem = Zeroizing::new(read_text(&key)?);
            let ca = admin
                .import_ca(v1::ImportCaRequest {
                    name,
                    certificate_pem,
                    private_key_pem: key_pem.to_string(),
                    max_ttl_seconds: seconds(max_ttl),
                })
                .await?
                .into_inner();
            show(&ca);
            if !json {
                println!("the key is now in the vault: delete {}", key.display());
            }
        }
        CaCommand::List => {
            let list = admin.list_cas(v1::ListCasRequest {}).await?.into_inner();
            if json {
                println!(
                    "{}",
                    serde_json::Value::Array(list.cas.iter().map(ca_json).collect())
                );
            } else {
                for ca in &list.cas {
                    println!(
                        "{}\t{}\t{}",
                        ca.name,
                        if ca.on_token { "token" } else { "vault" },
                        ca.subject
                    );
                }
            }
        }
        CaCommand::Show { name } => {
            show(&admin.get_ca(v1::GetCaRequest { name }).await?.into_inner())
        }
        CaCommand::Export { name } => {
            let ca = admin.get_ca(v1::GetCaRequest { name }).await?.into_inner();
            if ca.kind == "ssh" {
                println!("{}", ca.public_key_openssh);
            } else {
                print!("{}", ca.certificate_pem);
            }
        }
    }
    Ok(())
}

pub async fn cluster(channel: Channel, cmd: ClusterCommand, json: bool) -> CliResult {
    let mut admin = v1::admin_client::AdminClient::new(channel);
    let cluster_json = |c: &v1::ClusterInfo| serde_json::json!({"name": c.name, "server": c.server, "ca": c.ca, "default_groups": c.default_groups, "max_ttl_seconds": c.max_ttl_seconds});
    match cmd {
        ClusterCommand::Add {
            name,
            server,
            ca,
            groups,
            max_ttl,
            force,
        } => {
            let c = admin
                .add_cluster(v1::AddClusterRequest {
                    name,
                    server,
                    ca,
                    default_groups: groups,
                    max_ttl_seconds: seconds(max_ttl),
                    overwrite: force,
                })
                .await?
                .into_inner();
            if json {
                println!("{}", cluster_json(&c));
            } else {
                println!("added cluster {} ({}, CA {})", c.name, c.server, c.ca);
            }
        }
        ClusterCommand::List => {
            let list = admin
                .list_clusters(v1::ListClustersRequest {})
                .await?
                .into_inner();
            if json {
                println!(
                    "{}",
                    serde_json::Value::Array(list.clusters.iter().map(cluster_json).collect())
                );
            } else {
                for c in &list.clusters {
                    println!(
                        "{}\t{}\tCA {}\tgroups {}",
                        c.name,
                        c.server,
                        c.ca,
                        c.default_groups.join(",")
                    );
                }
            }
        }
        ClusterCommand::Rm { name } => {
            admin
                .remove_cluster(v1::RemoveClusterRequest { name: name.clone() })
                .await?;
            if !json {
                println!("removed cluster {name}");
            }
        }
    }
    Ok(())
}

pub async fn kubeconfig(channel: Channel, args: KubeconfigArgs, socket: &Path) -> CliResult {
    let user = default_user(args.who.user)?;
    let (exec_command, exec_args) = if args.exec {
        let exe = std::env::current_exe().map_err(|e| {
            Failure::new(1, format!("cannot find the keyholder binary's path: {e}"))
        })?;
        let mut a = vec![
            "--socket".to_owned(),
            socket.display().to_string(),
            "kube-credential".to_owned(),
            "--cluster".to_owned(),
            args.cluster.clone(),
            "--user".to_owned(),
            user.clone(),
            "--api-version".to_owned(),
            args.exec_api_version.clone(),
        ];
        for g in &args.who.groups {
            a.push("--group".to_owned());
            a.push(g.clone());
        }
        if let Some(ttl) = args.who.ttl {
            a.push("--ttl".to_owned());
            a.push(humantime::format_duration(ttl).to_string());
        }
        (exe.display().to_string(), a)
    } else {
        (String::new(), Vec::new())
    };
    let mut creds = v1::credentials_client::CredentialsClient::new(channel);
    let resp = creds
        .issue_kubeconfig(v1::IssueKubeconfigRequest {
            cluster: args.cluster,
            user,
            groups: args.who.groups,
            ttl_seconds: seconds(args.who.ttl),
            exec: args.exec,
            exec_command,
            exec_args,
            exec_api_version: args.exec_api_version,
        })
        .await?
        .into_inner();
    let text = Zeroizing::new(resp.kubeconfig);
    match args.out {
        Some(path) => write_private_file(&path, text.as_bytes())?,
        None => std::io::stdout()
            .write_all(text.as_bytes())
            .map_err(|e| Failure::new(1, format!("cannot write to stdout: {e}")))?,
    }
    Ok(())
}

/// The apiVersion kubectl asks for in `KUBERNETES_EXEC_INFO`, as written
/// there; `None` (unset or empty) means the plugin chooses. Only the shape
/// is checked here: which versions exist is keyholderd's to say.
fn exec_info_api_version(exec_info: Option<&str>) -> CliResult<Option<String>> {
    #[derive(serde::Deserialize)]
    struct ExecInfo {
        #[serde(rename = "apiVersion")]
        api_version: String,
        kind: String,
    }
    let Some(text) = exec_info.filter(|t| !t.trim().is_empty()) else {
        return Ok(None);
    };
    let info: ExecInfo = serde_json::from_str(text).map_err(|e| {
        Failure::new(
            6,
            format!("KUBERNETES_EXEC_INFO: is not an ExecCredential JSON object ({e})"),
        )
    })?;
    if info.kind != "ExecCredential" {
        return Err(Failure::new(
            6,
            format!(
                "KUBERNETES_EXEC_INFO: kind is {:?}, not \"ExecCredential\"",
                info.kind
            ),
        ));
    }
    Ok(Some(info.api_version))
}

fn unsupported_exec_info(api_version: &str) -> Failure {
    Failure::new(
        6,
        format!("KUBERNETES_EXEC_INFO: apiVersion {api_version:?} is not supported"),
    )
}

/// The kubectl exec credential plugin: stdout carries only the
/// ExecCredential JSON; every message goes to stderr; stdin is never read.
pub async fn kube_credential(channel: Channel, args: KubeCredentialArgs) -> CliResult {
    let info = std::env::var("KUBERNETES_EXEC_INFO").ok();
    let from_exec_info = exec_info_api_version(info.as_deref())?;
    // An empty api_version asks keyholderd for its default; one written
    // empty on purpose is refused instead.
    let api_version = match from_exec_info.clone() {
        Some(v) if v.is_empty() => return Err(unsupported_exec_info(&v)),
        Some(v) => v,
        None if args.api_version.is_empty() => {
            return Err(Failure::new(
                6,
                "api_version: \"\" is not client.authentication.k8s.io/v1 or v1beta1",
            ));
        }
        None => args.api_version,
    };
    let user = default_user(args.who.user)?;
    let mut creds = v1::credentials_client::CredentialsClient::new(channel);
    let resp = creds
        .issue_exec_credential(v1::IssueExecCredentialRequest {
            cluster: args.cluster,
            user,
            groups: args.who.groups,
            api_version,
            ttl_seconds: seconds(args.who.ttl),
        })
        .await
        .map_err(|status| match &from_exec_info {
            // keyholderd names the field it refuses; say where the value came from.
            Some(v)
                if status.code() == tonic::Code::InvalidArgument
                    && status.message().starts_with("api_version:") =>
            {
                unsupported_exec_info(v)
            }
            _ => Failure::from(status),
        })?
        .into_inner();
    let json = Zeroizing::new(resp.exec_credential);
    let mut out = std::io::stdout().lock();
    out.write_all(json.as_bytes())
        .and_then(|()| out.write_all(b"\n"))
        .and_then(|()| out.flush())
        .map_err(|e| Failure::new(1, format!("cannot write to stdout: {e}")))
}

pub async fn cert(channel: Channel, cmd: CertCommand, json: bool) -> CliResult {
    let CertCommand::Issue {
        ca,
        profile,
        cn,
        organizations,
        sans,
        ttl,
        csr,
        key_algorithm,
        out_dir,
    } = cmd;
    let to_dir = out_dir.is_some();
    let csr_pem = match &csr {
        Some(path) => read_text(path)?,
        None => String::new(),
    };
    let (ip_addresses, dns_names): (Vec<String>, Vec<String>) = sans
        .into_iter()
        .partition(|s| s.parse::<std::net::IpAddr>().is_ok());
    let mut creds = v1::credentials_client::CredentialsClient::new(channel);
    let resp = creds
        .issue_certificate(v1::IssueCertificateRequest {
            ca,
            profile,
            common_name: cn.unwrap_or_default(),
            organizations,
            dns_names,
            ip_addresses,
            ttl_seconds: seconds(ttl),
            csr_pem,
            key_algorithm,
        })
        .await?
        .into_inner();
    let key = Zeroizing::new(resp.private_key_pem);
    if let Some(dir) = out_dir {
        std::fs::create_dir_all(&dir).map_err(|e| io_failure("cannot create", &dir, e))?;
        let write = |name: &str, text: &str| {
            let p = dir.join(name);
            std::fs::write(&p, text).map_err(|e| io_failure("cannot write", &p, e))
        };
        write("cert.pem", &resp.certificate_pem)?;
        write("ca.pem", &resp.ca_certificate_pem)?;
        if !key.is_empty() {
            write_private_file(&dir.join("key.pem"), key.as_bytes())?;
        }
        if !json {
            println!(
                "wrote {}/cert.pem{} and ca.pem (serial {}, expires {})",
                dir.display(),
                if key.is_empty() { "" } else { ", key.pem" },
                resp.serial,
                when(resp.not_after.as_ref())
            );
        }
    }
    if json {
        println!(
            "{}",
            serde_json::json!({
                "serial": resp.serial,
                "not_before": rfc3339(resp.not_before.as_ref()),
                "not_after": rfc3339(resp.not_after.as_ref()),
                "certificate_pem": resp.certificate_pem,
                "ca_certificate_pem": resp.ca_certificate_pem,
                "private_key_pem": if key.is_empty() { serde_json::Value::Null } else { serde_json::Value::String(key.to_string()) },
            })
        );
    } else if !to_dir {
        print!("{}{}", resp.certificate_pem, key.as_str());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exec_info_gives_its_version_as_written_and_rejects_garbage() {
        assert_eq!(exec_info_api_version(None).unwrap(), None);
        assert_eq!(exec_info_api_version(Some("")).unwrap(), None);
        assert_eq!(exec_info_api_version(Some(" \n")).unwrap(), None);
        let v1b1 = r#"{"kind":"ExecCredential","apiVersion":"client.authentication.k8s.io/v1beta1","spec":{"interactive":false}}"#;
        assert_eq!(
            exec_info_api_version(Some(v1b1)).unwrap().as_deref(),
            Some("client.authentication.k8s.io/v1beta1")
        );
        // Whether a version exists is keyholderd's to say.
        let v9 = r#"{"kind":"ExecCredential","apiVersion":"client.authentication.k8s.io/v9"}"#;
        assert_eq!(
            exec_info_api_version(Some(v9)).unwrap().as_deref(),
            Some("client.authentication.k8s.io/v9")
        );
        for bad in [
            "{",
            "[]",
            "{not json",
            r#"{"kind":"ExecCredential"}"#,
            r#"{"kind":"Pod","apiVersion":"v1"}"#,
        ] {
            let err = exec_info_api_version(Some(bad)).unwrap_err();
            assert_eq!(err.code, 6, "{bad}");
            assert!(
                err.message.starts_with("KUBERNETES_EXEC_INFO: "),
                "{}",
                err.message
            );
            assert_eq!(err.message.lines().count(), 1, "{}", err.message);
        }
    }

    #[test]
    fn an_unsupported_exec_info_version_is_exit_6() {
        let f = unsupported_exec_info("client.authentication.k8s.io/v9");
        assert_eq!(f.code, 6);
        assert_eq!(
            f.message,
            "KUBERNETES_EXEC_INFO: apiVersion \"client.authentication.k8s.io/v9\" is not supported"
        );
    }
}
