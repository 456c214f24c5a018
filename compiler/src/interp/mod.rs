//! The reference interpreter: executes a [`Graph`] on the host, node by node in topological
//! order, exactly per ONNX semantics (numpy broadcasting, attribute defaults, integer and float
//! paths). It is the oracle for conformance, constant folding, calibration and for checking
//! every compiled artifact, so kernels favour clarity over speed; only MatMul/Gemm use a
//! blocked GEMM and rayon, so that real LLMs run in seconds.
//!
//! Values are freed after their last use; constants are decoded from their (possibly
//! memory-mapped) bytes when first read.

mod elementwise;
pub mod linalg;
pub mod movement;
mod norm;
mod quant;
mod reduce;
mod resize;
pub mod util;

use crate::ir::{Dim, Graph, NodeId, Op, ValueDef, ValueId};
use crate::tensor::Tensor;
use std::collections::HashMap;
use thiserror::Error;

pub use util::KernelError;

#[derive(Debug, Error)]
pub enum InterpError {
    #[error("node '{node}' ({op}): {reason}")]
    Kernel {
        node: String,
        op: String,
        reason: String,
    },
    #[error("the model has {want} inputs, {got} were given")]
    InputCount { want: usize, got: usize },
    #[error("input '{name}': expected {want}, got {got}")]
    InputType {
        name: String,
        want: String,
        got: String,
    },
    #[error("input '{name}': dimension '{dim}' is {got} here but {bound} elsewhere")]
    DimConflict {
        name: String,
        dim: String,
        got: usize,
        bound: usize,
    },
    #[error("{0}")]
    Graph(String),
}

/// Checks runtime inputs against the graph's declared input types. Symbolic dims must agree
/// across inputs; returns the bindings found.
pub fn check_inputs(g: &Graph, inputs: &[Tensor]) -> Result<HashMap<String, usize>, InterpError> {
    if inputs.len() != g.inputs.len() {
        return Err(InterpError::InputCount {
            want: g.inputs.len(),
            got: inputs.len(),
        });
    }
    let mut bound: HashMap<String, usize> = HashMap::new();
    for (&vid, t) in g.inputs.iter().zip(inputs) {
        let v = g.value(vid);
        let want_str = crate::ir::printer::type_str(&v.ty);
        let got_str = format!("{}{:?}", t.dtype(), t.shape);
        let mismatch = || InterpError::InputType {
            name: v.name.clone(),
            want: want_str.clone(),
            got: got_str.clone(),
        };
        if let Some(dt) = v.ty.dtype {
            if dt != t.dtype() {
                return Err(mismatch());
            }
        }
        if let Some(dims) = &v.ty.shape {
            if dims.len() != t.rank() {
                return Err(mismatch());
            }
            for (d, &n) in dims.iter().zip(&t.shape) {
                match d {
                    Dim::Fixed(k) if *k != n => return Err(mismatch()),
                    Dim::Symbolic(s) => {
                        if let Some(&b) = bound.get(s) {
                            if b != n {
                                return Err(InterpError::DimConflict {
                                    name: v.name.clone(),
                                    dim: s.clone(),
                                    got: n,
                                    bound: b,
                                });
                            }
                        }
                        bound.insert(s.clone(), n);
                    }
                    _ => {}
                }
            }
        }
    }
    Ok(bound)
}

/// Runs the graph on `inputs` (graph input order) and returns the outputs in graph order.
pub fn run(g: &Graph, inputs: &[Tensor]) -> Result<Vec<Tensor>, InterpError> {
    run_observed(g, inputs, &mut |_, _| {})
}

/// [`run`], calling `observe` with every node and its input values just before the node
/// runs (calibration: activation statistics of the layers to quantize or prune).
pub fn run_observed(
    g: &Graph,
    inputs: &[Tensor],
    observe: &mut dyn FnMut(&crate::ir::Node, &[Option<&Tensor>]),
) -> Result<Vec<Tensor>, InterpError> {
    check_inputs(g, inputs)?;
    let order = g
        .topo_order()
        .map_err(|e| InterpError::Graph(format!("cycle through {}", e.nodes.join(", "))))?;
    let mut remaining = vec![0usize; g.values.len()];
    for &id in &order {
        for v in g.nodes[id].inputs.iter().flatten() {
            remaining[v.0 as usize] += 1;
        }
    }
    for o in &g.outputs {
        remaining[o.0 as usize] += 1;
    }
    let mut env: HashMap<ValueId, Tensor> = HashMap::new();
    for (i, &v) in g.inputs.iter().enumerate() {
        env.insert(v, inputs[i].clone());
    }
    for &id in &order {
        let outs = eval_node(g, id, &mut env, observe)?;
        let node = &g.nodes[id];
        for (k, t) in outs.into_iter().enumerate() {
            if let Some(&o) = node.outputs.get(k) {
                if remaining[o.0 as usize] > 0 {
                    env.insert(o, t);
                }
            }
        }
        for v in node.inputs.iter().flatten() {
            let r = &mut remaining[v.0 as usize];
            *r -= 1;
            if *r == 0 {
                env.remove(v);
            }
        }
    }
    g.outputs
        .iter()
        .map(|o| {
            if let Some(t) = env.get(o) {
                return Ok(t.clone());
            }
            match &g.value(*o).def {
                ValueDef::Const(c) => Ok(c.to_tensor()),
                _ => Err(InterpError::Graph(format!(
                    "output '{}' was not computed",
                    g.value(*o).name
                ))),
            }
        })
        .collect()
}

fn eval_node(
    g: &Graph,
    id: NodeId,
    env: &mut HashMap<ValueId, Tensor>,
    observe: &mut dyn FnMut(&crate::ir::Node, &[Option<&Tensor>]),
) -> Result<Vec<Tensor>, InterpError> {
    let node = &g.nodes[id];
    // Decode constants this node reads that are not decoded yet.
    for v in node.inputs.iter().flatten() {
        if !env.contains_key(v) {
            if let ValueDef::Const(c) = &g.value(*v).def {
                env.insert(*v, c.to_tensor());
            }
        }
    }
    let ins: Vec<Option<&Tensor>> = node
        .inputs
        .iter()
        .map(|i| i.and_then(|v| env.get(&v)))
        .collect();
    if let Some(pos) = node
        .inputs
        .iter()
        .zip(&ins)
        .position(|(i, t)| i.is_some() && t.is_none())
    {
        return Err(InterpError::Graph(format!(
            "node '{}' input {pos} ('{}') has no value",
            node.name,
            g.value(node.inputs[pos].expect("checked")).name
        )));
    }
    observe(node, &ins);
    eval_op(&node.op, &ins, node.outputs.len()).map_err(|e| InterpError::Kernel {
        node: node.name.clone(),
        op: node.op.onnx_name().to_string(),
        reason: e.0,
    })
}

/// Evaluates one op on host tensors. `n_outputs` is the number of outputs the node declares.
pub fn eval_op(
    op: &Op,
    ins: &[Option<&Tensor>],
    n_outputs: usize,
) -> Result<Vec<Tensor>, KernelError> {
    use Op::*;
    let one = |t: Tensor| Ok(vec![t]);
    match op {
        Unary(u) => one(elementwise::unary(u, util::input(ins, 0)?)?),
        Binary(b) => one(elementwise::binary(
            *b,
            util::input(ins, 0)?,
            util::input(ins, 1)?,
        )?),
        Variadic(v) => one(elementwise::variadic(*v, ins)?),
        Where => one(elementwise::where_(
            util::input(ins, 0)?,
            util::input(ins, 1)?,
            util::input(ins, 2)?,
        )?),
        Clip { min, max } => one(elementwise::clip(ins, *min, *max)?),
        Cast { to, saturate } => one(elementwise::cast(util::input(ins, 0)?, *to, *saturate)?),
        CastLike { saturate } => one(elementwise::cast(
            util::input(ins, 0)?,
            util::input(ins, 1)?.dtype(),
            *saturate,
        )?),
        Identity => one(util::input(ins, 0)?.clone()),
        Dropout => {
            let x = util::input(ins, 0)?;
            let mut out = vec![x.clone()];
            if n_outputs > 1 {
                out.push(Tensor::from_vec(x.shape.clone(), vec![true; x.numel()]));
            }
            Ok(out)
        }
        Reduce {
            kind,
            axes,
            keepdims,
            noop_with_empty_axes,
        } => one(reduce::reduce(
            *kind,
            ins,
            axes.as_deref(),
            *keepdims,
            *noop_with_empty_axes,
        )?),
        ArgReduce {
            max,
            axis,
            keepdims,
            select_last_index,
        } => one(reduce::arg_reduce(
            util::input(ins, 0)?,
            *max,
            *axis,
            *keepdims,
            *select_last_index,
        )?),
        Softmax {
            kind,
            axis,
            coerce_2d,
        } => one(reduce::softmax(
            util::input(ins, 0)?,
            *kind,
            *axis,
            *coerce_2d,
        )?),
        CumSum { exclusive, reverse } => one(reduce::cumsum(
            util::input(ins, 0)?,
            util::input(ins, 1)?,
            *exclusive,
            *reverse,
        )?),
        TopK {
            axis,
            largest,
            sorted,
            k,
        } => reduce::topk(ins, *axis, *largest, *sorted, *k),
        MatMul => one(linalg::matmul(util::input(ins, 0)?, util::input(ins, 1)?)?),
        Gemm {
            alpha,
            beta,
            trans_a,
            trans_b,
        } => one(linalg::gemm(ins, *alpha, *beta, *trans_a, *trans_b)?),
        MatMulInteger => one(linalg::matmul_integer(ins)?),
        MatMulNBits {
            k,
            n,
            bits,
            block_size,
            accuracy_level,
        } => one(quant::matmul_nbits(
            ins,
            *k,
            *n,
            *bits,
            *block_size,
            *accuracy_level,
        )?),
        Conv(a) => one(linalg::conv(ins, a)?),
        ConvTranspose {
            conv,
            output_padding,
            output_shape,
        } => one(linalg::conv_transpose(
            ins,
            conv,
            output_padding,
            output_shape,
        )?),
        Pool(p) => linalg::pool(util::input(ins, 0)?, p, n_outputs),
        GlobalPool(kind) => one(linalg::global_pool(util::input(ins, 0)?, *kind)?),
        BatchNorm { epsilon } => one(norm::batch_norm(ins, *epsilon)?),
        LayerNorm { axis, epsilon } => norm::layer_norm(ins, *axis, *epsilon, n_outputs),
        RmsNorm { axis, epsilon } => one(norm::rms_norm(ins, *axis, *epsilon)?),
        InstanceNorm { epsilon } => one(norm::instance_norm(ins, *epsilon)?),
        GroupNorm {
            epsilon,
            num_groups,
        } => one(norm::group_norm(ins, *epsilon, *num_groups)?),
        LpNorm { axis, p } => one(norm::lp_norm(util::input(ins, 0)?, *axis, *p)?),
        Reshape { allowzero } => one(movement::reshape(
            util::input(ins, 0)?,
            util::input(ins, 1)?,
            *allowzero,
        )?),
        Transpose { perm } => one(movement::transpose(util::input(ins, 0)?, perm.as_deref())?),
        Concat { axis } => one(movement::concat(ins, *axis)?),
        Split {
            axis,
            split,
            num_outputs,
        } => movement::split(ins, *axis, split.as_deref(), *num_outputs, n_outputs),
        Slice { attrs } => one(movement::slice(ins, attrs.as_ref())?),
        Gather { axis } => one(movement::gather(
            util::input(ins, 0)?,
            util::input(ins, 1)?,
            *axis,
        )?),
        GatherElements { axis } => one(movement::gather_elements(
            util::input(ins, 0)?,
            util::input(ins, 1)?,
            *axis,
        )?),
        GatherND { batch_dims } => one(movement::gather_nd(
            util::input(ins, 0)?,
            util::input(ins, 1)?,
            *batch_dims,
        )?),
        ScatterElements { axis, reduction } => {
            one(movement::scatter_elements(ins, *axis, *reduction)?)
        }
        ScatterND { reduction } => one(movement::scatter_nd(ins, *reduction)?),
        Expand => one(movement::expand(
            util::input(ins, 0)?,
            util::input(ins, 1)?,
        )?),
        Squeeze { axes } => one(movement::squeeze(ins, axes.as_deref())?),
        Unsqueeze { axes } => one(movement::unsqueeze(ins, axes.as_deref())?),
        Flatten { axis } => one(movement::flatten(util::input(ins, 0)?, *axis)?),
        Shape { start, end } => one(movement::shape(&util::input(ins, 0)?.shape, *start, *end)),
        Size => one(Tensor::scalar(util::input(ins, 0)?.numel() as i64)),
        ConstantOfShape { value } => one(movement::constant_of_shape(util::input(ins, 0)?, value)?),
        Range => one(movement::range(
            util::input(ins, 0)?,
            util::input(ins, 1)?,
            util::input(ins, 2)?,
        )?),
        Tile => one(movement::tile(util::input(ins, 0)?, util::input(ins, 1)?)?),
        Pad { mode, pads, value } => one(movement::pad(ins, *mode, pads.as_deref(), *value)?),
        Resize(a) => one(resize::resize(ins, a)?),
        DepthToSpace { blocksize, crd } => one(movement::depth_to_space(
            util::input(ins, 0)?,
            *blocksize,
            *crd,
        )?),
        SpaceToDepth { blocksize } => {
            one(movement::space_to_depth(util::input(ins, 0)?, *blocksize)?)
        }
        Trilu { upper } => one(movement::trilu(ins, *upper)?),
        OneHot { axis } => one(movement::one_hot(ins, *axis)?),
        NonZero => one(movement::non_zero(util::input(ins, 0)?)),
        EyeLike { dtype, k } => one(movement::eye_like(util::input(ins, 0)?, *dtype, *k)?),
        Compress { axis } => one(movement::compress(
            util::input(ins, 0)?,
            util::input(ins, 1)?,
            *axis,
        )?),
        ReverseSequence {
            batch_axis,
            time_axis,
        } => one(movement::reverse_sequence(
            util::input(ins, 0)?,
            util::input(ins, 1)?,
            *batch_axis,
            *time_axis,
        )?),
        DequantizeLinear { axis, block_size } => {
            one(quant::dequantize_linear(ins, *axis, *block_size)?)
        }
        QuantizeLinear {
            axis,
            block_size,
            saturate,
            output_dtype,
        } => one(quant::quantize_linear(
            ins,
            *axis,
            *block_size,
            *saturate,
            *output_dtype,
        )?),
        DynamicQuantizeLinear => quant::dynamic_quantize_linear(util::input(ins, 0)?),
    }
}
