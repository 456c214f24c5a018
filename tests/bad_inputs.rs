//! Bad input never panics and never yields a silently wrong result: each case below must make
//! `kiln` exit non-zero with exactly one line on stderr, `error: ...`, naming the problem.

mod common;

use common::*;
use kiln_compiler::onnx::tensor_proto::write_tensor_file;
use kiln_compiler::proto;
use kiln_compiler::Tensor;
use prost::Message;
use std::path::Path;

struct Case {
    name: &'static str,
    /// Builds the files the case needs in `dir` and returns the kiln arguments.
    setup: fn(&Path) -> Vec<String>,
    expect: &'static str,
}

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

fn p(path: &Path) -> String {
    path.display().to_string()
}

fn run_on(dir: &Path, m: &proto::ModelProto) -> Vec<String> {
    let path = write_model(dir, "model.onnx", m);
    let inputs = dir.join("in");
    std::fs::create_dir_all(&inputs).unwrap();
    write_tensor_file(
        &inputs.join("input_0.pb"),
        "x",
        &Tensor::from_vec(vec![2, 3], vec![1f32; 6]),
    )
    .unwrap();
    s(&[
        "run",
        &p(&path),
        "--inputs-dir",
        &p(&inputs),
        "--output-dir",
        &p(&dir.join("out")),
    ])
}

fn external_model(location: &str) -> proto::ModelProto {
    let mut w = f32_initializer("w", &[2, 3], vec![]);
    w.raw_data = None;
    w.data_location = Some(1);
    w.external_data = vec![
        proto::StringStringEntryProto {
            key: Some("location".into()),
            value: Some(location.into()),
        },
        proto::StringStringEntryProto {
            key: Some("offset".into()),
            value: Some("0".into()),
        },
        proto::StringStringEntryProto {
            key: Some("length".into()),
            value: Some("24".into()),
        },
    ];
    model(
        vec![node("Add", "add", &["x", "w"], &["y"])],
        vec![value_info("x", 1, &[Ok(2), Ok(3)])],
        vec![value_info("y", 1, &[Ok(2), Ok(3)])],
        vec![w],
    )
}

const CASES: &[Case] = &[
    Case {
        name: "truncated model file",
        setup: |d| {
            let bytes = relu_model().encode_to_vec();
            let path = d.join("model.onnx");
            std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
            s(&["inspect", &p(&path)])
        },
        expect: "not a valid ONNX model",
    },
    Case {
        name: "bytes that are not protobuf",
        setup: |d| {
            let path = d.join("model.onnx");
            std::fs::write(&path, [0xffu8, 0xff, 0xff, 0xff, 0xff, 0x0f, 0x41, 0x42]).unwrap();
            s(&["run", &p(&path), "--output-dir", &p(&d.join("out"))])
        },
        expect: "not a valid ONNX model",
    },
    Case {
        name: "empty file",
        setup: |d| {
            let path = d.join("model.onnx");
            std::fs::write(&path, b"").unwrap();
            s(&["inspect", &p(&path)])
        },
        expect: "the file is empty",
    },
    Case {
        name: "graph with a cycle",
        setup: |d| {
            let m = model(
                vec![node("Add", "a", &["x", "t2"], &["t1"]), node("Relu", "b", &["t1"], &["t2"]), node("Relu", "c", &["t1"], &["y"])],
                vec![value_info("x", 1, &[Ok(2), Ok(3)])],
                vec![value_info("y", 1, &[Ok(2), Ok(3)])],
                vec![],
            );
            run_on(d, &m)
        },
        expect: "cycle through nodes: a, b",
    },
    Case {
        name: "node input that nothing produces",
        setup: |d| {
            let m = model(
                vec![node("Add", "add", &["x", "ghost"], &["y"])],
                vec![value_info("x", 1, &[Ok(2), Ok(3)])],
                vec![value_info("y", 1, &[Ok(2), Ok(3)])],
                vec![],
            );
            run_on(d, &m)
        },
        expect: "node 'add' reads 'ghost', which no node, graph input or initializer produces",
    },
    Case {
        name: "duplicate output names",
        setup: |d| {
            let m = model(
                vec![node("Relu", "r1", &["x"], &["y"]), node("Neg", "r2", &["x"], &["y"])],
                vec![value_info("x", 1, &[Ok(2), Ok(3)])],
                vec![value_info("y", 1, &[Ok(2), Ok(3)])],
                vec![],
            );
            run_on(d, &m)
        },
        expect: "value 'y' is defined more than once",
    },
    Case {
        name: "initializer data length does not match its shape",
        setup: |d| {
            let m = model(
                vec![node("Add", "add", &["x", "w"], &["y"])],
                vec![value_info("x", 1, &[Ok(2), Ok(3)])],
                vec![value_info("y", 1, &[Ok(2), Ok(3)])],
                vec![f32_initializer("w", &[2, 3], vec![0; 20])],
            );
            run_on(d, &m)
        },
        expect: "tensor 'w': holds 20 bytes of data but its type f32[2, 3] needs 24",
    },
    Case {
        name: "external data with '..' leaving the model folder",
        setup: |d| {
            std::fs::write(d.join("secret.bin"), [0u8; 24]).unwrap();
            let sub = d.join("m");
            std::fs::create_dir_all(&sub).unwrap();
            let path = write_model(&sub, "model.onnx", &external_model("../secret.bin"));
            s(&["run", &p(&path), "--input", "x=/nonexistent", "--output-dir", &p(&d.join("out"))])
        },
        expect: "location '../secret.bin' leaves the model's folder",
    },
    Case {
        name: "external data at an absolute path",
        setup: |d| {
            let abs = d.join("abs.bin");
            std::fs::write(&abs, [0u8; 24]).unwrap();
            let path = write_model(d, "model.onnx", &external_model(&p(&abs)));
            s(&["inspect", &p(&path), "--graph"])
        },
        expect: "is an absolute path",
    },
    Case {
        name: "external data through a symlink out of the model folder",
        setup: |d| {
            std::fs::write(d.join("outside.bin"), [0u8; 24]).unwrap();
            let sub = d.join("m");
            std::fs::create_dir_all(&sub).unwrap();
            std::os::unix::fs::symlink(d.join("outside.bin"), sub.join("w.bin")).unwrap();
            let path = write_model(&sub, "model.onnx", &external_model("w.bin"));
            s(&["inspect", &p(&path), "--graph"])
        },
        expect: "resolves (through a symbolic link) outside the model's folder",
    },
    Case {
        name: "unsupported operators are all listed",
        setup: |d| {
            let mut n3 = node("Frobnicate", "f2", &["t2"], &["y"]);
            n3.domain = Some("com.example".into());
            let m = model(
                vec![node("Frobnicate", "f1", &["x"], &["t1"]), node("Unique", "u", &["t1"], &["t2"]), n3],
                vec![value_info("x", 1, &[Ok(2), Ok(3)])],
                vec![value_info("y", 1, &[Ok(2), Ok(3)])],
                vec![],
            );
            run_on(d, &m)
        },
        expect: "unsupported operators: ai.onnx::Frobnicate v18 (nodes: f1); ai.onnx::Unique v18 (nodes: u); com.example::Frobnicate v0 (nodes: f2)",
    },
    Case {
        name: "unbound dynamic dimension",
        setup: |d| {
            let m = model(
                vec![node("Relu", "relu", &["x"], &["y"])],
                vec![value_info("x", 1, &[Err("batch"), Ok(3)])],
                vec![value_info("y", 1, &[Err("batch"), Ok(3)])],
                vec![],
            );
            let path = write_model(d, "model.onnx", &m);
            s(&["inspect", &p(&path), "--shapes"])
        },
        expect: "input 'x' has dynamic dimension 'batch'; bind it with --dim batch=VALUE",
    },
    Case {
        name: "--input of the wrong dtype",
        setup: |d| {
            let path = write_model(d, "model.onnx", &relu_model());
            let f = d.join("x.pb");
            write_tensor_file(&f, "x", &Tensor::from_vec(vec![2, 3], vec![1i64; 6])).unwrap();
            s(&["run", &p(&path), "--input", &format!("x={}", p(&f)), "--output-dir", &p(&d.join("out"))])
        },
        expect: "input 'x': expected f32[2,3], got i64[2, 3]",
    },
    Case {
        name: "--input of the wrong shape",
        setup: |d| {
            let path = write_model(d, "model.onnx", &relu_model());
            let f = d.join("x.pb");
            write_tensor_file(&f, "x", &Tensor::from_vec(vec![3, 2], vec![1f32; 6])).unwrap();
            s(&["run", &p(&path), "--input", &format!("x={}", p(&f)), "--output-dir", &p(&d.join("out"))])
        },
        expect: "input 'x': expected f32[2,3], got f32[3, 2]",
    },
    Case {
        name: "--input naming no input",
        setup: |d| {
            let path = write_model(d, "model.onnx", &relu_model());
            s(&["run", &p(&path), "--input", "nope=x.pb", "--output-dir", &p(&d.join("out"))])
        },
        expect: "--input nope: the model has no input of that name (inputs: x)",
    },
    Case {
        name: "input file that is not a TensorProto",
        setup: |d| {
            let path = write_model(d, "model.onnx", &relu_model());
            let f = d.join("x.pb");
            std::fs::write(&f, [0xffu8; 7]).unwrap();
            s(&["run", &p(&path), "--input", &format!("x={}", p(&f)), "--output-dir", &p(&d.join("out"))])
        },
        expect: "not a serialized ONNX TensorProto",
    },
    Case {
        name: "missing model file",
        setup: |d| s(&["inspect", &p(&d.join("absent.onnx"))]),
        expect: "No such file or directory",
    },
];

#[test]
fn bad_inputs_give_one_line_errors() {
    let mut failures = Vec::new();
    for case in CASES {
        let dir = tempfile::tempdir().unwrap();
        let args = (case.setup)(dir.path());
        let argv: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
        let out = kiln(&argv);
        let lines: Vec<&str> = out.stderr.lines().collect();
        let ok = out.code == Some(1)
            && lines.len() == 1
            && lines[0].starts_with("error: ")
            && lines[0].contains(case.expect)
            && !out.stderr.contains("panicked");
        if !ok {
            failures.push(format!(
                "{}: exit {:?}, stderr: {:?}",
                case.name, out.code, out.stderr
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} cases misbehaved:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
