//! The stable text form of a graph, used by snapshot tests and `kiln inspect --graph`.
//! Values print as `%name: dtype[dims]`; constants with up to 8 elements print their values,
//! larger ones their size; nodes print in topological order as `outputs = Op(inputs)` with the
//! typed attributes in Rust debug form.

use super::{Dim, Graph, ValueDef, ValueId, ValueType};
use std::fmt::Write;

pub fn type_str(ty: &ValueType) -> String {
    let dt = ty.dtype.map(|d| d.name()).unwrap_or("?");
    match &ty.shape {
        None => format!("{dt}[?]"),
        Some(dims) => {
            let d: Vec<String> = dims
                .iter()
                .map(|d| match d {
                    Dim::Fixed(n) => n.to_string(),
                    Dim::Symbolic(s) => s.clone(),
                    Dim::Unknown => "?".into(),
                })
                .collect();
            format!("{dt}[{}]", d.join(","))
        }
    }
}

fn value_str(g: &Graph, v: ValueId) -> String {
    let val = g.value(v);
    format!("%{}: {}", val.name, type_str(&val.ty))
}

/// Prints the whole graph. Fails only on a cyclic graph, which it prints as such.
pub fn print_graph(g: &Graph) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "graph {} {{",
        if g.name.is_empty() { "main" } else { &g.name }
    );
    for &i in &g.inputs {
        let _ = writeln!(s, "  in {}", value_str(g, i));
    }
    let mut used = vec![false; g.values.len()];
    for n in g.nodes.node_weights() {
        for v in n.inputs.iter().flatten() {
            used[v.0 as usize] = true;
        }
    }
    for &o in &g.outputs {
        used[o.0 as usize] = true;
    }
    for (i, val) in g.values.iter().enumerate() {
        if let (true, ValueDef::Const(c)) = (used[i], &val.def) {
            let body = if c.numel() <= 8 {
                let t = c.to_tensor();
                let vals: Vec<String> = t.to_f64_vec().iter().map(|x| format!("{x}")).collect();
                format!("[{}]", vals.join(", "))
            } else {
                format!("<{} bytes>", c.bytes.len())
            };
            let _ = writeln!(s, "  const {} = {}", value_str(g, ValueId(i as u32)), body);
        }
    }
    match g.topo_order() {
        Ok(order) => {
            for id in order {
                let n = &g.nodes[id];
                let outs: Vec<String> = n.outputs.iter().map(|&o| value_str(g, o)).collect();
                let ins: Vec<String> = n
                    .inputs
                    .iter()
                    .map(|i| match i {
                        Some(v) => format!("%{}", g.value(*v).name),
                        None => "_".into(),
                    })
                    .collect();
                let _ = writeln!(s, "  {} = {:?}({})", outs.join(", "), n.op, ins.join(", "));
            }
        }
        Err(e) => {
            let _ = writeln!(s, "  <cycle through {}>", e.nodes.join(", "));
        }
    }
    let outs: Vec<String> = g
        .outputs
        .iter()
        .map(|&o| format!("%{}", g.value(o).name))
        .collect();
    let _ = writeln!(s, "  out {}", outs.join(", "));
    s.push_str("}\n");
    s
}
