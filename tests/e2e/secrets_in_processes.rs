//! `keyholder run` and `keyholder inject`: secrets reach a process through
//! its environment or a 0600 file, never its command line; signals and exit
//! statuses pass through; nothing starts or is written when a secret is
//! missing, the vault is locked or the template is malformed.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::util::{DocBlocks, Env, assert_fails, keyholder_bin};

const DOCS: DocBlocks = DocBlocks {
    path: "docs/secrets-in-processes.md",
    text: include_str!("../../docs/secrets-in-processes.md"),
    mark: "<!-- run by tests/e2e/secrets_in_processes.rs: ",
};

/// The child: writes its variables and PID to `dir/seen`, then waits for
/// signals, noting each in `dir/signals`; SIGUSR2 makes it exit 7, SIGTERM
/// has its default action.
const CHILD: &str = r#"
import os, signal, sys, time
d = sys.argv[1]
def note(n, _):
    with open(os.path.join(d, "signals"), "a") as f:
        f.write(signal.Signals(n).name + "\n")
    if n == signal.SIGUSR2:
        sys.exit(7)
for s in (signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2):
    signal.signal(s, note)
with open(os.path.join(d, "seen.tmp"), "w") as f:
    f.write("%d\n%s\n%s\n%s\n" % (os.getpid(), os.environ.get("DB_PASSWORD"),
        os.environ.get("API_KEY"), os.environ.get("DB_USER")))
os.rename(os.path.join(d, "seen.tmp"), os.path.join(d, "seen"))
deadline = time.time() + 60
while time.time() < deadline:
    time.sleep(0.05)
sys.exit(99)
"#;

fn wait_for(path: &Path, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !path.exists() {
        assert!(Instant::now() < deadline, "{what} did not appear");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn signal(pid: u32, sig: rustix::process::Signal) {
    let pid = rustix::process::Pid::from_raw(i32::try_from(pid).expect("pid")).expect("pid");
    rustix::process::kill_process(pid, sig).expect("kill");
}

fn wait_exit(child: &mut Child) -> std::process::ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the command did not exit");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn lines_in(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

fn ready_with_secrets() -> (Env, crate::util::Daemon) {
    let (env, daemon) = Env::ready();
    env.put("db/prod/password", b"s3cret-db-pw");
    env.put("app/prod/api-key", b"s3cret-api-key");
    env.put("app/prod/db/user", b"app_user");
    (env, daemon)
}

/// Starts `keyholder run` with the child script, waiting until the child
/// has written what it saw.
fn start_run(env: &Env, work: &Path) -> Child {
    let script = env.file("child.py", CHILD);
    let child = env
        .command(keyholder_bin())
        .args([
            "run",
            "--env",
            "DB_PASSWORD=db/prod/password",
            "--env-prefix",
            "app/prod/",
            "--",
            "python3",
        ])
        .arg(&script)
        .arg(work)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("keyholder run starts");
    wait_for(&work.join("seen"), "the child's report");
    child
}

#[test]
fn run_puts_secrets_in_the_environment_only_and_passes_signals_and_exit_status() {
    let (env, _daemon) = ready_with_secrets();
    let work = env.path().join("w1");
    std::fs::create_dir(&work).expect("dir");
    let mut child = start_run(&env, &work);
    let seen = lines_in(&work.join("seen"));
    // keyholder became the command: same PID, so every signal reaches it.
    assert_eq!(seen[0], child.id().to_string(), "{seen:?}");
    assert_eq!(
        &seen[1..],
        ["s3cret-db-pw", "s3cret-api-key", "app_user"],
        "prefix names map to DB_USER and API_KEY"
    );
    // Neither the command line nor ps shows a value.
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", child.id())).expect("cmdline");
    let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
    assert!(cmdline.contains("child.py"), "{cmdline}");
    let ps = Command::new("ps")
        .args(["-eww", "-o", "pid,args"])
        .output()
        .expect("ps");
    let ps = String::from_utf8_lossy(&ps.stdout);
    assert!(ps.contains("child.py"), "ps lists the command: {ps}");
    for value in ["s3cret-db-pw", "s3cret-api-key", "app_user"] {
        assert!(!cmdline.contains(value), "{value} in {cmdline}");
        assert!(!ps.contains(value), "{value} in ps");
    }
    // What run cannot hide: the same uid reads the environment.
    let environ = std::fs::read(format!("/proc/{}/environ", child.id())).expect("environ");
    assert!(String::from_utf8_lossy(&environ).contains("DB_PASSWORD=s3cret-db-pw"));

    use rustix::process::Signal;
    for (sig, name) in [
        (Signal::INT, "SIGINT"),
        (Signal::HUP, "SIGHUP"),
        (Signal::QUIT, "SIGQUIT"),
        (Signal::USR1, "SIGUSR1"),
    ] {
        let before = lines_in(&work.join("signals")).len();
        signal(child.id(), sig);
        let deadline = Instant::now() + Duration::from_secs(10);
        while lines_in(&work.join("signals")).len() == before {
            assert!(Instant::now() < deadline, "{name} was not delivered");
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(lines_in(&work.join("signals")).last().unwrap(), name);
    }
    // SIGTERM kills it: the caller sees the signal (a shell: 128+15).
    signal(child.id(), Signal::TERM);
    let status = wait_exit(&mut child);
    assert_eq!(status.signal(), Some(15), "{status:?}");

    // The command's own exit status comes through (SIGUSR2 makes it exit 7).
    let work2 = env.path().join("w2");
    std::fs::create_dir(&work2).expect("dir");
    let mut child = start_run(&env, &work2);
    signal(child.id(), Signal::USR2);
    assert_eq!(wait_exit(&mut child).code(), Some(7));

    // Through a shell, as a script would see it.
    let out = env
        .command("sh")
        .args([
            "-c",
            &format!(
                "{k} run --env X=db/prod/password -- sh -c 'exit 42'; echo \"status $?\"; \
                 {k} run --env X=db/prod/password -- sh -c 'kill -TERM $$'; echo \"status $?\"",
                k = keyholder_bin()
            ),
        ])
        .output()
        .expect("sh");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "status 42\nstatus 143\n"
    );
}

#[test]
fn run_starts_nothing_when_a_secret_is_missing_or_the_vault_is_locked() {
    let (env, _daemon) = ready_with_secrets();
    let marker = env.path().join("started");
    let touch = ["--", "touch", marker.to_str().expect("utf8")];
    let run = |pre: &[&str]| {
        let mut args = vec!["run"];
        args.extend_from_slice(pre);
        args.extend_from_slice(&touch);
        env.cli(&args)
    };
    let out = run(&["--env", "A=db/prod/password", "--env", "B=db/prod/nope"]);
    assert_fails(&out, 4, "db/prod/nope");
    assert!(
        !marker.exists(),
        "the command ran although a secret is missing"
    );
    let out = run(&["--env", "1A=db/prod/password"]);
    assert_fails(&out, 2, "not a variable name");
    assert!(!marker.exists());
    // A prefix that matches nothing is a missing secret too.
    let out = run(&["--env-prefix", "app/prdo"]);
    assert_fails(&out, 4, "no secret under it");
    assert!(!marker.exists());
    // A secret under a prefix cannot choose what runs (PATH, LD_PRELOAD).
    env.put("app/hostile/path", b"/tmp/elsewhere");
    env.put("app/hostile/ld-preload", b"/tmp/evil.so");
    let out = run(&["--env-prefix", "app/hostile"]);
    assert_fails(&out, 2, "changes what the command runs");
    assert!(!marker.exists());
    // Two secrets for one variable: refused, unless --env settles it.
    env.put("app/prod/db-user", b"other_user");
    let out = run(&["--env-prefix", "app/prod"]);
    assert_fails(&out, 2, "would both set DB_USER");
    assert!(!marker.exists());
    let out = env.cli(&[
        "run",
        "--env-prefix",
        "app/prod",
        "--env",
        "DB_USER=app/prod/db/user",
        "--",
        "sh",
        "-c",
        "printf %s \"$DB_USER\"",
    ]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "app_user");
    env.ok(&["secret", "rm", "app/prod/db-user"]);
    let out = run(&["--env", "A=db/prod/password"]);
    assert!(out.status.success(), "{out:?}");
    assert!(marker.exists(), "the command runs once everything is there");
    std::fs::remove_file(&marker).expect("rm");
    env.ok(&["lock"]);
    let out = run(&["--env", "A=db/prod/password"]);
    assert_fails(&out, 3, "locked");
    assert!(!marker.exists(), "the command ran with the vault locked");
    let out = env.cli(&[
        "run",
        "--env",
        "A=db/prod/password",
        "--",
        "/nonexistent/cmd",
    ]);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    env.unlock();
    let out = env.cli(&[
        "run",
        "--env",
        "A=db/prod/password",
        "--",
        "/nonexistent/cmd",
    ]);
    assert_fails(&out, 127, "cannot run /nonexistent/cmd");
}

#[test]
fn inject_renders_references_into_a_private_file_or_writes_nothing() {
    let (env, _daemon) = ready_with_secrets();
    let template = env.file(
        "app.conf.tpl",
        "[db]\nuser = {{ secret \"app/prod/db/user\" }}\npassword = {{secret \"db/prod/password\"}}\nliteral = {{ \"{{\" }} kept }}\n",
    );
    let expected =
        "[db]\nuser = app_user\npassword = s3cret-db-pw\nliteral = {{ kept }}\n".to_owned();
    let out_file = env.path().join("conf/app.conf");
    let o = out_file.to_str().expect("utf8");
    let t = template.to_str().expect("utf8");
    env.ok(&["inject", "--in", t, "--out", o]);
    assert_eq!(std::fs::read_to_string(&out_file).expect("out"), expected);
    let mode = std::fs::metadata(&out_file)
        .expect("meta")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);

    // stdin to stdout: a file the shell created for others to read is
    // refused with nothing written; under umask 077 it is written 0600.
    let redirected = env.path().join("redirected.conf");
    let shell = |umask: &str| {
        env.command("sh")
            .args([
                "-c",
                &format!(
                    "umask {umask}; {} inject < {t} > {}",
                    keyholder_bin(),
                    redirected.display()
                ),
            ])
            .output()
            .expect("sh")
    };
    let out = shell("022");
    assert_fails(&out, 2, "others may open");
    assert_eq!(std::fs::read(&redirected).expect("read"), b"");
    std::fs::remove_file(&redirected).expect("rm");
    let out = shell("077");
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        std::fs::read_to_string(&redirected).expect("read"),
        expected
    );
    let mode = std::fs::metadata(&redirected)
        .expect("meta")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);

    // --out replaces a file others could read with a new 0600 one, and a
    // link planted at --out is refused without touching its target.
    let loose = env.path().join("loose.conf");
    std::fs::write(&loose, "old\n").expect("write");
    std::fs::set_permissions(&loose, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    env.ok(&["inject", "--in", t, "--out", loose.to_str().expect("utf8")]);
    let mode = std::fs::metadata(&loose)
        .expect("meta")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let victim = env.file("victim.txt", "untouched\n");
    let link = env.path().join("link.conf");
    std::os::unix::fs::symlink(&victim, &link).expect("symlink");
    assert_fails(
        &env.cli(&["inject", "--in", t, "--out", link.to_str().expect("utf8")]),
        2,
        "not a regular file",
    );
    assert_eq!(
        std::fs::read_to_string(&victim).expect("victim"),
        "untouched\n"
    );

    // Failures write nothing: not the --out file, not stdout.
    std::fs::write(&out_file, "previous\n").expect("write");
    for (text, code, needle) in [
        ("a = {{ secret \"db/prod/nope\" }}\n", 4, "db/prod/nope"),
        ("a = {{ secret db/prod/password }}\n", 6, "line 1"),
        ("ok\nb = {{ env \"HOME\" }}\n", 6, "line 2"),
        ("ok\nb = {{ secret \"db/prod/password\"\n", 6, "line 2"),
    ] {
        let bad = env.file("bad.tpl", text);
        let out = env.cli(&["inject", "--in", bad.to_str().expect("utf8"), "--out", o]);
        assert_fails(&out, code, needle);
        assert!(out.stdout.is_empty());
        assert_eq!(
            std::fs::read_to_string(&out_file).expect("out"),
            "previous\n",
            "{text:?}"
        );
        let fresh = env.path().join("fresh.conf");
        let out = env.cli(&[
            "inject",
            "--in",
            bad.to_str().expect("utf8"),
            "--out",
            fresh.to_str().expect("utf8"),
        ]);
        assert_eq!(out.status.code(), Some(code));
        assert!(!fresh.exists(), "{text:?} created {}", fresh.display());
    }
}

#[test]
fn every_marked_block_in_the_doc_is_run_here() {
    assert_eq!(DOCS.marked(), ["setup", "run", "inject"]);
}

#[test]
fn the_commands_in_the_doc_work_as_written() {
    let (env, _daemon) = Env::ready();
    std::fs::copy(&env.pin_file, env.path().join("pin.txt")).expect("pin.txt");
    DOCS.run(&env, "setup", &[]);
    let out = DOCS.run(&env, "run", &[]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("password is 18 characters"), "{text}");
    assert!(text.contains("user is app_user"), "{text}");
    assert!(!text.contains("correct-horse"), "{text}");
    let out = DOCS.run(&env, "inject", &[]);
    let rendered = std::fs::read_to_string(env.path().join("app.conf")).expect("app.conf");
    assert!(
        rendered.contains("password = correct-horse-9000"),
        "{rendered}"
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "600\n");
}
