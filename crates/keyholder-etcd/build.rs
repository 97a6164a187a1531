//! Compiles proto/etcd.proto with protox (pure Rust), so building needs no
//! `protoc` (the same way keyholder-proto is built).

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("proto");
    let file = root.join("etcd.proto");
    println!("cargo:rerun-if-changed={}", file.display());
    let descriptors = protox::compile([&file], [&root])?;
    tonic_prost_build::configure()
        .build_server(false)
        .skip_protoc_run()
        .compile_fds(descriptors)?;
    Ok(())
}
