//! YAML compile configs (`kiln compile --config FILE.yaml`). A config has the sections
//! `model_compilation` (model, target_format, target_device: one target or a list, dims),
//! `quantization` (mode, group_size, symmetric / zero_point, method, calibration,
//! calibration_samples, exclude / include globs, per-layer overrides), `kernel_schedule`
//! (vectorization, loop_unroll_factor, threads) and `output` (artifact, with `{target}`
//! standing for the target name, and emit_onnx); relative paths are relative to the YAML file's
//! folder. The text is parsed with serde_yaml_ng into a [`Value`] tree which is checked key by
//! key against the schema, so that every problem (syntax, unknown key with a suggestion,
//! section of a later stage, wrong type, inconsistent settings, conflict with a command-line
//! flag) becomes a typed [`ConfigError`] carrying `file:line:column`. serde_yaml_ng's own
//! errors do carry a location, but only with serde's fixed message text and without
//! suggestions; so positions are recovered separately by [`locate`], which re-reads the text
//! with a serde visitor that fails exactly at the wanted key or value: serde_yaml_ng stamps
//! such an error with the position of the YAML node being read.

use kiln_passes::prune::{Amount, Criterion, Norm, PruneOptions, StructureKind};
use kiln_passes::quantize::{Glob, Precision};
use kiln_targets::{Isa, Target, Vectors};
use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_yaml_ng::Value;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};

/// Sections this version implements, in the order a config usually lists them.
const SECTIONS: &[&str] = &[
    "model_compilation",
    "pipeline",
    "pruning",
    "quantization",
    "kernel_schedule",
    "output",
];
/// Sections of the design that later stages implement; present in a config they are an error.
const LATER_SECTIONS: &[&str] = &["runtime"];
/// Graph-transforming stages `pipeline` may order; pruning must come before quantization.
const STAGES: &[&str] = &["pruning", "quantization"];
const PRUNE_KEYS: &[&str] = &[
    "method",
    "criterion",
    "norm",
    "ratios",
    "layers",
    "keep",
    "multiple",
    "calibration",
    "calibration_samples",
];
const QUANT_KEYS: &[&str] = &[
    "mode",
    "group_size",
    "symmetric",
    "zero_point",
    "method",
    "activations",
    "calibration",
    "calibration_samples",
    "exclude",
    "include",
    "overrides",
];
const MODEL_KEYS: &[&str] = &["model", "target_format", "target_device", "dims"];
const SCHEDULE_KEYS: &[&str] = &["vectorization", "loop_unroll_factor", "threads"];
const SCHEDULE_LATER_KEYS: &[&str] = &["prefetch_distance", "tile_sizes"];
const OUTPUT_KEYS: &[&str] = &["artifact", "emit_onnx"];
const OUTPUT_LATER_KEYS: &[&str] = &["export_format"];
const TARGET_PLACEHOLDER: &str = "{target}";

/// A 1-based line and column in the YAML text.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pos {
    pub line: usize,
    pub column: usize,
}

/// Why a config was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {}: {cause}", .path.display())]
    Read {
        path: PathBuf,
        cause: std::io::Error,
    },
    /// A problem at a place in the file; displays as `file:line:column: problem`.
    #[error("{file}:{}:{}: {problem}", .pos.line, .pos.column)]
    At {
        file: String,
        pos: Pos,
        problem: Box<Problem>,
    },
}

/// What is wrong at a place of a config. Keys are written as dotted paths
/// (`kernel_schedule.threads`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Problem {
    #[error("invalid YAML: {0}")]
    Syntax(String),
    #[error("the config is empty (expected the sections {})", SECTIONS.join(", "))]
    Empty,
    #[error("unknown section '{name}'{}", hint(.suggestion, SECTIONS))]
    UnknownSection {
        name: String,
        suggestion: Option<&'static str>,
    },
    #[error("unknown key '{key}' in {section}{}", key_hint(.suggestion, .section))]
    UnknownKey {
        key: String,
        section: &'static str,
        suggestion: Suggestion,
    },
    #[error(
        "section '{0}' is not supported yet (this version implements {sections})",
        sections = SECTIONS.join(", ")
    )]
    SectionNotSupportedYet(String),
    #[error("key '{key}' in {section} is not supported yet")]
    KeyNotSupportedYet { key: String, section: &'static str },
    #[error("{key}: expected {expected}, got {got}")]
    WrongType {
        key: String,
        expected: &'static str,
        got: String,
    },
    #[error("{key}: '{value}' is not one of {}{}", .allowed.join(", "), hint(.suggestion, &[]))]
    BadValue {
        key: String,
        value: String,
        allowed: Vec<&'static str>,
        suggestion: Option<&'static str>,
    },
    #[error("{key}: {reason}")]
    NotSupported { key: String, reason: String },
    #[error("missing key '{key}' in {section}{}", or_flag(.flag))]
    MissingKey {
        key: &'static str,
        section: &'static str,
        flag: Option<&'static str>,
    },
    #[error("missing section '{section}'{}", or_flag(.flag))]
    MissingSection {
        section: &'static str,
        flag: Option<&'static str>,
    },
    #[error(
        "unknown target '{name}'{} (targets: {})",
        hint(.suggestion, &[]),
        target_names().join(", ")
    )]
    UnknownTarget {
        name: String,
        suggestion: Option<&'static str>,
    },
    #[error("model_compilation.target_device: target '{0}' is listed twice")]
    DuplicateTarget(String),
    #[error("model_compilation.model: {written} not found (looked for {})", .resolved.display())]
    ModelNotFound { written: String, resolved: PathBuf },
    #[error("{key}: {reason}")]
    Inconsistent { key: String, reason: String },
    #[error("model_compilation.dims.{0}: no input of the model has this dimension")]
    UnusedDim(String),
    #[error(
        "input '{input}' has dynamic dimension '{dim}'; bind it in model_compilation.dims \
         ({dim}: VALUE) or with --dim {dim}=VALUE"
    )]
    UnboundDim { input: String, dim: String },
    #[error(
        "{key} {config_value} conflicts with {flag} on the command line; give it in one place"
    )]
    Conflict {
        key: String,
        config_value: String,
        flag: String,
    },
}

/// A suggestion for an unknown key: a close spelling, or the section where the key belongs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Suggestion {
    None,
    DidYouMean(&'static str),
    BelongsIn(&'static str),
}

fn hint(suggestion: &Option<&str>, known: &[&str]) -> String {
    match suggestion {
        Some(s) => format!("; did you mean '{s}'?"),
        None if !known.is_empty() => format!(" (known: {})", known.join(", ")),
        None => String::new(),
    }
}

fn key_hint(suggestion: &Suggestion, section: &str) -> String {
    match suggestion {
        Suggestion::DidYouMean(s) => format!("; did you mean '{s}'?"),
        Suggestion::BelongsIn(other) => format!("; it belongs in {other}"),
        Suggestion::None => format!(" (known: {})", section_keys(section).join(", ")),
    }
}

fn or_flag(flag: &Option<&'static str>) -> String {
    flag.map(|f| format!(" (or pass {f} on the command line)"))
        .unwrap_or_default()
}

fn target_names() -> Vec<&'static str> {
    kiln_targets::TARGETS.iter().map(|t| t.name).collect()
}

fn section_keys(section: &str) -> &'static [&'static str] {
    match section {
        "model_compilation" => MODEL_KEYS,
        "kernel_schedule" => SCHEDULE_KEYS,
        "quantization" => QUANT_KEYS,
        "pruning" => PRUNE_KEYS,
        "output" => OUTPUT_KEYS,
        _ => &[],
    }
}

fn later_keys(section: &str) -> &'static [&'static str] {
    match section {
        "kernel_schedule" => SCHEDULE_LATER_KEYS,
        "output" => OUTPUT_LATER_KEYS,
        _ => &[],
    }
}

/// `kernel_schedule.vectorization`. `auto` (the default) uses the target's own vectors.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Vectorization {
    #[default]
    Auto,
    None,
    Neon,
    Sve,
    Cuda,
}

impl Vectorization {
    const NAMES: &'static [&'static str] = &["auto", "none", "neon", "sve", "cuda"];

    pub fn name(self) -> &'static str {
        match self {
            Vectorization::Auto => "auto",
            Vectorization::None => "none",
            Vectorization::Neon => "neon",
            Vectorization::Sve => "sve",
            Vectorization::Cuda => "cuda",
        }
    }

    /// Whether `target` can honour this setting.
    pub fn fits(self, target: &Target) -> bool {
        match self {
            Vectorization::Auto => true,
            Vectorization::None => target.isa != Isa::Ptx,
            Vectorization::Neon => {
                target.isa == Isa::Aarch64 && matches!(target.vectors, Vectors::Fixed(_))
            }
            Vectorization::Sve => matches!(target.vectors, Vectors::Scalable { .. }),
            Vectorization::Cuda => target.isa == Isa::Ptx,
        }
    }

    /// Whether `target` can honour this setting, and if not, why.
    pub fn check(self, target: &Target) -> Result<(), String> {
        if self.fits(target) {
            return Ok(());
        }
        let why = match self {
            Vectorization::None => "a CUDA target always runs on warp lanes".to_string(),
            _ => format!(
                "{} vectors exist only on {}",
                self.name(),
                self.targets().join(", ")
            ),
        };
        let accepted: Vec<&str> = [
            Vectorization::Auto,
            Vectorization::None,
            Vectorization::Neon,
            Vectorization::Sve,
            Vectorization::Cuda,
        ]
        .into_iter()
        .filter(|v| v.fits(target))
        .map(Vectorization::name)
        .collect();
        Err(format!(
            "'{}' does not fit target {}: {why}; {} accepts {}",
            self.name(),
            target.name,
            target.name,
            accepted.join(" or ")
        ))
    }

    /// The targets this setting fits (for messages).
    fn targets(self) -> Vec<&'static str> {
        kiln_targets::TARGETS
            .iter()
            .filter(|t| self.fits(t))
            .map(|t| t.name)
            .collect()
    }
}

/// `model_compilation.target_format`: the kind of artifact written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TargetFormat {
    /// A self-contained ELF shared object.
    #[default]
    So,
}

/// The `kernel_schedule` settings, passed on with the compile plan. Code generation does not
/// consume them yet: `vectorization` is checked against the targets (codegen always uses the
/// target's own vectors), `loop_unroll_factor` waits for the loop-unrolling schedule of the
/// loop IR, and `threads` for a default thread count stored in the artifact (today the runtime
/// takes the thread count per session). The compile report says so.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ScheduleOptions {
    pub vectorization: Vectorization,
    pub loop_unroll_factor: Option<u32>,
    pub threads: Option<usize>,
}

/// A parsed and checked config, before command-line flags are merged in ([`Config::resolve`]).
#[derive(Debug, Clone)]
pub struct Config {
    src: Source,
    base_dir: PathBuf,
    /// The model path, resolved against the YAML file's folder.
    pub model: Option<PathBuf>,
    pub target_format: TargetFormat,
    /// Empty when the config names no target.
    pub targets: Vec<&'static Target>,
    pub dims: BTreeMap<String, usize>,
    pub schedule: ScheduleOptions,
    /// `output.artifact` as written (relative to the YAML folder, may contain `{target}`).
    pub artifact: Option<String>,
    pub quantization: Option<QuantSettings>,
    pub pruning: Option<PruneSettings>,
    /// `output.emit_onnx`, resolved against the YAML file's folder.
    pub emit_onnx: Option<PathBuf>,
    /// Which of quantization.symmetric / zero_point were given (they must agree).
    quant_keys_seen: Vec<&'static str>,
}

/// Command-line flags given next to `--config`.
#[derive(Debug, Default, Clone)]
pub struct Flags {
    pub model: Option<PathBuf>,
    pub target: Option<&'static Target>,
    pub output: Option<PathBuf>,
    pub dims: HashMap<String, usize>,
}

/// `quantization.method`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum QuantMethod {
    /// Round to nearest.
    #[default]
    Rtn,
    /// Activation-aware scaling searched on calibration data, then round to nearest.
    Awq,
}

/// `quantization.activations`: what the quantized products multiply the weights with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Activations {
    /// f32 activations times weights dequantized in registers.
    #[default]
    F32,
    /// Activations quantized to int8 per group at run time, integer dot products (MatMulNBits
    /// accuracy level 4): faster, slightly less accurate.
    Int8,
}

/// The `quantization` section (or the `--quantize` flags): weight-only quantization settings.
#[derive(Clone, Debug, PartialEq)]
pub struct QuantSettings {
    /// Int4 or Int8 for the layers no override names.
    pub precision: Precision,
    pub group_size: usize,
    pub symmetric: bool,
    pub method: QuantMethod,
    pub activations: Activations,
    /// A folder of `test_data_set_*`/`input_N.pb` sets, one such set, or a token-id file.
    pub calibration: Option<PathBuf>,
    pub calibration_samples: usize,
    pub exclude: Vec<String>,
    pub include: Vec<String>,
    /// Per-layer precision by node or weight name glob, first match wins.
    pub overrides: Vec<(String, Precision)>,
    /// Precision of the excluded layers (f16 or f32).
    pub excluded_precision: Precision,
}

impl Default for QuantSettings {
    fn default() -> Self {
        QuantSettings {
            precision: Precision::Int4,
            group_size: 128,
            symmetric: false,
            method: QuantMethod::Rtn,
            activations: Activations::F32,
            calibration: None,
            calibration_samples: 128,
            exclude: Vec::new(),
            include: Vec::new(),
            overrides: Vec::new(),
            excluded_precision: Precision::F16,
        }
    }
}

/// Quantization modes: weight precision, then the precision of excluded layers.
pub const QUANT_MODES: &[&str] = &["q4f16", "q4f32", "q4", "q8f16", "q8f32", "q8"];

/// `q4f16` -> (Int4, F16): the quantized layers' precision and the excluded layers'.
pub fn parse_quant_mode(mode: &str) -> Option<(Precision, Precision)> {
    Some(match mode {
        "q4" | "q4f16" => (Precision::Int4, Precision::F16),
        "q4f32" => (Precision::Int4, Precision::F32),
        "q8" | "q8f16" => (Precision::Int8, Precision::F16),
        "q8f32" => (Precision::Int8, Precision::F32),
        _ => return None,
    })
}

/// A setting that contradicts another: the key of its section it is most about, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    pub key: &'static str,
    pub reason: String,
}

impl fmt::Display for Invalid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.reason)
    }
}

fn invalid(key: &'static str, reason: impl Into<String>) -> Result<(), Invalid> {
    Err(Invalid {
        key,
        reason: reason.into(),
    })
}

/// Calibration settings shared by quantization and pruning.
fn check_calibration(calibration: &Option<PathBuf>, samples: usize) -> Result<(), Invalid> {
    if let Some(c) = calibration {
        if !c.exists() {
            return invalid(
                "calibration",
                format!("calibration data {} not found", c.display()),
            );
        }
    }
    if samples == 0 {
        return invalid(
            "calibration_samples",
            "calibration_samples must be at least 1",
        );
    }
    Ok(())
}

/// Settings that contradict each other, whatever the model.
pub fn check_quantization(q: &QuantSettings) -> Result<(), Invalid> {
    if !(q.group_size >= 16 && q.group_size.is_power_of_two()) {
        return invalid(
            "group_size",
            format!(
                "group size {} is not supported: use a power of two of at least 16 (32, 64 or 128)",
                q.group_size
            ),
        );
    }
    if q.activations == Activations::Int8 && q.precision != Precision::Int4 {
        return invalid(
            "activations",
            format!(
                "int8 activations need 4-bit weights (mode q4, q4f16 or q4f32); these weights are {}",
                q.precision.name()
            ),
        );
    }
    if q.method == QuantMethod::Awq && q.calibration.is_none() {
        return invalid(
            "method",
            "method awq needs calibration data (a folder of input sets or a token file)",
        );
    }
    check_calibration(&q.calibration, q.calibration_samples)
}

/// The `pruning` section (or the `--prune` flags): structured pruning settings.
#[derive(Clone, Debug, PartialEq)]
pub struct PruneSettings {
    pub options: PruneOptions,
    /// Calibration data for the activation criterion (as for quantization).
    pub calibration: Option<PathBuf>,
    pub calibration_samples: usize,
}

/// Calibration samples for activation-aware pruning by default (each one is a full run of the
/// reference interpreter).
pub const PRUNE_CALIBRATION_SAMPLES: usize = 16;

impl Default for PruneSettings {
    fn default() -> Self {
        PruneSettings {
            options: PruneOptions::default(),
            calibration: None,
            calibration_samples: PRUNE_CALIBRATION_SAMPLES,
        }
    }
}

/// `ffn=0.25,heads=2` (per kind) or `0.25` (every kind): the amounts of `--prune`.
pub fn parse_prune_spec(spec: &str, options: &mut PruneOptions) -> Result<(), String> {
    for item in spec.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        match item.split_once('=') {
            None => options.all = Some(Amount::parse(item)?),
            Some((kind, amount)) => {
                let amount = Amount::parse(amount.trim()).map_err(|e| format!("{kind}: {e}"))?;
                match kind.trim() {
                    "all" => options.all = Some(amount),
                    k => {
                        let kind = StructureKind::parse(k).ok_or_else(|| {
                            let kinds: Vec<&str> =
                                StructureKind::ALL.iter().map(|k| k.key()).collect();
                            format!(
                                "unknown structure '{k}'{} (known: all, {})",
                                suggest(k, &["ffn", "heads", "channels", "all"])
                                    .map(|s| format!("; did you mean '{s}'?"))
                                    .unwrap_or_default(),
                                kinds.join(", ")
                            )
                        })?;
                        options.kinds.insert(kind, amount);
                    }
                }
            }
        }
    }
    Ok(())
}

/// Settings that contradict each other, whatever the model.
pub fn check_pruning(p: &PruneSettings) -> Result<(), Invalid> {
    let o = &p.options;
    if o.all.is_none() && o.kinds.is_empty() && o.layers.is_empty() {
        return invalid(
            "ratios",
            "no amount to prune: give ratios (e.g. ffn: 0.25, heads: 2) or layers",
        );
    }
    if o.multiple == 0 {
        return invalid("multiple", "multiple must be at least 1");
    }
    if o.criterion == Criterion::Activation && p.calibration.is_none() {
        return invalid(
            "criterion",
            "criterion activation needs calibration data (a folder of input sets or a token file)",
        );
    }
    check_calibration(&p.calibration, p.calibration_samples)
}

/// `pipeline: [pruning, quantization]`: the order of the graph-transforming stages. Pruning
/// must come first: after rounding, weight magnitudes say little about importance.
fn check_pipeline(
    src: &Source,
    v: &Value,
    root: &serde_yaml_ng::Mapping,
) -> Result<(), ConfigError> {
    let path = [Step::key("pipeline")];
    let Value::Sequence(items) = v else {
        return Err(src.value(
            &path,
            Problem::WrongType {
                key: "pipeline".into(),
                expected: "a list of stages (pruning, quantization)",
                got: describe(v),
            },
        ));
    };
    let mut order = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let at = [Step::key("pipeline"), Step::Index(i)];
        let name = item.as_str().unwrap_or_default();
        let Some(&stage) = STAGES.iter().find(|s| **s == name) else {
            return Err(src.value(
                &at,
                Problem::BadValue {
                    key: "pipeline".into(),
                    value: name.to_string(),
                    allowed: STAGES.to_vec(),
                    suggestion: suggest(name, STAGES),
                },
            ));
        };
        if order.contains(&stage) {
            return Err(src.value(
                &at,
                Problem::Inconsistent {
                    key: "pipeline".into(),
                    reason: format!("'{stage}' is listed twice"),
                },
            ));
        }
        if !root.contains_key(Value::String(stage.to_string())) {
            return Err(src.value(
                &at,
                Problem::Inconsistent {
                    key: "pipeline".into(),
                    reason: format!("'{stage}' is listed but the config has no {stage} section"),
                },
            ));
        }
        if stage == "pruning" && order.contains(&"quantization") {
            return Err(src.value(
                &at,
                Problem::Inconsistent {
                    key: "pipeline".into(),
                    reason: "pruning must run before quantization (weight magnitudes mean little \
                             after rounding); list pruning first"
                        .into(),
                },
            ));
        }
        order.push(stage);
    }
    Ok(())
}

/// What to compile: one model, its dim bindings and schedule settings, one artifact per target.
#[derive(Debug, Clone)]
pub struct Plan {
    pub model: PathBuf,
    pub dims: HashMap<String, usize>,
    pub schedule: ScheduleOptions,
    pub builds: Vec<Build>,
    pub quantization: Option<QuantSettings>,
    /// Runs before quantization.
    pub pruning: Option<PruneSettings>,
    /// Also write the transformed graph as ONNX here.
    pub emit_onnx: Option<PathBuf>,
    /// The config the plan came from, to place errors found later (dims the model lacks).
    source: Option<Source>,
}

impl Plan {
    /// A plan from command-line flags alone.
    pub fn from_flags(
        model: PathBuf,
        target: &'static Target,
        artifact: PathBuf,
        dims: HashMap<String, usize>,
    ) -> Plan {
        Plan {
            model,
            dims,
            schedule: ScheduleOptions::default(),
            builds: vec![Build { target, artifact }],
            quantization: None,
            pruning: None,
            emit_onnx: None,
            source: None,
        }
    }

    /// A dim-binding error of shape inference, placed in the config when the config is where
    /// the binding belongs: a `model_compilation.dims` entry the model has no use for (at its
    /// key), or a dynamic dim left unbound (at `model_compilation`). `None` without a config
    /// or when the entry came from `--dim`.
    pub fn dim_error(&self, e: &kiln_compiler::shape::ShapeError) -> Option<ConfigError> {
        use kiln_compiler::shape::ShapeError;
        let src = self.source.as_ref()?;
        match e {
            ShapeError::UnusedBinding(name) => {
                let path = [
                    Step::key("model_compilation"),
                    Step::key("dims"),
                    Step::key(name),
                ];
                locate(&src.text, &path, Want::Key)?;
                Some(src.key(&path, Problem::UnusedDim(name.clone())))
            }
            ShapeError::UnboundDim { input, dim } => Some(src.key(
                &[Step::key("model_compilation")],
                Problem::UnboundDim {
                    input: input.clone(),
                    dim: dim.clone(),
                },
            )),
            _ => None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Build {
    pub target: &'static Target,
    pub artifact: PathBuf,
}

/// Reads, checks and resolves a config file against command-line flags.
pub fn load(path: &Path, flags: &Flags) -> Result<Plan, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|cause| ConfigError::Read {
        path: path.to_path_buf(),
        cause,
    })?;
    let base = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    parse(&text, &path.display().to_string(), base)?.resolve(flags)
}

/// Parses and checks config text; `file` names it in messages, `base_dir` anchors its
/// relative paths.
pub fn parse(text: &str, file: &str, base_dir: &Path) -> Result<Config, ConfigError> {
    let src = Source {
        file: file.to_string(),
        text: text.to_string(),
    };
    let root: Value = serde_yaml_ng::from_str(text).map_err(|e| src.syntax(&e))?;
    let mut cfg = Config {
        src: src.clone(),
        base_dir: base_dir.to_path_buf(),
        model: None,
        target_format: TargetFormat::So,
        targets: Vec::new(),
        dims: BTreeMap::new(),
        schedule: ScheduleOptions::default(),
        artifact: None,
        quantization: None,
        pruning: None,
        emit_onnx: None,
        quant_keys_seen: Vec::new(),
    };
    let root = match root {
        Value::Null => {
            return Err(ConfigError::At {
                file: src.file.clone(),
                pos: Pos { line: 1, column: 1 },
                problem: Box::new(Problem::Empty),
            })
        }
        Value::Mapping(m) => m,
        other => {
            return Err(src.value(
                &[],
                Problem::WrongType {
                    key: "the config".into(),
                    expected: "a mapping of sections",
                    got: describe(&other),
                },
            ))
        }
    };
    // Section names first, so that a misspelt section is reported before its contents.
    let mut sections = Vec::new();
    for (k, v) in &root {
        let name = key_text(k);
        let path = [Step::key(&name)];
        if let Some(&known) = SECTIONS.iter().find(|s| **s == name) {
            sections.push((known, v));
        } else if LATER_SECTIONS.contains(&name.as_str()) {
            return Err(src.key(&path, Problem::SectionNotSupportedYet(name)));
        } else {
            let all: Vec<&'static str> = SECTIONS.iter().chain(LATER_SECTIONS).copied().collect();
            let suggestion = suggest(&name, &all);
            return Err(src.key(&path, Problem::UnknownSection { name, suggestion }));
        }
    }
    for (section, v) in sections {
        if section == "pipeline" {
            check_pipeline(&src, v, &root)?;
            continue;
        }
        let entries = section_entries(&src, section, v)?;
        if section == "pruning" {
            cfg.pruning = Some(PruneSettings::default());
        }
        if section == "quantization" {
            cfg.quantization = Some(QuantSettings::default());
        }
        for (key, value) in entries {
            cfg.set(section, &key, value)?;
        }
    }
    // Inconsistent settings are placed at the key they are most about (or at the section when
    // that key is not written).
    let checks = [
        ("pruning", cfg.pruning.as_ref().map(check_pruning)),
        (
            "quantization",
            cfg.quantization.as_ref().map(check_quantization),
        ),
    ];
    for (section, check) in checks {
        if let Some(Err(Invalid { key, reason })) = check {
            let mut path = vec![Step::key(section)];
            if locate(text, &[Step::key(section), Step::key(key)], Want::Key).is_some() {
                path.push(Step::key(key));
            }
            return Err(src.key(
                &path,
                Problem::Inconsistent {
                    key: format!("{section}.{key}"),
                    reason,
                },
            ));
        }
    }
    Ok(cfg)
}

/// The keys and values of a section, after checking that every key is known.
fn section_entries<'v>(
    src: &Source,
    section: &'static str,
    v: &'v Value,
) -> Result<Vec<(String, &'v Value)>, ConfigError> {
    let m = match v {
        // `kernel_schedule:` with every line commented out.
        Value::Null => return Ok(Vec::new()),
        Value::Mapping(m) => m,
        other => {
            return Err(src.value(
                &[Step::key(section)],
                Problem::WrongType {
                    key: section.into(),
                    expected: "a mapping",
                    got: describe(other),
                },
            ))
        }
    };
    let mut out = Vec::new();
    for (k, value) in m {
        let key = key_text(k);
        let path = [Step::key(section), Step::key(&key)];
        if section_keys(section).contains(&key.as_str()) {
            out.push((key, value));
        } else if later_keys(section).contains(&key.as_str()) {
            return Err(src.key(&path, Problem::KeyNotSupportedYet { key, section }));
        } else {
            let own: Vec<&'static str> = section_keys(section)
                .iter()
                .chain(later_keys(section))
                .copied()
                .collect();
            let suggestion = match suggest(&key, &own) {
                Some(s) => Suggestion::DidYouMean(s),
                None => SECTIONS
                    .iter()
                    .find(|other| **other != section && section_keys(other).contains(&key.as_str()))
                    .map_or(Suggestion::None, |other| Suggestion::BelongsIn(other)),
            };
            return Err(src.key(
                &path,
                Problem::UnknownKey {
                    key,
                    section,
                    suggestion,
                },
            ));
        }
    }
    Ok(out)
}

impl Config {
    /// Stores one (known) key's value after checking its type and range.
    fn set(&mut self, section: &'static str, key: &str, v: &Value) -> Result<(), ConfigError> {
        let path = vec![Step::key(section), Step::key(key)];
        let dotted = format!("{section}.{key}");
        let src = &self.src;
        let wrong = |expected: &'static str, got: &Value| {
            src.value(
                &path,
                Problem::WrongType {
                    key: dotted.clone(),
                    expected,
                    got: describe(got),
                },
            )
        };
        match (section, key) {
            ("model_compilation", "model") => {
                let written = match v {
                    Value::String(s) if !s.is_empty() => s,
                    _ => return Err(wrong("the path of an ONNX model", v)),
                };
                let resolved = self.base_dir.join(written);
                if !resolved.is_file() {
                    return Err(src.value(
                        &path,
                        Problem::ModelNotFound {
                            written: written.clone(),
                            resolved,
                        },
                    ));
                }
                self.model = Some(resolved);
            }
            ("model_compilation", "target_format") => {
                self.target_format = match v {
                    Value::String(s) => TargetFormat::deserialize(v).map_err(|_| {
                        src.value(
                            &path,
                            Problem::NotSupported {
                                key: dotted.clone(),
                                reason: format!(
                                    "format '{s}' is not supported (only 'so' for now)"
                                ),
                            },
                        )
                    })?,
                    _ => return Err(wrong("a format name ('so')", v)),
                };
            }
            ("model_compilation", "target_device") => {
                const EXPECTED: &str = "a target name or a non-empty list of target names";
                let names: Vec<(Vec<Step>, &String)> = match v {
                    Value::String(s) => vec![(path.clone(), s)],
                    Value::Sequence(items) if !items.is_empty() => {
                        let mut names = Vec::new();
                        for (i, item) in items.iter().enumerate() {
                            let mut p = path.clone();
                            p.push(Step::Index(i));
                            match item {
                                Value::String(s) => names.push((p, s)),
                                other => {
                                    return Err(src.value(
                                        &p,
                                        Problem::WrongType {
                                            key: format!("{dotted}[{i}]"),
                                            expected: "a target name",
                                            got: describe(other),
                                        },
                                    ))
                                }
                            }
                        }
                        names
                    }
                    Value::Sequence(_) => {
                        return Err(src.value(
                            &path,
                            Problem::WrongType {
                                key: dotted.clone(),
                                expected: EXPECTED,
                                got: "an empty list".into(),
                            },
                        ))
                    }
                    other => return Err(wrong(EXPECTED, other)),
                };
                for (p, name) in names {
                    let Some(t) = kiln_targets::target(name) else {
                        return Err(src.value(
                            &p,
                            Problem::UnknownTarget {
                                name: name.clone(),
                                suggestion: suggest(name, &target_names()),
                            },
                        ));
                    };
                    if self.targets.contains(&t) {
                        return Err(src.value(&p, Problem::DuplicateTarget(name.clone())));
                    }
                    self.targets.push(t);
                }
            }
            ("model_compilation", "dims") => {
                let m = match v {
                    Value::Null => return Ok(()),
                    Value::Mapping(m) => m,
                    other => return Err(wrong("a mapping of dim names to sizes", other)),
                };
                for (k, size) in m {
                    let name = key_text(k);
                    let Some(n) = size.as_u64().and_then(|n| usize::try_from(n).ok()) else {
                        let mut p = path.clone();
                        p.push(Step::key(&name));
                        return Err(src.value(
                            &p,
                            Problem::WrongType {
                                key: format!("{dotted}.{name}"),
                                expected: "a non-negative integer",
                                got: describe(size),
                            },
                        ));
                    };
                    self.dims.insert(name, n);
                }
            }
            ("kernel_schedule", "vectorization") => {
                let parsed = match v {
                    Value::String(_) => Vectorization::deserialize(v).ok(),
                    _ => return Err(wrong("one of auto, none, neon, sve, cuda", v)),
                };
                self.schedule.vectorization = parsed.ok_or_else(|| {
                    let value = v.as_str().unwrap_or_default().to_string();
                    src.value(
                        &path,
                        Problem::BadValue {
                            key: dotted.clone(),
                            suggestion: suggest(&value, Vectorization::NAMES),
                            value,
                            allowed: Vectorization::NAMES.to_vec(),
                        },
                    )
                })?;
            }
            ("kernel_schedule", "loop_unroll_factor") => {
                match v.as_u64().and_then(|n| u32::try_from(n).ok()) {
                    Some(n) if n >= 1 => self.schedule.loop_unroll_factor = Some(n),
                    _ => return Err(wrong("an integer >= 1", v)),
                }
            }
            ("kernel_schedule", "threads") => {
                match v.as_u64().and_then(|n| usize::try_from(n).ok()) {
                    Some(n) if n >= 1 => self.schedule.threads = Some(n),
                    _ => return Err(wrong("an integer >= 1", v)),
                }
            }
            ("output", "artifact") => match v {
                Value::String(s) if !s.is_empty() => self.artifact = Some(s.clone()),
                _ => return Err(wrong("a file path", v)),
            },
            ("output", "emit_onnx") => match v {
                Value::String(s) if !s.is_empty() => {
                    self.emit_onnx = Some(self.base_dir.join(s));
                }
                _ => return Err(wrong("a file path", v)),
            },
            ("pruning", _) => self.set_pruning(key, v)?,
            ("quantization", _) => {
                let q = self.quantization.get_or_insert_with(QuantSettings::default);
                let strings = |v: &Value| -> Option<Vec<String>> {
                    match v {
                        Value::String(s) => Some(vec![s.clone()]),
                        Value::Sequence(items) => items
                            .iter()
                            .map(|i| i.as_str().map(str::to_string))
                            .collect(),
                        Value::Null => Some(Vec::new()),
                        _ => None,
                    }
                };
                let bad_value = |value: String, allowed: &[&'static str]| {
                    src.value(
                        &path,
                        Problem::BadValue {
                            key: dotted.clone(),
                            suggestion: suggest(&value, allowed),
                            value,
                            allowed: allowed.to_vec(),
                        },
                    )
                };
                match key {
                    "mode" => {
                        let m = v.as_str().ok_or_else(|| wrong("a mode such as q4f16", v))?;
                        (q.precision, q.excluded_precision) = parse_quant_mode(m)
                            .ok_or_else(|| bad_value(m.to_string(), QUANT_MODES))?;
                    }
                    "group_size" => match v.as_u64().and_then(|n| usize::try_from(n).ok()) {
                        Some(n) if n > 0 => q.group_size = n,
                        _ => return Err(wrong("a group size (32, 64 or 128)", v)),
                    },
                    "symmetric" | "zero_point" => {
                        let b = v.as_bool().ok_or_else(|| wrong("true or false", v))?;
                        // zero_point: true is asymmetric quantization.
                        let symmetric = if key == "symmetric" { b } else { !b };
                        let seen = self.quant_keys_seen.contains(&"symmetric")
                            || self.quant_keys_seen.contains(&"zero_point");
                        {
                            if seen && symmetric != q.symmetric {
                                return Err(src.key(
                                    &path,
                                    Problem::Inconsistent {
                                        key: dotted.clone(),
                                        reason: "symmetric and zero_point contradict each other (symmetric quantization has no zero point)".into(),
                                    },
                                ));
                            }
                        }
                        q.symmetric = symmetric;
                    }
                    "method" => {
                        let m = v.as_str().ok_or_else(|| wrong("rtn or awq", v))?;
                        q.method =
                            keyword(m, &[("rtn", QuantMethod::Rtn), ("awq", QuantMethod::Awq)])
                                .map_err(|allowed| bad_value(m.to_string(), &allowed))?;
                    }
                    "activations" => {
                        let m = v.as_str().ok_or_else(|| wrong("f32 or int8", v))?;
                        q.activations =
                            keyword(m, &[("f32", Activations::F32), ("int8", Activations::Int8)])
                                .map_err(|allowed| bad_value(m.to_string(), &allowed))?;
                    }
                    "calibration" => match v {
                        Value::String(s) if !s.is_empty() => {
                            q.calibration = Some(self.base_dir.join(s))
                        }
                        _ => return Err(wrong("a folder of input sets or a token file", v)),
                    },
                    "calibration_samples" => {
                        match v.as_u64().and_then(|n| usize::try_from(n).ok()) {
                            Some(n) if n >= 1 => q.calibration_samples = n,
                            _ => return Err(wrong("an integer >= 1", v)),
                        }
                    }
                    "exclude" | "include" => {
                        let list = strings(v)
                            .ok_or_else(|| wrong("a name glob or a list of name globs", v))?;
                        for g in &list {
                            kiln_passes::quantize::Glob::new(g).map_err(|reason| {
                                src.value(
                                    &path,
                                    Problem::NotSupported {
                                        key: dotted.clone(),
                                        reason,
                                    },
                                )
                            })?;
                        }
                        if key == "exclude" {
                            q.exclude = list;
                        } else {
                            q.include = list;
                        }
                    }
                    "overrides" => {
                        let Value::Mapping(m) = v else {
                            return Err(wrong("a mapping of name globs to q4, q8, f16 or f32", v));
                        };
                        for (k, p) in m {
                            let glob = key_text(k);
                            let mut p_path = path.clone();
                            p_path.push(Step::key(&glob));
                            let name = p.as_str().unwrap_or_default();
                            let precision = Precision::parse(name).ok_or_else(|| {
                                src.value(
                                    &p_path,
                                    Problem::BadValue {
                                        key: format!("{dotted}.{glob}"),
                                        value: name.to_string(),
                                        suggestion: suggest(name, &["q4", "q8", "f16", "f32"]),
                                        allowed: vec!["q4", "q8", "f16", "f32"],
                                    },
                                )
                            })?;
                            kiln_passes::quantize::Glob::new(&glob).map_err(|reason| {
                                src.key(
                                    &p_path,
                                    Problem::NotSupported {
                                        key: format!("{dotted}.{glob}"),
                                        reason,
                                    },
                                )
                            })?;
                            q.overrides.push((glob, precision));
                        }
                    }
                    _ => unreachable!("quantization key {key} is in the schema"),
                }
                self.quant_keys_seen.push(match key {
                    "symmetric" => "symmetric",
                    "zero_point" => "zero_point",
                    _ => "other",
                });
            }
            _ => unreachable!("key {section}.{key} is in the schema but not handled"),
        }
        Ok(())
    }

    /// Stores one key of the `pruning` section.
    fn set_pruning(&mut self, key: &str, v: &Value) -> Result<(), ConfigError> {
        let path = vec![Step::key("pruning"), Step::key(key)];
        let dotted = format!("pruning.{key}");
        let src = &self.src;
        let p = self.pruning.get_or_insert_with(PruneSettings::default);
        let wrong = |expected: &'static str, got: &Value| {
            src.value(
                &path,
                Problem::WrongType {
                    key: dotted.clone(),
                    expected,
                    got: describe(got),
                },
            )
        };
        let bad_value = |at: &[Step], key: String, value: &str, allowed: &[&'static str]| {
            src.value(
                at,
                Problem::BadValue {
                    key,
                    value: value.to_string(),
                    suggestion: suggest(value, allowed),
                    allowed: allowed.to_vec(),
                },
            )
        };
        let amount = |at: &[Step], key: String, v: &Value| -> Result<Amount, ConfigError> {
            let text = match v {
                Value::Number(n) => n.to_string(),
                Value::String(s) => s.clone(),
                _ => String::new(),
            };
            Amount::parse(&text).map_err(|reason| {
                src.value(
                    at,
                    Problem::NotSupported {
                        key: key.clone(),
                        reason,
                    },
                )
            })
        };
        let glob = |at: &[Step], key: String, g: &str| -> Result<Glob, ConfigError> {
            Glob::new(g).map_err(|reason| src.key(at, Problem::NotSupported { key, reason }))
        };
        match key {
            "method" => match v.as_str() {
                Some("structured") => {}
                Some(m @ ("2:4" | "semi-structured")) => {
                    return Err(src.value(
                        &path,
                        Problem::NotSupported {
                            key: dotted,
                            reason: format!("'{m}' (2:4 semi-structured sparsity) is not implemented yet; use structured"),
                        },
                    ))
                }
                Some(m) => return Err(bad_value(&path, dotted, m, &["structured"])),
                None => return Err(wrong("structured", v)),
            },
            "criterion" => {
                let m = v
                    .as_str()
                    .ok_or_else(|| wrong("magnitude or activation", v))?;
                let table = [
                    ("magnitude", Criterion::Magnitude),
                    ("activation", Criterion::Activation),
                ];
                p.options.criterion = keyword(m, &table)
                    .map_err(|allowed| bad_value(&path, dotted, m, &allowed))?;
            }
            "norm" => {
                let m = v.as_str().ok_or_else(|| wrong("l1 or l2", v))?;
                p.options.norm = keyword(m, &[("l1", Norm::L1), ("l2", Norm::L2)])
                    .map_err(|allowed| bad_value(&path, dotted, m, &allowed))?;
            }
            "ratios" => {
                let Value::Mapping(m) = v else {
                    return Err(wrong("a mapping such as {ffn: 0.25, heads: 2}", v));
                };
                for (k, a) in m {
                    let kind = key_text(k);
                    let mut at = path.clone();
                    at.push(Step::key(&kind));
                    let value = amount(&at, format!("{dotted}.{kind}"), a)?;
                    if kind == "all" {
                        p.options.all = Some(value);
                    } else if let Some(sk) = StructureKind::parse(&kind) {
                        p.options.kinds.insert(sk, value);
                    } else {
                        return Err(src.key(
                            &at,
                            Problem::BadValue {
                                key: dotted.clone(),
                                suggestion: suggest(&kind, &["all", "ffn", "heads", "channels"]),
                                value: kind,
                                allowed: vec!["all", "ffn", "heads", "channels"],
                            },
                        ));
                    }
                }
            }
            "layers" => {
                let Value::Mapping(m) = v else {
                    return Err(wrong("a mapping of name globs to amounts", v));
                };
                for (k, a) in m {
                    let g = key_text(k);
                    let mut at = path.clone();
                    at.push(Step::key(&g));
                    let value = amount(&at, format!("{dotted}.{g}"), a)?;
                    p.options
                        .layers
                        .push((glob(&at, format!("{dotted}.{g}"), &g)?, value));
                }
            }
            "keep" => {
                let list: Vec<String> = match v {
                    Value::String(s) => vec![s.clone()],
                    Value::Sequence(items) => items
                        .iter()
                        .map(|i| i.as_str().map(str::to_string))
                        .collect::<Option<Vec<_>>>()
                        .ok_or_else(|| wrong("a name glob or a list of name globs", v))?,
                    Value::Null => Vec::new(),
                    _ => return Err(wrong("a name glob or a list of name globs", v)),
                };
                for g in &list {
                    let g = glob(&path, dotted.clone(), g)?;
                    p.options.keep.push(g);
                }
            }
            "multiple" => match v.as_u64().and_then(|n| usize::try_from(n).ok()) {
                Some(n) if n >= 1 => p.options.multiple = n,
                _ => return Err(wrong("an integer >= 1", v)),
            },
            "calibration" => match v {
                Value::String(s) if !s.is_empty() => p.calibration = Some(self.base_dir.join(s)),
                _ => return Err(wrong("a folder of input sets or a token file", v)),
            },
            "calibration_samples" => match v.as_u64().and_then(|n| usize::try_from(n).ok()) {
                Some(n) if n >= 1 => p.calibration_samples = n,
                _ => return Err(wrong("an integer >= 1", v)),
            },
            _ => unreachable!("pruning key {key} is in the schema"),
        }
        Ok(())
    }

    /// Merges command-line flags (a flag may fill in what the config leaves out; one that
    /// contradicts the config is an error naming both) and checks the settings against each
    /// other: vectorization against every target, one distinct artifact path per target.
    pub fn resolve(&self, flags: &Flags) -> Result<Plan, ConfigError> {
        let src = &self.src;
        let model_path = [Step::key("model_compilation"), Step::key("model")];
        let model = match (&self.model, &flags.model) {
            (Some(c), Some(f)) if !same_path(c, f) => {
                return Err(src.value(
                    &model_path,
                    Problem::Conflict {
                        key: "model_compilation.model".into(),
                        config_value: format!("'{}'", c.display()),
                        flag: format!("MODEL '{}'", f.display()),
                    },
                ))
            }
            (Some(c), _) => c.clone(),
            (None, Some(f)) => f.clone(),
            (None, None) => return Err(self.missing("model_compilation", "model", Some("MODEL"))),
        };

        let target_path = [Step::key("model_compilation"), Step::key("target_device")];
        let targets = match (self.targets.as_slice(), flags.target) {
            ([], Some(f)) => vec![f],
            ([], None) => {
                return Err(self.missing("model_compilation", "target_device", Some("--target")))
            }
            (c, Some(f)) if c != [f] => {
                let names: Vec<&str> = c.iter().map(|t| t.name).collect();
                return Err(src.value(
                    &target_path,
                    Problem::Conflict {
                        key: "model_compilation.target_device".into(),
                        config_value: format!("'{}'", names.join(", ")),
                        flag: format!("--target {}", f.name),
                    },
                ));
            }
            (c, _) => c.to_vec(),
        };

        let vec_path = [Step::key("kernel_schedule"), Step::key("vectorization")];
        for t in &targets {
            if let Err(reason) = self.schedule.vectorization.check(t) {
                return Err(src.value(
                    &vec_path,
                    Problem::Inconsistent {
                        key: "kernel_schedule.vectorization".into(),
                        reason,
                    },
                ));
            }
        }

        let mut dims: HashMap<String, usize> = self.dims.clone().into_iter().collect();
        for (name, &n) in &flags.dims {
            match self.dims.get(name) {
                Some(&c) if c != n => {
                    let p = [
                        Step::key("model_compilation"),
                        Step::key("dims"),
                        Step::key(name),
                    ];
                    return Err(src.value(
                        &p,
                        Problem::Conflict {
                            key: format!("model_compilation.dims.{name}"),
                            config_value: c.to_string(),
                            flag: format!("--dim {name}={n}"),
                        },
                    ));
                }
                _ => {
                    dims.insert(name.clone(), n);
                }
            }
        }

        let artifact_path = [Step::key("output"), Step::key("artifact")];
        let (template, from_config) = match (&self.artifact, &flags.output) {
            (Some(c), Some(f)) if !same_path(&self.base_dir.join(c), f) => {
                return Err(src.value(
                    &artifact_path,
                    Problem::Conflict {
                        key: "output.artifact".into(),
                        config_value: format!("'{c}'"),
                        flag: format!("-o '{}'", f.display()),
                    },
                ))
            }
            (Some(c), _) => (self.base_dir.join(c), true),
            (None, Some(f)) => (f.clone(), false),
            (None, None) => return Err(self.missing("output", "artifact", Some("-o"))),
        };
        let template = template.to_string_lossy().into_owned();
        if targets.len() > 1 && !template.contains(TARGET_PLACEHOLDER) {
            let names: Vec<&str> = targets.iter().map(|t| t.name).collect();
            let (at, key): (&[Step], String) = if from_config {
                (&artifact_path, "output.artifact".into())
            } else {
                (&target_path, format!("-o {template}"))
            };
            return Err(src.value(
                at,
                Problem::Inconsistent {
                    key,
                    reason: format!(
                        "{} targets ({}) need one artifact each: put {TARGET_PLACEHOLDER} in the \
                         path, e.g. out/model-{TARGET_PLACEHOLDER}.so",
                        targets.len(),
                        names.join(", ")
                    ),
                },
            ));
        }
        let builds = targets
            .into_iter()
            .map(|target| Build {
                target,
                artifact: PathBuf::from(template.replace(TARGET_PLACEHOLDER, target.name)),
            })
            .collect();
        Ok(Plan {
            model,
            dims,
            schedule: self.schedule,
            builds,
            quantization: self.quantization.clone(),
            pruning: self.pruning.clone(),
            emit_onnx: self.emit_onnx.clone(),
            source: Some(self.src.clone()),
        })
    }

    /// A missing key: at its section's name, or at the top of the file without the section.
    fn missing(
        &self,
        section: &'static str,
        key: &'static str,
        flag: Option<&'static str>,
    ) -> ConfigError {
        let section_path = [Step::key(section)];
        if locate(&self.src.text, &section_path, Want::Key).is_some() {
            self.src
                .key(&section_path, Problem::MissingKey { key, section, flag })
        } else {
            self.src
                .value(&[], Problem::MissingSection { section, flag })
        }
    }
}

/// Whether two paths name the same file (or would, for files not written yet).
fn same_path(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(x), Ok(y)) => x == y,
        _ => std::path::absolute(a).ok() == std::path::absolute(b).ok(),
    }
}

/// A mapping key as text (keys are normally strings; numbers and booleans are shown as written).
fn key_text(k: &Value) -> String {
    match k {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        Value::Null => "null".into(),
        _ => "<complex key>".into(),
    }
}

/// A value's kind and content, for "expected X, got Y".
fn describe(v: &Value) -> String {
    match v {
        Value::Null => "nothing".into(),
        Value::Bool(b) => format!("boolean {b}"),
        Value::Number(n) => format!("number {n}"),
        Value::String(s) => format!("string '{s}'"),
        Value::Sequence(_) => "a list".into(),
        Value::Mapping(_) => "a mapping".into(),
        Value::Tagged(t) => format!("a value tagged {}", t.tag),
    }
}

/// Edit distance between two strings: Levenshtein (insertions, deletions, substitutions)
/// plus transpositions of adjacent characters (`neno` -> `neon` is one edit), on chars.
pub fn edit_distance(a: &str, b: &str) -> usize {
    let (a, b): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
    // d[i][j]: distance between a[..i] and b[..j].
    let mut d = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for (i, row) in d.iter_mut().enumerate() {
        row[0] = i;
    }
    for (j, cell) in d[0].iter_mut().enumerate() {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut best = (d[i - 1][j] + 1)
                .min(d[i][j - 1] + 1)
                .min(d[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                best = best.min(d[i - 2][j - 2] + 1);
            }
            d[i][j] = best;
        }
    }
    d[a.len()][b.len()]
}

/// The candidate closest to `word` (case-insensitive), if it is close enough to be a typo or
/// a clipped word: at most 2 edits, or 40 % of the word's length for longer words
/// (`model_compile` -> `model_compilation` is 5 edits).
pub fn suggest(word: &str, candidates: &[&'static str]) -> Option<&'static str> {
    let w = word.to_ascii_lowercase();
    let limit = (w.chars().count() * 2 / 5 + 1).max(2);
    candidates
        .iter()
        .map(|c| (edit_distance(&w, c), *c))
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

// ---- positions

/// The text of a config and the name it is reported under.
#[derive(Debug, Clone)]
struct Source {
    file: String,
    text: String,
}

impl Source {
    /// An error at the value (node) that `path` leads to.
    fn value(&self, path: &[Step], problem: Problem) -> ConfigError {
        self.at(path, Want::Value, problem)
    }

    /// An error at the last mapping key of `path`.
    fn key(&self, path: &[Step], problem: Problem) -> ConfigError {
        self.at(path, Want::Key, problem)
    }

    /// An error at the key or value that `path` leads to (the top of the file if not found).
    fn at(&self, path: &[Step], want: Want, problem: Problem) -> ConfigError {
        let pos = locate(&self.text, path, want).unwrap_or(Pos { line: 1, column: 1 });
        ConfigError::At {
            file: self.file.clone(),
            pos,
            problem: Box::new(problem),
        }
    }

    /// A YAML syntax error, with serde_yaml_ng's position moved into the `file:line:col` prefix.
    fn syntax(&self, e: &serde_yaml_ng::Error) -> ConfigError {
        let mut msg = e.to_string();
        let pos = match e.location() {
            Some(l) => {
                let suffix = format!(" at line {} column {}", l.line(), l.column());
                if let Some(i) = msg.find(&suffix) {
                    msg.replace_range(i..i + suffix.len(), "");
                }
                Pos {
                    line: l.line(),
                    column: l.column(),
                }
            }
            None => Pos { line: 1, column: 1 },
        };
        ConfigError::At {
            file: self.file.clone(),
            pos,
            problem: Box::new(Problem::Syntax(msg)),
        }
    }
}

/// One step of a path into the YAML tree.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Step {
    Key(String),
    Index(usize),
}

impl Step {
    fn key(k: &str) -> Step {
        Step::Key(k.to_string())
    }
}

/// Whether [`locate`] should point at a mapping key or at the value (node) the path leads to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Want {
    Key,
    Value,
}

/// The line and column of the key or value at `path` (first match), or `None` if the path is
/// not in the text. Re-reads the text with [`Finder`], which raises an error exactly when it
/// reaches the wanted node; serde_yaml_ng stamps that error with the node's start position.
fn locate(text: &str, path: &[Step], want: Want) -> Option<Pos> {
    let de = serde_yaml_ng::Deserializer::from_str(text);
    match (Finder { path, want }).deserialize(de) {
        Ok(()) => None,
        Err(e) => e.location().map(|l| Pos {
            line: l.line(),
            column: l.column(),
        }),
    }
}

const FOUND: &str = "found";

/// Walks down `path`, skipping everything else; fails at the target node.
struct Finder<'p> {
    path: &'p [Step],
    want: Want,
}

impl<'de> DeserializeSeed<'de> for Finder<'_> {
    type Value = ();
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl Finder<'_> {
    /// A scalar: the target if the path ends here, else the path does not exist.
    fn scalar<E: de::Error>(&self) -> Result<(), E> {
        if self.path.is_empty() {
            Err(E::custom(FOUND))
        } else {
            Ok(())
        }
    }
}

impl<'de> Visitor<'de> for Finder<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any YAML node")
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        self.scalar()
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        self.scalar()
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        self.scalar()
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        self.scalar()
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        self.scalar()
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        self.scalar()
    }
    fn visit_none<E: de::Error>(self) -> Result<(), E> {
        self.scalar()
    }
    fn visit_some<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let Some((first, rest)) = self.path.split_first() else {
            return Err(de::Error::custom(FOUND));
        };
        let wanted = match first {
            Step::Key(k) => Some(k.as_str()),
            Step::Index(_) => None,
        };
        let fail_on_key = rest.is_empty() && self.want == Want::Key;
        while let Some(hit) = map.next_key_seed(KeyMatch {
            wanted,
            fail: fail_on_key,
        })? {
            if hit {
                map.next_value_seed(Finder {
                    path: rest,
                    want: self.want,
                })?;
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(())
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let Some((first, rest)) = self.path.split_first() else {
            return Err(de::Error::custom(FOUND));
        };
        let wanted = match first {
            Step::Index(i) => Some(*i),
            Step::Key(_) => None,
        };
        let mut i = 0;
        loop {
            let more = if wanted == Some(i) {
                seq.next_element_seed(Finder {
                    path: rest,
                    want: self.want,
                })?
                .is_some()
            } else {
                seq.next_element::<IgnoredAny>()?.is_some()
            };
            if !more {
                return Ok(());
            }
            i += 1;
        }
    }
}

/// Reads a mapping key: `true` if it is the wanted one (or fails there, when the key itself
/// is the target).
struct KeyMatch<'k> {
    wanted: Option<&'k str>,
    fail: bool,
}

impl KeyMatch<'_> {
    fn check<E: de::Error>(&self, key: &str) -> Result<bool, E> {
        let hit = self.wanted == Some(key);
        if hit && self.fail {
            Err(E::custom(FOUND))
        } else {
            Ok(hit)
        }
    }
}

impl<'de> DeserializeSeed<'de> for KeyMatch<'_> {
    type Value = bool;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<bool, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for KeyMatch<'_> {
    type Value = bool;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a mapping key")
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<bool, E> {
        self.check(v)
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<bool, E> {
        self.check(&v.to_string())
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<bool, E> {
        self.check(&v.to_string())
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<bool, E> {
        self.check(&v.to_string())
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<bool, E> {
        self.check(&serde_yaml_ng::Number::from(v).to_string())
    }
    fn visit_unit<E: de::Error>(self) -> Result<bool, E> {
        self.check("null")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<bool, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(false)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<bool, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(false)
    }
}

/// The value a config keyword names in `table`, or every allowed keyword.
fn keyword<T: Copy>(word: &str, table: &[(&'static str, T)]) -> Result<T, Vec<&'static str>> {
    table
        .iter()
        .find(|(name, _)| *name == word)
        .map(|(_, v)| *v)
        .ok_or_else(|| table.iter().map(|(name, _)| *name).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> (Pos, Problem) {
        match parse(text, "c.yaml", Path::new("/nonexistent")) {
            Err(ConfigError::At { pos, problem, .. }) => (pos, *problem),
            other => panic!("expected an error, got {other:?}"),
        }
    }

    #[test]
    fn edit_distance_and_suggestions() {
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("loop_unrol_factor", "loop_unroll_factor"), 1);
        assert_eq!(edit_distance("neno", "neon"), 1);
        assert_eq!(edit_distance("neno", "none"), 2);
        assert_eq!(suggest("neno", Vectorization::NAMES), Some("neon"));
        assert_eq!(suggest("Threads", SCHEDULE_KEYS), Some("threads"));
        assert_eq!(
            suggest("model_compile", SECTIONS),
            Some("model_compilation")
        );
        assert_eq!(suggest("zzz", SCHEDULE_KEYS), None);
    }

    #[test]
    fn locate_keys_values_and_list_items() {
        let text = "a:\n  b: 1\n  c: [x, y]\nd: {e: 2}\n";
        let loc = |p: &[Step], w| locate(text, p, w).map(|p| (p.line, p.column));
        assert_eq!(loc(&[Step::key("a")], Want::Key), Some((1, 1)));
        assert_eq!(
            loc(&[Step::key("a"), Step::key("b")], Want::Key),
            Some((2, 3))
        );
        assert_eq!(
            loc(&[Step::key("a"), Step::key("b")], Want::Value),
            Some((2, 6))
        );
        let y = [Step::key("a"), Step::key("c"), Step::Index(1)];
        assert_eq!(loc(&y, Want::Value), Some((3, 10)));
        assert_eq!(
            loc(&[Step::key("d"), Step::key("e")], Want::Key),
            Some((4, 5))
        );
        assert_eq!(loc(&[Step::key("nope")], Want::Key), None);
        assert_eq!(loc(&[Step::key("a"), Step::Index(0)], Want::Value), None);
    }

    #[test]
    fn problems_are_located() {
        let (pos, p) = err("kernel_schedule:\n  loop_unrol_factor: 4\n");
        assert_eq!((pos.line, pos.column), (2, 3));
        assert_eq!(
            p.to_string(),
            "unknown key 'loop_unrol_factor' in kernel_schedule; did you mean 'loop_unroll_factor'?"
        );
        let (pos, p) = err("kernel_schedule:\n  threads: two\n");
        assert_eq!((pos.line, pos.column), (2, 12));
        assert_eq!(
            p.to_string(),
            "kernel_schedule.threads: expected an integer >= 1, got string 'two'"
        );
        let (pos, p) = err("output: {artifact: a.so}\nmodel_compilation:\n  threads: 2\n");
        assert_eq!((pos.line, pos.column), (3, 3));
        assert!(
            p.to_string().ends_with("it belongs in kernel_schedule"),
            "{p}"
        );
        let (pos, p) = err("runtime: {}\n");
        assert_eq!((pos.line, pos.column), (1, 1));
        assert_eq!(p, Problem::SectionNotSupportedYet("runtime".into()));
        let (pos, p) = err("a: [1\nb: 2\n");
        assert_eq!((pos.line, pos.column), (2, 2));
        assert!(matches!(p, Problem::Syntax(_)));
        assert_eq!(err("# nothing\n").1, Problem::Empty);
    }

    #[test]
    fn vectorization_rules() {
        let t = |n| kiln_targets::target(n).unwrap();
        assert!(Vectorization::Neon.check(t("aarch64-neon-dotprod")).is_ok());
        assert!(Vectorization::None.check(t("x86_64")).is_ok());
        assert!(Vectorization::Sve.check(t("aarch64-sve")).is_ok());
        let e = Vectorization::Neon.check(t("x86_64")).unwrap_err();
        assert_eq!(
            e,
            "'neon' does not fit target x86_64: neon vectors exist only on aarch64-neon, \
             aarch64-neon-dotprod; x86_64 accepts auto or none"
        );
        assert!(Vectorization::None.check(t("cuda-sm80")).is_err());
    }
}
