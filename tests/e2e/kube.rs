//! Short-lived cluster credentials against real peers: openssl, etcd with
//! mutual TLS, kubectl through the exec plugin, and a Python script.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::util::{Env, assert_fails};

fn issued_count(daemon: &crate::util::Daemon) -> usize {
    daemon.log_text().matches("certificate issued").count()
}

fn openssl(args: &[&str]) -> String {
    let out = Command::new("openssl")
        .args(args)
        .output()
        .expect("openssl runs");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn p(path: &Path) -> &str {
    path.to_str().expect("utf8 path")
}

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).expect("JSON output")
}

fn window_seconds(v: &serde_json::Value) -> u64 {
    let t = |k: &str| humantime::parse_rfc3339(v[k].as_str().expect("time")).expect("rfc3339");
    t("not_after")
        .duration_since(t("not_before"))
        .expect("ordered")
        .as_secs()
}

#[test]
fn every_profile_verifies_with_openssl_with_the_right_usages_and_window() {
    let (env, _daemon) = Env::ready();
    env.ok(&["ca", "create", "etcd-prod"]);
    env.ok(&["ca", "create", "on-token", "--on-token"]);
    let ca = env.path().join("ca.pem");
    std::fs::write(&ca, env.ok(&["ca", "export", "etcd-prod"])).expect("ca");

    let cases: [(&str, &[&str], &str, u64); 3] = [
        (
            "client",
            &["--cn", "alice", "--o", "system:masters", "--ttl", "15m"],
            "TLS Web Client Authentication",
            900,
        ),
        (
            "server",
            &[
                "--cn",
                "etcd-1",
                "--san",
                "127.0.0.1",
                "--san",
                "etcd-1",
                "--ttl",
                "720h",
            ],
            "TLS Web Server Authentication, TLS Web Client Authentication",
            720 * 3600,
        ),
        (
            "peer",
            &["--cn", "etcd-1", "--san", "10.0.0.5", "--ttl", "24h"],
            "TLS Web Server Authentication, TLS Web Client Authentication",
            86400,
        ),
    ];
    for (profile, extra, eku, ttl) in cases {
        let dir = env.path().join(profile);
        let mut args = vec![
            "--json",
            "cert",
            "issue",
            "--ca",
            "etcd-prod",
            "--profile",
            profile,
            "--out-dir",
            p(&dir),
        ];
        args.extend_from_slice(extra);
        let out = json(&env.ok(&args));
        // notBefore is backdated 5 minutes for clock skew.
        assert_eq!(window_seconds(&out), ttl + 300, "{profile}");
        let cert = dir.join("cert.pem");
        assert!(openssl(&["verify", "-CAfile", p(&ca), p(&cert)]).contains(": OK"));
        let text = openssl(&["x509", "-in", p(&cert), "-noout", "-text"]);
        assert!(text.contains(eku), "{profile}: {text}");
        assert!(text.contains("Digital Signature"), "{profile}");
        assert!(text.contains("CA:FALSE"), "{profile}");
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(dir.join("key.pem"))
                .expect("key")
                .permissions(),
        );
        assert_eq!(mode & 0o777, 0o600);
        match profile {
            "client" => {
                assert!(
                    text.contains("CN = alice, O = system:masters")
                        || text.contains("CN=alice, O=system:masters"),
                    "{text}"
                );
                assert!(!text.contains("Subject Alternative Name"));
            }
            "server" => assert!(text.contains("DNS:etcd-1, IP Address:127.0.0.1"), "{text}"),
            _ => assert!(text.contains("IP Address:10.0.0.5"), "{text}"),
        }
        // The serial is random and 128 bits wide.
        let serial = openssl(&["x509", "-in", p(&cert), "-noout", "-serial"]);
        assert_eq!(
            serial.trim().trim_start_matches("serial=").len(),
            32,
            "{serial}"
        );
    }

    // A CSR made by openssl: only the certificate comes back.
    let key = env.path().join("csr-key.pem");
    let csr = env.path().join("req.pem");
    openssl(&[
        "req",
        "-new",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-subj",
        "/CN=apiserver-etcd-client",
        "-keyout",
        p(&key),
        "-out",
        p(&csr),
    ]);
    let out = json(&env.ok(&[
        "--json",
        "cert",
        "issue",
        "--ca",
        "etcd-prod",
        "--profile",
        "client",
        "--csr",
        p(&csr),
    ]));
    assert!(out["private_key_pem"].is_null());
    let cert = env.path().join("from-csr.pem");
    std::fs::write(&cert, out["certificate_pem"].as_str().expect("pem")).expect("write");
    assert!(openssl(&["verify", "-CAfile", p(&ca), p(&cert)]).contains(": OK"));
    assert!(
        openssl(&["x509", "-in", p(&cert), "-noout", "-subject"]).contains("apiserver-etcd-client")
    );
    let from_csr = openssl(&["x509", "-in", p(&cert), "-noout", "-pubkey"]);
    let csr_key = openssl(&["pkey", "-in", p(&key), "-pubout"]);
    assert_eq!(from_csr, csr_key, "the certificate holds the CSR's key");

    // A CA whose key is on the token signs the same way.
    let token_ca = env.path().join("token-ca.pem");
    std::fs::write(&token_ca, env.ok(&["ca", "export", "on-token"])).expect("ca");
    let dir = env.path().join("on-token");
    env.ok(&[
        "cert",
        "issue",
        "--ca",
        "on-token",
        "--profile",
        "server",
        "--cn",
        "node",
        "--san",
        "node.example",
        "--out-dir",
        p(&dir),
    ]);
    assert!(
        openssl(&["verify", "-CAfile", p(&token_ca), p(&dir.join("cert.pem"))]).contains(": OK")
    );
    let shown = json(&env.ok(&["--json", "ca", "show", "on-token"]));
    assert_eq!(shown["on_token"], true);
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// A process stopped by PID when dropped.
pub(crate) struct Running(pub(crate) Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub(crate) fn etcdctl(
    endpoint: &str,
    dir: &Path,
    client: &Path,
    args: &[&str],
) -> std::process::Output {
    Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .args([
            "--endpoints",
            endpoint,
            "--dial-timeout",
            "3s",
            "--command-timeout",
            "5s",
            "--cacert",
        ])
        .arg(dir.join("server/ca.pem"))
        .arg("--cert")
        .arg(client.join("cert.pem"))
        .arg("--key")
        .arg(client.join("key.pem"))
        .args(args)
        .output()
        .expect("etcdctl runs (apt-get install etcd-client)")
}

/// etcd on loopback serving `server`'s cert.pem/key.pem and requiring
/// client certificates from its ca.pem; data and log under `dir`.
pub(crate) fn start_etcd(dir: &Path, server: &Path) -> (Running, String) {
    let (client_port, peer_port) = (free_port(), free_port());
    let endpoint = format!("https://127.0.0.1:{client_port}");
    let peer = format!("http://127.0.0.1:{peer_port}");
    let etcd = Command::new("etcd")
        .args(["--name", "keyholder-test", "--data-dir"])
        .arg(dir.join("data"))
        .args(["--listen-client-urls", &endpoint])
        .args(["--advertise-client-urls", &endpoint])
        .args(["--listen-peer-urls", &peer])
        .args(["--initial-advertise-peer-urls", &peer])
        .args(["--initial-cluster", &format!("keyholder-test={peer}")])
        .arg("--client-cert-auth")
        .arg("--trusted-ca-file")
        .arg(server.join("ca.pem"))
        .arg("--cert-file")
        .arg(server.join("cert.pem"))
        .arg("--key-file")
        .arg(server.join("key.pem"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("etcd.log")).expect("log"))
        .spawn()
        .expect("etcd runs (apt-get install etcd-server)");
    (Running(etcd), endpoint)
}

/// `etcdctl put keyholder works` with `client`'s certificate, retried
/// (bounded) until etcd is up.
pub(crate) fn put_when_up(endpoint: &str, dir: &Path, client: &Path) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = etcdctl(endpoint, dir, client, &["put", "keyholder", "works"]);
        if out.status.success() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "etcd never accepted the client: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(dir.join("etcd.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn etcd_with_mutual_tls_accepts_keyholder_certificates_and_refuses_others() {
    let (env, _daemon) = Env::ready();
    env.ok(&["ca", "create", "etcd"]);
    env.ok(&["ca", "create", "other"]);
    let dir = env.path().join("etcd");
    let out_dir = |name: &str| dir.join(name);
    env.ok(&[
        "cert",
        "issue",
        "--ca",
        "etcd",
        "--profile",
        "server",
        "--cn",
        "etcd-1",
        "--san",
        "127.0.0.1",
        "--ttl",
        "1h",
        "--out-dir",
        p(&out_dir("server")),
    ]);
    env.ok(&[
        "cert",
        "issue",
        "--ca",
        "etcd",
        "--profile",
        "client",
        "--cn",
        "apiserver-etcd-client",
        "--ttl",
        "10m",
        "--out-dir",
        p(&out_dir("client")),
    ]);
    env.ok(&[
        "cert",
        "issue",
        "--ca",
        "other",
        "--profile",
        "client",
        "--cn",
        "intruder",
        "--out-dir",
        p(&out_dir("intruder")),
    ]);

    let (_etcd, endpoint) = start_etcd(&dir, &out_dir("server"));
    let client = out_dir("client");
    put_when_up(&endpoint, &dir, &client);
    let got = etcdctl(
        &endpoint,
        &dir,
        &client,
        &["get", "keyholder", "--print-value-only"],
    );
    assert_eq!(String::from_utf8_lossy(&got.stdout).trim(), "works");

    // A certificate from another CA is refused.
    let refused = etcdctl(&endpoint, &dir, &out_dir("intruder"), &["get", "keyholder"]);
    assert!(
        !refused.status.success(),
        "etcd accepted a certificate from another CA"
    );

    // A client certificate past its notAfter is refused.
    env.ok(&[
        "cert",
        "issue",
        "--ca",
        "etcd",
        "--profile",
        "client",
        "--cn",
        "short",
        "--ttl",
        "1s",
        "--out-dir",
        p(&out_dir("short")),
    ]);
    std::thread::sleep(Duration::from_millis(2500));
    let expired = etcdctl(&endpoint, &dir, &out_dir("short"), &["get", "keyholder"]);
    assert!(
        !expired.status.success(),
        "etcd accepted an expired certificate"
    );
    // The long-lived one still works.
    assert!(
        etcdctl(&endpoint, &dir, &client, &["get", "keyholder"])
            .status
            .success()
    );
}

#[test]
fn rsa_and_ed25519_cas_issue_certificates_etcd_accepts() {
    let (env, _daemon) = Env::ready();
    // (CA algorithm, what openssl shows for its key, the caller's key algorithm)
    let cases = [
        ("rsa-2048", "Public-Key: (2048 bit)", "rsa-2048"),
        ("ed25519", "Public Key Algorithm: ED25519", "ed25519"),
    ];
    for (alg, key_text, client_alg) in cases {
        let name = format!("etcd-{alg}");
        env.ok(&["ca", "create", &name, "--key-algorithm", alg]);
        let dir = env.path().join(&name);
        std::fs::create_dir_all(&dir).expect("dir");
        let ca = dir.join("ca.pem");
        std::fs::write(&ca, env.ok(&["ca", "export", &name])).expect("ca");
        let ca_text = openssl(&["x509", "-in", p(&ca), "-noout", "-text"]);
        assert!(ca_text.contains(key_text), "{alg}: {ca_text}");
        assert!(ca_text.contains("CA:TRUE"), "{alg}");
        let issue = |profile: &str, cn: &str, extra: &[&str], out: &Path| {
            let mut args = vec![
                "cert",
                "issue",
                "--ca",
                &name,
                "--profile",
                profile,
                "--cn",
                cn,
                "--out-dir",
                p(out),
            ];
            args.extend_from_slice(extra);
            env.ok(&args);
            assert!(
                openssl(&["verify", "-CAfile", p(&ca), p(&out.join("cert.pem"))]).contains(": OK"),
                "{alg} {profile}"
            );
        };
        let (server, client) = (dir.join("server"), dir.join("client"));
        issue(
            "server",
            "etcd-1",
            &["--san", "127.0.0.1", "--ttl", "1h"],
            &server,
        );
        issue(
            "client",
            "root",
            &["--key-algorithm", client_alg, "--ttl", "10m"],
            &client,
        );
        let client_text = openssl(&[
            "x509",
            "-in",
            p(&client.join("cert.pem")),
            "-noout",
            "-text",
        ]);
        assert!(
            client_text.contains(key_text),
            "{alg} client key: {client_text}"
        );
        if alg.starts_with("rsa") {
            assert!(
                client_text.contains("sha256WithRSAEncryption"),
                "{client_text}"
            );
        }

        let (etcd, endpoint) = start_etcd(&dir, &server);
        put_when_up(&endpoint, &dir, &client);
        let got = etcdctl(
            &endpoint,
            &dir,
            &client,
            &["get", "keyholder", "--print-value-only"],
        );
        assert_eq!(
            String::from_utf8_lossy(&got.stdout).trim(),
            "works",
            "{alg}"
        );
        drop(etcd);
    }
}

/// A TLS server that answers like an API server's `/version` and requires a
/// client certificate from `ca_pem`.
pub(crate) struct ApiServer {
    pub(crate) port: u16,
    stop: Arc<std::sync::atomic::AtomicBool>,
    pub(crate) seen: Arc<std::sync::Mutex<Vec<String>>>,
    /// The client certificates (DER) it was shown, in order.
    pub(crate) seen_certs: Arc<std::sync::Mutex<Vec<Vec<u8>>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ApiServer {
    pub(crate) fn start(ca_pem: &Path, cert: &Path, key: &Path) -> Self {
        Self::start_on(0, ca_pem, cert, key)
    }

    /// [`ApiServer::start`] on the loopback port `port` (0: any).
    pub(crate) fn start_on(port: u16, ca_pem: &Path, cert: &Path, key: &Path) -> Self {
        use rustls_pki_types::pem::PemObject;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        for c in rustls_pki_types::CertificateDer::pem_file_iter(ca_pem).expect("ca") {
            roots.add(c.expect("ca cert")).expect("add root");
        }
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            provider.clone(),
        )
        .build()
        .expect("verifier");
        let chain: Vec<_> = rustls_pki_types::CertificateDer::pem_file_iter(cert)
            .expect("cert")
            .map(|c| c.expect("cert"))
            .collect();
        let key = rustls_pki_types::PrivateKeyDer::from_pem_file(key).expect("key");
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .expect("server config");
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let config = Arc::new(config);
        let listener = TcpListener::bind(("127.0.0.1", port)).expect("bind");
        listener.set_nonblocking(true).expect("nonblocking");
        let port = listener.local_addr().expect("addr").port();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen_certs = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (stop2, seen2, certs2) = (stop.clone(), seen.clone(), seen_certs.clone());
        let thread = std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(120);
            while !stop2.load(std::sync::atomic::Ordering::Relaxed) && Instant::now() < deadline {
                match listener.accept() {
                    Ok((tcp, _)) => {
                        let (config, seen, certs) = (config.clone(), seen2.clone(), certs2.clone());
                        std::thread::spawn(move || serve(tcp, config, seen, certs));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        Self {
            port,
            stop,
            seen,
            seen_certs,
            thread: Some(thread),
        }
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(
    tcp: TcpStream,
    config: Arc<rustls::ServerConfig>,
    seen: Arc<std::sync::Mutex<Vec<String>>>,
    seen_certs: Arc<std::sync::Mutex<Vec<Vec<u8>>>>,
) {
    let _ = tcp.set_nonblocking(false);
    let _ = tcp.set_read_timeout(Some(Duration::from_secs(10)));
    let Ok(conn) = rustls::ServerConnection::new(config) else {
        return;
    };
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    let mut reader = BufReader::new(&mut tls);
    let mut request_line = String::new();
    if reader.read_line(&mut request_line).is_err() {
        return; // handshake refused or client gone
    }
    loop {
        let mut line = String::new();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) if line == "\r\n" => break,
            Ok(_) => {}
        }
    }
    drop(reader);
    if let Some(certs) = tls.conn.peer_certificates()
        && let Some(first) = certs.first()
    {
        let cn = x509_cn(first.as_ref());
        seen.lock().expect("seen").push(cn);
        seen_certs
            .lock()
            .expect("seen")
            .push(first.as_ref().to_vec());
    }
    let body = r#"{"major":"1","minor":"30","gitVersion":"v1.30.0-keyholder-test","platform":"linux/amd64"}"#;
    let response = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = tls.write_all(response.as_bytes());
    let _ = tls.flush();
    tls.conn.send_close_notify();
    let _ = tls.flush();
    let mut rest = Vec::new();
    let _ = tls.read_to_end(&mut rest);
}

fn x509_cn(der: &[u8]) -> String {
    // Good enough for the test: find the CN printable/UTF8 string after the
    // id-at-commonName OID in the subject (the last one in the certificate).
    let oid = [0x06, 0x03, 0x55, 0x04, 0x03];
    let mut last = String::new();
    let mut i = 0;
    while i + oid.len() + 2 < der.len() {
        if der[i..i + oid.len()] == oid {
            let len = der[i + oid.len() + 1] as usize;
            let start = i + oid.len() + 2;
            if let Some(v) = der.get(start..start + len) {
                last = String::from_utf8_lossy(v).into_owned();
            }
        }
        i += 1;
    }
    last
}

/// A cluster profile `prod` whose API server is a test server on loopback
/// trusting the CA `kube-prod` (created here), its server certificate in
/// `dir/server`.
pub(crate) fn prod_cluster(env: &Env, dir: &Path) -> ApiServer {
    env.ok(&["ca", "create", "kube-prod"]);
    let server = dir.join("server");
    env.ok(&[
        "cert",
        "issue",
        "--ca",
        "kube-prod",
        "--profile",
        "server",
        "--cn",
        "kube-apiserver",
        "--san",
        "127.0.0.1",
        "--out-dir",
        p(&server),
    ]);
    let api = ApiServer::start(
        &server.join("ca.pem"),
        &server.join("cert.pem"),
        &server.join("key.pem"),
    );
    env.ok(&[
        "cluster",
        "add",
        "prod",
        "--server",
        &format!("https://127.0.0.1:{}", api.port),
        "--ca",
        "kube-prod",
    ]);
    api
}

pub(crate) fn kubectl(kubeconfig: &Path, dir: &Path) -> Command {
    let mut c = Command::new("kubectl");
    c.env("KUBECONFIG", kubeconfig).env("HOME", dir).args([
        "get",
        "--raw",
        "/version",
        "--request-timeout",
        "20s",
    ]);
    c
}

#[test]
fn kubectl_authenticates_through_the_exec_plugin_and_concurrent_runs_share_one_certificate() {
    let (env, daemon) = Env::ready();
    env.ok(&["ca", "create", "kube-prod"]);
    env.ok(&["ca", "create", "impostor"]);
    let dir = env.path().join("kube");
    env.ok(&[
        "cert",
        "issue",
        "--ca",
        "kube-prod",
        "--profile",
        "server",
        "--cn",
        "kube-apiserver",
        "--san",
        "127.0.0.1",
        "--out-dir",
        p(&dir.join("server")),
    ]);
    let server_dir = dir.join("server");
    let api = ApiServer::start(
        &server_dir.join("ca.pem"),
        &server_dir.join("cert.pem"),
        &server_dir.join("key.pem"),
    );
    let url = format!("https://127.0.0.1:{}", api.port);
    env.ok(&[
        "cluster",
        "add",
        "prod",
        "--server",
        &url,
        "--ca",
        "kube-prod",
        "--group",
        "system:masters",
    ]);

    // kubectl 1.20 (Debian) reads ExecCredential v1beta1 only; newer ones read both.
    let kubeconfig = dir.join("exec.kubeconfig");
    env.ok(&[
        "kubeconfig",
        "prod",
        "--user",
        "alice",
        "--exec",
        "--exec-api-version",
        "v1beta1",
        "--out",
        p(&kubeconfig),
    ]);
    let before = issued_count(&daemon);
    let runs: Vec<_> = (0..6)
        .map(|_| {
            kubectl(&kubeconfig, &dir)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("kubectl runs (apt-get install kubernetes-client)")
        })
        .collect();
    for run in runs {
        let out = run.wait_with_output().expect("kubectl finishes");
        assert!(
            out.status.success(),
            "kubectl failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stdout).contains("v1.30.0-keyholder-test"));
    }
    assert_eq!(
        issued_count(&daemon) - before,
        1,
        "six kubectl runs must share one certificate"
    );
    let seen = api.seen.lock().expect("seen").clone();
    assert!(
        seen.len() >= 6 && seen.iter().all(|cn| cn == "alice"),
        "client certificates seen: {seen:?}"
    );

    // An embedded-certificate kubeconfig works too, and is 0600.
    let embedded = dir.join("embedded.kubeconfig");
    env.ok(&[
        "kubeconfig",
        "prod",
        "--user",
        "bob",
        "--ttl",
        "5m",
        "--out",
        p(&embedded),
    ]);
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&embedded)
            .expect("kubeconfig")
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
    let out = kubectl(&embedded, &dir).output().expect("kubectl");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A client certificate from another CA is refused by the server.
    env.ok(&[
        "cluster", "add", "fake", "--server", &url, "--ca", "impostor",
    ]);
    let fake = dir.join("fake.kubeconfig");
    env.ok(&["kubeconfig", "fake", "--user", "mallory", "--out", p(&fake)]);
    let out = kubectl(&fake, &dir).output().expect("kubectl");
    assert!(
        !out.status.success(),
        "a certificate from another CA got in"
    );

    // Locked: kubectl fails and the plugin's one line tells the user what to do.
    env.ok(&["lock"]);
    let out = kubectl(&kubeconfig, &dir).output().expect("kubectl");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("keyholder unlock"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_exec_plugin_prints_only_json_on_stdout_and_follows_kubernetes_exec_info() {
    let (env, daemon) = Env::ready();
    env.ok(&["ca", "create", "kube"]);
    env.ok(&[
        "cluster",
        "add",
        "prod",
        "--server",
        "https://127.0.0.1:6443",
        "--ca",
        "kube",
        "--group",
        "devs",
    ]);
    let run_with = |info: Option<&str>, extra: &[&str]| {
        let mut c = Command::new(crate::util::keyholder_bin());
        c.args([
            "--socket",
            p(&env.socket()),
            "kube-credential",
            "--cluster",
            "prod",
            "--user",
            "alice",
        ])
        .args(extra)
        .stdin(Stdio::null());
        match info {
            Some(i) => c.env("KUBERNETES_EXEC_INFO", i),
            None => c.env_remove("KUBERNETES_EXEC_INFO"),
        };
        c.output().expect("plugin runs")
    };
    let run = |info: Option<&str>| run_with(info, &[]);
    let out = run(None);
    assert!(out.status.success());
    assert!(
        out.stderr.is_empty(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v = json(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(v["apiVersion"], "client.authentication.k8s.io/v1");
    assert_eq!(v["kind"], "ExecCredential");
    assert!(
        v["status"]["clientCertificateData"]
            .as_str()
            .unwrap_or("")
            .contains("BEGIN CERTIFICATE")
    );
    assert!(
        v["status"]["clientKeyData"]
            .as_str()
            .unwrap_or("")
            .contains("PRIVATE KEY")
    );
    let expiry =
        humantime::parse_rfc3339(v["status"]["expirationTimestamp"].as_str().expect("expiry"))
            .expect("rfc3339");
    let left = expiry
        .duration_since(std::time::SystemTime::now())
        .expect("in the future")
        .as_secs();
    assert!(
        (800..=900).contains(&left),
        "15 minute credential, {left}s left"
    );

    let v1beta1 = r#"{"kind":"ExecCredential","apiVersion":"client.authentication.k8s.io/v1beta1","spec":{"interactive":false}}"#;
    let out = run(Some(v1beta1));
    let v = json(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(v["apiVersion"], "client.authentication.k8s.io/v1beta1");
    let issued = issued_count(&daemon);
    assert_eq!(issued, 1, "the second call was served from the cache");

    for bad in [
        "{not json",
        r#"{"kind":"ExecCredential","apiVersion":"client.authentication.k8s.io/v9"}"#,
    ] {
        let out = run(Some(bad));
        assert_eq!(out.status.code(), Some(6));
        assert!(out.stdout.is_empty());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("KUBERNETES_EXEC_INFO") && stderr.lines().count() == 1,
            "{stderr}"
        );
    }
    // Without KUBERNETES_EXEC_INFO, --api-version reaches keyholderd as
    // written, and keyholderd alone decides which versions exist.
    let out = run_with(None, &["--api-version", "v1beta1"]);
    assert!(out.status.success());
    let v = json(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(v["apiVersion"], "client.authentication.k8s.io/v1beta1");
    let out = run_with(None, &["--api-version", "v2"]);
    assert_eq!(out.status.code(), Some(6));
    assert!(out.stdout.is_empty());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("api_version") && stderr.lines().count() == 1,
        "{stderr}"
    );
    env.ok(&["lock"]);
    let out = run(None);
    assert_eq!(out.status.code(), Some(3));
    assert!(out.stdout.is_empty());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("run `keyholder unlock`"));
    assert_eq!(issued_count(&daemon), issued);
}

#[test]
fn bad_certificate_requests_are_refused_and_nothing_is_issued() {
    let (env, daemon) = Env::ready();
    env.ok(&["ca", "create", "kube"]);
    env.ok(&["ca", "create", "short", "--max-ttl", "1h"]);
    env.ok(&[
        "cluster",
        "add",
        "prod",
        "--server",
        "https://127.0.0.1:6443",
        "--ca",
        "kube",
        "--max-ttl",
        "30m",
    ]);
    let before = issued_count(&daemon);

    assert_fails(
        &env.cli(&["kubeconfig", "nosuch", "--user", "a"]),
        4,
        "cluster \"nosuch\" does not exist",
    );
    assert_fails(
        &env.cli(&["cert", "issue", "--ca", "nosuch", "--cn", "a"]),
        4,
        "CA \"nosuch\" does not exist",
    );
    assert_fails(
        &env.cli(&["kubeconfig", "prod", "--user", "a", "--ttl", "2h"]),
        6,
        "ttl_seconds: 2h is over the cluster's maximum of 30m",
    );
    assert_fails(
        &env.cli(&["cert", "issue", "--ca", "short", "--cn", "a", "--ttl", "2h"]),
        6,
        "over the CA's maximum",
    );
    assert_fails(
        &env.cli(&[
            "cert",
            "issue",
            "--ca",
            "kube",
            "--cn",
            "a",
            "--key-algorithm",
            "rsa-1024",
        ]),
        6,
        "\"rsa-1024\" is not supported",
    );
    assert_fails(
        &env.cli(&["ca", "create", "weak", "--key-algorithm", "rsa-1024"]),
        6,
        "\"rsa-1024\" is not supported",
    );
    assert_fails(
        &env.cli(&[
            "cert",
            "issue",
            "--ca",
            "kube",
            "--cn",
            "a",
            "--san",
            "example.com",
        ]),
        6,
        "sans: the client profile takes no DNS or IP names",
    );
    assert_fails(
        &env.cli(&[
            "cert",
            "issue",
            "--ca",
            "kube",
            "--profile",
            "server",
            "--cn",
            "a",
        ]),
        6,
        "sans:",
    );
    assert_fails(
        &env.cli(&[
            "cert",
            "issue",
            "--ca",
            "kube",
            "--profile",
            "admin",
            "--cn",
            "a",
        ]),
        6,
        "profile:",
    );
    assert_fails(
        &env.cli(&[
            "cert",
            "issue",
            "--ca",
            "kube",
            "--profile",
            "server",
            "--cn",
            "a",
            "--san",
            "bad name!",
        ]),
        6,
        "dns_names",
    );
    assert_fails(
        &env.cli(&[
            "cluster",
            "add",
            "x",
            "--server",
            "http://plain",
            "--ca",
            "kube",
        ]),
        6,
        "server:",
    );
    assert_fails(
        &env.cli(&[
            "cluster",
            "add",
            "x",
            "--server",
            "https://h",
            "--ca",
            "nosuch",
        ]),
        4,
        "CA \"nosuch\"",
    );
    assert_fails(&env.cli(&["ca", "create", "kube"]), 5, "already exists");
    assert_fails(&env.cli(&["ca", "create", "../x"]), 6, "name:");

    let dir = env.path();
    // A CSR whose signature does not verify.
    let key = dir.join("k.pem");
    let csr = dir.join("req.pem");
    openssl(&[
        "req",
        "-new",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-subj",
        "/CN=x",
        "-keyout",
        p(&key),
        "-out",
        p(&csr),
    ]);
    let der = dir.join("req.der");
    openssl(&["req", "-in", p(&csr), "-outform", "DER", "-out", p(&der)]);
    let mut bytes = std::fs::read(&der).expect("der");
    let n = bytes.len() - 4;
    bytes[n] ^= 0x55;
    std::fs::write(&der, &bytes).expect("write");
    let broken = dir.join("broken.pem");
    openssl(&["req", "-inform", "DER", "-in", p(&der), "-out", p(&broken)]);
    assert_fails(
        &env.cli(&["cert", "issue", "--ca", "kube", "--csr", p(&broken)]),
        6,
        "csr:",
    );
    // A key type Keyholder does not certify (P-521).
    let p521 = dir.join("p521.pem");
    openssl(&[
        "req",
        "-new",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-521",
        "-nodes",
        "-subj",
        "/CN=x",
        "-keyout",
        p(&dir.join("k521.pem")),
        "-out",
        p(&p521),
    ]);
    assert_fails(
        &env.cli(&["cert", "issue", "--ca", "kube", "--csr", p(&p521)]),
        6,
        "csr:",
    );
    // A CSR asking for a SAN the client profile forbids.
    let san = dir.join("san.pem");
    openssl(&[
        "req",
        "-new",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-subj",
        "/CN=x",
        "-addext",
        "subjectAltName=DNS:evil.example",
        "-keyout",
        p(&dir.join("k2.pem")),
        "-out",
        p(&san),
    ]);
    assert_fails(
        &env.cli(&[
            "cert",
            "issue",
            "--ca",
            "kube",
            "--profile",
            "client",
            "--csr",
            p(&san),
        ]),
        6,
        "sans:",
    );
    // Garbage instead of a CSR.
    let junk = env.file(
        "junk.pem",
        "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
    );
    assert_fails(
        &env.cli(&["cert", "issue", "--ca", "kube", "--csr", p(&junk)]),
        6,
        "csr:",
    );

    assert_eq!(issued_count(&daemon), before, "nothing was issued");

    env.ok(&["lock"]);
    assert_fails(
        &env.cli(&["cert", "issue", "--ca", "kube", "--cn", "a"]),
        3,
        "locked",
    );
    assert_fails(
        &env.cli(&["kubeconfig", "prod", "--user", "a"]),
        3,
        "locked",
    );
    assert_eq!(issued_count(&daemon), before);
}

#[test]
fn the_python_example_writes_a_kubeconfig_with_mode_0600() {
    let (env, _daemon) = Env::ready();
    env.ok(&["ca", "create", "kube"]);
    env.ok(&[
        "cluster",
        "add",
        "prod",
        "--server",
        "https://127.0.0.1:6443",
        "--ca",
        "kube",
        "--group",
        "deployers",
    ]);
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let stubs = crate::python::generate_stubs(&env);
    let target: PathBuf = env.path().join("out/prod.kubeconfig");
    let out = Command::new("python3")
        .arg(root.join("examples/kubeconfig.py"))
        .args([
            "--socket",
            p(&env.socket()),
            "--cluster",
            "prod",
            "--user",
            "ci-deployer",
            "--ttl",
            "600",
            "--out",
            p(&target),
        ])
        .env("PYTHONPATH", &stubs)
        .output()
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&target).expect("written").permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
    let text = std::fs::read_to_string(&target).expect("kubeconfig");
    assert!(text.contains("client-certificate-data") && text.contains("client-key-data"));
    assert!(String::from_utf8_lossy(&out.stdout).contains("expires"));
    // The certificate inside says who and which groups.
    let line = text
        .lines()
        .find(|l| l.contains("client-certificate-data"))
        .expect("cert line");
    let b64 = line.split('"').nth(1).expect("quoted");
    let pem = env.path().join("client.pem");
    let decoded = Command::new("base64")
        .arg("-d")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            c.stdin.take().expect("stdin").write_all(b64.as_bytes())?;
            c.wait_with_output()
        });
    std::fs::write(&pem, decoded.expect("base64").stdout).expect("pem");
    let subject = openssl(&["x509", "-in", p(&pem), "-noout", "-subject"]);
    assert!(
        subject.contains("ci-deployer") && subject.contains("deployers"),
        "{subject}"
    );
}

/// Keys for callers come from a stock generated ahead of time while the
/// session is unlocked: no two certificates may share a key, every key must
/// match its certificate, and locking and unlocking changes neither.
#[test]
fn every_issued_key_is_fresh_and_matches_its_certificate() {
    let (env, _daemon) = Env::ready();
    env.ok(&["ca", "create", "kube"]);
    let ca = env.path().join("ca.pem");
    std::fs::write(&ca, env.ok(&["ca", "export", "kube"])).expect("ca");
    let issue_batch = |batch: usize| -> Vec<PathBuf> {
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..4)
                .map(|t| {
                    let env = &env;
                    s.spawn(move || {
                        (0..5)
                            .map(|i| {
                                let dir = env.path().join(format!("k-{batch}-{t}-{i}"));
                                env.ok(&[
                                    "cert",
                                    "issue",
                                    "--ca",
                                    "kube",
                                    "--cn",
                                    "a",
                                    "--out-dir",
                                    p(&dir),
                                ]);
                                dir
                            })
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().expect("issuing thread"))
                .collect()
        })
    };
    let mut dirs = issue_batch(0);
    env.ok(&["lock"]);
    env.unlock();
    dirs.extend(issue_batch(1));
    let mut seen = std::collections::HashSet::new();
    for dir in &dirs {
        let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
        assert!(openssl(&["verify", "-CAfile", p(&ca), p(&cert)]).contains(": OK"));
        let from_cert = openssl(&["x509", "-in", p(&cert), "-noout", "-pubkey"]);
        let from_key = openssl(&["pkey", "-in", p(&key), "-pubout"]);
        assert_eq!(
            from_cert,
            from_key,
            "{} holds a key that is not its certificate's",
            dir.display()
        );
        assert!(seen.insert(from_key), "a key was issued twice");
    }
    assert_eq!(seen.len(), 40);
}

#[test]
fn kubeadm_and_openssl_ca_keys_import_in_every_pem_form() {
    let (env, _daemon) = Env::ready();
    let dir = env.path();
    // kubeadm writes PKCS#1 RSA keys; `openssl ecparam` writes SEC1 EC keys.
    // "KEY" stands for the key file's path.
    let forms: [(&str, &[&str]); 3] = [
        ("pkcs1", &["genrsa", "-traditional", "-out", "KEY", "2048"]),
        (
            "sec1",
            &[
                "ecparam",
                "-name",
                "prime256v1",
                "-genkey",
                "-noout",
                "-out",
                "KEY",
            ],
        ),
        (
            "pkcs8",
            &[
                "genpkey",
                "-algorithm",
                "EC",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-out",
                "KEY",
            ],
        ),
    ];
    for (form, gen_args) in forms {
        let key = dir.join(format!("{form}.key"));
        let cert = dir.join(format!("{form}.crt"));
        let args: Vec<&str> = gen_args
            .iter()
            .map(|a| if *a == "KEY" { p(&key) } else { a })
            .collect();
        openssl(&args);
        let head = std::fs::read_to_string(&key).expect("key");
        let expected = match form {
            "pkcs1" => "-----BEGIN RSA PRIVATE KEY-----",
            "sec1" => "-----BEGIN EC PRIVATE KEY-----",
            _ => "-----BEGIN PRIVATE KEY-----",
        };
        assert!(head.starts_with(expected), "{form}: {head}");
        openssl(&[
            "req",
            "-x509",
            "-new",
            "-key",
            p(&key),
            "-subj",
            "/CN=kubernetes",
            "-days",
            "3650",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign,digitalSignature",
            "-out",
            p(&cert),
        ]);
        let name = format!("kube-{form}");
        env.ok(&["ca", "import", &name, "--cert", p(&cert), "--key", p(&key)]);
        // It issues, and what it issues verifies against the imported CA.
        let out_dir = dir.join(format!("issued-{form}"));
        env.ok(&[
            "cert",
            "issue",
            "--ca",
            &name,
            "--profile",
            "client",
            "--cn",
            "admin",
            "--out-dir",
            p(&out_dir),
        ]);
        let verified = openssl(&["verify", "-CAfile", p(&cert), p(&out_dir.join("cert.pem"))]);
        assert!(verified.contains("OK"), "{form}: {verified}");
    }
    // The same forms import as signing keys (RSA signing keys are 3072+ bits).
    let ec = dir.join("sign-sec1.key");
    openssl(&[
        "ecparam",
        "-name",
        "prime256v1",
        "-genkey",
        "-noout",
        "-out",
        p(&ec),
    ]);
    env.ok(&["key", "import", "ec-sec1", "--file", p(&ec)]);
    let rsa = dir.join("sign-pkcs1.key");
    openssl(&["genrsa", "-traditional", "-out", p(&rsa), "3072"]);
    env.ok(&["key", "import", "rsa-pkcs1", "--file", p(&rsa)]);
}

#[test]
fn an_api_server_certificate_from_another_ca_is_trusted_through_server_ca() {
    let (env, _daemon) = Env::ready();
    // Client certificates come from one CA; the API server's certificate
    // from another, as in clusters whose serving CA is not the client CA.
    env.ok(&["ca", "create", "kube-clients"]);
    env.ok(&["ca", "create", "apiserver-ca"]);
    let dir = env.path().join("kube");
    let server_dir = dir.join("server");
    env.ok(&[
        "cert",
        "issue",
        "--ca",
        "apiserver-ca",
        "--profile",
        "server",
        "--cn",
        "kube-apiserver",
        "--san",
        "127.0.0.1",
        "--out-dir",
        p(&server_dir),
    ]);
    let server_ca = server_dir.join("ca.pem");
    let client_ca = dir.join("clients-ca.pem");
    std::fs::write(&client_ca, env.ok(&["ca", "export", "kube-clients"])).expect("client ca");
    let api = ApiServer::start(
        &client_ca,
        &server_dir.join("cert.pem"),
        &server_dir.join("key.pem"),
    );
    let url = format!("https://127.0.0.1:{}", api.port);
    env.ok(&[
        "cluster",
        "add",
        "prod",
        "--server",
        &url,
        "--ca",
        "kube-clients",
    ]);

    // Without --server-ca the kubeconfig trusts the client CA: kubectl refuses the server.
    let plain = dir.join("plain.kubeconfig");
    env.ok(&["kubeconfig", "prod", "--user", "alice", "--out", p(&plain)]);
    let out = kubectl(&plain, &dir).output().expect("kubectl");
    assert!(
        !out.status.success(),
        "kubectl trusted a server from another CA"
    );

    // With it, the kubeconfig's certificate-authority-data is that CA and kubectl gets through.
    let with = dir.join("with.kubeconfig");
    env.ok(&[
        "kubeconfig",
        "prod",
        "--user",
        "alice",
        "--server-ca",
        p(&server_ca),
        "--out",
        p(&with),
    ]);
    let out = kubectl(&with, &dir).output().expect("kubectl");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("v1.30.0-keyholder-test"));
    let view = Command::new("kubectl")
        .env("KUBECONFIG", &with)
        .env("HOME", &dir)
        .args([
            "config",
            "view",
            "--raw",
            "-o",
            "jsonpath={.clusters[0].cluster.certificate-authority-data}",
        ])
        .output()
        .expect("kubectl config view");
    let data = String::from_utf8_lossy(&view.stdout).trim().to_owned();
    let decoded = Command::new("base64")
        .arg("-d")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            c.stdin.take().expect("stdin").write_all(data.as_bytes())?;
            c.wait_with_output()
        })
        .expect("base64");
    assert_eq!(
        String::from_utf8_lossy(&decoded.stdout),
        std::fs::read_to_string(&server_ca).expect("server ca")
    );

    // As a cluster setting, it serves exec kubeconfigs too.
    env.ok(&[
        "cluster",
        "add",
        "prod2",
        "--server",
        &url,
        "--ca",
        "kube-clients",
        "--server-ca",
        p(&server_ca),
    ]);
    let listed = json(&env.ok(&["--json", "cluster", "list"]));
    let prod2 = listed
        .as_array()
        .and_then(|a| a.iter().find(|c| c["name"] == "prod2"))
        .expect("prod2 listed");
    assert!(
        prod2["server_ca_pem"]
            .as_str()
            .is_some_and(|s| s.contains("BEGIN CERTIFICATE"))
    );
    let exec = dir.join("exec.kubeconfig");
    env.ok(&[
        "kubeconfig",
        "prod2",
        "--user",
        "alice",
        "--exec",
        "--exec-api-version",
        "v1beta1",
        "--out",
        p(&exec),
    ]);
    let out = kubectl(&exec, &dir).output().expect("kubectl");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The commands of docs/kubernetes.md, as written (paths made absolute).
    env.ok(&["ca", "create", "kube-prod"]);
    let crt = env.path().join("apiserver-ca.crt");
    std::fs::copy(&server_ca, &crt).expect("copy");
    env.ok(&[
        "cluster",
        "add",
        "prod-docs",
        "--server",
        "https://10.0.0.1:6443",
        "--ca",
        "kube-prod",
        "--server-ca",
        p(&crt),
    ]);
    let docs_out = dir.join("prod");
    env.ok(&[
        "kubeconfig",
        "prod-docs",
        "--user",
        "alice",
        "--server-ca",
        p(&crt),
        "--out",
        p(&docs_out),
    ]);
    assert!(
        std::fs::read_to_string(&docs_out)
            .expect("kubeconfig")
            .contains("certificate-authority-data")
    );

    // Something that is not a certificate is refused, naming the field.
    let junk = env.file(
        "junk.pem",
        "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
    );
    assert_fails(
        &env.cli(&["kubeconfig", "prod", "--user", "a", "--server-ca", p(&junk)]),
        6,
        "server_ca_pem:",
    );
    assert_fails(
        &env.cli(&[
            "cluster",
            "add",
            "bad",
            "--server",
            &url,
            "--ca",
            "kube-clients",
            "--server-ca",
            p(&junk),
        ]),
        6,
        "server_ca_pem:",
    );
}

#[test]
fn a_ca_adopts_a_key_the_tokens_own_tools_made() {
    let (env, _daemon) = Env::ready();
    let made = crate::bad_input::pkcs11_tool(
        &env,
        &[
            "--keypairgen",
            "--key-type",
            "EC:prime256v1",
            "--label",
            "hsm-ca",
            "--id",
            "c0",
            "--usage-sign",
        ],
    );
    assert!(made.status.success(), "pkcs11-tool: {made:?}");
    // Adopting is for a CA on the token, and the URI must name a key that
    // is there.
    assert_fails(
        &env.cli(&["ca", "create", "x", "--pkcs11-uri", "pkcs11:id=%c0"]),
        2,
        "--on-token",
    );
    let missing = [
        "ca",
        "create",
        "x",
        "--on-token",
        "--pkcs11-uri",
        "pkcs11:id=%c1",
    ];
    assert_fails(&env.cli(&missing), 3, "no EC private key matches");
    env.ok(&[
        "ca",
        "create",
        "hsm",
        "--on-token",
        "--pkcs11-uri",
        "pkcs11:token=ops;id=%c0",
    ]);
    let shown = json(&env.ok(&["--json", "ca", "show", "hsm"]));
    assert_eq!(shown["on_token"], true);
    let ca = env.path().join("hsm-ca.pem");
    std::fs::write(&ca, env.ok(&["ca", "export", "hsm"])).expect("ca");
    // The CA certificate carries the adopted key.
    let listed =
        crate::bad_input::pkcs11_tool(&env, &["--read-object", "--type", "pubkey", "--id", "c0"]);
    assert!(listed.status.success(), "pkcs11-tool: {listed:?}");
    let token_pub = env.path().join("token-pub.der");
    std::fs::write(&token_pub, &listed.stdout).expect("pub");
    let token_pem = openssl(&["pkey", "-pubin", "-inform", "DER", "-in", p(&token_pub)]);
    let ca_pub = openssl(&["x509", "-in", p(&ca), "-noout", "-pubkey"]);
    assert_eq!(token_pem, ca_pub);
    let dir = env.path().join("issued");
    env.ok(&[
        "cert",
        "issue",
        "--ca",
        "hsm",
        "--profile",
        "client",
        "--cn",
        "ops-admin",
        "--out-dir",
        p(&dir),
    ]);
    assert!(openssl(&["verify", "-CAfile", p(&ca), p(&dir.join("cert.pem"))]).contains(": OK"));
}
