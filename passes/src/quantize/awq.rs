//! AWQ-style activation-aware scaling (Lin et al., 2023). Weights that meet large activations
//! matter more; scaling input channel `c` of a layer's weight up by `s_c` before rounding
//! (and the activation down by the same factor, so the product is unchanged) gives those
//! channels finer steps. Per layer, `s = mean|x|^alpha` (normalized so that
//! `max(s) * min(s) = 1`) and the `alpha` on a grid over [0, 1) that minimizes the output
//! error `||X W - (X / s) dequant(Q(s W))||` on calibration rows `X` is kept; `alpha = 0` is
//! plain round-to-nearest, so the search never does worse than RTN on the calibration rows.
//!
//! [`collect_activations`] gathers the statistics by running calibration samples through the
//! reference interpreter and watching the inputs of the layers to be quantized.

use super::rtn;
use kiln_compiler::interp::{self, linalg::sgemm};
use kiln_compiler::{Graph, Tensor};
use std::collections::HashMap;

/// Calibration statistics of one layer's input activations.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LayerActivations {
    /// Input channels (K).
    pub k: usize,
    /// Mean absolute activation per input channel, over every calibration row.
    pub mean_abs: Vec<f32>,
    /// Rows seen.
    pub rows_seen: usize,
    /// A sample of rows (`n_rows` x `k`, row-major) for the error search.
    pub rows: Vec<f32>,
    pub n_rows: usize,
}

/// Runs every sample (inputs in graph order) through the interpreter and records, for each
/// node named in `layers`, statistics of its first input. At most `max_rows` rows per layer
/// are kept for the search, taken evenly from each sample. `progress` is called after each
/// sample.
pub fn collect_activations(
    g: &Graph,
    samples: &[Vec<Tensor>],
    layers: &[String],
    max_rows: usize,
    progress: &mut dyn FnMut(),
) -> Result<HashMap<String, LayerActivations>, String> {
    let mut stats: HashMap<String, LayerActivations> = layers
        .iter()
        .map(|l| (l.clone(), LayerActivations::default()))
        .collect();
    let per_sample = max_rows.div_ceil(samples.len().max(1)).max(1);
    let mut sums: HashMap<String, Vec<f64>> = HashMap::new();
    for sample in samples {
        let mut observe = |node: &kiln_compiler::ir::Node, ins: &[Option<&Tensor>]| {
            let Some(st) = stats.get_mut(&node.name) else {
                return;
            };
            let Some(x) = ins.first().copied().flatten() else {
                return;
            };
            let Some(&k) = x.shape.last() else {
                return;
            };
            let vals = x.to_f64_vec();
            let m = vals.len() / k.max(1);
            st.k = k;
            let sum = sums
                .entry(node.name.clone())
                .or_insert_with(|| vec![0.0; k]);
            for r in 0..m {
                for c in 0..k {
                    sum[c] += vals[r * k + c].abs();
                }
            }
            st.rows_seen += m;
            let take = per_sample.min(m);
            for i in 0..take {
                if st.n_rows >= max_rows {
                    break;
                }
                let r = i * m / take;
                st.rows
                    .extend(vals[r * k..(r + 1) * k].iter().map(|&v| v as f32));
                st.n_rows += 1;
            }
        };
        interp::run_observed(g, sample, &mut observe).map_err(|e| e.to_string())?;
        progress();
    }
    for (name, st) in stats.iter_mut() {
        if let Some(sum) = sums.get(name) {
            st.mean_abs = sum
                .iter()
                .map(|s| (s / st.rows_seen.max(1) as f64) as f32)
                .collect();
        }
    }
    stats.retain(|_, s| s.rows_seen > 0);
    Ok(stats)
}

/// Relative output error of a layer on its calibration rows X: ||X·W' - X·W|| / ||X·W||
/// (Frobenius), for weights given column by column (`n` columns of `k`); `None` without
/// rows.
pub fn output_error(
    act: &LayerActivations,
    original: &[f32],
    effective: &[f32],
    n: usize,
    k: usize,
) -> Option<f64> {
    let m = act.n_rows;
    if m == 0 || act.k != k || act.rows.len() != m * k {
        return None;
    }
    let product = |w: &[f32]| {
        let mut y = vec![0f32; m * n];
        sgemm(m, k, n, &act.rows, k as isize, 1, w, 1, k as isize, &mut y);
        y
    };
    Some(rtn::relative_frobenius(
        &product(original),
        &product(effective),
    ))
}

/// The outcome of the search for one layer.
#[derive(Clone, Debug, PartialEq)]
pub struct ScaleSearch {
    /// Per input channel; all ones when plain rounding was best.
    pub scales: Vec<f32>,
    pub alpha: f32,
    /// Squared output error on the calibration rows, of plain RTN and of the chosen scales.
    pub error_rtn: f64,
    pub error_best: f64,
}

/// Grid search of `alpha` (`grid` points 0, 1/grid, ...) for a weight given column by column
/// (`n` columns of `k`), quantized in groups of `group` to `bits` bits.
#[allow(clippy::too_many_arguments)]
pub fn search_scales(
    act: &LayerActivations,
    cols: &[f32],
    n: usize,
    k: usize,
    group: usize,
    bits: usize,
    symmetric: bool,
    grid: usize,
) -> ScaleSearch {
    let m = act.n_rows;
    let x = &act.rows;
    let product = |w: &[f32]| {
        let mut y = vec![0f32; m * n];
        sgemm(m, k, n, x, k as isize, 1, w, 1, k as isize, &mut y);
        y
    };
    let reference = product(cols);
    let error_of = |scales: &[f32]| -> f64 {
        let mut scaled = cols.to_vec();
        for j in 0..n {
            for c in 0..k {
                scaled[j * k + c] *= scales[c];
            }
        }
        let mut eff = rtn::quantize(&scaled, n, k, group, bits, symmetric).dequantize();
        for j in 0..n {
            for c in 0..k {
                eff[j * k + c] /= scales[c];
            }
        }
        let y = product(&eff);
        y.iter()
            .zip(&reference)
            .map(|(a, b)| ((a - b) as f64).powi(2))
            .sum()
    };
    let ones = vec![1f32; k];
    let error_rtn = error_of(&ones);
    let mut best = ScaleSearch {
        scales: ones,
        alpha: 0.0,
        error_rtn,
        error_best: error_rtn,
    };
    for step in 1..grid {
        let alpha = step as f32 / grid as f32;
        let mut s: Vec<f32> = act
            .mean_abs
            .iter()
            .map(|&a| a.max(1e-4).powf(alpha))
            .collect();
        let (mx, mn) = s
            .iter()
            .fold((0f32, f32::MAX), |(mx, mn), &v| (mx.max(v), mn.min(v)));
        let norm = (mx * mn).sqrt();
        if !(norm.is_finite() && norm > 0.0) {
            continue;
        }
        s.iter_mut().for_each(|v| *v /= norm);
        let e = error_of(&s);
        if e < best.error_best {
            best = ScaleSearch {
                scales: s,
                alpha,
                error_rtn,
                error_best: e,
            };
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn salient_channels_get_scaled_and_error_drops() {
        // Channel 0 carries activations 50x larger than the rest: AWQ should protect it.
        let (n, k, m) = (16, 64, 32);
        let mut seed = 11u32;
        let mut rnd = || {
            seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (seed >> 8) as f32 / (1u32 << 24) as f32 - 0.5
        };
        let cols: Vec<f32> = (0..n * k).map(|_| rnd() * 0.1).collect();
        let mut rows = Vec::new();
        for _ in 0..m {
            for c in 0..k {
                rows.push(rnd() * if c == 0 { 50.0 } else { 1.0 });
            }
        }
        let mut mean_abs = vec![0f32; k];
        for r in 0..m {
            for c in 0..k {
                mean_abs[c] += rows[r * k + c].abs() / m as f32;
            }
        }
        let act = LayerActivations {
            k,
            mean_abs,
            rows_seen: m,
            rows,
            n_rows: m,
        };
        let r = search_scales(&act, &cols, n, k, 32, 4, false, 10);
        assert!(r.alpha > 0.0, "some scaling should win");
        assert!(r.error_best < r.error_rtn * 0.9, "{r:?}");
        assert!(r.scales[0] > r.scales[1]);
    }
}
