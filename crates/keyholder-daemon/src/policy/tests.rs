use std::time::Duration;

use super::*;

fn caller(exe: &str) -> Caller {
    Caller {
        exe: Some(exe.into()),
        ..Caller::default()
    }
}

const POLICY: &str = r#"
default = "deny"

[[rule]]
name = "admin-cli"
exe = ["/usr/local/bin/keyholder"]
allow = ["*"]

[[rule]]
name = "deploy"
exe = ["/opt/deploy/*"]
allow = ["kubeconfig:prod:deployer", "secret:read:app/prod/*"]
max_ttl = "15m"
"#;

#[test]
fn rules_allow_what_they_name_and_nothing_else() {
    let p = Policy::parse(POLICY).unwrap();
    let deploy = caller("/opt/deploy/run");
    let kube = |user: &str, ttl: u64| Access::Kubeconfig {
        cluster: "prod".into(),
        user: user.into(),
        groups: vec![],
        profile_groups: true,
        ttl: Duration::from_secs(ttl),
    };
    let d = p.decide(&deploy, &kube("deployer", 600));
    assert!(d.allowed, "{d:?}");
    assert_eq!(d.rule, "deploy");
    let d = p.decide(&deploy, &kube("admin", 600));
    assert!(!d.allowed);
    assert!(
        d.reason.contains("does not allow kubeconfig:prod:admin"),
        "{d:?}"
    );
    let d = p.decide(&deploy, &kube("deployer", 3600));
    assert!(!d.allowed);
    assert!(d.reason.contains("exceeds max_ttl 15m"), "{d:?}");
    assert!(
        p.decide(
            &deploy,
            &Access::SecretRead {
                name: "app/prod/db".into()
            }
        )
        .allowed
    );
    assert!(
        !p.decide(
            &deploy,
            &Access::SecretRead {
                name: "app/stage/db".into()
            }
        )
        .allowed
    );
    let admin = caller("/usr/local/bin/keyholder");
    assert!(p.decide(&admin, &kube("anyone", 86400)).allowed);
    let other = caller("/tmp/keyholder");
    let d = p.decide(&other, &Access::SecretRead { name: "x".into() });
    assert!(!d.allowed);
    assert_eq!(d.rule, "default");
}

#[test]
fn a_replaced_executable_does_not_match_by_path() {
    let p = Policy::parse(POLICY).unwrap();
    let mut c = caller("/usr/local/bin/keyholder");
    c.exe_replaced = true;
    assert!(
        !p.decide(&c, &Access::SecretRead { name: "x".into() })
            .allowed
    );
}

#[test]
fn groups_beyond_the_profile_need_the_rule() {
    let p = Policy::parse(
        r#"
default = "deny"
[[rule]]
name = "ci"
allow = ["kubeconfig:*:ci"]
groups = ["ci-*"]
"#,
    )
    .unwrap();
    let c = Caller::default();
    let kube = |groups: &[&str]| Access::Kubeconfig {
        cluster: "prod".into(),
        user: "ci".into(),
        groups: groups.iter().map(|s| s.to_string()).collect(),
        profile_groups: false,
        ttl: Duration::from_secs(60),
    };
    assert!(p.decide(&c, &kube(&["ci-deployers"])).allowed);
    let d = p.decide(&c, &kube(&["system:masters"]));
    assert!(!d.allowed);
    assert!(d.reason.contains("system:masters"), "{d:?}");
}

#[test]
fn errors_name_the_line() {
    let bad_cap =
        "default = \"deny\"\n\n[[rule]]\nname = \"x\"\nallow = [\n  \"kubeconfig:prod\",\n]\n";
    let e = Policy::parse(bad_cap).unwrap_err();
    assert!(e.starts_with("line 6:"), "{e}");
    let e = Policy::parse("default = \"maybe\"\n").unwrap_err();
    assert!(e.starts_with("line 1:"), "{e}");
    let e = Policy::parse(
        "default = \"deny\"\n[[rule]]\nname = \"a\"\nallow = [\"*\"]\nmax_ttl = \"soon\"\n",
    )
    .unwrap_err();
    assert!(e.starts_with("line 5:"), "{e}");
    let e =
        Policy::parse("default = \"deny\"\n[[rule]]\nname = \"a\"\nalow = [\"*\"]\n").unwrap_err();
    assert!(e.contains("line 4"), "{e}");
}

#[test]
fn globs() {
    let g = |p: &str, t: &str| Glob::new(p).unwrap().matches(t);
    assert!(g("*", ""));
    assert!(g("a*c", "abbbc"));
    assert!(g("/opt/*/bin/*", "/opt/x/bin/y"));
    assert!(!g("a*c", "abbbd"));
    assert!(g("exact", "exact"));
    assert!(!g("exact", "exactly"));
    assert!(g("*.service", "deploy.service"));
    // Pathological patterns stay fast.
    let long = "a".repeat(5000);
    assert!(!g("*a*a*a*a*a*a*b", &long));
}

#[test]
fn certificate_organisations_are_groups_and_need_the_rule() {
    let p = Policy::parse(
        r#"
default = "deny"
[[rule]]
name = "kubelet-bootstrap"
unit = ["kubelet-bootstrap.service"]
allow = ["cert:kubernetes:client"]
groups = ["system:nodes"]
sans = ["system:node:*"]
max_ttl = "720h"
"#,
    )
    .unwrap();
    let c = Caller {
        unit: Some("kubelet-bootstrap.service".into()),
        ..Caller::default()
    };
    let cert = |cn: &str, o: &str| Access::Certificate {
        ca: "kubernetes".into(),
        profile: "client".into(),
        names: vec![cn.into()],
        organizations: vec![o.into()],
        ttl: Duration::from_secs(3600),
    };
    assert!(
        p.decide(&c, &cert("system:node:w1", "system:nodes"))
            .allowed
    );
    let d = p.decide(&c, &cert("system:node:w1", "system:masters"));
    assert!(!d.allowed);
    assert!(d.reason.contains("system:masters"), "{d:?}");
    assert!(!p.decide(&c, &cert("admin", "system:nodes")).allowed);
}

#[test]
fn a_rule_allowing_everything_has_only_the_limits_it_states() {
    let p =
        Policy::parse("default = \"deny\"\n[[rule]]\nname = \"admin\"\nallow = [\"*\"]\n").unwrap();
    let cert = Access::Certificate {
        ca: "kubernetes".into(),
        profile: "client".into(),
        names: vec!["system:node:w1".into()],
        organizations: vec!["system:nodes".into()],
        ttl: Duration::from_secs(86400),
    };
    assert!(p.decide(&Caller::default(), &cert).allowed);
    let p = Policy::parse(
        "default = \"deny\"\n[[rule]]\nname = \"admin\"\nallow = [\"*\"]\nmax_ttl = \"1h\"\n",
    )
    .unwrap();
    assert!(!p.decide(&Caller::default(), &cert).allowed);
}
