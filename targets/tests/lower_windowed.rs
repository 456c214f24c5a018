//! Snapshot tests of the windowed-op lowering (`lower/conv.rs`): the loop-IR text of tiny
//! graphs. Numerics are checked by the ONNX node tests on the host backend (`kiln conformance
//! --backend host`).

use kiln_compiler::dtype::DType;
use kiln_compiler::ir::{
    AutoPad, Constant, ConvAttrs, Graph, Node, Op, PoolAttrs, PoolKind, ValueDef, ValueType,
};
use kiln_compiler::Tensor;

fn attrs(kernel: &[usize], pads: &[usize], strides: &[usize]) -> ConvAttrs {
    ConvAttrs {
        auto_pad: AutoPad::NotSet,
        dilations: vec![],
        group: 1,
        kernel_shape: kernel.to_vec(),
        pads: pads.to_vec(),
        strides: strides.to_vec(),
    }
}

/// x [1,1,4,4] -> Conv(w [1,1,3,3] constant, pads 1) -> y [1,1,4,4].
fn conv_graph() -> Graph {
    let mut g = Graph {
        name: "conv".into(),
        ..Default::default()
    };
    let x = g.add_value(
        "x",
        ValueType::fixed(DType::F32, &[1, 1, 4, 4]),
        ValueDef::Input(0),
    );
    g.inputs.push(x);
    let w = g.add_constant(
        "w",
        Constant::from_tensor(&Tensor::from_vec(
            vec![1, 1, 3, 3],
            (0..9).map(|i| i as f32 - 4.0).collect::<Vec<f32>>(),
        )),
    );
    let y = g.add_value(
        "y",
        ValueType::fixed(DType::F32, &[1, 1, 4, 4]),
        ValueDef::Undefined,
    );
    g.add_node(Node {
        name: "conv".into(),
        op: Op::Conv(attrs(&[3, 3], &[1, 1, 1, 1], &[])),
        inputs: vec![Some(x), Some(w)],
        outputs: vec![y],
    });
    g.outputs.push(y);
    g
}

/// x [1,2,4,4] -> MaxPool(2x2, stride 2, pads 1) -> y, indices [1,2,3,3].
fn maxpool_graph() -> Graph {
    let mut g = Graph {
        name: "maxpool".into(),
        ..Default::default()
    };
    let x = g.add_value(
        "x",
        ValueType::fixed(DType::F32, &[1, 2, 4, 4]),
        ValueDef::Input(0),
    );
    g.inputs.push(x);
    let y = g.add_value(
        "y",
        ValueType::fixed(DType::F32, &[1, 2, 3, 3]),
        ValueDef::Undefined,
    );
    let i = g.add_value(
        "indices",
        ValueType::fixed(DType::I64, &[1, 2, 3, 3]),
        ValueDef::Undefined,
    );
    g.add_node(Node {
        name: "pool".into(),
        op: Op::Pool(PoolAttrs {
            kind: PoolKind::Max,
            window: attrs(&[2, 2], &[1, 1, 1, 1], &[2, 2]),
            ceil_mode: false,
            storage_order: 0,
        }),
        inputs: vec![Some(x)],
        outputs: vec![y, i],
    });
    g.outputs.push(y);
    g.outputs.push(i);
    g
}

fn lowered(g: &Graph) -> String {
    let p = kiln_targets::lower::lower(g).expect("lowers");
    assert_eq!(p.steps.len(), 1, "one kernel per node, written in place");
    // The kernel also has to make it through code generation.
    kiln_targets::compile(
        g,
        kiln_targets::target("x86_64").expect("x86_64 target"),
        &Default::default(),
    )
    .expect("compiles");
    p.steps[0].kernel.to_string()
}

#[test]
fn conv_3x3_pads_1() {
    insta::assert_snapshot!(lowered(&conv_graph()));
}

#[test]
fn maxpool_with_indices() {
    insta::assert_snapshot!(lowered(&maxpool_graph()));
}
