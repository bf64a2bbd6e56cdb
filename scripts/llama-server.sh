#!/usr/bin/env bash
# Builds llama.cpp's OpenAI-compatible `llama-server` from the llama.cpp
# sources inside the PyPI source package llama-cpp-python (fetched by name
# with pip; no other download), for the remote-backend tests and bench.
# Cached outside the clone; prints the binary's path.
# Usage: scripts/llama-server.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
cache=${BEVY_NPC_LLM_CACHE:-$HOME/.cache/bevy_npc_llm}
work=$cache/llama-server
bin=$work/bin/llama-server
if [ ! -x "$bin" ]; then
    rm -rf "$work/dl" "$work/src" "$work/build"
    mkdir -p "$work/dl" "$work/src" "$work/bin"
    echo "building llama-server from the llama-cpp-python source package (~10 min on 2 cores) ..." >&2
    python3 -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==0.3.36" -d "$work/dl" >&2
    tar xzf "$work"/dl/llama_cpp_python-*.tar.gz -C "$work/src"
    src=$(ls -d "$work"/src/llama_cpp_python-*/vendor/llama.cpp)
    cmake -S "$src" -B "$work/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON -DLLAMA_CURL=OFF \
        -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
        -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON >&2
    cmake --build "$work/build" --target llama-server -j"$(nproc)" >&2
    cp "$work/build/bin/llama-server" "$bin.tmp" && mv "$bin.tmp" "$bin"
    rm -rf "$work/build" "$work/src" "$work/dl"
fi
echo "$bin"
