//! Session state: locked or unlocked, the open vault, the token session, and
//! every transition between them.
//!
//! Concurrency: `state` is a short-held `std` lock, never held across an
//! await. Writers (Put, Delete, Init, Unlock) take `writer` first, so writes
//! are serialised without blocking readers during encryption and fsync.
//! Token calls run in `block_in_place`, since they block.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use keyholder_proto::v1;
use keyholder_token::{Module, Selector, TokenDescription, TokenKey, TokenSession};
use keyholder_vault::{
    Body, FileStorage, OpenVault, Revision, Storage, TokenAgreement, TokenRecipient, VaultError,
};
use secrecy::SecretString;
use tokio::sync::watch;

use crate::ca::{LoadedCa, TokenSlot};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::keypool::KeyPool;

/// Label of the vault key objects Keyholder creates on tokens.
pub const KEY_LABEL: &str = "keyholder-vault";

/// Why the session is locked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LockReason {
    /// Never unlocked since start.
    Start,
    /// `Lock` was called.
    Request,
    /// The session TTL ran out.
    Expired,
    /// No request for the idle timeout.
    Idle,
    /// The token went away.
    TokenRemoved,
    /// The daemon is stopping.
    Shutdown,
}

impl LockReason {
    fn as_str(self) -> &'static str {
        match self {
            Self::Start => "",
            Self::Request => "request",
            Self::Expired => "expired",
            Self::Idle => "idle",
            Self::TokenRemoved => "token-removed",
            Self::Shutdown => "shutdown",
        }
    }
}

/// What exists while unlocked. Dropping it wipes the decrypted vault (its
/// secret values and MAC key are zeroizing types).
pub struct Unlocked {
    /// The decrypted vault.
    pub vault: OpenVault,
    /// The stored revision the vault was read from or last written as.
    pub revision: Revision,
    /// The token in use.
    pub token: TokenDescription,
    /// The vault key on it.
    pub key: TokenKey,
    /// Wall-clock time of unlock, for display.
    pub unlocked_at: SystemTime,
    /// Locks at this instant at the latest.
    pub expires_at: Instant,
    /// Idle timeout of this session.
    pub idle_timeout: Duration,
    /// CAs parsed and ready to sign, loaded on first use.
    pub cas: Mutex<HashMap<String, Arc<LoadedCa>>>,
    /// Signing keys, loaded on first use.
    pub keys: Mutex<HashMap<String, Arc<crate::keys::LoadedKey>>>,
    /// What the ssh-agent offers, built on first use after each change.
    pub agent_index: Mutex<Option<Arc<crate::keys::AgentIndex>>>,
}

/// Locked or unlocked.
pub enum State {
    /// No decrypted material in memory.
    Locked(LockReason),
    /// The vault is open.
    Unlocked(Box<Unlocked>),
}

/// The daemon's shared core.
pub struct Core {
    /// Settings.
    pub config: Config,
    module: Module,
    storage: FileStorage,
    state: RwLock<State>,
    /// The logged-in token session while unlocked. Behind a mutex because a
    /// cryptoki session may move between threads but not be shared.
    token: TokenSlot,
    /// Kubernetes exec credentials by request, shared until shortly before
    /// they expire; one issuance per key at a time. Cleared on lock.
    pub(crate) exec_cache:
        Mutex<HashMap<ExecKey, Arc<tokio::sync::Mutex<Option<CachedCredential>>>>>,
    /// Serialises writers.
    writer: tokio::sync::Mutex<()>,
    /// Milliseconds since `epoch` of the last request that used the session.
    last_activity_ms: AtomicU64,
    epoch: Instant,
    status_tx: watch::Sender<v1::StatusResponse>,
    shutdown_tx: watch::Sender<bool>,
    /// Client keys and CA signature nonces made ahead of time while unlocked.
    pub(crate) key_pool: Arc<KeyPool>,
}

impl Drop for Core {
    fn drop(&mut self) {
        self.key_pool.stop();
    }
}

fn timestamp(t: SystemTime) -> prost_types::Timestamp {
    prost_types::Timestamp::from(t)
}

fn describe(t: &TokenDescription) -> v1::TokenInfo {
    v1::TokenInfo {
        label: t.label.clone(),
        serial: t.serial.clone(),
        manufacturer: t.manufacturer.clone(),
        model: t.model.clone(),
        pin_count_low: t.pin.count_low,
        pin_final_try: t.pin.final_try,
        pin_locked: t.pin.locked,
        recipients: Vec::new(),
    }
}

impl Core {
    /// A core over a loaded module and an owned vault file.
    pub fn new(config: Config, module: Module, storage: FileStorage) -> Arc<Self> {
        let (status_tx, _) = watch::channel(v1::StatusResponse::default());
        let (shutdown_tx, _) = watch::channel(false);
        let key_pool = KeyPool::start(config.key_stock);
        let core = Arc::new(Self {
            config,
            module,
            storage,
            state: RwLock::new(State::Locked(LockReason::Start)),
            token: Arc::new(Mutex::new(None)),
            exec_cache: Mutex::new(HashMap::new()),
            writer: tokio::sync::Mutex::new(()),
            last_activity_ms: AtomicU64::new(0),
            epoch: Instant::now(),
            status_tx,
            shutdown_tx,
            key_pool,
        });
        core.publish();
        core
    }

    fn read_state(&self) -> std::sync::RwLockReadGuard<'_, State> {
        // A panic while holding the lock cannot leave State half-updated
        // (every update is a single assignment), so a poisoned lock is usable.
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write_state(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|p| p.into_inner())
    }

    fn token_slot(&self) -> std::sync::MutexGuard<'_, Option<TokenSession>> {
        self.token.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records activity now (resets the idle timer).
    pub fn touch(&self) {
        let ms = self.epoch.elapsed().as_millis() as u64;
        self.last_activity_ms.store(ms, Ordering::Relaxed);
    }

    fn last_activity(&self) -> Instant {
        self.epoch + Duration::from_millis(self.last_activity_ms.load(Ordering::Relaxed))
    }

    /// Runs `f` on the open vault, or fails with [`Error::Locked`].
    pub fn with_unlocked<T>(&self, f: impl FnOnce(&Unlocked) -> Result<T>) -> Result<T> {
        match &*self.read_state() {
            State::Unlocked(u) => f(u),
            State::Locked(_) => Err(Error::Locked),
        }
    }

    /// Whether the session is unlocked.
    pub fn is_unlocked(&self) -> bool {
        matches!(&*self.read_state(), State::Unlocked(_))
    }

    /// The status now.
    pub fn status(&self) -> v1::StatusResponse {
        let exists = self.storage.exists().unwrap_or(true);
        let state = self.read_state();
        let mut s = v1::StatusResponse {
            ssh_agent_socket: if self.config.ssh_agent {
                self.config.ssh_agent_socket.display().to_string()
            } else {
                String::new()
            },
            vault_path: self.storage.location(),
            ..Default::default()
        };
        match &*state {
            State::Locked(reason) => {
                s.state = if exists {
                    v1::SessionState::Locked
                } else {
                    v1::SessionState::Uninitialized
                } as i32;
                s.lock_reason = reason.as_str().to_owned();
            }
            State::Unlocked(u) => {
                s.state = v1::SessionState::Unlocked as i32;
                let mut token = describe(&u.token);
                token.recipients = vec![u.vault.token_recipient().to_owned()];
                s.token = Some(token);
                s.unlocked_at = Some(timestamp(u.unlocked_at));
                let now_i = Instant::now();
                let now_s = SystemTime::now();
                let wall = |at: Instant| now_s + at.saturating_duration_since(now_i);
                s.expires_at = Some(timestamp(wall(u.expires_at)));
                let idle_at = (self.last_activity() + u.idle_timeout).min(u.expires_at);
                s.idle_deadline = Some(timestamp(wall(idle_at)));
                s.generation = u.vault.body.generation;
                s.secret_count = u.vault.body.secrets.len() as u64;
            }
        }
        s
    }

    fn publish(&self) {
        let s = self.status();
        self.status_tx.send_replace(s);
    }

    /// Status updates, starting with the current one.
    pub fn watch_status(&self) -> watch::Receiver<v1::StatusResponse> {
        self.status_tx.subscribe()
    }

    /// Fires once when shutdown begins.
    pub fn shutdown_signal(&self) -> watch::Receiver<bool> {
        self.shutdown_tx.subscribe()
    }

    fn selector(&self) -> Result<Option<Selector>> {
        let Some(t) = self.config.token.as_deref().filter(|t| !t.is_empty()) else {
            return Ok(None);
        };
        Ok(Some(parse_selector(t)?))
    }

    /// The tokens the module sees, with the Keyholder keys found on each.
    pub fn list_tokens(&self) -> Result<Vec<v1::TokenInfo>> {
        tokio::task::block_in_place(|| {
            let mut out = Vec::new();
            for t in self.module.tokens()? {
                let mut info = describe(&t);
                if let Ok(session) = self.module.open(&t) {
                    if let Ok(keys) = session.find_p256_keys(KEY_LABEL) {
                        info.recipients = keys
                            .iter()
                            .map(|k| keyholder_vault::recipient_string(&k.public))
                            .collect();
                    }
                    session.close();
                }
                out.push(info);
            }
            Ok(out)
        })
    }

    /// Creates the vault: a new key on the chosen token, an empty vault
    /// encrypted to it and to `recovery`. Leaves the session locked.
    pub async fn init(
        &self,
        selector: Selector,
        pin: SecretString,
        allow_final_try: bool,
        recovery: Vec<String>,
    ) -> Result<v1::InitResponse> {
        let _writer = self.writer.lock().await;
        for r in &recovery {
            keyholder_vault::check_recovery_recipient(r)?;
        }
        if self.storage.exists()? {
            return Err(Error::VaultExists(self.storage.location()));
        }
        tokio::task::block_in_place(|| {
            let token = self.module.select(&selector)?;
            let mut session = self.module.open(&token)?;
            session.login(&pin, allow_final_try)?;
            let result = (|| {
                let key = session.generate_p256(KEY_LABEL)?;
                let agreement = TokenAgreement {
                    session: &session,
                    key: &key,
                };
                let recipient = keyholder_vault::recipient_string(&key.public);
                let vault = OpenVault::create(
                    &agreement,
                    TokenRecipient {
                        recipient: recipient.clone(),
                        label: token.label.clone(),
                        serial: token.serial.clone(),
                        key_id: keyholder_pki::hex(&key.id),
                    },
                    recovery,
                )?;
                let mut body = vault.body.clone();
                let bytes = vault.next(&mut body)?;
                self.storage.compare_and_store(None, &bytes, body.generation)?;
                record_generation(&session, vault.vault_id(), body.generation);
                tracing::info!(token = %token.label, %recipient, vault = %self.storage.location(), "vault created");
                Ok(v1::InitResponse {
                    vault_path: self.storage.location(),
                    token_recipient: recipient,
                    token: Some(describe(&token)),
                })
            })();
            session.close();
            result
        })
        .inspect(|_| self.publish())
    }

    /// Opens the session: finds the token holding the vault's key, logs in,
    /// decrypts and authenticates the vault.
    pub async fn unlock(
        &self,
        pin: SecretString,
        allow_final_try: bool,
        ttl: Option<Duration>,
        idle: Option<Duration>,
        accept_older: bool,
    ) -> Result<v1::StatusResponse> {
        let ttl = ttl.unwrap_or(self.config.session_ttl);
        if ttl > self.config.max_session_ttl {
            return Err(Error::InvalidArgument {
                field: "ttl_seconds",
                reason: format!(
                    "is longer than the daemon's max_session_ttl ({})",
                    humantime::format_duration(self.config.max_session_ttl)
                ),
            });
        }
        let idle = idle.unwrap_or(self.config.idle_timeout);
        let selector = self.selector()?;
        let _writer = self.writer.lock().await;
        if self.is_unlocked() {
            return Ok(self.status());
        }
        let started = Instant::now();
        let (session, unlocked) = tokio::task::block_in_place(|| {
            let (bytes, mut revision) = self
                .storage
                .load()?
                .ok_or_else(|| Error::NotInitialized(self.storage.location()))?;
            let stanzas = keyholder_vault::probe(&bytes)?;
            let (mut session, token, key) = self.find_vault_token(&stanzas, selector.as_ref())?;
            session.login(&pin, allow_final_try)?;
            let opened = OpenVault::open(
                &bytes,
                &TokenAgreement {
                    session: &session,
                    key: &key,
                },
            );
            let checked = opened.map_err(Error::from).and_then(|mut v| {
                if let Some(recorded) = check_generation(&session, &v, accept_older)? {
                    // An older file accepted on purpose is written back
                    // above the record, so generation numbers never repeat:
                    // a copy from the abandoned history stays refused.
                    v.body.generation = recorded;
                    let mut body = v.body.clone();
                    let bytes = v.next(&mut body)?;
                    revision =
                        self.storage
                            .compare_and_store(Some(&revision), &bytes, body.generation)?;
                    record_generation(&session, v.vault_id(), body.generation);
                    v.body = body;
                }
                Ok(v)
            });
            let vault = match checked {
                Ok(v) => v,
                Err(e) => {
                    session.close();
                    return Err(e);
                }
            };
            Ok((
                session,
                Unlocked {
                    vault,
                    revision,
                    token,
                    key,
                    unlocked_at: SystemTime::now(),
                    expires_at: Instant::now() + ttl,
                    idle_timeout: idle,
                    cas: Mutex::new(HashMap::new()),
                    keys: Mutex::new(HashMap::new()),
                    agent_index: Mutex::new(None),
                },
            ))
        })?;
        tracing::info!(
            token = %unlocked.token.label,
            generation = unlocked.vault.body.generation,
            secrets = unlocked.vault.body.secrets.len(),
            elapsed_ms = started.elapsed().as_secs_f64() * 1000.0,
            "unlocked"
        );
        *self.token_slot() = Some(session);
        self.touch();
        {
            // Under the state lock, so a concurrent lock() cannot drain the
            // key stock before this starts filling it.
            let mut state = self.write_state();
            *state = State::Unlocked(Box::new(unlocked));
            self.key_pool.fill();
        }
        self.publish();
        Ok(self.status())
    }

    fn find_vault_token(
        &self,
        stanzas: &[keyholder_vault::TagStanza],
        selector: Option<&Selector>,
    ) -> Result<(TokenSession, TokenDescription, TokenKey)> {
        let tokens = match selector {
            Some(sel) => vec![self.module.select(sel)?],
            None => self.module.tokens()?,
        };
        let mut looked_at = Vec::new();
        for token in tokens {
            looked_at.push(format!("{:?}", token.label));
            let session = self.module.open(&token)?;
            let keys = session.find_p256_keys(KEY_LABEL)?;
            if let Some(key) = keys
                .into_iter()
                .find(|k| keyholder_vault::addressed_to(stanzas, &k.public))
            {
                return Ok((session, token, key));
            }
            session.close();
        }
        tracing::warn!(tokens = %looked_at.join(", "), "no token holds the vault's key");
        Err(Error::Vault(VaultError::NotForThisToken))
    }

    /// Locks: wipes the open vault, logs out and closes the token session.
    pub fn lock(&self, reason: LockReason) {
        let previous = {
            let mut state = self.write_state();
            self.key_pool.drain();
            std::mem::replace(&mut *state, State::Locked(reason))
        };
        let was_unlocked = matches!(previous, State::Unlocked(_));
        // Dropping Unlocked zeroizes secret values and the MAC key.
        drop(previous);
        self.exec_cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        if let Some(session) = self.token_slot().take() {
            tokio::task::block_in_place(|| session.close());
        }
        if was_unlocked {
            tracing::info!(reason = reason.as_str(), "locked");
        }
        self.publish();
    }

    /// Applies `change` to a copy of the body and stores it; the in-memory
    /// vault is replaced only once the new file is durable.
    pub async fn write<T>(&self, change: impl FnOnce(&mut Body) -> Result<T>) -> Result<(T, u64)> {
        let _writer = self.writer.lock().await;
        let (body_new, out, bytes, expected, vault_id) = {
            let state = self.read_state();
            let State::Unlocked(u) = &*state else {
                return Err(Error::Locked);
            };
            let mut body = u.vault.body.clone();
            let out = change(&mut body)?;
            let bytes = u.vault.next(&mut body)?;
            (
                body,
                out,
                bytes,
                u.revision.clone(),
                u.vault.vault_id().to_owned(),
            )
        };
        let generation = body_new.generation;
        let revision = tokio::task::block_in_place(|| {
            let revision = self
                .storage
                .compare_and_store(Some(&expected), &bytes, generation)?;
            // After the file: a crash in between leaves the file ahead of the
            // record, which the next unlock accepts and catches up.
            match &*self.token_slot() {
                Some(session) => record_generation(session, &vault_id, generation),
                // Locked in between: the next unlock moves the record up.
                None => tracing::warn!(
                    generation,
                    "vault generation not recorded: locked during the write"
                ),
            }
            Ok::<_, Error>(revision)
        })?;
        if let State::Unlocked(u) = &mut *self.write_state() {
            u.vault.body = body_new;
            u.revision = revision;
            // Derived views are rebuilt from the new body on next use.
            u.cas.get_mut().unwrap_or_else(|p| p.into_inner()).clear();
            u.keys.get_mut().unwrap_or_else(|p| p.into_inner()).clear();
            *u.agent_index.get_mut().unwrap_or_else(|p| p.into_inner()) = None;
        }
        self.publish();
        Ok((out, generation))
    }

    /// Checks expiry, idleness and token presence; locks when one is due.
    pub fn tick(&self, check_token: bool) {
        let due = {
            let state = self.read_state();
            let State::Unlocked(u) = &*state else {
                return;
            };
            let now = Instant::now();
            if now >= u.expires_at {
                Some(LockReason::Expired)
            } else if now >= self.last_activity() + u.idle_timeout {
                Some(LockReason::Idle)
            } else {
                None
            }
        };
        if let Some(reason) = due {
            self.lock(reason);
            return;
        }
        if check_token {
            let present = tokio::task::block_in_place(|| match &*self.token_slot() {
                Some(session) => session.check_present(),
                None => Ok(()),
            });
            if let Err(e) = present {
                tracing::warn!(error = %e, "token check failed; locking");
                self.lock(LockReason::TokenRemoved);
            }
        }
    }

    /// Begins shutdown: ends status streams and locks.
    pub fn begin_shutdown(&self) {
        self.shutdown_tx.send_replace(true);
        self.lock(LockReason::Shutdown);
        self.key_pool.stop();
    }
}

/// Identifies one kind of exec credential: cluster, user, sorted groups, TTL.
pub type ExecKey = (String, String, Vec<String>, u64);

/// A certificate and key served to the kubectl credential plugin.
pub struct CachedCredential {
    /// PEM.
    pub certificate_pem: String,
    /// PEM; wiped when dropped.
    pub private_key_pem: zeroize::Zeroizing<String>,
    /// `notAfter`.
    pub expires: SystemTime,
    /// Full lifetime, to decide when to renew.
    pub ttl: Duration,
}

impl Core {
    /// The token slot, for token-backed CA signers.
    pub fn token_slot_handle(&self) -> TokenSlot {
        self.token.clone()
    }

    /// Runs `f` with the logged-in token session.
    pub fn with_token<T>(&self, f: impl FnOnce(&TokenSession) -> Result<T>) -> Result<T> {
        tokio::task::block_in_place(|| match &*self.token_slot() {
            Some(session) => f(session),
            None => Err(Error::Locked),
        })
    }

    /// The CA `name`, loaded and ready to sign.
    pub fn loaded_ca(&self, name: &str) -> Result<Arc<LoadedCa>> {
        self.with_unlocked(|u| {
            let mut cache = u.cas.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(ca) = cache.get(name) {
                return Ok(ca.clone());
            }
            let entry = u.vault.body.cas.get(name).ok_or_else(|| Error::NotFound {
                kind: "CA",
                name: name.to_owned(),
            })?;
            if entry.kind != "x509" {
                return Err(Error::InvalidArgument {
                    field: "ca",
                    reason: format!("{name:?} is an {} CA, not an X.509 one", entry.kind),
                });
            }
            let loaded = Arc::new(crate::ca::load(entry, &self.token, &self.key_pool)?);
            cache.insert(name.to_owned(), loaded.clone());
            Ok(loaded)
        })
    }
}

/// Label of the token data object recording a vault's generation.
fn generation_label(vault_id: &str) -> String {
    format!("keyholder-generation:{vault_id}")
}

/// Rollback detection on unlock: the vault file's generation against the
/// one the token recorded at the last write. An older file is refused
/// unless `accept_older` (a backup restored on purpose), in which case the
/// record is returned and the caller writes the file back above it; a newer
/// one (a crash after the file was written, or a token without a record
/// yet) moves the record up. The record is only as strong as the token:
/// whoever has the PIN can change it too.
fn check_generation(
    session: &TokenSession,
    vault: &OpenVault,
    accept_older: bool,
) -> Result<Option<u64>> {
    let label = generation_label(vault.vault_id());
    let file = vault.body.generation;
    let recorded = match session.read_generation(&label) {
        Ok(recorded) => recorded,
        Err(e) if accept_older => {
            // Replaced below; only the PIN holder can write private objects.
            tracing::warn!(error = %e, "unreadable generation record replaced on request");
            None
        }
        Err(e) => return Err(e.into()),
    };
    match recorded {
        Some(recorded) if file < recorded && !accept_older => {
            tracing::warn!(
                file,
                recorded,
                "vault file older than the token's record refused"
            );
            Err(Error::Rollback { file, recorded })
        }
        Some(recorded) if file < recorded => {
            tracing::warn!(file, recorded, "older vault file accepted on request");
            Ok(Some(recorded))
        }
        Some(recorded) if file == recorded => Ok(None),
        _ => {
            record_generation(session, vault.vault_id(), file);
            Ok(None)
        }
    }
}

/// Records `generation` on the token; a token that cannot store it still
/// works, without rollback detection, and says so in the log.
fn record_generation(session: &TokenSession, vault_id: &str, generation: u64) {
    if let Err(e) = session.store_generation(&generation_label(vault_id), generation) {
        tracing::warn!(error = %e, generation, "cannot record the vault generation on the token");
    }
}

/// Parses a token selector from config or a request: `pkcs11:` URI,
/// `serial:<serial>`, or a bare label.
pub fn parse_selector(s: &str) -> Result<Selector> {
    if s.starts_with("pkcs11:") {
        Ok(Selector::from_uri(s)?)
    } else if let Some(serial) = s.strip_prefix("serial:") {
        Ok(Selector::serial(serial))
    } else {
        Ok(Selector::label(s.strip_prefix("label:").unwrap_or(s)))
    }
}
