//! Client keys generated ahead of time.
//!
//! Most issuances (kubeconfigs, exec credentials, `cert issue` without a CSR)
//! generate a P-256 key for the caller, and key generation is about a third
//! of an issuance's CPU time. A low-priority thread keeps a small stock of
//! fresh keys while the session is unlocked, using CPU time nothing else
//! wants; a request takes one from the stock, or generates its own when the
//! stock is empty. Under sustained load the stock runs dry and issuance costs
//! what it did without it; in bursts (kubectl, helm and k9s starting the exec
//! plugin together) and with idle CPU it saves a key generation per request.
//!
//! The stock holds keys that belong to no one yet. It is emptied (and each
//! key zeroized) when the session locks, and refilled only while unlocked.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use keyholder_pki::FreshP256;

/// Nice value of the filling thread: it runs when nothing else wants the CPU.
const NICE: i32 = 19;

#[derive(Default)]
struct Stock {
    keys: Vec<FreshP256>,
    /// True while the session is unlocked.
    filling: bool,
    /// True once the daemon stops.
    stopped: bool,
}

/// The stock and its filling thread.
pub struct KeyPool {
    stock: Mutex<Stock>,
    wake: Condvar,
    /// Keys kept ready; 0 keeps none (and starts no thread).
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

    /// Starts keeping the stock full (the session unlocked).
    pub fn fill(&self) {
        self.stock().filling = true;
        self.wake.notify_one();
    }

    /// Empties the stock and stops filling it (the session locked).
    pub fn drain(&self) {
        let keys = {
            let mut stock = self.stock();
            stock.filling = false;
            std::mem::take(&mut stock.keys)
        };
        // Each key's PKCS#8 is zeroized as it drops, outside the lock.
        drop(keys);
    }

    /// Stops the filling thread.
    pub fn stop(&self) {
        {
            let mut stock = self.stock();
            stock.stopped = true;
            stock.filling = false;
            stock.keys.clear();
        }
        self.wake.notify_one();
    }

    fn run(&self) {
        // Linux applies a thread's nice value to that thread alone.
        if let Err(e) = rustix::process::setpriority_process(Some(rustix::thread::gettid()), NICE) {
            tracing::debug!(error = %e, "cannot lower the key generation thread's priority");
        }
        let mut stock = self.stock();
        loop {
            if stock.stopped {
                return;
            }
            if !stock.filling || stock.keys.len() >= self.capacity {
                stock = self.wake.wait(stock).unwrap_or_else(|p| p.into_inner());
                continue;
            }
            drop(stock);
            let key = FreshP256::generate();
            stock = self.stock();
            match key {
                Ok(key) if stock.filling && stock.keys.len() < self.capacity => {
                    stock.keys.push(key)
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "key generation failed; the stock stops filling");
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

        pool.fill();
        wait_until("the stock is full", || stocked(&pool) == 8);
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(stocked(&pool), 8, "the stock never grows past its size");

        // Taking refills.
        let a = pool.take().expect("a key");
        let b = pool.take().expect("a key");
        assert_ne!(
            a.public_point(),
            b.public_point(),
            "every key is handed out once"
        );
        wait_until("the stock is refilled", || stocked(&pool) == 8);

        pool.drain();
        assert_eq!(stocked(&pool), 0);
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(stocked(&pool), 0, "a locked session's stock stays empty");
        pool.stop();
    }

    #[test]
    fn size_zero_keeps_nothing() {
        let pool = KeyPool::start(0);
        pool.fill();
        std::thread::sleep(Duration::from_millis(50));
        assert!(pool.take().is_none());
    }
}
