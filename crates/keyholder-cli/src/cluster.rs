//! `keyholder cluster pki` and `keyholder cluster certs`: a whole cluster's
//! certificates, keys and kubeconfigs in kubeadm's layout, and their expiry.
//!
//! keyholderd decides what is issued for whom; this side reads the spec,
//! tells the daemon what is on disk (SHA-256 of each file under the output
//! directory) and writes the files it gets back.

use std::collections::{BTreeMap, HashMap};
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, SystemTime};

use keyholder_proto::v1;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tonic::transport::Channel;

use crate::failure::{CliResult, Failure, io_failure};
use crate::input::seconds;
use crate::output::{create_private_dir, rfc3339, when};

/// The exit status of `cluster certs` when a certificate expires within the window.
pub(crate) const EXPIRING: u8 = 11;
/// The default window of `cluster certs`.
const DEFAULT_WINDOW: Duration = Duration::from_secs(30 * 86400);
/// Most files looked at under the output directory.
const MAX_FILES: usize = 10_000;
/// Files larger than this are not hashed (nothing Keyholder writes is).
const MAX_FILE_BYTES: u64 = 1 << 20;

/// `keyholder cluster pki` arguments.
#[derive(clap::Args, Debug)]
pub(crate) struct PkiArgs {
    /// The cluster's name (CAs default to NAME-ca, NAME-etcd-ca,
    /// NAME-front-proxy-ca; a cluster profile NAME is added if missing).
    name: String,
    /// The cluster spec (TOML; docs/kubernetes.md). Default: the last run's.
    #[arg(long)]
    spec: Option<PathBuf>,
    /// Where to write (kubeadm's layout: pki/, pki/etcd/, *.conf, nodes/NAME/).
    /// Default: the last run's.
    #[arg(long)]
    out_dir: Option<PathBuf>,
    /// Re-issue only the recorded certificates that expire within --before.
    #[arg(long)]
    renew: bool,
    /// The renewal window (default 30d, or a third of a certificate's
    /// lifetime when that is shorter).
    #[arg(long, value_parser = humantime::parse_duration)]
    before: Option<Duration>,
    /// Overwrite files Keyholder did not write.
    #[arg(long)]
    force: bool,
    /// A control-plane host: NAME=ADDRESS[,ADDRESS...] (repeatable; adds to --spec).
    #[arg(long = "control-plane", value_name = "NAME=ADDRESSES")]
    control_plane: Vec<String>,
    /// A worker node: NAME=ADDRESS[,ADDRESS...] (repeatable).
    #[arg(long = "worker", value_name = "NAME=ADDRESSES")]
    workers: Vec<String>,
    /// An etcd member: NAME=ADDRESS[,ADDRESS...] (repeatable).
    #[arg(long = "etcd", value_name = "NAME=ADDRESSES")]
    etcd: Vec<String>,
    /// The service CIDR's first address (e.g. 10.96.0.1).
    #[arg(long)]
    service_ip: Option<String>,
    /// The cluster domain (default cluster.local).
    #[arg(long)]
    domain: Option<String>,
    /// The API server URL in kubeconfigs (default https://FIRST-CONTROL-PLANE:6443).
    #[arg(long)]
    server: Option<String>,
    /// A lifetime: DURATION for every certificate, or COMPONENT=DURATION (repeatable).
    #[arg(long = "lifetime", value_name = "[COMPONENT=]DURATION")]
    lifetimes: Vec<String>,
}

/// `keyholder cluster certs` arguments.
#[derive(clap::Args, Debug)]
pub(crate) struct CertsArgs {
    /// The cluster's name.
    name: String,
    /// Exit 11 if a certificate expires within this (default 30d).
    #[arg(long, value_parser = humantime::parse_duration)]
    expiring_within: Option<Duration>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct HostFile {
    name: String,
    #[serde(default)]
    addresses: Vec<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct CasFile {
    cluster: Option<String>,
    etcd: Option<String>,
    front_proxy: Option<String>,
}

/// The spec file.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct SpecFile {
    server: Option<String>,
    service_ip: Option<String>,
    domain: Option<String>,
    #[serde(default)]
    apiserver_sans: Vec<String>,
    key_algorithm: Option<String>,
    service_account_key_algorithm: Option<String>,
    #[serde(default)]
    cas: CasFile,
    /// `default` or a component, to a duration ("8760h").
    #[serde(default)]
    lifetimes: BTreeMap<String, String>,
    #[serde(default)]
    control_plane: Vec<HostFile>,
    #[serde(default)]
    workers: Vec<HostFile>,
    #[serde(default)]
    etcd: Vec<HostFile>,
}

fn duration_seconds(what: &str, s: &str) -> CliResult<u64> {
    humantime::parse_duration(s)
        .map(|d| d.as_secs())
        .map_err(|e| Failure::new(2, format!("{what}: {s:?} is not a duration ({e})")))
}

fn host_flag(s: &str) -> CliResult<v1::ClusterHost> {
    let (name, addrs) = s.split_once('=').unwrap_or((s, ""));
    Ok(v1::ClusterHost {
        name: name.to_owned(),
        addresses: addrs
            .split(',')
            .filter(|a| !a.is_empty())
            .map(str::to_owned)
            .collect(),
    })
}

fn hosts(v: Vec<HostFile>) -> Vec<v1::ClusterHost> {
    v.into_iter()
        .map(|h| v1::ClusterHost {
            name: h.name,
            addresses: h.addresses,
        })
        .collect()
}

/// The spec from --spec and the flags; `None` when neither says anything
/// (the daemon then uses the last run's).
fn spec(args: &PkiArgs) -> CliResult<Option<v1::ClusterPkiSpec>> {
    let flags = !(args.control_plane.is_empty()
        && args.workers.is_empty()
        && args.etcd.is_empty()
        && args.service_ip.is_none()
        && args.domain.is_none()
        && args.server.is_none()
        && args.lifetimes.is_empty());
    let file = match &args.spec {
        Some(path) => {
            let text =
                std::fs::read_to_string(path).map_err(|e| io_failure("cannot read", path, e))?;
            toml::from_str::<SpecFile>(&text)
                .map_err(|e| Failure::new(6, format!("{}: {e}", path.display())))?
        }
        None if !flags => return Ok(None),
        None => SpecFile::default(),
    };
    let mut lifetimes = HashMap::new();
    let mut lifetime_seconds = 0;
    for (k, v) in &file.lifetimes {
        let s = duration_seconds(&format!("lifetimes.{k}"), v)?;
        if k == "default" {
            lifetime_seconds = s;
        } else {
            lifetimes.insert(k.clone(), s);
        }
    }
    for l in &args.lifetimes {
        match l.split_once('=') {
            Some((k, v)) => {
                lifetimes.insert(k.to_owned(), duration_seconds("--lifetime", v)?);
            }
            None => lifetime_seconds = duration_seconds("--lifetime", l)?,
        }
    }
    let mut spec = v1::ClusterPkiSpec {
        server: args.server.clone().or(file.server).unwrap_or_default(),
        control_plane: hosts(file.control_plane),
        workers: hosts(file.workers),
        etcd: hosts(file.etcd),
        service_ip: args
            .service_ip
            .clone()
            .or(file.service_ip)
            .unwrap_or_default(),
        domain: args.domain.clone().or(file.domain).unwrap_or_default(),
        apiserver_sans: file.apiserver_sans,
        cluster_ca: file.cas.cluster.unwrap_or_default(),
        etcd_ca: file.cas.etcd.unwrap_or_default(),
        front_proxy_ca: file.cas.front_proxy.unwrap_or_default(),
        lifetime_seconds,
        lifetimes,
        key_algorithm: file.key_algorithm.unwrap_or_default(),
        service_account_key_algorithm: file.service_account_key_algorithm.unwrap_or_default(),
    };
    for h in &args.control_plane {
        spec.control_plane.push(host_flag(h)?);
    }
    for h in &args.workers {
        spec.workers.push(host_flag(h)?);
    }
    for h in &args.etcd {
        spec.etcd.push(host_flag(h)?);
    }
    Ok(Some(spec))
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Relative path (with `/`) to SHA-256 of every regular file under `dir`
/// (not following symbolic links), bounded in count and size.
fn hash_tree(dir: &Path) -> CliResult<HashMap<String, String>> {
    let mut out = HashMap::new();
    let mut stack = vec![(dir.to_path_buf(), String::new())];
    let mut seen = 0usize;
    while let Some((path, rel)) = stack.pop() {
        let entries = match std::fs::read_dir(&path) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io_failure("cannot read", &path, e)),
        };
        for entry in entries {
            let entry = entry.map_err(|e| io_failure("cannot read", &path, e))?;
            seen += 1;
            if seen > MAX_FILES {
                return Err(Failure::new(
                    6,
                    format!("{} holds over {MAX_FILES} files", dir.display()),
                ));
            }
            let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            let child = if rel.is_empty() {
                name
            } else {
                format!("{rel}/{name}")
            };
            let meta = entry
                .file_type()
                .map_err(|e| io_failure("cannot read", &entry.path(), e))?;
            if meta.is_dir() {
                stack.push((entry.path(), child));
            } else if meta.is_file() {
                let p = entry.path();
                let len = entry.metadata().map(|m| m.len()).unwrap_or(0);
                if len > MAX_FILE_BYTES {
                    // Not something Keyholder wrote: its hash matches nothing.
                    out.insert(child, "large".into());
                    continue;
                }
                let bytes = std::fs::read(&p).map_err(|e| io_failure("cannot read", &p, e))?;
                out.insert(child, sha256_hex(&bytes));
            } else {
                out.insert(child, "not a regular file".into());
            }
        }
    }
    Ok(out)
}

/// `rel` under `dir`, refusing anything but plain relative components.
fn under(dir: &Path, rel: &str) -> CliResult<PathBuf> {
    let p = Path::new(rel);
    if rel.is_empty() || !p.components().all(|c| matches!(c, Component::Normal(_))) {
        return Err(Failure::new(
            1,
            format!("keyholderd sent a bad path {rel:?}"),
        ));
    }
    Ok(dir.join(p))
}

/// How many files are flushed to disk at once: concurrent fsyncs share the
/// filesystem's journal commits, which one at a time cost most of a run.
const SYNC_THREADS: usize = 8;

/// Files open at once while writing (well under the usual 1024 descriptors).
const WRITE_BATCH: usize = 256;

/// Writes each `(path, bytes, private)` through a temporary file and a
/// rename, with mode 0600 (keys, kubeconfigs) or 0644; missing directories
/// are made 0700. Files are written in batches, each batch flushed to disk
/// before its files are renamed into place.
fn write_files(files: &[(PathBuf, &[u8], bool)]) -> CliResult {
    files.chunks(WRITE_BATCH).try_for_each(write_batch)
}

fn write_batch(files: &[(PathBuf, &[u8], bool)]) -> CliResult {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut written = Vec::with_capacity(files.len());
    for (path, bytes, private) in files {
        if let Some(parent) = path.parent() {
            create_private_dir(parent)?;
        }
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".keyholder-tmp");
        let tmp = PathBuf::from(tmp);
        let _ = std::fs::remove_file(&tmp);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(if *private { 0o600 } else { 0o644 })
            .open(&tmp)
            .map_err(|e| io_failure("cannot write", &tmp, e))?;
        f.write_all(bytes)
            .map_err(|e| io_failure("cannot write", &tmp, e))?;
        written.push((f, tmp, path));
    }
    let chunk = written.len().div_ceil(SYNC_THREADS).max(1);
    std::thread::scope(|scope| {
        let workers: Vec<_> = written
            .chunks(chunk)
            .map(|part| {
                scope.spawn(move || {
                    for (f, tmp, _) in part {
                        f.sync_all()
                            .map_err(|e| io_failure("cannot write", tmp, e))?;
                    }
                    Ok(())
                })
            })
            .collect();
        workers.into_iter().try_for_each(|w| {
            w.join()
                .unwrap_or_else(|_| Err(Failure::new(1, "a file writer failed")))
        })
    })?;
    for (_, tmp, path) in &written {
        std::fs::rename(tmp, path).map_err(|e| io_failure("cannot write", path, e))?;
    }
    Ok(())
}

/// `p` made absolute, without `.` components (so `./pki` is recorded as
/// the same directory however it is named next time).
fn absolute(p: &Path) -> CliResult<PathBuf> {
    let full = if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir()
            .map(|d| d.join(p))
            .map_err(|e| Failure::new(1, format!("cannot find the current directory: {e}")))?
    };
    Ok(full
        .components()
        .filter(|c| !matches!(c, Component::CurDir))
        .collect())
}

/// A window as `--before` takes it back: whole days, hours or seconds.
fn short_duration(d: Duration) -> String {
    let s = d.as_secs();
    if s > 0 && s.is_multiple_of(86400) {
        format!("{}d", s / 86400)
    } else if s > 0 && s.is_multiple_of(3600) {
        format!("{}h", s / 3600)
    } else {
        format!("{s}s")
    }
}

/// Prints `text` to stdout; a reader that went away (`| head`) is not an error.
fn print(text: &str) -> CliResult {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(Failure::new(1, format!("cannot write to stdout: {e}")))
        }
        _ => Ok(()),
    }
}

fn cert_json(c: &v1::ClusterCert) -> serde_json::Value {
    let left = c
        .not_after
        .and_then(|t| SystemTime::try_from(t).ok())
        .map(|t| {
            t.duration_since(SystemTime::now())
                .map(|d| d.as_secs() as i64)
                .unwrap_or_else(|e| -(e.duration().as_secs() as i64))
        });
    let mut v = serde_json::json!({
        "id": c.id,
        "component": c.component,
        "ca": c.ca,
        "subject": c.subject,
        "serial": c.serial,
        "not_before": rfc3339(c.not_before.as_ref()),
        "not_after": rfc3339(c.not_after.as_ref()),
        "seconds_left": left,
        "files": c.files,
    });
    if !c.action.is_empty() {
        v["action"] = c.action.clone().into();
        v["reason"] = c.reason.clone().into();
    }
    v
}

pub(crate) async fn pki(channel: Channel, args: PkiArgs, json: bool) -> CliResult {
    let mut admin = v1::admin_client::AdminClient::new(channel);
    let spec = spec(&args)?;
    // What was written last time, to send only what differs from it.
    let listed = match admin
        .list_cluster_certs(v1::ListClusterCertsRequest {
            name: args.name.clone(),
        })
        .await
    {
        Ok(r) => Some(r.into_inner()),
        Err(s) if s.code() == tonic::Code::NotFound => None,
        // A policy that allows `admin` but not `list`: every hash is sent.
        Err(s) if s.code() == tonic::Code::PermissionDenied && args.out_dir.is_some() => None,
        Err(s) => return Err(s.into()),
    };
    let out_dir = match (&args.out_dir, &listed) {
        (Some(d), _) => absolute(d)?,
        (None, Some(l)) => PathBuf::from(&l.out_dir),
        (None, None) => {
            return Err(Failure::new(
                4,
                format!(
                    "no cluster PKI {:?} yet: give --spec and --out-dir",
                    args.name
                ),
            ));
        }
    };
    let out_dir_text = out_dir
        .to_str()
        .ok_or_else(|| Failure::new(6, "--out-dir must be UTF-8"))?
        .to_owned();
    let mut on_disk = hash_tree(&out_dir)?;
    let mut missing = Vec::new();
    if let Some(l) = listed.filter(|l| l.out_dir == out_dir_text) {
        for (path, hash) in l.written {
            match on_disk.get(&path) {
                None => missing.push(path),
                Some(h) if *h == hash => {
                    on_disk.remove(&path);
                }
                Some(_) => {}
            }
        }
    }
    let response = admin
        .cluster_pki(v1::ClusterPkiRequest {
            name: args.name.clone(),
            spec,
            out_dir: out_dir_text,
            on_disk,
            renew_before_seconds: seconds(args.before),
            renew: args.renew,
            force: args.force,
            missing,
        })
        .await?
        .into_inner();
    let files = response
        .files
        .iter()
        .map(|f| Ok((under(&out_dir, &f.path)?, f.content.as_slice(), f.private)))
        .collect::<CliResult<Vec<_>>>()?;
    write_files(&files)?;
    let issued = response
        .certs
        .iter()
        .filter(|c| c.action == "issued")
        .count();
    let kept = response.certs.len() - issued;
    if json {
        println!(
            "{}",
            serde_json::json!({
                "cluster": args.name,
                "out_dir": response.out_dir,
                "issued": issued,
                "kept": kept,
                "files_written": response.files.iter().map(|f| &f.path).collect::<Vec<_>>(),
                "certificates": response.certs.iter().map(cert_json).collect::<Vec<_>>(),
                "generation": response.generation,
            })
        );
    } else {
        let mut text = String::new();
        for c in response.certs.iter().filter(|c| c.action == "issued") {
            text.push_str(&format!(
                "issued {} ({}): {}, expires {}\n",
                c.id,
                c.reason,
                c.subject,
                when(c.not_after.as_ref())
            ));
        }
        text.push_str(&format!(
            "{}: {issued} certificates issued, {kept} kept, {} files written to {}\n",
            args.name,
            response.files.len(),
            response.out_dir
        ));
        print(&text)?;
    }
    Ok(())
}

pub(crate) async fn certs(channel: Channel, args: CertsArgs, json: bool) -> CliResult {
    let mut admin = v1::admin_client::AdminClient::new(channel);
    let list = admin
        .list_cluster_certs(v1::ListClusterCertsRequest {
            name: args.name.clone(),
        })
        .await?
        .into_inner();
    let window = args.expiring_within.unwrap_or(DEFAULT_WINDOW);
    let limit = SystemTime::now()
        .checked_add(window)
        .ok_or_else(|| Failure::new(2, "--expiring-within is too long"))?;
    let expiring = |c: &v1::ClusterCert| {
        c.not_after
            .and_then(|t| SystemTime::try_from(t).ok())
            .is_none_or(|t| t <= limit)
    };
    let n = list.certs.iter().filter(|c| expiring(c)).count();
    if json {
        let certs: Vec<_> = list
            .certs
            .iter()
            .map(|c| {
                let mut v = cert_json(c);
                v["expiring"] = expiring(c).into();
                v
            })
            .collect();
        println!(
            "{}",
            serde_json::json!({
                "cluster": args.name,
                "out_dir": list.out_dir,
                "window_seconds": window.as_secs(),
                "expiring": n,
                "certificates": certs,
            })
        );
    } else {
        let mut text = String::new();
        for c in &list.certs {
            text.push_str(&format!(
                "{}{}\t{}\t{}\t{}\n",
                if expiring(c) { "! " } else { "" },
                c.id,
                c.subject,
                when(c.not_after.as_ref()),
                c.files.join(",")
            ));
        }
        print(&text)?;
    }
    if n > 0 {
        return Err(Failure::new(
            EXPIRING,
            format!(
                "{n} certificate(s) of {} expire within {}: run `keyholder cluster pki {} --renew --before {}`",
                args.name,
                short_duration(window),
                args.name,
                short_duration(window)
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_from_the_daemon_stay_under_the_directory() {
        let d = Path::new("/tmp/x");
        assert_eq!(
            under(d, "pki/ca.crt").unwrap(),
            Path::new("/tmp/x/pki/ca.crt")
        );
        for bad in ["", "../x", "/etc/passwd", "pki/../../x", "./a"] {
            assert!(under(d, bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn windows_print_as_before_takes_them() {
        assert_eq!(short_duration(Duration::from_secs(30 * 86400)), "30d");
        assert_eq!(short_duration(Duration::from_secs(3 * 3600)), "3h");
        assert_eq!(short_duration(Duration::from_secs(90)), "90s");
        assert_eq!(absolute(Path::new("/a/./b/.")).unwrap(), Path::new("/a/b"));
    }

    #[test]
    fn host_flags_split_names_and_addresses() {
        let h = host_flag("cp-1=10.0.0.1,cp-1.example").unwrap();
        assert_eq!(h.name, "cp-1");
        assert_eq!(h.addresses, ["10.0.0.1", "cp-1.example"]);
        assert!(host_flag("w").unwrap().addresses.is_empty());
    }
}
