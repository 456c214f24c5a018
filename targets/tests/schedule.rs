//! Snapshot tests of loop-IR kernels before and after scheduling: a MatMul against a constant
//! (B packed in panels of 8 columns whose loop lowering vectorizes, a 4-row register tile, the
//! tile loop parallel, and a 4-column tail panel vectorized by the schedule), a broadcasting elementwise Add+Relu chain (innermost loop
//! vectorized) and a Softmax (its reductions stay scalar: they carry a value between
//! iterations). With the AVX2 microkernel (x86_64-v3 targets), a Gemm against a constant
//! becomes calls of 6- and 1-row tiles over 16-column panels in blocks of 64 reduction steps,
//! then its alpha and bias, and a 4-column tail panel in loop IR. A MatMulNBits with int8
//! activations on x86_64-v3-vnni becomes the activation quantizing kernel and calls of the
//! hand-written 16-column tile. The numerics of scheduled code are checked end to end by
//! tests/codegen_e2e.rs, tests/quantize_e2e.rs and the host conformance run.

use kiln_compiler::dtype::DType;
use kiln_compiler::ir::{
    BinaryOp, Constant, Graph, Node, Op, SoftmaxKind, UnaryOp, ValueDef, ValueType,
};
use kiln_compiler::Tensor;
use kiln_targets::lower::{lower, lower_with, LowerOptions};
use kiln_targets::schedule::{schedule, ScheduleOptions};

fn graph() -> Graph {
    let mut g = Graph {
        name: "tiny".into(),
        ..Default::default()
    };
    let x = g.add_value(
        "x",
        ValueType::fixed(DType::F32, &[16, 8]),
        ValueDef::Input(0),
    );
    g.inputs.push(x);
    let w = g.add_constant(
        "w",
        Constant::from_tensor(&Tensor::from_vec(
            vec![8, 12],
            (0..96).map(|i| i as f32 * 0.01).collect::<Vec<f32>>(),
        )),
    );
    let b = g.add_constant(
        "b",
        Constant::from_tensor(&Tensor::from_vec(vec![12], vec![0.5f32; 12])),
    );
    let t = |g: &mut Graph, name: &str| {
        g.add_value(
            name,
            ValueType::fixed(DType::F32, &[16, 12]),
            ValueDef::Undefined,
        )
    };
    let (mm, add, relu, y) = (
        t(&mut g, "mm"),
        t(&mut g, "add"),
        t(&mut g, "relu"),
        t(&mut g, "y"),
    );
    g.add_node(Node {
        name: "matmul".into(),
        op: Op::MatMul,
        inputs: vec![Some(x), Some(w)],
        outputs: vec![mm],
    });
    g.add_node(Node {
        name: "add".into(),
        op: Op::Binary(BinaryOp::Add),
        inputs: vec![Some(mm), Some(b)],
        outputs: vec![add],
    });
    g.add_node(Node {
        name: "relu".into(),
        op: Op::Unary(UnaryOp::Relu),
        inputs: vec![Some(add)],
        outputs: vec![relu],
    });
    g.add_node(Node {
        name: "softmax".into(),
        op: Op::Softmax {
            kind: SoftmaxKind::Softmax,
            axis: -1,
            coerce_2d: false,
        },
        inputs: vec![Some(relu)],
        outputs: vec![y],
    });
    g.outputs.push(y);
    g
}

#[test]
fn kernels_before_and_after_scheduling() {
    insta::assert_snapshot!(before_and_after(&lower(&graph()).unwrap()));
}

/// Every kernel of `program` as text, before and after scheduling.
fn before_and_after(program: &kiln_targets::lower::Program) -> String {
    let opts = ScheduleOptions {
        vector_lanes: 4,
        vector_jam: 2,
        unroll: 4,
        parallel_min_work: 64,
    };
    let mut text = String::new();
    for step in &program.steps {
        let mut k = step.kernel.clone();
        text.push_str(&format!("# before\n{k}"));
        schedule(&mut k, &opts);
        text.push_str(&format!("# after\n{k}\n"));
    }
    text
}

#[test]
fn microkernel_product_before_and_after_scheduling() {
    let mut g = Graph {
        name: "gemm".into(),
        ..Default::default()
    };
    let x = g.add_value(
        "x",
        ValueType::fixed(DType::F32, &[7, 130]),
        ValueDef::Input(0),
    );
    g.inputs.push(x);
    let w = g.add_constant(
        "w",
        Constant::from_tensor(&Tensor::from_vec(
            vec![130, 20],
            (0..2600).map(|i| i as f32 * 0.001).collect::<Vec<f32>>(),
        )),
    );
    let b = g.add_constant(
        "b",
        Constant::from_tensor(&Tensor::from_vec(vec![20], vec![0.5f32; 20])),
    );
    let y = g.add_value(
        "y",
        ValueType::fixed(DType::F32, &[7, 20]),
        ValueDef::Undefined,
    );
    g.add_node(Node {
        name: "gemm".into(),
        op: Op::Gemm {
            alpha: 0.5,
            beta: 1.0,
            trans_a: false,
            trans_b: false,
        },
        inputs: vec![Some(x), Some(w), Some(b)],
        outputs: vec![y],
    });
    g.outputs.push(y);
    let program = lower_with(
        &g,
        &LowerOptions {
            sgemm_avx2: true,
            ..LowerOptions::default()
        },
    )
    .unwrap();
    insta::assert_snapshot!(before_and_after(&program));
}

/// A MatMulNBits with int8 activations (K = 80 in blocks of 32: two whole blocks and a
/// 16-row tail; N = 16; two rows) on x86_64-v3-vnni: the activation quantizing kernel, then
/// per span of 16 columns (the parallel loop) and row, one call of the VNNI tile, and the
/// bias added after it.
#[test]
fn q4_int8_tile_before_and_after_scheduling() {
    let (k, n, block) = (80usize, 16usize, 32usize);
    let blocks = k.div_ceil(block);
    let mut g = Graph {
        name: "q4".into(),
        ..Default::default()
    };
    let x = g.add_value(
        "x",
        ValueType::fixed(DType::F32, &[2, k]),
        ValueDef::Input(0),
    );
    g.inputs.push(x);
    let constant =
        |g: &mut Graph, name: &str, t: Tensor| g.add_constant(name, Constant::from_tensor(&t));
    let w = constant(
        &mut g,
        "w",
        Tensor::from_vec(
            vec![n, blocks, block / 2],
            (0..n * blocks * block / 2)
                .map(|i| (i * 37 % 256) as u8)
                .collect::<Vec<u8>>(),
        ),
    );
    let scales = constant(
        &mut g,
        "scales",
        Tensor::from_vec(
            vec![n * blocks],
            (0..n * blocks).map(|i| 0.01 + i as f32 * 1e-3).collect(),
        ),
    );
    let zero_points = constant(
        &mut g,
        "zero_points",
        Tensor::from_vec(
            vec![n * blocks.div_ceil(2)],
            (0..n * blocks.div_ceil(2))
                .map(|i| (i * 11 % 256) as u8)
                .collect::<Vec<u8>>(),
        ),
    );
    let bias = constant(&mut g, "bias", Tensor::from_vec(vec![n], vec![0.25f32; n]));
    let y = g.add_value(
        "y",
        ValueType::fixed(DType::F32, &[2, n]),
        ValueDef::Undefined,
    );
    g.add_node(Node {
        name: "q4".into(),
        op: Op::MatMulNBits {
            k,
            n,
            bits: 4,
            block_size: block,
            accuracy_level: 4,
        },
        inputs: vec![
            Some(x),
            Some(w),
            Some(scales),
            Some(zero_points),
            None,
            Some(bias),
        ],
        outputs: vec![y],
    });
    g.outputs.push(y);
    let program = lower_with(
        &g,
        &LowerOptions {
            sgemm_avx2: true,
            q4_int8_tile: Some(kiln_targets::microkernel::Q4Dot::AvxVnni),
            ..LowerOptions::default()
        },
    )
    .unwrap();
    insta::assert_snapshot!(before_and_after(&program));
}
