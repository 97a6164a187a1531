//! Signing through the ssh-agent protocol: Keyholder's agent socket against
//! OpenSSH's `ssh-agent` (same key types, keys added with `ssh-add`), for
//! Ed25519, ECDSA P-256 and RSA-3072 at concurrency 1, 4 and 16, plus the
//! gRPC `Signer.Sign` at the same concurrencies, all in one run; and
//! Keyholder's agent with its audit log (the default) against a second
//! keyholderd with `--audit-log off`.
//!
//! Run: `cargo bench --bench agent` (needs openssh-client).

mod common;
#[path = "../tests/e2e/util.rs"]
#[allow(dead_code)]
mod util;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use common::{Run, connect};
use keyholder_proto::v1;
use util::Env;

/// Each measurement stops at this many signatures or this much time.
const MAX_OPS: usize = 200_000;
const MAX_TIME: Duration = Duration::from_secs(3);

fn frame_sign(blob: &[u8], data: &[u8], flags: u32) -> Vec<u8> {
    let mut body = vec![13u8];
    for s in [blob, data] {
        body.extend_from_slice(&(s.len() as u32).to_be_bytes());
        body.extend_from_slice(s);
    }
    body.extend_from_slice(&flags.to_be_bytes());
    let mut out = (body.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(&body);
    out
}

fn agent_run(socket: &Path, blob: &[u8], flags: u32, concurrency: usize) -> Run {
    let data = [0x5au8; 64];
    let request = frame_sign(blob, &data, flags);
    common::threaded_run(
        concurrency,
        MAX_OPS,
        MAX_TIME,
        || {
            let stream = UnixStream::connect(socket).expect("agent socket");
            (stream, Vec::new())
        },
        |(stream, body)| {
            let mut len = [0u8; 4];
            stream.write_all(&request).expect("send");
            stream.read_exact(&mut len).expect("reply length");
            body.resize(u32::from_be_bytes(len) as usize, 0);
            stream.read_exact(body).expect("reply");
            assert_eq!(body[0], 14, "agent refused to sign");
        },
    )
}

fn grpc_run(rt: &tokio::runtime::Runtime, socket: &Path, key: &str, concurrency: usize) -> Run {
    rt.block_on(async {
        let start = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..concurrency {
            let channel = connect(socket.to_owned()).await;
            let key = key.to_owned();
            tasks.push(tokio::spawn(async move {
                let mut client = v1::signer_client::SignerClient::new(channel);
                let mut lat = Vec::new();
                while lat.len() < MAX_OPS / concurrency && start.elapsed() < MAX_TIME {
                    let t = Instant::now();
                    client
                        .sign(v1::SignRequest {
                            key: key.clone(),
                            data: vec![0x5a; 64],
                            ..Default::default()
                        })
                        .await
                        .expect("sign");
                    lat.push(t.elapsed());
                }
                lat
            }));
        }
        let mut latencies = Vec::new();
        for t in tasks {
            latencies.extend(t.await.expect("task"));
        }
        Run::new(latencies, start.elapsed())
    })
}

fn blob_of(public_line: &str) -> Vec<u8> {
    let b64 = public_line
        .split_whitespace()
        .nth(1)
        .expect("public key line");
    base64::prelude::BASE64_STANDARD
        .decode(b64)
        .expect("base64")
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let env = Env::new();
    let flags = common::daemon_flags("warn");
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let daemon = env.start_daemon(&flags);
    env.init();
    env.unlock();
    let ours = env.runtime.join("keyholder/ssh-agent.sock");
    // The same daemon without its audit log.
    let env_off = Env::new();
    let mut flags_off = flags.clone();
    flags_off.extend(["--audit-log", "off"]);
    let daemon_off = env_off.start_daemon(&flags_off);
    env_off.init();
    env_off.unlock();
    let ours_off = env_off.runtime.join("keyholder/ssh-agent.sock");
    // A policy of realistic size on both (BENCH_POLICY_RULES, default 50).
    let rules = common::set_bench_policy(&env);
    common::set_bench_policy(&env_off);
    eprintln!("policy: {rules} rules");

    // OpenSSH's agent, with keys of the same types.
    let openssh_sock = env.path().join("openssh-agent.sock");
    let mut agent = Command::new("ssh-agent")
        .args(["-D", "-a"])
        .arg(&openssh_sock)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("ssh-agent runs");
    let deadline = Instant::now() + Duration::from_secs(10);
    while UnixStream::connect(&openssh_sock).is_err() {
        assert!(Instant::now() < deadline, "ssh-agent did not start");
        std::thread::sleep(Duration::from_millis(20));
    }

    let types = [
        ("ed25519", "ed25519", &["-t", "ed25519"][..], 0u32),
        (
            "ecdsa-p256",
            "ecdsa-p256",
            &["-t", "ecdsa", "-b", "256"][..],
            0,
        ),
        ("rsa-3072", "rsa-3072", &["-t", "rsa", "-b", "3072"][..], 2),
    ];
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    println!(
        "{:<11} {:<10} {:>4} {:>10} {:>9} {:>9}",
        "key", "server", "conc", "sign/s", "p50 ms", "p99 ms"
    );
    let mut ratios = Vec::new();
    let mut audit = Vec::new();
    for (name, kind, keygen, flags) in types {
        env.ok(&["key", "generate", name, "--type", kind, "--ssh", "--sign"]);
        let our_blob = blob_of(&env.ok(&["key", "show", name, "--public"]));
        env_off.ok(&["key", "generate", name, "--type", kind, "--ssh", "--sign"]);
        let off_blob = blob_of(&env_off.ok(&["key", "show", name, "--public"]));
        let file = env.path().join(format!("openssh-{name}"));
        let ok = Command::new("ssh-keygen")
            .args(["-q", "-N", "", "-f"])
            .arg(&file)
            .args(keygen)
            .status()
            .expect("ssh-keygen");
        assert!(ok.success());
        let ok = Command::new("ssh-add")
            .env("SSH_AUTH_SOCK", &openssh_sock)
            .arg(&file)
            .stderr(Stdio::null())
            .status()
            .expect("ssh-add");
        assert!(ok.success());
        let their_blob =
            blob_of(&std::fs::read_to_string(format!("{}.pub", file.display())).expect("pub"));
        for c in [1usize, 4, 16] {
            let k = agent_run(&ours, &our_blob, flags, c);
            let n = agent_run(&ours_off, &off_blob, flags, c);
            let o = agent_run(&openssh_sock, &their_blob, flags, c);
            let g = grpc_run(&rt, &env.socket(), name, c);
            for (server, r) in [
                ("keyholder", &k),
                ("kh-noaudit", &n),
                ("ssh-agent", &o),
                ("grpc-sign", &g),
            ] {
                println!(
                    "{name:<11} {server:<10} {c:>4} {:>10.0} {:>9.3} {:>9.3}",
                    r.rate(),
                    r.pct(0.5),
                    r.pct(0.99)
                );
            }
            ratios.push((name, c, k.rate() / o.rate(), k.pct(0.99) < o.pct(0.99)));
            audit.push((name, c, k.rate() / n.rate()));
        }
    }
    for (name, c, ratio, p99_lower) in ratios {
        println!(
            "{name} concurrency {c}: keyholder/ssh-agent throughput {ratio:.1}x, lower p99: {p99_lower}"
        );
    }
    for (name, c, ratio) in audit {
        println!("{name} concurrency {c}: audit log on/off throughput {ratio:.2}x");
    }
    let _ = agent.kill();
    let _ = agent.wait();
    drop(daemon);
    drop(daemon_off);
}
