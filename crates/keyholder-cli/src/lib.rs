//! `keyholder`: the command-line client. It is a gRPC client of `keyholderd`
//! and nothing more: it never opens the vault or the token itself, and this
//! crate does not depend on the crates that could (scripts/test checks).

#![forbid(unsafe_code)]

mod audit;
mod cluster;
mod failure;
mod inject;
mod input;
mod keys;
mod kube;
mod kube_secret;
mod output;
mod pki;
mod remote;
mod run;
mod secrets;
mod session;
mod ssh;
mod token;
mod trust;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tonic::transport::Channel;

use crate::failure::{CliResult, Failure};

const AFTER_HELP: &str = "\
Moving a vault between a file and etcd (keyholderd stopped):
  keyholder vault migrate --from FILE|etcd://... --to FILE|etcd://...   (see docs/etcd.md;
  `keyholder vault migrate --help`)

Exit status:
  0  success
  1  other error
  2  usage error
  3  the vault is locked or not initialised, or the token cannot do it (FAILED_PRECONDITION)
  4  not found (NOT_FOUND)
  5  already exists (ALREADY_EXISTS)
  6  invalid argument or over a size limit (INVALID_ARGUMENT, RESOURCE_EXHAUSTED)
  7  refused: wrong PIN, final PIN try, another user, or a socket that is not
     yours (PERMISSION_DENIED)
  8  keyholderd or the token cannot be reached (UNAVAILABLE)
  9  the vault file is damaged or not authentic (DATA_LOSS)
  10 the pinentry PIN dialog was cancelled or timed out
  11 cluster certs: a certificate expires within the window";

/// Keyholder: keys and secrets in one vault that opens only through a
/// hardware token session. This command talks to keyholderd over gRPC.
#[derive(Parser, Debug)]
#[command(name = "keyholder", version, after_help = AFTER_HELP)]
struct Cli {
    /// The daemon's socket. Default: $XDG_RUNTIME_DIR/keyholder/keyholder.sock.
    #[arg(long, global = true, env = "KEYHOLDER_SOCKET")]
    socket: Option<PathBuf>,
    /// Print machine-readable JSON instead of text: one JSON value per
    /// command (status --watch: one object per line; kube-credential always
    /// prints its ExecCredential JSON).
    #[arg(long, global = true)]
    json: bool,
    /// A keyholderd on another machine, reached over TCP with mutual TLS:
    /// https://HOST:PORT (needs --remote-cert, --remote-key, --remote-ca;
    /// see docs/remote.md).
    #[arg(long, global = true, env = "KEYHOLDER_REMOTE", requires_all = ["remote_cert", "remote_key", "remote_ca"])]
    remote: Option<String>,
    /// The client certificate for --remote (PEM).
    #[arg(long, global = true, env = "KEYHOLDER_REMOTE_CERT")]
    remote_cert: Option<PathBuf>,
    /// Its private key (PEM).
    #[arg(long, global = true, env = "KEYHOLDER_REMOTE_KEY")]
    remote_key: Option<PathBuf>,
    /// The CA that issued the remote keyholderd's certificate (PEM).
    #[arg(long, global = true, env = "KEYHOLDER_REMOTE_CA")]
    remote_ca: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Create the vault: a new P-256 key on the token and an empty vault encrypted to it.
    Init(session::InitArgs),
    /// Open a session: asks for the token PIN (no echo).
    Unlock(session::UnlockArgs),
    /// Close the session: wipes decrypted data and logs out of the token.
    Lock,
    /// Show whether the vault is locked, the token, expiry, path and generation.
    Status(session::StatusArgs),
    /// Store, read, list and remove secrets.
    #[command(subcommand)]
    Secret(secrets::SecretCommand),
    /// List the tokens keyholderd's PKCS#11 module sees on this machine,
    /// enrolled or not (`keyholder token list`: those the vault is enrolled to).
    Tokens(session::TokensArgs),
    /// Enrol, list and revoke the tokens that open the vault (docs/team.md).
    #[command(subcommand)]
    Token(token::TokenCommand),
    /// Create, import, list and export X.509 CAs.
    #[command(subcommand)]
    Ca(pki::CaCommand),
    /// Add, list and remove Kubernetes cluster profiles.
    #[command(subcommand)]
    Cluster(kube::ClusterCommand),
    /// Print a kubeconfig for a cluster with a short-lived client certificate
    /// (or, with --exec, one that runs the credential plugin).
    Kubeconfig(kube::KubeconfigArgs),
    /// kubectl exec credential plugin: prints an ExecCredential on stdout.
    KubeCredential(kube::KubeCredentialArgs),
    /// Issue X.509 certificates for cluster components.
    #[command(subcommand)]
    Cert(pki::CertCommand),
    /// Generate, import, list, show and delete signing keys.
    #[command(subcommand)]
    Key(keys::KeyCommand),
    /// Sign a file with a key in the vault or on the token (signature to stdout).
    Sign(keys::SignArgs),
    /// Issue an OpenSSH certificate from an SSH CA.
    SshCert(ssh::SshCertArgs),
    /// Show, set and explain the access policy kept in the vault.
    #[command(subcommand)]
    Policy(trust::PolicyCommand),
    /// Create, list and revoke scoped grants for scripts.
    #[command(subcommand)]
    Grant(trust::GrantCommand),
    /// Issue keys and certificates for remote tools (the TCP listener's clients).
    #[command(subcommand)]
    Client(remote::ClientCommand),
    /// Print shell commands that point SSH_AUTH_SOCK at Keyholder's agent:
    /// eval "$(keyholder ssh-env)".
    SshEnv,
    /// Read and verify the audit log.
    #[command(subcommand)]
    Audit(audit::AuditCommand),
    /// Run a command with secrets in its environment (never on its command
    /// line or in a file): keyholder execs the command once every secret is
    /// read, so signals and the exit status are the command's own.
    Run(run::RunArgs),
    /// Render {{ secret "NAME" }} references in a template (stdin or --in)
    /// to stdout or a 0600 file.
    Inject(inject::InjectArgs),
    /// Print a Kubernetes Secret manifest with values from the vault (or a
    /// certificate issued now), for `| kubectl apply -f -`.
    KubeSecret(kube_secret::KubeSecretArgs),
}

/// A channel to keyholderd and the uid it runs as, or a failure that says
/// how to start it. A socket that is not the user's (its directory, or the
/// process behind it) is refused before any byte is sent: exit 7, like
/// another refusal.
async fn connect(socket: &Path) -> CliResult<(Channel, u32)> {
    use keyholder_proto::socket::ConnectError;
    keyholder_proto::socket::connect_with_peer(socket)
        .await
        .map_err(|e| match e {
            ConnectError::Untrusted(_) | ConnectError::OtherUid { .. } => {
                Failure::new(7, e.to_string())
            }
            ConnectError::Unreachable(_) => Failure::new(
                8,
                format!(
                    "cannot reach keyholderd at {} ({e}); is it running? Start it with `keyholderd --pkcs11-module <module>`",
                    socket.display()
                ),
            ),
        })
}

async fn run(cli: Cli) -> CliResult {
    let explicit_socket = cli.socket.is_some();
    let socket = cli
        .socket
        .unwrap_or_else(keyholder_proto::socket::default_socket);
    let json = cli.json;
    // `audit verify` checks a log file's chain without a daemon too.
    let command = match cli.command {
        Command::Audit(cmd) => return audit::audit(&socket, cmd, json).await,
        other => other,
    };
    let remote = match (cli.remote, cli.remote_cert, cli.remote_key, cli.remote_ca) {
        (Some(server), Some(cert), Some(key), Some(server_ca)) => Some(remote::Remote {
            server,
            cert,
            key,
            server_ca,
        }),
        // The config file's [remote] profile, unless a socket was named.
        _ if !explicit_socket => remote::profile()?,
        _ => None,
    };
    if remote.is_some() && !served_remotely(&command) {
        // Refused here, before any PIN is asked: the PIN never leaves this
        // machine, and keyholderd refuses these over TCP anyway.
        return Err(Failure::new(
            2,
            "this command is only for the machine keyholderd runs on (it takes the PIN or changes who may do what); \
             run it there, without --remote",
        ));
    }
    let (channel, peer) = match &remote {
        Some(r) => (
            remote::connect(r).await?,
            keyholder_proto::socket::own_uid(),
        ),
        None => connect(&socket).await?,
    };
    let reach = match &remote {
        Some(r) => kube::Reach::Remote(r.clone()),
        None => kube::Reach::Socket(socket.clone()),
    };
    let result = match command {
        Command::Init(args) => session::init(channel, args, json).await,
        Command::Unlock(args) => session::unlock(channel, args, json).await,
        Command::Lock => session::lock(channel, json).await,
        Command::Status(args) => session::status(channel, args, json).await,
        Command::Tokens(args) => session::tokens(channel, args, json).await,
        Command::Token(cmd) => token::token(channel, cmd, json).await,
        Command::Secret(cmd) => secrets::secret(channel, cmd, json).await,
        Command::Ca(cmd) => pki::ca(channel, cmd, json).await,
        Command::Cert(cmd) => pki::cert(channel, cmd, json).await,
        Command::Cluster(cmd) => kube::cluster(channel, cmd, json).await,
        Command::Kubeconfig(args) => kube::kubeconfig(channel, args, &reach, json).await,
        Command::KubeCredential(args) => kube::kube_credential(channel, args).await,
        Command::Key(cmd) => keys::key(channel, cmd, json).await,
        Command::Sign(args) => keys::sign(channel, args, json).await,
        Command::SshCert(args) => ssh::ssh_cert(channel, args, json).await,
        Command::SshEnv => ssh::ssh_env(channel, json).await,
        Command::Policy(cmd) => trust::policy(channel, cmd, json).await,
        Command::Grant(cmd) => trust::grant(channel, cmd, json).await,
        Command::Client(cmd) => remote::client(channel, cmd, json).await,
        // Answered above, before connecting.
        Command::Audit(_) => Ok(()),
        Command::Run(args) => run::run(channel, args).await,
        Command::Inject(args) => inject::inject(channel, args, json).await,
        Command::KubeSecret(args) => kube_secret::kube_secret(channel, args, json).await,
    };
    // keyholderd closes the connection of any uid but its own; a root
    // daemon's socket reached by another user fails that way, whatever the
    // command was doing.
    let own = keyholder_proto::socket::own_uid();
    result.map_err(|f| match f.code {
        1 | 8 if peer != own => Failure::new(
            7,
            keyholder_proto::socket::ConnectError::other_uid_message(&socket, peer, own),
        ),
        _ => f,
    })
}

/// Whether `command` may go to a remote keyholderd: what issues, signs or
/// reads within the policy. Everything else (init, unlock, lock, policy,
/// grants, client certificates, and any command added later until it is
/// listed here) is for the daemon's own machine.
fn served_remotely(command: &Command) -> bool {
    matches!(
        command,
        Command::Status(_)
            | Command::Secret(_)
            | Command::Ca(_)
            | Command::Cluster(_)
            | Command::Kubeconfig(_)
            | Command::KubeCredential(_)
            | Command::Cert(_)
            | Command::Key(_)
            | Command::Sign(_)
            | Command::SshCert(_)
            | Command::Run(_)
            | Command::Inject(_)
            | Command::KubeSecret(_)
    )
}

/// Runs the `keyholder` command with the process's arguments: parses them,
/// talks to keyholderd, and returns the exit status (listed in `--help`).
pub fn main() -> ExitCode {
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
            if !f.message.is_empty() {
                eprintln!("keyholder: {}", f.message);
            }
            ExitCode::from(f.code)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn the_command_is_named_keyholder() {
        use clap::CommandFactory;
        assert_eq!(Cli::command().get_name(), "keyholder");
    }
}
