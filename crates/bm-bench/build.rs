//! Generates the echo baseline's gRPC code with protox (no system protoc), as bm-proto does.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("proto");
    println!("cargo:rerun-if-changed={}", root.display());
    let fds = protox::compile([root.join("echo.proto")], [&root])?;
    tonic_prost_build::configure()
        .emit_rerun_if_changed(false)
        .compile_fds(fds)?;
    Ok(())
}
