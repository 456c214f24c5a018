//! `TensorProto` <-> Kiln constants and host tensors: decoding every storage form ONNX allows
//! (raw_data, the typed repeated fields, external data in a sibling file), checking that the
//! data length matches the shape, and reading/writing the `input_N.pb` / `output_N.pb` files
//! of the ONNX test-data layout.

use super::ImportError;
use crate::dtype::DType;
use crate::ir::Constant;
use crate::proto::TensorProto;
use crate::tensor::Tensor;
use bytes::Bytes;
use prost::Message;
use std::collections::HashMap;
use std::path::{Component, Path, PathBuf};

/// Resolves external-data locations against the model's folder and maps each file once.
pub struct ExternalData {
    base: Option<PathBuf>,
    files: HashMap<PathBuf, Bytes>,
}

impl ExternalData {
    /// `base` is the folder of the model file (`None` for a model read from memory, which then
    /// may not use external data).
    pub fn new(base: Option<PathBuf>) -> ExternalData {
        ExternalData {
            base,
            files: HashMap::new(),
        }
    }

    /// Maps `location` relative to the model folder, refusing any path that leaves it.
    fn file(&mut self, tensor: &str, location: &str) -> Result<Bytes, ImportError> {
        let escape = |why: &str| ImportError::ExternalData {
            tensor: tensor.to_string(),
            reason: format!("location '{location}' {why}"),
        };
        let base = self
            .base
            .clone()
            .ok_or_else(|| escape("cannot be resolved: the model was not read from a file"))?;
        let rel = Path::new(location);
        if location.is_empty() {
            return Err(escape("is empty"));
        }
        if rel.is_absolute() || location.contains('\\') && location.contains(':') {
            return Err(escape(
                "is an absolute path; external data must stay inside the model's folder",
            ));
        }
        if rel
            .components()
            .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
        {
            return Err(escape("leaves the model's folder"));
        }
        let joined = base.join(rel);
        let canon_base = base
            .canonicalize()
            .map_err(|e| escape(&format!("cannot be resolved: {e}")))?;
        let canon = joined
            .canonicalize()
            .map_err(|e| escape(&format!("cannot be opened: {e}")))?;
        if !canon.starts_with(&canon_base) {
            return Err(escape(
                "resolves (through a symbolic link) outside the model's folder",
            ));
        }
        if let Some(b) = self.files.get(&canon) {
            return Ok(b.clone());
        }
        let f =
            std::fs::File::open(&canon).map_err(|e| escape(&format!("cannot be opened: {e}")))?;
        // SAFETY: the mapping is read-only; Kiln never writes to the file while a model is
        // loaded. A concurrent external truncation is outside what a compiler can defend.
        let map = unsafe { memmap2::Mmap::map(&f) }
            .map_err(|e| escape(&format!("cannot be mapped: {e}")))?;
        let bytes = Bytes::from_owner(map);
        self.files.insert(canon, bytes.clone());
        Ok(bytes)
    }
}

fn bad(name: &str, reason: impl Into<String>) -> ImportError {
    ImportError::BadTensor {
        name: name.to_string(),
        reason: reason.into(),
    }
}

/// Decodes a `TensorProto` into a constant without copying raw or external data.
pub fn constant_from_proto(
    t: &TensorProto,
    ext: &mut ExternalData,
) -> Result<Constant, ImportError> {
    let name = t.name.clone().unwrap_or_default();
    let code = t.data_type.unwrap_or(0);
    let dtype = DType::from_onnx(code).ok_or_else(|| {
        bad(
            &name,
            format!("element type {} is not supported", DType::onnx_name(code)),
        )
    })?;
    let mut shape = Vec::with_capacity(t.dims.len());
    for &d in &t.dims {
        if d < 0 {
            return Err(bad(
                &name,
                format!("negative dimension {d} in shape {:?}", t.dims),
            ));
        }
        shape.push(d as usize);
    }
    let n = shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| bad(&name, "shape is too large"))?;
    let want = n
        .checked_mul(dtype.bits())
        .map(|b| b.div_ceil(8))
        .ok_or_else(|| bad(&name, "shape is too large"))?;
    let bytes: Bytes = if t.data_location == Some(1) {
        let mut location = None;
        let mut offset = 0usize;
        let mut length = None;
        for kv in &t.external_data {
            let v = kv.value.clone().unwrap_or_default();
            match kv.key.as_deref() {
                Some("location") => location = Some(v),
                Some("offset") => {
                    offset = v
                        .parse()
                        .map_err(|_| bad(&name, format!("bad external offset '{v}'")))?
                }
                Some("length") => {
                    length = Some(
                        v.parse()
                            .map_err(|_| bad(&name, format!("bad external length '{v}'")))?,
                    )
                }
                _ => {}
            }
        }
        let location = location.ok_or_else(|| bad(&name, "external data without a location"))?;
        let file = ext.file(&name, &location)?;
        let len: usize = length.unwrap_or(file.len().saturating_sub(offset));
        let end = offset.checked_add(len).filter(|&e| e <= file.len()).ok_or_else(|| {
            bad(&name, format!("external data {location} [{offset}, +{len}) lies beyond the file's {} bytes", file.len()))
        })?;
        file.slice(offset..end)
    } else if let Some(raw) = t.raw_data.as_ref().filter(|r| !r.is_empty() || n == 0) {
        raw.clone()
    } else {
        typed_fields_to_bytes(t, dtype, n).map_err(|r| bad(&name, r))?
    };
    if bytes.len() != want {
        return Err(bad(
            &name,
            format!(
                "holds {} bytes of data but its type {}{:?} needs {}",
                bytes.len(),
                dtype,
                shape,
                want
            ),
        ));
    }
    Ok(Constant {
        dtype,
        shape,
        bytes,
    })
}

fn typed_fields_to_bytes(t: &TensorProto, dtype: DType, n: usize) -> Result<Bytes, String> {
    let mut out = Vec::new();
    let count_err = |have: usize, want: usize| {
        format!("has {have} elements in its typed field, its shape needs {want}")
    };
    match dtype {
        DType::F32 => {
            if t.float_data.len() != n {
                return Err(count_err(t.float_data.len(), n));
            }
            out.extend(t.float_data.iter().flat_map(|x| x.to_le_bytes()));
        }
        DType::F64 => {
            if t.double_data.len() != n {
                return Err(count_err(t.double_data.len(), n));
            }
            out.extend(t.double_data.iter().flat_map(|x| x.to_le_bytes()));
        }
        DType::I64 => {
            if t.int64_data.len() != n {
                return Err(count_err(t.int64_data.len(), n));
            }
            out.extend(t.int64_data.iter().flat_map(|x| x.to_le_bytes()));
        }
        DType::U32 | DType::U64 => {
            if t.uint64_data.len() != n {
                return Err(count_err(t.uint64_data.len(), n));
            }
            if dtype == DType::U32 {
                out.extend(t.uint64_data.iter().flat_map(|&x| (x as u32).to_le_bytes()));
            } else {
                out.extend(t.uint64_data.iter().flat_map(|x| x.to_le_bytes()));
            }
        }
        DType::I4 | DType::U4 => {
            let want = n.div_ceil(2);
            if t.int32_data.len() != want {
                return Err(count_err(t.int32_data.len() * 2, n));
            }
            out.extend(t.int32_data.iter().map(|&x| x as u8));
        }
        DType::I32
        | DType::I16
        | DType::I8
        | DType::U16
        | DType::U8
        | DType::Bool
        | DType::F16
        | DType::BF16 => {
            if t.int32_data.len() != n {
                return Err(count_err(t.int32_data.len(), n));
            }
            let w = dtype.bits() / 8;
            for &x in &t.int32_data {
                out.extend_from_slice(&x.to_le_bytes()[..w]);
            }
        }
    }
    Ok(Bytes::from(out))
}

/// A `TensorProto` holding `t` as raw data.
pub fn tensor_to_proto(name: &str, t: &Tensor) -> TensorProto {
    TensorProto {
        dims: t.shape.iter().map(|&d| d as i64).collect(),
        data_type: Some(t.dtype().onnx_code()),
        name: Some(name.to_string()),
        raw_data: Some(Bytes::from(t.to_le_bytes())),
        ..Default::default()
    }
}

/// Errors reading or writing a tensor file.
#[derive(Debug, thiserror::Error)]
pub enum TensorFileError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: not a serialized ONNX TensorProto ({reason})")]
    Decode { path: String, reason: String },
    #[error("{path}: {reason}")]
    Bad { path: String, reason: String },
}

/// Reads a serialized `TensorProto` file; returns the tensor and its stored name.
pub fn read_tensor_file(path: &Path) -> Result<(String, Tensor), TensorFileError> {
    let p = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|source| TensorFileError::Io {
        path: p.clone(),
        source,
    })?;
    let proto = TensorProto::decode(Bytes::from(bytes)).map_err(|e| TensorFileError::Decode {
        path: p.clone(),
        reason: e.to_string(),
    })?;
    if proto.data_location == Some(1) {
        return Err(TensorFileError::Bad {
            path: p,
            reason: "tensor files with external data are not supported".into(),
        });
    }
    let mut ext = ExternalData::new(None);
    let c = constant_from_proto(&proto, &mut ext).map_err(|e| TensorFileError::Bad {
        path: p,
        reason: e.to_string(),
    })?;
    Ok((proto.name.unwrap_or_default(), c.to_tensor()))
}

pub fn write_tensor_file(path: &Path, name: &str, t: &Tensor) -> Result<(), TensorFileError> {
    let proto = tensor_to_proto(name, t);
    std::fs::write(path, proto.encode_to_vec()).map_err(|source| TensorFileError::Io {
        path: path.display().to_string(),
        source,
    })
}
