//! `kiln eval`: the accuracy of a model — an ONNX file run by the reference interpreter or a
//! compiled artifact run by the runtime. For causal LMs, perplexity over a token file in
//! non-overlapping windows (`--perplexity TOKENS.i32 --window W --windows N`; the model's
//! input must be token ids `[1, W]` and its first output logits `[1, W, V]`): every position
//! predicts the next token of its window, log-softmax in f64, and the last line printed is
//! `perplexity: <value>`. For other models, `--reference MODEL.onnx --inputs-dir DIR` compares
//! every output with the reference interpreter on the unmodified model: cosine similarity and
//! maximum absolute error per output.

use super::quantize::{read_tokens, token_tensor};
use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use kiln_compiler::onnx;
use kiln_compiler::{interp, DType, Graph, Tensor};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The model: an ONNX file (reference interpreter) or a compiled artifact (.so).
    pub model: PathBuf,
    /// Token file (raw little-endian int32) for perplexity.
    #[arg(long, value_name = "TOKENS.i32", conflicts_with = "reference")]
    pub perplexity: Option<PathBuf>,
    /// Tokens per window; must equal the model's input length.
    #[arg(long, default_value_t = 128)]
    pub window: usize,
    /// Number of windows, from the start of the token file.
    #[arg(long, default_value_t = 64)]
    pub windows: usize,
    /// The unmodified ONNX model to compare outputs with (non-LM models).
    #[arg(long, value_name = "MODEL.onnx", requires = "inputs_dir")]
    pub reference: Option<PathBuf>,
    /// Input set for --reference (input_N.pb files).
    #[arg(long, value_name = "DIR")]
    pub inputs_dir: Option<PathBuf>,
    /// Threads for a compiled artifact (0: all cores).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
}

/// Something that maps graph inputs to outputs.
enum Runner {
    Interp(Box<Graph>),
    Artifact(Box<kiln_runtime::Model>),
}

impl Runner {
    fn open(path: &Path) -> Result<Runner> {
        if path.extension().is_some_and(|e| e == "so") {
            let m =
                kiln_runtime::Model::load(path).with_context(|| format!("{}", path.display()))?;
            Ok(Runner::Artifact(Box::new(m)))
        } else {
            let m = onnx::load_model(path).with_context(|| format!("{}", path.display()))?;
            Ok(Runner::Interp(Box::new(m.graph)))
        }
    }

    /// Input names, dtypes and static shapes (None where unknown).
    fn inputs(&self) -> Vec<(String, Option<DType>, Option<Vec<usize>>)> {
        match self {
            Runner::Interp(g) => g
                .inputs
                .iter()
                .map(|&v| {
                    let val = g.value(v);
                    (val.name.clone(), val.ty.dtype, val.ty.static_shape())
                })
                .collect(),
            Runner::Artifact(m) => m
                .inputs()
                .iter()
                .map(|i| {
                    (
                        i.name.clone(),
                        DType::from_onnx(i.dtype),
                        Some(i.dims.iter().map(|&d| d as usize).collect()),
                    )
                })
                .collect(),
        }
    }

    /// A runtime session for an artifact (created once, reused for every run), or `None`.
    fn session(&self, threads: usize) -> Result<Option<kiln_runtime::Session<'_>>> {
        Ok(match self {
            Runner::Interp(_) => None,
            Runner::Artifact(m) => Some(kiln_runtime::Session::new(m, threads)?),
        })
    }

    fn run(
        &self,
        session: Option<&mut kiln_runtime::Session<'_>>,
        inputs: &[Tensor],
    ) -> Result<Vec<Tensor>> {
        match (self, session) {
            (Runner::Interp(g), _) => Ok(interp::run(g, inputs)?),
            (Runner::Artifact(_), Some(s)) => super::run::run_session(s, inputs),
            (Runner::Artifact(_), None) => bail!("an artifact runs in a session"),
        }
    }
}

pub fn run(args: &Args) -> Result<ExitCode> {
    let runner = Runner::open(&args.model)?;
    match (&args.perplexity, &args.reference) {
        (Some(tokens), _) => perplexity(&runner, tokens, args),
        (None, Some(reference)) => compare(&runner, reference, args),
        (None, None) => bail!("kiln eval needs --perplexity TOKENS.i32 or --reference MODEL.onnx"),
    }
}

/// Negative log-likelihood of `targets[t]` under `logits[t]` (rows of `vocab`), in f64.
pub fn window_nll(logits: &[f32], vocab: usize, targets: &[i32]) -> Result<f64> {
    let mut nll = 0f64;
    for (t, &target) in targets.iter().enumerate() {
        let row = &logits[t * vocab..(t + 1) * vocab];
        let tok = usize::try_from(target)
            .ok()
            .filter(|&x| x < vocab)
            .with_context(|| format!("token id {target} is outside the vocabulary of {vocab}"))?;
        let mx = row.iter().fold(f64::NEG_INFINITY, |m, &x| m.max(x as f64));
        let sum: f64 = row.iter().map(|&x| ((x as f64) - mx).exp()).sum();
        nll += mx + sum.ln() - row[tok] as f64;
    }
    Ok(nll)
}

fn perplexity(runner: &Runner, tokens_path: &Path, args: &Args) -> Result<ExitCode> {
    let bytes = std::fs::read(tokens_path)
        .with_context(|| format!("cannot read {}", tokens_path.display()))?;
    let tokens = read_tokens(&bytes, tokens_path)?;
    let inputs = runner.inputs();
    let [(name, dtype, shape)] = inputs.as_slice() else {
        bail!(
            "perplexity needs a model with one token-id input; this one has {}",
            inputs.len()
        );
    };
    let w = args.window;
    let dtype = match dtype {
        Some(d @ (DType::I64 | DType::I32)) => *d,
        other => bail!("input '{name}' must be int64 or int32 token ids, not {other:?}"),
    };
    match shape.as_deref() {
        Some([1, n]) if *n == w => {}
        Some(s) => bail!(
            "input '{name}' has shape {s:?}; the model's input length must equal the window ({w}): expected [1, {w}]"
        ),
        None => bail!("input '{name}' has no static shape"),
    }
    if w < 2 {
        bail!("--window must be at least 2");
    }
    let available = tokens.len() / w;
    if available < args.windows {
        bail!(
            "{} holds {} tokens: {available} windows of {w}, fewer than --windows {}",
            tokens_path.display(),
            tokens.len(),
            args.windows
        );
    }
    let bar = ProgressBar::new(args.windows as u64);
    if let Ok(style) = ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} ({eta})") {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message("windows");
    let mut total = 0f64;
    let mut session = runner.session(args.threads)?;
    for i in 0..args.windows {
        let ids = &tokens[i * w..(i + 1) * w];
        let outs = runner.run(session.as_mut(), &[token_tensor(ids, dtype)])?;
        let logits = outs.first().context("the model has no output")?;
        let vocab = match logits.shape.as_slice() {
            [1, n, v] if *n == w => *v,
            s => bail!("the first output must be logits [1, {w}, V], got {s:?}"),
        };
        let vals = logits
            .as_slice::<f32>()
            .context("the logits must be float32")?;
        let nll = window_nll(vals, vocab, &ids[1..])?;
        bar.suspend(|| println!("window {i}: nll {nll:.4}"));
        total += nll;
        bar.inc(1);
    }
    bar.finish_and_clear();
    let predictions = args.windows * (w - 1);
    println!(
        "{} windows of {w} tokens, {predictions} predictions, mean nll {:.6}",
        args.windows,
        total / predictions as f64
    );
    println!("perplexity: {:.6}", (total / predictions as f64).exp());
    Ok(ExitCode::SUCCESS)
}

fn compare(runner: &Runner, reference: &Path, args: &Args) -> Result<ExitCode> {
    let dir = args
        .inputs_dir
        .as_deref()
        .context("--reference needs --inputs-dir")?;
    let reference_model =
        onnx::load_model(reference).with_context(|| format!("{}", reference.display()))?;
    let rg = &reference_model.graph;
    let inputs = super::run::read_inputs(rg, Some(dir), &[])?;
    let expected = interp::run(rg, &inputs)?;
    let mut session = runner.session(args.threads)?;
    let got = runner.run(session.as_mut(), &inputs)?;
    if got.len() != expected.len() {
        bail!(
            "the model has {} outputs, the reference {}",
            got.len(),
            expected.len()
        );
    }
    for (k, (g, e)) in got.iter().zip(&expected).enumerate() {
        let name = &rg.value(rg.outputs[k]).name;
        if g.shape != e.shape {
            bail!(
                "output '{name}': shape {:?}, reference {:?}",
                g.shape,
                e.shape
            );
        }
        let (a, b) = (g.to_f64_vec(), e.to_f64_vec());
        let (mut dot, mut na, mut nb, mut max_err) = (0f64, 0f64, 0f64, 0f64);
        for (x, y) in a.iter().zip(&b) {
            dot += x * y;
            na += x * x;
            nb += y * y;
            max_err = max_err.max((x - y).abs());
        }
        let cosine = if na > 0.0 && nb > 0.0 {
            dot / (na.sqrt() * nb.sqrt())
        } else {
            f64::NAN
        };
        println!("{name}: cosine similarity {cosine:.6}, max abs error {max_err:.6e}");
    }
    Ok(ExitCode::SUCCESS)
}
