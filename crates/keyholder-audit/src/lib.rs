//! The Keyholder audit log: the record format, the hash chain, and the
//! verification of a log (its rotated files included). docs/audit.md
//! describes the format for readers in any language.
//!
//! A record is one JSON object on one line. Its last member is `hash`, the
//! hex SHA-256 of [`HASH_CONTEXT`] followed by the line's bytes up to (not
//! including) `,"hash":"...` with a closing `}` appended. Every record has a
//! `seq` (1, 2, 3, ...) and a `prev` (the previous record's `hash`; zeros for
//! the first), so editing, removing, inserting or reordering a record
//! breaks the chain at that record. `audit.anchor` records carry a MAC
//! keyed by the open vault over their `seq` and `prev`, which someone
//! without the token cannot recompute after rewriting the chain.

#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// Prefixed to every record's bytes before hashing.
pub const HASH_CONTEXT: &[u8] = b"keyholder-audit-v1\n";
/// Prefixed to an anchor's `seq` and `prev` before the MAC.
pub const ANCHOR_CONTEXT: &[u8] = b"keyholder-audit-anchor-v1\n";
/// The `prev` of the first record.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";
/// The operation name of anchor records.
pub const ANCHOR_OP: &str = "audit.anchor";

const HASH_KEY: &str = ",\"hash\":\"";

/// Lowercase hex.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 15)]));
    }
    s
}

/// The hash of a record body (a JSON object without its `hash` member).
pub fn body_hash(body: &str) -> String {
    let mut h = Sha256::new();
    h.update(HASH_CONTEXT);
    h.update(body.as_bytes());
    hex(&h.finalize())
}

/// The bytes an anchor's MAC is computed over.
pub fn anchor_message(seq: u64, prev: &str) -> Vec<u8> {
    let mut m = ANCHOR_CONTEXT.to_vec();
    m.extend_from_slice(&seq.to_be_bytes());
    m.extend_from_slice(prev.as_bytes());
    m
}

/// Turns a record body (a serialized JSON object that ends in `}`) into its
/// line (with `hash`, without the newline), and returns the hash too.
pub fn seal(body: &str) -> Option<(String, String)> {
    let open = body.strip_suffix('}')?;
    let hash = body_hash(body);
    let line = format!("{open}{HASH_KEY}{hash}\"}}");
    Some((line, hash))
}

/// A record's chain fields.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Parsed {
    /// Its sequence number.
    pub seq: u64,
    /// The previous record's hash.
    pub prev: String,
    /// Its own hash, as written.
    pub hash: String,
    /// Whether its hash matches its content.
    pub intact: bool,
    /// The whole record.
    pub value: serde_json::Value,
}

/// Reads one line (without its newline). `None` when it is not a record at
/// all (no JSON object, no `seq`, `prev` or `hash`).
pub fn parse(line: &str) -> Option<Parsed> {
    let at = line.rfind(HASH_KEY)?;
    let written = line.get(at + HASH_KEY.len()..)?.strip_suffix("\"}")?;
    let body = format!("{}}}", line.get(..at)?);
    let value: serde_json::Value = serde_json::from_str(line).ok()?;
    let seq = value.get("seq")?.as_u64()?;
    let prev = value.get("prev")?.as_str()?.to_owned();
    let hash = value.get("hash")?.as_str()?.to_owned();
    if hash != written {
        return None;
    }
    let intact = body_hash(&body) == hash;
    Some(Parsed {
        seq,
        prev,
        hash,
        intact,
        value,
    })
}

/// The files of the log at `active`, oldest first: the rotated ones
/// (`NAME.<first seq, 12 digits>`) by number, then `active` itself if it
/// exists.
pub fn log_files(active: &Path) -> std::io::Result<Vec<PathBuf>> {
    let dir = match active.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let Some(name) = active.file_name().and_then(|n| n.to_str()) else {
        return Ok(Vec::new());
    };
    let prefix = format!("{name}.");
    let mut rotated: Vec<(u64, PathBuf)> = Vec::new();
    for entry in std::fs::read_dir(&dir)? {
        let entry = entry?;
        let file = entry.file_name();
        let Some(file) = file.to_str() else { continue };
        if let Some(n) = file.strip_prefix(&prefix)
            && !n.is_empty()
            && n.bytes().all(|b| b.is_ascii_digit())
            && let Ok(n) = n.parse::<u64>()
        {
            rotated.push((n, entry.path()));
        }
    }
    rotated.sort();
    let mut files: Vec<PathBuf> = rotated.into_iter().map(|(_, p)| p).collect();
    if active.exists() {
        files.push(active.to_path_buf());
    }
    Ok(files)
}

/// The rotated file's name for a file whose first record is `first_seq`.
pub fn rotated_name(active: &Path, first_seq: u64) -> PathBuf {
    let mut name = active.as_os_str().to_owned();
    name.push(format!(".{first_seq:012}"));
    PathBuf::from(name)
}

/// The head of the chain as the vault records it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Head {
    /// The last record's sequence number.
    pub seq: u64,
    /// Its hash.
    pub hash: String,
}

/// Checks an anchor's MAC: its `seq`, `prev` and the hex MAC written.
pub type MacCheck<'a> = &'a dyn Fn(u64, &str, &str) -> bool;

/// What verification checks beyond the chain itself, when it can.
#[derive(Default)]
pub struct Anchors<'a> {
    /// Checks an anchor's MAC (`seq`, `prev`, the hex MAC): needs the
    /// unlocked vault.
    pub mac: Option<MacCheck<'a>>,
    /// The head the vault recorded at its last write or lock.
    pub head: Option<Head>,
}

/// The first problem found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// What happened: `edited`, `removed`, `inserted`, `reordered`,
    /// `truncated`, `rewritten`, `unreadable`.
    pub kind: &'static str,
    /// The record it concerns (its `seq` as written, or as expected).
    pub seq: Option<u64>,
    /// `FILE:LINE`, when it is a line of the log.
    pub place: Option<String>,
    /// A sentence for a person.
    pub message: String,
}

/// The outcome of a verification.
#[derive(Clone, Debug, Default)]
pub struct Report {
    /// The files read, oldest first.
    pub files: Vec<String>,
    /// Records read (up to the problem, if any).
    pub records: u64,
    /// The last good record's `seq`.
    pub last_seq: u64,
    /// Anchors seen; with `macs_checked`, each one's MAC verified.
    pub anchors: u64,
    /// Whether anchor MACs were checked.
    pub macs_checked: bool,
    /// Whether the vault's head was compared.
    pub head_checked: bool,
    /// The first problem, if any.
    pub problem: Option<Problem>,
    /// Remarks that are not problems.
    pub notes: Vec<String>,
}

/// Verifies the log whose active file is `active`, rotated files included.
pub fn verify_log(active: &Path, anchors: &Anchors<'_>) -> Report {
    match log_files(active) {
        Ok(files) if files.is_empty() => Report {
            problem: Some(Problem {
                kind: "unreadable",
                seq: None,
                place: None,
                message: format!("no audit log at {}", active.display()),
            }),
            ..Report::default()
        },
        Ok(files) => verify_files(&files, anchors),
        Err(e) => Report {
            problem: Some(Problem {
                kind: "unreadable",
                seq: None,
                place: None,
                message: format!("cannot list the log's directory: {e}"),
            }),
            ..Report::default()
        },
    }
}

/// Verifies `files` as one log, oldest first.
pub fn verify_files(files: &[PathBuf], anchors: &Anchors<'_>) -> Report {
    let mut report = Report {
        macs_checked: anchors.mac.is_some(),
        ..Report::default()
    };
    // Every line of every file, with its place, read first: whether a
    // record out of place was moved or removed depends on what follows.
    let mut all: Vec<(String, String)> = Vec::new();
    let count = files.len();
    for (i, path) in files.iter().enumerate() {
        let name = path.display().to_string();
        report.files.push(name.clone());
        let bytes = match std::fs::read(path) {
            Ok(bytes) => bytes,
            Err(e) => {
                report.problem = Some(Problem {
                    kind: "unreadable",
                    seq: None,
                    place: Some(name.clone()),
                    message: format!("cannot read {name}: {e}"),
                });
                return report;
            }
        };
        let text = String::from_utf8_lossy(&bytes);
        let mut lines: Vec<&str> = text.split('\n').collect();
        // The text after the last newline: empty, or a record still being
        // written (or cut short by a crash); never released to a caller.
        let tail = lines.pop().unwrap_or("");
        for (n, line) in lines.iter().enumerate() {
            all.push((format!("{name}:{}", n + 1), (*line).to_owned()));
        }
        if !tail.is_empty() {
            if i + 1 == count {
                report.notes.push(format!(
                    "{name} ends in an unfinished record ({} bytes), ignored: one still being written, or cut short by a crash",
                    tail.len()
                ));
            } else {
                all.push((format!("{name}:{}", lines.len() + 1), tail.to_owned()));
            }
        }
    }
    let parsed: Vec<Option<Parsed>> = all.iter().map(|(_, l)| parse(l)).collect();
    let seqs: Vec<Option<u64>> = parsed.iter().map(|p| p.as_ref().map(|r| r.seq)).collect();
    let mut last: Option<(u64, String)> = None;
    let mut head_seen = false;
    for (i, ((place, _), rec)) in all.iter().zip(parsed).enumerate() {
        let expected = last.as_ref().map_or(1, |(s, _)| s.saturating_add(1));
        let problem = |kind, seq, message| Problem {
            kind,
            seq,
            place: Some(place.clone()),
            message,
        };
        let Some(rec) = rec else {
            report.problem = Some(problem(
                "edited",
                Some(expected),
                format!(
                    "line {place} is not an intact audit record (expected record {expected}): edited or inserted"
                ),
            ));
            return report;
        };
        if !rec.intact {
            report.problem = Some(problem(
                "edited",
                Some(rec.seq),
                format!(
                    "record {} ({place}) was edited: its hash does not match its content",
                    rec.seq
                ),
            ));
            return report;
        }
        let later = |seq: u64| seqs.get(i + 1..).is_some_and(|s| s.contains(&Some(seq)));
        let earlier = |seq: u64| seqs.get(..i).is_some_and(|s| s.contains(&Some(seq)));
        match &last {
            None if rec.seq != 1 || rec.prev != GENESIS => {
                report.problem = Some(if later(1) {
                    problem(
                        "reordered",
                        Some(rec.seq),
                        format!(
                            "record {} ({place}) comes first, before record 1: records were reordered",
                            rec.seq
                        ),
                    )
                } else {
                    problem(
                        "removed",
                        Some(1),
                        format!(
                            "the log begins at record {} ({place}): records 1 to {} were removed",
                            rec.seq,
                            rec.seq.saturating_sub(1)
                        ),
                    )
                });
                return report;
            }
            None => {}
            Some((seq, hash)) if rec.prev != *hash || rec.seq != expected => {
                let (kind, message) = if rec.seq > expected && later(expected) {
                    (
                        "reordered",
                        format!(
                            "record {} ({place}) comes right after record {seq}, before record {expected}: records were reordered",
                            rec.seq
                        ),
                    )
                } else if rec.seq > expected {
                    (
                        "removed",
                        format!(
                            "record {} ({place}) follows record {seq}: {} record(s) before it were removed",
                            rec.seq,
                            rec.seq - expected
                        ),
                    )
                } else if rec.seq < expected && !earlier(rec.seq) {
                    (
                        "reordered",
                        format!(
                            "record {} ({place}) comes after record {seq}: records were reordered",
                            rec.seq
                        ),
                    )
                } else {
                    (
                        "inserted",
                        format!(
                            "record {} ({place}) does not follow record {seq}: a record was inserted (or replaced) here",
                            rec.seq
                        ),
                    )
                };
                report.problem = Some(problem(kind, Some(rec.seq), message));
                return report;
            }
            Some(_) => {}
        }
        if rec.value.get("op").and_then(|v| v.as_str()) == Some(ANCHOR_OP) {
            report.anchors += 1;
            if let Some(check) = anchors.mac {
                let mac = rec
                    .value
                    .get("details")
                    .and_then(|d| d.get("mac"))
                    .and_then(|m| m.as_str())
                    .unwrap_or("");
                if !check(rec.seq, &rec.prev, mac) {
                    report.problem = Some(problem(
                        "rewritten",
                        Some(rec.seq),
                        format!(
                            "anchor record {} ({place}) does not verify with this vault's key: the log up to it was rewritten, or it belongs to another vault",
                            rec.seq
                        ),
                    ));
                    return report;
                }
            }
        }
        if let Some(head) = &anchors.head
            && head.seq == rec.seq
        {
            head_seen = true;
            if head.hash != rec.hash {
                report.problem = Some(problem(
                    "rewritten",
                    Some(rec.seq),
                    format!(
                        "record {} ({place}) is not the one the vault recorded: the log was rewritten",
                        rec.seq
                    ),
                ));
                return report;
            }
        }
        report.records += 1;
        report.last_seq = rec.seq;
        last = Some((rec.seq, rec.hash));
    }
    if let Some(head) = &anchors.head {
        report.head_checked = true;
        if !head_seen {
            report.problem = Some(Problem {
                kind: "truncated",
                seq: Some(head.seq),
                place: None,
                message: format!(
                    "the log ends at record {} but the vault recorded record {}: records were removed from the end",
                    report.last_seq, head.seq
                ),
            });
        }
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_log(dir: &Path, n: u64) -> (PathBuf, Vec<String>) {
        let mut prev = GENESIS.to_owned();
        let mut lines = Vec::new();
        for seq in 1..=n {
            let body = format!("{{\"seq\":{seq},\"op\":\"x\",\"prev\":\"{prev}\"}}");
            let (line, hash) = seal(&body).unwrap();
            lines.push(line);
            prev = hash;
        }
        let path = dir.join("audit.log");
        std::fs::write(&path, lines.join("\n") + "\n").unwrap();
        (path, lines)
    }

    #[test]
    fn an_intact_log_verifies_and_each_change_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let (path, lines) = write_log(dir.path(), 5);
        let r = verify_log(&path, &Anchors::default());
        assert!(r.problem.is_none(), "{r:?}");
        assert_eq!(r.records, 5);

        let kind = |ls: Vec<String>| {
            std::fs::write(&path, ls.join("\n") + "\n").unwrap();
            let p = verify_log(&path, &Anchors::default()).problem.unwrap();
            (p.kind, p.seq)
        };
        let mut edited = lines.clone();
        edited[2] = edited[2].replace("\"x\"", "\"y\"");
        assert_eq!(kind(edited), ("edited", Some(3)));
        let mut removed = lines.clone();
        removed.remove(2);
        assert_eq!(kind(removed), ("removed", Some(4)));
        let mut reordered = lines.clone();
        reordered.swap(1, 2);
        assert_eq!(kind(reordered), ("reordered", Some(3)));
        let mut inserted = lines.clone();
        inserted.insert(2, lines[0].clone());
        assert_eq!(kind(inserted), ("inserted", Some(1)));
        let truncated = lines[..3].to_vec();
        std::fs::write(&path, truncated.join("\n") + "\n").unwrap();
        let head = Head {
            seq: 5,
            hash: parse(&lines[4]).unwrap().hash,
        };
        let anchors = Anchors {
            mac: None,
            head: Some(head),
        };
        assert_eq!(
            verify_log(&path, &anchors).problem.unwrap().kind,
            "truncated"
        );
    }
}
