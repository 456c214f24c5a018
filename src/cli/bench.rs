//! `kiln bench`: times a compiled artifact through kiln-runtime on this machine. Inputs come
//! from `input_N.pb` files (`--inputs-dir`) or are generated deterministically from the
//! artifact's input types (floats in [-1, 1), token ids in 0..100, masks of ones); after W
//! warm-up runs, N timed runs give the median, p95 and minimum latency, and the process's peak
//! resident memory (VmHWM) is reported. With `--onnx MODEL.onnx` the same inputs, written as
//! `input_N.pb` files, also run through onnxruntime (`scripts/ort_bench.py`, embedded here and
//! run by the test venv's Python) with the same thread count and run counts, so the two
//! engines are measured in one invocation under the same conditions and compared by median.
//! With `--memory` the machine's memory bandwidth is measured in the same invocation (a
//! STREAM-like copy and a read of buffers far larger than the caches, split over the same
//! threads), and the artifact's weight bytes per run over its median time are set against it:
//! for a matrix-vector-bound model (an LLM generating a token) that ratio is the ceiling.

use anyhow::{bail, Context, Result};
use kiln_compiler::onnx::tensor_proto;
use kiln_compiler::{DType, Tensor, TensorData};
use kiln_runtime::{Model, Session, TensorInfo};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Instant;

/// The onnxruntime side, run as `python ort_bench.py ...`; see the script for its protocol.
const ORT_SCRIPT: &str = include_str!("../../scripts/ort_bench.py");
/// The script's exit status when numpy, onnx or onnxruntime cannot be imported.
const ORT_MISSING_MODULE: i32 = 3;
/// The script's exit status when the model's inputs do not match the input files.
const ORT_INPUT_MISMATCH: i32 = 4;
/// What `scripts/setup-test-env` installs into the venv.
const ORT_PIN: &str = "onnxruntime==1.31.1";

/// The command line of `kiln bench`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The compiled artifact (.so).
    pub artifact: PathBuf,
    /// Timed runs.
    #[arg(long, default_value_t = 20)]
    pub runs: usize,
    /// Untimed warm-up runs before the timed ones.
    #[arg(long, default_value_t = 3)]
    pub warmup: usize,
    /// Threads in all (default: one per available core); onnxruntime gets the same
    /// intra-op thread count.
    #[arg(long)]
    pub threads: Option<usize>,
    /// Folder with input_N.pb files; without it inputs are generated deterministically.
    #[arg(long)]
    pub inputs_dir: Option<PathBuf>,
    /// Also time onnxruntime on this ONNX model with the same inputs.
    #[arg(long, value_name = "MODEL.onnx")]
    pub onnx: Option<PathBuf>,
    /// Also measure memory bandwidth (copy and read of 256 MiB with the same threads) and
    /// report the weight bytes streamed per second against it.
    #[arg(long)]
    pub memory: bool,
    /// Python with onnxruntime (default: $KILN_CACHE/venv/bin/python).
    #[arg(long, value_name = "PATH")]
    pub python: Option<PathBuf>,
    /// Repeat the measurements in this many alternating rounds (Kiln, onnxruntime, memory;
    /// each with its warm-up) and report statistics over all rounds' runs, so that a burst
    /// of load from elsewhere on a shared machine weighs on both sides alike.
    #[arg(long, default_value_t = 1)]
    pub rounds: usize,
}

/// Latency statistics of a series of runs, in milliseconds.
#[derive(Debug, Clone, Copy)]
pub struct Stats {
    pub median: f64,
    pub p95: f64,
    pub min: f64,
}

impl Stats {
    /// Median (mean of the two middle values for an even count), nearest-rank 95th
    /// percentile, and minimum. `times` must not be empty.
    pub fn of(times: &[f64]) -> Stats {
        let mut t = times.to_vec();
        t.sort_by(f64::total_cmp);
        let n = t.len();
        let median = if n % 2 == 1 {
            t[n / 2]
        } else {
            (t[n / 2 - 1] + t[n / 2]) / 2.0
        };
        let rank = (0.95 * n as f64).ceil() as usize;
        Stats {
            median,
            p95: t[rank.clamp(1, n) - 1],
            min: t[0],
        }
    }

    fn line(&self, threads: usize) -> String {
        format!(
            "median {:.2} ms, p95 {:.2} ms, min {:.2} ms, {threads} thread{}",
            self.median,
            self.p95,
            self.min,
            if threads == 1 { "" } else { "s" }
        )
    }
}

pub fn run(args: &Args) -> Result<ExitCode> {
    if args.runs == 0 {
        bail!("--runs must be at least 1");
    }
    if args.rounds == 0 {
        bail!("--rounds must be at least 1");
    }
    let threads = match args.threads {
        Some(0) => bail!("--threads must be at least 1"),
        Some(t) => t,
        None => std::thread::available_parallelism().map_or(1, |n| n.get()),
    };
    let model =
        Model::load(&args.artifact).with_context(|| format!("{}", args.artifact.display()))?;
    let inputs = match &args.inputs_dir {
        Some(dir) => read_inputs(&model, dir)?,
        None => model
            .inputs()
            .iter()
            .enumerate()
            .map(|(k, info)| generate(k, info))
            .collect::<Result<_>>()?,
    };

    // Everything onnxruntime needs is checked before timing anything, so that a missing
    // Python package fails at once with one error line.
    let ort = match &args.onnx {
        Some(onnx) => Some(OrtRun::prepare(args, onnx, &model, &inputs)?),
        None => None,
    };

    let source = match &args.inputs_dir {
        Some(d) => format!("inputs from {}", d.display()),
        None => "generated inputs".to_string(),
    };
    let rounds = match args.rounds {
        1 => String::new(),
        r => format!(" in each of {r} alternating rounds"),
    };
    println!(
        "bench {} (target {}): {} runs after {} warm-up{rounds}, {source}",
        args.artifact.display(),
        model.target(),
        args.runs,
        args.warmup
    );
    let weight_bytes = if args.memory {
        let (info, _) = super::inspect::model_info(&args.artifact)?;
        let bytes = info
            .iter()
            .find(|(k, _)| k == "weight_bytes")
            .and_then(|(_, v)| v.parse::<f64>().ok())
            .context("the artifact's model info has no weight_bytes")?;
        Some(bytes)
    } else {
        None
    };
    let (mut kiln_times, mut ort_times, mut ort_rss) = (Vec::new(), Vec::new(), None);
    let mut bandwidth: Option<Bandwidth> = None;
    // Allocated at the first measurement, after Kiln's peak memory is read, and reused.
    let mut probe: Option<MemoryProbe> = None;
    // Kiln's peak memory is read after its first runs, before the bandwidth buffers exist.
    let mut kiln_rss = None;
    for _ in 0..args.rounds {
        kiln_times.extend(time_kiln(&model, &inputs, threads, args.warmup, args.runs)?);
        kiln_rss = kiln_rss.or_else(peak_rss_mib);
        if let Some(ort) = &ort {
            let (times, rss) = ort.run(threads, args.warmup, args.runs)?;
            ort_times.extend(times);
            ort_rss = ort_rss.max(rss);
        }
        if weight_bytes.is_some() {
            let bw = probe.get_or_insert_with(MemoryProbe::new).measure(threads);
            bandwidth = Some(bandwidth.map_or(bw, |b| b.best(bw)));
        }
    }
    let kiln = Stats::of(&kiln_times);
    let peak = kiln_rss.map_or_else(|| "unknown".to_string(), |m| format!("{m} MiB"));
    println!("kiln: {}, peak RSS {peak}", kiln.line(threads));
    if let Some(bytes) = weight_bytes {
        println!(
            "kiln weights: {:.2} GB/s ({bytes:.0} weight bytes per run / median)",
            bytes / kiln.median / 1e6
        );
    }
    let mut ort_median = None;
    if ort.is_some() {
        let stats = Stats::of(&ort_times);
        ort_median = Some(stats.median);
        let rss = ort_rss
            .map(|m| format!(", peak RSS {m} MiB (Python process)"))
            .unwrap_or_default();
        println!("onnxruntime: {}{rss}", stats.line(threads));
        println!(
            "ratio kiln/onnxruntime (median): {:.2}x",
            kiln.median / stats.median
        );
    }
    if let (Some(bytes), Some(bw)) = (weight_bytes, bandwidth) {
        println!(
            "memory ({} MiB buffers, {threads} thread{}, best of {}): copy {:.2} GB/s (bytes read + written), read {:.2} GB/s",
            MEMORY_BYTES >> 20,
            if threads == 1 { "" } else { "s" },
            MEMORY_ROUNDS * args.rounds,
            bw.copy / 1e9,
            bw.read / 1e9
        );
        let share = |median_ms: f64| bytes / (median_ms / 1e3) / bw.read * 100.0;
        println!("kiln weights / read bandwidth: {:.0}%", share(kiln.median));
        if let Some(m) = ort_median {
            println!(
                "onnxruntime weights: {:.2} GB/s, {:.0}% of read bandwidth",
                bytes / m / 1e6,
                share(m)
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Size of each buffer of the memory bandwidth measurement (far beyond any cache).
const MEMORY_BYTES: usize = 256 << 20;
/// Rounds of each measurement; the best one is reported, as STREAM does.
const MEMORY_ROUNDS: usize = 5;

#[derive(Clone, Copy)]
struct Bandwidth {
    /// Bytes read plus bytes written per second.
    copy: f64,
    /// Bytes read per second.
    read: f64,
}

impl Bandwidth {
    /// The better of two measurements, figure by figure.
    fn best(self, other: Bandwidth) -> Bandwidth {
        Bandwidth {
            copy: self.copy.max(other.copy),
            read: self.read.max(other.read),
        }
    }
}

/// The two 256 MiB buffers of a STREAM-like measurement.
struct MemoryProbe {
    src: Vec<u64>,
    dst: Vec<u64>,
}

impl MemoryProbe {
    fn new() -> MemoryProbe {
        let words = MEMORY_BYTES / 8;
        MemoryProbe {
            src: (0..words as u64).collect(),
            dst: vec![0u64; words],
        }
    }

    /// `threads` threads each copy (then read) their share of the buffers; the best of
    /// [`MEMORY_ROUNDS`] rounds counts.
    fn measure(&mut self, threads: usize) -> Bandwidth {
        let chunk = self.src.len().div_ceil(threads);
        let (src, dst) = (&self.src, &mut self.dst);
        let mut best = Bandwidth {
            copy: 0.0,
            read: 0.0,
        };
        for _ in 0..MEMORY_ROUNDS {
            let t0 = Instant::now();
            std::thread::scope(|s| {
                for (d, a) in dst.chunks_mut(chunk).zip(src.chunks(chunk)) {
                    s.spawn(move || d.copy_from_slice(a));
                }
            });
            let copy = 2.0 * MEMORY_BYTES as f64 / t0.elapsed().as_secs_f64();
            let t0 = Instant::now();
            let total: u64 = std::thread::scope(|s| {
                let parts: Vec<_> = src
                    .chunks(chunk)
                    .map(|a| s.spawn(move || read_all(a)))
                    .collect();
                parts.into_iter().map(|p| p.join().unwrap_or(0)).sum()
            });
            let read = MEMORY_BYTES as f64 / t0.elapsed().as_secs_f64();
            std::hint::black_box(total);
            best = best.best(Bandwidth { copy, read });
        }
        std::hint::black_box(&self.dst);
        best
    }
}

/// Bytes ahead of the read position that [`read_all`] prefetches, as Kiln's int8 mat-vec
/// tiles do: hardware prefetchers stop at 4 KiB pages, so a reader that only relies on them
/// reads more slowly than the memory can deliver.
const PREFETCH_AHEAD: usize = 8192;

/// Sums a slice with independent accumulators, so that loads, not additions, bound it,
/// prefetching [`PREFETCH_AHEAD`] bytes ahead on x86-64.
fn read_all(a: &[u64]) -> u64 {
    let mut acc = [0u64; 8];
    for c in a.chunks_exact(8) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: a prefetch is a hint; it never faults, whatever the address.
        unsafe {
            use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
            _mm_prefetch::<_MM_HINT_T0>(c.as_ptr().cast::<i8>().wrapping_add(PREFETCH_AHEAD));
        }
        for (x, y) in acc.iter_mut().zip(c) {
            *x = x.wrapping_add(*y);
        }
    }
    acc.iter().fold(0, |s, x| s.wrapping_add(*x))
}

/// Warm-up and timed runs of the artifact in one session with `threads` threads; the times of
/// the timed runs in milliseconds.
fn time_kiln(
    model: &Model,
    inputs: &[Tensor],
    threads: usize,
    warmup: usize,
    runs: usize,
) -> Result<Vec<f64>> {
    let mut session = Session::new(model, threads)?;
    let ins: Vec<Vec<u8>> = inputs.iter().map(Tensor::to_le_bytes).collect();
    let ins: Vec<&[u8]> = ins.iter().map(Vec::as_slice).collect();
    let mut outputs: Vec<Vec<u8>> = model
        .outputs()
        .iter()
        .map(|o| {
            o.byte_size()
                .map(|n| vec![0u8; n])
                .with_context(|| format!("output {o} has no valid size"))
        })
        .collect::<Result<_>>()?;
    let mut outs: Vec<&mut [u8]> = outputs.iter_mut().map(Vec::as_mut_slice).collect();
    for _ in 0..warmup {
        session.run(&ins, &mut outs)?;
    }
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        let t = Instant::now();
        session.run(&ins, &mut outs)?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    Ok(times)
}

/// `input_N.pb` files in the artifact's input order, checked against its input types.
fn read_inputs(model: &Model, dir: &Path) -> Result<Vec<Tensor>> {
    let mut out = Vec::new();
    for (k, info) in model.inputs().iter().enumerate() {
        let path = dir.join(format!("input_{k}.pb"));
        let (_, t) = tensor_proto::read_tensor_file(&path)?;
        let want: Vec<usize> = info.dims.iter().map(|&d| d as usize).collect();
        if t.dtype().onnx_code() != info.dtype || t.shape != want {
            bail!(
                "{}: input '{}' of the artifact is {}{:?}, the file holds {}{:?}",
                path.display(),
                info.name,
                info.dtype_name(),
                want,
                t.dtype(),
                t.shape
            );
        }
        out.push(t);
    }
    Ok(out)
}

/// A deterministic input for `info`: floats uniform in [-1, 1); integers by name: `*mask*`
/// ones, `*type*` (token type ids) zeros, `*position*` 0, 1, 2, ... along the last axis,
/// anything else (token ids) in 0..100; booleans true.
fn generate(k: usize, info: &TensorInfo) -> Result<Tensor> {
    let dtype = DType::from_onnx(info.dtype).with_context(|| {
        format!(
            "input '{}' has an unsupported dtype {}",
            info.name,
            info.dtype_name()
        )
    })?;
    let shape: Vec<usize> = info.dims.iter().map(|&d| d as usize).collect();
    let n: usize = shape.iter().product();
    let last = shape.last().copied().unwrap_or(1).max(1);
    let name = info.name.to_ascii_lowercase();
    // SplitMix64, seeded by the input's position: the same inputs on every run.
    let mut state = 0x9E37_79B9_7F4A_7C15u64.wrapping_mul(k as u64 + 1);
    let mut next = move || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    let values: Vec<f64> = if dtype.is_float() {
        (0..n)
            .map(|_| (next() >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0)
            .collect()
    } else if dtype == DType::Bool || name.contains("mask") {
        vec![1.0; n]
    } else if name.contains("type") {
        vec![0.0; n]
    } else if name.contains("position") {
        (0..n).map(|i| (i % last) as f64).collect()
    } else {
        (0..n).map(|_| (next() % 100) as f64).collect()
    };
    Ok(Tensor::new(
        shape,
        TensorData::from_f64s(dtype, values.into_iter()),
    ))
}

/// Peak resident set size of this process (VmHWM), in MiB.
fn peak_rss_mib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib.div_ceil(1024))
}

/// The venv's Python: `$KILN_CACHE/venv/bin/python`, `KILN_CACHE` defaulting to ~/.cache/kiln.
fn default_python() -> PathBuf {
    let cache = match std::env::var_os("KILN_CACHE") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/kiln"),
    };
    cache.join("venv/bin/python")
}

/// An onnxruntime measurement, prepared: the script and inputs on disk, Python checked.
struct OrtRun {
    python: PathBuf,
    onnx: PathBuf,
    /// Holds the script and, for generated inputs, the `input_N.pb` files.
    dir: tempfile::TempDir,
    inputs_dir: PathBuf,
}

impl OrtRun {
    fn prepare(args: &Args, onnx: &Path, model: &Model, inputs: &[Tensor]) -> Result<OrtRun> {
        if !onnx.is_file() {
            bail!("--onnx {}: no such file", onnx.display());
        }
        let python = args.python.clone().unwrap_or_else(default_python);
        let dir = tempfile::Builder::new().prefix("kiln-bench-").tempdir()?;
        std::fs::write(dir.path().join("ort_bench.py"), ORT_SCRIPT)?;
        let inputs_dir = match &args.inputs_dir {
            Some(d) => d.clone(),
            None => {
                for (k, (t, info)) in inputs.iter().zip(model.inputs()).enumerate() {
                    let path = dir.path().join(format!("input_{k}.pb"));
                    tensor_proto::write_tensor_file(&path, &info.name, t)?;
                }
                dir.path().to_path_buf()
            }
        };
        let ort = OrtRun {
            python,
            onnx: onnx.to_path_buf(),
            dir,
            inputs_dir,
        };
        ort.invoke(&["--check"])?;
        Ok(ort)
    }

    /// Runs the script with `extra` arguments and returns its standard output.
    fn invoke(&self, extra: &[&str]) -> Result<String> {
        let script = self.dir.path().join("ort_bench.py");
        let out = Command::new(&self.python)
            .arg(&script)
            .args(["--model".as_ref(), self.onnx.as_os_str()])
            .args(["--inputs-dir".as_ref(), self.inputs_dir.as_os_str()])
            .args(extra)
            .output();
        let py = self.python.display();
        let out = match out {
            Ok(o) => o,
            Err(e) => bail!(
                "cannot run Python {py} for onnxruntime ({e}): run scripts/setup-test-env to create the venv, or pass --python PATH"
            ),
        };
        let stderr = String::from_utf8_lossy(&out.stderr);
        let last = stderr
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("")
            .trim();
        match out.status.code() {
            Some(0) => Ok(String::from_utf8_lossy(&out.stdout).into_owned()),
            Some(ORT_MISSING_MODULE) => bail!(
                "onnxruntime is not usable with {py} ({last}): install it with `{py} -m pip install {ORT_PIN} onnx numpy` or run scripts/setup-test-env"
            ),
            Some(ORT_INPUT_MISMATCH) => bail!("--onnx {}: {last}", self.onnx.display()),
            _ => bail!("onnxruntime failed on {}: {last}", self.onnx.display()),
        }
    }

    /// Times onnxruntime; returns the times of its timed runs in milliseconds and the Python
    /// process's peak RSS in MiB.
    fn run(&self, threads: usize, warmup: usize, runs: usize) -> Result<(Vec<f64>, Option<u64>)> {
        let stdout = self.invoke(&[
            "--threads",
            &threads.to_string(),
            "--warmup",
            &warmup.to_string(),
            "--runs",
            &runs.to_string(),
        ])?;
        let mut times = Vec::new();
        let mut rss = None;
        for line in stdout.lines() {
            if let Some(rest) = line.strip_prefix("times_ms:") {
                times = rest
                    .split_whitespace()
                    .map(str::parse::<f64>)
                    .collect::<Result<_, _>>()
                    .context("onnxruntime script: bad times_ms line")?;
            } else if let Some(rest) = line.strip_prefix("peak_rss_kib:") {
                rss = rest.trim().parse::<u64>().ok().map(|k| k.div_ceil(1024));
            }
        }
        if times.len() != runs {
            bail!(
                "onnxruntime script reported {} times for {runs} runs",
                times.len()
            );
        }
        Ok((times, rss))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats() {
        let s = Stats::of(&[3.0, 1.0, 2.0]);
        assert_eq!((s.median, s.p95, s.min), (2.0, 3.0, 1.0));
        let t: Vec<f64> = (1..=20).map(f64::from).collect();
        let s = Stats::of(&t);
        assert_eq!((s.median, s.p95, s.min), (10.5, 19.0, 1.0));
        assert_eq!(Stats::of(&[5.0]).p95, 5.0);
    }

    #[test]
    fn generated_inputs_are_deterministic_and_in_range() {
        let ids = TensorInfo {
            name: "input_ids".into(),
            dtype: 7,
            dims: vec![1, 64],
        };
        let a = generate(0, &ids).unwrap();
        assert_eq!(a.to_i64_vec(), generate(0, &ids).unwrap().to_i64_vec());
        assert!(a.to_i64_vec().iter().all(|v| (0..100).contains(v)));
        let mask = TensorInfo {
            name: "attention_mask".into(),
            dtype: 7,
            dims: vec![2, 3],
        };
        assert_eq!(generate(1, &mask).unwrap().to_i64_vec(), vec![1; 6]);
        let x = TensorInfo {
            name: "x".into(),
            dtype: 1,
            dims: vec![100],
        };
        assert!(generate(0, &x)
            .unwrap()
            .to_f64_vec()
            .iter()
            .all(|v| (-1.0..1.0).contains(v)));
    }
}
