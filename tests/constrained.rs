//! Constrained output with the real models: JSON schemas (from Rust types
//! through `schemars`) and GBNF grammars, enforced per sequence inside the
//! batched step. Hundreds of sampled generations (temperature 0.7, mixed
//! NPCs, eight at a time) must all parse into the Rust type; bad constraints
//! fail their request only, typed; a cut-short generation is a typed error.

mod common;

use std::collections::HashMap;

use bevy::prelude::*;
use bevy_npc_llm::constraint::{OutputConstraint, OutputError};
use bevy_npc_llm::errors::LlmError;
use bevy_npc_llm::prelude::*;
use bevy_npc_llm::request::FinishReason;
use common::*;
use schemars::JsonSchema;
use serde::Deserialize;

#[derive(Debug, Clone, PartialEq, Eq, Hash, Deserialize, JsonSchema)]
enum Place {
    Well,
    Market,
    Inn,
    Forge,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Deserialize, JsonSchema)]
#[serde(tag = "kind")]
enum Action {
    WalkTo { place: Place },
    Give { item: Item },
    Emote { emote: Emote },
    EndConversation,
    Nothing,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Deserialize, JsonSchema)]
enum Item {
    Bread,
    Coin,
    Map,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Deserialize, JsonSchema)]
enum Emote {
    Wave,
    Laugh,
    Frown,
}

#[derive(Debug, Clone, Deserialize, JsonSchema)]
struct NpcTurn {
    #[schemars(length(min = 1, max = 60))]
    say: String,
    action: Action,
    #[schemars(range(min = 0, max = 10))]
    mood: u8,
}

/// Every `LlmCompleted` / `LlmFailed`, whole.
#[derive(Resource, Default)]
struct Outcomes {
    done: HashMap<Entity, LlmCompleted>,
    failed: HashMap<Entity, LlmError>,
}

fn app_for(model: &str) -> App {
    let mut s = settings();
    s.model = model.into();
    s.max_parallel_sequences = 8;
    s.context_per_sequence = 512;
    let mut app = app_with(s);
    app.init_resource::<Outcomes>();
    app.add_observer(|e: On<LlmCompleted>, mut o: ResMut<Outcomes>| {
        o.done.insert(e.entity, e.event().clone());
    });
    app.add_observer(|e: On<LlmFailed>, mut o: ResMut<Outcomes>| {
        o.failed.insert(e.entity, e.error.clone());
    });
    app
}

const NPCS: [(&str, &str); 5] = [
    ("Mira", "the innkeeper, warm and busy"),
    ("Bram", "the blacksmith, gruff and proud"),
    ("Lio", "a child who loves the well"),
    ("Sera", "the merchant, always bargaining"),
    ("Old Tam", "the miller, slow and kind"),
];

const ASKS: [&str; 4] = [
    "Where can I buy bread?",
    "Can you help me find the forge?",
    "Tell me a joke!",
    "I must go now, goodbye.",
];

fn turn_request(i: usize) -> LlmRequest {
    let (name, who) = NPCS[i % NPCS.len()];
    LlmRequest::chat([
        ChatMessage::system(format!(
            "You are {name}, {who}. Answer the traveller as JSON with what you say, an action and your mood."
        )),
        ChatMessage::user(ASKS[(i / NPCS.len()) % ASKS.len()]).with_name("Traveller"),
    ])
    .with_output::<NpcTurn>()
    .with_temperature(0.7)
    .with_seed(1000 + i as u32)
    .with_max_tokens(160)
}

/// Submit `n` requests, at most `at_once` in flight, until all finished.
fn run_all(
    app: &mut App,
    n: usize,
    at_once: usize,
    make: impl Fn(usize) -> LlmRequest,
) -> Vec<Entity> {
    let mut all = Vec::new();
    let mut next = 0;
    let frames = 3_000_000u32;
    for frame in 0..frames {
        let o = app.world().resource::<Outcomes>();
        let open = all
            .iter()
            .filter(|e| !o.done.contains_key(*e) && !o.failed.contains_key(*e))
            .count();
        if next == n && open == 0 {
            return all;
        }
        for _ in open..at_once {
            if next < n {
                all.push(app.world_mut().spawn(make(next)).id());
                next += 1;
            }
        }
        app.update();
        std::thread::sleep(std::time::Duration::from_micros(500));
        assert!(frame + 1 < frames, "not done after {frames} frames");
    }
    all
}

fn two_hundred_turns_parse(model: &str) {
    let mut app = app_for(model);
    load_ready(&mut app, None);
    let es = run_all(&mut app, 200, 8, turn_request);
    let o = app.world().resource::<Outcomes>();
    assert!(o.failed.is_empty(), "failed: {:?}", o.failed);
    let mut kinds: HashMap<String, usize> = HashMap::new();
    let mut says = std::collections::HashSet::new();
    for e in &es {
        let c = &o.done[e];
        let turn: NpcTurn = c
            .output_as()
            .unwrap_or_else(|err| panic!("{model}: {err} (text {:?})", c.text));
        assert!(!turn.say.is_empty() && turn.say.chars().count() <= 60);
        assert!(turn.mood <= 10);
        assert_eq!(c.finish, FinishReason::EndOfTurn, "{:?}", c.text);
        let kind = format!("{:?}", turn.action);
        *kinds
            .entry(kind.split([' ', '{']).next().unwrap().to_string())
            .or_default() += 1;
        says.insert(turn.say);
    }
    let counters = &app.world().resource::<LlmEngineStats>().counters;
    println!(
        "{model}: 200 of 200 parsed; actions {kinds:?}; {} distinct lines; max batch {} sequences",
        says.len(),
        counters.max_batch_sequences
    );
    assert!(counters.max_batch_sequences >= 4, "generated in batches");
    assert!(says.len() > 20, "sampling at 0.7 varies the lines");
}

#[test]
fn two_hundred_smollm2_turns_parse_into_the_rust_type() {
    two_hundred_turns_parse(SMOL);
}

#[test]
fn two_hundred_gemma_turns_parse_into_the_rust_type() {
    two_hundred_turns_parse(GEMMA);
}

#[test]
fn grammars_bad_constraints_and_cut_short_output() {
    let mut app = app_for(SMOL);
    load_ready(&mut app, None);
    let ask = |c: OutputConstraint, max: u32| {
        LlmRequest::chat([
            ChatMessage::system("You are Mira, the innkeeper."),
            ChatMessage::user("Is the inn open tonight? Answer yes or no."),
        ])
        .with_constraint(c)
        .with_temperature(0.7)
        .with_seed(3)
        .with_max_tokens(max)
    };
    let gbnf = OutputConstraint::Gbnf(
        "root ::= answer \" \" [A-Z] [a-z ]{3,30} \".\"\nanswer ::= \"Yes.\" | \"No.\"".into(),
    );
    let yes_no = app.world_mut().spawn(ask(gbnf.clone(), 40)).id();
    let again = app.world_mut().spawn(ask(gbnf, 40)).id();
    let bad_schema = app
        .world_mut()
        .spawn(ask(OutputConstraint::JsonSchema("{\"type\": 5".into()), 40))
        .id();
    let bad_gbnf = app
        .world_mut()
        .spawn(ask(
            OutputConstraint::Gbnf("root ::= missing-rule".into()),
            40,
        ))
        .id();
    let short = app
        .world_mut()
        .spawn(
            LlmRequest::chat([ChatMessage::user("Describe the inn.")])
                .with_output::<NpcTurn>()
                .with_max_tokens(5),
        )
        .id();
    let free = app
        .world_mut()
        .spawn(chat("Say hello.").with_max_tokens(8))
        .id();
    let all = [yes_no, again, bad_schema, bad_gbnf, short, free];
    run_until(&mut app, 240, |app| {
        let o = app.world().resource::<Outcomes>();
        all.iter()
            .all(|e| o.done.contains_key(e) || o.failed.contains_key(e))
    });
    let o = app.world().resource::<Outcomes>();
    let text = &o.done[&yes_no].text;
    let (answer, rest) = text.split_once(' ').expect("answer, space, sentence");
    assert!(answer == "Yes." || answer == "No.", "{text:?}");
    assert!(rest.ends_with('.') && rest.starts_with(|c: char| c.is_ascii_uppercase()));
    assert!(
        o.done[&yes_no].output.is_none(),
        "a grammar gives text, not JSON"
    );
    assert_eq!(
        &o.done[&again].text, text,
        "same seed, same constrained text"
    );
    for e in [bad_schema, bad_gbnf] {
        assert!(
            matches!(o.failed.get(&e), Some(LlmError::InvalidConstraint(_))),
            "{:?}",
            o.failed.get(&e)
        );
    }
    let cut = &o.done[&short];
    assert_eq!(cut.finish, FinishReason::MaxTokens);
    assert!(
        matches!(
            cut.output_as::<NpcTurn>(),
            Err(OutputError::Unfinished {
                finish: FinishReason::MaxTokens,
                ..
            })
        ),
        "{:?}",
        cut.output
    );
    assert!(o.done[&free].output.is_none());
    assert!(matches!(
        o.done[&free].output_as::<NpcTurn>(),
        Err(OutputError::NotRequested)
    ));
}

/// Constraints compile on a thread of their own: a 5,000-value enum
/// compiles while two NPCs stream, and its answer is one of the values; a
/// request cancelled while its constraint compiles is answered `Cancelled`
/// (nothing of it runs); a constraint nested past the bound fails typed
/// before any work; the NPCs finish untouched by all three.
#[test]
fn large_constraints_compile_beside_talking_npcs_and_can_be_cancelled() {
    let mut app = app_with(settings());
    load_ready(&mut app, None);
    let npcs: Vec<Entity> = (0..2)
        .map(|i| {
            request(
                &mut app,
                chat(&format!("Tell me about the river, friend {i}.")).with_max_tokens(48),
            )
        })
        .collect();
    let values: Vec<String> = (0..5000).map(|i| format!("item-{i:04}")).collect();
    let schema = serde_json::json!({
        "type": "object",
        "properties": { "item": { "enum": values } },
        "required": ["item"],
    });
    let cancelled = request(&mut app, LlmRequest::raw("Pick:").with_json_schema(&schema));
    app.update();
    app.world_mut()
        .write_message(CancelLlmRequest { entity: cancelled });
    let picked = request(
        &mut app,
        LlmRequest::raw("Pick one item:")
            .with_json_schema(&schema)
            .with_max_tokens(24),
    );
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let too_deep = request(
        &mut app,
        LlmRequest::raw("x").with_constraint(OutputConstraint::JsonSchema(deep)),
    );
    let mut all = npcs.clone();
    all.extend([cancelled, picked, too_deep]);
    run_until_finished(&mut app, &all);
    let r = app.world().resource::<Recorded>();
    assert!(
        matches!(r.of(cancelled).last(), Some(Rec::Cancelled(_))),
        "{:?}",
        r.of(cancelled)
    );
    assert!(
        !r.of(cancelled)
            .iter()
            .any(|x| matches!(x, Rec::Started(..))),
        "a job cancelled while compiling never starts"
    );
    match r.failure(too_deep) {
        Some(LlmError::InvalidConstraint(m)) => assert!(m.contains("deeper than"), "{m}"),
        other => panic!("{other:?}"),
    }
    let text = r
        .completed_text(picked)
        .unwrap_or_else(|| panic!("{:?}", r.of(picked)));
    let v: serde_json::Value =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
    let item = v["item"].as_str().unwrap_or_default();
    assert!(item.starts_with("item-") && item.len() == 9, "{text}");
    for npc in npcs {
        assert!(r.completed_text(npc).is_some(), "{:?}", r.of(npc));
    }
}
