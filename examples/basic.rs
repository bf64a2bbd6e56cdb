//! Three NPCs ask the model at once; their lines stream interleaved, then
//! per-request figures and the largest batch the worker decoded.
//!
//! `cargo run --example basic` (fetches the default model when missing).

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use bevy::prelude::*;
use bevy_npc_llm::prelude::*;
use bevy_npc_llm::registry::ModelRegistry;

const NPCS: [(&str, &str, &str); 3] = [
    (
        "Mira",
        "You are Mira, the town's cheerful baker. You love sourdough and gossip.",
        "Good morning, Mira! What are you baking today?",
    ),
    (
        "Brom",
        "You are Brom, a grumpy old blacksmith who secretly writes poetry.",
        "Brom, can you fix my sword by tonight?",
    ),
    (
        "Tilda",
        "You are Tilda, a curious young botanist who talks fast about plants.",
        "Tilda, what is that strange blue flower you are holding?",
    ),
];

fn main() {
    ensure_model();
    let mut app = App::new();
    app.add_plugins((MinimalPlugins, bevy::log::LogPlugin::default()))
        .add_plugins(NpcLlmPlugin::default().with_load_on_startup(true))
        .add_systems(Startup, spawn_npcs);
    app.add_observer(on_token).add_observer(on_failed);

    let start = Instant::now();
    let mut last_print = Instant::now();
    loop {
        app.update();
        let world = app.world_mut();
        let mut done = 0;
        let mut q = world.query::<(&Name, &LlmRequestStatus)>();
        for (_, status) in q.iter(world) {
            if status.is_finished() {
                done += 1;
            }
        }
        if done == NPCS.len() {
            break;
        }
        if start.elapsed() > Duration::from_secs(300) {
            eprintln!("gave up after 300 s");
            std::process::exit(1);
        }
        if last_print.elapsed() > Duration::from_secs(1) {
            last_print = Instant::now();
            if let LlmModelState::Loading {
                model,
                phase,
                progress,
            } = world.resource::<LlmModelState>()
            {
                eprintln!("loading {model}: {phase:?} {:.0}%", progress * 100.0);
            }
        }
        std::thread::sleep(Duration::from_millis(2));
    }

    let world = app.world_mut();
    println!("\n\n=== Lines ===");
    let mut q = world.query::<(&Name, &LlmRequestStatus)>();
    for (name, status) in q.iter(world) {
        println!("{name}: {}", status.text.trim());
    }
    println!("\n=== Per request ===");
    for (name, status) in q.iter(world) {
        let s = &status.stats;
        println!(
            "{name:6} {:?}: prompt {} tok (reused {}), generated {} tok, ttft {:?}, {:.1} tok/s, slot {}",
            status.state,
            s.prompt_tokens,
            s.reused_prefix_tokens,
            s.generated_tokens,
            s.time_to_first_token.unwrap_or_default(),
            s.tokens_per_second,
            s.slot
        );
    }
    let backend = world.resource::<bevy_npc_llm::hardware::BackendStatus>();
    if let Some(plan) = &backend.plan {
        println!(
            "\nbackend: {} on {} — {} layers offloaded, {} threads, {} sequences × {} tokens (KV {:.0} MB)\nwhy: {}",
            plan.model,
            plan.device.as_deref().unwrap_or(&plan.backend),
            backend.layers_offloaded.unwrap_or(0),
            plan.engine.threads,
            plan.engine.sequences,
            plan.engine.context_per_sequence,
            plan.kv_bytes as f64 / 1e6,
            plan.reason
        );
    }
    let stats = world.resource::<LlmEngineStats>();
    let c = &stats.counters;
    println!(
        "\nworker: {} decode calls, {} with more than one sequence, largest batch {} sequences / {} tokens, {} tokens generated",
        c.decode_calls,
        c.multi_sequence_batches,
        c.max_batch_sequences,
        c.max_batch_tokens,
        c.generated_tokens
    );
}

fn spawn_npcs(mut commands: Commands) {
    for (name, persona, question) in NPCS {
        let npc = commands.spawn(Name::new(name)).id();
        commands.entity(npc).insert(
            LlmRequest::chat([
                ChatMessage::system(format!("{persona} Answer in one or two short sentences.")),
                ChatMessage::user(question),
            ])
            .with_cache_key(npc)
            .with_max_tokens(60),
        );
    }
}

fn on_token(token: On<LlmToken>, names: Query<&Name>, mut last: Local<HashMap<Entity, ()>>) {
    let name = names.get(token.entity).map_or("?", |n| n.as_str());
    last.insert(token.entity, ());
    print!("[{name}]{} ", token.text);
    let _ = std::io::stdout().flush();
}

fn on_failed(failed: On<LlmFailed>, names: Query<&Name>) {
    let name = names.get(failed.entity).map_or("?", |n| n.as_str());
    eprintln!("\n{name} failed: {}", failed.error);
}

/// Fetch the default model with the repository's script when it is missing.
fn ensure_model() {
    let Ok(registry) = ModelRegistry::load("assets/models/models.ron") else {
        return;
    };
    let Some(entry) = registry.default_model() else {
        return;
    };
    let path = registry.path_of(entry);
    if !Path::new(&path).exists() {
        eprintln!("{} is missing: fetching it ...", path.display());
        let status = std::process::Command::new("bash")
            .arg("scripts/fetch-models.sh")
            .arg(&entry.id)
            .status();
        if !matches!(status, Ok(s) if s.success()) {
            eprintln!("could not fetch the model; run scripts/fetch-models.sh");
            std::process::exit(1);
        }
    }
}
