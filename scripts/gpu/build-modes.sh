#!/usr/bin/env bash
# On the NVIDIA machine: is the gap between llama.cpp's tools of
# llama-cpp-python 0.3.36 ("old", the issue's comparator) and the same tools
# built from the plugin's llama.cpp ("same") the llama.cpp version, or how
# each is built? The old tools are linked statically; the plugin (and
# "same") load ggml's CUDA backend as a module (GGML_BACKEND_DL).
#   build-modes.sh build W   builds the old llama.cpp twice, in the
#                            background: static (as device.sh's `run`) and
#                            as a loadable CUDA module (as the plugin's)
#   build-modes.sh wait W    waits for every build of the sitting (call
#                            it again while it says "still running")
#   build-modes.sh run W OUT comparators.py's llama-bench tg128 and
#                            llama-batched-bench B = 1, 8, 32 for every
#                            build, alternating, two rounds; a JSON summary
#                            (modes.jsonl) and each run's figures in OUT
# W is device.sh's work folder (its module build gives "same").
set -euo pipefail
cmd=$1 W=$2
src=$W/in/llama-tools-src.tar.gz
case $cmd in
build)
    mkdir -p "$W/modes" "$W/logs"
    for mode in static dl; do
        setsid nohup bash -c "
            set -e
            mkdir -p '$W/modes/$mode-src' && tar xzf '$src' -C '$W/modes/$mode-src'
            if [ $mode = static ]; then
                flags='-DBUILD_SHARED_LIBS=OFF'; targets='llama-bench llama-batched-bench'
            else
                flags='-DBUILD_SHARED_LIBS=ON -DGGML_BACKEND_DL=ON'; targets='ggml-cuda ggml-cpu llama-bench llama-batched-bench'
            fi
            cmake -S '$W/modes/$mode-src/llama.cpp' -B '$W/modes/$mode-build' -G Ninja -DCMAKE_BUILD_TYPE=Release \
                -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 -DGGML_NATIVE=OFF \$flags \
                -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=OFF \
                -DLLAMA_CURL=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_UI=OFF
            cmake --build '$W/modes/$mode-build' --target \$targets -j8
            mkdir -p '$W/modes/$mode'
            cp '$W/modes/$mode-build/bin/'llama-bench '$W/modes/$mode-build/bin/'llama-batched-bench '$W/modes/$mode/'
            find '$W/modes/$mode-build' \( -name 'lib*.so' -o -name 'lib*.so.*' \) -exec cp -P {} '$W/modes/$mode/' \;
            touch '$W/modes-$mode.done'
        " >"$W/logs/modes-$mode-build.log" 2>&1 </dev/null || touch "$W/modes-$mode.failed" &
    done
    sleep 1
    echo "old llama.cpp: static and module builds started"
    ;;
wait)
    # Every build of the sitting (device.sh's module build too) done, or
    # this call's time is up: measurements never share the CPU with a build.
    for _ in $(seq 1 550); do
        n=0
        for f in cuda modes-static modes-dl; do
            [ -e "$W/$f.done" ] && n=$((n + 1))
            [ -e "$W/$f.failed" ] && { echo "$f failed"; tail -20 "$W/logs/$f-build.log" "$W/logs/$f.log" 2>/dev/null; exit 1; }
        done
        [ "$n" = 3 ] && { echo "all builds done"; exit 0; }
        sleep 1
    done
    echo "builds still running"
    ;;
run)
    out=$3
    model=$(pwd)/assets/models/SmolLM2-135M-Instruct.Q4_1.gguf
    for f in modes-static modes-dl; do
        [ -e "$W/$f.done" ] || { echo "$f build not done: call wait first"; exit 1; }
    done
    declare -A dirs=([old-static]=$W/modes/static [old-module]=$W/modes/dl
        [same-module]=$W/backends/same-tools [same-module-patched]=$W/backends/same-tools-patched)
    mkdir -p "$out"
    : >"$out/modes.jsonl"
    for round in 1 2; do
        for name in old-static old-module same-module same-module-patched; do
            d=${dirs[$name]}
            [ -x "$d/llama-bench" ] || { echo "no $name"; continue; }
            # comparators.py's llama-bench and llama-batched-bench, no server.
            LD_LIBRARY_PATH=$d python3 -u "$(dirname "$0")/comparators.py" "$d" "$model" \
                "$out/$name-$round.json" "$out/logs/$name-$round" 1,8,32 - >/dev/null
            python3 -c "import json, sys; d = json.load(open(sys.argv[1])); print(json.dumps({'round': int(sys.argv[2]),
                'build': sys.argv[3], 'llama_bench_tg': d.get('llama_bench_tg'), 'batched_bench_s_tg': d['batched_bench_s_tg']}))" \
                "$out/$name-$round.json" "$round" "$name" | tee -a "$out/modes.jsonl"
        done
    done
    ;;
*)
    echo "usage: build-modes.sh build|wait|run W [OUT]" >&2; exit 2
    ;;
esac
