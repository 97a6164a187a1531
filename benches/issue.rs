//! Certificate issuance: Keyholder's gRPC `IssueCertificate` (P-256 key
//! generated per call, signed by a vault-held P-256 CA) against `cfssl serve`
//! doing the same work (`/api/v1/cfssl/newcert`, ECDSA P-256), at
//! concurrency 1 and 8, in the same run; and Keyholder with its audit log
//! (the default) against a second keyholderd with `--audit-log off`, so the
//! audit log's cost is measured in the same run too.
//!
//! Run: `cargo bench --bench issue` (needs `cfssl` from Debian's golang-cfssl
//! and `openssl`).
//!
//! Both clients are kept lean because they share the machine's cores with the
//! server they measure: cfssl's is blocking HTTP/1.1 with keep-alive, one
//! thread per connection; Keyholder's is a single-threaded tokio runtime with
//! one HTTP/2 connection per concurrent caller (see `common::Direct`).
//!
//! Knobs: `ISSUE_BENCH_CONCURRENCY` (default `1,8`), `ISSUE_BENCH_OPS`
//! (operations per measurement, default 20000), `ISSUE_BENCH_CONNECTIONS`
//! (HTTP/2 connections Keyholder's callers share, default one each),
//! `BENCH_SERVE_THREADS` and `BENCH_KEY_STOCK` (the daemon's
//! `--serve-threads` and `--key-stock`),
//! `ISSUE_BENCH_PEER=0` to skip cfssl (e.g. with a profiler attached to the
//! daemon PID printed on stderr).

mod common;
#[path = "../tests/e2e/util.rs"]
#[allow(dead_code)]
mod util;

use std::net::TcpStream;
use std::time::Duration;

use common::{CfsslHttp, Run, connect_direct};
use util::Env;

/// Each measurement stops at this many operations or this much time, split
/// over `ROUNDS` alternating rounds of the two servers.
const MAX_OPS: usize = 20_000;
const MAX_TIME: Duration = Duration::from_secs(8);
/// The machine's speed drifts (a shared host), so the two servers take turns
/// in short rounds and each one's figures are summed over its rounds; a slow
/// spell then lands on both instead of on whichever ran during it.
const ROUNDS: usize = 5;
/// Pause before each round.
const SETTLE: Duration = Duration::from_millis(300);

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn keyholder_run(
    rt: &tokio::runtime::Runtime,
    socket: &std::path::Path,
    concurrency: usize,
    max_ops: usize,
    max_time: Duration,
) -> Run {
    rt.block_on(async {
        let per_task = max_ops / concurrency;
        let connections = env_or("ISSUE_BENCH_CONNECTIONS", concurrency).clamp(1, concurrency);
        let mut open = Vec::new();
        for _ in 0..connections {
            open.push(connect_direct(socket.to_owned()).await);
        }
        let channels: Vec<_> = (0..concurrency)
            .map(|i| open[i % connections].clone())
            .collect();
        common::issue_run(channels, per_task.max(1), max_time).await
    })
}

fn cfssl_run(port: u16, concurrency: usize, max_ops: usize, max_time: Duration) -> Run {
    let body = r#"{"request":{"CN":"bench-client","names":[{"O":"bench"}],"key":{"algo":"ecdsa","size":256}}}"#;
    common::threaded_run(
        concurrency,
        max_ops,
        max_time,
        || {
            let stream = TcpStream::connect(("127.0.0.1", port)).expect("connect cfssl");
            stream.set_nodelay(true).expect("nodelay");
            CfsslHttp::new(stream)
        },
        |http| {
            http.post(port, "/api/v1/cfssl/newcert", body);
        },
    )
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let concurrency: Vec<usize> = std::env::var("ISSUE_BENCH_CONCURRENCY")
        .unwrap_or_else(|_| "1,8".into())
        .split(',')
        .filter_map(|c| c.trim().parse().ok())
        .filter(|&c| c > 0)
        .collect();
    let max_ops = env_or("ISSUE_BENCH_OPS", MAX_OPS).max(1);
    let with_peer = std::env::var("ISSUE_BENCH_PEER").map_or(true, |v| v != "0");

    let env = Env::new();
    // Quiet like cfssl (`-loglevel 5`): the per-issuance audit line is
    // measured separately (BENCH_DAEMON_LOG=info).
    let log = std::env::var("BENCH_DAEMON_LOG").unwrap_or_else(|_| "warn".into());
    let flags = common::daemon_flags(&log);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let daemon = env.start_daemon(&flags);
    eprintln!("keyholderd pid {}", daemon.pid());
    env.init();
    env.unlock();
    env.ok(&["ca", "create", "bench"]);
    // The same daemon without its audit log.
    let env_off = Env::new();
    let mut flags_off = flags.clone();
    flags_off.extend(["--audit-log", "off"]);
    let daemon_off = env_off.start_daemon(&flags_off);
    env_off.init();
    env_off.unlock();
    env_off.ok(&["ca", "create", "bench"]);
    // A policy of realistic size on both (BENCH_POLICY_RULES, default 50).
    let rules = common::set_bench_policy(&env);
    common::set_bench_policy(&env_off);
    eprintln!("policy: {rules} rules");
    let mut cfssl = with_peer.then(|| common::start_cfssl(env.path(), &[]));

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    // Warm both up.
    let warm = Duration::from_secs(2);
    let _ = keyholder_run(&rt, &env.socket(), 1, 2000, warm);
    let _ = keyholder_run(&rt, &env_off.socket(), 1, 2000, warm);
    if let Some((_, port)) = &cfssl {
        let _ = cfssl_run(*port, 1, 2000, warm);
    }
    let rounds = env_or("ISSUE_BENCH_ROUNDS", ROUNDS).max(1);
    let (round_ops, round_time) = ((max_ops / rounds).max(1), MAX_TIME / rounds as u32);
    println!(
        "{:<10} {:>4} {:>10} {:>10} {:>10}",
        "server", "conc", "issues/s", "p50 ms", "p99 ms"
    );
    let mut rows = Vec::new();
    let mut audit = Vec::new();
    for c in concurrency {
        let (mut ks, mut fs, mut per_round) = (Vec::new(), Vec::new(), Vec::new());
        let mut offs = Vec::new();
        for _ in 0..rounds {
            // Let the other server's background work (Go's garbage collector,
            // the key stock) settle so it does not run into this round.
            std::thread::sleep(SETTLE);
            offs.push(keyholder_run(
                &rt,
                &env_off.socket(),
                c,
                round_ops,
                round_time,
            ));
            std::thread::sleep(SETTLE);
            let k = keyholder_run(&rt, &env.socket(), c, round_ops, round_time);
            if let Some((_, port)) = &cfssl {
                std::thread::sleep(SETTLE);
                let f = cfssl_run(*port, c, round_ops, round_time);
                per_round.push(k.rate() / f.rate());
                fs.push(f);
            }
            ks.push(k);
        }
        let k = Run::merge(ks);
        common::print_issue_row("keyholder", c, &k);
        let off = Run::merge(offs);
        common::print_issue_row("kh-noaudit", c, &off);
        audit.push((c, k.rate() / off.rate()));
        if !fs.is_empty() {
            let f = Run::merge(fs);
            common::print_issue_row("cfssl", c, &f);
            rows.push((c, k.rate() / f.rate(), per_round));
        }
    }
    for (c, ratio, per_round) in rows {
        let low = per_round.iter().copied().fold(f64::INFINITY, f64::min);
        let high = per_round.iter().copied().fold(0.0, f64::max);
        println!(
            "throughput ratio keyholder/cfssl at concurrency {c}: {ratio:.2}x (rounds {low:.2}x-{high:.2}x)"
        );
    }
    for (c, ratio) in audit {
        println!("audit log on/off throughput at concurrency {c}: {ratio:.2}x");
    }
    if let Some((mut child, _)) = cfssl.take() {
        let _ = child.kill();
        let _ = child.wait();
    }
    drop(daemon);
    drop(daemon_off);
}
