//! `keyholder cluster pki` and `cluster certs`: a 3-member etcd cluster on
//! loopback forms with the peer and client certificates it writes and takes
//! the API server's etcd client certificate; every certificate meets its
//! component's requirements (openssl); every kubeconfig authenticates with
//! kubectl as its component's user and groups against a test API server
//! serving the written apiserver certificate; a second run changes no
//! file; `--renew` replaces exactly what expires; `cluster certs` exits 11
//! when something expires within the window; and the docs' commands run as
//! written.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use base64::Engine;
use base64::prelude::BASE64_STANDARD;

use crate::kube::{ApiServer, Running};
use crate::util::{DocBlocks, Env, assert_fails, assert_ok};

const DOCS: DocBlocks = DocBlocks {
    path: "docs/kubernetes.md",
    text: include_str!("../../docs/kubernetes.md"),
    mark: "<!-- run by tests/e2e/cluster_pki.rs: ",
};

fn p(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
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

fn json(env: &Env, args: &[&str]) -> serde_json::Value {
    let mut a = vec!["--json"];
    a.extend_from_slice(args);
    serde_json::from_str(&env.ok(&a)).expect("JSON")
}

/// Every file under `dir`: relative path -> (bytes, mtime).
fn snapshot(dir: &Path) -> BTreeMap<String, (Vec<u8>, SystemTime)> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("read dir") {
            let e = e.expect("entry");
            let path = e.path();
            if path.is_dir() {
                stack.push(path);
            } else {
                let rel = path
                    .strip_prefix(dir)
                    .expect("under")
                    .to_string_lossy()
                    .into_owned();
                let mtime = e.metadata().expect("meta").modified().expect("mtime");
                out.insert(rel, (std::fs::read(&path).expect("read"), mtime));
            }
        }
    }
    out
}

/// The files whose bytes or mtime differ between two snapshots.
fn changed(
    a: &BTreeMap<String, (Vec<u8>, SystemTime)>,
    b: &BTreeMap<String, (Vec<u8>, SystemTime)>,
) -> Vec<String> {
    let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .filter(|k| a.get(*k) != b.get(*k))
        .cloned()
        .collect()
}

/// A spec on loopback: one control-plane host, `workers`, and `members`
/// etcd members, all at 127.0.0.1; the API server at `server`.
fn loopback_spec(env: &Env, server: &str, workers: &[&str], members: &[&str]) -> PathBuf {
    let mut s = format!(
        "server = \"{server}\"\nservice_ip = \"10.96.0.1\"\ndomain = \"lab.local\"\n\
         apiserver_sans = [\"k8s.lab.example\"]\n\n[[control_plane]]\nname = \"cp-1\"\naddresses = [\"127.0.0.1\"]\n"
    );
    for (i, w) in workers.iter().enumerate() {
        s.push_str(&format!(
            "[[workers]]\nname = \"{w}\"\naddresses = [\"127.0.1.{}\", \"{w}.lab.example\"]\n",
            i + 1
        ));
    }
    for m in members {
        s.push_str(&format!(
            "[[etcd]]\nname = \"{m}\"\naddresses = [\"127.0.0.1\"]\n"
        ));
    }
    env.file("cluster.toml", &s)
}

fn etcdctl(dir: &Path, endpoints: &str, client: &str, args: &[&str]) -> std::process::Output {
    Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .args([
            "--endpoints",
            endpoints,
            "--dial-timeout",
            "3s",
            "--command-timeout",
            "5s",
            "--cacert",
        ])
        .arg(dir.join("pki/etcd/ca.crt"))
        .arg("--cert")
        .arg(dir.join(format!("pki/{client}.crt")))
        .arg("--key")
        .arg(dir.join(format!("pki/{client}.key")))
        .args(args)
        .output()
        .expect("etcdctl runs (apt-get install etcd-client)")
}

#[test]
fn a_three_member_etcd_cluster_forms_with_cluster_pki_certificates() {
    let (env, _daemon) = Env::ready();
    let members = ["etcd-a", "etcd-b", "etcd-c"];
    let spec = loopback_spec(&env, "https://127.0.0.1:6443", &[], &members);
    let dir = env.path().join("lab");
    env.ok(&[
        "cluster",
        "pki",
        "lab",
        "--spec",
        p(&spec),
        "--out-dir",
        p(&dir),
    ]);

    let ports: Vec<(u16, u16)> = members.iter().map(|_| (free_port(), free_port())).collect();
    let initial: Vec<String> = members
        .iter()
        .zip(&ports)
        .map(|(m, (_, peer))| format!("{m}=https://127.0.0.1:{peer}"))
        .collect();
    let mut running = Vec::new();
    for (m, (client, peer)) in members.iter().zip(&ports) {
        let node = dir.join(format!("nodes/{m}/pki/etcd"));
        let client_url = format!("https://127.0.0.1:{client}");
        let peer_url = format!("https://127.0.0.1:{peer}");
        let child = Command::new("etcd")
            .args(["--name", m, "--data-dir"])
            .arg(env.path().join(format!("data-{m}")))
            .args(["--listen-client-urls", &client_url])
            .args(["--advertise-client-urls", &client_url])
            .args(["--listen-peer-urls", &peer_url])
            .args(["--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &initial.join(",")])
            .args(["--initial-cluster-state", "new"])
            .args(["--initial-cluster-token", "keyholder-lab"])
            .arg("--client-cert-auth")
            .arg("--trusted-ca-file")
            .arg(node.join("ca.crt"))
            .arg("--cert-file")
            .arg(node.join("server.crt"))
            .arg("--key-file")
            .arg(node.join("server.key"))
            .arg("--peer-client-cert-auth")
            .arg("--peer-trusted-ca-file")
            .arg(node.join("ca.crt"))
            .arg("--peer-cert-file")
            .arg(node.join("peer.crt"))
            .arg("--peer-key-file")
            .arg(node.join("peer.key"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(env.path().join(format!("{m}.log"))).expect("log"))
            .spawn()
            .expect("etcd runs (apt-get install etcd-server)");
        running.push(Running(child));
    }
    let endpoints: Vec<String> = ports
        .iter()
        .map(|(c, _)| format!("https://127.0.0.1:{c}"))
        .collect();
    let endpoints = endpoints.join(",");
    let logs = || {
        members
            .iter()
            .map(|m| {
                std::fs::read_to_string(env.path().join(format!("{m}.log"))).unwrap_or_default()
            })
            .collect::<Vec<_>>()
            .join("\n---\n")
    };
    // All three members healthy over mutual TLS (bounded wait).
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let out = etcdctl(
            &dir,
            &endpoints,
            "etcd/healthcheck-client",
            &["endpoint", "health"],
        );
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        if out.status.success() && text.matches("is healthy").count() == 3 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the cluster never became healthy: {text}\n{}",
            logs()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    let out = etcdctl(
        &dir,
        &endpoints,
        "etcd/healthcheck-client",
        &["member", "list", "-w", "json"],
    );
    assert!(out.status.success(), "{out:?}");
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).expect("member list JSON");
    let mut names: Vec<&str> = list["members"]
        .as_array()
        .expect("members")
        .iter()
        .map(|m| m["name"].as_str().unwrap_or(""))
        .collect();
    names.sort();
    assert_eq!(names, members, "{list}");
    for m in list["members"].as_array().expect("members") {
        assert!(
            m["peerURLs"][0]
                .as_str()
                .is_some_and(|u| u.starts_with("https://")),
            "peers talk TLS: {m}"
        );
    }

    // The API server's etcd client certificate is accepted for reads and writes.
    let out = etcdctl(
        &dir,
        &endpoints,
        "apiserver-etcd-client",
        &["put", "/registry/keyholder", "works"],
    );
    assert!(out.status.success(), "{out:?}");
    let out = etcdctl(
        &dir,
        &endpoints,
        "apiserver-etcd-client",
        &["get", "/registry/keyholder", "--print-value-only"],
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "works");
    // A certificate of the cluster CA (not the etcd CA) is not.
    let out = etcdctl(
        &dir,
        &endpoints,
        "apiserver-kubelet-client",
        &["get", "/registry/keyholder"],
    );
    assert!(
        !out.status.success(),
        "the cluster CA's client reached etcd: {out:?}"
    );
    drop(running);
}

/// What openssl says of a PEM certificate: subject, SANs, EKUs, key usage.
struct Seen {
    subject: String,
    sans: Vec<String>,
    eku: String,
    key_usage: String,
}

fn seen(pem_file: &Path) -> Seen {
    let text = openssl(&[
        "x509",
        "-in",
        p(pem_file),
        "-noout",
        "-subject",
        "-nameopt",
        "sep_comma_plus,sname",
        "-ext",
        "subjectAltName,extendedKeyUsage,keyUsage",
    ]);
    let mut lines = text.lines();
    let subject = lines
        .next()
        .and_then(|l| l.strip_prefix("subject="))
        .expect("subject line")
        .trim()
        .to_owned();
    let mut s = Seen {
        subject,
        sans: Vec::new(),
        eku: String::new(),
        key_usage: String::new(),
    };
    let mut section = "";
    for l in lines {
        let t = l.trim();
        if t.starts_with("X509v3 Subject Alternative Name") {
            section = "san";
        } else if t.starts_with("X509v3 Extended Key Usage") {
            section = "eku";
        } else if t.starts_with("X509v3 Key Usage") {
            section = "ku";
        } else {
            match section {
                "san" => s.sans.extend(t.split(", ").map(str::to_owned)),
                "eku" => s.eku = t.to_owned(),
                "ku" => s.key_usage = t.to_owned(),
                _ => {}
            }
        }
    }
    s.sans.sort();
    s
}

/// The client certificate embedded in a kubeconfig, written next to it.
fn kubeconfig_cert(conf: &Path) -> PathBuf {
    let text = std::fs::read_to_string(conf).expect("kubeconfig");
    let field = |name: &str| -> Vec<u8> {
        let line = text
            .lines()
            .find_map(|l| l.trim().strip_prefix(&format!("{name}: ")))
            .unwrap_or_else(|| panic!("{name} in {}", conf.display()));
        BASE64_STANDARD
            .decode(line.trim_matches('"'))
            .expect("base64")
    };
    let out = conf.with_extension("client.pem");
    std::fs::write(&out, field("client-certificate-data")).expect("write");
    out
}

const SERVER_AND_CLIENT: &str = "TLS Web Server Authentication, TLS Web Client Authentication";
const CLIENT: &str = "TLS Web Client Authentication";

#[test]
fn every_certificate_meets_its_requirements_and_every_kubeconfig_authenticates() {
    let (env, _daemon) = Env::ready();
    let port = free_port();
    let server = format!("https://127.0.0.1:{port}");
    let spec = loopback_spec(&env, &server, &["w-1", "w-2"], &["etcd-a"]);
    let dir = env.path().join("lab");
    env.ok(&[
        "cluster",
        "pki",
        "lab",
        "--spec",
        p(&spec),
        "--out-dir",
        p(&dir),
    ]);

    let sans = |v: &[&str]| {
        let mut v: Vec<String> = v.iter().map(|s| (*s).to_owned()).collect();
        v.sort();
        v
    };
    // file, issuing CA file, subject, EKU, SANs.
    let table: Vec<(&str, &str, &str, &str, Vec<String>)> = vec![
        (
            "pki/apiserver.crt",
            "pki/ca.crt",
            "CN=kube-apiserver",
            SERVER_AND_CLIENT,
            sans(&[
                "DNS:cp-1",
                "DNS:kubernetes",
                "DNS:kubernetes.default",
                "DNS:kubernetes.default.svc",
                "DNS:kubernetes.default.svc.lab.local",
                "DNS:k8s.lab.example",
                "IP Address:127.0.0.1",
                "IP Address:10.96.0.1",
            ]),
        ),
        (
            "pki/apiserver-kubelet-client.crt",
            "pki/ca.crt",
            "CN=kube-apiserver-kubelet-client,O=system:masters",
            CLIENT,
            vec![],
        ),
        (
            "pki/apiserver-etcd-client.crt",
            "pki/etcd/ca.crt",
            "CN=kube-apiserver-etcd-client",
            CLIENT,
            vec![],
        ),
        (
            "pki/etcd/healthcheck-client.crt",
            "pki/etcd/ca.crt",
            "CN=kube-etcd-healthcheck-client",
            CLIENT,
            vec![],
        ),
        (
            "pki/front-proxy-client.crt",
            "pki/front-proxy-ca.crt",
            "CN=front-proxy-client",
            CLIENT,
            vec![],
        ),
        (
            "admin.client.pem",
            "pki/ca.crt",
            "CN=kubernetes-admin,O=system:masters",
            CLIENT,
            vec![],
        ),
        (
            "controller-manager.client.pem",
            "pki/ca.crt",
            "CN=system:kube-controller-manager",
            CLIENT,
            vec![],
        ),
        (
            "scheduler.client.pem",
            "pki/ca.crt",
            "CN=system:kube-scheduler",
            CLIENT,
            vec![],
        ),
        (
            "kube-proxy.client.pem",
            "pki/ca.crt",
            "CN=system:kube-proxy,O=system:node-proxier",
            CLIENT,
            vec![],
        ),
        (
            "nodes/cp-1/pki/kubelet.crt",
            "pki/ca.crt",
            "CN=system:node:cp-1,O=system:nodes",
            SERVER_AND_CLIENT,
            sans(&["DNS:cp-1", "IP Address:127.0.0.1"]),
        ),
        (
            "nodes/w-1/pki/kubelet.crt",
            "pki/ca.crt",
            "CN=system:node:w-1,O=system:nodes",
            SERVER_AND_CLIENT,
            sans(&["DNS:w-1", "DNS:w-1.lab.example", "IP Address:127.0.1.1"]),
        ),
        (
            "nodes/w-2/kubelet.client.pem",
            "pki/ca.crt",
            "CN=system:node:w-2,O=system:nodes",
            SERVER_AND_CLIENT,
            sans(&["DNS:w-2", "DNS:w-2.lab.example", "IP Address:127.0.1.2"]),
        ),
        (
            "nodes/etcd-a/pki/etcd/server.crt",
            "pki/etcd/ca.crt",
            "CN=etcd-a",
            SERVER_AND_CLIENT,
            sans(&[
                "DNS:etcd-a",
                "DNS:localhost",
                "IP Address:127.0.0.1",
                "IP Address:0:0:0:0:0:0:0:1",
            ]),
        ),
        (
            "nodes/etcd-a/pki/etcd/peer.crt",
            "pki/etcd/ca.crt",
            "CN=etcd-a",
            SERVER_AND_CLIENT,
            sans(&[
                "DNS:etcd-a",
                "DNS:localhost",
                "IP Address:127.0.0.1",
                "IP Address:0:0:0:0:0:0:0:1",
            ]),
        ),
    ];
    for conf in [
        "admin.conf",
        "controller-manager.conf",
        "scheduler.conf",
        "kube-proxy.conf",
        "nodes/w-2/kubelet.conf",
    ] {
        kubeconfig_cert(&dir.join(conf));
    }
    for (file, ca, subject, eku, want_sans) in &table {
        let path = dir.join(file);
        let s = seen(&path);
        assert_eq!(&s.subject, subject, "{file}");
        assert_eq!(&s.eku, eku, "{file}");
        assert_eq!(&s.sans, want_sans, "{file}");
        assert!(
            s.key_usage.contains("Digital Signature"),
            "{file}: {}",
            s.key_usage
        );
        let verified = openssl(&["verify", "-CAfile", p(&dir.join(ca)), p(&path)]);
        assert!(verified.trim().ends_with(": OK"), "{file}: {verified}");
    }
    // The other CAs do not verify them: three separate CAs.
    let out = Command::new("openssl")
        .args([
            "verify",
            "-CAfile",
            p(&dir.join("pki/ca.crt")),
            p(&dir.join("pki/apiserver-etcd-client.crt")),
        ])
        .output()
        .expect("openssl");
    assert!(!out.status.success());
    // Per-node copies of the CAs.
    for (copy, of) in [
        ("nodes/w-1/pki/ca.crt", "pki/ca.crt"),
        ("nodes/etcd-a/pki/etcd/ca.crt", "pki/etcd/ca.crt"),
    ] {
        assert_eq!(
            std::fs::read(dir.join(copy)).expect("copy"),
            std::fs::read(dir.join(of)).expect("ca")
        );
    }
    // Keys and kubeconfigs are the user's alone.
    use std::os::unix::fs::PermissionsExt;
    for f in [
        "pki/apiserver.key",
        "pki/sa.key",
        "admin.conf",
        "nodes/w-1/kubelet.conf",
        "nodes/etcd-a/pki/etcd/peer.key",
    ] {
        let mode = std::fs::metadata(dir.join(f))
            .expect("meta")
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600, "{f}");
    }
    // The service-account key pair is a real pair: sa.pub is sa.key's public half.
    let derived = openssl(&["pkey", "-in", p(&dir.join("pki/sa.key")), "-pubout"]);
    assert_eq!(
        derived,
        std::fs::read_to_string(dir.join("pki/sa.pub")).expect("sa.pub")
    );
    let sig = env.path().join("sig");
    let data = env.file("data", "a token");
    openssl(&[
        "dgst",
        "-sha256",
        "-sign",
        p(&dir.join("pki/sa.key")),
        "-out",
        p(&sig),
        p(&data),
    ]);
    let ok = openssl(&[
        "dgst",
        "-sha256",
        "-verify",
        p(&dir.join("pki/sa.pub")),
        "-signature",
        p(&sig),
        p(&data),
    ]);
    assert!(ok.contains("Verified OK"), "{ok}");

    // Every kubeconfig works with kubectl against an API server serving the
    // written apiserver certificate and trusting the cluster CA, and the
    // server sees the component's user and groups.
    let api = ApiServer::start_on(
        port,
        &dir.join("pki/ca.crt"),
        &dir.join("pki/apiserver.crt"),
        &dir.join("pki/apiserver.key"),
    );
    let confs = [
        ("admin.conf", "CN=kubernetes-admin,O=system:masters"),
        (
            "controller-manager.conf",
            "CN=system:kube-controller-manager",
        ),
        ("scheduler.conf", "CN=system:kube-scheduler"),
        (
            "kube-proxy.conf",
            "CN=system:kube-proxy,O=system:node-proxier",
        ),
        (
            "nodes/cp-1/kubelet.conf",
            "CN=system:node:cp-1,O=system:nodes",
        ),
        (
            "nodes/w-1/kubelet.conf",
            "CN=system:node:w-1,O=system:nodes",
        ),
        (
            "nodes/w-2/kubelet.conf",
            "CN=system:node:w-2,O=system:nodes",
        ),
    ];
    for (conf, who) in confs {
        let already = api.seen_certs.lock().expect("seen").len();
        let out = crate::kube::kubectl(&dir.join(conf), env.path())
            .output()
            .expect("kubectl");
        assert!(
            out.status.success(),
            "{conf}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stdout).contains("v1.30.0-keyholder-test"));
        let shown: Vec<Vec<u8>> = api.seen_certs.lock().expect("seen")[already..].to_vec();
        assert!(!shown.is_empty(), "{conf}: no client certificate seen");
        for der in shown {
            let der_file = env.path().join("seen.der");
            std::fs::write(&der_file, der).expect("write");
            let subject = openssl(&[
                "x509",
                "-inform",
                "DER",
                "-in",
                p(&der_file),
                "-noout",
                "-subject",
                "-nameopt",
                "sep_comma_plus,sname",
            ]);
            assert_eq!(subject.trim(), format!("subject={who}"), "{conf}");
        }
    }
    // `keyholder kubeconfig lab` works through the cluster profile it added.
    let alice = env.path().join("alice.kubeconfig");
    env.ok(&["kubeconfig", "lab", "--user", "alice", "--out", p(&alice)]);
    let out = crate::kube::kubectl(&alice, env.path())
        .output()
        .expect("kubectl");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_second_run_changes_nothing_and_renew_replaces_exactly_what_expires() {
    let env = Env::new();
    let metrics_port = free_port();
    let _daemon = env.start_daemon(&["--metrics-listen", &format!("127.0.0.1:{metrics_port}")]);
    env.init();
    env.unlock();
    let spec = loopback_spec(&env, "https://127.0.0.1:6443", &["w-1", "w-2"], &["etcd-a"]);
    let dir = env.path().join("lab");
    let first = json(
        &env,
        &[
            "cluster",
            "pki",
            "lab",
            "--spec",
            p(&spec),
            "--out-dir",
            p(&dir),
        ],
    );
    assert_eq!(first["issued"], 14, "{first}");
    assert_eq!(first["kept"], 0);
    let before = snapshot(&dir);
    std::thread::sleep(Duration::from_millis(1100));

    // Again, with the spec, and without (the recorded spec and directory).
    let again = json(
        &env,
        &[
            "cluster",
            "pki",
            "lab",
            "--spec",
            p(&spec),
            "--out-dir",
            p(&dir),
        ],
    );
    assert_eq!(
        (again["issued"].as_u64(), again["kept"].as_u64()),
        (Some(0), Some(14)),
        "{again}"
    );
    assert_eq!(again["files_written"], serde_json::json!([]));
    let text = env.ok(&["cluster", "pki", "lab"]);
    assert!(
        text.contains("0 certificates issued, 14 kept, 0 files written"),
        "{text}"
    );
    assert_eq!(changed(&before, &snapshot(&dir)), Vec::<String>::new());

    // Kubelets at 2h: only their files change (spec changed); a run right
    // after keeps them (a third of 2h is the default window).
    let short = [
        "cluster",
        "pki",
        "lab",
        "--spec",
        p(&spec),
        "--out-dir",
        p(&dir),
        "--lifetime",
        "kubelet=2h",
    ];
    let out = json(&env, &short);
    let reasons: Vec<(String, String)> = out["certificates"]
        .as_array()
        .expect("certs")
        .iter()
        .filter(|c| c["action"] == "issued")
        .map(|c| {
            (
                c["id"].as_str().unwrap_or("").to_owned(),
                c["reason"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect();
    assert_eq!(
        reasons,
        [
            ("kubelet/cp-1", "spec changed"),
            ("kubelet/w-1", "spec changed"),
            ("kubelet/w-2", "spec changed")
        ]
        .map(|(a, b)| (a.to_owned(), b.to_owned()))
    );
    let kubelet_files: Vec<String> = ["cp-1", "w-1", "w-2"]
        .iter()
        .flat_map(|n| {
            [
                format!("nodes/{n}/kubelet.conf"),
                format!("nodes/{n}/pki/kubelet.crt"),
                format!("nodes/{n}/pki/kubelet.key"),
            ]
        })
        .collect();
    let mut want = kubelet_files.clone();
    want.sort();
    let after_short = snapshot(&dir);
    assert_eq!(changed(&before, &after_short), want);
    assert_eq!(json(&env, &short)["issued"], 0);
    assert_eq!(changed(&after_short, &snapshot(&dir)), Vec::<String>::new());

    // cluster certs: exit 11 when something expires within the window.
    let serials = |env: &Env| -> BTreeMap<String, String> {
        let out = env.cli(&[
            "--json",
            "cluster",
            "certs",
            "lab",
            "--expiring-within",
            "1h",
        ]);
        assert_ok(&out, &["cluster", "certs"]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
        v["certificates"]
            .as_array()
            .expect("certs")
            .iter()
            .map(|c| {
                (
                    c["id"].as_str().unwrap_or("").to_owned(),
                    c["serial"].as_str().unwrap_or("").to_owned(),
                )
            })
            .collect()
    };
    let old = serials(&env);
    assert_eq!(old.len(), 14);
    let out = env.cli(&["cluster", "certs", "lab"]);
    assert_fails(
        &out,
        11,
        "3 certificate(s) of lab expire within 30d: run `keyholder cluster pki lab --renew --before 30d`",
    );
    let listing = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(listing.lines().count(), 14, "{listing}");
    assert_eq!(
        listing
            .lines()
            .filter(|l| l.starts_with("! kubelet/"))
            .count(),
        3,
        "{listing}"
    );
    let out = env.cli(&[
        "--json",
        "cluster",
        "certs",
        "lab",
        "--expiring-within",
        "3h",
    ]);
    assert_eq!(out.status.code(), Some(11));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(v["expiring"], 3, "{v}");

    // The metrics gauge shows the earliest expiry, a kubelet's, and
    // prometheus_client's parser takes it.
    let m = scrape(metrics_port);
    let t = m["keyholder_cluster_cert_earliest_expiry_seconds:gauge"]
        .as_array()
        .and_then(|samples| {
            samples
                .iter()
                .find(|s| s[0]["cluster"] == "lab")
                .and_then(|s| s[1].as_f64())
        })
        .unwrap_or_else(|| panic!("no gauge for lab: {m}"));
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .expect("now")
        .as_secs_f64();
    assert!(t > now + 7000.0 && t <= now + 7200.0, "{t} vs {now}");
    // Its issuances count by CA and profile: 14 + 3 kubelets so far.
    let issued = |ca: &str, profile: &str| {
        m["keyholder_issued:counter"]
            .as_array()
            .and_then(|samples| {
                samples
                    .iter()
                    .find(|s| s[0]["issuer"] == ca && s[0]["profile"] == profile)
                    .and_then(|s| s[1].as_f64())
            })
            .unwrap_or(0.0)
    };
    assert_eq!(issued("lab-ca", "peer"), 6.0, "{m}");
    assert_eq!(issued("lab-ca", "server"), 1.0, "{m}");
    assert_eq!(issued("lab-ca", "client"), 5.0, "{m}");
    assert_eq!(issued("lab-etcd-ca", "client"), 2.0, "{m}");
    assert_eq!(issued("lab-front-proxy-ca", "client"), 1.0, "{m}");

    // --renew re-issues exactly the expiring ones.
    let renewed = json(
        &env,
        &["cluster", "pki", "lab", "--renew", "--before", "3h"],
    );
    assert_eq!(renewed["issued"], 3, "{renewed}");
    assert_eq!(changed(&after_short, &snapshot(&dir)), want);
    let new = serials(&env);
    for (id, serial) in &old {
        assert_eq!(new[id] != *serial, id.starts_with("kubelet/"), "{id}");
    }
    // Nothing expires within an hour now.
    assert_ok(
        &env.cli(&["cluster", "certs", "lab", "--expiring-within", "1h"]),
        &["certs"],
    );

    // A file someone else changed is not overwritten without --force.
    std::fs::write(dir.join("pki/apiserver.crt"), "edited\n").expect("edit");
    assert_fails(&env.cli(&["cluster", "pki", "lab"]), 5, "pki/apiserver.crt");
    let forced = json(&env, &["cluster", "pki", "lab", "--force"]);
    assert_eq!(forced["issued"], 1, "{forced}");
    assert_eq!(forced["certificates"][0]["reason"], "changed on disk");
    assert!(
        std::fs::read_to_string(dir.join("pki/apiserver.crt"))
            .expect("crt")
            .starts_with("-----BEGIN CERTIFICATE-----")
    );

    // Another directory gets the same service-account key (a new one would
    // invalidate every token), and new certificates.
    let copy = env.path().join("lab-copy");
    let second = json(
        &env,
        &[
            "cluster",
            "pki",
            "lab",
            "--spec",
            p(&spec),
            "--out-dir",
            p(&copy),
        ],
    );
    assert_eq!(second["issued"], 14, "{second}");
    assert_eq!(
        std::fs::read(copy.join("pki/sa.key")).expect("sa.key"),
        std::fs::read(dir.join("pki/sa.key")).expect("sa.key")
    );
    assert_ne!(
        std::fs::read(copy.join("pki/apiserver.key")).expect("key"),
        std::fs::read(dir.join("pki/apiserver.key")).expect("key")
    );
}

/// The metrics endpoint, parsed by prometheus_client (tests/python/scrape.py).
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

#[test]
fn every_marked_block_in_the_doc_is_run_here() {
    assert_eq!(DOCS.marked(), ["pki", "flags", "renew"]);
}

/// The doc's cluster.toml (3 control-plane hosts, 10 workers, 3 etcd members).
fn doc_spec() -> String {
    let mark = "<!-- cluster.toml, used by tests/e2e/cluster_pki.rs -->\n```toml\n";
    let start = DOCS.text.find(mark).expect("cluster.toml block") + mark.len();
    let end = DOCS.text[start..].find("```").expect("end") + start;
    DOCS.text[start..end].to_owned()
}

#[test]
fn the_cluster_pki_commands_in_the_docs_work_as_written() {
    let (env, _daemon) = Env::ready();
    std::fs::write(env.path().join("cluster.toml"), doc_spec()).expect("spec");
    let vars = [];
    let started = Instant::now();
    let out = DOCS.run(&env, "pki", &vars);
    eprintln!(
        "docs block pki (two cluster pki runs, one kubeconfig): {:?}",
        started.elapsed()
    );
    let text = String::from_utf8_lossy(&out.stdout);
    // 3 control-plane hosts, 10 workers, 3 etcd members: 9 shared + 13
    // kubelets + 6 etcd certificates.
    assert!(
        text.contains("prod: 28 certificates issued, 0 kept"),
        "{text}"
    );
    assert!(
        text.contains("prod: 0 certificates issued, 28 kept, 0 files written"),
        "{text}"
    );
    let dir = env.path().join("prod-pki");
    assert_eq!(
        seen(&dir.join("nodes/w-10/pki/kubelet.crt")).subject,
        "CN=system:node:w-10,O=system:nodes"
    );
    assert!(
        seen(&dir.join("pki/apiserver.crt"))
            .sans
            .contains(&"DNS:k8s.example.com".to_owned())
    );
    // kubelets at 2160h as the spec says, the rest at a year.
    let end = |f: &str| openssl(&["x509", "-in", p(&dir.join(f)), "-noout", "-enddate"]);
    assert_ne!(end("nodes/w-1/pki/kubelet.crt"), end("pki/apiserver.crt"));
    assert!(env.path().join("alice.kubeconfig").exists());

    DOCS.run(&env, "flags", &vars);
    let lab = env.path().join("lab-pki");
    assert!(lab.join("admin.conf").exists() && lab.join("nodes/w-1/kubelet.conf").exists());

    // The figure for docs and the issue: one first run (three new CAs,
    // 28 certificates, the service-account key) for the doc's cluster.
    let started = Instant::now();
    env.ok(&[
        "cluster",
        "pki",
        "timed",
        "--spec",
        p(&env.path().join("cluster.toml")),
        "--out-dir",
        p(&env.path().join("timed")),
    ]);
    eprintln!(
        "cluster pki, 3 control-plane, 10 workers, 3 etcd, first run: {:?}",
        started.elapsed()
    );
    // --renew works on the recorded directory only.
    assert_fails(
        &env.cli(&["cluster", "pki", "timed", "--renew", "--out-dir", p(&lab)]),
        6,
        "out_dir: --renew renews the files in",
    );

    let out = DOCS.run(&env, "renew", &vars);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("renew soon"),
        "kubelets expire within 90 days: {text}"
    );
    let v: serde_json::Value = serde_json::from_str(
        text.lines()
            .find(|l| l.starts_with('{'))
            .expect("JSON line"),
    )
    .expect("JSON");
    assert_eq!(v["expiring"], 13, "{v}");
}

#[test]
fn cluster_pki_needs_the_admin_capability_and_is_audited_with_its_serials() {
    let (env, _daemon) = Env::ready();
    let spec = loopback_spec(&env, "https://127.0.0.1:6443", &["w-1"], &["etcd-a"]);
    let dir = env.path().join("lab");
    env.ok(&[
        "cluster",
        "pki",
        "lab",
        "--spec",
        p(&spec),
        "--out-dir",
        p(&dir),
    ]);
    // The TCP listener's client CA never signs a cluster's certificates.
    let listener = env.file(
        "listener.toml",
        &(std::fs::read_to_string(&spec).expect("spec") + "[cas]\ncluster = \"admin-clients\"\n"),
    );
    assert_fails(
        &env.cli(&[
            "cluster",
            "pki",
            "l2",
            "--spec",
            p(&listener),
            "--out-dir",
            p(&env.path().join("l2")),
        ]),
        7,
        "signs the TCP listener's certificates",
    );
    // Another program that may list and issue client certificates, but is
    // not an admin: it can read what was issued, not issue a cluster's PKI.
    let copy = env.path().join("other-client");
    std::fs::copy(crate::util::keyholder_bin(), &copy).expect("copy client");
    let admin_exe = std::fs::canonicalize(crate::util::keyholder_bin()).expect("client path");
    let policy = env.file(
        "policy.toml",
        &format!(
            "default = \"deny\"\n\n[[rule]]\nname = \"admin-cli\"\nexe = [\"{}\"]\nallow = [\"*\"]\n\n\
             [[rule]]\nname = \"monitor\"\nexe = [\"{}\"]\nallow = [\"list\", \"cert:*:*\"]\n",
            p(&admin_exe),
            p(&copy)
        ),
    );
    env.ok(&["policy", "set", p(&policy), "--pin-file", p(&env.pin_file)]);
    let run = |args: &[&str]| {
        let mut c = env.command(p(&copy));
        c.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        crate::util::output_within(c, Duration::from_secs(60)).expect("client finishes")
    };
    let other = env.path().join("other");
    let out = run(&[
        "cluster",
        "pki",
        "stolen",
        "--spec",
        p(&spec),
        "--out-dir",
        p(&other),
    ]);
    assert_fails(&out, 7, "");
    assert!(!other.exists(), "nothing was written");
    assert_fails(
        &env.cli(&["cluster", "certs", "stolen"]),
        4,
        "cluster PKI \"stolen\" does not exist",
    );
    let out = run(&["cluster", "certs", "lab"]);
    assert_ok(&out, &["cluster", "certs", "lab"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 13);

    // The audit log has the issuance with every serial, and the refusal.
    let log = std::fs::read_to_string(env.vault.parent().expect("vault dir").join("audit.log"))
        .expect("audit log");
    let records: Vec<serde_json::Value> = log
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .filter(|r: &serde_json::Value| r["op"] == "Admin.ClusterPki")
        .collect();
    // Issued, refused for the listener's CA, denied by policy.
    assert_eq!(records.len(), 3, "{log}");
    assert_eq!(records[1]["outcome"], "failed", "{}", records[1]);
    let issued = records[0].to_string();
    // Which private keys left the daemon, the service-account key by name.
    assert_eq!(
        records[0]["details"]["service_account_key_returned"], "true",
        "{issued}"
    );
    assert!(
        records[0]["details"]["keys_returned"]
            .as_str()
            .is_some_and(|k| k.contains("pki/apiserver.key")),
        "{issued}"
    );
    let certs = json(&env, &["cluster", "certs", "lab"]);
    for c in certs["certificates"].as_array().expect("certs") {
        let serial = c["serial"].as_str().expect("serial");
        assert!(issued.contains(serial), "{serial} not in {issued}");
    }
    let denied = records[2].to_string();
    assert!(
        denied.contains("cluster-pki:stolen") && denied.contains("denied"),
        "{denied}"
    );
}

#[test]
fn a_cluster_of_four_hundred_workers_is_issued_and_kept_within_the_message_limits() {
    let (env, _daemon) = Env::ready();
    let workers: Vec<String> = (1..=400).map(|i| format!("w-{i}")).collect();
    let workers: Vec<&str> = workers.iter().map(String::as_str).collect();
    let spec = loopback_spec(&env, "https://127.0.0.1:6443", &workers, &["etcd-a"]);
    let dir = env.path().join("big");
    let started = Instant::now();
    let first = json(
        &env,
        &[
            "cluster",
            "pki",
            "big",
            "--spec",
            p(&spec),
            "--out-dir",
            p(&dir),
        ],
    );
    eprintln!(
        "cluster pki, 1 control-plane, 400 workers, 1 etcd: {:?}",
        started.elapsed()
    );
    assert_eq!(first["issued"], 412, "{}", first["issued"]);
    let before = snapshot(&dir);
    // A re-run sends only what changed (nothing) and keeps everything.
    let again = json(&env, &["cluster", "pki", "big"]);
    assert_eq!(
        (again["issued"].as_u64(), again["kept"].as_u64()),
        (Some(0), Some(412))
    );
    assert_eq!(changed(&before, &snapshot(&dir)), Vec::<String>::new());
    // A removed kubeconfig is issued again, and nothing else.
    std::fs::remove_file(dir.join("nodes/w-200/kubelet.conf")).expect("rm");
    let out = json(&env, &["cluster", "pki", "big"]);
    assert_eq!(out["issued"], 1);
    let c = out["certificates"]
        .as_array()
        .expect("certs")
        .iter()
        .find(|c| c["action"] == "issued")
        .expect("one issued")
        .clone();
    assert_eq!(
        (c["id"].as_str(), c["reason"].as_str()),
        (Some("kubelet/w-200"), Some("missing"))
    );
    let mut want = vec![
        "nodes/w-200/kubelet.conf".to_owned(),
        "nodes/w-200/pki/kubelet.crt".to_owned(),
        "nodes/w-200/pki/kubelet.key".to_owned(),
    ];
    want.sort();
    assert_eq!(changed(&before, &snapshot(&dir)), want);
}
