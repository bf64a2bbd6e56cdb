//! `add_model`'s derivation on both test GGUFs reproduces their
//! hand-written registry entries, and appending keeps the registry's
//! comments and validates.

mod common;

use bevy_npc_llm::registry::{
    ModelRegistry, append_entry_to_ron, entry_from_gguf, write_registry_file,
};
use common::*;

#[test]
fn derived_entries_match_the_hand_written_ones() {
    let registry = ModelRegistry::load(models_dir().join("models.ron")).unwrap();
    for (id, file, window) in [(SMOL, smol_file(), 0), (GEMMA, gemma_file(), 512)] {
        let hand = registry.get(id).unwrap();
        let (derived, facts) = entry_from_gguf(&file).unwrap();
        assert_eq!(derived.sha256, hand.sha256, "{id}");
        assert_eq!(derived.size_bytes, hand.size_bytes, "{id}");
        assert_eq!(derived.context_length, hand.context_length, "{id}");
        assert_eq!(derived.quantization, hand.quantization, "{id}");
        assert_eq!(derived.architecture, hand.architecture, "{id}");
        assert_eq!(derived.n_layers, hand.n_layers, "{id}");
        assert_eq!(derived.kv_bytes_per_token, hand.kv_bytes_per_token, "{id}");
        assert_eq!(derived.prompt_format, hand.prompt_format, "{id}");
        assert_eq!(derived.file, hand.file, "{id}");
        assert_eq!(facts.sliding_window, window, "{id}");
        // An estimate, not a measurement: within 10 % of the hand value.
        let (d, h) = (
            derived.memory_estimate_bytes as f64,
            hand.memory_estimate_bytes as f64,
        );
        assert!((d - h).abs() / h <= 0.10, "{id}: derived {d}, hand {h}");
    }
}

#[test]
fn appending_keeps_comments_and_validates() {
    let path = models_dir().join("models.ron");
    let text = std::fs::read_to_string(&path).unwrap();
    let (mut entry, _) = entry_from_gguf(&smol_file()).unwrap();
    // Same id: refused.
    entry.id = SMOL.into();
    assert!(append_entry_to_ron(&text, &entry, &models_dir()).is_err());
    entry.id = "smol-copy".into();
    let out = append_entry_to_ron(&text, &entry, &models_dir()).unwrap();
    for line in text.lines().filter(|l| l.trim_start().starts_with("//")) {
        assert!(out.contains(line), "comment lost: {line}");
    }
    let reg = ModelRegistry::from_ron_str(&out, models_dir(), "out.ron").unwrap();
    assert_eq!(reg.len(), 3);
    assert_eq!(
        reg.get("smol-copy").unwrap().sha256,
        reg.get(SMOL).unwrap().sha256
    );
}

/// Brackets inside comments and strings, a trailing comment after the
/// registry, other lists after `models`: the entry lands in the `models`
/// list or the call fails; it never returns a registry without it. The file
/// is written atomically and read back.
#[test]
fn appending_finds_the_models_list_whatever_surrounds_it() {
    let text = std::fs::read_to_string(models_dir().join("models.ron")).unwrap();
    let (mut entry, _) = entry_from_gguf(&smol_file()).unwrap();
    entry.id = "smol-copy".into();
    let variants = [
        format!("{text}\n// trailing note: see [the docs] ]\n"),
        format!("{text}\n/* a block ] comment /* nested ] */ still ] */\n"),
        text.replacen("models:", "// models: [ a commented list ]\n    models:", 1),
        text.replacen("name: \"SmolLM2", "name: \"Smol]LM2", 1),
    ];
    for (i, variant) in variants.iter().enumerate() {
        ModelRegistry::from_ron_str(variant, models_dir(), "in.ron")
            .unwrap_or_else(|e| panic!("variant {i} must parse: {e}"));
        let out = append_entry_to_ron(variant, &entry, &models_dir())
            .unwrap_or_else(|e| panic!("variant {i}: {e}"));
        let reg = ModelRegistry::from_ron_str(&out, models_dir(), "out.ron").unwrap();
        assert_eq!(reg.len(), 3, "variant {i}");
        assert!(reg.get("smol-copy").is_some(), "variant {i}");
    }
    let dir = std::env::temp_dir().join(format!("npc-llm-registry-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("models.ron");
    std::fs::write(&path, &variants[0]).unwrap();
    let out = append_entry_to_ron(&variants[0], &entry, &models_dir()).unwrap();
    write_registry_file(&path, &out, &models_dir(), "smol-copy").unwrap();
    assert_eq!(std::fs::read_to_string(&path).unwrap(), out);
    // Text without the entry is caught after writing.
    assert!(write_registry_file(&path, &variants[0], &models_dir(), "smol-copy").is_err());
    let leftovers: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
    assert_eq!(leftovers.len(), 1, "no temporary file left");
    let _ = std::fs::remove_dir_all(&dir);
}
