//! Lowering of MatMulNBits with int8 activations to calls of the hand-written tile
//! [`Microkernel::Q4Int8`] (x86-64 targets: SSE, AVX2 or AVX-VNNI; N a multiple of 8, byte
//! zero points). The weights are repacked at compile time into one stream per span of 8 or
//! 16 columns: per
//! block, the weight words of the span's columns side by side, then the block's scales and
//! zero points (the layout of [`Q4Int8Tile`]), so a thread reads each span front to back.
//! The kernel loops over spans (the parallel loop) and rows of A; each call leaves one row's
//! sums for the span's columns in Y, and the bias is added after it. The activations come
//! from the same quantizing kernel as the Cranelift path's ([`Lowerer::int8_product_buffers`]),
//! so the arithmetic is the same, bit for bit.

use super::quant::NBitsOperands;
use super::quant_int8::ACT_COPIES;
use super::{Lowerer, Step, R};
use crate::loop_ir::*;
use crate::microkernel::{Q4Dot, Q4Int8Tile, Q4_ACT_WORD_BYTES, Q4_ROWS_PER_WORD};
use kiln_compiler::ir::{Node, ValueId};

const _: () = assert!(ACT_COPIES * 4 == Q4_ACT_WORD_BYTES);

impl Lowerer<'_> {
    /// The tile for a product of K = `kk` in blocks of `block` rows and N = `nn` columns, if
    /// this target has one and the operands fit it.
    pub(super) fn q4_int8_tile(
        &self,
        kk: usize,
        nn: usize,
        block: usize,
        ops: &NBitsOperands,
    ) -> Option<Q4Int8Tile> {
        let dot = self.opts.q4_int8_tile?;
        if !nn.is_multiple_of(8) || !super::quant::byte_zero_points(&ops.zero_points) {
            return None;
        }
        // The SSE tile widens f16 scales by shifts, which do not carry infinities and NaNs.
        if dot == Q4Dot::Sse && ops.half_scales && super::quant::has_f16_specials(&ops.scale_bits) {
            return None;
        }
        Some(Q4Int8Tile {
            dot,
            // 16 columns in two ymm registers where N allows; SSE always has 8 in two xmm.
            vectors: if dot == Q4Dot::Sse || nn.is_multiple_of(16) {
                2
            } else {
                1
            },
            block_words: u16::try_from(block / Q4_ROWS_PER_WORD).ok()?,
            blocks: u16::try_from(kk / block).ok()?,
            tail_words: u16::try_from(kk % block / Q4_ROWS_PER_WORD).ok()?,
            half_scales: ops.half_scales,
        })
    }

    /// MatMulNBits `n` (A in value `a`, `m` rows; N = `nn`; K and the block size as in
    /// `tile`) as calls of `tile`.
    pub(super) fn matmul_nbits_int8_tile(
        &mut self,
        n: &Node,
        a: ValueId,
        m: usize,
        nn: usize,
        ops: &NBitsOperands,
        tile: Q4Int8Tile,
    ) -> R<()> {
        let (kk, block) = (tile.depth(), tile.block_words as usize * Q4_ROWS_PER_WORD);
        let nblk = tile.all_blocks();
        let cols = tile.columns();
        let spans = nn / cols;
        let span_bytes = tile.span_bytes();
        let code = |col: usize, row: usize| -> u8 {
            let byte = ops.b_bytes[(col * nblk + row / block) * ops.blob + (row % block) / 2];
            (byte >> (4 * (row % 2))) & 15
        };
        let mut data = Vec::with_capacity(spans * span_bytes);
        for span in 0..spans {
            let columns = span * cols..(span + 1) * cols;
            for g in 0..nblk {
                let words = tile.block_words_at(g);
                let record = data.len();
                for o in g * block / Q4_ROWS_PER_WORD..g * block / Q4_ROWS_PER_WORD + words {
                    for col in columns.clone() {
                        for b in 0..4 {
                            let row = o * Q4_ROWS_PER_WORD + b;
                            data.push(code(col, row) | (code(col, row + 4) << 4));
                        }
                    }
                }
                for col in columns.clone() {
                    let at = col * nblk + g;
                    if tile.half_scales {
                        data.extend_from_slice(&ops.scale_bits[at * 2..][..2]);
                    } else {
                        data.extend((ops.scales[at] as f32).to_le_bytes());
                    }
                }
                data.extend(
                    columns
                        .clone()
                        .map(|col| ops.zero_points[col * nblk + g] as u8),
                );
                debug_assert_eq!(data.len() - record, tile.record_bytes(words));
            }
        }
        debug_assert_eq!(data.len(), spans * span_bytes);
        let len = data.len();
        let wb = self.weight_buffer(format!("{}.tiles", n.name), Scalar::U8, len, data);
        let ([qa, qa_scales, qa_sums], bias, dst) =
            self.int8_product_buffers(n, a, m, kk, nn, block)?;

        let mut k = Kernel::new(&n.name);
        let mut args = vec![wb, qa, qa_scales, qa_sums];
        let dp = k.param("tiles", Scalar::U8, len, false);
        let row_words = kk / 4 * ACT_COPIES;
        let qp = k.param("a_codes", Scalar::I32, m * row_words, false);
        let asp = k.param("a_scales", Scalar::F32, m * nblk, false);
        let ssp = k.param("a_sums", Scalar::F32, m * nblk, false);
        let bp = bias.map(|bb| {
            args.push(bb);
            k.param("bias", Scalar::F32, nn, false)
        });
        args.push(dst);
        let yp = k.param("y", Scalar::F32, m * nn, true);
        let i = |v: usize| Expr::i64(v as i64);
        k.body = nest(&mut k, &[spans, m], |k, v| {
            let (span, row) = (Expr::var(v[0]), Expr::var(v[1]));
            let col0 = Expr::mul(span.clone(), i(cols));
            let y_at = Expr::add(Expr::mul(row.clone(), i(nn)), col0.clone());
            let table = |buf: usize| CallArg::Addr {
                buf,
                index: Expr::mul(row.clone(), i(nblk)),
            };
            let mut body = vec![Stmt::Call {
                kernel: Microkernel::Q4Int8(tile),
                args: vec![
                    CallArg::Addr {
                        buf: dp,
                        index: Expr::mul(span.clone(), i(span_bytes)),
                    },
                    CallArg::Addr {
                        buf: qp,
                        index: Expr::mul(row.clone(), i(row_words)),
                    },
                    table(asp),
                    table(ssp),
                    CallArg::Addr {
                        buf: yp,
                        index: y_at.clone(),
                    },
                ],
            }];
            if let Some(bp) = bp {
                let j = k.new_var(Scalar::I64);
                let at = Expr::add(y_at, Expr::var(j));
                body.push(Stmt::Loop {
                    var: j,
                    extent: cols,
                    kind: LoopKind::Serial,
                    body: vec![Stmt::Store {
                        buf: yp,
                        index: at.clone(),
                        value: Expr::add(
                            Expr::load(yp, at),
                            Expr::load(bp, Expr::add(col0, Expr::var(j))),
                        ),
                    }],
                });
            }
            body
        });
        self.p.steps.push(Step { kernel: k, args });
        Ok(())
    }
}
