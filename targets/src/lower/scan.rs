//! Lowering of ops that scan along one axis and keep positions: ArgMax/ArgMin, Hardmax and
//! CumSum; and of the index-driven copies: Trilu, GatherElements and Pad.

use super::{Lowerer, Step, R};
use crate::loop_ir::*;
use kiln_compiler::interp::util::{axis as norm_axis, split_at_axis};
use kiln_compiler::ir::{Node, PadMode};
use kiln_compiler::tensor::strides;

impl Lowerer<'_> {
    /// ArgMax/ArgMin (`max`), or Hardmax when `hardmax` (one-hot of the first maximum).
    pub(super) fn arg_reduce(
        &mut self,
        n: &Node,
        max: bool,
        axis: i64,
        select_last: bool,
        hardmax: Option<bool>,
    ) -> R<()> {
        let x = n.inputs[0].ok_or("missing input")?;
        let shape = self.shape(x)?;
        let a = norm_axis(axis, shape.len()).map_err(|e| e.0)?;
        let (outer, len, inner) = match hardmax {
            // Opset < 13 Hardmax coerces to 2-D at `axis`.
            Some(true) => (shape[..a].iter().product(), shape[a..].iter().product(), 1),
            _ => split_at_axis(&shape, a),
        };
        if len == 0 {
            return Err("reduction over an empty axis".into());
        }
        let scalar = self.scalar(x)?;
        let src = self.buffer(x)?;
        let dst = self.out_buffer(n.outputs[0])?;
        let out_scalar = self.p.buffers[dst].scalar;
        let mut k = Kernel::new(&n.name);
        let xp = k.param("x", scalar, self.p.buffers[src].len, false);
        let yp = k.param("y", out_scalar, self.p.buffers[dst].len, true);
        let best = k.new_var(scalar);
        let at = k.new_var(Scalar::I64);
        k.body = nest(&mut k, &[outer, inner], |k, v| {
            let (o, i) = (v[0], v[1]);
            let idx = |j: Expr| {
                Expr::add(
                    Expr::add(
                        Expr::mul(Expr::var(o), Expr::i64((len * inner) as i64)),
                        Expr::mul(j, Expr::i64(inner as i64)),
                    ),
                    Expr::var(i),
                )
            };
            let j = k.new_var(Scalar::I64);
            let e = Expr::load(xp, idx(Expr::var(j)));
            let better = match (max, select_last) {
                (true, false) => CmpOp::Gt,
                (true, true) => CmpOp::Ge,
                (false, false) => CmpOp::Lt,
                (false, true) => CmpOp::Le,
            };
            let take = Expr::cmp(better, e.clone(), Expr::var(best));
            let mut s = vec![
                Stmt::Assign {
                    var: best,
                    value: Expr::load(xp, idx(Expr::i64(0))),
                },
                Stmt::Assign {
                    var: at,
                    value: Expr::i64(0),
                },
                Stmt::Loop {
                    var: j,
                    extent: len,
                    kind: LoopKind::Serial,
                    body: vec![
                        Stmt::Assign {
                            var: at,
                            value: Expr::select(take.clone(), Expr::var(j), Expr::var(at)),
                        },
                        Stmt::Assign {
                            var: best,
                            value: Expr::select(take, e, Expr::var(best)),
                        },
                    ],
                },
            ];
            match hardmax {
                None => s.push(Stmt::Store {
                    buf: yp,
                    index: Expr::add(
                        Expr::mul(Expr::var(o), Expr::i64(inner as i64)),
                        Expr::var(i),
                    ),
                    value: Expr::var(at),
                }),
                Some(_) => {
                    let w = k.new_var(Scalar::I64);
                    let one_hot = Expr::select(
                        Expr::cmp(CmpOp::Eq, Expr::var(w), Expr::var(at)),
                        Expr::f32(1.0),
                        Expr::f32(0.0),
                    );
                    s.push(Stmt::Loop {
                        var: w,
                        extent: len,
                        kind: LoopKind::Serial,
                        body: vec![Stmt::Store {
                            buf: yp,
                            index: idx(Expr::var(w)),
                            value: one_hot,
                        }],
                    });
                }
            }
            s
        });
        self.p.steps.push(Step {
            kernel: k,
            args: vec![src, dst],
        });
        Ok(())
    }

    pub(super) fn cumsum(&mut self, n: &Node, exclusive: bool, reverse: bool) -> R<()> {
        let x = n.inputs[0].ok_or("missing input")?;
        let shape = self.shape(x)?;
        let axis = *self
            .ints_input(n, 1)?
            .ok_or("missing axis")?
            .first()
            .ok_or("empty axis")?;
        let a = norm_axis(axis, shape.len()).map_err(|e| e.0)?;
        let (outer, len, inner) = split_at_axis(&shape, a);
        let scalar = self.scalar(x)?;
        let src = self.buffer(x)?;
        let dst = self.out_buffer(n.outputs[0])?;
        let mut k = Kernel::new(&n.name);
        let xp = k.param("x", scalar, self.p.buffers[src].len, false);
        let yp = k.param("y", scalar, self.p.buffers[dst].len, true);
        let acc = k.new_var(scalar);
        k.body = nest(&mut k, &[outer, inner], |k, v| {
            let (o, i) = (v[0], v[1]);
            let step = k.new_var(Scalar::I64);
            let j = if reverse {
                Expr::sub(Expr::i64(len as i64 - 1), Expr::var(step))
            } else {
                Expr::var(step)
            };
            let idx = Expr::add(
                Expr::add(
                    Expr::mul(Expr::var(o), Expr::i64((len * inner) as i64)),
                    Expr::mul(j, Expr::i64(inner as i64)),
                ),
                Expr::var(i),
            );
            let add = Stmt::Assign {
                var: acc,
                value: Expr::bin(BinOp::Add, Expr::var(acc), Expr::load(xp, idx.clone())),
            };
            let store = Stmt::Store {
                buf: yp,
                index: idx,
                value: Expr::var(acc),
            };
            let body = if exclusive {
                vec![store, add]
            } else {
                vec![add, store]
            };
            vec![
                Stmt::Assign {
                    var: acc,
                    value: Expr::f32(0.0),
                },
                Stmt::Loop {
                    var: step,
                    extent: len,
                    kind: LoopKind::Serial,
                    body,
                },
            ]
        });
        self.p.steps.push(Step {
            kernel: k,
            args: vec![src, dst],
        });
        Ok(())
    }

    pub(super) fn trilu(&mut self, n: &Node, upper: bool) -> R<()> {
        let x = n.inputs[0].ok_or("missing input")?;
        let shape = self.shape(x)?;
        if shape.len() < 2 {
            return Err("Trilu needs rank >= 2".into());
        }
        let kdiag = self
            .ints_input(n, 1)?
            .and_then(|v| v.first().copied())
            .unwrap_or(0);
        let scalar = self.scalar(x)?;
        let src = self.buffer(x)?;
        let dst = self.out_buffer(n.outputs[0])?;
        let mut k = Kernel::new(&n.name);
        let xp = k.param("x", scalar, self.p.buffers[src].len, false);
        let yp = k.param("y", scalar, self.p.buffers[dst].len, true);
        let st = strides(&shape);
        let r = shape.len();
        k.body = nest(&mut k, &shape, |_, v| {
            let flat = index(v, &st, 0);
            // keep when j - i >= k (upper) or j - i <= k (lower)
            let diff = Expr::sub(Expr::var(v[r - 1]), Expr::var(v[r - 2]));
            let keep = Expr::cmp(
                if upper { CmpOp::Ge } else { CmpOp::Le },
                diff,
                Expr::i64(kdiag),
            );
            vec![Stmt::Store {
                buf: yp,
                index: flat.clone(),
                value: Expr::select(keep, Expr::load(xp, flat), Expr::f32(0.0)),
            }]
        });
        self.p.steps.push(Step {
            kernel: k,
            args: vec![src, dst],
        });
        Ok(())
    }

    pub(super) fn gather_elements(&mut self, n: &Node, axis: i64) -> R<()> {
        let x = n.inputs[0].ok_or("missing data")?;
        let iv = n
            .inputs
            .get(1)
            .copied()
            .flatten()
            .ok_or("missing indices")?;
        let shape = self.shape(x)?;
        let ish = self.shape(iv)?;
        let a = norm_axis(axis, shape.len()).map_err(|e| e.0)?;
        let scalar = self.scalar(x)?;
        let (src, ib) = (self.buffer(x)?, self.buffer(iv)?);
        let iscalar = self.p.buffers[ib].scalar;
        let dst = self.out_buffer(n.outputs[0])?;
        let mut k = Kernel::new(&n.name);
        let xp = k.param("data", scalar, self.p.buffers[src].len, false);
        let ip = k.param("indices", iscalar, self.p.buffers[ib].len, false);
        let yp = k.param("y", scalar, self.p.buffers[dst].len, true);
        let idx = k.new_var(Scalar::I64);
        let (xst, ist) = (strides(&shape), strides(&ish));
        let dim = shape[a] as i64;
        k.body = nest(&mut k, &ish, |_, v| {
            let flat = index(v, &ist, 0);
            let norm = Expr::select(
                Expr::cmp(CmpOp::Lt, Expr::var(idx), Expr::i64(0)),
                Expr::add(Expr::var(idx), Expr::i64(dim)),
                Expr::var(idx),
            );
            let clamped = Expr::max(Expr::min(norm, Expr::i64(dim - 1)), Expr::i64(0));
            let mut src_idx = Expr::mul(Expr::var(idx), Expr::i64(xst[a] as i64));
            for (d, &var) in v.iter().enumerate() {
                if d != a {
                    src_idx =
                        Expr::add(src_idx, Expr::mul(Expr::var(var), Expr::i64(xst[d] as i64)));
                }
            }
            vec![
                Stmt::Assign {
                    var: idx,
                    value: Expr::cast(Scalar::I64, Expr::load(ip, flat.clone())),
                },
                Stmt::Assign {
                    var: idx,
                    value: clamped,
                },
                Stmt::Store {
                    buf: yp,
                    index: flat,
                    value: Expr::load(xp, src_idx),
                },
            ]
        });
        self.p.steps.push(Step {
            kernel: k,
            args: vec![src, ib, dst],
        });
        Ok(())
    }

    pub(super) fn pad(
        &mut self,
        n: &Node,
        mode: PadMode,
        attr_pads: Option<&[i64]>,
        attr_value: f32,
    ) -> R<()> {
        let x = n.inputs[0].ok_or("missing input")?;
        let shape = self.shape(x)?;
        let r = shape.len();
        let raw = match attr_pads {
            Some(p) => p.to_vec(),
            None => self.ints_input(n, 1)?.ok_or("missing pads")?,
        };
        let axes: Vec<usize> = match self.ints_input(n, 3)? {
            Some(a) => a
                .iter()
                .map(|&v| norm_axis(v, r).map_err(|e| e.0))
                .collect::<R<_>>()?,
            None => (0..r).collect(),
        };
        if raw.len() != 2 * axes.len() {
            return Err(format!("pads {raw:?} do not match {} axes", axes.len()));
        }
        let mut pb = vec![0i64; r];
        for (i, &a) in axes.iter().enumerate() {
            pb[a] = raw[i];
        }
        let out_shape = self.shape(n.outputs[0])?;
        let scalar = self.scalar(x)?;
        let value = match (attr_pads, n.inputs.get(2).copied().flatten()) {
            (None, Some(v)) => {
                let t = self
                    .g
                    .constant(v)
                    .ok_or("constant_value must be a compile-time constant")?
                    .to_tensor();
                super::const_expr(&t)?
            }
            _ => Expr::f32(attr_value),
        };
        let src = self.buffer(x)?;
        let dst = self.out_buffer(n.outputs[0])?;
        let mut k = Kernel::new(&n.name);
        let xp = k.param("x", scalar, self.p.buffers[src].len, false);
        let yp = k.param("y", scalar, self.p.buffers[dst].len, true);
        let (ist, ost) = (strides(&shape), strides(&out_shape));
        k.body = nest(&mut k, &out_shape, |_, v| {
            let mut inside = Expr::Const(Const::Bool(true));
            let mut src_idx = Expr::i64(0);
            for d in 0..r {
                let dim = shape[d] as i64;
                let p = Expr::sub(Expr::var(v[d]), Expr::i64(pb[d]));
                let in_range = Expr::bin(
                    BinOp::And,
                    Expr::cmp(CmpOp::Ge, p.clone(), Expr::i64(0)),
                    Expr::cmp(CmpOp::Lt, p.clone(), Expr::i64(dim)),
                );
                let pos = match mode {
                    PadMode::Constant => {
                        inside = Expr::bin(BinOp::And, inside, in_range);
                        Expr::max(Expr::min(p, Expr::i64(dim - 1)), Expr::i64(0))
                    }
                    PadMode::Edge => Expr::max(Expr::min(p, Expr::i64(dim - 1)), Expr::i64(0)),
                    PadMode::Wrap => {
                        // ((p % dim) + dim) % dim
                        let m = Expr::bin(BinOp::Rem, p, Expr::i64(dim));
                        Expr::bin(BinOp::Rem, Expr::add(m, Expr::i64(dim)), Expr::i64(dim))
                    }
                    PadMode::Reflect => {
                        if dim == 1 {
                            Expr::i64(0)
                        } else {
                            let period = 2 * (dim - 1);
                            let m = Expr::bin(
                                BinOp::Rem,
                                Expr::add(
                                    Expr::bin(BinOp::Rem, p, Expr::i64(period)),
                                    Expr::i64(period),
                                ),
                                Expr::i64(period),
                            );
                            Expr::select(
                                Expr::cmp(CmpOp::Ge, m.clone(), Expr::i64(dim)),
                                Expr::sub(Expr::i64(period), m.clone()),
                                m,
                            )
                        }
                    }
                };
                src_idx = Expr::add(src_idx, Expr::mul(pos, Expr::i64(ist[d] as i64)));
            }
            let loaded = Expr::load(xp, src_idx);
            let val = if mode == PadMode::Constant {
                Expr::select(inside, loaded, value.clone())
            } else {
                loaded
            };
            vec![Stmt::Store {
                buf: yp,
                index: index(v, &ost, 0),
                value: val,
            }]
        });
        self.p.steps.push(Step {
            kernel: k,
            args: vec![src, dst],
        });
        Ok(())
    }
}
