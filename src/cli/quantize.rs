//! Weight quantization as `kiln compile` runs it: layer exclusion, optional AWQ calibration
//! (samples from input sets or a token-id file, run through the reference interpreter with a
//! progress bar), the quantizer, and the report (exclusions, per-layer error worst first,
//! weight bytes by type, a loud warning when most matrix weights stayed float).

use crate::config::{Activations, QuantMethod, QuantSettings};
use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use kiln_compiler::ir::{Graph, NodeId, Op, ValueDef};
use kiln_compiler::{DType, Tensor};
use kiln_passes::quantize::{
    awq, plan_quantization, weight_columns, ExcludeLayers, ExclusionOptions, Glob,
    LayerQuantization, Precision, QuantizeOptions, QuantizeWeights,
};
use kiln_passes::Pass;
use std::collections::HashMap;
use std::path::Path;

/// Grid points of the AWQ search over alpha in [0, 1).
const AWQ_GRID: usize = 10;
/// Calibration rows kept per layer for the AWQ error search.
const AWQ_ROWS: usize = 64;

fn globs(list: &[String]) -> Result<Vec<Glob>> {
    list.iter()
        .map(|g| Glob::new(g).map_err(anyhow::Error::msg))
        .collect()
}

/// Checks the settings against a model that is already quantized (MatMulNBits nodes).
fn check_prequantized(g: &Graph, q: &QuantSettings) -> Result<()> {
    for n in g.nodes.node_weights() {
        if let Op::MatMulNBits { block_size, .. } = n.op {
            if block_size != q.group_size {
                bail!(
                    "the model is already quantized with block size {block_size} ({}), but group size {} was asked for; use --group-size {block_size} or the unquantized model",
                    n.name,
                    q.group_size
                );
            }
        }
    }
    Ok(())
}

/// Applies `q` to the graph (after shape inference) and prints the report.
pub fn apply(g: &mut Graph, q: &QuantSettings) -> Result<()> {
    check_prequantized(g, q)?;
    let exclusions = ExclusionOptions {
        auto: true,
        exclude: globs(&q.exclude)?,
        include: globs(&q.include)?,
        precision: q.excluded_precision,
    };
    let overrides = q
        .overrides
        .iter()
        .map(|(g, p)| Ok((Glob::new(g).map_err(anyhow::Error::msg)?, *p)))
        .collect::<Result<Vec<_>>>()?;
    let mut options = QuantizeOptions {
        precision: q.precision,
        group_size: q.group_size,
        symmetric: q.symmetric,
        exclusions: exclusions.clone(),
        overrides,
        awq_scales: HashMap::new(),
        calibration: HashMap::new(),
        int8_activations: q.activations == Activations::Int8,
    };
    // The quantizer must see the exclusions before ExcludeLayers rewrites them, so plan first.
    plan_quantization(g, &options).map_err(anyhow::Error::msg)?;
    let excluded = ExcludeLayers {
        options: exclusions,
    }
    .run(g)?;
    println!("  layer exclusion:");
    if excluded.notes.is_empty() {
        println!("    (none)");
    }
    for note in &excluded.notes {
        println!("    {note}");
    }
    if q.method == QuantMethod::Awq && q.calibration.is_none() {
        bail!("AWQ needs calibration data: pass --calibration PATH (input sets or a token file)");
    }
    if let Some(path) = &q.calibration {
        // Calibration feeds the AWQ search and, for every method, the per-layer output error.
        let plan = plan_quantization(g, &options).map_err(anyhow::Error::msg)?;
        options.calibration = calibrate(g, path, q, &plan)?;
        if q.method == QuantMethod::Awq {
            options.awq_scales = awq_scales(g, q, &plan, &options.calibration);
        }
    }
    let (_, layers) = QuantizeWeights { options }.quantize(g)?;
    report_layers(&layers);
    Ok(())
}

/// Runs the calibration samples through the interpreter and keeps each planned product's
/// input rows.
fn calibrate(
    g: &Graph,
    path: &Path,
    q: &QuantSettings,
    plan: &[(NodeId, Precision)],
) -> Result<HashMap<String, awq::LayerActivations>> {
    let samples = load_calibration(g, path, q.calibration_samples)?;
    let names: Vec<String> = plan
        .iter()
        .map(|(id, _)| g.nodes[*id].name.clone())
        .collect();
    let bar = progress(samples.len() as u64, "calibrating");
    let stats = awq::collect_activations(g, &samples, &names, AWQ_ROWS, &mut || bar.inc(1))
        .map_err(anyhow::Error::msg)?;
    bar.finish_and_clear();
    println!(
        "  calibration: {} samples from {}, {} rows per layer",
        samples.len(),
        path.display(),
        stats.values().map(|s| s.n_rows).max().unwrap_or(0)
    );
    Ok(stats)
}

fn report_layers(layers: &[LayerQuantization]) {
    if layers.is_empty() {
        println!("  quantized: no layer");
        return;
    }
    let mut sorted: Vec<&LayerQuantization> = layers.iter().collect();
    let mean = |f: &dyn Fn(&LayerQuantization) -> f64| {
        layers.iter().map(f).sum::<f64>() / layers.len() as f64
    };
    let with_output = layers.iter().all(|l| l.output_error.is_some());
    if with_output {
        // Worst output error on calibration data first: what the model's accuracy feels.
        let out = |l: &LayerQuantization| l.output_error.unwrap_or(0.0);
        sorted.sort_by(|a, b| out(b).total_cmp(&out(a)));
        println!(
            "  quantized {} layers; relative error mean: weights {:.4}, outputs on calibration data {:.4}; worst output first (output, weight):",
            layers.len(),
            mean(&|l| l.relative_error),
            mean(&|l| l.output_error.unwrap_or(0.0))
        );
    } else {
        sorted.sort_by(|a, b| b.relative_error.total_cmp(&a.relative_error));
        println!(
            "  quantized {} layers; weight relative error mean {:.4}, worst first:",
            layers.len(),
            mean(&|l| l.relative_error)
        );
    }
    for l in sorted.iter().take(8) {
        let output = match l.output_error {
            Some(e) if with_output => format!("{e:.4}  "),
            _ => String::new(),
        };
        println!(
            "    {output}{:.4}  {} ({}) [{}x{}] {}",
            l.relative_error,
            l.node,
            l.weight,
            l.k,
            l.n,
            l.precision.name()
        );
    }
    if sorted.len() > 8 {
        println!("    ... {} more", sorted.len() - 8);
    }
}

/// The per-layer AWQ search over the calibration rows.
fn awq_scales(
    g: &Graph,
    q: &QuantSettings,
    plan: &[(NodeId, Precision)],
    stats: &HashMap<String, awq::LayerActivations>,
) -> HashMap<String, Vec<f32>> {
    let bar = progress(plan.len() as u64, "AWQ search");
    let mut scales = HashMap::new();
    let (mut err_rtn, mut err_awq) = (0f64, 0f64);
    for (id, precision) in plan {
        let n = &g.nodes[*id];
        bar.inc(1);
        let Some(act) = stats.get(&n.name) else {
            continue;
        };
        let Some((cols, k, nn)) = weight_columns(g, n) else {
            continue;
        };
        let bits = if *precision == Precision::Int4 { 4 } else { 8 };
        let r = awq::search_scales(act, &cols, nn, k, q.group_size, bits, q.symmetric, AWQ_GRID);
        err_rtn += r.error_rtn;
        err_awq += r.error_best;
        if r.alpha > 0.0 {
            scales.insert(n.name.clone(), r.scales);
        }
    }
    bar.finish_and_clear();
    println!(
        "  AWQ: {} of {} layers scaled; calibration output error {:.4e} -> {:.4e} ({:.1}% lower than RTN)",
        scales.len(),
        plan.len(),
        err_rtn,
        err_awq,
        if err_rtn > 0.0 {
            100.0 * (1.0 - err_awq / err_rtn)
        } else {
            0.0
        }
    );
    scales
}

/// A progress bar in the style of every calibration step of `kiln compile`.
pub fn progress(n: u64, what: &'static str) -> ProgressBar {
    let bar = ProgressBar::new(n);
    if let Ok(style) = ProgressStyle::with_template("  {msg} [{bar:30}] {pos}/{len} ({eta})") {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(what);
    bar
}

/// Calibration samples, inputs in graph order: every `input_N.pb` set under `path` (a set
/// folder or a folder of `test_data_set_*` folders), or windows of a raw little-endian int32
/// token file for a model whose only input is token ids `[1, W]` (non-overlapping windows
/// taken from the end of the file backwards, so that perplexity windows at its start stay
/// unseen).
pub fn load_calibration(g: &Graph, path: &Path, max: usize) -> Result<Vec<Vec<Tensor>>> {
    if path.is_dir() {
        let mut sets: Vec<std::path::PathBuf> = if path.join("input_0.pb").is_file() {
            vec![path.to_path_buf()]
        } else {
            let mut v: Vec<_> = std::fs::read_dir(path)
                .with_context(|| format!("cannot read {}", path.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.join("input_0.pb").is_file())
                .collect();
            v.sort();
            v
        };
        sets.truncate(max);
        if sets.is_empty() {
            bail!(
                "calibration folder {} has no input_0.pb sets",
                path.display()
            );
        }
        return sets
            .iter()
            .map(|d| crate::cli::run::read_inputs(g, Some(d), &[]))
            .collect();
    }
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let tokens = read_tokens(&bytes, path)?;
    let [input] = g.inputs.as_slice() else {
        bail!(
            "a token file calibrates models with one token-id input; this model has {} inputs (use a folder of input sets)",
            g.inputs.len()
        );
    };
    let v = g.value(*input);
    let shape = v.ty.static_shape().unwrap_or_default();
    let dtype = v.ty.dtype.unwrap_or(DType::F32);
    let window = match shape.as_slice() {
        [1, w] if matches!(dtype, DType::I64 | DType::I32) => *w,
        _ => bail!(
            "input '{}' is {dtype}{shape:?}; a token file needs int64 or int32 token ids of shape [1, W]",
            v.name
        ),
    };
    let windows = tokens.len() / window;
    if windows == 0 {
        bail!(
            "{} holds {} tokens, fewer than one window of {window}",
            path.display(),
            tokens.len()
        );
    }
    Ok((0..windows.min(max))
        .map(|i| {
            let start = (windows - 1 - i) * window;
            let ids = &tokens[start..start + window];
            vec![token_tensor(ids, dtype)]
        })
        .collect())
}

/// Token ids as an input tensor `[1, W]`.
pub fn token_tensor(ids: &[i32], dtype: DType) -> Tensor {
    let w = ids.len();
    if dtype == DType::I32 {
        Tensor::from_vec(vec![1, w], ids.to_vec())
    } else {
        Tensor::from_vec(
            vec![1, w],
            ids.iter().map(|&t| t as i64).collect::<Vec<_>>(),
        )
    }
}

/// A raw little-endian int32 token file.
pub fn read_tokens(bytes: &[u8], path: &Path) -> Result<Vec<i32>> {
    if bytes.is_empty() || !bytes.len().is_multiple_of(4) {
        bail!(
            "{} is not a token file: {} bytes is not a positive multiple of 4 (raw little-endian int32)",
            path.display(),
            bytes.len()
        );
    }
    Ok(bytes
        .chunks_exact(4)
        .map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect())
}

/// Weight bytes by element type (constants still in use) and the share of matrix-product
/// weight bytes that stayed float, for the compile report.
pub fn weight_report(g: &Graph) -> (Vec<(DType, u64, u64)>, f64) {
    let stats = g.parameter_stats();
    let by_type = stats
        .by_dtype
        .iter()
        .map(|(d, (elems, bytes))| (*d, *elems, *bytes))
        .collect();
    let (mut float, mut total) = (0u64, 0u64);
    for n in g.nodes.node_weights() {
        let w = match n.op {
            Op::MatMul | Op::Gemm { .. } | Op::MatMulNBits { .. } => n.inputs.get(1).copied(),
            _ => None,
        };
        let Some(Some(mut w)) = w else { continue };
        // Look through a widening Cast to the stored weight.
        if let ValueDef::Node(id, _) = g.value(w).def {
            let p = &g.nodes[id];
            if matches!(p.op, Op::Cast { .. }) {
                if let Some(Some(src)) = p.inputs.first() {
                    w = *src;
                }
            }
        }
        if let Some(c) = g.constant(w) {
            let bytes = c.bytes.len() as u64;
            total += bytes;
            if matches!(c.dtype, DType::F32 | DType::F16 | DType::BF16 | DType::F64) {
                float += bytes;
            }
        }
    }
    let share = if total > 0 {
        float as f64 / total as f64
    } else {
        0.0
    };
    (by_type, share)
}
