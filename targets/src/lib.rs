//! kiln-targets: the back half of Kiln. It owns the target descriptions (ISA, required
//! features, vector model), the loop IR ([`loop_ir`]), lowering of a statically shaped graph
//! into kernels ([`lower`]), static memory planning ([`plan`]), Cranelift code generation
//! ([`codegen`]) and the ELF writer ([`artifact`]). [`compile`] runs them in that order.

pub mod artifact;
pub mod codegen;
pub mod loop_ir;
pub mod lower;
pub mod microkernel;
pub mod plan;
pub mod schedule;

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
        name: "x86_64-v3",
        isa: Isa::X86_64,
        required_features: &["sse4.1", "avx", "avx2", "fma", "f16c"],
        vectors: Vectors::Fixed(128),
        description:
            "x86-64-v3 host (AVX2, FMA, F16C): 128-bit vectors, VEX encoding, fused multiply-add",
    },
    Target {
        name: "x86_64-v3-vnni",
        isa: Isa::X86_64,
        required_features: &["sse4.1", "avx", "avx2", "fma", "f16c", "avxvnni"],
        vectors: Vectors::Fixed(128),
        description: "x86-64-v3 with AVX-VNNI (Intel Alder Lake and later, AMD Zen 5): \
                      vpdpbusd for int8 kernels",
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

/// Options of one compilation.
#[derive(Clone, Debug)]
pub struct CompileOptions {
    /// DT_SONAME of the artifact.
    pub soname: String,
    /// Loop schedule applied to every kernel.
    pub schedule: schedule::ScheduleOptions,
}

impl Default for CompileOptions {
    fn default() -> Self {
        CompileOptions {
            soname: "libkiln_model.so".into(),
            schedule: Default::default(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CompileError {
    #[error(transparent)]
    Lower(#[from] lower::LowerError),
    #[error(transparent)]
    Codegen(#[from] codegen::CodegenError),
    #[error(transparent)]
    Artifact(#[from] artifact::ArtifactError),
}

impl CompileError {
    /// Whether the error reports a feature code generation does not have yet (an operator, an
    /// element type, a runtime-valued operand that must be constant), as opposed to a failure
    /// on a supported input. Lowering and codegen phrase such errors with one of the markers
    /// below; conformance runs count them as skipped.
    pub fn is_unsupported(&self) -> bool {
        const MARKERS: [&str; 6] = [
            "only lowered for",
            "not supported",
            "no lowering",
            "not lowered",
            "compile-time constant",
            "does not support",
        ];
        match self {
            CompileError::Lower(
                lower::LowerError::Unsupported(_) | lower::LowerError::DType { .. },
            ) => true,
            CompileError::Lower(e) => MARKERS.iter().any(|m| e.to_string().contains(m)),
            CompileError::Codegen(e) => MARKERS.iter().any(|m| e.to_string().contains(m)),
            CompileError::Artifact(_) => false,
        }
    }
}

/// A compiled artifact and the numbers the compile report prints.
#[derive(Debug, Clone)]
pub struct Compiled {
    pub bytes: Vec<u8>,
    pub stats: codegen::CodeStats,
    pub plan: plan::MemoryPlan,
}

/// Compiles a statically shaped graph (after `kiln_compiler::shape::infer`) for `target`.
pub fn compile(
    graph: &kiln_compiler::Graph,
    target: &Target,
    options: &CompileOptions,
) -> Result<Compiled, CompileError> {
    let mut program = lower::lower_with(graph, &lower::LowerOptions::for_target(target))?;
    for step in &mut program.steps {
        schedule::schedule(&mut step.kernel, &options.schedule);
    }
    let mem = plan::plan(&program);
    let (mut spec, stats) =
        codegen::generate(target, &program, &mem.offsets, mem.peak, &options.soname)?;
    spec.rodata.push(artifact::DataBlob {
        name: MODEL_INFO_SYMBOL.into(),
        bytes: model_info(graph, target, stats.weight_bytes as u64).into_bytes(),
        align: 1,
    });
    let bytes = artifact::write_shared_object(&spec)?;
    Ok(Compiled {
        bytes,
        stats,
        plan: mem,
    })
}

/// A local (not exported) read-only symbol of every artifact holding [`model_info`] text, for
/// `kiln inspect`.
pub const MODEL_INFO_SYMBOL: &str = "kiln_model_info";

/// `key value` lines describing the compiled model: format version, target, logical
/// parameter count (see `Graph::logical_parameter_count`), weight bytes, inputs and outputs.
pub fn model_info(graph: &kiln_compiler::Graph, target: &Target, weight_bytes: u64) -> String {
    let mut s = format!(
        "kiln_model_info 1\ntarget {}\nparameters {}\nweight_bytes {weight_bytes}\n",
        target.name,
        graph.logical_parameter_count()
    );
    let ty = |v: &kiln_compiler::ir::ValueId| {
        let v = graph.value(*v);
        format!("{} {}", v.name, kiln_compiler::ir::printer::type_str(&v.ty))
    };
    for i in &graph.inputs {
        s.push_str(&format!("input {}\n", ty(i)));
    }
    for o in &graph.outputs {
        s.push_str(&format!("output {}\n", ty(o)));
    }
    s
}

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
