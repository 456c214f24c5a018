//! The raw C ABI of a Kiln artifact, mirrored from `include/kiln.h`: the `#[repr(C)]` structs
//! (`kiln_tensor_info`, `kiln_host`), the function-pointer types of every exported symbol, and
//! [`Symbols`], the table of all of them resolved from one loaded library. Nothing here checks
//! or interprets values; that is the loader's job (`model.rs`). Keep this file in step with
//! the header: the layout test at the bottom compares the two.

use std::ffi::{c_char, c_void};

/// `KILN_MAX_RANK` from kiln.h.
pub const MAX_RANK: usize = 8;

/// `kiln_tensor_info` from kiln.h, without its trailing flexible `name` array: the
/// NUL-terminated name starts right after this struct (at `size_of::<RawTensorInfo>()`).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct RawTensorInfo {
    pub dtype: i32,
    pub rank: i32,
    pub dims: [i64; MAX_RANK],
}

impl RawTensorInfo {
    /// Pointer to the name that follows the struct.
    ///
    /// # Safety
    /// `this` must point at a `kiln_tensor_info` returned by an artifact.
    pub unsafe fn name_ptr(this: *const RawTensorInfo) -> *const c_char {
        // SAFETY: the name is laid out directly after the fixed part, as kiln.h defines.
        unsafe { (this as *const u8).add(std::mem::size_of::<RawTensorInfo>()) as *const c_char }
    }
}

/// `kiln_task_fn` from kiln.h: `fn(ctx, i)`.
pub type TaskFn = unsafe extern "C" fn(ctx: *mut c_void, i: i64);

/// The `parallel_for` member of `kiln_host`. The task pointer is an `Option` because a
/// misbehaving artifact could pass NULL, and a non-nullable fn pointer must never hold NULL.
pub type ParallelForFn =
    unsafe extern "C" fn(user: *mut c_void, n: i64, task: Option<TaskFn>, ctx: *mut c_void);

/// `kiln_host` from kiln.h.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct RawHost {
    pub abi_version: u32,
    pub num_threads: i32,
    pub user: *mut c_void,
    pub parallel_for: Option<ParallelForFn>,
}

pub type AbiVersionFn = unsafe extern "C" fn() -> u32;
pub type StrFn = unsafe extern "C" fn() -> *const c_char;
pub type CountFn = unsafe extern "C" fn() -> i32;
pub type InfoFn = unsafe extern "C" fn(i: i32) -> *const RawTensorInfo;
pub type WorkspaceSizeFn = unsafe extern "C" fn() -> u64;
pub type RunFn = unsafe extern "C" fn(
    host: *const RawHost,
    inputs: *const *const c_void,
    outputs: *const *mut c_void,
    workspace: *mut c_void,
) -> i32;
pub type ErrorStringFn = unsafe extern "C" fn(code: i32) -> *const c_char;

/// Every function an artifact exports, resolved. The pointers stay valid while the library
/// they came from stays loaded; `Model` keeps the two together.
#[derive(Debug, Clone, Copy)]
pub struct Symbols {
    pub abi_version: AbiVersionFn,
    pub target: StrFn,
    pub required_features: StrFn,
    pub num_inputs: CountFn,
    pub num_outputs: CountFn,
    pub input_info: InfoFn,
    pub output_info: InfoFn,
    pub workspace_size: WorkspaceSizeFn,
    pub run: RunFn,
    pub error_string: ErrorStringFn,
}

/// The names of all exported symbols, in the header's order.
pub const SYMBOL_NAMES: [&str; 10] = [
    "kiln_abi_version",
    "kiln_target",
    "kiln_required_features",
    "kiln_num_inputs",
    "kiln_num_outputs",
    "kiln_input_info",
    "kiln_output_info",
    "kiln_workspace_size",
    "kiln_run",
    "kiln_error_string",
];

impl Symbols {
    /// Resolves every symbol of the ABI from `lib`; the error names the first one missing.
    ///
    /// # Safety
    /// `lib` must be a Kiln artifact: each symbol found under an ABI name is taken to have the
    /// signature the header declares.
    pub unsafe fn resolve(
        lib: &libloading::Library,
    ) -> Result<Symbols, (&'static str, libloading::Error)> {
        unsafe fn get<T: Copy>(
            lib: &libloading::Library,
            name: &'static str,
        ) -> Result<T, (&'static str, libloading::Error)> {
            // SAFETY: the caller promises the symbol has type T (see `resolve`).
            unsafe {
                lib.get::<T>(name.as_bytes())
                    .map(|s| *s)
                    .map_err(|e| (name, e))
            }
        }
        // SAFETY: forwarded from the caller.
        unsafe {
            Ok(Symbols {
                abi_version: get(lib, SYMBOL_NAMES[0])?,
                target: get(lib, SYMBOL_NAMES[1])?,
                required_features: get(lib, SYMBOL_NAMES[2])?,
                num_inputs: get(lib, SYMBOL_NAMES[3])?,
                num_outputs: get(lib, SYMBOL_NAMES[4])?,
                input_info: get(lib, SYMBOL_NAMES[5])?,
                output_info: get(lib, SYMBOL_NAMES[6])?,
                workspace_size: get(lib, SYMBOL_NAMES[7])?,
                run: get(lib, SYMBOL_NAMES[8])?,
                error_string: get(lib, SYMBOL_NAMES[9])?,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every symbol name is declared in the header, and the structs have the C layout the
    /// header implies on a 64-bit target.
    #[test]
    fn symbols_and_layouts_match_header() {
        let h = include_str!("../include/kiln.h");
        for name in SYMBOL_NAMES {
            assert!(
                h.contains(&format!("{name}(")),
                "{name} not declared in kiln.h"
            );
        }
        if cfg!(target_pointer_width = "64") {
            assert_eq!(std::mem::size_of::<RawTensorInfo>(), 72);
            assert_eq!(std::mem::size_of::<RawHost>(), 24);
            assert_eq!(std::mem::offset_of!(RawHost, user), 8);
            assert_eq!(std::mem::offset_of!(RawHost, parallel_for), 16);
        }
    }
}
