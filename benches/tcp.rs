//! The TCP listener (mutual TLS), in one run:
//!
//! 1. `IssueCertificate` over mTLS (P-256 key generated per call, signed by a
//!    vault-held P-256 CA) against `cfssl serve` over HTTPS with client
//!    certificates required (`-tls-cert/-tls-key -mutual-tls-ca`, its own
//!    P-256 CA, `/api/v1/cfssl/newcert`), at concurrency 1 and 8; each client
//!    keeps its connection (HTTP/2 for Keyholder, HTTP/1.1 keep-alive for
//!    cfssl, which is what its API speaks), so the handshake is paid once.
//! 2. A load test: 500 idle authenticated TLS connections held open, then
//!    200 new TLS handshakes per second for 10 seconds; handshake latency
//!    p50/p99, the daemon's RSS before and after, and a Unix-socket client
//!    calling `Status` every 100 ms throughout (how many answered, slowest).
//!
//! Run: `cargo bench --bench tcp` (needs `cfssl` from Debian's golang-cfssl
//! and `openssl`). Knobs: `TCP_BENCH_CONCURRENCY` (default `1,8`),
//! `TCP_BENCH_OPS` (per measurement, default 10000), `TCP_BENCH_PEER=0` to
//! skip cfssl, `TCP_BENCH_LOAD=0` to skip the load test, `TCP_BENCH_AUDIT=off`
//! to run the daemon without its audit log.

mod common;
#[path = "../tests/e2e/util.rs"]
#[allow(dead_code)]
mod util;

use std::net::TcpStream;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{CfsslHttp, Run, connect_direct_tls};
use keyholder_proto::v1;
use util::Env;

const MAX_TIME: Duration = Duration::from_secs(8);
const ROUNDS: usize = 4;
const SETTLE: Duration = Duration::from_millis(300);

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn p(path: &Path) -> &str {
    path.to_str().expect("utf8 path")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).expect("read")
}

/// The bench client's TLS configuration for Keyholder's listener.
fn keyholder_tls(dir: &Path) -> Arc<rustls::ClientConfig> {
    Arc::new(
        keyholder_proto::tls::client_config(
            &read(&dir.join("server-ca.pem")),
            &read(&dir.join("cert.pem")),
            &read(&dir.join("key.pem")),
        )
        .expect("client config"),
    )
}

fn keyholder_run(
    rt: &tokio::runtime::Runtime,
    port: u16,
    tls: &Arc<rustls::ClientConfig>,
    concurrency: usize,
    max_ops: usize,
    max_time: Duration,
) -> Run {
    rt.block_on(async {
        let per_task = (max_ops / concurrency).max(1);
        let mut channels = Vec::new();
        for _ in 0..concurrency {
            channels.push(connect_direct_tls(port, tls.clone()).await);
        }
        common::issue_run(channels, per_task, max_time).await
    })
}

/// cfssl over HTTPS with a client certificate: a blocking rustls client
/// per connection.
fn cfssl_run(
    port: u16,
    tls: &Arc<rustls::ClientConfig>,
    concurrency: usize,
    max_ops: usize,
    max_time: Duration,
) -> Run {
    let body = r#"{"request":{"CN":"bench-client","names":[{"O":"bench"}],"key":{"algo":"ecdsa","size":256}}}"#;
    common::threaded_run(
        concurrency,
        max_ops,
        max_time,
        || {
            let tcp = TcpStream::connect(("127.0.0.1", port)).expect("connect cfssl");
            tcp.set_nodelay(true).expect("nodelay");
            let name = rustls_pki_types::ServerName::try_from("localhost").expect("name");
            let conn = rustls::ClientConnection::new(tls.clone(), name).expect("TLS client");
            CfsslHttp::new(rustls::StreamOwned::new(conn, tcp))
        },
        |http| {
            http.post(port, "/api/v1/cfssl/newcert", body);
        },
    )
}

/// Waits until the listener completes a handshake with `tls`.
fn wait_for_listener(rt: &tokio::runtime::Runtime, port: u16, tls: &Arc<rustls::ClientConfig>) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ok = rt.block_on(async {
            let Ok(tcp) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else {
                return false;
            };
            let name = rustls_pki_types::ServerName::try_from("localhost").expect("name");
            tokio_rustls::TlsConnector::from(tls.clone())
                .connect(name, tcp)
                .await
                .is_ok()
        });
        if ok {
            return;
        }
        assert!(Instant::now() < deadline, "the TCP listener never served");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// One TLS handshake (the client's first read makes it wait for the
/// server's verdict on its certificate); its duration.
async fn handshake(port: u16, tls: Arc<rustls::ClientConfig>) -> Option<Duration> {
    use tokio::io::AsyncWriteExt;
    let t = Instant::now();
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    let name = rustls_pki_types::ServerName::try_from("localhost").ok()?;
    let mut stream = tokio_rustls::TlsConnector::from(tls)
        .connect(name, tcp)
        .await
        .ok()?;
    let took = t.elapsed();
    let _ = stream.shutdown().await;
    Some(took)
}

fn load_test(env: &Env, daemon: &util::Daemon, port: u16, tls: &Arc<rustls::ClientConfig>) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let rss_before = daemon.rss_kib();
    let idle = rt.block_on(async {
        let mut held = Vec::new();
        for _ in 0..500 {
            let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .expect("connect");
            let name = rustls_pki_types::ServerName::try_from("localhost").expect("name");
            let tls = tokio_rustls::TlsConnector::from(tls.clone())
                .connect(name, tcp)
                .await
                .expect("idle connection handshake");
            held.push(tls);
        }
        held
    });
    let rss_idle = daemon.rss_kib();
    // A local client on the Unix socket meanwhile.
    let socket = env.socket();
    let local = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let channel = common::connect(socket).await;
            let mut session = v1::session_client::SessionClient::new(channel);
            let (mut answered, mut slowest) = (0usize, Duration::ZERO);
            let end = Instant::now() + Duration::from_secs(10);
            while Instant::now() < end {
                let t = Instant::now();
                if session.status(v1::StatusRequest {}).await.is_ok() {
                    answered += 1;
                    slowest = slowest.max(t.elapsed());
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            (answered, slowest)
        })
    });
    let (latencies, failed) = rt.block_on(async {
        let mut tasks = Vec::new();
        let mut tick = tokio::time::interval(Duration::from_millis(5));
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(10) {
            tick.tick().await;
            tasks.push(tokio::spawn(handshake(port, tls.clone())));
        }
        let (mut ok, mut failed) = (Vec::new(), 0usize);
        for t in tasks {
            match t.await.ok().flatten() {
                Some(d) => ok.push(d),
                None => failed += 1,
            }
        }
        (ok, failed)
    });
    let (answered, slowest) = local.join().expect("local client");
    let rss_after = daemon.rss_kib();
    let run = Run::new(latencies, Duration::from_secs(10));
    println!(
        "load: {} handshakes in 10 s ({:.0}/s), {failed} failed; handshake p50 {:.2} ms, p99 {:.2} ms; \
         with 500 idle TLS connections held",
        run.ops,
        run.rate(),
        run.pct(0.5),
        run.pct(0.99)
    );
    println!(
        "load: daemon RSS {rss_before} KiB before, {rss_idle} KiB with 500 idle connections, \
         {rss_after} KiB after the handshakes (+{} KiB)",
        rss_after.saturating_sub(rss_before)
    );
    println!(
        "load: Unix-socket Status every 100 ms meanwhile: {answered} answered, slowest {:.2} ms",
        slowest.as_secs_f64() * 1e3
    );
    drop(idle);
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let concurrency: Vec<usize> = std::env::var("TCP_BENCH_CONCURRENCY")
        .unwrap_or_else(|_| "1,8".into())
        .split(',')
        .filter_map(|c| c.trim().parse().ok())
        .filter(|&c| c > 0)
        .collect();
    let max_ops = env_or("TCP_BENCH_OPS", 10_000usize).max(1);
    let with_peer = std::env::var("TCP_BENCH_PEER").map_or(true, |v| v != "0");
    let with_load = std::env::var("TCP_BENCH_LOAD").map_or(true, |v| v != "0");

    let env = Env::new();
    let port = free_port();
    let config = env.file(
        "keyholderd.toml",
        "[tcp]\nmax_connections = 2048\nmax_streams = 64\n",
    );
    let log = std::env::var("BENCH_DAEMON_LOG").unwrap_or_else(|_| "warn".into());
    let mut flags = common::daemon_flags(&log);
    // TCP_BENCH_AUDIT=off measures the transport alone (the audit log's
    // fsync per record is the same over either socket: --bench issue).
    if let Ok(audit) = std::env::var("TCP_BENCH_AUDIT") {
        flags.extend(["--audit-log".to_owned(), audit]);
    }
    flags.extend([
        "--config".to_owned(),
        p(&config).to_owned(),
        "--listen-tcp".to_owned(),
        format!("127.0.0.1:{port}"),
    ]);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let daemon = env.start_daemon(&flags);
    eprintln!("keyholderd pid {}", daemon.pid());
    env.init();
    env.unlock();
    env.ok(&["ca", "create", "admin-clients"]);
    env.ok(&["ca", "create", "bench"]);
    let client = env.path().join("client");
    env.ok(&[
        "client",
        "issue",
        "--ca",
        "admin-clients",
        "--name",
        "bench",
        "--out-dir",
        p(&client),
    ]);
    let policy = env.file(
        "policy.toml",
        "default = \"allow\"\n[[rule]]\nname = \"bench\"\nclients = [\"bench\"]\nallow = [\"cert:bench:client\"]\ngroups = [\"bench\"]\n",
    );
    env.ok(&["policy", "set", p(&policy), "--pin-file", p(&env.pin_file)]);
    let tls = keyholder_tls(&client);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    wait_for_listener(&rt, port, &tls);

    // cfssl's listener: a server certificate for localhost from Keyholder's
    // client CA, and the same client CA for its clients, so both servers
    // check the same client certificate the same way.
    let cfssl_tls = env.path().join("cfssl-tls");
    env.ok(&[
        "cert",
        "issue",
        "--ca",
        "admin-clients",
        "--profile",
        "server",
        "--cn",
        "localhost",
        "--san",
        "localhost",
        "--san",
        "127.0.0.1",
        "--out-dir",
        p(&cfssl_tls),
    ]);
    std::fs::copy(
        client.join("server-ca.pem"),
        cfssl_tls.join("clients-ca.pem"),
    )
    .expect("clients CA");
    let mut cfssl = with_peer.then(|| {
        common::start_cfssl(
            env.path(),
            &[
                format!("-tls-cert={}", cfssl_tls.join("cert.pem").display()),
                format!("-tls-key={}", cfssl_tls.join("key.pem").display()),
                format!(
                    "-mutual-tls-ca={}",
                    cfssl_tls.join("clients-ca.pem").display()
                ),
            ],
        )
    });

    // The same client certificate, speaking HTTP/1.1 (cfssl's API).
    let cfssl_client = {
        let mut c = (*tls).clone();
        c.alpn_protocols = vec![b"http/1.1".to_vec()];
        Arc::new(c)
    };
    let warm = Duration::from_secs(2);
    let _ = keyholder_run(&rt, port, &tls, 1, 1000, warm);
    if let Some((_, cport)) = &cfssl {
        let _ = cfssl_run(*cport, &cfssl_client, 1, 1000, warm);
    }
    let (round_ops, round_time) = ((max_ops / ROUNDS).max(1), MAX_TIME / ROUNDS as u32);
    println!(
        "{:<10} {:>4} {:>10} {:>10} {:>10}",
        "server", "conc", "issues/s", "p50 ms", "p99 ms"
    );
    let mut rows = Vec::new();
    for c in concurrency {
        let (mut ks, mut fs) = (Vec::new(), Vec::new());
        for _ in 0..ROUNDS {
            std::thread::sleep(SETTLE);
            ks.push(keyholder_run(&rt, port, &tls, c, round_ops, round_time));
            if let Some((_, cport)) = &cfssl {
                std::thread::sleep(SETTLE);
                fs.push(cfssl_run(*cport, &cfssl_client, c, round_ops, round_time));
            }
        }
        let k = Run::merge(ks);
        common::print_issue_row("keyholder", c, &k);
        if !fs.is_empty() {
            let f = Run::merge(fs);
            common::print_issue_row("cfssl", c, &f);
            rows.push((c, k.rate() / f.rate()));
        }
    }
    for (c, ratio) in rows {
        println!("mTLS issuance ratio keyholder/cfssl at concurrency {c}: {ratio:.2}x");
    }
    if let Some((mut child, _)) = cfssl.take() {
        let _ = child.kill();
        let _ = child.wait();
    }
    if with_load {
        load_test(&env, &daemon, port, &tls);
    }
    drop(daemon);
}
