//! The commands in docs/policy.md, run as written: each block marked
//! `<!-- run by tests/e2e/policy_docs.rs: NAME -->` runs under `bash -euo
//! pipefail` in a directory holding `pin.txt`, against an unlocked vault.

use crate::util::{DocBlocks, Env};

const DOCS: DocBlocks = DocBlocks {
    path: "docs/policy.md",
    text: include_str!("../../docs/policy.md"),
    mark: "<!-- run by tests/e2e/policy_docs.rs: ",
};

#[test]
fn every_marked_policy_block_is_run_here() {
    assert_eq!(DOCS.marked(), ["policy-set", "explain", "grant"]);
}

/// The ```text block after "prints" that follows the block `name`.
fn printed_after(name: &str) -> String {
    let mark = format!("{}{name} -->", DOCS.mark);
    let rest = &DOCS.text[DOCS.text.find(&mark).expect("mark")..];
    let start = rest.find("```text\n").expect("a ```text block") + "```text\n".len();
    let end = rest[start..].find("```").expect("end of block");
    rest[start..start + end].to_owned()
}

#[test]
fn the_policy_procedure_in_the_docs_works_as_written() {
    let (env, _daemon) = Env::ready();
    std::fs::copy(&env.pin_file, env.path().join("pin.txt")).expect("pin.txt");
    DOCS.run(&env, "policy-set", &[]);
    let current = std::fs::read_to_string(env.path().join("current.toml")).expect("current");
    assert!(current.contains("name = \"deploy\""), "{current}");
    // The admin's own client still does everything under the new policy.
    env.ok(&["secret", "list"]);
    let out = DOCS.run(&env, "explain", &[]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        printed_after("explain")
    );
    let out = DOCS.run(&env, "grant", &[]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("deploy\tkubeconfig:prod:deployer"), "{text}");
    assert!(!text.contains("khg_"), "the token is not listed: {text}");
}
