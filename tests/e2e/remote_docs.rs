//! The commands in docs/remote.md, run as written: a daemon with the TCP
//! listener, the marked blocks in order, and the runner's part with the
//! `KEYHOLDER_REMOTE*` variables the docs export (only the host and port
//! differ: the test's listener is on a free loopback port).

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::util::{DocBlocks, Env};

const DOCS: DocBlocks = DocBlocks {
    path: "docs/remote.md",
    text: include_str!("../../docs/remote.md"),
    mark: "<!-- run by tests/e2e/remote_docs.rs: ",
};

fn p(path: &Path) -> &str {
    path.to_str().expect("utf8 path")
}

#[test]
fn every_marked_remote_block_is_run_here() {
    assert_eq!(DOCS.marked(), ["client", "policy", "kubeconfig"]);
    assert!(
        DOCS.text
            .contains("export KEYHOLDER_REMOTE_CERT=$PWD/ci-runner/cert.pem")
    );
}

#[test]
fn the_ci_runner_setup_in_the_docs_works_as_written() {
    let env = Env::new();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let _daemon = env.start_daemon(&["--listen-tcp", &format!("127.0.0.1:{port}")]);
    env.init();
    env.unlock();
    std::fs::copy(&env.pin_file, env.path().join("pin.txt")).expect("pin.txt");
    let api = crate::kube::prod_cluster(&env, &env.path().join("api"));

    DOCS.run(&env, "client", &[]);
    DOCS.run(&env, "policy", &[]);
    let ci = env.path().join("ci-runner");
    for f in ["key.pem", "cert.pem", "server-ca.pem"] {
        assert!(ci.join(f).exists(), "{f}");
    }
    // The listener makes its certificate once the CA exists; wait for it.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = Command::new(crate::util::keyholder_bin())
            .args(["--remote", &format!("https://localhost:{port}")])
            .args(["--remote-cert", p(&ci.join("cert.pem"))])
            .args(["--remote-key", p(&ci.join("key.pem"))])
            .args(["--remote-ca", p(&ci.join("server-ca.pem")), "status"])
            .stdin(Stdio::null())
            .output()
            .expect("keyholder runs");
        if out.status.success() {
            break;
        }
        assert!(Instant::now() < deadline, "the listener never served");
        std::thread::sleep(Duration::from_millis(300));
    }
    let cert = ci.join("cert.pem");
    let key = ci.join("key.pem");
    let ca = ci.join("server-ca.pem");
    let remote = format!("https://localhost:{port}");
    let out = DOCS.run(
        &env,
        "kubeconfig",
        &[
            ("KEYHOLDER_REMOTE", remote.as_str()),
            ("KEYHOLDER_REMOTE_CERT", p(&cert)),
            ("KEYHOLDER_REMOTE_KEY", p(&key)),
            ("KEYHOLDER_REMOTE_CA", p(&ca)),
        ],
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("keyholder-test"),
        "{out:?}"
    );
    assert!(api.seen.lock().expect("seen").iter().any(|cn| cn == "ci"));
}
