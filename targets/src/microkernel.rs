//! Hand-scheduled leaf kernels that Cranelift cannot express well, emitted as machine code by
//! a small encoder of our own. Today one family: the x86-64 AVX2+FMA single-precision tile of
//! the packed matrix products ([`Microkernel::SgemmAvx2`]). Cranelift 0.135 has no 256-bit
//! vectors and only the FMA forms that overwrite a multiplicand, so its product loop needs a
//! register copy per FMA and reaches about 60% of the 128-bit peak; this tile keeps twelve
//! 256-bit accumulators and uses `vfmadd231ps`, which accumulates in place. The loop IR calls
//! a microkernel through [`crate::loop_ir::Stmt::Call`]; the code generator adds each one used
//! to the artifact once, as a leaf function with the System V calling convention that uses
//! only argument and scratch registers (no stack, no relocations). The encoder covers exactly
//! the instruction forms the kernels use; its unit tests pin every form's bytes (checked
//! against `objdump`).

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

    /// A 256-bit VEX instruction (three-byte prefix, W0): `opcode reg, vvvv, rm`.
    fn vex256(&mut self, map: Map, pp: Pp, opcode: u8, reg: u8, vvvv: u8, rm: Rm) {
        let (x, b) = Self::rm_ext(&rm);
        let r = reg >> 3;
        self.code.push(0xC4);
        self.code
            .push(((r ^ 1) << 7) | ((x ^ 1) << 6) | ((b ^ 1) << 5) | map as u8);
        self.code.push(((!vvvv & 0xF) << 3) | (1 << 2) | pp as u8);
        self.code.push(opcode);
        self.modrm(reg, &rm);
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
