//! Shared by the daemon's in-process tests: the vault kept in memory.

use std::sync::Mutex;

use keyholder_vault::{Revision, Storage, StorageError};
use sha2::Digest;

/// The vault's bytes in memory, with the compare-and-store rule of the file.
#[derive(Default)]
pub struct MemoryStorage(Mutex<Option<Vec<u8>>>);

fn revision(bytes: &[u8]) -> Revision {
    Revision(sha2::Sha256::digest(bytes).into())
}

impl Storage for MemoryStorage {
    fn load(&self) -> Result<Option<(Vec<u8>, Revision)>, StorageError> {
        let stored = self.0.lock().unwrap();
        Ok(stored.as_ref().map(|b| (b.clone(), revision(b))))
    }

    fn compare_and_store(
        &self,
        expected: Option<&Revision>,
        bytes: &[u8],
        _generation: u64,
    ) -> Result<Revision, StorageError> {
        let mut stored = self.0.lock().unwrap();
        if stored.as_deref().map(revision).as_ref() != expected {
            return Err(StorageError::Conflict("memory".into()));
        }
        *stored = Some(bytes.to_vec());
        Ok(revision(bytes))
    }

    fn exists(&self) -> Result<bool, StorageError> {
        Ok(self.0.lock().unwrap().is_some())
    }

    fn location(&self) -> String {
        "memory".into()
    }
}
