//! Choosing backend, GPU layers, threads, parallel sequences and model for a
//! machine: a pure function of (profile, registry, settings).

use crate::engine::config::{BatchShaping, EngineConfig};
use crate::engine::layout::Layout;
use crate::engine::shaper::ROUND_WIDTHS;
use crate::errors::SelectionError;
use crate::registry::{ModelEntry, ModelRegistry};
use crate::settings::{GpuLayers, LlmSettings};

use super::profile::{GpuDevice, HardwareProfile};

const GIB: f64 = 1024.0 * 1024.0 * 1024.0;

/// The contract between the engine and its patched CUDA module
/// (`scripts/gpu/patch-cuda-graphs.py`): the widest lone prompt step the
/// engine rounds to, for which the module keeps a recorded graph per KV
/// stream. The module reports it ([`GpuDevice::graph_patch`]); the plan
/// rounds prompt steps on CUDA by default only when the two agree.
pub const CUDA_GRAPH_PATCH_WIDTH: u32 = ROUND_WIDTHS[ROUND_WIDTHS.len() - 1] as u32;
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
    /// How the engine runs the model here: threads, GPU layers, sequences,
    /// lanes, batch shaping — carried unchanged to the worker.
    pub engine: EngineConfig,
    /// Estimated KV cache size in bytes for all sequences, the slot kept
    /// for the player's requests included (each of the lanes' contexts
    /// holds the largest lane's share of the slots).
    pub kv_bytes: u64,
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
    // Batch shaping is on by default only where it was measured to help:
    // CUDA (recorded graphs); rounded prompt steps only with the patched
    // module, which keeps their graphs per KV stream.
    let cuda = on_gpu && backend == "CUDA";
    let patched = cuda && gpu.is_some_and(|g| g.graph_patch == Some(CUDA_GRAPH_PATCH_WIDTH));
    let lanes = match (on_gpu, tuning.lanes) {
        (_, n) if n > 0 => n,
        (true, _) => Layout::gpu_lanes(sequences),
        (false, _) => 1,
    };
    let engine = EngineConfig {
        threads,
        gpu_layers,
        sequences,
        // Never more lanes than the contexts' slots.
        lanes: Layout::for_sequences(sequences, lanes).lanes() as u32,
        context_per_sequence: ctx,
        batch_size: settings.batch_size,
        swa_full: settings.swa_full,
        kv_unified,
        flash_attention: if on_gpu { tuning.flash_attention } else { None },
        // Off unless asked for: slower on the GPU measured (see `GpuTuning`).
        device_sampling: tuning.device_sampling.unwrap_or(false),
        sampling_threads,
        shaping: BatchShaping {
            fill_gaps: tuning.fill_gaps.unwrap_or(cuda) && !kv_unified,
            even_prompt_steps: tuning.even_prompt_steps.unwrap_or(cuda) && !kv_unified,
            round_prompt_steps: tuning.round_prompt_steps.unwrap_or(patched),
        },
    };
    Ok(BackendPlan {
        backend,
        device,
        kv_bytes: engine.layout().kv_cells(ctx) * kv_bytes_per_token(entry),
        engine,
        model: entry.id.clone(),
        reason,
    })
}

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
