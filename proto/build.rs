//! Compiles `proto/shoal.proto` with protox (pure Rust, no system `protoc`) and
//! generates the tonic/prost code into OUT_DIR.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/shoal.proto");
    let fds = protox::compile(["shoal.proto"], ["proto"])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(fds)?;
    Ok(())
}
