//! `keyholder key`, `sign`, `ssh-cert` and `ssh-env`.

use std::io::{IsTerminal, Read, Write};
use std::path::PathBuf;
use std::time::Duration;

use clap::Subcommand;
use keyholder_proto::v1;
use tonic::transport::Channel;
use zeroize::Zeroizing;

use crate::{CliResult, Failure, io_failure, rfc3339, when, write_private_file};

#[derive(Subcommand, Debug)]
pub enum KeyCommand {
    /// Generate a key in the vault (or on the token with --on-token).
    Generate {
        /// The key's name.
        name: String,
        /// ed25519, ecdsa-p256, rsa-3072 or rsa-4096.
        #[arg(long = "type", default_value = "ed25519")]
        key_type: String,
        /// Serve it through the ssh-agent.
        #[arg(long)]
        ssh: bool,
        /// Also allow `keyholder sign` / Signer.Sign (default when --ssh is not given).
        #[arg(long)]
        sign: bool,
        /// Generate it on the token, never extractable (ecdsa-p256 only).
        #[arg(long)]
        on_token: bool,
    },
    /// Import an OpenSSH or PKCS#8 private key file (then delete the file).
    Import {
        /// The key's name.
        name: String,
        /// The private key file.
        #[arg(
            long,
            required_unless_present = "pkcs11_uri",
            conflicts_with = "pkcs11_uri"
        )]
        file: Option<PathBuf>,
        /// Use a P-256 key already on the unlocked token, named by an RFC 7512
        /// URI (object= and/or id=), instead of a file. It stays on the token.
        #[arg(long)]
        pkcs11_uri: Option<String>,
        /// Read the passphrase of an encrypted key from this file (else asked on the terminal when needed).
        #[arg(long)]
        passphrase_file: Option<PathBuf>,
        /// Serve it through the ssh-agent.
        #[arg(long)]
        ssh: bool,
        /// Also allow `keyholder sign`.
        #[arg(long)]
        sign: bool,
    },
    /// List keys.
    List,
    /// Show a key; with --public print only its public key.
    Show {
        /// The key's name.
        name: String,
        /// Print the public key only.
        #[arg(long)]
        public: bool,
        /// openssh or pem.
        #[arg(long, default_value = "openssh")]
        format: String,
    },
    /// Delete a key (and its SSH certificates).
    Rm {
        /// The key's name.
        name: String,
    },
}

/// `keyholder sign` arguments.
#[derive(clap::Args, Debug)]
pub struct SignArgs {
    /// The key.
    #[arg(long)]
    key: String,
    /// The file to sign (- for stdin).
    #[arg(long = "in", default_value = "-")]
    input: PathBuf,
    /// ed25519, ecdsa-sha256, rsa-pkcs1-sha256, rsa-pkcs1-sha512, rsa-pss-sha256, rsa-pss-sha512.
    #[arg(long)]
    alg: Option<String>,
    /// The input is already a digest of the algorithm's hash.
    #[arg(long)]
    prehashed: bool,
    /// Write the signature here instead of stdout.
    #[arg(long)]
    out: Option<PathBuf>,
}

/// `keyholder ssh-cert` arguments.
#[derive(clap::Args, Debug)]
pub struct SshCertArgs {
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

fn usages(ssh: bool, sign: bool) -> Vec<String> {
    let mut u = Vec::new();
    if ssh {
        u.push("ssh".to_owned());
    }
    if sign || !ssh {
        u.push("sign".to_owned());
    }
    u
}

fn print_key(k: &v1::KeyInfo, json: bool) {
    if json {
        println!(
            "{}",
            serde_json::json!({
                "name": k.name, "type": k.r#type, "usages": k.usages, "on_token": k.on_token,
                "public_key": k.public_key_openssh, "fingerprint": k.fingerprint,
                "created_at": rfc3339(k.created_at.as_ref()),
            })
        );
    } else {
        println!(
            "{}\t{}\t{}\t{}\t{}",
            k.name,
            k.r#type,
            k.usages.join(","),
            if k.on_token { "token" } else { "vault" },
            k.fingerprint
        );
    }
}

pub async fn key(channel: Channel, cmd: KeyCommand, json: bool) -> CliResult {
    let mut admin = v1::admin_client::AdminClient::new(channel.clone());
    let mut signer = v1::signer_client::SignerClient::new(channel);
    match cmd {
        KeyCommand::Generate {
            name,
            key_type,
            ssh,
            sign,
            on_token,
        } => {
            let k = admin
                .generate_key(v1::GenerateKeyRequest {
                    name,
                    r#type: key_type,
                    usages: usages(ssh, sign),
                    on_token,
                })
                .await?
                .into_inner();
            print_key(&k, json);
        }
        KeyCommand::Import {
            name,
            file: None,
            pkcs11_uri: Some(uri),
            ssh,
            sign,
            ..
        } => {
            let k = admin
                .import_key(v1::ImportKeyRequest {
                    name,
                    pkcs11_uri: uri,
                    usages: usages(ssh, sign),
                    ..Default::default()
                })
                .await?
                .into_inner();
            print_key(&k, json);
        }
        KeyCommand::Import { file: None, .. } => {
            return Err(Failure::new(2, "give --file or --pkcs11-uri"));
        }
        KeyCommand::Import {
            name,
            file: Some(file),
            passphrase_file,
            ssh,
            sign,
            ..
        } => {
            let text = Zeroizing::new(
                std::fs::read_to_string(&file).map_err(|e| io_failure("cannot read", &file, e))?,
            );
            let encrypted = text.contains("ENCRYPTED PRIVATE KEY") || is_encrypted_openssh(&text);
            let passphrase = match (passphrase_file, encrypted) {
                (Some(p), _) => {
                    let raw = Zeroizing::new(
                        std::fs::read_to_string(&p)
                            .map_err(|e| io_failure("cannot read", &p, e))?,
                    );
                    Zeroizing::new(raw.lines().next().unwrap_or("").to_owned())
                }
                (None, true) => Zeroizing::new(
                    rpassword::prompt_password(format!("Passphrase for {}: ", file.display()))
                        .map_err(|e| {
                            Failure::new(
                                1,
                                format!(
                                    "cannot ask for the passphrase ({e}); use --passphrase-file"
                                ),
                            )
                        })?,
                ),
                (None, false) => Zeroizing::new(String::new()),
            };
            let k = admin
                .import_key(v1::ImportKeyRequest {
                    name,
                    private_key: text.to_string(),
                    passphrase: passphrase.to_string(),
                    usages: usages(ssh, sign),
                    pkcs11_uri: String::new(),
                })
                .await?
                .into_inner();
            print_key(&k, json);
            if !json {
                println!("the key is now in the vault: delete {}", file.display());
            }
        }
        KeyCommand::List => {
            let list = signer.list_keys(v1::ListKeysRequest {}).await?.into_inner();
            for k in &list.keys {
                print_key(k, json);
            }
        }
        KeyCommand::Show {
            name,
            public,
            format,
        } => {
            let r = signer
                .get_public_key(v1::GetPublicKeyRequest { name, format })
                .await?
                .into_inner();
            if public {
                let text = r.public_key;
                if text.ends_with('\n') {
                    print!("{text}")
                } else {
                    println!("{text}")
                }
            } else if let Some(k) = r.key {
                print_key(&k, json);
            }
        }
        KeyCommand::Rm { name } => {
            admin
                .delete_key(v1::DeleteKeyRequest { name: name.clone() })
                .await?;
            if !json {
                println!("deleted key {name}");
            }
        }
    }
    Ok(())
}

/// Whether an OpenSSH private key file is passphrase-protected: its
/// cipher name (first field after the magic) is not "none".
fn is_encrypted_openssh(text: &str) -> bool {
    ssh_key::PrivateKey::from_openssh(text).is_ok_and(|k| k.is_encrypted())
}

pub async fn sign(channel: Channel, args: SignArgs) -> CliResult {
    let data = if args.input.as_os_str() == "-" {
        let mut buf = Vec::new();
        if std::io::stdin().is_terminal() {
            return Err(Failure::new(
                6,
                "give --in FILE or pipe the data to sign on stdin",
            ));
        }
        std::io::stdin()
            .read_to_end(&mut buf)
            .map_err(|e| Failure::new(1, format!("cannot read stdin: {e}")))?;
        buf
    } else {
        std::fs::read(&args.input).map_err(|e| io_failure("cannot read", &args.input, e))?
    };
    let mut signer = v1::signer_client::SignerClient::new(channel);
    let r = signer
        .sign(v1::SignRequest {
            key: args.key,
            data,
            prehashed: args.prehashed,
            algorithm: args.alg.unwrap_or_default(),
        })
        .await?
        .into_inner();
    match args.out {
        Some(p) => std::fs::write(&p, &r.signature).map_err(|e| io_failure("cannot write", &p, e)),
        None => std::io::stdout()
            .write_all(&r.signature)
            .map_err(|e| Failure::new(1, format!("cannot write to stdout: {e}"))),
    }
}

pub async fn ssh_cert(channel: Channel, args: SshCertArgs, json: bool) -> CliResult {
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
            ttl_seconds: args.ttl.map_or(0, |d| d.as_secs().max(1)),
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

pub async fn ssh_env(channel: Channel) -> CliResult {
    let mut session = v1::session_client::SessionClient::new(channel);
    let status = session.status(v1::StatusRequest {}).await?.into_inner();
    if status.ssh_agent_socket.is_empty() {
        return Err(Failure::new(
            3,
            "keyholderd runs without its ssh-agent (--no-ssh-agent)",
        ));
    }
    // Same shape as `ssh-agent -s`, minus the pid (keyholderd is not
    // stopped through this variable).
    println!(
        "SSH_AUTH_SOCK={}; export SSH_AUTH_SOCK;",
        status.ssh_agent_socket
    );
    Ok(())
}
