//! Helpers shared by the interpreter's kernels: the kernel error type, input access, axis
//! normalisation and numpy-style broadcasting.

use crate::tensor::{strides, Tensor};

#[derive(Debug, Clone, PartialEq)]
pub struct KernelError(pub String);

impl std::fmt::Display for KernelError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

pub type KResult<T> = Result<T, KernelError>;

pub fn err<T>(msg: impl Into<String>) -> KResult<T> {
    Err(KernelError(msg.into()))
}

/// Required input `i`.
pub fn input<'a>(ins: &[Option<&'a Tensor>], i: usize) -> KResult<&'a Tensor> {
    match ins.get(i).copied().flatten() {
        Some(t) => Ok(t),
        None => err(format!("missing required input {i}")),
    }
}

/// Optional input `i`.
pub fn opt_input<'a>(ins: &[Option<&'a Tensor>], i: usize) -> Option<&'a Tensor> {
    ins.get(i).copied().flatten()
}

/// Normalises a possibly negative axis against `rank`.
pub fn axis(a: i64, rank: usize) -> KResult<usize> {
    let r = rank as i64;
    let v = if a < 0 { a + r } else { a };
    if v < 0 || v >= r {
        return err(format!("axis {a} is out of range for rank {rank}"));
    }
    Ok(v as usize)
}

/// Reads an integer tensor (any int type) as i64 values.
pub fn ints_of(t: &Tensor) -> KResult<Vec<i64>> {
    if t.dtype().is_float() || t.dtype() == crate::dtype::DType::Bool {
        return err(format!("expected an integer tensor, got {}", t.dtype()));
    }
    Ok(t.to_i64_vec())
}

/// The broadcast shape of several shapes (numpy rules).
pub fn broadcast_shapes(shapes: &[&[usize]]) -> KResult<Vec<usize>> {
    let rank = shapes.iter().map(|s| s.len()).max().unwrap_or(0);
    let mut out = vec![1usize; rank];
    for s in shapes {
        let off = rank - s.len();
        for (i, &d) in s.iter().enumerate() {
            let o = &mut out[off + i];
            if *o == 1 {
                *o = d;
            } else if d != 1 && d != *o {
                return err(format!("shapes {:?} cannot be broadcast together", shapes));
            }
        }
    }
    Ok(out)
}

/// For every element of `out_shape` (row-major), the flat index into a tensor of `in_shape`
/// broadcast to it.
pub fn broadcast_index(in_shape: &[usize], out_shape: &[usize]) -> Vec<usize> {
    let n: usize = out_shape.iter().product();
    let in_n: usize = in_shape.iter().product();
    if in_shape == out_shape {
        return (0..n).collect();
    }
    if in_n == 1 {
        return vec![0; n];
    }
    let rank = out_shape.len();
    let off = rank - in_shape.len();
    let ist = strides(in_shape);
    let mut bst = vec![0usize; rank];
    for i in 0..in_shape.len() {
        bst[off + i] = if in_shape[i] == 1 { 0 } else { ist[i] };
    }
    let mut idx = Vec::with_capacity(n);
    let mut counter = vec![0usize; rank];
    let mut cur = 0usize;
    for _ in 0..n {
        idx.push(cur);
        for d in (0..rank).rev() {
            counter[d] += 1;
            cur += bst[d];
            if counter[d] < out_shape[d] {
                break;
            }
            cur -= bst[d] * counter[d];
            counter[d] = 0;
        }
    }
    idx
}

/// Splits `shape` at `axis` into (outer, axis length, inner) element counts.
pub fn split_at_axis(shape: &[usize], axis: usize) -> (usize, usize, usize) {
    let outer: usize = shape[..axis].iter().product();
    let len = shape.get(axis).copied().unwrap_or(1);
    let inner: usize = shape
        .get(axis + 1..)
        .map(|s| s.iter().product())
        .unwrap_or(1);
    (outer, len, inner)
}

/// Floats of a tensor as f64 (errors for non-float tensors).
pub fn floats_of(t: &Tensor) -> KResult<Vec<f64>> {
    if !t.dtype().is_float() {
        return err(format!("expected a float tensor, got {}", t.dtype()));
    }
    Ok(t.to_f64_vec())
}

/// A float tensor of `dtype` from f64 values.
pub fn float_tensor(dtype: crate::dtype::DType, shape: Vec<usize>, v: Vec<f64>) -> Tensor {
    Tensor::new(
        shape,
        crate::tensor::TensorData::from_f64s(dtype, v.into_iter()),
    )
}
