//! NPC conversations on top of the engine: personas, NPC-to-NPC and
//! player-to-NPC conversations (start / continue / leave), memories of past
//! talks, stop rules so an NPC never speaks another's lines, and save/load.
//!
//! Add [`NpcDialoguePlugin`] after [`NpcLlmPlugin`](crate::NpcLlmPlugin), give
//! NPCs a [`Persona`], then send [`StartConversation`]
//! or [`PlayerSays`]. Each turn is one engine request
//! keyed by the speaking NPC, so its prompt prefix stays cached; several
//! conversations run at once and are batched by the engine.
//!
//! ```no_run
//! use bevy::prelude::*;
//! use bevy_npc_llm::prelude::*;
//!
//! fn setup(mut commands: Commands, mut start: MessageWriter<StartConversation>) {
//!     let mira = commands.spawn(Persona::new("Mira", "The village baker.")).id();
//!     let brom = commands.spawn(Persona::new("Brom", "The blacksmith.")).id();
//!     start.write(StartConversation { participants: vec![mira, brom], topic: Some("the harvest fair".into()) });
//! }
//!
//! fn show(mut lines: MessageReader<ConversationLineFinished>) {
//!     for l in lines.read() {
//!         println!("{}: {}", l.name, l.text);
//!     }
//! }
//! ```

mod actions;
mod data;
mod kv_save;
mod machine;
mod prompt;
mod save;
mod say_stream;
mod step;
mod systems;

use bevy::prelude::*;

pub use actions::{NpcAction, NpcActionPlugin, NpcActions, plain_speech_pattern};
pub use data::{
    Conversation, ConversationLimits, ConversationState, MemoryEntry, MemoryLimits, NpcMemory,
    Persona, TranscriptLine,
};
pub use kv_save::{NpcKvArchive, npc_cache_keys};
pub use machine::ConversationTimeouts;
pub use prompt::{
    KeywordRanker, LinePrompt, MemoryQuery, MemoryRanker, clean_line, is_degenerate, line_prompt,
    relevant_memories, sanitize_memory_text, sanitize_player_text, summary_prompt,
};
pub use save::{
    ConversationSnapshot, DialogueSnapshot, MAX_SAVED_COUNT, MAX_SAVED_ITEMS,
    MAX_SAVED_LINE_TOKENS, MAX_SAVED_LINES, MAX_SAVED_TEXT_CHARS, MAX_SAVED_TIME, NpcSnapshot,
    load_dialogue, parse_dialogue, save_dialogue, snapshot, validate_snapshot,
};
pub use systems::{DialogueCooldowns, InConversation};

use crate::NpcLlmSystems;
use crate::events::*;

/// Knobs of the dialogue system.
#[derive(Resource)]
pub struct DialogueSettings {
    /// Bounds for new conversations.
    pub limits: ConversationLimits,
    /// Seconds before the same pair may talk again.
    pub cooldown_secs: f64,
    /// Memories put in a prompt at most.
    pub max_memories: usize,
    /// How memories are ranked.
    pub ranker: Box<dyn MemoryRanker>,
    /// The player's name in transcripts.
    pub player_name: String,
    /// Longest player message kept, in characters.
    pub max_player_chars: usize,
    /// Base seed (each line derives its own).
    pub seed: u32,
    /// How long a conversation waits in each state before it moves on.
    pub timeouts: ConversationTimeouts,
    /// How much each NPC remembers (older, less important memories go first).
    pub memory_limits: MemoryLimits,
    /// Lines are plain speech by construction (on by default): whole
    /// sentences, no stage directions in parentheses or asterisks, no
    /// `Name:` labels, no newlines (see [`plain_speech_pattern`]). Off: any
    /// text up to the line's length.
    pub plain_speech: bool,
    /// Most sentences in one line with `plain_speech`.
    pub max_sentences: u32,
}

impl Default for DialogueSettings {
    fn default() -> Self {
        Self {
            limits: ConversationLimits::default(),
            cooldown_secs: 60.0,
            max_memories: 3,
            ranker: Box::new(KeywordRanker),
            player_name: "Traveler".into(),
            max_player_chars: 300,
            seed: 1234,
            timeouts: ConversationTimeouts::default(),
            memory_limits: MemoryLimits::default(),
            plain_speech: true,
            max_sentences: 2,
        }
    }
}

/// Dialogue figures.
#[derive(Resource, Debug, Clone, Default, PartialEq, Eq)]
pub struct DialogueStats {
    /// Conversations started.
    pub started: u64,
    /// Conversations ended.
    pub ended: u64,
    /// Lines spoken.
    pub lines: u64,
    /// Lines retried after empty or degenerate output.
    pub retries: u64,
    /// Lines replaced by a neutral fallback.
    pub fallbacks: u64,
    /// Memories written.
    pub memories: u64,
    /// Player lines taken into conversations.
    pub player_lines: u64,
    /// Player lines that got no NPC reply ([`PlayerLineUnanswered`]).
    pub player_lines_unanswered: u64,
}

/// Conversations between NPCs and with the player. Needs
/// [`NpcLlmPlugin`](crate::NpcLlmPlugin). Its knobs are the
/// [`DialogueSettings`] resource: insert one before adding the plugin (it
/// keeps an existing one) or edit it at run time.
#[derive(Default, Debug, Clone, Copy)]
pub struct NpcDialoguePlugin;

impl Plugin for NpcDialoguePlugin {
    fn build(&self, app: &mut App) {
        app.init_resource::<DialogueStats>()
            .init_resource::<DialogueCooldowns>()
            .add_message::<ConversationStarted>()
            .add_message::<ConversationLineToken>()
            .add_message::<ConversationLineFinished>()
            .add_message::<ConversationEnded>()
            .add_message::<StartConversation>()
            .add_message::<PlayerSays>()
            .add_message::<PlayerLeaves>()
            .add_message::<PlayerLineUnanswered>()
            .add_systems(
                Update,
                (
                    systems::despawn_ended,
                    systems::route_inputs,
                    systems::route_engine,
                    step::step.before(actions::LineActions),
                )
                    .chain()
                    .in_set(NpcLlmSystems::Dialogue),
            );
        if !app.world().contains_resource::<DialogueSettings>() {
            app.insert_resource(DialogueSettings::default());
        }
    }
}
