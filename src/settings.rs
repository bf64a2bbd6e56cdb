//! [`LlmSettings`]: the engine's runtime knobs, with defaults and an optional
//! RON file (`assets/llm_settings.ron`).
//!
//! ```
//! use bevy_npc_llm::settings::LlmSettings;
//!
//! let settings = LlmSettings::from_ron_str(
//!     "(model: \"smollm2-135m-instruct-q4_1\", max_parallel_sequences: 4, sampling: (temperature: 0.5))",
//!     "<inline>",
//! )
//! .unwrap();
//! assert_eq!(settings.max_parallel_sequences, 4);
//! assert!(LlmSettings::from_ron_str("(sampling: (temperature: -1.0))", "<inline>").is_err());
//! ```

use std::path::Path;

use bevy::prelude::Resource;
use serde::{Deserialize, Serialize};

use crate::errors::SettingsError;
use crate::ron_util::parse_ron;

/// How many model layers go to the GPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum GpuLayers {
    /// Let the plugin decide from the hardware (all layers when they fit, none on CPU-only machines).
    #[default]
    Auto,
    /// Exactly this many layers (0 = CPU only; a large number = all).
    Count(u32),
}

/// Sampling and stopping parameters of one generation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SamplingParams {
    /// Most tokens to generate.
    pub max_tokens: u32,
    /// Softmax temperature; 0 means greedy (always the most likely token).
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens (0 = off).
    pub top_k: u32,
    /// Nucleus sampling threshold in (0, 1] (1 = off).
    pub top_p: f32,
    /// Drop tokens below `min_p` × the best token's probability, in [0, 1) (0 = off).
    pub min_p: f32,
    /// Penalty for repeating recent tokens (1 = off).
    pub repeat_penalty: f32,
    /// How many recent tokens the repeat penalty looks at.
    pub repeat_last_n: u32,
    /// Random seed; `None` picks a fresh one per request.
    pub seed: Option<u32>,
    /// Generation stops before any of these strings; they are never emitted.
    pub stop: Vec<String>,
    /// Keep generating past end-of-turn tokens until `max_tokens` (benchmarks).
    pub ignore_eos: bool,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            max_tokens: 96,
            temperature: 0.7,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
            repeat_penalty: 1.1,
            repeat_last_n: 64,
            seed: None,
            stop: Vec::new(),
            ignore_eos: false,
        }
    }
}

impl SamplingParams {
    /// Check every value's range.
    ///
    /// # Errors
    /// [`SettingsError::Invalid`] naming the first bad field.
    pub fn validate(&self) -> Result<(), SettingsError> {
        let bad = |field, message: String| Err(SettingsError::Invalid { field, message });
        if self.max_tokens == 0 {
            return bad("sampling.max_tokens", "must be at least 1".into());
        }
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return bad(
                "sampling.temperature",
                format!("must be >= 0 (0 = greedy), got {}", self.temperature),
            );
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad(
                "sampling.top_p",
                format!("must be in (0, 1], got {}", self.top_p),
            );
        }
        if !(self.min_p >= 0.0 && self.min_p < 1.0) {
            return bad(
                "sampling.min_p",
                format!("must be in [0, 1), got {}", self.min_p),
            );
        }
        if !self.repeat_penalty.is_finite() || self.repeat_penalty <= 0.0 {
            return bad(
                "sampling.repeat_penalty",
                format!("must be > 0 (1 = off), got {}", self.repeat_penalty),
            );
        }
        if self.stop.iter().any(String::is_empty) {
            return bad("sampling.stop", "stop strings must not be empty".into());
        }
        Ok(())
    }

    /// These parameters with every `Some` field of `overrides` applied.
    #[must_use]
    pub fn with_overrides(&self, overrides: &SamplingOverrides) -> Self {
        let mut out = self.clone();
        if let Some(v) = overrides.max_tokens {
            out.max_tokens = v;
        }
        if let Some(v) = overrides.temperature {
            out.temperature = v;
        }
        if let Some(v) = overrides.top_k {
            out.top_k = v;
        }
        if let Some(v) = overrides.top_p {
            out.top_p = v;
        }
        if let Some(v) = overrides.min_p {
            out.min_p = v;
        }
        if let Some(v) = overrides.repeat_penalty {
            out.repeat_penalty = v;
        }
        if let Some(v) = overrides.seed {
            out.seed = Some(v);
        }
        if let Some(v) = overrides.ignore_eos {
            out.ignore_eos = v;
        }
        if let Some(stop) = &overrides.stop {
            for s in stop {
                if !out.stop.contains(s) {
                    out.stop.push(s.clone());
                }
            }
        }
        out
    }
}

/// Partial sampling parameters: a model's recommended values in the registry,
/// or one request's changes. `None` keeps the value from the layer below
/// (settings → model entry → request).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SamplingOverrides {
    /// See [`SamplingParams::max_tokens`].
    pub max_tokens: Option<u32>,
    /// See [`SamplingParams::temperature`].
    pub temperature: Option<f32>,
    /// See [`SamplingParams::top_k`].
    pub top_k: Option<u32>,
    /// See [`SamplingParams::top_p`].
    pub top_p: Option<f32>,
    /// See [`SamplingParams::min_p`].
    pub min_p: Option<f32>,
    /// See [`SamplingParams::repeat_penalty`].
    pub repeat_penalty: Option<f32>,
    /// See [`SamplingParams::seed`].
    pub seed: Option<u32>,
    /// Extra stop strings, added to the ones below.
    pub stop: Option<Vec<String>>,
    /// See [`SamplingParams::ignore_eos`].
    pub ignore_eos: Option<bool>,
}

/// The engine's settings. Insert or edit this resource before the model
/// loads; the plugin reads it when it (re)loads a model.
#[derive(Resource, Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LlmSettings {
    /// Registry id of the model to use, or `"auto"` for the registry's choice.
    pub model: String,
    /// Inference threads; 0 = physical cores minus one for the game (1..=8).
    pub threads: u32,
    /// Tokens of context each sequence (each NPC request) may use, prompt and answer together.
    pub context_per_sequence: u32,
    /// Sequences decoded together in one batch (also the number of per-NPC prefix-cache slots).
    pub max_parallel_sequences: u32,
    /// Most tokens in one decode call (8 to 65,536).
    pub batch_size: u32,
    /// Most prompt tokens one sequence adds to a decode step while other
    /// sequences are generating, so a long prompt never stalls them for long
    /// (1 to 65,536).
    pub prompt_chunk: u32,
    /// Layers to offload to a GPU.
    pub gpu_layers: GpuLayers,
    /// Requests that may wait beyond the running ones before new ones are
    /// rejected (at most 1,000,000).
    pub queue_capacity: u32,
    /// Reuse each cache key's (NPC's) prompt prefix across requests.
    pub prefix_cache: bool,
    /// Keep the whole KV of sliding-window-attention layers (Gemma 3,
    /// Llama 4 class models). `true` (the default) lets every cached NPC
    /// prefix be reused; `false` keeps only the window and saves memory on
    /// such models, and a cached prefix whose window was dropped is read
    /// again instead of reused (never wrong output). No effect on other
    /// models.
    pub swa_full: bool,
    /// Check size and sha256 against the registry before loading a model.
    pub verify_sha256: bool,
    /// Forward llama.cpp's own log lines to `tracing` (noisy).
    pub llama_logs: bool,
    /// Default sampling for every request.
    pub sampling: SamplingParams,
    /// Where requests run: this process (llama.cpp), a remote
    /// OpenAI-compatible server, or local with the server as fallback.
    pub backend: BackendChoice,
    /// The remote server, for [`BackendChoice::Remote`] and
    /// [`BackendChoice::LocalWithRemoteFallback`].
    pub remote: RemoteSettings,
    /// Model downloads ([`DownloadModel`](crate::download::DownloadModel)).
    pub downloads: DownloadSettings,
    /// How the engine uses a GPU when the plan puts the model on one.
    pub gpu: GpuTuning,
}

/// How the engine uses a GPU when the plan puts the model on one; on a
/// CPU-only plan only `device_sampling: Some(true)` applies. The defaults are what the bench
/// measured fastest on an H100 (docs/BENCHMARKS.md); `None` leaves a choice
/// to the plan.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GpuTuning {
    /// Run each eligible request's top-k inside llama.cpp's graph, on the
    /// device, so only 128 candidates per NPC come back to the host each
    /// step instead of the whole vocabulary. The draw itself (penalty,
    /// temperature, top-p, min-p, seed) stays the host's and is the same as
    /// over the whole row. Requests with an output constraint, `top_k` 0,
    /// `top_k + repeat_last_n` above 128 or a repeat penalty below 1 read
    /// the whole row. `None` (default) and `Some(false)`: off — measured on
    /// an H100 with this llama.cpp, its per-sequence top-k nodes cost the
    /// graph more than the rows they save (docs/BENCHMARKS.md: 0.50× against
    /// 0.80× of llama-batched-bench's rate at 128 NPCs); `Some(true)`: on, on any
    /// backend (the CPU backend runs the same graph; the tests use it).
    pub device_sampling: Option<bool>,
    /// One KV buffer shared by all sequences (`Some(true)`) or one stream
    /// per sequence (`Some(false)`); `None`: the plan's choice (a stream per
    /// sequence). Unified pays off when NPCs start and end lines at different
    /// times: the attention graph then stays the same shape while the set of
    /// talking NPCs changes (H100, 16 / 64 / 128 NPCs at a time with lines
    /// replacing lines: 1.8–2.6× the throughput of streams without
    /// [`Self::fill_gaps`]; with them, about the same at 16 NPCs, 1.3× at 64
    /// and 1.6× at 128); NPCs that all start together run 10–25 % slower with it
    /// (docs/BENCHMARKS.md, sessions 8 and 9).
    pub kv_unified: Option<bool>,
    /// With a KV stream per sequence, give each sequence that has nothing
    /// to decode in a generation step a throw-away token (removed again
    /// after the step) when it sits between two sequences that decode, so
    /// the step is one run of consecutive sequences: llama.cpp splits a
    /// step at every gap into micro-batches of new shapes, each launched
    /// kernel by kernel on a GPU instead of replaying the step's recorded
    /// CUDA graph, and NPCs that start and end lines at different times
    /// leave gaps in most steps (H100, 16 / 64 / 128 NPCs at a time with
    /// lines replacing lines: 1.4–1.9× the throughput; NPCs that all start
    /// together leave no gaps: unchanged; docs/BENCHMARKS.md, session 9).
    /// In such a step a prompt chunk read beside talking NPCs asks for a
    /// (discarded) logits row at its first token, so the step's first
    /// micro-batch — one token of each sequence — keeps a generation
    /// step's shape (H100, 16 NPCs at a time with lines replacing lines:
    /// +20–25 % throughput, two alternating pairs; 64 at a time within the
    /// spread; docs/BENCHMARKS.md, session 14).
    /// Costs one token of compute and one logits row per filled sequence;
    /// only gaps between talking NPCs are filled, at most max(8, their
    /// number). `None`: on with CUDA (where it was measured), off on other
    /// GPU backends and the CPU; `Some(_)` applies on any backend; never
    /// with unified KV or a sliding-window model (nothing to fill, or a
    /// filler would move the window).
    pub fill_gaps: Option<bool>,
    /// With a KV stream per sequence, read the prompts of a step in even
    /// shares: each sequence of a step that reads a prompt gets the same
    /// number of tokens (a prompt its next slice, a talking NPC its one
    /// token, each padded with throw-away tokens that are removed again
    /// after the step), so the step is one micro-batch. llama.cpp splits a
    /// step into micro-batches of consecutive sequences with as many tokens
    /// each, so NPCs that start together with prompts of different lengths
    /// otherwise make up to one micro-batch per length, each launched
    /// kernel by kernel on a GPU. Padding is used only where it at most
    /// doubles the step (a prompt beside many talking NPCs is read as a
    /// chunk of its own), never in the player's steps, never with unified
    /// KV or a sliding-window model. Measured on an H100 (docs/BENCHMARKS.md,
    /// session 13): the first token of 32 / 128 NPCs starting together in
    /// 22 / 61–65 ms instead of 44–93 / 175–182 ms, 128 NPCs' aggregate
    /// +33 %; lines replacing lines unchanged. `None`: on with CUDA, off on
    /// other GPU backends and the CPU (no effect beyond the 2-core machine's
    /// spread there); `Some(_)` applies on any backend.
    pub even_prompt_steps: Option<bool>,
    /// Round a step that reads one sequence's prompt alone and ends it —
    /// the player's next line, an NPC resuming a cached conversation —
    /// up to a fixed width (16, 32 or 64 tokens) with throw-away tokens
    /// after the prompt's own (removed again after the step; the prompt's
    /// logits are those of its own last token, unchanged). Such a step has
    /// a new length almost every time, and a GPU runs a new shape kernel by
    /// kernel (about 5 ms of host time for SmolLM2-135M on an H100, most of
    /// a cached turn's time to first token); rounded, the same NPC's next
    /// turns have one shape and replay a recorded CUDA graph (with the CUDA
    /// module of `scripts/gpu/build-cuda-backend.sh`, which keys such steps
    /// by the sequence they read; llama.cpp drops a recorded graph unused
    /// for 10 s). Measured on an H200 (docs/BENCHMARKS.md, session 16): a
    /// cached turn's first token in 4.9–5.1 ms instead of 7.6–8.0 from the
    /// third turn in quick succession on; the second pays for recording the
    /// graph (about 16 ms), and a turn after more than 10 s idle is as
    /// before. Steps over 64 tokens are not rounded. `None`: on with a CUDA
    /// module patched for this engine's widths (detected at start:
    /// [`GpuDevice::graph_patch`](crate::hardware::GpuDevice::graph_patch)),
    /// off elsewhere (llama.cpp's module as shipped keeps one graph per
    /// context, so a rounded step gains nothing there; on the CPU a token
    /// costs its compute); `Some(_)` applies on any backend; never with a
    /// sliding-window model.
    pub round_prompt_steps: Option<bool>,
    /// Flash attention on or off; `None`: llama.cpp's choice (on where the
    /// device supports it).
    pub flash_attention: Option<bool>,
    /// Host threads choosing the tokens of many sequences in one step (each
    /// scans its logits row, and a constrained one computes its mask), a
    /// small fixed pool apart from Bevy's; 0: the plan's choice (on a GPU,
    /// the physical cores minus one, at most 8; on the CPU 1, as the cores
    /// are busy decoding).
    pub sampling_threads: u32,
    /// llama.cpp contexts the parallel sequences are split across (1 to
    /// 8), decoded in turns: while the device computes one lane's step, the
    /// host chooses another lane's tokens and builds its next graph, so the
    /// device waits less for the host. Each lane is a context of its own
    /// (its own compute buffers; a sequence stays in its lane). While the
    /// player's prompt is read, the other lanes' NPCs sit out as in one
    /// lane. 0: the plan's choice (on a GPU at most 8 sequences a lane up to
    /// 64 sequences, 2 to 8 lanes, 4 beyond; 1 on the CPU; see
    /// [`EngineConfig::lanes`](crate::hardware::EngineConfig::lanes)); a number
    /// applies on any backend (on the CPU the lanes share the cores, so it
    /// only costs there; the tests use it).
    pub lanes: u32,
}

/// How model files are downloaded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DownloadSettings {
    /// Never download (the game ships its models, or the player is offline).
    pub offline: bool,
    /// Allow plain `http://` URLs (https only otherwise).
    pub allow_http: bool,
    /// Most time to connect, per attempt, in milliseconds.
    pub connect_timeout_ms: u64,
    /// Most time the server may send nothing, in milliseconds.
    pub read_timeout_ms: u64,
    /// Extra attempts per mirror after a broken connection or a server
    /// error (each resumes where the file stopped).
    pub max_retries: u32,
    /// Wait before the first retry, doubled for each next one, in milliseconds.
    pub retry_backoff_ms: u64,
}

impl Default for DownloadSettings {
    fn default() -> Self {
        Self {
            offline: false,
            allow_http: false,
            connect_timeout_ms: 10_000,
            read_timeout_ms: 30_000,
            max_retries: 3,
            retry_backoff_ms: 500,
        }
    }
}

/// Where inference runs. See the README's "Local or remote" section.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum BackendChoice {
    /// llama.cpp inside the game process (the default).
    #[default]
    Local,
    /// An OpenAI-compatible server (llama.cpp's `llama-server`, vLLM,
    /// Ollama) at [`RemoteSettings::base_url`].
    Remote,
    /// Local when a registry model fits this machine and loads; the remote
    /// server when none fits or the load fails.
    LocalWithRemoteFallback,
}

/// How prompts are sent to a remote server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum RemotePromptFormat {
    /// Chat prompts go to `/v1/chat/completions` as messages (the server's
    /// chat template applies); raw prompts to `/v1/completions`.
    #[default]
    Chat,
    /// Everything goes to `/v1/completions`; chat prompts are written as a
    /// plain `Name: text` dialogue, for base models (as
    /// [`PromptFormat::Completion`](crate::registry::PromptFormat::Completion)).
    Completion,
}

/// A secret (the remote server's API key): never shown by `Debug`, never
/// written when settings are serialised, readable only through
/// [`ApiKey::expose`].
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct ApiKey(String);

impl ApiKey {
    /// Wrap a key.
    #[must_use]
    pub fn new(key: impl Into<String>) -> Self {
        Self(key.into())
    }

    /// The key itself, for the `Authorization` header.
    #[must_use]
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiKey(<redacted>)")
    }
}

impl From<&str> for ApiKey {
    fn from(key: &str) -> Self {
        Self::new(key)
    }
}

impl From<String> for ApiKey {
    fn from(key: String) -> Self {
        Self(key)
    }
}

/// An OpenAI-compatible inference server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RemoteSettings {
    /// Base URL, e.g. `http://127.0.0.1:8080` (the `/v1/...` paths are
    /// added; a trailing `/v1` is accepted). `https` needs the crate's
    /// `remote-tls` feature (on by default).
    pub base_url: String,
    /// Model name sent with each request (llama-server ignores it; vLLM and
    /// Ollama need the served model's name).
    pub model: String,
    /// API key sent as `Authorization: Bearer …`, if any. Redacted in
    /// `Debug` and never serialised (prefer `api_key_env`).
    #[serde(skip_serializing)]
    pub api_key: Option<ApiKey>,
    /// Environment variable read for the API key when `api_key` is `None`.
    pub api_key_env: Option<String>,
    /// How prompts are sent.
    pub prompt_format: RemotePromptFormat,
    /// Most time to connect, per attempt, in milliseconds.
    pub connect_timeout_ms: u64,
    /// Most time to wait for the response headers and then for each
    /// streamed token, in milliseconds: a slower server fails the request.
    /// Only tokens count: keep-alive comments and empty chunks do not
    /// restart it.
    pub token_timeout_ms: u64,
    /// Most time for a whole request, from sending it to its last token, in
    /// milliseconds: a server that never ends a stream fails it
    /// ([`RemoteError::Deadline`](crate::errors::RemoteError::Deadline)).
    pub request_timeout_ms: u64,
    /// Extra attempts after a connection error (never after the server
    /// answered: a request is not sent twice).
    pub max_retries: u32,
    /// Wait before the first retry, doubled for each next one (at most a
    /// minute), in milliseconds; at most 60,000.
    pub retry_backoff_ms: u64,
    /// Send the API key over plain `http://` to a host other than this
    /// machine. Off: such settings are refused (the key would cross the
    /// network in clear text).
    pub allow_api_key_over_http: bool,
}

impl Default for RemoteSettings {
    fn default() -> Self {
        Self {
            base_url: "http://127.0.0.1:8080".into(),
            model: "default".into(),
            api_key: None,
            api_key_env: Some("BEVY_NPC_LLM_API_KEY".into()),
            prompt_format: RemotePromptFormat::Chat,
            connect_timeout_ms: 2_000,
            token_timeout_ms: 30_000,
            request_timeout_ms: 600_000,
            max_retries: 2,
            retry_backoff_ms: 200,
            allow_api_key_over_http: false,
        }
    }
}

impl RemoteSettings {
    /// A server at `base_url`, other values default.
    #[must_use]
    pub fn new(base_url: impl Into<String>) -> Self {
        Self {
            base_url: base_url.into(),
            ..Self::default()
        }
    }

    /// Check the URL and the timeouts.
    ///
    /// # Errors
    /// [`SettingsError::Invalid`] naming the field.
    pub fn validate(&self) -> Result<(), SettingsError> {
        let bad = |field, message: String| Err(SettingsError::Invalid { field, message });
        let url = self.base_url.trim();
        // Read as the HTTP client reads it; refused when readers could differ.
        let parsed = match crate::http::parse_http_url(url) {
            Ok(u) => u,
            Err(e) => return bad("remote.base_url", e.0),
        };
        if parsed.scheme() == "https" && !cfg!(feature = "remote-tls") {
            return bad(
                "remote.base_url",
                "https needs the crate's `remote-tls` feature".into(),
            );
        }
        if self.connect_timeout_ms == 0
            || self.token_timeout_ms == 0
            || self.request_timeout_ms == 0
        {
            return bad(
                "remote.token_timeout_ms",
                "timeouts must be at least 1 ms".into(),
            );
        }
        if self.max_retries > 10 {
            return bad("remote.max_retries", "must be at most 10".into());
        }
        if self.retry_backoff_ms > 60_000 {
            return bad(
                "remote.retry_backoff_ms",
                "must be at most 60,000 ms".into(),
            );
        }
        if parsed.scheme() == "http"
            && !crate::http::is_loopback(&parsed)
            && !self.allow_api_key_over_http
            && self.resolved_api_key().is_some()
        {
            return bad(
                "remote.api_key",
                format!(
                    "an API key would cross the network in clear text to {}: use https, \
                     or set `allow_api_key_over_http: true`",
                    redact_url(url)
                ),
            );
        }
        Ok(())
    }

    /// The API key: `api_key`, else the `api_key_env` variable, if set and not empty.
    #[must_use]
    pub fn resolved_api_key(&self) -> Option<ApiKey> {
        self.api_key.clone().or_else(|| {
            self.api_key_env
                .as_deref()
                .and_then(|v| std::env::var(v).ok())
                .filter(|k| !k.is_empty())
                .map(ApiKey)
        })
    }
}

impl Default for LlmSettings {
    fn default() -> Self {
        Self {
            model: "auto".into(),
            threads: 0,
            context_per_sequence: 2048,
            max_parallel_sequences: 8,
            batch_size: 512,
            prompt_chunk: 128,
            gpu_layers: GpuLayers::Auto,
            queue_capacity: 64,
            prefix_cache: true,
            swa_full: true,
            verify_sha256: true,
            llama_logs: false,
            sampling: SamplingParams::default(),
            backend: BackendChoice::Local,
            remote: RemoteSettings::default(),
            downloads: DownloadSettings::default(),
            gpu: GpuTuning::default(),
        }
    }
}

impl LlmSettings {
    /// Parse settings from RON text; fields left out keep their defaults.
    ///
    /// # Errors
    /// [`SettingsError::Parse`] with line and column, or
    /// [`SettingsError::Invalid`] for out-of-range values.
    pub fn from_ron_str(text: &str, origin: &str) -> Result<Self, SettingsError> {
        let settings: Self = parse_ron(text).map_err(|f| SettingsError::Parse {
            origin: origin.to_string(),
            line: f.line,
            column: f.column,
            message: f.message,
        })?;
        settings.validate()?;
        Ok(settings)
    }

    /// Load settings from a RON file.
    ///
    /// # Errors
    /// [`SettingsError::Io`] when the file cannot be read, else as [`Self::from_ron_str`].
    pub fn load(path: impl AsRef<Path>) -> Result<Self, SettingsError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| SettingsError::Io {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        Self::from_ron_str(&text, &path.display().to_string())
    }

    /// Load `path` when it exists, else the defaults.
    ///
    /// # Errors
    /// As [`Self::load`], for a file that exists.
    pub fn load_or_default(path: impl AsRef<Path>) -> Result<Self, SettingsError> {
        if path.as_ref().exists() {
            Self::load(path)
        } else {
            Ok(Self::default())
        }
    }

    /// Check every value's range.
    ///
    /// # Errors
    /// [`SettingsError::Invalid`] naming the first bad field.
    pub fn validate(&self) -> Result<(), SettingsError> {
        let bad = |field, message: &str| {
            Err(SettingsError::Invalid {
                field,
                message: message.to_string(),
            })
        };
        if self.model.trim().is_empty() {
            return bad("model", "must be a registry id or \"auto\"");
        }
        if self.threads > 1024 {
            return bad("threads", "must be at most 1024 (0 = auto)");
        }
        if self.context_per_sequence < 64 {
            return bad(
                "context_per_sequence",
                "must be at least 64 tokens (zero context cannot hold a prompt)",
            );
        }
        // llama.cpp holds at most 256 sequences; one more than these is
        // kept for the player's (High-priority) requests.
        if self.max_parallel_sequences == 0 || self.max_parallel_sequences > 255 {
            return bad(
                "max_parallel_sequences",
                "must be between 1 and 255 (llama.cpp holds 256 sequences; one is kept for the player's requests)",
            );
        }
        if self.batch_size < 8 || self.batch_size > 65_536 {
            return bad("batch_size", "must be between 8 and 65,536 tokens");
        }
        if self.queue_capacity > 1_000_000 {
            return bad("queue_capacity", "must be at most 1,000,000 requests");
        }
        // Every sequence (and the player's slot) may output a token in one
        // step; a smaller batch makes llama.cpp abort the process.
        if self.batch_size <= self.max_parallel_sequences + 1 {
            return Err(SettingsError::Invalid {
                field: "batch_size",
                message: format!(
                    "must be larger than max_parallel_sequences + 1 = {} (one token per sequence and the player's slot, and room for a prompt); got {}",
                    self.max_parallel_sequences + 1,
                    self.batch_size
                ),
            });
        }
        if self.prompt_chunk == 0 || self.prompt_chunk > 65_536 {
            return bad("prompt_chunk", "must be between 1 and 65,536 tokens");
        }
        if self.gpu.sampling_threads > 64 {
            return bad(
                "gpu.sampling_threads",
                "must be at most 64 (0 = the plan's choice)",
            );
        }
        if self.gpu.lanes > crate::engine::layout::MAX_LANES {
            return bad(
                "gpu.lanes",
                &format!(
                    "must be at most {} (0 = the plan's choice)",
                    crate::engine::layout::MAX_LANES
                ),
            );
        }
        if u64::from(self.context_per_sequence) * u64::from(self.max_parallel_sequences) > 4_194_304
        {
            return bad(
                "context_per_sequence",
                "context_per_sequence × max_parallel_sequences must be at most 4M tokens",
            );
        }
        self.sampling.validate()?;
        if self.sampling.max_tokens >= self.context_per_sequence {
            return bad(
                "sampling.max_tokens",
                "must be smaller than context_per_sequence",
            );
        }
        if self.backend != BackendChoice::Local {
            self.remote.validate()?;
        }
        let d = &self.downloads;
        if d.connect_timeout_ms == 0 || d.read_timeout_ms == 0 {
            return bad(
                "downloads.read_timeout_ms",
                "timeouts must be at least 1 ms",
            );
        }
        if d.max_retries > 20 {
            return bad("downloads.max_retries", "must be at most 20");
        }
        Ok(())
    }

    /// Requests the engine holds at once (running plus waiting).
    #[must_use]
    pub fn capacity(&self) -> usize {
        self.queue_capacity as usize + self.max_parallel_sequences as usize
    }
}

/// `url` with any `user:password@` part replaced by `<redacted>@` and the
/// values of secret query parameters (`?key=`, `token=`, …) by
/// `<redacted>`, for logs and displays.
#[must_use]
pub fn redact_url(url: &str) -> std::borrow::Cow<'_, str> {
    crate::http::redact_url(url)
}
