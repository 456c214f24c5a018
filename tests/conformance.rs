//! Conformance in CI: the ONNX backend node tests from the onnx==1.22.0 wheel run through
//! `kiln conformance` on the interpreter and on the host backend (compiled for x86_64 and
//! run); every test in the backend's checked-in pass list must still pass, and every failure or
//! skip must carry a reason.

mod common;

use common::*;
use std::collections::HashMap;

#[test]
fn onnx_node_tests_do_not_regress_on_the_interpreter() {
    check_backend("interp", "tests/conformance/onnx_node_passing.txt");
}

#[test]
fn onnx_node_tests_do_not_regress_on_the_host_backend() {
    check_backend("host", "tests/conformance/onnx_node_passing_host.txt");
}

fn check_backend(backend: &str, pass_list: &str) {
    let node_dir = onnx_node_tests();
    let list = tempfile::NamedTempFile::new().unwrap();
    let r = kiln(&[
        "conformance",
        &node_dir.display().to_string(),
        "--backend",
        backend,
        "--list-file",
        &list.path().display().to_string(),
        "--allow-failures",
    ]);
    assert_eq!(r.code, Some(0), "stderr: {}", r.stderr);
    let summary = r.stdout.lines().last().unwrap_or_default().to_string();
    eprintln!("kiln conformance --backend {backend}: {summary}");
    let results: HashMap<String, (String, String)> = std::fs::read_to_string(list.path())
        .unwrap()
        .lines()
        .map(|l| {
            let mut it = l.splitn(3, ' ');
            let name = it.next().unwrap_or_default().to_string();
            let status = it.next().unwrap_or_default().to_string();
            let reason = it.next().unwrap_or_default().to_string();
            (name, (status, reason))
        })
        .collect();
    assert_eq!(
        results.len(),
        1765,
        "the onnx==1.22.0 wheel ships 1765 node tests"
    );
    for (name, (status, reason)) in &results {
        assert!(
            status == "passed" || !reason.trim().is_empty(),
            "{name} is {status} without a reason"
        );
    }
    let expected = std::fs::read_to_string(repo_root().join(pass_list)).unwrap();
    let mut regressions = Vec::new();
    let mut listed = 0;
    for name in expected
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
    {
        listed += 1;
        match results.get(name) {
            Some((s, _)) if s == "passed" => {}
            Some((s, reason)) => regressions.push(format!("{name}: {s} {reason}")),
            None => regressions.push(format!("{name}: not found")),
        }
    }
    assert!(
        regressions.is_empty(),
        "{} listed tests regressed:\n{}",
        regressions.len(),
        regressions.join("\n")
    );
    let passed = results.values().filter(|(s, _)| s == "passed").count();
    assert!(passed >= listed);
    if passed > listed {
        eprintln!(
            "{} tests pass that are not listed yet: run scripts/update-conformance-list",
            passed - listed
        );
    }
    let expect_summary = format!(
        "{} passed, {} failed, {} skipped",
        passed,
        results.values().filter(|(s, _)| s == "failed").count(),
        results.values().filter(|(s, _)| s == "skipped").count()
    );
    assert_eq!(summary, expect_summary);
}
