//! Scripts in any language: a Python grpcio client with stubs generated from
//! proto/ unlocks the vault and reads a secret.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::util::Env;

/// Generates Python stubs from proto/ into the test's directory.
pub fn generate_stubs(env: &Env) -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let stubs = env.path().join("stubs");
    std::fs::create_dir(&stubs).expect("stubs dir");
    let out = Command::new("python3")
        .args(["-m", "grpc_tools.protoc", "-I"])
        .arg(root.join("proto"))
        .arg(format!("--python_out={}", stubs.display()))
        .arg(format!("--grpc_python_out={}", stubs.display()))
        .arg(root.join("proto/keyholder/v1/keyholder.proto"))
        .output()
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "stub generation failed (pip install grpcio-tools): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    stubs
}

#[test]
fn a_python_grpcio_client_unlocks_and_reads_a_secret() {
    let env = Env::new();
    let _daemon = env.start_daemon(&[]);
    env.init();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let stubs = generate_stubs(&env);
    let out = Command::new("python3")
        .arg(root.join("tests/python/client.py"))
        .arg(env.socket())
        .arg(&env.pin_file)
        .arg(&stubs)
        .output()
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "client.py: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).expect("client.py prints JSON");
    assert_eq!(r["state_before"], "SESSION_STATE_LOCKED");
    assert_eq!(r["locked_code"], "FAILED_PRECONDITION");
    assert_eq!(
        r["locked_message"],
        "the vault is locked: run `keyholder unlock`"
    );
    assert_eq!(r["state_after"], "SESSION_STATE_UNLOCKED");
    assert_eq!(r["generation"], 2);
    assert_eq!(r["value"], "from python");
    assert_eq!(r["listed"], serde_json::json!(["py/secret"]));
    assert_eq!(r["bad_name"], "INVALID_ARGUMENT");
    assert!(
        r["bad_name_message"]
            .as_str()
            .unwrap_or("")
            .starts_with("name:"),
        "{r}"
    );
    assert_eq!(r["too_big"], "RESOURCE_EXHAUSTED");
    assert_eq!(r["exists"], "ALREADY_EXISTS");
    assert_eq!(r["missing"], "NOT_FOUND");
    assert_eq!(r["health"], "SERVING");
    let services = r["services"].as_array().expect("services");
    for s in [
        "keyholder.v1.Session",
        "keyholder.v1.Secrets",
        "keyholder.v1.Admin",
        "grpc.health.v1.Health",
    ] {
        assert!(
            services.iter().any(|x| x == s),
            "{s} missing from reflection: {r}"
        );
    }
    // The CLI sees the script's write.
    assert_eq!(env.ok(&["secret", "get", "py/secret"]), "from python");
}
