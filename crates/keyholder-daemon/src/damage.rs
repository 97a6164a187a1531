//! A damaged vault file: finding the token through a backup when the file's
//! header is unreadable, and naming the newest kept backup that opens, with
//! the command that restores it.

use keyholder_token::{Session, TokenKey};
use keyholder_vault::{OpenVault, Storage, TagStanza, TokenAgreement, VaultError};

use crate::error::Error;

/// A backup that opens with the token and authenticates.
pub struct Restore {
    generation: u64,
    path: String,
    /// Older than the token's record of the last write: unlocking it needs
    /// `--accept-older-vault`.
    older: bool,
}

/// The `p256tag` stanzas of the vault file, or, when its header is damaged,
/// of the newest backup whose header reads (so the token can still be found
/// and the backups checked), with the damage to report.
pub fn probe(
    storage: &dyn Storage,
    bytes: &[u8],
) -> Result<(Vec<TagStanza>, Option<String>), Error> {
    match keyholder_vault::probe(bytes) {
        Ok(stanzas) => Ok((stanzas, None)),
        Err(VaultError::Damaged(reason)) => {
            let from_backup = storage.backups().into_iter().find_map(|(generation, _)| {
                let backup = storage.load_backup(generation).ok().flatten()?;
                keyholder_vault::probe(&backup).ok()
            });
            match from_backup {
                Some(stanzas) => Ok((stanzas, Some(reason))),
                None => Err(damaged(storage, reason, None)),
            }
        }
        Err(e) => Err(e.into()),
    }
}

/// The newest kept backup, other than the damaged bytes themselves, that
/// opens with `key` and authenticates (two token operations per backup
/// tried, at most the number of backups kept).
pub fn newest_intact(
    storage: &dyn Storage,
    session: &dyn Session,
    key: &TokenKey,
    damaged: &[u8],
) -> Option<Restore> {
    let agreement = TokenAgreement { session, key };
    for (generation, path) in storage.backups() {
        let Ok(Some(bytes)) = storage.load_backup(generation) else {
            continue;
        };
        if bytes == damaged {
            continue;
        }
        let Ok(vault) = OpenVault::open(&bytes, &agreement) else {
            continue;
        };
        let recorded = crate::rollback::recorded(session, vault.vault_id());
        return Some(Restore {
            generation: vault.body.generation,
            path,
            older: recorded.is_some_and(|r| r > vault.body.generation),
        });
    }
    None
}

/// The error for a damaged vault file: what is wrong, and what to do.
pub fn damaged(storage: &dyn Storage, reason: String, restore: Option<Restore>) -> Error {
    let vault = storage.location();
    let advice = match restore {
        Some(r) => format!(
            "The newest intact backup is {path} (generation {generation}); restore it with `cp {path} {vault}` and run `keyholder unlock{flag}` again",
            path = shell_word(&r.path),
            generation = r.generation,
            vault = shell_word(&vault),
            flag = if r.older { " --accept-older-vault" } else { "" },
        ),
        None => format!(
            "No kept backup opens either; recover the content with the recovery identity: `age -d -i recovery.key {}`",
            shell_word(&vault)
        ),
    };
    Error::Damaged {
        vault,
        reason,
        advice,
    }
}

/// `s` quoted for a POSIX shell when it needs it, so the command in the
/// message can be copied as it stands.
fn shell_word(s: &str) -> String {
    let plain = !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/._-+:@%,".contains(&b));
    if plain {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_quoted_only_when_a_shell_needs_it() {
        assert_eq!(shell_word("/home/a/vault.age"), "/home/a/vault.age");
        assert_eq!(shell_word("/home/a b/v"), "'/home/a b/v'");
        assert_eq!(shell_word("/x/it's"), r"'/x/it'\''s'");
    }
}
