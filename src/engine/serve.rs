//! Continuous batching, the llama.cpp side: the [`Scheduler`] decides each
//! step (which tokens of which sequence, admission, prefix reuse, retries);
//! this module only turns its plan into a `LlamaBatch`, decodes, reports the
//! outcome back and samples the sequences it names. One llama.cpp sequence
//! id per slot; requests join and leave between steps.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;
use llama_cpp_2::DecodeError;
use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::token::LlamaToken;

use super::constraint_jobs::Compiled;
use super::device_sampling::{DEVICE_TOP_K, DeviceSampling, StepRows};
use super::layout::Layout;
use super::prompt::PromptRenderer;
use super::protocol::{EngineCounters, Event, Job, Knobs, LoadSpec, RequestId};
use super::sampler::Sampler;
use super::scheduler::{Limits, Outcome, Released, Scheduler};
use super::text_stream::{StopMatcher, Utf8Stream};
use crate::errors::LlmError;
use crate::request::{FinishReason, RequestStats};
use crate::settings::SamplingOverrides;

/// What the worker keeps of a running request beyond its scheduling state
/// (which lives in the [`Scheduler`]).
struct Seq {
    job: Job,
    sampler: Sampler,
    /// The output constraint's state (which tokens may come next).
    matcher: Option<llguidance::Matcher>,
    utf8: Utf8Stream,
    stops: StopMatcher,
    text: String,
    generated: usize,
    max_tokens: usize,
    ignore_eos: bool,
    started: Instant,
    first_token: Option<Instant>,
    last_token: Instant,
    /// The llama.cpp sequence (slot) it runs on.
    slot: usize,
    /// This step: the plan's index of its logits token, then the token chosen.
    pending: Option<i32>,
    picked: Option<Result<LlamaToken, String>>,
}

/// One sequence's scores for this step, as the device left them.
#[derive(Clone, Copy)]
enum Row<'c> {
    /// The whole vocabulary's logits.
    Full(&'c [f32]),
    /// The device's top-k: token ids and their logits.
    Top(&'c [i32], &'c [f32]),
}

/// Whole rows (host sampling) in one step from which choosing them in
/// parallel pays for the hand-off to the pool.
const PARALLEL_ROWS: usize = 4;

/// Whole rows in one step from which the worker thread takes a share of
/// them itself while the pool takes the rest ([`super::row_pool`]); below
/// it the pool takes them all (`install` + `par_iter`). Measured on the
/// H100 machine, alternating in one sitting (session 10): 16 rows a lane
/// step (32 NPCs, two lanes) 0.20 vs 0.38 ms of token choice, +6–9 %
/// generation rate; 4 rows (8 NPCs) 0.21–0.25 vs 0.15 ms, −10 %.
const SHARED_ROWS: usize = 16;

/// Choose a sequence's next token from its row.
fn pick(seq: &mut Seq, row: Row<'_>) -> Result<LlamaToken, String> {
    match (seq.matcher.as_mut(), row) {
        (None, Row::Full(logits)) => Ok(LlamaToken(seq.sampler.sample(logits))),
        (None, Row::Top(ids, logits)) => Ok(LlamaToken(seq.sampler.sample_candidates(ids, logits))),
        (Some(m), Row::Full(logits)) => constrained_sample(m, &mut seq.sampler, logits),
        (Some(_), Row::Top(..)) => {
            Err("internal: a constrained sequence got device candidates".to_string())
        }
    }
}

/// Steps a Normal sequence may sit out while the player's prompt is read.
const MAX_SIT_OUT: u32 = 4;

/// Sample one token among those the constraint allows, and advance it.
fn constrained_sample(
    m: &mut llguidance::Matcher,
    sampler: &mut Sampler,
    logits: &[f32],
) -> Result<LlamaToken, String> {
    let mask = m.compute_mask_or_eos().map_err(|e| e.to_string())?;
    let tok = sampler
        .sample_allowed(logits, |t| mask.is_allowed(t))
        .ok_or_else(|| "the constraint allows no token here".to_string())?;
    if !m.is_stopped() {
        m.consume_token(tok as u32).map_err(|e| e.to_string())?;
    }
    Ok(LlamaToken(tok))
}

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
    sched: Scheduler<LlamaToken>,
    seqs: HashMap<RequestId, Seq>,
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

/// The model's sliding-window size from its GGUF metadata (0: none).
pub(crate) fn sliding_window(model: &LlamaModel) -> usize {
    let arch = model
        .meta_val_str("general.architecture")
        .unwrap_or_default();
    model
        .meta_val_str(&format!("{arch}.attention.sliding_window"))
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
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
            // A full SWA cache keeps every position: no window to respect.
            swa_window: if engine.swa_full {
                0
            } else {
                sliding_window(model)
            },
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
            .map(|ctx| Lane {
                ctx,
                batch: LlamaBatch::new(batch_size, 1),
                out_rows: Vec::with_capacity(batch_size),
                batch_pos: Vec::with_capacity(batch_size),
                batch_order: Vec::with_capacity(batch_size),
                device_rows: Vec::with_capacity(in_lane),
                device: engine
                    .device_sampling
                    .then(|| DeviceSampling::new(in_lane, DEVICE_TOP_K)),
                in_flight: None,
            })
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
            seqs: HashMap::new(),
            per_seq,
            knobs,
            events,
            counters,
            last_counters: Instant::now(),
            pool: (engine.sampling_threads > 1)
                .then(|| {
                    rayon::ThreadPoolBuilder::new()
                        .num_threads(engine.sampling_threads as usize)
                        .thread_name(|i| format!("npc-llm-sample-{i}"))
                        .build()
                        .ok()
                })
                .flatten(),
            warned_stride: false,
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

    fn admit_inner(&mut self, job: Job, compiled: Option<Compiled>) {
        let sampling = job
            .base_sampling
            .with_overrides(&self.model_sampling)
            .with_overrides(&job.overrides);
        if let Err(e) = sampling.validate() {
            self.fail(job.id, LlmError::InvalidRequest(e.to_string()));
            return;
        }
        // Constraints are compiled off this thread (`ConstraintJobs`).
        let matcher = match (compiled, &job.constraint) {
            (Some(Ok(m)), Some(_)) => Some(m),
            (Some(Err(e)), _) => {
                self.fail(job.id, LlmError::InvalidConstraint(e));
                return;
            }
            (None, None) | (Some(Ok(_)), None) => None,
            (None, Some(c)) => {
                let e = format!("internal: the {} was not compiled", c.kind());
                self.fail(job.id, LlmError::InvalidConstraint(e));
                return;
            }
        };
        let max_tokens = (sampling.max_tokens as usize).min(self.per_seq.saturating_sub(1).max(1));
        let limit = self
            .per_seq
            .saturating_sub(max_tokens.min(self.per_seq / 2))
            .max(1);
        let prompt = match self
            .renderer
            .tokenize(self.model, &job.prompt, limit, job.trim_prompt)
        {
            Ok(t) => t,
            Err(e) => {
                self.fail(job.id, e);
                return;
            }
        };
        let prompt_len = prompt.len();
        let (lanes, layout) = (&self.lanes, self.layout);
        let admitted = match self
            .sched
            .admit(job.id, job.priority, job.cache_key, prompt, |slot| {
                let (lane, seq) = layout.locate(slot);
                lanes[lane].ctx.kv_cache_seq_pos_min(seq as i32)
            }) {
            Ok(a) => a,
            Err(e) => {
                self.fail(job.id, e);
                return;
            }
        };
        // Drop the slot's KV past the kept prefix.
        let mut reuse = admitted.reuse;
        if !self.clear_slot(admitted.slot, Some(reuse as u32)) {
            self.clear_slot(admitted.slot, None);
            self.sched.restart_prompt(job.id);
            reuse = 0;
        }
        let mut stops = sampling.stop.clone();
        for s in self.renderer.implied_stops(&job.prompt) {
            if !stops.contains(&s) {
                stops.push(s);
            }
        }
        let seed = sampling.seed.unwrap_or_else(fresh_seed);
        let sampler = Sampler::new(&sampling, seed);
        // Top-k on the device when the draw over its candidates is exact
        // and no constraint needs the whole row; the slot's chain follows.
        let (lane, seq) = self.locate(admitted.slot);
        let Lane { ctx, device, .. } = &mut self.lanes[lane];
        if let Some(device) = device.as_mut() {
            let want = matcher.is_none() && sampler.fits_top_k(device.k());
            device.set(ctx, seq, want);
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
            id: job.id,
            prompt_tokens: prompt_len,
            reused: reuse,
        });
        let now = Instant::now();
        self.seqs.insert(
            job.id,
            Seq {
                sampler,
                matcher,
                utf8: Utf8Stream::default(),
                stops: StopMatcher::new(stops),
                text: String::new(),
                generated: 0,
                max_tokens,
                ignore_eos: sampling.ignore_eos,
                started: now,
                first_token: None,
                last_token: now,
                slot: admitted.slot,
                pending: None,
                picked: None,
                job,
            },
        );
    }

    /// Cancel a running job; `false` when it is not running here.
    pub(crate) fn cancel(&mut self, id: RequestId) -> bool {
        // The KV of what was decoded stays valid: kept as the key's cache.
        if self.sched.finish(id).is_none() {
            return false;
        }
        self.seqs.remove(&id);
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
        for (id, slot) in self.sched.drop_all() {
            self.clear_slot(slot, None);
            self.seqs.remove(&id);
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
        let layout = self.layout;
        let t_batch = Instant::now();
        let l = &mut self.lanes[lane];
        l.batch.clear();
        // The batch goes to llama.cpp sorted by sequence (a stable order
        // within each): with one KV stream per sequence, llama.cpp splits a
        // batch into micro-batches of consecutive sequence ids in the order
        // it meets them, and reorders outputs that come back out of batch
        // order (a copy of whole logits rows). Sorted, a step of N
        // generating sequences is one micro-batch and needs no reordering.
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
        let mut built = Ok(());
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
                built = Err(format!(
                    "cannot add token {} of {} to the batch: {e}",
                    l.batch.n_tokens() + 1,
                    plan.tokens.len()
                ));
                break;
            }
        }
        let n_tokens = plan.tokens.len();
        let sequences_in_batch = plan.sequences();
        let prompt_tokens = plan.prompt_tokens();
        let outcome = match built {
            Err(message) => {
                bevy::log::error!("bevy_npc_llm: {message}");
                Outcome::Failed(message)
            }
            Ok(()) => {
                let t0 = Instant::now();
                self.counters.batch_time += t0 - t_batch;
                let result = l.ctx.decode(&mut l.batch);
                self.counters.decode_time += t0.elapsed();
                self.counters.decode_calls += 1;
                match result {
                    Ok(()) => Outcome::Decoded,
                    Err(DecodeError::NoKvCacheSlot) => Outcome::NoKvSlot,
                    Err(e) => {
                        // llama.cpp's -1 is any invalid batch (llama-cpp-2
                        // names it "n_tokens == 0", which a planned batch
                        // never is): say what was refused.
                        let message = match e {
                            DecodeError::NTokensZero => format!(
                                "llama.cpp refused a batch of {n_tokens} tokens \
                                 ({sequences_in_batch} sequences) as invalid (code -1)"
                            ),
                            e => e.to_string(),
                        };
                        bevy::log::error!("bevy_npc_llm: {message}");
                        Outcome::Failed(message)
                    }
                }
            }
        };
        let decoded = outcome == Outcome::Decoded;
        // Gap fillers leave the KV again, whatever the outcome (cell
        // bookkeeping only: no need to wait for the device).
        let fillers = std::mem::take(&mut plan.fillers);
        for f in &fillers {
            let seq = layout.locate(f.slot).1 as u32;
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
        if decoded {
            let thrown: u64 = fillers.iter().map(|f| f.count as u64).sum();
            if plan.even {
                self.counters.even_prompt_steps += 1;
                self.counters.prompt_padding += thrown;
            } else if plan.rounded {
                self.counters.rounded_prompt_steps += 1;
                self.counters.prompt_padding += thrown;
            } else {
                self.counters.gap_fillers += thrown;
            }
        }
        let applied = self.sched.apply(plan, outcome);
        for slot in applied.evicted {
            self.clear_slot(slot, None);
        }
        for d in applied.failed {
            self.clear_slot(d.slot, None);
            self.seqs.remove(&d.id);
            self.fail(d.id, d.error);
        }
        if !decoded {
            return;
        }
        if sequences_in_batch > 1 {
            self.counters.multi_sequence_batches += 1;
        }
        self.counters.max_batch_sequences =
            self.counters.max_batch_sequences.max(sequences_in_batch);
        self.counters.max_batch_tokens = self.counters.max_batch_tokens.max(n_tokens);
        self.counters.prompt_tokens_decoded += prompt_tokens as u64;
        let l = &mut self.lanes[lane];
        if let Some(device) = l.device.as_mut() {
            device.decoded();
        }
        l.in_flight = Some(applied.sample);
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
        // Choose every named sequence's token: rows read on this thread,
        // tokens chosen in parallel when many whole rows need it. A sequence
        // cancelled since the decode is no longer in `seqs`: skipped.
        for &(id, at) in &sample {
            if let Some(seq) = self.seqs.get_mut(&id) {
                seq.pending = Some(at as i32);
            }
        }
        let layout = self.layout;
        {
            let Self {
                lanes,
                seqs,
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
                for seq in seqs.values() {
                    if let Some(at) = seq.pending
                        && attached(seq.slot)
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
            let mut work: Vec<(&mut Seq, Row<'_>)> = Vec::with_capacity(sample.len());
            let mut full_rows = 0;
            for seq in seqs.values_mut() {
                let Some(at) = seq.pending.take() else {
                    continue;
                };
                let on_device = attached(seq.slot);
                let row = match (ordinal(at), on_device) {
                    (r, _) if r < 0 => None,
                    (r, true) => rows
                        .top(pos(at), r as usize)
                        .map(|(ids, l)| Row::Top(ids, l)),
                    (r, false) => rows.full(r as usize).map(Row::Full),
                };
                let Some(row) = row else {
                    seq.picked = Some(Err(format!(
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
                work.push((seq, row));
            }
            counters.device_sampled_tokens += (work.len() - full_rows) as u64;
            match pool {
                Some(pool) if full_rows >= SHARED_ROWS => {
                    super::row_pool::for_each_shared(pool, &mut work, |(seq, row)| {
                        seq.picked = Some(pick(seq, *row));
                    });
                }
                Some(pool) if full_rows >= PARALLEL_ROWS => {
                    use rayon::prelude::*;
                    pool.install(|| {
                        work.par_iter_mut()
                            .for_each(|(seq, row)| seq.picked = Some(pick(seq, *row)));
                    });
                }
                _ => {
                    for (seq, row) in &mut work {
                        seq.picked = Some(pick(seq, *row));
                    }
                }
            }
        }
        let t_deliver = Instant::now();
        self.counters.pick_time += t_deliver - t_pick;
        let mut finished: Vec<(RequestId, FinishReason)> = Vec::new();
        let mut failed: Vec<(RequestId, String)> = Vec::new();
        for (id, _) in sample {
            let Some(seq) = self.seqs.get_mut(&id) else {
                continue;
            };
            let tok = match seq.picked.take() {
                Some(Ok(t)) => t,
                Some(Err(e)) => {
                    failed.push((id, e));
                    continue;
                }
                None => continue,
            };
            let now = Instant::now();
            if seq.first_token.is_none() {
                seq.first_token = Some(now);
            }
            seq.last_token = now;
            self.counters.generated_tokens += 1;
            // A constraint allows end-of-generation only once it is complete,
            // and then nothing else: it ends the request even with ignore_eos.
            if self.model.vocab().is_eog(tok) && (!seq.ignore_eos || seq.matcher.is_some()) {
                finished.push((id, FinishReason::EndOfTurn));
                continue;
            }
            seq.generated += 1;
            let bytes = self.model.vocab().token_to_piece(tok, false, None);
            let piece = seq.utf8.push(&bytes);
            let released = seq.stops.push(&piece);
            if !released.text.is_empty() {
                seq.text.push_str(&released.text);
                let _ = self.events.send(Event::Token {
                    id,
                    text: released.text,
                });
            }
            if released.stopped {
                finished.push((id, FinishReason::StopString));
            } else if seq.generated >= seq.max_tokens {
                finished.push((id, FinishReason::MaxTokens));
            } else if !self.sched.sampled(id, tok) {
                finished.push((id, FinishReason::ContextFull));
            }
        }
        self.counters.deliver_time += t_deliver.elapsed();
        self.counters.sample_time += t_sample.elapsed();
        for (id, error) in failed {
            if self.sched.finish(id).is_some() {
                self.seqs.remove(&id);
                self.fail(id, LlmError::InvalidConstraint(error));
            }
        }
        for (id, reason) in finished {
            if let (Some(released), Some(seq)) = (self.sched.finish(id), self.seqs.remove(&id)) {
                self.complete(seq, reason, released);
            }
        }
    }

    fn complete(&mut self, mut seq: Seq, finish: FinishReason, released: Released) {
        let tail = seq.utf8.finish();
        let mut rest = String::new();
        if !tail.is_empty() {
            let r = seq.stops.push(&tail);
            rest.push_str(&r.text);
        }
        if finish != FinishReason::StopString {
            rest.push_str(&seq.stops.finish());
        }
        if !rest.is_empty() {
            seq.text.push_str(&rest);
            self.send(Event::Token {
                id: seq.job.id,
                text: rest,
            });
        }
        let gen_time = seq
            .first_token
            .map_or(Duration::ZERO, |f| seq.last_token.duration_since(f));
        let stats = RequestStats {
            prompt_tokens: released.prompt_tokens,
            reused_prefix_tokens: released.reused,
            generated_tokens: seq.generated,
            queue_time: seq.started.duration_since(seq.job.submitted),
            time_to_first_token: seq.first_token.map(|f| f.duration_since(seq.job.submitted)),
            generation_time: gen_time,
            tokens_per_second: if gen_time.as_secs_f32() > 0.0 && seq.generated > 1 {
                (seq.generated - 1) as f32 / gen_time.as_secs_f32()
            } else {
                0.0
            },
            slot: released.slot,
        };
        self.counters.completed += 1;
        let output = seq
            .job
            .constraint
            .as_ref()
            .filter(|c| c.is_json())
            .map(|c| crate::constraint::parse_output(c, &seq.text, finish));
        self.send(Event::Completed {
            id: seq.job.id,
            text: std::mem::take(&mut seq.text),
            finish,
            stats,
            output,
        });
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
