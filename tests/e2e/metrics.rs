//! The metrics endpoint, scraped and parsed by Python's prometheus_client:
//! what the session did shows in the counters, no secret name appears, and
//! a non-loopback address is refused at start.

use std::path::Path;
use std::process::Command;

use crate::util::Env;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

fn scrape(port: u16) -> serde_json::Value {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new("python3")
        .arg(root.join("tests/python/scrape.py"))
        .arg(format!("http://127.0.0.1:{port}/metrics"))
        .output()
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "scrape.py (pip install prometheus_client): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON")
}

/// The value of the sample in `family` whose labels include `labels`.
fn value(m: &serde_json::Value, family: &str, labels: &[(&str, &str)]) -> f64 {
    m[family]
        .as_array()
        .unwrap_or_else(|| panic!("no family {family}: {m}"))
        .iter()
        .find(|s| labels.iter().all(|(k, v)| s[0][*k] == *v))
        .and_then(|s| s[1].as_f64())
        .unwrap_or(0.0)
}

#[test]
fn the_metrics_endpoint_counts_what_the_session_did_and_names_no_secret() {
    let env = Env::new();
    let port = free_port();
    let daemon = env.start_daemon(&["--metrics-listen", &format!("127.0.0.1:{port}")]);
    env.init();
    let m = scrape(port);
    assert!(
        m["_content_type"]
            .as_str()
            .unwrap_or("")
            .starts_with("text/plain; version=0.0.4")
    );
    assert_eq!(value(&m, "keyholder_unlocked:gauge", &[]), 0.0);

    let wrong = env.file("wrong-pin", "999999\n");
    let out = env.cli(&["unlock", "--pin-file", wrong.to_str().expect("utf8")]);
    assert_eq!(out.status.code(), Some(7));
    env.unlock();
    env.put("db/very-secret-name", b"canary-metrics");
    env.ok(&["secret", "get", "db/very-secret-name"]);
    env.ok(&["ca", "create", "etcd"]);
    env.ok(&[
        "cert",
        "issue",
        "--ca",
        "etcd",
        "--profile",
        "client",
        "--cn",
        "c1",
        "--out-dir",
        env.path().join("c1").to_str().expect("utf8"),
    ]);
    env.ok(&["key", "generate", "deploy", "--type", "ed25519", "--sign"]);
    let data = env.file("data", "x");
    env.ok(&[
        "sign",
        "--key",
        "deploy",
        "--in",
        data.to_str().expect("utf8"),
    ]);

    let m = scrape(port);
    assert_eq!(value(&m, "keyholder_unlocked:gauge", &[]), 1.0);
    assert!(value(&m, "keyholder_vault_generation:gauge", &[]) >= 1.0);
    assert_eq!(value(&m, "keyholder_unlock_failures:counter", &[]), 1.0);
    let requests = "keyholder_requests:counter";
    assert_eq!(
        value(&m, requests, &[("op", "Secrets.Get"), ("outcome", "ok")]),
        1.0
    );
    assert_eq!(
        value(
            &m,
            requests,
            &[("op", "Session.Unlock"), ("outcome", "failed")]
        ),
        1.0
    );
    assert_eq!(
        value(
            &m,
            "keyholder_issued:counter",
            &[("issuer", "etcd"), ("profile", "client")]
        ),
        1.0
    );
    assert_eq!(
        value(
            &m,
            "keyholder_signatures:counter",
            &[("key", "deploy"), ("via", "grpc")]
        ),
        1.0
    );
    env.ok(&["lock"]);
    let m = scrape(port);
    assert_eq!(value(&m, "keyholder_unlocked:gauge", &[]), 0.0);
    assert_eq!(
        value(&m, "keyholder_locks:counter", &[("reason", "request")]),
        1.0
    );
    let text = m.to_string();
    assert!(!text.contains("very-secret-name"), "{text}");
    assert!(!text.contains("canary"), "{text}");
    // A page in a browser reaching the port under a rebound name gets
    // nothing.
    let rebound = Command::new("python3")
        .args([
            "-c",
            "import http.client, sys\n\
             c = http.client.HTTPConnection('127.0.0.1', int(sys.argv[1]), timeout=10)\n\
             c.request('GET', '/metrics', headers={'Host': 'evil.example'})\n\
             print(c.getresponse().status, end='')",
        ])
        .arg(port.to_string())
        .output()
        .expect("python3");
    assert_eq!(
        String::from_utf8_lossy(&rebound.stdout),
        "421",
        "{rebound:?}"
    );
    // A second daemon whose metrics port is taken still serves its socket.
    let other = Env::new();
    let second = other.start_daemon(&["--metrics-listen", &format!("127.0.0.1:{port}")]);
    other.init();
    assert!(other.ok(&["status"]).contains("locked"));
    drop(second);
    drop(daemon);

    // Metrics only on loopback.
    let module = env.module.to_str().expect("utf8").to_owned();
    let out = env.run_daemon_to_exit(&[
        "--pkcs11-module",
        &module,
        "--metrics-listen",
        "0.0.0.0:9464",
    ]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("loopback"), "{stderr}");
}
