//! Dialogue save files: parse, validate, load, save again.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        bevy_npc_llm::fuzzing::save_round_trip(text);
    }
});
