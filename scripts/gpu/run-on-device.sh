#!/usr/bin/env bash
# On the NVIDIA machine, after build-cuda-backend.sh: assemble the model, unpack
# the binaries and run the basic example and the bench with the CUDA backend.
# Usage: run-on-device.sh PART_A PART_B BINS_TARBALL BACKENDS_DIR LOG_DIR [bench args...]
set -euo pipefail
a=$1 b=$2 bins=$3 backends=$4 logs=$5; shift 5
root=$(pwd)
cat "$a" "$b" > assets/models/SmolLM2-135M-Instruct.Q4_1.gguf
sha256sum assets/models/SmolLM2-135M-Instruct.Q4_1.gguf
mkdir -p /tmp/npc-llm-bins && tar xzf "$bins" -C /tmp/npc-llm-bins
cp /tmp/npc-llm-bins/backends/*.so "$backends"/
export LD_LIBRARY_PATH=/tmp/npc-llm-bins:${LD_LIBRARY_PATH:-}
export BEVY_NPC_LLM_BACKENDS_DIR=$backends
nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv
cd "$root"
/tmp/npc-llm-bins/basic 2>&1 | tee "$logs/basic.log"
/tmp/npc-llm-bins/bench "$@" 2>&1 | tee "$logs/bench.log"
