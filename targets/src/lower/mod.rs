//! Lowering: a statically shaped graph (after `shape::infer`) becomes a [`Program`], a list of
//! loop-IR kernels over program buffers (graph inputs, outputs, weights and temporaries) in
//! execution order. View ops (Reshape, Squeeze, Unsqueeze, Flatten, Identity, Dropout) alias
//! their input's buffer instead of copying. Ops without a lowering are reported all at once.

mod conv;
mod packed;
mod quant;
mod quant_int8;
mod quant_int8_tile;
mod scan;

use crate::loop_ir::*;
use kiln_compiler::dtype::DType;
use kiln_compiler::interp::movement::slice_geometry;
use kiln_compiler::ir::*;
use kiln_compiler::tensor::strides;
use kiln_compiler::Tensor;
use std::collections::{BTreeMap, HashMap};
use thiserror::Error;

pub use packed::LowerOptions;

#[derive(Debug, Error, PartialEq)]
pub enum LowerError {
    #[error("value '{0}' has no static shape; run shape inference first")]
    NotStatic(String),
    #[error("value '{name}' has element type {dtype}, which code generation does not support yet")]
    DType { name: String, dtype: String },
    #[error("code generation does not support these operators yet: {0}")]
    Unsupported(String),
    #[error("node '{node}' ({op}): {reason}")]
    Node {
        node: String,
        op: String,
        reason: String,
    },
}

#[derive(Clone, Debug, PartialEq)]
pub enum BufKind {
    Input(usize),
    Output(usize),
    /// Constant data, stored in the artifact's read-only segment.
    Weight(Vec<u8>),
    Temp,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Buffer {
    pub name: String,
    pub scalar: Scalar,
    pub len: usize,
    pub kind: BufKind,
}

impl Buffer {
    pub fn bytes(&self) -> usize {
        self.len * self.scalar.bytes()
    }
}

/// A kernel and, for each of its parameters, the program buffer it runs on.
#[derive(Clone, Debug, PartialEq)]
pub struct Step {
    pub kernel: Kernel,
    pub args: Vec<usize>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct IoInfo {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub buffer: usize,
}

#[derive(Clone, Debug, PartialEq, Default)]
pub struct Program {
    pub buffers: Vec<Buffer>,
    pub steps: Vec<Step>,
    pub inputs: Vec<IoInfo>,
    pub outputs: Vec<IoInfo>,
}

pub fn scalar_of(d: DType) -> Option<Scalar> {
    match d {
        DType::F32 => Some(Scalar::F32),
        DType::F64 => Some(Scalar::F64),
        DType::I8 => Some(Scalar::I8),
        DType::I16 => Some(Scalar::I16),
        DType::I32 => Some(Scalar::I32),
        DType::I64 => Some(Scalar::I64),
        DType::U8 => Some(Scalar::U8),
        DType::U16 => Some(Scalar::U16),
        DType::U32 => Some(Scalar::U32),
        DType::U64 => Some(Scalar::U64),
        DType::Bool => Some(Scalar::Bool),
        DType::F16 => Some(Scalar::F16),
        _ => None,
    }
}

/// Smallest and largest value of an integer scalar type, as i64 bit patterns (u64's max is
/// -1, which wraps to u64::MAX when stored).
pub fn int_limits(s: Scalar) -> (i64, i64) {
    match s {
        Scalar::I8 => (i8::MIN as i64, i8::MAX as i64),
        Scalar::I16 => (i16::MIN as i64, i16::MAX as i64),
        Scalar::I32 => (i32::MIN as i64, i32::MAX as i64),
        Scalar::U8 | Scalar::Bool => (0, u8::MAX as i64),
        Scalar::U16 => (0, u16::MAX as i64),
        Scalar::U32 => (0, u32::MAX as i64),
        Scalar::U64 => (0, -1),
        _ => (i64::MIN, i64::MAX),
    }
}

/// Right-aligned broadcast strides of `in_shape` inside `out_shape` (0 on broadcast dims).
pub fn broadcast_strides(in_shape: &[usize], out_shape: &[usize]) -> Vec<usize> {
    let st = strides(in_shape);
    let off = out_shape.len() - in_shape.len();
    (0..out_shape.len())
        .map(|d| {
            if d < off || in_shape[d - off] == 1 {
                0
            } else {
                st[d - off]
            }
        })
        .collect()
}

pub(crate) struct Lowerer<'g> {
    g: &'g Graph,
    p: Program,
    buf_of: HashMap<ValueId, usize>,
    /// f32 values that are a Cast of f16 data read only by matrix products, which widen the
    /// half bits themselves: value -> (the f16 value, whether it may hold inf/NaN).
    f16_widened: HashMap<ValueId, (ValueId, bool)>,
    opts: LowerOptions,
    /// Panel-packed copies of constant matrix operands: (constant, panel width, row stride,
    /// column stride) -> buffer.
    packed: HashMap<(ValueId, usize, usize, usize), usize>,
    /// Int8 quantizations of matrix-product inputs, shared by the products that read the same
    /// input in the same shape and block size (q/k/v, gate/up): (input buffer, rows, row
    /// length, block) -> buffers of codes, block scales and block code sums.
    quantized_inputs: HashMap<(usize, usize, usize, usize), [usize; 3]>,
}

pub(crate) type R<T> = Result<T, String>;

/// Lowers a statically shaped graph with the default [`LowerOptions`].
pub fn lower(g: &Graph) -> Result<Program, LowerError> {
    lower_with(g, &LowerOptions::default())
}

/// Lowers a statically shaped graph.
pub fn lower_with(g: &Graph, opts: &LowerOptions) -> Result<Program, LowerError> {
    let order = g.topo_order().map_err(|e| {
        LowerError::Unsupported(format!("cyclic graph through {}", e.nodes.join(", ")))
    })?;
    // All unsupported ops at once.
    let mut missing: BTreeMap<&'static str, usize> = BTreeMap::new();
    for &id in &order {
        if !supported(&g.nodes[id].op) {
            *missing.entry(g.nodes[id].op.onnx_name()).or_default() += 1;
        }
    }
    if !missing.is_empty() {
        let l: Vec<String> = missing
            .iter()
            .map(|(k, v)| format!("{k} ({v} nodes)"))
            .collect();
        return Err(LowerError::Unsupported(l.join(", ")));
    }
    let mut lw = Lowerer {
        g,
        p: Program::default(),
        buf_of: HashMap::new(),
        f16_widened: HashMap::new(),
        opts: *opts,
        packed: HashMap::new(),
        quantized_inputs: HashMap::new(),
    };
    for (i, &v) in g.inputs.iter().enumerate() {
        let (dtype, shape) = lw.static_type(v)?;
        let b = lw.new_buffer(&g.value(v).name, dtype, &shape, BufKind::Input(i))?;
        lw.buf_of.insert(v, b);
        lw.p.inputs.push(IoInfo {
            name: g.value(v).name.clone(),
            dtype,
            shape,
            buffer: b,
        });
    }
    // Output buffers are created up front; the node producing an output writes it directly
    // unless the output is also an input, a constant, or aliases another buffer.
    let mut out_bufs = Vec::new();
    for (i, &v) in g.outputs.iter().enumerate() {
        let (dtype, shape) = lw.static_type(v)?;
        let b = lw.new_buffer(&g.value(v).name, dtype, &shape, BufKind::Output(i))?;
        out_bufs.push(b);
        lw.p.outputs.push(IoInfo {
            name: g.value(v).name.clone(),
            dtype,
            shape,
            buffer: b,
        });
    }
    for &id in &order {
        let n = &g.nodes[id];
        lw.lower_node(n).map_err(|reason| LowerError::Node {
            node: n.name.clone(),
            op: n.op.onnx_name().into(),
            reason,
        })?;
    }
    // Outputs that were not written in place get a copy.
    for (i, &v) in g.outputs.iter().enumerate() {
        let src = lw.buffer(v).map_err(|r| LowerError::Node {
            node: "output".into(),
            op: "copy".into(),
            reason: r,
        })?;
        if src != out_bufs[i] {
            lw.push_copy(format!("copy_output_{i}"), src, out_bufs[i]);
        }
    }
    Ok(lw.p)
}

fn supported(op: &Op) -> bool {
    use Op::*;
    match op {
        Unary(u) => unary_expr(u, Expr::f32(0.0)).is_some(),
        Binary(_) => true,
        Variadic(_) | Where | Clip { .. } | Cast { .. } | CastLike { .. } | Identity | Dropout => {
            true
        }
        Reduce { .. } | ArgReduce { .. } | CumSum { .. } => true,
        Softmax { .. } => true,
        Trilu { .. } | GatherElements { .. } | Pad { .. } => true,
        MatMul | Gemm { .. } | MatMulNBits { .. } => true,
        LayerNorm { .. } | RmsNorm { .. } => true,
        Reshape { .. } | Squeeze { .. } | Unsqueeze { .. } | Flatten { .. } => true,
        Conv(_) | ConvTranspose { .. } | Pool(_) | GlobalPool(_) => conv::supported(op),
        Transpose { .. } | Concat { .. } | Split { .. } | Slice { .. } | Gather { .. } | Expand => {
            true
        }
        _ => false,
    }
}

/// Float expression of a unary op on `x` (None: not lowered).
fn unary_expr(u: &UnaryOp, x: Expr) -> Option<Expr> {
    use UnaryOp as U;
    let c = Expr::f32;
    Some(match *u {
        U::Abs => Expr::un(UnOp::Abs, x),
        U::Neg => Expr::un(UnOp::Neg, x),
        U::Exp => Expr::un(UnOp::Exp, x),
        U::Log => Expr::un(UnOp::Log, x),
        U::Sqrt => Expr::un(UnOp::Sqrt, x),
        U::Reciprocal => Expr::un(UnOp::Recip, x),
        U::Sigmoid => Expr::un(UnOp::Sigmoid, x),
        U::Tanh => Expr::un(UnOp::Tanh, x),
        U::Erf => Expr::un(UnOp::Erf, x),
        U::Floor => Expr::un(UnOp::Floor, x),
        U::Ceil => Expr::un(UnOp::Ceil, x),
        U::Sin => Expr::un(UnOp::Sin, x),
        U::Cos => Expr::un(UnOp::Cos, x),
        U::Not => Expr::un(UnOp::Not, x),
        U::Relu => Expr::max(x, c(0.0)),
        U::LeakyRelu { alpha } => Expr::select(
            Expr::cmp(CmpOp::Lt, x.clone(), c(0.0)),
            Expr::mul(c(alpha), x.clone()),
            x,
        ),
        U::HardSigmoid { alpha, beta } => Expr::min(
            Expr::max(Expr::add(Expr::mul(c(alpha), x), c(beta)), c(0.0)),
            c(1.0),
        ),
        U::HardSwish => Expr::mul(
            x.clone(),
            Expr::min(
                Expr::max(Expr::add(Expr::div(x, c(6.0)), c(0.5)), c(0.0)),
                c(1.0),
            ),
        ),
        U::Softsign => Expr::div(x.clone(), Expr::add(c(1.0), Expr::un(UnOp::Abs, x))),
        U::Softplus => Expr::un(UnOp::Log, Expr::add(c(1.0), Expr::un(UnOp::Exp, x))),
        U::Elu { alpha } => Expr::select(
            Expr::cmp(CmpOp::Lt, x.clone(), c(0.0)),
            Expr::mul(c(alpha), Expr::sub(Expr::un(UnOp::Exp, x.clone()), c(1.0))),
            x,
        ),
        U::Swish { alpha } => Expr::mul(x.clone(), Expr::un(UnOp::Sigmoid, Expr::mul(c(alpha), x))),
        U::Gelu {
            tanh_approximation: false,
        } => Expr::mul(
            Expr::mul(c(0.5), x.clone()),
            Expr::add(
                c(1.0),
                Expr::un(UnOp::Erf, Expr::mul(x, c(std::f32::consts::FRAC_1_SQRT_2))),
            ),
        ),
        U::Gelu {
            tanh_approximation: true,
        } => {
            let inner = Expr::mul(
                c((2.0f32 / std::f32::consts::PI).sqrt()),
                Expr::add(
                    x.clone(),
                    Expr::mul(
                        c(0.044715),
                        Expr::mul(x.clone(), Expr::mul(x.clone(), x.clone())),
                    ),
                ),
            );
            Expr::mul(
                Expr::mul(c(0.5), x),
                Expr::add(c(1.0), Expr::un(UnOp::Tanh, inner)),
            )
        }
        U::Round => Expr::un(UnOp::Round, x),
        U::Sign => Expr::select(
            Expr::cmp(CmpOp::Gt, x.clone(), c(0.0)),
            c(1.0),
            Expr::select(Expr::cmp(CmpOp::Lt, x.clone(), c(0.0)), c(-1.0), c(0.0)),
        ),
        U::IsNaN => Expr::un(UnOp::IsNaN, x),
        U::IsInf {
            detect_negative,
            detect_positive,
        } => {
            let pos = Expr::cmp(CmpOp::Eq, x.clone(), c(f32::INFINITY));
            let neg = Expr::cmp(CmpOp::Eq, x, c(f32::NEG_INFINITY));
            match (detect_positive, detect_negative) {
                (true, true) => Expr::bin(BinOp::Or, pos, neg),
                (true, false) => pos,
                (false, true) => neg,
                (false, false) => Expr::Const(Const::Bool(false)),
            }
        }
        U::Selu { alpha, gamma } => Expr::select(
            Expr::cmp(CmpOp::Le, x.clone(), c(0.0)),
            Expr::mul(
                c(gamma),
                Expr::sub(
                    Expr::mul(c(alpha), Expr::un(UnOp::Exp, x.clone())),
                    c(alpha),
                ),
            ),
            Expr::mul(c(gamma), x),
        ),
        U::ThresholdedRelu { alpha } => {
            Expr::select(Expr::cmp(CmpOp::Gt, x.clone(), c(alpha)), x, c(0.0))
        }
        U::Celu { alpha } => Expr::add(
            Expr::max(x.clone(), c(0.0)),
            Expr::min(
                c(0.0),
                Expr::mul(
                    c(alpha),
                    Expr::sub(Expr::un(UnOp::Exp, Expr::div(x, c(alpha))), c(1.0)),
                ),
            ),
        ),
        U::Shrink { bias, lambd } => Expr::select(
            Expr::cmp(CmpOp::Lt, x.clone(), c(-lambd)),
            Expr::add(x.clone(), c(bias)),
            Expr::select(
                Expr::cmp(CmpOp::Gt, x.clone(), c(lambd)),
                Expr::sub(x, c(bias)),
                c(0.0),
            ),
        ),
        U::Mish => Expr::mul(
            x.clone(),
            Expr::un(
                UnOp::Tanh,
                Expr::un(UnOp::Log, Expr::add(c(1.0), Expr::un(UnOp::Exp, x))),
            ),
        ),
        U::BitwiseNot => Expr::un(UnOp::Not, x),
        _ => return None,
    })
}

impl<'g> Lowerer<'g> {
    fn static_type(&self, v: ValueId) -> Result<(DType, Vec<usize>), LowerError> {
        let val = self.g.value(v);
        let shape = val
            .ty
            .static_shape()
            .ok_or_else(|| LowerError::NotStatic(val.name.clone()))?;
        let dtype = val
            .ty
            .dtype
            .ok_or_else(|| LowerError::NotStatic(val.name.clone()))?;
        Ok((dtype, shape))
    }

    fn new_buffer(
        &mut self,
        name: &str,
        dtype: DType,
        shape: &[usize],
        kind: BufKind,
    ) -> Result<usize, LowerError> {
        let scalar = scalar_of(dtype).ok_or_else(|| LowerError::DType {
            name: name.into(),
            dtype: dtype.to_string(),
        })?;
        self.p.buffers.push(Buffer {
            name: name.into(),
            scalar,
            len: shape.iter().product(),
            kind,
        });
        Ok(self.p.buffers.len() - 1)
    }

    /// The buffer holding value `v`, creating weight buffers for constants on first use.
    fn buffer(&mut self, v: ValueId) -> R<usize> {
        if let Some(&b) = self.buf_of.get(&v) {
            return Ok(b);
        }
        let val = self.g.value(v);
        match &val.def {
            ValueDef::Const(c) => {
                let scalar = scalar_of(c.dtype).ok_or_else(|| {
                    format!("constant '{}' has unsupported type {}", val.name, c.dtype)
                })?;
                // Bool constants are stored one byte per element, as ONNX raw data already is.
                let b = self.weight_buffer(val.name.clone(), scalar, c.numel(), c.bytes.to_vec());
                self.buf_of.insert(v, b);
                Ok(b)
            }
            _ => Err(format!(
                "value '{}' is used before it is computed",
                val.name
            )),
        }
    }

    fn shape(&self, v: ValueId) -> R<Vec<usize>> {
        self.g
            .value(v)
            .ty
            .static_shape()
            .ok_or_else(|| format!("'{}' has no static shape", self.g.value(v).name))
    }

    fn scalar(&self, v: ValueId) -> R<Scalar> {
        let d = self
            .g
            .value(v)
            .ty
            .dtype
            .ok_or_else(|| format!("'{}' has no type", self.g.value(v).name))?;
        scalar_of(d).ok_or_else(|| {
            format!(
                "'{}' has element type {d}, not supported by codegen yet",
                self.g.value(v).name
            )
        })
    }

    /// The buffer a node output is written to: the graph output buffer when the value is one.
    fn out_buffer(&mut self, v: ValueId) -> R<usize> {
        if let Some(i) = self.g.outputs.iter().position(|&o| o == v) {
            let b = self.p.outputs[i].buffer;
            self.buf_of.insert(v, b);
            return Ok(b);
        }
        let val = self.g.value(v);
        let scalar = self.scalar(v)?;
        let len = self.shape(v)?.iter().product();
        self.p.buffers.push(Buffer {
            name: val.name.clone(),
            scalar,
            len,
            kind: BufKind::Temp,
        });
        let b = self.p.buffers.len() - 1;
        self.buf_of.insert(v, b);
        Ok(b)
    }

    fn constant(&self, v: Option<ValueId>) -> Option<Tensor> {
        v.and_then(|v| self.g.constant(v)).map(|c| c.to_tensor())
    }

    fn ints_input(&self, n: &Node, i: usize) -> R<Option<Vec<i64>>> {
        match n.inputs.get(i).copied().flatten() {
            None => Ok(None),
            Some(v) => match self.g.constant(v) {
                Some(c) => Ok(Some(c.to_tensor().to_i64_vec())),
                None => Err(format!("input {i} must be a compile-time constant")),
            },
        }
    }

    fn lower_node(&mut self, n: &Node) -> R<()> {
        use Op::*;
        let inp = |i: usize| {
            n.inputs
                .get(i)
                .copied()
                .flatten()
                .ok_or_else(|| format!("missing input {i}"))
        };
        match &n.op {
            Reshape { .. }
            | Squeeze { .. }
            | Unsqueeze { .. }
            | Flatten { .. }
            | Identity
            | Dropout => {
                let src = self.buffer(inp(0)?)?;
                let out = n.outputs[0];
                if self.g.outputs.contains(&out)
                    || matches!(self.p.buffers[src].kind, BufKind::Input(_))
                        && self.g.outputs.contains(&out)
                {
                    // A graph output gets its own buffer: copy.
                    let dst = self.out_buffer(out)?;
                    self.copy(n, src, dst)?;
                } else {
                    self.buf_of.insert(out, src);
                }
                // Inference Dropout's optional mask output is all true.
                if let (Dropout, Some(&mask)) = (&n.op, n.outputs.get(1)) {
                    if !self.g.consumers(mask).is_empty() || self.g.outputs.contains(&mask) {
                        let b = self.out_buffer(mask)?;
                        let len = self.p.buffers[b].len;
                        let mut k = Kernel::new(format!("{}_mask", n.name));
                        let y = k.param("mask", Scalar::Bool, len, true);
                        k.body = nest(&mut k, &[len], |_, v| {
                            vec![Stmt::Store {
                                buf: y,
                                index: Expr::var(v[0]),
                                value: Expr::Const(Const::Bool(true)),
                            }]
                        });
                        self.p.steps.push(Step {
                            kernel: k,
                            args: vec![b],
                        });
                    }
                }
                Ok(())
            }
            Cast { .. } if self.widen_in_consumers(n)? => Ok(()),
            MatMulNBits {
                k,
                n: cols,
                bits,
                block_size,
                accuracy_level,
            } => self.matmul_nbits(n, *k, *cols, *bits, *block_size, *accuracy_level),
            Unary(_)
            | Binary(_)
            | Variadic(_)
            | Where
            | Clip { .. }
            | Cast { .. }
            | CastLike { .. } => self.elementwise(n),
            ArgReduce {
                max,
                axis,
                select_last_index,
                ..
            } => self.arg_reduce(n, *max, *axis, *select_last_index, None),
            Softmax {
                kind: SoftmaxKind::Hardmax,
                axis,
                coerce_2d,
            } => self.arg_reduce(n, true, *axis, false, Some(*coerce_2d)),
            CumSum { exclusive, reverse } => self.cumsum(n, *exclusive, *reverse),
            Trilu { upper } => self.trilu(n, *upper),
            GatherElements { axis } => self.gather_elements(n, *axis),
            Pad { mode, pads, value } => self.pad(n, *mode, pads.as_deref(), *value),
            MatMul => self.matmul(n, None),
            Gemm {
                alpha,
                beta,
                trans_a,
                trans_b,
            } => self.matmul(n, Some((*alpha, *beta, *trans_a, *trans_b))),
            Softmax {
                kind,
                axis,
                coerce_2d,
            } => self.softmax(n, *kind, *axis, *coerce_2d),
            Reduce {
                kind,
                axes,
                keepdims,
                noop_with_empty_axes,
            } => {
                let axes = match axes {
                    Some(a) => a.clone(),
                    None => self.ints_input(n, 1)?.unwrap_or_default(),
                };
                self.reduce(n, *kind, &axes, *keepdims, *noop_with_empty_axes)
            }
            LayerNorm { axis, epsilon } => self.norm(n, *axis, *epsilon, false),
            RmsNorm { axis, epsilon } => self.norm(n, *axis, *epsilon, true),
            Transpose { perm } => self.transpose(n, perm.as_deref()),
            Slice { attrs } => {
                let x = inp(0)?;
                let shape = self.shape(x)?;
                let g = match attrs {
                    Some(a) => slice_geometry(&shape, &a.starts, &a.ends, a.axes.as_deref(), None),
                    None => {
                        let starts = self.ints_input(n, 1)?.unwrap_or_default();
                        let ends = self.ints_input(n, 2)?.unwrap_or_default();
                        let axes = self.ints_input(n, 3)?;
                        let steps = self.ints_input(n, 4)?;
                        slice_geometry(&shape, &starts, &ends, axes.as_deref(), steps.as_deref())
                    }
                }
                .map_err(|e| e.0)?;
                let st = strides(&shape);
                let offset: i64 = g.start.iter().zip(&st).map(|(&s, &t)| s * t as i64).sum();
                let step_strides: Vec<i64> = g
                    .step
                    .iter()
                    .zip(&st)
                    .map(|(&s, &t)| s * t as i64)
                    .collect();
                self.remap(n, x, n.outputs[0], &g.count, &step_strides, offset)
            }
            Expand => {
                let x = inp(0)?;
                let out = self.shape(n.outputs[0])?;
                let bs: Vec<i64> = broadcast_strides(&self.shape(x)?, &out)
                    .iter()
                    .map(|&s| s as i64)
                    .collect();
                self.remap(n, x, n.outputs[0], &out, &bs, 0)
            }
            Concat { axis } => self.concat(n, *axis),
            Split { axis, .. } => self.split(n, *axis),
            Gather { axis } => self.gather(n, *axis),
            Conv(_) | ConvTranspose { .. } | Pool(_) | GlobalPool(_) => self.lower_windowed(n),
            other => Err(format!("no lowering for {}", other.onnx_name())),
        }
    }

    fn copy(&mut self, n: &Node, src: usize, dst: usize) -> R<()> {
        self.push_copy(format!("{}_copy", n.name), src, dst);
        Ok(())
    }

    /// A kernel copying buffer `src` into `dst` (same type and length).
    fn push_copy(&mut self, name: String, src: usize, dst: usize) {
        let b = &self.p.buffers[src];
        let (scalar, len) = (b.scalar, b.len);
        let mut k = Kernel::new(name);
        let x = k.param("src", scalar, len, false);
        let y = k.param("dst", scalar, len, true);
        k.body = nest(&mut k, &[len], |_, v| {
            vec![Stmt::Store {
                buf: y,
                index: Expr::var(v[0]),
                value: Expr::load(x, Expr::var(v[0])),
            }]
        });
        self.p.steps.push(Step {
            kernel: k,
            args: vec![src, dst],
        });
    }

    /// out[idx] = in[offset + sum(idx[d] * in_strides[d])] over `out_shape`.
    fn remap(
        &mut self,
        n: &Node,
        x: ValueId,
        out: ValueId,
        out_shape: &[usize],
        in_strides: &[i64],
        offset: i64,
    ) -> R<()> {
        let src = self.buffer(x)?;
        let dst = self.out_buffer(out)?;
        let scalar = self.p.buffers[src].scalar;
        let mut k = Kernel::new(&n.name);
        let xi = k.param("x", scalar, self.p.buffers[src].len, false);
        let yi = k.param("y", scalar, self.p.buffers[dst].len, true);
        let ost = strides(out_shape);
        k.body = nest(&mut k, out_shape, |_, v| {
            let mut ie = Expr::i64(offset);
            for (d, &s) in in_strides.iter().enumerate() {
                if s != 0 {
                    ie = Expr::add(ie, Expr::mul(Expr::var(v[d]), Expr::i64(s)));
                }
            }
            vec![Stmt::Store {
                buf: yi,
                index: index(v, &ost, 0),
                value: Expr::load(xi, ie),
            }]
        });
        self.p.steps.push(Step {
            kernel: k,
            args: vec![src, dst],
        });
        Ok(())
    }

    fn elementwise(&mut self, n: &Node) -> R<()> {
        let out = n.outputs[0];
        let out_shape = self.shape(out)?;
        let out_scalar = self.scalar(out)?;
        let mut k = Kernel::new(&n.name);
        let mut args = Vec::new();
        // Scalar constants are inlined into the expression; everything else is loaded.
        let mut operands: Vec<Operand> = Vec::new();
        for v in n.inputs.iter().flatten() {
            if let Some(c) = self.constant(Some(*v)).filter(|t| t.numel() == 1) {
                operands.push(Operand::Const(const_expr(&c)?));
                continue;
            }
            let b = self.buffer(*v)?;
            let p = k.param(
                &self.g.value(*v).name,
                self.p.buffers[b].scalar,
                self.p.buffers[b].len,
                false,
            );
            args.push(b);
            operands.push(Operand::Load(
                p,
                broadcast_strides(&self.shape(*v)?, &out_shape),
            ));
        }
        let in_scalars: Vec<Scalar> = n
            .inputs
            .iter()
            .flatten()
            .map(|&v| self.scalar(v))
            .collect::<R<_>>()?;
        let dst = self.out_buffer(out)?;
        let y = k.param("y", out_scalar, self.p.buffers[dst].len, true);
        args.push(dst);
        let present: Vec<bool> = n.inputs.iter().map(|i| i.is_some()).collect();
        let op = n.op.clone();
        let ost = strides(&out_shape);
        let mut failure = None;
        k.body = nest(&mut k, &out_shape, |_, v| {
            let ld = |i: usize| match &operands[i] {
                Operand::Load(p, st) => Expr::load(*p, index(v, st, 0)),
                Operand::Const(e) => e.clone(),
            };
            let value =
                match elementwise_expr(&op, &ld, operands.len(), &present, &in_scalars, out_scalar)
                {
                    Ok(e) => simplify_pow(e),
                    Err(e) => {
                        failure = Some(e);
                        Expr::f32(0.0)
                    }
                };
            vec![Stmt::Store {
                buf: y,
                index: index(v, &ost, 0),
                value,
            }]
        });
        if let Some(e) = failure {
            return Err(e);
        }
        self.p.steps.push(Step { kernel: k, args });
        Ok(())
    }

    fn matmul(&mut self, n: &Node, gemm: Option<(f32, f32, bool, bool)>) -> R<()> {
        let a = n.inputs[0].ok_or("missing A")?;
        let b = n.inputs.get(1).copied().flatten().ok_or("missing B")?;
        let (ash, bsh) = (self.shape(a)?, self.shape(b)?);
        if self.scalar(a)? != Scalar::F32 || self.scalar(b)? != Scalar::F32 {
            return Err("only f32 matrix products are lowered".into());
        }
        let out = n.outputs[0];
        let osh = self.shape(out)?;
        // Normalise to [batch..., M, K] x [batch..., K, N] with explicit element strides.
        let (m, kk, nn, a_rs, a_cs, b_rs, b_cs, batch, a_bs, b_bs);
        match gemm {
            Some((_, _, ta, tb)) => {
                let (am, ak) = if ta {
                    (ash[1], ash[0])
                } else {
                    (ash[0], ash[1])
                };
                let bn = if tb { bsh[0] } else { bsh[1] };
                m = am;
                kk = ak;
                nn = bn;
                (a_rs, a_cs) = if ta { (1, ash[1]) } else { (ash[1], 1) };
                (b_rs, b_cs) = if tb { (1, bsh[1]) } else { (bsh[1], 1) };
                batch = vec![];
                a_bs = vec![];
                b_bs = vec![];
            }
            None => {
                let a2: Vec<usize> = if ash.len() == 1 {
                    vec![1, ash[0]]
                } else {
                    ash.clone()
                };
                let b2: Vec<usize> = if bsh.len() == 1 {
                    vec![bsh[0], 1]
                } else {
                    bsh.clone()
                };
                m = a2[a2.len() - 2];
                kk = a2[a2.len() - 1];
                nn = b2[b2.len() - 1];
                (a_rs, a_cs) = (kk, 1);
                (b_rs, b_cs) = (nn, 1);
                let ab = &a2[..a2.len() - 2];
                let bb = &b2[..b2.len() - 2];
                batch =
                    kiln_compiler::interp::util::broadcast_shapes(&[ab, bb]).map_err(|e| e.0)?;
                a_bs = broadcast_strides(ab, &batch)
                    .iter()
                    .map(|s| s * m * kk)
                    .collect::<Vec<_>>();
                b_bs = broadcast_strides(bb, &batch)
                    .iter()
                    .map(|s| s * kk * nn)
                    .collect::<Vec<_>>();
            }
        }
        if b_bs.iter().all(|&s| s == 0) {
            // B is one matrix: with A's batch folded into rows (they are contiguous), a
            // constant B takes the panel-packed kernel.
            let (alpha, beta) = gemm.map_or((1.0, 1.0), |(al, be, _, _)| (al, be));
            let c = match (gemm, n.inputs.get(2).copied().flatten()) {
                (Some(_), Some(cv)) => {
                    let st = broadcast_strides(&self.shape(cv)?, &[m, nn]);
                    Some((cv, [st[0], st[1]]))
                }
                _ => None,
            };
            let product = packed::PackedProduct {
                m: m * batch.iter().product::<usize>(),
                k: kk,
                n: nn,
                a_rs,
                a_cs,
                b_rs,
                b_cs,
                alpha,
                beta,
                c,
            };
            if self.matmul_packed(n, &product)? {
                return Ok(());
            }
        }
        let mut k = Kernel::new(&n.name);
        let ab = self.buffer(a)?;
        // B may be f16 data widened in registers (see `quant::widen_in_consumers`).
        let widened = self.f16_widened.get(&b).copied();
        let bb = match widened {
            Some((half, _)) => self.buffer(half)?,
            None => self.buffer(b)?,
        };
        let mut args = vec![ab, bb];
        let ap = k.param("a", Scalar::F32, self.p.buffers[ab].len, false);
        let b_scalar = if widened.is_some() {
            Scalar::F16
        } else {
            Scalar::F32
        };
        let bp = k.param("b", b_scalar, self.p.buffers[bb].len, false);
        let b_value = |idx: Expr| match widened {
            Some((_, specials)) => quant::f16_to_f32(Expr::load(bp, idx), specials),
            None => Expr::load(bp, idx),
        };
        let c = match gemm {
            Some(_) => match n.inputs.get(2).copied().flatten() {
                Some(cv) => {
                    let cb = self.buffer(cv)?;
                    args.push(cb);
                    Some((
                        k.param("c", Scalar::F32, self.p.buffers[cb].len, false),
                        broadcast_strides(&self.shape(cv)?, &[m, nn]),
                    ))
                }
                None => None,
            },
            None => None,
        };
        let dst = self.out_buffer(out)?;
        args.push(dst);
        let yp = k.param("y", Scalar::F32, self.p.buffers[dst].len, true);
        // Register blocking over rows: each step of the reduction loads a vector of B once and
        // uses it for `rows` rows of A (one accumulator per row).
        let rows = row_tile(m, 8);
        let accs: Vec<VarId> = (0..rows).map(|_| k.new_var(Scalar::F32)).collect();
        let mut ext = batch.clone();
        ext.push(m / rows);
        ext.push(nn);
        debug_assert_eq!(
            ext.iter().product::<usize>() * rows,
            osh.iter().product::<usize>()
        );
        let nb = batch.len();
        let out_batch: Vec<usize> = strides(&batch).iter().map(|s| s * m * nn).collect();
        k.body = nest(&mut k, &ext, |k, v| {
            let (bv, io, j) = (&v[..nb], v[nb], v[nb + 1]);
            let p = k.new_var(Scalar::I64);
            let row = |r: usize| {
                Expr::add(
                    Expr::mul(Expr::var(io), Expr::i64(rows as i64)),
                    Expr::i64(r as i64),
                )
            };
            let b_idx = Expr::add(
                index(bv, &b_bs, 0),
                Expr::add(
                    Expr::mul(Expr::var(p), Expr::i64(b_rs as i64)),
                    Expr::mul(Expr::var(j), Expr::i64(b_cs as i64)),
                ),
            );
            // B[p, j] is loaded once per step into `bval` and used by every row.
            let bval = k.new_var(Scalar::F32);
            let terms: Vec<Expr> = (0..rows)
                .map(|r| {
                    let a_idx = Expr::add(
                        index(bv, &a_bs, 0),
                        Expr::add(
                            Expr::mul(row(r), Expr::i64(a_rs as i64)),
                            Expr::mul(Expr::var(p), Expr::i64(a_cs as i64)),
                        ),
                    );
                    Expr::mul(Expr::load(ap, a_idx), Expr::var(bval))
                })
                .collect();
            let mut s = blocked_sums(k, &accs, p, kk, &terms, &[(bval, b_value(b_idx))]);
            for (r, &acc) in accs.iter().enumerate() {
                let mut result = Expr::var(acc);
                if let Some((alpha, beta, _, _)) = gemm {
                    if alpha != 1.0 {
                        result = Expr::mul(Expr::f32(alpha), result);
                    }
                    if let Some((cp, cs)) = &c {
                        let c_idx = Expr::add(
                            Expr::mul(row(r), Expr::i64(cs[0] as i64)),
                            Expr::mul(Expr::var(j), Expr::i64(cs[1] as i64)),
                        );
                        let cv = Expr::load(*cp, c_idx);
                        result = Expr::add(
                            result,
                            if beta == 1.0 {
                                cv
                            } else {
                                Expr::mul(Expr::f32(beta), cv)
                            },
                        );
                    }
                }
                let out_idx = Expr::add(
                    index(bv, &out_batch, 0),
                    Expr::add(Expr::mul(row(r), Expr::i64(nn as i64)), Expr::var(j)),
                );
                s.push(Stmt::Store {
                    buf: yp,
                    index: out_idx,
                    value: result,
                });
            }
            s
        });
        self.p.steps.push(Step { kernel: k, args });
        Ok(())
    }

    fn softmax(&mut self, n: &Node, kind: SoftmaxKind, axis: i64, coerce_2d: bool) -> R<()> {
        let x = n.inputs[0].ok_or("missing input")?;
        let shape = self.shape(x)?;
        let a = kiln_compiler::interp::util::axis(axis, shape.len()).map_err(|e| e.0)?;
        let (outer, len, inner) = if coerce_2d {
            (shape[..a].iter().product(), shape[a..].iter().product(), 1)
        } else {
            kiln_compiler::interp::util::split_at_axis(&shape, a)
        };
        let src = self.buffer(x)?;
        let dst = self.out_buffer(n.outputs[0])?;
        let mut k = Kernel::new(&n.name);
        let xp = k.param("x", Scalar::F32, self.p.buffers[src].len, false);
        let yp = k.param("y", Scalar::F32, self.p.buffers[dst].len, true);
        let mx = k.new_var(Scalar::F32);
        let sum = k.new_var(Scalar::F32);
        k.body = nest(&mut k, &[outer, inner], |k, v| {
            let (o, i) = (v[0], v[1]);
            let at = |j: VarId| {
                Expr::add(
                    Expr::add(
                        Expr::mul(Expr::var(o), Expr::i64((len * inner) as i64)),
                        Expr::mul(Expr::var(j), Expr::i64(inner as i64)),
                    ),
                    Expr::var(i),
                )
            };
            let (j1, j2, j3) = (
                k.new_var(Scalar::I64),
                k.new_var(Scalar::I64),
                k.new_var(Scalar::I64),
            );
            let e = |j| Expr::un(UnOp::Exp, Expr::sub(Expr::load(xp, at(j)), Expr::var(mx)));
            let write = match kind {
                SoftmaxKind::LogSoftmax => Expr::sub(
                    Expr::sub(Expr::load(xp, at(j3)), Expr::var(mx)),
                    Expr::un(UnOp::Log, Expr::var(sum)),
                ),
                _ => Expr::mul(e(j3), Expr::un(UnOp::Recip, Expr::var(sum))),
            };
            vec![
                Stmt::Assign {
                    var: mx,
                    value: Expr::f32(f32::NEG_INFINITY),
                },
                Stmt::Loop {
                    var: j1,
                    extent: len,
                    kind: LoopKind::Serial,
                    body: vec![Stmt::Assign {
                        var: mx,
                        value: Expr::max(Expr::var(mx), Expr::load(xp, at(j1))),
                    }],
                },
                Stmt::Assign {
                    var: sum,
                    value: Expr::f32(0.0),
                },
                Stmt::Loop {
                    var: j2,
                    extent: len,
                    kind: LoopKind::Serial,
                    body: vec![Stmt::Assign {
                        var: sum,
                        value: Expr::add(Expr::var(sum), e(j2)),
                    }],
                },
                Stmt::Loop {
                    var: j3,
                    extent: len,
                    kind: LoopKind::Serial,
                    body: vec![Stmt::Store {
                        buf: yp,
                        index: at(j3),
                        value: write,
                    }],
                },
            ]
        });
        self.p.steps.push(Step {
            kernel: k,
            args: vec![src, dst],
        });
        Ok(())
    }

    fn reduce(
        &mut self,
        n: &Node,
        kind: ReduceKind,
        axes: &[i64],
        _keepdims: bool,
        noop: bool,
    ) -> R<()> {
        let x = n.inputs[0].ok_or("missing input")?;
        let shape = self.shape(x)?;
        let r = shape.len();
        if axes.is_empty() && noop {
            let src = self.buffer(x)?;
            let dst = self.out_buffer(n.outputs[0])?;
            return self.copy(n, src, dst);
        }
        let red: Vec<usize> = if axes.is_empty() {
            (0..r).collect()
        } else {
            axes.iter()
                .map(|&a| kiln_compiler::interp::util::axis(a, r).map_err(|e| e.0))
                .collect::<R<_>>()?
        };
        let scalar = self.scalar(x)?;
        let float = scalar.is_float();
        if scalar == Scalar::Bool && !matches!(kind, ReduceKind::Max | ReduceKind::Min) {
            return Err(format!("{kind:?} over bool is not lowered"));
        }
        if !float
            && !matches!(
                kind,
                ReduceKind::Sum
                    | ReduceKind::Max
                    | ReduceKind::Min
                    | ReduceKind::Prod
                    | ReduceKind::SumSquare
                    | ReduceKind::L1
            )
        {
            return Err(format!("{kind:?} is only lowered for f32"));
        }
        if scalar == Scalar::F64 && matches!(kind, ReduceKind::LogSum | ReduceKind::LogSumExp) {
            return Err(format!("{kind:?} is only lowered for f32"));
        }
        let kept: Vec<usize> = (0..r).filter(|d| !red.contains(d)).collect();
        let st = strides(&shape);
        let kept_ext: Vec<usize> = kept.iter().map(|&d| shape[d]).collect();
        let red_ext: Vec<usize> = red.iter().map(|&d| shape[d]).collect();
        let count: usize = red_ext.iter().product();
        let src = self.buffer(x)?;
        let dst = self.out_buffer(n.outputs[0])?;
        let mut k = Kernel::new(&n.name);
        let xp = k.param("x", scalar, self.p.buffers[src].len, false);
        let yp = k.param("y", scalar, self.p.buffers[dst].len, true);
        let acc = k.new_var(scalar);
        let sum = k.new_var(scalar);
        let kst = strides(&kept_ext);
        let (lo, hi) = int_limits(scalar);
        let init = match kind {
            ReduceKind::Max | ReduceKind::LogSumExp if float => Expr::f32(f32::NEG_INFINITY),
            ReduceKind::Min if float => Expr::f32(f32::INFINITY),
            ReduceKind::Max => Expr::i64(lo),
            ReduceKind::Min => Expr::i64(hi),
            ReduceKind::Prod => Expr::f32(1.0),
            _ => Expr::f32(0.0),
        };
        k.body = nest(&mut k, &kept_ext, |k, kv| {
            let kept_idx = index(kv, &kept.iter().map(|&d| st[d]).collect::<Vec<_>>(), 0);
            let red_st: Vec<usize> = red.iter().map(|&d| st[d]).collect();
            let load =
                |rv: &[VarId]| Expr::load(xp, Expr::add(kept_idx.clone(), index(rv, &red_st, 0)));
            let inner = nest(k, &red_ext, |_, rv| {
                let e = load(rv);
                let a = Expr::var(acc);
                let value = match kind {
                    ReduceKind::Sum | ReduceKind::Mean | ReduceKind::LogSum => {
                        Expr::bin(BinOp::Add, a, e)
                    }
                    ReduceKind::Max | ReduceKind::LogSumExp => Expr::max(a, e),
                    ReduceKind::Min => Expr::min(a, e),
                    ReduceKind::Prod => Expr::bin(BinOp::Mul, a, e),
                    ReduceKind::L1 => Expr::bin(BinOp::Add, a, Expr::un(UnOp::Abs, e)),
                    ReduceKind::L2 | ReduceKind::SumSquare => {
                        Expr::bin(BinOp::Add, a, Expr::bin(BinOp::Mul, e.clone(), e))
                    }
                };
                vec![Stmt::Assign { var: acc, value }]
            });
            let mut s = vec![Stmt::Assign {
                var: acc,
                value: init.clone(),
            }];
            s.extend(inner);
            let fin = match kind {
                ReduceKind::Mean => Expr::div(Expr::var(acc), Expr::f32(count as f32)),
                ReduceKind::L2 => Expr::un(UnOp::Sqrt, Expr::var(acc)),
                ReduceKind::LogSum => Expr::un(UnOp::Log, Expr::var(acc)),
                ReduceKind::LogSumExp => {
                    // log(sum(exp(x - max))) + max, with the max of the first pass.
                    s.push(Stmt::Assign {
                        var: sum,
                        value: Expr::f32(0.0),
                    });
                    let second = nest(k, &red_ext, |_, rv| {
                        let e = Expr::un(UnOp::Exp, Expr::sub(load(rv), Expr::var(acc)));
                        vec![Stmt::Assign {
                            var: sum,
                            value: Expr::add(Expr::var(sum), e),
                        }]
                    });
                    s.extend(second);
                    // An empty or all -inf reduction gives -inf (log 0), not NaN.
                    Expr::select(
                        Expr::cmp(CmpOp::Eq, Expr::var(acc), Expr::f32(f32::NEG_INFINITY)),
                        Expr::f32(f32::NEG_INFINITY),
                        Expr::add(Expr::var(acc), Expr::un(UnOp::Log, Expr::var(sum))),
                    )
                }
                _ => Expr::var(acc),
            };
            s.push(Stmt::Store {
                buf: yp,
                index: index(kv, &kst, 0),
                value: fin,
            });
            s
        });
        self.p.steps.push(Step {
            kernel: k,
            args: vec![src, dst],
        });
        Ok(())
    }

    fn norm(&mut self, n: &Node, axis: i64, eps: f32, rms: bool) -> R<()> {
        let x = n.inputs[0].ok_or("missing input")?;
        let shape = self.shape(x)?;
        let a = kiln_compiler::interp::util::axis(axis, shape.len()).map_err(|e| e.0)?;
        let outer: usize = shape[..a].iter().product();
        let norm_shape = &shape[a..];
        let len: usize = norm_shape.iter().product();
        // Optional Mean (output 1) and InvStdDev (output 2), when something reads them.
        let mut stats: Vec<(usize, usize)> = Vec::new(); // (which, buffer)
        for (which, &o) in n.outputs.iter().enumerate().skip(1) {
            if !self.g.consumers(o).is_empty() || self.g.outputs.contains(&o) {
                if self.scalar(o)? != Scalar::F32 {
                    return Err("LayerNormalization statistics are only lowered for f32".into());
                }
                stats.push((which, 0));
            }
        }
        let src = self.buffer(x)?;
        let sv = n.inputs.get(1).copied().flatten().ok_or("missing scale")?;
        let sb = self.buffer(sv)?;
        let s_st = broadcast_strides(&self.shape(sv)?, norm_shape);
        let bias = match n.inputs.get(2).copied().flatten() {
            Some(bv) => Some((
                self.buffer(bv)?,
                broadcast_strides(&self.shape(bv)?, norm_shape),
            )),
            None => None,
        };
        let dst = self.out_buffer(n.outputs[0])?;
        let mut k = Kernel::new(&n.name);
        let xp = k.param("x", Scalar::F32, self.p.buffers[src].len, false);
        let sp = k.param("scale", Scalar::F32, self.p.buffers[sb].len, false);
        let mut args = vec![src, sb];
        let bp = bias.as_ref().map(|(b, st)| {
            args.push(*b);
            (
                k.param("bias", Scalar::F32, self.p.buffers[*b].len, false),
                st.clone(),
            )
        });
        let yp = k.param("y", Scalar::F32, self.p.buffers[dst].len, true);
        args.push(dst);
        for st in stats.iter_mut() {
            let b = self.out_buffer(n.outputs[st.0])?;
            args.push(b);
            st.1 = k.param(
                if st.0 == 1 { "mean" } else { "inv_std_dev" },
                Scalar::F32,
                self.p.buffers[b].len,
                true,
            );
        }
        let (mean, var, inv) = (
            k.new_var(Scalar::F32),
            k.new_var(Scalar::F32),
            k.new_var(Scalar::F32),
        );
        let nst = strides(norm_shape);
        k.body = nest(&mut k, &[outer], |k, ov| {
            let base = Expr::mul(Expr::var(ov[0]), Expr::i64(len as i64));
            let j1 = k.new_var(Scalar::I64);
            let j2 = k.new_var(Scalar::I64);
            let at = |j: VarId| Expr::load(xp, Expr::add(base.clone(), Expr::var(j)));
            let centered = |j: VarId| {
                if rms {
                    at(j)
                } else {
                    Expr::sub(at(j), Expr::var(mean))
                }
            };
            let mut s = vec![Stmt::Assign {
                var: mean,
                value: Expr::f32(0.0),
            }];
            if !rms {
                s.push(Stmt::Loop {
                    var: j1,
                    extent: len,
                    kind: LoopKind::Serial,
                    body: vec![Stmt::Assign {
                        var: mean,
                        value: Expr::add(Expr::var(mean), at(j1)),
                    }],
                });
                s.push(Stmt::Assign {
                    var: mean,
                    value: Expr::div(Expr::var(mean), Expr::f32(len as f32)),
                });
            }
            s.push(Stmt::Assign {
                var,
                value: Expr::f32(0.0),
            });
            s.push(Stmt::Loop {
                var: j2,
                extent: len,
                kind: LoopKind::Serial,
                body: vec![Stmt::Assign {
                    var,
                    value: Expr::add(Expr::var(var), Expr::mul(centered(j2), centered(j2))),
                }],
            });
            s.push(Stmt::Assign {
                var: inv,
                value: Expr::un(
                    UnOp::Recip,
                    Expr::un(
                        UnOp::Sqrt,
                        Expr::add(
                            Expr::div(Expr::var(var), Expr::f32(len as f32)),
                            Expr::f32(eps),
                        ),
                    ),
                ),
            });
            // The write loop runs over the normalised dims so scale/bias can broadcast.
            let write = nest(k, norm_shape, |_, nv| {
                let flat = index(nv, &nst, 0);
                let xv = Expr::load(xp, Expr::add(base.clone(), flat.clone()));
                let c = if rms {
                    xv
                } else {
                    Expr::sub(xv, Expr::var(mean))
                };
                let mut y = Expr::mul(
                    Expr::mul(c, Expr::var(inv)),
                    Expr::load(sp, index(nv, &s_st, 0)),
                );
                if let Some((bp, bst)) = &bp {
                    y = Expr::add(y, Expr::load(*bp, index(nv, bst, 0)));
                }
                vec![Stmt::Store {
                    buf: yp,
                    index: Expr::add(base.clone(), flat),
                    value: y,
                }]
            });
            s.extend(write);
            for &(which, p) in &stats {
                let v = if which == 1 {
                    Expr::var(mean)
                } else {
                    Expr::var(inv)
                };
                s.push(Stmt::Store {
                    buf: p,
                    index: Expr::var(ov[0]),
                    value: v,
                });
            }
            s
        });
        self.p.steps.push(Step { kernel: k, args });
        Ok(())
    }

    fn transpose(&mut self, n: &Node, perm: Option<&[i64]>) -> R<()> {
        let x = n.inputs[0].ok_or("missing input")?;
        let shape = self.shape(x)?;
        let r = shape.len();
        let perm: Vec<usize> = match perm {
            Some(p) => p
                .iter()
                .map(|&a| kiln_compiler::interp::util::axis(a, r).map_err(|e| e.0))
                .collect::<R<_>>()?,
            None => (0..r).rev().collect(),
        };
        let st = strides(&shape);
        let out_shape: Vec<usize> = perm.iter().map(|&p| shape[p]).collect();
        let in_st: Vec<i64> = perm.iter().map(|&p| st[p] as i64).collect();
        self.remap(n, x, n.outputs[0], &out_shape, &in_st, 0)
    }

    fn concat(&mut self, n: &Node, axis: i64) -> R<()> {
        let out = n.outputs[0];
        let osh = self.shape(out)?;
        let a = kiln_compiler::interp::util::axis(axis, osh.len()).map_err(|e| e.0)?;
        let dst = self.out_buffer(out)?;
        let scalar = self.p.buffers[dst].scalar;
        let mut k = Kernel::new(&n.name);
        let mut args = Vec::new();
        let mut parts = Vec::new();
        for v in n.inputs.iter().flatten() {
            let b = self.buffer(*v)?;
            parts.push((
                k.param(&self.g.value(*v).name, scalar, self.p.buffers[b].len, false),
                self.shape(*v)?,
            ));
            args.push(b);
        }
        let yp = k.param("y", scalar, self.p.buffers[dst].len, true);
        args.push(dst);
        let ost = strides(&osh);
        let mut offset = 0usize;
        let mut body = Vec::new();
        for (p, shape) in parts {
            let ist = strides(&shape);
            let off = offset * ost[a];
            body.extend(nest(&mut k, &shape, |_, v| {
                vec![Stmt::Store {
                    buf: yp,
                    index: index(v, &ost, off),
                    value: Expr::load(p, index(v, &ist, 0)),
                }]
            }));
            offset += shape[a];
        }
        k.body = body;
        self.p.steps.push(Step { kernel: k, args });
        Ok(())
    }

    fn split(&mut self, n: &Node, axis: i64) -> R<()> {
        let x = n.inputs[0].ok_or("missing input")?;
        let shape = self.shape(x)?;
        let a = kiln_compiler::interp::util::axis(axis, shape.len()).map_err(|e| e.0)?;
        let st = strides(&shape);
        let mut offset = 0usize;
        for &o in &n.outputs {
            let osh = self.shape(o)?;
            let in_st: Vec<i64> = st.iter().map(|&s| s as i64).collect();
            if !self.g.consumers(o).is_empty() || self.g.outputs.contains(&o) {
                self.remap(n, x, o, &osh, &in_st, (offset * st[a]) as i64)?;
            }
            offset += osh[a];
        }
        Ok(())
    }

    fn gather(&mut self, n: &Node, axis: i64) -> R<()> {
        let x = n.inputs[0].ok_or("missing data")?;
        let iv = n
            .inputs
            .get(1)
            .copied()
            .flatten()
            .ok_or("missing indices")?;
        let shape = self.shape(x)?;
        let ish = self.shape(iv)?;
        let a = kiln_compiler::interp::util::axis(axis, shape.len()).map_err(|e| e.0)?;
        let (outer, dim, inner) = kiln_compiler::interp::util::split_at_axis(&shape, a);
        let n_idx: usize = ish.iter().product();
        // A table that matrix products read packed (a tied embedding) is read packed here too.
        let packed = self.packed_table(x)?;
        let src = match packed {
            Some((b, _)) => b,
            None => self.buffer(x)?,
        };
        let layout = packed.map(|(_, l)| l);
        let ib = self.buffer(iv)?;
        let iscalar = self.p.buffers[ib].scalar;
        let dst = self.out_buffer(n.outputs[0])?;
        let scalar = self.p.buffers[src].scalar;
        let mut k = Kernel::new(&n.name);
        let xp = k.param("data", scalar, self.p.buffers[src].len, false);
        let ip = k.param("indices", iscalar, self.p.buffers[ib].len, false);
        let yp = k.param("y", scalar, self.p.buffers[dst].len, true);
        let idx = k.new_var(Scalar::I64);
        k.body = nest(&mut k, &[outer, n_idx, inner], |_, v| {
            let (o, t, i) = (v[0], v[1], v[2]);
            let raw = Expr::cast(Scalar::I64, Expr::load(ip, Expr::var(t)));
            // Negative indices count from the end; out-of-range ones are clamped so that the
            // kernel never reads outside the table.
            let norm = Expr::select(
                Expr::cmp(CmpOp::Lt, Expr::var(idx), Expr::i64(0)),
                Expr::add(Expr::var(idx), Expr::i64(dim as i64)),
                Expr::var(idx),
            );
            let clamped = Expr::max(Expr::min(norm, Expr::i64(dim as i64 - 1)), Expr::i64(0));
            let mut src_idx = Expr::add(
                Expr::add(
                    Expr::mul(Expr::var(o), Expr::i64((dim * inner) as i64)),
                    Expr::mul(Expr::var(idx), Expr::i64(inner as i64)),
                ),
                Expr::var(i),
            );
            if let Some(l) = layout {
                src_idx = packed::packed_position(src_idx, l);
            }
            let dst_idx = Expr::add(
                Expr::mul(
                    Expr::add(
                        Expr::mul(Expr::var(o), Expr::i64(n_idx as i64)),
                        Expr::var(t),
                    ),
                    Expr::i64(inner as i64),
                ),
                Expr::var(i),
            );
            vec![
                Stmt::Assign {
                    var: idx,
                    value: raw,
                },
                Stmt::Assign {
                    var: idx,
                    value: clamped,
                },
                Stmt::Store {
                    buf: yp,
                    index: dst_idx,
                    value: Expr::load(xp, src_idx),
                },
            ]
        });
        self.p.steps.push(Step {
            kernel: k,
            args: vec![src, ib, dst],
        });
        Ok(())
    }
}

/// Rows of a register tile over `m` rows: the largest power of two up to `max` that divides
/// `m`, so that whole tiles cover the rows.
pub(crate) fn row_tile(m: usize, max: usize) -> usize {
    (0..=max.max(1).ilog2())
        .rev()
        .map(|e| 1usize << e)
        .find(|r| m.is_multiple_of(*r))
        .unwrap_or(1)
}

/// Block length of [`blocked_sum`].
pub(super) const SUM_BLOCK: usize = 64;

/// `acc = sum over var in 0..extent of term`, summed in blocks of [`SUM_BLOCK`] terms whose
/// partial sums are then added: the rounding error grows with about extent/64 + 64 terms
/// instead of `extent`, which keeps long dot products within the reference tolerance.
fn blocked_sum(k: &mut Kernel, acc: VarId, var: VarId, extent: usize, term: Expr) -> Vec<Stmt> {
    blocked_sums(k, &[acc], var, extent, &[term], &[])
}

/// [`blocked_sum`] for several sums over the same loop at once (`accs[r] = sum terms[r]`),
/// sharing the loops. `shared` locals are assigned at the start of every step (before the
/// terms, which may read them): a register-blocked kernel loads what its terms share once.
pub(crate) fn blocked_sums(
    k: &mut Kernel,
    accs: &[VarId],
    var: VarId,
    extent: usize,
    terms: &[Expr],
    shared: &[(VarId, Expr)],
) -> Vec<Stmt> {
    let add = |a: VarId, e: Expr| Stmt::Assign {
        var: a,
        value: Expr::add(Expr::var(a), e),
    };
    let zero = |a: VarId| Stmt::Assign {
        var: a,
        value: Expr::f32(0.0),
    };
    let step = |at: &Expr, parts: &[VarId]| -> Vec<Stmt> {
        let mut b: Vec<Stmt> = shared
            .iter()
            .map(|(v, e)| Stmt::Assign {
                var: *v,
                value: e.substitute(var, at),
            })
            .collect();
        b.extend(
            parts
                .iter()
                .zip(terms)
                .map(|(&p, t)| add(p, t.substitute(var, at))),
        );
        b
    };
    let mut s: Vec<Stmt> = accs.iter().map(|&a| zero(a)).collect();
    if extent <= SUM_BLOCK {
        s.push(Stmt::Loop {
            var,
            extent,
            kind: LoopKind::Serial,
            body: step(&Expr::var(var), accs),
        });
        return s;
    }
    let parts: Vec<VarId> = accs.iter().map(|_| k.new_var(Scalar::F32)).collect();
    let blk = k.new_var(Scalar::I64);
    let inner = k.new_var(Scalar::I64);
    let blocks = extent / SUM_BLOCK;
    // var = blk * 64 + inner inside the blocks, then blocks * 64 + var in the tail.
    let at = Expr::add(
        Expr::mul(Expr::var(blk), Expr::i64(SUM_BLOCK as i64)),
        Expr::var(inner),
    );
    let mut body: Vec<Stmt> = parts.iter().map(|&p| zero(p)).collect();
    body.push(Stmt::Loop {
        var: inner,
        extent: SUM_BLOCK,
        kind: LoopKind::Serial,
        body: step(&at, &parts),
    });
    body.extend(accs.iter().zip(&parts).map(|(&a, &p)| add(a, Expr::var(p))));
    s.push(Stmt::Loop {
        var: blk,
        extent: blocks,
        kind: LoopKind::Serial,
        body,
    });
    let tail = extent - blocks * SUM_BLOCK;
    if tail > 0 {
        let shifted = Expr::add(Expr::i64((blocks * SUM_BLOCK) as i64), Expr::var(var));
        s.extend(parts.iter().map(|&p| zero(p)));
        s.push(Stmt::Loop {
            var,
            extent: tail,
            kind: LoopKind::Serial,
            body: step(&shifted, &parts),
        });
        s.extend(accs.iter().zip(&parts).map(|(&a, &p)| add(a, Expr::var(p))));
    }
    s
}

enum Operand {
    Load(usize, Vec<usize>),
    Const(Expr),
}

pub(super) fn const_expr(t: &Tensor) -> R<Expr> {
    let v = t.to_f64_vec()[0];
    Ok(Expr::Const(match t.dtype() {
        DType::F32 => Const::F32(v as f32),
        DType::I64 => Const::I64(t.to_i64_vec()[0]),
        DType::I32 => Const::I32(t.to_i64_vec()[0] as i32),
        DType::Bool => Const::Bool(v != 0.0),
        d => return Err(format!("constant of type {d} is not supported by codegen")),
    }))
}

/// `Pow(x, c)` with a small integer or half-integer constant exponent becomes multiplications
/// (and a square root), which is exact for negative bases where exp(c log x) is not.
fn simplify_pow(e: Expr) -> Expr {
    if let Expr::Bin {
        op: BinOp::Pow,
        a,
        b,
    } = &e
    {
        if let Expr::Const(Const::F32(c)) = **b {
            let x = (**a).clone();
            let sq = || Expr::mul(x.clone(), x.clone());
            return match c {
                1.0 => x,
                2.0 => sq(),
                3.0 => Expr::mul(sq(), x.clone()),
                4.0 => Expr::mul(sq(), sq()),
                0.5 => Expr::un(UnOp::Sqrt, x),
                -1.0 => Expr::un(UnOp::Recip, x),
                -0.5 => Expr::un(UnOp::Recip, Expr::un(UnOp::Sqrt, x)),
                0.0 => Expr::f32(1.0),
                _ => e,
            };
        }
    }
    e
}

/// The value expression of an elementwise node given loads of its present inputs.
fn elementwise_expr(
    op: &Op,
    ld: &dyn Fn(usize) -> Expr,
    n_in: usize,
    present: &[bool],
    in_scalars: &[Scalar],
    out: Scalar,
) -> R<Expr> {
    let float = in_scalars.first().is_some_and(|s| s.is_float());
    Ok(match op {
        Op::Unary(u) => {
            let int_ok = matches!(
                u,
                UnaryOp::Neg
                    | UnaryOp::Abs
                    | UnaryOp::Relu
                    | UnaryOp::Not
                    | UnaryOp::BitwiseNot
                    | UnaryOp::Sign
            );
            if !float && !int_ok {
                return Err(format!("{u:?} is only lowered for f32"));
            }
            unary_expr(u, ld(0)).ok_or_else(|| format!("{u:?} has no lowering"))?
        }
        Op::Binary(b) => {
            let (x, y) = (ld(0), ld(1));
            match b {
                BinaryOp::Add => Expr::bin(BinOp::Add, x, y),
                BinaryOp::Sub => Expr::bin(BinOp::Sub, x, y),
                BinaryOp::Mul => Expr::bin(BinOp::Mul, x, y),
                BinaryOp::Div => Expr::bin(BinOp::Div, x, y),
                BinaryOp::Pow => {
                    if in_scalars.get(1) != Some(&Scalar::F32) || !float {
                        return Err("Pow is only lowered for f32".into());
                    }
                    Expr::bin(BinOp::Pow, x, y)
                }
                BinaryOp::Mod { fmod } => {
                    if float && !fmod {
                        return Err("Mod with fmod=0 is only defined for integers".into());
                    }
                    let r = Expr::bin(BinOp::Rem, x, y.clone());
                    if *fmod || float {
                        r
                    } else {
                        // Python-style: the result takes the divisor's sign.
                        let zero = Expr::Const(if out == Scalar::I32 {
                            Const::I32(0)
                        } else {
                            Const::I64(0)
                        });
                        let adjust = Expr::bin(
                            BinOp::And,
                            Expr::cmp(CmpOp::Ne, r.clone(), zero.clone()),
                            Expr::cmp(
                                CmpOp::Ne,
                                Expr::cmp(CmpOp::Lt, r.clone(), zero.clone()),
                                Expr::cmp(CmpOp::Lt, y.clone(), zero),
                            ),
                        );
                        Expr::select(adjust, Expr::bin(BinOp::Add, r.clone(), y), r)
                    }
                }
                BinaryOp::Equal => Expr::cmp(CmpOp::Eq, x, y),
                BinaryOp::Less => Expr::cmp(CmpOp::Lt, x, y),
                BinaryOp::LessOrEqual => Expr::cmp(CmpOp::Le, x, y),
                BinaryOp::Greater => Expr::cmp(CmpOp::Gt, x, y),
                BinaryOp::GreaterOrEqual => Expr::cmp(CmpOp::Ge, x, y),
                BinaryOp::And => Expr::bin(BinOp::And, x, y),
                BinaryOp::Or => Expr::bin(BinOp::Or, x, y),
                BinaryOp::Xor => Expr::bin(BinOp::Xor, x, y),
                BinaryOp::BitwiseAnd => Expr::bin(BinOp::And, x, y),
                BinaryOp::BitwiseOr => Expr::bin(BinOp::Or, x, y),
                BinaryOp::BitwiseXor => Expr::bin(BinOp::Xor, x, y),
                BinaryOp::BitShiftLeft => Expr::bin(BinOp::Shl, x, y),
                BinaryOp::BitShiftRight => Expr::bin(BinOp::Shr, x, y),
                BinaryOp::PRelu => Expr::select(
                    Expr::cmp(CmpOp::Lt, x.clone(), Expr::f32(0.0)),
                    Expr::mul(x.clone(), y),
                    x,
                ),
            }
        }
        Op::Variadic(v) => {
            let mut e = ld(0);
            for i in 1..n_in {
                e = match v {
                    VariadicOp::Sum | VariadicOp::Mean => Expr::bin(BinOp::Add, e, ld(i)),
                    VariadicOp::Max => Expr::bin(BinOp::Max, e, ld(i)),
                    VariadicOp::Min => Expr::bin(BinOp::Min, e, ld(i)),
                };
            }
            if *v == VariadicOp::Mean {
                if !float {
                    return Err("integer Mean has no lowering".into());
                }
                e = Expr::div(e, Expr::f32(n_in as f32));
            }
            e
        }
        Op::Where => Expr::select(
            Expr::cmp(CmpOp::Ne, ld(0), Expr::Const(Const::Bool(false))),
            ld(1),
            ld(2),
        ),
        Op::Clip { min, max } => {
            // Bounds: attributes (opset < 11) or inputs 1 and 2 (each optional).
            let mut e = ld(0);
            let mut next = 1;
            let lo = match min {
                Some(m) => Some(Expr::f32(*m)),
                None if present.get(1) == Some(&true) => {
                    next += 1;
                    Some(ld(1))
                }
                None => None,
            };
            let hi = match max {
                Some(m) => Some(Expr::f32(*m)),
                None if present.get(2) == Some(&true) => Some(ld(next)),
                None => None,
            };
            if let Some(l) = lo {
                e = Expr::max(e, l);
            }
            if let Some(h) = hi {
                e = Expr::min(e, h);
            }
            e
        }
        Op::Cast { .. } | Op::CastLike { .. } if in_scalars.first() == Some(&Scalar::F16) => {
            let wide = quant::f16_to_f32(ld(0), true);
            if out == Scalar::F32 {
                wide
            } else {
                Expr::cast(out, wide)
            }
        }
        Op::Cast { .. } | Op::CastLike { .. } => Expr::cast(out, ld(0)),
        other => return Err(format!("{} is not elementwise", other.onnx_name())),
    })
}
