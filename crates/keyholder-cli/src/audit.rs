//! `keyholder audit tail` and `keyholder audit verify` (docs/audit.md).

use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};
use keyholder_proto::v1;
use serde_json::{Value, json};

use crate::failure::{CliResult, Failure};

#[derive(Subcommand, Debug)]
pub(crate) enum AuditCommand {
    /// Print the last records of the audit log, oldest first; --follow
    /// keeps printing new ones as they are written.
    Tail(TailArgs),
    /// Check the log's hash chain (rotated files included); while the
    /// session is unlocked, also every anchor's MAC and the head the vault
    /// recorded (truncation). Names the first record edited, inserted,
    /// reordered or removed; exit 9 when the log is not intact.
    Verify(VerifyArgs),
}

#[derive(Args, Debug)]
pub(crate) struct TailArgs {
    /// How many records to print first.
    #[arg(short = 'n', long = "lines", default_value_t = 20)]
    lines: u32,
    /// Keep printing records as they are written (until interrupted).
    #[arg(short, long)]
    follow: bool,
}

#[derive(Args, Debug)]
pub(crate) struct VerifyArgs {
    /// The log's active file (default: the daemon's own log). Without a
    /// running keyholderd, the chain of this file is checked here.
    #[arg(long, value_name = "FILE")]
    log: Option<PathBuf>,
}

pub(crate) async fn audit(socket: &Path, cmd: AuditCommand, json: bool) -> CliResult {
    match cmd {
        AuditCommand::Tail(args) => {
            let (channel, _) = crate::connect(socket).await?;
            tail(channel, args, json).await
        }
        AuditCommand::Verify(args) => match crate::connect(socket).await {
            Ok((channel, _)) => verify(channel, args, json).await,
            Err(f) if f.code == 8 => match &args.log {
                Some(log) => verify_offline(log, json),
                None => Err(Failure::new(
                    8,
                    format!(
                        "{}; to check a log's chain without keyholderd, pass --log FILE",
                        f.message
                    ),
                )),
            },
            Err(f) => Err(f),
        },
    }
}

async fn tail(channel: tonic::transport::Channel, args: TailArgs, json: bool) -> CliResult {
    let mut client = v1::audit_client::AuditClient::new(channel);
    let mut stream = client
        .tail(v1::AuditTailRequest {
            lines: args.lines,
            follow: args.follow,
        })
        .await?
        .into_inner();
    while let Some(line) = stream.message().await? {
        if json {
            println!("{}", line.json);
        } else {
            println!("{}", human(&line.json));
        }
    }
    Ok(())
}

fn text<'a>(v: &'a Value, key: &str) -> &'a str {
    v.get(key).and_then(Value::as_str).unwrap_or("")
}

/// One record for a person: time, number, outcome, operation, object,
/// caller, then the request and the details.
pub(crate) fn human(line: &str) -> String {
    let Ok(v) = serde_json::from_str::<Value>(line) else {
        return line.to_owned();
    };
    let mut out = format!(
        "{} #{} {} {} {}",
        text(&v, "time"),
        v.get("seq").and_then(Value::as_u64).unwrap_or(0),
        text(&v, "outcome"),
        text(&v, "op"),
        text(&v, "object")
    );
    if let Some(reason) = v.get("reason").and_then(Value::as_str) {
        out.push_str(&format!(" ({reason})"));
    }
    match v.get("caller") {
        Some(c) if c.is_object() => {
            out.push_str(" by ");
            out.push_str(c.get("exe").and_then(Value::as_str).unwrap_or("?"));
            if let Some(pid) = c.get("pid").and_then(Value::as_i64) {
                out.push_str(&format!(" pid {pid}"));
            }
            if text(c, "channel") == "agent" {
                out.push_str(" via agent");
            }
            if c.get("forwarded").and_then(Value::as_bool) == Some(true) {
                out.push_str(" (forwarded)");
            }
            if let Some(unit) = c.get("unit").and_then(Value::as_str) {
                out.push_str(&format!(" unit {unit}"));
            }
            if let Some(grant) = c.get("grant").and_then(Value::as_str) {
                out.push_str(&format!(" grant {grant}"));
            }
        }
        _ => out.push_str(" by keyholderd"),
    }
    for key in ["request", "details"] {
        if let Some(Value::Object(m)) = v.get(key) {
            for (k, val) in m {
                match val {
                    Value::String(s) => out.push_str(&format!(" {k}={s}")),
                    other => out.push_str(&format!(" {k}={other}")),
                }
            }
        }
    }
    out
}

async fn verify(channel: tonic::transport::Channel, args: VerifyArgs, json: bool) -> CliResult {
    let mut client = v1::audit_client::AuditClient::new(channel);
    let log = match &args.log {
        Some(p) => std::path::absolute(p)
            .unwrap_or_else(|_| p.clone())
            .display()
            .to_string(),
        None => String::new(),
    };
    let r = client
        .verify(v1::AuditVerifyRequest { log })
        .await?
        .into_inner();
    report(&r, json)
}

fn verify_offline(log: &Path, json: bool) -> CliResult {
    let r = keyholder_audit::verify_log(log, &keyholder_audit::Anchors::default());
    let p = r.problem.clone();
    let mut notes = r.notes;
    notes.push(
        "keyholderd is not reachable: only the hash chain was checked, not the anchors or the head recorded in the vault".into(),
    );
    let response = v1::AuditVerifyResponse {
        ok: p.is_none(),
        problem_kind: p.as_ref().map(|p| p.kind.to_owned()).unwrap_or_default(),
        problem_seq: p.as_ref().and_then(|p| p.seq).unwrap_or(0),
        problem_place: p.as_ref().and_then(|p| p.place.clone()).unwrap_or_default(),
        problem: p.map(|p| p.message).unwrap_or_default(),
        files: r.files,
        records: r.records,
        last_seq: r.last_seq,
        anchors: r.anchors,
        macs_checked: false,
        head_checked: false,
        notes,
    };
    report(&response, json)
}

fn report(r: &v1::AuditVerifyResponse, json: bool) -> CliResult {
    if json {
        let v = json!({
            "ok": r.ok,
            "problem": if r.ok { Value::Null } else { json!({
                "kind": r.problem_kind,
                "seq": r.problem_seq,
                "place": r.problem_place,
                "message": r.problem,
            })},
            "files": r.files,
            "records": r.records,
            "last_seq": r.last_seq,
            "anchors": r.anchors,
            "macs_checked": r.macs_checked,
            "head_checked": r.head_checked,
            "notes": r.notes,
        });
        println!("{v}");
    } else {
        if r.ok {
            println!(
                "audit log intact: {} records (last {}) in {} file(s), {} anchor(s){}{}",
                r.records,
                r.last_seq,
                r.files.len(),
                r.anchors,
                if r.macs_checked {
                    ", every anchor's MAC verified"
                } else {
                    ", anchors not checked"
                },
                if r.head_checked {
                    ", not truncated behind the head the vault recorded"
                } else {
                    ""
                }
            );
        }
        for note in &r.notes {
            eprintln!("note: {note}");
        }
    }
    if r.ok {
        Ok(())
    } else {
        Err(Failure::new(
            9,
            format!("audit log not intact: {}", r.problem),
        ))
    }
}
