//! `keyholder secret put`, `get`, `list`, `rm`, `history` and `rollback`.
//! A value comes from a file or stdin, never from the command line.

use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};

use base64::Engine;
use clap::Subcommand;
use keyholder_proto::v1;
use tonic::transport::Channel;
use zeroize::Zeroizing;

use crate::failure::{CliResult, Failure, io_failure};
use crate::output::{rfc3339, write_private_file};

#[derive(Subcommand, Debug)]
pub(crate) enum SecretCommand {
    /// Store a secret. The value comes from --file or stdin (asked for without
    /// echo when stdin is a terminal), never from the command line.
    Put {
        /// The secret's name, e.g. db/prod/password.
        name: String,
        /// Read the value from this file.
        #[arg(long)]
        file: Option<PathBuf>,
        /// Replace an existing value.
        #[arg(long)]
        force: bool,
    },
    /// Print a secret's value to stdout (as stored, no newline added).
    Get {
        /// The secret's name.
        name: String,
        /// Write the value to this file (mode 0600) instead of stdout.
        #[arg(long)]
        out: Option<PathBuf>,
        /// An earlier value, by its number in `keyholder secret history`.
        #[arg(long)]
        version: Option<u64>,
    },
    /// List secret names, optionally only those starting with PREFIX.
    List {
        /// Name prefix, e.g. db/.
        prefix: Option<String>,
    },
    /// Remove a secret, and the earlier values kept with it.
    Rm {
        /// The secret's name.
        name: String,
    },
    /// List a secret's current and earlier values (numbers, sizes and
    /// times; never the values).
    History {
        /// The secret's name.
        name: String,
    },
    /// Store an earlier value again, as a new version (the current value is
    /// kept in the history like any replaced value).
    Rollback {
        /// The secret's name.
        name: String,
        /// The version to go back to (see `keyholder secret history`).
        #[arg(long)]
        to: u64,
    },
}

/// A secret's value: from `file`, else from stdin (asked for without echo
/// when stdin is a terminal).
fn read_value(file: Option<&Path>, name: &str) -> CliResult<Zeroizing<Vec<u8>>> {
    if let Some(path) = file {
        return std::fs::read(path)
            .map(Zeroizing::new)
            .map_err(|e| io_failure("cannot read", path, e));
    }
    let stdin = std::io::stdin();
    if stdin.is_terminal() {
        let v = rpassword::prompt_password(format!("Value for {name} (not echoed): "))
            .map_err(|e| Failure::new(1, format!("cannot read the value: {e}")))?;
        return Ok(Zeroizing::new(v.into_bytes()));
    }
    let mut buf = Zeroizing::new(Vec::new());
    stdin
        .lock()
        .read_to_end(&mut buf)
        .map_err(|e| Failure::new(1, format!("cannot read the value from stdin: {e}")))?;
    Ok(buf)
}

/// A value as JSON: text when it is UTF-8, else base64.
fn value_json(name: &str, value: &[u8]) -> serde_json::Value {
    match std::str::from_utf8(value) {
        Ok(t) => serde_json::json!({"name": name, "value": t}),
        Err(_) => serde_json::json!({
            "name": name,
            "value_base64": base64::prelude::BASE64_STANDARD.encode(value),
        }),
    }
}

pub(crate) async fn secret(channel: Channel, cmd: SecretCommand, json: bool) -> CliResult {
    let mut secrets = v1::secrets_client::SecretsClient::new(channel);
    match cmd {
        SecretCommand::Put { name, file, force } => {
            let value = read_value(file.as_deref(), &name)?;
            let resp = secrets
                .put(v1::PutSecretRequest {
                    name,
                    value: value.to_vec(),
                    overwrite: force,
                })
                .await?
                .into_inner();
            let meta = resp.metadata.unwrap_or_default();
            if json {
                println!(
                    "{}",
                    serde_json::json!({"name": meta.name, "size": meta.size, "version": meta.version, "generation": resp.generation})
                );
            } else {
                println!(
                    "stored {} ({} bytes, version {}, generation {})",
                    meta.name, meta.size, meta.version, resp.generation
                );
            }
        }
        SecretCommand::Get { name, out, version } => {
            let resp = secrets
                .get(v1::GetSecretRequest {
                    name: name.clone(),
                    version: version.unwrap_or(0),
                })
                .await?
                .into_inner();
            let value = Zeroizing::new(resp.value);
            if let Some(path) = out {
                write_private_file(&path, &value)?;
                if json {
                    println!(
                        "{}",
                        serde_json::json!({"name": name, "size": value.len(), "out": path.display().to_string()})
                    );
                }
            } else if json {
                println!("{}", value_json(&name, &value));
            } else {
                let mut stdout = std::io::stdout().lock();
                stdout
                    .write_all(&value)
                    .and_then(|()| stdout.flush())
                    .map_err(|e| Failure::new(1, format!("cannot write to stdout: {e}")))?;
            }
        }
        SecretCommand::List { prefix } => {
            let resp = secrets
                .list(v1::ListSecretsRequest {
                    prefix: prefix.unwrap_or_default(),
                })
                .await?
                .into_inner();
            if json {
                let list: Vec<_> = resp
                    .secrets
                    .iter()
                    .map(|m| {
                        serde_json::json!({
                            "name": m.name,
                            "size": m.size,
                            "version": m.version,
                            "created_at": rfc3339(m.created_at.as_ref()),
                            "updated_at": rfc3339(m.updated_at.as_ref()),
                        })
                    })
                    .collect();
                println!("{}", serde_json::Value::Array(list));
            } else {
                for m in &resp.secrets {
                    println!("{}", m.name);
                }
            }
        }
        SecretCommand::Rm { name } => {
            let resp = secrets
                .delete(v1::DeleteSecretRequest { name: name.clone() })
                .await?
                .into_inner();
            if json {
                println!(
                    "{}",
                    serde_json::json!({
                        "name": name,
                        "generation": resp.generation,
                        "history_removed": resp.history_removed,
                    })
                );
            } else {
                let earlier = match resp.history_removed {
                    0 => String::new(),
                    1 => " and its 1 earlier value".to_owned(),
                    n => format!(" and its {n} earlier values"),
                };
                println!("removed {name}{earlier} (generation {})", resp.generation);
            }
        }
        SecretCommand::History { name } => {
            let resp = secrets
                .history(v1::SecretHistoryRequest { name: name.clone() })
                .await?
                .into_inner();
            if json {
                let list: Vec<_> = resp
                    .versions
                    .iter()
                    .map(|v| {
                        serde_json::json!({
                            "version": v.version,
                            "size": v.size,
                            "current": v.current,
                            "stored_at": rfc3339(v.stored_at.as_ref()),
                            "replaced_at": rfc3339(v.replaced_at.as_ref()),
                        })
                    })
                    .collect();
                println!("{}", serde_json::json!({"name": name, "versions": list}));
            } else {
                println!("VERSION\tSIZE\tSTORED\tREPLACED");
                for v in &resp.versions {
                    let replaced = if v.current {
                        "current".to_owned()
                    } else {
                        rfc3339(v.replaced_at.as_ref())
                            .as_str()
                            .unwrap_or("-")
                            .to_owned()
                    };
                    println!(
                        "{}\t{}\t{}\t{replaced}",
                        v.version,
                        v.size,
                        rfc3339(v.stored_at.as_ref()).as_str().unwrap_or("-"),
                    );
                }
            }
        }
        SecretCommand::Rollback { name, to } => {
            let resp = secrets
                .rollback(v1::RollbackSecretRequest {
                    name: name.clone(),
                    to,
                })
                .await?
                .into_inner();
            let meta = resp.metadata.unwrap_or_default();
            if json {
                println!(
                    "{}",
                    serde_json::json!({
                        "name": name,
                        "to": to,
                        "version": meta.version,
                        "size": meta.size,
                        "generation": resp.generation,
                    })
                );
            } else {
                println!(
                    "{name} now holds the value of version {to}, as version {} (generation {})",
                    meta.version, resp.generation
                );
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_values_are_text_when_utf8_else_base64() {
        let v = value_json("a", b"hunter2");
        assert_eq!(v["value"], "hunter2");
        assert!(v.get("value_base64").is_none());
        let v = value_json("b", b"\xff\x00");
        assert_eq!(v["value_base64"], "/wA=");
        assert!(v.get("value").is_none());
    }
}
