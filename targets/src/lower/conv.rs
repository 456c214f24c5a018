//! Lowering of the windowed ops: Conv, ConvTranspose, MaxPool/AveragePool/LpPool (MaxPool's
//! optional int64 `Indices` output included) and GlobalAveragePool/GlobalMaxPool/GlobalLpPool,
//! f32 only (other element types are refused with "only lowered for f32"). Each node becomes
//! one kernel: loops over the output positions (dims of extent 1 get no loop), inner loops over
//! the input channels of the group and the kernel window. The geometry (auto_pad, pads,
//! strides, dilations, ceil_mode, ConvTranspose's output_padding/output_shape) is resolved at
//! compile time exactly as the interpreter's `interp::linalg` does, and checked against the
//! inferred output shape; the loop IR has no `if`, so a window tap that can fall into the
//! padding reads a clamped (always in-range) address and is masked with `select` on its bounds
//! condition. For Conv and the pools, dims where no tap can leave the input get no check.
//! ConvTranspose is lowered in gather form (each output sums the input taps that would scatter
//! onto it: `(o + pad - k*dilation)` must be a non-negative multiple of the stride inside the
//! input). Convolution sums longer than 64 products are accumulated in partial sums of about
//! 64 products each, global average/Lp pools through `blocked_sum`.

use super::{blocked_sum, Lowerer, Step, R};
use crate::loop_ir::*;
use kiln_compiler::dtype::DType;
use kiln_compiler::interp::linalg::{transpose_window, window, Window};
use kiln_compiler::ir::{ConvAttrs, Node, Op, PoolAttrs, PoolKind, ValueId};
use kiln_compiler::tensor::strides;

/// Whether this module lowers `op` (element types are checked when lowering).
pub(super) fn supported(op: &Op) -> bool {
    matches!(
        op,
        Op::Conv(_) | Op::ConvTranspose { .. } | Op::Pool(_) | Op::GlobalPool(_)
    )
}

/// Products per partial sum in convolutions (as `blocked_sum`'s block).
const BLOCK: usize = 64;

/// One tap of a window: per spatial dim the raw position `o*stride + k*dilation - pad` (may be
/// outside the input), the position clamped into the input, and whether the tap is inside
/// (`None`: statically always inside).
struct Tap {
    raw: Vec<Expr>,
    clamped: Vec<Expr>,
    inside: Option<Expr>,
}

/// Compile-time helpers on the interpreter's window geometry.
trait WindowExt {
    fn max_pos(&self, d: usize) -> i64;
    fn tap(&self, o: &[Expr], k: &[Expr]) -> Tap;
}

impl WindowExt for Window {
    /// Largest raw position of dim `d` over all outputs and taps.
    fn max_pos(&self, d: usize) -> i64 {
        let o = self.output[d].max(1) - 1;
        (o * self.strides[d] + (self.kernel[d] - 1) * self.dilations[d]) as i64
            - self.pad_begin[d] as i64
    }

    fn tap(&self, o: &[Expr], k: &[Expr]) -> Tap {
        let mut t = Tap {
            raw: Vec::new(),
            clamped: Vec::new(),
            inside: None,
        };
        for d in 0..self.input.len() {
            let pos = Expr::add(
                Expr::add(
                    Expr::mul(o[d].clone(), Expr::i64(self.strides[d] as i64)),
                    Expr::mul(k[d].clone(), Expr::i64(self.dilations[d] as i64)),
                ),
                Expr::i64(-(self.pad_begin[d] as i64)),
            );
            let size = self.input[d] as i64;
            let mut c = pos.clone();
            if self.pad_begin[d] > 0 {
                t.inside = and(t.inside, Expr::cmp(CmpOp::Ge, pos.clone(), Expr::i64(0)));
                c = Expr::max(c, Expr::i64(0));
            }
            if self.max_pos(d) >= size {
                t.inside = and(t.inside, Expr::cmp(CmpOp::Lt, pos.clone(), Expr::i64(size)));
                c = Expr::min(c, Expr::i64(size - 1));
            }
            t.raw.push(pos);
            t.clamped.push(c);
        }
        t
    }
}

fn and(a: Option<Expr>, b: Expr) -> Option<Expr> {
    Some(match a {
        Some(a) => Expr::bin(BinOp::And, a, b),
        None => b,
    })
}

/// `offset + sum(idx[d] * st[d])`.
fn dot(idx: &[Expr], st: &[usize], offset: Expr) -> Expr {
    idx.iter().zip(st).fold(offset, |e, (i, &s)| {
        Expr::add(e, Expr::mul(i.clone(), Expr::i64(s as i64)))
    })
}

/// Nested loops over `extents` like [`nest`], but a dim of extent 1 gets no loop and index 0.
fn loops(
    k: &mut Kernel,
    extents: &[usize],
    body: impl FnOnce(&mut Kernel, &[Expr]) -> Vec<Stmt>,
) -> Vec<Stmt> {
    let vars: Vec<Option<VarId>> = extents
        .iter()
        .map(|&e| (e != 1).then(|| k.new_var(Scalar::I64)))
        .collect();
    let idx: Vec<Expr> = vars
        .iter()
        .map(|v| v.map_or(Expr::i64(0), Expr::var))
        .collect();
    let mut s = body(k, &idx);
    for (d, &e) in extents.iter().enumerate().rev() {
        if let Some(var) = vars[d] {
            s = vec![Stmt::Loop {
                var,
                extent: e,
                kind: LoopKind::Serial,
                body: s,
            }];
        }
    }
    s
}

fn assign(var: VarId, value: Expr) -> Stmt {
    Stmt::Assign { var, value }
}

fn accumulate(var: VarId, e: Expr) -> Stmt {
    assign(var, Expr::add(Expr::var(var), e))
}

/// `acc = sum over channels c of (body(c) accumulating `per` products into a given variable)`.
/// When the sum is longer than [`BLOCK`] products, channels are grouped so that each partial
/// sum holds about `BLOCK` products and the partial sums are added into `acc`.
fn channel_sum(
    k: &mut Kernel,
    acc: VarId,
    channels: usize,
    per: usize,
    mut body: impl FnMut(&mut Kernel, Expr, VarId) -> Vec<Stmt>,
) -> Vec<Stmt> {
    let mut s = vec![assign(acc, Expr::f32(0.0))];
    if channels * per <= BLOCK {
        s.extend(loops(k, &[channels], |k, c| body(k, c[0].clone(), acc)));
        return s;
    }
    let b = (BLOCK / per.max(1)).max(1);
    let (blocks, tail) = (channels / b, channels % b);
    let part = k.new_var(Scalar::F32);
    s.extend(loops(k, &[blocks], |k, bv| {
        let mut inner = vec![assign(part, Expr::f32(0.0))];
        inner.extend(loops(k, &[b], |k, iv| {
            let c = Expr::add(Expr::mul(bv[0].clone(), Expr::i64(b as i64)), iv[0].clone());
            body(k, c, part)
        }));
        inner.push(accumulate(acc, Expr::var(part)));
        inner
    }));
    if tail > 0 {
        s.push(assign(part, Expr::f32(0.0)));
        s.extend(loops(k, &[tail], |k, tv| {
            let c = Expr::add(Expr::i64((blocks * b) as i64), tv[0].clone());
            body(k, c, part)
        }));
        s.push(accumulate(acc, Expr::var(part)));
    }
    s
}

/// `|x|^p` for an integer `p >= 1` (`x` is evaluated once per use: pass a variable).
fn int_pow(x: Expr, p: i64) -> Expr {
    match p {
        1 => x,
        2 => Expr::mul(x.clone(), x),
        _ if p % 2 == 0 => {
            let h = int_pow(x, p / 2);
            Expr::mul(h.clone(), h)
        }
        _ if p <= 8 => Expr::mul(int_pow(x.clone(), p - 1), x),
        _ => Expr::select(
            Expr::cmp(CmpOp::Eq, x.clone(), Expr::f32(0.0)),
            Expr::f32(0.0),
            Expr::bin(BinOp::Pow, x, Expr::f32(p as f32)),
        ),
    }
}

/// `s^(1/p)` for `s >= 0`.
fn root(s: Expr, p: i64) -> Expr {
    match p {
        1 => s,
        2 => Expr::un(UnOp::Sqrt, s),
        4 => Expr::un(UnOp::Sqrt, Expr::un(UnOp::Sqrt, s)),
        _ => Expr::select(
            Expr::cmp(CmpOp::Gt, s.clone(), Expr::f32(0.0)),
            Expr::bin(BinOp::Pow, s, Expr::f32((1.0 / p as f64) as f32)),
            Expr::f32(0.0),
        ),
    }
}

fn check_output(win_out: &[usize], lead: [usize; 2], actual: &[usize]) -> R<()> {
    let mut expect = lead.to_vec();
    expect.extend(win_out);
    if expect != actual {
        return Err(format!(
            "computed output shape {expect:?} differs from the inferred {actual:?}"
        ));
    }
    Ok(())
}

impl Lowerer<'_> {
    pub(super) fn lower_windowed(&mut self, n: &Node) -> R<()> {
        match &n.op {
            Op::Conv(a) => self.conv(n, a),
            Op::ConvTranspose {
                conv,
                output_padding,
                output_shape,
            } => self.conv_transpose(n, conv, output_padding, output_shape),
            Op::Pool(p) => self.pool(n, p),
            Op::GlobalPool(kind) => self.global_pool(n, *kind),
            other => Err(format!("no lowering for {}", other.onnx_name())),
        }
    }

    fn windowed_input(&self, n: &Node, i: usize) -> R<ValueId> {
        n.inputs
            .get(i)
            .copied()
            .flatten()
            .ok_or_else(|| format!("missing input {i}"))
    }

    /// Errs (a skip for the conformance runner) unless every present input is f32.
    fn f32_only(&self, n: &Node) -> R<()> {
        for &v in n.inputs.iter().flatten() {
            let d = self.g.value(v).ty.dtype;
            if d != Some(DType::F32) {
                let name = d.map_or("unknown".to_string(), |d| d.to_string());
                return Err(format!(
                    "{} is only lowered for f32, not {name}",
                    n.op.onnx_name()
                ));
            }
        }
        Ok(())
    }

    fn conv(&mut self, n: &Node, a: &ConvAttrs) -> R<()> {
        self.f32_only(n)?;
        let x = self.windowed_input(n, 0)?;
        let w = self.windowed_input(n, 1)?;
        let bias = n.inputs.get(2).copied().flatten();
        let (xs, ws) = (self.shape(x)?, self.shape(w)?);
        if xs.len() < 3 || ws.len() != xs.len() {
            return Err(format!(
                "Conv needs X [N,C,...] and W of the same rank, got {xs:?} and {ws:?}"
            ));
        }
        let (nb, c, m, g) = (xs[0], xs[1], ws[0], a.group);
        if g == 0 || c % g != 0 || m % g != 0 || ws[1] * g != c {
            return Err(format!(
                "Conv channels do not match: X {xs:?}, W {ws:?}, group {g}"
            ));
        }
        let kernel = if a.kernel_shape.is_empty() {
            ws[2..].to_vec()
        } else {
            a.kernel_shape.clone()
        };
        let win = window(&xs[2..], &kernel, a, false).map_err(|e| e.0)?;
        let out = n.outputs[0];
        check_output(&win.output, [nb, m], &self.shape(out)?)?;
        let (cg, mg) = (c / g, m / g);
        let in_sp: usize = win.input.iter().product();
        let k_sp: usize = kernel.iter().product();
        let out_sp: usize = win.output.iter().product();
        let (in_st, k_st, o_st) = (strides(&win.input), strides(&kernel), strides(&win.output));

        let xb = self.buffer(x)?;
        let wb = self.buffer(w)?;
        let bb = bias.map(|b| self.buffer(b)).transpose()?;
        let yb = self.out_buffer(out)?;
        let mut k = Kernel::new(&n.name);
        let xp = k.param("x", Scalar::F32, self.p.buffers[xb].len, false);
        let wp = k.param("w", Scalar::F32, self.p.buffers[wb].len, false);
        let bp = bb.map(|b| k.param("bias", Scalar::F32, self.p.buffers[b].len, false));
        let yp = k.param("y", Scalar::F32, self.p.buffers[yb].len, true);
        let acc = k.new_var(Scalar::F32);
        let mut ext = vec![nb, g, mg];
        ext.extend(&win.output);
        let mut y_st = vec![m * out_sp, mg * out_sp, out_sp];
        y_st.extend(&o_st);
        k.body = loops(&mut k, &ext, |k, v| {
            let (b, grp, ocl, o) = (&v[0], &v[1], &v[2], &v[3..]);
            let oc = Expr::add(Expr::mul(grp.clone(), Expr::i64(mg as i64)), ocl.clone());
            // First input channel of the group, per batch.
            let x_base = Expr::add(
                Expr::mul(b.clone(), Expr::i64(c as i64)),
                Expr::mul(grp.clone(), Expr::i64(cg as i64)),
            );
            let mut s = channel_sum(k, acc, cg, k_sp, |k, ic, part| {
                loops(k, &kernel, |_, kv| {
                    let t = win.tap(o, kv);
                    let xi = dot(
                        &t.clamped,
                        &in_st,
                        Expr::mul(
                            Expr::add(x_base.clone(), ic.clone()),
                            Expr::i64(in_sp as i64),
                        ),
                    );
                    let wi = dot(
                        kv,
                        &k_st,
                        Expr::mul(
                            Expr::add(Expr::mul(oc.clone(), Expr::i64(cg as i64)), ic.clone()),
                            Expr::i64(k_sp as i64),
                        ),
                    );
                    let mut term = Expr::mul(Expr::load(xp, xi), Expr::load(wp, wi));
                    if let Some(inside) = t.inside {
                        term = Expr::select(inside, term, Expr::f32(0.0));
                    }
                    vec![accumulate(part, term)]
                })
            });
            let mut y = Expr::var(acc);
            if let Some(bp) = bp {
                y = Expr::add(y, Expr::load(bp, oc.clone()));
            }
            s.push(Stmt::Store {
                buf: yp,
                index: dot(v, &y_st, Expr::i64(0)),
                value: y,
            });
            s
        });
        let mut args = vec![xb, wb];
        args.extend(bb);
        args.push(yb);
        self.p.steps.push(Step { kernel: k, args });
        Ok(())
    }

    fn conv_transpose(
        &mut self,
        n: &Node,
        a: &ConvAttrs,
        output_padding: &[usize],
        output_shape: &[usize],
    ) -> R<()> {
        self.f32_only(n)?;
        let x = self.windowed_input(n, 0)?;
        let w = self.windowed_input(n, 1)?;
        let bias = n.inputs.get(2).copied().flatten();
        let (xs, ws) = (self.shape(x)?, self.shape(w)?);
        if xs.len() < 3 || ws.len() != xs.len() {
            return Err(format!(
                "ConvTranspose needs X [N,C,...] and W of the same rank, got {xs:?} and {ws:?}"
            ));
        }
        let (nb, c, g) = (xs[0], xs[1], a.group);
        if g == 0 || ws[0] != c || c % g != 0 {
            return Err(format!(
                "ConvTranspose channels do not match: X {xs:?}, W {ws:?}"
            ));
        }
        let (mg, cg) = (ws[1], c / g);
        let m = mg * g;
        let sp = &xs[2..];
        let r = sp.len();
        // Geometry, as the interpreter's `linalg::conv_transpose` resolves it.
        let kernel = if a.kernel_shape.is_empty() {
            ws[2..].to_vec()
        } else {
            a.kernel_shape.clone()
        };
        let win =
            transpose_window(sp, &kernel, a, output_padding, output_shape).map_err(|e| e.0)?;
        let (st, dil, out_sp) = (win.strides, win.dilations, win.output);
        let pads = win.pad_begin;
        let out = n.outputs[0];
        check_output(&out_sp, [nb, m], &self.shape(out)?)?;
        let in_n: usize = sp.iter().product();
        let k_n: usize = kernel.iter().product();
        let o_n: usize = out_sp.iter().product();
        let (in_st, k_st, o_st) = (strides(sp), strides(&kernel), strides(&out_sp));

        let xb = self.buffer(x)?;
        let wb = self.buffer(w)?;
        let bb = bias.map(|b| self.buffer(b)).transpose()?;
        let yb = self.out_buffer(out)?;
        let mut k = Kernel::new(&n.name);
        let xp = k.param("x", Scalar::F32, self.p.buffers[xb].len, false);
        let wp = k.param("w", Scalar::F32, self.p.buffers[wb].len, false);
        let bp = bb.map(|b| k.param("bias", Scalar::F32, self.p.buffers[b].len, false));
        let yp = k.param("y", Scalar::F32, self.p.buffers[yb].len, true);
        let acc = k.new_var(Scalar::F32);
        let mut ext = vec![nb, g, mg];
        ext.extend(&out_sp);
        let mut y_st = vec![m * o_n, mg * o_n, o_n];
        y_st.extend(&o_st);
        k.body = loops(&mut k, &ext, |k, v| {
            let (b, grp, ocl, o) = (&v[0], &v[1], &v[2], &v[3..]);
            let oc = Expr::add(Expr::mul(grp.clone(), Expr::i64(mg as i64)), ocl.clone());
            let mut s = channel_sum(k, acc, cg, k_n, |k, icl, part| {
                // Absolute input channel.
                let ic = Expr::add(Expr::mul(grp.clone(), Expr::i64(cg as i64)), icl);
                loops(k, &kernel, |_, kv| {
                    // Input position i contributes to output i*stride + k*dil - pad, so the
                    // output o reads i = (o + pad - k*dil) / stride when that divides evenly.
                    let mut inside = None;
                    let mut idx = Vec::with_capacity(r);
                    for d in 0..r {
                        let t = Expr::add(
                            Expr::add(o[d].clone(), Expr::i64(pads[d] as i64)),
                            Expr::mul(kv[d].clone(), Expr::i64(-(dil[d] as i64))),
                        );
                        let size = sp[d] as i64;
                        let s = st[d] as i64;
                        inside = and(inside, Expr::cmp(CmpOp::Ge, t.clone(), Expr::i64(0)));
                        let mut q = t.clone();
                        if s != 1 {
                            inside = and(
                                inside,
                                Expr::cmp(
                                    CmpOp::Eq,
                                    Expr::bin(BinOp::Rem, t.clone(), Expr::i64(s)),
                                    Expr::i64(0),
                                ),
                            );
                            q = Expr::div(t, Expr::i64(s));
                        }
                        inside = and(inside, Expr::cmp(CmpOp::Lt, q.clone(), Expr::i64(size)));
                        idx.push(Expr::min(Expr::max(q, Expr::i64(0)), Expr::i64(size - 1)));
                    }
                    let xi = dot(
                        &idx,
                        &in_st,
                        Expr::mul(
                            Expr::add(Expr::mul(b.clone(), Expr::i64(c as i64)), ic.clone()),
                            Expr::i64(in_n as i64),
                        ),
                    );
                    let wi = dot(
                        kv,
                        &k_st,
                        Expr::mul(
                            Expr::add(Expr::mul(ic.clone(), Expr::i64(mg as i64)), ocl.clone()),
                            Expr::i64(k_n as i64),
                        ),
                    );
                    let mut term = Expr::mul(Expr::load(xp, xi), Expr::load(wp, wi));
                    if let Some(inside) = inside {
                        term = Expr::select(inside, term, Expr::f32(0.0));
                    }
                    vec![accumulate(part, term)]
                })
            });
            let mut y = Expr::var(acc);
            if let Some(bp) = bp {
                y = Expr::add(y, Expr::load(bp, oc.clone()));
            }
            s.push(Stmt::Store {
                buf: yp,
                index: dot(v, &y_st, Expr::i64(0)),
                value: y,
            });
            s
        });
        let mut args = vec![xb, wb];
        args.extend(bb);
        args.push(yb);
        self.p.steps.push(Step { kernel: k, args });
        Ok(())
    }

    fn pool(&mut self, n: &Node, p: &PoolAttrs) -> R<()> {
        self.f32_only(n)?;
        let x = self.windowed_input(n, 0)?;
        let xs = self.shape(x)?;
        if xs.len() < 3 {
            return Err(format!("pooling needs X [N,C,...], got {xs:?}"));
        }
        let (nb, c) = (xs[0], xs[1]);
        let sp = &xs[2..];
        let r = sp.len();
        let win = window(sp, &p.window.kernel_shape, &p.window, p.ceil_mode).map_err(|e| e.0)?;
        let out = n.outputs[0];
        check_output(&win.output, [nb, c], &self.shape(out)?)?;
        if let PoolKind::Lp { p } = p.kind {
            if p < 1 {
                return Err(format!("LpPool with p = {p} is not lowered"));
            }
        }
        // Indices output, when anything reads it.
        let indices = n
            .outputs
            .get(1)
            .copied()
            .filter(|&o| !self.g.consumers(o).is_empty() || self.g.outputs.contains(&o));
        if indices.is_some() && p.kind != PoolKind::Max {
            return Err("only MaxPool has an Indices output".into());
        }
        let in_n: usize = sp.iter().product();
        let out_n: usize = win.output.iter().product();
        let in_st = strides(sp);
        // Column-major strides of the spatial dims, for storage_order = 1.
        let mut cm_st = vec![1usize; r];
        for d in 1..r {
            cm_st[d] = cm_st[d - 1] * sp[d - 1];
        }
        let idx_st = if p.storage_order == 1 { &cm_st } else { &in_st };
        // count_include_pad counts taps inside the padded extent (begin and end pads).
        let pads_end = win.pad_end.clone();
        let k_n: usize = win.kernel.iter().product();

        let xb = self.buffer(x)?;
        let yb = self.out_buffer(out)?;
        let ib = indices.map(|i| self.out_buffer(i)).transpose()?;
        let mut k = Kernel::new(&n.name);
        let xp = k.param("x", Scalar::F32, self.p.buffers[xb].len, false);
        let yp = k.param("y", Scalar::F32, self.p.buffers[yb].len, true);
        let ip = ib.map(|b| k.param("indices", Scalar::I64, self.p.buffers[b].len, true));
        let best = k.new_var(Scalar::F32);
        let best_i = k.new_var(Scalar::I64);
        let take = k.new_var(Scalar::Bool);
        let sum = k.new_var(Scalar::F32);
        let cnt = k.new_var(Scalar::F32);
        let val = k.new_var(Scalar::F32);
        let kind = p.kind;
        // Whether every tap of every output lies inside the padded extent [-pad, size + end).
        let all_in_padded = (0..r).all(|d| win.max_pos(d) < (sp[d] + pads_end[d]) as i64);
        let mut ext = vec![nb * c];
        ext.extend(&win.output);
        let mut y_st = vec![out_n];
        y_st.extend(strides(&win.output));
        k.body = loops(&mut k, &ext, |k, v| {
            let (plane, o) = (&v[0], &v[1..]);
            let base = Expr::mul(plane.clone(), Expr::i64(in_n as i64));
            let (count_pad, count_inside) = match kind {
                PoolKind::Average {
                    count_include_pad: true,
                } => (!all_in_padded, false),
                PoolKind::Average {
                    count_include_pad: false,
                } => (false, true),
                _ => (false, false),
            };
            let mut s = match kind {
                PoolKind::Max => vec![
                    assign(best, Expr::f32(f32::NEG_INFINITY)),
                    assign(best_i, Expr::i64(-1)),
                ],
                _ => vec![assign(sum, Expr::f32(0.0)), assign(cnt, Expr::f32(0.0))],
            };
            let mut inside_static = true;
            s.extend(loops(k, &win.kernel, |_, kv| {
                let t = win.tap(o, kv);
                inside_static = t.inside.is_none();
                let xv = Expr::load(xp, dot(&t.clamped, &in_st, base.clone()));
                let mut b = Vec::new();
                match kind {
                    PoolKind::Max => {
                        b.push(assign(val, xv));
                        let better = Expr::bin(
                            BinOp::Or,
                            Expr::cmp(CmpOp::Gt, Expr::var(val), Expr::var(best)),
                            Expr::cmp(CmpOp::Lt, Expr::var(best_i), Expr::i64(0)),
                        );
                        let cond = match t.inside {
                            Some(inside) => Expr::bin(BinOp::And, inside, better),
                            None => better,
                        };
                        b.push(assign(take, cond));
                        b.push(assign(
                            best,
                            Expr::select(Expr::var(take), Expr::var(val), Expr::var(best)),
                        ));
                        if ip.is_some() {
                            b.push(assign(
                                best_i,
                                Expr::select(
                                    Expr::var(take),
                                    dot(&t.clamped, idx_st, base.clone()),
                                    Expr::var(best_i),
                                ),
                            ));
                        } else {
                            b.push(assign(
                                best_i,
                                Expr::select(Expr::var(take), Expr::i64(0), Expr::var(best_i)),
                            ));
                        }
                    }
                    PoolKind::Average { .. } | PoolKind::Lp { .. } => {
                        let term = match kind {
                            PoolKind::Lp { p } => {
                                b.push(assign(val, Expr::un(UnOp::Abs, xv)));
                                int_pow(Expr::var(val), p)
                            }
                            _ => xv,
                        };
                        b.push(accumulate(
                            sum,
                            match &t.inside {
                                Some(inside) => Expr::select(inside.clone(), term, Expr::f32(0.0)),
                                None => term,
                            },
                        ));
                        if count_inside {
                            if let Some(inside) = t.inside {
                                b.push(accumulate(
                                    cnt,
                                    Expr::select(inside, Expr::f32(1.0), Expr::f32(0.0)),
                                ));
                            }
                        } else if count_pad {
                            let mut in_padded = None;
                            for d in 0..r {
                                let end = (sp[d] + pads_end[d]) as i64;
                                if win.max_pos(d) >= end {
                                    in_padded = and(
                                        in_padded,
                                        Expr::cmp(CmpOp::Lt, t.raw[d].clone(), Expr::i64(end)),
                                    );
                                }
                            }
                            if let Some(c) = in_padded {
                                b.push(accumulate(
                                    cnt,
                                    Expr::select(c, Expr::f32(1.0), Expr::f32(0.0)),
                                ));
                            }
                        }
                    }
                }
                b
            }));
            let y_idx = dot(v, &y_st, Expr::i64(0));
            let value = match kind {
                PoolKind::Max => Expr::var(best),
                PoolKind::Average { .. } => {
                    // A statically known count is a constant divisor.
                    if (count_inside && inside_static) || (!count_inside && !count_pad) {
                        Expr::div(Expr::var(sum), Expr::f32(k_n as f32))
                    } else {
                        Expr::select(
                            Expr::cmp(CmpOp::Eq, Expr::var(cnt), Expr::f32(0.0)),
                            Expr::f32(0.0),
                            Expr::div(Expr::var(sum), Expr::var(cnt)),
                        )
                    }
                }
                PoolKind::Lp { p } => root(Expr::var(sum), p),
            };
            s.push(Stmt::Store {
                buf: yp,
                index: y_idx.clone(),
                value,
            });
            if let Some(ip) = ip {
                s.push(Stmt::Store {
                    buf: ip,
                    index: y_idx,
                    value: Expr::var(best_i),
                });
            }
            s
        });
        let mut args = vec![xb, yb];
        args.extend(ib);
        self.p.steps.push(Step { kernel: k, args });
        Ok(())
    }

    fn global_pool(&mut self, n: &Node, kind: PoolKind) -> R<()> {
        self.f32_only(n)?;
        let x = self.windowed_input(n, 0)?;
        let xs = self.shape(x)?;
        if xs.len() < 3 {
            return Err(format!("global pooling needs X [N,C,...], got {xs:?}"));
        }
        if let PoolKind::Lp { p } = kind {
            if p < 1 {
                return Err(format!("GlobalLpPool with p = {p} is not lowered"));
            }
        }
        let planes = xs[0] * xs[1];
        let plane: usize = xs[2..].iter().product();
        let out = n.outputs[0];
        check_output(&vec![1; xs.len() - 2], [xs[0], xs[1]], &self.shape(out)?)?;
        let xb = self.buffer(x)?;
        let yb = self.out_buffer(out)?;
        let mut k = Kernel::new(&n.name);
        let xp = k.param("x", Scalar::F32, self.p.buffers[xb].len, false);
        let yp = k.param("y", Scalar::F32, self.p.buffers[yb].len, true);
        let acc = k.new_var(Scalar::F32);
        let val = k.new_var(Scalar::F32);
        k.body = loops(&mut k, &[planes], |k, v| {
            let pl = v[0].clone();
            let j = k.new_var(Scalar::I64);
            let at = Expr::load(
                xp,
                Expr::add(Expr::mul(pl.clone(), Expr::i64(plane as i64)), Expr::var(j)),
            );
            let (mut s, value) = match kind {
                PoolKind::Max => (
                    vec![
                        assign(acc, Expr::f32(f32::NEG_INFINITY)),
                        Stmt::Loop {
                            var: j,
                            extent: plane,
                            kind: LoopKind::Serial,
                            body: vec![
                                assign(val, at),
                                // Like f64::max, a NaN element is skipped.
                                assign(
                                    acc,
                                    Expr::select(
                                        Expr::cmp(CmpOp::Gt, Expr::var(val), Expr::var(acc)),
                                        Expr::var(val),
                                        Expr::var(acc),
                                    ),
                                ),
                            ],
                        },
                    ],
                    Expr::var(acc),
                ),
                PoolKind::Average { .. } => (
                    blocked_sum(k, acc, j, plane, at),
                    Expr::div(Expr::var(acc), Expr::f32(plane as f32)),
                ),
                PoolKind::Lp { p } => (
                    blocked_sum(k, acc, j, plane, int_pow(Expr::un(UnOp::Abs, at), p)),
                    root(Expr::var(acc), p),
                ),
            };
            s.push(Stmt::Store {
                buf: yp,
                index: pl,
                value,
            });
            s
        });
        self.p.steps.push(Step {
            kernel: k,
            args: vec![xb, yb],
        });
        Ok(())
    }
}
