#!/usr/bin/env bash
# On the CPU build machine: prepare what an NVIDIA machine needs to run the
# plugin's bench with the CUDA backend beside llama.cpp's own tools, in three
# carry folders under .device/ (git-ignored), each well under the device
# tool's 64 MiB per call:
#   .device/a: llama.cpp sources of the llama-cpp-sys-2 version in Cargo.lock
#              (for the CUDA module) + llama.cpp of the PyPI source package
#              llama-cpp-python 0.3.36 (for llama-bench, llama-batched-bench,
#              llama-server) + model part 1
#   .device/b: model part 2
#   .device/c: model part 3 + the examples built with `dynamic-backends`,
#              their shared libraries and CPU modules, the comparator scripts
#              (env BENCH_BEFORE=path: also a bench of another commit)
# Then on the device, three calls back to back (see scripts/gpu/device.sh).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/bevy_npc_llm/target}"
cache=${BEVY_NPC_LLM_CACHE:-$HOME/.cache/bevy_npc_llm}
model=assets/models/SmolLM2-135M-Instruct.Q4_1.gguf
bash scripts/fetch-models.sh smollm2-135m-instruct-q4_1 >/dev/null
cargo build --examples --features dynamic-backends
out=$(dirname "$(ls -d "$CARGO_TARGET_DIR"/debug/build/llama-cpp-sys-2-*/out/backends | head -1)")
rm -rf .device /tmp/npc-llm-bins && mkdir -p .device/a .device/b .device/c /tmp/npc-llm-bins/backends
cargo xtask llama-src .device/a/llama-src.tar.gz
# llama.cpp's own tools, from the llama.cpp inside llama-cpp-python's source
# package (the crate ships none), without models/docs/examples/tests.
tools=$cache/dl/llama-tools-src.tar.gz
if [ ! -s "$tools" ]; then
    mkdir -p "$cache/dl" /tmp/npc-llm-lcp
    python3 -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==0.3.36" -d "$cache/dl"
    tar xzf "$cache"/dl/llama_cpp_python-0.3.36.tar.gz -C /tmp/npc-llm-lcp
    tar czf "$tools" -C /tmp/npc-llm-lcp/llama_cpp_python-0.3.36/vendor \
        --exclude=llama.cpp/models --exclude=llama.cpp/docs --exclude=llama.cpp/examples \
        --exclude=llama.cpp/tests --exclude=llama.cpp/benches --exclude=llama.cpp/tools/server/tests \
        --exclude=llama.cpp/.git llama.cpp
    rm -rf /tmp/npc-llm-lcp
fi
cp "$tools" .device/a/llama-tools-src.tar.gz
( cd .device && split -n 3 -d ../$model smol.part. \
    && mv smol.part.00 a/ && mv smol.part.01 b/ && mv smol.part.02 c/ )
sha256sum "$model" | cut -d' ' -f1 > .device/c/model.sha256
cp "$CARGO_TARGET_DIR"/debug/examples/{basic,bench} /tmp/npc-llm-bins/
strip /tmp/npc-llm-bins/basic /tmp/npc-llm-bins/bench
# BENCH_BEFORE=path: a bench built from another commit (with dynamic-backends),
# shipped as bins/bench-before for an A/B (BENCH_BIN in quick-variants.txt).
if [ -n "${BENCH_BEFORE:-}" ]; then
    cp "$BENCH_BEFORE" /tmp/npc-llm-bins/bench-before && strip /tmp/npc-llm-bins/bench-before
fi
cp -L "$out"/lib/{libllama.so.0,libggml.so.0,libggml-base.so.0} /tmp/npc-llm-bins/
cp "$out"/backends/libggml-cpu-{x64,haswell,skylakex,icelake,zen4,sapphirerapids}.so /tmp/npc-llm-bins/backends/
tar czf .device/c/bins.tar.gz -C /tmp/npc-llm-bins .
du -sh .device/a .device/b .device/c
