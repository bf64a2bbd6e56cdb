//! Continuous batching: every decode step carries the next token of all
//! generating sequences plus chunks of pending prompts, one llama.cpp
//! sequence id per slot. Requests join and leave between steps.

use std::time::{Duration, Instant};

use crossbeam_channel::Sender;
use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::token::LlamaToken;

use super::prompt::PromptRenderer;
use super::protocol::{EngineCounters, Event, Job, Knobs, LoadSpec, RequestId};
use super::sampler::Sampler;
use super::slots::SlotTable;
use super::text_stream::{StopMatcher, Utf8Stream};
use crate::errors::LlmError;
use crate::request::{FinishReason, RequestStats};
use crate::settings::SamplingOverrides;

struct Seq {
    job: Job,
    slot: usize,
    prompt: Vec<LlamaToken>,
    /// Tokens of this sequence held in KV (kept prefix, decoded prompt, generated).
    kv: Vec<LlamaToken>,
    /// Prompt tokens already in KV.
    fed: usize,
    reused: usize,
    sampler: Sampler,
    utf8: Utf8Stream,
    stops: StopMatcher,
    text: String,
    generated: usize,
    max_tokens: usize,
    ignore_eos: bool,
    /// Sampled and emitted, to be decoded in the next step.
    pending: Option<LlamaToken>,
    /// Index in the current batch whose logits to sample.
    logits_at: Option<i32>,
    /// Prompt tokens of this sequence in the current batch.
    in_batch: usize,
    started: Instant,
    first_token: Option<Instant>,
    last_token: Instant,
}

pub(crate) struct Server<'m> {
    model: &'m LlamaModel,
    ctx: LlamaContext<'m>,
    batch: LlamaBatch<'static>,
    renderer: PromptRenderer,
    model_sampling: SamplingOverrides,
    slots: SlotTable<LlamaToken>,
    /// Slots jobs below high priority may use (one more is kept for high priority).
    normal_slots: usize,
    seqs: Vec<Seq>,
    per_seq: usize,
    batch_size: usize,
    knobs: Knobs,
    events: Sender<Event>,
    counters: EngineCounters,
    last_counters: Instant,
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
    pub(crate) fn new(
        model: &'m LlamaModel,
        ctx: LlamaContext<'m>,
        spec: &LoadSpec,
        knobs: Knobs,
        events: Sender<Event>,
    ) -> Result<Self, String> {
        let renderer = PromptRenderer::new(model, &spec.prompt_format)?;
        let sequences = spec.sequences as usize + 1;
        // llama.cpp may round the context; trust what it made.
        let per_seq = (ctx.n_ctx() as usize / sequences).min(spec.context_per_sequence as usize);
        let batch_size = ctx.n_batch() as usize;
        let counters = EngineCounters {
            slots: sequences,
            kv_cells_total: per_seq * sequences,
            ..Default::default()
        };
        Ok(Self {
            model,
            ctx,
            batch: LlamaBatch::new(batch_size, 1),
            renderer,
            model_sampling: spec.model_sampling.clone(),
            slots: SlotTable::new(sequences, knobs.prefix_cache),
            normal_slots: sequences - 1,
            seqs: Vec::new(),
            per_seq,
            batch_size,
            knobs,
            events,
            counters,
            last_counters: Instant::now(),
        })
    }

    fn send(&self, e: Event) {
        let _ = self.events.send(e);
    }

    pub(crate) fn is_idle(&self) -> bool {
        self.seqs.is_empty()
    }

    /// Whether a job of `priority` may start now: high-priority jobs (the
    /// player's) may use the one slot kept free for them.
    pub(crate) fn has_free_slot_for(&self, priority: i32) -> bool {
        self.slots.has_free() && (priority > 0 || self.slots.busy() < self.normal_slots)
    }

    pub(crate) fn configure(&mut self, knobs: Knobs) {
        if !knobs.prefix_cache && self.knobs.prefix_cache {
            self.slots.clear_idle();
        }
        self.slots.set_cache_enabled(knobs.prefix_cache);
        self.knobs = knobs;
    }

    fn fail(&mut self, id: RequestId, error: LlmError) {
        self.counters.failed += 1;
        self.send(Event::Failed { id, error });
    }

    /// Start a job on a free slot (the caller checked there is one).
    pub(crate) fn admit(&mut self, job: Job) {
        let sampling = job
            .base_sampling
            .with_overrides(&self.model_sampling)
            .with_overrides(&job.overrides);
        if let Err(e) = sampling.validate() {
            self.fail(job.id, LlmError::InvalidRequest(e.to_string()));
            return;
        }
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
        let Some(acq) = self.slots.acquire(job.cache_key, &prompt) else {
            // Cannot happen: admit is only called with a free slot.
            self.fail(job.id, LlmError::Decode("no free sequence slot".into()));
            return;
        };
        let seq_id = acq.slot as i32;
        let mut reuse = acq.reuse;
        if self
            .ctx
            .kv_cache_seq_rm(seq_id, Some(reuse as u32), None)
            .is_err()
        {
            reuse = 0;
            let _ = self.ctx.kv_cache_seq_rm(seq_id, None, None);
        }
        let mut stops = sampling.stop.clone();
        for s in self.renderer.implied_stops(&job.prompt) {
            if !stops.contains(&s) {
                stops.push(s);
            }
        }
        let seed = sampling.seed.unwrap_or_else(fresh_seed);
        let sampler = Sampler::new(&sampling, seed);
        self.counters.reused_prefix_tokens += reuse as u64;
        self.send(Event::Started {
            id: job.id,
            prompt_tokens: prompt.len(),
            reused: reuse,
        });
        let now = Instant::now();
        self.seqs.push(Seq {
            slot: acq.slot,
            kv: prompt[..reuse].to_vec(),
            fed: reuse,
            reused: reuse,
            prompt,
            sampler,
            utf8: Utf8Stream::default(),
            stops: StopMatcher::new(stops),
            text: String::new(),
            generated: 0,
            max_tokens,
            ignore_eos: sampling.ignore_eos,
            pending: None,
            logits_at: None,
            in_batch: 0,
            started: now,
            first_token: None,
            last_token: now,
            job,
        });
    }

    /// Cancel a running job; `false` when it is not running here.
    pub(crate) fn cancel(&mut self, id: RequestId) -> bool {
        let Some(i) = self.seqs.iter().position(|s| s.job.id == id) else {
            return false;
        };
        let seq = self.seqs.swap_remove(i);
        // The KV of what was decoded stays valid: keep it as the key's cache.
        self.release(&seq);
        self.counters.cancelled += 1;
        self.send(Event::Cancelled { id });
        true
    }

    fn release(&mut self, seq: &Seq) {
        self.slots.release(seq.slot, seq.kv.clone());
    }

    /// Fail every running sequence (model going away).
    pub(crate) fn fail_all(&mut self, error: &LlmError) {
        let seqs: Vec<Seq> = self.seqs.drain(..).collect();
        for seq in seqs {
            self.slots.invalidate(seq.slot);
            self.fail(seq.job.id, error.clone());
        }
    }

    /// One decode step over all sequences.
    pub(crate) fn step(&mut self) {
        if self.seqs.is_empty() {
            return;
        }
        self.batch.clear();
        let mut n_tokens = 0usize;
        let mut generating = 0usize;
        // While a high-priority (player) prompt is being read, lower-priority
        // sequences sit out so its prompt decodes alone, as fast as possible.
        let urgent = self
            .seqs
            .iter()
            .filter(|s| s.fed < s.prompt.len())
            .map(|s| s.job.priority)
            .max()
            .filter(|&p| p > 0);
        // 1. The next token of every generating sequence.
        for seq in &mut self.seqs {
            seq.logits_at = None;
            if urgent.is_some_and(|p| seq.job.priority < p) {
                continue;
            }
            if let Some(tok) = seq.pending {
                let pos = seq.kv.len() as i32;
                if self.batch.add(tok, pos, &[seq.slot as i32], true).is_ok() {
                    seq.logits_at = Some(n_tokens as i32);
                    n_tokens += 1;
                    generating += 1;
                }
            }
        }
        // 2. Prompt chunks, higher priority first, bounded while others generate.
        let mut order: Vec<usize> = (0..self.seqs.len())
            .filter(|&i| self.seqs[i].fed < self.seqs[i].prompt.len())
            .filter(|&i| urgent.is_none_or(|p| self.seqs[i].job.priority >= p))
            .collect();
        order.sort_by_key(|&i| -self.seqs[i].job.priority);
        let chunk_cap = if generating > 0 {
            self.knobs.prompt_chunk as usize
        } else {
            usize::MAX
        };
        let mut prompt_tokens = 0usize;
        for i in order {
            let budget = self.batch_size - n_tokens;
            if budget == 0 {
                break;
            }
            let seq = &mut self.seqs[i];
            let remaining = seq.prompt.len() - seq.fed;
            // The player's request is not held back by the chunk limit.
            let cap = if seq.job.priority > 0 {
                usize::MAX
            } else {
                chunk_cap
            };
            let take = remaining.min(budget).min(cap);
            for k in 0..take {
                let idx = seq.fed + k;
                let last = idx + 1 == seq.prompt.len();
                let _ = self
                    .batch
                    .add(seq.prompt[idx], idx as i32, &[seq.slot as i32], last);
                if last {
                    seq.logits_at = Some(n_tokens as i32);
                }
                n_tokens += 1;
            }
            seq.in_batch = take;
            prompt_tokens += take;
        }
        if n_tokens == 0 {
            return;
        }
        let sequences_in_batch = self
            .seqs
            .iter()
            .filter(|s| s.pending.is_some() || s.fed < s.prompt.len())
            .count();
        let t0 = Instant::now();
        let result = self.ctx.decode(&mut self.batch);
        self.counters.decode_time += t0.elapsed();
        self.counters.decode_calls += 1;
        if sequences_in_batch > 1 {
            self.counters.multi_sequence_batches += 1;
        }
        self.counters.max_batch_sequences =
            self.counters.max_batch_sequences.max(sequences_in_batch);
        self.counters.max_batch_tokens = self.counters.max_batch_tokens.max(n_tokens);
        if let Err(e) = result {
            for seq in &mut self.seqs {
                seq.in_batch = 0;
            }
            // Every sequence in this batch has unknown KV now: fail them.
            let err = LlmError::Decode(e.to_string());
            let seqs: Vec<Seq> = self.seqs.drain(..).collect();
            for seq in seqs {
                let _ = self.ctx.kv_cache_seq_rm(seq.slot as i32, None, None);
                self.slots.invalidate(seq.slot);
                self.fail(seq.job.id, err.clone());
            }
            return;
        }
        self.counters.prompt_tokens_decoded += prompt_tokens as u64;
        // 3. Book-keeping: what this batch put in each sequence's KV.
        for seq in &mut self.seqs {
            if let Some(tok) = seq.pending.take() {
                seq.kv.push(tok);
            }
            if seq.in_batch > 0 {
                let (from, to) = (seq.fed, seq.fed + seq.in_batch);
                seq.kv.extend_from_slice(&seq.prompt[from..to]);
                seq.fed = to;
                seq.in_batch = 0;
            }
        }
        // 4. Sample every sequence that has logits in this batch.
        let t_sample = Instant::now();
        let mut finished: Vec<(usize, FinishReason)> = Vec::new();
        for (i, seq) in self.seqs.iter_mut().enumerate() {
            let Some(at) = seq.logits_at.take() else {
                continue;
            };
            let tok = LlamaToken(seq.sampler.sample(self.ctx.get_logits_ith(at)));
            let now = Instant::now();
            if seq.first_token.is_none() {
                seq.first_token = Some(now);
            }
            seq.last_token = now;
            self.counters.generated_tokens += 1;
            if self.model.vocab().is_eog(tok) && !seq.ignore_eos {
                finished.push((i, FinishReason::EndOfTurn));
                continue;
            }
            seq.generated += 1;
            let bytes = self.model.vocab().token_to_piece(tok, false, None);
            let piece = seq.utf8.push(&bytes);
            let released = seq.stops.push(&piece);
            if !released.text.is_empty() {
                seq.text.push_str(&released.text);
                let _ = self.events.send(Event::Token {
                    id: seq.job.id,
                    text: released.text,
                });
            }
            if released.stopped {
                finished.push((i, FinishReason::StopString));
            } else if seq.generated >= seq.max_tokens {
                finished.push((i, FinishReason::MaxTokens));
            } else if seq.kv.len() >= self.per_seq {
                finished.push((i, FinishReason::ContextFull));
            } else {
                seq.pending = Some(tok);
            }
        }
        self.counters.sample_time += t_sample.elapsed();
        // Highest index first so swap_remove keeps the other indices valid.
        finished.sort_by_key(|(i, _)| std::cmp::Reverse(*i));
        for (i, reason) in finished {
            let seq = self.seqs.swap_remove(i);
            self.complete(seq, reason);
        }
    }

    fn complete(&mut self, mut seq: Seq, finish: FinishReason) {
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
            prompt_tokens: seq.prompt.len(),
            reused_prefix_tokens: seq.reused,
            generated_tokens: seq.generated,
            queue_time: seq.started.duration_since(seq.job.submitted),
            time_to_first_token: seq.first_token.map(|f| f.duration_since(seq.job.submitted)),
            generation_time: gen_time,
            tokens_per_second: if gen_time.as_secs_f32() > 0.0 && seq.generated > 1 {
                (seq.generated - 1) as f32 / gen_time.as_secs_f32()
            } else {
                0.0
            },
            slot: seq.slot,
        };
        self.release(&seq);
        self.counters.completed += 1;
        self.send(Event::Completed {
            id: seq.job.id,
            text: std::mem::take(&mut seq.text),
            finish,
            stats,
        });
    }

    pub(crate) fn send_counters(&mut self, queued: usize) {
        if self.last_counters.elapsed() < Duration::from_millis(50) && !self.seqs.is_empty() {
            return;
        }
        self.last_counters = Instant::now();
        self.counters.queued = queued;
        self.counters.active_sequences = self.seqs.len();
        self.counters.cached_slots = self.slots.cached();
        self.counters.evictions = self.slots.evictions;
        self.counters.kv_cells_used =
            self.slots.cells_used() + self.seqs.iter().map(|s| s.kv.len()).sum::<usize>();
        self.send(Event::Counters(Box::new(self.counters.clone())));
    }
}
