#!/usr/bin/env bash
# The AI town while its model arrives: a copy of the town's assets without the
# model file, tests/support/file_server.py serving SmolLM2 throttled to
# 1.5 MB/s, the windowed town under Xvfb with `--model-url`, and a screenshot
# after N seconds showing the overlay's download bar and the town's own
# progress line. Usage: scripts/screenshot-download.sh [SECONDS=15] [OUT=docs/ai_town-download.png]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
secs=${1:-15} out=$(realpath -m "${2:-docs/ai_town-download.png}")
root=$PWD
bash scripts/screenshot.sh 1 /tmp/npc-llm-warmup.png >/dev/null  # packages, model, build
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/bevy_npc_llm/target}"
work=$(mktemp -d)
trap 'kill $server 2>/dev/null || true; rm -rf "$work"' EXIT
mkdir -p "$work/assets/models"
cp -r assets/town "$work/assets/"
cp assets/models/models.ron "$work/assets/models/"
[ -f assets/llm_settings.ron ] && cp assets/llm_settings.ron "$work/assets/"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
python3 tests/support/file_server.py "$port" assets/models/SmolLM2-135M-Instruct.Q4_1.gguf "$work/requests.log" >/dev/null &
server=$!
sleep 1
rm -f "$out"
cd "$work"
WGPU_BACKEND=vulkan xvfb-run -a -s "-screen 0 1280x800x24" \
    timeout $((secs + 60)) "$CARGO_TARGET_DIR/debug/examples/ai_town" \
    --seed 7 --screenshot "$out" --screenshot-after "$secs" --seconds $((secs + 5)) \
    --model-url "http://127.0.0.1:$port/slow/1500000/SmolLM2.gguf" | grep -E '^downloading' | tail -3
cd "$root"
test -s "$out" && echo "wrote $out"
