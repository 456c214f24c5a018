//! Conformance in CI: the ONNX backend node tests from the onnx==1.22.0 wheel run through
//! `kiln conformance --backend interp`; every test in tests/conformance/onnx_node_passing.txt
//! must still pass, and every failure or skip must carry a reason.

mod common;

use common::*;
use std::collections::HashMap;

#[test]
fn onnx_node_tests_do_not_regress() {
    let node_dir = onnx_node_tests();
    let list = tempfile::NamedTempFile::new().unwrap();
    let r = kiln(&[
        "conformance",
        &node_dir.display().to_string(),
        "--backend",
        "interp",
        "--list-file",
        &list.path().display().to_string(),
        "--allow-failures",
    ]);
    assert_eq!(r.code, Some(0), "stderr: {}", r.stderr);
    let summary = r.stdout.lines().last().unwrap_or_default().to_string();
    eprintln!("kiln conformance: {summary}");
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
    let expected =
        std::fs::read_to_string(repo_root().join("tests/conformance/onnx_node_passing.txt"))
            .unwrap();
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
