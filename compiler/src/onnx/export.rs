//! ONNX export: a graph (after passes) written back as a standard `ModelProto` that
//! onnxruntime runs. Nodes imported from ONNX whose typed op no pass changed are written with
//! their original op type, domain and attributes (kept at import in [`Graph::onnx_nodes`]);
//! nodes that passes created or changed are written from their typed op (the ops passes
//! produce: MatMulNBits, Cast, Gather, Transpose, MatMul, elementwise arithmetic, ...).
//! Constants become initializers with raw data. MatMulNBits scales are written in the
//! activation type (com.microsoft requires it), which holds f16 scales exactly.

use crate::dtype::DType;
use crate::ir::{BinaryOp, Graph, Op, ValueDef, ValueId, ValueType};
use crate::onnx::tensor_proto::tensor_to_proto;
use crate::proto::{self, attribute_proto::AttributeType};
use crate::tensor::Tensor;
use prost::Message;
use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum ExportError {
    #[error("node '{node}': {op} cannot be written as ONNX yet")]
    Unsupported { node: String, op: String },
    #[error("the graph has a cycle through {0}")]
    Cycle(String),
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

fn int_attr(name: &str, v: i64) -> proto::AttributeProto {
    proto::AttributeProto {
        name: Some(name.into()),
        r#type: Some(AttributeType::Int as i32),
        i: Some(v),
        ..Default::default()
    }
}

fn ints_attr(name: &str, v: &[i64]) -> proto::AttributeProto {
    proto::AttributeProto {
        name: Some(name.into()),
        r#type: Some(AttributeType::Ints as i32),
        ints: v.to_vec(),
        ..Default::default()
    }
}

/// `(domain, op_type, attributes)` of a typed op, for the ops passes create.
fn typed_node(op: &Op) -> Option<(&'static str, &'static str, Vec<proto::AttributeProto>)> {
    Some(match op {
        Op::MatMulNBits {
            k,
            n,
            bits,
            block_size,
            accuracy_level,
        } => (
            "com.microsoft",
            "MatMulNBits",
            vec![
                int_attr("K", *k as i64),
                int_attr("N", *n as i64),
                int_attr("bits", *bits as i64),
                int_attr("block_size", *block_size as i64),
                int_attr("accuracy_level", *accuracy_level as i64),
            ],
        ),
        Op::Cast { to, saturate } => {
            let mut a = vec![int_attr("to", to.onnx_code() as i64)];
            if !saturate {
                a.push(int_attr("saturate", 0));
            }
            ("", "Cast", a)
        }
        Op::Gather { axis } => ("", "Gather", vec![int_attr("axis", *axis)]),
        Op::Transpose { perm } => (
            "",
            "Transpose",
            perm.as_ref()
                .map(|p| vec![ints_attr("perm", p)])
                .unwrap_or_default(),
        ),
        Op::MatMul => ("", "MatMul", vec![]),
        Op::Identity => ("", "Identity", vec![]),
        Op::Binary(b) => (
            "",
            match b {
                BinaryOp::Add => "Add",
                BinaryOp::Sub => "Sub",
                BinaryOp::Mul => "Mul",
                BinaryOp::Div => "Div",
                _ => return None,
            },
            vec![],
        ),
        _ => return None,
    })
}

fn value_info(name: &str, ty: &ValueType) -> proto::ValueInfoProto {
    use proto::tensor_shape_proto::{dimension::Value as D, Dimension};
    let shape = ty.shape.as_ref().map(|dims| proto::TensorShapeProto {
        dim: dims
            .iter()
            .map(|d| Dimension {
                value: match d {
                    crate::ir::Dim::Fixed(n) => Some(D::DimValue(*n as i64)),
                    crate::ir::Dim::Symbolic(s) => Some(D::DimParam(s.clone())),
                    crate::ir::Dim::Unknown => None,
                },
                ..Default::default()
            })
            .collect(),
    });
    proto::ValueInfoProto {
        name: Some(name.into()),
        r#type: Some(proto::TypeProto {
            value: Some(proto::type_proto::Value::TensorType(
                proto::type_proto::Tensor {
                    elem_type: ty.dtype.map(|d| d.onnx_code()),
                    shape,
                },
            )),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The graph as a `ModelProto`.
pub fn to_model(g: &Graph) -> Result<proto::ModelProto, ExportError> {
    let order = g
        .topo_order()
        .map_err(|e| ExportError::Cycle(e.nodes.join(", ")))?;
    let mut nodes = Vec::new();
    let mut used: BTreeSet<ValueId> = BTreeSet::new();
    // Scales of MatMulNBits nodes are written in A's type.
    let mut retype: HashMap<ValueId, DType> = HashMap::new();
    let mut domains: BTreeSet<String> = BTreeSet::new();
    for id in order {
        let n = &g.nodes[id];
        let (domain, op_type, attribute) = match g.onnx_nodes.get(&n.name) {
            Some(o) if o.op == n.op => (o.domain.clone(), o.op_type.clone(), o.attributes.clone()),
            _ => {
                let (d, t, a) = typed_node(&n.op).ok_or_else(|| ExportError::Unsupported {
                    node: n.name.clone(),
                    op: n.op.onnx_name().into(),
                })?;
                (d.to_string(), t.to_string(), a)
            }
        };
        if let (Op::MatMulNBits { .. }, Some(Some(a)), Some(Some(s))) =
            (&n.op, n.inputs.first(), n.inputs.get(2))
        {
            if let Some(d) = g.value(*a).ty.dtype {
                retype.insert(*s, d);
            }
        }
        if !domain.is_empty() {
            domains.insert(domain.clone());
        }
        used.extend(n.inputs.iter().flatten().copied());
        nodes.push(proto::NodeProto {
            input: n
                .inputs
                .iter()
                .map(|i| i.map(|v| g.value(v).name.clone()).unwrap_or_default())
                .collect(),
            output: n.outputs.iter().map(|&o| g.value(o).name.clone()).collect(),
            name: Some(n.name.clone()),
            op_type: Some(op_type),
            domain: (!domain.is_empty()).then_some(domain),
            attribute,
            ..Default::default()
        });
    }
    used.extend(g.outputs.iter().copied());
    let mut initializer = Vec::new();
    for &v in &used {
        let val = g.value(v);
        if let ValueDef::Const(c) = &val.def {
            let mut t = c.to_tensor();
            if let Some(&d) = retype.get(&v) {
                if t.dtype() != d {
                    t = Tensor::new(
                        t.shape.clone(),
                        crate::tensor::TensorData::from_f64s(d, t.to_f64_vec().into_iter()),
                    );
                }
            }
            initializer.push(tensor_to_proto(&val.name, &t));
        }
    }
    let mut opset_import: Vec<proto::OperatorSetIdProto> = g
        .opsets
        .iter()
        .map(|(d, v)| proto::OperatorSetIdProto {
            domain: Some(d.clone()),
            version: Some(*v),
        })
        .collect();
    for d in domains {
        if !g.opsets.iter().any(|(od, _)| *od == d) {
            opset_import.push(proto::OperatorSetIdProto {
                domain: Some(d),
                version: Some(1),
            });
        }
    }
    let graph = proto::GraphProto {
        node: nodes,
        name: Some(g.name.clone()),
        initializer,
        input: g
            .inputs
            .iter()
            .map(|&v| value_info(&g.value(v).name, &g.value(v).ty))
            .collect(),
        output: g
            .outputs
            .iter()
            .map(|&v| value_info(&g.value(v).name, &g.value(v).ty))
            .collect(),
        ..Default::default()
    };
    Ok(proto::ModelProto {
        ir_version: Some(10),
        opset_import,
        producer_name: Some("kiln".into()),
        producer_version: Some(env!("CARGO_PKG_VERSION").into()),
        graph: Some(graph),
        ..Default::default()
    })
}

/// Writes the graph as an ONNX file.
pub fn write_model(g: &Graph, path: &Path) -> Result<(), ExportError> {
    let bytes = to_model(g)?.encode_to_vec();
    std::fs::write(path, bytes).map_err(|source| ExportError::Io {
        path: path.display().to_string(),
        source,
    })
}
