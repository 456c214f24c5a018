//! Inference-mode `BatchNormalization` with constant parameters becomes arithmetic the code
//! generator already has: folded into the convolution before it when that convolution has
//! constant weights and feeds only the normalization (`W' = W * s`, `b' = (b - mean) * s +
//! beta` with `s = gamma / sqrt(var + eps)` per output channel), and otherwise rewritten as a
//! per-channel `Mul` and `Add` with constants of shape `[C, 1, ..., 1]`.

use crate::{Pass, PassError, PassReport};
use kiln_compiler::ir::{
    BinaryOp, Constant, Graph, Node, NodeId, Op, ValueDef, ValueId, ValueType,
};
use kiln_compiler::Tensor;

pub struct FoldBatchNorm;

impl Pass for FoldBatchNorm {
    fn name(&self) -> &'static str {
        "fold-batchnorm"
    }

    fn run(&self, g: &mut Graph) -> Result<PassReport, PassError> {
        let mut report = PassReport::default();
        let ids: Vec<NodeId> = g.nodes.node_indices().collect();
        for id in ids {
            let n = &g.nodes[id];
            let Op::BatchNorm { epsilon } = n.op else {
                continue;
            };
            let Some((x, y)) = n.inputs.first().copied().flatten().zip(n.outputs.first()) else {
                continue;
            };
            let y = *y;
            let params: Option<Vec<Vec<f64>>> = (1..5)
                .map(|i| {
                    n.inputs
                        .get(i)
                        .copied()
                        .flatten()
                        .and_then(|v| g.constant(v))
                        .map(|c| c.to_tensor().to_f64_vec())
                })
                .collect();
            let Some(p) = params else {
                continue;
            };
            let (gamma, beta, mean, var) = (&p[0], &p[1], &p[2], &p[3]);
            let c = gamma.len();
            if [beta, mean, var].iter().any(|v| v.len() != c) {
                continue;
            }
            let scale: Vec<f64> = (0..c)
                .map(|i| gamma[i] / (var[i] + epsilon as f64).sqrt())
                .collect();
            let shift: Vec<f64> = (0..c).map(|i| beta[i] - mean[i] * scale[i]).collect();
            let name = n.name.clone();
            if let Some((conv, w_id)) = foldable_conv(g, x, c) {
                let Some(w) = g.constant(w_id).map(|c| c.to_tensor()) else {
                    continue;
                };
                let bias: Vec<f64> = match g.nodes[conv].inputs.get(2).copied().flatten() {
                    Some(b) => match g.constant(b) {
                        Some(b) => b.to_tensor().to_f64_vec(),
                        None => continue,
                    },
                    None => vec![0.0; c],
                };
                let per = w.numel() / c;
                let folded: Vec<f32> = w
                    .to_f64_vec()
                    .iter()
                    .enumerate()
                    .map(|(i, &v)| (v * scale[i / per]) as f32)
                    .collect();
                let new_b: Vec<f32> = (0..c)
                    .map(|i| (bias[i] * scale[i] + shift[i]) as f32)
                    .collect();
                let wname = g.fresh_name(&format!("{}.bn_folded", g.value(w_id).name));
                let bname = g.fresh_name(&format!("{name}.bias_folded"));
                let wv = g.add_constant(
                    wname,
                    Constant::from_tensor(&Tensor::from_vec(w.shape.clone(), folded)),
                );
                let bv = g.add_constant(
                    bname,
                    Constant::from_tensor(&Tensor::from_vec(vec![c], new_b)),
                );
                let conv_out = g.nodes[conv].outputs[0];
                let cn = &mut g.nodes[conv];
                cn.inputs.resize(3, None);
                cn.inputs[1] = Some(wv);
                cn.inputs[2] = Some(bv);
                g.remove_node(id);
                replace_output(g, y, conv_out);
                report
                    .notes
                    .push(format!("folded {name} into its convolution"));
            } else {
                let rank = g.value(x).ty.static_shape().map_or(4, |s| s.len());
                let mut shape = vec![1usize; rank.saturating_sub(1)];
                shape[0] = c;
                let to_t = |v: &[f64]| {
                    Tensor::from_vec(
                        shape.clone(),
                        v.iter().map(|&x| x as f32).collect::<Vec<f32>>(),
                    )
                };
                let sv = g.add_constant(
                    g.fresh_name(&format!("{name}.scale")),
                    Constant::from_tensor(&to_t(&scale)),
                );
                let hv = g.add_constant(
                    g.fresh_name(&format!("{name}.shift")),
                    Constant::from_tensor(&to_t(&shift)),
                );
                let ty: ValueType = g.value(y).ty.clone();
                let mid = g.add_value(
                    g.fresh_name(&format!("{name}.scaled")),
                    ty,
                    ValueDef::Undefined,
                );
                g.remove_node(id);
                g.add_node(Node {
                    name: g.fresh_name(&format!("{name}.mul")),
                    op: Op::Binary(BinaryOp::Mul),
                    inputs: vec![Some(x), Some(sv)],
                    outputs: vec![mid],
                });
                g.add_node(Node {
                    name: g.fresh_name(&format!("{name}.add")),
                    op: Op::Binary(BinaryOp::Add),
                    inputs: vec![Some(mid), Some(hv)],
                    outputs: vec![y],
                });
                report.notes.push(format!("rewrote {name} as Mul and Add"));
            }
            report.changed = true;
        }
        g.rebuild_edges();
        Ok(report)
    }
}

/// The convolution producing `x` when the normalization can fold into it: constant weights
/// with `c` output channels, and nothing else reading its output.
fn foldable_conv(g: &Graph, x: ValueId, c: usize) -> Option<(NodeId, ValueId)> {
    let ValueDef::Node(conv, 0) = g.value(x).def else {
        return None;
    };
    let n = &g.nodes[conv];
    if !matches!(n.op, Op::Conv(_)) || g.outputs.contains(&x) || g.consumers(x).len() != 1 {
        return None;
    }
    let w_id = n.inputs.get(1).copied().flatten()?;
    let w = g.constant(w_id)?;
    (w.dtype.is_float() && w.shape.first() == Some(&c)).then_some((conv, w_id))
}

/// Makes `new` (a node output) take the place of `old` (the removed normalization's output):
/// consumers read `new`; a graph output keeps its name by renaming.
fn replace_output(g: &mut Graph, old: ValueId, new: ValueId) {
    if let Some(pos) = g.outputs.iter().position(|&o| o == old) {
        let name = g.value(old).name.clone();
        g.value_mut(old).name = format!("{name}.removed");
        g.value_mut(new).name = name;
        g.outputs[pos] = new;
    }
    g.replace_uses(old, new);
}
