//! Hand-scheduled leaf kernels that Cranelift cannot express well, emitted as machine code by
//! a small encoder of our own. Two families, both x86-64:
//! - the single-precision tile of the packed matrix products ([`Microkernel::SgemmAvx2`]).
//!   Cranelift 0.135 has no 256-bit vectors and only the FMA forms that overwrite a
//!   multiplicand, so its product loop needs a register copy per FMA and reaches about 60% of
//!   the 128-bit peak; this tile keeps twelve 256-bit accumulators and uses `vfmadd231ps`,
//!   which accumulates in place;
//! - the 4-bit-weight by int8-activation tile of MatMulNBits ([`Q4Int8Tile`]): 256-bit
//!   nibble masks and `vpdpbusd` or `vpmaddubsw` with AVX2, the same with 128-bit legacy SSE
//!   encodings on the baseline target, and software prefetch, which Cranelift does not offer.
//!
//! The loop IR calls a microkernel through [`crate::loop_ir::Stmt::Call`]; the code generator
//! adds each one used to the artifact once, as a leaf function with the System V calling
//! convention that uses only argument and scratch registers (no stack, no relocations). The
//! encoder covers exactly the instruction forms the kernels use; its unit tests pin every
//! form's bytes (checked against `objdump`).

use crate::loop_ir::Microkernel;

/// Columns of B (one packed panel) a [`Microkernel::SgemmAvx2`] tile covers: two 256-bit
/// vectors.
pub const SGEMM_AVX2_COLUMNS: usize = 16;
/// Most rows of A a [`Microkernel::SgemmAvx2`] tile covers: 2 x 6 accumulators, two panel
/// vectors and two broadcasts fill the sixteen ymm registers.
pub const SGEMM_AVX2_MAX_ROWS: usize = 6;

/// The machine code of `k`, a complete function.
pub fn code(k: Microkernel) -> Vec<u8> {
    match k {
        Microkernel::SgemmAvx2 { rows, accumulate } => sgemm_avx2(rows as usize, accumulate),
        Microkernel::Q4Int8(tile) => q4_int8(&tile),
    }
}

/// Rows of K per 32-bit weight word of a [`Q4Int8Tile`]: byte `b` of word `o` holds row
/// `8o + b` in its low nibble and row `8o + 4 + b` in its high one.
pub const Q4_ROWS_PER_WORD: usize = 8;

/// One row of A (int8 codes per block, with block scales and code sums) times one span of
/// [`Q4Int8Tile::columns`] columns of 4-bit weights, for a MatMulNBits with int8 activations: for each
/// column `y = sum over blocks of (dot - zp * a_sum) * (scale * a_scale)`, the integer dot
/// exact and the float steps in the order of `kiln_compiler::ir::int8_activations`. A span's
/// constants are one stream of [`Q4Int8Tile::span_bytes`] bytes, a record per block: the
/// block's weight words (word `o` of the span's columns side by side, in column order), then
/// its scales (f16 or f32 per column), then its zero points (one byte per column). Weights and
/// tables in one stream keep the hardware prefetcher on it: with the tables in streams of
/// their own, the single-thread mat-vec ran at half the speed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Q4Int8Tile {
    /// The vector registers and the dot-product instructions.
    pub dot: Q4Dot,
    /// Vectors of columns: 1 or 2 (256-bit), 2 (128-bit).
    pub vectors: u8,
    /// Weight words per column in a whole block (the block size / 8).
    pub block_words: u16,
    /// Whole blocks.
    pub blocks: u16,
    /// Weight words per column in the last, shorter block (0 when there is none).
    pub tail_words: u16,
    /// Scales stored as f16 (converted with F16C, or by shifts and a multiply on SSE), else
    /// f32.
    pub half_scales: bool,
}

/// The instruction set of a [`Q4Int8Tile`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Q4Dot {
    /// 128-bit SSE4.1 registers, `pmaddubsw` + `pmaddwd` (the `x86_64` target).
    Sse,
    /// 256-bit AVX2 registers, `vpmaddubsw` + `vpmaddwd` (x86_64-v3).
    Avx2,
    /// 256-bit AVX2 registers, `vpdpbusd` (x86_64-v3-vnni).
    AvxVnni,
}

impl Q4Dot {
    /// Bytes per vector register.
    pub fn vector_bytes(self) -> usize {
        match self {
            Q4Dot::Sse => 16,
            Q4Dot::Avx2 | Q4Dot::AvxVnni => 32,
        }
    }

    /// The name in symbols ("sse", "madd", "vnni").
    pub fn name(self) -> &'static str {
        match self {
            Q4Dot::Sse => "sse",
            Q4Dot::Avx2 => "madd",
            Q4Dot::AvxVnni => "vnni",
        }
    }
}

impl Q4Int8Tile {
    /// Columns in the span (one 32-bit weight word each per vector lane).
    pub fn columns(&self) -> usize {
        self.dot.vector_bytes() / 4 * self.vectors as usize
    }

    /// Bytes of one scale.
    pub fn scale_bytes(&self) -> usize {
        if self.half_scales {
            2
        } else {
            4
        }
    }

    /// Blocks, the shorter last one included.
    pub fn all_blocks(&self) -> usize {
        self.blocks as usize + (self.tail_words > 0) as usize
    }

    /// Weight words per column.
    pub fn words(&self) -> usize {
        self.blocks as usize * self.block_words as usize + self.tail_words as usize
    }

    /// Bytes of the record of a block of `words` weight words per column: the words, the
    /// scales, the zero points. Records are not padded: unaligned 256-bit loads measured as
    /// fast as aligned ones, and padding would stream more bytes.
    pub fn record_bytes(&self, words: usize) -> usize {
        words * 4 * self.columns() + self.columns() * (self.scale_bytes() + 1)
    }

    /// Weight words per column of block `g` (the last one may be shorter).
    pub fn block_words_at(&self, g: usize) -> usize {
        if g < self.blocks as usize {
            self.block_words as usize
        } else {
            self.tail_words as usize
        }
    }

    /// Bytes of a span's stream.
    pub fn span_bytes(&self) -> usize {
        (0..self.all_blocks())
            .map(|g| self.record_bytes(self.block_words_at(g)))
            .sum()
    }

    /// Rows of K.
    pub fn depth(&self) -> usize {
        self.words() * Q4_ROWS_PER_WORD
    }
}

/// x86-64 general-purpose registers by encoding number.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
enum Gpr {
    Rax = 0,
    Rcx = 1,
    Rdx = 2,
    Rsi = 6,
    Rdi = 7,
    R8 = 8,
    R9 = 9,
    R10 = 10,
}

/// A memory operand `[base + index * scale + disp]`.
#[derive(Clone, Copy, Debug)]
struct Mem {
    base: Gpr,
    index: Option<(Gpr, u8)>,
    disp: i32,
}

fn mem(base: Gpr, index: Option<(Gpr, u8)>, disp: i32) -> Mem {
    Mem { base, index, disp }
}

/// The ModRM operand of an instruction: a register or memory.
#[derive(Clone, Copy)]
enum Rm {
    Reg(u8),
    Mem(Mem),
}

/// Opcode maps of the VEX prefix.
#[derive(Clone, Copy)]
enum Map {
    X0f = 1,
    X0f38 = 2,
}

/// Implied legacy prefixes of the VEX prefix.
#[derive(Clone, Copy)]
enum Pp {
    None = 0,
    X66 = 1,
}

#[derive(Default)]
struct Asm {
    code: Vec<u8>,
}

impl Asm {
    /// ModRM (and SIB and displacement) for register field `reg` and operand `rm`.
    fn modrm(&mut self, reg: u8, rm: &Rm) {
        match rm {
            Rm::Reg(r) => self.code.push(0xC0 | ((reg & 7) << 3) | (r & 7)),
            Rm::Mem(m) => {
                let base = m.base as u8;
                // rbp/r13 as a base have no disp-less form.
                let md = if m.disp == 0 && base & 7 != 5 {
                    0
                } else if i8::try_from(m.disp).is_ok() {
                    1
                } else {
                    2
                };
                match m.index {
                    None if base & 7 != 4 => {
                        self.code.push((md << 6) | ((reg & 7) << 3) | (base & 7))
                    }
                    index => {
                        self.code.push((md << 6) | ((reg & 7) << 3) | 4);
                        let (i, s) = match index {
                            Some((i, s)) => (i as u8, s),
                            None => (4, 1),
                        };
                        let ss = match s {
                            1 => 0,
                            2 => 1,
                            4 => 2,
                            _ => 3,
                        };
                        self.code.push((ss << 6) | ((i & 7) << 3) | (base & 7));
                    }
                }
                match md {
                    1 => self.code.push(m.disp as i8 as u8),
                    2 => self.code.extend(m.disp.to_le_bytes()),
                    _ => {}
                }
            }
        }
    }

    /// The high register bits of operand `rm`: (X, B).
    fn rm_ext(rm: &Rm) -> (u8, u8) {
        match rm {
            Rm::Reg(r) => (0, r >> 3),
            Rm::Mem(m) => (
                m.index.map_or(0, |(i, _)| (i as u8) >> 3),
                (m.base as u8) >> 3,
            ),
        }
    }

    /// A VEX instruction (three-byte prefix, W0), 256-bit when `wide`: `opcode reg, vvvv, rm`.
    #[allow(clippy::too_many_arguments)]
    fn vex(&mut self, map: Map, pp: Pp, wide: bool, opcode: u8, reg: u8, vvvv: u8, rm: Rm) {
        let (x, b) = Self::rm_ext(&rm);
        let r = reg >> 3;
        self.code.push(0xC4);
        self.code
            .push(((r ^ 1) << 7) | ((x ^ 1) << 6) | ((b ^ 1) << 5) | map as u8);
        self.code
            .push(((!vvvv & 0xF) << 3) | ((wide as u8) << 2) | pp as u8);
        self.code.push(opcode);
        self.modrm(reg, &rm);
    }

    /// A 256-bit VEX instruction: `opcode reg, vvvv, rm`.
    fn vex256(&mut self, map: Map, pp: Pp, opcode: u8, reg: u8, vvvv: u8, rm: Rm) {
        self.vex(map, pp, true, opcode, reg, vvvv, rm);
    }

    /// A 256-bit shift by an immediate: `opcode /ext dst, src, imm`.
    fn vshift_imm(&mut self, opcode: u8, ext: u8, dst: u8, src: u8, imm: u8) {
        self.vex256(Map::X0f, Pp::X66, opcode, ext, dst, Rm::Reg(src));
        self.code.push(imm);
    }

    fn vpand(&mut self, dst: u8, x: u8, y: Rm) {
        self.vex256(Map::X0f, Pp::X66, 0xDB, dst, x, y);
    }

    fn vpxor(&mut self, dst: u8, x: u8, y: u8) {
        self.vex256(Map::X0f, Pp::X66, 0xEF, dst, x, Rm::Reg(y));
    }

    /// Shifts each 16-bit lane right (logical).
    fn vpsrlw(&mut self, dst: u8, src: u8, imm: u8) {
        self.vshift_imm(0x71, 2, dst, src, imm);
    }

    /// Shifts each 32-bit lane right (arithmetic).
    fn vpsrad(&mut self, dst: u8, src: u8, imm: u8) {
        self.vshift_imm(0x72, 4, dst, src, imm);
    }

    fn vpaddw(&mut self, dst: u8, x: u8, y: u8) {
        self.vex256(Map::X0f, Pp::X66, 0xFD, dst, x, Rm::Reg(y));
    }

    fn vpaddd(&mut self, dst: u8, x: u8, y: u8) {
        self.vex256(Map::X0f, Pp::X66, 0xFE, dst, x, Rm::Reg(y));
    }

    /// Broadcasts a 32-bit lane from memory or from the low lane of a register.
    fn vpbroadcastd(&mut self, dst: u8, src: Rm) {
        self.vex256(Map::X0f38, Pp::X66, 0x58, dst, 0, src);
    }

    /// `acc += sum of four u8 (x) by i8 (y) products` per 32-bit lane (AVX-VNNI).
    fn vpdpbusd(&mut self, acc: u8, x: u8, y: u8) {
        self.vex256(Map::X0f38, Pp::X66, 0x50, acc, x, Rm::Reg(y));
    }

    /// Per 16-bit lane, the saturated sum of two u8 (x) by i8 (y) products.
    fn vpmaddubsw(&mut self, dst: u8, x: u8, y: u8) {
        self.vex256(Map::X0f38, Pp::X66, 0x04, dst, x, Rm::Reg(y));
    }

    /// Per 32-bit lane, the sum of two i16 by i16 products.
    fn vpmaddwd(&mut self, dst: u8, x: u8, y: u8) {
        self.vex256(Map::X0f, Pp::X66, 0xF5, dst, x, Rm::Reg(y));
    }

    /// Eight u8 from memory, zero-extended to 32-bit lanes.
    fn vpmovzxbd(&mut self, dst: u8, src: Mem) {
        self.vex256(Map::X0f38, Pp::X66, 0x31, dst, 0, Rm::Mem(src));
    }

    /// Eight f16 from memory, converted to f32 (F16C).
    fn vcvtph2ps(&mut self, dst: u8, src: Mem) {
        self.vex256(Map::X0f38, Pp::X66, 0x13, dst, 0, Rm::Mem(src));
    }

    fn vcvtdq2ps(&mut self, dst: u8, src: u8) {
        self.vex256(Map::X0f, Pp::None, 0x5B, dst, 0, Rm::Reg(src));
    }

    fn vmulps(&mut self, dst: u8, x: u8, y: u8) {
        self.vex256(Map::X0f, Pp::None, 0x59, dst, x, Rm::Reg(y));
    }

    fn vsubps(&mut self, dst: u8, x: u8, y: u8) {
        self.vex256(Map::X0f, Pp::None, 0x5C, dst, x, Rm::Reg(y));
    }

    fn vaddps(&mut self, dst: u8, x: u8, y: u8) {
        self.vex256(Map::X0f, Pp::None, 0x58, dst, x, Rm::Reg(y));
    }

    /// `vmovd xmm, r32`.
    fn vmovd_from_gpr(&mut self, dst: u8, src: Gpr) {
        self.vex(Map::X0f, Pp::X66, false, 0x6E, dst, 0, Rm::Reg(src as u8));
    }

    /// Sets every 32-bit lane of `dst` to `value` (through eax).
    fn splat_u32(&mut self, dst: u8, value: u32) {
        self.mov_imm32(Gpr::Rax, value);
        self.vmovd_from_gpr(dst, Gpr::Rax);
        self.vpbroadcastd(dst, Rm::Reg(dst));
    }

    /// `mov r32, imm32` (zero-extends into the 64-bit register).
    fn mov_imm32(&mut self, dst: Gpr, imm: u32) {
        let d = dst as u8;
        if d >= 8 {
            self.code.push(0x41);
        }
        self.code.push(0xB8 + (d & 7));
        self.code.extend(imm.to_le_bytes());
    }

    /// `prefetcht0`: the line at `at` into every cache level.
    fn prefetch_t0(&mut self, at: Mem) {
        let rm = Rm::Mem(at);
        let (x, b) = Self::rm_ext(&rm);
        if x | b != 0 {
            self.code.push(0x40 | (x << 1) | b);
        }
        self.code.extend([0x0F, 0x18]);
        self.modrm(1, &rm);
    }

    /// `dst += imm` (64-bit), the 8-bit immediate form where it fits.
    fn add_imm(&mut self, dst: Gpr, imm: i32) {
        if let Ok(imm) = i8::try_from(imm) {
            self.add_imm8(dst, imm);
        } else {
            let rm = Rm::Reg(dst as u8);
            self.rex_w(0, &rm);
            self.code.push(0x81);
            self.modrm(0, &rm);
            self.code.extend(imm.to_le_bytes());
        }
    }

    fn vmovups_load(&mut self, dst: u8, src: Mem) {
        self.vex256(Map::X0f, Pp::None, 0x10, dst, 0, Rm::Mem(src));
    }

    fn vmovups_store(&mut self, dst: Mem, src: u8) {
        self.vex256(Map::X0f, Pp::None, 0x11, src, 0, Rm::Mem(dst));
    }

    fn vbroadcastss(&mut self, dst: u8, src: Mem) {
        self.vex256(Map::X0f38, Pp::X66, 0x18, dst, 0, Rm::Mem(src));
    }

    /// `acc += x * y` (one rounding).
    fn vfmadd231ps(&mut self, acc: u8, x: u8, y: u8) {
        self.vex256(Map::X0f38, Pp::X66, 0xB8, acc, x, Rm::Reg(y));
    }

    fn vaddps_mem(&mut self, dst: u8, x: u8, y: Mem) {
        self.vex256(Map::X0f, Pp::None, 0x58, dst, x, Rm::Mem(y));
    }

    fn vxorps(&mut self, dst: u8, x: u8, y: u8) {
        self.vex256(Map::X0f, Pp::None, 0x57, dst, x, Rm::Reg(y));
    }

    fn vzeroupper(&mut self) {
        self.code.extend([0xC5, 0xF8, 0x77]);
    }

    fn rex_w(&mut self, reg: u8, rm: &Rm) {
        let (x, b) = Self::rm_ext(rm);
        self.code.push(0x48 | ((reg >> 3) << 2) | (x << 1) | b);
    }

    fn lea(&mut self, dst: Gpr, src: Mem) {
        let rm = Rm::Mem(src);
        self.rex_w(dst as u8, &rm);
        self.code.push(0x8D);
        self.modrm(dst as u8, &rm);
    }

    /// `dst += imm` (64-bit, 8-bit immediate).
    fn add_imm8(&mut self, dst: Gpr, imm: i8) {
        let rm = Rm::Reg(dst as u8);
        self.rex_w(0, &rm);
        self.code.push(0x83);
        self.modrm(0, &rm);
        self.code.push(imm as u8);
    }

    /// `dst -= 1` (64-bit), setting ZF.
    fn dec(&mut self, dst: Gpr) {
        let rm = Rm::Reg(dst as u8);
        self.rex_w(1, &rm);
        self.code.push(0xFF);
        self.modrm(1, &rm);
    }

    /// `jnz` back to offset `target` (before the jump).
    fn jnz_back(&mut self, target: usize) {
        let after_short = self.code.len() + 2;
        let rel = target as i64 - after_short as i64;
        if let Ok(r) = i8::try_from(rel) {
            self.code.extend([0x75, r as u8]);
        } else {
            let rel = target as i64 - (self.code.len() + 6) as i64;
            self.code.extend([0x0F, 0x85]);
            self.code.extend((rel as i32).to_le_bytes());
        }
    }

    fn ret(&mut self) {
        self.code.push(0xC3);
    }

    /// A legacy SSE instruction: `[prefix] [REX] 0F [38] opcode reg, rm`.
    fn sse(&mut self, prefix: Option<u8>, map38: bool, opcode: u8, reg: u8, rm: Rm) {
        self.code.extend(prefix);
        let (x, b) = Self::rm_ext(&rm);
        let r = reg >> 3;
        if r | x | b != 0 {
            self.code.push(0x40 | (r << 2) | (x << 1) | b);
        }
        self.code.push(0x0F);
        if map38 {
            self.code.push(0x38);
        }
        self.code.push(opcode);
        self.modrm(reg, &rm);
    }

    /// `op dst, src` with the 66 prefix (SSE2 integer forms), register operands.
    fn sse66(&mut self, opcode: u8, dst: u8, src: u8) {
        self.sse(Some(0x66), false, opcode, dst, Rm::Reg(src));
    }

    /// `op dst, src` without prefix (packed single forms), register operands.
    fn sse_ps(&mut self, opcode: u8, dst: u8, src: u8) {
        self.sse(None, false, opcode, dst, Rm::Reg(src));
    }

    fn movdqu_load(&mut self, dst: u8, src: Mem) {
        self.sse(Some(0xF3), false, 0x6F, dst, Rm::Mem(src));
    }

    fn movups_load(&mut self, dst: u8, src: Mem) {
        self.sse(None, false, 0x10, dst, Rm::Mem(src));
    }

    fn movups_store(&mut self, dst: Mem, src: u8) {
        self.sse(None, false, 0x11, src, Rm::Mem(dst));
    }

    fn movss_load(&mut self, dst: u8, src: Mem) {
        self.sse(Some(0xF3), false, 0x10, dst, Rm::Mem(src));
    }

    /// `dst = src`, all 128 bits.
    fn movdqa(&mut self, dst: u8, src: u8) {
        self.sse66(0x6F, dst, src);
    }

    /// Copies lane 0 of `dst` to every lane.
    fn splat_lane0_ps(&mut self, dst: u8) {
        self.sse(None, false, 0xC6, dst, Rm::Reg(dst));
        self.code.push(0);
    }

    /// A 128-bit shift by an immediate: `opcode /ext dst, imm`.
    fn sse_shift_imm(&mut self, opcode: u8, ext: u8, dst: u8, imm: u8) {
        self.sse(Some(0x66), false, opcode, ext, Rm::Reg(dst));
        self.code.push(imm);
    }

    fn pmaddubsw(&mut self, dst: u8, src: u8) {
        self.sse(Some(0x66), true, 0x04, dst, Rm::Reg(src));
    }

    fn pmovzxbd(&mut self, dst: u8, src: Mem) {
        self.sse(Some(0x66), true, 0x31, dst, Rm::Mem(src));
    }

    fn pmovzxwd(&mut self, dst: u8, src: Mem) {
        self.sse(Some(0x66), true, 0x33, dst, Rm::Mem(src));
    }

    /// Sets every 32-bit lane of xmm `dst` to `value` (through eax; `movd`, `pshufd`).
    fn sse_splat_u32(&mut self, dst: u8, value: u32) {
        self.mov_imm32(Gpr::Rax, value);
        self.sse(Some(0x66), false, 0x6E, dst, Rm::Reg(Gpr::Rax as u8));
        self.sse66(0x70, dst, dst);
        self.code.push(0);
    }
}

/// Opcodes (after 0F, with the 66 prefix for integers) shared by the legacy SSE forms and
/// their VEX counterparts.
mod op {
    pub const PAND: u8 = 0xDB;
    pub const POR: u8 = 0xEB;
    pub const PXOR: u8 = 0xEF;
    pub const PADDW: u8 = 0xFD;
    pub const PADDD: u8 = 0xFE;
    pub const PMADDWD: u8 = 0xF5;
    pub const CVTDQ2PS: u8 = 0x5B;
    pub const MULPS: u8 = 0x59;
    pub const SUBPS: u8 = 0x5C;
    pub const ADDPS: u8 = 0x58;
    pub const XORPS: u8 = 0x57;
    /// Shifts by an immediate: 16-bit lanes (`/2` right logical), 32-bit lanes (`/6` left).
    pub const SHIFT_W: u8 = 0x71;
    pub const SHIFT_D: u8 = 0x72;
}

/// `fn(a, lda_bytes, b, y, ldy_bytes, kc)` (System V): for `r < rows` and `c < 16`,
/// `y[r][c] (+)= sum_{p < kc} a[r][p] * b[p][c]`, where row `r` of A starts at
/// `a + r * lda_bytes` (f32, contiguous in p), B is one packed panel (`kc` rows of 16
/// contiguous f32) and row `r` of Y starts at `y + r * ldy_bytes`; `+=` when `accumulate`.
/// Each lane sums in order of p with one fused multiply-add per step, like the Cranelift
/// kernels with `contract`. `kc` must be at least 1.
///
/// Registers: rdi, rsi, rdx, rcx, r8, r9 are the arguments; rax and r10 point at rows 3 of A
/// and Y; ymm0-11 accumulate (row r in ymm 2r, 2r+1), ymm12-13 hold the panel row, ymm14-15
/// the broadcasts (alternating, so that consecutive rows do not wait on one register).
fn sgemm_avx2(rows: usize, accumulate: bool) -> Vec<u8> {
    debug_assert!((1..=SGEMM_AVX2_MAX_ROWS).contains(&rows));
    let (a, lda, b, y, ldy, kc) = (Gpr::Rdi, Gpr::Rsi, Gpr::Rdx, Gpr::Rcx, Gpr::R8, Gpr::R9);
    let (a3, y3) = (Gpr::Rax, Gpr::R10);
    // Row r of a matrix whose row 0 is at `base`, row 3 at `base3`, rows `stride` apart.
    let row = |base: Gpr, base3: Gpr, stride: Gpr, r: usize, disp: i32| match r {
        0 => mem(base, None, disp),
        1 => mem(base, Some((stride, 1)), disp),
        2 => mem(base, Some((stride, 2)), disp),
        3 => mem(base3, None, disp),
        4 => mem(base3, Some((stride, 1)), disp),
        _ => mem(base3, Some((stride, 2)), disp),
    };
    let mut s = Asm::default();
    for r in 0..2 * rows as u8 {
        s.vxorps(r, r, r);
    }
    if rows > 3 {
        s.lea(a3, mem(a, Some((lda, 2)), 0));
        s.lea(a3, mem(a3, Some((lda, 1)), 0));
    }
    let top = s.code.len();
    s.vmovups_load(12, mem(b, None, 0));
    s.vmovups_load(13, mem(b, None, 32));
    for r in 0..rows {
        let t = 14 + (r % 2) as u8;
        s.vbroadcastss(t, row(a, a3, lda, r, 0));
        s.vfmadd231ps(2 * r as u8, 12, t);
        s.vfmadd231ps(2 * r as u8 + 1, 13, t);
    }
    s.add_imm8(a, 4);
    if rows > 3 {
        s.add_imm8(a3, 4);
    }
    s.add_imm8(b, 64);
    s.dec(kc);
    s.jnz_back(top);
    if rows > 3 {
        s.lea(y3, mem(y, Some((ldy, 2)), 0));
        s.lea(y3, mem(y3, Some((ldy, 1)), 0));
    }
    for r in 0..rows {
        for half in 0..2u8 {
            let acc = 2 * r as u8 + half;
            let at = row(y, y3, ldy, r, 32 * half as i32);
            if accumulate {
                s.vaddps_mem(acc, acc, at);
            }
            s.vmovups_store(at, acc);
        }
    }
    s.vzeroupper();
    s.ret();
    s.code
}

/// Bytes ahead of the weight stream that a [`Q4Int8Tile`] prefetches (one `prefetcht0` per
/// 64 bytes streamed). The hardware prefetchers stop at 4 KiB pages; measured on the
/// 2048 x 5632 mat-vec (one thread), 4 KiB ahead took 3.4 ms, 8 KiB 3.3 ms and 12 KiB 3.2-3.3
/// ms, against 4.1 ms without, and 5.7 ms at 512 bytes, too close to help.
const Q4_PREFETCH_AHEAD: i32 = 8192;

/// Bytes between consecutive words of four activation codes in the `a_codes` argument of a
/// [`Q4Int8Tile`] (each word is stored four times, as the Cranelift kernels load it).
pub const Q4_ACT_WORD_BYTES: usize = 16;

/// Registers of [`q4_int8`] for a span of `n` vectors (ymm with AVX2, xmm with SSE).
struct Q4Regs {
    n: u8,
}

impl Q4Regs {
    /// i32 block sums: of the low-nibble rows (with VNNI) or of all rows.
    fn sum(&self, v: u8) -> u8 {
        v
    }
    /// With VNNI: i32 sums of the high nibbles, kept as 16 x the value (masked in place);
    /// without: i16 sums of up to four words.
    fn partial(&self, v: u8) -> u8 {
        self.n + v
    }
    /// f32 running totals of the columns.
    fn total(&self, v: u8) -> u8 {
        2 * self.n + v
    }
    fn low_mask(&self) -> u8 {
        3 * self.n
    }
    fn high_mask(&self) -> u8 {
        3 * self.n + 1
    }
    fn act_low(&self) -> u8 {
        3 * self.n + 2
    }
    fn act_high(&self) -> u8 {
        3 * self.n + 3
    }
    fn t0(&self) -> u8 {
        3 * self.n + 4
    }
    fn t1(&self) -> u8 {
        3 * self.n + 5
    }
    /// i16 ones (`pmaddwd` widening, without VNNI).
    fn ones(&self) -> u8 {
        3 * self.n + 6
    }
}

/// Words of a block's loop body per iteration: up to four (without VNNI, the most whose i16
/// sums cannot overflow: each word adds at most 2 x 2 x 15 x 127), dividing `words`.
fn q4_unroll(words: usize) -> usize {
    [4, 2, 1]
        .into_iter()
        .find(|u| words.is_multiple_of(*u))
        .unwrap_or(1)
}

/// `fn(data, a_codes, a_scales, a_sums, y)` (System V): the [`Q4Int8Tile`] product of one
/// row of A and one span, stored to `y[0 .. columns]`. `data` is the span's stream,
/// `a_codes` the row's activation words ([`Q4_ACT_WORD_BYTES`] apart, the low four rows of
/// weight word `o` at word `2o`, the high four at `2o + 1`), `a_scales` and `a_sums` the
/// row's f32 block tables.
///
/// Per weight word and vector: the low nibbles (masked with 0x0F) and the high ones are
/// dotted with the activation words (broadcast from memory with AVX2; SSE loads the four
/// stored copies). With VNNI the high nibbles stay in place (`vpand` with 0xF0), so their
/// sums are 16 x the dot (exact; shifted back once per block) and each word costs four
/// instructions per vector; otherwise they are shifted down, multiplied to i16 pairs, and
/// summed in i16 for up to four words before widening. For every 64 bytes of weights there
/// is one `prefetcht0` [`Q4_PREFETCH_AHEAD`] bytes ahead.
///
/// Registers: rdi, rsi, rdx, rcx, r8 are the arguments; rdi, rsi, rdx and rcx advance
/// through their streams; r9 counts blocks, r10 loop iterations, eax builds constants;
/// vector registers as in [`Q4Regs`].
fn q4_int8(t: &Q4Int8Tile) -> Vec<u8> {
    debug_assert!((1..=2).contains(&t.vectors));
    let r = Q4Regs { n: t.vectors };
    let sse = t.dot == Q4Dot::Sse;
    let mut s = Asm::default();
    for v in 0..r.n {
        if sse {
            s.sse_ps(op::XORPS, r.total(v), r.total(v));
        } else {
            s.vxorps(r.total(v), r.total(v), r.total(v));
        }
    }
    let splat = |s: &mut Asm, reg: u8, value: u32| {
        if sse {
            s.sse_splat_u32(reg, value)
        } else {
            s.splat_u32(reg, value)
        }
    };
    splat(&mut s, r.low_mask(), 0x0F0F_0F0F);
    if !sse {
        splat(&mut s, r.high_mask(), 0xF0F0_F0F0);
    }
    if t.dot != Q4Dot::AvxVnni {
        splat(&mut s, r.ones(), 0x0001_0001);
    }
    if sse && t.half_scales {
        splat(&mut s, r.high_mask(), 0x7FFF);
        splat(&mut s, SSE_F16_SIGN, 0x8000);
        splat(&mut s, SSE_F16_REBIAS, 0x7780_0000);
    }
    if t.blocks > 0 {
        s.mov_imm32(Gpr::R9, t.blocks as u32);
        let top = s.code.len();
        q4_block(&mut s, t, &r, t.block_words as usize);
        s.dec(Gpr::R9);
        s.jnz_back(top);
    }
    if t.tail_words > 0 {
        q4_block(&mut s, t, &r, t.tail_words as usize);
    }
    let vector_bytes = t.dot.vector_bytes() as i32;
    for v in 0..r.n {
        let at = mem(Gpr::R8, None, vector_bytes * v as i32);
        if sse {
            s.movups_store(at, r.total(v));
        } else {
            s.vmovups_store(at, r.total(v));
        }
    }
    if !sse {
        s.vzeroupper();
    }
    s.ret();
    s.code
}

/// SSE registers of the f16 scale conversion (with the 0x7FFF mask in
/// [`Q4Regs::high_mask`]): the sign mask, 2^112 (the exponent rebias, as f32) and a
/// temporary.
const SSE_F16_SIGN: u8 = 13;
const SSE_F16_REBIAS: u8 = 14;
const SSE_F16_TEMP: u8 = 15;

/// One block of `words` weight words per column: the integer sums, then the block's
/// correction and scales added to the totals; the streams advance past the block.
fn q4_block(s: &mut Asm, t: &Q4Int8Tile, r: &Q4Regs, words: usize) {
    let (data, act, a_scales, a_sums) = (Gpr::Rdi, Gpr::Rsi, Gpr::Rdx, Gpr::Rcx);
    let (n, sse, vnni) = (r.n, t.dot == Q4Dot::Sse, t.dot == Q4Dot::AvxVnni);
    for v in 0..n {
        if sse {
            s.sse66(op::PXOR, r.sum(v), r.sum(v));
        } else {
            s.vpxor(r.sum(v), r.sum(v), r.sum(v));
        }
        if vnni {
            s.vpxor(r.partial(v), r.partial(v), r.partial(v));
        }
    }
    let unroll = q4_unroll(words);
    let iterations = words / unroll;
    if iterations > 1 {
        s.mov_imm32(Gpr::R10, iterations as u32);
    }
    let top = s.code.len();
    let word_bytes = 4 * t.columns() as i32;
    let vector_bytes = t.dot.vector_bytes() as i32;
    for j in 0..unroll as i32 {
        let from = word_bytes * j;
        for line in (from..from + word_bytes).filter(|b| b % 64 == 0) {
            s.prefetch_t0(mem(data, None, line + Q4_PREFETCH_AHEAD));
        }
        let act_low = mem(act, None, 2 * Q4_ACT_WORD_BYTES as i32 * j);
        let act_high = mem(act, None, act_low.disp + Q4_ACT_WORD_BYTES as i32);
        if sse {
            s.movdqu_load(r.act_low(), act_low);
            s.movdqu_load(r.act_high(), act_high);
        } else {
            s.vpbroadcastd(r.act_low(), Rm::Mem(act_low));
            s.vpbroadcastd(r.act_high(), Rm::Mem(act_high));
        }
        for v in 0..n {
            let w = mem(data, None, from + vector_bytes * v as i32);
            let (t0, t1, p) = (r.t0(), r.t1(), r.partial(v));
            if !sse {
                s.vpand(t0, r.low_mask(), Rm::Mem(w));
                s.vpand(t1, r.high_mask(), Rm::Mem(w));
            }
            match t.dot {
                Q4Dot::AvxVnni => {
                    s.vpdpbusd(r.sum(v), t0, r.act_low());
                    s.vpdpbusd(p, t1, r.act_high());
                }
                Q4Dot::Avx2 => {
                    s.vpsrlw(t1, t1, 4);
                    s.vpmaddubsw(t0, t0, r.act_low());
                    s.vpmaddubsw(t1, t1, r.act_high());
                    if j == 0 {
                        s.vpaddw(p, t0, t1);
                    } else {
                        s.vpaddw(p, p, t0);
                        s.vpaddw(p, p, t1);
                    }
                }
                Q4Dot::Sse => {
                    s.movdqu_load(t0, w);
                    s.movdqa(t1, t0);
                    s.sse_shift_imm(op::SHIFT_W, 2, t1, 4);
                    s.sse66(op::PAND, t0, r.low_mask());
                    s.sse66(op::PAND, t1, r.low_mask());
                    s.pmaddubsw(t0, r.act_low());
                    s.pmaddubsw(t1, r.act_high());
                    s.sse66(op::PADDW, t0, t1);
                    if j == 0 {
                        s.movdqa(p, t0);
                    } else {
                        s.sse66(op::PADDW, p, t0);
                    }
                }
            }
        }
    }
    for v in 0..n {
        match t.dot {
            Q4Dot::AvxVnni => {}
            Q4Dot::Avx2 => {
                s.vpmaddwd(r.t0(), r.partial(v), r.ones());
                s.vpaddd(r.sum(v), r.sum(v), r.t0());
            }
            Q4Dot::Sse => {
                s.sse66(op::PMADDWD, r.partial(v), r.ones());
                s.sse66(op::PADDD, r.sum(v), r.partial(v));
            }
        }
    }
    s.add_imm(act, 2 * Q4_ACT_WORD_BYTES as i32 * unroll as i32);
    s.add_imm(data, word_bytes * unroll as i32);
    if iterations > 1 {
        s.dec(Gpr::R10);
        s.jnz_back(top);
    }
    // (dot - zp * a_sum) * (scale * a_scale), added to the totals; `data` is at the tables.
    let zero_points_at = (t.columns() * t.scale_bytes()) as i32;
    let lanes = vector_bytes / 4;
    if sse {
        block_tables_sse(s, t, r, zero_points_at);
    } else {
        s.vbroadcastss(r.act_low(), mem(a_sums, None, 0));
        s.vbroadcastss(r.act_high(), mem(a_scales, None, 0));
        for v in 0..n {
            let sum = r.sum(v);
            if vnni {
                s.vpsrad(r.partial(v), r.partial(v), 4);
                s.vpaddd(sum, sum, r.partial(v));
            }
            s.vcvtdq2ps(sum, sum);
            s.vpmovzxbd(r.t0(), mem(data, None, zero_points_at + lanes * v as i32));
            s.vcvtdq2ps(r.t0(), r.t0());
            s.vmulps(r.t0(), r.t0(), r.act_low());
            s.vsubps(sum, sum, r.t0());
            if t.half_scales {
                s.vcvtph2ps(r.t1(), mem(data, None, 2 * lanes * v as i32));
            } else {
                s.vmovups_load(r.t1(), mem(data, None, 4 * lanes * v as i32));
            }
            s.vmulps(r.t1(), r.t1(), r.act_high());
            s.vmulps(sum, sum, r.t1());
            s.vaddps(r.total(v), r.total(v), sum);
        }
    }
    let tables = t.record_bytes(words) - words * word_bytes as usize;
    s.add_imm(data, tables as i32);
    s.add_imm8(a_scales, 4);
    s.add_imm8(a_sums, 4);
}

/// The float steps of a block on SSE (see [`q4_block`]): f16 scales are widened exactly by
/// moving their magnitude into f32 position and multiplying by 2^112, as the Cranelift
/// kernels do (the lowering keeps scales with infinities or NaNs off this tile).
fn block_tables_sse(s: &mut Asm, t: &Q4Int8Tile, r: &Q4Regs, zero_points_at: i32) {
    let (data, a_scales, a_sums) = (Gpr::Rdi, Gpr::Rdx, Gpr::Rcx);
    s.movss_load(r.act_low(), mem(a_sums, None, 0));
    s.splat_lane0_ps(r.act_low());
    s.movss_load(r.act_high(), mem(a_scales, None, 0));
    s.splat_lane0_ps(r.act_high());
    for v in 0..r.n {
        let (sum, t0, t1) = (r.sum(v), r.t0(), r.t1());
        s.sse_ps(op::CVTDQ2PS, sum, sum);
        s.pmovzxbd(t0, mem(data, None, zero_points_at + 4 * v as i32));
        s.sse_ps(op::CVTDQ2PS, t0, t0);
        s.sse_ps(op::MULPS, t0, r.act_low());
        s.sse_ps(op::SUBPS, sum, t0);
        if t.half_scales {
            s.pmovzxwd(t1, mem(data, None, 8 * v as i32));
            s.movdqa(SSE_F16_TEMP, t1);
            s.sse66(op::PAND, t1, r.high_mask());
            s.sse_shift_imm(op::SHIFT_D, 6, t1, 13);
            s.sse66(op::PAND, SSE_F16_TEMP, SSE_F16_SIGN);
            s.sse_shift_imm(op::SHIFT_D, 6, SSE_F16_TEMP, 16);
            s.sse66(op::POR, t1, SSE_F16_TEMP);
            s.sse_ps(op::MULPS, t1, SSE_F16_REBIAS);
        } else {
            s.movups_load(t1, mem(data, None, 16 * v as i32));
        }
        s.sse_ps(op::MULPS, t1, r.act_high());
        s.sse_ps(op::MULPS, sum, t1);
        s.sse_ps(op::ADDPS, r.total(v), sum);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each instruction form against the bytes GNU objdump decodes to the same text.
    #[test]
    fn encodings_match_the_reference_assembler() {
        let cases: Vec<(&str, Box<dyn Fn(&mut Asm)>, &[u8])> = vec![
            (
                "vmovups (%rdx),%ymm12",
                Box::new(|s| s.vmovups_load(12, mem(Gpr::Rdx, None, 0))),
                &[0xc4, 0x61, 0x7c, 0x10, 0x22],
            ),
            (
                "vmovups 0x20(%rdx),%ymm13",
                Box::new(|s| s.vmovups_load(13, mem(Gpr::Rdx, None, 32))),
                &[0xc4, 0x61, 0x7c, 0x10, 0x6a, 0x20],
            ),
            (
                "vmovups %ymm11,0x20(%r10,%r8,2)",
                Box::new(|s| s.vmovups_store(mem(Gpr::R10, Some((Gpr::R8, 2)), 32), 11)),
                &[0xc4, 0x01, 0x7c, 0x11, 0x5c, 0x42, 0x20],
            ),
            (
                "vbroadcastss (%rdi,%rsi,1),%ymm15",
                Box::new(|s| s.vbroadcastss(15, mem(Gpr::Rdi, Some((Gpr::Rsi, 1)), 0))),
                &[0xc4, 0x62, 0x7d, 0x18, 0x3c, 0x37],
            ),
            (
                "vbroadcastss (%rax),%ymm14",
                Box::new(|s| s.vbroadcastss(14, mem(Gpr::Rax, None, 0))),
                &[0xc4, 0x62, 0x7d, 0x18, 0x30],
            ),
            (
                "vfmadd231ps %ymm14,%ymm12,%ymm0",
                Box::new(|s| s.vfmadd231ps(0, 12, 14)),
                &[0xc4, 0xc2, 0x1d, 0xb8, 0xc6],
            ),
            (
                "vfmadd231ps %ymm15,%ymm13,%ymm11",
                Box::new(|s| s.vfmadd231ps(11, 13, 15)),
                &[0xc4, 0x42, 0x15, 0xb8, 0xdf],
            ),
            (
                "vaddps 0x20(%rcx,%r8,1),%ymm3,%ymm3",
                Box::new(|s| s.vaddps_mem(3, 3, mem(Gpr::Rcx, Some((Gpr::R8, 1)), 32))),
                &[0xc4, 0xa1, 0x64, 0x58, 0x5c, 0x01, 0x20],
            ),
            (
                "vxorps %ymm9,%ymm9,%ymm9",
                Box::new(|s| s.vxorps(9, 9, 9)),
                &[0xc4, 0x41, 0x34, 0x57, 0xc9],
            ),
            (
                "lea (%rdi,%rsi,2),%rax",
                Box::new(|s| s.lea(Gpr::Rax, mem(Gpr::Rdi, Some((Gpr::Rsi, 2)), 0))),
                &[0x48, 0x8d, 0x04, 0x77],
            ),
            (
                "lea (%r10,%r8,1),%r10",
                Box::new(|s| s.lea(Gpr::R10, mem(Gpr::R10, Some((Gpr::R8, 1)), 0))),
                &[0x4f, 0x8d, 0x14, 0x02],
            ),
            (
                "add $0x40,%rdx",
                Box::new(|s| s.add_imm8(Gpr::Rdx, 64)),
                &[0x48, 0x83, 0xc2, 0x40],
            ),
            ("dec %r9", Box::new(|s| s.dec(Gpr::R9)), &[0x49, 0xff, 0xc9]),
            (
                "vzeroupper",
                Box::new(|s| s.vzeroupper()),
                &[0xc5, 0xf8, 0x77],
            ),
            (
                "movdqu 0x20(%rdi),%xmm10",
                Box::new(|s| s.movdqu_load(10, mem(Gpr::Rdi, None, 32))),
                &[0xf3, 0x44, 0x0f, 0x6f, 0x57, 0x20],
            ),
            (
                "movdqu 0x10(%rsi),%xmm9",
                Box::new(|s| s.movdqu_load(9, mem(Gpr::Rsi, None, 16))),
                &[0xf3, 0x44, 0x0f, 0x6f, 0x4e, 0x10],
            ),
            (
                "movdqa %xmm10,%xmm11",
                Box::new(|s| s.movdqa(11, 10)),
                &[0x66, 0x45, 0x0f, 0x6f, 0xda],
            ),
            (
                "movdqa %xmm1,%xmm15",
                Box::new(|s| s.movdqa(15, 1)),
                &[0x66, 0x44, 0x0f, 0x6f, 0xf9],
            ),
            (
                "psrlw $0x4,%xmm11",
                Box::new(|s| s.sse_shift_imm(op::SHIFT_W, 2, 11, 4)),
                &[0x66, 0x41, 0x0f, 0x71, 0xd3, 0x04],
            ),
            (
                "pslld $0xd,%xmm11",
                Box::new(|s| s.sse_shift_imm(op::SHIFT_D, 6, 11, 13)),
                &[0x66, 0x41, 0x0f, 0x72, 0xf3, 0x0d],
            ),
            (
                "pand %xmm6,%xmm10",
                Box::new(|s| s.sse66(op::PAND, 10, 6)),
                &[0x66, 0x44, 0x0f, 0xdb, 0xd6],
            ),
            (
                "por %xmm15,%xmm11",
                Box::new(|s| s.sse66(op::POR, 11, 15)),
                &[0x66, 0x45, 0x0f, 0xeb, 0xdf],
            ),
            (
                "pxor %xmm1,%xmm1",
                Box::new(|s| s.sse66(op::PXOR, 1, 1)),
                &[0x66, 0x0f, 0xef, 0xc9],
            ),
            (
                "pmaddubsw %xmm8,%xmm10",
                Box::new(|s| s.pmaddubsw(10, 8)),
                &[0x66, 0x45, 0x0f, 0x38, 0x04, 0xd0],
            ),
            (
                "paddw %xmm10,%xmm2",
                Box::new(|s| s.sse66(op::PADDW, 2, 10)),
                &[0x66, 0x41, 0x0f, 0xfd, 0xd2],
            ),
            (
                "pmaddwd %xmm12,%xmm2",
                Box::new(|s| s.sse66(op::PMADDWD, 2, 12)),
                &[0x66, 0x41, 0x0f, 0xf5, 0xd4],
            ),
            (
                "paddd %xmm2,%xmm0",
                Box::new(|s| s.sse66(op::PADDD, 0, 2)),
                &[0x66, 0x0f, 0xfe, 0xc2],
            ),
            (
                "pmovzxbd 0x24(%rdi),%xmm10",
                Box::new(|s| s.pmovzxbd(10, mem(Gpr::Rdi, None, 0x24))),
                &[0x66, 0x44, 0x0f, 0x38, 0x31, 0x57, 0x24],
            ),
            (
                "pmovzxwd 0x8(%rdi),%xmm11",
                Box::new(|s| s.pmovzxwd(11, mem(Gpr::Rdi, None, 8))),
                &[0x66, 0x44, 0x0f, 0x38, 0x33, 0x5f, 0x08],
            ),
            (
                "cvtdq2ps %xmm0,%xmm0",
                Box::new(|s| s.sse_ps(op::CVTDQ2PS, 0, 0)),
                &[0x0f, 0x5b, 0xc0],
            ),
            (
                "mulps %xmm14,%xmm11",
                Box::new(|s| s.sse_ps(op::MULPS, 11, 14)),
                &[0x45, 0x0f, 0x59, 0xde],
            ),
            (
                "subps %xmm10,%xmm0",
                Box::new(|s| s.sse_ps(op::SUBPS, 0, 10)),
                &[0x41, 0x0f, 0x5c, 0xc2],
            ),
            (
                "addps %xmm0,%xmm4",
                Box::new(|s| s.sse_ps(op::ADDPS, 4, 0)),
                &[0x0f, 0x58, 0xe0],
            ),
            (
                "xorps %xmm5,%xmm5",
                Box::new(|s| s.sse_ps(op::XORPS, 5, 5)),
                &[0x0f, 0x57, 0xed],
            ),
            (
                "movups 0x10(%rdi),%xmm11",
                Box::new(|s| s.movups_load(11, mem(Gpr::Rdi, None, 16))),
                &[0x44, 0x0f, 0x10, 0x5f, 0x10],
            ),
            (
                "movups %xmm5,0x10(%r8)",
                Box::new(|s| s.movups_store(mem(Gpr::R8, None, 16), 5)),
                &[0x41, 0x0f, 0x11, 0x68, 0x10],
            ),
            (
                "movss (%rcx),%xmm8",
                Box::new(|s| s.movss_load(8, mem(Gpr::Rcx, None, 0))),
                &[0xf3, 0x44, 0x0f, 0x10, 0x01],
            ),
            (
                "shufps $0x0,%xmm8,%xmm8",
                Box::new(|s| s.splat_lane0_ps(8)),
                &[0x45, 0x0f, 0xc6, 0xc0, 0x00],
            ),
            (
                "movd %eax,%xmm12",
                Box::new(|s| s.sse(Some(0x66), false, 0x6E, 12, Rm::Reg(Gpr::Rax as u8))),
                &[0x66, 0x44, 0x0f, 0x6e, 0xe0],
            ),
            (
                "pshufd $0x0,%xmm12,%xmm12",
                Box::new(|s| {
                    s.sse66(0x70, 12, 12);
                    s.code.push(0);
                }),
                &[0x66, 0x45, 0x0f, 0x70, 0xe4, 0x00],
            ),
            (
                "vpand (%rdi),%ymm6,%ymm10",
                Box::new(|s| s.vpand(10, 6, Rm::Mem(mem(Gpr::Rdi, None, 0)))),
                &[0xc4, 0x61, 0x4d, 0xdb, 0x17],
            ),
            (
                "vpand 0x20(%rdi),%ymm7,%ymm11",
                Box::new(|s| s.vpand(11, 7, Rm::Mem(mem(Gpr::Rdi, None, 32)))),
                &[0xc4, 0x61, 0x45, 0xdb, 0x5f, 0x20],
            ),
            (
                "vpxor %ymm1,%ymm1,%ymm1",
                Box::new(|s| s.vpxor(1, 1, 1)),
                &[0xc4, 0xe1, 0x75, 0xef, 0xc9],
            ),
            (
                "vpsrlw $0x4,%ymm11,%ymm11",
                Box::new(|s| s.vpsrlw(11, 11, 4)),
                &[0xc4, 0xc1, 0x25, 0x71, 0xd3, 0x04],
            ),
            (
                "vpsrad $0x4,%ymm2,%ymm2",
                Box::new(|s| s.vpsrad(2, 2, 4)),
                &[0xc4, 0xe1, 0x6d, 0x72, 0xe2, 0x04],
            ),
            (
                "vpaddw %ymm11,%ymm10,%ymm2",
                Box::new(|s| s.vpaddw(2, 10, 11)),
                &[0xc4, 0xc1, 0x2d, 0xfd, 0xd3],
            ),
            (
                "vpaddd %ymm10,%ymm0,%ymm0",
                Box::new(|s| s.vpaddd(0, 0, 10)),
                &[0xc4, 0xc1, 0x7d, 0xfe, 0xc2],
            ),
            (
                "vpbroadcastd 0x10(%rsi),%ymm9",
                Box::new(|s| s.vpbroadcastd(9, Rm::Mem(mem(Gpr::Rsi, None, 16)))),
                &[0xc4, 0x62, 0x7d, 0x58, 0x4e, 0x10],
            ),
            (
                "vpbroadcastd %xmm12,%ymm12",
                Box::new(|s| s.vpbroadcastd(12, Rm::Reg(12))),
                &[0xc4, 0x42, 0x7d, 0x58, 0xe4],
            ),
            (
                "{vex} vpdpbusd %ymm8,%ymm10,%ymm0",
                Box::new(|s| s.vpdpbusd(0, 10, 8)),
                &[0xc4, 0xc2, 0x2d, 0x50, 0xc0],
            ),
            (
                "vpmaddubsw %ymm8,%ymm10,%ymm10",
                Box::new(|s| s.vpmaddubsw(10, 10, 8)),
                &[0xc4, 0x42, 0x2d, 0x04, 0xd0],
            ),
            (
                "vpmaddwd %ymm12,%ymm2,%ymm10",
                Box::new(|s| s.vpmaddwd(10, 2, 12)),
                &[0xc4, 0x41, 0x6d, 0xf5, 0xd4],
            ),
            (
                "vpmovzxbd 0x48(%rdi),%ymm10",
                Box::new(|s| s.vpmovzxbd(10, mem(Gpr::Rdi, None, 0x48))),
                &[0xc4, 0x62, 0x7d, 0x31, 0x57, 0x48],
            ),
            (
                "vcvtph2ps 0x10(%rdi),%ymm11",
                Box::new(|s| s.vcvtph2ps(11, mem(Gpr::Rdi, None, 16))),
                &[0xc4, 0x62, 0x7d, 0x13, 0x5f, 0x10],
            ),
            (
                "vcvtdq2ps %ymm0,%ymm0",
                Box::new(|s| s.vcvtdq2ps(0, 0)),
                &[0xc4, 0xe1, 0x7c, 0x5b, 0xc0],
            ),
            (
                "vmulps %ymm8,%ymm10,%ymm10",
                Box::new(|s| s.vmulps(10, 10, 8)),
                &[0xc4, 0x41, 0x2c, 0x59, 0xd0],
            ),
            (
                "vsubps %ymm10,%ymm0,%ymm0",
                Box::new(|s| s.vsubps(0, 0, 10)),
                &[0xc4, 0xc1, 0x7c, 0x5c, 0xc2],
            ),
            (
                "vaddps %ymm0,%ymm4,%ymm4",
                Box::new(|s| s.vaddps(4, 4, 0)),
                &[0xc4, 0xe1, 0x5c, 0x58, 0xe0],
            ),
            (
                "vmovd %eax,%xmm12",
                Box::new(|s| s.vmovd_from_gpr(12, Gpr::Rax)),
                &[0xc4, 0x61, 0x79, 0x6e, 0xe0],
            ),
            (
                "mov $0xf0f0f0f0,%eax",
                Box::new(|s| s.mov_imm32(Gpr::Rax, 0xf0f0_f0f0)),
                &[0xb8, 0xf0, 0xf0, 0xf0, 0xf0],
            ),
            (
                "mov $0x4,%r10d",
                Box::new(|s| s.mov_imm32(Gpr::R10, 4)),
                &[0x41, 0xba, 0x04, 0x00, 0x00, 0x00],
            ),
            (
                "add $0x440,%rdi",
                Box::new(|s| s.add_imm(Gpr::Rdi, 0x440)),
                &[0x48, 0x81, 0xc7, 0x40, 0x04, 0x00, 0x00],
            ),
            (
                "prefetcht0 0x2000(%rdi)",
                Box::new(|s| s.prefetch_t0(mem(Gpr::Rdi, None, 0x2000))),
                &[0x0f, 0x18, 0x8f, 0x00, 0x20, 0x00, 0x00],
            ),
        ];
        for (text, emit, bytes) in cases {
            let mut s = Asm::default();
            emit(&mut s);
            assert_eq!(s.code, bytes, "{text}");
        }
    }

    #[test]
    fn backward_branches_pick_the_short_form_when_it_reaches() {
        let mut s = Asm::default();
        s.code.resize(10, 0x90);
        s.jnz_back(0);
        assert_eq!(&s.code[10..], &[0x75, 0xF4]);
        let mut s = Asm::default();
        s.code.resize(200, 0x90);
        s.jnz_back(0);
        assert_eq!(&s.code[200..], &[0x0F, 0x85, 0x32, 0xFF, 0xFF, 0xFF]);
    }
}
