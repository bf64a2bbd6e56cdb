//! `build_prompt` with llama.cpp's own tokenizer and SmolLM2's whole
//! vocabulary instead of its control tokens only: exact, and slow (~20
//! inputs/s, its regex pre-tokenizer), so the script gives it the same
//! budget but it is not one of the fast targets.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use bevy_npc_llm::fuzzing::PromptHarness;
use libfuzzer_sys::fuzz_target;

fn harness() -> &'static PromptHarness {
    static H: OnceLock<PromptHarness> = OnceLock::new();
    H.get_or_init(|| {
        let path = std::env::var_os("BEVY_NPC_LLM_FUZZ_MODEL").map_or_else(
            || {
                PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                    .join("../assets/models/SmolLM2-135M-Instruct.Q4_1.gguf")
            },
            PathBuf::from,
        );
        PromptHarness::with_llama_tokenizer(&path)
    })
}

fuzz_target!(|data: &[u8]| {
    // Five fields separated by 0xFF, decoded lossily (as build_prompt).
    let mut parts = data.splitn(5, |b| *b == 0xFF).map(String::from_utf8_lossy);
    let mut next = || parts.next().unwrap_or_default();
    let (name, identity, style, goal, player) = (next(), next(), next(), next(), next());
    harness().check([&name, &identity, &style, &goal], &player);
});
