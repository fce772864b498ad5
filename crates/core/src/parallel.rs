//! [`Workers`]: the parallel steps of a conversion (reading a batch of chunks, encoding
//! it, writing it), each on a fixed number of threads that block when they run out of
//! work.
//!
//! A work-stealing pool (rayon) keeps its idle threads spinning on `sched_yield` for a
//! while before they sleep. Between two batches of a conversion every worker is idle
//! while the kernel copies the previous batch into the page cache, so on a small machine
//! those spinning threads took CPU from the copy: qcow2 → raw with `-t unsafe` on
//! 2 cores made ~2,000–4,300 `sched_yield` calls and ran 0.53–0.68× as fast as
//! qemu-img. Here each step starts its threads in a scope, hands out items in order from
//! one counter, and the threads end with the step: nothing is left to spin, and an idle
//! thread is one blocked in a system call or in `join`. A step costs one thread start
//! per extra thread (tens of microseconds, against milliseconds of work per batch).
//!
//! Results come back in item order whatever thread computed them, and the error
//! returned is the first one in item order, so the output does not depend on the
//! thread count.
//!
//! Conversions that run at once (vimport's imports) share a [`ThreadBudget`]: each
//! step borrows its extra threads from it for as long as the step runs, and runs on
//! fewer (down to the caller's alone) when the others hold them, so together they never
//! start more than the budget, instead of one set of threads per core each.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

/// Extra worker threads shared by every conversion given it (see
/// [`Workers::shared`]): at any moment their steps run at most this many threads
/// beyond the callers' own. Cloning it shares the same budget.
#[derive(Clone, Debug)]
pub struct ThreadBudget(Arc<Budget>);

#[derive(Debug)]
struct Budget {
    size: usize,
    lent: AtomicUsize,
    peak: AtomicUsize,
}

/// Threads borrowed from a budget, given back on drop.
struct Lease<'a> {
    budget: Option<&'a Budget>,
    threads: usize,
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        if let Some(b) = self.budget {
            b.lent.fetch_sub(self.threads, Ordering::AcqRel);
        }
    }
}

impl ThreadBudget {
    /// A budget of `threads` extra threads (0 is allowed: every step then runs on its
    /// caller's thread alone).
    pub fn new(threads: usize) -> Self {
        ThreadBudget(Arc::new(Budget {
            size: threads,
            lent: AtomicUsize::new(0),
            peak: AtomicUsize::new(0),
        }))
    }

    /// Its size.
    pub fn threads(&self) -> usize {
        self.0.size
    }

    /// Threads lent now.
    pub fn lent(&self) -> usize {
        self.0.lent.load(Ordering::Acquire)
    }

    /// The most threads lent at once so far.
    pub fn peak(&self) -> usize {
        self.0.peak.load(Ordering::Acquire)
    }

    /// Up to `want` threads, as many as are free now (never waits).
    fn borrow(&self, want: usize) -> Lease<'_> {
        let b = &*self.0;
        let mut lent = b.lent.load(Ordering::Acquire);
        loop {
            let n = want.min(b.size.saturating_sub(lent));
            if n == 0 {
                return Lease {
                    budget: None,
                    threads: 0,
                };
            }
            match b
                .lent
                .compare_exchange_weak(lent, lent + n, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => {
                    b.peak.fetch_max(lent + n, Ordering::AcqRel);
                    return Lease {
                        budget: Some(b),
                        threads: n,
                    };
                }
                Err(now) => lent = now,
            }
        }
    }
}

/// How many threads the parallel steps of one conversion use.
#[derive(Clone, Debug)]
pub struct Workers {
    threads: usize,
    budget: Option<ThreadBudget>,
}

impl Workers {
    /// Steps on `threads` threads (at least one: the caller's).
    pub fn new(threads: usize) -> Self {
        Self {
            threads: threads.max(1),
            budget: None,
        }
    }

    /// Steps on at most `threads` threads: the caller's, and extra ones borrowed from
    /// `budget` for the step's duration when it has them free (a step starts with
    /// fewer, never waits for them).
    pub fn shared(threads: usize, budget: &ThreadBudget) -> Self {
        Self {
            threads: threads.max(1),
            budget: Some(budget.clone()),
        }
    }

    /// The most threads a step uses.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// `want` extra threads, or fewer as the budget allows.
    fn extra(&self, want: usize) -> Lease<'_> {
        match &self.budget {
            Some(b) => b.borrow(want),
            None => Lease {
                budget: None,
                threads: want,
            },
        }
    }

    /// `f` of every item, in item order. The caller's thread takes part.
    pub fn map<T: Sync, R: Send>(&self, items: &[T], f: impl Fn(&T) -> R + Sync) -> Vec<R> {
        match self.try_map(items, |t| Ok::<R, std::convert::Infallible>(f(t))) {
            Ok(v) => v,
            Err(never) => match never {},
        }
    }

    /// `f` of every item, in item order, or the first error in item order: once an
    /// item fails, no item after it is started (those before it all complete, so the
    /// error returned does not depend on timing).
    pub fn try_map<T: Sync, R: Send, E: Send>(
        &self,
        items: &[T],
        f: impl Fn(&T) -> Result<R, E> + Sync,
    ) -> Result<Vec<R>, E> {
        let lease = self.extra(self.threads.min(items.len()).saturating_sub(1));
        let n = 1 + lease.threads;
        if n <= 1 {
            return items.iter().map(f).collect();
        }
        let next = AtomicUsize::new(0);
        let failed = AtomicBool::new(false);
        let work = || {
            let mut done: Vec<(usize, Result<R, E>)> = Vec::new();
            while !failed.load(Ordering::Relaxed) {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(item) = items.get(i) else { break };
                let r = f(item);
                if r.is_err() {
                    failed.store(true, Ordering::Relaxed);
                }
                done.push((i, r));
            }
            done
        };
        let mut all = std::thread::scope(|s| {
            let others: Vec<_> = (1..n)
                .filter_map(|i| {
                    // A thread that cannot be started leaves its share to the others.
                    std::thread::Builder::new()
                        .name(format!("vconvert-{i}"))
                        .spawn_scoped(s, work)
                        .ok()
                })
                .collect();
            let mut all = work();
            for h in others {
                match h.join() {
                    Ok(part) => all.extend(part),
                    Err(panic) => std::panic::resume_unwind(panic),
                }
            }
            all
        });
        drop(lease);
        all.sort_unstable_by_key(|(i, _)| *i);
        let mut out = Vec::with_capacity(all.len());
        for (_, r) in all {
            out.push(r?);
        }
        Ok(out)
    }

    /// `f` of every item; the first error in item order (see [`Workers::try_map`]).
    pub fn try_for_each<T: Sync, E: Send>(
        &self,
        items: &[T],
        f: impl Fn(&T) -> Result<(), E> + Sync,
    ) -> Result<(), E> {
        self.try_map(items, f).map(|_| ())
    }

    /// `a` and `b` at once (`a` on a thread of its own, `b` on the caller's); with one
    /// thread, `a` then `b`.
    pub fn join<RA: Send, RB>(
        &self,
        a: impl FnOnce() -> RA + Send,
        b: impl FnOnce() -> RB,
    ) -> (RA, RB) {
        let lease = self.extra(usize::from(self.threads > 1));
        if lease.threads == 0 {
            let ra = a();
            return (ra, b());
        }
        // `a` waits in a slot: if no thread can be started, the caller runs it.
        let slot = std::sync::Mutex::new(Some(a));
        let take = || slot.lock().ok().and_then(|mut a| a.take());
        std::thread::scope(|s| {
            let other = std::thread::Builder::new()
                .name("vconvert-join".into())
                .spawn_scoped(s, || take().map(|a| a()));
            let rb = b();
            let ra = match other.map(|h| h.join()) {
                Ok(Ok(ra)) => ra,
                Ok(Err(panic)) => std::panic::resume_unwind(panic),
                Err(_) => None,
            };
            drop(lease);
            match ra.or_else(|| take().map(|a| a())) {
                Some(ra) => (ra, rb),
                // The thread took `a` and returned its result, or `a` is still here.
                None => unreachable!("join: the first closure ran nowhere"),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::{ThreadBudget, Workers};
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Runs `f` while counting how many run at once; keeps the highest count.
    fn counted<R>(now: &AtomicUsize, most: &AtomicUsize, f: impl FnOnce() -> R) -> R {
        let n = now.fetch_add(1, Ordering::SeqCst) + 1;
        most.fetch_max(n, Ordering::SeqCst);
        // Long enough for the threads of a step to overlap.
        std::thread::sleep(std::time::Duration::from_millis(2));
        let r = f();
        now.fetch_sub(1, Ordering::SeqCst);
        r
    }

    #[test]
    fn conversions_sharing_a_budget_run_at_most_its_threads_beyond_their_own() {
        let items: Vec<u64> = (0..64).collect();
        let expected: Vec<u64> = items.iter().map(|x| x * 3).collect();
        for size in [0, 1, 3] {
            let budget = ThreadBudget::new(size);
            let (now, most) = (AtomicUsize::new(0), AtomicUsize::new(0));
            // Four "conversions" at once, each asking for 8 threads per step, with
            // nested steps as a conversion has (encoding joined with placement).
            std::thread::scope(|s| {
                for _ in 0..4 {
                    s.spawn(|| {
                        let w = Workers::shared(8, &budget);
                        for _ in 0..3 {
                            let (a, b) = w.join(
                                || w.map(&items, |x| counted(&now, &most, || x * 3)),
                                || w.map(&items, |x| counted(&now, &most, || x * 3)),
                            );
                            assert_eq!(a, expected);
                            assert_eq!(b, expected);
                        }
                    });
                }
            });
            // The 4 callers, plus at most `size` borrowed threads.
            let most = most.load(Ordering::SeqCst);
            assert!(most <= 4 + size, "budget {size}: {most} ran at once");
            assert_eq!(budget.lent(), 0, "every thread was given back");
            assert!(budget.peak() <= size);
            if size > 0 {
                assert_eq!(budget.peak(), size, "the budget was used");
            }
        }
        // Without a budget the same conversions run many more threads at once.
        let (now, most) = (AtomicUsize::new(0), AtomicUsize::new(0));
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| Workers::new(8).map(&items, |x| counted(&now, &most, || x * 3)));
            }
        });
        assert!(most.load(Ordering::SeqCst) > 4 + 3);
    }

    #[test]
    fn results_come_back_in_item_order_at_any_thread_count() {
        let items: Vec<u64> = (0..1000).collect();
        for threads in [1, 2, 3, 8, 2000] {
            let out = Workers::new(threads).map(&items, |x| {
                // Uneven work, so threads finish out of order.
                if x % 7 == 0 {
                    std::thread::yield_now();
                }
                x * 3
            });
            assert_eq!(out, items.iter().map(|x| x * 3).collect::<Vec<_>>());
        }
    }

    #[test]
    fn the_first_error_in_item_order_is_returned_and_later_items_stop() {
        let items: Vec<u64> = (0..10_000).collect();
        for threads in [1, 2, 4] {
            let started = AtomicUsize::new(0);
            let r = Workers::new(threads).try_map(&items, |&x| {
                started.fetch_add(1, Ordering::Relaxed);
                if x == 10 || x == 11 || x == 5000 {
                    Err(x)
                } else {
                    Ok(x)
                }
            });
            assert_eq!(r, Err(10), "threads {threads}");
            // Items are handed out in order and stop after a failure: at most one
            // more per thread after the failing one.
            assert!(
                started.load(Ordering::Relaxed) <= 11 + threads,
                "threads {threads}"
            );
        }
    }

    #[test]
    fn join_runs_both_and_panics_propagate() {
        for threads in [1, 2] {
            let (a, b) = Workers::new(threads).join(|| 1 + 1, || "b");
            assert_eq!((a, b), (2, "b"));
        }
        let r = std::panic::catch_unwind(|| {
            Workers::new(2).map(&[1, 2, 3, 4], |&x| {
                if x == 3 {
                    panic!("item 3")
                }
                x
            })
        });
        assert!(r.is_err());
    }
}
