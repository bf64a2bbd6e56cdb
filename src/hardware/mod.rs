//! Hardware awareness: detect the machine ([`HardwareProfile`]), choose
//! backend, GPU layers, threads, parallel sequences and model for it
//! ([`plan`]), and report what was chosen ([`BackendStatus`]).
//!
//! ```
//! use bevy_npc_llm::hardware::{HardwareProfile, plan};
//! use bevy_npc_llm::registry::ModelRegistry;
//! use bevy_npc_llm::settings::LlmSettings;
//!
//! let laptop = HardwareProfile {
//!     physical_cores: 4,
//!     logical_cores: 8,
//!     simd: vec!["avx2".into()],
//!     ram_total_bytes: 8 << 30,
//!     ram_available_bytes: 6 << 30,
//!     ..Default::default()
//! };
//! let registry = ModelRegistry::load("assets/models/models.ron").unwrap();
//! let chosen = plan(&laptop, &registry, &LlmSettings::default()).unwrap();
//! assert_eq!((chosen.backend.as_str(), chosen.engine.gpu_layers, chosen.engine.threads), ("CPU", 0, 3));
//! println!("{}: {}", chosen.model, chosen.reason);
//! ```

mod plan;
mod profile;

use bevy::prelude::Resource;

pub use crate::engine::config::{BatchShaping, EngineConfig};
pub(crate) use plan::gib;
pub use plan::{BackendPlan, CUDA_GRAPH_PATCH_WIDTH, plan};
pub use profile::{GpuDevice, GpuKind, HardwareProfile};

/// What the plugin chose for this machine, for status displays.
#[derive(Resource, Debug, Clone, PartialEq, Eq, Default)]
pub struct BackendStatus {
    /// The plan of the last model load (`None` before the first).
    pub plan: Option<BackendPlan>,
    /// GPU layers llama.cpp actually offloaded (after load).
    pub layers_offloaded: Option<u32>,
    /// Backends loaded at run time (dynamic-backends builds), e.g. `CUDA`, `CPU`.
    pub loaded_backends: Vec<String>,
    /// A line for the log/overlay when a GPU backend was expected but the
    /// plugin fell back to the CPU.
    pub fallback: Option<String>,
}
