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

use super::protocol::RequestId;
use super::slots::SlotTable;
use crate::errors::LlmError;
use crate::hardware::LANE_SEQUENCES;

/// llama.cpp's most sequences in one context (`LLAMA_MAX_SEQ`).
pub(crate) const LLAMA_MAX_SEQ: u32 = 256;

/// Priorities above this are High (the player's requests).
const NORMAL: i32 = 0;

/// Gap fillers a step may always have; beyond this, at most one per
/// sequence in the step (see [`Filler`]).
const MAX_FILLERS_ALWAYS: usize = 8;

/// The widths a lone prompt step is rounded up to (see
/// [`Scheduler::round_lone_prompt`]); a longer step is not rounded.
pub(crate) const ROUND_WIDTHS: [usize; 3] = [16, 32, 64];

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
    /// Slots (llama.cpp sequence ids); the last one is kept for High
    /// priority whenever there are two or more.
    pub slots: usize,
    /// Sliding-window size of the model when its KV keeps only the window
    /// (`swa_full` off); 0 for full attention or a full SWA cache.
    pub swa_window: usize,
    /// Steps a Normal sequence may sit out while a High prompt is read
    /// before it is scheduled regardless (no starvation).
    pub max_sit_out: u32,
    /// Lanes the slots are split across (≥ 1): slot `s` decodes in lane
    /// `s % lanes`, each lane a llama.cpp context of its own, planned,
    /// decoded and applied on its own (see [`Scheduler::plan_lane`]).
    pub lanes: usize,
    /// Fill the gaps of a generation step (a KV stream per sequence, full
    /// attention only): see [`Filler`].
    pub fill_gaps: bool,
    /// Give the sequences of a step that reads Normal prompts even shares,
    /// padded to one width (a KV stream per sequence, full attention
    /// only): see [`Scheduler::even_prompt_step`].
    pub even_prompt_steps: bool,
    /// Round a step that reads one sequence's prompt alone and ends it up
    /// to one of [`ROUND_WIDTHS`] (full attention only): see
    /// [`Scheduler::round_lone_prompt`].
    pub round_prompt_steps: bool,
    /// At most one output (logits request) per sequence in a step:
    /// llama.cpp's backend sampling (device top-k) refuses a batch with
    /// more, so where a sequence's token is sampled in a step, no other of
    /// its tokens asks for throw-away logits.
    pub single_output: bool,
}

/// Where slot `slot` decodes when the slots are split across `lanes`
/// llama.cpp contexts: its lane, and its sequence id in that lane's context.
pub(crate) fn lane_seq(slot: usize, lanes: usize) -> (usize, usize) {
    let lanes = lanes.max(1);
    (slot % lanes, slot / lanes)
}

/// Sequences each lane's context holds when `slots` slots are split across
/// `lanes` contexts as [`lane_seq`] places them: the largest lane's share.
pub(crate) fn lane_size(slots: u32, lanes: u32) -> u32 {
    slots.div_ceil(lanes.max(1))
}

impl Limits {
    /// The lane slot `slot` decodes in.
    pub(crate) fn lane_of(&self, slot: usize) -> usize {
        lane_seq(slot, self.lanes).0
    }

    /// Slots Normal-priority jobs may use.
    pub(crate) fn normal_slots(&self) -> usize {
        if self.slots > 1 {
            self.slots - 1
        } else {
            self.slots
        }
    }
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

/// One token of a planned batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct BatchToken<T> {
    pub token: T,
    pub pos: i32,
    pub seq: i32,
    pub logits: bool,
}

/// A throw-away token for a sequence that has nothing to decode in a
/// generation step, so that the step covers the lane's sequence ids from
/// its lowest to its highest without a gap.
///
/// Why: with a KV stream per sequence, llama.cpp splits a batch into
/// micro-batches of *consecutive* sequence ids with as many tokens each
/// (`split_equal(…, sequential)`). A talking NPC that sits between two idle
/// slots, or a line that just ended, cuts the step in two or more
/// micro-batches of new shapes, each built and launched kernel by kernel
/// on a GPU instead of replaying the recorded CUDA graph of the step; when
/// NPCs start and end lines at different times (a game) that is most
/// steps. With fillers a generation step of a lane is one micro-batch
/// (plus one per prompt chunk's remaining tokens) whose shape stays the
/// same as long as its lowest and highest sequences do: replayed.
///
/// A filler goes at the end of its sequence (`pos` = the tokens its KV
/// holds: a running sequence's record, an idle slot's cache), asks for
/// logits (so the step's shape is a generation step's: one output per
/// token) and is never recorded: the caller removes it from the KV
/// (`seq_rm(slot, pos, -1)`) after the decode, whatever its outcome, and
/// ignores its logits. A step holds fillers only when it generates, no
/// High-priority prompt is read in it (the player's step stays small), the
/// model has no sliding window (a filler would slide it), each filled slot's
/// KV is known and has room, the batch limit has room for all of them, and
/// they are at most [`MAX_FILLERS_ALWAYS`] or as many as the step's
/// sequences. Nothing below the step's lowest sequence is filled: one NPC
/// alone, or a run without gaps, decodes as it is.
///
/// An even prompt step ([`Scheduler::even_prompt_step`]) pads with fillers
/// too: `count` of them after a sequence's own tokens of the step (or in an
/// idle slot), none asking for logits; so does a rounded lone prompt step
/// ([`Scheduler::round_lone_prompt`]), after its one sequence's tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Filler {
    /// The slot (its lane's sequence id: see [`lane_seq`]).
    pub slot: usize,
    /// Its first position: the tokens the slot's KV holds, plus the
    /// sequence's own tokens in the step.
    pub pos: i32,
    /// Throw-away tokens at `pos`, `pos + 1`, …
    pub count: usize,
}

impl Filler {
    /// Its tokens for the batch: `token` at `pos`, `pos + 1`, … in its
    /// slot's sequence, each asking for `logits` or not.
    fn batch_tokens<T: Copy>(self, token: T, logits: bool) -> impl Iterator<Item = BatchToken<T>> {
        (0..self.count as i32).map(move |j| BatchToken {
            token,
            pos: self.pos + j,
            seq: self.slot as i32,
            logits,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Part {
    /// The sequence's sampled token.
    Next,
    /// Prompt tokens `from..to`.
    Prompt { from: usize, to: usize },
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    id: RequestId,
    part: Part,
    /// Index in the batch whose logits are sampled afterwards.
    logits_at: Option<usize>,
}

/// The batch of one step. Hand it back to [`Scheduler::apply`] with the
/// decode's outcome.
#[derive(Debug)]
#[must_use = "a plan must be decoded and applied"]
pub(crate) struct Plan<T> {
    /// The tokens to add to the batch, in order.
    pub tokens: Vec<BatchToken<T>>,
    /// The gap fillers among `tokens` (see [`Filler`]): the caller drops
    /// each from its sequence's KV after the decode.
    pub fillers: Vec<Filler>,
    /// An even prompt step ([`Scheduler::even_prompt_step`]): its fillers
    /// pad, they fill no gap.
    pub even: bool,
    /// A lone prompt step rounded up to a fixed width
    /// ([`Scheduler::round_lone_prompt`]): its one filler pads.
    pub rounded: bool,
    entries: Vec<Entry>,
    /// The lane it was planned for.
    lane: usize,
}

impl<T> Plan<T> {
    /// The lane it was planned for.
    #[cfg(test)]
    pub(crate) fn lane(&self) -> usize {
        self.lane
    }

    /// Sequences in this batch.
    pub(crate) fn sequences(&self) -> usize {
        self.entries.len()
    }

    /// Prompt tokens in this batch.
    pub(crate) fn prompt_tokens(&self) -> usize {
        self.entries
            .iter()
            .map(|e| match e.part {
                Part::Prompt { from, to } => to - from,
                Part::Next => 0,
            })
            .sum()
    }

    /// Whether the request has tokens in this batch.
    #[cfg(test)]
    pub(crate) fn holds(&self, id: RequestId) -> bool {
        self.entries.iter().any(|e| e.id == id)
    }
}

/// What `llama_decode` did with a plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Decoded: logits are ready.
    Decoded,
    /// Return code 1: no KV slot for the batch. Nothing was decoded.
    NoKvSlot,
    /// Any other failure (or the batch could not be built).
    Failed(String),
}

/// A sequence that ended inside [`Scheduler::apply`].
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Dropped {
    pub id: RequestId,
    /// Its slot; the caller clears that sequence's KV (it is unknown).
    pub slot: usize,
    pub error: LlmError,
}

/// The result of applying an outcome.
#[derive(Debug, Default)]
pub(crate) struct Applied {
    /// Sequences to sample now: request and batch index of its logits.
    pub sample: Vec<(RequestId, usize)>,
    /// Sequences failed by this outcome.
    pub failed: Vec<Dropped>,
    /// The plan did not decode and will be retried smaller.
    pub retry: bool,
    /// Idle cached slots dropped to make room: the caller clears their KV.
    pub evicted: Vec<usize>,
}

/// A sequence that left the scheduler.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Released {
    pub slot: usize,
    pub prompt_tokens: usize,
    pub reused: usize,
}

#[derive(Debug)]
struct Running<T> {
    id: RequestId,
    priority: i32,
    slot: usize,
    prompt: Vec<T>,
    /// Tokens of this sequence held in KV: only [`Scheduler::apply`] of a
    /// decoded plan adds to it.
    kv: Vec<T>,
    /// Prompt tokens in KV.
    fed: usize,
    reused: usize,
    /// Sampled, waiting to be decoded.
    pending: Option<T>,
    /// Consecutive steps this sequence had work and was left out.
    sat_out: u32,
    /// Admission order (ties).
    order: u64,
}

impl<T: Copy> Running<T> {
    /// Add this sequence's own tokens to a step: its sampled token (`take`
    /// is then 1), or its next `take` prompt tokens, the last of the prompt
    /// asking for logits.
    fn push_own(&self, take: usize, tokens: &mut Vec<BatchToken<T>>, entries: &mut Vec<Entry>) {
        if let Some(tok) = self.pending {
            entries.push(Entry {
                id: self.id,
                part: Part::Next,
                logits_at: Some(tokens.len()),
            });
            tokens.push(BatchToken {
                token: tok,
                pos: self.kv.len() as i32,
                seq: self.slot as i32,
                logits: true,
            });
            return;
        }
        let (from, to) = (self.fed, self.fed + take);
        let last = to == self.prompt.len();
        tokens.extend(
            self.prompt[from..to]
                .iter()
                .enumerate()
                .map(|(k, &tok)| BatchToken {
                    token: tok,
                    pos: (from + k) as i32,
                    seq: self.slot as i32,
                    logits: last && from + k + 1 == to,
                }),
        );
        entries.push(Entry {
            id: self.id,
            part: Part::Prompt { from, to },
            logits_at: last.then(|| tokens.len() - 1),
        });
    }
}

impl<T> Running<T> {
    fn has_work(&self) -> bool {
        self.pending.is_some() || self.fed < self.prompt.len()
    }

    /// Its whole prompt is decoded and no token was sampled yet: its
    /// first token is being chosen (with lanes, while other lanes take turns).
    fn awaits_first_token(&self) -> bool {
        self.pending.is_none()
            && self.fed == self.prompt.len()
            && self.kv.len() == self.prompt.len()
    }
}

/// The scheduler: running sequences, the slot table, and the current batch
/// limit.
#[derive(Debug)]
pub(crate) struct Scheduler<T> {
    limits: Limits,
    slots: SlotTable<T>,
    seqs: Vec<Running<T>>,
    /// Tokens the next plan may hold: halved after "no KV slot", doubled
    /// back after each decoded step.
    batch_limit: usize,
    admitted: u64,
}

impl<T: Copy + PartialEq + std::fmt::Debug> Scheduler<T> {
    pub(crate) fn new(limits: Limits, prefix_cache: bool) -> Self {
        Self {
            // Fresh slots fill lanes as the plan sizes them: a lane of at
            // most LANE_SEQUENCES busy sequences before one more is opened.
            slots: SlotTable::new(limits.slots, prefix_cache)
                .with_lanes(limits.lanes, LANE_SEQUENCES as usize),
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
            && (priority > NORMAL || self.slots.busy() < self.limits.normal_slots())
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
    fn urgent(&self) -> Option<&Running<T>> {
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
        let in_lane = |s: &Running<T>| limits.lane_of(s.slot) == lane;
        let urgent = self.urgent().map(|s| s.priority);
        let max_sit_out = self.limits.max_sit_out;
        // A sequence left out `max_sit_out` steps in a row goes first.
        let forced = |s: &Running<T>| s.sat_out >= max_sit_out;
        let excused = |s: &Running<T>| forced(s) || urgent.is_none_or(|p| s.priority >= p);
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
        if let Some(plan) = self.even_prompt_step(lane, &order, generating) {
            return plan;
        }
        let mut tokens = Vec::new();
        let mut entries = Vec::new();
        let mut budget = self.batch_limit;
        // Forced sequences first, then the next token of every generating
        // sequence, then prompt chunks.
        // Pass 0: forced sequences; 1: the next token of every generating
        // sequence; 2: prompt chunks.
        let pass_of = |s: &Running<T>| match (forced(s), s.pending.is_some()) {
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

    /// An even prompt step: every sequence of the lane's step (`order`, in
    /// plan order; `generating` of them have a sampled token) gets the same
    /// number of tokens, `width`, so that with a KV stream per sequence
    /// llama.cpp decodes the step as **one** micro-batch.
    ///
    /// Why: llama.cpp splits such a batch into micro-batches of consecutive
    /// sequence ids with as many tokens each (see [`Filler`]). NPCs whose
    /// prompts are read together have prompts of different lengths, so a
    /// step of them — greedy prompt chunks, or generated tokens beside
    /// chunks — falls apart into up to one micro-batch per length, each a
    /// new shape that a GPU launches kernel by kernel (32 NPCs starting
    /// together on two lanes: 35 micro-batches in their prompt phase,
    /// 44–103 ms before their first token on an H100; 4 and 22 ms with
    /// even steps, docs/BENCHMARKS.md session 13). Here a prompt takes
    /// `min(left, width)` tokens, a generating sequence its one token, and
    /// each is padded to `width` with [`Filler`]s (no logits), as is an idle
    /// slot between them. `width` is the longest prompt share (at most
    /// [`Limits::prompt_chunk`] while some sequence generates), cut so that
    /// the step fits the batch limit: a crowd of prompts is read in even
    /// slices, one micro-batch per step.
    ///
    /// `None` (the greedy plan then) unless: [`Limits::even_prompt_steps`],
    /// no sliding window, two or more sequences in the step (one alone is
    /// one micro-batch already), a Normal prompt is read in the step and no High
    /// sequence is in it (the player's steps stay small), every slot of the
    /// step's span has a known KV with room for `width` more tokens, and
    /// the padding is at most the step's own tokens (the step at most
    /// doubles: a prompt beside many generating NPCs stays a chunk of its
    /// own, one extra micro-batch).
    fn even_prompt_step(&self, lane: usize, order: &[usize], generating: usize) -> Option<Plan<T>> {
        let l = &self.limits;
        if !l.even_prompt_steps || l.swa_window > 0 {
            return None;
        }
        let seqs: Vec<&Running<T>> = order.iter().map(|&i| &self.seqs[i]).collect();
        if seqs.iter().any(|s| s.priority > NORMAL) || seqs.iter().all(|s| s.pending.is_some()) {
            return None;
        }
        // One sequence alone is one micro-batch as it is (its greedy step
        // may be rounded instead: see `round_lone_prompt`).
        if seqs.len() == 1 {
            return None;
        }
        let lanes = l.lanes.max(1);
        let id_of = |slot: usize| lane_seq(slot, lanes).1;
        let low = seqs.iter().map(|s| id_of(s.slot)).min()?;
        let top = seqs.iter().map(|s| id_of(s.slot)).max()?;
        let span = top - low + 1;
        let cap = if generating > 0 {
            l.prompt_chunk.max(1)
        } else {
            usize::MAX
        };
        let share = |s: &Running<T>, width: usize| match s.pending {
            Some(_) => 1,
            None => (s.prompt.len() - s.fed).min(cap).min(width),
        };
        let longest = seqs.iter().map(|s| share(s, usize::MAX)).max()?;
        let width = longest.min(self.batch_limit / span);
        if width == 0 {
            return None;
        }
        // What each slot of the span holds: its own tokens are planned at
        // the end of its KV, its fillers after them.
        let held: Vec<usize> = (low..=top)
            .map(|q| self.held_by(q * lanes + lane))
            .collect::<Option<_>>()?;
        if held.iter().any(|&h| h + width > l.cells_per_seq) {
            return None;
        }
        let own: usize = seqs.iter().map(|s| share(s, width)).sum();
        if span * width > 2 * own {
            return None;
        }
        let mut tokens = Vec::with_capacity(span * width);
        let mut entries = Vec::with_capacity(seqs.len());
        let mut count = vec![0usize; span];
        for s in &seqs {
            let take = share(s, width);
            count[id_of(s.slot) - low] = take;
            s.push_own(take, &mut tokens, &mut entries);
        }
        let token = tokens.first()?.token;
        let mut fillers = Vec::new();
        for (q, (&n, h)) in count.iter().zip(&held).enumerate() {
            if n == width {
                continue;
            }
            let filler = Filler {
                slot: (low + q) * lanes + lane,
                pos: (h + n) as i32,
                count: width - n,
            };
            fillers.push(filler);
            tokens.extend(filler.batch_tokens(token, false));
        }
        Some(Plan {
            tokens,
            fillers,
            even: true,
            rounded: false,
            entries,
            lane,
        })
    }

    /// Rounds a step that reads one sequence's prompt alone and ends it up
    /// to the smallest of [`ROUND_WIDTHS`] that holds it: one [`Filler`]
    /// of the missing tokens right after the prompt's own, in the same
    /// sequence, none asking for logits (the prompt's last token keeps the
    /// step's one output; a filler after it is invisible to it under the
    /// causal mask) — appended to `tokens`, and returned.
    ///
    /// Why: the player's next line, or an NPC resuming a cached
    /// conversation, is such a step, and its length is new almost every
    /// time; a GPU launches a new shape kernel by kernel (on an H100 about
    /// 5 ms of host time for SmolLM2-135M: most of a cached turn's time to
    /// first token). Rounded, the same sequence's next short turns have one
    /// shape, whose recorded CUDA graph can be replayed.
    ///
    /// `None` unless: [`Limits::round_prompt_steps`], no sliding window
    /// (a filler would slide it), the step holds exactly one sequence and
    /// it reads the end of its prompt in at most 64 tokens, and the width
    /// fits both the batch limit and the sequence's KV cells.
    fn round_lone_prompt(
        &self,
        tokens: &mut Vec<BatchToken<T>>,
        entries: &[Entry],
    ) -> Option<Filler> {
        let l = &self.limits;
        if !l.round_prompt_steps || l.swa_window > 0 {
            return None;
        }
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
        if to != s.prompt.len() {
            return None;
        }
        let own = to - from;
        let width = ROUND_WIDTHS.into_iter().find(|&w| w >= own)?;
        if width == own || width > self.batch_limit || to + width - own > l.cells_per_seq {
            return None;
        }
        let token = tokens.first()?.token;
        let filler = Filler {
            slot: s.slot,
            pos: to as i32,
            count: width - own,
        };
        tokens.extend(filler.batch_tokens(token, false));
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

    /// The gap fillers of a lane's step (see [`Filler`]), appended to
    /// `tokens`; with fillers, or with a prompt chunk read beside generating
    /// sequences and no gap, the first token of every sequence in the step
    /// asks for logits too: llama.cpp's first micro-batch of the step (one
    /// token of each sequence) then has a generation step's shape, one
    /// output per token, and replays its recorded CUDA graph instead of being
    /// launched kernel by kernel (a prompt chunk's first token without logits
    /// made it a prompt graph). None when the step may not have them.
    fn fill_gaps(
        &self,
        lane: usize,
        tokens: &mut Vec<BatchToken<T>>,
        entries: &[Entry],
        budget: usize,
    ) -> Vec<Filler> {
        let l = &self.limits;
        if !l.fill_gaps || l.swa_window > 0 || !entries.iter().any(|e| e.part == Part::Next) {
            return Vec::new();
        }
        let high_prompt = entries.iter().any(|e| {
            matches!(e.part, Part::Prompt { .. })
                && self
                    .seqs
                    .iter()
                    .any(|s| s.id == e.id && s.priority > NORMAL)
        });
        if high_prompt {
            return Vec::new();
        }
        let lanes = l.lanes.max(1);
        let seq_of = |t: &BatchToken<T>| lane_seq(t.seq as usize, lanes).1;
        let (Some(low), Some(top)) = (
            tokens.iter().map(seq_of).min(),
            tokens.iter().map(seq_of).max(),
        ) else {
            return Vec::new();
        };
        // The step's sequences, by lane sequence id from `low`.
        let mut marked = vec![false; top - low + 1];
        for t in tokens.iter() {
            marked[seq_of(t) - low] = true;
        }
        // Many fillers for few sequences (two NPCs far apart) would cost
        // more compute than the split they save.
        let most = budget.min(entries.len().max(MAX_FILLERS_ALWAYS));
        let mut fillers = Vec::new();
        for q in low + 1..top {
            if marked[q - low] {
                continue;
            }
            if fillers.len() == most {
                return Vec::new();
            }
            let slot = q * lanes + lane;
            let Some(held) = self.held_by(slot) else {
                return Vec::new();
            };
            if held + 1 > l.cells_per_seq {
                return Vec::new();
            }
            fillers.push(Filler {
                slot,
                pos: held as i32,
                count: 1,
            });
        }
        // Without a gap the step is one run of sequences already; its first
        // micro-batch (one token of each) is a generation step's shape unless
        // a prompt chunk's first token in it asks for no logits.
        let reads_prompt = entries
            .iter()
            .any(|e| matches!(e.part, Part::Prompt { .. }));
        if fillers.is_empty() && !reads_prompt {
            return fillers;
        }
        // The first token of each sequence asks for logits, unless the
        // sequence has one sampled in the step and only one output is allowed
        // (that step's first micro-batch then keeps a prompt graph's shape).
        marked.fill(false);
        if l.single_output {
            for t in tokens.iter().filter(|t| t.logits) {
                marked[seq_of(t) - low] = true;
            }
        }
        for t in tokens.iter_mut() {
            let k = seq_of(&*t) - low;
            if !marked[k] {
                marked[k] = true;
                t.logits = true;
            }
        }
        let token = tokens[0].token;
        tokens.extend(fillers.iter().flat_map(|f| f.batch_tokens(token, true)));
        fillers
    }

    /// Apply a plan's decode outcome: the only place KV records grow.
    pub(crate) fn apply(&mut self, plan: Plan<T>, outcome: Outcome) -> Applied {
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
                if limits.lane_of(s.slot) != plan.lane {
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
    ) -> Option<Dropped> {
        let i = self.seqs.iter().position(|s| s.id == id)?;
        let s = self.seqs.swap_remove(i);
        self.slots.invalidate(s.slot);
        Some(Dropped {
            id,
            slot: s.slot,
            error: error(s.kv.len(), self.limits.cells_per_seq),
        })
    }

    /// A token was sampled for `id` and the sequence goes on: it is decoded
    /// in a later step. `false` when the sequence's KV is full (the caller
    /// finishes it with `ContextFull`) or it is not running.
    pub(crate) fn sampled(&mut self, id: RequestId, token: T) -> bool {
        let cells = self.limits.cells_per_seq;
        let Some(s) = self.seqs.iter_mut().find(|s| s.id == id) else {
            return false;
        };
        if s.kv.len() >= cells || s.fed < s.prompt.len() {
            return false;
        }
        s.pending = Some(token);
        true
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
    pub(crate) fn finish(&mut self, id: RequestId) -> Option<Released> {
        let i = self.seqs.iter().position(|s| s.id == id)?;
        let s = self.seqs.swap_remove(i);
        let released = Released {
            slot: s.slot,
            prompt_tokens: s.prompt.len(),
            reused: s.reused,
        };
        self.slots.release(s.slot, s.kv);
        Some(released)
    }

    /// End every running sequence with unknown KV (model going away);
    /// returns their ids and slots.
    pub(crate) fn drop_all(&mut self) -> Vec<(RequestId, usize)> {
        let seqs: Vec<Running<T>> = self.seqs.drain(..).collect();
        seqs.into_iter()
            .map(|s| {
                self.slots.invalidate(s.slot);
                (s.id, s.slot)
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
