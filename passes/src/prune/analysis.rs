//! Finding prunable structures by unit propagation. A structure is a set of activations that
//! share one "channel" axis between weight products: the FFN's intermediate neurons (between
//! the up/gate projections and the down projection), an attention block's heads (from the
//! Q/K/V projections through the head reshapes, rotary embedding and both attention products
//! to the output projection) or a convolution's output channels (through BatchNormalization,
//! bias and activation into the next convolution).
//!
//! Starting from a producer (a `MatMul`/`Gemm`/`Conv` whose weight is a constant), the
//! analysis walks definitions and uses, carrying for each value the axis that holds the
//! channels. Every operator on the way has a rule saying where that axis goes (a `Reshape`
//! that splits 576 channels into 9 heads of 64 moves it to the head axis; a `Transpose`
//! permutes it; elementwise operators keep it and slice constant operands that have it; an
//! `Expand` that repeats KV heads for grouped-query attention keeps it on the KV axis). A
//! rule that does not apply (a normalization across the axis, a graph output, a gather, a
//! reshape that mixes the axis with another) makes the whole structure unprunable, with that
//! reason. The prunable unit is the largest block every tracked axis agrees on: the gcd of
//! all tracked sizes, which is the neuron for an FFN, the head for multi-head attention and
//! the KV head with all its query heads for grouped-query attention. Nothing is changed here;
//! [`super::apply`] slices what the [`Structure`] lists.

use kiln_compiler::ir::{Graph, NodeId, Op, ValueDef, ValueId};
use std::collections::{BTreeMap, HashMap, HashSet};

/// What kind of structure a group of channels is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum StructureKind {
    /// Intermediate neurons of a feed-forward block.
    Ffn,
    /// Attention heads (KV heads with their query heads under grouped-query attention).
    Heads,
    /// Convolution output channels.
    Channels,
}

impl StructureKind {
    pub const ALL: [StructureKind; 3] = [
        StructureKind::Ffn,
        StructureKind::Heads,
        StructureKind::Channels,
    ];

    /// The name used in configs and on the command line.
    pub fn key(self) -> &'static str {
        match self {
            StructureKind::Ffn => "ffn",
            StructureKind::Heads => "heads",
            StructureKind::Channels => "channels",
        }
    }

    pub fn parse(s: &str) -> Option<StructureKind> {
        StructureKind::ALL.into_iter().find(|k| k.key() == s)
    }

    /// What one unit is called in reports.
    pub fn unit(self) -> &'static str {
        match self {
            StructureKind::Ffn => "neurons",
            StructureKind::Heads => "heads",
            StructureKind::Channels => "channels",
        }
    }
}

/// Why a constant input is sliced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SliceRole {
    /// A producer's weight: its output channels.
    Producer,
    /// A consumer's weight: its input channels (rows of a MatMul weight).
    Sink,
    /// A bias, normalization parameter or other constant operand carrying the channels.
    Param,
}

/// One constant input of one node, sliced along `axis` (whose size is `dim`).
#[derive(Clone, Debug, PartialEq)]
pub struct ConstSlice {
    pub node: NodeId,
    pub input: usize,
    pub axis: usize,
    pub dim: usize,
    pub role: SliceRole,
}

/// One entry of a `Reshape`/`Expand` shape constant that spells out the tracked size.
#[derive(Clone, Debug, PartialEq)]
pub struct ShapeEdit {
    pub node: NodeId,
    pub input: usize,
    pub index: usize,
    pub dim: usize,
}

/// A consumer whose input channels are the structure's (for activation statistics).
#[derive(Clone, Debug, PartialEq)]
pub struct Sink {
    pub node: NodeId,
    /// The activation input and the axis of its channels.
    pub value: ValueId,
    pub axis: usize,
    /// Index into [`Structure::slices`] of the sink's weight.
    pub weight: usize,
}

/// A prunable structure: everything that must shrink together.
#[derive(Clone, Debug, PartialEq)]
pub struct Structure {
    pub kind: StructureKind,
    /// A readable name: the common prefix of its weights' names (`model.layers.0.mlp`).
    pub name: String,
    /// Number of prunable units.
    pub units: usize,
    /// Every activation carrying the channels, with its channel axis.
    pub values: BTreeMap<ValueId, usize>,
    pub slices: Vec<ConstSlice>,
    pub shape_edits: Vec<ShapeEdit>,
    pub sinks: Vec<Sink>,
    /// Every node the structure touches.
    pub nodes: Vec<NodeId>,
    /// For attention: the number of query heads (more than `units` under grouped-query
    /// attention, where a unit is a KV head with its query heads).
    pub query_heads: Option<usize>,
}

impl Structure {
    /// What one unit is called in reports: `KV heads` when a unit holds several query heads.
    pub fn unit_name(&self) -> &'static str {
        match self.query_heads {
            Some(q) if self.kind == StructureKind::Heads && q != self.units => "KV heads",
            _ => self.kind.unit(),
        }
    }
}

impl Structure {
    /// Names the structure answers to in globs: its own name, and its nodes' and weights'.
    pub fn names<'g>(&'g self, g: &'g Graph) -> Vec<&'g str> {
        let mut names = vec![self.name.as_str()];
        for s in &self.slices {
            if s.role != SliceRole::Param {
                let n = &g.nodes[s.node];
                names.push(n.name.as_str());
                if let Some(Some(w)) = n.inputs.get(s.input) {
                    names.push(g.value(*w).name.as_str());
                }
            }
        }
        names
    }
}

/// A candidate that could not be pruned, and why.
#[derive(Clone, Debug, PartialEq)]
pub struct Skipped {
    /// The producer node the analysis started from.
    pub seed: String,
    /// The weight products involved (for the report).
    pub weights: Vec<String>,
    pub reason: String,
}

/// Every producer's structure, or the reason it is not prunable. Producers are visited in
/// topological order; a producer already covered by an earlier structure (or by a failed
/// one) is not started again.
pub fn find_structures(g: &Graph) -> (Vec<Structure>, Vec<Skipped>) {
    let mut consumers: HashMap<ValueId, Vec<NodeId>> = HashMap::new();
    for id in g.nodes.node_indices() {
        for &v in g.nodes[id].inputs.iter().flatten() {
            let list = consumers.entry(v).or_default();
            if !list.contains(&id) {
                list.push(id);
            }
        }
    }
    let order = g.topo_order().unwrap_or_default();
    let outputs: HashSet<ValueId> = g.outputs.iter().copied().collect();
    let mut covered: HashSet<NodeId> = HashSet::new();
    let mut found = Vec::new();
    let mut skipped = Vec::new();
    for &id in &order {
        if let Op::MatMulNBits { .. } = g.nodes[id].op {
            let n = &g.nodes[id];
            skipped.push(Skipped {
                seed: n.name.clone(),
                weights: n
                    .inputs
                    .get(1)
                    .copied()
                    .flatten()
                    .map(|w| g.value(w).name.clone())
                    .into_iter()
                    .collect(),
                reason: "its weights are already quantized (prune before quantizing)".into(),
            });
            continue;
        }
        if covered.contains(&id) || producer_axis(g, id).is_none() {
            continue;
        }
        let mut walk = Walk {
            g,
            consumers: &consumers,
            outputs: &outputs,
            values: BTreeMap::new(),
            queue: Vec::new(),
            visited: HashSet::new(),
            slices: Vec::new(),
            shape_edits: Vec::new(),
            sinks: Vec::new(),
            saw_heads: false,
            saw_conv: false,
            query_heads: None,
        };
        let result = walk.run(id);
        covered.extend(
            walk.slices
                .iter()
                .filter(|s| s.role == SliceRole::Producer)
                .map(|s| s.node)
                .chain([id]),
        );
        match result.and_then(|()| walk.finish()) {
            Ok(s) => found.push(s),
            Err(reason) => skipped.push(Skipped {
                seed: g.nodes[id].name.clone(),
                weights: walk.weight_names().into_iter().map(String::from).collect(),
                reason,
            }),
        }
    }
    (found, skipped)
}

/// The output channel axis of a node that can start a structure: a matrix product or a
/// (non-grouped) convolution with a constant weight and a non-constant data input.
fn producer_axis(g: &Graph, id: NodeId) -> Option<usize> {
    let n = &g.nodes[id];
    let data = n.inputs.first().copied().flatten()?;
    let weight = n.inputs.get(1).copied().flatten()?;
    if g.constant(data).is_some() || !g.constant(weight).is_some_and(|c| c.dtype.is_float()) {
        return None;
    }
    let out_rank = g.value(*n.outputs.first()?).ty.static_shape()?.len();
    match &n.op {
        Op::MatMul if g.constant(weight)?.shape.len() == 2 && out_rank >= 2 => Some(out_rank - 1),
        Op::Gemm { trans_a: false, .. } => Some(1),
        Op::Conv(a) if a.group == 1 => Some(1),
        _ => None,
    }
}

struct Walk<'a> {
    g: &'a Graph,
    consumers: &'a HashMap<ValueId, Vec<NodeId>>,
    outputs: &'a HashSet<ValueId>,
    values: BTreeMap<ValueId, usize>,
    queue: Vec<ValueId>,
    visited: HashSet<NodeId>,
    slices: Vec<ConstSlice>,
    shape_edits: Vec<ShapeEdit>,
    sinks: Vec<Sink>,
    saw_heads: bool,
    saw_conv: bool,
    /// The largest channel-axis size of a product of two activations (attention scores).
    query_heads: Option<usize>,
}

type Step = Result<(), String>;

/// Where a known axis sits: input `i` or output `i` of the node being visited.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Slot {
    In(usize),
    Out(usize),
}

impl<'a> Walk<'a> {
    fn shape(&self, v: ValueId) -> Result<Vec<usize>, String> {
        self.g
            .value(v)
            .ty
            .static_shape()
            .ok_or_else(|| format!("'{}' has no static shape", self.g.value(v).name))
    }

    fn vname(&self, v: ValueId) -> &str {
        &self.g.value(v).name
    }

    /// Records `axis` as the channel axis of `v` (checking agreement with an earlier visit).
    fn track(&mut self, v: ValueId, axis: usize) -> Step {
        match self.values.get(&v) {
            Some(&a) if a == axis => Ok(()),
            Some(&a) => Err(format!(
                "'{}' would carry the channels on axis {a} and on axis {axis}",
                self.vname(v)
            )),
            None => {
                if self.outputs.contains(&v) {
                    return Err(format!("'{}' is a graph output", self.vname(v)));
                }
                if matches!(self.g.value(v).def, ValueDef::Input(_)) {
                    return Err(format!("'{}' is a graph input", self.vname(v)));
                }
                let shape = self.shape(v)?;
                if axis >= shape.len() {
                    return Err(format!("'{}' has no axis {axis}", self.vname(v)));
                }
                self.values.insert(v, axis);
                self.queue.push(v);
                Ok(())
            }
        }
    }

    fn run(&mut self, seed: NodeId) -> Step {
        let axis = producer_axis(self.g, seed).ok_or("not a producer")?;
        let out = self.g.nodes[seed].outputs[0];
        self.visited.insert(seed);
        self.producer(seed, axis)?;
        self.track(out, axis)?;
        while let Some(v) = self.queue.pop() {
            if let ValueDef::Node(n, k) = self.g.value(v).def {
                if self.visited.insert(n) {
                    self.visit(n, Slot::Out(k), self.values[&v])?;
                }
            }
            let users = self.consumers.get(&v).cloned().unwrap_or_default();
            for n in users {
                if self.visited.insert(n) {
                    let i = self.g.nodes[n]
                        .inputs
                        .iter()
                        .position(|x| *x == Some(v))
                        .unwrap_or(0);
                    self.visit(n, Slot::In(i), self.values[&v])?;
                }
            }
        }
        Ok(())
    }

    /// Records a producer's weight (and bias) slices.
    fn producer(&mut self, id: NodeId, out_axis: usize) -> Step {
        let n = &self.g.nodes[id];
        let out_rank = self.shape(n.outputs[0])?.len();
        let (w_axis, bias) = match &n.op {
            Op::MatMul if out_axis + 1 == out_rank => (1, None),
            Op::Gemm {
                trans_a: false,
                trans_b,
                ..
            } if out_axis == 1 => (if *trans_b { 0 } else { 1 }, Some(2)),
            Op::Conv(a) if a.group == 1 && out_axis == 1 => {
                self.saw_conv = true;
                (0, Some(2))
            }
            _ => {
                return Err(format!(
                    "{} '{}' would lose rows of its output, not channels",
                    n.op.onnx_name(),
                    n.name
                ))
            }
        };
        self.const_slice(id, 1, w_axis, SliceRole::Producer)?;
        if let Some(b) = bias {
            if let Some(Some(bv)) = n.inputs.get(b) {
                let shape = self.shape(*bv)?;
                let last = shape.len().saturating_sub(1);
                // A Gemm bias broadcasts: only a bias with the channel size is sliced.
                if shape.get(last).copied().unwrap_or(1) > 1 || matches!(n.op, Op::Conv(_)) {
                    self.const_slice(id, b, last, SliceRole::Param)?;
                }
            }
        }
        Ok(())
    }

    fn const_slice(&mut self, node: NodeId, input: usize, axis: usize, role: SliceRole) -> Step {
        let n = &self.g.nodes[node];
        let v = n
            .inputs
            .get(input)
            .copied()
            .flatten()
            .ok_or_else(|| format!("'{}' has no input {input}", n.name))?;
        let c = self
            .g
            .constant(v)
            .ok_or_else(|| format!("input {input} of '{}' is not a constant", n.name))?;
        if c.dtype.bits() < 8 {
            return Err(format!(
                "'{}' is already quantized (prune before quantizing)",
                self.vname(v)
            ));
        }
        let dim = *c
            .shape
            .get(axis)
            .ok_or_else(|| format!("'{}' has no axis {axis}", self.vname(v)))?;
        self.slices.push(ConstSlice {
            node,
            input,
            axis,
            dim,
            role,
        });
        Ok(())
    }

    /// Derives, from one known (slot, axis) of node `id`, the channel axis of every other
    /// operand, or says why the channels cannot pass through this node.
    fn visit(&mut self, id: NodeId, slot: Slot, axis: usize) -> Step {
        let g = self.g;
        let n = &g.nodes[id];
        let what = || format!("{} '{}'", n.op.onnx_name(), n.name);
        let input = |i: usize| n.inputs.get(i).copied().flatten();
        let is_const = |i: usize| input(i).is_some_and(|v| g.constant(v).is_some());
        if n.outputs.len() > 1 && !matches!(n.op, Op::Split { .. }) {
            let extra_used = n.outputs[1..]
                .iter()
                .any(|o| self.consumers.contains_key(o) || self.outputs.contains(o));
            if extra_used {
                return Err(format!("{} has several outputs", what()));
            }
        }
        match &n.op {
            Op::MatMul => {
                let a = input(0).ok_or("MatMul without input")?;
                let b = input(1).ok_or("MatMul without input")?;
                let (ra, rb) = (self.shape(a)?.len(), self.shape(b)?.len());
                let ro = self.shape(n.outputs[0])?.len();
                if is_const(1) && rb == 2 {
                    match slot {
                        Slot::Out(_) if axis + 1 == ro => return self.producer(id, axis),
                        Slot::In(0) if axis + 1 == ra => {
                            self.const_slice(id, 1, 0, SliceRole::Sink)?;
                            self.sinks.push(Sink {
                                node: id,
                                value: a,
                                axis,
                                weight: self.slices.len() - 1,
                            });
                            return Ok(());
                        }
                        _ => {}
                    }
                }
                if is_const(0) || is_const(1) {
                    return Err(format!(
                        "{} multiplies the channels by a constant along a matrix axis",
                        what()
                    ));
                }
                // Two activations: the channels must be a batch axis of both.
                let from_end = match slot {
                    Slot::In(0) => ra - axis,
                    Slot::In(_) => rb - axis,
                    Slot::Out(_) => ro - axis,
                };
                if from_end <= 2 {
                    return Err(format!(
                        "{} reduces over or produces along the channel axis",
                        what()
                    ));
                }
                self.saw_heads = true;
                self.broadcast_operands(id, &[0, 1], from_end)?;
                let heads = self.shape(n.outputs[0])?[ro - from_end];
                self.query_heads = Some(self.query_heads.unwrap_or(0).max(heads));
                self.track(n.outputs[0], ro - from_end)
            }
            Op::Gemm { trans_a: false, trans_b, .. } if is_const(1) => match slot {
                Slot::Out(_) => self.producer(id, axis),
                Slot::In(0) if axis == 1 => {
                    let w_axis = if *trans_b { 1 } else { 0 };
                    self.const_slice(id, 1, w_axis, SliceRole::Sink)?;
                    self.sinks.push(Sink {
                        node: id,
                        value: input(0).ok_or("Gemm without input")?,
                        axis,
                        weight: self.slices.len() - 1,
                    });
                    Ok(())
                }
                _ => Err(format!("{} would lose rows, not channels", what())),
            },
            Op::Conv(a) if is_const(1) => match slot {
                Slot::Out(_) => self.producer(id, axis),
                Slot::In(0) if axis == 1 && a.group == 1 => {
                    self.const_slice(id, 1, 1, SliceRole::Sink)?;
                    self.sinks.push(Sink {
                        node: id,
                        value: input(0).ok_or("Conv without input")?,
                        axis,
                        weight: self.slices.len() - 1,
                    });
                    Ok(())
                }
                Slot::In(0) if axis == 1 => Err(format!(
                    "{} is a grouped convolution (group {}): its groups would have to shrink too",
                    what(),
                    a.group
                )),
                _ => Err(format!("{} would lose spatial rows, not channels", what())),
            },
            Op::BatchNorm { .. } => {
                let x_axis = axis;
                if x_axis == 1 {
                    for i in 1..5 {
                        if !is_const(i) {
                            return Err(format!("{} has a non-constant parameter", what()));
                        }
                        self.const_slice(id, i, 0, SliceRole::Param)?;
                    }
                }
                self.track(input(0).ok_or("BatchNorm without input")?, x_axis)?;
                self.track(n.outputs[0], x_axis)
            }
            Op::Unary(_)
            | Op::Cast { .. }
            | Op::Identity
            | Op::Dropout
            | Op::Clip { .. }
            | Op::Softmax { .. } => {
                if let Op::Clip { .. } = n.op {
                    if (1..3).any(|i| input(i).is_some() && !is_const(i)) {
                        return Err(format!("{} has computed bounds", what()));
                    }
                }
                if let Op::Softmax {
                    axis: sa,
                    coerce_2d,
                    ..
                } = n.op
                {
                    let rank = self.shape(n.outputs[0])? .len() as i64;
                    let sa = if sa < 0 { sa + rank } else { sa } as usize;
                    if sa == axis || (coerce_2d && axis >= sa) {
                        return Err(format!("{} normalizes across the channels", what()));
                    }
                }
                self.track(input(0).ok_or("no input")?, axis)?;
                self.track(n.outputs[0], axis)
            }
            Op::Binary(_) | Op::Variadic(_) | Op::Where => {
                let rank = match slot {
                    Slot::In(i) => self.shape(input(i).ok_or("no input")?)?.len(),
                    Slot::Out(_) => self.shape(n.outputs[0])?.len(),
                };
                let from_end = rank - axis;
                let all: Vec<usize> = (0..n.inputs.len()).collect();
                self.broadcast_operands(id, &all, from_end)?;
                let ro = self.shape(n.outputs[0])?.len();
                self.track(n.outputs[0], ro - from_end)
            }
            Op::LayerNorm { axis: na, .. } | Op::RmsNorm { axis: na, .. } => {
                let rank = self.shape(n.outputs[0])?.len() as i64;
                let na = if *na < 0 { na + rank } else { *na } as usize;
                if axis >= na {
                    return Err(format!("{} normalizes across the channels", what()));
                }
                self.track(input(0).ok_or("no input")?, axis)?;
                self.track(n.outputs[0], axis)
            }
            Op::Transpose { perm } => {
                let rank = self.shape(n.outputs[0])?.len();
                let perm: Vec<usize> = match perm {
                    Some(p) => p.iter().map(|&x| x as usize).collect(),
                    None => (0..rank).rev().collect(),
                };
                let (in_axis, out_axis) = match slot {
                    Slot::In(_) => (axis, perm.iter().position(|&p| p == axis).ok_or("bad perm")?),
                    Slot::Out(_) => (perm[axis], axis),
                };
                self.track(input(0).ok_or("no input")?, in_axis)?;
                self.track(n.outputs[0], out_axis)
            }
            Op::Reshape { allowzero } => {
                let x = input(0).ok_or("no input")?;
                let shape_v = input(1).ok_or("no shape")?;
                let spec = g
                    .constant(shape_v)
                    .ok_or_else(|| format!("{} has a computed shape", what()))?
                    .to_tensor()
                    .to_i64_vec();
                let in_shape = self.shape(x)?;
                let out_shape = self.shape(n.outputs[0])?;
                let (in_axis, out_axis) = match slot {
                    Slot::In(_) => (Some(axis), map_reshape_axis(&in_shape, axis, &out_shape)),
                    Slot::Out(_) => (map_reshape_axis(&out_shape, axis, &in_shape), Some(axis)),
                };
                let (Some(in_axis), Some(out_axis)) = (in_axis, out_axis) else {
                    return Err(format!(
                        "{} mixes the channel axis with the axes before it",
                        what()
                    ));
                };
                match spec.get(out_axis) {
                    Some(&d) if d > 0 => self.shape_edits.push(ShapeEdit {
                        node: id,
                        input: 1,
                        index: out_axis,
                        dim: out_shape[out_axis],
                    }),
                    Some(0) if !allowzero && in_axis == out_axis => {}
                    Some(-1) => {}
                    _ => return Err(format!("{} has a shape entry it cannot keep", what())),
                }
                if in_shape[in_axis] != out_shape[out_axis] {
                    self.saw_heads = true;
                }
                self.track(x, in_axis)?;
                self.track(n.outputs[0], out_axis)
            }
            Op::Unsqueeze { axes } | Op::Squeeze { axes } => {
                let unsqueeze = matches!(n.op, Op::Unsqueeze { .. });
                let x = input(0).ok_or("no input")?;
                let (ri, ro) = (self.shape(x)?.len(), self.shape(n.outputs[0])?.len());
                let axes: Vec<i64> = match (axes, input(1)) {
                    (Some(a), _) => a.clone(),
                    (None, Some(v)) => g
                        .constant(v)
                        .ok_or_else(|| format!("{} has computed axes", what()))?
                        .to_tensor()
                        .to_i64_vec(),
                    (None, None) => {
                        let s = self.shape(x)?;
                        (0..s.len() as i64).filter(|&i| s[i as usize] == 1).collect()
                    }
                };
                // The axes of the longer side that are inserted / removed.
                let long = if unsqueeze { ro } else { ri };
                let marked: HashSet<usize> = axes
                    .iter()
                    .map(|&a| if a < 0 { a + long as i64 } else { a } as usize)
                    .collect();
                let kept: Vec<usize> = (0..long).filter(|i| !marked.contains(i)).collect();
                let (short_axis, long_axis) = match (slot, unsqueeze) {
                    (Slot::In(_), true) | (Slot::Out(_), false) => (axis, kept[axis]),
                    (Slot::Out(_), true) | (Slot::In(_), false) => (
                        kept.iter()
                            .position(|&k| k == axis)
                            .ok_or_else(|| format!("{} removes the channel axis", what()))?,
                        axis,
                    ),
                };
                let (in_axis, out_axis) = if unsqueeze {
                    (short_axis, long_axis)
                } else {
                    (long_axis, short_axis)
                };
                self.track(x, in_axis)?;
                self.track(n.outputs[0], out_axis)
            }
            Op::Expand => {
                let x = input(0).ok_or("no input")?;
                let in_shape = self.shape(x)?;
                let out_shape = self.shape(n.outputs[0])?;
                let from_end = match slot {
                    Slot::In(_) => in_shape.len() - axis,
                    Slot::Out(_) => out_shape.len() - axis,
                };
                if from_end > in_shape.len() {
                    return Err(format!("{} creates the channel axis", what()));
                }
                let (ia, oa) = (in_shape.len() - from_end, out_shape.len() - from_end);
                if in_shape[ia] != out_shape[oa] {
                    return Err(format!("{} broadcasts along the channel axis", what()));
                }
                let spec_v = input(1).ok_or("no shape")?;
                let spec = g
                    .constant(spec_v)
                    .ok_or_else(|| format!("{} has a computed shape", what()))?
                    .to_tensor()
                    .to_i64_vec();
                if spec.len() >= from_end {
                    let idx = spec.len() - from_end;
                    if spec[idx] > 1 {
                        self.shape_edits.push(ShapeEdit {
                            node: id,
                            input: 1,
                            index: idx,
                            dim: out_shape[oa],
                        });
                    }
                }
                self.track(x, ia)?;
                self.track(n.outputs[0], oa)
            }
            Op::Slice { attrs } => {
                let x = input(0).ok_or("no input")?;
                let rank = self.shape(x)?.len() as i64;
                let axes: Vec<i64> = match attrs {
                    Some(a) => a
                        .axes
                        .clone()
                        .unwrap_or_else(|| (0..a.starts.len() as i64).collect()),
                    None => match input(3) {
                        Some(v) => g
                            .constant(v)
                            .ok_or_else(|| format!("{} has computed axes", what()))?
                            .to_tensor()
                            .to_i64_vec(),
                        None => {
                            let n_starts = input(1)
                                .and_then(|v| g.constant(v))
                                .map(|c| c.numel())
                                .ok_or_else(|| format!("{} has computed starts", what()))?;
                            (0..n_starts as i64).collect()
                        }
                    },
                };
                if axes
                    .iter()
                    .any(|&a| (if a < 0 { a + rank } else { a }) as usize == axis)
                {
                    return Err(format!("{} slices the channel axis", what()));
                }
                self.track(x, axis)?;
                self.track(n.outputs[0], axis)
            }
            Op::Concat { axis: ca } => {
                let rank = self.shape(n.outputs[0])?.len() as i64;
                let ca = if *ca < 0 { ca + rank } else { *ca } as usize;
                if ca == axis {
                    return Err(format!("{} concatenates along the channel axis", what()));
                }
                for i in 0..n.inputs.len() {
                    if is_const(i) {
                        self.const_slice(id, i, axis, SliceRole::Param)?;
                    } else if let Some(v) = input(i) {
                        self.track(v, axis)?;
                    }
                }
                self.track(n.outputs[0], axis)
            }
            Op::Split { axis: sa, .. } => {
                let x = input(0).ok_or("no input")?;
                let rank = self.shape(x)?.len() as i64;
                let sa = if *sa < 0 { sa + rank } else { *sa } as usize;
                if sa == axis {
                    return Err(format!("{} splits along the channel axis", what()));
                }
                self.track(x, axis)?;
                for &o in &n.outputs {
                    self.track(o, axis)?;
                }
                Ok(())
            }
            Op::MatMulNBits { .. } | Op::DequantizeLinear { .. } => Err(format!(
                "{} holds already quantized weights (prune before quantizing)",
                what()
            )),
            Op::Reduce { .. } => Err(format!(
                "the channels reach {}, which reduces over them (the hidden size of a residual stream is not prunable)",
                what()
            )),
            _ => Err(format!("the channels reach {}, which cannot be pruned through", what())),
        }
    }

    /// Elementwise broadcasting: operand `i` of `id` carries the channels `from_end` axes from
    /// its end unless it has size 1 there (or fewer axes). Constant operands with the channels
    /// are sliced; other operands join the structure.
    fn broadcast_operands(&mut self, id: NodeId, operands: &[usize], from_end: usize) -> Step {
        let full = {
            let out = self.g.nodes[id].outputs[0];
            let s = self.shape(out)?;
            s[s.len() - from_end]
        };
        for &i in operands {
            let Some(v) = self.g.nodes[id].inputs.get(i).copied().flatten() else {
                continue;
            };
            let s = self.shape(v)?;
            if s.len() < from_end {
                continue;
            }
            let a = s.len() - from_end;
            if s[a] == 1 && full != 1 {
                continue;
            }
            if self.g.constant(v).is_some() {
                self.const_slice(id, i, a, SliceRole::Param)?;
            } else {
                self.track(v, a)?;
            }
        }
        Ok(())
    }

    /// The names of the producer and consumer weights found so far.
    fn weight_names(&self) -> Vec<&'a str> {
        let g = self.g;
        self.slices
            .iter()
            .filter(|s| s.role != SliceRole::Param)
            .filter_map(|s| g.nodes[s.node].inputs.get(s.input).copied().flatten())
            .map(|v| g.value(v).name.as_str())
            .collect()
    }

    /// Checks the structure is closed (every producer and consumer found) and computes its
    /// unit: the gcd of every tracked size.
    fn finish(&mut self) -> Result<Structure, String> {
        if self.sinks.is_empty() {
            return Err("the channels never reach a consuming weight".into());
        }
        let mut units = 0usize;
        for (&v, &a) in &self.values {
            units = gcd(units, self.shape(v)?[a]);
        }
        for s in &self.slices {
            units = gcd(units, s.dim);
        }
        for e in &self.shape_edits {
            units = gcd(units, e.dim);
        }
        if units < 2 {
            return Err("the channel sizes share no common block (nothing to prune)".into());
        }
        let kind = if self.saw_conv {
            StructureKind::Channels
        } else if self.saw_heads {
            StructureKind::Heads
        } else {
            StructureKind::Ffn
        };
        let weight_names = self.weight_names();
        let name = common_prefix(&weight_names)
            .unwrap_or_else(|| self.g.nodes[self.slices[0].node].name.clone());
        let mut nodes: Vec<NodeId> = self.visited.iter().copied().collect();
        nodes.sort();
        Ok(Structure {
            kind,
            name,
            units,
            values: std::mem::take(&mut self.values),
            slices: std::mem::take(&mut self.slices),
            shape_edits: std::mem::take(&mut self.shape_edits),
            sinks: std::mem::take(&mut self.sinks),
            nodes,
            query_heads: self.query_heads,
        })
    }
}

pub(crate) fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// The common dotted prefix of weight names (`model.layers.0.mlp.gate_proj.weight.T` and
/// `model.layers.0.mlp.down_proj.weight.T` give `model.layers.0.mlp`).
fn common_prefix(names: &[&str]) -> Option<String> {
    let first = names.first()?;
    let mut len = first.len();
    for n in &names[1..] {
        len = len.min(
            first
                .bytes()
                .zip(n.bytes())
                .take_while(|(a, b)| a == b)
                .count(),
        );
    }
    if names.len() == 1 {
        return Some(first.to_string());
    }
    let cut = first[..len].rfind(['.', '/']).unwrap_or(0);
    (cut > 0).then(|| first[..cut].to_string())
}

/// Where the channel axis `axis` of `from` goes in a reshape to `to`: the axis of `to` that
/// starts at the same outer offset and covers the same span (the channel axis may be split
/// into (units, inner) or merged with inner axes, never with outer ones). Among equivalent
/// axes (size-1 neighbours) the largest is chosen.
fn map_reshape_axis(from: &[usize], axis: usize, to: &[usize]) -> Option<usize> {
    let outer: usize = from[..axis].iter().product();
    let span: usize = from[axis..].iter().product();
    let mut best: Option<usize> = None;
    for a in 0..to.len() {
        let o: usize = to[..a].iter().product();
        let s: usize = to[a..].iter().product();
        if o == outer && s == span && to[a] > 1 && best.is_none_or(|b| to[a] > to[b]) {
            best = Some(a);
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reshape_axis_mapping() {
        // Split 576 channels into 9 heads of 64, merge back, GQA (3, 3) -> 9.
        assert_eq!(
            map_reshape_axis(&[1, 128, 576], 2, &[1, 128, 9, 64]),
            Some(2)
        );
        assert_eq!(
            map_reshape_axis(&[1, 128, 9, 64], 2, &[1, 128, 576]),
            Some(2)
        );
        assert_eq!(
            map_reshape_axis(&[1, 3, 3, 128, 64], 1, &[1, 9, 128, 64]),
            Some(1)
        );
        // Merging the channels with the axes before them is refused; merging those axes
        // among themselves keeps the channel axis.
        assert_eq!(map_reshape_axis(&[4, 8, 16], 1, &[32, 16]), None);
        assert_eq!(map_reshape_axis(&[4, 8, 16], 2, &[32, 16]), Some(1));
        assert_eq!(map_reshape_axis(&[1, 128, 576], 2, &[128, 576]), Some(1));
    }

    #[test]
    fn prefix() {
        assert_eq!(
            common_prefix(&["a.l0.mlp.up.w", "a.l0.mlp.down.w"]).as_deref(),
            Some("a.l0.mlp")
        );
        assert_eq!(common_prefix(&["x", "y"]), None);
    }
}
