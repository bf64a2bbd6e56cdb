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


for name, f in figs.items():
    m = re.match(r"N=(\d+)\s+generation rate / llama-batched-bench", name)
    theirs = None
    if m:
        n = m.group(1)
        ours = value(f"N={int(n):<2} batched generation rate")
        theirs = comp.get("batched_bench_s_tg", {}).get(n)
    m2 = re.match(r"N=(\d+)\s+aggregate / llama-server -np", name)
    if m2:
        n = m2.group(1)
        ours = value(f"N={int(n):<2} batched aggregate")
        theirs = comp.get("server_aggregate", {}).get(n)
    if name.startswith("plugin single stream / llama-bench"):
        ours = value("plugin single-stream generation")
        theirs = comp.get("llama_bench_tg")
    # The same ratios against the tools built from the plugin's own llama.cpp.
    same = comp.get("same_llama_cpp") or {}
    m3 = re.match(r"N=(\d+)\s+same llama.cpp: generation rate / llama-batched-bench", name)
    if m3:
        n = m3.group(1)
        ours = value(f"N={int(n):<2} batched generation rate")
        theirs = same.get("batched_bench_s_tg", {}).get(n)
    if name.startswith("plugin single stream / same llama.cpp's llama-bench"):
        ours = value("plugin single-stream generation")
        theirs = same.get("llama_bench_tg")
    if theirs:
        again = ours / theirs
        if abs(again - f["value"]) > 1e-6 * max(1.0, again):
            print(f"MISMATCH {name}: file {f['value']:.4f}, recomputed {again:.4f}")
            bad += 1
    if f.get("target"):
        t = f["target"]
        print(f"{'met    ' if f['met'] else 'NOT MET'} {name}: {f['value']:.3f} (target {t['op']} {t['value']})")
sys.exit(1 if bad else 0)
