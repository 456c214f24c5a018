//! Model::load and Session::run against fixture artifacts written in C (see common/mod.rs):
//! tensor infos, sums with 1 and more threads, buffer checks, kernel status messages, and
//! the refusals (ABI version, target, CPU features, missing symbols, bad infos).

mod common;

use common::*;
use kiln_runtime::{LoadError, Model, RunError, Session, TensorInfo};

#[test]
fn loads_fixture_and_reads_infos() {
    let dir = tempfile::tempdir().expect("tempdir");
    let so = Fixture::host().build(dir.path(), "fixture");
    let model = Model::load(&so).expect("load fixture");
    let (target, features) = host_target();
    assert_eq!(model.target(), target);
    assert_eq!(model.required_features(), [features.to_string()]);
    assert_eq!(model.workspace_size(), FIXTURE_WORKSPACE);
    let f32x23 = |name: &str| TensorInfo {
        name: name.into(),
        dtype: 1,
        dims: vec![2, 3],
    };
    assert_eq!(model.inputs(), [f32x23("a"), f32x23("b")]);
    assert_eq!(model.outputs(), [f32x23("sum")]);
    assert_eq!(model.input_sizes(), [24, 24]);
    assert_eq!(model.output_sizes(), [24]);
    assert_eq!(model.path(), so.as_path());
}

#[test]
fn runs_with_one_and_more_threads() {
    let dir = tempfile::tempdir().expect("tempdir");
    // (rows, threads): the brief's [2, 3] model on 1 and 2 threads, and a taller one with
    // more tasks than threads, on more threads than cores, and with 0 (= all cores).
    let cases: &[(usize, usize)] = &[(2, 1), (2, 2), (37, 1), (37, 2), (37, 3), (37, 0)];
    for &(rows, threads) in cases {
        let fixture = Fixture {
            rows,
            ..Fixture::host()
        };
        let so = fixture.build(dir.path(), &format!("rows{rows}"));
        let model = Model::load(&so).expect("load");
        let mut session = Session::new(&model, threads).expect("session");
        assert!(session.threads() >= 1);
        let (a, b, want) = sample(rows);
        let (a, b) = (f32_bytes(&a), f32_bytes(&b));
        // Several runs on one session: the workspace and pool are reused.
        for run in 0..3 {
            let mut sum = vec![0u8; rows * 12];
            session.run(&[&a, &b], &mut [&mut sum]).expect("run");
            assert_eq!(
                f32_values(&sum),
                want,
                "rows {rows}, threads {threads}, run {run}"
            );
        }
    }
}

#[test]
fn sessions_share_one_model_across_threads() {
    let dir = tempfile::tempdir().expect("tempdir");
    let so = Fixture {
        rows: 64,
        ..Fixture::host()
    }
    .build(dir.path(), "shared");
    let model = Model::load(&so).expect("load");
    let (a, b, want) = sample(64);
    let (a, b) = (f32_bytes(&a), f32_bytes(&b));
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| {
                let mut session = Session::new(&model, 2).expect("session");
                for _ in 0..50 {
                    let mut sum = vec![0u8; 64 * 12];
                    session.run(&[&a, &b], &mut [&mut sum]).expect("run");
                    assert_eq!(f32_values(&sum), want);
                }
            });
        }
    });
}

#[test]
fn refuses_wrong_buffers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let so = Fixture::host().build(dir.path(), "fixture");
    let model = Model::load(&so).expect("load");
    let mut session = Session::new(&model, 2).expect("session");
    let ok = vec![0u8; 24];
    // (input sizes, output sizes, expected message)
    let cases: &[(&[usize], &[usize], &str)] = &[
        (&[24], &[24], "the model takes 2 input buffer(s), got 1"),
        (
            &[24, 24, 24],
            &[24],
            "the model takes 2 input buffer(s), got 3",
        ),
        (&[24, 24], &[], "the model takes 1 output buffer(s), got 0"),
        (
            &[24, 24],
            &[24, 24],
            "the model takes 1 output buffer(s), got 2",
        ),
        (
            &[24, 20],
            &[24],
            "input 1 (b: float32 [2, 3]) needs a buffer of 24 bytes, got 20",
        ),
        (
            &[28, 24],
            &[24],
            "input 0 (a: float32 [2, 3]) needs a buffer of 24 bytes, got 28",
        ),
        (
            &[24, 24],
            &[0],
            "output 0 (sum: float32 [2, 3]) needs a buffer of 24 bytes, got 0",
        ),
    ];
    for (ins, outs, want) in cases {
        let inputs: Vec<Vec<u8>> = ins.iter().map(|&n| vec![0u8; n]).collect();
        let mut outputs: Vec<Vec<u8>> = outs.iter().map(|&n| vec![0u8; n]).collect();
        let input_refs: Vec<&[u8]> = inputs.iter().map(Vec::as_slice).collect();
        let mut output_refs: Vec<&mut [u8]> = outputs.iter_mut().map(Vec::as_mut_slice).collect();
        let err = session.run(&input_refs, &mut output_refs).expect_err(want);
        assert_eq!(err.to_string(), *want);
    }
    // The session still works after refusals.
    let mut sum = vec![0u8; 24];
    session.run(&[&ok, &ok], &mut [&mut sum]).expect("run");
}

#[test]
fn kernel_status_carries_error_string() {
    let dir = tempfile::tempdir().expect("tempdir");
    let so = Fixture::host().build(dir.path(), "fixture");
    let model = Model::load(&so).expect("load");
    let mut session = Session::new(&model, 1).expect("session");
    let a = f32_bytes(&[f32::NAN; 6]);
    let b = vec![0u8; 24];
    let mut sum = vec![0u8; 24];
    let err = session
        .run(&[&a, &b], &mut [&mut sum])
        .expect_err("NaN input must fail");
    assert!(
        matches!(
            err,
            RunError::Kernel {
                code: NAN_STATUS,
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        format!("kiln_run failed with status {NAN_STATUS}: {NAN_MESSAGE}")
    );
}

/// Fixtures that must be refused at load time, each with the phrases its error must contain.
#[test]
fn refuses_artifacts_that_cannot_run_here() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (host_target, host_feature) = host_target();
    let missing_feature = format!("{host_feature},{}", foreign_feature());
    let cases: Vec<(&str, Fixture, Vec<String>)> = vec![
        (
            "abi999",
            Fixture::host_with(|f| f.abi_version = 999),
            vec![
                "has ABI version 999".into(),
                "this runtime expects 1".into(),
            ],
        ),
        (
            "foreign_target",
            Fixture::host_with(|f| f.target = foreign_target().into()),
            vec![
                format!("built for target {}", foreign_target()),
                format!("this host is {}", std::env::consts::ARCH),
            ],
        ),
        (
            "cuda",
            Fixture::host_with(|f| f.target = "cuda-sm80".into()),
            vec![
                "targets cuda-sm80".into(),
                "cannot run CUDA artifacts".into(),
            ],
        ),
        (
            "unknown_target",
            Fixture::host_with(|f| f.target = "riscv64".into()),
            vec!["unknown target \"riscv64\"".into(), host_target.into()],
        ),
        (
            "missing_feature",
            Fixture::host_with(|f| f.features = missing_feature),
            vec![
                format!("needs CPU feature {}, which this", foreign_feature()),
                "CPU lacks".into(),
                "illegal instruction".into(),
            ],
        ),
        (
            "unknown_feature",
            Fixture::host_with(|f| f.features = format!("{host_feature}, frobnicate")),
            vec![
                "unknown CPU feature \"frobnicate\"".into(),
                "illegal instruction".into(),
            ],
        ),
        (
            "no_error_string",
            Fixture::host_with(|f| f.omit_symbol = Some("kiln_error_string")),
            vec![
                "is not a Kiln artifact".into(),
                "does not export `kiln_error_string`".into(),
            ],
        ),
        (
            "no_run",
            Fixture::host_with(|f| f.omit_symbol = Some("kiln_run")),
            vec!["does not export `kiln_run`".into()],
        ),
        (
            "string_dtype",
            Fixture::host_with(|f| f.output_dtype = 8),
            vec!["output 0 (sum: dtype 8 [2, 3]) has an unsupported dtype".into()],
        ),
    ];
    for (name, fixture, wants) in cases {
        let so = fixture.build(dir.path(), name);
        let err = Model::load(&so).expect_err(name);
        let msg = err.to_string();
        println!("{name}: {msg}");
        assert!(
            msg.contains(so.to_str().expect("utf-8 path")),
            "{name}: {msg}"
        );
        for want in wants {
            assert!(msg.contains(&want), "{name}: {msg:?} lacks {want:?}");
        }
    }
}

#[test]
fn refuses_files_that_are_not_artifacts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let text = dir.path().join("not_elf.so");
    std::fs::write(&text, "hello").expect("write");
    let cases: Vec<(std::path::PathBuf, &str)> = vec![
        (dir.path().join("missing.so"), "cannot read artifact"),
        (text, "cannot load artifact"),
    ];
    for (path, want) in cases {
        let err = Model::load(&path).expect_err(want);
        assert!(err.to_string().contains(want), "{err}");
        assert!(
            matches!(err, LoadError::Io { .. } | LoadError::Open { .. }),
            "{err:?}"
        );
    }
}
