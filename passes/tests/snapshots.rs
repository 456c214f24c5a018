//! Snapshot tests: each pass on a tiny graph, the IR before and after in Kiln's text form.

use kiln_compiler::dtype::DType;
use kiln_compiler::ir::printer::print_graph;
use kiln_compiler::ir::{BinaryOp, Constant, Graph, Node, Op, UnaryOp, ValueDef, ValueType};
use kiln_compiler::Tensor;
use kiln_passes::{DeadCodeElimination, EliminateIdentity, Pass, Pipeline};

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
