//! ECDSA P-256 signatures with nonces prepared ahead of time.
//!
//! An ECDSA signature (SEC 1 §4.1.3) is `r = x(kG) mod n` and
//! `s = k⁻¹(z + r·d) mod n` for a fresh secret nonce `k`, digest `z` and key
//! `d`. Almost all of its cost is the multiplication `kG` and the inversion
//! of `k`, and neither depends on the key or the message. A CA that issues
//! certificates on demand can therefore compute `(k⁻¹, r)` pairs on a spare
//! thread and, when a request comes, spend two scalar multiplications on
//! the final step.
//!
//! Why by hand: ring signs with a nonce it draws itself, and the RustCrypto
//! `ecdsa` crate's low-level API takes `k` but still multiplies `kG` inside
//! the call; no maintained crate signs with a caller-prepared `(k⁻¹, r)`.
//! What is written here is only that last formula and the batching of the
//! inversions, on `p256`'s constant-time scalar arithmetic; `kG` is ring's
//! fixed-base multiplication (through its key generation, which is the same
//! operation), the encoding is `p256`'s.
//!
//! A nonce is as secret as the key it signs with: anyone who learns `k` (or
//! `k⁻¹`) and sees the signature can solve for `d`, and a nonce used twice
//! gives `d` away to anyone who sees both signatures. So a [`Nonce`] is
//! consumed by the signature that uses it (it is moved in and dropped), is
//! zeroized on drop, has no `Clone`, and its `Debug` shows nothing.

use p256::elliptic_curve::Field;
use p256::elliptic_curve::ops::Reduce;
use p256::{FieldBytes, NonZeroScalar, Scalar, U256};
use ring::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair};
use sha2::{Digest, Sha256};
use zeroize::{Zeroize, Zeroizing};

use crate::{PkiError, Result};

/// A P-256 key pair as ring generates it: the PKCS#8 document with the
/// positions of the private scalar and the uncompressed public point in it.
pub(crate) struct RingP256 {
    pub(crate) pkcs8: Zeroizing<Vec<u8>>,
}

/// ring writes P-256 PKCS#8 v1 documents from one fixed template: the
/// ECPrivateKey's 32-byte OCTET STRING at bytes 36..68, then `[1]` with the
/// public key's BIT STRING, the 65-byte point at 73..138.
const RING_PKCS8_LEN: usize = 138;
const RING_SCALAR_HEADER: [u8; 2] = [0x04, 0x20];
const RING_POINT_HEADER: [u8; 6] = [0xa1, 0x44, 0x03, 0x42, 0x00, 0x04];

impl RingP256 {
    /// A new key pair, or an error if ring's layout is not the expected one.
    /// ring's own copy of the document is freed without being zeroized (its
    /// `Document` offers no way to); ours is.
    pub(crate) fn generate(rng: &ring::rand::SystemRandom) -> Result<Self> {
        let doc = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, rng)
            .map_err(|_| PkiError::Build("P-256 key generation failed".into()))?;
        let pkcs8 = Zeroizing::new(doc.as_ref().to_vec());
        let layout_ok = pkcs8.len() == RING_PKCS8_LEN
            && pkcs8.get(34..36) == Some(&RING_SCALAR_HEADER[..])
            && pkcs8.get(68..74) == Some(&RING_POINT_HEADER[..]);
        if !layout_ok {
            return Err(PkiError::Build("unexpected PKCS#8 layout from ring".into()));
        }
        Ok(Self { pkcs8 })
    }

    /// The private scalar, big-endian.
    pub(crate) fn scalar_bytes(&self) -> &[u8] {
        &self.pkcs8[36..68]
    }

    /// The public key, an uncompressed SEC1 point.
    pub(crate) fn point(&self) -> &[u8] {
        &self.pkcs8[73..]
    }
}

/// One prepared nonce: `k⁻¹` and `r = x(kG) mod n`. Use it for one signature.
/// `k⁻¹` is boxed so that moving a nonce (into and out of the stock, as a
/// vector grows) moves a pointer and leaves no copy of the secret behind.
pub struct Nonce {
    k_inv: Box<Scalar>,
    r: Scalar,
}

impl Drop for Nonce {
    fn drop(&mut self) {
        self.k_inv.zeroize();
    }
}

impl std::fmt::Debug for Nonce {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Nonce(..)")
    }
}

impl Nonce {
    /// `count` fresh nonces. Each `k` comes from the operating system's
    /// CSPRNG (through ring); the inversions share one constant-time
    /// inversion (Montgomery's batch trick), so a batch of 16 costs little
    /// more than its 16 multiplications.
    pub fn prepare(count: usize) -> Result<Vec<Nonce>> {
        let rng = ring::rand::SystemRandom::new();
        let mut ks: Zeroizing<Vec<Scalar>> = Zeroizing::new(Vec::with_capacity(count));
        let mut rs = Vec::with_capacity(count);
        while ks.len() < count {
            let pair = RingP256::generate(&rng)?;
            let mut k = Option::<NonZeroScalar>::from(NonZeroScalar::from_repr(
                *FieldBytes::from_slice(pair.scalar_bytes()),
            ))
            .ok_or_else(|| PkiError::Build("ring produced an invalid P-256 scalar".into()))?;
            let r = <Scalar as Reduce<U256>>::reduce_bytes(FieldBytes::from_slice(
                &pair.point()[1..33],
            ));
            // r = 0 happens with probability about 2^-256; draw again.
            if bool::from(r.is_zero()) {
                continue;
            }
            ks.push(*k);
            k.zeroize();
            rs.push(r);
        }
        let inverses = batch_invert(&ks)?;
        Ok(inverses
            .iter()
            .zip(rs)
            .map(|(k_inv, r)| Nonce {
                k_inv: Box::new(*k_inv),
                r,
            })
            .collect())
    }
}

/// The inverses of non-zero scalars with one inversion: prefix products
/// forward, one inversion of the total, then back again peeling one factor
/// per step. The intermediate products are zeroized.
fn batch_invert(values: &[Scalar]) -> Result<Zeroizing<Vec<Scalar>>> {
    let mut prefix: Zeroizing<Vec<Scalar>> = Zeroizing::new(Vec::with_capacity(values.len()));
    let mut acc = Scalar::ONE;
    for v in values {
        prefix.push(acc);
        acc *= v;
    }
    let mut inv = Zeroizing::new(
        Option::<Scalar>::from(acc.invert())
            .ok_or_else(|| PkiError::Build("nonce product is zero".into()))?,
    );
    acc.zeroize();
    let mut out: Zeroizing<Vec<Scalar>> = Zeroizing::new(vec![Scalar::ZERO; values.len()]);
    for i in (0..values.len()).rev() {
        // inv = (v_0 ... v_i)^-1 here.
        out[i] = *inv * prefix[i];
        *inv *= values[i];
    }
    Ok(out)
}

/// A P-256 private key that signs with prepared nonces.
pub struct PreparedSigner {
    d: NonZeroScalar,
}

impl Drop for PreparedSigner {
    fn drop(&mut self) {
        // Overwritten with one: zero is not a valid NonZeroScalar.
        self.d.zeroize();
    }
}

impl std::fmt::Debug for PreparedSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PreparedSigner(..)")
    }
}

impl PreparedSigner {
    /// The signer for a PKCS#8 P-256 private key whose public key must be
    /// `expected_point` (uncompressed SEC1): a key that does not match its
    /// certificate is refused rather than producing signatures nobody can
    /// verify.
    pub fn from_pkcs8_der(der: &[u8], expected_point: &[u8]) -> Result<Self> {
        use p256::elliptic_curve::sec1::ToEncodedPoint;
        use p256::pkcs8::DecodePrivateKey;
        let secret = p256::SecretKey::from_pkcs8_der(der)
            .map_err(|_| PkiError::Parse("not a P-256 PKCS#8 private key".into()))?;
        if secret.public_key().to_encoded_point(false).as_bytes() != expected_point {
            return Err(PkiError::Parse(
                "the P-256 key does not match its public key".into(),
            ));
        }
        Ok(Self {
            d: secret.to_nonzero_scalar(),
        })
    }

    /// Signs SHA-256(`msg`) with `nonce`, consuming it; the signature in
    /// DER (the form X.509 carries). `None` in the one case the formula
    /// cannot use this nonce (s = 0, probability about 2^-256): the caller
    /// signs another way.
    pub fn sign(&self, nonce: Nonce, msg: &[u8]) -> Option<Vec<u8>> {
        let z = <Scalar as Reduce<U256>>::reduce_bytes(&Sha256::digest(msg));
        let s = *nonce.k_inv * (z + nonce.r * *self.d);
        let r = NonZeroScalar::new(nonce.r).into_option()?;
        let s = NonZeroScalar::new(s).into_option()?;
        let sig = p256::ecdsa::Signature::from_scalars(r, s).ok()?;
        Some(sig.to_der().as_bytes().to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use p256::pkcs8::EncodePrivateKey;
    use ring::signature::{ECDSA_P256_SHA256_ASN1, UnparsedPublicKey};

    fn key() -> (Zeroizing<Vec<u8>>, Vec<u8>) {
        let pair = RingP256::generate(&ring::rand::SystemRandom::new()).expect("key");
        (pair.pkcs8.clone(), pair.point().to_vec())
    }

    #[test]
    fn ring_layout_matches_the_key_it_describes() {
        let pair = RingP256::generate(&ring::rand::SystemRandom::new()).expect("key");
        let secret = p256::SecretKey::from_slice(pair.scalar_bytes()).expect("scalar");
        use p256::elliptic_curve::sec1::ToEncodedPoint;
        assert_eq!(
            secret.public_key().to_encoded_point(false).as_bytes(),
            pair.point()
        );
    }

    #[test]
    fn batch_inverses_are_inverses() {
        let values: Vec<Scalar> = (1..=17u64).map(|i| Scalar::from(i * 7919)).collect();
        let inv = batch_invert(&values).expect("invert");
        for (v, i) in values.iter().zip(inv.iter()) {
            assert_eq!(*v * i, Scalar::ONE);
        }
        assert!(batch_invert(&[Scalar::ONE, Scalar::ZERO]).is_err());
    }

    #[test]
    fn signatures_verify_and_never_repeat() {
        let (der, point) = key();
        let signer = PreparedSigner::from_pkcs8_der(&der, &point).expect("signer");
        let verifier = UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, &point);
        let nonces = Nonce::prepare(40).expect("nonces");
        let mut seen = std::collections::HashSet::new();
        for (i, nonce) in nonces.into_iter().enumerate() {
            let msg = format!("tbsCertificate {}", i % 3);
            let sig = signer.sign(nonce, msg.as_bytes()).expect("signature");
            verifier
                .verify(msg.as_bytes(), &sig)
                .expect("ring verifies the signature");
            // A repeated r would mean a repeated nonce.
            let parsed = p256::ecdsa::Signature::from_der(&sig).expect("DER");
            assert!(seen.insert(parsed.r().to_bytes().to_vec()), "nonce reused");
            // The wrong message does not verify.
            assert!(verifier.verify(b"other", &sig).is_err());
        }
    }

    #[test]
    fn a_key_that_does_not_match_is_refused() {
        let (der, _) = key();
        let (_, other_point) = key();
        assert!(PreparedSigner::from_pkcs8_der(&der, &other_point).is_err());
        assert!(PreparedSigner::from_pkcs8_der(b"\x30\x03junk", &other_point).is_err());
        // A PKCS#8 written by another encoder is accepted.
        let secret = p256::SecretKey::from_slice(&[0x42; 32]).expect("scalar");
        use p256::elliptic_curve::sec1::ToEncodedPoint;
        let point = secret.public_key().to_encoded_point(false);
        let doc = secret.to_pkcs8_der().expect("encode");
        assert!(PreparedSigner::from_pkcs8_der(doc.as_bytes(), point.as_bytes()).is_ok());
    }

    #[test]
    fn debug_shows_no_secret() {
        let nonce = Nonce::prepare(1).expect("nonce").pop().expect("one");
        assert_eq!(format!("{nonce:?}"), "Nonce(..)");
        let (der, point) = key();
        let signer = PreparedSigner::from_pkcs8_der(&der, &point).expect("signer");
        assert_eq!(format!("{signer:?}"), "PreparedSigner(..)");
    }
}
