//! Output comparison used by conformance runs and end-to-end tests: numpy `assert_allclose`
//! semantics (|actual - expected| <= atol + rtol * |expected|, NaNs must match), exact equality
//! for integer and bool tensors, and a summary of the worst element for messages.

use crate::tensor::Tensor;

/// Summary of a float comparison.
#[derive(Debug, Clone, PartialEq)]
pub struct Diff {
    pub max_abs: f64,
    pub max_rel: f64,
    pub mismatches: usize,
    pub total: usize,
}

/// Compares `actual` with `expected`; `Err` carries a one-line reason.
pub fn allclose(expected: &Tensor, actual: &Tensor, rtol: f64, atol: f64) -> Result<Diff, String> {
    if expected.dtype() != actual.dtype() {
        return Err(format!(
            "dtype {} differs from expected {}",
            actual.dtype(),
            expected.dtype()
        ));
    }
    if expected.shape != actual.shape {
        return Err(format!(
            "shape {:?} differs from expected {:?}",
            actual.shape, expected.shape
        ));
    }
    let e = expected.to_f64_vec();
    let a = actual.to_f64_vec();
    let float = expected.dtype().is_float();
    let mut d = Diff {
        max_abs: 0.0,
        max_rel: 0.0,
        mismatches: 0,
        total: e.len(),
    };
    let mut first_bad = None;
    for (i, (&x, &y)) in e.iter().zip(&a).enumerate() {
        let ok = if !float {
            // Integers compare exactly (i64 path keeps 64-bit values whole).
            true
        } else if x.is_nan() || y.is_nan() {
            x.is_nan() && y.is_nan()
        } else if x.is_infinite() || y.is_infinite() {
            x == y
        } else {
            let diff = (x - y).abs();
            d.max_abs = d.max_abs.max(diff);
            if x != 0.0 {
                d.max_rel = d.max_rel.max(diff / x.abs());
            }
            diff <= atol + rtol * x.abs()
        };
        if !ok {
            d.mismatches += 1;
            first_bad.get_or_insert((i, x, y));
        }
    }
    if !float {
        let ei = expected.to_i64_vec();
        let ai = actual.to_i64_vec();
        for (i, (&x, &y)) in ei.iter().zip(&ai).enumerate() {
            if x != y {
                d.mismatches += 1;
                first_bad.get_or_insert((i, x as f64, y as f64));
            }
        }
    }
    match first_bad {
        None => Ok(d),
        Some((i, x, y)) => Err(format!(
            "{} of {} elements differ (rtol {rtol:e}, atol {atol:e}); first at {i}: expected {x}, got {y}; max abs diff {:e}",
            d.mismatches, d.total, d.max_abs
        )),
    }
}
