//! Where the vault's bytes live.
//!
//! [`Storage`] is small on purpose (load, compare-and-store, exclusive
//! ownership) so that a shared backend such as etcd, with compare-and-swap on
//! a key's revision, can replace the local file.
//!
//! [`FileStorage`] writes atomically and durably: a temp file in the same
//! directory, fsync, rename over the vault, fsync the directory. A crash at
//! any point leaves either the previous or the new generation. The last
//! [`BACKUPS_KEPT`] generations stay beside the vault as copies named
//! `<vault>.gen-<N>`, each its own file, so damage to the vault file in place
//! leaves every backup intact. A lock file (`<vault>.lock`, `flock`) held
//! for the owner's lifetime keeps a second daemon or tool from writing.
//!
//! The vault's directory must belong to the user (or root) and must not be
//! writable by group or others: whoever can write there can delete or
//! replace the vault and its backups. [`FileStorage::open`] refuses a loose
//! directory rather than changing its mode, like `ssh` with a loose key file.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// How many generations are kept as backups (the current one included).
pub const BACKUPS_KEPT: usize = 5;

/// Identifies one stored version, for compare-and-store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Revision(pub [u8; 32]);

impl Revision {
    #[cfg(test)]
    fn of(bytes: &[u8]) -> Self {
        Self(Sha256::digest(bytes).into())
    }

    /// A file's revision from its metadata (device, inode, size, and the
    /// modification and change times to the nanosecond) and its first
    /// [`HEAD_BYTES`] bytes (the age header, whose ephemeral share is new
    /// for every encryption). Every write puts a new inode in place, any
    /// change in place moves the change time (which no user can set), and a
    /// copied-in backup has another header even within one timestamp tick;
    /// so versions are told apart without reading and hashing the whole
    /// file on every write.
    fn of_file(meta: &fs::Metadata, head: &[u8]) -> Self {
        use std::os::unix::fs::MetadataExt;
        let mut h = Sha256::new();
        for v in [meta.dev(), meta.ino(), meta.size()] {
            h.update(v.to_le_bytes());
        }
        for v in [
            meta.mtime(),
            meta.mtime_nsec(),
            meta.ctime(),
            meta.ctime_nsec(),
        ] {
            h.update(v.to_le_bytes());
        }
        h.update(head);
        Self(h.finalize().into())
    }
}

/// How much of the file's start goes into its revision.
const HEAD_BYTES: usize = 1024;

/// The file at `path` (all of it, or its first `at_most` bytes) and its
/// revision, from one open file; `None` if there is none.
fn read_with_revision(
    path: &Path,
    at_most: Option<u64>,
) -> Result<Option<(Vec<u8>, Revision)>, StorageError> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err("cannot read vault", path)(e)),
    };
    let meta = file.metadata().map_err(io_err("cannot stat vault", path))?;
    let len = at_most.map_or(meta.len(), |n| n.min(meta.len()));
    let mut bytes = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
    io::Read::read_to_end(&mut io::Read::take(file, len), &mut bytes)
        .map_err(io_err("cannot read vault", path))?;
    let revision = Revision::of_file(&meta, &bytes[..bytes.len().min(HEAD_BYTES)]);
    Ok(Some((bytes, revision)))
}

/// The revision of the file at `path` now, `None` if there is none.
fn current_revision(path: &Path) -> Result<Option<Revision>, StorageError> {
    Ok(read_with_revision(path, Some(HEAD_BYTES as u64))?.map(|(_, revision)| revision))
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
    /// The vault's directory is not the user's own, or others can write it.
    #[error(
        "the vault directory {path} {problem}; anyone who can write there can replace or delete the vault and its backups. Fix it (for example `chmod 700 {path}`) or choose another --vault"
    )]
    LooseDirectory {
        /// The directory.
        path: PathBuf,
        /// What is wrong with it.
        problem: String,
    },
    /// The file system is full (or the user's quota is used up).
    #[error(
        "the disk holding the vault is full ({what} {path}); the vault is unchanged. Free some space and retry"
    )]
    DiskFull {
        /// What was being done.
        what: &'static str,
        /// The path concerned.
        path: PathBuf,
    },
    /// The stored version is not the one the caller last saw.
    #[error("the vault {0} changed on disk since it was read; lock and unlock to reload it")]
    Conflict(PathBuf),
    /// A shared store (etcd) holds a newer version than the one this
    /// write started from: another daemon wrote in between. The caller
    /// re-reads, re-applies its change and tries again.
    #[error(
        "the vault at {0} was changed by another writer since it was read; the write was not stored. The new version has been read: retry"
    )]
    Changed(String),
    /// The store cannot be reached (every etcd endpoint failed or timed
    /// out). Nothing was written.
    #[error("{0}")]
    Unavailable(String),
    /// The store answers with an older state than this machine has seen
    /// (an etcd cluster restored from an older snapshot, or another one).
    #[error("{0}")]
    WentBack(String),
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
    move |source| match rustix::io::Errno::from_io_error(&source) {
        Some(e) if e == rustix::io::Errno::NOSPC || e == rustix::io::Errno::DQUOT => {
            StorageError::DiskFull { what, path }
        }
        _ => StorageError::Io { what, path, source },
    }
}

/// Refuses a vault directory that is not the user's (or root's), or that
/// group or others can write.
fn check_directory(dir: &Path) -> Result<(), StorageError> {
    use std::os::unix::fs::MetadataExt;
    let meta = fs::metadata(dir).map_err(io_err("cannot stat vault directory", dir))?;
    let me = rustix::process::geteuid().as_raw();
    let loose = |problem: String| StorageError::LooseDirectory {
        path: dir.to_owned(),
        problem,
    };
    if meta.uid() != me && meta.uid() != 0 {
        return Err(loose(format!(
            "belongs to uid {}, not to you (uid {me})",
            meta.uid()
        )));
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o022 != 0 {
        return Err(loose(format!(
            "has mode {mode:04o}: group or others can write it"
        )));
    }
    Ok(())
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
    /// The kept backups, newest first: their generation and where they are,
    /// for humans (a path a user can copy back).
    fn backups(&self) -> Vec<(u64, String)> {
        Vec::new()
    }
    /// The bytes of the backup of `generation`, if it is kept.
    fn load_backup(&self, generation: u64) -> Result<Option<Vec<u8>>, StorageError> {
        let _ = generation;
        Ok(None)
    }
    /// Called once the bytes `load` returned under `revision` have been
    /// opened, i.e. authenticated with the vault key: a store keeping a
    /// local copy (etcd) refreshes it only with such bytes.
    fn opened(&self, bytes: &[u8], revision: &Revision) {
        let _ = (bytes, revision);
    }
    /// For a store other processes write too (etcd): calls `notify` with
    /// the stored revision whenever it changes, from a thread of the
    /// store's own, until the store is dropped. `false` when this store
    /// has no such watch (a local file, which only its owner writes).
    fn watch(&self, notify: Box<dyn Fn(Revision) + Send + Sync>) -> bool {
        let _ = notify;
        false
    }
    /// Stores a whole history into an empty store at once, for moving a
    /// vault: `history` holds (generation, bytes) oldest first, the last
    /// being the current version; the older ones become backups. Either
    /// all of it is stored or the store stays empty.
    fn import(&self, history: &[(u64, Vec<u8>)]) -> Result<Revision, StorageError> {
        let _ = history;
        Err(StorageError::Unavailable(format!(
            "{} cannot take an imported history",
            self.location()
        )))
    }
}

/// A boxed store is a store: the daemon picks its backend at start.
impl<S: Storage + ?Sized> Storage for Box<S> {
    fn load(&self) -> Result<Option<(Vec<u8>, Revision)>, StorageError> {
        (**self).load()
    }
    fn compare_and_store(
        &self,
        expected: Option<&Revision>,
        bytes: &[u8],
        generation: u64,
    ) -> Result<Revision, StorageError> {
        (**self).compare_and_store(expected, bytes, generation)
    }
    fn exists(&self) -> Result<bool, StorageError> {
        (**self).exists()
    }
    fn location(&self) -> String {
        (**self).location()
    }
    fn backups(&self) -> Vec<(u64, String)> {
        (**self).backups()
    }
    fn load_backup(&self, generation: u64) -> Result<Option<Vec<u8>>, StorageError> {
        (**self).load_backup(generation)
    }
    fn opened(&self, bytes: &[u8], revision: &Revision) {
        (**self).opened(bytes, revision);
    }
    fn watch(&self, notify: Box<dyn Fn(Revision) + Send + Sync>) -> bool {
        (**self).watch(notify)
    }
    fn import(&self, history: &[(u64, Vec<u8>)]) -> Result<Revision, StorageError> {
        (**self).import(history)
    }
}

/// A store's history for moving it elsewhere: every kept backup
/// (generation, bytes), oldest first, then the current version with its
/// generation (the newest backup holding the same bytes). Fails when the
/// store is empty, or when the current version matches no backup (its
/// generation cannot then be told without opening the vault).
pub fn export_history(storage: &dyn Storage) -> Result<Vec<(u64, Vec<u8>)>, StorageError> {
    let unknown = |what: &str| {
        StorageError::Unavailable(format!(
            "cannot export the vault at {}: {what}",
            storage.location()
        ))
    };
    let (current, _) = storage
        .load()?
        .ok_or_else(|| unknown("there is no vault"))?;
    let mut history = Vec::new();
    for (generation, _) in storage.backups().into_iter().rev() {
        if let Some(bytes) = storage.load_backup(generation)? {
            history.push((generation, bytes));
        }
    }
    match history.last() {
        Some((_, newest)) if *newest == current => Ok(history),
        _ => Err(unknown(
            "its current version is not among its backups (written by hand?)",
        )),
    }
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
        check_directory(&dir)?;
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
    pub fn backup_files(&self) -> Vec<(u64, PathBuf)> {
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

/// Creates `path` (mode 0600) holding `bytes`, durably if `sync`; removes it
/// again if that fails.
fn write_new(path: &Path, bytes: &[u8], sync: bool) -> Result<(), StorageError> {
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io_err("cannot create temp file", path))?;
    let written = f
        .write_all(bytes)
        .and_then(|()| if sync { f.sync_data() } else { Ok(()) })
        .map_err(io_err("cannot write temp file", path));
    drop(f);
    if written.is_err() {
        let _ = fs::remove_file(path);
    }
    written
}

impl Storage for FileStorage {
    fn load(&self) -> Result<Option<(Vec<u8>, Revision)>, StorageError> {
        read_with_revision(&self.path, None)
    }

    fn compare_and_store(
        &self,
        expected: Option<&Revision>,
        bytes: &[u8],
        generation: u64,
    ) -> Result<Revision, StorageError> {
        // We hold the lock, so only a hand edit or a restored backup can
        // have changed the file; refuse to overwrite such a change.
        let current = current_revision(&self.path)?;
        if current.as_ref() != expected {
            return Err(StorageError::Conflict(self.path.clone()));
        }
        let temp = self.dir.join(format!(
            "{}{}-{}",
            self.temp_prefix(),
            std::process::id(),
            generation
        ));
        write_new(&temp, bytes, true)?;
        // The backup of this generation is a copy of its own, named before
        // the vault is replaced: a crash in between leaves a backup of a
        // generation that was never acknowledged, which the next write of
        // that generation replaces. Only the vault file is synced before the
        // write is acknowledged; the kernel writes the backup out within its
        // writeback interval, so a crash just after a write can leave the
        // newest backup short, which a damage report skips (it names the
        // newest backup that opens).
        let backup = self
            .dir
            .join(format!("{}.gen-{generation}", self.file_name()));
        let backup_temp = self.dir.join(format!(
            "{}{}-{}.gen",
            self.temp_prefix(),
            std::process::id(),
            generation
        ));
        if let Err(e) = write_new(&backup_temp, bytes, false).and_then(|()| {
            fs::rename(&backup_temp, &backup).map_err(io_err("cannot name backup", &backup))
        }) {
            let _ = fs::remove_file(&backup_temp);
            let _ = fs::remove_file(&temp);
            return Err(e);
        }
        if let Err(e) = fs::rename(&temp, &self.path) {
            let _ = fs::remove_file(&temp);
            return Err(io_err("cannot replace vault", &self.path)(e));
        }
        self.sync_dir()?;
        for (_, old) in self.backup_files().into_iter().skip(BACKUPS_KEPT) {
            let _ = fs::remove_file(old);
        }
        current_revision(&self.path)?.ok_or_else(|| {
            io_err("vault vanished after its rename", &self.path)(io::ErrorKind::NotFound.into())
        })
    }

    fn exists(&self) -> Result<bool, StorageError> {
        self.path
            .try_exists()
            .map_err(io_err("cannot stat vault", &self.path))
    }

    fn location(&self) -> String {
        self.path.display().to_string()
    }

    fn backups(&self) -> Vec<(u64, String)> {
        self.backup_files()
            .into_iter()
            .map(|(generation, path)| (generation, path.display().to_string()))
            .collect()
    }

    fn load_backup(&self, generation: u64) -> Result<Option<Vec<u8>>, StorageError> {
        let path = self
            .dir
            .join(format!("{}.gen-{generation}", self.file_name()));
        match fs::read(&path) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err("cannot read backup", &path)(e)),
        }
    }

    /// The older generations are written as backup files first (synced),
    /// then the current one as the vault by the usual atomic rename: the
    /// vault appears in one step. On failure the backups written here are
    /// removed again.
    fn import(&self, history: &[(u64, Vec<u8>)]) -> Result<Revision, StorageError> {
        let Some(((generation, current), older)) = history.split_last() else {
            return Err(StorageError::Unavailable("nothing to import".into()));
        };
        if self.exists()? || !self.backup_files().is_empty() {
            return Err(StorageError::Io {
                what: "a vault or its backups are there already; migrate to a new path, not",
                path: self.path.clone(),
                source: io::ErrorKind::AlreadyExists.into(),
            });
        }
        let mut written = Vec::new();
        let result = (|| {
            for (g, bytes) in older {
                let backup = self.dir.join(format!("{}.gen-{g}", self.file_name()));
                let temp = self.dir.join(format!(
                    "{}{}-{g}.import",
                    self.temp_prefix(),
                    std::process::id()
                ));
                write_new(&temp, bytes, true)?;
                if let Err(e) = fs::rename(&temp, &backup) {
                    let _ = fs::remove_file(&temp);
                    return Err(io_err("cannot name backup", &backup)(e));
                }
                written.push(backup);
            }
            self.compare_and_store(None, current, *generation)
        })();
        if result.is_err() {
            for backup in written {
                let _ = fs::remove_file(backup);
            }
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

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
        assert_eq!(s.load_backup(7).unwrap().unwrap(), b"generation 7");
        // Every backup is a file of its own, the newest one too.
        use std::os::unix::fs::MetadataExt;
        let vault_inode = fs::metadata(&path).unwrap().ino();
        for (_, backup) in s.backup_files() {
            assert_eq!(fs::metadata(&backup).unwrap().nlink(), 1);
            assert_ne!(fs::metadata(&backup).unwrap().ino(), vault_inode);
        }
        let stale = Revision::of(b"generation 7");
        assert!(matches!(
            s.compare_and_store(Some(&stale), b"x", 9),
            Err(StorageError::Conflict(_))
        ));
        assert_eq!(s.load().unwrap().unwrap().0, b"generation 8");
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }

    #[test]
    fn an_edit_in_place_is_a_conflict_even_of_the_same_size() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vault.age");
        let s = FileStorage::open(&path).unwrap();
        let rev = s.compare_and_store(None, b"generation 1", 1).unwrap();
        assert_eq!(s.load().unwrap().unwrap().1, rev);
        // Same length, same inode, written in place.
        let mut f = OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all(b"generation X").unwrap();
        drop(f);
        assert!(matches!(
            s.compare_and_store(Some(&rev), b"generation 2", 2),
            Err(StorageError::Conflict(_))
        ));
        assert_eq!(fs::read(&path).unwrap(), b"generation X");
        assert_eq!(s.load_backup(1).unwrap().unwrap(), b"generation 1");
    }

    #[test]
    fn a_history_exports_and_imports_whole_into_an_empty_store_only() {
        let dir = tempfile::tempdir().unwrap();
        let from = FileStorage::open(&dir.path().join("a/vault.age")).unwrap();
        let mut rev = None;
        for generation in 1..=7u64 {
            let bytes = format!("generation {generation}");
            rev = Some(
                from.compare_and_store(rev.as_ref(), bytes.as_bytes(), generation)
                    .unwrap(),
            );
        }
        let history = export_history(&from).unwrap();
        let generations: Vec<u64> = history.iter().map(|h| h.0).collect();
        assert_eq!(generations, vec![3, 4, 5, 6, 7]);
        assert_eq!(history[4].1, b"generation 7");

        let to = FileStorage::open(&dir.path().join("b/vault.age")).unwrap();
        to.import(&history).unwrap();
        assert_eq!(to.load().unwrap().unwrap().0, b"generation 7");
        let kept: Vec<u64> = to.backups().iter().map(|b| b.0).collect();
        assert_eq!(kept, vec![7, 6, 5, 4, 3]);
        assert_eq!(to.load_backup(4).unwrap().unwrap(), b"generation 4");
        assert_eq!(export_history(&to).unwrap(), history);
        // A store that holds a vault takes no import, and is left as it was.
        let err = to.import(&history[..2]).unwrap_err();
        assert!(err.to_string().contains("migrate to a new path"), "{err}");
        assert_eq!(to.load().unwrap().unwrap().0, b"generation 7");
        // Nor is an empty store exported.
        let empty = FileStorage::open(&dir.path().join("c/vault.age")).unwrap();
        assert!(export_history(&empty).is_err());
    }

    #[test]
    fn a_directory_others_can_write_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let loose = dir.path().join("loose");
        fs::create_dir(&loose).unwrap();
        for mode in [0o777, 0o770, 0o1777] {
            fs::set_permissions(&loose, fs::Permissions::from_mode(mode)).unwrap();
            let err = FileStorage::open(&loose.join("vault.age")).unwrap_err();
            assert!(matches!(err, StorageError::LooseDirectory { .. }), "{err}");
            assert!(err.to_string().contains("chmod 700"), "{err}");
        }
        fs::set_permissions(&loose, fs::Permissions::from_mode(0o755)).unwrap();
        FileStorage::open(&loose.join("vault.age")).unwrap();
    }
}
