//! Rollback detection: the vault file's generation against the record the
//! token keeps of the last write. The record is only as strong as the
//! token: whoever has the PIN can change it too.

use keyholder_token::Session;
use keyholder_vault::OpenVault;

use crate::error::{Error, Result};

/// Label of the token data object recording a vault's generation.
fn label(vault_id: &str) -> String {
    format!("keyholder-generation:{vault_id}")
}

/// Checks an opened vault against the token's record. An older file is
/// refused unless `accept_older` (a backup restored on purpose), in which
/// case the record is returned and the caller writes the file back above
/// it; a newer one (a crash after the file was written, or a token without
/// a record yet) moves the record up.
pub fn check(session: &dyn Session, vault: &OpenVault, accept_older: bool) -> Result<Option<u64>> {
    if vault.body.rollback_protection && !protected(vault) {
        tracing::info!(
            "rollback detection is off while this token is in use (it was enrolled without the record)"
        );
        return Ok(None);
    }
    if !vault.body.rollback_protection {
        // Created so on purpose, on a token that cannot hold the record;
        // Status shows it.
        tracing::info!(
            "rollback detection is off for this vault (the token cannot store the record)"
        );
        return Ok(None);
    }
    let label = label(vault.vault_id());
    let file = vault.body.generation;
    let recorded = match session.read_generation(&label) {
        Ok(recorded) => recorded,
        Err(e) if accept_older => {
            // Replaced below; only the PIN holder can write private objects.
            tracing::warn!(error = %crate::escape::Escaped(&e), "unreadable generation record replaced on request");
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
            record(session, vault.vault_id(), file);
            Ok(None)
        }
    }
}

/// Whether the token `vault` was opened with keeps the vault's generation
/// record: the vault has rollback detection, and the token was not enrolled
/// without the record.
pub fn protected(vault: &OpenVault) -> bool {
    vault.body.rollback_protection && vault.own_entry().is_none_or(|t| t.rollback_record)
}

/// Whether the token can hold a generation record: one is written and
/// removed under a label no vault uses.
pub fn token_can_record(session: &dyn Session) -> std::result::Result<(), keyholder_token::Error> {
    let probe = "keyholder-generation:capability-check";
    session.store_generation(probe, 0)?;
    session.delete_generation(probe)
}

/// The generation the token recorded for the vault `vault_id`, if it can be
/// read.
pub fn recorded(session: &dyn Session, vault_id: &str) -> Option<u64> {
    session.read_generation(&label(vault_id)).ok().flatten()
}

/// Records `generation` on the token; a token that cannot store it still
/// works, without rollback detection, and says so in the log.
pub fn record(session: &dyn Session, vault_id: &str, generation: u64) {
    if let Err(e) = session.store_generation(&label(vault_id), generation) {
        tracing::warn!(error = %crate::escape::Escaped(&e), generation, "cannot record the vault generation on the token");
    }
}
