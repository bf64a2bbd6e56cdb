//! Save and load personas, memories and conversations as RON.

use bevy::prelude::*;
use serde::{Deserialize, Serialize};

use super::data::*;
use super::systems::{ConversationRuntime, InConversation, LineRequest, SummaryRequest};
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

/// Most transcript lines of one saved conversation.
pub const MAX_SAVED_LINES: usize = 100_000;
/// Most characters of one saved text (a line, a memory, a persona field).
pub const MAX_SAVED_TEXT_CHARS: usize = 100_000;
/// Most NPCs, conversations, memories of one NPC, traits of one persona or
/// names in one memory's `about` in a save.
pub const MAX_SAVED_ITEMS: usize = 100_000;
/// Most tokens a saved conversation may ask for one line
/// ([`ConversationLimits::max_tokens`]).
pub const MAX_SAVED_LINE_TOKENS: u32 = 65_536;
/// Largest retry or fallback count a save may carry.
pub const MAX_SAVED_COUNT: u32 = 1 << 30;
/// Largest game time (seconds, either sign) a save may carry: about 31,000
/// years, far below where `f64` seconds lose their sub-second part.
pub const MAX_SAVED_TIME: f64 = 1e12;

/// Check every cross-field invariant of a save before anything is loaded:
/// unique, non-empty NPC names; each conversation's names match its
/// participants (NPC names known and distinct, at least two speakers, the
/// player last and alone with one NPC when `with_player`); no NPC in two
/// conversations; `next_speaker` in range; texts and transcripts within
/// [`MAX_SAVED_TEXT_CHARS`] and [`MAX_SAVED_LINES`]; and every number within
/// both bounds: limits from 1 to [`MAX_SAVED_LINES`] lines,
/// [`MAX_SAVED_TEXT_CHARS`] characters and [`MAX_SAVED_LINE_TOKENS`] tokens;
/// retry and fallback counts at most [`MAX_SAVED_COUNT`]; times finite and
/// within ±[`MAX_SAVED_TIME`]; importances finite; lists at most
/// [`MAX_SAVED_ITEMS`] long. A value a game could never have written (say
/// `u32::MAX` retries) is refused, so nothing computed from a loaded save can
/// overflow.
///
/// # Errors
/// [`DialogueError::Invalid`] naming the first problem found.
pub fn validate_snapshot(snap: &DialogueSnapshot) -> Result<(), DialogueError> {
    let bad = |m: String| Err(DialogueError::Invalid(m));
    let long = |t: &str| t.chars().count() > MAX_SAVED_TEXT_CHARS;
    let bad_time = |t: f64| !t.is_finite() || t.abs() > MAX_SAVED_TIME;
    if snap.npcs.len() > MAX_SAVED_ITEMS || snap.conversations.len() > MAX_SAVED_ITEMS {
        return bad(format!("more than {MAX_SAVED_ITEMS} NPCs or conversations"));
    }
    let mut names = std::collections::HashSet::new();
    for npc in &snap.npcs {
        let p = &npc.persona;
        if p.name.trim().is_empty() {
            return bad("an NPC has an empty name".into());
        }
        if p.traits.len() > MAX_SAVED_ITEMS || npc.memory.entries.len() > MAX_SAVED_ITEMS {
            return bad(format!(
                "`{}` has more than {MAX_SAVED_ITEMS} traits or memories",
                p.name
            ));
        }
        if !names.insert(p.name.as_str()) {
            return bad(format!("two NPCs are named `{}`", p.name));
        }
        if [&p.name, &p.identity, &p.speaking_style, &p.goal]
            .into_iter()
            .chain(p.traits.iter())
            .any(|t| long(t))
        {
            return bad(format!("a text of `{}` is too long", p.name));
        }
        for m in &npc.memory.entries {
            if bad_time(m.time)
                || !m.importance.is_finite()
                || long(&m.text)
                || m.about.len() > MAX_SAVED_ITEMS
                || m.about.iter().any(|a| long(a))
            {
                return bad(format!(
                    "a memory of `{}` has a time beyond ±{MAX_SAVED_TIME} s, a non-finite \
                     importance, or too long a text or list",
                    p.name
                ));
            }
        }
    }
    let mut talking = std::collections::HashSet::new();
    for (i, c) in snap.conversations.iter().enumerate() {
        let what = format!("conversation {i} ({})", c.names.join(", "));
        let npc_count = if c.with_player {
            if c.names.len() != 2 {
                return bad(format!(
                    "{what}: a player conversation has one NPC and the player ({} names)",
                    c.names.len()
                ));
            }
            1
        } else {
            if c.names.len() < 2 {
                return bad(format!("{what}: needs at least two NPCs"));
            }
            c.names.len()
        };
        for n in &c.names[..npc_count] {
            if !names.contains(n.as_str()) {
                return bad(format!(
                    "{what}: names `{n}`, who is not among the saved NPCs"
                ));
            }
            if !talking.insert(n.as_str()) {
                return bad(format!("{what}: `{n}` is in two conversations"));
            }
        }
        if c.with_player && c.names[1].trim().is_empty() {
            return bad(format!("{what}: the player's name is empty"));
        }
        if c.next_speaker >= c.names.len() {
            return bad(format!(
                "{what}: next_speaker {} out of range (0..{})",
                c.next_speaker,
                c.names.len()
            ));
        }
        if c.state == ConversationState::Ended {
            return bad(format!("{what}: an ended conversation is not saved"));
        }
        let l = &c.limits;
        if l.max_lines == 0 || l.max_tokens == 0 || l.max_line_chars == 0 || l.max_prompt_lines == 0
        {
            return bad(format!("{what}: limits must be at least 1"));
        }
        if l.max_lines > MAX_SAVED_LINES
            || l.max_prompt_lines > MAX_SAVED_LINES
            || l.max_line_chars > MAX_SAVED_TEXT_CHARS
            || l.max_tokens > MAX_SAVED_LINE_TOKENS
        {
            return bad(format!(
                "{what}: limits beyond {MAX_SAVED_LINES} lines, {MAX_SAVED_TEXT_CHARS} \
                 characters or {MAX_SAVED_LINE_TOKENS} tokens"
            ));
        }
        if c.retries > MAX_SAVED_COUNT || c.fallbacks > MAX_SAVED_COUNT {
            return bad(format!(
                "{what}: more than {MAX_SAVED_COUNT} retries or fallbacks"
            ));
        }
        if c.names.len() > MAX_SAVED_ITEMS {
            return bad(format!("{what}: more than {MAX_SAVED_ITEMS} names"));
        }
        if c.lines.len() > MAX_SAVED_LINES {
            return bad(format!("{what}: more than {MAX_SAVED_LINES} lines"));
        }
        for line in &c.lines {
            if !c.names.contains(&line.speaker) {
                return bad(format!(
                    "{what}: a line by `{}`, who is not in it",
                    line.speaker
                ));
            }
            if bad_time(line.time) || long(&line.text) {
                return bad(format!(
                    "{what}: a line has a time beyond ±{MAX_SAVED_TIME} s or too long a text"
                ));
            }
        }
        if c.topic.as_deref().is_some_and(long) {
            return bad(format!("{what}: topic too long"));
        }
    }
    Ok(())
}

/// Parse a save's RON text and validate it, touching no world.
///
/// # Errors
/// [`DialogueError::Parse`] for bad RON, [`DialogueError::Invalid`] from
/// [`validate_snapshot`].
pub fn parse_dialogue(text: &str) -> Result<DialogueSnapshot, DialogueError> {
    let snap: DialogueSnapshot = parse_ron(text).map_err(|f| DialogueError::Parse {
        origin: "dialogue save".into(),
        line: f.line,
        column: f.column,
        message: f.message,
    })?;
    validate_snapshot(&snap)?;
    Ok(snap)
}

/// Restore from RON text: NPCs are matched by persona name (spawned when
/// missing, their persona and memory replaced when present); conversations
/// are replaced and resume where they were (each NPC's prefix cache is
/// simply rebuilt by its next request). Requests of the replaced
/// conversations are cancelled.
///
/// The save is parsed and fully validated first ([`validate_snapshot`]): on
/// any error the world is left exactly as it was.
///
/// # Errors
/// [`DialogueError::Parse`] for bad RON, [`DialogueError::Invalid`] for an
/// inconsistent save.
pub fn load_dialogue(world: &mut World, text: &str) -> Result<(), DialogueError> {
    let snap = parse_dialogue(text)?;
    // Validated: nothing below can fail.
    let old: Vec<Entity> = world
        .query_filtered::<Entity, With<Conversation>>()
        .iter(world)
        .collect();
    let requests: Vec<Entity> = world
        .query::<(Entity, Option<&LineRequest>, Option<&SummaryRequest>)>()
        .iter(world)
        .filter(|(_, l, s)| {
            l.is_some_and(|l| old.contains(&l.conversation))
                || s.is_some_and(|s| old.contains(&s.conversation))
        })
        .map(|(e, ..)| e)
        .collect();
    for e in old.into_iter().chain(requests) {
        world.despawn(e);
    }
    let talking: Vec<Entity> = world
        .query_filtered::<Entity, With<InConversation>>()
        .iter(world)
        .collect();
    for e in talking {
        world.entity_mut(e).remove::<InConversation>();
    }
    let existing: Vec<(Entity, String)> = world
        .query::<(Entity, &Persona)>()
        .iter(world)
        .map(|(e, p)| (e, p.name.clone()))
        .collect();
    let now = world
        .get_resource::<Time>()
        .map_or(0.0, |t| t.elapsed_secs_f64());
    let seed = world
        .get_resource::<super::DialogueSettings>()
        .map_or(0, |s| s.seed);
    let mut by_name = std::collections::HashMap::new();
    for npc in snap.npcs {
        let name = npc.persona.name.clone();
        let e = match existing.iter().find(|(_, n)| *n == name) {
            Some((e, _)) => {
                world.entity_mut(*e).insert((npc.persona, npc.memory));
                *e
            }
            None => world.spawn((npc.persona, npc.memory)).id(),
        };
        by_name.insert(name, e);
    }
    for c in snap.conversations {
        let npc_count = if c.with_player { 1 } else { c.names.len() };
        let participants: Vec<Entity> = c.names[..npc_count].iter().map(|n| by_name[n]).collect();
        let conversation = Conversation {
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
        };
        // Its machine resumes where the save left it (first step next frame).
        let runtime = ConversationRuntime::new(
            &conversation,
            now,
            seed.wrapping_add(conversation.lines.len() as u32),
        );
        let conv = world
            .spawn((
                Name::new(format!("Conversation: {}", conversation.names.join(", "))),
                conversation,
                runtime,
            ))
            .id();
        for p in participants {
            world.entity_mut(p).insert(InConversation(conv));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn npc(name: &str) -> NpcSnapshot {
        NpcSnapshot {
            persona: Persona::new(name, "Someone."),
            memory: NpcMemory::default(),
        }
    }

    fn conv(names: &[&str], with_player: bool) -> ConversationSnapshot {
        ConversationSnapshot {
            names: names.iter().map(|n| n.to_string()).collect(),
            with_player,
            topic: None,
            lines: vec![],
            next_speaker: 0,
            state: ConversationState::Active,
            limits: ConversationLimits::default(),
            retries: 0,
            fallbacks: 0,
        }
    }

    fn world_with_a_conversation() -> World {
        let mut world = World::new();
        let a = world.spawn(Persona::new("Ada", "x")).id();
        let b = world.spawn(Persona::new("Bo", "y")).id();
        let c = world
            .spawn(Conversation::new(
                vec![a, b],
                vec!["Ada".into(), "Bo".into()],
                false,
                None,
            ))
            .id();
        world.entity_mut(a).insert(InConversation(c));
        world.entity_mut(b).insert(InConversation(c));
        world
    }

    /// A save nested absurdly deep is a parse error (ron's recursion limit),
    /// never a stack overflow, on a small stack.
    #[test]
    fn deeply_nested_saves_are_parse_errors() {
        std::thread::Builder::new()
            .stack_size(512 << 10)
            .spawn(|| {
                for deep in [
                    "(".repeat(200_000),
                    format!("(npcs: {})", "[".repeat(200_000)),
                    format!("(npcs: [], conversations: [{}", "(".repeat(200_000)),
                ] {
                    assert!(matches!(
                        parse_dialogue(&deep),
                        Err(DialogueError::Parse { .. })
                    ));
                }
            })
            .unwrap()
            .join()
            .unwrap();
    }

    /// Every number a save carries has an upper bound: values a game could
    /// never have written (near `u32::MAX`, `usize::MAX`, huge times) are
    /// typed errors before anything is loaded, and the largest accepted ones
    /// load and run without overflowing.
    #[test]
    fn numbers_near_their_type_limits_are_refused() {
        let base = || DialogueSnapshot {
            npcs: vec![npc("Mira"), npc("Brom")],
            conversations: vec![conv(&["Mira", "Brom"], false)],
        };
        type Edit = fn(&mut DialogueSnapshot);
        let cases: Vec<(&str, Edit)> = vec![
            ("retries", |s| s.conversations[0].retries = u32::MAX),
            ("fallbacks", |s| s.conversations[0].fallbacks = u32::MAX - 1),
            ("max_tokens", |s| {
                s.conversations[0].limits.max_tokens = u32::MAX
            }),
            ("max_lines", |s| {
                s.conversations[0].limits.max_lines = usize::MAX
            }),
            ("max_line_chars", |s| {
                s.conversations[0].limits.max_line_chars = usize::MAX;
            }),
            ("max_prompt_lines", |s| {
                s.conversations[0].limits.max_prompt_lines = usize::MAX;
            }),
            ("line time", |s| {
                s.conversations[0].lines.push(TranscriptLine {
                    speaker: "Mira".into(),
                    text: "Hi.".into(),
                    time: 1e300,
                });
            }),
            ("memory time", |s| {
                s.npcs[0].memory.entries.push(MemoryEntry {
                    time: -1e300,
                    text: "x".into(),
                    importance: 0.5,
                    about: vec![],
                });
            }),
        ];
        for (what, edit) in cases {
            let mut s = base();
            edit(&mut s);
            let text = ron::ser::to_string(&s).unwrap();
            match parse_dialogue(&text) {
                Err(DialogueError::Invalid(m)) => assert!(!m.is_empty(), "{what}"),
                other => panic!("{what}: {other:?}"),
            }
        }
        // The largest accepted values load.
        let mut s = base();
        let c = &mut s.conversations[0];
        c.retries = MAX_SAVED_COUNT;
        c.fallbacks = MAX_SAVED_COUNT;
        c.limits.max_tokens = MAX_SAVED_LINE_TOKENS;
        c.limits.max_lines = MAX_SAVED_LINES;
        c.limits.max_line_chars = MAX_SAVED_TEXT_CHARS;
        c.limits.max_prompt_lines = MAX_SAVED_LINES;
        let mut world = World::new();
        load_dialogue(&mut world, &ron::ser::to_string(&s).unwrap()).unwrap();
        let conv = world.query::<&Conversation>().single(&world).unwrap();
        assert_eq!(conv.retries, MAX_SAVED_COUNT);
    }

    #[test]
    fn inconsistent_saves_are_typed_errors_and_leave_the_world_alone() {
        let player_without_names = DialogueSnapshot {
            npcs: vec![npc("Mira")],
            conversations: vec![conv(&[], true)],
        };
        let mut unknown = DialogueSnapshot {
            npcs: vec![npc("Mira")],
            conversations: vec![conv(&["Mira", "Ghost"], false)],
        };
        let mut cases = vec![
            ("player conversation without names", player_without_names),
            ("unknown NPC", unknown.clone()),
        ];
        unknown.conversations = vec![conv(&["Mira"], false)];
        cases.push(("one-NPC conversation", unknown.clone()));
        unknown.npcs = vec![npc("Mira"), npc("Mira")];
        unknown.conversations = vec![];
        cases.push(("duplicate names", unknown.clone()));
        let mut s = DialogueSnapshot {
            npcs: vec![npc("Mira"), npc("Brom")],
            conversations: vec![conv(&["Mira", "Brom"], false)],
        };
        s.conversations[0].next_speaker = 2;
        cases.push(("next_speaker out of range", s.clone()));
        s.conversations[0].next_speaker = 0;
        s.conversations.push(conv(&["Brom", "Traveler"], true));
        cases.push(("NPC in two conversations", s.clone()));
        s.conversations.pop();
        s.conversations[0].lines.push(TranscriptLine {
            speaker: "Nobody".into(),
            text: "hi".into(),
            time: 0.0,
        });
        cases.push(("line by a stranger", s.clone()));
        s.conversations[0].lines.clear();
        s.conversations[0].limits.max_lines = 0;
        cases.push(("zero limits", s.clone()));
        s.conversations[0].limits.max_lines = 8;
        s.npcs[0].memory.entries.push(MemoryEntry {
            time: f64::NAN,
            text: "x".into(),
            importance: 0.5,
            about: vec![],
        });
        cases.push(("NaN memory time", s.clone()));
        for (what, snap) in cases {
            let text = ron::ser::to_string(&snap).unwrap();
            let mut world = world_with_a_conversation();
            let before = snapshot(&mut world);
            let err = load_dialogue(&mut world, &text).expect_err(what);
            assert!(matches!(err, DialogueError::Invalid(_)), "{what}: {err}");
            assert_eq!(snapshot(&mut world), before, "{what}: world changed");
            let convs = world.query::<&Conversation>().iter(&world).count();
            assert_eq!(convs, 1, "{what}: conversation despawned");
        }
    }

    fn text() -> impl Strategy<Value = String> {
        "[a-zA-Z0-9 .,!?'éİß🦊\"\\\\]{0,24}"
    }

    fn finite() -> impl Strategy<Value = f64> {
        prop_oneof![
            -1e12f64..1e12,
            Just(0.0),
            Just(MAX_SAVED_TIME),
            Just(-MAX_SAVED_TIME),
            Just(f64::MIN_POSITIVE)
        ]
    }

    prop_compose! {
        fn valid_snapshot()(
            names in proptest::collection::btree_set("[A-Z][a-z]{1,6}", 2..6),
            texts in proptest::collection::vec(text(), 8),
            times in proptest::collection::vec(finite(), 8),
            imp in 0f32..1.0,
            with_player in any::<bool>(),
            n_lines in 0usize..6,
            next in 0usize..2,
            state in prop_oneof![
                Just(ConversationState::Active),
                Just(ConversationState::Closing),
                Just(ConversationState::AwaitingPlayer),
                Just(ConversationState::Summarizing),
            ],
        ) -> DialogueSnapshot {
            let names: Vec<String> = names.into_iter().collect();
            let npcs = names.iter().enumerate().map(|(i, n)| NpcSnapshot {
                persona: Persona {
                    name: n.clone(),
                    identity: texts[i % 8].clone(),
                    traits: vec![texts[(i + 1) % 8].clone()],
                    speaking_style: texts[(i + 2) % 8].clone(),
                    goal: String::new(),
                },
                memory: NpcMemory {
                    entries: vec![MemoryEntry {
                        time: times[i % 8],
                        text: texts[(i + 3) % 8].clone(),
                        importance: imp,
                        about: vec![names[(i + 1) % names.len()].clone()],
                    }],
                },
            }).collect();
            let cnames: Vec<String> = if with_player {
                vec![names[0].clone(), "Traveler".into()]
            } else {
                names[..2].to_vec()
            };
            let lines = (0..n_lines).map(|i| TranscriptLine {
                speaker: cnames[i % 2].clone(),
                text: texts[i % 8].clone(),
                time: times[(i + 4) % 8],
            }).collect();
            DialogueSnapshot {
                npcs,
                conversations: vec![ConversationSnapshot {
                    names: cnames,
                    with_player,
                    topic: Some(texts[7].clone()),
                    lines,
                    next_speaker: next,
                    state,
                    limits: ConversationLimits::default(),
                    retries: 1,
                    fallbacks: 0,
                }],
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

        /// Any valid snapshot survives save text → parse → validate exactly,
        /// and loads into a world that saves the same text again.
        #[test]
        fn valid_saves_round_trip_exactly(snap in valid_snapshot()) {
            let text = ron::ser::to_string_pretty(&snap, ron::ser::PrettyConfig::default()).unwrap();
            let back = parse_dialogue(&text).map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(&back, &snap);
            let mut world = World::new();
            load_dialogue(&mut world, &text).map_err(|e| TestCaseError::fail(e.to_string()))?;
            let mut again = snapshot(&mut world);
            again.conversations.sort_by(|a, b| a.names.cmp(&b.names));
            prop_assert_eq!(again, snap);
        }
    }
}
