//! Weight quantization end to end: `kiln compile --quantize` on the test-pack models. The
//! quantized graph (written with `--emit-onnx`) is the reference: Kiln's artifacts for x86_64
//! (native) and both aarch64 profiles (qemu) must match the interpreter on it, and onnxruntime
//! must run it and agree. On SmolLM2: automatic f16 exclusions, artifact size against the
//! expected INT4 + f16 size, RTN perplexity over the 64 reference windows no worse than
//! onnxruntime's own INT4 quantization, and aarch64 logits equal to x86_64's. Also AWQ on
//! token calibration, and bad settings.

mod common;

use common::*;
use kiln_compiler::onnx::load_model;
use kiln_compiler::{interp, Tensor};
use std::path::{Path, PathBuf};
use std::process::Command;

/// `kiln compile MODEL --target TARGET --quantize q4 EXTRA... -o OUT`; returns its stdout.
fn compile_q4(model_dir: &Path, target: &str, extra: &[&str], out: &Path) -> String {
    let model = model_dir.join("model.onnx");
    let mut args = vec![
        "compile",
        model.to_str().unwrap(),
        "--target",
        target,
        "--quantize",
        "q4",
    ];
    args.extend_from_slice(extra);
    args.extend(["-o", out.to_str().unwrap()]);
    let r = kiln(&args);
    assert_eq!(r.code, Some(0), "kiln {}: {}", args.join(" "), r.stderr);
    r.stdout
}

fn qemu_outputs(so: &Path, cpu: &str, inputs: &[Tensor], like: &[Tensor]) -> Vec<Tensor> {
    let r = run_qemu(so, cpu, inputs, like.len());
    assert_eq!(r.code, Some(0), "qemu -cpu {cpu}: {}", r.stderr);
    like.iter()
        .zip(&r.outputs)
        .map(|(e, b)| Tensor::from_le_bytes(e.dtype(), e.shape.clone(), b).unwrap())
        .collect()
}

/// With f32 activations and with int8 ones (accuracy level 4: activations quantized per group,
/// integer dot products: `sdot` under dotprod, `vpdpbusd` with AVX-VNNI), on every target.
#[test]
fn tiny_llama_q4_artifacts_match_the_quantized_graph_on_every_target() {
    let m = model_dir("tiny_llama");
    let dir = tempfile::tempdir().unwrap();
    let inputs = read_set(&m.join("test_data_set_0"), "input");
    for activations in ["f32", "int8"] {
        let onnx = dir.path().join(format!("q4_{activations}.onnx"));
        let mut reference = None;
        for target in INT8_TARGETS {
            let so = dir.path().join(format!("q4_{activations}_{target}.so"));
            let out = compile_q4(
                &m,
                target,
                &[
                    "--group-size",
                    "32",
                    "--activations",
                    activations,
                    "--emit-onnx",
                    onnx.to_str().unwrap(),
                ],
                &so,
            );
            assert!(out.contains("quantized 14 layers"), "{out}");
            let expected = reference.get_or_insert_with(|| {
                let g = load_model(&onnx).unwrap().graph;
                let levels: Vec<usize> = g
                    .nodes
                    .node_weights()
                    .filter_map(|n| match n.op {
                        kiln_compiler::ir::Op::MatMulNBits { accuracy_level, .. } => {
                            Some(accuracy_level)
                        }
                        _ => None,
                    })
                    .collect();
                let level = if activations == "int8" { 4 } else { 0 };
                assert!(
                    levels.len() == 14 && levels.iter().all(|&l| l == level),
                    "the emitted graph has 14 MatMulNBits with accuracy level {level}: {levels:?}"
                );
                interp::run(&g, &inputs).unwrap()
            });
            let Some(got) = run_int8_target(&so, target, &inputs, expected) else {
                continue;
            };
            close(
                &format!("tiny_llama q4 {activations} activations {target}"),
                expected,
                &got,
                1e-3,
                1e-4,
            );
        }
    }
}

#[test]
fn emitted_onnx_runs_in_onnxruntime_and_matches_the_artifact() {
    let m = model_dir("tiny_llama");
    let dir = tempfile::tempdir().unwrap();
    let (onnx, so) = (dir.path().join("q.onnx"), dir.path().join("q.so"));
    compile_q4(&m, "x86_64", &["--emit-onnx", onnx.to_str().unwrap()], &so);
    let inputs_dir = m.join("test_data_set_0");
    let ort = onnxruntime(&onnx, &inputs_dir, &dir.path().join("ort"));
    let ours = run_native(&so, &read_set(&inputs_dir, "input"), 1);
    close(
        "emitted onnx in onnxruntime vs artifact",
        &ort,
        &ours,
        1e-3,
        1e-4,
    );
}

/// The targets that run int8 products here: the x86-64 profiles natively (where the host has
/// their features; elsewhere the runtime must refuse them), both aarch64 profiles under qemu.
const INT8_TARGETS: [&str; 5] = [
    "x86_64",
    "x86_64-v3",
    "x86_64-v3-vnni",
    "aarch64-neon",
    "aarch64-neon-dotprod",
];

/// Runs an artifact compiled for one of [`INT8_TARGETS`]; `None` where this host cannot run
/// it, after checking that the runtime refuses it with a clear reason.
fn run_int8_target(
    so: &Path,
    target: &str,
    inputs: &[Tensor],
    expected: &[Tensor],
) -> Option<Vec<Tensor>> {
    Some(match target {
        "aarch64-neon" => qemu_outputs(so, "cortex-a72", inputs, expected),
        "aarch64-neon-dotprod" => qemu_outputs(so, "max", inputs, expected),
        _ if kiln_runtime::cpu::check_compatible(target, &[]).is_err() => {
            let err = kiln_runtime::Model::load(so).expect_err("artifact refused");
            assert!(err.to_string().contains("lacks"), "{err}");
            return None;
        }
        _ => run_native(so, inputs, 2),
    })
}

/// The disassembly of an artifact (binutils' objdump for its architecture).
fn disassemble(so: &Path, target: &str) -> String {
    let objdump = if target.starts_with("aarch64") {
        tool("aarch64-linux-gnu-objdump")
    } else {
        "objdump".into()
    };
    let out = Command::new(objdump)
        .arg("-d")
        .arg(so)
        .output()
        .expect("objdump (binutils) is installed");
    assert!(out.status.success(), "objdump -d {}", so.display());
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// MatMulNBits with accuracy level 4 (int8 activations) computes what onnxruntime computes:
/// single products (so that no rounding difference upstream can move an activation across a
/// quantization step) with one or several rows, whole and partial last blocks, with and
/// without bias, and N that is or is not a multiple of the vector width (aarch64 kernels:
/// spans of four, two and one column groups, and scalar columns; x86-64 tiles: spans of 16
/// and 8 columns, and N = 36 and N = 10 falling back to the Cranelift kernels). The models
/// come from the benchmark's generator. Each target's kernels use its dot-product
/// instruction, and the x86-64 targets their hand-written tiles.
#[test]
fn int8_activation_products_match_onnxruntime_accuracy_level_4() {
    let dir = tempfile::tempdir().unwrap();
    let cases: &[(&str, &[&str])] = &[
        ("matvec", &["--k", "256", "--n", "64", "--m", "1"]),
        (
            "matvec_two_groups",
            &["--k", "256", "--n", "40", "--m", "1"],
        ),
        (
            "matvec_one_group",
            &["--k", "200", "--n", "36", "--m", "1", "--block", "32"],
        ),
        (
            "matvec_scalar",
            &["--k", "64", "--n", "10", "--m", "1", "--block", "32"],
        ),
        ("rows", &["--k", "128", "--n", "64", "--m", "8"]),
        (
            "bias_eight_columns",
            &[
                "--k", "200", "--n", "24", "--m", "2", "--block", "32", "--bias",
            ],
        ),
        (
            "bias_sixteen_columns",
            &["--k", "256", "--n", "48", "--m", "1", "--bias"],
        ),
        ("partial_block", &["--k", "576", "--n", "64", "--m", "3"]),
        (
            "odd_n_block32",
            &["--k", "200", "--n", "36", "--m", "2", "--block", "32"],
        ),
    ];
    // What each target's int8 product kernels must contain: the dot-product instruction and,
    // on x86-64, the tile.
    let dot_instruction: [(&str, &[&str]); 5] = [
        ("x86_64", &["pmaddubsw", "<kiln_uk_q4i8_sse_8c_2x16w_f32>:"]),
        (
            "x86_64-v3",
            &["vpmaddubsw", "<kiln_uk_q4i8_madd_16c_2x16w_f32>:"],
        ),
        (
            "x86_64-v3-vnni",
            &["vpdpbusd", "<kiln_uk_q4i8_vnni_16c_2x16w_f32>:"],
        ),
        ("aarch64-neon", &["smull"]),
        ("aarch64-neon-dotprod", &["sdot"]),
    ];
    for (name, args) in cases {
        let case = dir.path().join(name);
        let st = Command::new(cache_dir().join("venv/bin/python"))
            .arg(repo_root().join("scripts/int4_matvec_model.py"))
            .args(*args)
            .args(["--copies", "2", "--out"])
            .arg(&case)
            .output()
            .unwrap();
        assert!(
            st.status.success(),
            "{}",
            String::from_utf8_lossy(&st.stderr)
        );
        let model = case.join("model.onnx");
        let inputs_dir = case.join("test_data_set_0");
        let inputs = read_set(&inputs_dir, "input");
        let expected = interp::run(&load_model(&model).unwrap().graph, &inputs).unwrap();
        let ort = onnxruntime(&model, &inputs_dir, &case.join("ort"));
        close(
            &format!("{name}: onnxruntime vs interpreter"),
            &ort,
            &expected,
            1e-5,
            1e-5,
        );
        for target in INT8_TARGETS {
            let so = case.join(format!("{target}.so"));
            let r = kiln(&[
                "compile",
                model.to_str().unwrap(),
                "--target",
                target,
                "-o",
                so.to_str().unwrap(),
            ]);
            assert_eq!(r.code, Some(0), "{}", r.stderr);
            if *name == "matvec" {
                let (_, wanted) = dot_instruction.iter().find(|(t, _)| *t == target).unwrap();
                let code = disassemble(&so, target);
                for w in *wanted {
                    assert!(code.contains(w), "{target}: no {w} in the int8 products");
                }
            }
            let Some(got) = run_int8_target(&so, target, &inputs, &expected) else {
                continue;
            };
            // The integer arithmetic is exact and the float steps run in the same order.
            close(&format!("{name} {target}"), &expected, &got, 0.0, 0.0);
        }
    }
}

/// Expected INT4 artifact weight bytes of SmolLM2-135M: packed nibbles, f16 scales and packed
/// 4-bit zero points of the 210 projections (K/128 rounded up blocks per column), the f16
/// embedding table (shared with the tied head) and the f32 norm weights.
fn smollm2_expected_int4_bytes() -> f64 {
    let (d, kv, ff, layers, vocab) = (576usize, 192usize, 1536usize, 30usize, 49152usize);
    // (K, N) of q, k, v, o, gate, up, down.
    let projections = [(d, d), (d, kv), (d, kv), (d, d), (d, ff), (d, ff), (ff, d)];
    let mut bytes = 0f64;
    for (k, n) in projections {
        let blocks = k.div_ceil(128);
        bytes +=
            (n * blocks * 64) as f64 + (n * blocks * 2) as f64 + (n * blocks.div_ceil(2)) as f64;
    }
    bytes *= layers as f64;
    bytes + (vocab * d * 2) as f64 + ((2 * layers + 1) * d * 4) as f64
}

#[test]
fn smollm2_int4_keeps_embedding_and_tied_head_in_f16_at_the_expected_size() {
    let m = model_dir("smollm2_135m");
    let dir = tempfile::tempdir().unwrap();
    let x86 = dir.path().join("q4_x86.so");
    let out = compile_q4(&m, "x86_64", &[], &x86);
    assert!(out.contains("embedding table"), "{out}");
    assert!(out.contains("tied LM head"), "{out}");
    assert!(out.contains("quantized 210 layers"), "{out}");
    assert!(!out.contains("WARNING"), "{out}");
    let size = std::fs::metadata(&x86).unwrap().len() as f64;
    let expected = smollm2_expected_int4_bytes();
    eprintln!("artifact {size} bytes, expected weights {expected}");
    assert!(
        (size - expected).abs() / expected < 0.10,
        "artifact {size} bytes vs expected {expected}"
    );
    // The same model for aarch64 under qemu gives the x86_64 artifact's logits.
    let arm = dir.path().join("q4_arm.so");
    compile_q4(&m, "aarch64-neon", &[], &arm);
    let inputs = read_set(&m.join("test_data_set_0"), "input");
    let x86_out = run_native(&x86, &inputs, 2);
    let arm_out = qemu_outputs(&arm, "cortex-a72", &inputs, &x86_out);
    close(
        "smollm2 q4 aarch64 vs x86_64",
        &x86_out,
        &arm_out,
        1e-3,
        1e-4,
    );
}

/// Per-window NLL of `kiln eval` output lines `window i: nll X`.
fn window_nlls(stdout: &str) -> Vec<f64> {
    stdout
        .lines()
        .filter_map(|l| l.strip_prefix("window "))
        .filter_map(|l| l.split("nll ").nth(1))
        .map(|v| v.trim().parse().unwrap())
        .collect()
}

#[test]
fn smollm2_int4_rtn_perplexity_is_no_worse_than_onnxruntime_int4() {
    let m = model_dir("smollm2_135m_seq128");
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(m.join("reference.json")).unwrap()).unwrap();
    let ort_int4: Vec<f64> = reference["int4_ort_matmulnbits"]["nll_per_window"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    let fp32: Vec<f64> = reference["fp32"]["nll_per_window"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let so = dir.path().join("q4.so");
    compile_q4(&m, "x86_64", &[], &so);
    let tokens = repo_root().join("tests/data/lee_background.smollm2.i32");
    // The protocol of reference.json: the first 64 windows of 128 tokens.
    let r = kiln(&[
        "eval",
        so.to_str().unwrap(),
        "--perplexity",
        tokens.to_str().unwrap(),
        "--window",
        "128",
        "--windows",
        "64",
    ]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    let last = r.stdout.trim_end().lines().last().unwrap().to_string();
    let ours_ppl: f64 = last
        .strip_prefix("perplexity: ")
        .unwrap_or_else(|| panic!("last line {last:?}"))
        .parse()
        .unwrap();
    let ours = window_nlls(&r.stdout);
    assert_eq!(ours.len(), 64);
    for (w, nll) in ours.iter().enumerate() {
        let rel = (nll - ort_int4[w]) / ort_int4[w];
        // Same grid as onnxruntime's quantizer: within 0.5% on every window (measured: at
        // most 0.07%), and quantization must cost something against fp32.
        assert!(
            rel.abs() < 0.005,
            "window {w}: {nll} vs onnxruntime int4 {}",
            ort_int4[w]
        );
        assert!(
            *nll > fp32[w],
            "window {w}: int4 {nll} below fp32 {}",
            fp32[w]
        );
    }
    let ort_ppl = reference["int4_ort_matmulnbits"]["perplexity"]
        .as_f64()
        .unwrap();
    eprintln!("SmolLM2 INT4 RTN perplexity: kiln {ours_ppl:.4}, onnxruntime {ort_ppl:.4}");
    // The bar: no worse than onnxruntime's own INT4 quantization (same settings).
    assert!(
        ours_ppl <= ort_ppl,
        "kiln int4 perplexity {ours_ppl} above onnxruntime int4 {ort_ppl}"
    );
}

/// A token file of 48 ids `(i * step + start) % 2048` (below tiny_llama's vocabulary of
/// 2048: six 8-token windows) in `dir`.
fn token_file(dir: &Path, step: i32, start: i32) -> PathBuf {
    let tokens: Vec<u8> = (0..8 * 6)
        .flat_map(|i: i32| ((i * step + start) % 2048).to_le_bytes())
        .collect();
    let tok = dir.join("tokens.i32");
    std::fs::write(&tok, tokens).unwrap();
    tok
}

#[test]
fn awq_with_token_calibration_compiles_and_matches_its_graph() {
    let m = model_dir("tiny_llama");
    let dir = tempfile::tempdir().unwrap();
    let tok = token_file(dir.path(), 7919, 13);
    let (onnx, so) = (dir.path().join("awq.onnx"), dir.path().join("awq.so"));
    let out = compile_q4(
        &m,
        "x86_64",
        &[
            "--group-size",
            "32",
            "--method",
            "awq",
            "--calibration",
            tok.to_str().unwrap(),
            "--calibration-samples",
            "4",
            "--emit-onnx",
            onnx.to_str().unwrap(),
        ],
        &so,
    );
    assert!(out.contains("calibration: 4 samples"), "{out}");
    assert!(out.contains("AWQ: "), "{out}");
    let inputs = read_set(&m.join("test_data_set_0"), "input");
    let expected = interp::run(&load_model(&onnx).unwrap().graph, &inputs).unwrap();
    close(
        "tiny_llama awq x86_64",
        &expected,
        &run_native(&so, &inputs, 1),
        1e-3,
        1e-4,
    );
}

/// The mean output error and the listed (output, weight) errors of a compile report with
/// calibration data.
fn output_error_report(out: &str) -> (f64, Vec<(f64, f64)>) {
    let summary = out
        .lines()
        .find(|l| l.contains("outputs on calibration data"))
        .unwrap_or_else(|| panic!("no output-error summary in:\n{out}"));
    let mean: f64 = summary
        .split("outputs on calibration data ")
        .nth(1)
        .and_then(|s| s.split(';').next())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or_else(|| panic!("cannot parse {summary}"));
    let listed = out
        .lines()
        .skip_while(|l| !l.contains("worst output first"))
        .skip(1)
        .take_while(|l| l.starts_with("    0.") || l.starts_with("    1."))
        .map(|l| {
            let mut f = l.split_whitespace().map(|v| v.parse::<f64>().unwrap());
            (f.next().unwrap(), f.next().unwrap())
        })
        .collect();
    (mean, listed)
}

#[test]
fn per_layer_output_error_on_calibration_data_sorted_worst_first() {
    let m = model_dir("tiny_llama");
    let dir = tempfile::tempdir().unwrap();
    let tok = token_file(dir.path(), 104_729, 7);
    let report = |method: &str| {
        let so = dir.path().join(format!("{method}.so"));
        let out = compile_q4(
            &m,
            "x86_64",
            &[
                "--group-size",
                "32",
                "--method",
                method,
                "--calibration",
                tok.to_str().unwrap(),
                "--calibration-samples",
                "4",
            ],
            &so,
        );
        output_error_report(&out)
    };
    let (rtn_mean, rtn_layers) = report("rtn");
    let (awq_mean, _) = report("awq");
    assert!(rtn_layers.len() >= 4, "{rtn_layers:?}");
    for pair in rtn_layers.windows(2) {
        assert!(
            pair[0].0 >= pair[1].0,
            "not sorted worst first: {rtn_layers:?}"
        );
    }
    for (output, weight) in &rtn_layers {
        assert!(*output > 0.0 && *output < 0.5, "{rtn_layers:?}");
        assert!(*weight > 0.0 && *weight < 0.5, "{rtn_layers:?}");
    }
    // AWQ minimizes each layer's output error on these very rows (plain rounding is one of
    // its candidates), so it can only be lower.
    assert!(
        awq_mean <= rtn_mean * (1.0 + 1e-6),
        "AWQ output error {awq_mean} above RTN {rtn_mean}"
    );
}

#[test]
fn bad_quantization_settings_are_one_line_errors() {
    let m = model_dir("tiny_llama");
    let model = m.join("model.onnx");
    let model = model.to_str().unwrap();
    let cases: &[(&[&str], &str)] = &[
        (&["--quantize", "q5"], "expected one of q4f16"),
        (&["--quantize", "q4", "--group-size", "48"], "group size 48"),
        (
            &["--quantize", "q4", "--method", "awq"],
            "needs calibration data",
        ),
        (&["--group-size", "64"], "need --quantize"),
        (
            &[
                "--quantize",
                "q4",
                "--calibration",
                "/nonexistent/tokens.i32",
            ],
            "not found",
        ),
    ];
    for (extra, want) in cases {
        let mut args = vec![
            "compile",
            model,
            "--target",
            "x86_64",
            "-o",
            "/tmp/kiln_never.so",
        ];
        args.extend_from_slice(extra);
        let r = kiln(&args);
        assert_eq!(r.code, Some(1), "{extra:?}: {}", r.stderr);
        assert_eq!(r.stderr.lines().count(), 1, "{extra:?}: {}", r.stderr);
        assert!(r.stderr.contains(want), "{extra:?}: {}", r.stderr);
    }
}

/// A SmolLM2 quantized by onnxruntime's own MatMulNBitsQuantizer (block 128, asymmetric,
/// every projection) imports with its weights still packed, compiles, and
/// matches onnxruntime's outputs on it.
#[test]
fn smollm2_quantized_by_onnxruntime_imports_packed_and_matches_onnxruntime() {
    let m = model_dir("smollm2_135m");
    let dir = tempfile::tempdir().unwrap();
    let q = dir.path().join("ort_q4.onnx");
    let py = cache_dir().join("venv/bin/python");
    let st = Command::new(&py)
        .arg(repo_root().join("scripts/ort_quantize.py"))
        .arg(m.join("model.onnx"))
        .arg(&q)
        .arg("128")
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "onnxruntime quantizer: {}",
        String::from_utf8_lossy(&st.stderr)
    );
    let g = load_model(&q).unwrap().graph;
    let nbits = g
        .nodes
        .node_weights()
        .filter(|n| n.op.onnx_name() == "MatMulNBits")
        .count();
    // The tied LM head reads the embedding through a Transpose: onnxruntime leaves it f32.
    assert_eq!(nbits, 210, "every projection of the 30 layers");
    let so = dir.path().join("ort_q4.so");
    let r = kiln(&[
        "compile",
        q.to_str().unwrap(),
        "--target",
        "x86_64",
        "-o",
        so.to_str().unwrap(),
    ]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    // Packed: the weights are far below the 538 MB of f32 (f32 embedding + INT4 rest).
    let size = std::fs::metadata(&so).unwrap().len();
    assert!(size < 300_000_000, "artifact {size} bytes");
    let inputs_dir = m.join("test_data_set_0");
    let ort = onnxruntime(&q, &inputs_dir, &dir.path().join("ort"));
    let ours = run_native(&so, &read_set(&inputs_dir, "input"), 2);
    close(
        "onnxruntime-quantized smollm2: onnxruntime vs artifact",
        &ort,
        &ours,
        1e-2,
        1e-2,
    );
}
