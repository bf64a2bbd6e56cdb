//! Registry, settings, persona and save-file parsing on arbitrary text:
//! typed errors only, never a panic, and what parses is valid.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        bevy_npc_llm::fuzzing::parse_configs(text);
    }
});
