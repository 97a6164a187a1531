//! Secret history: a put over a secret keeps its earlier values (up to
//! `secret_history`), which can be listed, read and rolled back to, and go
//! with the secret on `rm`; a version 1 vault opens and gains history.

use std::io::{Read, Write};

use crate::util::{DocBlocks, Env, assert_fails};

const DOCS: DocBlocks = DocBlocks {
    path: "docs/secret-history.md",
    text: include_str!("../../docs/secret-history.md"),
    mark: "<!-- run by tests/e2e/secret_history.rs: ",
};

fn json(env: &Env, args: &[&str]) -> serde_json::Value {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    serde_json::from_str(env.ok(&all).trim()).expect("one JSON value")
}

fn put_force(env: &Env, name: &str, value: &[u8]) {
    let args = ["secret", "put", name, "--force"];
    let out = env.cli_with_stdin(&args, Some(value));
    crate::util::assert_ok(&out, &args);
}

#[test]
fn overwrite_read_old_versions_roll_back_and_remove() {
    let env = Env::new();
    let config = env.path().join("config/keyholder");
    std::fs::create_dir_all(&config).expect("config dir");
    std::fs::write(config.join("keyholderd.toml"), "secret_history = 2\n").expect("config");
    let daemon = env.start_daemon(&[]);
    env.init();
    env.unlock();
    env.put("db/pw", b"v1");
    let out = env.cli_with_stdin(&["secret", "put", "db/pw"], Some(b"nope"));
    assert_fails(&out, 5, "already exists");
    put_force(&env, "db/pw", b"v2");
    put_force(&env, "db/pw", b"v3");
    put_force(&env, "db/pw", &[0xff, 0x00, 0x01]);
    // Current is version 4; secret_history = 2 keeps 3 and 2.
    let h = json(&env, &["secret", "history", "db/pw"]);
    let versions: Vec<(u64, bool, u64)> = h["versions"]
        .as_array()
        .expect("versions")
        .iter()
        .map(|v| {
            (
                v["version"].as_u64().expect("n"),
                v["current"].as_bool().expect("current"),
                v["size"].as_u64().expect("size"),
            )
        })
        .collect();
    assert_eq!(
        versions,
        [(4, true, 3), (3, false, 2), (2, false, 2)],
        "{h}"
    );
    assert!(h["versions"][1]["replaced_at"].is_string(), "{h}");
    assert!(h["versions"][0]["replaced_at"].is_null(), "{h}");
    let text = env.ok(&["secret", "history", "db/pw"]);
    assert!(!text.contains("v3") && !text.contains("v2\n"), "{text}");

    let get = |v: &str| {
        let out = env.cli(&["secret", "get", "db/pw", "--version", v]);
        crate::util::assert_ok(&out, &["secret", "get", "--version", v]);
        out.stdout
    };
    assert_eq!(get("3"), b"v3");
    assert_eq!(get("2"), b"v2");
    assert_eq!(get("4"), [0xff, 0x00, 0x01]);
    let out = env.cli(&["secret", "get", "db/pw", "--version", "1"]);
    assert_fails(&out, 4, "version 1");
    let old = json(&env, &["secret", "get", "db/pw", "--version", "2"]);
    assert_eq!(old["value"], "v2");

    // Rollback stores version 2's value as version 5; 4 joins the history.
    let r = json(&env, &["secret", "rollback", "db/pw", "--to", "2"]);
    assert_eq!(r["version"], 5, "{r}");
    assert_eq!(env.ok(&["secret", "get", "db/pw"]), "v2");
    let h = json(&env, &["secret", "history", "db/pw"]);
    let numbers: Vec<u64> = h["versions"]
        .as_array()
        .expect("versions")
        .iter()
        .map(|v| v["version"].as_u64().expect("n"))
        .collect();
    assert_eq!(numbers, [5, 4, 3]);
    let out = env.cli(&["secret", "rollback", "db/pw", "--to", "5"]);
    assert_fails(&out, 6, "current value already");
    let out = env.cli(&["secret", "rollback", "db/pw", "--to", "1"]);
    assert_fails(&out, 4, "secret history db/pw");
    let out = env.cli(&["secret", "rollback", "nope", "--to", "1"]);
    assert_fails(&out, 4, "nope");

    // rm removes the history and says so; a new secret starts at 1.
    let text = env.ok(&["secret", "rm", "db/pw"]);
    assert!(
        text.starts_with("removed db/pw and its 2 earlier values"),
        "{text}"
    );
    env.put("db/pw", b"fresh");
    let h = json(&env, &["secret", "history", "db/pw"]);
    assert_eq!(h["versions"].as_array().expect("versions").len(), 1, "{h}");
    assert_eq!(h["versions"][0]["version"], 1);
    let out = env.cli(&["secret", "get", "db/pw", "--version", "3"]);
    assert_fails(&out, 4, "version 3");
    let rm = json(&env, &["secret", "rm", "db/pw"]);
    assert_eq!(rm["history_removed"], 0);

    // The history survives a restart of the daemon (it is in the vault).
    env.put("k", b"a");
    put_force(&env, "k", b"b");
    env.ok(&["lock"]);
    env.unlock();
    assert_eq!(
        env.cli(&["secret", "get", "k", "--version", "1"]).stdout,
        b"a"
    );

    // secret_history lowered to 0: the kept value is no longer served.
    drop(daemon);
    std::fs::write(config.join("keyholderd.toml"), "secret_history = 0\n").expect("config");
    let _daemon = env.start_daemon(&[]);
    env.unlock();
    let out = env.cli(&["secret", "get", "k", "--version", "1"]);
    assert_fails(&out, 4, "version 1");
    let h = json(&env, &["secret", "history", "k"]);
    assert_eq!(h["versions"].as_array().expect("versions").len(), 1, "{h}");
}

#[test]
fn a_version_1_vault_opens_and_gains_history_on_its_next_write() {
    let env = Env::new();
    let recovery = age::x25519::Identity::generate();
    let recipient = recovery.to_public().to_string();
    let _daemon = env.start_daemon(&[]);
    env.ok(&[
        "init",
        "--token-label",
        "ops",
        "--recovery-recipient",
        &recipient,
        "--pin-file",
        env.pin_file.to_str().expect("utf8"),
    ]);
    env.unlock();
    env.put("db/prod/password", b"hunter2");
    env.put("blob", &[0, 159, 146, 150]);
    env.ok(&["lock"]);

    // The file as a version 1 Keyholder wrote it: secrets that were never
    // replaced are written the same in both versions; only the envelope's
    // version (outside the MACed body) differs.
    let file = std::fs::read(&env.vault).expect("vault");
    let mut plain = String::new();
    age::Decryptor::new(&file[..])
        .expect("age file")
        .decrypt(std::iter::once(&recovery as &dyn age::Identity))
        .expect("recovery identity decrypts")
        .read_to_string(&mut plain)
        .expect("read");
    assert!(plain.contains("\n  \"version\": 3,\n"), "{plain}");
    assert!(!plain.contains("history"), "{plain}");
    let v1 = plain.replacen("\n  \"version\": 3,\n", "\n  \"version\": 1,\n", 1);
    let doc: serde_json::Value = serde_json::from_str(&v1).expect("JSON");
    assert!(
        doc["body"]["secrets"]["db/prod/password"]
            .get("version")
            .is_none()
    );
    let token: age::tag::Recipient = doc["body"]["recipients"]["tokens"][0]["recipient"]
        .as_str()
        .expect("token recipient")
        .parse()
        .expect("age1tag recipient");
    let recovery_recipient = recovery.to_public();
    let encryptor = age::Encryptor::with_recipients(
        [
            &token as &dyn age::Recipient,
            &recovery_recipient as &dyn age::Recipient,
        ]
        .into_iter(),
    )
    .expect("encryptor");
    let mut old = Vec::new();
    let mut w = encryptor.wrap_output(&mut old).expect("wrap");
    w.write_all(v1.as_bytes()).expect("write");
    w.finish().expect("finish");
    std::fs::write(&env.vault, &old).expect("write vault");

    env.unlock();
    assert_eq!(env.ok(&["secret", "get", "db/prod/password"]), "hunter2");
    assert_eq!(
        env.cli(&["secret", "get", "blob"]).stdout,
        [0, 159, 146, 150]
    );
    let h = json(&env, &["secret", "history", "db/prod/password"]);
    assert_eq!(h["versions"][0]["version"], 1, "{h}");
    put_force(&env, "db/prod/password", b"hunter3");
    assert_eq!(
        env.ok(&["secret", "get", "db/prod/password", "--version", "1"]),
        "hunter2"
    );
    // Written back in the current version (3), with the history.
    let file = std::fs::read(&env.vault).expect("vault");
    let mut plain = String::new();
    age::Decryptor::new(&file[..])
        .expect("age file")
        .decrypt(std::iter::once(&recovery as &dyn age::Identity))
        .expect("decrypts")
        .read_to_string(&mut plain)
        .expect("read");
    let doc: serde_json::Value = serde_json::from_str(&plain).expect("JSON");
    assert_eq!(doc["version"], 3);
    let secret = &doc["body"]["secrets"]["db/prod/password"];
    assert_eq!(secret["version"], 2);
    assert_eq!(secret["history"][0]["value"], "hunter2");
}

#[test]
fn every_marked_block_in_the_doc_is_run_here() {
    assert_eq!(DOCS.marked(), ["rotate", "read-and-roll-back", "remove"]);
}

#[test]
fn the_history_commands_in_the_doc_work_as_written() {
    let (env, _daemon) = Env::ready();
    let out = DOCS.run(&env, "rotate", &[]);
    let text = String::from_utf8_lossy(&out.stdout);
    let table: Vec<&str> = text
        .lines()
        .skip_while(|l| !l.starts_with("VERSION"))
        .collect();
    assert_eq!(table[0], "VERSION\tSIZE\tSTORED\tREPLACED");
    assert!(
        table[1].starts_with("3\t8\t") && table[1].ends_with("\tcurrent"),
        "{text}"
    );
    assert!(table[2].starts_with("2\t9\t"), "{text}");
    assert!(table[3].starts_with("1\t8\t"), "{text}");
    assert_eq!(table.len(), 4, "{text}");
    let out = DOCS.run(&env, "read-and-roll-back", &[]);
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "first-pw", "{text}");
    assert!(
        lines[1].starts_with("db/prod/password now holds the value of version 2, as version 4"),
        "{text}"
    );
    assert_eq!(lines[2], "second-pw", "{text}");
    let out = DOCS.run(&env, "remove", &[]);
    assert!(
        String::from_utf8_lossy(&out.stdout)
            .starts_with("removed db/prod/password and its 3 earlier values (generation"),
        "{out:?}"
    );
}

#[test]
fn history_rollback_and_run_go_through_the_policy() {
    let (env, _daemon) = Env::ready();
    env.put("app/prod/pw", b"one");
    put_force(&env, "app/prod/pw", b"two");
    env.put("other/pw", b"x");
    // A copy of the client is another executable to the policy: it may
    // read app/prod/ and nothing else.
    let copy = env.path().join("deploy-client");
    std::fs::copy(crate::util::keyholder_bin(), &copy).expect("copy client");
    let admin = std::fs::canonicalize(crate::util::keyholder_bin()).expect("path");
    let policy = env.file(
        "policy.toml",
        &format!(
            "default = \"deny\"\n\n[[rule]]\nname = \"admin\"\nexe = [\"{}\"]\nallow = [\"*\"]\n\n[[rule]]\nname = \"deploy\"\nexe = [\"{}\"]\nallow = [\"secret:read:app/prod/*\"]\n",
            admin.display(),
            copy.display()
        ),
    );
    env.ok(&[
        "policy",
        "set",
        policy.to_str().expect("utf8"),
        "--pin-file",
        env.pin_file.to_str().expect("utf8"),
    ]);
    let copy_cli = |args: &[&str]| {
        env.command(copy.to_str().expect("utf8"))
            .args(args)
            .output()
            .expect("client runs")
    };
    let out = copy_cli(&["secret", "get", "app/prod/pw", "--version", "1"]);
    assert_eq!(out.stdout, b"one", "{out:?}");
    assert!(
        copy_cli(&["secret", "history", "app/prod/pw"])
            .status
            .success()
    );
    let out = copy_cli(&["secret", "rollback", "app/prod/pw", "--to", "1"]);
    assert_fails(&out, 7, "denied");
    assert_eq!(env.ok(&["secret", "get", "app/prod/pw"]), "two");
    let out = copy_cli(&["secret", "history", "other/pw"]);
    assert_fails(&out, 7, "denied");
    // run: a refused secret starts nothing.
    let marker = env.path().join("started");
    let m = marker.to_str().expect("utf8");
    let out = copy_cli(&["run", "--env", "A=other/pw", "--", "touch", m]);
    assert_fails(&out, 7, "denied");
    assert!(!marker.exists());
    let out = copy_cli(&[
        "run",
        "--env-prefix",
        "app/prod",
        "--",
        "sh",
        "-c",
        "printf %s \"$PW\"",
    ]);
    assert_eq!(out.stdout, b"two", "{out:?}");
    let out = copy_cli(&["kube-secret", "s", "-n", "ns", "--from", "p=other/pw"]);
    assert_fails(&out, 7, "denied");
    assert!(out.stdout.is_empty());
}
