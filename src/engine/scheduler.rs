//! The decode-step scheduler: every decision about which tokens of which
//! sequence go into the next `llama_decode`, and what a decode's outcome
//! does to each sequence. Pure: no llama.cpp or Bevy types; generic over
//! the token type so the property tests drive it with a fake decoder.
//!
//! The worker's loop ([`serve`](super::serve)) only
//! 1. asks [`Scheduler::can_admit`] / [`Scheduler::admit`] for queued jobs
//!    (slot choice, prefix reuse, LRU eviction live in here and in
//!    [`SlotTable`]);
//! 2. turns [`Scheduler::plan_lane`] (one lane's sequences; all of them with
//!    one lane) into a `LlamaBatch` (every planned token is
//!    added, or the step fails loudly);
//! 3. reports the decode's [`Outcome`] to [`Scheduler::apply`], which is the
//!    **only** place a sequence's KV record grows: a token is recorded only
//!    when the batch holding it decoded;
//! 4. samples the sequences [`Applied::sample`] names and reports each token
//!    back ([`Scheduler::sampled`]) or ends the sequence
//!    ([`Scheduler::finish`]).
//!
//! Rules, each in one place below: the High-priority sit-out rule
//! ([`Scheduler::plan_lane`], across lanes, until the player's first token;
//! [`Scheduler::urgent_slot`]), its starvation bound ([`Limits::max_sit_out`]), the
//! prompt chunk cap, the batch halving on "no KV slot" and its regrowth,
//! and the sliding-window reuse check ([`reusable_prefix`]).

use super::config::BatchShaping;
use super::layout::{LANE_SEQUENCES, Layout};
use super::protocol::RequestId;
#[cfg(test)]
pub(crate) use super::shaper::ROUND_WIDTHS;
use super::shaper::{self, Shaper, StepKind, StepSeq};
pub(crate) use super::shaper::{BatchToken, Filler};
use super::slots::SlotTable;
use crate::errors::LlmError;

mod records;
pub(crate) use records::{Applied, Dropped, Outcome, Plan, Released};
use records::{Entry, Part, Running};

/// Priorities above this are High (the player's requests).
const NORMAL: i32 = 0;

/// The sizes a step must respect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Limits {
    /// Tokens one decode call may hold (the context's `n_batch`).
    pub batch_tokens: usize,
    /// Most prompt tokens a Normal sequence adds to a step while other
    /// sequences generate.
    pub prompt_chunk: usize,
    /// KV cells each sequence may hold (prompt and answer together).
    pub cells_per_seq: usize,
    /// Where each slot lives (lanes, sequence ids); the last slot is kept
    /// for High priority whenever there are two or more. Each lane is a
    /// llama.cpp context of its own, planned, decoded and applied on its
    /// own (see [`Scheduler::plan_lane`]).
    pub layout: Layout,
    /// Sliding-window size of the model when its KV keeps only the window
    /// (`swa_full` off); 0 for full attention or a full SWA cache.
    pub swa_window: usize,
    /// Steps a Normal sequence may sit out while a High prompt is read
    /// before it is scheduled regardless (no starvation).
    pub max_sit_out: u32,
    /// How the step's batch is shaped (see [`super::shaper`]).
    pub shaping: BatchShaping,
    /// At most one output (logits request) per sequence in a step:
    /// llama.cpp's backend sampling (device top-k) refuses a batch with
    /// more, so where a sequence's token is sampled in a step, no other of
    /// its tokens asks for throw-away logits.
    pub single_output: bool,
}

/// How many leading tokens of a cached prefix of `lcp` tokens may be kept,
/// given the smallest position the sequence's KV still holds
/// (`llama_memory_seq_pos_min`: -1 when empty). A sliding-window cache that
/// dropped early positions can continue at position `n` only while it still
/// holds the window before `n`; otherwise nothing is kept (every shorter
/// prefix needs an even earlier window).
pub(crate) fn reusable_prefix(lcp: usize, first_pos: i32, swa_window: usize) -> usize {
    if first_pos <= 0 {
        return lcp;
    }
    let first = first_pos as usize;
    if swa_window > 0 && first <= lcp.saturating_sub(swa_window) {
        lcp
    } else {
        0
    }
}

/// A job given a slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Admitted {
    /// Slot = llama.cpp sequence id.
    pub slot: usize,
    /// Leading prompt tokens kept from the slot's cache: the caller drops
    /// the slot's KV from this position on.
    pub reuse: usize,
}

/// The scheduler: running sequences, the slot table, and the current batch
/// limit.
#[derive(Debug)]
pub(crate) struct Scheduler<T, P = ()> {
    limits: Limits,
    slots: SlotTable<T>,
    seqs: Vec<Running<T, P>>,
    /// Tokens the next plan may hold: halved after "no KV slot", doubled
    /// back after each decoded step.
    batch_limit: usize,
    admitted: u64,
}

impl<T: Copy + PartialEq + std::fmt::Debug, P> Scheduler<T, P> {
    pub(crate) fn new(limits: Limits, prefix_cache: bool) -> Self {
        Self {
            // Fresh slots fill lanes as the plan sizes them: a lane of at
            // most LANE_SEQUENCES busy sequences before one more is opened.
            slots: SlotTable::new(limits.layout, prefix_cache)
                .with_lane_fill(LANE_SEQUENCES as usize),
            batch_limit: limits.batch_tokens.max(1),
            limits,
            seqs: Vec::new(),
            admitted: 0,
        }
    }

    #[cfg(test)]
    pub(crate) fn limits(&self) -> &Limits {
        &self.limits
    }

    /// The prompt-chunk knob changed at run time.
    pub(crate) fn set_prompt_chunk(&mut self, chunk: usize) {
        self.limits.prompt_chunk = chunk.max(1);
    }

    /// Turn the prefix cache on or off; slots whose cache was dropped are
    /// returned so the caller clears their KV.
    pub(crate) fn set_prefix_cache(&mut self, enabled: bool) -> Vec<usize> {
        let cleared = if enabled {
            Vec::new()
        } else {
            self.slots.clear_idle()
        };
        self.slots.set_cache_enabled(enabled);
        cleared
    }

    /// The idle slot holding `key`'s cached prefix and its tokens (see
    /// [`SlotTable::cached_slot`]: `Err(true)` busy, `Err(false)` none).
    pub(crate) fn cached(&self, key: u64) -> Result<(usize, &[T]), bool> {
        let slot = self.slots.cached_slot(key)?;
        Ok((slot, self.slots.tokens(slot)))
    }

    /// A slot for `key`'s restored `tokens` ([`SlotTable::place`]), or
    /// `None` when every slot is busy or the prefix cache is off.
    pub(crate) fn place_restored(&mut self, key: u64, tokens: Vec<T>) -> Option<usize> {
        if !self.slots.cache_enabled() {
            return None;
        }
        self.slots.place(key, tokens)
    }

    /// The slot's KV is unknown: forget what it held.
    pub(crate) fn forget_slot(&mut self, slot: usize) {
        self.slots.invalidate(slot);
    }

    /// No sequence is running.
    pub(crate) fn is_idle(&self) -> bool {
        self.seqs.is_empty()
    }

    /// Running sequences.
    pub(crate) fn running(&self) -> usize {
        self.seqs.len()
    }

    pub(crate) fn slot_table(&self) -> &SlotTable<T> {
        &self.slots
    }

    /// KV cells held by running sequences.
    pub(crate) fn running_cells(&self) -> usize {
        self.seqs.iter().map(|s| s.kv.len()).sum()
    }

    /// The current batch limit (tokens).
    #[cfg(test)]
    pub(crate) fn batch_limit(&self) -> usize {
        self.batch_limit
    }

    /// Whether a queued job of `priority` may start now. High-priority
    /// jobs may use the slot kept for them.
    pub(crate) fn can_admit(&self, priority: i32) -> bool {
        self.slots.has_free()
            && (priority > NORMAL || self.slots.busy() < self.limits.layout.normal_slots())
    }

    /// Start a job whose prompt is `prompt`. `first_pos(slot)` is the
    /// smallest position the slot's KV holds (-1 when empty).
    ///
    /// # Errors
    /// [`LlmError::EmptyPrompt`], [`LlmError::PromptTooLong`] when the prompt
    /// leaves no room to answer, [`LlmError::Decode`] when no slot is free
    /// (the caller asks [`Self::can_admit`] first).
    pub(crate) fn admit(
        &mut self,
        id: RequestId,
        priority: i32,
        key: Option<u64>,
        prompt: Vec<T>,
        first_pos: impl Fn(usize) -> i32,
        data: P,
    ) -> Result<Admitted, LlmError> {
        if prompt.is_empty() {
            return Err(LlmError::EmptyPrompt);
        }
        if prompt.len() >= self.limits.cells_per_seq {
            return Err(LlmError::PromptTooLong {
                tokens: prompt.len(),
                limit: self.limits.cells_per_seq.saturating_sub(1),
            });
        }
        if !self.can_admit(priority) {
            return Err(LlmError::Decode("no free sequence slot".into()));
        }
        let window = self.limits.swa_window;
        let acq = self
            .slots
            .acquire(key, &prompt, |slot, lcp| {
                reusable_prefix(lcp, first_pos(slot), window)
            })
            .ok_or_else(|| LlmError::Decode("no free sequence slot".into()))?;
        self.admitted += 1;
        self.seqs.push(Running {
            id,
            priority,
            slot: acq.slot,
            kv: prompt[..acq.reuse].to_vec(),
            fed: acq.reuse,
            reused: acq.reuse,
            prompt,
            pending: None,
            sat_out: 0,
            order: self.admitted,
            data,
        });
        Ok(Admitted {
            slot: acq.slot,
            reuse: acq.reuse,
        })
    }

    /// The slot of the High sequence whose prompt is being read or whose
    /// first token is being chosen (highest priority, then the earliest
    /// admitted), if any: with lanes, the worker gives that slot's lane its
    /// turns first (within a bound) so the player's first token is not
    /// behind other lanes' turns.
    pub(crate) fn urgent_slot(&self) -> Option<usize> {
        self.urgent().map(|s| s.slot)
    }

    /// The High sequence the others sit out for: its prompt is being read,
    /// or read and its first token not chosen yet (its step may still be
    /// computing in another lane's turn). Highest priority, then earliest.
    fn urgent(&self) -> Option<&Running<T, P>> {
        self.seqs
            .iter()
            .filter(|s| s.priority > NORMAL && (s.fed < s.prompt.len() || s.awaits_first_token()))
            .max_by_key(|s| (s.priority, std::cmp::Reverse(s.order)))
    }

    /// The next step's batch; empty only when no sequence runs.
    ///
    /// While a High-priority prompt is being read, lower-priority sequences
    /// sit out so it decodes alone — except one that has sat out
    /// [`Limits::max_sit_out`] steps in a row. Generated tokens go first
    /// (higher priority first), then prompt chunks (higher priority, then
    /// longest waiting); Normal prompts take at most
    /// [`Limits::prompt_chunk`] tokens while others generate.
    #[cfg(test)]
    pub(crate) fn plan(&mut self) -> Plan<T> {
        self.plan_lane(0)
    }

    /// [`Self::plan`] for the sequences of one lane only (their slots'
    /// llama.cpp context; with one lane, every sequence). The sit-out rule
    /// holds across lanes: while a High prompt is read in any lane, and
    /// until its first token is chosen, Normal sequences of every lane sit
    /// out (the lanes share the device: the player's step computes alone),
    /// each for at most [`Limits::max_sit_out`] of its lane's turns — an
    /// empty plan is applied too, and counts as a turn sat out.
    pub(crate) fn plan_lane(&mut self, lane: usize) -> Plan<T> {
        let limits = self.limits;
        let in_lane = |s: &Running<T, P>| limits.layout.lane_of(s.slot) == lane;
        let urgent = self.urgent().map(|s| s.priority);
        let max_sit_out = self.limits.max_sit_out;
        // A sequence left out `max_sit_out` steps in a row goes first.
        let forced = |s: &Running<T, P>| s.sat_out >= max_sit_out;
        let excused = |s: &Running<T, P>| forced(s) || urgent.is_none_or(|p| s.priority >= p);
        let mut order: Vec<usize> = (0..self.seqs.len())
            .filter(|&i| {
                let s = &self.seqs[i];
                in_lane(s) && s.has_work() && excused(s)
            })
            .collect();
        order.sort_by_key(|&i| {
            let s = &self.seqs[i];
            // Forced ones longest-waiting first (whatever their priority),
            // then priority, then longest-waiting, then arrival.
            let waited = if forced(s) { s.sat_out } else { 0 };
            (
                !forced(s),
                std::cmp::Reverse(waited),
                std::cmp::Reverse(s.priority),
                std::cmp::Reverse(s.sat_out),
                s.order,
            )
        });
        let generating = order
            .iter()
            .filter(|&&i| self.seqs[i].pending.is_some())
            .count();
        if let Some(plan) = self.even_prompt_step(lane, &order) {
            return plan;
        }
        let mut tokens = Vec::new();
        let mut entries = Vec::new();
        let mut budget = self.batch_limit;
        // Forced sequences first, then the next token of every generating
        // sequence, then prompt chunks.
        // Pass 0: forced sequences; 1: the next token of every generating
        // sequence; 2: prompt chunks.
        let pass_of = |s: &Running<T, P>| match (forced(s), s.pending.is_some()) {
            (true, _) => 0,
            (false, true) => 1,
            (false, false) => 2,
        };
        for pass in 0..3 {
            for &i in &order {
                let s = &self.seqs[i];
                if budget == 0 || pass_of(s) != pass {
                    continue;
                }
                if s.pending.is_some() {
                    s.push_own(1, &mut tokens, &mut entries);
                    budget -= 1;
                    continue;
                }
                let cap = if s.priority > NORMAL || generating == 0 {
                    usize::MAX
                } else {
                    self.limits.prompt_chunk.max(1)
                };
                let take = (s.prompt.len() - s.fed).min(budget).min(cap);
                s.push_own(take, &mut tokens, &mut entries);
                budget -= take;
            }
        }
        let mut fillers = self.fill_gaps(lane, &mut tokens, &entries, budget);
        let mut rounded = false;
        if fillers.is_empty()
            && let Some(filler) = self.round_lone_prompt(&mut tokens, &entries)
        {
            fillers.push(filler);
            rounded = true;
        }
        Plan {
            tokens,
            fillers,
            even: false,
            rounded,
            entries,
            lane,
        }
    }

    /// The shaper of a step now: the limits, the batch limit, and what
    /// each slot's KV holds.
    fn shaper(&self) -> Shaper<impl Fn(usize) -> Option<usize> + '_> {
        let l = &self.limits;
        Shaper {
            layout: l.layout,
            shaping: l.shaping,
            sliding_window: l.swa_window > 0,
            cells_per_seq: l.cells_per_seq,
            prompt_chunk: l.prompt_chunk,
            single_output: l.single_output,
            batch_limit: self.batch_limit,
            held: |slot| self.held_by(slot),
        }
    }

    /// The lane's step in even prompt slices ([`Shaper::even_step`]), if
    /// the shaper makes one of the sequences `order` (in plan order).
    fn even_prompt_step(&self, lane: usize, order: &[usize]) -> Option<Plan<T>> {
        let shaper = self.shaper();
        if !shaper.evens_prompts() {
            return None;
        }
        let seqs: Vec<&Running<T, P>> = order.iter().map(|&i| &self.seqs[i]).collect();
        let view: Vec<StepSeq> = seqs
            .iter()
            .map(|s| StepSeq {
                slot: s.slot,
                high: s.priority > NORMAL,
                generating: s.pending.is_some(),
                prompt_left: s.prompt.len() - s.fed,
            })
            .collect();
        let even = shaper.even_step(lane, &view)?;
        let width = even.takes.iter().copied().max().unwrap_or(0);
        let mut tokens = Vec::with_capacity(width * (even.takes.len() + even.fillers.len()));
        let mut entries = Vec::with_capacity(seqs.len());
        for (s, &take) in seqs.iter().zip(&even.takes) {
            s.push_own(take, &mut tokens, &mut entries);
        }
        let token = tokens.first()?.token;
        shaper::append(&mut tokens, &even.fillers, token, false);
        Some(Plan {
            tokens,
            fillers: even.fillers,
            even: true,
            rounded: false,
            entries,
            lane,
        })
    }

    /// A step that reads one sequence's prompt alone and ends it, rounded
    /// up ([`Shaper::round_lone_prompt`]): its filler, its tokens appended
    /// to `tokens`.
    fn round_lone_prompt(
        &self,
        tokens: &mut Vec<BatchToken<T>>,
        entries: &[Entry],
    ) -> Option<Filler> {
        let [
            Entry {
                id,
                part: Part::Prompt { from, to },
                ..
            },
        ] = *entries
        else {
            return None;
        };
        let s = self.seqs.iter().find(|s| s.id == id)?;
        let filler = self
            .shaper()
            .round_lone_prompt(s.slot, from, to, to == s.prompt.len())?;
        let token = tokens.first()?.token;
        shaper::append(tokens, &[filler], token, false);
        Some(filler)
    }

    /// The tokens slot `slot`'s KV holds: a running sequence's record, an
    /// idle slot's cache record while the cache is on; `None` when unknown
    /// (cache off: a released slot keeps KV it forgot).
    fn held_by(&self, slot: usize) -> Option<usize> {
        match self.seqs.iter().find(|s| s.slot == slot) {
            Some(s) => Some(s.kv.len()),
            None if self.slots.cache_enabled() => Some(self.slots.tokens(slot).len()),
            None => None,
        }
    }

    /// The gap fillers of a lane's step ([`Shaper::fill_gaps`]), appended
    /// to `tokens`.
    fn fill_gaps(
        &self,
        lane: usize,
        tokens: &mut Vec<BatchToken<T>>,
        entries: &[Entry],
        budget: usize,
    ) -> Vec<Filler> {
        let shaper = self.shaper();
        if !shaper.fills_gaps() {
            return Vec::new();
        }
        let kind = StepKind {
            generates: entries.iter().any(|e| e.part == Part::Next),
            reads_prompt: entries
                .iter()
                .any(|e| matches!(e.part, Part::Prompt { .. })),
            high_prompt: entries.iter().any(|e| {
                matches!(e.part, Part::Prompt { .. })
                    && self
                        .seqs
                        .iter()
                        .any(|s| s.id == e.id && s.priority > NORMAL)
            }),
            sequences: entries.len(),
        };
        shaper.fill_gaps(lane, tokens, kind, budget)
    }

    /// Apply a plan's decode outcome: the only place KV records grow.
    pub(crate) fn apply(&mut self, plan: Plan<T>, outcome: Outcome) -> Applied<P> {
        let mut applied = Applied::default();
        match outcome {
            Outcome::Decoded => {
                for e in &plan.entries {
                    let Some(s) = self.seqs.iter_mut().find(|s| s.id == e.id) else {
                        continue;
                    };
                    match e.part {
                        Part::Next => {
                            if let Some(tok) = s.pending.take() {
                                s.kv.push(tok);
                            }
                        }
                        Part::Prompt { from, to } => {
                            s.kv.extend_from_slice(&s.prompt[from..to]);
                            s.fed = to;
                        }
                    }
                    if let Some(at) = e.logits_at {
                        applied.sample.push((e.id, at));
                    }
                }
                self.batch_limit = (self.batch_limit * 2).min(self.limits.batch_tokens.max(1));
            }
            Outcome::NoKvSlot if plan.tokens.len() > 1 => {
                self.batch_limit = (plan.tokens.len() / 2).max(1);
                applied.retry = true;
            }
            Outcome::NoKvSlot if !self.slots.idle_cached_slots().is_empty() => {
                // One token does not fit: make room by dropping the least
                // recently used idle cache, then retry.
                if let Some(slot) = self.slots.evict_lru_idle() {
                    applied.evicted.push(slot);
                }
                applied.retry = true;
            }
            Outcome::NoKvSlot => {
                // One token of one sequence does not fit even alone: it fails.
                for e in &plan.entries {
                    if let Some(d) = self.drop_failed(e.id, |s, cells| LlmError::KvCacheFull {
                        needed: s + 1,
                        capacity: cells,
                    }) {
                        applied.failed.push(d);
                    }
                }
            }
            Outcome::Failed(message) => {
                for e in &plan.entries {
                    if let Some(d) =
                        self.drop_failed(e.id, |_, _| LlmError::Decode(message.clone()))
                    {
                        applied.failed.push(d);
                    }
                }
            }
        }
        if !applied.retry && applied.failed.is_empty() {
            // Sit-outs count only on steps that decoded, and only in the
            // plan's lane (the other lanes decode their own batches).
            let limits = self.limits;
            for s in &mut self.seqs {
                if limits.layout.lane_of(s.slot) != plan.lane {
                    continue;
                }
                if plan.entries.iter().any(|e| e.id == s.id) {
                    s.sat_out = 0;
                } else if s.has_work() {
                    s.sat_out = s.sat_out.saturating_add(1);
                }
            }
        }
        applied
    }

    fn drop_failed(
        &mut self,
        id: RequestId,
        error: impl Fn(usize, usize) -> LlmError,
    ) -> Option<Dropped<P>> {
        let i = self.seqs.iter().position(|s| s.id == id)?;
        let s = self.seqs.swap_remove(i);
        self.slots.invalidate(s.slot);
        Some(Dropped {
            id,
            slot: s.slot,
            error: error(s.kv.len(), self.limits.cells_per_seq),
            data: s.data,
        })
    }

    /// A token was sampled for `id` and the sequence goes on: it is decoded
    /// in a later step. `false` when the sequence's KV is full (the caller
    /// finishes it with `ContextFull`) or it is not running.
    #[cfg(test)]
    pub(crate) fn sampled(&mut self, id: RequestId, token: T) -> bool {
        self.position(id).is_some_and(|i| self.sampled_at(i, token))
    }

    /// [`Self::sampled`] for the sequence at `i` ([`Self::position`]).
    pub(crate) fn sampled_at(&mut self, i: usize, token: T) -> bool {
        let cells = self.limits.cells_per_seq;
        let s = &mut self.seqs[i];
        if s.kv.len() >= cells || s.fed < s.prompt.len() {
            return false;
        }
        s.pending = Some(token);
        true
    }

    /// Where the running sequence `id` is among the running ones (valid
    /// until one of them ends).
    pub(crate) fn position(&self, id: RequestId) -> Option<usize> {
        self.seqs.iter().position(|s| s.id == id)
    }

    /// The caller's record of the sequence at `i` ([`Self::position`]).
    pub(crate) fn data_at(&mut self, i: usize) -> &mut P {
        &mut self.seqs[i].data
    }

    /// Every running sequence's slot and the caller's record of it.
    pub(crate) fn records_mut(&mut self) -> impl Iterator<Item = (usize, &mut P)> {
        self.seqs.iter_mut().map(|s| (s.slot, &mut s.data))
    }

    /// The slot's KV could not be cut back to the kept prefix (the caller
    /// cleared it): the job reads its whole prompt.
    pub(crate) fn restart_prompt(&mut self, id: RequestId) {
        if let Some(s) = self.seqs.iter_mut().find(|s| s.id == id) {
            s.kv.clear();
            s.fed = 0;
            s.reused = 0;
        }
    }

    /// End a running sequence (completed or cancelled): its decoded KV stays
    /// as the slot's cache. `None` when it is not running.
    pub(crate) fn finish(&mut self, id: RequestId) -> Option<Released<P>> {
        let i = self.position(id)?;
        let s = self.seqs.swap_remove(i);
        self.slots.release(s.slot, s.kv);
        Some(Released {
            slot: s.slot,
            prompt_tokens: s.prompt.len(),
            reused: s.reused,
            data: s.data,
        })
    }

    /// End every running sequence with unknown KV (model going away);
    /// returns their ids, slots and records.
    pub(crate) fn drop_all(&mut self) -> Vec<(RequestId, usize, P)> {
        let seqs: Vec<Running<T, P>> = self.seqs.drain(..).collect();
        seqs.into_iter()
            .map(|s| {
                self.slots.invalidate(s.slot);
                (s.id, s.slot, s.data)
            })
            .collect()
    }

    /// Tokens a running sequence holds in KV (for tests and counters).
    #[cfg(test)]
    pub(crate) fn kv_of(&self, id: RequestId) -> Option<&[T]> {
        self.seqs
            .iter()
            .find(|s| s.id == id)
            .map(|s| s.kv.as_slice())
    }

    /// (id, slot, priority, has work) of every running sequence.
    #[cfg(test)]
    pub(crate) fn snapshot(&self) -> Vec<(RequestId, usize, i32, bool)> {
        self.seqs
            .iter()
            .map(|s| (s.id, s.slot, s.priority, s.has_work()))
            .collect()
    }
}

#[cfg(test)]
mod tests;
