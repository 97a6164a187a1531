//! Faults SoftHSM2 cannot produce, injected by the test PKCS#11 module in
//! testing/pkcs11-fault (it forwards to SoftHSM2): a PIN on its final try, a
//! locked PIN, a token that goes away; and, in its counting mode, what an
//! unlock asks of the token.

use std::time::{Duration, Instant};

use crate::util::{Env, assert_fails};

fn status(env: &Env) -> serde_json::Value {
    serde_json::from_str(&env.ok(&["--json", "status"])).expect("status JSON")
}

fn token_flags(env: &Env) -> serde_json::Value {
    let tokens: serde_json::Value =
        serde_json::from_str(&env.ok(&["--json", "tokens"])).expect("tokens JSON");
    tokens[0].clone()
}

#[test]
fn the_final_pin_try_is_spent_only_when_allowed() {
    let env = Env::with_fault_module();
    let _daemon = env.start_daemon(&[]);
    env.init();
    env.fault("final-try");
    assert_eq!(token_flags(&env)["pin_final_try"], true);

    // Even a wrong PIN is not sent: the refusal comes before C_Login.
    let wrong = env.file("wrong-pin", "9999\n");
    let out = env.cli(&["unlock", "--pin-file", wrong.to_str().expect("utf8")]);
    assert_fails(&out, 7, "one PIN try left");
    assert!(String::from_utf8_lossy(&out.stderr).contains("--allow-final-pin-try"));
    env.fault("");
    assert_eq!(
        token_flags(&env)["pin_count_low"],
        false,
        "the wrong PIN never reached the token"
    );

    env.fault("final-try");
    let pin = env.pin_file.to_str().expect("utf8");
    assert_fails(
        &env.cli(&["unlock", "--pin-file", pin]),
        7,
        "one PIN try left",
    );
    assert_eq!(status(&env)["state"], "locked");
    env.ok(&["unlock", "--allow-final-pin-try", "--pin-file", pin]);
    assert_eq!(status(&env)["state"], "unlocked");
}

#[test]
fn a_locked_pin_is_reported_without_trying() {
    let env = Env::with_fault_module();
    let _daemon = env.start_daemon(&[]);
    env.init();
    env.fault("pin-locked");
    let pin = env.pin_file.to_str().expect("utf8");
    let out = env.cli(&["unlock", "--allow-final-pin-try", "--pin-file", pin]);
    assert_fails(&out, 7, "PIN locked");
    assert_eq!(status(&env)["state"], "locked");
}

#[test]
fn removing_the_token_locks_the_session_and_unlock_says_it_is_gone() {
    let env = Env::with_fault_module();
    let _daemon = env.start_daemon(&["--token-poll-interval", "200ms"]);
    env.init();
    env.unlock();
    env.put("db/pw", b"hunter2");
    let vault_before = std::fs::read(&env.vault).expect("vault");

    env.fault("removed");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = status(&env);
        if s["state"] == "locked" {
            assert_eq!(s["lock_reason"], "token-removed", "{s}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the session stayed open without the token: {s}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_fails(&env.cli(&["secret", "get", "db/pw"]), 3, "locked");
    let pin = env.pin_file.to_str().expect("utf8");
    assert_fails(
        &env.cli(&["unlock", "--pin-file", pin]),
        8,
        "no longer available",
    );
    assert_eq!(std::fs::read(&env.vault).expect("vault"), vault_before);

    // Plugged back in: business as usual.
    env.fault("");
    env.unlock();
    assert_eq!(env.ok(&["secret", "get", "db/pw"]), "hunter2");
}

#[test]
fn a_key_the_token_cannot_make_is_named_with_its_return_value() {
    let env = Env::with_fault_module();
    let daemon = env.start_daemon(&[]);
    env.init();
    env.unlock();
    for (fault, code) in [
        ("keygen-unsupported", "CKR_FUNCTION_NOT_SUPPORTED"),
        ("keygen-general-error", "CKR_GENERAL_ERROR"),
    ] {
        env.fault(fault);
        for args in [
            &["ca", "create", "kube", "--on-token"][..],
            &[
                "key",
                "generate",
                "root",
                "--type",
                "ecdsa-p256",
                "--on-token",
            ][..],
        ] {
            let out = env.cli(args);
            assert_fails(&out, 3, "the token cannot do this");
            assert_fails(&out, 3, code);
        }
    }
    env.fault("");
    // Nothing was stored, the session is still open, and the token works.
    assert_eq!(status(&env)["state"], "unlocked");
    env.ok(&["ca", "create", "kube", "--on-token"]);
    drop(daemon);
}

/// An unlock spends one PIN try and asks the token for the two ECDH
/// operations the design needs (docs/vault-format.md), and makes or signs
/// nothing on it, counted by the test module's counting mode
/// (`KEYHOLDER_COUNT_FILE`; benches/unlock.rs counts every call per token).
#[test]
fn an_unlock_logs_in_once_and_asks_the_token_for_two_ecdh() {
    let mut env = Env::with_fault_module();
    let count_file = env.path().join("pkcs11-calls");
    env.token_env.push((
        "KEYHOLDER_COUNT_FILE".to_owned(),
        count_file.to_str().expect("utf8").to_owned(),
    ));
    let _daemon = env.start_daemon(&[]);
    env.init();
    let calls = || -> Vec<String> {
        std::fs::read_to_string(&count_file)
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    };
    assert!(
        calls().iter().any(|c| c == "C_GenerateKeyPair"),
        "init made the vault key: {:?}",
        calls()
    );
    for _ in 0..2 {
        let before = calls().len();
        env.unlock();
        let unlock = calls().split_off(before);
        env.ok(&["lock"]);
        let n = |name: &str| unlock.iter().filter(|c| *c == name).count();
        assert_eq!(n("C_Login"), 1, "{unlock:?}");
        assert_eq!(n("C_DeriveKey"), 2, "{unlock:?}");
        for none in ["C_GenerateKeyPair", "C_CreateObject", "C_Sign", "C_Logout"] {
            assert_eq!(n(none), 0, "{none}: {unlock:?}");
        }
    }
}
