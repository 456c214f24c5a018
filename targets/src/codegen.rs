//! Cranelift code generation: every loop-IR kernel becomes one machine function
//! `kernel(bufs: *const *mut u8)`, and the C ABI of `runtime/include/kiln.h` is generated
//! around them (`kiln_run` calls the kernels in order with buffer pointers built from the
//! caller's inputs, outputs and workspace, and from the weights in the read-only segment).
//! Transcendental functions are expanded inline (the artifact imports no libm). All symbol
//! references are colocated, so the relocations are PC-relative and resolved by the artifact
//! writer. The result is an [`ArtifactSpec`].

use crate::artifact::{Arch, ArtifactSpec, DataBlob, FunctionBlob, Reloc, RelocKind};
use crate::loop_ir::*;
use crate::loop_ir::{linear_coeff, linear_index};
use crate::lower::{BufKind, Program};
use crate::Target;
use cranelift_codegen::control::ControlPlane;
use cranelift_codegen::ir::condcodes::{FloatCC, IntCC};
use cranelift_codegen::ir::{
    self, types, AbiParam, ExtFuncData, ExternalName, GlobalValueData, InstBuilder, MemFlagsData,
    Signature, StackSlotData, StackSlotKind, Type, UserExternalName, UserFuncName, Value,
};
use cranelift_codegen::isa::{self, OwnedTargetIsa};
use cranelift_codegen::settings::{self, Configurable};
use cranelift_codegen::{binemit, Context, FinalizedRelocTarget};
use cranelift_frontend::{FunctionBuilder, FunctionBuilderContext, Variable};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum CodegenError {
    #[error("target {0} has no CPU code generator")]
    NoBackend(String),
    #[error("Cranelift setup: {0}")]
    Isa(String),
    #[error("kernel '{kernel}': {reason}")]
    Kernel { kernel: String, reason: String },
    #[error("Cranelift could not compile '{function}': {reason}")]
    Compile { function: String, reason: String },
}

/// Symbol namespaces of `UserExternalName`: functions and data blobs.
const NS_FUNC: u32 = 0;
const NS_DATA: u32 = 1;

/// Maximum rank stored in `kiln_tensor_info` (KILN_MAX_RANK in kiln.h).
pub const MAX_RANK: usize = 8;

pub fn make_isa(target: &Target) -> Result<(OwnedTargetIsa, Arch), CodegenError> {
    let (triple, arch) = match target.isa {
        crate::Isa::X86_64 => ("x86_64-unknown-linux-gnu", Arch::X86_64),
        crate::Isa::Aarch64 if target.name != "aarch64-sve" => {
            ("aarch64-unknown-linux-gnu", Arch::Aarch64)
        }
        _ => return Err(CodegenError::NoBackend(target.name.to_string())),
    };
    let mut flags = settings::builder();
    let set = |f: &mut settings::Builder, k: &str, v: &str| {
        f.set(k, v)
            .map_err(|e| CodegenError::Isa(format!("{k}={v}: {e}")))
    };
    set(&mut flags, "opt_level", "speed")?;
    set(&mut flags, "is_pic", "false")?;
    let mut ib = isa::lookup_by_name(triple).map_err(|e| CodegenError::Isa(e.to_string()))?;
    for f in target.required_features {
        let flag = match *f {
            "sse4.1" => "has_sse41",
            "avx" => "has_avx",
            "avx2" => "has_avx2",
            "fma" => "has_fma",
            "dotprod" => "has_dotprod",
            "avxvnni" => "has_avx_vnni",
            _ => continue,
        };
        ib.enable(flag)
            .map_err(|e| CodegenError::Isa(format!("{flag}: {e}")))?;
    }
    if arch == Arch::X86_64 {
        for f in ["has_sse3", "has_ssse3"] {
            ib.enable(f)
                .map_err(|e| CodegenError::Isa(format!("{f}: {e}")))?;
        }
    }
    let isa = ib
        .finish(settings::Flags::new(flags))
        .map_err(|e| CodegenError::Isa(e.to_string()))?;
    Ok((isa, arch))
}

/// Accumulates compiled functions and data for one artifact.
struct ModuleBuilder {
    isa: OwnedTargetIsa,
    arch: Arch,
    /// Whether the target has vector fused multiply-add (NEON always; x86-64 with FMA).
    fma: bool,
    /// Whether the target has AVX-VNNI (`vpdpbusd`; see [`KernelGen::dot_bytes`]).
    vnni: bool,
    func_names: Vec<String>,
    functions: Vec<FunctionBlob>,
    data: Vec<DataBlob>,
    /// `KILN_DUMP_CLIF=SUFFIX`: print the CLIF, the optimized CLIF and the machine code of
    /// every function whose name ends with SUFFIX (a developer's aid; see ARCHITECTURE.md).
    dump_clif: Option<String>,
}

impl ModuleBuilder {
    fn ptr(&self) -> Type {
        types::I64
    }

    fn add_data(&mut self, name: impl Into<String>, bytes: Vec<u8>, align: u64) -> u32 {
        self.data.push(DataBlob {
            name: name.into(),
            bytes,
            align,
        });
        (self.data.len() - 1) as u32
    }

    /// Reserves a function index (so callers can reference it before it is compiled).
    fn declare_function(&mut self, name: impl Into<String>) -> u32 {
        self.func_names.push(name.into());
        (self.func_names.len() - 1) as u32
    }

    fn compile(&mut self, index: u32, func: ir::Function) -> Result<(), CodegenError> {
        let name = self.func_names[index as usize].clone();
        let names = func.params.user_named_funcs().clone();
        let mut ctx = Context::for_function(func);
        let dump = self.dump_clif.as_deref().is_some_and(|d| name.ends_with(d));
        if dump {
            eprintln!("==== {name} before\n{}", ctx.func.display());
            ctx.set_disasm(true);
        }
        let code = ctx
            .compile(&*self.isa, &mut ControlPlane::default())
            .map_err(|e| CodegenError::Compile {
                function: name.clone(),
                reason: format!("{:?}", e.inner),
            })?;
        let bytes = code.code_buffer().to_vec();
        if dump {
            eprintln!(
                "==== {name} vcode\n{}",
                code.vcode.clone().unwrap_or_default()
            );
        }
        let mut relocs = Vec::new();
        for r in code.buffer.relocs() {
            let (target, extra) = match &r.target {
                FinalizedRelocTarget::ExternalName(ExternalName::User(u)) => {
                    let un = &names[*u];
                    let t = match un.namespace {
                        NS_FUNC => self.func_names[un.index as usize].clone(),
                        _ => self.data[un.index as usize].name.clone(),
                    };
                    (t, 0i64)
                }
                FinalizedRelocTarget::Func(off) => (name.clone(), *off as i64),
                other => {
                    return Err(CodegenError::Compile {
                        function: name,
                        reason: format!("unexpected relocation target {other:?}"),
                    })
                }
            };
            let kind = match r.kind {
                binemit::Reloc::X86PCRel4
                | binemit::Reloc::X86CallPCRel4
                | binemit::Reloc::X86CallPLTRel4 => RelocKind::X86PcRel4,
                binemit::Reloc::Arm64Call => RelocKind::Aarch64Call26,
                binemit::Reloc::Aarch64AdrPrelPgHi21 => RelocKind::Aarch64AdrPrelPgHi21,
                binemit::Reloc::Aarch64AddAbsLo12Nc => RelocKind::Aarch64AddAbsLo12Nc,
                other => {
                    return Err(CodegenError::Compile {
                        function: name,
                        reason: format!("unsupported relocation {other:?}"),
                    })
                }
            };
            relocs.push(Reloc {
                offset: r.offset,
                kind,
                target,
                addend: r.addend + extra,
            });
        }
        if dump {
            eprintln!("==== {name} optimized\n{}", ctx.func.display());
        }
        self.functions.push(FunctionBlob {
            name,
            code: bytes,
            align: 16,
            relocs,
        });
        Ok(())
    }

    fn signature(&self, params: &[Type], ret: Option<Type>) -> Signature {
        let mut s = Signature::new(self.isa.default_call_conv());
        s.params.extend(params.iter().map(|&t| AbiParam::new(t)));
        if let Some(r) = ret {
            s.returns.push(AbiParam::new(r));
        }
        s
    }
}

fn clty(s: Scalar) -> Type {
    match s {
        Scalar::F32 => types::F32,
        Scalar::F64 => types::F64,
        Scalar::I8 | Scalar::U8 | Scalar::Bool => types::I8,
        Scalar::I16 | Scalar::U16 | Scalar::F16 => types::I16,
        Scalar::I32 | Scalar::U32 => types::I32,
        Scalar::I64 | Scalar::U64 => types::I64,
    }
}

/// Generated code for one kernel.
struct KernelGen<'a, 'b> {
    b: &'a mut FunctionBuilder<'b>,
    k: &'a Kernel,
    arch: Arch,
    /// Contract `a * b + c` into fused multiply-adds (the kernel allows it, the target has it).
    fma: bool,
    /// The target has AVX-VNNI: byte dot products as the tree Cranelift folds into `vpdpbusd`.
    vnni: bool,
    ptrs: Vec<Value>,
    vars: Vec<Variable>,
    /// Iteration range [start, end) of the kernel's parallel loop (the function's arguments).
    range: (Value, Value),
    /// Set while emitting the body of a vectorized loop.
    vec: Option<VecMode>,
    /// Loop variables whose value is currently an iteration's base plus a constant (the copies
    /// of an unrolled loop body, the copies of a jammed vector loop): addresses use the base
    /// and fold the constant. Entries live until their loop is emitted.
    unrolled: std::collections::HashMap<VarId, (Value, i64)>,
    /// Whether loads from unwritten buffers may be pure (see [`KernelGen::load_flags`]): false when the
    /// step passes a buffer it writes at another parameter too.
    pure_loads: bool,
    /// The strength-reduced addresses of the innermost loop being emitted, if any.
    streams: Option<Streams>,
    /// The artifact's microkernels (function indices) and the references this function has
    /// imported so far.
    microkernels: &'a std::collections::HashMap<Microkernel, u32>,
    call_refs: std::collections::HashMap<Microkernel, ir::FuncRef>,
    call_conv: isa::CallConv,
}

/// Most pointers an innermost loop carries (each holds a register across the loop).
const MAX_STREAMS: usize = 8;

/// Strength reduction of an innermost loop's addresses: every load or store whose index is
/// `invariant + c * var` (the invariant part made of variables the loop does not change) reads
/// through a pointer carried around the loop, set before it to the address at the first
/// iteration and advanced by `c * step` elements per iteration; accesses that differ only in a
/// constant share the pointer and fold the difference into the displacement. Cranelift 0.135
/// hoists nothing out of loops and rematerializes address arithmetic at its uses, so without
/// this each iteration recomputes every address from the loop variables.
struct Streams {
    var: VarId,
    /// (buffer, coefficient of `var`, invariant terms) -> the pointer variable and its value in
    /// the iteration being emitted.
    pointers: std::collections::HashMap<StreamKey, (Variable, Value)>,
}

type StreamKey = (usize, i64, Vec<(VarId, i64)>);

/// An index as (coefficient of the loop's variable, the other terms, constant).
type StreamParts = (i64, Vec<(VarId, i64)>, i64);

/// State of a vectorized loop: its variable, and a vector variable per local it assigns
/// (`vvars`: those of the copy being emitted; `copies`: one set per jammed copy).
struct VecMode {
    var: VarId,
    vvars: std::collections::HashMap<VarId, Variable>,
    copies: Vec<std::collections::HashMap<VarId, Variable>>,
    /// The loop variable's value at the start of the current iteration (jammed loops).
    base: Option<Value>,
}

/// The f32 vector type of vectorized loops (128-bit: NEON and SSE).
const VF32: Type = types::F32X4;
const LANES: usize = 4;

/// The lane type a vector expression of element type `s` is computed in: f32 for floats,
/// i32 for integers (narrower integers are widened on load).
fn lane_class(s: Scalar) -> Scalar {
    if s.is_float() {
        Scalar::F32
    } else {
        Scalar::I32
    }
}

fn vtype(class: Scalar) -> Type {
    if class == Scalar::F32 {
        VF32
    } else {
        types::I32X4
    }
}

/// Unaligned, non-trapping access for vector loads and stores.
fn vflags() -> MemFlagsData {
    MemFlagsData::new().with_notrap()
}

fn flags() -> MemFlagsData {
    MemFlagsData::trusted()
}

impl KernelGen<'_, '_> {
    fn err(&self, reason: impl Into<String>) -> CodegenError {
        CodegenError::Kernel {
            kernel: self.k.name.clone(),
            reason: reason.into(),
        }
    }

    fn expr_type(&self, e: &Expr) -> Scalar {
        self.k.expr_type(e)
    }

    fn operand_type(&self, a: &Expr, b: &Expr) -> Scalar {
        self.k.operand_type(a, b)
    }

    fn fconst(&mut self, v: f32) -> Value {
        self.b.ins().f32const(v)
    }

    /// A constant of type `t` (floats of either width, integers wrap to the width).
    fn typed_const(&mut self, t: Scalar, f: f64, i: i64) -> Value {
        match t {
            Scalar::F32 => self.b.ins().f32const(f as f32),
            Scalar::F64 => self.b.ins().f64const(f),
            other => {
                // iconst immediates must fit the type's width (two's complement bits).
                let ty = clty(other);
                let bits = ty.bits();
                let v = if bits == 64 {
                    i
                } else {
                    i & ((1i64 << bits) - 1)
                };
                self.b.ins().iconst(ty, v)
            }
        }
    }

    /// Emits `e` converted to type `want` (constants are emitted directly in that type).
    fn expr_as(&mut self, e: &Expr, want: Scalar) -> Result<Value, CodegenError> {
        if let Expr::Const(c) = e {
            let (f, i) = match *c {
                Const::F32(v) => (v as f64, v as i64),
                Const::I64(v) => (v as f64, v),
                Const::I32(v) => (v as f64, v as i64),
                Const::Bool(v) => (v as i64 as f64, v as i64),
            };
            return Ok(self.typed_const(want, f, i));
        }
        let from = self.expr_type(e);
        let v = self.expr(e)?;
        Ok(self.cast(from, want, v))
    }

    /// The address of element `index` of buffer `buf`, as a base value and a constant byte
    /// offset for the memory instruction's displacement. The index's constant terms go to the
    /// displacement, so elements a constant apart (the rows of a register tile, the copies of
    /// a jammed vector loop) share one address computation.
    fn address(&mut self, buf: usize, index: &Expr) -> Result<(Value, i32), CodegenError> {
        if let Some(found) = self.stream_address(buf, index) {
            return Ok(found);
        }
        let size = self.k.params[buf].scalar.bytes() as i64;
        let (dynamic, constant) = self.index_parts(index)?;
        let ptr = self.ptrs[buf];
        let (dynamic, offset) = match i32::try_from(constant * size) {
            Ok(off) => (dynamic, off),
            Err(_) => {
                let c = self.b.ins().iconst(types::I64, constant);
                let d = match dynamic {
                    Some(d) => self.b.ins().iadd(d, c),
                    None => c,
                };
                (Some(d), 0)
            }
        };
        let addr = match dynamic {
            Some(d) => {
                let scaled = if size == 1 {
                    d
                } else {
                    self.b.ins().imul_imm_s(d, size)
                };
                self.b.ins().iadd(ptr, scaled)
            }
            None => ptr,
        };
        Ok((addr, offset))
    }

    /// The address of element `index` of `buf` through a pointer of the loop's [`Streams`],
    /// when the index is one of theirs.
    fn stream_address(&self, buf: usize, index: &Expr) -> Option<(Value, i32)> {
        let streams = self.streams.as_ref()?;
        let (coef, rest, constant) = self.stream_parts(streams.var, index)?;
        // In an unrolled or jammed copy the loop's variable is the iteration's base plus a
        // constant, and so is a jammed vector loop's variable around it; the pointer is at
        // the bases.
        let copy = |v: VarId| self.unrolled.get(&v).map_or(0, |&(_, off)| off);
        let mut elements = constant.checked_add(coef.checked_mul(copy(streams.var))?)?;
        // The pointers are at the base of a jammed vector loop around this one.
        if let Some((jam, _)) = self.jammed_base() {
            if let Some(&(_, c)) = rest.iter().find(|(v, _)| *v == jam) {
                elements = elements.checked_add(c.checked_mul(copy(jam))?)?;
            }
        }
        let &(_, pointer) = streams.pointers.get(&(buf, coef, rest))?;
        let size = self.k.params[buf].scalar.bytes() as i64;
        let off = i32::try_from(elements.checked_mul(size)?).ok()?;
        Some((pointer, off))
    }

    /// An index as (coefficient of `var`, the other terms, constant) when it is linear, its
    /// other variables are i64 and it depends on `var`.
    fn stream_parts(&self, var: VarId, index: &Expr) -> Option<StreamParts> {
        let form = linear_index(index)?;
        let coef = *form.terms.get(&var)?;
        let rest: Vec<(VarId, i64)> = form
            .terms
            .iter()
            .filter(|(v, _)| **v != var)
            .map(|(&v, &c)| (v, c))
            .collect();
        if rest.iter().any(|&(v, _)| self.k.vars[v] != Scalar::I64) {
            return None;
        }
        Some((coef, rest, form.constant))
    }

    /// Sets up [`Streams`] for a loop over `var` from `start` whose body is about to be emitted
    /// (called before the jump into the loop): one pointer per distinct (buffer, coefficient,
    /// invariant terms) of the body's loads and stores, if the body has no inner loop. The
    /// invariant terms must be variables the body does not assign and whose value stays put
    /// while it is emitted, or the variable of a jammed vector loop around it, whose copies
    /// move it by constants: its term is taken at the vector iteration's base.
    fn plan_streams(
        &mut self,
        var: VarId,
        start: Value,
        body: &[Stmt],
    ) -> Vec<(StreamKey, Variable)> {
        if body.iter().any(contains_loop) {
            return Vec::new();
        }
        let mut assigned = std::collections::HashSet::new();
        assigned_vars(body, &mut assigned);
        let jammed = self.jammed_base();
        // A jammed vector loop's variable without a known base (none is emitted yet) moves.
        let unknown_jam = self
            .vec
            .as_ref()
            .filter(|m| m.copies.len() > 1 && jammed.is_none())
            .map(|m| m.var);
        let vector_locals: std::collections::HashSet<VarId> = self
            .vec
            .as_ref()
            .map(|m| m.vvars.keys().copied().collect())
            .unwrap_or_default();
        let mut accesses = Vec::new();
        for s in body {
            collect_accesses(s, &mut accesses);
        }
        let mut keys: Vec<StreamKey> = Vec::new();
        for (buf, index) in accesses {
            if self.expr_type(index) != Scalar::I64 {
                continue;
            }
            let Some((coef, rest, _)) = self.stream_parts(var, index) else {
                continue;
            };
            let stays = rest.iter().all(|(v, _)| {
                !assigned.contains(v) && !vector_locals.contains(v) && Some(*v) != unknown_jam
            });
            let key = (buf, coef, rest);
            if stays && !keys.contains(&key) && keys.len() < MAX_STREAMS {
                keys.push(key);
            }
        }
        keys.into_iter()
            .map(|key| {
                let (buf, coef, rest) = &key;
                let size = self.k.params[*buf].scalar.bytes() as i64;
                let mut at = self.b.ins().imul_imm_s(start, coef * size);
                for &(v, c) in rest {
                    let x = match jammed {
                        Some((jam, base)) if jam == v => base,
                        _ => self.b.use_var(self.vars[v]),
                    };
                    let x = self.b.ins().imul_imm_s(x, c * size);
                    at = self.b.ins().iadd(at, x);
                }
                let first = self.b.ins().iadd(self.ptrs[*buf], at);
                let pointer = self.b.declare_var(types::I64);
                self.b.def_var(pointer, first);
                (key, pointer)
            })
            .collect()
    }

    /// The variable of the jammed vector loop being emitted, if any, with its value at the
    /// start of the vector iteration.
    fn jammed_base(&self) -> Option<(VarId, Value)> {
        let m = self.vec.as_ref().filter(|m| m.copies.len() > 1)?;
        Some((m.var, m.base?))
    }

    /// An i64 index split into its non-constant part (none when it is constant) and its
    /// constant term, through sums and products by constants.
    fn index_parts(&mut self, e: &Expr) -> Result<(Option<Value>, i64), CodegenError> {
        if self.expr_type(e) != Scalar::I64 {
            return Ok((Some(self.expr_as(e, Scalar::I64)?), 0));
        }
        Ok(match e {
            Expr::Const(Const::I64(c)) => (None, *c),
            Expr::Var(v) => match self.unrolled.get(v) {
                Some(&(base, off)) => (Some(base), off),
                None => (Some(self.expr_as(e, Scalar::I64)?), 0),
            },
            Expr::Bin {
                op: BinOp::Add,
                a,
                b,
            } => {
                let (da, ca) = self.index_parts(a)?;
                let (db, cb) = self.index_parts(b)?;
                let d = match (da, db) {
                    (Some(x), Some(y)) => Some(self.b.ins().iadd(x, y)),
                    (x, y) => x.or(y),
                };
                (d, ca.wrapping_add(cb))
            }
            Expr::Bin {
                op: BinOp::Mul,
                a,
                b,
            } if matches!(**a, Expr::Const(Const::I64(_)))
                || matches!(**b, Expr::Const(Const::I64(_))) =>
            {
                let (x, c) = match (&**a, &**b) {
                    (Expr::Const(Const::I64(c)), x) | (x, Expr::Const(Const::I64(c))) => (x, *c),
                    _ => unreachable!("matched above"),
                };
                let (d, k) = self.index_parts(x)?;
                let d = d.map(|d| self.b.ins().imul_imm_s(d, c));
                (d, k.wrapping_mul(c))
            }
            _ => (Some(self.expr_as(e, Scalar::I64)?), 0),
        })
    }

    fn expr(&mut self, e: &Expr) -> Result<Value, CodegenError> {
        Ok(match e {
            Expr::Const(Const::F32(v)) => self.fconst(*v),
            Expr::Const(Const::I64(v)) => self.b.ins().iconst(types::I64, *v),
            Expr::Const(Const::I32(v)) => self.b.ins().iconst(types::I32, *v as i64),
            Expr::Const(Const::Bool(v)) => self.b.ins().iconst(types::I8, *v as i64),
            Expr::Var(v) => self.b.use_var(self.vars[*v]),
            Expr::Load { buf, index } => {
                let (addr, off) = self.address(*buf, index)?;
                let ty = clty(self.k.params[*buf].scalar);
                let f = self.load_flags(*buf, flags());
                self.b.ins().load(ty, f, addr, off)
            }
            Expr::Bin { op, a, b } => {
                let t = self.operand_type(a, b);
                let x = self.expr_as(a, t)?;
                let y = self.expr_as(b, t)?;
                self.binop(*op, t, x, y)?
            }
            Expr::Un { op, a } => {
                let t = self.expr_type(a);
                let x = self.expr(a)?;
                self.unop(*op, t, x)?
            }
            Expr::Cmp { op, a, b } => {
                let t = self.operand_type(a, b);
                if t == Scalar::F16 {
                    return Err(self.err("f16 comparison is not supported (widen to f32 first)"));
                }
                let x = self.expr_as(a, t)?;
                let y = self.expr_as(b, t)?;
                if t.is_float() {
                    let cc = match op {
                        CmpOp::Eq => FloatCC::Equal,
                        CmpOp::Ne => FloatCC::NotEqual,
                        CmpOp::Lt => FloatCC::LessThan,
                        CmpOp::Le => FloatCC::LessThanOrEqual,
                        CmpOp::Gt => FloatCC::GreaterThan,
                        CmpOp::Ge => FloatCC::GreaterThanOrEqual,
                    };
                    self.b.ins().fcmp(cc, x, y)
                } else {
                    let u = t.is_unsigned();
                    let cc = match op {
                        CmpOp::Eq => IntCC::Equal,
                        CmpOp::Ne => IntCC::NotEqual,
                        CmpOp::Lt if u => IntCC::UnsignedLessThan,
                        CmpOp::Le if u => IntCC::UnsignedLessThanOrEqual,
                        CmpOp::Gt if u => IntCC::UnsignedGreaterThan,
                        CmpOp::Ge if u => IntCC::UnsignedGreaterThanOrEqual,
                        CmpOp::Lt => IntCC::SignedLessThan,
                        CmpOp::Le => IntCC::SignedLessThanOrEqual,
                        CmpOp::Gt => IntCC::SignedGreaterThan,
                        CmpOp::Ge => IntCC::SignedGreaterThanOrEqual,
                    };
                    self.b.ins().icmp(cc, x, y)
                }
            }
            Expr::Select { cond, a, b } => {
                let c = self.expr_as(cond, Scalar::Bool)?;
                let t = self.operand_type(a, b);
                let x = self.expr_as(a, t)?;
                let y = self.expr_as(b, t)?;
                self.b.ins().select(c, x, y)
            }
            Expr::Cast { to, a } => {
                let from = self.expr_type(a);
                if (from == Scalar::F16 && to.is_float()) || (*to == Scalar::F16 && from.is_float())
                {
                    return Err(self.err(
                        "f16 <-> float casts are not supported here (lowering expands them)",
                    ));
                }
                let x = self.expr(a)?;
                self.cast(from, *to, x)
            }
        })
    }

    /// Converts between element types with ONNX Cast semantics: float -> int truncates
    /// (saturating), int -> int wraps, anything -> bool is `!= 0`.
    fn cast(&mut self, from: Scalar, to: Scalar, x: Value) -> Value {
        if from == to || (clty(from) == clty(to) && to != Scalar::Bool && from != Scalar::Bool) {
            return x;
        }
        if to == Scalar::Bool {
            return if from.is_float() {
                let z = self.typed_const(from, 0.0, 0);
                self.b.ins().fcmp(FloatCC::NotEqual, x, z)
            } else {
                self.b.ins().icmp_imm_s(IntCC::NotEqual, x, 0)
            };
        }
        let (tf, tt) = (clty(from), clty(to));
        match (from.is_float(), to.is_float()) {
            (true, true) => {
                if tt.bits() > tf.bits() {
                    self.b.ins().fpromote(tt, x)
                } else {
                    self.b.ins().fdemote(tt, x)
                }
            }
            (true, false) if tt.bits() < 32 => {
                // Backends convert to 32 or 64 bits only: saturate to i32, clamp to the
                // narrow type's range, then truncate.
                let bits = tt.bits();
                let (lo, hi) = if to.is_unsigned() {
                    (0i64, (1i64 << bits) - 1)
                } else {
                    (-(1i64 << (bits - 1)), (1i64 << (bits - 1)) - 1)
                };
                let wide = if to.is_unsigned() {
                    self.b.ins().fcvt_to_uint_sat(types::I32, x)
                } else {
                    self.b.ins().fcvt_to_sint_sat(types::I32, x)
                };
                let (lo, hi) = (
                    self.b.ins().iconst(types::I32, lo),
                    self.b.ins().iconst(types::I32, hi),
                );
                let clamped = if to.is_unsigned() {
                    self.b.ins().umin(wide, hi)
                } else {
                    let up = self.b.ins().smax(wide, lo);
                    self.b.ins().smin(up, hi)
                };
                self.b.ins().ireduce(tt, clamped)
            }
            (true, false) => {
                if to.is_unsigned() {
                    self.b.ins().fcvt_to_uint_sat(tt, x)
                } else {
                    self.b.ins().fcvt_to_sint_sat(tt, x)
                }
            }
            (false, true) => {
                if from.is_unsigned() {
                    self.b.ins().fcvt_from_uint(tt, x)
                } else {
                    self.b.ins().fcvt_from_sint(tt, x)
                }
            }
            (false, false) => {
                if tt.bits() > tf.bits() {
                    if from.is_unsigned() {
                        self.b.ins().uextend(tt, x)
                    } else {
                        self.b.ins().sextend(tt, x)
                    }
                } else if tt.bits() < tf.bits() {
                    self.b.ins().ireduce(tt, x)
                } else {
                    x
                }
            }
        }
    }

    fn binop(&mut self, op: BinOp, t: Scalar, x: Value, y: Value) -> Result<Value, CodegenError> {
        if t == Scalar::F16 {
            return Err(self.err("f16 arithmetic is not supported (widen to f32 first)"));
        }
        let i = self.b.ins();
        Ok(if t.is_float() {
            match op {
                BinOp::Add => i.fadd(x, y),
                BinOp::Sub => i.fsub(x, y),
                BinOp::Mul => i.fmul(x, y),
                BinOp::Div => i.fdiv(x, y),
                BinOp::Min => i.fmin(x, y),
                BinOp::Max => i.fmax(x, y),
                BinOp::Pow if t == Scalar::F32 => self.pow(x, y),
                BinOp::Rem => {
                    // fmod: x - trunc(x / y) * y
                    let q = i.fdiv(x, y);
                    let t = self.b.ins().trunc(q);
                    let m = self.b.ins().fmul(t, y);
                    self.b.ins().fsub(x, m)
                }
                BinOp::Pow
                | BinOp::And
                | BinOp::Or
                | BinOp::Xor
                | BinOp::Shl
                | BinOp::Shr
                | BinOp::DotBytes => return Err(self.err(format!("{op:?} on {t:?}"))),
            }
        } else {
            let u = t.is_unsigned();
            match op {
                BinOp::Add => i.iadd(x, y),
                BinOp::Sub => i.isub(x, y),
                BinOp::Mul => i.imul(x, y),
                BinOp::Div | BinOp::Rem => {
                    // Division by zero would trap; ONNX leaves it undefined, Kiln yields 0.
                    let zero = i.icmp_imm_s(IntCC::Equal, y, 0);
                    let one = self.b.ins().iconst(clty(t), 1);
                    let safe = self.b.ins().select(zero, one, y);
                    let r = match (op == BinOp::Div, u) {
                        (true, true) => self.b.ins().udiv(x, safe),
                        (true, false) => self.b.ins().sdiv(x, safe),
                        (false, true) => self.b.ins().urem(x, safe),
                        (false, false) => self.b.ins().srem(x, safe),
                    };
                    let z = self.b.ins().iconst(clty(t), 0);
                    self.b.ins().select(zero, z, r)
                }
                BinOp::Min if u => i.umin(x, y),
                BinOp::Max if u => i.umax(x, y),
                BinOp::Min => i.smin(x, y),
                BinOp::Max => i.smax(x, y),
                BinOp::And => i.band(x, y),
                BinOp::Or => i.bor(x, y),
                BinOp::Xor => i.bxor(x, y),
                BinOp::Shl | BinOp::Shr => {
                    // Shifts by the width or more give 0 (ONNX BitShift on unsigned types).
                    let bits = clty(t).bits() as i64;
                    let big = i.icmp_imm_u(IntCC::UnsignedGreaterThanOrEqual, y, bits);
                    let r = if op == BinOp::Shl {
                        self.b.ins().ishl(x, y)
                    } else {
                        self.b.ins().ushr(x, y)
                    };
                    let z = self.b.ins().iconst(clty(t), 0);
                    self.b.ins().select(big, z, r)
                }
                BinOp::Pow => return Err(self.err("integer Pow")),
                BinOp::DotBytes if clty(t) == types::I32 => {
                    // Sign-extend byte `i` of each word (the first operand's bytes are below
                    // 128, so this is also their unsigned value) and sum the products.
                    let mut sum = self.b.ins().iconst(types::I32, 0);
                    for byte in 0..4 {
                        let up = 24 - 8 * byte;
                        let xs = self.b.ins().ishl_imm_s(x, up);
                        let xs = self.b.ins().sshr_imm_s(xs, 24);
                        let ys = self.b.ins().ishl_imm_s(y, up);
                        let ys = self.b.ins().sshr_imm_s(ys, 24);
                        let p = self.b.ins().imul(xs, ys);
                        sum = self.b.ins().iadd(sum, p);
                    }
                    sum
                }
                BinOp::DotBytes => return Err(self.err(format!("DotBytes on {t:?}"))),
            }
        })
    }

    fn unop(&mut self, op: UnOp, t: Scalar, x: Value) -> Result<Value, CodegenError> {
        if op == UnOp::BitsToF32 {
            if clty(t) != types::I32 {
                return Err(self.err(format!("BitsToF32 of {t:?}")));
            }
            return Ok(self.b.ins().bitcast(types::F32, MemFlagsData::new(), x));
        }
        if t == Scalar::F16 {
            return Err(self.err("f16 arithmetic is not supported (widen to f32 first)"));
        }
        if !t.is_float() {
            return Ok(match op {
                UnOp::Neg => self.b.ins().ineg(x),
                UnOp::Abs => self.b.ins().iabs(x),
                UnOp::Not if t == Scalar::Bool => self.b.ins().bxor_imm_s(x, 1),
                UnOp::Not => self.b.ins().bnot(x),
                _ => return Err(self.err(format!("{op:?} on integers"))),
            });
        }
        if t == Scalar::F64 {
            return Ok(match op {
                UnOp::Neg => self.b.ins().fneg(x),
                UnOp::Abs => self.b.ins().fabs(x),
                UnOp::Sqrt => self.b.ins().sqrt(x),
                UnOp::Floor => self.b.ins().floor(x),
                UnOp::Ceil => self.b.ins().ceil(x),
                UnOp::Round => self.b.ins().nearest(x),
                UnOp::Recip => {
                    let one = self.b.ins().f64const(1.0);
                    self.b.ins().fdiv(one, x)
                }
                _ => return Err(self.err(format!("{op:?} is only lowered for f32"))),
            });
        }
        Ok(match op {
            UnOp::Neg => self.b.ins().fneg(x),
            UnOp::Abs => self.b.ins().fabs(x),
            UnOp::Sqrt => self.b.ins().sqrt(x),
            UnOp::Floor => self.b.ins().floor(x),
            UnOp::Ceil => self.b.ins().ceil(x),
            UnOp::Round => self.b.ins().nearest(x),
            UnOp::Recip => {
                let one = self.fconst(1.0);
                self.b.ins().fdiv(one, x)
            }
            UnOp::Exp => self.exp(x),
            UnOp::Log => self.log(x),
            UnOp::Sigmoid => {
                let n = self.b.ins().fneg(x);
                let e = self.exp(n);
                let one = self.fconst(1.0);
                let d = self.b.ins().fadd(one, e);
                self.b.ins().fdiv(one, d)
            }
            UnOp::Tanh => {
                // tanh(x) = 1 - 2 / (exp(2x) + 1); exact limits for large |x|.
                let two = self.fconst(2.0);
                let x2 = self.b.ins().fmul(x, two);
                let e = self.exp(x2);
                let one = self.fconst(1.0);
                let d = self.b.ins().fadd(e, one);
                let q = self.b.ins().fdiv(two, d);
                self.b.ins().fsub(one, q)
            }
            UnOp::Erf => self.erf(x),
            UnOp::Sin => self.sin_cos(x, false),
            UnOp::Cos => self.sin_cos(x, true),
            UnOp::IsNaN => self.b.ins().fcmp(FloatCC::Unordered, x, x),
            UnOp::Not => return Err(self.err("Not on floats")),
            UnOp::BitsToF32 => unreachable!("handled above"),
        })
    }

    /// powf: exp(y log|x|), with the sign of x for odd integer y, NaN for a negative base
    /// with a non-integer exponent, and pow(x, 0) = 1.
    fn pow(&mut self, x: Value, y: Value) -> Value {
        let ax = self.b.ins().fabs(x);
        let l = self.log(ax);
        let p = self.b.ins().fmul(y, l);
        let mag = self.exp(p);
        let zero = self.fconst(0.0);
        let one = self.fconst(1.0);
        let half = self.fconst(0.5);
        let y_int = self.b.ins().trunc(y);
        let is_int = self.b.ins().fcmp(FloatCC::Equal, y_int, y);
        let hy = self.b.ins().fmul(y, half);
        let hy_t = self.b.ins().trunc(hy);
        let even = self.b.ins().fcmp(FloatCC::Equal, hy_t, hy);
        let neg_base = self.b.ins().fcmp(FloatCC::LessThan, x, zero);
        let nmag = self.b.ins().fneg(mag);
        let signed = self.b.ins().select(even, mag, nmag);
        let nan = self.fconst(f32::NAN);
        let neg_result = self.b.ins().select(is_int, signed, nan);
        let r = self.b.ins().select(neg_base, neg_result, mag);
        let y_zero = self.b.ins().fcmp(FloatCC::Equal, y, zero);
        self.b.ins().select(y_zero, one, r)
    }

    /// sinf/cosf (Cephes): reduce by multiples of pi/2 (three-part Cody-Waite), evaluate the
    /// sine or cosine polynomial on |r| <= pi/4 and fix the sign by quadrant.
    fn sin_cos(&mut self, x: Value, cos: bool) -> Value {
        let two_over_pi = self.fconst(std::f32::consts::FRAC_2_PI);
        let t = self.b.ins().fmul(x, two_over_pi);
        let j = self.b.ins().nearest(t);
        let mut r = x;
        for c in [1.570_312_5_f32, 4.837_513e-4, 7.549_79e-8] {
            let k = self.fconst(c);
            let m = self.b.ins().fmul(j, k);
            r = self.b.ins().fsub(r, m);
        }
        let q = self.b.ins().fcvt_to_sint_sat(types::I32, j);
        let q = if cos {
            self.b.ins().iadd_imm_s(q, 1)
        } else {
            q
        };
        let z = self.b.ins().fmul(r, r);
        // sin(r) = r + r z P(z), cos(r) = 1 - z/2 + z^2 Q(z)
        let ps = self.horner(z, &[-1.951_529_6e-4, 8.332_161e-3, -1.666_665_5e-1]);
        let rz = self.b.ins().fmul(r, z);
        let s = self.b.ins().fmul(rz, ps);
        let s = self.b.ins().fadd(r, s);
        let pc = self.horner(z, &[2.443_315_7e-5, -1.388_731_6e-3, 4.166_664_6e-2]);
        let z2 = self.b.ins().fmul(z, z);
        let c = self.b.ins().fmul(z2, pc);
        let half = self.fconst(0.5);
        let hz = self.b.ins().fmul(z, half);
        let c = self.b.ins().fsub(c, hz);
        let one = self.fconst(1.0);
        let c = self.b.ins().fadd(c, one);
        // quadrant q: 0 -> s, 1 -> c, 2 -> -s, 3 -> -c
        let odd = self.b.ins().band_imm_s(q, 1);
        let use_cos = self.b.ins().icmp_imm_s(IntCC::NotEqual, odd, 0);
        let v = self.b.ins().select(use_cos, c, s);
        let neg_bit = self.b.ins().band_imm_s(q, 2);
        let neg = self.b.ins().icmp_imm_s(IntCC::NotEqual, neg_bit, 0);
        let nv = self.b.ins().fneg(v);
        self.b.ins().select(neg, nv, v)
    }

    /// Horner evaluation of sum c[i] * x^i (coefficients from the highest degree down).
    fn horner(&mut self, x: Value, coeffs: &[f32]) -> Value {
        let mut acc = self.fconst(coeffs[0]);
        for &c in &coeffs[1..] {
            let m = self.b.ins().fmul(acc, x);
            let k = self.fconst(c);
            acc = self.b.ins().fadd(m, k);
        }
        acc
    }

    /// expf: range reduction x = n ln2 + r, |r| <= ln2/2, Cephes polynomial, scale by 2^n.
    fn exp(&mut self, x: Value) -> Value {
        let hi = self.fconst(88.376_26);
        let lo = self.fconst(-87.336_55);
        let x = self.b.ins().fmin(x, hi);
        let x = self.b.ins().fmax(x, lo);
        let log2e = self.fconst(std::f32::consts::LOG2_E);
        let t = self.b.ins().fmul(x, log2e);
        let n = self.b.ins().nearest(t);
        let c1 = self.fconst(0.693_359_4);
        let c2 = self.fconst(-2.121_944_4e-4);
        let a = self.b.ins().fmul(n, c1);
        let r = self.b.ins().fsub(x, a);
        let b2 = self.b.ins().fmul(n, c2);
        let r = self.b.ins().fsub(r, b2);
        let p = self.horner(
            r,
            &[
                1.987_569_1e-4,
                1.398_199_9e-3,
                8.333_452e-3,
                4.166_579_6e-2,
                1.666_666_5e-1,
                0.5,
            ],
        );
        let r2 = self.b.ins().fmul(r, r);
        let p = self.b.ins().fmul(p, r2);
        let p = self.b.ins().fadd(p, r);
        let one = self.fconst(1.0);
        let p = self.b.ins().fadd(p, one);
        // 2^n through the exponent bits; n is in [-126, 127] after clamping.
        let ni = self.b.ins().fcvt_to_sint_sat(types::I32, n);
        let biased = self.b.ins().iadd_imm_s(ni, 127);
        let bits = self.b.ins().ishl_imm_s(biased, 23);
        let scale = self.b.ins().bitcast(types::F32, MemFlagsData::new(), bits);
        self.b.ins().fmul(p, scale)
    }

    /// logf (Cephes): x = m 2^e with m in [sqrt(1/2), sqrt(2)), polynomial in m - 1.
    fn log(&mut self, x: Value) -> Value {
        let bits = self.b.ins().bitcast(types::I32, MemFlagsData::new(), x);
        let e = self.b.ins().ushr_imm_s(bits, 23);
        let e = self.b.ins().band_imm_s(e, 0xff);
        let e = self.b.ins().iadd_imm_s(e, -126);
        let mbits = self.b.ins().band_imm_s(bits, 0x807f_ffff_u32 as i64);
        let mbits = self.b.ins().bor_imm_s(mbits, 0x3f00_0000);
        let m = self.b.ins().bitcast(types::F32, MemFlagsData::new(), mbits);
        let sqrthf = self.fconst(std::f32::consts::FRAC_1_SQRT_2);
        let small = self.b.ins().fcmp(FloatCC::LessThan, m, sqrthf);
        let one_i = self.b.ins().iconst(types::I32, 1);
        let zero_i = self.b.ins().iconst(types::I32, 0);
        let dec = self.b.ins().select(small, one_i, zero_i);
        let e = self.b.ins().isub(e, dec);
        let m2 = self.b.ins().fadd(m, m);
        let m = self.b.ins().select(small, m2, m);
        let one = self.fconst(1.0);
        let m = self.b.ins().fsub(m, one);
        let ef = self.b.ins().fcvt_from_sint(types::F32, e);
        let z = self.b.ins().fmul(m, m);
        let p = self.horner(
            m,
            &[
                7.037_683_6e-2,
                -1.151_461e-1,
                1.167_699_9e-1,
                -1.242_014_1e-1,
                1.424_932_3e-1,
                -1.666_805_8e-1,
                2.000_071_4e-1,
                -2.499_999_4e-1,
                3.333_333e-1,
            ],
        );
        let y = self.b.ins().fmul(p, m);
        let y = self.b.ins().fmul(y, z);
        let c = self.fconst(-2.121_944_4e-4);
        let t = self.b.ins().fmul(ef, c);
        let y = self.b.ins().fadd(y, t);
        let half = self.fconst(0.5);
        let hz = self.b.ins().fmul(z, half);
        let y = self.b.ins().fsub(y, hz);
        let r = self.b.ins().fadd(m, y);
        let c2 = self.fconst(0.693_359_4);
        let t2 = self.b.ins().fmul(ef, c2);
        let r = self.b.ins().fadd(r, t2);
        // log(0) = -inf, log(x < 0) = NaN, log(inf) = inf.
        let zero = self.fconst(0.0);
        let ninf = self.fconst(f32::NEG_INFINITY);
        let nan = self.fconst(f32::NAN);
        let inf = self.fconst(f32::INFINITY);
        let is_zero = self.b.ins().fcmp(FloatCC::Equal, x, zero);
        let is_neg = self.b.ins().fcmp(FloatCC::LessThan, x, zero);
        let is_inf = self.b.ins().fcmp(FloatCC::Equal, x, inf);
        let r = self.b.ins().select(is_inf, inf, r);
        let r = self.b.ins().select(is_zero, ninf, r);
        self.b.ins().select(is_neg, nan, r)
    }

    /// erf, Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7).
    fn erf(&mut self, x: Value) -> Value {
        let ax = self.b.ins().fabs(x);
        let p = self.fconst(0.327_591_1);
        let one = self.fconst(1.0);
        let d = self.b.ins().fmul(p, ax);
        let d = self.b.ins().fadd(one, d);
        let t = self.b.ins().fdiv(one, d);
        let poly = self.horner(
            t,
            &[
                1.061_405_4,
                -1.453_152_1,
                1.421_413_8,
                -0.284_496_72,
                0.254_829_6,
            ],
        );
        let poly = self.b.ins().fmul(poly, t);
        let x2 = self.b.ins().fmul(ax, ax);
        let nx2 = self.b.ins().fneg(x2);
        let e = self.exp(nx2);
        let pe = self.b.ins().fmul(poly, e);
        let y = self.b.ins().fsub(one, pe);
        // copysign(y, x)
        let zero = self.fconst(0.0);
        let neg = self.b.ins().fcmp(FloatCC::LessThan, x, zero);
        let ny = self.b.ins().fneg(y);
        self.b.ins().select(neg, ny, y)
    }

    fn stmts(&mut self, stmts: &[Stmt]) -> Result<(), CodegenError> {
        for s in stmts {
            // In a jammed vector loop, every assignment and store is emitted once per copy,
            // with the loop variable at that copy's first lane and that copy's locals.
            let jam = self
                .vec
                .as_ref()
                .filter(|m| m.copies.len() > 1)
                .map(|m| (m.var, m.copies.len(), m.base));
            if let (Some((var, n, Some(base))), false) = (jam, matches!(s, Stmt::Loop { .. })) {
                for c in 0..n {
                    let at = self.b.ins().iadd_imm_s(base, (c * LANES) as i64);
                    self.b.def_var(self.vars[var], at);
                    self.unrolled.insert(var, (base, (c * LANES) as i64));
                    if let Some(m) = self.vec.as_mut() {
                        m.vvars = m.copies[c].clone();
                    }
                    self.stmt(s)?;
                }
                continue;
            }
            self.stmt(s)?;
        }
        Ok(())
    }

    fn stmt(&mut self, s: &Stmt) -> Result<(), CodegenError> {
        {
            match s {
                Stmt::Assign { var, value } => {
                    if let Some(vv) = self.vec.as_ref().and_then(|m| m.vvars.get(var)).copied() {
                        let v = self.vexpr_splat(value)?;
                        self.b.def_var(vv, v);
                    } else {
                        let v = self.expr_as(value, self.k.vars[*var])?;
                        self.b.def_var(self.vars[*var], v);
                    }
                }
                Stmt::Call { kernel, args } => self.call(*kernel, args)?,
                Stmt::Store { buf, index, value } => {
                    if self.vec.is_some() {
                        let v = self.vexpr_splat(value)?;
                        let (addr, off) = self.address(*buf, index)?;
                        self.b.ins().store(vflags(), v, addr, off);
                    } else {
                        let v = self.expr_as(value, self.k.params[*buf].scalar)?;
                        let (addr, off) = self.address(*buf, index)?;
                        self.b.ins().store(flags(), v, addr, off);
                    }
                }
                // An empty loop is not emitted at all: its body's loads could otherwise be
                // hoisted out of it (see `load_flags`) and read out of bounds.
                Stmt::Loop { extent: 0, .. } => {}
                Stmt::Loop {
                    var,
                    extent,
                    kind,
                    body,
                } => match kind {
                    LoopKind::Vectorized { lanes, jam }
                        if *lanes == LANES && self.vec.is_none() =>
                    {
                        self.emit_vector_loop(*var, *extent, *jam, body)?
                    }
                    LoopKind::Parallel => {
                        let (start, end) = self.range;
                        self.emit_range_loop(*var, start, end, 1, body)?
                    }
                    _ => self.emit_loop(*var, *extent, *kind, body)?,
                },
            }
        }
        Ok(())
    }

    /// A vector-mode expression: `(value, is_vector)`. Loads contiguous in the vector loop's
    /// variable become vector loads; everything invariant stays scalar until combined. Float
    /// expressions are f32x4; integer ones are i32x4, with narrower loads widened (u8, u16 and
    /// the raw bits of f16 zero-extended, i8 and i16 sign-extended), which is exact because the
    /// schedule only vectorizes integer arithmetic on i32 operands.
    fn vexpr(&mut self, e: &Expr) -> Result<(Value, bool), CodegenError> {
        let class = lane_class(self.expr_type(e));
        self.vexpr_in(e, class)
    }

    /// [`Self::vexpr`] with constants and invariant operands emitted in lane type `class`
    /// (F32 or I32).
    fn vexpr_in(&mut self, e: &Expr, class: Scalar) -> Result<(Value, bool), CodegenError> {
        let var = self.vec.as_ref().map(|m| m.var).expect("vector mode");
        Ok(match e {
            Expr::Var(x) => match self.vec.as_ref().and_then(|m| m.vvars.get(x)).copied() {
                Some(vv) => (self.b.use_var(vv), true),
                None => (self.expr_as(e, class)?, false),
            },
            Expr::Load { buf, index } if linear_coeff(index, var) == Some(1) => {
                let (addr, off) = self.address(*buf, index)?;
                (self.vector_load(*buf, addr, off)?, true)
            }
            Expr::Bin {
                op: BinOp::Add,
                a: acc,
                b: dot,
            } if matches!(
                **dot,
                Expr::Bin {
                    op: BinOp::DotBytes,
                    ..
                }
            ) && lane_class(self.operand_type(acc, dot)) == Scalar::I32 =>
            {
                // acc + DotBytes(w, act): one accumulating dot product where the target has it.
                let Expr::Bin { a: w, b: act, .. } = &**dot else {
                    unreachable!("matched above")
                };
                match self.vector_operands([acc, w, act], Scalar::I32)? {
                    Some([acc, w, act]) => (self.dot_bytes(acc, w, act), true),
                    None => (self.expr_as(e, class)?, false),
                }
            }
            Expr::Bin {
                op: BinOp::Add,
                a: acc,
                b: prod,
            } if self.fma
                && lane_class(self.operand_type(acc, prod)) == Scalar::F32
                && matches!(**prod, Expr::Bin { op: BinOp::Mul, .. }) =>
            {
                // acc + x * y as one fused multiply-add.
                let Expr::Bin { a: x, b: y, .. } = &**prod else {
                    unreachable!("matched above")
                };
                match self.vector_operands([x, y, acc], Scalar::F32)? {
                    Some([x, y, acc]) => (self.b.ins().fma(x, y, acc), true),
                    None => (self.expr_as(e, class)?, false),
                }
            }
            Expr::Bin { op, a, b } => {
                let c = lane_class(self.operand_type(a, b));
                let (x, xv) = self.vexpr_in(a, c)?;
                let (y, yv) = self.vexpr_in(b, c)?;
                if !(xv || yv) {
                    // Invariant: computed once in scalar code with the exact scalar types.
                    return Ok((self.expr_as(e, class)?, false));
                }
                let vt = vtype(c);
                if c == Scalar::I32 && matches!(op, BinOp::Shl | BinOp::Shr) {
                    let amount = match &**b {
                        Expr::Const(Const::I64(v)) => *v,
                        Expr::Const(Const::I32(v)) => *v as i64,
                        _ => return Err(self.err("vector shifts need a constant amount")),
                    };
                    if !(0..32).contains(&amount) {
                        return Err(self.err("vector shift amount out of range"));
                    }
                    let r = if *op == BinOp::Shl {
                        self.b.ins().ishl_imm_u(x, amount)
                    } else {
                        self.b.ins().ushr_imm_u(x, amount)
                    };
                    return Ok((r, true));
                }
                let x = if xv { x } else { self.b.ins().splat(vt, x) };
                let y = if yv { y } else { self.b.ins().splat(vt, y) };
                if c == Scalar::I32 && *op == BinOp::DotBytes {
                    let zero = self.b.ins().iconst(types::I32, 0);
                    let zero = self.b.ins().splat(vt, zero);
                    return Ok((self.dot_bytes(zero, x, y), true));
                }
                let i = self.b.ins();
                let r = match (c, op) {
                    (Scalar::F32, BinOp::Add) => i.fadd(x, y),
                    (Scalar::F32, BinOp::Sub) => i.fsub(x, y),
                    (Scalar::F32, BinOp::Mul) => i.fmul(x, y),
                    (Scalar::F32, BinOp::Div) => i.fdiv(x, y),
                    (Scalar::F32, BinOp::Min) => i.fmin(x, y),
                    (Scalar::F32, BinOp::Max) => i.fmax(x, y),
                    (Scalar::I32, BinOp::Add) => i.iadd(x, y),
                    (Scalar::I32, BinOp::Sub) => i.isub(x, y),
                    (Scalar::I32, BinOp::Mul) => i.imul(x, y),
                    (Scalar::I32, BinOp::Min) => i.smin(x, y),
                    (Scalar::I32, BinOp::Max) => i.smax(x, y),
                    (Scalar::I32, BinOp::And) => i.band(x, y),
                    (Scalar::I32, BinOp::Or) => i.bor(x, y),
                    (Scalar::I32, BinOp::Xor) => i.bxor(x, y),
                    (_, other) => return Err(self.err(format!("{other:?} has no vector form"))),
                };
                (r, true)
            }
            Expr::Un {
                op: UnOp::BitsToF32,
                a,
            } => {
                let (x, xv) = self.vexpr_in(a, Scalar::I32)?;
                if !xv {
                    return Ok((self.unop(UnOp::BitsToF32, Scalar::I32, x)?, false));
                }
                (self.b.ins().bitcast(VF32, MemFlagsData::new(), x), true)
            }
            Expr::Un { op, a } => {
                let (x, xv) = self.vexpr_in(a, Scalar::F32)?;
                if !xv {
                    return Ok((self.unop(*op, Scalar::F32, x)?, false));
                }
                let r = match op {
                    UnOp::Neg => self.b.ins().fneg(x),
                    UnOp::Abs => self.b.ins().fabs(x),
                    UnOp::Sqrt => self.b.ins().sqrt(x),
                    UnOp::Recip => {
                        let one = self.fconst(1.0);
                        let one = self.b.ins().splat(VF32, one);
                        self.b.ins().fdiv(one, x)
                    }
                    other => return Err(self.err(format!("{other:?} has no vector form"))),
                };
                (r, true)
            }
            Expr::Cast { to, a } => {
                let from = self.expr_type(a);
                let (x, xv) = self.vexpr_in(a, lane_class(from))?;
                if !xv {
                    return Ok((self.expr_as(e, class)?, false));
                }
                let r = match (lane_class(from), *to) {
                    (Scalar::I32, Scalar::F32) if from != Scalar::F16 => {
                        self.b.ins().fcvt_from_sint(VF32, x)
                    }
                    (Scalar::I32, Scalar::I32) => x,
                    (Scalar::F32, Scalar::F32) => x,
                    _ => {
                        return Err(self.err(format!("cast {from:?} -> {to:?} has no vector form")))
                    }
                };
                (r, true)
            }
            Expr::Select { cond, a, b } => {
                let Expr::Cmp { op, a: ca, b: cb } = &**cond else {
                    return Err(self.err("vector select needs a comparison"));
                };
                let cc = lane_class(self.operand_type(ca, cb));
                let (p, pv) = self.vexpr_in(ca, cc)?;
                let (q, qv) = self.vexpr_in(cb, cc)?;
                let (x, xv) = self.vexpr_in(a, class)?;
                let (y, yv) = self.vexpr_in(b, class)?;
                if !(pv || qv || xv || yv) {
                    return Ok((self.expr_as(e, class)?, false));
                }
                let (ct, vt) = (vtype(cc), vtype(class));
                let p = if pv { p } else { self.b.ins().splat(ct, p) };
                let q = if qv { q } else { self.b.ins().splat(ct, q) };
                let x = if xv { x } else { self.b.ins().splat(vt, x) };
                let y = if yv { y } else { self.b.ins().splat(vt, y) };
                let mask = if cc == Scalar::F32 {
                    let fcc = match op {
                        CmpOp::Eq => FloatCC::Equal,
                        CmpOp::Ne => FloatCC::NotEqual,
                        CmpOp::Lt => FloatCC::LessThan,
                        CmpOp::Le => FloatCC::LessThanOrEqual,
                        CmpOp::Gt => FloatCC::GreaterThan,
                        CmpOp::Ge => FloatCC::GreaterThanOrEqual,
                    };
                    self.b.ins().fcmp(fcc, p, q)
                } else {
                    let icc = match op {
                        CmpOp::Eq => IntCC::Equal,
                        CmpOp::Ne => IntCC::NotEqual,
                        CmpOp::Lt => IntCC::SignedLessThan,
                        CmpOp::Le => IntCC::SignedLessThanOrEqual,
                        CmpOp::Gt => IntCC::SignedGreaterThan,
                        CmpOp::Ge => IntCC::SignedGreaterThanOrEqual,
                    };
                    self.b.ins().icmp(icc, p, q)
                };
                let mask = if vt == types::I32X4 {
                    mask
                } else {
                    self.b.ins().bitcast(vt, MemFlagsData::new(), mask)
                };
                (self.b.ins().bitselect(mask, x, y), true)
            }
            other => (self.expr_as(other, class)?, false),
        })
    }

    /// Calls microkernel `kernel` (declared in the artifact by [`generate`]).
    fn call(&mut self, kernel: Microkernel, args: &[CallArg]) -> Result<(), CodegenError> {
        if self.vec.is_some() {
            return Err(self.err("a microkernel call cannot be vectorized"));
        }
        let id = *self
            .microkernels
            .get(&kernel)
            .ok_or_else(|| self.err(format!("{} is not available here", kernel.name())))?;
        let mut values = Vec::with_capacity(args.len());
        for a in args {
            values.push(match a {
                CallArg::Addr { buf, index } => {
                    let (addr, off) = self.address(*buf, index)?;
                    if off == 0 {
                        addr
                    } else {
                        self.b.ins().iadd_imm_s(addr, off as i64)
                    }
                }
                CallArg::Int(e) => self.expr_as(e, Scalar::I64)?,
            });
        }
        let fref = match self.call_refs.get(&kernel) {
            Some(&f) => f,
            None => {
                let mut sig = Signature::new(self.call_conv);
                sig.params
                    .extend(values.iter().map(|_| AbiParam::new(types::I64)));
                let sig = self.b.import_signature(sig);
                let f = import_func(self.b, id, sig);
                self.call_refs.insert(kernel, f);
                f
            }
        };
        self.b.ins().call(fref, &values);
        Ok(())
    }

    /// Operands of a fused vector instruction in lane type `class`, invariant ones splatted;
    /// `None` when all of them are invariant (the caller computes the expression in scalar).
    fn vector_operands<const N: usize>(
        &mut self,
        operands: [&Expr; N],
        class: Scalar,
    ) -> Result<Option<[Value; N]>, CodegenError> {
        let mut parts = Vec::with_capacity(N);
        for e in operands {
            parts.push(self.vexpr_in(e, class)?);
        }
        if parts.iter().all(|(_, is_vec)| !is_vec) {
            return Ok(None);
        }
        let vt = vtype(class);
        let values: Vec<Value> = parts
            .into_iter()
            .map(|(v, is_vec)| if is_vec { v } else { self.b.ins().splat(vt, v) })
            .collect();
        Ok(values.try_into().ok())
    }

    /// `acc + DotBytes(w, a)` lane by lane on i32x4 vectors (see [`BinOp::DotBytes`]): on
    /// x86-64 with AVX-VNNI the widening tree (signed activation bytes times unsigned weight
    /// bytes) that Cranelift folds into one `vpdpbusd`; on other x86-64 `pmaddubsw` (pairs
    /// summed in i16) then pairwise sums to i32; on aarch64 the signed widening tree that
    /// Cranelift folds into one `sdot` when the target has dotprod, and computes with
    /// widening multiplies and pairwise additions otherwise.
    fn dot_bytes(&mut self, acc: Value, w: Value, a: Value) -> Value {
        let le = MemFlagsData::new().with_endianness(ir::Endianness::Little);
        let w = self.b.ins().bitcast(types::I8X16, le, w);
        let a = self.b.ins().bitcast(types::I8X16, le, a);
        let dot = match self.arch {
            Arch::X86_64 if self.vnni => self.widening_dot(w, a, false),
            Arch::X86_64 => {
                let pairs = self.b.ins().x86_pmaddubsw(a, w);
                let lo = self.b.ins().swiden_low(pairs);
                let hi = self.b.ins().swiden_high(pairs);
                self.b.ins().iadd_pairwise(lo, hi)
            }
            Arch::Aarch64 => self.widening_dot(w, a, true),
        };
        self.b.ins().iadd(dot, acc)
    }

    /// Sums of four byte products per i32 lane, as the tree of widening multiplies and
    /// pairwise additions that Cranelift recognises (under `iadd` with an accumulator): `a`
    /// is read signed, `w` signed (`sdot`) or unsigned (`vpdpbusd`).
    fn widening_dot(&mut self, w: Value, a: Value, signed_w: bool) -> Value {
        let i = &mut self.b;
        let (wl, wh) = if signed_w {
            (i.ins().swiden_low(w), i.ins().swiden_high(w))
        } else {
            (i.ins().uwiden_low(w), i.ins().uwiden_high(w))
        };
        let (al, ah) = (i.ins().swiden_low(a), i.ins().swiden_high(a));
        let lo = i.ins().imul(al, wl);
        let hi = i.ins().imul(ah, wh);
        let (lo_l, lo_h) = (i.ins().swiden_low(lo), i.ins().swiden_high(lo));
        let lo = i.ins().iadd_pairwise(lo_l, lo_h);
        let (hi_l, hi_h) = (i.ins().swiden_low(hi), i.ins().swiden_high(hi));
        let hi = i.ins().iadd_pairwise(hi_l, hi_h);
        i.ins().iadd_pairwise(lo, hi)
    }

    /// The flags of a load from buffer `buf`: `base`, made read-only, non-trapping and
    /// movable when the kernel does not write the buffer. A kernel's buffers never overlap
    /// (the memory plan keeps a step's inputs and outputs apart; a step passing a buffer it
    /// writes at a second parameter gets ordinary loads), and every load is unconditional and
    /// in bounds (guards are selects, not branches; empty loops are not emitted). So such a
    /// load is a pure value to Cranelift: equal loads merge and each is placed next to its
    /// first use instead of where it was emitted, which matters for unrolled reductions, whose
    /// loads would otherwise all be issued first and held in registers (spills). `can_move`
    /// also lets the optimizer hoist invariant loads out of loops; Cranelift 0.135 does not
    /// hoist anything out of our loops today (not even a product of two function arguments),
    /// but the flags must stay correct for when it does.
    fn load_flags(&self, buf: usize, base: MemFlagsData) -> MemFlagsData {
        if self.k.params[buf].writes || !self.pure_loads {
            base
        } else {
            base.with_notrap().with_readonly().with_can_move()
        }
    }

    /// A vector load of 4 consecutive elements of buffer `buf`, as f32x4 or i32x4.
    fn vector_load(&mut self, buf: usize, addr: Value, off: i32) -> Result<Value, CodegenError> {
        let le = MemFlagsData::new().with_endianness(ir::Endianness::Little);
        let s = self.k.params[buf].scalar;
        let vflags = self.load_flags(buf, vflags());
        Ok(match s {
            Scalar::F32 => self.b.ins().load(VF32, vflags, addr, off),
            Scalar::I32 => self.b.ins().load(types::I32X4, vflags, addr, off),
            Scalar::U8 | Scalar::I8 | Scalar::Bool => {
                let w = self.b.ins().load(types::I32, vflags, addr, off);
                let v = self.b.ins().scalar_to_vector(types::I32X4, w);
                let v = self.b.ins().bitcast(types::I8X16, le, v);
                if s == Scalar::I8 {
                    let h = self.b.ins().swiden_low(v);
                    self.b.ins().swiden_low(h)
                } else {
                    let h = self.b.ins().uwiden_low(v);
                    self.b.ins().uwiden_low(h)
                }
            }
            Scalar::U16 | Scalar::I16 | Scalar::F16 => {
                let w = self.b.ins().load(types::I64, vflags, addr, off);
                let v = self.b.ins().scalar_to_vector(types::I64X2, w);
                let v = self.b.ins().bitcast(types::I16X8, le, v);
                if s == Scalar::I16 {
                    self.b.ins().swiden_low(v)
                } else {
                    self.b.ins().uwiden_low(v)
                }
            }
            other => return Err(self.err(format!("no vector load of {other:?}"))),
        })
    }

    fn vexpr_splat(&mut self, e: &Expr) -> Result<Value, CodegenError> {
        let (v, is_vec) = self.vexpr(e)?;
        Ok(if is_vec {
            v
        } else {
            let t = vtype(lane_class(self.expr_type(e)));
            self.b.ins().splat(t, v)
        })
    }

    /// Vector locals for one copy of a vectorized loop body.
    fn vector_locals(&mut self, body: &[Stmt]) -> std::collections::HashMap<VarId, Variable> {
        let mut locals = std::collections::HashSet::new();
        assigned_vars(body, &mut locals);
        let zero = self.fconst(0.0);
        let zero_f = self.b.ins().splat(VF32, zero);
        let zero = self.b.ins().iconst(types::I32, 0);
        let zero_i = self.b.ins().splat(types::I32X4, zero);
        let mut sorted: Vec<VarId> = locals.into_iter().collect();
        sorted.sort();
        sorted
            .into_iter()
            .map(|x| {
                let (ty, zero) = match self.k.vars[x] {
                    Scalar::I32 => (types::I32X4, zero_i),
                    _ => (VF32, zero_f),
                };
                let vv = self.b.declare_var(ty);
                self.b.def_var(vv, zero);
                (x, vv)
            })
            .collect()
    }

    /// The iterations in groups of `jam` vectors of 4 lanes, then single vectors, then the
    /// rest one by one.
    fn emit_vector_loop(
        &mut self,
        var: VarId,
        extent: usize,
        jam: usize,
        body: &[Stmt],
    ) -> Result<(), CodegenError> {
        let jam = jam.max(1);
        let jammed = extent / (LANES * jam) * (LANES * jam);
        let vectors = extent / LANES * LANES;
        let copies: Vec<_> = (0..jam).map(|_| self.vector_locals(body)).collect();
        let mut done = 0;
        if jam > 1 && jammed > 0 {
            let start = self.b.ins().iconst(types::I64, 0);
            let end = self.b.ins().iconst(types::I64, jammed as i64);
            self.vec = Some(VecMode {
                var,
                vvars: copies[0].clone(),
                copies: copies.clone(),
                base: None,
            });
            let r = self.emit_range_loop(var, start, end, (LANES * jam) as i64, body);
            self.vec = None;
            r?;
            done = jammed;
        }
        if done < vectors {
            let start = self.b.ins().iconst(types::I64, done as i64);
            let end = self.b.ins().iconst(types::I64, vectors as i64);
            self.vec = Some(VecMode {
                var,
                vvars: copies[0].clone(),
                copies: Vec::new(),
                base: None,
            });
            let r = self.emit_range_loop(var, start, end, LANES as i64, body);
            self.vec = None;
            r?;
        }
        if vectors < extent {
            let start = self.b.ins().iconst(types::I64, vectors as i64);
            let end = self.b.ins().iconst(types::I64, extent as i64);
            self.emit_range_loop(var, start, end, 1, body)?;
        }
        Ok(())
    }

    /// `for var in (start..end).step_by(step) { body }` with runtime bounds. The body is
    /// emitted `unroll` times per iteration with the variable at base, base + 1, ...; the
    /// iteration's base is recorded for a jammed vector loop over `var`, whose copies place the
    /// variable at their own lanes.
    fn emit_counted_loop(
        &mut self,
        var: VarId,
        start: Value,
        end: Value,
        step: i64,
        unroll: usize,
        body: &[Stmt],
    ) -> Result<(), CodegenError> {
        let v = self.vars[var];
        self.b.def_var(v, start);
        let planned = self.plan_streams(var, start, body);
        let header = self.b.create_block();
        let body_block = self.b.create_block();
        let exit = self.b.create_block();
        self.b.ins().jump(header, &[]);
        self.b.switch_to_block(header);
        let iv = self.b.use_var(v);
        let cond = self.b.ins().icmp(IntCC::SignedLessThan, iv, end);
        self.b.ins().brif(cond, body_block, &[], exit, &[]);
        // Blocks are sealed as soon as all their predecessors exist: the body and the exit
        // have only the header, the header gets its back edge below. A variable the loop
        // does not change then gets no block parameter on the header (sealing everything at
        // the end left one per outer loop variable on every inner header, each a register
        // carried around the loop).
        self.b.seal_block(body_block);
        self.b.seal_block(exit);
        self.b.switch_to_block(body_block);
        let base = self.b.use_var(v);
        if let Some(m) = self.vec.as_mut().filter(|m| m.var == var) {
            m.base = Some(base);
        }
        if !planned.is_empty() {
            let pointers = planned
                .iter()
                .map(|(key, p)| (key.clone(), (*p, self.b.use_var(*p))))
                .collect();
            self.streams = Some(Streams { var, pointers });
        }
        for u in 0..unroll {
            if u > 0 {
                let at = self.b.ins().iadd_imm_s(base, u as i64);
                self.b.def_var(v, at);
            }
            if unroll > 1 {
                self.unrolled.insert(var, (base, u as i64));
            }
            self.stmts(body)?;
        }
        self.unrolled.remove(&var);
        if let Some(streams) = self.streams.take() {
            for ((buf, coef, _), (p, at)) in streams.pointers {
                let size = self.k.params[buf].scalar.bytes() as i64;
                let next = self.b.ins().iadd_imm_s(at, coef * step * size);
                self.b.def_var(p, next);
            }
        }
        let next = self.b.ins().iadd_imm_s(base, step);
        self.b.def_var(v, next);
        self.b.ins().jump(header, &[]);
        self.b.seal_block(header);
        self.b.switch_to_block(exit);
        Ok(())
    }

    fn emit_range_loop(
        &mut self,
        var: VarId,
        start: Value,
        end: Value,
        step: i64,
        body: &[Stmt],
    ) -> Result<(), CodegenError> {
        self.emit_counted_loop(var, start, end, step, 1, body)
    }

    fn emit_loop(
        &mut self,
        var: VarId,
        extent: usize,
        kind: LoopKind,
        body: &[Stmt],
    ) -> Result<(), CodegenError> {
        let unroll = match kind {
            LoopKind::Unrolled(n) if n > 1 && extent.is_multiple_of(n) => n,
            _ => 1,
        };
        let start = self.b.ins().iconst(types::I64, 0);
        let end = self.b.ins().iconst(types::I64, extent as i64);
        self.emit_counted_loop(var, start, end, unroll as i64, unroll, body)
    }
}

fn contains_loop(s: &Stmt) -> bool {
    matches!(s, Stmt::Loop { .. })
}

/// The (buffer, index) of every load and store of a statement, inner loops included.
fn collect_accesses<'s>(s: &'s Stmt, out: &mut Vec<(usize, &'s Expr)>) {
    fn expr<'e>(e: &'e Expr, out: &mut Vec<(usize, &'e Expr)>) {
        match e {
            Expr::Const(_) | Expr::Var(_) => {}
            Expr::Load { buf, index } => {
                out.push((*buf, index));
                expr(index, out);
            }
            Expr::Bin { a, b, .. } | Expr::Cmp { a, b, .. } => {
                expr(a, out);
                expr(b, out);
            }
            Expr::Un { a, .. } | Expr::Cast { a, .. } => expr(a, out),
            Expr::Select { cond, a, b } => {
                expr(cond, out);
                expr(a, out);
                expr(b, out);
            }
        }
    }
    match s {
        Stmt::Assign { value, .. } => expr(value, out),
        Stmt::Store { buf, index, value } => {
            out.push((*buf, index));
            expr(index, out);
            expr(value, out);
        }
        Stmt::Loop { body, .. } => body.iter().for_each(|s| collect_accesses(s, out)),
        Stmt::Call { args, .. } => {
            for a in args {
                match a {
                    CallArg::Addr { buf, index } => {
                        out.push((*buf, index));
                        expr(index, out);
                    }
                    CallArg::Int(e) => expr(e, out),
                }
            }
        }
    }
}

fn collect_microkernels(stmts: &[Stmt], out: &mut std::collections::BTreeSet<Microkernel>) {
    for s in stmts {
        match s {
            Stmt::Call { kernel, .. } => {
                out.insert(*kernel);
            }
            Stmt::Loop { body, .. } => collect_microkernels(body, out),
            Stmt::Store { .. } | Stmt::Assign { .. } => {}
        }
    }
}

/// The extent of a kernel's parallel loop, if it has one.
fn parallel_extent(k: &Kernel) -> Option<usize> {
    k.body.iter().find_map(|s| match s {
        Stmt::Loop {
            kind: LoopKind::Parallel,
            extent,
            ..
        } => Some(*extent),
        _ => None,
    })
}

fn kernel_function(
    m: &ModuleBuilder,
    k: &Kernel,
    pure_loads: bool,
    microkernels: &std::collections::HashMap<Microkernel, u32>,
) -> Result<ir::Function, CodegenError> {
    let sig = m.signature(&[m.ptr(), types::I64, types::I64], None);
    let mut func = ir::Function::with_name_signature(UserFuncName::user(NS_FUNC, 0), sig);
    let mut fctx = FunctionBuilderContext::new();
    let mut b = FunctionBuilder::new(&mut func, &mut fctx);
    let entry = b.create_block();
    b.append_block_params_for_function_params(entry);
    b.switch_to_block(entry);
    b.seal_block(entry);
    let (bufs, start, end) = (
        b.block_params(entry)[0],
        b.block_params(entry)[1],
        b.block_params(entry)[2],
    );
    let ptrs: Vec<Value> = (0..k.params.len())
        .map(|i| b.ins().load(types::I64, flags(), bufs, (8 * i) as i32))
        .collect();
    let vars: Vec<Variable> = k.vars.iter().map(|&s| b.declare_var(clty(s))).collect();
    // Every variable starts defined (accumulators are always assigned before use; this keeps
    // the SSA builder from seeing an undefined use on paths it cannot prove dead).
    for (&v, &s) in vars.iter().zip(&k.vars) {
        let z = match s {
            Scalar::F32 => b.ins().f32const(0.0),
            Scalar::F64 => b.ins().f64const(0.0),
            other => b.ins().iconst(clty(other), 0),
        };
        b.def_var(v, z);
    }
    let mut g = KernelGen {
        b: &mut b,
        k,
        arch: m.arch,
        fma: m.fma && k.contract,
        vnni: m.vnni,
        ptrs,
        vars,
        range: (start, end),
        vec: None,
        unrolled: std::collections::HashMap::new(),
        pure_loads,
        streams: None,
        microkernels,
        call_refs: std::collections::HashMap::new(),
        call_conv: m.isa.default_call_conv(),
    };
    g.stmts(&k.body)?;
    b.ins().return_(&[]);
    b.seal_all_blocks();
    b.finalize(m.isa.frontend_config());
    Ok(func)
}

/// What the compile report needs to know about generated code.
#[derive(Debug, Clone, PartialEq)]
pub struct CodeStats {
    pub kernels: usize,
    pub code_bytes: usize,
    pub weight_bytes: usize,
    pub workspace_bytes: u64,
}

/// Generates the artifact for a planned program. `offsets[b]` is the workspace offset of each
/// temporary buffer (ignored for others).
pub fn generate(
    target: &Target,
    p: &Program,
    offsets: &[u64],
    workspace: u64,
    soname: &str,
) -> Result<(ArtifactSpec, CodeStats), CodegenError> {
    let (isa, arch) = make_isa(target)?;
    let fma = arch == Arch::Aarch64 || target.required_features.contains(&"fma");
    let vnni = arch == Arch::X86_64 && target.required_features.contains(&"avxvnni");
    let mut m = ModuleBuilder {
        isa,
        arch,
        fma,
        vnni,
        func_names: Vec::new(),
        functions: Vec::new(),
        data: Vec::new(),
        dump_clif: std::env::var("KILN_DUMP_CLIF").ok(),
    };
    // Weights first (one blob each, 64-byte aligned).
    let mut weight_sym: Vec<Option<u32>> = vec![None; p.buffers.len()];
    let mut weight_bytes = 0;
    for (i, b) in p.buffers.iter().enumerate() {
        if let BufKind::Weight(bytes) = &b.kind {
            weight_bytes += bytes.len();
            weight_sym[i] = Some(m.add_data(format!("kiln_w{i}"), bytes.clone(), 64));
        }
    }
    // Microkernels the kernels call, each once, as hand-written leaf functions.
    let mut used = std::collections::BTreeSet::new();
    for s in &p.steps {
        collect_microkernels(&s.kernel.body, &mut used);
    }
    let mut microkernels = std::collections::HashMap::new();
    for uk in used {
        let features = uk.required_features();
        if arch != Arch::X86_64
            || !features
                .iter()
                .all(|f| target.required_features.contains(f))
        {
            return Err(CodegenError::Isa(format!(
                "{} needs x86-64 with {}, not {}",
                uk.name(),
                features.join(", "),
                target.name
            )));
        }
        let id = m.declare_function(uk.name());
        m.functions.push(FunctionBlob {
            name: uk.name(),
            code: crate::microkernel::code(uk),
            align: 32,
            relocs: Vec::new(),
        });
        microkernels.insert(uk, id);
    }
    // Kernels.
    let mut kernel_ids = Vec::new();
    for (si, s) in p.steps.iter().enumerate() {
        let id = m.declare_function(format!("kiln_k{si}_{}", sanitize(&s.kernel.name)));
        // A buffer written through one parameter and passed at another would make the
        // other's loads depend on the kernel's own stores.
        let aliased = s.args.iter().enumerate().any(|(i, b)| {
            s.kernel.params[i].writes && s.args.iter().filter(|c| *c == b).count() > 1
        });
        let f = kernel_function(&m, &s.kernel, !aliased, &microkernels)?;
        m.compile(id, f)?;
        kernel_ids.push(id);
    }
    let code_bytes = m.functions.iter().map(|f| f.code.len()).sum();
    abi_functions(
        &mut m,
        target,
        p,
        offsets,
        workspace,
        &weight_sym,
        &kernel_ids,
    )?;
    let exports = ABI_EXPORTS.iter().map(|s| s.to_string()).collect();
    let spec = ArtifactSpec {
        arch: m.arch,
        soname: soname.to_string(),
        functions: m.functions,
        rodata: m.data,
        exports,
    };
    Ok((
        spec,
        CodeStats {
            kernels: p.steps.len(),
            code_bytes,
            weight_bytes,
            workspace_bytes: workspace,
        },
    ))
}

pub const ABI_EXPORTS: [&str; 11] = [
    "kiln_abi_version",
    "kiln_target",
    "kiln_required_features",
    "kiln_num_inputs",
    "kiln_num_outputs",
    "kiln_input_info",
    "kiln_output_info",
    "kiln_workspace_size",
    "kiln_run",
    "kiln_error_string",
    "kiln_abi_check",
];

fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect()
}

fn cstr(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}

/// `kiln_tensor_info` as laid out in kiln.h: i32 dtype, i32 rank, i64 dims[8], char name[].
fn tensor_info_bytes(io: &crate::lower::IoInfo) -> Result<Vec<u8>, CodegenError> {
    if io.shape.len() > MAX_RANK {
        return Err(CodegenError::Kernel {
            kernel: io.name.clone(),
            reason: format!("rank {} exceeds KILN_MAX_RANK {MAX_RANK}", io.shape.len()),
        });
    }
    let mut v = Vec::new();
    v.extend((io.dtype.onnx_code()).to_le_bytes());
    v.extend((io.shape.len() as i32).to_le_bytes());
    for d in 0..MAX_RANK {
        v.extend((io.shape.get(d).copied().unwrap_or(0) as i64).to_le_bytes());
    }
    v.extend(cstr(&io.name));
    Ok(v)
}

/// Builds a function with the given signature through `body`, which returns the values to
/// return.
fn build(
    m: &mut ModuleBuilder,
    name: &str,
    params: &[Type],
    ret: Option<Type>,
    body: impl FnOnce(&mut FunctionBuilder, &[Value], &mut ModuleBuilder) -> Vec<Value>,
) -> Result<(), CodegenError> {
    let id = m.declare_function(name);
    let sig = m.signature(params, ret);
    let mut func = ir::Function::with_name_signature(UserFuncName::user(NS_FUNC, id), sig);
    let mut fctx = FunctionBuilderContext::new();
    {
        let mut b = FunctionBuilder::new(&mut func, &mut fctx);
        let entry = b.create_block();
        b.append_block_params_for_function_params(entry);
        b.switch_to_block(entry);
        let args = b.block_params(entry).to_vec();
        let rets = body(&mut b, &args, m);
        b.ins().return_(&rets);
        b.seal_all_blocks();
        b.finalize(m.isa.frontend_config());
    }
    m.compile(id, func)
}

/// A direct (colocated, PC-relative) reference to function `id` of this artifact.
fn import_func(b: &mut FunctionBuilder, id: u32, signature: ir::SigRef) -> ir::FuncRef {
    let r = b
        .func
        .declare_imported_user_function(UserExternalName::new(NS_FUNC, id));
    b.import_function(ExtFuncData {
        name: ExternalName::User(r),
        signature,
        colocated: true,
        patchable: false,
    })
}

fn data_addr(b: &mut FunctionBuilder, sym: u32) -> Value {
    let r = b
        .func
        .declare_imported_user_function(UserExternalName::new(NS_DATA, sym));
    let gv = b.create_global_value(GlobalValueData::Symbol {
        name: ExternalName::User(r),
        offset: ir::immediates::Imm64::new(0),
        colocated: true,
        tls: false,
    });
    b.ins().symbol_value(types::I64, gv)
}

/// `if i == 0 return &t0; if i == 1 return &t1; ...; return NULL`.
fn select_chain(b: &mut FunctionBuilder, i: Value, syms: &[u32]) -> Value {
    let mut r = b.ins().iconst(types::I64, 0);
    for (k, &s) in syms.iter().enumerate().rev() {
        let a = data_addr(b, s);
        let c = b.ins().icmp_imm_s(IntCC::Equal, i, k as i64);
        r = b.ins().select(c, a, r);
    }
    r
}

fn abi_functions(
    m: &mut ModuleBuilder,
    target: &Target,
    p: &Program,
    offsets: &[u64],
    workspace: u64,
    weight_sym: &[Option<u32>],
    kernel_ids: &[u32],
) -> Result<(), CodegenError> {
    let ptr = types::I64;
    let target_sym = m.add_data("kiln_target_name", cstr(target.name), 1);
    let feat_sym = m.add_data(
        "kiln_features",
        cstr(&target.required_features.join(",")),
        1,
    );
    let mut in_syms = Vec::new();
    for (i, io) in p.inputs.iter().enumerate() {
        in_syms.push(m.add_data(format!("kiln_input_info_{i}"), tensor_info_bytes(io)?, 8));
    }
    let mut out_syms = Vec::new();
    for (i, io) in p.outputs.iter().enumerate() {
        out_syms.push(m.add_data(format!("kiln_output_info_{i}"), tensor_info_bytes(io)?, 8));
    }
    let msgs = [
        "ok",
        "bad argument: a null pointer was passed to kiln_run",
        "host error",
        "unknown error code",
    ];
    let msg_syms: Vec<u32> = msgs
        .iter()
        .enumerate()
        .map(|(i, s)| m.add_data(format!("kiln_msg_{i}"), cstr(s), 1))
        .collect();

    build(m, "kiln_abi_version", &[], Some(types::I32), |b, _, _| {
        vec![b.ins().iconst(types::I32, 1)]
    })?;
    build(m, "kiln_target", &[], Some(ptr), |b, _, _| {
        vec![data_addr(b, target_sym)]
    })?;
    build(m, "kiln_required_features", &[], Some(ptr), |b, _, _| {
        vec![data_addr(b, feat_sym)]
    })?;
    let (ni, no) = (p.inputs.len() as i64, p.outputs.len() as i64);
    build(m, "kiln_num_inputs", &[], Some(types::I32), |b, _, _| {
        vec![b.ins().iconst(types::I32, ni)]
    })?;
    build(m, "kiln_num_outputs", &[], Some(types::I32), |b, _, _| {
        vec![b.ins().iconst(types::I32, no)]
    })?;
    build(m, "kiln_input_info", &[types::I32], Some(ptr), |b, a, _| {
        vec![select_chain(b, a[0], &in_syms)]
    })?;
    build(
        m,
        "kiln_output_info",
        &[types::I32],
        Some(ptr),
        |b, a, _| vec![select_chain(b, a[0], &out_syms)],
    )?;
    build(
        m,
        "kiln_workspace_size",
        &[],
        Some(types::I64),
        |b, _, _| vec![b.ins().iconst(types::I64, workspace as i64)],
    )?;
    build(
        m,
        "kiln_error_string",
        &[types::I32],
        Some(ptr),
        |b, a, _| {
            let known: Vec<u32> = msg_syms[..3].to_vec();
            let r = select_chain(b, a[0], &known);
            let unknown = data_addr(b, msg_syms[3]);
            let is_null = b.ins().icmp_imm_s(IntCC::Equal, r, 0);
            vec![b.ins().select(is_null, unknown, r)]
        },
    )?;
    // kiln_abi_check: a self-test hook returning the number of kernels (lets tools tell
    // artifacts apart without running them).
    let nk = kernel_ids.len() as i64;
    build(m, "kiln_abi_check", &[], Some(types::I32), |b, _, _| {
        vec![b.ins().iconst(types::I32, nk)]
    })?;

    // Task functions for kernels with a parallel loop: task(ctx, i) runs chunk i of the loop,
    // where ctx = {bufs, chunks}. The runtime's parallel_for calls them.
    let kernel_sig = m.signature(&[ptr, types::I64, types::I64], None);
    let mut task_ids: Vec<Option<(u32, usize)>> = Vec::new();
    for (si, (s, &kid)) in p.steps.iter().zip(kernel_ids).enumerate() {
        let Some(extent) = parallel_extent(&s.kernel) else {
            task_ids.push(None);
            continue;
        };
        let name = format!("kiln_t{si}");
        let ksig = kernel_sig.clone();
        build(m, &name, &[ptr, types::I64], None, move |b, a, _| {
            let (ctx, i) = (a[0], a[1]);
            let bufs = b.ins().load(types::I64, flags(), ctx, 0);
            let chunks = b.ins().load(types::I64, flags(), ctx, 8);
            let e = b.ins().iconst(types::I64, extent as i64);
            let e1 = b.ins().iadd(e, chunks);
            let e1 = b.ins().iadd_imm_s(e1, -1);
            let chunk = b.ins().sdiv(e1, chunks);
            let start = b.ins().imul(i, chunk);
            let end = b.ins().iadd(start, chunk);
            let end = b.ins().smin(end, e);
            let sigref = b.import_signature(ksig);
            let fref = import_func(b, kid, sigref);
            b.ins().call(fref, &[bufs, start, end]);
            vec![]
        })?;
        task_ids.push(Some(((m.func_names.len() - 1) as u32, extent)));
    }
    let task_sig = m.signature(&[ptr, types::I64], None);
    let pf_sig = m.signature(&[ptr, types::I64, ptr, ptr], None);

    // kiln_run(host, inputs, outputs, workspace) -> i32
    let steps: Vec<(u32, Vec<usize>)> = p
        .steps
        .iter()
        .zip(kernel_ids)
        .map(|(s, &id)| (id, s.args.clone()))
        .collect();
    let kinds: Vec<BufKind> = p
        .buffers
        .iter()
        .map(|b| match &b.kind {
            BufKind::Weight(_) => BufKind::Weight(Vec::new()),
            k => k.clone(),
        })
        .collect();
    let max_args = steps.iter().map(|s| s.1.len()).max().unwrap_or(0);
    build(
        m,
        "kiln_run",
        &[ptr, ptr, ptr, ptr],
        Some(types::I32),
        move |b, a, _| {
            let (host, inputs, outputs, ws) = (a[0], a[1], a[2], a[3]);
            let fail = b.create_block();
            let ok = b.create_block();
            // Null checks.
            let in_null = b.ins().icmp_imm_s(IntCC::Equal, inputs, 0);
            let out_null = b.ins().icmp_imm_s(IntCC::Equal, outputs, 0);
            let mut bad = b.ins().bor(in_null, out_null);
            if workspace > 0 {
                let ws_null = b.ins().icmp_imm_s(IntCC::Equal, ws, 0);
                bad = b.ins().bor(bad, ws_null);
            }
            b.ins().brif(bad, fail, &[], ok, &[]);
            b.switch_to_block(fail);
            let one = b.ins().iconst(types::I32, 1);
            b.ins().return_(&[one]);
            b.switch_to_block(ok);
            let slot = b.create_sized_stack_slot(StackSlotData::new(
                StackSlotKind::ExplicitSlot,
                (8 * max_args.max(1)) as u32,
                3,
            ));
            let sigref = b.import_signature(kernel_sig);
            let task_sigref = b.import_signature(task_sig);
            let pf_sigref = b.import_signature(pf_sig);
            let ctx_slot =
                b.create_sized_stack_slot(StackSlotData::new(StackSlotKind::ExplicitSlot, 16, 3));
            for (si, (id, args)) in steps.iter().enumerate() {
                for (j, &buf) in args.iter().enumerate() {
                    let v = match &kinds[buf] {
                        BufKind::Input(i) => {
                            b.ins().load(types::I64, flags(), inputs, (8 * i) as i32)
                        }
                        BufKind::Output(i) => {
                            b.ins().load(types::I64, flags(), outputs, (8 * i) as i32)
                        }
                        BufKind::Weight(_) => {
                            data_addr(b, weight_sym[buf].expect("weights have symbols"))
                        }
                        BufKind::Temp => b.ins().iadd_imm_s(ws, offsets[buf] as i64),
                    };
                    b.ins().stack_store(types::I64, v, slot, (8 * j) as i32);
                }
                let fref = import_func(b, *id, sigref);
                let addr = b.ins().stack_addr(types::I64, slot, 0);
                match task_ids[si] {
                    None => {
                        let z = b.ins().iconst(types::I64, 0);
                        b.ins().call(fref, &[addr, z, z]);
                    }
                    Some((task, extent)) => {
                        // With a host that has threads: parallel_for over min(threads, extent)
                        // chunks; otherwise the whole range on this thread.
                        let serial = b.create_block();
                        let check = b.create_block();
                        let par = b.create_block();
                        let done = b.create_block();
                        b.ins().brif(host, check, &[], serial, &[]);
                        b.switch_to_block(check);
                        let nt = b.ins().sload32(flags(), host, 4);
                        let user = b.ins().load(types::I64, flags(), host, 8);
                        let pf = b.ins().load(types::I64, flags(), host, 16);
                        let many = b.ins().icmp_imm_s(IntCC::SignedGreaterThan, nt, 1);
                        let has_pf = b.ins().icmp_imm_s(IntCC::NotEqual, pf, 0);
                        let go = b.ins().band(many, has_pf);
                        b.ins().brif(go, par, &[], serial, &[]);
                        b.switch_to_block(par);
                        let e = b.ins().iconst(types::I64, extent as i64);
                        let chunks = b.ins().smin(nt, e);
                        b.ins().stack_store(types::I64, addr, ctx_slot, 0);
                        b.ins().stack_store(types::I64, chunks, ctx_slot, 8);
                        let ctx = b.ins().stack_addr(types::I64, ctx_slot, 0);
                        let tref = import_func(b, task, task_sigref);
                        let task_addr = b.ins().func_addr(types::I64, tref);
                        b.ins()
                            .call_indirect(pf_sigref, pf, &[user, chunks, task_addr, ctx]);
                        b.ins().jump(done, &[]);
                        b.switch_to_block(serial);
                        let z = b.ins().iconst(types::I64, 0);
                        let e = b.ins().iconst(types::I64, extent as i64);
                        b.ins().call(fref, &[addr, z, e]);
                        b.ins().jump(done, &[]);
                        b.switch_to_block(done);
                    }
                }
            }
            vec![b.ins().iconst(types::I32, 0)]
        },
    )?;
    Ok(())
}
