//! Generates the ONNX protobuf types from the vendored `proto/onnx.proto` with protox (a pure
//! Rust protobuf compiler), so that building Kiln needs no `protoc`.
fn main() {
    println!("cargo:rerun-if-changed=proto/onnx.proto");
    let fds =
        protox::compile(["proto/onnx.proto"], ["proto"]).expect("vendored onnx.proto must compile");
    let mut config = prost_build::Config::new();
    // Tensor payloads decode as `bytes::Bytes` slices of the memory-mapped model file: no copy.
    config.bytes(["."]);
    config
        .compile_fds(fds)
        .expect("prost code generation for onnx.proto");
}
