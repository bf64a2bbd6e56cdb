#!/usr/bin/env python3
"""Check a bench JSON (e.g. docs/bench/h100-session6.json): recompute each ratio
against llama.cpp's figures from the comparators stored in the same file, check
it equals the one the bench wrote, and print every target as met or not.

Usage: check-targets.py BENCH_JSON   (exit 1 if a recomputed ratio disagrees)
"""
import json
import re
import sys

doc = json.load(open(sys.argv[1]))
figs = {f["name"]: f for f in doc["figures"]}
comp = doc.get("comparators") or {}
bad = 0


def value(prefix):
    for name, f in figs.items():
        if name.startswith(prefix):
            return f["value"]
    return None


# Each ratio the bench writes: its name, our figure it divides, and where the
# comparator sits in the comparators JSON ("same_llama_cpp": the tools built
# from the plugin's own llama.cpp).
RATIOS = [
    (r"N=(\d+)\s+generation rate / llama-batched-bench", "N={n:<2} batched generation rate",
     None, "batched_bench_s_tg"),
    (r"N=(\d+)\s+same llama.cpp: generation rate / llama-batched-bench", "N={n:<2} batched generation rate",
     "same_llama_cpp", "batched_bench_s_tg"),
    (r"N=(\d+)\s+aggregate / llama-server -np", "N={n:<2} batched aggregate", None, "server_aggregate"),
    (r"plugin single stream / llama-bench", "plugin single-stream generation", None, "llama_bench_tg"),
    (r"plugin single stream / same llama.cpp's llama-bench", "plugin single-stream generation",
     "same_llama_cpp", "llama_bench_tg"),
]

for name, f in figs.items():
    theirs = None
    for pattern, ours_name, group, key in RATIOS:
        m = re.match(pattern, name)
        if not m:
            continue
        source = (comp.get(group) or {}) if group else comp
        if m.groups():
            n = m.group(1)
            ours = value(ours_name.format(n=int(n)))
            theirs = source.get(key, {}).get(n)
        else:
            ours = value(ours_name)
            theirs = source.get(key)
    if theirs:
        again = ours / theirs
        if abs(again - f["value"]) > 1e-6 * max(1.0, again):
            print(f"MISMATCH {name}: file {f['value']:.4f}, recomputed {again:.4f}")
            bad += 1
    if f.get("target"):
        t = f["target"]
        print(f"{'met    ' if f['met'] else 'NOT MET'} {name}: {f['value']:.3f} (target {t['op']} {t['value']})")
sys.exit(1 if bad else 0)
