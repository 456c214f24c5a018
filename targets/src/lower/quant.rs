//! Lowering of quantized and half-precision weights: the fused dequantize-matmul kernel of
//! MatMulNBits (4-bit weights with per-block scales and zero points) and f16 weights widened
//! inside the matmul that reads them. Neither ever materializes float weights: packed nibbles
//! and half bits are loaded and turned into f32 in registers, where a register-blocked
//! product uses each dequantized vector for several rows of A.
//!
//! MatMulNBits weights are repacked at compile time into the layout the kernel streams: the
//! code bytes are transposed from ONNX's `[N, K/2]` (one row per output column; `[N, K]` for
//! 8 bits) to `[K/2, N]` (`[K, N]`), so consecutive output columns are consecutive bytes and a
//! vector of 4 columns is one 32-bit load; a 4-bit byte holds the weights of rows `2p` (low
//! nibble) and `2p + 1` (high nibble). Scales and zero points become tables `[blocks, N]`
//! read once per block: f16 scales keep their bits, integer zero points are bytes.

use super::{BufKind, Buffer, Lowerer, Step, R};
use crate::loop_ir::*;
use kiln_compiler::dtype::DType;
use kiln_compiler::ir::{Node, NodeId, Op, ValueId};

/// 2^112: rebias factor from a half's exponent field placed in an f32 to the f32 exponent.
const F16_REBIAS: f32 = 5.192_297e33;

/// Exact f16 -> f32 conversion of the raw half bits `h` (an integer-typed expression) with
/// integer operations: sign, exponent and mantissa move to their f32 positions and a
/// multiplication by 2^112 rebiases the exponent (which also turns subnormal halves into
/// normal floats). With `specials`, infinities and NaNs keep an all-ones exponent; without,
/// the caller knows there are none (weights checked at compile time).
pub(crate) fn f16_to_f32(h: Expr, specials: bool) -> Expr {
    let i = |v: i32| Expr::Const(Const::I32(v));
    let h = Expr::cast(Scalar::I32, h);
    let magnitude = Expr::bin(BinOp::And, h.clone(), i(0x7fff));
    let bits = Expr::bin(
        BinOp::Or,
        Expr::bin(BinOp::Shl, magnitude.clone(), i(13)),
        Expr::bin(BinOp::Shl, Expr::bin(BinOp::And, h, i(0x8000)), i(16)),
    );
    let value = Expr::mul(
        Expr::un(UnOp::BitsToF32, bits.clone()),
        Expr::f32(F16_REBIAS),
    );
    if !specials {
        return value;
    }
    Expr::select(
        Expr::cmp(CmpOp::Ge, magnitude, i(0x7c00)),
        Expr::un(UnOp::BitsToF32, Expr::bin(BinOp::Or, bits, i(0x7f80_0000))),
        value,
    )
}

/// Whether raw half data holds an infinity or a NaN.
pub(crate) fn has_f16_specials(bytes: &[u8]) -> bool {
    bytes
        .chunks_exact(2)
        .any(|c| u16::from_le_bytes([c[0], c[1]]) & 0x7c00 == 0x7c00)
}

/// Whether `node` is a MatMul or Gemm reading `v` as B, and only as B.
pub(super) fn reads_as_b(node: &Node, v: ValueId) -> bool {
    matches!(node.op, Op::MatMul | Op::Gemm { .. })
        && node.inputs.get(1) == Some(&Some(v))
        && node.inputs.first() != Some(&Some(v))
        && node.inputs.get(2) != Some(&Some(v))
}

impl Lowerer<'_> {
    /// For a Cast from f16 to f32 that only matrix products read, as B: its input and its
    /// consumers. Such a Cast is not materialized (see [`Self::widen_in_consumers`]).
    pub(super) fn widened_by_products(&self, n: &Node) -> Option<(ValueId, Vec<NodeId>)> {
        let (Some(Some(src)), Some(&out)) = (n.inputs.first(), n.outputs.first()) else {
            return None;
        };
        let is_f16 = self.g.value(*src).ty.dtype == Some(DType::F16);
        let to_f32 = matches!(n.op, Op::Cast { to: DType::F32, .. });
        if !is_f16 || !to_f32 || self.g.outputs.contains(&out) {
            return None;
        }
        let consumers = self.g.consumers(out);
        let all_products =
            !consumers.is_empty() && consumers.iter().all(|&c| reads_as_b(&self.g.nodes[c], out));
        all_products.then_some((*src, consumers))
    }

    /// A Cast from f16 to f32 whose every consumer is a matrix product reading it as B is not
    /// materialized: the products read the half bits and widen them in registers.
    pub(super) fn widen_in_consumers(&mut self, n: &Node) -> R<bool> {
        let Some((src, _)) = self.widened_by_products(n) else {
            return Ok(false);
        };
        let specials = match self.g.constant(src) {
            Some(c) => has_f16_specials(&c.bytes),
            None => true,
        };
        self.f16_widened.insert(n.outputs[0], (src, specials));
        Ok(true)
    }

    /// The constant behind input `i` of `n`, or an error naming it.
    fn const_input(&self, n: &Node, i: usize, what: &str) -> R<kiln_compiler::Tensor> {
        let v = n
            .inputs
            .get(i)
            .copied()
            .flatten()
            .ok_or_else(|| format!("missing {what}"))?;
        self.g
            .constant(v)
            .map(|c| c.to_tensor())
            .ok_or_else(|| format!("{what} must be a compile-time constant"))
    }

    /// A buffer of constant data in the artifact's read-only segment.
    pub(super) fn weight_buffer(
        &mut self,
        name: String,
        scalar: Scalar,
        len: usize,
        bytes: Vec<u8>,
    ) -> usize {
        debug_assert_eq!(bytes.len(), len * scalar.bytes());
        self.p.buffers.push(Buffer {
            name,
            scalar,
            len,
            kind: BufKind::Weight(bytes),
        });
        self.p.buffers.len() - 1
    }

    /// MatMulNBits (4 or 8 bits) as one fused kernel over repacked weights, or, with int8
    /// activations, a quantization kernel for A and an integer dot-product kernel.
    pub(super) fn matmul_nbits(
        &mut self,
        n: &Node,
        kk: usize,
        nn: usize,
        bits: usize,
        block: usize,
        accuracy_level: usize,
    ) -> R<()> {
        if kiln_compiler::ir::int8_activations(kk, bits, block, accuracy_level) {
            return self.matmul_nbits_int8(n, kk, nn, block);
        }
        if bits != 4 && bits != 8 {
            return Err(format!(
                "MatMulNBits with {bits} bits is not supported by codegen (4 or 8 bits)"
            ));
        }
        if block < 2 || !kk.is_multiple_of(2) || !block.is_multiple_of(2) {
            return Err(format!(
                "MatMulNBits with an odd K={kk} or block_size={block} is not supported by codegen"
            ));
        }
        let (a, m) = self.nbits_input(n, kk)?;
        // The last block may be shorter than `block` (its bytes are padding beyond K).
        let nblk = kk.div_ceil(block);
        let full_blocks = kk / block;
        let half = block / 2;
        let tail_pairs = (kk - full_blocks * block) / 2;
        let NBitsOperands {
            b_bytes,
            blob,
            half_scales,
            scale_bits,
            scales,
            has_zero_points,
            zero_points,
        } = self.nbits_operands(n, nn, nblk, bits, block)?;
        let default_zero_point = (1u32 << (bits - 1)) as f64;
        // Repack: nibble bytes [N, K/2] -> [K/2, N]; scales and zero points [blocks, N]: f16
        // scales keep their bits (widened per block in the kernel), f32 ones stay f32; integer
        // zero points become bytes, absent ones the constant 8.
        // One byte holds `per_byte` consecutive rows of K (2 nibbles, or one 8-bit code).
        let per_byte = 8 / bits;
        let byte_rows = kk / per_byte;
        let block_bytes = block / per_byte;
        let mut packed = vec![0u8; nn * byte_rows];
        for row in 0..nn {
            for p in 0..byte_rows {
                packed[p * nn + row] =
                    b_bytes[(row * nblk + p / block_bytes) * blob + p % block_bytes];
            }
        }
        let table = |v: &[f64]| -> Vec<u8> {
            let mut t = vec![0u8; nn * nblk * 4];
            for row in 0..nn {
                for g in 0..nblk {
                    let x = v[row * nblk + g] as f32;
                    t[(g * nn + row) * 4..][..4].copy_from_slice(&x.to_le_bytes());
                }
            }
            t
        };
        let transpose_bytes = |src: &[u8], width: usize| -> Vec<u8> {
            let mut t = vec![0u8; nn * nblk * width];
            for row in 0..nn {
                for g in 0..nblk {
                    t[(g * nn + row) * width..][..width]
                        .copy_from_slice(&src[(row * nblk + g) * width..][..width]);
                }
            }
            t
        };
        let byte_zero_points = byte_zero_points(&zero_points);
        let qb = self.weight_buffer(
            format!("{}.codes", n.name),
            Scalar::U8,
            nn * byte_rows,
            packed,
        );
        let (scale_scalar, scale_bytes) = if half_scales {
            (Scalar::F16, transpose_bytes(&scale_bits, 2))
        } else {
            (Scalar::F32, table(&scales))
        };
        let scale_specials = half_scales && super::quant::has_f16_specials(&scale_bits);
        let sb = self.weight_buffer(
            format!("{}.scales", n.name),
            scale_scalar,
            nn * nblk,
            scale_bytes,
        );
        let zb = match (has_zero_points, byte_zero_points) {
            (false, _) => None,
            (true, true) => {
                let bytes: Vec<u8> = zero_points.iter().map(|&z| z as u8).collect();
                Some((Scalar::U8, transpose_bytes(&bytes, 1)))
            }
            (true, false) => Some((Scalar::F32, table(&zero_points))),
        }
        .map(|(sc, bytes)| {
            (
                sc,
                self.weight_buffer(format!("{}.zero_points", n.name), sc, nn * nblk, bytes),
            )
        });
        let mut k = Kernel::new(&n.name);
        let ab = self.buffer(a)?;
        let mut args = vec![ab, qb, sb];
        let ap = k.param("a", Scalar::F32, self.p.buffers[ab].len, false);
        let qp = k.param("codes", Scalar::U8, nn * byte_rows, false);
        let sp = k.param("scales", scale_scalar, nn * nblk, false);
        let zp = zb.map(|(sc, buf)| {
            args.push(buf);
            (sc, k.param("zero_points", sc, nn * nblk, false))
        });
        let scale_value = |at: Expr| block_scale(sp, scale_scalar, scale_specials, at);
        let zero_point_value = |at: Expr| match zp {
            None => Expr::f32(default_zero_point as f32),
            Some((scalar, p)) => block_zero_point(p, scalar, at),
        };
        let bias = self.nbits_bias(n, nn)?.map(|bb| {
            args.push(bb);
            k.param("bias", Scalar::F32, nn, false)
        });
        let out = n.outputs[0];
        let dst = self.out_buffer(out)?;
        if self.p.buffers[dst].len != m * nn {
            return Err("output size is not M x N".into());
        }
        args.push(dst);
        let yp = k.param("y", Scalar::F32, m * nn, true);
        // Four rows share each dequantized vector: with their partial sums and the block's
        // scale and zero point that is 12 vector locals, which fits 16 SSE registers.
        let rows = super::row_tile(m, 4);
        let accs: Vec<VarId> = (0..rows).map(|_| k.new_var(Scalar::F32)).collect();
        let parts: Vec<VarId> = (0..rows).map(|_| k.new_var(Scalar::F32)).collect();
        let (zv, sv, lo, hi) = (
            k.new_var(Scalar::F32),
            k.new_var(Scalar::F32),
            k.new_var(Scalar::F32),
            k.new_var(Scalar::F32),
        );
        let i64c = |v: usize| Expr::i64(v as i64);
        k.body = nest(&mut k, &[m / rows, nn], |k, v| {
            let (io, j) = (v[0], v[1]);
            let row = |r: usize| Expr::add(Expr::mul(Expr::var(io), i64c(rows)), i64c(r));
            // One block's statements: `g` is the block index, `pairs` its byte rows.
            let block_stmts = |k: &mut Kernel, g: Expr, pairs: usize| -> Vec<Stmt> {
                let p = k.new_var(Scalar::I64);
                let table_at = Expr::add(Expr::mul(g.clone(), i64c(nn)), Expr::var(j));
                // Byte row of K row `2p + odd` of the block.
                let byte_at = |odd: usize| {
                    let row = if bits == 4 {
                        Expr::add(Expr::mul(g.clone(), i64c(half)), Expr::var(p))
                    } else {
                        Expr::add(
                            Expr::mul(g.clone(), i64c(block)),
                            Expr::add(Expr::mul(Expr::var(p), i64c(2)), i64c(odd)),
                        )
                    };
                    Expr::add(Expr::mul(row, i64c(nn)), Expr::var(j))
                };
                let byte = |odd: usize| Expr::cast(Scalar::I32, Expr::load(qp, byte_at(odd)));
                let nibble = |e: Expr| Expr::sub(Expr::cast(Scalar::F32, e), Expr::var(zv));
                let (lo_code, hi_code) = if bits == 4 {
                    (
                        Expr::bin(BinOp::And, byte(0), Expr::Const(Const::I32(15))),
                        Expr::bin(BinOp::Shr, byte(0), Expr::Const(Const::I32(4))),
                    )
                } else {
                    (byte(0), byte(1))
                };
                let a_at = |r: usize, odd: usize| {
                    Expr::add(
                        Expr::add(
                            Expr::mul(row(r), i64c(kk)),
                            Expr::mul(g.clone(), i64c(block)),
                        ),
                        Expr::add(Expr::mul(Expr::var(p), i64c(2)), i64c(odd)),
                    )
                };
                let mut inner = vec![
                    Stmt::Assign {
                        var: lo,
                        value: nibble(lo_code),
                    },
                    Stmt::Assign {
                        var: hi,
                        value: nibble(hi_code),
                    },
                ];
                for (r, &part) in parts.iter().enumerate() {
                    let terms = Expr::add(
                        Expr::mul(Expr::load(ap, a_at(r, 0)), Expr::var(lo)),
                        Expr::mul(Expr::load(ap, a_at(r, 1)), Expr::var(hi)),
                    );
                    inner.push(Stmt::Assign {
                        var: part,
                        value: Expr::add(Expr::var(part), terms),
                    });
                }
                let mut stmts = vec![
                    Stmt::Assign {
                        var: zv,
                        value: zero_point_value(table_at.clone()),
                    },
                    Stmt::Assign {
                        var: sv,
                        value: scale_value(table_at),
                    },
                ];
                stmts.extend(parts.iter().map(|&pv| Stmt::Assign {
                    var: pv,
                    value: Expr::f32(0.0),
                }));
                stmts.push(Stmt::Loop {
                    var: p,
                    extent: pairs,
                    kind: LoopKind::Serial,
                    body: inner,
                });
                stmts.extend(accs.iter().zip(&parts).map(|(&acc, &pv)| Stmt::Assign {
                    var: acc,
                    value: Expr::add(Expr::var(acc), Expr::mul(Expr::var(pv), Expr::var(sv))),
                }));
                stmts
            };
            let mut body: Vec<Stmt> = accs
                .iter()
                .map(|&acc| Stmt::Assign {
                    var: acc,
                    value: Expr::f32(0.0),
                })
                .collect();
            body.extend(blocks_then_tail(
                k,
                full_blocks,
                half,
                tail_pairs,
                block_stmts,
            ));
            for (r, &acc) in accs.iter().enumerate() {
                let mut value = Expr::var(acc);
                if let Some(bp) = bias {
                    value = Expr::add(value, Expr::load(bp, Expr::var(j)));
                }
                body.push(Stmt::Store {
                    buf: yp,
                    index: Expr::add(Expr::mul(row(r), i64c(nn)), Expr::var(j)),
                    value,
                });
            }
            body
        });
        self.p.steps.push(Step { kernel: k, args });
        Ok(())
    }
}

/// The constant operands of a MatMulNBits, checked and decoded.
pub(super) struct NBitsOperands {
    /// B as stored: `[N, blocks, blob]`.
    pub(super) b_bytes: Vec<u8>,
    /// Bytes per block of one column.
    pub(super) blob: usize,
    pub(super) half_scales: bool,
    /// The scales' raw bytes (f16 or f32) and their values, `[N, blocks]`.
    pub(super) scale_bits: Vec<u8>,
    pub(super) scales: Vec<f64>,
    pub(super) has_zero_points: bool,
    /// Zero points `[N, blocks]` (the default `2^(bits-1)` when absent).
    pub(super) zero_points: Vec<f64>,
}

impl Lowerer<'_> {
    pub(super) fn nbits_operands(
        &self,
        n: &Node,
        nn: usize,
        nblk: usize,
        bits: usize,
        block: usize,
    ) -> R<NBitsOperands> {
        let b = self.const_input(n, 1, "B")?;
        let b_bytes = b.to_le_bytes();
        let blob = block * bits / 8;
        if b.dtype() != DType::U8 || b_bytes.len() != nn * nblk * blob {
            return Err(format!(
                "B must be {} uint8 bytes, got {} of {}",
                nn * nblk * blob,
                b_bytes.len(),
                b.dtype()
            ));
        }
        let scales_t = self.const_input(n, 2, "scales")?;
        let half_scales = scales_t.dtype() == DType::F16;
        let scale_bits = scales_t.to_le_bytes();
        let scales = scales_t.to_f64_vec();
        if scales.len() != nn * nblk {
            return Err(format!(
                "expected {} scales, got {}",
                nn * nblk,
                scales.len()
            ));
        }
        let has_zero_points = n.inputs.get(3).copied().flatten().is_some();
        let default_zero_point = (1u32 << (bits - 1)) as f64;
        let zero_points: Vec<f64> = match n.inputs.get(3).copied().flatten() {
            None => vec![default_zero_point; nn * nblk],
            Some(_) => {
                let z = self.const_input(n, 3, "zero_points")?;
                if z.dtype() == DType::U8 {
                    let zb = z.to_le_bytes();
                    let per_row = (nblk * bits).div_ceil(8);
                    if zb.len() != nn * per_row {
                        return Err(format!(
                            "expected {} packed zero-point bytes, got {}",
                            nn * per_row,
                            zb.len()
                        ));
                    }
                    (0..nn * nblk)
                        .map(|i| {
                            let (row, g) = (i / nblk, i % nblk);
                            if bits == 8 {
                                zb[row * per_row + g] as f64
                            } else {
                                ((zb[row * per_row + g / 2] >> (4 * (g % 2))) & 15) as f64
                            }
                        })
                        .collect()
                } else {
                    let zf = z.to_f64_vec();
                    if zf.len() != nn * nblk {
                        return Err(format!(
                            "expected {} zero points, got {}",
                            nn * nblk,
                            zf.len()
                        ));
                    }
                    zf
                }
            }
        };
        Ok(NBitsOperands {
            b_bytes,
            blob,
            half_scales,
            scale_bits,
            scales,
            has_zero_points,
            zero_points,
        })
    }
}

impl Lowerer<'_> {
    /// A of a MatMulNBits, checked (f32, last dim K, no g_idx), and its row count M.
    pub(super) fn nbits_input(&self, n: &Node, kk: usize) -> R<(ValueId, usize)> {
        if n.inputs.get(4).copied().flatten().is_some() {
            return Err("MatMulNBits g_idx is not supported by codegen".into());
        }
        let a: ValueId = n.inputs[0].ok_or("missing A")?;
        if self.scalar(a)? != Scalar::F32 {
            return Err("MatMulNBits is only lowered for f32 activations".into());
        }
        let ash = self.shape(a)?;
        if ash.last() != Some(&kk) {
            return Err(format!("A's last dim is not K={kk}"));
        }
        Ok((a, ash.iter().product::<usize>() / kk))
    }

    /// The buffer of a MatMulNBits bias (input 5), checked to be f32 `[N]`.
    pub(super) fn nbits_bias(&mut self, n: &Node, nn: usize) -> R<Option<usize>> {
        let Some(bv) = n.inputs.get(5).copied().flatten() else {
            return Ok(None);
        };
        let bb = self.buffer(bv)?;
        if self.p.buffers[bb].len != nn || self.p.buffers[bb].scalar != Scalar::F32 {
            return Err("bias must be f32 [N]".into());
        }
        Ok(Some(bb))
    }
}

/// Whether every zero point is a whole number that fits a byte (stored as u8, else f32).
pub(super) fn byte_zero_points(zero_points: &[f64]) -> bool {
    zero_points
        .iter()
        .all(|&z| z.fract() == 0.0 && (0.0..=255.0).contains(&z))
}

/// The statements of a loop over `full` whole blocks (`block_stmts(k, g, full_len)` with `g`
/// the loop variable) followed by the last, shorter block (`block_stmts(k, full, tail_len)`)
/// when `tail_len > 0`.
pub(super) fn blocks_then_tail(
    k: &mut Kernel,
    full: usize,
    full_len: usize,
    tail_len: usize,
    mut block_stmts: impl FnMut(&mut Kernel, Expr, usize) -> Vec<Stmt>,
) -> Vec<Stmt> {
    let mut out = Vec::new();
    if full > 0 {
        let g = k.new_var(Scalar::I64);
        let body = block_stmts(k, Expr::var(g), full_len);
        out.push(Stmt::Loop {
            var: g,
            extent: full,
            kind: LoopKind::Serial,
            body,
        });
    }
    if tail_len > 0 {
        out.extend(block_stmts(k, Expr::i64(full as i64), tail_len));
    }
    out
}

/// A block's scale from table parameter `p` at `at`: f32, or f16 bits widened in registers.
pub(super) fn block_scale(p: usize, scalar: Scalar, specials: bool, at: Expr) -> Expr {
    if scalar == Scalar::F16 {
        f16_to_f32(Expr::load(p, at), specials)
    } else {
        Expr::load(p, at)
    }
}

/// A block's zero point from table parameter `p` at `at` as f32 (u8 bytes or f32 values).
pub(super) fn block_zero_point(p: usize, scalar: Scalar, at: Expr) -> Expr {
    if scalar == Scalar::U8 {
        Expr::cast(Scalar::F32, Expr::cast(Scalar::I32, Expr::load(p, at)))
    } else {
        Expr::load(p, at)
    }
}
