//! Shared helpers of the end-to-end tests: where the test models and ONNX node tests live,
//! running the `kiln` binary, and building small ONNX models in code.
#![allow(dead_code)]

use bytes::Bytes;
use kiln_compiler::proto::{self, tensor_shape_proto::dimension, type_proto};
use kiln_compiler::Tensor;
use prost::Message;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

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

// ---- running artifacts natively and under qemu-aarch64

/// The tensors `{prefix}_0.pb`, `{prefix}_1.pb`, ... of a test-data folder.
pub fn read_set(dir: &Path, prefix: &str) -> Vec<Tensor> {
    (0..)
        .map(|k| dir.join(format!("{prefix}_{k}.pb")))
        .take_while(|p| p.exists())
        .map(|p| {
            kiln_compiler::onnx::tensor_proto::read_tensor_file(&p)
                .unwrap()
                .1
        })
        .collect()
}

pub fn run_native(so: &Path, inputs: &[Tensor], threads: usize) -> Vec<Tensor> {
    let model = kiln_runtime::Model::load(so).unwrap();
    let mut session = kiln_runtime::Session::new(&model, threads).unwrap();
    let ins: Vec<Vec<u8>> = inputs.iter().map(|t| t.to_le_bytes()).collect();
    let mut outs: Vec<Vec<u8>> = model
        .outputs()
        .iter()
        .map(|o| vec![0u8; o.byte_size().unwrap()])
        .collect();
    {
        let i: Vec<&[u8]> = ins.iter().map(|v| v.as_slice()).collect();
        let mut o: Vec<&mut [u8]> = outs.iter_mut().map(|v| v.as_mut_slice()).collect();
        session.run(&i, &mut o).unwrap();
    }
    model
        .outputs()
        .iter()
        .zip(&outs)
        .map(|(info, b)| {
            let dt = kiln_compiler::DType::from_onnx(info.dtype).unwrap();
            Tensor::from_le_bytes(dt, info.dims.iter().map(|&d| d as usize).collect(), b).unwrap()
        })
        .collect()
}

pub fn tool(name: &str) -> PathBuf {
    let found = std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join(name))
            .find(|f| f.is_file())
    });
    found.unwrap_or_else(|| {
        panic!("{name} is missing: apt-get install gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user (scripts/setup-test-env does)")
    })
}

/// The C harness built for aarch64 (once per test process).
pub fn aarch64_harness() -> &'static Path {
    static HARNESS: OnceLock<PathBuf> = OnceLock::new();
    HARNESS.get_or_init(|| {
        let out = std::env::temp_dir().join(format!("kiln_run_aarch64_{}", std::process::id()));
        let st = Command::new(tool("aarch64-linux-gnu-gcc"))
            .args(["-O2", "-std=c99", "-Wall", "-I"])
            .arg(repo_root().join("runtime/include"))
            .arg(repo_root().join("runtime/c/kiln_run.c"))
            .arg("-o")
            .arg(&out)
            .args(["-ldl", "-lpthread"])
            .status()
            .unwrap();
        assert!(st.success(), "building the aarch64 C harness failed");
        out
    })
}

pub struct QemuRun {
    pub code: Option<i32>,
    pub stderr: String,
    pub outputs: Vec<Vec<u8>>,
}

pub fn run_qemu(so: &Path, cpu: &str, inputs: &[Tensor], n_out: usize) -> QemuRun {
    let dir = tempfile::tempdir().unwrap();
    let (ind, outd) = (dir.path().join("in"), dir.path().join("out"));
    std::fs::create_dir_all(&ind).unwrap();
    std::fs::create_dir_all(&outd).unwrap();
    for (k, t) in inputs.iter().enumerate() {
        std::fs::write(ind.join(format!("input_{k}.bin")), t.to_le_bytes()).unwrap();
    }
    let out = Command::new(tool("qemu-aarch64"))
        .args(["-L", "/usr/aarch64-linux-gnu", "-cpu", cpu])
        .arg(aarch64_harness())
        .arg(so)
        .arg(&ind)
        .arg(&outd)
        .arg("2")
        .output()
        .unwrap();
    let outputs = (0..n_out)
        .map(|k| std::fs::read(outd.join(format!("output_{k}.bin"))).unwrap_or_default())
        .collect();
    QemuRun {
        code: out.status.code(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        outputs,
    }
}

/// Checks every output against the expected one (rtol, atol) and prints the largest error.
pub fn close(what: &str, expected: &[Tensor], got: &[Tensor], rtol: f64, atol: f64) {
    assert_eq!(expected.len(), got.len(), "{what}: output count");
    for (k, (e, g)) in expected.iter().zip(got).enumerate() {
        let d = kiln_compiler::compare::allclose(e, g, rtol, atol)
            .unwrap_or_else(|r| panic!("{what} {k}: {r}"));
        eprintln!("{what} output {k}: max abs diff {:.2e}", d.max_abs);
    }
}

/// Runs `model` in onnxruntime (scripts/ort_run.py) on the inputs of `inputs_dir`, writing
/// its outputs under `out`, and returns them.
pub fn onnxruntime(model: &Path, inputs_dir: &Path, out: &Path) -> Vec<Tensor> {
    let st = Command::new(cache_dir().join("venv/bin/python"))
        .arg(repo_root().join("scripts/ort_run.py"))
        .arg(model)
        .arg(inputs_dir)
        .arg(out)
        .status()
        .unwrap();
    assert!(
        st.success(),
        "onnxruntime could not run {}",
        model.display()
    );
    read_set(out, "output")
}
