#!/usr/bin/env bash
# Soak test (not part of scripts/test.sh): 2,000 short requests back to back;
# fails when RSS grows 5% or more after warm-up, latency trends up, or slots
# are not freed. Bounded to 20 minutes.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
bash scripts/fetch-models.sh smollm2-135m-instruct-q4_1 >/dev/null
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/bevy_npc_llm/target}"
cargo build --example soak
timeout 1200 "$CARGO_TARGET_DIR/debug/examples/soak" "${1:-2000}"
