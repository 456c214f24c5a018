//! The artifact writer: turns compiled functions and read-only data into a self-contained ELF
//! shared object (`model.so`) without any external linker. It resolves every relocation between
//! Kiln's own functions and data at write time (all are PC-relative), so the object needs no
//! dynamic relocations and imports nothing (no DT_NEEDED). Only the listed exports are dynamic
//! symbols; LOAD segments are aligned to at least 16 KiB; identical input gives identical bytes.
//! This module owns the artifact's input types, its errors and the entry point
//! [`write_shared_object`]; name checks live in `symbols`, relocation arithmetic in `reloc`
//! and the ELF layout in `elf`.

mod elf;
mod reloc;
mod symbols;
#[cfg(test)]
mod tests;

use thiserror::Error;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    X86_64,
    Aarch64,
}

/// A relocation inside a function's code, as Cranelift reports them for colocated symbols.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RelocKind {
    /// x86-64: 32-bit PC-relative field, value = S + A - P (rip-relative data, `call rel32`).
    X86PcRel4,
    /// aarch64 `bl`/`b`: imm26 = (S + A - P) >> 2.
    Aarch64Call26,
    /// aarch64 `adrp`: page(S + A) - page(P), 21 bits into immhi:immlo.
    Aarch64AdrPrelPgHi21,
    /// aarch64 `add` (immediate): (S + A) & 0xfff into imm12.
    Aarch64AddAbsLo12Nc,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reloc {
    /// Byte offset of the patched field inside the function's code.
    pub offset: u32,
    pub kind: RelocKind,
    /// Name of a function or data blob of the same artifact.
    pub target: String,
    pub addend: i64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FunctionBlob {
    pub name: String,
    pub code: Vec<u8>,
    /// Alignment of the function start in bytes (power of two).
    pub align: u64,
    pub relocs: Vec<Reloc>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DataBlob {
    pub name: String,
    pub bytes: Vec<u8>,
    /// Alignment in bytes (power of two); weights use 64.
    pub align: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ArtifactSpec {
    pub arch: Arch,
    /// DT_SONAME, e.g. "libkiln_model.so".
    pub soname: String,
    /// Code, placed in one read+execute segment in this order.
    pub functions: Vec<FunctionBlob>,
    /// Read-only data (weights, tables, strings), placed in one read-only segment in this order.
    pub rodata: Vec<DataBlob>,
    /// Names of the functions exported as global dynamic symbols (the C ABI); nothing else is.
    pub exports: Vec<String>,
}

#[derive(Debug, Error, PartialEq)]
pub enum ArtifactError {
    #[error("relocation in '{function}' refers to unknown symbol '{target}'")]
    UnknownSymbol { function: String, target: String },
    #[error("relocation {kind:?} in '{function}' at offset {offset}: value {value} out of range")]
    OutOfRange {
        function: String,
        offset: u32,
        kind: RelocKind,
        value: i64,
    },
    #[error("relocation {kind:?} is not valid for {arch:?}")]
    WrongArch { kind: RelocKind, arch: Arch },
    #[error("exported symbol '{0}' is not a function of the artifact")]
    UnknownExport(String),
    #[error("duplicate symbol '{0}'")]
    DuplicateSymbol(String),
    #[error("relocation {kind:?} in '{function}' at offset {offset} does not fit in the code")]
    RelocOutsideCode {
        function: String,
        offset: u32,
        kind: RelocKind,
    },
    #[error("symbol '{name}' has alignment {align}: must be a power of two no larger than {max}")]
    InvalidAlign { name: String, align: u64, max: u64 },
    #[error("invalid symbol or soname {0:?}: must be non-empty and contain no NUL byte")]
    InvalidName(String),
    #[error("ELF writer: {0}")]
    Elf(String),
}

/// Writes `spec` as a self-contained ELF shared object and returns its bytes.
///
/// Every relocation is resolved here; the result imports nothing, exports exactly
/// `spec.exports` and is byte-for-byte reproducible for an identical spec.
pub fn write_shared_object(spec: &ArtifactSpec) -> Result<Vec<u8>, ArtifactError> {
    let symbols = symbols::SymbolTable::build(spec)?;
    elf::write(spec, &symbols)
}
