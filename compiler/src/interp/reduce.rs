//! Reductions along axes (the Reduce* family, ArgMax/ArgMin), Softmax/LogSoftmax/Hardmax,
//! CumSum and TopK. Floats accumulate in f64, integers in i64.

use super::elementwise::retag;
use super::util::*;
use crate::dtype::DType;
use crate::ir::{ReduceKind, SoftmaxKind};
use crate::tensor::{Tensor, TensorData};

/// Normalised, sorted, de-duplicated reduction axes.
fn norm_axes(axes: &[i64], rank: usize) -> KResult<Vec<usize>> {
    let mut v: Vec<usize> = axes
        .iter()
        .map(|&a| axis(a, rank))
        .collect::<KResult<_>>()?;
    v.sort();
    v.dedup();
    Ok(v)
}

pub fn reduce(
    kind: ReduceKind,
    ins: &[Option<&Tensor>],
    attr_axes: Option<&[i64]>,
    keepdims: bool,
    noop: bool,
) -> KResult<Tensor> {
    let x = input(ins, 0)?;
    let axes: Vec<i64> = match attr_axes {
        Some(a) => a.to_vec(),
        None => opt_input(ins, 1)
            .map(ints_of)
            .transpose()?
            .unwrap_or_default(),
    };
    if axes.is_empty() && noop {
        return Ok(x.clone());
    }
    let rank = x.rank();
    let red: Vec<usize> = if axes.is_empty() {
        (0..rank).collect()
    } else {
        norm_axes(&axes, rank)?
    };
    let keep_shape: Vec<usize> = (0..rank)
        .map(|d| if red.contains(&d) { 1 } else { x.shape[d] })
        .collect();
    let out_shape: Vec<usize> = if keepdims {
        keep_shape.clone()
    } else {
        (0..rank)
            .filter(|d| !red.contains(d))
            .map(|d| x.shape[d])
            .collect()
    };
    let n_out: usize = keep_shape.iter().product();
    let oi = broadcast_index(&keep_shape, &x.shape); // for each input element, its output slot
    let count: usize = red.iter().map(|&d| x.shape[d]).product();
    // reduce index: broadcast_index maps out->in; we need in->out: compute directly.
    let in_to_out = in_to_out_index(&x.shape, &keep_shape);
    let _ = oi;
    let dtype = x.dtype();
    if dtype.is_float() {
        let v = x.to_f64_vec();
        let init = match kind {
            ReduceKind::Max => f64::NEG_INFINITY,
            ReduceKind::Min => f64::INFINITY,
            ReduceKind::Prod => 1.0,
            _ => 0.0,
        };
        let mut acc = vec![init; n_out];
        if kind == ReduceKind::LogSumExp {
            // Stable: subtract the per-slot maximum.
            let mut mx = vec![f64::NEG_INFINITY; n_out];
            for (i, &o) in in_to_out.iter().enumerate() {
                mx[o] = mx[o].max(v[i]);
            }
            for (i, &o) in in_to_out.iter().enumerate() {
                acc[o] += (v[i] - mx[o]).exp();
            }
            let r: Vec<f64> = acc
                .iter()
                .zip(&mx)
                .map(|(&s, &m)| {
                    if m.is_infinite() {
                        m.min(s.ln())
                    } else {
                        m + s.ln()
                    }
                })
                .collect();
            return Ok(float_tensor(dtype, out_shape, r));
        }
        for (i, &o) in in_to_out.iter().enumerate() {
            let e = v[i];
            let a = &mut acc[o];
            match kind {
                ReduceKind::Sum | ReduceKind::Mean | ReduceKind::LogSum => *a += e,
                ReduceKind::Max => {
                    *a = if e.is_nan() || a.is_nan() {
                        f64::NAN
                    } else {
                        a.max(e)
                    }
                }
                ReduceKind::Min => {
                    *a = if e.is_nan() || a.is_nan() {
                        f64::NAN
                    } else {
                        a.min(e)
                    }
                }
                ReduceKind::Prod => *a *= e,
                ReduceKind::L1 => *a += e.abs(),
                ReduceKind::L2 | ReduceKind::SumSquare => *a += e * e,
                ReduceKind::LogSumExp => unreachable!(),
            }
        }
        for a in acc.iter_mut() {
            match kind {
                ReduceKind::Mean => *a /= count as f64,
                ReduceKind::L2 => *a = a.sqrt(),
                ReduceKind::LogSum => *a = a.ln(),
                _ => {}
            }
        }
        return Ok(float_tensor(dtype, out_shape, acc));
    }
    if dtype == DType::Bool {
        // Opset 20 allows ReduceMax/ReduceMin on bool (any / all).
        if !matches!(kind, ReduceKind::Max | ReduceKind::Min) {
            return err(format!("{kind:?} is not defined for bool"));
        }
        let v = x.to_i64_vec();
        let mut acc = vec![kind == ReduceKind::Min && count > 0; n_out];
        if count > 0 {
            for (i, &o) in in_to_out.iter().enumerate() {
                acc[o] = if kind == ReduceKind::Max {
                    acc[o] || v[i] != 0
                } else {
                    acc[o] && v[i] != 0
                };
            }
        }
        return Ok(Tensor::from_vec(out_shape, acc));
    }
    let v = x.to_i64_vec();
    let (lo, hi) = int_range(dtype);
    let init = match kind {
        ReduceKind::Max => lo,
        ReduceKind::Min => hi,
        ReduceKind::Prod => 1,
        _ => 0,
    };
    let mut acc = vec![init; n_out];
    for (i, &o) in in_to_out.iter().enumerate() {
        let e = v[i];
        let a = &mut acc[o];
        match kind {
            ReduceKind::Sum | ReduceKind::Mean => *a = a.wrapping_add(e),
            ReduceKind::Max => *a = (*a).max(e),
            ReduceKind::Min => *a = (*a).min(e),
            ReduceKind::Prod => *a = a.wrapping_mul(e),
            ReduceKind::L1 => *a += e.abs(),
            ReduceKind::SumSquare => *a = a.wrapping_add(e.wrapping_mul(e)),
            ReduceKind::L2 | ReduceKind::LogSum | ReduceKind::LogSumExp => *a = a.wrapping_add(e),
        }
    }
    let out: Vec<f64> = acc
        .iter()
        .map(|&a| match kind {
            ReduceKind::Mean => (a / count.max(1) as i64) as f64,
            ReduceKind::L2 => ((a as f64).sqrt()).floor(),
            _ => a as f64,
        })
        .collect();
    if matches!(kind, ReduceKind::L2) {
        // Integer L2 follows the reference: sqrt of the sum of squares, cast back.
        let mut sq = vec![0i64; n_out];
        for (i, &o) in in_to_out.iter().enumerate() {
            sq[o] += v[i] * v[i];
        }
        let r: Vec<f64> = sq.iter().map(|&s| (s as f64).sqrt().trunc()).collect();
        return Ok(Tensor::new(
            out_shape,
            retag(TensorData::from_f64s(dtype, r.into_iter()), dtype),
        ));
    }
    if dtype == DType::I64 || dtype == DType::U64 {
        let data = match dtype {
            DType::I64 => TensorData::I64(acc),
            _ => TensorData::U64(acc.iter().map(|&a| a as u64).collect()),
        };
        return Ok(Tensor::new(out_shape, data));
    }
    Ok(Tensor::new(
        out_shape,
        retag(TensorData::from_f64s(dtype, out.into_iter()), dtype),
    ))
}

fn int_range(dt: DType) -> (i64, i64) {
    match dt {
        DType::I8 => (i8::MIN as i64, i8::MAX as i64),
        DType::I16 => (i16::MIN as i64, i16::MAX as i64),
        DType::I32 => (i32::MIN as i64, i32::MAX as i64),
        DType::U8 => (0, u8::MAX as i64),
        DType::U16 => (0, u16::MAX as i64),
        DType::U32 => (0, u32::MAX as i64),
        DType::U64 => (0, i64::MAX),
        DType::I4 => (-8, 7),
        DType::U4 => (0, 15),
        _ => (i64::MIN, i64::MAX),
    }
}

/// For every element of `in_shape`, its flat index in `out_shape` (same rank; reduced dims 1).
pub fn in_to_out_index(in_shape: &[usize], out_shape: &[usize]) -> Vec<usize> {
    let n: usize = in_shape.iter().product();
    let rank = in_shape.len();
    let ost = crate::tensor::strides(out_shape);
    let st: Vec<usize> = (0..rank)
        .map(|d| if out_shape[d] == 1 { 0 } else { ost[d] })
        .collect();
    let mut idx = Vec::with_capacity(n);
    let mut counter = vec![0usize; rank];
    let mut cur = 0usize;
    for _ in 0..n {
        idx.push(cur);
        for d in (0..rank).rev() {
            counter[d] += 1;
            cur += st[d];
            if counter[d] < in_shape[d] {
                break;
            }
            cur -= st[d] * counter[d];
            counter[d] = 0;
        }
    }
    idx
}

pub fn arg_reduce(x: &Tensor, max: bool, ax: i64, keepdims: bool, last: bool) -> KResult<Tensor> {
    let a = axis(ax, x.rank())?;
    let (outer, len, inner) = split_at_axis(&x.shape, a);
    if len == 0 {
        return err("ArgMax/ArgMin over an empty axis");
    }
    let v = x.to_f64_vec();
    let mut out = Vec::with_capacity(outer * inner);
    for o in 0..outer {
        for i in 0..inner {
            let mut best = 0usize;
            let mut bv = v[o * len * inner + i];
            for k in 1..len {
                let e = v[(o * len + k) * inner + i];
                let better = if max {
                    e > bv || (last && e == bv)
                } else {
                    e < bv || (last && e == bv)
                };
                if better {
                    best = k;
                    bv = e;
                }
            }
            out.push(best as i64);
        }
    }
    let mut shape = x.shape.clone();
    if keepdims {
        shape[a] = 1;
    } else {
        shape.remove(a);
    }
    Ok(Tensor::from_vec(shape, out))
}

pub fn softmax(x: &Tensor, kind: SoftmaxKind, ax: i64, coerce_2d: bool) -> KResult<Tensor> {
    let a = axis(ax, x.rank())?;
    let (outer, len, inner) = if coerce_2d {
        let outer: usize = x.shape[..a].iter().product();
        (outer, x.shape[a..].iter().product(), 1)
    } else {
        split_at_axis(&x.shape, a)
    };
    let v = floats_of(x)?;
    let mut out = vec![0f64; v.len()];
    for o in 0..outer {
        for i in 0..inner {
            let at = |k: usize| (o * len + k) * inner + i;
            let mut m = f64::NEG_INFINITY;
            let mut arg = 0;
            for k in 0..len {
                if v[at(k)] > m {
                    m = v[at(k)];
                    arg = k;
                }
            }
            match kind {
                SoftmaxKind::Hardmax => {
                    out[at(arg)] = 1.0;
                }
                SoftmaxKind::Softmax | SoftmaxKind::LogSoftmax => {
                    let mut s = 0.0;
                    for k in 0..len {
                        s += (v[at(k)] - m).exp();
                    }
                    for k in 0..len {
                        out[at(k)] = if kind == SoftmaxKind::Softmax {
                            (v[at(k)] - m).exp() / s
                        } else {
                            v[at(k)] - m - s.ln()
                        };
                    }
                }
            }
        }
    }
    Ok(float_tensor(x.dtype(), x.shape.clone(), out))
}

pub fn cumsum(x: &Tensor, axis_t: &Tensor, exclusive: bool, reverse: bool) -> KResult<Tensor> {
    let ax = ints_of(axis_t)?;
    let Some(&ax) = ax.first() else {
        return err("CumSum axis must be a scalar");
    };
    let a = axis(ax, x.rank())?;
    let (outer, len, inner) = split_at_axis(&x.shape, a);
    let float = x.dtype().is_float();
    let vf = if float { x.to_f64_vec() } else { vec![] };
    let vi = if float { vec![] } else { x.to_i64_vec() };
    let mut of = vec![0f64; vf.len()];
    let mut oi = vec![0i64; vi.len()];
    for o in 0..outer {
        for i in 0..inner {
            let mut sf = 0f64;
            let mut si = 0i64;
            for step in 0..len {
                let k = if reverse { len - 1 - step } else { step };
                let at = (o * len + k) * inner + i;
                if exclusive {
                    if float {
                        of[at] = sf;
                        sf += vf[at];
                    } else {
                        oi[at] = si;
                        si = si.wrapping_add(vi[at]);
                    }
                } else if float {
                    sf += vf[at];
                    of[at] = sf;
                } else {
                    si = si.wrapping_add(vi[at]);
                    oi[at] = si;
                }
            }
        }
    }
    let data = if float {
        TensorData::from_f64s(x.dtype(), of.into_iter())
    } else {
        match x.dtype() {
            DType::I64 => TensorData::I64(oi),
            dt => TensorData::from_f64s(dt, oi.into_iter().map(|v| v as f64)),
        }
    };
    Ok(Tensor::new(x.shape.clone(), data))
}

pub fn topk(
    ins: &[Option<&Tensor>],
    ax: i64,
    largest: bool,
    sorted: bool,
    k_attr: Option<i64>,
) -> KResult<Vec<Tensor>> {
    let _ = sorted;
    let x = input(ins, 0)?;
    let k = match k_attr {
        Some(k) => k,
        None => {
            let kt = ints_of(input(ins, 1)?)?;
            *kt.first()
                .ok_or_else(|| KernelError("TopK k must have one element".into()))?
        }
    };
    let a = axis(ax, x.rank())?;
    let (outer, len, inner) = split_at_axis(&x.shape, a);
    if k < 0 || k as usize > len {
        return err(format!("TopK k={k} is out of range for axis length {len}"));
    }
    let k = k as usize;
    let v = x.to_f64_vec();
    let mut idx_out = Vec::with_capacity(outer * k * inner);
    let mut src = Vec::with_capacity(outer * k * inner);
    let mut picks = vec![0usize; outer * k * inner];
    for o in 0..outer {
        for i in 0..inner {
            let mut order: Vec<usize> = (0..len).collect();
            order.sort_by(|&p, &q| {
                let (vp, vq) = (v[(o * len + p) * inner + i], v[(o * len + q) * inner + i]);
                let c = if largest {
                    vq.partial_cmp(&vp)
                } else {
                    vp.partial_cmp(&vq)
                };
                c.unwrap_or(std::cmp::Ordering::Equal).then(p.cmp(&q))
            });
            for (j, &p) in order.iter().take(k).enumerate() {
                picks[(o * k + j) * inner + i] = p;
            }
        }
    }
    for o in 0..outer {
        for j in 0..k {
            for i in 0..inner {
                let p = picks[(o * k + j) * inner + i];
                idx_out.push(p as i64);
                src.push((o * len + p) * inner + i);
            }
        }
    }
    let mut shape = x.shape.clone();
    shape[a] = k;
    Ok(vec![
        Tensor::new(shape.clone(), x.data.gather(&src)),
        Tensor::from_vec(shape, idx_out),
    ])
}
