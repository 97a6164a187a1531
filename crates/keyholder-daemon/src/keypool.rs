//! Client keys generated ahead of time.
//!
//! Most issuances (kubeconfigs, exec credentials, `cert issue` without a CSR)
//! generate a P-256 key for the caller, and key generation is about a third
//! of an issuance's CPU time. A low-priority thread keeps a small stock of
//! fresh keys while the session is unlocked, mostly in CPU time nothing else
//! wants (see [`Class`]); a request takes one from the stock, or generates
//! its own when the stock is empty. In bursts (kubectl, helm and k9s starting
//! the exec plugin together) and with idle CPU it saves a key generation per
//! request.
//!
//! The same thread keeps a stock of ECDSA nonces for P-256 CAs held in the
//! vault (see [`keyholder_pki::ecdsa`]): with one at hand, the CA's
//! signature is two scalar multiplications instead of a point
//! multiplication and an inversion. Nonces are made in batches so that one
//! inversion serves the whole batch.
//!
//! The stock holds keys that belong to no one yet and nonces not yet used.
//! It is emptied (and each key and nonce zeroized) when the session locks,
//! and refilled only while unlocked. Each item is handed out once.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use keyholder_pki::FreshP256;
use keyholder_pki::ecdsa::Nonce;

/// Nice value of the filling thread when it is not idle-class.
const NICE: i32 = 19;

/// How the filling thread is scheduled. It starts idle-class (`SCHED_IDLE`):
/// it runs only on a CPU with nothing else to do and gives way at once when
/// a request thread wakes, so it adds no latency. When the stock runs low
/// anyway (sustained load leaves no idle CPU), it becomes an ordinary thread
/// at nice 19 and takes a small share, since a stocked key or nonce is
/// cheaper than making one inside a request; once the stock is mostly full
/// again it goes back to idle. Measured at 8 concurrent callers: idle-class
/// alone 13,000-13,300/s, nice 19 alone 14,800-14,900/s; one caller: p99
/// 0.17-0.22 ms idle-class, 0.57-0.58 ms at nice 19.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Class {
    Idle,
    Low,
}

/// Sets the calling thread's scheduling class; false if the kernel refused.
#[allow(unsafe_code)]
fn set_class(class: Class) -> bool {
    let policy = match class {
        Class::Idle => libc::SCHED_IDLE,
        Class::Low => libc::SCHED_OTHER,
    };
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: `param` is a valid sched_param that outlives the call, which
    // only reads it; pid 0 names the calling thread. Neither rustix nor std
    // wraps sched_setscheduler.
    unsafe { libc::sched_setscheduler(0, policy, &param) == 0 }
}

/// Nonces made together, sharing one inversion.
const NONCE_BATCH: usize = 16;

#[derive(Default)]
struct Stock {
    keys: Vec<FreshP256>,
    nonces: Vec<Nonce>,
    /// True while the session is unlocked.
    filling: bool,
    /// True once the daemon stops.
    stopped: bool,
}

/// The stock and its filling thread.
pub struct KeyPool {
    stock: Mutex<Stock>,
    wake: Condvar,
    /// Keys kept ready, and nonces; 0 keeps none (and starts no thread).
    capacity: usize,
}

impl KeyPool {
    /// A pool of `capacity` keys with its filling thread running (idle
    /// until [`Self::fill`]).
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
            .name("keyholderd-keygen".into())
            .spawn(move || worker.run());
        if let Err(e) = spawned {
            // Issuance still works, generating every key on request.
            tracing::warn!(error = %e, "cannot start the key generation thread");
        }
        pool
    }

    fn stock(&self) -> MutexGuard<'_, Stock> {
        self.stock.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A fresh key from the stock, if there is one.
    pub fn take(&self) -> Option<FreshP256> {
        let key = self.stock().keys.pop();
        self.wake.notify_one();
        key
    }

    /// A nonce from the stock, if there is one; it is no longer in the stock.
    pub fn take_nonce(&self) -> Option<Nonce> {
        let mut stock = self.stock();
        let nonce = stock.nonces.pop();
        if self.nonces_wanted(&stock) > 0 {
            self.wake.notify_one();
        }
        nonce
    }

    /// Nonces in the stock now.
    #[cfg(test)]
    pub(crate) fn stocked_nonces(&self) -> usize {
        self.stock().nonces.len()
    }

    /// How many nonces to make now: a whole batch once that many are
    /// missing (a batch of one would cost an inversion of its own), else none.
    fn nonces_wanted(&self, stock: &Stock) -> usize {
        let batch = NONCE_BATCH.min(self.capacity);
        let missing = self.capacity.saturating_sub(stock.nonces.len());
        if batch > 0 && missing >= batch {
            batch
        } else {
            0
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
        {
            let mut stock = self.stock();
            stock.stopped = true;
            stock.filling = false;
            stock.keys.clear();
            stock.nonces.clear();
        }
        self.wake.notify_one();
    }

    fn run(&self) {
        // Linux applies a thread's nice value to that thread alone. The nice
        // value stays set while the thread is idle-class.
        if let Err(e) = rustix::process::setpriority_process(Some(rustix::thread::gettid()), NICE) {
            tracing::debug!(error = %e, "cannot lower the key generation thread's priority");
        }
        let mut class = Class::Low;
        // Cleared if the kernel refuses a switch (a sandbox may): the thread
        // then stays at nice 19.
        let mut can_switch = true;
        let mut stock = self.stock();
        loop {
            if stock.stopped {
                return;
            }
            // Below a quarter full: compete (at nice 19); three quarters
            // full again: back to idle. The gap keeps switches rare.
            let level = stock.keys.len().min(stock.nonces.len());
            let wanted = if level * 4 < self.capacity {
                Class::Low
            } else if level * 4 >= self.capacity * 3 {
                Class::Idle
            } else {
                class
            };
            if wanted != class && stock.filling && can_switch {
                if set_class(wanted) {
                    class = wanted;
                } else {
                    tracing::debug!(
                        ?wanted,
                        "cannot change the key generation thread's scheduling class"
                    );
                    can_switch = false;
                }
            }
            let want_key = stock.keys.len() < self.capacity;
            let want_nonces = self.nonces_wanted(&stock);
            if !stock.filling || (!want_key && want_nonces == 0) {
                stock = self.wake.wait(stock).unwrap_or_else(|p| p.into_inner());
                continue;
            }
            // The emptier of the two first.
            let nonces_first =
                want_nonces > 0 && (!want_key || stock.nonces.len() <= stock.keys.len());
            drop(stock);
            let made = if nonces_first {
                Nonce::prepare(want_nonces).map(Made::Nonces)
            } else {
                FreshP256::generate().map(Made::Key)
            };
            stock = self.stock();
            match made {
                Ok(_) if !stock.filling => {}
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
                    tracing::warn!(error = %e, "key or nonce generation failed; the stock stops filling");
                    stock.filling = false;
                }
            }
        }
    }
}

/// What one round of the filling thread made.
enum Made {
    Key(FreshP256),
    Nonces(Vec<Nonce>),
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
        let a = pool.take().expect("a key");
        let b = pool.take().expect("a key");
        assert_ne!(
            a.public_point(),
            b.public_point(),
            "every key is handed out once"
        );
        wait_until("the stock is refilled", || stocked(&pool) == 8);

        // Nonces are refilled a whole batch at a time (here the batch is the
        // stock's size), and only once that many are missing.
        assert!(pool.take_nonce().is_some());
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(pool.stocked_nonces(), 7, "one missing nonce is not a batch");
        for _ in 0..7 {
            assert!(pool.take_nonce().is_some());
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

    /// Scheduling policies (field 41 of /proc/<pid>/task/<tid>/stat) of
    /// this process's stock threads.
    fn stock_thread_policies() -> Vec<u32> {
        let mut out = Vec::new();
        for task in std::fs::read_dir("/proc/self/task")
            .expect("tasks")
            .flatten()
        {
            let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
            // The kernel keeps 15 bytes of a thread name.
            if comm.trim() != "keyholderd-keyg" {
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
    fn a_full_stock_fills_only_in_idle_time() {
        const SCHED_IDLE: u32 = 5;
        let pool = KeyPool::start(8);
        pool.fill();
        wait_until("the stock is full and its thread idle-class", || {
            stocked(&pool) == 8
                && pool.stocked_nonces() == 8
                && stock_thread_policies().contains(&SCHED_IDLE)
        });
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
