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

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// How many threads the parallel steps of one conversion use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Workers {
    threads: usize,
}

impl Workers {
    /// Steps on `threads` threads (at least one: the caller's).
    pub fn new(threads: usize) -> Self {
        Self {
            threads: threads.max(1),
        }
    }

    /// The thread count.
    pub fn threads(&self) -> usize {
        self.threads
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
        let n = self.threads.min(items.len());
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
        if self.threads <= 1 {
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
    use super::Workers;
    use std::sync::atomic::{AtomicUsize, Ordering};

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
