//! `keyholder ca` and `keyholder cert`: X.509 and SSH CAs, and the
//! certificates X.509 CAs issue for cluster components.

use std::path::PathBuf;
use std::time::Duration;

use clap::Subcommand;
use keyholder_proto::v1;
use tonic::transport::Channel;
use zeroize::Zeroizing;

use crate::failure::{CliResult, io_failure};
use crate::input::{read_text, seconds};
use crate::output::{rfc3339, when, write_private_file};

#[derive(Subcommand, Debug)]
pub(crate) enum CaCommand {
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
        /// With --on-token: adopt the P-256 key this pkcs11: URI names
        /// (made by the token's own tools, e.g. in a PIV slot:
        /// "pkcs11:id=%02") instead of generating one.
        #[arg(long, requires = "on_token")]
        pkcs11_uri: Option<String>,
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
pub(crate) enum CertCommand {
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
        /// Lifetime (default 720h for every profile, or the CA's max TTL if shorter).
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

pub(crate) async fn ca(channel: Channel, cmd: CaCommand, json: bool) -> CliResult {
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
            pkcs11_uri,
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
                    pkcs11_uri: pkcs11_uri.unwrap_or_default(),
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
            if json {
                println!("{}", ca_json(&ca));
            } else if ca.kind == "ssh" {
                println!("{}", ca.public_key_openssh);
            } else {
                print!("{}", ca.certificate_pem);
            }
        }
    }
    Ok(())
}

pub(crate) async fn cert(channel: Channel, cmd: CertCommand, json: bool) -> CliResult {
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
        crate::output::create_private_dir(&dir)?;
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
