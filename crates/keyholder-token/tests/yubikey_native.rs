//! The native YubiKey backend on the virtual PIV card (`testing/piv/up`,
//! which `testing/piv/install` makes possible; scripts/test runs both):
//! the calls Keyholder makes, the card shared with other programs while a
//! session is logged in, ykcs11 seeing the key made natively, and the card
//! going away.
//!
//! One test function: libpcsclite reads `PCSCLITE_CSOCK_NAME` once per
//! process, so one process talks to one card.

#![cfg(feature = "yubikey")]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use keyholder_token::{
    Backend, Error, KeyPurpose, Module, ObjectSelector, PivSlot, Selector, YubiKeyBackend,
};
use p256::ecdsa::signature::hazmat::PrehashVerifier;
use secrecy::SecretString;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Runs `command`, killed after `limit`.
fn run(mut command: Command, limit: Duration) -> Output {
    let mut child = command
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("starts");
    let deadline = Instant::now() + limit;
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{command:?} did not finish in {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("output")
}

/// The virtual card, stopped with `testing/piv/down` when dropped.
struct Card {
    dir: tempfile::TempDir,
    serial: String,
    down: bool,
}

impl Card {
    fn up() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut up = Command::new(repo().join("testing/piv/up"));
        up.arg(dir.path());
        let out = run(up, Duration::from_secs(120));
        assert!(
            out.status.success(),
            "testing/piv/up (run testing/piv/install first): {out:?}"
        );
        let env = std::fs::read_to_string(dir.path().join("token.env")).expect("token.env");
        let get = |key: &str| {
            env.lines()
                .find_map(|l| l.strip_prefix(&format!("{key}=")))
                .unwrap_or_else(|| panic!("no {key} in token.env"))
                .to_owned()
        };
        // SAFETY: set once, before any PC/SC call of this process, by its
        // only test.
        unsafe { std::env::set_var("PCSCLITE_CSOCK_NAME", get("ENV_PCSCLITE_CSOCK_NAME")) };
        Self {
            serial: get("SERIAL"),
            dir,
            down: false,
        }
    }

    fn down(&mut self) {
        let mut down = Command::new(repo().join("testing/piv/down"));
        down.arg(self.dir.path());
        let out = run(down, Duration::from_secs(60));
        assert!(out.status.success(), "testing/piv/down: {out:?}");
        self.down = true;
    }
}

impl Drop for Card {
    fn drop(&mut self) {
        if !self.down {
            let mut down = Command::new(repo().join("testing/piv/down"));
            down.arg(self.dir.path());
            let _ = run(down, Duration::from_secs(60));
        }
    }
}

fn secret(s: &str) -> SecretString {
    SecretString::from(s.to_owned())
}

const PIN: &str = "123456";
const MGM: &str = "010203040506070801020304050607080102030405060708";

/// A certificate stand-in: the native backend stores whatever DER the
/// caller makes, as long as it parses as X.509 (Keyholder's daemon makes a
/// real one with keyholder-pki); here `openssl` makes one over the key.
fn slot_certificate(dir: &Path, public: &p256::PublicKey) -> Result<Vec<u8>, String> {
    use p256::pkcs8::EncodePublicKey;
    let pem = public
        .to_public_key_pem(p256::pkcs8::LineEnding::LF)
        .map_err(|e| e.to_string())?;
    let n = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|e| e.to_string())?
        .as_nanos();
    let pubfile = dir.join(format!("{n}.pub"));
    let keyfile = dir.join(format!("{n}.key"));
    let certfile = dir.join(format!("{n}.der"));
    std::fs::write(&pubfile, pem).map_err(|e| e.to_string())?;
    let steps: [Vec<&str>; 2] = [
        vec![
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-out",
            keyfile.to_str().ok_or("path")?,
        ],
        vec![
            "x509",
            "-new",
            "-subj",
            "/CN=keyholder-vault",
            "-key",
            keyfile.to_str().ok_or("path")?,
            "-force_pubkey",
            pubfile.to_str().ok_or("path")?,
            "-days",
            "30",
            "-outform",
            "DER",
            "-out",
            certfile.to_str().ok_or("path")?,
        ],
    ];
    for args in steps {
        let out = Command::new("openssl")
            .args(&args)
            .output()
            .map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(format!("openssl {args:?}: {out:?}"));
        }
    }
    std::fs::read(&certfile).map_err(|e| e.to_string())
}

#[test]
fn native_backend_on_the_virtual_card() {
    let mut card = Card::up();
    let backend = YubiKeyBackend::new();

    // The card as a token, named as ykcs11 names it.
    let tokens = backend.tokens().expect("tokens");
    assert_eq!(tokens.len(), 1, "{tokens:?}");
    let token = &tokens[0];
    assert_eq!(token.label, format!("YubiKey PIV #{}", card.serial));
    assert_eq!(token.serial, card.serial);
    assert_eq!(token.manufacturer, "Yubico");
    assert_eq!(token.model, "YubiKey 5.2.7");
    assert!(!token.pin.count_low && !token.pin.locked, "{token:?}");
    let by_serial = backend
        .select(&Selector::serial(&card.serial))
        .expect("by serial");
    assert_eq!(&by_serial, token);
    assert_eq!(
        &backend.select(&Selector::any()).expect("the only one"),
        token
    );
    let err = backend
        .select(&Selector::serial("1"))
        .expect_err("no such card");
    assert!(matches!(err, Error::TokenNotFound { .. }), "{err}");

    // Wrong PINs are counted as the card counts them; the last try is
    // spent only on request.
    let mut session = backend.open(token).expect("session");
    match session.login(&secret("654321"), false) {
        Err(Error::PinIncorrect {
            count_low: true,
            final_try: false,
            ..
        }) => {}
        other => panic!("first wrong PIN: {other:?}"),
    }
    match session.login(&secret("654321"), false) {
        Err(Error::PinIncorrect {
            final_try: true, ..
        }) => {}
        other => panic!("second wrong PIN: {other:?}"),
    }
    let refused = session.login(&secret(PIN), false);
    assert!(
        matches!(refused, Err(Error::PinFinalTry { .. })),
        "{refused:?}"
    );
    session.login(&secret(PIN), true).expect("the right PIN");
    let fresh = backend.select(&Selector::any()).expect("token");
    assert!(!fresh.pin.count_low, "counter back at 3: {fresh:?}");

    // Keys only in slots; the management key is checked; a full slot is
    // never overwritten.
    let err = session
        .generate_p256("keyholder-vault", KeyPurpose::Derive)
        .expect_err("no slot");
    assert!(matches!(err, Error::Unsupported { .. }), "{err}");
    let certs = card.dir.path().join("certs");
    std::fs::create_dir(&certs).expect("dir");
    let certify = |public: &p256::PublicKey| slot_certificate(&certs, public);
    let err = session
        .generate_p256_in_piv_slot(
            "keyholder-vault",
            KeyPurpose::Derive,
            PivSlot::KEY_MANAGEMENT,
            &secret(&"11".repeat(24)),
            &secret(PIN),
            &certify,
        )
        .expect_err("wrong management key");
    assert!(matches!(err, Error::ManagementKeyIncorrect { .. }), "{err}");
    let key = session
        .generate_p256_in_piv_slot(
            "keyholder-vault",
            KeyPurpose::Derive,
            PivSlot::KEY_MANAGEMENT,
            &secret(MGM),
            &secret(PIN),
            &certify,
        )
        .expect("generated in 9d");
    assert_eq!(key.id, vec![0x03]);
    let err = session
        .generate_p256_in_piv_slot(
            "keyholder-vault",
            KeyPurpose::Derive,
            PivSlot::KEY_MANAGEMENT,
            &secret(MGM),
            &secret(PIN),
            &certify,
        )
        .expect_err("9d is taken");
    assert!(matches!(err, Error::SlotInUse { .. }), "{err}");
    assert_eq!(
        session
            .find_p256_keys(Some("keyholder-vault"))
            .expect("by label"),
        vec![key.clone()]
    );
    assert!(
        session
            .find_p256_keys(Some("other"))
            .expect("none")
            .is_empty()
    );
    assert_eq!(
        session.find_p256_keys(None).expect("all"),
        vec![key.clone()]
    );
    let object = |id: u8| ObjectSelector {
        label: None,
        id: Some(vec![id]),
    };
    assert_eq!(
        session.find_p256_derive_key(&object(0x03)).expect("9d"),
        key
    );
    let err = session
        .find_p256_derive_key(&object(0x05))
        .expect_err("82 is empty");
    assert!(err.to_string().contains("holds no P-256 key"), "{err}");

    // ECDH and ECDSA through the card, checked in software.
    let peer = p256::SecretKey::random(&mut rand::rngs::OsRng);
    let shared = session.ecdh(&key, &peer.public_key()).expect("ecdh");
    let expected = p256::ecdh::diffie_hellman(peer.to_nonzero_scalar(), key.public.as_affine());
    assert_eq!(shared.as_slice(), expected.raw_secret_bytes().as_slice());
    let signing = session
        .generate_p256_in_piv_slot(
            "signer",
            KeyPurpose::Sign,
            "9a".parse().expect("slot"),
            &secret(MGM),
            &secret(PIN),
            &certify,
        )
        .expect("generated in 9a");
    assert_eq!(
        session.find_p256_signing_key(&object(0x01)).expect("9a"),
        signing
    );
    let digest = [0x5au8; 32];
    let sig = session.sign_p256_digest(&signing, &digest).expect("sign");
    let sig = p256::ecdsa::Signature::from_slice(&sig).expect("r||s");
    p256::ecdsa::VerifyingKey::from(&signing.public)
        .verify_prehash(&digest, &sig)
        .expect("the card's signature verifies");

    // A key made in 9c by the card's own tool has its PIN policy "always":
    // refused at adoption.
    let out = Command::new("yubico-piv-tool")
        .args([
            "-a",
            "generate",
            "-s",
            "9c",
            "-A",
            "ECCP256",
            &format!("-k{MGM}"),
        ])
        .output()
        .expect("yubico-piv-tool");
    assert!(out.status.success(), "{out:?}");
    let err = session
        .find_p256_signing_key(&object(0x02))
        .expect_err("9c wants the PIN each time");
    assert!(err.to_string().contains("\"always\""), "{err}");

    // No rollback record on a PIV card.
    let err = session.store_generation("g", 1).expect_err("no objects");
    assert!(matches!(err, Error::Unsupported { .. }), "{err}");
    assert!(session.read_generation("g").is_err());

    // The card is shared: another program uses it while the session is
    // logged in, and the session's next call still works.
    let status = Command::new("yubico-piv-tool")
        .args(["-a", "status"])
        .output()
        .expect("yubico-piv-tool");
    assert!(status.status.success(), "{status:?}");
    assert!(
        String::from_utf8_lossy(&status.stdout).contains(&card.serial),
        "{status:?}"
    );
    let again = session.ecdh(&key, &peer.public_key()).expect("ecdh after");
    assert_eq!(again.as_slice(), shared.as_slice());
    session.check_present().expect("present");

    // ykcs11 shows the key generated natively, under the same id.
    let module = Module::load(Path::new("/usr/lib/x86_64-linux-gnu/libykcs11.so")).expect("ykcs11");
    let ytoken = module
        .select(&Selector::serial(&card.serial))
        .expect("ykcs11 token");
    assert_eq!(ytoken.label, token.label, "the same label both ways");
    let ysession = module.open(&ytoken).expect("ykcs11 session");
    let ykeys = ysession.find_p256_keys(None).expect("ykcs11 keys");
    assert!(ykeys.contains(&key), "{ykeys:?}");
    ysession.close();

    // The card goes away: the session says so.
    card.down();
    let err = session.check_present().expect_err("gone");
    assert!(matches!(err, Error::TokenRemoved(_)), "{err}");
    let err = session.ecdh(&key, &peer.public_key()).expect_err("gone");
    assert!(matches!(err, Error::TokenRemoved(_)), "{err}");
    session.close();
}
