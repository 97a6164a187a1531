//! Init's enrollment of a PIV key, through the daemon's core: a token that
//! answers like a YubiKey reached natively (the software token, with the
//! slot, policies, origin and attestation certificates a test CA made in
//! Yubico's shape) is enrolled as attested, refused as imported or as not
//! verifying, and its record is kept in the vault and read back at unlock.

use std::sync::Arc;

use keyholder_daemon::Core;
use keyholder_daemon::config::Config;
use keyholder_daemon::core::{Enrollment, NewVaultKey};
use keyholder_daemon::error::Error;
use keyholder_token::software::SoftwareToken;
use keyholder_token::{
    Backend, KeyPurpose, ObjectSelector, PivKeyFacts, PivKeyOrigin, PivSlot, Result as TokenResult,
    Selector, Session, SlotCertifier, TokenDescription, TokenKey,
};
use p256::elliptic_curve::sec1::ToEncodedPoint;
use rcgen::{
    BasicConstraints, CertificateParams, CustomExtension, DnType, IsCa, Issuer, KeyPair,
    PKCS_ECDSA_P256_SHA256,
};
use secrecy::SecretString;
use zeroize::Zeroizing;

mod common;
use common::MemoryStorage;

const PIN: &str = "123456";
const SERIAL: &str = "12345678";

/// A test attestation CA and card (f9) certificate, as Yubico's chain.
struct TestCa {
    root_pem: String,
    card_der: Vec<u8>,
    card_params: CertificateParams,
    card_key: KeyPair,
}

fn ca(cn: &str) -> CertificateParams {
    let mut p = CertificateParams::default();
    p.distinguished_name.push(DnType::CommonName, cn);
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p
}

fn test_ca() -> TestCa {
    let root_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("key");
    let root_params = ca("Test PIV Root");
    let root = root_params.self_signed(&root_key).expect("root");
    let card_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("key");
    let card_params = ca("Yubico PIV Attestation");
    let issuer = Issuer::from_params(&root_params, &root_key);
    let card = card_params.signed_by(&card_key, &issuer).expect("card");
    TestCa {
        root_pem: root.pem(),
        card_der: card.der().to_vec(),
        card_params,
        card_key,
    }
}

/// The card's attestation of `public` in slot 9d: serial 12345678,
/// firmware 5.4.3, PIN once, touch cached, USB-C keychain.
fn attest(ca: &TestCa, public: &p256::PublicKey) -> Vec<u8> {
    // SubjectPublicKeyInfo of a P-256 point: the fixed prefix, then the point.
    let mut spki = hex_bytes("3059301306072a8648ce3d020106082a8648ce3d030107034200");
    spki.extend_from_slice(public.to_encoded_point(false).as_bytes());
    let spki = rcgen::SubjectPublicKeyInfo::from_der(&spki).expect("spki");
    let mut p = CertificateParams::default();
    p.distinguished_name
        .push(DnType::CommonName, "YubiKey PIV Attestation 9d");
    let ext = |arc: u64, value: Vec<u8>| {
        CustomExtension::from_oid_content(&[1, 3, 6, 1, 4, 1, 41482, 3, arc], value)
    };
    p.custom_extensions = vec![
        ext(3, vec![5, 4, 3]),
        ext(7, vec![0x02, 0x04, 0x00, 0xbc, 0x61, 0x4e]),
        ext(8, vec![2, 3]),
        ext(9, vec![3]),
    ];
    let issuer = Issuer::from_params(&ca.card_params, &ca.card_key);
    p.signed_by(&spki, &issuer).expect("slot").der().to_vec()
}

fn hex_bytes(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect()
}

/// What the card says about a key: built from its public key.
type Facts = Arc<dyn Fn(&TokenKey) -> PivKeyFacts + Send + Sync>;

/// The software token, answering like a YubiKey reached natively.
struct Card {
    inner: SoftwareToken,
    facts: Facts,
}

impl Backend for Card {
    fn tokens(&self) -> TokenResult<Vec<TokenDescription>> {
        self.inner.tokens()
    }
    fn select(&self, selector: &Selector) -> TokenResult<TokenDescription> {
        self.inner.select(selector)
    }
    fn open(&self, token: &TokenDescription) -> TokenResult<Box<dyn Session>> {
        Ok(Box::new(CardSession {
            inner: self.inner.open(token)?,
            facts: self.facts.clone(),
        }))
    }
}

struct CardSession {
    inner: Box<dyn Session>,
    facts: Facts,
}

impl std::fmt::Debug for CardSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CardSession")
    }
}

impl Session for CardSession {
    fn token(&self) -> &TokenDescription {
        self.inner.token()
    }
    fn login(&mut self, pin: &SecretString, allow_final_try: bool) -> TokenResult<()> {
        self.inner.login(pin, allow_final_try)
    }
    fn generate_p256(&self, label: &str, purpose: KeyPurpose) -> TokenResult<TokenKey> {
        self.inner.generate_p256(label, purpose)
    }
    fn generate_p256_in_piv_slot(
        &mut self,
        label: &str,
        purpose: KeyPurpose,
        slot: PivSlot,
        management_key: &SecretString,
        pin: &SecretString,
        certify: &SlotCertifier<'_>,
    ) -> TokenResult<TokenKey> {
        self.inner
            .generate_p256_in_piv_slot(label, purpose, slot, management_key, pin, certify)
    }
    fn piv_key_facts(&self, key: &TokenKey, _attest: bool) -> TokenResult<Option<PivKeyFacts>> {
        Ok(Some((self.facts)(key)))
    }
    fn find_p256_keys(&self, label: Option<&str>) -> TokenResult<Vec<TokenKey>> {
        self.inner.find_p256_keys(label)
    }
    fn find_p256_signing_key(&self, object: &ObjectSelector) -> TokenResult<TokenKey> {
        self.inner.find_p256_signing_key(object)
    }
    fn find_p256_derive_key(&self, object: &ObjectSelector) -> TokenResult<TokenKey> {
        self.inner.find_p256_derive_key(object)
    }
    fn ecdh(&self, key: &TokenKey, peer: &p256::PublicKey) -> TokenResult<Zeroizing<[u8; 32]>> {
        self.inner.ecdh(key, peer)
    }
    fn sign_p256_digest(&self, key: &TokenKey, digest: &[u8; 32]) -> TokenResult<[u8; 64]> {
        self.inner.sign_p256_digest(key, digest)
    }
    fn read_generation(&self, label: &str) -> TokenResult<Option<u64>> {
        self.inner.read_generation(label)
    }
    fn store_generation(&self, label: &str, generation: u64) -> TokenResult<()> {
        self.inner.store_generation(label, generation)
    }
    fn delete_generation(&self, label: &str) -> TokenResult<()> {
        self.inner.delete_generation(label)
    }
    fn check_present(&self) -> TokenResult<()> {
        self.inner.check_present()
    }
    fn close(self: Box<Self>) {
        self.inner.close();
    }
}

fn card(facts: impl Fn(&TokenKey) -> PivKeyFacts + Send + Sync + 'static) -> Arc<Core> {
    let config = Config {
        pkcs11_module: Some("/nonexistent".into()),
        key_stock: 0,
        ..Config::default()
    };
    let backend = Card {
        inner: SoftwareToken::new("card", PIN),
        facts: Arc::new(facts),
    };
    Core::new(config, backend, MemoryStorage::default())
}

/// A YubiKey's answer for a key it generated, attested by `ca`.
fn attested_by(ca: Arc<TestCa>) -> impl Fn(&TokenKey) -> PivKeyFacts + Send + Sync {
    move |key| PivKeyFacts {
        slot: "9d".into(),
        serial: SERIAL.into(),
        firmware: "5.4.3".into(),
        pin_policy: Some("once".into()),
        touch_policy: Some("cached".into()),
        origin: Some(PivKeyOrigin::Generated),
        card_certificate: Some(ca.card_der.clone()),
        attestation: Some(Ok(attest(&ca, &key.public))),
    }
}

async fn init(
    core: &Core,
    enrollment: Enrollment,
) -> Result<keyholder_daemon::core::Initialized, Error> {
    core.init_with(
        Selector::label("card"),
        SecretString::from(PIN.to_owned()),
        false,
        Vec::new(),
        false,
        NewVaultKey::Generate,
        enrollment,
    )
    .await
}

fn with_root(ca: &TestCa) -> Enrollment {
    Enrollment {
        attestation_roots_pem: ca.root_pem.clone(),
        ..Enrollment::default()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_attested_key_is_enrolled_and_its_record_read_back_at_unlock() {
    let ca = Arc::new(test_ca());
    let core = card(attested_by(ca.clone()));
    let done = init(&core, with_root(&ca)).await.expect("enrolled");
    let record = done.vault_key.expect("a PIV record");
    assert!(record.attested, "{record:?}");
    assert_eq!(record.slot, "9d");
    assert_eq!(record.firmware, "5.4.3");
    assert_eq!(record.pin_policy, "once");
    assert_eq!(record.touch_policy, "cached");
    assert_eq!(record.form_factor, "USB-C keychain");
    assert_eq!(record.origin, "generated");
    assert!(
        record
            .attestation
            .contains("YubiKey serial 12345678, firmware 5.4.3"),
        "{}",
        record.attestation
    );
    assert!(
        record
            .attestation
            .contains("configured root \"CN=Test PIV Root\""),
        "{}",
        record.attestation
    );

    // Status shows the record; unlock reads it back from the vault.
    let status = core.status();
    assert_eq!(status.vault_key.as_ref(), Some(&record));
    core.unlock(SecretString::from(PIN.to_owned()), false, None, None, false)
        .await
        .expect("unlock");
    assert_eq!(core.known_vault_key(), Some(record));
}

#[tokio::test(flavor = "multi_thread")]
async fn without_the_root_the_attestation_does_not_verify_and_the_key_is_refused() {
    let ca = Arc::new(test_ca());
    let core = card(attested_by(ca));
    let err = init(&core, Enrollment::default())
        .await
        .expect_err("refused");
    assert!(matches!(err, Error::NotEnrolled { .. }), "{err}");
    let text = err.to_string();
    assert!(text.contains("does not verify"), "{text}");
    assert!(text.contains("--attestation-root"), "{text}");
    assert!(core.status().vault_key.is_none());
}

#[tokio::test(flavor = "multi_thread")]
async fn an_imported_key_is_refused_unless_allowed() {
    let ca = Arc::new(test_ca());
    let imported = move |_: &TokenKey| PivKeyFacts {
        slot: "9d".into(),
        serial: SERIAL.into(),
        firmware: "5.4.3".into(),
        origin: Some(PivKeyOrigin::Imported),
        card_certificate: Some(ca.card_der.clone()),
        attestation: Some(Err("generic error (YKPIV_GENERIC_ERROR)".into())),
        ..PivKeyFacts::default()
    };
    let core = card(imported.clone());
    let err = init(&core, Enrollment::default())
        .await
        .expect_err("refused");
    let text = err.to_string();
    assert!(text.contains("was imported into the card"), "{text}");
    assert!(text.contains("--allow-imported-key"), "{text}");

    let core = card(imported);
    let allowed = Enrollment {
        allow_imported_key: true,
        ..Enrollment::default()
    };
    let record = init(&core, allowed)
        .await
        .expect("allowed")
        .vault_key
        .expect("record");
    assert!(!record.attested);
    assert_eq!(record.origin, "imported");
    assert!(record.attestation.contains("imported"), "{record:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_attestation_for_another_serial_than_the_card_is_refused() {
    let ca = Arc::new(test_ca());
    let inner = attested_by(ca.clone());
    let core = card(move |key| PivKeyFacts {
        serial: "87654321".into(),
        ..inner(key)
    });
    let err = init(&core, with_root(&ca)).await.expect_err("refused");
    assert!(
        err.to_string()
            .contains("names YubiKey serial 12345678, but the card says 87654321"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_card_without_an_attestation_certificate_enrolls_the_key_not_attested() {
    let core = card(|_| PivKeyFacts {
        slot: "9d".into(),
        serial: SERIAL.into(),
        firmware: "5.2.7".into(),
        pin_policy: Some("once".into()),
        touch_policy: Some("never".into()),
        origin: Some(PivKeyOrigin::Generated),
        ..PivKeyFacts::default()
    });
    let record = init(&core, Enrollment::default())
        .await
        .expect("enrolled")
        .vault_key
        .expect("record");
    assert!(!record.attested);
    assert_eq!(
        record.attestation,
        "the card has no attestation certificate (slot f9)"
    );
    assert_eq!(record.firmware, "5.2.7");
}
