//! Scenarios a game produces, with the real SmolLM2 model, in a headless
//! `App`: the player interrupting villagers mid-line, the player talking
//! again and again, cancel and despawn storms while the player's prompt is
//! read, and a context too small for everyone. Bounded by frame counts.

mod common;

use bevy::prelude::*;
use bevy_npc_llm::errors::LlmError;
use bevy_npc_llm::prelude::*;
use bevy_npc_llm::request::RequestPriority;
use common::*;

/// Frames a scenario may take before it is declared hung. Each frame sleeps
/// a millisecond, so the worker gets the CPU it needs either way.
const FRAMES: u32 = 400_000;

/// Update until `done` holds; panics after `frames` frames.
fn run_frames(app: &mut App, frames: u32, mut done: impl FnMut(&mut App) -> bool) -> u32 {
    for frame in 0..frames {
        app.update();
        if done(app) {
            return frame;
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    panic!(
        "not done after {frames} frames; recorded: {:?}",
        app.world().resource::<Recorded>().0
    );
}

fn finish_all(app: &mut App, es: &[Entity]) {
    let es = es.to_vec();
    run_frames(app, FRAMES, move |app| {
        let r = app.world().resource::<Recorded>();
        es.iter().all(|e| r.finished(*e))
    });
}

fn decode_calls(app: &App) -> u64 {
    app.world()
        .resource::<LlmEngineStats>()
        .counters
        .decode_calls
}

/// After the work is done the worker takes no more decode steps and holds
/// no request.
fn assert_worker_idle(app: &mut App) {
    let idle = |app: &mut App| {
        for _ in 0..50 {
            app.update();
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    };
    idle(app); // the last counters arrive
    let before = decode_calls(app);
    idle(app);
    idle(app);
    assert_eq!(decode_calls(app), before, "the worker kept stepping");
    let stats = app.world().resource::<LlmEngineStats>();
    assert_eq!(stats.in_flight, 0);
    assert_eq!(stats.counters.active_sequences, 0);
}

fn npc_line(i: usize) -> LlmRequest {
    let topics = [
        "the harvest",
        "the river",
        "the old mill",
        "the blacksmith",
        "the market",
        "the weather",
        "the festival",
        "the wolves",
    ];
    LlmRequest::chat([
        ChatMessage::system(format!(
            "You are villager number {i}. Speak about {} in a few sentences.",
            topics[i % topics.len()]
        )),
        ChatMessage::user("What is new in the village?"),
    ])
    .with_temperature(0.0)
    .with_seed(1)
    .with_max_tokens(40)
}

fn player_line() -> LlmRequest {
    LlmRequest::chat([
        ChatMessage::system("You are Mira, the innkeeper. Answer the traveller briefly."),
        ChatMessage::user(
            "Good evening! Do you have a room for the night, and what is for supper?",
        ),
    ])
    .with_priority(RequestPriority::High)
    .with_temperature(0.0)
    .with_max_tokens(24)
}

fn scenario_settings() -> LlmSettings {
    let mut s = settings();
    s.max_parallel_sequences = 8;
    s.context_per_sequence = 512;
    s
}

fn texts(app: &App, es: &[Entity]) -> Vec<Option<String>> {
    let r = app.world().resource::<Recorded>();
    es.iter().map(|e| r.completed_text(*e)).collect()
}

fn tokens_so_far(app: &App, e: Entity) -> usize {
    app.world()
        .resource::<Recorded>()
        .of(e)
        .iter()
        .filter(|r| matches!(r, Rec::Token(..)))
        .count()
}

/// (a) Eight villagers mid-line, then the player speaks: all nine finish,
/// the villagers say exactly what they say without the interruption
/// (greedy sampling), and the worker goes idle afterwards. This hung before
/// the scheduler (the villagers that sat out for the player's prompt never
/// produced another token).
#[test]
fn a_player_request_mid_line_lets_every_villager_finish_unchanged() {
    // Reference: the villagers alone.
    let mut quiet = app_with(scenario_settings());
    load_ready(&mut quiet, None);
    let alone: Vec<Entity> = (0..8).map(|i| request(&mut quiet, npc_line(i))).collect();
    finish_all(&mut quiet, &alone);
    let expected = texts(&quiet, &alone);
    assert!(expected.iter().all(Option::is_some), "{expected:?}");
    drop(quiet);

    let mut app = app_with(scenario_settings());
    load_ready(&mut app, None);
    let npcs: Vec<Entity> = (0..8).map(|i| request(&mut app, npc_line(i))).collect();
    // Mid-line: every villager has streamed a few tokens.
    let wait = npcs.clone();
    run_frames(&mut app, FRAMES, move |app| {
        wait.iter().all(|e| tokens_so_far(app, *e) >= 3)
    });
    let r = app.world().resource::<Recorded>();
    assert!(
        npcs.iter().all(|e| !r.finished(*e)),
        "a villager finished before the player spoke: raise max_tokens"
    );
    let player = request(&mut app, player_line());
    let mut all = npcs.clone();
    all.push(player);
    finish_all(&mut app, &all);
    let r = app.world().resource::<Recorded>();
    assert!(r.completed_text(player).is_some(), "{:?}", r.of(player));
    assert_eq!(texts(&app, &npcs), expected, "villager lines changed");
    assert_worker_idle(&mut app);
}

/// (b) The player keeps talking (a High request every few frames) while
/// villagers talk: the villagers still finish, and so does every player line.
#[test]
fn villagers_finish_while_the_player_keeps_talking() {
    let mut app = app_with(scenario_settings());
    load_ready(&mut app, None);
    let npcs: Vec<Entity> = (0..4).map(|i| request(&mut app, npc_line(i))).collect();
    let mut players = Vec::new();
    let mut frame = 0u32;
    loop {
        app.update();
        std::thread::sleep(std::time::Duration::from_millis(1));
        frame += 1;
        assert!(frame < FRAMES, "villagers never finished");
        let r = app.world().resource::<Recorded>();
        if npcs.iter().all(|e| r.finished(*e)) {
            break;
        }
        // A new player line every 5 frames, at most two waiting at a time.
        let open = players.iter().filter(|e| !r.finished(**e)).count();
        if frame.is_multiple_of(5) && open < 2 {
            let line = player_line().with_max_tokens(4);
            players.push(request(&mut app, line));
        }
    }
    finish_all(&mut app, &players);
    let r = app.world().resource::<Recorded>();
    for e in npcs.iter().chain(&players) {
        assert!(r.completed_text(*e).is_some(), "{:?}", r.of(*e));
    }
    assert!(
        players.len() >= 3,
        "the player spoke only {} times",
        players.len()
    );
    assert_worker_idle(&mut app);
}

/// (c) Cancels and despawns while the player's long prompt is being read:
/// the player's request completes, every cancelled one reports
/// `LlmCancelled` once, despawned ones report nothing more, the rest
/// complete, and no slot leaks (eight new requests all run afterwards).
#[test]
fn cancel_and_despawn_storm_while_the_player_prompt_is_read() {
    let mut s = scenario_settings();
    s.context_per_sequence = 1024;
    let mut app = app_with(s);
    load_ready(&mut app, None);
    let npcs: Vec<Entity> = (0..7).map(|i| request(&mut app, npc_line(i))).collect();
    let wait = npcs.clone();
    run_frames(&mut app, FRAMES, move |app| {
        wait.iter().all(|e| tokens_so_far(app, *e) >= 1)
    });
    // A long player prompt: several hundred tokens to read.
    let story =
        "The road from the mountains was long and cold, and the wind never stopped. ".repeat(30);
    let player = request(
        &mut app,
        LlmRequest::chat([
            ChatMessage::system("You are Mira, the innkeeper."),
            ChatMessage::user(format!("{story} Do you have a room?")),
        ])
        .with_priority(RequestPriority::High)
        .with_max_tokens(8),
    );
    app.update();
    // The storm: cancel two by message, two by removing the request,
    // despawn two; submit three more and cancel them at once.
    app.world_mut()
        .write_message(CancelLlmRequest { entity: npcs[0] });
    app.world_mut()
        .write_message(CancelLlmRequest { entity: npcs[1] });
    app.world_mut().entity_mut(npcs[2]).remove::<LlmRequest>();
    app.world_mut().entity_mut(npcs[3]).remove::<LlmRequest>();
    let before_despawn: Vec<usize> = npcs[4..6]
        .iter()
        .map(|e| app.world().resource::<Recorded>().of(*e).len())
        .collect();
    app.world_mut().despawn(npcs[4]);
    app.world_mut().despawn(npcs[5]);
    let late: Vec<Entity> = (0..3).map(|i| request(&mut app, npc_line(i))).collect();
    app.update();
    for e in &late {
        app.world_mut()
            .write_message(CancelLlmRequest { entity: *e });
    }
    let mut watch = vec![player, npcs[0], npcs[1], npcs[2], npcs[3], npcs[6]];
    watch.extend(&late);
    finish_all(&mut app, &watch);
    let r = app.world().resource::<Recorded>();
    assert!(r.completed_text(player).is_some(), "{:?}", r.of(player));
    assert!(r.completed_text(npcs[6]).is_some(), "{:?}", r.of(npcs[6]));
    for e in npcs[..4].iter().chain(&late) {
        let recs = r.of(*e);
        let ends = recs
            .iter()
            .filter(|x| matches!(x, Rec::Completed(..) | Rec::Failed(..) | Rec::Cancelled(_)))
            .count();
        assert_eq!(ends, 1, "{recs:?}");
        assert!(
            recs.iter().any(|x| matches!(x, Rec::Cancelled(_))),
            "{recs:?}"
        );
    }
    for (e, n) in npcs[4..6].iter().zip(before_despawn) {
        assert_eq!(r.of(*e).len(), n, "events after despawn");
    }
    // No slot leaked: eight new requests all complete.
    let again: Vec<Entity> = (0..8)
        .map(|i| request(&mut app, npc_line(i).with_max_tokens(6)))
        .collect();
    finish_all(&mut app, &again);
    let r = app.world().resource::<Recorded>();
    assert!(again.iter().all(|e| r.completed_text(*e).is_some()));
    assert_worker_idle(&mut app);
}

/// (d) A context too small for what is asked: requests wait for slots, a
/// prompt that cannot fit fails typed, answers stop at the context's end,
/// and everything else completes.
#[test]
fn a_context_too_small_for_everyone_makes_some_wait_and_one_fail_typed() {
    let mut s = settings();
    s.max_parallel_sequences = 2;
    s.context_per_sequence = 128;
    s.batch_size = 64;
    s.sampling.max_tokens = 100;
    let mut app = app_with(s);
    load_ready(&mut app, None);
    let short: Vec<Entity> = (0..6)
        .map(|i| {
            request(
                &mut app,
                LlmRequest::chat([
                    ChatMessage::system("You are a storyteller."),
                    ChatMessage::user(format!("Tell a long tale about hero number {i}.")),
                ])
                .with_temperature(0.0)
                .with_max_tokens(100),
            )
        })
        .collect();
    let huge = request(
        &mut app,
        chat(&"Listen to this very long complaint about taxes. ".repeat(40)),
    );
    let mut all = short.clone();
    all.push(huge);
    finish_all(&mut app, &all);
    let r = app.world().resource::<Recorded>();
    assert!(
        matches!(r.failure(huge), Some(LlmError::PromptTooLong { .. })),
        "{:?}",
        r.of(huge)
    );
    for e in &short {
        assert!(r.completed_text(*e).is_some(), "{:?}", r.of(*e));
    }
    // At most two ran at once: the others waited.
    let stats = app.world().resource::<LlmEngineStats>();
    assert!(stats.counters.max_batch_sequences <= 3);
    assert_worker_idle(&mut app);
}

/// Gemma 3 (sliding window of 512 tokens): an NPC's cached prefix longer
/// than the window is reused only while the KV still holds the window it
/// needs. With `swa_full` on the whole prefix is kept and reused; with it off
/// the early window is gone and the prompt is read again. Either way the
/// answer is the uncached one.
#[test]
fn sliding_window_prefix_reuse_is_right_with_and_without_swa_full() {
    let record = |i: usize| {
        format!(
            "Record {i}: the granary of the village held {} sacks. ",
            i * 7 % 50
        )
    };
    let lore: String = (0..60).map(record).collect();
    let first = format!("{lore}\nQuestion: which record held the most sacks?\nAnswer:");
    // The second prompt leaves the first after 40 records: with a 64-token
    // ubatch the SWA cache holds 768 cells, so after the first answer its
    // earliest position is far past (shared prefix - window).
    let shared: String = (0..40).map(record).collect();
    let second = format!("{shared}\nQuestion: who keeps the granary keys?\nAnswer:");
    let run = |swa_full: bool, cache: bool| {
        let mut s = settings();
        s.model = GEMMA.into();
        s.context_per_sequence = 2048;
        s.max_parallel_sequences = 2;
        s.batch_size = 64;
        s.prefix_cache = cache;
        s.swa_full = swa_full;
        let mut app = app_with(s);
        load_ready(&mut app, None);
        let npc = app.world_mut().spawn_empty().id();
        let req = |text: &str, n| {
            LlmRequest::raw(text)
                .with_cache_key(npc)
                .with_temperature(0.0)
                .with_max_tokens(n)
        };
        app.world_mut().entity_mut(npc).insert(req(&first, 64));
        finish_all(&mut app, &[npc]);
        app.world_mut().resource_mut::<Recorded>().0.clear();
        app.world_mut().entity_mut(npc).insert(req(&second, 8));
        finish_all(&mut app, &[npc]);
        let r = app.world().resource::<Recorded>();
        let Some(Rec::Started(_, prompt, reused)) = r.of(npc).first().cloned() else {
            panic!("{:?}", r.of(npc))
        };
        (prompt, reused, r.completed_text(npc).unwrap())
    };
    let (prompt, _, uncached) = run(true, false);
    assert!(
        prompt > 600,
        "the shared prefix must be longer than the window: {prompt}"
    );
    let (_, reused_full, full) = run(true, true);
    let (_, reused_window, window) = run(false, true);
    eprintln!(
        "prompt {prompt} tokens; reused with swa_full {reused_full}, without {reused_window}; \
         uncached {uncached:?}, full {full:?}, window {window:?}"
    );
    assert!(
        reused_full > 512,
        "swa_full keeps the whole prefix: {reused_full}"
    );
    assert_eq!(reused_window, 0, "the dropped window must be read again");
    assert_eq!(window, uncached);
    assert_eq!(full, uncached);
}
