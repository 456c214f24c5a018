//! The thread pool behind `kiln_host.parallel_for`: [`ThreadPool`] keeps `threads - 1`
//! std threads and a one-job slot guarded by a Mutex/Condvar; a call publishes the job, the
//! calling thread works on it too, tasks are claimed one index at a time from an atomic
//! counter, and the call returns when every index has run and every worker has let go of the
//! job. Idle workers spin for up to 100 us before sleeping (when the pool does not have more
//! threads than cores), so that back-to-back calls do not pay a wake-up each. One thread
//! runs everything inline; a nested or concurrent call (a task calling `parallel_for` again)
//! also runs inline instead of deadlocking. [`host_parallel_for`] is the `extern "C"` entry
//! point artifacts call; it never lets a panic unwind into C and records misuse (a NULL
//! task) so that the session can report it after `kiln_run` returns.

use std::ffi::c_void;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::abi::TaskFn;

/// A fixed set of worker threads that run `parallel_for` jobs; see the module doc.
pub struct ThreadPool {
    threads: usize,
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    /// Set while a job is published; a second call meanwhile runs inline.
    busy: AtomicBool,
    /// A problem seen at the C boundary, reported by the session after the run.
    host_error: Mutex<Option<String>>,
}

struct Shared {
    state: Mutex<State>,
    /// Workers wait here for a new job.
    work: Condvar,
    /// The caller waits here for the last worker to leave the job.
    done: Condvar,
    /// The next task index to claim.
    next: AtomicI64,
    /// Copies of `State::generation` and `State::active`, read without the lock while
    /// spinning; the lock-protected fields decide.
    generation: AtomicU64,
    active: AtomicUsize,
    shutdown: AtomicBool,
    /// How long an idle worker (or a caller waiting for workers) spins before sleeping.
    spin: Duration,
}

struct State {
    job: Option<Job>,
    generation: u64,
    /// Workers currently inside the published job.
    active: usize,
    /// Workers asleep on `work`.
    sleepers: usize,
    /// The caller is asleep on `done`.
    caller_waiting: bool,
    shutdown: bool,
}

#[derive(Clone, Copy)]
struct Job {
    task: TaskFn,
    ctx: *mut c_void,
    n: i64,
}

// SAFETY: a Job is only used while the `parallel_for` call that published it is running;
// that call's contract (kiln.h) is that `task(ctx, i)` may run on any thread.
unsafe impl Send for Job {}

/// Spin time before sleeping, when every thread of the pool has a core of its own. Calls
/// inside one `kiln_run` follow each other closely; a sleeping worker takes tens of
/// microseconds (on a busy machine, much more) to wake up, which would eat the parallel
/// speed-up of a 10-100 us call.
const SPIN: Duration = Duration::from_micros(100);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The state stays consistent even if a holder panicked: every update is a single store.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn wait<'a, T>(cv: &Condvar, guard: MutexGuard<'a, T>) -> MutexGuard<'a, T> {
    cv.wait(guard).unwrap_or_else(|e| e.into_inner())
}

/// Spins until `done()` or until `limit` has passed.
fn spin_until(limit: Duration, done: impl Fn() -> bool) {
    if limit.is_zero() {
        return;
    }
    let start = Instant::now();
    loop {
        for _ in 0..64 {
            if done() {
                return;
            }
            std::hint::spin_loop();
        }
        if start.elapsed() >= limit {
            return;
        }
    }
}

/// Claims and runs task indices until none are left.
fn run_tasks(next: &AtomicI64, job: Job) {
    loop {
        let i = next.fetch_add(1, Ordering::Relaxed);
        if i >= job.n || i < 0 {
            break;
        }
        // SAFETY: the publisher of the job guarantees task and ctx for i in [0, n).
        unsafe { (job.task)(job.ctx, i) };
    }
}

fn worker(shared: Arc<Shared>) {
    let mut seen = 0u64;
    loop {
        spin_until(shared.spin, || {
            shared.generation.load(Ordering::Acquire) != seen
                || shared.shutdown.load(Ordering::Relaxed)
        });
        let job = {
            let mut st = lock(&shared.state);
            loop {
                if st.shutdown {
                    return;
                }
                if st.generation != seen {
                    seen = st.generation;
                    if let Some(job) = st.job {
                        st.active += 1;
                        shared.active.store(st.active, Ordering::Release);
                        break job;
                    }
                    continue; // that job is already over: wait for the next one
                }
                st.sleepers += 1;
                st = wait(&shared.work, st);
                st.sleepers -= 1;
            }
        };
        run_tasks(&shared.next, job);
        let mut st = lock(&shared.state);
        st.active -= 1;
        shared.active.store(st.active, Ordering::Release);
        if st.active == 0 && st.caller_waiting {
            shared.done.notify_one();
        }
    }
}

/// Retracts the published job and waits until no worker is inside it, also when unwinding,
/// so that no worker can touch `ctx` after `parallel_for` has returned.
struct Publication<'a>(&'a ThreadPool);

impl Drop for Publication<'_> {
    fn drop(&mut self) {
        let shared = &self.0.shared;
        let mut st = lock(&shared.state);
        st.job = None; // from here on no worker joins, so `active` only goes down
        if st.active > 0 {
            drop(st);
            spin_until(shared.spin, || shared.active.load(Ordering::Acquire) == 0);
            st = lock(&shared.state);
            st.caller_waiting = true;
            while st.active > 0 {
                st = wait(&shared.done, st);
            }
            st.caller_waiting = false;
        }
        drop(st);
        self.0.busy.store(false, Ordering::Release);
    }
}

impl ThreadPool {
    /// A pool of `threads` threads in all, the caller's included (`threads - 1` are spawned).
    /// `0` means one per available core.
    pub fn new(threads: usize) -> std::io::Result<ThreadPool> {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let threads = if threads == 0 { cores } else { threads };
        // Spinning only pays when no thread has to wait for a core held by a spinner.
        let spin = if threads <= cores {
            SPIN
        } else {
            Duration::ZERO
        };
        let mut pool = ThreadPool {
            threads,
            shared: Arc::new(Shared {
                state: Mutex::new(State {
                    job: None,
                    generation: 0,
                    active: 0,
                    sleepers: 0,
                    caller_waiting: false,
                    shutdown: false,
                }),
                work: Condvar::new(),
                done: Condvar::new(),
                next: AtomicI64::new(0),
                generation: AtomicU64::new(0),
                active: AtomicUsize::new(0),
                shutdown: AtomicBool::new(false),
                spin,
            }),
            workers: Vec::with_capacity(threads - 1),
            busy: AtomicBool::new(false),
            host_error: Mutex::new(None),
        };
        for i in 1..threads {
            let shared = Arc::clone(&pool.shared);
            // On error `pool` is dropped, which stops the workers already started.
            let handle = std::thread::Builder::new()
                .name(format!("kiln-worker-{i}"))
                .spawn(move || worker(shared))?;
            pool.workers.push(handle);
        }
        Ok(pool)
    }

    /// Threads in all, the caller's included.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Runs `f(i)` for every `i` in `0..n`, spread over the pool; returns when all are done.
    /// If a task panics, the others still run and then this call panics.
    pub fn parallel_for<F: Fn(usize) + Sync>(&self, n: usize, f: F) {
        struct Ctx<'a, F> {
            f: &'a F,
            panicked: AtomicBool,
        }
        unsafe extern "C" fn call<F: Fn(usize) + Sync>(ctx: *mut c_void, i: i64) {
            // SAFETY: ctx is the `Ctx<F>` below, alive for the whole parallel_for_raw call.
            let ctx = unsafe { &*(ctx as *const Ctx<'_, F>) };
            // i is in [0, n) with n <= usize::MAX, so the cast is exact.
            if catch_unwind(AssertUnwindSafe(|| (ctx.f)(i as usize))).is_err() {
                ctx.panicked.store(true, Ordering::Relaxed);
            }
        }
        let Ok(n64) = i64::try_from(n) else {
            (0..n).for_each(f); // more tasks than the ABI can count: run them here
            return;
        };
        let ctx = Ctx {
            f: &f,
            panicked: AtomicBool::new(false),
        };
        // SAFETY: `call::<F>` with `&ctx` is valid for every i in [0, n) on any thread
        // (F: Sync), and ctx outlives the call.
        unsafe { self.parallel_for_raw(n64, call::<F>, &ctx as *const Ctx<'_, F> as *mut c_void) };
        if ctx.panicked.load(Ordering::Relaxed) {
            panic!("a ThreadPool::parallel_for task panicked");
        }
    }

    /// Runs `task(ctx, i)` for every `i` in `0..n`; returns when all calls are done.
    ///
    /// # Safety
    /// `task(ctx, i)` must be safe to call for every such `i`, from any thread, concurrently.
    pub unsafe fn parallel_for_raw(&self, n: i64, task: TaskFn, ctx: *mut c_void) {
        if n <= 0 {
            return;
        }
        let job = Job { task, ctx, n };
        if self.workers.is_empty() || n == 1 || self.busy.swap(true, Ordering::Acquire) {
            // One thread, one task, or a nested/concurrent call: run here, in order.
            run_tasks(&AtomicI64::new(0), job);
            return;
        }
        let publication = Publication(self);
        {
            let mut st = lock(&self.shared.state);
            // No worker is inside a job (the previous call waited for that), so the counter
            // can be reset.
            self.shared.next.store(0, Ordering::Relaxed);
            st.job = Some(job);
            st.generation = st.generation.wrapping_add(1);
            self.shared
                .generation
                .store(st.generation, Ordering::Release);
            if st.sleepers > 0 {
                self.shared.work.notify_all();
            }
        }
        run_tasks(&self.shared.next, job);
        drop(publication);
    }

    /// Records a problem seen at the C boundary (the first one is kept).
    fn record_host_error(&self, message: String) {
        lock(&self.host_error).get_or_insert(message);
    }

    /// Takes the problem recorded during the last run, if any.
    pub(crate) fn take_host_error(&self) -> Option<String> {
        lock(&self.host_error).take()
    }
}

impl Drop for ThreadPool {
    fn drop(&mut self) {
        lock(&self.shared.state).shutdown = true;
        self.shared.shutdown.store(true, Ordering::Relaxed);
        self.shared.work.notify_all();
        for w in self.workers.drain(..) {
            // A worker cannot panic (it runs only C tasks and poison-tolerant locking); if it
            // somehow did, there is nothing left to clean up.
            let _ = w.join();
        }
    }
}

impl std::fmt::Debug for ThreadPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ThreadPool")
            .field("threads", &self.threads)
            .finish_non_exhaustive()
    }
}

/// `kiln_host.parallel_for`: `user` is the session's `ThreadPool`. Never unwinds into C.
pub(crate) unsafe extern "C" fn host_parallel_for(
    user: *mut c_void,
    n: i64,
    task: Option<TaskFn>,
    ctx: *mut c_void,
) {
    // SAFETY: the session sets `user` to its pool, which outlives the kiln_run call.
    let pool = unsafe { (user as *const ThreadPool).as_ref() };
    let result = catch_unwind(AssertUnwindSafe(|| match (pool, task) {
        // SAFETY: kiln.h's contract for parallel_for: task(ctx, i) may run on any thread.
        (Some(pool), Some(task)) => unsafe { pool.parallel_for_raw(n, task, ctx) },
        // A corrupted host table: still run every task, in order, so results stay right.
        (None, Some(task)) => run_tasks(&AtomicI64::new(0), Job { task, ctx, n }),
        (Some(pool), None) => pool.record_host_error(format!(
            "the artifact called parallel_for with a NULL task (n = {n})"
        )),
        (None, None) => {}
    }));
    if result.is_err() {
        if let Some(pool) = pool {
            // Recording cannot panic: the lock tolerates poisoning.
            pool.record_host_error("a panic inside parallel_for was caught".to_string());
        }
    }
}
