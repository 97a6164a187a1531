//! A stock grpcio channel to the Unix socket, with no options, is reset by
//! the server's HTTP/2 layer; `grpc.default_authority` fixes it, as
//! docs/api.md explains. The Python of docs/api.md runs as written.

use std::path::Path;
use std::process::{Command, Output};

use crate::util::Env;

const PROBE: &str = r#"
import sys
sys.path.insert(0, sys.argv[2])
import grpc
from keyholder.v1 import keyholder_pb2 as pb, keyholder_pb2_grpc as rpc
options = [("grpc.default_authority", "localhost")] if sys.argv[3] == "authority" else []
with grpc.insecure_channel("unix:" + sys.argv[1], options=options) as ch:
    try:
        print("OK", pb.SessionState.Name(rpc.SessionStub(ch).Status(pb.StatusRequest(), timeout=10).state))
    except grpc.RpcError as e:
        print(e.code().name, e.details())
"#;

fn probe(env: &Env, stubs: &Path, mode: &str) -> String {
    let out = Command::new("python3")
        .arg("-c")
        .arg(PROBE)
        .arg(env.socket())
        .arg(stubs)
        .arg(mode)
        .output()
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[test]
fn a_stock_grpcio_channel_is_reset_and_default_authority_fixes_it() {
    let env = Env::new();
    let _daemon = env.start_daemon(&[]);
    let stubs = crate::python::generate_stubs(&env);
    let plain = probe(&env, &stubs, "plain");
    assert!(
        plain.starts_with("INTERNAL") && plain.contains("RST_STREAM"),
        "the stock channel now gets {plain:?}: update docs/api.md's `Why grpc.default_authority`"
    );
    assert_eq!(
        probe(&env, &stubs, "authority"),
        "OK SESSION_STATE_UNINITIALIZED"
    );
}

/// The fenced blocks of `lang` in `text`, in order.
fn blocks(text: &str, lang: &str) -> Vec<String> {
    let fence = format!("```{lang}");
    let mut out = Vec::new();
    let mut current: Option<String> = None;
    for line in text.lines() {
        match &mut current {
            None if line == fence => current = Some(String::new()),
            Some(b) if line == "```" => {
                out.push(std::mem::take(b));
                current = None;
            }
            Some(b) => {
                b.push_str(line);
                b.push('\n');
            }
            None => {}
        }
    }
    out
}

#[test]
fn the_python_in_docs_api_md_runs_as_written() {
    let (env, _daemon) = Env::ready();
    env.put("db/prod/password", b"s3cret");
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let docs = std::fs::read_to_string(root.join("docs/api.md")).expect("docs/api.md");
    // The stub generation command, as written, in a directory holding proto/.
    let work = env.path().join("script");
    let proto = work.join("proto/keyholder/v1");
    std::fs::create_dir_all(&proto).expect("mkdir");
    std::fs::copy(
        root.join("proto/keyholder/v1/keyholder.proto"),
        proto.join("keyholder.proto"),
    )
    .expect("copy proto");
    let sh = blocks(&docs, "sh");
    let protoc = sh
        .iter()
        .flat_map(|b| b.lines())
        .find(|l| l.starts_with("python3 -m grpc_tools.protoc"))
        .expect("the protoc command in docs/api.md");
    let out = Command::new("sh")
        .args(["-c", protoc])
        .current_dir(&work)
        .output()
        .expect("sh");
    assert!(
        out.status.success(),
        "{protoc}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Every Python block, in order, then print what it read.
    let python = blocks(&docs, "python");
    assert!(
        python.len() >= 2,
        "docs/api.md has {} Python blocks",
        python.len()
    );
    let script = format!("{}\nprint(password.decode())\n", python.join("\n"));
    let run = |env: &Env| -> Output {
        Command::new("python3")
            .arg("-c")
            .arg(&script)
            .current_dir(&work)
            .env("XDG_RUNTIME_DIR", &env.runtime)
            .output()
            .expect("python3")
    };
    let out = run(&env);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "s3cret");
    env.ok(&["lock"]);
    let out = run(&env);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("Keyholder is locked: run `keyholder unlock`"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
