//! `build_prompt` with llama.cpp's own tokenizer and SmolLM2's whole
//! vocabulary instead of its control tokens only: exact, and slow (~500
//! inputs/s, its regex pre-tokenizer), so it is not one of the fast targets.
#![no_main]

use std::sync::OnceLock;

use bevy_npc_llm::fuzzing::PromptHarness;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    static H: OnceLock<PromptHarness> = OnceLock::new();
    H.get_or_init(|| PromptHarness::with_llama_tokenizer(&PromptHarness::model_path()))
        .check_input(data);
});
