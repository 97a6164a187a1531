//! `keyholderd`: the Keyholder daemon. Flag parsing and wiring only; the
//! work is in the `keyholder-daemon` crate.

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;

/// Every block keyholderd frees is zeroed first: secrets pass through
/// buffers Keyholder does not own (HTTP/2 frames, protobuf decoding, serde),
/// and a wipe on free is what leaves none of them behind after a lock.
#[global_allocator]
static ALLOCATOR: zeroizing_alloc::ZeroAlloc<std::alloc::System> =
    zeroizing_alloc::ZeroAlloc(std::alloc::System);
use keyholder_daemon::{
    Config, StartError, bind_socket, config, harden_process, open, raise_open_file_limit, run,
};

/// Keyholder daemon: keeps the vault, opens it through a token session
/// (PKCS#11, or a YubiKey natively), and serves the keyholder.v1 gRPC API on a Unix socket.
///
/// Settings come from the config file (default
/// $XDG_CONFIG_HOME/keyholder/keyholderd.toml); flags override it.
///
/// Exit status: 0 after a clean shutdown (SIGTERM, SIGINT); 1 on a runtime
/// failure; 2 on a usage or configuration error (including a PKCS#11 module
/// that cannot be loaded); 3 when the vault or the socket is in use by
/// another keyholderd.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Config file (TOML). Default: $XDG_CONFIG_HOME/keyholder/keyholderd.toml, if present.
    #[arg(long)]
    config: Option<PathBuf>,
    /// How tokens are reached: pkcs11 (through --pkcs11-module; the
    /// default) or yubikey (YubiKeys natively over PC/SC, no module).
    #[arg(long, value_name = "pkcs11|yubikey")]
    token_backend: Option<config::TokenBackend>,
    /// The PKCS#11 module to load (e.g. /usr/lib/softhsm/libsofthsm2.so).
    /// Only this file is ever loaded (and, for `keyholder token enrol`, the
    /// config file's `enrol_modules`); no request can name another.
    #[arg(long)]
    pkcs11_module: Option<PathBuf>,
    /// Arguments for the module's C_Initialize, for modules that need them:
    /// NSS softokn takes "configdir='sql:DIR' certPrefix='' keyPrefix=''
    /// secmod='secmod.db' flags=".
    #[arg(long)]
    pkcs11_init_args: Option<String>,
    /// Restrict unlock to one token: a label, serial:<serial>, or a pkcs11: URI.
    #[arg(long)]
    token: Option<String>,
    /// The vault file. Default: $XDG_DATA_HOME/keyholder/vault.age.
    #[arg(long)]
    vault: Option<PathBuf>,
    /// The gRPC socket. Default: $XDG_RUNTIME_DIR/keyholder/keyholder.sock.
    #[arg(long, env = "KEYHOLDER_SOCKET")]
    socket: Option<PathBuf>,
    /// The ssh-agent socket. Default: $XDG_RUNTIME_DIR/keyholder/ssh-agent.sock.
    #[arg(long)]
    ssh_agent_socket: Option<PathBuf>,
    /// Do not serve the ssh-agent protocol.
    #[arg(long)]
    no_ssh_agent: bool,
    /// Default session lifetime, e.g. 8h.
    #[arg(long, value_parser = humantime::parse_duration)]
    session_ttl: Option<Duration>,
    /// Lock after this long without a request, e.g. 30m.
    #[arg(long, value_parser = humantime::parse_duration)]
    idle_timeout: Option<Duration>,
    /// How often to check that the token is still there, e.g. 2s.
    #[arg(long, value_parser = humantime::parse_duration)]
    token_poll_interval: Option<Duration>,
    /// Largest secret value in bytes.
    #[arg(long)]
    max_secret_bytes: Option<usize>,
    /// Worker threads serving requests (default: half the CPUs, at least 1).
    #[arg(long)]
    serve_threads: Option<usize>,
    /// Client keys generated ahead of time while unlocked (default 64; 0: none).
    #[arg(long)]
    key_stock: Option<usize>,
    /// Ask for the PIN through pinentry when a request finds the session
    /// locked (off by default; see docs/configuration.md for the trade-off).
    #[arg(long)]
    unlock_on_demand: bool,
    /// The pinentry program for --unlock-on-demand (default: pinentry from PATH).
    #[arg(long)]
    pinentry: Option<PathBuf>,
    /// How long an on-demand PIN prompt waits, e.g. 60s.
    #[arg(long, value_parser = humantime::parse_duration)]
    pinentry_timeout: Option<Duration>,
    /// PEM file of extra roots for YubiKey attestation at init (a test
    /// root, or an organisation's own f9 issuer).
    #[arg(long, value_name = "FILE")]
    attestation_roots: Option<PathBuf>,
    /// Serve gRPC over TCP with mutual TLS on this address, e.g.
    /// 127.0.0.1:7443 (off by default; see docs/remote.md).
    #[arg(long)]
    listen_tcp: Option<std::net::SocketAddr>,
    /// Serve Prometheus metrics on this loopback address, e.g.
    /// 127.0.0.1:9464 (off by default).
    #[arg(long)]
    metrics_listen: Option<std::net::SocketAddr>,
    /// The audit log file, or "off" (default: audit.log next to the vault;
    /// see docs/audit.md).
    #[arg(long, value_name = "PATH|off")]
    audit_log: Option<String>,
    /// Log filter (tracing syntax), e.g. info or keyholder_daemon=debug.
    #[arg(long, env = "KEYHOLDER_LOG", default_value = "info")]
    log: String,
}

fn settings(args: &Args) -> Result<Config, config::ConfigError> {
    let mut cfg = match &args.config {
        Some(path) => Config::load(path, true)?,
        None => Config::load(&config::default_config_file(), false)?,
    };
    if let Some(v) = args.token_backend {
        cfg.token_backend = v;
    }
    if let Some(v) = &args.pkcs11_module {
        cfg.pkcs11_module = Some(v.clone());
    }
    if let Some(v) = &args.pkcs11_init_args {
        cfg.pkcs11_init_args = Some(v.clone());
    }
    if let Some(v) = &args.token {
        cfg.token = Some(v.clone());
    }
    if let Some(v) = &args.vault {
        cfg.vault = v.clone();
    }
    if let Some(v) = &args.socket {
        cfg.socket = v.clone();
    }
    if let Some(v) = &args.ssh_agent_socket {
        cfg.ssh_agent_socket = v.clone();
    }
    if args.no_ssh_agent {
        cfg.ssh_agent = false;
    }
    if let Some(v) = args.session_ttl {
        cfg.session_ttl = v;
    }
    if let Some(v) = args.idle_timeout {
        cfg.idle_timeout = v;
    }
    if let Some(v) = args.token_poll_interval {
        cfg.token_poll_interval = v;
    }
    if let Some(v) = args.max_secret_bytes {
        cfg.max_secret_bytes = v;
    }
    if let Some(v) = args.serve_threads {
        cfg.serve_threads = v;
    }
    if let Some(v) = args.key_stock {
        cfg.key_stock = v;
    }
    if args.unlock_on_demand {
        cfg.unlock_on_demand = true;
    }
    if let Some(v) = &args.pinentry {
        cfg.pinentry = v.clone();
    }
    if let Some(v) = args.pinentry_timeout {
        cfg.pinentry_timeout = v;
    }
    if let Some(v) = &args.attestation_roots {
        cfg.attestation_roots = Some(v.clone());
    }
    if let Some(v) = args.listen_tcp {
        cfg.listen_tcp = Some(v);
    }
    if let Some(v) = args.metrics_listen {
        cfg.metrics_listen = Some(v);
    }
    if let Some(v) = &args.audit_log {
        cfg.audit_log = Some(v.clone());
    }
    cfg.validate()?;
    Ok(cfg)
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers; stop keyholderd with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

fn main() -> ExitCode {
    // Before anything else, so no secret ever lives in a dumpable process.
    let hardened = harden_process();
    let args = Args::parse();
    let filter =
        tracing_subscriber::EnvFilter::try_new(format!("{},cryptoki::mechanism=off", args.log))
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    if let Err(e) = hardened {
        tracing::error!(error = %e, "cannot disable core dumps / make the process non-dumpable");
        return ExitCode::from(1);
    }
    // Connections are capped per socket (256 agent, 512 gRPC, less under a
    // low limit); the common soft limit of 1,024 descriptors is raised to
    // the hard limit so that they and the token's files fit.
    let (soft, hard) = raise_open_file_limit();
    tracing::debug!(soft = ?soft, hard = ?hard, "open file limit");
    if soft.is_some_and(|s| s < 1024) {
        tracing::warn!(
            limit = ?soft,
            "the open file limit is low; idle connections are closed when descriptors run out"
        );
    }
    let core = match settings(&args).map_err(StartError::from).and_then(open) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("keyholderd: {e}");
            return ExitCode::from(e.exit_code());
        }
    };
    let cfg = core.config.clone();
    let module_path = match cfg.token_backend {
        config::TokenBackend::Pkcs11 => cfg.pkcs11_module.clone().unwrap_or_default(),
        config::TokenBackend::Yubikey => PathBuf::new(),
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cfg.serve_thread_count())
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("keyholderd: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let socket = cfg.socket.clone();
    runtime.block_on(async move {
        let listener = match bind_socket(&socket) {
            Ok(l) => l,
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
                eprintln!("keyholderd: {e}");
                return ExitCode::from(3);
            }
            Err(e) => {
                eprintln!("keyholderd: cannot listen on {}: {e}", socket.display());
                return ExitCode::from(1);
            }
        };
        let agent = if cfg.ssh_agent {
            match bind_socket(&cfg.ssh_agent_socket) {
                Ok(l) => Some(l),
                Err(e) => {
                    eprintln!(
                        "keyholderd: cannot listen on {}: {e}",
                        cfg.ssh_agent_socket.display()
                    );
                    let _ = std::fs::remove_file(&socket);
                    return ExitCode::from(if e.kind() == std::io::ErrorKind::AddrInUse {
                        3
                    } else {
                        1
                    });
                }
            }
        } else {
            None
        };
        let agent_socket = cfg.ssh_agent.then(|| cfg.ssh_agent_socket.clone());
        tracing::info!(
            agent = ?agent_socket,
            socket = %socket.display(),
            vault = %cfg.vault.display(),
            backend = cfg.token_backend.as_str(),
            module = %module_path.display(),
            audit = ?cfg.audit_log_path(),
            "keyholderd serving"
        );
        let result = run(core, listener, agent, shutdown_signal()).await;
        for path in std::iter::once(&socket).chain(agent_socket.as_ref()) {
            if let Err(e) = std::fs::remove_file(path) {
                tracing::warn!(error = %e, path = %path.display(), "cannot remove a socket file");
            }
        }
        match result {
            Ok(()) => {
                tracing::info!("stopped");
                ExitCode::SUCCESS
            }
            Err(e) => {
                tracing::error!(error = %e, "server failed");
                ExitCode::from(1)
            }
        }
    })
}
