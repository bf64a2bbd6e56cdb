//! Token sampling on the worker thread, straight from a logits row.
//!
//! llama.cpp's sampler chain copies the whole vocabulary into a candidate
//! array for every sequence and step; with 32 NPCs on a GPU that host work
//! took five times longer than the decode itself. Here one pass over the row
//! takes each block's maximum, and only the blocks that can hold one of the
//! `top_k` best logits are read again (see `select`); temperature, top-p, min-p
//! and the draw then work on those few candidates. The repeat penalty changes
//! only the logits of recently generated tokens. Same seed, same text.

use std::collections::VecDeque;

use crate::settings::SamplingParams;

/// Candidates kept when `top_k` is 0 (off) but sampling is not greedy: the
/// rest of a 50k vocabulary holds negligible probability after min-p/top-p.
const UNBOUNDED_K: usize = 1024;

pub(crate) struct Sampler {
    temperature: f32,
    top_k: usize,
    top_p: f32,
    min_p: f32,
    repeat_penalty: f32,
    repeat_last_n: usize,
    rng: u64,
    history: VecDeque<i32>,
    /// The candidates of this draw: (logit, token id).
    candidates: Vec<(f32, i32)>,
    /// Per 32-logit block, its maximum (reused by [`Self::select`]).
    blocks: Vec<f32>,
    /// A copy of `blocks` to find the threshold in (reused).
    scratch: Vec<f32>,
    /// The penalised token ids, sorted (reused by [`Self::top`]).
    unique: Vec<i32>,
    probs: Vec<f32>,
    /// The row with forbidden tokens at -inf (constrained sampling; reused).
    masked: Vec<f32>,
}

/// A repeated token's logit under repeat penalty `rp` (llama.cpp's rule:
/// positive logits divided, the rest multiplied).
fn penalty(logit: f32, rp: f32) -> f32 {
    if logit <= 0.0 { logit * rp } else { logit / rp }
}

/// Logits per block of [`Sampler::select`]'s first pass.
const SELECT_BLOCK: usize = 32;

/// A block's largest logit (NaN ignored; -inf for an empty or all-NaN
/// block), in eight independent lanes (no serial dependency between
/// compares).
#[inline]
fn block_max(block: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 8];
    let mut chunks = block.chunks_exact(8);
    for c in &mut chunks {
        for j in 0..8 {
            lanes[j] = if c[j] > lanes[j] { c[j] } else { lanes[j] };
        }
    }
    let mut m = lanes
        .iter()
        .fold(f32::NEG_INFINITY, |m, &l| if l > m { l } else { m });
    for &l in chunks.remainder() {
        if l > m {
            m = l;
        }
    }
    m
}

fn splitmix64(x: &mut u64) -> u64 {
    *x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *x;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Sampler {
    pub(crate) fn new(p: &SamplingParams, seed: u32) -> Self {
        Self {
            temperature: p.temperature,
            top_k: p.top_k as usize,
            top_p: p.top_p,
            min_p: p.min_p,
            repeat_penalty: p.repeat_penalty,
            repeat_last_n: p.repeat_last_n as usize,
            rng: u64::from(seed) ^ 0x5DEE_CE66_D1CE_4E5B,
            history: VecDeque::new(),
            candidates: Vec::new(),
            blocks: Vec::new(),
            scratch: Vec::new(),
            unique: Vec::new(),
            probs: Vec::new(),
            masked: Vec::new(),
        }
    }

    fn uniform(&mut self) -> f32 {
        ((splitmix64(&mut self.rng) >> 40) as f32) / ((1u64 << 24) as f32)
    }

    fn penalized(&self, token: i32, logit: f32) -> f32 {
        if self.repeat_penalty == 1.0 || !self.history.contains(&token) {
            logit
        } else {
            penalty(logit, self.repeat_penalty)
        }
    }

    /// Keep the `k` best of `self.candidates`, best first (ties: lower id first).
    fn keep_best(&mut self, k: usize) {
        let order = |a: &(f32, i32), b: &(f32, i32)| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1));
        let k = k.max(1);
        if self.candidates.len() > k {
            self.candidates.select_nth_unstable_by(k - 1, order);
            self.candidates.truncate(k);
        }
        self.candidates.sort_unstable_by(order);
    }

    /// Choose the next token from one row of logits, and remember it.
    pub(crate) fn sample(&mut self, logits: &[f32]) -> i32 {
        let token = if self.temperature <= 0.0 {
            self.argmax(logits)
        } else {
            self.top(logits, self.draw_k());
            self.draw_top()
        };
        self.remember(token);
        token
    }

    /// Candidates kept before the draw (`top_k`, or [`UNBOUNDED_K`]).
    fn draw_k(&self) -> usize {
        if self.top_k > 0 {
            self.top_k
        } else {
            UNBOUNDED_K
        }
    }

    /// Whether the `k` best raw logits of a row always hold every token
    /// this sampler can choose, so [`Self::sample_candidates`] over a device
    /// top-`k` draws exactly what [`Self::sample`] draws over the whole row
    /// (ties at the cut aside): the penalty (≥ 1) only lowers the
    /// logits of at most `repeat_last_n` tokens, so the best `top_k` after
    /// it lie among the best `top_k + repeat_last_n` before it.
    pub(crate) fn fits_top_k(&self, k: usize) -> bool {
        let keep = if self.temperature <= 0.0 {
            1
        } else if self.top_k == 0 {
            return false;
        } else {
            self.top_k
        };
        let penalised = if self.repeat_penalty == 1.0 {
            0
        } else if self.repeat_penalty > 1.0 {
            self.repeat_last_n
        } else {
            // A boosting penalty (< 1) can lift any token.
            return false;
        };
        keep + penalised <= k
    }

    /// [`Self::sample`] from a row's best candidates only (a device top-k:
    /// token ids and their raw logits, any order), and remember the token.
    /// The caller checked [`Self::fits_top_k`] for their number.
    pub(crate) fn sample_candidates(&mut self, ids: &[i32], logits: &[f32]) -> i32 {
        let k = if self.temperature <= 0.0 {
            1
        } else {
            self.draw_k()
        };
        let penalize = self.penalizes();
        self.candidates.clear();
        self.candidates
            .extend(logits.iter().copied().zip(ids.iter().copied()));
        if penalize {
            let rp = self.repeat_penalty;
            for c in &mut self.candidates {
                if self.history.contains(&c.1) {
                    c.0 = penalty(c.0, rp);
                }
            }
        }
        self.keep_best(k);
        let token = if self.temperature <= 0.0 {
            self.candidates.first().map_or(0, |c| c.1)
        } else {
            self.draw_top()
        };
        self.remember(token);
        token
    }

    /// [`Self::sample`] among the tokens `allowed` admits only (an output
    /// constraint's mask): the same draw as over a row whose other logits
    /// are -inf. `None` when no token is allowed.
    pub(crate) fn sample_allowed(
        &mut self,
        logits: &[f32],
        allowed: impl Fn(u32) -> bool,
    ) -> Option<i32> {
        let mut row = std::mem::take(&mut self.masked);
        row.clear();
        row.extend(logits.iter().enumerate().map(|(i, &l)| {
            if allowed(i as u32) {
                l
            } else {
                f32::NEG_INFINITY
            }
        }));
        let any = row.iter().any(|l| *l > f32::NEG_INFINITY);
        let token = any.then(|| self.sample(&row));
        self.masked = row;
        token
    }

    fn remember(&mut self, token: i32) {
        if self.repeat_last_n > 0 {
            if self.history.len() == self.repeat_last_n {
                self.history.pop_front();
            }
            self.history.push_back(token);
        }
    }

    fn argmax(&mut self, logits: &[f32]) -> i32 {
        if self.penalizes() {
            self.top(logits, 1);
            return self.candidates[0].1;
        }
        // Each block's maximum in one vectorised pass, then the first
        // block that holds the row's maximum, then its first index there
        // (the lowest id among ties, as a scan keeping the first best
        // would): no earlier block can hold it, as its maximum is lower.
        // A scalar search of the whole row for the maximum cost as much
        // again as the vectorised pass (~40 against ~16 µs for a 49k row
        // read from memory, as a freshly decoded row is).
        self.fill_blocks(logits);
        let best = self
            .blocks
            .iter()
            .fold(f32::NEG_INFINITY, |m, &l| if l > m { l } else { m });
        let base = self.blocks.iter().position(|&l| l == best).unwrap_or(0) * SELECT_BLOCK;
        logits[base..]
            .iter()
            .position(|&l| l == best)
            .map_or(0, |j| base + j) as i32
    }

    /// `self.blocks`: each [`SELECT_BLOCK`]-logit block's maximum, in one
    /// vectorised pass (the first pass of [`Self::argmax`] and
    /// [`Self::select`]).
    fn fill_blocks(&mut self, logits: &[f32]) {
        self.blocks.clear();
        self.blocks
            .extend(logits.chunks(SELECT_BLOCK).map(block_max));
    }

    fn penalizes(&self) -> bool {
        self.repeat_penalty != 1.0 && !self.history.is_empty()
    }

    /// The `k` best (penalised) logits, best first.
    ///
    /// A penalty ≥ 1 only lowers logits, so the `k` best after it are among
    /// the `k + h` best before it (`h` = penalised tokens): one cheap pass
    /// on raw logits, then the penalty on those few candidates only.
    fn top(&mut self, logits: &[f32], k: usize) {
        let penalize = self.penalizes();
        let mut unique = std::mem::take(&mut self.unique);
        unique.clear();
        if penalize {
            unique.extend(self.history.iter().copied());
            unique.sort_unstable();
            unique.dedup();
        }
        let exact = !penalize || self.repeat_penalty >= 1.0;
        if !exact {
            // A boosting penalty (< 1) can lift any token: rare, slow path.
            let all: Vec<f32> = logits
                .iter()
                .enumerate()
                .map(|(i, &l)| self.penalized(i as i32, l))
                .collect();
            self.select(&all, k);
        } else {
            self.select(logits, k + unique.len());
            if penalize {
                let rp = self.repeat_penalty;
                for c in &mut self.candidates {
                    if unique.binary_search(&c.1).is_ok() {
                        c.0 = penalty(c.0, rp);
                    }
                }
            }
        }
        self.unique = unique;
        self.keep_best(k);
    }

    /// Put in `self.candidates` every logit that can be among the `k` largest: at
    /// least `k` of them, all those at or above a threshold no larger than
    /// the `k`-th largest (unordered; [`Self::keep_best`] cuts to `k`).
    ///
    /// One vectorised pass takes each 32-logit block's maximum; the `k`-th
    /// largest block maximum is such a threshold (`k` blocks reach it, so `k`
    /// logits do). Only the blocks that reach it are read again — about `k`
    /// of a 50k vocabulary's 1,536. Every logit at the threshold is kept, so
    /// ties are decided by [`Self::keep_best`] (lower id first) exactly as a
    /// sort of the whole row would.
    fn select(&mut self, logits: &[f32], k: usize) {
        let k = k.clamp(1, logits.len().max(1));
        self.candidates.clear();
        self.fill_blocks(logits);
        let threshold = if self.blocks.len() > k {
            self.scratch.clear();
            self.scratch.extend_from_slice(&self.blocks);
            let (_, kth, _) = self
                .scratch
                .select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
            *kth
        } else {
            f32::NEG_INFINITY
        };
        for (b, (block, &top)) in logits.chunks(SELECT_BLOCK).zip(&self.blocks).enumerate() {
            // `>=` is false for NaN: a block of NaNs only is never read.
            if top >= threshold && top > f32::NEG_INFINITY {
                let base = b * SELECT_BLOCK;
                for (j, &l) in block.iter().enumerate() {
                    if l >= threshold && l > f32::NEG_INFINITY {
                        self.candidates.push((l, (base + j) as i32));
                    }
                }
            }
        }
        if self.candidates.len() < k {
            // Fewer than `k` finite logits (a constrained row): fill with
            // the first others, as llama.cpp's candidate array would hold them.
            for (i, &l) in logits.iter().enumerate() {
                if self.candidates.len() >= k {
                    break;
                }
                if !(l >= threshold && l > f32::NEG_INFINITY) {
                    self.candidates.push((l, i as i32));
                }
            }
        }
    }

    /// Draw among `self.candidates` (the best candidates, best first).
    fn draw_top(&mut self) -> i32 {
        // Forbidden tokens (-inf, constrained sampling) never take part; the
        // best candidate is always allowed (the caller checked one exists).
        let allowed = self
            .candidates
            .iter()
            .take_while(|c| c.0 > f32::NEG_INFINITY)
            .count();
        self.candidates.truncate(allowed.max(1));
        let t = self.temperature;
        let max = self.candidates[0].0 / t;
        self.probs.clear();
        let mut sum = 0.0f32;
        for &(l, _) in &self.candidates {
            let p = (l / t - max).exp();
            sum += p;
            self.probs.push(p);
        }
        for p in &mut self.probs {
            *p /= sum;
        }
        // min-p: drop candidates below min_p × the best one's probability.
        let mut n = self.probs.len();
        if self.min_p > 0.0 {
            let floor = self.min_p * self.probs[0];
            n = self
                .probs
                .iter()
                .take_while(|&&p| p >= floor)
                .count()
                .max(1);
        }
        // top-p: the smallest prefix holding top_p of the mass.
        if self.top_p < 1.0 {
            let mut acc = 0.0;
            for (i, p) in self.probs[..n].iter().enumerate() {
                acc += p;
                if acc >= self.top_p {
                    n = i + 1;
                    break;
                }
            }
        }
        let total: f32 = self.probs[..n].iter().sum();
        let mut r = self.uniform() * total;
        for i in 0..n {
            r -= self.probs[i];
            if r <= 0.0 {
                return self.candidates[i].1;
            }
        }
        self.candidates[n - 1].1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(t: f32, k: u32, p: f32, min_p: f32, rep: f32) -> SamplingParams {
        SamplingParams {
            temperature: t,
            top_k: k,
            top_p: p,
            min_p,
            repeat_penalty: rep,
            repeat_last_n: 64,
            ..Default::default()
        }
    }

    fn logits() -> Vec<f32> {
        (0..5000)
            .map(|i| ((i * 7919) % 1000) as f32 / 100.0)
            .collect()
    }

    /// A row's `k` best logits, as a device top-k hands them back (ids and
    /// logits, in no particular order).
    fn device_top_k(row: &[f32], k: usize) -> (Vec<i32>, Vec<f32>) {
        let mut all: Vec<(f32, i32)> = row
            .iter()
            .enumerate()
            .map(|(i, &l)| (l, i as i32))
            .collect();
        all.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        all.truncate(k);
        // Any order: reverse it so nothing relies on the device's.
        all.reverse();
        (
            all.iter().map(|c| c.1).collect(),
            all.iter().map(|c| c.0).collect(),
        )
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]
        /// Sampling from a device top-k gives the same tokens as sampling
        /// the whole row, step after step (the repeat penalty's history
        /// growing), whenever `fits_top_k` says so.
        #[test]
        fn device_top_k_draws_what_the_full_row_draws(
            seed in 0u32..1000,
            t in proptest::prop_oneof![proptest::strategy::Just(0.0f32), 0.2f32..1.5],
            top_k in 1u32..64,
            top_p in 0.5f32..=1.0,
            min_p in 0.0f32..0.2,
            rep in proptest::prop_oneof![proptest::strategy::Just(1.0f32), 1.0f32..2.0],
            last_n in 0u32..64,
            salt in 0u64..1_000_000,
        ) {
            let p = SamplingParams {
                temperature: t, top_k, top_p, min_p, repeat_penalty: rep,
                repeat_last_n: last_n, ..Default::default()
            };
            let mut full = Sampler::new(&p, seed);
            let mut dev = Sampler::new(&p, seed);
            const K: usize = 128;
            proptest::prop_assert!(full.fits_top_k(K));
            let mut x = salt;
            for step in 0..40 {
                // A fresh row per step, a few tokens strongly ahead, distinct values.
                let row: Vec<f32> = (0..3000).map(|i| {
                    let r = splitmix64(&mut x);
                    let base = (r >> 40) as f32 / (1u64 << 24) as f32 * 8.0;
                    base + if i % 97 == step % 97 { 4.0 } else { 0.0 } + i as f32 * 1e-6
                }).collect();
                let (ids, logits) = device_top_k(&row, K);
                let a = full.sample(&row);
                let b = dev.sample_candidates(&ids, &logits);
                proptest::prop_assert_eq!(a, b, "step {}", step);
            }
        }
    }

    /// The `k` best penalised logits by a sort of the whole row: (logit
    /// descending, id ascending).
    fn reference_top(row: &[f32], history: &[i32], rp: f32, k: usize) -> Vec<(f32, i32)> {
        let mut all: Vec<(f32, i32)> = row
            .iter()
            .enumerate()
            .map(|(i, &l)| {
                let i = i as i32;
                (
                    if rp != 1.0 && history.contains(&i) {
                        penalty(l, rp)
                    } else {
                        l
                    },
                    i,
                )
            })
            .collect();
        all.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        all.truncate(k.max(1));
        all
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]
        /// The block-threshold selection keeps exactly what a sort of the
        /// whole row keeps, ties (few distinct values), -inf (masked rows),
        /// the repeat penalty and every row length and `k` included.
        #[test]
        fn selection_equals_a_sort_of_the_row(
            len in 1usize..3000,
            k in 1usize..300,
            levels in 1u32..50,
            masked in 0u32..4,
            rp in proptest::prop_oneof![proptest::strategy::Just(1.0f32), 1.0f32..2.0],
            hist in proptest::collection::vec(0i32..3000, 0..64),
            salt in 0u64..1_000_000,
        ) {
            let mut x = salt;
            let row: Vec<f32> = (0..len).map(|_| {
                let r = splitmix64(&mut x);
                // masked = 3: almost every logit -inf.
                if (masked == 3 && !r.is_multiple_of(50)) || (masked == 2 && r.is_multiple_of(2)) {
                    f32::NEG_INFINITY
                } else {
                    ((r >> 40) % u64::from(levels)) as f32 * 0.5 - 3.0
                }
            }).collect();
            let p = SamplingParams { repeat_penalty: rp, repeat_last_n: 64, ..Default::default() };
            let mut s = Sampler::new(&p, 1);
            for &t in &hist {
                s.remember(t);
            }
            s.top(&row, k);
            let want = reference_top(&row, s.history.make_contiguous(), rp, k);
            let got: Vec<(f32, i32)> = s.candidates.clone();
            // -inf candidates are never drawn: compare the finite ones.
            let finite = |v: &[(f32, i32)]| v.iter().copied().filter(|c| c.0 > f32::NEG_INFINITY).collect::<Vec<_>>();
            proptest::prop_assert_eq!(finite(&got), finite(&want));
            proptest::prop_assert_eq!(got.len(), want.len());
            // Greedy without a penalty: the first index of the maximum.
            let mut g = Sampler::new(&SamplingParams { temperature: 0.0, repeat_penalty: 1.0, ..Default::default() }, 1);
            let arg = g.sample(&row);
            let best = reference_top(&row, &[], 1.0, 1)[0];
            if best.0 > f32::NEG_INFINITY {
                proptest::prop_assert_eq!(arg, best.1);
            }
        }
    }

    #[test]
    fn top_k_fit_refuses_what_candidates_cannot_decide() {
        let fit = |t, k, rep, n| {
            Sampler::new(
                &SamplingParams {
                    temperature: t,
                    top_k: k,
                    repeat_penalty: rep,
                    repeat_last_n: n,
                    ..Default::default()
                },
                1,
            )
            .fits_top_k(128)
        };
        assert!(fit(0.7, 40, 1.15, 64));
        assert!(
            fit(0.0, 0, 1.1, 127),
            "greedy needs the best one plus the penalised"
        );
        assert!(!fit(0.0, 0, 1.1, 128));
        assert!(!fit(0.7, 0, 1.0, 0), "top_k 0 keeps up to 1024 candidates");
        assert!(!fit(0.7, 100, 1.1, 64));
        assert!(fit(0.7, 100, 1.0, 64), "no penalty: only top_k counts");
        assert!(
            !fit(0.7, 40, 0.9, 64),
            "a boosting penalty can lift any token"
        );
    }

    #[test]
    fn greedy_is_argmax_and_repeat_penalty_moves_it() {
        let mut l = vec![0.0f32; 100];
        l[42] = 5.0;
        l[7] = 4.5;
        let mut s = Sampler::new(&params(0.0, 40, 1.0, 0.0, 1.0), 1);
        assert_eq!(s.sample(&l), 42);
        assert_eq!(s.sample(&l), 42);
        let mut s = Sampler::new(&params(0.0, 40, 1.0, 0.0, 1.5), 1);
        assert_eq!(s.sample(&l), 42);
        assert_eq!(s.sample(&l), 7, "5.0 / 1.5 < 4.5");
    }

    #[test]
    fn greedy_takes_the_first_best_whatever_the_blocks() {
        let greedy = |l: &[f32]| Sampler::new(&params(0.0, 40, 1.0, 0.0, 1.0), 1).sample(l);
        let mut l = vec![0.0f32; 100];
        // Ties in two blocks: the lower id; a NaN block before them is skipped.
        l[5] = f32::NAN;
        l[70] = 3.0;
        l[40] = 3.0;
        assert_eq!(greedy(&l), 40);
        // The best in the short last block (100 = 3 blocks of 32 + 4).
        l[98] = 9.0;
        assert_eq!(greedy(&l), 98);
        // Ties inside one block: the lower id.
        l[97] = 9.0;
        assert_eq!(greedy(&l), 97);
        // A row of -inf but one NaN block: the first -inf.
        let mut l = vec![f32::NEG_INFINITY; 70];
        l[..32].fill(f32::NAN);
        assert_eq!(greedy(&l), 32);
        // Nothing comparable: token 0, as before.
        assert_eq!(greedy(&[f32::NAN; 40]), 0);
        assert_eq!(greedy(&[]), 0);
    }

    #[test]
    fn same_seed_same_tokens_different_seed_differs() {
        let l = logits();
        let run = |seed| {
            let mut s = Sampler::new(&params(1.0, 40, 0.95, 0.0, 1.0), seed);
            (0..50).map(|_| s.sample(&l)).collect::<Vec<_>>()
        };
        assert_eq!(run(3), run(3));
        assert_ne!(run(3), run(4));
    }

    #[test]
    fn samples_stay_inside_top_k_and_follow_the_distribution() {
        let l = logits();
        let mut best: Vec<(f32, i32)> = l.iter().enumerate().map(|(i, &v)| (v, i as i32)).collect();
        best.sort_by(|a, b| b.0.total_cmp(&a.0));
        let mut s = Sampler::new(&params(1.0, 5, 1.0, 0.0, 1.0), 9);
        let mut counts = std::collections::HashMap::new();
        for _ in 0..2000 {
            let t = s.sample(&l);
            assert!(l[t as usize] >= best[4].0, "outside the top 5");
            *counts.entry(t).or_insert(0) += 1;
        }
        assert!(counts.len() > 1, "temperature 1 draws more than one token");
        // min-p 0.995 leaves only the best token(s) (the next is e^-0.01 = 0.990 as likely).
        let mut s = Sampler::new(&params(1.0, 40, 1.0, 0.995, 1.0), 9);
        for _ in 0..100 {
            let t = s.sample(&l);
            assert_eq!(l[t as usize], best[0].0);
        }
    }
}
