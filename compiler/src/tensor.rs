//! Host tensors: a shape plus typed, dense, row-major element storage. This is the value type
//! of the reference interpreter and of constant folding, and it converts to and from the raw
//! little-endian byte layout that ONNX files, Kiln constants and artifacts use (packed two per
//! byte, low nibble first, for the 4-bit types).

use crate::dtype::DType;
use half::{bf16, f16};
use std::fmt;

/// Dense element storage, one vector variant per supported element type. The 4-bit types are
/// kept unpacked (one element per byte, sign-extended for `I4`) so that kernels can index them.
#[derive(Clone, PartialEq)]
pub enum TensorData {
    F32(Vec<f32>),
    F64(Vec<f64>),
    F16(Vec<f16>),
    BF16(Vec<bf16>),
    I8(Vec<i8>),
    I16(Vec<i16>),
    I32(Vec<i32>),
    I64(Vec<i64>),
    U8(Vec<u8>),
    U16(Vec<u16>),
    U32(Vec<u32>),
    U64(Vec<u64>),
    Bool(Vec<bool>),
    I4(Vec<i8>),
    U4(Vec<u8>),
}

/// Runs `$body` with `$v` bound to the element vector of any `TensorData` variant.
#[macro_export]
macro_rules! with_data {
    ($data:expr, $v:ident => $body:expr) => {
        match $data {
            $crate::tensor::TensorData::F32($v) => $body,
            $crate::tensor::TensorData::F64($v) => $body,
            $crate::tensor::TensorData::F16($v) => $body,
            $crate::tensor::TensorData::BF16($v) => $body,
            $crate::tensor::TensorData::I8($v) => $body,
            $crate::tensor::TensorData::I16($v) => $body,
            $crate::tensor::TensorData::I32($v) => $body,
            $crate::tensor::TensorData::I64($v) => $body,
            $crate::tensor::TensorData::U8($v) => $body,
            $crate::tensor::TensorData::U16($v) => $body,
            $crate::tensor::TensorData::U32($v) => $body,
            $crate::tensor::TensorData::U64($v) => $body,
            $crate::tensor::TensorData::Bool($v) => $body,
            $crate::tensor::TensorData::I4($v) => $body,
            $crate::tensor::TensorData::U4($v) => $body,
        }
    };
}

/// Like [`with_data!`] but rebuilds a `TensorData` of the same variant from the body's vector.
#[macro_export]
macro_rules! map_data {
    ($data:expr, $v:ident => $body:expr) => {
        match $data {
            $crate::tensor::TensorData::F32($v) => $crate::tensor::TensorData::F32($body),
            $crate::tensor::TensorData::F64($v) => $crate::tensor::TensorData::F64($body),
            $crate::tensor::TensorData::F16($v) => $crate::tensor::TensorData::F16($body),
            $crate::tensor::TensorData::BF16($v) => $crate::tensor::TensorData::BF16($body),
            $crate::tensor::TensorData::I8($v) => $crate::tensor::TensorData::I8($body),
            $crate::tensor::TensorData::I16($v) => $crate::tensor::TensorData::I16($body),
            $crate::tensor::TensorData::I32($v) => $crate::tensor::TensorData::I32($body),
            $crate::tensor::TensorData::I64($v) => $crate::tensor::TensorData::I64($body),
            $crate::tensor::TensorData::U8($v) => $crate::tensor::TensorData::U8($body),
            $crate::tensor::TensorData::U16($v) => $crate::tensor::TensorData::U16($body),
            $crate::tensor::TensorData::U32($v) => $crate::tensor::TensorData::U32($body),
            $crate::tensor::TensorData::U64($v) => $crate::tensor::TensorData::U64($body),
            $crate::tensor::TensorData::Bool($v) => $crate::tensor::TensorData::Bool($body),
            $crate::tensor::TensorData::I4($v) => $crate::tensor::TensorData::I4($body),
            $crate::tensor::TensorData::U4($v) => $crate::tensor::TensorData::U4($body),
        }
    };
}

/// Element types that have a `TensorData` variant of their own.
pub trait Elem: Copy + Default + PartialOrd + Send + Sync + fmt::Debug + 'static {
    const DTYPE: DType;
    fn to_f64(self) -> f64;
    fn from_f64(v: f64) -> Self;
    fn to_i64(self) -> i64;
    fn from_i64(v: i64) -> Self;
    fn into_data(v: Vec<Self>) -> TensorData;
    fn slice(d: &TensorData) -> Option<&[Self]>;
}

macro_rules! elem_int {
    ($t:ty, $variant:ident, $dt:expr) => {
        impl Elem for $t {
            const DTYPE: DType = $dt;
            fn to_f64(self) -> f64 {
                self as f64
            }
            fn from_f64(v: f64) -> Self {
                // Float to integer conversion truncates toward zero (numpy astype); the
                // saturation of `as` only applies to out-of-range values ONNX leaves undefined.
                v as $t
            }
            fn to_i64(self) -> i64 {
                self as i64
            }
            fn from_i64(v: i64) -> Self {
                v as $t
            }
            fn into_data(v: Vec<Self>) -> TensorData {
                TensorData::$variant(v)
            }
            fn slice(d: &TensorData) -> Option<&[Self]> {
                match d {
                    TensorData::$variant(v) => Some(v),
                    _ => None,
                }
            }
        }
    };
}
elem_int!(i8, I8, DType::I8);
elem_int!(i16, I16, DType::I16);
elem_int!(i32, I32, DType::I32);
elem_int!(i64, I64, DType::I64);
elem_int!(u8, U8, DType::U8);
elem_int!(u16, U16, DType::U16);
elem_int!(u32, U32, DType::U32);
elem_int!(u64, U64, DType::U64);

macro_rules! elem_float {
    ($t:ty, $variant:ident, $dt:expr, $to:expr, $from:expr) => {
        impl Elem for $t {
            const DTYPE: DType = $dt;
            fn to_f64(self) -> f64 {
                $to(self)
            }
            fn from_f64(v: f64) -> Self {
                $from(v)
            }
            fn to_i64(self) -> i64 {
                $to(self) as i64
            }
            fn from_i64(v: i64) -> Self {
                $from(v as f64)
            }
            fn into_data(v: Vec<Self>) -> TensorData {
                TensorData::$variant(v)
            }
            fn slice(d: &TensorData) -> Option<&[Self]> {
                match d {
                    TensorData::$variant(v) => Some(v),
                    _ => None,
                }
            }
        }
    };
}
elem_float!(f32, F32, DType::F32, |x: f32| x as f64, |v: f64| v as f32);
elem_float!(f64, F64, DType::F64, |x: f64| x, |v: f64| v);
elem_float!(f16, F16, DType::F16, |x: f16| x.to_f64(), f16::from_f64);
elem_float!(
    bf16,
    BF16,
    DType::BF16,
    |x: bf16| x.to_f64(),
    bf16::from_f64
);

impl Elem for bool {
    const DTYPE: DType = DType::Bool;
    fn to_f64(self) -> f64 {
        self as u8 as f64
    }
    fn from_f64(v: f64) -> Self {
        v != 0.0
    }
    fn to_i64(self) -> i64 {
        self as i64
    }
    fn from_i64(v: i64) -> Self {
        v != 0
    }
    fn into_data(v: Vec<Self>) -> TensorData {
        TensorData::Bool(v)
    }
    fn slice(d: &TensorData) -> Option<&[Self]> {
        match d {
            TensorData::Bool(v) => Some(v),
            _ => None,
        }
    }
}

impl TensorData {
    pub fn dtype(&self) -> DType {
        match self {
            TensorData::F32(_) => DType::F32,
            TensorData::F64(_) => DType::F64,
            TensorData::F16(_) => DType::F16,
            TensorData::BF16(_) => DType::BF16,
            TensorData::I8(_) => DType::I8,
            TensorData::I16(_) => DType::I16,
            TensorData::I32(_) => DType::I32,
            TensorData::I64(_) => DType::I64,
            TensorData::U8(_) => DType::U8,
            TensorData::U16(_) => DType::U16,
            TensorData::U32(_) => DType::U32,
            TensorData::U64(_) => DType::U64,
            TensorData::Bool(_) => DType::Bool,
            TensorData::I4(_) => DType::I4,
            TensorData::U4(_) => DType::U4,
        }
    }

    pub fn len(&self) -> usize {
        with_data!(self, v => v.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// `n` zero elements of `dtype`.
    pub fn zeros(dtype: DType, n: usize) -> TensorData {
        match dtype {
            DType::F32 => TensorData::F32(vec![0.0; n]),
            DType::F64 => TensorData::F64(vec![0.0; n]),
            DType::F16 => TensorData::F16(vec![f16::ZERO; n]),
            DType::BF16 => TensorData::BF16(vec![bf16::ZERO; n]),
            DType::I8 => TensorData::I8(vec![0; n]),
            DType::I16 => TensorData::I16(vec![0; n]),
            DType::I32 => TensorData::I32(vec![0; n]),
            DType::I64 => TensorData::I64(vec![0; n]),
            DType::U8 => TensorData::U8(vec![0; n]),
            DType::U16 => TensorData::U16(vec![0; n]),
            DType::U32 => TensorData::U32(vec![0; n]),
            DType::U64 => TensorData::U64(vec![0; n]),
            DType::Bool => TensorData::Bool(vec![false; n]),
            DType::I4 => TensorData::I4(vec![0; n]),
            DType::U4 => TensorData::U4(vec![0; n]),
        }
    }

    /// Builds data of `dtype` from f64 values (used for attribute constants and casts).
    pub fn from_f64s(dtype: DType, vals: impl Iterator<Item = f64>) -> TensorData {
        match dtype {
            DType::F32 => TensorData::F32(vals.map(|v| v as f32).collect()),
            DType::F64 => TensorData::F64(vals.collect()),
            DType::F16 => TensorData::F16(vals.map(f16::from_f64).collect()),
            DType::BF16 => TensorData::BF16(vals.map(bf16::from_f64).collect()),
            DType::I8 => TensorData::I8(vals.map(|v| v as i8).collect()),
            DType::I16 => TensorData::I16(vals.map(|v| v as i16).collect()),
            DType::I32 => TensorData::I32(vals.map(|v| v as i32).collect()),
            DType::I64 => TensorData::I64(vals.map(|v| v as i64).collect()),
            DType::U8 => TensorData::U8(vals.map(|v| v as u8).collect()),
            DType::U16 => TensorData::U16(vals.map(|v| v as u16).collect()),
            DType::U32 => TensorData::U32(vals.map(|v| v as u32).collect()),
            DType::U64 => TensorData::U64(vals.map(|v| v as u64).collect()),
            DType::Bool => TensorData::Bool(vals.map(|v| v != 0.0).collect()),
            DType::I4 => TensorData::I4(vals.map(|v| (v as i64).clamp(-8, 7) as i8).collect()),
            DType::U4 => TensorData::U4(vals.map(|v| (v as i64).clamp(0, 15) as u8).collect()),
        }
    }

    /// All elements as f64 (exact for every type except 64-bit integers above 2^53).
    pub fn to_f64_vec(&self) -> Vec<f64> {
        with_data!(self, v => v.iter().map(|x| x.to_f64()).collect())
    }

    /// All elements as i64 (floats truncate toward zero).
    pub fn to_i64_vec(&self) -> Vec<i64> {
        with_data!(self, v => v.iter().map(|x| x.to_i64()).collect())
    }

    /// Gathers elements by index into new data of the same type.
    pub fn gather(&self, idx: &[usize]) -> TensorData {
        map_data!(self, v => idx.iter().map(|&i| v[i]).collect())
    }
}

/// Elem impls for the unpacked 4-bit types live on wrapper-free vectors, so they are not
/// `Elem`; this helper converts them for the generic kernels that need `Elem`.
impl TensorData {
    /// Returns data whose variant has an `Elem` type: 4-bit types widen to i8 / u8.
    pub fn widen_4bit(self) -> TensorData {
        match self {
            TensorData::I4(v) => TensorData::I8(v),
            TensorData::U4(v) => TensorData::U8(v),
            other => other,
        }
    }
}

/// A dense row-major tensor.
#[derive(Clone, PartialEq)]
pub struct Tensor {
    pub shape: Vec<usize>,
    pub data: TensorData,
}

impl fmt::Debug for Tensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Tensor<{}{:?}>", self.dtype(), self.shape)
    }
}

pub fn numel(shape: &[usize]) -> usize {
    shape.iter().product()
}

/// Row-major strides (in elements) of a shape.
pub fn strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1];
    }
    s
}

impl Tensor {
    /// A tensor from data; the caller guarantees `data.len() == numel(shape)`.
    pub fn new(shape: Vec<usize>, data: TensorData) -> Tensor {
        debug_assert_eq!(
            numel(&shape),
            data.len(),
            "tensor shape {shape:?} does not match data"
        );
        Tensor { shape, data }
    }

    pub fn from_vec<T: Elem>(shape: Vec<usize>, v: Vec<T>) -> Tensor {
        Tensor::new(shape, T::into_data(v))
    }

    pub fn scalar<T: Elem>(v: T) -> Tensor {
        Tensor::new(vec![], T::into_data(vec![v]))
    }

    pub fn zeros(dtype: DType, shape: Vec<usize>) -> Tensor {
        let n = numel(&shape);
        Tensor::new(shape, TensorData::zeros(dtype, n))
    }

    pub fn dtype(&self) -> DType {
        self.data.dtype()
    }

    pub fn rank(&self) -> usize {
        self.shape.len()
    }

    pub fn numel(&self) -> usize {
        numel(&self.shape)
    }

    pub fn as_slice<T: Elem>(&self) -> Option<&[T]> {
        T::slice(&self.data)
    }

    pub fn to_f64_vec(&self) -> Vec<f64> {
        self.data.to_f64_vec()
    }

    pub fn to_i64_vec(&self) -> Vec<i64> {
        self.data.to_i64_vec()
    }

    /// The same data under another shape with the same element count.
    pub fn reshaped(&self, shape: Vec<usize>) -> Tensor {
        Tensor::new(shape, self.data.clone())
    }

    /// Raw little-endian bytes, packed two per byte (low nibble first) for 4-bit types.
    pub fn to_le_bytes(&self) -> Vec<u8> {
        fn raw<T: bytemuck::Pod>(v: &[T]) -> Vec<u8> {
            bytemuck::cast_slice(v).to_vec()
        }
        fn pack(v: impl ExactSizeIterator<Item = u8>) -> Vec<u8> {
            let n = v.len();
            let mut out = vec![0u8; n.div_ceil(2)];
            for (i, x) in v.enumerate() {
                out[i / 2] |= (x & 0xF) << (4 * (i % 2));
            }
            out
        }
        match &self.data {
            TensorData::F32(v) => raw(v),
            TensorData::F64(v) => raw(v),
            TensorData::F16(v) => raw(v),
            TensorData::BF16(v) => raw(v),
            TensorData::I8(v) => raw(v),
            TensorData::I16(v) => raw(v),
            TensorData::I32(v) => raw(v),
            TensorData::I64(v) => raw(v),
            TensorData::U8(v) => v.clone(),
            TensorData::U16(v) => raw(v),
            TensorData::U32(v) => raw(v),
            TensorData::U64(v) => raw(v),
            TensorData::Bool(v) => v.iter().map(|&b| b as u8).collect(),
            TensorData::I4(v) => pack(v.iter().map(|&x| x as u8)),
            TensorData::U4(v) => pack(v.iter().copied()),
        }
    }

    /// Decodes raw little-endian bytes (as written by [`Tensor::to_le_bytes`]). Returns `None`
    /// when the byte length does not match the shape.
    pub fn from_le_bytes(dtype: DType, shape: Vec<usize>, bytes: &[u8]) -> Option<Tensor> {
        let n = numel(&shape);
        if bytes.len() != dtype.storage_bytes(n) {
            return None;
        }
        fn read<T: bytemuck::Pod>(b: &[u8]) -> Vec<T> {
            // `pod_collect_to_vec` copies through an aligned buffer: the input slice may sit at
            // any offset of a memory-mapped file.
            bytemuck::pod_collect_to_vec(b)
        }
        let nib = |i: usize| (bytes[i / 2] >> (4 * (i % 2))) & 0xF;
        let data = match dtype {
            DType::F32 => TensorData::F32(read(bytes)),
            DType::F64 => TensorData::F64(read(bytes)),
            DType::F16 => {
                TensorData::F16(read::<u16>(bytes).into_iter().map(f16::from_bits).collect())
            }
            DType::BF16 => TensorData::BF16(
                read::<u16>(bytes)
                    .into_iter()
                    .map(bf16::from_bits)
                    .collect(),
            ),
            DType::I8 => TensorData::I8(bytes.iter().map(|&b| b as i8).collect()),
            DType::I16 => TensorData::I16(read(bytes)),
            DType::I32 => TensorData::I32(read(bytes)),
            DType::I64 => TensorData::I64(read(bytes)),
            DType::U8 => TensorData::U8(bytes.to_vec()),
            DType::U16 => TensorData::U16(read(bytes)),
            DType::U32 => TensorData::U32(read(bytes)),
            DType::U64 => TensorData::U64(read(bytes)),
            DType::Bool => TensorData::Bool(bytes.iter().map(|&b| b != 0).collect()),
            DType::I4 => TensorData::I4((0..n).map(|i| ((nib(i) << 4) as i8) >> 4).collect()),
            DType::U4 => TensorData::U4((0..n).map(nib).collect()),
        };
        Some(Tensor::new(shape, data))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_round_trip_every_dtype() {
        for dt in DType::ALL {
            let vals = [0.0, 1.0, 3.0, 7.0, 5.0];
            let t = Tensor::new(vec![5], TensorData::from_f64s(dt, vals.iter().copied()));
            let b = t.to_le_bytes();
            assert_eq!(b.len(), dt.storage_bytes(5), "{dt}");
            let back = Tensor::from_le_bytes(dt, vec![5], &b).unwrap();
            assert_eq!(back, t, "{dt}");
        }
        let t = Tensor::new(vec![3], TensorData::I4(vec![-8, 7, -1]));
        assert_eq!(t.to_le_bytes(), vec![0x78, 0x0F]);
        assert_eq!(
            Tensor::from_le_bytes(DType::I4, vec![3], &[0x78, 0x0F]).unwrap(),
            t
        );
        assert!(Tensor::from_le_bytes(DType::F32, vec![3], &[0; 8]).is_none());
    }

    #[test]
    fn row_major_strides() {
        assert_eq!(strides(&[2, 3, 4]), vec![12, 4, 1]);
        assert_eq!(strides(&[]), Vec::<usize>::new());
    }
}
