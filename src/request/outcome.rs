//! How a request ended: why generation stopped, and its figures.

use std::time::Duration;

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// The model ended its turn (end-of-generation token).
    EndOfTurn,
    /// A stop string was reached (it was not emitted).
    StopString,
    /// `max_tokens` were generated.
    MaxTokens,
    /// The sequence's context is full.
    ContextFull,
}

/// Figures about one request.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RequestStats {
    /// Prompt length in tokens.
    pub prompt_tokens: usize,
    /// Leading prompt tokens whose KV came from the prefix cache.
    pub reused_prefix_tokens: usize,
    /// Tokens generated.
    pub generated_tokens: usize,
    /// From submission to the worker starting the request.
    pub queue_time: Duration,
    /// From submission to the first generated token.
    pub time_to_first_token: Option<Duration>,
    /// From the first to the last generated token.
    pub generation_time: Duration,
    /// Generated tokens per second after the first token.
    pub tokens_per_second: f32,
    /// Sequence slot (llama.cpp sequence id) that served it.
    pub slot: usize,
}
