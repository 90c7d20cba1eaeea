//! Compiles proto/ with protox (pure Rust), so no system protoc is needed.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["proto/guantong/v1/uplink.proto"];
    for file in files {
        println!("cargo:rerun-if-changed={file}");
    }
    let descriptors = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure()
        .bytes(".guantong.v1.BatchEnvelope.payload")
        // Maps as BTreeMap: encoding is then deterministic, which manifest
        // versions and manifest hashes rely on.
        .btree_map(".")
        .compile_fds(descriptors)?;
    Ok(())
}
