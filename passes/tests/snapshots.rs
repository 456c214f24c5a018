//! Snapshot tests: each pass on a tiny graph, the IR before and after in Kiln's text form.

use kiln_compiler::dtype::DType;
use kiln_compiler::ir::printer::print_graph;
use kiln_compiler::ir::{BinaryOp, Constant, Graph, Node, Op, UnaryOp, ValueDef, ValueType};
use kiln_compiler::Tensor;
use kiln_passes::prune::{Amount, Prune, PruneOptions, StructureKind};
use kiln_passes::{DeadCodeElimination, EliminateIdentity, FoldBatchNorm, Pass, Pipeline};

/// x -> Identity -> Relu -> Add(w) -> y, plus an unused Neg branch.
fn tiny_graph() -> Graph {
    let mut g = Graph {
        name: "tiny".into(),
        ..Default::default()
    };
    let x = g.add_value(
        "x",
        ValueType::fixed(DType::F32, &[2, 3]),
        ValueDef::Input(0),
    );
    g.inputs.push(x);
    let w = g.add_constant(
        "w",
        Constant::from_tensor(&Tensor::from_vec(vec![3], vec![0.5f32, -1.0, 2.0])),
    );
    let t = ValueType::fixed(DType::F32, &[2, 3]);
    let a = g.add_value("a", t.clone(), ValueDef::Undefined);
    let b = g.add_value("b", t.clone(), ValueDef::Undefined);
    let y = g.add_value("y", t.clone(), ValueDef::Undefined);
    let unused = g.add_value("unused", t, ValueDef::Undefined);
    g.add_node(Node {
        name: "copy".into(),
        op: Op::Identity,
        inputs: vec![Some(x)],
        outputs: vec![a],
    });
    g.add_node(Node {
        name: "relu".into(),
        op: Op::Unary(UnaryOp::Relu),
        inputs: vec![Some(a)],
        outputs: vec![b],
    });
    g.add_node(Node {
        name: "add".into(),
        op: Op::Binary(BinaryOp::Add),
        inputs: vec![Some(b), Some(w)],
        outputs: vec![y],
    });
    g.add_node(Node {
        name: "neg".into(),
        op: Op::Unary(UnaryOp::Neg),
        inputs: vec![Some(a)],
        outputs: vec![unused],
    });
    g.outputs.push(y);
    g
}

fn before_after(pass: impl Pass + 'static) -> String {
    let mut g = tiny_graph();
    let before = print_graph(&g);
    let name = pass.name();
    Pipeline::new()
        .verify_each(true)
        .with(pass)
        .run(&mut g)
        .unwrap();
    format!("# before {name}\n{before}\n# after\n{}", print_graph(&g))
}

#[test]
fn eliminate_identity() {
    insta::assert_snapshot!(before_after(EliminateIdentity));
}

#[test]
fn dead_code_elimination() {
    insta::assert_snapshot!(before_after(DeadCodeElimination));
}

/// Builds graphs node by node, naming values as it goes.
struct Builder {
    g: Graph,
}

impl Builder {
    fn new(name: &str) -> Builder {
        Builder {
            g: Graph {
                name: name.into(),
                ..Default::default()
            },
        }
    }

    fn input(&mut self, name: &str, shape: &[usize]) -> kiln_compiler::ir::ValueId {
        let i = self.g.inputs.len();
        let v = self.g.add_value(
            name,
            ValueType::fixed(DType::F32, shape),
            ValueDef::Input(i),
        );
        self.g.inputs.push(v);
        v
    }

    /// A constant whose entry `i` is `f(i)`.
    fn weight(
        &mut self,
        name: &str,
        shape: &[usize],
        f: impl Fn(&[usize]) -> f32,
    ) -> kiln_compiler::ir::ValueId {
        let n: usize = shape.iter().product();
        let vals: Vec<f32> = (0..n)
            .map(|flat| {
                let mut idx = vec![0; shape.len()];
                let mut r = flat;
                for a in (0..shape.len()).rev() {
                    idx[a] = r % shape[a];
                    r /= shape[a];
                }
                f(&idx)
            })
            .collect();
        self.g.add_constant(
            name,
            Constant::from_tensor(&Tensor::from_vec(shape.to_vec(), vals)),
        )
    }

    fn node(
        &mut self,
        name: &str,
        op: Op,
        inputs: &[kiln_compiler::ir::ValueId],
    ) -> kiln_compiler::ir::ValueId {
        let out = self
            .g
            .add_value(name, ValueType::default(), ValueDef::Undefined);
        self.g.add_node(Node {
            name: name.into(),
            op,
            inputs: inputs.iter().map(|&v| Some(v)).collect(),
            outputs: vec![out],
        });
        out
    }

    fn finish(mut self, outputs: &[kiln_compiler::ir::ValueId]) -> Graph {
        self.g.outputs = outputs.to_vec();
        kiln_compiler::shape::infer(&mut self.g).unwrap();
        self.g
    }
}

/// A SwiGLU feed-forward block (4 -> 16 -> 4) whose neurons 1, 3, 5, ... have small gate and
/// up columns and zero down rows: magnitude pruning of half the neurons removes exactly them,
/// and the output cannot change.
fn swiglu_ffn() -> Graph {
    let mut b = Builder::new("swiglu");
    let x = b.input("x", &[2, 4]);
    let big = |n: usize| n % 2 == 0;
    let wg = b.weight("mlp.gate.w", &[4, 16], |i| {
        if big(i[1]) {
            0.3 + 0.1 * (i[0] as f32) - 0.05 * (i[1] as f32)
        } else {
            0.01
        }
    });
    let wu = b.weight("mlp.up.w", &[4, 16], |i| {
        if big(i[1]) {
            0.2 - 0.1 * (i[0] as f32) + 0.03 * (i[1] as f32)
        } else {
            -0.01
        }
    });
    let wd = b.weight("mlp.down.w", &[16, 4], |i| {
        if big(i[0]) {
            0.5 - 0.07 * (i[0] as f32) + 0.2 * (i[1] as f32)
        } else {
            0.0
        }
    });
    let gate = b.node("gate", Op::MatMul, &[x, wg]);
    let sig = b.node("sig", Op::Unary(UnaryOp::Sigmoid), &[gate]);
    let silu = b.node("silu", Op::Binary(BinaryOp::Mul), &[gate, sig]);
    let up = b.node("up", Op::MatMul, &[x, wu]);
    let h = b.node("h", Op::Binary(BinaryOp::Mul), &[silu, up]);
    let y = b.node("down", Op::MatMul, &[h, wd]);
    b.finish(&[y])
}

/// Conv(3 -> 8) -> BatchNormalization -> Relu -> Conv(8 -> 4, 1x1) whose second convolution
/// ignores channels 4..8 (zero weights) and whose first convolution gives them small filters.
fn conv_bn_relu_conv() -> Graph {
    use kiln_compiler::ir::{AutoPad, ConvAttrs};
    let conv = |k: usize, pad: usize| {
        Op::Conv(ConvAttrs {
            auto_pad: AutoPad::NotSet,
            dilations: vec![1, 1],
            group: 1,
            kernel_shape: vec![k, k],
            pads: vec![pad; 4],
            strides: vec![1, 1],
        })
    };
    let mut b = Builder::new("cnn");
    let x = b.input("x", &[1, 3, 6, 6]);
    let w1 = b.weight("conv1.w", &[8, 3, 3, 3], |i| {
        let s = if i[0] < 4 { 1.0 } else { 0.01 };
        s * (0.1 * (i[1] as f32) - 0.05 * (i[2] as f32) + 0.02 * (i[0] as f32 + i[3] as f32))
    });
    let b1 = b.weight("conv1.b", &[8], |i| 0.1 * i[0] as f32);
    let scale = b.weight("bn.scale", &[8], |i| 1.0 + 0.1 * i[0] as f32);
    let bias = b.weight("bn.bias", &[8], |i| 0.05 * i[0] as f32);
    let mean = b.weight("bn.mean", &[8], |i| 0.01 * i[0] as f32);
    let var = b.weight("bn.var", &[8], |i| 1.0 + 0.02 * i[0] as f32);
    let w2 = b.weight("conv2.w", &[4, 8, 1, 1], |i| {
        if i[1] < 4 {
            0.3 - 0.1 * (i[0] as f32) + 0.05 * (i[1] as f32)
        } else {
            0.0
        }
    });
    let c1 = b.node("conv1", conv(3, 1), &[x, w1, b1]);
    let bn = b.node(
        "bn",
        Op::BatchNorm { epsilon: 1e-5 },
        &[c1, scale, bias, mean, var],
    );
    let r = b.node("relu", Op::Unary(UnaryOp::Relu), &[bn]);
    let y = b.node("conv2", conv(1, 0), &[r, w2]);
    b.finish(&[y])
}

/// A fixed input in [-1, 1) for every graph input (static shapes, f32).
fn fixed_inputs(g: &Graph) -> Vec<Tensor> {
    g.inputs
        .iter()
        .map(|&v| {
            let shape = g.value(v).ty.static_shape().unwrap();
            let n: usize = shape.iter().product();
            Tensor::from_vec(
                shape,
                (0..n)
                    .map(|i| ((i * 7) % 11) as f32 / 5.0 - 1.0)
                    .collect::<Vec<f32>>(),
            )
        })
        .collect()
}

/// Prunes `g` with `options`; returns the before/after IR text and checks that the pruned
/// graph computes the same outputs as the original on a fixed input (the pruned units are
/// the ones that contribute nothing).
fn prune_snapshot(mut g: Graph, options: PruneOptions) -> String {
    let before = print_graph(&g);
    let inputs = fixed_inputs(&g);
    let expected = kiln_compiler::interp::run(&g, &inputs).unwrap();
    let pass = Prune {
        options,
        activations: None,
    };
    let report = pass.prune(&mut g).unwrap();
    Pipeline::new()
        .verify_each(true)
        .with(DeadCodeElimination)
        .run(&mut g)
        .unwrap();
    let got = kiln_compiler::interp::run(&g, &inputs).unwrap();
    for (e, o) in expected.iter().zip(&got) {
        kiln_compiler::compare::allclose(e, o, 1e-5, 1e-6).unwrap();
    }
    let pruned: Vec<String> = report
        .pruned
        .iter()
        .map(|p| {
            format!(
                "{} {}: {} -> {} {}, params {} -> {}",
                p.kind.key(),
                p.name,
                p.units_before,
                p.units_after,
                p.kind.unit(),
                p.params_before,
                p.params_after
            )
        })
        .collect();
    format!(
        "# before prune\n{before}\n# report\n{}\n# after\n{}",
        pruned.join("\n"),
        print_graph(&g)
    )
}

#[test]
fn prune_swiglu_ffn() {
    let mut options = PruneOptions::default();
    options
        .kinds
        .insert(StructureKind::Ffn, Amount::Fraction(0.5));
    insta::assert_snapshot!(prune_snapshot(swiglu_ffn(), options));
}

#[test]
fn prune_conv_bn_relu_conv() {
    let mut options = PruneOptions {
        multiple: 1,
        ..Default::default()
    };
    options
        .kinds
        .insert(StructureKind::Channels, Amount::Count(4));
    insta::assert_snapshot!(prune_snapshot(conv_bn_relu_conv(), options));
}

#[test]
fn prune_keeps_what_the_keep_list_names() {
    let mut g = swiglu_ffn();
    let mut options = PruneOptions::default();
    options.all = Some(Amount::Fraction(0.5));
    options
        .keep
        .push(kiln_passes::quantize::Glob::new("mlp*").unwrap());
    let r = Prune {
        options,
        activations: None,
    }
    .prune(&mut g)
    .unwrap();
    assert!(r.pruned.is_empty());
    assert_eq!(
        r.untouched,
        vec![("mlp".to_string(), "kept by glob 'mlp*'".to_string())]
    );
}

/// Runs `pass` on `g`; checks the outputs did not change on a fixed input; returns the IR
/// before and after.
fn exact_snapshot(mut g: Graph, pass: impl Pass + 'static) -> String {
    let before = print_graph(&g);
    let inputs = fixed_inputs(&g);
    let expected = kiln_compiler::interp::run(&g, &inputs).unwrap();
    let name = pass.name();
    Pipeline::new()
        .verify_each(true)
        .with(pass)
        .with(DeadCodeElimination)
        .run(&mut g)
        .unwrap();
    let got = kiln_compiler::interp::run(&g, &inputs).unwrap();
    for (e, o) in expected.iter().zip(&got) {
        kiln_compiler::compare::allclose(e, o, 1e-5, 1e-5).unwrap();
    }
    format!("# before {name}\n{before}\n# after\n{}", print_graph(&g))
}

#[test]
fn fold_batchnorm_into_conv() {
    insta::assert_snapshot!(exact_snapshot(conv_bn_relu_conv(), FoldBatchNorm));
}

#[test]
fn batchnorm_without_conv_becomes_mul_and_add() {
    let mut b = Builder::new("bn");
    let x = b.input("x", &[1, 3, 2, 2]);
    let scale = b.weight("bn.scale", &[3], |i| 1.0 + i[0] as f32);
    let bias = b.weight("bn.bias", &[3], |i| 0.5 * i[0] as f32);
    let mean = b.weight("bn.mean", &[3], |i| -0.1 * i[0] as f32);
    let var = b.weight("bn.var", &[3], |i| 0.5 + i[0] as f32);
    let y = b.node(
        "bn",
        Op::BatchNorm { epsilon: 1e-5 },
        &[x, scale, bias, mean, var],
    );
    insta::assert_snapshot!(exact_snapshot(b.finish(&[y]), FoldBatchNorm));
}

#[test]
fn prune_amount_for_every_kind_applies_without_a_per_kind_one() {
    let mut g = swiglu_ffn();
    let options = PruneOptions {
        all: Some(Amount::Fraction(0.5)),
        ..Default::default()
    };
    let r = Prune {
        options,
        activations: None,
    }
    .prune(&mut g)
    .unwrap();
    let pruned: Vec<(usize, usize)> = r
        .pruned
        .iter()
        .map(|p| (p.units_before, p.units_after))
        .collect();
    assert_eq!(pruned, vec![(16, 8)]);
}
