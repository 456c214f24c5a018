//! The reference interpreter on the real models of the test pack: every stored output is
//! reproduced within rtol 1e-3 / atol 1e-4, through the library and through `kiln run`.

mod common;

use common::*;
use kiln_compiler::onnx::load_model;
use kiln_compiler::{compare, interp};

const RTOL: f64 = 1e-3;
const ATOL: f64 = 1e-4;

fn check_model(name: &str) {
    let dir = model_dir(name);
    let model = load_model(&dir.join("model.onnx")).unwrap();
    kiln_compiler::ir::verify::verify(&model.graph).unwrap();
    let set = dir.join("test_data_set_0");
    let inputs = read_set(&set, "input");
    let expected = read_set(&set, "output");
    let outputs = interp::run(&model.graph, &inputs).unwrap();
    assert_eq!(outputs.len(), expected.len(), "{name}: output count");
    for (k, (e, a)) in expected.iter().zip(&outputs).enumerate() {
        let d = compare::allclose(e, a, RTOL, ATOL)
            .unwrap_or_else(|r| panic!("{name} output {k}: {r}"));
        eprintln!("{name} output {k}: max abs diff {:.3e}", d.max_abs);
    }
    // Static shape inference types every value and folds the shape subgraphs; the folded
    // graph verifies and computes the same outputs.
    let mut g = model.graph.clone();
    kiln_compiler::shape::bind_dims(&mut g, &Default::default()).unwrap();
    kiln_compiler::shape::infer(&mut g).unwrap();
    kiln_compiler::ir::verify::verify(&g).unwrap();
    assert!(g
        .values
        .iter()
        .all(|v| !matches!(v.def, kiln_compiler::ir::ValueDef::Node(..))
            || v.ty.static_shape().is_some()));
    assert!(
        g.node_count() < model.graph.node_count(),
        "{name}: nothing was folded"
    );
    let folded = interp::run(&g, &inputs).unwrap();
    for (k, (e, a)) in expected.iter().zip(&folded).enumerate() {
        compare::allclose(e, a, RTOL, ATOL)
            .unwrap_or_else(|r| panic!("{name} output {k} after shape inference: {r}"));
    }
}

#[test]
fn tiny_llama_matches_reference() {
    check_model("tiny_llama");
}

#[test]
fn tiny_gpt2_matches_reference() {
    check_model("tiny_gpt2");
}

#[test]
fn minilm_matches_reference() {
    check_model("minilm_l6_v2");
}

#[test]
fn smollm2_matches_reference() {
    check_model("smollm2_135m");
}

/// The 128-token export has no stored logits (25 MB); reference.json holds checks instead.
#[test]
fn smollm2_seq128_matches_reference_checks() {
    let dir = model_dir("smollm2_135m_seq128");
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap())
            .unwrap();
    let checks = &reference["test_input"];
    let model = load_model(&dir.join("model.onnx")).unwrap();
    let inputs = read_set(&dir.join("test_data_set_0"), "input");
    let logits = interp::run(&model.graph, &inputs).unwrap().remove(0);
    assert_eq!(logits.shape, vec![1, 128, 49152]);
    let v = logits.as_slice::<f32>().unwrap();
    let vocab = 49152;
    let ids = inputs[0].to_i64_vec();
    // Argmax per position: allow a position to differ only where the top two logits are
    // within the tolerance of each other.
    let want: Vec<u64> = checks["argmax_per_position"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect();
    for (t, &w) in want.iter().enumerate() {
        let row = &v[t * vocab..(t + 1) * vocab];
        let got = (0..vocab)
            .max_by(|&a, &b| row[a].total_cmp(&row[b]))
            .unwrap();
        if got as u64 != w {
            let gap = (row[got] - row[w as usize]).abs();
            assert!(
                gap < 1e-3,
                "position {t}: argmax {got}, reference {w}, logit gap {gap}"
            );
        }
    }
    let top = &checks["last_position_top10"];
    let last = &v[127 * vocab..];
    for (id, want) in top["ids"]
        .as_array()
        .unwrap()
        .iter()
        .zip(top["logits"].as_array().unwrap())
    {
        let (id, want) = (id.as_u64().unwrap() as usize, want.as_f64().unwrap());
        let got = last[id] as f64;
        assert!(
            (got - want).abs() <= ATOL + RTOL * want.abs(),
            "last position logit {id}: {got} vs {want}"
        );
    }
    // NLL of window 0 (log-softmax in f64), as in the perplexity protocol.
    let mut nll = 0f64;
    for t in 0..127 {
        let row = &v[t * vocab..(t + 1) * vocab];
        let m = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
        let lse = m + row.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln();
        nll += lse - row[ids[t + 1] as usize] as f64;
    }
    let want_nll = checks["nll_sum"].as_f64().unwrap();
    assert!(
        (nll - want_nll).abs() < 0.05,
        "window 0 NLL {nll} vs reference {want_nll}"
    );
    let sum: f64 = v.iter().map(|&x| x as f64).sum();
    let want_sum = checks["logits_sum"].as_f64().unwrap();
    assert!(
        (sum - want_sum).abs() / want_sum.abs() < 1e-4,
        "logits sum {sum} vs {want_sum}"
    );
}

#[test]
fn kiln_run_writes_matching_outputs() {
    let dir = model_dir("minilm_l6_v2");
    let out = tempfile::tempdir().unwrap();
    let r = kiln(&[
        "run",
        &dir.join("model.onnx").display().to_string(),
        "--inputs-dir",
        &dir.join("test_data_set_0").display().to_string(),
        "--output-dir",
        &out.path().display().to_string(),
    ]);
    assert_eq!(r.code, Some(0), "stderr: {}", r.stderr);
    let expected = read_set(&dir.join("test_data_set_0"), "output");
    let got = read_set(out.path(), "output");
    assert_eq!(expected.len(), got.len());
    for (e, a) in expected.iter().zip(&got) {
        compare::allclose(e, a, RTOL, ATOL).unwrap();
    }
}

#[test]
fn inspect_reports_smollm2_parameters() {
    let dir = model_dir("smollm2_135m");
    let r = kiln(&["inspect", &dir.join("model.onnx").display().to_string()]);
    assert_eq!(r.code, Some(0), "stderr: {}", r.stderr);
    // 134,515,008 weights (external and inline) plus 2,330 small shape/constant values.
    assert!(
        r.stdout.contains("parameters: 134,517,338 (513.1 MiB)"),
        "{}",
        r.stdout
    );
    assert!(
        r.stdout
            .contains("f32        134,517,315 elements     538,069,260 bytes"),
        "{}",
        r.stdout
    );
    assert!(
        r.stdout.contains("MatMul                       271"),
        "{}",
        r.stdout
    );
    assert!(
        r.stdout.contains("unsupported operators: none"),
        "{}",
        r.stdout
    );
}

#[test]
fn inspect_lists_every_unsupported_operator() {
    let dir = tempfile::tempdir().unwrap();
    let m = model(
        vec![
            node("Frobnicate", "f1", &["x"], &["t"]),
            node("Unique", "u1", &["t"], &["t2"]),
            node("Unique", "u2", &["t2"], &["y"]),
        ],
        vec![value_info("x", 1, &[Ok(2), Ok(3)])],
        vec![value_info("y", 1, &[Ok(2), Ok(3)])],
        vec![],
    );
    let path = write_model(dir.path(), "model.onnx", &m);
    let r = kiln(&["inspect", &path.display().to_string()]);
    assert_eq!(r.code, Some(1));
    assert!(
        r.stdout.contains("unsupported operators (2):"),
        "{}",
        r.stdout
    );
    assert!(
        r.stdout.contains("ai.onnx::Frobnicate v18 (nodes: f1)"),
        "{}",
        r.stdout
    );
    assert!(
        r.stdout.contains("ai.onnx::Unique v18 (nodes: u1, u2)"),
        "{}",
        r.stdout
    );
}
