//! Core figures: unlock time of a 10,000-secret vault (with and without the
//! token operations), `secret get` latency through gRPC and through the CLI,
//! and the daemon's resident memory.
//!
//! Run: `cargo bench --bench core` (release build, SoftHSM2 token in a temp dir).

mod common;
#[path = "../tests/e2e/util.rs"]
#[allow(dead_code)]
mod util;

use std::cell::Cell;
use std::time::{Duration, Instant};

use common::{Run, connect, timed_unlocks};
use keyholder_proto::v1;
use keyholder_vault::{KeyAgreement, OpenVault, SecretEntry, Storage};
use secrecy::SecretString;
use util::{Env, MODULE, PIN};

const SECRETS: usize = 10_000;
const UNLOCK_ROUNDS: usize = 20;
const GRPC_GETS: usize = 5_000;
const CLI_GETS: usize = 100;

/// Forwards to the token and accounts the time spent in it.
struct Timed<'a> {
    inner: keyholder_vault::TokenAgreement<'a>,
    spent: Cell<Duration>,
}

impl KeyAgreement for Timed<'_> {
    fn public_key(&self) -> p256::PublicKey {
        self.inner.public_key()
    }
    fn agree(
        &self,
        peer: &p256::PublicKey,
    ) -> Result<zeroize::Zeroizing<[u8; 32]>, keyholder_token::Error> {
        let t = Instant::now();
        let r = self.inner.agree(peer);
        self.spent.set(self.spent.get() + t.elapsed());
        r
    }
}

fn summary(name: &str, samples: Vec<Duration>) {
    let run = Run::new(samples, Duration::ZERO);
    println!(
        "{name:<44} n={:<5} p50={:>9.3} ms  p99={:>9.3} ms  mean={:>9.3} ms",
        run.ops,
        run.pct(0.5),
        run.pct(0.99),
        run.mean()
    );
}

/// Fills the vault with SECRETS secrets through the library (the daemon is
/// stopped, so the bench owns the vault), and times opening it in-process.
fn fill_and_time_open(env: &Env) {
    let module = keyholder_token::Module::load(std::path::Path::new(MODULE)).expect("module");
    let token = module
        .select(&keyholder_token::Selector::label("ops"))
        .expect("token");
    let mut session = module.open(&token).expect("session");
    let pin = SecretString::from(PIN.to_owned());
    session.login(&pin, false).expect("login");
    let key = session
        .find_p256_keys(Some("keyholder-vault"))
        .expect("keys")
        .pop()
        .expect("a Keyholder key");
    let storage = keyholder_vault::FileStorage::open(&env.vault).expect("storage");
    let (bytes, rev) = storage.load().expect("load").expect("vault exists");
    let agreement = keyholder_vault::TokenAgreement {
        session: &session,
        key: &key,
    };
    let vault = OpenVault::open(&bytes, &agreement).expect("open");
    let mut body = vault.body.clone();
    let now = "2026-11-21T00:00:00Z";
    for i in 0..SECRETS {
        let value = format!("secret-value-{i:08}-{}", "x".repeat(24));
        body.secrets.insert(
            format!("team/service-{:03}/secret-{i:05}", i % 500),
            SecretEntry::new(value.as_bytes(), now),
        );
    }
    let sealed = vault.next(&mut body).expect("seal");
    storage
        .compare_and_store(Some(&rev), &sealed, body.generation)
        .expect("store");
    println!(
        "vault with {SECRETS} secrets: {} bytes on disk",
        sealed.len()
    );

    let mut total = Vec::new();
    let mut without_token = Vec::new();
    for _ in 0..UNLOCK_ROUNDS {
        let timed = Timed {
            inner: keyholder_vault::TokenAgreement {
                session: &session,
                key: &key,
            },
            spent: Cell::new(Duration::ZERO),
        };
        let t = Instant::now();
        let opened = OpenVault::open(&sealed, &timed).expect("open");
        let elapsed = t.elapsed();
        assert_eq!(opened.body.secrets.len(), SECRETS);
        total.push(elapsed);
        without_token.push(elapsed - timed.spent.get());
    }
    summary("open 10k vault in-process, token ops included", total);
    summary(
        "open 10k vault in-process, token ops excluded",
        without_token,
    );
    session.close();
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let env = Env::new();
    // SoftHSM2 reads its config path from this process's environment for the
    // in-process part; set before the runtime or any other thread starts.
    // SAFETY: single-threaded at this point.
    unsafe { std::env::set_var("SOFTHSM2_CONF", &env.softhsm_conf) };
    {
        let _daemon = env.start_daemon(&[]);
        env.init();
    }
    fill_and_time_open(&env);

    let daemon = env.start_daemon(&[]);
    std::thread::sleep(Duration::from_millis(300));
    println!(
        "keyholderd RSS, locked, before any unlock: {} KiB",
        daemon.rss_kib()
    );

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let channel = connect(env.socket()).await;
        let mut session = v1::session_client::SessionClient::new(channel.clone());
        let mut secrets = v1::secrets_client::SecretsClient::new(channel);
        let unlocks = timed_unlocks(&mut session, PIN, UNLOCK_ROUNDS).await;
        summary("gRPC Unlock of 10k vault (login + 2 ECDH)", unlocks);
        let mut gets = Vec::with_capacity(GRPC_GETS);
        for i in 0..GRPC_GETS {
            let name = format!(
                "team/service-{:03}/secret-{:05}",
                (i * 7) % 500,
                (i * 7) % SECRETS
            );
            let t = Instant::now();
            let r = secrets
                .get(v1::GetSecretRequest { name, version: 0 })
                .await
                .expect("get");
            gets.push(t.elapsed());
            assert!(!r.into_inner().value.is_empty());
        }
        summary("gRPC Secrets.Get, one client, sequential", gets);
    });
    let mut cli = Vec::with_capacity(CLI_GETS);
    for i in 0..CLI_GETS {
        let name = format!("team/service-{:03}/secret-{:05}", i % 500, i);
        let t = Instant::now();
        let out = env.cli(&["secret", "get", &name]);
        cli.push(t.elapsed());
        assert!(out.status.success());
    }
    summary("`keyholder secret get` (process per call)", cli);
    std::thread::sleep(Duration::from_millis(300));
    println!(
        "keyholderd RSS, unlocked with 10k secrets, idle: {} KiB",
        daemon.rss_kib()
    );
    drop(daemon);
}
