//! What the session shows of itself: lock reasons, the status, the tokens
//! seen, a vault just created. Domain types; the services convert them.

use std::path::PathBuf;
use std::time::SystemTime;

use keyholder_token::TokenDescription;
use keyholder_vault::PivKeyRecord;

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
    /// The periodic session check failed, so the session was locked
    /// rather than left open unchecked.
    CheckFailed,
}

impl LockReason {
    /// The API's name for it; empty for [`LockReason::Start`].
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Start => "",
            Self::Request => "request",
            Self::Expired => "expired",
            Self::Idle => "idle",
            Self::TokenRemoved => "token-removed",
            Self::Shutdown => "shutdown",
            Self::CheckFailed => "check-failed",
        }
    }
}

/// The session's state as callers see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SessionState {
    /// No vault exists yet.
    Uninitialized,
    /// Locked, and why.
    Locked(LockReason),
    /// Unlocked.
    Unlocked(Box<UnlockedStatus>),
}

/// What is shown of an open session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnlockedStatus {
    /// The token in use.
    pub token: TokenDescription,
    /// The token's recipient in this vault.
    pub recipient: String,
    /// Wall-clock time of unlock.
    pub unlocked_at: SystemTime,
    /// When the session ends at the latest.
    pub expires_at: SystemTime,
    /// When it locks if no request comes.
    pub idle_deadline: SystemTime,
    /// The vault's generation.
    pub generation: u64,
    /// How many secrets it holds.
    pub secret_count: u64,
    /// Whether the token records the vault's generation.
    pub rollback_protection: bool,
}

/// The session status.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionStatus {
    /// Locked, unlocked or uninitialised.
    pub state: SessionState,
    /// Where the vault is, for humans.
    pub vault_path: String,
    /// The ssh-agent socket, when served.
    pub ssh_agent_socket: Option<PathBuf>,
    /// The vault key's PIV details (native YubiKey backend), when known.
    pub vault_key: Option<PivKeyRecord>,
}

/// A token the backend sees, with the Keyholder vault keys found on it.
#[derive(Clone, Debug)]
pub struct TokenListing {
    /// The token.
    pub token: TokenDescription,
    /// The `age1tag1...` recipients of its Keyholder keys.
    pub recipients: Vec<String>,
    /// Whether the vault on this token has rollback detection, when this
    /// daemon has seen the vault open (or created it) on this token.
    pub rollback_protection: Option<bool>,
    /// The vault key's PIV details, for the vault's token when known.
    pub vault_key: Option<PivKeyRecord>,
}

/// A vault just created.
#[derive(Clone, Debug)]
pub struct Initialized {
    /// Where it is.
    pub vault_path: String,
    /// The token's recipient.
    pub token_recipient: String,
    /// The token.
    pub token: TokenDescription,
    /// The vault key's PIV details (native YubiKey backend).
    pub vault_key: Option<PivKeyRecord>,
}
