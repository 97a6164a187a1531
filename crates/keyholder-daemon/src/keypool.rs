//! Client keys and CA signature nonces made ahead of time.
//!
//! Most issuances (kubeconfigs, exec credentials, `cert issue` without a CSR)
//! generate a P-256 key for the caller, and key generation is about a third
//! of an issuance's CPU time. A background thread keeps a small stock of
//! fresh keys while the session is unlocked; a request takes one from the
//! stock, or generates its own when the stock is empty. In bursts (kubectl,
//! helm and k9s starting the exec plugin together) and with idle CPU it
//! saves a key generation per request.
//!
//! The same thread keeps a stock of ECDSA nonces for P-256 CAs held in the
//! vault (see [`keyholder_pki::ecdsa`]): with one at hand, the CA's
//! signature is two scalar multiplications instead of a point
//! multiplication and an inversion. Nonces are made in batches so that one
//! inversion serves the whole batch.
//!
//! The thread is idle-class (Linux `SCHED_IDLE`): it runs only on a CPU with
//! nothing else to do and gives way at once when a request thread wakes, so
//! it adds no latency. Measured with the issue benchmark, one caller: p99
//! 0.20-0.24 ms idle-class, 0.57-0.58 ms at nice 19; eight callers: about the
//! same throughput either way (the stock runs dry and requests make their
//! own), p99 1.1 ms idle-class. An idle-class thread together with a nice-19
//! one that joined in when the stock ran low did no better in throughput and
//! put p99 at 2.4-2.7 ms. Where the kernel refuses idle-class, the thread
//! runs at nice 19.
//!
//! The stock holds keys that belong to no one yet and nonces not yet used.
//! It is emptied (and each key and nonce zeroized) when the session locks,
//! and refilled only while unlocked; what was being made when the session
//! locked is thrown away. Each item is handed out once.

use std::sync::{Arc, Condvar, Mutex, MutexGuard, TryLockError};

use keyholder_pki::FreshP256;
use keyholder_pki::ecdsa::Nonce;

/// Nice value of the filling thread, for when idle-class is refused.
const NICE: i32 = 19;

/// Nonces made together, sharing one inversion.
const NONCE_BATCH: usize = 16;

/// Makes the calling thread idle-class; false if the kernel refused.
#[allow(unsafe_code)]
fn set_idle_class() -> bool {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: `param` is a valid sched_param that outlives the call, which
    // only reads it; pid 0 names the calling thread. Neither rustix nor std
    // wraps sched_setscheduler.
    unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) == 0 }
}

#[derive(Default)]
struct Stock {
    keys: Vec<FreshP256>,
    nonces: Vec<Nonce>,
    /// Counts drains: what was being made before a drain is thrown away
    /// even if the session is unlocked again by the time it is ready.
    epoch: u64,
    /// True while the session is unlocked.
    filling: bool,
    /// True once the daemon stops.
    stopped: bool,
}

/// One round of work for the filling thread.
#[derive(Clone, Copy)]
enum Job {
    Key,
    Nonces(usize),
}

/// What one round made.
enum Made {
    Key(FreshP256),
    Nonces(Vec<Nonce>),
}

/// The stock and its filling thread.
pub struct KeyPool {
    stock: Mutex<Stock>,
    wake: Condvar,
    /// Keys kept ready, and nonces; 0 keeps none (and starts no thread).
    capacity: usize,
}

impl KeyPool {
    /// A pool of `capacity` keys and nonces with its filling thread running
    /// (idle until [`Self::fill`]).
    pub fn start(capacity: usize) -> Arc<Self> {
        let pool = Arc::new(Self {
            stock: Mutex::default(),
            wake: Condvar::new(),
            capacity,
        });
        if capacity == 0 {
            return pool;
        }
        let worker = pool.clone();
        let spawned = std::thread::Builder::new()
            .name("keyholderd-stock".into())
            .spawn(move || worker.run());
        if let Err(e) = spawned {
            // Issuance still works, generating on request.
            tracing::warn!(error = %crate::escape::Escaped(&e), "cannot start the key generation thread");
        }
        pool
    }

    fn stock(&self) -> MutexGuard<'_, Stock> {
        self.stock.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The stock for a request, or `None` while the filling thread holds the
    /// lock: the request then makes its own key or nonce rather than wait,
    /// since an idle-class thread preempted while holding the lock may not
    /// run again for milliseconds under load (priority inversion).
    fn stock_for_request(&self) -> Option<MutexGuard<'_, Stock>> {
        match self.stock.try_lock() {
            Ok(guard) => Some(guard),
            Err(TryLockError::Poisoned(p)) => Some(p.into_inner()),
            Err(TryLockError::WouldBlock) => None,
        }
    }

    /// A fresh key from the stock, if there is one.
    pub fn take(&self) -> Option<FreshP256> {
        let key = self.stock_for_request()?.keys.pop();
        self.wake.notify_one();
        key
    }

    /// A nonce from the stock, if there is one; it is no longer in the stock.
    pub fn take_nonce(&self) -> Option<Nonce> {
        let nonce = self.stock_for_request()?.nonces.pop();
        self.wake.notify_one();
        nonce
    }

    /// Nonces in the stock now.
    #[cfg(test)]
    pub(crate) fn stocked_nonces(&self) -> usize {
        self.stock().nonces.len()
    }

    /// The next thing to make, if anything: the emptier of keys and nonces
    /// first; nonces a whole batch at a time, once that many are missing (a
    /// batch of one would cost an inversion of its own).
    fn next_job(&self, stock: &Stock) -> Option<Job> {
        if !stock.filling || stock.stopped {
            return None;
        }
        let (keys, nonces) = (stock.keys.len(), stock.nonces.len());
        let batch = NONCE_BATCH.min(self.capacity);
        let want_key = keys < self.capacity;
        let want_nonces = self.capacity.saturating_sub(nonces) >= batch;
        match (want_key, want_nonces) {
            (_, true) if !want_key || nonces <= keys => Some(Job::Nonces(batch)),
            (true, _) => Some(Job::Key),
            _ => None,
        }
    }

    /// Starts keeping the stock full (the session unlocked).
    pub fn fill(&self) {
        self.stock().filling = true;
        self.wake.notify_one();
    }

    /// Empties the stock and stops filling it (the session locked).
    pub fn drain(&self) {
        let taken = {
            let mut stock = self.stock();
            stock.filling = false;
            stock.epoch += 1;
            (
                std::mem::take(&mut stock.keys),
                std::mem::take(&mut stock.nonces),
            )
        };
        // Each key's PKCS#8 and each nonce is zeroized as it drops, outside
        // the lock.
        drop(taken);
    }

    /// Stops the filling thread.
    pub fn stop(&self) {
        self.drain();
        self.stock().stopped = true;
        self.wake.notify_one();
    }

    fn run(&self) {
        // Linux applies a thread's nice value and class to that thread alone.
        if !set_idle_class() {
            tracing::debug!("cannot make the key generation thread idle-class; it runs at nice 19");
            if let Err(e) =
                rustix::process::setpriority_process(Some(rustix::thread::gettid()), NICE)
            {
                tracing::debug!(error = %crate::escape::Escaped(&e), "cannot lower the key generation thread's priority");
            }
        }
        let mut stock = self.stock();
        loop {
            if stock.stopped {
                return;
            }
            let Some(job) = self.next_job(&stock) else {
                stock = self.wake.wait(stock).unwrap_or_else(|p| p.into_inner());
                continue;
            };
            let epoch = stock.epoch;
            drop(stock);
            let made = match job {
                Job::Key => FreshP256::generate().map(Made::Key),
                Job::Nonces(n) => Nonce::prepare(n).map(Made::Nonces),
            };
            stock = self.stock();
            match made {
                // Made across a lock: dropped (and zeroized).
                Ok(_) if !stock.filling || stock.epoch != epoch => {}
                Ok(Made::Key(key)) => {
                    if stock.keys.len() < self.capacity {
                        stock.keys.push(key);
                    }
                }
                Ok(Made::Nonces(nonces)) => {
                    let room = self.capacity.saturating_sub(stock.nonces.len());
                    stock.nonces.extend(nonces.into_iter().take(room));
                }
                Err(e) => {
                    tracing::warn!(error = %crate::escape::Escaped(&e), "key or nonce generation failed; the stock stops filling");
                    stock.filling = false;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    fn stocked(pool: &KeyPool) -> usize {
        pool.stock().keys.len()
    }

    /// Waits (bounded) until `pred` holds.
    fn wait_until(what: &str, pred: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !pred() {
            assert!(Instant::now() < deadline, "timed out waiting until {what}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn fills_only_while_unlocked_and_drains_on_lock() {
        let pool = KeyPool::start(8);
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(stocked(&pool), 0, "nothing is generated while locked");
        assert!(pool.take().is_none());
        assert!(pool.take_nonce().is_none());

        pool.fill();
        wait_until("the stock is full", || {
            stocked(&pool) == 8 && pool.stocked_nonces() == 8
        });
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(stocked(&pool), 8, "the stock never grows past its size");
        assert_eq!(pool.stocked_nonces(), 8);

        // Taking refills.
        let a = taken("a key", || pool.take());
        let b = taken("a key", || pool.take());
        assert_ne!(
            a.public_point(),
            b.public_point(),
            "every key is handed out once"
        );
        wait_until("the stock is refilled", || stocked(&pool) == 8);

        // Nonces are refilled a whole batch at a time (here the batch is the
        // stock's size), and only once that many are missing.
        taken("a nonce", || pool.take_nonce());
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(pool.stocked_nonces(), 7, "one missing nonce is not a batch");
        for _ in 0..7 {
            taken("a nonce", || pool.take_nonce());
        }
        wait_until("the nonces are refilled", || pool.stocked_nonces() == 8);

        pool.drain();
        assert_eq!(stocked(&pool), 0);
        assert_eq!(pool.stocked_nonces(), 0);
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(stocked(&pool), 0, "a locked session's stock stays empty");
        assert_eq!(pool.stocked_nonces(), 0);
        pool.stop();
    }

    /// What `take` returns, retried while the filling thread holds the
    /// lock (a request would make its own instead; see `stock_for_request`).
    fn taken<T>(what: &str, take: impl Fn() -> Option<T>) -> T {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(item) = take() {
                return item;
            }
            assert!(Instant::now() < deadline, "no {what} in the stock");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Scheduling policies (field 41 of /proc/<pid>/task/<tid>/stat) of
    /// this process's threads named `name` (the kernel keeps 15 bytes).
    fn stock_thread_policies(name: &str) -> Vec<u32> {
        let mut out = Vec::new();
        for task in std::fs::read_dir("/proc/self/task")
            .expect("tasks")
            .flatten()
        {
            let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
            if comm.trim() != name {
                continue;
            }
            let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
            // Fields after the parenthesised command name, which may hold spaces.
            let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
            if let Some(policy) = rest.split_whitespace().nth(41 - 3) {
                out.push(policy.parse().expect("policy"));
            }
        }
        out
    }

    #[test]
    fn the_stock_fills_in_idle_time() {
        const SCHED_IDLE: u32 = 5;
        let pool = KeyPool::start(8);
        pool.fill();
        wait_until("the stock is full", || {
            stocked(&pool) == 8 && pool.stocked_nonces() == 8
        });
        let policies = stock_thread_policies("keyholderd-stoc");
        assert!(!policies.is_empty(), "no stock thread found");
        assert!(
            policies.iter().all(|p| *p == SCHED_IDLE),
            "stock threads not idle-class: {policies:?}"
        );
        pool.stop();
    }

    #[test]
    fn size_zero_keeps_nothing() {
        let pool = KeyPool::start(0);
        pool.fill();
        std::thread::sleep(Duration::from_millis(50));
        assert!(pool.take().is_none());
        assert!(pool.take_nonce().is_none());
    }
}
