//! Messages between the Bevy side and the inference worker thread.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use super::config::EngineConfig;
use super::kv_snapshot::{KvSnapshotError, NpcKvSnapshot};
use crate::constraint::{OutputConstraint, OutputError};
use crate::errors::{LlmError, ModelLoadError};
use crate::registry::{PromptFormat, VerificationCache};
use crate::request::{FinishReason, LlmPrompt, RequestStats};
use crate::settings::{SamplingOverrides, SamplingParams};

/// Worker-side id of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct RequestId(pub u64);

/// One request as the worker sees it.
#[derive(Debug, Clone)]
pub(crate) struct Job {
    pub id: RequestId,
    pub prompt: LlmPrompt,
    /// The settings' sampling at submission.
    pub base_sampling: SamplingParams,
    /// The request's own changes (applied over the model's).
    pub overrides: SamplingOverrides,
    pub priority: i32,
    pub cache_key: Option<u64>,
    pub trim_prompt: bool,
    pub constraint: Option<OutputConstraint>,
    pub submitted: Instant,
}

/// Everything the worker needs to load a model and size its context.
#[derive(Debug, Clone)]
pub(crate) struct LoadSpec {
    pub model_id: String,
    pub path: PathBuf,
    /// Expected (sha256, size) when verification is on.
    pub verify: Option<(String, u64)>,
    pub cache: Option<VerificationCache>,
    pub prompt_format: PromptFormat,
    pub architecture: Option<String>,
    pub model_sampling: SamplingOverrides,
    /// How to run it, as the hardware plan resolved it.
    pub engine: EngineConfig,
}

/// Which load request a [`Command::Load`] is: a load stops once a newer
/// ticket was handed out, or at shutdown (`LoadAbort`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LoadTicket(pub(crate) u64);

/// What a model load is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoadPhase {
    /// Checking size and sha256.
    Verifying,
    /// llama.cpp is reading the weights.
    Loading,
    /// Checking that the remote server answers.
    Connecting,
    /// The model file is missing and is being downloaded from the
    /// registry's mirrors (see [`ModelDownloads`](crate::download::ModelDownloads)).
    Downloading,
}

/// Runtime knobs that can change without reloading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Knobs {
    pub prefix_cache: bool,
    pub prompt_chunk: u32,
    pub queue_capacity: u32,
}

#[derive(Debug)]
pub(crate) enum Command {
    /// Jobs submitted together (one frame's, in spawn order): the worker
    /// queues them all before it plans its next step, so requests spawned in
    /// one frame start in the same step whatever the threads' timing (the
    /// same batch layout each time; on a GPU a different layout can change a
    /// sequence's logits in their last bits, and so a same-seed text).
    Submit(Vec<Job>),
    Cancel(RequestId),
    /// Load a model; the ticket tells the worker when to stop early.
    Load(Box<LoadSpec>, LoadTicket),
    Unload,
    Configure(Knobs),
    /// Take these keys' cached KV as snapshots (answered by `Event::KvSaved`).
    SaveKv(Vec<u64>),
    /// Put these snapshots into slots as their keys' cached prefixes
    /// (answered by `Event::KvRestored`).
    RestoreKv(Vec<(u64, NpcKvSnapshot)>),
    Shutdown,
    /// Test hook: makes the worker thread panic, to exercise fault handling.
    #[cfg(debug_assertions)]
    Crash,
}

/// What a loaded model looks like, for status displays.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadedModelInfo {
    /// Registry id.
    pub model: String,
    /// File it came from.
    pub path: PathBuf,
    /// Parameter count.
    pub n_params: u64,
    /// Size of the weights in bytes.
    pub size_bytes: u64,
    /// Context per sequence actually in use.
    pub context_per_sequence: u32,
    /// Parallel sequences (slots), the one kept for the player's requests
    /// not counted.
    pub sequences: u32,
    /// llama.cpp contexts the sequences are split across: the plan's lanes,
    /// or fewer when their contexts did not all fit (1 for a remote server).
    pub lanes: u32,
    /// KV cache bytes of all the contexts as llama.cpp made them (0 for a
    /// remote server).
    pub kv_bytes: u64,
    /// Inference threads.
    pub threads: u32,
    /// Layers offloaded to a GPU.
    pub gpu_layers: u32,
    /// Whether the GGUF carried a chat template.
    pub has_chat_template: bool,
    /// The file was hashed now (false: a cached verification was used, or verification is off).
    pub hashed: bool,
    /// Time from the load command to ready.
    pub load_time: Duration,
    /// The server's base URL when a remote server serves requests
    /// ([`BackendChoice::Remote`](crate::settings::BackendChoice)); `None` for llama.cpp in process.
    pub remote: Option<String>,
}

/// Worker counters, sent after each decode step.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EngineCounters {
    /// `llama_decode` calls.
    pub decode_calls: u64,
    /// Decode calls that held more than one sequence.
    pub multi_sequence_batches: u64,
    /// Most sequences in one decode call.
    pub max_batch_sequences: usize,
    /// Most tokens in one decode call.
    pub max_batch_tokens: usize,
    /// Tokens generated (sampled).
    pub generated_tokens: u64,
    /// Prompt tokens decoded.
    pub prompt_tokens_decoded: u64,
    /// Prompt tokens reused from the prefix cache instead of decoded.
    pub reused_prefix_tokens: u64,
    /// Throw-away tokens decoded to keep a generation step free of gaps
    /// between its sequences (`GpuTuning::fill_gaps`), removed again after
    /// their step.
    pub gap_fillers: u64,
    /// Steps that read prompts in even shares, one micro-batch each
    /// (`GpuTuning::even_prompt_steps`).
    pub even_prompt_steps: u64,
    /// Throw-away tokens padding those steps' sequences to one width, and
    /// rounding lone prompt steps up to theirs, removed again after their
    /// step.
    pub prompt_padding: u64,
    /// Steps that read one sequence's prompt alone, rounded up to a fixed
    /// width (`GpuTuning::round_prompt_steps`).
    pub rounded_prompt_steps: u64,
    /// Requests completed.
    pub completed: u64,
    /// Requests failed.
    pub failed: u64,
    /// Requests cancelled.
    pub cancelled: u64,
    /// Cached prefixes evicted for room.
    pub evictions: u64,
    /// Requests waiting for a slot.
    pub queued: usize,
    /// Sequences running now.
    pub active_sequences: usize,
    /// Slots (parallel sequences).
    pub slots: usize,
    /// Idle slots holding an NPC's cached prefix.
    pub cached_slots: usize,
    /// KV cells in use over all sequences.
    pub kv_cells_used: usize,
    /// KV cells in the context.
    pub kv_cells_total: usize,
    /// Time spent in decode calls (on a GPU: building and launching the
    /// step's graph; the device may still be working when it returns).
    pub decode_time: Duration,
    /// Time spent sampling: waiting for the device's results and choosing
    /// every sequence's token, then turning tokens into text events
    /// (the sum of `sync_time`, `pick_time` and `deliver_time`).
    pub sample_time: Duration,
    /// Time spent filling the batch before each decode.
    pub batch_time: Duration,
    /// Time spent waiting for the device to finish a step (and its results
    /// to reach the host) after the decode call returned.
    pub sync_time: Duration,
    /// Time spent choosing tokens (reading logits or the device's top-k
    /// candidates, constraint masks, the draw).
    pub pick_time: Duration,
    /// Time spent turning tokens into text, stop strings and events.
    pub deliver_time: Duration,
    /// Time spent admitting requests: prompt rendering and tokenization,
    /// slot choice, dropping the slot's KV past the kept prefix, the
    /// sampler and constraint set-up.
    pub admit_time: Duration,
    /// Requests admitted (started).
    pub admitted: u64,
    /// Tokens whose top-k ran on the device (the rest read the whole row).
    pub device_sampled_tokens: u64,
    /// Sequences given or taken a device top-k (each costs llama.cpp a new
    /// graph reservation on the next step).
    pub device_sampler_switches: u64,
}

#[derive(Debug)]
pub(crate) enum Event {
    Loading {
        model: String,
        phase: LoadPhase,
        progress: f32,
    },
    Loaded(Box<LoadedModelInfo>),
    LoadFailed {
        model: String,
        error: ModelLoadError,
        /// The model still serving (the previous one), if any.
        still_loaded: Option<String>,
    },
    Unloaded {
        model: String,
    },
    Started {
        id: RequestId,
        prompt_tokens: usize,
        reused: usize,
    },
    Token {
        id: RequestId,
        text: String,
    },
    Completed {
        id: RequestId,
        text: String,
        finish: FinishReason,
        stats: RequestStats,
        /// The parsed JSON of a JSON-constrained request.
        output: Option<Result<serde_json::Value, OutputError>>,
    },
    Failed {
        id: RequestId,
        error: LlmError,
    },
    Cancelled {
        id: RequestId,
    },
    Counters(Box<EngineCounters>),
    /// Each asked key's snapshot, or why there is none.
    KvSaved(Vec<(u64, Result<NpcKvSnapshot, KvSnapshotError>)>),
    /// Each snapshot's key, restored or why not.
    KvRestored(Vec<(u64, Result<(), KvSnapshotError>)>),
    /// The worker thread is ending (shutdown or crash).
    Stopped {
        reason: Option<String>,
    },
}

impl Event {
    /// The request an event is about, and whether it is that request's last
    /// (`Completed`, `Failed`, `Cancelled`); `None` for model and engine events.
    pub(crate) fn request(&self) -> Option<(RequestId, bool)> {
        match self {
            Self::Started { id, .. } | Self::Token { id, .. } => Some((*id, false)),
            Self::Completed { id, .. } | Self::Failed { id, .. } | Self::Cancelled { id } => {
                Some((*id, true))
            }
            _ => None,
        }
    }
}
