//! Choosing many sequences' tokens at once on the sampling pool (GPU plans):
//! the worker thread takes a share of the rows itself while the pool's
//! threads wake for the rest.
//!
//! With `install` + `par_iter` the calling thread only waits while the
//! pool's threads wake one another; here the caller hands out the shares
//! first (each hand-off wakes a thread) and then chooses its own, so the
//! wake-ups overlap real work. Measured on the H100 machine (session 10,
//! alternating in one sitting): with 16 rows a step token choice took 0.20
//! instead of 0.38 ms; with 4 rows the hand-offs cost more than they hide
//! (0.21–0.25 instead of 0.15 ms), so the worker uses this from 16 rows on
//! (`SHARED_ROWS` in `serve.rs`).

/// Run `f` on every item, in parallel on `pool` and the calling thread. The
/// items are cut in shares of equal size, about two per thread (the pool's
/// and the caller), so uneven items (a constrained sequence computes its
/// mask) still balance; the caller runs the first share itself, the pool
/// the others, and this returns when all are done. Each item is visited
/// exactly once; the order across shares is unspecified.
pub(crate) fn for_each_shared<T: Send>(
    pool: &rayon::ThreadPool,
    items: &mut [T],
    f: impl Fn(&mut T) + Sync,
) {
    let threads = pool.current_num_threads() + 1;
    let per = items.len().div_ceil(2 * threads).max(1);
    let mut shares = items.chunks_mut(per);
    let Some(mine) = shares.next() else {
        return;
    };
    let f = &f;
    pool.in_place_scope(|s| {
        for share in shares {
            s.spawn(move |_| share.iter_mut().for_each(f));
        }
        mine.iter_mut().for_each(f);
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::thread::{self, ThreadId};

    fn pool(n: usize) -> rayon::ThreadPool {
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build()
            .unwrap()
    }

    /// (visits, the thread of the last visit) per item.
    fn run(pool: &rayon::ThreadPool, n: usize) -> Vec<(u32, Option<ThreadId>)> {
        let mut items = vec![(0u32, None); n];
        for_each_shared(pool, &mut items, |(visits, by)| {
            *visits += 1;
            *by = Some(thread::current().id());
        });
        items
    }

    #[test]
    fn every_item_exactly_once_for_every_size_and_pool() {
        for threads in [1, 2, 3, 8] {
            let p = pool(threads);
            for n in [0, 1, 2, 3, 4, 5, 7, 8, 9, 16, 17, 31, 64, 129, 255] {
                let items = run(&p, n);
                assert_eq!(items.len(), n);
                assert!(
                    items.iter().all(|(v, _)| *v == 1),
                    "threads {threads}, {n} items: {:?}",
                    items.iter().map(|(v, _)| v).collect::<Vec<_>>()
                );
            }
        }
    }

    #[test]
    fn the_caller_takes_the_first_share_and_the_pool_the_rest() {
        let p = pool(4);
        let me = thread::current().id();
        // 4 items, 5 threads in all: shares of one; the first is the caller's.
        let items = run(&p, 4);
        assert_eq!(items[0].1, Some(me));
        assert!(
            items[1..].iter().all(|(_, by)| *by != Some(me)),
            "{items:?}"
        );
        // A single item never leaves the caller.
        assert_eq!(run(&p, 1)[0].1, Some(me));
    }

    #[test]
    fn results_equal_a_sequential_pass() {
        let p = pool(3);
        let mut items: Vec<u64> = (0..100).collect();
        for_each_shared(&p, &mut items, |x| *x = *x * *x + 1);
        let expected: Vec<u64> = (0..100u64).map(|x| x * x + 1).collect();
        assert_eq!(items, expected);
    }
}
