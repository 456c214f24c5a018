//! Static memory planning: every temporary buffer of a program gets an offset in one workspace
//! arena. Buffers are live from the first step that touches them to the last; a buffer may
//! reuse the bytes of any buffer whose live range has ended (first fit by offset). Offsets are
//! 64-byte aligned. The peak is what `kiln_workspace_size()` reports.

use crate::lower::{BufKind, Program};

pub const ALIGN: u64 = 64;

#[derive(Debug, Clone, PartialEq)]
pub struct MemoryPlan {
    /// Workspace offset per program buffer (0 for non-temporaries).
    pub offsets: Vec<u64>,
    /// Arena size in bytes.
    pub peak: u64,
    /// Sum of all temporaries' sizes: what the arena would need without reuse.
    pub unshared: u64,
}

pub fn plan(p: &Program) -> MemoryPlan {
    let n = p.buffers.len();
    let mut first = vec![usize::MAX; n];
    let mut last = vec![0usize; n];
    for (s, step) in p.steps.iter().enumerate() {
        for &b in &step.args {
            first[b] = first[b].min(s);
            last[b] = last[b].max(s);
        }
    }
    let size = |b: usize| (p.buffers[b].bytes() as u64).div_ceil(ALIGN) * ALIGN;
    let mut temps: Vec<usize> = (0..n)
        .filter(|&b| p.buffers[b].kind == BufKind::Temp && first[b] != usize::MAX)
        .collect();
    temps.sort_by_key(|&b| (first[b], std::cmp::Reverse(size(b)), b));
    let mut offsets = vec![0u64; n];
    // Placed buffers: (offset, end, last use).
    let mut placed: Vec<(u64, u64, usize)> = Vec::new();
    let mut peak = 0;
    let mut unshared = 0;
    for b in temps {
        let sz = size(b);
        unshared += sz;
        let mut live: Vec<(u64, u64)> = placed
            .iter()
            .filter(|&&(_, _, l)| l >= first[b])
            .map(|&(o, e, _)| (o, e))
            .collect();
        live.sort();
        let mut at = 0u64;
        for (o, e) in live {
            if at + sz <= o {
                break;
            }
            at = at.max(e);
        }
        offsets[b] = at;
        placed.push((at, at + sz, last[b]));
        peak = peak.max(at + sz);
    }
    MemoryPlan {
        offsets,
        peak,
        unshared,
    }
}
