//! Lowering of MatMulNBits with int8 activations (accuracy level 4; the arithmetic is fixed by
//! `kiln_compiler::ir::int8_activations`). Two kernels: the first quantizes each row of A per
//! block (codes, scale and code sum per block, in workspace buffers); the second streams the
//! 4-bit weights and accumulates integer dot products of weight and activation bytes
//! ([`BinOp::DotBytes`]: `vpdpbusd` with AVX-VNNI, `pmaddubsw` + `pmaddwd` on other x86-64,
//! `sdot` with dotprod), turning each block's i32 sum into f32 with the zero-point correction
//! and the two scales, added to the output.
//!
//! Weights are repacked at compile time for streaming: columns go in groups of four (the
//! vector lanes), and spans of one to four groups are walked together, each span's weights,
//! scales and zero points contiguous, so a thread reads its columns' bytes front to back.
//! Within a span, word `o` of every column sits side by side; one 32-bit word holds eight
//! consecutive rows of K of one column: byte `b` carries row `8o + b` in its low nibble and
//! row `8o + 4 + b` in its high one. Masking the low nibbles of four words (one vector) gives
//! rows `8o..8o+4` of four columns as bytes, which are dotted against the word of four
//! activation codes for those rows (written once per lane by the first kernel, so it is a
//! plain vector load), and shifting by 4 gives the next four rows. For a single row of A (the
//! matrix-vector product of LLM decoding, bound by memory) a span has four groups, so each
//! activation vector serves sixteen columns; longer A keeps one group and a tile of rows
//! sharing each weight vector.

use super::quant::{block_scale, block_zero_point, blocks_then_tail};
use super::{BufKind, Buffer, Lowerer, Step, R};
use crate::loop_ir::*;
use kiln_compiler::ir::{Node, ValueId};

/// Rows of K per 32-bit weight word (two nibbles in each of its four bytes).
const ROWS_PER_WORD: usize = 8;

/// Copies of each word of four activation codes, side by side (one per vector lane), so the
/// product kernel loads the word as it is dotted against four columns instead of broadcasting
/// it (three instructions on x86-64).
pub(super) const ACT_COPIES: usize = 4;

impl Lowerer<'_> {
    /// MatMulNBits with 4-bit weights and int8 activations (K and the block size multiples of
    /// 8: the caller checked `int8_activations`). A last block shorter than `block` is
    /// handled after the loop over whole blocks.
    pub(super) fn matmul_nbits_int8(
        &mut self,
        n: &Node,
        kk: usize,
        nn: usize,
        block: usize,
    ) -> R<()> {
        let (a, m) = self.nbits_input(n, kk)?;
        let nblk = kk.div_ceil(block);
        let (full_blocks, tail) = (kk / block, kk % block);
        let ops = self.nbits_operands(n, nn, nblk, 4, block)?;
        if let Some(tile) = self.q4_int8_tile(kk, nn, block, &ops) {
            return self.matmul_nbits_int8_tile(n, a, m, nn, &ops, tile);
        }
        // Columns per group: the vector lanes, or 1 (scalar code) when N is not a multiple.
        // `groups` column groups share each iteration (and each activation broadcast): four
        // for a single row of A (the matrix-vector product, bound by streaming the weights),
        // one for longer A, whose row tile reuses each weight vector instead.
        let width = if nn.is_multiple_of(4) { 4 } else { 1 };
        let groups = if width == 1 || m > 1 {
            1
        } else {
            [4, 2]
                .into_iter()
                .find(|g| nn.is_multiple_of(width * g))
                .unwrap_or(1)
        };
        let span = width * groups;
        let words_per_col = kk / ROWS_PER_WORD;
        let code = |col: usize, row: usize| -> u8 {
            let byte = ops.b_bytes[(col * nblk + row / block) * ops.blob + (row % block) / 2];
            (byte >> (4 * (row % 2))) & 15
        };
        // Weight word `o` of column `col`: spans of `groups` x `width` columns, each span's
        // words front to back, word `o` of its columns side by side.
        let word_index =
            |col: usize, o: usize| ((col / span) * words_per_col + o) * span + col % span;
        let mut words = vec![0u8; nn * words_per_col * 4];
        for col in 0..nn {
            for o in 0..words_per_col {
                let at = word_index(col, o) * 4;
                for b in 0..4 {
                    let row = o * ROWS_PER_WORD + b;
                    words[at + b] = code(col, row) | (code(col, row + 4) << 4);
                }
            }
        }
        // Per-block tables in the same order: [N / span, blocks, span].
        let grouped = |col: usize, g: usize| ((col / span) * nblk + g) * span + col % span;
        let byte_zero_points = super::quant::byte_zero_points(&ops.zero_points);
        let (scale_width, zp_width) = (
            if ops.half_scales { 2 } else { 4 },
            if byte_zero_points { 1 } else { 4 },
        );
        let mut scale_bytes = vec![0u8; nn * nblk * scale_width];
        let mut zp_bytes = vec![0u8; nn * nblk * zp_width];
        for col in 0..nn {
            for g in 0..nblk {
                let (from, to) = (col * nblk + g, grouped(col, g));
                let scale = &mut scale_bytes[to * scale_width..][..scale_width];
                if ops.half_scales {
                    scale.copy_from_slice(&ops.scale_bits[from * 2..][..2]);
                } else {
                    scale.copy_from_slice(&(ops.scales[from] as f32).to_le_bytes());
                }
                let z = ops.zero_points[from];
                if byte_zero_points {
                    zp_bytes[to] = z as u8;
                } else {
                    zp_bytes[to * 4..][..4].copy_from_slice(&(z as f32).to_le_bytes());
                }
            }
        }
        let scale_scalar = if ops.half_scales {
            Scalar::F16
        } else {
            Scalar::F32
        };
        let scale_specials = ops.half_scales && super::quant::has_f16_specials(&ops.scale_bits);
        let wb = self.weight_buffer(
            format!("{}.codes", n.name),
            Scalar::I32,
            nn * words_per_col,
            words,
        );
        let sb = self.weight_buffer(
            format!("{}.scales", n.name),
            scale_scalar,
            nn * nblk,
            scale_bytes,
        );
        let zp_scalar = if byte_zero_points {
            Scalar::U8
        } else {
            Scalar::F32
        };
        let zb = self.weight_buffer(
            format!("{}.zero_points", n.name),
            zp_scalar,
            nn * nblk,
            zp_bytes,
        );
        let ([qa, qa_scales, qa_sums], bias, dst) =
            self.int8_product_buffers(n, a, m, kk, nn, block)?;

        let mut k = Kernel::new(&n.name);
        let mut args = vec![qa, wb, sb, zb, qa_scales, qa_sums];
        let qp = k.param("a_codes", Scalar::I32, m * kk * ACT_COPIES / 4, false);
        let wp = k.param("codes", Scalar::I32, nn * words_per_col, false);
        let sp = k.param("scales", scale_scalar, nn * nblk, false);
        let zp = k.param("zero_points", zp_scalar, nn * nblk, false);
        let asp = k.param("a_scales", Scalar::F32, m * nblk, false);
        let ssp = k.param("a_sums", Scalar::F32, m * nblk, false);
        let bp = bias.map(|bb| {
            args.push(bb);
            k.param("bias", Scalar::F32, nn, false)
        });
        args.push(dst);
        let yp = k.param("y", Scalar::F32, m * nn, true);
        // Rows of A sharing each weight vector. Per row and group the block's i32 sum stays in
        // a register (the f32 totals live in the output), next to the nibble halves and the
        // activation vectors: four sums fit 16 SSE registers.
        let rows = super::row_tile(m, 4 / groups);
        let sums: Vec<Vec<VarId>> = (0..rows)
            .map(|_| (0..groups).map(|_| k.new_var(Scalar::I32)).collect())
            .collect();
        let halves: Vec<[VarId; 2]> = (0..groups)
            .map(|_| [k.new_var(Scalar::I32), k.new_var(Scalar::I32)])
            .collect();
        let i64c = |v: usize| Expr::i64(v as i64);
        let i32c = |v: i32| Expr::Const(Const::I32(v));
        let block_words = block / ROWS_PER_WORD;
        k.body = nest(&mut k, &[nn / span, m / rows, width], |k, v| {
            let (span_var, row_block, lane) = (v[0], v[1], v[2]);
            // Index of column `gi * width + lane` of the span within a [N / span, len, span]
            // table, at position `at` of its len.
            let in_span = |len: usize, at: Expr, gi: usize| {
                Expr::add(
                    Expr::mul(
                        Expr::add(Expr::mul(Expr::var(span_var), i64c(len)), at),
                        i64c(span),
                    ),
                    Expr::add(i64c(gi * width), Expr::var(lane)),
                )
            };
            let col = |gi: usize| {
                Expr::add(
                    Expr::mul(Expr::var(span_var), i64c(span)),
                    Expr::add(i64c(gi * width), Expr::var(lane)),
                )
            };
            let row = |r: usize| Expr::add(Expr::mul(Expr::var(row_block), i64c(rows)), i64c(r));
            let out_at = |r: usize, gi: usize| Expr::add(Expr::mul(row(r), i64c(nn)), col(gi));
            // The statements of block `g` (`words` weight words per column).
            let block_stmts = |k: &mut Kernel, g: Expr, words: usize| -> Vec<Stmt> {
                let o = k.new_var(Scalar::I64);
                let word_at = |gi: usize| {
                    let o_at = Expr::add(Expr::mul(g.clone(), i64c(block_words)), Expr::var(o));
                    in_span(words_per_col, o_at, gi)
                };
                // Word of four activation bytes (rows 8o + 4 * half .. + 4 of block g), which
                // the activation kernel wrote once per lane: a plain vector load, no broadcast.
                let act_word = |r: usize, half: usize| {
                    let word = Expr::add(
                        Expr::add(
                            Expr::mul(row(r), i64c(kk / 4)),
                            Expr::mul(g.clone(), i64c(block / 4)),
                        ),
                        Expr::add(Expr::mul(Expr::var(o), i64c(2)), i64c(half)),
                    );
                    let at = Expr::add(Expr::mul(word, i64c(ACT_COPIES)), Expr::var(lane));
                    Expr::load(qp, at)
                };
                let mut inner = Vec::new();
                for (gi, &[lo, hi]) in halves.iter().enumerate() {
                    let word = Expr::load(wp, word_at(gi));
                    inner.push(Stmt::Assign {
                        var: lo,
                        value: Expr::bin(BinOp::And, word.clone(), i32c(0x0f0f_0f0f)),
                    });
                    inner.push(Stmt::Assign {
                        var: hi,
                        value: Expr::bin(
                            BinOp::And,
                            Expr::bin(BinOp::Shr, word, i32c(4)),
                            i32c(0x0f0f_0f0f),
                        ),
                    });
                }
                for (r, row_sums) in sums.iter().enumerate() {
                    for (&sum, &[lo, hi]) in row_sums.iter().zip(&halves) {
                        let low = Expr::bin(
                            BinOp::Add,
                            Expr::var(sum),
                            Expr::bin(BinOp::DotBytes, Expr::var(lo), act_word(r, 0)),
                        );
                        inner.push(Stmt::Assign {
                            var: sum,
                            value: Expr::bin(
                                BinOp::Add,
                                low,
                                Expr::bin(BinOp::DotBytes, Expr::var(hi), act_word(r, 1)),
                            ),
                        });
                    }
                }
                let a_table = |buf: usize, r: usize| {
                    Expr::load(buf, Expr::add(Expr::mul(row(r), i64c(nblk)), g.clone()))
                };
                let mut stmts: Vec<Stmt> = sums
                    .iter()
                    .flatten()
                    .map(|&sum| Stmt::Assign {
                        var: sum,
                        value: i32c(0),
                    })
                    .collect();
                // Unrolled by 2 words: 4 accumulators, 4 activation vectors and the nibbles of
                // 4 words fit 16 SSE registers; by 4, the activation vectors spill.
                let unroll = Some(2).filter(|u| words.is_multiple_of(*u) && words > *u);
                stmts.push(Stmt::Loop {
                    var: o,
                    extent: words,
                    kind: unroll.map_or(LoopKind::Serial, LoopKind::Unrolled),
                    body: inner,
                });
                for (r, row_sums) in sums.iter().enumerate() {
                    for (gi, &sum) in row_sums.iter().enumerate() {
                        let table_at = in_span(nblk, g.clone(), gi);
                        let scale = block_scale(sp, scale_scalar, scale_specials, table_at.clone());
                        let zero_point = block_zero_point(zp, zp_scalar, table_at);
                        // (dot - zp * sum(qa)) * (sw * sa), in the order the interpreter uses.
                        let corrected = Expr::sub(
                            Expr::cast(Scalar::F32, Expr::var(sum)),
                            Expr::mul(zero_point, a_table(ssp, r)),
                        );
                        let scaled = Expr::mul(corrected, Expr::mul(scale, a_table(asp, r)));
                        stmts.push(Stmt::Store {
                            buf: yp,
                            index: out_at(r, gi),
                            value: Expr::add(Expr::load(yp, out_at(r, gi)), scaled),
                        });
                    }
                }
                stmts
            };
            // The running totals live in the output (registers are taken by the sums, the
            // nibbles and the activation words): zero, block by block, then the bias.
            let mut body: Vec<Stmt> = (0..rows)
                .flat_map(|r| (0..groups).map(move |gi| (r, gi)))
                .map(|(r, gi)| Stmt::Store {
                    buf: yp,
                    index: out_at(r, gi),
                    value: Expr::f32(0.0),
                })
                .collect();
            body.extend(blocks_then_tail(
                k,
                full_blocks,
                block_words,
                tail / ROWS_PER_WORD,
                block_stmts,
            ));
            if let Some(bp) = bp {
                for r in 0..rows {
                    for gi in 0..groups {
                        body.push(Stmt::Store {
                            buf: yp,
                            index: out_at(r, gi),
                            value: Expr::add(
                                Expr::load(yp, out_at(r, gi)),
                                Expr::load(bp, col(gi)),
                            ),
                        });
                    }
                }
            }
            body
        });
        self.p.steps.push(Step { kernel: k, args });
        Ok(())
    }

    /// The buffers an int8 product of node `n` uses besides its weights: A (value `a`, `m`
    /// rows of `kk`) quantized per block of `block` (codes, scales, sums), the bias if any,
    /// and the output, checked to be `m` x `nn`.
    pub(super) fn int8_product_buffers(
        &mut self,
        n: &Node,
        a: ValueId,
        m: usize,
        kk: usize,
        nn: usize,
        block: usize,
    ) -> R<([usize; 3], Option<usize>, usize)> {
        let ab = self.buffer(a)?;
        let quantized = self.quantized_input(&n.name, ab, m, kk, block);
        let bias = self.nbits_bias(n, nn)?;
        let dst = self.out_buffer(n.outputs[0])?;
        if self.p.buffers[dst].len != m * nn {
            return Err("output size is not M x N".into());
        }
        Ok((quantized, bias, dst))
    }

    /// The buffers of A (buffer `a`, `m` rows of `kk`) quantized per block to int8 codes,
    /// block scales and block code sums: made by a new quantizing kernel the first time,
    /// shared by every later product of the same input and block size.
    fn quantized_input(
        &mut self,
        name: &str,
        a: usize,
        m: usize,
        kk: usize,
        block: usize,
    ) -> [usize; 3] {
        if let Some(&bufs) = self.quantized_inputs.get(&(a, m, kk, block)) {
            return bufs;
        }
        let nblk = kk.div_ceil(block);
        let mut temp = |what: &str, scalar: Scalar, len: usize| {
            self.p.buffers.push(Buffer {
                name: format!("{name}.{what}"),
                scalar,
                len,
                kind: BufKind::Temp,
            });
            self.p.buffers.len() - 1
        };
        let bufs = [
            temp("a_codes", Scalar::I8, m * kk * ACT_COPIES),
            temp("a_scales", Scalar::F32, m * nblk),
            temp("a_sums", Scalar::F32, m * nblk),
        ];
        self.quantize_activations(name, a, bufs, m, kk, block);
        self.quantized_inputs.insert((a, m, kk, block), bufs);
        bufs
    }

    /// The kernel that quantizes A (`m` rows of `kk`) per block to int8 codes, block scales
    /// and block code sums (`outs`), as `kiln_compiler::ir::int8_activations` defines them.
    fn quantize_activations(
        &mut self,
        name: &str,
        a: usize,
        outs: [usize; 3],
        m: usize,
        kk: usize,
        block: usize,
    ) {
        let nblk = kk.div_ceil(block);
        let (full_blocks, tail) = (kk / block, kk % block);
        let mut k = Kernel::new(format!("{name}.quantize_a"));
        let ap = k.param("a", Scalar::F32, m * kk, false);
        let qp = k.param("a_codes", Scalar::I8, m * kk * ACT_COPIES, true);
        let sp = k.param("a_scales", Scalar::F32, m * nblk, true);
        let cp = k.param("a_sums", Scalar::F32, m * nblk, true);
        let (amax, inv, q, sum) = (
            k.new_var(Scalar::F32),
            k.new_var(Scalar::F32),
            k.new_var(Scalar::F32),
            k.new_var(Scalar::F32),
        );
        let i64c = |v: usize| Expr::i64(v as i64);
        k.body = nest(&mut k, &[m], |k, v| {
            let r = v[0];
            // Block `g` of row `r`, `len` values long.
            let block_stmts = |k: &mut Kernel, g: Expr, len: usize| -> Vec<Stmt> {
                let (i, j) = (k.new_var(Scalar::I64), k.new_var(Scalar::I64));
                let at = |x: VarId| {
                    Expr::add(
                        Expr::add(
                            Expr::mul(Expr::var(r), i64c(kk)),
                            Expr::mul(g.clone(), i64c(block)),
                        ),
                        Expr::var(x),
                    )
                };
                // Copy `c` of code `j`: words of four codes, each written ACT_COPIES times.
                let c = k.new_var(Scalar::I64);
                let copy_at = |j: VarId, c: VarId| {
                    let word = Expr::add(
                        Expr::add(
                            Expr::mul(Expr::var(r), i64c(kk / 4)),
                            Expr::mul(g.clone(), i64c(block / 4)),
                        ),
                        Expr::div(Expr::var(j), i64c(4)),
                    );
                    Expr::add(
                        Expr::mul(
                            Expr::add(Expr::mul(word, i64c(ACT_COPIES)), Expr::var(c)),
                            i64c(4),
                        ),
                        Expr::bin(BinOp::Rem, Expr::var(j), i64c(4)),
                    )
                };
                let table_at = Expr::add(Expr::mul(Expr::var(r), i64c(nblk)), g.clone());
                vec![
                    Stmt::Assign {
                        var: amax,
                        value: Expr::f32(0.0),
                    },
                    Stmt::Loop {
                        var: i,
                        extent: len,
                        kind: LoopKind::Serial,
                        body: vec![Stmt::Assign {
                            var: amax,
                            value: Expr::max(
                                Expr::var(amax),
                                Expr::un(UnOp::Abs, Expr::load(ap, at(i))),
                            ),
                        }],
                    },
                    Stmt::Assign {
                        var: inv,
                        value: Expr::select(
                            Expr::cmp(CmpOp::Gt, Expr::var(amax), Expr::f32(0.0)),
                            Expr::div(Expr::f32(127.0), Expr::var(amax)),
                            Expr::f32(0.0),
                        ),
                    },
                    Stmt::Store {
                        buf: sp,
                        index: table_at.clone(),
                        value: Expr::div(Expr::var(amax), Expr::f32(127.0)),
                    },
                    Stmt::Assign {
                        var: sum,
                        value: Expr::f32(0.0),
                    },
                    Stmt::Loop {
                        var: j,
                        extent: len,
                        kind: LoopKind::Serial,
                        body: vec![
                            Stmt::Assign {
                                var: q,
                                value: Expr::min(
                                    Expr::max(
                                        Expr::un(
                                            UnOp::Round,
                                            Expr::mul(Expr::load(ap, at(j)), Expr::var(inv)),
                                        ),
                                        Expr::f32(-127.0),
                                    ),
                                    Expr::f32(127.0),
                                ),
                            },
                            Stmt::Loop {
                                var: c,
                                extent: ACT_COPIES,
                                kind: LoopKind::Unrolled(ACT_COPIES),
                                body: vec![Stmt::Store {
                                    buf: qp,
                                    index: copy_at(j, c),
                                    // Through i32: backends convert floats to 32 or 64 bits.
                                    value: Expr::cast(
                                        Scalar::I8,
                                        Expr::cast(Scalar::I32, Expr::var(q)),
                                    ),
                                }],
                            },
                            Stmt::Assign {
                                var: sum,
                                value: Expr::add(Expr::var(sum), Expr::var(q)),
                            },
                        ],
                    },
                    Stmt::Store {
                        buf: cp,
                        index: table_at,
                        value: Expr::var(sum),
                    },
                ]
            };
            blocks_then_tail(k, full_blocks, block, tail, block_stmts)
        });
        self.p.steps.push(Step {
            kernel: k,
            args: vec![a, outs[0], outs[1], outs[2]],
        });
    }
}
