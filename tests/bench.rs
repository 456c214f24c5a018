//! `kiln bench` on the tiny Llama compiled for x86_64: the kiln latency line with generated
//! inputs and with the model's test inputs; side by side with onnxruntime (`--onnx`, which
//! needs onnxruntime in the test venv: scripts/setup-test-env installs it, and without it this
//! test fails with the install hint); and one-line errors when Python or onnxruntime is
//! missing. Only the lines' format and the order median >= min, p95 >= median are checked,
//! never how fast anything runs.

mod common;

use common::*;
use std::path::{Path, PathBuf};

/// Compiles the bundled tiny Llama for x86_64 into `dir`.
fn compile_tiny_llama(dir: &Path) -> PathBuf {
    let so = dir.join("tiny_llama.so");
    let model = repo_root().join("examples/tiny_llama/model.onnx");
    let r = kiln(&[
        "compile",
        model.to_str().unwrap(),
        "--target",
        "x86_64",
        "-o",
        so.to_str().unwrap(),
    ]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    so
}

/// `kiln bench SO --runs 3 --warmup 1 EXTRA...`.
fn bench_briefly(so: &Path, extra: &[&str]) -> Output {
    let so = so.display().to_string();
    let mut args = vec!["bench", so.as_str(), "--runs", "3", "--warmup", "1"];
    args.extend_from_slice(extra);
    kiln(&args)
}

/// The numbers of `PREFIX median A ms, p95 B ms, min C ms, T thread(s)...`.
fn parse_line(stdout: &str, prefix: &str) -> (f64, f64, f64, usize) {
    let line = stdout
        .lines()
        .find(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("no '{prefix}' line in:\n{stdout}"));
    let num = |key: &str| -> f64 {
        let rest = &line[line.find(key).unwrap_or_else(|| panic!("{key} in {line}")) + key.len()..];
        rest.split_whitespace().next().unwrap().parse().unwrap()
    };
    let (median, p95, min) = (num(" median "), num(" p95 "), num(" min "));
    assert!(median >= min && p95 >= median, "{line}");
    let threads = line
        .split(", ")
        .find(|p| p.ends_with(" threads") || p.ends_with(" thread"))
        .and_then(|p| p.split_whitespace().next())
        .unwrap_or_else(|| panic!("no thread count in {line}"))
        .parse()
        .unwrap();
    (median, p95, min, threads)
}

fn model_path() -> String {
    repo_root()
        .join("examples/tiny_llama/model.onnx")
        .display()
        .to_string()
}

#[test]
fn bench_prints_the_kiln_line() {
    let dir = tempfile::tempdir().unwrap();
    let so = compile_tiny_llama(dir.path());
    let r = bench_briefly(&so, &["--threads", "2"]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    let (_, _, _, threads) = parse_line(&r.stdout, "kiln: ");
    assert_eq!(threads, 2);
    let line = r.stdout.lines().find(|l| l.starts_with("kiln: ")).unwrap();
    assert!(
        line.contains(", peak RSS ") && line.ends_with(" MiB"),
        "{line}"
    );
    assert!(!r.stdout.contains("onnxruntime"), "{}", r.stdout);
}

/// `--memory`: the weight rate uses the artifact's weight bytes (as `kiln inspect` counts
/// them), and the memory line and the share of read bandwidth are printed.
#[test]
fn bench_memory_reports_weight_rate_against_bandwidth() {
    let dir = tempfile::tempdir().unwrap();
    let so = compile_tiny_llama(dir.path());
    let r = bench_briefly(&so, &["--memory"]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    let line = |prefix: &str| line_of(&r.stdout, prefix).to_string();
    let inspect = kiln(&["inspect", so.to_str().unwrap()]);
    let weights: String = line_of(&inspect.stdout, "weights: ")
        .split_whitespace()
        .nth(1)
        .unwrap()
        .chars()
        .filter(char::is_ascii_digit)
        .collect();
    let rate = line("kiln weights: ");
    assert!(
        rate.contains(&format!("({weights} weight bytes per run / median)")),
        "{rate}"
    );
    let memory = line("memory (256 MiB buffers");
    let gbs = |key: &str| -> f64 {
        let rest = &memory[memory.find(key).unwrap() + key.len()..];
        rest.split_whitespace().next().unwrap().parse().unwrap()
    };
    assert!(gbs("): copy ") > 0.0 && gbs(", read ") > 0.0, "{memory}");
    assert!(line("kiln weights / read bandwidth: ").ends_with('%'));
}

/// `--rounds 2`: both sides and the memory measurement run twice, alternating, and the
/// statistics cover both rounds.
#[test]
fn bench_rounds_alternate_kiln_onnxruntime_and_memory() {
    let dir = tempfile::tempdir().unwrap();
    let so = compile_tiny_llama(dir.path());
    let model = model_path();
    let r = kiln(&[
        "bench",
        so.to_str().unwrap(),
        "--runs",
        "2",
        "--warmup",
        "1",
        "--threads",
        "1",
        "--onnx",
        &model,
        "--memory",
        "--rounds",
        "2",
    ]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert!(
        line_of(&r.stdout, "bench ")
            .contains("2 runs after 1 warm-up in each of 2 alternating rounds"),
        "{}",
        r.stdout
    );
    assert!(
        line_of(&r.stdout, "memory (").contains("best of 10)"),
        "{}",
        r.stdout
    );
    line_of(&r.stdout, "ratio kiln/onnxruntime (median): ");
    line_of(&r.stdout, "onnxruntime weights: ");
}

fn line_of<'a>(text: &'a str, prefix: &str) -> &'a str {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("no '{prefix}' line in:\n{text}"))
}

#[test]
fn bench_reads_inputs_dir() {
    let dir = tempfile::tempdir().unwrap();
    let so = compile_tiny_llama(dir.path());
    let inputs = repo_root().join("examples/tiny_llama/test_data_set_0");
    let r = bench_briefly(&so, &["--inputs-dir", inputs.to_str().unwrap()]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    parse_line(&r.stdout, "kiln: ");
}

#[test]
fn bench_with_onnx_prints_onnxruntime_and_ratio() {
    let dir = tempfile::tempdir().unwrap();
    let so = compile_tiny_llama(dir.path());
    for inputs in [
        None,
        Some(repo_root().join("examples/tiny_llama/test_data_set_0")),
    ] {
        let model = model_path();
        let dir = inputs.as_ref().map(|d| d.display().to_string());
        let mut args = vec!["--threads", "1", "--onnx", model.as_str()];
        if let Some(d) = &dir {
            args.extend(["--inputs-dir", d.as_str()]);
        }
        let r = bench_briefly(&so, &args);
        assert_eq!(
            r.code,
            Some(0),
            "needs onnxruntime in the venv (scripts/setup-test-env): {}",
            r.stderr
        );
        assert_eq!(parse_line(&r.stdout, "kiln: ").3, 1);
        assert_eq!(parse_line(&r.stdout, "onnxruntime: ").3, 1);
        let ratio = r
            .stdout
            .lines()
            .find_map(|l| l.strip_prefix("ratio kiln/onnxruntime (median): "))
            .unwrap_or_else(|| panic!("no ratio line in:\n{}", r.stdout));
        let ratio: f64 = ratio.strip_suffix('x').unwrap().parse().unwrap();
        assert!(ratio.is_finite(), "{ratio}");
    }
}

#[test]
fn bench_onnx_without_onnxruntime_says_how_to_install_it() {
    let dir = tempfile::tempdir().unwrap();
    let so = compile_tiny_llama(dir.path());
    // The venv's interpreter without its site-packages: numpy, onnx, onnxruntime are missing.
    let venv_python = cache_dir().join("venv/bin/python");
    let wrapper = dir.path().join("python-without-packages");
    std::fs::write(
        &wrapper,
        format!("#!/bin/sh\nexec '{}' -S \"$@\"\n", venv_python.display()),
    )
    .unwrap();
    std::fs::set_permissions(
        &wrapper,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let r = kiln(&[
        "bench",
        so.to_str().unwrap(),
        "--runs",
        "2",
        "--onnx",
        &model_path(),
        "--python",
        wrapper.to_str().unwrap(),
    ]);
    assert_eq!(r.code, Some(1), "{}{}", r.stdout, r.stderr);
    assert_eq!(r.stderr.lines().count(), 1, "{}", r.stderr);
    assert!(
        r.stderr
            .starts_with("error: onnxruntime is not usable with "),
        "{}",
        r.stderr
    );
    assert!(
        r.stderr.contains("-m pip install onnxruntime=="),
        "{}",
        r.stderr
    );
    assert!(
        !r.stdout.contains("kiln: "),
        "nothing is timed before the check: {}",
        r.stdout
    );
}

#[test]
fn bench_errors_are_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let so = compile_tiny_llama(dir.path());
    let so = so.to_str().unwrap();
    let wrong_inputs = model_dir("minilm_l6_v2").join("test_data_set_0");
    let model = model_path();
    let other_model = model_dir("minilm_l6_v2").join("model.onnx");
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec![
                "bench",
                so,
                "--onnx",
                &model,
                "--python",
                "/nonexistent/python",
            ],
            "error: cannot run Python /nonexistent/python for onnxruntime",
        ),
        (
            vec!["bench", "/nonexistent/model.so"],
            "error: /nonexistent/model.so",
        ),
        (
            vec!["bench", so, "--onnx", other_model.to_str().unwrap()],
            "input 0 'input_ids' of the model is int64[2, 16], ",
        ),
        (
            vec!["bench", so, "--runs", "0"],
            "error: --runs must be at least 1",
        ),
        (
            vec!["bench", so, "--rounds", "0"],
            "error: --rounds must be at least 1",
        ),
        (
            vec!["bench", so, "--inputs-dir", wrong_inputs.to_str().unwrap()],
            "input 'input_ids' of the artifact is int64[1, 8], the file holds i64[2, 16]",
        ),
    ];
    for (args, want) in cases {
        let r = kiln(&args);
        assert_eq!(r.code, Some(1), "{args:?}: {}", r.stderr);
        assert_eq!(r.stderr.lines().count(), 1, "{args:?}: {}", r.stderr);
        assert!(
            r.stderr.starts_with("error: ") && r.stderr.contains(want),
            "{args:?}: {}",
            r.stderr
        );
    }
}
