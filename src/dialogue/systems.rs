//! The systems that run conversations turn by turn on top of the engine.

use std::collections::{HashMap, VecDeque};

use bevy::ecs::system::SystemParam;
use bevy::prelude::*;

use super::data::*;
use super::machine::{Event, Machine};
use super::prompt::*;
use super::say_stream::SayStream;
use super::{DialogueSettings, DialogueStats};
use crate::events::*;
use crate::registry::{ModelRegistry, PromptFormat};
use crate::settings::{BackendChoice, LlmSettings, RemotePromptFormat};
use crate::{LlmEngineStats, LlmModelState};

/// Marks an NPC that is in a conversation (its entity).
#[derive(Component, Debug, Clone, Copy, PartialEq, Eq)]
pub struct InConversation(pub Entity);

/// Bookkeeping of a conversation that is not saved: its state machine, the
/// requests it has in flight and what waits to be routed into it.
#[derive(Component, Debug, Clone)]
pub(crate) struct ConversationRuntime {
    /// The conversation's state machine (the only writer of its state).
    pub(crate) machine: Machine,
    /// Events for the machine, in arrival order, handled in `step`.
    pub(crate) inbox: Vec<Event>,
    /// The request entity of the line being generated.
    pub(crate) pending: Option<Entity>,
    /// The cleaned text of the line that just finished.
    pub(crate) output: Option<String>,
    /// The action chosen with it (JSON), for an NPC with [`NpcActions`].
    pub(crate) action: Option<serde_json::Value>,
    /// The generated JSON of the line in flight so far, and the spoken text
    /// streamed out of it.
    pub(crate) raw: String,
    pub(crate) say: SayStream,
    /// Attempt number of the line in flight (0 first, 1 a retry).
    pub(crate) attempt: u32,
    /// Player lines held until the NPC line in flight is appended.
    pub(crate) held: VecDeque<TranscriptLine>,
    /// Summary requests still running, with their participant index.
    pub(crate) summaries: Vec<(Entity, usize)>,
    /// Game time the conversation started (memories are ranked as of then,
    /// so every turn's prompt keeps the same prefix for the cache).
    pub(crate) started_at: f64,
    pub(crate) seed: u32,
}

impl ConversationRuntime {
    /// Fresh bookkeeping for `conv` (new, or restored from a save).
    pub(crate) fn new(conv: &Conversation, now: f64, seed: u32) -> Self {
        let npc_lines = conv
            .lines
            .iter()
            .filter(|l| {
                conv.names
                    .get(..conv.participants.len())
                    .is_some_and(|npcs| npcs.contains(&l.speaker))
            })
            .count();
        Self {
            machine: Machine::new(
                conv.participants.len(),
                conv.with_player,
                conv.limits.max_lines,
                conv.state,
                conv.next_speaker,
                conv.lines.len(),
                npc_lines,
                now,
            ),
            inbox: vec![Event::Begin],
            pending: None,
            output: None,
            action: None,
            raw: String::new(),
            say: SayStream::default(),
            attempt: 0,
            held: VecDeque::new(),
            summaries: Vec::new(),
            started_at: now,
            seed,
        }
    }
}

/// A request entity producing a line.
#[derive(Component, Debug, Clone, Copy)]
pub(crate) struct LineRequest {
    pub(crate) conversation: Entity,
    pub(crate) speaker: usize,
}

/// A request entity producing a memory.
#[derive(Component, Debug, Clone, Copy)]
pub(crate) struct SummaryRequest {
    pub(crate) conversation: Entity,
    pub(crate) who: usize,
}

/// When pairs of NPCs may talk again (game time).
#[derive(Resource, Debug, Default, Clone)]
pub struct DialogueCooldowns(pub HashMap<(Entity, Entity), f64>);

impl DialogueCooldowns {
    pub(crate) fn key(a: Entity, b: Entity) -> (Entity, Entity) {
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
pub(crate) const FALLBACKS: [&str; 4] = [
    "Hmm, let me think about that.",
    "Is that so? Tell me more.",
    "Well, that is something to ponder.",
    "I see what you mean.",
];
pub(crate) const FALLBACK_CLOSING: &str = "Well, I must be going. Goodbye.";

pub(crate) fn now(time: &Time) -> f64 {
    time.elapsed_secs_f64()
}

/// Whether the model that serves requests uses plain completion prompts.
pub(crate) fn completion_format(
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
    pub(crate) registry: Res<'w, ModelRegistry>,
    pub(crate) settings: Res<'w, LlmSettings>,
    pub(crate) state: Res<'w, LlmModelState>,
    pub(crate) stats: Res<'w, LlmEngineStats>,
}

impl EngineView<'_> {
    pub(crate) fn completion(&self) -> bool {
        completion_format(&self.registry, &self.settings, &self.state, &self.stats)
    }
    pub(crate) fn budget_chars(&self, max_tokens: u32) -> usize {
        (self.settings.context_per_sequence as usize)
            .saturating_sub(max_tokens as usize + 96)
            .saturating_mul(3)
    }
}

/// A conversation created this frame, not yet spawned.
pub(crate) struct NewConversation {
    pub(crate) entity: Entity,
    pub(crate) conv: Conversation,
    pub(crate) runtime: ConversationRuntime,
}

/// Despawn conversations that ended in an earlier frame (their
/// [`ConversationEnded`] has been delivered; it carries the transcript).
pub(crate) fn despawn_ended(mut commands: Commands, convs: Query<(Entity, &Conversation)>) {
    for (e, c) in &convs {
        if c.state == ConversationState::Ended {
            commands.entity(e).despawn();
        }
    }
}

/// Route the game's messages into conversations: start new ones, hand
/// player lines and departures to the conversation they belong to.
#[allow(clippy::too_many_arguments)]
pub(crate) fn route_inputs(
    mut commands: Commands,
    time: Res<Time>,
    settings: Res<DialogueSettings>,
    mut cooldowns: ResMut<DialogueCooldowns>,
    mut stats: ResMut<DialogueStats>,
    mut starts: MessageReader<StartConversation>,
    mut says: MessageReader<PlayerSays>,
    mut leaves: MessageReader<PlayerLeaves>,
    npcs: Query<(&Persona, Option<&InConversation>)>,
    mut convs: Query<(&Conversation, &mut ConversationRuntime)>,
    mut out: DialogueOut,
) {
    let t = now(&time);
    // Expired cooldowns go: the map holds only pairs still cooling down.
    cooldowns.0.retain(|_, until| *until > t);
    let mut new: Vec<NewConversation> = Vec::new();
    let busy =
        |e: Entity, new: &[NewConversation]| new.iter().any(|n| n.conv.participants.contains(&e));
    for s in starts.read() {
        let mut names = Vec::new();
        let mut ok = s.participants.len() >= 2;
        for (i, e) in s.participants.iter().enumerate() {
            match npcs.get(*e) {
                Ok((p, None)) if !busy(*e, &new) => names.push(p.name.clone()),
                Ok((p, _)) => {
                    warn!("bevy_npc_llm: {} is already in a conversation", p.name);
                    ok = false;
                }
                Err(_) => {
                    warn!("bevy_npc_llm: participant {e} has no Persona");
                    ok = false;
                }
            }
            for other in &s.participants[i + 1..] {
                if other == e || !cooldowns.ready(*e, *other, t) {
                    ok = false;
                }
            }
        }
        if !ok {
            continue;
        }
        let conv = Conversation::new(s.participants.clone(), names, false, s.topic.clone());
        new.push(create(&mut commands, conv, &settings, t, &mut stats));
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
        // This frame's new conversation with this NPC, an existing one, or a new one.
        if let Some(n) = new
            .iter_mut()
            .find(|n| n.conv.participants.contains(&s.npc))
        {
            if n.conv.with_player {
                n.runtime.held.push_back(line);
                n.runtime.inbox.push(Event::PlayerSays);
            } else {
                unanswered(
                    &mut commands,
                    &mut out,
                    s.npc,
                    n.entity,
                    line.text,
                    UnansweredReason::Busy,
                );
            }
            continue;
        }
        if let Some(c) = in_conv
            && let Ok((conv, mut rt)) = convs.get_mut(c.0)
            && conv.state != ConversationState::Ended
        {
            if conv.with_player {
                rt.held.push_back(line);
                rt.inbox.push(Event::PlayerSays);
            } else {
                warn!(
                    "bevy_npc_llm: {} is busy talking with someone else",
                    persona.name
                );
                unanswered(
                    &mut commands,
                    &mut out,
                    s.npc,
                    c.0,
                    line.text,
                    UnansweredReason::Busy,
                );
            }
            continue;
        }
        let names = vec![persona.name.clone(), settings.player_name.clone()];
        let mut conv = Conversation::new(vec![s.npc], names, true, None);
        conv.state = ConversationState::AwaitingPlayer;
        conv.next_speaker = 1;
        let mut n = create(&mut commands, conv, &settings, t, &mut stats);
        n.runtime.held.push_back(line);
        n.runtime.inbox.push(Event::PlayerSays);
        new.push(n);
    }
    for l in leaves.read() {
        if let Some(n) = new
            .iter_mut()
            .find(|n| n.conv.participants.contains(&l.npc))
        {
            n.runtime.inbox.push(Event::PlayerLeaves);
        } else if let Ok((_, Some(c))) = npcs.get(l.npc)
            && let Ok((_, mut rt)) = convs.get_mut(c.0)
        {
            rt.inbox.push(Event::PlayerLeaves);
        }
    }
    for n in new {
        for p in &n.conv.participants {
            commands.entity(*p).insert(InConversation(n.entity));
        }
        let e = ConversationStarted {
            entity: n.entity,
            names: n.conv.names.clone(),
        };
        commands.entity(n.entity).insert((
            Name::new(format!("Conversation: {}", n.conv.names.join(", "))),
            n.conv,
            n.runtime,
        ));
        out.started.write(e.clone());
        commands.trigger(e);
    }
}

pub(crate) fn create(
    commands: &mut Commands,
    mut conv: Conversation,
    settings: &DialogueSettings,
    t: f64,
    stats: &mut DialogueStats,
) -> NewConversation {
    conv.limits = settings.limits.clone();
    let seed = settings
        .seed
        .wrapping_add((stats.started as u32).wrapping_mul(7919));
    stats.started += 1;
    let runtime = ConversationRuntime::new(&conv, t, seed);
    NewConversation {
        entity: commands.spawn_empty().id(),
        conv,
        runtime,
    }
}

pub(crate) fn unanswered(
    commands: &mut Commands,
    out: &mut DialogueOut,
    npc: Entity,
    conversation: Entity,
    text: String,
    reason: UnansweredReason,
) {
    let e = PlayerLineUnanswered {
        entity: npc,
        conversation,
        text,
        reason,
    };
    out.unanswered.write(e.clone());
    commands.trigger(e);
}

/// Everything the dialogue systems write.
#[derive(SystemParam)]
pub(crate) struct DialogueOut<'w> {
    pub(crate) started: MessageWriter<'w, ConversationStarted>,
    pub(crate) tokens: MessageWriter<'w, ConversationLineToken>,
    pub(crate) finished: MessageWriter<'w, ConversationLineFinished>,
    pub(crate) ended: MessageWriter<'w, ConversationEnded>,
    pub(crate) unanswered: MessageWriter<'w, PlayerLineUnanswered>,
}

/// Route the engine's events into conversations: streamed text out as
/// [`ConversationLineToken`], finished lines cleaned and handed to the
/// machine, summaries written as memories.
#[allow(clippy::too_many_arguments)]
pub(crate) fn route_engine(
    mut commands: Commands,
    time: Res<Time>,
    settings: Res<DialogueSettings>,
    mut stats: ResMut<DialogueStats>,
    mut tokens: MessageReader<LlmToken>,
    mut completed: MessageReader<LlmCompleted>,
    mut failed: MessageReader<LlmFailed>,
    mut cancelled: MessageReader<LlmCancelled>,
    lines: Query<&LineRequest>,
    summaries: Query<&SummaryRequest>,
    mut convs: Query<(&Conversation, &mut ConversationRuntime)>,
    mut npcs: Query<(&Persona, Option<&mut NpcMemory>)>,
    mut out: DialogueOut,
) {
    let t = now(&time);
    for tok in tokens.read() {
        if let Ok(lr) = lines.get(tok.entity)
            && let Ok((conv, mut rt)) = convs.get_mut(lr.conversation)
            && rt.pending == Some(tok.entity)
            && let Some(npc) = conv.npc(lr.speaker)
        {
            // The line is JSON: only the spoken text goes out.
            rt.raw.push_str(&tok.text);
            let rt = &mut *rt;
            let text = rt.say.push(&rt.raw, &tok.text);
            if text.is_empty() {
                continue;
            }
            let e = ConversationLineToken {
                entity: lr.conversation,
                speaker: npc,
                text,
                attempt: rt.attempt,
            };
            out.tokens.write(e.clone());
            commands.trigger(e);
        }
    }
    enum Outcome {
        Done(String, Option<serde_json::Value>),
        Failed,
        Cancelled,
    }
    let mut results: Vec<(Entity, Outcome)> = completed
        .read()
        .map(|c| {
            // A line's JSON gives its text and action; a summary is text. A
            // line cut short (no JSON) has neither: retried like an empty one.
            let (text, action) = match &c.output {
                Some(Ok(v)) => (
                    v.get("say")
                        .and_then(serde_json::Value::as_str)
                        .unwrap_or_default()
                        .to_string(),
                    v.get("action").filter(|a| !a.is_null()).cloned(),
                ),
                Some(Err(_)) => (String::new(), None),
                None => (c.text.clone(), None),
            };
            (c.entity, Outcome::Done(text, action))
        })
        .collect();
    results.extend(failed.read().map(|f| (f.entity, Outcome::Failed)));
    results.extend(cancelled.read().map(|c| (c.entity, Outcome::Cancelled)));
    for (req, outcome) in results {
        if let Ok(lr) = lines.get(req).copied() {
            commands.entity(req).despawn();
            let Ok((conv, mut rt)) = convs.get_mut(lr.conversation) else {
                continue;
            };
            if rt.pending != Some(req) {
                continue; // a request the conversation no longer waits for
            }
            rt.pending = None;
            let event = match outcome {
                Outcome::Done(text, action) => {
                    rt.action = action;
                    let name = &conv.names[lr.speaker];
                    let cleaned = clean_line(&text, name, conv.limits.max_line_chars);
                    let earlier: Vec<String> = conv.lines.iter().map(|l| l.text.clone()).collect();
                    let usable = !cleaned.is_empty() && !is_degenerate(&cleaned, &earlier);
                    let goodbye = says_goodbye(&cleaned);
                    rt.output = Some(cleaned);
                    Event::LineDone { usable, goodbye }
                }
                Outcome::Failed => Event::LineFailed,
                Outcome::Cancelled => Event::LineCancelled,
            };
            rt.inbox.push(event);
        } else if let Ok(sr) = summaries.get(req).copied() {
            commands.entity(req).despawn();
            let Ok((conv, mut rt)) = convs.get_mut(sr.conversation) else {
                continue;
            };
            let before = rt.summaries.len();
            rt.summaries.retain(|(e, _)| *e != req);
            if rt.summaries.len() == before {
                continue;
            }
            rt.inbox.push(Event::SummaryDone);
            let me = conv.names[sr.who].clone();
            let text = match outcome {
                Outcome::Done(text, _) => Some(text),
                _ => None,
            };
            let summary = text
                .as_deref()
                .map(|t| sanitize_memory_text(&clean_line(t, &me, MEMORY_CHARS), MEMORY_CHARS))
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
                    Some(mut m) => m.remember(entry, &settings.memory_limits),
                    None => {
                        let mut m = NpcMemory::default();
                        m.remember(entry, &settings.memory_limits);
                        commands.entity(npc).insert(m);
                    }
                }
                stats.memories += 1;
            }
        }
    }
}

/// Longest memory text kept, in characters.
pub(crate) const MEMORY_CHARS: usize = 300;
