//! What the engine reads from a model's GGUF metadata, in one place for
//! the worker (contexts, the sliding-window check) and the registry's
//! `entry_from_gguf`.

use llama_cpp_2::model::LlamaModel;

/// A number from the model's metadata under its architecture's prefix
/// (`{arch}.{key}`).
fn arch_number(model: &LlamaModel, key: &str) -> Option<u64> {
    let arch = model
        .meta_val_str("general.architecture")
        .unwrap_or_default();
    model
        .meta_val_str(&format!("{arch}.{key}"))
        .ok()
        .and_then(|v| v.trim().parse().ok())
}

/// The model's sliding-window size (0: none).
pub(crate) fn sliding_window(model: &LlamaModel) -> usize {
    arch_number(model, "attention.sliding_window").unwrap_or(0) as usize
}

/// The shape of a model's KV cache: layers, KV heads and head sizes (from
/// the GGUF; KV heads else the heads, head sizes else the embedding over
/// the heads, values else the keys' size).
pub(crate) struct KvShape {
    pub layers: u64,
    pub kv_heads: u64,
    pub key: u64,
    pub value: u64,
}

impl KvShape {
    pub(crate) fn of(model: &LlamaModel) -> Self {
        let heads = arch_number(model, "attention.head_count").unwrap_or(0);
        let key = arch_number(model, "attention.key_length")
            .unwrap_or_else(|| arch_number(model, "embedding_length").unwrap_or(0) / heads.max(1));
        Self {
            layers: arch_number(model, "block_count").unwrap_or(0),
            kv_heads: arch_number(model, "attention.head_count_kv").unwrap_or(heads),
            key,
            value: arch_number(model, "attention.value_length").unwrap_or(key),
        }
    }

    /// KV bytes of one cell (one token of one sequence) with llama.cpp's
    /// default f16 K and V: every layer's keys and values of its KV heads.
    pub(crate) fn bytes_per_cell(&self) -> u64 {
        2 * self.layers * self.kv_heads * (self.key + self.value)
    }
}
