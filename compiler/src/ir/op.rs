//! The operator set of the graph IR: one Rust enum with typed attributes, normalised at import
//! so that later stages never look at attribute strings or opset numbers. Where an ONNX op moved
//! an attribute into an input across opset versions (Reduce axes, Split sizes, Slice bounds,
//! Squeeze axes, Clip bounds, Pad pads, TopK k), the attribute form is `Some(..)` and the input
//! form is `None`, so both versions keep their meaning.

use crate::dtype::DType;
use crate::tensor::Tensor;

#[derive(Clone, Debug, PartialEq)]
pub enum UnaryOp {
    Abs,
    Neg,
    Exp,
    Log,
    Sqrt,
    Reciprocal,
    Sigmoid,
    Tanh,
    Erf,
    Floor,
    Ceil,
    Round,
    Sign,
    Sin,
    Cos,
    Tan,
    Asin,
    Acos,
    Atan,
    Sinh,
    Cosh,
    Asinh,
    Acosh,
    Atanh,
    Relu,
    Softplus,
    Softsign,
    Mish,
    HardSwish,
    Not,
    BitwiseNot,
    IsNaN,
    IsInf {
        detect_negative: bool,
        detect_positive: bool,
    },
    LeakyRelu {
        alpha: f32,
    },
    Elu {
        alpha: f32,
    },
    Selu {
        alpha: f32,
        gamma: f32,
    },
    Celu {
        alpha: f32,
    },
    ThresholdedRelu {
        alpha: f32,
    },
    HardSigmoid {
        alpha: f32,
        beta: f32,
    },
    Gelu {
        tanh_approximation: bool,
    },
    Shrink {
        bias: f32,
        lambd: f32,
    },
    Swish {
        alpha: f32,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BinaryOp {
    Add,
    Sub,
    Mul,
    Div,
    Pow,
    /// `Mod` with `fmod=0` (sign of the divisor, integers only per spec) or `fmod=1` (C fmod).
    Mod {
        fmod: bool,
    },
    Equal,
    Less,
    LessOrEqual,
    Greater,
    GreaterOrEqual,
    And,
    Or,
    Xor,
    BitwiseAnd,
    BitwiseOr,
    BitwiseXor,
    BitShiftLeft,
    BitShiftRight,
    PRelu,
}

impl BinaryOp {
    /// Comparison and logic ops produce booleans.
    pub fn is_predicate(self) -> bool {
        matches!(
            self,
            BinaryOp::Equal
                | BinaryOp::Less
                | BinaryOp::LessOrEqual
                | BinaryOp::Greater
                | BinaryOp::GreaterOrEqual
                | BinaryOp::And
                | BinaryOp::Or
                | BinaryOp::Xor
        )
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VariadicOp {
    Sum,
    Mean,
    Max,
    Min,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReduceKind {
    Sum,
    Mean,
    Max,
    Min,
    Prod,
    L1,
    L2,
    LogSum,
    LogSumExp,
    SumSquare,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SoftmaxKind {
    Softmax,
    LogSoftmax,
    Hardmax,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AutoPad {
    NotSet,
    SameUpper,
    SameLower,
    Valid,
}

/// Attributes shared by Conv, ConvTranspose and the pooling ops. Empty vectors mean "default
/// for the spatial rank" (ones for strides and dilations, zeros for pads, from the weight for
/// kernel_shape).
#[derive(Clone, Debug, PartialEq)]
pub struct ConvAttrs {
    pub auto_pad: AutoPad,
    pub dilations: Vec<usize>,
    pub group: usize,
    pub kernel_shape: Vec<usize>,
    pub pads: Vec<usize>,
    pub strides: Vec<usize>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PoolKind {
    Max,
    Average { count_include_pad: bool },
    Lp { p: i64 },
}

#[derive(Clone, Debug, PartialEq)]
pub struct PoolAttrs {
    pub kind: PoolKind,
    pub window: ConvAttrs,
    pub ceil_mode: bool,
    pub storage_order: i64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScatterReduction {
    None,
    Add,
    Mul,
    Max,
    Min,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PadMode {
    Constant,
    Reflect,
    Edge,
    Wrap,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResizeMode {
    Nearest,
    Linear,
    Cubic,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CoordinateTransform {
    HalfPixel,
    HalfPixelSymmetric,
    PytorchHalfPixel,
    AlignCorners,
    Asymmetric,
    TfCropAndResize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NearestRounding {
    RoundPreferFloor,
    RoundPreferCeil,
    Floor,
    Ceil,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeepAspectRatio {
    Stretch,
    NotLarger,
    NotSmaller,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ResizeAttrs {
    pub mode: ResizeMode,
    pub coordinate_transform: CoordinateTransform,
    pub nearest_mode: NearestRounding,
    pub cubic_coeff_a: f32,
    pub exclude_outside: bool,
    pub extrapolation_value: f32,
    pub antialias: bool,
    pub axes: Option<Vec<i64>>,
    pub keep_aspect_ratio: KeepAspectRatio,
    /// Opset 10 Resize and Upsample take scales as input 1 (no roi input).
    pub scales_input: usize,
}

/// Opset < 10 Slice bounds (attributes).
#[derive(Clone, Debug, PartialEq)]
pub struct SliceAttrs {
    pub starts: Vec<i64>,
    pub ends: Vec<i64>,
    pub axes: Option<Vec<i64>>,
}

/// A graph operator with its typed attributes. Optional ONNX inputs are positional
/// (`Node::inputs` holds `None` for an omitted one).
#[derive(Clone, Debug, PartialEq)]
pub enum Op {
    // ---- elementwise
    Unary(UnaryOp),
    Binary(BinaryOp),
    Variadic(VariadicOp),
    Where,
    /// Opset < 11 bounds are attributes; from 11 they are optional inputs 1 and 2.
    Clip {
        min: Option<f32>,
        max: Option<f32>,
    },
    Cast {
        to: DType,
        saturate: bool,
    },
    CastLike {
        saturate: bool,
    },
    Identity,
    /// Inference-mode Dropout: copies its input; the optional mask output is all true.
    Dropout,
    // ---- reductions and scans
    Reduce {
        kind: ReduceKind,
        axes: Option<Vec<i64>>,
        keepdims: bool,
        noop_with_empty_axes: bool,
    },
    ArgReduce {
        max: bool,
        axis: i64,
        keepdims: bool,
        select_last_index: bool,
    },
    /// `coerce_2d`: opset < 13 semantics (flatten to 2-D at `axis`).
    Softmax {
        kind: SoftmaxKind,
        axis: i64,
        coerce_2d: bool,
    },
    CumSum {
        exclusive: bool,
        reverse: bool,
    },
    TopK {
        axis: i64,
        largest: bool,
        sorted: bool,
        k: Option<i64>,
    },
    // ---- linear algebra and convolution
    MatMul,
    Gemm {
        alpha: f32,
        beta: f32,
        trans_a: bool,
        trans_b: bool,
    },
    MatMulInteger,
    /// com.microsoft MatMulNBits: B is packed `bits`-bit [N, K/block, block*bits/8].
    /// `accuracy_level` 4 asks for int8 activations (see [`int8_activations`]); other levels
    /// compute in f32.
    MatMulNBits {
        k: usize,
        n: usize,
        bits: usize,
        block_size: usize,
        accuracy_level: usize,
    },
    Conv(ConvAttrs),
    ConvTranspose {
        conv: ConvAttrs,
        output_padding: Vec<usize>,
        output_shape: Vec<usize>,
    },
    Pool(PoolAttrs),
    GlobalPool(PoolKind),
    // ---- normalization
    BatchNorm {
        epsilon: f32,
    },
    LayerNorm {
        axis: i64,
        epsilon: f32,
    },
    RmsNorm {
        axis: i64,
        epsilon: f32,
    },
    InstanceNorm {
        epsilon: f32,
    },
    GroupNorm {
        epsilon: f32,
        num_groups: usize,
    },
    LpNorm {
        axis: i64,
        p: i64,
    },
    // ---- shapes and data movement
    Reshape {
        allowzero: bool,
    },
    Transpose {
        perm: Option<Vec<i64>>,
    },
    Concat {
        axis: i64,
    },
    Split {
        axis: i64,
        split: Option<Vec<i64>>,
        num_outputs: Option<usize>,
    },
    /// Opset < 10 bounds are attributes (`starts`, `ends`, `axes`).
    Slice {
        attrs: Option<SliceAttrs>,
    },
    Gather {
        axis: i64,
    },
    GatherElements {
        axis: i64,
    },
    GatherND {
        batch_dims: usize,
    },
    ScatterElements {
        axis: i64,
        reduction: ScatterReduction,
    },
    ScatterND {
        reduction: ScatterReduction,
    },
    Expand,
    Squeeze {
        axes: Option<Vec<i64>>,
    },
    Unsqueeze {
        axes: Option<Vec<i64>>,
    },
    Flatten {
        axis: i64,
    },
    Shape {
        start: i64,
        end: Option<i64>,
    },
    Size,
    ConstantOfShape {
        value: Tensor,
    },
    Range,
    Tile,
    Pad {
        mode: PadMode,
        pads: Option<Vec<i64>>,
        value: f32,
    },
    Resize(ResizeAttrs),
    DepthToSpace {
        blocksize: usize,
        crd: bool,
    },
    SpaceToDepth {
        blocksize: usize,
    },
    Trilu {
        upper: bool,
    },
    OneHot {
        axis: i64,
    },
    NonZero,
    EyeLike {
        dtype: Option<DType>,
        k: i64,
    },
    Compress {
        axis: Option<i64>,
    },
    ReverseSequence {
        batch_axis: usize,
        time_axis: usize,
    },
    // ---- quantization
    DequantizeLinear {
        axis: i64,
        block_size: usize,
    },
    QuantizeLinear {
        axis: i64,
        block_size: usize,
        saturate: bool,
        output_dtype: Option<DType>,
    },
    DynamicQuantizeLinear,
}

impl Op {
    /// The ONNX operator type this op was imported from (or is exported as).
    pub fn onnx_name(&self) -> &'static str {
        match self {
            Op::Unary(u) => match u {
                UnaryOp::Abs => "Abs",
                UnaryOp::Neg => "Neg",
                UnaryOp::Exp => "Exp",
                UnaryOp::Log => "Log",
                UnaryOp::Sqrt => "Sqrt",
                UnaryOp::Reciprocal => "Reciprocal",
                UnaryOp::Sigmoid => "Sigmoid",
                UnaryOp::Tanh => "Tanh",
                UnaryOp::Erf => "Erf",
                UnaryOp::Floor => "Floor",
                UnaryOp::Ceil => "Ceil",
                UnaryOp::Round => "Round",
                UnaryOp::Sign => "Sign",
                UnaryOp::Sin => "Sin",
                UnaryOp::Cos => "Cos",
                UnaryOp::Tan => "Tan",
                UnaryOp::Asin => "Asin",
                UnaryOp::Acos => "Acos",
                UnaryOp::Atan => "Atan",
                UnaryOp::Sinh => "Sinh",
                UnaryOp::Cosh => "Cosh",
                UnaryOp::Asinh => "Asinh",
                UnaryOp::Acosh => "Acosh",
                UnaryOp::Atanh => "Atanh",
                UnaryOp::Relu => "Relu",
                UnaryOp::Softplus => "Softplus",
                UnaryOp::Softsign => "Softsign",
                UnaryOp::Mish => "Mish",
                UnaryOp::HardSwish => "HardSwish",
                UnaryOp::Not => "Not",
                UnaryOp::BitwiseNot => "BitwiseNot",
                UnaryOp::IsNaN => "IsNaN",
                UnaryOp::IsInf { .. } => "IsInf",
                UnaryOp::LeakyRelu { .. } => "LeakyRelu",
                UnaryOp::Elu { .. } => "Elu",
                UnaryOp::Selu { .. } => "Selu",
                UnaryOp::Celu { .. } => "Celu",
                UnaryOp::ThresholdedRelu { .. } => "ThresholdedRelu",
                UnaryOp::HardSigmoid { .. } => "HardSigmoid",
                UnaryOp::Gelu { .. } => "Gelu",
                UnaryOp::Shrink { .. } => "Shrink",
                UnaryOp::Swish { .. } => "Swish",
            },
            Op::Binary(b) => match b {
                BinaryOp::Add => "Add",
                BinaryOp::Sub => "Sub",
                BinaryOp::Mul => "Mul",
                BinaryOp::Div => "Div",
                BinaryOp::Pow => "Pow",
                BinaryOp::Mod { .. } => "Mod",
                BinaryOp::Equal => "Equal",
                BinaryOp::Less => "Less",
                BinaryOp::LessOrEqual => "LessOrEqual",
                BinaryOp::Greater => "Greater",
                BinaryOp::GreaterOrEqual => "GreaterOrEqual",
                BinaryOp::And => "And",
                BinaryOp::Or => "Or",
                BinaryOp::Xor => "Xor",
                BinaryOp::BitwiseAnd => "BitwiseAnd",
                BinaryOp::BitwiseOr => "BitwiseOr",
                BinaryOp::BitwiseXor => "BitwiseXor",
                BinaryOp::BitShiftLeft | BinaryOp::BitShiftRight => "BitShift",
                BinaryOp::PRelu => "PRelu",
            },
            Op::Variadic(v) => match v {
                VariadicOp::Sum => "Sum",
                VariadicOp::Mean => "Mean",
                VariadicOp::Max => "Max",
                VariadicOp::Min => "Min",
            },
            Op::Where => "Where",
            Op::Clip { .. } => "Clip",
            Op::Cast { .. } => "Cast",
            Op::CastLike { .. } => "CastLike",
            Op::Identity => "Identity",
            Op::Dropout => "Dropout",
            Op::Reduce { kind, .. } => match kind {
                ReduceKind::Sum => "ReduceSum",
                ReduceKind::Mean => "ReduceMean",
                ReduceKind::Max => "ReduceMax",
                ReduceKind::Min => "ReduceMin",
                ReduceKind::Prod => "ReduceProd",
                ReduceKind::L1 => "ReduceL1",
                ReduceKind::L2 => "ReduceL2",
                ReduceKind::LogSum => "ReduceLogSum",
                ReduceKind::LogSumExp => "ReduceLogSumExp",
                ReduceKind::SumSquare => "ReduceSumSquare",
            },
            Op::ArgReduce { max: true, .. } => "ArgMax",
            Op::ArgReduce { max: false, .. } => "ArgMin",
            Op::Softmax { kind, .. } => match kind {
                SoftmaxKind::Softmax => "Softmax",
                SoftmaxKind::LogSoftmax => "LogSoftmax",
                SoftmaxKind::Hardmax => "Hardmax",
            },
            Op::CumSum { .. } => "CumSum",
            Op::TopK { .. } => "TopK",
            Op::MatMul => "MatMul",
            Op::Gemm { .. } => "Gemm",
            Op::MatMulInteger => "MatMulInteger",
            Op::MatMulNBits { .. } => "MatMulNBits",
            Op::Conv(_) => "Conv",
            Op::ConvTranspose { .. } => "ConvTranspose",
            Op::Pool(p) => match p.kind {
                PoolKind::Max => "MaxPool",
                PoolKind::Average { .. } => "AveragePool",
                PoolKind::Lp { .. } => "LpPool",
            },
            Op::GlobalPool(k) => match k {
                PoolKind::Max => "GlobalMaxPool",
                PoolKind::Average { .. } => "GlobalAveragePool",
                PoolKind::Lp { .. } => "GlobalLpPool",
            },
            Op::BatchNorm { .. } => "BatchNormalization",
            Op::LayerNorm { .. } => "LayerNormalization",
            Op::RmsNorm { .. } => "RMSNormalization",
            Op::InstanceNorm { .. } => "InstanceNormalization",
            Op::GroupNorm { .. } => "GroupNormalization",
            Op::LpNorm { .. } => "LpNormalization",
            Op::Reshape { .. } => "Reshape",
            Op::Transpose { .. } => "Transpose",
            Op::Concat { .. } => "Concat",
            Op::Split { .. } => "Split",
            Op::Slice { .. } => "Slice",
            Op::Gather { .. } => "Gather",
            Op::GatherElements { .. } => "GatherElements",
            Op::GatherND { .. } => "GatherND",
            Op::ScatterElements { .. } => "ScatterElements",
            Op::ScatterND { .. } => "ScatterND",
            Op::Expand => "Expand",
            Op::Squeeze { .. } => "Squeeze",
            Op::Unsqueeze { .. } => "Unsqueeze",
            Op::Flatten { .. } => "Flatten",
            Op::Shape { .. } => "Shape",
            Op::Size => "Size",
            Op::ConstantOfShape { .. } => "ConstantOfShape",
            Op::Range => "Range",
            Op::Tile => "Tile",
            Op::Pad { .. } => "Pad",
            Op::Resize(_) => "Resize",
            Op::DepthToSpace { .. } => "DepthToSpace",
            Op::SpaceToDepth { .. } => "SpaceToDepth",
            Op::Trilu { .. } => "Trilu",
            Op::OneHot { .. } => "OneHot",
            Op::NonZero => "NonZero",
            Op::EyeLike { .. } => "EyeLike",
            Op::Compress { .. } => "Compress",
            Op::ReverseSequence { .. } => "ReverseSequence",
            Op::DequantizeLinear { .. } => "DequantizeLinear",
            Op::QuantizeLinear { .. } => "QuantizeLinear",
            Op::DynamicQuantizeLinear => "DynamicQuantizeLinear",
        }
    }
}

/// The accuracy level of MatMulNBits that computes with int8 activations (onnxruntime's
/// `accuracy_level` 4, "int8 compute").
pub const ACCURACY_LEVEL_INT8: usize = 4;

/// Whether a MatMulNBits computes with int8 activations: accuracy level 4, 4-bit weights, and
/// K and the block size multiples of 8. Each row of A is then quantized per block of
/// `block_size` values (the last block of a row may be shorter), symmetrically: `sa = max|a| / 127`, `qa = round(a * (127 /
/// max|a|))` (half to even, in -127..=127, 0 for an all-zero block), and each output is
/// `sum over blocks of (dot(qw, qa) - zp * sum(qa)) * (sw * sa)` accumulated in f32 block by
/// block, the integer dot product exact in i32. The reference interpreter and every kernel
/// compute exactly this; any other MatMulNBits computes in f32 with dequantized weights.
pub fn int8_activations(k: usize, bits: usize, block_size: usize, accuracy_level: usize) -> bool {
    accuracy_level == ACCURACY_LEVEL_INT8
        && bits == 4
        && block_size >= 8
        && block_size.is_multiple_of(8)
        && k.is_multiple_of(8)
}
