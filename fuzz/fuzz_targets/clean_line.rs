//! `clean_line` / `sanitize_memory_text` on arbitrary output and names.
//! Input: `name \0 text` (no NUL: the name is "Mira"); the length bounds the output.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let (name, text) = s.split_once('\0').unwrap_or(("Mira", s));
    let max = 1 + data.len() % 64;
    bevy_npc_llm::fuzzing::clean_line_invariants(text, name, max);
});
