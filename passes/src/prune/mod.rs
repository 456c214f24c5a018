//! Structured pruning: removes whole FFN neurons, attention heads and convolution output
//! channels, so the model stays dense and gets smaller and faster on any target.
//!
//! [`analysis`] finds the prunable structures of a graph (and the candidates that are not
//! prunable, with the reason). [`Prune`] scores each structure's units, by weight magnitude
//! (L1 or L2 norm of all the weights a unit owns) or activation-aware (each consumer row's
//! norm times the calibration norm of the activation channel that meets it), keeps the best
//! units, slices every weight, bias, normalization parameter and shape constant the structure
//! lists, and then re-runs shape inference over the whole graph and checks that exactly the
//! predicted shapes changed. Amounts are a fraction or a count of units, globally, per
//! structure kind or per structure by name glob; a keep list protects structures; the width
//! left is rounded to a multiple (8 by default) so that kernels stay vector-friendly.

pub mod analysis;

pub use analysis::{find_structures, Skipped, SliceRole, Structure, StructureKind};

use analysis::gcd;

use crate::quantize::Glob;
use crate::{Pass, PassError, PassReport};
use kiln_compiler::interp;
use kiln_compiler::ir::{Constant, Dim, Graph, NodeId, Op, ValueId};
use kiln_compiler::{shape, Tensor};
use std::collections::{BTreeMap, HashMap};

/// How units are ranked.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Criterion {
    /// The norm of the weights a unit owns.
    #[default]
    Magnitude,
    /// Consumer-row norm times the calibration norm of the activation channel.
    Activation,
}

impl Criterion {
    pub fn name(self) -> &'static str {
        match self {
            Criterion::Magnitude => "magnitude",
            Criterion::Activation => "activation",
        }
    }
}

/// The norm of weight magnitudes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Norm {
    L1,
    #[default]
    L2,
}

/// How much of a structure to remove.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Amount {
    /// A fraction of the units, in [0, 1).
    Fraction(f64),
    /// A number of units (heads: heads, or KV heads with their query heads).
    Count(usize),
}

impl Amount {
    /// `0.25` is a fraction, `2` a count.
    pub fn parse(s: &str) -> Result<Amount, String> {
        if let Ok(n) = s.parse::<usize>() {
            return Ok(Amount::Count(n));
        }
        match s.parse::<f64>() {
            Ok(r) if (0.0..1.0).contains(&r) => Ok(Amount::Fraction(r)),
            Ok(_) => Err(format!(
                "'{s}' is neither a fraction in [0, 1) nor a whole number of units"
            )),
            Err(_) => Err(format!("'{s}' is not a number")),
        }
    }

    fn units_removed(self, units: usize) -> usize {
        match self {
            Amount::Fraction(r) => (r * units as f64).round() as usize,
            Amount::Count(n) => n,
        }
    }
}

impl std::fmt::Display for Amount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Amount::Fraction(r) => write!(f, "{r}"),
            Amount::Count(n) => write!(f, "{n}"),
        }
    }
}

/// What to prune and how to choose.
#[derive(Clone, Debug, PartialEq)]
pub struct PruneOptions {
    /// Applies to every kind without its own amount.
    pub all: Option<Amount>,
    pub kinds: BTreeMap<StructureKind, Amount>,
    /// Per structure by name glob (structure, node or weight names); first match wins.
    pub layers: Vec<(Glob, Amount)>,
    /// Structures never pruned.
    pub keep: Vec<Glob>,
    /// The width left (channels at the consuming weight) is rounded to a multiple of this.
    pub multiple: usize,
    pub criterion: Criterion,
    pub norm: Norm,
}

impl Default for PruneOptions {
    fn default() -> Self {
        PruneOptions {
            all: None,
            kinds: BTreeMap::new(),
            layers: Vec::new(),
            keep: Vec::new(),
            multiple: 8,
            criterion: Criterion::Magnitude,
            norm: Norm::L2,
        }
    }
}

impl PruneOptions {
    /// The amount for structure `s` (answering to `names`) and where it came from.
    fn amount(&self, s: &Structure, names: &[&str]) -> Option<(Amount, String)> {
        if let Some((glob, a)) = self
            .layers
            .iter()
            .find(|(glob, _)| names.iter().any(|n| glob.matches(n)))
        {
            return Some((*a, format!("glob '{}'", glob.as_str())));
        }
        if let Some(a) = self.kinds.get(&s.kind) {
            return Some((*a, s.kind.key().to_string()));
        }
        self.all.map(|a| (a, "all".to_string()))
    }
}

/// Per-channel sums of squares of each consumer's input activation, keyed by consumer node
/// name (see [`collect_channel_norms`]).
pub type ChannelNorms = HashMap<String, Vec<f64>>;

/// One pruned structure in the report.
#[derive(Clone, Debug, PartialEq)]
pub struct PrunedStructure {
    pub kind: StructureKind,
    pub name: String,
    /// What a unit is (`neurons`, `heads`, `KV heads`, `channels`).
    pub unit: &'static str,
    pub units_before: usize,
    pub units_after: usize,
    /// Query heads before and after, when a unit holds several (grouped-query attention).
    pub query_heads: Option<(usize, usize)>,
    /// Channels at the consuming weight.
    pub width_before: usize,
    pub width_after: usize,
    pub params_before: u64,
    pub params_after: u64,
    pub flops_before: u64,
    pub flops_after: u64,
    /// Rounding to the width multiple, when it changed the count.
    pub note: Option<String>,
}

/// What the pass did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PruneReport {
    pub pruned: Vec<PrunedStructure>,
    /// Structures found but left alone, with the reason (keep list, no amount, rounding).
    pub untouched: Vec<(String, String)>,
    /// Candidates that cannot be pruned safely, with the reason.
    pub skipped: Vec<Skipped>,
    pub params_before: u64,
    pub params_after: u64,
    pub flops_before: u64,
    pub flops_after: u64,
}

/// Structured pruning.
pub struct Prune {
    pub options: PruneOptions,
    /// Needed for [`Criterion::Activation`].
    pub activations: Option<ChannelNorms>,
}

impl Pass for Prune {
    fn name(&self) -> &'static str {
        "prune"
    }

    fn run(&self, graph: &mut Graph) -> Result<PassReport, PassError> {
        let r = self.prune(graph)?;
        let mut notes: Vec<String> = r
            .pruned
            .iter()
            .map(|p| {
                format!(
                    "{} {}: {} -> {} {}",
                    p.kind.key(),
                    p.name,
                    p.units_before,
                    p.units_after,
                    p.unit
                )
            })
            .collect();
        notes.extend(
            r.skipped
                .iter()
                .map(|s| format!("skipped {}: {}", s.seed, s.reason)),
        );
        Ok(PassReport {
            changed: !r.pruned.is_empty(),
            notes,
        })
    }
}

fn fail(reason: String) -> PassError {
    PassError::Failed {
        pass: "prune",
        reason,
    }
}

impl Prune {
    /// Prunes `g` and reports every structure pruned, left alone or skipped.
    pub fn prune(&self, g: &mut Graph) -> Result<PruneReport, PassError> {
        self.prune_found(g, find_structures(g))
    }

    /// [`Prune::prune`] with the structures of `g` already found (by [`find_structures`] on
    /// this very graph), for callers that needed them first (calibration of the consumers).
    pub fn prune_found(
        &self,
        g: &mut Graph,
        (structures, skipped): (Vec<Structure>, Vec<Skipped>),
    ) -> Result<PruneReport, PassError> {
        if self.options.multiple == 0 {
            return Err(fail("the width multiple must be at least 1".into()));
        }
        let mut report = PruneReport {
            skipped,
            params_before: g.parameter_stats().count,
            flops_before: graph_flops(g),
            ..Default::default()
        };
        let mut plans = Vec::new();
        for s in &structures {
            let names = s.names(g);
            if let Some(k) = self
                .options
                .keep
                .iter()
                .find(|k| names.iter().any(|n| k.matches(n)))
            {
                report
                    .untouched
                    .push((s.name.clone(), format!("kept by glob '{}'", k.as_str())));
                continue;
            }
            let Some((amount, from)) = self.options.amount(s, &names) else {
                report.untouched.push((
                    s.name.clone(),
                    format!("no amount given for {}", s.kind.key()),
                ));
                continue;
            };
            let removed = amount.units_removed(s.units);
            if removed >= s.units {
                return Err(fail(format!(
                    "{} {}: {from} asks to remove {removed} of its {} {}",
                    s.kind.key(),
                    s.name,
                    s.units,
                    s.unit_name()
                )));
            }
            let block = s.slices[s.sinks[0].weight].dim / s.units;
            let step = self.options.multiple / gcd(self.options.multiple, block);
            let wanted = s.units - removed;
            let keep = round_to_step(wanted, step, s.units);
            let note = (keep != wanted).then(|| {
                format!(
                    "kept {keep} {} instead of {wanted} so that the width {} is a multiple of {}",
                    s.unit_name(),
                    keep * block,
                    self.options.multiple
                )
            });
            if keep == s.units {
                report.untouched.push((
                    s.name.clone(),
                    note.unwrap_or_else(|| format!("{from} removes nothing")),
                ));
                continue;
            }
            let scores = self.scores(g, s)?;
            let mut order: Vec<usize> = (0..s.units).collect();
            order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
            let mut kept: Vec<usize> = order[..keep].to_vec();
            kept.sort_unstable();
            plans.push((s, kept, block, note));
        }
        let flops_before: Vec<u64> = plans
            .iter()
            .map(|(s, ..)| s.nodes.iter().map(|&n| node_flops(g, n)).sum())
            .collect();
        for (s, kept, ..) in &plans {
            apply(g, s, kept)?;
        }
        g.rebuild_edges();
        check_shapes(g)?;
        for ((s, kept, block, note), flops_before) in plans.into_iter().zip(flops_before) {
            let params_before: u64 = s.slices.iter().map(|sl| original_numel(g, sl)).sum::<u64>();
            let params_after: u64 = s
                .slices
                .iter()
                .map(|sl| original_numel(g, sl) / s.units as u64 * kept.len() as u64)
                .sum();
            report.pruned.push(PrunedStructure {
                kind: s.kind,
                name: s.name.clone(),
                unit: s.unit_name(),
                units_before: s.units,
                units_after: kept.len(),
                query_heads: s
                    .query_heads
                    .filter(|&q| q != s.units)
                    .map(|q| (q, q / s.units * kept.len())),
                width_before: s.units * block,
                width_after: kept.len() * block,
                params_before,
                params_after,
                flops_before,
                flops_after: s.nodes.iter().map(|&n| node_flops(g, n)).sum(),
                note,
            });
        }
        report.params_after = g.parameter_stats().count;
        report.flops_after = graph_flops(g);
        Ok(report)
    }

    /// One score per unit; higher is more important.
    fn scores(&self, g: &Graph, s: &Structure) -> Result<Vec<f64>, PassError> {
        let mut scores = vec![0.0f64; s.units];
        match self.options.criterion {
            Criterion::Magnitude => {
                for sl in s.slices.iter().filter(|sl| sl.role != SliceRole::Param) {
                    let per_index = axis_sums(g, sl, self.options.norm);
                    let block = sl.dim / s.units;
                    for (i, v) in per_index.iter().enumerate() {
                        scores[i / block] += v;
                    }
                }
                if self.options.norm == Norm::L2 {
                    scores.iter_mut().for_each(|x| *x = x.sqrt());
                }
            }
            Criterion::Activation => {
                let norms = self.activations.as_ref().ok_or_else(|| {
                    fail("the activation criterion needs calibration statistics".into())
                })?;
                for sink in &s.sinks {
                    let name = &g.nodes[sink.node].name;
                    let act = norms
                        .get(name)
                        .ok_or_else(|| fail(format!("no calibration statistics for '{name}'")))?;
                    let sl = &s.slices[sink.weight];
                    let rows = axis_sums(g, sl, Norm::L2);
                    if act.len() != rows.len() {
                        return Err(fail(format!(
                            "calibration statistics of '{name}' have {} channels, its weight {}",
                            act.len(),
                            rows.len()
                        )));
                    }
                    let block = sl.dim / s.units;
                    for (c, (a, w)) in act.iter().zip(&rows).enumerate() {
                        scores[c / block] += a.sqrt() * w.sqrt();
                    }
                }
            }
        }
        Ok(scores)
    }
}

/// Per index along the slice's axis: the sum of |w| (L1) or w² (L2) over the rest.
fn axis_sums(g: &Graph, sl: &analysis::ConstSlice, norm: Norm) -> Vec<f64> {
    let Some(c) = g.nodes[sl.node].inputs[sl.input].and_then(|v| g.constant(v)) else {
        return vec![0.0; sl.dim];
    };
    let mut sums = vec![0.0f64; sl.dim];
    add_per_index(&c.to_tensor(), sl.axis, &mut sums, |v| match norm {
        Norm::L1 => v.abs(),
        Norm::L2 => v * v,
    });
    sums
}

/// Adds `f(x)` of every element of `t` to `sums[index of x along axis]`.
fn add_per_index(t: &Tensor, axis: usize, sums: &mut [f64], f: impl Fn(f64) -> f64) {
    let dim = sums.len();
    let inner: usize = t.shape[axis + 1..].iter().product();
    for (i, v) in t.to_f64_vec().into_iter().enumerate() {
        sums[(i / inner.max(1)) % dim] += f(v);
    }
}

/// The element count a sliced constant had before pruning (called after [`apply`]: the
/// node's input is the sliced constant, scaled back up along the slice's axis).
fn original_numel(g: &Graph, sl: &analysis::ConstSlice) -> u64 {
    let Some(c) = g.nodes[sl.node].inputs[sl.input].and_then(|v| g.constant(v)) else {
        return 0;
    };
    let now = c.shape[sl.axis];
    (c.numel() / now.max(1) * sl.dim) as u64
}

/// `n` rounded to the nearest multiple of `step` (ties up), at least `step`, at most `max`.
fn round_to_step(n: usize, step: usize, max: usize) -> usize {
    if step <= 1 {
        return n.clamp(1, max);
    }
    let down = n / step * step;
    let up = down + step;
    let r = if n - down >= up - n { up } else { down };
    r.clamp(step.min(max), max)
}

/// Keeps `kept` units of structure `s`: slices its constants, rewrites its shape constants
/// and updates the static type of every tracked value.
fn apply(g: &mut Graph, s: &Structure, kept: &[usize]) -> Result<(), PassError> {
    let units = s.units;
    for sl in &s.slices {
        let v = g.nodes[sl.node].inputs[sl.input]
            .ok_or_else(|| fail("a sliced input disappeared".into()))?;
        let c = g
            .constant(v)
            .ok_or_else(|| fail(format!("'{}' is no longer a constant", g.value(v).name)))?;
        let t = slice_units(&c.to_tensor(), sl.axis, units, kept);
        let name = g.fresh_name(&format!("{}.pruned", g.value(v).name));
        let nv = g.add_constant(name, Constant::from_tensor(&t));
        g.nodes[sl.node].inputs[sl.input] = Some(nv);
    }
    for e in &s.shape_edits {
        let v = g.nodes[e.node].inputs[e.input]
            .ok_or_else(|| fail("a shape input disappeared".into()))?;
        let c = g
            .constant(v)
            .ok_or_else(|| fail(format!("'{}' is no longer a constant", g.value(v).name)))?;
        let mut spec = c.to_tensor().to_i64_vec();
        spec[e.index] = (e.dim / units * kept.len()) as i64;
        let t = Tensor::from_vec(vec![spec.len()], spec);
        let name = g.fresh_name(&format!("{}.pruned", g.value(v).name));
        let nv = g.add_constant(name, Constant::from_tensor(&t));
        g.nodes[e.node].inputs[e.input] = Some(nv);
    }
    for (&v, &axis) in &s.values {
        let ty = &mut g.value_mut(v).ty;
        if let Some(shape) = ty.shape.as_mut() {
            if let Dim::Fixed(d) = shape[axis] {
                shape[axis] = Dim::Fixed(d / units * kept.len());
            }
        }
    }
    Ok(())
}

/// `t` with only the `kept` of `units` equal blocks along `axis`.
fn slice_units(t: &Tensor, axis: usize, units: usize, kept: &[usize]) -> Tensor {
    let dim = t.shape[axis];
    let block = dim / units;
    let outer: usize = t.shape[..axis].iter().product();
    let inner: usize = t.shape[axis + 1..].iter().product();
    let mut idx = Vec::with_capacity(outer * kept.len() * block * inner);
    for o in 0..outer {
        for &u in kept {
            for j in u * block..(u + 1) * block {
                let base = (o * dim + j) * inner;
                idx.extend(base..base + inner);
            }
        }
    }
    let mut shape = t.shape.clone();
    shape[axis] = kept.len() * block;
    Tensor::new(shape, t.data.gather(&idx))
}

/// Re-infers every static type from the inputs and checks it against what pruning predicted:
/// a structure whose rules were wrong fails here instead of producing a broken artifact.
fn check_shapes(g: &mut Graph) -> Result<(), PassError> {
    let predicted: Vec<Option<Vec<usize>>> = g.values.iter().map(|v| v.ty.static_shape()).collect();
    shape::infer(g).map_err(|e| fail(format!("shape inference after pruning: {e}")))?;
    for (v, want) in g.values.iter().zip(predicted) {
        let got = v.ty.static_shape();
        if want.is_some() && got != want {
            return Err(fail(format!(
                "'{}' has shape {:?} after pruning, {:?} was expected",
                v.name, got, want
            )));
        }
    }
    Ok(())
}

/// Multiply-accumulate FLOPs (2 per MAC) of one matrix product or convolution; 0 for other
/// operators.
pub fn node_flops(g: &Graph, id: NodeId) -> u64 {
    let n = &g.nodes[id];
    let shape = |v: Option<ValueId>| v.and_then(|v| g.value(v).ty.static_shape());
    let Some(out) = n.outputs.first().and_then(|&o| shape(Some(o))) else {
        return 0;
    };
    let out_elems: u64 = out.iter().map(|&d| d as u64).product();
    let reduce = match &n.op {
        Op::MatMul | Op::MatMulInteger => shape(n.inputs[0]).and_then(|a| a.last().copied()),
        Op::Gemm { trans_a, .. } => {
            shape(n.inputs[0]).map(|a| if *trans_a { a[0] } else { a[a.len() - 1] })
        }
        Op::MatMulNBits { k, .. } => Some(*k),
        Op::Conv(_) => {
            shape(n.inputs.get(1).copied().flatten()).map(|w| w[1..].iter().product::<usize>())
        }
        _ => None,
    };
    reduce.map_or(0, |k| 2 * out_elems * k as u64)
}

/// FLOPs of every matrix product and convolution of the graph.
pub fn graph_flops(g: &Graph) -> u64 {
    g.nodes.node_indices().map(|n| node_flops(g, n)).sum()
}

/// Runs each calibration sample through the reference interpreter and sums, per channel,
/// the squares of the activation entering each structure's consumers (`sinks`: node name and
/// channel axis of its first input).
pub fn collect_channel_norms(
    g: &Graph,
    samples: &[Vec<Tensor>],
    sinks: &[(String, usize)],
    progress: &mut dyn FnMut(),
) -> Result<ChannelNorms, String> {
    let axes: HashMap<&str, usize> = sinks.iter().map(|(n, a)| (n.as_str(), *a)).collect();
    let mut sums: ChannelNorms = HashMap::new();
    for sample in samples {
        let mut observe = |node: &kiln_compiler::ir::Node, ins: &[Option<&Tensor>]| {
            let Some(&axis) = axes.get(node.name.as_str()) else {
                return;
            };
            let Some(x) = ins.first().copied().flatten() else {
                return;
            };
            let Some(&dim) = x.shape.get(axis) else {
                return;
            };
            let acc = sums
                .entry(node.name.clone())
                .or_insert_with(|| vec![0.0; dim]);
            add_per_index(x, axis, acc, |v| v * v);
        };
        interp::run_observed(g, sample, &mut observe).map_err(|e| e.to_string())?;
        progress();
    }
    Ok(sums)
}
