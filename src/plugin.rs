//! [`NpcLlmPlugin`] and its system sets.

use std::path::PathBuf;

use bevy::prelude::*;

use crate::engine::bridge::{self, LlmEngine};
use crate::engine::worker::WorkerHandle;
use crate::engine::{LlmDiagnostics, LlmEngineStats, LlmModelState};
use crate::events::*;
use crate::hardware::{BackendStatus, HardwareProfile};
use crate::registry::ModelRegistry;
use crate::ron_util::resolve_data_path;
use crate::settings::LlmSettings;

/// The plugin's systems, all in `PreUpdate`, chained in this order. Games
/// insert [`LlmRequest`](crate::request::LlmRequest)s in `Update` and read
/// events in `Update`: a request is submitted the next frame and its events
/// arrive as soon as the worker produced them.
#[derive(SystemSet, Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NpcLlmSystems {
    /// Handles [`LoadModel`] / [`UnloadModel`] and pushes changed
    /// [`LlmSettings`] knobs (prefix cache, prompt chunk, queue capacity) to the worker.
    Control,
    /// Submits new or replaced [`LlmRequest`](crate::request::LlmRequest)s, starting a
    /// lazy model load if none is loaded; sends cancels for
    /// [`CancelLlmRequest`], removed requests and despawned entities.
    Submit,
    /// Drains the worker's events (never blocking) into
    /// [`LlmRequestStatus`](crate::request::LlmRequestStatus), the request
    /// events, the model messages, [`LlmModelState`] and [`LlmEngineStats`].
    Receive,
    /// In `Update` (with [`NpcDialoguePlugin`](crate::dialogue::NpcDialoguePlugin)),
    /// chained: despawns conversations that ended last frame; routes
    /// [`StartConversation`](crate::events::StartConversation),
    /// [`PlayerSays`](crate::events::PlayerSays) and
    /// [`PlayerLeaves`](crate::events::PlayerLeaves) to their conversations;
    /// routes the engine's events for line and summary requests; then runs
    /// each conversation's state machine once over what arrived (and the
    /// time-outs) and carries out its commands (requests, lines, memories, ends).
    Dialogue,
}

/// Adds talking NPCs to an app: the model registry, settings, the inference
/// worker and the request/event systems.
///
/// ```no_run
/// use bevy::prelude::*;
/// use bevy_npc_llm::prelude::*;
///
/// App::new()
///     .add_plugins(MinimalPlugins)
///     .add_plugins(
///         NpcLlmPlugin::default()
///             .with_model("smollm2-135m-instruct-q4_1")
///             .with_load_on_startup(true),
///     )
///     .run();
/// ```
#[derive(Debug, Clone)]
pub struct NpcLlmPlugin {
    registry_path: PathBuf,
    settings_path: Option<PathBuf>,
    settings: Option<LlmSettings>,
    model: Option<String>,
    load_on_startup: bool,
    verification_cache: Option<PathBuf>,
}

impl Default for NpcLlmPlugin {
    fn default() -> Self {
        Self {
            registry_path: PathBuf::from("assets/models/models.ron"),
            settings_path: Some(PathBuf::from("assets/llm_settings.ron")),
            settings: None,
            model: None,
            load_on_startup: false,
            verification_cache: None,
        }
    }
}

impl NpcLlmPlugin {
    /// Read the model registry from this RON file (default `assets/models/models.ron`).
    #[must_use]
    pub fn with_registry_path(mut self, path: impl Into<PathBuf>) -> Self {
        self.registry_path = path.into();
        self
    }

    /// Read settings from this RON file if it exists (default
    /// `assets/llm_settings.ron`); `None` uses the defaults.
    #[must_use]
    pub fn with_settings_path(mut self, path: Option<PathBuf>) -> Self {
        self.settings_path = path;
        self
    }

    /// Use these settings instead of a file.
    #[must_use]
    pub fn with_settings(mut self, settings: LlmSettings) -> Self {
        self.settings = Some(settings);
        self
    }

    /// Use this registry model (overrides the settings' `model`).
    #[must_use]
    pub fn with_model(mut self, id: impl Into<String>) -> Self {
        self.model = Some(id.into());
        self
    }

    /// Load the model when the app starts instead of on the first request.
    #[must_use]
    pub fn with_load_on_startup(mut self, load: bool) -> Self {
        self.load_on_startup = load;
        self
    }

    /// Where verified model hashes are remembered (default: `.verify-cache.ron`
    /// in the registry's folder).
    #[must_use]
    pub fn with_verification_cache(mut self, path: impl Into<PathBuf>) -> Self {
        self.verification_cache = Some(path.into());
        self
    }
}

impl Plugin for NpcLlmPlugin {
    fn build(&self, app: &mut App) {
        let mut diagnostics = LlmDiagnostics::default();
        let registry_path = resolve_data_path(&self.registry_path);
        let registry = ModelRegistry::load(&registry_path).unwrap_or_else(|e| {
            error!("bevy_npc_llm: {e}");
            diagnostics.registry_error = Some(e);
            ModelRegistry::new(registry_path.parent().unwrap_or(&registry_path))
        });
        let mut settings = match (&self.settings, &self.settings_path) {
            (Some(s), _) => s.clone(),
            (None, Some(path)) => LlmSettings::load_or_default(resolve_data_path(path))
                .unwrap_or_else(|e| {
                    error!("bevy_npc_llm: {e}; using default settings");
                    diagnostics.settings_error = Some(e);
                    LlmSettings::default()
                }),
            (None, None) => LlmSettings::default(),
        };
        if let Err(e) = settings.validate() {
            error!("bevy_npc_llm: {e}; using default settings");
            diagnostics.settings_error = Some(e);
            settings = LlmSettings::default();
        }
        if let Some(model) = &self.model {
            settings.model.clone_from(model);
        }
        let mut state = LlmModelState::Unloaded;
        let mut profile = HardwareProfile::default();
        let mut status = BackendStatus::default();
        let worker = match WorkerHandle::spawn(settings.llama_logs, bridge::knobs(&settings)) {
            Ok((w, p)) => {
                status.loaded_backends = p.gpus.iter().map(|g| g.backend.clone()).collect();
                status.loaded_backends.push("CPU".into());
                if !p.failed_backends.is_empty() {
                    let line = format!(
                        "GPU backend {} found but no device came up (driver missing?): using the CPU",
                        p.failed_backends.join(", ")
                    );
                    warn!("bevy_npc_llm: {line}");
                    status.fallback = Some(line);
                }
                info!(
                    "bevy_npc_llm: {} ({} physical / {} logical cores, {}), {} RAM, GPUs: {}",
                    p.cpu_brand,
                    p.physical_cores,
                    p.logical_cores,
                    p.simd.join(" "),
                    crate::hardware::gib(p.ram_total_bytes),
                    if p.gpus.is_empty() {
                        "none".to_string()
                    } else {
                        p.gpus
                            .iter()
                            .map(|g| {
                                format!(
                                    "{} {} ({} free)",
                                    g.backend,
                                    g.description,
                                    crate::hardware::gib(g.memory_free_bytes)
                                )
                            })
                            .collect::<Vec<_>>()
                            .join(", ")
                    }
                );
                profile = p;
                Some(w)
            }
            Err(error) => {
                error!("bevy_npc_llm: {error}");
                state = LlmModelState::Failed {
                    model: settings.model.clone(),
                    error,
                };
                None
            }
        };
        app.insert_resource(LlmEngine::new(worker, self.verification_cache.clone()))
            .insert_resource(profile)
            .insert_resource(status)
            .insert_resource(registry)
            .insert_resource(settings)
            .insert_resource(state)
            .insert_resource(diagnostics)
            .init_resource::<LlmEngineStats>()
            .add_message::<LlmStarted>()
            .add_message::<LlmToken>()
            .add_message::<LlmCompleted>()
            .add_message::<LlmFailed>()
            .add_message::<LlmCancelled>()
            .add_message::<LoadModel>()
            .add_message::<UnloadModel>()
            .add_message::<CancelLlmRequest>()
            .add_message::<ModelLoading>()
            .add_message::<ModelLoaded>()
            .add_message::<ModelLoadFailed>()
            .add_message::<ModelUnloaded>()
            .configure_sets(
                PreUpdate,
                (
                    NpcLlmSystems::Control,
                    NpcLlmSystems::Submit,
                    NpcLlmSystems::Receive,
                )
                    .chain(),
            )
            .add_systems(
                PreUpdate,
                (
                    bridge::control.in_set(NpcLlmSystems::Control),
                    bridge::submit.in_set(NpcLlmSystems::Submit),
                    bridge::receive.in_set(NpcLlmSystems::Receive),
                ),
            );
        if self.load_on_startup {
            app.world_mut().write_message(LoadModel::default());
        }
    }
}
