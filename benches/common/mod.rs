//! Shared by the benchmarks: a gRPC channel to the daemon and latency sets.

#![allow(dead_code)]

use std::path::PathBuf;
use std::time::Duration;

/// keyholderd flags for a benchmark: `--log <log>`, plus `--serve-threads`
/// and `--key-stock` from `BENCH_SERVE_THREADS` and `BENCH_KEY_STOCK` when
/// set (to compare settings on one machine).
pub fn daemon_flags(log: &str) -> Vec<String> {
    let mut flags = vec!["--log".to_owned(), log.to_owned()];
    for (var, flag) in [
        ("BENCH_SERVE_THREADS", "--serve-threads"),
        ("BENCH_KEY_STOCK", "--key-stock"),
    ] {
        if let Ok(v) = std::env::var(var) {
            flags.extend([flag.to_owned(), v]);
        }
    }
    flags
}

/// A gRPC channel over the daemon's Unix socket.
pub async fn connect(socket: PathBuf) -> tonic::transport::Channel {
    keyholder_proto::socket::connect(socket)
        .await
        .expect("connect")
}

/// Unlocks and locks `rounds` times, timing each unlock, and leaves the
/// session unlocked.
pub async fn timed_unlocks(
    session: &mut keyholder_proto::v1::session_client::SessionClient<tonic::transport::Channel>,
    pin: &str,
    rounds: usize,
) -> Vec<Duration> {
    use keyholder_proto::v1::{LockRequest, UnlockRequest};
    let unlock = || UnlockRequest {
        pin: pin.into(),
        ..Default::default()
    };
    let mut times = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let t = std::time::Instant::now();
        session.unlock(unlock()).await.expect("unlock");
        times.push(t.elapsed());
        session.lock(LockRequest {}).await.expect("lock");
    }
    session.unlock(unlock()).await.expect("unlock");
    times
}

/// Runs `concurrency` threads, each with its own connection from `connect`,
/// calling `op` on it until the thread has done its share of `max_ops` or
/// `max_time` has passed, and times every call.
pub fn threaded_run<C>(
    concurrency: usize,
    max_ops: usize,
    max_time: Duration,
    connect: impl Fn() -> C + Sync,
    op: impl Fn(&mut C) + Sync,
) -> Run {
    let per_thread = max_ops / concurrency;
    let start = std::time::Instant::now();
    let parts: Vec<Vec<Duration>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..concurrency)
            .map(|_| {
                let (connect, op) = (&connect, &op);
                s.spawn(move || {
                    let mut conn = connect();
                    let mut lat = Vec::with_capacity(per_thread);
                    let begin = std::time::Instant::now();
                    while lat.len() < per_thread && begin.elapsed() < max_time {
                        let t = std::time::Instant::now();
                        op(&mut conn);
                        lat.push(t.elapsed());
                    }
                    lat
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("thread"))
            .collect()
    });
    Run::new(parts.into_iter().flatten().collect(), start.elapsed())
}

/// Latencies of one measured run.
pub struct Run {
    pub ops: usize,
    pub elapsed: Duration,
    pub latencies: Vec<Duration>,
}

impl Run {
    pub fn new(latencies: Vec<Duration>, elapsed: Duration) -> Self {
        let mut latencies = latencies;
        latencies.sort();
        Self {
            ops: latencies.len(),
            elapsed,
            latencies,
        }
    }

    /// Several runs taken as one: their operations and their time added up.
    pub fn merge(runs: Vec<Run>) -> Self {
        let elapsed = runs.iter().map(|r| r.elapsed).sum();
        Self::new(
            runs.into_iter().flat_map(|r| r.latencies).collect(),
            elapsed,
        )
    }

    /// Operations per second.
    pub fn rate(&self) -> f64 {
        self.ops as f64 / self.elapsed.as_secs_f64()
    }

    /// The `p` quantile in milliseconds.
    pub fn pct(&self, p: f64) -> f64 {
        let l = &self.latencies;
        l[(((l.len() as f64 - 1.0) * p).round() as usize).min(l.len() - 1)].as_secs_f64() * 1e3
    }

    /// Mean latency in milliseconds.
    pub fn mean(&self) -> f64 {
        self.latencies.iter().sum::<Duration>().as_secs_f64() * 1e3 / self.ops as f64
    }
}

/// A gRPC client transport without tonic's `Channel`: one HTTP/2 connection
/// over the Unix socket, requests sent straight on it. `Channel` adds a
/// buffer task and reconnect logic per request that the benchmark client
/// would otherwise pay for on the same two cores as the daemon.
#[derive(Clone)]
pub struct Direct(hyper::client::conn::http2::SendRequest<tonic::body::Body>);

pub async fn connect_direct(socket: PathBuf) -> Direct {
    let stream = tokio::net::UnixStream::connect(socket)
        .await
        .expect("connect");
    let (send, conn) =
        hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .expect("HTTP/2 handshake");
    tokio::spawn(conn);
    Direct(send)
}

impl tower::Service<http::Request<tonic::body::Body>> for Direct {
    type Response = http::Response<hyper::body::Incoming>;
    type Error = hyper::Error;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<tonic::body::Body>) -> Self::Future {
        // tonic leaves the URI relative to the service; HTTP/2 needs a scheme
        // and authority.
        let path = req
            .uri()
            .path_and_query()
            .map(|p| p.as_str().to_owned())
            .unwrap_or_default();
        *req.uri_mut() = format!("http://localhost{path}").parse().expect("uri");
        Box::pin(self.0.send_request(req))
    }
}

/// A gRPC transport like [`Direct`], over TLS to the TCP listener.
pub async fn connect_direct_tls(port: u16, config: std::sync::Arc<rustls::ClientConfig>) -> Direct {
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    tcp.set_nodelay(true).expect("nodelay");
    let name = rustls_pki_types::ServerName::try_from("localhost").expect("name");
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .expect("TLS handshake");
    let (send, conn) =
        hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .handshake(hyper_util::rt::TokioIo::new(tls))
            .await
            .expect("HTTP/2 handshake");
    tokio::spawn(conn);
    Direct(send)
}

/// One keep-alive HTTP/1.1 connection to `cfssl serve`, over any stream.
pub struct CfsslHttp<S: std::io::Read + std::io::Write> {
    pub stream: std::io::BufReader<S>,
}

impl<S: std::io::Read + std::io::Write> CfsslHttp<S> {
    pub fn new(stream: S) -> Self {
        Self {
            stream: std::io::BufReader::new(stream),
        }
    }

    /// POSTs `body` to `path`; insists on 200 and a certificate in the
    /// answer; returns the body's length.
    pub fn post(&mut self, port: u16, path: &str, body: &str) -> usize {
        use std::io::{BufRead, Read};
        let req = format!(
            "POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        self.stream
            .get_mut()
            .write_all(req.as_bytes())
            .expect("send");
        let mut status = String::new();
        self.stream.read_line(&mut status).expect("status");
        assert!(status.contains(" 200 "), "cfssl answered {status:?}");
        let mut length = 0usize;
        loop {
            let mut line = String::new();
            self.stream.read_line(&mut line).expect("header");
            if line == "\r\n" {
                break;
            }
            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                length = v.trim().parse().expect("length");
            }
        }
        let mut body = vec![0u8; length];
        self.stream.read_exact(&mut body).expect("body");
        assert!(
            body.windows(11).any(|w| w == b"BEGIN CERTI"),
            "cfssl returned no certificate"
        );
        length
    }
}

/// Sets a policy of `rules` rules (`BENCH_POLICY_RULES`, default 50; 0
/// sets none) in which the benchmark's own process matches only the last
/// one, so every request is decided after matching all of them: rules for
/// other executables, each with a few capabilities, one for the admin's
/// client, then one for this benchmark allowing everything.
pub fn set_bench_policy(env: &crate::util::Env) -> usize {
    let rules: usize = std::env::var("BENCH_POLICY_RULES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50);
    if rules == 0 {
        return 0;
    }
    let me = std::env::current_exe().expect("own path");
    let admin = std::fs::canonicalize(crate::util::keyholder_bin()).expect("client path");
    let mut text = String::from("default = \"deny\"\n");
    for i in 1..rules.saturating_sub(1) {
        text.push_str(&format!(
            "\n[[rule]]\nname = \"tool-{i}\"\nexe = [\"/opt/tool-{i}/bin/*\", \"/usr/local/bin/tool-{i}\"]\n\
             allow = [\"kubeconfig:prod-{i}:deployer\", \"secret:read:app/{i}/*\", \"cert:ca-{i}:client\", \"agent:key-{i}\"]\n\
             max_ttl = \"15m\"\n"
        ));
    }
    // The admin's client (the benchmark's setup commands), then the
    // benchmark itself, last.
    text.push_str(&format!(
        "\n[[rule]]\nname = \"admin-cli\"\nexe = [\"{}\"]\nallow = [\"*\"]\n",
        admin.display()
    ));
    text.push_str(&format!(
        "\n[[rule]]\nname = \"bench\"\nexe = [\"{}\"]\nallow = [\"*\"]\n",
        me.display()
    ));
    let path = env.file("bench-policy.toml", &text);
    env.ok(&[
        "policy",
        "set",
        path.to_str().expect("utf8"),
        "--pin-file",
        env.pin_file.to_str().expect("utf8"),
    ]);
    rules
}

/// Each of `channels` issues client certificates from the CA `bench`
/// (organisation `bench`, a key generated per call) until it has done
/// `per_task` or `max_time` has passed; every call timed.
pub async fn issue_run(channels: Vec<Direct>, per_task: usize, max_time: Duration) -> Run {
    use keyholder_proto::v1;
    let start = std::time::Instant::now();
    let mut tasks = Vec::new();
    for channel in channels {
        tasks.push(tokio::spawn(async move {
            let mut client = v1::credentials_client::CredentialsClient::new(channel);
            let mut lat = Vec::with_capacity(per_task);
            let begin = std::time::Instant::now();
            while lat.len() < per_task && begin.elapsed() < max_time {
                let t = std::time::Instant::now();
                let r = client
                    .issue_certificate(v1::IssueCertificateRequest {
                        ca: "bench".into(),
                        profile: "client".into(),
                        common_name: "bench-client".into(),
                        organizations: vec!["bench".into()],
                        ..Default::default()
                    })
                    .await
                    .expect("issue");
                lat.push(t.elapsed());
                assert!(!r.into_inner().private_key_pem.is_empty());
            }
            lat
        }));
    }
    let mut parts = Vec::new();
    for t in tasks {
        parts.push(t.await.expect("task"));
    }
    Run::new(parts.into_iter().flatten().collect(), start.elapsed())
}

/// `cfssl serve` on a loopback port with its own P-256 CA made by openssl
/// in `dir`; `extra` are further flags (HTTPS and client certificates).
pub fn start_cfssl(dir: &std::path::Path, extra: &[String]) -> (std::process::Child, u16) {
    use std::process::{Command, Stdio};
    let (ca, ca_key) = (dir.join("cfssl-ca.pem"), dir.join("cfssl-ca-key.pem"));
    let ok = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
        ])
        .args(["-nodes", "-days", "30", "-subj", "/CN=cfssl-bench"])
        .arg("-keyout")
        .arg(&ca_key)
        .arg("-out")
        .arg(&ca)
        .output()
        .expect("openssl");
    assert!(ok.status.success());
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let mut cfssl = Command::new("cfssl")
        .args(["serve", "-address", "127.0.0.1", "-port", &port.to_string()])
        .args(["-loglevel", "5"])
        .arg(format!("-ca={}", ca.display()))
        .arg(format!("-ca-key={}", ca_key.display()))
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("cfssl runs (apt-get install golang-cfssl)");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if std::time::Instant::now() > deadline {
            let _ = cfssl.kill();
            let _ = cfssl.wait();
            panic!("cfssl did not start");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    (cfssl, port)
}

/// One row of an issuance table: server, concurrency, rate, p50, p99.
pub fn print_issue_row(name: &str, c: usize, r: &Run) {
    println!(
        "{name:<10} {c:>4} {:>10.0} {:>10.3} {:>10.3}",
        r.rate(),
        r.pct(0.5),
        r.pct(0.99)
    );
}

/// Opens the file vault of `env` (daemon stopped, so the bench owns it)
/// through a logged-in session on the "ops" token, hands `fill` the open
/// vault, its storage and the revision read, and closes the session.
pub fn with_open_vault(
    env: &crate::util::Env,
    fill: impl FnOnce(
        &mut keyholder_vault::OpenVault,
        &keyholder_vault::FileStorage,
        keyholder_vault::Revision,
    ),
) {
    use keyholder_vault::Storage;
    let module =
        keyholder_token::Module::load(std::path::Path::new(crate::util::MODULE)).expect("module");
    let token = module
        .select(&keyholder_token::Selector::label("ops"))
        .expect("token");
    let mut session = module.open(&token).expect("session");
    session
        .login(
            &secrecy::SecretString::from(crate::util::PIN.to_owned()),
            false,
        )
        .expect("login");
    let key = session
        .find_p256_keys(Some("keyholder-vault"))
        .expect("keys")
        .pop()
        .expect("a Keyholder key");
    let storage = keyholder_vault::FileStorage::open(&env.vault).expect("storage");
    let (bytes, rev) = storage.load().expect("load").expect("vault exists");
    let agreement = keyholder_vault::TokenAgreement {
        session: &session,
        key: &key,
    };
    let mut vault = keyholder_vault::OpenVault::open(&bytes, &agreement).expect("open");
    fill(&mut vault, &storage, rev);
    session.close();
}

/// The `i`-th filler secret's value: 56 bytes, as the size figures assume.
pub fn filler_value(i: usize) -> String {
    format!("secret-value-{i:08}-{}", "x".repeat(24))
}
