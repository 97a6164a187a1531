//! The CLI as a client of another machine's keyholderd, over TCP with
//! mutual TLS (`--remote`), and `keyholder client issue`, which makes the
//! key and certificate such a client presents (docs/remote.md).

use std::path::{Path, PathBuf};
use std::time::Duration;

use keyholder_proto::v1;
use tonic::transport::Channel;

use crate::failure::{CliResult, Failure, io_failure};
use crate::input::seconds;

/// Where a remote keyholderd is and how to authenticate to it.
#[derive(Clone, Debug)]
pub(crate) struct Remote {
    /// `https://HOST:PORT`.
    pub server: String,
    /// The client certificate (PEM).
    pub cert: PathBuf,
    /// Its private key (PEM).
    pub key: PathBuf,
    /// The CA that issued the server's certificate (PEM).
    pub server_ca: PathBuf,
}

impl Remote {
    /// Arguments that make another `keyholder` run reach the same server
    /// (for the kubectl exec plugin), with absolute paths.
    pub(crate) fn args(&self) -> CliResult<Vec<String>> {
        let abs = |p: &Path| -> CliResult<String> {
            std::fs::canonicalize(p)
                .map(|p| p.display().to_string())
                .map_err(|e| io_failure("cannot find", p, e))
        };
        Ok(vec![
            "--remote".into(),
            self.server.clone(),
            "--remote-cert".into(),
            abs(&self.cert)?,
            "--remote-key".into(),
            abs(&self.key)?,
            "--remote-ca".into(),
            abs(&self.server_ca)?,
        ])
    }

    /// Host and port from `https://HOST:PORT`.
    fn host_port(&self) -> CliResult<(String, u16)> {
        let bad = || {
            Failure::new(
                2,
                format!("--remote {:?}: expected https://HOST:PORT", self.server),
            )
        };
        let rest = self.server.strip_prefix("https://").ok_or_else(bad)?;
        let rest = rest.trim_end_matches('/');
        let (host, port) = rest.rsplit_once(':').ok_or_else(bad)?;
        let port: u16 = port.parse().map_err(|_| bad())?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return Err(bad());
        }
        Ok((host.to_owned(), port))
    }
}

/// `$XDG_CONFIG_HOME/keyholder/cli.toml` (`~/.config/...`).
pub(crate) fn config_file() -> PathBuf {
    let base = match std::env::var_os("XDG_CONFIG_HOME") {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/".into())).join(".config"),
    };
    base.join("keyholder/cli.toml")
}

/// The `[remote]` profile of the CLI's config file, if it has one: a
/// machine whose every `keyholder` command should go to another machine's
/// keyholderd (a bastion, a CI runner). Relative paths are taken from the
/// file's directory.
pub(crate) fn profile() -> CliResult<Option<Remote>> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct File {
        remote: Option<Profile>,
    }
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Profile {
        url: String,
        cert: PathBuf,
        key: PathBuf,
        ca: PathBuf,
    }
    let path = config_file();
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_failure("cannot read", &path, e)),
    };
    let file: File =
        toml::from_str(&text).map_err(|e| Failure::new(2, format!("{}: {e}", path.display())))?;
    let dir = path.parent().map(Path::to_owned).unwrap_or_default();
    Ok(file.remote.map(|p| Remote {
        server: p.url,
        cert: dir.join(p.cert),
        key: dir.join(p.key),
        server_ca: dir.join(p.ca),
    }))
}

fn read_pem(path: &Path) -> CliResult<Vec<u8>> {
    std::fs::read(path).map_err(|e| io_failure("cannot read", path, e))
}

/// Reads the client's private key, refusing (exit 6) one that others may
/// read or that belongs to another user, as ssh does: such a key may
/// already be someone else's too.
fn read_private_key(path: &Path) -> CliResult<zeroize::Zeroizing<Vec<u8>>> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).map_err(|e| io_failure("cannot read", path, e))?;
    if meta.mode() & 0o077 != 0 {
        return Err(Failure::new(
            6,
            format!(
                "{}: others may read it (mode {:o}); make it yours alone: chmod 600 {}",
                path.display(),
                meta.mode() & 0o777,
                path.display()
            ),
        ));
    }
    if meta.uid() != keyholder_proto::socket::own_uid() {
        return Err(Failure::new(
            6,
            format!("{}: belongs to another user", path.display()),
        ));
    }
    Ok(zeroize::Zeroizing::new(read_pem(path)?))
}

/// A channel to the remote keyholderd: TLS 1.3, the server checked against
/// `server_ca` and the host name, the client certificate presented.
pub(crate) async fn connect(remote: &Remote) -> CliResult<Channel> {
    use keyholder_proto::tls::{TlsError, client_config};
    let (host, port) = remote.host_port()?;
    let config = client_config(
        &read_pem(&remote.server_ca)?,
        &read_pem(&remote.cert)?,
        &read_private_key(&remote.key)?,
    )
    .map_err(|e| Failure::new(6, format!("--remote: {e}")))?;
    keyholder_proto::tls::connect(&host, port, config)
        .await
        .map_err(|e| match e {
            TlsError::Input(s) => Failure::new(6, format!("--remote: {s}")),
            TlsError::Unreachable(s) => Failure::new(
                8,
                format!("cannot reach keyholderd at {} ({s})", remote.server),
            ),
        })
}

/// `keyholder client` subcommands.
#[derive(clap::Subcommand, Debug)]
pub(crate) enum ClientCommand {
    /// Issue a key and certificate for a remote tool (a CI runner, a
    /// bastion) and write key.pem, cert.pem and server-ca.pem to DIR.
    Issue {
        /// The client CA (the daemon's tcp.client_ca).
        #[arg(long, default_value = "admin-clients")]
        ca: String,
        /// The CA of the daemon's listener certificate (tcp.server_ca;
        /// default: --ca).
        #[arg(long)]
        server_ca: Option<String>,
        /// The client's name: the certificate's common name, which policy
        /// matches (`clients = [...]`).
        #[arg(long)]
        name: String,
        /// Lifetime (default 8h): short lifetimes are how access ends.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "8h")]
        ttl: Duration,
        /// Where to write the files (created 0700; the key 0600).
        #[arg(long)]
        out_dir: PathBuf,
    },
}

/// Runs a `keyholder client` command.
pub(crate) async fn client(channel: Channel, cmd: ClientCommand, json: bool) -> CliResult {
    let ClientCommand::Issue {
        ca,
        server_ca,
        name,
        ttl,
        out_dir,
    } = cmd;
    let mut credentials = v1::credentials_client::CredentialsClient::new(channel.clone());
    let issued = credentials
        .issue_certificate(v1::IssueCertificateRequest {
            ca: ca.clone(),
            profile: "client".into(),
            common_name: name.clone(),
            ttl_seconds: seconds(Some(ttl)),
            ..Default::default()
        })
        .await?
        .into_inner();
    let server_ca_name = server_ca.unwrap_or_else(|| ca.clone());
    let server_ca_pem = if server_ca_name == ca {
        issued.ca_certificate_pem.clone()
    } else {
        v1::admin_client::AdminClient::new(channel)
            .get_ca(v1::GetCaRequest {
                name: server_ca_name,
            })
            .await?
            .into_inner()
            .certificate_pem
    };
    crate::output::create_private_dir(&out_dir)?;
    crate::output::write_private_file(&out_dir.join("key.pem"), issued.private_key_pem.as_bytes())?;
    crate::output::write_private_file(
        &out_dir.join("cert.pem"),
        issued.certificate_pem.as_bytes(),
    )?;
    crate::output::write_private_file(&out_dir.join("server-ca.pem"), server_ca_pem.as_bytes())?;
    if json {
        println!(
            "{}",
            serde_json::json!({
                "name": name,
                "serial": issued.serial,
                "not_after": crate::output::rfc3339(issued.not_after.as_ref()),
                "out_dir": out_dir.display().to_string(),
            })
        );
    } else {
        println!(
            "client {name:?}: serial {}, valid until {}; wrote key.pem, cert.pem and \
             server-ca.pem to {}",
            issued.serial,
            crate::output::when(issued.not_after.as_ref()),
            out_dir.display()
        );
    }
    Ok(())
}
