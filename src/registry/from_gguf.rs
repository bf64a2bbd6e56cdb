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
    let backend = &crate::engine::backend::local::backend_info(false)?.backend;
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
    let kv = crate::engine::model_meta::KvShape::of(&model);
    let n_layers = kv.layers as u32;
    let context_length = num(&a("context_length")).unwrap_or(2048) as u32;
    let sliding_window = crate::engine::model_meta::sliding_window(&model) as u32;
    let has_chat_template = model.chat_template(None).is_ok();
    let quantization = num("general.file_type")
        .and_then(|t| quantization_name(t as u32))
        .unwrap_or("unknown")
        .to_string();
    let kv_bytes_per_token = kv.bytes_per_cell();
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
        n_kv_heads: kv.kv_heads as u32,
        head_dim: kv.key as u32,
        sliding_window,
        has_chat_template,
    };
    Ok((entry, facts))
}

/// `registry_text` (a `models.ron`) with `entry` appended to its `models`
/// list; everything else, comments included, is kept as written. The result
/// is parsed and validated before it is returned, and must hold exactly one
/// more model than before, the new one: a list the scan could not place
/// (say a `]` inside a comment) is an error, never a registry without the
/// entry.
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
    let invalid = |field, message: String| RegistryError::Invalid {
        id: entry.id.clone(),
        field,
        message,
    };
    if existing.get(&entry.id).is_some() {
        return Err(invalid("id", "the registry already has this id".into()));
    }
    let config = ron::ser::PrettyConfig::new()
        .indentor("    ")
        .struct_names(false);
    let body =
        ron::ser::to_string_pretty(entry, config).map_err(|e| invalid("entry", e.to_string()))?;
    let indented: String = body
        .lines()
        .map(|l| format!("        {l}\n"))
        .collect::<String>()
        .trim_end()
        .to_string();
    let close = models_list_end(registry_text)
        .ok_or_else(|| invalid("models", "no `models: [...]` list found".into()))?;
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
    let updated = super::ModelRegistry::from_ron_str(&text, models_dir, "models.ron")?;
    if updated.len() != existing.len() + 1 || updated.get(&entry.id).is_none() {
        return Err(invalid(
            "models",
            "the entry could not be placed in the `models` list".into(),
        ));
    }
    Ok(text)
}

/// Write a registry's text to `path` atomically (a temporary file beside
/// it, flushed, then renamed over it), then read it back and check that it
/// parses and holds the model `must_hold`. A crash midway leaves the old
/// file whole.
///
/// # Errors
/// [`RegistryError::Io`](crate::errors::RegistryError::Io) when writing
/// fails; the registry's own errors when what was written does not read
/// back with the entry.
pub fn write_registry_file(
    path: &Path,
    text: &str,
    models_dir: &Path,
    must_hold: &str,
) -> Result<(), crate::errors::RegistryError> {
    use crate::errors::RegistryError;
    use std::io::Write;
    let io = |e: std::io::Error| RegistryError::Io {
        path: path.to_path_buf(),
        message: e.to_string(),
    };
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".{}.tmp", std::process::id()));
    let tmp = std::path::PathBuf::from(tmp);
    let written = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(io(e));
    }
    if let Some(dir) = path.parent()
        && let Ok(d) = std::fs::File::open(dir)
    {
        let _ = d.sync_all();
    }
    let back = std::fs::read_to_string(path).map_err(io)?;
    let reg = super::ModelRegistry::from_ron_str(&back, models_dir, &path.display().to_string())?;
    if reg.get(must_hold).is_none() {
        return Err(RegistryError::Invalid {
            id: must_hold.to_string(),
            field: "models",
            message: format!("{} does not hold the entry after writing", path.display()),
        });
    }
    Ok(())
}

/// Byte offset of the `]` closing the top-level `models: [` list, reading
/// RON as RON: strings, raw strings, character literals and (nested) block
/// and line comments are skipped, so a bracket inside them never counts.
pub(crate) fn models_list_end(text: &str) -> Option<usize> {
    let b = text.as_bytes();
    let mut i = 0;
    // Depth of brackets of any kind; the registry struct itself is depth 1.
    let mut depth = 0usize;
    // (depth inside the list) once `models: [` was seen at depth 1.
    let mut list_depth: Option<usize> = None;
    let mut last_ident: Option<&str> = None;
    let mut after_colon = false;
    while i < b.len() {
        let c = b[i];
        match c {
            b'/' if b.get(i + 1) == Some(&b'/') => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
                continue;
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                let mut nest = 1;
                i += 2;
                while i < b.len() && nest > 0 {
                    if b[i] == b'/' && b.get(i + 1) == Some(&b'*') {
                        nest += 1;
                        i += 2;
                    } else if b[i] == b'*' && b.get(i + 1) == Some(&b'/') {
                        nest -= 1;
                        i += 2;
                    } else {
                        i += 1;
                    }
                }
                continue;
            }
            b'"' => {
                i += 1;
                while i < b.len() && b[i] != b'"' {
                    i += if b[i] == b'\\' { 2 } else { 1 };
                }
                i += 1;
                last_ident = None;
                continue;
            }
            b'r' if matches!(b.get(i + 1), Some(b'"' | b'#')) => {
                // Raw string r#"…"#: count the hashes, find the same closing.
                let mut j = i + 1;
                let mut hashes = 0;
                while b.get(j) == Some(&b'#') {
                    hashes += 1;
                    j += 1;
                }
                if b.get(j) == Some(&b'"') {
                    let close: Vec<u8> = std::iter::once(b'"')
                        .chain(std::iter::repeat_n(b'#', hashes))
                        .collect();
                    i = j + 1;
                    while i < b.len() && !b[i..].starts_with(&close) {
                        i += 1;
                    }
                    i += close.len();
                    last_ident = None;
                    continue;
                }
            }
            b'\'' => {
                // A character literal: 'x', '\'' or '\u{…}'.
                let mut j = i + 1;
                while j < b.len() && b[j] != b'\'' {
                    j += if b[j] == b'\\' { 2 } else { 1 };
                }
                i = j + 1;
                continue;
            }
            _ => {}
        }
        if c.is_ascii_alphabetic() || c == b'_' {
            let start = i;
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_') {
                i += 1;
            }
            last_ident = Some(&text[start..i]);
            after_colon = false;
            continue;
        }
        match c {
            b':' => after_colon = last_ident == Some("models") && depth == 1,
            b'(' | b'[' | b'{' => {
                if c == b'[' && after_colon && list_depth.is_none() {
                    list_depth = Some(depth + 1);
                }
                depth += 1;
                after_colon = false;
                last_ident = None;
            }
            b')' | b']' | b'}' => {
                if c == b']' && list_depth == Some(depth) {
                    return Some(i);
                }
                depth = depth.checked_sub(1)?;
                last_ident = None;
            }
            c if c.is_ascii_whitespace() => {}
            _ => {
                after_colon = false;
                last_ident = None;
            }
        }
        i += 1;
    }
    None
}
