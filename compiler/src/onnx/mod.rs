//! ONNX import: memory-maps a model file, decodes the protobuf without copying tensor payloads
//! (they stay `Bytes` slices of the mapping), resolves external data inside the model's folder,
//! turns every node into a typed [`Op`] according to the opset version the model imports, and
//! builds a verified [`Graph`]. All unsupported operators are reported at once.

pub mod export;
pub mod ops;
pub mod tensor_proto;

use crate::dtype::DType;
use crate::ir::*;
use crate::proto::{self, ModelProto};
use bytes::Bytes;
use prost::Message;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::Path;
use tensor_proto::{constant_from_proto, ExternalData};
use thiserror::Error;

/// One unsupported (domain, op, version) and the nodes that use it.
#[derive(Debug, Clone, PartialEq)]
pub struct UnsupportedOp {
    pub domain: String,
    pub op_type: String,
    pub version: i64,
    pub nodes: Vec<String>,
}

impl fmt::Display for UnsupportedOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let domain = if self.domain.is_empty() {
            "ai.onnx"
        } else {
            &self.domain
        };
        let shown: Vec<&str> = self.nodes.iter().take(5).map(|s| s.as_str()).collect();
        let more = if self.nodes.len() > 5 {
            format!(" and {} more", self.nodes.len() - 5)
        } else {
            String::new()
        };
        write!(
            f,
            "{domain}::{} v{} (nodes: {}{more})",
            self.op_type,
            self.version,
            shown.join(", ")
        )
    }
}

#[derive(Debug, Error)]
pub enum ImportError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("not a valid ONNX model (protobuf decoding failed: {0}); is the file truncated or not ONNX?")]
    Decode(String),
    #[error("not an ONNX model: {0}")]
    NotAModel(String),
    #[error("tensor '{name}': {reason}")]
    BadTensor { name: String, reason: String },
    #[error("tensor '{tensor}': external data {reason}")]
    ExternalData { tensor: String, reason: String },
    #[error("unsupported operators: {}", .0.iter().map(|u| u.to_string()).collect::<Vec<_>>().join("; "))]
    UnsupportedOps(Vec<UnsupportedOp>),
    #[error("node '{node}' ({op}): {reason}")]
    BadNode {
        node: String,
        op: String,
        reason: String,
    },
    #[error("node '{node}' reads '{input}', which no node, graph input or initializer produces")]
    UndefinedInput { node: String, input: String },
    #[error("value '{0}' is defined more than once (node outputs, graph inputs and initializers must have unique names)")]
    DuplicateDefinition(String),
    #[error("graph output '{0}' is not produced by any node, input or initializer")]
    UndefinedOutput(String),
    #[error("the graph has a cycle through nodes: {0}")]
    Cycle(String),
    #[error("{what} '{name}' has an unsupported type: {reason}")]
    BadType {
        what: &'static str,
        name: String,
        reason: String,
    },
}

/// An imported model: the graph plus the model-level metadata `kiln inspect` shows.
#[derive(Debug, Clone)]
pub struct Model {
    pub graph: Graph,
    pub ir_version: i64,
    pub producer: String,
}

/// Reads and imports a model file. The file is memory-mapped; external data is resolved
/// relative to its folder.
pub fn load_model(path: &Path) -> Result<Model, ImportError> {
    let io = |source| ImportError::Io {
        path: path.display().to_string(),
        source,
    };
    let file = std::fs::File::open(path).map_err(io)?;
    // SAFETY: read-only mapping of a file Kiln does not modify while the model is in use.
    let bytes = match unsafe { memmap2::Mmap::map(&file) } {
        Ok(map) => Bytes::from_owner(map),
        // Empty files cannot be mapped on every platform; read them instead.
        Err(_) => Bytes::from(std::fs::read(path).map_err(io)?),
    };
    let base = path.parent().map(|p| {
        if p.as_os_str().is_empty() {
            Path::new(".").to_path_buf()
        } else {
            p.to_path_buf()
        }
    });
    import_bytes(bytes, ExternalData::new(base))
}

/// Imports a model from bytes already in memory (external data is refused).
pub fn load_model_bytes(bytes: Vec<u8>) -> Result<Model, ImportError> {
    import_bytes(Bytes::from(bytes), ExternalData::new(None))
}

fn import_bytes(bytes: Bytes, mut ext: ExternalData) -> Result<Model, ImportError> {
    if bytes.is_empty() {
        return Err(ImportError::NotAModel("the file is empty".into()));
    }
    let model = ModelProto::decode(bytes).map_err(|e| ImportError::Decode(e.to_string()))?;
    let ir_version = model.ir_version.unwrap_or(0);
    let gp = model
        .graph
        .as_ref()
        .ok_or_else(|| ImportError::NotAModel("it has no graph".into()))?;
    if ir_version <= 0 {
        return Err(ImportError::NotAModel("ir_version is missing".into()));
    }
    let mut opsets: BTreeMap<String, i64> = BTreeMap::new();
    for o in &model.opset_import {
        let d = o.domain.clone().unwrap_or_default();
        let d = if d == "ai.onnx" { String::new() } else { d };
        opsets.insert(d, o.version.unwrap_or(0));
    }
    if model.opset_import.is_empty() {
        // IR version 2 models without opset_import imply opset 1.
        opsets.insert(String::new(), 1);
    }
    let graph = import_graph(gp, &opsets, &mut ext)?;
    Ok(Model {
        graph,
        ir_version,
        producer: model.producer_name.clone().unwrap_or_default(),
    })
}

fn value_type(what: &'static str, vi: &proto::ValueInfoProto) -> Result<ValueType, ImportError> {
    use proto::tensor_shape_proto::dimension::Value as D;
    use proto::type_proto::Value as T;
    let name = vi.name.clone().unwrap_or_default();
    let Some(tp) = vi.r#type.as_ref() else {
        return Ok(ValueType::default());
    };
    match &tp.value {
        Some(T::TensorType(t)) => {
            let code = t.elem_type.unwrap_or(0);
            let dtype = if code == 0 {
                None
            } else {
                Some(DType::from_onnx(code).ok_or_else(|| ImportError::BadType {
                    what,
                    name: name.clone(),
                    reason: format!("element type {} is not supported", DType::onnx_name(code)),
                })?)
            };
            let shape = t.shape.as_ref().map(|s| {
                s.dim
                    .iter()
                    .map(|d| match &d.value {
                        Some(D::DimValue(v)) if *v >= 0 => Dim::Fixed(*v as usize),
                        Some(D::DimParam(p)) if !p.is_empty() => Dim::Symbolic(p.clone()),
                        _ => Dim::Unknown,
                    })
                    .collect()
            });
            Ok(ValueType { dtype, shape })
        }
        None => Ok(ValueType::default()),
        Some(_) => Err(ImportError::BadType {
            what,
            name,
            reason: "only tensor values are supported (not sequences, maps or optionals)".into(),
        }),
    }
}

fn import_graph(
    gp: &proto::GraphProto,
    opsets: &BTreeMap<String, i64>,
    ext: &mut ExternalData,
) -> Result<Graph, ImportError> {
    let mut g = Graph {
        name: gp.name.clone().unwrap_or_default(),
        ..Default::default()
    };
    g.opsets = opsets.iter().map(|(d, v)| (d.clone(), *v)).collect();
    let mut by_name: HashMap<String, ValueId> = HashMap::new();

    let define = |g: &mut Graph,
                  by_name: &mut HashMap<String, ValueId>,
                  name: &str,
                  ty: ValueType,
                  def: ValueDef| {
        if by_name.contains_key(name) {
            return Err(ImportError::DuplicateDefinition(name.to_string()));
        }
        let id = g.add_value(name, ty, def);
        by_name.insert(name.to_string(), id);
        Ok(id)
    };

    // Initializers first: in old IR versions they are listed among the graph inputs too.
    for t in &gp.initializer {
        let c = constant_from_proto(t, ext)?;
        let name = t.name.clone().unwrap_or_default();
        define(
            &mut g,
            &mut by_name,
            &name,
            ValueType::fixed(c.dtype, &c.shape),
            ValueDef::Const(c),
        )?;
    }
    if !gp.sparse_initializer.is_empty() {
        return Err(ImportError::BadTensor {
            name: "sparse_initializer".into(),
            reason: "sparse initializers are not supported".into(),
        });
    }
    for vi in &gp.input {
        let name = vi.name.clone().unwrap_or_default();
        if by_name.contains_key(&name) {
            continue;
        }
        let ty = value_type("graph input", vi)?;
        let index = g.inputs.len();
        let id = define(&mut g, &mut by_name, &name, ty, ValueDef::Input(index))?;
        g.inputs.push(id);
    }
    let declared: HashMap<String, ValueType> = gp
        .value_info
        .iter()
        .chain(gp.output.iter())
        .filter_map(|vi| Some((vi.name.clone()?, value_type("value", vi).ok()?)))
        .collect();

    // Nodes: parse ops, collect all unsupported ones before failing.
    let mut unsupported: BTreeMap<(String, String, i64), Vec<String>> = BTreeMap::new();
    let mut parsed = Vec::with_capacity(gp.node.len());
    let mut node_names: HashMap<String, usize> = HashMap::new();
    for (i, n) in gp.node.iter().enumerate() {
        let op_type = n.op_type.clone().unwrap_or_default();
        let domain = n.domain.clone().unwrap_or_default();
        let domain = if domain == "ai.onnx" {
            String::new()
        } else {
            domain
        };
        let mut name = n
            .name
            .clone()
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| format!("{op_type}_{i}"));
        let count = node_names.entry(name.clone()).or_insert(0);
        *count += 1;
        if *count > 1 {
            name = format!("{name}__{}", *count - 1);
        }
        let version = opsets.get(&domain).copied();
        let attrs = ops::Attrs::new(n);
        let has_subgraph = n
            .attribute
            .iter()
            .any(|a| a.g.is_some() || !a.graphs.is_empty());
        let parsed_op = match version {
            None => Err(ops::OpError::Unsupported),
            Some(_) if has_subgraph => Err(ops::OpError::Unsupported),
            Some(v) if op_type == "Constant" => ops::constant_node_value(&attrs, ext).map(|t| {
                // Constant nodes become constants; `Identity` keeps the node structure.
                let _ = v;
                ParsedKind::Constant(t)
            }),
            Some(_)
                if op_type == "Dropout"
                    && domain.is_empty()
                    && n.input.len() > 2
                    && !n.input[2].is_empty() =>
            {
                // Training-mode Dropout draws random masks; Kiln implements inference only.
                Err(ops::OpError::Unsupported)
            }
            Some(v) => ops::parse_op(&domain, &op_type, v, &attrs).map(ParsedKind::Op),
        };
        match parsed_op {
            Ok(k) => parsed.push((name, n, k)),
            Err(ops::OpError::Unsupported) => {
                unsupported
                    .entry((domain, op_type, version.unwrap_or(0)))
                    .or_default()
                    .push(name);
            }
            Err(ops::OpError::BadAttribute(reason)) => {
                return Err(ImportError::BadNode {
                    node: name,
                    op: op_type,
                    reason,
                });
            }
        }
    }
    if !unsupported.is_empty() {
        return Err(ImportError::UnsupportedOps(
            unsupported
                .into_iter()
                .map(|((domain, op_type, version), nodes)| UnsupportedOp {
                    domain,
                    op_type,
                    version,
                    nodes,
                })
                .collect(),
        ));
    }

    // Define every node output before resolving inputs, so that node order does not matter
    // (a cycle is then reported as a cycle, not as a missing input).
    let mut outputs_of = Vec::with_capacity(parsed.len());
    let mut anon = 0usize;
    for (name, n, kind) in &parsed {
        let mut outs = Vec::new();
        for o in &n.output {
            let ty = declared.get(o).cloned().unwrap_or_default();
            if o.is_empty() {
                anon += 1;
                let id = g.add_value(format!("{name}::unused{anon}"), ty, ValueDef::Undefined);
                outs.push(id);
            } else {
                let def = match kind {
                    ParsedKind::Constant(t) => ValueDef::Const(Constant::from_tensor(t)),
                    ParsedKind::Op(_) => ValueDef::Undefined,
                };
                let ty = match kind {
                    ParsedKind::Constant(t) => ValueType::fixed(t.dtype(), &t.shape),
                    ParsedKind::Op(_) => ty,
                };
                outs.push(define(&mut g, &mut by_name, o, ty, def)?);
            }
        }
        outputs_of.push(outs);
    }
    for ((name, n, kind), outs) in parsed.into_iter().zip(outputs_of) {
        let ParsedKind::Op(op) = kind else { continue };
        let mut inputs = Vec::with_capacity(n.input.len());
        for i in &n.input {
            if i.is_empty() {
                inputs.push(None);
            } else {
                let id = by_name
                    .get(i)
                    .copied()
                    .ok_or_else(|| ImportError::UndefinedInput {
                        node: name.clone(),
                        input: i.clone(),
                    })?;
                inputs.push(Some(id));
            }
        }
        while inputs.last() == Some(&None) {
            inputs.pop();
        }
        g.onnx_nodes.insert(
            name.clone(),
            OnnxNode {
                op: op.clone(),
                domain: n.domain.clone().unwrap_or_default(),
                op_type: n.op_type.clone().unwrap_or_default(),
                attributes: n.attribute.clone(),
            },
        );
        let id = g.nodes.add_node(Node {
            name,
            op,
            inputs,
            outputs: outs.clone(),
        });
        for (k, o) in outs.into_iter().enumerate() {
            g.value_mut(o).def = ValueDef::Node(id, k);
        }
    }
    g.rebuild_edges();
    for o in &gp.output {
        let name = o.name.clone().unwrap_or_default();
        let id = by_name
            .get(&name)
            .copied()
            .ok_or_else(|| ImportError::UndefinedOutput(name.clone()))?;
        if g.value(id).ty.dtype.is_none() {
            g.value_mut(id).ty = value_type("graph output", o)?;
        }
        g.outputs.push(id);
    }
    g.topo_order()
        .map_err(|e| ImportError::Cycle(e.nodes.join(", ")))?;
    Ok(g)
}

enum ParsedKind {
    Op(Op),
    Constant(crate::tensor::Tensor),
}

/// What `kiln inspect` shows about an ONNX file, read straight from the protobuf so that it
/// works on models Kiln cannot import (it then lists every unsupported operator).
#[derive(Debug, Clone, Default)]
pub struct ModelSummary {
    pub ir_version: i64,
    pub producer: String,
    pub opsets: Vec<(String, i64)>,
    pub inputs: Vec<(String, String)>,
    pub outputs: Vec<(String, String)>,
    pub node_count: usize,
    /// (op type with domain prefix when not default, count), most frequent first.
    pub op_histogram: Vec<(String, usize)>,
    /// dtype name -> (elements, bytes) over all initializers and Constant nodes.
    pub params_by_dtype: BTreeMap<String, (u64, u64)>,
    pub unsupported: Vec<UnsupportedOp>,
    pub external_files: Vec<String>,
}

pub fn summarize(path: &Path) -> Result<ModelSummary, ImportError> {
    let io = |source| ImportError::Io {
        path: path.display().to_string(),
        source,
    };
    let bytes = Bytes::from(std::fs::read(path).map_err(io)?);
    if bytes.is_empty() {
        return Err(ImportError::NotAModel("the file is empty".into()));
    }
    let model = ModelProto::decode(bytes).map_err(|e| ImportError::Decode(e.to_string()))?;
    let gp = model
        .graph
        .as_ref()
        .ok_or_else(|| ImportError::NotAModel("it has no graph".into()))?;
    let mut s = ModelSummary {
        ir_version: model.ir_version.unwrap_or(0),
        producer: model.producer_name.clone().unwrap_or_default(),
        node_count: gp.node.len(),
        ..Default::default()
    };
    let mut opsets = BTreeMap::new();
    for o in &model.opset_import {
        let d = o.domain.clone().unwrap_or_default();
        opsets.insert(
            if d == "ai.onnx" { String::new() } else { d },
            o.version.unwrap_or(0),
        );
    }
    s.opsets = opsets.iter().map(|(d, v)| (d.clone(), *v)).collect();
    let init_names: std::collections::HashSet<&str> = gp
        .initializer
        .iter()
        .filter_map(|t| t.name.as_deref())
        .collect();
    let show = |vi: &proto::ValueInfoProto| -> (String, String) {
        let name = vi.name.clone().unwrap_or_default();
        let ty = match value_type("value", vi) {
            Ok(t) => crate::ir::printer::type_str(&t),
            Err(e) => format!("<{e}>"),
        };
        (name, ty)
    };
    s.inputs = gp
        .input
        .iter()
        .filter(|i| !init_names.contains(i.name.as_deref().unwrap_or("")))
        .map(show)
        .collect();
    s.outputs = gp.output.iter().map(show).collect();
    let mut hist: BTreeMap<String, usize> = BTreeMap::new();
    let mut unsupported: BTreeMap<(String, String, i64), Vec<String>> = BTreeMap::new();
    let add_param = |code: i32, dims: &[i64], s: &mut ModelSummary| {
        let n: u64 = dims.iter().map(|&d| d.max(0) as u64).product();
        let (name, bytes) = match DType::from_onnx(code) {
            Some(dt) => (dt.name().to_string(), dt.storage_bytes(n as usize) as u64),
            None => (DType::onnx_name(code).to_lowercase(), 0),
        };
        let e = s.params_by_dtype.entry(name).or_default();
        e.0 += n;
        e.1 += bytes;
    };
    for t in &gp.initializer {
        add_param(t.data_type.unwrap_or(0), &t.dims, &mut s);
        if t.data_location == Some(1) {
            for kv in &t.external_data {
                if kv.key.as_deref() == Some("location") {
                    let loc = kv.value.clone().unwrap_or_default();
                    if !s.external_files.contains(&loc) {
                        s.external_files.push(loc);
                    }
                }
            }
        }
    }
    for (i, n) in gp.node.iter().enumerate() {
        let op_type = n.op_type.clone().unwrap_or_default();
        let domain = n.domain.clone().unwrap_or_default();
        let domain = if domain == "ai.onnx" {
            String::new()
        } else {
            domain
        };
        let key = if domain.is_empty() {
            op_type.clone()
        } else {
            format!("{domain}::{op_type}")
        };
        *hist.entry(key).or_default() += 1;
        let attrs = ops::Attrs::new(n);
        if op_type == "Constant" && domain.is_empty() {
            if let Some(t) = attrs.get("value").and_then(|a| a.t.as_ref()) {
                add_param(t.data_type.unwrap_or(0), &t.dims, &mut s);
            }
        }
        let version = opsets.get(&domain).copied();
        let has_subgraph = n
            .attribute
            .iter()
            .any(|a| a.g.is_some() || !a.graphs.is_empty());
        let supported = match version {
            None => false,
            Some(_) if has_subgraph => false,
            Some(_) if op_type == "Constant" && domain.is_empty() => true,
            Some(v) => !matches!(
                ops::parse_op(&domain, &op_type, v, &attrs),
                Err(ops::OpError::Unsupported)
            ),
        };
        if !supported {
            let name = n
                .name
                .clone()
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| format!("{op_type}_{i}"));
            unsupported
                .entry((domain, op_type, version.unwrap_or(0)))
                .or_default()
                .push(name);
        }
    }
    let mut hv: Vec<(String, usize)> = hist.into_iter().collect();
    hv.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    s.op_histogram = hv;
    s.unsupported = unsupported
        .into_iter()
        .map(|((domain, op_type, version), nodes)| UnsupportedOp {
            domain,
            op_type,
            version,
            nodes,
        })
        .collect();
    Ok(s)
}
