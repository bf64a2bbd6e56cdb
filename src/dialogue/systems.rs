//! The systems that run conversations turn by turn on top of the engine.

use std::collections::HashMap;

use bevy::ecs::system::SystemParam;
use bevy::prelude::*;

use super::data::*;
use super::prompt::*;
use super::{DialogueSettings, DialogueStats};
use crate::events::*;
use crate::registry::{ModelRegistry, PromptFormat};
use crate::request::{LlmRequest, RequestPriority};
use crate::settings::{BackendChoice, LlmSettings, RemotePromptFormat};
use crate::{LlmEngineStats, LlmModelState};

/// Marks an NPC that is in a conversation (its entity).
#[derive(Component, Debug, Clone, Copy, PartialEq, Eq)]
pub struct InConversation(pub Entity);

/// Bookkeeping of a conversation that is not saved.
#[derive(Component, Debug, Clone, Default)]
pub(crate) struct ConversationRuntime {
    /// The request entity of the line being generated.
    pending: Option<Entity>,
    /// Summary requests still running, with their participant index.
    summaries: Vec<(Entity, usize)>,
    summaries_started: bool,
    /// Game time the conversation started (memories are ranked as of then,
    /// so every turn's prompt keeps the same prefix for the cache).
    started_at: f64,
    seed: u32,
}

/// A request entity producing a line.
#[derive(Component, Debug, Clone, Copy)]
pub(crate) struct LineRequest {
    conversation: Entity,
    speaker: usize,
    attempt: u32,
}

/// A request entity producing a memory.
#[derive(Component, Debug, Clone, Copy)]
pub(crate) struct SummaryRequest {
    conversation: Entity,
    who: usize,
}

/// When pairs of NPCs may talk again (game time).
#[derive(Resource, Debug, Default, Clone)]
pub struct DialogueCooldowns(pub HashMap<(Entity, Entity), f64>);

impl DialogueCooldowns {
    fn key(a: Entity, b: Entity) -> (Entity, Entity) {
        if a < b { (a, b) } else { (b, a) }
    }
    /// Whether `a` and `b` may start a conversation at `now`.
    #[must_use]
    pub fn ready(&self, a: Entity, b: Entity, now: f64) -> bool {
        self.0
            .get(&Self::key(a, b))
            .is_none_or(|until| now >= *until)
    }
}

/// Neutral lines used when the model gives nothing usable twice.
const FALLBACKS: [&str; 4] = [
    "Hmm, let me think about that.",
    "Is that so? Tell me more.",
    "Well, that is something to ponder.",
    "I see what you mean.",
];
const FALLBACK_CLOSING: &str = "Well, I must be going. Goodbye.";

fn now(time: &Time) -> f64 {
    time.elapsed_secs_f64()
}

/// Whether the model that serves requests uses plain completion prompts.
fn completion_format(
    registry: &ModelRegistry,
    settings: &LlmSettings,
    state: &LlmModelState,
    stats: &LlmEngineStats,
) -> bool {
    let remote = match state {
        LlmModelState::Ready(info) => info.remote.is_some(),
        _ => stats.remote_server.is_some() || settings.backend == BackendChoice::Remote,
    };
    if remote {
        return settings.remote.prompt_format == RemotePromptFormat::Completion;
    }
    let id = match state {
        LlmModelState::Ready(info) => Some(info.model.clone()),
        LlmModelState::Loading { model, .. } => Some(model.clone()),
        _ => stats.serving_model.clone(),
    };
    let entry = id
        .as_deref()
        .and_then(|id| registry.get(id))
        .or_else(|| registry.select(&settings.model).ok());
    matches!(
        entry.map(|e| &e.prompt_format),
        Some(PromptFormat::Completion)
    )
}

/// What the dialogue systems read about the engine.
#[derive(SystemParam)]
pub(crate) struct EngineView<'w> {
    registry: Res<'w, ModelRegistry>,
    settings: Res<'w, LlmSettings>,
    state: Res<'w, LlmModelState>,
    stats: Res<'w, LlmEngineStats>,
}

impl EngineView<'_> {
    fn completion(&self) -> bool {
        completion_format(&self.registry, &self.settings, &self.state, &self.stats)
    }
    fn budget_chars(&self, max_tokens: u32) -> usize {
        (self.settings.context_per_sequence as usize)
            .saturating_sub(max_tokens as usize + 96)
            .saturating_mul(3)
    }
}

/// Start NPC conversations and player conversations.
#[allow(clippy::too_many_arguments)]
pub(crate) fn start(
    mut commands: Commands,
    time: Res<Time>,
    settings: Res<DialogueSettings>,
    cooldowns: Res<DialogueCooldowns>,
    mut stats: ResMut<DialogueStats>,
    mut starts: MessageReader<StartConversation>,
    mut says: MessageReader<PlayerSays>,
    mut leaves: MessageReader<PlayerLeaves>,
    npcs: Query<(&Persona, Option<&InConversation>)>,
    mut convs: Query<&mut Conversation>,
    mut started: MessageWriter<ConversationStarted>,
) {
    let t = now(&time);
    for s in starts.read() {
        let mut names = Vec::new();
        let mut ok = s.participants.len() >= 2;
        for (i, e) in s.participants.iter().enumerate() {
            match npcs.get(*e) {
                Ok((p, None)) => names.push(p.name.clone()),
                Ok((p, Some(_))) => {
                    warn!("bevy_npc_llm: {} is already in a conversation", p.name);
                    ok = false;
                }
                Err(_) => {
                    warn!("bevy_npc_llm: participant {e} has no Persona");
                    ok = false;
                }
            }
            for other in &s.participants[i + 1..] {
                if !cooldowns.ready(*e, *other, t) {
                    ok = false;
                }
            }
        }
        if !ok {
            continue;
        }
        let conv = spawn_conversation(
            &mut commands,
            s.participants.clone(),
            names.clone(),
            false,
            s.topic.clone(),
            &settings,
            t,
            stats.started as u32,
        );
        stats.started += 1;
        let e = ConversationStarted {
            entity: conv,
            names,
        };
        started.write(e.clone());
        commands.trigger(e);
    }
    for s in says.read() {
        let Ok((persona, in_conv)) = npcs.get(s.npc) else {
            warn!(
                "bevy_npc_llm: the player talks to {} which has no Persona",
                s.npc
            );
            continue;
        };
        let text = sanitize_player_text(&s.text, settings.max_player_chars);
        if text.is_empty() {
            continue;
        }
        let line = TranscriptLine {
            speaker: settings.player_name.clone(),
            text,
            time: t,
        };
        // Continue the player's conversation with this NPC, or start one.
        if let Some(c) = in_conv
            && let Ok(mut conv) = convs.get_mut(c.0)
            && conv.with_player
            && conv.state != ConversationState::Ended
            && conv.state != ConversationState::Summarizing
        {
            conv.lines.push(line);
            conv.next_speaker = 0;
            conv.state = ConversationState::Active;
            continue;
        }
        if in_conv.is_some() {
            warn!(
                "bevy_npc_llm: {} is busy talking with someone else",
                persona.name
            );
            continue;
        }
        let names = vec![persona.name.clone(), settings.player_name.clone()];
        let conv = spawn_conversation(
            &mut commands,
            vec![s.npc],
            names.clone(),
            true,
            None,
            &settings,
            t,
            stats.started as u32,
        );
        stats.started += 1;
        commands
            .entity(conv)
            .entry::<Conversation>()
            .and_modify(move |mut c| {
                c.lines.push(line);
            });
        let e = ConversationStarted {
            entity: conv,
            names,
        };
        started.write(e.clone());
        commands.trigger(e);
    }
    for l in leaves.read() {
        if let Ok((_, Some(c))) = npcs.get(l.npc)
            && let Ok(mut conv) = convs.get_mut(c.0)
            && conv.with_player
        {
            conv.state = ConversationState::Summarizing;
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn spawn_conversation(
    commands: &mut Commands,
    participants: Vec<Entity>,
    names: Vec<String>,
    with_player: bool,
    topic: Option<String>,
    settings: &DialogueSettings,
    t: f64,
    seed: u32,
) -> Entity {
    let conv = commands
        .spawn((
            Name::new(format!("Conversation: {}", names.join(", "))),
            Conversation {
                participants: participants.clone(),
                names,
                with_player,
                topic,
                lines: Vec::new(),
                next_speaker: 0,
                state: ConversationState::Active,
                limits: settings.limits.clone(),
                retries: 0,
                fallbacks: 0,
            },
            ConversationRuntime {
                started_at: t,
                seed: settings.seed.wrapping_add(seed.wrapping_mul(7919)),
                ..Default::default()
            },
        ))
        .id();
    for p in participants {
        commands.entity(p).insert(InConversation(conv));
    }
    conv
}

/// Ask the engine for the next line (or the memories) of each conversation.
pub(crate) fn drive(
    mut commands: Commands,
    time: Res<Time>,
    settings: Res<DialogueSettings>,
    engine: EngineView,
    mut convs: Query<(Entity, &mut Conversation, Option<&mut ConversationRuntime>)>,
    npcs: Query<(&Persona, Option<&NpcMemory>)>,
) {
    let completion = engine.completion();
    for (ce, mut conv, runtime) in &mut convs {
        let Some(mut rt) = runtime else {
            // Restored from a save: fresh bookkeeping.
            commands.entity(ce).insert(ConversationRuntime {
                started_at: now(&time),
                seed: settings.seed,
                ..Default::default()
            });
            continue;
        };
        if rt.pending.is_some() {
            continue;
        }
        match conv.state {
            ConversationState::Active | ConversationState::Closing => {
                if conv.with_player && conv.next_speaker != 0 {
                    conv.state = ConversationState::AwaitingPlayer;
                    continue;
                }
                let speaker = conv.next_speaker;
                let Some(npc) = conv.npc(speaker) else {
                    continue;
                };
                let Ok((persona, memory)) = npcs.get(npc) else {
                    conv.state = ConversationState::Summarizing;
                    continue;
                };
                let req = line_request(
                    &conv, &rt, speaker, persona, memory, &settings, &engine, completion, 0,
                );
                let e = commands
                    .spawn((
                        req.with_cache_key(npc),
                        LineRequest {
                            conversation: ce,
                            speaker,
                            attempt: 0,
                        },
                    ))
                    .id();
                rt.pending = Some(e);
            }
            ConversationState::Summarizing if !rt.summaries_started => {
                rt.summaries_started = true;
                if conv.lines.is_empty() {
                    continue;
                }
                for who in 0..conv.participants.len() {
                    let req = LlmRequest::new(summary_prompt(&conv, who, completion))
                        .with_max_tokens(60)
                        .with_temperature(0.3)
                        .with_seed(rt.seed)
                        .with_trim_prompt(true)
                        .with_stop(if completion {
                            vec!["\n".to_string()]
                        } else {
                            vec![]
                        })
                        .with_priority(RequestPriority::Background);
                    let e = commands
                        .spawn((
                            req,
                            SummaryRequest {
                                conversation: ce,
                                who,
                            },
                        ))
                        .id();
                    rt.summaries.push((e, who));
                }
            }
            _ => {}
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn line_request(
    conv: &Conversation,
    rt: &ConversationRuntime,
    speaker: usize,
    persona: &Persona,
    memory: Option<&NpcMemory>,
    settings: &DialogueSettings,
    engine: &EngineView,
    completion: bool,
    attempt: u32,
) -> LlmRequest {
    let partners: Vec<String> = conv
        .names
        .iter()
        .filter(|n| **n != conv.names[speaker])
        .cloned()
        .collect();
    let query = MemoryQuery {
        now: rt.started_at,
        partners: &partners,
        topic: conv.topic.as_deref(),
    };
    let empty = NpcMemory::default();
    let memories = relevant_memories(
        memory.unwrap_or(&empty),
        settings.ranker.as_ref(),
        &query,
        settings.max_memories,
    );
    let lp = line_prompt(
        conv,
        speaker,
        persona,
        &memories,
        completion,
        engine.budget_chars(conv.limits.max_tokens),
    );
    LlmRequest::new(lp.prompt)
        .with_stop(lp.stops)
        .with_max_tokens(conv.limits.max_tokens)
        .with_seed(
            rt.seed
                .wrapping_add(conv.lines.len() as u32 * 31 + attempt * 1_000_003),
        )
        .with_trim_prompt(true)
        .with_priority(if conv.with_player {
            RequestPriority::High
        } else {
            RequestPriority::Normal
        })
}

/// Everything `collect` writes.
#[derive(SystemParam)]
pub(crate) struct DialogueOut<'w> {
    tokens: MessageWriter<'w, ConversationLineToken>,
    finished: MessageWriter<'w, ConversationLineFinished>,
}

/// Turn the engine's events into transcript lines, retries, memories and ends.
#[allow(clippy::too_many_arguments)]
pub(crate) fn collect(
    mut commands: Commands,
    time: Res<Time>,
    settings: Res<DialogueSettings>,
    engine: EngineView,
    mut stats: ResMut<DialogueStats>,
    mut cooldowns: ResMut<DialogueCooldowns>,
    mut tokens: MessageReader<LlmToken>,
    mut completed: MessageReader<LlmCompleted>,
    mut failed: MessageReader<LlmFailed>,
    lines: Query<&LineRequest>,
    summaries: Query<&SummaryRequest>,
    mut convs: Query<(&mut Conversation, &mut ConversationRuntime)>,
    mut npcs: Query<(&Persona, Option<&mut NpcMemory>)>,
    mut out: DialogueOut,
) {
    let t = now(&time);
    for tok in tokens.read() {
        if let Ok(lr) = lines.get(tok.entity)
            && let Ok((conv, _)) = convs.get(lr.conversation)
            && let Some(npc) = conv.npc(lr.speaker)
        {
            let e = ConversationLineToken {
                entity: lr.conversation,
                speaker: npc,
                text: tok.text.clone(),
            };
            out.tokens.write(e.clone());
            commands.trigger(e);
        }
    }
    // Results: Some(text) on completion, None on failure.
    let mut results: Vec<(Entity, Option<String>)> = completed
        .read()
        .map(|c| (c.entity, Some(c.text.clone())))
        .collect();
    results.extend(failed.read().map(|f| (f.entity, None)));
    let completion = engine.completion();
    for (req_entity, text) in results {
        if let Ok(lr) = lines.get(req_entity).copied() {
            commands.entity(req_entity).despawn();
            let Ok((mut conv, mut rt)) = convs.get_mut(lr.conversation) else {
                continue;
            };
            rt.pending = None;
            let name = conv.names[lr.speaker].clone();
            let earlier: Vec<String> = conv.lines.iter().map(|l| l.text.clone()).collect();
            let cleaned = text
                .as_deref()
                .map(|t| clean_line(t, &name, conv.limits.max_line_chars))
                .unwrap_or_default();
            let bad = cleaned.is_empty() || is_degenerate(&cleaned, &earlier);
            if bad && lr.attempt == 0 {
                // Retry once with another seed.
                conv.retries += 1;
                stats.retries += 1;
                if let Some(npc) = conv.npc(lr.speaker)
                    && let Ok((persona, memory)) = npcs.get(npc)
                {
                    let req = line_request(
                        &conv, &rt, lr.speaker, persona, memory, &settings, &engine, completion, 1,
                    );
                    let e = commands
                        .spawn((req.with_cache_key(npc), LineRequest { attempt: 1, ..lr }))
                        .id();
                    rt.pending = Some(e);
                }
                continue;
            }
            let closing = conv.state == ConversationState::Closing;
            let (text, fallback) = if bad {
                conv.fallbacks += 1;
                stats.fallbacks += 1;
                let f = if closing {
                    FALLBACK_CLOSING
                } else {
                    FALLBACKS[conv.lines.len() % FALLBACKS.len()]
                };
                (f.to_string(), true)
            } else {
                (cleaned, false)
            };
            stats.lines += 1;
            conv.lines.push(TranscriptLine {
                speaker: name.clone(),
                text: text.clone(),
                time: t,
            });
            let speaker = conv.npc(lr.speaker).unwrap_or(Entity::PLACEHOLDER);
            let e = ConversationLineFinished {
                entity: lr.conversation,
                speaker,
                name,
                text: text.clone(),
                retried: lr.attempt > 0,
                fallback,
            };
            out.finished.write(e.clone());
            commands.trigger(e);
            // Who next, and whether to leave.
            let n = conv.names.len();
            conv.next_speaker = (lr.speaker + 1) % n;
            let count = conv.lines.len();
            if conv.with_player {
                conv.state = ConversationState::AwaitingPlayer;
            } else if closing || count >= conv.limits.max_lines {
                conv.state = ConversationState::Summarizing;
            } else if count + 1 >= conv.limits.max_lines || (count >= 2 && says_goodbye(&text)) {
                conv.state = ConversationState::Closing;
            }
        } else if let Ok(sr) = summaries.get(req_entity).copied() {
            commands.entity(req_entity).despawn();
            let Ok((conv, mut rt)) = convs.get_mut(sr.conversation) else {
                continue;
            };
            rt.summaries.retain(|(e, _)| *e != req_entity);
            let me = conv.names[sr.who].clone();
            let summary = text
                .as_deref()
                .map(|t| clean_line(t, &me, 300))
                .filter(|s| !s.is_empty() && !is_degenerate(s, &[]))
                .unwrap_or_else(|| {
                    // The model gave nothing usable: remember the bare facts.
                    format!(
                        "I talked with {}.",
                        conv.names
                            .iter()
                            .filter(|n| **n != me)
                            .cloned()
                            .collect::<Vec<_>>()
                            .join(" and ")
                    )
                });
            let about: Vec<String> = conv.names.iter().filter(|n| **n != me).cloned().collect();
            let importance = (0.3 + 0.05 * conv.lines.len() as f32).min(0.9);
            if let Some(npc) = conv.npc(sr.who)
                && let Ok((_, memory)) = npcs.get_mut(npc)
            {
                let entry = MemoryEntry {
                    time: t,
                    text: summary,
                    importance,
                    about,
                };
                match memory {
                    Some(mut m) => m.entries.push(entry),
                    None => {
                        commands.entity(npc).insert(NpcMemory {
                            entries: vec![entry],
                        });
                    }
                }
                stats.memories += 1;
            }
        }
    }
    // Conversations whose memories are all written end now.
    for (mut conv, rt) in &mut convs {
        if conv.state == ConversationState::Summarizing
            && rt.summaries_started
            && rt.summaries.is_empty()
            && rt.pending.is_none()
        {
            conv.state = ConversationState::Ended;
            stats.ended += 1;
            for (i, a) in conv.participants.iter().enumerate() {
                commands.entity(*a).remove::<InConversation>();
                for b in &conv.participants[i + 1..] {
                    cooldowns
                        .0
                        .insert(DialogueCooldowns::key(*a, *b), t + settings.cooldown_secs);
                }
            }
        }
    }
}

/// Send `ConversationEnded` for conversations that just ended.
pub(crate) fn announce_ends(
    mut commands: Commands,
    convs: Query<(Entity, &Conversation), Changed<Conversation>>,
    mut ended: MessageWriter<ConversationEnded>,
    mut seen: Local<std::collections::HashSet<Entity>>,
) {
    for (e, c) in &convs {
        if c.state == ConversationState::Ended && seen.insert(e) {
            let ev = ConversationEnded {
                entity: e,
                lines: c.lines.len(),
            };
            ended.write(ev.clone());
            commands.trigger(ev);
        }
    }
}
