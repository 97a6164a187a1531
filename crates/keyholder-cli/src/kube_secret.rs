//! `keyholder kube-secret`: prints a Kubernetes Secret manifest whose data
//! comes from the vault (`--from key=secret`) or from a certificate issued
//! on the spot by a Keyholder CA (`--from-cert CA`), for
//! `| kubectl apply -f -`. The repository holds only the command.

use std::collections::BTreeMap;
use std::time::Duration;

use base64::Engine;
use base64::prelude::BASE64_STANDARD;
use keyholder_proto::v1;
use tonic::transport::Channel;
use zeroize::Zeroizing;

use crate::failure::{CliResult, Failure};
use crate::input::seconds;
use crate::run::read_secrets;

/// The type `--from-cert` implies, and the keys it needs.
const TLS_TYPE: &str = "kubernetes.io/tls";

#[derive(clap::Args, Debug)]
pub(crate) struct KubeSecretArgs {
    /// The Secret's name (metadata.name).
    name: String,
    /// The Secret's namespace.
    #[arg(long, short = 'n')]
    namespace: String,
    /// KEY=SECRET: data key KEY holds the value of the vault secret SECRET
    /// (repeatable), e.g. password=db/prod/password.
    #[arg(long = "from", value_name = "KEY=SECRET")]
    from: Vec<String>,
    /// The Secret's type (default Opaque; kubernetes.io/tls with --from-cert).
    #[arg(long = "type", value_name = "TYPE")]
    secret_type: Option<String>,
    /// Issue a certificate from this Keyholder X.509 CA now and put it in
    /// tls.crt, its key in tls.key and the CA certificate in ca.crt. Takes
    /// the flags of `keyholder cert issue`: --cn, --o, --san, --profile,
    /// --ttl, --key-algorithm.
    #[arg(long, value_name = "CA")]
    from_cert: Option<String>,
    /// With --from-cert: client, server (default) or peer.
    #[arg(long, default_value = "server", requires = "from_cert")]
    profile: String,
    /// With --from-cert: subject CN (default: the Secret's name).
    #[arg(long, requires = "from_cert")]
    cn: Option<String>,
    /// With --from-cert: subject O (repeatable).
    #[arg(long = "o", requires = "from_cert")]
    organizations: Vec<String>,
    /// With --from-cert: a DNS name or IP address (repeatable).
    #[arg(long = "san", requires = "from_cert")]
    sans: Vec<String>,
    /// With --from-cert: lifetime (default: as `cert issue`).
    #[arg(long, value_parser = humantime::parse_duration, requires = "from_cert")]
    ttl: Option<Duration>,
    /// With --from-cert: p256 (default), ed25519, rsa-2048, rsa-3072 or rsa-4096.
    #[arg(long, default_value = "p256", requires = "from_cert")]
    key_algorithm: String,
    /// A label KEY=VALUE on the Secret (repeatable).
    #[arg(long = "label", value_name = "KEY=VALUE")]
    labels: Vec<String>,
}

/// Whether `s` is a DNS subdomain name (RFC 1123), as Kubernetes requires
/// of names and namespaces: at most 253 characters of a-z 0-9 - and .,
/// starting and ending with a letter or digit.
fn dns_subdomain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && s.starts_with(|c: char| c.is_ascii_alphanumeric())
        && s.ends_with(|c: char| c.is_ascii_alphanumeric())
}

/// A label name or value part: at most 63 of `[-._a-zA-Z0-9]`, beginning
/// and ending with a letter or digit; `empty_ok` for values.
fn label_part(s: &str, empty_ok: bool) -> bool {
    if s.is_empty() {
        return empty_ok;
    }
    s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
        && s.starts_with(|c: char| c.is_ascii_alphanumeric())
        && s.ends_with(|c: char| c.is_ascii_alphanumeric())
}

/// Whether `s` is a label key: an optional DNS subdomain prefix and `/`,
/// then a name ([`label_part`]).
fn label_key(s: &str) -> bool {
    match s.split_once('/') {
        Some((prefix, name)) => dns_subdomain(prefix) && label_part(name, false),
        None => label_part(s, false),
    }
}

/// Whether `s` may be a key in a Secret's data: `[-._a-zA-Z0-9]+`, at
/// most 253 characters.
fn data_key(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
        && s != "."
        && s != ".."
}

/// The Secret as a JSON object (kubectl reads JSON manifests as well as
/// YAML).
fn manifest(
    args: &KubeSecretArgs,
    secret_type: &str,
    labels: &BTreeMap<String, String>,
    data: &BTreeMap<String, Zeroizing<Vec<u8>>>,
) -> serde_json::Value {
    let mut metadata = serde_json::json!({"name": args.name, "namespace": args.namespace});
    if !labels.is_empty() {
        metadata["labels"] = serde_json::json!(labels);
    }
    let data: serde_json::Map<String, serde_json::Value> = data
        .iter()
        .map(|(k, v)| (k.clone(), BASE64_STANDARD.encode(v.as_slice()).into()))
        .collect();
    serde_json::json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": metadata,
        "type": secret_type,
        "data": data,
    })
}

/// The manifest as YAML: every key and scalar a JSON string or number,
/// which YAML reads as the same value (a key such as `on` or `01` stays a
/// string; nothing in a key can start a new line or document).
fn yaml(value: &serde_json::Value, indent: usize, out: &mut String) {
    if let serde_json::Value::Object(map) = value {
        for (k, v) in map {
            out.push_str(&" ".repeat(indent));
            out.push_str(&serde_json::Value::String(k.clone()).to_string());
            out.push(':');
            match v {
                serde_json::Value::Object(m) if m.is_empty() => out.push_str(" {}\n"),
                serde_json::Value::Object(_) => {
                    out.push('\n');
                    yaml(v, indent + 2, out);
                }
                other => {
                    out.push(' ');
                    out.push_str(&other.to_string());
                    out.push('\n');
                }
            }
        }
    }
}

fn usage(message: String) -> Failure {
    Failure::new(2, message)
}

pub(crate) async fn kube_secret(channel: Channel, args: KubeSecretArgs, json: bool) -> CliResult {
    if !dns_subdomain(&args.name) {
        return Err(usage(format!(
            "{:?} is not a Kubernetes name (lower-case letters, digits, - and ., at most 253)",
            args.name
        )));
    }
    if !dns_subdomain(&args.namespace) || args.namespace.contains('.') || args.namespace.len() > 63
    {
        return Err(usage(format!(
            "{:?} is not a Kubernetes namespace (lower-case letters, digits and -, at most 63)",
            args.namespace
        )));
    }
    let mut labels = BTreeMap::new();
    for pair in &args.labels {
        let Some((k, v)) = pair.split_once('=') else {
            return Err(usage(format!("--label {pair:?}: expected KEY=VALUE")));
        };
        if !label_key(k) || !label_part(v, true) {
            return Err(usage(format!(
                "--label {pair:?}: not a Kubernetes label (key: [prefix/]name, value: at most 63 of letters, digits, -, _ and ., starting and ending with a letter or digit)"
            )));
        }
        labels.insert(k.to_owned(), v.to_owned());
    }
    let mut wanted: BTreeMap<String, String> = BTreeMap::new();
    for pair in &args.from {
        let Some((key, name)) = pair.split_once('=') else {
            return Err(usage(format!(
                "--from {pair:?}: expected KEY=SECRET, e.g. password=db/prod/password"
            )));
        };
        if !data_key(key) {
            return Err(usage(format!(
                "--from {pair:?}: {key:?} is not a Secret data key (letters, digits, -, _ and .)"
            )));
        }
        if wanted.insert(key.to_owned(), name.to_owned()).is_some() {
            return Err(usage(format!("data key {key:?} is given twice")));
        }
    }
    if wanted.is_empty() && args.from_cert.is_none() {
        return Err(usage(
            "nothing to put in the Secret: give --from KEY=SECRET or --from-cert CA".into(),
        ));
    }
    let secret_type = match (&args.secret_type, &args.from_cert) {
        (Some(t), _) => t.clone(),
        (None, Some(_)) => TLS_TYPE.to_owned(),
        (None, None) => "Opaque".to_owned(),
    };
    let mut secrets = v1::secrets_client::SecretsClient::new(channel.clone());
    let values = read_secrets(&mut secrets, wanted.values().cloned()).await?;
    let mut data: BTreeMap<String, Zeroizing<Vec<u8>>> = BTreeMap::new();
    for (key, name) in &wanted {
        if let Some(v) = values.get(name) {
            data.insert(key.clone(), v.clone());
        }
    }
    if let Some(ca) = &args.from_cert {
        for key in ["tls.crt", "tls.key", "ca.crt"] {
            if data.contains_key(key) {
                return Err(usage(format!(
                    "--from-cert writes {key}; do not also give it with --from"
                )));
            }
        }
        let (ip_addresses, dns_names): (Vec<String>, Vec<String>) = args
            .sans
            .iter()
            .cloned()
            .partition(|s| s.parse::<std::net::IpAddr>().is_ok());
        let mut creds = v1::credentials_client::CredentialsClient::new(channel);
        let resp = creds
            .issue_certificate(v1::IssueCertificateRequest {
                ca: ca.clone(),
                profile: args.profile.clone(),
                common_name: args.cn.clone().unwrap_or_else(|| args.name.clone()),
                organizations: args.organizations.clone(),
                dns_names,
                ip_addresses,
                ttl_seconds: seconds(args.ttl),
                csr_pem: String::new(),
                key_algorithm: args.key_algorithm.clone(),
            })
            .await?
            .into_inner();
        let key = Zeroizing::new(resp.private_key_pem);
        data.insert(
            "tls.crt".into(),
            Zeroizing::new(resp.certificate_pem.into_bytes()),
        );
        data.insert("tls.key".into(), Zeroizing::new(key.as_bytes().to_vec()));
        data.insert(
            "ca.crt".into(),
            Zeroizing::new(resp.ca_certificate_pem.into_bytes()),
        );
    }
    if secret_type == TLS_TYPE && !(data.contains_key("tls.crt") && data.contains_key("tls.key")) {
        return Err(usage(format!(
            "a {TLS_TYPE} Secret needs tls.crt and tls.key: give --from-cert CA, or --from tls.crt=SECRET --from tls.key=SECRET"
        )));
    }
    let manifest = manifest(&args, &secret_type, &labels, &data);
    let text = if json {
        Zeroizing::new(format!("{manifest}\n"))
    } else {
        let mut out = Zeroizing::new(String::new());
        yaml(&manifest, 0, &mut out);
        out
    };
    crate::output::write_stdout_private(text.as_bytes(), "the Secret's values")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubernetes_names_are_checked() {
        assert!(dns_subdomain("db-creds"));
        assert!(dns_subdomain("a.b-c"));
        assert!(!dns_subdomain("DB"));
        assert!(!dns_subdomain("-a"));
        assert!(!dns_subdomain(""));
        assert!(data_key("tls.crt"));
        assert!(data_key("DB_PASSWORD"));
        assert!(!data_key("a/b"));
        assert!(!data_key(".."));
        assert!(label_key("app.kubernetes.io/name"));
        assert!(label_key("tier"));
        assert!(!label_key("x: y\n---\nkind: ConfigMap"));
        assert!(!label_key("a/b/c"));
        assert!(label_part("", true));
        assert!(!label_part("v\u{7f}", true));
    }

    #[test]
    fn the_yaml_is_nested_with_json_scalars() {
        let v = serde_json::json!({"a": "x", "b": {"c": "d\"e"}, "e": {}});
        let mut out = String::new();
        yaml(&v, 0, &mut out);
        assert_eq!(
            out,
            "\"a\": \"x\"\n\"b\":\n  \"c\": \"d\\\"e\"\n\"e\": {}\n"
        );
    }
}
