#!/usr/bin/env bash
# On the NVIDIA machine (nvcc, cmake, ninja; no Rust): build ggml's CUDA backend
# module from the same llama.cpp sources the Rust build used, as a loadable
# module (GGML_BACKEND_DL), into DEST.
# Usage: build-cuda-backend.sh LLAMA_SRC_TARBALL DEST [CUDA_ARCH=90]
set -euo pipefail
tarball=$1 dest=$2 arch=${3:-90}
work=/tmp/npc-llm-cuda
mkdir -p "$work" "$dest"
tar xzf "$tarball" -C "$work"
cmake -S "$work/llama.cpp" -B "$work/build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DGGML_CUDA=ON -DGGML_BACKEND_DL=ON -DBUILD_SHARED_LIBS=ON -DGGML_NATIVE=OFF \
    -DCMAKE_CUDA_ARCHITECTURES="$arch" -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_TOOLS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_COMMON=OFF \
    -DLLAMA_BUILD_APP=OFF -DLLAMA_CURL=OFF >"$work/configure.log"
time cmake --build "$work/build" --target ggml-cuda -j"$(nproc)" 2>&1 | tail -3
cp "$(find "$work/build" -name 'libggml-cuda.so' | head -1)" "$dest/"
ls -la "$dest"
