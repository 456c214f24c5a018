//! kiln-runtime: the part of Kiln an app links. It owns the C ABI of Kiln artifacts
//! (`include/kiln.h`, mirrored here as constants) and, with the codegen work (issue 3), the
//! loader that `dlopen`s an artifact, checks ABI version, target and CPU features before the
//! first run, and the thread pool behind `parallel_for`. It depends on no other Kiln crate.

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
