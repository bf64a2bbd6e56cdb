//! Output constraints from arbitrary text: JSON schemas, GBNF and Lark
//! grammars compiled as the worker compiles them (first byte picks the
//! kind, modulo 3). Refusals only: never a panic, never a stack overflow,
//! however deep the nesting.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Some((which, rest)) = data.split_first()
        && let Ok(text) = std::str::from_utf8(rest)
    {
        bevy_npc_llm::fuzzing::constraint_compile(*which, text);
    }
});
