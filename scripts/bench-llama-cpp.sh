#!/usr/bin/env bash
# llama.cpp's own figures on this machine, for BENCHMARKS.md: builds
# llama-batched-bench and llama-bench from the llama.cpp sources inside the
# PyPI source package llama-cpp-python (fetched by name with pip), then runs
# them on the SmolLM2 test model with the given threads.
# Usage: scripts/bench-llama-cpp.sh [THREADS=1] [WORK=/tmp/llama-cpp-bench]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
threads=${1:-1} work=${2:-/tmp/llama-cpp-bench}
model=$PWD/assets/models/SmolLM2-135M-Instruct.Q4_1.gguf
bash scripts/fetch-models.sh smollm2-135m-instruct-q4_1 >/dev/null
mkdir -p "$work"
if [ ! -x "$work/bin/llama-batched-bench" ]; then
    python3 -m pip download -q --no-deps --no-binary :all: llama-cpp-python -d "$work/dl"
    tar xzf "$work"/dl/llama_cpp_python-*.tar.gz -C "$work"
    src=$(ls -d "$work"/llama_cpp_python-*/vendor/llama.cpp)
    cmake -S "$src" -B "$work/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF >/dev/null
    cmake --build "$work/build" --target llama-batched-bench llama-bench -j"$(nproc)" >/dev/null
    mkdir -p "$work/bin" && cp "$work"/build/bin/llama-batched-bench "$work"/build/bin/llama-bench "$work/bin/"
fi
"$work/bin/llama-bench" -m "$model" -t "$threads" -p 0 -n 64 -r 3
# 256-token prompts (shared per sequence), 64 generated tokens per sequence.
"$work/bin/llama-batched-bench" -m "$model" -t "$threads" -tb "$threads" -c 8192 -b 2048 -ub 512 \
    -npp 256 -ntg 64 -npl 1,8 2>/dev/null | grep -E '^\|'
