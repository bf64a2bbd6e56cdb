#!/usr/bin/env bash
# Bounded fuzzing with cargo-fuzz (libFuzzer, nightly toolchain): builds the
# targets in fuzz/ and runs each for SECONDS.
#
# Built for throughput: no sanitizer and no comparison tracing. The targets
# run safe Rust (a panic is the crash they look for) and llama.cpp's C++ is
# not instrumented by cargo-fuzz either way, so AddressSanitizer found
# nothing it could while costing 3-10x the executions; keywords come from the
# dictionaries in fuzz/dict/ instead of comparison tracing. For a slower ASan
# build: FUZZ_FLAGS="-s address" scripts/fuzz.sh (a full rebuild).
#   parse_config  registry / settings / persona / save RON parsing
#   clean_line    cleanup of model output and memories, any speaker name
#   dialogue_save dialogue saves: validate before load, load + save round trip
#   dialogue_prompt  dialogue prompts without a model (fast): persona kept, player
#                 and memory text only sanitized and never in the system prompt
#   build_prompt  dialogue prompts from arbitrary persona and player text,
#                 rendered with SmolLM2's template; control tokens counted
#                 with its control-token vocabulary (read once)
#   constraint    JSON schemas, GBNF and Lark grammars compiled as the worker
#                 compiles them (nesting bound first, then llguidance), and
#                 a server's text checked against them
#   build_prompt_llama  the same through llama.cpp's own tokenizer (exact,
#                 ~20 inputs/s: not one of the fast targets)
# The fast targets (all but build_prompt_llama) reach >= 1M executions in the
# default 60 s on a 2-core machine.
# Not part of the test command. A crash stops the run with the input saved
# under fuzz/artifacts/<target>/: turn it into a regression test.
# Usage: scripts/fuzz.sh [SECONDS=60] [TARGET...]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
secs=${1:-60}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(parse_config clean_line dialogue_save dialogue_prompt constraint build_prompt build_prompt_llama)
flags=${FUZZ_FLAGS:--s none --no-trace-compares}
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
rustup toolchain list | grep -q nightly || { echo "fuzz.sh needs a nightly toolchain (rustup toolchain install nightly)" >&2; exit 1; }
bash scripts/fetch-models.sh smollm2-135m-instruct-q4_1 >/dev/null
tdir=${BEVY_NPC_LLM_FUZZ_TARGET_DIR:-$HOME/.cache/bevy_npc_llm/fuzz-target}
echo "building the fuzz targets (first time: a release build of Bevy and llama.cpp, ~15 min on 2 cores)"
# shellcheck disable=SC2086
cargo +nightly fuzz build $flags --codegen-units 16 --target-dir "$tdir" 2>&1 | grep -v -E '^\s*(Compiling|Building)' || true
for t in "${targets[@]}"; do
    work=$(mktemp -d)
    echo "== $t: ${secs}s"
    case $t in
        parse_config | dialogue_save) dict=fuzz/dict/ron.dict ;;
        constraint) dict=fuzz/dict/constraint.dict ;;
        *) dict=fuzz/dict/text.dict ;;
    esac
    # shellcheck disable=SC2086
    cargo +nightly fuzz run $flags --codegen-units 16 --target-dir "$tdir" "$t" "$work" "fuzz/corpus/${t%_llama}" -- \
        -dict="$dict" -max_total_time="$secs" -max_len=4096 -timeout=10 -rss_limit_mb=4096 -print_final_stats=1 \
        2>&1 | grep -E 'stat::number_of_executed_units|stat::average_exec_per_sec|stat::new_units_added|ERROR|panicked|SUMMARY|Done [0-9]+ runs'
    echo "   corpus grew to $(ls "$work" | wc -l) inputs (kept in $work)"
done
