//! What a request asks for, in the terms policy is written in and audit
//! records, and the ticket that carries one request from its policy
//! decision to its audit record.
//!
//! Every handler does the same three steps:
//!
//! 1. [`crate::services::enter`] (or the agent's `enter`): who is calling
//!    ([`Caller`]) and whether the session allows the operation at all;
//! 2. [`Core::authorize`] with the [`Access`] the request resolved to (the
//!    names, TTLs and subjects it would get): policy and grants decide, a
//!    denial is recorded and returned as PERMISSION_DENIED naming the rule;
//! 3. [`Ticket::finish`] with the operation's result and what to record of
//!    it ([`Details`]): the audit record is made durable before the result
//!    is returned, and if it cannot be, the result is dropped and the caller
//!    gets UNAVAILABLE.

use std::sync::Arc;
use std::time::Duration;

use crate::core::Core;
use crate::error::{Error, Result};
use crate::gate::Caller;

/// What a request asks to do, and to what.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Access {
    /// Status, lock, token listing: nothing in the vault.
    Session,
    /// Unlocking (or creating) the vault with the PIN.
    Unlock,
    /// Changing what the vault holds other than secrets: CAs, cluster
    /// profiles, signing keys (`object` is e.g. `ca:etcd`, `key:deploy`).
    Admin {
        /// `kind:name` of what is created, imported or removed.
        object: String,
    },
    /// Changing policy or grants (always needs the PIN again).
    Trust {
        /// `policy` or `grant:NAME`.
        object: String,
    },
    /// Listing names (no values): `what` is `secrets`, `keys`, `cas`,
    /// `clusters`, `grants` or `audit`.
    List {
        /// What is listed.
        what: &'static str,
        /// The prefix asked for, if any.
        prefix: String,
    },
    /// Reading metadata of one object: a CA's certificate, a key's public
    /// half (`object` is `kind:name`).
    Describe {
        /// `kind:name`.
        object: String,
    },
    /// Reading a secret's value.
    SecretRead {
        /// The secret's name.
        name: String,
    },
    /// Creating, replacing or deleting a secret.
    SecretWrite {
        /// The secret's name.
        name: String,
    },
    /// A kubeconfig or exec credential: a client certificate for `user` in
    /// `groups` from the cluster's CA.
    Kubeconfig {
        /// The cluster profile.
        cluster: String,
        /// The user (certificate common name).
        user: String,
        /// The groups (certificate organisations).
        groups: Vec<String>,
        /// Whether `groups` are the cluster profile's own (the request
        /// named none).
        profile_groups: bool,
        /// The certificate's lifetime (zero for an exec-plugin kubeconfig,
        /// which holds no credential).
        ttl: Duration,
    },
    /// An X.509 certificate from a Keyholder CA.
    Certificate {
        /// The CA.
        ca: String,
        /// `server`, `client`, `peer`.
        profile: String,
        /// Common name, DNS names and IP addresses asked for.
        names: Vec<String>,
        /// Organisations (O) asked for: Kubernetes reads them as groups.
        organizations: Vec<String>,
        /// The lifetime.
        ttl: Duration,
    },
    /// A signature with a vault key through `Signer.Sign`.
    Sign {
        /// The key.
        key: String,
    },
    /// An SSH certificate.
    SshCertificate {
        /// The SSH CA (a key with the `ca` usage).
        ca: String,
        /// The principals asked for.
        principals: Vec<String>,
        /// Whether it is a host certificate.
        host: bool,
        /// The lifetime.
        ttl: Duration,
    },
    /// An ssh-agent signature; the destination host is the caller's.
    AgentSign {
        /// The key.
        key: String,
    },
}

impl Access {
    /// The object this access is about, as policy explanations and audit
    /// records name it (`secret:db/prod`, `cluster:prod/deployer`, ...).
    pub fn object(&self) -> String {
        match self {
            Self::Session | Self::Unlock => "session".into(),
            Self::Admin { object } | Self::Trust { object } | Self::Describe { object } => {
                object.clone()
            }
            Self::List { what, prefix } if prefix.is_empty() => (*what).to_owned(),
            Self::List { what, prefix } => format!("{what}:{prefix}"),
            Self::SecretRead { name } | Self::SecretWrite { name } => format!("secret:{name}"),
            Self::Kubeconfig { cluster, user, .. } => format!("kubeconfig:{cluster}:{user}"),
            Self::Certificate { ca, profile, .. } => format!("cert:{ca}:{profile}"),
            Self::Sign { key } => format!("sign:{key}"),
            Self::SshCertificate { ca, .. } => format!("ssh:{ca}"),
            Self::AgentSign { key } => format!("agent:{key}"),
        }
    }
}

/// What audit records of an operation's result besides its outcome:
/// serials, subjects, lifetimes, digests. Never a value, PIN or key.
pub type Details = Vec<(&'static str, String)>;

/// The outcome of one operation, as audit records it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Done.
    Ok,
    /// Refused by policy or a grant: the rule (or grant) that decided.
    Denied(String),
    /// Failed: the gRPC code's name and the message (which never carries a
    /// secret value, by [`Error`]'s contract).
    Failed(String),
}

/// One security-relevant event.
#[derive(Clone, Debug)]
pub struct Event {
    /// The caller.
    pub caller: Caller,
    /// The operation (`Secrets.Get`, `Agent.Sign`, `Session.Lock`, ...).
    pub op: &'static str,
    /// What it was about.
    pub access: Access,
    /// How it ended.
    pub outcome: Outcome,
    /// What else to record.
    pub details: Details,
}

/// Where events are recorded. [`AuditSink::record`] returns only once the
/// event is durable; an error means it is not, and the operation's result
/// must not be released.
#[tonic::async_trait]
pub trait AuditSink: Send + Sync {
    /// Fails when events cannot be recorded now, so that an operation is
    /// refused before it does anything.
    fn ready(&self) -> Result<()>;
    /// Makes `event` durable.
    async fn record(&self, event: Event) -> Result<()>;
    /// The log file behind this sink, for anchors, tail and verify.
    fn log(&self) -> Option<&crate::audit::AuditLog> {
        None
    }
}

/// A request that passed policy, on its way to its audit record.
#[must_use = "finish the ticket so the operation is recorded"]
pub struct Ticket {
    core: Arc<Core>,
    caller: Caller,
    op: &'static str,
    access: Access,
}

impl Ticket {
    /// The caller.
    pub fn caller(&self) -> &Caller {
        &self.caller
    }

    /// Records the operation's `result` and returns it; if the record cannot
    /// be made durable, returns the audit error instead of the result.
    pub async fn finish<T>(self, result: Result<(T, Details)>) -> Result<T> {
        let (outcome, details, value) = match result {
            Ok((value, details)) => (Outcome::Ok, details, Ok(value)),
            Err(e) => (Outcome::Failed(failure(&e)), Vec::new(), Err(e)),
        };
        let event = Event {
            caller: self.caller,
            op: self.op,
            access: self.access,
            outcome,
            details,
        };
        let lenient = event.access == Access::Session;
        match self.core.record(event).await {
            Ok(()) => value,
            // Locking and status are never refused for want of a record:
            // locking only takes material away.
            Err(e) if lenient => {
                tracing::warn!(error = %crate::escape::Escaped(&e), "audit record lost");
                value
            }
            Err(e) => Err(e),
        }
    }
}

/// How a failure is recorded: its gRPC code and message (messages carry
/// names, never values, by [`Error`]'s contract).
fn failure(e: &Error) -> String {
    format!("{:?}: {e}", e.code())
}

impl Core {
    /// Decides whether `caller` may have `access` through `op`: the grant it
    /// presented, else the vault's policy. A denial is recorded and returned
    /// as PERMISSION_DENIED naming the rule; an audit log that cannot be
    /// written refuses everything (UNAVAILABLE) before any work is done.
    pub async fn authorize(
        self: &Arc<Self>,
        caller: &Caller,
        op: &'static str,
        access: Access,
    ) -> Result<Ticket> {
        if access != Access::Session
            && let Some(sink) = self.audit_sink()
        {
            sink.ready()?;
        }
        if let Err(denied) = self.decide(caller, &access) {
            match &caller.remote {
                Some(peer) => {
                    tracing::warn!(op, peer = %peer.addr, client = ?peer.name, object = ?access.object(), rule = ?denied.rule, "TCP request refused by policy");
                }
                None => {
                    tracing::info!(op, pid = ?caller.pid, exe = ?caller.exe, object = ?access.object(), rule = ?denied.rule, "request refused by policy");
                }
            }
            let event = Event {
                caller: caller.clone(),
                op,
                access,
                outcome: Outcome::Denied(denied.rule.clone()),
                details: Vec::new(),
            };
            self.record(event).await?;
            return Err(Error::PermissionDenied(denied.to_string()));
        }
        Ok(Ticket {
            core: self.clone(),
            caller: caller.clone(),
            op,
            access,
        })
    }

    /// Records `event` if an audit log is configured.
    pub async fn record(&self, event: Event) -> Result<()> {
        self.trust().metrics.observe(&event);
        match self.audit_sink() {
            Some(sink) => sink.record(event).await,
            None => Ok(()),
        }
    }
}
