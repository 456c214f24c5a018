//! What this host can run: the Kiln target names ("x86_64", "x86_64-v3", "x86_64-v3-vnni",
//! "aarch64-neon",
//! "aarch64-neon-dotprod", "aarch64-sve", "cuda-sm80"), the CPU feature names an artifact may
//! require ("sse4.1", "avx2", "neon", "dotprod", "sve", ...), run-time detection of those
//! features with `std::arch`, and [`check_compatible`], which decides whether an artifact's
//! target and feature list can run here and otherwise says why ([`Incompatible`]). Features of
//! the other architecture are known but absent; names that are not in the tables are
//! refused, because guessing could end in an illegal instruction.

use thiserror::Error;

/// The Kiln target names, as `kiln_target()` reports them.
pub const KNOWN_TARGETS: [&str; 7] = [
    "x86_64",
    "x86_64-v3",
    "x86_64-v3-vnni",
    "aarch64-neon",
    "aarch64-neon-dotprod",
    "aarch64-sve",
    "cuda-sm80",
];

/// Feature names an x86_64 artifact may require.
pub const X86_64_FEATURES: [&str; 15] = [
    "sse2",
    "sse3",
    "ssse3",
    "sse4.1",
    "sse4.2",
    "popcnt",
    "avx",
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512vnni",
    "avxvnni",
];

/// Feature names an aarch64 artifact may require ("asimd" is another name for "neon").
pub const AARCH64_FEATURES: [&str; 9] = [
    "neon", "asimd", "fp16", "rdm", "dotprod", "i8mm", "bf16", "sve", "sve2",
];

/// The host architecture in Kiln's spelling ("x86_64", "aarch64", or Rust's name for others).
pub fn host_arch() -> &'static str {
    std::env::consts::ARCH
}

/// Why an artifact cannot run on this host.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum Incompatible {
    #[error("artifact was built for target {target}, but this host is {host}")]
    WrongTarget { target: String, host: &'static str },
    #[error(
        "artifact targets {target}, a CUDA GPU; this CPU runtime cannot run CUDA artifacts yet"
    )]
    Cuda { target: String },
    #[error("unknown target {target:?} (known targets: {})", KNOWN_TARGETS.join(", "))]
    UnknownTarget { target: String },
    #[error(
        "artifact needs CPU feature {feature}, which this {host} CPU lacks; running it would \
         crash with an illegal instruction"
    )]
    MissingFeature { feature: String, host: &'static str },
    #[error(
        "artifact needs unknown CPU feature {feature:?} (known: {}); refusing to run it, since \
         a missing feature would crash with an illegal instruction",
        known_features()
    )]
    UnknownFeature { feature: String },
}

fn known_features() -> String {
    let mut all: Vec<&str> = X86_64_FEATURES.to_vec();
    all.extend(AARCH64_FEATURES);
    all.join(", ")
}

/// Whether this CPU has a feature.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FeatureStatus {
    Present,
    /// A known feature this CPU lacks (including every feature of the other architecture).
    Absent,
    /// A name that is in neither feature table.
    Unknown,
}

/// Detects one feature on this CPU.
pub fn feature_status(name: &str) -> FeatureStatus {
    match detect(name) {
        Some(true) => FeatureStatus::Present,
        Some(false) => FeatureStatus::Absent,
        None if X86_64_FEATURES.contains(&name) || AARCH64_FEATURES.contains(&name) => {
            FeatureStatus::Absent
        }
        None => FeatureStatus::Unknown,
    }
}

/// `Some(present)` for a feature of the host architecture, `None` otherwise.
#[cfg(target_arch = "x86_64")]
fn detect(name: &str) -> Option<bool> {
    Some(match name {
        "sse2" => std::arch::is_x86_feature_detected!("sse2"),
        "sse3" => std::arch::is_x86_feature_detected!("sse3"),
        "ssse3" => std::arch::is_x86_feature_detected!("ssse3"),
        "sse4.1" => std::arch::is_x86_feature_detected!("sse4.1"),
        "sse4.2" => std::arch::is_x86_feature_detected!("sse4.2"),
        "popcnt" => std::arch::is_x86_feature_detected!("popcnt"),
        "avx" => std::arch::is_x86_feature_detected!("avx"),
        "avx2" => std::arch::is_x86_feature_detected!("avx2"),
        "fma" => std::arch::is_x86_feature_detected!("fma"),
        "f16c" => std::arch::is_x86_feature_detected!("f16c"),
        "avx512f" => std::arch::is_x86_feature_detected!("avx512f"),
        "avx512bw" => std::arch::is_x86_feature_detected!("avx512bw"),
        "avx512vl" => std::arch::is_x86_feature_detected!("avx512vl"),
        "avx512vnni" => std::arch::is_x86_feature_detected!("avx512vnni"),
        "avxvnni" => std::arch::is_x86_feature_detected!("avxvnni"),
        _ => return None,
    })
}

/// `Some(present)` for a feature of the host architecture, `None` otherwise.
#[cfg(target_arch = "aarch64")]
fn detect(name: &str) -> Option<bool> {
    Some(match name {
        "neon" | "asimd" => std::arch::is_aarch64_feature_detected!("neon"),
        "fp16" => std::arch::is_aarch64_feature_detected!("fp16"),
        "rdm" => std::arch::is_aarch64_feature_detected!("rdm"),
        "dotprod" => std::arch::is_aarch64_feature_detected!("dotprod"),
        "i8mm" => std::arch::is_aarch64_feature_detected!("i8mm"),
        "bf16" => std::arch::is_aarch64_feature_detected!("bf16"),
        "sve" => std::arch::is_aarch64_feature_detected!("sve"),
        "sve2" => std::arch::is_aarch64_feature_detected!("sve2"),
        _ => return None,
    })
}

/// `Some(present)` for a feature of the host architecture, `None` otherwise.
#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
fn detect(_name: &str) -> Option<bool> {
    None
}

/// Splits a `kiln_required_features()` string ("neon, dotprod") into names: trimmed, empty
/// items dropped, duplicates removed, order kept.
pub fn parse_features(list: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for f in list.split(',').map(str::trim).filter(|f| !f.is_empty()) {
        if !out.iter().any(|o| o == f) {
            out.push(f.to_string());
        }
    }
    out
}

/// The architecture a target runs on and the features its name implies.
fn target_arch_and_features(
    target: &str,
) -> Result<(&'static str, &'static [&'static str]), Incompatible> {
    Ok(match target {
        "x86_64" => ("x86_64", &[]),
        "x86_64-v3" => ("x86_64", &["avx", "avx2", "fma", "f16c"]),
        "x86_64-v3-vnni" => ("x86_64", &["avx", "avx2", "fma", "f16c", "avxvnni"]),
        "aarch64-neon" => ("aarch64", &["neon"]),
        "aarch64-neon-dotprod" => ("aarch64", &["neon", "dotprod"]),
        "aarch64-sve" => ("aarch64", &["sve"]),
        t if t.starts_with("cuda-") => {
            return Err(Incompatible::Cuda {
                target: t.to_string(),
            })
        }
        t => {
            return Err(Incompatible::UnknownTarget {
                target: t.to_string(),
            })
        }
    })
}

/// Checks that an artifact with this target and these required features can run on this
/// host: the target's architecture is the host's, and every required feature (and every
/// feature the target name implies) is present on this CPU.
pub fn check_compatible(target: &str, features: &[String]) -> Result<(), Incompatible> {
    let (arch, implied) = target_arch_and_features(target)?;
    let host = host_arch();
    if arch != host {
        return Err(Incompatible::WrongTarget {
            target: target.to_string(),
            host,
        });
    }
    let required = features
        .iter()
        .map(String::as_str)
        .chain(implied.iter().copied());
    for feature in required {
        match feature_status(feature) {
            FeatureStatus::Present => {}
            FeatureStatus::Absent => {
                return Err(Incompatible::MissingFeature {
                    feature: feature.to_string(),
                    host,
                })
            }
            FeatureStatus::Unknown => {
                return Err(Incompatible::UnknownFeature {
                    feature: feature.to_string(),
                })
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn features_parse() {
        assert_eq!(parse_features(""), Vec::<String>::new());
        assert_eq!(
            parse_features(" neon, dotprod,,neon "),
            vec!["neon", "dotprod"]
        );
    }

    #[test]
    fn host_target_and_features() {
        let (good, other, own_feature, other_feature) = if cfg!(target_arch = "x86_64") {
            ("x86_64", "aarch64-neon", "sse2", "sve")
        } else {
            ("aarch64-neon", "x86_64", "neon", "avx2")
        };
        let f = |s: &str| parse_features(s);
        assert_eq!(check_compatible(good, &f(own_feature)), Ok(()));
        let cases: &[(&str, &str, &str)] = &[
            (other, "", "but this host is"),
            ("cuda-sm80", "", "cannot run CUDA artifacts"),
            ("riscv64", "", "unknown target \"riscv64\""),
            (good, other_feature, "which this"),
            (good, "frobnicate", "unknown CPU feature \"frobnicate\""),
        ];
        for (target, features, want) in cases {
            let err = check_compatible(target, &f(features))
                .expect_err(target)
                .to_string();
            assert!(err.contains(want), "{target}/{features}: {err}");
        }
    }

    /// Every known CPU target names its architecture, and the x86-64 profiles are accepted
    /// exactly when the host has the features their names imply.
    #[test]
    fn known_targets_imply_their_features() {
        for t in KNOWN_TARGETS.iter().filter(|t| !t.starts_with("cuda-")) {
            assert!(target_arch_and_features(t).is_ok(), "{t}");
        }
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            let v3 = has!("avx") && has!("avx2") && has!("fma") && has!("f16c");
            let profiles = [
                ("x86_64", true),
                ("x86_64-v3", v3),
                ("x86_64-v3-vnni", v3 && has!("avxvnni")),
            ];
            for (target, runs) in profiles {
                assert_eq!(check_compatible(target, &[]).is_ok(), runs, "{target}");
            }
        }
    }
}
