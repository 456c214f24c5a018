//! kiln-targets: what Kiln compiles for. This module owns the target descriptions — ISA,
//! required CPU/GPU features, vector width and threading model — that schedules and codegen
//! read instead of forking the lowering per device. The loop IR, schedules, Cranelift/PTX
//! codegen and the artifact writer join this crate with the codegen work (issue 3).

use std::fmt;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    X86_64,
    Aarch64,
    Ptx,
}

/// How vectors are formed on a target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Vectors {
    /// Fixed-width SIMD registers of this many bits.
    Fixed(u32),
    /// Scalable, predicated vectors (SVE): a multiple of 128 bits chosen by the hardware.
    Scalable { min_bits: u32 },
    /// GPU warps of this many lanes.
    Warp(u32),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// The name used on the command line and returned by `kiln_target()`.
    pub name: &'static str,
    pub isa: Isa,
    /// Features the device must have; the runtime checks them before the first run.
    pub required_features: &'static [&'static str],
    pub vectors: Vectors,
    pub description: &'static str,
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name)
    }
}

pub const TARGETS: &[Target] = &[
    Target {
        name: "x86_64",
        isa: Isa::X86_64,
        required_features: &["sse4.1"],
        vectors: Vectors::Fixed(128),
        description:
            "x86-64 host, 128-bit SSE4.1 vectors (for running and measuring on the build machine)",
    },
    Target {
        name: "aarch64-neon",
        isa: Isa::Aarch64,
        required_features: &["neon"],
        vectors: Vectors::Fixed(128),
        description: "ARMv8.0-A with NEON (any 64-bit Android or Linux ARM device)",
    },
    Target {
        name: "aarch64-neon-dotprod",
        isa: Isa::Aarch64,
        required_features: &["neon", "dotprod"],
        vectors: Vectors::Fixed(128),
        description: "ARMv8.2-A with the dot-product extension (sdot/udot for int8 kernels)",
    },
    Target {
        name: "aarch64-sve",
        isa: Isa::Aarch64,
        required_features: &["neon", "sve"],
        vectors: Vectors::Scalable { min_bits: 128 },
        description:
            "ARMv8.2-A+ with SVE scalable, predicated vectors (vector-length agnostic code)",
    },
    Target {
        name: "cuda-sm80",
        isa: Isa::Ptx,
        required_features: &["sm_80"],
        vectors: Vectors::Warp(32),
        description: "NVIDIA GPUs of compute capability 8.0 or newer, through PTX",
    },
];

/// Looks a target up by name.
pub fn target(name: &str) -> Option<&'static Target> {
    TARGETS.iter().find(|t| t.name == name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_found() {
        for t in TARGETS {
            assert_eq!(target(t.name), Some(t));
            assert_eq!(TARGETS.iter().filter(|u| u.name == t.name).count(), 1);
        }
        assert!(target("riscv64").is_none());
    }
}
