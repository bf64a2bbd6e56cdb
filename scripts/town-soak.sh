#!/usr/bin/env bash
# A long AI-town run, cheap: the town's clock at --time-scale (default 15×)
# for --game-minutes (default 60) of game time, headless, real model. Prints
# the town's lines, then its soak and summary lines: conversations started
# per 10 game-minutes, started / ended / still open, entities, RSS.
# Usage: scripts/town-soak.sh [GAME_MINUTES=60] [TIME_SCALE=15]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/bevy_npc_llm/target}"
exec cargo run --features debug-ui --example ai_town -- --headless \
    --game-minutes "${1:-60}" --time-scale "${2:-15}"
