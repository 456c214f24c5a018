//! `kiln compile --config FILE.yaml`: the example configs of `examples/` compile (copied
//! verbatim next to a link to the bundled tiny Llama, so that relative paths resolve against
//! the YAML file's folder and nothing is written into the repository) and produce one artifact
//! per target; command-line flags may fill in what a config leaves out; and a table of bad
//! configs, each of which must exit with status 1 and exactly one `error: ` line that names
//! `config.yaml:LINE:COLUMN` and the problem, without writing an artifact.

mod common;

use common::*;
use std::path::{Path, PathBuf};

/// A temporary folder holding `tiny_llama` (a link to the bundled model) for configs to use.
fn workdir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let model = repo_root().join("examples/tiny_llama");
    assert!(
        model.join("model.onnx").is_file(),
        "{} is missing",
        model.display()
    );
    std::os::unix::fs::symlink(&model, dir.path().join("tiny_llama")).unwrap();
    dir
}

fn write_config(dir: &Path, text: &str) -> PathBuf {
    let path = dir.join("config.yaml");
    std::fs::write(&path, text).unwrap();
    path
}

/// ELF e_machine of a file (62 x86-64, 183 AArch64).
fn elf_machine(path: &Path) -> u16 {
    let bytes = std::fs::read(path).unwrap();
    assert_eq!(
        &bytes[..4],
        b"\x7fELF",
        "{} is not an ELF file",
        path.display()
    );
    u16::from_le_bytes([bytes[18], bytes[19]])
}

#[test]
fn examples_compile_and_produce_artifacts() {
    let cases: &[(&str, &[(&str, u16)])] = &[
        (
            "tiny_llama_x86_64.yaml",
            &[("out/tiny_llama-x86_64.so", 62)],
        ),
        (
            "tiny_llama_aarch64.yaml",
            &[
                ("out/tiny_llama-aarch64-neon.so", 183),
                ("out/tiny_llama-aarch64-neon-dotprod.so", 183),
            ],
        ),
        (
            "tiny_llama_int4.yaml",
            &[
                ("out/tiny_llama-int4-x86_64.so", 62),
                ("out/tiny_llama-int4-aarch64-neon.so", 183),
            ],
        ),
        (
            "tiny_llama_prune_int4.yaml",
            &[("out/tiny_llama-pruned-int4-x86_64.so", 62)],
        ),
    ];
    for (example, artifacts) in cases {
        let dir = workdir();
        let text = std::fs::read_to_string(repo_root().join("examples").join(example)).unwrap();
        let cfg = dir.path().join(example);
        std::fs::write(&cfg, text).unwrap();
        let r = kiln(&["compile", "--config", cfg.to_str().unwrap()]);
        assert_eq!(r.code, Some(0), "{example}: {}", r.stderr);
        assert!(
            r.stdout
                .contains("loop_unroll_factor 4 (innermost serial loops)"),
            "{example}: {}",
            r.stdout
        );
        for (artifact, machine) in *artifacts {
            let path = dir.path().join(artifact);
            assert!(
                path.is_file(),
                "{example}: {} was not written",
                path.display()
            );
            assert_eq!(elf_machine(&path), *machine, "{example}: {artifact}");
            assert!(
                r.stdout.contains(&path.display().to_string()),
                "{}",
                r.stdout
            );
        }
        assert_eq!(
            r.stdout.matches("compiled ").count(),
            artifacts.len(),
            "{}",
            r.stdout
        );
    }
}

#[test]
fn x86_64_example_artifact_runs() {
    let dir = workdir();
    let text =
        std::fs::read_to_string(repo_root().join("examples/tiny_llama_x86_64.yaml")).unwrap();
    let cfg = write_config(dir.path(), &text);
    let r = kiln(&["compile", "--config", cfg.to_str().unwrap()]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    let so = dir.path().join("out/tiny_llama-x86_64.so");
    let inputs = repo_root().join("examples/tiny_llama/test_data_set_0");
    let out = dir.path().join("run");
    let r = kiln(&[
        "run",
        so.to_str().unwrap(),
        "--inputs-dir",
        inputs.to_str().unwrap(),
        "--output-dir",
        out.to_str().unwrap(),
    ]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert!(out.join("output_0.pb").is_file());
}

/// Flags fill in what the config leaves out, and may repeat what it says.
#[test]
fn flags_complete_a_config() {
    let dir = workdir();
    let cfg = write_config(
        dir.path(),
        "model_compilation:\n  model: tiny_llama/model.onnx\n  target_device: x86_64\n",
    );
    let out = dir.path().join("from-flag.so");
    let r = kiln(&[
        "compile",
        "--config",
        cfg.to_str().unwrap(),
        "--target",
        "x86_64",
        "-o",
        out.to_str().unwrap(),
    ]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert_eq!(elf_machine(&out), 62);

    let cfg = write_config(dir.path(), "output:\n  artifact: out/{target}.so\n");
    let model = repo_root().join("examples/tiny_llama/model.onnx");
    let r = kiln(&[
        "compile",
        model.to_str().unwrap(),
        "--config",
        cfg.to_str().unwrap(),
        "--target",
        "aarch64-neon",
    ]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert_eq!(elf_machine(&dir.path().join("out/aarch64-neon.so")), 183);
}

/// `model_compilation.dims` binds a model's dynamic dims; entries the model does not have and
/// dims left unbound are errors placed in the config.
#[test]
fn dims_bind_dynamic_inputs() {
    let dir = workdir();
    let m = model(
        vec![node("Relu", "relu", &["x"], &["y"])],
        vec![value_info("x", 1, &[Err("batch"), Ok(3)])],
        vec![value_info("y", 1, &[Err("batch"), Ok(3)])],
        vec![],
    );
    write_model(dir.path(), "dyn.onnx", &m);
    let head = "model_compilation:\n  model: dyn.onnx\n  target_device: x86_64\n";
    let tail = "output:\n  artifact: out/dyn.so\n";
    let cfg = write_config(dir.path(), &format!("{head}  dims: {{batch: 4}}\n{tail}"));
    let r = kiln(&["compile", "--config", cfg.to_str().unwrap()]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    let so = kiln_runtime::Model::load(dir.path().join("out/dyn.so")).unwrap();
    assert_eq!(so.inputs()[0].dims, vec![4, 3]);

    let cases = [
        (
            format!("{head}  dims:\n    batch: 4\n    seq: 16\n{tail}"),
            "config.yaml:6:5: model_compilation.dims.seq: no input of the model has this dimension",
        ),
        (
            format!("{head}{tail}"),
            "config.yaml:1:1: input 'x' has dynamic dimension 'batch'; bind it in \
             model_compilation.dims (batch: VALUE) or with --dim batch=VALUE",
        ),
    ];
    for (yaml, want) in cases {
        let cfg = write_config(dir.path(), &yaml);
        let r = kiln(&["compile", "--config", cfg.to_str().unwrap()]);
        assert_eq!(r.code, Some(1), "{yaml}: {}", r.stderr);
        assert_eq!(r.stderr.lines().count(), 1, "{}", r.stderr);
        assert!(
            r.stderr.starts_with("error: ") && r.stderr.contains(want),
            "{}",
            r.stderr
        );
    }
}

struct Bad {
    name: &'static str,
    yaml: &'static str,
    args: &'static [&'static str],
    /// `LINE:COLUMN` expected after `config.yaml:`.
    at: &'static str,
    text: &'static str,
}

const HEAD: &str = "model_compilation:\n  model: tiny_llama/model.onnx\n  target_device: x86_64\n";

#[test]
fn bad_configs_are_one_line_errors_with_positions() {
    let cases = [
        Bad {
            name: "unknown top-level section",
            yaml: "model_compilation:\n  model: tiny_llama/model.onnx\n  target_device: x86_64\nkernal_schedule:\n  threads: 2\n",
            args: &[],
            at: "4:1",
            text: "unknown section 'kernal_schedule'; did you mean 'kernel_schedule'?",
        },
        Bad {
            name: "typo in a nested key",
            yaml: "model_compilation:\n  model: tiny_llama/model.onnx\n  target_device: x86_64\n\
                   kernel_schedule:\n  vectorization: auto\n  threads: 2\n  loop_unrol_factor: 4\n",
            args: &[],
            at: "7:3",
            text: "unknown key 'loop_unrol_factor' in kernel_schedule; did you mean 'loop_unroll_factor'?",
        },
        Bad {
            name: "key in the wrong section",
            yaml: "model_compilation:\n  model: tiny_llama/model.onnx\n  threads: 2\n",
            args: &[],
            at: "3:3",
            text: "unknown key 'threads' in model_compilation; it belongs in kernel_schedule",
        },
        Bad {
            name: "wrong type",
            yaml: "model_compilation:\n  model: tiny_llama/model.onnx\n  target_device: x86_64\n\
                   kernel_schedule:\n  threads: two\n",
            args: &[],
            at: "5:12",
            text: "kernel_schedule.threads: expected an integer >= 1, got string 'two'",
        },
        Bad {
            name: "out of range",
            yaml: "model_compilation:\n  model: tiny_llama/model.onnx\n  target_device: x86_64\n\
                   kernel_schedule:\n  loop_unroll_factor: 0\n",
            args: &[],
            at: "5:23",
            text: "kernel_schedule.loop_unroll_factor: expected an integer >= 1, got number 0",
        },
        Bad {
            name: "section of the wrong type",
            yaml: "model_compilation:\n  model: tiny_llama/model.onnx\n  target_device: x86_64\nkernel_schedule: 4\n",
            args: &[],
            at: "4:18",
            text: "kernel_schedule: expected a mapping, got number 4",
        },
        Bad {
            name: "vectorization inconsistent with the target",
            yaml: "model_compilation:\n  model: tiny_llama/model.onnx\n  target_device: x86_64\n\
                   kernel_schedule:\n  vectorization: neon\noutput:\n  artifact: out/m.so\n",
            args: &[],
            at: "5:18",
            text: "kernel_schedule.vectorization: 'neon' does not fit target x86_64: neon vectors \
                   exist only on aarch64-neon, aarch64-neon-dotprod; x86_64 accepts auto or none",
        },
        Bad {
            name: "vectorization inconsistent with one of several targets",
            yaml: "model_compilation:\n  model: tiny_llama/model.onnx\n  target_device: [aarch64-neon, aarch64-sve]\n\
                   kernel_schedule:\n  vectorization: neon\noutput:\n  artifact: out/{target}.so\n",
            args: &[],
            at: "5:18",
            text: "'neon' does not fit target aarch64-sve",
        },
        Bad {
            name: "unknown vectorization",
            yaml: "kernel_schedule:\n  vectorization: neno\n",
            args: &[],
            at: "2:18",
            text: "kernel_schedule.vectorization: 'neno' is not one of auto, none, neon, sve, cuda; did you mean 'neon'?",
        },
        Bad {
            name: "unknown target",
            yaml: "model_compilation:\n  model: tiny_llama/model.onnx\n  target_device:\n    - aarch64-neon\n    - x86-64\n",
            args: &[],
            at: "5:7",
            text: "unknown target 'x86-64'; did you mean 'x86_64'? (targets: x86_64, x86_64-v3, x86_64-v3-vnni, aarch64-neon,",
        },
        Bad {
            name: "missing model",
            yaml: "output:\n  artifact: out/m.so\nmodel_compilation:\n  target_device: x86_64\n",
            args: &[],
            at: "3:1",
            text: "missing key 'model' in model_compilation (or pass MODEL on the command line)",
        },
        Bad {
            name: "missing target",
            yaml: "model_compilation:\n  model: tiny_llama/model.onnx\noutput:\n  artifact: out/m.so\n",
            args: &[],
            at: "1:1",
            text: "missing key 'target_device' in model_compilation (or pass --target on the command line)",
        },
        Bad {
            name: "missing output",
            yaml: HEAD,
            args: &[],
            at: "1:1",
            text: "missing section 'output' (or pass -o on the command line)",
        },
        Bad {
            name: "nonexistent model",
            yaml: "model_compilation:\n  model: ../tiny_llama/missing.onnx\n  target_device: x86_64\n",
            args: &[],
            at: "2:10",
            text: "model_compilation.model: ../tiny_llama/missing.onnx not found (looked for ",
        },
        Bad {
            name: "several targets without {target}",
            yaml: "model_compilation:\n  model: tiny_llama/model.onnx\n  target_device: [aarch64-neon, aarch64-neon-dotprod]\n\
                   output:\n  artifact: out/model.so\n",
            args: &[],
            at: "5:13",
            text: "output.artifact: 2 targets (aarch64-neon, aarch64-neon-dotprod) need one artifact \
                   each: put {target} in the path",
        },
        Bad {
            name: "target listed twice",
            yaml: "model_compilation:\n  model: tiny_llama/model.onnx\n  target_device: [x86_64, x86_64]\n",
            args: &[],
            at: "3:27",
            text: "target 'x86_64' is listed twice",
        },
        Bad {
            name: "section of a later stage",
            yaml: "model_compilation:\n  model: tiny_llama/model.onnx\n  target_device: x86_64\n\
                   runtime:\n  max_batch_size: 1\noutput:\n  artifact: out/m.so\n",
            args: &[],
            at: "4:1",
            text: "section 'runtime' is not supported yet",
        },
        Bad {
            name: "typo in a quantization key",
            yaml: "model_compilation:\n  model: tiny_llama/model.onnx\n  target_device: x86_64\n\
                   quantization:\n  mode: q4f16\n  grup_size: 32\noutput:\n  artifact: out/m.so\n",
            args: &[],
            at: "6:3",
            text: "unknown key 'grup_size' in quantization; did you mean 'group_size'?",
        },
        Bad {
            name: "unknown quantization mode",
            yaml: "model_compilation:\n  model: tiny_llama/model.onnx\n  target_device: x86_64\n\
                   quantization:\n  mode: q4f61\noutput:\n  artifact: out/m.so\n",
            args: &[],
            at: "5:9",
            text: "quantization.mode: 'q4f61' is not one of q4f16, q4f32, q4, q8f16, q8f32, q8; did you mean 'q4f16'?",
        },
        Bad {
            name: "contradicting symmetric and zero_point",
            yaml: "model_compilation:\n  model: tiny_llama/model.onnx\n  target_device: x86_64\n\
                   quantization:\n  symmetric: true\n  zero_point: true\noutput:\n  artifact: out/m.so\n",
            args: &[],
            at: "6:3",
            text: "symmetric and zero_point contradict each other",
        },
        Bad {
            name: "awq without calibration",
            yaml: "model_compilation:\n  model: tiny_llama/model.onnx\n  target_device: x86_64\n\
                   quantization:\n  mode: q4\n  method: awq\noutput:\n  artifact: out/m.so\n",
            args: &[],
            at: "6:3",
            text: "quantization.method: method awq needs calibration data",
        },
        Bad {
            name: "unknown activations",
            yaml: "model_compilation:\n  model: tiny_llama/model.onnx\n  target_device: x86_64\n\
                   quantization:\n  mode: q4\n  activations: in8\noutput:\n  artifact: out/m.so\n",
            args: &[],
            at: "6:16",
            text: "quantization.activations: 'in8' is not one of f32, int8; did you mean 'int8'?",
        },
        Bad {
            name: "int8 activations with 8-bit weights",
            yaml: "model_compilation:\n  model: tiny_llama/model.onnx\n  target_device: x86_64\n\
                   quantization:\n  mode: q8\n  activations: int8\noutput:\n  artifact: out/m.so\n",
            args: &[],
            at: "6:3",
            text: "quantization.activations: int8 activations need 4-bit weights (mode q4, q4f16 or q4f32); these weights are int8",
        },
        Bad {
            name: "group size not a power of two",
            yaml: "model_compilation:\n  model: tiny_llama/model.onnx\n  target_device: x86_64\n\
                   quantization:\n  group_size: 48\noutput:\n  artifact: out/m.so\n",
            args: &[],
            at: "5:3",
            text: "group size 48 is not supported",
        },
        Bad {
            name: "typo in a pruning key",
            yaml: "model_compilation:\n  model: tiny_llama/model.onnx\n  target_device: x86_64\n\
                   pruning:\n  ratios: {ffn: 0.25}\n  critrion: magnitude\noutput:\n  artifact: out/m.so\n",
            args: &[],
            at: "6:3",
            text: "unknown key 'critrion' in pruning; did you mean 'criterion'?",
        },
        Bad {
            name: "unknown structure kind",
            yaml: "model_compilation:\n  model: tiny_llama/model.onnx\n  target_device: x86_64\n\
                   pruning:\n  ratios: {fnn: 0.25}\noutput:\n  artifact: out/m.so\n",
            args: &[],
            at: "5:12",
            text: "pruning.ratios: 'fnn' is not one of all, ffn, heads, channels; did you mean 'ffn'?",
        },
        Bad {
            name: "pruning ratio out of range",
            yaml: "model_compilation:\n  model: tiny_llama/model.onnx\n  target_device: x86_64\n\
                   pruning:\n  ratios:\n    ffn: 1.5\noutput:\n  artifact: out/m.so\n",
            args: &[],
            at: "6:10",
            text: "pruning.ratios.ffn: '1.5' is neither a fraction in [0, 1) nor a whole number of units",
        },
        Bad {
            name: "activation criterion without calibration",
            yaml: "model_compilation:\n  model: tiny_llama/model.onnx\n  target_device: x86_64\n\
                   pruning:\n  ratios: {ffn: 0.25}\n  criterion: activation\noutput:\n  artifact: out/m.so\n",
            args: &[],
            at: "6:3",
            text: "pruning.criterion: criterion activation needs calibration data",
        },
        Bad {
            name: "pruning without an amount",
            yaml: "model_compilation:\n  model: tiny_llama/model.onnx\n  target_device: x86_64\n\
                   pruning:\n  criterion: magnitude\noutput:\n  artifact: out/m.so\n",
            args: &[],
            at: "4:1",
            text: "pruning.ratios: no amount to prune",
        },
        Bad {
            name: "2:4 sparsity not implemented",
            yaml: "model_compilation:\n  model: tiny_llama/model.onnx\n  target_device: x86_64\n\
                   pruning:\n  method: \"2:4\"\n  ratios: {ffn: 0.25}\noutput:\n  artifact: out/m.so\n",
            args: &[],
            at: "5:11",
            text: "not implemented yet; use structured",
        },
        Bad {
            name: "quantization ordered before pruning",
            yaml: "model_compilation:\n  model: tiny_llama/model.onnx\n  target_device: x86_64\n\
                   pipeline: [quantization, pruning]\n\
                   pruning:\n  ratios: {ffn: 0.25}\nquantization:\n  mode: q4\noutput:\n  artifact: out/m.so\n",
            args: &[],
            at: "4:26",
            text: "pipeline: pruning must run before quantization",
        },
        Bad {
            name: "pipeline stage without its section",
            yaml: "model_compilation:\n  model: tiny_llama/model.onnx\n  target_device: x86_64\n\
                   pipeline: [pruning]\noutput:\n  artifact: out/m.so\n",
            args: &[],
            at: "4:12",
            text: "'pruning' is listed but the config has no pruning section",
        },
        Bad {
            name: "key of a later stage",
            yaml: "kernel_schedule:\n  threads: 2\n  prefetch_distance: 64\n",
            args: &[],
            at: "3:3",
            text: "key 'prefetch_distance' in kernel_schedule is not supported yet",
        },
        Bad {
            name: "unsupported target format",
            yaml: "model_compilation:\n  model: tiny_llama/model.onnx\n  target_format: elf\n",
            args: &[],
            at: "3:18",
            text: "model_compilation.target_format: format 'elf' is not supported (only 'so' for now)",
        },
        Bad {
            name: "flag conflicting with the config",
            yaml: "model_compilation:\n  model: tiny_llama/model.onnx\n  target_device: x86_64\noutput:\n  artifact: out/m.so\n",
            args: &["--target", "aarch64-neon"],
            at: "3:18",
            text: "model_compilation.target_device 'x86_64' conflicts with --target aarch64-neon on the command line",
        },
        Bad {
            name: "YAML syntax error",
            yaml: "model_compilation:\n  model: [tiny_llama/model.onnx\n  target_device: x86_64\n",
            args: &[],
            at: "3:16",
            text: "invalid YAML: ",
        },
        Bad {
            name: "empty config",
            yaml: "# nothing yet\n",
            args: &[],
            at: "1:1",
            text: "the config is empty",
        },
    ];
    let mut failures = Vec::new();
    for case in &cases {
        let dir = workdir();
        let cfg = write_config(dir.path(), case.yaml);
        let mut args = vec!["compile", "--config", cfg.to_str().unwrap()];
        args.extend(case.args);
        let r = kiln(&args);
        let lines: Vec<&str> = r.stderr.lines().collect();
        let want = format!("config.yaml:{}: ", case.at);
        let ok = r.code == Some(1)
            && lines.len() == 1
            && lines[0].starts_with("error: ")
            && lines[0].contains(&want)
            && lines[0].contains(case.text)
            && !dir.path().join("out").exists();
        if !ok {
            failures.push(format!(
                "{}: exit {:?}, stderr {:?} (want {want:?} and {:?})",
                case.name, r.code, r.stderr, case.text
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn missing_config_file_is_one_line_error() {
    let r = kiln(&["compile", "--config", "/nonexistent/kiln.yaml"]);
    assert_eq!(r.code, Some(1));
    assert_eq!(r.stderr.lines().count(), 1, "{}", r.stderr);
    assert!(
        r.stderr
            .starts_with("error: cannot read config /nonexistent/kiln.yaml: "),
        "{}",
        r.stderr
    );
}

#[test]
fn without_config_model_target_and_output_are_required() {
    let r = kiln(&["compile", "--target", "x86_64"]);
    assert_eq!(r.code, Some(2), "{}", r.stderr);
    assert!(r.stderr.contains("--output"), "{}", r.stderr);
}
