//! The commands in docs/yubikey.md, run as written on the virtual PIV card
//! through keyholderd's native YubiKey backend: each block the docs mark
//! `<!-- run by tests/e2e/yubikey_docs.rs: NAME -->` runs under `bash -euo
//! pipefail` with the variables the docs name (PIN, SERIAL) set from the
//! card, and keyholderd started as the docs start it.

use std::path::PathBuf;

use crate::util::{DocBlocks, Env, Stack};

const DOCS: DocBlocks = DocBlocks {
    path: "docs/yubikey.md",
    text: include_str!("../../docs/yubikey.md"),
    mark: "<!-- run by tests/e2e/yubikey_docs.rs: ",
};

#[test]
fn every_marked_yubikey_block_is_run_here() {
    assert_eq!(DOCS.marked(), ["management-key", "protect", "init"]);
    assert!(DOCS.text.contains("keyholderd --token-backend yubikey &"));
}

#[test]
fn the_native_yubikey_procedure_in_the_docs_makes_an_unlocked_vault() {
    let mut env = Env::new();
    let stack = Stack::up("piv", &env.path().join("piv"));
    stack.configure(&mut env);
    // `keyholderd --token-backend yubikey`, as the docs start it.
    env.module = PathBuf::new();
    env.daemon_args = vec!["--token-backend".to_owned(), "yubikey".to_owned()];
    let _daemon = env.start_daemon(&[]);
    let vars = [
        ("PIN", stack.settings["PIN"].as_str()),
        ("SERIAL", stack.settings["SERIAL"].as_str()),
    ];
    DOCS.run(&env, "management-key", &vars);
    let key = std::fs::read_to_string(env.path().join("management-key.txt")).expect("key");
    assert_ne!(key.trim(), stack.settings["SO_PIN"], "the key was changed");
    // No --allow-default-management-key needed: the key is not the factory one.
    let out = DOCS.run(&env, "init", &vars);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stdout.contains("unlocked"), "{out:?}");
    // The touch policy, recorded and shown; the touch line before unlock
    // (the virtual card does not wait for the touch); and the virtual card's
    // missing attestation, said and recorded.
    assert!(
        stdout.contains("vault key: PIV slot 9d, PIN policy once, touch policy cached"),
        "{stdout}"
    );
    assert!(
        stderr.contains(
            "Touch the YubiKey when it blinks: its vault key (PIV slot 9d) has touch policy cached."
        ),
        "{stderr}"
    );
    assert!(
        stdout.contains(
            "attestation: not attested: the card has no attestation certificate (slot f9)"
        ),
        "{stdout}"
    );
    assert!(
        stdout.contains("  attestation: not attested: the card has no attestation"),
        "keyholder tokens --attestation: {stdout}"
    );
    assert!(
        !env.path().join("pin.txt").exists(),
        "the PIN file was removed"
    );
    drop(stack);
}

#[test]
fn the_protected_management_key_procedure_in_the_docs_makes_a_vault() {
    let mut env = Env::new();
    let stack = Stack::up("piv", &env.path().join("piv"));
    stack.configure(&mut env);
    env.module = PathBuf::new();
    env.daemon_args = vec!["--token-backend".to_owned(), "yubikey".to_owned()];
    let _daemon = env.start_daemon(&[]);
    let vars = [
        ("PIN", stack.settings["PIN"].as_str()),
        ("SERIAL", stack.settings["SERIAL"].as_str()),
    ];
    let out = DOCS.run(&env, "protect", &vars);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("management key PIN-protected on the card"),
        "{stdout}"
    );
    assert!(!env.path().join("pin.txt").exists());
    assert!(!env.path().join("factory-management-key.txt").exists());
    env.unlock();
    drop(stack);
}
