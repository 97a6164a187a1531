//! Test harness: a throwaway SoftHSM2 token per test, the real `keyholderd`
//! and `keyholder` binaries, and processes stopped by PID.

use std::collections::HashMap;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";
pub const PIN: &str = "1234";
pub const SO_PIN: &str = "5678";
/// NSS softokn, the PKCS#11 module of NSS key databases.
pub const NSS_SOFTOKN: &str = "/usr/lib/x86_64-linux-gnu/libsoftokn3.so";
/// The label of an NSS key database's token.
pub const NSS_LABEL: &str = "NSS Certificate DB";

pub fn keyholder_bin() -> &'static str {
    env!("CARGO_BIN_EXE_keyholder")
}

/// The daemon under test; `BENCH_KEYHOLDERD` names another build of it, for
/// a benchmark that compares two builds in one run (`docs/benchmarks.md`).
pub fn keyholderd_bin() -> &'static str {
    static BIN: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    BIN.get_or_init(|| {
        std::env::var("BENCH_KEYHOLDERD")
            .unwrap_or_else(|_| env!("CARGO_BIN_EXE_keyholderd").to_owned())
    })
}

/// One test's world: temp dir, SoftHSM2 config and token, runtime dir.
pub struct Env {
    pub dir: tempfile::TempDir,
    pub softhsm_conf: PathBuf,
    pub runtime: PathBuf,
    pub vault: PathBuf,
    pub pin_file: PathBuf,
    /// The PKCS#11 module keyholderd loads (none when empty).
    pub module: PathBuf,
    /// Set when `module` is the fault-injecting test module.
    pub fault_file: Option<PathBuf>,
    /// The label of the token `init` uses.
    pub label: String,
    /// Environment every process started here gets (a token stack's
    /// module settings, say).
    pub token_env: Vec<(String, String)>,
    /// Arguments every keyholderd started here gets before the test's own.
    pub daemon_args: Vec<String>,
    /// Arguments `init` gets after the label and PIN.
    pub init_args: Vec<String>,
}

impl Env {
    /// A fresh world with one initialised token labelled `ops`.
    pub fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let tokens = dir.path().join("tokens");
        std::fs::create_dir(&tokens).expect("token dir");
        let softhsm_conf = dir.path().join("softhsm2.conf");
        std::fs::write(
            &softhsm_conf,
            format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
                tokens.display()
            ),
        )
        .expect("softhsm conf");
        let runtime = dir.path().join("run");
        std::fs::create_dir(&runtime).expect("runtime dir");
        std::fs::set_permissions(&runtime, std::fs::Permissions::from_mode(0o700)).expect("chmod");
        let pin_file = dir.path().join("pin");
        std::fs::write(&pin_file, format!("{PIN}\n")).expect("pin file");
        let env = Self {
            vault: dir.path().join("vault/vault.age"),
            dir,
            softhsm_conf,
            runtime,
            pin_file,
            module: PathBuf::from(MODULE),
            fault_file: None,
            label: "ops".to_owned(),
            token_env: Vec::new(),
            daemon_args: Vec::new(),
            init_args: Vec::new(),
        };
        env.add_token("ops");
        env
    }

    /// Like [`Env::new`], but keyholderd loads the test module that
    /// forwards to SoftHSM2 and injects the fault written with [`Env::fault`].
    /// This stands in for faults SoftHSM2 cannot produce (it never locks a
    /// PIN and its tokens cannot be unplugged).
    pub fn with_fault_module() -> Self {
        let mut env = Self::new();
        let module = Path::new(keyholder_bin())
            .parent()
            .expect("target dir")
            .join("libkeyholder_pkcs11_fault.so");
        assert!(
            module.exists(),
            "{} is missing: run `cargo build -p keyholder-pkcs11-fault` first (scripts/test does)",
            module.display()
        );
        env.module = module;
        let fault_file = env.path().join("fault");
        std::fs::write(&fault_file, "").expect("fault file");
        env.fault_file = Some(fault_file);
        env
    }

    /// Sets the injected fault: "", "final-try", "pin-locked" or "removed".
    pub fn fault(&self, fault: &str) {
        let path = self.fault_file.as_ref().expect("Env::with_fault_module");
        std::fs::write(path, fault).expect("write fault");
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn socket(&self) -> PathBuf {
        self.runtime.join("keyholder/keyholder.sock")
    }

    /// Initialises another token in the same SoftHSM2 store.
    pub fn add_token(&self, label: &str) {
        self.add_token_with_pin(label, PIN);
    }

    /// Initialises another token whose user PIN is `pin`.
    pub fn add_token_with_pin(&self, label: &str, pin: &str) {
        let out = Command::new("softhsm2-util")
            .env("SOFTHSM2_CONF", &self.softhsm_conf)
            .args([
                "--init-token",
                "--free",
                "--label",
                label,
                "--pin",
                pin,
                "--so-pin",
                SO_PIN,
            ])
            .output()
            .expect("softhsm2-util runs (apt-get install softhsm2)");
        assert!(
            out.status.success(),
            "softhsm2-util: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// A fresh NSS database under this world's directory whose password is
    /// the PIN in `pin_file`, and the `C_Initialize` arguments that open it.
    pub fn nss_db(&self) -> String {
        let db = self.path().join("nssdb");
        std::fs::create_dir(&db).expect("db dir");
        let out = Command::new("certutil")
            .arg("-N")
            .arg("-d")
            .arg(format!("sql:{}", db.display()))
            .arg("-f")
            .arg(&self.pin_file)
            .output()
            .expect("certutil runs (libnss3-tools)");
        assert!(out.status.success(), "certutil -N: {out:?}");
        format!(
            "configdir='sql:{}' certPrefix='' keyPrefix='' secmod='secmod.db' flags=",
            db.display()
        )
    }

    /// A file holding `text`, for --pin-file.
    pub fn file(&self, name: &str, text: &str) -> PathBuf {
        let p = self.path().join(name);
        std::fs::write(&p, text).expect("write file");
        p
    }

    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new(program);
        c.env("SOFTHSM2_CONF", &self.softhsm_conf)
            .env("XDG_RUNTIME_DIR", &self.runtime)
            .env("XDG_CONFIG_HOME", self.path().join("config"))
            .env("XDG_DATA_HOME", self.path().join("data"))
            .env("HOME", self.path())
            .env_remove("KEYHOLDER_SOCKET")
            .env_remove("KEYHOLDER_LOG");
        if let Some(f) = &self.fault_file {
            c.env("KEYHOLDER_FAULT_FILE", f);
        }
        c.envs(self.token_env.iter().map(|(k, v)| (k, v)));
        c
    }

    /// Starts keyholderd and waits until it answers.
    pub fn start_daemon(&self, extra: &[&str]) -> Daemon {
        self.start_daemon_under(&[], extra)
    }

    /// Starts keyholderd through `wrapper` (a program that execs its
    /// arguments, such as `prlimit --nofile=1024:1024`, so the PID stays
    /// keyholderd's) and waits until it answers.
    pub fn start_daemon_under(&self, wrapper: &[&str], extra: &[&str]) -> Daemon {
        let log = self.path().join(format!("keyholderd-{}.log", unique()));
        let mut command = match wrapper.split_first() {
            Some((program, args)) => {
                let mut c = self.command(program);
                c.args(args).arg(keyholderd_bin());
                c
            }
            None => self.command(keyholderd_bin()),
        };
        // An empty module: a token backend that loads none (the daemon
        // args say which).
        if !self.module.as_os_str().is_empty() {
            command.arg("--pkcs11-module").arg(&self.module);
        }
        let child = command
            .arg("--vault")
            .arg(&self.vault)
            .args(&self.daemon_args)
            .args(extra)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("keyholderd starts");
        let mut daemon = Daemon { child, log };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(status)) = daemon.child.try_wait() {
                panic!("keyholderd exited early ({status}):\n{}", daemon.log_text());
            }
            if self.socket().exists() && self.cli(&["status"]).status.success() {
                return daemon;
            }
            assert!(
                Instant::now() < deadline,
                "keyholderd did not start:\n{}",
                daemon.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Runs keyholderd expecting it to exit by itself (bad flags and the like).
    pub fn run_daemon_to_exit(&self, args: &[&str]) -> Output {
        let mut child = self
            .command(keyholderd_bin())
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("keyholderd starts");
        let deadline = Instant::now() + Duration::from_secs(20);
        while child.try_wait().expect("wait").is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("keyholderd {args:?} did not exit");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        child.wait_with_output().expect("output")
    }

    /// Runs the CLI.
    pub fn cli(&self, args: &[&str]) -> Output {
        self.cli_with_stdin(args, None)
    }

    /// Runs the CLI with `stdin` piped in.
    pub fn cli_with_stdin(&self, args: &[&str], stdin: Option<&[u8]>) -> Output {
        let mut c = self.command(keyholder_bin());
        c.args(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = c.spawn().expect("keyholder runs");
        if let Some(data) = stdin {
            let mut pipe = child.stdin.take().expect("stdin");
            if let Err(e) = pipe.write_all(data) {
                // The CLI may exit before reading its input (say, the daemon
                // was just killed); its exit status tells what happened.
                assert_eq!(e.kind(), std::io::ErrorKind::BrokenPipe, "write stdin: {e}");
            }
        }
        child.wait_with_output().expect("keyholder finishes")
    }

    /// Runs the CLI, killing it if it has not finished within `limit`
    /// (`None` then).
    pub fn cli_within(&self, args: &[&str], limit: Duration) -> Option<Output> {
        let mut c = self.command(keyholder_bin());
        c.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        output_within(c, limit)
    }

    /// Runs the CLI and insists on success.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert_ok(&out, args);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A fresh world with a running daemon, an initialised vault, unlocked.
    pub fn ready() -> (Self, Daemon) {
        let env = Self::new();
        let daemon = env.start_daemon(&[]);
        env.init();
        env.unlock();
        (env, daemon)
    }

    pub fn init(&self) {
        let mut args = vec![
            "init",
            "--token-label",
            &self.label,
            "--pin-file",
            self.pin_file.to_str().expect("utf8"),
        ];
        args.extend(self.init_args.iter().map(String::as_str));
        self.ok(&args);
    }

    pub fn unlock(&self) {
        self.ok(&[
            "unlock",
            "--pin-file",
            self.pin_file.to_str().expect("utf8"),
        ]);
    }

    pub fn put(&self, name: &str, value: &[u8]) {
        let args = ["secret", "put", name];
        let out = self.cli_with_stdin(&args, Some(value));
        assert_ok(&out, &args);
    }
}

/// Runs `command`, killing it if it has not finished within `limit`
/// (`None` then). Its output must fit the pipes (a few KiB).
pub fn output_within(mut command: Command, limit: Duration) -> Option<Output> {
    let mut child = command.spawn().expect("command starts");
    let deadline = Instant::now() + limit;
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    Some(child.wait_with_output().expect("output"))
}

/// Waits (bounded) for an already started `child` with piped output; kills
/// it at the deadline.
pub fn output_within_waiting(mut child: std::process::Child, limit: Duration) -> Option<Output> {
    let deadline = Instant::now() + limit;
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Some(child.wait_with_output().expect("output"))
}

/// Prints what ran and what it said, then fails, unless `out` succeeded.
pub fn assert_ok(out: &Output, args: &[&str]) {
    assert!(
        out.status.success(),
        "keyholder {args:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Asserts exit status `code` and that stderr contains `needle`.
pub fn assert_fails(out: &Output, code: i32, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(code),
        "expected exit {code}:\nstdout: {}\nstderr: {stderr}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(stderr.contains(needle), "stderr lacks {needle:?}: {stderr}");
}

fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// A running keyholderd, stopped by PID when dropped.
pub struct Daemon {
    pub child: Child,
    pub log: PathBuf,
}

impl Daemon {
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Open file descriptors, from /proc (the test runs as root).
    pub fn open_fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    /// Resident set size, from /proc.
    pub fn rss_kib(&self) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn signal(&self, sig: rustix::process::Signal) {
        if let Some(pid) = rustix::process::Pid::from_raw(self.pid()) {
            let _ = rustix::process::kill_process(pid, sig);
        }
    }

    /// SIGTERM, then wait (bounded) for a clean exit; returns its status.
    pub fn stop(mut self) -> std::process::ExitStatus {
        self.signal(rustix::process::Signal::TERM);
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("keyholderd ignored SIGTERM:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL and reap.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A token stack started by `testing/NAME/up DIR`: stopped with
/// `testing/NAME/down DIR`, and every PID it wrote killed, when dropped.
pub(crate) struct Stack {
    name: &'static str,
    dir: PathBuf,
    /// What `up` wrote to `DIR/token.env`.
    pub settings: HashMap<String, String>,
}

fn script(name: &str, verb: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("testing")
        .join(name)
        .join(verb)
}

impl Stack {
    pub(crate) fn up(name: &'static str, dir: &Path) -> Self {
        Self::up_with(name, dir, &[])
    }

    /// [`Stack::up`] with extra environment for the `up` script.
    pub(crate) fn up_with(name: &'static str, dir: &Path, vars: &[(&str, &str)]) -> Self {
        std::fs::create_dir_all(dir).expect("stack dir");
        let mut up = Command::new(script(name, "up"));
        up.arg(dir).envs(vars.iter().copied());
        // Made before `up` runs, so that a failing `up` is cleaned up too.
        let mut stack = Self {
            name,
            dir: dir.to_owned(),
            settings: HashMap::new(),
        };
        let out = output_within(up, Duration::from_secs(180))
            .unwrap_or_else(|| panic!("testing/{name}/up did not finish in 180 s"));
        assert!(
            out.status.success(),
            "testing/{name}/up failed (testing/{name}/install, which scripts/test runs, \
             installs what it needs): {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let text = std::fs::read_to_string(dir.join("token.env")).expect("token.env");
        stack.settings = text
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
            .collect();
        stack
    }

    fn get(&self, key: &str) -> &str {
        self.settings
            .get(key)
            .unwrap_or_else(|| panic!("testing/{}/up wrote no {key}", self.name))
    }

    /// Points `env` at this stack's token: module, label, PIN and the
    /// environment the module needs.
    pub(crate) fn configure(&self, env: &mut Env) {
        env.module = PathBuf::from(self.get("MODULE"));
        env.label = self.get("LABEL").to_owned();
        std::fs::write(&env.pin_file, format!("{}\n", self.get("PIN"))).expect("pin file");
        env.token_env = self
            .settings
            .iter()
            .filter_map(|(k, v)| Some((k.strip_prefix("ENV_")?.to_owned(), v.clone())))
            .collect();
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        let mut down = Command::new(script(self.name, "down"));
        down.arg(&self.dir);
        let _ = output_within(down, Duration::from_secs(60));
        // Whatever `down` left running is killed by PID all the same.
        let pids = std::fs::read_to_string(self.dir.join("pids")).unwrap_or_default();
        for pid in pids.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
            if let Some(pid) = rustix::process::Pid::from_raw(pid) {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
            }
        }
    }
}

/// The shell blocks a doc marks `<!-- run by FILE: NAME -->`, run as written.
pub(crate) struct DocBlocks {
    /// The doc's path, for messages (docs/tokens.md).
    pub path: &'static str,
    /// Its text.
    pub text: &'static str,
    /// The mark's prefix, up to the block's name.
    pub mark: &'static str,
}

impl DocBlocks {
    /// The names of the marked blocks, in order.
    pub(crate) fn marked(&self) -> Vec<&'static str> {
        self.text
            .lines()
            .filter_map(|l| l.strip_prefix(self.mark)?.strip_suffix(" -->"))
            .collect()
    }

    /// The shell block after the mark `name`.
    pub(crate) fn block(&self, name: &str) -> String {
        let mark = format!("{}{name} -->", self.mark);
        let mut lines = self.text.lines().skip_while(|l| *l != mark).skip(1);
        assert_eq!(
            lines.next(),
            Some("```sh"),
            "{}: no ```sh after {mark}",
            self.path
        );
        let body: Vec<&str> = lines.take_while(|l| *l != "```").collect();
        assert!(!body.is_empty(), "{}: empty block {name}", self.path);
        body.join("\n") + "\n"
    }

    /// Runs block `name` under `bash -euo pipefail` in `env`'s directory,
    /// with the built binaries first on PATH and `vars` set; insists on
    /// success.
    pub(crate) fn run(&self, env: &Env, name: &str, vars: &[(&str, &str)]) -> Output {
        let bin = Path::new(keyholder_bin()).parent().expect("bin dir");
        let path = format!(
            "{}:{}",
            bin.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let out = env
            .command("bash")
            .args(["-euo", "pipefail", "-c", &self.block(name)])
            .current_dir(env.path())
            .env("PATH", path)
            .envs(vars.iter().copied())
            .output()
            .expect("bash runs");
        assert!(
            out.status.success(),
            "{} block {name} failed: {out:?}",
            self.path
        );
        out
    }
}
