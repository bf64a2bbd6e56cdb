#![doc = include_str!("../README.md")]
#![deny(missing_docs)]

pub mod constraint;
pub mod dialogue;
pub mod download;
mod engine;
pub mod errors;
pub mod events;
pub mod hardware;
mod http;
pub mod overlay;
mod plugin;
pub mod registry;
pub mod request;
mod ron_util;
pub mod settings;

pub use engine::kv_snapshot::{KV_SNAPSHOT_FORMAT, KvHeader, KvIdentity, NpcKvSnapshot};
pub use engine::{
    EngineCounters, LlmDiagnostics, LlmEngineStats, LlmModelState, LoadedModelInfo, model_ready,
};
pub use plugin::{NpcLlmPlugin, NpcLlmSystems};

/// Entry points of the `cargo fuzz` targets (`fuzz/`); not a public API.
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;

/// Fault injection for tests of a game's error handling (debug builds only).
#[cfg(debug_assertions)]
#[doc(hidden)]
pub mod testing {
    use bevy::prelude::World;

    /// Make the inference worker thread panic, as a crash inside llama.cpp
    /// would: every in-flight request then fails with `WorkerGone`, the model
    /// state becomes `Failed`, and the next `LoadModel` starts a new worker.
    pub fn crash_worker(world: &mut World) {
        if let Some(w) = &world
            .resource::<crate::engine::connection::LlmEngine>()
            .worker
        {
            w.crash();
        }
    }

    /// What the inference worker did while the app exited (see
    /// [`exit_worker`]).
    #[derive(Debug, Default)]
    pub struct WorkerExit {
        /// Models whose load finished after the exit began.
        pub loaded: Vec<String>,
        /// Models whose load the exit stopped.
        pub aborted: Vec<String>,
    }

    /// Stop the inference worker as dropping the app does (every load told
    /// to stop, the thread asked to end and joined) and report the loads it
    /// finished or stopped on its way out.
    pub fn exit_worker(world: &mut World) -> WorkerExit {
        use crate::engine::protocol::Event;
        let mut out = WorkerExit::default();
        let worker = world
            .resource_mut::<crate::engine::connection::LlmEngine>()
            .worker
            .take();
        for event in worker.map(|w| w.into_handle().exit()).unwrap_or_default() {
            match event {
                Event::Loaded(info) => out.loaded.push(info.model),
                Event::LoadFailed {
                    model,
                    error: crate::errors::ModelLoadError::Aborted,
                    ..
                } => out.aborted.push(model),
                _ => {}
            }
        }
        out
    }
}

/// The process-wide llama.cpp backend the plugin uses, initialised on first
/// use (llama.cpp allows one per process). Use it for your own `llama-cpp-2`
/// work in the same process instead of calling `LlamaBackend::init` again.
///
/// # Errors
/// [`errors::ModelLoadError::Backend`] when llama.cpp cannot start.
pub fn llama_backend()
-> Result<&'static llama_cpp_2::llama_backend::LlamaBackend, errors::ModelLoadError> {
    engine::backend::local::backend_info(false).map(|b| &b.backend)
}

/// The types most games need: `use bevy_npc_llm::prelude::*;`.
pub mod prelude {
    pub use crate::constraint::{OutputConstraint, OutputError};
    pub use crate::dialogue::{
        Conversation, ConversationState, NpcDialoguePlugin, NpcMemory, Persona,
    };
    pub use crate::download::{
        CancelModelDownload, DownloadModel, ModelDownloadFailed, ModelDownloadProgress,
        ModelDownloaded, ModelDownloads,
    };
    pub use crate::errors::{DownloadError, LlmError, ModelLoadError};
    pub use crate::events::{
        CancelLlmRequest, ConversationEnded, ConversationLineFinished, ConversationLineToken,
        ConversationStarted, LlmCancelled, LlmCompleted, LlmFailed, LlmStarted, LlmToken,
        LoadModel, ModelLoadFailed, ModelLoaded, PlayerLeaves, PlayerLineUnanswered, PlayerSays,
        StartConversation, UnloadModel,
    };
    pub use crate::hardware::{BackendStatus, HardwareProfile};
    pub use crate::request::{
        CacheKey, ChatMessage, ChatRole, LlmRequest, LlmRequestStatus, RequestPriority,
        RequestState,
    };
    pub use crate::settings::{BackendChoice, LlmSettings, RemoteSettings};
    pub use crate::{LlmEngineStats, LlmModelState, NpcLlmPlugin, NpcLlmSystems, model_ready};
}
