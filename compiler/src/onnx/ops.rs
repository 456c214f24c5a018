//! ONNX node -> typed [`Op`]: attribute parsing with defaults, and the opset-versioned
//! choices (which version moved which attribute into an input). An op type Kiln does not know,
//! or a version whose semantics it does not implement, is reported as unsupported.

use crate::dtype::DType;
use crate::ir::*;
use crate::proto::{AttributeProto, NodeProto};
use crate::tensor::Tensor;
use std::collections::HashMap;

pub enum OpError {
    /// Kiln does not implement this (domain, op, version).
    Unsupported,
    /// The node's attributes are malformed.
    BadAttribute(String),
}

/// Typed access to a node's attributes.
pub struct Attrs<'a> {
    map: HashMap<&'a str, &'a AttributeProto>,
}

type R<T> = Result<T, OpError>;

fn bad<T>(msg: impl Into<String>) -> R<T> {
    Err(OpError::BadAttribute(msg.into()))
}

impl<'a> Attrs<'a> {
    pub fn new(node: &'a NodeProto) -> Attrs<'a> {
        Attrs {
            map: node
                .attribute
                .iter()
                .map(|a| (a.name.as_deref().unwrap_or(""), a))
                .collect(),
        }
    }

    pub fn has(&self, name: &str) -> bool {
        self.map.contains_key(name)
    }

    pub fn get(&self, name: &str) -> Option<&'a AttributeProto> {
        self.map.get(name).copied()
    }

    pub fn int_opt(&self, name: &str) -> R<Option<i64>> {
        match self.get(name) {
            None => Ok(None),
            Some(a) => match a.i {
                Some(v) => Ok(Some(v)),
                None if a.r#type == Some(2) => Ok(Some(0)),
                None => bad(format!("attribute '{name}' must be an int")),
            },
        }
    }

    pub fn int(&self, name: &str, default: i64) -> R<i64> {
        Ok(self.int_opt(name)?.unwrap_or(default))
    }

    pub fn flag(&self, name: &str, default: bool) -> R<bool> {
        Ok(self.int(name, default as i64)? != 0)
    }

    pub fn usize(&self, name: &str, default: usize) -> R<usize> {
        let v = self.int(name, default as i64)?;
        usize::try_from(v)
            .or_else(|_| bad(format!("attribute '{name}' must not be negative, got {v}")))
    }

    pub fn float(&self, name: &str, default: f32) -> R<f32> {
        match self.get(name) {
            None => Ok(default),
            Some(a) => match (a.f, a.i) {
                (Some(v), _) => Ok(v),
                (None, Some(i)) => Ok(i as f32),
                (None, None) if a.r#type == Some(1) => Ok(0.0),
                _ => bad(format!("attribute '{name}' must be a float")),
            },
        }
    }

    pub fn string(&self, name: &str, default: &str) -> R<String> {
        match self.get(name) {
            None => Ok(default.to_string()),
            Some(a) => match &a.s {
                Some(s) => String::from_utf8(s.to_vec())
                    .or_else(|_| bad(format!("attribute '{name}' is not UTF-8"))),
                None if a.r#type == Some(3) => Ok(String::new()),
                None => bad(format!("attribute '{name}' must be a string")),
            },
        }
    }

    pub fn ints(&self, name: &str) -> R<Option<Vec<i64>>> {
        Ok(self.get(name).map(|a| a.ints.clone()))
    }

    pub fn usizes(&self, name: &str) -> R<Vec<usize>> {
        let v = self.ints(name)?.unwrap_or_default();
        v.iter()
            .map(|&x| {
                usize::try_from(x)
                    .or_else(|_| bad(format!("attribute '{name}' has a negative entry {x}")))
            })
            .collect()
    }

    pub fn floats(&self, name: &str) -> R<Option<Vec<f32>>> {
        Ok(self.get(name).map(|a| a.floats.clone()))
    }

    pub fn dtype(&self, name: &str) -> R<Option<DType>> {
        match self.int_opt(name)? {
            None => Ok(None),
            // A valid ONNX type Kiln does not implement (float8, string, ...) is unsupported.
            Some(code) => DType::from_onnx(code as i32)
                .map(Some)
                .ok_or(OpError::Unsupported),
        }
    }
}

fn auto_pad(a: &Attrs) -> R<AutoPad> {
    Ok(match a.string("auto_pad", "NOTSET")?.as_str() {
        "NOTSET" | "" => AutoPad::NotSet,
        "SAME_UPPER" => AutoPad::SameUpper,
        "SAME_LOWER" => AutoPad::SameLower,
        "VALID" => AutoPad::Valid,
        other => return bad(format!("unknown auto_pad '{other}'")),
    })
}

fn conv_attrs(a: &Attrs) -> R<ConvAttrs> {
    Ok(ConvAttrs {
        auto_pad: auto_pad(a)?,
        dilations: a.usizes("dilations")?,
        group: a.usize("group", 1)?.max(1),
        kernel_shape: a.usizes("kernel_shape")?,
        pads: a.usizes("pads")?,
        strides: a.usizes("strides")?,
    })
}

fn reduction(a: &Attrs) -> R<ScatterReduction> {
    Ok(match a.string("reduction", "none")?.as_str() {
        "none" => ScatterReduction::None,
        "add" => ScatterReduction::Add,
        "mul" => ScatterReduction::Mul,
        "max" => ScatterReduction::Max,
        "min" => ScatterReduction::Min,
        other => return bad(format!("unknown reduction '{other}'")),
    })
}

/// The tensor value of a `Constant` node (any of its value attributes).
pub fn constant_node_value(
    a: &Attrs,
    ext: &mut super::tensor_proto::ExternalData,
) -> Result<Tensor, OpError> {
    if let Some(t) = a.get("value").and_then(|x| x.t.as_ref()) {
        return super::tensor_proto::constant_from_proto(t, ext)
            .map(|c| c.to_tensor())
            .map_err(|e| OpError::BadAttribute(e.to_string()));
    }
    if let Some(attr) = a.get("value_float") {
        return Ok(Tensor::scalar(attr.f.unwrap_or(0.0)));
    }
    if let Some(attr) = a.get("value_floats") {
        return Ok(Tensor::from_vec(
            vec![attr.floats.len()],
            attr.floats.clone(),
        ));
    }
    if let Some(attr) = a.get("value_int") {
        return Ok(Tensor::scalar(attr.i.unwrap_or(0)));
    }
    if let Some(attr) = a.get("value_ints") {
        return Ok(Tensor::from_vec(vec![attr.ints.len()], attr.ints.clone()));
    }
    if a.has("value_string") || a.has("value_strings") || a.has("sparse_value") {
        return Err(OpError::Unsupported);
    }
    bad("Constant node without a value attribute")
}

/// Parses one node. `ver` is the opset version the model imports for the node's domain.
pub fn parse_op(domain: &str, op_type: &str, ver: i64, a: &Attrs) -> Result<Op, OpError> {
    if domain == "com.microsoft" {
        return match op_type {
            "MatMulNBits" => {
                let bits = a.usize("bits", 4)?;
                if bits != 4 && bits != 8 {
                    return Err(OpError::Unsupported);
                }
                Ok(Op::MatMulNBits {
                    k: a.usize("K", 0)?,
                    n: a.usize("N", 0)?,
                    bits,
                    block_size: a.usize("block_size", 32)?,
                    accuracy_level: a.usize("accuracy_level", 0)?,
                })
            }
            _ => Err(OpError::Unsupported),
        };
    }
    if !(domain.is_empty() || domain == "ai.onnx") {
        return Err(OpError::Unsupported);
    }
    use BinaryOp as B;
    use UnaryOp as U;
    let unary = |u: UnaryOp| Ok(Op::Unary(u));
    let binary = |b: BinaryOp| Ok(Op::Binary(b));
    let reduce = |kind: ReduceKind, axes_input_since: i64| -> R<Op> {
        let axes = if ver < axes_input_since {
            Some(a.ints("axes")?.unwrap_or_default())
        } else {
            None
        };
        Ok(Op::Reduce {
            kind,
            axes,
            keepdims: a.flag("keepdims", true)?,
            noop_with_empty_axes: a.flag("noop_with_empty_axes", false)?,
        })
    };
    let softmax = |kind: SoftmaxKind| -> R<Op> {
        let coerce_2d = ver < 13;
        Ok(Op::Softmax {
            kind,
            axis: a.int("axis", if coerce_2d { 1 } else { -1 })?,
            coerce_2d,
        })
    };
    match op_type {
        "Abs" => unary(U::Abs),
        "Neg" => unary(U::Neg),
        "Exp" => unary(U::Exp),
        "Log" => unary(U::Log),
        "Sqrt" => unary(U::Sqrt),
        "Reciprocal" => unary(U::Reciprocal),
        "Sigmoid" => unary(U::Sigmoid),
        "Tanh" => unary(U::Tanh),
        "Erf" => unary(U::Erf),
        "Floor" => unary(U::Floor),
        "Ceil" => unary(U::Ceil),
        "Round" => unary(U::Round),
        "Sign" => unary(U::Sign),
        "Sin" => unary(U::Sin),
        "Cos" => unary(U::Cos),
        "Tan" => unary(U::Tan),
        "Asin" => unary(U::Asin),
        "Acos" => unary(U::Acos),
        "Atan" => unary(U::Atan),
        "Sinh" => unary(U::Sinh),
        "Cosh" => unary(U::Cosh),
        "Asinh" => unary(U::Asinh),
        "Acosh" => unary(U::Acosh),
        "Atanh" => unary(U::Atanh),
        "Relu" => unary(U::Relu),
        "Softplus" => unary(U::Softplus),
        "Softsign" => unary(U::Softsign),
        "Mish" => unary(U::Mish),
        "HardSwish" => unary(U::HardSwish),
        "Not" => unary(U::Not),
        "BitwiseNot" => unary(U::BitwiseNot),
        "IsNaN" => unary(U::IsNaN),
        "IsInf" => unary(U::IsInf {
            detect_negative: a.flag("detect_negative", true)?,
            detect_positive: a.flag("detect_positive", true)?,
        }),
        "LeakyRelu" => unary(U::LeakyRelu {
            alpha: a.float("alpha", 0.01)?,
        }),
        "Elu" => unary(U::Elu {
            alpha: a.float("alpha", 1.0)?,
        }),
        "Selu" => unary(U::Selu {
            alpha: a.float("alpha", 1.673_263_2)?,
            gamma: a.float("gamma", 1.050_701)?,
        }),
        "Celu" => unary(U::Celu {
            alpha: a.float("alpha", 1.0)?,
        }),
        "ThresholdedRelu" => unary(U::ThresholdedRelu {
            alpha: a.float("alpha", 1.0)?,
        }),
        "HardSigmoid" => unary(U::HardSigmoid {
            alpha: a.float("alpha", 0.2)?,
            beta: a.float("beta", 0.5)?,
        }),
        "Gelu" => unary(U::Gelu {
            tanh_approximation: match a.string("approximate", "none")?.as_str() {
                "none" => false,
                "tanh" => true,
                o => return bad(format!("unknown Gelu approximate '{o}'")),
            },
        }),
        "Shrink" => unary(U::Shrink {
            bias: a.float("bias", 0.0)?,
            lambd: a.float("lambd", 0.5)?,
        }),
        "Swish" => unary(U::Swish {
            alpha: a.float("alpha", 1.0)?,
        }),
        "Add" if ver >= 7 => binary(B::Add),
        "Sub" if ver >= 7 => binary(B::Sub),
        "Mul" if ver >= 7 => binary(B::Mul),
        "Div" if ver >= 7 => binary(B::Div),
        "Pow" if ver >= 7 => binary(B::Pow),
        "Mod" => binary(B::Mod {
            fmod: a.flag("fmod", false)?,
        }),
        "Equal" => binary(B::Equal),
        "Less" => binary(B::Less),
        "LessOrEqual" => binary(B::LessOrEqual),
        "Greater" => binary(B::Greater),
        "GreaterOrEqual" => binary(B::GreaterOrEqual),
        "And" if ver >= 7 => binary(B::And),
        "Or" if ver >= 7 => binary(B::Or),
        "Xor" if ver >= 7 => binary(B::Xor),
        "BitwiseAnd" => binary(B::BitwiseAnd),
        "BitwiseOr" => binary(B::BitwiseOr),
        "BitwiseXor" => binary(B::BitwiseXor),
        "BitShift" => match a.string("direction", "")?.as_str() {
            "LEFT" => binary(B::BitShiftLeft),
            "RIGHT" => binary(B::BitShiftRight),
            o => bad(format!(
                "BitShift direction must be LEFT or RIGHT, got '{o}'"
            )),
        },
        "PRelu" if ver >= 7 => binary(B::PRelu),
        "Sum" if ver >= 8 => Ok(Op::Variadic(VariadicOp::Sum)),
        "Mean" if ver >= 8 => Ok(Op::Variadic(VariadicOp::Mean)),
        "Max" if ver >= 8 => Ok(Op::Variadic(VariadicOp::Max)),
        "Min" if ver >= 8 => Ok(Op::Variadic(VariadicOp::Min)),
        "Where" => Ok(Op::Where),
        "Clip" => {
            if ver < 11 {
                Ok(Op::Clip {
                    min: Some(a.float("min", f32::MIN)?),
                    max: Some(a.float("max", f32::MAX)?),
                })
            } else {
                Ok(Op::Clip {
                    min: None,
                    max: None,
                })
            }
        }
        "Cast" => Ok(Op::Cast {
            to: a
                .dtype("to")?
                .ok_or(OpError::BadAttribute("Cast needs attribute 'to'".into()))?,
            saturate: a.flag("saturate", true)?,
        }),
        "CastLike" => Ok(Op::CastLike {
            saturate: a.flag("saturate", true)?,
        }),
        "Identity" => Ok(Op::Identity),
        // Training-mode Dropout is random; only the inference form (no training_mode input) is
        // implemented. The input count is checked by the importer (see `needs_inputs`).
        "Dropout" => Ok(Op::Dropout),
        "ReduceSum" => reduce(ReduceKind::Sum, 13),
        "ReduceMean" => reduce(ReduceKind::Mean, 18),
        "ReduceMax" => reduce(ReduceKind::Max, 18),
        "ReduceMin" => reduce(ReduceKind::Min, 18),
        "ReduceProd" => reduce(ReduceKind::Prod, 18),
        "ReduceL1" => reduce(ReduceKind::L1, 18),
        "ReduceL2" => reduce(ReduceKind::L2, 18),
        "ReduceLogSum" => reduce(ReduceKind::LogSum, 18),
        "ReduceLogSumExp" => reduce(ReduceKind::LogSumExp, 18),
        "ReduceSumSquare" => reduce(ReduceKind::SumSquare, 18),
        "ArgMax" | "ArgMin" => Ok(Op::ArgReduce {
            max: op_type == "ArgMax",
            axis: a.int("axis", 0)?,
            keepdims: a.flag("keepdims", true)?,
            select_last_index: a.flag("select_last_index", false)?,
        }),
        "Softmax" => softmax(SoftmaxKind::Softmax),
        "LogSoftmax" => softmax(SoftmaxKind::LogSoftmax),
        "Hardmax" => softmax(SoftmaxKind::Hardmax),
        "CumSum" => Ok(Op::CumSum {
            exclusive: a.flag("exclusive", false)?,
            reverse: a.flag("reverse", false)?,
        }),
        "TopK" => Ok(Op::TopK {
            axis: a.int("axis", -1)?,
            largest: a.flag("largest", true)?,
            sorted: a.flag("sorted", true)?,
            k: if ver < 10 { Some(a.int("k", 0)?) } else { None },
        }),
        "MatMul" => Ok(Op::MatMul),
        "Gemm" if ver >= 7 => Ok(Op::Gemm {
            alpha: a.float("alpha", 1.0)?,
            beta: a.float("beta", 1.0)?,
            trans_a: a.flag("transA", false)?,
            trans_b: a.flag("transB", false)?,
        }),
        "MatMulInteger" => Ok(Op::MatMulInteger),
        "Conv" => Ok(Op::Conv(conv_attrs(a)?)),
        "ConvTranspose" => Ok(Op::ConvTranspose {
            conv: conv_attrs(a)?,
            output_padding: a.usizes("output_padding")?,
            output_shape: a.usizes("output_shape")?,
        }),
        "MaxPool" | "AveragePool" | "LpPool" => {
            let kind = match op_type {
                "MaxPool" => PoolKind::Max,
                "AveragePool" => PoolKind::Average {
                    count_include_pad: a.flag("count_include_pad", false)?,
                },
                _ => PoolKind::Lp { p: a.int("p", 2)? },
            };
            let mut window = conv_attrs(a)?;
            window.group = 1;
            Ok(Op::Pool(PoolAttrs {
                kind,
                window,
                ceil_mode: a.flag("ceil_mode", false)?,
                storage_order: a.int("storage_order", 0)?,
            }))
        }
        "GlobalMaxPool" => Ok(Op::GlobalPool(PoolKind::Max)),
        "GlobalAveragePool" => Ok(Op::GlobalPool(PoolKind::Average {
            count_include_pad: true,
        })),
        "GlobalLpPool" => Ok(Op::GlobalPool(PoolKind::Lp { p: a.int("p", 2)? })),
        "BatchNormalization" if ver >= 9 => {
            if a.flag("training_mode", false)? {
                return Err(OpError::Unsupported);
            }
            Ok(Op::BatchNorm {
                epsilon: a.float("epsilon", 1e-5)?,
            })
        }
        "LayerNormalization" => {
            if a.int("stash_type", 1)? != 1 {
                return Err(OpError::Unsupported);
            }
            Ok(Op::LayerNorm {
                axis: a.int("axis", -1)?,
                epsilon: a.float("epsilon", 1e-5)?,
            })
        }
        "RMSNormalization" => {
            if a.int("stash_type", 1)? != 1 {
                return Err(OpError::Unsupported);
            }
            Ok(Op::RmsNorm {
                axis: a.int("axis", -1)?,
                epsilon: a.float("epsilon", 1e-5)?,
            })
        }
        "InstanceNormalization" => Ok(Op::InstanceNorm {
            epsilon: a.float("epsilon", 1e-5)?,
        }),
        "GroupNormalization" if ver >= 21 => {
            if a.int("stash_type", 1)? != 1 {
                return Err(OpError::Unsupported);
            }
            Ok(Op::GroupNorm {
                epsilon: a.float("epsilon", 1e-5)?,
                num_groups: a.usize("num_groups", 1)?,
            })
        }
        "LpNormalization" => Ok(Op::LpNorm {
            axis: a.int("axis", -1)?,
            p: a.int("p", 2)?,
        }),
        "Reshape" if ver >= 5 => Ok(Op::Reshape {
            allowzero: a.flag("allowzero", false)?,
        }),
        "Transpose" => Ok(Op::Transpose {
            perm: a.ints("perm")?,
        }),
        "Concat" => Ok(Op::Concat {
            axis: a.int("axis", if ver < 4 { 1 } else { 0 })?,
        }),
        "Split" => Ok(Op::Split {
            axis: a.int("axis", 0)?,
            split: if ver < 13 { a.ints("split")? } else { None },
            num_outputs: if ver >= 18 {
                a.int_opt("num_outputs")?.map(|n| n.max(0) as usize)
            } else {
                None
            },
        }),
        "Slice" => {
            if ver < 10 {
                let starts = a.ints("starts")?.unwrap_or_default();
                let ends = a.ints("ends")?.unwrap_or_default();
                Ok(Op::Slice {
                    attrs: Some(SliceAttrs {
                        starts,
                        ends,
                        axes: a.ints("axes")?,
                    }),
                })
            } else {
                Ok(Op::Slice { attrs: None })
            }
        }
        "Gather" => Ok(Op::Gather {
            axis: a.int("axis", 0)?,
        }),
        "GatherElements" => Ok(Op::GatherElements {
            axis: a.int("axis", 0)?,
        }),
        "GatherND" => Ok(Op::GatherND {
            batch_dims: a.usize("batch_dims", 0)?,
        }),
        "ScatterElements" => Ok(Op::ScatterElements {
            axis: a.int("axis", 0)?,
            reduction: reduction(a)?,
        }),
        "Scatter" => Ok(Op::ScatterElements {
            axis: a.int("axis", 0)?,
            reduction: ScatterReduction::None,
        }),
        "ScatterND" => Ok(Op::ScatterND {
            reduction: reduction(a)?,
        }),
        "Expand" => Ok(Op::Expand),
        "Squeeze" => Ok(Op::Squeeze {
            axes: if ver < 13 { a.ints("axes")? } else { None },
        }),
        "Unsqueeze" => Ok(Op::Unsqueeze {
            axes: if ver < 13 {
                Some(a.ints("axes")?.unwrap_or_default())
            } else {
                None
            },
        }),
        "Flatten" => Ok(Op::Flatten {
            axis: a.int("axis", 1)?,
        }),
        "Shape" => Ok(Op::Shape {
            start: a.int("start", 0)?,
            end: a.int_opt("end")?,
        }),
        "Size" => Ok(Op::Size),
        "ConstantOfShape" => {
            let value = match a.get("value").and_then(|x| x.t.as_ref()) {
                Some(t) => {
                    let mut ext = super::tensor_proto::ExternalData::new(None);
                    let c = super::tensor_proto::constant_from_proto(t, &mut ext)
                        .map_err(|e| OpError::BadAttribute(e.to_string()))?;
                    if c.numel() != 1 {
                        return bad("ConstantOfShape value must hold one element");
                    }
                    Tensor::new(vec![], c.to_tensor().data)
                }
                None => Tensor::scalar(0.0f32),
            };
            Ok(Op::ConstantOfShape { value })
        }
        "Range" => Ok(Op::Range),
        "Tile" if ver >= 6 => Ok(Op::Tile),
        "Pad" if ver >= 2 => {
            let mode = match a.string("mode", "constant")?.as_str() {
                "constant" => PadMode::Constant,
                "reflect" => PadMode::Reflect,
                "edge" => PadMode::Edge,
                "wrap" => PadMode::Wrap,
                o => return bad(format!("unknown Pad mode '{o}'")),
            };
            if ver < 11 {
                Ok(Op::Pad {
                    mode,
                    pads: Some(a.ints("pads")?.unwrap_or_default()),
                    value: a.float("value", 0.0)?,
                })
            } else {
                Ok(Op::Pad {
                    mode,
                    pads: None,
                    value: 0.0,
                })
            }
        }
        "Resize" if ver >= 10 => resize(a, ver, false),
        "Upsample" if ver >= 9 => resize(a, ver, true),
        "DepthToSpace" => Ok(Op::DepthToSpace {
            blocksize: a.usize("blocksize", 1)?,
            crd: match a.string("mode", "DCR")?.as_str() {
                "DCR" => false,
                "CRD" => true,
                o => return bad(format!("unknown DepthToSpace mode '{o}'")),
            },
        }),
        "SpaceToDepth" => Ok(Op::SpaceToDepth {
            blocksize: a.usize("blocksize", 1)?,
        }),
        "Trilu" => Ok(Op::Trilu {
            upper: a.flag("upper", true)?,
        }),
        "OneHot" => Ok(Op::OneHot {
            axis: a.int("axis", -1)?,
        }),
        "NonZero" => Ok(Op::NonZero),
        "EyeLike" => Ok(Op::EyeLike {
            dtype: a.dtype("dtype")?,
            k: a.int("k", 0)?,
        }),
        "Compress" => Ok(Op::Compress {
            axis: a.int_opt("axis")?,
        }),
        "ReverseSequence" => Ok(Op::ReverseSequence {
            batch_axis: a.usize("batch_axis", 1)?,
            time_axis: a.usize("time_axis", 0)?,
        }),
        "DequantizeLinear" => Ok(Op::DequantizeLinear {
            axis: a.int("axis", 1)?,
            block_size: a.usize("block_size", 0)?,
        }),
        "QuantizeLinear" => Ok(Op::QuantizeLinear {
            axis: a.int("axis", 1)?,
            block_size: a.usize("block_size", 0)?,
            saturate: a.flag("saturate", true)?,
            output_dtype: match a.int("output_dtype", 0)? {
                0 => None,
                c => Some(DType::from_onnx(c as i32).ok_or(OpError::Unsupported)?),
            },
        }),
        "DynamicQuantizeLinear" => Ok(Op::DynamicQuantizeLinear),
        _ => Err(OpError::Unsupported),
    }
}

fn resize(a: &Attrs, ver: i64, upsample: bool) -> Result<Op, OpError> {
    let mode = match a.string("mode", "nearest")?.as_str() {
        "nearest" => ResizeMode::Nearest,
        "linear" | "bilinear" => ResizeMode::Linear,
        "cubic" => ResizeMode::Cubic,
        o => return bad(format!("unknown resize mode '{o}'")),
    };
    let legacy = upsample || ver < 11;
    let coordinate_transform = if legacy {
        CoordinateTransform::Asymmetric
    } else {
        match a
            .string("coordinate_transformation_mode", "half_pixel")?
            .as_str()
        {
            "half_pixel" => CoordinateTransform::HalfPixel,
            "half_pixel_symmetric" => CoordinateTransform::HalfPixelSymmetric,
            "pytorch_half_pixel" => CoordinateTransform::PytorchHalfPixel,
            "align_corners" => CoordinateTransform::AlignCorners,
            "asymmetric" => CoordinateTransform::Asymmetric,
            "tf_crop_and_resize" => CoordinateTransform::TfCropAndResize,
            o => return bad(format!("unknown coordinate_transformation_mode '{o}'")),
        }
    };
    let nearest_mode = if legacy {
        NearestRounding::Floor
    } else {
        match a.string("nearest_mode", "round_prefer_floor")?.as_str() {
            "round_prefer_floor" => NearestRounding::RoundPreferFloor,
            "round_prefer_ceil" => NearestRounding::RoundPreferCeil,
            "floor" => NearestRounding::Floor,
            "ceil" => NearestRounding::Ceil,
            o => return bad(format!("unknown nearest_mode '{o}'")),
        }
    };
    let keep_aspect_ratio = match a.string("keep_aspect_ratio_policy", "stretch")?.as_str() {
        "stretch" => KeepAspectRatio::Stretch,
        "not_larger" => KeepAspectRatio::NotLarger,
        "not_smaller" => KeepAspectRatio::NotSmaller,
        o => return bad(format!("unknown keep_aspect_ratio_policy '{o}'")),
    };
    if a.flag("antialias", false)? {
        return Err(OpError::Unsupported);
    }
    Ok(Op::Resize(ResizeAttrs {
        mode,
        coordinate_transform,
        nearest_mode,
        cubic_coeff_a: a.float("cubic_coeff_a", -0.75)?,
        exclude_outside: a.flag("exclude_outside", false)?,
        extrapolation_value: a.float("extrapolation_value", 0.0)?,
        antialias: a.flag("antialias", false)?,
        axes: a.ints("axes")?,
        keep_aspect_ratio,
        scales_input: if legacy { 1 } else { 2 },
    }))
}
