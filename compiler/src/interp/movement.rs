//! Shape and data-movement kernels (Reshape, Transpose, Concat, Split, Slice, the Gather and
//! Scatter families, Expand, Squeeze/Unsqueeze, Flatten, Shape, Range, Tile, Pad, ...). Most
//! compute, for every output element, the flat index of its source and then gather; that one
//! code path serves every element type.

use super::elementwise::concat_data;
use super::util::*;
use crate::dtype::DType;
use crate::ir::{PadMode, ScatterReduction, SliceAttrs};
use crate::tensor::{numel, strides, Tensor, TensorData};

/// For each element of the permuted output, the flat index in the input.
pub fn permute_index(in_shape: &[usize], perm: &[usize]) -> Vec<usize> {
    let ist = strides(in_shape);
    let out_shape: Vec<usize> = perm.iter().map(|&p| in_shape[p]).collect();
    let st: Vec<usize> = perm.iter().map(|&p| ist[p]).collect();
    index_with_strides(&out_shape, &st, 0)
}

/// Flat offsets `base + sum(idx[d] * st[d])` for every multi-index of `shape` (row-major).
pub fn index_with_strides(shape: &[usize], st: &[usize], base: usize) -> Vec<usize> {
    let n = numel(shape);
    let rank = shape.len();
    let mut out = Vec::with_capacity(n);
    let mut counter = vec![0usize; rank];
    let mut cur = base;
    for _ in 0..n {
        out.push(cur);
        for d in (0..rank).rev() {
            counter[d] += 1;
            cur += st[d];
            if counter[d] < shape[d] {
                break;
            }
            cur -= st[d] * counter[d];
            counter[d] = 0;
        }
    }
    out
}

fn permute(t: &Tensor, perm: &[usize]) -> Tensor {
    let idx = permute_index(&t.shape, perm);
    Tensor::new(
        perm.iter().map(|&p| t.shape[p]).collect(),
        t.data.gather(&idx),
    )
}

pub fn reshape(x: &Tensor, shape: &Tensor, allowzero: bool) -> KResult<Tensor> {
    let s = ints_of(shape)?;
    let out = resolve_reshape(&x.shape, &s, allowzero)?;
    Ok(x.reshaped(out))
}

/// Applies Reshape's rules (0 copies a dim unless `allowzero`, one -1 is inferred).
pub fn resolve_reshape(in_shape: &[usize], s: &[i64], allowzero: bool) -> KResult<Vec<usize>> {
    let total = numel(in_shape);
    let mut out = Vec::with_capacity(s.len());
    let mut infer = None;
    for (i, &d) in s.iter().enumerate() {
        match d {
            -1 => {
                if infer.is_some() {
                    return err("Reshape shape has more than one -1");
                }
                infer = Some(i);
                out.push(1);
            }
            0 if !allowzero => out.push(
                *in_shape
                    .get(i)
                    .ok_or_else(|| KernelError(format!("Reshape 0 at {i} has no input dim")))?,
            ),
            d if d < 0 => return err(format!("Reshape dim {d} is invalid")),
            d => out.push(d as usize),
        }
    }
    let known: usize = out.iter().product();
    if let Some(i) = infer {
        if known == 0 || !total.is_multiple_of(known) {
            return err(format!("cannot reshape {in_shape:?} to {s:?}"));
        }
        out[i] = total / known;
    } else if known != total {
        return err(format!(
            "cannot reshape {in_shape:?} ({total} elements) to {out:?}"
        ));
    }
    Ok(out)
}

pub fn transpose(x: &Tensor, perm: Option<&[i64]>) -> KResult<Tensor> {
    let r = x.rank();
    let perm: Vec<usize> = match perm {
        Some(p) => p.iter().map(|&a| axis(a, r)).collect::<KResult<_>>()?,
        None => (0..r).rev().collect(),
    };
    let mut seen = perm.clone();
    seen.sort();
    if seen != (0..r).collect::<Vec<_>>() {
        return err(format!("perm {perm:?} is not a permutation of rank {r}"));
    }
    Ok(permute(x, &perm))
}

pub fn concat(ins: &[Option<&Tensor>], ax: i64) -> KResult<Tensor> {
    let ts: Vec<&Tensor> = ins.iter().flatten().copied().collect();
    let Some(first) = ts.first() else {
        return err("Concat needs inputs");
    };
    let r = first.rank();
    let a = axis(ax, r)?;
    for t in &ts {
        if t.rank() != r || (0..r).any(|d| d != a && t.shape[d] != first.shape[d]) {
            return err(format!(
                "Concat inputs {:?} and {:?} do not match off axis {a}",
                first.shape, t.shape
            ));
        }
    }
    let outer: usize = first.shape[..a].iter().product();
    let inner: usize = first.shape[a + 1..].iter().product();
    let mut out_shape = first.shape.clone();
    out_shape[a] = ts.iter().map(|t| t.shape[a]).sum();
    let mut offsets = Vec::with_capacity(ts.len());
    let mut off = 0;
    for t in &ts {
        offsets.push(off);
        off += t.numel();
    }
    let mut idx = Vec::with_capacity(numel(&out_shape));
    for o in 0..outer {
        for (t, &base) in ts.iter().zip(&offsets) {
            let chunk = t.shape[a] * inner;
            idx.extend(base + o * chunk..base + (o + 1) * chunk);
        }
    }
    let datas: Vec<&TensorData> = ts.iter().map(|t| &t.data).collect();
    Ok(Tensor::new(out_shape, concat_data(&datas)?.gather(&idx)))
}

/// Slices `[start, start+len)` of axis `a`.
fn take_range(x: &Tensor, a: usize, start: usize, len: usize) -> Tensor {
    let (outer, dim, inner) = split_at_axis(&x.shape, a);
    let mut idx = Vec::with_capacity(outer * len * inner);
    for o in 0..outer {
        idx.extend((o * dim + start) * inner..(o * dim + start + len) * inner);
    }
    let mut shape = x.shape.clone();
    shape[a] = len;
    Tensor::new(shape, x.data.gather(&idx))
}

pub fn split(
    ins: &[Option<&Tensor>],
    ax: i64,
    attr: Option<&[i64]>,
    num_outputs: Option<usize>,
    n_out: usize,
) -> KResult<Vec<Tensor>> {
    let x = input(ins, 0)?;
    let a = axis(ax, x.rank())?;
    let len = x.shape[a];
    let sizes: Vec<usize> = if let Some(s) = attr
        .map(|s| s.to_vec())
        .or(opt_input(ins, 1).map(ints_of).transpose()?)
    {
        if s.iter().any(|&v| v < 0) || s.iter().sum::<i64>() as usize != len {
            return err(format!("split sizes {s:?} do not add up to {len}"));
        }
        s.iter().map(|&v| v as usize).collect()
    } else {
        let parts = num_outputs.unwrap_or(n_out).max(1);
        let chunk = len.div_ceil(parts);
        if num_outputs.is_none() && len % parts != 0 {
            return err(format!(
                "axis length {len} does not split evenly into {parts} outputs"
            ));
        }
        (0..parts)
            .map(|i| chunk.min(len.saturating_sub(i * chunk)))
            .collect()
    };
    let mut out = Vec::with_capacity(sizes.len());
    let mut start = 0;
    for s in sizes {
        out.push(take_range(x, a, start, s));
        start += s;
    }
    Ok(out)
}

/// Resolved Slice geometry: for every axis the first index, the step and the output length.
#[derive(Debug, Clone, PartialEq)]
pub struct SliceGeometry {
    pub start: Vec<i64>,
    pub step: Vec<i64>,
    pub count: Vec<usize>,
}

/// Applies ONNX Slice clamping rules to `shape`.
pub fn slice_geometry(
    shape: &[usize],
    starts: &[i64],
    ends: &[i64],
    axes: Option<&[i64]>,
    steps: Option<&[i64]>,
) -> KResult<SliceGeometry> {
    let r = shape.len();
    let axes: Vec<i64> = axes
        .map(|a| a.to_vec())
        .unwrap_or_else(|| (0..starts.len() as i64).collect());
    let steps: Vec<i64> = steps
        .map(|s| s.to_vec())
        .unwrap_or_else(|| vec![1; starts.len()]);
    if ends.len() != starts.len() || axes.len() != starts.len() || steps.len() != starts.len() {
        return err("Slice starts/ends/axes/steps lengths differ");
    }
    let mut g = SliceGeometry {
        start: vec![0; r],
        step: vec![1; r],
        count: shape.to_vec(),
    };
    for i in 0..starts.len() {
        let a = axis(axes[i], r)?;
        let dim = shape[a] as i64;
        let step = steps[i];
        if step == 0 {
            return err("Slice step must not be 0");
        }
        let clampv = |v: i64, lo: i64, hi: i64| v.max(lo).min(hi);
        let mut s = starts[i];
        let mut e = ends[i];
        if s < 0 {
            s = s.saturating_add(dim);
        }
        if e < 0 {
            e = e.saturating_add(dim);
        }
        let (s, e) = if step > 0 {
            (clampv(s, 0, dim), clampv(e, 0, dim))
        } else {
            (clampv(s, 0, dim - 1), clampv(e, -1, dim - 1))
        };
        let n = if step > 0 {
            (e - s).max(0).div_ceil_i(step)
        } else {
            (s - e).max(0).div_ceil_i(-step)
        };
        g.start[a] = s;
        g.step[a] = step;
        g.count[a] = n as usize;
    }
    Ok(g)
}

pub fn slice(ins: &[Option<&Tensor>], attrs: Option<&SliceAttrs>) -> KResult<Tensor> {
    let x = input(ins, 0)?;
    let r = x.rank();
    let g = match attrs {
        Some(a) => slice_geometry(&x.shape, &a.starts, &a.ends, a.axes.as_deref(), None)?,
        None => {
            let axes = opt_input(ins, 3).map(ints_of).transpose()?;
            let steps = opt_input(ins, 4).map(ints_of).transpose()?;
            slice_geometry(
                &x.shape,
                &ints_of(input(ins, 1)?)?,
                &ints_of(input(ins, 2)?)?,
                axes.as_deref(),
                steps.as_deref(),
            )?
        }
    };
    let (st, sp, cnt) = (g.start, g.step, g.count);
    let ist = strides(&x.shape);
    let n = numel(&cnt);
    let mut idx = Vec::with_capacity(n);
    let mut counter = vec![0usize; r];
    for _ in 0..n {
        let mut off = 0i64;
        for d in 0..r {
            off += (st[d] + counter[d] as i64 * sp[d]) * ist[d] as i64;
        }
        idx.push(off as usize);
        for d in (0..r).rev() {
            counter[d] += 1;
            if counter[d] < cnt[d] {
                break;
            }
            counter[d] = 0;
        }
    }
    Ok(Tensor::new(cnt, x.data.gather(&idx)))
}

trait DivCeilI {
    fn div_ceil_i(self, d: i64) -> i64;
}
impl DivCeilI for i64 {
    fn div_ceil_i(self, d: i64) -> i64 {
        (self + d - 1) / d
    }
}

pub fn gather(x: &Tensor, indices: &Tensor, ax: i64) -> KResult<Tensor> {
    let a = axis(ax, x.rank())?;
    let (outer, dim, inner) = split_at_axis(&x.shape, a);
    let ind = ints_of(indices)?;
    let mut norm = Vec::with_capacity(ind.len());
    for &i in &ind {
        let j = if i < 0 { i + dim as i64 } else { i };
        if j < 0 || j >= dim as i64 {
            return err(format!(
                "Gather index {i} is out of range for axis of length {dim}"
            ));
        }
        norm.push(j as usize);
    }
    let mut idx = Vec::with_capacity(outer * norm.len() * inner);
    for o in 0..outer {
        for &j in &norm {
            idx.extend((o * dim + j) * inner..(o * dim + j + 1) * inner);
        }
    }
    let mut shape = x.shape[..a].to_vec();
    shape.extend(&indices.shape);
    shape.extend(&x.shape[a + 1..]);
    Ok(Tensor::new(shape, x.data.gather(&idx)))
}

fn norm_index(i: i64, dim: usize) -> KResult<usize> {
    let j = if i < 0 { i + dim as i64 } else { i };
    if j < 0 || j >= dim as i64 {
        return err(format!(
            "index {i} is out of range for a dimension of {dim}"
        ));
    }
    Ok(j as usize)
}

pub fn gather_elements(x: &Tensor, indices: &Tensor, ax: i64) -> KResult<Tensor> {
    let a = axis(ax, x.rank())?;
    if indices.rank() != x.rank() {
        return err("GatherElements data and indices ranks differ");
    }
    let ind = ints_of(indices)?;
    let xst = strides(&x.shape);
    let ist = strides(&indices.shape);
    let mut idx = Vec::with_capacity(ind.len());
    for (flat, &i) in ind.iter().enumerate() {
        let mut off = 0;
        let mut rem = flat;
        for d in 0..x.rank() {
            let c = rem / ist[d];
            rem %= ist[d];
            let c = if d == a {
                norm_index(i, x.shape[a])?
            } else {
                c
            };
            off += c * xst[d];
        }
        idx.push(off);
    }
    Ok(Tensor::new(indices.shape.clone(), x.data.gather(&idx)))
}

pub fn gather_nd(x: &Tensor, indices: &Tensor, b: usize) -> KResult<Tensor> {
    let ind = ints_of(indices)?;
    let q = indices.rank();
    if q == 0 {
        return err("GatherND indices must have rank >= 1");
    }
    let k = indices.shape[q - 1];
    if b + k > x.rank() || b >= q || x.shape[..b] != indices.shape[..b] {
        return err("GatherND index depth or batch dims do not match the data");
    }
    let batch: usize = x.shape[..b].iter().product();
    let batch_stride: usize = x.shape[b..].iter().product();
    let slice_shape = &x.shape[b + k..];
    let slice_n = numel(slice_shape);
    let xst = strides(&x.shape);
    // Number of index tuples: all of the indices tensor but its last axis.
    let n_idx: usize = indices.shape[..q - 1].iter().product();
    let per_batch = n_idx / batch.max(1);
    let mut idx = Vec::with_capacity(n_idx * slice_n);
    for t in 0..n_idx {
        let mut off = (t / per_batch.max(1)) * batch_stride;
        for j in 0..k {
            off += norm_index(ind[t * k + j], x.shape[b + j])? * xst[b + j];
        }
        idx.extend(off..off + slice_n);
    }
    let mut shape = indices.shape[..q - 1].to_vec();
    shape.extend(slice_shape);
    Ok(Tensor::new(shape, x.data.gather(&idx)))
}

fn reduce_into(dst: &mut [f64], at: usize, v: f64, r: ScatterReduction) {
    let d = &mut dst[at];
    *d = match r {
        ScatterReduction::None => v,
        ScatterReduction::Add => *d + v,
        ScatterReduction::Mul => *d * v,
        ScatterReduction::Max => d.max(v),
        ScatterReduction::Min => d.min(v),
    };
}

fn rebuild_like(x: &Tensor, v: Vec<f64>, vi: Option<Vec<i64>>) -> Tensor {
    match vi {
        Some(i) if x.dtype() == DType::I64 => Tensor::from_vec(x.shape.clone(), i),
        _ => Tensor::new(
            x.shape.clone(),
            TensorData::from_f64s(x.dtype(), v.into_iter()),
        ),
    }
}

pub fn scatter_elements(
    ins: &[Option<&Tensor>],
    ax: i64,
    red: ScatterReduction,
) -> KResult<Tensor> {
    let x = input(ins, 0)?;
    let indices = input(ins, 1)?;
    let upd = input(ins, 2)?;
    let a = axis(ax, x.rank())?;
    let ind = ints_of(indices)?;
    let uv = upd.to_f64_vec();
    let mut out = x.to_f64_vec();
    let xst = strides(&x.shape);
    let ist = strides(&indices.shape);
    for (flat, &i) in ind.iter().enumerate() {
        let mut off = 0;
        let mut rem = flat;
        for d in 0..x.rank() {
            let c = rem / ist[d];
            rem %= ist[d];
            let c = if d == a {
                norm_index(i, x.shape[a])?
            } else {
                c
            };
            off += c * xst[d];
        }
        reduce_into(&mut out, off, uv[flat], red);
    }
    Ok(rebuild_like(x, out, None))
}

pub fn scatter_nd(ins: &[Option<&Tensor>], red: ScatterReduction) -> KResult<Tensor> {
    let x = input(ins, 0)?;
    let indices = input(ins, 1)?;
    let upd = input(ins, 2)?;
    let ind = ints_of(indices)?;
    let k = *indices
        .shape
        .last()
        .ok_or_else(|| KernelError("ScatterND indices must have rank >= 1".into()))?;
    let xst = strides(&x.shape);
    let slice_n: usize = x.shape[k..].iter().product();
    let uv = upd.to_f64_vec();
    let mut out = x.to_f64_vec();
    for t in 0..ind.len() / k.max(1) {
        let mut off = 0;
        for j in 0..k {
            off += norm_index(ind[t * k + j], x.shape[j])? * xst[j];
        }
        for s in 0..slice_n {
            reduce_into(&mut out, off + s, uv[t * slice_n + s], red);
        }
    }
    Ok(rebuild_like(x, out, None))
}

pub fn expand(x: &Tensor, shape: &Tensor) -> KResult<Tensor> {
    let s: Vec<usize> = ints_of(shape)?.iter().map(|&d| d.max(0) as usize).collect();
    let out = broadcast_shapes(&[&x.shape, &s])?;
    let idx = broadcast_index(&x.shape, &out);
    Ok(Tensor::new(out, x.data.gather(&idx)))
}

pub fn squeeze(ins: &[Option<&Tensor>], attr: Option<&[i64]>) -> KResult<Tensor> {
    let x = input(ins, 0)?;
    let axes = match attr {
        Some(a) => Some(a.to_vec()),
        None => opt_input(ins, 1).map(ints_of).transpose()?,
    };
    let r = x.rank();
    let drop: Vec<usize> = match axes {
        Some(a) => a.iter().map(|&v| axis(v, r)).collect::<KResult<_>>()?,
        None => (0..r).filter(|&d| x.shape[d] == 1).collect(),
    };
    for &d in &drop {
        if x.shape[d] != 1 {
            return err(format!("cannot squeeze axis {d} of size {}", x.shape[d]));
        }
    }
    let shape = (0..r)
        .filter(|d| !drop.contains(d))
        .map(|d| x.shape[d])
        .collect();
    Ok(x.reshaped(shape))
}

pub fn unsqueeze(ins: &[Option<&Tensor>], attr: Option<&[i64]>) -> KResult<Tensor> {
    let x = input(ins, 0)?;
    let axes = match attr {
        Some(a) => a.to_vec(),
        None => ints_of(input(ins, 1)?)?,
    };
    let out_rank = x.rank() + axes.len();
    let mut ax: Vec<usize> = axes
        .iter()
        .map(|&a| axis(a, out_rank))
        .collect::<KResult<_>>()?;
    ax.sort();
    let mut shape = Vec::with_capacity(out_rank);
    let mut src = x.shape.iter();
    for d in 0..out_rank {
        if ax.contains(&d) {
            shape.push(1);
        } else {
            shape.push(
                *src.next()
                    .ok_or_else(|| KernelError("duplicate Unsqueeze axes".into()))?,
            );
        }
    }
    Ok(x.reshaped(shape))
}

pub fn flatten(x: &Tensor, ax: i64) -> KResult<Tensor> {
    let r = x.rank() as i64;
    let a = if ax < 0 { ax + r } else { ax };
    if a < 0 || a > r {
        return err(format!("Flatten axis {ax} is out of range for rank {r}"));
    }
    let a = a as usize;
    Ok(x.reshaped(vec![
        x.shape[..a].iter().product(),
        x.shape[a..].iter().product(),
    ]))
}

/// The `Shape` op on a tensor of shape `dims`.
pub fn shape(dims: &[usize], start: i64, end: Option<i64>) -> Tensor {
    let r = dims.len() as i64;
    let clampv = |v: i64| (if v < 0 { v + r } else { v }).clamp(0, r) as usize;
    let s = clampv(start);
    let e = clampv(end.unwrap_or(r));
    let out: Vec<i64> = if s < e {
        dims[s..e].iter().map(|&d| d as i64).collect()
    } else {
        vec![]
    };
    Tensor::from_vec(vec![out.len()], out)
}

pub fn constant_of_shape(shape: &Tensor, value: &Tensor) -> KResult<Tensor> {
    let s: Vec<usize> = ints_of(shape)?.iter().map(|&d| d.max(0) as usize).collect();
    let n = numel(&s);
    Ok(Tensor::new(s, value.data.gather(&vec![0; n])))
}

pub fn range(start: &Tensor, limit: &Tensor, delta: &Tensor) -> KResult<Tensor> {
    if start.numel() != 1 || limit.numel() != 1 || delta.numel() != 1 {
        return err("Range inputs must be scalars");
    }
    let dt = start.dtype();
    if dt.is_float() {
        let (s, l, d) = (
            start.to_f64_vec()[0],
            limit.to_f64_vec()[0],
            delta.to_f64_vec()[0],
        );
        if d == 0.0 {
            return err("Range delta must not be 0");
        }
        let n = ((l - s) / d).ceil().max(0.0) as usize;
        let v: Vec<f64> = (0..n).map(|i| s + i as f64 * d).collect();
        return Ok(float_tensor(dt, vec![n], v));
    }
    let (s, l, d) = (
        start.to_i64_vec()[0],
        limit.to_i64_vec()[0],
        delta.to_i64_vec()[0],
    );
    if d == 0 {
        return err("Range delta must not be 0");
    }
    let n = if d > 0 {
        (l - s).max(0).div_ceil_i(d)
    } else {
        (s - l).max(0).div_ceil_i(-d)
    } as usize;
    let v: Vec<f64> = (0..n).map(|i| (s + i as i64 * d) as f64).collect();
    Ok(Tensor::new(
        vec![n],
        TensorData::from_f64s(dt, v.into_iter()),
    ))
}

pub fn tile(x: &Tensor, repeats: &Tensor) -> KResult<Tensor> {
    let rep = ints_of(repeats)?;
    if rep.len() != x.rank() || rep.iter().any(|&r| r < 0) {
        return err(format!(
            "Tile repeats {rep:?} do not match rank {}",
            x.rank()
        ));
    }
    let out: Vec<usize> = x
        .shape
        .iter()
        .zip(&rep)
        .map(|(&d, &r)| d * r as usize)
        .collect();
    let ist = strides(&x.shape);
    let n = numel(&out);
    let mut idx = Vec::with_capacity(n);
    let mut counter = vec![0usize; out.len()];
    for _ in 0..n {
        idx.push(
            (0..out.len())
                .map(|d| (counter[d] % x.shape[d]) * ist[d])
                .sum(),
        );
        for d in (0..out.len()).rev() {
            counter[d] += 1;
            if counter[d] < out[d] {
                break;
            }
            counter[d] = 0;
        }
    }
    Ok(Tensor::new(out, x.data.gather(&idx)))
}

pub fn pad(
    ins: &[Option<&Tensor>],
    mode: PadMode,
    attr_pads: Option<&[i64]>,
    attr_value: f32,
) -> KResult<Tensor> {
    let x = input(ins, 0)?;
    let r = x.rank();
    let raw = match attr_pads {
        Some(p) => p.to_vec(),
        None => ints_of(input(ins, 1)?)?,
    };
    let axes: Vec<usize> = match opt_input(ins, 3) {
        Some(a) => ints_of(a)?
            .iter()
            .map(|&v| axis(v, r))
            .collect::<KResult<_>>()?,
        None => (0..r).collect(),
    };
    if raw.len() != 2 * axes.len() {
        return err(format!(
            "Pad pads {raw:?} must have {} entries",
            2 * axes.len()
        ));
    }
    let mut pb = vec![0i64; r];
    let mut pe = vec![0i64; r];
    for (i, &a) in axes.iter().enumerate() {
        pb[a] = raw[i];
        pe[a] = raw[i + axes.len()];
    }
    let out: Vec<usize> = (0..r)
        .map(|d| {
            let v = x.shape[d] as i64 + pb[d] + pe[d];
            if v < 0 {
                err(format!("Pad makes axis {d} negative"))
            } else {
                Ok(v as usize)
            }
        })
        .collect::<KResult<_>>()?;
    let value_t = match (attr_pads, opt_input(ins, 2)) {
        (None, Some(v)) => v.clone(),
        _ => Tensor::new(
            vec![],
            TensorData::from_f64s(x.dtype(), std::iter::once(attr_value as f64)),
        ),
    };
    if value_t.dtype() != x.dtype() || value_t.numel() != 1 {
        return err("Pad constant_value must be a scalar of the input type");
    }
    let sentinel = x.numel();
    let ist = strides(&x.shape);
    let n = numel(&out);
    let mut idx = Vec::with_capacity(n);
    let mut counter = vec![0usize; r];
    for _ in 0..n {
        let mut off = 0usize;
        let mut use_const = false;
        for d in 0..r {
            let dim = x.shape[d] as i64;
            let mut p = counter[d] as i64 - pb[d];
            if p < 0 || p >= dim {
                match mode {
                    PadMode::Constant => {
                        use_const = true;
                        break;
                    }
                    PadMode::Edge => p = p.clamp(0, dim - 1),
                    PadMode::Wrap => p = p.rem_euclid(dim),
                    PadMode::Reflect => {
                        if dim == 1 {
                            p = 0;
                        } else {
                            let period = 2 * (dim - 1);
                            p = p.rem_euclid(period);
                            if p >= dim {
                                p = period - p;
                            }
                        }
                    }
                }
            }
            off += p as usize * ist[d];
        }
        idx.push(if use_const { sentinel } else { off });
        for d in (0..r).rev() {
            counter[d] += 1;
            if counter[d] < out[d] {
                break;
            }
            counter[d] = 0;
        }
    }
    let joined = concat_data(&[&x.data, &value_t.data])?;
    Ok(Tensor::new(out, joined.gather(&idx)))
}

pub fn depth_to_space(x: &Tensor, b: usize, crd: bool) -> KResult<Tensor> {
    if x.rank() != 4 || b == 0 || !x.shape[1].is_multiple_of(b * b) {
        return err(format!(
            "DepthToSpace needs [N,C,H,W] with C divisible by {}",
            b * b
        ));
    }
    let (n, c, h, w) = (x.shape[0], x.shape[1], x.shape[2], x.shape[3]);
    let cc = c / (b * b);
    let t = if crd {
        permute(&x.reshaped(vec![n, cc, b, b, h, w]), &[0, 1, 4, 2, 5, 3])
    } else {
        permute(&x.reshaped(vec![n, b, b, cc, h, w]), &[0, 3, 4, 1, 5, 2])
    };
    Ok(t.reshaped(vec![n, cc, h * b, w * b]))
}

pub fn space_to_depth(x: &Tensor, b: usize) -> KResult<Tensor> {
    if x.rank() != 4 || b == 0 || !x.shape[2].is_multiple_of(b) || !x.shape[3].is_multiple_of(b) {
        return err(format!(
            "SpaceToDepth needs [N,C,H,W] with H and W divisible by {b}"
        ));
    }
    let (n, c, h, w) = (x.shape[0], x.shape[1], x.shape[2], x.shape[3]);
    let t = permute(
        &x.reshaped(vec![n, c, h / b, b, w / b, b]),
        &[0, 3, 5, 1, 2, 4],
    );
    Ok(t.reshaped(vec![n, c * b * b, h / b, w / b]))
}

pub fn trilu(ins: &[Option<&Tensor>], upper: bool) -> KResult<Tensor> {
    let x = input(ins, 0)?;
    let k = match opt_input(ins, 1) {
        Some(t) => *ints_of(t)?
            .first()
            .ok_or_else(|| KernelError("Trilu k must be a scalar".into()))?,
        None => 0,
    };
    if x.rank() < 2 {
        return err("Trilu needs rank >= 2");
    }
    let (rows, cols) = (x.shape[x.rank() - 2], x.shape[x.rank() - 1]);
    let sentinel = x.numel();
    let idx: Vec<usize> = (0..x.numel())
        .map(|f| {
            let j = (f % cols) as i64;
            let i = ((f / cols) % rows) as i64;
            let keep = if upper { j - i >= k } else { j - i <= k };
            if keep {
                f
            } else {
                sentinel
            }
        })
        .collect();
    let zero = TensorData::zeros(x.dtype(), 1);
    Ok(Tensor::new(
        x.shape.clone(),
        concat_data(&[&x.data, &zero])?.gather(&idx),
    ))
}

pub fn one_hot(ins: &[Option<&Tensor>], ax: i64) -> KResult<Tensor> {
    let ind = input(ins, 0)?;
    let depth_t = input(ins, 1)?;
    let values = input(ins, 2)?;
    if values.numel() != 2 {
        return err("OneHot values must hold [off, on]");
    }
    let depth = depth_t
        .to_f64_vec()
        .first()
        .copied()
        .ok_or_else(|| KernelError("OneHot depth is empty".into()))? as i64;
    if depth < 1 {
        return err("OneHot depth must be positive");
    }
    let out_rank = ind.rank() + 1;
    let a = axis(ax, out_rank)?;
    let iv = ind.to_f64_vec();
    let mut shape = ind.shape.clone();
    shape.insert(a, depth as usize);
    let (outer, _, inner) = split_at_axis(&shape, a);
    let mut idx = vec![0usize; numel(&shape)];
    for o in 0..outer {
        for i in 0..inner {
            let mut v = iv[o * inner + i] as i64;
            if v < 0 {
                v += depth;
            }
            if (0..depth).contains(&v) {
                idx[(o * depth as usize + v as usize) * inner + i] = 1;
            }
        }
    }
    Ok(Tensor::new(shape, values.data.gather(&idx)))
}

pub fn non_zero(x: &Tensor) -> Tensor {
    let v = x.to_f64_vec();
    let st = strides(&x.shape);
    let nz: Vec<usize> = (0..v.len()).filter(|&i| v[i] != 0.0).collect();
    let r = x.rank();
    let mut out = vec![0i64; r * nz.len()];
    for (j, &f) in nz.iter().enumerate() {
        let mut rem = f;
        for d in 0..r {
            out[d * nz.len() + j] = (rem / st[d]) as i64;
            rem %= st[d];
        }
    }
    Tensor::from_vec(vec![r, nz.len()], out)
}

pub fn eye_like(x: &Tensor, dtype: Option<DType>, k: i64) -> KResult<Tensor> {
    if x.rank() != 2 {
        return err("EyeLike needs a 2-D input");
    }
    let (r, c) = (x.shape[0], x.shape[1]);
    let v: Vec<f64> = (0..r * c)
        .map(|f| {
            if (f % c) as i64 - (f / c) as i64 == k {
                1.0
            } else {
                0.0
            }
        })
        .collect();
    Ok(Tensor::new(
        x.shape.clone(),
        TensorData::from_f64s(dtype.unwrap_or(x.dtype()), v.into_iter()),
    ))
}

pub fn compress(x: &Tensor, cond: &Tensor, ax: Option<i64>) -> KResult<Tensor> {
    let TensorData::Bool(c) = &cond.data else {
        return err("Compress condition must be bool");
    };
    let (t, a) = match ax {
        Some(a) => (x.clone(), axis(a, x.rank())?),
        None => (x.reshaped(vec![x.numel()]), 0),
    };
    let (outer, dim, inner) = split_at_axis(&t.shape, a);
    let keep: Vec<usize> = (0..dim.min(c.len())).filter(|&i| c[i]).collect();
    let mut idx = Vec::new();
    for o in 0..outer {
        for &k in &keep {
            idx.extend((o * dim + k) * inner..(o * dim + k + 1) * inner);
        }
    }
    let mut shape = t.shape.clone();
    shape[a] = keep.len();
    Ok(Tensor::new(shape, t.data.gather(&idx)))
}

pub fn reverse_sequence(
    x: &Tensor,
    lens: &Tensor,
    batch_axis: usize,
    time_axis: usize,
) -> KResult<Tensor> {
    let l = ints_of(lens)?;
    if batch_axis >= x.rank() || time_axis >= x.rank() {
        return err("ReverseSequence axes out of range");
    }
    let st = strides(&x.shape);
    let idx: Vec<usize> = (0..x.numel())
        .map(|f| {
            let b = (f / st[batch_axis]) % x.shape[batch_axis];
            let t = (f / st[time_axis]) % x.shape[time_axis];
            let len = l.get(b).copied().unwrap_or(0) as usize;
            if t < len {
                f - t * st[time_axis] + (len - 1 - t) * st[time_axis]
            } else {
                f
            }
        })
        .collect();
    Ok(Tensor::new(x.shape.clone(), x.data.gather(&idx)))
}
