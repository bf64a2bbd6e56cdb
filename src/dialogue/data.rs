//! Dialogue data: personas, memories, conversations and their transcripts.
//! All of it serializes to RON (see [`super::save`]).

use std::path::Path;

use bevy::prelude::{Component, Entity};
use serde::{Deserialize, Serialize};

use crate::errors::DialogueError;
use crate::ron_util::parse_ron;

/// Who an NPC is. Loadable from RON (`Vec<Persona>`).
#[derive(Component, Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Persona {
    /// Display name, also how others address the NPC. Unique per save.
    pub name: String,
    /// Identity and backstory, in a sentence or two.
    pub identity: String,
    /// Personality traits.
    #[serde(default)]
    pub traits: Vec<String>,
    /// How the NPC talks.
    #[serde(default)]
    pub speaking_style: String,
    /// What the NPC is doing or wants now.
    #[serde(default)]
    pub goal: String,
}

impl Persona {
    /// A persona with a name and identity.
    #[must_use]
    pub fn new(name: impl Into<String>, identity: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            identity: identity.into(),
            traits: Vec::new(),
            speaking_style: String::new(),
            goal: String::new(),
        }
    }

    /// Parse a RON list of personas.
    ///
    /// # Errors
    /// [`DialogueError::Parse`] with line, column and field.
    pub fn list_from_ron(text: &str, origin: &str) -> Result<Vec<Self>, DialogueError> {
        let list: Vec<Self> = parse_ron(text).map_err(|f| DialogueError::Parse {
            origin: origin.into(),
            line: f.line,
            column: f.column,
            message: f.message,
        })?;
        for p in &list {
            if p.name.trim().is_empty() {
                return Err(DialogueError::Invalid("a persona has an empty name".into()));
            }
        }
        Ok(list)
    }

    /// Load a RON list of personas from a file.
    ///
    /// # Errors
    /// [`DialogueError::Io`] or as [`Self::list_from_ron`].
    pub fn load_list(path: impl AsRef<Path>) -> Result<Vec<Self>, DialogueError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| DialogueError::Io {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        Self::list_from_ron(&text, &path.display().to_string())
    }
}

/// One remembered thing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MemoryEntry {
    /// Game time (seconds since start) it was stored.
    pub time: f64,
    /// One or two sentences, from the NPC's point of view.
    pub text: String,
    /// 0 (trivial) to 1 (life-changing).
    pub importance: f32,
    /// Names of the others involved.
    pub about: Vec<String>,
}

/// What an NPC remembers.
#[derive(Component, Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct NpcMemory {
    /// Entries, oldest first.
    pub entries: Vec<MemoryEntry>,
}

/// How much an NPC remembers: [`NpcMemory::remember`] keeps at most
/// `max_entries` entries and `max_chars` characters of text in all.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct MemoryLimits {
    /// Most entries kept.
    pub max_entries: usize,
    /// Most characters of text kept over all entries.
    pub max_chars: usize,
}

impl Default for MemoryLimits {
    fn default() -> Self {
        Self {
            max_entries: 32,
            max_chars: 4000,
        }
    }
}

impl NpcMemory {
    /// Add an entry, then forget until within `limits`. The policy: the
    /// entry with the lowest importance goes first; among equals, the oldest
    /// (by time, then by position). The new entry itself may go when it is
    /// the least important. Entries stay in time order.
    pub fn remember(&mut self, entry: MemoryEntry, limits: &MemoryLimits) {
        self.entries.push(entry);
        let chars = |es: &[MemoryEntry]| es.iter().map(|e| e.text.chars().count()).sum::<usize>();
        while !self.entries.is_empty()
            && (self.entries.len() > limits.max_entries || chars(&self.entries) > limits.max_chars)
        {
            let victim = self
                .entries
                .iter()
                .enumerate()
                .min_by(|(i, a), (j, b)| {
                    a.importance
                        .total_cmp(&b.importance)
                        .then(a.time.total_cmp(&b.time))
                        .then(i.cmp(j))
                })
                .map(|(i, _)| i)
                .unwrap_or(0);
            self.entries.remove(victim);
        }
    }
}

/// One line of a transcript.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TranscriptLine {
    /// Speaker's name.
    pub speaker: String,
    /// What was said (cleaned).
    pub text: String,
    /// Game time.
    pub time: f64,
}

/// Where a conversation is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ConversationState {
    /// Lines are being exchanged.
    Active,
    /// The next line is the last one (a closing line).
    Closing,
    /// A player conversation waiting for the player's next line.
    AwaitingPlayer,
    /// Over; participants are writing their memories.
    Summarizing,
    /// Over.
    Ended,
}

/// Bounds of a conversation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ConversationLimits {
    /// Most lines before the conversation ends (the last is a closing line).
    pub max_lines: usize,
    /// Most characters of one line after cleanup.
    pub max_line_chars: usize,
    /// Most tokens generated for one line.
    pub max_tokens: u32,
    /// Transcript lines kept in a prompt at most (older ones are dropped first).
    pub max_prompt_lines: usize,
}

impl Default for ConversationLimits {
    fn default() -> Self {
        Self {
            max_lines: 8,
            max_line_chars: 240,
            max_tokens: 48,
            max_prompt_lines: 16,
        }
    }
}

/// A conversation, on its own entity.
#[derive(Component, Debug, Clone, PartialEq)]
pub struct Conversation {
    /// NPC participants.
    pub participants: Vec<Entity>,
    /// Their names, same order; a player conversation adds the player's name last.
    pub names: Vec<String>,
    /// Whether the player takes part (as the last name).
    pub with_player: bool,
    /// What they talk about, if set.
    pub topic: Option<String>,
    /// The transcript.
    pub lines: Vec<TranscriptLine>,
    /// Index into `names` of who speaks next.
    pub next_speaker: usize,
    /// State.
    pub state: ConversationState,
    /// Bounds.
    pub limits: ConversationLimits,
    /// Lines retried (empty or degenerate output).
    pub retries: u32,
    /// Lines replaced by a neutral fallback after a failed retry.
    pub fallbacks: u32,
}

impl Conversation {
    /// A conversation that has not begun: no lines yet, the first name speaks
    /// first, [`ConversationState::Active`], default limits.
    #[must_use]
    pub fn new(
        participants: Vec<Entity>,
        names: Vec<String>,
        with_player: bool,
        topic: Option<String>,
    ) -> Self {
        Self {
            participants,
            names,
            with_player,
            topic,
            lines: Vec::new(),
            next_speaker: 0,
            state: ConversationState::Active,
            limits: ConversationLimits::default(),
            retries: 0,
            fallbacks: 0,
        }
    }

    /// The NPC entity of a speaker index (`None` for the player).
    #[must_use]
    pub fn npc(&self, speaker: usize) -> Option<Entity> {
        self.participants.get(speaker).copied()
    }
}
