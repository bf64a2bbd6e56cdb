//! Bevy systems between the game's ECS data and the worker: submit new
//! requests, cancel, control the model, and turn worker events into status
//! components, entity events and messages. Nothing here waits on inference:
//! the worker's channel is drained with `try_iter()`.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::time::Instant;

use bevy::ecs::system::SystemParam;
use bevy::prelude::*;

use super::protocol::{Command, Event, Job, Knobs, LoadSpec, RequestId};
use super::worker::WorkerHandle;
use super::{LlmEngineStats, LlmModelState};
use crate::errors::{LlmError, ModelLoadError};
use crate::events::*;
use crate::registry::{ModelRegistry, VerificationCache};
use crate::request::{LlmRequest, LlmRequestStatus, RequestState, RequestStats};
use crate::settings::{GpuLayers, LlmSettings};

/// The Bevy side of the worker.
#[derive(Resource)]
pub(crate) struct LlmEngine {
    pub(crate) worker: Option<WorkerHandle>,
    next_id: u64,
    by_id: HashMap<RequestId, Entity>,
    by_entity: HashMap<Entity, RequestId>,
    /// Requests whose events are dropped (entity despawned or request replaced).
    silent: HashSet<RequestId>,
    /// Failures decided on the main thread, delivered with the worker's events.
    local: Vec<Event>,
    pub(crate) verification_cache: Option<PathBuf>,
    knobs: Option<Knobs>,
    /// The model the worker serves with, if any.
    serving: Option<String>,
    last_rate: Option<(Instant, u64)>,
    logs: bool,
}

impl LlmEngine {
    pub(crate) fn new(
        worker: Option<WorkerHandle>,
        verification_cache: Option<PathBuf>,
        logs: bool,
    ) -> Self {
        Self {
            worker,
            next_id: 0,
            by_id: HashMap::new(),
            by_entity: HashMap::new(),
            silent: HashSet::new(),
            local: Vec::new(),
            verification_cache,
            knobs: None,
            serving: None,
            last_rate: None,
            logs,
        }
    }

    fn send(&mut self, cmd: Command) -> bool {
        match &self.worker {
            Some(w) => w.send(cmd),
            None => false,
        }
    }

    fn fresh_id(&mut self) -> RequestId {
        self.next_id += 1;
        RequestId(self.next_id)
    }

    /// Make sure a worker thread exists (restart after a crash).
    fn ensure_worker(&mut self, settings: &LlmSettings) -> Result<(), ModelLoadError> {
        if self.worker.is_none() {
            self.worker = Some(WorkerHandle::spawn(self.logs, knobs(settings))?);
            self.knobs = Some(knobs(settings));
        }
        Ok(())
    }
}

pub(crate) fn knobs(settings: &LlmSettings) -> Knobs {
    Knobs {
        prefix_cache: settings.prefix_cache,
        prompt_chunk: settings.prompt_chunk,
        // The worker's own bound is a safety net; the exact check against
        // `queue_capacity` happens on the main thread at submission.
        queue_capacity: settings.capacity() as u32,
    }
}

/// Resolve what to load from the registry and settings.
pub(crate) fn load_spec(
    registry: &ModelRegistry,
    settings: &LlmSettings,
    model: Option<&str>,
    verification_cache: Option<&PathBuf>,
) -> Result<LoadSpec, ModelLoadError> {
    let wanted = model.unwrap_or(&settings.model);
    let entry = registry.select(wanted)?;
    let path = crate::ron_util::resolve_data_path(&registry.path_of(entry));
    let gpu_layers = match settings.gpu_layers {
        GpuLayers::Count(n) => n,
        GpuLayers::Auto => {
            let offload = super::worker::backend(settings.llama_logs)
                .map(|b| b.supports_gpu_offload())
                .unwrap_or(false);
            if offload { 999 } else { 0 }
        }
    };
    Ok(LoadSpec {
        model_id: entry.id.clone(),
        path,
        verify: settings
            .verify_sha256
            .then(|| (entry.sha256.clone(), entry.size_bytes)),
        cache: verification_cache
            .cloned()
            .or_else(|| Some(registry.models_dir().join(".verify-cache.ron")))
            .map(VerificationCache::new),
        prompt_format: entry.prompt_format.clone(),
        model_sampling: entry.sampling.clone(),
        context_per_sequence: settings.context_per_sequence.min(entry.context_length),
        sequences: settings.max_parallel_sequences,
        batch_size: settings.batch_size,
        threads: settings.effective_threads(),
        gpu_layers,
    })
}

fn start_load(
    engine: &mut LlmEngine,
    registry: &ModelRegistry,
    settings: &LlmSettings,
    model: Option<&str>,
    state: &mut LlmModelState,
    failed: &mut MessageWriter<ModelLoadFailed>,
) {
    let wanted = model.unwrap_or(&settings.model).to_string();
    let result = engine.ensure_worker(settings).and_then(|()| {
        load_spec(
            registry,
            settings,
            model,
            engine.verification_cache.as_ref(),
        )
    });
    match result {
        Ok(spec) => {
            let id = spec.model_id.clone();
            if let Some(w) = &engine.worker {
                // Stop a verification or load still running for an older request.
                w.abort_load();
            }
            if engine.send(Command::Load(Box::new(spec))) {
                *state = LlmModelState::Loading {
                    model: id,
                    phase: LoadPhase::Verifying,
                    progress: 0.0,
                };
            } else {
                engine.worker = None;
                *state = LlmModelState::Failed {
                    model: id.clone(),
                    error: ModelLoadError::WorkerGone,
                };
                failed.write(ModelLoadFailed {
                    model: id,
                    error: ModelLoadError::WorkerGone,
                });
            }
        }
        Err(error) => {
            warn!("bevy_npc_llm: cannot load model `{wanted}`: {error}");
            *state = LlmModelState::Failed {
                model: wanted.clone(),
                error: error.clone(),
            };
            failed.write(ModelLoadFailed {
                model: wanted,
                error,
            });
        }
    }
}

/// [`NpcLlmSystems::Control`](crate::NpcLlmSystems::Control): model load/unload messages and settings changes.
pub(crate) fn control(
    mut engine: ResMut<LlmEngine>,
    registry: Res<ModelRegistry>,
    settings: Res<LlmSettings>,
    mut state: ResMut<LlmModelState>,
    mut loads: MessageReader<LoadModel>,
    mut unloads: MessageReader<UnloadModel>,
    mut failed: MessageWriter<ModelLoadFailed>,
) {
    let k = knobs(&settings);
    if engine.knobs != Some(k) && engine.worker.is_some() {
        engine.knobs = Some(k);
        engine.send(Command::Configure(k));
    }
    for _ in unloads.read() {
        if engine.send(Command::Unload) {
            *state = LlmModelState::Unloaded;
        }
    }
    // Only the newest load request counts.
    if let Some(load) = loads.read().last() {
        start_load(
            &mut engine,
            &registry,
            &settings,
            load.model.as_deref(),
            &mut state,
            &mut failed,
        );
    }
}

/// [`NpcLlmSystems::Submit`](crate::NpcLlmSystems::Submit): new requests and cancellations.
#[allow(clippy::too_many_arguments)]
pub(crate) fn submit(
    mut commands: Commands,
    mut engine: ResMut<LlmEngine>,
    registry: Res<ModelRegistry>,
    settings: Res<LlmSettings>,
    mut state: ResMut<LlmModelState>,
    mut cancels: MessageReader<CancelLlmRequest>,
    mut removed: RemovedComponents<LlmRequest>,
    new: Query<(Entity, &LlmRequest), Changed<LlmRequest>>,
    alive: Query<Entity>,
    mut failed: MessageWriter<ModelLoadFailed>,
) {
    for c in cancels.read() {
        if let Some(&id) = engine.by_entity.get(&c.entity) {
            engine.send(Command::Cancel(id));
        }
    }
    for e in removed.read() {
        if let Some(&id) = engine.by_entity.get(&e) {
            // Removed and re-inserted this frame: handled below as a replacement.
            if new.contains(e) {
                continue;
            }
            engine.send(Command::Cancel(id));
            if !alive.contains(e) {
                engine.silent.insert(id);
                engine.by_entity.remove(&e);
            }
        }
    }
    for (entity, request) in &new {
        // A new request replaces the entity's previous one.
        if let Some(old) = engine.by_entity.remove(&entity) {
            engine.silent.insert(old);
            engine.send(Command::Cancel(old));
        }
        let id = engine.fresh_id();
        engine.by_id.insert(id, entity);
        engine.by_entity.insert(entity, id);
        commands.entity(entity).insert(LlmRequestStatus {
            state: RequestState::Queued,
            text: String::new(),
            stats: RequestStats::default(),
        });
        // Capacity counts every request not yet finished, this one included.
        let in_flight = engine.by_id.len();
        if in_flight > settings.capacity() {
            engine.local.push(Event::Failed {
                id,
                error: LlmError::QueueFull {
                    capacity: settings.capacity(),
                },
            });
            continue;
        }
        if *state == LlmModelState::Unloaded {
            start_load(
                &mut engine,
                &registry,
                &settings,
                None,
                &mut state,
                &mut failed,
            );
        }
        if let LlmModelState::Failed { error, .. } = &*state
            && engine.serving.is_none()
        {
            let error = LlmError::ModelUnavailable(error.clone());
            engine.local.push(Event::Failed { id, error });
            continue;
        }
        let job = Job {
            id,
            prompt: request.prompt.clone(),
            base_sampling: settings.sampling.clone(),
            overrides: request.sampling.clone(),
            priority: request.priority.rank(),
            cache_key: request.cache_key.map(|k| k.0),
            trim_prompt: request.trim_prompt,
            submitted: Instant::now(),
        };
        if !engine.send(Command::Submit(Box::new(job))) {
            engine.local.push(Event::Failed {
                id,
                error: LlmError::WorkerGone("the inference worker is not running".into()),
            });
        }
    }
}

/// Every message the receive system writes.
#[derive(SystemParam)]
pub(crate) struct Writers<'w> {
    started: MessageWriter<'w, LlmStarted>,
    token: MessageWriter<'w, LlmToken>,
    completed: MessageWriter<'w, LlmCompleted>,
    failed: MessageWriter<'w, LlmFailed>,
    cancelled: MessageWriter<'w, LlmCancelled>,
    loading: MessageWriter<'w, ModelLoading>,
    loaded: MessageWriter<'w, ModelLoaded>,
    load_failed: MessageWriter<'w, ModelLoadFailed>,
    unloaded: MessageWriter<'w, ModelUnloaded>,
}

/// [`NpcLlmSystems::Receive`](crate::NpcLlmSystems::Receive): worker events → status, events, messages.
pub(crate) fn receive(
    mut commands: Commands,
    mut engine: ResMut<LlmEngine>,
    mut state: ResMut<LlmModelState>,
    mut stats: ResMut<LlmEngineStats>,
    mut statuses: Query<&mut LlmRequestStatus>,
    mut out: Writers,
) {
    let mut events: Vec<Event> = std::mem::take(&mut engine.local);
    if let Some(w) = &engine.worker {
        events.extend(w.events.try_iter());
    }
    for ev in events {
        match ev {
            Event::Loading {
                model,
                phase,
                progress,
            } => {
                *state = LlmModelState::Loading {
                    model: model.clone(),
                    phase,
                    progress,
                };
                out.loading.write(ModelLoading {
                    model,
                    phase,
                    progress,
                });
            }
            Event::Loaded(info) => {
                info!(
                    "bevy_npc_llm: model `{}` ready ({} slots × {} tokens, {} threads, loaded in {:.2?})",
                    info.model,
                    info.sequences,
                    info.context_per_sequence,
                    info.threads,
                    info.load_time
                );
                stats.serving_model = Some(info.model.clone());
                engine.serving = Some(info.model.clone());
                *state = LlmModelState::Ready((*info).clone());
                out.loaded.write(ModelLoaded { info: *info });
            }
            Event::LoadFailed {
                model,
                error,
                still_loaded,
            } => {
                warn!("bevy_npc_llm: model `{model}` failed to load: {error}");
                stats.serving_model = still_loaded.clone();
                engine.serving = still_loaded;
                *state = LlmModelState::Failed {
                    model: model.clone(),
                    error: error.clone(),
                };
                out.load_failed.write(ModelLoadFailed { model, error });
            }
            Event::Unloaded { model } => {
                if stats.serving_model.as_deref() == Some(model.as_str()) {
                    stats.serving_model = None;
                    engine.serving = None;
                }
                out.unloaded.write(ModelUnloaded { model });
            }
            Event::Counters(c) => {
                let now = Instant::now();
                match engine.last_rate {
                    Some((t, n)) if now.duration_since(t).as_secs_f32() >= 0.5 => {
                        let dt = now.duration_since(t).as_secs_f32();
                        stats.tokens_per_second = c.generated_tokens.saturating_sub(n) as f32 / dt;
                        engine.last_rate = Some((now, c.generated_tokens));
                    }
                    // First figures, or a new model's counters starting at zero.
                    None => engine.last_rate = Some((now, c.generated_tokens)),
                    Some((_, n)) if c.generated_tokens < n => {
                        engine.last_rate = Some((now, c.generated_tokens));
                    }
                    _ => {}
                }
                stats.counters = *c;
            }
            Event::Stopped { reason } => {
                let reason = reason.unwrap_or_else(|| "stopped".into());
                error!("bevy_npc_llm: inference worker stopped: {reason}");
                stats.worker_failure = Some(reason.clone());
                stats.serving_model = None;
                engine.serving = None;
                engine.worker = None;
                *state = LlmModelState::Failed {
                    model: String::new(),
                    error: ModelLoadError::WorkerGone,
                };
                // Every request still in flight fails; nothing hangs.
                let ids: Vec<RequestId> = engine.by_id.keys().copied().collect();
                for id in ids {
                    deliver(
                        &mut commands,
                        &mut engine,
                        &mut statuses,
                        &mut out,
                        Event::Failed {
                            id,
                            error: LlmError::WorkerGone(reason.clone()),
                        },
                    );
                }
            }
            other => deliver(&mut commands, &mut engine, &mut statuses, &mut out, other),
        }
    }
    stats.in_flight = engine.by_id.len();
    if !matches!(*state, LlmModelState::Ready(_)) {
        stats.tokens_per_second = 0.0;
    }
}

/// Route one request event to its entity.
fn deliver(
    commands: &mut Commands,
    engine: &mut LlmEngine,
    statuses: &mut Query<&mut LlmRequestStatus>,
    out: &mut Writers,
    ev: Event,
) {
    let (id, terminal) = match &ev {
        Event::Started { id, .. } | Event::Token { id, .. } => (*id, false),
        Event::Completed { id, .. } | Event::Failed { id, .. } | Event::Cancelled { id } => {
            (*id, true)
        }
        _ => return,
    };
    let Some(&entity) = engine.by_id.get(&id) else {
        return;
    };
    let silent = engine.silent.contains(&id);
    if terminal {
        engine.by_id.remove(&id);
        engine.silent.remove(&id);
        if engine.by_entity.get(&entity) == Some(&id) {
            engine.by_entity.remove(&entity);
        }
    }
    if silent {
        return;
    }
    let Ok(mut status) = statuses.get_mut(entity) else {
        return;
    };
    match ev {
        Event::Started {
            prompt_tokens,
            reused,
            ..
        } => {
            status.state = RequestState::Running;
            status.stats.prompt_tokens = prompt_tokens;
            status.stats.reused_prefix_tokens = reused;
            let e = LlmStarted {
                entity,
                prompt_tokens,
                reused_prefix_tokens: reused,
            };
            out.started.write(e.clone());
            commands.trigger(e);
        }
        Event::Token { text, .. } => {
            status.text.push_str(&text);
            let e = LlmToken { entity, text };
            out.token.write(e.clone());
            commands.trigger(e);
        }
        Event::Completed {
            text,
            finish,
            stats,
            ..
        } => {
            status.state = RequestState::Completed(finish);
            status.text.clone_from(&text);
            status.stats = stats.clone();
            let e = LlmCompleted {
                entity,
                text,
                finish,
                stats,
            };
            out.completed.write(e.clone());
            commands.trigger(e);
        }
        Event::Failed { error, .. } => {
            status.state = RequestState::Failed(error.clone());
            let e = LlmFailed { entity, error };
            out.failed.write(e.clone());
            commands.trigger(e);
        }
        Event::Cancelled { .. } => {
            status.state = RequestState::Cancelled;
            let e = LlmCancelled {
                entity,
                partial_text: status.text.clone(),
            };
            out.cancelled.write(e.clone());
            commands.trigger(e);
        }
        _ => {}
    }
}
