//! `keyholder ssh-cert` and `keyholder ssh-env`: OpenSSH certificates
//! from an SSH CA, and pointing ssh at Keyholder's agent.

use std::path::PathBuf;
use std::time::Duration;

use keyholder_proto::v1;
use tonic::transport::Channel;

use crate::failure::{CliResult, Failure, io_failure};
use crate::input::seconds;
use crate::output::{rfc3339, when, write_private_file};

/// `keyholder ssh-cert` arguments.
#[derive(clap::Args, Debug)]
pub(crate) struct SshCertArgs {
    /// The SSH CA.
    #[arg(long)]
    ca: String,
    /// A key in the vault (its certificate is then served by the agent until it expires).
    #[arg(long, conflicts_with = "public_key")]
    key: Option<String>,
    /// Or an OpenSSH public key file to certify.
    #[arg(long)]
    public_key: Option<PathBuf>,
    /// Principal (repeatable): user names, or host names with --host.
    #[arg(long = "principal", required = true)]
    principals: Vec<String>,
    /// Lifetime (default 1h).
    #[arg(long, value_parser = humantime::parse_duration)]
    ttl: Option<Duration>,
    /// A host certificate instead of a user certificate.
    #[arg(long)]
    host: bool,
    /// Key id (default: the key's name).
    #[arg(long)]
    key_id: Option<String>,
    /// Critical option NAME=VALUE (repeatable), e.g. force-command=/bin/true.
    #[arg(long = "option")]
    options: Vec<String>,
    /// Extension (repeatable); default: OpenSSH's defaults for user certificates.
    #[arg(long = "extension")]
    extensions: Vec<String>,
    /// Write the certificate here instead of stdout.
    #[arg(long)]
    out: Option<PathBuf>,
}

pub(crate) async fn ssh_cert(channel: Channel, args: SshCertArgs, json: bool) -> CliResult {
    let public_key = match &args.public_key {
        Some(p) => std::fs::read_to_string(p).map_err(|e| io_failure("cannot read", p, e))?,
        None => String::new(),
    };
    let mut critical_options = std::collections::HashMap::new();
    for o in &args.options {
        let (k, v) = o
            .split_once('=')
            .ok_or_else(|| Failure::new(6, format!("--option {o:?} is not NAME=VALUE")))?;
        critical_options.insert(k.to_owned(), v.to_owned());
    }
    let mut creds = v1::credentials_client::CredentialsClient::new(channel);
    let r = creds
        .issue_ssh_certificate(v1::IssueSshCertificateRequest {
            ca: args.ca,
            key: args.key.clone().unwrap_or_default(),
            public_key,
            host: args.host,
            principals: args.principals,
            ttl_seconds: seconds(args.ttl),
            key_id: args.key_id.unwrap_or_default(),
            critical_options,
            extensions: args.extensions,
        })
        .await?
        .into_inner();
    if let Some(p) = &args.out {
        write_private_file(p, format!("{}\n", r.certificate).as_bytes())?;
    }
    if json {
        println!(
            "{}",
            serde_json::json!({
                "certificate": r.certificate, "serial": r.serial,
                "valid_after": rfc3339(r.valid_after.as_ref()), "valid_before": rfc3339(r.valid_before.as_ref()),
            })
        );
    } else if args.out.is_none() {
        println!("{}", r.certificate);
    }
    if !json && args.key.is_some() {
        eprintln!(
            "the agent serves this certificate until {}",
            when(r.valid_before.as_ref())
        );
    }
    Ok(())
}

pub(crate) async fn ssh_env(channel: Channel, json: bool) -> CliResult {
    let mut session = v1::session_client::SessionClient::new(channel);
    let status = session.status(v1::StatusRequest {}).await?.into_inner();
    if status.ssh_agent_socket.is_empty() {
        return Err(Failure::new(
            3,
            "keyholderd runs without its ssh-agent (--no-ssh-agent)",
        ));
    }
    if json {
        println!(
            "{}",
            serde_json::json!({"SSH_AUTH_SOCK": status.ssh_agent_socket})
        );
        return Ok(());
    }
    // Same shape as `ssh-agent -s`, minus the pid (keyholderd is not
    // stopped through this variable).
    println!(
        "SSH_AUTH_SOCK={}; export SSH_AUTH_SOCK;",
        status.ssh_agent_socket
    );
    Ok(())
}
