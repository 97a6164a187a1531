//! The setup commands in docs/tokens.md, run as written on the token stacks
//! of the matrix. Each block the docs mark `<!-- run by
//! tests/e2e/token_docs.rs: NAME -->` runs under `bash -euo pipefail` in a
//! fresh world, with the variables the docs name (MODULE, PIN, ...) set
//! from the stack, and keyholderd started where the docs say to start it.

use std::path::Path;
use std::process::Output;

use crate::util::{Env, Stack, keyholder_bin};

const DOC: &str = include_str!("../../docs/tokens.md");
const MARK: &str = "<!-- run by tests/e2e/token_docs.rs: ";

/// The names of the marked blocks, in order.
fn marked() -> Vec<&'static str> {
    DOC.lines()
        .filter_map(|l| l.strip_prefix(MARK)?.strip_suffix(" -->"))
        .collect()
}

/// The shell block after the mark `name`.
fn block(name: &str) -> String {
    let mark = format!("{MARK}{name} -->");
    let mut lines = DOC.lines().skip_while(|l| *l != mark).skip(1);
    assert_eq!(
        lines.next(),
        Some("```sh"),
        "docs/tokens.md: no ```sh after {mark}"
    );
    let body: Vec<&str> = lines.take_while(|l| *l != "```").collect();
    assert!(!body.is_empty(), "docs/tokens.md: empty block {name}");
    body.join("\n") + "\n"
}

fn run(env: &Env, name: &str, vars: &[(&str, &str)]) -> Output {
    let bin = Path::new(keyholder_bin()).parent().expect("bin dir");
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = env
        .command("bash")
        .args(["-euo", "pipefail", "-c", &block(name)])
        .current_dir(env.path())
        .env("PATH", path)
        .envs(vars.iter().copied())
        .output()
        .expect("bash runs");
    assert!(
        out.status.success(),
        "docs/tokens.md block {name} failed: {out:?}"
    );
    out
}

#[test]
fn every_marked_block_is_run_here() {
    assert_eq!(marked(), ["tpm2-token", "tpm2-vault", "piv", "piv-keys"]);
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
    run(&env, "tpm2-token", &vars);
    let _daemon = env.start_daemon(&[]);
    run(&env, "tpm2-vault", &vars);
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
    run(&env, "piv", &vars);
    assert!(env.ok(&["status"]).contains("rollback:    OFF"));
    run(&env, "piv-keys", &vars);
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
