//! Keys, signing and the ssh-agent against real OpenSSH: sshd on loopback,
//! ssh, ssh-add, ssh-keygen; and signatures checked by openssl.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::util::{Env, assert_fails};

fn p(path: &Path) -> &str {
    path.to_str().expect("utf8 path")
}

pub(crate) fn agent_socket(env: &Env) -> PathBuf {
    env.runtime.join("keyholder/ssh-agent.sock")
}

fn run(cmd: &mut Command) -> Output {
    cmd.output().expect("command runs")
}

fn ok(out: Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn ssh_add(env: &Env, args: &[&str]) -> Output {
    run(Command::new("ssh-add")
        .env("SSH_AUTH_SOCK", agent_socket(env))
        .args(args))
}

/// sshd on 127.0.0.1 and a free port, stopped by PID when dropped.
pub(crate) struct Sshd {
    child: Child,
    port: u16,
    dir: PathBuf,
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Sshd {
    pub(crate) fn start(dir: &Path, authorized_keys: &str, user_ca: &str) -> Self {
        Self::start_with(dir, authorized_keys, user_ca, "ed25519", "")
    }

    /// sshd with a host key of `host_key_type` and `extra` config lines.
    fn start_with(
        dir: &Path,
        authorized_keys: &str,
        user_ca: &str,
        host_key_type: &str,
        extra: &str,
    ) -> Self {
        std::fs::create_dir_all(dir).expect("sshd dir");
        // sshd's privilege separation needs this directory.
        std::fs::create_dir_all("/run/sshd").expect("/run/sshd (run the tests as root)");
        let host_key = dir.join("host_key");
        ok(
            run(Command::new("ssh-keygen").args([
                "-q",
                "-t",
                host_key_type,
                "-N",
                "",
                "-f",
                p(&host_key),
            ])),
            "ssh-keygen host key",
        );
        std::fs::write(dir.join("authorized_keys"), authorized_keys).expect("authorized_keys");
        std::fs::write(dir.join("user_ca.pub"), user_ca).expect("ca");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .expect("bind")
            .local_addr()
            .expect("addr")
            .port();
        let config = dir.join("sshd_config");
        std::fs::write(
            &config,
            format!(
                "Port {port}\nListenAddress 127.0.0.1\nHostKey {hk}\nPidFile {d}/sshd.pid\n\
                 AuthorizedKeysFile {d}/authorized_keys\nTrustedUserCAKeys {d}/user_ca.pub\n\
                 StrictModes no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n\
                 PubkeyAuthentication yes\nPermitRootLogin prohibit-password\nUsePAM no\n\
                 AllowUsers root\nLogLevel VERBOSE\n{extra}",
                hk = host_key.display(),
                d = dir.display()
            ),
        )
        .expect("config");
        let child = Command::new("/usr/sbin/sshd")
            .args(["-D", "-e", "-f", p(&config)])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("sshd.log")).expect("log"))
            .spawn()
            .expect("sshd runs (apt-get install openssh-server)");
        let deadline = Instant::now() + Duration::from_secs(15);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "sshd did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        Self {
            child,
            port,
            dir: dir.to_owned(),
        }
    }

    pub(crate) fn ssh(&self, env: &Env, identity: &Path, certificate: Option<&Path>) -> Output {
        let mut c = self.ssh_command(env, identity);
        if let Some(cert) = certificate {
            c.arg("-o")
                .arg(format!("CertificateFile={}", cert.display()));
        }
        c.args(["root@127.0.0.1", "echo", "keyholder-ok"]);
        run(&mut c)
    }

    /// `ssh -A` running `remote` on the server, whose agent requests come
    /// back to Keyholder over the forwarded channel.
    pub(crate) fn ssh_forwarding(&self, env: &Env, identity: &Path, remote: &str) -> Output {
        let mut c = self.ssh_command(env, identity);
        c.args(["-A", "root@127.0.0.1", remote]);
        run(&mut c)
    }

    fn ssh_command(&self, env: &Env, identity: &Path) -> Command {
        let mut c = Command::new("ssh");
        c.env("HOME", &self.dir)
            .args(["-F", "/dev/null", "-p", &self.port.to_string()])
            .arg("-o")
            .arg(format!("IdentityAgent={}", agent_socket(env).display()))
            .args([
                "-o",
                "IdentitiesOnly=yes",
                "-o",
                "BatchMode=yes",
                "-o",
                "StrictHostKeyChecking=no",
            ])
            .args([
                "-o",
                "UserKnownHostsFile=/dev/null",
                "-o",
                "PreferredAuthentications=publickey",
                "-o",
                "ConnectTimeout=10",
            ])
            .arg("-o")
            .arg(format!("IdentityFile={}", identity.display()));
        c
    }
}

pub(crate) fn public_file(env: &Env, key: &str) -> PathBuf {
    let path = env.path().join(format!("{key}.pub"));
    std::fs::write(&path, env.ok(&["key", "show", key, "--public"])).expect("pub");
    path
}

#[test]
fn ssh_logs_in_with_vault_and_token_keys_and_a_short_lived_certificate() {
    assert!(
        rustix::process::getuid().is_root(),
        "sshd needs root; CI runs as root"
    );
    let (env, daemon) = Env::ready();
    env.ok(&["key", "generate", "deploy", "--type", "ed25519", "--ssh"]);
    env.ok(&[
        "key",
        "generate",
        "hsm",
        "--type",
        "ecdsa-p256",
        "--on-token",
        "--ssh",
    ]);
    env.ok(&["key", "generate", "rsa", "--type", "rsa-3072", "--ssh"]);
    env.ok(&[
        "key",
        "generate",
        "certonly",
        "--type",
        "ecdsa-p256",
        "--ssh",
    ]);
    env.ok(&["ca", "create", "ssh-users", "--kind", "ssh"]);
    let ca_pub = env.ok(&["ca", "export", "ssh-users"]);
    assert!(ca_pub.starts_with("ssh-ed25519 "), "{ca_pub}");
    let mut authorized = String::new();
    for k in ["deploy", "hsm", "rsa"] {
        authorized.push_str(&env.ok(&["key", "show", k, "--public"]));
    }
    let sshd = Sshd::start(&env.path().join("sshd"), &authorized, &ca_pub);

    for k in ["deploy", "hsm", "rsa"] {
        let out = sshd.ssh(&env, &public_file(&env, k), None);
        assert_eq!(ok(out, &format!("ssh with {k}")).trim(), "keyholder-ok");
    }
    // The client bound its session to the server's host key through the agent.
    assert!(
        daemon.log_text().contains("agent session bound"),
        "{}",
        daemon
            .log_text()
            .lines()
            .filter(|l| l.contains("session") || l.contains("agent"))
            .collect::<Vec<_>>()
            .join("\n")
    );

    // Not in authorized_keys: refused until a certificate is issued.
    let certonly = public_file(&env, "certonly");
    assert!(!sshd.ssh(&env, &certonly, None).status.success());
    let cert = env.path().join("certonly-cert.pub");
    env.ok(&[
        "ssh-cert",
        "--ca",
        "ssh-users",
        "--key",
        "certonly",
        "--principal",
        "root",
        "--ttl",
        "1h",
        "--out",
        p(&cert),
    ]);
    assert_eq!(
        ok(
            sshd.ssh(&env, &certonly, Some(&cert)),
            "ssh with certificate"
        )
        .trim(),
        "keyholder-ok"
    );
    let listed = ok(ssh_add(&env, &["-L"]), "ssh-add -L");
    assert!(
        listed.contains("ecdsa-sha2-nistp256-cert-v01@openssh.com"),
        "{listed}"
    );

    // A certificate that has expired no longer gets in.
    let short = env.path().join("short-cert.pub");
    env.ok(&["key", "generate", "short", "--type", "ed25519", "--ssh"]);
    let short_pub = public_file(&env, "short");
    env.ok(&[
        "ssh-cert",
        "--ca",
        "ssh-users",
        "--key",
        "short",
        "--principal",
        "root",
        "--ttl",
        "2s",
        "--out",
        p(&short),
    ]);
    std::thread::sleep(Duration::from_millis(3500));
    assert!(
        !sshd.ssh(&env, &short_pub, Some(&short)).status.success(),
        "an expired certificate got in"
    );
    assert!(
        !ok(ssh_add(&env, &["-L"]), "ssh-add -L")
            .contains(&std::fs::read_to_string(&short).expect("cert")[..60])
    );

    // Locked: the agent lists nothing and login fails.
    env.ok(&["lock"]);
    assert!(
        !sshd
            .ssh(&env, &public_file_cached(&env, "deploy"), None)
            .status
            .success()
    );
    let out = ssh_add(&env, &["-l"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("no identities")
            || out.status.code() == Some(1)
    );
}

fn public_file_cached(env: &Env, key: &str) -> PathBuf {
    env.path().join(format!("{key}.pub"))
}

#[test]
fn ssh_add_and_ssh_keygen_work_through_the_agent() {
    let (env, _daemon) = Env::ready();
    env.ok(&["key", "generate", "git", "--type", "ed25519", "--ssh"]);
    env.ok(&["key", "generate", "plain", "--type", "ed25519"]);
    env.ok(&["ca", "create", "users", "--kind", "ssh"]);
    let listed = ok(ssh_add(&env, &["-L"]), "ssh-add -L");
    assert_eq!(
        listed.lines().count(),
        1,
        "only keys marked ssh are offered: {listed}"
    );
    assert!(listed.ends_with(" git\n"), "{listed}");
    let fingerprints = ok(ssh_add(&env, &["-l"]), "ssh-add -l");
    assert!(
        fingerprints.contains("SHA256:") && fingerprints.contains("(ED25519)"),
        "{fingerprints}"
    );

    // git commit signing: ssh-keygen -Y sign with the public key uses the agent.
    let git_pub = public_file(&env, "git");
    let file = env.file("commit.txt", "tree 1234\nauthor me\n\nsigned commit\n");
    ok(
        run(Command::new("ssh-keygen")
            .env("SSH_AUTH_SOCK", agent_socket(&env))
            .args(["-Y", "sign", "-n", "git", "-f", p(&git_pub), p(&file)])),
        "ssh-keygen -Y sign",
    );
    let allowed = env.file(
        "allowed_signers",
        &format!(
            "me@example {}",
            std::fs::read_to_string(&git_pub).expect("pub")
        ),
    );
    let verify = Command::new("ssh-keygen")
        .args([
            "-Y",
            "verify",
            "-f",
            p(&allowed),
            "-I",
            "me@example",
            "-n",
            "git",
            "-s",
        ])
        .arg(format!("{}.sig", file.display()))
        .stdin(std::fs::File::open(&file).expect("file"))
        .output()
        .expect("ssh-keygen");
    assert!(
        String::from_utf8_lossy(&verify.stdout).contains("Good \"git\" signature"),
        "{verify:?}"
    );

    // ssh-keygen -L on an issued certificate shows what was asked for.
    let cert = env.path().join("git-cert.pub");
    env.ok(&[
        "ssh-cert",
        "--ca",
        "users",
        "--key",
        "git",
        "--principal",
        "root",
        "--principal",
        "deploy",
        "--ttl",
        "1h",
        "--key-id",
        "alice@laptop",
        "--option",
        "force-command=/bin/true",
        "--out",
        p(&cert),
    ]);
    let shown = ok(
        run(Command::new("ssh-keygen").args(["-L", "-f", p(&cert)])),
        "ssh-keygen -L",
    );
    for needle in [
        "Type: ssh-ed25519-cert-v01@openssh.com user certificate",
        "Key ID: \"alice@laptop\"",
        "root",
        "deploy",
        "force-command /bin/true",
        "permit-pty",
    ] {
        assert!(shown.contains(needle), "{needle} missing:\n{shown}");
    }
    let valid = shown
        .lines()
        .find(|l| l.contains("Valid:"))
        .expect("validity line");
    assert!(valid.contains("from ") && valid.contains(" to "), "{valid}");
    assert_eq!(
        ok(ssh_add(&env, &["-L"]), "ssh-add -L").lines().count(),
        2,
        "the certificate is served too"
    );

    // A host certificate for a public key that is not in the vault.
    let host_key = env.path().join("host_ed25519");
    ok(
        run(Command::new("ssh-keygen").args(["-q", "-t", "ed25519", "-N", "", "-f", p(&host_key)])),
        "ssh-keygen",
    );
    let host_cert = env.path().join("host-cert.pub");
    let host_pub = format!("{}.pub", host_key.display());
    env.ok(&[
        "ssh-cert",
        "--ca",
        "users",
        "--host",
        "--public-key",
        &host_pub,
        "--principal",
        "node1.example",
        "--ttl",
        "720h",
        "--out",
        p(&host_cert),
    ]);
    let shown = ok(
        run(Command::new("ssh-keygen").args(["-L", "-f", p(&host_cert)])),
        "ssh-keygen -L host",
    );
    assert!(
        shown.contains("host certificate") && shown.contains("node1.example"),
        "{shown}"
    );
    assert!(
        !shown.contains("permit-pty"),
        "host certificates carry no user extensions: {shown}"
    );

    // LOCK / UNLOCK map onto the session; UNLOCK's passphrase is the PIN.
    let askpass = env.file("askpass.sh", "#!/bin/sh\necho 1234\n");
    std::fs::set_permissions(
        &askpass,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("chmod");
    let with_askpass = |args: &[&str]| {
        run(Command::new("ssh-add")
            .env("SSH_AUTH_SOCK", agent_socket(&env))
            .env("SSH_ASKPASS", &askpass)
            .env("SSH_ASKPASS_REQUIRE", "force")
            .env("DISPLAY", ":0")
            .stdin(Stdio::null())
            .args(args))
    };
    ok(with_askpass(&["-x"]), "ssh-add -x");
    assert!(env.ok(&["status"]).contains("state:       locked"));
    ok(with_askpass(&["-X"]), "ssh-add -X");
    assert!(env.ok(&["status"]).contains("state:       unlocked"));

    // Adding keys through the agent is refused.
    let key = env.path().join("id_new");
    ok(
        run(Command::new("ssh-keygen").args(["-q", "-t", "ed25519", "-N", "", "-f", p(&key)])),
        "ssh-keygen",
    );
    assert!(
        !ssh_add(&env, &[p(&key)]).status.success(),
        "ssh-add of a key file must be refused"
    );
    assert!(
        !ssh_add(&env, &["-s", "/usr/lib/softhsm/libsofthsm2.so"])
            .status
            .success()
    );
}

#[test]
fn signatures_verify_with_openssl() {
    let (env, _daemon) = Env::ready();
    let data = env.file("data.bin", "sign me, please\n");
    let dgst = |alg: &str| -> Vec<u8> {
        let out = run(Command::new("openssl").args(["dgst", alg, "-binary", p(&data)]));
        assert!(out.status.success());
        out.stdout
    };
    let cases: [(&str, &str, &[&str], &[&str]); 6] = [
        ("ed", "ed25519", &[], &["pkeyutl", "-verify", "-rawin"]),
        ("ec", "ecdsa-p256", &[], &["dgst", "-sha256", "-verify"]),
        (
            "ectok",
            "ecdsa-p256",
            &["--on-token"],
            &["dgst", "-sha256", "-verify"],
        ),
        ("rsa", "rsa-3072", &[], &["dgst", "-sha256", "-verify"]),
        (
            "rsa512",
            "rsa-3072",
            &["--sign"],
            &["dgst", "-sha512", "-verify"],
        ),
        (
            "pss",
            "rsa-3072",
            &["--sign"],
            &[
                "dgst",
                "-sha256",
                "-sigopt",
                "rsa_padding_mode:pss",
                "-sigopt",
                "rsa_pss_saltlen:32",
                "-verify",
            ],
        ),
    ];
    for (name, kind, extra, verify) in cases {
        let mut args = vec!["key", "generate", name, "--type", kind];
        args.extend_from_slice(extra);
        env.ok(&args);
        let pem = env.path().join(format!("{name}.pem"));
        std::fs::write(
            &pem,
            env.ok(&["key", "show", name, "--public", "--format", "pem"]),
        )
        .expect("pem");
        let alg = match name {
            "rsa512" => Some("rsa-pkcs1-sha512"),
            "pss" => Some("rsa-pss-sha256"),
            _ => None,
        };
        let sig = env.path().join(format!("{name}.sig"));
        let mut sign = vec!["sign", "--key", name, "--in", p(&data), "--out", p(&sig)];
        if let Some(a) = alg {
            sign.extend_from_slice(&["--alg", a]);
        }
        env.ok(&sign);
        let mut cmd = Command::new("openssl");
        cmd.args(verify);
        if verify[0] == "pkeyutl" {
            cmd.args([
                "-pubin",
                "-inkey",
                p(&pem),
                "-sigfile",
                p(&sig),
                "-in",
                p(&data),
            ]);
        } else {
            cmd.args([p(&pem), "-signature", p(&sig), p(&data)]);
        }
        let out = run(&mut cmd);
        assert!(
            out.status.success(),
            "{name}: openssl refused: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    // Pre-computed digests.
    for (name, alg, hash, verify_hash) in [
        ("ec", "ecdsa-sha256", "-sha256", "-sha256"),
        ("ectok", "ecdsa-sha256", "-sha256", "-sha256"),
        ("rsa", "rsa-pkcs1-sha512", "-sha512", "-sha512"),
    ] {
        let digest = env.path().join(format!("{name}.dgst"));
        std::fs::write(&digest, dgst(hash)).expect("digest");
        let sig = env.path().join(format!("{name}.pre.sig"));
        env.ok(&[
            "sign",
            "--key",
            name,
            "--prehashed",
            "--alg",
            alg,
            "--in",
            p(&digest),
            "--out",
            p(&sig),
        ]);
        let pem = env.path().join(format!("{name}.pem"));
        let out = run(Command::new("openssl").args([
            "dgst",
            verify_hash,
            "-verify",
            p(&pem),
            "-signature",
            p(&sig),
            p(&data),
        ]));
        assert!(
            out.status.success(),
            "{name} prehashed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    // Refusals: wrong algorithm for the key, wrong digest size, a key not for signing, unknown key.
    assert_fails(
        &env.cli(&[
            "sign",
            "--key",
            "ed",
            "--alg",
            "rsa-pss-sha256",
            "--in",
            p(&data),
        ]),
        6,
        "algorithm:",
    );
    assert_fails(
        &env.cli(&["sign", "--key", "ec", "--prehashed", "--in", p(&data)]),
        6,
        "32 bytes",
    );
    assert_fails(
        &env.cli(&["sign", "--key", "ed", "--prehashed", "--in", p(&data)]),
        6,
        "prehashed",
    );
    env.ok(&["key", "generate", "sshonly", "--type", "ed25519", "--ssh"]);
    assert_fails(
        &env.cli(&["sign", "--key", "sshonly", "--in", p(&data)]),
        7,
        "not for general signing",
    );
    assert_fails(
        &env.cli(&["sign", "--key", "nosuch", "--in", p(&data)]),
        4,
        "key \"nosuch\" does not exist",
    );
    assert_fails(
        &env.cli(&["key", "generate", "bad", "--type", "dsa"]),
        6,
        "type:",
    );
    assert_fails(
        &env.cli(&["key", "generate", "ed", "--type", "ed25519"]),
        5,
        "already exists",
    );
    assert_fails(
        &env.cli(&["key", "generate", "tok", "--type", "ed25519", "--on-token"]),
        6,
        "ecdsa-p256",
    );
}

#[test]
fn keys_import_from_openssh_and_pkcs8_files_with_passphrases() {
    let (env, _daemon) = Env::ready();
    let dir = env.path();
    for (name, kind, pass) in [
        ("imp-ed", "ed25519", ""),
        ("imp-ec", "ecdsa", "s3cret pass"),
        ("imp-rsa", "rsa", ""),
    ] {
        let file = dir.join(name);
        let mut cmd = Command::new("ssh-keygen");
        cmd.args(["-q", "-t", kind, "-N", pass, "-f", p(&file), "-C", name]);
        if kind == "rsa" {
            cmd.args(["-b", "3072"]);
        }
        ok(run(&mut cmd), "ssh-keygen");
        let mut args = vec!["key", "import", name, "--file", p(&file), "--ssh"];
        let passfile = env.file(&format!("{name}.pass"), &format!("{pass}\n"));
        if !pass.is_empty() {
            args.extend_from_slice(&["--passphrase-file", p(&passfile)]);
        }
        env.ok(&args);
        let original = std::fs::read_to_string(format!("{}.pub", file.display())).expect("pub");
        let ours = env.ok(&["key", "show", name, "--public"]);
        let blob = |s: &str| s.split_whitespace().nth(1).unwrap_or_default().to_owned();
        assert_eq!(blob(&ours), blob(&original), "{name}: same public key");
    }
    // Wrong passphrase, and no passphrase, for an encrypted key.
    let enc = dir.join("imp-ec");
    let wrong = env.file("wrong.pass", "nope\n");
    assert_fails(
        &env.cli(&[
            "key",
            "import",
            "x",
            "--file",
            p(&enc),
            "--passphrase-file",
            p(&wrong),
        ]),
        6,
        "passphrase",
    );
    // PKCS#8, encrypted, from openssl.
    let pk8 = dir.join("p8.pem");
    ok(
        run(Command::new("openssl").args([
            "genpkey",
            "-algorithm",
            "ed25519",
            "-aes-256-cbc",
            "-pass",
            "pass:hunter2",
            "-out",
            p(&pk8),
        ])),
        "openssl genpkey",
    );
    let pass = env.file("p8.pass", "hunter2\n");
    env.ok(&[
        "key",
        "import",
        "p8",
        "--file",
        p(&pk8),
        "--passphrase-file",
        p(&pass),
        "--sign",
    ]);
    let junk = env.file("junk.key", "not a key\n");
    assert_fails(
        &env.cli(&["key", "import", "junk", "--file", p(&junk)]),
        6,
        "key:",
    );
    // The imported keys sign through the agent.
    assert_eq!(ok(ssh_add(&env, &["-L"]), "ssh-add -L").lines().count(), 3);
}

pub(crate) fn frame(body: &[u8]) -> Vec<u8> {
    let mut v = (body.len() as u32).to_be_bytes().to_vec();
    v.extend_from_slice(body);
    v
}

pub(crate) fn reply(s: &mut UnixStream) -> Option<Vec<u8>> {
    let mut len = [0u8; 4];
    s.read_exact(&mut len).ok()?;
    let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
    s.read_exact(&mut body).ok()?;
    Some(body)
}

/// A connection to the agent socket whose reads give up after `timeout`.
fn agent_stream(sock: &std::path::Path, timeout: Duration) -> UnixStream {
    let s = UnixStream::connect(sock).expect("agent socket");
    s.set_read_timeout(Some(timeout)).expect("timeout");
    s
}

#[test]
fn malformed_agent_traffic_gets_failure_or_a_closed_connection_and_others_are_served() {
    let (env, daemon) = Env::ready();
    env.ok(&["key", "generate", "k", "--type", "ed25519", "--ssh"]);
    let sock = agent_socket(&env);
    let connect = || agent_stream(&sock, Duration::from_secs(10));
    // A well-behaved client kept open throughout.
    let mut good = connect();
    good.write_all(&frame(&[11])).expect("write");
    assert_eq!(reply(&mut good).expect("identities")[0], 12);

    let mut s = connect();
    for bad in [
        vec![99u8],                                         // unknown type
        vec![11, 0],                                        // trailing byte
        vec![13, 0, 0, 0, 9, 1],                            // truncated sign request
        vec![13, 0xff, 0xff, 0xff, 0xff],                   // huge inner length
        vec![20, 0, 0, 0, 3, b'a', b'b', b'c', 0, 0, 0, 0], // smartcard add
        vec![17, 0, 0, 0, 1, b'x'],                         // add identity
        vec![27, 0, 0, 0, 4, b'n', b'o', b'p', b'e'],       // unknown extension
        vec![],                                             // empty message
    ] {
        s.write_all(&frame(&bad)).expect("write");
        assert_eq!(reply(&mut s), Some(vec![5]), "{bad:?} gets FAILURE");
    }
    // The same connection still works.
    s.write_all(&frame(&[11])).expect("write");
    assert_eq!(reply(&mut s).expect("identities")[0], 12);

    // A 4 GiB length prefix closes the connection without allocating it.
    let mut big = connect();
    big.write_all(&u32::MAX.to_be_bytes()).expect("write");
    assert_eq!(reply(&mut big), None, "connection closed");
    // 256 KiB + 1 too.
    let mut over = connect();
    over.write_all(&(256 * 1024 + 1u32).to_be_bytes())
        .expect("write");
    assert_eq!(reply(&mut over), None);

    // A slow client that started a message does not block anyone.
    let mut slow = connect();
    slow.write_all(&[0, 0, 0, 100, 13]).expect("write");
    good.write_all(&frame(&[11])).expect("write");
    assert_eq!(
        reply(&mut good).expect("served while another client stalls")[0],
        12
    );

    // Memory stays flat under a stream of bad messages.
    let before = daemon.rss_kib();
    for _ in 0..2000 {
        let mut c = connect();
        let _ = c.write_all(&u32::MAX.to_be_bytes());
        let _ = c.write_all(&frame(&[13, 0, 0, 0, 200]));
    }
    for _ in 0..5000 {
        s.write_all(&frame(&[13, 0, 0, 0, 1, 1])).expect("write");
        assert_eq!(reply(&mut s), Some(vec![5]));
    }
    std::thread::sleep(Duration::from_millis(300));
    let after = daemon.rss_kib();
    assert!(
        after < before + 8 * 1024,
        "RSS grew from {before} KiB to {after} KiB"
    );
    good.write_all(&frame(&[11])).expect("write");
    assert_eq!(reply(&mut good).expect("still serving")[0], 12);
    drop(slow);
}

#[test]
fn a_key_already_on_the_token_is_found_by_uri_and_signs() {
    let (env, _daemon) = Env::ready();
    // Another tool put a P-256 key on the token.
    let out = run(Command::new("pkcs11-tool")
        .env("SOFTHSM2_CONF", &env.softhsm_conf)
        .args([
            "--module",
            crate::util::MODULE,
            "--token-label",
            "ops",
            "--login",
            "--pin",
            crate::util::PIN,
        ])
        .args([
            "--keypairgen",
            "--key-type",
            "EC:prime256v1",
            "--label",
            "ext-key",
            "--id",
            "4b48",
            "--usage-sign",
        ]));
    ok(out, "pkcs11-tool --keypairgen (apt-get install opensc)");
    env.ok(&[
        "key",
        "import",
        "ext",
        "--pkcs11-uri",
        "pkcs11:token=ops;object=ext-key;id=%4b%48",
        "--ssh",
        "--sign",
    ]);
    let shown: serde_json::Value =
        serde_json::from_str(&env.ok(&["--json", "key", "list"])).expect("json");
    assert_eq!(shown[0]["on_token"], true);
    let data = env.file("data.bin", "signed on the token\n");
    let sig = env.path().join("ext.sig");
    env.ok(&["sign", "--key", "ext", "--in", p(&data), "--out", p(&sig)]);
    let pem = env.path().join("ext.pem");
    std::fs::write(
        &pem,
        env.ok(&["key", "show", "ext", "--public", "--format", "pem"]),
    )
    .expect("pem");
    ok(
        run(Command::new("openssl").args([
            "dgst",
            "-sha256",
            "-verify",
            p(&pem),
            "-signature",
            p(&sig),
            p(&data),
        ])),
        "openssl verify",
    );
    assert!(ok(ssh_add(&env, &["-L"]), "ssh-add -L").starts_with("ecdsa-sha2-nistp256 "));

    assert_fails(
        &env.cli(&["key", "import", "x", "--pkcs11-uri", "pkcs11:object=nosuch"]),
        3,
        "no EC private key matches",
    );
    assert_fails(
        &env.cli(&[
            "key",
            "import",
            "x",
            "--pkcs11-uri",
            "pkcs11:token=other;object=ext-key",
        ]),
        6,
        "pkcs11_uri",
    );
    assert_fails(
        &env.cli(&["key", "import", "x", "--pkcs11-uri", "pkcs11:token=ops"]),
        6,
        "names no key",
    );
    assert_fails(
        &env.cli(&[
            "key",
            "import",
            "x",
            "--pkcs11-uri",
            "pkcs11:object=ext-key?module-path=/tmp/x.so",
        ]),
        6,
        "module-path",
    );
}

pub(crate) fn put_string(m: &mut Vec<u8>, s: &[u8]) {
    m.extend_from_slice(&u32::try_from(s.len()).expect("short").to_be_bytes());
    m.extend_from_slice(s);
}

/// A `session-bind@openssh.com` request, as `ssh` sends it: the host key,
/// the session id, the host's signature over it, and the forwarding flag.
pub(crate) fn session_bind(
    host: &ssh_key::PrivateKey,
    session_id: &[u8],
    forwarding: bool,
) -> Vec<u8> {
    use ssh_encoding::Encode;
    let signature: ssh_key::Signature =
        signature::Signer::try_sign(host, session_id).expect("host signs");
    let mut key_blob = Vec::new();
    host.public_key()
        .key_data()
        .encode(&mut key_blob)
        .expect("key blob");
    let mut signature_blob = Vec::new();
    signature
        .encode(&mut signature_blob)
        .expect("signature blob");
    let mut m = vec![27u8];
    put_string(&mut m, b"session-bind@openssh.com");
    put_string(&mut m, &key_blob);
    put_string(&mut m, session_id);
    put_string(&mut m, &signature_blob);
    m.push(u8::from(forwarding));
    m
}

fn passphrase_request(kind: u8, passphrase: &str) -> Vec<u8> {
    let mut m = vec![kind];
    put_string(&mut m, passphrase.as_bytes());
    m
}

const LOCK: u8 = 22;
const UNLOCK: u8 = 23;
const SUCCESS: u8 = 6;
const FAILURE: u8 = 5;

fn ask(s: &mut UnixStream, body: &[u8]) -> u8 {
    s.write_all(&frame(body)).expect("write");
    reply(s).expect("the agent answers")[0]
}

fn is_unlocked(env: &Env) -> bool {
    env.ok(&["status"]).contains("state:       unlocked")
}

#[test]
fn a_connection_bound_as_forwarded_may_sign_but_never_lock_or_unlock() {
    let (env, daemon) = Env::ready();
    env.ok(&["key", "generate", "k", "--type", "ed25519", "--ssh"]);
    let host_file = env.path().join("host_key");
    ok(
        run(Command::new("ssh-keygen").args([
            "-q",
            "-t",
            "ed25519",
            "-N",
            "",
            "-f",
            p(&host_file),
        ])),
        "ssh-keygen host key",
    );
    let host = ssh_key::PrivateKey::read_openssh_file(&host_file).expect("host key");
    let sock = agent_socket(&env);
    let connect = || agent_stream(&sock, Duration::from_secs(20));

    // Bound as forwarded: listing and signing work, LOCK and UNLOCK do not,
    // not even with the right PIN.
    let mut forwarded = connect();
    assert_eq!(
        ask(&mut forwarded, &session_bind(&host, &[7u8; 32], true)),
        SUCCESS
    );
    forwarded.write_all(&frame(&[11])).expect("write");
    let identities = reply(&mut forwarded).expect("identities");
    assert_eq!(identities[0], 12);
    let mut r = &identities[1..];
    let mut count = [0u8; 4];
    r.read_exact(&mut count).expect("count");
    assert_eq!(u32::from_be_bytes(count), 1);
    let mut len = [0u8; 4];
    r.read_exact(&mut len).expect("blob length");
    let blob = &r[..u32::from_be_bytes(len) as usize];
    let mut sign = vec![13u8];
    put_string(&mut sign, blob);
    put_string(&mut sign, b"data to sign");
    sign.extend_from_slice(&0u32.to_be_bytes());
    forwarded.write_all(&frame(&sign)).expect("write");
    assert_eq!(reply(&mut forwarded).expect("signature")[0], 14);

    assert_eq!(ask(&mut forwarded, &passphrase_request(LOCK, "x")), FAILURE);
    assert!(is_unlocked(&env), "a forwarded LOCK locked the session");
    env.ok(&["lock"]);
    assert_eq!(
        ask(
            &mut forwarded,
            &passphrase_request(UNLOCK, crate::util::PIN)
        ),
        FAILURE
    );
    assert!(!is_unlocked(&env), "a forwarded UNLOCK reached the token");
    let log = daemon.log_text();
    assert!(
        log.matches("agent request refused on a forwarded connection")
            .count()
            >= 2,
        "{log}"
    );

    // A forwarding ssh that binds while Keyholder is locked gets FAILURE
    // (every request but UNLOCK is refused while locked), yet its connection
    // is marked all the same: it cannot unlock either.
    let mut late = connect();
    assert_eq!(
        ask(&mut late, &session_bind(&host, &[8u8; 32], true)),
        FAILURE
    );
    assert_eq!(
        ask(&mut late, &passphrase_request(UNLOCK, crate::util::PIN)),
        FAILURE
    );
    assert!(!is_unlocked(&env));
    // So is a forwarded binding whose signature does not verify.
    let mut forged = session_bind(&host, &[9u8; 32], true);
    let last = forged.len() - 2;
    forged[last] ^= 1;
    let mut bad = connect();
    assert_eq!(ask(&mut bad, &forged), FAILURE);
    assert_eq!(
        ask(&mut bad, &passphrase_request(UNLOCK, crate::util::PIN)),
        FAILURE
    );
    assert!(!is_unlocked(&env));

    // A local connection (ssh-add's) follows the protocol's lock rules.
    let mut local = connect();
    // session-bind while locked is refused and leaves nothing behind...
    let local_bind = session_bind(&host, &[10u8; 32], false);
    assert_eq!(ask(&mut local, &local_bind), FAILURE);
    // ...LOCK while locked fails, UNLOCK with the PIN works...
    assert_eq!(ask(&mut local, &passphrase_request(LOCK, "x")), FAILURE);
    assert_eq!(
        ask(&mut local, &passphrase_request(UNLOCK, crate::util::PIN)),
        SUCCESS
    );
    assert!(is_unlocked(&env));
    // ...UNLOCK while unlocked fails whatever the passphrase, without a try
    // at the token...
    assert_eq!(
        ask(&mut local, &passphrase_request(UNLOCK, "wrong")),
        FAILURE
    );
    assert_eq!(
        ask(&mut local, &passphrase_request(UNLOCK, crate::util::PIN)),
        FAILURE
    );
    assert!(is_unlocked(&env));
    // ...the same binding now succeeds, and LOCK locks once.
    assert_eq!(ask(&mut local, &local_bind), SUCCESS);
    assert_eq!(ask(&mut local, &passphrase_request(LOCK, "x")), SUCCESS);
    assert_eq!(ask(&mut local, &passphrase_request(LOCK, "x")), FAILURE);
    assert!(!is_unlocked(&env));
    let log = daemon.log_text();
    assert!(!log.contains("did not accept the PIN"), "{log}");

    // Stock ssh-add sees the same: -x while locked and -X while unlocked fail.
    let askpass = env.file("askpass.sh", "#!/bin/sh\necho 1234\n");
    std::fs::set_permissions(
        &askpass,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("chmod");
    let with_askpass = |args: &[&str]| {
        run(Command::new("ssh-add")
            .env("SSH_AUTH_SOCK", &sock)
            .env("SSH_ASKPASS", &askpass)
            .env("SSH_ASKPASS_REQUIRE", "force")
            .env("DISPLAY", ":0")
            .stdin(Stdio::null())
            .args(args))
    };
    assert!(!with_askpass(&["-x"]).status.success(), "LOCK while locked");
    ok(with_askpass(&["-X"]), "ssh-add -X");
    assert!(is_unlocked(&env));
    let again = with_askpass(&["-X"]);
    assert!(!again.status.success(), "UNLOCK while unlocked");
    assert!(is_unlocked(&env));
}

#[test]
fn ssh_with_agent_forwarding_cannot_lock_or_unlock_from_the_remote_host() {
    assert!(
        rustix::process::getuid().is_root(),
        "sshd needs root; CI runs as root"
    );
    let (env, daemon) = Env::ready();
    env.ok(&["key", "generate", "deploy", "--type", "ed25519", "--ssh"]);
    // Logging in uses a key file, so that it works while Keyholder is locked.
    let login = env.path().join("id_login");
    ok(
        run(Command::new("ssh-keygen").args(["-q", "-t", "ed25519", "-N", "", "-f", p(&login)])),
        "ssh-keygen",
    );
    let authorized = std::fs::read_to_string(format!("{}.pub", login.display())).expect("pub");
    let sshd = Sshd::start(&env.path().join("sshd"), &authorized, "");
    let askpass = env.file("askpass.sh", "#!/bin/sh\necho 1234\n");
    std::fs::set_permissions(
        &askpass,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("chmod");
    let deploy_pub = public_file(&env, "deploy");
    let data = env.file("data.txt", "signed on the remote host\n");
    let askpass_env = format!(
        "SSH_ASKPASS={} SSH_ASKPASS_REQUIRE=force DISPLAY=:0",
        askpass.display()
    );

    // On the remote host, with the forwarded agent: listing and signing
    // work, locking does not.
    let remote = format!(
        "ssh-add -l >/dev/null; echo list=$?; \
         ssh-keygen -Y sign -n file -f {pubkey} {data} >/dev/null 2>&1; echo sign=$?; \
         {askpass_env} ssh-add -x </dev/null; echo lock=$?",
        pubkey = deploy_pub.display(),
        data = data.display(),
    );
    let said = ok(
        sshd.ssh_forwarding(&env, &login, &remote),
        "ssh -A (unlocked)",
    );
    assert!(said.contains("list=0"), "{said}");
    assert!(said.contains("sign=0"), "{said}");
    assert!(said.contains("lock=1"), "{said}");
    assert!(is_unlocked(&env), "the remote host locked the session");
    assert!(
        std::path::Path::new(&format!("{}.sig", data.display())).exists(),
        "signed through the forwarded agent"
    );

    // Locked by its owner, the session cannot be unlocked from there, not
    // even with the right PIN.
    env.ok(&["lock"]);
    let remote = format!("{askpass_env} ssh-add -X </dev/null; echo unlock=$?");
    let said = ok(
        sshd.ssh_forwarding(&env, &login, &remote),
        "ssh -A (locked)",
    );
    assert!(said.contains("unlock=1"), "{said}");
    assert!(!is_unlocked(&env), "the remote host unlocked the session");
    let log = daemon.log_text();
    assert!(
        log.contains("agent request refused on a forwarded connection"),
        "{log}"
    );
    // From the local host the owner still can.
    ok(
        run(Command::new("ssh-add")
            .env("SSH_AUTH_SOCK", agent_socket(&env))
            .env("SSH_ASKPASS", &askpass)
            .env("SSH_ASKPASS_REQUIRE", "force")
            .env("DISPLAY", ":0")
            .stdin(Stdio::null())
            .args(["-X"])),
        "ssh-add -X",
    );
    assert!(is_unlocked(&env));
}

#[test]
fn a_host_signing_with_sha1_rsa_is_not_bound_yet_its_forwarded_agent_is_marked() {
    assert!(
        rustix::process::getuid().is_root(),
        "sshd needs root; CI runs as root"
    );
    let (env, daemon) = Env::ready();
    env.ok(&["key", "generate", "deploy", "--type", "ed25519", "--ssh"]);
    let authorized = env.ok(&["key", "show", "deploy", "--public"]);
    // A server that signs its key exchange with SHA-1 `ssh-rsa`, as OpenSSH
    // before 7.2 did.
    let sshd = Sshd::start_with(
        &env.path().join("sshd"),
        &authorized,
        "",
        "rsa",
        "HostKeyAlgorithms ssh-rsa\n",
    );
    let askpass = env.file("askpass.sh", "#!/bin/sh\necho 1234\n");
    std::fs::set_permissions(
        &askpass,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("chmod");
    let mut c = sshd.ssh_command(&env, &public_file(&env, "deploy"));
    c.args(["-o", "HostKeyAlgorithms=ssh-rsa", "-A", "root@127.0.0.1"])
        .arg(format!(
            "SSH_ASKPASS={} SSH_ASKPASS_REQUIRE=force DISPLAY=:0 ssh-add -x </dev/null; echo lock=$?",
            askpass.display()
        ));
    // Logging in through the agent works without the binding...
    let said = ok(run(&mut c), "ssh -A to an ssh-rsa host");
    // ...and the forwarded connection is marked all the same.
    assert!(said.contains("lock=1"), "{said}");
    assert!(is_unlocked(&env));
    let log = daemon.log_text();
    assert!(log.contains("session-bind refused"), "{log}");
    assert!(!log.contains("agent session bound"), "{log}");
    assert!(
        log.contains("agent request refused on a forwarded connection"),
        "{log}"
    );
}
