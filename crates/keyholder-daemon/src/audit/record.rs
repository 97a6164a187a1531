//! One audit record's content, before it is chained: what happened, to
//! what, how it ended, who asked. Values, PINs, keys and grant tokens never
//! reach here: [`Event`] carries names, TTLs, serials and digests only.

use serde_json::{Map, Value, json};

use crate::access::{Access, Event, Outcome};
use crate::gate::Caller;

/// A record without its `seq`, `time`, `prev` and `hash`.
#[derive(Clone, Debug)]
pub struct Draft {
    /// `Secrets.Get`, `session.lock`, `audit.anchor`, ...
    pub op: String,
    /// `secret:db/prod`, `session`, `log`, ...
    pub object: String,
    /// `ok`, `denied`, `failed`.
    pub outcome: &'static str,
    /// The rule that denied, or the failure.
    pub reason: Option<String>,
    /// Who asked; `None` for the daemon's own events (a timed lock).
    pub caller: Option<Value>,
    /// What was asked for beyond the object (TTLs, names, principals).
    pub request: Map<String, Value>,
    /// What came of it (serials, digests, generation).
    pub details: Map<String, Value>,
}

impl Draft {
    /// An event of the daemon itself.
    pub fn system(op: &str, object: &str, details: Map<String, Value>) -> Self {
        Self {
            op: op.to_owned(),
            object: object.to_owned(),
            outcome: "ok",
            reason: None,
            caller: None,
            request: Map::new(),
            details,
        }
    }

    /// The record of a request.
    pub fn from_event(event: &Event) -> Self {
        let (outcome, reason) = match &event.outcome {
            Outcome::Ok => ("ok", None),
            Outcome::Denied(rule) => ("denied", Some(rule.clone())),
            Outcome::Failed(why) => ("failed", Some(why.clone())),
        };
        let mut details = Map::new();
        for (k, v) in &event.details {
            details.insert((*k).to_owned(), Value::String(v.clone()));
        }
        Self {
            op: event.op.to_owned(),
            object: event.access.object(),
            outcome,
            reason,
            caller: Some(caller_json(&event.caller)),
            request: request_json(&event.access),
            details,
        }
    }

    /// The record's JSON body with its chain fields, without `hash`.
    pub fn body(&self, seq: u64, time: &str, prev: &str) -> String {
        let s = |v: &str| Value::String(v.to_owned()).to_string();
        let mut out = format!(
            "{{\"seq\":{seq},\"time\":{},\"op\":{},\"object\":{},\"outcome\":{}",
            s(time),
            s(&self.op),
            s(&self.object),
            s(self.outcome)
        );
        if let Some(reason) = &self.reason {
            out.push_str(",\"reason\":");
            out.push_str(&s(reason));
        }
        out.push_str(",\"caller\":");
        out.push_str(&self.caller.as_ref().unwrap_or(&Value::Null).to_string());
        if !self.request.is_empty() {
            out.push_str(",\"request\":");
            out.push_str(&Value::Object(self.request.clone()).to_string());
        }
        if !self.details.is_empty() {
            out.push_str(",\"details\":");
            out.push_str(&Value::Object(self.details.clone()).to_string());
        }
        out.push_str(",\"prev\":");
        out.push_str(&s(prev));
        out.push('}');
        out
    }
}

/// The caller as recorded: every field of [`Caller`]; of a grant, its
/// name only (never its token).
pub fn caller_json(c: &Caller) -> Value {
    let mut m = Map::new();
    m.insert("uid".into(), json!(c.uid));
    m.insert("pid".into(), json!(c.pid));
    m.insert("channel".into(), json!(c.channel));
    m.insert("exe".into(), json!(c.exe));
    if c.exe_replaced {
        m.insert("exe_replaced".into(), json!(true));
    }
    if let Some(unit) = &c.unit {
        m.insert("unit".into(), json!(unit));
    }
    if let Some(cgroup) = &c.cgroup {
        m.insert("cgroup".into(), json!(cgroup));
    }
    if let Some(host_key) = &c.host_key {
        m.insert("host_key".into(), json!(host_key));
    }
    if c.forwarded {
        m.insert("forwarded".into(), json!(true));
    }
    if let Some(grant) = &c.grant {
        m.insert("grant".into(), json!(grant.name));
    }
    Value::Object(m)
}

/// What a request asked for beyond its object.
pub fn request_json(a: &Access) -> Map<String, Value> {
    let mut m = Map::new();
    match a {
        Access::Kubeconfig {
            groups,
            profile_groups,
            ttl,
            ..
        } => {
            m.insert("groups".into(), json!(groups));
            if *profile_groups {
                m.insert("profile_groups".into(), json!(true));
            }
            m.insert("ttl_seconds".into(), json!(ttl.as_secs()));
        }
        Access::Certificate { names, ttl, .. } => {
            m.insert("names".into(), json!(names));
            m.insert("ttl_seconds".into(), json!(ttl.as_secs()));
        }
        Access::SshCertificate {
            principals,
            host,
            ttl,
            ..
        } => {
            m.insert("principals".into(), json!(principals));
            if *host {
                m.insert("host".into(), json!(true));
            }
            m.insert("ttl_seconds".into(), json!(ttl.as_secs()));
        }
        _ => {}
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gate::Channel;

    #[test]
    fn a_record_is_one_json_object_with_its_fields() {
        let event = Event {
            caller: Caller {
                uid: 1000,
                pid: Some(42),
                channel: Channel::Agent,
                exe: Some("/usr/bin/ssh".into()),
                forwarded: true,
                ..Caller::default()
            },
            op: "Agent.Sign",
            access: Access::AgentSign {
                key: "deploy".into(),
            },
            outcome: Outcome::Ok,
            details: vec![("sha256", "ab".into())],
        };
        let body = Draft::from_event(&event).body(7, "2026-01-01T00:00:00.000Z", "00");
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["seq"], 7);
        assert_eq!(v["op"], "Agent.Sign");
        assert_eq!(v["object"], "agent:deploy");
        assert_eq!(v["caller"]["forwarded"], true);
        assert_eq!(v["caller"]["channel"], "agent");
        assert_eq!(v["details"]["sha256"], "ab");
        assert!(body.ends_with(",\"prev\":\"00\"}"));
    }
}
