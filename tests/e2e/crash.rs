//! Crash safety: SIGKILL the daemon while writes run; every acknowledged
//! write survives and the vault always opens.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::util::Env;

const ROUNDS: u64 = 6;
const MAX_WRITES_PER_ROUND: usize = 300;

#[test]
fn kill_9_during_writes_never_loses_an_acknowledged_write() {
    let env = Env::new();
    {
        let _daemon = env.start_daemon(&[]);
        env.init();
    }
    let mut acked: Vec<String> = Vec::new();
    for round in 0..ROUNDS {
        let daemon = env.start_daemon(&[]);
        // The vault opens after every crash.
        env.unlock();
        let listed = env.ok(&["secret", "list"]);
        for name in &acked {
            assert!(
                listed.lines().any(|l| l == name),
                "round {round}: acknowledged {name} is missing"
            );
        }
        let stop = AtomicBool::new(false);
        let written = std::thread::scope(|s| {
            let writer = s.spawn(|| {
                let mut mine = Vec::new();
                for i in 0..MAX_WRITES_PER_ROUND {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let name = format!("r{round}/k{i}");
                    let out = env.cli_with_stdin(&["secret", "put", &name], Some(name.as_bytes()));
                    if out.status.success() {
                        mine.push(name);
                    }
                }
                mine
            });
            // Vary the moment of the kill from round to round.
            std::thread::sleep(Duration::from_millis(150 + round * 83));
            daemon.kill();
            stop.store(true, Ordering::Relaxed);
            writer.join().expect("writer thread")
        });
        assert!(
            !written.is_empty() || round > 0,
            "no write got through in round {round}"
        );
        acked.extend(written);
    }
    let _daemon = env.start_daemon(&[]);
    env.unlock();
    assert!(
        acked.len() > 10,
        "too few writes to mean anything: {}",
        acked.len()
    );
    for name in &acked {
        assert_eq!(env.ok(&["secret", "get", name]), *name, "value of {name}");
    }
}
