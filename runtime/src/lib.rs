//! kiln-runtime: the part of Kiln an app links. It owns the C ABI of Kiln artifacts
//! (`include/kiln.h`, mirrored in `abi` and in the constants below), the loader
//! ([`Model::load`]: `dlopen`, symbol resolution, and the ABI-version, target and CPU-feature
//! checks that refuse an artifact before it could crash on an illegal instruction), sessions
//! that run a model ([`Session`]: aligned workspace, buffer checks, status messages), and the
//! thread pool behind the `parallel_for` of the `kiln_host` table ([`ThreadPool`]). It
//! depends on no other Kiln crate. `c/kiln_run.c` is the same loader written in plain C.

pub mod abi;
pub mod cpu;
mod model;
mod pool;
mod session;
pub mod tensor;

pub use cpu::Incompatible;
pub use model::{LoadError, Model};
pub use pool::ThreadPool;
pub use session::{RunError, Session, SessionError, WORKSPACE_ALIGN};
pub use tensor::TensorInfo;

/// The ABI version an artifact must report from `kiln_abi_version()`; see include/kiln.h.
pub const ABI_VERSION: u32 = 1;

/// `kiln_run` status codes, as in include/kiln.h.
pub mod status {
    pub const OK: i32 = 0;
    pub const BAD_ARGUMENT: i32 = 1;
    pub const HOST: i32 = 2;
}

#[cfg(test)]
mod tests {
    /// Apps may load a model once and run sessions on several threads.
    #[test]
    fn thread_safety() {
        fn send_sync<T: Send + Sync>() {}
        fn send<T: Send>() {}
        send_sync::<super::Model>();
        send_sync::<super::ThreadPool>();
        send::<super::Session<'static>>();
    }

    /// The Rust constants and the C header must agree.
    #[test]
    fn header_matches_constants() {
        let h = include_str!("../include/kiln.h");
        assert!(h.contains(&format!("#define KILN_ABI_VERSION {}u", super::ABI_VERSION)));
        assert!(h.contains(&format!("#define KILN_OK {}", super::status::OK)));
        assert!(h.contains(&format!(
            "#define KILN_ERR_BAD_ARGUMENT {}",
            super::status::BAD_ARGUMENT
        )));
        assert!(h.contains(&format!("#define KILN_ERR_HOST {}", super::status::HOST)));
    }
}
