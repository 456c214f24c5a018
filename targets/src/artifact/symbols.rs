//! Name resolution and validation for an [`ArtifactSpec`]: this module owns the table from
//! symbol names to functions and data blobs, and every check that can be made before layout
//! (valid names and alignments, no duplicates, exports that are functions, relocations of the
//! right architecture that target a known symbol and lie inside their function's code).

use std::collections::BTreeMap;

use super::reloc;
use super::{ArtifactError, ArtifactSpec, FunctionBlob};

/// The largest alignment a function or data blob may ask for (64 KiB).
pub(super) const MAX_ALIGN: u64 = 0x1_0000;

/// A function or data blob of the spec, by index.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum SymbolRef {
    Function(usize),
    Data(usize),
}

/// The validated names of a spec.
#[derive(Debug)]
pub(super) struct SymbolTable<'a> {
    by_name: BTreeMap<&'a str, SymbolRef>,
    /// Indices into `spec.functions`, in the order of `spec.exports`.
    exports: Vec<usize>,
}

impl<'a> SymbolTable<'a> {
    /// Checks `spec` and indexes its names; fails on the first problem found.
    pub(super) fn build(spec: &'a ArtifactSpec) -> Result<Self, ArtifactError> {
        check_name(&spec.soname)?;
        let mut by_name = BTreeMap::new();
        for (index, function) in spec.functions.iter().enumerate() {
            check_align(&function.name, function.align)?;
            insert_unique(&mut by_name, &function.name, SymbolRef::Function(index))?;
        }
        for (index, blob) in spec.rodata.iter().enumerate() {
            check_align(&blob.name, blob.align)?;
            insert_unique(&mut by_name, &blob.name, SymbolRef::Data(index))?;
        }
        let table = SymbolTable {
            exports: resolve_exports(&by_name, &spec.exports)?,
            by_name,
        };
        for function in &spec.functions {
            table.check_relocs(spec, function)?;
        }
        Ok(table)
    }

    pub(super) fn lookup(&self, name: &str) -> Option<SymbolRef> {
        self.by_name.get(name).copied()
    }

    /// Indices into `spec.functions` of the exported functions, in `spec.exports` order.
    pub(super) fn exports(&self) -> &[usize] {
        &self.exports
    }

    fn check_relocs(
        &self,
        spec: &ArtifactSpec,
        function: &FunctionBlob,
    ) -> Result<(), ArtifactError> {
        for r in &function.relocs {
            let arch = reloc::arch_of(r.kind);
            if arch != spec.arch {
                return Err(ArtifactError::WrongArch {
                    kind: r.kind,
                    arch: spec.arch,
                });
            }
            if self.lookup(&r.target).is_none() {
                return Err(ArtifactError::UnknownSymbol {
                    function: function.name.clone(),
                    target: r.target.clone(),
                });
            }
            let end = r.offset as usize + reloc::field_size(r.kind);
            if end > function.code.len() {
                return Err(ArtifactError::RelocOutsideCode {
                    function: function.name.clone(),
                    offset: r.offset,
                    kind: r.kind,
                });
            }
        }
        Ok(())
    }
}

fn check_name(name: &str) -> Result<(), ArtifactError> {
    if name.is_empty() || name.contains('\0') {
        return Err(ArtifactError::InvalidName(name.to_string()));
    }
    Ok(())
}

fn check_align(name: &str, align: u64) -> Result<(), ArtifactError> {
    if !align.is_power_of_two() || align > MAX_ALIGN {
        return Err(ArtifactError::InvalidAlign {
            name: name.to_string(),
            align,
            max: MAX_ALIGN,
        });
    }
    Ok(())
}

fn insert_unique<'a>(
    by_name: &mut BTreeMap<&'a str, SymbolRef>,
    name: &'a str,
    symbol: SymbolRef,
) -> Result<(), ArtifactError> {
    check_name(name)?;
    if by_name.insert(name, symbol).is_some() {
        return Err(ArtifactError::DuplicateSymbol(name.to_string()));
    }
    Ok(())
}

fn resolve_exports(
    by_name: &BTreeMap<&str, SymbolRef>,
    exports: &[String],
) -> Result<Vec<usize>, ArtifactError> {
    let mut indices: Vec<usize> = Vec::with_capacity(exports.len());
    for name in exports {
        let Some(SymbolRef::Function(index)) = by_name.get(name.as_str()).copied() else {
            return Err(ArtifactError::UnknownExport(name.clone()));
        };
        if indices.contains(&index) {
            return Err(ArtifactError::DuplicateSymbol(name.clone()));
        }
        indices.push(index);
    }
    Ok(indices)
}
