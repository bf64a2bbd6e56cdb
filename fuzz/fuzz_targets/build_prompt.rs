//! Prompt building from arbitrary persona and player text, rendered with
//! SmolLM2's ChatML template and the completion format, then tokenized:
//! player or persona text never becomes a control token, the system prompt
//! stays first and intact, length limits hold.
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
        PromptHarness::new(&path)
    })
}

fuzz_target!(|data: &[u8]| {
    // Five fields separated by 0xFF (never valid UTF-8 inside a field);
    // each field decoded lossily, as text read from a file would be.
    let mut parts = data.splitn(5, |b| *b == 0xFF).map(String::from_utf8_lossy);
    let mut next = || parts.next().unwrap_or_default();
    let (name, identity, style, goal, player) = (next(), next(), next(), next(), next());
    harness().check([&name, &identity, &style, &goal], &player);
});
