//! Normalizations: BatchNormalization (inference), LayerNormalization, RMSNormalization,
//! InstanceNormalization, GroupNormalization and LpNormalization, all computed in f64.

use super::util::*;
use crate::tensor::Tensor;

pub fn batch_norm(ins: &[Option<&Tensor>], eps: f32) -> KResult<Tensor> {
    let x = input(ins, 0)?;
    let [scale, bias, mean, var] = [1, 2, 3, 4].map(|i| input(ins, i).map(|t| t.to_f64_vec()));
    let (scale, bias, mean, var) = (scale?, bias?, mean?, var?);
    if x.rank() < 2 {
        return err("BatchNormalization needs rank >= 2");
    }
    let c = x.shape[1];
    if [&scale, &bias, &mean, &var].iter().any(|v| v.len() != c) {
        return err(format!(
            "BatchNormalization parameters must have {c} elements"
        ));
    }
    let inner: usize = x.shape[2..].iter().product();
    let v = x.to_f64_vec();
    let out: Vec<f64> = v
        .iter()
        .enumerate()
        .map(|(i, &e)| {
            let ch = (i / inner) % c;
            scale[ch] * (e - mean[ch]) / (var[ch] + eps as f64).sqrt() + bias[ch]
        })
        .collect();
    Ok(float_tensor(x.dtype(), x.shape.clone(), out))
}

/// Normalises over the trailing dims from `axis`; `rms` skips the mean subtraction.
fn normalize_trailing(
    ins: &[Option<&Tensor>],
    ax: i64,
    eps: f32,
    rms: bool,
) -> KResult<(Tensor, Vec<f64>, Vec<f64>, usize)> {
    let x = input(ins, 0)?;
    let a = axis(ax, x.rank())?;
    let outer: usize = x.shape[..a].iter().product();
    let inner: usize = x.shape[a..].iter().product();
    let norm_shape = &x.shape[a..];
    let v = floats_of(x)?;
    let scale = input(ins, 1)?;
    let si = broadcast_index(&scale.shape, norm_shape);
    broadcast_shapes(&[&scale.shape, norm_shape])?;
    let sv = scale.to_f64_vec();
    let bias = opt_input(ins, 2);
    let bi = bias.map(|b| broadcast_index(&b.shape, norm_shape));
    let bv = bias.map(|b| b.to_f64_vec());
    let mut out = vec![0f64; v.len()];
    let mut means = Vec::with_capacity(outer);
    let mut inv_stds = Vec::with_capacity(outer);
    for o in 0..outer {
        let row = &v[o * inner..][..inner];
        let mean = if rms {
            0.0
        } else {
            row.iter().sum::<f64>() / inner as f64
        };
        let var = row.iter().map(|e| (e - mean) * (e - mean)).sum::<f64>() / inner as f64;
        let inv = 1.0 / (var + eps as f64).sqrt();
        for k in 0..inner {
            let mut y = (row[k] - mean) * inv * sv[si[k]];
            if let (Some(bi), Some(bv)) = (&bi, &bv) {
                y += bv[bi[k]];
            }
            out[o * inner + k] = y;
        }
        means.push(mean);
        inv_stds.push(inv);
    }
    Ok((
        float_tensor(x.dtype(), x.shape.clone(), out),
        means,
        inv_stds,
        a,
    ))
}

pub fn layer_norm(
    ins: &[Option<&Tensor>],
    ax: i64,
    eps: f32,
    n_outputs: usize,
) -> KResult<Vec<Tensor>> {
    let (y, means, invs, a) = normalize_trailing(ins, ax, eps, false)?;
    let mut res = vec![y];
    if n_outputs > 1 {
        let x = input(ins, 0)?;
        let mut stat_shape = x.shape[..a].to_vec();
        stat_shape.extend(std::iter::repeat_n(1, x.rank() - a));
        res.push(float_tensor(x.dtype(), stat_shape.clone(), means));
        if n_outputs > 2 {
            res.push(float_tensor(x.dtype(), stat_shape, invs));
        }
    }
    Ok(res)
}

pub fn rms_norm(ins: &[Option<&Tensor>], ax: i64, eps: f32) -> KResult<Tensor> {
    Ok(normalize_trailing(ins, ax, eps, true)?.0)
}

pub fn instance_norm(ins: &[Option<&Tensor>], eps: f32) -> KResult<Tensor> {
    let x = input(ins, 0)?;
    let scale = input(ins, 1)?.to_f64_vec();
    let bias = input(ins, 2)?.to_f64_vec();
    if x.rank() < 3 {
        return err("InstanceNormalization needs rank >= 3");
    }
    let c = x.shape[1];
    let inner: usize = x.shape[2..].iter().product();
    let v = x.to_f64_vec();
    let mut out = vec![0f64; v.len()];
    for (p, chunk) in v.chunks(inner.max(1)).enumerate() {
        let ch = p % c;
        let mean = chunk.iter().sum::<f64>() / inner as f64;
        let var = chunk.iter().map(|e| (e - mean) * (e - mean)).sum::<f64>() / inner as f64;
        let inv = 1.0 / (var + eps as f64).sqrt();
        for (k, &e) in chunk.iter().enumerate() {
            out[p * inner + k] = (e - mean) * inv * scale[ch] + bias[ch];
        }
    }
    Ok(float_tensor(x.dtype(), x.shape.clone(), out))
}

pub fn group_norm(ins: &[Option<&Tensor>], eps: f32, groups: usize) -> KResult<Tensor> {
    let x = input(ins, 0)?;
    let scale = input(ins, 1)?.to_f64_vec();
    let bias = input(ins, 2)?.to_f64_vec();
    if x.rank() < 3 || groups == 0 || x.shape[1] % groups != 0 {
        return err(format!(
            "GroupNormalization: {groups} groups do not divide the channels of {:?}",
            x.shape
        ));
    }
    let (n, c) = (x.shape[0], x.shape[1]);
    let sp: usize = x.shape[2..].iter().product();
    let per = c / groups * sp;
    let v = x.to_f64_vec();
    let mut out = vec![0f64; v.len()];
    for b in 0..n {
        for g in 0..groups {
            let start = (b * c + g * (c / groups)) * sp;
            let chunk = &v[start..start + per];
            let mean = chunk.iter().sum::<f64>() / per as f64;
            let var = chunk.iter().map(|e| (e - mean) * (e - mean)).sum::<f64>() / per as f64;
            let inv = 1.0 / (var + eps as f64).sqrt();
            for (k, &e) in chunk.iter().enumerate() {
                let ch = g * (c / groups) + k / sp;
                out[start + k] = (e - mean) * inv * scale[ch] + bias[ch];
            }
        }
    }
    Ok(float_tensor(x.dtype(), x.shape.clone(), out))
}

pub fn lp_norm(x: &Tensor, ax: i64, p: i64) -> KResult<Tensor> {
    let a = axis(ax, x.rank())?;
    let (outer, len, inner) = split_at_axis(&x.shape, a);
    let v = floats_of(x)?;
    let mut out = vec![0f64; v.len()];
    for o in 0..outer {
        for i in 0..inner {
            let at = |k: usize| (o * len + k) * inner + i;
            let norm = match p {
                1 => (0..len).map(|k| v[at(k)].abs()).sum::<f64>(),
                2 => (0..len).map(|k| v[at(k)] * v[at(k)]).sum::<f64>().sqrt(),
                _ => return err(format!("LpNormalization p must be 1 or 2, got {p}")),
            };
            for k in 0..len {
                out[at(k)] = if norm == 0.0 { 0.0 } else { v[at(k)] / norm };
            }
        }
    }
    Ok(float_tensor(x.dtype(), x.shape.clone(), out))
}
