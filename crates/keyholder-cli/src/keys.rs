//! `keyholder key` and `keyholder sign`: signing keys in the vault or on
//! the token, and signatures made with them.

use std::io::{IsTerminal, Read, Write};
use std::path::PathBuf;

use clap::Subcommand;
use keyholder_proto::v1;
use tonic::transport::Channel;
use zeroize::Zeroizing;

use crate::failure::{CliResult, Failure, io_failure};
use crate::output::rfc3339;

#[derive(Subcommand, Debug)]
pub(crate) enum KeyCommand {
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
pub(crate) struct SignArgs {
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

fn key_json(k: &v1::KeyInfo) -> serde_json::Value {
    serde_json::json!({
        "name": k.name, "type": k.r#type, "usages": k.usages, "on_token": k.on_token,
        "public_key": k.public_key_openssh, "fingerprint": k.fingerprint,
        "created_at": rfc3339(k.created_at.as_ref()),
    })
}

fn print_key(k: &v1::KeyInfo, json: bool) {
    if json {
        println!("{}", key_json(k));
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

pub(crate) async fn key(channel: Channel, cmd: KeyCommand, json: bool) -> CliResult {
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
            if json {
                println!(
                    "{}",
                    serde_json::Value::Array(list.keys.iter().map(key_json).collect())
                );
            } else {
                for k in &list.keys {
                    print_key(k, false);
                }
            }
        }
        KeyCommand::Show {
            name,
            public,
            format,
        } => {
            let r = signer
                .get_public_key(v1::GetPublicKeyRequest {
                    name: name.clone(),
                    format: format.clone(),
                })
                .await?
                .into_inner();
            if public && json {
                println!(
                    "{}",
                    serde_json::json!({"name": name, "format": if format.is_empty() { "openssh" } else { format.as_str() }, "public_key": r.public_key})
                );
            } else if public {
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
            if json {
                println!("{}", serde_json::json!({"name": name, "deleted": true}));
            } else {
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

pub(crate) async fn sign(channel: Channel, args: SignArgs, json: bool) -> CliResult {
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
    let key = args.key.clone();
    let r = signer
        .sign(v1::SignRequest {
            key: args.key,
            data,
            prehashed: args.prehashed,
            algorithm: args.alg.unwrap_or_default(),
        })
        .await?
        .into_inner();
    if let Some(p) = &args.out {
        crate::output::create_parents(p)?;
        std::fs::write(p, &r.signature).map_err(|e| io_failure("cannot write", p, e))?;
    }
    if json {
        use base64::Engine;
        println!(
            "{}",
            serde_json::json!({
                "key": key,
                "algorithm": r.algorithm,
                "signature_base64": base64::engine::general_purpose::STANDARD.encode(&r.signature),
                "out": args.out.as_ref().map(|p| p.display().to_string()),
            })
        );
        return Ok(());
    }
    if args.out.is_some() {
        return Ok(());
    }
    std::io::stdout()
        .write_all(&r.signature)
        .map_err(|e| Failure::new(1, format!("cannot write to stdout: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_signs_unless_it_is_only_for_ssh() {
        assert_eq!(usages(false, false), ["sign"]);
        assert_eq!(usages(true, false), ["ssh"]);
        assert_eq!(usages(true, true), ["ssh", "sign"]);
        assert_eq!(usages(false, true), ["sign"]);
    }

    #[test]
    fn garbage_is_not_an_encrypted_openssh_key() {
        assert!(!is_encrypted_openssh(""));
        assert!(!is_encrypted_openssh(
            "-----BEGIN OPENSSH PRIVATE KEY-----\nAAAA\n"
        ));
    }
}
