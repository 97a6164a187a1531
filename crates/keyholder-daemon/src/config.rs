//! `keyholderd` configuration: a TOML file, overridden by flags.
//!
//! Every key, its default and its meaning is listed in `docs/configuration.md`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// The longest `max_session_ttl` the configuration may set: 30 days.
pub const MAX_SESSION_TTL_LIMIT: Duration = Duration::from_secs(30 * 86400);
/// The most `clock_skew` the configuration may set: one day.
pub const MAX_CLOCK_SKEW: Duration = Duration::from_secs(86400);
/// The longest `token_poll_interval`: one hour.
pub const MAX_TOKEN_POLL_INTERVAL: Duration = Duration::from_secs(3600);

/// How keyholderd reaches its tokens.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenBackend {
    /// Through the PKCS#11 module `pkcs11_module` names.
    #[default]
    Pkcs11,
    /// YubiKeys natively: PIV over PC/SC, no module.
    Yubikey,
}

impl TokenBackend {
    /// The name the configuration and `--token-backend` use.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pkcs11 => "pkcs11",
            Self::Yubikey => "yubikey",
        }
    }
}

impl std::str::FromStr for TokenBackend {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "pkcs11" => Ok(Self::Pkcs11),
            "yubikey" => Ok(Self::Yubikey),
            other => Err(format!(
                "unknown token backend {other:?}: use \"pkcs11\" or \"yubikey\""
            )),
        }
    }
}

/// Where the vault is kept.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StorageKind {
    /// The local file `vault` (the default).
    #[default]
    File,
    /// An etcd cluster (`[etcd]`; docs/etcd.md).
    Etcd,
}

/// The etcd cluster's settings (`[etcd]` in the config file; docs/etcd.md).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EtcdConfig {
    /// Client endpoints, `HOST:PORT`.
    pub endpoints: Vec<String>,
    /// The key prefix the vault lives under (`/keyholder/vault/`).
    pub prefix: String,
    /// The CA that issued the etcd members' certificates (PEM file).
    pub ca_file: Option<PathBuf>,
    /// The client certificate keyholderd presents (PEM file).
    pub cert_file: Option<PathBuf>,
    /// Its private key (PEM file, mode 0600).
    pub key_file: Option<PathBuf>,
    /// The local read-only copy of the vault. Default: `vault` with
    /// `.etcd-copy` appended.
    pub local_copy: Option<PathBuf>,
    /// The deadline of each etcd call (`5s`).
    #[serde(deserialize_with = "de_duration")]
    pub timeout: Duration,
}

impl Default for EtcdConfig {
    fn default() -> Self {
        Self {
            endpoints: Vec::new(),
            prefix: "/keyholder/vault/".into(),
            ca_file: None,
            cert_file: None,
            key_file: None,
            local_copy: None,
            timeout: Duration::from_secs(5),
        }
    }
}

/// The most earlier values `secret_history` may keep per secret.
pub const MAX_SECRET_HISTORY: usize = 100;

/// The longest `pinentry_timeout`: ten minutes.
pub const MAX_PINENTRY_TIMEOUT: Duration = Duration::from_secs(600);

/// The daemon's settings.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// How tokens are reached: `pkcs11` (the default) or `yubikey`.
    pub token_backend: TokenBackend,
    /// Path of the PKCS#11 module. Required with the `pkcs11` backend; only
    /// this file, and those of `enrol_modules`, is ever loaded.
    pub pkcs11_module: Option<PathBuf>,
    /// Further PKCS#11 modules `keyholder token enrol --pkcs11-module` may
    /// name (absolute paths), loaded for the enrolment only (docs/team.md).
    pub enrol_modules: Vec<PathBuf>,
    /// Arguments for the module's `C_Initialize` (NSS softokn reads its
    /// database from them); none for most modules.
    pub pkcs11_init_args: Option<String>,
    /// Restricts which token `unlock` may use: a label, `serial:<serial>`,
    /// or a `pkcs11:` URI. Empty: whichever token holds the vault's key.
    pub token: Option<String>,
    /// The vault file.
    pub vault: PathBuf,
    /// The gRPC Unix socket.
    pub socket: PathBuf,
    /// Serve the ssh-agent protocol (true).
    pub ssh_agent: bool,
    /// The ssh-agent socket.
    pub ssh_agent_socket: PathBuf,
    /// Default session lifetime (`8h`).
    #[serde(deserialize_with = "de_duration")]
    pub session_ttl: Duration,
    /// Default idle timeout (`30m`).
    #[serde(deserialize_with = "de_duration")]
    pub idle_timeout: Duration,
    /// Longest session a client may ask for (`24h`).
    #[serde(deserialize_with = "de_duration")]
    pub max_session_ttl: Duration,
    /// How often the token is checked for presence (`2s`).
    #[serde(deserialize_with = "de_duration")]
    pub token_poll_interval: Duration,
    /// How far `notBefore` of issued certificates is backdated (`5m`).
    #[serde(deserialize_with = "de_duration")]
    pub clock_skew: Duration,
    /// Largest secret value in bytes (65536).
    pub max_secret_bytes: usize,
    /// Most secrets a vault may hold (100000).
    pub max_secrets: usize,
    /// Runtime worker threads; 0 (the default) means half the CPUs, at least one.
    pub serve_threads: usize,
    /// Client keys generated ahead of time while unlocked (64); 0 turns the
    /// stock off.
    pub key_stock: usize,
    /// Ask for the PIN through `pinentry` when a request finds the session
    /// locked, instead of failing (false). See docs/configuration.md.
    pub unlock_on_demand: bool,
    /// The pinentry program `unlock_on_demand` runs ("pinentry", from PATH).
    pub pinentry: PathBuf,
    /// How long an on-demand prompt waits for the PIN (`60s`).
    #[serde(deserialize_with = "de_duration")]
    pub pinentry_timeout: Duration,
    /// PEM certificates trusted, besides Yubico's roots, as roots for the
    /// attestation of a key enrolled at init (native YubiKey backend).
    pub attestation_roots: Option<PathBuf>,
    /// The audit log: a path, or `off`. Default: `audit.log` next to the
    /// vault file (docs/audit.md).
    pub audit_log: Option<String>,
    /// The audit log's active file is rotated past this size (64 MiB).
    pub audit_max_bytes: u64,
    /// Serve gRPC over TCP with mutual TLS on this address (off by
    /// default). See docs/remote.md.
    pub listen_tcp: Option<std::net::SocketAddr>,
    /// Settings of the TCP listener.
    pub tcp: TcpConfig,
    /// How many earlier values a secret keeps when it is replaced (5); 0
    /// keeps none.
    pub secret_history: usize,
    /// Serve Prometheus metrics on this loopback address (off by default).
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Where the vault is kept: `file` (the default) or `etcd`.
    pub storage: StorageKind,
    /// The etcd cluster, with `storage = "etcd"`.
    pub etcd: EtcdConfig,
}

/// The TCP listener's settings (`[tcp]` in the config file).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TcpConfig {
    /// The Keyholder X.509 CA whose client certificates are accepted
    /// ("admin-clients").
    pub client_ca: String,
    /// The CA that issues the listener's own certificate (the client CA
    /// when empty).
    pub server_ca: String,
    /// The names (DNS or IP) in the listener's certificate
    /// (["localhost", "127.0.0.1"]).
    pub server_names: Vec<String>,
    /// The listener certificate's lifetime (`24h`); it is renewed when a
    /// third is left, and made anew at every unlock.
    #[serde(deserialize_with = "de_duration")]
    pub server_cert_ttl: Duration,
    /// Most TCP connections at once (256); when all are taken, one that has
    /// not completed a handshake and a request gives way.
    pub max_connections: usize,
    /// Longest TLS handshake (`10s`).
    #[serde(deserialize_with = "de_duration")]
    pub handshake_timeout: Duration,
    /// Most concurrent HTTP/2 streams per connection (32).
    pub max_streams: u32,
}

impl Default for TcpConfig {
    fn default() -> Self {
        Self {
            client_ca: "admin-clients".into(),
            server_ca: String::new(),
            server_names: vec!["localhost".into(), "127.0.0.1".into()],
            server_cert_ttl: Duration::from_secs(24 * 3600),
            max_connections: 256,
            handshake_timeout: Duration::from_secs(10),
            max_streams: 32,
        }
    }
}

impl TcpConfig {
    /// The CA that issues the listener's certificate.
    pub fn server_ca(&self) -> &str {
        if self.server_ca.is_empty() {
            &self.client_ca
        } else {
            &self.server_ca
        }
    }
}

/// The smallest `audit_max_bytes`: 4 KiB.
pub const MIN_AUDIT_MAX_BYTES: u64 = 4096;

fn de_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    humantime::parse_duration(&s).map_err(serde::de::Error::custom)
}

// The runtime directory and the default sockets are shared with the CLI.
pub use keyholder_proto::socket::{default_agent_socket, default_socket, runtime_dir};

fn home() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/"))
}

fn xdg(var: &str, fallback: &str) -> PathBuf {
    match std::env::var_os(var) {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => home().join(fallback),
    }
}

/// `$XDG_CONFIG_HOME/keyholder/keyholderd.toml`.
pub fn default_config_file() -> PathBuf {
    xdg("XDG_CONFIG_HOME", ".config").join("keyholder/keyholderd.toml")
}

impl Default for Config {
    fn default() -> Self {
        Self {
            token_backend: TokenBackend::Pkcs11,
            pkcs11_module: None,
            enrol_modules: Vec::new(),
            pkcs11_init_args: None,
            token: None,
            vault: xdg("XDG_DATA_HOME", ".local/share").join("keyholder/vault.age"),
            socket: default_socket(),
            ssh_agent: true,
            ssh_agent_socket: default_agent_socket(),
            session_ttl: Duration::from_secs(8 * 3600),
            idle_timeout: Duration::from_secs(30 * 60),
            max_session_ttl: Duration::from_secs(24 * 3600),
            token_poll_interval: Duration::from_secs(2),
            clock_skew: Duration::from_secs(300),
            max_secret_bytes: 64 * 1024,
            max_secrets: 100_000,
            serve_threads: 0,
            key_stock: 64,
            unlock_on_demand: false,
            pinentry: PathBuf::from("pinentry"),
            pinentry_timeout: Duration::from_secs(60),
            attestation_roots: None,
            audit_log: None,
            audit_max_bytes: 64 << 20,
            listen_tcp: None,
            tcp: TcpConfig::default(),
            secret_history: 5,
            metrics_listen: None,
            storage: StorageKind::File,
            etcd: EtcdConfig::default(),
        }
    }
}

/// A configuration problem, reported before the daemon starts.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

impl Config {
    /// Reads `path`. A missing file is an error only when `required`.
    pub fn load(path: &Path, required: bool) -> Result<Self, ConfigError> {
        match std::fs::read_to_string(path) {
            Ok(text) => toml::from_str(&text)
                .map_err(|e| ConfigError(format!("config file {}: {e}", path.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => Ok(Self::default()),
            Err(e) => Err(ConfigError(format!("config file {}: {e}", path.display()))),
        }
    }

    /// How many runtime worker threads serve requests: `serve_threads`, or
    /// half the CPUs (at least one). Every client of the daemon runs on the
    /// same machine, so a daemon that takes every CPU competes with its own
    /// callers; see docs/configuration.md for the measurement.
    pub fn serve_thread_count(&self) -> usize {
        if self.serve_threads > 0 {
            return self.serve_threads;
        }
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        (cpus / 2).max(1)
    }

    /// The audit log's path: `audit_log`, or `audit.log` next to the vault;
    /// `None` when it is `off`.
    pub fn audit_log_path(&self) -> Option<PathBuf> {
        match self.audit_log.as_deref() {
            Some("off") => None,
            Some(p) if !p.is_empty() => Some(PathBuf::from(p)),
            _ => Some(
                self.vault
                    .parent()
                    .map_or_else(|| PathBuf::from("audit.log"), |d| d.join("audit.log")),
            ),
        }
    }

    /// The etcd client's settings, with `storage = "etcd"`.
    pub fn etcd_settings(&self) -> Option<keyholder_etcd::EtcdSettings> {
        if self.storage != StorageKind::Etcd {
            return None;
        }
        let e = &self.etcd;
        let copy = e.local_copy.clone().unwrap_or_else(|| {
            let mut p = self.vault.as_os_str().to_owned();
            p.push(".etcd-copy");
            PathBuf::from(p)
        });
        Some(keyholder_etcd::EtcdSettings {
            endpoints: e.endpoints.clone(),
            prefix: keyholder_etcd::normalize_prefix(&e.prefix),
            ca: e.ca_file.clone().unwrap_or_default(),
            cert: e.cert_file.clone().unwrap_or_default(),
            key: e.key_file.clone().unwrap_or_default(),
            cache: Some(copy),
            timeout: e.timeout,
        })
    }

    /// Checks values that TOML cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(m) = self.enrol_modules.iter().find(|m| !m.is_absolute()) {
            return Err(ConfigError(format!(
                "enrol_modules: {} is not an absolute path",
                m.display()
            )));
        }
        if self.token_backend == TokenBackend::Pkcs11 && self.pkcs11_module.is_none() {
            return Err(ConfigError(
                "no PKCS#11 module configured: pass --pkcs11-module PATH or set pkcs11_module in \
                 the config file (or --token-backend yubikey for YubiKeys without a module)"
                    .into(),
            ));
        }
        if self.session_ttl.is_zero() || self.idle_timeout.is_zero() {
            return Err(ConfigError(
                "session_ttl and idle_timeout must be above zero".into(),
            ));
        }
        if self.max_session_ttl > MAX_SESSION_TTL_LIMIT {
            return Err(ConfigError(format!(
                "max_session_ttl must be at most {}",
                humantime::format_duration(MAX_SESSION_TTL_LIMIT)
            )));
        }
        if self.session_ttl > self.max_session_ttl {
            return Err(ConfigError(
                "session_ttl is longer than max_session_ttl".into(),
            ));
        }
        if self.idle_timeout > self.max_session_ttl {
            return Err(ConfigError(
                "idle_timeout is longer than max_session_ttl".into(),
            ));
        }
        if self.clock_skew > MAX_CLOCK_SKEW {
            return Err(ConfigError(format!(
                "clock_skew must be at most {}",
                humantime::format_duration(MAX_CLOCK_SKEW)
            )));
        }
        if self.pinentry_timeout < Duration::from_secs(1)
            || self.pinentry_timeout > MAX_PINENTRY_TIMEOUT
        {
            return Err(ConfigError(
                "pinentry_timeout must be between 1s and 10m".into(),
            ));
        }
        if self.unlock_on_demand && self.pinentry.as_os_str().is_empty() {
            return Err(ConfigError(
                "unlock_on_demand needs a pinentry program".into(),
            ));
        }
        if self.audit_max_bytes < MIN_AUDIT_MAX_BYTES {
            return Err(ConfigError(format!(
                "audit_max_bytes must be at least {MIN_AUDIT_MAX_BYTES}"
            )));
        }
        if self.token_poll_interval < Duration::from_millis(100)
            || self.token_poll_interval > MAX_TOKEN_POLL_INTERVAL
        {
            return Err(ConfigError(
                "token_poll_interval must be between 100ms and 1h".into(),
            ));
        }
        if let Some(addr) = self.metrics_listen
            && !addr.ip().is_loopback()
        {
            return Err(ConfigError(format!(
                "metrics_listen {addr}: metrics are served on a loopback address only (they \
                 show activity, CA, cluster and key names); scrape through a local agent"
            )));
        }
        let tcp = &self.tcp;
        if tcp.max_connections == 0 || tcp.max_connections > 10_000 {
            return Err(ConfigError(
                "tcp.max_connections must be between 1 and 10000".into(),
            ));
        }
        if tcp.handshake_timeout.is_zero() || tcp.handshake_timeout > Duration::from_secs(120) {
            return Err(ConfigError(
                "tcp.handshake_timeout must be between 1ms and 2m".into(),
            ));
        }
        if tcp.max_streams == 0 || tcp.max_streams > 1000 {
            return Err(ConfigError(
                "tcp.max_streams must be between 1 and 1000".into(),
            ));
        }
        if tcp.server_cert_ttl < Duration::from_secs(60)
            || tcp.server_cert_ttl > Duration::from_secs(30 * 86400)
        {
            return Err(ConfigError(
                "tcp.server_cert_ttl must be between 1m and 30 days".into(),
            ));
        }
        if self.secret_history > MAX_SECRET_HISTORY {
            return Err(ConfigError(format!(
                "secret_history must be at most {MAX_SECRET_HISTORY}"
            )));
        }
        if self.storage == StorageKind::Etcd {
            let e = &self.etcd;
            if e.endpoints.is_empty() {
                return Err(ConfigError(
                    "storage = \"etcd\" needs etcd.endpoints (HOST:PORT of each member)".into(),
                ));
            }
            if e.ca_file.is_none() || e.cert_file.is_none() || e.key_file.is_none() {
                return Err(ConfigError(
                    "storage = \"etcd\" needs etcd.ca_file, etcd.cert_file and etcd.key_file \
                     (mutual TLS; docs/etcd.md)"
                        .into(),
                ));
            }
            if e.timeout < Duration::from_millis(100) || e.timeout > Duration::from_secs(120) {
                return Err(ConfigError(
                    "etcd.timeout must be between 100ms and 2m".into(),
                ));
            }
        }
        if self.listen_tcp.is_some() && (tcp.client_ca.is_empty() || tcp.server_names.is_empty()) {
            return Err(ConfigError(
                "listen_tcp needs tcp.client_ca and at least one name in tcp.server_names".into(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_values_parse_and_unknown_keys_are_refused() {
        let c: Config = toml::from_str(
            "pkcs11_module = \"/usr/lib/softhsm/libsofthsm2.so\"\nsession_ttl = \"2h\"\nidle_timeout = \"5m\"\n",
        )
        .unwrap();
        assert_eq!(c.session_ttl, Duration::from_secs(7200));
        assert_eq!(c.idle_timeout, Duration::from_secs(300));
        assert_eq!(c.max_secret_bytes, 64 * 1024);
        c.validate().unwrap();
        assert!(toml::from_str::<Config>("sesion_ttl = \"2h\"").is_err());
        // The native YubiKey backend needs no module; PKCS#11 does.
        let c: Config = toml::from_str("token_backend = \"yubikey\"").unwrap();
        assert_eq!(c.token_backend, TokenBackend::Yubikey);
        assert_eq!(c.attestation_roots, None);
        c.validate().unwrap();
        let c: Config = toml::from_str("attestation_roots = \"/etc/keyholder/roots.pem\"").unwrap();
        assert_eq!(
            c.attestation_roots.as_deref(),
            Some(Path::new("/etc/keyholder/roots.pem"))
        );
        let c: Config = toml::from_str("token_backend = \"pkcs11\"").unwrap();
        assert!(c.validate().is_err());
        assert!(toml::from_str::<Config>("token_backend = \"piv\"").is_err());
        assert_eq!("yubikey".parse(), Ok(TokenBackend::Yubikey));
        assert!("YubiKey".parse::<TokenBackend>().is_err());
        assert!(toml::from_str::<Config>("session_ttl = \"soon\"").is_err());
        // Durations beyond the documented maxima are refused, never used.
        for bad in [
            "max_session_ttl = \"31days\"",
            "idle_timeout = \"25h\"",
            "clock_skew = \"2days\"",
            "token_poll_interval = \"2h\"",
            "pinentry_timeout = \"1h\"",
            "unlock_on_demand = true\npinentry = \"\"",
            "max_session_ttl = \"500000years\"",
        ] {
            let mut c: Config = toml::from_str(bad).expect(bad);
            c.pkcs11_module = Some("/m.so".into());
            assert!(c.validate().is_err(), "{bad}");
        }
    }
}
