//! `--out` and `--out-dir` create missing parent directories with mode 0700
//! (what is written there may hold a key), as `--out ~/.kube/prod` needs on a
//! machine without `~/.kube`.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use crate::util::Env;

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

fn s(path: &Path) -> &str {
    path.to_str().expect("utf8")
}

#[test]
fn out_creates_missing_parent_directories_with_mode_0700() {
    let (env, _daemon) = Env::ready();
    let home = env.path();
    env.ok(&["ca", "create", "kube-prod"]);
    env.ok(&[
        "cluster",
        "add",
        "prod",
        "--server",
        "https://10.0.0.1:6443",
        "--ca",
        "kube-prod",
    ]);
    // The README's command, with ~ expanded as the shell would.
    let kube = home.join(".kube");
    assert!(!kube.exists());
    let prod = kube.join("prod");
    env.ok(&[
        "kubeconfig",
        "prod",
        "--user",
        "alice",
        "--ttl",
        "15m",
        "--out",
        s(&prod),
    ]);
    assert_eq!(mode(&kube), 0o700);
    assert_eq!(mode(&prod), 0o600);

    env.put("db/password", b"hunter2");
    let value = home.join("secrets/db/password");
    env.ok(&["secret", "get", "db/password", "--out", s(&value)]);
    assert_eq!(std::fs::read(&value).expect("value"), b"hunter2");
    assert_eq!(mode(&home.join("secrets")), 0o700);
    assert_eq!(mode(&home.join("secrets/db")), 0o700);

    let certs = home.join("pki/etcd-1");
    env.ok(&[
        "cert",
        "issue",
        "--ca",
        "kube-prod",
        "--profile",
        "server",
        "--cn",
        "etcd-1",
        "--san",
        "127.0.0.1",
        "--out-dir",
        s(&certs),
    ]);
    assert_eq!(mode(&home.join("pki")), 0o700);
    assert_eq!(mode(&certs), 0o700);
    assert_eq!(mode(&certs.join("key.pem")), 0o600);

    env.ok(&["key", "generate", "deploy", "--type", "ed25519", "--ssh"]);
    env.ok(&["key", "generate", "signer", "--type", "ed25519"]);
    let input = env.file("data", "to sign");
    let sig = home.join("sigs/data.sig");
    env.ok(&[
        "sign",
        "--key",
        "signer",
        "--in",
        s(&input),
        "--out",
        s(&sig),
    ]);
    assert!(!std::fs::read(&sig).expect("signature").is_empty());
    assert_eq!(mode(&home.join("sigs")), 0o700);

    env.ok(&["ca", "create", "ssh-users", "--kind", "ssh"]);
    let cert = home.join("ssh/certs/deploy-cert.pub");
    env.ok(&[
        "ssh-cert",
        "--ca",
        "ssh-users",
        "--key",
        "deploy",
        "--principal",
        "root",
        "--ttl",
        "1h",
        "--out",
        s(&cert),
    ]);
    assert!(
        std::fs::read_to_string(&cert)
            .expect("cert")
            .starts_with("ssh-ed25519-cert")
    );
    assert_eq!(mode(&home.join("ssh")), 0o700);
    assert_eq!(mode(&home.join("ssh/certs")), 0o700);

    // An existing directory keeps its mode.
    let shared = home.join("shared");
    std::fs::create_dir(&shared).expect("mkdir");
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    env.ok(&[
        "secret",
        "get",
        "db/password",
        "--out",
        s(&shared.join("p")),
    ]);
    assert_eq!(mode(&shared), 0o755);
}
