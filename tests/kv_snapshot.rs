//! NPC KV snapshots with the real models: an NPC's cached prompt taken
//! from one engine, kept as bytes, given to a fresh engine, and its next
//! line read from it — the greedy text the first engine gives when never
//! saved (and, for this short history, the text of a full read). Damaged or foreign snapshots are refused, typed, and the NPC
//! reads its prompt again.

mod common;

use bevy::ecs::message::Messages;
use bevy::prelude::*;
use bevy_npc_llm::NpcKvSnapshot;
use bevy_npc_llm::errors::KvSnapshotError;
use bevy_npc_llm::events::{NpcKvRestored, NpcKvSaved, RestoreNpcKv, SaveNpcKv};
use bevy_npc_llm::prelude::*;
use common::*;

/// The first `M` written after this call, within `secs` seconds.
fn next_message<M: Message + Clone>(app: &mut App, send: impl FnOnce(&mut World)) -> M {
    let mut cursor = app.world().resource::<Messages<M>>().get_cursor_current();
    send(app.world_mut());
    let mut got = None;
    run_until(app, 60, |app| {
        got = cursor
            .read(app.world().resource::<Messages<M>>())
            .next()
            .cloned();
        got.is_some()
    });
    got.expect("a message")
}

fn history() -> Vec<ChatMessage> {
    let mut msgs = vec![ChatMessage::system(
        "You are Ilse, the miller's daughter. You are curious and quick, you know every \
         path through the forest, and you never tell a lie.",
    )];
    for i in 0..8 {
        msgs.push(ChatMessage::user(format!(
            "Traveller {i}: which way to the old bridge number {i}?"
        )));
        msgs.push(ChatMessage::assistant(format!(
            "Past the mill, then left at stone {i}. Mind the geese."
        )));
    }
    msgs.push(ChatMessage::user("Good morning, Ilse."));
    msgs
}

fn greedy(messages: Vec<ChatMessage>) -> LlmRequest {
    LlmRequest::chat(messages)
        .with_seed(3)
        .with_temperature(0.0)
        .with_max_tokens(16)
}

fn restore(app: &mut App, key: CacheKey, s: NpcKvSnapshot) -> Result<(), KvSnapshotError> {
    let restored: NpcKvRestored = next_message(app, |w| {
        w.write_message(RestoreNpcKv {
            snapshots: vec![(key, s)],
        });
    });
    assert_eq!(restored.results.len(), 1);
    assert_eq!(restored.results[0].0, key);
    restored.results[0].1.clone()
}

#[test]
fn a_restored_npc_speaks_from_its_saved_kv_with_the_text_of_a_fresh_read() {
    let first = history();
    let mut second = first.clone();
    second.push(ChatMessage::user("Is the river high today?"));

    // The NPC speaks once; its cache is saved (a stranger's key has none).
    let mut a = app();
    let npc = a.world_mut().spawn_empty().id();
    cached_turn(&mut a, npc, &greedy(first));
    let stranger = CacheKey(0xdead_beef);
    let saved: NpcKvSaved = next_message(&mut a, |w| {
        w.write_message(SaveNpcKv {
            keys: vec![CacheKey::from(npc), stranger],
        });
    });
    assert_eq!(saved.snapshots.len(), 2);
    assert_eq!(
        saved.snapshots[1],
        (stranger, Err(KvSnapshotError::NotCached))
    );
    let snapshot = saved.snapshots[0].1.clone().expect("the NPC's snapshot");
    assert!(snapshot.token_count() > 100, "{snapshot:?}");
    assert!(snapshot.blob_len() > 0);
    // Kept as bytes, as a save file would.
    let bytes = snapshot.to_bytes();
    // What the NPC says next had the game never been saved.
    let (_, reused_a, never_saved) = cached_turn(&mut a, npc, &greedy(second.clone()));
    assert!(reused_a > 100);
    drop(a);

    // A fresh engine: the same next turn read from the snapshot...
    let mut b = app();
    load_ready(&mut b, None);
    let npc_b = b.world_mut().spawn_empty().id();
    let read_back = NpcKvSnapshot::from_bytes(&bytes).expect("readable");
    assert_eq!(restore(&mut b, CacheKey::from(npc_b), read_back), Ok(()));
    let (prompt, reused, restored_text) = cached_turn(&mut b, npc_b, &greedy(second.clone()));
    assert!(
        reused + 20 >= snapshot.token_count().min(prompt) && reused > 100,
        "reused {reused} of {prompt} prompt tokens; the snapshot held {}",
        snapshot.token_count()
    );
    // ... the same text, token for token (the same KV, the same batches).
    assert_eq!(restored_text, never_saved);
    // Read in full on another fresh engine: the same greedy text too.
    let mut c = app();
    let npc_c = c.world_mut().spawn_empty().id();
    let (_, reused_c, fresh_text) = cached_turn(&mut c, npc_c, &greedy(second));
    assert_eq!(reused_c, 0);
    assert_eq!(restored_text, fresh_text);
}

/// Gemma 3 (sliding-window attention, no chat template), over a prompt
/// longer than its 512-token window: llama.cpp saves only the last window of
/// the sliding-window layers, so a restored snapshot serves a prompt that
/// goes on from the saved tokens (the NPC's next line after its last one);
/// a prompt that leaves them earlier is read again. Either way the text is
/// the text the engine gives when never saved.
#[test]
fn a_sliding_window_models_snapshot_serves_a_prompt_that_goes_on_from_it() {
    let gemma = || {
        let mut s = settings();
        s.model = GEMMA.into();
        app_with(s)
    };
    let greedy_raw = |text: String| {
        LlmRequest::raw(text)
            .with_temperature(0.0)
            .with_seed(3)
            .with_max_tokens(12)
    };
    let story = "The miller's daughter knew every path through the forest. ".repeat(45);
    let first = format!("{story}One morning a traveller asked her the way.");
    let mut a = gemma();
    let npc = a.world_mut().spawn_empty().id();
    let (_, _, answer) = cached_turn(&mut a, npc, &greedy_raw(first.clone()));
    let saved: NpcKvSaved = next_message(&mut a, |w| {
        w.write_message(SaveNpcKv {
            keys: vec![CacheKey::from(npc)],
        });
    });
    let snapshot = saved.snapshots[0].1.clone().expect("a snapshot");
    assert!(snapshot.header.identity.sliding_window > 0);
    assert!(snapshot.token_count() > 512 + 24);
    // The next prompt goes on from the answer; another leaves the saved
    // tokens 20 tokens before their end.
    let goes_on = greedy_raw(format!("{first}{answer} Then she"));
    let leaves = greedy_raw(format!("{story}Later that day"));
    let (_, reused_a, never_saved) = cached_turn(&mut a, npc, &goes_on);
    assert!(reused_a > 512);
    drop(a);
    let mut plain = gemma();
    let other = plain.world_mut().spawn_empty().id();
    let (_, _, never_saved_leaves) = cached_turn(&mut plain, other, &leaves);
    drop(plain);

    let mut b = gemma();
    load_ready(&mut b, None);
    let npc_b = b.world_mut().spawn_empty().id();
    assert_eq!(
        restore(&mut b, CacheKey::from(npc_b), snapshot.clone()),
        Ok(())
    );
    let (_, reused, restored_text) = cached_turn(&mut b, npc_b, &goes_on);
    assert!(reused > 512, "reused {reused}");
    assert_eq!(restored_text, never_saved);
    let npc_c = b.world_mut().spawn_empty().id();
    assert_eq!(restore(&mut b, CacheKey::from(npc_c), snapshot), Ok(()));
    let (_, reused, left_text) = cached_turn(&mut b, npc_c, &leaves);
    assert_eq!(
        reused, 0,
        "the window before the branch point was not saved"
    );
    assert_eq!(left_text, never_saved_leaves);
}

#[test]
fn damaged_foreign_and_early_snapshots_are_refused_typed_and_the_npc_reads_its_prompt() {
    let mut a = app();
    let npc = a.world_mut().spawn_empty().id();
    cached_turn(&mut a, npc, &greedy(history()));
    let saved: NpcKvSaved = next_message(&mut a, |w| {
        w.write_message(SaveNpcKv {
            keys: vec![CacheKey::from(npc)],
        });
    });
    let snapshot = saved.snapshots[0].1.clone().unwrap();

    // One byte of the state flipped (a damaged save file).
    let mut bytes = snapshot.to_bytes();
    let last = bytes.len() - 1;
    bytes[last - 100] ^= 0x40;
    let damaged = NpcKvSnapshot::from_bytes(&bytes).unwrap();
    let other = a.world_mut().spawn_empty().id();
    assert!(matches!(
        restore(&mut a, CacheKey::from(other), damaged),
        Err(KvSnapshotError::Corrupt(_))
    ));
    // A header naming another model.
    let mut foreign = snapshot.clone();
    foreign.header.identity.model = "another-model".into();
    let answer = restore(&mut a, CacheKey::from(other), foreign);
    assert!(
        matches!(&answer, Err(KvSnapshotError::Mismatch { field, .. }) if field == "model"),
        "{answer:?}"
    );
    // Nothing was put in a slot: the NPC reads its whole prompt, and speaks.
    let (_, reused, text) = cached_turn(&mut a, other, &greedy(history()));
    assert_eq!(reused, 0);
    assert!(!text.is_empty());

    // Another model loaded (Gemma, sliding-window attention): refused.
    load_ready(&mut a, Some(GEMMA));
    assert!(matches!(
        restore(&mut a, CacheKey::from(other), snapshot.clone()),
        Err(KvSnapshotError::Mismatch { ref field, .. }) if field == "model"
    ));

    // No model loaded: nothing to save into or from, typed.
    a.world_mut().write_message(UnloadModel);
    run_until(&mut a, 60, |app| {
        *app.world().resource::<LlmModelState>() == LlmModelState::Unloaded
    });
    assert!(matches!(
        restore(&mut a, CacheKey::from(other), snapshot),
        Err(KvSnapshotError::Unavailable(_))
    ));
}

fn dialogue_app() -> App {
    let mut app = app();
    app.add_plugins(NpcDialoguePlugin);
    app
}

/// Lines finished so far (one `ConversationLineFinished` each).
#[derive(Resource, Default)]
struct LinesDone(usize);

/// The dialogue's own path: a conversation saved between two lines with the
/// NPCs' KV beside it (an archive by persona name), loaded into a fresh app
/// whose entities differ, and the next line of each NPC read from its
/// restored prefix instead of its whole prompt.
#[test]
fn a_saved_conversation_loads_with_its_npcs_kv_and_goes_on_from_it() {
    use bevy_npc_llm::dialogue::{NpcKvArchive, load_dialogue, npc_cache_keys, save_dialogue};
    let mut a = dialogue_app();
    a.init_resource::<LinesDone>();
    a.add_observer(|_: On<ConversationLineFinished>, mut n: ResMut<LinesDone>| n.0 += 1);
    let mira = a
        .world_mut()
        .spawn(persona(
            "Mira",
            "You are the village baker.",
            "sell honey bread",
        ))
        .id();
    let brom = a
        .world_mut()
        .spawn(persona("Brom", "You are the blacksmith.", "need charcoal"))
        .id();
    a.world_mut().write_message(StartConversation {
        participants: vec![mira, brom],
        topic: Some("charcoal".into()),
    });
    // Two lines (each NPC spoke once: both have a cached prefix), then the
    // frame where neither generates: save.
    run_until(&mut a, 120, |app| {
        app.world().resource::<LinesDone>().0 >= 2
            && app.world().resource::<LlmEngineStats>().in_flight == 0
    });
    let saved_text = save_dialogue(a.world_mut()).unwrap();
    let keys = npc_cache_keys(a.world_mut());
    let saved: NpcKvSaved = next_message(&mut a, |w| {
        w.write_message(SaveNpcKv {
            keys: keys.iter().map(|(_, k)| *k).collect(),
        });
    });
    let (archive, missing) = NpcKvArchive::from_saved(&keys, &saved);
    assert!(missing.is_empty(), "{missing:?}");
    assert_eq!(archive.entries.len(), 2);
    let file = archive.to_bytes();
    drop(a);

    // A fresh app: the model, then the dialogue, then the KV, before any
    // line is asked for (one frame later).
    let mut b = dialogue_app();
    load_ready(&mut b, None);
    b.world_mut().resource_mut::<Recorded>().0.clear();
    load_dialogue(b.world_mut(), &saved_text).unwrap();
    let archive = NpcKvArchive::from_bytes(&file).unwrap();
    let (request, unknown) = archive.restore_request(b.world_mut());
    assert!(unknown.is_empty());
    let restored: NpcKvRestored = next_message(&mut b, |w| {
        w.write_message(request);
    });
    assert!(
        restored.results.iter().all(|(_, r)| r.is_ok()),
        "{restored:?}"
    );
    // The next line is read from the restored prefix.
    run_until(&mut b, 120, |app| {
        app.world()
            .resource::<Recorded>()
            .0
            .iter()
            .any(|r| matches!(r, Rec::Started(..)))
    });
    let reused: Vec<usize> = b
        .world()
        .resource::<Recorded>()
        .0
        .iter()
        .filter_map(|r| match r {
            Rec::Started(_, _, reused) => Some(*reused),
            _ => None,
        })
        .collect();
    assert!(
        reused[0] > 50,
        "the first line after loading reused {reused:?}"
    );
}
