//! The thread pool behind `parallel_for`: every index runs exactly once for a table of
//! (threads, n), nested and concurrent calls complete, a panicking task is reported after the
//! others ran, and a rough measurement of the per-call overhead (printed; run with
//! `--nocapture` to see it).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use kiln_runtime::ThreadPool;

fn counts(n: usize) -> Vec<AtomicUsize> {
    (0..n).map(|_| AtomicUsize::new(0)).collect()
}

#[test]
fn every_index_runs_once() {
    let cases: &[(usize, usize)] = &[
        (1, 0),
        (1, 5),
        (2, 0),
        (2, 1),
        (2, 2),
        (2, 1000),
        (3, 2),
        (4, 3),
        (8, 100),
    ];
    for &(threads, n) in cases {
        let pool = ThreadPool::new(threads).expect("pool");
        assert_eq!(pool.threads(), threads);
        for round in 0..20 {
            let seen = counts(n);
            pool.parallel_for(n, |i| {
                seen[i].fetch_add(1, Ordering::Relaxed);
            });
            for (i, c) in seen.iter().enumerate() {
                let c = c.load(Ordering::Relaxed);
                assert_eq!(
                    c, 1,
                    "threads {threads}, n {n}, round {round}: index {i} ran {c}x"
                );
            }
        }
    }
}

#[test]
fn zero_threads_means_all_cores() {
    let pool = ThreadPool::new(0).expect("pool");
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    assert_eq!(pool.threads(), cores);
}

#[test]
fn work_is_spread_over_threads() {
    // With tasks that sleep, a 2-thread pool must finish in clearly less than serial time.
    let pool = ThreadPool::new(2).expect("pool");
    let start = Instant::now();
    pool.parallel_for(8, |_| std::thread::sleep(Duration::from_millis(20)));
    let took = start.elapsed();
    assert!(
        took < Duration::from_millis(140),
        "8 x 20 ms on 2 threads took {took:?}"
    );
}

#[test]
fn nested_calls_run_inline() {
    let pool = ThreadPool::new(3).expect("pool");
    let seen = counts(8 * 5);
    pool.parallel_for(8, |i| {
        pool.parallel_for(5, |j| {
            seen[i * 5 + j].fetch_add(1, Ordering::Relaxed);
        });
    });
    assert!(seen.iter().all(|c| c.load(Ordering::Relaxed) == 1));
}

#[test]
fn concurrent_callers_share_one_pool() {
    let pool = ThreadPool::new(2).expect("pool");
    let total = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| {
                for _ in 0..200 {
                    pool.parallel_for(10, |_| {
                        total.fetch_add(1, Ordering::Relaxed);
                    });
                }
            });
        }
    });
    assert_eq!(total.load(Ordering::Relaxed), 4 * 200 * 10);
}

#[test]
fn panicking_task_is_reported_after_the_others_ran() {
    let pool = ThreadPool::new(2).expect("pool");
    let ran = AtomicUsize::new(0);
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        pool.parallel_for(10, |i| {
            ran.fetch_add(1, Ordering::Relaxed);
            assert!(i != 3, "task 3 fails");
        });
    }));
    assert!(result.is_err());
    assert_eq!(ran.load(Ordering::Relaxed), 10);
    // The pool still works.
    let seen = counts(4);
    pool.parallel_for(4, |i| {
        seen[i].fetch_add(1, Ordering::Relaxed);
    });
    assert!(seen.iter().all(|c| c.load(Ordering::Relaxed) == 1));
}

/// Spins for about `d` (a stand-in for a kernel's work).
fn spin(d: Duration) {
    let start = Instant::now();
    while start.elapsed() < d {
        std::hint::spin_loop();
    }
}

/// Rough per-call overhead: empty tasks (pure dispatch cost), and 10 us / 100 us of work per
/// call split into `threads` tasks (serially that takes 10 us / 100 us), back to back and
/// after the workers have gone to sleep. Printed, with
/// only a loose bound checked, since the build machine is shared and noisy.
#[test]
fn parallel_for_overhead() {
    for threads in [1usize, 2, 4] {
        let pool = ThreadPool::new(threads).expect("pool");
        let calls = 5000;
        pool.parallel_for(threads, |_| {}); // warm up
        let start = Instant::now();
        for _ in 0..calls {
            pool.parallel_for(threads, |_| {});
        }
        let empty = start.elapsed() / calls;
        let mut line = format!("threads {threads}: empty call {empty:?}");
        for work_us in [10u64, 100] {
            let calls = 300;
            let per_task = Duration::from_micros(work_us) / threads as u32;
            let start = Instant::now();
            for _ in 0..calls {
                pool.parallel_for(threads, |_| spin(per_task));
            }
            let per_call = start.elapsed() / calls;
            line += &format!(", {work_us} us of work: {per_call:?} per call");
        }
        // A call after the workers have gone to sleep pays their wake-up, with one task per
        // thread and with 8 smaller tasks per thread.
        for tasks in [1, 8] {
            let n = threads * tasks;
            let per_task = Duration::from_micros(100) / n as u32;
            let mut cold = Duration::ZERO;
            for _ in 0..50 {
                std::thread::sleep(Duration::from_millis(2));
                let start = Instant::now();
                pool.parallel_for(n, |_| spin(per_task));
                cold += start.elapsed();
            }
            line += &format!(
                "; 100 us after 2 ms idle, {tasks} task(s)/thread: {:?}",
                cold / 50
            );
        }
        println!("parallel_for overhead, {line}");
        assert!(empty < Duration::from_millis(2), "{line}");
    }
}
