//! The C harness `c/kiln_run.c`, built with the host `cc` and run on fixture artifacts
//! (outputs, exit status 2 with a clear message for artifacts that cannot run here, exit 1
//! for errors), and, with the aarch64 cross compiler and qemu-user, built for aarch64 and run
//! under `qemu-aarch64 -cpu max` and `-cpu cortex-a72` on dotprod and SVE fixtures.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::*;

fn write_inputs(dir: &Path, inputs: &[Vec<u8>]) {
    std::fs::create_dir_all(dir).expect("mkdir");
    for (i, bytes) in inputs.iter().enumerate() {
        std::fs::write(dir.join(format!("input_{i}.bin")), bytes).expect("write input");
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Checks a harness run: exit status, and for failures a one-line stderr containing `want`;
/// for successes the output file holds `sum` and stdout names it.
fn check_run(name: &str, out: &Output, want_code: i32, want: &str, out_dir: &Path, sum: &[f32]) {
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(
        out.status.code(),
        Some(want_code),
        "{name}: {}\nstdout: {stdout}\nstderr: {stderr}",
        out.status
    );
    if want_code == 0 {
        let got = std::fs::read(out_dir.join("output_0.bin")).expect("output_0.bin");
        assert_eq!(f32_values(&got), sum, "{name}");
        assert!(
            stdout.starts_with(want),
            "{name}: stdout {stdout:?} should start with {want:?}"
        );
        assert_eq!(
            stdout.lines().count(),
            1,
            "{name}: one line per output: {stdout:?}"
        );
    } else {
        assert_eq!(
            stderr.lines().count(),
            1,
            "{name}: one-line message expected: {stderr:?}"
        );
        assert!(stderr.starts_with("kiln_run: "), "{name}: {stderr:?}");
        assert!(
            stderr.contains(want),
            "{name}: stderr {stderr:?} lacks {want:?}"
        );
    }
}

/// One run of the harness: fixture, input files, THREADS argument, expected exit status and
/// the text stdout must start with (success) or stderr must contain (failure).
struct Case<'a> {
    name: &'a str,
    fixture: Fixture,
    inputs: &'a [Vec<u8>],
    threads: &'a str,
    code: i32,
    want: String,
}

fn case<'a>(
    name: &'a str,
    fixture: Fixture,
    inputs: &'a [Vec<u8>],
    threads: &'a str,
    code: i32,
    want: impl Into<String>,
) -> Case<'a> {
    Case {
        name,
        fixture,
        inputs,
        threads,
        code,
        want: want.into(),
    }
}

#[test]
fn c_harness_runs_and_refuses_on_host() {
    let dir = tempfile::tempdir().expect("tempdir");
    let harness = build_harness(dir.path(), "kiln_run", &host_cc());
    let (_, host_feature) = host_target();
    let (a, b, sum) = sample(2);
    let good = [f32_bytes(&a), f32_bytes(&b)];
    let nan = [f32_bytes(&[f32::NAN; 6]), f32_bytes(&b)];
    let short = [f32_bytes(&a), vec![0u8; 20]];
    let ok = "sum: float32 [2, 3] -> ";
    let foreign = format!(
        "artifact was built for target {}, but this host is {}",
        foreign_target(),
        std::env::consts::ARCH
    );
    let missing = format!(
        "artifact needs CPU feature {}, which this CPU lacks (running it would crash with an \
         illegal instruction)",
        foreign_feature()
    );
    let missing_features = format!("{host_feature},{}", foreign_feature());
    let cases = [
        case("one_thread", Fixture::host(), &good, "1", 0, ok),
        case("two_threads", Fixture::host(), &good, "2", 0, ok),
        case("four_threads", Fixture::host(), &good, "4", 0, ok),
        case(
            "foreign_target",
            Fixture::host_with(|f| f.target = foreign_target().into()),
            &good,
            "2",
            2,
            foreign,
        ),
        case(
            "missing_feature",
            Fixture::host_with(|f| f.features = missing_features),
            &good,
            "2",
            2,
            missing,
        ),
        case(
            "unknown_feature",
            Fixture::host_with(|f| f.features = "frobnicate".into()),
            &good,
            "2",
            2,
            "artifact needs unknown CPU feature 'frobnicate'",
        ),
        case(
            "abi999",
            Fixture::host_with(|f| f.abi_version = 999),
            &good,
            "2",
            2,
            "artifact has ABI version 999, but this harness expects 1",
        ),
        case(
            "cuda",
            Fixture::host_with(|f| f.target = "cuda-sm80".into()),
            &good,
            "2",
            2,
            "artifact targets cuda-sm80, a CUDA GPU",
        ),
        case(
            "no_error_string",
            Fixture::host_with(|f| f.omit_symbol = Some("kiln_error_string")),
            &good,
            "2",
            1,
            "is not a Kiln artifact: it does not export kiln_error_string",
        ),
        case(
            "short_input",
            Fixture::host(),
            &short,
            "2",
            1,
            "input_1.bin has 20 bytes, but input b: float32 [2, 3] needs 24",
        ),
        case(
            "kernel_error",
            Fixture::host(),
            &nan,
            "2",
            1,
            format!("kiln_run failed with status {NAN_STATUS}: {NAN_MESSAGE}"),
        ),
        case(
            "bad_threads",
            Fixture::host(),
            &good,
            "0",
            1,
            "THREADS must be a number from 1 to 1024, got '0'",
        ),
    ];
    for Case {
        name,
        fixture,
        inputs,
        threads,
        code,
        want,
    } in cases
    {
        let so = fixture.build(dir.path(), name);
        let in_dir = dir.path().join(format!("{name}_in"));
        let out_dir = dir.path().join(format!("{name}_out"));
        write_inputs(&in_dir, inputs);
        let out = Command::new(&harness)
            .arg(&so)
            .arg(&in_dir)
            .arg(&out_dir)
            .arg(threads)
            .output()
            .expect("run harness");
        check_run(name, &out, code, &want, &out_dir, &sum);
    }
    // A missing input file and a usage error.
    let so = Fixture::host().build(dir.path(), "plain");
    let empty = dir.path().join("empty_in");
    std::fs::create_dir_all(&empty).expect("mkdir");
    let out = Command::new(&harness)
        .arg(&so)
        .arg(&empty)
        .arg(dir.path().join("o"))
        .output();
    let out = out.expect("run harness");
    check_run("missing_input", &out, 1, "cannot read", &empty, &sum);
    let out = Command::new(&harness)
        .arg(&so)
        .output()
        .expect("run harness");
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).starts_with("usage: kiln_run MODEL.so IN_DIR OUT_DIR [THREADS]"));
}

const CROSS_CC: &str = "aarch64-linux-gnu-gcc";
const QEMU: &str = "qemu-aarch64";
const SYSROOT: &str = "/usr/aarch64-linux-gnu";
const INSTALL_HINT: &str = "the aarch64 harness test needs the Debian packages \
    gcc-aarch64-linux-gnu, libc6-dev-arm64-cross and qemu-user: \
    apt-get update && apt-get install -y gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user";

fn require_tool(tool: &str) {
    let found = Command::new(tool)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(found, "`{tool}` is not installed; {INSTALL_HINT}");
}

fn qemu(cpu: &str, program: &Path, args: &[&Path], threads: &str) -> Output {
    Command::new(QEMU)
        .args(["-L", SYSROOT, "-cpu", cpu])
        .arg(program)
        .args(args)
        .arg(threads)
        .output()
        .expect("run qemu-aarch64")
}

/// A program that calls kiln_run without any check, to show that the refused fixtures
/// really would crash.
const UNCHECKED_C: &str = r#"
#include <dlfcn.h>
#include <stdio.h>
#include "kiln.h"
int main(int argc, char **argv) {
    static float a[6], b[6], sum[6];
    static _Alignas(64) char ws[1024];
    const void *in[2] = {a, b};
    void *out[1] = {sum};
    int32_t (*run)(const kiln_host *, const void *const *, void *const *, void *);
    void *lib = dlopen(argv[1], RTLD_NOW);
    void *sym = lib ? dlsym(lib, "kiln_run") : 0;
    (void)argc;
    if (!sym) { fprintf(stderr, "unchecked: cannot load %s\n", argv[1]); return 1; }
    *(void **)&run = sym;
    return run(0, in, out, ws);
}
"#;

#[test]
fn c_harness_on_aarch64_under_qemu() {
    require_tool(CROSS_CC);
    require_tool(QEMU);
    assert!(
        Path::new(SYSROOT).join("lib").exists(),
        "{SYSROOT}/lib is missing; {INSTALL_HINT}"
    );

    let dir = tempfile::tempdir().expect("tempdir");
    let harness = build_harness(dir.path(), "kiln_run_aarch64", CROSS_CC);
    let (a, b, sum) = sample(2);
    let in_dir = dir.path().join("in");
    write_inputs(&in_dir, &[f32_bytes(&a), f32_bytes(&b)]);

    // Each fixture executes one instruction of the feature its target needs, so running it
    // on a CPU without that feature would raise SIGILL.
    let fixture = |target: &str, features: &str, prelude: &str| Fixture {
        target: target.into(),
        features: features.into(),
        prelude: prelude.into(),
        ..Fixture::host()
    };
    let dotprod = fixture(
        "aarch64-neon-dotprod",
        "neon,dotprod",
        r#"__asm__ volatile("sdot v0.4s, v1.16b, v2.16b" ::: "v0");"#,
    );
    let sve = fixture(
        "aarch64-sve",
        "sve",
        r#"__asm__ volatile("cntb x0" ::: "x0");"#,
    );
    let neon = fixture(
        "aarch64-neon",
        "neon",
        r#"__asm__ volatile("add v0.4s, v1.4s, v2.4s" ::: "v0");"#,
    );
    let builds: [(&str, &Fixture, &str); 3] = [
        ("dotprod", &dotprod, "-march=armv8.2-a+dotprod"),
        ("sve", &sve, "-march=armv8.2-a+sve"),
        ("neon", &neon, "-march=armv8-a"),
    ];
    let mut so: Vec<PathBuf> = Vec::new();
    for (name, f, march) in builds {
        so.push(f.build_with(dir.path(), name, CROSS_CC, &[march]));
    }
    let (dotprod_so, sve_so, neon_so) = (&so[0], &so[1], &so[2]);

    let ok = "sum: float32 [2, 3] -> ";
    let lacks = |f: &str| format!("artifact needs CPU feature {f}, which this CPU lacks");
    // (name, artifact, qemu cpu, THREADS, exit status, text)
    let cases: Vec<(&str, &PathBuf, &str, &str, i32, String)> = vec![
        ("dotprod_on_max", dotprod_so, "max", "2", 0, ok.into()),
        ("dotprod_on_max_1t", dotprod_so, "max", "1", 0, ok.into()),
        (
            "dotprod_on_a72",
            dotprod_so,
            "cortex-a72",
            "2",
            2,
            lacks("dotprod"),
        ),
        (
            "sve_on_max",
            sve_so,
            "max,sve-default-vector-length=32",
            "2",
            0,
            ok.into(),
        ),
        ("sve_on_a72", sve_so, "cortex-a72", "2", 2, lacks("sve")),
        ("neon_on_a72", neon_so, "cortex-a72", "2", 0, ok.into()),
    ];
    for (name, so, cpu, threads, code, want) in cases {
        let out_dir = dir.path().join(format!("{name}_out"));
        let out = qemu(cpu, &harness, &[so, &in_dir, &out_dir], threads);
        check_run(name, &out, code, &want, &out_dir, &sum);
    }

    // The premise: without the check, the dotprod fixture dies of SIGILL on cortex-a72.
    let src = dir.path().join("unchecked.c");
    std::fs::write(&src, UNCHECKED_C).expect("write");
    let unchecked = dir.path().join("unchecked");
    let mut cmd = Command::new(CROSS_CC);
    cmd.args(["-std=c11", "-O1", "-I"])
        .arg(include_dir())
        .arg("-o")
        .arg(&unchecked)
        .arg(&src)
        .arg("-ldl");
    run_ok(&mut cmd, "build the unchecked runner");
    let run_unchecked = |cpu: &str| {
        Command::new(QEMU)
            .args(["-L", SYSROOT, "-cpu", cpu])
            .arg(&unchecked)
            .arg(dotprod_so)
            .output()
            .expect("run qemu-aarch64")
    };
    assert_eq!(
        run_unchecked("max").status.code(),
        Some(0),
        "unchecked run on -cpu max"
    );
    let crashed = run_unchecked("cortex-a72");
    {
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(
            crashed.status.signal(),
            Some(4),
            "expected SIGILL: {:?}",
            crashed.status
        );
    }

    // The Rust loader names the architecture of an aarch64 artifact on an x86_64 host.
    if cfg!(target_arch = "x86_64") {
        let err = kiln_runtime::Model::load(dotprod_so).expect_err("aarch64 .so on x86_64");
        let msg = err.to_string();
        assert!(
            msg.contains("is an ELF file for aarch64, but this host is x86_64"),
            "{msg}"
        );
    }
}
