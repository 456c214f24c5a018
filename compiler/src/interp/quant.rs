//! Quantization kernels: DequantizeLinear and QuantizeLinear (per tensor, per axis and the
//! opset-21 blocked form, including int4/uint4), DynamicQuantizeLinear, and com.microsoft
//! MatMulNBits (packed 4/8-bit weights with per-block scales and optional zero points).

use super::linalg::sgemm;
use super::util::*;
use crate::dtype::DType;
use crate::tensor::{strides, Tensor, TensorData};

/// For every element of `x_shape`, the index of its scale/zero point.
fn param_index(x_shape: &[usize], p_shape: &[usize], ax: i64, block: usize) -> KResult<Vec<usize>> {
    let n: usize = x_shape.iter().product();
    let pn: usize = p_shape.iter().product();
    if pn == 1 && p_shape.len() <= 1 {
        return Ok(vec![0; n]);
    }
    let r = x_shape.len();
    let a = axis(ax, r)?;
    let xst = strides(x_shape);
    if p_shape.len() == 1 && block == 0 {
        if p_shape[0] != x_shape[a] {
            return err(format!(
                "per-axis parameters of length {} do not match axis {a} of {:?}",
                p_shape[0], x_shape
            ));
        }
        return Ok((0..n).map(|f| (f / xst[a]) % x_shape[a]).collect());
    }
    if p_shape.len() != r || block == 0 {
        return err(format!(
            "scale shape {p_shape:?} does not fit input {x_shape:?} (block_size {block})"
        ));
    }
    for d in 0..r {
        let want = if d == a {
            x_shape[d].div_ceil(block)
        } else {
            x_shape[d]
        };
        if p_shape[d] != want {
            return err(format!("blocked scale shape {p_shape:?} does not fit input {x_shape:?} with block_size {block}"));
        }
    }
    let pst = strides(p_shape);
    Ok((0..n)
        .map(|f| {
            let mut rem = f;
            let mut off = 0;
            for d in 0..r {
                let c = rem / xst[d];
                rem %= xst[d];
                off += if d == a { c / block } else { c } * pst[d];
            }
            off
        })
        .collect())
}

pub fn dequantize_linear(ins: &[Option<&Tensor>], ax: i64, block: usize) -> KResult<Tensor> {
    let x = input(ins, 0)?;
    let scale = input(ins, 1)?;
    let zp = opt_input(ins, 2);
    if let Some(z) = zp {
        if z.dtype() != x.dtype() {
            return err(format!(
                "zero point type {} differs from input type {}",
                z.dtype(),
                x.dtype()
            ));
        }
    }
    let idx = param_index(&x.shape, &scale.shape, ax, block)?;
    let xv = x.to_i64_vec();
    let sv = floats_of(scale)?;
    let zv = zp.map(|z| z.to_i64_vec());
    let out: Vec<f64> = xv
        .iter()
        .zip(&idx)
        .map(|(&q, &i)| (q - zv.as_ref().map(|z| z[i]).unwrap_or(0)) as f64 * sv[i])
        .collect();
    Ok(float_tensor(scale.dtype(), x.shape.clone(), out))
}

fn qrange(dt: DType) -> KResult<(f64, f64)> {
    Ok(match dt {
        DType::U8 => (0.0, 255.0),
        DType::I8 => (-128.0, 127.0),
        DType::U16 => (0.0, 65535.0),
        DType::I16 => (-32768.0, 32767.0),
        DType::U4 => (0.0, 15.0),
        DType::I4 => (-8.0, 7.0),
        DType::I32 => (i32::MIN as f64, i32::MAX as f64),
        other => return err(format!("cannot quantize to {other}")),
    })
}

pub fn quantize_linear(
    ins: &[Option<&Tensor>],
    ax: i64,
    block: usize,
    _saturate: bool,
    out_dt: Option<DType>,
) -> KResult<Tensor> {
    let x = input(ins, 0)?;
    let scale = input(ins, 1)?;
    let zp = opt_input(ins, 2);
    let dt = zp.map(|z| z.dtype()).or(out_dt).unwrap_or(DType::U8);
    let (lo, hi) = qrange(dt)?;
    let idx = param_index(&x.shape, &scale.shape, ax, block)?;
    let xv = floats_of(x)?;
    let sv = floats_of(scale)?;
    let zv = zp.map(|z| z.to_f64_vec());
    let out = xv.iter().zip(&idx).map(|(&v, &i)| {
        // The division happens in the input precision, as the reference does.
        let q = if x.dtype() == DType::F32 {
            (v as f32 / sv[i] as f32) as f64
        } else {
            v / sv[i]
        };
        (q.round_ties_even() + zv.as_ref().map(|z| z[i]).unwrap_or(0.0)).clamp(lo, hi)
    });
    Ok(Tensor::new(x.shape.clone(), TensorData::from_f64s(dt, out)))
}

pub fn dynamic_quantize_linear(x: &Tensor) -> KResult<Vec<Tensor>> {
    let v: Vec<f32> = floats_of(x)?.iter().map(|&f| f as f32).collect();
    let mx = v.iter().copied().fold(0f32, f32::max);
    let mn = v.iter().copied().fold(0f32, f32::min);
    let scale = (mx - mn) / 255.0;
    let zp = if scale == 0.0 {
        0.0
    } else {
        ((0.0 - mn) / scale).round_ties_even().clamp(0.0, 255.0)
    };
    let q: Vec<u8> = v
        .iter()
        .map(|&f| {
            if scale == 0.0 {
                zp as u8
            } else {
                ((f / scale).round_ties_even() + zp).clamp(0.0, 255.0) as u8
            }
        })
        .collect();
    Ok(vec![
        Tensor::from_vec(x.shape.clone(), q),
        Tensor::scalar(scale),
        Tensor::scalar(zp as u8),
    ])
}

pub fn matmul_nbits(
    ins: &[Option<&Tensor>],
    k: usize,
    n: usize,
    bits: usize,
    block: usize,
    accuracy_level: usize,
) -> KResult<Tensor> {
    let a = input(ins, 0)?;
    let b = input(ins, 1)?;
    let scales = floats_of(input(ins, 2)?)?;
    let zp = opt_input(ins, 3);
    if opt_input(ins, 4).is_some() {
        return err("MatMulNBits g_idx is not supported");
    }
    let bias = opt_input(ins, 5).map(floats_of).transpose()?;
    if block < 16 || !block.is_power_of_two() || k == 0 || n == 0 {
        return err(format!("MatMulNBits needs K, N > 0 and a power-of-two block_size >= 16, got K={k} N={n} block={block}"));
    }
    let kdim = *a
        .shape
        .last()
        .ok_or_else(|| KernelError("A must have rank >= 1".into()))?;
    if kdim != k {
        return err(format!("A's last dim {kdim} differs from K={k}"));
    }
    let TensorData::U8(bq) = &b.data else {
        return err("MatMulNBits B must be uint8");
    };
    let nblk = k.div_ceil(block);
    let blob = block * bits / 8;
    if bq.len() != n * nblk * blob || scales.len() != n * nblk {
        return err(format!(
            "MatMulNBits B has {} bytes and {} scales; expected {} and {}",
            bq.len(),
            scales.len(),
            n * nblk * blob,
            n * nblk
        ));
    }
    let default_zp = (1u32 << (bits - 1)) as f64;
    let zp_at: Box<dyn Fn(usize, usize) -> f64> = match zp {
        None => Box::new(move |_, _| default_zp),
        Some(z) if z.dtype() == DType::U8 => {
            let zb = z.as_slice::<u8>().unwrap_or_default().to_vec();
            let per_row = (nblk * bits).div_ceil(8);
            Box::new(move |row, blk| {
                let bitpos = blk * bits;
                let byte = zb[row * per_row + bitpos / 8];
                ((byte >> (bitpos % 8)) & ((1u16 << bits) - 1) as u8) as f64
            })
        }
        Some(z) => {
            let zf = z.to_f64_vec();
            Box::new(move |row, blk| zf[row * nblk + blk])
        }
    };
    // Code of row `kk` of K in output column `col`.
    let code = |col: usize, kk: usize| {
        let bitpos = (kk % block) * bits;
        let byte = bq[(col * nblk + kk / block) * blob + bitpos / 8];
        (byte >> (bitpos % 8)) & ((1u16 << bits) - 1) as u8
    };
    let av: Vec<f32> = a.to_f64_vec().iter().map(|&x| x as f32).collect();
    let m = a.numel() / k;
    let mut outf: Vec<f64> = if crate::ir::int8_activations(k, bits, block, accuracy_level) {
        let mut outf = vec![0f64; m * n];
        for r in 0..m {
            let (qa, sa, sums) = quantize_activation_row(&av[r * k..][..k], block);
            for col in 0..n {
                let mut acc = 0f32;
                for g in 0..nblk {
                    let dot: i32 = (g * block..((g + 1) * block).min(k))
                        .map(|kk| code(col, kk) as i32 * qa[kk] as i32)
                        .sum();
                    let zp = zp_at(col, g) as f32;
                    let sw = scales[col * nblk + g] as f32;
                    acc += (dot as f32 - zp * sums[g]) * (sw * sa[g]);
                }
                outf[r * n + col] = acc as f64;
            }
        }
        outf
    } else {
        let mut w = vec![0f32; n * k];
        for col in 0..n {
            for kk in 0..k {
                let blk = kk / block;
                let (s, z) = (scales[col * nblk + blk], zp_at(col, blk));
                w[col * k + kk] = ((code(col, kk) as f64 - z) * s) as f32;
            }
        }
        let mut out = vec![0f32; m * n];
        sgemm(m, k, n, &av, k as isize, 1, &w, 1, k as isize, &mut out);
        out.iter().map(|&x| x as f64).collect()
    };
    if let Some(bv) = bias {
        for (i, o) in outf.iter_mut().enumerate() {
            *o += bv[i % n];
        }
    }
    let mut shape = a.shape.clone();
    *shape.last_mut().expect("rank >= 1") = n;
    Ok(float_tensor(a.dtype(), shape, outf))
}

/// One row of activations quantized to int8 per block of `block` values (the last one may be
/// shorter) as MatMulNBits with
/// int8 activations defines it ([`crate::ir::int8_activations`]): codes, the scale of each
/// block and the sum of each block's codes (as f32, exact).
pub fn quantize_activation_row(a: &[f32], block: usize) -> (Vec<i8>, Vec<f32>, Vec<f32>) {
    let blocks = a.len().div_ceil(block);
    let mut codes = vec![0i8; a.len()];
    let mut scales = vec![0f32; blocks];
    let mut sums = vec![0f32; blocks];
    for g in 0..blocks {
        let x = &a[g * block..((g + 1) * block).min(a.len())];
        let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
        let inv = if amax > 0.0 { 127.0 / amax } else { 0.0 };
        scales[g] = amax / 127.0;
        let mut sum = 0f32;
        for (i, v) in x.iter().enumerate() {
            let q = (v * inv).round_ties_even().clamp(-127.0, 127.0);
            codes[g * block + i] = q as i8;
            sum += q;
        }
        sums[g] = sum;
    }
    (codes, scales, sums)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::interp::linalg::matmul;

    /// Packs 4-bit values two per byte, low nibble first.
    fn pack4(v: &[u8]) -> Vec<u8> {
        v.chunks(2)
            .map(|c| c[0] | (c.get(1).copied().unwrap_or(0) << 4))
            .collect()
    }

    /// MatMulNBits against a plain dequantize-then-multiply written out element by element.
    #[test]
    fn matmul_nbits_matches_explicit_dequantization() {
        let (m, k, n, block) = (3usize, 64usize, 5usize, 32usize);
        let nblk = k / block;
        let q: Vec<u8> = (0..n * k).map(|i| ((i * 7 + 3) % 16) as u8).collect();
        let scales: Vec<f32> = (0..n * nblk).map(|i| 0.01 + 0.003 * i as f32).collect();
        let zps: Vec<u8> = (0..n * nblk).map(|i| ((i * 5) % 16) as u8).collect();
        let a: Vec<f32> = (0..m * k).map(|i| ((i % 13) as f32 - 6.0) * 0.25).collect();
        let b_packed: Vec<u8> = (0..n).flat_map(|r| pack4(&q[r * k..(r + 1) * k])).collect();
        let zp_packed: Vec<u8> = (0..n)
            .flat_map(|r| pack4(&zps[r * nblk..(r + 1) * nblk]))
            .collect();
        let at = Tensor::from_vec(vec![m, k], a.clone());
        let bt = Tensor::from_vec(vec![n, nblk, block / 2], b_packed);
        let st = Tensor::from_vec(vec![n * nblk], scales.clone());
        let zt = Tensor::from_vec(vec![n * nblk.div_ceil(2)], zp_packed);
        let got = matmul_nbits(
            &[Some(&at), Some(&bt), Some(&st), Some(&zt)],
            k,
            n,
            4,
            block,
            0,
        )
        .unwrap();
        assert_eq!(got.shape, vec![m, n]);
        let got = got.as_slice::<f32>().unwrap();
        for i in 0..m {
            for j in 0..n {
                let mut want = 0f64;
                for p in 0..k {
                    let blk = p / block;
                    let w = (q[j * k + p] as f64 - zps[j * nblk + blk] as f64)
                        * scales[j * nblk + blk] as f64;
                    want += a[i * k + p] as f64 * w;
                }
                assert!(
                    (got[i * n + j] as f64 - want).abs() < 1e-4,
                    "[{i},{j}] {} vs {want}",
                    got[i * n + j]
                );
            }
        }
    }

    /// Blocked int4 DequantizeLinear (opset 21) feeding MatMul gives the same product as
    /// MatMulNBits on the same nibbles (default zero point 8 = symmetric uint4 around 8).
    #[test]
    fn blocked_dequantize_linear_agrees_with_matmul_nbits() {
        let (k, n, block) = (32usize, 4usize, 16usize);
        let nblk = k / block;
        let q: Vec<u8> = (0..n * k).map(|i| ((i * 11 + 1) % 16) as u8).collect();
        let scales: Vec<f32> = (0..n * nblk).map(|i| 0.5 + 0.25 * i as f32).collect();
        // DequantizeLinear layout: W is [K, N] (MatMul's B) with blocks along axis 0.
        let w_kn: Vec<u8> = (0..k)
            .flat_map(|p| (0..n).map(move |j| (p, j)))
            .map(|(p, j)| q[j * k + p])
            .collect();
        let s_kn: Vec<f32> = (0..nblk)
            .flat_map(|b| (0..n).map(move |j| (b, j)))
            .map(|(b, j)| scales[j * nblk + b])
            .collect();
        let wt = Tensor::new(vec![k, n], TensorData::U4(w_kn));
        let st = Tensor::from_vec(vec![nblk, n], s_kn);
        let zt = Tensor::new(vec![nblk, n], TensorData::U4(vec![8; nblk * n]));
        let w = dequantize_linear(&[Some(&wt), Some(&st), Some(&zt)], 0, block).unwrap();
        let a = Tensor::from_vec(
            vec![1, k],
            (0..k).map(|i| i as f32 * 0.1 - 1.0).collect::<Vec<f32>>(),
        );
        let via_dq = matmul(&a, &w).unwrap();
        let b_packed: Vec<u8> = (0..n).flat_map(|r| pack4(&q[r * k..(r + 1) * k])).collect();
        let bt = Tensor::from_vec(vec![n, nblk, block / 2], b_packed);
        let s_flat = Tensor::from_vec(vec![n * nblk], scales);
        let via_nbits =
            matmul_nbits(&[Some(&a), Some(&bt), Some(&s_flat)], k, n, 4, block, 0).unwrap();
        let (x, y) = (
            via_dq.as_slice::<f32>().unwrap(),
            via_nbits.as_slice::<f32>().unwrap(),
        );
        for (u, v) in x.iter().zip(y) {
            assert!((u - v).abs() < 1e-4, "{u} vs {v}");
        }
    }

    /// Accuracy level 4 (int8 activations) stays within the activation quantization error of
    /// the f32 product, and an all-zero block of A quantizes to zeros (no division by zero).
    #[test]
    fn int8_activations_are_close_to_f32_and_handle_zero_blocks() {
        let (m, k, n, block) = (2usize, 64usize, 3usize, 32usize);
        let nblk = k / block;
        let q: Vec<u8> = (0..n * k).map(|i| ((i * 7 + 3) % 16) as u8).collect();
        let b_packed: Vec<u8> = (0..n).flat_map(|r| pack4(&q[r * k..(r + 1) * k])).collect();
        let bt = Tensor::from_vec(vec![n, nblk, block / 2], b_packed);
        let st = Tensor::from_vec(vec![n * nblk], vec![0.02f32; n * nblk]);
        // Row 0: one zero block then values; row 1: values everywhere.
        let a: Vec<f32> = (0..m * k)
            .map(|i| {
                if i < block {
                    0.0
                } else {
                    ((i * 37 % 101) as f32 - 50.0) * 0.013
                }
            })
            .collect();
        let at = Tensor::from_vec(vec![m, k], a);
        let ins = [Some(&at), Some(&bt), Some(&st)];
        let f32_path = matmul_nbits(&ins, k, n, 4, block, 0).unwrap();
        let int8_path = matmul_nbits(&ins, k, n, 4, block, 4).unwrap();
        let (x, y) = (
            f32_path.as_slice::<f32>().unwrap(),
            int8_path.as_slice::<f32>().unwrap(),
        );
        let scale = x.iter().fold(0f32, |m, v| m.max(v.abs()));
        for (u, v) in x.iter().zip(y) {
            assert!(v.is_finite());
            assert!((u - v).abs() <= 0.01 * scale, "{u} vs {v}");
            assert_ne!(u, v, "int8 activations should round somewhere");
        }
        let (codes, scales, sums) = quantize_activation_row(&[0.0; 8], 8);
        assert_eq!((codes, scales, sums), (vec![0; 8], vec![0.0], vec![0.0]));
    }
}
