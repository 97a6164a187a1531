//! The main job: init, unlock, store, read, lock, restart.

use std::process::Command;

use crate::util::{Env, assert_fails};

#[test]
fn init_unlock_put_get_list_delete_lock_and_restart_keep_the_data() {
    let env = Env::new();
    let daemon = env.start_daemon(&[]);
    assert!(env.ok(&["status"]).contains("uninitialized"));
    env.init();
    assert!(env.ok(&["status"]).contains("state:       locked"));
    env.unlock();
    env.put("db/prod/password", b"hunter2");
    env.put("db/prod/user", b"admin");
    env.put("api/token", &[0xff, 0x00, 0x10]);
    assert_eq!(env.ok(&["secret", "get", "db/prod/password"]), "hunter2");
    assert_eq!(
        env.cli(&["secret", "get", "api/token"]).stdout,
        vec![0xff, 0x00, 0x10]
    );
    assert_eq!(
        env.ok(&["secret", "list", "db/"]),
        "db/prod/password\ndb/prod/user\n"
    );
    assert_eq!(env.ok(&["secret", "list"]).lines().count(), 3);

    // A second put without --force is refused and keeps the value.
    let out = env.cli_with_stdin(&["secret", "put", "db/prod/user"], Some(b"other"));
    assert_fails(&out, 5, "already exists");
    assert_eq!(env.ok(&["secret", "get", "db/prod/user"]), "admin");
    let out = env.cli_with_stdin(&["secret", "put", "--force", "db/prod/user"], Some(b"root"));
    assert!(out.status.success());
    assert_eq!(env.ok(&["secret", "get", "db/prod/user"]), "root");

    env.ok(&["secret", "rm", "db/prod/user"]);
    assert_fails(
        &env.cli(&["secret", "get", "db/prod/user"]),
        4,
        "does not exist",
    );
    assert_fails(
        &env.cli(&["secret", "rm", "db/prod/user"]),
        4,
        "does not exist",
    );

    let status: serde_json::Value =
        serde_json::from_str(&env.ok(&["--json", "status"])).expect("status JSON");
    assert_eq!(status["state"], "unlocked");
    assert_eq!(status["token"]["label"], "ops");
    assert_eq!(status["secret_count"], 2);
    // init, three puts, one forced put, one delete; refused writes do not count.
    let generation = status["generation"].as_u64().expect("generation");
    assert_eq!(generation, 6, "{status}");

    env.ok(&["lock"]);
    let out = env.cli(&["secret", "get", "db/prod/password"]);
    assert_fails(&out, 3, "the vault is locked: run `keyholder unlock`");
    let locked: serde_json::Value =
        serde_json::from_str(&env.ok(&["--json", "status"])).expect("status JSON");
    assert_eq!(locked["state"], "locked");
    assert_eq!(locked["lock_reason"], "request");

    env.unlock();
    assert_eq!(env.ok(&["secret", "get", "db/prod/password"]), "hunter2");

    // SIGTERM: clean exit, socket removed; a new daemon reads the same data.
    assert!(daemon.stop().success());
    assert!(!env.socket().exists(), "socket file left behind");
    let _daemon = env.start_daemon(&[]);
    assert!(env.ok(&["status"]).contains("locked"));
    env.unlock();
    assert_eq!(env.ok(&["secret", "get", "db/prod/password"]), "hunter2");
    assert_eq!(
        env.cli(&["secret", "get", "api/token"]).stdout,
        vec![0xff, 0x00, 0x10]
    );
    let status: serde_json::Value =
        serde_json::from_str(&env.ok(&["--json", "status"])).expect("status JSON");
    // Each lock (`keyholder lock`, then the shutdown) wrote the audit
    // log's head into the vault, one generation each (docs/audit.md).
    assert_eq!(status["generation"].as_u64(), Some(generation + 2));

    // Backups: the last five generations sit beside the vault.
    let dir = env.vault.parent().expect("vault dir");
    let backups = std::fs::read_dir(dir)
        .expect("vault dir")
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("vault.age.gen-")
        })
        .count();
    assert_eq!(backups, 5);
}

#[test]
fn the_stock_age_binary_decrypts_the_vault_with_the_recovery_identity() {
    let env = Env::new();
    let key = env.path().join("recovery.key");
    let out = Command::new("age-keygen")
        .arg("-o")
        .arg(&key)
        .output()
        .expect("age-keygen (apt-get install age)");
    assert!(out.status.success());
    let recipient = Command::new("age-keygen")
        .arg("-y")
        .arg(&key)
        .output()
        .expect("age-keygen -y");
    let recipient = String::from_utf8(recipient.stdout)
        .expect("utf8")
        .trim()
        .to_owned();
    let _daemon = env.start_daemon(&[]);
    env.ok(&[
        "init",
        "--token-label",
        "ops",
        "--recovery-recipient",
        &recipient,
        "--pin-file",
        env.pin_file.to_str().expect("utf8"),
    ]);
    env.unlock();
    env.put("db/prod/password", b"hunter2");
    env.put("blob", &[0, 159, 146, 150]);
    let out = Command::new("age")
        .arg("-d")
        .arg("-i")
        .arg(&key)
        .arg(&env.vault)
        .output()
        .expect("age runs");
    assert!(
        out.status.success(),
        "age -d: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("the plaintext is JSON");
    assert_eq!(doc["format"], "keyholder-vault");
    assert_eq!(doc["version"], 3);
    assert_eq!(doc["body"]["generation"], 3);
    assert_eq!(
        doc["body"]["secrets"]["db/prod/password"]["value"],
        "hunter2"
    );
    assert_eq!(
        doc["body"]["secrets"]["db/prod/password"]["encoding"],
        "utf8"
    );
    assert_eq!(doc["body"]["secrets"]["blob"]["encoding"], "base64");
    assert_eq!(doc["body"]["secrets"]["blob"]["value"], "AJ+Slg==");
    assert_eq!(doc["body"]["recipients"]["recovery"][0], recipient.as_str());
    assert_eq!(doc["auth"][0]["alg"], "HMAC-SHA256");
}

#[test]
fn idle_timeout_from_the_config_file_and_session_ttl_lock_the_vault() {
    let env = Env::new();
    // $XDG_CONFIG_HOME/keyholder/keyholderd.toml is read when present.
    let config_dir = env.path().join("config/keyholder");
    std::fs::create_dir_all(&config_dir).expect("config dir");
    std::fs::write(
        config_dir.join("keyholderd.toml"),
        "idle_timeout = \"1s\"\n",
    )
    .expect("config");
    let _daemon = env.start_daemon(&[]);
    env.init();
    env.unlock();
    env.put("a", b"1");
    std::thread::sleep(std::time::Duration::from_millis(2600));
    let status: serde_json::Value =
        serde_json::from_str(&env.ok(&["--json", "status"])).expect("status JSON");
    assert_eq!(status["state"], "locked", "{status}");
    assert_eq!(status["lock_reason"], "idle");
    assert_fails(&env.cli(&["secret", "get", "a"]), 3, "locked");

    let pin = env.pin_file.to_str().expect("utf8");
    env.ok(&["unlock", "--ttl", "1s", "--idle", "1h", "--pin-file", pin]);
    assert_eq!(env.ok(&["secret", "get", "a"]), "1");
    std::thread::sleep(std::time::Duration::from_millis(2600));
    let status: serde_json::Value =
        serde_json::from_str(&env.ok(&["--json", "status"])).expect("status JSON");
    assert_eq!(status["lock_reason"], "expired", "{status}");
}

#[test]
fn status_watch_streams_each_change_and_ends_when_the_daemon_stops() {
    use std::io::BufRead;
    let env = Env::new();
    let daemon = env.start_daemon(&[]);
    env.init();
    let mut watch = std::process::Command::new(crate::util::keyholder_bin())
        .args(["--json", "--socket"])
        .arg(env.socket())
        .args(["status", "--watch"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("watch starts");
    let mut lines = std::io::BufReader::new(watch.stdout.take().expect("stdout")).lines();
    let mut next_state = || -> String {
        let line = lines.next().expect("a status line").expect("read");
        let v: serde_json::Value = serde_json::from_str(&line).expect("JSON line");
        v["state"].as_str().unwrap_or_default().to_owned()
    };
    assert_eq!(next_state(), "locked");
    env.unlock();
    assert_eq!(next_state(), "unlocked");
    env.put("a", b"1");
    assert_eq!(next_state(), "unlocked");
    env.ok(&["lock"]);
    assert_eq!(next_state(), "locked");
    // SIGTERM: the daemon ends the stream instead of waiting on it.
    assert!(daemon.stop().success());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        if let Some(status) = watch.try_wait().expect("wait") {
            assert!(status.success(), "watch ended with {status}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "watch did not end");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

#[test]
fn without_a_daemon_the_cli_says_how_to_start_one() {
    let env = Env::new();
    let out = env.cli(&["status"]);
    assert_fails(&out, 8, "cannot reach keyholderd");
    assert!(String::from_utf8_lossy(&out.stderr).contains("keyholderd --pkcs11-module"));
}

#[test]
fn an_older_copy_of_the_vault_is_refused_until_accepted_on_purpose() {
    let (env, daemon) = Env::ready();
    env.put("kept", b"1");
    let older = env.path().join("older-vault.age");
    std::fs::copy(&env.vault, &older).expect("copy the vault");
    env.put("later", b"2");
    env.ok(&["lock"]);
    let newer = env.path().join("newer-vault.age");
    std::fs::copy(&env.vault, &newer).expect("copy the vault");

    // Put the older (genuine, authenticated) copy in place, as someone with
    // write access to the file could.
    let staged = env.vault.with_extension("staged");
    std::fs::copy(&older, &staged).expect("stage");
    std::fs::rename(&staged, &env.vault).expect("replace the vault");
    let pin = env.pin_file.to_str().expect("utf8");
    let refused = env.cli(&["unlock", "--pin-file", pin]);
    assert_fails(&refused, 3, "older copy is in its place");
    assert_fails(&refused, 3, "--accept-older-vault");
    assert!(env.ok(&["status"]).contains("locked"), "still locked");
    assert!(
        daemon
            .log_text()
            .contains("vault file older than the token's record refused")
    );

    // Restored on purpose: accepted, and the older content is what opens.
    env.ok(&["unlock", "--pin-file", pin, "--accept-older-vault"]);
    assert_eq!(env.ok(&["secret", "get", "kept"]), "1");
    assert_fails(
        &env.cli(&["secret", "get", "later"]),
        4,
        "\"later\" does not exist",
    );
    // The restored content was written back above the record, so a plain
    // unlock opens it, and the copy from the abandoned history (the one
    // that had "later") is still refused: generation numbers never repeat.
    env.ok(&["lock"]);
    env.ok(&["unlock", "--pin-file", pin]);
    assert_eq!(env.ok(&["secret", "get", "kept"]), "1");
    env.ok(&["lock"]);
    let restored = env.path().join("restored-vault.age");
    std::fs::copy(&env.vault, &restored).expect("copy");
    std::fs::copy(&newer, &staged).expect("stage");
    std::fs::rename(&staged, &env.vault).expect("replace the vault");
    assert_fails(
        &env.cli(&["unlock", "--pin-file", pin]),
        3,
        "older copy is in its place",
    );
    std::fs::copy(&restored, &staged).expect("stage");
    std::fs::rename(&staged, &env.vault).expect("put the restored vault back");
    env.ok(&["unlock", "--pin-file", pin]);
    env.put("after", b"3");
    assert_eq!(env.ok(&["secret", "get", "after"]), "3");
}
