//! Add a GGUF model to a registry from the file's own metadata.
//!
//! ```text
//! cargo run --example add_model -- path/to/model.gguf [--id ID] [--url URL]...
//!     [--registry assets/models/models.ron] [--dry-run]
//! ```
//!
//! Reads the architecture, context length, layers, KV heads, head size,
//! sliding window and chat template through llama.cpp (vocabulary only),
//! hashes the file, derives `kv_bytes_per_token`, `n_layers`,
//! `prompt_format` and a memory estimate, prints them, and appends a
//! validated entry to the registry (comments kept). `--url` (repeatable)
//! adds download mirrors.

use std::path::PathBuf;

use bevy_npc_llm::registry::{
    DownloadSource, append_entry_to_ron, entry_from_gguf, write_registry_file,
};

fn main() {
    let mut args = std::env::args().skip(1);
    let mut gguf: Option<PathBuf> = None;
    let mut id = None;
    let mut urls = Vec::new();
    let mut registry = PathBuf::from("assets/models/models.ron");
    let mut dry_run = false;
    while let Some(a) = args.next() {
        let mut val = || {
            args.next().unwrap_or_else(|| {
                eprintln!("{a} needs a value");
                std::process::exit(2)
            })
        };
        match a.as_str() {
            "--id" => id = Some(val()),
            "--url" => urls.push(val()),
            "--registry" => registry = PathBuf::from(val()),
            "--dry-run" => dry_run = true,
            other if gguf.is_none() && !other.starts_with("--") => gguf = Some(other.into()),
            other => {
                eprintln!("unknown argument {other}");
                std::process::exit(2)
            }
        }
    }
    let Some(gguf) = gguf else {
        eprintln!(
            "usage: add_model path/to/model.gguf [--id ID] [--url URL]... [--registry FILE] [--dry-run]"
        );
        std::process::exit(2)
    };
    let (mut entry, facts) = entry_from_gguf(&gguf).unwrap_or_else(|e| {
        eprintln!("add_model: {e}");
        std::process::exit(1)
    });
    if let Some(id) = id {
        entry.id = id;
    }
    if !urls.is_empty() {
        entry.download = Some(DownloadSource { urls });
    }
    let models_dir = registry.parent().map(PathBuf::from).unwrap_or_default();
    // Beside the registry: a relative file name; elsewhere: the full path.
    let canonical = std::fs::canonicalize(&gguf).unwrap_or(gguf.clone());
    if canonical.parent() != std::fs::canonicalize(&models_dir).ok().as_deref() {
        entry.file = canonical;
    }
    println!("derived from {}:", gguf.display());
    println!("  architecture        {}", facts.architecture);
    println!("  layers              {}", facts.n_layers);
    println!(
        "  KV heads × head dim {} × {}",
        facts.n_kv_heads, facts.head_dim
    );
    println!("  sliding window      {}", facts.sliding_window);
    println!("  chat template       {}", facts.has_chat_template);
    println!("  context length      {}", entry.context_length);
    println!("  quantization        {}", entry.quantization);
    println!(
        "  kv_bytes_per_token  {} ({} layers × 2 × {} × {} × 2 bytes)",
        entry.kv_bytes_per_token, facts.n_layers, facts.n_kv_heads, facts.head_dim
    );
    println!(
        "  memory estimate     {} bytes",
        entry.memory_estimate_bytes
    );
    println!(
        "  size, sha256        {} bytes, {}",
        entry.size_bytes, entry.sha256
    );
    println!("  prompt format       {:?}", entry.prompt_format);
    let text = std::fs::read_to_string(&registry).unwrap_or_else(|e| {
        eprintln!("add_model: cannot read {}: {e}", registry.display());
        std::process::exit(1)
    });
    let updated = append_entry_to_ron(&text, &entry, &models_dir).unwrap_or_else(|e| {
        eprintln!("add_model: {e}");
        std::process::exit(1)
    });
    if dry_run {
        println!("(dry run: {} unchanged)", registry.display());
        return;
    }
    write_registry_file(&registry, &updated, &models_dir, &entry.id).unwrap_or_else(|e| {
        eprintln!("add_model: cannot write {}: {e}", registry.display());
        std::process::exit(1)
    });
    println!("added `{}` to {}", entry.id, registry.display());
}
