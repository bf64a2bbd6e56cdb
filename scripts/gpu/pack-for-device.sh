#!/usr/bin/env bash
# On the CPU build machine: prepare what an NVIDIA machine needs to run the
# plugin with the CUDA backend, in two carry folders under .device/ (git-ignored),
# each under the device tool's 64 MiB limit:
#   .device/a: llama.cpp sources of the llama-cpp-sys-2 version in Cargo.lock + model part 1
#   .device/b: model part 2 + the examples built with `dynamic-backends` + shared libs + CPU modules
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/bevy_npc_llm/target}"
cargo build --examples --features dynamic-backends
ver=$(grep -A1 'name = "llama-cpp-sys-2"' Cargo.lock | sed -n 's/version = "\(.*\)"/\1/p')
src=$(ls -d "$HOME"/.cargo/registry/src/*/llama-cpp-sys-2-"$ver" | head -1)
out=$(dirname "$(ls -d "$CARGO_TARGET_DIR"/debug/build/llama-cpp-sys-2-*/out/backends | head -1)")
rm -rf .device && mkdir -p .device/a .device/b /tmp/npc-llm-bins/backends
tar czf .device/a/llama-src.tar.gz -C "$src" llama.cpp/CMakeLists.txt llama.cpp/cmake \
    llama.cpp/ggml llama.cpp/src llama.cpp/include llama.cpp/vendor llama.cpp/common
( cd .device && split -b 49200000 ../assets/models/SmolLM2-135M-Instruct.Q4_1.gguf smol.part. \
    && mv smol.part.aa a/ && mv smol.part.ab b/ )
cp "$CARGO_TARGET_DIR"/debug/examples/{basic,bench} /tmp/npc-llm-bins/
strip /tmp/npc-llm-bins/basic /tmp/npc-llm-bins/bench
cp -L "$out"/lib/{libllama.so.0,libggml.so.0,libggml-base.so.0} /tmp/npc-llm-bins/
cp "$out"/backends/libggml-cpu-{x64,haswell,skylakex,icelake,zen4,sapphirerapids}.so /tmp/npc-llm-bins/backends/
tar czf .device/b/bins.tar.gz -C /tmp/npc-llm-bins .
du -sh .device/a .device/b
