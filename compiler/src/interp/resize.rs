//! Resize (and opset-9 Upsample): nearest, linear and cubic interpolation with every ONNX
//! coordinate transformation mode, applied one axis at a time (all three modes are separable).

use super::util::*;
use crate::ir::{
    CoordinateTransform as CT, KeepAspectRatio, NearestRounding, ResizeAttrs, ResizeMode,
};
use crate::tensor::Tensor;

pub fn resize(ins: &[Option<&Tensor>], a: &ResizeAttrs) -> KResult<Tensor> {
    let x = input(ins, 0)?;
    if a.antialias {
        return err("Resize with antialias is not supported");
    }
    let r = x.rank();
    let axes: Vec<usize> = match &a.axes {
        Some(ax) => ax.iter().map(|&v| axis(v, r)).collect::<KResult<_>>()?,
        None => (0..r).collect(),
    };
    let roi = if a.scales_input == 2 {
        opt_input(ins, 1)
            .map(|t| t.to_f64_vec())
            .filter(|v| !v.is_empty())
    } else {
        None
    };
    let scales_t = opt_input(ins, a.scales_input).filter(|t| t.numel() > 0);
    let sizes_t = if a.scales_input == 2 {
        opt_input(ins, 3).filter(|t| t.numel() > 0)
    } else {
        None
    };
    let mut scales = vec![1f64; r];
    let mut out_shape = x.shape.clone();
    match (scales_t, sizes_t) {
        (Some(s), None) => {
            let sv = floats_of(s)?;
            if sv.len() != axes.len() {
                return err(format!(
                    "Resize scales has {} entries for {} axes",
                    sv.len(),
                    axes.len()
                ));
            }
            for (i, &ax) in axes.iter().enumerate() {
                scales[ax] = sv[i];
                out_shape[ax] = (x.shape[ax] as f64 * sv[i]).floor() as usize;
            }
        }
        (None, Some(s)) => {
            let sv = ints_of(s)?;
            if sv.len() != axes.len() {
                return err(format!(
                    "Resize sizes has {} entries for {} axes",
                    sv.len(),
                    axes.len()
                ));
            }
            let ratios: Vec<f64> = axes
                .iter()
                .zip(&sv)
                .map(|(&ax, &sz)| sz as f64 / x.shape[ax] as f64)
                .collect();
            let pick = match a.keep_aspect_ratio {
                KeepAspectRatio::Stretch => None,
                KeepAspectRatio::NotLarger => ratios.iter().copied().reduce(f64::min),
                KeepAspectRatio::NotSmaller => ratios.iter().copied().reduce(f64::max),
            };
            for (i, &ax) in axes.iter().enumerate() {
                match pick {
                    None => {
                        scales[ax] = ratios[i];
                        out_shape[ax] = sv[i].max(0) as usize;
                    }
                    Some(p) => {
                        scales[ax] = p;
                        out_shape[ax] = (x.shape[ax] as f64 * p).round() as usize;
                    }
                }
            }
        }
        (Some(_), Some(_)) => return err("Resize takes scales or sizes, not both"),
        (None, None) => return err("Resize needs scales or sizes"),
    }
    let mut roi_full = vec![(0f64, 1f64); r];
    if let Some(rv) = &roi {
        if rv.len() != 2 * axes.len() {
            return err("Resize roi length does not match the axes");
        }
        for (i, &ax) in axes.iter().enumerate() {
            roi_full[ax] = (rv[i], rv[i + axes.len()]);
        }
    }
    let mut cur = x.to_f64_vec();
    let mut shape = x.shape.clone();
    for d in 0..r {
        if out_shape[d] == shape[d]
            && scales[d] == 1.0
            && a.coordinate_transform != CT::TfCropAndResize
        {
            continue;
        }
        cur = resize_axis(&cur, &shape, d, out_shape[d], scales[d], roi_full[d], a)?;
        shape[d] = out_shape[d];
    }
    Ok(Tensor::new(
        shape,
        crate::tensor::TensorData::from_f64s(x.dtype(), cur.into_iter()),
    ))
}

fn original_coord(
    a: &ResizeAttrs,
    xr: f64,
    scale: f64,
    in_len: usize,
    out_len: usize,
    roi: (f64, f64),
) -> f64 {
    // The resized length in these formulas is `in * scale` before flooring (as in the ONNX
    // reference), except for half_pixel_symmetric, which uses the integer output length.
    let li = in_len as f64;
    let lo = li * scale;
    match a.coordinate_transform {
        CT::HalfPixel => (xr + 0.5) / scale - 0.5,
        CT::HalfPixelSymmetric => {
            let adj = out_len as f64 / (li * scale);
            let center = li / 2.0;
            center * (1.0 - adj) + (xr + 0.5) / scale - 0.5
        }
        CT::PytorchHalfPixel => {
            if lo > 1.0 {
                (xr + 0.5) / scale - 0.5
            } else {
                0.0
            }
        }
        CT::AlignCorners => {
            if lo == 1.0 {
                0.0
            } else {
                xr * (li - 1.0) / (lo - 1.0)
            }
        }
        CT::Asymmetric => xr / scale,
        CT::TfCropAndResize => {
            if lo > 1.0 {
                roi.0 * (li - 1.0) + xr * (roi.1 - roi.0) * (li - 1.0) / (lo - 1.0)
            } else {
                0.5 * (roi.0 + roi.1) * (li - 1.0)
            }
        }
    }
}

fn cubic_weights(t: f64, a: f64) -> [f64; 4] {
    let w = |x: f64| {
        let x = x.abs();
        if x <= 1.0 {
            ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
        } else if x < 2.0 {
            ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a
        } else {
            0.0
        }
    };
    [w(t + 1.0), w(t), w(1.0 - t), w(2.0 - t)]
}

fn resize_axis(
    v: &[f64],
    shape: &[usize],
    d: usize,
    out_len: usize,
    scale: f64,
    roi: (f64, f64),
    a: &ResizeAttrs,
) -> KResult<Vec<f64>> {
    let (outer, in_len, inner) = split_at_axis(shape, d);
    if in_len == 0 {
        return err("Resize of an empty axis");
    }
    // Per output coordinate: list of (input index, weight), or None for extrapolation.
    let mut taps: Vec<Option<Vec<(usize, f64)>>> = Vec::with_capacity(out_len);
    let clampi = |i: i64| i.clamp(0, in_len as i64 - 1) as usize;
    for o in 0..out_len {
        let xo = original_coord(a, o as f64, scale, in_len, out_len, roi);
        if a.coordinate_transform == CT::TfCropAndResize && (xo < 0.0 || xo > (in_len - 1) as f64) {
            taps.push(None);
            continue;
        }
        let t = match a.mode {
            ResizeMode::Nearest => {
                let i = match a.nearest_mode {
                    NearestRounding::RoundPreferFloor => {
                        if xo.fract() == 0.5 || xo - xo.floor() == 0.5 {
                            xo.floor()
                        } else {
                            xo.round()
                        }
                    }
                    NearestRounding::RoundPreferCeil => {
                        if xo - xo.floor() == 0.5 {
                            xo.ceil()
                        } else {
                            xo.round()
                        }
                    }
                    NearestRounding::Floor => xo.floor(),
                    NearestRounding::Ceil => xo.ceil(),
                };
                vec![(clampi(i as i64), 1.0)]
            }
            ResizeMode::Linear => {
                let xc = xo.clamp(0.0, (in_len - 1) as f64);
                let f = xc.floor();
                let t = xc - f;
                vec![(clampi(f as i64), 1.0 - t), (clampi(f as i64 + 1), t)]
            }
            ResizeMode::Cubic => {
                let f = xo.floor();
                let t = xo - f;
                let w = cubic_weights(t, a.cubic_coeff_a as f64);
                let mut taps4 = Vec::with_capacity(4);
                let mut sum = 0.0;
                for (j, &wj) in w.iter().enumerate() {
                    let idx = f as i64 - 1 + j as i64;
                    let inside = idx >= 0 && idx < in_len as i64;
                    if a.exclude_outside && !inside {
                        continue;
                    }
                    taps4.push((clampi(idx), wj));
                    sum += wj;
                }
                if a.exclude_outside && sum != 0.0 {
                    for t in taps4.iter_mut() {
                        t.1 /= sum;
                    }
                }
                taps4
            }
        };
        taps.push(Some(t));
    }
    let mut out = vec![0f64; outer * out_len * inner];
    for o in 0..outer {
        for (k, tap) in taps.iter().enumerate() {
            for i in 0..inner {
                out[(o * out_len + k) * inner + i] = match tap {
                    None => a.extrapolation_value as f64,
                    Some(t) => t
                        .iter()
                        .map(|&(j, w)| w * v[(o * in_len + j) * inner + i])
                        .sum(),
                };
            }
        }
    }
    Ok(out)
}
