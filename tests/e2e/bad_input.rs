//! Bad input: each gets a clear error, the daemon keeps serving, and the
//! vault file is not changed.

use std::process::Command;

use crate::util::{Env, MODULE, assert_fails};

fn vault_bytes(env: &Env) -> Vec<u8> {
    std::fs::read(&env.vault).expect("vault exists")
}

#[test]
fn wrong_pin_is_refused_and_nothing_changes() {
    let env = Env::new();
    let _daemon = env.start_daemon(&[]);
    env.init();
    let before = vault_bytes(&env);
    let bad = env.file("bad-pin", "0000\n");
    let out = env.cli(&["unlock", "--pin-file", bad.to_str().expect("utf8")]);
    assert_fails(&out, 7, "did not accept the PIN");
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains("0000"),
        "the PIN must not be echoed back"
    );
    assert!(env.ok(&["status"]).contains("locked"));
    assert_eq!(vault_bytes(&env), before);
    env.unlock();
}

#[test]
fn unknown_token_label_and_bad_uris_are_named() {
    let env = Env::new();
    let _daemon = env.start_daemon(&[]);
    let pin = env.pin_file.to_str().expect("utf8");
    let out = env.cli(&["init", "--token-label", "nosuch", "--pin-file", pin]);
    assert_fails(&out, 4, "no token matches label \"nosuch\"");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("\"ops\""),
        "lists the tokens present"
    );
    let out = env.cli(&[
        "init",
        "--token-uri",
        "pkcs11:token=ops?module-path=/tmp/evil.so",
        "--pin-file",
        pin,
    ]);
    assert_fails(&out, 6, "module-path");
    let out = env.cli(&[
        "init",
        "--token-label",
        "ops",
        "--recovery-recipient",
        "age1bogus",
        "--pin-file",
        pin,
    ]);
    assert_fails(&out, 6, "recovery_recipient");
    assert!(!env.vault.exists(), "no vault written by refused inits");
    assert!(env.ok(&["status"]).contains("uninitialized"));
    env.init();
    let out = env.cli(&["init", "--token-label", "ops", "--pin-file", pin]);
    assert_fails(&out, 5, "already exists");
}

#[test]
fn missing_or_unloadable_module_stops_the_daemon_with_a_clear_error() {
    let env = Env::new();
    let vault = env.vault.to_str().expect("utf8").to_owned();
    let out = env.run_daemon_to_exit(&[
        "--pkcs11-module",
        "/nonexistent/libpkcs11.so",
        "--vault",
        &vault,
    ]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("/nonexistent/libpkcs11.so") && stderr.contains("No such file"),
        "{stderr}"
    );

    let not_a_module = env.file("not-a-module.so", "this is not a shared object");
    let out = env.run_daemon_to_exit(&[
        "--pkcs11-module",
        not_a_module.to_str().expect("utf8"),
        "--vault",
        &vault,
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot use PKCS#11 module"));

    // A real shared library that is not a PKCS#11 module.
    let libc = "/lib/x86_64-linux-gnu/libc.so.6";
    if std::path::Path::new(libc).exists() {
        let out = env.run_daemon_to_exit(&["--pkcs11-module", libc, "--vault", &vault]);
        assert_eq!(
            out.status.code(),
            Some(2),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let out = env.run_daemon_to_exit(&["--vault", &vault]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--pkcs11-module"));
}

#[test]
fn damaged_or_substituted_vaults_are_refused_and_left_alone() {
    let env = Env::new();
    let daemon = env.start_daemon(&[]);
    env.init();
    env.unlock();
    env.put("db/pw", b"hunter2");
    let token_recipient = {
        let status: serde_json::Value =
            serde_json::from_str(&env.ok(&["--json", "status"])).expect("json");
        status["token"]["recipients"][0]
            .as_str()
            .expect("recipient")
            .to_owned()
    };
    drop(daemon);
    let genuine = vault_bytes(&env);

    // A forgery: valid age, encrypted to the token's public recipient, with
    // a well-formed document, but written without the token.
    let forged_doc = format!(
        r#"{{"format":"keyholder-vault","version":1,"vault_id":"00","body":{{"generation":99,"created_at":"2026-01-01T00:00:00Z","updated_at":"2026-01-01T00:00:00Z","recipients":{{"tokens":[{{"recipient":"{token_recipient}","label":"ops","serial":"x","key_id":"00"}}],"recovery":[]}},"secrets":{{"db/pw":{{"value":"attacker","encoding":"utf8","size":8,"created_at":"2026-01-01T00:00:00Z","updated_at":"2026-01-01T00:00:00Z"}}}}}},"auth":[{{"recipient":"{token_recipient}","alg":"HMAC-SHA256","mac":"AAAA"}}]}}"#
    );
    let recipient: age::tag::Recipient = token_recipient.parse().expect("recipient");
    let forged = age::encrypt(&recipient, forged_doc.as_bytes()).expect("encrypt");

    let mut flipped = genuine.clone();
    let at = flipped.len() - 20;
    flipped[at] ^= 0x01;
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "truncated",
            genuine[..genuine.len() / 2].to_vec(),
            "damaged",
        ),
        ("empty", Vec::new(), "damaged"),
        ("corrupt", flipped, "damaged"),
        (
            "not age",
            b"{\"format\":\"keyholder-vault\"}".to_vec(),
            "damaged",
        ),
        ("forged", forged, "not written by the holder of this token"),
    ];
    for (what, bytes, needle) in cases {
        std::fs::write(&env.vault, &bytes).expect("write case");
        let _daemon = env.start_daemon(&[]);
        let out = env.cli(&["unlock", "--pin-file", env.pin_file.to_str().expect("utf8")]);
        assert_fails(&out, 9, needle);
        assert!(
            env.ok(&["status"]).contains("locked"),
            "{what}: daemon still serving, still locked"
        );
        assert_eq!(
            vault_bytes(&env),
            bytes,
            "{what}: the file is left as it was"
        );
    }

    // Substituted: a genuine vault of another token.
    let other = Env::new();
    let other_daemon = other.start_daemon(&[]);
    other.init();
    drop(other_daemon);
    let foreign = std::fs::read(&other.vault).expect("other vault");
    std::fs::write(&env.vault, &foreign).expect("substitute");
    let _daemon = env.start_daemon(&[]);
    let out = env.cli(&["unlock", "--pin-file", env.pin_file.to_str().expect("utf8")]);
    assert_fails(&out, 3, "not encrypted to this token");
    assert_eq!(vault_bytes(&env), foreign);

    // And the genuine file, put back, opens.
    drop(_daemon);
    std::fs::write(&env.vault, &genuine).expect("restore");
    let _daemon = env.start_daemon(&[]);
    env.unlock();
    assert_eq!(env.ok(&["secret", "get", "db/pw"]), "hunter2");
}

#[test]
fn bad_names_oversized_values_and_locked_requests_get_clear_errors() {
    let env = Env::new();
    let _daemon = env.start_daemon(&["--max-secret-bytes", "1024"]);
    env.init();
    let out = env.cli_with_stdin(&["secret", "put", "a"], Some(b"x"));
    assert_fails(&out, 3, "the vault is locked: run `keyholder unlock`");
    assert_fails(&env.cli(&["secret", "list"]), 3, "locked");
    assert_fails(&env.cli(&["secret", "rm", "a"]), 3, "locked");
    env.unlock();
    let before = vault_bytes(&env);
    let long = "a".repeat(300);
    for (name, needle) in [
        ("", "name: must not be empty"),
        (long.as_str(), "name: is 300 bytes; the limit is 256"),
        ("db/../etc", "name: must not contain '.' or '..' segments"),
        ("/abs", "empty segment"),
        ("sp ace", "contains ' '"),
    ] {
        let out = env.cli_with_stdin(&["secret", "put", name], Some(b"v"));
        assert_fails(&out, 6, needle);
    }
    let big = vec![b'x'; 1025];
    let out = env.cli_with_stdin(&["secret", "put", "big"], Some(&big));
    assert_fails(&out, 6, "value is 1025 bytes; the limit is 1024");
    // Far over the transport limit too: still a clean refusal.
    let huge = vec![b'x'; 300 * 1024];
    let out = env.cli_with_stdin(&["secret", "put", "huge"], Some(&huge));
    assert_eq!(
        out.status.code(),
        Some(6),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        vault_bytes(&env),
        before,
        "refused writes leave the vault unchanged"
    );
    env.put("ok", &vec![b'y'; 1024]);
}

#[test]
fn a_second_daemon_on_the_same_vault_is_refused() {
    let env = Env::new();
    let _daemon = env.start_daemon(&[]);
    env.init();
    let vault = env.vault.to_str().expect("utf8").to_owned();
    let other_socket = env.path().join("other.sock");
    let out = env.run_daemon_to_exit(&[
        "--pkcs11-module",
        MODULE,
        "--vault",
        &vault,
        "--socket",
        other_socket.to_str().expect("utf8"),
    ]);
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stderr).contains("in use by another process"));
    // Same socket, other vault: the live socket is not stolen.
    let out = env.run_daemon_to_exit(&[
        "--pkcs11-module",
        MODULE,
        "--vault",
        env.path().join("other.age").to_str().expect("utf8"),
    ]);
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stderr).contains("another keyholderd is serving"));
    assert!(env.ok(&["status"]).contains("locked"));
}

/// `pkcs11-tool` (OpenSC) on the test's SoftHSM2 token, logged in.
pub(crate) fn pkcs11_tool(env: &Env, args: &[&str]) -> std::process::Output {
    Command::new("pkcs11-tool")
        .env("SOFTHSM2_CONF", &env.softhsm_conf)
        .arg("--module")
        .arg(&env.module)
        .args(["--token-label", "ops", "--login", "--pin", crate::util::PIN])
        .args(args)
        .output()
        .expect("pkcs11-tool runs (apt-get install opensc)")
}

#[test]
fn a_malformed_generation_record_on_the_token_is_refused_and_can_be_replaced() {
    let (env, daemon) = Env::ready();
    env.put("kept", b"1");
    env.ok(&["lock"]);

    // Find Keyholder's record and put a 7-byte one in its place, as a
    // buggy or hostile program holding the PIN could.
    let listed = pkcs11_tool(&env, &["--list-objects", "--type", "data"]);
    let listing = String::from_utf8_lossy(&listed.stdout);
    let label = listing
        .lines()
        .filter_map(|l| l.trim().strip_prefix("label:"))
        .map(|l| l.trim().trim_matches('\''))
        .find(|l| l.starts_with("keyholder-generation:"))
        .unwrap_or_else(|| panic!("no generation record on the token: {listing}"))
        .to_owned();
    let deleted = pkcs11_tool(
        &env,
        &["--delete-object", "--type", "data", "--label", &label],
    );
    assert!(deleted.status.success(), "{deleted:?}");
    let bad = env.file("bad-record", "1234567");
    let written = pkcs11_tool(
        &env,
        &[
            "--write-object",
            bad.to_str().expect("utf8"),
            "--type",
            "data",
            "--label",
            &label,
            "--application-label",
            "keyholder",
            "--private",
        ],
    );
    assert!(written.status.success(), "{written:?}");

    let pin = env.pin_file.to_str().expect("utf8");
    let refused = env.cli(&["unlock", "--pin-file", pin]);
    assert!(
        !refused.status.success(),
        "unlocked past a malformed record"
    );
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("is malformed"),
        "{refused:?}"
    );
    assert!(
        env.ok(&["status"]).contains("locked"),
        "still locked, still serving"
    );

    // The PIN holder can replace it on purpose; from then on all is normal.
    env.ok(&["unlock", "--pin-file", pin, "--accept-older-vault"]);
    assert_eq!(env.ok(&["secret", "get", "kept"]), "1");
    env.ok(&["lock"]);
    env.ok(&["unlock", "--pin-file", pin]);
    assert_eq!(env.ok(&["secret", "get", "kept"]), "1");
    assert!(
        daemon
            .log_text()
            .contains("unreadable generation record replaced on request")
    );
}

#[test]
fn extreme_durations_are_refused_and_locking_still_works_afterwards() {
    let (env, daemon) = Env::ready();
    let pin = env.path().join("pin");
    let pin = pin.to_str().expect("utf8");
    let huge = "500000years";
    env.ok(&["lock"]);
    // Idle and TTL beyond the daemon's maximum: refused before the token is touched.
    for flag in ["--idle", "--ttl"] {
        let out = env.cli(&["unlock", "--pin-file", pin, flag, huge]);
        assert_fails(&out, 6, "is longer than the daemon's max_session_ttl");
    }
    env.unlock();
    // A CA that may issue forever still issues nothing longer than 100 years.
    env.ok(&["ca", "create", "wide", "--max-ttl", huge]);
    let out = env.cli(&["ca", "create", "old", "--validity", huge]);
    assert_fails(&out, 6, "validity_seconds");
    let out = env.cli(&[
        "cert",
        "issue",
        "--ca",
        "wide",
        "--profile",
        "client",
        "--cn",
        "a",
        "--ttl",
        huge,
    ]);
    assert_fails(&out, 6, "ttl");
    env.ok(&[
        "ca",
        "create",
        "wide-ssh",
        "--kind",
        "ssh",
        "--max-ttl",
        huge,
    ]);
    env.ok(&["key", "generate", "deploy", "--type", "ed25519", "--ssh"]);
    let out = env.cli(&[
        "ssh-cert",
        "--ca",
        "wide-ssh",
        "--key",
        "deploy",
        "--principal",
        "root",
        "--ttl",
        huge,
    ]);
    assert_fails(&out, 6, "ttl_seconds");
    let out = env.cli(&[
        "ssh-cert",
        "--ca",
        "wide-ssh",
        "--key",
        "deploy",
        "--principal",
        "root",
        "--extension",
        "permit-pty",
        "--extension",
        "permit-pty",
    ]);
    assert_fails(&out, 6, "extensions");

    // The session checks still run: a 2-second idle timeout locks.
    env.ok(&["lock"]);
    env.ok(&["unlock", "--pin-file", pin, "--idle", "2s"]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let status = env.ok(&["status", "--json"]);
        if status.contains("\"idle\"") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never idle-locked: {status}"
        );
        std::thread::sleep(std::time::Duration::from_millis(250));
    }
    let log = daemon.log_text();
    assert!(!log.contains("panicked"), "{log}");
}

#[test]
fn request_strings_cannot_forge_log_lines() {
    let (env, daemon) = Env::ready();
    env.ok(&["ca", "create", "kube"]);
    env.ok(&["ca", "create", "users", "--kind", "ssh"]);
    env.ok(&["key", "generate", "deploy", "--type", "ed25519", "--ssh"]);
    let forged = |n: u32| format!("x\n2026-12-02T00:00:00.000000Z  INFO FORGED{n}\r\x1b[1A\t");
    // Whatever the daemon accepts or refuses, none of it may start a line.
    let _ = env.cli(&[
        "cert",
        "issue",
        "--ca",
        "kube",
        "--profile",
        "client",
        "--cn",
        &forged(1),
        "--o",
        &forged(2),
    ]);
    let _ = env.cli(&[
        "cert",
        "issue",
        "--ca",
        "kube",
        "--profile",
        "server",
        "--cn",
        "s",
        "--san",
        &forged(3),
    ]);
    let _ = env.cli(&[
        "ssh-cert",
        "--ca",
        "users",
        "--key",
        "deploy",
        "--principal",
        "root",
        "--key-id",
        &forged(4),
    ]);
    let _ = env.cli(&[
        "ssh-cert",
        "--ca",
        "users",
        "--key",
        "deploy",
        "--principal",
        &forged(5),
    ]);
    let _ = env.cli(&["secret", "get", &forged(6)]);
    let _ = env.cli(&["ca", "create", &forged(7)]);
    env.ok(&[
        "cluster",
        "add",
        "prod",
        "--server",
        "https://127.0.0.1:6443",
        "--ca",
        "kube",
    ]);
    let _ = env.cli(&[
        "kubeconfig",
        "prod",
        "--user",
        &forged(8),
        "--group",
        &forged(9),
    ]);
    let log = daemon.log_text();
    assert!(
        log.contains("FORGED4"),
        "the SSH certificate was not logged: {log}"
    );
    for line in log.lines() {
        assert!(
            !line.contains("INFO FORGED") || line.contains("\\n"),
            "forged line: {line:?}"
        );
        assert!(
            !line.starts_with("2026-12-02T00:00:00"),
            "forged line: {line:?}"
        );
        assert!(
            !line.contains('\x1b') && !line.contains('\r'),
            "raw control: {line:?}"
        );
    }
}

#[test]
fn the_vault_key_on_the_token_derives_and_never_signs_or_leaves() {
    let (env, _daemon) = Env::ready();
    let out = pkcs11_tool(&env, &["--list-objects", "--type", "privkey"]);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    let vault_key = text
        .split("Private Key Object")
        .find(|block| block.contains("label:      keyholder-vault"))
        .unwrap_or_else(|| panic!("no vault key in: {text}"));
    let usage = vault_key
        .lines()
        .find(|l| l.trim_start().starts_with("Usage:"))
        .unwrap_or_else(|| panic!("no usage line in: {vault_key}"));
    assert!(usage.contains("derive"), "{usage}");
    assert!(!usage.contains("sign"), "{usage}");
    assert!(vault_key.contains("never extractable"), "{vault_key}");
    assert!(vault_key.contains("sensitive"), "{vault_key}");
}

#[test]
fn a_key_made_by_another_tool_is_adopted_as_the_vault_key_by_its_uri() {
    let env = Env::new();
    let daemon = env.start_daemon(&[]);
    for (id, usage) in [("03", "--usage-derive"), ("04", "--usage-sign")] {
        let out = pkcs11_tool(
            &env,
            &[
                "--keypairgen",
                "--key-type",
                "EC:prime256v1",
                "--label",
                "made-elsewhere",
                "--id",
                id,
                usage,
            ],
        );
        assert!(out.status.success(), "{out:?}");
    }
    let pin = env.pin_file.to_str().expect("utf8").to_owned();
    // A key that may not do ECDH is refused by name, and nothing is created.
    let out = env.cli(&[
        "init",
        "--token-uri",
        "pkcs11:token=ops;id=%04",
        "--pin-file",
        &pin,
    ]);
    assert_fails(&out, 3, "CKA_DERIVE is false");
    assert!(!env.vault.exists());

    env.ok(&[
        "init",
        "--token-uri",
        "pkcs11:token=ops;id=%03",
        "--pin-file",
        &pin,
    ]);
    // No key was generated: the token still holds the two keys it had.
    let listed = pkcs11_tool(&env, &["--list-objects", "--type", "privkey"]);
    let text = String::from_utf8_lossy(&listed.stdout);
    assert_eq!(text.matches("Private Key Object").count(), 2, "{text}");
    env.unlock();
    env.put("db/pw", b"adopted");
    env.ok(&["lock"]);
    drop(daemon);
    let _daemon = env.start_daemon(&[]);
    env.unlock();
    assert_eq!(env.ok(&["secret", "get", "db/pw"]), "adopted");
}

#[test]
fn piv_slot_flags_are_checked_and_a_wrong_management_key_creates_nothing() {
    let env = Env::new();
    let _daemon = env.start_daemon(&[]);
    let pin = env.pin_file.to_str().expect("utf8").to_owned();
    let key_file = env.file("mgmt", "000000000000000000000000000000000000000000000000\n");
    let key = key_file.to_str().expect("utf8");
    let init = |extra: &[&str]| {
        let mut args = vec!["init", "--token-label", "ops", "--pin-file", &pin];
        args.extend_from_slice(extra);
        env.cli(&args)
    };
    let out = init(&["--piv-slot", "9b", "--management-key-file", key]);
    assert_fails(&out, 6, "\"9b\" is not a PIV key slot");
    // Without a terminal and without the file, the CLI says how to give it.
    assert_fails(&init(&["--piv-slot", "9d"]), 1, "--management-key-file");
    assert_fails(&init(&["--management-key-file", key]), 2, "--piv-slot");
    let out = env.cli(&[
        "init",
        "--token-uri",
        "pkcs11:token=ops;id=%03",
        "--piv-slot",
        "9d",
        "--pin-file",
        &pin,
    ]);
    assert_fails(&out, 2, "--piv-slot");
    // SoftHSM2 takes the management key as its SO PIN and refuses it.
    let out = init(&["--piv-slot", "9d", "--management-key-file", key]);
    assert_fails(&out, 7, "did not accept the management key");
    assert!(!env.vault.exists(), "no vault after a refused init");
    // The session went back to the user: a plain init works.
    env.init();
}
