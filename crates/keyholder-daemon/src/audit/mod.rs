//! The audit log: one JSON line per security-relevant event, hash-chained,
//! anchored with a MAC keyed by the open vault, durable before a result is
//! released, and refusing work while it cannot be written (docs/audit.md).
//!
//! Writing: [`AuditLog::record`] chains the record under a short lock and
//! hands it to one writer thread, which writes every record queued so far
//! and fsyncs once for all of them (group commit); each caller waits for
//! the fsync that covers its record. A failed write or fsync, or a log file
//! removed or replaced under the daemon, puts the log in the failed state:
//! the records not yet durable are dropped (their callers get
//! UNAVAILABLE), the chain goes back to the last durable record, and every
//! request is refused at [`AuditSink::ready`] until a write succeeds
//! again, which each new request tries (an `audit.resumed` record that
//! counts the records lost).

pub mod record;

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::time::{Duration, SystemTime};

use hmac::{Hmac, Mac};
use keyholder_audit::{GENESIS, Head};
use serde_json::{Map, Value, json};
use sha2::Sha256;
use tokio::sync::{broadcast, oneshot};

use crate::access::{AuditSink, Event};
use crate::core::Core;
use crate::error::{Error, Result};
pub use record::Draft;

/// How far ahead of the records the active file is allocated (zeros). An
/// fdatasync that does not change the file's size costs a fraction of one
/// that does (0.7 ms against 4.5 ms on the development machine's disk), so
/// records are written into space allocated ahead, and the zeros are cut
/// off again at rotation, shutdown and start.
const PREALLOCATE: u64 = 1 << 20;

/// How long a lock waits for its record before going on without it.
const LOCK_RECORD_WAIT: Duration = Duration::from_secs(5);

/// Someone waiting for a record to be durable.
enum Waiter {
    Async(oneshot::Sender<std::result::Result<(), String>>),
    Sync(std::sync::mpsc::Sender<std::result::Result<(), String>>),
}

impl Waiter {
    fn send(self, r: std::result::Result<(), String>) {
        match self {
            Self::Async(tx) => {
                let _ = tx.send(r);
            }
            Self::Sync(tx) => {
                let _ = tx.send(r);
            }
        }
    }
}

/// The chain and the queue, under one short-held lock.
struct Chain {
    /// The last record chained (durable or queued).
    seq: u64,
    prev: String,
    /// The last durable record.
    durable: Head,
    /// Records queued for the writer.
    pending: Vec<u8>,
    pending_first: u64,
    lines: Vec<(u64, Arc<str>)>,
    waiters: Vec<Waiter>,
    /// Why the log cannot be written, while it cannot.
    failed: Option<String>,
    /// Records that could not be written since the last durable one.
    lost: u64,
    /// The writer thread is writing a batch.
    busy: bool,
}

/// The open file.
struct Output {
    file: Option<File>,
    /// Its length up to the last durable record.
    len: u64,
    /// Its size: past `len`, zeros allocated ahead ([`PREALLOCATE`]).
    allocated: u64,
    /// The first record's `seq` in it (0 while empty).
    first_seq: u64,
    /// `(dev, ino)` of the file, to notice it removed or replaced.
    id: (u64, u64),
}

/// The audit log of one daemon.
pub struct AuditLog {
    path: PathBuf,
    max_bytes: u64,
    chain: Mutex<Chain>,
    wake: Condvar,
    output: Mutex<Output>,
    lines: broadcast::Sender<(u64, Arc<str>)>,
}

fn now() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

fn anchor_mac(key: &[u8; 32], seq: u64, prev: &str) -> String {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key)
        .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
    mac.update(&keyholder_audit::anchor_message(seq, prev));
    keyholder_audit::hex(&mac.finalize().into_bytes())
}

/// Whether `mac` (hex) is the anchor MAC of `seq` and `prev` under `key`.
pub fn check_anchor(key: &[u8; 32], seq: u64, prev: &str, mac: &str) -> bool {
    use subtle::ConstantTimeEq;
    let want = anchor_mac(key, seq, prev);
    want.len() == mac.len() && bool::from(want.as_bytes().ct_eq(mac.as_bytes()))
}

fn file_id(m: &std::fs::Metadata) -> (u64, u64) {
    (m.dev(), m.ino())
}

fn open_log(path: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .read(true)
        .mode(0o600)
        .open(path)
}

fn sync_dir(path: &Path) {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
        && let Ok(d) = File::open(dir)
    {
        let _ = d.sync_all();
    }
}

/// The last complete line of `file` (up to 2 MiB back, past the zeros
/// allocated ahead), where the records end (after that line), and the
/// length of an unfinished record after it.
fn last_line(file: &mut File) -> std::io::Result<(Option<String>, u64, u64)> {
    let size = file.metadata()?.len();
    let from = size.saturating_sub(2 * PREALLOCATE);
    file.seek(SeekFrom::Start(from))?;
    let mut buf = Vec::new();
    file.take(2 * PREALLOCATE).read_to_end(&mut buf)?;
    let end = buf.iter().rposition(|b| *b != 0).map_or(0, |i| i + 1);
    let complete = match buf[..end].iter().rposition(|b| *b == b'\n') {
        Some(i) => i + 1,
        None if from == 0 => 0,
        None => end,
    };
    let tail = u64::try_from(end - complete).unwrap_or(0);
    let text = String::from_utf8_lossy(&buf[..complete]);
    let line = text
        .trim_end_matches('\n')
        .rsplit('\n')
        .next()
        .filter(|l| !l.is_empty())
        .map(str::to_owned);
    let records_end = from.saturating_add(u64::try_from(complete).unwrap_or(0));
    Ok((line, records_end, tail))
}

fn first_seq_of(path: &Path) -> u64 {
    std::fs::read(path)
        .ok()
        .and_then(|b| {
            let text = String::from_utf8_lossy(&b).into_owned();
            text.lines().next().and_then(keyholder_audit::parse)
        })
        .map_or(0, |p| p.seq)
}

/// `(seq, hash)` a chain continues from after `line`: its own, when it is
/// a record; else what it claims, else the start.
fn chain_end(line: Option<&str>) -> (u64, String) {
    let Some(line) = line else {
        return (0, GENESIS.to_owned());
    };
    if let Some(p) = keyholder_audit::parse(line) {
        return (p.seq, p.hash);
    }
    let v: Option<Value> = serde_json::from_str(line).ok();
    let seq = v
        .as_ref()
        .and_then(|v| v.get("seq"))
        .and_then(Value::as_u64)
        .unwrap_or(0);
    (seq, keyholder_audit::body_hash(line))
}

impl AuditLog {
    /// Opens (or creates) the log at `path` and continues its chain. A log
    /// that cannot be opened starts failed: every request is refused until
    /// it can be written.
    pub fn open(path: PathBuf, max_bytes: u64) -> Arc<Self> {
        let (lines, _) = broadcast::channel(1024);
        let mut note = None;
        let mut out = Output {
            file: None,
            len: 0,
            allocated: 0,
            first_seq: 0,
            id: (0, 0),
        };
        let mut end = (0, GENESIS.to_owned());
        let opened = (|| -> std::io::Result<()> {
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
                && !dir.exists()
            {
                use std::os::unix::fs::DirBuilderExt;
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(dir)?;
            }
            let mut file = open_log(&path)?;
            let (line, len, tail) = last_line(&mut file)?;
            if tail > 0 {
                // A record cut short by a crash was never released.
                note = Some(format!(
                    "removed an unfinished record of {tail} bytes at the end of the log"
                ));
            }
            // Zeros allocated ahead by the last run go too.
            if file.metadata()?.len() != len {
                file.set_len(len)?;
                file.sync_all()?;
            }
            end = match line {
                Some(l) => chain_end(Some(&l)),
                None => {
                    // An empty active file: the chain goes on from the
                    // newest rotated one.
                    let files = keyholder_audit::log_files(&path)?;
                    let newest = files.iter().rev().find(|f| **f != path);
                    match newest {
                        Some(f) => {
                            let mut rf = File::open(f)?;
                            let (l, _, _) = last_line(&mut rf)?;
                            chain_end(l.as_deref())
                        }
                        None => chain_end(None),
                    }
                }
            };
            out.first_seq = if len > 0 { first_seq_of(&path) } else { 0 };
            out.len = len;
            out.allocated = len;
            out.id = file_id(&file.metadata()?);
            out.file = Some(file);
            sync_dir(&path);
            Ok(())
        })();
        let failed = opened.as_ref().err().map(|e| {
            tracing::error!(path = %path.display(), error = %e, "the audit log cannot be opened; requests are refused until it can");
            format!("{}: {e}", path.display())
        });
        let log = Arc::new(Self {
            path,
            max_bytes,
            chain: Mutex::new(Chain {
                seq: end.0,
                prev: end.1.clone(),
                durable: Head {
                    seq: end.0,
                    hash: end.1,
                },
                pending: Vec::new(),
                pending_first: 0,
                lines: Vec::new(),
                waiters: Vec::new(),
                failed,
                lost: 0,
                busy: false,
            }),
            wake: Condvar::new(),
            output: Mutex::new(out),
            lines,
        });
        let weak = Arc::downgrade(&log);
        let spawned = std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || writer_thread(weak));
        if let Err(e) = spawned {
            log.chain().failed = Some(format!("cannot start the audit writer: {e}"));
        }
        let mut details = Map::new();
        details.insert("version".into(), json!(env!("CARGO_PKG_VERSION")));
        if let Some(note) = note {
            details.insert("note".into(), json!(note));
        }
        if log.chain().failed.is_none() {
            let _ = log.record_blocking(Draft::system("audit.start", "log", details), None);
        }
        log
    }

    fn chain(&self) -> MutexGuard<'_, Chain> {
        self.chain.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn output(&self) -> MutexGuard<'_, Output> {
        self.output.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The active file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// New durable lines, with their `seq`.
    pub fn subscribe(&self) -> broadcast::Receiver<(u64, Arc<str>)> {
        self.lines.subscribe()
    }

    /// The last durable record.
    pub fn head(&self) -> Head {
        self.chain().durable.clone()
    }

    /// Chains `draft` and queues it; with `key`, `draft` is an anchor and
    /// gets its MAC.
    fn append(&self, mut draft: Draft, key: Option<&[u8; 32]>, waiter: Waiter) {
        let mut c = self.chain();
        if let Some(why) = c.failed.clone() {
            c.lost = c.lost.saturating_add(1);
            drop(c);
            waiter.send(Err(why));
            return;
        }
        let seq = c.seq.saturating_add(1);
        if let Some(key) = key {
            draft
                .details
                .insert("mac".into(), json!(anchor_mac(key, seq, &c.prev)));
        }
        let body = draft.body(seq, &now(), &c.prev);
        let Some((line, hash)) = keyholder_audit::seal(&body) else {
            drop(c);
            waiter.send(Err("a record did not serialise".into()));
            return;
        };
        if c.pending.is_empty() {
            c.pending_first = seq;
        }
        c.pending.extend_from_slice(line.as_bytes());
        c.pending.push(b'\n');
        c.lines.push((seq, Arc::from(line)));
        c.waiters.push(waiter);
        c.seq = seq;
        c.prev = hash;
        drop(c);
        self.wake.notify_one();
    }

    /// Makes `draft` durable.
    pub async fn record_draft(&self, draft: Draft) -> Result<()> {
        let (tx, rx) = oneshot::channel();
        self.append(draft, None, Waiter::Async(tx));
        match rx.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(why)) => Err(Error::AuditUnavailable(why)),
            Err(_) => Err(Error::AuditUnavailable("the audit writer stopped".into())),
        }
    }

    /// Makes `draft` durable, blocking the thread (at most
    /// [`LOCK_RECORD_WAIT`]); with `key`, as an anchor.
    pub fn record_blocking(
        &self,
        draft: Draft,
        key: Option<&[u8; 32]>,
    ) -> std::result::Result<Head, String> {
        let (tx, rx) = std::sync::mpsc::channel();
        self.append(draft, key, Waiter::Sync(tx));
        let got = crate::core::token_call(|| rx.recv_timeout(LOCK_RECORD_WAIT));
        match got {
            Ok(Ok(())) => Ok(self.head()),
            Ok(Err(why)) => Err(why),
            Err(_) => Err("the audit record was not written in time".into()),
        }
    }

    /// Writes an anchor (a MAC over the chain so far, keyed by `key`) and
    /// returns the head once it is durable.
    pub async fn anchor(&self, key: &[u8; 32]) -> Result<Head> {
        let (tx, rx) = oneshot::channel();
        self.append(
            Draft::system(keyholder_audit::ANCHOR_OP, "log", Map::new()),
            Some(key),
            Waiter::Async(tx),
        );
        match rx.await {
            Ok(Ok(())) => Ok(self.head()),
            Ok(Err(why)) => Err(Error::AuditUnavailable(why)),
            Err(_) => Err(Error::AuditUnavailable("the audit writer stopped".into())),
        }
    }

    /// Writes `buf` (records `first..`) and makes it durable.
    fn write_batch(&self, buf: &[u8], first: u64) -> std::result::Result<(), String> {
        use std::os::unix::fs::FileExt;
        let mut out = self.output();
        let len = u64::try_from(buf.len()).unwrap_or(u64::MAX);
        if out.len > 0 && out.len.saturating_add(len) > self.max_bytes {
            self.rotate(&mut out)?;
        }
        let at = out.len;
        let end = at.saturating_add(len);
        let Some(file) = out.file.as_ref() else {
            return Err(format!("{} is not open", self.path.display()));
        };
        let mut allocated = out.allocated;
        if end > allocated {
            // Allocate ahead; where that fails (a nearly full disk) the
            // write extends the file itself, and fails if it cannot.
            let ahead = PREALLOCATE.max(len);
            if rustix::fs::fallocate(file, rustix::fs::FallocateFlags::empty(), at, ahead).is_ok() {
                allocated = at.saturating_add(ahead);
            }
        }
        let written = file.write_all_at(buf, at).and_then(|()| file.sync_data());
        if let Err(e) = written {
            // Whatever part of the batch reached the file goes, with the
            // zeros ahead: none of it was released.
            let _ = file.set_len(at);
            out.allocated = at;
            return Err(format!("{}: {e}", self.path.display()));
        }
        match std::fs::metadata(&self.path) {
            Ok(m) if file_id(&m) == out.id => {}
            _ => {
                out.file = None;
                return Err(format!("{} was removed or replaced", self.path.display()));
            }
        }
        if out.len == 0 {
            out.first_seq = first;
        }
        out.len = end;
        out.allocated = allocated.max(end);
        Ok(())
    }

    /// Cuts off the zeros allocated ahead, so the file ends with its last
    /// record (at shutdown; a new start does the same after a crash).
    pub fn close(&self) {
        let mut out = self.output();
        let len = out.len;
        if let Some(file) = out.file.as_ref()
            && out.allocated > len
        {
            if let Err(e) = file.set_len(len).and_then(|()| file.sync_all()) {
                tracing::warn!(error = %e, "cannot trim the audit log's space allocated ahead");
            }
            out.allocated = len;
        }
    }

    /// Moves the active file aside as `NAME.<first seq>` and starts a new one.
    fn rotate(&self, out: &mut Output) -> std::result::Result<(), String> {
        let err = |e: std::io::Error| format!("rotating {}: {e}", self.path.display());
        if let Some(file) = out.file.as_ref() {
            file.set_len(out.len)
                .and_then(|()| file.sync_all())
                .map_err(err)?;
        }
        let aside = keyholder_audit::rotated_name(&self.path, out.first_seq);
        std::fs::rename(&self.path, &aside).map_err(err)?;
        let file = OpenOptions::new()
            .create_new(true)
            .write(true)
            .read(true)
            .mode(0o600)
            .open(&self.path)
            .map_err(err)?;
        sync_dir(&self.path);
        out.id = file_id(&file.metadata().map_err(err)?);
        out.file = Some(file);
        out.len = 0;
        out.allocated = 0;
        out.first_seq = 0;
        tracing::info!(rotated = %aside.display(), "audit log rotated");
        Ok(())
    }

    /// One round of the writer thread: the queued records, written and
    /// synced together. Returns false when nothing was queued.
    fn flush(&self) -> bool {
        let (buf, first, lines, waiters, last) = {
            let mut c = self.chain();
            if c.pending.is_empty() {
                return false;
            }
            c.busy = true;
            (
                std::mem::take(&mut c.pending),
                c.pending_first,
                std::mem::take(&mut c.lines),
                std::mem::take(&mut c.waiters),
                Head {
                    seq: c.seq,
                    hash: c.prev.clone(),
                },
            )
        };
        let result = self.write_batch(&buf, first);
        let mut c = self.chain();
        c.busy = false;
        match result {
            Ok(()) => {
                c.durable = last;
                drop(c);
                for w in waiters {
                    w.send(Ok(()));
                }
                for line in lines {
                    let _ = self.lines.send(line);
                }
            }
            Err(why) => {
                tracing::error!(error = %why, "the audit log cannot be written; requests are refused until it can");
                let later = std::mem::take(&mut c.waiters);
                c.pending.clear();
                c.lines.clear();
                let n = u64::try_from(waiters.len() + later.len()).unwrap_or(u64::MAX);
                c.lost = c.lost.saturating_add(n);
                c.seq = c.durable.seq;
                c.prev = c.durable.hash.clone();
                c.failed = Some(why.clone());
                drop(c);
                for w in waiters.into_iter().chain(later) {
                    w.send(Err(why.clone()));
                }
            }
        }
        true
    }

    /// While failed: tries to write again (an `audit.resumed` record
    /// counting the records lost); Ok once that is durable.
    fn resume(&self) -> std::result::Result<(), String> {
        let mut c = self.chain();
        let Some(why) = c.failed.clone() else {
            return Ok(());
        };
        if c.busy {
            return Err(why);
        }
        let mut out = self.output();
        let attempt = (|| -> std::result::Result<(Head, Arc<str>), String> {
            let err = |e: std::io::Error| format!("{}: {e}", self.path.display());
            if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty())
                && !dir.exists()
            {
                return Err(format!("{}: the directory is gone", self.path.display()));
            }
            let mut file = open_log(&self.path).map_err(err)?;
            let meta = file.metadata().map_err(err)?;
            if file_id(&meta) != out.id || out.file.is_none() {
                // A new file (the old one was removed): the chain goes on in
                // it; verify reports the records that went with the old one.
                let (_, end, _) = last_line(&mut file).map_err(err)?;
                out.len = end;
                out.first_seq = if out.len > 0 {
                    first_seq_of(&self.path)
                } else {
                    0
                };
                out.id = file_id(&meta);
            }
            if meta.len() != out.len {
                file.set_len(out.len).map_err(err)?;
            }
            out.allocated = out.len;
            let seq = c.seq.saturating_add(1);
            let mut details = Map::new();
            details.insert("lost".into(), json!(c.lost));
            details.insert("error".into(), json!(why));
            let body = Draft::system("audit.resumed", "log", details).body(seq, &now(), &c.prev);
            let (line, hash) = keyholder_audit::seal(&body)
                .ok_or_else(|| "a record did not serialise".to_owned())?;
            let mut bytes = line.clone().into_bytes();
            bytes.push(b'\n');
            let len = u64::try_from(bytes.len()).unwrap_or(u64::MAX);
            let written = std::os::unix::fs::FileExt::write_all_at(&file, &bytes, out.len)
                .and_then(|()| file.sync_data());
            if let Err(e) = written {
                let _ = file.set_len(out.len);
                return Err(err(e));
            }
            sync_dir(&self.path);
            if out.len == 0 {
                out.first_seq = seq;
            }
            out.len = out.len.saturating_add(len);
            out.allocated = out.len;
            out.file = Some(file);
            Ok((Head { seq, hash }, Arc::from(line)))
        })();
        drop(out);
        match attempt {
            Ok((head, line)) => {
                tracing::warn!(lost = c.lost, "the audit log is writable again");
                c.seq = head.seq;
                c.prev = head.hash.clone();
                c.durable = head.clone();
                c.failed = None;
                c.lost = 0;
                drop(c);
                let _ = self.lines.send((head.seq, line));
                Ok(())
            }
            Err(now) => {
                c.failed = Some(now.clone());
                Err(now)
            }
        }
    }
}

impl Drop for AuditLog {
    fn drop(&mut self) {
        self.close();
    }
}

fn writer_thread(log: Weak<AuditLog>) {
    loop {
        let Some(log) = log.upgrade() else { return };
        {
            let c = log.chain();
            if c.pending.is_empty() {
                // Wakes on a new record; the timeout lets the thread end
                // once the log is dropped.
                let _ = log.wake.wait_timeout(c, Duration::from_secs(1));
            }
        }
        // A panic in a round must not leave callers waiting for ever: the
        // log fails closed instead, and each new request tries it again.
        loop {
            match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| log.flush())) {
                Ok(true) => {}
                Ok(false) => break,
                Err(_) => {
                    let mut c = log.chain();
                    let waiters = std::mem::take(&mut c.waiters);
                    c.pending.clear();
                    c.lines.clear();
                    c.busy = false;
                    c.seq = c.durable.seq;
                    c.prev = c.durable.hash.clone();
                    c.failed = Some("the audit writer failed".into());
                    drop(c);
                    for w in waiters {
                        w.send(Err("the audit writer failed".into()));
                    }
                    break;
                }
            }
        }
    }
}

#[tonic::async_trait]
impl AuditSink for AuditLog {
    fn ready(&self) -> Result<()> {
        self.resume().map_err(Error::AuditUnavailable)
    }

    async fn record(&self, event: Event) -> Result<()> {
        self.record_draft(Draft::from_event(&event)).await
    }

    fn log(&self) -> Option<&AuditLog> {
        Some(self)
    }
}

impl AuditLog {
    /// The records of a lock: `session.lock` with its reason and, while the
    /// vault's `key` is still there, an anchor. Returns the head once
    /// durable (at most [`LOCK_RECORD_WAIT`]); a lock never waits longer,
    /// nor fails, for want of a record.
    pub fn lock_records(&self, reason: &str, key: Option<&[u8; 32]>) -> Option<Head> {
        let mut details = Map::new();
        details.insert("reason".into(), json!(reason));
        let (tx, _ignored) = std::sync::mpsc::channel();
        self.append(
            Draft::system("session.lock", "session", details),
            None,
            Waiter::Sync(tx),
        );
        let key = key?;
        match self.record_blocking(
            Draft::system(keyholder_audit::ANCHOR_OP, "log", Map::new()),
            Some(key),
        ) {
            Ok(head) => Some(head),
            Err(why) => {
                tracing::warn!(error = %why, "the lock's audit records were not written");
                None
            }
        }
    }
}

/// Installs the configured audit log on `core` (none with `audit_log =
/// "off"`) and the record of every lock.
pub fn install(core: &Arc<Core>) {
    let Some(path) = core.config.audit_log_path() else {
        tracing::warn!("the audit log is off (audit_log = \"off\")");
        return;
    };
    let log = AuditLog::open(path, core.config.audit_max_bytes);
    core.set_audit_sink(log);
}

#[cfg(test)]
mod tests;
