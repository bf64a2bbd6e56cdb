//! The engine's resolved configuration: every choice the hardware plan
//! makes for one loaded model, carried unchanged from the plan
//! ([`plan`](crate::hardware::plan)) to the worker, its llama.cpp contexts
//! and the scheduler. Adding a knob is one field here (and, when a game
//! may set it, one in [`LlmSettings`](crate::settings::LlmSettings) that
//! the plan resolves into it).

use super::layout::Layout;

/// How the engine runs one model on this machine, resolved by the hardware
/// plan from the settings and the machine. Read it in
/// [`BackendPlan::engine`](crate::hardware::BackendPlan::engine); what the
/// worker really created (lanes after a fallback, sequences, KV bytes) is in
/// [`LoadedModelInfo`](crate::LoadedModelInfo).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineConfig {
    /// Inference threads.
    pub threads: u32,
    /// Layers to offload (0 on CPU). llama.cpp counts the output layer as
    /// one more: the model's layer count + 1 puts every layer on the GPU
    /// (the layer count alone leaves the first on the CPU, and every step
    /// then crosses between the devices).
    pub gpu_layers: u32,
    /// Parallel sequences that fit in memory (≤ the settings' maximum); the
    /// contexts hold one more, kept for the player's requests.
    pub sequences: u32,
    /// llama.cpp contexts the sequences are split across and decoded in
    /// turns ([`GpuTuning::lanes`](crate::settings::GpuTuning::lanes)): on a
    /// GPU at most 8 sequences a lane up to 64 sequences (2 to 8 lanes), 4
    /// beyond; 1 on the CPU; unless the settings ask for a number; never more
    /// than the context's sequences.
    pub lanes: u32,
    /// Tokens per sequence.
    pub context_per_sequence: u32,
    /// Most tokens in one decode call (`LlmSettings::batch_size`).
    pub batch_size: u32,
    /// Keep the whole sliding-window cache (`LlmSettings::swa_full`).
    pub swa_full: bool,
    /// One KV buffer across sequences instead of one stream each.
    pub kv_unified: bool,
    /// Flash attention on/off; `None`: llama.cpp's choice.
    pub flash_attention: Option<bool>,
    /// Top-k inside llama.cpp's graph for requests that allow it
    /// ([`GpuTuning::device_sampling`](crate::settings::GpuTuning::device_sampling)).
    pub device_sampling: bool,
    /// Host threads choosing tokens in parallel (1 on the CPU, where the
    /// cores decode).
    pub sampling_threads: u32,
    /// How each decode step's batch is shaped for a GPU's recorded graphs.
    pub shaping: BatchShaping,
}

/// How the engine shapes each decode step's batch so that a GPU replays
/// recorded graphs instead of launching a new shape kernel by kernel. The
/// scheduler decides *which* sequences advance; these only decide the
/// batch's shape (throw-away tokens removed after their step, never a
/// change to any text). Why each helps, and when: docs/GPU.md.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BatchShaping {
    /// Fill the gaps between the sequences of a generation step
    /// ([`GpuTuning::fill_gaps`](crate::settings::GpuTuning::fill_gaps)).
    pub fill_gaps: bool,
    /// Read the prompts of NPCs that start together in even shares, one
    /// micro-batch per step
    /// ([`GpuTuning::even_prompt_steps`](crate::settings::GpuTuning::even_prompt_steps)).
    pub even_prompt_steps: bool,
    /// Round a lone step that ends one sequence's prompt up to a fixed
    /// width
    /// ([`GpuTuning::round_prompt_steps`](crate::settings::GpuTuning::round_prompt_steps)).
    pub round_prompt_steps: bool,
}

impl EngineConfig {
    /// Where each slot lives: lanes, sequence ids, the player's slot.
    pub(crate) fn layout(&self) -> Layout {
        Layout::for_sequences(self.sequences, self.lanes)
    }

    /// A configuration for a backend that runs no llama.cpp here (a remote
    /// server): `sequences` requests at a time, nothing else used.
    pub(crate) fn remote(sequences: u32, context_per_sequence: u32) -> Self {
        Self {
            threads: 0,
            gpu_layers: 0,
            sequences,
            lanes: 1,
            context_per_sequence,
            batch_size: 0,
            swa_full: false,
            kv_unified: false,
            flash_attention: None,
            device_sampling: false,
            sampling_threads: 1,
            shaping: BatchShaping::default(),
        }
    }
}
