//! `kiln compile`: ONNX model -> shape inference and constant folding -> graph passes ->
//! lowering, memory planning, code generation -> one self-contained `.so` per target, with a
//! short report. The settings come from flags (`MODEL --target T -o OUT`) or from a YAML
//! config (`--config FILE.yaml`, see `crate::config`), which may name several targets; the
//! model is imported and shape-inferred once and then compiled for each target.

use crate::config::{self, Flags, Plan, ScheduleOptions, Vectorization};
use anyhow::{bail, Context, Result};
use kiln_compiler::{ir, onnx, shape};
use kiln_passes::{DeadCodeElimination, EliminateIdentity, Pipeline};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

/// The command line of `kiln compile`.
#[derive(Debug, Default)]
pub struct Args {
    pub model: Option<PathBuf>,
    pub target: Option<String>,
    pub output: Option<PathBuf>,
    pub dims: Vec<String>,
    pub config: Option<PathBuf>,
}

pub fn run(args: Args) -> Result<ExitCode> {
    let target = args.target.as_deref().map(lookup_target).transpose()?;
    let dims = super::parse_dims(&args.dims)?;
    let plan = match &args.config {
        Some(file) => config::load(
            file,
            &Flags {
                model: args.model,
                target,
                output: args.output,
                dims,
            },
        )?,
        None => {
            let (Some(model), Some(target), Some(artifact)) = (args.model, target, args.output)
            else {
                bail!("kiln compile needs MODEL, --target and -o, or --config FILE.yaml");
            };
            Plan::from_flags(model, target, artifact, dims)
        }
    };
    compile(&plan, args.config.is_some())
}

fn lookup_target(name: &str) -> Result<&'static kiln_targets::Target> {
    match kiln_targets::target(name) {
        Some(t) => Ok(t),
        None => {
            let names: Vec<&str> = kiln_targets::TARGETS.iter().map(|t| t.name).collect();
            bail!("unknown target '{name}' (targets: {})", names.join(", "));
        }
    }
}

/// Imports and prepares the model once, then compiles and writes one artifact per build.
fn compile(plan: &Plan, show_schedule: bool) -> Result<ExitCode> {
    let t0 = Instant::now();
    let model = &plan.model;
    let mut m = onnx::load_model(model).with_context(|| format!("{}", model.display()))?;
    if let Err(e) = shape::bind_dims(&mut m.graph, &plan.dims) {
        return Err(match plan.dim_error(&e) {
            Some(located) => located.into(),
            None => e.into(),
        });
    }
    shape::infer(&mut m.graph)?;
    Pipeline::new()
        .verify_each(true)
        .with(EliminateIdentity)
        .with(DeadCodeElimination)
        .run(&mut m.graph)?;
    ir::verify::verify(&m.graph)?;
    let front_end = t0.elapsed();
    for build in &plan.builds {
        let t1 = Instant::now();
        let out = &build.artifact;
        let soname = format!(
            "lib{}.so",
            out.file_stem()
                .and_then(|s| s.to_str())
                .unwrap_or("kiln_model")
        );
        let schedule = kiln_targets::schedule::ScheduleOptions {
            vector_lanes: if plan.schedule.vectorization == Vectorization::None {
                1
            } else {
                4
            },
            unroll: plan.schedule.loop_unroll_factor.unwrap_or(1) as usize,
            // Two vectors of columns per row tile where 32 vector registers hold the
            // accumulators (aarch64; not yet timed on hardware). On x86-64 (16 SSE registers)
            // it spills and measured no faster, so one vector (BENCHMARKS.md).
            vector_jam: if build.target.isa == kiln_targets::Isa::Aarch64 {
                2
            } else {
                1
            },
            ..Default::default()
        };
        let options = kiln_targets::CompileOptions { soname, schedule };
        let compiled = kiln_targets::compile(&m.graph, build.target, &options)
            .with_context(|| format!("compiling for {}", build.target.name))?;
        create_parent(out)?;
        std::fs::write(out, &compiled.bytes)
            .with_context(|| format!("cannot write {}", out.display()))?;
        let s = &compiled.stats;
        println!(
            "compiled {} for {} in {:.2} s -> {}",
            model.display(),
            build.target.name,
            (front_end + t1.elapsed()).as_secs_f64(),
            out.display()
        );
        println!(
            "  kernels: {}, code: {} bytes, weights: {} bytes, artifact: {} bytes",
            s.kernels,
            s.code_bytes,
            s.weight_bytes,
            compiled.bytes.len()
        );
        println!(
            "  workspace: {} bytes (peak of the static plan; {} bytes without reuse)",
            compiled.plan.peak, compiled.plan.unshared
        );
        if show_schedule {
            println!("  schedule: {}", schedule_report(&plan.schedule));
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `vectorization auto (...), loop_unroll_factor 4 (...), threads 2 (...)`: what the config's
/// kernel_schedule asked for and how code generation applies it.
fn schedule_report(s: &ScheduleOptions) -> String {
    let mut parts = vec![match s.vectorization {
        Vectorization::None => "vectorization none (scalar code)".to_string(),
        v => format!("vectorization {} (128-bit, 4 f32 lanes)", v.name()),
    }];
    if let Some(n) = s.loop_unroll_factor {
        parts.push(format!("loop_unroll_factor {n} (innermost serial loops)"));
    }
    if let Some(n) = s.threads {
        parts.push(format!(
            "threads {n} (not applied yet: the runtime takes threads per session)"
        ));
    }
    parts.join(", ")
}

fn create_parent(out: &Path) -> Result<()> {
    match out.parent() {
        Some(dir) if !dir.as_os_str().is_empty() && !dir.is_dir() => {
            std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))
        }
        _ => Ok(()),
    }
}
