//! Helpers shared by the integration tests: a headless `App` with the real
//! models, an event recorder fed by observers (so order is exact), and a
//! bounded update loop.
#![allow(dead_code)]

pub mod servers;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use bevy::prelude::*;
use bevy_npc_llm::errors::{LlmError, ModelLoadError};
use bevy_npc_llm::prelude::*;
use bevy_npc_llm::request::{FinishReason, RequestStats};

pub const SMOL: &str = "smollm2-135m-instruct-q4_1";
pub const GEMMA: &str = "gemma3-270m-q4_k_m";

pub fn models_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("assets/models")
}

pub fn model_file(name: &str) -> PathBuf {
    let p = models_dir().join(name);
    assert!(
        p.exists(),
        "{} is missing: run scripts/fetch-models.sh (the README's test command does)",
        p.display()
    );
    p
}

pub fn smol_file() -> PathBuf {
    model_file("SmolLM2-135M-Instruct.Q4_1.gguf")
}

pub fn gemma_file() -> PathBuf {
    model_file("gemma-3-270m-q4_k_m.gguf")
}

/// Small, fast settings for tests.
pub fn settings() -> LlmSettings {
    let mut s = LlmSettings {
        model: SMOL.into(),
        threads: 2,
        context_per_sequence: 1024,
        max_parallel_sequences: 8,
        ..Default::default()
    };
    s.sampling.max_tokens = 24;
    s
}

#[derive(Debug, Clone, PartialEq)]
pub enum Rec {
    Started(Entity, usize, usize),
    Token(Entity, String),
    Completed(Entity, String, FinishReason, RequestStats),
    Failed(Entity, LlmError),
    Cancelled(Entity),
}

impl Rec {
    pub fn entity(&self) -> Entity {
        match self {
            Rec::Started(e, ..)
            | Rec::Token(e, _)
            | Rec::Completed(e, ..)
            | Rec::Failed(e, _)
            | Rec::Cancelled(e) => *e,
        }
    }
}

#[derive(Resource, Default, Debug)]
pub struct Recorded(pub Vec<Rec>);

impl Recorded {
    pub fn of(&self, e: Entity) -> Vec<Rec> {
        self.0.iter().filter(|r| r.entity() == e).cloned().collect()
    }
    pub fn finished(&self, e: Entity) -> bool {
        self.0.iter().any(|r| {
            r.entity() == e && matches!(r, Rec::Completed(..) | Rec::Failed(..) | Rec::Cancelled(_))
        })
    }
    pub fn completed_text(&self, e: Entity) -> Option<String> {
        self.0.iter().find_map(|r| match r {
            Rec::Completed(x, t, ..) if *x == e => Some(t.clone()),
            _ => None,
        })
    }
    /// Of `es`: how many completed, and how many were rejected with `QueueFull`.
    pub fn completed_and_queue_full(&self, es: &[Entity]) -> (usize, usize) {
        let done = es.iter().filter(|e| self.completed_text(**e).is_some());
        let full = es
            .iter()
            .filter(|e| matches!(self.failure(**e), Some(LlmError::QueueFull { .. })));
        (done.count(), full.count())
    }
    pub fn failure(&self, e: Entity) -> Option<LlmError> {
        self.0.iter().find_map(|r| match r {
            Rec::Failed(x, err) if *x == e => Some(err.clone()),
            _ => None,
        })
    }
}

pub fn app_with(settings: LlmSettings) -> App {
    app_with_registry(settings, &models_dir().join("models.ron"))
}

/// [`app_with`] reading the model registry from `registry`.
pub fn app_with_registry(settings: LlmSettings, registry: &std::path::Path) -> App {
    let mut app = App::new();
    app.add_plugins(MinimalPlugins).add_plugins(
        NpcLlmPlugin::default()
            .with_registry_path(registry)
            .with_settings(settings),
    );
    app.init_resource::<Recorded>();
    app.add_observer(|e: On<LlmStarted>, mut r: ResMut<Recorded>| {
        r.0.push(Rec::Started(
            e.entity,
            e.prompt_tokens,
            e.reused_prefix_tokens,
        ));
    });
    app.add_observer(|e: On<LlmToken>, mut r: ResMut<Recorded>| {
        r.0.push(Rec::Token(e.entity, e.text.clone()));
    });
    app.add_observer(|e: On<LlmCompleted>, mut r: ResMut<Recorded>| {
        r.0.push(Rec::Completed(
            e.entity,
            e.text.clone(),
            e.finish,
            e.stats.clone(),
        ));
    });
    app.add_observer(|e: On<LlmFailed>, mut r: ResMut<Recorded>| {
        r.0.push(Rec::Failed(e.entity, e.error.clone()));
    });
    app.add_observer(|e: On<LlmCancelled>, mut r: ResMut<Recorded>| {
        r.0.push(Rec::Cancelled(e.entity));
    });
    app
}

pub fn app() -> App {
    app_with(settings())
}

/// Update until `done` holds; panics after `secs` seconds so nothing hangs.
pub fn run_until(app: &mut App, secs: u64, mut done: impl FnMut(&mut App) -> bool) {
    let start = Instant::now();
    loop {
        app.update();
        if done(app) {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(secs),
            "timed out after {secs} s; recorded: {:?}; state: {:?}",
            app.world().resource::<Recorded>().0,
            app.world().resource::<LlmModelState>()
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Update until every entity has finished.
pub fn run_until_finished(app: &mut App, entities: &[Entity]) {
    let entities = entities.to_vec();
    run_until(app, 240, move |app| {
        let r = app.world().resource::<Recorded>();
        entities.iter().all(|e| r.finished(*e))
    });
}

pub fn request(app: &mut App, req: LlmRequest) -> Entity {
    app.world_mut().spawn(req).id()
}

pub fn chat(user: &str) -> LlmRequest {
    LlmRequest::chat([
        ChatMessage::system("You are a helpful villager. Answer briefly."),
        ChatMessage::user(user),
    ])
}

/// Spawn `n` long chat requests and update until they stream (all of them,
/// or at least one when `all` is false).
pub fn start_streaming(app: &mut App, n: usize, what: &str, all: bool) -> Vec<Entity> {
    let es: Vec<Entity> = (0..n)
        .map(|i| request(app, chat(&format!("{what} number {i}."))))
        .collect();
    let wait = es.clone();
    run_until(app, 120, move |app| {
        let r = app.world().resource::<Recorded>();
        let streaming = |e: &Entity| r.of(*e).iter().any(|x| matches!(x, Rec::Token(..)));
        if all {
            wait.iter().all(streaming)
        } else {
            wait.iter().any(streaming)
        }
    });
    es
}

/// Ask for a model (`None`: the settings' model) and update until it serves.
pub fn load_ready(app: &mut App, model: Option<&str>) {
    app.world_mut().write_message(LoadModel {
        model: model.map(String::from),
    });
    run_until(app, 60, |app| {
        app.world().resource::<LlmModelState>().is_ready()
    });
}

/// Ask for a model (`None`: the settings' model) that must fail to load,
/// update until it has, and return why.
pub fn load_failure(app: &mut App, model: Option<&str>) -> ModelLoadError {
    app.world_mut().write_message(LoadModel {
        model: model.map(String::from),
    });
    run_until(app, 60, |app| {
        matches!(
            app.world().resource::<LlmModelState>(),
            LlmModelState::Failed { .. }
        )
    });
    match app.world().resource::<LlmModelState>() {
        LlmModelState::Failed { error, .. } => error.clone(),
        _ => unreachable!(),
    }
}

/// Submit a request, run it to its end, and return its text; panics when it
/// did not complete.
pub fn complete(app: &mut App, req: LlmRequest) -> String {
    let e = request(app, req);
    run_until_finished(app, &[e]);
    let r = app.world().resource::<Recorded>();
    r.completed_text(e)
        .unwrap_or_else(|| panic!("request did not complete: {:?}", r.of(e)))
}

/// Run `req` on `npc` under its own cache key (the records cleared first);
/// returns its prompt tokens, the tokens reused from the cache, its text.
pub fn cached_turn(app: &mut App, npc: Entity, req: &LlmRequest) -> (usize, usize, String) {
    app.world_mut().resource_mut::<Recorded>().0.clear();
    app.world_mut()
        .entity_mut(npc)
        .insert(req.clone().with_cache_key(npc));
    run_until_finished(app, &[npc]);
    let r = app.world().resource::<Recorded>();
    let recs = r.of(npc);
    let Some(Rec::Started(_, prompt, reused)) = recs.first().cloned() else {
        panic!("{recs:?}")
    };
    let text = r
        .completed_text(npc)
        .unwrap_or_else(|| panic!("did not complete: {recs:?}"));
    (prompt, reused, text)
}

/// A villager's persona: friendly, plain-spoken.
pub fn persona(name: &str, identity: &str, goal: &str) -> Persona {
    Persona {
        name: name.into(),
        identity: identity.into(),
        traits: vec!["friendly".into()],
        speaking_style: "plainly, in short sentences".into(),
        goal: goal.into(),
    }
}
