//! [`NpcLlmPlugin`] and its system sets.

use std::path::PathBuf;

use bevy::prelude::*;

use crate::engine::backend::local::LocalBackend;
use crate::engine::bridge;
use crate::engine::connection::LlmEngine;
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
///
/// Each system runs only on a frame that has work for it, and the sets add
/// no automatic sync point to the schedule (`Receive` is exclusive and
/// applies its own commands, so the entity events' observers have run when
/// it ends): an idle frame costs a few run conditions.
#[derive(SystemSet, Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NpcLlmSystems {
    /// Handles [`LoadModel`] / [`UnloadModel`] and pushes changed
    /// [`LlmSettings`] knobs (prefix cache, prompt chunk, queue capacity) to the worker;
    /// starts and cancels model downloads
    /// ([`DownloadModel`](crate::download::DownloadModel)).
    Control,
    /// Submits new or replaced [`LlmRequest`](crate::request::LlmRequest)s, starting a
    /// lazy model load if none is loaded; sends cancels for
    /// [`CancelLlmRequest`], removed requests and despawned entities.
    Submit,
    /// Drains the worker's events (never blocking) into
    /// [`LlmRequestStatus`](crate::request::LlmRequestStatus), the request
    /// events, the model messages, [`LlmModelState`] and [`LlmEngineStats`];
    /// then the download threads' progress and outcomes into their messages.
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
/// `build` only registers: the registry and settings files are read, and the
/// worker thread starts, in `PreStartup`. Change [`ModelRegistry`] or
/// [`LlmSettings`] from a `Startup` system (or later); settings a game
/// inserts itself before startup win over the settings file.
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

/// What the plugin was built with, for [`start_engine`].
#[derive(Resource, Debug, Clone)]
pub(crate) struct PluginConfig {
    registry_path: PathBuf,
    /// Read at startup unless settings were given to the plugin.
    settings_path: Option<PathBuf>,
    /// The settings `build` inserted: a game that replaced them before
    /// startup keeps its own.
    inserted: LlmSettings,
    model: Option<String>,
    load_on_startup: bool,
}

impl Plugin for NpcLlmPlugin {
    /// Registers resources (defaults until startup), messages and systems.
    /// No I/O and no threads here: files are read and the worker starts in
    /// a `PreStartup` system.
    fn build(&self, app: &mut App) {
        let mut diagnostics = LlmDiagnostics::default();
        let mut settings = self.settings.clone().unwrap_or_default();
        if let Err(e) = settings.validate() {
            error!("bevy_npc_llm: {e}; using default settings");
            diagnostics.settings_error = Some(e);
            settings = LlmSettings::default();
        }
        if let Some(model) = &self.model {
            settings.model.clone_from(model);
        }
        let registry_path = resolve_data_path(&self.registry_path);
        let registry = ModelRegistry::new(registry_path.parent().unwrap_or(&registry_path));
        app.insert_resource(PluginConfig {
            registry_path,
            settings_path: if self.settings.is_some() {
                None
            } else {
                self.settings_path.clone()
            },
            inserted: settings.clone(),
            model: self.model.clone(),
            load_on_startup: self.load_on_startup,
        });
        app.insert_resource(LlmEngine::new(self.verification_cache.clone()))
            .insert_resource(HardwareProfile::default())
            .insert_resource(BackendStatus::default())
            .insert_resource(registry)
            .insert_resource(settings)
            .insert_resource(LlmModelState::Unloaded)
            .insert_resource(diagnostics)
            .add_systems(PreStartup, start_engine)
            .init_resource::<LlmEngineStats>()
            .init_resource::<crate::download::ModelDownloads>()
            .add_message::<crate::download::DownloadModel>()
            .add_message::<crate::download::CancelModelDownload>()
            .add_message::<crate::download::ModelDownloadProgress>()
            .add_message::<crate::download::ModelDownloaded>()
            .add_message::<crate::download::ModelDownloadFailed>()
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
            .add_message::<SaveNpcKv>()
            .add_message::<NpcKvSaved>()
            .add_message::<RestoreNpcKv>()
            .add_message::<NpcKvRestored>()
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
                    // Each runs only when it has something to do: an idle
                    // frame costs the run conditions, no system task.
                    (
                        bridge::control.run_if(bridge::control_has_work),
                        crate::download::start_downloads
                            .run_if(crate::download::downloads_asked_for),
                    )
                        .chain()
                        .in_set(NpcLlmSystems::Control),
                    bridge::submit
                        .run_if(bridge::submit_has_work)
                        .in_set(NpcLlmSystems::Submit),
                    (
                        bridge::receive.run_if(bridge::receive_has_work),
                        crate::download::report_downloads
                            .run_if(crate::download::downloads_running),
                    )
                        .chain()
                        .in_set(NpcLlmSystems::Receive),
                ),
            );
    }
}

/// `PreStartup`: read the registry and settings files, start the local
/// worker (llama.cpp's backend, hardware detection) unless requests go to a
/// remote server, and ask for the model when the plugin loads on startup.
/// Problems are kept in [`LlmDiagnostics`]; the app keeps running.
#[allow(clippy::too_many_arguments)]
pub(crate) fn start_engine(
    config: Res<PluginConfig>,
    mut engine: ResMut<LlmEngine>,
    mut registry: ResMut<ModelRegistry>,
    mut settings: ResMut<LlmSettings>,
    mut profile: ResMut<HardwareProfile>,
    mut status: ResMut<BackendStatus>,
    mut state: ResMut<LlmModelState>,
    mut diagnostics: ResMut<LlmDiagnostics>,
    mut loads: MessageWriter<LoadModel>,
) {
    match ModelRegistry::load(&config.registry_path) {
        Ok(mut r) => {
            // Entries the game added before startup stay.
            for entry in registry.iter() {
                if r.get(&entry.id).is_none() {
                    let _ = r.add(entry.clone());
                }
            }
            *registry = r;
        }
        Err(e) => {
            error!("bevy_npc_llm: {e}");
            diagnostics.registry_error = Some(e);
        }
    }
    if let Some(path) = &config.settings_path
        && *settings == config.inserted
    {
        let mut loaded = LlmSettings::load_or_default(resolve_data_path(path))
            .and_then(|s| s.validate().map(|()| s))
            .unwrap_or_else(|e| {
                error!("bevy_npc_llm: {e}; using default settings");
                diagnostics.settings_error = Some(e);
                LlmSettings::default()
            });
        if let Some(model) = &config.model {
            loaded.model.clone_from(model);
        }
        *settings = loaded;
    }
    if settings.backend == crate::settings::BackendChoice::Remote {
        // No llama.cpp needed: the machine as far as the CPU and RAM go.
        *profile = HardwareProfile::detect_cpu_and_ram();
    } else if engine.worker.is_none() {
        match LocalBackend::spawn(settings.llama_logs, bridge::knobs(&settings)) {
            Ok((w, p)) => {
                report_machine(&p, &mut status);
                *profile = p;
                engine.worker = Some(Box::new(w));
            }
            Err(error) => {
                error!("bevy_npc_llm: {error}");
                *state = LlmModelState::Failed {
                    model: settings.model.clone(),
                    error,
                };
            }
        }
    }
    if config.load_on_startup {
        loads.write(LoadModel::default());
    }
}

/// Log the detected machine and note backends that came up without a device.
fn report_machine(p: &HardwareProfile, status: &mut BackendStatus) {
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
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `Plugin::build` registers only: no file is read and no thread starts
    /// until the app's startup runs.
    #[test]
    fn build_does_no_io_and_starts_no_thread() {
        let dir = std::env::temp_dir().join(format!("npc-llm-build-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("models.ron"), "(models: [])").unwrap();
        std::fs::write(dir.join("settings.ron"), "(max_parallel_sequences: 3)").unwrap();
        let mut app = App::new();
        app.add_plugins(MinimalPlugins).add_plugins(
            NpcLlmPlugin::default()
                .with_registry_path(dir.join("models.ron"))
                .with_settings_path(Some(dir.join("settings.ron"))),
        );
        assert!(app.world().resource::<LlmEngine>().worker.is_none());
        assert_eq!(
            app.world().resource::<LlmSettings>().max_parallel_sequences,
            LlmSettings::default().max_parallel_sequences,
            "the settings file was read in build"
        );
        app.update();
        assert!(app.world().resource::<LlmEngine>().worker.is_some());
        assert_eq!(
            app.world().resource::<LlmSettings>().max_parallel_sequences,
            3
        );
        let _ = std::fs::remove_dir_all(dir);
    }
}
