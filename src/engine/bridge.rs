//! Bevy systems between the game's ECS data and the worker: submit new
//! requests, cancel, control the model, and turn worker events into status
//! components, entity events and messages. Nothing here waits on inference:
//! the worker's channel is drained with `try_iter()`.

use std::collections::HashSet;
use std::time::Instant;

use bevy::ecs::system::{SystemParam, SystemState};
use bevy::prelude::*;

use super::backend::BackendKind;
use super::connection::LlmEngine;
use super::kv_snapshot::{KvSnapshotError, NpcKvSnapshot};
use super::load_intent::{LoadDecision, LoadInput};
use super::loading::serve_remotely;
pub(crate) use super::loading::{Loader, knobs};
use super::protocol::{Event, Job, RequestId};
use super::{LlmEngineStats, LlmModelState};
use crate::errors::{LlmError, ModelLoadError};
use crate::events::*;
use crate::hardware::BackendStatus;
use crate::request::{CacheKey, LlmRequest, LlmRequestStatus, RequestState};
use crate::settings::{BackendChoice, LlmSettings};

/// [`NpcLlmSystems::Control`](crate::NpcLlmSystems::Control): model load/unload messages and settings changes.
#[allow(clippy::too_many_arguments)] // one reader per message kind
pub(crate) fn control(
    mut loader: Loader,
    mut loads: MessageReader<LoadModel>,
    mut unloads: MessageReader<UnloadModel>,
    mut downloaded: MessageReader<crate::download::ModelDownloaded>,
    mut download_failed: MessageReader<crate::download::ModelDownloadFailed>,
    mut download_progress: MessageReader<crate::download::ModelDownloadProgress>,
    mut kv: KvRequests,
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
    kv.forward(&mut loader.engine);
}

/// The game's KV snapshot messages.
#[derive(SystemParam)]
pub(crate) struct KvRequests<'w, 's> {
    saves: MessageReader<'w, 's, SaveNpcKv>,
    restores: MessageReader<'w, 's, RestoreNpcKv>,
}

impl KvRequests<'_, '_> {
    fn pending(&mut self) -> bool {
        self.saves.read().count() + self.restores.read().count() > 0
    }

    /// To the worker, in order; answered at once (typed) without one.
    fn forward(&mut self, engine: &mut LlmEngine) {
        let gone = || KvSnapshotError::Unavailable("the inference worker is not running".into());
        for save in self.saves.read() {
            let keys: Vec<u64> = save.keys.iter().map(|k| k.0).collect();
            if !engine.backend().is_some_and(|w| w.save_kv(keys.clone())) {
                let answers = keys.into_iter().map(|k| (k, Err(gone()))).collect();
                engine.local.push(Event::KvSaved(answers));
            }
        }
        for restore in self.restores.read() {
            let snapshots: Vec<(u64, NpcKvSnapshot)> = restore
                .snapshots
                .iter()
                .map(|(k, s)| (k.0, s.clone()))
                .collect();
            let keys: Vec<u64> = snapshots.iter().map(|(k, _)| *k).collect();
            if !engine.backend().is_some_and(|w| w.restore_kv(snapshots)) {
                let answers = keys.into_iter().map(|k| (k, Err(gone()))).collect();
                engine.local.push(Event::KvRestored(answers));
            }
        }
    }
}

/// Whether [`control`] has anything to do this frame: a load, unload or
/// download message, or knobs the worker does not have yet. An idle frame
/// runs none of the plugin's systems (run conditions cost no task).
#[allow(clippy::too_many_arguments)] // control's readers, each read here too
pub(crate) fn control_has_work(
    mut loads: MessageReader<LoadModel>,
    mut unloads: MessageReader<UnloadModel>,
    mut downloaded: MessageReader<crate::download::ModelDownloaded>,
    mut download_failed: MessageReader<crate::download::ModelDownloadFailed>,
    mut download_progress: MessageReader<crate::download::ModelDownloadProgress>,
    mut kv: KvRequests,
    engine: Res<LlmEngine>,
    settings: Res<LlmSettings>,
) -> bool {
    let messages = usize::from(kv.pending())
        + loads.read().count()
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
pub(crate) fn submit(
    mut loader: Loader,
    mut cancels: MessageReader<CancelLlmRequest>,
    mut removed: RemovedComponents<LlmRequest>,
    mut new: Query<(Entity, &LlmRequest, Option<&mut LlmRequestStatus>), Changed<LlmRequest>>,
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
    for (entity, request, status) in &mut new {
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
        // The status came with the request (a required component); a
        // replaced request's status starts again. No command: the same
        // frame's `receive` finds it, and no sync point sits between them.
        if let Some(mut status) = status {
            *status = LlmRequestStatus::default();
        }
        if let Some(job) = loader.admit(id, request, serving.serving_model.is_some()) {
            loader.engine.pending.insert(id, job.clone());
            batch.push(job);
        }
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
    kv_saved: MessageWriter<'w, NpcKvSaved>,
    kv_restored: MessageWriter<'w, NpcKvRestored>,
}

/// What [`receive`] reads and writes.
#[derive(SystemParam)]
pub(crate) struct Receiver<'w, 's> {
    commands: Commands<'w, 's>,
    engine: ResMut<'w, LlmEngine>,
    state: ResMut<'w, LlmModelState>,
    stats: ResMut<'w, LlmEngineStats>,
    backend: ResMut<'w, BackendStatus>,
    statuses: Query<'w, 's, &'static mut LlmRequestStatus>,
    settings: Res<'w, LlmSettings>,
    out: Writers<'w>,
}

/// [`NpcLlmSystems::Receive`](crate::NpcLlmSystems::Receive): worker events → status, events, messages.
///
/// Exclusive, so that its entity events' observers have run when it
/// returns without an automatic sync point after it: a sync point runs
/// on every frame, even one where this system is skipped (an idle frame),
/// and costs the executor a hand-off (~50 µs on a 2-core machine).
pub(crate) fn receive(world: &mut World, params: &mut SystemState<Receiver<'static, 'static>>) {
    match params.get_mut(world) {
        Ok(mut receiver) => receiver.receive(),
        // Only when a game removed one of the plugin's resources.
        Err(e) => warn_once!("bevy_npc_llm: cannot deliver the worker's events: {e}"),
    }
    params.apply(world);
}

impl Receiver<'_, '_> {
    fn receive(&mut self) {
        let mut events: Vec<Event> = std::mem::take(&mut self.engine.local);
        self.engine.collect_retired(&mut events);
        if let Some(w) = self.engine.backend() {
            w.poll(&mut events);
        }
        // Requests moved to another worker during this frame: the old
        // worker's events for them are dropped.
        let mut moved: HashSet<RequestId> = HashSet::new();
        for ev in events {
            if ev.request().is_some_and(|(id, _)| moved.contains(&id)) {
                continue;
            }
            if let Some(now_moved) = self.on_event(ev) {
                moved = now_moved;
            }
        }
        self.stats.in_flight = self.engine.by_id.len();
        if !matches!(*self.state, LlmModelState::Ready(_)) {
            self.stats.tokens_per_second = 0.0;
        }
    }

    /// One event; the requests that moved to another worker, when it made
    /// them move.
    fn on_event(&mut self, ev: Event) -> Option<HashSet<RequestId>> {
        match ev {
            Event::Loading {
                model,
                phase,
                progress,
            } => {
                *self.state = LlmModelState::Loading {
                    model: model.clone(),
                    phase,
                    progress,
                };
                self.out.loading.write(ModelLoading {
                    model,
                    phase,
                    progress,
                });
            }
            Event::Loaded(info) => self.on_loaded(*info),
            Event::LoadFailed {
                model,
                error,
                still_loaded,
            } => return self.on_load_failed(model, error, still_loaded),
            Event::Unloaded { model } => self.on_unloaded(model),
            Event::Counters(c) => {
                tokens_per_second(&mut self.engine, &mut self.stats, c.generated_tokens);
                self.stats.counters = *c;
            }
            Event::Stopped { reason } => self.on_stopped(reason),
            Event::KvSaved(saved) => {
                let snapshots = saved.into_iter().map(|(k, r)| (CacheKey(k), r)).collect();
                self.out.kv_saved.write(NpcKvSaved { snapshots });
            }
            Event::KvRestored(restored) => {
                let results = restored
                    .into_iter()
                    .map(|(k, r)| (CacheKey(k), r))
                    .collect();
                self.out.kv_restored.write(NpcKvRestored { results });
            }
            other => {
                if let Event::Completed { stats: s, .. } = &other
                    && s.time_to_first_token.is_some()
                {
                    self.stats.last_time_to_first_token = s.time_to_first_token;
                }
                self.deliver(other);
            }
        }
        None
    }

    fn on_loaded(&mut self, info: crate::engine::LoadedModelInfo) {
        info!(
            "bevy_npc_llm: model `{}` ready ({} slots × {} tokens, {} threads, loaded in {:.2?})",
            info.model, info.sequences, info.context_per_sequence, info.threads, info.load_time
        );
        self.backend.layers_offloaded = Some(info.gpu_layers);
        self.stats.serving_model = Some(info.model.clone());
        self.stats.remote_server.clone_from(&info.remote);
        *self.state = LlmModelState::Ready(info.clone());
        self.out.loaded.write(ModelLoaded { info });
    }

    fn on_load_failed(
        &mut self,
        model: String,
        error: ModelLoadError,
        still_loaded: Option<String>,
    ) -> Option<HashSet<RequestId>> {
        warn!("bevy_npc_llm: model `{model}` failed to load: {error}");
        let fall_back = still_loaded.is_none()
            && self.settings.backend == BackendChoice::LocalWithRemoteFallback
            && self.engine.kind() == Some(BackendKind::Local);
        self.stats.serving_model = still_loaded;
        *self.state = LlmModelState::Failed {
            model: model.clone(),
            error: error.clone(),
        };
        self.out.load_failed.write(ModelLoadFailed { model, error });
        fall_back.then(|| fall_back_to_remote(&mut self.engine, &self.settings, &mut self.state))
    }

    fn on_unloaded(&mut self, model: String) {
        if self.stats.serving_model.as_deref() == Some(model.as_str()) {
            self.stats.serving_model = None;
            self.stats.remote_server = None;
        }
        // The state follows the worker: a model unloaded after it was
        // reported ready (an unload asked for while its load ran) is no
        // longer ready, and the next request loads one again instead of
        // waiting for a model that is not there.
        if matches!(&*self.state, LlmModelState::Ready(info) if info.model == model) {
            *self.state = LlmModelState::Unloaded;
        }
        self.out.unloaded.write(ModelUnloaded { model });
    }

    fn on_stopped(&mut self, reason: Option<String>) {
        let reason = reason.unwrap_or_else(|| "stopped".into());
        error!("bevy_npc_llm: inference worker stopped: {reason}");
        self.stats.worker_failure = Some(reason.clone());
        self.stats.serving_model = None;
        self.stats.remote_server = None;
        // Its thread has ended (Stopped is its last event): joined on the
        // reaper, never here.
        self.engine.drop_worker();
        *self.state = LlmModelState::Failed {
            model: String::new(),
            error: ModelLoadError::WorkerGone,
        };
        // Every request still in flight fails; nothing hangs.
        let ids: Vec<RequestId> = self.engine.by_id.keys().copied().collect();
        for id in ids {
            let error = LlmError::WorkerGone(reason.clone());
            self.deliver(Event::Failed { id, error });
        }
    }

    /// Route one request event to its entity.
    fn deliver(&mut self, ev: Event) {
        deliver(
            &mut self.commands,
            &mut self.engine,
            &mut self.statuses,
            &mut self.out,
            ev,
        );
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
    // A game that removed the status still gets the events and messages.
    match statuses.get_mut(entity) {
        Ok(mut status) => announce(commands, out, &mut status, entity, ev),
        Err(_) => announce(commands, out, &mut LlmRequestStatus::default(), entity, ev),
    }
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
