//! The setup commands in docs/tokens.md, run as written on the token stacks
//! of the matrix. Each block the docs mark `<!-- run by
//! tests/e2e/token_docs.rs: NAME -->` runs under `bash -euo pipefail` in a
//! fresh world, with the variables the docs name (MODULE, PIN, ...) set
//! from the stack, and keyholderd started where the docs say to start it.

use crate::util::{DocBlocks, Env, Stack};

const DOCS: DocBlocks = DocBlocks {
    path: "docs/tokens.md",
    text: include_str!("../../docs/tokens.md"),
    mark: "<!-- run by tests/e2e/token_docs.rs: ",
};

#[test]
fn every_marked_block_is_run_here() {
    assert_eq!(
        DOCS.marked(),
        ["tpm2-token", "tpm2-vault", "piv", "piv-keys"]
    );
}

#[test]
fn the_tpm_setup_in_the_docs_makes_a_token_and_a_vault_on_it() {
    let mut env = Env::new();
    // A bare TPM, as on a machine before its first token.
    let dir = env.path().join("tpm2");
    let stack = Stack::up_with("tpm2", &dir, &[("KEYHOLDER_TPM2_NO_TOKEN", "1")]);
    stack.configure(&mut env);
    let module = stack.settings["MODULE"].clone();
    let vars = [
        ("MODULE", module.as_str()),
        ("SO_PIN", "97531"),
        ("PIN", "246810"),
    ];
    DOCS.run(&env, "tpm2-token", &vars);
    let _daemon = env.start_daemon(&[]);
    DOCS.run(&env, "tpm2-vault", &vars);
    let status: serde_json::Value =
        serde_json::from_str(&env.ok(&["--json", "status"])).expect("json");
    assert_eq!(status["state"], "unlocked", "{status}");
    assert_eq!(status["token"]["label"], "keyholder", "{status}");
    assert!(
        !env.path().join("pin.txt").exists(),
        "the PIN file was removed"
    );
    drop(stack);
}

#[test]
fn the_yubikey_setup_in_the_docs_makes_the_vault_key_and_adopts_signing_keys() {
    let mut env = Env::new();
    let stack = Stack::up("piv", &env.path().join("piv"));
    stack.configure(&mut env);
    let _daemon = env.start_daemon(&[]);
    let vars = [
        ("PIN", stack.settings["PIN"].as_str()),
        ("MANAGEMENT_KEY", stack.settings["SO_PIN"].as_str()),
        ("SERIAL", stack.settings["SERIAL"].as_str()),
    ];
    DOCS.run(&env, "piv", &vars);
    assert!(env.ok(&["status"]).contains("rollback:    OFF"));
    DOCS.run(&env, "piv-keys", &vars);
    assert!(
        !env.path().join("pin.txt").exists(),
        "the PIN file was removed"
    );
    let keys: serde_json::Value =
        serde_json::from_str(&env.ok(&["--json", "key", "list"])).expect("json");
    assert_eq!(keys[0]["name"], "yubikey-ssh", "{keys}");
    assert_eq!(keys[0]["on_token"], true, "{keys}");
    let ca: serde_json::Value =
        serde_json::from_str(&env.ok(&["--json", "ca", "show", "yubikey-ca"])).expect("json");
    assert_eq!(ca["on_token"], true, "{ca}");
    // Both sign on the card.
    let data = env.file("data", "signed by the card\n");
    env.ok(&[
        "sign",
        "--key",
        "yubikey-ssh",
        "--in",
        data.to_str().expect("utf8"),
    ]);
    let out = env.path().join("issued");
    env.ok(&[
        "cert",
        "issue",
        "--ca",
        "yubikey-ca",
        "--profile",
        "client",
        "--cn",
        "admin",
        "--out-dir",
        out.to_str().expect("utf8"),
    ]);
    drop(stack);
}
