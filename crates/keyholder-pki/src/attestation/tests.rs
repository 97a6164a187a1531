//! Chains built with rcgen in the shape of Yubico's: a test root, an
//! f9-like card certificate, and a slot attestation carrying Yubico's
//! extensions.

use super::*;
use rcgen::{
    BasicConstraints, CertificateParams, CustomExtension, DnType, IsCa, Issuer, KeyPair,
    PKCS_ECDSA_P256_SHA256, PKCS_ECDSA_P384_SHA384,
};
use sha2::{Digest, Sha256};

/// Extensions as (OID, value).
type Exts = Vec<(&'static [u64], Vec<u8>)>;

const SERIAL_12345678: &[u8] = &[0x02, 0x04, 0x00, 0xbc, 0x61, 0x4e];

struct Ca {
    params: CertificateParams,
    key: KeyPair,
    der: Vec<u8>,
}

fn ca_params(cn: &str) -> CertificateParams {
    let mut p = CertificateParams::default();
    p.distinguished_name.push(DnType::CommonName, cn);
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p
}

fn root(cn: &str) -> Ca {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P384_SHA384).expect("key");
    let params = ca_params(cn);
    let der = params.self_signed(&key).expect("root").der().to_vec();
    Ca { params, key, der }
}

fn sub_ca(cn: &str, parent: &Ca) -> Ca {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("key");
    let params = ca_params(cn);
    let issuer = Issuer::from_params(&parent.params, &parent.key);
    let der = params.signed_by(&key, &issuer).expect("ca").der().to_vec();
    Ca { params, key, der }
}

/// Yubico-shaped extensions: serial 12345678, firmware 5.4.3, PIN once,
/// touch cached, USB-C keychain FIPS.
fn good_exts() -> Exts {
    vec![
        (OID_FIRMWARE, vec![5, 4, 3]),
        (OID_SERIAL, SERIAL_12345678.to_vec()),
        (OID_POLICY, vec![2, 3]),
        (OID_FORM_FACTOR, vec![0x83]),
    ]
}

/// A slot attestation for `key`, signed by `card`.
fn slot_cert(card: &Ca, key: &KeyPair, exts: &[(&'static [u64], Vec<u8>)]) -> Vec<u8> {
    let mut p = CertificateParams::default();
    p.distinguished_name
        .push(DnType::CommonName, "YubiKey PIV Attestation 9d");
    p.custom_extensions = exts
        .iter()
        .map(|(oid, v)| CustomExtension::from_oid_content(oid, v.clone()))
        .collect();
    let issuer = Issuer::from_params(&card.params, &card.key);
    p.signed_by(key, &issuer).expect("slot").der().to_vec()
}

struct Chain {
    root: Ca,
    card: Ca,
    key: KeyPair,
    slot: Vec<u8>,
}

fn chain() -> Chain {
    let root = root("Test PIV Root");
    let card = sub_ca("Yubico PIV Attestation", &root);
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("key");
    let slot = slot_cert(&card, &key, &good_exts());
    Chain {
        root,
        card,
        key,
        slot,
    }
}

fn test_roots(c: &Chain) -> AttestationRoots {
    AttestationRoots::none()
        .with_root_der(&c.root.der)
        .expect("root")
}

fn verify(c: &Chain, slot: &[u8]) -> Result<Attestation> {
    verify_piv_attestation(
        slot,
        &c.card.der,
        &[],
        &test_roots(c),
        c.key.public_key_raw(),
    )
}

#[test]
fn good_chain_verifies_and_yields_the_fields() {
    let c = chain();
    let a = verify(&c, &c.slot).expect("verifies");
    assert_eq!(a.serial, 12_345_678);
    assert_eq!(a.firmware.to_string(), "5.4.3");
    assert_eq!(a.pin_policy, PinPolicy::Once);
    assert_eq!(a.touch_policy, TouchPolicy::Cached);
    let ff = a.form_factor.expect("form factor");
    assert_eq!(ff.kind, FormFactorKind::UsbCKeychain);
    assert!(ff.fips && !ff.cspn);
    assert_eq!(ff.to_string(), "USB-C keychain, FIPS");
    assert_eq!(a.subject, "CN=YubiKey PIV Attestation 9d");
    assert_eq!(a.slot(), Some(0x9d));
    assert_eq!(a.root_subject, "CN=Test PIV Root");
    assert_eq!(a.anchor, Anchor::Configured);
}

#[test]
fn the_enrolled_key_may_be_given_compressed() {
    let c = chain();
    let point = p256::PublicKey::from_sec1_bytes(c.key.public_key_raw()).expect("point");
    let compressed = p256::EncodedPoint::from(point).compress();
    let a = verify_piv_attestation(
        &c.slot,
        &c.card.der,
        &[],
        &test_roots(&c),
        compressed.as_bytes(),
    );
    assert!(a.is_ok(), "{a:?}");
}

#[test]
fn a_chain_through_intermediates_in_any_order_verifies() {
    let root = root("Test Attestation Root 1");
    let mid = sub_ca("Test Attestation Intermediate B 1", &root);
    let piv = sub_ca("Test PIV Attestation B 1", &mid);
    let card = sub_ca("Yubico PIV Attestation", &piv);
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("key");
    let slot = slot_cert(&card, &key, &good_exts());
    let roots = AttestationRoots::yubico()
        .with_root_der(&root.der)
        .expect("root");
    // Unrelated CAs around them, as in Yubico's bundle of all intermediates.
    let decoy = sub_ca("Test FIDO Attestation B 1", &mid);
    let a = verify_piv_attestation(
        &slot,
        &card.der,
        &[&decoy.der, &piv.der, &card.der, &mid.der],
        &roots,
        key.public_key_raw(),
    )
    .expect("verifies");
    assert_eq!(a.root_subject, "CN=Test Attestation Root 1");

    // Without the intermediates the card is not trusted.
    let e = verify_piv_attestation(&slot, &card.der, &[&mid.der], &roots, key.public_key_raw())
        .unwrap_err();
    assert!(matches!(e, AttestationError::UntrustedCard { .. }), "{e}");
    assert!(
        e.to_string()
            .contains("issuer \"CN=Test PIV Attestation B 1\""),
        "{e}"
    );
}

#[test]
fn a_slot_certificate_signed_by_another_key_fails() {
    let c = chain();
    // Same subject as the card's f9 certificate, different key.
    let impostor = sub_ca("Yubico PIV Attestation", &root("Elsewhere"));
    let slot = slot_cert(&impostor, &c.key, &good_exts());
    let e = verify(&c, &slot).unwrap_err();
    assert!(matches!(e, AttestationError::NotSignedByCard(_)), "{e}");
    assert!(
        e.to_string()
            .starts_with("the key attestation is not signed by the card's attestation key"),
        "{e}"
    );
}

#[test]
fn a_card_certificate_not_from_a_trusted_root_fails() {
    let c = chain();
    let other = root("Test PIV Root");
    let roots = AttestationRoots::none()
        .with_root_der(&other.der)
        .expect("root");
    let e = verify_piv_attestation(&c.slot, &c.card.der, &[], &roots, c.key.public_key_raw())
        .unwrap_err();
    assert!(matches!(e, AttestationError::UntrustedCard { .. }), "{e}");
    assert!(
        e.to_string().contains("is not issued by a trusted root"),
        "{e}"
    );
}

#[test]
fn the_default_roots_refuse_a_test_chain() {
    let c = chain();
    let e = verify_piv_attestation(
        &c.slot,
        &c.card.der,
        &[],
        &AttestationRoots::default(),
        c.key.public_key_raw(),
    )
    .unwrap_err();
    assert!(matches!(e, AttestationError::UntrustedCard { .. }), "{e}");
}

#[test]
fn a_different_public_key_fails() {
    let c = chain();
    let other = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("key");
    let e = verify_piv_attestation(
        &c.slot,
        &c.card.der,
        &[],
        &test_roots(&c),
        other.public_key_raw(),
    )
    .unwrap_err();
    assert!(matches!(e, AttestationError::KeyMismatch), "{e}");
    assert_eq!(
        e.to_string(),
        "the key in the attestation is not the enrolled key"
    );
    let e =
        verify_piv_attestation(&c.slot, &c.card.der, &[], &test_roots(&c), b"garbage").unwrap_err();
    assert!(matches!(e, AttestationError::KeyMismatch), "{e}");
}

fn with_ext(oid: &'static [u64], value: Option<Vec<u8>>) -> Exts {
    let mut exts: Vec<_> = good_exts().into_iter().filter(|(o, _)| *o != oid).collect();
    if let Some(v) = value {
        exts.push((oid, v));
    }
    exts
}

fn error_for(exts: &[(&'static [u64], Vec<u8>)]) -> String {
    let c = chain();
    let slot = slot_cert(&c.card, &c.key, exts);
    match verify(&c, &slot) {
        Ok(a) => panic!("accepted: {a:?}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn each_malformed_extension_gives_a_clear_error() {
    let cases: Vec<(Exts, &str)> = vec![
        (
            with_ext(OID_SERIAL, None),
            "the key attestation has no serial number extension (1.3.6.1.4.1.41482.3.7)",
        ),
        (
            with_ext(OID_SERIAL, Some(vec![0x04, 0x01, 0x05])),
            "serial number extension (1.3.6.1.4.1.41482.3.7) is malformed: not a non-negative DER INTEGER",
        ),
        (
            with_ext(OID_SERIAL, Some(vec![0x02, 0x01, 0xff])),
            "serial number extension (1.3.6.1.4.1.41482.3.7) is malformed",
        ),
        (
            with_ext(OID_SERIAL, Some(vec![0x02, 0x01, 0x05, 0x00])),
            "serial number extension (1.3.6.1.4.1.41482.3.7) is malformed: trailing bytes",
        ),
        (
            with_ext(OID_FIRMWARE, None),
            "no firmware version extension (1.3.6.1.4.1.41482.3.3)",
        ),
        (
            with_ext(OID_FIRMWARE, Some(vec![5, 4])),
            "firmware version extension (1.3.6.1.4.1.41482.3.3) is malformed: expected 3 bytes, found 2",
        ),
        (
            with_ext(OID_POLICY, None),
            "no PIN and touch policy extension (1.3.6.1.4.1.41482.3.8)",
        ),
        (
            with_ext(OID_POLICY, Some(vec![2])),
            "PIN and touch policy extension (1.3.6.1.4.1.41482.3.8) is malformed: expected 2 bytes, found 1",
        ),
        (
            with_ext(OID_POLICY, Some(vec![9, 1])),
            "is malformed: unknown PIN policy 9",
        ),
        (
            with_ext(OID_POLICY, Some(vec![1, 0])),
            "is malformed: unknown touch policy 0",
        ),
        (
            with_ext(OID_FORM_FACTOR, Some(vec![1, 2])),
            "form factor extension (1.3.6.1.4.1.41482.3.9) is malformed: expected 1 bytes, found 2",
        ),
        (
            with_ext(OID_FORM_FACTOR, Some(Vec::new())),
            "form factor extension (1.3.6.1.4.1.41482.3.9) is malformed",
        ),
    ];
    for (exts, want) in cases {
        let got = error_for(&exts);
        assert!(got.contains(want), "want {want:?}, got {got:?}");
    }
}

#[test]
fn the_form_factor_is_optional_and_octet_string_wrapping_is_accepted() {
    let c = chain();
    let slot = slot_cert(&c.card, &c.key, &with_ext(OID_FORM_FACTOR, None));
    assert_eq!(verify(&c, &slot).expect("verifies").form_factor, None);

    let wrapped = vec![
        (OID_FIRMWARE, vec![0x04, 0x03, 5, 7, 4]),
        (OID_SERIAL, SERIAL_12345678.to_vec()),
        (OID_POLICY, vec![0x04, 0x02, 3, 2]),
        (OID_FORM_FACTOR, vec![0x04, 0x01, 0x47]),
    ];
    let slot = slot_cert(&c.card, &c.key, &wrapped);
    let a = verify(&c, &slot).expect("verifies");
    assert_eq!(a.firmware.to_string(), "5.7.4");
    assert_eq!(a.pin_policy, PinPolicy::Always);
    assert_eq!(a.touch_policy, TouchPolicy::Always);
    let ff = a.form_factor.expect("form factor");
    assert_eq!(ff.kind, FormFactorKind::UsbCBio);
    assert!(ff.cspn && !ff.fips);
}

#[test]
fn form_factor_bytes_map_to_the_documented_devices() {
    let table = [
        (0x00, "unspecified"),
        (0x01, "USB-A keychain"),
        (0x02, "USB-A nano"),
        (0x03, "USB-C keychain"),
        (0x04, "USB-C nano"),
        (0x05, "USB-C/Lightning keychain"),
        (0x06, "USB-A Bio"),
        (0x07, "USB-C Bio"),
        (0x81, "USB-A keychain, FIPS"),
        (0x44, "USB-C nano, CSPN"),
        (0x09, "unknown (0x09)"),
    ];
    for (b, want) in table {
        assert_eq!(FormFactor::from_byte(b).to_string(), want, "byte {b:#04x}");
    }
}

#[test]
fn the_builtin_yubico_root_is_the_documented_one() {
    let der = pem_to_der(YUBICO_PIV_ROOT_CA_PEM.as_bytes()).expect("pem");
    let fp: String = Sha256::digest(&der)
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect();
    assert_eq!(fp, YUBICO_PIV_ROOT_CA_SHA256);
    let cert = parse(&der, CertRole::Root).expect("parses");
    assert_eq!(
        cert.subject().to_string(),
        "CN=Yubico PIV Root CA Serial 263751"
    );
    assert_eq!(
        cert.issuer().to_string(),
        "CN=Yubico PIV Root CA Serial 263751"
    );
    assert_eq!(cert.raw_serial(), &[0x04, 0x06, 0x47]);
    // Self-signed with SHA-256 RSA: exercises the RSA PKCS#1 v1.5 path.
    verify_signed_by(&cert, cert.public_key()).expect("self-signature verifies");
    let roots = AttestationRoots::yubico();
    assert_eq!(roots.roots_der().next(), Some(der.as_slice()));
    assert_eq!(roots.roots_der().count(), 2);
}

#[test]
fn the_builtin_yubico_attestation_root_1_is_the_documented_one() {
    let der = pem_to_der(YUBICO_ATTESTATION_ROOT_1_PEM.as_bytes()).expect("pem");
    let fp: String = Sha256::digest(&der)
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect();
    assert_eq!(fp, YUBICO_ATTESTATION_ROOT_1_SHA256);
    let cert = parse(&der, CertRole::Root).expect("parses");
    assert_eq!(cert.subject().to_string(), "CN=Yubico Attestation Root 1");
    assert_eq!(cert.issuer().to_string(), "CN=Yubico Attestation Root 1");
    // Self-signed with SHA-512 RSA.
    verify_signed_by(&cert, cert.public_key()).expect("self-signature verifies");
    assert_eq!(
        AttestationRoots::yubico().roots_der().nth(1),
        Some(der.as_slice())
    );
}

#[test]
fn a_bad_configured_root_is_refused() {
    let e = AttestationRoots::none()
        .with_root_pem("not a certificate")
        .unwrap_err();
    assert!(e.to_string().starts_with("trusted attestation root"), "{e}");
    let e = AttestationRoots::none()
        .with_root_der(b"\x30\x03\x02\x01")
        .unwrap_err();
    assert!(
        e.to_string()
            .starts_with("a trusted attestation root is not"),
        "{e}"
    );
    let c = chain();
    let pem = format!(
        "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
        base64::Engine::encode(&base64::engine::general_purpose::STANDARD, &c.root.der)
    );
    let roots = AttestationRoots::none()
        .with_root_pem(&pem)
        .expect("pem root");
    assert!(
        verify_piv_attestation(&c.slot, &c.card.der, &[], &roots, c.key.public_key_raw()).is_ok()
    );
}

#[test]
fn too_many_intermediates_are_refused() {
    let c = chain();
    let many: Vec<&[u8]> = vec![c.card.der.as_slice(); MAX_INTERMEDIATES + 1];
    let e = verify_piv_attestation(&c.slot, &c.card.der, &many, &test_roots(&c), b"").unwrap_err();
    assert!(
        matches!(e, AttestationError::TooManyIntermediates(n) if n == MAX_INTERMEDIATES + 1),
        "{e}"
    );
}

#[test]
fn hostile_input_is_an_error_not_a_panic() {
    let c = chain();
    let roots = test_roots(&c);
    let key = c.key.public_key_raw();
    // Every truncation of each certificate.
    for n in 0..c.slot.len() {
        let r = verify_piv_attestation(&c.slot[..n], &c.card.der, &[], &roots, key);
        assert!(
            matches!(
                r,
                Err(AttestationError::Parse {
                    role: CertRole::Slot,
                    ..
                })
            ),
            "{n}"
        );
    }
    for n in 0..c.card.der.len() {
        let r = verify_piv_attestation(&c.slot, &c.card.der[..n], &[], &roots, key);
        assert!(
            matches!(
                r,
                Err(AttestationError::Parse {
                    role: CertRole::Card,
                    ..
                })
            ),
            "{n}"
        );
        let r = verify_piv_attestation(&c.slot, &c.card.der, &[&c.card.der[..n]], &roots, key);
        assert!(r.is_err(), "{n}");
    }
    // Trailing bytes.
    let mut long = c.slot.clone();
    long.push(0);
    let e = verify_piv_attestation(&long, &c.card.der, &[], &roots, key).unwrap_err();
    assert!(e.to_string().contains("1 trailing bytes"), "{e}");
    // Each byte of the slot certificate changed: never a panic, and never
    // accepted unless the change is outside the signed part and signature.
    let tbs_range = {
        let cert = parse(&c.slot, CertRole::Slot).expect("parses");
        let tbs: &[u8] = cert.tbs_certificate.as_ref();
        let start = tbs.as_ptr() as usize - c.slot.as_ptr() as usize;
        start..start + tbs.len()
    };
    for i in 0..c.slot.len() {
        for x in [0x01u8, 0x80, 0xff] {
            let mut bad = c.slot.clone();
            if let Some(b) = bad.get_mut(i) {
                *b ^= x;
            }
            let r = verify_piv_attestation(&bad, &c.card.der, &[], &roots, key);
            if tbs_range.contains(&i) {
                assert!(r.is_err(), "byte {i} ^ {x:#04x} accepted");
            }
        }
    }
    // Garbage.
    for g in [
        &b""[..],
        b"\x30",
        b"\x30\x80",
        b"\xff\xff\xff\xff",
        &[0x30, 0x84, 0xff, 0xff, 0xff, 0xff],
    ] {
        assert!(verify_piv_attestation(g, g, &[g], &roots, g).is_err());
    }
}

/// A real YubiKey attestation (serial 25599865, slot 9c, P-384 key), published
/// by Docker's TUF root key ceremony in github.com/docker/tuf:
/// `ceremony/2024-04-09/keys/25599865/SlotF9Intermediate.pem` and
/// `ceremony/2024-06-04/keys/25599865/Slot9CAttestation.pem`.
const REAL_F9_PEM: &str = include_str!("testdata/docker-tuf-25599865-f9.pem");
const REAL_9C_PEM: &str = include_str!("testdata/docker-tuf-25599865-9c.pem");

#[test]
fn a_real_yubikey_attestation_verifies_under_the_builtin_root() {
    let f9 = pem_to_der(REAL_F9_PEM.as_bytes()).expect("f9");
    let slot = pem_to_der(REAL_9C_PEM.as_bytes()).expect("9c");
    let key = parse(&slot, CertRole::Slot)
        .expect("parses")
        .public_key()
        .subject_public_key
        .data
        .to_vec();
    assert_eq!(key.len(), 97, "a P-384 point");
    let a = verify_piv_attestation(&slot, &f9, &[], &AttestationRoots::yubico(), &key)
        .expect("verifies");
    assert_eq!(a.serial, 25_599_865);
    assert_eq!(a.firmware.to_string(), "5.4.3");
    assert_eq!(a.pin_policy, PinPolicy::Always);
    assert_eq!(a.touch_policy, TouchPolicy::Never);
    assert_eq!(
        a.form_factor.map(|f| f.to_string()).as_deref(),
        Some("USB-C keychain, FIPS")
    );
    assert_eq!(a.subject, "CN=YubiKey PIV Attestation 9c");
    assert_eq!(a.slot(), Some(0x9c));
    assert_eq!(a.root_subject, "CN=Yubico PIV Root CA Serial 263751");
    assert_eq!(a.anchor, Anchor::BuiltIn);

    // The same chain, but a test root only: not trusted.
    let c = chain();
    let e = verify_piv_attestation(&slot, &f9, &[], &test_roots(&c), &key).unwrap_err();
    assert!(
        e.to_string().contains(
            "(slot f9, issuer \"CN=Yubico PIV Root CA Serial 263751\") is not issued by a trusted root"
        ),
        "{e}"
    );
    // Another key than the attested one.
    let e = verify_piv_attestation(
        &slot,
        &f9,
        &[],
        &AttestationRoots::yubico(),
        c.key.public_key_raw(),
    )
    .unwrap_err();
    assert!(matches!(e, AttestationError::KeyMismatch), "{e}");
    // The test chain's f9 with the real slot certificate: not signed by it.
    let e = verify_piv_attestation(&slot, &c.card.der, &[], &test_roots(&c), &key).unwrap_err();
    assert!(matches!(e, AttestationError::NotSignedByCard(_)), "{e}");
}

#[test]
fn a_pem_bundle_of_intermediates_is_read_in_order() {
    let bundle = format!("{REAL_F9_PEM}\n{REAL_9C_PEM}");
    let ders = pem_certificates(&bundle).expect("bundle");
    assert_eq!(ders.len(), 2);
    assert_eq!(ders[0], pem_to_der(REAL_F9_PEM.as_bytes()).expect("f9"));
    assert!(pem_certificates("").is_err());
    assert!(
        pem_certificates("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n").is_err()
    );
    assert!(
        pem_certificates("-----BEGIN CERTIFICATE-----\n!!!\n-----END CERTIFICATE-----\n").is_err()
    );
}

#[test]
fn the_slot_is_read_from_the_subject_only_in_yubico_form() {
    let c = chain();
    let mut a = verify(&c, &c.slot).expect("verifies");
    for (subject, want) in [
        ("CN=YubiKey PIV Attestation 82", Some(0x82)),
        ("CN=YubiKey PIV Attestation 9A", Some(0x9a)),
        ("CN=YubiKey PIV Attestation ", None),
        ("CN=YubiKey PIV Attestation 123", None),
        ("CN=YubiKey PIV Attestation zz", None),
        ("CN=YubiKey PIV Attestation +9", None),
        ("CN=Something else 9d", None),
    ] {
        a.subject = subject.to_owned();
        assert_eq!(a.slot(), want, "{subject}");
    }
}

#[test]
fn the_builtin_yubico_intermediates_are_the_published_ones_and_chain_to_root_1() {
    let inters = pem_certificates(YUBICO_PIV_INTERMEDIATES_PEM).expect("pem");
    assert_eq!(inters.len(), YUBICO_PIV_INTERMEDIATES_SHA256.len());
    for (der, expected) in inters.iter().zip(YUBICO_PIV_INTERMEDIATES_SHA256) {
        let fp: String = Sha256::digest(der)
            .iter()
            .map(|b| format!("{b:02X}"))
            .collect();
        assert_eq!(fp, expected);
    }
    let parsed: Vec<_> = inters
        .iter()
        .map(|d| parse(d, CertRole::Intermediate).expect("parses"))
        .collect();
    let subjects: Vec<String> = parsed.iter().map(|c| c.subject().to_string()).collect();
    assert_eq!(
        subjects,
        [
            "CN=Yubico PIV Attestation A 1",
            "CN=Yubico Attestation Intermediate A 1",
            "CN=Yubico PIV Attestation B 1",
            "CN=Yubico Attestation Intermediate B 1",
        ]
    );
    // PIV A 1 <- Intermediate A 1 <- Root 1, and the same for B.
    let root_der = pem_to_der(YUBICO_ATTESTATION_ROOT_1_PEM.as_bytes()).expect("pem");
    let root = parse(&root_der, CertRole::Root).expect("root");
    for pair in parsed.chunks(2) {
        let [piv, mid] = pair else { panic!("pairs") };
        verify_signed_by(piv, mid.public_key()).expect("PIV intermediate under its issuer");
        verify_signed_by(mid, root.public_key()).expect("intermediate under Root 1");
    }
}

mod enrollment {
    use super::*;
    use crate::attestation::enroll::{Evidence, Outcome, Refusal, decide, describe};

    fn evidence<'a>(c: &'a Chain) -> Evidence<'a> {
        Evidence {
            slot: 0x9d,
            enrolled_key: c.key.public_key_raw(),
            imported: Some(false),
            card_certificate: Some(&c.card.der),
            attestation: Some(Ok(&c.slot)),
        }
    }

    #[test]
    fn a_verified_attestation_enrolls_the_key_as_attested() {
        let c = chain();
        let out = decide(&evidence(&c), &test_roots(&c), &[], false).expect("enrolled");
        let Outcome::Attested(a) = out else {
            panic!("{out:?}")
        };
        assert_eq!(a.serial, 12_345_678);
        assert_eq!(a.touch_policy, TouchPolicy::Cached);
        let text = describe(&a);
        assert!(text.contains("serial 12345678"), "{text}");
        assert!(text.contains("firmware 5.4.3"), "{text}");
        assert!(text.contains("touch policy cached"), "{text}");
        assert!(
            text.contains("configured root \"CN=Test PIV Root\""),
            "{text}"
        );
        // Without the card saying where the key came from, the same.
        let mut e = evidence(&c);
        e.imported = None;
        assert!(matches!(
            decide(&e, &test_roots(&c), &[], false),
            Ok(Outcome::Attested(_))
        ));
    }

    #[test]
    fn an_imported_key_is_refused_unless_allowed() {
        let c = chain();
        let mut e = evidence(&c);
        e.imported = Some(true);
        let err = decide(&e, &test_roots(&c), &[], false).expect_err("refused");
        assert!(matches!(err, Refusal::Imported { slot: 0x9d }), "{err}");
        assert!(err.to_string().contains("--allow-imported-key"), "{err}");
        let out = decide(&e, &test_roots(&c), &[], true).expect("allowed");
        assert!(
            matches!(&out, Outcome::NotAttested { reason } if reason.contains("imported")),
            "{out:?}"
        );
    }

    #[test]
    fn a_card_that_will_not_attest_the_key_is_taken_for_an_imported_key() {
        let c = chain();
        let mut e = evidence(&c);
        e.imported = None;
        e.attestation = Some(Err("generic error"));
        let err = decide(&e, &test_roots(&c), &[], false).expect_err("refused");
        assert!(matches!(err, Refusal::NotAttestable { .. }), "{err}");
        assert!(err.to_string().contains("generic error"), "{err}");
        assert!(matches!(
            decide(&e, &test_roots(&c), &[], true),
            Ok(Outcome::NotAttested { .. })
        ));
    }

    #[test]
    fn a_card_without_an_attestation_certificate_enrolls_the_key_not_attested() {
        let c = chain();
        let mut e = evidence(&c);
        e.card_certificate = None;
        e.attestation = None;
        let out = decide(&e, &AttestationRoots::yubico(), &[], false).expect("enrolled");
        assert_eq!(
            out,
            Outcome::NotAttested {
                reason: "the card has no attestation certificate (slot f9)".into()
            }
        );
    }

    #[test]
    fn an_attestation_that_does_not_verify_is_refused() {
        let c = chain();
        // Not under Yubico's roots.
        let err = decide(&evidence(&c), &AttestationRoots::yubico(), &[], true).expect_err("no");
        assert!(matches!(err, Refusal::Invalid(_)), "{err}");
        assert!(err.to_string().contains("--attestation-root"), "{err}");
        // Another key than the one enrolled.
        let other = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("key");
        let mut e = evidence(&c);
        e.enrolled_key = other.public_key_raw();
        let err = decide(&e, &test_roots(&c), &[], false).expect_err("other key");
        assert!(
            matches!(err, Refusal::Invalid(AttestationError::KeyMismatch)),
            "{err}"
        );
        // The attestation of another slot.
        let mut e = evidence(&c);
        e.slot = 0x82;
        let err = decide(&e, &test_roots(&c), &[], false).expect_err("other slot");
        assert!(
            matches!(err, Refusal::WrongSlot { slot: 0x82, .. }),
            "{err}"
        );
    }

    #[test]
    fn a_chain_through_extra_intermediates_is_followed() {
        let root = root("Test Attestation Root");
        let mid = sub_ca("Test PIV Attestation B 9", &root);
        let card = sub_ca("Yubico PIV Attestation", &mid);
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("key");
        let slot = slot_cert(&card, &key, &good_exts());
        let roots = AttestationRoots::none()
            .with_root_der(&root.der)
            .expect("root");
        let e = Evidence {
            slot: 0x9d,
            enrolled_key: key.public_key_raw(),
            imported: Some(false),
            card_certificate: Some(&card.der),
            attestation: Some(Ok(&slot)),
        };
        assert!(matches!(
            decide(&e, &roots, &[], false),
            Err(Refusal::Invalid(AttestationError::UntrustedCard { .. }))
        ));
        assert!(matches!(
            decide(&e, &roots, std::slice::from_ref(&mid.der), false),
            Ok(Outcome::Attested(_))
        ));
    }
}
