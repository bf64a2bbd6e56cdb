#!/usr/bin/env bash
# On the NVIDIA machine (nvcc, cmake, ninja; no Rust): build ggml's CUDA backend
# module from the same llama.cpp sources the Rust build used, as a loadable
# module (GGML_BACKEND_DL), into DEST.
# With TOOLS_TARBALL (llama.cpp of llama-cpp-python's source package, which
# has the tool sources the crate's copy lacks), llama-bench and
# llama-batched-bench are built too, from those tool sources on the crate's
# llama.cpp and with the same CUDA module, into DEST/same-tools: llama.cpp's
# own figures for exactly the llama.cpp the plugin runs.
# CUDA_GRAPH_PATCH (default on): apply scripts/gpu/patch-cuda-graphs.py to
# the sources first (generation steps keep their recorded CUDA graph across
# prompt steps; see that script). off: llama.cpp as shipped. both: the tools
# and DEST/libggml-cuda.so as shipped, then the patched module in
# DEST/patched (and DEST/same-tools-patched), to compare in one sitting.
# Wherever that patch goes, scripts/gpu/patch-share-q8.py goes too (unless
# SHARE_Q8_PATCH=off): products of the same activations share one q8_1
# quantisation (on by default; GGML_CUDA_SHARE_Q8_1=0 switches it off at run
# time, for an A/B in one sitting).
# Usage: build-cuda-backend.sh LLAMA_SRC_TARBALL DEST [CUDA_ARCH=90] [TOOLS_TARBALL]
set -euo pipefail
tarball=$1 dest=$2 arch=${3:-90} tools=${4:-}
graph_patch=${CUDA_GRAPH_PATCH:-on}
work=/tmp/npc-llm-cuda
mkdir -p "$work" "$dest"
tar xzf "$tarball" -C "$work"
patch_sources() {
    python3 "$(dirname "$0")/patch-cuda-graphs.py" "$work/llama.cpp"
    if [ "${SHARE_Q8_PATCH:-on}" != off ]; then
        python3 "$(dirname "$0")/patch-share-q8.py" "$work/llama.cpp"
    fi
}
if [ "$graph_patch" = on ]; then
    patch_sources
fi
targets=(ggml-cuda)
extra=(-DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_COMMON=OFF)
if [ -n "$tools" ]; then
    mkdir -p "$work/tools-src"
    tar xzf "$tools" -C "$work/tools-src" llama.cpp/tools/batched-bench llama.cpp/tools/llama-bench
    rm -rf "$work/llama.cpp/tools"
    mkdir -p "$work/llama.cpp/tools"
    cp -r "$work/tools-src/llama.cpp/tools/batched-bench" "$work/tools-src/llama.cpp/tools/llama-bench" \
        "$work/llama.cpp/tools/"
    printf 'llama_add_compile_flags()\nadd_subdirectory(batched-bench)\nadd_subdirectory(llama-bench)\n' \
        > "$work/llama.cpp/tools/CMakeLists.txt"
    targets+=(ggml-cpu llama-bench llama-batched-bench)
    extra=(-DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_COMMON=ON)
fi
configure() {
    cmake -S "$work/llama.cpp" -B "$work/build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
        -DGGML_CUDA=ON -DGGML_BACKEND_DL=ON -DBUILD_SHARED_LIBS=ON -DGGML_NATIVE=OFF \
        -DCMAKE_CUDA_ARCHITECTURES="$arch" -DLLAMA_BUILD_TESTS=OFF "$@" \
        -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF \
        -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_CURL=OFF >"$work/configure.log" 2>&1
}
# The tools are a bonus: if they do not configure or build, the module still does.
if ! configure "${extra[@]}"; then
    echo "configure with the tools failed (see $work/configure.log); module only"
    rm -rf "$work/build" && targets=(ggml-cuda) && tools=
    configure -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_COMMON=OFF
fi
time cmake --build "$work/build" --target ggml-cuda -j"$(nproc)" 2>&1 | tail -3
cp "$(find "$work/build" -name 'libggml-cuda.so' | head -1)" "$dest/"
if [ -n "$tools" ] && cmake --build "$work/build" --target "${targets[@]:1}" -j"$(nproc)" 2>&1 | tail -3; then
    # The tools load their backends (CUDA, CPU) from their own directory.
    mkdir -p "$dest/same-tools"
    cp "$work/build/bin/"llama-bench "$work/build/bin/"llama-batched-bench "$dest/same-tools/" || true
    find "$work/build" \( -name 'lib*.so' -o -name 'lib*.so.*' \) -exec cp -P {} "$dest/same-tools/" \;
fi
if [ "$graph_patch" = both ]; then
    patch_sources
    time cmake --build "$work/build" --target ggml-cuda -j"$(nproc)" 2>&1 | tail -3
    mkdir -p "$dest/patched"
    cp "$(find "$work/build" -name 'libggml-cuda.so' | head -1)" "$dest/patched/"
    if [ -d "$dest/same-tools" ]; then
        cp -a "$dest/same-tools" "$dest/same-tools-patched"
        cp "$dest/patched/libggml-cuda.so" "$dest/same-tools-patched/"
    fi
fi
ls -la "$dest"
