//! Where the vault's bytes live.
//!
//! [`Storage`] is small on purpose (load, compare-and-store, exclusive
//! ownership) so that a shared backend such as etcd, with compare-and-swap on
//! a key's revision, can replace the local file.
//!
//! [`FileStorage`] writes atomically and durably: a temp file in the same
//! directory, fsync, rename over the vault, fsync the directory. A crash at
//! any point leaves either the previous or the new generation. The last
//! [`BACKUPS_KEPT`] generations stay beside the vault as hard links named
//! `<vault>.gen-<N>`. A lock file (`<vault>.lock`, `flock`) held for the
//! owner's lifetime keeps a second daemon or tool from writing.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// How many generations are kept as backups (the current one included).
pub const BACKUPS_KEPT: usize = 5;

/// Identifies one stored version, for compare-and-store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Revision(pub [u8; 32]);

impl Revision {
    fn of(bytes: &[u8]) -> Self {
        Self(Sha256::digest(bytes).into())
    }
}

/// Storage failures.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StorageError {
    /// Another process owns the vault.
    #[error(
        "the vault {path} is in use by another process (lock file {lock} is held); stop the other keyholderd first"
    )]
    Busy {
        /// The vault path.
        path: PathBuf,
        /// The lock file.
        lock: PathBuf,
    },
    /// The stored version is not the one the caller last saw.
    #[error("the vault {0} changed on disk since it was read; lock and unlock to reload it")]
    Conflict(PathBuf),
    /// An I/O error, with the path it concerns.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The path concerned.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> StorageError + use<> {
    let path = path.to_owned();
    move |source| StorageError::Io { what, path, source }
}

/// Backend for the vault's bytes.
pub trait Storage: Send + Sync {
    /// The current bytes and their revision, or `None` when no vault exists.
    fn load(&self) -> Result<Option<(Vec<u8>, Revision)>, StorageError>;
    /// Stores `bytes` (generation `generation`) if the stored revision is
    /// still `expected` (`None`: nothing stored yet). Durable on return.
    fn compare_and_store(
        &self,
        expected: Option<&Revision>,
        bytes: &[u8],
        generation: u64,
    ) -> Result<Revision, StorageError>;
    /// Whether a vault is stored, without reading it.
    fn exists(&self) -> Result<bool, StorageError>;
    /// Where the vault is, for humans.
    fn location(&self) -> String;
}

/// A vault in one local file.
#[derive(Debug)]
pub struct FileStorage {
    path: PathBuf,
    dir: PathBuf,
    /// Held open for the lifetime of this value: the `flock` on it is what
    /// excludes other writers. Released by the kernel if the process dies.
    _lock: File,
}

impl FileStorage {
    /// Takes ownership of the vault at `path` (which need not exist yet),
    /// creating its directory with mode 0700 when missing.
    pub fn open(path: &Path) -> Result<Self, StorageError> {
        let file_name = path.file_name().ok_or_else(|| StorageError::Io {
            what: "vault path has no file name",
            path: path.to_owned(),
            source: io::Error::from(io::ErrorKind::InvalidInput),
        })?;
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
            _ => PathBuf::from("."),
        };
        if !dir.exists() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&dir)
                .map_err(io_err("cannot create vault directory", &dir))?;
        }
        let mut lock_name = file_name.to_owned();
        lock_name.push(".lock");
        let lock_path = dir.join(lock_name);
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&lock_path)
            .map_err(io_err("cannot open lock file", &lock_path))?;
        match rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => {}
            Err(e) if e == rustix::io::Errno::WOULDBLOCK => {
                return Err(StorageError::Busy {
                    path: path.to_owned(),
                    lock: lock_path,
                });
            }
            Err(e) => return Err(io_err("cannot lock", &lock_path)(e.into())),
        }
        let storage = Self {
            path: path.to_owned(),
            dir,
            _lock: lock,
        };
        storage.remove_stale_temp_files();
        Ok(storage)
    }

    /// The vault file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn file_name(&self) -> String {
        self.path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    }

    fn temp_prefix(&self) -> String {
        format!(".{}.tmp-", self.file_name())
    }

    /// Temp files left by a crash mid-write are never the vault: remove them.
    fn remove_stale_temp_files(&self) {
        let prefix = self.temp_prefix();
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return;
        };
        for entry in entries.flatten() {
            if entry.file_name().to_string_lossy().starts_with(&prefix) {
                let _ = fs::remove_file(entry.path());
            }
        }
    }

    /// Backup generations present, newest first.
    pub fn backups(&self) -> Vec<(u64, PathBuf)> {
        let prefix = format!("{}.gen-", self.file_name());
        let mut found: Vec<(u64, PathBuf)> = fs::read_dir(&self.dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                let generation = name.strip_prefix(&prefix)?.parse().ok()?;
                Some((generation, e.path()))
            })
            .collect();
        found.sort_by_key(|b| std::cmp::Reverse(b.0));
        found
    }

    fn sync_dir(&self) -> Result<(), StorageError> {
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err("cannot fsync directory", &self.dir))
    }
}

impl Storage for FileStorage {
    fn load(&self) -> Result<Option<(Vec<u8>, Revision)>, StorageError> {
        match fs::read(&self.path) {
            Ok(bytes) => {
                let rev = Revision::of(&bytes);
                Ok(Some((bytes, rev)))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err("cannot read vault", &self.path)(e)),
        }
    }

    fn compare_and_store(
        &self,
        expected: Option<&Revision>,
        bytes: &[u8],
        generation: u64,
    ) -> Result<Revision, StorageError> {
        // We hold the lock, so only a hand edit or a restored backup can
        // have changed the file; refuse to overwrite such a change.
        let current = self.load()?.map(|(_, rev)| rev);
        if current.as_ref() != expected {
            return Err(StorageError::Conflict(self.path.clone()));
        }
        let temp = self.dir.join(format!(
            "{}{}-{}",
            self.temp_prefix(),
            std::process::id(),
            generation
        ));
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&temp)
            .map_err(io_err("cannot create temp file", &temp))?;
        let written = f
            .write_all(bytes)
            .and_then(|()| f.sync_all())
            .map_err(io_err("cannot write temp file", &temp));
        drop(f);
        if let Err(e) = written {
            let _ = fs::remove_file(&temp);
            return Err(e);
        }
        let backup = self
            .dir
            .join(format!("{}.gen-{generation}", self.file_name()));
        // A backup of this generation can exist from a write that crashed
        // before its rename: that one was never acknowledged, replace it.
        let _ = fs::remove_file(&backup);
        fs::hard_link(&temp, &backup).map_err(io_err("cannot link backup", &backup))?;
        fs::rename(&temp, &self.path).map_err(io_err("cannot replace vault", &self.path))?;
        self.sync_dir()?;
        for (_, old) in self.backups().into_iter().skip(BACKUPS_KEPT) {
            let _ = fs::remove_file(old);
        }
        // Keep the mode strict even if the directory's umask was loose.
        let _ = fs::set_permissions(&self.path, fs::Permissions::from_mode(0o600));
        Ok(Revision::of(bytes))
    }

    fn exists(&self) -> Result<bool, StorageError> {
        self.path
            .try_exists()
            .map_err(io_err("cannot stat vault", &self.path))
    }

    fn location(&self) -> String {
        self.path.display().to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_owner_is_refused_until_the_first_goes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vault.age");
        let first = FileStorage::open(&path).unwrap();
        let err = FileStorage::open(&path).unwrap_err();
        assert!(matches!(err, StorageError::Busy { .. }), "{err}");
        drop(first);
        FileStorage::open(&path).unwrap();
    }

    #[test]
    fn writes_replace_atomically_keep_five_backups_and_refuse_stale_revisions() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vault.age");
        let s = FileStorage::open(&path).unwrap();
        assert!(s.load().unwrap().is_none());
        let mut rev = None;
        for generation in 1..=8u64 {
            let bytes = format!("generation {generation}");
            rev = Some(
                s.compare_and_store(rev.as_ref(), bytes.as_bytes(), generation)
                    .unwrap(),
            );
        }
        assert_eq!(s.load().unwrap().unwrap().0, b"generation 8");
        let kept: Vec<u64> = s.backups().iter().map(|b| b.0).collect();
        assert_eq!(kept, vec![8, 7, 6, 5, 4]);
        assert_eq!(fs::read(&s.backups()[1].1).unwrap(), b"generation 7");
        let stale = Revision::of(b"generation 7");
        assert!(matches!(
            s.compare_and_store(Some(&stale), b"x", 9),
            Err(StorageError::Conflict(_))
        ));
        assert_eq!(s.load().unwrap().unwrap().0, b"generation 8");
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }
}
