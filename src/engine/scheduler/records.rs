//! The scheduler's records: a running sequence, a planned step and what
//! applying a decode's outcome did. Pure, like the scheduler.

use super::super::protocol::RequestId;
use super::super::shaper::{BatchToken, Filler};
use crate::errors::LlmError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Part {
    /// The sequence's sampled token.
    Next,
    /// Prompt tokens `from..to`.
    Prompt { from: usize, to: usize },
}

#[derive(Debug, Clone, Copy)]
pub(super) struct Entry {
    pub(super) id: RequestId,
    pub(super) part: Part,
    /// Index in the batch whose logits are sampled afterwards.
    pub(super) logits_at: Option<usize>,
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
    pub(super) entries: Vec<Entry>,
    /// The lane it was planned for.
    pub(super) lane: usize,
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
pub(crate) struct Dropped<P> {
    pub id: RequestId,
    /// Its slot; the caller clears that sequence's KV (it is unknown).
    pub slot: usize,
    pub error: LlmError,
    /// The caller's record of the request.
    pub data: P,
}

/// The result of applying an outcome.
#[derive(Debug)]
pub(crate) struct Applied<P> {
    /// Sequences to sample now: request and batch index of its logits.
    pub sample: Vec<(RequestId, usize)>,
    /// Sequences failed by this outcome.
    pub failed: Vec<Dropped<P>>,
    /// The plan did not decode and will be retried smaller.
    pub retry: bool,
    /// Idle cached slots dropped to make room: the caller clears their KV.
    pub evicted: Vec<usize>,
}

impl<P> Default for Applied<P> {
    fn default() -> Self {
        Self {
            sample: Vec::new(),
            failed: Vec::new(),
            retry: false,
            evicted: Vec::new(),
        }
    }
}

/// A sequence that left the scheduler.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Released<P> {
    pub slot: usize,
    pub prompt_tokens: usize,
    pub reused: usize,
    /// The caller's record of the request.
    pub data: P,
}

/// A running sequence: what the scheduler decides with, and `data`, the
/// caller's record of the request (the worker's sampler, text, stop
/// strings…): one record per running request, removed in one place.
#[derive(Debug)]
pub(super) struct Running<T, P> {
    pub(super) id: RequestId,
    pub(super) priority: i32,
    pub(super) slot: usize,
    pub(super) prompt: Vec<T>,
    /// Tokens of this sequence held in KV: only [`Scheduler::apply`] of a
    /// decoded plan adds to it.
    pub(super) kv: Vec<T>,
    /// Prompt tokens in KV.
    pub(super) fed: usize,
    pub(super) reused: usize,
    /// Sampled, waiting to be decoded.
    pub(super) pending: Option<T>,
    /// Consecutive steps this sequence had work and was left out.
    pub(super) sat_out: u32,
    /// Admission order (ties).
    pub(super) order: u64,
    pub(super) data: P,
}

impl<T: Copy, P> Running<T, P> {
    /// Add this sequence's own tokens to a step: its sampled token (`take`
    /// is then 1), or its next `take` prompt tokens, the last of the prompt
    /// asking for logits.
    pub(super) fn push_own(
        &self,
        take: usize,
        tokens: &mut Vec<BatchToken<T>>,
        entries: &mut Vec<Entry>,
    ) {
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

impl<T, P> Running<T, P> {
    pub(super) fn has_work(&self) -> bool {
        self.pending.is_some() || self.fed < self.prompt.len()
    }

    /// Its whole prompt is decoded and no token was sampled yet: its
    /// first token is being chosen (with lanes, while other lanes take turns).
    pub(super) fn awaits_first_token(&self) -> bool {
        self.pending.is_none()
            && self.fed == self.prompt.len()
            && self.kv.len() == self.prompt.len()
    }
}
