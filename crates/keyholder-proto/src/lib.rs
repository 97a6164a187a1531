//! The `keyholder.v1` gRPC API, generated from `proto/keyholder/v1/keyholder.proto`.
//!
//! This crate holds the generated code, plus [`socket`]: the default socket
//! paths and the Unix-socket dial, so the daemon and its Rust clients agree on
//! them without a client depending on the daemon. The `.proto` file is the
//! contract for clients in every language; Rust clients and the daemon use
//! these types. Messages that carry a PIN or a secret value have a
//! hand-written `Debug` that redacts it.

#![forbid(unsafe_code)]

pub mod socket;
pub mod tls;

/// Generated messages, clients and servers of package `keyholder.v1`.
pub mod v1 {
    #![allow(missing_docs, clippy::all, clippy::pedantic)]
    tonic::include_proto!("keyholder.v1");

    /// The encoded file descriptor set, for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("keyholder_descriptor");
}

use std::fmt;

impl fmt::Debug for v1::UnlockRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UnlockRequest")
            .field("pin", &"<redacted>")
            .field("allow_final_pin_try", &self.allow_final_pin_try)
            .field("ttl_seconds", &self.ttl_seconds)
            .field("idle_timeout_seconds", &self.idle_timeout_seconds)
            .finish()
    }
}

impl fmt::Debug for v1::InitRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InitRequest")
            .field("token", &self.token)
            .field("pin", &"<redacted>")
            .field("allow_final_pin_try", &self.allow_final_pin_try)
            .field("recovery_recipient", &self.recovery_recipient)
            .finish()
    }
}

impl fmt::Debug for v1::PutSecretRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PutSecretRequest")
            .field("name", &self.name)
            .field(
                "value",
                &format_args!("<{} bytes redacted>", self.value.len()),
            )
            .field("overwrite", &self.overwrite)
            .finish()
    }
}

impl fmt::Debug for v1::GetSecretResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GetSecretResponse")
            .field(
                "value",
                &format_args!("<{} bytes redacted>", self.value.len()),
            )
            .field("metadata", &self.metadata)
            .finish()
    }
}

impl fmt::Debug for v1::ImportCaRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ImportCaRequest")
            .field("name", &self.name)
            .field("private_key_pem", &"<redacted>")
            .field("max_ttl_seconds", &self.max_ttl_seconds)
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for v1::ImportKeyRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ImportKeyRequest")
            .field("name", &self.name)
            .field("private_key", &"<redacted>")
            .field("passphrase", &"<redacted>")
            .field("usages", &self.usages)
            .field("pkcs11_uri", &self.pkcs11_uri)
            .finish()
    }
}

impl fmt::Debug for v1::IssueCertificateResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IssueCertificateResponse")
            .field("serial", &self.serial)
            .field("private_key_pem", &"<redacted>")
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for v1::IssueKubeconfigResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IssueKubeconfigResponse")
            .field("kubeconfig", &"<redacted>")
            .field("expires_at", &self.expires_at)
            .finish()
    }
}

impl fmt::Debug for v1::ClusterPkiFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClusterPkiFile")
            .field("path", &self.path)
            .field("content", &format_args!("<{} bytes>", self.content.len()))
            .field("private", &self.private)
            .finish()
    }
}

impl fmt::Debug for v1::IssueExecCredentialResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IssueExecCredentialResponse")
            .field("exec_credential", &"<redacted>")
            .field("expires_at", &self.expires_at)
            .field("cached", &self.cached)
            .finish()
    }
}

impl fmt::Debug for v1::SetPolicyRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SetPolicyRequest")
            .field("policy_toml", &self.policy_toml.len())
            .field("pin", &"<redacted>")
            .finish()
    }
}

impl fmt::Debug for v1::CreateGrantRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CreateGrantRequest")
            .field("name", &self.name)
            .field("allow", &self.allow)
            .field("max_ttl_seconds", &self.max_ttl_seconds)
            .field("expires_seconds", &self.expires_seconds)
            .field("exe", &self.exe)
            .field("unit", &self.unit)
            .field("groups", &self.groups)
            .field("pin", &"<redacted>")
            .finish()
    }
}

impl fmt::Debug for v1::CreateGrantResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CreateGrantResponse")
            .field("grant", &self.grant)
            .field("token", &"<redacted>")
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::v1;

    #[test]
    fn debug_output_never_shows_pins_or_values() {
        let unlock = v1::UnlockRequest {
            pin: "123456-secret-pin".into(),
            ..Default::default()
        };
        assert!(!format!("{unlock:?}").contains("123456-secret-pin"));
        let put = v1::PutSecretRequest {
            name: "db/pw".into(),
            value: b"hunter2-value".to_vec(),
            overwrite: false,
        };
        let shown = format!("{put:?}");
        assert!(shown.contains("db/pw") && !shown.contains("hunter2"));
    }
}
