use super::*;
use keyholder_audit::{Anchors, verify_log};

fn draft(n: u64) -> Draft {
    let mut d = Map::new();
    d.insert("n".into(), json!(n));
    Draft::system("test.op", "thing", d)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_records_chain_and_verify_across_rotations_and_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.log");
    let log = AuditLog::open(path.clone(), 4096);
    let mut tasks = Vec::new();
    for i in 0..8u64 {
        let log = log.clone();
        tasks.push(tokio::spawn(async move {
            for j in 0..20u64 {
                log.record_draft(draft(i * 100 + j)).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let key = [7u8; 32];
    let head = log.anchor(&key).await.unwrap();
    assert_eq!(head.seq, 1 + 160 + 1);
    drop(log);
    let files = keyholder_audit::log_files(&path).unwrap();
    assert!(files.len() > 2, "rotated: {files:?}");
    let check = |seq: u64, prev: &str, mac: &str| check_anchor(&key, seq, prev, mac);
    let anchors = Anchors {
        mac: Some(&check),
        head: Some(head.clone()),
    };
    let r = verify_log(&path, &anchors);
    assert!(r.problem.is_none(), "{r:?}");
    assert_eq!(r.records, head.seq);
    assert_eq!(r.anchors, 1);

    // Another key does not verify the anchor.
    let other = |seq: u64, prev: &str, mac: &str| check_anchor(&[8u8; 32], seq, prev, mac);
    let r = verify_log(
        &path,
        &Anchors {
            mac: Some(&other),
            head: None,
        },
    );
    assert_eq!(r.problem.unwrap().kind, "rewritten");

    // A restart continues the chain.
    let log = AuditLog::open(path.clone(), 4096);
    log.record_draft(draft(1)).await.unwrap();
    assert_eq!(log.head().seq, head.seq + 2);
    let r = verify_log(&path, &Anchors::default());
    assert!(r.problem.is_none(), "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_log_fails_closed_and_resumes_once_writable() {
    let dir = tempfile::tempdir().unwrap();
    let logs = dir.path().join("logs");
    let path = logs.join("audit.log");
    let log = AuditLog::open(path.clone(), 1 << 20);
    log.record_draft(draft(1)).await.unwrap();
    std::fs::remove_dir_all(&logs).unwrap();
    let err = log.record_draft(draft(2)).await.unwrap_err();
    assert!(
        err.to_string().starts_with("audit log cannot be written"),
        "{err}"
    );
    assert!(log.ready().is_err());
    assert!(log.record_draft(draft(3)).await.is_err());
    std::fs::create_dir(&logs).unwrap();
    log.ready().unwrap();
    log.record_draft(draft(4)).await.unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    assert!(
        lines[0].contains("\"op\":\"audit.resumed\""),
        "{}",
        lines[0]
    );
    assert!(lines[0].contains("\"lost\":2"), "{}", lines[0]);
    // The records before the removal went with the file: verify says so.
    let r = verify_log(&path, &Anchors::default());
    assert_eq!(r.problem.unwrap().kind, "removed");
}
