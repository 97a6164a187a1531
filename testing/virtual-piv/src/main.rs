//! A virtual PIV card for tests, attached to vsmartcard's virtual reader driver (vpcd).
//!
//! The card is Nitrokey's `piv-authenticator` on trussed's virtual platform. This program
//! connects to the vpcd port of a pcscd, speaks vpcd's framing (2-byte big-endian length,
//! then either a one-byte control message or an APDU) and makes the card look enough like a
//! YubiKey 5 for Yubico's ykcs11, yubico-piv-tool and the `yubikey` crate:
//!
//! - an answer is sent whole when it fits 256 bytes, whatever the Le (clients send
//!   commands without Le and expect the data); longer answers to short commands are
//!   chained with 61xx / GET RESPONSE, extended commands get them whole;
//! - command chaining (CLA bit 0x10) is assembled here;
//! - a SELECT by any prefix of the PIV AID of at least the 5-byte RID selects PIV;
//! - SELECT clears the PIN's verification, as on a YubiKey (clients re-select to read the
//!   retry counter);
//! - GET VERSION (0xFD) and GET SERIAL (0xF8) give the configured version and serial;
//!   GET METADATA (0xF7) is not supported, as before firmware 5.3.
//!
//! FOR TESTS ONLY: the card's storage (and so its keys) is plain files or memory.

mod metadata;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use heapless::Vec as HVec;
use iso7816::command::{Command, CommandView};
use iso7816::Status;
use piv_authenticator::{Authenticator, Options};
use rand_chacha::rand_core::SeedableRng;
use rand_chacha::ChaCha8Rng;
use trussed::backend::BackendId;
use trussed::pipe::TrussedChannel;
use trussed::serde_extensions::{ExtensionDispatch, ExtensionId, ExtensionImpl};
use trussed::service::ServiceResources;
use trussed::types::Context;
use trussed::virt::{self, StorageConfig, StoreConfig};
use trussed::Platform;
use trussed_auth::AuthExtension;
use trussed_auth_backend::{AuthBackend, AuthContext, FilesystemLayout};
use trussed_chunked::ChunkedExtension;
use trussed_core::api::{reply, request};
use trussed_core::types::Location;
use trussed_core::Error as TrussedError;
use trussed_hpke::HpkeExtension;
use trussed_staging::{StagingBackend, StagingContext};
use trussed_wrap_key_to_file::WrapKeyToFileExtension;

/// The full PIV AID (NIST SP 800-73-4).
const PIV_AID: [u8; 11] = [
    0xA0, 0x00, 0x00, 0x03, 0x08, 0x00, 0x00, 0x10, 0x00, 0x01, 0x00,
];
/// The answer to reset of a YubiKey 5 (contact/USB CCID interface).
const ATR: [u8; 23] = [
    0x3B, 0xFD, 0x13, 0x00, 0x00, 0x81, 0x31, 0xFE, 0x15, 0x80, 0x73, 0xC0, 0x21, 0xC0, 0x57, 0x59,
    0x75, 0x62, 0x69, 0x4B, 0x65, 0x79, 0x40,
];
/// Largest command (after chaining) and answer the card handles.
const MAX_MSG: usize = 8192;

const INS_GET_RESPONSE: u8 = 0xC0;
const INS_SELECT: u8 = 0xA4;
const INS_GET_SERIAL: u8 = 0xF8;
const INS_GET_VERSION: u8 = 0xFD;
const INS_GET_METADATA: u8 = 0xF7;
const INS_GENERATE: u8 = 0x47;
const INS_IMPORT: u8 = 0xFE;
const INS_RESET: u8 = 0xFB;

// ---------------------------------------------------------------------------------------
// trussed: the core backend plus the two backends piv-authenticator's client needs.

#[derive(Debug)]
enum Backends {
    Auth,
    Staging,
}

#[derive(Debug, Clone, Copy)]
enum Extensions {
    Auth,
    Chunked,
    WrapKeyToFile,
    Hpke,
}

impl From<Extensions> for u8 {
    fn from(id: Extensions) -> u8 {
        match id {
            Extensions::Auth => 0,
            Extensions::Chunked => 1,
            Extensions::WrapKeyToFile => 2,
            Extensions::Hpke => 3,
        }
    }
}

impl TryFrom<u8> for Extensions {
    type Error = TrussedError;
    fn try_from(id: u8) -> Result<Self, TrussedError> {
        match id {
            0 => Ok(Self::Auth),
            1 => Ok(Self::Chunked),
            2 => Ok(Self::WrapKeyToFile),
            3 => Ok(Self::Hpke),
            _ => Err(TrussedError::FunctionNotSupported),
        }
    }
}

impl ExtensionId<AuthExtension> for Dispatcher {
    type Id = Extensions;
    const ID: Extensions = Extensions::Auth;
}
impl ExtensionId<ChunkedExtension> for Dispatcher {
    type Id = Extensions;
    const ID: Extensions = Extensions::Chunked;
}
impl ExtensionId<WrapKeyToFileExtension> for Dispatcher {
    type Id = Extensions;
    const ID: Extensions = Extensions::WrapKeyToFile;
}
impl ExtensionId<HpkeExtension> for Dispatcher {
    type Id = Extensions;
    const ID: Extensions = Extensions::Hpke;
}

struct Dispatcher {
    auth: AuthBackend,
    staging: StagingBackend,
}

impl Default for Dispatcher {
    fn default() -> Self {
        Self {
            auth: AuthBackend::new(Location::Internal, FilesystemLayout::V0),
            staging: StagingBackend::default(),
        }
    }
}

#[derive(Default)]
struct BackendContexts {
    auth: AuthContext,
    staging: StagingContext,
}

impl ExtensionDispatch for Dispatcher {
    type BackendId = Backends;
    type Context = BackendContexts;
    type ExtensionId = Extensions;

    fn extension_request<P: Platform>(
        &mut self,
        backend: &Backends,
        extension: &Extensions,
        ctx: &mut Context<BackendContexts>,
        request: &request::SerdeExtension,
        resources: &mut ServiceResources<P>,
    ) -> Result<reply::SerdeExtension, TrussedError> {
        let core = &mut ctx.core;
        let auth = &mut ctx.backends.auth;
        let staging = &mut ctx.backends.staging;
        match (backend, *extension) {
            (Backends::Auth, Extensions::Auth) => {
                ExtensionImpl::<AuthExtension>::extension_request_serialized(
                    &mut self.auth,
                    core,
                    auth,
                    request,
                    resources,
                )
            }
            (Backends::Staging, Extensions::Chunked) => {
                ExtensionImpl::<ChunkedExtension>::extension_request_serialized(
                    &mut self.staging,
                    core,
                    staging,
                    request,
                    resources,
                )
            }
            (Backends::Staging, Extensions::WrapKeyToFile) => {
                ExtensionImpl::<WrapKeyToFileExtension>::extension_request_serialized(
                    &mut self.staging,
                    core,
                    staging,
                    request,
                    resources,
                )
            }
            (Backends::Staging, Extensions::Hpke) => {
                ExtensionImpl::<HpkeExtension>::extension_request_serialized(
                    &mut self.staging,
                    core,
                    staging,
                    request,
                    resources,
                )
            }
            _ => Err(TrussedError::RequestNotAvailable),
        }
    }
}

const BACKENDS: &[BackendId<Backends>] = &[
    BackendId::Custom(Backends::Auth),
    BackendId::Custom(Backends::Staging),
    BackendId::Core,
];

// ---------------------------------------------------------------------------------------
// Command line.

struct Args {
    host: String,
    port: u16,
    state: Option<PathBuf>,
    metadata: bool,
    serial: u32,
    version: [u8; 3],
    verbose: bool,
}

const USAGE: &str = "usage: virtual-piv --port N [--host ADDR] [--state DIR] [--serial N]
       [--version MAJOR.MINOR.PATCH] [--verbose]

Connects to vsmartcard's vpcd listening at ADDR:N (default 127.0.0.1; vpcd's reader.conf
DEVICENAME /dev/null:N) and runs a PIV card until the reader closes the connection.
With --state, the card's storage lives in DIR (kept across runs); without it, in memory.
--verbose logs every command and answer to stderr, PINs and keys included.
--metadata answers GET METADATA for keys generated on the card (as firmware 5.2.3+ does);
  without it GET METADATA is not supported and clients read the slots' certificates.
Defaults: --serial 10000001, --version 5.2.7.";

fn parse_args() -> Result<Args, String> {
    let mut host = "127.0.0.1".to_string();
    let mut port = None;
    let mut state = None;
    let mut serial = 10_000_001u32;
    let mut version = [5u8, 2, 7];
    let mut verbose = false;
    let mut metadata = false;
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = |name: &str| it.next().ok_or_else(|| format!("{name} needs a value"));
        match arg.as_str() {
            "--host" => host = value("--host")?,
            "--port" => {
                let v = value("--port")?;
                port = Some(v.parse::<u16>().map_err(|_| format!("bad port {v:?}"))?);
            }
            "--state" => state = Some(PathBuf::from(value("--state")?)),
            "--serial" => {
                let v = value("--serial")?;
                serial = v.parse().map_err(|_| format!("bad serial {v:?}"))?;
            }
            "--version" => {
                let v = value("--version")?;
                let parts: Vec<u8> = v
                    .split('.')
                    .map(|p| p.parse::<u8>())
                    .collect::<Result<_, _>>()
                    .map_err(|_| format!("bad version {v:?}"))?;
                version = parts
                    .try_into()
                    .map_err(|_| format!("bad version {v:?}: want MAJOR.MINOR.PATCH"))?;
            }
            "--verbose" | "-v" => verbose = true,
            "--metadata" => metadata = true,
            "--help" | "-h" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    let port = port.ok_or("--port is required")?;
    Ok(Args {
        host,
        port,
        state,
        serial,
        version,
        verbose,
        metadata,
    })
}

// ---------------------------------------------------------------------------------------
// vpcd framing.

/// vpcd writes the length and the message of a frame in two writes, so with Nagle on its
/// side the message waits for our ACK of the length, which Linux delays by up to 40 ms:
/// ask for immediate ACKs (the kernel drops the flag again after a while, so before every
/// read).
fn quick_ack(stream: &TcpStream) {
    use std::os::fd::AsRawFd;
    let on: libc::c_int = 1;
    // SAFETY: setsockopt on a socket this process owns, with a c_int option value.
    unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_QUICKACK,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

fn read_frame(stream: &mut TcpStream) -> std::io::Result<Option<Vec<u8>>> {
    quick_ack(stream);
    let mut len = [0u8; 2];
    match stream.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    quick_ack(stream);
    let mut buf = vec![0u8; usize::from(u16::from_be_bytes(len))];
    stream.read_exact(&mut buf)?;
    Ok(Some(buf))
}

fn write_frame(stream: &mut TcpStream, data: &[u8]) -> std::io::Result<()> {
    let len = u16::try_from(data.len())
        .map_err(|_| std::io::Error::other("answer longer than vpcd's frame"))?;
    let mut out = Vec::with_capacity(data.len().saturating_add(2));
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(data);
    stream.write_all(&out)
}

/// Whether a command APDU uses extended lengths (answered in full, up to 64 KiB); answers
/// to short commands longer than 256 bytes are chained with 61xx / GET RESPONSE.
fn is_extended(apdu: &[u8]) -> bool {
    matches!(apdu.get(4..), Some([0, _, _, ..]))
}

fn status_bytes(status: Status) -> [u8; 2] {
    status.into()
}

// ---------------------------------------------------------------------------------------
// The card.

struct Card<T: piv_authenticator::Client> {
    piv: Authenticator<T>,
    serial: u32,
    version: [u8; 3],
    verbose: bool,
    /// Data of a chained command received so far.
    chain: Option<Command<MAX_MSG>>,
    /// Rest of an answer that did not fit the short Le (for GET RESPONSE).
    pending: Vec<u8>,
    selected: bool,
    /// GET METADATA's records, when it is offered.
    metadata: Option<metadata::Metadata>,
}

impl<T: piv_authenticator::Client> Card<T> {
    /// Forget the session state a power cycle or reset clears: PIN verification, pending
    /// chains and the selection.
    fn reset(&mut self) {
        self.chain = None;
        self.pending.clear();
        if self.selected {
            self.forget_pin();
        }
        self.selected = false;
    }

    /// Clear the PIN's verification (VERIFY with P1=FF), as a YubiKey does on power-up and
    /// on every SELECT; piv-authenticator keeps it across SELECTs. (The management key's
    /// authentication is not cleared: piv-authenticator offers no command for that.)
    fn forget_pin(&mut self) {
        let logout = [0x00, 0x20, 0xFF, 0x80];
        if let Ok(view) = CommandView::try_from(&logout[..]) {
            let mut reply: HVec<u8, MAX_MSG> = HVec::new();
            let _ = self.piv.respond(view, reply.as_mut_view());
        }
    }

    fn answer(&mut self, apdu: &[u8]) -> Vec<u8> {
        if apdu.get(1) == Some(&INS_GET_RESPONSE) {
            if self.pending.is_empty() {
                return status_bytes(Status::ConditionsOfUseNotSatisfied).to_vec();
            }
            let rest = self.pending.split_off(self.pending.len().min(256));
            let data = std::mem::replace(&mut self.pending, rest);
            return self.finish(data, true);
        }
        self.pending.clear();
        let short = !is_extended(apdu);
        match self.process(apdu) {
            Ok(data) => self.finish(data, short),
            Err(status) => status_bytes(status).to_vec(),
        }
    }

    /// Append the status word; chain with 61xx what does not fit a short answer.
    fn finish(&mut self, mut data: Vec<u8>, short: bool) -> Vec<u8> {
        if short && data.len() > 256 {
            let mut rest = data.split_off(256);
            rest.append(&mut self.pending);
            self.pending = rest;
        }
        if self.pending.is_empty() {
            data.extend_from_slice(&[0x90, 0x00]);
        } else {
            let next = self.pending.len().min(256);
            data.extend_from_slice(&[0x61, (next & 0xFF) as u8]);
        }
        data
    }

    fn process(&mut self, apdu: &[u8]) -> Result<Vec<u8>, Status> {
        let view = CommandView::try_from(apdu).map_err(|_| Status::WrongLength)?;
        let ins: u8 = view.instruction().into();

        // Command chaining: collect until the last command of the chain.
        if view.class().chain().not_the_last() {
            let grown: Result<Command<MAX_MSG>, Status> = match self.chain.take() {
                None => view.to_owned().map_err(|_| Status::WrongLength),
                Some(mut chain) => chain
                    .extend_from_command_view(view)
                    .map(|()| chain)
                    .map_err(|_| Status::WrongLength),
            };
            // A chain that grows too long is dropped whole.
            self.chain = Some(grown?);
            return Ok(Vec::new());
        }
        let full: Option<Command<MAX_MSG>> = match self.chain.take() {
            Some(mut chain) => {
                chain
                    .extend_from_command_view(view)
                    .map_err(|_| Status::WrongLength)?;
                Some(chain)
            }
            None => None,
        };
        let view = match &full {
            Some(c) => c.as_view(),
            None => view,
        };

        match ins {
            INS_SELECT if view.p1 == 0x04 => {
                let aid = view.data();
                if aid.len() >= 5 && PIV_AID.starts_with(aid) {
                    let mut select = vec![0x00, INS_SELECT, 0x04, 0x00, PIV_AID.len() as u8];
                    select.extend_from_slice(&PIV_AID);
                    let sview =
                        CommandView::try_from(&select[..]).map_err(|_| Status::WrongLength)?;
                    let data = self.call(sview)?;
                    self.selected = true;
                    self.forget_pin();
                    Ok(data)
                } else {
                    self.selected = false;
                    Err(Status::NotFound)
                }
            }
            _ if !self.selected => Err(Status::ConditionsOfUseNotSatisfied),
            INS_GET_VERSION => Ok(self.version.to_vec()),
            INS_GET_SERIAL => Ok(self.serial.to_be_bytes().to_vec()),
            // piv-authenticator answers GET METADATA with nothing for most slots, which
            // ykcs11 takes as an empty slot: answer it here for the key slots, or say the
            // instruction is not supported, so clients fall back to the certificates.
            INS_GET_METADATA => match &self.metadata {
                None => Err(Status::InstructionNotSupportedOrInvalid),
                Some(m) => match m.answer(view.p2) {
                    Some(answer) => Ok(answer),
                    None if is_key_slot(view.p2) => Err(Status::KeyReferenceNotFound),
                    None => Err(Status::InstructionNotSupportedOrInvalid),
                },
            },
            INS_GENERATE => {
                let data = self.call(view)?;
                if let Some(m) = &mut self.metadata {
                    if let Err(e) = m.generated(view.p2, view.data(), &data) {
                        eprintln!("virtual-piv: metadata of slot {:02x}: {e}", view.p2);
                    }
                }
                Ok(data)
            }
            INS_IMPORT | INS_RESET => {
                let data = self.call(view)?;
                if let Some(m) = &mut self.metadata {
                    let kept = if ins == INS_RESET {
                        m.clear()
                    } else {
                        m.forget(view.p2)
                    };
                    if let Err(e) = kept {
                        eprintln!("virtual-piv: metadata: {e}");
                    }
                }
                Ok(data)
            }
            _ => self.call(view),
        }
    }

    fn call(&mut self, view: CommandView<'_>) -> Result<Vec<u8>, Status> {
        let mut reply: HVec<u8, MAX_MSG> = HVec::new();
        self.piv.respond(view, reply.as_mut_view())?;
        Ok(reply.to_vec())
    }
}

/// The PIV slots that hold asymmetric keys: 9A, 9C, 9D, 9E and the retired 82–95.
fn is_key_slot(slot: u8) -> bool {
    matches!(slot, 0x9A | 0x9C | 0x9D | 0x9E | 0x82..=0x95)
}

fn connect(addr: &str) -> Result<TcpStream, String> {
    // pcscd may load the driver a moment after it starts: retry for a bounded time.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match TcpStream::connect(addr) {
            Ok(s) => return Ok(s),
            Err(e) if Instant::now() >= deadline => {
                return Err(format!("cannot connect to vpcd at {addr}: {e}"))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

fn run<T: piv_authenticator::Client>(
    client: T,
    args: &Args,
    mut stream: TcpStream,
) -> Result<(), String> {
    let metadata = if args.metadata {
        let file = args.state.as_ref().map(|d| d.join("metadata.txt"));
        Some(metadata::Metadata::load(file.as_deref())?)
    } else {
        None
    };
    let options = Options::new().label(b"virtual-piv").url(b"");
    let mut card = Card {
        piv: Authenticator::new(client, options),
        serial: args.serial,
        version: args.version,
        verbose: args.verbose,
        chain: None,
        pending: Vec::new(),
        selected: false,
        metadata,
    };
    loop {
        let frame = match read_frame(&mut stream) {
            Ok(Some(f)) => f,
            Ok(None) => return Ok(()),
            Err(e) => return Err(format!("reading from vpcd: {e}")),
        };
        match frame.as_slice() {
            // power off, power on, reset
            [0] | [1] | [2] => card.reset(),
            // get ATR
            [4] => write_frame(&mut stream, &ATR).map_err(|e| format!("writing to vpcd: {e}"))?,
            [_] => {}
            apdu => {
                let answer = card.answer(apdu);
                if card.verbose {
                    eprintln!("> {}", hex(apdu));
                    eprintln!("< {}", hex(&answer));
                }
                write_frame(&mut stream, &answer).map_err(|e| format!("writing to vpcd: {e}"))?;
            }
        }
    }
}

/// trussed's virtual platform, but with a random number generator seeded from the OS
/// (`virt::with_platform` seeds it with a constant, so every card would make the same keys).
struct RandomPlatform<'a> {
    rng: ChaCha8Rng,
    store: virt::Store<'a>,
    ui: virt::UserInterface,
}

impl<'a> Platform for RandomPlatform<'a> {
    type R = ChaCha8Rng;
    type S = virt::Store<'a>;
    type UI = virt::UserInterface;

    fn rng(&mut self) -> &mut ChaCha8Rng {
        &mut self.rng
    }
    fn store(&self) -> virt::Store<'a> {
        self.store
    }
    fn user_interface(&mut self) -> &mut virt::UserInterface {
        &mut self.ui
    }
}

fn os_seed() -> std::io::Result<[u8; 32]> {
    let mut seed = [0u8; 32];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut seed)?;
    Ok(seed)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("virtual-piv: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let store = match &args.state {
        Some(dir) => {
            if let Err(e) = std::fs::create_dir_all(dir) {
                eprintln!("virtual-piv: cannot create {}: {e}", dir.display());
                return ExitCode::from(2);
            }
            StoreConfig {
                internal: StorageConfig::filesystem(dir.join("internal.bin")),
                external: StorageConfig::filesystem(dir.join("external.bin")),
                volatile: StorageConfig::ram(),
            }
        }
        None => StoreConfig::ram(),
    };
    let seed = match os_seed() {
        Ok(seed) => seed,
        Err(e) => {
            eprintln!("virtual-piv: reading /dev/urandom: {e}");
            return ExitCode::from(1);
        }
    };
    let stream = match connect(&format!("{}:{}", args.host, args.port)) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("virtual-piv: {e}");
            return ExitCode::from(1);
        }
    };
    let _ = stream.set_nodelay(true);
    let mut store = store;
    let result = store.with_store(|store| {
        let platform = RandomPlatform {
            rng: ChaCha8Rng::from_seed(seed),
            store,
            ui: virt::UserInterface::new(),
        };
        let channel = TrussedChannel::new();
        let Some((requester, responder)) = channel.split() else {
            return Err("trussed channel already split".to_string());
        };
        let mut runner = virt::Runner::new();
        runner.add_endpoint(responder, "piv", BACKENDS);
        let client: virt::Client<'_, Dispatcher> =
            virt::Client::new(requester, runner.syscall(), None);
        runner.run(platform, Dispatcher::default(), || {
            run(client, &args, stream)
        })
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("virtual-piv: {e}");
            ExitCode::from(1)
        }
    }
}
