//! The write path by vault size: for 1,000, 10,000 and 100,000 secrets, the
//! durable `Secrets.Put` latency through gRPC, the gRPC `Unlock` time, the
//! daemon's resident memory while unlocked, and (in-process, to show where a
//! write's time goes) sealing and storing one generation.
//!
//! Run: `cargo bench --bench write` (release build, SoftHSM2 token in a temp
//! dir). `BENCH_WRITE_SIZES=1000,10000` picks the sizes.

mod common;
#[path = "../tests/e2e/util.rs"]
#[allow(dead_code)]
mod util;

use std::time::{Duration, Instant};

use common::{Run, connect, timed_unlocks};
use keyholder_proto::v1;
use keyholder_vault::{SecretEntry, Storage};
use util::{Env, PIN};

const DEFAULT_SIZES: [usize; 3] = [1_000, 10_000, 100_000];
const UNLOCK_ROUNDS: usize = 5;
const PUTS: usize = 40;
const PUT_TIME: Duration = Duration::from_secs(60);
const IN_PROCESS_ROUNDS: usize = 5;

fn summary(name: &str, samples: Vec<Duration>) {
    let run = Run::new(samples, Duration::ZERO);
    println!(
        "  {name:<46} n={:<3} p50={:>9.3} ms  p99={:>9.3} ms",
        run.ops,
        run.pct(0.5),
        run.pct(0.99),
    );
}

/// How many secrets the vault is filled with before the measured writes.
fn filled(n: usize) -> usize {
    n.saturating_sub(PUTS / 2 + IN_PROCESS_ROUNDS)
}

fn secret_name(i: usize) -> String {
    format!("team/service-{:03}/secret-{i:06}", i % 500)
}

/// Fills the vault with `n` secrets through the library (the daemon is
/// stopped, so the bench owns the vault), then times the parts of one write
/// in-process: copying the body, sealing it, storing it.
fn fill(env: &Env, n: usize) {
    common::with_open_vault(env, |vault, storage, rev| {
        let mut body = vault.body.clone();
        let now = "2026-11-21T00:00:00Z";
        // Room for the names the in-process rounds and the Put phase add, so
        // the vault holds `n` secrets at its end (100,000 is the daemon's
        // default maximum).
        for i in 0..filled(n) {
            body.secrets.insert(
                secret_name(i),
                SecretEntry::new(common::filler_value(i).as_bytes(), now),
            );
        }
        let sealed = vault.next(&mut body).expect("seal");
        let mut rev = storage
            .compare_and_store(Some(&rev), &sealed, body.generation)
            .expect("store");
        vault.body = body;
        println!("  vault file: {} bytes", sealed.len());

        let (mut copy, mut seal, mut store) = (Vec::new(), Vec::new(), Vec::new());
        for round in 0..IN_PROCESS_ROUNDS {
            let t = Instant::now();
            let mut body = vault.body.clone();
            copy.push(t.elapsed());
            body.secrets.insert(
                format!("bench/in-process-{round}"),
                SecretEntry::new(b"value", now),
            );
            let t = Instant::now();
            let sealed = vault.next(&mut body).expect("seal");
            seal.push(t.elapsed());
            let t = Instant::now();
            rev = storage
                .compare_and_store(Some(&rev), &sealed, body.generation)
                .expect("store");
            store.push(t.elapsed());
            vault.body = body;
        }
        summary("in-process: copy the body", copy);
        summary("in-process: seal (JSON, MAC, age)", seal);
        summary("in-process: store (write, fsync, rename)", store);
    });
}

fn one_size(n: usize) {
    println!("{n} secrets");
    let env = Env::new();
    // SoftHSM2 reads its config path from this process's environment for the
    // in-process part; set before the runtime or any other thread starts.
    // SAFETY: the benchmark's other threads are gone between sizes (each
    // runtime is dropped), and nothing else reads the environment meanwhile.
    unsafe { std::env::set_var("SOFTHSM2_CONF", &env.softhsm_conf) };
    {
        let _daemon = env.start_daemon(&[]);
        env.init();
    }
    fill(&env, n);

    let daemon = env.start_daemon(&[]);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let channel = connect(env.socket()).await;
        let mut session = v1::session_client::SessionClient::new(channel.clone());
        let mut secrets = v1::secrets_client::SecretsClient::new(channel);
        let unlocks = timed_unlocks(&mut session, PIN, UNLOCK_ROUNDS).await;
        summary("gRPC Unlock (login, 2 ECDH, decrypt, parse)", unlocks);
        let mut puts = Vec::with_capacity(PUTS);
        let begin = Instant::now();
        for i in 0..PUTS {
            if begin.elapsed() > PUT_TIME {
                break;
            }
            // Alternate new names and overwrites of existing ones.
            let name = if i % 2 == 0 {
                format!("bench/new-{i:04}")
            } else {
                secret_name((i * 7919) % filled(n).max(1))
            };
            let t = Instant::now();
            secrets
                .put(v1::PutSecretRequest {
                    name,
                    value: format!("put-value-{i:04}").into_bytes(),
                    overwrite: true,
                })
                .await
                .expect("put");
            puts.push(t.elapsed());
        }
        summary("gRPC Secrets.Put, durable, sequential", puts);
    });
    drop(runtime);
    std::thread::sleep(Duration::from_millis(300));
    println!("  keyholderd RSS, unlocked: {} KiB", daemon.rss_kib());
    drop(daemon);
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let sizes: Vec<usize> = match std::env::var("BENCH_WRITE_SIZES") {
        Ok(s) => s
            .split(',')
            .map(|n| n.trim().parse().expect("BENCH_WRITE_SIZES: numbers"))
            .collect(),
        Err(_) => DEFAULT_SIZES.to_vec(),
    };
    for n in sizes {
        one_size(n);
    }
}
