//! Kubernetes client configuration: kubeconfig files and the
//! `client.authentication.k8s.io` ExecCredential of credential plugins.
//!
//! kubeconfigs are written as YAML by hand: the structure is fixed, every
//! scalar is written as a JSON string (a valid YAML double-quoted scalar), and
//! no maintained YAML serializer is left in the Rust ecosystem to lean on.

use std::time::SystemTime;

use base64::Engine;
use base64::prelude::BASE64_STANDARD;
use serde::Deserialize;
use zeroize::Zeroizing;

use crate::PkiError;

/// ExecCredential API versions Keyholder speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExecApiVersion {
    /// `client.authentication.k8s.io/v1` (kubectl 1.22 and later).
    V1,
    /// `client.authentication.k8s.io/v1beta1` (kubectl 1.11 to today).
    V1Beta1,
}

impl ExecApiVersion {
    /// The apiVersion string.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::V1 => "client.authentication.k8s.io/v1",
            Self::V1Beta1 => "client.authentication.k8s.io/v1beta1",
        }
    }

    /// Parses `v1`, `v1beta1` or a full apiVersion.
    pub fn parse(s: &str) -> Result<Self, PkiError> {
        match s {
            "v1" | "client.authentication.k8s.io/v1" => Ok(Self::V1),
            "v1beta1" | "client.authentication.k8s.io/v1beta1" => Ok(Self::V1Beta1),
            other => Err(PkiError::Invalid {
                field: "api_version",
                reason: format!("{other:?} is not client.authentication.k8s.io/v1 or v1beta1"),
            }),
        }
    }
}

#[derive(Deserialize)]
struct ExecInfo {
    #[serde(rename = "apiVersion")]
    api_version: String,
    kind: String,
}

/// The apiVersion kubectl asks for in `KUBERNETES_EXEC_INFO`; `None` (unset
/// or empty) means the plugin chooses.
pub fn requested_api_version(exec_info: Option<&str>) -> Result<Option<ExecApiVersion>, PkiError> {
    let Some(text) = exec_info.filter(|t| !t.trim().is_empty()) else {
        return Ok(None);
    };
    let bad = |reason: String| PkiError::Invalid {
        field: "KUBERNETES_EXEC_INFO",
        reason,
    };
    let info: ExecInfo = serde_json::from_str(text)
        .map_err(|e| bad(format!("is not an ExecCredential JSON object ({e})")))?;
    if info.kind != "ExecCredential" {
        return Err(bad(format!(
            "kind is {:?}, not \"ExecCredential\"",
            info.kind
        )));
    }
    ExecApiVersion::parse(&info.api_version)
        .map(Some)
        .map_err(|_| {
            bad(format!(
                "apiVersion {:?} is not supported",
                info.api_version
            ))
        })
}

fn rfc3339(t: SystemTime) -> String {
    let odt = time::OffsetDateTime::from(t);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
        odt.year(),
        u8::from(odt.month()),
        odt.day(),
        odt.hour(),
        odt.minute(),
        odt.second()
    )
}

/// The ExecCredential JSON a plugin prints on stdout.
pub fn exec_credential(
    version: ExecApiVersion,
    certificate_pem: &str,
    private_key_pem: &str,
    expires: SystemTime,
) -> Zeroizing<String> {
    let value = serde_json::json!({
        "apiVersion": version.as_str(),
        "kind": "ExecCredential",
        "status": {
            "expirationTimestamp": rfc3339(expires),
            "clientCertificateData": certificate_pem,
            "clientKeyData": private_key_pem,
        }
    });
    Zeroizing::new(value.to_string())
}

fn q(s: &str) -> String {
    // A JSON string is a valid YAML double-quoted scalar.
    serde_json::Value::String(s.to_owned()).to_string()
}

/// The user part of a kubeconfig.
pub enum KubeUser<'a> {
    /// Embedded client certificate and key.
    Certificate {
        /// PEM.
        certificate_pem: &'a str,
        /// PEM.
        private_key_pem: &'a str,
    },
    /// An exec credential plugin.
    Exec {
        /// The command (an absolute path is most robust).
        command: &'a str,
        /// Its arguments.
        args: &'a [String],
        /// The ExecCredential version the plugin answers with.
        api_version: ExecApiVersion,
    },
}

/// A kubeconfig with one cluster, one user and one context named `name`.
pub fn kubeconfig(
    name: &str,
    server: &str,
    ca_pem: &str,
    user_name: &str,
    user: &KubeUser<'_>,
) -> Zeroizing<String> {
    let ca = BASE64_STANDARD.encode(ca_pem);
    let context = format!("{user_name}@{name}");
    let mut out = Zeroizing::new(String::with_capacity(4096));
    out.push_str("apiVersion: v1\nkind: Config\nclusters:\n");
    out.push_str(&format!(
        "- name: {}\n  cluster:\n    server: {}\n    certificate-authority-data: {}\n",
        q(name),
        q(server),
        q(&ca)
    ));
    out.push_str(&format!("users:\n- name: {}\n  user:\n", q(&context)));
    match user {
        KubeUser::Certificate {
            certificate_pem,
            private_key_pem,
        } => {
            out.push_str(&format!(
                "    client-certificate-data: {}\n",
                q(&BASE64_STANDARD.encode(certificate_pem))
            ));
            let key = Zeroizing::new(BASE64_STANDARD.encode(private_key_pem));
            out.push_str("    client-key-data: \"");
            out.push_str(&key);
            out.push_str("\"\n");
        }
        KubeUser::Exec {
            command,
            args,
            api_version,
        } => {
            out.push_str(&format!(
                "    exec:\n      apiVersion: {}\n      command: {}\n      args:\n",
                q(api_version.as_str()),
                q(command)
            ));
            for a in *args {
                out.push_str(&format!("      - {}\n", q(a)));
            }
            out.push_str("      interactiveMode: \"Never\"\n      provideClusterInfo: false\n");
            out.push_str("      installHint: \"Keyholder's CLI must be installed and `keyholder unlock` run first.\"\n");
        }
    }
    out.push_str(&format!(
        "contexts:\n- name: {}\n  context:\n    cluster: {}\n    user: {}\ncurrent-context: {}\n",
        q(&context),
        q(name),
        q(&context),
        q(&context)
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exec_info_selects_the_version_and_rejects_garbage() {
        assert_eq!(requested_api_version(None).unwrap(), None);
        assert_eq!(requested_api_version(Some("")).unwrap(), None);
        let v1b1 = r#"{"kind":"ExecCredential","apiVersion":"client.authentication.k8s.io/v1beta1","spec":{"interactive":false}}"#;
        assert_eq!(
            requested_api_version(Some(v1b1)).unwrap(),
            Some(ExecApiVersion::V1Beta1)
        );
        for bad in [
            "{",
            "[]",
            r#"{"kind":"Pod","apiVersion":"v1"}"#,
            r#"{"kind":"ExecCredential","apiVersion":"client.authentication.k8s.io/v2"}"#,
        ] {
            let err = requested_api_version(Some(bad)).unwrap_err();
            assert!(err.to_string().starts_with("KUBERNETES_EXEC_INFO"), "{err}");
        }
    }

    #[test]
    fn exec_credential_has_the_fields_kubectl_reads() {
        let t = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_800_000_000);
        let json = exec_credential(ExecApiVersion::V1, "CERT", "KEY", t);
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["status"]["expirationTimestamp"], "2027-01-15T08:00:00Z");
        assert_eq!(v["status"]["clientKeyData"], "KEY");
        assert_eq!(v["apiVersion"], "client.authentication.k8s.io/v1");
    }
}
