//! The session: locked or unlocked, the open vault, the token session, and
//! every transition between them (init, unlock, lock, write, tick).
//!
//! `Core` holds its token through [`keyholder_token::Backend`] and its vault
//! bytes through [`keyholder_vault::Storage`], so another token family or
//! another home for the vault plugs in without touching the services, and
//! tests run it in-process on a software token. Its clock is tokio's, so
//! TTL and idle locking can be tested with a paused clock.
//!
//! Concurrency: `state` is a short-held `std` lock, never held across an
//! await. Writers (Put, Delete, Init, Unlock) take `writer` first, so writes
//! are serialised without blocking readers during encryption and fsync.
//! Token calls block, and go through [`token_call`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use keyholder_token::{
    Backend, KeyPurpose, ObjectSelector, PivGeneration, PivKeyFacts, PivKeyOrigin, PivSlot,
    Selector, Session, TokenDescription, TokenKey,
};
use keyholder_vault::{
    Body, OpenVault, PivKeyRecord, Revision, Storage, StorageError, TokenAgreement, TokenRecipient,
    VaultError,
};
use secrecy::SecretString;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::config::Config;
use crate::damage;
use crate::error::{Error, Result};
use crate::gate::{GateHook, GateHooks};
use crate::keypool::KeyPool;
use crate::rollback;
use crate::signers::{Keyring, KeyringContext, Signer, SshCa, TokenSlot, X509Ca};
pub use crate::status::{
    Initialized, LockReason, SessionState, SessionStatus, TokenListing, UnlockedStatus,
};

/// How many times a write is re-applied after another writer got in first.
pub const WRITE_ATTEMPTS: u32 = 32;

/// How many times a reload of a changed vault is tried again.
const RELOAD_ATTEMPTS: u32 = 5;

/// Label of the vault key objects Keyholder creates on tokens.
pub const KEY_LABEL: &str = "keyholder-vault";

/// Runs a token call, which blocks (a PIN pad, a touch, a USB round trip):
/// on the multi-threaded runtime the worker hands its other tasks off
/// first; elsewhere (a current-thread runtime, a plain thread) it runs in
/// place.
pub fn token_call<T>(call: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(call)
        }
        _ => call(),
    }
}

/// What exists while unlocked. Dropping it wipes the decrypted vault (its
/// secret values and MAC key are zeroizing types) and every loaded key.
pub struct Unlocked {
    /// The decrypted vault.
    pub vault: OpenVault,
    /// The stored revision the vault was read from or last written as.
    revision: Revision,
    /// The token in use.
    pub token: TokenDescription,
    /// Wall-clock time of unlock, for display.
    unlocked_at: SystemTime,
    /// Locks at this instant at the latest.
    expires_at: Instant,
    /// Idle timeout of this session.
    idle_timeout: Duration,
    /// Signers loaded on first use.
    keyring: Keyring,
}

/// Locked or unlocked.
enum State {
    /// No decrypted material in memory.
    Locked(LockReason),
    /// The vault is open.
    Unlocked(Box<Unlocked>),
}

type LockHook = Box<dyn Fn() + Send + Sync>;

/// The daemon's session.
pub struct Core {
    /// Settings.
    pub config: Config,
    tokens: Box<dyn Backend>,
    storage: Box<dyn Storage>,
    state: RwLock<State>,
    /// The logged-in token session while unlocked.
    token: TokenSlot,
    /// Serialises writers.
    writer: tokio::sync::Mutex<()>,
    /// Milliseconds since `epoch` of the last request that used the session.
    last_activity_ms: AtomicU64,
    epoch: Instant,
    status_tx: watch::Sender<SessionStatus>,
    shutdown_tx: watch::Sender<bool>,
    /// Client keys and CA signature nonces made ahead of time while unlocked.
    key_pool: Arc<KeyPool>,
    gate_hooks: RwLock<GateHooks>,
    /// Run on every lock, to wipe what other parts derived from the session.
    lock_hooks: Mutex<Vec<LockHook>>,
    /// The token of the vault (label, serial) and whether the vault has
    /// rollback detection, as last seen at init or unlock: for `tokens`,
    /// which is answered while locked too.
    vault_token: Mutex<Option<(String, String, bool)>>,
    /// The vault key's PIV details (native YubiKey backend), as recorded at
    /// init or read at unlock, or as the card showed them while locked.
    vault_key: Mutex<Option<PivKeyRecord>>,
    /// Unlock on demand: the prompt shown and its back-off.
    on_demand: crate::ondemand::OnDemand,
    /// Policy, grants, the step-up PIN check and the audit sink.
    trust: crate::trust::Trust,
    /// Writes re-applied after another writer got in first.
    storage_conflicts: AtomicU64,
}

impl Drop for Core {
    fn drop(&mut self) {
        self.key_pool.stop();
    }
}

impl Core {
    /// A core over a token backend and a home for the vault.
    pub fn new(
        config: Config,
        tokens: impl Backend + 'static,
        storage: impl Storage + 'static,
    ) -> Arc<Self> {
        let (shutdown_tx, _) = watch::channel(false);
        let key_pool = KeyPool::start(config.key_stock);
        let (status_tx, _) = watch::channel(SessionStatus {
            state: SessionState::Locked(LockReason::Start),
            vault_path: String::new(),
            ssh_agent_socket: None,
            vault_key: None,
        });
        let core = Arc::new(Self {
            config,
            tokens: Box::new(tokens),
            storage: Box::new(storage),
            state: RwLock::new(State::Locked(LockReason::Start)),
            token: Arc::new(Mutex::new(None)),
            writer: tokio::sync::Mutex::new(()),
            last_activity_ms: AtomicU64::new(0),
            epoch: Instant::now(),
            status_tx,
            shutdown_tx,
            key_pool,
            gate_hooks: RwLock::new(Vec::new()),
            lock_hooks: Mutex::new(Vec::new()),
            vault_token: Mutex::new(None),
            vault_key: Mutex::new(None),
            on_demand: Default::default(),
            trust: Default::default(),
            storage_conflicts: AtomicU64::new(0),
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

    fn token_slot(&self) -> std::sync::MutexGuard<'_, Option<Box<dyn Session>>> {
        self.token.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds a hook the gate runs for every operation.
    pub fn add_gate_hook(&self, hook: Arc<dyn GateHook>) {
        self.gate_hooks
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .push(hook);
    }

    pub(crate) fn gate_hooks(&self) -> std::sync::RwLockReadGuard<'_, GateHooks> {
        self.gate_hooks.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds a hook run on every lock, after the vault is wiped.
    pub fn on_lock(&self, hook: impl Fn() + Send + Sync + 'static) {
        self.lock_hooks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Box::new(hook));
    }

    /// Policy, grants, the step-up PIN check and the audit sink.
    pub fn trust(&self) -> &crate::trust::Trust {
        &self.trust
    }

    pub(crate) fn on_demand(&self) -> &crate::ondemand::OnDemand {
        &self.on_demand
    }

    /// The key stock.
    pub fn key_pool(&self) -> &Arc<KeyPool> {
        &self.key_pool
    }

    /// Records activity now (resets the idle timer).
    pub fn touch(&self) {
        let ms = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_activity_ms.store(ms, Ordering::Relaxed);
    }

    fn last_activity(&self) -> Instant {
        let since = Duration::from_millis(self.last_activity_ms.load(Ordering::Relaxed));
        self.epoch.checked_add(since).unwrap_or(self.epoch)
    }

    /// When an idle session locks: `None` when that is beyond what the
    /// clock can represent (never, in practice).
    fn idle_deadline(&self, u: &Unlocked) -> Option<Instant> {
        self.last_activity().checked_add(u.idle_timeout)
    }

    /// Runs `f` on the open vault, or fails with [`Core::locked`].
    pub fn with_unlocked<T>(&self, f: impl FnOnce(&Unlocked) -> Result<T>) -> Result<T> {
        match &*self.read_state() {
            State::Unlocked(u) => f(u),
            State::Locked(_) => Err(self.locked()),
        }
    }

    /// Why a request that needs the open vault cannot be served while
    /// locked: [`Error::NotInitialized`] when there is no vault yet (so the
    /// user is sent to `keyholder init`, not to `unlock`), else
    /// [`Error::Locked`].
    pub fn locked(&self) -> Error {
        match self.storage.exists() {
            Ok(false) => Error::NotInitialized(self.storage.location()),
            _ => Error::Locked,
        }
    }

    /// Runs `f` on the open vault's body, or fails with [`Error::Locked`].
    pub fn with_body<T>(&self, f: impl FnOnce(&Body) -> Result<T>) -> Result<T> {
        self.with_unlocked(|u| f(&u.vault.body))
    }

    /// Whether the session is unlocked.
    pub fn is_unlocked(&self) -> bool {
        matches!(&*self.read_state(), State::Unlocked(_))
    }

    fn keyring_context(&self) -> KeyringContext<'_> {
        KeyringContext {
            slot: &self.token,
            nonces: &self.key_pool,
        }
    }

    /// The X.509 CA `name`, ready to issue.
    pub fn x509_ca(&self, name: &str) -> Result<Arc<X509Ca>> {
        self.with_unlocked(|u| {
            u.keyring
                .x509_ca(name, &u.vault.body, &self.keyring_context())
        })
    }

    /// The SSH CA `name`, ready to sign.
    pub fn ssh_ca(&self, name: &str) -> Result<Arc<SshCa>> {
        self.with_unlocked(|u| {
            u.keyring
                .ssh_ca(name, &u.vault.body, &self.keyring_context())
        })
    }

    /// The signing key `name`.
    pub fn key(&self, name: &str) -> Result<Arc<Signer>> {
        self.with_unlocked(|u| u.keyring.key(name, &u.vault.body, &self.keyring_context()))
    }

    /// The token session, for token-backed signers made outside the keyring.
    pub fn token_slot_handle(&self) -> TokenSlot {
        self.token.clone()
    }

    /// Runs `f` with the logged-in token session.
    pub fn with_token<T>(&self, f: impl FnOnce(&dyn Session) -> Result<T>) -> Result<T> {
        token_call(|| match &*self.token_slot() {
            Some(session) => f(session.as_ref()),
            None => Err(self.locked()),
        })
    }

    /// The status now.
    pub fn status(&self) -> SessionStatus {
        let exists = self.storage.exists().unwrap_or(true);
        let state = match &*self.read_state() {
            State::Locked(_) if !exists => SessionState::Uninitialized,
            State::Locked(reason) => SessionState::Locked(*reason),
            State::Unlocked(u) => {
                let now_i = Instant::now();
                let now_s = SystemTime::now();
                let wall = |at: Instant| {
                    now_s
                        .checked_add(at.saturating_duration_since(now_i))
                        .unwrap_or(now_s)
                };
                let idle_at = self
                    .idle_deadline(u)
                    .map_or(u.expires_at, |at| at.min(u.expires_at));
                SessionState::Unlocked(Box::new(UnlockedStatus {
                    token: u.token.clone(),
                    recipient: u.vault.token_recipient().to_owned(),
                    unlocked_at: u.unlocked_at,
                    expires_at: wall(u.expires_at),
                    idle_deadline: wall(idle_at),
                    generation: u.vault.body.generation,
                    secret_count: u64::try_from(u.vault.body.secrets.len()).unwrap_or(u64::MAX),
                    rollback_protection: rollback::protected(&u.vault),
                }))
            }
        };
        SessionStatus {
            state,
            vault_path: self.storage.location(),
            ssh_agent_socket: self
                .config
                .ssh_agent
                .then(|| self.config.ssh_agent_socket.clone()),
            vault_key: self.known_vault_key(),
        }
    }

    /// The vault key's PIV details, when known.
    pub fn known_vault_key(&self) -> Option<PivKeyRecord> {
        self.vault_key
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    fn remember_vault_key(&self, record: Option<PivKeyRecord>) {
        *self
            .vault_key
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = record;
    }

    /// Reads the vault key's slot and policies from the card (no PIN, no
    /// attestation) when they are not known yet, so a locked daemon can tell
    /// a client that the key waits for a touch. For the native YubiKey
    /// backend; card errors are only logged. Called once at start.
    pub fn probe_vault_key(&self) {
        if self.known_vault_key().is_some() {
            return;
        }
        let Some(stanzas) = self
            .storage
            .load()
            .ok()
            .flatten()
            .and_then(|(bytes, _)| keyholder_vault::probe(&bytes).ok())
        else {
            return;
        };
        let found = token_call(|| -> Result<Option<PivKeyRecord>> {
            for token in self.tokens.tokens()? {
                let session = self.tokens.open(&token)?;
                let key = session
                    .find_p256_keys(None)
                    .unwrap_or_default()
                    .into_iter()
                    .find(|k| keyholder_vault::addressed_to(&stanzas, &k.public));
                let facts = match &key {
                    Some(k) => session.piv_key_facts(k, false),
                    None => Ok(None),
                };
                session.close();
                if key.is_some() {
                    return Ok(facts?.map(|f| live_record(&f)));
                }
            }
            Ok(None)
        });
        match found {
            Ok(Some(record)) => self.remember_vault_key(Some(record)),
            Ok(None) => {}
            Err(e) => {
                tracing::debug!(error = %crate::escape::Escaped(&e), "vault key details not read from the card")
            }
        }
    }

    fn publish(&self) {
        let s = self.status();
        self.status_tx.send_replace(s);
    }

    /// Status updates, starting with the current one.
    pub fn watch_status(&self) -> watch::Receiver<SessionStatus> {
        self.status_tx.subscribe()
    }

    /// Fires once when shutdown begins.
    pub fn shutdown_signal(&self) -> watch::Receiver<bool> {
        self.shutdown_tx.subscribe()
    }

    /// The token backend the daemon was started with.
    pub(crate) fn backend(&self) -> &dyn Backend {
        self.tokens.as_ref()
    }

    /// The configured PKCS#11 module's path, as recorded in a token's
    /// entry (empty with the native YubiKey backend).
    pub(crate) fn module_name(&self) -> String {
        match self.config.token_backend {
            crate::config::TokenBackend::Pkcs11 => self
                .config
                .pkcs11_module
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            crate::config::TokenBackend::Yubikey => String::new(),
        }
    }

    fn selector(&self) -> Result<Option<Selector>> {
        let Some(t) = self.config.token.as_deref().filter(|t| !t.is_empty()) else {
            return Ok(None);
        };
        Ok(Some(parse_selector(t)?))
    }

    /// The tokens the backend sees, with the Keyholder keys found on each.
    pub fn list_tokens(&self) -> Result<Vec<TokenListing>> {
        // The vault's stanzas (no token operation): a key the vault is
        // encrypted to is listed whatever its label (an adopted key, or a
        // PIV slot's key, whose label the module chooses).
        let stanzas = self
            .storage
            .load()
            .ok()
            .flatten()
            .and_then(|(bytes, _)| keyholder_vault::probe(&bytes).ok())
            .unwrap_or_default();
        token_call(|| {
            let mut out = Vec::new();
            for token in self.tokens.tokens()? {
                let mut recipients = Vec::new();
                let mut holds_vault = false;
                if let Ok(session) = self.tokens.open(&token) {
                    let mut keys = session.find_p256_keys(Some(KEY_LABEL)).unwrap_or_default();
                    if !stanzas.is_empty() {
                        let others: Vec<TokenKey> = session
                            .find_p256_keys(None)
                            .unwrap_or_default()
                            .into_iter()
                            .filter(|k| {
                                keyholder_vault::addressed_to(&stanzas, &k.public)
                                    && !keys.contains(k)
                            })
                            .collect();
                        keys.extend(others);
                    }
                    holds_vault = keys
                        .iter()
                        .any(|k| keyholder_vault::addressed_to(&stanzas, &k.public));
                    recipients = keys
                        .iter()
                        .map(|k| keyholder_vault::recipient_string(&k.public))
                        .collect();
                    session.close();
                }
                let rollback_protection = self
                    .vault_token
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .as_ref()
                    .filter(|(label, serial, _)| *label == token.label && *serial == token.serial)
                    .map(|(_, _, on)| *on);
                let vault_key = (holds_vault || rollback_protection.is_some())
                    .then(|| self.known_vault_key())
                    .flatten();
                out.push(TokenListing {
                    token,
                    recipients,
                    rollback_protection,
                    vault_key,
                });
            }
            Ok(out)
        })
    }

    /// With the native YubiKey backend, a card still on the factory default
    /// management key is refused unless `allowed`: with that key anyone
    /// holding the card replaces its keys without the PIN. (Through ykcs11
    /// Keyholder cannot tell which backend's card it is; docs/yubikey.md
    /// says to change the key there too.)
    pub(crate) fn check_management_key(
        &self,
        token: &TokenDescription,
        key: &SecretString,
        allowed: bool,
        protect: bool,
    ) -> Result<()> {
        use secrecy::ExposeSecret;
        let default = key
            .expose_secret()
            .trim()
            .eq_ignore_ascii_case(keyholder_token::DEFAULT_MANAGEMENT_KEY);
        if self.config.token_backend != crate::config::TokenBackend::Yubikey || !default {
            return Ok(());
        }
        if allowed {
            tracing::warn!(token = ?token.label, "vault key generated with the factory default management key, as requested");
            return Ok(());
        }
        if protect {
            // Replaced by a PIN-protected random key before the key is made.
            return Ok(());
        }
        Err(Error::DefaultManagementKey {
            token: token.label.clone(),
        })
    }

    /// For a key in a PIV card reached natively: reads what the card says
    /// of it (slot, policies, origin, attestation), decides whether it is
    /// enrolled (see `keyholder_pki::attestation::enroll`) and returns the
    /// record kept in the vault. `None` for other tokens.
    pub(crate) fn enroll(
        &self,
        token: &TokenDescription,
        session: &dyn Session,
        key: &TokenKey,
        how: &NewVaultKey,
        roots: &keyholder_pki::attestation::AttestationRoots,
        enrollment: &Enrollment,
    ) -> Result<Option<PivKeyRecord>> {
        use keyholder_pki::attestation::enroll::{Evidence, Outcome, decide, describe};
        let Some(facts) = session.piv_key_facts(key, true)? else {
            return Ok(None);
        };
        let slot = u8::from_str_radix(&facts.slot, 16).unwrap_or_default();
        let point = {
            use p256::elliptic_curve::sec1::ToEncodedPoint;
            key.public.to_encoded_point(false)
        };
        let attestation = facts
            .attestation
            .as_ref()
            .map(|r| r.as_ref().map(Vec::as_slice).map_err(String::as_str));
        let evidence = Evidence {
            slot,
            enrolled_key: point.as_bytes(),
            imported: facts.origin.map(|o| o == PivKeyOrigin::Imported),
            card_certificate: facts.card_certificate.as_deref(),
            attestation,
        };
        let outcome =
            decide(&evidence, roots, &[], enrollment.allow_imported_key).map_err(|e| {
                let generated = matches!(how, NewVaultKey::PivSlot { .. });
                Error::NotEnrolled {
                    token: token.label.clone(),
                    reason: if generated {
                        format!(
                            "{e} (the key generated in slot {} stays on the card)",
                            facts.slot
                        )
                    } else {
                        e.to_string()
                    },
                }
            })?;
        let mut record = live_record(&facts);
        if let NewVaultKey::PivSlot {
            generation,
            management_key,
            ..
        } = how
        {
            use secrecy::ExposeSecret;
            if generation.protect_management_key || management_key.expose_secret().trim().is_empty()
            {
                record.management_key = "pin-protected".into();
            }
            // What the card was told, where it does not say.
            if record.pin_policy.is_empty() {
                record.pin_policy = generation.pin_policy.to_string();
            }
            if record.touch_policy.is_empty() {
                record.touch_policy = generation.touch_policy.to_string();
            }
        }
        match outcome {
            Outcome::Attested(a) => {
                record.attested = true;
                record.attestation = describe(&a);
                record.firmware = a.firmware.to_string();
                record.pin_policy = a.pin_policy.to_string();
                record.touch_policy = a.touch_policy.to_string();
                record.form_factor = a.form_factor.map(|f| f.to_string()).unwrap_or_default();
                if a.serial.to_string() != facts.serial {
                    return Err(Error::NotEnrolled {
                        token: token.label.clone(),
                        reason: format!(
                            "the attestation names YubiKey serial {}, but the card says {}",
                            a.serial, facts.serial
                        ),
                    });
                }
                tracing::info!(token = ?token.label, attestation = %record.attestation, "vault key attested");
            }
            Outcome::NotAttested { reason } => {
                record.attestation = reason;
                tracing::warn!(token = ?token.label, reason = %record.attestation, "vault key not attested");
            }
        }
        Ok(Some(record))
    }

    fn remember_vault_token(&self, token: &TokenDescription, rollback_protection: bool) {
        *self
            .vault_token
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some((
            token.label.clone(),
            token.serial.clone(),
            rollback_protection,
        ));
    }

    /// Creates the vault: a new key on the chosen token, an empty vault
    /// encrypted to it and to `recovery`. Leaves the session locked.
    pub async fn init(
        &self,
        selector: Selector,
        pin: SecretString,
        allow_final_try: bool,
        recovery: Vec<String>,
        without_rollback_protection: bool,
        vault_key: NewVaultKey,
    ) -> Result<Initialized> {
        self.init_with(
            selector,
            pin,
            allow_final_try,
            recovery,
            without_rollback_protection,
            vault_key,
            Enrollment::default(),
        )
        .await
    }

    /// [`Core::init`], with what decides the enrollment of a PIV key.
    #[allow(clippy::too_many_arguments)]
    pub async fn init_with(
        &self,
        selector: Selector,
        pin: SecretString,
        allow_final_try: bool,
        recovery: Vec<String>,
        without_rollback_protection: bool,
        vault_key: NewVaultKey,
        mut enrollment: Enrollment,
    ) -> Result<Initialized> {
        if let Some(path) = &self.config.attestation_roots {
            let pem = std::fs::read_to_string(path).map_err(|e| Error::InvalidArgument {
                field: "attestation_roots",
                reason: format!("keyholderd's attestation_roots {}: {e}", path.display()),
            })?;
            enrollment.attestation_roots_pem.push('\n');
            enrollment.attestation_roots_pem.push_str(&pem);
        }
        let roots = enrollment.roots()?;
        let _writer = self.writer.lock().await;
        for r in &recovery {
            keyholder_vault::check_recovery_recipient(r)?;
        }
        if self.storage.exists()? {
            return Err(Error::VaultExists(self.storage.location()));
        }
        token_call(|| {
            let token = self.tokens.select(&selector)?;
            let mut session = self.tokens.open(&token)?;
            session.login(&pin, allow_final_try)?;
            let result = (|| {
                // Before the key is made: a token that cannot hold the
                // generation record gets a vault only on explicit request.
                let protected = match rollback::token_can_record(session.as_ref()) {
                    Ok(()) => true,
                    Err(e) if without_rollback_protection => {
                        tracing::warn!(token = ?token.label, error = %crate::escape::Escaped(&e), "vault created without rollback detection, as requested: the token cannot store the record");
                        false
                    }
                    Err(e) => {
                        return Err(Error::NoRollbackRecord {
                            token: token.label.clone(),
                            reason: e.to_string(),
                        });
                    }
                };
                let key = match &vault_key {
                    NewVaultKey::Adopt(object) => session.find_p256_derive_key(object)?,
                    NewVaultKey::Generate => session
                        .generate_p256(KEY_LABEL, KeyPurpose::Derive)
                        .map_err(|e| piv_hint(&token, e, PIV_INIT_ADVICE))?,
                    NewVaultKey::PivSlot {
                        slot,
                        management_key,
                        allow_default_management_key,
                        generation,
                    } => {
                        self.check_management_key(
                            &token,
                            management_key,
                            *allow_default_management_key,
                            generation.protect_management_key,
                        )?;
                        session.generate_p256_in_piv_slot_with(
                            KEY_LABEL,
                            KeyPurpose::Derive,
                            *slot,
                            management_key,
                            &pin,
                            generation,
                            &|public| {
                                use p256::elliptic_curve::sec1::ToEncodedPoint;
                                let point = public.to_encoded_point(false);
                                keyholder_pki::x509::slot_certificate(point.as_bytes(), KEY_LABEL)
                                    .map_err(|e| e.to_string())
                            },
                        )?
                    }
                };
                let piv = self.enroll(&token, session.as_ref(), &key, &vault_key, &roots, &enrollment)?;
                let agreement = TokenAgreement {
                    session: session.as_ref(),
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
                        piv: piv.clone(),
                        backend: self.config.token_backend.as_str().to_owned(),
                        module: self.module_name(),
                        enrolled_at: String::new(),
                        last_used: String::new(),
                        rollback_record: true,
                    },
                    recovery,
                )?;
                let mut body = vault.body.clone();
                body.rollback_protection = protected;
                let bytes = vault.next(&mut body)?;
                self.storage.compare_and_store(None, &bytes, body.generation)?;
                if protected {
                    rollback::record(session.as_ref(), vault.vault_id(), body.generation);
                }
                self.remember_vault_token(&token, protected);
                self.remember_vault_key(piv.clone());
                tracing::info!(token = ?token.label, %recipient, vault = %self.storage.location(), "vault created");
                Ok(Initialized {
                    vault_path: self.storage.location(),
                    token_recipient: recipient,
                    token: token.clone(),
                    vault_key: piv,
                })
            })();
            session.close();
            result
        })
        .inspect(|_| self.publish())
    }

    /// Opens the session: finds the token holding the vault's key, logs in,
    /// decrypts and authenticates the vault. `ttl` and `idle` default to the
    /// configured ones. Already unlocked, it reports the open session.
    pub async fn unlock(
        &self,
        pin: SecretString,
        allow_final_try: bool,
        ttl: Option<Duration>,
        idle: Option<Duration>,
        accept_older: bool,
    ) -> Result<SessionStatus> {
        match self
            .unlock_if_locked(pin, allow_final_try, ttl, idle, accept_older)
            .await?
        {
            Some(status) => Ok(status),
            None => Ok(self.status()),
        }
    }

    /// Like [`Core::unlock`], but `None` when the session was already
    /// unlocked: then the PIN was not checked, and nothing was done. Decided
    /// under the writer lock, so a concurrent unlock cannot slip in between.
    pub async fn unlock_if_locked(
        &self,
        pin: SecretString,
        allow_final_try: bool,
        ttl: Option<Duration>,
        idle: Option<Duration>,
        accept_older: bool,
    ) -> Result<Option<SessionStatus>> {
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
        if idle > self.config.max_session_ttl {
            return Err(Error::InvalidArgument {
                field: "idle_timeout_seconds",
                reason: format!(
                    "is longer than the daemon's max_session_ttl ({})",
                    humantime::format_duration(self.config.max_session_ttl)
                ),
            });
        }
        let selector = self.selector()?;
        let _writer = self.writer.lock().await;
        if self.is_unlocked() {
            return Ok(None);
        }
        let started = Instant::now();
        let (session, unlocked) = token_call(|| {
            let (bytes, mut revision) = self
                .storage
                .load()?
                .ok_or_else(|| Error::NotInitialized(self.storage.location()))?;
            let (stanzas, header_damage) = damage::probe(self.storage.as_ref(), &bytes)?;
            let (mut session, token, key) = self.find_vault_token(&stanzas, selector.as_ref())?;
            if let Err(e) = session.login(&pin, allow_final_try) {
                session.close();
                return Err(e.into());
            }
            let opened = match header_damage {
                Some(reason) => Err(VaultError::Damaged(reason)),
                None => OpenVault::open(
                    &bytes,
                    &TokenAgreement {
                        session: session.as_ref(),
                        key: &key,
                    },
                ),
            };
            let opened = match opened {
                Err(VaultError::Damaged(reason)) => {
                    let storage = self.storage.as_ref();
                    let restore = damage::newest_intact(storage, session.as_ref(), &key, &bytes);
                    session.close();
                    return Err(damage::damaged(storage, reason, restore));
                }
                other => other,
            };
            let checked = opened.map_err(Error::from).and_then(|mut v| {
                if let Some(recorded) = rollback::check(session.as_ref(), &v, accept_older)? {
                    // An older file accepted on purpose is written back
                    // above the record, so generation numbers never repeat:
                    // a copy from the abandoned history stays refused.
                    v.body.generation = recorded;
                    let mut body = v.body.clone();
                    let bytes = v.next(&mut body)?;
                    revision =
                        self.storage
                            .compare_and_store(Some(&revision), &bytes, body.generation)?;
                    rollback::record(session.as_ref(), v.vault_id(), body.generation);
                    v.body = body;
                } else {
                    // Authentic: a store's local copy may take these bytes.
                    self.storage.opened(&bytes, &revision);
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
            let now = Instant::now();
            let expires_at = now.checked_add(ttl).ok_or_else(|| Error::InvalidArgument {
                field: "ttl_seconds",
                reason: "is too long".into(),
            });
            let expires_at = match expires_at {
                Ok(at) => at,
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
                    unlocked_at: SystemTime::now(),
                    expires_at,
                    idle_timeout: idle,
                    keyring: Keyring::default(),
                },
            ))
        })?;
        tracing::info!(
            token = ?unlocked.token.label,
            generation = unlocked.vault.body.generation,
            secrets = unlocked.vault.body.secrets.len(),
            elapsed_ms = started.elapsed().as_secs_f64() * 1000.0,
            "unlocked"
        );
        self.remember_vault_token(&unlocked.token, rollback::protected(&unlocked.vault));
        let recorded = unlocked
            .vault
            .body
            .recipients
            .tokens
            .iter()
            .find(|t| t.recipient == unlocked.vault.token_recipient())
            .and_then(|t| t.piv.clone());
        if recorded.is_some() {
            self.remember_vault_key(recorded);
        }
        *self.token_slot() = Some(session);
        self.trust.remember_pin(&pin);
        self.touch();
        {
            // Under the state lock, so a concurrent lock() cannot drain the
            // key stock before this starts filling it.
            let mut state = self.write_state();
            *state = State::Unlocked(Box::new(unlocked));
            self.key_pool.fill();
        }
        self.publish();
        // The session's first anchor; should it fail, the unlock's own
        // record fails too and the caller hears of it.
        if let Err(e) = self.audit_anchor().await {
            tracing::warn!(error = %crate::escape::Escaped(&e), "no audit anchor at unlock");
        }
        drop(_writer);
        self.record_last_used().await;
        Ok(Some(self.status()))
    }

    fn find_vault_token(
        &self,
        stanzas: &[keyholder_vault::TagStanza],
        selector: Option<&Selector>,
    ) -> Result<(Box<dyn Session>, TokenDescription, TokenKey)> {
        let tokens = match selector {
            Some(sel) => vec![self.tokens.select(sel)?],
            None => self.tokens.tokens()?,
        };
        let mut looked_at = Vec::new();
        for token in tokens {
            looked_at.push(format!("{:?}", token.label));
            let session = self.tokens.open(&token)?;
            // One search over every P-256 public key, whatever its label: a
            // key adopted at init, or a PIV slot's, has the module's label.
            // The stanza's tag names the key.
            let found = session
                .find_p256_keys(None)?
                .into_iter()
                .find(|k| keyholder_vault::addressed_to(stanzas, &k.public));
            if let Some(key) = found {
                return Ok((session, token, key));
            }
            session.close();
        }
        tracing::warn!(tokens = ?looked_at.join(", "), "no token holds the vault's key");
        Err(Error::Vault(VaultError::NotForThisToken))
    }

    /// Locks: wipes the open vault and everything derived from it, logs out
    /// and closes the token session. Returns whether it was unlocked.
    pub fn lock(&self, reason: LockReason) -> bool {
        self.audit_on_lock(reason);
        let previous = {
            let mut state = self.write_state();
            self.key_pool.drain();
            std::mem::replace(&mut *state, State::Locked(reason))
        };
        let was_unlocked = matches!(previous, State::Unlocked(_));
        // Dropping Unlocked zeroizes secret values, the MAC key and the
        // loaded keys.
        drop(previous);
        self.trust.on_lock();
        for hook in self
            .lock_hooks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            hook();
        }
        if let Some(session) = self.token_slot().take() {
            token_call(|| session.close());
        }
        if was_unlocked {
            tracing::info!(reason = reason.as_str(), "locked");
            self.trust.metrics.locked(reason.as_str());
        }
        self.publish();
        was_unlocked
    }

    /// Applies `change` to a copy of the body and stores it; the in-memory
    /// vault is replaced only once the new file is durable. Returns what
    /// `change` returned and the new generation.
    ///
    /// In a shared store (etcd) another daemon may have written first: the
    /// store refuses the write ([`StorageError::Changed`], ABORTED), and
    /// the vault is read again, so that the caller can retry. Writes whose
    /// change can be applied again use [`Core::write_retrying`].
    pub async fn write<T>(&self, change: impl FnOnce(&mut Body) -> Result<T>) -> Result<(T, u64)> {
        let mut once = Some(change);
        self.write_attempts(
            |body| match once.take() {
                Some(change) => change(body),
                None => Err(Error::Internal("a one-time change applied twice".into())),
            },
            0,
        )
        .await
    }

    /// Like [`Core::write`], but when another writer got in first the
    /// vault is read again and `change` applied to the new version, up to
    /// [`WRITE_ATTEMPTS`] times; so `change` must decide from the body it
    /// is given alone.
    pub async fn write_retrying<T>(
        &self,
        change: impl FnMut(&mut Body) -> Result<T>,
    ) -> Result<(T, u64)> {
        self.write_attempts(change, WRITE_ATTEMPTS).await
    }

    async fn write_attempts<T>(
        &self,
        mut change: impl FnMut(&mut Body) -> Result<T>,
        retries: u32,
    ) -> Result<(T, u64)> {
        let _writer = self.writer.lock().await;
        // The audit log's head goes into the vault with every write, after
        // an anchor: a log that cannot be written stops the write here.
        let audit_head = self.audit_anchor().await?;
        let mut attempt = 0u32;
        let (out, body_new, revision, generation) = loop {
            let (body_new, out, bytes, expected, vault_id, own_recipient) = {
                let state = self.read_state();
                let State::Unlocked(u) = &*state else {
                    return Err(self.locked());
                };
                let mut body = u.vault.body.clone();
                let out = change(&mut body)?;
                if let Some(head) = &audit_head {
                    body.audit_head = Some(head.clone());
                }
                let bytes = u.vault.next(&mut body)?;
                (
                    body,
                    out,
                    bytes,
                    u.revision.clone(),
                    u.vault.vault_id().to_owned(),
                    u.vault.token_recipient().to_owned(),
                )
            };
            let generation = body_new.generation;
            // A token enrolled without a rollback record writes none.
            let protected = body_new.rollback_protection
                && body_new
                    .recipients
                    .tokens
                    .iter()
                    .find(|t| t.recipient == own_recipient)
                    .is_none_or(|t| t.rollback_record);
            let stored = token_call(|| {
                let revision =
                    self.storage
                        .compare_and_store(Some(&expected), &bytes, generation)?;
                // After the file: a crash in between leaves the file ahead of the
                // record, which the next unlock accepts and catches up.
                match &*self.token_slot() {
                    Some(_) if !protected => {}
                    Some(session) => rollback::record(session.as_ref(), &vault_id, generation),
                    // Locked in between: the next unlock moves the record up.
                    None => tracing::warn!(
                        generation,
                        "vault generation not recorded: locked during the write"
                    ),
                }
                Ok::<_, Error>(revision)
            });
            match stored {
                Ok(revision) => break (out, body_new, revision, generation),
                Err(Error::Storage(StorageError::Changed(_))) if attempt < retries => {
                    attempt += 1;
                    self.storage_conflicts.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(
                        attempt,
                        "write conflict: another keyholderd wrote the vault first; reading it again and re-applying the change"
                    );
                    self.reload_locked()?;
                }
                Err(e @ Error::Storage(StorageError::Changed(_))) => {
                    self.storage_conflicts.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(
                        "write conflict: another keyholderd wrote the vault first; the write is refused (ABORTED) and the vault read again"
                    );
                    if let Err(reload) = self.reload_locked() {
                        tracing::warn!(error = %crate::escape::Escaped(&reload), "the vault was not read again after a conflict");
                    }
                    return Err(e);
                }
                Err(e) => return Err(e),
            }
        };
        let replaced = match &mut *self.write_state() {
            State::Unlocked(u) => {
                u.revision = revision;
                // Signers are loaded from the new body on next use.
                u.keyring.clear();
                Some(std::mem::replace(&mut u.vault.body, body_new))
            }
            State::Locked(_) => None,
        };
        // Freeing a large body (every entry wiped as it goes) takes a while:
        // not under the state lock, and not before the answer.
        if let Some(old) = replaced {
            tokio::task::spawn_blocking(move || drop(old));
        }
        self.publish();
        Ok((out, generation))
    }

    /// How many writes found the store changed by another writer and were
    /// re-applied, since start.
    pub fn storage_conflicts(&self) -> u64 {
        self.storage_conflicts.load(Ordering::Relaxed)
    }

    /// Follows a shared store (etcd): whenever another daemon stores a new
    /// version, an unlocked session reads and decrypts it with its token
    /// session (no PIN, no new token login). Needs a tokio runtime; does
    /// nothing for a store without a watch (the local file).
    pub fn follow_storage(self: &Arc<Self>) {
        let (tx, mut rx) = watch::channel(None::<Revision>);
        let watching = self.storage.watch(Box::new(move |revision| {
            tx.send_replace(Some(revision));
        }));
        if !watching {
            return;
        }
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            while rx.changed().await.is_ok() {
                let revision = rx.borrow_and_update().clone();
                let Some(core) = weak.upgrade() else {
                    break;
                };
                if let Some(revision) = revision {
                    core.reload_if_changed(&revision).await;
                }
            }
        });
    }

    /// Reads the vault again if the store holds another version than the
    /// open one (see [`Core::follow_storage`]); failures are logged, and the
    /// open version keeps serving.
    pub async fn reload_if_changed(&self, revision: &Revision) {
        let writer = self.writer.lock().await;
        let current = match &*self.read_state() {
            State::Unlocked(u) => u.revision.clone(),
            State::Locked(_) => return,
        };
        if current == *revision {
            return;
        }
        match self.reload_locked() {
            Ok(true) => {
                let generation = self.with_body(|b| Ok(b.generation)).unwrap_or(0);
                tracing::info!(generation, "vault changed in the store: reloaded");
            }
            Ok(false) => {}
            // This session's token is no longer one the vault is encrypted
            // to (revoked by another daemon): the session ends rather than
            // serve what its token may no longer open.
            Err(e @ Error::Vault(VaultError::NotForThisToken | VaultError::NoTokens)) => {
                drop(writer);
                tracing::warn!(error = %crate::escape::Escaped(&e), "the stored vault no longer opens with this session's token (revoked?); locking");
                self.lock(LockReason::CheckFailed);
            }
            Err(e) => {
                tracing::warn!(error = %crate::escape::Escaped(&e), "vault changed in the store but was not reloaded; serving the open version")
            }
        }
    }

    /// With the writer lock held: reads the stored vault and, if it is not
    /// the open version, decrypts it with the logged-in token session,
    /// checks it against the token's generation record and puts it in
    /// place. `false` when it was the open version or the session is locked.
    fn reload_locked(&self) -> Result<bool> {
        let (current, open_id, open_generation) = match &*self.read_state() {
            State::Unlocked(u) => (
                u.revision.clone(),
                u.vault.vault_id().to_owned(),
                u.vault.body.generation,
            ),
            State::Locked(_) => return Ok(false),
        };
        // Read, open and check again on failure, a few times: another
        // daemon on the same token may commit and move the token's
        // generation record up between this read and the check (which
        // then looks like an older vault), or rewrite the record while it
        // is read. A real rollback or damage stays and is reported.
        let mut attempt = 0;
        let loaded = loop {
            match self.reload_once(&current, &open_id, open_generation) {
                // Not a passing state: refused at once.
                Err(e @ Error::StoreRefused(_)) => return Err(e),
                Err(e) if attempt < RELOAD_ATTEMPTS => {
                    attempt += 1;
                    tracing::debug!(attempt, error = %crate::escape::Escaped(&e), "vault not reloaded; reading it again");
                    std::thread::sleep(Duration::from_millis(20));
                }
                other => break other?,
            }
        };
        let Some((vault, revision)) = loaded else {
            return Ok(false);
        };
        let replaced = match &mut *self.write_state() {
            State::Unlocked(u) => {
                u.revision = revision;
                u.keyring.clear();
                Some(std::mem::replace(&mut u.vault, vault))
            }
            State::Locked(_) => None,
        };
        drop(replaced);
        self.publish();
        Ok(true)
    }

    /// One read of the stored vault for [`Core::reload_locked`]: `None`
    /// when it is the version `current`.
    ///
    /// Whatever the token's own record allows, the stored vault must be the
    /// open vault (`open_id`) at the open generation or a later one: a
    /// session never moves back, and never to another vault, however
    /// authentic (an older copy put back in the store by someone with
    /// write access to it, or a vault sealed under keys a revoked token's
    /// holder kept, under another id).
    fn reload_once(
        &self,
        current: &Revision,
        open_id: &str,
        open_generation: u64,
    ) -> Result<Option<(OpenVault, Revision)>> {
        token_call(|| -> Result<Option<(OpenVault, Revision)>> {
            let (bytes, revision) = self
                .storage
                .load()?
                .ok_or_else(|| Error::NotInitialized(self.storage.location()))?;
            if revision == *current {
                return Ok(None);
            }
            let stanzas = keyholder_vault::probe(&bytes)?;
            let slot = self.token_slot();
            let Some(session) = slot.as_ref() else {
                return Err(self.locked());
            };
            let key = session
                .find_p256_keys(None)?
                .into_iter()
                .find(|k| keyholder_vault::addressed_to(&stanzas, &k.public))
                .ok_or(Error::Vault(VaultError::NotForThisToken))?;
            let vault = OpenVault::open(
                &bytes,
                &TokenAgreement {
                    session: session.as_ref(),
                    key: &key,
                },
            )?;
            if vault.vault_id() != open_id {
                return Err(Error::StoreRefused(format!(
                    "it is another vault (id {:?}, the open one is {open_id:?})",
                    vault.vault_id()
                )));
            }
            // The same generation is the open version itself, read under
            // another revision (a session opened from etcd's local copy, which
            // has none): generation numbers never repeat with other content.
            if vault.body.generation < open_generation {
                return Err(Error::StoreRefused(format!(
                    "it is generation {}, older than the open generation {open_generation}",
                    vault.body.generation
                )));
            }
            rollback::check(session.as_ref(), &vault, false)?;
            self.storage.opened(&bytes, &revision);
            Ok(Some((vault, revision)))
        })
    }

    /// Writes an audit anchor keyed by the open vault and returns the
    /// head to record in the vault; `None` without an audit log.
    async fn audit_anchor(&self) -> Result<Option<keyholder_vault::AuditHead>> {
        let Some(sink) = self.audit_sink() else {
            return Ok(None);
        };
        let Some(log) = sink.log() else {
            return Ok(None);
        };
        let key = self.with_unlocked(|u| Ok(u.vault.audit_key()))?;
        let head = log.anchor(&key).await?;
        Ok(Some(keyholder_vault::AuditHead {
            seq: head.seq,
            hash: head.hash,
        }))
    }

    /// While unlocked: records the lock and its reason, anchors the log and
    /// writes its head into the vault, so that `audit verify` detects the
    /// log cut back behind this point. Never fails the lock: what cannot
    /// be recorded is logged and skipped.
    fn audit_on_lock(&self, reason: LockReason) {
        let Some(sink) = self.audit_sink() else {
            return;
        };
        let Some(log) = sink.log() else {
            return;
        };
        let Ok(key) = self.with_unlocked(|u| Ok(u.vault.audit_key())) else {
            return;
        };
        let Some(head) = log.lock_records(reason.as_str(), Some(&key)) else {
            return;
        };
        // Without the token (or after a failed check) the vault is left as
        // it is: the anchor in the log stands, the head stays at the last
        // write or lock.
        if matches!(reason, LockReason::TokenRemoved | LockReason::CheckFailed) {
            return;
        }
        // A write in progress keeps the writer lock: its own head stands.
        let Ok(_writer) = self.writer.try_lock() else {
            return;
        };
        let prepared = {
            let state = self.read_state();
            let State::Unlocked(u) = &*state else {
                return;
            };
            let mut body = u.vault.body.clone();
            body.audit_head = Some(keyholder_vault::AuditHead {
                seq: head.seq,
                hash: head.hash,
            });
            u.vault.next(&mut body).map(|bytes| {
                (
                    bytes,
                    body.generation,
                    rollback::protected(&u.vault),
                    u.revision.clone(),
                    u.vault.vault_id().to_owned(),
                )
            })
        };
        let (bytes, generation, protected, expected, vault_id) = match prepared {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(error = %e, "the audit head was not written into the vault");
                return;
            }
        };
        token_call(|| {
            match self
                .storage
                .compare_and_store(Some(&expected), &bytes, generation)
            {
                Ok(_) => {
                    if protected && let Some(session) = &*self.token_slot() {
                        rollback::record(session.as_ref(), &vault_id, generation);
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "the audit head was not written into the vault");
                }
            }
        });
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
            } else if self.idle_deadline(u).is_some_and(|at| now >= at) {
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
            let present = token_call(|| match &*self.token_slot() {
                Some(session) => session.check_present(),
                None => Ok(()),
            });
            if let Err(e) = present {
                tracing::warn!(error = %crate::escape::Escaped(&e), "token check failed; locking");
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

/// Where `init` gets the vault key.
pub enum NewVaultKey {
    /// Generated on the token, with an id Keyholder chooses.
    Generate,
    /// A key already on the token, made by its own tools.
    Adopt(ObjectSelector),
    /// Generated in a PIV card's slot, with its management key as SO PIN.
    PivSlot {
        /// The slot; it must be empty.
        slot: PivSlot,
        /// The card's management key (hex), used for this call only.
        management_key: SecretString,
        /// Go on with the factory default management key (the native
        /// YubiKey backend refuses it otherwise).
        allow_default_management_key: bool,
        /// Policies and management-key handling (native YubiKey backend).
        generation: PivGeneration,
    },
}

/// What decides whether a PIV key's attestation enrolls it.
#[derive(Clone, Debug, Default)]
pub struct Enrollment {
    /// Enroll a key the card reports as imported, or will not attest.
    pub allow_imported_key: bool,
    /// PEM certificates trusted as attestation roots besides Yubico's.
    pub attestation_roots_pem: String,
}

impl Enrollment {
    pub(crate) fn roots(&self) -> Result<keyholder_pki::attestation::AttestationRoots> {
        let mut roots = keyholder_pki::attestation::AttestationRoots::yubico();
        if self.attestation_roots_pem.trim().is_empty() {
            return Ok(roots);
        }
        let ders = keyholder_pki::attestation::pem_certificates(&self.attestation_roots_pem)
            .map_err(|e| Error::InvalidArgument {
                field: "attestation_roots_pem",
                reason: e.to_string(),
            })?;
        for der in ders {
            roots = roots
                .with_root_der(&der)
                .map_err(|e| Error::InvalidArgument {
                    field: "attestation_roots_pem",
                    reason: e.to_string(),
                })?;
        }
        Ok(roots)
    }
}

/// The record of a PIV key from what the card says, before attestation.
fn live_record(facts: &PivKeyFacts) -> PivKeyRecord {
    PivKeyRecord {
        slot: facts.slot.clone(),
        firmware: facts.firmware.clone(),
        pin_policy: facts.pin_policy.clone().unwrap_or_default(),
        touch_policy: facts.touch_policy.clone().unwrap_or_default(),
        origin: match facts.origin {
            Some(PivKeyOrigin::Generated) => "generated".into(),
            Some(PivKeyOrigin::Imported) => "imported".into(),
            None => String::new(),
        },
        ..PivKeyRecord::default()
    }
}

/// What to do instead of generating the vault key with a chosen id on a
/// PIV card.
pub(crate) const PIV_INIT_ADVICE: &str = "Pass --piv-slot 9d (or an empty retired slot 82 to 95) and \
     --management-key-file, or adopt a key already in a slot with \
     --token-uri 'pkcs11:token=...;id=%03'";

/// What to do instead of generating a signing key on a PIV card.
pub(crate) const PIV_KEY_ADVICE: &str = "Make the key in a slot with the card's own tools \
     (yubico-piv-tool or ykman, with a certificate in the slot) and adopt it with \
     --pkcs11-uri 'pkcs11:id=%01'";

/// Whether `token` looks like a PIV card behind its PKCS#11 module: Yubico's
/// ykcs11 ("Yubico (www.yubico.com)") or OpenSC's PIV driver ("piv_II").
pub(crate) fn is_piv(token: &TokenDescription) -> bool {
    token.manufacturer.starts_with("Yubico")
        || token.manufacturer.to_ascii_lowercase().contains("piv")
        || token.model.to_ascii_lowercase().contains("piv")
}

/// A token that refused key generation and looks like a PIV card gets an
/// error that says what to do instead.
pub(crate) fn piv_hint(
    token: &TokenDescription,
    e: keyholder_token::Error,
    advice: &'static str,
) -> Error {
    match e {
        keyholder_token::Error::Unsupported { function, code } if is_piv(token) => {
            Error::PivNeedsSlot {
                token: token.label.clone(),
                reason: format!("{function} returned {code}"),
                advice,
            }
        }
        e => e.into(),
    }
}
