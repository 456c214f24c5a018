//! MatMul, Gemm, MatMulInteger, Conv, ConvTranspose and the pooling ops. f32 matrix products
//! run on `matrixmultiply`'s blocked SGEMM, split over column blocks with rayon; every other
//! kernel here is a direct loop nest over N-dimensional windows.

use super::util::*;
use crate::dtype::DType;
use crate::ir::{AutoPad, ConvAttrs, PoolAttrs, PoolKind};
use crate::tensor::{strides, Tensor, TensorData};
use rayon::prelude::*;

#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: used only to hand disjoint column blocks of one output buffer to rayon workers.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

impl SendPtr {
    /// A method (not field access) so closures capture the whole `Send` wrapper.
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// C[m,n] = sum_k A[m,k] B[k,n] for row-major f32 matrices given by (data, row stride, col
/// stride). Parallel over column blocks of C.
#[allow(clippy::too_many_arguments)]
pub fn sgemm(
    m: usize,
    k: usize,
    n: usize,
    a: &[f32],
    rsa: isize,
    csa: isize,
    b: &[f32],
    rsb: isize,
    csb: isize,
    c: &mut [f32],
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        c.iter_mut().for_each(|x| *x = 0.0);
        return;
    }
    let flops = m * k * n;
    let threads = rayon::current_num_threads();
    let block = if flops < (1 << 18) || threads == 1 {
        n
    } else {
        (n.div_ceil(threads * 4)).max(64).min(n)
    };
    let cp = SendPtr(c.as_mut_ptr());
    let nblocks = n.div_ceil(block);
    (0..nblocks).into_par_iter().for_each(|bi| {
        let n0 = bi * block;
        let nb = block.min(n - n0);
        // SAFETY: every block writes a disjoint column range of C; A and B are only read and
        // the offsets stay inside the slices (n0 < n, strides describe the given buffers).
        unsafe {
            matrixmultiply::sgemm(
                m,
                k,
                nb,
                1.0,
                a.as_ptr(),
                rsa,
                csa,
                b.as_ptr().offset(n0 as isize * csb),
                rsb,
                csb,
                0.0,
                cp.get().add(n0),
                n as isize,
                1,
            );
        }
    });
}

/// Numpy matmul broadcasting of two operand shapes.
struct MatmulDims {
    m: usize,
    k: usize,
    n: usize,
    /// For each output batch, the batch index into A and into B.
    a_batch: Vec<usize>,
    b_batch: Vec<usize>,
    out_shape: Vec<usize>,
}

fn matmul_dims(a: &[usize], b: &[usize]) -> KResult<MatmulDims> {
    if a.is_empty() || b.is_empty() {
        return err("MatMul inputs must have rank >= 1");
    }
    let a2: Vec<usize> = if a.len() == 1 {
        vec![1, a[0]]
    } else {
        a.to_vec()
    };
    let b2: Vec<usize> = if b.len() == 1 {
        vec![b[0], 1]
    } else {
        b.to_vec()
    };
    let (m, k) = (a2[a2.len() - 2], a2[a2.len() - 1]);
    let (k2, n) = (b2[b2.len() - 2], b2[b2.len() - 1]);
    if k != k2 {
        return err(format!("MatMul inner dimensions differ: {a:?} x {b:?}"));
    }
    let ab = &a2[..a2.len() - 2];
    let bb = &b2[..b2.len() - 2];
    let batch = broadcast_shapes(&[ab, bb])?;
    let a_batch = broadcast_index(ab, &batch);
    let b_batch = broadcast_index(bb, &batch);
    let mut out_shape = batch;
    if a.len() > 1 {
        out_shape.push(m);
    }
    if b.len() > 1 {
        out_shape.push(n);
    }
    Ok(MatmulDims {
        m,
        k,
        n,
        a_batch,
        b_batch,
        out_shape,
    })
}

pub fn matmul(a: &Tensor, b: &Tensor) -> KResult<Tensor> {
    if a.dtype() != b.dtype() {
        return err(format!(
            "MatMul input types differ: {} and {}",
            a.dtype(),
            b.dtype()
        ));
    }
    let MatmulDims {
        m,
        k,
        n,
        a_batch: ia,
        b_batch: ib,
        out_shape,
    } = matmul_dims(&a.shape, &b.shape)?;
    let nb = ia.len();
    match (&a.data, &b.data) {
        (TensorData::F32(av), TensorData::F32(bv)) => Ok(Tensor::from_vec(
            out_shape,
            matmul_f32(av, bv, m, k, n, &ia, &ib),
        )),
        _ if a.dtype().is_float() => {
            let av: Vec<f32> = a.to_f64_vec().iter().map(|&x| x as f32).collect();
            let bv: Vec<f32> = b.to_f64_vec().iter().map(|&x| x as f32).collect();
            if a.dtype() == DType::F64 {
                let av = a.to_f64_vec();
                let bv = b.to_f64_vec();
                let mut out = vec![0f64; nb * m * n];
                for bi in 0..nb {
                    for i in 0..m {
                        for p in 0..k {
                            let x = av[ia[bi] * m * k + i * k + p];
                            let row = &bv[ib[bi] * k * n + p * n..][..n];
                            let o = &mut out[bi * m * n + i * n..][..n];
                            for j in 0..n {
                                o[j] += x * row[j];
                            }
                        }
                    }
                }
                return Ok(float_tensor(DType::F64, out_shape, out));
            }
            let r = matmul_f32(&av, &bv, m, k, n, &ia, &ib);
            Ok(float_tensor(
                a.dtype(),
                out_shape,
                r.into_iter().map(|x| x as f64).collect(),
            ))
        }
        _ => {
            let av = a.to_i64_vec();
            let bv = b.to_i64_vec();
            let mut out = vec![0i64; nb * m * n];
            for bi in 0..nb {
                for i in 0..m {
                    for p in 0..k {
                        let x = av[ia[bi] * m * k + i * k + p];
                        for j in 0..n {
                            out[bi * m * n + i * n + j] = out[bi * m * n + i * n + j]
                                .wrapping_add(x.wrapping_mul(bv[ib[bi] * k * n + p * n + j]));
                        }
                    }
                }
            }
            Ok(Tensor::new(
                out_shape,
                TensorData::from_f64s(a.dtype(), out.into_iter().map(|x| x as f64)),
            ))
        }
    }
}

fn matmul_f32(
    av: &[f32],
    bv: &[f32],
    m: usize,
    k: usize,
    n: usize,
    ia: &[usize],
    ib: &[usize],
) -> Vec<f32> {
    let nb = ia.len();
    let mut out = vec![0f32; nb * m * n];
    for bi in 0..nb {
        let a = &av[ia[bi] * m * k..][..m * k];
        let b = &bv[ib[bi] * k * n..][..k * n];
        sgemm(
            m,
            k,
            n,
            a,
            k as isize,
            1,
            b,
            n as isize,
            1,
            &mut out[bi * m * n..][..m * n],
        );
    }
    out
}

pub fn gemm(ins: &[Option<&Tensor>], alpha: f32, beta: f32, ta: bool, tb: bool) -> KResult<Tensor> {
    let a = input(ins, 0)?;
    let b = input(ins, 1)?;
    if a.rank() != 2 || b.rank() != 2 {
        return err(format!(
            "Gemm needs 2-D inputs, got {:?} and {:?}",
            a.shape, b.shape
        ));
    }
    let (m, k) = if ta {
        (a.shape[1], a.shape[0])
    } else {
        (a.shape[0], a.shape[1])
    };
    let (k2, n) = if tb {
        (b.shape[1], b.shape[0])
    } else {
        (b.shape[0], b.shape[1])
    };
    if k != k2 {
        return err(format!(
            "Gemm inner dimensions differ: {:?} x {:?}",
            a.shape, b.shape
        ));
    }
    let dtype = a.dtype();
    let mut y: Vec<f64> = if dtype == DType::F32 {
        let (av, bv) = (
            a.as_slice::<f32>().unwrap_or_default(),
            b.as_slice::<f32>().unwrap_or_default(),
        );
        let mut c = vec![0f32; m * n];
        let (rsa, csa) = if ta { (1, m as isize) } else { (k as isize, 1) };
        let (rsb, csb) = if tb { (1, k as isize) } else { (n as isize, 1) };
        sgemm(m, k, n, av, rsa, csa, bv, rsb, csb, &mut c);
        c.iter().map(|&x| x as f64 * alpha as f64).collect()
    } else {
        let av = a.to_f64_vec();
        let bv = b.to_f64_vec();
        let mut c = vec![0f64; m * n];
        for i in 0..m {
            for p in 0..k {
                let x = if ta { av[p * m + i] } else { av[i * k + p] };
                for j in 0..n {
                    let w = if tb { bv[j * k + p] } else { bv[p * n + j] };
                    c[i * n + j] += x * w;
                }
            }
        }
        c.iter().map(|&x| x * alpha as f64).collect()
    };
    if let Some(c) = opt_input(ins, 2) {
        let idx = broadcast_index(&c.shape, &[m, n]);
        broadcast_shapes(&[&c.shape, &[m, n]])?;
        let cv = c.to_f64_vec();
        for (o, &i) in y.iter_mut().zip(&idx) {
            *o += beta as f64 * cv[i];
        }
    }
    if dtype.is_float() {
        Ok(float_tensor(dtype, vec![m, n], y))
    } else {
        Ok(Tensor::new(
            vec![m, n],
            TensorData::from_f64s(dtype, y.into_iter()),
        ))
    }
}

pub fn matmul_integer(ins: &[Option<&Tensor>]) -> KResult<Tensor> {
    let a = input(ins, 0)?;
    let b = input(ins, 1)?;
    let MatmulDims {
        m,
        k,
        n,
        a_batch: ia,
        b_batch: ib,
        out_shape,
    } = matmul_dims(&a.shape, &b.shape)?;
    let av = ints_of(a)?;
    let bv = ints_of(b)?;
    let azp = opt_input(ins, 2).map(ints_of).transpose()?;
    let bzp = opt_input(ins, 3).map(ints_of).transpose()?;
    let zp_a = |i: usize| {
        azp.as_ref()
            .map(|z| if z.len() == 1 { z[0] } else { z[i] })
            .unwrap_or(0)
    };
    let zp_b = |j: usize| {
        bzp.as_ref()
            .map(|z| if z.len() == 1 { z[0] } else { z[j] })
            .unwrap_or(0)
    };
    let mut out = vec![0i32; ia.len() * m * n];
    for bi in 0..ia.len() {
        for i in 0..m {
            for j in 0..n {
                let mut s = 0i64;
                for p in 0..k {
                    s += (av[ia[bi] * m * k + i * k + p] - zp_a(i))
                        * (bv[ib[bi] * k * n + p * n + j] - zp_b(j));
                }
                out[bi * m * n + i * n + j] = s as i32;
            }
        }
    }
    Ok(Tensor::from_vec(out_shape, out))
}

/// Resolved geometry of a convolution or pooling window over the spatial dims.
#[derive(Clone, Debug, PartialEq)]
pub struct Window {
    pub input: Vec<usize>,
    pub kernel: Vec<usize>,
    pub strides: Vec<usize>,
    pub dilations: Vec<usize>,
    pub pad_begin: Vec<usize>,
    pub pad_end: Vec<usize>,
    pub output: Vec<usize>,
}

/// Resolves a window's geometry (auto_pad, pads, strides, dilations, ceil_mode) exactly as
/// ONNX defines it; shared with the code generator so both agree by construction.
pub fn window(
    spatial: &[usize],
    kernel: &[usize],
    a: &ConvAttrs,
    ceil_mode: bool,
) -> KResult<Window> {
    let r = spatial.len();
    if kernel.len() != r {
        return err(format!(
            "kernel shape {kernel:?} does not match {r} spatial dims"
        ));
    }
    let or_ones = |v: &[usize]| if v.is_empty() { vec![1; r] } else { v.to_vec() };
    let strides = or_ones(&a.strides);
    let dilations = or_ones(&a.dilations);
    if strides.len() != r || dilations.len() != r || strides.contains(&0) || dilations.contains(&0)
    {
        return err("strides/dilations do not match the spatial rank or contain zero");
    }
    let mut pads = if a.pads.is_empty() {
        vec![0; 2 * r]
    } else {
        a.pads.clone()
    };
    if pads.len() != 2 * r {
        return err(format!("pads {pads:?} must have {} entries", 2 * r));
    }
    if kernel.contains(&0) {
        return err("kernel shape contains zero");
    }
    let mut output = vec![0; r];
    for i in 0..r {
        let ext = (kernel[i] - 1) * dilations[i] + 1;
        match a.auto_pad {
            AutoPad::SameUpper | AutoPad::SameLower => {
                let out = spatial[i].div_ceil(strides[i]);
                let total = ((out.max(1) - 1) * strides[i] + ext).saturating_sub(spatial[i]);
                let small = total / 2;
                let (b, e) = if a.auto_pad == AutoPad::SameUpper {
                    (small, total - small)
                } else {
                    (total - small, small)
                };
                pads[i] = b;
                pads[i + r] = e;
                output[i] = out;
            }
            AutoPad::Valid | AutoPad::NotSet => {
                if a.auto_pad == AutoPad::Valid {
                    pads[i] = 0;
                    pads[i + r] = 0;
                }
                let padded = spatial[i] + pads[i] + pads[i + r];
                if padded < ext {
                    return err(format!(
                        "window of extent {ext} does not fit the padded input {padded}"
                    ));
                }
                let span = padded - ext;
                output[i] = if ceil_mode {
                    let mut o = span.div_ceil(strides[i]) + 1;
                    if (o - 1) * strides[i] >= spatial[i] + pads[i] {
                        o -= 1;
                    }
                    o
                } else {
                    span / strides[i] + 1
                };
            }
        }
    }
    Ok(Window {
        input: spatial.to_vec(),
        kernel: kernel.to_vec(),
        strides,
        dilations,
        pad_begin: pads[..r].to_vec(),
        pad_end: pads[r..].to_vec(),
        output,
    })
}

/// Iterates all multi-indices of `shape` (row-major), calling `f` with each.
fn for_each_index(shape: &[usize], mut f: impl FnMut(&[usize])) {
    let n: usize = shape.iter().product();
    let mut idx = vec![0usize; shape.len()];
    for _ in 0..n {
        f(&idx);
        for d in (0..shape.len()).rev() {
            idx[d] += 1;
            if idx[d] < shape[d] {
                break;
            }
            idx[d] = 0;
        }
    }
}

pub fn conv(ins: &[Option<&Tensor>], a: &ConvAttrs) -> KResult<Tensor> {
    let x = input(ins, 0)?;
    let w = input(ins, 1)?;
    if x.rank() < 3 || w.rank() != x.rank() {
        return err(format!(
            "Conv needs X [N,C,...] and W of the same rank, got {:?} and {:?}",
            x.shape, w.shape
        ));
    }
    let (n, c) = (x.shape[0], x.shape[1]);
    let m = w.shape[0];
    let g = a.group;
    if c % g != 0 || m % g != 0 || w.shape[1] * g != c {
        return err(format!(
            "Conv channels do not match: X {:?}, W {:?}, group {g}",
            x.shape, w.shape
        ));
    }
    let kernel = if a.kernel_shape.is_empty() {
        w.shape[2..].to_vec()
    } else {
        a.kernel_shape.clone()
    };
    let win = window(&x.shape[2..], &kernel, a, false)?;
    let xv = x.to_f64_vec();
    let wv = w.to_f64_vec();
    let bias = opt_input(ins, 2).map(|b| b.to_f64_vec());
    let r = win.input.len();
    let cg = c / g;
    let mg = m / g;
    let in_sp: usize = win.input.iter().product();
    let k_sp: usize = win.kernel.iter().product();
    let out_sp: usize = win.output.iter().product();
    let in_st = strides(&win.input);
    // Precompute kernel offsets.
    let mut kidx: Vec<Vec<usize>> = Vec::with_capacity(k_sp);
    for_each_index(&win.kernel, |k| kidx.push(k.to_vec()));
    let mut out = vec![0f64; n * m * out_sp];
    let mut oidx: Vec<Vec<usize>> = Vec::with_capacity(out_sp);
    for_each_index(&win.output, |o| oidx.push(o.to_vec()));
    for b in 0..n {
        for oc in 0..m {
            let grp = oc / mg;
            for (op, o) in oidx.iter().enumerate() {
                let mut s = bias.as_ref().map(|bv| bv[oc]).unwrap_or(0.0);
                for (kp, k) in kidx.iter().enumerate() {
                    let mut off = 0usize;
                    let mut inside = true;
                    for d in 0..r {
                        let pos = (o[d] * win.strides[d] + k[d] * win.dilations[d]) as isize
                            - win.pad_begin[d] as isize;
                        if pos < 0 || pos as usize >= win.input[d] {
                            inside = false;
                            break;
                        }
                        off += pos as usize * in_st[d];
                    }
                    if !inside {
                        continue;
                    }
                    for ic in 0..cg {
                        let xi = (b * c + grp * cg + ic) * in_sp + off;
                        let wi = (oc * cg + ic) * k_sp + kp;
                        s += xv[xi] * wv[wi];
                    }
                }
                out[(b * m + oc) * out_sp + op] = s;
            }
        }
    }
    let mut shape = vec![n, m];
    shape.extend(&win.output);
    Ok(float_tensor(x.dtype(), shape, out))
}

pub fn conv_transpose(
    ins: &[Option<&Tensor>],
    a: &ConvAttrs,
    output_padding: &[usize],
    output_shape: &[usize],
) -> KResult<Tensor> {
    let x = input(ins, 0)?;
    let w = input(ins, 1)?;
    if x.rank() < 3 || w.rank() != x.rank() {
        return err(format!(
            "ConvTranspose needs X [N,C,...] and W of the same rank, got {:?} and {:?}",
            x.shape, w.shape
        ));
    }
    let (n, c) = (x.shape[0], x.shape[1]);
    let g = a.group;
    if w.shape[0] != c || c % g != 0 {
        return err(format!(
            "ConvTranspose channels do not match: X {:?}, W {:?}",
            x.shape, w.shape
        ));
    }
    let mg = w.shape[1];
    let m = mg * g;
    let sp = &x.shape[2..];
    let r = sp.len();
    let kernel = if a.kernel_shape.is_empty() {
        w.shape[2..].to_vec()
    } else {
        a.kernel_shape.clone()
    };
    let win = transpose_window(sp, &kernel, a, output_padding, output_shape)?;
    let (strides_v, dil, out_sp) = (win.strides, win.dilations, win.output);
    let pads = win.pad_begin;
    let xv = x.to_f64_vec();
    let wv = w.to_f64_vec();
    let in_n: usize = sp.iter().product();
    let out_n: usize = out_sp.iter().product();
    let k_n: usize = kernel.iter().product();
    let ost = strides(&out_sp);
    let mut out = vec![0f64; n * m * out_n];
    let cg = c / g;
    let mut kidx: Vec<Vec<usize>> = Vec::new();
    for_each_index(&kernel, |k| kidx.push(k.to_vec()));
    let mut iidx: Vec<Vec<usize>> = Vec::new();
    for_each_index(sp, |i| iidx.push(i.to_vec()));
    for b in 0..n {
        for ic in 0..c {
            let grp = ic / cg;
            for (ip, iv) in iidx.iter().enumerate() {
                let xval = xv[(b * c + ic) * in_n + ip];
                for (kp, k) in kidx.iter().enumerate() {
                    let mut off = 0usize;
                    let mut inside = true;
                    for d in 0..r {
                        let pos =
                            (iv[d] * strides_v[d] + k[d] * dil[d]) as isize - pads[d] as isize;
                        if pos < 0 || pos as usize >= out_sp[d] {
                            inside = false;
                            break;
                        }
                        off += pos as usize * ost[d];
                    }
                    if !inside {
                        continue;
                    }
                    for oc in 0..mg {
                        let wi = (ic * mg + oc) * k_n + kp;
                        out[(b * m + grp * mg + oc) * out_n + off] += xval * wv[wi];
                    }
                }
            }
        }
    }
    if let Some(bias) = opt_input(ins, 2) {
        let bv = bias.to_f64_vec();
        for b in 0..n {
            for oc in 0..m {
                for v in &mut out[(b * m + oc) * out_n..][..out_n] {
                    *v += bv[oc];
                }
            }
        }
    }
    let mut shape = vec![n, m];
    shape.extend(&out_sp);
    Ok(float_tensor(x.dtype(), shape, out))
}

/// ConvTranspose geometry (strides, dilations, output_padding, output_shape, auto_pad) as ONNX
/// defines it: `Window::output` is the output's spatial shape, `pad_begin`/`pad_end` the pads.
/// Shared with the code generator.
pub fn transpose_window(
    sp: &[usize],
    kernel: &[usize],
    a: &ConvAttrs,
    output_padding: &[usize],
    output_shape: &[usize],
) -> KResult<Window> {
    let r = sp.len();
    let or = |v: &[usize], d: usize| if v.is_empty() { vec![d; r] } else { v.to_vec() };
    let strides_v = or(&a.strides, 1);
    let dil = or(&a.dilations, 1);
    let opad = or(output_padding, 0);
    let mut pads = if a.pads.is_empty() {
        vec![0; 2 * r]
    } else {
        a.pads.clone()
    };
    if pads.len() != 2 * r
        || strides_v.len() != r
        || dil.len() != r
        || opad.len() != r
        || kernel.len() != r
        || kernel.contains(&0)
        || strides_v.contains(&0)
    {
        return err("ConvTranspose attribute lengths do not match the spatial rank");
    }
    let mut out_sp = vec![0usize; r];
    for i in 0..r {
        let ext = (kernel[i] - 1) * dil[i] + 1;
        let full = strides_v[i] * (sp[i].max(1) - 1) + opad[i] + ext;
        if !output_shape.is_empty() || matches!(a.auto_pad, AutoPad::SameUpper | AutoPad::SameLower)
        {
            let target = if !output_shape.is_empty() {
                *output_shape
                    .get((output_shape.len() + i).wrapping_sub(r))
                    .ok_or_else(|| KernelError("bad output_shape".into()))?
            } else {
                sp[i] * strides_v[i]
            };
            let total = full.saturating_sub(target);
            let (b, e) = if a.auto_pad == AutoPad::SameUpper {
                (total / 2, total - total / 2)
            } else {
                (total - total / 2, total / 2)
            };
            pads[i] = b;
            pads[i + r] = e;
            out_sp[i] = target;
        } else {
            if a.auto_pad == AutoPad::Valid {
                pads[i] = 0;
                pads[i + r] = 0;
            }
            out_sp[i] = full
                .checked_sub(pads[i] + pads[i + r])
                .ok_or_else(|| KernelError("pads exceed the output".into()))?;
        }
    }
    Ok(Window {
        input: sp.to_vec(),
        kernel: kernel.to_vec(),
        strides: strides_v,
        dilations: dil,
        pad_begin: pads[..r].to_vec(),
        pad_end: pads[r..].to_vec(),
        output: out_sp,
    })
}

pub fn pool(x: &Tensor, p: &PoolAttrs, n_outputs: usize) -> KResult<Vec<Tensor>> {
    if x.rank() < 3 {
        return err(format!("pooling needs X [N,C,...], got {:?}", x.shape));
    }
    let (n, c) = (x.shape[0], x.shape[1]);
    let sp = &x.shape[2..];
    let win = window(sp, &p.window.kernel_shape, &p.window, p.ceil_mode)?;
    let r = sp.len();
    let xv = x.to_f64_vec();
    let in_n: usize = sp.iter().product();
    let out_n: usize = win.output.iter().product();
    let in_st = strides(sp);
    let mut kidx: Vec<Vec<usize>> = Vec::new();
    for_each_index(&win.kernel, |k| kidx.push(k.to_vec()));
    let mut oidx: Vec<Vec<usize>> = Vec::new();
    for_each_index(&win.output, |o| oidx.push(o.to_vec()));
    // count_include_pad counts taps inside the padded extent, begin and end pads alike.
    let pads_end = &win.pad_end;
    let mut out = vec![0f64; n * c * out_n];
    let mut indices = vec![0i64; n * c * out_n];
    for plane in 0..n * c {
        let base = plane * in_n;
        for (op, o) in oidx.iter().enumerate() {
            let mut best = f64::NEG_INFINITY;
            let mut best_i = -1i64;
            let mut sum = 0.0;
            let mut count = 0usize;
            let mut count_pad = 0usize;
            for k in &kidx {
                let mut off = 0usize;
                let mut inside = true;
                let mut in_padded = true;
                let mut col_major = 0usize;
                let mut cm_stride = 1usize;
                for d in 0..r {
                    let pos = (o[d] * win.strides[d] + k[d] * win.dilations[d]) as isize
                        - win.pad_begin[d] as isize;
                    if pos < -(win.pad_begin[d] as isize) || pos >= (sp[d] + pads_end[d]) as isize {
                        in_padded = false;
                    }
                    if pos < 0 || pos as usize >= sp[d] {
                        inside = false;
                        continue;
                    }
                    off += pos as usize * in_st[d];
                    col_major += pos as usize * cm_stride;
                    cm_stride *= sp[d];
                }
                if in_padded {
                    count_pad += 1;
                }
                if !inside {
                    continue;
                }
                let v = xv[base + off];
                count += 1;
                match p.kind {
                    PoolKind::Max => {
                        if v > best || best_i < 0 {
                            best = v;
                            let local = if p.storage_order == 1 { col_major } else { off };
                            best_i = (base + local) as i64;
                        }
                    }
                    PoolKind::Average { .. } => sum += v,
                    PoolKind::Lp { p: pw } => sum += v.abs().powi(pw as i32),
                }
            }
            let val = match p.kind {
                PoolKind::Max => best,
                PoolKind::Average { count_include_pad } => {
                    let d = if count_include_pad { count_pad } else { count };
                    if d == 0 {
                        0.0
                    } else {
                        sum / d as f64
                    }
                }
                PoolKind::Lp { p: pw } => sum.powf(1.0 / pw as f64),
            };
            out[plane * out_n + op] = val;
            indices[plane * out_n + op] = best_i;
        }
    }
    let mut shape = vec![n, c];
    shape.extend(&win.output);
    let mut res = vec![float_tensor(x.dtype(), shape.clone(), out)];
    if n_outputs > 1 {
        res.push(Tensor::from_vec(shape, indices));
    }
    Ok(res)
}

pub fn global_pool(x: &Tensor, kind: PoolKind) -> KResult<Tensor> {
    if x.rank() < 3 {
        return err(format!(
            "global pooling needs X [N,C,...], got {:?}",
            x.shape
        ));
    }
    let plane: usize = x.shape[2..].iter().product();
    let v = x.to_f64_vec();
    let out: Vec<f64> = v
        .chunks(plane.max(1))
        .map(|ch| match kind {
            PoolKind::Max => ch.iter().copied().fold(f64::NEG_INFINITY, f64::max),
            PoolKind::Average { .. } => ch.iter().sum::<f64>() / plane as f64,
            PoolKind::Lp { p } => ch
                .iter()
                .map(|e| e.abs().powi(p as i32))
                .sum::<f64>()
                .powf(1.0 / p as f64),
        })
        .collect();
    let mut shape = x.shape[..2].to_vec();
    shape.extend(std::iter::repeat_n(1, x.rank() - 2));
    Ok(float_tensor(x.dtype(), shape, out))
}
