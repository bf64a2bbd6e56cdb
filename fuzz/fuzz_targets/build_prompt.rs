//! Prompt building from arbitrary persona and player text, rendered with
//! SmolLM2's ChatML template and the completion format; control tokens
//! counted with the model's control-token vocabulary (read once): player or
//! persona text never becomes a control token, the system prompt stays
//! first and intact, length limits hold.
#![no_main]

use std::sync::OnceLock;

use bevy_npc_llm::fuzzing::PromptHarness;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    static H: OnceLock<PromptHarness> = OnceLock::new();
    H.get_or_init(|| PromptHarness::new(&PromptHarness::model_path()))
        .check_input(data);
});
