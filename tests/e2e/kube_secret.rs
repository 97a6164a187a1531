//! `keyholder kube-secret`: the manifest it prints is accepted by
//! `kubectl apply --dry-run=client`, decodes to the vault's values, matches
//! what `kubectl create secret --dry-run=client` makes of the same values,
//! and a `--from-cert` Secret holds a certificate that verifies and a key
//! that matches it.
//!
//! `kubectl apply`, even with `--dry-run=client`, asks an API server for
//! its version, discovery and OpenAPI documents and whether the object
//! exists: a loopback HTTP server here answers those (a v1 Secret resource
//! whose PATCH takes `fieldValidation`, as a real API server's does, and
//! 404 for every object) and nothing else; every request it got is checked
//! to be a read. kubectl then leaves field validation to the server, which
//! a client dry run never reaches; what kubectl checks is that the
//! manifest parses and maps to the v1 Secret resource, and it prints the
//! object it would send, whose data this test decodes and compares with
//! the vault's values and with what `kubectl create secret` makes of them.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::prelude::BASE64_STANDARD;

use crate::util::{DocBlocks, Env, assert_fails, assert_ok};

const DOCS: DocBlocks = DocBlocks {
    path: "docs/kubernetes.md",
    text: include_str!("../../docs/kubernetes.md"),
    mark: "<!-- run by tests/e2e/kube_secret.rs: ",
};

/// A discovery-only API server on loopback (plain HTTP).
struct Discovery {
    port: u16,
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Vec<String>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

const API_VERSIONS: &str = r#"{"kind":"APIVersions","versions":["v1"],"serverAddressByClientCIDRs":[{"clientCIDR":"0.0.0.0/0","serverAddress":"127.0.0.1"}]}"#;
const API_GROUPS: &str = r#"{"kind":"APIGroupList","apiVersion":"v1","groups":[]}"#;
const VERSION: &str = r#"{"major":"1","minor":"32","gitVersion":"v1.32.0"}"#;
const OPENAPI_V3: &str =
    r#"{"paths":{"api/v1":{"serverRelativeURL":"/openapi/v3/api/v1?hash=1"}}}"#;
const OPENAPI_V3_CORE: &str = r#"{"openapi":"3.0.0","info":{"title":"Kubernetes","version":"v1.32.0"},"paths":{"/api/v1/namespaces/{namespace}/secrets/{name}":{"patch":{"x-kubernetes-group-version-kind":{"group":"","version":"v1","kind":"Secret"},"parameters":[{"name":"fieldValidation","in":"query","schema":{"type":"string","uniqueItems":true}}],"responses":{}}}},"components":{"schemas":{}}}"#;
const CORE_V1: &str = r#"{"kind":"APIResourceList","groupVersion":"v1","resources":[{"name":"secrets","singularName":"secret","namespaced":true,"kind":"Secret","verbs":["create","delete","get","list","patch","update","watch"]},{"name":"namespaces","singularName":"namespace","namespaced":false,"kind":"Namespace","verbs":["get","list"]}]}"#;

impl Discovery {
    fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.set_nonblocking(true).expect("nonblocking");
        let port = listener.local_addr().expect("addr").port();
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (stop2, seen2) = (stop.clone(), seen.clone());
        let thread = std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(120);
            while !stop2.load(Ordering::Relaxed) && Instant::now() < deadline {
                match listener.accept() {
                    Ok((tcp, _)) => {
                        let seen = seen2.clone();
                        std::thread::spawn(move || answer(tcp, &seen));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        Self {
            port,
            stop,
            seen,
            thread: Some(thread),
        }
    }

    /// A kubeconfig for this server.
    fn kubeconfig(&self, dir: &Path) -> std::path::PathBuf {
        let path = dir.join("discovery.kubeconfig");
        std::fs::write(
            &path,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: d\n  cluster:\n    server: http://127.0.0.1:{}\ncontexts:\n- name: d\n  context:\n    cluster: d\n    user: d\n    namespace: default\ncurrent-context: d\nusers:\n- name: d\n  user: {{}}\n",
                self.port
            ),
        )
        .expect("kubeconfig");
        path
    }
}

impl Drop for Discovery {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Answers one connection's requests (keep-alive), GETs only.
fn answer(tcp: TcpStream, seen: &Mutex<Vec<String>>) {
    let _ = tcp.set_nonblocking(false);
    let _ = tcp.set_read_timeout(Some(Duration::from_secs(10)));
    let Ok(mut write) = tcp.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(tcp);
    for _ in 0..100 {
        let mut request_line = String::new();
        match reader.read_line(&mut request_line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        loop {
            let mut line = String::new();
            match reader.read_line(&mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) if line == "\r\n" => break,
                Ok(_) => {}
            }
        }
        let mut parts = request_line.split_whitespace();
        let method = parts.next().unwrap_or("").to_owned();
        let target = parts.next().unwrap_or("").to_owned();
        seen.lock()
            .expect("seen")
            .push(format!("{method} {target}"));
        let path = target.split('?').next().unwrap_or("");
        let (status, body) = match (method.as_str(), path) {
            ("GET", "/version") => ("200 OK", VERSION.to_owned()),
            ("GET", "/openapi/v3") => ("200 OK", OPENAPI_V3.to_owned()),
            ("GET", "/openapi/v3/api/v1") => ("200 OK", OPENAPI_V3_CORE.to_owned()),
            ("GET", "/api") => ("200 OK", API_VERSIONS.to_owned()),
            ("GET", "/apis") => ("200 OK", API_GROUPS.to_owned()),
            ("GET", "/api/v1") => ("200 OK", CORE_V1.to_owned()),
            _ => (
                "404 Not Found",
                r#"{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","reason":"NotFound","code":404,"message":"not found"}"#.to_owned(),
            ),
        };
        let response = format!(
            "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        if write.write_all(response.as_bytes()).is_err() {
            return;
        }
    }
}

fn run_with_stdin(mut command: Command, stdin: &[u8]) -> std::process::Output {
    command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command.spawn().expect("starts");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin)
        .expect("write stdin");
    child.wait_with_output().expect("finishes")
}

/// `kubectl apply --dry-run=client -f -` of `manifest`, as JSON.
fn apply_dry_run(kubeconfig: &Path, home: &Path, manifest: &[u8]) -> serde_json::Value {
    let mut c = Command::new("kubectl");
    c.env("KUBECONFIG", kubeconfig).env("HOME", home).args([
        "apply",
        "--dry-run=client",
        "-f",
        "-",
        "-o",
        "json",
        "--request-timeout",
        "20s",
    ]);
    let out = run_with_stdin(c, manifest);
    assert!(
        out.status.success(),
        "kubectl apply --dry-run=client refused the manifest:\n{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(manifest)
    );
    serde_json::from_slice(&out.stdout).expect("kubectl prints the object as JSON")
}

fn data(obj: &serde_json::Value) -> std::collections::BTreeMap<String, Vec<u8>> {
    obj["data"]
        .as_object()
        .expect("data")
        .iter()
        .map(|(k, v)| {
            (
                k.clone(),
                BASE64_STANDARD
                    .decode(v.as_str().expect("base64 string"))
                    .expect("base64"),
            )
        })
        .collect()
}

fn openssl(args: &[&str]) -> String {
    let out = Command::new("openssl")
        .args(args)
        .output()
        .expect("openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn manifests_are_accepted_by_kubectl_and_decode_to_the_vault_values() {
    let (env, _daemon) = Env::ready();
    env.put("db/prod/password", b"p@ss:w0rd\n\"quoted\"");
    env.put("db/prod/user", b"app");
    env.put("bin/blob", &[0, 255, 10, 13]);
    let api = Discovery::start();
    let kubeconfig = api.kubeconfig(env.path());

    let args = [
        "kube-secret",
        "db-creds",
        "--namespace",
        "apps",
        "--from",
        "password=db/prod/password",
        "--from",
        "username=db/prod/user",
        "--from",
        "blob.bin=bin/blob",
        "--label",
        "app.kubernetes.io/name=web",
    ];
    let manifest = env.cli(&args);
    assert_ok(&manifest, &args);
    let yaml = String::from_utf8_lossy(&manifest.stdout).into_owned();
    assert!(!yaml.contains("p@ss"), "values are base64: {yaml}");
    let obj = apply_dry_run(&kubeconfig, env.path(), &manifest.stdout);
    assert_eq!(obj["kind"], "Secret");
    assert_eq!(obj["type"], "Opaque");
    assert_eq!(obj["metadata"]["name"], "db-creds");
    assert_eq!(obj["metadata"]["namespace"], "apps");
    assert_eq!(obj["metadata"]["labels"]["app.kubernetes.io/name"], "web");
    let got = data(&obj);
    assert_eq!(got["password"], b"p@ss:w0rd\n\"quoted\"");
    assert_eq!(got["username"], b"app");
    assert_eq!(got["blob.bin"], [0, 255, 10, 13]);
    let seen = api.seen.lock().expect("seen").clone();
    assert!(
        seen.iter().all(|r| r.starts_with("GET ")),
        "only reads reach the server: {seen:?}"
    );
    assert!(
        seen.iter()
            .any(|r| r.starts_with("GET /api/v1/namespaces/apps/secrets/db-creds")),
        "kubectl looked the object up: {seen:?}"
    );

    // The same data kubectl itself makes from the values (offline).
    let dir = env.path().join("literal");
    std::fs::create_dir(&dir).expect("dir");
    std::fs::write(dir.join("password"), b"p@ss:w0rd\n\"quoted\"").expect("w");
    std::fs::write(dir.join("username"), b"app").expect("w");
    std::fs::write(dir.join("blob.bin"), [0, 255, 10, 13]).expect("w");
    let out = Command::new("kubectl")
        .env("KUBECONFIG", "/nonexistent")
        .env("HOME", env.path())
        .args(["create", "secret", "generic", "db-creds", "-n", "apps"])
        .arg(format!("--from-file={}", dir.display()))
        .args(["--dry-run=client", "-o", "json"])
        .output()
        .expect("kubectl create");
    assert!(out.status.success(), "{out:?}");
    let theirs: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(theirs["data"], obj["data"]);

    // --json prints the manifest as one JSON object kubectl takes as well.
    let mut json_args = vec!["--json"];
    json_args.extend_from_slice(&args);
    let out = env.cli(&json_args);
    assert_ok(&out, &json_args);
    let as_json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(as_json["data"], obj["data"]);
    apply_dry_run(&kubeconfig, env.path(), &out.stdout);

    // Failures print nothing.
    for (extra, code, needle) in [
        (
            vec!["db", "-n", "apps", "--from", "p=db/prod/nope"],
            4,
            "db/prod/nope",
        ),
        (
            vec!["DB", "-n", "apps", "--from", "p=db/prod/user"],
            2,
            "not a Kubernetes name",
        ),
        (
            vec!["db", "-n", "apps", "--from", "a/b=db/prod/user"],
            2,
            "not a Secret data key",
        ),
        (
            vec![
                "db",
                "-n",
                "apps",
                "--type",
                "kubernetes.io/tls",
                "--from",
                "p=db/prod/user",
            ],
            2,
            "needs tls.crt and tls.key",
        ),
        (vec!["db", "-n", "apps"], 2, "nothing to put"),
    ] {
        let mut a = vec!["kube-secret"];
        a.extend(extra);
        let out = env.cli(&a);
        assert_fails(&out, code, needle);
        assert!(out.stdout.is_empty(), "{a:?} printed {out:?}");
    }
}

#[test]
fn a_tls_secret_from_a_keyholder_ca_holds_a_matching_certificate_and_key() {
    let (env, _daemon) = Env::ready();
    env.ok(&["ca", "create", "web-ca"]);
    let api = Discovery::start();
    let kubeconfig = api.kubeconfig(env.path());
    let args = [
        "kube-secret",
        "web-tls",
        "--namespace",
        "apps",
        "--from-cert",
        "web-ca",
        "--san",
        "web.apps.svc",
        "--san",
        "10.0.0.5",
        "--ttl",
        "24h",
    ];
    let out = env.cli(&args);
    assert_ok(&out, &args);
    let obj = apply_dry_run(&kubeconfig, env.path(), &out.stdout);
    assert_eq!(obj["type"], "kubernetes.io/tls");
    let got = data(&obj);
    let dir = env.path();
    for (k, f) in [
        ("tls.crt", "tls.crt"),
        ("tls.key", "tls.key"),
        ("ca.crt", "ca.crt"),
    ] {
        std::fs::write(dir.join(f), &got[k]).expect("write");
    }
    let p = |f: &str| dir.join(f).to_str().expect("utf8").to_owned();
    assert!(openssl(&["verify", "-CAfile", &p("ca.crt"), &p("tls.crt")]).contains("OK"));
    let text = openssl(&["x509", "-in", &p("tls.crt"), "-noout", "-text"]);
    assert!(text.contains("DNS:web.apps.svc"), "{text}");
    assert!(text.contains("IP Address:10.0.0.5"), "{text}");
    assert!(
        text.contains("Subject: CN = web-tls") || text.contains("Subject: CN=web-tls"),
        "{text}"
    );
    assert!(text.contains("TLS Web Server Authentication"), "{text}");
    let cert_pub = openssl(&["x509", "-in", &p("tls.crt"), "-noout", "-pubkey"]);
    let key_pub = openssl(&["pkey", "-in", &p("tls.key"), "-pubout"]);
    assert_eq!(cert_pub, key_pub, "the key is the certificate's");
    let ca = env.ok(&["ca", "export", "web-ca"]);
    assert_eq!(String::from_utf8_lossy(&got["ca.crt"]).trim(), ca.trim());

    // kubectl's own TLS Secret from the same files has the same data.
    let out = Command::new("kubectl")
        .env("KUBECONFIG", "/nonexistent")
        .env("HOME", dir)
        .args(["create", "secret", "tls", "web-tls", "-n", "apps"])
        .arg(format!("--cert={}", p("tls.crt")))
        .arg(format!("--key={}", p("tls.key")))
        .args(["--dry-run=client", "-o", "json"])
        .output()
        .expect("kubectl create secret tls");
    assert!(out.status.success(), "{out:?}");
    let theirs: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(theirs["data"]["tls.crt"], obj["data"]["tls.crt"]);
    assert_eq!(theirs["data"]["tls.key"], obj["data"]["tls.key"]);
    assert_eq!(theirs["type"], obj["type"]);

    // An existing certificate and key kept as secrets make a TLS Secret too.
    env.put("certs/web/crt", &got["tls.crt"]);
    env.put("certs/web/key", &got["tls.key"]);
    let out = env.ok(&[
        "kube-secret",
        "web-tls",
        "-n",
        "apps",
        "--type",
        "kubernetes.io/tls",
        "--from",
        "tls.crt=certs/web/crt",
        "--from",
        "tls.key=certs/web/key",
    ]);
    let again = apply_dry_run(&kubeconfig, dir, out.as_bytes());
    assert_eq!(again["data"]["tls.crt"], obj["data"]["tls.crt"]);
    assert_eq!(again["type"], "kubernetes.io/tls");
}

#[test]
fn every_marked_kube_secret_block_is_run_here() {
    assert_eq!(DOCS.marked(), ["kube-secret"]);
}

#[test]
fn the_kube_secret_commands_in_the_docs_work_as_written() {
    let (env, _daemon) = Env::ready();
    let api = Discovery::start();
    let kubeconfig = api.kubeconfig(env.path());
    env.put("db/prod/password", b"hunter2");
    env.put("db/prod/user", b"app");
    env.ok(&["ca", "create", "kube-prod"]);
    let out = DOCS.run(
        &env,
        "kube-secret",
        &[("KUBECONFIG", kubeconfig.to_str().expect("utf8"))],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("secret/db-creds created (dry run)"), "{text}");
    assert!(text.contains("secret/web-tls created (dry run)"), "{text}");
}
