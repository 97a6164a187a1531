//! The vault kept in an etcd cluster ([`EtcdStorage`]), for a team whose
//! daemons share one vault (docs/etcd.md).
//!
//! Layout under the configured prefix `P` (`/keyholder/vault/` by default):
//!
//! - `P/blob/<sha256>`: one piece of an encrypted vault, at most
//!   [`CHUNK_BYTES`], so that no request comes near etcd's request size
//!   limit (1.5 MiB by default) whatever the vault's size. Pieces are named
//!   by their hash and never change.
//! - `P/head`: the manifest of the current version (generation, size,
//!   hash, the pieces in order). Replacing it is the commit point.
//! - `P/gen/<generation>`: the manifests of the last
//!   [`keyholder_vault::BACKUPS_KEPT`] generations (the backups).
//!
//! A write puts its pieces first (each its own request: a transaction is
//! one request and so bounded by the same limit), then commits in ONE
//! transaction that compares `P/head`'s modification revision with the one
//! the writer read and, only if it is unchanged, puts the new head and its
//! backup manifest. Readers see the old or the new version, never a mix; a
//! writer that lost the race gets [`StorageError::Changed`] and re-reads.
//! Pieces no kept manifest names are removed after a commit, and only those
//! written before it, so a concurrent writer's fresh pieces are never taken.
//!
//! Why not the `etcd-client` crate: it generates its gRPC code with `protoc`
//! at build time, which Keyholder's build does without (keyholder-proto
//! uses protox, pure Rust). The part of etcd's v3 API used here (Range,
//! Put, DeleteRange, Txn, Watch) is small, so it is compiled from
//! `proto/etcd.proto` (etcd's own messages, cut down) with tonic, the same
//! way.
//!
//! Every call carries a deadline ([`EtcdSettings::timeout`]); an endpoint
//! that fails or does not answer in time is left for the next one. The
//! client runs on a small runtime of its own, so the [`Storage`] calls
//! (synchronous, made from the daemon's blocking sections) never block the
//! daemon's own runtime on a future.

#![forbid(unsafe_code)]

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keyholder_vault::{BACKUPS_KEPT, Revision, Storage, StorageError};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use sha2::{Digest, Sha256};
use tonic::transport::{Channel, Endpoint, Uri};

#[allow(clippy::all, clippy::pedantic, missing_docs)]
mod pb {
    tonic::include_proto!("etcdserverpb");
}

use pb::compare::{CompareResult, CompareTarget, TargetUnion};
use pb::kv_client::KvClient;
use pb::request_op::Request as Op;
use pb::watch_client::WatchClient;

/// The largest piece of a vault stored under one key: well under etcd's
/// default request limit of 1.5 MiB, with room for the key and framing.
pub const CHUNK_BYTES: usize = 1024 * 1024;

/// The largest vault read from etcd (1 GiB): far above any real vault, and
/// the bound on what a manifest read from the cluster may make the daemon
/// allocate.
pub const MAX_VAULT_BYTES: usize = 1 << 30;

/// The default key prefix.
pub const DEFAULT_PREFIX: &str = "/keyholder/vault/";

/// The default deadline of one etcd call.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// A whole read or write of the vault (every request it makes, on every
/// endpoint) ends within this many times [`EtcdSettings::timeout`].
pub const CALL_DEADLINE_FACTOR: u32 = 4;

/// Where the etcd cluster is and how to reach it.
#[derive(Clone, Debug)]
pub struct EtcdSettings {
    /// Client endpoints, `host:port` (a DNS name or an IP address, checked
    /// against the member's certificate).
    pub endpoints: Vec<String>,
    /// The key prefix the vault lives under; ends with `/`.
    pub prefix: String,
    /// The CA that issued the members' certificates (PEM).
    pub ca: PathBuf,
    /// The client certificate presented to etcd (PEM).
    pub cert: PathBuf,
    /// Its private key (PEM); must not be readable by group or others.
    pub key: PathBuf,
    /// The local read-only copy of the vault, refreshed at every write and
    /// at every read the daemon opened (authenticated); `None`: no copy.
    pub cache: Option<PathBuf>,
    /// The deadline of each call.
    pub timeout: Duration,
}

impl EtcdSettings {
    /// Endpoints and prefix from `etcd://HOST:PORT[,HOST:PORT...][/PREFIX/]`.
    pub fn parse_url(url: &str) -> Result<(Vec<String>, String), String> {
        let rest = url
            .strip_prefix("etcd://")
            .ok_or_else(|| format!("{url:?} is not an etcd:// address"))?;
        let (hosts, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, DEFAULT_PREFIX),
        };
        let endpoints: Vec<String> = hosts
            .split(',')
            .filter(|h| !h.is_empty())
            .map(str::to_owned)
            .collect();
        if endpoints.is_empty() {
            return Err(format!("{url:?} names no etcd endpoint"));
        }
        for e in &endpoints {
            split_endpoint(e)?;
        }
        Ok((endpoints, normalize_prefix(path)))
    }
}

/// A prefix that starts and ends with `/`.
pub fn normalize_prefix(p: &str) -> String {
    let mut p = p.trim().to_owned();
    if !p.starts_with('/') {
        p.insert(0, '/');
    }
    if !p.ends_with('/') {
        p.push('/');
    }
    p
}

fn split_endpoint(e: &str) -> Result<(String, u16), String> {
    let e = e
        .strip_prefix("https://")
        .unwrap_or(e)
        .trim_end_matches('/');
    let (host, port) = e
        .rsplit_once(':')
        .ok_or_else(|| format!("etcd endpoint {e:?} has no port (HOST:PORT)"))?;
    let port = port
        .parse::<u16>()
        .map_err(|_| format!("etcd endpoint {e:?}: bad port"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(format!("etcd endpoint {e:?} has no host"));
    }
    Ok((host.to_owned(), port))
}

/// What `P/head` and `P/gen/<N>` hold.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct Manifest {
    generation: u64,
    size: u64,
    sha256: String,
    chunks: Vec<String>,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A revision for compare-and-store: etcd's modification revision of the
/// head, in the first eight bytes.
fn revision_of(mod_revision: i64) -> Revision {
    let mut r = [0u8; 32];
    r[..8].copy_from_slice(&mod_revision.to_le_bytes());
    r[8] = 0xe7;
    Revision(r)
}

/// The revision handed out for the local copy: it matches no stored head,
/// so a write from it is refused as changed, and the writer re-reads from
/// etcd once it answers.
const FROM_COPY: i64 = -1;

fn mod_revision(r: &Revision) -> i64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&r.0[..8]);
    i64::from_le_bytes(b)
}

/// Called with every new revision of the head.
type Notifier = Arc<dyn Fn(Revision) + Send + Sync>;

/// Whether the store is known to hold a vault.
const UNKNOWN: u8 = 0;
const YES: u8 = 1;
const NO: u8 = 2;

struct Inner {
    settings: EtcdSettings,
    location: String,
    channels: Vec<Channel>,
    /// The endpoint that answered last; calls start there.
    preferred: AtomicUsize,
    /// The highest cluster revision seen (here and in earlier runs, from
    /// the `.revision` file beside the local copy).
    highest_seen: AtomicI64,
    exists: AtomicU8,
    notify: Mutex<Option<Notifier>>,
    /// A clean-up of old pieces is under way.
    collecting: AtomicBool,
}

/// The vault in etcd. See the crate documentation.
pub struct EtcdStorage {
    inner: Arc<Inner>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl std::fmt::Debug for EtcdStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStorage")
            .field("location", &self.inner.location)
            .finish_non_exhaustive()
    }
}

impl Drop for EtcdStorage {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> StorageError + use<> {
    let path = path.to_owned();
    move |source| StorageError::Io { what, path, source }
}

fn bad_input(what: &'static str, path: &Path, detail: impl std::fmt::Display) -> StorageError {
    StorageError::Io {
        what,
        path: path.to_owned(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, detail.to_string()),
    }
}

/// The largest client key file read (a PEM key is a few KiB).
const MAX_KEY_FILE: u64 = 1 << 20;

/// Reads the etcd client key, refusing a file that is not the daemon's
/// user's own or that group or others can read. The checks are made on
/// the open file and the bytes read from that same handle, so the file
/// cannot be swapped in between; the bytes are wiped when dropped.
fn read_client_key(path: &Path) -> Result<zeroize::Zeroizing<Vec<u8>>, StorageError> {
    use std::io::Read;
    use std::os::unix::fs::MetadataExt;
    let file = std::fs::File::open(path).map_err(io("cannot read the etcd client key", path))?;
    let meta = file
        .metadata()
        .map_err(io("cannot read the etcd client key", path))?;
    if !meta.is_file() {
        return Err(bad_input(
            "cannot read the etcd client key",
            path,
            "not a regular file",
        ));
    }
    if meta.uid() != rustix::process::geteuid().as_raw() {
        return Err(StorageError::Io {
            what: "refusing an etcd client key that belongs to another user (chown it to the user keyholderd runs as)",
            path: path.to_owned(),
            source: std::io::ErrorKind::PermissionDenied.into(),
        });
    }
    if meta.mode() & 0o077 != 0 {
        return Err(StorageError::Io {
            what: "refusing an etcd client key that group or others can read (chmod 600 it)",
            path: path.to_owned(),
            source: std::io::ErrorKind::PermissionDenied.into(),
        });
    }
    if meta.len() > MAX_KEY_FILE {
        return Err(bad_input(
            "bad etcd client key",
            path,
            "the file is too large for a key",
        ));
    }
    // Room for the whole file up front: no reallocation leaves a copy
    // of the key behind.
    let mut key = zeroize::Zeroizing::new(Vec::with_capacity(
        usize::try_from(meta.len()).unwrap_or(0).saturating_add(1),
    ));
    file.take(MAX_KEY_FILE)
        .read_to_end(&mut key)
        .map_err(io("cannot read the etcd client key", path))?;
    Ok(key)
}

/// The client TLS configuration: the CA file as the only trust anchor, the
/// client certificate and key presented.
fn tls_config(s: &EtcdSettings) -> Result<rustls::ClientConfig, StorageError> {
    let ca = std::fs::read(&s.ca).map_err(io("cannot read the etcd CA", &s.ca))?;
    let cert =
        std::fs::read(&s.cert).map_err(io("cannot read the etcd client certificate", &s.cert))?;
    let key = read_client_key(&s.key)?;
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(&ca) {
        let c = c.map_err(|e| bad_input("bad etcd CA", &s.ca, e))?;
        roots
            .add(c)
            .map_err(|e| bad_input("bad etcd CA", &s.ca, e))?;
    }
    if roots.is_empty() {
        return Err(bad_input(
            "bad etcd CA",
            &s.ca,
            "no certificate in the file",
        ));
    }
    let chain = CertificateDer::pem_slice_iter(&cert)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad_input("bad etcd client certificate", &s.cert, e))?;
    let key = PrivateKeyDer::from_pem_slice(key.as_slice())
        .map_err(|e| bad_input("bad etcd client key", &s.key, e))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| bad_input("TLS", &s.cert, e))?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .map_err(|e| bad_input("bad etcd client certificate", &s.cert, e))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

fn lazy_channel(
    host: String,
    port: u16,
    tls: Arc<rustls::ClientConfig>,
    timeout: Duration,
) -> Result<Channel, String> {
    let connector = tokio_rustls::TlsConnector::from(tls);
    let name =
        ServerName::try_from(host.clone()).map_err(|e| format!("etcd host {host:?}: {e}"))?;
    Ok(Endpoint::from_static("http://etcd.invalid")
        .connect_timeout(timeout)
        .http2_keep_alive_interval(Duration::from_secs(5))
        .keep_alive_timeout(Duration::from_secs(3))
        .keep_alive_while_idle(true)
        .connect_with_connector_lazy(tower::service_fn(move |_: Uri| {
            let (connector, name, host) = (connector.clone(), name.clone(), host.clone());
            async move {
                let tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
                let _ = tcp.set_nodelay(true);
                let tls = connector.connect(name, tcp).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
            }
        })))
}

/// Errors worth another endpoint: the member is down, has no leader, or
/// did not answer.
fn retryable(s: &tonic::Status) -> bool {
    matches!(
        s.code(),
        tonic::Code::Unavailable
            | tonic::Code::DeadlineExceeded
            | tonic::Code::Unknown
            | tonic::Code::Cancelled
            | tonic::Code::Internal
    )
}

impl EtcdStorage {
    /// Reads the TLS files and prepares a connection to every endpoint;
    /// etcd is not contacted yet, so the daemon starts while it is down.
    pub fn open(settings: EtcdSettings) -> Result<Self, StorageError> {
        if settings.endpoints.is_empty() {
            return Err(StorageError::Unavailable(
                "no etcd endpoints configured (etcd.endpoints)".into(),
            ));
        }
        let tls = Arc::new(tls_config(&settings)?);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("keyholder-etcd")
            .enable_all()
            .build()
            .map_err(io("cannot start the etcd client", &settings.ca))?;
        let channels = {
            let _enter = runtime.enter();
            let mut channels = Vec::new();
            for e in &settings.endpoints {
                let (host, port) = split_endpoint(e).map_err(StorageError::Unavailable)?;
                channels.push(
                    lazy_channel(host, port, tls.clone(), settings.timeout)
                        .map_err(StorageError::Unavailable)?,
                );
            }
            channels
        };
        let highest = settings
            .cache
            .as_deref()
            .and_then(|c| std::fs::read_to_string(revision_file(c)).ok())
            .and_then(|s| s.trim().parse::<i64>().ok())
            .unwrap_or(0);
        let location = format!("etcd://{}{}", settings.endpoints.join(","), settings.prefix);
        Ok(Self {
            inner: Arc::new(Inner {
                settings,
                location,
                channels,
                preferred: AtomicUsize::new(0),
                highest_seen: AtomicI64::new(highest),
                exists: AtomicU8::new(UNKNOWN),
                notify: Mutex::new(None),
                collecting: AtomicBool::new(false),
            }),
            runtime: Some(runtime),
        })
    }

    /// Runs `fut` on the client's runtime and waits for it, from any thread
    /// (the daemon's blocking sections included).
    fn run<T: Send + 'static>(
        &self,
        fut: impl Future<Output = Result<T, StorageError>> + Send + 'static,
    ) -> Result<T, StorageError> {
        let Some(rt) = &self.runtime else {
            return Err(StorageError::Unavailable(
                "the etcd client is stopped".into(),
            ));
        };
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        rt.spawn(async move {
            let _ = tx.send(fut.await);
        });
        rx.recv()
            .unwrap_or_else(|_| Err(StorageError::Unavailable("the etcd client stopped".into())))
    }

    /// Like [`EtcdStorage::run`], with a deadline for the whole call
    /// ([`CALL_DEADLINE_FACTOR`] times the per-request one): a read that
    /// goes round pieces, endpoints and re-reads, each request within its
    /// own deadline, still answers (UNAVAILABLE) in bounded time.
    fn run_bounded<T: Send + 'static>(
        &self,
        what: &'static str,
        fut: impl Future<Output = Result<T, StorageError>> + Send + 'static,
    ) -> Result<T, StorageError> {
        let limit = self
            .inner
            .settings
            .timeout
            .saturating_mul(CALL_DEADLINE_FACTOR);
        let location = self.inner.location.clone();
        self.run(async move {
            match tokio::time::timeout(limit, fut).await {
                Ok(r) => r,
                Err(_) => Err(StorageError::Unavailable(format!(
                    "etcd at {location} did not complete the {what} within {limit:?} \
                     ({CALL_DEADLINE_FACTOR} x etcd.timeout)"
                ))),
            }
        })
    }

    /// Writes every kept generation and the current one into an empty
    /// prefix. See [`Storage::import`].
    fn import_history(&self, history: &[(u64, Vec<u8>)]) -> Result<Revision, StorageError> {
        let inner = self.inner.clone();
        let history = history.to_vec();
        self.run(async move { inner.import(history).await })
    }
}

fn revision_file(cache: &Path) -> PathBuf {
    let mut name = cache.as_os_str().to_owned();
    name.push(".revision");
    PathBuf::from(name)
}

/// `[key, key+1)`: every key with the prefix `key`.
fn prefix_end(key: &[u8]) -> Vec<u8> {
    let mut end = key.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

enum Fetch {
    Done(Vec<u8>),
    /// A piece is gone: the head moved on meanwhile; read again.
    Missing,
}

impl Inner {
    fn head_key(&self) -> Vec<u8> {
        format!("{}head", self.settings.prefix).into_bytes()
    }
    fn blob_key(&self, hash: &str) -> Vec<u8> {
        format!("{}blob/{hash}", self.settings.prefix).into_bytes()
    }
    fn gen_key(&self, generation: u64) -> Vec<u8> {
        format!("{}gen/{generation:020}", self.settings.prefix).into_bytes()
    }
    fn gen_prefix(&self) -> Vec<u8> {
        format!("{}gen/", self.settings.prefix).into_bytes()
    }
    fn blob_prefix(&self) -> Vec<u8> {
        format!("{}blob/", self.settings.prefix).into_bytes()
    }

    fn unreachable(&self, what: &str, errors: &[String]) -> StorageError {
        StorageError::Unavailable(format!(
            "etcd is unreachable ({}); {what} failed. An unlocked keyholderd keeps serving reads \
             from its open vault; writes fail until etcd answers again",
            errors.join("; ")
        ))
    }

    /// One KV call with the deadline, on the preferred endpoint and then on
    /// the others. `f` gets the client and whether this is a later attempt.
    async fn kv<T, F, Fut>(&self, what: &str, f: F) -> Result<(T, bool), StorageError>
    where
        F: Fn(KvClient<Channel>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let n = self.channels.len();
        let start = self.preferred.load(Ordering::Relaxed);
        let mut errors = Vec::new();
        for i in 0..n {
            let idx = (start + i) % n;
            let client = KvClient::new(self.channels[idx].clone())
                .max_decoding_message_size(64 << 20)
                .max_encoding_message_size(64 << 20);
            let endpoint = &self.settings.endpoints[idx];
            match tokio::time::timeout(self.settings.timeout, f(client)).await {
                Ok(Ok(r)) => {
                    self.preferred.store(idx, Ordering::Relaxed);
                    return Ok((r.into_inner(), !errors.is_empty()));
                }
                Ok(Err(s)) if retryable(&s) => {
                    errors.push(format!("{endpoint}: {}", s.message()));
                }
                Ok(Err(s)) => {
                    return Err(StorageError::Unavailable(format!(
                        "etcd refused the {what} ({endpoint}: {:?}: {})",
                        s.code(),
                        s.message()
                    )));
                }
                Err(_) => errors.push(format!(
                    "{endpoint}: no answer within {:?}",
                    self.settings.timeout
                )),
            }
        }
        Err(self.unreachable(what, &errors))
    }

    /// Refuses a cluster whose revision is below one seen before.
    fn check_revision(&self, header: Option<&pb::ResponseHeader>) -> Result<(), StorageError> {
        let Some(rev) = header.map(|h| h.revision) else {
            return Ok(());
        };
        let seen = self.highest_seen.load(Ordering::Relaxed);
        if rev < seen {
            return Err(StorageError::WentBack(format!(
                "etcd at {} answers at revision {rev}, below revision {seen} seen before: the \
                 cluster was restored from an older snapshot, or is another cluster. Refusing it \
                 (an older vault could be replayed). If the restore was deliberate, remove {} \
                 and start again",
                self.location,
                self.settings.cache.as_deref().map_or_else(
                    || "the local copy".into(),
                    |c| revision_file(c).display().to_string()
                )
            )));
        }
        self.highest_seen.fetch_max(rev, Ordering::Relaxed);
        Ok(())
    }

    async fn range(
        &self,
        what: &str,
        req: pb::RangeRequest,
    ) -> Result<pb::RangeResponse, StorageError> {
        let (resp, _) = self
            .kv(what, |mut c| {
                let req = req.clone();
                async move { c.range(req).await }
            })
            .await?;
        self.check_revision(resp.header.as_ref())?;
        Ok(resp)
    }

    async fn get(&self, what: &str, key: Vec<u8>) -> Result<Option<pb::KeyValue>, StorageError> {
        let resp = self
            .range(
                what,
                pb::RangeRequest {
                    key,
                    ..Default::default()
                },
            )
            .await?;
        Ok(resp.kvs.into_iter().next())
    }

    fn manifest(&self, kv: &pb::KeyValue) -> Result<Manifest, StorageError> {
        serde_json::from_slice(&kv.value).map_err(|e| {
            StorageError::Unavailable(format!(
                "{} holds {:?}, which is not a Keyholder vault manifest ({e})",
                self.location,
                String::from_utf8_lossy(&kv.key)
            ))
        })
    }

    async fn fetch(&self, m: &Manifest) -> Result<Fetch, StorageError> {
        // The manifest comes from etcd: its size and piece count are bounded
        // before anything is allocated, and every piece as it arrives, so a
        // hostile or broken cluster cannot make the daemon allocate without
        // limit.
        let size = usize::try_from(m.size)
            .ok()
            .filter(|s| *s <= MAX_VAULT_BYTES)
            .ok_or_else(|| self.malformed(m, "its size is over the limit"))?;
        if m.chunks.len() != size.div_ceil(CHUNK_BYTES) {
            return Err(self.malformed(m, "its piece count does not fit its size"));
        }
        let mut out = Vec::with_capacity(size);
        for hash in &m.chunks {
            match self.get("read of the vault", self.blob_key(hash)).await? {
                Some(kv) => {
                    if kv.value.len() > CHUNK_BYTES
                        || out.len().saturating_add(kv.value.len()) > size
                    {
                        return Err(self.malformed(m, "a piece is larger than the manifest allows"));
                    }
                    out.extend_from_slice(&kv.value);
                }
                None => return Ok(Fetch::Missing),
            }
        }
        if u64::try_from(out.len()).ok() != Some(m.size) || hex(&Sha256::digest(&out)) != m.sha256 {
            return Err(StorageError::Unavailable(format!(
                "the vault in {} does not match its manifest (generation {}): its pieces were \
                 changed by hand",
                self.location, m.generation
            )));
        }
        Ok(Fetch::Done(out))
    }

    /// A manifest that cannot describe a vault Keyholder wrote.
    fn malformed(&self, m: &Manifest, why: &str) -> StorageError {
        StorageError::Unavailable(format!(
            "the vault in {} has a manifest that is not Keyholder's (generation {}): {why}",
            self.location, m.generation
        ))
    }

    async fn load(&self) -> Result<Option<(Vec<u8>, i64, u64)>, StorageError> {
        for _ in 0..8 {
            let Some(head) = self.get("read of the vault", self.head_key()).await? else {
                self.exists.store(NO, Ordering::Relaxed);
                return Ok(None);
            };
            let m = self.manifest(&head)?;
            match self.fetch(&m).await? {
                Fetch::Done(bytes) => {
                    self.exists.store(YES, Ordering::Relaxed);
                    return Ok(Some((bytes, head.mod_revision, m.generation)));
                }
                Fetch::Missing => continue,
            }
        }
        Err(StorageError::Unavailable(format!(
            "the vault in {} kept changing while it was read; try again",
            self.location
        )))
    }

    async fn put_blobs(&self, bytes: &[u8]) -> Result<Vec<String>, StorageError> {
        if bytes.len() > MAX_VAULT_BYTES {
            return Err(StorageError::Unavailable(format!(
                "the vault is {} bytes; Keyholder keeps at most {MAX_VAULT_BYTES} in etcd",
                bytes.len()
            )));
        }
        let mut hashes = Vec::new();
        for piece in bytes.chunks(CHUNK_BYTES) {
            let hash = hex(&Sha256::digest(piece));
            let req = pb::PutRequest {
                key: self.blob_key(&hash),
                value: piece.to_vec(),
                ..Default::default()
            };
            self.kv("write of the vault", |mut c| {
                let req = req.clone();
                async move { c.put(req).await }
            })
            .await?;
            hashes.push(hash);
        }
        Ok(hashes)
    }

    fn manifest_of(bytes: &[u8], generation: u64, chunks: Vec<String>) -> Manifest {
        Manifest {
            generation,
            size: u64::try_from(bytes.len()).unwrap_or(u64::MAX),
            sha256: hex(&Sha256::digest(bytes)),
            chunks,
        }
    }

    async fn txn(
        &self,
        what: &str,
        req: pb::TxnRequest,
    ) -> Result<(pb::TxnResponse, bool), StorageError> {
        self.kv(what, |mut c| {
            let req = req.clone();
            async move { c.txn(req).await }
        })
        .await
    }

    async fn compare_and_store(
        self: Arc<Self>,
        expected: Option<i64>,
        bytes: Vec<u8>,
        generation: u64,
    ) -> Result<i64, StorageError> {
        let chunks = self.put_blobs(&bytes).await?;
        let m = Self::manifest_of(&bytes, generation, chunks);
        let value = serde_json::to_vec(&m).map_err(|e| StorageError::Unavailable(e.to_string()))?;
        let compare = match expected {
            None => pb::Compare {
                result: CompareResult::Equal as i32,
                target: CompareTarget::Create as i32,
                key: self.head_key(),
                target_union: Some(TargetUnion::CreateRevision(0)),
            },
            Some(rev) => pb::Compare {
                result: CompareResult::Equal as i32,
                target: CompareTarget::Mod as i32,
                key: self.head_key(),
                target_union: Some(TargetUnion::ModRevision(rev)),
            },
        };
        let put = |key: Vec<u8>| pb::RequestOp {
            request: Some(Op::RequestPut(pb::PutRequest {
                key,
                value: value.clone(),
                ..Default::default()
            })),
        };
        let req = pb::TxnRequest {
            compare: vec![compare],
            success: vec![put(self.head_key()), put(self.gen_key(generation))],
            failure: vec![],
        };
        let (resp, retried) = self.txn("write of the vault", req).await?;
        self.check_revision(resp.header.as_ref())?;
        let commit = resp.header.as_ref().map_or(0, |h| h.revision);
        let committed = if resp.succeeded {
            commit
        } else {
            // After an endpoint gave no answer, the first attempt may have
            // committed: then the head is this very manifest.
            match self.get("write of the vault", self.head_key()).await? {
                Some(kv) if retried && kv.value == value => kv.mod_revision,
                _ => return Err(StorageError::Changed(self.location.clone())),
            }
        };
        self.exists.store(YES, Ordering::Relaxed);
        // Old backups and pieces go after the answer, one clean-up at a
        // time; one that fails is made good by the next.
        if !self.collecting.swap(true, Ordering::AcqRel) {
            let me = self.clone();
            tokio::spawn(async move {
                if let Err(e) = me.collect(committed).await {
                    tracing::warn!(error = %e, "old vault pieces not removed from etcd (removed after a later write)");
                }
                me.collecting.store(false, Ordering::Release);
            });
        }
        Ok(committed)
    }

    /// Keeps the newest [`BACKUPS_KEPT`] backup manifests and removes the
    /// pieces no kept manifest names that were written before `commit`.
    async fn collect(&self, commit: i64) -> Result<(), StorageError> {
        let gens = self
            .range(
                "clean-up",
                pb::RangeRequest {
                    key: self.gen_prefix(),
                    range_end: prefix_end(&self.gen_prefix()),
                    ..Default::default()
                },
            )
            .await?
            .kvs;
        let mut kept = std::collections::HashSet::new();
        // Keys sort by zero-padded generation: the newest last.
        let drop_count = gens.len().saturating_sub(BACKUPS_KEPT);
        for (i, kv) in gens.iter().enumerate() {
            if i < drop_count {
                let req = pb::DeleteRangeRequest {
                    key: kv.key.clone(),
                    ..Default::default()
                };
                self.kv("clean-up", |mut c| {
                    let req = req.clone();
                    async move { c.delete_range(req).await }
                })
                .await?;
            } else if let Ok(m) = self.manifest(kv) {
                kept.extend(m.chunks);
            }
        }
        if let Some(head) = self.get("clean-up", self.head_key()).await?
            && let Ok(m) = self.manifest(&head)
        {
            kept.extend(m.chunks);
        }
        let blobs = self
            .range(
                "clean-up",
                pb::RangeRequest {
                    key: self.blob_prefix(),
                    range_end: prefix_end(&self.blob_prefix()),
                    keys_only: true,
                    ..Default::default()
                },
            )
            .await?
            .kvs;
        let prefix_len = self.blob_prefix().len();
        for kv in blobs {
            let hash = String::from_utf8_lossy(kv.key.get(prefix_len..).unwrap_or_default());
            if kept.contains(hash.as_ref()) || kv.mod_revision >= commit {
                continue;
            }
            // Only if untouched since listed: a writer that put the same
            // piece again meanwhile keeps it.
            let req = pb::TxnRequest {
                compare: vec![pb::Compare {
                    result: CompareResult::Equal as i32,
                    target: CompareTarget::Mod as i32,
                    key: kv.key.clone(),
                    target_union: Some(TargetUnion::ModRevision(kv.mod_revision)),
                }],
                success: vec![pb::RequestOp {
                    request: Some(Op::RequestDeleteRange(pb::DeleteRangeRequest {
                        key: kv.key.clone(),
                        ..Default::default()
                    })),
                }],
                failure: vec![],
            };
            self.txn("clean-up", req).await?;
        }
        Ok(())
    }

    async fn backups(&self) -> Result<Vec<(u64, Manifest)>, StorageError> {
        let gens = self
            .range(
                "listing of the backups",
                pb::RangeRequest {
                    key: self.gen_prefix(),
                    range_end: prefix_end(&self.gen_prefix()),
                    ..Default::default()
                },
            )
            .await?
            .kvs;
        let mut out = Vec::new();
        for kv in gens.iter().rev() {
            let m = self.manifest(kv)?;
            out.push((m.generation, m));
        }
        Ok(out)
    }

    async fn import(&self, history: Vec<(u64, Vec<u8>)>) -> Result<Revision, StorageError> {
        if history.is_empty() {
            return Err(StorageError::Unavailable("nothing to import".into()));
        }
        let existing = self
            .range(
                "import",
                pb::RangeRequest {
                    key: self.settings.prefix.clone().into_bytes(),
                    range_end: prefix_end(self.settings.prefix.as_bytes()),
                    count_only: true,
                    ..Default::default()
                },
            )
            .await?;
        if existing.count > 0 {
            return Err(StorageError::Unavailable(format!(
                "{} already holds {} keys: migrate into an empty prefix",
                self.location, existing.count
            )));
        }
        let mut ops = Vec::new();
        let mut last = None;
        for (generation, bytes) in &history {
            let chunks = self.put_blobs(bytes).await?;
            let m = Self::manifest_of(bytes, *generation, chunks);
            let value =
                serde_json::to_vec(&m).map_err(|e| StorageError::Unavailable(e.to_string()))?;
            ops.push(pb::RequestOp {
                request: Some(Op::RequestPut(pb::PutRequest {
                    key: self.gen_key(*generation),
                    value: value.clone(),
                    ..Default::default()
                })),
            });
            last = Some(value);
        }
        if let Some(value) = last {
            ops.push(pb::RequestOp {
                request: Some(Op::RequestPut(pb::PutRequest {
                    key: self.head_key(),
                    value,
                    ..Default::default()
                })),
            });
        }
        let req = pb::TxnRequest {
            compare: vec![pb::Compare {
                result: CompareResult::Equal as i32,
                target: CompareTarget::Create as i32,
                key: self.head_key(),
                target_union: Some(TargetUnion::CreateRevision(0)),
            }],
            success: ops,
            failure: vec![],
        };
        let (resp, _) = self.txn("import", req).await?;
        if !resp.succeeded {
            return Err(StorageError::Changed(self.location.clone()));
        }
        self.exists.store(YES, Ordering::Relaxed);
        Ok(revision_of(resp.header.map_or(0, |h| h.revision)))
    }

    /// Keeps the local copy and the highest revision seen; failures are
    /// logged (the copy is a convenience, etcd is the store).
    fn save_copy(&self, bytes: &[u8]) {
        let Some(cache) = &self.settings.cache else {
            return;
        };
        let _saving = SAVING.lock().unwrap_or_else(|p| p.into_inner());
        let result = write_private(cache, bytes).and_then(|()| {
            write_private(
                &revision_file(cache),
                self.highest_seen
                    .load(Ordering::Relaxed)
                    .to_string()
                    .as_bytes(),
            )
        });
        if let Err(e) = result {
            tracing::warn!(copy = %cache.display(), error = %e, "the local copy of the vault was not updated");
        }
    }

    /// Watches the head from `after`, calling the notifier with every new
    /// revision; reconnects (to the next endpoint) after a failure.
    async fn watch(self: Arc<Self>, mut after: i64) {
        let mut backoff = Duration::from_millis(200);
        loop {
            // A fresh read first: changes missed while disconnected (or
            // compacted away) show up here.
            match self.get("watch", self.head_key()).await {
                Ok(Some(kv)) if kv.mod_revision > after => {
                    after = kv.mod_revision;
                    self.notify(after);
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::debug!(error = %e, "etcd watch: no fresh read");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                    continue;
                }
            }
            let idx = self.preferred.load(Ordering::Relaxed) % self.channels.len();
            let mut client = WatchClient::new(self.channels[idx].clone());
            let (tx, rx) = tokio::sync::mpsc::channel(1);
            let create = pb::WatchRequest {
                request_union: Some(pb::watch_request::RequestUnion::CreateRequest(
                    pb::WatchCreateRequest {
                        key: self.head_key(),
                        start_revision: after.saturating_add(1),
                        progress_notify: true,
                        ..Default::default()
                    },
                )),
            };
            if tx.send(create).await.is_err() {
                continue;
            }
            let mut request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
            // Without a leader the member ends the watch instead of
            // keeping it open silently.
            request.metadata_mut().insert(
                "hasleader",
                tonic::metadata::MetadataValue::from_static("true"),
            );
            let stream = tokio::time::timeout(self.settings.timeout, client.watch(request)).await;
            let mut stream = match stream {
                Ok(Ok(s)) => s.into_inner(),
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "etcd watch refused");
                    self.preferred
                        .store((idx + 1) % self.channels.len(), Ordering::Relaxed);
                    tokio::time::sleep(backoff).await;
                    continue;
                }
                Err(_) => {
                    self.preferred
                        .store((idx + 1) % self.channels.len(), Ordering::Relaxed);
                    continue;
                }
            };
            backoff = Duration::from_millis(200);
            // Progress notifications come every few minutes; the keep-alive
            // pings end a dead connection much sooner.
            while let Ok(Some(msg)) = stream.message().await {
                if msg.canceled || msg.compact_revision > 0 {
                    break;
                }
                for ev in msg.events {
                    if let Some(kv) = ev.kv
                        && ev.r#type == pb::event::EventType::Put as i32
                        && kv.mod_revision > after
                    {
                        after = kv.mod_revision;
                        self.notify(after);
                    }
                }
            }
            drop(tx);
            self.preferred
                .store((idx + 1) % self.channels.len(), Ordering::Relaxed);
            tokio::time::sleep(backoff).await;
        }
    }

    fn notify(&self, revision: i64) {
        let f = self
            .notify
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if let Some(f) = f {
            f(revision_of(revision));
        }
    }
}

/// Saves of the local copy, one at a time in this process.
static SAVING: Mutex<()> = Mutex::new(());

/// Makes temp names unique within the process.
static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Writes `path` (mode 0600) atomically and durably: a new temp file beside
/// it (created exclusively under an unpredictable name, so an existing file
/// or symlink there is never opened), written, synced, renamed over `path`,
/// and the directory synced.
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut attempt = 0u32;
    let (temp, mut file) = loop {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let temp = dir.join(format!(
            ".{name}.tmp-{}-{}-{nanos:09}",
            std::process::id(),
            TEMP_COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&temp)
        {
            Ok(f) => break (temp, f),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && attempt < 16 => {
                attempt += 1;
            }
            Err(e) => return Err(e),
        }
    };
    let written = file
        .write_all(bytes)
        .and_then(|()| file.sync_all())
        .and_then(|()| std::fs::rename(&temp, path));
    if written.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    written?;
    std::fs::File::open(&dir).and_then(|d| d.sync_all())
}

impl Storage for EtcdStorage {
    fn load(&self) -> Result<Option<(Vec<u8>, Revision)>, StorageError> {
        let inner = self.inner.clone();
        match self.run_bounded("read of the vault", async move { inner.load().await }) {
            // The copy is refreshed only once the daemon has opened these
            // bytes (`opened`): etcd's bytes are not authenticated here.
            Ok(Some((bytes, rev, _))) => Ok(Some((bytes, revision_of(rev)))),
            Ok(None) => Ok(None),
            Err(StorageError::Unavailable(reason)) => {
                let copy = self
                    .inner
                    .settings
                    .cache
                    .as_deref()
                    .and_then(|c| std::fs::read(c).ok());
                match copy {
                    Some(bytes) => {
                        tracing::warn!(%reason, "etcd unreachable: reading the local copy of the vault (read-only until etcd answers)");
                        Ok(Some((bytes, revision_of(FROM_COPY))))
                    }
                    None => Err(StorageError::Unavailable(reason)),
                }
            }
            Err(e) => Err(e),
        }
    }

    fn compare_and_store(
        &self,
        expected: Option<&Revision>,
        bytes: &[u8],
        generation: u64,
    ) -> Result<Revision, StorageError> {
        let inner = self.inner.clone();
        let expected = expected.map(mod_revision);
        let owned = bytes.to_vec();
        let rev = self.run_bounded("write of the vault", async move {
            inner.compare_and_store(expected, owned, generation).await
        })?;
        self.inner.save_copy(bytes);
        Ok(revision_of(rev))
    }

    fn opened(&self, bytes: &[u8], revision: &Revision) {
        // Read from the copy itself: nothing new to keep.
        if mod_revision(revision) != FROM_COPY {
            self.inner.save_copy(bytes);
        }
    }

    fn exists(&self) -> Result<bool, StorageError> {
        match self.inner.exists.load(Ordering::Relaxed) {
            YES => return Ok(true),
            NO => return Ok(false),
            _ => {}
        }
        let inner = self.inner.clone();
        let found = self.run(async move {
            let key = inner.head_key();
            inner
                .range(
                    "check for the vault",
                    pb::RangeRequest {
                        key,
                        count_only: true,
                        ..Default::default()
                    },
                )
                .await
        });
        match found {
            Ok(r) => {
                let yes = r.count > 0;
                self.inner
                    .exists
                    .store(if yes { YES } else { NO }, Ordering::Relaxed);
                Ok(yes)
            }
            Err(StorageError::Unavailable(_))
                if self
                    .inner
                    .settings
                    .cache
                    .as_deref()
                    .is_some_and(Path::exists) =>
            {
                Ok(true)
            }
            Err(e) => Err(e),
        }
    }

    fn location(&self) -> String {
        self.inner.location.clone()
    }

    fn backups(&self) -> Vec<(u64, String)> {
        let inner = self.inner.clone();
        match self.run(async move { inner.backups().await }) {
            Ok(list) => list
                .into_iter()
                .map(|(g, _)| (g, format!("{}gen/{g:020}", self.inner.location)))
                .collect(),
            Err(e) => {
                tracing::warn!(error = %e, "backups in etcd not listed");
                Vec::new()
            }
        }
    }

    fn load_backup(&self, generation: u64) -> Result<Option<Vec<u8>>, StorageError> {
        let inner = self.inner.clone();
        self.run(async move {
            let Some(kv) = inner
                .get("read of a backup", inner.gen_key(generation))
                .await?
            else {
                return Ok(None);
            };
            let m = inner.manifest(&kv)?;
            match inner.fetch(&m).await? {
                Fetch::Done(bytes) => Ok(Some(bytes)),
                Fetch::Missing => Ok(None),
            }
        })
    }

    fn watch(&self, notify: Box<dyn Fn(Revision) + Send + Sync>) -> bool {
        let Some(rt) = &self.runtime else {
            return false;
        };
        let first = self
            .inner
            .notify
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .replace(Arc::from(notify))
            .is_none();
        if first {
            rt.spawn(self.inner.clone().watch(0));
        }
        true
    }

    fn import(&self, history: &[(u64, Vec<u8>)]) -> Result<Revision, StorageError> {
        let rev = self.import_history(history)?;
        if let Some((_, current)) = history.last() {
            self.inner.save_copy(current);
        }
        Ok(rev)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_name_endpoints_and_a_prefix() {
        let (e, p) =
            EtcdSettings::parse_url("etcd://127.0.0.1:2379,10.0.0.2:2379/team/vault").unwrap();
        assert_eq!(e, vec!["127.0.0.1:2379", "10.0.0.2:2379"]);
        assert_eq!(p, "/team/vault/");
        let (_, p) = EtcdSettings::parse_url("etcd://etcd.example:2379").unwrap();
        assert_eq!(p, DEFAULT_PREFIX);
        assert!(EtcdSettings::parse_url("etcd:///x").is_err());
        assert!(EtcdSettings::parse_url("etcd://host/x").is_err());
        assert!(EtcdSettings::parse_url("http://host:1/x").is_err());
    }

    #[test]
    fn the_local_copy_is_written_private_and_never_through_a_planted_link() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let copy = dir.path().join("vault.etcd-copy");
        let victim = dir.path().join("victim");
        std::fs::write(&victim, b"not yours").unwrap();
        // The name the copy's temp file used to have, planted as a link.
        std::os::unix::fs::symlink(
            &victim,
            dir.path()
                .join(format!(".vault.etcd-copy.tmp-{}", std::process::id())),
        )
        .unwrap();
        write_private(&copy, b"first").unwrap();
        write_private(&copy, b"second").unwrap();
        assert_eq!(std::fs::read(&copy).unwrap(), b"second");
        assert_eq!(std::fs::read(&victim).unwrap(), b"not yours");
        let mode = std::fs::metadata(&copy).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        // Only the copy, the victim and the planted link: no temp file left.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 3);
    }

    #[test]
    fn the_client_key_must_be_private_and_the_users_own() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("client-key.pem");
        std::fs::write(&key, b"-----BEGIN PRIVATE KEY-----\n").unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(
            read_client_key(&key).unwrap().as_slice(),
            b"-----BEGIN PRIVATE KEY-----\n"
        );
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o640)).unwrap();
        let e = read_client_key(&key).unwrap_err().to_string();
        assert!(e.contains("group or others can read"), "{e}");
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        // Another user's key: only root can make one to test with.
        if rustix::process::geteuid().is_root() {
            std::os::unix::fs::chown(&key, Some(65534), None).unwrap();
            let e = read_client_key(&key).unwrap_err().to_string();
            assert!(e.contains("belongs to another user"), "{e}");
        }
    }

    #[test]
    fn concurrent_saves_of_the_copy_never_mix() {
        // Even without the lock `save_copy` takes, each save has a temp
        // file of its own.
        let dir = tempfile::tempdir().unwrap();
        let copy = dir.path().join("copy");
        let values: Vec<Vec<u8>> = (0..8u8).map(|i| vec![i; 256 * 1024]).collect();
        std::thread::scope(|s| {
            for v in &values {
                let copy = copy.clone();
                s.spawn(move || {
                    for _ in 0..4 {
                        write_private(&copy, v).unwrap();
                    }
                });
            }
        });
        let got = std::fs::read(&copy).unwrap();
        assert!(values.contains(&got), "the copy mixes two saves");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn a_whole_call_ends_within_its_deadline_whatever_its_requests_do() {
        let timeout = Duration::from_millis(50);
        let settings = EtcdSettings {
            endpoints: vec!["127.0.0.1:1".into()],
            prefix: DEFAULT_PREFIX.into(),
            ca: PathBuf::new(),
            cert: PathBuf::new(),
            key: PathBuf::new(),
            cache: None,
            timeout,
        };
        let storage = EtcdStorage {
            inner: Arc::new(Inner {
                settings,
                location: "etcd://127.0.0.1:1/keyholder/vault/".into(),
                channels: Vec::new(),
                preferred: AtomicUsize::new(0),
                highest_seen: AtomicI64::new(0),
                exists: AtomicU8::new(UNKNOWN),
                notify: Mutex::new(None),
                collecting: AtomicBool::new(false),
            }),
            runtime: Some(
                tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(1)
                    .enable_all()
                    .build()
                    .unwrap(),
            ),
        };
        let started = std::time::Instant::now();
        // Requests that each answer within their own deadline, forever.
        let r = storage.run_bounded("read of the vault", async move {
            loop {
                tokio::time::sleep(timeout / 2).await;
            }
            #[allow(unreachable_code)]
            Ok(())
        });
        let took = started.elapsed();
        match r {
            Err(StorageError::Unavailable(m)) => assert!(m.contains("did not complete"), "{m}"),
            other => panic!("{other:?}"),
        }
        assert!(
            took >= timeout * 4 && took < Duration::from_secs(5),
            "{took:?}"
        );
    }

    #[test]
    fn revisions_round_trip_and_prefix_ends_cover_the_prefix() {
        assert_eq!(mod_revision(&revision_of(12345)), 12345);
        assert_eq!(mod_revision(&revision_of(FROM_COPY)), FROM_COPY);
        assert_eq!(prefix_end(b"/a/"), b"/a0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
    }
}
