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

/// Run `req` on `npc` under its own cache key: (prompt tokens, reused
/// tokens, text).
fn turn(app: &mut App, npc: Entity, req: &LlmRequest) -> (usize, usize, String) {
    app.world_mut().resource_mut::<Recorded>().0.clear();
    app.world_mut()
        .entity_mut(npc)
        .insert(req.clone().with_cache_key(npc));
    run_until_finished(app, &[npc]);
    let r = app.world().resource::<Recorded>();
    let Some(Rec::Started(_, prompt, reused)) = r.of(npc).first().cloned() else {
        panic!("{:?}", r.of(npc))
    };
    let text = r
        .completed_text(npc)
        .unwrap_or_else(|| panic!("{:?}", r.of(npc)));
    (prompt, reused, text)
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
    turn(&mut a, npc, &greedy(first));
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
    let (_, reused_a, never_saved) = turn(&mut a, npc, &greedy(second.clone()));
    assert!(reused_a > 100);
    drop(a);

    // A fresh engine: the same next turn read from the snapshot...
    let mut b = app();
    load_ready(&mut b, None);
    let npc_b = b.world_mut().spawn_empty().id();
    let read_back = NpcKvSnapshot::from_bytes(&bytes).expect("readable");
    assert_eq!(restore(&mut b, CacheKey::from(npc_b), read_back), Ok(()));
    let (prompt, reused, restored_text) = turn(&mut b, npc_b, &greedy(second.clone()));
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
    let (_, reused_c, fresh_text) = turn(&mut c, npc_c, &greedy(second));
    assert_eq!(reused_c, 0);
    assert_eq!(restored_text, fresh_text);
}

#[test]
fn damaged_foreign_and_early_snapshots_are_refused_typed_and_the_npc_reads_its_prompt() {
    let mut a = app();
    let npc = a.world_mut().spawn_empty().id();
    turn(&mut a, npc, &greedy(history()));
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
    let (_, reused, text) = turn(&mut a, other, &greedy(history()));
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
