//! Loading an artifact: [`Model::load`] `dlopen`s a Kiln `.so`, resolves every symbol of the
//! C ABI, refuses it ([`LoadError`]) when the ABI version, target or required CPU features do
//! not fit this host, before any of its kernels can run, and copies the input/output tensor
//! descriptions into owned [`TensorInfo`]s. A `Model` is immutable and `Send + Sync`; running
//! it needs a `Session` (session.rs), and any number of sessions may share one model.

use std::ffi::{c_char, CStr};
use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::abi::{RawTensorInfo, Symbols};
use crate::cpu::{self, Incompatible};
use crate::tensor::TensorInfo;
use crate::ABI_VERSION;

/// Largest rank the loader accepts; more is taken as a corrupt info table.
const MAX_RANK: i32 = crate::abi::MAX_RANK as i32;

/// Why an artifact could not be loaded. Every variant names the file, and its message
/// includes the underlying cause (kept out of `source()` so that a printed error chain does
/// not repeat it).
#[derive(Debug, Error)]
pub enum LoadError {
    #[error("cannot read artifact {path}: {cause}")]
    Io {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("artifact {path} is an ELF file for {elf_arch}, but this host is {host}")]
    WrongArchitecture {
        path: PathBuf,
        elf_arch: String,
        host: &'static str,
    },
    #[error("cannot load artifact {path}: {cause}")]
    Open {
        path: PathBuf,
        cause: libloading::Error,
    },
    #[error("{path} is not a Kiln artifact: it does not export `{symbol}` ({cause})")]
    MissingSymbol {
        path: PathBuf,
        symbol: &'static str,
        cause: libloading::Error,
    },
    #[error(
        "artifact {path} has ABI version {found}, but this runtime expects {expected}; \
         rebuild it with a matching Kiln version"
    )]
    AbiVersion {
        path: PathBuf,
        found: u32,
        expected: u32,
    },
    #[error("{path} cannot run here: {cause}")]
    Incompatible { path: PathBuf, cause: Incompatible },
    #[error("artifact {path} is malformed: {what}")]
    Malformed { path: PathBuf, what: String },
}

/// A loaded, checked artifact.
pub struct Model {
    path: PathBuf,
    symbols: Symbols,
    target: String,
    required_features: Vec<String>,
    inputs: Vec<TensorInfo>,
    outputs: Vec<TensorInfo>,
    input_sizes: Vec<usize>,
    output_sizes: Vec<usize>,
    workspace_size: u64,
    // Last field, so it is dropped (dlclose) after everything that points into it.
    _library: libloading::Library,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("path", &self.path)
            .field("target", &self.target)
            .field("required_features", &self.required_features)
            .field("inputs", &self.inputs)
            .field("outputs", &self.outputs)
            .field("workspace_size", &self.workspace_size)
            .finish_non_exhaustive()
    }
}

impl Model {
    /// Loads the artifact at `path` and checks that it can run on this host.
    ///
    /// Loading a shared object runs its code (initializers, then the ABI getters), so `path`
    /// must be a Kiln artifact you trust, as with any library an app loads. No kernel runs
    /// before the ABI version, target and CPU features have been checked.
    pub fn load(path: impl AsRef<Path>) -> Result<Model, LoadError> {
        let path = path.as_ref().to_path_buf();
        let header = read_header(&path)?;
        let library = open(&path).map_err(|source| match elf_arch_mismatch(&header) {
            Some(elf_arch) => LoadError::WrongArchitecture {
                path: path.clone(),
                elf_arch,
                host: cpu::host_arch(),
            },
            None => LoadError::Open {
                path: path.clone(),
                cause: source,
            },
        })?;
        // SAFETY: the caller hands us a Kiln artifact (see the doc comment); symbols found
        // under the ABI's names have the header's signatures.
        let symbols = unsafe { Symbols::resolve(&library) }.map_err(|(symbol, source)| {
            LoadError::MissingSymbol {
                path: path.clone(),
                symbol,
                cause: source,
            }
        })?;
        let malformed = |what: String| LoadError::Malformed {
            path: path.clone(),
            what,
        };

        // SAFETY (all calls below): the getters take no pointers and have no preconditions.
        let found = unsafe { (symbols.abi_version)() };
        if found != ABI_VERSION {
            return Err(LoadError::AbiVersion {
                path,
                found,
                expected: ABI_VERSION,
            });
        }
        let target = c_string(unsafe { (symbols.target)() }, "kiln_target()").map_err(malformed)?;
        let features = c_string(
            unsafe { (symbols.required_features)() },
            "kiln_required_features()",
        )
        .map_err(malformed)?;
        let required_features = cpu::parse_features(&features);
        cpu::check_compatible(&target, &required_features).map_err(|source| {
            LoadError::Incompatible {
                path: path.clone(),
                cause: source,
            }
        })?;

        let inputs = read_infos(
            unsafe { (symbols.num_inputs)() },
            symbols.input_info,
            "input",
        )
        .map_err(malformed)?;
        let outputs = read_infos(
            unsafe { (symbols.num_outputs)() },
            symbols.output_info,
            "output",
        )
        .map_err(malformed)?;
        let sizes = |infos: &[TensorInfo], kind: &str| -> Result<Vec<usize>, LoadError> {
            infos
                .iter()
                .enumerate()
                .map(|(i, t)| {
                    t.byte_size().ok_or_else(|| {
                        malformed(format!(
                            "{kind} {i} ({t}) has an unsupported dtype or a size that does not \
                             fit in memory"
                        ))
                    })
                })
                .collect()
        };
        let input_sizes = sizes(&inputs, "input")?;
        let output_sizes = sizes(&outputs, "output")?;
        let workspace_size = unsafe { (symbols.workspace_size)() };

        Ok(Model {
            path,
            symbols,
            target,
            required_features,
            inputs,
            outputs,
            input_sizes,
            output_sizes,
            workspace_size,
            _library: library,
        })
    }

    /// The file this model was loaded from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The inputs, in graph order.
    pub fn inputs(&self) -> &[TensorInfo] {
        &self.inputs
    }

    /// The outputs, in graph order.
    pub fn outputs(&self) -> &[TensorInfo] {
        &self.outputs
    }

    /// The target the artifact was built for, e.g. "aarch64-neon-dotprod".
    pub fn target(&self) -> &str {
        &self.target
    }

    /// The CPU features the artifact requires, as listed by `kiln_required_features()`.
    pub fn required_features(&self) -> &[String] {
        &self.required_features
    }

    /// Bytes of scratch memory one run needs (`kiln_workspace_size()`).
    pub fn workspace_size(&self) -> u64 {
        self.workspace_size
    }

    /// Byte sizes of the input buffers, in graph order.
    pub fn input_sizes(&self) -> &[usize] {
        &self.input_sizes
    }

    /// Byte sizes of the output buffers, in graph order.
    pub fn output_sizes(&self) -> &[usize] {
        &self.output_sizes
    }

    pub(crate) fn symbols(&self) -> &Symbols {
        &self.symbols
    }
}

/// Reads the first bytes of the file: a clear I/O error for a missing or unreadable file
/// (dlopen's message is vaguer), and the ELF header for the architecture check.
fn read_header(path: &Path) -> Result<Vec<u8>, LoadError> {
    use std::io::Read;
    let io = |cause| LoadError::Io {
        path: path.to_path_buf(),
        cause,
    };
    let mut header = Vec::with_capacity(64);
    std::fs::File::open(path)
        .map_err(io)?
        .take(64)
        .read_to_end(&mut header)
        .map_err(io)?;
    Ok(header)
}

/// If `header` is an ELF header for another machine than this host's, that machine's name.
fn elf_arch_mismatch(header: &[u8]) -> Option<String> {
    if header.len() < 20 || &header[..4] != b"\x7fELF" || header[5] != 1 {
        return None; // not a little-endian ELF file: let dlopen's message speak
    }
    let machine = u16::from_le_bytes([header[18], header[19]]);
    let name = match machine {
        3 => "x86 (32-bit)".to_string(),
        40 => "arm (32-bit)".to_string(),
        62 => "x86_64".to_string(),
        183 => "aarch64".to_string(),
        243 => "riscv".to_string(),
        m => format!("machine type {m}"),
    };
    (name != cpu::host_arch()).then_some(name)
}

/// dlopen with RTLD_NOW, so an artifact with an unresolvable import fails here, not in the
/// middle of a run. A bare file name is made relative ("./x.so"): dlopen would otherwise
/// search the library path instead of the current directory.
fn open(path: &Path) -> Result<libloading::Library, libloading::Error> {
    let path = dlopen_path(path);
    #[cfg(unix)]
    {
        use libloading::os::unix::{Library, RTLD_LOCAL, RTLD_NOW};
        // SAFETY: loading runs the library's initializers; see `Model::load`.
        unsafe { Library::open(Some(&path), RTLD_NOW | RTLD_LOCAL) }.map(Into::into)
    }
    #[cfg(not(unix))]
    {
        // SAFETY: as above.
        unsafe { libloading::Library::new(&path) }
    }
}

/// `path`, with "./" in front of a bare file name.
fn dlopen_path(path: &Path) -> PathBuf {
    if path.is_relative() && path.parent() == Some(Path::new("")) {
        Path::new(".").join(path)
    } else {
        path.to_path_buf()
    }
}

/// Copies a NUL-terminated UTF-8 string returned by the artifact.
fn c_string(ptr: *const c_char, what: &str) -> Result<String, String> {
    if ptr.is_null() {
        return Err(format!("{what} returned NULL"));
    }
    // SAFETY: non-null; the ABI promises a NUL-terminated string that lives as long as the
    // library.
    let s = unsafe { CStr::from_ptr(ptr) };
    s.to_str()
        .map(str::to_string)
        .map_err(|_| format!("{what} is not valid UTF-8: {s:?}"))
}

/// Copies `count` tensor infos out of the artifact.
fn read_infos(
    count: i32,
    get: unsafe extern "C" fn(i32) -> *const RawTensorInfo,
    kind: &str,
) -> Result<Vec<TensorInfo>, String> {
    if count < 0 {
        return Err(format!("kiln_num_{kind}s() returned {count}"));
    }
    (0..count)
        .map(|i| {
            // SAFETY: i is in [0, count), as the ABI requires.
            let raw = unsafe { get(i) };
            if raw.is_null() {
                return Err(format!("kiln_{kind}_info({i}) returned NULL"));
            }
            // SAFETY: non-null; points at a static kiln_tensor_info in the artifact, whose
            // NUL-terminated name follows the fixed part.
            let (fixed, name_ptr) = unsafe { (*raw, RawTensorInfo::name_ptr(raw)) };
            let name = c_string(name_ptr, &format!("the name of {kind} {i}"))?;
            if !(0..=MAX_RANK).contains(&fixed.rank) {
                return Err(format!("{kind} {i} ({name}) has rank {}", fixed.rank));
            }
            let dims = fixed.dims[..fixed.rank as usize].to_vec();
            let raw = fixed;
            if let Some(d) = dims.iter().find(|&&d| d < 0) {
                return Err(format!(
                    "{kind} {i} ({name}) has a negative dim {d} in {dims:?}"
                ));
            }
            Ok(TensorInfo {
                name,
                dtype: raw.dtype,
                dims,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn elf_header_architecture() {
        let mut h = vec![0u8; 64];
        h[..4].copy_from_slice(b"\x7fELF");
        h[4] = 2;
        h[5] = 1;
        let other: u16 = if cfg!(target_arch = "x86_64") {
            183
        } else {
            62
        };
        h[18..20].copy_from_slice(&other.to_le_bytes());
        assert!(elf_arch_mismatch(&h).is_some());
        let own: u16 = if cfg!(target_arch = "x86_64") {
            62
        } else {
            183
        };
        h[18..20].copy_from_slice(&own.to_le_bytes());
        assert_eq!(elf_arch_mismatch(&h), None);
        assert_eq!(elf_arch_mismatch(b"not an elf file at all"), None);
    }

    #[test]
    fn bare_names_are_made_relative() {
        let cases = [
            ("model.so", "./model.so"),
            ("./model.so", "./model.so"),
            ("out/model.so", "out/model.so"),
            ("/abs/model.so", "/abs/model.so"),
        ];
        for (given, want) in cases {
            assert_eq!(dlopen_path(Path::new(given)), Path::new(want), "{given}");
        }
    }

    #[test]
    fn missing_file_is_io_error() {
        let err = Model::load("/nonexistent/kiln/model.so").expect_err("must fail");
        assert!(matches!(err, LoadError::Io { .. }), "{err}");
        assert!(
            err.to_string().contains("/nonexistent/kiln/model.so"),
            "{err}"
        );
    }
}
