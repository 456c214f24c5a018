//! The IR verifier: checks the structural invariants listed in the `ir` module doc (single
//! definition, defined uses, acyclicity, edges matching inputs, unique names, constant sizes).
//! Tests run it after import and after every pass.

use super::{Graph, ValueDef, ValueId};
use std::collections::HashSet;
use thiserror::Error;

#[derive(Debug, Error, PartialEq)]
pub enum VerifyError {
    #[error("node '{node}' reads '{value}', which nothing defines")]
    UndefinedInput { node: String, value: String },
    #[error("graph output '{0}' is not defined by any node, input or constant")]
    UndefinedOutput(String),
    #[error("value name '{0}' is defined more than once")]
    DuplicateName(String),
    #[error("the graph has a cycle through nodes {0}")]
    Cycle(String),
    #[error(
        "value '{value}' claims to be output {index} of node '{node}', which does not produce it"
    )]
    BadDefinition {
        value: String,
        node: String,
        index: usize,
    },
    #[error("constant '{name}' has {got} bytes, its type {ty} needs {want}")]
    ConstantSize {
        name: String,
        ty: String,
        got: usize,
        want: usize,
    },
    #[error("the edges of node '{0}' do not match its inputs")]
    StaleEdges(String),
}

pub fn verify(g: &Graph) -> Result<(), VerifyError> {
    let defined = |v: ValueId| -> bool {
        match &g.value(v).def {
            ValueDef::Input(_) | ValueDef::Const(_) => true,
            ValueDef::Node(n, _) => g.nodes.contains_node(*n),
            ValueDef::Undefined => false,
        }
    };
    let mut names = HashSet::new();
    let mut check_name = |v: ValueId| -> Result<(), VerifyError> {
        let name = &g.value(v).name;
        if !names.insert(name.clone()) {
            return Err(VerifyError::DuplicateName(name.clone()));
        }
        Ok(())
    };
    for &i in &g.inputs {
        check_name(i)?;
    }
    for id in g.nodes.node_indices() {
        let n = &g.nodes[id];
        for (k, &o) in n.outputs.iter().enumerate() {
            check_name(o)?;
            if g.value(o).def != ValueDef::Node(id, k) {
                return Err(VerifyError::BadDefinition {
                    value: g.value(o).name.clone(),
                    node: n.name.clone(),
                    index: k,
                });
            }
        }
        for &v in n.inputs.iter().flatten() {
            if !defined(v) {
                return Err(VerifyError::UndefinedInput {
                    node: n.name.clone(),
                    value: g.value(v).name.clone(),
                });
            }
        }
        let mut want: Vec<ValueId> = n
            .inputs
            .iter()
            .flatten()
            .copied()
            .filter(|&v| matches!(g.value(v).def, ValueDef::Node(..)))
            .collect();
        let mut have: Vec<ValueId> = g
            .nodes
            .edges_directed(id, petgraph::Direction::Incoming)
            .map(|e| *e.weight())
            .collect();
        want.sort();
        have.sort();
        if want != have {
            return Err(VerifyError::StaleEdges(n.name.clone()));
        }
    }
    for &o in &g.outputs {
        if !defined(o) {
            return Err(VerifyError::UndefinedOutput(g.value(o).name.clone()));
        }
    }
    for v in &g.values {
        if let ValueDef::Const(c) = &v.def {
            let want = c.dtype.storage_bytes(c.numel());
            if c.bytes.len() != want {
                return Err(VerifyError::ConstantSize {
                    name: v.name.clone(),
                    ty: super::printer::type_str(&v.ty),
                    got: c.bytes.len(),
                    want,
                });
            }
        }
    }
    g.topo_order()
        .map_err(|e| VerifyError::Cycle(e.nodes.join(", ")))?;
    Ok(())
}
