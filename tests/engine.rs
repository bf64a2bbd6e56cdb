//! The inference engine with the real SmolLM2 model (and Gemma for model
//! switching), headless: `App` + `MinimalPlugins` + `NpcLlmPlugin`.

mod common;

use bevy::prelude::*;
use bevy_npc_llm::errors::{LlmError, ModelLoadError, VerifyError};
use bevy_npc_llm::prelude::*;
use bevy_npc_llm::registry::ModelRegistry;
use bevy_npc_llm::request::FinishReason;
use common::*;

#[test]
fn streams_tokens_then_exactly_one_completed_with_their_concatenation() {
    let mut app = app();
    let e = request(&mut app, chat("What is your favourite food?").with_seed(1));
    run_until_finished(&mut app, &[e]);
    let recs = app.world().resource::<Recorded>().of(e);
    assert!(
        matches!(recs[0], Rec::Started(_, n, _) if n > 10),
        "{recs:?}"
    );
    let tokens: Vec<&str> = recs
        .iter()
        .filter_map(|r| match r {
            Rec::Token(_, t) => Some(t.as_str()),
            _ => None,
        })
        .collect();
    assert!(!tokens.is_empty());
    let completed: Vec<_> = recs
        .iter()
        .filter(|r| matches!(r, Rec::Completed(..)))
        .collect();
    assert_eq!(completed.len(), 1);
    assert!(
        matches!(recs.last(), Some(Rec::Completed(..))),
        "completed comes last"
    );
    let Rec::Completed(_, text, _, stats) = completed[0] else {
        unreachable!()
    };
    assert_eq!(*text, tokens.concat());
    assert!(stats.generated_tokens >= tokens.len());
    // The status component tells the same story.
    let status = app.world().get::<LlmRequestStatus>(e).unwrap();
    assert_eq!(status.text, *text);
    assert!(matches!(status.state, RequestState::Completed(_)));
}

#[test]
fn same_prompt_and_seed_give_the_same_text() {
    let mut app = app();
    let req = chat("Tell me about the weather in the village.")
        .with_seed(42)
        .with_temperature(0.9);
    let a = request(&mut app, req.clone());
    run_until_finished(&mut app, &[a]);
    let b = request(&mut app, req);
    run_until_finished(&mut app, &[b]);
    let r = app.world().resource::<Recorded>();
    let (ta, tb) = (r.completed_text(a).unwrap(), r.completed_text(b).unwrap());
    assert!(!ta.is_empty());
    assert_eq!(ta, tb);
}

/// Requests spawned in one frame reach the worker as one command and start
/// together, so the same requests with the same seeds, spawned together
/// again, run in the same batch layout and give the same texts (on a GPU a
/// different layout can change logits in their last bits: see `Command::Submit`).
#[test]
fn same_seeds_in_one_batch_give_the_same_texts_twice() {
    let mut s = settings();
    // Both rounds read their prompts whole, as the bench's `seed` section does.
    s.prefix_cache = false;
    let mut app = app_with(s);
    load_ready(&mut app, None);
    let round = |app: &mut App| -> Vec<String> {
        let es: Vec<Entity> = ["the harvest", "the old mill", "wolves", "the river"]
            .iter()
            .enumerate()
            .map(|(i, what)| {
                let req = chat(&format!("Tell me about {what}."))
                    .with_seed(7 + i as u32)
                    .with_temperature(0.9);
                request(app, req)
            })
            .collect();
        run_until_finished(app, &es);
        let r = app.world().resource::<Recorded>();
        es.iter().map(|&e| r.completed_text(e).unwrap()).collect()
    };
    let (a, b) = (round(&mut app), round(&mut app));
    assert!(a.iter().all(|t| !t.is_empty()), "{a:?}");
    assert_eq!(a, b);
    // They ran together: at least one decode step held all four.
    let stats = app.world().resource::<LlmEngineStats>();
    assert!(
        stats.counters.max_batch_sequences >= 4,
        "{:?}",
        stats.counters
    );
}

/// A greedy request and its text on an engine with the test settings (one
/// lane, host sampling): the reference other configurations must repeat.
fn greedy_reference() -> (LlmRequest, String) {
    let greedy = chat("Name three things a blacksmith makes.")
        .with_temperature(0.0)
        .with_max_tokens(24);
    let mut app = app();
    let text = complete(&mut app, greedy.clone());
    (greedy, text)
}

/// Top-k inside llama.cpp's graph (the GPU path; here on the CPU backend,
/// which runs the same graph): greedy text equals the host sampler's, the
/// same seed gives the same text, and in one batch free requests draw from
/// device candidates while a constrained one and a `top_k` 0 one read whole
/// rows beside them.
#[test]
fn device_top_k_matches_host_greedy_repeats_with_a_seed_and_mixes_with_whole_rows() {
    let (greedy, host_text) = greedy_reference();
    let mut s = settings();
    s.gpu.device_sampling = Some(true);
    let mut app = app_with(s);
    assert_eq!(
        complete(&mut app, greedy),
        host_text,
        "greedy over device candidates"
    );
    let seeded = chat("Tell me about the weather in the village.")
        .with_seed(42)
        .with_temperature(0.9);
    let a = complete(&mut app, seeded.clone());
    assert!(!a.is_empty());
    assert_eq!(complete(&mut app, seeded), a, "same seed, same text");
    let c0 = app.world().resource::<LlmEngineStats>().counters.clone();
    assert!(c0.device_sampled_tokens > 0, "{c0:?}");
    let schema = serde_json::json!({
        "type": "object",
        "properties": { "say": { "type": "string", "maxLength": 80 } },
        "required": ["say"]
    });
    let mut es: Vec<Entity> = (0..5)
        .map(|i| {
            request(
                &mut app,
                chat(&format!("Say something about cat {i}.")).with_seed(i),
            )
        })
        .collect();
    let constrained = request(
        &mut app,
        chat("Say hello as JSON.")
            .with_json_schema(&schema)
            .with_seed(7),
    );
    let whole_row = request(
        &mut app,
        chat("Say something about dogs.").with_sampling(
            bevy_npc_llm::settings::SamplingOverrides {
                top_k: Some(0),
                seed: Some(3),
                ..Default::default()
            },
        ),
    );
    es.extend([constrained, whole_row]);
    run_until_finished(&mut app, &es);
    let r = app.world().resource::<Recorded>();
    for e in &es {
        assert!(r.completed_text(*e).is_some(), "{:?}", r.of(*e));
    }
    let said: serde_json::Value = serde_json::from_str(&r.completed_text(constrained).unwrap())
        .expect("the constrained answer is JSON");
    assert!(said["say"].is_string(), "{said}");
    let c1 = &app.world().resource::<LlmEngineStats>().counters;
    let device = c1.device_sampled_tokens - c0.device_sampled_tokens;
    let all = c1.generated_tokens - c0.generated_tokens;
    assert!(
        device > 0 && device < all,
        "device {device} of {all} tokens: {c1:?}"
    );
    assert!(c1.max_batch_sequences > 1, "{c1:?}");
}

/// Two lanes (two llama.cpp contexts decoded in turns, `gpu.lanes`): one
/// sequence alone gives one lane's greedy text; nine NPCs at once spread
/// over both lanes, a player request joins, one NPC is cancelled mid-answer
/// and one despawned, and everything else completes; the freed slots serve
/// again.
#[test]
fn two_lanes_match_one_and_serve_cancel_and_despawn_mid_answer() {
    lanes_match_one_and_serve_cancel_and_despawn_mid_answer(2);
}

/// The same with eight lanes, the most a GPU plan uses (64 NPCs in lanes
/// of 8): lanes of one or two sequences, the player's lane decoded first
/// among eight.
#[test]
fn eight_lanes_match_one_and_serve_cancel_and_despawn_mid_answer() {
    lanes_match_one_and_serve_cancel_and_despawn_mid_answer(8);
}

fn lanes_match_one_and_serve_cancel_and_despawn_mid_answer(lanes: u32) {
    let (greedy, want) = greedy_reference();
    let mut s = settings();
    s.gpu.lanes = lanes;
    s.max_parallel_sequences = 9;
    s.sampling.max_tokens = 48;
    let mut app = app_with(s);
    assert_eq!(
        complete(&mut app, greedy.clone()),
        want,
        "greedy on {lanes} lanes"
    );
    // What the worker made is what it reports: the lanes asked for (their
    // contexts fit), nine sequences, and the KV of every lane's context.
    let LlmModelState::Ready(info) = app.world().resource::<LlmModelState>().clone() else {
        panic!("no model ready");
    };
    assert_eq!((info.lanes, info.sequences), (lanes, 9), "{info:?}");
    // Ten slots (the player's too) in lanes of ⌈10 / lanes⌉ sequences.
    let cells = u64::from(lanes * 10u32.div_ceil(lanes) * info.context_per_sequence);
    assert!(
        info.kv_bytes > 0 && info.kv_bytes % cells == 0,
        "{} KV bytes for {cells} cells",
        info.kv_bytes
    );
    let es: Vec<Entity> = (0..9)
        .map(|i| {
            request(
                &mut app,
                chat(&format!("Tell me a long story about village number {i}.")).with_seed(i),
            )
        })
        .collect();
    let (cancelled, despawned) = (es[3], es[6]);
    run_until(&mut app, 120, |app| {
        let r = app.world().resource::<Recorded>();
        [cancelled, despawned]
            .iter()
            .all(|e| r.of(*e).iter().any(|x| matches!(x, Rec::Token(..))))
    });
    let player = request(
        &mut app,
        chat("Greet the traveller.")
            .with_priority(RequestPriority::High)
            .with_max_tokens(12),
    );
    app.world_mut()
        .write_message(CancelLlmRequest { entity: cancelled });
    app.world_mut().despawn(despawned);
    let gone = app.world().resource::<Recorded>().of(despawned).len();
    let rest: Vec<Entity> = es
        .iter()
        .copied()
        .filter(|e| *e != despawned)
        .chain([player])
        .collect();
    run_until_finished(&mut app, &rest);
    let r = app.world().resource::<Recorded>();
    for e in &rest {
        if *e == cancelled {
            let recs = r.of(*e);
            assert!(
                recs.iter().any(|x| matches!(x, Rec::Cancelled(_))),
                "{recs:?}"
            );
            assert_eq!(tokens_after_cancel(&recs), 0);
        } else {
            let text = r.completed_text(*e);
            assert!(text.is_some_and(|t| !t.is_empty()), "{:?}", r.of(*e));
        }
    }
    assert_eq!(r.of(despawned).len(), gone, "events after despawn");
    let c = &app.world().resource::<LlmEngineStats>().counters;
    assert!(c.max_batch_sequences > 1, "{c:?}");
    // The slots are free again: the greedy request still gives the same text.
    assert_eq!(complete(&mut app, greedy), want, "greedy after the rush");
    assert_eq!(app.world().resource::<LlmEngineStats>().in_flight, 0);
}

#[test]
fn eight_concurrent_requests_are_batched() {
    let mut app = app();
    let topics = [
        "bread", "swords", "flowers", "rain", "cats", "boats", "songs", "stars",
    ];
    let es: Vec<Entity> = topics
        .iter()
        .enumerate()
        .map(|(i, t)| {
            request(
                &mut app,
                chat(&format!("Say something about {t}.")).with_seed(i as u32),
            )
        })
        .collect();
    run_until_finished(&mut app, &es);
    let r = app.world().resource::<Recorded>();
    for e in &es {
        assert!(r.completed_text(*e).is_some(), "{:?}", r.of(*e));
    }
    let c = &app.world().resource::<LlmEngineStats>().counters;
    assert!(c.multi_sequence_batches > 0, "{c:?}");
    assert!(c.max_batch_sequences > 1, "{c:?}");
    assert!(c.decode_calls < c.generated_tokens, "{c:?}");
}

fn persona_history() -> Vec<ChatMessage> {
    let mut msgs = vec![ChatMessage::system(
        "You are Brom, the village blacksmith. You are gruff but kind, you love your anvil, \
         and you speak in short sentences. You remember every customer by name.",
    )];
    for i in 0..6 {
        msgs.push(ChatMessage::user(format!(
            "Customer {i}: I need a horseshoe number {i}."
        )));
        msgs.push(ChatMessage::assistant(format!(
            "Horseshoe {i}, coming up. Pay when done."
        )));
    }
    msgs
}

/// Brom's two turns: his persona and history with a greeting, then the
/// same with one more line.
fn brom_turns() -> (Vec<ChatMessage>, Vec<ChatMessage>) {
    let mut first = persona_history();
    first.push(ChatMessage::user("Hello Brom."));
    let mut second = first.clone();
    second.push(ChatMessage::user("Can you also fix my plough?"));
    (first, second)
}

/// `req`'s text on an engine with no prefix cache and no gap fillers: it
/// reads its whole prompt.
fn uncached_text(req: LlmRequest) -> String {
    let mut s = settings();
    s.prefix_cache = false;
    s.gpu.fill_gaps = Some(false);
    s.gpu.even_prompt_steps = Some(false);
    s.gpu.round_prompt_steps = Some(false);
    let mut plain = app_with(s);
    let e = request(&mut plain, req);
    run_until_finished(&mut plain, &[e]);
    let r = plain.world().resource::<Recorded>();
    assert!(matches!(r.of(e)[0], Rec::Started(_, _, 0)));
    r.completed_text(e).unwrap()
}

/// Greedy decoding: llama.cpp's CPU kernels are not bit-identical across
/// batch shapes, so a sampled (temperature > 0) run can drift after a dozen
/// tokens between a cached and an uncached prompt; greedy output must match.
#[test]
fn prefix_cache_reuses_an_npcs_prompt_and_matches_an_uncached_run() {
    let mut app = app();
    let npc = app.world_mut().spawn_empty().id();
    let (first, second) = brom_turns();
    app.world_mut().entity_mut(npc).insert(
        LlmRequest::chat(first)
            .with_cache_key(npc)
            .with_seed(7)
            .with_temperature(0.0),
    );
    run_until_finished(&mut app, &[npc]);
    let answer = app
        .world()
        .resource::<Recorded>()
        .completed_text(npc)
        .unwrap();
    assert!(!answer.is_empty());
    let req = LlmRequest::chat(second).with_seed(7).with_temperature(0.0);
    let (prompt, reused, cached) = cached_turn(&mut app, npc, &req);
    assert!(reused > 0, "no prefix reused ({prompt} tokens)");
    assert!(reused < prompt);

    // The same request on an engine with the cache off.
    assert_eq!(uncached_text(req), cached);
}

/// Gap fillers (`gpu.fill_gaps`, on by default on a GPU; here on the CPU):
/// an NPC's cached slot sits between two NPCs that talk, so each of their
/// steps gives it a throw-away token that is removed again. Its cache is
/// intact: its second turn reuses the prefix and gives the greedy text of
/// an engine without cache and without fillers.
#[test]
fn gap_fillers_leave_an_idle_npcs_cache_intact() {
    let mut s = settings();
    s.gpu.fill_gaps = Some(true);
    s.max_parallel_sequences = 4;
    let mut app = app_with(s);
    assert!(
        app.world()
            .resource::<LlmEngineStats>()
            .counters
            .gap_fillers
            == 0
    );
    // A first NPC's line takes slot 0, Brom's slot 1.
    let tom = app.world_mut().spawn_empty().id();
    let tom_line = |app: &mut App, seed: u32| {
        app.world_mut().entity_mut(tom).insert(
            chat("Tell me about bread.")
                .with_cache_key(tom)
                .with_seed(seed)
                .with_max_tokens(24),
        );
    };
    tom_line(&mut app, 0);
    run_until_finished(&mut app, &[tom]);
    let brom = app.world_mut().spawn_empty().id();
    let (first, second) = brom_turns();
    app.world_mut().entity_mut(brom).insert(
        LlmRequest::chat(first)
            .with_cache_key(brom)
            .with_temperature(0.0)
            .with_max_tokens(16),
    );
    run_until_finished(&mut app, &[brom]);
    // Tom (his slot 0) and a new NPC (slot 2) talk while Brom's slot,
    // between theirs, is idle.
    app.world_mut().resource_mut::<Recorded>().0.clear();
    tom_line(&mut app, 1);
    let ann = app.world_mut().spawn_empty().id();
    app.world_mut().entity_mut(ann).insert(
        chat("Tell me about boats.")
            .with_cache_key(ann)
            .with_seed(2)
            .with_max_tokens(24),
    );
    let others = [tom, ann];
    run_until_finished(&mut app, &others);
    let r = app.world().resource::<Recorded>();
    for e in &others {
        assert!(
            r.completed_text(*e).is_some_and(|t| !t.is_empty()),
            "{:?}",
            r.of(*e)
        );
    }
    let c = app.world().resource::<LlmEngineStats>().counters.clone();
    assert!(c.gap_fillers > 0, "no gap was filled: {c:?}");
    let req = LlmRequest::chat(second)
        .with_temperature(0.0)
        .with_max_tokens(24);
    let (_, reused, cached) = cached_turn(&mut app, brom, &req);
    assert!(reused > 0, "Brom's cache was not reused");
    assert_eq!(uncached_text(req), cached);
}

/// Rounded lone prompt steps (`gpu.round_prompt_steps`, on by default on
/// a GPU; here on the CPU): an NPC's cached second turn — the player's,
/// High priority, while another NPC talks — reads its new tokens alone,
/// rounded up with throw-away tokens after them that are removed again.
/// No text changes (each turn's greedy text is that of an engine without
/// cache or rounding), and the third turn reuses all the second left in
/// the KV: the padding left nothing behind.
#[test]
fn rounded_prompt_steps_change_no_text_and_leave_the_cache_intact() {
    // A GPU plan's defaults, on the CPU.
    let mut s = settings();
    s.gpu.round_prompt_steps = Some(true);
    s.gpu.even_prompt_steps = Some(true);
    s.gpu.fill_gaps = Some(true);
    s.max_parallel_sequences = 3;
    let mut app = app_with(s);
    let brom = app.world_mut().spawn_empty().id();
    let (first, second) = brom_turns();
    let turn = |msgs: Vec<ChatMessage>| {
        LlmRequest::chat(msgs)
            .with_priority(RequestPriority::High)
            .with_temperature(0.0)
            .with_max_tokens(16)
    };
    // An NPC's own turn (Normal priority, alone) is rounded too.
    let npc_turn = |msgs: Vec<ChatMessage>| turn(msgs).with_priority(RequestPriority::Normal);
    let (_, _, answer) = cached_turn(&mut app, brom, &turn(first));
    assert!(!answer.is_empty());
    // Another NPC talks while the player speaks to Brom again.
    let tom = request(
        &mut app,
        chat("Tell me about bread.")
            .with_seed(3)
            .with_max_tokens(24),
    );
    let c0 = app.world().resource::<LlmEngineStats>().counters.clone();
    let (prompt2, reused2, text2) = cached_turn(&mut app, brom, &turn(second.clone()));
    let c1 = app.world().resource::<LlmEngineStats>().counters.clone();
    assert!(
        reused2 > 0 && prompt2 - reused2 <= 64,
        "{prompt2} / {reused2}"
    );
    assert!(
        c1.rounded_prompt_steps > c0.rounded_prompt_steps && c1.prompt_padding > c0.prompt_padding,
        "the second turn was not rounded: {c1:?}"
    );
    run_until_finished(&mut app, &[tom]);
    assert_eq!(uncached_text(turn(second.clone())), text2);
    // The third turn extends the second's prompt and answer.
    let mut third = second;
    third.push(ChatMessage::assistant(text2));
    third.push(ChatMessage::user("And my cart?"));
    let c2 = app.world().resource::<LlmEngineStats>().counters.clone();
    let (prompt3, reused3, text3) = cached_turn(&mut app, brom, &npc_turn(third.clone()));
    let c3 = app.world().resource::<LlmEngineStats>().counters.clone();
    assert!(
        reused3 >= prompt2,
        "third turn reused {reused3} of {prompt2}"
    );
    // Read alone: rounded, unless it is a width already (16, 32, 64).
    let read = prompt3 - reused3;
    assert!(
        c3.rounded_prompt_steps > c2.rounded_prompt_steps || [16, 32, 64].contains(&read),
        "the NPC's turn ({read} tokens) was not rounded: {c3:?}"
    );
    assert_eq!(uncached_text(npc_turn(third)), text3);
}

/// Even prompt steps (`gpu.even_prompt_steps`, on by default on a GPU;
/// here on the CPU): three NPCs whose prompts differ in length start
/// together, so their prompts are read in one step padded to the longest
/// (throw-away tokens removed again after it). The padding changes no
/// text: each NPC's greedy text is its text alone on an engine without
/// padding, gap fillers or cache.
#[test]
fn even_prompt_steps_pad_a_crowds_prompts_without_changing_a_text() {
    let mut s = settings();
    s.gpu.even_prompt_steps = Some(true);
    s.max_parallel_sequences = 4;
    let mut app = app_with(s);
    let lines = [
        "Tell me about bread.",
        "What do you think of the weather in the valley this spring, and of the harvest?",
        "Sing.",
    ];
    let req = |line: &str| chat(line).with_temperature(0.0).with_max_tokens(16);
    let npcs: Vec<Entity> = lines.iter().map(|l| request(&mut app, req(l))).collect();
    run_until_finished(&mut app, &npcs);
    let c = app.world().resource::<LlmEngineStats>().counters.clone();
    assert!(
        c.even_prompt_steps > 0 && c.prompt_padding > 0,
        "no prompt step was padded: {c:?}"
    );
    each_text_is_its_text_alone(&app, &npcs, &lines, req);
}

/// Each NPC's completed text (NPC `i` asked `req(lines[i])`) is not empty
/// and is the greedy text of its request alone ([`uncached_text`]).
fn each_text_is_its_text_alone(
    app: &App,
    npcs: &[Entity],
    lines: &[&str],
    req: impl Fn(&str) -> LlmRequest,
) {
    let texts: Vec<String> = {
        let r = app.world().resource::<Recorded>();
        npcs.iter()
            .map(|e| {
                r.completed_text(*e)
                    .unwrap_or_else(|| panic!("{:?}", r.of(*e)))
            })
            .collect()
    };
    for (line, text) in lines.iter().zip(texts) {
        assert!(!text.is_empty(), "{line}: no text");
        assert_eq!(uncached_text(req(line)), text, "{line}");
    }
}

/// With gap fillers on (here on the CPU), a prompt read while other NPCs
/// talk asks for logits at its first token too, so llama.cpp's first
/// micro-batch of the step is a generation step's shape (on a GPU: its
/// recorded CUDA graph replays). The throw-away output changes no text:
/// the two talking NPCs and the one arriving among them each give their
/// greedy text alone.
#[test]
fn a_prompt_read_beside_talking_npcs_changes_no_text() {
    prompt_beside_talking_npcs(false);
}

/// The same with top-k on the device (`gpu.device_sampling`): llama.cpp's
/// backend sampling allows one output per sequence in a batch, so a
/// prompt's last chunk, whose last token is sampled, asks for no extra
/// logits at its first token there.
#[test]
fn a_prompt_read_beside_talking_npcs_with_device_top_k_changes_no_text() {
    prompt_beside_talking_npcs(true);
}

fn prompt_beside_talking_npcs(device_top_k: bool) {
    let mut s = settings();
    s.gpu.fill_gaps = Some(true);
    s.gpu.device_sampling = Some(device_top_k);
    s.max_parallel_sequences = 4;
    let mut app = app_with(s);
    let req = |line: &str| chat(line).with_temperature(0.0).with_max_tokens(24);
    let lines = [
        "Tell me about bread.",
        "Tell me about boats.",
        "What do you think of the weather in the valley this spring, and of the harvest?",
    ];
    let talking: Vec<Entity> = lines[..2]
        .iter()
        .map(|l| request(&mut app, req(l)))
        .collect();
    let wait = talking.clone();
    run_until(&mut app, 120, move |app| {
        let r = app.world().resource::<Recorded>();
        wait.iter()
            .all(|e| r.of(*e).iter().any(|x| matches!(x, Rec::Token(..))))
    });
    let arriving = request(&mut app, req(lines[2]));
    let npcs = [talking[0], talking[1], arriving];
    run_until_finished(&mut app, &npcs);
    let r = app.world().resource::<Recorded>();
    let ended_before_arrival =
        r.0.iter()
            .take_while(|x| !matches!(x, Rec::Started(a, ..) if *a == arriving))
            .any(|x| matches!(x, Rec::Completed(..)));
    assert!(
        !ended_before_arrival,
        "the arriving prompt was not read while the others talked"
    );
    each_text_is_its_text_alone(&app, &npcs, &lines, req);
}

/// Every GPU tuning at once, on the CPU (the same llama.cpp graphs): two
/// lanes, gap fillers, even prompt steps and device top-k, under a town's
/// churn — lines of different lengths replacing each other, one cancelled
/// and one despawned mid-line, the player's line in between. Nothing fails:
/// every line ends completed (or cancelled), and the engine is idle after.
/// Bounded in frames.
#[test]
fn every_gpu_tuning_at_once_serves_a_churning_crowd() {
    let mut s = settings();
    s.gpu.lanes = 2;
    s.gpu.fill_gaps = Some(true);
    s.gpu.even_prompt_steps = Some(true);
    s.gpu.device_sampling = Some(true);
    s.max_parallel_sequences = 8;
    let mut app = app_with(s);
    let topics = [
        "bread",
        "the harvest in the valley this spring",
        "boats",
        "the old mill by the river and its miller",
    ];
    let line = |n: usize| {
        chat(&format!("Tell me about {}.", topics[n % topics.len()]))
            .with_seed(n as u32)
            .with_max_tokens(8 + (n as u32 * 5) % 17)
    };
    const LINES: usize = 18;
    let mut spawned: Vec<Entity> = (0..6).map(|n| request(&mut app, line(n))).collect();
    let (mut cancelled, mut despawned, mut player) = (None, None, None);
    for _ in 0..200_000 {
        app.update();
        std::thread::sleep(std::time::Duration::from_millis(1));
        let r = app.world().resource::<Recorded>();
        let live: Vec<Entity> = spawned
            .iter()
            .copied()
            .filter(|e| Some(*e) != despawned && !r.finished(*e))
            .collect();
        let talking = live.iter().copied().find(|e| {
            ![cancelled, player].contains(&Some(*e))
                && r.of(*e).iter().any(|x| matches!(x, Rec::Token(..)))
        });
        let n = spawned.len();
        if n >= LINES && live.is_empty() {
            break;
        }
        // At the 8th and 12th line, wait for a talking NPC to cancel or
        // despawn before starting more.
        let cancel_due = n == 8 && cancelled.is_none();
        let despawn_due = n == 12 && despawned.is_none();
        if cancel_due || despawn_due {
            if let Some(e) = talking {
                if cancel_due {
                    cancelled = Some(e);
                    app.world_mut()
                        .write_message(CancelLlmRequest { entity: e });
                } else {
                    despawned = Some(e);
                    app.world_mut().despawn(e);
                }
            }
        } else if n == 10 && player.is_none() {
            let e = request(
                &mut app,
                chat("Greet the traveller.")
                    .with_priority(RequestPriority::High)
                    .with_max_tokens(10),
            );
            player = Some(e);
            spawned.push(e);
        } else if n < LINES && live.len() < 6 {
            spawned.push(request(&mut app, line(n)));
        }
    }
    let r = app.world().resource::<Recorded>();
    assert!(
        spawned.len() >= LINES,
        "only {} lines started",
        spawned.len()
    );
    for e in spawned.iter().filter(|e| Some(**e) != despawned) {
        let recs = r.of(*e);
        assert!(
            !recs.iter().any(|x| matches!(x, Rec::Failed(..))),
            "{recs:?}"
        );
        if Some(*e) == cancelled {
            assert!(
                recs.iter().any(|x| matches!(x, Rec::Cancelled(_))),
                "{recs:?}"
            );
        } else {
            assert!(
                r.completed_text(*e).is_some_and(|t| !t.is_empty()),
                "{recs:?}"
            );
        }
    }
    assert!(cancelled.is_some() && despawned.is_some() && player.is_some());
    let stats = app.world().resource::<LlmEngineStats>();
    assert_eq!(stats.in_flight, 0);
    let c = &stats.counters;
    assert!(
        c.device_sampler_switches > 0 && c.gap_fillers > 0 && c.even_prompt_steps > 0,
        "a tuning not exercised: {c:?}"
    );
    assert_eq!(c.failed, 0, "{c:?}");
}

fn tokens_after_cancel(recs: &[Rec]) -> usize {
    let at = recs
        .iter()
        .position(|r| matches!(r, Rec::Cancelled(_)))
        .expect("cancelled event");
    recs[at + 1..].len()
}

#[test]
fn cancel_by_message_by_removal_and_by_despawn() {
    let mut s = settings();
    s.max_parallel_sequences = 2;
    s.sampling.max_tokens = 200;
    let mut app = app_with(s);
    let long = || chat("Tell me a very long story about a dragon.").with_seed(3);
    let by_msg = request(&mut app, long());
    let by_remove = request(&mut app, long());
    // Wait until both stream.
    run_until(&mut app, 120, |app| {
        let r = app.world().resource::<Recorded>();
        [by_msg, by_remove]
            .iter()
            .all(|e| r.of(*e).iter().any(|x| matches!(x, Rec::Token(..))))
    });
    app.world_mut()
        .write_message(CancelLlmRequest { entity: by_msg });
    app.world_mut().entity_mut(by_remove).remove::<LlmRequest>();
    run_until_finished(&mut app, &[by_msg, by_remove]);
    for e in [by_msg, by_remove] {
        let recs = app.world().resource::<Recorded>().of(e);
        assert!(
            recs.iter().any(|r| matches!(r, Rec::Cancelled(_))),
            "{recs:?}"
        );
        assert!(!recs.iter().any(|r| matches!(r, Rec::Completed(..))));
        assert_eq!(tokens_after_cancel(&recs), 0);
    }
    // Despawn: no events at all after it.
    let gone = request(&mut app, long());
    run_until(&mut app, 120, |app| {
        let r = app.world().resource::<Recorded>();
        r.of(gone).iter().any(|x| matches!(x, Rec::Token(..)))
    });
    app.world_mut().despawn(gone);
    let n = app.world().resource::<Recorded>().of(gone).len();
    // Slots are freed: two new requests (parallel limit 2) both complete.
    let a = request(&mut app, chat("Hi!").with_max_tokens(8));
    let b = request(&mut app, chat("Hello!").with_max_tokens(8));
    run_until_finished(&mut app, &[a, b]);
    let r = app.world().resource::<Recorded>();
    assert!(r.completed_text(a).is_some() && r.completed_text(b).is_some());
    assert_eq!(r.of(gone).len(), n, "events after despawn");
    assert_eq!(app.world().resource::<LlmEngineStats>().in_flight, 0);
}

#[test]
fn stop_string_split_across_tokens_is_not_emitted() {
    let mut app = app();
    let counting = || {
        LlmRequest::raw("Counting to twenty: 1, 2, 3, 4,")
            .with_temperature(0.0)
            .with_max_tokens(40)
    };
    let free = request(&mut app, counting());
    run_until_finished(&mut app, &[free]);
    let recs = app.world().resource::<Recorded>().of(free);
    let full = app
        .world()
        .resource::<Recorded>()
        .completed_text(free)
        .unwrap();
    let stop = "6, 7";
    let at = full
        .find(stop)
        .unwrap_or_else(|| panic!("model did not count: {full:?}"));
    // The stop string spans several token pieces in the free run.
    assert!(
        !recs
            .iter()
            .any(|r| matches!(r, Rec::Token(_, t) if t.contains(stop))),
        "stop string came in one token; test proves nothing"
    );
    let stopped = request(&mut app, counting().with_stop([stop]));
    run_until_finished(&mut app, &[stopped]);
    let r = app.world().resource::<Recorded>();
    let recs = r.of(stopped);
    let text = r.completed_text(stopped).unwrap();
    assert_eq!(text, full[..at]);
    assert!(
        matches!(
            recs.last(),
            Some(Rec::Completed(_, _, FinishReason::StopString, _))
        ),
        "{recs:?}"
    );
    let streamed: String = recs
        .iter()
        .filter_map(|r| match r {
            Rec::Token(_, t) => Some(t.as_str()),
            _ => None,
        })
        .collect();
    assert!(!streamed.contains(stop));
    assert_eq!(streamed, text);
}

#[test]
fn multibyte_utf8_streams_whole_characters() {
    let mut app = app();
    let e = request(
        &mut app,
        LlmRequest::chat([ChatMessage::user(
            "Repeat exactly: Café crème, naïve piñata, 日本語, emoji 😀🎉",
        )])
        .with_temperature(0.0)
        .with_max_tokens(40),
    );
    run_until_finished(&mut app, &[e]);
    let r = app.world().resource::<Recorded>();
    let text = r.completed_text(e).unwrap();
    assert!(
        !text.is_ascii(),
        "model produced no multi-byte text: {text:?}"
    );
    for rec in r.of(e) {
        if let Rec::Token(_, t) = rec {
            assert!(!t.contains('\u{fffd}'), "broken UTF-8 in {t:?}");
        }
    }
}

#[test]
fn over_long_prompt_full_queue_missing_and_corrupt_models_fail_typed_and_app_recovers() {
    let mut s = settings();
    s.context_per_sequence = 256;
    s.max_parallel_sequences = 1;
    s.queue_capacity = 1;
    s.sampling.max_tokens = 8;
    let mut app = app_with(s);

    // Over-long prompt.
    let long = request(&mut app, chat(&"word ".repeat(600)));
    run_until_finished(&mut app, &[long]);
    let err = app.world().resource::<Recorded>().failure(long);
    assert!(
        matches!(err, Some(LlmError::PromptTooLong { .. })),
        "{err:?}"
    );
    // ... trimmed on request instead.
    let mut msgs = vec![ChatMessage::system("Be brief.")];
    for i in 0..40 {
        msgs.push(ChatMessage::user(format!(
            "Line {i} of a long talk about farming and weather."
        )));
    }
    complete(&mut app, LlmRequest::chat(msgs).with_trim_prompt(true));

    // Full queue: capacity = 1 running + 1 waiting; four in one frame.
    let four: Vec<Entity> = (0..4)
        .map(|i| request(&mut app, chat(&format!("Hi {i}"))))
        .collect();
    run_until_finished(&mut app, &four);
    let (done, full) = app
        .world()
        .resource::<Recorded>()
        .completed_and_queue_full(&four);
    assert_eq!((full, done), (2, 2));

    // A missing file and a sha256 mismatch, added at run time.
    {
        let mut reg = app.world_mut().resource_mut::<ModelRegistry>();
        let mut missing = reg.get(SMOL).unwrap().clone();
        missing.id = "missing".into();
        missing.file = "does-not-exist.gguf".into();
        reg.add(missing).unwrap();
        let mut corrupt = reg.get(SMOL).unwrap().clone();
        corrupt.id = "corrupt".into();
        corrupt.sha256 = "0".repeat(64);
        reg.add(corrupt).unwrap();
    }
    for (id, check) in [
        (
            "missing",
            (|e: &ModelLoadError| matches!(e, ModelLoadError::Verify(VerifyError::Missing(_))))
                as fn(&ModelLoadError) -> bool,
        ),
        ("corrupt", |e: &ModelLoadError| {
            matches!(
                e,
                ModelLoadError::Verify(VerifyError::Sha256Mismatch { .. })
            )
        }),
    ] {
        let error = load_failure(&mut app, Some(id));
        assert!(check(&error), "{id}: {error:?}");
        // The previous model keeps serving.
        let e = request(&mut app, chat("Still there?"));
        run_until_finished(&mut app, &[e]);
        assert!(
            app.world()
                .resource::<Recorded>()
                .completed_text(e)
                .is_some(),
            "{id}: app did not recover"
        );
    }
}

#[test]
fn requests_fail_typed_when_no_model_can_load_then_succeed_after_a_good_load() {
    let mut s = settings();
    s.model = "nope".into();
    let mut app = app_with(s);
    let e = request(&mut app, chat("Anyone?"));
    run_until_finished(&mut app, &[e]);
    let err = app.world().resource::<Recorded>().failure(e);
    assert!(
        matches!(
            err,
            Some(LlmError::ModelUnavailable(ModelLoadError::Registry(_)))
        ),
        "{err:?}"
    );
    app.world_mut().write_message(LoadModel {
        model: Some(SMOL.into()),
    });
    run_until(&mut app, 60, |app| {
        app.world().resource::<LlmModelState>().is_ready()
    });
    complete(&mut app, chat("Now?"));
}

#[test]
fn switching_models_while_requests_run_does_not_hang() {
    let mut s = settings();
    s.sampling.max_tokens = 200;
    let mut app = app_with(s);
    let running = start_streaming(&mut app, 3, "Tell a long tale", false);
    app.world_mut().write_message(LoadModel {
        model: Some(GEMMA.into()),
    });
    run_until_finished(&mut app, &running);
    let r = app.world().resource::<Recorded>();
    for e in &running {
        let ok = r.completed_text(*e).is_some()
            || matches!(r.failure(*e), Some(LlmError::ModelUnloaded { .. }));
        assert!(ok, "{:?}", r.of(*e));
    }
    run_until(&mut app, 120, |app| {
        app.world().resource::<LlmModelState>().is_ready()
    });
    match app.world().resource::<LlmModelState>() {
        LlmModelState::Ready(info) => assert_eq!(info.model, GEMMA),
        other => panic!("{other:?}"),
    }
    // Gemma is a base model: a raw completion prompt.
    let e = request(
        &mut app,
        LlmRequest::raw("The blacksmith said to the baker: \"").with_max_tokens(12),
    );
    run_until_finished(&mut app, &[e]);
    let text = app.world().resource::<Recorded>().completed_text(e);
    assert!(text.is_some_and(|t| !t.is_empty()));
    // And back again.
    app.world_mut().write_message(LoadModel {
        model: Some(SMOL.into()),
    });
    complete(&mut app, chat("Back?"));
    assert_eq!(
        app.world()
            .resource::<LlmEngineStats>()
            .serving_model
            .as_deref(),
        Some(SMOL)
    );
}

/// Automatic sync points (`ApplyDeferred`) the app's `PreUpdate` runs.
fn sync_points(app: &mut App) -> usize {
    app.update();
    let schedules = app.world().resource::<Schedules>();
    let pre_update = schedules.get(PreUpdate).expect("PreUpdate exists");
    pre_update
        .systems()
        .expect("PreUpdate ran")
        .filter(|(_, s)| {
            s.system_type() == std::any::TypeId::of::<bevy::ecs::schedule::ApplyDeferred>()
        })
        .count()
}

#[test]
fn the_plugin_adds_no_sync_point_and_a_status_comes_with_each_request() {
    // A sync point runs on every frame, idle or not (a hand-off of the
    // executor, ~50 µs on a 2-core machine): the plugin's sets add none.
    let mut bare = App::new();
    bare.add_plugins(MinimalPlugins);
    let mut app = App::new();
    app.add_plugins(MinimalPlugins)
        .add_plugins(NpcLlmPlugin::default().with_settings(settings()));
    assert_eq!(sync_points(&mut app), sync_points(&mut bare));
    // The status is there from the frame the request is inserted.
    let e = app.world_mut().spawn(chat("Hello")).id();
    let status = app.world().get::<LlmRequestStatus>(e).expect("status");
    assert_eq!(status.state, RequestState::Queued);
    assert!(status.text.is_empty());
}
