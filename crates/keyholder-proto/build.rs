//! Compiles proto/ with protox (pure Rust), so building needs no `protoc`.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    let file = root.join("keyholder/v1/keyholder.proto");
    println!("cargo:rerun-if-changed={}", file.display());
    let descriptors = protox::compile([&file], [&root])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    let descriptor_path = out.join("keyholder_descriptor.bin");
    std::fs::write(
        &descriptor_path,
        prost::Message::encode_to_vec(&descriptors),
    )?;
    tonic_prost_build::configure()
        // These messages carry a PIN or a secret value: their Debug is
        // written by hand in lib.rs so the value never reaches a log.
        .skip_debug([
            "keyholder.v1.UnlockRequest",
            "keyholder.v1.InitRequest",
            "keyholder.v1.PutSecretRequest",
            "keyholder.v1.GetSecretResponse",
            "keyholder.v1.ImportCaRequest",
            "keyholder.v1.ImportKeyRequest",
            "keyholder.v1.IssueCertificateResponse",
            "keyholder.v1.IssueKubeconfigResponse",
            "keyholder.v1.IssueExecCredentialResponse",
            "keyholder.v1.SetPolicyRequest",
            "keyholder.v1.CreateGrantRequest",
            "keyholder.v1.CreateGrantResponse",
            "keyholder.v1.ClusterPkiFile",
        ])
        .file_descriptor_set_path(&descriptor_path)
        .skip_protoc_run()
        .compile_fds(descriptors)?;
    Ok(())
}
