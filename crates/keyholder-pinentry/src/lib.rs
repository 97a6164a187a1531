//! Asks for a PIN through the standard `pinentry` program: the client side
//! of the Assuan protocol as pinentry speaks it (greeting, `OPTION`,
//! `SETTITLE`, `SETDESC`, `SETPROMPT`, `SETERROR`, `SETTIMEOUT`, `GETPIN`,
//! `BYE`).
//!
//! Why not a crate: the `pinentry` crate (the one rage and
//! age-plugin-yubikey use) was evaluated. It reads the program's answers
//! with an unbounded `read_line` and no deadline, so a pinentry that never
//! answers hangs the caller forever and one that sends an endless line
//! grows memory without limit; it panics on a request line over 1000 bytes;
//! an `INQUIRE` is logged and then waited on forever (never answered with
//! `CAN`); and it always claims `/dev/tty` as the terminal. Keyholder's
//! daemon runs it on behalf of other processes, so every one of those is a
//! way to wedge or crash it. No other maintained Rust Assuan client fits.
//! This is a page of std code instead, every read bounded in size and time.
//!
//! How the bounds work: a thread reads the program's stdout into lines of at
//! most [`MAX_LINE`] bytes and hands them over a small bounded channel; the
//! caller waits on that channel with a deadline. The greeting and every
//! command but `GETPIN` must be answered within [`STEP_TIMEOUT`]; `GETPIN`,
//! which waits for a human, within the configured timeout (default
//! [`DEFAULT_TIMEOUT`]). Whatever happens, the program is sent `BYE`, given
//! [`EXIT_WAIT`] to exit, and then killed (by its PID, through
//! [`std::process::Child::kill`]) and reaped.
//!
//! The PIN never appears in an error, a log line or `Debug` output; the
//! buffers it passes through are preallocated (no reallocation leaves a copy)
//! and wiped when dropped.

#![forbid(unsafe_code)]

use std::ffi::OsString;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender};
use std::time::{Duration, Instant};

use secrecy::SecretString;
use zeroize::Zeroizing;

/// How long `GETPIN` waits for the human by default.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the greeting and every command other than `GETPIN` may take.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the program may take to exit after `BYE` before it is killed.
pub const EXIT_WAIT: Duration = Duration::from_secs(2);
/// Longest line accepted from the program, in bytes (Assuan's own limit is
/// 1000 including the line feed).
pub const MAX_LINE: usize = 2048;
/// Longest PIN accepted, in bytes after percent-decoding.
pub const MAX_PIN: usize = 256;
/// Longest request line sent, line feed included (Assuan's limit).
const MAX_REQUEST: usize = 1000;
/// How often a wait looks at the abort flag.
const ABORT_POLL: Duration = Duration::from_millis(100);
/// Most status and comment lines accepted in one answer.
const MAX_LINES_PER_ANSWER: usize = 64;
/// The low 16 bits of a GnuPG error code: the code without its source.
const GPG_ERR_CODE_MASK: u32 = 0xFFFF;
const GPG_ERR_TIMEOUT: u32 = 62;
const GPG_ERR_CANCELED: u32 = 99;
const GPG_ERR_FULLY_CANCELED: u32 = 198;

/// What can go wrong. No variant carries the PIN.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The program could not be started.
    #[error("cannot start pinentry program {program}: {source}")]
    Spawn {
        /// The program, as configured.
        program: String,
        /// Why.
        source: io::Error,
    },
    /// The user cancelled the dialog (pinentry's `ERR 83886179`).
    #[error("the PIN entry was cancelled")]
    Cancelled,
    /// The caller called the dialog off ([`Pinentry::abort_flag`]).
    #[error("the PIN entry was called off")]
    Aborted,
    /// The user entered nothing.
    #[error("no PIN was entered")]
    Empty,
    /// The program did not answer in time (or reported its own timeout).
    #[error("pinentry did not answer within {} s", .0.as_secs())]
    Timeout(Duration),
    /// The program closed its output or exited before answering.
    #[error("pinentry exited before answering {0}")]
    Closed(&'static str),
    /// A line from the program was longer than [`MAX_LINE`].
    #[error("pinentry sent a line longer than {MAX_LINE} bytes")]
    LineTooLong,
    /// The PIN was longer than [`MAX_PIN`].
    #[error("the PIN from pinentry is longer than {MAX_PIN} bytes")]
    PinTooLong,
    /// The program said something that is not Assuan.
    #[error("pinentry does not speak the Assuan protocol: {0}")]
    Protocol(&'static str),
    /// The program answered `ERR` to a command.
    #[error("pinentry refused {command}: error {code} ({text})")]
    Refused {
        /// The command refused.
        command: &'static str,
        /// The GnuPG error code.
        code: u32,
        /// Its text, with anything unprintable replaced.
        text: String,
    },
    /// Writing to or reading from the program failed.
    #[error("cannot talk to pinentry: {0}")]
    Io(#[from] io::Error),
}

/// The texts of one PIN dialog. Each is sent percent-encoded and cut to
/// what fits in one Assuan line.
#[derive(Clone, Debug, Default)]
pub struct PinRequest {
    /// The window title (`SETTITLE`).
    pub title: Option<String>,
    /// The explanation above the entry field (`SETDESC`).
    pub description: Option<String>,
    /// The label before the entry field (`SETPROMPT`).
    pub prompt: Option<String>,
    /// Why the dialog is shown again, e.g. after a wrong PIN (`SETERROR`).
    pub error: Option<String>,
}

/// A pinentry program and the options it is started with.
#[derive(Clone, Debug)]
pub struct Pinentry {
    program: PathBuf,
    args: Vec<OsString>,
    timeout: Duration,
    step_timeout: Duration,
    tty: Option<String>,
    ttytype: Option<String>,
    lc_ctype: Option<String>,
    display: Option<String>,
    abort: Option<Arc<AtomicBool>>,
}

fn env_nonempty(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

impl Pinentry {
    /// `program` (started directly, never through a shell), with the
    /// terminal type, locale and X display taken from this process's
    /// environment. A Wayland pinentry finds `WAYLAND_DISPLAY` in the
    /// environment it inherits; Assuan has no option for it.
    pub fn new(program: impl Into<PathBuf>) -> Self {
        Self {
            program: program.into(),
            args: Vec::new(),
            timeout: DEFAULT_TIMEOUT,
            step_timeout: STEP_TIMEOUT,
            tty: None,
            ttytype: env_nonempty("TERM"),
            lc_ctype: env_nonempty("LC_ALL")
                .or_else(|| env_nonempty("LC_CTYPE"))
                .or_else(|| env_nonempty("LANG")),
            display: env_nonempty("DISPLAY"),
            abort: None,
        }
    }

    /// A flag that, once set, ends the dialog within a tenth of a second
    /// with [`Error::Aborted`] (a daemon shutting down, say).
    pub fn abort_flag(mut self, flag: Arc<AtomicBool>) -> Self {
        self.abort = Some(flag);
        self
    }

    /// An argument for the program.
    pub fn arg(mut self, arg: impl Into<OsString>) -> Self {
        self.args.push(arg.into());
        self
    }

    /// How long `GETPIN` waits for the human ([`DEFAULT_TIMEOUT`] unless set).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// How long every other step may take ([`STEP_TIMEOUT`] unless set).
    pub fn step_timeout(mut self, timeout: Duration) -> Self {
        self.step_timeout = timeout;
        self
    }

    /// The terminal a text-mode pinentry should use; with it, the terminal
    /// type and locale are sent too. None (the default) sends neither.
    pub fn tty(mut self, tty: Option<String>) -> Self {
        self.tty = tty;
        self
    }

    /// The X display to name (`DISPLAY` from the environment unless set).
    pub fn display(mut self, display: Option<String>) -> Self {
        self.display = display;
        self
    }

    /// The program.
    pub fn program(&self) -> &Path {
        &self.program
    }

    /// The `OPTION`s sent after the greeting.
    fn options(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(tty) = &self.tty {
            out.push(format!("ttyname={tty}"));
            if let Some(t) = &self.ttytype {
                out.push(format!("ttytype={t}"));
            }
            if let Some(l) = &self.lc_ctype {
                out.push(format!("lc-ctype={l}"));
            }
        }
        if let Some(d) = &self.display {
            out.push(format!("display={d}"));
        }
        out
    }

    /// Shows the dialog and returns the PIN typed.
    pub fn get_pin(&self, request: &PinRequest) -> Result<SecretString, Error> {
        let mut c = Conversation::start(self)?;
        for option in self.options() {
            // An option this pinentry does not know is not a reason to fail.
            match c.command("OPTION", Some(&option)) {
                Ok(_) | Err(Error::Refused { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        // pinentry closes its own dialog at the deadline; ours is a backstop.
        let secs = self.timeout.as_secs().max(1).to_string();
        match c.command("SETTIMEOUT", Some(&secs)) {
            Ok(_) | Err(Error::Refused { .. }) => {}
            Err(e) => return Err(e),
        }
        for (command, text) in [
            ("SETTITLE", &request.title),
            ("SETDESC", &request.description),
            ("SETPROMPT", &request.prompt),
            ("SETERROR", &request.error),
        ] {
            if let Some(text) = text {
                c.command(command, Some(text))?;
            }
        }
        c.send("GETPIN", None)?;
        let wait = self.timeout.saturating_add(EXIT_WAIT);
        let data = c.answer("GETPIN", wait)?;
        c.finish();
        let data = data.ok_or(Error::Empty)?;
        if data.is_empty() {
            return Err(Error::Empty);
        }
        let text =
            std::str::from_utf8(&data).map_err(|_| Error::Protocol("the PIN is not UTF-8"))?;
        Ok(SecretString::from(text.to_owned()))
    }
}

/// The terminal on this process's standard input, if it is one
/// (`/dev/pts/N` or `/dev/ttyN`), for [`Pinentry::tty`].
pub fn stdin_tty() -> Option<String> {
    let target = std::fs::read_link("/proc/self/fd/0").ok()?;
    let name = target.to_str()?;
    (name.starts_with("/dev/pts/") || name.starts_with("/dev/tty")).then(|| name.to_owned())
}

/// What the reader thread hands over.
enum Event {
    Line(Zeroizing<Vec<u8>>),
    TooLong,
    Eof,
    Failed(io::Error),
}

/// Splits the program's output into lines of at most [`MAX_LINE`] bytes.
/// Ends at end of file, on an error, on an overlong line, or when the
/// other side stops listening.
fn read_lines(mut out: ChildStdout, tx: SyncSender<Event>) {
    let mut line = Zeroizing::new(Vec::with_capacity(MAX_LINE));
    let mut buf = Zeroizing::new([0u8; 512]);
    loop {
        let n = match out.read(&mut buf[..]) {
            Ok(0) => {
                let _ = tx.send(Event::Eof);
                return;
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                let _ = tx.send(Event::Failed(e));
                return;
            }
        };
        for &b in buf.iter().take(n) {
            if b == b'\n' {
                let done = std::mem::replace(&mut *line, Vec::with_capacity(MAX_LINE));
                if tx.send(Event::Line(Zeroizing::new(done))).is_err() {
                    return;
                }
            } else if line.len() >= MAX_LINE {
                let _ = tx.send(Event::TooLong);
                return;
            } else {
                line.push(b);
            }
        }
    }
}

/// Encodes one request line: `%`, CR, LF and every other control
/// character as `%XX`, a final backslash as `%5C`; the parameter is cut at
/// a character boundary so the line fits in [`MAX_REQUEST`] bytes.
fn encode_request(command: &str, param: Option<&str>) -> Vec<u8> {
    let mut out = Vec::with_capacity(MAX_REQUEST);
    out.extend_from_slice(command.as_bytes());
    if let Some(p) = param {
        out.push(b' ');
        let mut chars = p.chars().peekable();
        while let Some(c) = chars.next() {
            let last = chars.peek().is_none();
            let mut piece = [0u8; 4];
            let encoded: &[u8] = if c == '%' || (c as u32) < 0x20 || (c == '\\' && last) {
                let v = c as u32;
                let hex = b"0123456789ABCDEF";
                piece[0] = b'%';
                piece[1] = hex[((v >> 4) & 0xF) as usize];
                piece[2] = hex[(v & 0xF) as usize];
                &piece[..3]
            } else {
                c.encode_utf8(&mut piece).as_bytes()
            };
            // Room for the line feed, and for a final backslash's escape.
            if out.len() + encoded.len() + 1 > MAX_REQUEST {
                break;
            }
            out.extend_from_slice(encoded);
        }
        if out.last() == Some(&b'\\') {
            out.pop();
            if out.len() + 4 <= MAX_REQUEST {
                out.extend_from_slice(b"%5C");
            }
        }
    }
    out.push(b'\n');
    out
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Appends the percent-decoded `data` to `out`, which has room for
/// [`MAX_PIN`] bytes and is never grown past it.
fn decode_into(data: &[u8], out: &mut Vec<u8>) -> Result<(), Error> {
    let mut i = 0;
    while let Some(&b) = data.get(i) {
        let (byte, step) = if b == b'%' {
            let hi = data.get(i + 1).copied().and_then(hex_value);
            let lo = data.get(i + 2).copied().and_then(hex_value);
            match (hi, lo) {
                (Some(h), Some(l)) => ((h << 4) | l, 3),
                _ => return Err(Error::Protocol("a bad %-escape in a data line")),
            }
        } else {
            (b, 1)
        };
        if out.len() >= MAX_PIN {
            return Err(Error::PinTooLong);
        }
        out.push(byte);
        i += step;
    }
    Ok(())
}

/// Printable text from an `ERR` line, at most 200 characters.
fn printable(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes)
        .chars()
        .take(200)
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

/// `ETXTBSY`: the program file is open for writing somewhere, as it is for
/// a moment when another thread forks while a script is being written.
const TEXT_FILE_BUSY: i32 = 26;

/// Starts the program, trying again a few times (for at most 100 ms) while
/// its file is busy.
fn spawn(p: &Pinentry) -> io::Result<Child> {
    let mut tries = 0;
    loop {
        let started = Command::new(&p.program)
            .args(&p.args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn();
        match started {
            Err(e) if e.raw_os_error() == Some(TEXT_FILE_BUSY) && tries < 5 => {
                tries += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
            other => return other,
        }
    }
}

/// A started pinentry. Dropping it ends the program.
struct Conversation {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<Event>,
    step: Duration,
    abort: Option<Arc<AtomicBool>>,
    done: bool,
}

impl Conversation {
    fn start(p: &Pinentry) -> Result<Self, Error> {
        let mut child = spawn(p).map_err(|source| Error::Spawn {
            program: p.program.display().to_string(),
            source,
        })?;
        let (stdin, stdout) = (child.stdin.take(), child.stdout.take());
        let (Some(stdin), Some(stdout)) = (stdin, stdout) else {
            let _ = child.kill();
            let _ = child.wait();
            return Err(Error::Io(io::Error::other("no pipe to the program")));
        };
        let (tx, rx) = mpsc::sync_channel(8);
        let reader = std::thread::Builder::new()
            .name("pinentry-reader".into())
            .spawn(move || read_lines(stdout, tx));
        if let Err(e) = reader {
            let _ = child.kill();
            let _ = child.wait();
            return Err(Error::Io(e));
        }
        let mut c = Self {
            child,
            stdin: Some(stdin),
            lines: rx,
            step: p.step_timeout,
            abort: p.abort.clone(),
            done: false,
        };
        c.answer("the greeting", p.step_timeout)?;
        Ok(c)
    }

    fn send(&mut self, command: &str, param: Option<&str>) -> Result<(), Error> {
        let line = encode_request(command, param);
        let stdin = self
            .stdin
            .as_mut()
            .ok_or(Error::Io(io::Error::from(io::ErrorKind::BrokenPipe)))?;
        stdin.write_all(&line)?;
        stdin.flush()?;
        Ok(())
    }

    /// Sends a command and waits for its `OK` within the step timeout.
    fn command(
        &mut self,
        command: &'static str,
        param: Option<&str>,
    ) -> Result<Option<Zeroizing<Vec<u8>>>, Error> {
        self.send(command, param)?;
        self.answer(command, self.step)
    }

    /// Reads lines up to `OK` or `ERR`, within `within`; returns the
    /// decoded data lines, if there were any.
    fn answer(
        &mut self,
        what: &'static str,
        within: Duration,
    ) -> Result<Option<Zeroizing<Vec<u8>>>, Error> {
        let deadline = Instant::now().checked_add(within);
        let mut data: Option<Zeroizing<Vec<u8>>> = None;
        let mut other_lines = 0usize;
        loop {
            if self
                .abort
                .as_ref()
                .is_some_and(|a| a.load(Ordering::Relaxed))
            {
                return Err(Error::Aborted);
            }
            let left = match deadline {
                Some(d) => d.saturating_duration_since(Instant::now()),
                None => within,
            };
            let slice = if self.abort.is_some() {
                left.min(ABORT_POLL)
            } else {
                left
            };
            let line = match self.lines.recv_timeout(slice) {
                Ok(Event::Line(line)) => line,
                Ok(Event::TooLong) => return Err(Error::LineTooLong),
                Ok(Event::Eof) | Err(RecvTimeoutError::Disconnected) => {
                    return Err(Error::Closed(what));
                }
                Ok(Event::Failed(e)) => return Err(Error::Io(e)),
                Err(RecvTimeoutError::Timeout) if slice < left => continue,
                Err(RecvTimeoutError::Timeout) => return Err(Error::Timeout(within)),
            };
            let line = line.strip_suffix(b"\r").unwrap_or(&line);
            if line == b"OK" || line.starts_with(b"OK ") {
                return Ok(data);
            }
            if let Some(rest) = line.strip_prefix(b"ERR ") {
                return Err(err_line(what, rest, within));
            }
            if let Some(rest) = line.strip_prefix(b"D ") {
                let buf = data.get_or_insert_with(|| Zeroizing::new(Vec::with_capacity(MAX_PIN)));
                decode_into(rest, buf)?;
                continue;
            }
            other_lines += 1;
            if other_lines > MAX_LINES_PER_ANSWER {
                return Err(Error::Protocol("too many status lines"));
            }
            if line.starts_with(b"INQUIRE ") {
                // Nothing Keyholder asks needs more from the client.
                self.send("CAN", None)?;
            } else if !(line == b"S" || line.starts_with(b"S ") || line.starts_with(b"#")) {
                return Err(Error::Protocol("an unexpected line"));
            }
        }
    }

    /// Says `BYE`, waits for the program to exit, kills it if it does not.
    fn finish(&mut self) {
        if self.done {
            return;
        }
        self.done = true;
        let _ = self.send("BYE", None);
        // End of input tells even a program that ignores BYE to stop.
        self.stdin = None;
        let deadline = Instant::now() + EXIT_WAIT;
        loop {
            match self.child.try_wait() {
                Ok(Some(_)) => return,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                _ => break,
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Conversation {
    fn drop(&mut self) {
        self.finish();
    }
}

fn err_line(what: &'static str, rest: &[u8], within: Duration) -> Error {
    let (code, text) = match rest.iter().position(|&b| b == b' ') {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (rest, &b""[..]),
    };
    let code = std::str::from_utf8(code)
        .ok()
        .and_then(|c| c.parse::<u32>().ok());
    let Some(code) = code else {
        return Error::Protocol("an ERR line without a number");
    };
    match code & GPG_ERR_CODE_MASK {
        GPG_ERR_CANCELED | GPG_ERR_FULLY_CANCELED => Error::Cancelled,
        GPG_ERR_TIMEOUT => Error::Timeout(within),
        _ => Error::Refused {
            command: what,
            code,
            text: printable(text),
        },
    }
}

#[cfg(test)]
mod tests;
