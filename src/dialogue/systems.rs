//! The systems that run conversations turn by turn on top of the engine.

use std::collections::{HashMap, VecDeque};

use bevy::ecs::system::SystemParam;
use bevy::prelude::*;

use super::actions::{NpcActions, line_schema};
use super::data::*;
use super::machine::{Command, Event, Machine};
use super::prompt::*;
use super::say_stream::SayStream;
use super::{DialogueSettings, DialogueStats};
use crate::events::*;
use crate::registry::{ModelRegistry, PromptFormat};
use crate::request::{LlmRequest, RequestPriority};
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
    machine: Machine,
    /// Events for the machine, in arrival order, handled in `step`.
    inbox: Vec<Event>,
    /// The request entity of the line being generated.
    pending: Option<Entity>,
    /// The cleaned text of the line that just finished.
    output: Option<String>,
    /// The action chosen with it (JSON), for an NPC with [`NpcActions`].
    action: Option<serde_json::Value>,
    /// The generated JSON of the line in flight so far, and the spoken text
    /// streamed out of it.
    raw: String,
    say: SayStream,
    /// Attempt number of the line in flight (0 first, 1 a retry).
    attempt: u32,
    /// Player lines held until the NPC line in flight is appended.
    held: VecDeque<TranscriptLine>,
    /// Summary requests still running, with their participant index.
    summaries: Vec<(Entity, usize)>,
    /// Game time the conversation started (memories are ranked as of then,
    /// so every turn's prompt keeps the same prefix for the cache).
    started_at: f64,
    seed: u32,
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
    speaker: usize,
}

/// A request entity producing a memory.
#[derive(Component, Debug, Clone, Copy)]
pub(crate) struct SummaryRequest {
    pub(crate) conversation: Entity,
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

/// A conversation created this frame, not yet spawned.
struct NewConversation {
    entity: Entity,
    conv: Conversation,
    runtime: ConversationRuntime,
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

fn create(
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

fn unanswered(
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
    started: MessageWriter<'w, ConversationStarted>,
    tokens: MessageWriter<'w, ConversationLineToken>,
    finished: MessageWriter<'w, ConversationLineFinished>,
    ended: MessageWriter<'w, ConversationEnded>,
    unanswered: MessageWriter<'w, PlayerLineUnanswered>,
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
const MEMORY_CHARS: usize = 300;

/// What `step` reads besides the conversations.
#[derive(SystemParam)]
pub(crate) struct StepCtx<'w, 's> {
    time: Res<'w, Time>,
    settings: Res<'w, DialogueSettings>,
    engine: EngineView<'w>,
    stats: ResMut<'w, DialogueStats>,
    cooldowns: ResMut<'w, DialogueCooldowns>,
    npcs: Query<
        'w,
        's,
        (
            &'static Persona,
            Option<&'static NpcMemory>,
            Option<&'static NpcActions>,
        ),
    >,
    in_conv: Query<'w, 's, &'static InConversation>,
}

/// Feed each conversation's events (and the time) through its state machine
/// and carry out the commands it returns. The only place a conversation's
/// state changes.
pub(crate) fn step(
    mut commands: Commands,
    mut ctx: StepCtx,
    mut convs: Query<(Entity, &mut Conversation, Option<&mut ConversationRuntime>)>,
    mut out: DialogueOut,
) {
    let t = now(&ctx.time);
    let completion = ctx.engine.completion();
    for (ce, mut conv, runtime) in &mut convs {
        let Some(mut rt) = runtime else {
            // Restored from a save: fresh bookkeeping, started next frame.
            let seed = ctx.settings.seed.wrapping_add(ce.to_bits() as u32);
            commands
                .entity(ce)
                .insert(ConversationRuntime::new(&conv, t, seed));
            continue;
        };
        if conv.state == ConversationState::Ended {
            continue;
        }
        // Participants that went away.
        for (i, p) in conv.participants.iter().enumerate() {
            if !rt.machine.gone[i] && ctx.npcs.get(*p).is_err() {
                rt.inbox.push(Event::NpcGone(i));
            }
        }
        let mut inbox = std::mem::take(&mut rt.inbox);
        inbox.push(Event::Tick);
        for event in inbox {
            let timeouts = ctx.settings.timeouts;
            let cmds = rt.machine.handle(event, t, &timeouts);
            conv.state = rt.machine.public_state();
            conv.next_speaker = rt.machine.next_speaker;
            for cmd in cmds {
                apply(
                    &mut commands,
                    &mut ctx,
                    &mut out,
                    ce,
                    &mut conv,
                    &mut rt,
                    cmd,
                    completion,
                );
            }
        }
    }
}

/// Carry out one command of a conversation's machine.
#[allow(clippy::too_many_arguments)]
fn apply(
    commands: &mut Commands,
    ctx: &mut StepCtx,
    out: &mut DialogueOut,
    ce: Entity,
    conv: &mut Conversation,
    rt: &mut ConversationRuntime,
    cmd: Command,
    completion: bool,
) {
    let t = now(&ctx.time);
    match cmd {
        Command::RequestLine {
            speaker, attempt, ..
        } => {
            let Some(npc) = conv.npc(speaker) else { return };
            let Ok((persona, memory, actions)) = ctx.npcs.get(npc) else {
                return; // gone: the machine hears of it next frame
            };
            rt.raw.clear();
            rt.say = SayStream::default();
            rt.attempt = attempt;
            if attempt > 0 {
                conv.retries = conv.retries.saturating_add(1);
                ctx.stats.retries = ctx.stats.retries.saturating_add(1);
            }
            let req = line_request(
                conv,
                rt,
                speaker,
                persona,
                memory,
                actions,
                &ctx.settings,
                &ctx.engine,
                completion,
                attempt,
            );
            let e = commands
                .spawn((
                    req.with_cache_key(npc),
                    LineRequest {
                        conversation: ce,
                        speaker,
                    },
                ))
                .id();
            rt.pending = Some(e);
        }
        Command::CancelLine => {
            if let Some(e) = rt.pending.take() {
                // Despawning cancels the request in the engine.
                commands.entity(e).try_despawn();
            }
            rt.output = None;
            rt.action = None;
        }
        Command::AppendLine {
            speaker,
            fallback,
            retried,
            closing,
        } => {
            let name = conv.names[speaker].clone();
            let action = rt.action.take().filter(|_| !fallback);
            let text = match (fallback, rt.output.take()) {
                (false, Some(text)) => text,
                _ => {
                    conv.fallbacks = conv.fallbacks.saturating_add(1);
                    ctx.stats.fallbacks = ctx.stats.fallbacks.saturating_add(1);
                    if closing {
                        FALLBACK_CLOSING.to_string()
                    } else {
                        FALLBACKS[conv.lines.len() % FALLBACKS.len()].to_string()
                    }
                }
            };
            ctx.stats.lines += 1;
            conv.lines.push(TranscriptLine {
                speaker: name.clone(),
                text: text.clone(),
                time: t,
            });
            let e = ConversationLineFinished {
                entity: ce,
                speaker: conv.npc(speaker).unwrap_or(Entity::PLACEHOLDER),
                name,
                text,
                retried,
                fallback,
                action,
            };
            out.finished.write(e.clone());
            commands.trigger(e);
        }
        Command::TakePlayerLines(n) => {
            for _ in 0..n {
                if let Some(line) = rt.held.pop_front() {
                    conv.lines.push(line);
                    ctx.stats.player_lines += 1;
                }
            }
        }
        Command::RejectPlayerLine => {
            if let Some(line) = rt.held.pop_back() {
                let npc = conv.npc(0).unwrap_or(Entity::PLACEHOLDER);
                unanswered(
                    commands,
                    out,
                    npc,
                    ce,
                    line.text,
                    UnansweredReason::ConversationEnding,
                );
            }
        }
        Command::Summarize { who } => {
            let req = LlmRequest::new(summary_prompt(conv, who, completion))
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
        Command::CancelSummaries => {
            for (e, _) in rt.summaries.drain(..) {
                commands.entity(e).try_despawn();
            }
        }
        Command::End { unanswered: n } => {
            let npc = conv.npc(0).unwrap_or(Entity::PLACEHOLDER);
            let player_lines: Vec<String> = conv
                .lines
                .iter()
                .rev()
                .take(n)
                .map(|l| l.text.clone())
                .collect();
            for text in player_lines.into_iter().rev() {
                ctx.stats.player_lines_unanswered += 1;
                unanswered(
                    commands,
                    out,
                    npc,
                    ce,
                    text,
                    UnansweredReason::ConversationEnded,
                );
            }
            ctx.stats.ended += 1;
            let cooldown_until = t + ctx.settings.cooldown_secs;
            for (i, a) in conv.participants.iter().enumerate() {
                if ctx.in_conv.get(*a).is_ok_and(|c| c.0 == ce) {
                    commands.entity(*a).remove::<InConversation>();
                }
                for b in &conv.participants[i + 1..] {
                    ctx.cooldowns
                        .0
                        .insert(DialogueCooldowns::key(*a, *b), cooldown_until);
                }
            }
            let ev = ConversationEnded {
                entity: ce,
                lines: conv.lines.len(),
                names: conv.names.clone(),
                transcript: conv.lines.clone(),
                unanswered_player_lines: n,
            };
            out.ended.write(ev.clone());
            commands.trigger(ev);
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
    actions: Option<&NpcActions>,
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
    let mut lp = line_prompt(
        conv,
        speaker,
        persona,
        &memories,
        completion,
        engine.budget_chars(conv.limits.max_tokens),
    );
    if let Some(a) = actions {
        lp.tell_actions(a.hint(), completion);
    }
    // Every line is JSON (`say`, and `action` for an NPC with actions):
    // plain speech by construction; `say` gets about three characters per
    // token of the line budget, the request room for the JSON around it.
    let max_chars = conv
        .limits
        .max_line_chars
        .min((conv.limits.max_tokens as usize).saturating_mul(3));
    let schema = line_schema(
        actions,
        settings.plain_speech,
        settings.max_sentences,
        max_chars,
    );
    let max_tokens = conv
        .limits
        .max_tokens
        .saturating_add(u32::try_from(max_chars / 3).unwrap_or(u32::MAX))
        .saturating_add(40);
    LlmRequest::new(lp.prompt)
        .with_json_schema(&schema)
        .with_max_tokens(max_tokens)
        .with_seed(
            rt.seed
                .wrapping_add((conv.lines.len() as u32).wrapping_mul(31))
                .wrapping_add(attempt.wrapping_mul(1_000_003)),
        )
        .with_trim_prompt(true)
        .with_priority(if conv.with_player {
            RequestPriority::High
        } else {
            RequestPriority::Normal
        })
}
