//! A registry entry derived from a GGUF file's own metadata (read through
//! llama.cpp, vocabulary only: no weights are loaded), its size and sha256 —
//! what the `add_model` example writes into `models.ron`.

use std::path::Path;

use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::model::params::LlamaModelParams;

use super::manifest::{HardwareRequirements, ModelEntry, PromptFormat};
use crate::errors::ModelLoadError;

/// Context the memory estimate assumes for one sequence (the settings'
/// default `context_per_sequence`).
const ESTIMATE_CONTEXT: u64 = 2048;

/// Runtime buffers beyond weights and KV (compute graph, logits, the
/// process itself), measured on the test models: SmolLM2 135M ran in 322 MB
/// RSS with one 2048-token sequence (98 MB weights + 47 MB KV).
const RUNTIME_OVERHEAD: u64 = 160 << 20;

/// What was read from the file, beside the entry.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufFacts {
    /// `general.architecture`.
    pub architecture: String,
    /// Transformer blocks.
    pub n_layers: u32,
    /// Key/value heads per layer.
    pub n_kv_heads: u32,
    /// Dimensions of one key (and value) head.
    pub head_dim: u32,
    /// Sliding-window size, 0 when none.
    pub sliding_window: u32,
    /// Whether the file carries a chat template.
    pub has_chat_template: bool,
}

fn quantization_name(file_type: u32) -> Option<&'static str> {
    // llama.cpp's `llama_ftype` values.
    Some(match file_type {
        0 => "F32",
        1 => "F16",
        2 => "Q4_0",
        3 => "Q4_1",
        7 => "Q8_0",
        8 => "Q5_0",
        9 => "Q5_1",
        10 => "Q2_K",
        11 => "Q3_K_S",
        12 => "Q3_K_M",
        13 => "Q3_K_L",
        14 => "Q4_K_S",
        15 => "Q4_K_M",
        16 => "Q5_K_S",
        17 => "Q5_K_M",
        18 => "Q6_K",
        19 => "IQ2_XXS",
        20 => "IQ2_XS",
        24 => "IQ1_S",
        25 => "IQ4_NL",
        30 => "IQ4_XS",
        32 => "BF16",
        _ => return None,
    })
}

/// An id from a file name: lower case, `a-z 0-9 . _ -` only.
fn id_from(stem: &str) -> String {
    let id: String = stem
        .to_ascii_lowercase()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '-'
            }
        })
        .collect();
    id.trim_matches('-').to_string()
}

/// Read `path`'s metadata, size and sha256 and derive a registry entry:
/// architecture, context length, layers, KV bytes per token
/// (`layers × 2 × kv_heads × head_dim × 2` bytes, f16 cache), prompt format
/// (the file's chat template, else plain completion), a memory estimate
/// (weights + KV of one 2048-token sequence + 160 MiB runtime) and a RAM
/// requirement of three times that. `file` is `path`'s file name (entries
/// live beside the registry).
///
/// # Errors
/// [`ModelLoadError`] when the file is missing, unreadable or not a GGUF
/// llama.cpp can read.
pub fn entry_from_gguf(path: &Path) -> Result<(ModelEntry, GgufFacts), ModelLoadError> {
    let backend = crate::llama_backend()?;
    let llama_err = |message: String| ModelLoadError::Llama {
        path: path.to_path_buf(),
        message,
    };
    let size = std::fs::metadata(path)
        .map_err(|e| llama_err(e.to_string()))?
        .len();
    let sha256 = crate::registry::sha256_file(path).map_err(|e| llama_err(e.to_string()))?;
    let params = LlamaModelParams::default().with_vocab_only(true);
    let model = LlamaModel::load_from_file(backend, path, &params)
        .map_err(|e| llama_err(format!("{e} (not a GGUF llama.cpp can read?)")))?;
    let meta = |key: &str| model.meta_val_str(key).ok();
    let num = |key: &str| meta(key).and_then(|v| v.trim().parse::<u64>().ok());
    let arch = meta("general.architecture").unwrap_or_default();
    let a = |k: &str| format!("{arch}.{k}");
    let n_layers = num(&a("block_count")).unwrap_or(0) as u32;
    let heads = num(&a("attention.head_count")).unwrap_or(0);
    let n_kv_heads = num(&a("attention.head_count_kv")).unwrap_or(heads) as u32;
    let head_dim = num(&a("attention.key_length"))
        .unwrap_or_else(|| num(&a("embedding_length")).unwrap_or(0) / heads.max(1))
        as u32;
    let context_length = num(&a("context_length")).unwrap_or(2048) as u32;
    let sliding_window = crate::engine::serve::sliding_window(&model) as u32;
    let has_chat_template = model.chat_template(None).is_ok();
    let quantization = num("general.file_type")
        .and_then(|t| quantization_name(t as u32))
        .unwrap_or("unknown")
        .to_string();
    let kv_bytes_per_token =
        u64::from(n_layers) * 2 * u64::from(n_kv_heads) * u64::from(head_dim) * 2;
    let raw_estimate = size + kv_bytes_per_token * ESTIMATE_CONTEXT + RUNTIME_OVERHEAD;
    let memory_estimate_bytes = raw_estimate.div_ceil(10_000_000) * 10_000_000;
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let title = meta("general.name").unwrap_or_else(|| stem.clone());
    let entry = ModelEntry {
        id: id_from(&stem),
        name: format!("{title} ({quantization})"),
        file: path.file_name().map(Into::into).unwrap_or_default(),
        sha256,
        size_bytes: size,
        context_length,
        quantization,
        architecture: (!arch.is_empty()).then(|| arch.clone()),
        memory_estimate_bytes,
        n_layers,
        kv_bytes_per_token,
        recommended_threads: 4,
        description: String::new(),
        tags: vec![
            if has_chat_template {
                "instruct"
            } else {
                "base"
            }
            .into(),
        ],
        prompt_format: if has_chat_template {
            PromptFormat::ChatTemplate
        } else {
            PromptFormat::Completion
        },
        requirements: HardwareRequirements {
            min_ram_bytes: memory_estimate_bytes * 3,
            min_vram_bytes: None,
            gpu_recommended: false,
        },
        sampling: Default::default(),
        license: meta("general.license"),
        source: None,
        download_url: None,
        download: None,
    };
    let facts = GgufFacts {
        architecture: arch,
        n_layers,
        n_kv_heads,
        head_dim,
        sliding_window,
        has_chat_template,
    };
    Ok((entry, facts))
}

/// `registry_text` (a `models.ron`) with `entry` appended to its `models`
/// list; everything else, comments included, is kept as written. The result
/// is parsed and validated before it is returned.
///
/// # Errors
/// [`RegistryError`](crate::errors::RegistryError) when the text does not
/// parse, has no `models: [...]` list, already holds the id, or the entry is
/// invalid.
pub fn append_entry_to_ron(
    registry_text: &str,
    entry: &ModelEntry,
    models_dir: &Path,
) -> Result<String, crate::errors::RegistryError> {
    use crate::errors::RegistryError;
    let existing = super::ModelRegistry::from_ron_str(registry_text, models_dir, "models.ron")?;
    if existing.get(&entry.id).is_some() {
        return Err(RegistryError::Invalid {
            id: entry.id.clone(),
            field: "id",
            message: "the registry already has this id".into(),
        });
    }
    let config = ron::ser::PrettyConfig::new()
        .indentor("    ")
        .struct_names(false);
    let body = ron::ser::to_string_pretty(entry, config).map_err(|e| RegistryError::Invalid {
        id: entry.id.clone(),
        field: "entry",
        message: e.to_string(),
    })?;
    let indented: String = body
        .lines()
        .map(|l| format!("        {l}\n"))
        .collect::<String>()
        .trim_end()
        .to_string();
    // The list's closing bracket: the last `]` of the file.
    let close = registry_text
        .rfind(']')
        .ok_or_else(|| RegistryError::Invalid {
            id: entry.id.clone(),
            field: "models",
            message: "no `models: [...]` list found".into(),
        })?;
    let before = registry_text[..close].trim_end();
    let comma = if before.ends_with('[') || before.ends_with(',') {
        ""
    } else {
        ","
    };
    let text = format!(
        "{before}{comma}\n        // Added by add_model from the GGUF's metadata.\n{indented},\n    {}",
        &registry_text[close..]
    );
    super::ModelRegistry::from_ron_str(&text, models_dir, "models.ron")?;
    Ok(text)
}
