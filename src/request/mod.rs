//! LLM requests as ECS data: insert an [`LlmRequest`] on an entity (an NPC,
//! or a fresh entity) and the plugin adds an [`LlmRequestStatus`] that it
//! keeps up to date while [events](crate::events) stream the answer.
//!
//! ```no_run
//! use bevy::prelude::*;
//! use bevy_npc_llm::prelude::*;
//!
//! fn ask(mut commands: Commands, npc: Single<Entity, With<Name>>) {
//!     commands.entity(*npc).insert(
//!         LlmRequest::chat([
//!             ChatMessage::system("You are Mira, a cheerful baker. Answer in one sentence."),
//!             ChatMessage::user("Good morning! What smells so good?"),
//!         ])
//!         .with_cache_key(*npc)
//!         .with_max_tokens(48),
//!     );
//! }
//! ```

mod control_text;
mod outcome;

use crate::constraint::OutputConstraint;

pub use control_text::defuse_control_text;
pub use outcome::{FinishReason, RequestStats};

use bevy::prelude::{Component, Entity};

use crate::errors::LlmError;
use crate::settings::SamplingOverrides;

/// Who says a chat message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ChatRole {
    /// Instructions: persona, rules, context. Comes first.
    System,
    /// The other speaker (the player, or another NPC).
    User,
    /// The model's own earlier lines.
    Assistant,
}

impl ChatRole {
    /// The role name chat templates expect.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::System => "system",
            Self::User => "user",
            Self::Assistant => "assistant",
        }
    }
}

/// One chat message. Its text is always tokenized as plain text: control
/// tokens typed by a player (`<|im_start|>` and the like) stay harmless text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatMessage {
    /// Who says it.
    pub role: ChatRole,
    /// What is said.
    pub content: String,
    /// Speaker name used by plain-completion prompts (`Name: text`); chat
    /// templates ignore it.
    pub name: Option<String>,
}

impl ChatMessage {
    /// A message with a role.
    #[must_use]
    pub fn new(role: ChatRole, content: impl Into<String>) -> Self {
        Self {
            role,
            content: content.into(),
            name: None,
        }
    }
    /// A system message.
    #[must_use]
    pub fn system(content: impl Into<String>) -> Self {
        Self::new(ChatRole::System, content)
    }
    /// A user message.
    #[must_use]
    pub fn user(content: impl Into<String>) -> Self {
        Self::new(ChatRole::User, content)
    }
    /// An assistant message.
    #[must_use]
    pub fn assistant(content: impl Into<String>) -> Self {
        Self::new(ChatRole::Assistant, content)
    }
    /// Set the speaker's name (for plain-completion prompts).
    #[must_use]
    pub fn with_name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }
}

/// What the model is asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LlmPrompt {
    /// Chat messages, rendered with the model's prompt format from the registry.
    Chat(Vec<ChatMessage>),
    /// Text given to the model as is (tokenized as plain text, a BOS token
    /// added when the model wants one). For base models and custom formats.
    Raw(String),
}

/// Scheduling priority: higher runs first when requests wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub enum RequestPriority {
    /// Ambient chatter that may wait.
    Background,
    /// Ordinary NPC lines.
    #[default]
    Normal,
    /// The player is waiting for this one (e.g. the NPC the player talks to).
    High,
}

impl RequestPriority {
    pub(crate) fn rank(self) -> i32 {
        match self {
            Self::Background => -1,
            Self::Normal => 0,
            Self::High => 1,
        }
    }
}

/// Identifies whose prompt prefix to keep cached between requests
/// (normally the NPC entity, see `From<Entity>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CacheKey(pub u64);

impl From<Entity> for CacheKey {
    fn from(e: Entity) -> Self {
        Self(e.to_bits())
    }
}

/// A request for generated text. Insert it on an entity to submit it; the
/// component is immutable: insert a new one to ask again (the previous
/// request of that entity, if still running, is cancelled). Remove it or
/// despawn the entity to cancel. An [`LlmRequestStatus`] comes with it
/// (a required component), so the request's progress is readable from the
/// frame it is inserted.
#[derive(Component, Debug, Clone, PartialEq)]
#[component(immutable)]
#[require(LlmRequestStatus)]
pub struct LlmRequest {
    /// The prompt.
    pub prompt: LlmPrompt,
    /// Sampling changes over the settings' and the model's defaults.
    pub sampling: SamplingOverrides,
    /// Scheduling priority.
    pub priority: RequestPriority,
    /// Reuse this key's cached prompt prefix, and cache this prompt for it.
    pub cache_key: Option<CacheKey>,
    /// When the prompt is too long: drop the oldest non-system messages (or
    /// the oldest raw tokens) instead of failing.
    pub trim_prompt: bool,
    /// What the output must match (JSON schema or grammar); `None` = free text.
    pub constraint: Option<OutputConstraint>,
}

impl LlmRequest {
    /// A chat request.
    #[must_use]
    pub fn chat(messages: impl IntoIterator<Item = ChatMessage>) -> Self {
        Self::new(LlmPrompt::Chat(messages.into_iter().collect()))
    }

    /// A raw completion request.
    #[must_use]
    pub fn raw(text: impl Into<String>) -> Self {
        Self::new(LlmPrompt::Raw(text.into()))
    }

    /// A request for any prompt.
    #[must_use]
    pub fn new(prompt: LlmPrompt) -> Self {
        Self {
            prompt,
            sampling: SamplingOverrides::default(),
            priority: RequestPriority::Normal,
            cache_key: None,
            trim_prompt: false,
            constraint: None,
        }
    }

    /// Replace all sampling overrides.
    #[must_use]
    pub fn with_sampling(mut self, sampling: SamplingOverrides) -> Self {
        self.sampling = sampling;
        self
    }
    /// Most tokens to generate.
    #[must_use]
    pub fn with_max_tokens(mut self, n: u32) -> Self {
        self.sampling.max_tokens = Some(n);
        self
    }
    /// Sampling temperature (0 = greedy).
    #[must_use]
    pub fn with_temperature(mut self, t: f32) -> Self {
        self.sampling.temperature = Some(t);
        self
    }
    /// Random seed, for repeatable output.
    #[must_use]
    pub fn with_seed(mut self, seed: u32) -> Self {
        self.sampling.seed = Some(seed);
        self
    }
    /// Add stop strings (never emitted).
    #[must_use]
    pub fn with_stop(mut self, stops: impl IntoIterator<Item = impl Into<String>>) -> Self {
        self.sampling
            .stop
            .get_or_insert_with(Vec::new)
            .extend(stops.into_iter().map(Into::into));
        self
    }
    /// Scheduling priority.
    #[must_use]
    pub fn with_priority(mut self, priority: RequestPriority) -> Self {
        self.priority = priority;
        self
    }
    /// Prefix-cache key (normally the NPC entity).
    #[must_use]
    pub fn with_cache_key(mut self, key: impl Into<CacheKey>) -> Self {
        self.cache_key = Some(key.into());
        self
    }
    /// Trim an over-long prompt instead of failing.
    #[must_use]
    pub fn with_trim_prompt(mut self, trim: bool) -> Self {
        self.trim_prompt = trim;
        self
    }
    /// Generate JSON matching this JSON Schema; [`LlmCompleted::output`](crate::events::LlmCompleted::output)
    /// then holds the parsed value. Give `max_tokens` room for the whole
    /// value (bound strings with `maxLength`): generation cut short is an
    /// [`OutputError::Unfinished`](crate::constraint::OutputError::Unfinished).
    /// Generation ends when the value is complete, even with `ignore_eos`.
    #[must_use]
    pub fn with_json_schema(mut self, schema: &serde_json::Value) -> Self {
        self.constraint = Some(OutputConstraint::JsonSchema(schema.to_string()));
        self
    }
    /// Generate JSON of the Rust type `T` (its `schemars` schema); read it
    /// back with [`LlmCompleted::output_as`](crate::events::LlmCompleted::output_as).
    #[must_use]
    pub fn with_output<T: schemars::JsonSchema>(mut self) -> Self {
        self.constraint = Some(OutputConstraint::json_for::<T>());
        self
    }
    /// Generate text matching a GBNF grammar (llama.cpp's format, start rule `root`).
    #[must_use]
    pub fn with_grammar(mut self, gbnf: impl Into<String>) -> Self {
        self.constraint = Some(OutputConstraint::Gbnf(gbnf.into()));
        self
    }
    /// Any output constraint (also llguidance Lark grammars).
    #[must_use]
    pub fn with_constraint(mut self, constraint: OutputConstraint) -> Self {
        self.constraint = Some(constraint);
        self
    }
}

/// Where a request is.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum RequestState {
    /// Waiting for a slot or for the model.
    #[default]
    Queued,
    /// Generating.
    Running,
    /// Finished.
    Completed(FinishReason),
    /// Cancelled before finishing.
    Cancelled,
    /// Failed; the error says why.
    Failed(LlmError),
}

/// Comes with every [`LlmRequest`] (queued, no text) and is kept current by
/// the plugin; reset when a new request replaces the entity's previous one.
#[derive(Component, Debug, Clone, PartialEq, Default)]
pub struct LlmRequestStatus {
    /// Where the request is.
    pub state: RequestState,
    /// Text generated so far (all of it once completed).
    pub text: String,
    /// Figures, filled in as they become known.
    pub stats: RequestStats,
}

impl LlmRequestStatus {
    /// Whether the request has ended (completed, cancelled or failed).
    #[must_use]
    pub fn is_finished(&self) -> bool {
        !matches!(self.state, RequestState::Queued | RequestState::Running)
    }
}
