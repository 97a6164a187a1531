//! Prometheus metrics: counters fed from the one place every operation's
//! outcome passes ([`crate::core::Core::record`]) and from locks, served
//! in the text exposition format on an opt-in loopback port
//! (`metrics_listen`, docs/configuration.md#metrics).
//!
//! Labels carry operation names, outcomes, lock reasons, CA, cluster and
//! key names: never a secret's name, a subject or a value. Each labelled
//! family holds at most [`MAX_SERIES`] series; past that, new label values
//! count under `other`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::access::{Access, Event, Outcome};
use crate::core::Core;

/// Most series in one labelled family.
pub const MAX_SERIES: usize = 1000;
/// Most scrapes served at once.
const MAX_SCRAPES: usize = 8;
/// A scrape's request must arrive within this.
const READ_TIMEOUT: Duration = Duration::from_secs(5);

type Family = Mutex<BTreeMap<Vec<String>, u64>>;

fn bump(family: &Family, labels: Vec<String>) {
    let mut map = family.lock().unwrap_or_else(|p| p.into_inner());
    let labels = if map.len() >= MAX_SERIES && !map.contains_key(&labels) {
        vec!["other".to_owned(); labels.len()]
    } else {
        labels
    };
    let n = map.entry(labels).or_insert(0);
    *n = n.saturating_add(1);
}

/// The daemon's counters.
#[derive(Default)]
pub struct Metrics {
    requests: Family,
    issued: Family,
    signatures: Family,
    locks: Family,
    unlock_failures: AtomicU64,
    agent_connections: AtomicU64,
}

impl Metrics {
    /// Counts one recorded event.
    pub fn observe(&self, event: &Event) {
        let outcome = match &event.outcome {
            Outcome::Ok => "ok",
            Outcome::Denied(_) => "denied",
            Outcome::Failed(_) => "failed",
        };
        bump(
            &self.requests,
            vec![event.op.to_owned(), outcome.to_owned()],
        );
        if event.op == "Session.Unlock" && outcome != "ok" {
            self.unlock_failures.fetch_add(1, Ordering::Relaxed);
        }
        if outcome != "ok" {
            return;
        }
        let issued_here = event.details.iter().any(|(k, _)| *k == "serial");
        match &event.access {
            Access::Certificate { ca, profile, .. } if issued_here => {
                bump(&self.issued, vec![ca.clone(), profile.clone()]);
            }
            Access::Kubeconfig { cluster, .. } if issued_here => {
                bump(
                    &self.issued,
                    vec![format!("cluster:{cluster}"), "client".into()],
                );
            }
            Access::SshCertificate { ca, host, .. } => {
                let kind = if *host { "ssh-host" } else { "ssh-user" };
                bump(&self.issued, vec![ca.clone(), kind.into()]);
            }
            // `cluster pki`: one issuance per certificate, as `CA:profile`.
            Access::Admin { object } if object.starts_with("cluster-pki:") => {
                let by = event.details.iter().find(|(k, _)| *k == "issued_by");
                for pair in by.map(|(_, v)| v.split(' ')).into_iter().flatten() {
                    if let Some((ca, profile)) = pair.split_once(':') {
                        bump(&self.issued, vec![ca.to_owned(), profile.to_owned()]);
                    }
                }
            }
            Access::Sign { key } => bump(&self.signatures, vec![key.clone(), "grpc".into()]),
            Access::AgentSign { key } => bump(&self.signatures, vec![key.clone(), "agent".into()]),
            _ => {}
        }
    }

    /// Counts a lock of an unlocked session.
    pub fn locked(&self, reason: &str) {
        bump(&self.locks, vec![reason.to_owned()]);
    }

    /// Counts an ssh-agent connection.
    pub fn agent_connection(&self) {
        self.agent_connections.fetch_add(1, Ordering::Relaxed);
    }

    /// The text exposition of every metric, with the session's state.
    pub fn render(&self, core: &Core) -> String {
        let mut out = String::new();
        let status = core.status();
        let unlocked = u8::from(core.is_unlocked());
        let _ = writeln!(
            out,
            "# HELP keyholder_unlocked Whether the session is unlocked (1) or locked (0).\n\
             # TYPE keyholder_unlocked gauge\nkeyholder_unlocked {unlocked}"
        );
        if let crate::status::SessionState::Unlocked(u) = &status.state {
            let _ = writeln!(
                out,
                "# HELP keyholder_vault_generation The open vault's generation.\n\
                 # TYPE keyholder_vault_generation gauge\nkeyholder_vault_generation {}",
                u.generation
            );
            let expiries = crate::services::admin::cluster_pki::earliest_expiries(core);
            let _ = writeln!(
                out,
                "# HELP keyholder_cluster_cert_earliest_expiry_seconds The earliest notAfter (Unix time) \
                 among the certificates `cluster pki` issued for each cluster.\n\
                 # TYPE keyholder_cluster_cert_earliest_expiry_seconds gauge"
            );
            for (cluster, t) in expiries {
                let _ = writeln!(
                    out,
                    "keyholder_cluster_cert_earliest_expiry_seconds{{cluster=\"{}\"}} {t}",
                    escape(&cluster)
                );
            }
        }
        family(
            &mut out,
            "keyholder_requests_total",
            "Requests by operation and outcome (ok, denied by policy or a grant, failed).",
            &["op", "outcome"],
            &self.requests,
        );
        family(
            &mut out,
            "keyholder_locks_total",
            "Locks of an open session by reason.",
            &["reason"],
            &self.locks,
        );
        let _ = writeln!(
            out,
            "# HELP keyholder_unlock_failures_total Unlock requests that did not open the session.\n\
             # TYPE keyholder_unlock_failures_total counter\nkeyholder_unlock_failures_total {}",
            self.unlock_failures.load(Ordering::Relaxed)
        );
        family(
            &mut out,
            "keyholder_issued_total",
            "Certificates issued by issuer (CA, or cluster:NAME for kubeconfigs) and profile.",
            &["issuer", "profile"],
            &self.issued,
        );
        family(
            &mut out,
            "keyholder_signatures_total",
            "Signatures by key and path (grpc, agent).",
            &["key", "via"],
            &self.signatures,
        );
        let _ = writeln!(
            out,
            "# HELP keyholder_agent_connections_total ssh-agent connections accepted.\n\
             # TYPE keyholder_agent_connections_total counter\nkeyholder_agent_connections_total {}",
            self.agent_connections.load(Ordering::Relaxed)
        );
        out
    }
}

/// A label value escaped for the text format: backslash, double quote and
/// newline.
fn escape(v: &str) -> String {
    let mut s = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => s.push_str("\\\\"),
            '"' => s.push_str("\\\""),
            '\n' => s.push_str("\\n"),
            c => s.push(c),
        }
    }
    s
}

fn family(out: &mut String, name: &str, help: &str, labels: &[&str], values: &Family) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
    let map = values.lock().unwrap_or_else(|p| p.into_inner());
    for (values, n) in map.iter() {
        let pairs: Vec<String> = labels
            .iter()
            .zip(values)
            .map(|(l, v)| format!("{l}=\"{}\"", escape(v)))
            .collect();
        let _ = writeln!(out, "{name}{{{}}} {n}", pairs.join(","));
    }
}

/// Whether the request's `Host` header, when it has one, names a loopback
/// address or `localhost` (with or without a port).
fn loopback_host(request: &[u8]) -> bool {
    let Ok(text) = std::str::from_utf8(request) else {
        return false;
    };
    let Some(host) = text.split("\r\n").skip(1).find_map(|line| {
        let (name, value) = line.split_once(':')?;
        name.trim()
            .eq_ignore_ascii_case("host")
            .then(|| value.trim())
    }) else {
        return true;
    };
    // Strip a port: `[::1]:9464`, `127.0.0.1:9464`, `localhost:9464`.
    let name = match host.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or_default(),
        None => host.rsplit_once(':').map_or(host, |(h, _)| h),
    };
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Serves `GET /metrics` on `listener`: HTTP/1.1, one request per
/// connection, at most [`MAX_SCRAPES`] at once, each with a deadline.
pub async fn serve(core: std::sync::Arc<Core>, listener: tokio::net::TcpListener) {
    let permits = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_SCRAPES));
    let mut stop = core.shutdown_signal();
    let mut last_warned = None;
    let mut refused: u64 = 0;
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stop.changed() => return,
        };
        let Ok((mut stream, peer)) = accepted else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            // Said at most once a minute: any local user can open
            // connections, and must not be able to flood the log with it.
            refused = refused.saturating_add(1);
            if last_warned
                .is_none_or(|t: tokio::time::Instant| t.elapsed() >= Duration::from_secs(60))
            {
                tracing::warn!(%peer, refused, "metrics scrapes refused: too many at once");
                last_warned = Some(tokio::time::Instant::now());
                refused = 0;
            }
            continue;
        };
        let core = core.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let mut request = Vec::new();
            let mut buf = [0u8; 1024];
            let read = tokio::time::timeout(READ_TIMEOUT, async {
                while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 8192 {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return false,
                        Ok(n) => request.extend_from_slice(&buf[..n]),
                    }
                }
                true
            })
            .await;
            if !matches!(read, Ok(true)) {
                return;
            }
            let line = request.split(|&b| b == b'\r').next().unwrap_or_default();
            let (status, body) = if !loopback_host(&request) {
                // A web page whose name was rebound to 127.0.0.1 reaches
                // this port through the user's browser, under its own name.
                (
                    "421 Misdirected Request",
                    "only for a loopback name\n".to_owned(),
                )
            } else if line.starts_with(b"GET /metrics ") || line == b"GET /metrics" {
                ("200 OK", core.trust().metrics.render(&core))
            } else {
                ("404 Not Found", "GET /metrics\n".to_owned())
            };
            let response = format!(
                "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n\
                 Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = tokio::time::timeout(READ_TIMEOUT, stream.write_all(response.as_bytes())).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_host_names_are_answered() {
        for ok in [
            "GET /metrics HTTP/1.1\r\nHost: 127.0.0.1:9464\r\n\r\n",
            "GET /metrics HTTP/1.1\r\nhost: localhost\r\n\r\n",
            "GET /metrics HTTP/1.1\r\nHost: [::1]:9464\r\n\r\n",
            "GET /metrics HTTP/1.0\r\n\r\n",
        ] {
            assert!(loopback_host(ok.as_bytes()), "{ok}");
        }
        for bad in [
            "GET /metrics HTTP/1.1\r\nHost: evil.example:9464\r\n\r\n",
            "GET /metrics HTTP/1.1\r\nHost: 127.0.0.1.evil.example\r\n\r\n",
            "GET /metrics HTTP/1.1\r\nHost: 10.0.0.1\r\n\r\n",
        ] {
            assert!(!loopback_host(bad.as_bytes()), "{bad}");
        }
    }
}
