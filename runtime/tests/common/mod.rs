//! Test support shared by the runtime's integration tests: fixture artifacts written in C
//! (a model `sum = a + b` over two f32 tensors of shape [rows, 3], implementing all of
//! kiln.h, with the ABI version, target, feature list and output dtype chosen per test, and
//! optionally one ABI symbol left out), built with `cc` (or a cross compiler) in a temporary
//! directory; building the C harness `c/kiln_run.c`; and small byte helpers.

#![allow(dead_code)] // each test binary uses a different part

use std::path::{Path, PathBuf};
use std::process::Command;

/// The kiln.h folder.
pub fn include_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("include")
}

/// The C harness source.
pub fn harness_source() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("c/kiln_run.c")
}

/// The host C compiler: `$CC` or `cc`.
pub fn host_cc() -> String {
    std::env::var("CC").unwrap_or_else(|_| "cc".to_string())
}

/// The target and feature list of a fixture that runs on this host.
pub fn host_target() -> (&'static str, &'static str) {
    if cfg!(target_arch = "x86_64") {
        ("x86_64", "sse4.1")
    } else {
        ("aarch64-neon", "neon")
    }
}

/// A target of the other CPU architecture.
pub fn foreign_target() -> &'static str {
    if cfg!(target_arch = "x86_64") {
        "aarch64-neon"
    } else {
        "x86_64"
    }
}

/// A known CPU feature this host cannot have (it belongs to the other architecture).
pub fn foreign_feature() -> &'static str {
    if cfg!(target_arch = "x86_64") {
        "sve"
    } else {
        "avx2"
    }
}

/// Workspace bytes the fixture asks for: not a multiple of 64 on purpose.
pub const FIXTURE_WORKSPACE: u64 = 1000;
/// Status the fixture returns when `a[0]` is NaN, and its message.
pub const NAN_STATUS: i32 = 4;
pub const NAN_MESSAGE: &str = "input a contains NaN";

/// A fixture artifact: `sum[r][c] = a[r][c] + b[r][c]`, rows split over `parallel_for`.
#[derive(Debug, Clone)]
pub struct Fixture {
    pub abi_version: u32,
    pub target: String,
    pub features: String,
    pub rows: usize,
    pub output_dtype: i32,
    /// An ABI function to leave out (renamed in the source).
    pub omit_symbol: Option<&'static str>,
    /// C statements run at the start of kiln_run (e.g. an instruction that needs a feature).
    pub prelude: String,
}

impl Fixture {
    /// The fixture that runs on this host: 2 rows, the host target and a feature it has.
    pub fn host() -> Fixture {
        let (target, features) = host_target();
        Fixture {
            abi_version: kiln_runtime::ABI_VERSION,
            target: target.to_string(),
            features: features.to_string(),
            rows: 2,
            output_dtype: 1,
            omit_symbol: None,
            prelude: String::new(),
        }
    }

    /// The host fixture with one change.
    pub fn host_with(change: impl FnOnce(&mut Fixture)) -> Fixture {
        let mut fixture = Fixture::host();
        change(&mut fixture);
        fixture
    }

    pub fn source(&self) -> String {
        let omit = self
            .omit_symbol
            .map_or(String::new(), |s| format!("#define {s} not_{s}\n"));
        FIXTURE_C
            .replace("@OMIT@", &omit)
            .replace("@ROWS@", &self.rows.to_string())
            .replace("@OUT_DTYPE@", &self.output_dtype.to_string())
            .replace("@ABI@", &format!("{}u", self.abi_version))
            .replace("@TARGET@", &self.target)
            .replace("@FEATURES@", &self.features)
            .replace("@WORKSPACE@", &FIXTURE_WORKSPACE.to_string())
            .replace("@NAN_STATUS@", &NAN_STATUS.to_string())
            .replace("@NAN_MESSAGE@", NAN_MESSAGE)
            .replace("@PRELUDE@", &self.prelude)
    }

    /// Writes `NAME.c` into `dir` and builds `NAME.so` with `cc` and extra flags.
    pub fn build_with(&self, dir: &Path, name: &str, cc: &str, flags: &[&str]) -> PathBuf {
        let c = dir.join(format!("{name}.c"));
        let so = dir.join(format!("{name}.so"));
        std::fs::write(&c, self.source()).expect("write fixture source");
        let mut cmd = Command::new(cc);
        cmd.args(["-std=c99", "-Wall", "-Werror", "-shared", "-fPIC", "-O1"])
            .args(flags)
            .arg("-I")
            .arg(include_dir())
            .arg("-o")
            .arg(&so)
            .arg(&c);
        run_ok(&mut cmd, "build the fixture");
        so
    }

    /// Builds the fixture for this host with `cc`.
    pub fn build(&self, dir: &Path, name: &str) -> PathBuf {
        self.build_with(dir, name, &host_cc(), &[])
    }
}

const FIXTURE_C: &str = r#"/* Kiln fixture artifact: sum = a + b, float32 [ROWS, 3]. */
#include <stdint.h>
#include <string.h>
#include "kiln.h"
@OMIT@
#define ROWS @ROWS@
#define COLS 3
#define WORKSPACE @WORKSPACE@

/* kiln_tensor_info ends in a flexible name array: one static per tensor, name inline. */
struct info_storage { int32_t dtype; int32_t rank; int64_t dims[KILN_MAX_RANK]; char name[8]; };
static const struct info_storage input_a = {1, 2, {ROWS, COLS}, "a"};
static const struct info_storage input_b = {1, 2, {ROWS, COLS}, "b"};
static const struct info_storage output_sum = {@OUT_DTYPE@, 2, {ROWS, COLS}, "sum"};

uint32_t kiln_abi_version(void) { return @ABI@; }
const char *kiln_target(void) { return "@TARGET@"; }
const char *kiln_required_features(void) { return "@FEATURES@"; }
int32_t kiln_num_inputs(void) { return 2; }
int32_t kiln_num_outputs(void) { return 1; }
const kiln_tensor_info *kiln_input_info(int32_t i) {
    return i == 0 ? (const kiln_tensor_info *)&input_a : i == 1 ? (const kiln_tensor_info *)&input_b : 0;
}
const kiln_tensor_info *kiln_output_info(int32_t i) { return i == 0 ? (const kiln_tensor_info *)&output_sum : 0; }
uint64_t kiln_workspace_size(void) { return WORKSPACE; }

struct ctx { const float *a, *b; float *sum; };

static void row(void *p, int64_t r) {
    const struct ctx *c = p;
    int j;
    for (j = 0; j < COLS; j++) c->sum[r * COLS + j] = c->a[r * COLS + j] + c->b[r * COLS + j];
}

int32_t kiln_run(const kiln_host *host, const void *const *in, void *const *out, void *ws) {
    struct ctx c;
    int64_t r;
    @PRELUDE@
    if (!in || !out || !ws) return KILN_ERR_BAD_ARGUMENT;
    if ((uintptr_t)ws % 64 != 0) return 3;
    if (host && (host->abi_version != KILN_ABI_VERSION || host->num_threads < 1)) return KILN_ERR_HOST;
    memset(ws, 0xAB, WORKSPACE); /* all of it is ours */
    c.a = in[0];
    c.b = in[1];
    c.sum = out[0];
    if (c.a[0] != c.a[0]) return @NAN_STATUS@;
    if (host && host->parallel_for) host->parallel_for(host->user, ROWS, row, &c);
    else for (r = 0; r < ROWS; r++) row(&c, r);
    return KILN_OK;
}

const char *kiln_error_string(int32_t code) {
    switch (code) {
    case KILN_OK: return "ok";
    case KILN_ERR_BAD_ARGUMENT: return "bad argument";
    case KILN_ERR_HOST: return "bad host table";
    case 3: return "workspace is not 64-byte aligned";
    case @NAN_STATUS@: return "@NAN_MESSAGE@";
    default: return "unknown status";
    }
}
"#;

/// Runs a command that must succeed; panics with its output otherwise.
pub fn run_ok(cmd: &mut Command, what: &str) -> std::process::Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot {what}: {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "cannot {what}: {cmd:?} exited with {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Builds `c/kiln_run.c` into `dir/NAME` with the given compiler.
pub fn build_harness(dir: &Path, name: &str, cc: &str) -> PathBuf {
    let exe = dir.join(name);
    let mut cmd = Command::new(cc);
    cmd.args(["-std=c99", "-Wall", "-Wextra", "-Werror", "-O2", "-o"])
        .arg(&exe)
        .arg(harness_source())
        .args(["-ldl", "-lpthread"]);
    run_ok(&mut cmd, "build the C harness");
    exe
}

/// `a` and `b` for a fixture with `rows` rows, and the expected sum.
pub fn sample(rows: usize) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let a: Vec<f32> = (0..rows * 3).map(|i| i as f32 * 0.5).collect();
    let b: Vec<f32> = (0..rows * 3).map(|i| 100.0 - i as f32).collect();
    let sum = a.iter().zip(&b).map(|(x, y)| x + y).collect();
    (a, b, sum)
}

/// Little-endian bytes of f32 values (the buffer and file format on every Kiln target).
pub fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// f32 values from little-endian bytes.
pub fn f32_values(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}
