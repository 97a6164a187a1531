//! The CLI checks what it talks to before it sends a byte: a socket whose
//! directory belongs to another uid, or whose listening process runs as
//! another uid, gets neither the PIN nor a secret.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::util::{Env, PIN, keyholder_bin};

const NOBODY: u32 = 65534;

/// A listener that accepts every connection and counts what it receives,
/// printing a JSON summary on SIGTERM.
const LISTENER: &str = r#"
import json, os, signal, socket, sys, time
s = socket.socket(socket.AF_UNIX)
s.bind(sys.argv[1])
s.listen(16)
s.settimeout(0.05)
stop = False
def on_term(*_):
    global stop
    stop = True
signal.signal(signal.SIGTERM, on_term)
conns, accepted, received = [], 0, b""
deadline = time.time() + 60
while not stop and time.time() < deadline:
    try:
        c, _ = s.accept()
        c.settimeout(0.05)
        conns.append(c)
        accepted += 1
    except (socket.timeout, InterruptedError):
        pass
    for c in conns:
        try:
            received += c.recv(65536)
        except (socket.timeout, OSError):
            pass
print(json.dumps({"accepted": accepted, "received": len(received), "text": received.decode("latin-1")}))
"#;

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

fn chown_nobody(path: &Path) {
    std::os::unix::fs::chown(path, Some(NOBODY), Some(NOBODY)).expect("chown");
}

/// Starts the listener as uid nobody on `path` and waits until it listens.
fn listen_as_nobody(path: &Path) -> Child {
    let child = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .args(["/usr/bin/python3", "-c", LISTENER])
        .arg(path)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("setpriv runs");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !path.exists() {
        assert!(Instant::now() < deadline, "the listener did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

/// Stops the listener by PID and returns what it received.
fn stop_listener(mut child: Child) -> serde_json::Value {
    if let Some(pid) = rustix::process::Pid::from_raw(child.id() as i32) {
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the listener ignored SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().expect("listener output");
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "listener: {e}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// Runs the CLI with `XDG_RUNTIME_DIR=runtime`, killed after 10 seconds (a
/// CLI that talks to the squatter waits for an answer that never comes).
fn cli(env: &Env, runtime: &Path, args: &[&str], stdin: &[u8]) -> Output {
    let mut child = Command::new(keyholder_bin())
        .args(args)
        .env("XDG_RUNTIME_DIR", runtime)
        .env("HOME", env.path())
        .env_remove("KEYHOLDER_SOCKET")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("keyholder runs");
    if let Some(mut pipe) = child.stdin.take() {
        let _ = pipe.write_all(stdin);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("keyholder output")
}

/// The world both tests share: the test dir open to nobody for traversal.
fn world() -> Env {
    assert!(
        rustix::process::getuid().is_root(),
        "this test runs a listener as uid nobody and must run as root (CI does)"
    );
    let env = Env::new();
    chmod(env.path(), 0o755);
    env
}

/// Runs examples/kubeconfig.py against `sock`.
fn python_example(env: &Env, sock: &Path) -> Output {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let stubs = crate::python::generate_stubs(env);
    Command::new("timeout")
        .args(["20", "python3"])
        .arg(root.join("examples/kubeconfig.py"))
        .arg("--socket")
        .arg(sock)
        .args(["--cluster", "prod", "--user", "ci", "--out"])
        .arg(env.path().join("prod.kubeconfig"))
        .env("PYTHONPATH", &stubs)
        .output()
        .expect("python3 runs")
}

fn assert_refused_without_a_byte(
    env: &Env,
    runtime: &Path,
    sock: &Path,
    listener: Child,
    needle: &str,
) {
    let pin = env.pin_file.to_str().expect("utf8");
    let unlock = cli(env, runtime, &["unlock", "--pin-file", pin], b"");
    let put = cli(
        env,
        runtime,
        &["secret", "put", "db/password"],
        b"canary-value-77",
    );
    let python = python_example(env, sock);
    let seen = stop_listener(listener);
    let stderr = String::from_utf8_lossy(&python.stderr);
    assert!(
        !python.status.success(),
        "the Python example went on: {stderr}"
    );
    assert!(stderr.contains(needle), "stderr lacks {needle:?}: {stderr}");
    assert!(!env.path().join("prod.kubeconfig").exists());
    for out in [&unlock, &put] {
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(7), "expected exit 7: {stderr}");
        assert!(stderr.contains(needle), "stderr lacks {needle:?}: {stderr}");
        assert!(
            stderr.contains(&sock.display().to_string())
                || stderr.contains(&runtime.display().to_string()),
            "the message names no path: {stderr}"
        );
        assert!(stderr.contains("nothing was sent"), "{stderr}");
    }
    assert_eq!(seen["received"], 0, "the squatter received bytes: {seen}");
    let text = seen["text"].as_str().unwrap_or("");
    assert!(
        !text.contains(PIN) && !text.contains("canary-value-77"),
        "{seen}"
    );
}

#[test]
fn a_socket_directory_of_another_uid_gets_no_pin_and_no_secret() {
    let env = world();
    // Another user created the runtime directory first and listens there.
    let runtime = env.path().join("squatted");
    std::fs::create_dir(&runtime).expect("mkdir");
    chmod(&runtime, 0o755);
    let dir = runtime.join("keyholder");
    std::fs::create_dir(&dir).expect("mkdir");
    chown_nobody(&dir);
    chmod(&dir, 0o700);
    let sock = dir.join("keyholder.sock");
    let listener = listen_as_nobody(&sock);
    assert_refused_without_a_byte(
        &env,
        &runtime,
        &sock,
        listener,
        &format!("belongs to uid {NOBODY}"),
    );
}

#[test]
fn a_socket_served_by_another_uid_gets_no_pin_and_no_secret() {
    let env = world();
    // The directory is ours and private, but the socket in it is served by
    // nobody (say, moved there through a path we trusted).
    let theirs: PathBuf = env.path().join("theirs");
    std::fs::create_dir(&theirs).expect("mkdir");
    chown_nobody(&theirs);
    chmod(&theirs, 0o700);
    let their_sock = theirs.join("keyholder.sock");
    let listener = listen_as_nobody(&their_sock);
    let runtime = env.runtime.clone();
    let dir = runtime.join("keyholder");
    std::fs::create_dir(&dir).expect("mkdir");
    chmod(&dir, 0o700);
    let sock = dir.join("keyholder.sock");
    std::fs::rename(&their_sock, &sock).expect("move the socket");
    assert_refused_without_a_byte(
        &env,
        &runtime,
        &sock,
        listener,
        &format!("runs as uid {NOBODY}"),
    );
}

#[test]
fn a_socket_directory_others_may_write_is_refused() {
    let env = world();
    let dir = env.runtime.join("keyholder");
    std::fs::create_dir(&dir).expect("mkdir");
    chmod(&dir, 0o777);
    let out = cli(&env, &env.runtime, &["status"], b"");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(7), "{stderr}");
    assert!(stderr.contains("writable by group or others"), "{stderr}");
}
