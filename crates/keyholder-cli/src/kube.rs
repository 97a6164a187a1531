//! `keyholder cluster`, `kubeconfig` and `kube-credential`: Kubernetes
//! cluster profiles and the client credentials kubectl uses.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Subcommand;
use keyholder_proto::v1;
use tonic::transport::Channel;
use zeroize::Zeroizing;

use crate::failure::{CliResult, Failure, io_failure};
use crate::input::seconds;
use crate::output::{rfc3339, write_private_file};

#[derive(Subcommand, Debug)]
pub(crate) enum ClusterCommand {
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
        /// PEM file of the CA that issued the API server's certificate, when
        /// it is not --ca: kubeconfigs trust it (certificate-authority-data).
        #[arg(long, value_name = "FILE")]
        server_ca: Option<PathBuf>,
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
    /// Create the cluster's CAs and write every certificate, key and
    /// kubeconfig its components need (kubeadm's layout); keeps what is valid.
    Pki(crate::cluster::PkiArgs),
    /// List the certificates `cluster pki` issued, with time left; exit 11
    /// if any expire within the window.
    Certs(crate::cluster::CertsArgs),
}

/// Who a Kubernetes credential is for, and for how long.
#[derive(clap::Args, Debug)]
pub(crate) struct KubeIdentity {
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
pub(crate) struct KubeconfigArgs {
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
    /// PEM file of the CA that issued the API server's certificate, for this
    /// kubeconfig's certificate-authority-data (default: the cluster's).
    #[arg(long, value_name = "FILE")]
    server_ca: Option<PathBuf>,
    /// Write to this file (mode 0600) instead of stdout.
    #[arg(long)]
    out: Option<PathBuf>,
}

/// The PEM text of a --server-ca file; empty when not given.
fn read_server_ca(path: Option<&Path>) -> CliResult<String> {
    path.map(|p| std::fs::read_to_string(p).map_err(|e| io_failure("cannot read", p, e)))
        .transpose()
        .map(Option::unwrap_or_default)
}

/// `keyholder kube-credential` arguments.
#[derive(clap::Args, Debug)]
pub(crate) struct KubeCredentialArgs {
    /// The cluster profile.
    #[arg(long)]
    cluster: String,
    #[command(flatten)]
    who: KubeIdentity,
    /// ExecCredential version when KUBERNETES_EXEC_INFO does not say: v1 or v1beta1.
    #[arg(long, default_value = "v1")]
    api_version: String,
}

fn default_user(user: Option<String>) -> CliResult<String> {
    user.or_else(|| std::env::var("USER").ok().filter(|u| !u.is_empty()))
        .ok_or_else(|| Failure::new(6, "no --user given and $USER is not set"))
}

pub(crate) async fn cluster(channel: Channel, cmd: ClusterCommand, json: bool) -> CliResult {
    let cmd = match cmd {
        ClusterCommand::Pki(args) => return crate::cluster::pki(channel, args, json).await,
        ClusterCommand::Certs(args) => return crate::cluster::certs(channel, args, json).await,
        other => other,
    };
    let mut admin = v1::admin_client::AdminClient::new(channel);
    let cluster_json = |c: &v1::ClusterInfo| serde_json::json!({"name": c.name, "server": c.server, "ca": c.ca, "default_groups": c.default_groups, "max_ttl_seconds": c.max_ttl_seconds, "server_ca_pem": (!c.server_ca_pem.is_empty()).then_some(&c.server_ca_pem)});
    match cmd {
        ClusterCommand::Add {
            name,
            server,
            ca,
            groups,
            max_ttl,
            server_ca,
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
                    server_ca_pem: read_server_ca(server_ca.as_deref())?,
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
            if json {
                println!("{}", serde_json::json!({"name": name, "removed": true}));
            } else {
                println!("removed cluster {name}");
            }
        }
        ClusterCommand::Pki(_) | ClusterCommand::Certs(_) => {}
    }
    Ok(())
}

/// How the daemon was reached, so the exec plugin reaches it the same way.
pub(crate) enum Reach {
    /// The local socket.
    Socket(PathBuf),
    /// Another machine's TCP listener.
    Remote(crate::remote::Remote),
}

pub(crate) async fn kubeconfig(
    channel: Channel,
    args: KubeconfigArgs,
    reach: &Reach,
    json: bool,
) -> CliResult {
    let user = default_user(args.who.user)?;
    let (exec_command, exec_args) = if args.exec {
        let exe = std::env::current_exe().map_err(|e| {
            Failure::new(1, format!("cannot find the keyholder binary's path: {e}"))
        })?;
        let mut a = match reach {
            Reach::Socket(socket) => vec!["--socket".to_owned(), socket.display().to_string()],
            Reach::Remote(remote) => remote.args()?,
        };
        a.extend([
            "kube-credential".to_owned(),
            "--cluster".to_owned(),
            args.cluster.clone(),
            "--user".to_owned(),
            user.clone(),
            "--api-version".to_owned(),
            args.exec_api_version.clone(),
        ]);
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
    let (cluster, who) = (args.cluster.clone(), user.clone());
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
            server_ca_pem: read_server_ca(args.server_ca.as_deref())?,
        })
        .await?
        .into_inner();
    let text = Zeroizing::new(resp.kubeconfig);
    if let Some(path) = &args.out {
        write_private_file(path, text.as_bytes())?;
    }
    if json {
        // The kubeconfig itself only when it is not written to a file.
        let value = Zeroizing::new(
            serde_json::json!({
                "cluster": cluster,
                "user": who,
                "exec": args.exec,
                "expires_at": rfc3339(resp.expires_at.as_ref()),
                "out": args.out.as_ref().map(|p| p.display().to_string()),
                "kubeconfig": args.out.is_none().then_some(text.as_str()),
            })
            .to_string(),
        );
        println!("{}", value.as_str());
        return Ok(());
    }
    match args.out {
        Some(_) => {}
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
pub(crate) async fn kube_credential(channel: Channel, args: KubeCredentialArgs) -> CliResult {
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
