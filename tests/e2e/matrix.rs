//! The token matrix: Keyholder's main flows, end to end through the real
//! binaries, on each PKCS#11 implementation that runs without hardware:
//! SoftHSM2, NSS softokn, tpm2-pkcs11 on a software TPM, and Yubico's
//! ykcs11 on a virtual PIV card; and on the same virtual card reached by
//! keyholderd's native YubiKey backend (`--token-backend yubikey`). The stacks that need daemons are brought up
//! by `testing/<name>/up DIR` and stopped by PID with `testing/<name>/down
//! DIR` (both in the repository; `scripts/test` installs what they need).
//!
//! Each token runs: init (refused first where the token cannot hold the
//! rollback record), a wrong PIN, secrets, lock, restart, rollback refused
//! (or "rollback: OFF" shown), a key made on the token signing (checked
//! with openssl), a CA on the token issuing a certificate etcd accepts,
//! the agent signing for `ssh`, and clear errors for what no PKCS#11 token
//! key can be here (EdDSA, RSA).

use std::path::Path;
use std::process::Command;

use crate::util::{Env, Stack, assert_fails, assert_ok};

fn p(path: &Path) -> &str {
    path.to_str().expect("utf8 path")
}

/// One token of the matrix and what it can do.
struct Token {
    /// First, so it is dropped first: the stack's `down` needs its
    /// directory, which goes with `env`.
    _stack: Option<Stack>,
    env: Env,
    /// Whether the token can hold Keyholder's rollback record.
    holds_record: bool,
    /// How a signing key gets onto the token: `None` when `key generate
    /// --on-token` and `ca create --on-token` work; otherwise keys made by
    /// the token's own tools are adopted by URI.
    adopt: Option<Adopt>,
    /// Whether a key made by another program while unlocked is seen at
    /// once (ykcs11 reads the card when its session opens; the native
    /// backend reads it on every call).
    sees_new_keys: bool,
}

/// Makes a signing key on the token with the token's own tools, under the
/// `CKA_ID` given in hex; Keyholder then adopts it by URI (`pkcs11:id=%..`).
type Adopt = fn(&Env, &str);

fn softhsm2() -> Token {
    Token {
        env: Env::new(),
        holds_record: true,
        adopt: None,
        sees_new_keys: true,
        _stack: None,
    }
}

fn nss_softokn() -> Token {
    let mut env = Env::new();
    env.module = crate::util::NSS_SOFTOKN.into();
    env.label = crate::util::NSS_LABEL.to_owned();
    let args = env.nss_db();
    env.daemon_args = vec!["--pkcs11-init-args".to_owned(), args];
    env.init_args = vec!["--without-rollback-protection".to_owned()];
    Token {
        env,
        holds_record: false,
        adopt: None,
        sees_new_keys: true,
        _stack: None,
    }
}

fn tpm2_pkcs11() -> Token {
    let mut env = Env::new();
    let stack = Stack::up("tpm2", &env.path().join("tpm2"));
    stack.configure(&mut env);
    Token {
        env,
        holds_record: true,
        adopt: None,
        sees_new_keys: true,
        _stack: Some(stack),
    }
}

/// A virtual PIV card through Yubico's ykcs11: the vault key is generated
/// in slot 9d with the card's management key; signing keys are made in
/// slots 9a and 9c with pkcs11-tool (as `ykman` or `yubico-piv-tool` would)
/// and adopted.
fn ykcs11_piv() -> Token {
    let mut env = Env::new();
    let stack = Stack::up("piv", &env.path().join("piv"));
    stack.configure(&mut env);
    let key_file = env.file("management-key", &format!("{}\n", stack.settings["SO_PIN"]));
    env.init_args = vec![
        "--piv-slot".to_owned(),
        "9d".to_owned(),
        "--management-key-file".to_owned(),
        p(&key_file).to_owned(),
        "--without-rollback-protection".to_owned(),
    ];
    Token {
        env,
        holds_record: false,
        adopt: Some(piv_keypairgen),
        sees_new_keys: false,
        _stack: Some(stack),
    }
}

/// The virtual PIV card through keyholderd's native YubiKey backend: no
/// module; the same slots, ids and init flags as through ykcs11, plus
/// consent to the card's factory default management key.
fn yubikey_native() -> Token {
    let mut token = ykcs11_piv();
    let env = &mut token.env;
    env.module = std::path::PathBuf::new();
    env.daemon_args = vec!["--token-backend".to_owned(), "yubikey".to_owned()];
    env.init_args
        .push("--allow-default-management-key".to_owned());
    token.sees_new_keys = true;
    token
}

/// A P-256 key in the PIV slot whose ykcs11 id is `id` (01 = 9a, 02 = 9c,
/// 05 = 82),
/// made as docs/tokens.md shows: `yubico-piv-tool` generates it, and a
/// certificate carrying its public key (signed by a throwaway key) goes into
/// the slot, so that ykcs11 shows the key.
pub(crate) fn piv_keypairgen(env: &Env, id: &str) {
    let slot = match id {
        "01" => "9a",
        "02" => "9c",
        "05" => "82",
        other => panic!("no PIV slot for id {other}"),
    };
    let key = std::fs::read_to_string(env.path().join("management-key")).expect("key");
    let key = format!("-k{}", key.trim());
    let public = env.path().join(format!("{slot}.pub"));
    let cert = env.path().join(format!("{slot}.crt"));
    let throwaway = env.path().join(format!("{slot}-throwaway.key"));
    let steps: [(&str, Vec<&str>); 4] = [
        (
            "openssl",
            vec![
                "genpkey",
                "-algorithm",
                "EC",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-out",
                p(&throwaway),
            ],
        ),
        (
            "yubico-piv-tool",
            vec![
                "-a",
                "generate",
                "-s",
                slot,
                "-A",
                "ECCP256",
                &key,
                "-o",
                p(&public),
            ],
        ),
        (
            "openssl",
            vec![
                "x509",
                "-new",
                "-subj",
                "/CN=keyholder-test",
                "-key",
                p(&throwaway),
                "-force_pubkey",
                p(&public),
                "-days",
                "3650",
                "-out",
                p(&cert),
            ],
        ),
        (
            "yubico-piv-tool",
            vec!["-a", "import-certificate", "-s", slot, &key, "-i", p(&cert)],
        ),
    ];
    for (program, args) in steps {
        let out = env.command(program).args(&args).output().expect("runs");
        assert!(out.status.success(), "{program} {args:?}: {out:?}");
    }
}

/// The main flows on `token`; `name` is for messages.
fn flows(name: &str, token: Token) {
    let env = &token.env;
    let pin = p(&env.pin_file).to_owned();
    let daemon = env.start_daemon(&[]);
    let tokens = env.ok(&["tokens"]);
    assert!(tokens.contains(&env.label), "{name}: {tokens}");

    // Init: a token that cannot hold the rollback record is refused until
    // the user opts out, and says so from then on.
    let mut init = vec!["init", "--token-label", &env.label, "--pin-file", &pin];
    let plain: Vec<&str> = init
        .iter()
        .copied()
        .chain(
            env.init_args
                .iter()
                .map(String::as_str)
                .filter(|a| *a != "--without-rollback-protection"),
        )
        .collect();
    if !token.holds_record {
        let out = env.cli(&plain);
        assert_fails(&out, 3, "cannot store Keyholder's rollback record");
        assert_fails(&out, 3, "--without-rollback-protection");
        assert!(!env.vault.exists(), "{name}: no vault after a refused init");
    }
    init.extend(env.init_args.iter().map(String::as_str));
    let created = env.ok(&init);
    let recipient = created
        .split_whitespace()
        .find(|w| w.starts_with("age1tag1"))
        .unwrap_or_else(|| panic!("{name}: no recipient in {created}"))
        .to_owned();
    // The token's listing shows the key the vault is encrypted to, whatever
    // label the module gave it.
    let listed = env.ok(&["tokens"]);
    assert!(listed.contains(&recipient), "{name}: {listed}");

    // A wrong PIN is refused as such and the vault stays locked.
    let wrong = env.file("wrong-pin", "7777777\n");
    assert_fails(&env.cli(&["unlock", "--pin-file", p(&wrong)]), 7, "PIN");
    assert!(env.ok(&["status"]).contains("locked"));
    env.unlock();
    let status: serde_json::Value =
        serde_json::from_str(&env.ok(&["--json", "status"])).expect("status json");
    assert_eq!(
        status["rollback_protection"], token.holds_record,
        "{name}: {status}"
    );
    let rollback_line = if token.holds_record {
        "rollback:    on"
    } else {
        "rollback:    OFF"
    };
    assert!(env.ok(&["status"]).contains(rollback_line), "{name}");
    let listed = env.ok(&["tokens"]);
    let tokens_line = if token.holds_record {
        "rollback protection: on"
    } else {
        "rollback protection: OFF"
    };
    assert!(listed.contains(tokens_line), "{name}: {listed}");

    // Secrets, lock, restart.
    env.put("db/password", b"first");
    let older = std::fs::read(&env.vault).expect("vault");
    let args = ["secret", "put", "--force", "db/password"];
    assert_ok(&env.cli_with_stdin(&args, Some(b"second")), &args);
    env.ok(&["lock"]);
    assert_fails(&env.cli(&["secret", "get", "db/password"]), 3, "locked");
    drop(daemon);
    let daemon = env.start_daemon(&[]);
    env.unlock();
    assert_eq!(env.ok(&["secret", "get", "db/password"]), "second");
    env.ok(&["lock"]);

    // Rollback: an older genuine copy is refused where the token holds the
    // record, and opens (as the status line warned) where it cannot.
    let current = std::fs::read(&env.vault).expect("vault");
    std::fs::write(&env.vault, &older).expect("older copy in place");
    let out = env.cli(&["unlock", "--pin-file", &pin]);
    if token.holds_record {
        assert_fails(&out, 3, "older copy is in its place");
    } else {
        assert_ok(&out, &["unlock"]);
        assert_eq!(env.ok(&["secret", "get", "db/password"]), "first");
        env.ok(&["lock"]);
    }
    std::fs::write(&env.vault, &current).expect("current copy back");
    env.unlock();
    assert_eq!(env.ok(&["secret", "get", "db/password"]), "second");

    on_token_keys(name, &token);
    drop(daemon);
}

/// A key on the token signs (checked with openssl) and serves the agent
/// for a real `ssh`; a CA on the token issues certificates etcd accepts;
/// what the token cannot hold is refused with a message that says why.
fn on_token_keys(name: &str, token: &Token) {
    let env = &token.env;
    match &token.adopt {
        None => {
            env.ok(&[
                "key",
                "generate",
                "tok",
                "--type",
                "ecdsa-p256",
                "--on-token",
                "--ssh",
                "--sign",
            ]);
        }
        Some(adopt) => {
            // Generating is refused with a message that says what to do.
            let out = env.cli(&["key", "generate", "x", "--type", "ecdsa-p256", "--on-token"]);
            assert_fails(&out, 3, "PIV card");
            assert_fails(&out, 3, "--pkcs11-uri");
            adopt(env, "01");
            adopt(env, "02");
            adopt(env, "05");
            let args = [
                "key",
                "import",
                "tok",
                "--pkcs11-uri",
                "pkcs11:id=%01",
                "--ssh",
                "--sign",
            ];
            if !token.sees_new_keys {
                // ykcs11 reads the card when a session opens: keys made by
                // another program since are not seen, and the error says so.
                assert_fails(
                    &env.cli(&args),
                    3,
                    "`keyholder lock` and `keyholder unlock`",
                );
                env.ok(&["lock"]);
                env.unlock();
            }
            env.ok(&args);
            // Slot 9c wants the PIN before every signature, which Keyholder
            // cannot give: refused at adoption, not at the first signature.
            let args = [
                "key",
                "import",
                "sig",
                "--pkcs11-uri",
                "pkcs11:id=%02",
                "--sign",
            ];
            assert_fails(&env.cli(&args), 3, "CKA_ALWAYS_AUTHENTICATE");
        }
    }
    for kind in ["ed25519", "rsa-3072"] {
        assert_fails(
            &env.cli(&["key", "generate", "x", "--type", kind, "--on-token"]),
            6,
            "ecdsa-p256",
        );
    }
    let data = env.file("data.bin", "signed on the token\n");
    let sig = env.path().join("tok.sig");
    env.ok(&["sign", "--key", "tok", "--in", p(&data), "--out", p(&sig)]);
    let pem = env.path().join("tok.pem");
    let public = env.ok(&["key", "show", "tok", "--public", "--format", "pem"]);
    std::fs::write(&pem, public).expect("pem");
    let verified = Command::new("openssl")
        .args(["dgst", "-sha256", "-verify", p(&pem), "-signature"])
        .args([p(&sig), p(&data)])
        .output()
        .expect("openssl runs");
    assert!(
        verified.status.success(),
        "{name}: openssl verify: {verified:?}"
    );

    // The agent signs for ssh with the key on the token.
    let authorized = env.ok(&["key", "show", "tok", "--public"]);
    let sshd = crate::ssh::Sshd::start(&env.path().join("sshd"), &authorized, "");
    let out = sshd.ssh(env, &crate::ssh::public_file(env, "tok"), None);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("keyholder-ok"),
        "{name}: ssh through the agent: {out:?}"
    );
    drop(sshd);

    // A CA whose key is on the token issues an etcd server and client
    // certificate; etcd accepts the client.
    match &token.adopt {
        None => env.ok(&["ca", "create", "etcd", "--on-token"]),
        Some(_) => {
            let uri = "pkcs11:id=%05";
            env.ok(&["ca", "create", "etcd", "--on-token", "--pkcs11-uri", uri])
        }
    };
    let dir = env.path().join("etcd");
    for (profile, cn, extra) in [
        ("server", "etcd-1", &["--san", "127.0.0.1"][..]),
        ("client", "apiserver-etcd-client", &[][..]),
    ] {
        let out_dir = dir.join(profile);
        let mut args = vec![
            "cert",
            "issue",
            "--ca",
            "etcd",
            "--profile",
            profile,
            "--cn",
            cn,
            "--ttl",
            "1h",
            "--out-dir",
            p(&out_dir),
        ];
        args.extend_from_slice(extra);
        env.ok(&args);
    }
    let (_etcd, endpoint) = crate::kube::start_etcd(&dir, &dir.join("server"));
    crate::kube::put_when_up(&endpoint, &dir, &dir.join("client"));
}

#[test]
fn matrix_softhsm2() {
    flows("SoftHSM2", softhsm2());
}

#[test]
fn matrix_nss_softokn() {
    flows("NSS softokn", nss_softokn());
}

#[test]
fn matrix_tpm2_pkcs11() {
    flows("tpm2-pkcs11", tpm2_pkcs11());
}

#[test]
fn matrix_ykcs11_virtual_piv() {
    flows("ykcs11", ykcs11_piv());
}

#[test]
fn matrix_yubikey_native() {
    flows("YubiKey native", yubikey_native());
}
