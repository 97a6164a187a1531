//! `--json` holds on every command: each prints exactly one JSON value on
//! stdout (`status --watch` one object per line). The list of commands is
//! read from `keyholder --help`, so a new command without a case here fails.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use crate::util::{Env, assert_ok, keyholder_bin};

/// A command, its arguments after it, and its stdin.
type Case<'a> = (&'a str, Vec<String>, Option<&'a [u8]>);

/// The subcommand names listed under "Commands:" in `keyholder ARGS --help`.
fn subcommands(args: &[&str]) -> Vec<String> {
    let out = Command::new(keyholder_bin())
        .args(args)
        .arg("--help")
        .output()
        .expect("keyholder --help");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .filter(|c| c != "help")
        .collect()
}

/// Every leaf command, as "group sub" or "cmd".
fn leaf_commands() -> BTreeSet<String> {
    let mut leaves = BTreeSet::new();
    for c in subcommands(&[]) {
        let subs = subcommands(&[&c]);
        if subs.is_empty() {
            leaves.insert(c);
        } else {
            for s in subs {
                leaves.insert(format!("{c} {s}"));
            }
        }
    }
    leaves
}

fn openssl(args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .output()
        .expect("openssl");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn every_command_prints_one_json_value_with_json() {
    let env = Env::new();
    env.add_token("second");
    let _daemon = env.start_daemon(&[]);
    let dir = env.path();
    let s = |p: &std::path::Path| p.to_str().expect("utf8").to_owned();
    let pin = s(&env.pin_file);
    let data = s(&env.file("data", "to sign"));
    let policy = s(&env.file(
        "policy.toml",
        "default = \"allow\"\n[[rule]]\nname = \"nobody\"\nexe = [\"/nonexistent\"]\nallow = [\"list\"]\n",
    ));
    let (ca_cert, ca_key) = (dir.join("ca.crt"), dir.join("ca.key"));
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        &s(&ca_key),
        "-out",
        &s(&ca_cert),
        "-subj",
        "/CN=imported",
        "-days",
        "2",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    ]);
    let ssh_key = dir.join("id_ed25519");
    let keygen = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&ssh_key)
        .output()
        .expect("ssh-keygen");
    assert!(keygen.status.success());

    // In order: each case is (command, arguments after it, stdin).
    let cases: Vec<Case> = vec![
        (
            "init",
            vec![
                "--token-label".into(),
                "ops".into(),
                "--pin-file".into(),
                pin.clone(),
            ],
            None,
        ),
        ("unlock", vec!["--pin-file".into(), pin.clone()], None),
        ("status", vec![], None),
        ("tokens", vec![], None),
        (
            "token enrol",
            vec![
                "--token-label".into(),
                "second".into(),
                "--token-pin-file".into(),
                pin.clone(),
                "--pin-file".into(),
                pin.clone(),
            ],
            None,
        ),
        ("token list", vec![], None),
        (
            "token revoke",
            vec!["second".into(), "--pin-file".into(), pin.clone()],
            None,
        ),
        ("secret put", vec!["db/pw".into()], Some(b"hunter2")),
        ("secret get", vec!["db/pw".into()], None),
        (
            "secret get",
            vec!["db/pw".into(), "--out".into(), s(&dir.join("pw"))],
            None,
        ),
        ("secret list", vec![], None),
        (
            "secret put",
            vec!["db/pw".into(), "--force".into()],
            Some(b"hunter3"),
        ),
        (
            "secret get",
            vec!["db/pw".into(), "--version".into(), "1".into()],
            None,
        ),
        ("secret history", vec!["db/pw".into()], None),
        (
            "secret rollback",
            vec!["db/pw".into(), "--to".into(), "1".into()],
            None,
        ),
        (
            "run",
            vec![
                "--env".into(),
                "PW=db/pw".into(),
                "--".into(),
                "sh".into(),
                "-c".into(),
                "printf '{\"length\": %d}' ${#PW}".into(),
            ],
            None,
        ),
        (
            "inject",
            vec![
                "--in".into(),
                s(&env.file("app.tpl", "pw={{ secret \"db/pw\" }}\n")),
                "--out".into(),
                s(&dir.join("app.conf")),
            ],
            None,
        ),
        (
            "kube-secret",
            vec![
                "db".into(),
                "--namespace".into(),
                "default".into(),
                "--from".into(),
                "password=db/pw".into(),
            ],
            None,
        ),
        ("ca create", vec!["kube".into()], None),
        (
            "client issue",
            vec![
                "--ca".into(),
                "kube".into(),
                "--name".into(),
                "ci".into(),
                "--out-dir".into(),
                s(&dir.join("client")),
            ],
            None,
        ),
        (
            "ca create",
            vec!["ssh-users".into(), "--kind".into(), "ssh".into()],
            None,
        ),
        (
            "ca import",
            vec![
                "imported".into(),
                "--cert".into(),
                s(&ca_cert),
                "--key".into(),
                s(&ca_key),
            ],
            None,
        ),
        ("ca list", vec![], None),
        ("ca show", vec!["kube".into()], None),
        ("ca export", vec!["kube".into()], None),
        ("ca export", vec!["ssh-users".into()], None),
        (
            "cluster add",
            vec![
                "prod".into(),
                "--server".into(),
                "https://127.0.0.1:6443".into(),
                "--ca".into(),
                "kube".into(),
            ],
            None,
        ),
        ("cluster list", vec![], None),
        (
            "cluster pki",
            vec![
                "lab".into(),
                "--control-plane".into(),
                "cp-1=127.0.0.1".into(),
                "--etcd".into(),
                "etcd-1=127.0.0.1".into(),
                "--service-ip".into(),
                "10.96.0.1".into(),
                "--out-dir".into(),
                env.path().join("lab-pki").display().to_string(),
            ],
            None,
        ),
        ("cluster certs", vec!["lab".into()], None),
        (
            "kubeconfig",
            vec!["prod".into(), "--user".into(), "alice".into()],
            None,
        ),
        (
            "kubeconfig",
            vec![
                "prod".into(),
                "--user".into(),
                "alice".into(),
                "--out".into(),
                s(&dir.join("kc")),
            ],
            None,
        ),
        (
            "kubeconfig",
            vec![
                "prod".into(),
                "--user".into(),
                "alice".into(),
                "--exec".into(),
            ],
            None,
        ),
        (
            "kube-credential",
            vec![
                "--cluster".into(),
                "prod".into(),
                "--user".into(),
                "alice".into(),
            ],
            None,
        ),
        (
            "cert issue",
            vec!["--ca".into(), "kube".into(), "--cn".into(), "a".into()],
            None,
        ),
        (
            "key generate",
            vec!["k".into(), "--ssh".into(), "--sign".into()],
            None,
        ),
        (
            "key import",
            vec!["imp".into(), "--file".into(), s(&ssh_key)],
            None,
        ),
        ("key list", vec![], None),
        ("key show", vec!["k".into()], None),
        ("key show", vec!["k".into(), "--public".into()], None),
        (
            "sign",
            vec!["--key".into(), "k".into(), "--in".into(), data.clone()],
            None,
        ),
        (
            "sign",
            vec![
                "--key".into(),
                "k".into(),
                "--in".into(),
                data,
                "--out".into(),
                s(&dir.join("sig")),
            ],
            None,
        ),
        (
            "ssh-cert",
            vec![
                "--ca".into(),
                "ssh-users".into(),
                "--key".into(),
                "k".into(),
                "--principal".into(),
                "root".into(),
            ],
            None,
        ),
        ("ssh-env", vec![], None),
        ("audit tail", vec!["-n".into(), "1".into()], None),
        ("audit verify", vec![], None),
        (
            "policy set",
            vec![policy.clone(), "--pin-file".into(), pin.clone()],
            None,
        ),
        ("policy get", vec![], None),
        (
            "policy explain",
            vec![
                "--op".into(),
                "secret-read".into(),
                "--object".into(),
                "db/pw".into(),
            ],
            None,
        ),
        (
            "grant create",
            vec![
                "--name".into(),
                "g".into(),
                "--allow".into(),
                "secret:read:db/*".into(),
                "--pin-file".into(),
                pin.clone(),
            ],
            None,
        ),
        ("grant list", vec![], None),
        ("grant revoke", vec!["g".into()], None),
        ("key rm", vec!["imp".into()], None),
        ("cluster rm", vec!["prod".into()], None),
        ("secret rm", vec!["db/pw".into()], None),
        ("lock", vec![], None),
    ];
    let mut covered = BTreeSet::new();
    for (command, rest, stdin) in &cases {
        let mut args: Vec<&str> = vec!["--json"];
        args.extend(command.split(' '));
        args.extend(rest.iter().map(String::as_str));
        let out = env.cli_with_stdin(&args, *stdin);
        assert_ok(&out, &args);
        let stdout = String::from_utf8_lossy(&out.stdout);
        let value: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
            panic!("keyholder {args:?} printed no single JSON value ({e}):\n{stdout}")
        });
        assert!(value.is_object() || value.is_array(), "{args:?}: {value}");
        covered.insert(command.to_string());
    }
    covered.insert("status".into());

    // status --watch: one JSON object per line.
    let mut watch = Command::new(keyholder_bin())
        .args(["--json", "status", "--watch"])
        .env("XDG_RUNTIME_DIR", &env.runtime)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("status --watch");
    let stdout = watch.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let line = rx.recv_timeout(Duration::from_secs(10));
    let _ = watch.kill();
    let _ = watch.wait();
    let line = line.expect("status --watch printed a line");
    let first: serde_json::Value = serde_json::from_str(line.trim()).expect("a JSON line");
    assert_eq!(first["state"], "locked", "{first}");

    let leaves = leaf_commands();
    assert!(leaves.len() > 25, "--help lists only {leaves:?}");
    let missing: Vec<_> = leaves.difference(&covered).cloned().collect();
    assert!(
        missing.is_empty(),
        "commands without a --json case here: {missing:?}"
    );
}
