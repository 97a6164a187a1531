//! What `keyholder cluster pki` issued for a cluster (version 3 of the
//! document): the spec it was run with, the CAs, every certificate with its
//! serial, subject, expiry and the files it was written to, and the
//! service-account signing key, which is kept so that re-runs reuse it
//! (a new one would invalidate every service-account token).

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

/// One cluster's issued PKI.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct ClusterPkiEntry {
    /// The cluster spec it was issued for (JSON, as keyholderd reads it).
    pub spec: serde_json::Value,
    /// Where the files were written (absolute).
    pub out_dir: String,
    /// The cluster CA's name in `cas`.
    pub cluster_ca: String,
    /// The etcd CA's name.
    pub etcd_ca: String,
    /// The front-proxy CA's name.
    pub front_proxy_ca: String,
    /// Issued certificates by id (`apiserver`, `kubelet/NODE`, ...).
    pub certificates: BTreeMap<String, IssuedCertificate>,
    /// Every file written, relative to `out_dir`: hex SHA-256 of its bytes
    /// as written (a file that no longer hashes so was changed by someone
    /// else and is not overwritten without `--force`).
    pub written: BTreeMap<String, String>,
    /// The service-account signing key pair.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service_account_key: Option<ServiceAccountKey>,
    /// RFC 3339, UTC.
    pub created_at: String,
    /// RFC 3339, UTC.
    pub updated_at: String,
}

/// One issued certificate and where it went.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct IssuedCertificate {
    /// The component (`apiserver`, `kubelet`, `etcd-peer`, ...).
    pub component: String,
    /// The issuing CA's name.
    pub ca: String,
    /// Hex serial.
    pub serial: String,
    /// Subject, as `CN=...,O=...`.
    pub subject: String,
    /// What it was issued for (names, usages, key, lifetime), so that a
    /// changed spec is noticed.
    pub requirement: String,
    /// The CA certificate's SHA-256 fingerprint at issuance.
    pub ca_fingerprint: String,
    /// Unix seconds.
    pub not_before: u64,
    /// Unix seconds.
    pub not_after: u64,
    /// Files written, relative to `out_dir`.
    pub files: Vec<String>,
}

/// The service-account signing key pair (`sa.key`, `sa.pub`).
#[derive(Clone, Serialize, Deserialize)]
pub struct ServiceAccountKey {
    /// `ecdsa-p256`, `rsa-2048`, ...
    pub algorithm: String,
    /// PKCS#8 PEM.
    #[serde(
        serialize_with = "crate::document::ser_secret",
        deserialize_with = "crate::document::de_secret"
    )]
    pub private_key_pem: Zeroizing<String>,
    /// SubjectPublicKeyInfo PEM.
    pub public_key_pem: String,
    /// RFC 3339, UTC.
    pub created_at: String,
}

impl fmt::Debug for ServiceAccountKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServiceAccountKey")
            .field("algorithm", &self.algorithm)
            .field("private_key_pem", &"<redacted>")
            .finish_non_exhaustive()
    }
}

/// Cluster PKI records by cluster name.
pub type ClusterPkis = BTreeMap<String, ClusterPkiEntry>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_the_service_account_key_stays_out_of_debug() {
        let pem = "-----BEGIN PRIVATE KEY-----\nSECRETKEYBYTES\n-----END PRIVATE KEY-----\n";
        let mut e = ClusterPkiEntry {
            out_dir: "/srv/prod-pki".into(),
            service_account_key: Some(ServiceAccountKey {
                algorithm: "ecdsa-p256".into(),
                private_key_pem: Zeroizing::new(pem.into()),
                public_key_pem: "-----BEGIN PUBLIC KEY-----\n".into(),
                created_at: "2026-12-03T00:00:00Z".into(),
            }),
            ..Default::default()
        };
        e.certificates.insert(
            "apiserver".into(),
            IssuedCertificate {
                serial: "0a".into(),
                not_after: 1_800_000_000,
                files: vec!["pki/apiserver.crt".into(), "pki/apiserver.key".into()],
                ..Default::default()
            },
        );
        assert!(!format!("{e:?}").contains("SECRETKEYBYTES"));
        let text = serde_json::to_string(&e).unwrap();
        let back: ClusterPkiEntry = serde_json::from_str(&text).unwrap();
        assert_eq!(back.certificates, e.certificates);
        assert_eq!(
            back.service_account_key.unwrap().private_key_pem.as_str(),
            pem
        );
        // Fields missing (or added by a later version) still read.
        let sparse: ClusterPkiEntry = serde_json::from_str(
            r#"{ "out_dir": "/x", "certificates": { "a": { "serial": "1", "later": true } } }"#,
        )
        .unwrap();
        assert_eq!(sparse.certificates["a"].serial, "1");
        assert!(sparse.service_account_key.is_none());
    }
}
