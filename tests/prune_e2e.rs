//! Structured pruning end to end: `kiln compile --prune` on the test-pack models and on a
//! small CNN built here. The pruned graph (written with `--emit-onnx`) is the reference: it
//! must verify, Kiln's artifact must match the interpreter on it, and onnxruntime must run it
//! and agree. SmolLM2 loses exactly the parameters of the pruned FFN neurons; MiniLM with two
//! heads fewer per layer is compared with the unpruned model by `kiln eval --reference`;
//! channels are pruned through Conv -> BatchNormalization -> Relu -> Conv; pruning composes
//! with INT4 quantization; every skipped candidate is reported with its reason; bad settings
//! are one-line errors.

mod common;

use common::*;
use kiln_compiler::onnx::load_model;
use kiln_compiler::{interp, shape, Tensor};
use std::path::Path;

/// `kiln compile MODEL --target x86_64 ARGS... -o OUT`; returns its stdout.
fn compile(model: &Path, args: &[&str], out: &Path) -> String {
    let mut all = vec!["compile", model.to_str().unwrap(), "--target", "x86_64"];
    all.extend_from_slice(args);
    all.extend(["-o", out.to_str().unwrap()]);
    let r = kiln(&all);
    assert_eq!(r.code, Some(0), "kiln {}: {}", all.join(" "), r.stderr);
    r.stdout
}

/// Loads an ONNX file as the compiler sees it (shape-inferred, constants folded), verified.
fn load_verified(path: &Path) -> kiln_compiler::Graph {
    let mut g = load_model(path).unwrap().graph;
    shape::infer(&mut g).unwrap();
    kiln_compiler::ir::verify::verify(&g).unwrap();
    g
}

/// Every `skipped` line of a report names the candidate and gives a reason.
fn skipped_lines(report: &str) -> Vec<&str> {
    let lines: Vec<&str> = report
        .lines()
        .filter(|l| l.trim_start().starts_with("skipped "))
        .collect();
    for l in &lines {
        let reason = l.split_once("): ").map(|(_, r)| r.trim()).unwrap_or("");
        assert!(reason.len() > 10, "skipped line without a reason: {l}");
    }
    lines
}

#[test]
fn smollm2_ffn_pruning_removes_exactly_the_neurons_and_matches_the_reference() {
    let m = model_dir("smollm2_135m");
    let dir = tempfile::tempdir().unwrap();
    let (onnx, so) = (dir.path().join("p.onnx"), dir.path().join("p.so"));
    let report = compile(
        &m.join("model.onnx"),
        &["--prune", "ffn=0.25", "--emit-onnx", onnx.to_str().unwrap()],
        &so,
    );
    assert_eq!(
        report.matches("neurons (width 1536 -> 1152)").count(),
        30,
        "{report}"
    );
    // Attention blocks were found but not asked for; the residual stream is not prunable.
    assert_eq!(report.matches("no amount given for heads").count(), 30);
    let skipped = skipped_lines(&report);
    assert_eq!(skipped.len(), 61, "{report}");
    assert!(skipped
        .iter()
        .filter(|l| l.contains("down_proj") || l.contains("o_proj"))
        .all(|l| l.contains("residual stream")));

    let before = load_verified(&m.join("model.onnx"));
    let after = load_verified(&onnx);
    let (layers, removed, hidden) = (30u64, 384u64, 576u64);
    assert_eq!(
        before.parameter_stats().count - after.parameter_stats().count,
        layers * removed * hidden * 3,
        "gate and up lose 384 columns, down 384 rows, in each of 30 layers"
    );

    let inputs_dir = m.join("test_data_set_0");
    let inputs = read_set(&inputs_dir, "input");
    let expected = interp::run(&after, &inputs).unwrap();
    let ours = run_native(&so, &inputs, 2);
    close(
        "pruned smollm2 artifact vs interpreter",
        &expected,
        &ours,
        1e-3,
        1e-3,
    );
    let ort = onnxruntime(&onnx, &inputs_dir, &dir.path().join("ort"));
    close(
        "pruned smollm2 in onnxruntime vs artifact",
        &ort,
        &ours,
        1e-3,
        1e-3,
    );
}

/// `kiln eval SO --reference MODEL --inputs-dir DIR`: `(output, cosine, max error)` per line.
fn eval_reference(so: &Path, reference: &Path, inputs_dir: &Path) -> Vec<(String, f64, f64)> {
    let r = kiln(&[
        "eval",
        so.to_str().unwrap(),
        "--reference",
        reference.to_str().unwrap(),
        "--inputs-dir",
        inputs_dir.to_str().unwrap(),
    ]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    r.stdout
        .lines()
        .map(|l| {
            // "NAME: cosine similarity C, max abs error E"
            let (name, rest) = l.split_once(": cosine similarity ").unwrap();
            let (c, e) = rest.split_once(", max abs error ").unwrap();
            (name.to_string(), c.parse().unwrap(), e.parse().unwrap())
        })
        .collect()
}

#[test]
fn minilm_with_two_heads_fewer_per_layer_runs_and_is_compared_with_the_unpruned_model() {
    let m = model_dir("minilm_l6_v2");
    let dir = tempfile::tempdir().unwrap();
    let (onnx, so) = (dir.path().join("p.onnx"), dir.path().join("p.so"));
    let report = compile(
        &m.join("model.onnx"),
        &["--prune", "heads=2", "--emit-onnx", onnx.to_str().unwrap()],
        &so,
    );
    assert_eq!(
        report.matches("12 -> 10 heads (width 384 -> 320)").count(),
        6,
        "{report}"
    );
    assert_eq!(skipped_lines(&report).len(), 12, "{report}");
    let inputs_dir = m.join("test_data_set_0");

    // Against the pruned graph: the artifact is exact.
    for (name, cosine, max_err) in eval_reference(&so, &onnx, &inputs_dir) {
        assert!(
            cosine > 0.99999 && max_err < 1e-3,
            "{name}: {cosine} {max_err}"
        );
    }
    // Against the unpruned model: close, but not the same model.
    let vs_original = eval_reference(&so, &m.join("model.onnx"), &inputs_dir);
    let (_, cosine, _) = vs_original
        .iter()
        .find(|(n, ..)| n == "sentence_embedding")
        .expect("sentence_embedding line");
    eprintln!("MiniLM heads=2 sentence embedding cosine vs unpruned: {cosine}");
    assert!(*cosine > 0.9 && *cosine < 0.9999, "{vs_original:?}");

    let ort = onnxruntime(&onnx, &inputs_dir, &dir.path().join("ort"));
    let ours = run_native(&so, &read_set(&inputs_dir, "input"), 1);
    close(
        "pruned minilm in onnxruntime vs artifact",
        &ort,
        &ours,
        1e-3,
        1e-4,
    );
}

fn f32_bytes(vals: impl Iterator<Item = f32>) -> Vec<u8> {
    vals.flat_map(f32::to_le_bytes).collect()
}

/// x[1,3,12,12] -> Conv(16, 3x3, pad 1) -> BatchNormalization -> Relu -> Conv(8, 3x3) -> y.
fn cnn() -> kiln_compiler::proto::ModelProto {
    let w = |seed: u32, n: usize| {
        f32_bytes((0..n as u32).map(move |i| {
            let h = (i.wrapping_mul(2654435761).wrapping_add(seed * 97)) % 1000;
            h as f32 / 1000.0 - 0.5
        }))
    };
    let mut conv1 = node("Conv", "conv1", &["x", "w1", "b1"], &["c1"]);
    conv1.attribute.push(kiln_compiler::proto::AttributeProto {
        name: Some("pads".into()),
        r#type: Some(7),
        ints: vec![1, 1, 1, 1],
        ..Default::default()
    });
    model(
        vec![
            conv1,
            node(
                "BatchNormalization",
                "bn",
                &["c1", "gamma", "beta", "mean", "var"],
                &["n1"],
            ),
            node("Relu", "relu", &["n1"], &["r1"]),
            node("Conv", "conv2", &["r1", "w2"], &["y"]),
        ],
        vec![value_info("x", 1, &[Ok(1), Ok(3), Ok(12), Ok(12)])],
        vec![value_info("y", 1, &[Ok(1), Ok(8), Ok(10), Ok(10)])],
        vec![
            f32_initializer("w1", &[16, 3, 3, 3], w(1, 16 * 27)),
            f32_initializer("b1", &[16], w(2, 16)),
            f32_initializer(
                "gamma",
                &[16],
                f32_bytes((0..16).map(|i| 0.5 + i as f32 / 16.0)),
            ),
            f32_initializer("beta", &[16], w(3, 16)),
            f32_initializer("mean", &[16], w(4, 16)),
            f32_initializer(
                "var",
                &[16],
                f32_bytes((0..16).map(|i| 1.0 + i as f32 / 8.0)),
            ),
            f32_initializer("w2", &[8, 16, 3, 3], w(5, 8 * 16 * 9)),
        ],
    )
}

#[test]
fn conv_channels_are_pruned_through_batchnorm_and_relu_into_the_next_conv() {
    let dir = tempfile::tempdir().unwrap();
    let model_path = write_model(dir.path(), "cnn.onnx", &cnn());
    let (onnx, so) = (dir.path().join("p.onnx"), dir.path().join("p.so"));
    let report = compile(
        &model_path,
        &[
            "--prune",
            "channels=0.5",
            "--emit-onnx",
            onnx.to_str().unwrap(),
        ],
        &so,
    );
    assert!(
        report.contains("pruned channels conv1: 16 -> 8 channels (width 16 -> 8)"),
        "{report}"
    );
    // conv2's output is the graph output: its channels are not prunable, and the report says so.
    let skipped = skipped_lines(&report);
    assert_eq!(skipped.len(), 1, "{report}");
    assert!(skipped[0].contains("'y' is a graph output"), "{report}");

    let g = load_verified(&onnx);
    let shapes: Vec<Vec<usize>> = g
        .nodes
        .node_weights()
        .filter(|n| n.op.onnx_name() == "Conv")
        .map(|n| g.constant(n.inputs[1].unwrap()).unwrap().shape.clone())
        .collect();
    assert_eq!(shapes, vec![vec![8, 3, 3, 3], vec![8, 8, 3, 3]]);
    let x: Vec<f32> = (0..3 * 144)
        .map(|i| ((i * 37) % 101) as f32 / 50.0 - 1.0)
        .collect();
    let inputs = vec![Tensor::from_vec(vec![1, 3, 12, 12], x)];
    let expected = interp::run(&g, &inputs).unwrap();
    close(
        "pruned cnn artifact vs interpreter",
        &expected,
        &run_native(&so, &inputs, 1),
        1e-4,
        1e-5,
    );
}

#[test]
fn prune_then_quantize_smollm2_compiles_and_matches_the_transformed_graph() {
    let m = model_dir("smollm2_135m");
    let dir = tempfile::tempdir().unwrap();
    let (onnx, so) = (dir.path().join("pq.onnx"), dir.path().join("pq.so"));
    let report = compile(
        &m.join("model.onnx"),
        &[
            "--prune",
            "ffn=0.25",
            "--quantize",
            "q4",
            "--emit-onnx",
            onnx.to_str().unwrap(),
        ],
        &so,
    );
    let pruned_at = report.find("pruned ffn").expect("pruning report");
    let quantized_at = report.find("quantized ").expect("quantization report");
    assert!(pruned_at < quantized_at, "pruning runs first:\n{report}");
    assert!(report.contains("artifact: "), "{report}");
    let g = load_verified(&onnx);
    let nbits: Vec<(usize, usize)> = g
        .nodes
        .node_weights()
        .filter_map(|n| match n.op {
            kiln_compiler::ir::Op::MatMulNBits { k, n, .. } => Some((k, n)),
            _ => None,
        })
        .collect();
    assert_eq!(nbits.len(), 210);
    assert_eq!(nbits.iter().filter(|&&kn| kn == (576, 1152)).count(), 60);
    assert_eq!(nbits.iter().filter(|&&kn| kn == (1152, 576)).count(), 30);
    let inputs = read_set(&m.join("test_data_set_0"), "input");
    let expected = interp::run(&g, &inputs).unwrap();
    close(
        "pruned int4 smollm2 artifact vs interpreter",
        &expected,
        &run_native(&so, &inputs, 2),
        1e-3,
        1e-3,
    );
}

#[test]
fn bad_pruning_settings_are_one_line_errors() {
    let tiny = repo_root().join("examples/tiny_llama/model.onnx");
    let tiny = tiny.to_str().unwrap();
    let minilm = model_dir("minilm_l6_v2").join("model.onnx");
    let cases: &[(&[&str], &str)] = &[
        (
            &["--prune", "ffn=1.5"],
            "--prune ffn=1.5: ffn: '1.5' is neither a fraction in [0, 1) nor a whole number of units",
        ),
        (
            &["--prune", "fnn=0.25"],
            "unknown structure 'fnn'; did you mean 'ffn'?",
        ),
        (
            &["--prune", "ffn=0.25", "--criterion", "activation"],
            "criterion activation needs calibration data",
        ),
        (
            &["--criterion", "magnitude"],
            "--criterion, --norm, --keep and --multiple need --prune SPEC",
        ),
        (
            &["--prune", "heads=2"],
            "heads model.layers.0.self_attn: heads asks to remove 2 of its 2 KV heads",
        ),
    ];
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.so");
    for (args, want) in cases {
        let mut all = vec!["compile", tiny, "--target", "x86_64"];
        all.extend_from_slice(args);
        all.extend(["-o", out.to_str().unwrap()]);
        let r = kiln(&all);
        assert_eq!(r.code, Some(1), "{args:?}: {}", r.stdout);
        let lines: Vec<&str> = r.stderr.lines().collect();
        assert_eq!(lines.len(), 1, "{args:?}: {}", r.stderr);
        assert!(lines[0].contains(want), "{args:?}: {}", r.stderr);
        assert!(!out.exists());
    }
    let r = kiln(&[
        "compile",
        minilm.to_str().unwrap(),
        "--target",
        "x86_64",
        "--prune",
        "heads=12",
        "-o",
        out.to_str().unwrap(),
    ]);
    assert_eq!(r.code, Some(1));
    assert!(
        r.stderr.contains("asks to remove 12 of its 12 heads"),
        "{}",
        r.stderr
    );

    // An already quantized model: nothing is pruned and every quantized layer says why.
    let q = dir.path().join("q.onnx");
    let r = kiln(&[
        "compile",
        tiny,
        "--target",
        "x86_64",
        "--quantize",
        "q4",
        "--group-size",
        "32",
        "--emit-onnx",
        q.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    let report = compile(&q, &["--prune", "ffn=0.25"], &out);
    let skipped = skipped_lines(&report);
    assert_eq!(
        skipped
            .iter()
            .filter(|l| l.contains("already quantized (prune before quantizing)"))
            .count(),
        14,
        "{report}"
    );
    assert!(report.contains("0 pruned"), "{report}");
}

/// `kiln inspect` prints the parameter count of an ONNX file and of an artifact: pruning a
/// quarter of tiny Llama's FFN neurons (2 layers, 352 -> 264, hidden 128) removes
/// 2 * 88 * 128 * 3 of them, whether the weights are then stored in f32 or INT4 (an INT4
/// weight counts as one parameter).
#[test]
fn inspect_counts_parameters_of_models_and_artifacts() {
    let model = repo_root().join("examples/tiny_llama/model.onnx");
    let count = |path: &Path| -> u64 {
        let r = kiln(&["inspect", path.to_str().unwrap()]);
        assert_eq!(r.code, Some(0), "{}", r.stderr);
        let line = r
            .stdout
            .lines()
            .find(|l| l.starts_with("parameters: "))
            .unwrap_or_else(|| panic!("no parameter line: {}", r.stdout));
        line["parameters: ".len()..]
            .split_whitespace()
            .next()
            .unwrap()
            .replace(',', "")
            .parse()
            .unwrap()
    };
    let dir = tempfile::tempdir().unwrap();
    let artifact_count = |args: &[&str]| {
        let so = dir.path().join("p.so");
        compile(&model, args, &so);
        count(&so)
    };
    let q4 = ["--quantize", "q4", "--group-size", "32"];
    // INT4 keeps the tied table once: the artifact counts what the ONNX file counts.
    assert_eq!(artifact_count(&q4), count(&model));
    let pruned_q4 = artifact_count(&["--prune", "ffn=0.25", q4[0], q4[1], q4[2], q4[3]]);
    assert_eq!(count(&model) - pruned_q4, 2 * 88 * 128 * 3);
    // f32 stores the head's transposed table besides the embedding; the difference holds.
    let f32_full = artifact_count(&[]);
    assert_eq!(
        f32_full - artifact_count(&["--prune", "ffn=0.25"]),
        2 * 88 * 128 * 3
    );
    let r = kiln(&["inspect", repo_root().join("README.md").to_str().unwrap()]);
    assert_eq!(r.code, Some(1));
}

/// The last line of `kiln eval SO --perplexity TOKENS --window 128 --windows N`.
fn perplexity(so: &Path, windows: usize) -> f64 {
    let tokens = repo_root().join("tests/data/lee_background.smollm2.i32");
    let n = windows.to_string();
    let r = kiln(&[
        "eval",
        so.to_str().unwrap(),
        "--perplexity",
        tokens.to_str().unwrap(),
        "--window",
        "128",
        "--windows",
        &n,
        "--threads",
        "2",
    ]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    let last = r.stdout.lines().last().unwrap_or_default();
    last.strip_prefix("perplexity: ")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("bad last line: {last}"))
}

/// Activation-aware pruning (row norms of the down projection times the calibration norms
/// of the neurons that meet them) keeps a SmolLM2 with a quarter of its FFN neurons far more
/// usable than weight magnitude alone. Calibration windows come from the end of the token file,
/// the evaluated ones from its start.
#[test]
fn activation_aware_ffn_pruning_beats_magnitude_on_smollm2_perplexity() {
    let m = model_dir("smollm2_135m_seq128").join("model.onnx");
    let tokens = repo_root().join("tests/data/lee_background.smollm2.i32");
    let dir = tempfile::tempdir().unwrap();
    let mag = dir.path().join("mag.so");
    compile(&m, &["--prune", "ffn=0.25"], &mag);
    let ppl_mag = perplexity(&mag, 3);
    let act = dir.path().join("act.so");
    let report = compile(
        &m,
        &[
            "--prune",
            "ffn=0.25",
            "--criterion",
            "activation",
            "--calibration",
            tokens.to_str().unwrap(),
            "--calibration-samples",
            "8",
        ],
        &act,
    );
    assert!(report.contains("calibration: 8 samples"), "{report}");
    let ppl_act = perplexity(&act, 3);
    eprintln!(
        "SmolLM2 ffn=0.25 perplexity on 3 windows: magnitude {ppl_mag:.1}, activation {ppl_act:.1}"
    );
    assert!(
        ppl_act < ppl_mag,
        "activation {ppl_act} vs magnitude {ppl_mag}"
    );
}

/// A YAML `pruning` section: per-structure amounts by glob override the per-kind ones, the
/// keep list protects, and the order `pipeline: [pruning, quantization]` is accepted.
#[test]
fn yaml_pruning_section_with_layer_globs_and_keep_list() {
    let dir = tempfile::tempdir().unwrap();
    let model = repo_root().join("examples/tiny_llama/model.onnx");
    let cfg = dir.path().join("prune.yaml");
    std::fs::write(
        &cfg,
        format!(
            "model_compilation:\n  model: {}\n  target_device: x86_64\n\
             pipeline: [pruning, quantization]\n\
             pruning:\n  ratios: {{ffn: 0.25, heads: 1}}\n  layers:\n    \"*layers.0.mlp\": 0.5\n  \
             keep: [\"*layers.1.self_attn*\"]\n  norm: l1\n\
             quantization:\n  mode: q4\n  group_size: 32\n\
             output:\n  artifact: {}\n",
            model.display(),
            dir.path().join("p.so").display()
        ),
    )
    .unwrap();
    let r = kiln(&["compile", "--config", cfg.to_str().unwrap()]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    let out = &r.stdout;
    assert!(out.contains("criterion: magnitude (L1)"), "{out}");
    assert!(
        out.contains("pruned ffn model.layers.0.mlp: 352 -> 176 neurons"),
        "{out}"
    );
    assert!(
        out.contains("pruned ffn model.layers.1.mlp: 352 -> 264 neurons"),
        "{out}"
    );
    assert!(
        out.contains("pruned heads model.layers.0.self_attn: 2 -> 1 KV heads"),
        "{out}"
    );
    assert!(
        out.contains("left model.layers.1.self_attn: kept by glob '*layers.1.self_attn*'"),
        "{out}"
    );
    assert!(dir.path().join("p.so").is_file());
}

/// Grouped-query attention (tiny Llama: 4 query heads sharing 2 KV heads): pruning one KV head
/// takes its two query heads with it, and the artifact matches the interpreter on the pruned
/// graph.
#[test]
fn gqa_head_pruning_removes_a_kv_head_with_its_query_heads() {
    let m = repo_root().join("examples/tiny_llama");
    let dir = tempfile::tempdir().unwrap();
    let (onnx, so) = (dir.path().join("p.onnx"), dir.path().join("p.so"));
    let report = compile(
        &m.join("model.onnx"),
        &["--prune", "heads=1", "--emit-onnx", onnx.to_str().unwrap()],
        &so,
    );
    assert_eq!(
        report
            .matches("2 -> 1 KV heads (4 -> 2 query heads) (width 128 -> 64)")
            .count(),
        2,
        "{report}"
    );
    let g = load_verified(&onnx);
    let inputs = read_set(&m.join("test_data_set_0"), "input");
    let expected = interp::run(&g, &inputs).unwrap();
    close(
        "tiny llama heads=1 artifact vs interpreter",
        &expected,
        &run_native(&so, &inputs, 1),
        1e-3,
        1e-4,
    );
}
