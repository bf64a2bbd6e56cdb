#!/usr/bin/env bash
# The main demo, from a fresh machine: installs build packages, then runs the
# AI town (which fetches the default model itself when missing).
# Extra arguments go to the town, e.g. `scripts/demo.sh --headless --seconds 60`.
# The town's last line is its summary (lines spoken, conversations).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/bevy_npc_llm/target}"
if [ ! -e "$CARGO_TARGET_DIR/debug/examples/ai_town" ]; then
    echo "demo: first build: compiles Bevy and llama.cpp (C++) — about 25 minutes on a 2-core machine" \
         "(measured cold, see README); later runs start in seconds."
    echo "demo: build cache: $CARGO_TARGET_DIR (set CARGO_TARGET_DIR to move it; ~2 GB)"
fi
exec cargo run --features debug-ui --example ai_town -- "$@"
