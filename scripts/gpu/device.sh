#!/usr/bin/env bash
# The GPU bench on an NVIDIA machine (nvcc, cmake, ninja, python3; no Rust,
# no internet), in the repository root the device tool sends. First, on the
# CPU machine: `bash scripts/gpu/pack-for-device.sh` (fills .device/a b c).
# Then three device calls, back to back (the machine keeps /tmp only while
# warm, ~30 s after a call):
#   1. carry .device/a: bash scripts/gpu/device.sh start .device/a
#      (unpacks; builds the CUDA backend module from the crate's llama.cpp,
#      with llama-bench and llama-batched-bench from that same llama.cpp, and
#      llama.cpp's tools from llama-cpp-python's, both builds in the background)
#   2. carry .device/b: bash scripts/gpu/device.sh stash .device/b
#   3. carry .device/c: bash scripts/gpu/device.sh run .device/c
#      (waits for the builds; runs llama-bench, llama-batched-bench,
#      llama-server under N clients, then our bench with their figures, and
#      the plan variants; everything lands in $OUT)
# `run` skips the steps already done, so a call cut at its time limit can
# be followed by another `run` while the machine is warm.
# `single` (after `start` and the stashes; also part of `run`): single stream
# against llama-bench tg in paired rounds (scripts/gpu/single-stream.py).
# Exploration, after `quick-start` (or `start`) and the stashes: `quick`
# (the variants of scripts/gpu/quick-variants.txt), `ttft` (the cached
# second turn with rounded prompt steps off/on and graphs kept longer; with
# QUICK_TOOLS=off quick-start, about 5 min of device time), `kv` (the KV
# snapshot restore against a full read), `trace` (host time per
# CUDA runtime call and llama.cpp entry point), `kernels` (kernel launches
# and device intervals per llama_decode batch size).
set -euo pipefail
cmd=$1 from=${2:-}
W=/tmp/npc-llm-dev
OUT=${OUT:-$W/out}
mkdir -p "$W/in" "$W/logs" "$OUT"
if [ -n "$from" ]; then cp -f "$from"/* "$W/in/"; fi
root=$(pwd)

build_tools() {
    mkdir -p "$W/tools-src"
    tar xzf "$W/in/llama-tools-src.tar.gz" -C "$W/tools-src"
    cmake -S "$W/tools-src/llama.cpp" -B "$W/tools-build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
        -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 -DGGML_NATIVE=OFF -DBUILD_SHARED_LIBS=OFF \
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=ON \
        -DLLAMA_BUILD_SERVER=ON -DLLAMA_CURL=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_UI=OFF
    cmake --build "$W/tools-build" --target llama-bench llama-batched-bench llama-server -j"$(nproc)"
}

# The CUDA module (as shipped and patched) and the same llama.cpp's tools,
# detached from this call (the build outlives it).
# QUICK_TOOLS=off: the patched module only (no shipped module, no tools):
# the shortest build, for an A/B of runtime switches without comparators.
start_module_build() {
    if [ "${QUICK_TOOLS:-on}" = off ]; then
        setsid nohup bash -c "CUDA_GRAPH_PATCH=on bash '$root/scripts/gpu/build-cuda-backend.sh' '$W/in/llama-src.tar.gz' '$W/backends/patched' 90 \
            && touch '$W/cuda.done' || touch '$W/cuda.failed'" >"$W/logs/cuda-build.log" 2>&1 </dev/null &
        return
    fi
    setsid nohup bash -c "CUDA_GRAPH_PATCH=both bash '$root/scripts/gpu/build-cuda-backend.sh' '$W/in/llama-src.tar.gz' '$W/backends' 90 '$W/in/llama-tools-src.tar.gz' \
        && touch '$W/cuda.done' || touch '$W/cuda.failed'" >"$W/logs/cuda-build.log" 2>&1 </dev/null &
}

# Wait for the named background builds (cuda, tools); exit if one failed.
wait_for_builds() {
    for what in "$@"; do
        for _ in $(seq 1 540); do
            [ -e "$W/$what.done" ] || [ -e "$W/$what.failed" ] && break
            sleep 1
        done
        if [ ! -e "$W/$what.done" ]; then
            echo "$what build not done:"; tail -20 "$W/logs/$what-build.log"; exit 1
        fi
    done
}

# The model (sha256-checked), our binaries and CPU modules in place; the
# plugin runs the module the README's recipe builds (patched, see
# scripts/gpu/patch-cuda-graphs.py), llama.cpp's tools run as shipped.
prepare_inputs() {
    model=$root/assets/models/SmolLM2-135M-Instruct.Q4_1.gguf
    [ -s "$model" ] || cat "$W"/in/smol.part.* > "$model"
    [ "$(sha256sum "$model" | cut -d' ' -f1)" = "$(cat "$W/in/model.sha256")" ] || { echo "model sha256 mismatch"; exit 1; }
    mkdir -p "$W/bins" && tar xzf "$W/in/bins.tar.gz" -C "$W/bins"
    cp "$W"/bins/backends/*.so "$W/backends/"
    export LD_LIBRARY_PATH=$W/bins:${LD_LIBRARY_PATH:-}
    export BEVY_NPC_LLM_BACKENDS_DIR=$W/backends
    if [ -s "$W/backends/patched/libggml-cuda.so" ]; then
        cp "$W"/bins/backends/*.so "$W/backends/patched/"
        export BEVY_NPC_LLM_BACKENDS_DIR=$W/backends/patched
    fi
}

# Single stream against llama-bench tg in ROUNDS paired rounds
# (scripts/gpu/single-stream.py: llama.cpp 0.3.36's tool and the same
# llama.cpp's, whichever were built, back to back with the bench's binding
# section, order reversed every other round) into $OUT/single-stream.json.
single_stream() {
    local args=()
    [ -x "$W/tools-build/bin/llama-bench" ] && args+=("llama.cpp 0.3.36=$W/tools-build/bin")
    [ -x "$W/backends/same-tools/llama-bench" ] && args+=("same llama.cpp=$W/backends/same-tools")
    [ -x "$W/backends/same-tools-patched/llama-bench" ] && args+=("same llama.cpp, patched CUDA module=$W/backends/same-tools-patched")
    if [ ! -s "$W/single-stream.json" ]; then
        python3 -u scripts/gpu/single-stream.py "$W/single-stream.json" "$model" "$W/bins/bench" \
            "${ROUNDS:-6}" "${args[@]}" 2>&1 | tee "$W/logs/single-stream.log"
    fi
    cp "$W/single-stream.json" "$OUT/"
}

# The bench's npcs section under scripts/gpu/cuda-api-trace.c for each line
# of VARIANTS (label|env|flags) into DIR/trace$i.{txt,json,log}, then SHOW (a
# command) on each table. A variant's env may hold NO_TRACE=1 (no shim) and
# BENCH_BIN=path (another bench binary, for an A/B of engine builds).
traced_variants() {
    local dir=$1 variants=$2 show=$3 i=0 label envs flags pre bin e
    mkdir -p "$dir"
    gcc -O2 -shared -fPIC -o "$W/libcuda-api-trace.so" scripts/gpu/cuda-api-trace.c -ldl -lpthread
    while IFS='|' read -r label envs flags; do
        [ -n "$label" ] || continue
        i=$((i + 1))
        pre=$W/libcuda-api-trace.so
        case "$envs" in *NO_TRACE=1*) pre= ;; esac
        bin=$W/bins/bench
        for e in $envs; do case $e in BENCH_BIN=*) bin=${e#BENCH_BIN=} ;; esac; done
        # shellcheck disable=SC2086
        env $envs LD_PRELOAD="$pre" CUDA_API_TRACE_OUT="$dir/trace$i.txt" "$bin" \
            --sections npcs --tokens 128 --no-sequential --label "$label" \
            --json-out "$dir/trace$i.json" $flags >"$dir/trace$i.log" 2>&1 || echo "variant $label failed"
        echo "== $label"
        grep -E "per step|generation rate" "$dir/trace$i.log" | sed 's/  */ /g' || true
        if [ -s "$dir/trace$i.txt" ]; then "$show" "$dir/trace$i.txt"; fi
    done <<<"$variants"
}

# The kernel tables of a shim table (CUDA_API_TRACE_KERNELS=1), heads only.
kernel_tables() {
    grep -A4 "^kernels in" "$1" || true
}

case $cmd in
quick-start)
    # An exploration sitting: the CUDA module and the same-llama.cpp tools
    # only (no llama-cpp-python tools, no llama-server), faster to build.
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    start_module_build
    sleep 2
    echo "module build started"
    ;;
ttft)
    # After `quick-start` and the stashes: the bench's cache section only
    # (the cached second turn), rounded prompt steps off / on alternating,
    # twice, on the patched module, then on with recorded graphs kept 60 s
    # unused (GGML_CUDA_GRAPH_KEEP_S, scripts/gpu/patch-cuda-graphs.py: the
    # turn after 12 s idle) against on with llama.cpp's 10 s; JSON and logs
    # into $OUT. Resumable.
    wait_for_builds cuda
    prepare_inputs
    i=0
    for round in off on off on on:60 on on:60; do
        i=$((i + 1))
        keep=10
        case $round in *:*) keep=${round#*:} round=${round%%:*} ;; esac
        [ -s "$W/ttft$i.json" ] || GGML_CUDA_GRAPH_KEEP_S=$keep "$W/bins/bench" --sections cache --reps 5 \
            --round-prompts $round --label "rounded prompt steps $round, graphs kept ${keep} s ($i)" \
            --json-out "$W/ttft$i.json" >"$W/logs/ttft$i.log" 2>&1 || echo "ttft $i failed"
        grep -E "plan:|TTFT|rounded|ratio" "$W/logs/ttft$i.log" | sed 's/  */ /g' || true
    done
    tar czf "$OUT/ttft.tar.gz" -C "$W" logs $(cd "$W" && ls ttft*.json)
    ;;
quick)
    # Variants from scripts/gpu/quick-variants.txt (label|env|flags; an env
    # BENCH_BIN=path runs another bench binary, e.g. bins/bench-before from
    # pack-for-device.sh's BENCH_BEFORE, for an A/B of engine builds), each
    # with the binding, npcs 1/8/32/128, cache and arrivals sections, against the
    # same-llama.cpp comparators of this machine (B = 1/8/32/128 only: kept
    # apart from `run`'s, which cover every B). The plugin runs the patched
    # module unless a variant's env says otherwise. Resumable like `run`.
    wait_for_builds cuda
    prepare_inputs
    for tools in same-tools same-tools-patched; do
        [ -d "$W/backends/$tools" ] && [ ! -s "$W/quick-comparators-$tools.json" ] || continue
        LD_LIBRARY_PATH=$W/backends/$tools python3 -u scripts/gpu/comparators.py "$W/backends/$tools" \
            "$model" "$W/quick-comparators-$tools.json" "$W/logs/quick-$tools" 1,8,32,128 - 2>&1 | tail -3
    done
    # The bench reads the same tools' figures as its "old" comparator too here
    # (none without the tools: QUICK_TOOLS=off).
    comparators=()
    if [ -s "$W/quick-comparators-same-tools.json" ]; then
        python3 -c "import json,sys; d=json.load(open(sys.argv[1])); d['same_llama_cpp']=dict(d); json.dump(d,open(sys.argv[2],'w'))" \
            "$W/quick-comparators-same-tools.json" "$W/comparators-quick.json"
        comparators=(--comparators "$W/comparators-quick.json")
    fi
    i=0
    while IFS='|' read -r label envs flags; do
        [ -n "$label" ] || continue
        i=$((i + 1))
        [ -s "$W/quick$i.json" ] && continue
        bin=$W/bins/bench
        for e in $envs; do case $e in BENCH_BIN=*) bin=${e#BENCH_BIN=} ;; esac; done
        # shellcheck disable=SC2086
        env $envs "$bin" --sections binding,npcs,cache,arrivals --npcs 1,8,32,128 --tokens 128 --no-sequential \
            ${comparators[@]+"${comparators[@]}"} --label "$label" --json-out "$W/quick$i.json" $flags \
            >"$W/logs/quick$i.log" 2>&1 || echo "variant $label failed"
        echo "== $label ($envs $flags)"
        grep -E "single stream /|N=[0-9]+ +(batched aggregate|batched generation rate|batched mean time to first|even prompt steps|per step: wall)|ratio|cache on:|cache off:|arrivals|checksum|same seed" "$W/logs/quick$i.log" \
            | grep -v "binding  ratio" | sed 's/  */ /g'
    done < scripts/gpu/quick-variants.txt
    mkdir -p "$OUT/quick" && cp "$W"/quick*.json "$OUT/quick/" 2>/dev/null || true
    ;;
kv)
    # After `quick-start` and the stashes: the bench's kv_restore section (an
    # NPC's first line after a restored KV snapshot against its prompt read
    # again), then its frames section; JSON and logs into $OUT.
    wait_for_builds cuda
    prepare_inputs
    "$W/bins/bench" --sections kv_restore --reps 5 --json-out "$OUT/kv_restore.json" \
        >"$OUT/kv_restore.log" 2>&1 || echo "kv_restore failed"
    grep -E "plan:|kv_restore" "$OUT/kv_restore.log" | sed 's/  */ /g' || true
    ;;
single)
    # After `start` (or `quick-start`) and the stashes: single stream against
    # llama-bench tg in paired rounds only (env ROUNDS, default 6).
    if [ -e "$W/logs/tools-build.log" ]; then wait_for_builds cuda tools; else wait_for_builds cuda; fi
    prepare_inputs
    single_stream
    ;;
trace)
    # Where the host time of a step goes in the CUDA runtime (no nsys or perf
    # on the device): the bench's npcs section under scripts/gpu/cuda-api-trace.c
    # for each line of TRACE_VARIANTS (label|env|flags; default below), one
    # table of calls / host time per runtime function each, in $OUT/trace
    # (env NO_TRACE=1: run without the shim; BENCH_BIN=path: another bench).
    wait_for_builds cuda
    prepare_inputs
    variants=${TRACE_VARIANTS:-"N=1||--npcs 1
N=8 one lane||--npcs 8 --lanes 1
N=8 two lanes||--npcs 8 --lanes 2
N=32 two lanes||--npcs 32 --lanes 2
N=128 two lanes||--npcs 128 --lanes 2
N=8 two lanes, no trace|NO_TRACE=1|--npcs 8 --lanes 2"}
    traced_variants "$OUT/trace" "$variants" cat
    ;;
kernels)
    # Device time per llama_decode batch size (tokens), for our bench (npcs
    # section; KERNEL_VARIANTS: label|env|flags lines) and for
    # llama-batched-bench of the same llama.cpp and module, under
    # scripts/gpu/cuda-api-trace.c with CUDA_API_TRACE_KERNELS=1: with CUDA
    # graphs, each step's graph as the device ran it; with
    # GGML_CUDA_DISABLE_GRAPHS=1, the kernels launched one by one (names and
    # counts). Tables in $OUT/kernels.tgz (the device tool returns few files).
    wait_for_builds cuda
    prepare_inputs
    K=$W/kernels
    export CUDA_API_TRACE_KERNELS=1
    variants=${KERNEL_VARIANTS:-"N=1||--npcs 1
N=8 one lane||--npcs 8 --lanes 1
N=8 two lanes||--npcs 8 --lanes 2
N=32 one lane||--npcs 32 --lanes 1
N=32 two lanes||--npcs 32 --lanes 2
N=8 two lanes, kernels one by one|GGML_CUDA_DISABLE_GRAPHS=1|--npcs 8 --lanes 2"}
    traced_variants "$K" "$variants" kernel_tables
    tools=$W/backends/same-tools-patched
    [ -d "$tools" ] || tools=$W/backends/same-tools
    for mode in graphs eager; do
        e=; [ $mode = eager ] && e=GGML_CUDA_DISABLE_GRAPHS=1
        env $e LD_LIBRARY_PATH="$tools:$LD_LIBRARY_PATH" LD_PRELOAD="$W/libcuda-api-trace.so" \
            CUDA_API_TRACE_OUT="$K/batched-$mode.txt" "$tools/llama-batched-bench" -m "$model" -ngl 99 \
            -c 12288 -b 2048 -ub 512 -npp 256 -ntg 128 -npl 1,4,8,16,32 >"$K/batched-$mode.log" 2>&1 \
            || echo "llama-batched-bench ($mode) failed"
        echo "== llama-batched-bench ($mode)"
        grep "^|" "$K/batched-$mode.log" | tail -5 || true
        kernel_tables "$K/batched-$mode.txt"
    done
    # Kernel names from the module's symbol table (offsets the shim printed).
    for lib in "$W/backends/patched/libggml-cuda.so" "$tools/libggml-cuda.so"; do
        [ -s "$lib" ] && nm --defined-only "$lib" >"$K/$(basename "$(dirname "$lib")")-symbols.txt" || true
    done
    python3 - "$K" <<'PY'
import glob, re, subprocess, sys
k = sys.argv[1]
for symfile in glob.glob(f"{k}/*-symbols.txt"):
    syms = {}
    for line in open(symfile):
        parts = line.split()
        if len(parts) == 3:
            syms[int(parts[0], 16)] = parts[2]
    for txt in glob.glob(f"{k}/*.txt"):
        if txt.endswith("-symbols.txt"):
            continue
        body = open(txt).read()
        def name(m):
            s = syms.get(int(m.group(1), 16))
            if not s:
                return m.group(0)
            try:
                return subprocess.run(["c++filt", s], capture_output=True, text=True).stdout.strip()[:160]
            except OSError:
                return s
        open(txt, "w").write(re.sub(r"libggml-cuda\.so\+0x([0-9a-f]+)", name, body))
PY
    tar czf "$OUT/kernels.tgz" -C "$W" kernels
    ;;
start)
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    nproc
    # Both builds at once, detached from this call (they outlive it).
    start_module_build
    export -f build_tools; export W
    setsid nohup bash -c "build_tools && touch '$W/tools.done' || touch '$W/tools.failed'" \
        >"$W/logs/tools-build.log" 2>&1 </dev/null &
    sleep 2
    echo "builds started"
    ;;
stash)
    ls -la "$W/in"
    ;;
run)
    wait_for_builds cuda tools
    prepare_inputs
    tools=$W/tools-build/bin
    if [ ! -s "$W/comparators.json" ]; then
        python3 -u scripts/gpu/comparators.py "$tools" "$model" "$W/comparators.json" "$W/logs" \
            2>&1 | tee "$W/logs/comparators.out"
    fi
    # The same tools built from the plugin's own llama.cpp (same CUDA module):
    # separates the plugin's overhead from differences between llama.cpp versions.
    if [ ! -s "$W/comparators-same.json" ] && [ -x "$W/backends/same-tools/llama-batched-bench" ]; then
        LD_LIBRARY_PATH=$W/backends/same-tools python3 -u scripts/gpu/comparators.py "$W/backends/same-tools" \
            "$model" "$W/comparators-same.json" "$W/logs/same" 1,8,16,32,64,128,255 - \
            2>&1 | tee "$W/logs/comparators-same.out" || true
    fi
    python3 - "$W" <<'PY'
import json, os, sys
w = sys.argv[1]
doc = json.load(open(f"{w}/comparators.json"))
same = f"{w}/comparators-same.json"
if os.path.exists(same):
    doc["same_llama_cpp"] = json.load(open(same))
json.dump(doc, open(f"{w}/comparators-all.json", "w"), indent=2)
PY
    cp "$W/comparators-all.json" "$OUT/comparators.json"
    bench=$W/bins/bench
    # The plan's defaults three times (this machine's run-to-run spread),
    # in files named for the card (e.g. nvidia-h100-80gb-hbm3.json); each
    # `npcs` figure the median of 5 runs, the cached TTFT of 5 turns.
    gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr 'A-Z' 'a-z' | tr -cs 'a-z0-9' '-' | sed 's/-*$//')
    for run in 1 2 3; do
        json=$W/${gpu:-gpu}.json log=$W/logs/bench.log
        [ "$run" = 1 ] || json=$W/${gpu:-gpu}-run$run.json log=$W/logs/bench-run$run.log
        if [ ! -s "$json" ]; then
            "$bench" --sections binding,npcs,cache,player,constrained,seed --npcs 1,8,16,32,64,128,255 --tokens 128 \
                --reps 5 --no-sequential --comparators "$W/comparators-all.json" --label "plan defaults, run $run" \
                --json-out "$json" 2>&1 | tee "$log" | grep -E "plan:|target" || true
        fi
        cp "$json" "$OUT/"
        python3 scripts/gpu/check-targets.py "$json" | tee "$W/logs/targets-run$run.txt"
    done
    cp "$W/logs/bench.log" "$OUT/"
    single_stream
    # Plan variants, the npcs section only, each against the same comparators
    # (one whose backends folder holds no CUDA module is skipped: the module
    # as shipped is not built with QUICK_TOOLS=off).
    i=0
    while IFS='|' read -r label envs flags; do
        i=$((i + 1))
        [ -s "$W/variant$i.json" ] && continue
        for e in $envs; do
            case $e in BEVY_NPC_LLM_BACKENDS_DIR=*)
                [ -s "${e#*=}/libggml-cuda.so" ] || { echo "variant $label skipped: no CUDA module in ${e#*=}"; continue 2; } ;;
            esac
        done
        # shellcheck disable=SC2086
        env $envs "$bench" --sections npcs --npcs 8,32,128 --tokens 128 --reps 5 --no-sequential \
            --comparators "$W/comparators-all.json" --label "$label" --json-out "$W/variant$i.json" $flags \
            2>&1 | tee "$W/logs/variant$i.log" | grep -E "plan:|generation rate|per step: wall|aggregate|TTFT|cached / uncached" || true
    done <<'VARIANTS'
rounded prompt steps off (cache section)||--sections cache --round-prompts off
rounded prompt steps on (cache section)||--sections cache --round-prompts on
rounded prompt steps off again (cache section)||--sections cache --round-prompts off
two lanes at 16 to 255 NPCs (the plan before session 15)||--lanes 2 --npcs 16,32,64,128,255
four lanes at 64 NPCs||--lanes 4 --npcs 64
eight lanes at 128 and 255 NPCs||--lanes 8 --npcs 128,255
sized for 64 (eight lanes), 8 and 16 NPCs talking||--sequences 64 --npcs 8,16
sized for 64, two lanes, 8 and 16 NPCs talking||--sequences 64 --lanes 2 --npcs 8,16
even prompt steps off||--even-prompts off
CUDA module as llama.cpp ships it (no CUDA-graph patch)|BEVY_NPC_LLM_BACKENDS_DIR=/tmp/npc-llm-dev/backends|
VARIANTS
    python3 - "$W" <<'PY'
import glob, json, sys
w = sys.argv[1]
docs = [json.load(open(f)) for f in sorted(glob.glob(f"{w}/variant*.json"))]
json.dump({"variants": docs}, open(f"{w}/variants.json", "w"), indent=1)
PY
    cp "$W/variants.json" "$OUT/"
    tar czf "$OUT/logs.tar.gz" -C "$W" logs
    ls -la "$OUT"
    ;;
*)
    echo "usage: device.sh start|stash|run|quick-start|quick|single|ttft|kv|trace|kernels CARRY_DIR" >&2; exit 2
    ;;
esac
