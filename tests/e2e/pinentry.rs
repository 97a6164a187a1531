//! The PIN through pinentry: `keyholder unlock --pinentry`, and keyholderd's
//! unlock on demand, against a scripted pinentry stand-in that speaks the
//! Assuan protocol, logs every line it receives, and answers each GETPIN
//! with the next line of its answers file (CANCEL, or a missing line, is
//! the user pressing Cancel).

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::ssh::{agent_socket, frame, reply, session_bind};
use crate::util::{Env, PIN, assert_fails, assert_ok, output_within};

const STAND_IN: &str = r#"#!/bin/bash
dir="$(dirname "$0")"
log="$dir/pinentry.log"
echo "OK Pleased to meet you"
while IFS= read -r line; do
  printf '%s\n' "$line" >> "$log"
  case "$line" in
    GETPIN)
      n=$(cat "$dir/pinentry.count" 2>/dev/null || echo 0)
      n=$((n + 1))
      echo "$n" > "$dir/pinentry.count"
      # The user taking their time; anything the client sends meanwhile
      # (BYE when it gives up) ends the wait.
      [ -f "$dir/pinentry.delay" ] && read -r -t "$(cat "$dir/pinentry.delay")" _
      answer=$(sed -n "${n}p" "$dir/pinentry.answers")
      if [ -z "$answer" ] || [ "$answer" = CANCEL ]; then
        echo "ERR 83886179 Operation cancelled <Pinentry>"
      else
        printf 'D %s\nOK\n' "$answer"
      fi;;
    BYE) echo "OK closing connection"; exit 0;;
    *) echo OK;;
  esac
done
"#;

/// The stand-in, in its own directory inside the test's.
pub(crate) struct StandIn {
    dir: PathBuf,
}

impl StandIn {
    pub(crate) fn new(env: &Env) -> Self {
        let dir = env.path().join("pinentry");
        std::fs::create_dir(&dir).expect("stand-in dir");
        let program = dir.join("pinentry-stand-in");
        std::fs::write(&program, STAND_IN).expect("write stand-in");
        std::fs::set_permissions(&program, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let s = Self { dir };
        s.answers(&[]);
        s
    }

    pub(crate) fn program(&self) -> String {
        self.dir
            .join("pinentry-stand-in")
            .to_str()
            .expect("utf8")
            .to_owned()
    }

    /// What the next GETPINs answer, from the first on; resets the count.
    pub(crate) fn answers(&self, answers: &[&str]) {
        let mut text = answers.join("\n");
        text.push('\n');
        std::fs::write(self.dir.join("pinentry.answers"), text).expect("answers");
        let _ = std::fs::remove_file(self.dir.join("pinentry.count"));
        let _ = std::fs::remove_file(self.dir.join("pinentry.log"));
    }

    fn delay(&self, seconds: u32) {
        std::fs::write(self.dir.join("pinentry.delay"), seconds.to_string()).expect("delay");
    }

    pub(crate) fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("pinentry.log")).unwrap_or_default()
    }

    /// How many PIN dialogs were shown.
    pub(crate) fn prompts(&self) -> usize {
        self.log().lines().filter(|l| *l == "GETPIN").count()
    }
}

fn state(env: &Env) -> String {
    let out = env.ok(&["status", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("status json");
    v["state"].as_str().unwrap_or("").to_owned()
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn unlock_asks_through_pinentry_and_retries_a_wrong_pin() {
    let env = Env::new();
    let _daemon = env.start_daemon(&[]);
    env.init();
    let pinentry = StandIn::new(&env);

    // The right PIN: one dialog, with its texts, and the session opens.
    pinentry.answers(&[PIN]);
    env.ok(&["unlock", "--pinentry", &pinentry.program()]);
    assert_eq!(state(&env), "unlocked");
    let log = pinentry.log();
    assert_eq!(pinentry.prompts(), 1, "{log}");
    assert!(log.contains("SETTITLE Keyholder\n"), "{log}");
    assert!(
        log.contains("SETDESC Enter the PIN of the token that opens the Keyholder vault (keyholder unlock).\n"),
        "{log}"
    );
    assert!(log.contains("SETPROMPT PIN:\n"), "{log}");
    assert!(!log.contains("SETERROR"), "{log}");
    assert!(log.ends_with("GETPIN\nBYE\n"), "{log}");
    env.ok(&["lock"]);

    // A wrong PIN, then the right one: the second dialog says why.
    pinentry.answers(&["0000", PIN]);
    env.ok(&["unlock", "--pinentry", &pinentry.program()]);
    assert_eq!(state(&env), "unlocked");
    let log = pinentry.log();
    assert_eq!(pinentry.prompts(), 2, "{log}");
    assert!(
        log.contains("SETERROR token \"ops\" did not accept the PIN")
            && log.contains(" (try 2 of 3)\nGETPIN\n"),
        "{log}"
    );
    env.ok(&["lock"]);

    // Three wrong PINs: three dialogs, then the refusal (exit 7).
    pinentry.answers(&["0000", "0001", "0002", PIN]);
    let out = env.cli(&["unlock", "--pinentry", &pinentry.program()]);
    assert_fails(&out, 7, "did not accept the PIN");
    assert_eq!(pinentry.prompts(), 3, "{}", pinentry.log());
    assert_eq!(state(&env), "locked");

    // Cancel: exit 10 and a message that says so; still locked.
    pinentry.answers(&["CANCEL"]);
    let out = env.cli(&["unlock", "--pinentry", &pinentry.program()]);
    assert_fails(&out, 10, "the PIN entry was cancelled");
    assert_eq!(state(&env), "locked");

    // KEYHOLDER_PINENTRY names the program; --pin-file still comes first.
    pinentry.answers(&[PIN]);
    let mut c = env.command(crate::util::keyholder_bin());
    c.env("KEYHOLDER_PINENTRY", pinentry.program())
        .args(["unlock"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let out = output_within(c, Duration::from_secs(30)).expect("unlock finishes");
    assert_ok(&out, &["unlock"]);
    assert_eq!(pinentry.prompts(), 1);
    env.ok(&["lock"]);
    pinentry.answers(&["CANCEL"]);
    let mut c = env.command(crate::util::keyholder_bin());
    let pin_file = env.pin_file.to_str().expect("utf8");
    c.env("KEYHOLDER_PINENTRY", pinentry.program())
        .args(["unlock", "--pin-file", pin_file])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let out = output_within(c, Duration::from_secs(30)).expect("unlock finishes");
    assert_ok(&out, &["unlock", "--pin-file"]);
    assert_eq!(pinentry.prompts(), 0, "pinentry ran despite --pin-file");

    // A program that is not there is named.
    env.ok(&["lock"]);
    let out = env.cli(&["unlock", "--pinentry", "/nonexistent/pinentry"]);
    assert_fails(&out, 1, "/nonexistent/pinentry");
}

#[test]
fn init_asks_through_pinentry() {
    let env = Env::new();
    let _daemon = env.start_daemon(&[]);
    let pinentry = StandIn::new(&env);
    pinentry.answers(&[PIN]);
    env.ok(&[
        "init",
        "--token-label",
        &env.label,
        "--pinentry",
        &pinentry.program(),
    ]);
    assert!(
        pinentry.log().contains("(keyholder init)"),
        "{}",
        pinentry.log()
    );
    assert_eq!(state(&env), "locked");
}

/// A daemon with unlock on demand through the stand-in, an initialised
/// vault holding an ssh key `k` and a secret `s`, locked.
fn on_demand() -> (Env, crate::util::Daemon, StandIn) {
    let env = Env::new();
    let pinentry = StandIn::new(&env);
    let daemon = env.start_daemon(&["--unlock-on-demand", "--pinentry", &pinentry.program()]);
    env.init();
    env.unlock();
    env.ok(&["key", "generate", "k", "--type", "ed25519", "--ssh"]);
    env.put("s", b"value");
    env.ok(&["lock"]);
    (env, daemon, pinentry)
}

fn secret_get(env: &Env) -> std::process::Output {
    env.cli_within(&["secret", "get", "s"], Duration::from_secs(60))
        .expect("secret get finishes")
}

#[test]
fn a_request_on_a_locked_vault_asks_once_and_is_served() {
    let (env, daemon, pinentry) = on_demand();

    // gRPC: the first request that needs the vault shows one dialog naming
    // what asked, unlocks, and is answered.
    pinentry.answers(&[PIN]);
    let out = secret_get(&env);
    assert_ok(&out, &["secret", "get", "s"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "value");
    assert_eq!(pinentry.prompts(), 1);
    let log = pinentry.log();
    assert!(log.contains("Secrets.Get"), "{log}");
    assert!(log.contains("keyholder (pid "), "{log}");
    assert_eq!(state(&env), "unlocked");
    // Unlocked, nothing more is asked.
    assert_ok(&secret_get(&env), &["secret", "get", "s"]);
    assert_eq!(pinentry.prompts(), 1);

    // Several requests at once share one dialog.
    env.ok(&["lock"]);
    pinentry.answers(&[PIN, PIN, PIN]);
    pinentry.delay(1);
    let started: Vec<_> = (0..3)
        .map(|_| {
            let mut c = env.command(crate::util::keyholder_bin());
            c.args(["secret", "get", "s"])
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            std::thread::spawn(move || output_within(c, Duration::from_secs(60)))
        })
        .collect();
    for t in started {
        let out = t.join().expect("thread").expect("finishes");
        assert_ok(&out, &["secret", "get", "s"]);
    }
    assert_eq!(pinentry.prompts(), 1, "{}", pinentry.log());
    let _ = std::fs::remove_file(pinentry.dir.join("pinentry.delay"));

    // The kubectl exec plugin: one dialog, then its ExecCredential.
    env.ok(&["ca", "create", "kube"]);
    env.ok(&[
        "cluster",
        "add",
        "prod",
        "--server",
        "https://127.0.0.1:6443",
        "--ca",
        "kube",
    ]);
    env.ok(&["lock"]);
    pinentry.answers(&[PIN]);
    let out = env
        .cli_within(
            &["kube-credential", "--cluster", "prod", "--user", "alice"],
            Duration::from_secs(60),
        )
        .expect("kube-credential finishes");
    assert_ok(&out, &["kube-credential"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("ExecCredential"));
    assert_eq!(pinentry.prompts(), 1);
    assert!(daemon.log_text().contains("unlocked on demand"));
}

#[test]
fn cancel_or_a_wrong_pin_fails_as_locked_and_backs_off() {
    let (env, daemon, pinentry) = on_demand();

    pinentry.answers(&["CANCEL", PIN]);
    let out = secret_get(&env);
    assert_fails(&out, 3, "locked");
    assert_eq!(pinentry.prompts(), 1);
    // A client that tries again at once gets no new dialog.
    let started = Instant::now();
    for _ in 0..3 {
        assert_fails(&secret_get(&env), 3, "locked");
    }
    assert!(started.elapsed() < Duration::from_secs(9));
    assert_eq!(pinentry.prompts(), 1, "{}", pinentry.log());
    assert!(daemon.log_text().contains("waiting out the back-off"));
    // After the back-off, the next request asks again.
    std::thread::sleep(Duration::from_millis(10_500).saturating_sub(started.elapsed()));
    assert_ok(&secret_get(&env), &["secret", "get", "s"]);
    assert_eq!(pinentry.prompts(), 2);

    // A wrong PIN: locked, logged, and backed off the same way.
    env.ok(&["lock"]);
    pinentry.answers(&["0000", PIN]);
    assert_fails(&secret_get(&env), 3, "locked");
    assert_fails(&secret_get(&env), 3, "locked");
    assert_eq!(pinentry.prompts(), 1);
    assert!(daemon.log_text().contains("unlock on demand refused"));
    assert_eq!(state(&env), "locked");
}

#[test]
fn shutdown_calls_off_a_dialog_in_progress() {
    let (env, daemon, pinentry) = on_demand();
    pinentry.answers(&[PIN]);
    pinentry.delay(30);
    let mut c = env.command(crate::util::keyholder_bin());
    c.args(["secret", "get", "s"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let client = std::thread::spawn(move || output_within(c, Duration::from_secs(60)));
    let deadline = Instant::now() + Duration::from_secs(20);
    while pinentry.prompts() == 0 {
        assert!(Instant::now() < deadline, "no dialog appeared");
        std::thread::sleep(Duration::from_millis(50));
    }
    let started = Instant::now();
    let status = daemon.stop();
    assert!(status.success(), "{status}");
    // Not the 30 s the user could take: the dialog is called off.
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "{:?}",
        started.elapsed()
    );
    let out = client.join().expect("thread").expect("client finishes");
    assert!(!out.status.success());
}

fn agent_identities(stream: &mut std::os::unix::net::UnixStream) -> Vec<u8> {
    stream.write_all(&frame(&[11])).expect("write");
    let answer = reply(stream).expect("identities");
    assert_eq!(answer[0], 12);
    answer
}

#[test]
fn the_agent_asks_for_local_clients_and_never_for_forwarded_ones() {
    let (env, _daemon, pinentry) = on_demand();
    let sock = agent_socket(&env);

    // A connection bound as forwarded (a host reached with ssh -A): no
    // dialog, nothing listed, no signature.
    let host_file = env.path().join("host_key");
    let out = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&host_file)
        .output()
        .expect("ssh-keygen");
    assert!(out.status.success());
    let host = ssh_key::PrivateKey::read_openssh_file(&host_file).expect("host key");
    let mut forwarded = std::os::unix::net::UnixStream::connect(&sock).expect("agent");
    forwarded
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    pinentry.answers(&[PIN]);
    forwarded
        .write_all(&frame(&session_bind(&host, &[7u8; 32], true)))
        .expect("bind");
    reply(&mut forwarded).expect("bind answer");
    let listed = agent_identities(&mut forwarded);
    assert_eq!(
        &listed[1..5],
        &0u32.to_be_bytes(),
        "a forwarded list showed keys"
    );
    assert_eq!(
        pinentry.prompts(),
        0,
        "a forwarded connection made a dialog appear"
    );
    assert_eq!(state(&env), "locked");

    // A local client: ssh-keygen -Y sign with the key's public half lists,
    // which asks once, and signs.
    let public = env.path().join("k.pub");
    let out = env.ok(&["key", "show", "k", "--public"]);
    assert_eq!(pinentry.prompts(), 1, "key show asked");
    std::fs::write(&public, out).expect("k.pub");
    env.ok(&["lock"]);
    pinentry.answers(&[PIN]);
    let data = env.file("data", "signed through the agent\n");
    let mut c = Command::new("ssh-keygen");
    c.env("SSH_AUTH_SOCK", &sock)
        .args(["-Y", "sign", "-n", "file", "-f"])
        .arg(&public)
        .arg(&data)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let out = output_within(c, Duration::from_secs(60)).expect("ssh-keygen finishes");
    assert!(out.status.success(), "ssh-keygen -Y sign: {}", stderr(&out));
    assert!(data.with_extension("sig").exists() || env.path().join("data.sig").exists());
    assert_eq!(pinentry.prompts(), 1, "{}", pinentry.log());
    assert!(pinentry.log().contains("Agent."), "{}", pinentry.log());
    assert_eq!(state(&env), "unlocked");

    // The forwarded connection, still open, now lists and signs, but
    // after a lock it still makes no dialog appear.
    env.ok(&["lock"]);
    pinentry.answers(&[PIN]);
    let listed = agent_identities(&mut forwarded);
    assert_eq!(&listed[1..5], &0u32.to_be_bytes());
    assert_eq!(pinentry.prompts(), 0);
}

/// `keyholder ARGS` on a pseudo-terminal that util-linux `script` provides,
/// with `path_first` ahead of PATH, typing the PIN there after a second;
/// returns what the terminal showed.
fn unlock_on_a_terminal(env: &Env, args: &str, path_first: Option<&std::path::Path>) -> String {
    let command = format!(
        "{} --socket {} {args}",
        crate::util::keyholder_bin(),
        env.socket().to_str().expect("utf8")
    );
    let mut c = env.command("script");
    if let Some(dir) = path_first {
        let path = std::env::var("PATH").unwrap_or_default();
        c.env("PATH", format!("{}:{path}", dir.display()));
    }
    c.args(["-qec", &command, "/dev/null"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c.spawn().expect("script runs");
    let mut typist = child.stdin.take().expect("stdin");
    // Type the PIN once pinentry-tty shows its prompt (a second is plenty
    // here; a PIN typed earlier is not lost either, the terminal keeps it).
    std::thread::sleep(Duration::from_secs(1));
    typist
        .write_all(format!("{PIN}\r").as_bytes())
        .expect("type");
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("keyholder {args} did not finish");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(typist);
    let out = child.wait_with_output().expect("output");
    let shown = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{shown}{}", stderr(&out));
    assert!(shown.contains("PIN:"), "{shown}");
    assert!(!shown.contains(PIN), "the PIN was echoed: {shown}");
    shown
}

/// The real `pinentry-tty` on a terminal: the CLI names the terminal it
/// runs on (OPTION ttyname), and the PIN typed there unlocks; named with
/// --pinentry, and as `pinentry` from PATH (the documented
/// `keyholder unlock --pinentry`).
#[test]
fn the_real_pinentry_tty_unlocks_on_a_terminal() {
    const PROGRAM: &str = "/usr/bin/pinentry-tty";
    assert!(
        std::path::Path::new(PROGRAM).exists(),
        "{PROGRAM} is missing: scripts/install-deps installs pinentry-tty"
    );
    let env = Env::new();
    let _daemon = env.start_daemon(&[]);
    env.init();
    unlock_on_a_terminal(&env, &format!("unlock --pinentry {PROGRAM}"), None);
    assert_eq!(state(&env), "unlocked");
    env.ok(&["lock"]);

    let bin = env.path().join("bin");
    std::fs::create_dir(&bin).expect("bin");
    std::os::unix::fs::symlink(PROGRAM, bin.join("pinentry")).expect("symlink");
    unlock_on_a_terminal(&env, "unlock --pinentry", Some(&bin));
    assert_eq!(state(&env), "unlocked");
}
