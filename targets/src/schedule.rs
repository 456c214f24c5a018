//! Schedules: transformations of a lowered kernel's loops that keep its meaning. Today a
//! schedule annotates loops — `Vectorized { lanes, jam }` on the first loop (outermost first) whose
//! body can run `lanes` iterations at once, `Parallel` on the kernel's outermost loop when the
//! kernel does enough work, `Unrolled(factor)` on innermost serial loops — and the code
//! generator realises the annotations. Lowering guarantees that the outermost loop of a kernel
//! never carries a dependence between iterations (each writes its own outputs), so it can
//! always be split over threads.

use crate::loop_ir::*;
use std::collections::HashSet;

#[derive(Clone, Debug, PartialEq)]
pub struct ScheduleOptions {
    /// f32 lanes per vector (4 for 128-bit NEON/SSE; 0 or 1 disables vectorization).
    pub vector_lanes: usize,
    /// Vectors of iterations interleaved in a vectorized loop whose body has inner loops
    /// (unroll-and-jam; 1: none). Bounded by the target's vector registers.
    pub vector_jam: usize,
    /// Unroll factor for innermost serial loops (1: none), from `loop_unroll_factor`.
    pub unroll: usize,
    /// Parallelise the outermost loop only when the kernel runs at least this many innermost
    /// iterations (thread hand-off costs microseconds).
    pub parallel_min_work: usize,
}

impl Default for ScheduleOptions {
    fn default() -> Self {
        ScheduleOptions {
            vector_lanes: 4,
            vector_jam: 1,
            unroll: 1,
            parallel_min_work: 1 << 16,
        }
    }
}

/// Applies the schedule to a kernel in place.
pub fn schedule(k: &mut Kernel, o: &ScheduleOptions) {
    let mut body = std::mem::take(&mut k.body);
    if o.vector_lanes > 1 {
        vectorize_first(k, &mut body, o.vector_lanes, o.vector_jam.max(1));
    } else {
        // Lowering may hand over a loop already vectorized (it laid the data out for it);
        // without vectorization it runs one iteration at a time.
        devectorize(&mut body);
    }
    if o.unroll > 1 {
        unroll_innermost(&mut body, o.unroll);
    }
    if let Some(Stmt::Loop { kind, extent, .. }) = outermost_loop(&mut body) {
        if *kind == LoopKind::Serial && *extent >= 2 {
            // Work estimate: the product of all loop extents under (and including) this loop.
            let work = work_of(&body);
            if work >= o.parallel_min_work {
                if let Some(Stmt::Loop { kind, .. }) = outermost_loop(&mut body) {
                    *kind = LoopKind::Parallel;
                }
            }
        }
    }
    k.body = body;
}

/// The kernel's single top-level loop, when the body is `[Assign..., Loop]`.
pub fn outermost_loop(body: &mut [Stmt]) -> Option<&mut Stmt> {
    let loops: Vec<usize> = body
        .iter()
        .enumerate()
        .filter(|(_, s)| matches!(s, Stmt::Loop { .. }))
        .map(|(i, _)| i)
        .collect();
    let others_are_assigns = body.iter().all(|s| {
        matches!(
            s,
            Stmt::Loop { .. }
                | Stmt::Assign {
                    value: Expr::Const(_),
                    ..
                }
        )
    });
    match (loops.as_slice(), others_are_assigns) {
        ([i], true) => body.get_mut(*i),
        _ => None,
    }
}

fn work_of(stmts: &[Stmt]) -> usize {
    stmts
        .iter()
        .map(|s| match s {
            Stmt::Loop { extent, body, .. } => extent.saturating_mul(work_of(body).max(1)),
            Stmt::Call { kernel, args } => call_work(*kernel, args),
            _ => 1,
        })
        .sum()
}

/// The work of one microkernel call in the units of [`work_of`] (multiply-adds): a product
/// tile's rows times columns times reduction steps (its last argument).
fn call_work(kernel: Microkernel, args: &[CallArg]) -> usize {
    match kernel {
        Microkernel::Q4Int8(t) => t.columns() * t.depth(),
        Microkernel::SgemmAvx2 { rows, .. } => {
            let steps = match args.last() {
                Some(CallArg::Int(Expr::Const(Const::I64(kc)))) => (*kc).max(1) as usize,
                _ => 1,
            };
            rows as usize * crate::microkernel::SGEMM_AVX2_COLUMNS * steps
        }
    }
}

fn devectorize(stmts: &mut [Stmt]) {
    for s in stmts.iter_mut() {
        if let Stmt::Loop { kind, body, .. } = s {
            if matches!(kind, LoopKind::Vectorized { .. }) {
                *kind = LoopKind::Serial;
            }
            devectorize(body);
        }
    }
}

/// Vectorizes the first (outermost, then earliest) loop that can be, unless lowering already
/// chose one: a kernel has at most one vectorized loop nest.
fn vectorize_first(k: &Kernel, stmts: &mut [Stmt], lanes: usize, jam: usize) -> bool {
    for s in stmts.iter_mut() {
        if let Stmt::Loop {
            var,
            extent,
            kind,
            body,
        } = s
        {
            if matches!(kind, LoopKind::Vectorized { .. }) {
                return true;
            }
            if *kind == LoopKind::Serial && *extent >= lanes && vectorizable(k, *var, body) {
                // Jamming pays where an inner loop's invariant loads can be shared.
                let has_inner = body.iter().any(|b| matches!(b, Stmt::Loop { .. }));
                let jam = if has_inner && *extent >= lanes * jam {
                    jam
                } else {
                    1
                };
                *kind = LoopKind::Vectorized { lanes, jam };
                return true;
            }
            if vectorize_first(k, body, lanes, jam) {
                return true;
            }
        }
    }
    false
}

fn unroll_innermost(stmts: &mut [Stmt], factor: usize) {
    for s in stmts.iter_mut() {
        if let Stmt::Loop {
            extent, kind, body, ..
        } = s
        {
            let innermost = !body.iter().any(|b| matches!(b, Stmt::Loop { .. }));
            if innermost
                && *kind == LoopKind::Serial
                && extent.is_multiple_of(factor)
                && *extent > factor
            {
                *kind = LoopKind::Unrolled(factor);
            } else {
                unroll_innermost(body, factor);
            }
        }
    }
}

/// Whether the loop over `v` with this body can run several iterations at once: every local
/// assigned in it is f32 or i32 and written before it is read in each iteration (no loop-carried
/// value), every load and store is f32 and either invariant in `v` or contiguous in it (stores
/// must be contiguous), and values use only operations with vector forms.
pub fn vectorizable(k: &Kernel, v: VarId, body: &[Stmt]) -> bool {
    let mut locals = HashSet::new();
    assigned_vars(body, &mut locals);
    if locals
        .iter()
        .any(|&x| !matches!(k.vars[x], Scalar::F32 | Scalar::I32))
    {
        return false;
    }
    // Each local's first occurrence (pre-order = execution order here) must be a plain write.
    let mut seen = HashSet::new();
    if !writes_first(body, &locals, &mut seen) {
        return false;
    }
    stmts_ok(k, v, &locals, body)
}

fn writes_first(stmts: &[Stmt], locals: &HashSet<VarId>, seen: &mut HashSet<VarId>) -> bool {
    for s in stmts {
        let reads_unseen = |e: &Expr, seen: &HashSet<VarId>| {
            locals.iter().any(|x| !seen.contains(x) && mentions(e, *x))
        };
        match s {
            Stmt::Assign { var, value } => {
                if reads_unseen(value, seen) {
                    return false;
                }
                seen.insert(*var);
            }
            Stmt::Store { index, value, .. } => {
                if reads_unseen(index, seen) || reads_unseen(value, seen) {
                    return false;
                }
            }
            Stmt::Loop { body, .. } => {
                if !writes_first(body, locals, seen) {
                    return false;
                }
            }
            Stmt::Call { .. } => return false,
        }
    }
    true
}

fn stmts_ok(k: &Kernel, v: VarId, locals: &HashSet<VarId>, stmts: &[Stmt]) -> bool {
    stmts.iter().all(|s| match s {
        Stmt::Assign { var, value } => {
            k.expr_type(value) == k.vars[*var] && value_ok(k, v, locals, value)
        }
        Stmt::Store { buf, index, value } => {
            k.params[*buf].scalar == Scalar::F32
                && k.expr_type(value) == Scalar::F32
                && index_ok(v, locals, index) == Some(1)
                && value_ok(k, v, locals, value)
        }
        Stmt::Loop { body, .. } => stmts_ok(k, v, locals, body),
        // A microkernel runs on its own registers: no vector form.
        Stmt::Call { .. } => false,
    })
}

/// The coefficient of `v` in an index (0 or 1 are vectorizable), `None` when it is not linear
/// or depends on a vector local.
fn index_ok(v: VarId, locals: &HashSet<VarId>, index: &Expr) -> Option<i64> {
    if locals.iter().any(|&x| mentions(index, x)) {
        return None;
    }
    linear_coeff(index, v).filter(|c| *c == 0 || *c == 1)
}

/// Whether `e` has a vector form: f32 arithmetic, and i32 integer arithmetic (bit operations,
/// shifts by constants) on loads widened from narrower integers or f16 bits, with casts
/// between the two and selects on comparisons.
fn value_ok(k: &Kernel, v: VarId, locals: &HashSet<VarId>, e: &Expr) -> bool {
    let ok = |x: &Expr| value_ok(k, v, locals, x);
    match e {
        Expr::Const(c) => !matches!(c, Const::Bool(_)),
        Expr::Var(x) => {
            *x != v && (locals.contains(x) || matches!(k.vars[*x], Scalar::F32 | Scalar::I32))
        }
        Expr::Load { buf, index } => {
            matches!(
                k.params[*buf].scalar,
                Scalar::F32
                    | Scalar::I32
                    | Scalar::U8
                    | Scalar::I8
                    | Scalar::Bool
                    | Scalar::U16
                    | Scalar::I16
                    | Scalar::F16
            ) && index_ok(v, locals, index).is_some()
        }
        Expr::Bin { op, a, b } => {
            let op_ok = match k.operand_type(a, b) {
                Scalar::F32 => matches!(
                    op,
                    BinOp::Add | BinOp::Sub | BinOp::Mul | BinOp::Div | BinOp::Min | BinOp::Max
                ),
                Scalar::I32 => match op {
                    BinOp::Add
                    | BinOp::Sub
                    | BinOp::Mul
                    | BinOp::Min
                    | BinOp::Max
                    | BinOp::And
                    | BinOp::Or
                    | BinOp::Xor
                    | BinOp::DotBytes => true,
                    BinOp::Shl | BinOp::Shr => matches!(
                        **b,
                        Expr::Const(Const::I64(0..=31)) | Expr::Const(Const::I32(0..=31))
                    ),
                    _ => false,
                },
                _ => false,
            };
            op_ok && ok(a) && ok(b)
        }
        Expr::Un {
            op: UnOp::BitsToF32,
            a,
        } => k.expr_type(a) == Scalar::I32 && ok(a),
        Expr::Un { op, a } => {
            matches!(op, UnOp::Neg | UnOp::Abs | UnOp::Sqrt | UnOp::Recip)
                && k.expr_type(a) == Scalar::F32
                && ok(a)
        }
        Expr::Cast { to, a } => {
            let from = k.expr_type(a);
            let int_from = matches!(
                from,
                Scalar::I32 | Scalar::U8 | Scalar::I8 | Scalar::Bool | Scalar::U16 | Scalar::I16
            );
            let conv_ok = match to {
                Scalar::F32 => from == Scalar::F32 || int_from,
                Scalar::I32 => int_from || from == Scalar::F16,
                _ => false,
            };
            conv_ok && ok(a)
        }
        Expr::Select { cond, a, b } => match &**cond {
            Expr::Cmp { a: ca, b: cb, .. } => {
                matches!(k.operand_type(ca, cb), Scalar::F32 | Scalar::I32)
                    && ok(ca)
                    && ok(cb)
                    && ok(a)
                    && ok(b)
            }
            _ => false,
        },
        _ => false,
    }
}
