//! `keyholder`: the command-line client. It is a gRPC client of `keyholderd`
//! and nothing more: it never opens the vault or the token itself.

#![forbid(unsafe_code)]

mod pki;
mod ssh;

use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use base64::Engine;
use clap::{Parser, Subcommand};
use keyholder_proto::v1;
use secrecy::{ExposeSecret, SecretString};
use tonic::Code;
use tonic::transport::Channel;
use zeroize::Zeroizing;

const AFTER_HELP: &str = "\
Exit status:
  0  success
  1  other error
  2  usage error
  3  the vault is locked or not initialised (FAILED_PRECONDITION)
  4  not found (NOT_FOUND)
  5  already exists (ALREADY_EXISTS)
  6  invalid argument or over a size limit (INVALID_ARGUMENT, RESOURCE_EXHAUSTED)
  7  refused: wrong PIN, final PIN try, or another user (PERMISSION_DENIED)
  8  keyholderd or the token cannot be reached (UNAVAILABLE)
  9  the vault file is damaged or not authentic (DATA_LOSS)";

/// Keyholder: keys and secrets in one vault that opens only through a
/// hardware token session. This command talks to keyholderd over gRPC.
#[derive(Parser, Debug)]
#[command(version, after_help = AFTER_HELP)]
struct Cli {
    /// The daemon's socket. Default: $XDG_RUNTIME_DIR/keyholder/keyholder.sock.
    #[arg(long, global = true, env = "KEYHOLDER_SOCKET")]
    socket: Option<PathBuf>,
    /// Print machine-readable JSON instead of text.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

/// Where the PIN comes from when not typed at the terminal.
#[derive(clap::Args, Debug)]
struct PinSource {
    /// Read the PIN from this file (first line).
    #[arg(long, conflicts_with = "pin_fd")]
    pin_file: Option<PathBuf>,
    /// Read the PIN from this open file descriptor (first line).
    #[arg(long)]
    pin_fd: Option<u32>,
    /// Spend the token's final PIN try if it comes to that.
    #[arg(long)]
    allow_final_pin_try: bool,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Create the vault: a new P-256 key on the token and an empty vault encrypted to it.
    Init {
        /// The token's label.
        #[arg(long, group = "token")]
        token_label: Option<String>,
        /// The token's serial number.
        #[arg(long, group = "token")]
        token_serial: Option<String>,
        /// An RFC 7512 URI, e.g. "pkcs11:token=ops".
        #[arg(long, group = "token")]
        token_uri: Option<String>,
        /// An X25519 age recipient (age1...) that can also decrypt the vault;
        /// keep its identity offline.
        #[arg(long)]
        recovery_recipient: Option<String>,
        #[command(flatten)]
        pin: PinSource,
    },
    /// Open a session: asks for the token PIN (no echo).
    Unlock {
        /// Session lifetime, e.g. 8h (default: the daemon's session_ttl).
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: Option<Duration>,
        /// Lock after this long without use, e.g. 30m (default: the daemon's idle_timeout).
        #[arg(long, value_parser = humantime::parse_duration)]
        idle: Option<Duration>,
        /// Open a vault file older than the generation the token recorded
        /// (a backup restored on purpose); without it that is refused as a rollback.
        #[arg(long)]
        accept_older_vault: bool,
        #[command(flatten)]
        pin: PinSource,
    },
    /// Close the session: wipes decrypted data and logs out of the token.
    Lock,
    /// Show whether the vault is locked, the token, expiry, path and generation.
    Status {
        /// Keep printing each change until interrupted.
        #[arg(long)]
        watch: bool,
    },
    /// Store, read, list and remove secrets.
    #[command(subcommand)]
    Secret(SecretCommand),
    /// List the tokens keyholderd's PKCS#11 module sees.
    Tokens,
    /// Create, import, list and export X.509 CAs.
    #[command(subcommand)]
    Ca(pki::CaCommand),
    /// Add, list and remove Kubernetes cluster profiles.
    #[command(subcommand)]
    Cluster(pki::ClusterCommand),
    /// Print a kubeconfig for a cluster with a short-lived client certificate
    /// (or, with --exec, one that runs the credential plugin).
    Kubeconfig(pki::KubeconfigArgs),
    /// kubectl exec credential plugin: prints an ExecCredential on stdout.
    KubeCredential(pki::KubeCredentialArgs),
    /// Issue X.509 certificates for cluster components.
    #[command(subcommand)]
    Cert(pki::CertCommand),
    /// Generate, import, list, show and delete signing keys.
    #[command(subcommand)]
    Key(ssh::KeyCommand),
    /// Sign a file with a key in the vault or on the token (signature to stdout).
    Sign(ssh::SignArgs),
    /// Issue an OpenSSH certificate from an SSH CA.
    SshCert(ssh::SshCertArgs),
    /// Print shell commands that point SSH_AUTH_SOCK at Keyholder's agent:
    /// eval "$(keyholder ssh-env)".
    SshEnv,
}

#[derive(Subcommand, Debug)]
enum SecretCommand {
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
    },
    /// List secret names, optionally only those starting with PREFIX.
    List {
        /// Name prefix, e.g. db/.
        prefix: Option<String>,
    },
    /// Remove a secret.
    Rm {
        /// The secret's name.
        name: String,
    },
}

/// A failure with the exit status it maps to.
#[derive(Debug)]
struct Failure {
    code: u8,
    message: String,
}

impl Failure {
    fn new(code: u8, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

impl From<tonic::Status> for Failure {
    fn from(s: tonic::Status) -> Self {
        let code = match s.code() {
            Code::FailedPrecondition => 3,
            Code::NotFound => 4,
            Code::AlreadyExists => 5,
            Code::InvalidArgument | Code::ResourceExhausted | Code::OutOfRange => 6,
            Code::PermissionDenied | Code::Unauthenticated => 7,
            Code::Unavailable => 8,
            Code::DataLoss => 9,
            _ => 1,
        };
        let message = if s.message().is_empty() {
            format!("{:?}", s.code())
        } else {
            s.message().to_owned()
        };
        Self { code, message }
    }
}

type CliResult<T = ()> = Result<T, Failure>;

fn io_failure(what: &str, path: &Path, e: std::io::Error) -> Failure {
    Failure::new(1, format!("{what} {}: {e}", path.display()))
}

async fn connect(socket: &Path) -> CliResult<Channel> {
    keyholder_proto::socket::connect(socket).await.map_err(|e| {
        let cause = std::error::Error::source(&e)
            .map(ToString::to_string)
            .unwrap_or_else(|| e.to_string());
        Failure::new(
            8,
            format!(
                "cannot reach keyholderd at {} ({cause}); is it running? Start it with `keyholderd --pkcs11-module <module>`",
                socket.display()
            ),
        )
    })
}

fn first_line(bytes: &[u8]) -> CliResult<SecretString> {
    let text = std::str::from_utf8(bytes).map_err(|_| Failure::new(6, "the PIN is not UTF-8"))?;
    let line = text.lines().next().unwrap_or("");
    Ok(SecretString::from(line.to_owned()))
}

fn read_pin(src: &PinSource) -> CliResult<SecretString> {
    let path = match (&src.pin_file, src.pin_fd) {
        (Some(p), _) => Some(p.clone()),
        // /dev/fd/N reaches an inherited descriptor without unsafe code.
        (None, Some(fd)) => Some(PathBuf::from(format!("/dev/fd/{fd}"))),
        (None, None) => None,
    };
    if let Some(path) = path {
        let bytes = Zeroizing::new(
            std::fs::read(&path).map_err(|e| io_failure("cannot read PIN from", &path, e))?,
        );
        return first_line(&bytes);
    }
    let pin = rpassword::prompt_password("Token PIN: ").map_err(|e| {
        Failure::new(
            1,
            format!("cannot ask for the PIN ({e}); without a terminal use --pin-file or --pin-fd"),
        )
    })?;
    Ok(SecretString::from(pin))
}

fn when(ts: Option<&prost_types::Timestamp>) -> String {
    let Some(ts) = ts else {
        return "-".into();
    };
    let Ok(t) = SystemTime::try_from(*ts) else {
        return "-".into();
    };
    let rel = match t.duration_since(SystemTime::now()) {
        Ok(d) => format!(
            "in {}",
            humantime::format_duration(Duration::from_secs(d.as_secs()))
        ),
        Err(e) => format!(
            "{} ago",
            humantime::format_duration(Duration::from_secs(e.duration().as_secs()))
        ),
    };
    format!("{} ({rel})", humantime::format_rfc3339_seconds(t))
}

fn rfc3339(ts: Option<&prost_types::Timestamp>) -> serde_json::Value {
    ts.and_then(|t| SystemTime::try_from(*t).ok())
        .map(|t| serde_json::Value::String(humantime::format_rfc3339_seconds(t).to_string()))
        .unwrap_or(serde_json::Value::Null)
}

fn state_name(s: &v1::StatusResponse) -> &'static str {
    match v1::SessionState::try_from(s.state).unwrap_or(v1::SessionState::Unspecified) {
        v1::SessionState::Uninitialized => "uninitialized",
        v1::SessionState::Locked => "locked",
        v1::SessionState::Unlocked => "unlocked",
        v1::SessionState::Unspecified => "unknown",
    }
}

fn token_json(t: &v1::TokenInfo) -> serde_json::Value {
    serde_json::json!({
        "label": t.label,
        "serial": t.serial,
        "manufacturer": t.manufacturer,
        "model": t.model,
        "pin_count_low": t.pin_count_low,
        "pin_final_try": t.pin_final_try,
        "pin_locked": t.pin_locked,
        "recipients": t.recipients,
    })
}

fn status_json(s: &v1::StatusResponse) -> serde_json::Value {
    serde_json::json!({
        "state": state_name(s),
        "token": s.token.as_ref().map(token_json),
        "unlocked_at": rfc3339(s.unlocked_at.as_ref()),
        "expires_at": rfc3339(s.expires_at.as_ref()),
        "idle_deadline": rfc3339(s.idle_deadline.as_ref()),
        "vault_path": s.vault_path,
        "generation": s.generation,
        "secret_count": s.secret_count,
        "lock_reason": s.lock_reason,
    })
}

fn print_status(s: &v1::StatusResponse, json: bool) {
    if json {
        println!("{}", status_json(s));
        return;
    }
    println!("state:       {}", state_name(s));
    if let Some(t) = &s.token {
        println!(
            "token:       {} (serial {}, {} {})",
            t.label, t.serial, t.manufacturer, t.model
        );
    }
    if s.state == v1::SessionState::Unlocked as i32 {
        println!("unlocked:    {}", when(s.unlocked_at.as_ref()));
        println!("expires:     {}", when(s.expires_at.as_ref()));
        println!("idle lock:   {}", when(s.idle_deadline.as_ref()));
        println!("generation:  {}", s.generation);
        println!("secrets:     {}", s.secret_count);
    } else if !s.lock_reason.is_empty() {
        println!("locked by:   {}", s.lock_reason);
    }
    println!("vault:       {}", s.vault_path);
    if s.state == v1::SessionState::Uninitialized as i32 {
        println!("hint:        run `keyholder init --token-label <label>` to create the vault");
    }
}

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

fn write_private_file(path: &Path, bytes: &[u8]) -> CliResult {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| io_failure("cannot write", path, e))?;
    f.write_all(bytes)
        .map_err(|e| io_failure("cannot write", path, e))
}

async fn run(cli: Cli) -> CliResult {
    let socket = cli
        .socket
        .clone()
        .unwrap_or_else(keyholder_proto::socket::default_socket);
    let json = cli.json;
    let channel = connect(&socket).await?;
    let mut session = v1::session_client::SessionClient::new(channel.clone());
    match cli.command {
        Command::Init {
            token_label,
            token_serial,
            token_uri,
            recovery_recipient,
            pin,
        } => {
            let pin_value = read_pin(&pin)?;
            let mut admin = v1::admin_client::AdminClient::new(channel);
            let resp = admin
                .init(v1::InitRequest {
                    token: Some(v1::TokenSelector {
                        label: token_label.unwrap_or_default(),
                        serial: token_serial.unwrap_or_default(),
                        uri: token_uri.unwrap_or_default(),
                    }),
                    pin: pin_value.expose_secret().to_owned(),
                    allow_final_pin_try: pin.allow_final_pin_try,
                    recovery_recipient: recovery_recipient.unwrap_or_default(),
                })
                .await?
                .into_inner();
            if json {
                println!(
                    "{}",
                    serde_json::json!({
                        "vault_path": resp.vault_path,
                        "token_recipient": resp.token_recipient,
                        "token": resp.token.as_ref().map(token_json),
                    })
                );
            } else {
                let label = resp.token.as_ref().map(|t| t.label.as_str()).unwrap_or("");
                println!("created vault {}", resp.vault_path);
                println!("token {label:?} recipient: {}", resp.token_recipient);
                println!("next: keyholder unlock");
            }
        }
        Command::Unlock {
            ttl,
            idle,
            accept_older_vault,
            pin,
        } => {
            let pin_value = read_pin(&pin)?;
            let resp = session
                .unlock(v1::UnlockRequest {
                    pin: pin_value.expose_secret().to_owned(),
                    allow_final_pin_try: pin.allow_final_pin_try,
                    ttl_seconds: ttl.map_or(0, |d| d.as_secs().max(1)),
                    idle_timeout_seconds: idle.map_or(0, |d| d.as_secs().max(1)),
                    accept_older_vault,
                })
                .await?
                .into_inner();
            print_status(&resp.status.unwrap_or_default(), json);
        }
        Command::Lock => {
            let resp = session.lock(v1::LockRequest {}).await?.into_inner();
            print_status(&resp.status.unwrap_or_default(), json);
        }
        Command::Status { watch } => {
            if watch {
                let mut stream = session
                    .watch_status(v1::StatusRequest {})
                    .await?
                    .into_inner();
                while let Some(s) = stream.message().await? {
                    print_status(&s, json);
                    if !json {
                        println!();
                    }
                }
            } else {
                let s = session.status(v1::StatusRequest {}).await?.into_inner();
                print_status(&s, json);
            }
        }
        Command::Ca(cmd) => pki::ca(channel, cmd, json).await?,
        Command::Cluster(cmd) => pki::cluster(channel, cmd, json).await?,
        Command::Kubeconfig(args) => pki::kubeconfig(channel, args, &socket).await?,
        Command::KubeCredential(args) => pki::kube_credential(channel, args).await?,
        Command::Cert(cmd) => pki::cert(channel, cmd, json).await?,
        Command::Key(cmd) => ssh::key(channel, cmd, json).await?,
        Command::Sign(args) => ssh::sign(channel, args).await?,
        Command::SshCert(args) => ssh::ssh_cert(channel, args, json).await?,
        Command::SshEnv => ssh::ssh_env(channel).await?,
        Command::Tokens => {
            let mut admin = v1::admin_client::AdminClient::new(channel);
            let resp = admin
                .list_tokens(v1::ListTokensRequest {})
                .await?
                .into_inner();
            if json {
                let list: Vec<_> = resp.tokens.iter().map(token_json).collect();
                println!("{}", serde_json::Value::Array(list));
            } else {
                for t in &resp.tokens {
                    println!(
                        "{} (serial {}, {} {})",
                        t.label, t.serial, t.manufacturer, t.model
                    );
                    for r in &t.recipients {
                        println!("  keyholder key: {r}");
                    }
                }
            }
        }
        Command::Secret(cmd) => {
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
                            serde_json::json!({"name": meta.name, "size": meta.size, "generation": resp.generation})
                        );
                    } else {
                        println!(
                            "stored {} ({} bytes, generation {})",
                            meta.name, meta.size, resp.generation
                        );
                    }
                }
                SecretCommand::Get { name, out } => {
                    let resp = secrets
                        .get(v1::GetSecretRequest { name: name.clone() })
                        .await?
                        .into_inner();
                    let value = Zeroizing::new(resp.value);
                    if let Some(path) = out {
                        write_private_file(&path, &value)?;
                    } else if json {
                        let v = match std::str::from_utf8(&value) {
                            Ok(t) => serde_json::json!({"name": name, "value": t}),
                            Err(_) => serde_json::json!({
                                "name": name,
                                "value_base64": base64::prelude::BASE64_STANDARD.encode(&*value),
                            }),
                        };
                        println!("{v}");
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
                            serde_json::json!({"name": name, "generation": resp.generation})
                        );
                    } else {
                        println!("removed {name} (generation {})", resp.generation);
                    }
                }
            }
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("keyholder: cannot start: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("keyholder: {}", f.message);
            ExitCode::from(f.code)
        }
    }
}
