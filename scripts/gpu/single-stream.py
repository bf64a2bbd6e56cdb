#!/usr/bin/env python3
"""Single stream against llama-bench tg, paired: ROUNDS rounds on one machine,
each running every llama-bench (tg128, 5 repetitions) and the plugin's bench
(binding section: five greedy 128-token generations) back to back, the order
reversed every other round so a drift of the machine (clocks, other tenants)
falls on both sides alike. Each side's figure in a round is a median (of
llama-bench's five samples; of the bench's five runs), and each round gives
one ratio per comparator; the result is the median of those ratios, with
their spread. One llama-bench figure taken once at the start of a sitting
(as `comparators.py` does for the bench's own ratio) moved 840-955 tok/s
within one sitting on the same H100, more than the 5 % the target allows.

Usage: single-stream.py OUT_JSON MODEL BENCH ROUNDS LABEL=DIR [LABEL=DIR ...]
  DIR: a folder with llama-bench (and its shared libraries, if any).
  The bench runs with the environment it is given (BEVY_NPC_LLM_BACKENDS_DIR
  etc.). Writes the rounds, each ratio, the medians and the targets.
"""
import json
import os
import statistics
import subprocess
import sys
import tempfile

out_json, model, bench, rounds = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
tools = [a.split("=", 1) for a in sys.argv[5:]]
TG = 128
TARGET = 0.95


def llama_bench(folder):
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = folder + ":" + env.get("LD_LIBRARY_PATH", "")
    p = subprocess.run([f"{folder}/llama-bench", "-m", model, "-ngl", "99", "-p", "0", "-n", str(TG),
                        "-r", "5", "-o", "json"], capture_output=True, text=True, env=env)
    rows = [r for r in json.loads(p.stdout) if r.get("n_gen") == TG]
    return statistics.median(rows[0]["samples_ts"])


def plugin(i):
    with tempfile.NamedTemporaryFile(suffix=".json") as t:
        subprocess.run([bench, "--sections", "binding", "--tokens", str(TG), "--label", f"single stream round {i}",
                        "--json-out", t.name], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        doc = json.load(open(t.name))
    return next(f["value"] for f in doc["figures"] if f["name"].startswith("plugin single-stream generation"))


result = {"settings": {"tg": TG, "rounds": rounds, "llama_bench": "-ngl 99 -p 0 -n 128 -r 5, median of its samples",
                       "plugin": "bench --sections binding: median of 5 greedy generations of 128 tokens"},
          "rounds": []}
for i in range(1, rounds + 1):
    order = [("plugin", None)] + [(label, d) for label, d in tools]
    if i % 2:
        order.reverse()
    row = {}
    for label, d in order:
        try:
            row[label] = plugin(i) if d is None else llama_bench(d)
        except Exception as e:  # keep the other rounds
            print(f"round {i}: {label} failed: {e}", flush=True)
    for label, _ in tools:
        if "plugin" in row and label in row:
            row[f"plugin / {label}"] = row["plugin"] / row[label]
    result["rounds"].append(row)
    print(f"round {i}: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items()), flush=True)

result["targets"] = []
for label, _ in tools:
    ratios = [r[f"plugin / {label}"] for r in result["rounds"] if f"plugin / {label}" in r]
    if not ratios:
        continue
    med = statistics.median(ratios)
    result["targets"].append({
        "name": f"plugin single stream / {label} llama-bench tg, median of {len(ratios)} paired rounds",
        "value": med, "min": min(ratios), "max": max(ratios), "target": f">= {TARGET}", "met": med >= TARGET,
    })
    print(f"{'met    ' if med >= TARGET else 'NOT MET'} plugin single stream / {label} llama-bench tg: "
          f"median {med:.3f} of {len(ratios)} paired rounds (min {min(ratios):.3f}, max {max(ratios):.3f}; "
          f"target >= {TARGET})", flush=True)
json.dump(result, open(out_json, "w"), indent=1)
