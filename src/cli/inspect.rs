//! `kiln inspect`: a human-readable summary of an ONNX model (works on models Kiln cannot
//! import, listing every unsupported operator), optionally the imported graph and the
//! inferred static shapes; or of a compiled artifact (target, parameter count, weight bytes,
//! inputs and outputs, read from its `kiln_model_info` symbol).

use anyhow::{Context, Result};
use kiln_compiler::{ir, onnx, shape};
use std::path::Path;
use std::process::ExitCode;

fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

pub fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

pub fn run(path: &Path, show_graph: bool, dims: &[String], shapes: bool) -> Result<ExitCode> {
    let mut magic = [0u8; 4];
    let is_elf = std::fs::File::open(path)
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic))
        .is_ok()
        && magic == *b"\x7fELF";
    if is_elf {
        return inspect_artifact(path);
    }
    let s = onnx::summarize(path).with_context(|| format!("{}", path.display()))?;
    println!("model: {}", path.display());
    let opsets: Vec<String> = s
        .opsets
        .iter()
        .map(|(d, v)| format!("{} {v}", if d.is_empty() { "ai.onnx" } else { d }))
        .collect();
    println!(
        "  ir_version {}, producer '{}', opsets: {}",
        s.ir_version,
        s.producer,
        opsets.join(", ")
    );
    println!("inputs:");
    for (n, t) in &s.inputs {
        println!("  {n}: {t}");
    }
    println!("outputs:");
    for (n, t) in &s.outputs {
        println!("  {n}: {t}");
    }
    println!("nodes: {}", s.node_count);
    println!("ops ({} kinds):", s.op_histogram.len());
    for (op, c) in &s.op_histogram {
        println!("  {op:<28} {c}");
    }
    let total_n: u64 = s.params_by_dtype.values().map(|v| v.0).sum();
    let total_b: u64 = s.params_by_dtype.values().map(|v| v.1).sum();
    println!(
        "parameters: {} ({})",
        thousands(total_n),
        human_bytes(total_b)
    );
    for (dt, (n, b)) in &s.params_by_dtype {
        println!(
            "  {dt:<6} {:>15} elements {:>15} bytes",
            thousands(*n),
            thousands(*b)
        );
    }
    if !s.external_files.is_empty() {
        println!("external data: {}", s.external_files.join(", "));
    }
    if !s.unsupported.is_empty() {
        println!("unsupported operators ({}):", s.unsupported.len());
        for u in &s.unsupported {
            println!("  {u}");
        }
        return Ok(ExitCode::FAILURE);
    }
    println!("unsupported operators: none");
    if show_graph || shapes {
        let mut model = onnx::load_model(path).with_context(|| format!("{}", path.display()))?;
        if shapes {
            let bindings = super::parse_dims(dims)?;
            shape::bind_dims(&mut model.graph, &bindings)?;
            shape::infer(&mut model.graph)?;
            ir::verify::verify(&model.graph)?;
        }
        print!("{}", ir::printer::print_graph(&model.graph));
    }
    Ok(ExitCode::SUCCESS)
}

/// The `key value` lines of an artifact's `kiln_model_info` symbol, and the file's size.
pub fn model_info(path: &Path) -> Result<(Vec<(String, String)>, usize)> {
    use object::{Object, ObjectSection, ObjectSymbol};
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let file = object::File::parse(&*bytes)
        .map_err(|e| anyhow::anyhow!("{}: not a readable ELF file: {e}", path.display()))?;
    let sym = file
        .symbols()
        .find(|s| s.name() == Ok(kiln_targets::MODEL_INFO_SYMBOL))
        .ok_or_else(|| {
            anyhow::anyhow!(
                "{}: no {} symbol (not a Kiln artifact, or one from an older Kiln)",
                path.display(),
                kiln_targets::MODEL_INFO_SYMBOL
            )
        })?;
    let text = sym
        .section_index()
        .and_then(|i| file.section_by_index(i).ok())
        .and_then(|sec| {
            let data = sec.data().ok()?;
            let start = usize::try_from(sym.address().checked_sub(sec.address())?).ok()?;
            let end = start.checked_add(usize::try_from(sym.size()).ok()?)?;
            std::str::from_utf8(data.get(start..end)?).ok()
        })
        .ok_or_else(|| anyhow::anyhow!("{}: unreadable model info", path.display()))?;
    let lines = text
        .lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    Ok((lines, bytes.len()))
}

/// Summarizes a compiled artifact from its `kiln_model_info` symbol.
fn inspect_artifact(path: &Path) -> Result<ExitCode> {
    let (info, size) = model_info(path)?;
    println!("artifact: {} ({size} bytes)", path.display());
    for (key, value) in &info {
        let (key, value) = (key.as_str(), value.as_str());
        let count = || value.parse::<u64>().unwrap_or_default();
        match key {
            "kiln_model_info" => {}
            "parameters" => println!("parameters: {}", thousands(count())),
            "weight_bytes" => {
                println!("weights: {} ({})", thousands(count()), human_bytes(count()))
            }
            _ => println!("{key}: {value}"),
        }
    }
    Ok(ExitCode::SUCCESS)
}
