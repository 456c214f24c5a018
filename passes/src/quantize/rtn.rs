//! Round-to-nearest group quantization of a weight matrix stored column by column (each of
//! the N output columns has its K weights contiguous, the layout of MatMulNBits' B). Every
//! group of `group` consecutive weights of a column gets an f16 scale and, when asymmetric, an
//! integer zero point. The grid follows onnxruntime's blockwise quantizer (MLAS): asymmetric
//! ranges always include zero (`min <= 0 <= max`), `scale = (max - min) / qmax`,
//! `zp = round(-min / scale)`; symmetric groups map the value of largest magnitude to the
//! most negative code (`scale = that value / -mid`, codes offset by `mid`). Codes are
//! `round(v / scale + zp)` against the f32 scale, ties upwards as in MLAS (the weights of
//! exported bf16 models land exactly on ties often: rounding them away from zero instead cost
//! SmolLM2 0.2% perplexity). The stored f16 scale is whichever of the two f16 values around
//! the f32 scale is closer to the least-squares scale of the group's codes (for fixed codes
//! the group's squared error is a parabola in the scale), not simply the nearest one.
//! Measured on SmolLM2 (64 windows, onnxruntime running the emitted graph): nearest f16
//! 52.068, least-squares choice 52.031, onnxruntime's own f32-scale quantization 52.066;
//! codes against the f16 scale (52.088) and ranges shrunk to minimise each group's squared
//! error were worse. When `group` does not divide K the last group of each column is shorter
//! and its codes are padded (with the zero point) to a whole group, as MatMulNBits lays them
//! out.

use half::f16;
use std::ops::Add;

/// A quantized matrix in MatMulNBits layout.
#[derive(Clone, Debug, PartialEq)]
pub struct Quantized {
    pub bits: usize,
    pub n: usize,
    pub k: usize,
    pub group: usize,
    /// `[N, ceil(K/group), group * bits / 8]`: 4-bit codes two per byte, low nibble first.
    pub packed: Vec<u8>,
    /// `[N, ceil(K/group)]`.
    pub scales: Vec<f16>,
    /// `[N, ceil(K/group)]` zero points (asymmetric only); symmetric codes are offset by `mid`.
    pub zero_points: Option<Vec<u8>>,
}

impl Quantized {
    pub fn blocks(&self) -> usize {
        self.k.div_ceil(self.group)
    }

    fn code(&self, col: usize, r: usize) -> u8 {
        let i = (col * self.blocks() + r / self.group) * self.group + r % self.group;
        if self.bits == 8 {
            self.packed[i]
        } else {
            (self.packed[i / 2] >> (4 * (i % 2))) & 15
        }
    }

    fn zero_point(&self, col: usize, blk: usize) -> f32 {
        match &self.zero_points {
            Some(z) => z[col * self.blocks() + blk] as f32,
            None => (1u32 << (self.bits - 1)) as f32,
        }
    }

    /// The dequantized weights, column by column.
    pub fn dequantize(&self) -> Vec<f32> {
        let nblk = self.blocks();
        let mut out = vec![0f32; self.n * self.k];
        for col in 0..self.n {
            for r in 0..self.k {
                let blk = r / self.group;
                let s = self.scales[col * nblk + blk].to_f32();
                out[col * self.k + r] = (self.code(col, r) as f32 - self.zero_point(col, blk)) * s;
            }
        }
        out
    }

    /// `||W - dequant(Q(W))|| / ||W||` over the whole matrix.
    pub fn relative_error(&self, original: &[f32]) -> f64 {
        relative_frobenius(original, &self.dequantize())
    }

    /// Zero points in MatMulNBits' layout: `[N, ceil(blocks * bits / 8)]`, 4-bit ones two per
    /// byte (low nibble first).
    pub fn zero_points_packed(&self) -> Option<Vec<u8>> {
        let z = self.zero_points.as_ref()?;
        let nblk = self.blocks();
        if self.bits == 8 {
            return Some(z.clone());
        }
        let per_row = nblk.div_ceil(2);
        let mut out = vec![0u8; self.n * per_row];
        for col in 0..self.n {
            for b in 0..nblk {
                out[col * per_row + b / 2] |= z[col * nblk + b] << (4 * (b % 2));
            }
        }
        Some(out)
    }
}

/// The code of `v` on the grid (`s`, `zp`).
fn code_of(v: f32, s: f32, zp: f32, qmax: f32) -> f32 {
    if s != 0.0 && s.is_finite() {
        // Ties upwards, as MLAS: the zero point is added before rounding.
        (v * (1.0 / s)).add(zp).round().clamp(0.0, qmax)
    } else {
        zp
    }
}

/// The grid of one group, as onnxruntime's blockwise quantizer (MLAS) computes it: the f32
/// scale and the zero point.
fn grid(x: &[f32], qmax: f32, mid: f32, symmetric: bool) -> (f32, f32) {
    if symmetric {
        let mut m = 0f32;
        for &v in x {
            if v.abs() > m.abs() {
                m = v;
            }
        }
        (m / -mid, mid)
    } else {
        let mn = x.iter().copied().fold(0f32, f32::min);
        let mx = x.iter().copied().fold(0f32, f32::max);
        let scale = (mx - mn) / qmax;
        let zp = if scale != 0.0 {
            (-mn / scale).round().clamp(0.0, qmax)
        } else {
            0.0
        };
        (scale, zp)
    }
}

/// The f16 scale stored for a group whose `codes` were rounded against the f32 scale `s`: of
/// the two f16 values around `s`, the one closer to the least-squares scale of the codes,
/// `sum(v (q - zp)) / sum((q - zp)^2)`.
fn f16_scale(s: f32, x: &[f32], codes: &[u8], zp: f32) -> f16 {
    let near = f16::from_f32(s);
    if !s.is_finite() || s == 0.0 {
        return near;
    }
    let (mut num, mut den) = (0f64, 0f64);
    for (&v, &q) in x.iter().zip(codes) {
        let d = q as f64 - zp as f64;
        num += v as f64 * d;
        den += d * d;
    }
    if den == 0.0 {
        return near;
    }
    let best = num / den;
    let distance = |h: f16| (h.to_f32() as f64 - best).abs();
    // The f16 neighbour of `near` on the side of `best` (bit patterns are ordered by
    // magnitude within a sign).
    let grow = (near.to_f32() as f64) < best;
    let bits = near.to_bits();
    let other = if grow == (near.to_f32() >= 0.0) {
        bits.checked_add(1)
    } else {
        bits.checked_sub(1)
    };
    match other.map(f16::from_bits) {
        Some(o) if o.is_finite() && distance(o) < distance(near) => o,
        _ => near,
    }
}

/// Quantizes `cols` (`n` columns of `k` weights each) in groups of `group` to `bits` (4 or
/// 8) bits. `group` must be even.
pub fn quantize(
    cols: &[f32],
    n: usize,
    k: usize,
    group: usize,
    bits: usize,
    symmetric: bool,
) -> Quantized {
    assert!(bits == 4 || bits == 8, "4 or 8 bits");
    assert!(group.is_multiple_of(2) && cols.len() == n * k);
    let qmax = ((1u32 << bits) - 1) as f32;
    let mid = (1u32 << (bits - 1)) as f32;
    let nblk = k.div_ceil(group);
    let mut codes = vec![0u8; n * nblk * group];
    let mut scales = vec![f16::ZERO; n * nblk];
    let mut zps = vec![0u8; n * nblk];
    for col in 0..n {
        for b in 0..nblk {
            let len = group.min(k - b * group);
            let x = &cols[col * k + b * group..][..len];
            let (s, zp) = grid(x, qmax, mid, symmetric);
            zps[col * nblk + b] = zp as u8;
            let at = (col * nblk + b) * group;
            for (i, &v) in x.iter().enumerate() {
                codes[at + i] = code_of(v, s, zp, qmax) as u8;
            }
            scales[col * nblk + b] = f16_scale(s, x, &codes[at..at + len], zp);
            codes[at + len..at + group].fill(zp as u8);
        }
    }
    let packed = if bits == 8 {
        codes
    } else {
        codes.chunks(2).map(|c| c[0] | (c[1] << 4)).collect()
    };
    Quantized {
        bits,
        n,
        k,
        group,
        packed,
        scales,
        zero_points: (!symmetric).then_some(zps),
    }
}

/// `||a - b|| / ||a||` (Frobenius, in f64); 0 when `a` is zero.
pub fn relative_frobenius(a: &[f32], b: &[f32]) -> f64 {
    let (mut num, mut den) = (0f64, 0f64);
    for (x, y) in a.iter().zip(b) {
        let d = (*x - *y) as f64;
        num += d * d;
        den += (*x as f64) * (*x as f64);
    }
    if den > 0.0 {
        (num / den).sqrt()
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deterministic pseudo-random matrix.
    fn matrix(n: usize, k: usize, seed: u32) -> Vec<f32> {
        let mut s = seed;
        (0..n * k)
            .map(|_| {
                s = s.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                ((s >> 8) as f32 / (1u32 << 24) as f32 - 0.5) * 0.2
            })
            .collect()
    }

    #[test]
    fn error_is_within_half_a_step_per_weight() {
        for (bits, symmetric) in [(4, false), (4, true), (8, false), (8, true)] {
            let (n, k, g) = (8, 256, 32);
            let w = matrix(n, k, 7);
            let q = quantize(&w, n, k, g, bits, symmetric);
            let deq = q.dequantize();
            for col in 0..n {
                for r in 0..k {
                    let s = q.scales[col * (k / g) + r / g].to_f32().abs();
                    let e = (w[col * k + r] - deq[col * k + r]).abs();
                    // Half a step, plus the f16 rounding of the scale over the code range;
                    // symmetric grids have one code fewer on the positive side, so the
                    // largest positive weights can be a whole step off.
                    let steps = if symmetric { 1.0 } else { 0.5 };
                    let f16_slack = 1e-3 * s * (1u32 << bits) as f32;
                    assert!(e <= steps * s + f16_slack, "{bits} bits: {e} vs step {s}");
                }
            }
            let rel = q.relative_error(&w);
            let bound = if bits == 4 { 0.12 } else { 0.01 };
            assert!(rel < bound, "{bits} bits symmetric={symmetric}: {rel}");
        }
    }

    #[test]
    fn asymmetric_group_range_includes_zero_and_hits_extremes() {
        // All-positive group: min clamps to 0, so zero point 0 and the maximum is code 15.
        let w: Vec<f32> = (0..16).map(|i| 1.0 + i as f32).collect();
        let q = quantize(&w, 1, 16, 16, 4, false);
        assert_eq!(q.zero_points.as_deref(), Some(&[0u8][..]));
        assert_eq!(q.code(0, 15), 15);
        assert!((q.dequantize()[15] - 16.0).abs() < 0.02);
    }

    #[test]
    fn symmetric_maps_the_largest_magnitude_to_code_zero() {
        let mut w = vec![0.1f32; 16];
        w[3] = -2.0;
        let q = quantize(&w, 1, 16, 16, 4, true);
        assert!(q.zero_points.is_none());
        assert_eq!(q.code(0, 3), 0);
        assert!((q.dequantize()[3] + 2.0).abs() < 1e-3);
    }

    #[test]
    fn short_last_group_is_padded() {
        // K = 80 in groups of 32: two full groups and one of 16.
        let w = matrix(3, 80, 5);
        let q = quantize(&w, 3, 80, 32, 4, false);
        assert_eq!(q.blocks(), 3);
        assert_eq!(q.packed.len(), 3 * 3 * 16);
        assert_eq!(q.scales.len(), 9);
        let deq = q.dequantize();
        assert_eq!(deq.len(), 3 * 80);
        assert!(q.relative_error(&w) < 0.12);
    }

    #[test]
    fn packs_zero_points_two_per_byte() {
        let w = matrix(2, 96, 3);
        let q = quantize(&w, 2, 96, 32, 4, false);
        let z = q.zero_points.clone().unwrap();
        let p = q.zero_points_packed().unwrap();
        assert_eq!(p.len(), 2 * 2);
        assert_eq!(p[0] & 15, z[0]);
        assert_eq!(p[0] >> 4, z[1]);
        assert_eq!(p[1] & 15, z[2]);
        assert_eq!(p[2] & 15, z[3]);
    }

    #[test]
    fn ties_round_upwards_as_mlas() {
        // Range [-15, 0]: scale 1, zero point 15. -4.5 is code 10.5, which rounds up to 11
        // (rounding -4.5 away from zero before adding the zero point would give 10).
        let mut w = vec![0f32; 16];
        w[0] = -15.0;
        w[1] = -4.5;
        let q = quantize(&w, 1, 16, 16, 4, false);
        assert_eq!(q.zero_points.as_deref(), Some(&[15u8][..]));
        assert_eq!(q.code(0, 1), 11);
    }

    #[test]
    fn f16_scale_is_the_neighbour_closer_to_the_least_squares_scale() {
        let (n, k, g) = (16, 256, 64);
        let w = matrix(n, k, 11);
        let q = quantize(&w, n, k, g, 4, false);
        let group_error = |col: usize, b: usize, s: f32| -> f64 {
            (0..g)
                .map(|i| {
                    let r = b * g + i;
                    let zp = q.zero_points.as_ref().unwrap()[col * (k / g) + b] as f32;
                    let d = w[col * k + r] - (q.code(col, r) as f32 - zp) * s;
                    (d as f64) * (d as f64)
                })
                .sum()
        };
        let mut moved = 0;
        for col in 0..n {
            for b in 0..k / g {
                let x = &w[col * k + b * g..][..g];
                let (s, _) = grid(x, 15.0, 8.0, false);
                let stored = q.scales[col * (k / g) + b];
                let nearest = f16::from_f32(s);
                // One f16 step at most away from the nearest, never a worse group error.
                assert!(stored.to_bits().abs_diff(nearest.to_bits()) <= 1);
                let (e_stored, e_nearest) = (
                    group_error(col, b, stored.to_f32()),
                    group_error(col, b, nearest.to_f32()),
                );
                assert!(e_stored <= e_nearest, "{col}/{b}: {e_stored} > {e_nearest}");
                moved += usize::from(stored != nearest);
            }
        }
        // Some groups do move (the choice is not always the nearest).
        assert!(moved > 0);
    }
}
