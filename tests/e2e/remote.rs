//! The TCP listener with mutual TLS, from the outside: a Python grpcio tool
//! with a Keyholder-issued client certificate gets what the policy grants
//! its certificate (a kubeconfig kubectl uses) and nothing else, never
//! Unlock; `openssl s_client` without a certificate, with one from another
//! CA, an expired one or a denied serial is refused in the handshake and
//! the refusal logged; and the kubectl exec plugin works on "another
//! machine" (another HOME, no socket) through the listener.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::kube::{ApiServer, kubectl};
use crate::util::{Daemon, Env, assert_fails};

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

/// A daemon with the TCP listener on, unlocked, with the client CA, a
/// cluster `prod` served by a test API server, and a client certificate
/// `ci-runner` in `dir/ci`.
struct Remote {
    env: Env,
    daemon: Daemon,
    port: u16,
    api: ApiServer,
    ci: PathBuf,
}

impl Remote {
    fn start() -> Self {
        Self::start_with("")
    }

    /// With `config` as keyholderd.toml.
    fn start_with(config: &str) -> Self {
        let env = Env::new();
        let port = free_port();
        let listen = format!("127.0.0.1:{port}");
        let config = env.file("keyholderd.toml", config);
        let daemon = env.start_daemon(&["--config", p(&config), "--listen-tcp", &listen]);
        env.init();
        env.unlock();
        env.put("db/prod", b"canary-remote-1");
        env.ok(&["ca", "create", "admin-clients"]);
        let api = crate::kube::prod_cluster(&env, &env.path().join("kube"));
        let ci = env.path().join("ci");
        env.ok(&[
            "client",
            "issue",
            "--ca",
            "admin-clients",
            "--name",
            "ci-runner",
            "--ttl",
            "1h",
            "--out-dir",
            p(&ci),
        ]);
        let remote = Self {
            env,
            daemon,
            port,
            api,
            ci,
        };
        remote.set_policy("");
        remote.wait_for_listener();
        remote
    }

    fn set_policy(&self, extra: &str) {
        let policy = self.env.file(
            "remote-policy.toml",
            &format!(
                "default = \"allow\"\n{extra}\n[[rule]]\nname = \"ci\"\nclients = [\"ci-runner\"]\n\
                 allow = [\"kubeconfig:prod:ci\"]\nmax_ttl = \"15m\"\n"
            ),
        );
        self.env.ok(&[
            "policy",
            "set",
            p(&policy),
            "--pin-file",
            p(&self.env.pin_file),
        ]);
    }

    /// s_client with `cert`/`key` (or none); returns its output and
    /// status.
    fn s_client(&self, client: Option<(&Path, &Path)>) -> (bool, String) {
        let mut c = Command::new("openssl");
        c.args(["s_client", "-connect"])
            .arg(format!("127.0.0.1:{}", self.port))
            .args(["-tls1_3", "-servername", "localhost", "-CAfile"])
            .arg(self.ci.join("server-ca.pem"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some((cert, key)) = client {
            c.arg("-cert").arg(cert).arg("-key").arg(key);
        }
        let mut child = c.spawn().expect("openssl runs");
        // An HTTP/2 preface: a server that accepted the client answers it;
        // one that refused it has already sent its alert.
        if let Some(mut stdin) = child.stdin.take() {
            use std::io::Write;
            let _ = stdin.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
        }
        let out = crate::util::output_within_waiting(child, Duration::from_secs(20))
            .expect("s_client finishes");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    }

    /// `keyholder --remote ... status` with the ci-runner certificate: a
    /// client the listener accepted gets an answer.
    fn remote_status(&self) -> std::process::Output {
        let mut c = Command::new(crate::util::keyholder_bin());
        c.args(["--remote", &format!("https://localhost:{}", self.port)])
            .arg("--remote-cert")
            .arg(self.ci.join("cert.pem"))
            .arg("--remote-key")
            .arg(self.ci.join("key.pem"))
            .arg("--remote-ca")
            .arg(self.ci.join("server-ca.pem"))
            .arg("status")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        crate::util::output_within(c, Duration::from_secs(30)).expect("keyholder finishes")
    }

    fn wait_for_listener(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let out = self.remote_status();
            let text = String::from_utf8_lossy(&out.stderr).into_owned();
            if out.status.success() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the TCP listener never completed a handshake: {text}\n{}",
                self.daemon.log_text()
            );
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    fn refusals(&self) -> usize {
        self.daemon
            .log_text()
            .lines()
            .filter(|l| l.contains("refused in the TLS handshake"))
            .count()
    }
}

#[test]
fn a_python_tool_with_a_keyholder_client_certificate_gets_only_what_policy_grants_it() {
    let r = Remote::start();
    let stubs = crate::python::generate_stubs(&r.env);
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let kubeconfig = r.env.path().join("remote.kubeconfig");
    let out = Command::new("python3")
        .arg(root.join("tests/python/tcp_client.py"))
        .arg(format!("127.0.0.1:{}", r.port))
        .arg(r.ci.join("server-ca.pem"))
        .arg(r.ci.join("cert.pem"))
        .arg(r.ci.join("key.pem"))
        .arg(&stubs)
        .arg(&kubeconfig)
        .output()
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "tcp_client.py: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(v["health"], "OK", "{v}");
    assert_eq!(v["health_status"], "SERVING", "{v}");
    assert_eq!(v["kubeconfig"], "OK", "{v}");
    assert_eq!(v["kubeconfig_admin"], "PERMISSION_DENIED", "{v}");
    assert_eq!(v["secret"], "PERMISSION_DENIED", "{v}");
    assert!(!v.to_string().contains("canary"), "{v}");
    assert_eq!(v["unlock"], "PERMISSION_DENIED", "{v}");
    assert!(
        v["unlock_message"]
            .as_str()
            .unwrap_or_default()
            .contains("not served over TCP"),
        "{v}"
    );
    assert_eq!(v["lock"], "PERMISSION_DENIED", "{v}");
    assert_eq!(v["set_policy"], "UNIMPLEMENTED", "{v}");
    // Still unlocked: nothing from the network locked it.
    assert!(r.env.ok(&["status"]).contains("unlocked"));
    let dir = r.env.path().join("kube");
    let out = kubectl(&kubeconfig, &dir).output().expect("kubectl runs");
    assert!(
        out.status.success(),
        "kubectl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(r.api.seen.lock().expect("seen").iter().any(|cn| cn == "ci"));
}

#[test]
fn handshakes_without_a_valid_client_certificate_are_refused_and_logged() {
    let r = Remote::start();
    let good = (r.ci.join("cert.pem"), r.ci.join("key.pem"));
    let before = r.refusals();
    let (_, text) = r.s_client(Some((&good.0, &good.1)));
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        r.refusals(),
        before,
        "the good certificate was refused: {text}"
    );
    let mut refused = r.refusals();
    let mut expect_refused = |what: &str, text: &str| {
        let deadline = Instant::now() + Duration::from_secs(10);
        while r.refusals() == refused && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        assert_eq!(
            r.refusals(),
            refused + 1,
            "{what}: not refused in the handshake\n{text}\n{}",
            r.daemon.log_text()
        );
        refused += 1;
    };

    // No certificate at all.
    let (_, text) = r.s_client(None);
    expect_refused("no certificate", &text);

    // A certificate from another CA.
    r.env.ok(&["ca", "create", "impostor"]);
    let other = r.env.path().join("other");
    r.env.ok(&[
        "client",
        "issue",
        "--ca",
        "impostor",
        "--name",
        "ci-runner",
        "--out-dir",
        p(&other),
    ]);
    let (_, text) = r.s_client(Some((&other.join("cert.pem"), &other.join("key.pem"))));
    expect_refused("another CA", &text);

    // An expired certificate.
    let short = r.env.path().join("short");
    r.env.ok(&[
        "client",
        "issue",
        "--ca",
        "admin-clients",
        "--name",
        "ci-runner",
        "--ttl",
        "1s",
        "--out-dir",
        p(&short),
    ]);
    // Issued certificates are backdated by the clock skew allowance; one of
    // 1s is past its end two seconds later.
    std::thread::sleep(Duration::from_secs(3));
    let (_, text) = r.s_client(Some((&short.join("cert.pem"), &short.join("key.pem"))));
    expect_refused("expired", &text);

    // A serial on the policy's deny list.
    let serial = {
        let out = Command::new("openssl")
            .args(["x509", "-noout", "-serial", "-in"])
            .arg(&good.0)
            .output()
            .expect("openssl");
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .trim_start_matches("serial=")
            .to_owned()
    };
    r.set_policy(&format!("deny_serials = [\"{serial}\"]"));
    let (_, text) = r.s_client(Some((&good.0, &good.1)));
    expect_refused("denied serial", &text);
    let log = r.daemon.log_text();
    assert!(
        log.contains("peer=127.0.0.1:"),
        "refusals name the peer: {log}"
    );
}

#[test]
fn the_kubectl_exec_plugin_on_another_machine_reaches_keyholder_over_tcp() {
    let r = Remote::start();
    // "Another machine": another HOME and runtime directory, no socket.
    let elsewhere = r.env.path().join("elsewhere");
    std::fs::create_dir_all(elsewhere.join("run")).expect("dir");
    let kubeconfig = elsewhere.join("exec.kubeconfig");
    let server = format!("https://127.0.0.1:{}", r.port);
    let out = Command::new(crate::util::keyholder_bin())
        .env("HOME", &elsewhere)
        .env("XDG_RUNTIME_DIR", elsewhere.join("run"))
        .env_remove("KEYHOLDER_SOCKET")
        .args(["--remote", &server, "--remote-cert"])
        .arg(r.ci.join("cert.pem"))
        .arg("--remote-key")
        .arg(r.ci.join("key.pem"))
        .arg("--remote-ca")
        .arg(r.ci.join("server-ca.pem"))
        .args([
            "kubeconfig",
            "prod",
            "--user",
            "ci",
            "--exec",
            "--exec-api-version",
            "v1beta1",
            "--out",
        ])
        .arg(&kubeconfig)
        .output()
        .expect("keyholder runs");
    assert!(
        out.status.success(),
        "remote kubeconfig: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&kubeconfig).expect("kubeconfig");
    assert!(text.contains("--remote"), "{text}");
    assert!(!text.contains("--socket"), "{text}");
    let out = kubectl(&kubeconfig, &elsewhere)
        .env("XDG_RUNTIME_DIR", elsewhere.join("run"))
        .output()
        .expect("kubectl runs");
    assert!(
        out.status.success(),
        "kubectl through the exec plugin over TCP: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(r.api.seen.lock().expect("seen").iter().any(|cn| cn == "ci"));
}

#[test]
fn connections_that_never_finish_a_handshake_do_not_hold_the_listener() {
    let r = Remote::start_with("[tcp]\nmax_connections = 16\nhandshake_timeout = \"3s\"\n");
    let addr = format!("127.0.0.1:{}", r.port);
    // A slowloris: three times as many connections as there are slots, each
    // sending one byte of a ClientHello and then nothing.
    let mut held = Vec::new();
    for _ in 0..48 {
        let mut s = std::net::TcpStream::connect(&addr).expect("connect");
        use std::io::Write;
        let _ = s.write_all(&[0x16]);
        held.push(s);
    }
    // An honest client still gets through, at once: a connection that has
    // not finished its handshake gives way to a new one.
    let t = Instant::now();
    let out = r.remote_status();
    assert!(
        out.status.success(),
        "the honest client was not served: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "the honest client waited {:?}",
        t.elapsed()
    );
    // The local socket is served meanwhile.
    assert!(r.env.ok(&["status"]).contains("unlocked"));
    // The held connections are closed: evicted, or at the handshake deadline.
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut closed = 0;
    for mut s in held {
        use std::io::Read;
        let left = deadline.saturating_duration_since(Instant::now());
        s.set_read_timeout(Some(left.max(Duration::from_millis(10))))
            .expect("timeout");
        let mut buf = [0u8; 64];
        // Until the server closes it (an alert may come first).
        loop {
            match s.read(&mut buf) {
                Ok(0) => {
                    closed += 1;
                    break;
                }
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    break;
                }
                Err(_) => {
                    closed += 1;
                    break;
                }
            }
        }
    }
    assert_eq!(closed, 48, "every stalled connection is closed");
    assert!(
        r.daemon
            .log_text()
            .contains("no TLS handshake within the deadline"),
        "{}",
        r.daemon.log_text()
    );
}

/// The serial of the certificate the listener presents.
fn listener_serial(r: &Remote) -> String {
    let (_, text) = r.s_client(Some((&r.ci.join("cert.pem"), &r.ci.join("key.pem"))));
    let pem_start = text
        .find("-----BEGIN CERTIFICATE-----")
        .expect("server certificate shown");
    let pem_end = text[pem_start..]
        .find("-----END CERTIFICATE-----")
        .expect("end of certificate")
        + pem_start
        + "-----END CERTIFICATE-----".len();
    let pem = r.env.file("listener.pem", &text[pem_start..pem_end]);
    let out = Command::new("openssl")
        .args(["x509", "-noout", "-serial", "-in"])
        .arg(&pem)
        .output()
        .expect("openssl");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[test]
fn the_listener_certificate_is_renewed_before_it_expires_and_made_anew_at_unlock() {
    let r = Remote::start_with("[tcp]\nserver_cert_ttl = \"1m\"\n");
    let first = listener_serial(&r);
    // Renewed when a third of its minute is left: within about 40 s.
    let deadline = Instant::now() + Duration::from_secs(70);
    let mut renewed = first.clone();
    while renewed == first && Instant::now() < deadline {
        std::thread::sleep(Duration::from_secs(2));
        renewed = listener_serial(&r);
    }
    assert_ne!(renewed, first, "the listener certificate was not renewed");
    assert!(
        r.daemon
            .log_text()
            .matches("TCP listener certificate issued")
            .count()
            >= 2
    );
    // Locked, no handshake completes; unlocked again, a new certificate.
    r.env.ok(&["lock"]);
    let (_, text) = r.s_client(Some((&r.ci.join("cert.pem"), &r.ci.join("key.pem"))));
    assert!(text.contains("no peer certificate available"), "{text}");
    r.env.unlock();
    r.wait_for_listener();
    assert_ne!(listener_serial(&r), renewed);
}

#[test]
fn a_remote_profile_in_the_cli_config_sends_every_command_to_the_listener() {
    let r = Remote::start();
    let elsewhere = r.env.path().join("bastion");
    let config = elsewhere.join("config/keyholder");
    std::fs::create_dir_all(&config).expect("config dir");
    std::fs::create_dir_all(elsewhere.join("run")).expect("run dir");
    for f in ["cert.pem", "key.pem", "server-ca.pem"] {
        std::fs::copy(r.ci.join(f), config.join(f)).expect("copy");
    }
    std::fs::write(
        config.join("cli.toml"),
        format!(
            "[remote]\nurl = \"https://localhost:{}\"\ncert = \"cert.pem\"\nkey = \"key.pem\"\nca = \"server-ca.pem\"\n",
            r.port
        ),
    )
    .expect("cli.toml");
    let run = |args: &[&str]| {
        Command::new(crate::util::keyholder_bin())
            .env("HOME", &elsewhere)
            .env("XDG_CONFIG_HOME", elsewhere.join("config"))
            .env("XDG_RUNTIME_DIR", elsewhere.join("run"))
            .env_remove("KEYHOLDER_SOCKET")
            .args(args)
            .output()
            .expect("keyholder runs")
    };
    // No socket here: status answers from the listener.
    let out = run(&["status"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("unlocked"));
    // What the policy does not grant ci-runner is refused remotely too.
    let out = run(&["secret", "get", "db/prod"]);
    assert_eq!(out.status.code(), Some(7), "{out:?}");
    // What takes the PIN or changes who may do what is refused before
    // anything is asked or sent: the PIN never leaves this machine.
    for args in [
        &["lock"][..],
        &["unlock", "--pin-file", "/nonexistent/pin"],
        &["policy", "get"],
        &["grant", "list"],
    ] {
        let out = run(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {out:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr)
                .contains("only for the machine keyholderd runs on"),
            "{out:?}"
        );
    }
    assert!(r.env.ok(&["status"]).contains("unlocked"));
    // A client key others may read is refused, as ssh refuses one.
    use std::os::unix::fs::PermissionsExt;
    let key = config.join("key.pem");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let out = run(&["status"]);
    assert_eq!(out.status.code(), Some(6), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("others may read it"),
        "{out:?}"
    );
}

#[test]
fn a_connection_made_before_a_lock_gets_nothing_after_it() {
    let r = Remote::start();
    let stubs = crate::python::generate_stubs(&r.env);
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let (ready, go) = (r.env.path().join("ready"), r.env.path().join("go"));
    let child = Command::new("python3")
        .arg(root.join("tests/python/tcp_hold.py"))
        .arg(format!("127.0.0.1:{}", r.port))
        .arg(r.ci.join("server-ca.pem"))
        .arg(r.ci.join("cert.pem"))
        .arg(r.ci.join("key.pem"))
        .arg(&stubs)
        .arg(&ready)
        .arg(&go)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 runs");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !ready.exists() {
        assert!(Instant::now() < deadline, "the script never connected");
        std::thread::sleep(Duration::from_millis(100));
    }
    // Lock and unlock while the script holds its connection open.
    r.env.ok(&["lock"]);
    r.env.unlock();
    r.wait_for_listener();
    std::fs::write(&go, "go").expect("go");
    let out = crate::util::output_within_waiting(child, Duration::from_secs(90))
        .expect("the script finishes");
    assert!(
        out.status.success(),
        "tcp_hold.py: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(v["before"], "OK", "{v}");
    assert_eq!(v["after"], "PERMISSION_DENIED", "{v}");
    assert!(
        v["after_message"]
            .as_str()
            .unwrap_or_default()
            .contains("locked since this connection was made"),
        "{v}"
    );
}

/// The listener's CAs issue through the API only what cannot pass for the
/// listener or log in as another client: a server or peer certificate from
/// the client CA (it would carry clientAuth under any name) is refused, so
/// is one for a listener name, and a client certificate is still issued.
#[test]
fn the_listener_cas_do_not_issue_certificates_that_could_pass_for_a_client_or_the_listener() {
    let r = Remote::start();
    for (profile, cn, san) in [
        ("server", "ci-runner", "ci.example"),
        ("peer", "ci-runner", "ci.example"),
        ("server", "impostor", "localhost"),
    ] {
        let out = r.env.cli(&[
            "cert",
            "issue",
            "--ca",
            "admin-clients",
            "--profile",
            profile,
            "--cn",
            cn,
            "--san",
            san,
            "--ttl",
            "1h",
            "--out-dir",
            p(&r.env.path().join("minted")),
        ]);
        assert_fails(&out, 7, "tcp.client_ca");
        assert!(!r.env.path().join("minted/key.pem").exists());
    }
    let out = r.env.cli(&[
        "cert",
        "issue",
        "--ca",
        "admin-clients",
        "--profile",
        "client",
        "--cn",
        "ops",
        "--ttl",
        "1h",
        "--out-dir",
        p(&r.env.path().join("ops")),
    ]);
    assert!(out.status.success(), "{out:?}");
}
