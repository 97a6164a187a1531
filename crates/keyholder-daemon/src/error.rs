//! The daemon's errors and their one mapping to gRPC status codes.

use keyholder_token::Error as TokenError;
use keyholder_vault::{StorageError, VaultError};
use tonic::{Code, Status};

/// Everything a request can fail with. Messages carry names and paths, never
/// secret values or PINs.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The session is locked.
    #[error("the vault is locked: run `keyholder unlock`")]
    Locked,
    /// No vault file yet.
    #[error("there is no vault at {0}: run `keyholder init`")]
    NotInitialized(String),
    /// `init` on an existing vault.
    #[error("a vault already exists at {0}")]
    VaultExists(String),
    /// A named thing does not exist.
    #[error("{kind} {name:?} does not exist")]
    NotFound {
        /// What kind of thing.
        kind: &'static str,
        /// Its name.
        name: String,
    },
    /// A named thing exists already.
    #[error("{kind} {name:?} already exists (use overwrite / --force to replace it)")]
    AlreadyExists {
        /// What kind of thing.
        kind: &'static str,
        /// Its name.
        name: String,
    },
    /// A request field is malformed.
    #[error("{field}: {reason}")]
    InvalidArgument {
        /// The field, as named in the .proto.
        field: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// A request field is over a limit.
    #[error("{field} is {size} bytes; the limit is {limit}")]
    TooLarge {
        /// The field.
        field: &'static str,
        /// Its size.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// A count limit is reached.
    #[error("{0}")]
    LimitReached(String),
    /// A change re-applied after a write conflict found that the item it
    /// concerns was changed by another daemon meanwhile (ABORTED).
    #[error("another keyholderd changed {0} meanwhile; check it and retry")]
    ChangedMeanwhile(String),
    /// The peer may not do this.
    #[error("{0}")]
    PermissionDenied(String),
    /// The token failed or refused.
    #[error(transparent)]
    Token(#[from] TokenError),
    /// The vault could not be opened or sealed.
    #[error(transparent)]
    Vault(#[from] VaultError),
    /// The vault could not be read or written.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// The vault file is damaged; `advice` names the newest backup that
    /// opens and the command that restores it.
    #[error("the vault file {vault} is damaged: {reason}. {advice}")]
    Damaged {
        /// Where the vault is.
        vault: String,
        /// What is wrong with it.
        reason: String,
        /// What to do.
        advice: String,
    },
    /// A certificate request or CA material was refused.
    #[error(transparent)]
    Pki(#[from] keyholder_pki::PkiError),
    /// The vault file is older than the generation the token recorded.
    #[error(
        "the vault file is generation {file} but the token recorded generation {recorded}: an \
         older copy is in its place; if you restored it on purpose, unlock with \
         --accept-older-vault"
    )]
    Rollback {
        /// The file's generation.
        file: u64,
        /// The token's record.
        recorded: u64,
    },
    /// The store (another daemon's write, as the watch saw it) holds a
    /// vault this session must not move to: another vault, or not a newer
    /// generation of the open one.
    #[error("the stored vault was not taken: {0}; the open version keeps serving")]
    StoreRefused(String),
    /// The token cannot store the vault's generation record.
    #[error(
        "the token {token:?} cannot store Keyholder's rollback record ({reason}): without it an \
         older copy of the vault file would open without notice. To create the vault anyway, \
         without rollback detection, run init again with --without-rollback-protection"
    )]
    NoRollbackRecord {
        /// The token's label.
        token: String,
        /// What the token answered.
        reason: String,
    },
    /// A PIV card refused to generate a key where Keyholder chose its id:
    /// it makes keys only in its slots, with the management key.
    #[error(
        "token {token:?} is a PIV card ({reason}): its keys live in fixed slots and only the \
         management key may make one. {advice} (see docs/tokens.md)"
    )]
    PivNeedsSlot {
        /// The token's label.
        token: String,
        /// What the token answered.
        reason: String,
        /// What to do instead.
        advice: &'static str,
    },
    /// The card still has the factory default PIV management key.
    #[error(
        "token {token:?} still has the factory default PIV management key, with which anyone \
         holding the card can replace its keys without the PIN. Change it first, e.g. \
         `yubico-piv-tool -a set-mgm-key -n $(openssl rand -hex 24)` (keep the new key), and \
         give the new key to init; or add --protect-management-key to have init replace it \
         by a random key kept on the card behind the PIN; or pass \
         --allow-default-management-key to go on anyway (see docs/yubikey.md)"
    )]
    DefaultManagementKey {
        /// The token's label.
        token: String,
    },
    /// The key's attestation refuses it (imported, or not verifying).
    #[error("token {token:?}: {reason}")]
    NotEnrolled {
        /// The token's label.
        token: String,
        /// Why, and what to do.
        reason: String,
    },
    /// A request presented credentials (a grant token) that are not valid.
    #[error("{0}")]
    Unauthenticated(String),
    /// The audit log cannot be written: nothing is done or released until
    /// it can.
    #[error("audit log cannot be written: {0}")]
    AuditUnavailable(String),
    /// A bug or an unexpected runtime failure; details go to the log only.
    #[error("internal error: {0}")]
    Internal(String),
}

/// Shorthand.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// The gRPC code this error is answered with.
    pub fn code(&self) -> Code {
        match self {
            Error::Locked
            | Error::NotInitialized(_)
            | Error::Rollback { .. }
            | Error::StoreRefused(_)
            | Error::NoRollbackRecord { .. }
            | Error::PivNeedsSlot { .. }
            | Error::DefaultManagementKey { .. }
            | Error::NotEnrolled { .. } => Code::FailedPrecondition,
            Error::VaultExists(_) | Error::AlreadyExists { .. } => Code::AlreadyExists,
            Error::NotFound { .. } => Code::NotFound,
            Error::InvalidArgument { .. } => Code::InvalidArgument,
            Error::TooLarge { .. } | Error::LimitReached(_) => Code::ResourceExhausted,
            Error::ChangedMeanwhile(_) => Code::Aborted,
            Error::PermissionDenied(_) => Code::PermissionDenied,
            Error::Token(t) => match t {
                TokenError::PinIncorrect { .. }
                | TokenError::ManagementKeyIncorrect { .. }
                | TokenError::PinFinalTry { .. }
                | TokenError::PinLocked { .. } => Code::PermissionDenied,
                TokenError::TokenNotFound { .. } => Code::NotFound,
                TokenError::SlotInUse { .. } => Code::AlreadyExists,
                TokenError::TokenAmbiguous { .. } | TokenError::InvalidSelector(_) => {
                    Code::InvalidArgument
                }
                TokenError::KeyNotFound(_) | TokenError::Unsupported { .. } => {
                    Code::FailedPrecondition
                }
                _ => Code::Unavailable,
            },
            Error::Vault(v) => match v {
                VaultError::Damaged(_)
                | VaultError::NotAuthentic
                | VaultError::UnsupportedVersion(_) => Code::DataLoss,
                VaultError::NotForThisToken | VaultError::NoTokens => Code::FailedPrecondition,
                VaultError::InvalidRecipient(_) => Code::InvalidArgument,
                VaultError::Token(TokenError::TokenRemoved(_)) => Code::Unavailable,
                VaultError::Token(TokenError::Unsupported { .. }) => Code::FailedPrecondition,
                VaultError::Token(_) => Code::Unavailable,
                _ => Code::Internal,
            },
            Error::Damaged { .. } => Code::DataLoss,
            Error::Storage(s) => match s {
                StorageError::Busy { .. } => Code::Unavailable,
                StorageError::DiskFull { .. } => Code::ResourceExhausted,
                StorageError::LooseDirectory { .. } => Code::FailedPrecondition,
                StorageError::Conflict(_) | StorageError::Changed(_) => Code::Aborted,
                StorageError::Unavailable(_) => Code::Unavailable,
                StorageError::WentBack(_) => Code::FailedPrecondition,
                _ => Code::Internal,
            },
            Error::Pki(p) => match p {
                keyholder_pki::PkiError::Build(_) => Code::Internal,
                _ => Code::InvalidArgument,
            },
            Error::Unauthenticated(_) => Code::Unauthenticated,
            Error::AuditUnavailable(_) => Code::Unavailable,
            Error::Internal(_) => Code::Internal,
        }
    }
}

impl From<Error> for Status {
    fn from(e: Error) -> Self {
        let code = e.code();
        let message = match (&e, code) {
            (Error::Vault(VaultError::InvalidRecipient(_)), _) => {
                format!("recovery_recipient: {e}")
            }
            // Internal details (I/O errors, library messages) are logged, not returned.
            (_, Code::Internal) => {
                tracing::error!(error = %crate::escape::Escaped(&e), "request failed");
                "internal error; see the keyholderd log".to_owned()
            }
            _ => e.to_string(),
        };
        Status::new(code, message)
    }
}
