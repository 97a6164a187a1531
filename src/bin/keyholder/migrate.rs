//! `keyholder vault migrate`: moves the vault between a local file and
//! etcd (docs/etcd.md). It copies the encrypted vault and its kept backups
//! as they are: nothing is decrypted and no token is used, so it needs no
//! PIN, only access to both stores. Run it while no keyholderd writes the
//! source (a file vault is locked by its daemon: stop it first).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use keyholder_vault::{FileStorage, Storage, export_history};

/// Move the vault between a file and etcd, atomically and verified.
///
/// Every kept generation is copied (the generation history), the target
/// must be empty, the current version appears in it in one step, and both
/// are read back and compared before success is reported.
#[derive(Parser, Debug)]
#[command(name = "keyholder vault migrate", bin_name = "keyholder vault migrate")]
pub struct Args {
    /// Where the vault is now: a file path, or
    /// etcd://HOST:PORT[,HOST:PORT...]/PREFIX/
    #[arg(long)]
    from: String,
    /// Where it goes: a file path (which must not exist), or an etcd://
    /// address whose prefix is empty.
    #[arg(long)]
    to: String,
    /// The CA that issued the etcd members' certificates (PEM).
    #[arg(long, value_name = "FILE")]
    etcd_ca: Option<PathBuf>,
    /// The client certificate presented to etcd (PEM).
    #[arg(long, value_name = "FILE")]
    etcd_cert: Option<PathBuf>,
    /// Its private key (PEM, mode 0600).
    #[arg(long, value_name = "FILE")]
    etcd_key: Option<PathBuf>,
    /// The deadline of each etcd call.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    etcd_timeout: Duration,
}

fn open(place: &str, args: &Args) -> Result<Box<dyn Storage>, String> {
    if place.starts_with("etcd://") {
        let (endpoints, prefix) = keyholder_etcd::EtcdSettings::parse_url(place)?;
        let need = |f: &Option<PathBuf>, flag: &str| {
            f.clone()
                .ok_or_else(|| format!("{place} needs {flag} (etcd takes mutual TLS)"))
        };
        let settings = keyholder_etcd::EtcdSettings {
            endpoints,
            prefix,
            ca: need(&args.etcd_ca, "--etcd-ca")?,
            cert: need(&args.etcd_cert, "--etcd-cert")?,
            key: need(&args.etcd_key, "--etcd-key")?,
            cache: None,
            timeout: args.etcd_timeout,
        };
        Ok(Box::new(
            keyholder_etcd::EtcdStorage::open(settings).map_err(|e| e.to_string())?,
        ))
    } else {
        Ok(Box::new(
            FileStorage::open(&PathBuf::from(place)).map_err(|e| e.to_string())?,
        ))
    }
}

fn migrate(args: &Args) -> Result<String, String> {
    let from = open(&args.from, args)?;
    let history = export_history(from.as_ref()).map_err(|e| e.to_string())?;
    let Some((generation, current)) = history.last() else {
        return Err(format!("{} holds no vault", from.location()));
    };
    let to = open(&args.to, args)?;
    to.import(&history)
        .map_err(|e| format!("nothing was moved: {e}"))?;
    // Read back and compare: the current version, and every generation.
    let problem = |what: String| {
        format!(
            "the copy at {} does not match ({what}); the source {} is unchanged. Remove the copy and run again",
            to.location(),
            from.location()
        )
    };
    let (stored, _) = to
        .load()
        .map_err(|e| problem(e.to_string()))?
        .ok_or_else(|| problem("it holds no vault".into()))?;
    if stored != *current {
        return Err(problem("the current version differs".into()));
    }
    for (g, bytes) in &history {
        match to.load_backup(*g).map_err(|e| problem(e.to_string()))? {
            Some(b) if b == *bytes => {}
            _ => return Err(problem(format!("generation {g} differs or is missing"))),
        }
    }
    // The source must not have moved on meanwhile.
    match from.load() {
        Ok(Some((now, _))) if now == *current => {}
        _ => {
            return Err(format!(
                "{} changed while it was copied (is a keyholderd still writing it?); the copy at {} \
                 holds generation {generation}: remove it and run again with the daemons stopped",
                from.location(),
                to.location()
            ));
        }
    }
    let kept: Vec<String> = history.iter().map(|(g, _)| g.to_string()).collect();
    Ok(format!(
        "moved the vault from {} to {}: generation {generation}, generations kept {}; read back and verified",
        from.location(),
        to.location(),
        kept.join(", ")
    ))
}

/// Runs `keyholder vault migrate` with the arguments after `vault`.
pub fn main(argv: Vec<std::ffi::OsString>) -> ExitCode {
    let args = match Args::try_parse_from(argv) {
        Ok(a) => a,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    match migrate(&args) {
        Ok(report) => {
            println!("{report}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("keyholder: vault migrate: {e}");
            ExitCode::from(1)
        }
    }
}
