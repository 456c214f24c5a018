//! Tensor descriptions as the runtime hands them to apps: [`TensorInfo`] (an owned copy of an
//! artifact's `kiln_tensor_info`), the ONNX `TensorProto.DataType` codes the runtime knows,
//! their names, and the byte size of a dense row-major buffer of a given dtype and shape
//! (int4/uint4 pack two elements per byte, low nibble first, rounded up to whole bytes).

use std::fmt;

/// ONNX `TensorProto.DataType` codes the runtime can size.
pub mod dtype {
    pub const FLOAT: i32 = 1;
    pub const UINT8: i32 = 2;
    pub const INT8: i32 = 3;
    pub const UINT16: i32 = 4;
    pub const INT16: i32 = 5;
    pub const INT32: i32 = 6;
    pub const INT64: i32 = 7;
    pub const BOOL: i32 = 9;
    pub const FLOAT16: i32 = 10;
    pub const DOUBLE: i32 = 11;
    pub const UINT32: i32 = 12;
    pub const UINT64: i32 = 13;
    pub const BFLOAT16: i32 = 16;
    pub const UINT4: i32 = 21;
    pub const INT4: i32 = 22;
}

/// The lower-case ONNX name of a dtype code ("float32", "int4", ...), or `None` if the
/// runtime does not know it.
pub fn dtype_name(code: i32) -> Option<&'static str> {
    Some(match code {
        dtype::FLOAT => "float32",
        dtype::UINT8 => "uint8",
        dtype::INT8 => "int8",
        dtype::UINT16 => "uint16",
        dtype::INT16 => "int16",
        dtype::INT32 => "int32",
        dtype::INT64 => "int64",
        dtype::BOOL => "bool",
        dtype::FLOAT16 => "float16",
        dtype::DOUBLE => "float64",
        dtype::UINT32 => "uint32",
        dtype::UINT64 => "uint64",
        dtype::BFLOAT16 => "bfloat16",
        dtype::UINT4 => "uint4",
        dtype::INT4 => "int4",
        _ => return None,
    })
}

/// Bits per element of a dtype code, or `None` if the runtime does not know it.
pub fn dtype_bits(code: i32) -> Option<u64> {
    Some(match code {
        dtype::UINT4 | dtype::INT4 => 4,
        dtype::UINT8 | dtype::INT8 | dtype::BOOL => 8,
        dtype::UINT16 | dtype::INT16 | dtype::FLOAT16 | dtype::BFLOAT16 => 16,
        dtype::FLOAT | dtype::INT32 | dtype::UINT32 => 32,
        dtype::INT64 | dtype::DOUBLE | dtype::UINT64 => 64,
        _ => return None,
    })
}

/// Bytes of a dense buffer of `elements` values of dtype `code` (sub-byte types packed and
/// rounded up), or `None` for an unknown dtype or a size that overflows.
pub fn byte_size(code: i32, elements: u64) -> Option<u64> {
    let bits = elements.checked_mul(dtype_bits(code)?)?;
    Some(bits.div_ceil(8))
}

/// One input or output of an artifact: its ONNX value name, dtype code and static shape.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TensorInfo {
    pub name: String,
    /// ONNX `TensorProto.DataType` code.
    pub dtype: i32,
    /// Static dims, row-major; empty for a scalar.
    pub dims: Vec<i64>,
}

impl TensorInfo {
    /// Number of elements (1 for a scalar), or `None` if a dim is negative or the product
    /// overflows.
    pub fn num_elements(&self) -> Option<u64> {
        self.dims.iter().try_fold(1u64, |acc, &d| {
            u64::try_from(d).ok().and_then(|d| acc.checked_mul(d))
        })
    }

    /// Bytes of this tensor's dense buffer, or `None` if the dtype is unknown, a dim is
    /// negative, or the size does not fit in `usize`.
    pub fn byte_size(&self) -> Option<usize> {
        byte_size(self.dtype, self.num_elements()?).and_then(|b| usize::try_from(b).ok())
    }

    /// The dtype's name, or `"dtype N"` for an unknown code.
    pub fn dtype_name(&self) -> String {
        dtype_name(self.dtype).map_or_else(|| format!("dtype {}", self.dtype), str::to_string)
    }
}

/// `name: float32 [2, 3]`
impl fmt::Display for TensorInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {} {:?}", self.name, self.dtype_name(), self.dims)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(dtype: i32, dims: &[i64]) -> TensorInfo {
        TensorInfo {
            name: "t".into(),
            dtype,
            dims: dims.to_vec(),
        }
    }

    #[test]
    fn byte_sizes() {
        let cases: &[(i32, &[i64], Option<usize>)] = &[
            (dtype::FLOAT, &[2, 3], Some(24)),
            (dtype::FLOAT, &[], Some(4)),
            (dtype::FLOAT, &[0, 5], Some(0)),
            (dtype::UINT8, &[7], Some(7)),
            (dtype::INT8, &[7], Some(7)),
            (dtype::UINT16, &[3], Some(6)),
            (dtype::INT16, &[3], Some(6)),
            (dtype::INT32, &[3], Some(12)),
            (dtype::INT64, &[3], Some(24)),
            (dtype::BOOL, &[3], Some(3)),
            (dtype::FLOAT16, &[3], Some(6)),
            (dtype::DOUBLE, &[3], Some(24)),
            (dtype::UINT32, &[3], Some(12)),
            (dtype::UINT64, &[3], Some(24)),
            (dtype::BFLOAT16, &[3], Some(6)),
            (dtype::INT4, &[4, 8], Some(16)),
            (dtype::UINT4, &[3], Some(2)),
            (dtype::INT4, &[1], Some(1)),
            (8, &[3], None),  // string
            (14, &[3], None), // complex64
            (dtype::FLOAT, &[-1, 3], None),
            (dtype::INT64, &[i64::MAX, i64::MAX], None),
        ];
        for (dtype, dims, want) in cases {
            assert_eq!(
                info(*dtype, dims).byte_size(),
                *want,
                "dtype {dtype} dims {dims:?}"
            );
        }
    }

    #[test]
    fn display() {
        assert_eq!(info(1, &[2, 3]).to_string(), "t: float32 [2, 3]");
        assert_eq!(info(8, &[]).to_string(), "t: dtype 8 []");
    }
}
