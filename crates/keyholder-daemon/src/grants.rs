//! Scoped grants for scripts: a bearer token the admin creates (with the
//! PIN) that gives exactly its capabilities, only while the session is open
//! and until it expires.
//!
//! Tokens are 32 random bytes, shown once at creation, kept only as their
//! SHA-256 (they are high-entropy, so a plain hash suffices) and compared in
//! constant time. Grants live in memory only: locking the session drops
//! them all.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use base64::Engine;
use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tonic::Request;

use crate::access::Access;
use crate::error::{Error, Result};
use crate::gate::Caller;
use crate::policy::{Cap, Glob, Limits};

/// The metadata key a script presents its grant in:
/// `authorization: Bearer khg_...`.
pub const METADATA_KEY: &str = "authorization";
/// The prefix of every grant token.
pub const TOKEN_PREFIX: &str = "khg_";
/// The most grants one session may hold.
pub const MAX_GRANTS: usize = 256;
/// The longest a grant may live: one day (it dies with the session anyway).
pub const MAX_GRANT_LIFETIME: Duration = Duration::from_secs(86400);

/// One grant.
#[derive(Debug)]
pub struct Grant {
    /// Its name, unique in the session.
    pub name: String,
    /// What it allows.
    pub caps: Vec<Cap>,
    /// Within which limits.
    pub limits: Limits,
    /// Only for this executable, if set.
    pub exe: Option<Glob>,
    /// Only for this systemd unit, if set.
    pub unit: Option<Glob>,
    /// When it was made (wall clock, for display).
    pub created_at: SystemTime,
    /// When it stops working.
    pub expires: Instant,
    /// The same instant on the wall clock, for display.
    pub expires_at: SystemTime,
    /// SHA-256 of the token.
    token_hash: [u8; 32],
    /// How many requests used it.
    pub uses: AtomicU64,
}

impl Grant {
    /// Whether it allows `access` to `caller`, and if not why.
    pub fn decide(&self, caller: &Caller, access: &Access) -> std::result::Result<(), String> {
        if Instant::now() >= self.expires {
            return Err("the grant has expired".into());
        }
        if let Some(exe) = &self.exe {
            match caller.exe.as_deref() {
                Some(e) if exe.matches(e) && !caller.exe_replaced => {}
                _ => return Err(format!("the grant is pinned to executable {exe}")),
            }
        }
        if let Some(unit) = &self.unit
            && !caller.unit.as_deref().is_some_and(|u| unit.matches(u))
        {
            return Err(format!("the grant is pinned to unit {unit}"));
        }
        let rule = crate::policy::Rule {
            name: self.name.clone(),
            matches: Default::default(),
            allow: self.caps.clone(),
            limits: self.limits.clone(),
        };
        let policy = crate::policy::Policy {
            default: crate::policy::Default::Deny,
            rules: vec![rule],
            deny_serials: Vec::new(),
        };
        let d = policy.decide(caller, access);
        if d.allowed { Ok(()) } else { Err(d.reason) }
    }
}

/// What `grant create` asks for.
pub struct NewGrant {
    /// Name.
    pub name: String,
    /// Capabilities (the policy grammar).
    pub allow: Vec<String>,
    /// Longest lifetime of what it issues.
    pub max_ttl: Option<Duration>,
    /// Groups a kubeconfig may carry besides the profile's.
    pub groups: Vec<String>,
    /// How long the grant lives.
    pub lifetime: Duration,
    /// Executable pin.
    pub exe: Option<String>,
    /// Unit pin.
    pub unit: Option<String>,
}

/// The grants of the open session.
#[derive(Default)]
pub struct Grants(Mutex<Vec<std::sync::Arc<Grant>>>);

impl Grants {
    fn list_mut(&self) -> std::sync::MutexGuard<'_, Vec<std::sync::Arc<Grant>>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Creates a grant; returns it and its token (shown once).
    pub fn create(&self, new: NewGrant) -> Result<(std::sync::Arc<Grant>, String)> {
        let bad = |field: &'static str, reason: String| Error::InvalidArgument { field, reason };
        let name = new.name.trim().to_owned();
        if name.is_empty()
            || name.len() > 128
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return Err(bad(
                "name",
                "1 to 128 characters of letters, digits, '-', '_' and '.'".into(),
            ));
        }
        if new.allow.is_empty() || new.allow.len() > crate::policy::MAX_LIST {
            return Err(bad("allow", "name 1 to 256 capabilities".into()));
        }
        let caps = new
            .allow
            .iter()
            .map(|c| Cap::parse(c).map_err(|e| bad("allow", e)))
            .collect::<Result<Vec<_>>>()?;
        if caps.iter().any(|c| matches!(c, Cap::All | Cap::Admin)) {
            return Err(bad(
                "allow",
                "a grant cannot carry * or admin: name what the script needs".into(),
            ));
        }
        if new.lifetime.is_zero() || new.lifetime > MAX_GRANT_LIFETIME {
            return Err(bad("expires", "between 1s and 24h".into()));
        }
        let glob = |field: &'static str, s: Option<String>| -> Result<Option<Glob>> {
            s.filter(|s| !s.is_empty())
                .map(|s| Glob::new(&s).map_err(|e| bad(field, e)))
                .transpose()
        };
        let groups = if new.groups.is_empty() {
            None
        } else {
            Some(
                new.groups
                    .iter()
                    .map(|g| Glob::new(g).map_err(|e| bad("groups", e)))
                    .collect::<Result<Vec<_>>>()?,
            )
        };
        let mut raw = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut raw);
        let token = format!(
            "{TOKEN_PREFIX}{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw)
        );
        raw.fill(0);
        let now = Instant::now();
        let grant = std::sync::Arc::new(Grant {
            name: name.clone(),
            caps,
            limits: Limits {
                max_ttl: new.max_ttl,
                groups,
                sans: None,
            },
            exe: glob("exe", new.exe)?,
            unit: glob("unit", new.unit)?,
            created_at: SystemTime::now(),
            expires: now + new.lifetime,
            expires_at: SystemTime::now() + new.lifetime,
            token_hash: Sha256::digest(token.as_bytes()).into(),
            uses: AtomicU64::new(0),
        });
        let mut list = self.list_mut();
        list.retain(|g| g.expires > now);
        if list.iter().any(|g| g.name == name) {
            return Err(Error::AlreadyExists {
                kind: "grant",
                name,
            });
        }
        if list.len() >= MAX_GRANTS {
            return Err(Error::LimitReached(format!(
                "the session holds {MAX_GRANTS} grants, the maximum"
            )));
        }
        list.push(grant.clone());
        Ok((grant, token))
    }

    /// The grants, expired ones dropped.
    pub fn list(&self) -> Vec<std::sync::Arc<Grant>> {
        let mut list = self.list_mut();
        let now = Instant::now();
        list.retain(|g| g.expires > now);
        list.clone()
    }

    /// Revokes a grant by name; whether it existed.
    pub fn revoke(&self, name: &str) -> bool {
        let mut list = self.list_mut();
        let before = list.len();
        list.retain(|g| g.name != name);
        list.len() != before
    }

    /// Drops every grant (on lock).
    pub fn clear(&self) {
        self.list_mut().clear();
    }

    /// The live grant `token` names.
    fn find(&self, token: &str) -> Option<std::sync::Arc<Grant>> {
        let hash: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let now = Instant::now();
        let list = self.list_mut();
        // Every entry is compared, so the time taken does not say which
        // (or whether one) matched.
        let mut found = None;
        for g in list.iter() {
            if bool::from(g.token_hash.ct_eq(&hash)) && g.expires > now {
                found = Some(g.clone());
            }
        }
        found
    }
}

/// The grant `request` presents, if it presents one. A token that is
/// malformed, unknown, revoked or expired (or any token while the session
/// is locked) is refused as UNAUTHENTICATED: a script that meant to use a
/// grant never falls back to the rights of its uid.
pub fn presented<T>(
    grants: &Grants,
    request: &Request<T>,
) -> Result<Option<std::sync::Arc<Grant>>> {
    let Some(value) = request.metadata().get(METADATA_KEY) else {
        return Ok(None);
    };
    let refused = || Error::Unauthenticated("the grant is unknown, revoked or expired".into());
    let text = value.to_str().map_err(|_| refused())?;
    let token = text
        .strip_prefix("Bearer ")
        .or_else(|| text.strip_prefix("bearer "))
        .ok_or_else(refused)?
        .trim();
    if !token.starts_with(TOKEN_PREFIX) || token.len() > 128 {
        return Err(refused());
    }
    let grant = grants.find(token).ok_or_else(refused)?;
    grant.uses.fetch_add(1, Ordering::Relaxed);
    Ok(Some(grant))
}
