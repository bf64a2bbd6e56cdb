//! Continuous batching, the llama.cpp side: the [`Scheduler`] decides each
//! step (which tokens of which sequence, admission, prefix reuse, retries);
//! this module only turns its plan into a `LlamaBatch`, decodes, reports the
//! outcome back and samples the sequences it names. One llama.cpp sequence
//! id per slot; requests join and leave between steps.

use std::time::{Duration, Instant};

use crossbeam_channel::Sender;
use llama_cpp_2::DecodeError;
use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::token::LlamaToken;

mod kv;

use super::constraint_jobs::Compiled;
use super::delivery::{self, Active};
use super::device_sampling::{DEVICE_TOP_K, DeviceSampling, StepRows};
use super::layout::Layout;
use super::model_meta::sliding_window;
use super::prompt::PromptRenderer;
use super::protocol::{EngineCounters, Event, Job, Knobs, LoadSpec, RequestId};
use super::sampler::Sampler;
use super::scheduler::{Limits, Outcome, Plan, Scheduler};
use super::token_choice::{self, Row};
use crate::errors::LlmError;
use crate::request::FinishReason;
use crate::settings::SamplingOverrides;

/// Steps a Normal sequence may sit out while the player's prompt is read.
const MAX_SIT_OUT: u32 = 4;

/// One llama.cpp context and the slots that decode in it (slot `s` is lane
/// `s % lanes`, sequence `s / lanes` there). With two or more lanes, one
/// lane's token choice and next graph build run while the device computes
/// another's step.
struct Lane<'m> {
    ctx: LlamaContext<'m>,
    batch: LlamaBatch<'static>,
    /// Per plan token of the step in flight: its output ordinal, or -1.
    out_rows: Vec<i32>,
    /// Per plan token of the step in flight: its position in the batch.
    batch_pos: Vec<i32>,
    /// Plan token indices in batch order (reused).
    batch_order: Vec<usize>,
    /// This step's (batch position, output ordinal) with a device top-k (reused).
    device_rows: Vec<(i32, usize)>,
    /// Device top-k per sequence of this context (opt-in:
    /// `LlmSettings::gpu.device_sampling`). Declared after `ctx`: the
    /// chains are freed after the context that borrows them.
    device: Option<DeviceSampling>,
    /// The step decoded (or being computed) whose tokens are not chosen
    /// yet: the sequences to sample and their plan token index.
    in_flight: Option<Vec<(RequestId, usize)>>,
}

impl<'m> Lane<'m> {
    /// A lane over `ctx` for `in_lane` sequences and batches of
    /// `batch_size` tokens, with a device top-k chain per sequence when
    /// `device_sampling`.
    fn new(
        ctx: LlamaContext<'m>,
        batch_size: usize,
        in_lane: usize,
        device_sampling: bool,
    ) -> Self {
        Self {
            ctx,
            batch: LlamaBatch::new(batch_size, 1),
            out_rows: Vec::with_capacity(batch_size),
            batch_pos: Vec::with_capacity(batch_size),
            batch_order: Vec::with_capacity(batch_size),
            device_rows: Vec::with_capacity(in_lane),
            device: device_sampling.then(|| DeviceSampling::new(in_lane, DEVICE_TOP_K)),
            in_flight: None,
        }
    }
}

/// Host threads choosing tokens in parallel (more than one: GPU plans; on
/// the CPU the cores are busy decoding).
fn sampling_pool(threads: u32) -> Option<rayon::ThreadPool> {
    (threads > 1)
        .then(|| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(threads as usize)
                .thread_name(|i| format!("npc-llm-sample-{i}"))
                .build()
                .ok()
        })
        .flatten()
}

pub(crate) struct Server<'m> {
    model: &'m LlamaModel,
    /// Where each slot lives.
    layout: Layout,
    lanes: Vec<Lane<'m>>,
    /// The lane [`Self::step`] advances next.
    next_lane: usize,
    /// Turns in a row given to the player's lane ahead of the others.
    urgent_turns: u32,
    renderer: PromptRenderer,
    model_sampling: SamplingOverrides,
    /// Every running sequence: its scheduling state and its record
    /// ([`Active`]), one entry each.
    sched: Scheduler<LlamaToken, Active>,
    per_seq: usize,
    knobs: Knobs,
    events: Sender<Event>,
    counters: EngineCounters,
    last_counters: Instant,
    /// Threads choosing tokens in parallel (the plan's `sampling_threads` > 1:
    /// GPU plans; on the CPU the cores are busy decoding).
    pool: Option<rayon::ThreadPool>,
    /// The slow-path warning was logged.
    warned_stride: bool,
    /// What KV snapshots of this engine are taken from.
    kv_identity: crate::engine::kv_snapshot::KvIdentity,
}

fn fresh_seed() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish() as u32
}

impl<'m> Server<'m> {
    /// A server over `contexts`, one per lane of the spec's layout, each
    /// made by `context_params` for its share of the slots.
    pub(crate) fn new(
        model: &'m LlamaModel,
        contexts: Vec<LlamaContext<'m>>,
        spec: &LoadSpec,
        knobs: Knobs,
        events: Sender<Event>,
    ) -> Result<Self, String> {
        if contexts.is_empty() {
            return Err("internal: no llama.cpp context".into());
        }
        let renderer = PromptRenderer::new(model, &spec.prompt_format)?;
        let engine = &spec.engine;
        let layout = engine.layout();
        if contexts.len() != layout.lanes() {
            return Err(format!(
                "internal: {} contexts for {} lanes",
                contexts.len(),
                layout.lanes()
            ));
        }
        let in_lane = layout.per_lane() as usize;
        // llama.cpp may round the context; trust what it made.
        let per_seq = contexts
            .iter()
            .map(|c| c.n_ctx() as usize / in_lane)
            .min()
            .unwrap_or(0)
            .min(engine.context_per_sequence as usize);
        let batch_size = contexts
            .iter()
            .map(|c| c.n_batch() as usize)
            .min()
            .unwrap_or(1);
        let limits = Limits {
            batch_tokens: batch_size,
            prompt_chunk: knobs.prompt_chunk as usize,
            cells_per_seq: per_seq,
            layout,
            // The model's window even with a full SWA cache: such a cache
            // holds every position it decoded (its smallest is 0, and every
            // common prefix is kept), but a restored KV snapshot holds only
            // the last window of its sliding-window layers (llama.cpp saves
            // no cell its attention can no longer see).
            swa_window: sliding_window(model),
            max_sit_out: MAX_SIT_OUT,
            shaping: engine.shaping,
            single_output: engine.device_sampling,
        };
        let counters = EngineCounters {
            slots: layout.slots(),
            kv_cells_total: per_seq * layout.slots(),
            ..Default::default()
        };
        let lanes = contexts
            .into_iter()
            .map(|ctx| Lane::new(ctx, batch_size, in_lane, engine.device_sampling))
            .collect();
        Ok(Self {
            model,
            layout,
            lanes,
            next_lane: 0,
            urgent_turns: 0,
            renderer,
            model_sampling: spec.model_sampling.clone(),
            sched: Scheduler::new(limits, knobs.prefix_cache),
            per_seq,
            knobs,
            events,
            counters,
            last_counters: Instant::now(),
            pool: sampling_pool(engine.sampling_threads),
            warned_stride: false,
            kv_identity: kv::identity(model, spec),
        })
    }

    /// A slot's lane and its sequence id in that lane's context.
    fn locate(&self, slot: usize) -> (usize, usize) {
        self.layout.locate(slot)
    }

    /// Drop a slot's KV from position `from` on (all of it: `None`); the
    /// lane's device work is waited for first. `false` when llama.cpp
    /// could not cut it there.
    fn clear_slot(&mut self, slot: usize, from: Option<u32>) -> bool {
        let (lane, seq) = self.locate(slot);
        let ctx = &mut self.lanes[lane].ctx;
        ctx.synchronize();
        matches!(
            ctx.clear_kv_cache_seq(Some(seq as u32), from, None),
            Ok(true)
        )
    }

    fn send(&self, e: Event) {
        let _ = self.events.send(e);
    }

    /// Nothing runs and no decoded step waits for its tokens.
    pub(crate) fn is_idle(&self) -> bool {
        self.sched.is_idle() && self.lanes.iter().all(|l| l.in_flight.is_none())
    }

    /// Whether a job of `priority` may start now (the scheduler decides).
    pub(crate) fn has_free_slot_for(&self, priority: i32) -> bool {
        self.sched.can_admit(priority)
    }

    pub(crate) fn configure(&mut self, knobs: Knobs) {
        for slot in self.sched.set_prefix_cache(knobs.prefix_cache) {
            self.clear_slot(slot, None);
        }
        self.sched.set_prompt_chunk(knobs.prompt_chunk as usize);
        self.knobs = knobs;
    }

    fn fail(&mut self, id: RequestId, error: LlmError) {
        self.counters.failed += 1;
        self.send(Event::Failed { id, error });
    }

    /// Start a job on a free slot (the caller asked [`Self::has_free_slot_for`])
    /// with its constraint compiled, if it has one.
    pub(crate) fn admit(&mut self, job: Job, compiled: Option<Compiled>) {
        let t0 = Instant::now();
        self.admit_inner(job, compiled);
        self.counters.admit_time += t0.elapsed();
    }

    /// A job's record and prompt tokens, or the typed error it fails
    /// with: its sampling (settings, model, request), its compiled
    /// constraint, its prompt within the context (trimmed if asked), its stop
    /// strings and seeded sampler; and whether its slot may take a device
    /// top-k (the draw over its candidates is exact and no constraint needs
    /// the whole row).
    fn prepare(
        &mut self,
        job: Job,
        compiled: Option<Compiled>,
    ) -> Result<(Active, Vec<LlamaToken>, bool), (RequestId, LlmError)> {
        let id = job.id;
        let sampling = job
            .base_sampling
            .with_overrides(&self.model_sampling)
            .with_overrides(&job.overrides);
        if let Err(e) = sampling.validate() {
            return Err((id, LlmError::InvalidRequest(e.to_string())));
        }
        // Constraints are compiled off this thread (`ConstraintJobs`).
        let matcher = match (compiled, &job.constraint) {
            (Some(Ok(m)), Some(_)) => Some(m),
            (Some(Err(e)), _) => return Err((id, LlmError::InvalidConstraint(e))),
            (None, None) | (Some(Ok(_)), None) => None,
            (None, Some(c)) => {
                let e = format!("internal: the {} was not compiled", c.kind());
                return Err((id, LlmError::InvalidConstraint(e)));
            }
        };
        let max_tokens = (sampling.max_tokens as usize).min(self.per_seq.saturating_sub(1).max(1));
        let limit = self
            .per_seq
            .saturating_sub(max_tokens.min(self.per_seq / 2))
            .max(1);
        let prompt = self
            .renderer
            .tokenize(self.model, &job.prompt, limit, job.trim_prompt)
            .map_err(|e| (id, e))?;
        let mut stops = sampling.stop.clone();
        for s in self.renderer.implied_stops(&job.prompt) {
            if !stops.contains(&s) {
                stops.push(s);
            }
        }
        let sampler = Sampler::new(&sampling, sampling.seed.unwrap_or_else(fresh_seed));
        let device_top_k = matcher.is_none() && sampler.fits_top_k(DEVICE_TOP_K);
        let active = Active::new(
            job,
            sampler,
            matcher,
            stops,
            max_tokens,
            sampling.ignore_eos,
        );
        Ok((active, prompt, device_top_k))
    }

    fn admit_inner(&mut self, job: Job, compiled: Option<Compiled>) {
        let (active, prompt, device_top_k) = match self.prepare(job, compiled) {
            Ok(prepared) => prepared,
            Err((id, e)) => {
                self.fail(id, e);
                return;
            }
        };
        let (id, priority, key) = (active.job.id, active.job.priority, active.job.cache_key);
        let prompt_len = prompt.len();
        let (lanes, layout) = (&self.lanes, self.layout);
        let admitted = self.sched.admit(
            id,
            priority,
            key,
            prompt,
            |slot| {
                let (lane, seq) = layout.locate(slot);
                lanes[lane].ctx.kv_cache_seq_pos_min(seq as i32)
            },
            active,
        );
        let admitted = match admitted {
            Ok(a) => a,
            Err(e) => {
                self.fail(id, e);
                return;
            }
        };
        // Drop the slot's KV past the kept prefix.
        let mut reuse = admitted.reuse;
        if !self.clear_slot(admitted.slot, Some(reuse as u32)) {
            self.clear_slot(admitted.slot, None);
            self.sched.restart_prompt(id);
            reuse = 0;
        }
        // The slot's device top-k chain follows the request.
        let (lane, seq) = self.locate(admitted.slot);
        let Lane { ctx, device, .. } = &mut self.lanes[lane];
        if let Some(device) = device.as_mut() {
            device.set(ctx, seq, device_top_k);
        }
        self.counters.device_sampler_switches = self
            .lanes
            .iter()
            .filter_map(|l| l.device.as_ref())
            .map(|d| d.switches)
            .sum();
        self.counters.reused_prefix_tokens += reuse as u64;
        self.counters.admitted += 1;
        self.send(Event::Started {
            id,
            prompt_tokens: prompt_len,
            reused: reuse,
        });
    }

    /// Cancel a running job; `false` when it is not running here.
    pub(crate) fn cancel(&mut self, id: RequestId) -> bool {
        // The KV of what was decoded stays valid: kept as the key's cache.
        if self.sched.finish(id).is_none() {
            return false;
        }
        self.counters.cancelled += 1;
        self.send(Event::Cancelled { id });
        true
    }

    /// Fail every running sequence (model going away).
    pub(crate) fn fail_all(&mut self, error: &LlmError) {
        for lane in &mut self.lanes {
            lane.ctx.synchronize();
            lane.in_flight = None;
        }
        for (id, slot, _) in self.sched.drop_all() {
            self.clear_slot(slot, None);
            self.fail(id, error.clone());
        }
    }

    /// Advance one lane: choose the tokens of its decoded step (waiting for
    /// the device), then turn the scheduler's plan for it into a batch and
    /// start decoding it. With one lane that is one decode step per call,
    /// its tokens chosen at the start of the next call; with several, the
    /// lanes take turns, so the device computes one lane's step while the
    /// host chooses another's tokens and builds its next graph.
    pub(crate) fn step(&mut self) {
        if self.is_idle() {
            return;
        }
        let n = self.lanes.len();
        // The player's lane first while its prompt is read and its first
        // token chosen (the other lanes sit out then anyway), for at most
        // MAX_SIT_OUT turns in a row; otherwise the lanes take turns.
        let lane = match self.sched.urgent_slot() {
            Some(slot) if n > 1 && self.urgent_turns < MAX_SIT_OUT => {
                self.urgent_turns += 1;
                self.layout.lane_of(slot)
            }
            _ => {
                self.urgent_turns = 0;
                let lane = self.next_lane % n;
                self.next_lane = (lane + 1) % n;
                lane
            }
        };
        if let Some(sample) = self.lanes[lane].in_flight.take() {
            self.finish_step(lane, sample);
        }
        self.launch(lane);
    }

    /// Build and decode the lane's next batch, and apply the outcome; the
    /// tokens are chosen by [`Self::finish_step`] on the lane's next turn.
    fn launch(&mut self, lane: usize) {
        if self.sched.is_idle() {
            return;
        }
        let mut plan = self.sched.plan_lane(lane);
        if plan.tokens.is_empty() {
            // Nothing to decode in this lane now (its sequences sit out
            // while the player's prompt is read in another): the turn counts.
            let _ = self.sched.apply(plan, Outcome::Decoded);
            return;
        }
        let t_batch = Instant::now();
        let outcome = match self.build_batch(lane, &plan) {
            Err(message) => {
                bevy::log::error!("bevy_npc_llm: {message}");
                Outcome::Failed(message)
            }
            Ok(()) => {
                let t0 = Instant::now();
                self.counters.batch_time += t0 - t_batch;
                let outcome = self.decode(lane, &plan);
                self.counters.decode_time += t0.elapsed();
                self.counters.decode_calls += 1;
                outcome
            }
        };
        let decoded = outcome == Outcome::Decoded;
        self.remove_fillers(lane, &mut plan, decoded);
        let (n_tokens, sequences, prompt_tokens) =
            (plan.tokens.len(), plan.sequences(), plan.prompt_tokens());
        let applied = self.sched.apply(plan, outcome);
        for slot in applied.evicted {
            self.clear_slot(slot, None);
        }
        for d in applied.failed {
            self.clear_slot(d.slot, None);
            self.fail(d.id, d.error);
        }
        if !decoded {
            return;
        }
        let c = &mut self.counters;
        if sequences > 1 {
            c.multi_sequence_batches += 1;
        }
        c.max_batch_sequences = c.max_batch_sequences.max(sequences);
        c.max_batch_tokens = c.max_batch_tokens.max(n_tokens);
        c.prompt_tokens_decoded += prompt_tokens as u64;
        let l = &mut self.lanes[lane];
        if let Some(device) = l.device.as_mut() {
            device.decoded();
        }
        l.in_flight = Some(applied.sample);
    }

    /// Fill the lane's `LlamaBatch` with the plan's tokens, sorted by
    /// sequence (a stable order within each): with one KV stream per
    /// sequence, llama.cpp splits a batch into micro-batches of consecutive
    /// sequence ids in the order it meets them, and reorders outputs that
    /// come back out of batch order (a copy of whole logits rows). Sorted, a
    /// step of N generating sequences is one micro-batch and needs no
    /// reordering. Records each plan token's batch position and output
    /// ordinal for token choice.
    fn build_batch(&mut self, lane: usize, plan: &Plan<LlamaToken>) -> Result<(), String> {
        let layout = self.layout;
        let l = &mut self.lanes[lane];
        l.batch.clear();
        let n = plan.tokens.len();
        l.batch_order.clear();
        l.batch_order.extend(0..n);
        l.batch_order
            .sort_unstable_by_key(|&i| (plan.tokens[i].seq, i));
        l.out_rows.clear();
        l.out_rows.resize(n, -1);
        l.batch_pos.clear();
        l.batch_pos.resize(n, -1);
        let mut outputs = 0;
        for (b, &i) in l.batch_order.iter().enumerate() {
            let t = &plan.tokens[i];
            l.batch_pos[i] = b as i32;
            if t.logits {
                l.out_rows[i] = outputs;
                outputs += 1;
            }
            // The slot's sequence id in this lane's context.
            let seq = layout.locate(t.seq as usize).1 as i32;
            if let Err(e) = l.batch.add(t.token, t.pos, &[seq], t.logits) {
                return Err(format!(
                    "cannot add token {} of {n} to the batch: {e}",
                    l.batch.n_tokens() + 1
                ));
            }
        }
        Ok(())
    }

    /// `llama_decode` the lane's batch: rc 0 → decoded, rc 1 → no KV slot,
    /// else failed (said in words).
    fn decode(&mut self, lane: usize, plan: &Plan<LlamaToken>) -> Outcome {
        let l = &mut self.lanes[lane];
        match l.ctx.decode(&mut l.batch) {
            Ok(()) => Outcome::Decoded,
            Err(DecodeError::NoKvCacheSlot) => Outcome::NoKvSlot,
            Err(e) => {
                // llama.cpp's -1 is any invalid batch (llama-cpp-2 names it
                // "n_tokens == 0", which a planned batch never is): say what
                // was refused.
                let message = match e {
                    DecodeError::NTokensZero => format!(
                        "llama.cpp refused a batch of {} tokens ({} sequences) as invalid (code -1)",
                        plan.tokens.len(),
                        plan.sequences()
                    ),
                    e => e.to_string(),
                };
                bevy::log::error!("bevy_npc_llm: {message}");
                Outcome::Failed(message)
            }
        }
    }

    /// Take the plan's throw-away tokens out of the KV again, whatever the
    /// outcome (cell bookkeeping only: no need to wait for the device), and
    /// count them when the step decoded.
    fn remove_fillers(&mut self, lane: usize, plan: &mut Plan<LlamaToken>, decoded: bool) {
        let fillers = std::mem::take(&mut plan.fillers);
        for f in &fillers {
            let seq = self.layout.locate(f.slot).1 as u32;
            let removed =
                self.lanes[lane]
                    .ctx
                    .clear_kv_cache_seq(Some(seq), Some(f.pos as u32), None);
            if !matches!(removed, Ok(true)) {
                // Full-attention streams always cut; if one did not, the
                // sequence's next decode fails typed (position check).
                bevy::log::error!(
                    "bevy_npc_llm: could not remove a gap filler from sequence {seq} at {}",
                    f.pos
                );
            }
        }
        if !decoded {
            return;
        }
        let thrown: u64 = fillers.iter().map(|f| f.count as u64).sum();
        let c = &mut self.counters;
        if plan.even {
            c.even_prompt_steps += 1;
            c.prompt_padding += thrown;
        } else if plan.rounded {
            c.rounded_prompt_steps += 1;
            c.prompt_padding += thrown;
        } else {
            c.gap_fillers += thrown;
        }
    }

    /// Choose the tokens of the lane's decoded step (`sample`: the
    /// sequences it names and their plan token index), deliver them, and end
    /// the sequences that are done.
    fn finish_step(&mut self, lane: usize, sample: Vec<(RequestId, usize)>) {
        // Wait for the device (a no-op on the CPU, where decode is synchronous).
        let t_sample = Instant::now();
        self.lanes[lane].ctx.synchronize();
        let t_pick = Instant::now();
        self.counters.sync_time += t_pick - t_sample;
        // Where each named sequence is among the running ones, found once
        // for choosing and delivering (none ends in between); a sequence
        // cancelled since the decode is no longer running: `None`.
        let at: Vec<Option<usize>> = sample
            .iter()
            .map(|&(id, _)| self.sched.position(id))
            .collect();
        self.choose_tokens(lane, &sample, &at);
        let t_deliver = Instant::now();
        self.counters.pick_time += t_deliver - t_pick;
        self.deliver_tokens(&sample, &at);
        self.counters.deliver_time += t_deliver.elapsed();
        self.counters.sample_time += t_sample.elapsed();
    }

    /// Choose every named sequence's token (into its record's `picked`):
    /// rows read on this thread, tokens chosen in parallel when many whole
    /// rows need it. `at`: each one's place among the running sequences
    /// (`None`: no longer running, skipped).
    fn choose_tokens(&mut self, lane: usize, sample: &[(RequestId, usize)], at: &[Option<usize>]) {
        for (&(_, token), i) in sample.iter().zip(at) {
            if let Some(i) = *i {
                self.sched.data_at(i).pending = Some(token as i32);
            }
        }
        let layout = self.layout;
        let Self {
            lanes,
            sched,
            pool,
            counters,
            model,
            warned_stride,
            ..
        } = self;
        let Lane {
            ctx,
            device,
            out_rows,
            batch_pos,
            device_rows,
            ..
        } = &mut lanes[lane];
        // `at` is the plan's token index: its output ordinal and its
        // position in the llama.cpp batch.
        let ordinal = |at: i32| out_rows.get(at as usize).copied().unwrap_or(-1);
        let pos = |at: i32| batch_pos.get(at as usize).copied().unwrap_or(-1);
        let attached = |slot: usize| {
            device
                .as_ref()
                .is_some_and(|d| d.is_attached(layout.locate(slot).1))
        };
        device_rows.clear();
        if device.is_some() {
            for (slot, a) in sched.records_mut() {
                if let Some(at) = a.pending
                    && attached(slot)
                    && ordinal(at) >= 0
                {
                    device_rows.push((pos(at), ordinal(at) as usize));
                }
            }
            device_rows.sort_unstable();
        }
        let rows = StepRows::read(ctx, model.n_vocab() as usize, device_rows);
        if !device_rows.is_empty() && !rows.strided() && !*warned_stride {
            *warned_stride = true;
            bevy::log::warn!(
                "bevy_npc_llm: llama.cpp's device top-k rows are not where expected; reading them row by row (slower)"
            );
        }
        let mut work: Vec<(&mut Active, Row<'_>)> = Vec::with_capacity(sample.len());
        let mut full_rows = 0;
        for (slot, a) in sched.records_mut() {
            let Some(at) = a.pending.take() else {
                continue;
            };
            let on_device = attached(slot);
            let row = match (ordinal(at), on_device) {
                (r, _) if r < 0 => None,
                (r, true) => rows
                    .top(pos(at), r as usize)
                    .map(|(ids, l)| Row::Top(ids, l)),
                (r, false) => rows.full(r as usize).map(Row::Full),
            };
            let Some(row) = row else {
                a.picked = Some(Err(format!(
                    "llama.cpp returned no {} for this sequence",
                    if on_device {
                        "device candidates"
                    } else {
                        "logits"
                    }
                )));
                continue;
            };
            if matches!(row, Row::Full(_)) {
                full_rows += 1;
            }
            work.push((a, row));
        }
        counters.device_sampled_tokens += (work.len() - full_rows) as u64;
        token_choice::choose_all(pool.as_ref(), &mut work, full_rows);
    }

    /// Deliver each named sequence's chosen token, in the step's order, then
    /// end the sequences that are done (failed ones typed).
    fn deliver_tokens(&mut self, sample: &[(RequestId, usize)], at: &[Option<usize>]) {
        let mut finished: Vec<(RequestId, FinishReason)> = Vec::new();
        let mut failed: Vec<(RequestId, String)> = Vec::new();
        for (&(id, _), i) in sample.iter().zip(at) {
            let Some(i) = *i else {
                continue;
            };
            let a = self.sched.data_at(i);
            let tok = match a.picked.take() {
                Some(Ok(t)) => t,
                Some(Err(e)) => {
                    failed.push((id, e));
                    continue;
                }
                None => continue,
            };
            self.counters.generated_tokens += 1;
            if let Some(reason) = a.deliver(tok, self.model, &self.events) {
                finished.push((id, reason));
            } else if !self.sched.sampled_at(i, tok) {
                finished.push((id, FinishReason::ContextFull));
            }
        }
        for (id, error) in failed {
            if self.sched.finish(id).is_some() {
                self.fail(id, LlmError::InvalidConstraint(error));
            }
        }
        for (id, reason) in finished {
            if let Some(released) = self.sched.finish(id) {
                self.counters.completed += 1;
                delivery::complete(released, reason, &self.events);
            }
        }
    }

    pub(crate) fn send_counters(&mut self, queued: usize) {
        if self.last_counters.elapsed() < Duration::from_millis(50) && !self.sched.is_idle() {
            return;
        }
        self.last_counters = Instant::now();
        self.counters.queued = queued;
        self.counters.active_sequences = self.sched.running();
        let slots = self.sched.slot_table();
        self.counters.cached_slots = slots.cached();
        self.counters.evictions = slots.evictions;
        self.counters.kv_cells_used = slots.cells_used() + self.sched.running_cells();
        self.send(Event::Counters(Box::new(self.counters.clone())));
    }
}
