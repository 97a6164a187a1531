//! Nobody starves the daemon by holding connections: idle and half-sent
//! connections on both sockets, under an open file limit of 1,024 that the
//! daemon cannot raise, while `ssh-add -l` and `keyholder secret get` keep
//! being served.
//!
//! Run with `cargo test --test e2e -- connections --nocapture` to see the
//! figures (docs/ssh.md quotes them).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::util::{Daemon, Env, output_within};

fn agent_socket(env: &Env) -> PathBuf {
    env.runtime.join("keyholder/ssh-agent.sock")
}

/// The test process itself holds well over a thousand sockets.
fn raise_own_file_limit() {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    let want = Some(8192u64);
    if limit.current < want || limit.current.is_none() {
        let raised = Rlimit {
            current: want.max(limit.current),
            maximum: limit.maximum.max(want),
        };
        setrlimit(Resource::Nofile, raised).expect("raise the test's open file limit");
    }
}

fn open(path: &Path, n: usize, send: &[u8]) -> Vec<UnixStream> {
    (0..n)
        .map(|i| {
            let mut s = UnixStream::connect(path)
                .unwrap_or_else(|e| panic!("connection {i} to {}: {e}", path.display()));
            if !send.is_empty() {
                s.write_all(send).expect("write");
            }
            s
        })
        .collect()
}

/// Runs `what` `tries` times; each must succeed within a second. Returns
/// the latencies in milliseconds, sorted.
fn timed(tries: usize, what: impl Fn() -> bool) -> Vec<f64> {
    let mut ms: Vec<f64> = (0..tries)
        .map(|i| {
            let started = Instant::now();
            assert!(what(), "try {i} failed");
            let took = started.elapsed();
            assert!(took < Duration::from_secs(1), "try {i} took {took:?}");
            took.as_secs_f64() * 1000.0
        })
        .collect();
    ms.sort_by(f64::total_cmp);
    ms
}

fn median(sorted: &[f64]) -> f64 {
    sorted.get(sorted.len() / 2).copied().unwrap_or(f64::NAN)
}

/// A client that is not served is killed after this long.
const PATIENCE: Duration = Duration::from_secs(5);

fn ssh_add_l(env: &Env) -> bool {
    let mut c = Command::new("ssh-add");
    c.env("SSH_AUTH_SOCK", agent_socket(env))
        .arg("-l")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    output_within(c, PATIENCE).is_some_and(|out| {
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("(ED25519)")
    })
}

fn secret_get(env: &Env) -> bool {
    env.cli_within(&["secret", "get", "db"], PATIENCE)
        .is_some_and(|out| out.status.success() && out.stdout == b"hunter2")
}

fn max_open_files(daemon: &Daemon) -> String {
    std::fs::read_to_string(format!("/proc/{}/limits", daemon.pid()))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap_or_default()
        .split_whitespace()
        .skip(3)
        .take(2)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Waits (bounded) until the daemon holds at most `fds` descriptors.
fn settle(daemon: &Daemon, fds: usize) -> usize {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now = daemon.open_fds();
        if now <= fds || Instant::now() > deadline {
            return now;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A daemon under `limit` open files, unlocked, with a secret and an SSH key.
fn limited(limit: u32) -> (Env, Daemon) {
    raise_own_file_limit();
    let env = Env::new();
    let nofile = format!("--nofile={limit}:{limit}");
    let daemon = env.start_daemon_under(&["prlimit", &nofile], &[]);
    assert_eq!(max_open_files(&daemon), format!("{limit} {limit}"));
    env.init();
    env.unlock();
    env.put("db", b"hunter2");
    env.ok(&["key", "generate", "k", "--type", "ed25519", "--ssh"]);
    (env, daemon)
}

#[test]
fn connections_idle_and_half_sent_do_not_starve_new_clients_under_1024_files() {
    let (env, daemon) = limited(1024);
    let agent = agent_socket(&env);
    let grpc = env.socket();
    // The same calls without the load, for comparison.
    let ssh_quiet_ms = timed(20, || ssh_add_l(&env));
    let get_quiet_ms = timed(10, || secret_get(&env));
    let (rss_before, fds_before) = (daemon.rss_kib(), daemon.open_fds());

    // 1,000 idle and 50 half-sent (two bytes of the length header) agent
    // connections; 200 idle and 20 half-sent (part of the HTTP/2 preface)
    // gRPC connections.
    let started = Instant::now();
    let idle = open(&agent, 1000, &[]);
    let half = open(&agent, 50, &[0, 0]);
    let grpc_idle = open(&grpc, 200, &[]);
    let grpc_half = open(&grpc, 20, b"PRI * HT");
    let opened = started.elapsed();
    std::thread::sleep(Duration::from_millis(500));
    let (rss_under, fds_under) = (daemon.rss_kib(), daemon.open_fds());

    let ssh_ms = timed(20, || ssh_add_l(&env));
    let get_ms = timed(10, || secret_get(&env));
    let (rss_load, fds_load) = (daemon.rss_kib(), daemon.open_fds());
    assert!(
        fds_under.max(fds_load) < 1024,
        "{fds_under}/{fds_load} descriptors"
    );

    // The oldest idle agent connection was closed to make room.
    let mut oldest = idle.first().expect("idle").try_clone().expect("clone");
    oldest
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    assert_eq!(
        oldest.read(&mut [0u8; 1]).expect("evicted, not timed out"),
        0
    );

    drop((idle, half, grpc_idle, grpc_half));
    let fds_after = settle(&daemon, fds_before + 4);
    std::thread::sleep(Duration::from_millis(300));
    let rss_after = daemon.rss_kib();
    assert!(ssh_add_l(&env) && secret_get(&env), "served after the load");

    println!(
        "connections: 1,000 idle + 50 half-sent agent, 200 idle + 20 half-sent gRPC, \
         opened in {:.0} ms; keyholderd under prlimit --nofile=1024:1024",
        opened.as_secs_f64() * 1000.0
    );
    println!(
        "  keyholderd RSS: before {rss_before} KiB, under load {rss_under} KiB, after the clients \
         {rss_load} KiB (+{} KiB), after closing {rss_after} KiB",
        rss_load.saturating_sub(rss_before)
    );
    println!(
        "  keyholderd open fds: before {fds_before}, under load {fds_under}, after the clients \
         {fds_load}, after closing {fds_after}"
    );
    println!(
        "  without the load: ssh-add -l median {:.1} ms, max {:.1} ms; secret get median {:.1} ms, \
         max {:.1} ms",
        median(&ssh_quiet_ms),
        ssh_quiet_ms.last().copied().unwrap_or(f64::NAN),
        median(&get_quiet_ms),
        get_quiet_ms.last().copied().unwrap_or(f64::NAN)
    );
    println!(
        "  ssh-add -l under load, {} tries: median {:.1} ms, max {:.1} ms",
        ssh_ms.len(),
        median(&ssh_ms),
        ssh_ms.last().copied().unwrap_or(f64::NAN)
    );
    println!(
        "  keyholder secret get under load, {} tries: median {:.1} ms, max {:.1} ms",
        get_ms.len(),
        median(&get_ms),
        get_ms.last().copied().unwrap_or(f64::NAN)
    );
    assert!(
        rss_load < rss_before + 64 * 1024,
        "RSS grew from {rss_before} KiB to {rss_load} KiB"
    );
    assert!(fds_after <= fds_before + 4, "{fds_before} -> {fds_after}");
    assert!(daemon.log_text().lines().all(|l| !l.contains("panicked")));
}

#[test]
fn connections_caps_shrink_to_fit_a_low_file_limit_and_both_sockets_keep_serving() {
    // 128 descriptors: fewer than the connections below.
    let (env, daemon) = limited(128);
    let agent = agent_socket(&env);
    let grpc = env.socket();
    let held = (
        open(&agent, 300, &[]),
        open(&agent, 20, &[0, 0]),
        open(&grpc, 300, &[]),
        open(&grpc, 20, b"PRI * HT"),
    );
    std::thread::sleep(Duration::from_millis(500));
    let fds = daemon.open_fds();
    let ssh_ms = timed(10, || ssh_add_l(&env));
    let get_ms = timed(10, || secret_get(&env));
    drop(held);
    // Still accepting, and still unlocked: the token checks found the
    // descriptors they need.
    assert!(ssh_add_l(&env) && secret_get(&env));
    println!(
        "connections under prlimit --nofile=128:128 (300 + 20 agent, 300 + 20 gRPC held): \
         keyholderd fds {fds}; ssh-add -l median {:.1} ms max {:.1} ms; secret get median {:.1} ms \
         max {:.1} ms",
        median(&ssh_ms),
        ssh_ms.last().copied().unwrap_or(f64::NAN),
        median(&get_ms),
        get_ms.last().copied().unwrap_or(f64::NAN)
    );
    assert!(
        !daemon.log_text().contains("token check failed"),
        "{}",
        daemon.log_text()
    );
}

#[test]
fn connections_with_a_half_sent_length_header_are_closed_at_the_partial_message_deadline() {
    let (env, _daemon) = Env::ready();
    let mut s = UnixStream::connect(agent_socket(&env)).expect("agent socket");
    s.write_all(&[0, 0]).expect("two bytes of a length header");
    s.set_read_timeout(Some(Duration::from_secs(45)))
        .expect("timeout");
    let started = Instant::now();
    let read = s.read(&mut [0u8; 1]);
    let took = started.elapsed();
    assert!(matches!(read, Ok(0)), "still open after {took:?}: {read:?}");
    assert!(
        took > Duration::from_secs(25) && took < Duration::from_secs(40),
        "closed after {took:?}; the deadline is 30 s"
    );
}

#[test]
fn connections_that_exhaust_the_file_descriptors_are_evicted_and_accepting_goes_on() {
    // 26 descriptors: fewer than the daemon's own (about 14) plus the
    // smallest connection caps (8 per socket), so accept runs into EMFILE.
    let (env, daemon) = limited(26);
    let agent = agent_socket(&env);
    let grpc = env.socket();
    let held = (open(&agent, 40, &[]), open(&grpc, 40, &[]));
    std::thread::sleep(Duration::from_millis(500));
    let ssh_ms = timed(10, || ssh_add_l(&env));
    let get_ms = timed(10, || secret_get(&env));
    // A few token checks later the session is still open: they found
    // descriptors.
    std::thread::sleep(Duration::from_secs(3));
    assert!(secret_get(&env));
    let log = daemon.log_text();
    assert!(log.contains("Too many open files"), "{log}");
    assert!(
        log.matches("accept failed").count() <= 4,
        "accept failures are logged at most every 10 s per socket:\n{log}"
    );
    drop(held);
    assert!(ssh_add_l(&env) && secret_get(&env));
    println!(
        "connections under prlimit --nofile=26:26 (40 agent, 40 gRPC held): ssh-add -l median \
         {:.1} ms max {:.1} ms; secret get median {:.1} ms max {:.1} ms",
        median(&ssh_ms),
        ssh_ms.last().copied().unwrap_or(f64::NAN),
        median(&get_ms),
        get_ms.last().copied().unwrap_or(f64::NAN)
    );
}

#[test]
fn connections_fit_because_keyholderd_raises_its_soft_file_limit_to_the_hard_limit() {
    let env = Env::new();
    let daemon = env.start_daemon_under(&["prlimit", "--nofile=1024:4096"], &[]);
    assert_eq!(max_open_files(&daemon), "4096 4096");
}

/// The HTTP/2 preface, an empty SETTINGS frame and a PING: enough bytes for
/// a connection to count as one that has made requests, then silence.
const CLIENT_THAT_TALKED: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\
\x00\x00\x00\x04\x00\x00\x00\x00\x00\
\x00\x00\x08\x06\x00\x00\x00\x00\x00\x01\x02\x03\x04\x05\x06\x07\x08";

#[test]
fn connections_a_watch_in_progress_is_never_closed_to_make_room() {
    // 128 descriptors: the gRPC table holds a few dozen connections.
    let (env, daemon) = limited(128);
    let mut watch = env
        .command(crate::util::keyholder_bin())
        .args(["status", "--watch"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("status --watch starts");
    let mut stdout = watch.stdout.take().expect("stdout");
    // Read on a thread, so every wait below is bounded.
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0
                || tx
                    .send(String::from_utf8_lossy(&buf[..n]).into_owned())
                    .is_err()
            {
                break;
            }
        }
    });
    let mut seen = String::new();
    let wait_for = |seen: &mut String, needle: &str| {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !seen.contains(needle) {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(chunk) => seen.push_str(&chunk),
                Err(_) => break,
            }
        }
        seen.contains(needle)
    };
    assert!(wait_for(&mut seen, "state:"), "first block: {seen:?}");
    // Many connections that talked and went quiet: more than the table
    // holds, each newer (and so less idle) than the watch's.
    let held = open(&env.socket(), 200, CLIENT_THAT_TALKED);
    std::thread::sleep(Duration::from_millis(500));
    env.ok(&["lock"]);
    // The watch is still there and reports the change.
    let saw_lock = wait_for(&mut seen, "locked by:   request");
    let _ = watch.kill();
    let _ = watch.wait();
    let _ = reader.join();
    assert!(saw_lock, "the watch saw the lock: {seen:?}");
    drop(held);
    drop(daemon);
}
