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

fn town_runs(s: LlmSettings) {
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
}

/// Game time at which each conversation started.
#[derive(Resource, Default)]
struct Starts(Vec<f64>);

/// The town over 16 minutes of game time, bounded by frames: each frame is
/// 80 ms of game time on a manual clock (about 6x real time at this pacing);
/// inference runs in real time beside it. Conversations keep starting in every
/// 4-minute window, every one that starts ends, and nothing piles up
/// (entities, conversation entities).
#[test]
fn town_keeps_talking_for_sixteen_game_minutes() {
    let mut s = settings();
    s.max_parallel_sequences = 4;
    let mut app = town_app(s);
    {
        let mut d = app.world_mut().resource_mut::<DialogueSettings>();
        d.cooldown_secs = 60.0;
        // Real-time inference against a fast game clock: generous time-outs.
        d.timeouts.line_secs = 1800.0;
        d.timeouts.summary_secs = 1800.0;
    }
    app.init_resource::<Starts>();
    app.add_observer(
        |_: On<ConversationStarted>, time: Res<Time>, mut s: ResMut<Starts>| {
            s.0.push(time.elapsed_secs_f64());
        },
    );
    app.insert_resource(TimeUpdateStrategy::ManualDuration(Duration::from_millis(
        80,
    )));
    app.insert_resource(TownConfig {
        npcs: 6,
        ..Default::default()
    });
    const FRAMES_PER_MIN: usize = 750;
    const MINUTES: usize = 16;
    let mut entities_after_warmup = None;
    let mut max_entities = 0;
    for frame in 0..MINUTES * FRAMES_PER_MIN {
        app.update();
        std::thread::sleep(Duration::from_millis(12));
        let n = app.world().entities().count_spawned();
        max_entities = max_entities.max(n);
        if frame == 2 * FRAMES_PER_MIN {
            entities_after_warmup = Some(n);
        }
    }
    let game_secs = app.world().resource::<Time>().elapsed_secs_f64();
    // Stop meeting; every conversation still open ends (bounded frames).
    app.world_mut()
        .resource_mut::<TownConfig>()
        .max_conversations = 0;
    for _ in 0..30_000 {
        app.update();
        std::thread::sleep(Duration::from_millis(10));
        let w = app.world_mut();
        if w.query::<&Conversation>().iter(w).count() == 0 {
            break;
        }
    }
    let town = app.world().resource::<TownStats>().clone();
    let dialogue = app.world().resource::<DialogueStats>().clone();
    let starts = app.world().resource::<Starts>().0.clone();
    let windows: Vec<usize> = (0..MINUTES / 4)
        .map(|w| {
            let (a, b) = (w as f64 * 240.0, (w + 1) as f64 * 240.0);
            starts.iter().filter(|t| **t >= a && **t < b).count()
        })
        .collect();
    eprintln!(
        "town: {town:?}\ndialogue: {dialogue:?}\n{game_secs:.0} game-s; started per 4 game-minutes {windows:?}; entities after warm-up {entities_after_warmup:?}, max {max_entities}"
    );
    for (w, n) in windows.iter().enumerate() {
        assert!(
            *n >= 1,
            "no conversation started in window {w}: {windows:?}"
        );
    }
    assert!(town.started >= 4, "{town:?}");
    assert_eq!(town.started, town.ended, "every started conversation ended");
    assert_eq!(dialogue.started, dialogue.ended);
    let w = app.world_mut();
    assert_eq!(w.query::<&Conversation>().iter(w).count(), 0);
    // Flat: at the end, no more entities than after warm-up.
    let end = app.world().entities().count_spawned();
    assert!(
        end <= entities_after_warmup.unwrap(),
        "{end} entities at the end, {entities_after_warmup:?} after warm-up"
    );
    assert!(max_entities < 200, "{max_entities}");
}
