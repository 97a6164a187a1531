//! A three-member etcd cluster on loopback with peer and client mutual TLS,
//! its certificates issued by Keyholder; shared by the etcd storage test
//! and benchmark. Every member is stopped by PID when the cluster drops.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::util::Env;

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

fn p(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

struct Member {
    name: String,
    client_port: u16,
    peer_port: u16,
    child: Option<Child>,
}

/// The cluster.
pub struct Cluster {
    dir: PathBuf,
    members: Vec<Member>,
    /// The members' certificate, key and CA (ca.pem, cert.pem, key.pem).
    pub member_certs: PathBuf,
    /// keyholderd's client certificate, key and CA.
    pub client: PathBuf,
}

/// Issues the members' certificate (peer profile: server and client use,
/// 127.0.0.1) and keyholderd's client certificate from a Keyholder CA
/// `etcd-team`, through the daemon `env` talks to (unlocked). Returns
/// (member directory, client directory).
pub fn issue_certificates(env: &Env, dir: &Path) -> (PathBuf, PathBuf) {
    env.ok(&["ca", "create", "etcd-team"]);
    let members = dir.join("member-tls");
    let client = dir.join("client-tls");
    env.ok(&[
        "cert",
        "issue",
        "--ca",
        "etcd-team",
        "--profile",
        "peer",
        "--cn",
        "etcd-member",
        "--san",
        "127.0.0.1",
        "--ttl",
        "24h",
        "--out-dir",
        p(&members),
    ]);
    env.ok(&[
        "cert",
        "issue",
        "--ca",
        "etcd-team",
        "--profile",
        "client",
        "--cn",
        "keyholderd",
        "--ttl",
        "24h",
        "--out-dir",
        p(&client),
    ]);
    (members, client)
}

impl Cluster {
    /// Starts three members under `dir` and waits (bounded) until the
    /// cluster takes a write.
    pub fn start(dir: &Path, member_certs: &Path, client: &Path) -> Self {
        std::fs::create_dir_all(dir).expect("cluster dir");
        let members = (0..3)
            .map(|i| Member {
                name: format!("m{i}"),
                client_port: free_port(),
                peer_port: free_port(),
                child: None,
            })
            .collect();
        let mut cluster = Self {
            dir: dir.to_owned(),
            members,
            member_certs: member_certs.to_owned(),
            client: client.to_owned(),
        };
        for i in 0..3 {
            cluster.restart(i);
        }
        cluster.wait_writable(Duration::from_secs(60));
        cluster
    }

    fn initial_cluster(&self) -> String {
        self.members
            .iter()
            .map(|m| format!("{}=https://127.0.0.1:{}", m.name, m.peer_port))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Starts member `i` (again, on its data directory).
    pub fn restart(&mut self, i: usize) {
        let initial = self.initial_cluster();
        let certs = self.member_certs.clone();
        let dir = self.dir.clone();
        let m = &mut self.members[i];
        assert!(m.child.is_none(), "member {i} is running");
        let client = format!("https://127.0.0.1:{}", m.client_port);
        let peer = format!("https://127.0.0.1:{}", m.peer_port);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join(format!("{}.log", m.name)))
            .expect("etcd log");
        let child = Command::new("etcd")
            .args(["--name", &m.name, "--data-dir"])
            .arg(dir.join(&m.name))
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &initial])
            .args(["--initial-cluster-state", "new"])
            .args(["--initial-cluster-token", "keyholder-test"])
            .arg("--client-cert-auth")
            .arg("--trusted-ca-file")
            .arg(certs.join("ca.pem"))
            .arg("--cert-file")
            .arg(certs.join("cert.pem"))
            .arg("--key-file")
            .arg(certs.join("key.pem"))
            .arg("--peer-client-cert-auth")
            .arg("--peer-trusted-ca-file")
            .arg(certs.join("ca.pem"))
            .arg("--peer-cert-file")
            .arg(certs.join("cert.pem"))
            .arg("--peer-key-file")
            .arg(certs.join("key.pem"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("etcd runs (apt-get install etcd-server)");
        m.child = Some(child);
    }

    /// SIGKILLs member `i` and reaps it.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// `HOST:PORT` of every member's client listener.
    pub fn endpoints(&self) -> Vec<String> {
        self.members
            .iter()
            .map(|m| format!("127.0.0.1:{}", m.client_port))
            .collect()
    }

    /// `etcd://...` for `prefix`.
    pub fn url(&self, prefix: &str) -> String {
        format!("etcd://{}{prefix}", self.endpoints().join(","))
    }

    /// The `--etcd-*` flags of `keyholder vault migrate`.
    pub fn tls_flags(&self) -> Vec<String> {
        vec![
            "--etcd-ca".into(),
            p(&self.client.join("ca.pem")).into(),
            "--etcd-cert".into(),
            p(&self.client.join("cert.pem")).into(),
            "--etcd-key".into(),
            p(&self.client.join("key.pem")).into(),
        ]
    }

    /// A keyholderd config file's text for the vault under `prefix`.
    pub fn daemon_config(&self, prefix: &str, timeout: &str) -> String {
        let endpoints: Vec<String> = self.endpoints().iter().map(|e| format!("{e:?}")).collect();
        format!(
            "storage = \"etcd\"\n\n[etcd]\nendpoints = [{}]\nprefix = {prefix:?}\nca_file = {:?}\ncert_file = {:?}\nkey_file = {:?}\ntimeout = {timeout:?}\n",
            endpoints.join(", "),
            p(&self.client.join("ca.pem")),
            p(&self.client.join("cert.pem")),
            p(&self.client.join("key.pem")),
        )
    }

    /// etcdctl with keyholderd's client certificate.
    pub fn etcdctl(&self, args: &[&str]) -> Output {
        let endpoints: Vec<String> = self
            .endpoints()
            .iter()
            .map(|e| format!("https://{e}"))
            .collect();
        Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .args([
                "--endpoints",
                &endpoints.join(","),
                "--dial-timeout",
                "2s",
                "--command-timeout",
                "5s",
                "--cacert",
            ])
            .arg(self.client.join("ca.pem"))
            .arg("--cert")
            .arg(self.client.join("cert.pem"))
            .arg("--key")
            .arg(self.client.join("key.pem"))
            .args(args)
            .output()
            .expect("etcdctl runs (apt-get install etcd-client)")
    }

    /// Waits (bounded) until a write through etcdctl succeeds.
    pub fn wait_writable(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            let out = self.etcdctl(&["put", "/health", "ok"]);
            if out.status.success() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the etcd cluster never took a write: {}\n{}",
                String::from_utf8_lossy(&out.stderr),
                std::fs::read_to_string(self.dir.join("m0.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }
}
