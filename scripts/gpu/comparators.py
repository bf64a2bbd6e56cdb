#!/usr/bin/env python3
"""llama.cpp's own figures for the bench's GPU ratios, on this machine.

Runs llama-bench (single-stream generation), llama-batched-bench (decode-only
generation rate S_TG per B) and llama-server -np N under N concurrent
streaming /completion clients with the bench's sampling, and writes one JSON:

  {"llama_bench_tg": tok/s, "batched_bench_s_tg": {"8": tok/s, ...},
   "server_aggregate": {"8": tok/s, ...}, "settings": {...}}

Usage: comparators.py TOOLS_BIN MODEL OUT_JSON LOG_DIR [B,B,...] [N,N,...|-]
Standard library only (the device machine has no internet).
"""
import http.client
import json
import os
import subprocess
import sys
import threading
import time

bin_dir, model, out_json, log_dir = sys.argv[1:5]
os.makedirs(log_dir, exist_ok=True)
batches = [int(b) for b in (sys.argv[5] if len(sys.argv) > 5 else "1,8,16,32,64,128,255").split(",")]
# "-": no llama-server run (a tools build without the server).
servers = [int(n) for n in (sys.argv[6] if len(sys.argv) > 6 else "1,8,32,128").split(",") if n not in ("", "-")]
TG = 128
# The bench's sampling for this model (registry values over the settings).
SAMPLING = dict(temperature=0.7, top_k=40, top_p=0.9, min_p=0.05, repeat_penalty=1.15, repeat_last_n=64)
TOPICS = ["bread", "swords", "flowers", "rain", "cats", "boats", "songs", "stars", "wheat", "wolves",
          "rivers", "lanterns", "honey", "bells", "maps", "owls"]
result = {"settings": {"tg": TG, "npp": 256, "sampling": SAMPLING, "ngl": 99,
                       "note": "flash attention and KV layout: llama.cpp's defaults (see the logs)"}}


def log(name):
    return open(os.path.join(log_dir, name), "w")


def run(cmd, logname):
    print("$", " ".join(cmd), flush=True)
    with log(logname) as f:
        p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=f, text=True)
        f.write(p.stdout)
    return p.stdout


# 1. llama-bench: generation of 128 tokens, one stream.
out = run([f"{bin_dir}/llama-bench", "-m", model, "-ngl", "99", "-p", "0", "-n", str(TG), "-r", "5", "-o", "json"],
          "llama-bench.log")
try:
    rows = json.loads(out)
    result["llama_bench_tg"] = max(r["avg_ts"] for r in rows if r.get("n_gen") == TG)
except Exception as e:  # keep going: the other comparators still count
    print("llama-bench output not understood:", e)

# 2. llama-batched-bench: decode-only generation rate per B.
ctx = max(batches) * (256 + TG) + 1024
out = run([f"{bin_dir}/llama-batched-bench", "-m", model, "-ngl", "99", "-c", str(ctx), "-b", "2048", "-ub", "512",
           "-npp", "256", "-ntg", str(TG), "-npl", ",".join(map(str, batches)), "--output-format", "jsonl"],
          "llama-batched-bench.log")
result["batched_bench_s_tg"] = {}
for line in out.splitlines():
    line = line.strip()
    if line.startswith("{") and "speed_tg" in line:
        r = json.loads(line)
        result["batched_bench_s_tg"][str(r["pl"])] = r["speed_tg"]
print("batched-bench S_TG:", result["batched_bench_s_tg"], flush=True)


# 3. llama-server -np N, N concurrent streaming clients.
def client(port, i, tokens, errors):
    topic = TOPICS[i % 16]
    prompt = (f"<|im_start|>system\nYou are villager number {i}. You talk about {topic} all day.<|im_end|>\n"
              f"<|im_start|>user\nTell me everything about {topic}.<|im_end|>\n<|im_start|>assistant\n")
    body = dict(prompt=prompt, n_predict=TG, ignore_eos=True, stream=True, cache_prompt=False, **SAMPLING)
    try:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
        c.request("POST", "/completion", json.dumps(body), {"Content-Type": "application/json"})
        r = c.getresponse()
        n = 0
        for raw in r:
            raw = raw.strip()
            if raw.startswith(b"data:"):
                ev = json.loads(raw[5:])
                if ev.get("stop"):
                    n = ev.get("tokens_predicted", n)
                elif ev.get("content") is not None:
                    n += 1
        tokens[i] = n
    except Exception as e:
        errors.append(repr(e))


result["server_aggregate"] = {}
for n in servers:
    port = 8090
    srv_log = log(f"llama-server-np{n}.log")
    srv = subprocess.Popen([f"{bin_dir}/llama-server", "-m", model, "-ngl", "99", "-np", str(n), "-c", str(n * 512),
                            "--port", str(port)], stdout=srv_log, stderr=subprocess.STDOUT)
    try:
        for _ in range(600):
            try:
                c = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
                c.request("GET", "/health")
                if c.getresponse().status == 200:
                    break
            except Exception:
                pass
            time.sleep(0.1)
        # Warm-up request (first decodes allocate), as our bench does.
        client(port, 0, [0], [])
        best = 0.0
        for rep in range(2):
            tokens, errors = [0] * n, []
            ts = [threading.Thread(target=client, args=(port, i, tokens, errors)) for i in range(n)]
            t0 = time.perf_counter()
            for t in ts:
                t.start()
            for t in ts:
                t.join()
            wall = time.perf_counter() - t0
            agg = sum(tokens) / wall
            print(f"llama-server -np {n}: {sum(tokens)} tokens in {wall:.2f} s = {agg:.1f} tok/s, errors {errors[:2]}",
                  flush=True)
            best = max(best, agg)
        result["server_aggregate"][str(n)] = best
    finally:
        srv.terminate()
        srv.wait()
        srv_log.close()

with open(out_json, "w") as f:
    json.dump(result, f, indent=2)
print(json.dumps(result, indent=2))
