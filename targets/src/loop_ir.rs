//! The loop-level kernel IR: every graph op (or fused group) becomes a [`Kernel`], a loop nest
//! over flat buffers with scalar expressions. One IR serves every backend; schedules annotate
//! and transform loops ([`LoopKind`]) instead of forking the lowering. Buffers are referred to
//! by their position in the kernel's parameter list; loop variables and scalar locals by
//! [`VarId`]. The text form (`Display`) is used by snapshot tests.

use std::fmt;

/// Element type of buffers and expressions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Scalar {
    F32,
    F64,
    I8,
    I16,
    I32,
    I64,
    U8,
    U16,
    U32,
    U64,
    /// Booleans, stored as one byte (0 or 1).
    Bool,
    /// IEEE half precision, a storage type only: it is loaded, stored and moved as its 16 raw
    /// bits (an unsigned 16-bit integer); arithmetic on it is refused. Kernels widen it to f32
    /// with integer bit operations and [`UnOp::BitsToF32`] (see `lower::f16_to_f32`).
    F16,
}

impl Scalar {
    pub fn bytes(self) -> usize {
        match self {
            Scalar::I8 | Scalar::U8 | Scalar::Bool => 1,
            Scalar::I16 | Scalar::U16 | Scalar::F16 => 2,
            Scalar::F32 | Scalar::I32 | Scalar::U32 => 4,
            Scalar::F64 | Scalar::I64 | Scalar::U64 => 8,
        }
    }

    pub fn is_float(self) -> bool {
        matches!(self, Scalar::F32 | Scalar::F64)
    }

    pub fn is_unsigned(self) -> bool {
        matches!(
            self,
            Scalar::U8 | Scalar::U16 | Scalar::U32 | Scalar::U64 | Scalar::Bool | Scalar::F16
        )
    }
}

pub type VarId = usize;

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Const {
    F32(f32),
    I64(i64),
    I32(i32),
    Bool(bool),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BinOp {
    Add,
    Sub,
    Mul,
    Div,
    Min,
    Max,
    /// Integer remainder (truncating) / float fmod.
    Rem,
    Pow,
    And,
    Or,
    Xor,
    /// Logical shifts of unsigned integers (a shift by the width or more gives 0).
    Shl,
    Shr,
    /// Dot product of the four bytes of two i32 words: byte `i` of the first operand, an
    /// unsigned value that must be at most 127, times byte `i` of the second, signed, summed
    /// into an i32. Exact on every target: x86's `pmaddubsw` then `pmaddwd` cannot saturate
    /// under that bound (2 x 127 x 127 < 2^15), and NEON's `sdot` sees the same value whether
    /// it reads the first operand's bytes signed or not. `Add(acc, DotBytes(w, a))` is one
    /// `sdot` with dotprod.
    DotBytes,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UnOp {
    Neg,
    Abs,
    Sqrt,
    Exp,
    Log,
    Tanh,
    Erf,
    Sigmoid,
    Floor,
    Ceil,
    Not,
    Recip,
    Sin,
    Cos,
    /// Round half to even.
    Round,
    /// Float -> bool.
    IsNaN,
    /// Reinterprets the bits of an i32 as an f32.
    BitsToF32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CmpOp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Expr {
    Const(Const),
    Var(VarId),
    Load {
        buf: usize,
        index: Box<Expr>,
    },
    Bin {
        op: BinOp,
        a: Box<Expr>,
        b: Box<Expr>,
    },
    Un {
        op: UnOp,
        a: Box<Expr>,
    },
    Cmp {
        op: CmpOp,
        a: Box<Expr>,
        b: Box<Expr>,
    },
    Select {
        cond: Box<Expr>,
        a: Box<Expr>,
        b: Box<Expr>,
    },
    Cast {
        to: Scalar,
        a: Box<Expr>,
    },
}

#[allow(clippy::should_implement_trait)]
impl Expr {
    pub fn f32(v: f32) -> Expr {
        Expr::Const(Const::F32(v))
    }
    pub fn i64(v: i64) -> Expr {
        Expr::Const(Const::I64(v))
    }
    pub fn var(v: VarId) -> Expr {
        Expr::Var(v)
    }
    pub fn load(buf: usize, index: Expr) -> Expr {
        Expr::Load {
            buf,
            index: Box::new(index),
        }
    }
    pub fn bin(op: BinOp, a: Expr, b: Expr) -> Expr {
        Expr::Bin {
            op,
            a: Box::new(a),
            b: Box::new(b),
        }
    }
    pub fn un(op: UnOp, a: Expr) -> Expr {
        Expr::Un { op, a: Box::new(a) }
    }
    pub fn cmp(op: CmpOp, a: Expr, b: Expr) -> Expr {
        Expr::Cmp {
            op,
            a: Box::new(a),
            b: Box::new(b),
        }
    }
    pub fn select(cond: Expr, a: Expr, b: Expr) -> Expr {
        Expr::Select {
            cond: Box::new(cond),
            a: Box::new(a),
            b: Box::new(b),
        }
    }
    pub fn cast(to: Scalar, a: Expr) -> Expr {
        Expr::Cast { to, a: Box::new(a) }
    }
    pub fn add(a: Expr, b: Expr) -> Expr {
        // Fold index arithmetic with constant zero so printed kernels stay readable.
        match (&a, &b) {
            (Expr::Const(Const::I64(0)), _) => b,
            (_, Expr::Const(Const::I64(0))) => a,
            (Expr::Const(Const::I64(x)), Expr::Const(Const::I64(y))) => Expr::i64(x + y),
            _ => Expr::bin(BinOp::Add, a, b),
        }
    }
    pub fn mul(a: Expr, b: Expr) -> Expr {
        match (&a, &b) {
            (Expr::Const(Const::I64(0)), _) | (_, Expr::Const(Const::I64(0))) => Expr::i64(0),
            (Expr::Const(Const::I64(1)), _) => b,
            (_, Expr::Const(Const::I64(1))) => a,
            (Expr::Const(Const::I64(x)), Expr::Const(Const::I64(y))) => Expr::i64(x * y),
            _ => Expr::bin(BinOp::Mul, a, b),
        }
    }
    pub fn sub(a: Expr, b: Expr) -> Expr {
        Expr::bin(BinOp::Sub, a, b)
    }
    pub fn div(a: Expr, b: Expr) -> Expr {
        Expr::bin(BinOp::Div, a, b)
    }
    pub fn max(a: Expr, b: Expr) -> Expr {
        Expr::bin(BinOp::Max, a, b)
    }
    pub fn min(a: Expr, b: Expr) -> Expr {
        Expr::bin(BinOp::Min, a, b)
    }

    /// Replaces every use of variable `v` by `with`.
    pub fn substitute(&self, v: VarId, with: &Expr) -> Expr {
        match self {
            Expr::Var(x) if *x == v => with.clone(),
            Expr::Const(_) | Expr::Var(_) => self.clone(),
            Expr::Load { buf, index } => Expr::load(*buf, index.substitute(v, with)),
            Expr::Bin { op, a, b } => Expr::bin(*op, a.substitute(v, with), b.substitute(v, with)),
            Expr::Un { op, a } => Expr::un(*op, a.substitute(v, with)),
            Expr::Cmp { op, a, b } => Expr::cmp(*op, a.substitute(v, with), b.substitute(v, with)),
            Expr::Select { cond, a, b } => Expr::select(
                cond.substitute(v, with),
                a.substitute(v, with),
                b.substitute(v, with),
            ),
            Expr::Cast { to, a } => Expr::cast(*to, a.substitute(v, with)),
        }
    }
}

/// How a loop is executed, set by schedules.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoopKind {
    Serial,
    /// The body is replicated this many times per iteration (extent is a multiple).
    Unrolled(usize),
    /// Iterations are split over the runtime's threads (outermost loop only).
    Parallel,
    /// Runs `lanes` consecutive iterations at once in SIMD registers (then a scalar tail):
    /// loads and stores whose index advances by 1 with the loop variable become vector
    /// accesses, loop-invariant ones are broadcast, locals assigned inside become vectors.
    /// With `jam > 1`, `jam` vectors of iterations are interleaved statement by statement
    /// (unroll-and-jam): inner loops run once for all of them and each copy has its own
    /// locals, so loop-invariant values (a row of A) are loaded once for several vectors.
    Vectorized {
        lanes: usize,
        jam: usize,
    },
}

#[derive(Clone, Debug, PartialEq)]
pub enum Stmt {
    Loop {
        var: VarId,
        extent: usize,
        kind: LoopKind,
        body: Vec<Stmt>,
    },
    Store {
        buf: usize,
        index: Expr,
        value: Expr,
    },
    /// Assigns a scalar local (accumulators, temporaries).
    Assign { var: VarId, value: Expr },
    /// Calls a leaf routine that is not written in the loop IR (see [`Microkernel`]); it
    /// reads and writes memory only through its address arguments.
    Call {
        kernel: Microkernel,
        args: Vec<CallArg>,
    },
}

/// A routine emitted as hand-scheduled machine code (see [`crate::microkernel`]), called from
/// kernels through [`Stmt::Call`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Microkernel {
    /// x86-64 with AVX2 and FMA: `(a, lda_bytes, b, y, ldy_bytes, kc)`, a tile of `rows` (1 to
    /// 6) rows of A times one packed 16-column panel of B over `kc` reduction steps, stored
    /// to Y or, with `accumulate`, added to it.
    SgemmAvx2 { rows: u8, accumulate: bool },
    /// x86-64 (SSE4.1, or AVX2 with F16C, or also AVX-VNNI, as the tile says): `(data,
    /// a_codes, a_scales, a_sums, y)`, one row of int8 activations times one span of 4-bit
    /// weight columns of a MatMulNBits, stored to Y.
    Q4Int8(crate::microkernel::Q4Int8Tile),
}

impl Microkernel {
    /// The symbol name of the routine in an artifact.
    pub fn name(&self) -> String {
        match self {
            Microkernel::SgemmAvx2 { rows, accumulate } => format!(
                "kiln_uk_sgemm_avx2_{rows}x16{}",
                if *accumulate { "_acc" } else { "" }
            ),
            Microkernel::Q4Int8(t) => format!(
                "kiln_uk_q4i8_{}_{}c_{}x{}w{}_{}",
                t.dot.name(),
                t.columns(),
                t.blocks,
                t.block_words,
                if t.tail_words > 0 {
                    format!("_t{}", t.tail_words)
                } else {
                    String::new()
                },
                if t.half_scales { "f16" } else { "f32" }
            ),
        }
    }

    /// The CPU features the routine needs (names as in [`crate::Target::required_features`]).
    pub fn required_features(&self) -> &'static [&'static str] {
        match self {
            Microkernel::SgemmAvx2 { .. } => &["avx2", "fma"],
            Microkernel::Q4Int8(t) => {
                use crate::microkernel::Q4Dot;
                match (t.dot, t.half_scales) {
                    (Q4Dot::Sse, _) => &["sse4.1"],
                    (Q4Dot::Avx2, true) => &["avx2", "f16c"],
                    (Q4Dot::Avx2, false) => &["avx2"],
                    (Q4Dot::AvxVnni, true) => &["avx2", "avxvnni", "f16c"],
                    (Q4Dot::AvxVnni, false) => &["avx2", "avxvnni"],
                }
            }
        }
    }
}

/// An argument of a [`Stmt::Call`].
#[derive(Clone, Debug, PartialEq)]
pub enum CallArg {
    /// The address of element `index` of buffer `buf`.
    Addr { buf: usize, index: Expr },
    /// A 64-bit integer.
    Int(Expr),
}

/// A buffer parameter of a kernel.
#[derive(Clone, Debug, PartialEq)]
pub struct Param {
    pub name: String,
    pub scalar: Scalar,
    pub len: usize,
    pub writes: bool,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Kernel {
    pub name: String,
    pub params: Vec<Param>,
    /// Type of every variable; loop variables are `I64`.
    pub vars: Vec<Scalar>,
    pub body: Vec<Stmt>,
    /// Whether `a * b + c` on f32 may be computed as one fused multiply-add (one rounding
    /// instead of two) where the target has it. Set for matrix products, whose reference
    /// tolerance covers the difference; off elsewhere, so that kernels defined to match the
    /// interpreter bit for bit (int8 products) stay exact.
    pub contract: bool,
}

impl Kernel {
    pub fn new(name: impl Into<String>) -> Kernel {
        Kernel {
            name: name.into(),
            params: Vec::new(),
            vars: Vec::new(),
            body: Vec::new(),
            contract: false,
        }
    }

    pub fn param(
        &mut self,
        name: impl Into<String>,
        scalar: Scalar,
        len: usize,
        writes: bool,
    ) -> usize {
        self.params.push(Param {
            name: name.into(),
            scalar,
            len,
            writes,
        });
        self.params.len() - 1
    }

    pub fn new_var(&mut self, s: Scalar) -> VarId {
        self.vars.push(s);
        self.vars.len() - 1
    }

    /// The type of an expression. Constants adapt to the other operand of a binary op, so a
    /// binary expression has the type of its first non-constant operand.
    pub fn expr_type(&self, e: &Expr) -> Scalar {
        match e {
            Expr::Const(Const::F32(_)) => Scalar::F32,
            Expr::Const(Const::I64(_)) => Scalar::I64,
            Expr::Const(Const::I32(_)) => Scalar::I32,
            Expr::Const(Const::Bool(_)) => Scalar::Bool,
            Expr::Var(v) => self.vars[*v],
            Expr::Load { buf, .. } => self.params[*buf].scalar,
            Expr::Bin { a, b, .. } => self.operand_type(a, b),
            Expr::Un {
                op: UnOp::IsNaN, ..
            } => Scalar::Bool,
            Expr::Un {
                op: UnOp::BitsToF32,
                ..
            } => Scalar::F32,
            Expr::Un { a, .. } => self.expr_type(a),
            Expr::Cmp { .. } => Scalar::Bool,
            Expr::Select { a, b, .. } => self.operand_type(a, b),
            Expr::Cast { to, .. } => *to,
        }
    }

    /// The type two operands are computed in: that of the first non-constant one.
    pub fn operand_type(&self, a: &Expr, b: &Expr) -> Scalar {
        if matches!(a, Expr::Const(_)) && !matches!(b, Expr::Const(_)) {
            self.expr_type(b)
        } else {
            self.expr_type(a)
        }
    }
}

/// Builds nested loops over `extents`, returning the loop variables and a closure-free way to
/// put the body in: `nest(k, &[2,3], |vars| body)`.
pub fn nest(
    k: &mut Kernel,
    extents: &[usize],
    body: impl FnOnce(&mut Kernel, &[VarId]) -> Vec<Stmt>,
) -> Vec<Stmt> {
    let vars: Vec<VarId> = extents.iter().map(|_| k.new_var(Scalar::I64)).collect();
    let mut stmts = body(k, &vars);
    for (d, &e) in extents.iter().enumerate().rev() {
        if e == 1 {
            // A loop of one iteration is just its body with the variable at 0.
            stmts.insert(
                0,
                Stmt::Assign {
                    var: vars[d],
                    value: Expr::i64(0),
                },
            );
        } else {
            stmts = vec![Stmt::Loop {
                var: vars[d],
                extent: e,
                kind: LoopKind::Serial,
                body: stmts,
            }];
        }
    }
    stmts
}

/// Flat row-major index `sum(vars[d] * strides[d]) + offset`.
pub fn index(vars: &[VarId], strides: &[usize], offset: usize) -> Expr {
    let mut e = Expr::i64(offset as i64);
    for (&v, &s) in vars.iter().zip(strides) {
        if s != 0 {
            e = Expr::add(e, Expr::mul(Expr::var(v), Expr::i64(s as i64)));
        }
    }
    e
}

/// An integer index as `constant + sum of coefficient * variable` (see [`linear_index`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LinearIndex {
    /// Variables with their non-zero coefficients, by variable.
    pub terms: std::collections::BTreeMap<VarId, i64>,
    pub constant: i64,
}

impl LinearIndex {
    fn scaled(mut self, c: i64) -> LinearIndex {
        self.constant = self.constant.wrapping_mul(c);
        self.terms.retain(|_, k| {
            *k = k.wrapping_mul(c);
            *k != 0
        });
        self
    }

    fn plus(mut self, other: LinearIndex, sign: i64) -> LinearIndex {
        self.constant = self
            .constant
            .wrapping_add(other.constant.wrapping_mul(sign));
        for (v, k) in other.terms {
            let t = self.terms.entry(v).or_insert(0);
            *t = t.wrapping_add(k.wrapping_mul(sign));
            if *t == 0 {
                self.terms.remove(&v);
            }
        }
        self
    }
}

/// An i64 index expression made of i64 constants, variables, sums, differences and products
/// by constants, as a [`LinearIndex`]; `None` for anything else (a load, a product of two
/// variables, a division).
pub fn linear_index(e: &Expr) -> Option<LinearIndex> {
    Some(match e {
        Expr::Const(Const::I64(c)) => LinearIndex {
            constant: *c,
            ..LinearIndex::default()
        },
        Expr::Var(v) => LinearIndex {
            terms: [(*v, 1)].into_iter().collect(),
            constant: 0,
        },
        Expr::Bin {
            op: op @ (BinOp::Add | BinOp::Sub),
            a,
            b,
        } => {
            let sign = if *op == BinOp::Add { 1 } else { -1 };
            linear_index(a)?.plus(linear_index(b)?, sign)
        }
        Expr::Bin {
            op: BinOp::Mul,
            a,
            b,
        } => match (&**a, &**b) {
            (Expr::Const(Const::I64(c)), x) | (x, Expr::Const(Const::I64(c))) => {
                linear_index(x)?.scaled(*c)
            }
            _ => return None,
        },
        _ => return None,
    })
}

/// The coefficient of variable `v` in an integer index expression, if the expression is linear
/// in `v` (sums and products by constants of variables and constants). `Some(0)`: independent.
pub fn linear_coeff(e: &Expr, v: VarId) -> Option<i64> {
    match e {
        Expr::Const(_) => Some(0),
        Expr::Var(x) => Some(if *x == v { 1 } else { 0 }),
        Expr::Bin {
            op: BinOp::Add,
            a,
            b,
        } => Some(linear_coeff(a, v)? + linear_coeff(b, v)?),
        Expr::Bin {
            op: BinOp::Sub,
            a,
            b,
        } => Some(linear_coeff(a, v)? - linear_coeff(b, v)?),
        Expr::Bin {
            op: BinOp::Mul,
            a,
            b,
        } => match (&**a, &**b) {
            (Expr::Const(Const::I64(c)), x) | (x, Expr::Const(Const::I64(c))) => {
                Some(c * linear_coeff(x, v)?)
            }
            (x, y) => (linear_coeff(x, v)? == 0 && linear_coeff(y, v)? == 0).then_some(0),
        },
        other => (!mentions(other, v)).then_some(0),
    }
}

/// Whether `e` reads variable `v`.
pub fn mentions(e: &Expr, v: VarId) -> bool {
    match e {
        Expr::Const(_) => false,
        Expr::Var(x) => *x == v,
        Expr::Load { index, .. } => mentions(index, v),
        Expr::Bin { a, b, .. } | Expr::Cmp { a, b, .. } => mentions(a, v) || mentions(b, v),
        Expr::Un { a, .. } | Expr::Cast { a, .. } => mentions(a, v),
        Expr::Select { cond, a, b } => mentions(cond, v) || mentions(a, v) || mentions(b, v),
    }
}

// ---- text form

impl fmt::Display for Expr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Expr::Const(Const::F32(v)) => write!(f, "{v:?}f"),
            Expr::Const(Const::I64(v)) => write!(f, "{v}"),
            Expr::Const(Const::I32(v)) => write!(f, "{v}i32"),
            Expr::Const(Const::Bool(v)) => write!(f, "{v}"),
            Expr::Var(v) => write!(f, "v{v}"),
            Expr::Load { buf, index } => write!(f, "b{buf}[{index}]"),
            Expr::Bin { op, a, b } => write!(f, "{op:?}({a}, {b})"),
            Expr::Un { op, a } => write!(f, "{op:?}({a})"),
            Expr::Cmp { op, a, b } => write!(f, "{op:?}({a}, {b})"),
            Expr::Select { cond, a, b } => write!(f, "select({cond}, {a}, {b})"),
            Expr::Cast { to, a } => write!(f, "cast<{to:?}>({a})"),
        }
    }
}

/// Adds to `out` every local assigned anywhere in `stmts`.
pub fn assigned_vars(stmts: &[Stmt], out: &mut std::collections::HashSet<VarId>) {
    for s in stmts {
        match s {
            Stmt::Assign { var, .. } => {
                out.insert(*var);
            }
            Stmt::Loop { body, .. } => assigned_vars(body, out),
            Stmt::Store { .. } | Stmt::Call { .. } => {}
        }
    }
}

fn write_stmts(f: &mut fmt::Formatter<'_>, stmts: &[Stmt], depth: usize) -> fmt::Result {
    let pad = "  ".repeat(depth);
    for s in stmts {
        match s {
            Stmt::Loop {
                var,
                extent,
                kind,
                body,
            } => {
                let k = match kind {
                    LoopKind::Serial => String::new(),
                    LoopKind::Unrolled(n) => format!(" unroll({n})"),
                    LoopKind::Parallel => " parallel".into(),
                    LoopKind::Vectorized { lanes, jam: 1 } => format!(" vectorize({lanes})"),
                    LoopKind::Vectorized { lanes, jam } => {
                        format!(" vectorize({lanes}) jam({jam})")
                    }
                };
                writeln!(f, "{pad}for v{var} in 0..{extent}{k} {{")?;
                write_stmts(f, body, depth + 1)?;
                writeln!(f, "{pad}}}")?;
            }
            Stmt::Store { buf, index, value } => writeln!(f, "{pad}b{buf}[{index}] = {value}")?,
            Stmt::Assign { var, value } => writeln!(f, "{pad}v{var} = {value}")?,
            Stmt::Call { kernel, args } => {
                let args: Vec<String> = args
                    .iter()
                    .map(|a| match a {
                        CallArg::Addr { buf, index } => format!("&b{buf}[{index}]"),
                        CallArg::Int(e) => e.to_string(),
                    })
                    .collect();
                writeln!(f, "{pad}call {}({})", kernel.name(), args.join(", "))?
            }
        }
    }
    Ok(())
}

impl fmt::Display for Kernel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "kernel {}{}(",
            self.name,
            if self.contract { " contract" } else { "" }
        )?;
        for (i, p) in self.params.iter().enumerate() {
            writeln!(
                f,
                "  b{i}: {}{:?}[{}] {}",
                if p.writes { "out " } else { "" },
                p.scalar,
                p.len,
                p.name
            )?;
        }
        writeln!(f, ") {{")?;
        write_stmts(f, &self.body, 1)?;
        writeln!(f, "}}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linear_index_collects_terms_and_constant() {
        let (i, j, k) = (0, 1, 2);
        let v = Expr::var;
        let c = Expr::i64;
        // (expression, expected terms, expected constant); None: not linear.
        let cases: Vec<(Expr, Option<(Vec<(VarId, i64)>, i64)>)> = vec![
            (c(7), Some((vec![], 7))),
            (v(i), Some((vec![(i, 1)], 0))),
            (
                Expr::mul(
                    Expr::add(Expr::mul(v(i), c(16)), Expr::add(v(j), c(3))),
                    c(4),
                ),
                Some((vec![(i, 64), (j, 4)], 12)),
            ),
            (
                Expr::sub(Expr::add(v(i), v(j)), Expr::add(v(j), c(1))),
                Some((vec![(i, 1)], -1)),
            ),
            (Expr::mul(v(i), c(0)), Some((vec![], 0))),
            (Expr::mul(v(i), v(k)), None),
            (Expr::div(v(i), c(4)), None),
            (Expr::load(0, v(i)), None),
        ];
        for (e, want) in cases {
            let got =
                linear_index(&e).map(|l| (l.terms.into_iter().collect::<Vec<_>>(), l.constant));
            assert_eq!(got, want, "{e:?}");
        }
    }
}
