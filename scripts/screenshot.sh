#!/usr/bin/env bash
# Run the windowed AI town under Xvfb (software Vulkan: lavapipe) with a fixed
# seed and save a Bevy screenshot after N seconds to docs/ai_town.png.
# Usage: scripts/screenshot.sh [SECONDS=40] [OUT=docs/ai_town.png]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
secs=${1:-40} out=${2:-docs/ai_town.png}
bash scripts/setup.sh
need=()
command -v xvfb-run >/dev/null 2>&1 || need+=(xvfb xauth)
[ -e /usr/share/vulkan/icd.d/lvp_icd.x86_64.json ] || need+=(mesa-vulkan-drivers libvulkan1)
if [ ${#need[@]} -gt 0 ]; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
bash scripts/fetch-models.sh smollm2-135m-instruct-q4_1 >/dev/null
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/bevy_npc_llm/target}"
cargo build --features debug-ui --example ai_town
rm -f "$out"
WGPU_BACKEND=vulkan xvfb-run -a -s "-screen 0 1280x800x24" \
    timeout $((secs + 60)) "$CARGO_TARGET_DIR/debug/examples/ai_town" \
    --seed 7 --screenshot "$out" --screenshot-after "$secs" --seconds $((secs + 5))
test -s "$out" && echo "wrote $out"
