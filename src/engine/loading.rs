//! Starting a model load from the game's side: the hardware plan for the
//! settings resolved into the worker's load spec, a download first when
//! the file is missing, the backend (local, remote, or local with the
//! remote as fallback) started or replaced, and failures reported.

use std::collections::HashSet;
use std::path::PathBuf;

use bevy::ecs::system::SystemParam;
use bevy::prelude::*;

use super::LlmModelState;
use super::backend::BackendKind;
use super::backend::local::LocalBackend;
use super::connection::LlmEngine;
use super::load_intent::{LoadInput, Wanted};
use super::protocol::{Event, Job, Knobs, LoadSpec, RequestId};
use crate::errors::{LlmError, ModelLoadError};
use crate::events::*;
use crate::hardware::{BackendPlan, BackendStatus, HardwareProfile};
use crate::registry::{ModelRegistry, VerificationCache};
use crate::request::LlmRequest;
use crate::settings::{BackendChoice, LlmSettings};

pub(crate) fn knobs(settings: &LlmSettings) -> Knobs {
    Knobs {
        prefix_cache: settings.prefix_cache,
        prompt_chunk: settings.prompt_chunk,
        // The worker's own bound is a safety net; the exact check against
        // `queue_capacity` happens on the main thread at submission.
        queue_capacity: settings.capacity() as u32,
    }
}

/// Resolve what to load: the hardware plan for the settings (with `model`
/// replacing the settings' model when given), and the worker's load spec.
pub(crate) fn load_spec(
    registry: &ModelRegistry,
    settings: &LlmSettings,
    profile: &HardwareProfile,
    model: Option<&str>,
    verification_cache: Option<&PathBuf>,
) -> Result<(LoadSpec, BackendPlan), ModelLoadError> {
    let mut wanted = settings.clone();
    if let Some(m) = model {
        wanted.model = m.to_string();
    }
    let plan = crate::hardware::plan(profile, registry, &wanted).map_err(|e| match e {
        crate::errors::SelectionError::Registry(r) => ModelLoadError::Registry(r),
        other => ModelLoadError::Selection(other),
    })?;
    let entry = registry.require(&plan.model)?;
    let path = crate::ron_util::resolve_data_path(&registry.path_of(entry));
    let spec = LoadSpec {
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
        architecture: entry.architecture.clone(),
        model_sampling: entry.sampling.clone(),
        engine: plan.engine.clone(),
    };
    debug_assert!(spec.engine.threads >= 1);
    Ok((spec, plan))
}

/// Everything a model load touches.
#[derive(SystemParam)]
pub(crate) struct Loader<'w> {
    pub(crate) engine: ResMut<'w, LlmEngine>,
    pub(crate) registry: Res<'w, ModelRegistry>,
    pub(crate) settings: Res<'w, LlmSettings>,
    pub(crate) profile: ResMut<'w, HardwareProfile>,
    pub(crate) status: ResMut<'w, BackendStatus>,
    pub(crate) state: ResMut<'w, LlmModelState>,
    pub(crate) failed: MessageWriter<'w, ModelLoadFailed>,
    pub(crate) downloads: ResMut<'w, crate::download::ModelDownloads>,
}

impl Loader<'_> {
    pub(crate) fn start(&mut self, model: Option<&str>) {
        let wanted = model.unwrap_or(&self.settings.model).to_string();
        // This load is the newest wish: a load that waited for a download
        // no longer does (unless it is this same load, restored below).
        let waited = self.engine.intent.clone();
        self.engine.intent.on(LoadInput::LoadNow);
        if self.settings.backend == BackendChoice::Remote {
            self.start_remote();
            return;
        }
        if let Err(error) = self.local_worker() {
            return self.fail(wanted, error);
        }
        let result = load_spec(
            &self.registry,
            &self.settings,
            &self.profile,
            model,
            self.engine.verification_cache.as_ref(),
        );
        match result {
            Ok((spec, _)) if matches!(&*self.state, LlmModelState::Loading { model, .. } if *model == spec.model_id) =>
            {
                // Already loading this model: a repeated request changes nothing.
                self.engine.intent = waited;
            }
            Ok((spec, plan)) => self.load_planned(spec, plan, model),
            Err(error) if self.settings.backend == BackendChoice::LocalWithRemoteFallback => {
                warn!(
                    "bevy_npc_llm: no local model for this machine ({error}); using the remote server"
                );
                self.fail(wanted, error);
                self.start_remote();
            }
            Err(error) => self.fail(wanted, error),
        }
    }

    /// The local worker, started when none runs (or a remote one did); the
    /// hardware profile current either way.
    fn local_worker(&mut self) -> Result<(), ModelLoadError> {
        if self.engine.kind() == Some(BackendKind::Local) {
            // Free memory changes while the game runs: plan with today's.
            self.profile.refresh_free_memory();
            return Ok(());
        }
        let (w, profile) = LocalBackend::spawn(self.settings.llama_logs, knobs(&self.settings))?;
        self.engine.replace_worker(Box::new(w));
        self.engine.knobs = Some(knobs(&self.settings));
        *self.profile = profile;
        Ok(())
    }

    /// Load what the plan chose (downloading its file first when it can).
    fn load_planned(&mut self, spec: LoadSpec, plan: BackendPlan, model: Option<&str>) {
        let id = spec.model_id.clone();
        info!(
            "bevy_npc_llm: loading `{id}` on {} ({} GPU layers, {} threads, {} × {} tokens in {} lanes): {}",
            plan.device.as_deref().unwrap_or(&plan.backend),
            plan.engine.gpu_layers,
            plan.engine.threads,
            plan.engine.sequences,
            plan.engine.context_per_sequence,
            plan.engine.lanes,
            plan.reason
        );
        self.status.plan = Some(plan);
        self.status.layers_offloaded = None;
        // A missing file the registry can download: fetch it first.
        if !spec.path.exists()
            && !self.settings.downloads.offline
            && self
                .registry
                .get(&id)
                .is_some_and(|e| !e.download_urls().is_empty())
        {
            return self.download_first(id, model);
        }
        // A verification or load still running for an older request stops
        // early (see `InferenceBackend::load`).
        if self.engine.backend().is_some_and(|w| w.load(spec)) {
            *self.state = LlmModelState::Loading {
                model: id,
                phase: LoadPhase::Verifying,
                progress: 0.0,
            };
        } else {
            self.engine.drop_worker();
            self.fail(id, ModelLoadError::WorkerGone);
        }
    }

    /// Download model `id`'s file; the load waits for it.
    fn download_first(&mut self, id: String, model: Option<&str>) {
        match self
            .downloads
            .start_for(&self.registry, &self.settings, &id)
        {
            Ok(()) => {
                info!("bevy_npc_llm: `{id}` is not on disk: downloading it first");
                self.engine.intent.on(LoadInput::LoadAfterDownload(Wanted {
                    id: id.clone(),
                    arg: model.map(String::from),
                }));
                *self.state = LlmModelState::Loading {
                    model: id,
                    phase: LoadPhase::Downloading,
                    progress: 0.0,
                };
            }
            Err(e) => self.fail(id, ModelLoadError::Download(e)),
        }
    }

    /// Request `id`'s job for the worker, or its typed failure queued for
    /// this frame's `receive`: the queue is full (every request not yet
    /// finished counts, this one included), or no model can serve it.
    pub(crate) fn admit(
        &mut self,
        id: RequestId,
        request: &LlmRequest,
        model_serving: bool,
    ) -> Option<Job> {
        let capacity = self.settings.capacity();
        if self.engine.by_id.len() > capacity {
            let error = LlmError::QueueFull { capacity };
            self.engine.local.push(Event::Failed { id, error });
            return None;
        }
        if let LlmModelState::Failed { error, .. } = &*self.state
            && !model_serving
        {
            let error = LlmError::ModelUnavailable(error.clone());
            self.engine.local.push(Event::Failed { id, error });
            return None;
        }
        Some(Job {
            id,
            prompt: request.prompt.clone(),
            base_sampling: self.settings.sampling.clone(),
            overrides: request.sampling.clone(),
            priority: request.priority.rank(),
            cache_key: request.cache_key.map(|k| k.0),
            trim_prompt: request.trim_prompt,
            constraint: request.constraint.clone(),
            submitted: std::time::Instant::now(),
        })
    }

    /// Serve requests from the remote server in the settings.
    pub(crate) fn start_remote(&mut self) {
        if let Err(error) = serve_remotely(&mut self.engine, &self.settings, &mut self.state) {
            self.fail(self.settings.remote.model.clone(), error);
        }
    }

    pub(crate) fn fail(&mut self, model: String, error: ModelLoadError) {
        warn!("bevy_npc_llm: cannot load model `{model}`: {error}");
        *self.state = LlmModelState::Failed {
            model: model.clone(),
            error: error.clone(),
        };
        self.failed.write(ModelLoadFailed { model, error });
    }
}

/// Serve requests from the remote server in `settings`: unless the worker
/// already is a remote one, a remote worker takes its place (requests not yet
/// started move to it: their ids are returned); then the server is checked.
pub(crate) fn serve_remotely(
    engine: &mut LlmEngine,
    settings: &LlmSettings,
    state: &mut LlmModelState,
) -> Result<HashSet<RequestId>, ModelLoadError> {
    let mut moved = HashSet::new();
    if engine.kind() != Some(BackendKind::Remote) {
        let streams = settings.max_parallel_sequences as usize;
        let worker = super::backend::remote::spawn(&settings.remote, knobs(settings), streams)?;
        moved = engine.replace_worker(Box::new(worker));
    }
    info!(
        "bevy_npc_llm: serving requests from the remote server {}",
        crate::settings::redact_url(&settings.remote.base_url)
    );
    let spec = super::backend::remote::remote_spec(settings);
    if !engine.backend().is_some_and(|w| w.load(spec)) {
        engine.drop_worker();
        return Err(ModelLoadError::WorkerGone);
    }
    *state = LlmModelState::Loading {
        model: settings.remote.model.clone(),
        phase: LoadPhase::Connecting,
        progress: 0.0,
    };
    Ok(moved)
}
