//! Registry, settings, persona and save-file parsing on arbitrary text:
//! typed errors only, never a panic, and what parses is valid. The first
//! byte chooses the parser (0 registry, 1 settings, 2 personas, 3 save,
//! modulo 4), the rest is the file.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Some((which, rest)) = data.split_first()
        && let Ok(text) = std::str::from_utf8(rest)
    {
        bevy_npc_llm::fuzzing::parse_config(*which, text);
    }
});
