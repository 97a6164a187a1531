//! Unlock cost per token: for each PKCS#11 implementation of the token
//! matrix (tests/e2e/matrix.rs), the gRPC `Unlock` time of a vault holding
//! 10,000 secrets, and the PKCS#11 calls one unlock makes, against the
//! minimum the design needs.
//!
//! Run: `cargo build --release -p keyholder-pkcs11-fault && cargo bench
//! --bench unlock`. `BENCH_TOKENS=softhsm2,nss,tpm2,piv,piv-native` picks
//! the tokens (default: SoftHSM2, NSS softokn, and each stack whose
//! `testing/<name>/up` exists); a stack without its `up` script is skipped
//! with a note. `piv-native` is the virtual PIV card reached by keyholderd's
//! native YubiKey backend (`--token-backend yubikey`) instead of ykcs11: its
//! vault is filled through ykcs11 (the same key), and instead of PKCS#11
//! calls the card's commands (APDUs) per unlock are counted from the card's
//! own log (`PIV_VERBOSE=1`), by instruction.
//! `BENCH_UNLOCK_ROUNDS` sets the timed unlocks per token (default 20).
//!
//! Per token: `init`, then the vault is filled with 10,000 secrets in one
//! write by a child process of this benchmark that opens it through the
//! libraries on the same token (the daemon stopped; the child gets the
//! token stack's environment), since `Secrets.Put` rewrites the vault on
//! every call. Then:
//! - time: keyholderd on the real module; one unlock and lock not timed
//!   (the first unlock after the fill moves the token's rollback record up),
//!   then N timed gRPC `Unlock` calls, each followed by an untimed `Lock`.
//!   The time is the client's round trip: finding the token, login, two
//!   ECDH on the token, reading the rollback record, decrypting, checking
//!   the MAC and parsing 10,000 secrets.
//! - calls: keyholderd again, on testing/pkcs11-fault in counting mode
//!   forwarding to the real module (`KEYHOLDER_FAULT_MODULE`,
//!   `KEYHOLDER_COUNT_FILE`); after one untimed unlock and lock, the calls
//!   made during each of three unlocks are counted (the fewest taken, so a
//!   token-presence poll that falls into the window does not count).

mod common;
#[path = "../tests/e2e/util.rs"]
#[allow(dead_code)]
mod util;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{Run, connect, timed_unlocks};
use keyholder_proto::v1;
use keyholder_vault::{OpenVault, SecretEntry, Storage};
use secrecy::SecretString;
use util::{Env, NSS_LABEL, NSS_SOFTOKN, Stack};

const SECRETS: usize = 10_000;
const DEFAULT_ROUNDS: usize = 20;
const COUNTED_UNLOCKS: usize = 3;

/// The PKCS#11 calls the design needs per unlock, with the rollback record
/// on the token and without: the token list (one `C_GetSlotList`, one
/// `C_GetTokenInfo`, whose PIN flags the login check can use), one session,
/// one login, one search for the public key the stanza names (its
/// `CKA_ID` and `CKA_EC_POINT` read in one call), one for the private key
/// handle, the two ECDH derives (each derived value read and its session
/// object destroyed), and one search and one read for the rollback record.
/// Variable-length reads count once: a caller that knows the size (a
/// 65-byte point, a 32-byte secret, an 8-byte record) needs no length query.
const MINIMUM: [(&str, usize, usize); 12] = [
    ("C_GetSlotList", 1, 1),
    ("C_GetTokenInfo", 1, 1),
    ("C_OpenSession", 1, 1),
    ("C_Login", 1, 1),
    ("C_FindObjectsInit", 3, 2),
    ("C_FindObjects", 3, 2),
    ("C_FindObjectsFinal", 3, 2),
    ("C_GetAttributeValue", 4, 3),
    ("C_DeriveKey", 2, 2),
    ("C_DestroyObject", 2, 2),
    ("C_CreateObject", 0, 0),
    ("C_Logout", 0, 0),
];

/// Every function the counting module reports, in the order shown.
const FUNCTIONS: [&str; 18] = [
    "C_GetSlotList",
    "C_GetTokenInfo",
    "C_OpenSession",
    "C_CloseSession",
    "C_GetSessionInfo",
    "C_Login",
    "C_Logout",
    "C_FindObjectsInit",
    "C_FindObjects",
    "C_FindObjectsFinal",
    "C_GetAttributeValue",
    "C_SetAttributeValue",
    "C_CreateObject",
    "C_DestroyObject",
    "C_DeriveKey",
    "C_SignInit",
    "C_Sign",
    "C_GenerateKeyPair",
];

/// One token of the matrix, set up for the benchmark.
struct Token {
    /// First, so that it is dropped first: `testing/<name>/down` and the
    /// PIDs it kills live in the stack's directory inside `env`'s temp dir,
    /// which goes when `env` drops.
    _stack: Option<Stack>,
    name: &'static str,
    env: Env,
    /// `--pkcs11-init-args`, for the in-process fill.
    init_args: Option<String>,
    rollback: bool,
    /// The module the fill goes through, when not `env.module` (the
    /// native backend has none; ykcs11 reaches the same key).
    fill_module: Option<PathBuf>,
    /// The virtual card's APDU log, to count commands per unlock instead of
    /// PKCS#11 calls.
    apdu_log: Option<PathBuf>,
}

fn softhsm2() -> Token {
    Token {
        name: "SoftHSM2",
        env: Env::new(),
        init_args: None,
        rollback: true,
        fill_module: None,
        apdu_log: None,
        _stack: None,
    }
}

fn nss() -> Token {
    let mut env = Env::new();
    env.module = NSS_SOFTOKN.into();
    env.label = NSS_LABEL.to_owned();
    let args = env.nss_db();
    env.daemon_args = vec!["--pkcs11-init-args".to_owned(), args.clone()];
    env.init_args = vec!["--without-rollback-protection".to_owned()];
    Token {
        name: "NSS softokn",
        env,
        init_args: Some(args),
        rollback: false,
        fill_module: None,
        apdu_log: None,
        _stack: None,
    }
}

fn tpm2() -> Token {
    let mut env = Env::new();
    let stack = Stack::up("tpm2", &env.path().join("tpm2"));
    stack.configure(&mut env);
    Token {
        name: "tpm2-pkcs11 (swtpm)",
        env,
        init_args: None,
        rollback: true,
        fill_module: None,
        apdu_log: None,
        _stack: Some(stack),
    }
}

fn piv() -> Token {
    let mut env = Env::new();
    let stack = Stack::up("piv", &env.path().join("piv"));
    stack.configure(&mut env);
    let so_pin = stack
        .settings
        .get("SO_PIN")
        .expect("testing/piv/up wrote no SO_PIN");
    let key_file = env.file("management-key", &format!("{so_pin}\n"));
    env.init_args = vec![
        "--piv-slot".to_owned(),
        "9d".to_owned(),
        "--management-key-file".to_owned(),
        key_file.to_str().expect("utf8").to_owned(),
        "--without-rollback-protection".to_owned(),
    ];
    Token {
        name: "ykcs11 (virtual PIV)",
        env,
        init_args: None,
        rollback: false,
        fill_module: None,
        apdu_log: None,
        _stack: Some(stack),
    }
}

fn piv_native() -> Token {
    let mut env = Env::new();
    let dir = env.path().join("piv");
    let stack = Stack::up_with("piv", &dir, &[("PIV_VERBOSE", "1")]);
    stack.configure(&mut env);
    let so_pin = stack
        .settings
        .get("SO_PIN")
        .expect("testing/piv/up wrote no SO_PIN");
    let key_file = env.file("management-key", &format!("{so_pin}\n"));
    env.init_args = vec![
        "--piv-slot".to_owned(),
        "9d".to_owned(),
        "--management-key-file".to_owned(),
        key_file.to_str().expect("utf8").to_owned(),
        "--allow-default-management-key".to_owned(),
        "--without-rollback-protection".to_owned(),
    ];
    let ykcs11 = std::mem::take(&mut env.module);
    env.daemon_args = vec!["--token-backend".to_owned(), "yubikey".to_owned()];
    Token {
        name: "native (virtual PIV)",
        env,
        init_args: None,
        rollback: false,
        fill_module: Some(ykcs11),
        apdu_log: Some(dir.join("card.log")),
        _stack: Some(stack),
    }
}

fn up_script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("testing")
        .join(name)
        .join("up")
}

/// The token named `name`, or why it is skipped.
fn make(name: &str) -> Result<Token, String> {
    match name {
        "softhsm2" => Ok(softhsm2()),
        "nss" if !Path::new(NSS_SOFTOKN).exists() => Err(format!("{NSS_SOFTOKN} is missing")),
        "nss" => Ok(nss()),
        "tpm2" | "piv" | "piv-native" if !up_script(name.trim_end_matches("-native")).exists() => {
            Err(format!("testing/{name}/up is missing"))
        }
        "tpm2" => Ok(tpm2()),
        "piv" => Ok(piv()),
        "piv-native" => Ok(piv_native()),
        other => Err(format!(
            "unknown token {other:?} (softhsm2, nss, tpm2, piv, piv-native)"
        )),
    }
}

fn secret_name(i: usize) -> String {
    format!("team/service-{:03}/secret-{i:06}", i % 500)
}

/// The child's part: opens the vault on the token with the PIN and writes
/// it back with `SECRETS` secrets added, in one generation.
/// Arguments: VAULT MODULE LABEL PIN_FILE [INIT_ARGS].
fn fill_child(args: &[String]) {
    let [vault_path, module, label, pin_file, rest @ ..] = args else {
        panic!("--fill VAULT MODULE LABEL PIN_FILE [INIT_ARGS]");
    };
    let module = keyholder_token::Module::load_with_args(
        Path::new(module),
        rest.first().map(String::as_str),
    )
    .expect("module");
    let token = module
        .select(&keyholder_token::Selector::label(label.as_str()))
        .expect("token");
    let mut session = module.open(&token).expect("session");
    let pin = std::fs::read_to_string(pin_file).expect("pin file");
    session
        .login(&SecretString::from(pin.trim().to_owned()), false)
        .expect("login");
    let storage = keyholder_vault::FileStorage::open(Path::new(vault_path)).expect("storage");
    let (bytes, rev) = storage.load().expect("load").expect("vault exists");
    // The vault key may carry another tool's label (a PIV slot's key), so
    // every P-256 key on the token is tried.
    let keys = session.find_p256_keys(None).expect("keys");
    let mut vault = keys
        .iter()
        .find_map(|key| {
            OpenVault::open(
                &bytes,
                &keyholder_vault::TokenAgreement {
                    session: &session,
                    key,
                },
            )
            .ok()
        })
        .expect("a key on the token opens the vault");
    let mut body = vault.body.clone();
    let now = "2026-12-03T00:00:00Z";
    for i in 0..SECRETS {
        let value = format!("secret-value-{i:08}-{}", "x".repeat(24));
        body.secrets
            .insert(secret_name(i), SecretEntry::new(value.as_bytes(), now));
    }
    let sealed = vault.next(&mut body).expect("seal");
    storage
        .compare_and_store(Some(&rev), &sealed, body.generation)
        .expect("store");
    vault.body = body;
    println!("  vault file: {} bytes", sealed.len());
    session.close();
}

/// Runs the fill in a child process with the token's environment.
fn fill(token: &Token) {
    let env = &token.env;
    let exe = std::env::current_exe().expect("own path");
    let mut child = env.command(exe.to_str().expect("utf8"));
    child
        .arg("--fill")
        .arg(&env.vault)
        .arg(token.fill_module.as_ref().unwrap_or(&env.module))
        .arg(&env.label)
        .arg(&env.pin_file);
    if let Some(args) = &token.init_args {
        child.arg(args);
    }
    let out = util::output_within(child, Duration::from_secs(300)).expect("fill within 300 s");
    print!("{}", String::from_utf8_lossy(&out.stdout));
    assert!(
        out.status.success(),
        "fill: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

struct Measured {
    name: &'static str,
    rollback: bool,
    run: Run,
    /// Calls per unlock by function; `None` when not counted.
    calls: Option<BTreeMap<String, usize>>,
    /// Card commands per unlock by instruction (native backend).
    apdus: Option<BTreeMap<String, usize>>,
}

/// PIV instruction names, by INS byte, for the APDU count.
fn instruction(ins: &str) -> String {
    match ins {
        "a4" => "SELECT",
        "fd" => "GET VERSION",
        "f8" => "GET SERIAL",
        "f7" => "GET METADATA",
        "20" => "VERIFY (PIN)",
        "87" => "GENERAL AUTHENTICATE (ECDH)",
        "cb" => "GET DATA",
        "c0" => "GET RESPONSE",
        other => return format!("INS {other}"),
    }
    .to_owned()
}

/// The commands (lines "> APDU" of the card's log) after line `from`.
fn apdus_since(log: &Path, from: usize) -> (usize, BTreeMap<String, usize>) {
    let lines = lines(log);
    let mut counts = BTreeMap::new();
    for apdu in lines
        .get(from..)
        .unwrap_or_default()
        .iter()
        .filter_map(|l| l.strip_prefix("> "))
    {
        let ins = apdu.get(2..4).unwrap_or("??").to_ascii_lowercase();
        *counts.entry(instruction(&ins)).or_insert(0) += 1;
    }
    (lines.len(), counts)
}

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

fn fault_module() -> PathBuf {
    Path::new(util::keyholder_bin())
        .parent()
        .expect("target dir")
        .join("libkeyholder_pkcs11_fault.so")
}

fn one_token(mut token: Token, rounds: usize) -> Measured {
    println!("{}", token.name);
    {
        let _daemon = token.env.start_daemon(&[]);
        token.env.init();
    }
    fill(&token);
    let pin = std::fs::read_to_string(&token.env.pin_file).expect("pin file");
    let pin = pin.trim().to_owned();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");

    let daemon = token.env.start_daemon(&[]);
    let run = runtime.block_on(async {
        let mut session = v1::session_client::SessionClient::new(connect(token.env.socket()).await);
        // The first unlock after the fill moves the rollback record up.
        timed_unlocks(&mut session, &pin, 0).await;
        session.lock(v1::LockRequest {}).await.expect("lock");
        let times = timed_unlocks(&mut session, &pin, rounds).await;
        session.lock(v1::LockRequest {}).await.expect("lock");
        Run::new(times, Duration::ZERO)
    });
    drop(daemon);
    println!(
        "  gRPC Unlock, {SECRETS} secrets: n={} p50={:.1} ms min={:.1} ms",
        run.ops,
        run.pct(0.5),
        run.pct(0.0)
    );

    if let Some(log) = token.apdu_log.clone() {
        let daemon = token.env.start_daemon(&[]);
        let apdus = runtime.block_on(async {
            let mut session =
                v1::session_client::SessionClient::new(connect(token.env.socket()).await);
            let unlock = || v1::UnlockRequest {
                pin: pin.clone(),
                ..Default::default()
            };
            session.unlock(unlock()).await.expect("unlock");
            session.lock(v1::LockRequest {}).await.expect("lock");
            let mut fewest: Option<BTreeMap<String, usize>> = None;
            for _ in 0..COUNTED_UNLOCKS {
                let (before, _) = apdus_since(&log, usize::MAX);
                session.unlock(unlock()).await.expect("unlock");
                let (_, counts) = apdus_since(&log, before);
                session.lock(v1::LockRequest {}).await.expect("lock");
                let total = |c: &BTreeMap<String, usize>| c.values().sum::<usize>();
                if fewest.as_ref().is_none_or(|f| total(&counts) < total(f)) {
                    fewest = Some(counts);
                }
            }
            fewest.unwrap_or_default()
        });
        drop(daemon);
        return Measured {
            name: token.name,
            rollback: token.rollback,
            run,
            calls: None,
            apdus: Some(apdus),
        };
    }
    let module = fault_module();
    let calls = if module.exists() {
        let count_file = token.env.path().join("pkcs11-calls");
        let real = token.env.module.clone();
        token.env.module = module;
        token.env.token_env.extend([
            (
                "KEYHOLDER_FAULT_MODULE".to_owned(),
                real.to_str().expect("utf8").to_owned(),
            ),
            (
                "KEYHOLDER_COUNT_FILE".to_owned(),
                count_file.to_str().expect("utf8").to_owned(),
            ),
        ]);
        let daemon = token.env.start_daemon(&[]);
        let counts = runtime.block_on(async {
            let mut session =
                v1::session_client::SessionClient::new(connect(token.env.socket()).await);
            let unlock = || v1::UnlockRequest {
                pin: pin.clone(),
                ..Default::default()
            };
            session.unlock(unlock()).await.expect("unlock");
            session.lock(v1::LockRequest {}).await.expect("lock");
            let mut fewest: Option<BTreeMap<String, usize>> = None;
            for _ in 0..COUNTED_UNLOCKS {
                let before = lines(&count_file).len();
                session.unlock(unlock()).await.expect("unlock");
                let after = lines(&count_file);
                session.lock(v1::LockRequest {}).await.expect("lock");
                let mut counts = BTreeMap::new();
                for name in after.get(before..).unwrap_or_default() {
                    *counts.entry(name.clone()).or_insert(0) += 1;
                }
                let total = |c: &BTreeMap<String, usize>| c.values().sum::<usize>();
                if fewest.as_ref().is_none_or(|f| total(&counts) < total(f)) {
                    fewest = Some(counts);
                }
            }
            fewest.unwrap_or_default()
        });
        drop(daemon);
        Some(counts)
    } else {
        println!(
            "  note: {} is missing, calls not counted (cargo build --release -p keyholder-pkcs11-fault)",
            module.display()
        );
        None
    };
    Measured {
        name: token.name,
        rollback: token.rollback,
        run,
        calls,
        apdus: None,
    }
}

fn report(results: &[Measured]) {
    println!();
    println!(
        "Unlock of a vault with {SECRETS} secrets, gRPC round trip, and PKCS#11 calls per unlock"
    );
    print!("{:<22}", "");
    for r in results {
        print!(" | {:>20}", r.name);
    }
    println!(" | minimum (record on/off)");
    let row = |label: &str, cell: &dyn Fn(&Measured) -> String, min: &str| {
        print!("{label:<22}");
        for r in results {
            print!(" | {:>20}", cell(r));
        }
        println!(" | {min}");
    };
    row("unlock p50 ms", &|r| format!("{:.1}", r.run.pct(0.5)), "");
    row("unlock min ms", &|r| format!("{:.1}", r.run.pct(0.0)), "");
    row("unlocks timed", &|r| r.run.ops.to_string(), "");
    row(
        "rollback record",
        &|r| if r.rollback { "on" } else { "off" }.to_owned(),
        "",
    );
    let count = |r: &Measured, f: &str| {
        r.calls
            .as_ref()
            .map(|c| c.get(f).copied().unwrap_or(0).to_string())
            .unwrap_or_else(|| "-".to_owned())
    };
    for f in FUNCTIONS {
        let min = MINIMUM
            .iter()
            .find(|(name, ..)| *name == f)
            .map(|(_, on, off)| format!("{on}/{off}"))
            .unwrap_or_else(|| "0/0".to_owned());
        row(f, &|r| count(r, f), &min);
    }
    let total_min = |rollback: bool| -> usize {
        MINIMUM
            .iter()
            .map(|(_, on, off)| if rollback { on } else { off })
            .sum()
    };
    row(
        "total calls",
        &|r| {
            r.calls
                .as_ref()
                .map(|c| c.values().sum::<usize>().to_string())
                .unwrap_or_else(|| "-".to_owned())
        },
        &format!("{}/{}", total_min(true), total_min(false)),
    );
    println!();
    println!(
        "minimum: what the design needs per unlock (docs/vault-format.md): the token list \
         (1 C_GetSlotList, 1 C_GetTokenInfo whose PIN flags serve the login check), 1 session, \
         1 C_Login, 1 search for the stanza's public key (CKA_ID and CKA_EC_POINT in one read), \
         1 search for its private key, 2 C_DeriveKey (the p256tag stanza and the MAC key), each \
         derived value read once and destroyed, and with the rollback record on, 1 search and \
         1 read for it; a read of a value of known size needs no length query"
    );
    for r in results {
        let Some(calls) = &r.calls else { continue };
        let extra: Vec<String> = FUNCTIONS
            .iter()
            .filter_map(|f| {
                let min = MINIMUM
                    .iter()
                    .find(|(name, ..)| name == f)
                    .map(|(_, on, off)| if r.rollback { *on } else { *off })
                    .unwrap_or(0);
                let n = calls.get(*f).copied().unwrap_or(0);
                (n > min).then(|| format!("{f} +{}", n - min))
            })
            .collect();
        if extra.is_empty() {
            println!("{}: no calls beyond the minimum", r.name);
        } else {
            println!("{}: beyond the minimum: {}", r.name, extra.join(", "));
        }
    }
    for r in results {
        let Some(apdus) = &r.apdus else { continue };
        let list: Vec<String> = apdus.iter().map(|(i, n)| format!("{i} {n}")).collect();
        println!(
            "{}: {} card commands (APDUs) per unlock: {}",
            r.name,
            apdus.values().sum::<usize>(),
            list.join(", ")
        );
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(at) = args.iter().position(|a| a == "--fill") {
        fill_child(&args[at + 1..]);
        return;
    }
    if args.iter().any(|a| a == "--list") {
        return;
    }
    let names: Vec<String> = match std::env::var("BENCH_TOKENS") {
        Ok(s) => s.split(',').map(|n| n.trim().to_owned()).collect(),
        Err(_) => ["softhsm2", "nss", "tpm2", "piv", "piv-native"]
            .into_iter()
            .filter(|n| {
                !matches!(*n, "tpm2" | "piv" | "piv-native")
                    || up_script(n.trim_end_matches("-native")).exists()
            })
            .map(str::to_owned)
            .collect(),
    };
    let rounds = std::env::var("BENCH_UNLOCK_ROUNDS")
        .ok()
        .map(|n| n.parse().expect("BENCH_UNLOCK_ROUNDS: a number"))
        .unwrap_or(DEFAULT_ROUNDS);
    let mut results = Vec::new();
    for name in &names {
        match make(name) {
            Ok(token) => results.push(one_token(token, rounds)),
            Err(why) => println!("{name}: skipped: {why}"),
        }
    }
    report(&results);
}
