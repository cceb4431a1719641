//! Generates the gRPC code from `proto/` with no system `protoc`: protox (a protobuf compiler
//! in Rust) parses the files into a descriptor set, tonic-prost-build generates from it,
//! and the encoded descriptor set is kept for server reflection.

use std::path::PathBuf;

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    let file = root.join("baremetal/v1/baremetal.proto");
    println!("cargo:rerun-if-changed={}", root.display());

    let fds = protox::compile([&file], [&root])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("baremetal_v1_descriptor.bin"), fds.encode_to_vec())?;

    tonic_prost_build::configure()
        .emit_rerun_if_changed(false)
        .compile_fds(fds)?;
    Ok(())
}
