//! The one list of key algorithms Keyholder creates and uses keys with:
//! CA keys, keys issued to callers, and signing keys in the vault.

use rcgen::KeyPair;

use crate::{PkiError, Result, invalid};

/// A key algorithm: for CA keys, keys issued to callers, and signing keys.
/// Serialised (in the vault document) as its [`KeyAlgorithm::as_str`] name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum KeyAlgorithm {
    /// Ed25519: accepted by Go's TLS stack (etcd, Kubernetes 1.x), not by every other peer.
    #[serde(rename = "ed25519")]
    Ed25519,
    /// ECDSA P-256 with SHA-256: accepted by every Kubernetes and etcd version.
    #[serde(rename = "ecdsa-p256")]
    EcdsaP256,
    /// RSA-2048, signing PKCS#1 v1.5 with SHA-256 in certificates: what
    /// kubeadm and most existing PKIs use. Not offered for signing keys.
    #[serde(rename = "rsa-2048")]
    Rsa2048,
    /// RSA-3072.
    #[serde(rename = "rsa-3072")]
    Rsa3072,
    /// RSA-4096.
    #[serde(rename = "rsa-4096")]
    Rsa4096,
}

impl KeyAlgorithm {
    /// The canonical name, as stored in the vault and shown to users.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ed25519 => "ed25519",
            Self::EcdsaP256 => "ecdsa-p256",
            Self::Rsa2048 => "rsa-2048",
            Self::Rsa3072 => "rsa-3072",
            Self::Rsa4096 => "rsa-4096",
        }
    }

    /// The RSA modulus size, for RSA.
    pub fn rsa_bits(self) -> Option<usize> {
        match self {
            Self::Rsa2048 => Some(2048),
            Self::Rsa3072 => Some(3072),
            Self::Rsa4096 => Some(4096),
            Self::Ed25519 | Self::EcdsaP256 => None,
        }
    }

    /// Whether this is RSA (its private-key operations take milliseconds).
    pub fn is_rsa(self) -> bool {
        self.rsa_bits().is_some()
    }

    /// The algorithm of an RSA key with `bits`, when Keyholder uses that size.
    pub fn rsa(bits: usize) -> Option<Self> {
        match bits {
            2048 => Some(Self::Rsa2048),
            3072 => Some(Self::Rsa3072),
            4096 => Some(Self::Rsa4096),
            _ => None,
        }
    }

    /// Parses a certificate key algorithm (`key_algorithm` of CA creation
    /// and issuance): `p256` / `ecdsa-p256` / `ecdsa` / empty, `ed25519`,
    /// `rsa-2048`, `rsa-3072` (also `rsa`), `rsa-4096`.
    pub fn parse_certificate_key(s: &str) -> Result<Self> {
        match s {
            "" | "p256" | "ecdsa-p256" | "ecdsa" => Ok(Self::EcdsaP256),
            "ed25519" => Ok(Self::Ed25519),
            "rsa-2048" => Ok(Self::Rsa2048),
            "rsa" | "rsa-3072" => Ok(Self::Rsa3072),
            "rsa-4096" => Ok(Self::Rsa4096),
            other => Err(invalid(
                "key_algorithm",
                format!(
                    "{other:?} is not supported; use p256, ed25519, rsa-2048, rsa-3072 or rsa-4096"
                ),
            )),
        }
    }

    /// Parses a signing key type (`type` of key generation): `ed25519`,
    /// `ecdsa-p256` (also `p256`), `rsa-3072`, `rsa-4096`.
    pub fn parse_signing_key(s: &str) -> Result<Self> {
        match s {
            "ed25519" => Ok(Self::Ed25519),
            "ecdsa-p256" | "p256" => Ok(Self::EcdsaP256),
            "rsa-3072" => Ok(Self::Rsa3072),
            "rsa-4096" => Ok(Self::Rsa4096),
            other => Err(invalid(
                "type",
                format!("{other:?} is not one of ed25519, ecdsa-p256, rsa-3072, rsa-4096"),
            )),
        }
    }

    /// A new rcgen key pair of this algorithm. RSA generation takes tenths
    /// of a second to seconds.
    pub fn generate(self) -> Result<KeyPair> {
        let build = |e: String| PkiError::Build(e);
        match self {
            Self::EcdsaP256 => KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256),
            Self::Ed25519 => KeyPair::generate_for(&rcgen::PKCS_ED25519),
            Self::Rsa2048 | Self::Rsa3072 | Self::Rsa4096 => {
                // ring signs RSA but cannot generate keys; the rsa crate does.
                return crate::keys::rsa_pkcs8(self).and_then(|der| {
                    // rcgen signs an RSA PKCS#8 key with PKCS#1 v1.5 and SHA-256.
                    KeyPair::try_from(der.as_slice()).map_err(|e| build(e.to_string()))
                });
            }
        }
        .map_err(|e| build(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_the_two_parsers_differ_only_where_meant() {
        for alg in [
            KeyAlgorithm::Ed25519,
            KeyAlgorithm::EcdsaP256,
            KeyAlgorithm::Rsa2048,
            KeyAlgorithm::Rsa3072,
            KeyAlgorithm::Rsa4096,
        ] {
            assert_eq!(
                KeyAlgorithm::parse_certificate_key(alg.as_str()).unwrap(),
                alg
            );
            assert_eq!(
                KeyAlgorithm::rsa(alg.rsa_bits().unwrap_or(0)).is_some(),
                alg.is_rsa()
            );
        }
        assert!(KeyAlgorithm::parse_signing_key("rsa-2048").is_err());
        assert!(KeyAlgorithm::parse_signing_key("").is_err());
        assert_eq!(
            KeyAlgorithm::parse_certificate_key("").unwrap(),
            KeyAlgorithm::EcdsaP256
        );
        let e = KeyAlgorithm::parse_certificate_key("dsa").unwrap_err();
        assert!(e.to_string().starts_with("key_algorithm:"), "{e}");
        let e = KeyAlgorithm::parse_signing_key("dsa").unwrap_err();
        assert!(e.to_string().starts_with("type:"), "{e}");
    }
}
