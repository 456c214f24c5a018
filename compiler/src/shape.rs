//! Static shape inference. Binds symbolic input dims (`--dim NAME=VALUE`), then walks the
//! graph in topological order: a node whose inputs are all constants is folded exactly by the
//! reference interpreter (this is how shape subgraphs such as Shape->Gather->Concat->Reshape
//! become constants); any other node is evaluated on zero-filled stand-ins of its input shapes,
//! with its constant inputs (shapes, axes, pads, ...) passed as their real values, so every
//! output shape follows the interpreter's own ONNX rules. Ops whose output shape depends on
//! non-constant data (NonZero, Compress, a TopK k computed at run time, ...) are reported.

use crate::interp;
use crate::ir::{Constant, Dim, Graph, Op, ValueDef, ValueId, ValueType};
use crate::tensor::Tensor;
use std::collections::HashMap;
use thiserror::Error;

#[derive(Debug, Error, PartialEq)]
pub enum ShapeError {
    #[error("input '{input}' has dynamic dimension '{dim}'; bind it with --dim {dim}=VALUE")]
    UnboundDim { input: String, dim: String },
    #[error(
        "input '{input}' has a dimension of unknown size (axis {axis}); the model must declare it"
    )]
    UnknownDim { input: String, axis: usize },
    #[error("input '{0}' has no declared element type or shape")]
    Untyped(String),
    #[error("--dim {0}: no input of the model has this dimension")]
    UnusedBinding(String),
    #[error("node '{node}' ({op}): {reason}")]
    Node {
        node: String,
        op: String,
        reason: String,
    },
}

/// Stand-ins above this many elements are not materialised; such nodes must be covered by a
/// direct shape rule below.
const MAX_STANDIN_ELEMENTS: usize = 1 << 24;

/// Binds the symbolic dims of the graph inputs. Every dim must end up fixed.
pub fn bind_dims(g: &mut Graph, bindings: &HashMap<String, usize>) -> Result<(), ShapeError> {
    let mut used = std::collections::HashSet::new();
    for &i in &g.inputs.clone() {
        let v = g.value_mut(i);
        let name = v.name.clone();
        let Some(dims) = v.ty.shape.as_mut() else {
            return Err(ShapeError::Untyped(name));
        };
        if v.ty.dtype.is_none() {
            return Err(ShapeError::Untyped(name));
        }
        for (axis, d) in dims.iter_mut().enumerate() {
            match d {
                Dim::Fixed(_) => {}
                Dim::Symbolic(s) => match bindings.get(s.as_str()) {
                    Some(&n) => {
                        used.insert(s.clone());
                        *d = Dim::Fixed(n);
                    }
                    None => {
                        return Err(ShapeError::UnboundDim {
                            input: name,
                            dim: s.clone(),
                        })
                    }
                },
                Dim::Unknown => return Err(ShapeError::UnknownDim { input: name, axis }),
            }
        }
    }
    for k in bindings.keys() {
        if !used.contains(k) {
            return Err(ShapeError::UnusedBinding(k.clone()));
        }
    }
    Ok(())
}

/// Fills in the static type of every value, folding constant subgraphs into constants.
/// Inputs must be bound first ([`bind_dims`]).
pub fn infer(g: &mut Graph) -> Result<(), ShapeError> {
    let order = g.topo_order().map_err(|e| ShapeError::Node {
        node: e.nodes.join(", "),
        op: "?".into(),
        reason: "the graph has a cycle".into(),
    })?;
    for id in order {
        let node = g.nodes[id].clone();
        let fail = |reason: String| ShapeError::Node {
            node: node.name.clone(),
            op: node.op.onnx_name().into(),
            reason,
        };
        let types = input_types(g, &node.inputs);
        // CastLike reads only the type of its second input: with a constant first input it
        // folds like Cast.
        let cast_like_to = match node.op {
            Op::CastLike { .. } => types.get(1).and_then(|t| t.as_ref()).and_then(|t| t.dtype),
            _ => None,
        };
        let cast_like_src = node
            .inputs
            .first()
            .copied()
            .flatten()
            .and_then(|v| g.constant(v));
        if let (Some(to), Some(src)) = (cast_like_to, cast_like_src) {
            let src = src.to_tensor();
            let t = interp::eval_op(&Op::Cast { to, saturate: true }, &[Some(&src)], 1)
                .map_err(|e| fail(e.0))?
                .remove(0);
            g.remove_node(id);
            let v = g.value_mut(node.outputs[0]);
            v.ty = ValueType::fixed(t.dtype(), &t.shape);
            v.def = ValueDef::Const(Constant::from_tensor(&t));
            continue;
        }
        let all_const = node
            .inputs
            .iter()
            .flatten()
            .all(|&v| g.constant(v).is_some());
        if all_const {
            // Constant folding: exact values from the interpreter; the node goes away.
            let consts: Vec<Option<Tensor>> = node
                .inputs
                .iter()
                .map(|i| i.and_then(|v| g.constant(v)).map(|c| c.to_tensor()))
                .collect();
            let refs: Vec<Option<&Tensor>> = consts.iter().map(|t| t.as_ref()).collect();
            let outs =
                interp::eval_op(&node.op, &refs, node.outputs.len()).map_err(|e| fail(e.0))?;
            g.remove_node(id);
            for (k, &o) in node.outputs.iter().enumerate() {
                if let Some(t) = outs.get(k) {
                    let v = g.value_mut(o);
                    v.ty = ValueType::fixed(t.dtype(), &t.shape);
                    v.def = ValueDef::Const(Constant::from_tensor(t));
                }
            }
            continue;
        }
        // Shape and Size of a statically shaped value are constants: fold them too, so that
        // the shape arithmetic of exported models becomes constant.
        let static_in = node
            .inputs
            .first()
            .copied()
            .flatten()
            .and_then(|v| g.value(v).ty.static_shape());
        let shape_const = match (&node.op, &static_in) {
            (Op::Shape { start, end }, Some(dims)) => {
                Some(interp::movement::shape(dims, *start, *end))
            }
            (Op::Size, Some(dims)) => Some(Tensor::scalar(dims.iter().product::<usize>() as i64)),
            _ => None,
        };
        if let Some(t) = shape_const {
            g.remove_node(id);
            let v = g.value_mut(node.outputs[0]);
            v.ty = ValueType::fixed(t.dtype(), &t.shape);
            v.def = ValueDef::Const(Constant::from_tensor(&t));
            continue;
        }
        if data_dependent(&node.op) {
            return Err(fail(
                "its output shape depends on input values that are only known at run time".into(),
            ));
        }
        if let Some(out_types) = direct_rule(&node.op, &types) {
            for (&o, t) in node.outputs.iter().zip(out_types) {
                g.value_mut(o).ty = t;
            }
            continue;
        }
        let mut stand_ins: Vec<Option<Tensor>> = Vec::with_capacity(node.inputs.len());
        for inp in &node.inputs {
            let Some(v) = inp else {
                stand_ins.push(None);
                continue;
            };
            if let Some(c) = g.constant(*v) {
                stand_ins.push(Some(c.to_tensor()));
                continue;
            }
            let val = g.value(*v);
            let dtype = val
                .ty
                .dtype
                .ok_or_else(|| fail(format!("input '{}' has no known type", val.name)))?;
            let shape = val
                .ty
                .static_shape()
                .ok_or_else(|| fail(format!("input '{}' has no static shape", val.name)))?;
            let n: usize = shape.iter().product();
            if n > MAX_STANDIN_ELEMENTS {
                return Err(fail(format!("no shape rule for an input of {n} elements")));
            }
            stand_ins.push(Some(Tensor::zeros(dtype, shape)));
        }
        let refs: Vec<Option<&Tensor>> = stand_ins.iter().map(|t| t.as_ref()).collect();
        let outs = interp::eval_op(&node.op, &refs, node.outputs.len()).map_err(|e| fail(e.0))?;
        for (&o, t) in node.outputs.iter().zip(&outs) {
            g.value_mut(o).ty = ValueType::fixed(t.dtype(), &t.shape);
        }
    }
    g.rebuild_edges();
    Ok(())
}

fn input_types(g: &Graph, inputs: &[Option<ValueId>]) -> Vec<Option<ValueType>> {
    inputs
        .iter()
        .map(|i| i.map(|v| g.value(v).ty.clone()))
        .collect()
}

fn data_dependent(op: &Op) -> bool {
    matches!(op, Op::NonZero | Op::Compress { .. })
}

/// Shape rules for the ops whose stand-in evaluation would be expensive (large matrix
/// products and elementwise ops on big activations).
fn direct_rule(op: &Op, ins: &[Option<ValueType>]) -> Option<Vec<ValueType>> {
    let shape = |i: usize| ins.get(i)?.as_ref()?.static_shape();
    let dtype = |i: usize| ins.get(i)?.as_ref()?.dtype;
    match op {
        Op::MatMul => {
            let (a, b) = (shape(0)?, shape(1)?);
            if a.len() < 2 || b.len() < 2 {
                return None;
            }
            let batch =
                interp::util::broadcast_shapes(&[&a[..a.len() - 2], &b[..b.len() - 2]]).ok()?;
            if a[a.len() - 1] != b[b.len() - 2] {
                return None;
            }
            let mut out = batch;
            out.push(a[a.len() - 2]);
            out.push(b[b.len() - 1]);
            Some(vec![ValueType::fixed(dtype(0)?, &out)])
        }
        Op::Unary(crate::ir::UnaryOp::IsNaN | crate::ir::UnaryOp::IsInf { .. }) => {
            Some(vec![ValueType::fixed(
                crate::dtype::DType::Bool,
                &shape(0)?,
            )])
        }
        Op::Unary(_) | Op::Identity => Some(vec![ValueType::fixed(dtype(0)?, &shape(0)?)]),
        Op::Binary(b) => {
            let out = interp::util::broadcast_shapes(&[&shape(0)?, &shape(1)?]).ok()?;
            let dt = if b.is_predicate() {
                crate::dtype::DType::Bool
            } else {
                dtype(0)?
            };
            Some(vec![ValueType::fixed(dt, &out)])
        }
        Op::Softmax { .. } => Some(vec![ValueType::fixed(dtype(0)?, &shape(0)?)]),
        _ => None,
    }
}
