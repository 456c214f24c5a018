//! `kiln conformance`: runs every ONNX-test-layout folder (`model.onnx` plus
//! `test_data_set_*/input_N.pb, output_N.pb`) found under the given directories and compares
//! with the stored outputs using the ONNX backend test tolerances (rtol 1e-3, atol 1e-7).
//! A test is *skipped* when Kiln does not support what it needs (an operator, an element type,
//! a non-tensor input); it *fails* when Kiln runs it and gets a wrong result or an error.

use anyhow::{bail, Context, Result};
use kiln_compiler::onnx::{self, tensor_proto, ImportError};
use kiln_compiler::{compare, interp};
use rayon::prelude::*;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Backend {
    /// The reference interpreter.
    Interp,
    /// Compile each test for this machine (x86_64), load the artifact with kiln-runtime, run.
    Host,
}

pub const RTOL: f64 = 1e-3;
pub const ATOL: f64 = 1e-7;

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Status {
    Passed,
    Failed,
    Skipped,
}

impl Status {
    fn word(&self) -> &'static str {
        match self {
            Status::Passed => "passed",
            Status::Failed => "failed",
            Status::Skipped => "skipped",
        }
    }
}

/// Finds test folders: a folder with `model.onnx` and at least one `test_data_set_*`.
pub fn find_tests(dirs: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for d in dirs {
        if !d.is_dir() {
            bail!("{} is not a directory", d.display());
        }
        walk(d, &mut out).with_context(|| format!("reading {}", d.display()))?;
    }
    out.sort();
    out.dedup();
    Ok(out)
}

fn walk(d: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    if d.join("model.onnx").is_file() {
        out.push(d.to_path_buf());
        return Ok(());
    }
    let mut entries: Vec<PathBuf> = std::fs::read_dir(d)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    entries.sort();
    for e in entries {
        if e.is_dir() {
            walk(&e, out)?;
        }
    }
    Ok(())
}

/// Runs one test folder; returns its status and reason.
pub fn run_test(dir: &Path, backend: Backend) -> (Status, String) {
    match std::panic::catch_unwind(|| run_test_inner(dir, backend)) {
        Ok(r) => r,
        Err(p) => {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()));
            (
                Status::Failed,
                format!("panic: {}", msg.unwrap_or_default()),
            )
        }
    }
}

fn skip_reason(e: &ImportError) -> Option<String> {
    match e {
        ImportError::UnsupportedOps(_) | ImportError::BadType { .. } => Some(e.to_string()),
        ImportError::BadTensor { reason, .. } if reason.contains("not supported") => {
            Some(e.to_string())
        }
        _ => None,
    }
}

fn run_test_inner(dir: &Path, backend: Backend) -> (Status, String) {
    let model = match onnx::load_model(&dir.join("model.onnx")) {
        Ok(m) => m,
        Err(e) => {
            return match skip_reason(&e) {
                Some(r) => (Status::Skipped, r),
                None => (Status::Failed, format!("import: {e}")),
            }
        }
    };
    let g = &model.graph;
    let mut sets: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(rd) => rd
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.is_dir()
                    && p.file_name()
                        .is_some_and(|n| n.to_string_lossy().starts_with("test_data_set_"))
            })
            .collect(),
        Err(e) => return (Status::Failed, format!("reading {}: {e}", dir.display())),
    };
    sets.sort();
    if sets.is_empty() {
        return (Status::Skipped, "no test_data_set_* folder".into());
    }
    for set in sets {
        let mut inputs = Vec::new();
        for k in 0..g.inputs.len() {
            match tensor_proto::read_tensor_file(&set.join(format!("input_{k}.pb"))) {
                Ok((_, t)) => inputs.push(t),
                Err(e) => {
                    let r = e.to_string();
                    let status = if r.contains("not supported") {
                        Status::Skipped
                    } else {
                        Status::Failed
                    };
                    return (status, r);
                }
            }
        }
        let outputs = match backend {
            Backend::Interp => match interp::run(g, &inputs) {
                Ok(o) => o,
                Err(e) => return (Status::Failed, e.to_string()),
            },
            Backend::Host => match host::run(g, &inputs) {
                Ok(o) => o,
                Err(r) => return r,
            },
        };
        for (k, actual) in outputs.iter().enumerate() {
            let path = set.join(format!("output_{k}.pb"));
            if !path.exists() {
                continue;
            }
            let expected = match tensor_proto::read_tensor_file(&path) {
                Ok((_, t)) => t,
                Err(e) => {
                    let r = e.to_string();
                    let status = if r.contains("not supported") {
                        Status::Skipped
                    } else {
                        Status::Failed
                    };
                    return (status, r);
                }
            };
            if let Err(r) = compare::allclose(&expected, actual, RTOL, ATOL) {
                let name = g.value(g.outputs[k]).name.clone();
                return (Status::Failed, format!("output '{name}': {r}"));
            }
        }
    }
    (Status::Passed, String::new())
}

fn test_name(dir: &Path) -> String {
    dir.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| dir.display().to_string())
}

pub fn run(
    dirs: &[PathBuf],
    backend: Backend,
    list_file: Option<&Path>,
    allow_failures: bool,
) -> Result<ExitCode> {
    let tests = find_tests(dirs)?;
    if tests.is_empty() {
        bail!(
            "no test folders (model.onnx + test_data_set_*) under {}",
            dirs.iter()
                .map(|d| d.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let results: Vec<(String, Status, String)> = tests
        .par_iter()
        .map(|t| {
            let (s, r) = run_test(t, backend);
            (test_name(t), s, r)
        })
        .collect();
    let mut counts = [0usize; 3];
    for (name, status, reason) in &results {
        match status {
            Status::Passed => counts[0] += 1,
            Status::Failed => {
                counts[1] += 1;
                println!("FAIL {name}: {reason}");
            }
            Status::Skipped => {
                counts[2] += 1;
                println!("SKIP {name}: {reason}");
            }
        }
    }
    if let Some(f) = list_file {
        let mut out =
            std::fs::File::create(f).with_context(|| format!("cannot write {}", f.display()))?;
        for (name, status, reason) in &results {
            writeln!(
                out,
                "{name} {} {}",
                status.word(),
                reason.replace('\n', " ")
            )?;
        }
    }
    println!(
        "{} passed, {} failed, {} skipped",
        counts[0], counts[1], counts[2]
    );
    Ok(if counts[1] > 0 && !allow_failures {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// The host backend: compile for this machine, load with kiln-runtime, run.
mod host {
    use super::Status;
    use kiln_compiler::ir::{Graph, Op, ValueDef, ValueId, ValueType};
    use kiln_compiler::{ir, shape, Tensor};
    use kiln_passes::{DeadCodeElimination, EliminateIdentity, Pipeline};

    /// Whether input `i` of `op` defines shapes (so a static compiler needs its value).
    fn shape_operand(op: &Op, i: usize) -> bool {
        match op {
            Op::Reshape { .. }
            | Op::Expand
            | Op::Tile
            | Op::Squeeze { .. }
            | Op::Unsqueeze { .. } => i == 1,
            Op::Slice { .. } => (1..=4).contains(&i),
            Op::Pad { .. } => i == 1 || i == 3,
            Op::ConstantOfShape { .. } | Op::Range => true,
            Op::TopK { .. } | Op::Split { .. } | Op::CumSum { .. } | Op::Trilu { .. } => i == 1,
            Op::OneHot { .. } => i == 1,
            Op::Reduce { .. } => i == 1,
            Op::Resize(_) => i >= 1,
            _ => false,
        }
    }

    /// Turns the graph inputs that define shapes into constants with the test's values, and
    /// fixes every remaining input's type to the test tensor's. Returns the remaining inputs.
    fn specialise(g: &mut Graph, inputs: &[Tensor]) -> Vec<Tensor> {
        let mut freeze = vec![false; g.inputs.len()];
        for n in g.nodes.node_weights() {
            for (i, v) in n.inputs.iter().enumerate() {
                if let Some(k) = v.and_then(|v| g.inputs.iter().position(|&x| x == v)) {
                    freeze[k] |= shape_operand(&n.op, i);
                }
            }
        }
        let mut kept_ids: Vec<ValueId> = Vec::new();
        let mut kept = Vec::new();
        for (k, (&v, t)) in g.inputs.clone().iter().zip(inputs).enumerate() {
            if freeze[k] {
                let c = ir::Constant::from_tensor(t);
                let val = g.value_mut(v);
                val.ty = ValueType::fixed(t.dtype(), &t.shape);
                val.def = ValueDef::Const(c);
            } else {
                let idx = kept_ids.len();
                let val = g.value_mut(v);
                val.ty = ValueType::fixed(t.dtype(), &t.shape);
                val.def = ValueDef::Input(idx);
                kept_ids.push(v);
                kept.push(t.clone());
            }
        }
        g.inputs = kept_ids;
        kept
    }

    pub fn run(g: &Graph, inputs: &[Tensor]) -> Result<Vec<Tensor>, (Status, String)> {
        let skip = |r: String| (Status::Skipped, r);
        let fail = |r: String| (Status::Failed, r);
        let mut g = g.clone();
        let inputs = specialise(&mut g, inputs);
        shape::infer(&mut g).map_err(|e| skip(format!("codegen: shape inference: {e}")))?;
        Pipeline::new()
            .verify_each(true)
            .with(EliminateIdentity)
            .with(DeadCodeElimination)
            .run(&mut g)
            .map_err(|e| fail(e.to_string()))?;
        let target =
            kiln_targets::target("x86_64").ok_or_else(|| fail("no x86_64 target".into()))?;
        let compiled = match kiln_targets::compile(&g, target, &Default::default()) {
            Ok(c) => c,
            Err(e) if e.is_unsupported() => return Err(skip(format!("codegen: {e}"))),
            Err(e) => return Err(fail(format!("compile: {e}"))),
        };
        let dir = tempfile::tempdir().map_err(|e| fail(e.to_string()))?;
        let so = dir.path().join("model.so");
        std::fs::write(&so, &compiled.bytes).map_err(|e| fail(e.to_string()))?;
        let model = kiln_runtime::Model::load(&so).map_err(|e| fail(format!("load: {e}")))?;
        let mut session = kiln_runtime::Session::new(&model, 1).map_err(|e| fail(e.to_string()))?;
        crate::cli::run::run_session(&mut session, &inputs).map_err(|e| fail(format!("run: {e:#}")))
    }
}
