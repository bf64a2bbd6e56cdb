#!/usr/bin/env bash
# The main demo, from a fresh machine: installs build packages, then runs the
# AI town (which fetches the default model itself when missing).
# Extra arguments go to the town, e.g. `scripts/demo.sh --headless --seconds 60`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/bevy_npc_llm/target}"
exec cargo run --features debug-ui --example ai_town -- "$@"
