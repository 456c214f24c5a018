//! Compiled artifacts against the reference interpreter: all five test-pack models compiled for
//! x86_64 and x86_64-v3 (AVX2, FMA; where the host has them) run natively through kiln-runtime, and for aarch64-neon / aarch64-neon-dotprod runs
//! under qemu-aarch64 through the C harness (runtime/c/kiln_run.c); all outputs must match the
//! interpreter within rtol 1e-3, atol 1e-4. Also: artifact structure (no NEEDED, 16 KiB LOAD
//! alignment), reproducible bytes, a plain-`cc` C program loading an artifact, and a dotprod
//! artifact refused on a CPU without dotprod.

mod common;

use common::*;
use kiln_compiler::onnx::{load_model, tensor_proto::read_tensor_file};
use kiln_compiler::{compare, interp, Tensor};
use std::path::Path;
use std::process::Command;

const RTOL: f64 = 1e-3;
const ATOL: f64 = 1e-4;

/// Reference outputs of the interpreter on the model's test inputs.
fn reference(model: &str) -> (Vec<Tensor>, Vec<Tensor>) {
    let dir = model_dir(model);
    let m = load_model(&dir.join("model.onnx")).unwrap();
    let inputs = read_set(&dir.join("test_data_set_0"), "input");
    let outputs = interp::run(&m.graph, &inputs).unwrap();
    (inputs, outputs)
}

fn compile(model: &str, target: &str, out: &Path) {
    let r = kiln(&[
        "compile",
        &model_dir(model).join("model.onnx").display().to_string(),
        "--target",
        target,
        "-o",
        &out.display().to_string(),
    ]);
    assert_eq!(
        r.code,
        Some(0),
        "compile {model} for {target}: {}",
        r.stderr
    );
}

fn check_outputs(what: &str, expected: &[Tensor], got: &[Tensor]) {
    assert_eq!(expected.len(), got.len(), "{what}: output count");
    for (k, (e, a)) in expected.iter().zip(got).enumerate() {
        let d = compare::allclose(e, a, RTOL, ATOL)
            .unwrap_or_else(|r| panic!("{what} output {k}: {r}"));
        eprintln!("{what} output {k}: max abs diff {:.2e}", d.max_abs);
    }
}

fn check_x86(model: &str) {
    let (inputs, expected) = reference(model);
    let dir = tempfile::tempdir().unwrap();
    for target in ["x86_64", "x86_64-v3"] {
        let so = dir.path().join(format!("{model}-{target}.so"));
        compile(model, target, &so);
        if kiln_runtime::cpu::check_compatible(target, &[]).is_err() {
            // Without AVX2/FMA the runtime must refuse the artifact instead of crashing.
            let err = kiln_runtime::Model::load(&so).expect_err("v3 artifact refused");
            assert!(err.to_string().contains("lacks"), "{err}");
            continue;
        }
        for threads in [1, 2] {
            check_outputs(
                &format!("{model} {target} ({threads} threads)"),
                &expected,
                &run_native(&so, &inputs, threads),
            );
        }
    }
}

#[test]
fn x86_64_tiny_llama() {
    check_x86("tiny_llama");
}

#[test]
fn x86_64_tiny_gpt2() {
    check_x86("tiny_gpt2");
}

#[test]
fn x86_64_minilm() {
    check_x86("minilm_l6_v2");
}

#[test]
fn x86_64_smollm2() {
    check_x86("smollm2_135m");
}

#[test]
fn x86_64_smollm2_seq128() {
    check_x86("smollm2_135m_seq128");
}

// ---- aarch64 under qemu

fn check_aarch64(model: &str) {
    let (inputs, expected) = reference(model);
    let dir = tempfile::tempdir().unwrap();
    for (target, cpu) in [
        ("aarch64-neon", "cortex-a72"),
        ("aarch64-neon-dotprod", "max"),
    ] {
        let so = dir.path().join(format!("{model}_{target}.so"));
        compile(model, target, &so);
        let r = run_qemu(&so, cpu, &inputs, expected.len());
        assert_eq!(
            r.code,
            Some(0),
            "{model} {target} under qemu -cpu {cpu}: {}",
            r.stderr
        );
        let got: Vec<Tensor> = expected
            .iter()
            .zip(&r.outputs)
            .map(|(e, b)| Tensor::from_le_bytes(e.dtype(), e.shape.clone(), b).unwrap())
            .collect();
        check_outputs(
            &format!("{model} {target} (qemu -cpu {cpu})"),
            &expected,
            &got,
        );
    }
}

#[test]
fn aarch64_tiny_llama() {
    check_aarch64("tiny_llama");
}

#[test]
fn aarch64_tiny_gpt2() {
    check_aarch64("tiny_gpt2");
}

#[test]
fn aarch64_minilm() {
    check_aarch64("minilm_l6_v2");
}

#[test]
fn aarch64_smollm2() {
    check_aarch64("smollm2_135m");
}

#[test]
fn aarch64_smollm2_seq128() {
    check_aarch64("smollm2_135m_seq128");
}

#[test]
fn dotprod_artifact_is_refused_without_dotprod() {
    let (inputs, expected) = reference("tiny_llama");
    let dir = tempfile::tempdir().unwrap();
    let so = dir.path().join("dotprod.so");
    compile("tiny_llama", "aarch64-neon-dotprod", &so);
    let r = run_qemu(&so, "cortex-a72", &inputs, expected.len());
    assert_eq!(r.code, Some(2), "stderr: {}", r.stderr);
    assert!(r.stderr.contains("dotprod"), "{}", r.stderr);
    assert!(!r.stderr.contains("Illegal instruction"), "{}", r.stderr);
}

// ---- artifact properties

fn readelf(args: &[&str], so: &Path) -> String {
    let out = Command::new("readelf")
        .args(args)
        .arg(so)
        .output()
        .expect("readelf (binutils) is installed");
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn artifacts_are_self_contained_aligned_and_reproducible() {
    let dir = tempfile::tempdir().unwrap();
    for target in ["x86_64", "aarch64-neon", "aarch64-neon-dotprod"] {
        let so = dir.path().join("model.so");
        compile("tiny_gpt2", target, &so);
        let first = std::fs::read(&so).unwrap();
        let dynamic = readelf(&["-dW"], &so);
        assert!(!dynamic.contains("NEEDED"), "{target}: {dynamic}");
        assert!(
            dynamic.contains("Library soname: [libmodel.so]"),
            "{target}: {dynamic}"
        );
        let segs = readelf(&["-lW"], &so);
        let loads: Vec<&str> = segs
            .lines()
            .filter(|l| l.trim_start().starts_with("LOAD"))
            .collect();
        assert!(loads.len() >= 3, "{target}: {segs}");
        for l in &loads {
            let align = u64::from_str_radix(
                l.split_whitespace()
                    .last()
                    .unwrap()
                    .trim_start_matches("0x"),
                16,
            )
            .unwrap();
            assert!(
                align >= 0x4000,
                "{target}: LOAD alignment {align:#x} below 16 KiB: {l}"
            );
        }
        let syms = readelf(&["--dyn-syms", "-W"], &so);
        for name in [
            "kiln_run",
            "kiln_abi_version",
            "kiln_input_info",
            "kiln_workspace_size",
        ] {
            assert!(syms.contains(name), "{target}: {name} not exported");
        }
        assert!(
            !syms.contains(" UND ")
                || syms
                    .lines()
                    .filter(|l| l.contains(" UND "))
                    .all(|l| l.split_whitespace().count() < 8),
            "{target}: undefined symbols: {syms}"
        );
        compile("tiny_gpt2", target, &so);
        assert_eq!(
            std::fs::read(&so).unwrap(),
            first,
            "{target}: two compilations differ"
        );
    }
}

#[test]
fn plain_c_program_loads_and_runs_an_artifact() {
    let (inputs, expected) = reference("tiny_llama");
    let dir = tempfile::tempdir().unwrap();
    let so = dir.path().join("tiny.so");
    compile("tiny_llama", "x86_64", &so);
    let exe = dir.path().join("kiln_run");
    let st = Command::new("cc")
        .args(["-O2", "-std=c99", "-Wall", "-I"])
        .arg(repo_root().join("runtime/include"))
        .arg(repo_root().join("runtime/c/kiln_run.c"))
        .arg("-o")
        .arg(&exe)
        .args(["-ldl", "-lpthread"])
        .status()
        .unwrap();
    assert!(st.success());
    let (ind, outd) = (dir.path().join("in"), dir.path().join("out"));
    std::fs::create_dir_all(&ind).unwrap();
    std::fs::create_dir_all(&outd).unwrap();
    std::fs::write(ind.join("input_0.bin"), inputs[0].to_le_bytes()).unwrap();
    let out = Command::new(&exe)
        .arg(&so)
        .arg(&ind)
        .arg(&outd)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got = Tensor::from_le_bytes(
        expected[0].dtype(),
        expected[0].shape.clone(),
        &std::fs::read(outd.join("output_0.bin")).unwrap(),
    )
    .unwrap();
    check_outputs("C harness x86_64", &expected, &[got]);
}

#[test]
fn kiln_run_executes_an_artifact() {
    let dir = tempfile::tempdir().unwrap();
    let so = dir.path().join("gpt2.so");
    compile("tiny_gpt2", "x86_64", &so);
    let data = model_dir("tiny_gpt2").join("test_data_set_0");
    let out = dir.path().join("out");
    let r = kiln(&[
        "run",
        &so.display().to_string(),
        "--inputs-dir",
        &data.display().to_string(),
        "--output-dir",
        &out.display().to_string(),
    ]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    let e = read_tensor_file(&data.join("output_0.pb")).unwrap().1;
    let a = read_tensor_file(&out.join("output_0.pb")).unwrap().1;
    compare::allclose(&e, &a, RTOL, ATOL).unwrap();
}

#[test]
fn targets_lists_every_target_and_which_have_a_code_generator() {
    let r = kiln(&["targets"]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    for t in kiln_targets::TARGETS {
        assert!(
            r.stdout
                .lines()
                .any(|l| l.starts_with(&format!("{} ", t.name))),
            "{} missing:\n{}",
            t.name,
            r.stdout
        );
    }
    let footer = r.stdout.lines().last().unwrap_or_default();
    assert!(
        footer.starts_with(
            "(code generators today: x86_64, x86_64-v3, x86_64-v3-vnni, aarch64-neon, aarch64-neon-dotprod;"
        ),
        "{footer}"
    );
}

/// Matrix products against constant weights at the edges of their tilings, on every x86-64
/// target the host runs, against the interpreter: tiles of 6 rows (AVX2 microkernel) and 4
/// rows (Cranelift) with rows left over, one row, panels of 16 and 8 columns with a narrower
/// last panel, reductions shorter than, equal to and longer than a summation block with a
/// tail, and Gemm's alpha, beta and bias applied after the tiles.
#[test]
fn products_at_tiling_edges_match_the_interpreter() {
    struct Case {
        m: i64,
        k: i64,
        n: i64,
        /// Gemm (alpha, beta) with a bias over columns; `None`: MatMul.
        gemm: Option<(f32, f32)>,
    }
    let cases = [
        Case {
            m: 7,
            k: 130,
            n: 40,
            gemm: None,
        },
        Case {
            m: 1,
            k: 64,
            n: 16,
            gemm: None,
        },
        Case {
            m: 13,
            k: 20,
            n: 36,
            gemm: Some((0.5, 2.0)),
        },
        Case {
            m: 6,
            k: 200,
            n: 52,
            gemm: Some((1.0, 1.0)),
        },
        Case {
            m: 5,
            k: 9,
            n: 4,
            gemm: None,
        },
    ];
    let values = |seed: u32, n: i64| -> Vec<u8> {
        (0..n as u32)
            .flat_map(|i| {
                let h = (i.wrapping_mul(2654435761).wrapping_add(seed * 97)) % 1000;
                (h as f32 / 500.0 - 1.0).to_le_bytes()
            })
            .collect()
    };
    let dir = tempfile::tempdir().unwrap();
    for (ci, c) in cases.iter().enumerate() {
        let mut inits = vec![f32_initializer("w", &[c.k, c.n], values(1, c.k * c.n))];
        let product = match c.gemm {
            Some((alpha, beta)) => {
                inits.push(f32_initializer("bias", &[c.n], values(2, c.n)));
                let mut g = node("Gemm", "gemm", &["x", "w", "bias"], &["y"]);
                for (name, v) in [("alpha", alpha), ("beta", beta)] {
                    g.attribute.push(kiln_compiler::proto::AttributeProto {
                        name: Some(name.into()),
                        r#type: Some(1),
                        f: Some(v),
                        ..Default::default()
                    });
                }
                g
            }
            None => node("MatMul", "matmul", &["x", "w"], &["y"]),
        };
        let m = model(
            vec![product],
            vec![value_info("x", 1, &[Ok(c.m), Ok(c.k)])],
            vec![value_info("y", 1, &[Ok(c.m), Ok(c.n)])],
            inits,
        );
        let path = write_model(dir.path(), &format!("p{ci}.onnx"), &m);
        let graph = load_model(&path).unwrap().graph;
        let x = Tensor::from_le_bytes(
            kiln_compiler::DType::F32,
            vec![c.m as usize, c.k as usize],
            &values(3, c.m * c.k),
        )
        .unwrap();
        let inputs = vec![x];
        let expected = interp::run(&graph, &inputs).unwrap();
        for target in ["x86_64", "x86_64-v3", "x86_64-v3-vnni"] {
            let so = dir.path().join(format!("p{ci}-{target}.so"));
            let r = kiln(&[
                "compile",
                &path.display().to_string(),
                "--target",
                target,
                "-o",
                &so.display().to_string(),
            ]);
            assert_eq!(r.code, Some(0), "case {ci} {target}: {}", r.stderr);
            if kiln_runtime::cpu::check_compatible(target, &[]).is_err() {
                continue;
            }
            for threads in [1, 2] {
                check_outputs(
                    &format!(
                        "case {ci} ({}x{}x{}) {target} ({threads} threads)",
                        c.m, c.k, c.n
                    ),
                    &expected,
                    &run_native(&so, &inputs, threads),
                );
            }
        }
    }
}
