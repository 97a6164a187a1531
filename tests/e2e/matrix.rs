//! The token matrix: Keyholder's main flows, end to end through the real
//! binaries, on each PKCS#11 implementation that runs without hardware:
//! SoftHSM2, NSS softokn, tpm2-pkcs11 on a software TPM, and Yubico's
//! ykcs11 on a virtual PIV card. The stacks that need daemons are brought up
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
    env: Env,
    /// Whether the token can hold Keyholder's rollback record.
    holds_record: bool,
    /// How a signing key gets onto the token: `None` when `key generate
    /// --on-token` works; otherwise the argument of `key import
    /// --pkcs11-uri` for a key another tool made (see `adopt`).
    adopt: Option<Adopt>,
    _stack: Option<Stack>,
}

/// A signing key made on the token by the token's own tools, adopted by URI.
struct Adopt {
    make: fn(&Env, &str),
    uri: fn(&str) -> String,
}

fn softhsm2() -> Token {
    Token {
        env: Env::new(),
        holds_record: true,
        adopt: None,
        _stack: None,
    }
}

fn nss_softokn() -> Token {
    let mut env = Env::new();
    env.module = crate::nss::SOFTOKN.into();
    env.label = crate::nss::LABEL.to_owned();
    let args = crate::nss::nss_db(&env);
    env.daemon_args = vec!["--pkcs11-init-args".to_owned(), args];
    env.init_args = vec!["--without-rollback-protection".to_owned()];
    Token {
        env,
        holds_record: false,
        adopt: None,
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
        _stack: Some(stack),
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
    env.ok(&init);

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
            (adopt.make)(env, "tok");
            env.ok(&[
                "key",
                "import",
                "tok",
                "--pkcs11-uri",
                &(adopt.uri)("tok"),
                "--ssh",
                "--sign",
            ]);
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
    env.ok(&["ca", "create", "etcd", "--on-token"]);
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
