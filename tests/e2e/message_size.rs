//! A request over the gRPC message limit is RESOURCE_EXHAUSTED (exit 6), as
//! the README and docs/api.md say, through the CLI and through grpcio.

use std::process::Command;

use crate::util::{Env, assert_fails};

#[test]
fn a_request_over_the_message_limit_is_resource_exhausted_exit_6() {
    let (env, daemon) = Env::ready();
    // 1 MiB: over the 64 KiB value limit and over the message limit.
    let big = vec![b'x'; 1024 * 1024];
    let put = env.cli_with_stdin(&["secret", "put", "big"], Some(&big));
    assert_fails(&put, 6, "over the limit");
    let file = env.path().join("big.bin");
    std::fs::write(&file, &big).expect("write");
    env.ok(&["key", "generate", "k", "--type", "ed25519"]);
    let sign = env.cli(&["sign", "--key", "k", "--in", file.to_str().expect("utf8")]);
    assert_fails(&sign, 6, "over the limit");

    // A script sees the code itself.
    let stubs = crate::python::generate_stubs(&env);
    let script = r#"
import sys
sys.path.insert(0, sys.argv[2])
import grpc
from keyholder.v1 import keyholder_pb2 as pb, keyholder_pb2_grpc as rpc
ch = grpc.insecure_channel("unix:" + sys.argv[1], options=[("grpc.default_authority", "localhost")])
for call in [
    lambda: rpc.SecretsStub(ch).Put(pb.PutSecretRequest(name="big", value=b"x" * (1024 * 1024)), timeout=20),
    lambda: rpc.SignerStub(ch).Sign(pb.SignRequest(key="k", data=b"x" * (1024 * 1024)), timeout=20),
]:
    try:
        call()
        print("OK")
    except grpc.RpcError as e:
        print(e.code().name, e.details())
"#;
    let out = Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(env.socket())
        .arg(&stubs)
        .output()
        .expect("python3 runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines.len(),
        2,
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for line in lines {
        assert!(line.starts_with("RESOURCE_EXHAUSTED "), "{line}");
        assert!(line.contains("over the limit"), "{line}");
    }
    // The daemon goes on serving.
    assert!(env.ok(&["status"]).contains("unlocked"));
    assert!(!daemon.log_text().contains("panicked"));
}
