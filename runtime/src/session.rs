//! Running a model: a [`Session`] owns what one run at a time needs (a zeroed, 64-byte
//! aligned workspace of `kiln_workspace_size()` bytes and a [`ThreadPool`]), checks the
//! caller's buffers against the model's tensor infos (count and byte length), calls
//! `kiln_run` with a `kiln_host` table whose `parallel_for` runs on the pool, and turns a
//! non-zero status into a [`RunError`] carrying the artifact's `kiln_error_string`. Several
//! sessions may run one `Model` concurrently (`kiln_run` is reentrant for distinct
//! workspaces).

use std::alloc::Layout;
use std::ffi::{c_void, CStr};
use std::path::PathBuf;
use std::ptr::NonNull;

use thiserror::Error;

use crate::abi::RawHost;
use crate::model::Model;
use crate::pool::{host_parallel_for, ThreadPool};
use crate::tensor::TensorInfo;
use crate::ABI_VERSION;

/// Workspace alignment promised by kiln.h.
pub const WORKSPACE_ALIGN: usize = 64;

/// Why a session could not be created.
#[derive(Debug, Error)]
pub enum SessionError {
    #[error("cannot allocate the {size}-byte workspace of {path}")]
    Workspace { path: PathBuf, size: u64 },
    #[error("cannot start {threads} worker threads: {source}")]
    Threads {
        threads: usize,
        source: std::io::Error,
    },
}

/// Why a run failed.
#[derive(Debug, Error)]
pub enum RunError {
    #[error("the model takes {expected} input buffer(s), got {actual}")]
    InputCount { expected: usize, actual: usize },
    #[error("the model takes {expected} output buffer(s), got {actual}")]
    OutputCount { expected: usize, actual: usize },
    #[error("input {index} ({tensor}) needs a buffer of {expected} bytes, got {actual}")]
    InputSize {
        index: usize,
        tensor: String,
        expected: usize,
        actual: usize,
    },
    #[error("output {index} ({tensor}) needs a buffer of {expected} bytes, got {actual}")]
    OutputSize {
        index: usize,
        tensor: String,
        expected: usize,
        actual: usize,
    },
    #[error("kiln_run failed with status {code}: {message}")]
    Kernel { code: i32, message: String },
    #[error("kiln_run misused the host table: {message}")]
    Host { message: String },
}

/// A 64-byte aligned, zero-initialized heap buffer.
struct Workspace {
    ptr: NonNull<u8>,
    layout: Layout,
}

// SAFETY: the workspace is plain memory owned by this value.
unsafe impl Send for Workspace {}
unsafe impl Sync for Workspace {}

impl Workspace {
    /// At least one alignment unit is allocated, so the pointer is always valid.
    fn new(size: u64) -> Option<Workspace> {
        let size = usize::try_from(size).ok()?.max(WORKSPACE_ALIGN);
        let layout = Layout::from_size_align(size, WORKSPACE_ALIGN).ok()?;
        // SAFETY: the layout has a non-zero size.
        let ptr = NonNull::new(unsafe { std::alloc::alloc_zeroed(layout) })?;
        Some(Workspace { ptr, layout })
    }
}

impl Drop for Workspace {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

/// One model, ready to run: workspace and threads. Runs one at a time (`run` takes
/// `&mut self`); create one session per concurrent caller.
pub struct Session<'m> {
    model: &'m Model,
    workspace: Workspace,
    pool: ThreadPool,
}

impl std::fmt::Debug for Session<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("model", &self.model.path())
            .field("threads", &self.pool.threads())
            .field("workspace_bytes", &self.workspace.layout.size())
            .finish()
    }
}

impl<'m> Session<'m> {
    /// A session for `model` running on `threads` threads in all (the calling thread is one
    /// of them; `1` runs everything inline on the caller, `0` means one per available core).
    pub fn new(model: &'m Model, threads: usize) -> Result<Session<'m>, SessionError> {
        let size = model.workspace_size();
        let workspace = Workspace::new(size).ok_or_else(|| SessionError::Workspace {
            path: model.path().to_path_buf(),
            size,
        })?;
        let pool =
            ThreadPool::new(threads).map_err(|source| SessionError::Threads { threads, source })?;
        Ok(Session {
            model,
            workspace,
            pool,
        })
    }

    /// The model this session runs.
    pub fn model(&self) -> &'m Model {
        self.model
    }

    /// Threads in all, the caller's included.
    pub fn threads(&self) -> usize {
        self.pool.threads()
    }

    /// Runs the model once. `inputs` and `outputs` are dense row-major buffers in graph
    /// order, each exactly the tensor's byte size (see [`TensorInfo::byte_size`]); values are
    /// in the machine's byte order. Buffers need no particular alignment.
    pub fn run(&mut self, inputs: &[&[u8]], outputs: &mut [&mut [u8]]) -> Result<(), RunError> {
        let model = self.model;
        check_buffers(
            model.inputs(),
            model.input_sizes(),
            inputs.iter().map(|b| b.len()),
        )
        .map_err(|e| match e {
            BufferError::Count { expected, actual } => RunError::InputCount { expected, actual },
            BufferError::Size {
                index,
                tensor,
                expected,
                actual,
            } => RunError::InputSize {
                index,
                tensor,
                expected,
                actual,
            },
        })?;
        check_buffers(
            model.outputs(),
            model.output_sizes(),
            outputs.iter().map(|b| b.len()),
        )
        .map_err(|e| match e {
            BufferError::Count { expected, actual } => RunError::OutputCount { expected, actual },
            BufferError::Size {
                index,
                tensor,
                expected,
                actual,
            } => RunError::OutputSize {
                index,
                tensor,
                expected,
                actual,
            },
        })?;

        let input_ptrs: Vec<*const c_void> =
            inputs.iter().map(|b| b.as_ptr().cast::<c_void>()).collect();
        let output_ptrs: Vec<*mut c_void> = outputs
            .iter_mut()
            .map(|b| b.as_mut_ptr().cast::<c_void>())
            .collect();
        let host = RawHost {
            abi_version: ABI_VERSION,
            num_threads: i32::try_from(self.pool.threads()).unwrap_or(i32::MAX),
            user: (&self.pool as *const ThreadPool)
                .cast_mut()
                .cast::<c_void>(),
            parallel_for: Some(host_parallel_for),
        };
        let symbols = model.symbols();
        // A stale problem from an earlier, failed run must not be reported for this one.
        let _ = self.pool.take_host_error();
        // SAFETY: the model passed the load checks (ABI version, target, CPU features); every
        // buffer has the byte size its tensor info declares, outputs are exclusively
        // borrowed, the workspace has kiln_workspace_size() bytes, 64-byte aligned, and is
        // used by no other run; `host` and the pool it points to outlive the call.
        let code = unsafe {
            (symbols.run)(
                &host,
                input_ptrs.as_ptr(),
                output_ptrs.as_ptr(),
                self.workspace.ptr.as_ptr().cast::<c_void>(),
            )
        };
        if let Some(message) = self.pool.take_host_error() {
            return Err(RunError::Host { message });
        }
        if code != crate::status::OK {
            // SAFETY: kiln_error_string takes any code and returns a static string or NULL.
            let ptr = unsafe { (symbols.error_string)(code) };
            let message = if ptr.is_null() {
                "(the artifact gives no message for this status)".to_string()
            } else {
                // SAFETY: non-null, NUL-terminated, static in the artifact.
                unsafe { CStr::from_ptr(ptr) }
                    .to_string_lossy()
                    .into_owned()
            };
            return Err(RunError::Kernel { code, message });
        }
        Ok(())
    }
}

enum BufferError {
    Count {
        expected: usize,
        actual: usize,
    },
    Size {
        index: usize,
        tensor: String,
        expected: usize,
        actual: usize,
    },
}

fn check_buffers(
    infos: &[TensorInfo],
    sizes: &[usize],
    lens: impl ExactSizeIterator<Item = usize>,
) -> Result<(), BufferError> {
    if lens.len() != sizes.len() {
        return Err(BufferError::Count {
            expected: sizes.len(),
            actual: lens.len(),
        });
    }
    for (index, ((info, &expected), actual)) in infos.iter().zip(sizes).zip(lens).enumerate() {
        if actual != expected {
            return Err(BufferError::Size {
                index,
                tensor: info.to_string(),
                expected,
                actual,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workspace_is_aligned_and_zeroed() {
        for size in [0u64, 1, 63, 64, 1000, 1 << 20] {
            let w = Workspace::new(size).expect("small workspace");
            assert_eq!(w.ptr.as_ptr() as usize % WORKSPACE_ALIGN, 0);
            assert!(w.layout.size() as u64 >= size);
            // SAFETY: the allocation has layout.size() initialized (zeroed) bytes.
            let bytes = unsafe { std::slice::from_raw_parts(w.ptr.as_ptr(), w.layout.size()) };
            assert!(bytes.iter().all(|&b| b == 0));
        }
        assert!(Workspace::new(u64::MAX).is_none());
    }
}
