//! NSS softokn, the PKCS#11 module of Firefox's and many distributions' key
//! databases, as the vault's token: it needs its database passed as
//! `C_Initialize` arguments, its token label is fixed, its PIN is the
//! database password, and it refuses the data object that holds Keyholder's
//! rollback record.

use crate::util::{Env, assert_fails, assert_ok};

use crate::util::{NSS_LABEL as LABEL, NSS_SOFTOKN as SOFTOKN};

#[test]
fn an_nss_database_holds_the_vault_key_without_rollback_detection_and_says_so() {
    let mut env = Env::new();
    env.module = SOFTOKN.into();
    let init_args = env.nss_db();

    // Without its init arguments NSS does not start, and keyholderd says
    // what to pass.
    let vault = env.vault.to_str().expect("utf8").to_owned();
    let out = env.run_daemon_to_exit(&["--pkcs11-module", SOFTOKN, "--vault", &vault]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--pkcs11-init-args"), "{stderr}");

    let daemon = env.start_daemon(&["--pkcs11-init-args", &init_args]);
    assert!(env.ok(&["tokens"]).contains(LABEL));
    let pin = env.pin_file.to_str().expect("utf8").to_owned();
    let init = ["init", "--token-label", LABEL, "--pin-file", &pin];
    let out = env.cli(&init);
    assert_fails(&out, 3, "cannot store Keyholder's rollback record");
    assert_fails(&out, 3, "CKR_ATTRIBUTE_VALUE_INVALID");
    assert_fails(&out, 3, "--without-rollback-protection");
    assert!(!env.vault.exists(), "no vault was created");
    let tokens = env.ok(&["--json", "tokens"]);
    assert!(!tokens.contains("age1tag1"), "no key was made: {tokens}");

    let mut opted_out = init.to_vec();
    opted_out.push("--without-rollback-protection");
    env.ok(&opted_out);

    // A wrong database password is a wrong PIN.
    let wrong = env.file("wrong-pin", "not-the-pin\n");
    let out = env.cli(&["unlock", "--pin-file", wrong.to_str().expect("utf8")]);
    assert_fails(&out, 7, "PIN");

    env.unlock();
    let status: serde_json::Value =
        serde_json::from_str(&env.ok(&["--json", "status"])).expect("json");
    assert_eq!(status["rollback_protection"], false);
    assert!(env.ok(&["status"]).contains("rollback:    OFF"));
    env.put("db/pw", b"one");
    let older = std::fs::read(&env.vault).expect("vault");
    let args = ["secret", "put", "--force", "db/pw"];
    assert_ok(&env.cli_with_stdin(&args, Some(b"two")), &args);
    env.ok(&["lock"]);
    drop(daemon);

    // Restarted, it opens again with the database password.
    let daemon = env.start_daemon(&["--pkcs11-init-args", &init_args]);
    env.unlock();
    assert_eq!(env.ok(&["secret", "get", "db/pw"]), "two");
    env.ok(&["lock"]);
    // What "off" means, as the status line says: an older copy opens.
    std::fs::write(&env.vault, &older).expect("put the older copy back");
    env.unlock();
    assert_eq!(env.ok(&["secret", "get", "db/pw"]), "one");
    drop(daemon);
}

#[test]
fn a_token_that_holds_the_record_has_rollback_detection_on() {
    let (env, _daemon) = Env::ready();
    let status: serde_json::Value =
        serde_json::from_str(&env.ok(&["--json", "status"])).expect("json");
    assert_eq!(status["rollback_protection"], true);
    assert!(env.ok(&["status"]).contains("rollback:    on"));
}
