//! Matrix products against constant weights (every weight MatMul and Gemm of a model). B is
//! repacked at compile time into panels of [`LowerOptions::gemm_panel`] columns: panel `q`
//! holds, for each reduction step `p`, its columns `p` contiguously, so the kernel reads B
//! strictly sequentially (no strided rows: one 64-byte line per two steps instead of one
//! line and often one page per step). The kernel walks panels (the parallel loop), then tiles
//! of [`LowerOptions::gemm_rows`] rows of A, and keeps a `rows x panel` register tile of
//! accumulators over the whole reduction: the panel loop is handed to the code generator
//! already vectorized with one vector per four columns (unroll-and-jam), so each step loads
//! the panel row once and one broadcast of A per row. Row offsets of A are computed once per
//! tile, outside the reduction. Columns left over after the whole panels form one narrower
//! panel with its own kernel; rows left over form one shorter tile.

use super::quant::{self, reads_as_b};
use super::{Lowerer, R, SUM_BLOCK};
use crate::loop_ir::*;
use crate::microkernel::{Q4Dot, SGEMM_AVX2_COLUMNS, SGEMM_AVX2_MAX_ROWS};
use kiln_compiler::ir::{Node, NodeId, Op, ValueId};

/// Register tile of the packed matrix kernels, chosen per target (see [`crate::compile`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LowerOptions {
    /// Rows of A per register tile.
    pub gemm_rows: usize,
    /// Columns per packed panel of B (a multiple of 4: one f32x4 vector per 4 columns).
    pub gemm_panel: usize,
    /// Whether products of f32 matrices use [`Microkernel::SgemmAvx2`] tiles (x86-64 with
    /// AVX2 and FMA): B is packed in panels of [`SGEMM_AVX2_COLUMNS`] columns instead.
    pub sgemm_avx2: bool,
    /// The instructions of the [`Microkernel::Q4Int8`] tiles that MatMulNBits with int8
    /// activations use (x86-64) where N is a multiple of 8 and the zero points are bytes.
    pub q4_int8_tile: Option<Q4Dot>,
}

impl Default for LowerOptions {
    fn default() -> Self {
        // 4 x 8 = eight f32x4 accumulators, two panel vectors and a broadcast: fits the 16
        // registers of SSE.
        LowerOptions {
            gemm_rows: 4,
            gemm_panel: 8,
            sgemm_avx2: false,
            q4_int8_tile: None,
        }
    }
}

impl LowerOptions {
    /// The register tile for a target's vector registers: 16 on x86-64 (SSE), 32 on aarch64
    /// (NEON), where 8 rows x 8 columns keep sixteen accumulators.
    pub fn for_target(target: &crate::Target) -> Self {
        match target.isa {
            crate::Isa::Aarch64 => LowerOptions {
                gemm_rows: 8,
                gemm_panel: 8,
                ..LowerOptions::default()
            },
            crate::Isa::X86_64
                if ["avx2", "fma", "f16c"]
                    .iter()
                    .all(|f| target.required_features.contains(f)) =>
            {
                LowerOptions {
                    sgemm_avx2: true,
                    q4_int8_tile: Some(if target.required_features.contains(&"avxvnni") {
                        Q4Dot::AvxVnni
                    } else {
                        Q4Dot::Avx2
                    }),
                    ..LowerOptions::default()
                }
            }
            crate::Isa::X86_64 => LowerOptions {
                q4_int8_tile: Some(Q4Dot::Sse),
                ..LowerOptions::default()
            },
            _ => LowerOptions::default(),
        }
    }
}

/// A matrix product `Y[m, n] = sum_p A[m, p] B[p, n]` (then the Gemm epilogue) with A read
/// through element strides and B constant.
pub(super) struct PackedProduct {
    pub m: usize,
    pub k: usize,
    pub n: usize,
    pub a_rs: usize,
    pub a_cs: usize,
    pub b_rs: usize,
    pub b_cs: usize,
    /// Gemm's (alpha, beta) and its C input with C's strides over `[m, n]`.
    pub alpha: f32,
    pub beta: f32,
    pub c: Option<(ValueId, [usize; 2])>,
}

/// Who reads a constant that a matrix product would pack.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Readers {
    /// Only matrix products (as B, directly or through a widening f16 Cast): the packed copy
    /// replaces the original.
    Products,
    /// MatMuls and Gathers of a 2-D table (a tied embedding and LM head): the Gathers read the
    /// packed copy too, so the table is stored once.
    ProductsAndGathers,
    /// Anything else: packing would store the data twice; products read it in place.
    Others,
}

/// Where a kernel's panels sit: `count` panels of `width` columns from column `col0`, starting
/// at element `offset` of the packed buffer.
struct Panels {
    count: usize,
    width: usize,
    col0: usize,
    offset: usize,
}

impl Lowerer<'_> {
    /// Lowers `n` with B (input 1, or the f16 data a widening Cast reads) packed in panels.
    /// `Ok(false)`: B is not a compile-time constant, nothing was emitted.
    pub(super) fn matmul_packed(&mut self, n: &Node, s: &PackedProduct) -> R<bool> {
        let b = n.inputs.get(1).copied().flatten().ok_or("missing B")?;
        let widened = self.f16_widened.get(&b).copied();
        let (src, specials) = match widened {
            Some((half, specials)) => (half, Some(specials)),
            None => (b, None),
        };
        if self.g.constant(src).is_none() {
            return Ok(false);
        }
        let plain = s.b_rs == s.n && s.b_cs == 1;
        match self.readers(src) {
            Readers::Products => {}
            Readers::ProductsAndGathers if plain => {}
            _ => return Ok(false),
        }
        let scalar = self.g.value(src).ty.dtype;
        let panel = self.panel(scalar.and_then(super::scalar_of));
        let packed = self.packed_weights(src, s.k, s.n, (s.b_rs, s.b_cs), panel)?;
        let a = n.inputs[0].ok_or("missing A")?;
        let full = s.n / panel;
        let tail = s.n - full * panel;
        if full > 0 {
            let at = Panels {
                count: full,
                width: panel,
                col0: 0,
                offset: 0,
            };
            if panel == SGEMM_AVX2_COLUMNS && specials.is_none() && s.a_cs == 1 {
                self.microkernel_product(n, s, a, packed, &at)?;
            } else {
                self.packed_kernel(n, &n.name, s, a, packed, specials, &at)?;
            }
        }
        if tail > 0 {
            let at = Panels {
                count: 1,
                width: tail,
                col0: full * panel,
                offset: full * panel * s.k,
            };
            self.packed_kernel(n, &format!("{}_tail", n.name), s, a, packed, specials, &at)?;
        }
        Ok(true)
    }

    /// Columns per packed panel of a B whose elements are `scalar`.
    fn panel(&self, scalar: Option<Scalar>) -> usize {
        if self.opts.sgemm_avx2 && scalar == Some(Scalar::F32) {
            SGEMM_AVX2_COLUMNS
        } else {
            self.opts.gemm_panel.max(4) / 4 * 4
        }
    }

    /// Who reads constant `src` (see [`Readers`]).
    pub(super) fn readers(&self, src: ValueId) -> Readers {
        if self.g.outputs.contains(&src) {
            return Readers::Others;
        }
        let gemm = |c: &NodeId| matches!(self.g.nodes[*c].op, Op::Gemm { .. });
        let (mut gathers, mut gemms, mut products) = (false, false, false);
        for c in self.g.consumers(src) {
            let node = &self.g.nodes[c];
            if matches!(node.op, Op::Gather { .. })
                && node.inputs.first() == Some(&Some(src))
                && !node.inputs[1..].contains(&Some(src))
            {
                gathers = true;
            } else if reads_as_b(node, src) {
                products = true;
                gemms |= gemm(&c);
            } else if let Some((_, readers)) = self.widened_by_products(node) {
                products = true;
                gemms |= readers.iter().any(gemm);
            } else {
                return Readers::Others;
            }
        }
        let rank2 = self.g.value(src).ty.static_shape().map(|s| s.len()) == Some(2);
        match (products, gathers) {
            (true, false) => Readers::Products,
            (true, true) if !gemms && rank2 => Readers::ProductsAndGathers,
            _ => Readers::Others,
        }
    }

    /// For a Gather on a 2-D table that matrix products read packed
    /// ([`Readers::ProductsAndGathers`]): the packed buffer and the table's layout, for
    /// [`packed_position`].
    pub(super) fn packed_table(&mut self, table: ValueId) -> R<Option<(usize, PackedLayout)>> {
        if self.readers(table) != Readers::ProductsAndGathers {
            return Ok(None);
        }
        let shape = self.shape(table)?;
        let scalar = self.g.value(table).ty.dtype.and_then(super::scalar_of);
        let layout = PackedLayout {
            k: shape[0],
            n: shape[1],
            panel: self.panel(scalar),
        };
        let buf = self.packed_weights(table, layout.k, layout.n, (layout.n, 1), layout.panel)?;
        Ok(Some((buf, layout)))
    }

    /// The packed copy of constant B (f32, or f16 bits when `src` is half data) whose element
    /// `(p, col)` sits at `p * strides.0 + col * strides.1`, shared by every reader of the same
    /// constant in the same layout.
    fn packed_weights(
        &mut self,
        src: ValueId,
        k: usize,
        n: usize,
        strides: (usize, usize),
        panel: usize,
    ) -> R<usize> {
        let key = (src, panel, strides.0, strides.1);
        if let Some(&buf) = self.packed.get(&key) {
            return Ok(buf);
        }
        let val = self.g.value(src);
        let c = self
            .g
            .constant(src)
            .ok_or("B must be a compile-time constant")?;
        let scalar = super::scalar_of(c.dtype).ok_or("B has an unsupported element type")?;
        let size = scalar.bytes();
        let last = (k - 1) * strides.0 + (n - 1) * strides.1;
        if c.bytes.len() < (last + 1) * size {
            return Err(format!(
                "constant '{}' holds {} bytes, fewer than its shape needs",
                val.name,
                c.bytes.len()
            ));
        }
        let full = n / panel;
        let mut out = Vec::with_capacity(k * n * size);
        let mut put = |p: usize, col: usize| {
            let at = (p * strides.0 + col * strides.1) * size;
            out.extend_from_slice(&c.bytes[at..at + size]);
        };
        for q in 0..full {
            for p in 0..k {
                for j in 0..panel {
                    put(p, q * panel + j);
                }
            }
        }
        for p in 0..k {
            for col in full * panel..n {
                put(p, col);
            }
        }
        let buf = self.weight_buffer(format!("{}.panels{panel}", val.name), scalar, k * n, out);
        self.packed.insert(key, buf);
        Ok(buf)
    }

    #[allow(clippy::too_many_arguments)]
    fn packed_kernel(
        &mut self,
        n: &Node,
        name: &str,
        s: &PackedProduct,
        a: ValueId,
        packed: usize,
        f16_specials: Option<bool>,
        at: &Panels,
    ) -> R<()> {
        let mut k = Kernel::new(name);
        k.contract = true;
        let (params, args) = self.product_params(&mut k, n, s, a, packed)?;
        let ProductParams {
            a: ap,
            b: bp,
            c,
            y: yp,
        } = params;
        let tiles = row_tiles(s.m, self.opts.gemm_rows);
        let i = |v: usize| Expr::i64(v as i64);
        k.body = nest(&mut k, &[at.count], |k, v| {
            let q = v[0];
            let mut body = Vec::new();
            for &(row0, count, tile_rows) in &tiles {
                body.extend(nest(k, &[count], |k, v| {
                    let it = v[0];
                    let row =
                        |r: usize| Expr::add(i(row0 + r), Expr::mul(Expr::var(it), i(tile_rows)));
                    let mut tile = Vec::new();
                    let (j, p) = (k.new_var(Scalar::I64), k.new_var(Scalar::I64));
                    let accs: Vec<VarId> = (0..tile_rows).map(|_| k.new_var(Scalar::F32)).collect();
                    let bval = k.new_var(Scalar::F32);
                    let col = Expr::add(
                        i(at.col0),
                        Expr::add(Expr::mul(Expr::var(q), i(at.width)), Expr::var(j)),
                    );
                    let y_idx = |r: usize| Expr::add(Expr::mul(row(r), i(s.n)), col.clone());
                    // `acc[r] = sum over p in from..from+len`, from an expression.
                    let chunk = |from: Expr, len: usize| -> Vec<Stmt> {
                        let at_p = Expr::add(from, Expr::var(p));
                        let b_idx = Expr::add(
                            i(at.offset),
                            Expr::add(
                                Expr::mul(Expr::var(q), i(at.width * s.k)),
                                Expr::add(Expr::mul(at_p.clone(), i(at.width)), Expr::var(j)),
                            ),
                        );
                        let b_load = Expr::load(bp, b_idx);
                        let mut step = vec![Stmt::Assign {
                            var: bval,
                            value: match f16_specials {
                                Some(specials) => quant::f16_to_f32(b_load, specials),
                                None => b_load,
                            },
                        }];
                        for (r, &acc) in accs.iter().enumerate() {
                            // Constant terms (the row within the tile) become load
                            // displacements: one address computation serves the tile.
                            let a_idx = Expr::add(
                                Expr::mul(row(r), i(s.a_rs)),
                                Expr::mul(at_p.clone(), i(s.a_cs)),
                            );
                            step.push(Stmt::Assign {
                                var: acc,
                                value: Expr::add(
                                    Expr::var(acc),
                                    Expr::mul(Expr::load(ap, a_idx), Expr::var(bval)),
                                ),
                            });
                        }
                        let mut c: Vec<Stmt> = accs
                            .iter()
                            .map(|&acc| Stmt::Assign {
                                var: acc,
                                value: Expr::f32(0.0),
                            })
                            .collect();
                        // Two steps per iteration: half the loop and address overhead, and
                        // the accumulators' register shuffle at the back edge happens once
                        // per two steps. Four steps spill on x86-64's 16 registers.
                        let kind = if len.is_multiple_of(2) {
                            LoopKind::Unrolled(2)
                        } else {
                            LoopKind::Serial
                        };
                        c.push(Stmt::Loop {
                            var: p,
                            extent: len,
                            kind,
                            body: step,
                        });
                        c
                    };
                    // Partial sums go to Y: y = acc, y += acc, ..., then the last chunk
                    // applies the Gemm epilogue.
                    let flush = |first: bool, last: bool| -> Vec<Stmt> {
                        accs.iter()
                            .enumerate()
                            .map(|(r, &acc)| {
                                let mut v = Expr::var(acc);
                                if !first {
                                    v = Expr::add(Expr::load(yp, y_idx(r)), v);
                                }
                                if last {
                                    if s.alpha != 1.0 {
                                        v = Expr::mul(Expr::f32(s.alpha), v);
                                    }
                                    if let Some((cp, cs)) = c {
                                        let c_idx = Expr::add(
                                            Expr::mul(row(r), i(cs[0])),
                                            Expr::mul(col.clone(), i(cs[1])),
                                        );
                                        let cv = Expr::load(cp, c_idx);
                                        let cv = if s.beta == 1.0 {
                                            cv
                                        } else {
                                            Expr::mul(Expr::f32(s.beta), cv)
                                        };
                                        v = Expr::add(v, cv);
                                    }
                                }
                                Stmt::Store {
                                    buf: yp,
                                    index: y_idx(r),
                                    value: v,
                                }
                            })
                            .collect()
                    };
                    let columns = over_sum_blocks(k, s.k, |from, len, first, last| {
                        let mut block = chunk(from, len);
                        block.extend(flush(first, last));
                        block
                    });
                    // Whole panels are vectorized here, one vector per four columns, so that
                    // the tile's accumulators span the panel; a narrower last panel is left
                    // to the schedule.
                    let kind = if at.width.is_multiple_of(4)
                        && (at.width == self.opts.gemm_panel
                            || (self.opts.sgemm_avx2 && at.width <= SGEMM_AVX2_COLUMNS))
                    {
                        LoopKind::Vectorized {
                            lanes: 4,
                            jam: at.width / 4,
                        }
                    } else {
                        LoopKind::Serial
                    };
                    tile.push(Stmt::Loop {
                        var: j,
                        extent: at.width,
                        kind,
                        body: columns,
                    });
                    tile
                }));
            }
            body
        });
        self.p.steps.push(super::Step { kernel: k, args });
        Ok(())
    }
}

/// The parameters of a packed product's kernel: A, packed B, the Gemm's C with its strides
/// over `[m, n]`, and Y.
struct ProductParams {
    a: usize,
    b: usize,
    c: Option<(usize, [usize; 2])>,
    y: usize,
}

impl Lowerer<'_> {
    /// Declares the parameters of a packed product's kernel `k`; also returns the step's
    /// buffer arguments in parameter order.
    fn product_params(
        &mut self,
        k: &mut Kernel,
        n: &Node,
        s: &PackedProduct,
        a: ValueId,
        packed: usize,
    ) -> R<(ProductParams, Vec<usize>)> {
        let ab = self.buffer(a)?;
        let ap = k.param("a", Scalar::F32, self.p.buffers[ab].len, false);
        let bp = k.param(
            "b",
            self.p.buffers[packed].scalar,
            self.p.buffers[packed].len,
            false,
        );
        let mut args = vec![ab, packed];
        let c = match s.c {
            Some((cv, strides)) => {
                let cb = self.buffer(cv)?;
                args.push(cb);
                Some((
                    k.param("c", Scalar::F32, self.p.buffers[cb].len, false),
                    strides,
                ))
            }
            None => None,
        };
        let dst = self.out_buffer(n.outputs[0])?;
        args.push(dst);
        let yp = k.param("y", Scalar::F32, self.p.buffers[dst].len, true);
        let params = ProductParams {
            a: ap,
            b: bp,
            c,
            y: yp,
        };
        Ok((params, args))
    }

    /// The whole panels of a product of f32 matrices as calls of [`Microkernel::SgemmAvx2`]:
    /// per panel (the parallel loop) and tile of up to six rows, one call per block of
    /// [`SUM_BLOCK`] reduction steps, the first storing its sums to Y and the others adding
    /// to them, as the Cranelift kernels flush theirs. A Gemm's alpha and C are applied to the
    /// tile afterwards. Needs A contiguous along the reduction.
    fn microkernel_product(
        &mut self,
        n: &Node,
        s: &PackedProduct,
        a: ValueId,
        packed: usize,
        at: &Panels,
    ) -> R<()> {
        let mut k = Kernel::new(&n.name);
        k.contract = true;
        let (params, args) = self.product_params(&mut k, n, s, a, packed)?;
        let ProductParams {
            a: ap,
            b: bp,
            c,
            y: yp,
        } = params;
        let tiles = row_tiles(s.m, SGEMM_AVX2_MAX_ROWS);
        let i = |v: usize| Expr::i64(v as i64);
        let width = at.width;
        k.body = nest(&mut k, &[at.count], |k, v| {
            let q = v[0];
            let col = Expr::add(i(at.col0), Expr::mul(Expr::var(q), i(width)));
            let mut body = Vec::new();
            for &(row0, count, tile_rows) in &tiles {
                body.extend(nest(k, &[count], |k, v| {
                    let row = Expr::add(i(row0), Expr::mul(Expr::var(v[0]), i(tile_rows)));
                    let call = |from: Expr, len: usize, accumulate: bool| Stmt::Call {
                        kernel: Microkernel::SgemmAvx2 {
                            rows: tile_rows as u8,
                            accumulate,
                        },
                        args: vec![
                            CallArg::Addr {
                                buf: ap,
                                index: Expr::add(Expr::mul(row.clone(), i(s.a_rs)), from.clone()),
                            },
                            CallArg::Int(i(s.a_rs * 4)),
                            CallArg::Addr {
                                buf: bp,
                                index: Expr::add(
                                    i(at.offset),
                                    Expr::add(
                                        Expr::mul(Expr::var(q), i(width * s.k)),
                                        Expr::mul(from, i(width)),
                                    ),
                                ),
                            },
                            CallArg::Addr {
                                buf: yp,
                                index: Expr::add(Expr::mul(row.clone(), i(s.n)), col.clone()),
                            },
                            CallArg::Int(i(s.n * 4)),
                            CallArg::Int(i(len)),
                        ],
                    };
                    let mut tile = over_sum_blocks(k, s.k, |from, len, first, _| {
                        vec![call(from, len, !first)]
                    });
                    if s.alpha != 1.0 || c.is_some() {
                        let (r, j) = (k.new_var(Scalar::I64), k.new_var(Scalar::I64));
                        let at_r = Expr::add(row.clone(), Expr::var(r));
                        let at_col = Expr::add(col.clone(), Expr::var(j));
                        let y_idx = Expr::add(Expr::mul(at_r.clone(), i(s.n)), at_col.clone());
                        let mut value = Expr::load(yp, y_idx.clone());
                        if s.alpha != 1.0 {
                            value = Expr::mul(Expr::f32(s.alpha), value);
                        }
                        if let Some((cp, cs)) = c {
                            let c_idx =
                                Expr::add(Expr::mul(at_r, i(cs[0])), Expr::mul(at_col, i(cs[1])));
                            let mut cv = Expr::load(cp, c_idx);
                            if s.beta != 1.0 {
                                cv = Expr::mul(Expr::f32(s.beta), cv);
                            }
                            value = Expr::add(value, cv);
                        }
                        tile.push(Stmt::Loop {
                            var: r,
                            extent: tile_rows,
                            kind: LoopKind::Serial,
                            body: vec![Stmt::Loop {
                                var: j,
                                extent: width,
                                kind: LoopKind::Serial,
                                body: vec![Stmt::Store {
                                    buf: yp,
                                    index: y_idx,
                                    value,
                                }],
                            }],
                        });
                    }
                    tile
                }));
            }
            body
        });
        self.p.steps.push(super::Step { kernel: k, args });
        Ok(())
    }
}

/// The row tiles of an `m`-row product with tiles of at most `rows` rows, as `(first row,
/// tile count, rows per tile)`: the whole tiles, then one tile of the rows left over, each
/// only when it is not empty.
fn row_tiles(m: usize, rows: usize) -> Vec<(usize, usize, usize)> {
    let rows = rows.clamp(1, m.max(1));
    let whole = m / rows;
    [(0, whole, rows), (whole * rows, 1, m - whole * rows)]
        .into_iter()
        .filter(|&(_, count, tile_rows)| count > 0 && tile_rows > 0)
        .collect()
}

/// The statements of a reduction over `len` steps in blocks of [`SUM_BLOCK`] (see
/// `blocked_sums`): `block(from, steps, first, last)` for the first block, then for the
/// middle ones inside a loop, then for the last (a shorter tail or the last whole block).
fn over_sum_blocks(
    k: &mut Kernel,
    len: usize,
    mut block: impl FnMut(Expr, usize, bool, bool) -> Vec<Stmt>,
) -> Vec<Stmt> {
    let i = |v: usize| Expr::i64(v as i64);
    let whole = len / SUM_BLOCK;
    let tail = len % SUM_BLOCK;
    let blocks = whole + usize::from(tail > 0);
    let first_len = if whole > 0 { SUM_BLOCK } else { tail };
    let mut stmts = block(i(0), first_len, true, blocks == 1);
    if blocks > 2 {
        let blk = k.new_var(Scalar::I64);
        let from = Expr::mul(Expr::add(Expr::var(blk), i(1)), i(SUM_BLOCK));
        stmts.push(Stmt::Loop {
            var: blk,
            extent: blocks - 2,
            kind: LoopKind::Serial,
            body: block(from, SUM_BLOCK, false, false),
        });
    }
    if blocks > 1 {
        let last_len = if tail > 0 { tail } else { SUM_BLOCK };
        stmts.extend(block(i(len - last_len), last_len, false, true));
    }
    stmts
}

/// A `[k, n]` matrix stored in panels of `panel` columns (the last one narrower).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct PackedLayout {
    pub k: usize,
    pub n: usize,
    pub panel: usize,
}

/// The packed position of the row-major element `flat` of a matrix stored as `l`.
pub(super) fn packed_position(flat: Expr, l: PackedLayout) -> Expr {
    let i = |v: usize| Expr::i64(v as i64);
    let (k, n, panel) = (l.k, l.n, l.panel);
    let p = Expr::div(flat.clone(), i(n));
    let col = Expr::bin(BinOp::Rem, flat, i(n));
    let full = n / panel * panel;
    let in_panels = Expr::add(
        Expr::mul(Expr::div(col.clone(), i(panel)), i(panel * k)),
        Expr::add(
            Expr::mul(p.clone(), i(panel)),
            Expr::bin(BinOp::Rem, col.clone(), i(panel)),
        ),
    );
    if full == n {
        return in_panels;
    }
    // Columns past the whole panels sit in the narrower last panel.
    let in_tail = Expr::add(
        i(full * k),
        Expr::add(Expr::mul(p, i(n - full)), Expr::sub(col.clone(), i(full))),
    );
    Expr::select(Expr::cmp(CmpOp::Lt, col, i(full)), in_panels, in_tail)
}
