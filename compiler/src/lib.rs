//! kiln-compiler: the front half of Kiln. It owns the graph IR ([`ir`]), ONNX import
//! ([`onnx`]), element types and host tensors ([`dtype`], [`tensor`]), static shape inference
//! ([`shape`]) and the reference interpreter ([`interp`]) that is the oracle for everything
//! later stages produce. It depends on no other Kiln crate.

pub mod compare;
pub mod dtype;
pub mod interp;
pub mod ir;
pub mod onnx;
pub mod shape;
pub mod tensor;

/// Types generated from the vendored `proto/onnx.proto` (ONNX 1.22) by prost at build time.
#[allow(clippy::all, missing_docs)]
pub mod proto {
    include!(concat!(env!("OUT_DIR"), "/onnx.rs"));
}

pub use dtype::DType;
pub use ir::Graph;
pub use tensor::{Tensor, TensorData};
