//! The AI town's simulation, headless, with the real model: villagers meet
//! and hold conversations that follow the dialogue rules.

mod common;

#[path = "../examples/ai_town/town.rs"]
#[allow(dead_code)]
mod town;

use std::time::Duration;

use bevy::prelude::*;
use bevy::time::TimeUpdateStrategy;
use bevy_npc_llm::dialogue::{Conversation, DialogueSettings, DialogueStats};
use bevy_npc_llm::prelude::*;
use common::*;
use town::*;

#[test]
fn town_villagers_meet_and_talk_headless() {
    let mut s = settings();
    s.max_parallel_sequences = 4;
    town_runs(s);
}

/// The same town with gap fillers and even prompt steps (a GPU plan's
/// defaults, here on the CPU backend): a silent villager's slot between two
/// speaking ones gets a throw-away token in their steps, prompts read
/// beside others may be padded to one width, all removed again; the
/// conversations follow the same rules.
#[test]
fn town_talks_with_gap_fillers() {
    let mut s = settings();
    s.max_parallel_sequences = 4;
    s.gpu.fill_gaps = Some(true);
    s.gpu.even_prompt_steps = Some(true);
    let counters = town_runs(s);
    assert!(counters.gap_fillers > 0, "no gap was filled: {counters:?}");
}

/// The same town served by llama-server through the remote backend
/// (`ai_town --remote URL`).
#[test]
fn town_runs_unchanged_on_the_remote_backend() {
    let server = common::servers::llama_server();
    let mut s = settings();
    s.max_parallel_sequences = 4;
    s.backend = BackendChoice::Remote;
    s.remote = RemoteSettings::new(server.url.clone());
    town_runs(s);
}

#[derive(Resource, Default)]
struct Ended(Vec<ConversationEnded>);

fn town_app(s: LlmSettings) -> App {
    let mut app = app_with(s);
    app.add_plugins(NpcDialoguePlugin);
    app.init_resource::<Ended>();
    app.add_observer(|e: On<ConversationEnded>, mut l: ResMut<Ended>| {
        l.0.push(e.event().clone());
    });
    app.add_plugins(TownPlugin {
        agents: load_agents(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/assets/town/agents.ron"
        )),
    });
    app
}

/// Runs the town until two conversations ended and checks them; returns the
/// engine's counters.
fn town_runs(s: LlmSettings) -> bevy_npc_llm::EngineCounters {
    let remote = s.backend == BackendChoice::Remote;
    let mut app = town_app(s);
    app.insert_resource(TownConfig {
        npcs: 4,
        // Everyone starts close enough to meet at once.
        meet_distance: 1000.0,
        ..Default::default()
    });
    // A bounded number of updates (and a time limit so it cannot hang).
    let mut updates = 0;
    run_until(&mut app, 300, |app| {
        updates += 1;
        let s = app.world().resource::<TownStats>();
        s.ended >= 2 || updates > 200_000
    });
    let stats = app.world().resource::<TownStats>().clone();
    assert!(stats.started >= 2, "{stats:?}");
    assert!(stats.ended >= 2, "{stats:?}");
    assert!(stats.lines >= 4, "{stats:?}");
    let ended = app.world().resource::<Ended>().0.clone();
    assert!(ended.len() >= 2);
    assert_eq!(
        app.world()
            .resource::<LlmEngineStats>()
            .remote_server
            .is_some(),
        remote
    );
    for c in &ended {
        assert!(c.transcript.len() >= 2 && c.transcript.len() <= 8);
        for (i, l) in c.transcript.iter().enumerate() {
            assert_eq!(l.speaker, c.names[i % c.names.len()]);
            assert!(!l.text.trim().is_empty() && !l.text.contains("<|"));
            for other in c.names.iter().filter(|n| **n != l.speaker) {
                assert!(!l.text.contains(&format!("{other}:")), "{}", l.text);
            }
        }
    }
    app.world().resource::<LlmEngineStats>().counters.clone()
}

/// The town past many conversations, bounded by frames: each frame is
/// 100 ms of game time on a manual clock; inference runs in real time beside
/// it. The town keeps starting conversations long after its first
/// `max_conversations` (36c2f29 went silent after 3 ever), every one that
/// starts ends, and nothing piles up (entities, conversation entities).
/// The per-10-game-minute rate over an hour is `scripts/town-soak.sh`'s.
#[test]
fn town_keeps_talking_past_many_conversations() {
    let mut s = settings();
    s.max_parallel_sequences = 4;
    let mut app = town_app(s);
    {
        let mut d = app.world_mut().resource_mut::<DialogueSettings>();
        d.cooldown_secs = 60.0;
        d.limits.max_lines = 4;
        // Real-time inference against a fast game clock: generous time-outs.
        d.timeouts.line_secs = 3600.0;
        d.timeouts.summary_secs = 3600.0;
    }
    app.insert_resource(TimeUpdateStrategy::ManualDuration(Duration::from_millis(
        100,
    )));
    app.insert_resource(TownConfig {
        npcs: 6,
        ..Default::default()
    });
    const TARGET: usize = 7;
    let mut entities_early = None;
    let mut max_entities = 0;
    let mut frames = 0;
    while frames < 300_000 && app.world().resource::<TownStats>().started < TARGET {
        app.update();
        frames += 1;
        std::thread::sleep(Duration::from_millis(4));
        let n = app.world().entities().count_spawned();
        max_entities = max_entities.max(n);
        if entities_early.is_none() && app.world().resource::<TownStats>().ended >= 1 {
            entities_early = Some(n);
        }
    }
    let game_secs = app.world().resource::<Time>().elapsed_secs_f64();
    // Stop meeting; every conversation still open ends (bounded frames).
    app.world_mut()
        .resource_mut::<TownConfig>()
        .max_conversations = 0;
    for _ in 0..100_000 {
        app.update();
        std::thread::sleep(Duration::from_millis(4));
        let w = app.world_mut();
        if w.query::<&Conversation>().iter(w).count() == 0 {
            break;
        }
    }
    let town = app.world().resource::<TownStats>().clone();
    let dialogue = app.world().resource::<DialogueStats>().clone();
    eprintln!(
        "town: {town:?}\ndialogue: {dialogue:?}\n{frames} frames, {game_secs:.0} game-s; entities after the first end {entities_early:?}, max {max_entities}"
    );
    assert!(town.started >= TARGET, "the town went silent: {town:?}");
    assert_eq!(town.started, town.ended, "every started conversation ended");
    assert_eq!(dialogue.started, dialogue.ended);
    let w = app.world_mut();
    assert_eq!(w.query::<&Conversation>().iter(w).count(), 0);
    // Flat: at the end, no more entities than when the first conversation ended.
    let end = app.world().entities().count_spawned();
    assert!(
        end <= entities_early.unwrap(),
        "{end} entities at the end, {entities_early:?} after the first end"
    );
    assert!(max_entities < 200, "{max_entities}");
}
