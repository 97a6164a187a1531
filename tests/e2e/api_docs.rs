//! docs/api.md lists every service and RPC: those in proto/, and those the
//! running daemon serves (asked through server reflection with grpcio).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::util::Env;

fn proto_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("proto dir") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            proto_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "proto") {
            out.push(path);
        }
    }
}

/// (package, service, rpc) for every RPC declared in `text`.
fn rpcs(text: &str) -> Vec<(String, String, String)> {
    let mut package = String::new();
    let mut service: Option<String> = None;
    let mut found = Vec::new();
    for line in text.lines().map(str::trim) {
        let word = |prefix: &str| {
            line.strip_prefix(prefix).map(|rest| {
                rest.trim_start()
                    .split(|c: char| !(c.is_alphanumeric() || c == '_' || c == '.'))
                    .next()
                    .unwrap_or("")
                    .to_owned()
            })
        };
        if let Some(p) = word("package ") {
            package = p;
        } else if let Some(s) = word("service ") {
            service = Some(s);
        } else if let (Some(r), Some(s)) = (word("rpc "), &service) {
            found.push((package.clone(), s.clone(), r));
        } else if line == "}" {
            service = None;
        }
    }
    found
}

#[test]
fn every_rpc_in_the_proto_is_in_docs_api_md() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    proto_files(&root.join("proto"), &mut files);
    let mut declared = Vec::new();
    for f in &files {
        declared.extend(rpcs(&std::fs::read_to_string(f).expect("proto")));
    }
    assert!(declared.len() >= 27, "too few RPCs parsed: {declared:?}");
    let docs = std::fs::read_to_string(root.join("docs/api.md")).expect("docs/api.md");
    let missing: Vec<_> = declared
        .iter()
        .filter(|(_, s, r)| {
            let row = format!("| `{s}` | `{r}` |");
            !docs.lines().any(|l| l.starts_with(&row))
        })
        .map(|(p, s, r)| format!("{p}.{s}/{r}"))
        .collect();
    assert!(
        missing.is_empty(),
        "docs/api.md lacks a row for {missing:?}"
    );

    // The daemon serves exactly the services of the proto (plus health and
    // reflection, which docs/api.md names too).
    let env = Env::new();
    let _daemon = env.start_daemon(&[]);
    let stubs = crate::python::generate_stubs(&env);
    let script = r#"
import sys
sys.path.insert(0, sys.argv[2])
import grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
ch = grpc.insecure_channel("unix:" + sys.argv[1], options=[("grpc.default_authority", "localhost")])
stub = reflection_pb2_grpc.ServerReflectionStub(ch)
replies = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=20)
for r in replies:
    for s in r.list_services_response.service:
        print(s.name)
"#;
    let out = Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(env.socket())
        .arg(&stubs)
        .output()
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let served: BTreeSet<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect();
    let in_proto: BTreeSet<String> = declared
        .iter()
        .map(|(p, s, _)| format!("{p}.{s}"))
        .collect();
    for s in &served {
        let documented = if let Some(short) = s.strip_prefix("keyholder.v1.") {
            in_proto.contains(s) && docs.contains(&format!("| `{short}` |"))
        } else {
            docs.contains(&format!("`{s}`"))
        };
        assert!(documented, "served but not in docs/api.md: {s}");
    }
    for s in &in_proto {
        assert!(served.contains(s), "in the proto but not served: {s}");
    }
}
