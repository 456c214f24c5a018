//! `kiln targets`: the target table of kiln-targets.

use anyhow::Result;
use kiln_targets::{Vectors, TARGETS};
use std::process::ExitCode;

pub fn run() -> Result<ExitCode> {
    println!(
        "{:<22} {:<22} {:<14} description",
        "target", "requires", "vectors"
    );
    for t in TARGETS {
        let v = match t.vectors {
            Vectors::Fixed(b) => format!("{b}-bit"),
            Vectors::Scalable { min_bits } => format!(">={min_bits}-bit VLA"),
            Vectors::Warp(n) => format!("warp {n}"),
        };
        println!(
            "{:<22} {:<22} {:<14} {}",
            t.name,
            t.required_features.join(","),
            v,
            t.description
        );
    }
    let (with, without): (Vec<_>, Vec<_>) = TARGETS
        .iter()
        .partition(|t| kiln_targets::codegen::make_isa(t).is_ok());
    let names =
        |ts: &[&kiln_targets::Target]| ts.iter().map(|t| t.name).collect::<Vec<_>>().join(", ");
    println!(
        "(code generators today: {}; {} described but without a code generator yet)",
        names(&with),
        names(&without)
    );
    Ok(ExitCode::SUCCESS)
}
