//! Shape inference folds shape subgraphs into constants and types every value; snapshot of a
//! Llama-style `Shape -> Gather -> Unsqueeze -> Concat -> Reshape` chain before and after.

use kiln_compiler::dtype::DType;
use kiln_compiler::ir::printer::print_graph;
use kiln_compiler::ir::verify::verify;
use kiln_compiler::ir::{Constant, Dim, Graph, Node, Op, ValueDef, ValueType};
use kiln_compiler::{shape, Tensor};
use std::collections::HashMap;

fn graph() -> Graph {
    let mut g = Graph {
        name: "reshape_heads".into(),
        ..Default::default()
    };
    let x = g.add_value(
        "x",
        ValueType {
            dtype: Some(DType::F32),
            shape: Some(vec![Dim::Symbolic("seq".into()), Dim::Fixed(8)]),
        },
        ValueDef::Input(0),
    );
    g.inputs.push(x);
    let i64c = |g: &mut Graph, name: &str, v: Vec<i64>, shape: Vec<usize>| {
        g.add_constant(name, Constant::from_tensor(&Tensor::from_vec(shape, v)))
    };
    let zero = i64c(&mut g, "zero", vec![0], vec![]);
    let axes = i64c(&mut g, "axes", vec![0], vec![1]);
    let heads = i64c(&mut g, "heads", vec![2, 4], vec![2]);
    let u = ValueType::default();
    let s = g.add_value("s", u.clone(), ValueDef::Undefined);
    let s0 = g.add_value("s0", u.clone(), ValueDef::Undefined);
    let s1 = g.add_value("s1", u.clone(), ValueDef::Undefined);
    let target = g.add_value("target", u.clone(), ValueDef::Undefined);
    let y = g.add_value("y", u, ValueDef::Undefined);
    g.add_node(Node {
        name: "shape".into(),
        op: Op::Shape {
            start: 0,
            end: None,
        },
        inputs: vec![Some(x)],
        outputs: vec![s],
    });
    g.add_node(Node {
        name: "gather".into(),
        op: Op::Gather { axis: 0 },
        inputs: vec![Some(s), Some(zero)],
        outputs: vec![s0],
    });
    g.add_node(Node {
        name: "unsq".into(),
        op: Op::Unsqueeze { axes: None },
        inputs: vec![Some(s0), Some(axes)],
        outputs: vec![s1],
    });
    g.add_node(Node {
        name: "concat".into(),
        op: Op::Concat { axis: 0 },
        inputs: vec![Some(s1), Some(heads)],
        outputs: vec![target],
    });
    g.add_node(Node {
        name: "reshape".into(),
        op: Op::Reshape { allowzero: false },
        inputs: vec![Some(x), Some(target)],
        outputs: vec![y],
    });
    g.outputs.push(y);
    g
}

#[test]
fn shape_subgraph_folds_to_constants() {
    let mut g = graph();
    let before = print_graph(&g);
    shape::bind_dims(&mut g, &HashMap::from([("seq".to_string(), 16)])).unwrap();
    // Shape is not constant until the input is bound and typed; after binding, Shape of a
    // static input is inferred, and the chain folds once its inputs are constants.
    shape::infer(&mut g).unwrap();
    verify(&g).unwrap();
    insta::assert_snapshot!(format!(
        "# before\n{before}\n# after binding seq=16 and inference\n{}",
        print_graph(&g)
    ));
}

#[test]
fn unbound_dim_is_an_error_naming_the_input() {
    let mut g = graph();
    let e = shape::bind_dims(&mut g, &HashMap::new()).unwrap_err();
    assert_eq!(
        e.to_string(),
        "input 'x' has dynamic dimension 'seq'; bind it with --dim seq=VALUE"
    );
}
