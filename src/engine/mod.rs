//! The inference engine: a worker thread that owns llama.cpp ([`worker`]),
//! its batching loop ([`serve`]), and the Bevy systems that connect
//! requests and events to it ([`bridge`]).

pub(crate) mod backend;
pub(crate) mod bridge;
pub(crate) mod config;
pub(crate) mod connection;
pub(crate) mod constraint_jobs;
pub(crate) mod delivery;
pub(crate) mod device_sampling;
pub(crate) mod kv_snapshot;
pub(crate) mod layout;
pub(crate) mod load_intent;
pub(crate) mod loading;
pub(crate) mod model_meta;
pub(crate) mod prompt;
pub(crate) mod protocol;
pub(crate) mod row_pool;
pub(crate) mod sampler;
pub(crate) mod scheduler;
pub(crate) mod serve;
pub(crate) mod shaper;
pub(crate) mod slots;
pub(crate) mod text_stream;
pub(crate) mod token_choice;

use std::time::Duration;

use bevy::prelude::{Res, Resource};

pub use protocol::{EngineCounters, LoadedModelInfo};

use crate::errors::{ModelLoadError, RegistryError, SettingsError};
use crate::events::LoadPhase;

/// The model's state, kept current by the plugin.
#[derive(Resource, Debug, Clone, PartialEq, Default)]
pub enum LlmModelState {
    /// No model loaded (one loads on the first request, or on [`LoadModel`](crate::events::LoadModel)).
    #[default]
    Unloaded,
    /// A model is being verified or loaded.
    Loading {
        /// Registry id.
        model: String,
        /// Phase.
        phase: LoadPhase,
        /// Progress of the phase in `0.0..=1.0`.
        progress: f32,
    },
    /// A model is serving requests.
    Ready(LoadedModelInfo),
    /// The last load failed (a previous model may still be serving: see
    /// [`LlmEngineStats::serving_model`]).
    Failed {
        /// Registry id.
        model: String,
        /// Why.
        error: ModelLoadError,
    },
}

impl LlmModelState {
    /// Whether a model is serving requests.
    #[must_use]
    pub fn is_ready(&self) -> bool {
        matches!(self, Self::Ready(_))
    }
}

/// Run condition: a model is loaded and serving.
#[must_use]
pub fn model_ready(state: Res<LlmModelState>) -> bool {
    state.is_ready()
}

/// Live engine figures for overlays and benchmarks.
#[derive(Resource, Debug, Clone, Default, PartialEq)]
pub struct LlmEngineStats {
    /// The worker's counters.
    pub counters: EngineCounters,
    /// Generated tokens per second over about the last second.
    pub tokens_per_second: f32,
    /// Time to first token of the last completed request.
    pub last_time_to_first_token: Option<Duration>,
    /// Requests submitted and not yet finished (as the Bevy side counts them).
    pub in_flight: usize,
    /// The model serving requests now, if any.
    pub serving_model: Option<String>,
    /// The server's base URL while a remote server serves requests
    /// ([`BackendChoice`](crate::settings::BackendChoice)); `None` when llama.cpp serves them in process.
    pub remote_server: Option<String>,
    /// The worker stopped unexpectedly (panic), with its message.
    pub worker_failure: Option<String>,
}

/// Problems found while the plugin started (bad registry or settings file).
/// The plugin keeps running with an empty registry or default settings.
#[derive(Resource, Debug, Clone, Default, PartialEq)]
pub struct LlmDiagnostics {
    /// The registry could not be loaded.
    pub registry_error: Option<RegistryError>,
    /// The settings file could not be loaded.
    pub settings_error: Option<SettingsError>,
}
