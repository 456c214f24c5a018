//! The graph IR: values (graph inputs, constants, node outputs) with their types, and nodes
//! holding a typed [`Op`]. Nodes live in a petgraph `StableDiGraph` whose edges run from a
//! producer to each consumer (one edge per consumed value), so node ids stay valid while
//! passes remove nodes. ONNX names of values and nodes are kept for reports and name globs.
//!
//! Invariants (checked by [`verify`]): every value is defined exactly once (graph input,
//! constant or the output of one node); every node input and graph output refers to a defined
//! value; the node graph is acyclic; the edge set matches the node inputs.

pub mod op;
pub mod printer;
pub mod verify;

pub use op::*;

use crate::dtype::DType;
use crate::tensor::Tensor;
use bytes::Bytes;
use petgraph::stable_graph::{NodeIndex, StableDiGraph};
use petgraph::visit::EdgeRef;
use petgraph::Direction;
use std::collections::{BTreeSet, HashMap};

/// Index of a value in [`Graph::values`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ValueId(pub u32);

pub type NodeId = NodeIndex<u32>;

/// One dimension of a value's shape.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Dim {
    Fixed(usize),
    /// A named dynamic dimension (ONNX `dim_param`), bound with `--dim NAME=VALUE`.
    Symbolic(String),
    /// A dimension nothing is known about (ONNX dim with neither value nor param).
    Unknown,
}

/// What is known about a value's type: its element type and, where known, its shape.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct ValueType {
    pub dtype: Option<DType>,
    pub shape: Option<Vec<Dim>>,
}

impl ValueType {
    pub fn fixed(dtype: DType, shape: &[usize]) -> ValueType {
        ValueType {
            dtype: Some(dtype),
            shape: Some(shape.iter().map(|&d| Dim::Fixed(d)).collect()),
        }
    }

    /// The shape if every dimension is fixed.
    pub fn static_shape(&self) -> Option<Vec<usize>> {
        self.shape
            .as_ref()?
            .iter()
            .map(|d| {
                if let Dim::Fixed(n) = d {
                    Some(*n)
                } else {
                    None
                }
            })
            .collect()
    }
}

/// Constant data in its raw little-endian byte layout (packed for 4-bit types). The bytes may
/// be a slice of the memory-mapped model or weights file: importing copies no weight.
#[derive(Clone, Debug, PartialEq)]
pub struct Constant {
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub bytes: Bytes,
}

impl Constant {
    pub fn from_tensor(t: &Tensor) -> Constant {
        Constant {
            dtype: t.dtype(),
            shape: t.shape.clone(),
            bytes: Bytes::from(t.to_le_bytes()),
        }
    }

    /// Decodes into a host tensor (one copy). The byte length was checked at construction.
    pub fn to_tensor(&self) -> Tensor {
        Tensor::from_le_bytes(self.dtype, self.shape.clone(), &self.bytes)
            .unwrap_or_else(|| unreachable!("constant byte length is checked when it is created"))
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// Where a value comes from.
#[derive(Clone, Debug, PartialEq)]
pub enum ValueDef {
    /// Graph input number `i`.
    Input(usize),
    Const(Constant),
    /// Output `1` of node `0`.
    Node(NodeId, usize),
    /// Not defined (yet): a node input referring to a name nothing produces is an error.
    Undefined,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Value {
    pub name: String,
    pub ty: ValueType,
    pub def: ValueDef,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    /// ONNX node name (may be empty in the source model; import fills a unique one).
    pub name: String,
    pub op: Op,
    /// Positional inputs; `None` is an omitted optional input.
    pub inputs: Vec<Option<ValueId>>,
    pub outputs: Vec<ValueId>,
}

#[derive(Clone, Debug, Default)]
pub struct Graph {
    pub name: String,
    pub values: Vec<Value>,
    pub nodes: StableDiGraph<Node, ValueId, u32>,
    pub inputs: Vec<ValueId>,
    pub outputs: Vec<ValueId>,
    /// Imported opsets, (domain, version), "" for the default domain.
    pub opsets: Vec<(String, i64)>,
    /// How imported nodes were written in ONNX, by node name: ONNX export writes a node whose
    /// typed op is still the imported one with its original op type and attributes.
    pub onnx_nodes: HashMap<String, OnnxNode>,
}

/// An imported node's ONNX form.
#[derive(Clone, Debug, PartialEq)]
pub struct OnnxNode {
    /// The typed op it was imported as.
    pub op: Op,
    pub domain: String,
    pub op_type: String,
    pub attributes: Vec<crate::proto::AttributeProto>,
}

/// A cycle in the node graph; the nodes are those left over by a topological sort.
#[derive(Debug, Clone, PartialEq)]
pub struct CycleError {
    pub nodes: Vec<String>,
}

impl Graph {
    pub fn value(&self, id: ValueId) -> &Value {
        &self.values[id.0 as usize]
    }

    pub fn value_mut(&mut self, id: ValueId) -> &mut Value {
        &mut self.values[id.0 as usize]
    }

    pub fn add_value(&mut self, name: impl Into<String>, ty: ValueType, def: ValueDef) -> ValueId {
        let id = ValueId(self.values.len() as u32);
        self.values.push(Value {
            name: name.into(),
            ty,
            def,
        });
        id
    }

    /// `base`, or `base1`, `base2`, ... : the first of them no value of the graph is named.
    pub fn fresh_name(&self, base: &str) -> String {
        let taken = |n: &str| self.values.iter().any(|v| v.name == n);
        if !taken(base) {
            return base.to_string();
        }
        (1..)
            .map(|i| format!("{base}{i}"))
            .find(|n| !taken(n))
            .unwrap_or_else(|| unreachable!("the integers are endless"))
    }

    pub fn add_constant(&mut self, name: impl Into<String>, c: Constant) -> ValueId {
        let ty = ValueType::fixed(c.dtype, &c.shape);
        self.add_value(name, ty, ValueDef::Const(c))
    }

    /// Adds a node, defining its outputs, and connects it to the producers of its inputs.
    pub fn add_node(&mut self, node: Node) -> NodeId {
        let outputs = node.outputs.clone();
        let inputs: Vec<ValueId> = node.inputs.iter().flatten().copied().collect();
        let id = self.nodes.add_node(node);
        for (i, v) in outputs.iter().enumerate() {
            self.value_mut(*v).def = ValueDef::Node(id, i);
        }
        for v in inputs {
            if let ValueDef::Node(p, _) = self.value(v).def {
                self.nodes.add_edge(p, id, v);
            }
        }
        id
    }

    /// Removes a node; its outputs become undefined.
    pub fn remove_node(&mut self, id: NodeId) -> Option<Node> {
        let node = self.nodes.remove_node(id)?;
        for v in &node.outputs {
            self.value_mut(*v).def = ValueDef::Undefined;
        }
        Some(node)
    }

    /// Recomputes every edge from the node inputs (after bulk edits such as import).
    pub fn rebuild_edges(&mut self) {
        self.nodes.clear_edges();
        let ids: Vec<NodeId> = self.nodes.node_indices().collect();
        for id in ids {
            let inputs: Vec<ValueId> = self.nodes[id].inputs.iter().flatten().copied().collect();
            for v in inputs {
                if let ValueDef::Node(p, _) = self.value(v).def {
                    if self.nodes.contains_node(p) {
                        self.nodes.add_edge(p, id, v);
                    }
                }
            }
        }
    }

    /// Replaces every use of `old` (node inputs and graph outputs) by `new`.
    pub fn replace_uses(&mut self, old: ValueId, new: ValueId) {
        let ids: Vec<NodeId> = self.nodes.node_indices().collect();
        for id in ids {
            for inp in self.nodes[id].inputs.iter_mut().flatten() {
                if *inp == old {
                    *inp = new;
                }
            }
        }
        for o in self.outputs.iter_mut() {
            if *o == old {
                *o = new;
            }
        }
        self.rebuild_edges();
    }

    /// The nodes consuming a value.
    pub fn consumers(&self, v: ValueId) -> Vec<NodeId> {
        let mut out: Vec<NodeId> = self
            .nodes
            .node_indices()
            .filter(|&n| self.nodes[n].inputs.iter().flatten().any(|&i| i == v))
            .collect();
        out.dedup();
        out
    }

    /// Nodes in a deterministic topological order: among ready nodes the oldest comes first,
    /// so an already sorted ONNX graph keeps its order.
    pub fn topo_order(&self) -> Result<Vec<NodeId>, CycleError> {
        let mut indegree: HashMap<NodeId, usize> = HashMap::new();
        for n in self.nodes.node_indices() {
            indegree.insert(n, self.nodes.edges_directed(n, Direction::Incoming).count());
        }
        let mut ready: BTreeSet<NodeId> = indegree
            .iter()
            .filter(|(_, &d)| d == 0)
            .map(|(&n, _)| n)
            .collect();
        let mut order = Vec::with_capacity(indegree.len());
        while let Some(n) = ready.pop_first() {
            order.push(n);
            for e in self.nodes.edges_directed(n, Direction::Outgoing) {
                let d = indegree
                    .get_mut(&e.target())
                    .expect("edge target is a node");
                *d -= 1;
                if *d == 0 {
                    ready.insert(e.target());
                }
            }
        }
        if order.len() != indegree.len() {
            let mut nodes: Vec<String> = indegree
                .iter()
                .filter(|(_, &d)| d > 0)
                .map(|(&n, _)| self.nodes[n].name.clone())
                .collect();
            nodes.sort();
            return Err(CycleError { nodes });
        }
        Ok(order)
    }

    /// The constant behind a value, if it is one.
    pub fn constant(&self, v: ValueId) -> Option<&Constant> {
        match &self.value(v).def {
            ValueDef::Const(c) => Some(c),
            _ => None,
        }
    }

    pub fn node_count(&self) -> usize {
        self.nodes.node_count()
    }

    /// The model's parameter count as a user counts it: every constant element in use, except
    /// that a `MatMulNBits` weight counts its K x N logical weights and its scales and zero
    /// points (quantization metadata) count nothing.
    pub fn logical_parameter_count(&self) -> u64 {
        let mut seen = vec![false; self.values.len()];
        let mut count = 0u64;
        for n in self.nodes.node_weights() {
            for (i, v) in n.inputs.iter().enumerate() {
                let Some(v) = *v else { continue };
                let ValueDef::Const(c) = &self.value(v).def else {
                    continue;
                };
                if std::mem::replace(&mut seen[v.0 as usize], true) {
                    continue;
                }
                count += match (&n.op, i) {
                    (Op::MatMulNBits { k, n, .. }, 1) => (*k * *n) as u64,
                    (Op::MatMulNBits { .. }, 2 | 3) => 0,
                    _ => c.numel() as u64,
                };
            }
        }
        count
    }

    /// Number of constant elements and bytes per dtype, over constants still in use.
    pub fn parameter_stats(&self) -> ParameterStats {
        let mut used = vec![false; self.values.len()];
        for n in self.nodes.node_weights() {
            for v in n.inputs.iter().flatten() {
                used[v.0 as usize] = true;
            }
        }
        for v in &self.outputs {
            used[v.0 as usize] = true;
        }
        let mut stats = ParameterStats::default();
        for (i, v) in self.values.iter().enumerate() {
            if let (true, ValueDef::Const(c)) = (used[i], &v.def) {
                stats.count += c.numel() as u64;
                let e = stats.by_dtype.entry(c.dtype).or_default();
                e.0 += c.numel() as u64;
                e.1 += c.bytes.len() as u64;
            }
        }
        stats
    }
}

#[derive(Debug, Default, Clone, PartialEq)]
pub struct ParameterStats {
    /// Total constant elements.
    pub count: u64,
    /// dtype -> (elements, bytes).
    pub by_dtype: std::collections::BTreeMap<DType, (u64, u64)>,
}
