//! Policy and grants through the real binaries: a copied client is denied
//! what the policy does not give it, `policy explain` agrees, changing policy
//! and creating grants need the PIN, and a Python grpcio script holding a
//! grant gets exactly its scope (a kubeconfig kubectl uses), only while the
//! session is open, the grant is live and not revoked.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::kube::kubectl;
use crate::util::{Env, assert_fails, keyholder_bin};

fn p(path: &Path) -> &str {
    path.to_str().expect("utf8 path")
}

/// A copy of the `keyholder` client at another path: the same program,
/// another executable as far as the kernel (and policy) can tell.
fn copied_client(env: &Env) -> PathBuf {
    let copy = env.path().join("other-client");
    std::fs::copy(keyholder_bin(), &copy).expect("copy client");
    copy
}

/// Runs the copied client with the test's socket.
fn run_copy(env: &Env, copy: &Path, args: &[&str]) -> std::process::Output {
    let mut c = env.command(p(copy));
    c.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    crate::util::output_within(c, Duration::from_secs(60)).expect("client finishes")
}

fn policy_file(env: &Env) -> PathBuf {
    let text = format!(
        r#"# Only the admin's own client may do everything.
default = "deny"

[[rule]]
name = "admin-cli"
exe = ["{}"]
allow = ["*"]
"#,
        admin_exe()
    );
    env.file("policy.toml", &text)
}

/// The admin client's path as the kernel reports it.
fn admin_exe() -> String {
    std::fs::canonicalize(keyholder_bin())
        .expect("client path")
        .to_string_lossy()
        .into_owned()
}

fn wrong_pin(env: &Env) -> PathBuf {
    env.file("wrong-pin", "999999\n")
}

/// `policy set FILE` with a wrong PIN.
fn set_with_wrong_pin(env: &Env, policy: &Path) -> std::process::Output {
    env.cli(&["policy", "set", p(policy), "--pin-file", p(&wrong_pin(env))])
}

#[test]
fn a_copied_client_is_denied_what_policy_does_not_give_it_and_explain_agrees() {
    let (env, _daemon) = Env::ready();
    env.put("db/prod", b"canary-value-1");
    let copy = copied_client(&env);
    // No policy: every process of the uid may read.
    let out = run_copy(&env, &copy, &["secret", "get", "db/prod"]);
    assert_eq!(out.stdout, b"canary-value-1");

    let policy = policy_file(&env);
    // The PIN is asked again: a wrong one is refused and nothing changes.
    let out = set_with_wrong_pin(&env, &policy);
    assert_fails(&out, 7, "wrong PIN");
    assert_eq!(env.ok(&["policy", "get"]), "");
    let set = env.ok(&["policy", "set", p(&policy), "--pin-file", p(&env.pin_file)]);
    assert!(set.contains("policy set: 1 rules"), "{set}");
    assert!(env.ok(&["policy", "get"]).contains("name = \"admin-cli\""));

    // The copy is refused, with the rule that decided and no value.
    let out = run_copy(&env, &copy, &["secret", "get", "db/prod"]);
    assert_fails(&out, 7, "denied by the policy's default");
    assert!(!String::from_utf8_lossy(&out.stdout).contains("canary"));
    assert!(!String::from_utf8_lossy(&out.stderr).contains("canary"));
    // Status and lock are never refused; the admin's client still reads.
    let status = run_copy(&env, &copy, &["status"]);
    assert!(status.status.success());
    assert_eq!(env.ok(&["secret", "get", "db/prod"]), "canary-value-1");

    // explain agrees with what happened, for both executables.
    let out = env.cli(&[
        "policy",
        "explain",
        "--exe",
        p(&copy),
        "--op",
        "secret-read",
        "--object",
        "db/prod",
    ]);
    assert_fails(&out, 7, "");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("denied by rule default"), "{text}");
    let text = env.ok(&[
        "policy",
        "explain",
        "--exe",
        &admin_exe(),
        "--op",
        "secret-read",
        "--object",
        "db/prod",
    ]);
    assert!(text.starts_with("allowed by rule admin-cli"), "{text}");

    // A policy with an error is refused naming its line; the old one stays.
    let bad = env.file(
        "bad.toml",
        "default = \"deny\"\n[[rule]]\nname = \"x\"\nallow = [\"kubeconfig:prod\"]\n",
    );
    let out = env.cli(&["policy", "set", p(&bad), "--pin-file", p(&env.pin_file)]);
    assert_fails(&out, 6, "line 4");
    assert!(env.ok(&["policy", "get"]).contains("admin-cli"));

    // Grants need the PIN too.
    let out = env.cli(&[
        "grant",
        "create",
        "--name",
        "x",
        "--allow",
        "secret:read:db/*",
        "--pin-file",
        p(&wrong_pin(&env)),
    ]);
    assert_fails(&out, 7, "wrong PIN");
    // The third wrong PIN in a row locks the session.
    let out = set_with_wrong_pin(&env, &policy);
    assert_fails(&out, 7, "wrong PIN");
    let out = set_with_wrong_pin(&env, &policy);
    assert_fails(&out, 7, "session was locked");
    let out = env.cli(&["secret", "get", "db/prod"]);
    assert_fails(&out, 3, "locked");
    // Unlocked again, the policy is still there: it lives in the vault.
    env.unlock();
    let out = run_copy(&env, &copy, &["secret", "get", "db/prod"]);
    assert_fails(&out, 7, "denied");
    // Removing the policy needs the PIN and restores the default behaviour.
    let empty = env.file("empty.toml", "");
    let out = env.ok(&["policy", "set", p(&empty), "--pin-file", p(&env.pin_file)]);
    assert!(out.contains("policy removed"), "{out}");
    let out = run_copy(&env, &copy, &["secret", "get", "db/prod"]);
    assert_eq!(out.stdout, b"canary-value-1");
}

/// Runs tests/python/grant_client.py; returns its JSON.
fn script(env: &Env, stubs: &Path, token: &str, args: &[&str]) -> serde_json::Value {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut c = Command::new("python3");
    c.arg(root.join("tests/python/grant_client.py"))
        .arg(env.socket())
        .arg(stubs)
        .arg(token)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let out = crate::util::output_within(c, Duration::from_secs(60)).expect("script finishes");
    assert!(
        out.status.success(),
        "grant_client.py: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("grant_client.py prints JSON")
}

fn create_grant(env: &Env, extra: &[&str]) -> String {
    let mut args = vec![
        "grant",
        "create",
        "--pin-file",
        p(&env.pin_file),
        "--allow",
        "kubeconfig:prod:deployer",
        "--max-ttl",
        "15m",
    ];
    args.extend_from_slice(extra);
    let token = env.ok(&args).trim().to_owned();
    assert!(token.starts_with("khg_"), "{token}");
    token
}

#[test]
fn a_python_script_with_a_grant_gets_exactly_its_scope_while_the_grant_lives() {
    let (env, _daemon) = Env::ready();
    env.put("db/prod", b"canary-value-2");
    let dir = env.path().join("kube");
    let api = crate::kube::prod_cluster(&env, &dir);
    let stubs = crate::python::generate_stubs(&env);
    let token = create_grant(&env, &["--name", "deploy", "--expires", "2h"]);

    // The grant's scope: a kubeconfig that kubectl uses.
    let kubeconfig = dir.join("deployer.kubeconfig");
    let r = script(
        &env,
        &stubs,
        &token,
        &["kubeconfig", "prod", "deployer", "600", p(&kubeconfig)],
    );
    assert_eq!(r["code"], "OK", "{r}");
    let out = kubectl(&kubeconfig, &dir).output().expect("kubectl runs");
    assert!(
        out.status.success(),
        "kubectl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("keyholder-test"));
    assert!(
        api.seen
            .lock()
            .expect("seen")
            .iter()
            .any(|cn| cn == "deployer")
    );

    // Outside the scope: another user, a longer TTL, a secret.
    let other = dir.join("other.kubeconfig");
    let r = script(
        &env,
        &stubs,
        &token,
        &["kubeconfig", "prod", "admin", "600", p(&other)],
    );
    assert_eq!(r["code"], "PERMISSION_DENIED", "{r}");
    assert!(
        r["message"]
            .as_str()
            .unwrap_or("")
            .contains("grant \"deploy\"")
    );
    let r = script(
        &env,
        &stubs,
        &token,
        &["kubeconfig", "prod", "deployer", "3600", p(&other)],
    );
    assert_eq!(r["code"], "PERMISSION_DENIED", "{r}");
    assert!(
        r["message"].as_str().unwrap_or("").contains("max_ttl"),
        "{r}"
    );
    let r = script(&env, &stubs, &token, &["secret", "db/prod"]);
    assert_eq!(r["code"], "PERMISSION_DENIED", "{r}");
    assert!(!r.to_string().contains("canary"));
    // A made-up token is refused, never treated as "no grant".
    let r = script(&env, &stubs, "khg_madeup", &["secret", "db/prod"]);
    assert_eq!(r["code"], "UNAUTHENTICATED", "{r}");

    // list shows it (never the token); revoke ends it.
    let list = env.ok(&["grant", "list"]);
    assert!(list.contains("deploy\tkubeconfig:prod:deployer"), "{list}");
    assert!(!list.contains(&token));
    env.ok(&["grant", "revoke", "deploy"]);
    let r = script(
        &env,
        &stubs,
        &token,
        &["kubeconfig", "prod", "deployer", "600", p(&other)],
    );
    assert_eq!(r["code"], "UNAUTHENTICATED", "{r}");

    // Locking ends every grant.
    let token = create_grant(&env, &["--name", "deploy2", "--expires", "2h"]);
    env.ok(&["lock"]);
    env.unlock();
    let r = script(
        &env,
        &stubs,
        &token,
        &["kubeconfig", "prod", "deployer", "600", p(&other)],
    );
    assert_eq!(r["code"], "UNAUTHENTICATED", "{r}");
    assert!(env.ok(&["grant", "list"]).contains("no grants"));

    // Expiry ends a grant.
    let token = create_grant(&env, &["--name", "short", "--expires", "2s"]);
    let r = script(
        &env,
        &stubs,
        &token,
        &["kubeconfig", "prod", "deployer", "600", p(&other)],
    );
    assert_eq!(r["code"], "OK", "{r}");
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut code = String::new();
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(500));
        let r = script(
            &env,
            &stubs,
            &token,
            &["kubeconfig", "prod", "deployer", "600", p(&other)],
        );
        code = r["code"].as_str().unwrap_or_default().to_owned();
        if code != "OK" {
            break;
        }
    }
    assert_eq!(code, "UNAUTHENTICATED");

    // A grant pinned to an executable does not work from another one.
    let token = create_grant(
        &env,
        &["--name", "pinned", "--exe", "/usr/local/bin/deploy-tool"],
    );
    let r = script(
        &env,
        &stubs,
        &token,
        &["kubeconfig", "prod", "deployer", "600", p(&other)],
    );
    assert_eq!(r["code"], "PERMISSION_DENIED", "{r}");
    assert!(
        r["message"].as_str().unwrap_or("").contains("pinned"),
        "{r}"
    );
    // A grant cannot carry admin rights.
    let out = env.cli(&[
        "grant",
        "create",
        "--name",
        "root",
        "--allow",
        "*",
        "--pin-file",
        p(&env.pin_file),
    ]);
    assert_fails(&out, 6, "cannot carry");
}

/// `ssh-keygen -lf`'s fingerprint of a host's public key.
fn host_fingerprint(sshd_dir: &Path) -> String {
    let out = Command::new("ssh-keygen")
        .arg("-lf")
        .arg(sshd_dir.join("host_key.pub"))
        .output()
        .expect("ssh-keygen runs");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.split_whitespace()
        .nth(1)
        .expect("fingerprint field")
        .to_owned()
}

#[test]
fn the_agent_signs_only_for_the_hosts_policy_names() {
    assert!(
        rustix::process::getuid().is_root(),
        "sshd needs root; CI runs as root"
    );
    let (env, _daemon) = Env::ready();
    env.ok(&["key", "generate", "deploy", "--type", "ed25519", "--ssh"]);
    let authorized = env.ok(&["key", "show", "deploy", "--public"]);
    let allowed_dir = env.path().join("sshd-allowed");
    let other_dir = env.path().join("sshd-other");
    let allowed = crate::ssh::Sshd::start(&allowed_dir, &authorized, "");
    let other = crate::ssh::Sshd::start(&other_dir, &authorized, "");
    let fingerprint = host_fingerprint(&allowed_dir);
    let policy = env.file(
        "agent-policy.toml",
        &format!(
            r#"default = "deny"

[[rule]]
name = "admin-cli"
exe = ["{}"]
allow = ["*"]

[[rule]]
name = "deploy-host"
channel = "agent"
forwarded = false
host_keys = ["{fingerprint}"]
allow = ["agent:deploy"]
"#,
            admin_exe()
        ),
    );
    env.ok(&["policy", "set", p(&policy), "--pin-file", p(&env.pin_file)]);
    let identity = crate::ssh::public_file(&env, "deploy");

    let out = allowed.ssh(&env, &identity, None);
    assert!(
        out.status.success(),
        "ssh to the allowed host: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "keyholder-ok");
    let out = other.ssh(&env, &identity, None);
    assert!(
        !out.status.success(),
        "ssh to a host the policy does not name must fail"
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Permission denied"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A connection bound to no host (ssh-add) is offered no key at all.
    let out = Command::new("ssh-add")
        .arg("-l")
        .env("SSH_AUTH_SOCK", crate::ssh::agent_socket(&env))
        .output()
        .expect("ssh-add runs");
    let listed = String::from_utf8_lossy(&out.stdout);
    assert!(!listed.contains("deploy"), "{listed}");

    // explain agrees for both hosts.
    let explain = |fp: &str| {
        env.cli(&[
            "policy",
            "explain",
            "--channel",
            "agent",
            "--host-key",
            fp,
            "--op",
            "agent",
            "--object",
            "deploy",
        ])
    };
    let out = explain(&fingerprint);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("allowed by rule deploy-host"));
    let out = explain(&host_fingerprint(&other_dir));
    assert_fails(&out, 7, "");
}

#[test]
fn a_csr_cannot_carry_names_or_groups_the_policy_does_not_allow() {
    let (env, _daemon) = Env::ready();
    env.ok(&["ca", "create", "kube"]);
    let copy = copied_client(&env);
    let policy = env.file(
        "csr-policy.toml",
        &format!(
            "default = \"deny\"\n\n[[rule]]\nname = \"admin-cli\"\nexe = [\"{}\"]\nallow = [\"*\"]\n\n\
             [[rule]]\nname = \"nodes\"\nexe = [\"{}\"]\nallow = [\"cert:kube:client\"]\n\
             groups = [\"system:nodes\"]\nsans = [\"system:node:*\"]\n",
            admin_exe(),
            p(&copy)
        ),
    );
    env.ok(&["policy", "set", p(&policy), "--pin-file", p(&env.pin_file)]);
    let csr = |subject: &str| {
        let key = env.path().join("csr.key");
        let csr = env.path().join(format!("{}.csr", subject.len()));
        let out = Command::new("openssl")
            .args([
                "req",
                "-new",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
            ])
            .args([
                "-nodes",
                "-keyout",
                p(&key),
                "-out",
                p(&csr),
                "-subj",
                subject,
            ])
            .output()
            .expect("openssl");
        assert!(out.status.success());
        csr
    };
    let issue = |csr: &Path| {
        run_copy(
            &env,
            &copy,
            &[
                "cert",
                "issue",
                "--ca",
                "kube",
                "--profile",
                "client",
                "--csr",
                p(csr),
                "--out-dir",
                p(&env.path().join("out")),
            ],
        )
    };
    // The CSR's subject is what the certificate would carry: judged as such.
    let out = issue(&csr("/CN=admin/O=system:masters"));
    assert_eq!(out.status.code(), Some(7), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("system:masters"));
    let out = issue(&csr("/CN=system:node:w1/O=system:nodes"));
    assert!(out.status.success(), "{out:?}");
}
