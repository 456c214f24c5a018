//! Weight-only quantization. Two passes share one view of which layers are left in floating
//! point ([`find_exclusions`]):
//!
//! * [`ExcludeLayers`] keeps the excluded weights in f16: embedding tables (a `Gather` on a
//!   constant) and the LM head (the last matrix product before a graph output, including a
//!   tied head whose weight is the embedding table transposed) are detected automatically;
//!   name globs add or remove exclusions. A tied table is stored once, transposed, and read by
//!   both the head and the (axis-1) gather.
//! * [`QuantizeWeights`] turns every other `MatMul`/`Gemm` with a constant f32 weight into a
//!   com.microsoft `MatMulNBits` node: INT4 or INT8, group-wise along the reduction axis,
//!   asymmetric with zero points or symmetric, f16 scales, with per-layer precision
//!   overrides by glob. The rounding is [`rtn`] (round to nearest), optionally after AWQ's
//!   per-input-channel scaling ([`awq`]), whose scales the caller computes from calibration
//!   data and hands over by node name.
//!
//! Both passes report what they did per layer; the quantizer also reports each weight's
//! relative quantization error.

pub mod awq;
pub mod rtn;

use crate::{Pass, PassError, PassReport};
use half::f16;
use kiln_compiler::dtype::DType;
use kiln_compiler::ir::{Constant, Graph, Node, NodeId, Op, ValueDef, ValueId, ValueType};
use kiln_compiler::Tensor;
use std::collections::{BTreeMap, HashMap};

/// A name glob (`*` any run of characters, `?` one character) over node and weight names.
#[derive(Clone, Debug, PartialEq)]
pub struct Glob(glob::Pattern);

impl Glob {
    pub fn new(pattern: &str) -> Result<Glob, String> {
        glob::Pattern::new(pattern)
            .map(Glob)
            .map_err(|e| format!("bad glob '{pattern}': {e}"))
    }

    pub fn as_str(&self) -> &str {
        self.0.as_str()
    }

    pub fn matches(&self, name: &str) -> bool {
        self.0.matches_with(
            name,
            glob::MatchOptions {
                case_sensitive: true,
                require_literal_separator: false,
                require_literal_leading_dot: false,
            },
        )
    }
}

/// Storage precision of one layer's weight.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Precision {
    F32,
    F16,
    Int8,
    Int4,
}

impl Precision {
    pub fn parse(s: &str) -> Option<Precision> {
        Some(match s {
            "f32" | "fp32" => Precision::F32,
            "f16" | "fp16" => Precision::F16,
            "q8" | "int8" => Precision::Int8,
            "q4" | "int4" => Precision::Int4,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::F16 => "f16",
            Precision::Int8 => "int8",
            Precision::Int4 => "int4",
        }
    }
}

/// Which layers stay in floating point.
#[derive(Clone, Debug, PartialEq)]
pub struct ExclusionOptions {
    /// Detect embeddings and the LM head.
    pub auto: bool,
    /// Extra exclusions: node or weight name globs.
    pub exclude: Vec<Glob>,
    /// Layers quantized even though detected or excluded: node or weight name globs.
    pub include: Vec<Glob>,
    /// Precision of excluded weights (f16 or f32).
    pub precision: Precision,
}

impl Default for ExclusionOptions {
    fn default() -> Self {
        ExclusionOptions {
            auto: true,
            exclude: Vec::new(),
            include: Vec::new(),
            precision: Precision::F16,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExclusionKind {
    Embedding,
    LmHead,
    /// An LM head sharing the embedding table (its weight is the table transposed).
    TiedLmHead,
    /// Matched an `exclude` glob.
    Config(String),
}

/// A layer kept in floating point, and why.
#[derive(Clone, Debug, PartialEq)]
pub struct Exclusion {
    pub node: String,
    pub weight: String,
    pub kind: ExclusionKind,
}

impl Exclusion {
    pub fn reason(&self) -> String {
        match &self.kind {
            ExclusionKind::Embedding => "embedding table (Gather on a weight)".into(),
            ExclusionKind::LmHead => "LM head (last matrix product before an output)".into(),
            ExclusionKind::TiedLmHead => {
                "tied LM head (the embedding table, transposed, before an output)".into()
            }
            ExclusionKind::Config(g) => format!("excluded by glob '{g}'"),
        }
    }
}

/// The weight input of a matrix product: `(input position, weight)` for MatMul (B) and Gemm
/// (B, with a flag for `trans_b`).
fn product_weight(g: &Graph, n: &Node) -> Option<(ValueId, bool)> {
    let w = n.inputs.get(1).copied().flatten()?;
    match n.op {
        Op::MatMul => Some((w, false)),
        Op::Gemm {
            trans_a: false,
            trans_b,
            ..
        } => Some((w, trans_b)),
        _ => None,
    }
    .filter(|(w, _)| {
        g.constant(*w)
            .is_some_and(|c| c.dtype == DType::F32 && c.shape.len() == 2)
    })
}

/// Embedding gathers: axis-0 `Gather` on a constant 2-D f32 table.
fn embeddings(g: &Graph) -> Vec<NodeId> {
    g.nodes
        .node_indices()
        .filter(|&id| {
            let n = &g.nodes[id];
            matches!(n.op, Op::Gather { axis: 0 })
                && n.inputs.first().copied().flatten().is_some_and(|t| {
                    g.constant(t)
                        .is_some_and(|c| c.dtype == DType::F32 && c.shape.len() == 2)
                })
        })
        .collect()
}

/// Matrix products that produce a graph output through view-like ops and bias additions.
fn lm_heads(g: &Graph) -> Vec<NodeId> {
    let mut heads = Vec::new();
    for &out in &g.outputs {
        let mut v = out;
        for _ in 0..16 {
            let ValueDef::Node(id, _) = g.value(v).def else {
                break;
            };
            let n = &g.nodes[id];
            if product_weight(g, n).is_some() {
                if !heads.contains(&id) {
                    heads.push(id);
                }
                break;
            }
            let through = match n.op {
                Op::Reshape { .. }
                | Op::Squeeze { .. }
                | Op::Unsqueeze { .. }
                | Op::Flatten { .. }
                | Op::Identity
                | Op::Cast { .. } => n.inputs.first().copied().flatten(),
                Op::Binary(kiln_compiler::ir::BinaryOp::Add) => {
                    // A bias: one operand constant, follow the other.
                    let (a, b) = (n.inputs[0], n.inputs.get(1).copied().flatten());
                    match (a, b) {
                        (Some(a), Some(b)) if g.constant(b).is_some() => Some(a),
                        (Some(a), Some(b)) if g.constant(a).is_some() => Some(b),
                        _ => None,
                    }
                }
                _ => None,
            };
            match through {
                Some(next) => v = next,
                None => break,
            }
        }
    }
    heads
}

/// Whether a product weight `w` (read as B, or as B^T with `trans_b`) is the embedding
/// `table` ([N, K]): the tied LM head.
fn ties_to(w: &Constant, trans_b: bool, table: &Constant) -> bool {
    if trans_b {
        w.shape == table.shape && w.bytes == table.bytes
    } else {
        is_transpose_of(w, table)
    }
}

/// Whether `w` ([K, N]) is the transpose of `table` ([N, K]).
fn is_transpose_of(w: &Constant, table: &Constant) -> bool {
    if w.shape.len() != 2 || table.shape.len() != 2 || w.shape[0] != table.shape[1] {
        return false;
    }
    if w.shape[1] != table.shape[0] || w.dtype != table.dtype || w.dtype != DType::F32 {
        return false;
    }
    let (k, n) = (w.shape[0], w.shape[1]);
    fn at(b: &[u8], i: usize) -> &[u8] {
        &b[i * 4..i * 4 + 4]
    }
    (0..k).all(|r| (0..n).all(|c| at(&w.bytes, r * n + c) == at(&table.bytes, c * k + r)))
}

fn matches_any(globs: &[Glob], names: &[&str]) -> Option<String> {
    globs
        .iter()
        .find(|g| names.iter().any(|n| g.matches(n)))
        .map(|g| g.as_str().to_string())
}

/// The layers kept in floating point, in node order.
pub fn find_exclusions(g: &Graph, o: &ExclusionOptions) -> Vec<Exclusion> {
    let mut out: BTreeMap<NodeId, Exclusion> = BTreeMap::new();
    let weight_name = |v: Option<ValueId>| v.map(|v| g.value(v).name.clone()).unwrap_or_default();
    if o.auto {
        let embeds = embeddings(g);
        for &id in &embeds {
            let n = &g.nodes[id];
            out.insert(
                id,
                Exclusion {
                    node: n.name.clone(),
                    weight: weight_name(n.inputs[0]),
                    kind: ExclusionKind::Embedding,
                },
            );
        }
        for id in lm_heads(g) {
            let n = &g.nodes[id];
            let Some((w, trans_b)) = product_weight(g, n) else {
                continue;
            };
            let wc = g.constant(w).expect("product weight is constant");
            let tied = embeds.iter().any(|&e| {
                let table = g.nodes[e].inputs[0].and_then(|t| g.constant(t));
                table.is_some_and(|t| ties_to(wc, trans_b, t))
            });
            out.insert(
                id,
                Exclusion {
                    node: n.name.clone(),
                    weight: g.value(w).name.clone(),
                    kind: if tied {
                        ExclusionKind::TiedLmHead
                    } else {
                        ExclusionKind::LmHead
                    },
                },
            );
        }
    }
    if !o.exclude.is_empty() {
        for id in g.nodes.node_indices() {
            let n = &g.nodes[id];
            let Some((w, _)) = product_weight(g, n) else {
                continue;
            };
            if out.contains_key(&id) {
                continue;
            }
            if let Some(glob) = matches_any(&o.exclude, &[&n.name, &g.value(w).name]) {
                out.insert(
                    id,
                    Exclusion {
                        node: n.name.clone(),
                        weight: g.value(w).name.clone(),
                        kind: ExclusionKind::Config(glob),
                    },
                );
            }
        }
    }
    out.into_values()
        .filter(|e| matches_any(&o.include, &[&e.node, &e.weight]).is_none())
        .collect()
}

// ---- graph editing helpers

fn f16_constant(values: impl Iterator<Item = f32>, shape: Vec<usize>) -> (Constant, usize) {
    let mut saturated = 0;
    let data: Vec<f16> = values
        .map(|x| {
            let h = f16::from_f32(x);
            if h.is_infinite() && x.is_finite() {
                saturated += 1;
                if x > 0.0 {
                    f16::MAX
                } else {
                    f16::MIN
                }
            } else {
                h
            }
        })
        .collect();
    (
        Constant::from_tensor(&Tensor::from_vec(shape, data)),
        saturated,
    )
}

/// The weight of a matrix product as MatMulNBits stores it, column by column (column `j`'s K
/// weights contiguous): `(columns, K, N)`. `None` when the product has no constant 2-D f32
/// weight.
pub fn weight_columns(g: &Graph, n: &Node) -> Option<(Vec<f32>, usize, usize)> {
    let (w, trans_b) = product_weight(g, n)?;
    let c = g.constant(w)?;
    let vals = f32_values(c);
    if trans_b {
        // B^T is stored [N, K]: already column by column.
        return Some((vals, c.shape[1], c.shape[0]));
    }
    let (k, nn) = (c.shape[0], c.shape[1]);
    let mut cols = vec![0f32; k * nn];
    for r in 0..k {
        for j in 0..nn {
            cols[j * k + r] = vals[r * nn + j];
        }
    }
    Some((cols, k, nn))
}

fn f32_values(c: &Constant) -> Vec<f32> {
    c.bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

/// Adds the node `out = Cast<f32>(src)`, named `{name}_widen`.
fn add_cast_to_f32(g: &mut Graph, name: &str, src: ValueId, out: ValueId) {
    g.add_node(Node {
        name: format!("{name}_widen"),
        op: Op::Cast {
            to: DType::F32,
            saturate: true,
        },
        inputs: vec![Some(src)],
        outputs: vec![out],
    });
}

/// Adds `Cast<f32>(src)` into a new value and returns it.
fn add_widen(g: &mut Graph, name: &str, src: ValueId, shape: &[usize]) -> ValueId {
    let out = g.add_value(
        format!("{name}_f32"),
        ValueType::fixed(DType::F32, shape),
        ValueDef::Undefined,
    );
    add_cast_to_f32(g, name, src, out);
    out
}

/// Points input `i` of node `id` at `v` and rebuilds the edges.
fn set_input(g: &mut Graph, id: NodeId, i: usize, v: ValueId) {
    g.nodes[id].inputs[i] = Some(v);
    g.rebuild_edges();
}

/// Keeps the excluded layers' weights in f16 (see the module doc).
#[derive(Clone, Debug, Default)]
pub struct ExcludeLayers {
    pub options: ExclusionOptions,
}

impl Pass for ExcludeLayers {
    fn name(&self) -> &'static str {
        "exclude-layers"
    }

    fn run(&self, g: &mut Graph) -> Result<PassReport, PassError> {
        let exclusions = find_exclusions(g, &self.options);
        let mut report = PassReport::default();
        let ids: HashMap<String, NodeId> = g
            .nodes
            .node_indices()
            .map(|id| (g.nodes[id].name.clone(), id))
            .collect();
        // Tied heads first: their table is stored once, transposed, for head and gather.
        let tied: Vec<&Exclusion> = exclusions
            .iter()
            .filter(|e| e.kind == ExclusionKind::TiedLmHead)
            .collect();
        let mut gathers_done: Vec<NodeId> = Vec::new();
        // Embeddings first, so that a tied head is handled with its table.
        let mut ordered: Vec<&Exclusion> = exclusions.iter().collect();
        ordered.sort_by_key(|e| e.kind != ExclusionKind::Embedding);
        for e in ordered {
            let id = ids[&e.node];
            let why = e.reason();
            if self.options.precision == Precision::F32 {
                report
                    .notes
                    .push(format!("kept {} ({}) in f32: {why}", e.node, e.weight));
                continue;
            }
            match e.kind {
                ExclusionKind::Embedding if gathers_done.contains(&id) => continue,
                ExclusionKind::Embedding => {
                    let table = g.nodes[id].inputs[0].expect("embedding has a table");
                    let c = g.constant(table).expect("table is constant").clone();
                    // A tied head reads the same table: share one transposed f16 copy.
                    let head = tied.iter().find(|t| {
                        let h = ids[&t.node];
                        product_weight(g, &g.nodes[h]).is_some_and(|(w, trans_b)| {
                            ties_to(g.constant(w).expect("constant"), trans_b, &c)
                        })
                    });
                    let (rows, cols) = (c.shape[0], c.shape[1]);
                    let vals = f32_values(&c);
                    let gather_out = g.nodes[id].outputs[0];
                    let ids_v = g.nodes[id].inputs[1].expect("gather has indices");
                    let out_shape =
                        g.value(gather_out)
                            .ty
                            .static_shape()
                            .ok_or_else(|| PassError::Failed {
                                pass: "exclude-layers",
                                reason: format!("{} has no static shape", e.node),
                            })?;
                    let name = g.nodes[id].name.clone();
                    match head {
                        Some(h) if !transposed_head(g, ids[&h.node]) => {
                            let hid = ids[&h.node];
                            let (tc, sat) = f16_constant(
                                (0..cols)
                                    .flat_map(|k| (0..rows).map(move |n| (k, n)))
                                    .map(|(k, n)| vals[n * cols + k]),
                                vec![cols, rows],
                            );
                            let t16 = g.add_constant(format!("{}.f16.T", e.weight), tc);
                            // Head: B = Cast(table^T).
                            let wide =
                                add_widen(g, &format!("{}.f16.T", e.weight), t16, &[cols, rows]);
                            set_input(g, hid, 1, wide);
                            // Gather along axis 1 of the transposed table, then move the
                            // gathered axis last.
                            let ids_shape = g.value(ids_v).ty.static_shape().unwrap_or_default();
                            let r = ids_shape.len();
                            let mut gshape = vec![cols];
                            gshape.extend(&ids_shape);
                            let gathered = g.add_value(
                                format!("{name}_f16_cols"),
                                ValueType::fixed(DType::F16, &gshape),
                                ValueDef::Undefined,
                            );
                            let moved = g.add_value(
                                format!("{name}_f16"),
                                ValueType::fixed(DType::F16, &out_shape),
                                ValueDef::Undefined,
                            );
                            g.remove_node(id);
                            g.add_node(Node {
                                name: name.clone(),
                                op: Op::Gather { axis: 1 },
                                inputs: vec![Some(t16), Some(ids_v)],
                                outputs: vec![gathered],
                            });
                            let perm: Vec<i64> = (1..=r as i64).chain([0]).collect();
                            g.add_node(Node {
                                name: format!("{name}_rows"),
                                op: Op::Transpose { perm: Some(perm) },
                                inputs: vec![Some(gathered)],
                                outputs: vec![moved],
                            });
                            add_cast_to_f32(g, &name, moved, gather_out);
                            report.notes.push(format!(
                                "kept {} ({}) in f16: {why}; shared transposed with {} ({})",
                                e.node,
                                e.weight,
                                h.node,
                                h.reason()
                            ));
                            note_saturation(&mut report, &e.weight, sat);
                        }
                        _ => {
                            let (tc, sat) = f16_constant(vals.into_iter(), vec![rows, cols]);
                            let t16 = g.add_constant(format!("{}.f16", e.weight), tc);
                            let half_out = g.add_value(
                                format!("{name}_f16"),
                                ValueType::fixed(DType::F16, &out_shape),
                                ValueDef::Undefined,
                            );
                            g.remove_node(id);
                            g.add_node(Node {
                                name: name.clone(),
                                op: Op::Gather { axis: 0 },
                                inputs: vec![Some(t16), Some(ids_v)],
                                outputs: vec![half_out],
                            });
                            add_cast_to_f32(g, &name, half_out, gather_out);
                            report
                                .notes
                                .push(format!("kept {} ({}) in f16: {why}", e.node, e.weight));
                            note_saturation(&mut report, &e.weight, sat);
                        }
                    }
                    gathers_done.push(id);
                    report.changed = true;
                }
                _ => {
                    // A product: B = Cast(f16(B)), unless a tied embedding already did it.
                    let Some((w, _)) = product_weight(g, &g.nodes[id]) else {
                        continue;
                    };
                    let c = g.constant(w).expect("constant").clone();
                    let (hc, sat) = f16_constant(f32_values(&c).into_iter(), c.shape.clone());
                    let wname = g.value(w).name.clone();
                    let h = g.add_constant(format!("{wname}.f16"), hc);
                    let wide = add_widen(g, &format!("{wname}.f16"), h, &c.shape);
                    set_input(g, id, 1, wide);
                    report
                        .notes
                        .push(format!("kept {} ({}) in f16: {why}", e.node, e.weight));
                    note_saturation(&mut report, &wname, sat);
                    report.changed = true;
                }
            }
        }
        // Replaced nodes lost their edges to consumers: recompute them.
        g.rebuild_edges();
        Ok(report)
    }
}

/// Whether a head's weight was already replaced (its B is no longer a constant).
fn transposed_head(g: &Graph, id: NodeId) -> bool {
    product_weight(g, &g.nodes[id]).is_none()
}

fn note_saturation(report: &mut PassReport, weight: &str, saturated: usize) {
    if saturated > 0 {
        report.notes.push(format!(
            "warning: {saturated} values of {weight} exceed the f16 range and were clamped to ±65504"
        ));
    }
}

/// Settings of [`QuantizeWeights`].
#[derive(Clone, Debug, PartialEq)]
pub struct QuantizeOptions {
    /// Precision of the layers no override names: Int4 or Int8.
    pub precision: Precision,
    /// Weights per group along the reduction axis (a power of two, at least 16). A K that
    /// it does not divide ends with a shorter group, padded as MatMulNBits lays it out.
    pub group_size: usize,
    pub symmetric: bool,
    pub exclusions: ExclusionOptions,
    /// Per-layer precision by node or weight name glob; the first match wins.
    pub overrides: Vec<(Glob, Precision)>,
    /// AWQ input-channel scales by node name (from calibration); empty for plain RTN.
    pub awq_scales: HashMap<String, Vec<f32>>,
    /// Calibration inputs of each product by node name (see `awq::collect_activations`),
    /// for the per-layer output error; empty without calibration data.
    pub calibration: HashMap<String, awq::LayerActivations>,
    /// Mark the quantized products to compute with int8 activations (MatMulNBits accuracy
    /// level 4, see `kiln_compiler::ir::int8_activations`); 4-bit layers whose K is not a
    /// whole number of groups keep f32 activations.
    pub int8_activations: bool,
}

impl Default for QuantizeOptions {
    fn default() -> Self {
        QuantizeOptions {
            precision: Precision::Int4,
            group_size: 128,
            symmetric: false,
            exclusions: ExclusionOptions::default(),
            overrides: Vec::new(),
            awq_scales: HashMap::new(),
            calibration: HashMap::new(),
            int8_activations: false,
        }
    }
}

/// What the quantizer did to one layer.
#[derive(Clone, Debug, PartialEq)]
pub struct LayerQuantization {
    pub node: String,
    pub weight: String,
    pub precision: Precision,
    pub k: usize,
    pub n: usize,
    /// ||W - dequant(Q(W))|| / ||W|| (Frobenius).
    pub relative_error: f64,
    /// ||X·W' - X·W|| / ||X·W|| on the layer's calibration inputs X, with W' the effective
    /// quantized weight; `None` without calibration data.
    pub output_error: Option<f64>,
}

/// The matrix products a [`QuantizeWeights`] run would quantize, with their precision.
pub fn plan_quantization(
    g: &Graph,
    o: &QuantizeOptions,
) -> Result<Vec<(NodeId, Precision)>, String> {
    let excluded: Vec<String> = find_exclusions(g, &o.exclusions)
        .into_iter()
        .map(|e| e.node)
        .collect();
    let order = g
        .topo_order()
        .map_err(|e| format!("cycle through {:?}", e.nodes))?;
    let mut plan = Vec::new();
    for id in order {
        let n = &g.nodes[id];
        let Some((w, trans_b)) = product_weight(g, n) else {
            continue;
        };
        let wname = &g.value(w).name;
        let forced = o
            .overrides
            .iter()
            .find(|(glob, _)| glob.matches(&n.name) || glob.matches(wname))
            .map(|(_, p)| *p);
        let precision = match forced {
            Some(p) => p,
            None if excluded.contains(&n.name) => continue,
            None => o.precision,
        };
        if !matches!(precision, Precision::Int4 | Precision::Int8) {
            continue;
        }
        if let Op::Gemm { alpha, beta, .. } = n.op {
            if alpha != 1.0 || (beta != 1.0 && n.inputs.get(2).copied().flatten().is_some()) {
                continue;
            }
        }
        let shape = &g.constant(w).expect("constant").shape;
        let k = if trans_b { shape[1] } else { shape[0] };
        if !k.is_multiple_of(2) {
            return Err(format!(
                "{} ({wname}) has an odd reduction size K={k}, which packed 4-bit weights cannot hold; exclude the layer",
                n.name
            ));
        }
        plan.push((id, precision));
    }
    Ok(plan)
}

/// Quantizes matrix-product weights into MatMulNBits nodes (see the module doc).
#[derive(Clone, Debug, Default)]
pub struct QuantizeWeights {
    pub options: QuantizeOptions,
}

impl QuantizeWeights {
    /// Runs the pass and returns the per-layer details as well as the report.
    pub fn quantize(
        &self,
        g: &mut Graph,
    ) -> Result<(PassReport, Vec<LayerQuantization>), PassError> {
        let o = &self.options;
        let fail = |reason: String| PassError::Failed {
            pass: "quantize-weights",
            reason,
        };
        if !(o.group_size >= 16 && o.group_size.is_power_of_two()) {
            return Err(fail(format!(
                "group size {} must be a power of two of at least 16 (32, 64 or 128)",
                o.group_size
            )));
        }
        let plan = plan_quantization(g, o).map_err(fail)?;
        let mut report = PassReport::default();
        let mut layers = Vec::new();
        for (id, precision) in plan {
            let n = g.nodes[id].clone();
            let (w, _) = product_weight(g, &n).expect("planned products have weights");
            let wname = g.value(w).name.clone();
            let (mut cols, k, nn) = weight_columns(g, &n).expect("planned products have weights");
            let bits = if precision == Precision::Int4 { 4 } else { 8 };
            let awq = o.awq_scales.get(&n.name);
            if let Some(s) = awq {
                if s.len() != k {
                    return Err(fail(format!(
                        "AWQ scales of {} have {} channels, K is {k}",
                        n.name,
                        s.len()
                    )));
                }
                for j in 0..nn {
                    for r in 0..k {
                        cols[j * k + r] *= s[r];
                    }
                }
            }
            let q = rtn::quantize(&cols, nn, k, o.group_size, bits, o.symmetric);
            // The effective weight: dequant(Q(W·s)) / s with AWQ scales, dequant(Q(W))
            // otherwise; `cols` goes back to W.
            let mut effective = q.dequantize();
            if let Some(s) = awq {
                for j in 0..nn {
                    for r in 0..k {
                        effective[j * k + r] /= s[r];
                        cols[j * k + r] /= s[r];
                    }
                }
            }
            let relative_error = rtn::relative_frobenius(&cols, &effective);
            let output_error = o
                .calibration
                .get(&n.name)
                .and_then(|act| awq::output_error(act, &cols, &effective, nn, k));
            let a = n.inputs[0].ok_or_else(|| fail(format!("{} has no A", n.name)))?;
            let mut a_in = a;
            if let Some(s) = awq {
                // x · W = (x / s) · (W · s): divide the activations before the product.
                let inv: Vec<f32> = s.iter().map(|v| 1.0 / v).collect();
                let inv_c = g.add_constant(
                    format!("{}.awq_inv_scale", n.name),
                    Constant::from_tensor(&Tensor::from_vec(vec![k], inv)),
                );
                let a_ty = g.value(a).ty.clone();
                let scaled = g.add_value(format!("{}_awq_in", n.name), a_ty, ValueDef::Undefined);
                g.add_node(Node {
                    name: format!("{}_awq", n.name),
                    op: Op::Binary(kiln_compiler::ir::BinaryOp::Mul),
                    inputs: vec![Some(a), Some(inv_c)],
                    outputs: vec![scaled],
                });
                a_in = scaled;
            }
            let nblk = q.blocks();
            let b = g.add_constant(
                format!("{wname}.q{bits}"),
                Constant::from_tensor(&Tensor::from_vec(
                    vec![nn, nblk, o.group_size * bits / 8],
                    q.packed.clone(),
                )),
            );
            let scales = g.add_constant(
                format!("{wname}.scales"),
                Constant::from_tensor(&Tensor::from_vec(vec![nn, nblk], q.scales.clone())),
            );
            let zp = q.zero_points_packed().map(|z| {
                let per_row = z.len() / nn;
                g.add_constant(
                    format!("{wname}.zero_points"),
                    Constant::from_tensor(&Tensor::from_vec(vec![nn, per_row], z)),
                )
            });
            let bias = match n.op {
                Op::Gemm { .. } => n.inputs.get(2).copied().flatten(),
                _ => None,
            };
            if let Some(bv) = bias {
                let ok = g
                    .value(bv)
                    .ty
                    .static_shape()
                    .is_some_and(|s| s.iter().product::<usize>() == nn && s.len() == 1);
                if !ok {
                    return Err(fail(format!(
                        "{}: only a bias of shape [N] can move into MatMulNBits",
                        n.name
                    )));
                }
            }
            let out = n.outputs[0];
            g.remove_node(id);
            g.add_node(Node {
                name: n.name.clone(),
                op: Op::MatMulNBits {
                    k,
                    n: nn,
                    bits,
                    block_size: o.group_size,
                    accuracy_level: if o.int8_activations {
                        kiln_compiler::ir::ACCURACY_LEVEL_INT8
                    } else {
                        0
                    },
                },
                inputs: vec![Some(a_in), Some(b), Some(scales), zp, None, bias],
                outputs: vec![out],
            });
            report.changed = true;
            report.notes.push(format!(
                "quantized {} ({wname}) [{k}x{nn}] to {}{} g{}{}: relative error {:.4}",
                n.name,
                precision.name(),
                if o.symmetric { " symmetric" } else { "" },
                o.group_size,
                if awq.is_some() {
                    " with AWQ scales"
                } else {
                    ""
                },
                relative_error
            ));
            layers.push(LayerQuantization {
                node: n.name.clone(),
                weight: wname,
                precision,
                k,
                n: nn,
                relative_error,
                output_error,
            });
        }
        // Replaced nodes lost their edges to consumers: recompute them.
        g.rebuild_edges();
        Ok((report, layers))
    }
}

impl Pass for QuantizeWeights {
    fn name(&self) -> &'static str {
        "quantize-weights"
    }

    fn run(&self, g: &mut Graph) -> Result<PassReport, PassError> {
        self.quantize(g).map(|(r, _)| r)
    }
}
