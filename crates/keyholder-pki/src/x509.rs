//! X.509: self-signed CA certificates, CA import, and issuance of client,
//! server and peer certificates by profile, from a CSR or a key generated
//! for the caller.

use std::net::IpAddr;
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rcgen::{PublicKeyData, SigningKey};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use zeroize::Zeroizing;

use crate::{
    KeyAlgorithm, MAX_VALIDITY, PkiError, Result, backdated, deadline, ecdsa, hex, invalid,
};

/// would parse the PKCS#8 back and spend a second one, and issuance is a hot
/// path. The PKCS#8 document is zeroized on drop.
pub struct FreshP256 {
    pkcs8: Zeroizing<Vec<u8>>,
    /// Uncompressed SEC1 point.
    point: Vec<u8>,
}

impl std::fmt::Debug for FreshP256 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FreshP256(..)")
    }
}

impl FreshP256 {
    /// A new key.
    pub fn generate() -> Result<Self> {
        let pair = ecdsa::RingP256::generate(&ring::rand::SystemRandom::new())?;
        let point = pair.point().to_vec();
        Ok(Self {
            pkcs8: pair.pkcs8,
            point,
        })
    }

    /// The public key, an uncompressed SEC1 point.
    pub fn public_point(&self) -> &[u8] {
        &self.point
    }

    fn pem(&self) -> Zeroizing<String> {
        use base64::Engine;
        let b64 = Zeroizing::new(base64::prelude::BASE64_STANDARD.encode(&*self.pkcs8));
        let mut out = Zeroizing::new(String::with_capacity(b64.len() + 64));
        out.push_str("-----BEGIN PRIVATE KEY-----\n");
        for chunk in b64.as_bytes().chunks(64) {
            // Base64 output is ASCII, so any chunk is valid UTF-8.
            out.push_str(std::str::from_utf8(chunk).unwrap_or_default());
            out.push('\n');
        }
        out.push_str("-----END PRIVATE KEY-----\n");
        out
    }
}

impl PublicKeyData for FreshP256 {
    fn der_bytes(&self) -> &[u8] {
        &self.point
    }

    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        &rcgen::PKCS_ECDSA_P256_SHA256
    }
}

/// A key generated for the caller.
enum Fresh {
    P256(FreshP256),
    Other(Box<KeyPair>),
}

impl Fresh {
    fn generate(alg: KeyAlgorithm) -> Result<Self> {
        match alg {
            KeyAlgorithm::EcdsaP256 => FreshP256::generate().map(Self::P256),
            other => other.generate().map(|k| Self::Other(Box::new(k))),
        }
    }

    fn pem(&self) -> Zeroizing<String> {
        match self {
            Self::P256(k) => k.pem(),
            Self::Other(k) => Zeroizing::new(k.serialize_pem()),
        }
    }
}

fn offset(t: SystemTime) -> OffsetDateTime {
    OffsetDateTime::from(t)
}

/// A random positive serial of exactly 16 bytes: the top bit is cleared so
/// the DER INTEGER needs no sign byte, and the next one set so it never
/// shrinks (126 random bits).
fn serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    // The thread's ChaCha generator, seeded and periodically reseeded from
    // the OS: a CSPRNG without a system call per certificate.
    rand::Rng::fill(&mut rand::thread_rng(), &mut bytes);
    bytes[0] = (bytes[0] & 0x3f) | 0x40;
    SerialNumber::from_slice(&bytes)
}

/// A self-signed CA certificate for `key`, valid from now for `validity`.
pub fn create_ca_certificate(
    common_name: &str,
    key: &impl SigningKey,
    validity: Duration,
) -> Result<String> {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = SystemTime::now();
    params.not_before = offset(backdated(now, Duration::from_secs(300)));
    params.not_after = offset(deadline(now, validity, "validity_seconds")?);
    params.serial_number = Some(serial());
    let cert = params
        .self_signed(key)
        .map_err(|e| PkiError::Build(e.to_string()))?;
    Ok(cert.pem())
}

/// Facts about a certificate, for display.
#[derive(Clone, Debug)]
pub struct CertificateInfo {
    /// Subject, RFC 4514 style.
    pub subject: String,
    /// SHA-256 of the DER, hex, colon-separated.
    pub fingerprint_sha256: String,
    /// Validity start.
    pub not_before: SystemTime,
    /// Validity end.
    pub not_after: SystemTime,
    /// Whether basicConstraints says CA.
    pub is_ca: bool,
}

fn pem_to_der(pem: &str) -> Result<Vec<u8>> {
    let (_, parsed) = x509_parser::pem::parse_x509_pem(pem.as_bytes())
        .map_err(|e| PkiError::Parse(format!("not a PEM certificate: {e}")))?;
    if parsed.label != "CERTIFICATE" {
        return Err(PkiError::Parse(format!(
            "PEM block is {:?}, not CERTIFICATE",
            parsed.label
        )));
    }
    Ok(parsed.contents)
}

fn system_time(t: x509_parser::time::ASN1Time) -> SystemTime {
    let secs = t.timestamp();
    // A certificate from outside may say anything; times the clock cannot
    // hold are clamped, never a panic.
    u64::try_from(secs)
        .ok()
        .and_then(|s| SystemTime::UNIX_EPOCH.checked_add(Duration::from_secs(s)))
        .unwrap_or(if secs < 0 {
            SystemTime::UNIX_EPOCH
        } else {
            SystemTime::UNIX_EPOCH + MAX_VALIDITY
        })
}

/// Parses a PEM certificate.
pub fn certificate_info(pem: &str) -> Result<CertificateInfo> {
    let der = pem_to_der(pem)?;
    let (_, cert) = x509_parser::parse_x509_certificate(&der)
        .map_err(|e| PkiError::Parse(format!("certificate does not parse: {e}")))?;
    let fingerprint = Sha256::digest(&der)
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":");
    Ok(CertificateInfo {
        subject: cert.subject().to_string(),
        fingerprint_sha256: fingerprint,
        not_before: system_time(cert.validity().not_before),
        not_after: system_time(cert.validity().not_after),
        is_ca: cert.is_ca(),
    })
}

/// The most certificates a trust bundle may hold.
pub const MAX_BUNDLE_CERTIFICATES: usize = 32;

/// Checks a PEM bundle of trust anchors (a kubeconfig's
/// `certificate-authority-data`): one or more CERTIFICATE blocks, every one
/// of which parses, and nothing else. Returns how many there are.
pub fn certificate_bundle(pem: &str) -> Result<usize> {
    let mut count = 0usize;
    for block in x509_parser::pem::Pem::iter_from_buffer(pem.as_bytes()) {
        let block = block.map_err(|e| PkiError::Parse(format!("not PEM: {e}")))?;
        if block.label != "CERTIFICATE" {
            return Err(PkiError::Parse(format!(
                "PEM block is {:?}, not CERTIFICATE",
                block.label
            )));
        }
        x509_parser::parse_x509_certificate(&block.contents)
            .map_err(|e| PkiError::Parse(format!("certificate does not parse: {e}")))?;
        count = count.saturating_add(1);
        if count > MAX_BUNDLE_CERTIFICATES {
            return Err(PkiError::Parse(format!(
                "more than {MAX_BUNDLE_CERTIFICATES} certificates"
            )));
        }
    }
    if count == 0 {
        return Err(PkiError::Parse("no PEM certificate".into()));
    }
    Ok(count)
}

/// Checks that `key_pem` (PKCS#8) is the private key of `cert_pem` and
/// returns it as a key pair. Accepts P-256, P-384, Ed25519 and RSA keys.
/// `key_pem` may be PKCS#8, PKCS#1 (RSA) or SEC1 (P-256); store it as
/// [`crate::keys::private_key_pkcs8_pem`] gives it.
pub fn import_ca(cert_pem: &str, key_pem: &str) -> Result<KeyPair> {
    let info = certificate_info(cert_pem)?;
    if !info.is_ca {
        return Err(invalid(
            "cert",
            "the certificate is not a CA (basicConstraints CA:FALSE or absent)",
        ));
    }
    let pkcs8 = crate::keys::private_key_pkcs8_pem(key_pem)?;
    let key = KeyPair::from_pem(&pkcs8)
        .map_err(|e| invalid("key", format!("not a supported private key ({e})")))?;
    let der = pem_to_der(cert_pem)?;
    let (_, cert) =
        x509_parser::parse_x509_certificate(&der).map_err(|e| PkiError::Parse(e.to_string()))?;
    if cert.public_key().raw != key.subject_public_key_info().as_slice() {
        return Err(invalid("key", "the key does not belong to the certificate"));
    }
    Ok(key)
}

/// An issuer ready to sign: the CA's name, key identifier and key.
pub type CaIssuer<S> = Issuer<'static, S>;

/// Prepares `key` to sign as the CA in `cert_pem`.
pub fn issuer<S: SigningKey>(cert_pem: &str, key: S) -> Result<CaIssuer<S>> {
    Issuer::from_ca_cert_pem(cert_pem, key)
        .map_err(|e| PkiError::Parse(format!("CA certificate: {e}")))
}

/// Issuance profiles.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Profile {
    /// TLS client (Kubernetes users, etcd clients): EKU clientAuth, no SANs.
    Client,
    /// TLS server: EKU serverAuth and clientAuth (etcd and the API server dial
    /// themselves through their own gateways); at least one SAN.
    Server,
    /// Cluster peer (etcd peers): serverAuth and clientAuth; at least one SAN.
    Peer,
}

impl Profile {
    /// Parses `client` / `server` / `peer`.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "client" => Ok(Self::Client),
            "server" => Ok(Self::Server),
            "peer" => Ok(Self::Peer),
            other => Err(invalid(
                "profile",
                format!("{other:?} is not one of client, server, peer"),
            )),
        }
    }

    fn extended_key_usages(self) -> Vec<ExtendedKeyUsagePurpose> {
        match self {
            Self::Client => vec![ExtendedKeyUsagePurpose::ClientAuth],
            Self::Server | Self::Peer => vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
        }
    }
}

/// What to certify.
#[derive(Clone, Debug)]
pub struct IssueRequest {
    /// The profile.
    pub profile: Profile,
    /// Subject CN (the Kubernetes user name for client certificates).
    pub common_name: String,
    /// Subject O entries (Kubernetes groups).
    pub organizations: Vec<String>,
    /// DNS SANs.
    pub dns_names: Vec<String>,
    /// IP SANs.
    pub ip_addresses: Vec<IpAddr>,
    /// Validity from now.
    pub ttl: Duration,
    /// `notBefore` is set this far in the past, for clock skew.
    pub backdate: Duration,
}

/// Where the certified public key comes from.
pub enum PublicKeySource<'a> {
    /// Generate a key pair and return its private key with the certificate.
    Generate(KeyAlgorithm),
    /// Use this P-256 key generated earlier, and return it with the
    /// certificate.
    Pregenerated(FreshP256),
    /// The public key of this PEM CSR, whose signature is verified; its CN,
    /// O and SANs are used where the request leaves them empty.
    Csr(&'a str),
}

/// An issued certificate.
pub struct Issued {
    /// The certificate, PEM.
    pub certificate_pem: String,
    /// The generated private key (PKCS#8 PEM), when Keyholder generated it.
    pub private_key_pem: Option<Zeroizing<String>>,
    /// Hex serial.
    pub serial: String,
    /// Validity start.
    pub not_before: SystemTime,
    /// Validity end.
    pub not_after: SystemTime,
}

impl std::fmt::Debug for Issued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issued")
            .field("serial", &self.serial)
            .field(
                "private_key_pem",
                &self.private_key_pem.as_ref().map(|_| "<redacted>"),
            )
            .finish_non_exhaustive()
    }
}

fn check_name(field: &'static str, value: &str) -> Result<()> {
    if value.is_empty() || value.len() > 253 {
        return Err(invalid(field, "must be 1 to 253 bytes"));
    }
    if value.chars().any(|c| c.is_control()) {
        return Err(invalid(field, "must not contain control characters"));
    }
    Ok(())
}

fn check_dns(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 253
        && name.split('.').enumerate().all(|(i, label)| {
            (!label.is_empty() && label.len() <= 63)
                && (label == "*" && i == 0
                    || label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                        && !label.starts_with('-')
                        && !label.ends_with('-'))
        });
    if ok {
        Ok(())
    } else {
        Err(invalid("dns_names", format!("{name:?} is not a DNS name")))
    }
}

fn parse_csr(pem: &str) -> Result<CertificateSigningRequestParams> {
    CertificateSigningRequestParams::from_pem(pem).map_err(|e| {
        PkiError::Csr(match e {
            rcgen::Error::UnsupportedSignatureAlgorithm => {
                "unsupported key or signature algorithm (use P-256, P-384, Ed25519 or RSA)".into()
            }
            other => format!("does not parse or its signature does not verify ({other})"),
        })
    })
}

/// What a CSR adds to a request: its CN and O when the request names no
/// CN, and its DNS and IP SANs always.
fn merge_csr_names(csr: &CertificateSigningRequestParams, req: &mut IssueRequest) -> Result<()> {
    if req.common_name.is_empty() {
        for (ty, value) in csr.params.distinguished_name.iter() {
            let text = dn_text(value);
            match ty {
                DnType::CommonName => req.common_name = text,
                DnType::OrganizationName => req.organizations.push(text),
                _ => {}
            }
        }
    }
    for san in &csr.params.subject_alt_names {
        match san {
            SanType::DnsName(n) => req.dns_names.push(n.as_str().to_owned()),
            SanType::IpAddress(ip) => req.ip_addresses.push(*ip),
            _ => {
                return Err(PkiError::Csr(
                    "only DNS and IP subject alternative names are accepted".into(),
                ));
            }
        }
    }
    Ok(())
}

/// `request` as [`issue`] will see it with the CSR `pem`: the names the
/// certificate will carry, for a policy to decide on before issuing.
pub fn with_csr_names(request: &IssueRequest, pem: &str) -> Result<IssueRequest> {
    let mut req = request.clone();
    merge_csr_names(&parse_csr(pem)?, &mut req)?;
    Ok(req)
}

/// Issues a certificate signed by `issuer` whose validity ends no later than
/// `ca_not_after`.
pub fn issue<S: SigningKey>(
    issuer: &CaIssuer<S>,
    ca_not_after: SystemTime,
    request: &IssueRequest,
    source: PublicKeySource<'_>,
) -> Result<Issued> {
    let mut req = request.clone();
    let mut csr_key = None;
    let mut generated = None;
    match source {
        PublicKeySource::Generate(alg) => generated = Some(Fresh::generate(alg)?),
        PublicKeySource::Pregenerated(key) => generated = Some(Fresh::P256(key)),
        PublicKeySource::Csr(pem) => {
            let csr = parse_csr(pem)?;
            merge_csr_names(&csr, &mut req)?;
            csr_key = Some(csr.public_key);
        }
    }
    check_name("common_name", &req.common_name)?;
    for o in &req.organizations {
        check_name("organizations", o)?;
    }
    for d in &req.dns_names {
        check_dns(d)?;
    }
    let has_sans = !(req.dns_names.is_empty() && req.ip_addresses.is_empty());
    match req.profile {
        Profile::Client if has_sans => {
            return Err(invalid(
                "sans",
                "the client profile takes no DNS or IP names; use the server or peer profile",
            ));
        }
        Profile::Server | Profile::Peer if !has_sans => {
            return Err(invalid(
                "sans",
                "the server and peer profiles need at least one DNS name or IP address",
            ));
        }
        _ => {}
    }
    if req.ttl < Duration::from_secs(1) {
        return Err(invalid("ttl", "must be at least 1s"));
    }
    let now = SystemTime::now();
    let not_after = deadline(now, req.ttl, "ttl")?;
    if not_after > ca_not_after {
        return Err(invalid("ttl", "would outlive the CA certificate"));
    }
    let not_before = backdated(now, req.backdate);

    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, req.common_name.as_str());
    for o in &req.organizations {
        dn.push(DnType::OrganizationName, o.as_str());
    }
    params.distinguished_name = dn;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = req.profile.extended_key_usages();
    params.use_authority_key_identifier_extension = true;
    for d in &req.dns_names {
        let name = rcgen::string::Ia5String::try_from(d.as_str())
            .map_err(|e| invalid("dns_names", e.to_string()))?;
        params.subject_alt_names.push(SanType::DnsName(name));
    }
    for ip in &req.ip_addresses {
        params.subject_alt_names.push(SanType::IpAddress(*ip));
    }
    params.not_before = offset(not_before);
    params.not_after = offset(not_after);
    let serial = serial();
    let serial_hex = hex(serial.as_ref());
    params.serial_number = Some(serial);

    let cert = match (&generated, &csr_key) {
        (Some(Fresh::P256(k)), _) => params.signed_by(k, issuer),
        (Some(Fresh::Other(kp)), _) => params.signed_by(kp.as_ref(), issuer),
        (None, Some(pk)) => params.signed_by(pk, issuer),
        (None, None) => return Err(PkiError::Build("no public key".into())),
    }
    .map_err(|e| PkiError::Build(e.to_string()))?;
    // X.509 times have one-second resolution; report what the certificate says.
    let whole = |t: SystemTime| {
        let secs = t
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        SystemTime::UNIX_EPOCH
            .checked_add(Duration::from_secs(secs))
            .unwrap_or(t)
    };
    Ok(Issued {
        certificate_pem: cert.pem(),
        private_key_pem: generated.map(|k| k.pem()),
        serial: serial_hex,
        not_before: whole(not_before),
        not_after: whole(not_after),
    })
}

fn dn_text(v: &rcgen::DnValue) -> String {
    match v {
        rcgen::DnValue::Utf8String(s) => s.clone(),
        rcgen::DnValue::PrintableString(s) => s.as_str().to_owned(),
        rcgen::DnValue::Ia5String(s) => s.as_str().to_owned(),
        rcgen::DnValue::TeletexString(s) => s.as_str().to_owned(),
        rcgen::DnValue::BmpString(_) | rcgen::DnValue::UniversalString(_) => String::new(),
        _ => String::new(),
    }
}

/// The subject public key bytes of a PEM certificate (for an EC key, the
/// SEC1 point).
pub fn certificate_public_key(pem: &str) -> Result<Vec<u8>> {
    let der = pem_to_der(pem)?;
    let (_, cert) = x509_parser::parse_x509_certificate(&der)
        .map_err(|e| PkiError::Parse(format!("certificate does not parse: {e}")))?;
    Ok(cert.public_key().subject_public_key.data.to_vec())
}

/// A P-256 public key given as an uncompressed SEC1 point.
struct P256Point<'a>(&'a [u8]);

impl PublicKeyData for P256Point<'_> {
    fn der_bytes(&self) -> &[u8] {
        self.0
    }

    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        &rcgen::PKCS_ECDSA_P256_SHA256
    }
}

/// A certificate (DER) that only carries `point`, a P-256 public key, for
/// a PIV card's slot: PIV modules (ykcs11) show a slot's key objects only
/// when the slot holds a certificate, and the card's key may not be able to
/// sign its own. It is signed by a throwaway key that is dropped at once,
/// so it vouches for nothing and is not meant to be verified.
pub fn slot_certificate(point: &[u8], common_name: &str) -> Result<Vec<u8>> {
    if point.len() != 65 || point.first() != Some(&0x04) {
        return Err(invalid("point", "not an uncompressed P-256 point"));
    }
    let throwaway = FreshP256::generate()?;
    let signer =
        rcgen::KeyPair::from_pem(&throwaway.pem()).map_err(|e| PkiError::Build(e.to_string()))?;
    let mut issuer_params = CertificateParams::default();
    let mut issuer_dn = DistinguishedName::new();
    issuer_dn.push(DnType::CommonName, "Keyholder slot certificate (not a CA)");
    issuer_params.distinguished_name = issuer_dn;
    let issuer = Issuer::new(issuer_params, signer);
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    params.distinguished_name = dn;
    params.is_ca = IsCa::ExplicitNoCa;
    let now = SystemTime::now();
    params.not_before = offset(backdated(now, Duration::from_secs(300)));
    params.not_after = offset(deadline(now, MAX_VALIDITY, "validity")?);
    params.serial_number = Some(serial());
    let cert = params
        .signed_by(&P256Point(point), &issuer)
        .map_err(|e| PkiError::Build(e.to_string()))?;
    Ok(cert.der().to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ca() -> (String, KeyPair) {
        let key = KeyAlgorithm::EcdsaP256.generate().unwrap();
        let pem = create_ca_certificate("test-ca", &key, Duration::from_secs(86400 * 365)).unwrap();
        (pem, key)
    }

    fn request(profile: Profile) -> IssueRequest {
        IssueRequest {
            profile,
            common_name: "alice".into(),
            organizations: vec!["system:masters".into()],
            dns_names: vec![],
            ip_addresses: vec![],
            ttl: Duration::from_secs(900),
            backdate: Duration::from_secs(300),
        }
    }

    #[test]
    fn client_certificate_has_the_right_subject_usage_and_window() {
        let (ca_pem, ca_key) = ca();
        let iss = issuer(&ca_pem, &ca_key).unwrap();
        let ca_end = certificate_info(&ca_pem).unwrap().not_after;
        let out = issue(
            &iss,
            ca_end,
            &request(Profile::Client),
            PublicKeySource::Generate(KeyAlgorithm::EcdsaP256),
        )
        .unwrap();
        assert!(out.private_key_pem.is_some());
        let der = pem_to_der(&out.certificate_pem).unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        assert_eq!(cert.subject().to_string(), "CN=alice, O=system:masters");
        let eku = cert.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.client_auth && !eku.server_auth);
        let window = out.not_after.duration_since(out.not_before).unwrap();
        assert_eq!(window.as_secs(), 1200);
        assert_eq!(cert.raw_serial().len(), 16);
        // The returned private key is the certificate's key.
        let key = KeyPair::from_pem(out.private_key_pem.as_ref().unwrap()).unwrap();
        assert_eq!(
            cert.public_key().raw,
            key.subject_public_key_info().as_slice()
        );
    }

    #[test]
    fn extreme_lifetimes_are_field_errors() {
        let key = KeyAlgorithm::EcdsaP256.generate().unwrap();
        for secs in [u64::MAX, u64::MAX / 2, 101 * 365 * 86400] {
            let e = create_ca_certificate("t", &key, Duration::from_secs(secs)).unwrap_err();
            assert!(e.to_string().starts_with("validity_seconds:"), "{e}");
        }
        let (pem, ca_key) = ca();
        let issuer = issuer(&pem, ca_key).unwrap();
        let mut req = request(Profile::Client);
        req.ttl = Duration::from_secs(u64::MAX);
        req.backdate = Duration::from_secs(u64::MAX);
        let far = SystemTime::UNIX_EPOCH + MAX_VALIDITY + MAX_VALIDITY;
        let e = issue(
            &issuer,
            far,
            &req,
            PublicKeySource::Generate(KeyAlgorithm::EcdsaP256),
        )
        .map(|_| ())
        .expect_err("refused");
        assert!(e.to_string().starts_with("ttl:"), "{e}");
    }

    #[test]
    fn profiles_police_sans_and_ttl() {
        let (ca_pem, ca_key) = ca();
        let iss = issuer(&ca_pem, &ca_key).unwrap();
        let ca_end = certificate_info(&ca_pem).unwrap().not_after;
        let mut with_san = request(Profile::Client);
        with_san.dns_names.push("example.com".into());
        let err = issue(
            &iss,
            ca_end,
            &with_san,
            PublicKeySource::Generate(KeyAlgorithm::EcdsaP256),
        )
        .unwrap_err();
        assert!(err.to_string().starts_with("sans:"), "{err}");
        let err = issue(
            &iss,
            ca_end,
            &request(Profile::Server),
            PublicKeySource::Generate(KeyAlgorithm::EcdsaP256),
        )
        .unwrap_err();
        assert!(err.to_string().starts_with("sans:"), "{err}");
        let mut long = request(Profile::Client);
        long.ttl = Duration::from_secs(86400 * 400);
        assert!(
            issue(
                &iss,
                ca_end,
                &long,
                PublicKeySource::Generate(KeyAlgorithm::EcdsaP256)
            )
            .is_err()
        );
        let mut bad_dns = request(Profile::Server);
        bad_dns.dns_names.push("bad name!".into());
        assert!(
            issue(
                &iss,
                ca_end,
                &bad_dns,
                PublicKeySource::Generate(KeyAlgorithm::EcdsaP256)
            )
            .is_err()
        );
    }

    #[test]
    fn csr_signature_is_checked() {
        let (ca_pem, ca_key) = ca();
        let iss = issuer(&ca_pem, &ca_key).unwrap();
        let ca_end = certificate_info(&ca_pem).unwrap().not_after;
        let key = KeyAlgorithm::EcdsaP256.generate().unwrap();
        let mut p = CertificateParams::new(vec!["etcd-1".to_string()]).unwrap();
        p.distinguished_name.push(DnType::CommonName, "etcd-1");
        let csr = p.serialize_request(&key).unwrap().pem().unwrap();
        let mut server = request(Profile::Server);
        server.common_name.clear();
        server.organizations.clear();
        let out = issue(&iss, ca_end, &server, PublicKeySource::Csr(&csr)).unwrap();
        assert!(out.private_key_pem.is_none());
        assert!(
            certificate_info(&out.certificate_pem)
                .unwrap()
                .subject
                .contains("etcd-1")
        );
        // Flip one byte inside the signature: refused.
        let der = pem_to_der(&csr.replace("CERTIFICATE REQUEST", "CERTIFICATE")).unwrap();
        let mut bad = der.clone();
        let n = bad.len() - 3;
        bad[n] ^= 1;
        use base64::Engine;
        let b64 = base64::prelude::BASE64_STANDARD.encode(&bad);
        let bad_pem = format!(
            "-----BEGIN CERTIFICATE REQUEST-----\n{b64}\n-----END CERTIFICATE REQUEST-----\n"
        );
        let err = issue(&iss, ca_end, &server, PublicKeySource::Csr(&bad_pem)).unwrap_err();
        assert!(err.to_string().starts_with("csr:"), "{err}");
    }

    #[test]
    fn import_checks_the_pair() {
        let (ca_pem, ca_key) = ca();
        import_ca(&ca_pem, &ca_key.serialize_pem()).unwrap();
        let other = KeyAlgorithm::EcdsaP256.generate().unwrap();
        assert!(import_ca(&ca_pem, &other.serialize_pem()).is_err());
    }

    #[test]
    fn a_slot_certificate_carries_the_given_key_and_nothing_else_is_accepted() {
        let key = FreshP256::generate().expect("key");
        let der = slot_certificate(key.public_point(), "keyholder-vault").expect("cert");
        let (_, cert) = x509_parser::parse_x509_certificate(&der).expect("parses");
        assert_eq!(
            cert.public_key().subject_public_key.data.as_ref(),
            key.public_point()
        );
        assert!(cert.subject().to_string().contains("keyholder-vault"));
        assert_ne!(
            cert.subject(),
            cert.issuer(),
            "not self-signed: it vouches for nothing"
        );
        for bad in [&[][..], &[4u8; 64][..], &[2u8; 65][..]] {
            assert!(slot_certificate(bad, "x").is_err());
        }
    }
}
