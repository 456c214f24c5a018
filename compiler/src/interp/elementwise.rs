//! Elementwise kernels: unary math and activations, broadcasting binary arithmetic,
//! comparisons and logic, the variadic Sum/Mean/Max/Min, Where, Clip and Cast. Float types
//! compute in f64 and round once to the element type; integer types compute in i64 with
//! wrapping, as numpy does.

use super::util::*;
use crate::dtype::DType;
use crate::ir::{BinaryOp, UnaryOp, VariadicOp};
use crate::tensor::{Elem, Tensor, TensorData};
use crate::with_data;

/// erf with about 1e-16 relative error (W. J. Cody's rational approximations via libm-style
/// evaluation is not in std; this uses the complementary error function series below).
pub fn erf(x: f64) -> f64 {
    // Abramowitz-Stegun 7.1.26 is too coarse for an oracle; use a high-precision
    // implementation based on the continued fraction / Taylor split.
    if x.is_nan() {
        return x;
    }
    let ax = x.abs();
    let r = if ax < 2.5 {
        // Taylor series: erf(x) = 2/sqrt(pi) * sum (-1)^n x^(2n+1) / (n! (2n+1))
        let mut sum = 0.0;
        let mut term = ax;
        let x2 = ax * ax;
        let mut n = 0.0;
        loop {
            let t = term / (2.0 * n + 1.0);
            sum += t;
            if t.abs() < 1e-17 * sum.abs() {
                break;
            }
            n += 1.0;
            term *= -x2 / n;
            if n > 200.0 {
                break;
            }
        }
        sum * std::f64::consts::FRAC_2_SQRT_PI
    } else if ax < 6.0 {
        // Continued fraction for erfc (Lentz), accurate for x >= 2.5.
        let x2 = ax * ax;
        let mut f = ax;
        let tiny = 1e-300;
        let mut c = ax;
        let mut d = 0.0;
        for k in 1..200 {
            let a = k as f64 / 2.0;
            d = ax + a * d;
            if d.abs() < tiny {
                d = tiny;
            }
            c = ax + a / c;
            if c.abs() < tiny {
                c = tiny;
            }
            d = 1.0 / d;
            let delta = c * d;
            f *= delta;
            if (delta - 1.0).abs() < 1e-16 {
                break;
            }
        }
        let erfc = (-x2).exp() / f / std::f64::consts::PI.sqrt();
        1.0 - erfc
    } else {
        1.0
    };
    if x < 0.0 {
        -r
    } else {
        r
    }
}

fn unary_f(u: &UnaryOp, x: f64) -> f64 {
    use UnaryOp::*;
    match *u {
        Abs => x.abs(),
        Neg => -x,
        Exp => x.exp(),
        Log => x.ln(),
        Sqrt => x.sqrt(),
        Reciprocal => 1.0 / x,
        Sigmoid => {
            if x >= 0.0 {
                1.0 / (1.0 + (-x).exp())
            } else {
                let e = x.exp();
                e / (1.0 + e)
            }
        }
        Tanh => x.tanh(),
        Erf => erf(x),
        Floor => x.floor(),
        Ceil => x.ceil(),
        Round => x.round_ties_even(),
        Sign => {
            if x > 0.0 {
                1.0
            } else if x < 0.0 {
                -1.0
            } else {
                x
            }
        }
        Sin => x.sin(),
        Cos => x.cos(),
        Tan => x.tan(),
        Asin => x.asin(),
        Acos => x.acos(),
        Atan => x.atan(),
        Sinh => x.sinh(),
        Cosh => x.cosh(),
        Asinh => x.asinh(),
        Acosh => x.acosh(),
        Atanh => x.atanh(),
        Relu => x.max(0.0),
        Softplus => {
            if x > 0.0 {
                x + (-x).exp().ln_1p()
            } else {
                x.exp().ln_1p()
            }
        }
        Softsign => x / (1.0 + x.abs()),
        Mish => x * (if x > 20.0 { x } else { x.exp().ln_1p() }).tanh(),
        HardSwish => x * (x / 6.0 + 0.5).clamp(0.0, 1.0),
        LeakyRelu { alpha } => {
            if x < 0.0 {
                alpha as f64 * x
            } else {
                x
            }
        }
        Elu { alpha } => {
            if x < 0.0 {
                alpha as f64 * x.exp_m1()
            } else {
                x
            }
        }
        Selu { alpha, gamma } => {
            let (a, g) = (alpha as f64, gamma as f64);
            if x <= 0.0 {
                g * (a * x.exp() - a)
            } else {
                g * x
            }
        }
        Celu { alpha } => {
            let a = alpha as f64;
            x.max(0.0) + (a * ((x / a).exp() - 1.0)).min(0.0)
        }
        ThresholdedRelu { alpha } => {
            if x > alpha as f64 {
                x
            } else {
                0.0
            }
        }
        HardSigmoid { alpha, beta } => (alpha as f64 * x + beta as f64).clamp(0.0, 1.0),
        Gelu {
            tanh_approximation: false,
        } => 0.5 * x * (1.0 + erf(x / std::f64::consts::SQRT_2)),
        Gelu {
            tanh_approximation: true,
        } => {
            let c = (2.0 / std::f64::consts::PI).sqrt();
            0.5 * x * (1.0 + (c * (x + 0.044715 * x * x * x)).tanh())
        }
        Shrink { bias, lambd } => {
            let (b, l) = (bias as f64, lambd as f64);
            if x < -l {
                x + b
            } else if x > l {
                x - b
            } else {
                0.0
            }
        }
        Swish { alpha } => x / (1.0 + (-(alpha as f64) * x).exp()),
        Not | BitwiseNot | IsNaN | IsInf { .. } => unreachable!("handled before the float path"),
    }
}

fn unary_typed<T: Elem>(u: &UnaryOp, v: &[T]) -> KResult<Vec<T>> {
    if T::DTYPE.is_float() {
        return Ok(v
            .iter()
            .map(|&x| T::from_f64(unary_f(u, x.to_f64())))
            .collect());
    }
    if T::DTYPE == DType::Bool {
        return err(format!("{u:?} is not defined for bool"));
    }
    let signed = T::DTYPE.is_signed_int();
    let f: fn(i64) -> i64 = match u {
        UnaryOp::Abs => |x| x.wrapping_abs(),
        UnaryOp::Neg => |x| x.wrapping_neg(),
        UnaryOp::Sign => |x| x.signum(),
        UnaryOp::Relu => |x| x.max(0),
        UnaryOp::BitwiseNot => |x| !x,
        _ => {
            // Integer inputs of float math ops are rejected by ONNX type constraints.
            return err(format!("{u:?} is not defined for {}", T::DTYPE));
        }
    };
    let _ = signed;
    Ok(v.iter().map(|&x| T::from_i64(f(x.to_i64()))).collect())
}

pub fn unary(u: &UnaryOp, x: &Tensor) -> KResult<Tensor> {
    match u {
        UnaryOp::Not => match &x.data {
            TensorData::Bool(v) => Ok(Tensor::from_vec(
                x.shape.clone(),
                v.iter().map(|b| !b).collect::<Vec<_>>(),
            )),
            _ => err("Not needs a bool tensor"),
        },
        UnaryOp::IsNaN => {
            let v = floats_of(x)?;
            Ok(Tensor::from_vec(
                x.shape.clone(),
                v.iter().map(|f| f.is_nan()).collect::<Vec<_>>(),
            ))
        }
        UnaryOp::IsInf {
            detect_negative,
            detect_positive,
        } => {
            let v = floats_of(x)?;
            let r: Vec<bool> = v
                .iter()
                .map(|f| {
                    f.is_infinite()
                        && ((*f > 0.0 && *detect_positive) || (*f < 0.0 && *detect_negative))
                })
                .collect();
            Ok(Tensor::from_vec(x.shape.clone(), r))
        }
        _ => {
            let data = with_data!(&x.data, v => T_wrap(unary_typed(u, v)?));
            Ok(Tensor::new(x.shape.clone(), retag(data, x.dtype())))
        }
    }
}

/// Wraps a typed vector back into `TensorData` (helper for the dispatch macros).
#[allow(non_snake_case)]
fn T_wrap<T: Elem>(v: Vec<T>) -> TensorData {
    T::into_data(v)
}

/// `Elem` maps the 4-bit types onto i8/u8; restore the original variant.
pub fn retag(d: TensorData, dtype: DType) -> TensorData {
    match (d, dtype) {
        (TensorData::I8(v), DType::I4) => TensorData::I4(v),
        (TensorData::U8(v), DType::U4) => TensorData::U4(v),
        (d, _) => d,
    }
}

fn map2<A: Copy, B: Copy, O>(
    a: &[A],
    ash: &[usize],
    b: &[B],
    bsh: &[usize],
    out: &[usize],
    mut f: impl FnMut(A, B) -> O,
) -> Vec<O> {
    if ash == bsh {
        return a.iter().zip(b).map(|(&x, &y)| f(x, y)).collect();
    }
    if b.len() == 1 && ash == out {
        let y = b[0];
        return a.iter().map(|&x| f(x, y)).collect();
    }
    if a.len() == 1 && bsh == out {
        let x = a[0];
        return b.iter().map(|&y| f(x, y)).collect();
    }
    let ia = broadcast_index(ash, out);
    let ib = broadcast_index(bsh, out);
    ia.iter().zip(&ib).map(|(&i, &j)| f(a[i], b[j])).collect()
}

fn float_binop(op: BinaryOp, x: f64, y: f64) -> f64 {
    match op {
        BinaryOp::Add => x + y,
        BinaryOp::Sub => x - y,
        BinaryOp::Mul => x * y,
        BinaryOp::Div => x / y,
        BinaryOp::Pow => x.powf(y),
        BinaryOp::Mod { fmod: true } => x % y,
        BinaryOp::Mod { fmod: false } => {
            let r = x % y;
            if r != 0.0 && (r < 0.0) != (y < 0.0) {
                r + y
            } else {
                r
            }
        }
        BinaryOp::PRelu => {
            if x < 0.0 {
                x * y
            } else {
                x
            }
        }
        _ => unreachable!("not an arithmetic op"),
    }
}

fn int_binop(op: BinaryOp, x: i64, y: i64, bits: u32, signed: bool) -> KResult<i64> {
    Ok(match op {
        BinaryOp::Add => x.wrapping_add(y),
        BinaryOp::Sub => x.wrapping_sub(y),
        BinaryOp::Mul => x.wrapping_mul(y),
        BinaryOp::Div => {
            if y == 0 {
                return err("integer division by zero");
            }
            if signed {
                x.wrapping_div(y)
            } else {
                ((x as u64) / (y as u64)) as i64
            }
        }
        BinaryOp::Mod { fmod } => {
            if y == 0 {
                return err("integer modulo by zero");
            }
            let r = x.wrapping_rem(y);
            if !fmod && r != 0 && (r < 0) != (y < 0) {
                r + y
            } else {
                r
            }
        }
        BinaryOp::Pow => {
            if y < 0 {
                if x == 1 {
                    1
                } else {
                    0
                }
            } else {
                x.wrapping_pow(y.min(u32::MAX as i64) as u32)
            }
        }
        BinaryOp::BitwiseAnd => x & y,
        BinaryOp::BitwiseOr => x | y,
        BinaryOp::BitwiseXor => x ^ y,
        BinaryOp::BitShiftLeft => {
            if y as u64 >= bits as u64 {
                0
            } else {
                ((x as u64) << y) as i64
            }
        }
        BinaryOp::BitShiftRight => {
            let mask = if bits == 64 {
                u64::MAX
            } else {
                (1u64 << bits) - 1
            };
            if y as u64 >= bits as u64 {
                0
            } else {
                (((x as u64) & mask) >> y) as i64
            }
        }
        BinaryOp::PRelu => {
            if x < 0 {
                x.wrapping_mul(y)
            } else {
                x
            }
        }
        _ => unreachable!("not an arithmetic op"),
    })
}

fn arith_typed<T: Elem>(
    op: BinaryOp,
    a: &[T],
    ash: &[usize],
    b: &[T],
    bsh: &[usize],
    out: &[usize],
) -> KResult<Vec<T>> {
    if T::DTYPE.is_float() {
        return Ok(map2(a, ash, b, bsh, out, |x, y| {
            T::from_f64(float_binop(op, x.to_f64(), y.to_f64()))
        }));
    }
    if T::DTYPE == DType::Bool {
        return err(format!("{op:?} is not defined for bool"));
    }
    let bits = T::DTYPE.bits() as u32;
    let signed = T::DTYPE.is_signed_int();
    let mut failure = None;
    let r = map2(a, ash, b, bsh, out, |x, y| {
        match int_binop(op, x.to_i64(), y.to_i64(), bits, signed) {
            Ok(v) => T::from_i64(v),
            Err(e) => {
                failure = Some(e);
                T::default()
            }
        }
    });
    match failure {
        Some(e) => Err(e),
        None => Ok(r),
    }
}

fn compare_typed<T: Elem>(
    op: BinaryOp,
    a: &[T],
    ash: &[usize],
    b: &[T],
    bsh: &[usize],
    out: &[usize],
) -> KResult<Vec<bool>> {
    let bool_only = matches!(op, BinaryOp::And | BinaryOp::Or | BinaryOp::Xor);
    if bool_only && T::DTYPE != DType::Bool {
        return err(format!("{op:?} needs bool inputs"));
    }
    let float = T::DTYPE.is_float();
    Ok(map2(a, ash, b, bsh, out, |x, y| {
        let ord = if float {
            x.to_f64().partial_cmp(&y.to_f64())
        } else if T::DTYPE == DType::U64 {
            (x.to_i64() as u64).partial_cmp(&(y.to_i64() as u64))
        } else {
            x.to_i64().partial_cmp(&y.to_i64())
        };
        use std::cmp::Ordering::*;
        match op {
            BinaryOp::Equal => ord == Some(Equal),
            BinaryOp::Less => ord == Some(Less),
            BinaryOp::LessOrEqual => matches!(ord, Some(Less | Equal)),
            BinaryOp::Greater => ord == Some(Greater),
            BinaryOp::GreaterOrEqual => matches!(ord, Some(Greater | Equal)),
            BinaryOp::And => x.to_i64() != 0 && y.to_i64() != 0,
            BinaryOp::Or => x.to_i64() != 0 || y.to_i64() != 0,
            BinaryOp::Xor => (x.to_i64() != 0) != (y.to_i64() != 0),
            _ => unreachable!(),
        }
    }))
}

pub fn binary(op: BinaryOp, a: &Tensor, b: &Tensor) -> KResult<Tensor> {
    let out = broadcast_shapes(&[&a.shape, &b.shape])?;
    if op == BinaryOp::Pow && a.dtype() != b.dtype() {
        // Pow allows a different exponent type: compute in f64, result has the base's type.
        let bx = b.to_f64_vec();
        let data = with_data!(&a.data, v => {
            let r = map2(v, &a.shape, &bx, &b.shape, &out, |x, y| {
                if a.dtype().is_float() { x.to_f64().powf(y) } else { (x.to_f64()).powf(y).trunc() }
            });
            TensorData::from_f64s(a.dtype(), r.into_iter())
        });
        return Ok(Tensor::new(out, data));
    }
    if a.dtype() != b.dtype() {
        return err(format!(
            "input types differ: {} and {}",
            a.dtype(),
            b.dtype()
        ));
    }
    macro_rules! both {
        ($f:ident, $wrap:expr) => {
            match (&a.data, &b.data) {
                (TensorData::F32(x), TensorData::F32(y)) => {
                    $wrap($f(op, x, &a.shape, y, &b.shape, &out)?)
                }
                (TensorData::F64(x), TensorData::F64(y)) => {
                    $wrap($f(op, x, &a.shape, y, &b.shape, &out)?)
                }
                (TensorData::F16(x), TensorData::F16(y)) => {
                    $wrap($f(op, x, &a.shape, y, &b.shape, &out)?)
                }
                (TensorData::BF16(x), TensorData::BF16(y)) => {
                    $wrap($f(op, x, &a.shape, y, &b.shape, &out)?)
                }
                (TensorData::I8(x), TensorData::I8(y)) => {
                    $wrap($f(op, x, &a.shape, y, &b.shape, &out)?)
                }
                (TensorData::I16(x), TensorData::I16(y)) => {
                    $wrap($f(op, x, &a.shape, y, &b.shape, &out)?)
                }
                (TensorData::I32(x), TensorData::I32(y)) => {
                    $wrap($f(op, x, &a.shape, y, &b.shape, &out)?)
                }
                (TensorData::I64(x), TensorData::I64(y)) => {
                    $wrap($f(op, x, &a.shape, y, &b.shape, &out)?)
                }
                (TensorData::U8(x), TensorData::U8(y)) => {
                    $wrap($f(op, x, &a.shape, y, &b.shape, &out)?)
                }
                (TensorData::U16(x), TensorData::U16(y)) => {
                    $wrap($f(op, x, &a.shape, y, &b.shape, &out)?)
                }
                (TensorData::U32(x), TensorData::U32(y)) => {
                    $wrap($f(op, x, &a.shape, y, &b.shape, &out)?)
                }
                (TensorData::U64(x), TensorData::U64(y)) => {
                    $wrap($f(op, x, &a.shape, y, &b.shape, &out)?)
                }
                (TensorData::Bool(x), TensorData::Bool(y)) => {
                    $wrap($f(op, x, &a.shape, y, &b.shape, &out)?)
                }
                _ => return err(format!("{op:?} is not defined for {}", a.dtype())),
            }
        };
    }
    let data = if op.is_predicate() {
        both!(compare_typed, TensorData::Bool)
    } else {
        both!(arith_typed, T_wrap)
    };
    Ok(Tensor::new(out, data))
}

pub fn variadic(op: VariadicOp, ins: &[Option<&Tensor>]) -> KResult<Tensor> {
    let ts: Vec<&Tensor> = ins.iter().flatten().copied().collect();
    let Some(first) = ts.first() else {
        return err("needs at least one input");
    };
    let shapes: Vec<&[usize]> = ts.iter().map(|t| t.shape.as_slice()).collect();
    let out = broadcast_shapes(&shapes)?;
    let dtype = first.dtype();
    if ts.iter().any(|t| t.dtype() != dtype) {
        return err("all inputs must have the same type");
    }
    let n: usize = out.iter().product();
    let float = dtype.is_float();
    if float {
        let mut acc: Vec<f64> = Vec::new();
        for (k, t) in ts.iter().enumerate() {
            let idx = broadcast_index(&t.shape, &out);
            let v = t.to_f64_vec();
            if k == 0 {
                acc = idx.iter().map(|&i| v[i]).collect();
                continue;
            }
            for (a, &i) in acc.iter_mut().zip(&idx) {
                let x = v[i];
                *a = match op {
                    VariadicOp::Sum | VariadicOp::Mean => *a + x,
                    VariadicOp::Max => {
                        if a.is_nan() || x.is_nan() {
                            f64::NAN
                        } else {
                            a.max(x)
                        }
                    }
                    VariadicOp::Min => {
                        if a.is_nan() || x.is_nan() {
                            f64::NAN
                        } else {
                            a.min(x)
                        }
                    }
                };
            }
        }
        if op == VariadicOp::Mean {
            let c = ts.len() as f64;
            acc.iter_mut().for_each(|a| *a /= c);
        }
        debug_assert_eq!(acc.len(), n);
        return Ok(float_tensor(dtype, out, acc));
    }
    let unsigned64 = dtype == DType::U64;
    let mut acc: Vec<i64> = Vec::new();
    for (k, t) in ts.iter().enumerate() {
        let idx = broadcast_index(&t.shape, &out);
        let v = t.to_i64_vec();
        if k == 0 {
            acc = idx.iter().map(|&i| v[i]).collect();
            continue;
        }
        for (a, &i) in acc.iter_mut().zip(&idx) {
            let x = v[i];
            *a = match op {
                VariadicOp::Sum | VariadicOp::Mean => a.wrapping_add(x),
                VariadicOp::Max if unsigned64 => ((*a as u64).max(x as u64)) as i64,
                VariadicOp::Min if unsigned64 => ((*a as u64).min(x as u64)) as i64,
                VariadicOp::Max => (*a).max(x),
                VariadicOp::Min => (*a).min(x),
            };
        }
    }
    if op == VariadicOp::Mean {
        let c = ts.len() as i64;
        acc.iter_mut().for_each(|a| *a /= c);
    }
    let data = with_data!(&first.data, _v => int_data_like(&first.data, &acc));
    Ok(Tensor::new(out, data))
}

fn int_data_like(like: &TensorData, v: &[i64]) -> TensorData {
    fn conv<T: Elem>(v: &[i64]) -> TensorData {
        T::into_data(v.iter().map(|&x| T::from_i64(x)).collect())
    }
    match like {
        TensorData::I8(_) => conv::<i8>(v),
        TensorData::I16(_) => conv::<i16>(v),
        TensorData::I32(_) => conv::<i32>(v),
        TensorData::I64(_) => conv::<i64>(v),
        TensorData::U8(_) => conv::<u8>(v),
        TensorData::U16(_) => conv::<u16>(v),
        TensorData::U32(_) => conv::<u32>(v),
        TensorData::U64(_) => conv::<u64>(v),
        TensorData::Bool(_) => conv::<bool>(v),
        TensorData::I4(_) => retag(conv::<i8>(v), DType::I4),
        TensorData::U4(_) => retag(conv::<u8>(v), DType::U4),
        _ => TensorData::from_f64s(like.dtype(), v.iter().map(|&x| x as f64)),
    }
}

pub fn where_(c: &Tensor, x: &Tensor, y: &Tensor) -> KResult<Tensor> {
    let TensorData::Bool(cv) = &c.data else {
        return err("condition must be bool");
    };
    if x.dtype() != y.dtype() {
        return err(format!(
            "X and Y types differ: {} and {}",
            x.dtype(),
            y.dtype()
        ));
    }
    let out = broadcast_shapes(&[&c.shape, &x.shape, &y.shape])?;
    let ic = broadcast_index(&c.shape, &out);
    let ix = broadcast_index(&x.shape, &out);
    let iy = broadcast_index(&y.shape, &out);
    // Gather from the concatenation [x; y].
    let nx = x.numel();
    let idx: Vec<usize> = (0..ic.len())
        .map(|k| if cv[ic[k]] { ix[k] } else { nx + iy[k] })
        .collect();
    let joined = concat_data(&[&x.data, &y.data])?;
    Ok(Tensor::new(out, joined.gather(&idx)))
}

/// Concatenates data of the same type end to end.
pub fn concat_data(parts: &[&TensorData]) -> KResult<TensorData> {
    let Some(first) = parts.first() else {
        return err("nothing to concatenate");
    };
    let dtype = first.dtype();
    if parts.iter().any(|p| p.dtype() != dtype) {
        return err("inputs must have the same type");
    }
    macro_rules! cat {
        ($($var:ident),*) => {
            match first {
                $(TensorData::$var(_) => {
                    let mut out = Vec::with_capacity(parts.iter().map(|p| p.len()).sum());
                    for p in parts {
                        if let TensorData::$var(v) = p { out.extend_from_slice(v); }
                    }
                    TensorData::$var(out)
                })*
            }
        };
    }
    Ok(cat!(
        F32, F64, F16, BF16, I8, I16, I32, I64, U8, U16, U32, U64, Bool, I4, U4
    ))
}

pub fn clip(ins: &[Option<&Tensor>], amin: Option<f32>, amax: Option<f32>) -> KResult<Tensor> {
    let x = input(ins, 0)?;
    let bound = |i: usize, attr: Option<f32>| -> KResult<Option<f64>> {
        if let Some(a) = attr {
            return Ok(Some(a as f64));
        }
        match opt_input(ins, i) {
            Some(t) if t.numel() == 1 => Ok(Some(t.to_f64_vec()[0])),
            Some(t) => err(format!(
                "Clip bound must be a scalar, got shape {:?}",
                t.shape
            )),
            None => Ok(None),
        }
    };
    let lo = bound(1, amin)?;
    let hi = bound(2, amax)?;
    if x.dtype().is_float() {
        let v: Vec<f64> = x
            .to_f64_vec()
            .into_iter()
            .map(|mut e| {
                if let Some(l) = lo {
                    if e < l {
                        e = l
                    }
                }
                if let Some(h) = hi {
                    if e > h {
                        e = h
                    }
                }
                e
            })
            .collect();
        return Ok(float_tensor(x.dtype(), x.shape.clone(), v));
    }
    let lo = lo.map(|l| l as i64);
    let hi = hi.map(|h| h as i64);
    let v: Vec<i64> = x
        .to_i64_vec()
        .into_iter()
        .map(|mut e| {
            if let Some(l) = lo {
                e = e.max(l);
            }
            if let Some(h) = hi {
                e = e.min(h);
            }
            e
        })
        .collect();
    Ok(Tensor::new(x.shape.clone(), int_data_like(&x.data, &v)))
}

pub fn cast(x: &Tensor, to: DType, _saturate: bool) -> KResult<Tensor> {
    if x.dtype() == to {
        return Ok(x.clone());
    }
    let to_4bit = matches!(to, DType::I4 | DType::U4);
    let data = if x.dtype().is_float() && to_4bit {
        // Casts to 4-bit types truncate, then wrap like any narrowing integer cast.
        let v: Vec<i64> = x
            .to_f64_vec()
            .iter()
            .map(|&f| if f.is_nan() { 0 } else { f.trunc() as i64 })
            .collect();
        wrap_to_int(&v, to)
    } else if x.dtype().is_float() && !to.is_float() {
        // Float -> integer truncates toward zero; NaN -> 0 (numpy gives an unspecified value).
        if to == DType::Bool {
            TensorData::Bool(x.to_f64_vec().iter().map(|&f| f != 0.0).collect())
        } else {
            TensorData::from_f64s(
                to,
                x.to_f64_vec()
                    .into_iter()
                    .map(|f| if f.is_nan() { 0.0 } else { f.trunc() }),
            )
        }
    } else if x.dtype().is_float() || to.is_float() {
        if x.dtype() == DType::U64 {
            let v = x.to_i64_vec();
            TensorData::from_f64s(to, v.into_iter().map(|i| i as u64 as f64))
        } else {
            TensorData::from_f64s(to, x.to_f64_vec().into_iter())
        }
    } else {
        // Integer/bool to integer/bool: two's complement wrap, bool is x != 0.
        wrap_to_int(&x.to_i64_vec(), to)
    };
    Ok(Tensor::new(x.shape.clone(), data))
}

/// Integer values to an integer or bool type with two's complement wrapping.
fn wrap_to_int(v: &[i64], to: DType) -> TensorData {
    match to {
        DType::Bool => TensorData::Bool(v.iter().map(|&i| i != 0).collect()),
        DType::I4 => TensorData::I4(v.iter().map(|&i| ((i as i8) << 4) >> 4).collect()),
        DType::U4 => TensorData::U4(v.iter().map(|&i| (i as u8) & 0xF).collect()),
        _ => int_data_like(&TensorData::zeros(to, 0), v),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn erf_matches_known_values() {
        for (x, want) in [
            (0.0, 0.0),
            (0.5, 0.520_499_877_813_046_5),
            (1.0, 0.842_700_792_949_714_9),
            (2.0, 0.995_322_265_018_952_7),
            (3.0, 0.999_977_909_503_001_4),
            (-1.5, -0.966_105_146_475_310_7),
        ] {
            assert!(
                (erf(x) - want).abs() < 1e-14,
                "erf({x}) = {} want {want}",
                erf(x)
            );
        }
    }

    #[test]
    fn broadcasting_add_and_compare() {
        let a = Tensor::from_vec(vec![2, 1], vec![1.0f32, 2.0]);
        let b = Tensor::from_vec(vec![3], vec![10.0f32, 20.0, 30.0]);
        let s = binary(BinaryOp::Add, &a, &b).unwrap();
        assert_eq!(s.shape, vec![2, 3]);
        assert_eq!(
            s.as_slice::<f32>().unwrap(),
            &[11.0, 21.0, 31.0, 12.0, 22.0, 32.0]
        );
        let c = binary(BinaryOp::Less, &a, &Tensor::scalar(1.5f32)).unwrap();
        assert_eq!(c.as_slice::<bool>().unwrap(), &[true, false]);
    }

    #[test]
    fn integer_mod_follows_divisor_sign() {
        let a = Tensor::from_vec(vec![4], vec![-4i32, 7, 5, -5]);
        let b = Tensor::from_vec(vec![4], vec![3i32, -3, 2, 2]);
        let m = binary(BinaryOp::Mod { fmod: false }, &a, &b).unwrap();
        assert_eq!(m.as_slice::<i32>().unwrap(), &[2, -2, 1, 1]);
        let f = binary(BinaryOp::Mod { fmod: true }, &a, &b).unwrap();
        assert_eq!(f.as_slice::<i32>().unwrap(), &[-1, 1, 1, -1]);
    }
}
