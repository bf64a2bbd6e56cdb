//! Save and load personas, memories and conversations as RON.

use bevy::prelude::*;
use serde::{Deserialize, Serialize};

use super::data::*;
use super::systems::InConversation;
use crate::errors::DialogueError;
use crate::ron_util::parse_ron;

/// An NPC's dialogue state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NpcSnapshot {
    /// Who.
    pub persona: Persona,
    /// What it remembers.
    pub memory: NpcMemory,
}

/// A conversation's state (participants by persona name).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConversationSnapshot {
    /// Names, in speaking order (the player last, when present).
    pub names: Vec<String>,
    /// Whether the player takes part.
    pub with_player: bool,
    /// Topic.
    pub topic: Option<String>,
    /// Transcript.
    pub lines: Vec<TranscriptLine>,
    /// Who speaks next.
    pub next_speaker: usize,
    /// State.
    pub state: ConversationState,
    /// Bounds.
    pub limits: ConversationLimits,
    /// Retried lines.
    pub retries: u32,
    /// Fallback lines.
    pub fallbacks: u32,
}

/// Everything the dialogue system knows, in a stable order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct DialogueSnapshot {
    /// NPCs, sorted by name.
    pub npcs: Vec<NpcSnapshot>,
    /// Conversations not yet ended, sorted by names.
    pub conversations: Vec<ConversationSnapshot>,
}

/// Take a snapshot of every NPC (entity with a [`Persona`]) and every
/// conversation that has not ended.
pub fn snapshot(world: &mut World) -> DialogueSnapshot {
    let mut npcs: Vec<NpcSnapshot> = world
        .query::<(&Persona, Option<&NpcMemory>)>()
        .iter(world)
        .map(|(p, m)| NpcSnapshot {
            persona: p.clone(),
            memory: m.cloned().unwrap_or_default(),
        })
        .collect();
    npcs.sort_by(|a, b| a.persona.name.cmp(&b.persona.name));
    let mut conversations: Vec<ConversationSnapshot> = world
        .query::<&Conversation>()
        .iter(world)
        .filter(|c| c.state != ConversationState::Ended)
        .map(|c| ConversationSnapshot {
            names: c.names.clone(),
            with_player: c.with_player,
            topic: c.topic.clone(),
            lines: c.lines.clone(),
            next_speaker: c.next_speaker,
            state: c.state,
            limits: c.limits.clone(),
            retries: c.retries,
            fallbacks: c.fallbacks,
        })
        .collect();
    conversations.sort_by(|a, b| a.names.cmp(&b.names));
    DialogueSnapshot {
        npcs,
        conversations,
    }
}

/// Save as RON text.
///
/// # Errors
/// [`DialogueError::Invalid`] if serialization fails.
pub fn save_dialogue(world: &mut World) -> Result<String, DialogueError> {
    ron::ser::to_string_pretty(&snapshot(world), ron::ser::PrettyConfig::default())
        .map_err(|e| DialogueError::Invalid(e.to_string()))
}

/// Restore from RON text: NPCs are matched by persona name (spawned when
/// missing, their persona and memory replaced when present); conversations
/// are replaced and resume where they were (each NPC's prefix cache is
/// simply rebuilt by its next request).
///
/// # Errors
/// [`DialogueError::Parse`] for bad RON, [`DialogueError::Invalid`] for a
/// conversation naming an unknown NPC.
pub fn load_dialogue(world: &mut World, text: &str) -> Result<(), DialogueError> {
    let snap: DialogueSnapshot = parse_ron(text).map_err(|f| DialogueError::Parse {
        origin: "dialogue save".into(),
        line: f.line,
        column: f.column,
        message: f.message,
    })?;
    // Check before changing anything.
    for c in &snap.conversations {
        let npc_names = if c.with_player {
            &c.names[..c.names.len().saturating_sub(1)]
        } else {
            &c.names[..]
        };
        for n in npc_names {
            if !snap.npcs.iter().any(|s| &s.persona.name == n) {
                return Err(DialogueError::Invalid(format!(
                    "a conversation names `{n}`, who is not among the saved NPCs"
                )));
            }
        }
        if c.next_speaker >= c.names.len().max(1) {
            return Err(DialogueError::Invalid("next_speaker out of range".into()));
        }
    }
    let old: Vec<Entity> = world
        .query_filtered::<Entity, With<Conversation>>()
        .iter(world)
        .collect();
    for e in old {
        world.despawn(e);
    }
    let existing: Vec<(Entity, String)> = world
        .query::<(Entity, &Persona)>()
        .iter(world)
        .map(|(e, p)| (e, p.name.clone()))
        .collect();
    let mut by_name = std::collections::HashMap::new();
    for npc in snap.npcs {
        let name = npc.persona.name.clone();
        let e = match existing.iter().find(|(_, n)| *n == name) {
            Some((e, _)) => {
                world
                    .entity_mut(*e)
                    .insert((npc.persona, npc.memory))
                    .remove::<InConversation>();
                *e
            }
            None => world.spawn((npc.persona, npc.memory)).id(),
        };
        by_name.insert(name, e);
    }
    for c in snap.conversations {
        let npc_count = if c.with_player {
            c.names.len() - 1
        } else {
            c.names.len()
        };
        let participants: Vec<Entity> = c.names[..npc_count].iter().map(|n| by_name[n]).collect();
        let conv = world
            .spawn((
                Name::new(format!("Conversation: {}", c.names.join(", "))),
                Conversation {
                    participants: participants.clone(),
                    names: c.names,
                    with_player: c.with_player,
                    topic: c.topic,
                    lines: c.lines,
                    next_speaker: c.next_speaker,
                    state: c.state,
                    limits: c.limits,
                    retries: c.retries,
                    fallbacks: c.fallbacks,
                },
            ))
            .id();
        for p in participants {
            world.entity_mut(p).insert(InConversation(conv));
        }
    }
    Ok(())
}
