//! `kiln compile`: ONNX model -> shape inference and constant folding -> graph passes
//! (pruning, then quantization) ->
//! lowering, memory planning, code generation -> one self-contained `.so` per target, with a
//! short report. The settings come from flags (`MODEL --target T -o OUT`) or from a YAML
//! config (`--config FILE.yaml`, see `crate::config`), which may name several targets; the
//! model is imported and shape-inferred once and then compiled for each target.

use crate::config::{self, Flags, Plan, ScheduleOptions, Vectorization};
use anyhow::{bail, Context, Result};
use kiln_compiler::{ir, onnx, shape};
use kiln_passes::prune::{Criterion, Norm};
use kiln_passes::quantize::Glob;
use kiln_passes::{DeadCodeElimination, EliminateIdentity, FoldBatchNorm, Pipeline};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

/// The command line of `kiln compile`.
#[derive(Debug, Default, clap::Args)]
pub struct Args {
    /// The ONNX model (optional with --config).
    #[arg(required_unless_present = "config")]
    pub model: Option<PathBuf>,
    /// Target name (see `kiln targets`; optional with --config).
    #[arg(long, required_unless_present = "config")]
    pub target: Option<String>,
    /// Output artifact path (optional with --config).
    #[arg(short = 'o', long = "output", required_unless_present = "config")]
    pub output: Option<PathBuf>,
    /// Bind a dynamic dimension.
    #[arg(long = "dim", value_name = "NAME=VALUE")]
    pub dims: Vec<String>,
    /// YAML compile config (model_compilation, quantization, kernel_schedule, output); flags
    /// given too must agree with it.
    #[arg(long, value_name = "FILE.yaml")]
    pub config: Option<PathBuf>,
    /// Weight-only quantization of matrix-product weights: q4 (INT4) or q8 (INT8); excluded
    /// layers (embeddings, LM head) stay f16 (q4f32 / q8f32: f32).
    #[arg(long, value_name = "MODE")]
    pub quantize: Option<String>,
    /// Weights per quantization group along the reduction axis (32, 64 or 128).
    #[arg(long, value_name = "N")]
    pub group_size: Option<usize>,
    /// Symmetric quantization (no zero points).
    #[arg(long)]
    pub symmetric: bool,
    /// Rounding method.
    #[arg(long, value_enum)]
    pub method: Option<config::QuantMethod>,
    /// Activations of the quantized products: f32 (default) or int8 (quantized per group at
    /// run time, integer dot products; MatMulNBits accuracy level 4).
    #[arg(long, value_enum)]
    pub activations: Option<config::Activations>,
    /// Calibration data for AWQ: a folder of input sets or a raw int32 token file.
    #[arg(long, value_name = "PATH")]
    pub calibration: Option<PathBuf>,
    /// Calibration samples (input sets or token windows) to use.
    #[arg(long, value_name = "N")]
    pub calibration_samples: Option<usize>,
    /// Structured pruning before quantization: `ffn=0.25,heads=2,channels=0.5` (per structure
    /// kind; a fraction of the units or a whole number of them) or `0.25` (every kind).
    #[arg(long, value_name = "SPEC")]
    pub prune: Option<String>,
    /// How pruning ranks units: weight magnitude, or activation-aware (needs --calibration).
    #[arg(long, value_enum)]
    pub criterion: Option<PruneCriterion>,
    /// Norm of weight magnitudes for pruning.
    #[arg(long, value_enum)]
    pub norm: Option<PruneNorm>,
    /// Never prune structures matching this name glob (repeatable).
    #[arg(long, value_name = "GLOB")]
    pub keep: Vec<String>,
    /// Round the width left by pruning to a multiple of N channels (default 8).
    #[arg(long, value_name = "N")]
    pub multiple: Option<usize>,
    /// Also write the transformed graph (quantized, pruned) as standard ONNX.
    #[arg(long, value_name = "FILE.onnx")]
    pub emit_onnx: Option<PathBuf>,
}

/// `--criterion`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum PruneCriterion {
    Magnitude,
    Activation,
}

/// `--norm`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum PruneNorm {
    L1,
    L2,
}

impl Args {
    /// The pruning settings the flags ask for, if any.
    fn pruning(&self) -> Result<Option<config::PruneSettings>> {
        let extra = self.criterion.is_some()
            || self.norm.is_some()
            || !self.keep.is_empty()
            || self.multiple.is_some();
        let Some(spec) = &self.prune else {
            if extra {
                bail!("--criterion, --norm, --keep and --multiple need --prune SPEC");
            }
            return Ok(None);
        };
        let mut p = config::PruneSettings::default();
        config::parse_prune_spec(spec, &mut p.options)
            .map_err(|e| anyhow::anyhow!("--prune {spec}: {e}"))?;
        if let Some(c) = self.criterion {
            p.options.criterion = match c {
                PruneCriterion::Magnitude => Criterion::Magnitude,
                PruneCriterion::Activation => Criterion::Activation,
            };
        }
        if let Some(n) = self.norm {
            p.options.norm = match n {
                PruneNorm::L1 => Norm::L1,
                PruneNorm::L2 => Norm::L2,
            };
        }
        for k in &self.keep {
            p.options
                .keep
                .push(Glob::new(k).map_err(|e| anyhow::anyhow!("--keep: {e}"))?);
        }
        if let Some(m) = self.multiple {
            p.options.multiple = m;
        }
        p.calibration = self.calibration.clone();
        if let Some(n) = self.calibration_samples {
            p.calibration_samples = n;
        }
        config::check_pruning(&p).map_err(|e| anyhow::anyhow!("--prune: {e}"))?;
        Ok(Some(p))
    }

    /// The quantization settings the flags ask for, if any.
    fn quantization(&self) -> Result<Option<config::QuantSettings>> {
        let extra = self.group_size.is_some()
            || self.symmetric
            || self.method.is_some()
            || self.activations.is_some()
            || (self.prune.is_none()
                && (self.calibration.is_some() || self.calibration_samples.is_some()));
        let Some(mode) = &self.quantize else {
            if extra {
                bail!(
                    "--group-size, --symmetric, --method, --activations and --calibration need --quantize q4|q8"
                );
            }
            return Ok(None);
        };
        let mut q = config::QuantSettings::default();
        (q.precision, q.excluded_precision) = config::parse_quant_mode(mode).ok_or_else(|| {
            anyhow::anyhow!(
                "--quantize {mode}: expected one of {}",
                config::QUANT_MODES.join(", ")
            )
        })?;
        if let Some(g) = self.group_size {
            q.group_size = g;
        }
        q.symmetric = self.symmetric;
        if let Some(m) = self.method {
            q.method = m;
        }
        if let Some(a) = self.activations {
            q.activations = a;
        }
        q.calibration = self.calibration.clone();
        if let Some(n) = self.calibration_samples {
            q.calibration_samples = n;
        }
        config::check_quantization(&q).map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok(Some(q))
    }
}

pub fn run(args: Args) -> Result<ExitCode> {
    let quantization = args.quantization()?;
    let pruning = args.pruning()?;
    let emit_onnx = args.emit_onnx.clone();
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
    let mut plan = plan;
    match (&plan.quantization, quantization) {
        (Some(_), Some(_)) => {
            bail!("quantization is set both in the config and by --quantize; give it in one place")
        }
        (None, Some(q)) => plan.quantization = Some(q),
        _ => {}
    }
    match (&plan.pruning, pruning) {
        (Some(_), Some(_)) => {
            bail!("pruning is set both in the config and by --prune; give it in one place")
        }
        (None, Some(p)) => plan.pruning = Some(p),
        _ => {}
    }
    match (&plan.emit_onnx, emit_onnx) {
        (Some(c), Some(f)) if c != &f => bail!(
            "output.emit_onnx '{}' conflicts with --emit-onnx '{}'; give it in one place",
            c.display(),
            f.display()
        ),
        (_, Some(f)) => plan.emit_onnx = Some(f),
        _ => {}
    }
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
    if let Some(p) = &plan.pruning {
        println!("pruning {}:", model.display());
        super::prune::apply(&mut m.graph, p)?;
    }
    if let Some(q) = &plan.quantization {
        println!("quantizing {}:", model.display());
        super::quantize::apply(&mut m.graph, q)?;
    }
    if plan.pruning.is_some() || plan.quantization.is_some() {
        Pipeline::new()
            .verify_each(true)
            .with(DeadCodeElimination)
            .run(&mut m.graph)?;
    }
    ir::verify::verify(&m.graph)?;
    let (by_type, float_share) = super::quantize::weight_report(&m.graph);
    let parts: Vec<String> = by_type
        .iter()
        .map(|(d, elems, bytes)| format!("{d} {bytes} bytes ({elems} values)"))
        .collect();
    println!("  weights by type: {}", parts.join(", "));
    if plan.quantization.is_some() && float_share > 0.5 {
        println!(
            "  WARNING: quantization was asked for, but {:.0}% of the matrix weight bytes are still float (check the exclusions and overrides)",
            100.0 * float_share
        );
    }
    if let Some(path) = &plan.emit_onnx {
        create_parent(path)?;
        kiln_compiler::onnx::export::write_model(&m.graph, path)
            .with_context(|| format!("cannot write {}", path.display()))?;
        println!("  wrote {}", path.display());
    }
    // Lowering details after the user-visible transformations (and the ONNX written above).
    Pipeline::new()
        .verify_each(true)
        .with(FoldBatchNorm)
        .with(DeadCodeElimination)
        .run(&mut m.graph)?;
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
