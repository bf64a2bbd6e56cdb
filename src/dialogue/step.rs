//! The conversation step: each conversation's events (and the time) fed
//! through its state machine, and the commands it returns carried out —
//! line and summary requests, spoken lines, memories, ends.

use bevy::ecs::system::SystemParam;
use bevy::prelude::*;

use super::actions::{NpcActions, line_schema};
use super::data::*;
use super::machine::{Command, Event};
use super::prompt::*;
use super::say_stream::SayStream;
use super::systems::*;
use super::{DialogueSettings, DialogueStats};
use crate::events::*;
use crate::request::{LlmRequest, RequestPriority};

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
