//! The AI town's simulation, headless, with the real model: villagers meet
//! and hold conversations that follow the dialogue rules.

mod common;

#[path = "../examples/ai_town/town.rs"]
#[allow(dead_code)]
mod town;

use bevy::prelude::*;
use bevy_npc_llm::dialogue::Conversation;
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

fn town_runs(s: LlmSettings) {
    let remote = s.backend == BackendChoice::Remote;
    let mut app = app_with(s);
    app.add_plugins(NpcDialoguePlugin);
    app.add_plugins(TownPlugin {
        agents: load_agents(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/assets/town/agents.ron"
        )),
    });
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
    let w = app.world_mut();
    let mut q = w.query::<&Conversation>();
    let ended: Vec<Conversation> = q
        .iter(w)
        .filter(|c| c.state == ConversationState::Ended)
        .cloned()
        .collect();
    assert!(ended.len() >= 2);
    assert_eq!(
        app.world()
            .resource::<LlmEngineStats>()
            .remote_server
            .is_some(),
        remote
    );
    for c in &ended {
        assert!(c.lines.len() >= 2 && c.lines.len() <= c.limits.max_lines);
        for (i, l) in c.lines.iter().enumerate() {
            assert_eq!(l.speaker, c.names[i % c.names.len()]);
            assert!(!l.text.trim().is_empty() && !l.text.contains("<|"));
            for other in c.names.iter().filter(|n| **n != l.speaker) {
                assert!(!l.text.contains(&format!("{other}:")), "{}", l.text);
            }
        }
    }
}
