//! The audit log with the real binaries: every operation leaves its
//! record, no secret reaches it, `audit verify` names each kind of
//! tampering, a log that cannot be written refuses requests and service
//! resumes, and the commands in docs/audit.md run as written.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::ssh::{Sshd, agent_socket, public_file};
use crate::util::{DocBlocks, Env, assert_fails, assert_ok};

const DOCS: DocBlocks = DocBlocks {
    path: "docs/audit.md",
    text: include_str!("../../docs/audit.md"),
    mark: "<!-- run by tests/e2e/audit.rs: ",
};

fn log_path(env: &Env) -> PathBuf {
    env.vault.parent().expect("vault dir").join("audit.log")
}

fn records_in(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).expect("audit log");
    // Past the records of a running keyholderd: zeros allocated ahead.
    text.trim_end_matches('\0')
        .lines()
        .map(|l| serde_json::from_str(l).expect("each line is JSON"))
        .collect()
}

fn find<'a>(records: &'a [Value], op: &str, object: &str) -> &'a Value {
    records
        .iter()
        .rev()
        .find(|r| r["op"] == op && r["object"] == object)
        .unwrap_or_else(|| panic!("no {op} {object} record in {records:#?}"))
}

/// A world whose token PIN cannot appear in a hex digest by chance.
fn env_with_pin(pin: &str) -> Env {
    let mut env = Env::new();
    env.add_token_with_pin("audited", pin);
    env.label = "audited".into();
    std::fs::write(&env.pin_file, format!("{pin}\n")).expect("pin file");
    env
}

#[test]
fn every_operation_is_recorded_with_its_caller_and_no_secret_reaches_the_log() {
    const PIN: &str = "worn-PIN-7731";
    const CANARY: &str = "canary-value-Qx7Zk";
    let env = env_with_pin(PIN);
    let daemon = env.start_daemon(&[]);
    env.init();
    env.unlock();
    env.put("db/prod", CANARY.as_bytes());
    assert_eq!(env.ok(&["secret", "get", "db/prod"]), CANARY);
    env.ok(&["secret", "list"]);
    assert_fails(&env.cli(&["secret", "get", "nope"]), 4, "does not exist");
    env.ok(&["ca", "create", "etcd"]);
    let out_dir = env.path().join("etcd-1");
    let issued = env.ok(&[
        "--json",
        "cert",
        "issue",
        "--ca",
        "etcd",
        "--profile",
        "server",
        "--cn",
        "etcd-1",
        "--san",
        "127.0.0.1",
        "--ttl",
        "1h",
        "--out-dir",
        out_dir.to_str().expect("utf8"),
    ]);
    let issued: Value = serde_json::from_str(&issued).expect("json");
    env.ok(&["key", "generate", "deploy", "--type", "ed25519", "--ssh"]);
    // An agent signature, through the stock ssh-keygen.
    let pubkey = public_file(&env, "deploy");
    let data = env.file("data.txt", "signed through the agent\n");
    let signed = Command::new("ssh-keygen")
        .env("SSH_AUTH_SOCK", agent_socket(&env))
        .args(["-Y", "sign", "-n", "file", "-f"])
        .arg(&pubkey)
        .arg(&data)
        .stdin(Stdio::null())
        .output()
        .expect("ssh-keygen runs");
    assert!(signed.status.success(), "{signed:?}");
    // A grant's token, presented by a script.
    let token = grant_and_use(&env, PIN);
    env.ok(&["lock"]);
    let wrong = env.path().join("wrong-pin");
    std::fs::write(&wrong, "not-the-PIN\n").expect("pin");
    assert_fails(
        &env.cli(&["unlock", "--pin-file", wrong.to_str().expect("utf8")]),
        7,
        "",
    );
    env.unlock();

    let records = records_in(&log_path(&env));
    let me = std::fs::canonicalize(crate::util::keyholder_bin()).expect("cli path");
    let put = find(&records, "Secrets.Put", "secret:db/prod");
    assert_eq!(put["outcome"], "ok");
    assert_eq!(put["caller"]["exe"], me.to_str().expect("utf8"));
    assert_eq!(put["caller"]["channel"], "grpc");
    assert!(put["caller"]["pid"].as_i64().is_some());
    assert_eq!(
        put["caller"]["uid"],
        rustix::process::getuid().as_raw(),
        "{put}"
    );
    assert_eq!(
        find(&records, "Secrets.Get", "secret:db/prod")["outcome"],
        "ok"
    );
    let missing = find(&records, "Secrets.Get", "secret:nope");
    assert_eq!(missing["outcome"], "failed");
    assert!(
        missing["reason"]
            .as_str()
            .unwrap_or("")
            .contains("NotFound"),
        "{missing}"
    );
    let cert = find(&records, "Credentials.IssueCertificate", "cert:etcd:server");
    assert_eq!(cert["request"]["ttl_seconds"], 3600, "{cert}");
    assert_eq!(
        cert["request"]["names"],
        serde_json::json!(["etcd-1", "127.0.0.1"]),
        "{cert}"
    );
    let serial = issued["serial"].as_str().unwrap_or_default();
    assert!(
        !serial.is_empty() && cert.to_string().contains(serial),
        "the serial {serial} in {cert}"
    );
    let sign = find(&records, "Agent.Sign", "agent:deploy");
    assert_eq!(sign["caller"]["channel"], "agent");
    assert_eq!(sign["caller"]["exe"], "/usr/bin/ssh-keygen");
    assert_eq!(sign["details"]["sha256"].as_str().map(str::len), Some(64));
    let grant_use = records
        .iter()
        .find(|r| r["caller"]["grant"] == "audit-canary")
        .unwrap_or_else(|| panic!("no record of the grant's use: {records:#?}"));
    assert_eq!(grant_use["object"], "secret:db/prod");
    assert_eq!(
        find(&records, "Trust.CreateGrant", "grant:audit-canary")["outcome"],
        "ok"
    );
    let lock = find(&records, "session.lock", "session");
    assert_eq!(lock["details"]["reason"], "request");
    assert!(lock["caller"].is_null());
    let unlocks: Vec<&str> = records
        .iter()
        .filter(|r| r["op"] == "Session.Unlock")
        .map(|r| r["outcome"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(unlocks, ["ok", "failed", "ok"], "{records:#?}");

    // Never a value, a PIN or a grant token.
    let text = std::fs::read_to_string(log_path(&env)).expect("log");
    for canary in [CANARY, PIN, "not-the-PIN", token.as_str()] {
        assert!(!text.contains(canary), "{canary:?} is in the audit log");
    }
    let verified = env.ok(&["audit", "verify"]);
    assert!(verified.contains("audit log intact"), "{verified}");
    drop(daemon);
}

/// Creates a grant through the Trust API (Python grpcio), reads a secret
/// with it, and returns its token.
fn grant_and_use(env: &Env, pin: &str) -> String {
    let stubs = crate::python::generate_stubs(env);
    let script = env.file(
        "grant.py",
        r#"import sys
sys.path.insert(0, sys.argv[2])
import grpc
from keyholder.v1 import keyholder_pb2 as pb
from keyholder.v1 import keyholder_pb2_grpc as rpc
with grpc.insecure_channel("unix:" + sys.argv[1], options=[("grpc.default_authority", "localhost")]) as ch:
    r = rpc.TrustStub(ch).CreateGrant(pb.CreateGrantRequest(
        name="audit-canary", allow=["secret:read:db/*"], expires_seconds=600, pin=sys.argv[3]))
    got = rpc.SecretsStub(ch).Get(pb.GetSecretRequest(name="db/prod"),
                                  metadata=[("authorization", "Bearer " + r.token)])
    assert got.value
    print(r.token)
"#,
    );
    let out = Command::new("python3")
        .arg(&script)
        .arg(env.socket())
        .arg(&stubs)
        .arg(pin)
        .output()
        .expect("python3 runs");
    assert!(out.status.success(), "grant.py: {out:?}");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn write_lines(path: &Path, lines: &[String]) {
    std::fs::write(path, lines.join("\n") + "\n").expect("write log");
}

/// `audit verify --log FILE --json` against the running daemon: exit 9 and
/// the problem, or success.
fn verify_json(env: &Env, log: &Path) -> (i32, Value) {
    let out = env.cli(&[
        "--json",
        "audit",
        "verify",
        "--log",
        log.to_str().expect("utf8"),
    ]);
    let v: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|_| panic!("verify prints JSON: {out:?}"));
    (out.status.code().unwrap_or(-1), v)
}

#[test]
fn verify_names_the_record_edited_removed_reordered_inserted_and_detects_truncation() {
    let (env, daemon) = Env::ready();
    for i in 0..6 {
        env.put(&format!("s/{i}"), b"v");
        env.ok(&["secret", "get", &format!("s/{i}")]);
    }
    // The lock anchors the log and records its head in the vault.
    env.ok(&["lock"]);
    env.unlock();
    let own = log_path(&env);
    let original: Vec<String> = std::fs::read_to_string(&own)
        .expect("log")
        .trim_end_matches('\0')
        .lines()
        .map(str::to_owned)
        .collect();
    assert!(original.len() > 20, "{}", original.len());
    let seq_of = |line: &str| -> u64 {
        serde_json::from_str::<Value>(line).expect("json")["seq"]
            .as_u64()
            .expect("seq")
    };
    let copy_dir = env.path().join("copy");
    std::fs::create_dir(&copy_dir).expect("copy dir");
    let copy = copy_dir.join("audit.log");

    write_lines(&copy, &original);
    let (code, v) = verify_json(&env, &copy);
    assert_eq!(code, 0, "{v}");
    assert_eq!(v["macs_checked"], true, "{v}");
    assert!(v["anchors"].as_u64().unwrap_or(0) >= 2, "{v}");

    let k = 10;
    let target = seq_of(&original[k]);
    let check = |lines: Vec<String>, kind: &str, seq: u64| {
        write_lines(&copy, &lines);
        let (code, v) = verify_json(&env, &copy);
        assert_eq!(code, 9, "{kind}: {v}");
        assert_eq!(v["problem"]["kind"], kind, "{v}");
        assert_eq!(v["problem"]["seq"], seq, "{kind}: {v}");
        assert!(
            v["problem"]["message"]
                .as_str()
                .unwrap_or("")
                .contains(&format!("record {seq}")),
            "{v}"
        );
    };
    // Edited: a name changed in place.
    let mut edited = original.clone();
    edited[k] = edited[k].replacen("\"outcome\":\"ok\"", "\"outcome\":\"failed\"", 1);
    assert_ne!(edited[k], original[k]);
    check(edited, "edited", target);
    // Removed.
    let mut removed = original.clone();
    removed.remove(k);
    check(removed, "removed", target + 1);
    // Reordered.
    let mut reordered = original.clone();
    reordered.swap(k, k + 1);
    check(reordered, "reordered", target + 1);
    // Inserted: a copy of an earlier record.
    let mut inserted = original.clone();
    inserted.insert(k, original[2].clone());
    check(inserted, "inserted", seq_of(&original[2]));
    // Rewritten from some record on with every hash recomputed: the chain
    // holds, the next anchor's MAC does not.
    let mut rewritten = original[..k].to_vec();
    let mut prev = serde_json::from_str::<Value>(&original[k - 1]).expect("json")["hash"]
        .as_str()
        .expect("hash")
        .to_owned();
    for line in &original[k..] {
        let mut v: Value = serde_json::from_str(line).expect("json");
        let obj = v.as_object_mut().expect("object");
        obj.remove("hash");
        obj.insert("prev".into(), Value::String(prev.clone()));
        if obj["op"] == "Secrets.Get" {
            obj.insert("outcome".into(), Value::String("failed".into()));
        }
        let body = serde_json::to_string(&v).expect("json");
        let (sealed, hash) = keyholder_audit::seal(&body).expect("seal");
        rewritten.push(sealed);
        prev = hash;
    }
    write_lines(&copy, &rewritten);
    let (code, v) = verify_json(&env, &copy);
    assert_eq!(code, 9, "{v}");
    assert_eq!(v["problem"]["kind"], "rewritten", "{v}");
    // Locked, only the chain is checked, and said so.
    env.ok(&["lock"]);
    let out = env.cli(&["audit", "verify", "--log", copy.to_str().expect("utf8")]);
    assert_ok(&out, &["audit", "verify"]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("only the hash chain was checked"),
        "{out:?}"
    );
    env.unlock();

    // Truncated back behind the head the vault recorded at the last lock.
    let now: Vec<String> = std::fs::read_to_string(&own)
        .expect("log")
        .trim_end_matches('\0')
        .lines()
        .map(str::to_owned)
        .collect();
    let anchor = now
        .iter()
        .rposition(|l| l.contains("\"op\":\"session.lock\""))
        .expect("a lock record");
    write_lines(&own, &now[..anchor - 2]);
    let out = env.cli(&["audit", "verify"]);
    assert_fails(&out, 9, "records were removed from the end");
    // Offline, without the daemon: the chain alone, with a note.
    daemon.stop();
    write_lines(&own, &now);
    let out = env.cli(&["audit", "verify", "--log", own.to_str().expect("utf8")]);
    assert_ok(&out, &["audit", "verify", "--log"]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("keyholderd is not reachable"),
        "{out:?}"
    );
}

/// A small tmpfs mounted for one test, unmounted when dropped.
struct SmallFs(PathBuf);

impl SmallFs {
    fn mount(dir: &Path, size: &str) -> Option<Self> {
        std::fs::create_dir_all(dir).expect("mount point");
        let ok = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(dir)
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| Self(dir.to_path_buf()))
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn a_full_disk_refuses_requests_releases_nothing_and_service_resumes() {
    let env = Env::new();
    let logs = env.path().join("logs");
    let Some(fs) = SmallFs::mount(&logs, "256k") else {
        panic!("mounting a tmpfs needs root; CI runs as root");
    };
    let log = logs.join("audit.log");
    let daemon = env.start_daemon(&["--audit-log", log.to_str().expect("utf8")]);
    env.init();
    env.unlock();
    env.put("app/token", b"canary-full-disk");
    // Fill the file system.
    let filler = logs.join("filler");
    let _ = Command::new("dd")
        .args(["if=/dev/zero", "bs=4k"])
        .arg(format!("of={}", filler.display()))
        .stderr(Stdio::null())
        .status();
    // The log's last page may still hold a few records; then a request
    // whose record does not fit is refused and gets nothing.
    let mut refused = None;
    for _ in 0..40 {
        let out = env.cli(&["secret", "get", "app/token"]);
        if out.status.success() {
            assert_eq!(out.stdout, b"canary-full-disk");
            continue;
        }
        refused = Some(out);
        break;
    }
    let out = refused.expect("a request is refused once the disk is full");
    assert_fails(&out, 8, "audit log cannot be written");
    assert!(out.stdout.is_empty(), "released: {out:?}");
    // Refused up front while the log cannot be written, writes included.
    let out = env.cli_with_stdin(&["secret", "put", "app/other"], Some(b"x"));
    assert_fails(&out, 8, "audit log cannot be written");
    assert_fails(
        &env.cli(&["secret", "list"]),
        8,
        "audit log cannot be written",
    );
    // Status and lock still answer.
    env.ok(&["status"]);
    // Space returns: service resumes with the next request.
    std::fs::remove_file(&filler).expect("remove filler");
    assert_eq!(env.ok(&["secret", "get", "app/token"]), "canary-full-disk");
    let records = records_in(&log);
    let resumed = records
        .iter()
        .find(|r| r["op"] == "audit.resumed")
        .unwrap_or_else(|| panic!("no audit.resumed record: {records:#?}"));
    assert!(
        resumed["details"]["lost"].as_u64().unwrap_or(0) >= 1,
        "{resumed}"
    );
    assert!(
        !std::fs::read_to_string(&log)
            .expect("log")
            .contains("canary-full-disk")
    );
    assert!(
        env.cli(&["secret", "get", "app/other"]).status.code() == Some(4),
        "a write refused for the audit log did not happen"
    );
    env.ok(&["audit", "verify"]);
    daemon.stop();
    drop(fs);
}

#[test]
fn a_removed_log_directory_refuses_requests_until_it_is_back() {
    let env = Env::new();
    let logs = env.path().join("logs");
    let log = logs.join("audit.log");
    let _daemon = env.start_daemon(&["--audit-log", log.to_str().expect("utf8")]);
    env.init();
    env.unlock();
    env.put("a", b"1");
    std::fs::remove_dir_all(&logs).expect("remove");
    let out = env.cli(&["secret", "get", "a"]);
    assert_fails(&out, 8, "audit log cannot be written");
    assert!(out.stdout.is_empty());
    assert_fails(
        &env.cli(&["secret", "get", "a"]),
        8,
        "audit log cannot be written",
    );
    std::fs::create_dir(&logs).expect("mkdir");
    assert_eq!(env.ok(&["secret", "get", "a"]), "1");
    // The records that went with the removed file are reported missing.
    assert_fails(&env.cli(&["audit", "verify"]), 9, "were removed");
}

#[test]
fn an_agent_signature_over_a_forwarded_connection_is_recorded_as_forwarded() {
    assert!(
        rustix::process::getuid().is_root(),
        "sshd needs root; CI runs as root"
    );
    let (env, _daemon) = Env::ready();
    env.ok(&["key", "generate", "deploy", "--type", "ed25519", "--ssh"]);
    let login = env.path().join("id_login");
    let made = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&login)
        .output()
        .expect("ssh-keygen");
    assert!(made.status.success(), "{made:?}");
    let authorized = std::fs::read_to_string(format!("{}.pub", login.display())).expect("pub");
    let sshd = Sshd::start(&env.path().join("sshd"), &authorized, "");
    let deploy_pub = public_file(&env, "deploy");
    let data = env.file("data.txt", "signed on the remote host\n");
    let remote = format!(
        "ssh-keygen -Y sign -n file -f {} {} >/dev/null 2>&1; echo sign=$?",
        deploy_pub.display(),
        data.display()
    );
    let out = sshd.ssh_forwarding(&env, &login, &remote);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("sign=0"),
        "{out:?}"
    );
    let records = records_in(&log_path(&env));
    let sign = find(&records, "Agent.Sign", "agent:deploy");
    assert_eq!(sign["caller"]["forwarded"], true, "{sign}");
    assert_eq!(sign["caller"]["channel"], "agent");
    assert!(sign["caller"]["host_key"].as_str().is_some(), "{sign}");
    // `audit tail` shows it as a person reads it.
    let tail = env.ok(&["audit", "tail", "-n", "200"]);
    assert!(
        tail.lines()
            .any(|l| l.contains("Agent.Sign agent:deploy") && l.contains("(forwarded)")),
        "{tail}"
    );
}

/// A process that connects to the agent and then execs another program is
/// judged and recorded as the program that connected: the caller is read
/// when the connection is accepted, not at its first request.
#[test]
fn an_agent_connection_keeps_the_identity_it_had_when_it_was_accepted() {
    let (env, _daemon) = Env::ready();
    env.ok(&["key", "generate", "deploy", "--type", "ed25519", "--ssh"]);
    let python = std::fs::canonicalize("/usr/bin/python3").expect("python3");
    // The same interpreter at another path: another executable to policy.
    let other = env.path().join("elsewhere").join("python3");
    std::fs::create_dir_all(other.parent().expect("dir")).expect("dir");
    std::fs::copy(&python, &other).expect("copy python3");
    let admin = std::fs::canonicalize(crate::util::keyholder_bin()).expect("cli");
    let policy = env.file(
        "policy.toml",
        &format!(
            "default = \"deny\"\n\n[[rule]]\nname = \"admin-cli\"\nexe = [\"{}\"]\nallow = [\"*\"]\n\n\
             [[rule]]\nname = \"first-program\"\nexe = [\"{}\"]\nallow = [\"agent:deploy\"]\n",
            admin.display(),
            python.display()
        ),
    );
    env.ok(&[
        "policy",
        "set",
        policy.to_str().expect("utf8"),
        "--pin-file",
        env.pin_file.to_str().expect("utf8"),
    ]);
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/agent_exec.py");
    let deploy_pub = public_file(&env, "deploy");
    let run = |first: &Path| {
        Command::new(first)
            .arg(&script)
            .arg(agent_socket(&env))
            .arg(if first == python { &other } else { &python })
            .arg(&deploy_pub)
            .stdin(Stdio::null())
            .output()
            .expect("python3 runs")
    };
    // Connected as the allowed program, signing after exec of the other.
    let out = run(&python);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "signed",
        "{out:?}"
    );
    let records = records_in(&log_path(&env));
    let sign = find(&records, "Agent.Sign", "agent:deploy");
    assert_eq!(sign["outcome"], "ok", "{sign}");
    assert_eq!(
        sign["caller"]["exe"],
        python.to_str().expect("utf8"),
        "{sign}"
    );
    // Connected as the other program, it stays the other program after
    // exec of the allowed one.
    let out = run(&other);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "refused",
        "{out:?}"
    );
    let records = records_in(&log_path(&env));
    let denied = find(&records, "Agent.Sign", "agent:deploy");
    assert_eq!(denied["outcome"], "denied", "{denied}");
    assert_eq!(
        denied["caller"]["exe"],
        other.to_str().expect("utf8"),
        "{denied}"
    );
}

#[test]
fn tail_follows_new_records() {
    let (env, _daemon) = Env::ready();
    let mut child = env
        .command(crate::util::keyholder_bin())
        .args(["--json", "audit", "tail", "-n", "0", "--follow"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("tail runs");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    // The tail's own record comes first, then the put.
    std::thread::sleep(Duration::from_millis(300));
    env.put("followed", b"x");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let mut seen = Vec::new();
    while std::time::Instant::now() < deadline {
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(200)) {
            let v: Value = serde_json::from_str(&line).expect("json");
            let done = v["op"] == "Secrets.Put" && v["object"] == "secret:followed";
            seen.push(v);
            if done {
                break;
            }
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        seen.iter().any(|v| v["op"] == "Secrets.Put"),
        "tail --follow did not show the put: {seen:#?}"
    );
}

#[test]
fn the_documented_commands_run_as_written() {
    assert_eq!(
        DOCS.marked(),
        ["tail", "verify", "verify-offline"],
        "every marked block of docs/audit.md is run here"
    );
    let mut env = Env::new();
    // The default places, as the docs name them.
    env.vault = env.path().join(".local/share/keyholder/vault.age");
    let daemon = env.start_daemon(&[]);
    env.init();
    env.unlock();
    env.put("db/prod/password", b"x");
    env.ok(&["secret", "get", "db/prod/password"]);
    let out = DOCS.run(&env, "tail", &[]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("Secrets.Get secret:db/prod/password"),
        "{text}"
    );
    let out = DOCS.run(&env, "verify", &[]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("audit log intact"),
        "{out:?}"
    );
    daemon.stop();
    let out = DOCS.run(&env, "verify-offline", &[]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("audit log intact"),
        "{out:?}"
    );
    let before = std::fs::read_to_string(log_path(&env)).expect("log");
    // keyholderd with the log off writes nothing to it.
    let daemon = env.start_daemon(&["--audit-log", "off"]);
    env.unlock();
    env.ok(&["secret", "get", "db/prod/password"]);
    assert_fails(&env.cli(&["audit", "tail"]), 4, "audit log \"off\"");
    daemon.stop();
    assert_eq!(
        std::fs::read_to_string(log_path(&env)).expect("log"),
        before
    );
}

#[test]
fn timed_locks_are_recorded_with_their_reason_and_rotation_keeps_the_chain() {
    let env = Env::new();
    let config_dir = env.path().join("config/keyholder");
    std::fs::create_dir_all(&config_dir).expect("config dir");
    std::fs::write(
        config_dir.join("keyholderd.toml"),
        "audit_max_bytes = 4096\n",
    )
    .expect("config");
    let daemon = env.start_daemon(&[]);
    env.init();
    let pin = env.pin_file.to_str().expect("utf8").to_owned();
    env.ok(&["unlock", "--idle", "1s", "--pin-file", &pin]);
    env.put("a", b"1");
    std::thread::sleep(Duration::from_millis(2600));
    env.ok(&["unlock", "--ttl", "1s", "--pin-file", &pin]);
    std::thread::sleep(Duration::from_millis(2600));
    env.unlock();
    for i in 0..20 {
        env.ok(&["secret", "get", "a"]);
        env.ok(&["secret", "list", &format!("x/{i}")]);
    }
    let files = keyholder_audit::log_files(&log_path(&env)).expect("files");
    assert!(files.len() >= 3, "rotated by size: {files:?}");
    let mut records = Vec::new();
    for f in &files {
        records.extend(records_in(f));
    }
    let reasons: Vec<&str> = records
        .iter()
        .filter(|r| r["op"] == "session.lock")
        .map(|r| r["details"]["reason"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(reasons, ["idle", "expired"], "{records:#?}");
    // Each lock is followed by its anchor, and the seqs run on across files.
    for (i, r) in records.iter().enumerate() {
        assert_eq!(r["seq"].as_u64(), Some(i as u64 + 1), "{r}");
        if r["op"] == "session.lock" {
            assert_eq!(records[i + 1]["op"], "audit.anchor", "{r}");
        }
    }
    let out = env.ok(&["--json", "audit", "verify"]);
    let v: Value = serde_json::from_str(&out).expect("json");
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(v["head_checked"], true, "{v}");
    assert_eq!(
        v["files"].as_array().map(Vec::len),
        Some(files.len()),
        "{v}"
    );
    // Removing the oldest rotated file is removing records.
    std::fs::remove_file(&files[0]).expect("remove");
    assert_fails(&env.cli(&["audit", "verify"]), 9, "records 1 to");
    daemon.stop();
}
