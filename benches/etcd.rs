//! The vault in etcd against the local file: durable `Secrets.Put` latency
//! (p50/p99) through a three-member etcd cluster on loopback with mutual
//! TLS, and through the file, at 1,000 and 10,000 secrets; and the time a
//! change takes to reach a second daemon on the same etcd vault.
//!
//! Run: `cargo bench --bench etcd` (release build, SoftHSM2, etcd from
//! Debian's etcd-server). `BENCH_ETCD_SIZES=1000,10000` picks the sizes,
//! `BENCH_ETCD_PUTS` the number of puts per case (100).

mod common;
#[path = "../tests/e2e/etcd_cluster.rs"]
#[allow(dead_code)]
mod etcd_cluster;
#[path = "../tests/e2e/util.rs"]
#[allow(dead_code)]
mod util;

use std::time::{Duration, Instant};

use common::{Run, connect};
use etcd_cluster::{Cluster, issue_certificates};
use keyholder_proto::v1;
use keyholder_vault::{SecretEntry, Storage};
use util::{Daemon, Env};

const DEFAULT_SIZES: [usize; 2] = [1_000, 10_000];
const PROPAGATIONS: usize = 20;

fn summary(name: &str, samples: Vec<Duration>) {
    let run = Run::new(samples, Duration::ZERO);
    println!(
        "  {name:<52} n={:<4} p50={:>9.3} ms  p99={:>9.3} ms",
        run.ops,
        run.pct(0.5),
        run.pct(0.99),
    );
}

/// Fills the file vault of `env` (daemon stopped) with `n` secrets through
/// the library.
fn fill(env: &Env, n: usize) {
    common::with_open_vault(env, |vault, storage, rev| {
        let mut body = vault.body.clone();
        for i in 0..n {
            body.secrets.insert(
                format!("team/service-{:03}/secret-{i:06}", i % 500),
                SecretEntry::new(common::filler_value(i).as_bytes(), "2026-12-01T00:00:00Z"),
            );
        }
        let sealed = vault.next(&mut body).expect("seal");
        storage
            .compare_and_store(Some(&rev), &sealed, body.generation)
            .expect("store");
        println!("  vault: {} bytes", sealed.len());
    });
}

fn puts() -> usize {
    std::env::var("BENCH_ETCD_PUTS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(100)
}

/// Sequential durable puts through the daemon of `env`.
fn timed_puts(rt: &tokio::runtime::Runtime, env: &Env, tag: &str) -> Vec<Duration> {
    rt.block_on(async {
        let channel = connect(env.socket()).await;
        let mut secrets = v1::secrets_client::SecretsClient::new(channel);
        let mut times = Vec::new();
        for i in 0..puts() {
            let t = Instant::now();
            secrets
                .put(v1::PutSecretRequest {
                    name: format!("bench/{tag}-{i:05}"),
                    value: format!("value-{i}").into_bytes(),
                    overwrite: true,
                })
                .await
                .expect("put");
            times.push(t.elapsed());
        }
        times
    })
}

/// A put on `a`, then how long until `b` reads it (polled every 0.5 ms).
fn propagation(rt: &tokio::runtime::Runtime, a: &Env, b: &Env) -> Vec<Duration> {
    rt.block_on(async {
        let mut put = v1::secrets_client::SecretsClient::new(connect(a.socket()).await);
        let mut get = v1::secrets_client::SecretsClient::new(connect(b.socket()).await);
        let mut times = Vec::new();
        for i in 0..PROPAGATIONS {
            let name = format!("bench/propagate-{i:03}");
            let value = format!("seen-{i}").into_bytes();
            put.put(v1::PutSecretRequest {
                name: name.clone(),
                value: value.clone(),
                overwrite: true,
            })
            .await
            .expect("put");
            let t = Instant::now();
            loop {
                let got = get
                    .get(v1::GetSecretRequest {
                        name: name.clone(),
                        ..Default::default()
                    })
                    .await;
                if got.is_ok_and(|r| r.into_inner().value == value) {
                    break;
                }
                assert!(t.elapsed() < Duration::from_secs(30), "never arrived");
                tokio::time::sleep(Duration::from_micros(500)).await;
            }
            times.push(t.elapsed());
        }
        times
    })
}

fn etcd_daemon(first: &Env, cluster: &Cluster, prefix: &str) -> (Env, Daemon) {
    let mut env = Env::new();
    env.softhsm_conf = first.softhsm_conf.clone();
    let config = env.file("keyholderd.toml", &cluster.daemon_config(prefix, "5s"));
    let daemon = env.start_daemon(&["--config", config.to_str().expect("utf-8"), "--log", "warn"]);
    env.unlock();
    (env, daemon)
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let sizes: Vec<usize> = match std::env::var("BENCH_ETCD_SIZES") {
        Ok(s) => s
            .split(',')
            .map(|n| n.trim().parse().expect("BENCH_ETCD_SIZES: numbers"))
            .collect(),
        Err(_) => DEFAULT_SIZES.to_vec(),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    for n in sizes {
        println!("{n} secrets");
        let first = Env::new();
        // SoftHSM2 reads its configuration from this process's environment
        // for the fill; set while no other thread of the bench reads it.
        // SAFETY: the runtime's threads do not read the environment.
        unsafe { std::env::set_var("SOFTHSM2_CONF", &first.softhsm_conf) };
        let dir = first.path().join("etcd");
        let (members, client) = {
            let _daemon = first.start_daemon(&["--log", "warn"]);
            first.init();
            first.unlock();
            issue_certificates(&first, &dir)
        };
        fill(&first, n);

        // The file.
        {
            let _daemon = first.start_daemon(&["--log", "warn"]);
            first.unlock();
            summary(
                "file: gRPC Secrets.Put, durable, sequential",
                timed_puts(&rt, &first, "file"),
            );
        }

        // etcd: the same vault moved in.
        let cluster = Cluster::start(&dir.join("cluster"), &members, &client);
        let mut args = vec![
            "vault".to_owned(),
            "migrate".into(),
            "--from".into(),
            first.vault.to_str().expect("utf-8").into(),
            "--to".into(),
            cluster.url("/bench/"),
        ];
        args.extend(cluster.tls_flags());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        first.ok(&args);
        let (a, _daemon_a) = etcd_daemon(&first, &cluster, "/bench/");
        let (b, _daemon_b) = etcd_daemon(&first, &cluster, "/bench/");
        summary(
            "etcd (3 members, TLS): gRPC Secrets.Put, durable",
            timed_puts(&rt, &a, "etcd"),
        );
        summary(
            "etcd: a put on one daemon readable on the other",
            propagation(&rt, &a, &b),
        );
    }
}
