//! Everything the plugin tells a game, and the messages a game sends it.
//!
//! # Request lifecycle (per entity)
//! Each is both an [`EntityEvent`] (observe it with `On<E>`, globally or on
//! the entity) and a [`Message`] (read it with `MessageReader<E>`), sent from
//! [`NpcLlmSystems::Receive`](crate::NpcLlmSystems::Receive) in `PreUpdate`:
//!
//! | event | when | must a game handle it? |
//! |---|---|---|
//! | [`LlmStarted`] | the worker began the request (prompt decoded next) | optional |
//! | [`LlmToken`] | a new piece of text, in order | to stream text (speech bubbles) |
//! | [`LlmCompleted`] | exactly once on success, with the full text and stats | **yes** |
//! | [`LlmFailed`] | exactly once on failure, with a typed [`LlmError`] | **yes**: show a fallback line |
//! | [`LlmCancelled`] | after a cancel by message or by removing [`LlmRequest`](crate::request::LlmRequest) | optional |
//!
//! A request ends with exactly one of completed, failed or cancelled. A
//! despawned entity gets no events. The entity's
//! [`LlmRequestStatus`](crate::request::LlmRequestStatus) tells the same
//! story for games that prefer polling.
//!
//! # Model lifecycle (messages)
//! [`ModelLoading`] (with progress), then [`ModelLoaded`] or
//! [`ModelLoadFailed`]; [`ModelUnloaded`] when a model goes away. The
//! [`LlmModelState`](crate::LlmModelState) resource holds the current state.
//!
//! # Messages a game sends
//! [`LoadModel`] (load or switch), [`UnloadModel`], [`CancelLlmRequest`].
//!
//! # NPC KV snapshots (messages)
//! [`SaveNpcKv`] asks for NPCs' cached KV (answered by one [`NpcKvSaved`]);
//! [`RestoreNpcKv`] gives snapshots back after a load (answered by one
//! [`NpcKvRestored`]). A snapshot that does not fit this engine is refused
//! with a typed [`KvSnapshotError`]: that NPC reads its prompt again.

use crate::constraint::OutputError;
use bevy::prelude::{Entity, EntityEvent, Message};

use crate::engine::kv_snapshot::{KvSnapshotError, NpcKvSnapshot};
use crate::errors::{LlmError, ModelLoadError};
use crate::request::CacheKey;
use crate::request::{FinishReason, RequestStats};

/// The worker started a request.
#[derive(EntityEvent, Message, Debug, Clone, PartialEq)]
pub struct LlmStarted {
    /// The requesting entity.
    pub entity: Entity,
    /// Prompt length in tokens (0 from a remote server, which reports it
    /// only at the end: see [`RequestStats::prompt_tokens`]).
    pub prompt_tokens: usize,
    /// Prompt tokens reused from the prefix cache (0 from a remote server).
    pub reused_prefix_tokens: usize,
}

/// A new piece of generated text (whole UTF-8 characters, never part of a stop string).
#[derive(EntityEvent, Message, Debug, Clone, PartialEq)]
pub struct LlmToken {
    /// The requesting entity.
    pub entity: Entity,
    /// The new text.
    pub text: String,
}

/// A request finished. `text` equals all [`LlmToken`] texts joined.
#[derive(EntityEvent, Message, Debug, Clone, PartialEq)]
pub struct LlmCompleted {
    /// The requesting entity.
    pub entity: Entity,
    /// The whole generated text.
    pub text: String,
    /// Why generation ended.
    pub finish: FinishReason,
    /// Figures.
    pub stats: RequestStats,
    /// For a JSON-constrained request ([`LlmRequest::with_json_schema`](crate::request::LlmRequest::with_json_schema),
    /// [`with_output`](crate::request::LlmRequest::with_output)): the parsed
    /// value, or why there is none. `None` for free text and grammars.
    pub output: Option<Result<serde_json::Value, OutputError>>,
}

impl LlmCompleted {
    /// The JSON output as `T` (the type given to
    /// [`LlmRequest::with_output`](crate::request::LlmRequest::with_output)).
    ///
    /// # Errors
    /// Why the output is not a `T`: unfinished, not JSON, the wrong shape,
    /// or [`OutputError::NotRequested`] for a request without a JSON schema.
    pub fn output_as<T: serde::de::DeserializeOwned>(&self) -> Result<T, OutputError> {
        match &self.output {
            Some(Ok(v)) => crate::constraint::value_as(v),
            Some(Err(e)) => Err(e.clone()),
            None => Err(OutputError::NotRequested),
        }
    }
}

/// A request failed.
#[derive(EntityEvent, Message, Debug, Clone, PartialEq)]
pub struct LlmFailed {
    /// The requesting entity.
    pub entity: Entity,
    /// Why.
    pub error: LlmError,
}

/// A request was cancelled.
#[derive(EntityEvent, Message, Debug, Clone, PartialEq)]
pub struct LlmCancelled {
    /// The requesting entity.
    pub entity: Entity,
    /// Text generated before the cancel took effect.
    pub partial_text: String,
}

/// Load (or switch to) a model. Requests that are running on the old model
/// fail with [`LlmError::ModelUnloaded`]; waiting ones are served by the new one.
#[derive(Message, Debug, Clone, PartialEq, Eq, Default)]
pub struct LoadModel {
    /// Registry id, or `None` for the settings' model (`"auto"` allowed).
    pub model: Option<String>,
}

/// Unload the current model; running requests fail with
/// [`LlmError::ModelUnloaded`], waiting ones wait for the next load (the
/// next new request starts one). Sent while a load is under way, that load
/// finishes first and its model is then unloaded: [`ModelLoaded`] and
/// [`ModelUnloaded`] both arrive, and the state ends `Unloaded`.
#[derive(Message, Debug, Clone, PartialEq, Eq, Default)]
pub struct UnloadModel;

/// Cancel the running request of an entity (within one decode step).
#[derive(Message, Debug, Clone, PartialEq, Eq)]
pub struct CancelLlmRequest {
    /// The requesting entity.
    pub entity: Entity,
}

pub use crate::engine::protocol::LoadPhase;

/// Progress of a model load, `progress` in `0.0..=1.0` per phase.
#[derive(Message, Debug, Clone, PartialEq)]
pub struct ModelLoading {
    /// Registry id.
    pub model: String,
    /// Phase.
    pub phase: LoadPhase,
    /// Progress of the phase.
    pub progress: f32,
}

/// A model is loaded and serving.
#[derive(Message, Debug, Clone, PartialEq)]
pub struct ModelLoaded {
    /// What was loaded.
    pub info: crate::LoadedModelInfo,
}

/// A model failed to load; the previous model (if any) is gone too.
#[derive(Message, Debug, Clone, PartialEq)]
pub struct ModelLoadFailed {
    /// Registry id.
    pub model: String,
    /// Why.
    pub error: ModelLoadError,
}

/// A model was unloaded.
#[derive(Message, Debug, Clone, PartialEq)]
pub struct ModelUnloaded {
    /// Registry id.
    pub model: String,
}

// ---------------------------------------------------------------------------
// Dialogue (NpcDialoguePlugin). Each is a Message and an EntityEvent on the
// conversation entity. Dialogue UIs handle `ConversationLineToken` (stream a
// speech bubble), `ConversationLineFinished` (the cleaned line to show and
// log) and `ConversationEnded` (close the bubble / free the NPCs). Games with a
// player chat also handle `PlayerLineUnanswered` (tell the player the NPC did
// not answer).
// ---------------------------------------------------------------------------

/// A conversation began.
#[derive(EntityEvent, Message, Debug, Clone, PartialEq)]
pub struct ConversationStarted {
    /// The conversation entity.
    pub entity: Entity,
    /// Participants' names.
    pub names: Vec<String>,
}

/// A piece of a line as it streams (raw model text; the cleaned line comes
/// with [`ConversationLineFinished`]).
#[derive(EntityEvent, Message, Debug, Clone, PartialEq)]
pub struct ConversationLineToken {
    /// The conversation entity.
    pub entity: Entity,
    /// The speaking NPC.
    pub speaker: Entity,
    /// The new text.
    pub text: String,
    /// Which attempt at the line this text belongs to: 0 first, then 1, …
    /// after an empty or degenerate attempt was thrown away. When it changes,
    /// the line restarted: clear what the earlier attempt showed.
    pub attempt: u32,
}

/// A line is final (cleaned, bounded).
#[derive(EntityEvent, Message, Debug, Clone, PartialEq)]
pub struct ConversationLineFinished {
    /// The conversation entity.
    pub entity: Entity,
    /// The speaking NPC.
    pub speaker: Entity,
    /// Speaker's name.
    pub name: String,
    /// The line.
    pub text: String,
    /// The first output was empty/degenerate and was retried.
    pub retried: bool,
    /// The retry failed too: this is a neutral fallback line.
    pub fallback: bool,
    /// The action the NPC chose with the line (JSON of its
    /// [`NpcActions`](crate::dialogue::NpcActions) type), `None` for no
    /// action. [`NpcActionPlugin`](crate::dialogue::NpcActionPlugin) turns it
    /// into a typed [`NpcAction`](crate::dialogue::NpcAction).
    pub action: Option<serde_json::Value>,
}

/// A conversation ended (memories are written). Sent exactly once per
/// conversation. The conversation entity is despawned in the next frame's
/// [`NpcLlmSystems::Dialogue`](crate::NpcLlmSystems::Dialogue): keep what you
/// need from this event (it carries the whole transcript).
#[derive(EntityEvent, Message, Debug, Clone, PartialEq)]
pub struct ConversationEnded {
    /// The conversation entity (despawned next frame).
    pub entity: Entity,
    /// Lines in the transcript (NPC and player lines).
    pub lines: usize,
    /// Participants' names (the player last in a player conversation).
    pub names: Vec<String>,
    /// The whole transcript.
    pub transcript: Vec<crate::dialogue::TranscriptLine>,
    /// Player lines at the end of the transcript that no NPC line answered
    /// (the player left, the NPC went away or a time-out ended it); each was
    /// also reported with a [`PlayerLineUnanswered`].
    pub unanswered_player_lines: usize,
}

/// Why a player line got no NPC reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnansweredReason {
    /// The NPC is talking with other NPCs.
    Busy,
    /// The player's conversation with this NPC is already ending (writing
    /// memories); say it again once [`ConversationEnded`] arrived.
    ConversationEnding,
    /// The conversation ended before the NPC answered (the player left, the
    /// NPC went away or a time-out ended it).
    ConversationEnded,
}

/// A player line that will get no NPC reply, with the reason. Together with
/// [`ConversationLineFinished`], every [`PlayerSays`] with non-empty text ends
/// in an answer or in this event: no player line is silently lost.
#[derive(EntityEvent, Message, Debug, Clone, PartialEq)]
pub struct PlayerLineUnanswered {
    /// The NPC the player spoke to.
    pub entity: Entity,
    /// The conversation (possibly an NPC-only one, for [`UnansweredReason::Busy`]).
    pub conversation: Entity,
    /// The player's line (sanitized).
    pub text: String,
    /// Why.
    pub reason: UnansweredReason,
}

/// Start a conversation between NPCs (entities with a
/// [`Persona`](crate::dialogue::Persona)). Ignored, with a warning, when a
/// participant is already talking or the pair is cooling down.
#[derive(Message, Debug, Clone, PartialEq)]
pub struct StartConversation {
    /// NPCs, in speaking order (the first greets).
    pub participants: Vec<Entity>,
    /// Optional topic.
    pub topic: Option<String>,
}

/// The player says something to an NPC (starts or continues their
/// conversation). The text is untrusted: control tokens are removed and it
/// is length-limited.
#[derive(Message, Debug, Clone, PartialEq)]
pub struct PlayerSays {
    /// The NPC spoken to.
    pub npc: Entity,
    /// What the player typed.
    pub text: String,
}

/// The player walks away from an NPC: a line the NPC is still generating is
/// cancelled (it is not shown), player lines it had not answered yet are
/// reported with [`PlayerLineUnanswered`], then the NPC remembers the
/// conversation and it ends ([`ConversationEnded`]).
#[derive(Message, Debug, Clone, PartialEq)]
pub struct PlayerLeaves {
    /// The NPC.
    pub npc: Entity,
}

/// Ask for these keys' cached KV (an NPC's prompt prefix, kept under its
/// [`CacheKey`]) as snapshots for a save; answered by one [`NpcKvSaved`].
/// A key whose line is being generated answers [`KvSnapshotError::Busy`].
#[derive(Message, Debug, Clone, PartialEq, Eq)]
pub struct SaveNpcKv {
    /// The NPCs' cache keys.
    pub keys: Vec<CacheKey>,
}

/// The snapshots asked for by a [`SaveNpcKv`], in its order.
#[derive(Message, Debug, Clone)]
pub struct NpcKvSaved {
    /// Each key's snapshot, or why it has none.
    pub snapshots: Vec<(CacheKey, Result<NpcKvSnapshot, KvSnapshotError>)>,
}

/// Put snapshots back (after loading a save) as their keys' cached
/// prefixes: each NPC's next request under that key reuses its KV instead
/// of reading its prompt. Each snapshot is checked (model, llama.cpp
/// build, KV layout, checksums) before llama.cpp sees it; answered by one
/// [`NpcKvRestored`].
#[derive(Message, Debug, Clone)]
pub struct RestoreNpcKv {
    /// The key each snapshot is restored under (the NPC's key in this play
    /// session) and the snapshot.
    pub snapshots: Vec<(CacheKey, NpcKvSnapshot)>,
}

/// What a [`RestoreNpcKv`] did, per key in its order: restored, or why not
/// (that NPC reads its prompt again; nothing else changes).
#[derive(Message, Debug, Clone, PartialEq, Eq)]
pub struct NpcKvRestored {
    /// Each key, restored or the typed reason it was not.
    pub results: Vec<(CacheKey, Result<(), KvSnapshotError>)>,
}
