//! `keyholder policy` and `keyholder grant`: who may do what while the
//! session is open. Changing either asks for the PIN again.

use std::io::Read;
use std::path::PathBuf;
use std::time::Duration;

use keyholder_proto::v1;
use secrecy::ExposeSecret;
use tonic::transport::Channel;

use crate::failure::{CliResult, Failure, io_failure};
use crate::input::seconds;
use crate::output::rfc3339;
use crate::session::{PinSource, ask_pin};

/// `keyholder policy` subcommands.
#[derive(clap::Subcommand, Debug)]
pub(crate) enum PolicyCommand {
    /// Print the vault's policy (TOML); nothing when it has none.
    Get,
    /// Replace the vault's policy with FILE ("-" for stdin); asks for the
    /// PIN. An empty file removes the policy.
    Set {
        /// The policy TOML.
        file: PathBuf,
        #[command(flatten)]
        pin: PinSource,
    },
    /// Say which rule allows or denies an operation for a caller, and why.
    /// Exit status 0 when allowed, 7 when denied.
    Explain {
        /// The caller's executable path.
        #[arg(long)]
        exe: Option<String>,
        /// The caller's systemd unit.
        #[arg(long)]
        unit: Option<String>,
        /// The listener: grpc (default), agent or tcp.
        #[arg(long, default_value = "grpc")]
        channel: String,
        /// TCP: the client certificate's common name.
        #[arg(long)]
        client: Option<String>,
        /// Agent: the destination host key (SHA256:...).
        #[arg(long)]
        host_key: Option<String>,
        /// Agent: the connection is forwarded.
        #[arg(long)]
        forwarded: bool,
        /// secret-read, secret-write, kubeconfig, cert, sign, ssh, ssh-host,
        /// agent, admin or list.
        #[arg(long)]
        op: String,
        /// A secret name, CLUSTER:USER, CA:PROFILE, a key, CA:PRINCIPAL.
        #[arg(long)]
        object: String,
        /// The lifetime asked for.
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: Option<Duration>,
        /// Kubeconfig groups or certificate names asked for (repeatable).
        #[arg(long = "name")]
        names: Vec<String>,
        /// Explain against this policy file instead of the vault's.
        #[arg(long)]
        policy: Option<PathBuf>,
    },
}

/// `keyholder grant` subcommands.
#[derive(clap::Subcommand, Debug)]
pub(crate) enum GrantCommand {
    /// Create a grant for a script and print its bearer token (once, on
    /// stdout); asks for the PIN.
    Create {
        /// The grant's name.
        #[arg(long)]
        name: String,
        /// A capability (repeatable): kubeconfig:CLUSTER:USER,
        /// secret:read:NAME, cert:CA:PROFILE, sign:KEY, ssh:CA:PRINCIPAL, ...
        #[arg(long, required = true)]
        allow: Vec<String>,
        /// Longest lifetime of what it issues.
        #[arg(long, value_parser = humantime::parse_duration)]
        max_ttl: Option<Duration>,
        /// How long the grant lives (at most 24h; it ends with the session).
        #[arg(long, value_parser = humantime::parse_duration, default_value = "1h")]
        expires: Duration,
        /// Only for this executable (a path or glob).
        #[arg(long)]
        exe: Option<String>,
        /// Only for this systemd unit.
        #[arg(long)]
        unit: Option<String>,
        /// Kubeconfig groups it may ask for besides the cluster's (repeatable).
        #[arg(long = "group")]
        groups: Vec<String>,
        #[command(flatten)]
        pin: PinSource,
    },
    /// List the session's grants.
    List,
    /// Revoke a grant.
    Revoke {
        /// The grant's name.
        name: String,
    },
}

fn read_input(path: &PathBuf) -> CliResult<String> {
    if path.as_os_str() == "-" {
        let mut text = String::new();
        std::io::stdin()
            .take(1024 * 1024)
            .read_to_string(&mut text)
            .map_err(|e| Failure::new(1, format!("cannot read stdin: {e}")))?;
        Ok(text)
    } else {
        std::fs::read_to_string(path).map_err(|e| io_failure("cannot read", path, e))
    }
}

/// Runs a `keyholder policy` command.
pub(crate) async fn policy(channel: Channel, cmd: PolicyCommand, json: bool) -> CliResult {
    let mut client = v1::trust_client::TrustClient::new(channel);
    match cmd {
        PolicyCommand::Get => {
            let r = client
                .get_policy(v1::GetPolicyRequest {})
                .await?
                .into_inner();
            if json {
                println!(
                    "{}",
                    serde_json::json!({"policy": r.policy_toml, "generation": r.generation})
                );
            } else {
                print!("{}", r.policy_toml);
            }
        }
        PolicyCommand::Set { file, pin } => {
            let text = read_input(&file)?;
            let pin = ask_pin(&pin, "to change the policy")?;
            let r = client
                .set_policy(v1::SetPolicyRequest {
                    policy_toml: text,
                    pin: pin.expose_secret().to_owned(),
                })
                .await?
                .into_inner();
            if json {
                println!(
                    "{}",
                    serde_json::json!({"rules": r.rules, "generation": r.generation})
                );
            } else if r.rules == 0 {
                println!("policy removed (generation {})", r.generation);
            } else {
                println!(
                    "policy set: {} rules (generation {})",
                    r.rules, r.generation
                );
            }
        }
        PolicyCommand::Explain {
            exe,
            unit,
            channel,
            client: tcp_client,
            host_key,
            forwarded,
            op,
            object,
            ttl,
            names,
            policy,
        } => {
            let policy_toml = match policy {
                Some(p) => read_input(&p)?,
                None => String::new(),
            };
            let r = client
                .explain_policy(v1::ExplainPolicyRequest {
                    exe: exe.unwrap_or_default(),
                    unit: unit.unwrap_or_default(),
                    channel,
                    host_key: host_key.unwrap_or_default(),
                    forwarded,
                    op,
                    object,
                    ttl_seconds: seconds(ttl),
                    names,
                    policy_toml,
                    client: tcp_client.unwrap_or_default(),
                })
                .await?
                .into_inner();
            if json {
                println!(
                    "{}",
                    serde_json::json!({"allowed": r.allowed, "rule": r.rule, "reason": r.reason, "has_policy": r.has_policy})
                );
            } else {
                let verdict = if r.allowed { "allowed" } else { "denied" };
                if r.rule.is_empty() {
                    println!("{verdict}: {}", r.reason);
                } else {
                    println!("{verdict} by rule {}: {}", r.rule, r.reason);
                }
            }
            if !r.allowed {
                return Err(Failure::quiet(7));
            }
        }
    }
    Ok(())
}

fn grant_json(g: &v1::GrantInfo) -> serde_json::Value {
    serde_json::json!({
        "name": g.name,
        "allow": g.allow,
        "max_ttl_seconds": g.max_ttl_seconds,
        "created_at": rfc3339(g.created_at.as_ref()),
        "expires_at": rfc3339(g.expires_at.as_ref()),
        "exe": g.exe,
        "unit": g.unit,
        "groups": g.groups,
        "uses": g.uses,
    })
}

/// Runs a `keyholder grant` command.
pub(crate) async fn grant(channel: Channel, cmd: GrantCommand, json: bool) -> CliResult {
    let mut client = v1::trust_client::TrustClient::new(channel);
    match cmd {
        GrantCommand::Create {
            name,
            allow,
            max_ttl,
            expires,
            exe,
            unit,
            groups,
            pin,
        } => {
            let pin = ask_pin(&pin, "to create a grant")?;
            let r = client
                .create_grant(v1::CreateGrantRequest {
                    name,
                    allow,
                    max_ttl_seconds: seconds(max_ttl),
                    expires_seconds: seconds(Some(expires)),
                    exe: exe.unwrap_or_default(),
                    unit: unit.unwrap_or_default(),
                    groups,
                    pin: pin.expose_secret().to_owned(),
                })
                .await?
                .into_inner();
            let grant = r.grant.unwrap_or_default();
            if json {
                let mut v = grant_json(&grant);
                v["token"] = serde_json::Value::String(r.token);
                println!("{v}");
            } else {
                eprintln!(
                    "grant {:?} created, expires {}; present the token below as gRPC metadata \
                     \"authorization: Bearer <token>\" (it is shown only now)",
                    grant.name,
                    crate::output::when(grant.expires_at.as_ref())
                );
                println!("{}", r.token);
            }
        }
        GrantCommand::List => {
            let r = client
                .list_grants(v1::ListGrantsRequest {})
                .await?
                .into_inner();
            if json {
                let list: Vec<_> = r.grants.iter().map(grant_json).collect();
                println!("{}", serde_json::Value::Array(list));
            } else if r.grants.is_empty() {
                println!("no grants");
            } else {
                for g in &r.grants {
                    let mut pins = Vec::new();
                    if !g.exe.is_empty() {
                        pins.push(format!("exe {}", g.exe));
                    }
                    if !g.unit.is_empty() {
                        pins.push(format!("unit {}", g.unit));
                    }
                    println!(
                        "{}\t{}\texpires {}\tused {}{}",
                        g.name,
                        g.allow.join(" "),
                        crate::output::when(g.expires_at.as_ref()),
                        g.uses,
                        if pins.is_empty() {
                            String::new()
                        } else {
                            format!("\t{}", pins.join(", "))
                        }
                    );
                }
            }
        }
        GrantCommand::Revoke { name } => {
            client
                .revoke_grant(v1::RevokeGrantRequest { name: name.clone() })
                .await?;
            if json {
                println!("{}", serde_json::json!({"revoked": name}));
            } else {
                println!("grant {name:?} revoked");
            }
        }
    }
    Ok(())
}
