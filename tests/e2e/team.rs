//! Several tokens open one vault (docs/team.md): SoftHSM2 and NSS softokn,
//! two different PKCS#11 implementations, each in a daemon of its own over
//! the same vault file; enrolment and revocation need the PIN again, the
//! last token cannot be revoked, and a revoked token still opens copies of
//! the file made before.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::util::{DocBlocks, Env, NSS_LABEL, NSS_SOFTOKN, assert_fails, assert_ok};

fn records(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).expect("audit log");
    text.trim_end_matches('\0')
        .lines()
        .map(|l| serde_json::from_str(l).expect("each line is JSON"))
        .collect()
}

fn enrolled(env: &Env) -> Vec<Value> {
    let list: Value =
        serde_json::from_str(&env.ok(&["--json", "token", "list"])).expect("json list");
    list.as_array().expect("array").clone()
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf8")
}

#[test]
fn a_second_token_of_another_make_opens_the_vault_and_a_revoked_one_does_not() {
    let mut env = Env::new();
    let pin = env.pin_file.clone();
    let nss_args = env.nss_db();
    let wrong = env.file("wrong-pin", "0000\n");

    // The first daemon: SoftHSM2, as any vault starts; its configuration
    // names the module it may load for an enrolment.
    let config = env.file(
        "keyholderd.toml",
        &format!("enrol_modules = [\"{NSS_SOFTOKN}\"]\n"),
    );
    let softhsm = env.start_daemon(&["--config", s(&config)]);
    env.init();
    env.unlock();
    env.put("db/pw", b"written under SoftHSM2");
    let enrol = |step_up: &Path, extra: &[&str]| {
        let mut args = vec![
            "token",
            "enrol",
            "--token-label",
            NSS_LABEL,
            "--pkcs11-module",
            NSS_SOFTOKN,
            "--pkcs11-init-args",
            &nss_args,
            "--token-pin-file",
            s(&pin),
            "--pin-file",
            s(step_up),
        ];
        args.extend_from_slice(extra);
        env.cli(&args)
    };

    // Without the session's PIN again, nothing is enrolled.
    let out = enrol(&wrong, &["--without-rollback-record"]);
    assert_fails(&out, 7, "wrong PIN");
    let out = env.cli(&[
        "token",
        "enrol",
        "--token-label",
        NSS_LABEL,
        "--pkcs11-module",
        NSS_SOFTOKN,
        "--pkcs11-init-args",
        &nss_args,
        "--token-pin-file",
        s(&pin),
    ]);
    assert!(!out.status.success(), "no step-up PIN: {out:?}");
    assert_eq!(enrolled(&env).len(), 1);
    // A module the configuration does not name is never loaded.
    let out = env.cli(&[
        "token",
        "enrol",
        "--token-label",
        NSS_LABEL,
        "--pkcs11-module",
        "/usr/lib/x86_64-linux-gnu/libnssckbi.so",
        "--token-pin-file",
        s(&pin),
        "--pin-file",
        s(&pin),
    ]);
    assert_fails(&out, 7, "enrol_modules");
    // NSS cannot hold the rollback record: said, and refused unless asked.
    let out = enrol(&pin, &[]);
    assert_fails(&out, 3, "--without-rollback-record");
    assert_eq!(enrolled(&env).len(), 1);

    let out = enrol(&pin, &["--without-rollback-record"]);
    assert_ok(&out, &["token", "enrol"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("enrolled token \"NSS Certificate DB\""),
        "{text}"
    );
    let list = enrolled(&env);
    assert_eq!(list.len(), 2, "{list:?}");
    assert_eq!(list[0]["label"], "ops");
    assert_eq!(list[0]["current"], true);
    assert_eq!(list[0]["module"], crate::util::MODULE);
    assert_eq!(list[1]["label"], NSS_LABEL);
    assert_eq!(list[1]["backend"], "pkcs11");
    assert_eq!(list[1]["module"], NSS_SOFTOKN);
    assert_eq!(list[1]["rollback_record"], false);
    assert_eq!(list[1]["current"], false);
    assert!(list[1]["enrolled_at"].is_string(), "{list:?}");
    // Enrolling the same token again adds nothing.
    let out = enrol(&pin, &["--without-rollback-record"]);
    assert_fails(&out, 5, "already exists");
    env.ok(&["lock"]);
    assert_eq!(softhsm.stop().code(), Some(0));
    // What a revoked token's holder may have kept.
    let before_revocation = std::fs::read(&env.vault).expect("vault");

    // The second daemon: only NSS configured, the same vault file.
    env.module = PathBuf::from(NSS_SOFTOKN);
    let nss = env.start_daemon(&["--pkcs11-init-args", &nss_args]);
    env.unlock();
    assert_eq!(
        env.ok(&["secret", "get", "db/pw"]),
        "written under SoftHSM2"
    );
    env.put("db/nss", b"written under NSS");
    let list = enrolled(&env);
    assert_eq!(list[1]["current"], true);
    assert!(list[1]["last_used"].is_string(), "{list:?}");
    let status: Value = serde_json::from_str(&env.ok(&["--json", "status"])).expect("json");
    assert_eq!(status["rollback_protection"], false, "{status}");

    // Revoking needs the PIN again, and never takes the last token.
    let out = env.cli(&["token", "revoke", "ops", "--pin-file", s(&wrong)]);
    assert_fails(&out, 7, "wrong PIN");
    assert_eq!(enrolled(&env).len(), 2);
    let out = env.cli(&["token", "revoke", "ops", "--pin-file", s(&pin)]);
    assert_ok(&out, &["token", "revoke"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("1 token(s) remain"), "{text}");
    assert!(text.contains("rotate the secrets"), "{text}");
    let out = env.cli(&["token", "revoke", NSS_LABEL, "--pin-file", s(&pin)]);
    assert_fails(&out, 3, "only token enrolled");
    assert_eq!(enrolled(&env).len(), 1);
    // The audit log has both changes, and its chain verifies across the
    // two daemons and tokens.
    let log = records(&env.vault.parent().expect("dir").join("audit.log"));
    for op in ["Admin.EnrolToken", "Admin.RevokeToken"] {
        assert!(
            log.iter().any(|r| r["op"] == op && r["outcome"] == "ok"),
            "no successful {op}: {log:#?}"
        );
    }
    assert!(
        log.iter()
            .any(|r| r["op"] == "Admin.RevokeToken" && r["outcome"] != "ok"),
        "the refused revocations are recorded too"
    );
    let verified = env.ok(&["audit", "verify"]);
    assert!(verified.contains("audit log intact"), "{verified}");
    env.ok(&["lock"]);
    assert_eq!(nss.stop().code(), Some(0));

    // SoftHSM2 again: the current vault no longer opens with it...
    env.module = PathBuf::from(crate::util::MODULE);
    let softhsm = env.start_daemon(&[]);
    let out = env.cli(&["unlock", "--pin-file", s(&pin)]);
    assert_fails(&out, 3, "not encrypted to this token");
    // ...but the copy made before the revocation does, as docs/team.md says.
    let current = std::fs::read(&env.vault).expect("vault");
    std::fs::write(&env.vault, &before_revocation).expect("old copy");
    env.unlock();
    assert_eq!(
        env.ok(&["secret", "get", "db/pw"]),
        "written under SoftHSM2"
    );
    let out = env.cli(&["secret", "get", "db/nss"]);
    assert_fails(&out, 4, "db/nss");
    env.ok(&["lock"]);
    drop(softhsm);
    std::fs::write(&env.vault, &current).expect("current back");
}

const DOCS: DocBlocks = DocBlocks {
    path: "docs/team.md",
    text: include_str!("../../docs/team.md"),
    mark: "<!-- run by tests/e2e/team.rs: ",
};

#[test]
fn every_marked_team_block_is_run_here() {
    assert_eq!(
        DOCS.marked(),
        ["config", "enrol", "second-daemon", "unlock", "revoke"]
    );
}

#[test]
fn the_team_procedure_in_the_docs_works_as_written() {
    let mut env = Env::new();
    env.nss_db();
    std::fs::copy(&env.pin_file, env.path().join("pin.txt")).expect("pin.txt");
    std::fs::copy(&env.pin_file, env.path().join("nss-pin.txt")).expect("nss-pin.txt");
    DOCS.run(&env, "config", &[]);
    // keyholderd reads the config file the block wrote.
    let first = env.start_daemon(&[]);
    env.init();
    env.unlock();
    env.put("db/password", b"hunter2");
    let out = DOCS.run(&env, "enrol", &[]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("enrolled token \"NSS Certificate DB\""),
        "{text}"
    );
    assert!(text.contains("ops (serial "), "{text}");
    assert!(
        text.contains("backend:     pkcs11 (/usr/lib/x86_64-linux-gnu/libsoftokn3.so)"),
        "{text}"
    );
    DOCS.run(&env, "second-daemon", &[]);
    env.ok(&["lock"]);
    assert_eq!(first.stop().code(), Some(0));

    // As the docs start it: `keyholderd --config "$HOME/nss-daemon/keyholderd.toml"`.
    env.module = PathBuf::new();
    let config = env.path().join("nss-daemon/keyholderd.toml");
    let _second = env.start_daemon(&["--config", s(&config)]);
    let out = DOCS.run(&env, "unlock", &[]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("token:       NSS Certificate DB"), "{text}");
    assert!(text.ends_with("hunter2"), "{text}");
    DOCS.run(&env, "revoke", &[]);
    let list = enrolled(&env);
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(list[0]["label"], NSS_LABEL);
}

/// A YubiKey (the virtual PIV card) enrolled natively beside SoftHSM2: its
/// key generated in a slot, the card's attestation decided and recorded as
/// at init, and the vault then opens through the card alone.
#[test]
fn a_piv_card_is_enrolled_natively_with_its_attestation_recorded() {
    let mut env = Env::new();
    let stack = crate::util::Stack::up("piv", &env.path().join("piv"));
    stack.configure(&mut env);
    let card_pin = env.pin_file.clone();
    let key = env.file("management-key", &format!("{}\n", stack.settings["SO_PIN"]));
    let softhsm_pin = env.file("softhsm-pin", &format!("{}\n", crate::util::PIN));
    env.module = PathBuf::from(crate::util::MODULE);
    env.label = "ops".to_owned();
    env.pin_file = softhsm_pin.clone();
    let softhsm = env.start_daemon(&[]);
    env.init();
    env.unlock();
    env.put("db/pw", b"made on SoftHSM2");
    let enrol = [
        "token",
        "enrol",
        "--token-backend",
        "yubikey",
        "--piv-slot",
        "9d",
        "--management-key-file",
        s(&key),
        "--allow-default-management-key",
        "--touch-policy",
        "cached",
        "--without-rollback-record",
        "--token-pin-file",
        s(&card_pin),
        "--pin-file",
        s(&softhsm_pin),
    ];
    let out = env.cli(&enrol);
    assert_ok(&out, &enrol);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(
            "attestation: not attested: the card has no attestation certificate (slot f9)"
        ),
        "{text}"
    );
    let list = enrolled(&env);
    assert_eq!(list.len(), 2, "{list:?}");
    assert_eq!(list[1]["backend"], "yubikey");
    assert_eq!(list[1]["attestation"]["slot"], "9d");
    assert_eq!(list[1]["attestation"]["touch_policy"], "cached");
    assert_eq!(list[1]["attestation"]["attested"], false);
    let text = env.ok(&["token", "list"]);
    assert!(
        text.contains("vault key:   PIV slot 9d, PIN policy once, touch policy cached"),
        "{text}"
    );
    env.ok(&["lock"]);
    assert_eq!(softhsm.stop().code(), Some(0));

    // The card alone, through the native backend.
    env.module = PathBuf::new();
    env.daemon_args = vec!["--token-backend".to_owned(), "yubikey".to_owned()];
    env.pin_file = card_pin;
    let _card = env.start_daemon(&[]);
    env.unlock();
    assert_eq!(env.ok(&["secret", "get", "db/pw"]), "made on SoftHSM2");
    let list = enrolled(&env);
    assert_eq!(list[1]["current"], true, "{list:?}");
}

/// Copies `from` into `to`, directories included.
fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("read dir") {
        let entry = entry.expect("entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("type").is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copy");
        }
    }
}

/// A vault written by Keyholder before enrolment existed (a fixture made by
/// that version, with its SoftHSM2 token): it opens as it is, lists its one
/// token, takes a second, and opens with that one alone; its audit chain
/// goes on verifying.
#[test]
fn a_vault_written_before_enrolment_existed_opens_and_takes_a_second_token() {
    use std::os::unix::fs::PermissionsExt;
    let env = Env::new();
    let fixture =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/e2e/fixtures/vault-before-team");
    copy_tree(&fixture.join("tokens"), &env.path().join("tokens"));
    let dir = env.vault.parent().expect("vault dir");
    copy_tree(&fixture.join("vault"), dir);
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    env.add_token("second");
    let pin = env.pin_file.clone();

    let old = env.start_daemon(&[]);
    env.unlock();
    assert_eq!(
        env.ok(&["secret", "get", "db/old"]),
        "written before tokens could be enrolled"
    );
    let list = enrolled(&env);
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(list[0]["label"], "ops");
    assert_eq!(
        list[0]["backend"],
        Value::Null,
        "not recorded then: {list:?}"
    );
    assert_eq!(list[0]["rollback_record"], true);
    let args = [
        "token",
        "enrol",
        "--token-label",
        "second",
        "--token-pin-file",
        s(&pin),
        "--pin-file",
        s(&pin),
    ];
    assert_ok(&env.cli(&args), &args);
    let verified = env.ok(&["audit", "verify"]);
    assert!(verified.contains("audit log intact"), "{verified}");
    env.ok(&["lock"]);
    assert_eq!(old.stop().code(), Some(0));

    // Restricted to the new token, it opens all the same.
    let _second = env.start_daemon(&["--token", "second"]);
    env.unlock();
    let status: Value = serde_json::from_str(&env.ok(&["--json", "status"])).expect("json");
    assert_eq!(status["token"]["label"], "second", "{status}");
    assert_eq!(status["rollback_protection"], true, "{status}");
    assert_eq!(
        env.ok(&["secret", "get", "db/old"]),
        "written before tokens could be enrolled"
    );
    let verified = env.ok(&["audit", "verify"]);
    assert!(verified.contains("audit log intact"), "{verified}");
}

/// Both PINs through pinentry, as `unlock --pinentry` asks: the new
/// token's first, then the session's; a wrong PIN of the new token is asked
/// for again.
#[test]
fn enrol_asks_both_pins_through_pinentry_and_again_after_a_wrong_one() {
    let env = Env::new();
    env.add_token_with_pin("second", "2468");
    let _daemon = env.start_daemon(&[]);
    env.init();
    env.unlock();
    let stand_in = crate::pinentry::StandIn::new(&env);
    stand_in.answers(&["9999", crate::util::PIN, "2468"]);
    let program = stand_in.program();
    let args = [
        "token",
        "enrol",
        "--token-label",
        "second",
        "--pinentry",
        &program,
    ];
    assert_ok(&env.cli(&args), &args);
    assert_eq!(stand_in.prompts(), 3, "{}", stand_in.log());
    let log = stand_in.log();
    assert!(log.contains("the token being enrolled"), "{log}");
    assert!(log.contains("did not accept the PIN"), "{log}");
    let list = enrolled(&env);
    assert_eq!(list.len(), 2, "{list:?}");
    assert_eq!(list[1]["label"], "second");
}

/// Polls (bounded) until `env` reads `name` as `value`; how long it took.
fn reaches(env: &Env, name: &str, value: &str, limit: std::time::Duration) -> std::time::Duration {
    let start = std::time::Instant::now();
    loop {
        let out = env.cli(&["secret", "get", name]);
        if out.status.success() && String::from_utf8_lossy(&out.stdout) == value {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < limit,
            "{name} did not reach the other daemon within {limit:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// The issue's picture: two daemons at once, SoftHSM2 and NSS softokn, one
/// vault in a three-member etcd cluster. Each unlocks with its own token; a
/// secret written through one is read through the other within a second;
/// once the SoftHSM2 token is revoked, the SoftHSM2 daemon's writes fail
/// and, locked, it no longer opens the vault.
#[test]
fn two_daemons_with_different_tokens_share_a_vault_in_etcd() {
    use crate::etcd_cluster::{Cluster, issue_certificates};
    let first = Env::new();
    let pin = first.pin_file.clone();
    let nss_args = first.nss_db();
    let config = first.file(
        "keyholderd.toml",
        &format!("enrol_modules = [\"{NSS_SOFTOKN}\"]\n"),
    );
    let issuer = first.start_daemon(&["--config", s(&config)]);
    first.init();
    first.unlock();
    let dir = first.path().join("etcd");
    let (member_certs, client) = issue_certificates(&first, &dir);
    first.put("seed", b"from the file vault");
    let enrol = [
        "token",
        "enrol",
        "--token-label",
        NSS_LABEL,
        "--pkcs11-module",
        NSS_SOFTOKN,
        "--pkcs11-init-args",
        &nss_args,
        "--without-rollback-record",
        "--token-pin-file",
        s(&pin),
        "--pin-file",
        s(&pin),
    ];
    assert_ok(&first.cli(&enrol), &enrol);
    first.ok(&["lock"]);
    assert!(issuer.stop().success());
    let cluster = Cluster::start(&dir.join("cluster"), &member_certs, &client);
    let url = cluster.url("/team/two-tokens/");
    let mut migrate = vec!["vault", "migrate", "--from", s(&first.vault), "--to", &url];
    let flags = cluster.tls_flags();
    migrate.extend(flags.iter().map(String::as_str));
    first.ok(&migrate);
    let etcd = cluster.daemon_config("/team/two-tokens/", "2s");

    // SoftHSM2: the first env's token store.
    let mut a = Env::new();
    a.softhsm_conf = first.softhsm_conf.clone();
    let config_a = a.file("keyholderd.toml", &etcd);
    let daemon_a = a.start_daemon(&["--config", s(&config_a)]);
    a.unlock();
    // NSS softokn, its database in the first env's directory.
    let mut b = Env::new();
    b.module = PathBuf::from(NSS_SOFTOKN);
    let config_b = b.file(
        "keyholderd.toml",
        &format!("pkcs11_init_args = {nss_args:?}\ntoken = {NSS_LABEL:?}\n{etcd}"),
    );
    let _daemon_b = b.start_daemon(&["--config", s(&config_b)]);
    b.unlock();
    let status: Value = serde_json::from_str(&b.ok(&["--json", "status"])).expect("json");
    assert_eq!(status["token"]["label"], NSS_LABEL, "{status}");
    assert_eq!(b.ok(&["secret", "get", "seed"]), "from the file vault");

    a.put("shared/from-a", b"written through SoftHSM2");
    let took = reaches(
        &b,
        "shared/from-a",
        "written through SoftHSM2",
        std::time::Duration::from_secs(1),
    );
    println!("SoftHSM2 -> NSS: {took:?}");
    b.put("shared/from-b", b"written through NSS");
    let took = reaches(
        &a,
        "shared/from-b",
        "written through NSS",
        std::time::Duration::from_secs(1),
    );
    println!("NSS -> SoftHSM2: {took:?}");

    // NSS revokes SoftHSM2.
    let out = b.cli(&["token", "revoke", "ops", "--pin-file", s(&pin)]);
    assert_ok(&out, &["token", "revoke"]);
    b.put("after/revocation", b"not for SoftHSM2");
    // The SoftHSM2 daemon cannot read the new vault, so it cannot write.
    let out = a.cli_with_stdin(&["secret", "put", "from/revoked"], Some(b"refused"));
    assert!(
        !out.status.success(),
        "a write through a revoked token: {out:?}"
    );
    a.ok(&["lock"]);
    let out = a.cli(&["unlock", "--pin-file", s(&pin)]);
    assert_fails(&out, 3, "not encrypted to this token");
    drop(daemon_a);
    assert_eq!(
        b.ok(&["secret", "get", "after/revocation"]),
        "not for SoftHSM2"
    );
    let out = b.cli(&["secret", "get", "from/revoked"]);
    assert_fails(&out, 4, "from/revoked");
}
