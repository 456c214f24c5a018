//! `kiln compile`: ONNX model -> shape inference and constant folding -> graph passes ->
//! lowering, memory planning, code generation -> one self-contained `.so`, with a short report.

use anyhow::{bail, Context, Result};
use kiln_compiler::{ir, onnx, shape};
use kiln_passes::{DeadCodeElimination, EliminateIdentity, Pipeline};
use std::path::Path;
use std::process::ExitCode;

pub fn run(model: &Path, target_name: &str, out: &Path, dims: &[String]) -> Result<ExitCode> {
    let Some(target) = kiln_targets::target(target_name) else {
        let names: Vec<&str> = kiln_targets::TARGETS.iter().map(|t| t.name).collect();
        bail!("unknown target '{target_name}' (targets: {})", names.join(", "));
    };
    let t0 = std::time::Instant::now();
    let mut m = onnx::load_model(model).with_context(|| format!("{}", model.display()))?;
    let bindings = super::parse_dims(dims)?;
    shape::bind_dims(&mut m.graph, &bindings)?;
    shape::infer(&mut m.graph)?;
    Pipeline::new().verify_each(true).with(EliminateIdentity).with(DeadCodeElimination).run(&mut m.graph)?;
    ir::verify::verify(&m.graph)?;
    let soname = format!("lib{}.so", out.file_stem().and_then(|s| s.to_str()).unwrap_or("kiln_model"));
    let compiled = kiln_targets::compile(&m.graph, target, &kiln_targets::CompileOptions { soname })?;
    std::fs::write(out, &compiled.bytes).with_context(|| format!("cannot write {}", out.display()))?;
    let s = &compiled.stats;
    println!("compiled {} for {} in {:.2} s -> {}", model.display(), target.name, t0.elapsed().as_secs_f64(), out.display());
    println!("  kernels: {}, code: {} bytes, weights: {} bytes, artifact: {} bytes", s.kernels, s.code_bytes, s.weight_bytes, compiled.bytes.len());
    println!(
        "  workspace: {} bytes (peak of the static plan; {} bytes without reuse)",
        compiled.plan.peak, compiled.plan.unshared
    );
    Ok(ExitCode::SUCCESS)
}
