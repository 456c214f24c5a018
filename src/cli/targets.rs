//! `kiln targets`: the target table of kiln-targets.

use anyhow::Result;
use kiln_targets::{Vectors, TARGETS};
use std::process::ExitCode;

pub fn run() -> Result<ExitCode> {
    println!(
        "{:<22} {:<18} {:<14} description",
        "target", "requires", "vectors"
    );
    for t in TARGETS {
        let v = match t.vectors {
            Vectors::Fixed(b) => format!("{b}-bit"),
            Vectors::Scalable { min_bits } => format!(">={min_bits}-bit VLA"),
            Vectors::Warp(n) => format!("warp {n}"),
        };
        println!(
            "{:<22} {:<18} {:<14} {}",
            t.name,
            t.required_features.join(","),
            v,
            t.description
        );
    }
    println!("(code generators today: x86_64, aarch64-neon, aarch64-neon-dotprod; aarch64-sve and cuda-sm80 are described but have no code generator yet)");
    Ok(ExitCode::SUCCESS)
}
