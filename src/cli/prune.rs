//! Structured pruning as `kiln compile` runs it: optional calibration for the activation
//! criterion (the same samples as quantization: input sets or token windows, run through the
//! reference interpreter with a progress bar), the pruning pass, and the report: every
//! structure pruned with its parameters and FLOPs before and after, every structure left
//! alone and every candidate skipped, with the reason, and the totals.

use crate::cli::inspect::thousands;
use crate::config::PruneSettings;
use anyhow::{Context, Result};
use kiln_compiler::ir::Graph;
use kiln_passes::prune::{collect_channel_norms, find_structures, Criterion, Norm, Prune};

/// Applies `p` to the graph (after shape inference) and prints the report.
pub fn apply(g: &mut Graph, p: &PruneSettings) -> Result<()> {
    let found = find_structures(g);
    let activations = match (p.options.criterion, &p.calibration) {
        (Criterion::Activation, Some(path)) => {
            let samples = super::quantize::load_calibration(g, path, p.calibration_samples)?;
            let sinks: Vec<(String, usize)> = found
                .0
                .iter()
                .flat_map(|s| s.sinks.iter())
                .map(|k| (g.nodes[k.node].name.clone(), k.axis))
                .collect();
            let bar = super::quantize::progress(samples.len() as u64, "calibration");
            let norms = collect_channel_norms(g, &samples, &sinks, &mut || bar.inc(1))
                .map_err(anyhow::Error::msg)
                .with_context(|| format!("calibrating on {}", path.display()))?;
            bar.finish_and_clear();
            println!(
                "  calibration: {} samples from {}",
                samples.len(),
                path.display()
            );
            Some(norms)
        }
        _ => None,
    };
    let pass = Prune {
        options: p.options.clone(),
        activations,
    };
    let r = pass.prune_found(g, found)?;
    println!(
        "  criterion: {}{}, widths rounded to multiples of {}",
        p.options.criterion.name(),
        if p.options.criterion == Criterion::Magnitude {
            match p.options.norm {
                Norm::L1 => " (L1)",
                Norm::L2 => " (L2)",
            }
        } else {
            ""
        },
        p.options.multiple
    );
    for s in &r.pruned {
        println!(
            "  pruned {} {}: {} -> {} {}{} (width {} -> {}), params {} -> {}, FLOPs {} -> {}{}",
            s.kind.key(),
            s.name,
            s.units_before,
            s.units_after,
            s.unit,
            s.query_heads
                .map(|(a, b)| format!(" ({a} -> {b} query heads)"))
                .unwrap_or_default(),
            s.width_before,
            s.width_after,
            thousands(s.params_before),
            thousands(s.params_after),
            flops(s.flops_before),
            flops(s.flops_after),
            s.note
                .as_ref()
                .map(|n| format!(" ({n})"))
                .unwrap_or_default()
        );
    }
    for (name, why) in &r.untouched {
        println!("  left {name}: {why}");
    }
    for s in &r.skipped {
        println!(
            "  skipped {} ({}): {}",
            s.seed,
            if s.weights.is_empty() {
                "-".to_string()
            } else {
                s.weights.join(", ")
            },
            s.reason
        );
    }
    let pct = |a: u64, b: u64| {
        if a == 0 {
            0.0
        } else {
            100.0 * (a as f64 - b as f64) / a as f64
        }
    };
    println!(
        "  parameters: {} -> {} (-{:.1}%); FLOPs of matrix products and convolutions: {} -> {} (-{:.1}%)",
        thousands(r.params_before),
        thousands(r.params_after),
        pct(r.params_before, r.params_after),
        flops(r.flops_before),
        flops(r.flops_after),
        pct(r.flops_before, r.flops_after)
    );
    println!(
        "  structures: {} pruned, {} left, {} skipped",
        r.pruned.len(),
        r.untouched.len(),
        r.skipped.len()
    );
    Ok(())
}

/// `1.23 GFLOP`-style.
fn flops(n: u64) -> String {
    let v = n as f64;
    if v >= 1e9 {
        format!("{:.2} G", v / 1e9)
    } else if v >= 1e6 {
        format!("{:.2} M", v / 1e6)
    } else if v >= 1e3 {
        format!("{:.2} K", v / 1e3)
    } else {
        format!("{n}")
    }
}
