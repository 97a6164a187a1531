//! A bounded table of connection slots that never turns a new client away
//! because old ones sit idle: when it is full, one idle connection is
//! evicted to make room. Connections that never completed a request go
//! first (a flood of new or half-sent connections pushes out its own kind,
//! not a client that has been served and waits for its next request), then
//! the one idle longest. Only a connection being served (a request in
//! progress) is safe from eviction; a full table of those refuses the
//! newcomer.
//!
//! The agent server uses one table for its socket; keyholderd uses another
//! for the gRPC socket.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::Instant;

/// The table: at most `capacity` connections.
pub struct Slots {
    capacity: usize,
    table: Mutex<Table>,
}

#[derive(Default)]
struct Table {
    next_id: u64,
    entries: HashMap<u64, Entry>,
}

struct Entry {
    last_active: Instant,
    busy: bool,
    /// Requests in flight on the connection ([`SlotHandle::begin`]).
    in_flight: usize,
    /// It has completed a request.
    proven: bool,
    eviction: Arc<Eviction>,
}

/// The signal that tells a connection it was evicted.
#[derive(Default)]
struct Eviction {
    evicted: AtomicBool,
    waker: Mutex<Option<Waker>>,
}

impl Eviction {
    fn fire(&self) {
        self.evicted.store(true, Ordering::Release);
        let waker = self.waker.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(w) = waker {
            w.wake();
        }
    }
}

impl Slots {
    /// A table of `capacity` slots (at least one).
    pub fn new(capacity: usize) -> Arc<Self> {
        Arc::new(Self {
            capacity: capacity.max(1),
            table: Mutex::new(Table::default()),
        })
    }

    fn table(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Connections held now.
    pub fn len(&self) -> usize {
        self.table().entries.len()
    }

    /// Whether no connection is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The slot capacity.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// A slot for a new connection, evicting one (see [`Slots::evict_one`])
    /// if the table is full; `None` when every slot is busy serving.
    pub fn admit(self: &Arc<Self>) -> Option<Slot> {
        let mut table = self.table();
        if table.entries.len() >= self.capacity && !Self::evict_locked(&mut table) {
            return None;
        }
        let id = table.next_id;
        table.next_id = table.next_id.wrapping_add(1);
        let eviction = Arc::new(Eviction::default());
        table.entries.insert(
            id,
            Entry {
                last_active: Instant::now(),
                busy: false,
                in_flight: 0,
                proven: false,
                eviction: eviction.clone(),
            },
        );
        Some(Slot {
            slots: self.clone(),
            id,
            eviction,
        })
    }

    /// Evicts a connection that is not being served, if any: one that
    /// never completed a request if there is such, else the one idle
    /// longest. Used when the table is full, and when the process runs out
    /// of file descriptors. Returns whether one was evicted.
    pub fn evict_one(&self) -> bool {
        Self::evict_locked(&mut self.table())
    }

    fn evict_locked(table: &mut Table) -> bool {
        let oldest = table
            .entries
            .iter()
            .filter(|(_, e)| !e.busy && e.in_flight == 0)
            .min_by_key(|(_, e)| (e.proven, e.last_active))
            .map(|(id, _)| *id);
        match oldest.and_then(|id| table.entries.remove(&id)) {
            Some(entry) => {
                entry.eviction.fire();
                true
            }
            None => false,
        }
    }

    fn in_flight(&self, id: u64, start: bool) {
        if let Some(e) = self.table().entries.get_mut(&id) {
            e.in_flight = if start {
                e.in_flight.saturating_add(1)
            } else {
                e.in_flight.saturating_sub(1)
            };
            e.proven |= !start;
            e.last_active = Instant::now();
        }
    }

    fn update(&self, id: u64, busy: bool, proven: bool) {
        if let Some(e) = self.table().entries.get_mut(&id) {
            e.busy = busy;
            e.proven |= proven;
            e.last_active = Instant::now();
        }
    }
}

/// One connection's slot; dropping it frees the slot.
pub struct Slot {
    slots: Arc<Slots>,
    id: u64,
    eviction: Arc<Eviction>,
}

impl Slot {
    /// A request is being served: not evictable until [`Slot::idle`].
    pub fn busy(&self) {
        self.slots.update(self.id, true, false);
    }

    /// A request was completed and answered; the connection waits for the
    /// next one.
    pub fn idle(&self) {
        self.slots.update(self.id, false, true);
    }

    /// Bytes moved, without a request known to be complete.
    pub fn touch(&self) {
        self.slots.update(self.id, false, false);
    }

    /// A request was completed: the connection is evicted only after those
    /// that never completed one.
    pub fn proven(&self) {
        self.slots.update(self.id, false, true);
    }

    /// Whether the connection was evicted.
    pub fn is_evicted(&self) -> bool {
        self.eviction.evicted.load(Ordering::Acquire)
    }

    /// Ready once the connection has been evicted; registers `cx` to be
    /// woken then. One task waits per slot.
    pub fn poll_evicted(&self, cx: &mut Context<'_>) -> Poll<()> {
        if self.is_evicted() {
            return Poll::Ready(());
        }
        *self
            .eviction
            .waker
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(cx.waker().clone());
        // Evicted between the check and the registration: fire() may have
        // found no waker.
        if self.is_evicted() {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }

    /// Resolves once the connection has been evicted.
    pub async fn evicted(&self) {
        std::future::poll_fn(|cx| self.poll_evicted(cx)).await
    }

    /// A handle that marks requests in flight on this connection, for a
    /// protocol (HTTP/2) that runs several at once.
    pub fn handle(&self) -> SlotHandle {
        SlotHandle {
            slots: Arc::downgrade(&self.slots),
            id: self.id,
        }
    }
}

/// Marks requests in flight on one connection; see [`Slot::handle`].
#[derive(Clone)]
pub struct SlotHandle {
    slots: std::sync::Weak<Slots>,
    id: u64,
}

impl SlotHandle {
    /// A request starts: the connection is not evicted until every
    /// [`InFlight`] it got is dropped.
    pub fn begin(&self) -> InFlight {
        if let Some(slots) = self.slots.upgrade() {
            slots.in_flight(self.id, true);
        }
        InFlight(self.clone())
    }
}

/// One request in flight; dropping it ends it.
pub struct InFlight(SlotHandle);

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Some(slots) = self.0.slots.upgrade() {
            slots.in_flight(self.0.id, false);
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.slots.table().entries.remove(&self.id);
    }
}

/// Descriptors kept out of every socket's share: the listeners, logs, the
/// vault file and its backups, the token module's files.
pub const RESERVED_FDS: u64 = 64;

/// `max`, or less when the process's open file limit is too low for it:
/// at most `percent` % of the limit above [`RESERVED_FDS`] (and at least 8).
/// The agent takes a third and gRPC two thirds, so connections alone never
/// exhaust the descriptors that token checks and vault writes need.
pub fn capacity_within_fd_limit(max: usize, percent: u64) -> usize {
    let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile).current;
    let Some(limit) = limit else {
        return max;
    };
    let share = limit
        .saturating_sub(RESERVED_FDS)
        .saturating_mul(percent.min(100))
        / 100;
    usize::try_from(share)
        .unwrap_or(usize::MAX)
        .clamp(8, max.max(8))
}

/// What an accept loop does after `accept` fails: it never ends. Out of
/// file descriptors (EMFILE, ENFILE) or buffers, it evicts an idle
/// connection of `slots` ([`Slots::evict_one`]) to free one; it then waits (5 ms, doubling up to
/// 500 ms while failures go on) and lets the caller try again. Failures are
/// logged at most once per [`REPORT_EVERY`], with a count.
pub struct AcceptBackoff {
    what: &'static str,
    streak: u32,
    last_report: Option<std::time::Instant>,
    unreported: u64,
}

/// Accept failures are logged at most this often per socket.
pub const REPORT_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// The longest wait between two accept attempts.
const MAX_BACKOFF: std::time::Duration = std::time::Duration::from_millis(500);

impl AcceptBackoff {
    /// Backoff for the listener called `what` in logs.
    pub fn new(what: &'static str) -> Self {
        Self {
            what,
            streak: 0,
            last_report: None,
            unreported: 0,
        }
    }

    /// An accept succeeded.
    pub fn accepted(&mut self) {
        self.streak = 0;
    }

    /// An accept failed with `error`: evicts if that frees a descriptor,
    /// then sleeps.
    pub async fn failed(&mut self, error: &std::io::Error, slots: &Slots) {
        use rustix::io::Errno;
        let out_of_resources = error.raw_os_error().is_some_and(|n| {
            [Errno::MFILE, Errno::NFILE, Errno::NOBUFS, Errno::NOMEM]
                .iter()
                .any(|e| e.raw_os_error() == n)
        });
        let evicted = out_of_resources && slots.evict_one();
        self.unreported = self.unreported.saturating_add(1);
        if self
            .last_report
            .is_none_or(|at| at.elapsed() >= REPORT_EVERY)
        {
            tracing::warn!(
                socket = self.what,
                error = %error,
                failures = self.unreported,
                evicted,
                "accept failed; evicting idle connections and retrying"
            );
            self.last_report = Some(std::time::Instant::now());
            self.unreported = 0;
        }
        let delay = std::time::Duration::from_millis(5u64 << self.streak.min(7)).min(MAX_BACKOFF);
        self.streak = self.streak.saturating_add(1);
        tokio::time::sleep(delay).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_table_evicts_the_longest_idle_and_spares_busy_ones() {
        let slots = Slots::new(3);
        let a = slots.admit().expect("a");
        std::thread::sleep(std::time::Duration::from_millis(2));
        let b = slots.admit().expect("b");
        std::thread::sleep(std::time::Duration::from_millis(2));
        let c = slots.admit().expect("c");
        a.busy();
        let d = slots
            .admit()
            .expect("d evicts b, the longest idle not busy");
        assert!(!a.is_evicted() && b.is_evicted() && !c.is_evicted());
        assert_eq!(slots.len(), 3);
        c.busy();
        d.busy();
        assert!(slots.admit().is_none(), "every slot is busy");
        d.idle();
        let e = slots.admit().expect("e evicts d");
        assert!(d.is_evicted());
        drop((a, b, c, d, e));
        assert!(slots.is_empty());
    }

    #[test]
    fn connections_that_never_completed_a_request_go_first() {
        let slots = Slots::new(2);
        let served = slots.admit().expect("served");
        served.idle();
        std::thread::sleep(std::time::Duration::from_millis(2));
        let silent = slots.admit().expect("silent");
        let flood: Vec<Slot> = (0..10).map(|_| slots.admit().expect("flood")).collect();
        assert!(silent.is_evicted(), "the silent one made room first");
        assert!(!served.is_evicted(), "the served one outlasts a flood");
        assert_eq!(flood.iter().filter(|s| !s.is_evicted()).count(), 1);
    }
}
