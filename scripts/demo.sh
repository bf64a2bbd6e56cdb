#!/usr/bin/env bash
# The main demo, from a fresh machine: installs build packages, fetches the
# default model when missing (the example does it too), then runs it.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/bevy_npc_llm/target}"
exec cargo run --example basic -- "$@"
