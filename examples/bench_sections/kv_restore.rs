//! `kv_restore`: an NPC's first line after a save is loaded, its KV
//! restored from the save against its prompt read again. Each repetition
//! uses three fresh engines: one speaks a turn of a ~1,000-token history,
//! saves the NPC's KV and answers the next turn from its own cache (the
//! game never saved); one restores the snapshot and answers the same turn
//! (greedy: the same text as the first, token for token); one answers it
//! reading the whole prompt.

use bevy::ecs::message::Messages;
use bevy_npc_llm::NpcKvSnapshot;
use bevy_npc_llm::events::{NpcKvRestored, NpcKvSaved, RestoreNpcKv, SaveNpcKv};

use super::*;

/// Turns of [`history`] that make about 1,000 prompt tokens with SmolLM2.
const HISTORY_TURNS: usize = 14;

/// Write a message with `send`, then update until the first `M` after it
/// (bounded in frames); the wall time between the two.
fn answer<M: Message + Clone>(app: &mut App, send: impl FnOnce(&mut World)) -> (M, Duration) {
    let mut cursor = app.world().resource::<Messages<M>>().get_cursor_current();
    let start = Instant::now();
    send(app.world_mut());
    for _ in 0..200_000 {
        app.update();
        if let Some(m) = cursor.read(app.world().resource::<Messages<M>>()).next() {
            return (m.clone(), start.elapsed());
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    panic!("no answer within 200,000 frames");
}

fn greedy(messages: Vec<ChatMessage>, npc: Entity) -> LlmRequest {
    LlmRequest::chat(messages)
        .with_cache_key(npc)
        .with_temperature(0.0)
        .with_seed(1)
        .with_max_tokens(8)
}

/// One repetition: (history tokens, snapshot bytes, save ms, restore ms,
/// first token after the restore ms, first token read again ms, the same
/// text as without save and load).
fn once(args: &Args) -> (usize, usize, f64, f64, f64, f64, bool) {
    let mut s = base_settings(args);
    s.context_per_sequence = 2048;
    let first = {
        let mut m = history(HISTORY_TURNS);
        m.push(ChatMessage::user("Good evening, Brom."));
        m
    };
    let mut second = first.clone();
    second.push(ChatMessage::assistant("Evening."));
    second.push(ChatMessage::user("Is my hinge ready?"));
    let ms = |d: Duration| d.as_secs_f64() * 1e3;

    let mut a = ready_app(s.clone());
    let npc = a.world_mut().spawn_empty().id();
    let (st, _) = run(&mut a, vec![greedy(first, npc)]);
    let history_tokens = st[0].stats.prompt_tokens;
    let (saved, save_time) = answer::<NpcKvSaved>(&mut a, |w| {
        w.write_message(SaveNpcKv {
            keys: vec![CacheKey::from(npc)],
        });
    });
    let snapshot = saved.snapshots[0].1.clone().expect("a snapshot");
    let bytes = snapshot.to_bytes();
    let (never_saved, _) = run(&mut a, vec![greedy(second.clone(), npc)]);
    drop(a);

    let mut b = ready_app(s.clone());
    let npc_b = b.world_mut().spawn_empty().id();
    let (restored, restore_time) = answer::<NpcKvRestored>(&mut b, |w| {
        let snapshot = NpcKvSnapshot::from_bytes(&bytes).expect("readable");
        w.write_message(RestoreNpcKv {
            snapshots: vec![(CacheKey::from(npc_b), snapshot)],
        });
    });
    restored.results[0].1.clone().expect("restored");
    let (rb, _) = run(&mut b, vec![greedy(second.clone(), npc_b)]);
    drop(b);

    let mut c = ready_app(s);
    let npc_c = c.world_mut().spawn_empty().id();
    let (rc, _) = run(&mut c, vec![greedy(second, npc_c)]);
    let ttft = |r: &LlmRequestStatus| ms(r.stats.time_to_first_token.unwrap());
    (
        history_tokens,
        bytes.len(),
        ms(save_time),
        ms(restore_time),
        ttft(&rb[0]),
        ttft(&rc[0]),
        rb[0].text == never_saved[0].text && rc[0].stats.reused_prefix_tokens == 0,
    )
}

pub(crate) fn kv_restore(args: &Args, f: &mut Figures) {
    let mut runs: Vec<_> = (0..args.reps.max(3)).map(|_| once(args)).collect();
    // The median repetition by the ratio the target is on.
    let ratio = |r: &(usize, usize, f64, f64, f64, f64, bool)| (r.3 + r.4) / r.5;
    runs.sort_by(|x, y| ratio(x).total_cmp(&ratio(y)));
    let m = runs[runs.len() / 2];
    let sec = "kv_restore";
    f.add(sec, "history: prompt tokens", m.0 as f64, "tokens");
    f.add(sec, "snapshot size", m.1 as f64 / 1e6, "MB");
    f.add(sec, "save (message to snapshot)", m.2, "ms");
    f.add(sec, "restore (message to restored)", m.3, "ms");
    f.add(sec, "first token after restore", m.4, "ms");
    f.add(sec, "first token, prompt read again", m.5, "ms");
    f.add(
        sec,
        "(restore + first token) / read again (target <= 0.3)",
        ratio(&m),
        "x",
    );
    let same = runs.iter().filter(|r| r.6).count();
    f.add(
        sec,
        &format!(
            "same greedy text as never saved, of {} (target >= {})",
            runs.len(),
            runs.len()
        ),
        same as f64,
        "runs",
    );
}
