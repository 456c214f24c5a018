//! Relocation arithmetic for the artifact writer: this module owns how each [`RelocKind`] turns
//! a target address S, an addend A and the patched field's address P into bits of the code, and
//! the range checks that go with it. It knows nothing about ELF; the caller supplies addresses.

use super::symbols::{SymbolRef, SymbolTable};
use super::{Arch, ArtifactError, ArtifactSpec, FunctionBlob, Reloc, RelocKind};

/// The addresses the layout gave to every function and data blob, by spec index.
#[derive(Clone, Debug, Default)]
pub(super) struct Addresses {
    pub functions: Vec<u64>,
    pub data: Vec<u64>,
}

impl Addresses {
    fn of(&self, symbol: SymbolRef) -> Option<u64> {
        match symbol {
            SymbolRef::Function(i) => self.functions.get(i).copied(),
            SymbolRef::Data(i) => self.data.get(i).copied(),
        }
    }
}

/// The architecture a relocation kind belongs to.
pub(super) fn arch_of(kind: RelocKind) -> Arch {
    match kind {
        RelocKind::X86PcRel4 => Arch::X86_64,
        RelocKind::Aarch64Call26
        | RelocKind::Aarch64AdrPrelPgHi21
        | RelocKind::Aarch64AddAbsLo12Nc => Arch::Aarch64,
    }
}

/// Bytes of code a relocation of this kind reads and writes at its offset.
pub(super) fn field_size(kind: RelocKind) -> usize {
    match kind {
        // A 32-bit displacement, or one 32-bit A64 instruction.
        RelocKind::X86PcRel4
        | RelocKind::Aarch64Call26
        | RelocKind::Aarch64AdrPrelPgHi21
        | RelocKind::Aarch64AddAbsLo12Nc => 4,
    }
}

/// Returns the code of every function (in spec order) with all its relocations applied.
pub(super) fn patch_functions(
    spec: &ArtifactSpec,
    symbols: &SymbolTable<'_>,
    addresses: &Addresses,
) -> Result<Vec<Vec<u8>>, ArtifactError> {
    spec.functions
        .iter()
        .zip(&addresses.functions)
        .map(|(function, &start)| patch_function(function, start, symbols, addresses))
        .collect()
}

fn patch_function(
    function: &FunctionBlob,
    start: u64,
    symbols: &SymbolTable<'_>,
    addresses: &Addresses,
) -> Result<Vec<u8>, ArtifactError> {
    let mut code = function.code.clone();
    for r in &function.relocs {
        let target = symbols
            .lookup(&r.target)
            .and_then(|s| addresses.of(s))
            .ok_or_else(|| ArtifactError::UnknownSymbol {
                function: function.name.clone(),
                target: r.target.clone(),
            })?;
        let place = start + u64::from(r.offset);
        apply(r, &mut code, target, place).map_err(|OutOfRange(value)| {
            ArtifactError::OutOfRange {
                function: function.name.clone(),
                offset: r.offset,
                kind: r.kind,
                value,
            }
        })?;
    }
    Ok(code)
}

/// A relocation whose value does not fit its field; carries the offending value.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct OutOfRange(pub i64);

/// Applies one relocation to `code`, with S = `target` and P = `place`.
///
/// The field must lie inside `code` (checked before layout); if it does not, this reports the
/// relocation's offset as out of range rather than panicking.
pub(super) fn apply(r: &Reloc, code: &mut [u8], target: u64, place: u64) -> Result<(), OutOfRange> {
    let offset = r.offset as usize;
    let field: &mut [u8; 4] = code
        .get_mut(offset..offset + 4)
        .and_then(|f| f.try_into().ok())
        .ok_or(OutOfRange(i64::from(r.offset)))?;
    let s_plus_a = i128::from(target) + i128::from(r.addend);
    let p = i128::from(place);
    let old = u32::from_le_bytes(*field);
    let new = match r.kind {
        RelocKind::X86PcRel4 => pc_rel32(s_plus_a - p)?,
        RelocKind::Aarch64Call26 => call26(old, s_plus_a - p)?,
        RelocKind::Aarch64AdrPrelPgHi21 => adrp(old, page(s_plus_a) - page(p))?,
        RelocKind::Aarch64AddAbsLo12Nc => add_lo12(old, s_plus_a),
    };
    *field = new.to_le_bytes();
    Ok(())
}

fn saturate(value: i128) -> i64 {
    i64::try_from(value).unwrap_or(if value < 0 { i64::MIN } else { i64::MAX })
}

fn fits_signed(value: i128, bits: u32) -> bool {
    let half = 1i128 << (bits - 1);
    (-half..half).contains(&value)
}

fn page(address: i128) -> i128 {
    address & !0xfff
}

/// x86-64 32-bit PC-relative field: the whole field is the signed displacement.
fn pc_rel32(delta: i128) -> Result<u32, OutOfRange> {
    let value = i32::try_from(delta).map_err(|_| OutOfRange(saturate(delta)))?;
    Ok(value as u32)
}

/// A64 `b`/`bl`: imm26 = delta >> 2 in bits [25:0]; delta must be 4-aligned, within ±128 MiB.
fn call26(insn: u32, delta: i128) -> Result<u32, OutOfRange> {
    if delta & 3 != 0 || !fits_signed(delta >> 2, 26) {
        return Err(OutOfRange(saturate(delta)));
    }
    let imm26 = ((delta >> 2) as u32) & 0x03ff_ffff;
    Ok((insn & !0x03ff_ffff) | imm26)
}

/// A64 `adrp`: the page delta >> 12 as a signed 21-bit value, immlo in [30:29], immhi in [23:5].
fn adrp(insn: u32, page_delta: i128) -> Result<u32, OutOfRange> {
    let pages = page_delta >> 12;
    if !fits_signed(pages, 21) {
        return Err(OutOfRange(saturate(page_delta)));
    }
    let pages = pages as u32;
    let immlo = pages & 0x3;
    let immhi = (pages >> 2) & 0x7_ffff;
    let mask = (0x3 << 29) | (0x7_ffff << 5);
    Ok((insn & !mask) | (immlo << 29) | (immhi << 5))
}

/// A64 `add` (immediate): the low 12 bits of S + A in imm12, bits [21:10]; never overflows.
fn add_lo12(insn: u32, s_plus_a: i128) -> u32 {
    let imm12 = (s_plus_a & 0xfff) as u32;
    (insn & !(0xfff << 10)) | (imm12 << 10)
}
