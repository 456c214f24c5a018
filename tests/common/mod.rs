//! Shared helpers of the end-to-end tests: where the test models and ONNX node tests live,
//! running the `kiln` binary, and building small ONNX models in code.
#![allow(dead_code)]

use bytes::Bytes;
use kiln_compiler::proto::{self, tensor_shape_proto::dimension, type_proto};
use prost::Message;
use std::path::{Path, PathBuf};
use std::process::Command;

pub fn cache_dir() -> PathBuf {
    match std::env::var_os("KILN_CACHE") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(std::env::var_os("HOME").expect("HOME is set")).join(".cache/kiln"),
    }
}

/// A materialized model folder (model.onnx + weights.bin + test data); see scripts/setup-test-env.
pub fn model_dir(name: &str) -> PathBuf {
    let d = cache_dir().join("models").join(name);
    assert!(
        d.join("model.onnx").is_file(),
        "{} is missing: run scripts/setup-test-env (or scripts/test) first",
        d.display()
    );
    d
}

/// The ONNX backend node tests shipped in the onnx==1.22.0 wheel of the test venv.
pub fn onnx_node_tests() -> PathBuf {
    if let Some(p) = std::env::var_os("KILN_ONNX_NODE_TESTS") {
        return PathBuf::from(p);
    }
    let lib = cache_dir().join("venv/lib");
    let found = std::fs::read_dir(&lib).ok().and_then(|rd| {
        rd.filter_map(|e| e.ok())
            .map(|e| e.path().join("site-packages/onnx/backend/test/data/node"))
            .find(|p| p.is_dir())
    });
    found.unwrap_or_else(|| {
        panic!(
            "no ONNX node tests under {}: run scripts/setup-test-env first",
            lib.display()
        )
    })
}

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub struct Output {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

pub fn kiln(args: &[&str]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .output()
        .expect("kiln runs");
    Output {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

// ---- building ONNX models in code

pub fn tensor_type(elem: i32, dims: &[Result<i64, &str>]) -> proto::TypeProto {
    proto::TypeProto {
        value: Some(type_proto::Value::TensorType(type_proto::Tensor {
            elem_type: Some(elem),
            shape: Some(proto::TensorShapeProto {
                dim: dims
                    .iter()
                    .map(|d| proto::tensor_shape_proto::Dimension {
                        value: Some(match d {
                            Ok(v) => dimension::Value::DimValue(*v),
                            Err(p) => dimension::Value::DimParam(p.to_string()),
                        }),
                        ..Default::default()
                    })
                    .collect(),
            }),
        })),
        ..Default::default()
    }
}

pub fn value_info(name: &str, elem: i32, dims: &[Result<i64, &str>]) -> proto::ValueInfoProto {
    proto::ValueInfoProto {
        name: Some(name.into()),
        r#type: Some(tensor_type(elem, dims)),
        ..Default::default()
    }
}

pub fn node(op: &str, name: &str, inputs: &[&str], outputs: &[&str]) -> proto::NodeProto {
    proto::NodeProto {
        op_type: Some(op.into()),
        name: Some(name.into()),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: outputs.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

pub fn f32_initializer(name: &str, dims: &[i64], raw: Vec<u8>) -> proto::TensorProto {
    proto::TensorProto {
        name: Some(name.into()),
        dims: dims.to_vec(),
        data_type: Some(1),
        raw_data: Some(Bytes::from(raw)),
        ..Default::default()
    }
}

pub fn model(
    nodes: Vec<proto::NodeProto>,
    inputs: Vec<proto::ValueInfoProto>,
    outputs: Vec<proto::ValueInfoProto>,
    inits: Vec<proto::TensorProto>,
) -> proto::ModelProto {
    proto::ModelProto {
        ir_version: Some(10),
        opset_import: vec![proto::OperatorSetIdProto {
            domain: Some(String::new()),
            version: Some(18),
        }],
        graph: Some(proto::GraphProto {
            name: Some("test".into()),
            node: nodes,
            input: inputs,
            output: outputs,
            initializer: inits,
            ..Default::default()
        }),
        ..Default::default()
    }
}

pub fn write_model(dir: &Path, file: &str, m: &proto::ModelProto) -> PathBuf {
    let p = dir.join(file);
    std::fs::write(&p, m.encode_to_vec()).expect("write model");
    p
}

/// x: f32[2,3] -> Relu -> y
pub fn relu_model() -> proto::ModelProto {
    model(
        vec![node("Relu", "relu", &["x"], &["y"])],
        vec![value_info("x", 1, &[Ok(2), Ok(3)])],
        vec![value_info("y", 1, &[Ok(2), Ok(3)])],
        vec![],
    )
}
