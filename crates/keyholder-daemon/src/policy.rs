//! Policy: rules that match callers and allow them operations on objects.
//!
//! The policy is TOML kept inside the vault (so it is authenticated by the
//! token and covered by rollback detection), parsed once per vault
//! generation. The language is in docs/policy.md:
//!
//! ```toml
//! default = "deny"          # what callers that match no rule get
//!
//! [[rule]]
//! name = "deploy"
//! exe = ["/opt/deploy/bin/*"]              # who: any of these executables
//! allow = ["kubeconfig:prod:deployer", "secret:read:app/prod/*"]
//! max_ttl = "15m"
//! ```
//!
//! A caller matched by one or more rules gets what any of them allows, and
//! nothing else; a caller matched by none gets `default`.

use std::fmt;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use crate::access::Access;
use crate::gate::{Caller, Channel};

/// The longest policy text accepted: 256 KiB.
pub const MAX_POLICY_BYTES: usize = 256 * 1024;
/// The most rules one policy may hold.
pub const MAX_RULES: usize = 1000;
/// The most entries in one list (`allow`, `exe`, ...).
pub const MAX_LIST: usize = 256;
/// The longest glob pattern.
pub const MAX_PATTERN: usize = 1024;

/// A glob: `*` matches any run of characters (including `/`), everything
/// else matches itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Glob(String);

impl Glob {
    pub fn new(s: &str) -> Result<Self, String> {
        if s.is_empty() {
            return Err("an empty pattern matches nothing".into());
        }
        if s.len() > MAX_PATTERN {
            return Err(format!("a pattern is at most {MAX_PATTERN} bytes"));
        }
        Ok(Self(s.to_owned()))
    }

    /// The pattern up to its first `*`.
    fn literal_prefix(&self) -> &str {
        self.0.split('*').next().unwrap_or_default()
    }

    /// Whether `text` matches. Linear in practice: one backtrack point (the
    /// last `*`), as in the classic wildcard matcher.
    pub fn matches(&self, text: &str) -> bool {
        let (p, t) = (self.0.as_bytes(), text.as_bytes());
        let (mut pi, mut ti) = (0usize, 0usize);
        let mut star: Option<(usize, usize)> = None;
        while ti < t.len() {
            if pi < p.len() && p[pi] == b'*' {
                star = Some((pi, ti));
                pi += 1;
            } else if pi < p.len() && p[pi] == t[ti] {
                pi += 1;
                ti += 1;
            } else if let Some((sp, st)) = star {
                pi = sp + 1;
                ti = st + 1;
                star = Some((sp, st + 1));
            } else {
                return false;
            }
        }
        p[pi..].iter().all(|&c| c == b'*')
    }
}

impl fmt::Display for Glob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One capability: what a rule or a grant allows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Cap {
    /// `*`: everything (the admin's own tools).
    All,
    /// `admin`: creating and removing CAs, clusters and keys.
    Admin,
    /// `list`: listing names and reading public metadata.
    List,
    /// `secret:read:GLOB`.
    SecretRead(Glob),
    /// `secret:write:GLOB`.
    SecretWrite(Glob),
    /// `kubeconfig:CLUSTER:USER`.
    Kubeconfig(Glob, Glob),
    /// `cert:CA:PROFILE`.
    Cert(Glob, Glob),
    /// `sign:KEY`.
    Sign(Glob),
    /// `ssh:CA:PRINCIPAL` (user certificates).
    Ssh(Glob, Glob),
    /// `ssh-host:CA:HOSTNAME` (host certificates).
    SshHost(Glob, Glob),
    /// `agent:KEY`: ssh-agent signatures with the key.
    Agent(Glob),
}

impl Cap {
    /// Parses the capability grammar above.
    pub fn parse(s: &str) -> Result<Self, String> {
        let parts: Vec<&str> = s.splitn(3, ':').collect();
        let g = |i: usize| -> Result<Glob, String> {
            Glob::new(parts.get(i).copied().unwrap_or_default()).map_err(|e| format!("{s:?}: {e}"))
        };
        let want = |n: usize| -> Result<(), String> {
            if parts.len() == n {
                Ok(())
            } else {
                Err(format!("{s:?}: expected {}", shape(parts[0])))
            }
        };
        Ok(match parts[0] {
            "*" if parts.len() == 1 => Self::All,
            "admin" if parts.len() == 1 => Self::Admin,
            "list" if parts.len() == 1 => Self::List,
            "secret" => {
                want(3)?;
                match parts[1] {
                    "read" => Self::SecretRead(g(2)?),
                    "write" => Self::SecretWrite(g(2)?),
                    other => return Err(format!("{s:?}: {other:?} is not read or write")),
                }
            }
            "kubeconfig" => {
                want(3)?;
                Self::Kubeconfig(g(1)?, g(2)?)
            }
            "cert" => {
                want(3)?;
                Self::Cert(g(1)?, g(2)?)
            }
            "ssh" => {
                want(3)?;
                Self::Ssh(g(1)?, g(2)?)
            }
            "ssh-host" => {
                want(3)?;
                Self::SshHost(g(1)?, g(2)?)
            }
            "sign" => {
                want(2)?;
                Self::Sign(Glob::new(&s["sign:".len()..]).map_err(|e| format!("{s:?}: {e}"))?)
            }
            "agent" => {
                want(2)?;
                Self::Agent(Glob::new(&s["agent:".len()..]).map_err(|e| format!("{s:?}: {e}"))?)
            }
            _ => {
                return Err(format!(
                    "{s:?} is not a capability: use *, admin, list, secret:read:NAME, \
                     secret:write:NAME, kubeconfig:CLUSTER:USER, cert:CA:PROFILE, sign:KEY, \
                     ssh:CA:PRINCIPAL, ssh-host:CA:HOST or agent:KEY"
                ));
            }
        })
    }

    /// Whether this capability covers `access`'s kind and object (limits
    /// such as TTL and groups are checked by [`Limits`]).
    fn covers(&self, access: &Access) -> bool {
        match (self, access) {
            (Self::All, _) => true,
            (Self::Admin, Access::Admin { .. }) => true,
            (Self::List, Access::List { .. } | Access::Describe { .. }) => true,
            (Self::SecretRead(g), Access::SecretRead { name }) => g.matches(name),
            (
                Self::SecretRead(g),
                Access::List {
                    what: "secrets",
                    prefix,
                },
            ) => {
                // Listing names under a prefix inside what the rule may
                // read: only for a pattern `LITERAL*` (one trailing star),
                // whose every name under such a prefix it may read.
                g.0.ends_with('*')
                    && g.0.matches('*').count() == 1
                    && prefix.starts_with(g.literal_prefix())
            }
            (Self::SecretWrite(g), Access::SecretWrite { name }) => g.matches(name),
            (Self::Kubeconfig(c, u), Access::Kubeconfig { cluster, user, .. }) => {
                c.matches(cluster) && u.matches(user)
            }
            (Self::Cert(c, p), Access::Certificate { ca, profile, .. }) => {
                c.matches(ca) && p.matches(profile)
            }
            (Self::Sign(k), Access::Sign { key }) => k.matches(key),
            (
                Self::Ssh(c, p),
                Access::SshCertificate {
                    ca,
                    principals,
                    host: false,
                    ..
                },
            )
            | (
                Self::SshHost(c, p),
                Access::SshCertificate {
                    ca,
                    principals,
                    host: true,
                    ..
                },
            ) => c.matches(ca) && !principals.is_empty() && principals.iter().all(|x| p.matches(x)),
            (Self::Agent(k), Access::AgentSign { key }) => k.matches(key),
            _ => false,
        }
    }
}

fn shape(kind: &str) -> &'static str {
    match kind {
        "secret" => "secret:read:NAME or secret:write:NAME",
        "kubeconfig" => "kubeconfig:CLUSTER:USER",
        "cert" => "cert:CA:PROFILE",
        "ssh" => "ssh:CA:PRINCIPAL",
        "ssh-host" => "ssh-host:CA:HOST",
        "sign" => "sign:KEY",
        "agent" => "agent:KEY",
        _ => "a capability",
    }
}

impl fmt::Display for Cap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::All => f.write_str("*"),
            Self::Admin => f.write_str("admin"),
            Self::List => f.write_str("list"),
            Self::SecretRead(g) => write!(f, "secret:read:{g}"),
            Self::SecretWrite(g) => write!(f, "secret:write:{g}"),
            Self::Kubeconfig(c, u) => write!(f, "kubeconfig:{c}:{u}"),
            Self::Cert(c, p) => write!(f, "cert:{c}:{p}"),
            Self::Sign(k) => write!(f, "sign:{k}"),
            Self::Ssh(c, p) => write!(f, "ssh:{c}:{p}"),
            Self::SshHost(c, p) => write!(f, "ssh-host:{c}:{p}"),
            Self::Agent(k) => write!(f, "agent:{k}"),
        }
    }
}

/// Limits a rule or grant puts on what its capabilities allow.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Limits {
    /// Longest lifetime of anything issued.
    pub max_ttl: Option<Duration>,
    /// Groups a kubeconfig may carry besides the cluster profile's own, and
    /// organisations (O) an X.509 certificate may carry; unset: only the
    /// profile's groups, and no organisation.
    pub groups: Option<Vec<Glob>>,
    /// Names (CN, DNS, IP) an X.509 certificate may carry; unset: any.
    pub sans: Option<Vec<Glob>>,
}

impl Limits {
    /// Why `access` exceeds these limits, if it does. With `implicit`, an
    /// unset `groups` still means "the profile's groups and no
    /// organisation"; a rule allowing `*` has only the limits it states.
    pub fn exceeded(&self, access: &Access, implicit: bool) -> Option<String> {
        let ttl = match access {
            Access::Kubeconfig { ttl, .. }
            | Access::Certificate { ttl, .. }
            | Access::SshCertificate { ttl, .. } => Some(*ttl),
            _ => None,
        };
        if let (Some(ttl), Some(max)) = (ttl, self.max_ttl)
            && ttl > max
        {
            return Some(format!(
                "TTL {} exceeds max_ttl {}",
                humantime::format_duration(ttl),
                humantime::format_duration(max)
            ));
        }
        if !implicit && self.groups.is_none() {
            return self.sans_exceeded(access);
        }
        if let Access::Kubeconfig {
            groups,
            profile_groups,
            ..
        } = access
            && !profile_groups
        {
            let allowed = self.groups.as_deref().unwrap_or_default();
            if let Some(g) = groups
                .iter()
                .find(|g| !allowed.iter().any(|p| p.matches(g)))
            {
                return Some(format!("group {g:?} is not in the rule's groups"));
            }
        }
        if let Access::Certificate { organizations, .. } = access {
            let allowed = self.groups.as_deref().unwrap_or_default();
            if let Some(o) = organizations
                .iter()
                .find(|o| !allowed.iter().any(|p| p.matches(o)))
            {
                return Some(format!(
                    "organisation (group) {o:?} is not in the rule's groups"
                ));
            }
        }
        self.sans_exceeded(access)
    }

    fn sans_exceeded(&self, access: &Access) -> Option<String> {
        if let (Access::Certificate { names, .. }, Some(sans)) = (access, &self.sans)
            && let Some(n) = names.iter().find(|n| !sans.iter().any(|p| p.matches(n)))
        {
            return Some(format!("name {n:?} is not in the rule's sans"));
        }
        None
    }
}

/// Who a rule matches. Every field given must match; none given matches
/// every caller of the admin's uid.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Match {
    /// The executable (`/proc/PID/exe`) matches one of these.
    pub exe: Option<Vec<Glob>>,
    /// The systemd unit matches one of these.
    pub unit: Option<Vec<Glob>>,
    /// The listener.
    pub channel: Option<Channel>,
    /// Agent connections: whether forwarded.
    pub forwarded: Option<bool>,
    /// Agent connections: the destination host key (`SHA256:...`).
    pub host_keys: Option<Vec<Glob>>,
    /// TCP connections: the client certificate's common name. Only rules
    /// that name clients match TCP callers.
    pub clients: Option<Vec<Glob>>,
}

impl Match {
    /// Whether `caller` matches; if not, the first field that did not.
    pub fn check(&self, caller: &Caller) -> Result<(), String> {
        fn any(list: &Option<Vec<Glob>>, value: Option<&str>, what: &str) -> Result<(), String> {
            match list {
                None => Ok(()),
                Some(list) => match value {
                    Some(v) if list.iter().any(|g| g.matches(v)) => Ok(()),
                    Some(v) => Err(format!("{what} {v:?} is not listed")),
                    None => Err(format!("the caller has no {what}")),
                },
            }
        }
        if caller.channel == Channel::Tcp {
            // A caller from another machine has no executable, unit or
            // host key here: it is matched by its certificate alone.
            let Some(clients) = &self.clients else {
                return Err("the rule names no TCP clients".into());
            };
            let name = caller.remote.as_ref().map(|r| r.name.as_str());
            any(&Some(clients.clone()), name, "client certificate name")?;
            if self.exe.is_some() || self.unit.is_some() || self.host_keys.is_some() {
                return Err("the rule matches local processes".into());
            }
            return Ok(());
        }
        if self.clients.is_some() {
            return Err("the rule matches TCP clients only".into());
        }
        any(&self.exe, caller.exe.as_deref(), "executable")?;
        if self.exe.is_some() && caller.exe_replaced {
            return Err("the caller's executable was replaced since it started".into());
        }
        any(&self.unit, caller.unit.as_deref(), "systemd unit")?;
        if let Some(ch) = self.channel
            && ch != caller.channel
        {
            return Err(format!("the caller came through {:?}", caller.channel));
        }
        if let Some(f) = self.forwarded
            && f != caller.forwarded
        {
            return Err(if caller.forwarded {
                "the agent connection is forwarded".into()
            } else {
                "the agent connection is not forwarded".into()
            });
        }
        any(
            &self.host_keys,
            caller.host_key.as_deref(),
            "destination host key",
        )
    }
}

/// One rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    /// Its name, shown in denials and explanations.
    pub name: String,
    /// Who it matches.
    pub matches: Match,
    /// What it allows.
    pub allow: Vec<Cap>,
    /// Within which limits.
    pub limits: Limits,
}

/// What callers that match no rule get.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Default {
    /// Everything (a single admin's processes, as without a policy).
    Allow,
    /// Nothing but status, lock and unlock.
    Deny,
}

/// A parsed, valid policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    /// For callers no rule matches.
    pub default: Default,
    /// The rules, in file order.
    pub rules: Vec<Rule>,
    /// Client certificate serials (hex) refused in the TLS handshake.
    pub deny_serials: Vec<String>,
}

/// The result of evaluating a policy for one access.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    /// Allowed or not.
    pub allowed: bool,
    /// The rule that decided (`default` when none matched the caller).
    pub rule: String,
    /// Why, in words.
    pub reason: String,
}

impl Policy {
    /// Decides `access` for `caller`.
    pub fn decide(&self, caller: &Caller, access: &Access) -> Decision {
        let mut matched = Vec::new();
        let mut why_not = Vec::new();
        for rule in &self.rules {
            if rule.matches.check(caller).is_err() {
                continue;
            }
            matched.push(rule.name.as_str());
            match rule.allow.iter().find(|c| c.covers(access)) {
                Some(cap) => match rule.limits.exceeded(access, *cap != Cap::All) {
                    None => {
                        return Decision {
                            allowed: true,
                            rule: rule.name.clone(),
                            reason: format!("rule {:?} allows {cap}", rule.name),
                        };
                    }
                    Some(limit) => why_not.push(format!("rule {:?}: {limit}", rule.name)),
                },
                None => why_not.push(format!(
                    "rule {:?} does not allow {}",
                    rule.name,
                    access.object()
                )),
            }
        }
        if matched.is_empty() && caller.channel == Channel::Tcp {
            return Decision {
                allowed: false,
                rule: "default".into(),
                reason: "no rule names this TCP client; `default` applies to local callers only"
                    .into(),
            };
        }
        if matched.is_empty() {
            let allowed = self.default == Default::Allow;
            return Decision {
                allowed,
                rule: "default".into(),
                reason: format!(
                    "no rule matches this caller; default = \"{}\"",
                    if allowed { "allow" } else { "deny" }
                ),
            };
        }
        Decision {
            allowed: false,
            rule: matched.join(","),
            reason: why_not.join("; "),
        }
    }

    /// Parses and validates policy TOML; errors name the line.
    pub fn parse(text: &str) -> Result<Self, String> {
        if text.len() > MAX_POLICY_BYTES {
            return Err(format!(
                "the policy is larger than {MAX_POLICY_BYTES} bytes"
            ));
        }
        let file: PolicyFile = toml::from_str(text).map_err(|e| {
            let line = e.span().map(|s| line_of(text, s.start));
            match line {
                Some(l) => format!("line {l}: {}", e.message()),
                None => e.message().to_owned(),
            }
        })?;
        if file.rule.len() > MAX_RULES {
            return Err(format!("a policy holds at most {MAX_RULES} rules"));
        }
        let mut rules = Vec::with_capacity(file.rule.len());
        let mut names = std::collections::BTreeSet::new();
        for r in file.rule {
            let at = |span: std::ops::Range<usize>, e: String| -> String {
                format!("line {}: {e}", line_of(text, span.start))
            };
            let name = r.name.get_ref().trim().to_owned();
            if name.is_empty() || name.len() > 128 || name.chars().any(char::is_control) {
                return Err(at(
                    r.name.span(),
                    "a rule's name is 1 to 128 printable characters".into(),
                ));
            }
            if name == "default" || !names.insert(name.clone()) {
                return Err(at(
                    r.name.span(),
                    format!("rule name {name:?} is used twice or reserved"),
                ));
            }
            let allow = r
                .allow
                .iter()
                .map(|c| Cap::parse(c.get_ref()).map_err(|e| at(c.span(), e)))
                .collect::<Result<Vec<_>, _>>()?;
            if allow.is_empty() || allow.len() > MAX_LIST {
                return Err(at(
                    r.name.span(),
                    format!("rule {name:?} needs 1 to {MAX_LIST} entries in allow"),
                ));
            }
            let globs = |list: Option<Spanned<Vec<String>>>| -> Result<Option<Vec<Glob>>, String> {
                let Some(list) = list else { return Ok(None) };
                let span = list.span();
                let items = list.into_inner();
                if items.is_empty() || items.len() > MAX_LIST {
                    return Err(at(span, format!("a list holds 1 to {MAX_LIST} entries")));
                }
                items
                    .iter()
                    .map(|s| Glob::new(s).map_err(|e| at(span.clone(), e)))
                    .collect::<Result<Vec<_>, _>>()
                    .map(Some)
            };
            let channel = match r.channel {
                None => None,
                Some(c) => Some(match c.get_ref().as_str() {
                    "grpc" => Channel::Grpc,
                    "agent" => Channel::Agent,
                    "tcp" => Channel::Tcp,
                    other => {
                        return Err(at(
                            c.span(),
                            format!("channel {other:?} is not grpc, agent or tcp"),
                        ));
                    }
                }),
            };
            let max_ttl = match r.max_ttl {
                None => None,
                Some(t) => Some(
                    humantime::parse_duration(t.get_ref())
                        .map_err(|e| at(t.span(), format!("max_ttl: {e}")))?,
                ),
            };
            rules.push(Rule {
                name,
                matches: Match {
                    exe: globs(r.exe)?,
                    unit: globs(r.unit)?,
                    channel,
                    forwarded: r.forwarded,
                    host_keys: globs(r.host_keys)?,
                    clients: globs(r.clients)?,
                },
                allow,
                limits: Limits {
                    max_ttl,
                    groups: globs(r.groups)?,
                    sans: globs(r.sans)?,
                },
            });
        }
        let mut deny_serials = Vec::with_capacity(file.deny_serials.len());
        for s in &file.deny_serials {
            let hex = s.get_ref().trim().replace(':', "").to_ascii_lowercase();
            if hex.is_empty() || hex.len() > 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(format!(
                    "line {}: deny_serials holds hex serials (as `keyholder cert issue` prints them)",
                    line_of(text, s.span().start)
                ));
            }
            deny_serials.push(hex);
        }
        Ok(Self {
            default: file.default,
            rules,
            deny_serials,
        })
    }
}

/// 1-based line of byte `offset` in `text`.
fn line_of(text: &str, offset: usize) -> usize {
    let end = offset.min(text.len());
    text.as_bytes()[..end]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    default: Default,
    #[serde(default)]
    deny_serials: Vec<Spanned<String>>,
    #[serde(default)]
    rule: Vec<RuleFile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleFile {
    name: Spanned<String>,
    exe: Option<Spanned<Vec<String>>>,
    unit: Option<Spanned<Vec<String>>>,
    channel: Option<Spanned<String>>,
    forwarded: Option<bool>,
    host_keys: Option<Spanned<Vec<String>>>,
    clients: Option<Spanned<Vec<String>>>,
    #[serde(default)]
    allow: Vec<Spanned<String>>,
    max_ttl: Option<Spanned<String>>,
    groups: Option<Spanned<Vec<String>>>,
    sans: Option<Spanned<Vec<String>>>,
}

#[cfg(test)]
mod tests;
