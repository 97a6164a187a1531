//! keyholderd's native YubiKey backend (`--token-backend yubikey`) on the
//! virtual PIV card (`testing/piv/up`): a vault moves between ykcs11 and
//! the native backend both ways; the factory default management key is
//! refused at init unless allowed; the card is not held, so
//! `yubico-piv-tool` works while Keyholder is unlocked and Keyholder's next
//! card operation still works (the PIN is verified again); the card going
//! away locks the session within the poll interval.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::util::{Env, Stack, assert_fails};

fn p(path: &Path) -> &str {
    path.to_str().expect("utf8 path")
}

/// A world on a fresh virtual card; keyholderd goes through ykcs11 until
/// [`native`] switches it.
fn card() -> (Env, Stack) {
    let mut env = Env::new();
    let stack = Stack::up("piv", &env.path().join("piv"));
    stack.configure(&mut env);
    env.file("management-key", &format!("{}\n", stack.settings["SO_PIN"]));
    (env, stack)
}

/// keyholderd started from `env` uses the native backend, no module.
fn native(env: &mut Env) {
    env.module = PathBuf::new();
    env.daemon_args = vec!["--token-backend".to_owned(), "yubikey".to_owned()];
}

fn through_ykcs11(env: &mut Env, module: &str) {
    env.module = PathBuf::from(module);
    env.daemon_args.clear();
}

fn init_in_slot(env: &Env, slot: &str, extra: &[&str]) -> std::process::Output {
    let key = env.path().join("management-key");
    let mut args = vec![
        "init",
        "--token-label",
        &env.label,
        "--pin-file",
        p(&env.pin_file),
        "--piv-slot",
        slot,
        "--management-key-file",
        p(&key),
        "--without-rollback-protection",
    ];
    args.extend_from_slice(extra);
    env.cli(&args)
}

#[test]
fn yubikey_vault_moves_between_ykcs11_and_native() {
    let (mut env, stack) = card();
    let module = stack.settings["MODULE"].clone();

    // Made through ykcs11 (slot 9d), opened natively, written there, and
    // read through ykcs11 again.
    let daemon = env.start_daemon(&[]);
    let out = init_in_slot(&env, "9d", &[]);
    assert!(out.status.success(), "{out:?}");
    env.unlock();
    env.put("made/through", b"ykcs11");
    drop(daemon);
    native(&mut env);
    let daemon = env.start_daemon(&[]);
    env.unlock();
    assert_eq!(env.ok(&["secret", "get", "made/through"]), "ykcs11");
    env.put("written/natively", b"native");
    let status: serde_json::Value =
        serde_json::from_str(&env.ok(&["--json", "status"])).expect("json");
    assert_eq!(status["token"]["label"], env.label, "{status}");
    assert_eq!(status["token"]["manufacturer"], "Yubico", "{status}");
    drop(daemon);
    through_ykcs11(&mut env, &module);
    let daemon = env.start_daemon(&[]);
    env.unlock();
    assert_eq!(env.ok(&["secret", "get", "written/natively"]), "native");
    drop(daemon);

    // Made natively (retired slot 82), opened through ykcs11.
    env.vault = env.path().join("vault2/vault.age");
    native(&mut env);
    let daemon = env.start_daemon(&[]);
    let out = init_in_slot(&env, "82", &["--allow-default-management-key"]);
    assert!(out.status.success(), "{out:?}");
    env.unlock();
    env.put("second/vault", b"slot 82");
    drop(daemon);
    through_ykcs11(&mut env, &module);
    let daemon = env.start_daemon(&[]);
    env.unlock();
    assert_eq!(env.ok(&["secret", "get", "second/vault"]), "slot 82");
    drop(daemon);
    drop(stack);
}

#[test]
fn yubikey_native_shares_the_card_and_locks_when_it_is_pulled() {
    let (mut env, stack) = card();
    native(&mut env);
    let daemon = env.start_daemon(&["--token-poll-interval", "200ms"]);

    // `keyholder tokens` lists the card, read natively.
    let tokens = env.ok(&["tokens"]);
    assert!(tokens.contains(&env.label), "{tokens}");
    assert!(tokens.contains("Yubico"), "{tokens}");
    assert!(tokens.contains("YubiKey 5.2.7"), "{tokens}");

    // The factory default management key is refused, by name, with the way
    // out; nothing is made on the card.
    let out = init_in_slot(&env, "9d", &[]);
    assert_fails(&out, 3, "factory default PIV management key");
    assert_fails(&out, 3, "yubico-piv-tool -a set-mgm-key");
    assert_fails(&out, 3, "--allow-default-management-key");
    assert!(!env.vault.exists());
    let out = init_in_slot(&env, "9d", &["--allow-default-management-key"]);
    assert!(out.status.success(), "{out:?}");

    // A wrong PIN shows the card's count.
    let wrong = env.file("wrong-pin", "7777777\n");
    assert_fails(
        &env.cli(&["unlock", "--pin-file", p(&wrong)]),
        7,
        "earlier tries failed",
    );
    env.unlock();
    crate::matrix::piv_keypairgen(&env, "01");
    env.ok(&[
        "key",
        "import",
        "card",
        "--pkcs11-uri",
        "pkcs11:id=%01",
        "--sign",
    ]);
    let data = env.file("data", "signed on the card\n");
    let sign = ["sign", "--key", "card", "--in", p(&data)];
    env.ok(&sign);

    // The card is not held: another program uses it while Keyholder is
    // unlocked (and resets it, which clears the PIN verification), and
    // Keyholder's next signature still works.
    for _ in 0..2 {
        let out = env
            .command("yubico-piv-tool")
            .args(["-a", "status"])
            .output()
            .expect("yubico-piv-tool runs");
        assert!(out.status.success(), "{out:?}");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains(&stack.settings["SERIAL"]), "{text}");
        env.ok(&sign);
    }
    assert!(env.ok(&["status"]).contains("unlocked"));

    // The card goes away (its reader and pcscd stop): locked within the
    // poll interval, and said why.
    drop(stack);
    let gone = Instant::now();
    let deadline = gone + Duration::from_secs(10);
    loop {
        let status: serde_json::Value =
            serde_json::from_str(&env.ok(&["--json", "status"])).expect("json");
        if status["state"] == "locked" {
            assert_eq!(status["lock_reason"], "token-removed", "{status}");
            break;
        }
        assert!(Instant::now() < deadline, "still unlocked: {status}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let took = gone.elapsed();
    eprintln!("locked {took:?} after the card went away (poll interval 200ms)");
    assert!(took < Duration::from_secs(2), "{took:?}");
    drop(daemon);
}

/// Text of a CLI output's stdout and stderr.
fn texts(out: &std::process::Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn yubikey_native_init_records_policies_and_that_the_card_gives_no_attestation() {
    let (mut env, stack) = card();
    native(&mut env);
    let daemon = env.start_daemon(&[]);

    // Policies need a slot; a bad one is refused by name.
    let out = init_in_slot(&env, "9d", &["--touch-policy", "sometimes"]);
    assert_fails(&out, 2, "'sometimes'");
    assert!(!env.vault.exists());
    // An attestation root that is not a certificate is refused before the
    // card is touched.
    let bad_root = env.file("root.pem", "not a certificate\n");
    let out = init_in_slot(
        &env,
        "9d",
        &[
            "--allow-default-management-key",
            "--attestation-root",
            p(&bad_root),
        ],
    );
    assert!(!out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("attestation_roots_pem"),
        "{out:?}"
    );
    assert!(!env.vault.exists());

    // The vault key with touch policy "cached": recorded, and that the
    // virtual card has no attestation certificate (slot f9 answers "not
    // found"), so the key is enrolled "not attested".
    let out = init_in_slot(
        &env,
        "9d",
        &[
            "--allow-default-management-key",
            "--pin-policy",
            "once",
            "--touch-policy",
            "cached",
        ],
    );
    let (stdout, stderr) = texts(&out);
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(
        stdout.contains("vault key: PIV slot 9d, PIN policy once, touch policy cached"),
        "{stdout}"
    );
    assert!(
        stdout.contains(
            "attestation: not attested: the card has no attestation certificate (slot f9)"
        ),
        "{stdout}"
    );
    let tokens = env.ok(&["tokens", "--attestation"]);
    assert!(tokens.contains("touch policy cached"), "{tokens}");
    assert!(
        tokens.contains("attestation: not attested: the card has no attestation certificate"),
        "{tokens}"
    );
    assert!(tokens.contains("origin: generated"), "{tokens}");

    // Unlock says to touch the key before the card operation, on stderr.
    // The virtual card enforces no touch policy, so nothing waits here; on
    // a YubiKey the ECDH waits until the key is touched.
    let unlock = ["unlock", "--pin-file", p(&env.pin_file)];
    let out = env.cli(&unlock);
    let (stdout, stderr) = texts(&out);
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(
        stderr.contains(
            "Touch the YubiKey when it blinks: its vault key (PIV slot 9d) has touch policy cached"
        ),
        "{stderr}"
    );
    let status = env.ok(&["status"]);
    assert!(
        status.contains("vault key:   PIV slot 9d, PIN policy once, touch policy cached"),
        "{status}"
    );
    assert!(status.contains("attestation: not attested"), "{status}");
    let json: serde_json::Value =
        serde_json::from_str(&env.ok(&["--json", "status"])).expect("json");
    assert_eq!(json["vault_key"]["touch_policy"], "cached", "{json}");
    assert_eq!(json["vault_key"]["attested"], false, "{json}");
    assert_eq!(json["token"]["vault_key"]["slot"], "9d", "{json}");
    // keyholderd says it too, before the ECDH.
    assert!(
        daemon.log_text().contains("waits for a touch before ECDH"),
        "{}",
        daemon.log_text()
    );

    // A signing key made with touch policy "always" by Yubico's tool:
    // keyholderd says to touch the key before each signature.
    let key = std::fs::read_to_string(env.path().join("management-key")).expect("key");
    let out = env
        .command("yubico-piv-tool")
        .args([
            "-a",
            "generate",
            "-s",
            "9a",
            "-A",
            "ECCP256",
            "--pin-policy=once",
            "--touch-policy=always",
            &format!("-k{}", key.trim()),
            "-o",
            p(&env.path().join("9a.pub")),
        ])
        .output()
        .expect("yubico-piv-tool runs");
    assert!(out.status.success(), "{out:?}");
    env.ok(&[
        "key",
        "import",
        "touched",
        "--pkcs11-uri",
        "pkcs11:id=%01",
        "--sign",
    ]);
    let data = env.file("data", "signed after a touch\n");
    env.ok(&["sign", "--key", "touched", "--in", p(&data)]);
    assert!(
        daemon
            .log_text()
            .contains("waits for a touch before signing"),
        "{}",
        daemon.log_text()
    );

    // After a restart, keyholderd reads the key's policy from the card
    // before any unlock, so the first unlock says it too; the vault's
    // record comes back at unlock.
    drop(daemon);
    let daemon = env.start_daemon(&[]);
    let locked = env.ok(&["status"]);
    assert!(locked.contains("state:       locked"), "{locked}");
    assert!(
        locked.contains("vault key:   PIV slot 9d, PIN policy once, touch policy cached"),
        "{locked}"
    );
    let out = env.cli(&unlock);
    let (stdout, stderr) = texts(&out);
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(stderr.contains("Touch the YubiKey"), "{stderr}");
    let json: serde_json::Value =
        serde_json::from_str(&env.ok(&["--json", "status"])).expect("json");
    assert_eq!(
        json["vault_key"]["attestation"], "the card has no attestation certificate (slot f9)",
        "{json}"
    );
    drop(daemon);

    // A key with touch policy "never" (the default): no touch line. Its
    // PIN policy "always" works natively, since the PIN is verified again
    // right before each card operation.
    env.vault = env.path().join("vault2/vault.age");
    let daemon = env.start_daemon(&[]);
    let out = init_in_slot(
        &env,
        "82",
        &["--allow-default-management-key", "--pin-policy", "always"],
    );
    let (stdout, stderr) = texts(&out);
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(
        stdout.contains("PIV slot 82, PIN policy always, touch policy never"),
        "{stdout}"
    );
    let out = env.cli(&unlock);
    let (_, stderr) = texts(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(!stderr.contains("Touch"), "{stderr}");
    env.put("pin/always", b"verified again");
    assert_eq!(env.ok(&["secret", "get", "pin/always"]), "verified again");
    drop(daemon);
    drop(stack);
}

#[test]
fn yubikey_native_protects_the_management_key_behind_the_pin() {
    let (mut env, stack) = card();
    native(&mut env);
    let daemon = env.start_daemon(&[]);

    // With the factory key given, --protect-management-key replaces it by
    // a random key kept on the card behind the PIN, and uses that.
    let out = init_in_slot(&env, "9d", &["--protect-management-key"]);
    let (stdout, stderr) = texts(&out);
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(
        stdout.contains("management key PIN-protected on the card"),
        "{stdout}"
    );
    assert!(
        daemon
            .log_text()
            .contains("management key is now a random one, kept on the card behind the PIN"),
        "{}",
        daemon.log_text()
    );
    drop(daemon);

    // The factory key no longer works; the key on the card does, read
    // after the PIN with no key given.
    env.vault = env.path().join("vault2/vault.age");
    let daemon = env.start_daemon(&[]);
    let out = init_in_slot(&env, "82", &["--allow-default-management-key"]);
    assert_fails(&out, 7, "management key");
    assert!(!env.vault.exists());
    let out = env.cli(&[
        "init",
        "--token-label",
        &env.label,
        "--pin-file",
        p(&env.pin_file),
        "--piv-slot",
        "82",
        "--management-key-on-card",
        "--without-rollback-protection",
    ]);
    let (stdout, stderr) = texts(&out);
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(
        stdout.contains("vault key: PIV slot 82, PIN policy once, touch policy never, management key PIN-protected on the card"),
        "{stdout}"
    );
    env.unlock();
    env.put("on/card", b"protected");
    assert_eq!(env.ok(&["secret", "get", "on/card"]), "protected");
    drop(daemon);
    drop(stack);
}
