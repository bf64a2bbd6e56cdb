//! Delivery: a running request's record on the worker — its job, sampler,
//! constraint state, the text so far and its timings — and what a chosen
//! token does to it: the token's text through UTF-8 reassembly and stop
//! strings to `Token` events, and at the end the `Completed` event with
//! the request's figures. The record lives in the scheduler beside the
//! sequence's scheduling state (one record per running request, removed in
//! one place: `Scheduler::finish`, `drop_all`, or a failed step).

use std::time::{Duration, Instant};

use crossbeam_channel::Sender;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::token::LlamaToken;

use super::protocol::{Event, Job};
use super::sampler::Sampler;
use super::scheduler::Released;
use super::text_stream::{StopMatcher, Utf8Stream};
use crate::request::{FinishReason, RequestStats};

/// A running request, as the worker keeps it.
pub(crate) struct Active {
    pub(crate) job: Job,
    pub(crate) sampler: Sampler,
    /// The output constraint's state (which tokens may come next).
    pub(crate) matcher: Option<llguidance::Matcher>,
    utf8: Utf8Stream,
    stops: StopMatcher,
    text: String,
    generated: usize,
    max_tokens: usize,
    ignore_eos: bool,
    started: Instant,
    first_token: Option<Instant>,
    last_token: Instant,
    /// This step: the plan's index of its logits token, then the token chosen.
    pub(crate) pending: Option<i32>,
    pub(crate) picked: Option<Result<LlamaToken, String>>,
}

impl Active {
    /// A request starting now.
    pub(crate) fn new(
        job: Job,
        sampler: Sampler,
        matcher: Option<llguidance::Matcher>,
        stops: Vec<String>,
        max_tokens: usize,
        ignore_eos: bool,
    ) -> Self {
        let now = Instant::now();
        Self {
            job,
            sampler,
            matcher,
            utf8: Utf8Stream::default(),
            stops: StopMatcher::new(stops),
            text: String::new(),
            generated: 0,
            max_tokens,
            ignore_eos,
            started: now,
            first_token: None,
            last_token: now,
            pending: None,
            picked: None,
        }
    }

    /// Deliver a token chosen for this request: its text (once whole UTF-8
    /// and past any stop string that may start in it) goes out as a `Token`
    /// event. `Some(reason)` when the request ends with it.
    pub(crate) fn deliver(
        &mut self,
        tok: LlamaToken,
        model: &LlamaModel,
        events: &Sender<Event>,
    ) -> Option<FinishReason> {
        let now = Instant::now();
        self.first_token.get_or_insert(now);
        self.last_token = now;
        // A constraint allows end-of-generation only once it is complete,
        // and then nothing else: it ends the request even with ignore_eos.
        if model.vocab().is_eog(tok) && (!self.ignore_eos || self.matcher.is_some()) {
            return Some(FinishReason::EndOfTurn);
        }
        self.generated += 1;
        let bytes = model.vocab().token_to_piece(tok, false, None);
        let piece = self.utf8.push(&bytes);
        let released = self.stops.push(&piece);
        if !released.text.is_empty() {
            self.text.push_str(&released.text);
            let _ = events.send(Event::Token {
                id: self.job.id,
                text: released.text,
            });
        }
        if released.stopped {
            Some(FinishReason::StopString)
        } else if self.generated >= self.max_tokens {
            Some(FinishReason::MaxTokens)
        } else {
            None
        }
    }
}

/// The last events of a request the scheduler released: the text it held
/// back (an unfinished UTF-8 sequence, a possible stop string's start),
/// then `Completed` with its figures and, for a JSON constraint, the parsed
/// value.
pub(crate) fn complete(released: Released<Active>, finish: FinishReason, events: &Sender<Event>) {
    let mut a = released.data;
    let tail = a.utf8.finish();
    let mut rest = String::new();
    if !tail.is_empty() {
        rest.push_str(&a.stops.push(&tail).text);
    }
    if finish != FinishReason::StopString {
        rest.push_str(&a.stops.finish());
    }
    if !rest.is_empty() {
        a.text.push_str(&rest);
        let _ = events.send(Event::Token {
            id: a.job.id,
            text: rest,
        });
    }
    let gen_time = a
        .first_token
        .map_or(Duration::ZERO, |f| a.last_token.duration_since(f));
    let stats = RequestStats {
        prompt_tokens: released.prompt_tokens,
        reused_prefix_tokens: released.reused,
        generated_tokens: a.generated,
        queue_time: a.started.duration_since(a.job.submitted),
        time_to_first_token: a.first_token.map(|f| f.duration_since(a.job.submitted)),
        generation_time: gen_time,
        tokens_per_second: if gen_time.as_secs_f32() > 0.0 && a.generated > 1 {
            (a.generated - 1) as f32 / gen_time.as_secs_f32()
        } else {
            0.0
        },
        slot: released.slot,
    };
    let output = a
        .job
        .constraint
        .as_ref()
        .filter(|c| c.is_json())
        .map(|c| crate::constraint::parse_output(c, &a.text, finish));
    let _ = events.send(Event::Completed {
        id: a.job.id,
        text: a.text,
        finish,
        stats,
        output,
    });
}
