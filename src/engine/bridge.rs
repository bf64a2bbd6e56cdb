//! Bevy systems between the game's ECS data and the worker: submit new
//! requests, cancel, control the model, and turn worker events into status
//! components, entity events and messages. Nothing here waits on inference:
//! the worker's channel is drained with `try_iter()`.

use std::collections::HashSet;
use std::time::Instant;

use bevy::ecs::system::SystemParam;
use bevy::prelude::*;

use super::backend::BackendKind;
use super::connection::LlmEngine;
use super::load_intent::{LoadDecision, LoadInput};
use super::loading::serve_remotely;
pub(crate) use super::loading::{Loader, knobs};
use super::protocol::{Event, Job, RequestId};
use super::{LlmEngineStats, LlmModelState};
use crate::errors::{LlmError, ModelLoadError};
use crate::events::*;
use crate::hardware::BackendStatus;
use crate::request::{LlmRequest, LlmRequestStatus, RequestState, RequestStats};
use crate::settings::{BackendChoice, LlmSettings};

/// [`NpcLlmSystems::Control`](crate::NpcLlmSystems::Control): model load/unload messages and settings changes.
pub(crate) fn control(
    mut loader: Loader,
    mut loads: MessageReader<LoadModel>,
    mut unloads: MessageReader<UnloadModel>,
    mut downloaded: MessageReader<crate::download::ModelDownloaded>,
    mut download_failed: MessageReader<crate::download::ModelDownloadFailed>,
    mut download_progress: MessageReader<crate::download::ModelDownloadProgress>,
    serving: Res<LlmEngineStats>,
) {
    // News of downloads counts only for the load that still waits for it
    // (the newest load or unload wins, whatever order downloads end in).
    for p in download_progress.read() {
        if loader.engine.intent.on(LoadInput::Progress(p.id.clone())) == LoadDecision::ShowProgress
        {
            *loader.state = LlmModelState::Loading {
                model: p.id.clone(),
                phase: LoadPhase::Downloading,
                progress: p.fraction(),
            };
        }
    }
    for d in downloaded.read() {
        if let LoadDecision::Load(model) =
            loader.engine.intent.on(LoadInput::Downloaded(d.id.clone()))
        {
            // Not "already loading": the file is here now.
            *loader.state = LlmModelState::Unloaded;
            loader.start(model.as_deref());
        }
    }
    for f in download_failed.read() {
        if loader
            .engine
            .intent
            .on(LoadInput::DownloadFailed(f.id.clone()))
            == LoadDecision::FailWaiting
        {
            let error = ModelLoadError::Download(f.error.clone());
            // Requests wait for this model only when no model serves them:
            // those fail now, typed; requests streaming on a loaded model
            // go on.
            if serving.serving_model.is_none() {
                let ids: Vec<RequestId> = loader.engine.by_id.keys().copied().collect();
                for rid in ids {
                    loader.engine.cancel(rid);
                    loader.engine.local.push(Event::Failed {
                        id: rid,
                        error: LlmError::ModelUnavailable(error.clone()),
                    });
                }
            }
            loader.fail(f.id.clone(), error);
        }
    }
    let k = knobs(&loader.settings);
    if loader.engine.knobs != Some(k) && loader.engine.worker.is_some() {
        loader.engine.knobs = Some(k);
        if let Some(w) = loader.engine.backend() {
            w.configure(k);
        }
    }
    for _ in unloads.read() {
        loader.engine.intent.on(LoadInput::Unload);
        if loader.engine.backend().is_some_and(|w| w.unload()) {
            *loader.state = LlmModelState::Unloaded;
        }
    }
    // Only the newest load request counts.
    if let Some(load) = loads.read().last() {
        loader.start(load.model.as_deref());
    }
}

/// Whether [`control`] has anything to do this frame: a load, unload or
/// download message, or knobs the worker does not have yet. An idle frame
/// runs none of the plugin's systems (run conditions cost no task).
pub(crate) fn control_has_work(
    mut loads: MessageReader<LoadModel>,
    mut unloads: MessageReader<UnloadModel>,
    mut downloaded: MessageReader<crate::download::ModelDownloaded>,
    mut download_failed: MessageReader<crate::download::ModelDownloadFailed>,
    mut download_progress: MessageReader<crate::download::ModelDownloadProgress>,
    engine: Res<LlmEngine>,
    settings: Res<LlmSettings>,
) -> bool {
    let messages = loads.read().count()
        + unloads.read().count()
        + downloaded.read().count()
        + download_failed.read().count()
        + download_progress.read().count();
    messages > 0 || (engine.worker.is_some() && engine.knobs != Some(knobs(&settings)))
}

/// Whether [`submit`] has anything to do this frame: a new, replaced or
/// removed request, or a cancellation.
pub(crate) fn submit_has_work(
    mut cancels: MessageReader<CancelLlmRequest>,
    mut removed: RemovedComponents<LlmRequest>,
    new: Query<(), Changed<LlmRequest>>,
) -> bool {
    let messages = cancels.read().count() + removed.read().count();
    messages > 0 || !new.is_empty()
}

/// Whether [`receive`] has anything to deliver this frame: events of the
/// worker, of a retired one, or of this side, or requests submitted since
/// `LlmEngineStats::in_flight` was counted.
pub(crate) fn receive_has_work(engine: Res<LlmEngine>, stats: Res<LlmEngineStats>) -> bool {
    !engine.local.is_empty()
        || !engine.retiring.is_empty()
        || engine.backend().is_some_and(|w| w.has_events())
        || stats.in_flight != engine.by_id.len()
}

/// [`NpcLlmSystems::Submit`](crate::NpcLlmSystems::Submit): new requests and cancellations.
#[allow(clippy::too_many_arguments)]
pub(crate) fn submit(
    mut commands: Commands,
    mut loader: Loader,
    mut cancels: MessageReader<CancelLlmRequest>,
    mut removed: RemovedComponents<LlmRequest>,
    new: Query<(Entity, &LlmRequest), Changed<LlmRequest>>,
    alive: Query<Entity>,
    serving: Res<LlmEngineStats>,
) {
    // This frame's jobs go to the worker as one command (see `Command::Submit`).
    let mut batch: Vec<Job> = Vec::new();
    for c in cancels.read() {
        if let Some(&id) = loader.engine.by_entity.get(&c.entity) {
            loader.engine.cancel(id);
        }
    }
    for e in removed.read() {
        if let Some(&id) = loader.engine.by_entity.get(&e) {
            // Removed and re-inserted this frame: handled below as a replacement.
            if new.contains(e) {
                continue;
            }
            loader.engine.cancel(id);
            if !alive.contains(e) {
                loader.engine.silent.insert(id);
                loader.engine.by_entity.remove(&e);
            }
        }
    }
    for (entity, request) in &new {
        // A new request replaces the entity's previous one.
        if let Some(old) = loader.engine.by_entity.remove(&entity) {
            loader.engine.silent.insert(old);
            loader.engine.cancel(old);
        }
        // The first request loads the model (before it is registered: a
        // backend switch while starting must not count it as orphaned).
        if *loader.state == LlmModelState::Unloaded {
            loader.start(None);
        }
        let id = loader.engine.fresh_id();
        loader.engine.by_id.insert(id, entity);
        loader.engine.by_entity.insert(entity, id);
        commands.entity(entity).insert(LlmRequestStatus {
            state: RequestState::Queued,
            text: String::new(),
            stats: RequestStats::default(),
        });
        // Capacity counts every request not yet finished, this one included.
        let in_flight = loader.engine.by_id.len();
        if in_flight > loader.settings.capacity() {
            loader.engine.local.push(Event::Failed {
                id,
                error: LlmError::QueueFull {
                    capacity: loader.settings.capacity(),
                },
            });
            continue;
        }
        if let LlmModelState::Failed { error, .. } = &*loader.state
            && serving.serving_model.is_none()
        {
            let error = LlmError::ModelUnavailable(error.clone());
            loader.engine.local.push(Event::Failed { id, error });
            continue;
        }
        let job = Job {
            id,
            prompt: request.prompt.clone(),
            base_sampling: loader.settings.sampling.clone(),
            overrides: request.sampling.clone(),
            priority: request.priority.rank(),
            cache_key: request.cache_key.map(|k| k.0),
            trim_prompt: request.trim_prompt,
            constraint: request.constraint.clone(),
            submitted: Instant::now(),
        };
        loader.engine.pending.insert(id, job.clone());
        batch.push(job);
    }
    let ids: Vec<RequestId> = batch.iter().map(|j| j.id).collect();
    if !loader.engine.backend().is_some_and(|w| w.submit(batch)) {
        for id in ids {
            loader.engine.pending.remove(&id);
            loader.engine.local.push(Event::Failed {
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
#[allow(clippy::too_many_arguments)]
pub(crate) fn receive(
    mut commands: Commands,
    mut engine: ResMut<LlmEngine>,
    mut state: ResMut<LlmModelState>,
    mut stats: ResMut<LlmEngineStats>,
    mut backend: ResMut<BackendStatus>,
    mut statuses: Query<&mut LlmRequestStatus>,
    settings: Res<LlmSettings>,
    mut out: Writers,
) {
    let mut events: Vec<Event> = std::mem::take(&mut engine.local);
    engine.collect_retired(&mut events);
    if let Some(w) = engine.backend() {
        w.poll(&mut events);
    }
    // Requests moved to another worker during this frame: the old worker's
    // events for them are dropped.
    let mut moved: HashSet<RequestId> = HashSet::new();
    for ev in events {
        if ev.request().is_some_and(|(id, _)| moved.contains(&id)) {
            continue;
        }
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
                backend.layers_offloaded = Some(info.gpu_layers);
                stats.serving_model = Some(info.model.clone());
                stats.remote_server.clone_from(&info.remote);
                *state = LlmModelState::Ready((*info).clone());
                out.loaded.write(ModelLoaded { info: *info });
            }
            Event::LoadFailed {
                model,
                error,
                still_loaded,
            } => {
                warn!("bevy_npc_llm: model `{model}` failed to load: {error}");
                let fall_back = still_loaded.is_none()
                    && settings.backend == BackendChoice::LocalWithRemoteFallback
                    && engine.kind() == Some(BackendKind::Local);
                stats.serving_model = still_loaded;
                *state = LlmModelState::Failed {
                    model: model.clone(),
                    error: error.clone(),
                };
                out.load_failed.write(ModelLoadFailed { model, error });
                if fall_back {
                    moved = fall_back_to_remote(&mut engine, &settings, &mut state);
                }
            }
            Event::Unloaded { model } => {
                if stats.serving_model.as_deref() == Some(model.as_str()) {
                    stats.serving_model = None;
                    stats.remote_server = None;
                }
                // The state follows the worker: a model unloaded after it was
                // reported ready (an unload asked for while its load ran) is
                // no longer ready, and the next request loads one again
                // instead of waiting for a model that is not there.
                if matches!(&*state, LlmModelState::Ready(info) if info.model == model) {
                    *state = LlmModelState::Unloaded;
                }
                out.unloaded.write(ModelUnloaded { model });
            }
            Event::Counters(c) => {
                tokens_per_second(&mut engine, &mut stats, c.generated_tokens);
                stats.counters = *c;
            }
            Event::Stopped { reason } => {
                let reason = reason.unwrap_or_else(|| "stopped".into());
                error!("bevy_npc_llm: inference worker stopped: {reason}");
                stats.worker_failure = Some(reason.clone());
                stats.serving_model = None;
                stats.remote_server = None;
                // Its thread has ended (Stopped is its last event): joined
                // on the reaper, never here.
                engine.drop_worker();
                *state = LlmModelState::Failed {
                    model: String::new(),
                    error: ModelLoadError::WorkerGone,
                };
                // Every request still in flight fails; nothing hangs.
                let ids: Vec<RequestId> = engine.by_id.keys().copied().collect();
                for id in ids {
                    let error = LlmError::WorkerGone(reason.clone());
                    let ev = Event::Failed { id, error };
                    deliver(&mut commands, &mut engine, &mut statuses, &mut out, ev);
                }
            }
            other => {
                if let Event::Completed { stats: s, .. } = &other
                    && s.time_to_first_token.is_some()
                {
                    stats.last_time_to_first_token = s.time_to_first_token;
                }
                deliver(&mut commands, &mut engine, &mut statuses, &mut out, other);
            }
        }
    }
    stats.in_flight = engine.by_id.len();
    if !matches!(*state, LlmModelState::Ready(_)) {
        stats.tokens_per_second = 0.0;
    }
}

/// Route one request event to its entity.
/// The local backend failed to load with the remote server as fallback:
/// serve remotely; the requests that moved there.
fn fall_back_to_remote(
    engine: &mut LlmEngine,
    settings: &LlmSettings,
    state: &mut LlmModelState,
) -> HashSet<RequestId> {
    warn!(
        "bevy_npc_llm: falling back to the remote server {}",
        crate::settings::redact_url(&settings.remote.base_url)
    );
    serve_remotely(engine, settings, state).unwrap_or_else(|e| {
        error!("bevy_npc_llm: cannot fall back to the remote server: {e}");
        HashSet::new()
    })
}

/// The generation rate over at least half a second, from the worker's
/// running count of generated tokens.
fn tokens_per_second(engine: &mut LlmEngine, stats: &mut LlmEngineStats, generated: u64) {
    let now = Instant::now();
    match engine.last_rate {
        Some((t, n)) if now.duration_since(t).as_secs_f32() >= 0.5 => {
            let dt = now.duration_since(t).as_secs_f32();
            stats.tokens_per_second = generated.saturating_sub(n) as f32 / dt;
            engine.last_rate = Some((now, generated));
        }
        // First figures, or a new model's counters starting at zero.
        None => engine.last_rate = Some((now, generated)),
        Some((_, n)) if generated < n => engine.last_rate = Some((now, generated)),
        _ => {}
    }
}

fn deliver(
    commands: &mut Commands,
    engine: &mut LlmEngine,
    statuses: &mut Query<&mut LlmRequestStatus>,
    out: &mut Writers,
    ev: Event,
) {
    let Some((id, terminal)) = ev.request() else {
        return;
    };
    if terminal || matches!(ev, Event::Started { .. }) {
        engine.pending.remove(&id);
    }
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
    announce(commands, out, &mut status, entity, ev);
}

/// A request's event on its entity: its status updated, the entity event
/// triggered and the message written.
fn announce(
    commands: &mut Commands,
    out: &mut Writers,
    status: &mut LlmRequestStatus,
    entity: Entity,
    ev: Event,
) {
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
            output,
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
                output,
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
