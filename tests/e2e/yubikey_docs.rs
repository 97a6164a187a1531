//! The commands in docs/yubikey.md, run as written on the virtual PIV card
//! through keyholderd's native YubiKey backend: each block the docs mark
//! `<!-- run by tests/e2e/yubikey_docs.rs: NAME -->` runs under `bash -euo
//! pipefail` with the variables the docs name (PIN, SERIAL) set from the
//! card, and keyholderd started as the docs start it.

use std::path::{Path, PathBuf};

use crate::util::{Env, Stack, keyholder_bin};

const DOC: &str = include_str!("../../docs/yubikey.md");
const MARK: &str = "<!-- run by tests/e2e/yubikey_docs.rs: ";

fn marked() -> Vec<&'static str> {
    DOC.lines()
        .filter_map(|l| l.strip_prefix(MARK)?.strip_suffix(" -->"))
        .collect()
}

fn block(name: &str) -> String {
    let mark = format!("{MARK}{name} -->");
    let mut lines = DOC.lines().skip_while(|l| *l != mark).skip(1);
    assert_eq!(
        lines.next(),
        Some("```sh"),
        "docs/yubikey.md: no ```sh after {mark}"
    );
    let body: Vec<&str> = lines.take_while(|l| *l != "```").collect();
    assert!(!body.is_empty(), "docs/yubikey.md: empty block {name}");
    body.join("\n") + "\n"
}

fn run(env: &Env, name: &str, vars: &[(&str, &str)]) -> std::process::Output {
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
        "docs/yubikey.md block {name} failed: {out:?}"
    );
    out
}

#[test]
fn every_marked_yubikey_block_is_run_here() {
    assert_eq!(marked(), ["management-key", "init"]);
    assert!(DOC.contains("keyholderd --token-backend yubikey &"));
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
    run(&env, "management-key", &vars);
    let key = std::fs::read_to_string(env.path().join("management-key.txt")).expect("key");
    assert_ne!(key.trim(), stack.settings["SO_PIN"], "the key was changed");
    // No --allow-default-management-key needed: the key is not the factory one.
    let out = run(&env, "init", &vars);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("unlocked"),
        "{out:?}"
    );
    assert!(
        !env.path().join("pin.txt").exists(),
        "the PIN file was removed"
    );
    drop(stack);
}
