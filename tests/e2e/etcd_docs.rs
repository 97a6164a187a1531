//! The worked example of docs/etcd.md, run as written: certificates from a
//! daemon on a file vault, a three-member cluster started by the doc's own
//! block (its members stopped by the PIDs it records), the vault moved into
//! etcd, a daemon configured by the doc's block, and the vault moved back.
//! Only the ports differ, through the variables the blocks read.

use std::net::TcpListener;
use std::time::{Duration, Instant};

use crate::util::{DocBlocks, Env};

const DOCS: DocBlocks = DocBlocks {
    path: "docs/etcd.md",
    text: include_str!("../../docs/etcd.md"),
    mark: "<!-- run by tests/e2e/etcd_docs.rs: ",
};

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// The members the doc's block started, stopped by PID when dropped.
struct Members(std::path::PathBuf);

impl Drop for Members {
    fn drop(&mut self) {
        let pids = std::fs::read_to_string(&self.0).unwrap_or_default();
        for pid in pids.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
            if let Some(pid) = rustix::process::Pid::from_raw(pid) {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
            }
        }
    }
}

#[test]
fn every_marked_etcd_block_is_run_here() {
    assert_eq!(
        DOCS.marked(),
        [
            "certificates",
            "cluster",
            "migrate",
            "configure",
            "migrate-back"
        ]
    );
}

#[test]
fn the_etcd_setup_in_the_docs_works_as_written() {
    let mut env = Env::new();
    // The default vault path, which the doc's migrate block names.
    env.vault = env.path().join("data/keyholder/vault.age");
    let daemon = env.start_daemon(&[]);
    env.init();
    env.unlock();
    env.put("team/db-password", b"correct horse");
    DOCS.run(&env, "certificates", &[]);

    let client_ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let peer_ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let join = |ports: &[u16]| {
        ports
            .iter()
            .map(u16::to_string)
            .collect::<Vec<_>>()
            .join(" ")
    };
    let endpoints = client_ports
        .iter()
        .map(|p| format!("127.0.0.1:{p}"))
        .collect::<Vec<_>>()
        .join(",");
    let vars = [
        ("CLIENT_PORTS", join(&client_ports)),
        ("PEER_PORTS", join(&peer_ports)),
        ("ENDPOINTS", endpoints.clone()),
    ];
    let vars: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let _members = Members(env.path().join("etcd.pids"));
    DOCS.run(&env, "cluster", &vars);

    assert!(daemon.stop().success());
    // The cluster may still be electing its leader: the migration is
    // retried (bounded) until it answers.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let block = DOCS.block("migrate");
        let out = env
            .command("bash")
            .args(["-euo", "pipefail", "-c", &block])
            .current_dir(env.path())
            .env(
                "PATH",
                format!(
                    "{}:{}",
                    std::path::Path::new(crate::util::keyholder_bin())
                        .parent()
                        .expect("bin dir")
                        .display(),
                    std::env::var("PATH").unwrap_or_default()
                ),
            )
            .envs(vars.iter().copied())
            .output()
            .expect("bash runs");
        if out.status.success() {
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(text.contains("read back and verified"), "{text}");
            break;
        }
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("unreachable") && Instant::now() < deadline,
            "migrate failed: {err}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }

    DOCS.run(&env, "configure", &vars);
    // keyholderd reads the configuration the doc wrote.
    let daemon = env.start_daemon(&[]);
    env.unlock();
    assert!(env.ok(&["status"]).contains("etcd://127.0.0.1:"));
    assert_eq!(
        env.ok(&["secret", "get", "team/db-password"]),
        "correct horse"
    );
    env.put("team/api-token", b"written to etcd");
    assert!(daemon.stop().success());

    DOCS.run(&env, "migrate-back", &vars);
    let back = env.path().join("vault-from-etcd/vault.age");
    assert!(back.exists());
    let backups = std::fs::read_dir(back.parent().unwrap())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains(".gen-"))
        .count();
    assert!(backups >= 2, "the generation history came back ({backups})");
    // The file opens with the same content.
    std::fs::remove_file(env.path().join("config/keyholder/keyholderd.toml")).expect("config");
    env.vault = back;
    let _daemon = env.start_daemon(&[]);
    env.unlock();
    assert_eq!(
        env.ok(&["secret", "get", "team/api-token"]),
        "written to etcd"
    );
}
