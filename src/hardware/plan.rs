//! Choosing backend, GPU layers, threads, parallel sequences and model for a
//! machine: a pure function of (profile, registry, settings).

use crate::engine::scheduler::lane_size;
use crate::errors::SelectionError;
use crate::registry::{ModelEntry, ModelRegistry};
use crate::settings::{GpuLayers, LlmSettings};

use super::profile::{GpuDevice, HardwareProfile};

const GIB: f64 = 1024.0 * 1024.0 * 1024.0;
/// Free GPU memory at least this large makes a "strong" GPU.
const STRONG_GPU_BYTES: u64 = 16 << 30;
/// Below this much free memory a GPU is not worth offloading to.
const MIN_GPU_BYTES: u64 = 1 << 30;
/// Machines with at least this much RAM (and fast SIMD) are "capable CPUs".
const CAPABLE_CPU_RAM: u64 = 8 << 30;

pub(crate) fn gib(bytes: u64) -> String {
    format!("{:.1} GB", bytes as f64 / GIB)
}

/// What the plugin will run, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendPlan {
    /// `CPU`, or the GPU's backend (`CUDA`, `Vulkan`, `Metal`, ...).
    pub backend: String,
    /// The GPU used, if any (description, e.g. `NVIDIA H100 80GB HBM3`).
    pub device: Option<String>,
    /// Layers to offload (0 on CPU). llama.cpp counts the output layer as
    /// one more: the model's layer count + 1 puts every layer on the GPU
    /// (the layer count alone leaves the first on the CPU, and every step
    /// then crosses between the devices).
    pub gpu_layers: u32,
    /// Inference threads.
    pub threads: u32,
    /// Parallel sequences that fit in memory (≤ the settings' maximum).
    pub sequences: u32,
    /// Tokens per sequence.
    pub context_per_sequence: u32,
    /// Estimated KV cache size in bytes for all sequences, the slot kept
    /// for the player's requests included (the contexts hold
    /// `sequences + 1`, rounded up to a whole number per lane: each of the
    /// `lanes` contexts holds ⌈(sequences + 1) / lanes⌉).
    pub kv_bytes: u64,
    /// Top-k inside llama.cpp's graph for requests that allow it (only when
    /// [`GpuTuning::device_sampling`](crate::settings::GpuTuning::device_sampling)
    /// asks for it).
    pub device_sampling: bool,
    /// Host threads choosing tokens in parallel (1 on the CPU, where the
    /// cores decode).
    pub sampling_threads: u32,
    /// One KV buffer across sequences instead of one stream each.
    pub kv_unified: bool,
    /// Fill the gaps between the sequences of a generation step
    /// ([`GpuTuning::fill_gaps`](crate::settings::GpuTuning::fill_gaps)):
    /// on a GPU with a KV stream per sequence, unless the settings say
    /// otherwise.
    pub fill_gaps: bool,
    /// Read the prompts of NPCs that start together in even shares, one
    /// micro-batch per step
    /// ([`GpuTuning::even_prompt_steps`](crate::settings::GpuTuning::even_prompt_steps)):
    /// on a GPU with a KV stream per sequence, unless the settings say
    /// otherwise.
    pub even_prompt_steps: bool,
    /// Round a lone step that ends one sequence's prompt up to a fixed
    /// width
    /// ([`GpuTuning::round_prompt_steps`](crate::settings::GpuTuning::round_prompt_steps)):
    /// on a GPU unless the settings say otherwise.
    pub round_prompt_steps: bool,
    /// Flash attention on/off; `None`: llama.cpp's choice.
    pub flash_attention: Option<bool>,
    /// llama.cpp contexts the sequences are split across and decoded in
    /// turns ([`GpuTuning::lanes`](crate::settings::GpuTuning::lanes)): on
    /// a GPU at most 8 sequences a lane up to 64 sequences (2 to 8 lanes), 4
    /// beyond; 1 on the CPU; unless the settings ask for a number; never more
    /// than the context's sequences.
    pub lanes: u32,
    /// The model to load.
    pub model: String,
    /// Why this model and placement, in words.
    pub reason: String,
}

/// The model's KV cache bytes per token (registry value, or an estimate).
pub(crate) fn kv_bytes_per_token(entry: &ModelEntry) -> u64 {
    if entry.kv_bytes_per_token > 0 {
        entry.kv_bytes_per_token
    } else {
        // Assume the estimate covers the weights plus a 4k-token KV cache.
        (entry.memory_estimate_bytes.saturating_sub(entry.size_bytes) / 4096).max(1)
    }
}

/// Why a machine cannot run an entry, or `None` when it can.
pub(crate) fn shortfall(entry: &ModelEntry, profile: &HardwareProfile) -> Option<String> {
    let req = &entry.requirements;
    if profile.ram_total_bytes < req.min_ram_bytes {
        return Some(format!(
            "`{}` needs {} of RAM, this machine has {}",
            entry.id,
            gib(req.min_ram_bytes),
            gib(profile.ram_total_bytes)
        ));
    }
    if req.gpu_recommended || req.min_vram_bytes.is_some() {
        let need = req.min_vram_bytes.unwrap_or(0);
        let best = profile.best_gpu().map_or(0, |g| g.memory_free_bytes);
        if req.gpu_recommended && best < need.max(MIN_GPU_BYTES) {
            return Some(format!(
                "`{}` needs a GPU with {} free, {}",
                entry.id,
                gib(need.max(MIN_GPU_BYTES)),
                match profile.best_gpu() {
                    Some(g) => format!("the best here ({}) has {}", g.description, gib(best)),
                    None => "this machine has none".into(),
                }
            ));
        }
    }
    None
}

/// Choose a plan.
///
/// # Errors
/// [`SelectionError`] when the settings name an unknown model or one the
/// machine cannot run (naming the shortfall), or no registry model fits.
pub fn plan(
    profile: &HardwareProfile,
    registry: &ModelRegistry,
    settings: &LlmSettings,
) -> Result<BackendPlan, SelectionError> {
    let threads = if settings.threads > 0 {
        settings.threads
    } else {
        (profile.physical_cores.max(1) as u32)
            .saturating_sub(1)
            .clamp(1, 8)
    };
    let gpu = profile
        .best_gpu()
        .filter(|g| g.memory_free_bytes >= MIN_GPU_BYTES);
    let (entry, mut reason) = if settings.model == "auto" {
        choose_model(profile, registry, gpu)?
    } else {
        let entry = registry.require(&settings.model)?;
        if let Some(why) = shortfall(entry, profile) {
            return Err(SelectionError::CannotRun {
                model: entry.id.clone(),
                shortfall: why,
            });
        }
        (entry, format!("`{}` chosen in the settings", entry.id))
    };

    let ctx = settings.context_per_sequence.min(entry.context_length);
    let per_seq_kv = u64::from(ctx) * kv_bytes_per_token(entry);
    // llama.cpp's count includes the output layer: n + 1 is "all".
    let n_layers = if entry.n_layers > 0 {
        entry.n_layers + 1
    } else {
        999
    };

    // Placement.
    let (backend, device, gpu_layers, memory_budget) = match (settings.gpu_layers, gpu) {
        (GpuLayers::Count(0), _) | (_, None) => {
            if gpu.is_none() && !profile.gpus.is_empty() {
                reason.push_str("; GPU too small to help, running on the CPU");
            } else if settings.gpu_layers == GpuLayers::Count(0) {
                reason.push_str("; GPU offload disabled in the settings");
            }
            let budget = (profile.ram_available_bytes / 2).saturating_sub(entry.size_bytes);
            ("CPU".to_string(), None, 0, budget)
        }
        (GpuLayers::Count(n), Some(g)) => {
            reason.push_str(&format!("; {n} layers on {} as set", g.description));
            let budget = g
                .memory_free_bytes
                .saturating_sub(headroom(g) + entry.size_bytes);
            (g.backend.clone(), Some(g.description.clone()), n, budget)
        }
        (GpuLayers::Auto, Some(g)) => {
            let free = g.memory_free_bytes.saturating_sub(headroom(g));
            let min_kv = per_seq_kv;
            if entry.size_bytes + min_kv <= free {
                reason.push_str(&format!(
                    "; all layers on {} ({} free)",
                    g.description,
                    gib(g.memory_free_bytes)
                ));
                (
                    g.backend.clone(),
                    Some(g.description.clone()),
                    n_layers,
                    free - entry.size_bytes,
                )
            } else {
                let room = free.saturating_sub(min_kv);
                let layers =
                    ((u64::from(n_layers.min(200)) * room) / entry.size_bytes.max(1)) as u32;
                if layers == 0 {
                    reason.push_str(&format!(
                        "; {} has too little free memory ({}), running on the CPU",
                        g.description,
                        gib(g.memory_free_bytes)
                    ));
                    let budget = (profile.ram_available_bytes / 2).saturating_sub(entry.size_bytes);
                    ("CPU".to_string(), None, 0, budget)
                } else {
                    reason.push_str(&format!(
                        "; {layers} of {n_layers} layers (output layer included) fit on {} ({} free)",
                        g.description,
                        gib(g.memory_free_bytes)
                    ));
                    (
                        g.backend.clone(),
                        Some(g.description.clone()),
                        layers,
                        (profile.ram_available_bytes / 2).saturating_sub(entry.size_bytes),
                    )
                }
            }
        }
    };
    // The context holds one sequence more than the plan's: the slot kept
    // for the player's (High-priority) requests.
    let fit = (memory_budget / per_seq_kv.max(1)).saturating_sub(1).max(1);
    let sequences = (settings.max_parallel_sequences as u64).min(fit) as u32;
    if sequences < settings.max_parallel_sequences {
        reason.push_str(&format!(
            "; {sequences} parallel sequences fit in memory (of {} asked)",
            settings.max_parallel_sequences
        ));
    }
    let on_gpu = gpu_layers > 0 && backend != "CPU";
    let tuning = &settings.gpu;
    let sampling_threads = match (on_gpu, tuning.sampling_threads) {
        (false, _) => 1,
        (true, 0) => (profile.physical_cores.max(1) as u32)
            .saturating_sub(1)
            .clamp(1, 8),
        (true, n) => n,
    };
    let kv_unified = on_gpu && tuning.kv_unified.unwrap_or(false);
    let lanes = match (on_gpu, tuning.lanes) {
        (_, n) if n > 0 => n,
        (true, _) => gpu_lanes(sequences),
        (false, _) => 1,
    }
    .clamp(1, MAX_LANES)
    .min(sequences + 1);
    Ok(BackendPlan {
        backend,
        device,
        gpu_layers,
        threads,
        // Off unless asked for: slower on the GPU measured (see `GpuTuning`).
        device_sampling: tuning.device_sampling.unwrap_or(false),
        sampling_threads,
        kv_unified,
        fill_gaps: tuning.fill_gaps.unwrap_or(on_gpu) && !kv_unified,
        even_prompt_steps: tuning.even_prompt_steps.unwrap_or(on_gpu) && !kv_unified,
        round_prompt_steps: tuning.round_prompt_steps.unwrap_or(on_gpu),
        flash_attention: if on_gpu { tuning.flash_attention } else { None },
        lanes,
        sequences,
        context_per_sequence: ctx,
        kv_bytes: per_seq_kv * u64::from(lanes * lane_size(sequences + 1, lanes)),
        model: entry.id.clone(),
        reason,
    })
}

/// The lanes a GPU plan decodes `sequences` parallel sequences in: at most
/// [`LANE_SEQUENCES`] a lane up to eight lanes, never fewer than two (the
/// device computes one lane's step while the host chooses the other's
/// tokens); beyond 64 sequences four. llama.cpp decodes a step of up to 8
/// tokens with its matrix-vector kernels, larger ones with its batched
/// kernels, which cost about as much at 16 tokens as at 32; each lane is a
/// context with its own CUDA stream, so lanes' steps also overlap on the
/// device. Measured on an H100 (docs/BENCHMARKS.md, session 15): at 32 NPCs
/// four lanes of 8 generate 12.2–12.3k tok/s against 7.0–7.3k for two lanes
/// of 16; at 64 eight lanes of 8 16.9k / 19.6k against 13.0k / 13.1k for
/// four of 16; at 128 and 255 four, six and eight lanes are alike (10–15 %
/// and 37–52 % above two); at 8 NPCs four lanes cost 11–16 %.
pub(crate) fn gpu_lanes(sequences: u32) -> u32 {
    if sequences > MAX_LANES * LANE_SEQUENCES {
        4
    } else {
        sequences.div_ceil(LANE_SEQUENCES).clamp(2, MAX_LANES)
    }
}

/// The most sequences a GPU lane holds where the plan can keep to it
/// ([`gpu_lanes`]): llama.cpp's matrix-vector kernels take up to 8 tokens.
pub(crate) const LANE_SEQUENCES: u32 = 8;

/// The most lanes (llama.cpp contexts) a plan or `gpu.lanes` may ask for.
pub(crate) const MAX_LANES: u32 = 8;

fn headroom(g: &GpuDevice) -> u64 {
    (g.memory_free_bytes / 10).max(512 << 20)
}

/// The best registry model for the machine, with the reason. Models tagged
/// `instruct` or `chat` are preferred when any of them can run.
fn choose_model<'r>(
    profile: &HardwareProfile,
    registry: &'r ModelRegistry,
    gpu: Option<&GpuDevice>,
) -> Result<(&'r ModelEntry, String), SelectionError> {
    // NPCs chat: instruct/chat models are preferred when any can run.
    let all: Vec<&ModelEntry> = registry
        .iter()
        .filter(|e| shortfall(e, profile).is_none())
        .collect();
    let chat: Vec<&ModelEntry> = all
        .iter()
        .copied()
        .filter(|e| e.has_tag("instruct") || e.has_tag("chat"))
        .collect();
    let runnable = if chat.is_empty() { all } else { chat };
    let largest = |filter: &dyn Fn(&ModelEntry) -> bool| {
        runnable
            .iter()
            .copied()
            .filter(|e| filter(e))
            .max_by_key(|e| e.memory_estimate_bytes)
    };
    if let Some(g) = gpu {
        let free = g.memory_free_bytes.saturating_sub(headroom(g));
        if g.memory_free_bytes >= STRONG_GPU_BYTES
            && let Some(e) = largest(&|e| e.memory_estimate_bytes <= free)
        {
            return Ok((
                e,
                format!(
                    "strong GPU ({}, {} free): the largest model that fits",
                    g.description,
                    gib(g.memory_free_bytes)
                ),
            ));
        }
        if let Some(e) = largest(&|e| e.memory_estimate_bytes <= free) {
            return Ok((
                e,
                format!(
                    "modest GPU ({}, {} free): the largest model that fits in it",
                    g.description,
                    gib(g.memory_free_bytes)
                ),
            ));
        }
    }
    if profile.has_fast_simd() && profile.ram_total_bytes >= CAPABLE_CPU_RAM {
        let budget = profile.ram_total_bytes / 4;
        if let Some(e) =
            largest(&|e| !e.requirements.gpu_recommended && e.memory_estimate_bytes <= budget)
        {
            return Ok((
                e,
                format!(
                    "CPU with {} and {} RAM, no usable GPU: a small model that runs in real time",
                    profile
                        .simd
                        .iter()
                        .find(|f| *f == "avx2" || *f == "neon")
                        .map_or("SIMD", String::as_str),
                    gib(profile.ram_total_bytes)
                ),
            ));
        }
    }
    let smallest = runnable
        .iter()
        .copied()
        .min_by_key(|e| e.memory_estimate_bytes)
        .ok_or_else(|| {
            let least = registry.iter().min_by_key(|e| e.requirements.min_ram_bytes);
            SelectionError::NoModelFits {
                reason: match least {
                    Some(e) => {
                        shortfall(e, profile).unwrap_or_else(|| format!("`{}` does not fit", e.id))
                    }
                    None => "the registry is empty".into(),
                },
            }
        })?;
    Ok((
        smallest,
        format!(
            "modest machine ({} cores, {} RAM{}): the smallest model",
            profile.physical_cores,
            gib(profile.ram_total_bytes),
            if profile.has_fast_simd() {
                ""
            } else {
                ", no AVX2/NEON"
            }
        ),
    ))
}
