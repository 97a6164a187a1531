//! `keyholder.v1.Audit`: reading and verifying the audit log.

use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;

use keyholder_proto::v1;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use super::admit;
use crate::access::Access;
use crate::core::Core;
use crate::error::Error;
use crate::gate::Needs;

/// The Audit service.
pub struct AuditService(pub Arc<Core>);

/// A stream of log lines.
pub type Lines = Pin<Box<dyn Stream<Item = Result<v1::AuditLine, Status>> + Send>>;

/// Most lines `Tail` sends before following.
const MAX_TAIL_LINES: u32 = 100_000;

fn off() -> Error {
    Error::NotFound {
        kind: "audit log",
        name: "off".into(),
    }
}

/// The last `n` complete lines of the log (the active file, and rotated
/// ones while that has too few), oldest first.
fn last_lines(active: &std::path::Path, n: usize) -> std::io::Result<Vec<String>> {
    let files = keyholder_audit::log_files(active)?;
    let mut out: Vec<String> = Vec::new();
    for file in files.iter().rev() {
        if out.len() >= n {
            break;
        }
        let text = std::fs::read(file)?;
        let text = String::from_utf8_lossy(&text);
        // Only complete lines: a record still being written is not durable.
        let complete = text.rfind('\n').map_or("", |i| &text[..i]);
        let mut lines: Vec<String> = complete
            .split('\n')
            .filter(|l| !l.is_empty())
            .map(str::to_owned)
            .collect();
        let keep = n - out.len();
        if lines.len() > keep {
            lines.drain(..lines.len() - keep);
        }
        lines.append(&mut out);
        out = lines;
    }
    Ok(out)
}

fn seq_of(line: &str) -> u64 {
    serde_json::from_str::<serde_json::Value>(line)
        .ok()
        .and_then(|v| v.get("seq").and_then(serde_json::Value::as_u64))
        .unwrap_or(0)
}

#[tonic::async_trait]
impl v1::audit_server::Audit for AuditService {
    type TailStream = Lines;

    async fn tail(
        &self,
        request: Request<v1::AuditTailRequest>,
    ) -> Result<Response<Self::TailStream>, Status> {
        let ticket = admit(
            &self.0,
            &request,
            "Audit.Tail",
            Needs::Nothing,
            Access::List {
                what: "audit",
                prefix: String::new(),
            },
        )
        .await?;
        let req = request.into_inner();
        let sink = self.0.audit_sink();
        let Some(log) = sink.as_ref().and_then(|s| s.log()) else {
            return Err(ticket.finish::<()>(Err(off())).await.unwrap_err().into());
        };
        // Subscribed before reading, so no record falls between the two.
        let mut updates = log.subscribe();
        let n = usize::try_from(req.lines.min(MAX_TAIL_LINES)).unwrap_or(0);
        let path = log.path().to_path_buf();
        let read = tokio::task::spawn_blocking(move || last_lines(&path, n))
            .await
            .map_err(|e| Error::Internal(e.to_string()))
            .and_then(|r| r.map_err(|e| Error::AuditUnavailable(e.to_string())))
            .map(|lines| {
                let count = lines.len().to_string();
                (
                    lines,
                    vec![("lines", count), ("follow", req.follow.to_string())],
                )
            });
        let lines = ticket.finish(read).await?;
        let mut last = lines.last().map_or(0, |l| seq_of(l));
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let follow = req.follow;
        let mut shutdown = self.0.shutdown_signal();
        tokio::spawn(async move {
            for json in lines {
                if tx.send(Ok(v1::AuditLine { json })).await.is_err() {
                    return;
                }
            }
            if !follow {
                return;
            }
            loop {
                let got = tokio::select! {
                    got = updates.recv() => got,
                    _ = shutdown.wait_for(|s| *s) => return,
                    () = tx.closed() => return,
                };
                match got {
                    Ok((seq, line)) if seq > last => {
                        last = seq;
                        let line = v1::AuditLine {
                            json: line.to_string(),
                        };
                        if tx.send(Ok(line)).await.is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        let status = Status::data_loss(format!(
                            "{n} records went by faster than this client read them; read the log file"
                        ));
                        let _ = tx.send(Err(status)).await;
                        return;
                    }
                    Err(_) => return,
                }
            }
        });
        let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
        Ok(Response::new(Box::pin(stream)))
    }

    async fn verify(
        &self,
        request: Request<v1::AuditVerifyRequest>,
    ) -> Result<Response<v1::AuditVerifyResponse>, Status> {
        let ticket = admit(
            &self.0,
            &request,
            "Audit.Verify",
            Needs::Nothing,
            Access::List {
                what: "audit",
                prefix: String::new(),
            },
        )
        .await?;
        let req = request.into_inner();
        let sink = self.0.audit_sink();
        let own = sink
            .as_ref()
            .and_then(|s| s.log())
            .map(|l| l.path().to_path_buf());
        let (path, is_own) = match (req.log.is_empty(), own) {
            (true, Some(own)) => (own, true),
            (true, None) => return Err(ticket.finish::<()>(Err(off())).await.unwrap_err().into()),
            (false, own) => {
                let path = PathBuf::from(&req.log);
                let is_own = own.is_some_and(|o| o == path);
                (path, is_own)
            }
        };
        // The anchor key and the head exist only while unlocked, and the
        // head is that of the daemon's own log.
        let unlocked = self
            .0
            .with_unlocked(|u| Ok((u.vault.audit_key(), u.vault.body.audit_head.clone())))
            .ok();
        let report = tokio::task::spawn_blocking(move || {
            let key = unlocked.as_ref().map(|(k, _)| k.clone());
            let check = |seq: u64, prev: &str, mac: &str| {
                key.as_ref()
                    .is_some_and(|k| crate::audit::check_anchor(k, seq, prev, mac))
            };
            let head = unlocked
                .as_ref()
                .filter(|_| is_own)
                .and_then(|(_, h)| h.clone())
                .map(|h| keyholder_audit::Head {
                    seq: h.seq,
                    hash: h.hash,
                });
            let anchors = keyholder_audit::Anchors {
                mac: unlocked.is_some().then_some(&check as keyholder_audit::MacCheck<'_>),
                head,
            };
            let mut report = keyholder_audit::verify_log(&path, &anchors);
            if unlocked.is_none() {
                report.notes.push(
                    "the session is locked: only the hash chain was checked; unlock to check the anchors and the head recorded in the vault".into(),
                );
            } else if !is_own {
                report.notes.push(
                    "not the daemon's own log: the head recorded in the vault was not compared".into(),
                );
            }
            report
        })
        .await
        .map_err(|e| Error::Internal(e.to_string()));
        let response = report.map(|r| {
            let p = r.problem.clone();
            let response = v1::AuditVerifyResponse {
                ok: p.is_none(),
                problem_kind: p.as_ref().map(|p| p.kind.to_owned()).unwrap_or_default(),
                problem_seq: p.as_ref().and_then(|p| p.seq).unwrap_or(0),
                problem_place: p.as_ref().and_then(|p| p.place.clone()).unwrap_or_default(),
                problem: p.as_ref().map(|p| p.message.clone()).unwrap_or_default(),
                files: r.files,
                records: r.records,
                last_seq: r.last_seq,
                anchors: r.anchors,
                macs_checked: r.macs_checked,
                head_checked: r.head_checked,
                notes: r.notes,
            };
            let details = vec![
                ("ok", response.ok.to_string()),
                ("records", response.records.to_string()),
            ];
            (response, details)
        });
        Ok(Response::new(ticket.finish(response).await?))
    }
}
