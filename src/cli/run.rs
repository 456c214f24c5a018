//! `kiln run`: reads `input_N.pb` files (graph input order, or `--input NAME=FILE`), runs an
//! ONNX model with the reference interpreter or a compiled artifact with the runtime, and
//! writes `output_N.pb` files.

use anyhow::{bail, Context, Result};
use kiln_compiler::onnx::{self, tensor_proto};
use kiln_compiler::{interp, Tensor};
use std::path::Path;
use std::process::ExitCode;

pub fn run(
    model_path: &Path,
    inputs_dir: Option<&Path>,
    output_dir: &Path,
    overrides: &[String],
) -> Result<ExitCode> {
    if model_path.extension().is_some_and(|e| e == "so") {
        return run_artifact(model_path, inputs_dir, output_dir, overrides);
    }
    let model =
        onnx::load_model(model_path).with_context(|| format!("{}", model_path.display()))?;
    let g = &model.graph;
    let overrides = super::parse_pairs("--input", overrides)?;
    for (name, _) in &overrides {
        if !g.inputs.iter().any(|&i| &g.value(i).name == name) {
            let names: Vec<&str> = g.inputs.iter().map(|&i| g.value(i).name.as_str()).collect();
            bail!(
                "--input {name}: the model has no input of that name (inputs: {})",
                names.join(", ")
            );
        }
    }
    let inputs = read_inputs(g, inputs_dir, &overrides)?;
    let outputs = interp::run(g, &inputs)?;
    std::fs::create_dir_all(output_dir)
        .with_context(|| format!("cannot create {}", output_dir.display()))?;
    for (k, (t, &vid)) in outputs.iter().zip(&g.outputs).enumerate() {
        let path = output_dir.join(format!("output_{k}.pb"));
        tensor_proto::write_tensor_file(&path, &g.value(vid).name, t)?;
        println!(
            "{} {}{:?} -> {}",
            g.value(vid).name,
            t.dtype(),
            t.shape,
            path.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Inputs in graph order: `--input NAME=FILE` first, else `input_N.pb` from the folder.
pub fn read_inputs(
    g: &kiln_compiler::Graph,
    dir: Option<&Path>,
    overrides: &[(String, String)],
) -> Result<Vec<Tensor>> {
    let mut out = Vec::with_capacity(g.inputs.len());
    for (k, &vid) in g.inputs.iter().enumerate() {
        let name = &g.value(vid).name;
        let path = match overrides.iter().find(|(n, _)| n == name) {
            Some((_, f)) => Path::new(f).to_path_buf(),
            None => match dir {
                Some(d) => d.join(format!("input_{k}.pb")),
                None => {
                    bail!("input '{name}' has no value: pass --inputs-dir or --input {name}=FILE")
                }
            },
        };
        let (_, t) = tensor_proto::read_tensor_file(&path)?;
        out.push(t);
    }
    Ok(out)
}

/// Runs a compiled artifact (`.so`) through kiln-runtime on this machine.
fn run_artifact(
    path: &Path,
    inputs_dir: Option<&Path>,
    output_dir: &Path,
    overrides: &[String],
) -> Result<ExitCode> {
    let model = kiln_runtime::Model::load(path).with_context(|| format!("{}", path.display()))?;
    let overrides = super::parse_pairs("--input", overrides)?;
    let mut inputs = Vec::new();
    for (k, info) in model.inputs().iter().enumerate() {
        let file = match overrides.iter().find(|(n, _)| *n == info.name) {
            Some((_, f)) => Path::new(f).to_path_buf(),
            None => match inputs_dir {
                Some(d) => d.join(format!("input_{k}.pb")),
                None => bail!(
                    "input '{}' has no value: pass --inputs-dir or --input {}=FILE",
                    info.name,
                    info.name
                ),
            },
        };
        let (_, t) = tensor_proto::read_tensor_file(&file)?;
        let want: Vec<usize> = info.dims.iter().map(|&d| d as usize).collect();
        if t.dtype().onnx_code() != info.dtype || t.shape != want {
            bail!(
                "input '{}': expected {}{:?}, got {}{:?}",
                info.name,
                info.dtype_name(),
                want,
                t.dtype(),
                t.shape
            );
        }
        inputs.push(t);
    }
    let mut session = kiln_runtime::Session::new(&model, 0)?;
    let outputs = run_session(&mut session, &inputs)?;
    std::fs::create_dir_all(output_dir)
        .with_context(|| format!("cannot create {}", output_dir.display()))?;
    for (k, (info, t)) in model.outputs().iter().zip(&outputs).enumerate() {
        let path = output_dir.join(format!("output_{k}.pb"));
        tensor_proto::write_tensor_file(&path, &info.name, t)?;
        println!(
            "{} {}{:?} -> {}",
            info.name,
            t.dtype(),
            t.shape,
            path.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Runs a session on host tensors (already checked against the artifact's inputs) and decodes
/// its outputs.
pub fn run_session(session: &mut kiln_runtime::Session, inputs: &[Tensor]) -> Result<Vec<Tensor>> {
    let model = session.model();
    let bytes: Vec<Vec<u8>> = inputs.iter().map(|t| t.to_le_bytes()).collect();
    let mut outputs: Vec<Vec<u8>> = model
        .outputs()
        .iter()
        .map(|o| vec![0u8; o.byte_size().unwrap_or(0)])
        .collect();
    {
        let ins: Vec<&[u8]> = bytes.iter().map(|v| v.as_slice()).collect();
        let mut outs: Vec<&mut [u8]> = outputs.iter_mut().map(|v| v.as_mut_slice()).collect();
        session.run(&ins, &mut outs)?;
    }
    model
        .outputs()
        .iter()
        .zip(&outputs)
        .map(|(info, b)| {
            let dtype = kiln_compiler::DType::from_onnx(info.dtype).with_context(|| {
                format!(
                    "output '{}' has unsupported dtype {}",
                    info.name, info.dtype
                )
            })?;
            let shape = info.dims.iter().map(|&d| d as usize).collect();
            Tensor::from_le_bytes(dtype, shape, b).context("output size does not match its type")
        })
        .collect()
}
