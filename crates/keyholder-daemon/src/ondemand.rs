//! Unlock on demand (`unlock_on_demand`, off by default): a request that
//! needs the open vault and finds it locked shows one pinentry prompt
//! instead of failing at once, the way yubikey-agent asks for its PIN.
//!
//! The rules, each one a limit on who can make a prompt appear and how
//! often (docs/configuration.md, docs/threat-model.md):
//!
//! - one prompt at a time: concurrent requests wait for the one shown
//!   (at most the prompt's timeout and a margin) and are then served, or
//!   fail as locked;
//! - after a cancel, a timeout, a wrong PIN or a broken pinentry, no new
//!   prompt for [`BACKOFF`]: a client that retries in a loop cannot flood
//!   the user with dialogs; its requests fail as locked meanwhile;
//! - never the token's final PIN try: the unlock is asked with
//!   `allow_final_try = false`, so a token down to its last try refuses
//!   without spending it;
//! - the caller decides whether its request may prompt at all: forwarded
//!   ssh-agent connections never do.
//!
//! The dialog names the operation and the calling program (from
//! `/proc/PID/exe`), so the user can tell an expected prompt from a
//! surprising one.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keyholder_pinentry::{PinRequest, Pinentry};
use tokio::time::Instant;

use crate::core::Core;
use crate::error::{Error, Result};
use crate::gate::{Caller, Channel, Needs};

/// No new prompt for this long after one that did not unlock.
pub const BACKOFF: Duration = Duration::from_secs(10);

/// The prompt in progress and the back-off after a failed one.
#[derive(Default)]
pub struct OnDemand {
    /// Held while a prompt is shown: one at a time.
    prompt: tokio::sync::Mutex<()>,
    /// No prompt before this instant.
    quiet_until: Mutex<Option<Instant>>,
}

impl OnDemand {
    fn quiet(&self) -> bool {
        let until = *self.quiet_until.lock().unwrap_or_else(|p| p.into_inner());
        until.is_some_and(|at| Instant::now() < at)
    }

    fn back_off(&self) {
        let until = Instant::now().checked_add(BACKOFF);
        *self.quiet_until.lock().unwrap_or_else(|p| p.into_inner()) = until;
    }
}

impl Core {
    /// [`Core::enter`], except that with `unlock_on_demand` configured and
    /// `may_prompt`, an operation that needs the open vault and finds it
    /// locked first shows one pinentry prompt and unlocks with the PIN.
    /// Without a PIN (cancelled, wrong, back-off) it fails as locked.
    pub async fn enter_or_prompt(
        &self,
        caller: &Caller,
        op: &'static str,
        needs: Needs,
        may_prompt: bool,
    ) -> Result<()> {
        if needs == Needs::Nothing
            || !may_prompt
            || !self.config.unlock_on_demand
            || self.is_unlocked()
        {
            return self.enter(caller, op, needs);
        }
        // The peer check and the hooks run before anything is shown.
        self.enter(caller, op, Needs::Nothing)?;
        self.require_unlocked_or_prompt(caller, op).await
    }

    /// [`Core::require_unlocked`] for an operation `caller` was already
    /// let in for (it checks something of its own before it needs the
    /// vault): with `unlock_on_demand`, one prompt first if locked.
    pub async fn require_unlocked_or_prompt(
        &self,
        caller: &Caller,
        op: &'static str,
    ) -> Result<()> {
        if self.config.unlock_on_demand && !self.is_unlocked() {
            self.unlock_on_demand(caller, op).await;
        }
        self.require_unlocked()
    }

    async fn unlock_on_demand(&self, caller: &Caller, op: &'static str) {
        // No vault yet: nothing a PIN could open.
        if !matches!(self.locked(), Error::Locked) {
            return;
        }
        let on_demand = self.on_demand();
        let wait = self
            .config
            .pinentry_timeout
            .saturating_add(keyholder_pinentry::STEP_TIMEOUT)
            .saturating_add(keyholder_pinentry::EXIT_WAIT.saturating_mul(2));
        let Ok(_prompt) = tokio::time::timeout(wait, on_demand.prompt.lock()).await else {
            tracing::info!(op, pid = ?caller.pid, "no PIN prompt: another one is still shown");
            return;
        };
        // The prompt this request waited for may have opened the session.
        if self.is_unlocked() {
            return;
        }
        if on_demand.quiet() {
            tracing::info!(op, pid = ?caller.pid, "no PIN prompt: the last one did not unlock, waiting out the back-off");
            return;
        }
        let who = match (caller.exe(), caller.pid) {
            (Some(exe), Some(pid)) => format!("{exe} (pid {pid})"),
            (None, Some(pid)) => format!("process {pid}"),
            _ => "a process".to_owned(),
        };
        let how = match caller.channel {
            Channel::Agent => "an ssh-agent request",
            Channel::Grpc | Channel::Tcp => "a request",
        };
        let request = PinRequest {
            title: Some("Keyholder".into()),
            description: Some(format!(
                "The Keyholder vault is locked. {who} made {how} ({op}) that needs it.\n\
                 Enter the token PIN to unlock it, or cancel to refuse."
            )),
            prompt: Some("PIN:".into()),
            error: None,
        };
        // Shutdown calls the dialog off rather than waiting for it.
        let abort = Arc::new(AtomicBool::new(false));
        let pinentry = Pinentry::new(&self.config.pinentry)
            .timeout(self.config.pinentry_timeout)
            .abort_flag(abort.clone());
        tracing::info!(op, pid = ?caller.pid, program = %self.config.pinentry.display(), "locked: asking for the PIN through pinentry");
        let mut asking = tokio::task::spawn_blocking(move || pinentry.get_pin(&request));
        let mut shutdown = self.shutdown_signal();
        let asked = tokio::select! {
            r = &mut asking => r,
            () = async { drop(shutdown.wait_for(|down| *down).await) } => {
                abort.store(true, Ordering::Relaxed);
                asking.await
            }
        };
        let pin = match asked {
            Ok(Ok(pin)) => pin,
            Ok(Err(keyholder_pinentry::Error::Cancelled)) => {
                tracing::info!(op, "PIN prompt cancelled");
                on_demand.back_off();
                return;
            }
            Ok(Err(e)) => {
                tracing::warn!(op, error = %crate::escape::Escaped(&e), "PIN prompt failed");
                on_demand.back_off();
                return;
            }
            Err(e) => {
                tracing::warn!(op, error = %e, "PIN prompt task failed");
                on_demand.back_off();
                return;
            }
        };
        match self.unlock_if_locked(pin, false, None, None, false).await {
            Ok(_) => tracing::info!(op, pid = ?caller.pid, "unlocked on demand"),
            Err(e) => {
                tracing::warn!(op, error = %crate::escape::Escaped(&e), "unlock on demand refused");
                on_demand.back_off();
            }
        }
    }
}
