//! Dialogue prompts without a model (fast): persona, player text and a
//! planted memory; the system prompt holds only the persona, untrusted text
//! arrives sanitized.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Six fields separated by 0xFF, decoded lossily.
    let mut parts = data.splitn(6, |b| *b == 0xFF).map(String::from_utf8_lossy);
    let mut next = || parts.next().unwrap_or_default();
    let (name, identity, style, goal, player, memory) = (next(), next(), next(), next(), next(), next());
    bevy_npc_llm::fuzzing::dialogue_prompt_invariants([&name, &identity, &style, &goal], &player, &memory);
});
