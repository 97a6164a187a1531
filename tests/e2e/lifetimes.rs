//! Default certificate lifetimes: cluster components (every `cert issue`
//! profile) get 30 days, capped by the CA's maximum, so a certificate does
//! not die before the component is deployed; credentials for humans
//! (kubeconfig, kube-credential) stay at 15 minutes.

use std::time::SystemTime;

use crate::util::Env;

fn seconds(v: &serde_json::Value, key: &str) -> SystemTime {
    humantime::parse_rfc3339(v[key].as_str().expect("time")).expect("rfc3339")
}

fn window(v: &serde_json::Value) -> u64 {
    seconds(v, "not_after")
        .duration_since(seconds(v, "not_before"))
        .expect("ordered")
        .as_secs()
}

#[test]
fn component_certificates_default_to_30_days_capped_by_the_ca_and_humans_to_15_minutes() {
    let (env, _daemon) = Env::ready();
    env.ok(&["ca", "create", "etcd-prod"]);
    env.ok(&["ca", "create", "short", "--max-ttl", "24h"]);
    // notBefore is backdated 5 minutes for clock skew.
    let skew = 300;
    for (profile, extra) in [
        ("client", &["--cn", "apiserver-etcd-client"][..]),
        ("server", &["--cn", "etcd-1", "--san", "127.0.0.1"]),
        ("peer", &["--cn", "etcd-1", "--san", "10.0.0.5"]),
    ] {
        for (ca, expected) in [("etcd-prod", 30 * 86400), ("short", 86400)] {
            let mut args = vec!["--json", "cert", "issue", "--ca", ca, "--profile", profile];
            args.extend_from_slice(extra);
            let out: serde_json::Value = serde_json::from_str(&env.ok(&args)).expect("JSON output");
            assert_eq!(window(&out), expected + skew, "{profile} from {ca}");
        }
    }

    // A human's credential stays short.
    env.ok(&[
        "cluster",
        "add",
        "prod",
        "--server",
        "https://127.0.0.1:6443",
        "--ca",
        "etcd-prod",
    ]);
    let cred: serde_json::Value =
        serde_json::from_str(&env.ok(&["kube-credential", "--cluster", "prod", "--user", "alice"]))
            .expect("ExecCredential");
    let expires = humantime::parse_rfc3339(
        cred["status"]["expirationTimestamp"]
            .as_str()
            .expect("expirationTimestamp"),
    )
    .expect("rfc3339");
    let left = expires
        .duration_since(SystemTime::now())
        .expect("in the future")
        .as_secs();
    assert!((14 * 60..=15 * 60).contains(&left), "{left} s left");
}
