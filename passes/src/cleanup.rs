//! Clean-up passes: removing copies (`Identity`, inference-mode `Dropout`) and nodes whose
//! outputs nothing reads. They keep graph outputs' names: a copy that produces a graph output
//! stays.

use crate::{Pass, PassError, PassReport};
use kiln_compiler::ir::{NodeId, Op, ValueDef};
use kiln_compiler::Graph;
use std::collections::HashSet;

/// Forwards the input of `Identity` and single-output inference `Dropout` nodes to their
/// consumers and removes the node.
pub struct EliminateIdentity;

impl Pass for EliminateIdentity {
    fn name(&self) -> &'static str {
        "eliminate-identity"
    }

    fn run(&self, g: &mut Graph) -> Result<PassReport, PassError> {
        let mut report = PassReport::default();
        let ids: Vec<NodeId> = g.nodes.node_indices().collect();
        for id in ids {
            let n = &g.nodes[id];
            let copy = matches!(n.op, Op::Identity)
                || (matches!(n.op, Op::Dropout) && n.outputs.len() == 1);
            let (Some(Some(src)), [out]) = (n.inputs.first().copied(), n.outputs.as_slice()) else {
                continue;
            };
            let out = *out;
            if !copy || g.outputs.contains(&out) {
                continue;
            }
            let name = n.name.clone();
            g.remove_node(id);
            g.replace_uses(out, src);
            report.changed = true;
            report.notes.push(format!("removed {name}"));
        }
        Ok(report)
    }
}

/// Removes nodes none of whose outputs reach a graph output.
pub struct DeadCodeElimination;

impl Pass for DeadCodeElimination {
    fn name(&self) -> &'static str {
        "dead-code-elimination"
    }

    fn run(&self, g: &mut Graph) -> Result<PassReport, PassError> {
        let mut live: HashSet<NodeId> = HashSet::new();
        let mut stack: Vec<NodeId> = g
            .outputs
            .iter()
            .filter_map(|&v| {
                if let ValueDef::Node(n, _) = g.value(v).def {
                    Some(n)
                } else {
                    None
                }
            })
            .collect();
        while let Some(n) = stack.pop() {
            if !live.insert(n) {
                continue;
            }
            for v in g.nodes[n].inputs.iter().flatten() {
                if let ValueDef::Node(p, _) = g.value(*v).def {
                    stack.push(p);
                }
            }
        }
        let dead: Vec<NodeId> = g
            .nodes
            .node_indices()
            .filter(|n| !live.contains(n))
            .collect();
        let mut report = PassReport::default();
        for id in dead {
            if let Some(n) = g.remove_node(id) {
                report.notes.push(format!("removed {}", n.name));
                report.changed = true;
            }
        }
        Ok(report)
    }
}
