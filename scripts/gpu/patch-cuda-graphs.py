#!/usr/bin/env python3
"""Patch ggml's CUDA backend (the llama.cpp of llama-cpp-sys-2, before the
CUDA module is built) so that a prompt step does not throw away the
recorded CUDA graph of the generation steps around it.

llama.cpp keeps one CUDA graph per context, keyed by the graph's first node
(which sits at the same address in every graph a context builds), and
replays it only after two calls with identical node properties. An engine
that mixes prompt steps and generation steps in one context -- every NPC
line starts with a prompt step -- therefore loses the generation graph at
each prompt and pays two slow steps after it (one launched kernel by
kernel, ~4-5 ms of host time on the H100 machine for SmolLM2-135M, then
one recorded).

The change: a decode-like graph (as many outputs as tokens: one token per
generating sequence) is keyed by its shape too (node count, tokens), so
each generation batch size keeps its own recorded graph across prompt
steps. A short prompt step with one output (at most 64 tokens: the engine
rounds a sequence's lone prompt step up to 16, 32 or 64 tokens -- the
player's next line, an NPC resuming a cached conversation) is keyed by
every node's data address too, which names the KV stream it reads, so
each sequence's rounded turns keep their own recorded graph across the
other steps of the context (about 5 ms of host time launched kernel by
kernel, most of a cached turn's time to first token). Other prompt graphs
keep llama.cpp's key. llama.cpp's warmup is unchanged (a graph is recorded
at the second call of a key with identical properties, replayed from the
third). Nothing computed changes: a graph is still replayed only when every
node's properties match (ggml also still evicts graphs unused for 10 s).

The contract with the engine: NPC_LLM_ROUNDED_MAX below is the largest
width the engine rounds a lone prompt step to (`ROUND_WIDTHS` in
src/engine/shaper.rs; a test there reads this file and fails when the two
differ). The patched module answers the backend registry's proc-address
query "ggml_backend_cuda_npc_llm_graph_patch" with that width, so the engine
knows at start whether the CUDA module it runs is patched, and for which
width (the plan rounds prompt steps on CUDA only then).

Prepared, not measured yet: GGML_CUDA_GRAPH_KEEP_S=N (read once; default 10,
llama.cpp's) keeps a recorded graph N seconds unused instead of 10 -- a
player who reads an answer for longer than 10 s before the next line finds
the NPC's rounded turn evicted and pays the kernel-by-kernel step again.

Usage: patch-cuda-graphs.py LLAMA_CPP_DIR   (fails if the code moved)
"""
import sys

import source_patch

root = sys.argv[1]
MARK = "bevy_npc_llm patch"
# The largest width the engine rounds a lone prompt step to (see above).
NPC_LLM_ROUNDED_MAX = 64


def patch(path, edits):
    source_patch.patch(root, MARK, path, edits)


patch(
    "ggml/src/ggml-cuda/ggml-cuda.cu",
    [
        (
            "static const void * ggml_cuda_graph_get_key(ggml_cgraph * cgraph) {\n"
            "    return cgraph->nodes[0];\n"
            "}\n",
            "static const void * ggml_cuda_graph_get_key(ggml_cgraph * cgraph) {\n"
            f"    // {MARK}: a decode-like graph (as many outputs as tokens) is keyed by its\n"
            "    // shape too, so prompt steps in between do not evict the recorded generation graph\n"
            "    const ggml_tensor * first = cgraph->nodes[0];\n"
            "    const ggml_tensor * last  = cgraph->nodes[cgraph->n_nodes - 1];\n"
            "    if (first->ne[1] != last->ne[1]) {\n"
            f"        if (first->ne[1] > {NPC_LLM_ROUNDED_MAX} || last->ne[1] != 1) {{\n"
            "            return first;\n"
            "        }\n"
            "        // a short prompt step ending one sequence's prompt (the engine rounds these to\n"
            "        // 16/32/64 tokens): keyed by its nodes' addresses too, i.e. by the KV stream it reads\n"
            "        uint64_t k = 0xcbf29ce484222325ull ^ (uint64_t) cgraph->n_nodes;\n"
            "        for (int i = 0; i < cgraph->n_nodes; i++) {\n"
            "            k = (k ^ (uint64_t) (uintptr_t) cgraph->nodes[i]->data) * 0x100000001b3ull;\n"
            "        }\n"
            "        k = (k ^ (uint64_t) first->ne[1]) * 0x100000001b3ull;\n"
            "        return (const void *) ((uintptr_t) first ^ (uintptr_t) (k | 1));\n"
            "    }\n"
            "    uint64_t h = (uint64_t) cgraph->n_nodes * 0x9E3779B97F4A7C15ull ^ (uint64_t) first->ne[1];\n"
            "    return (const void *) ((uintptr_t) first ^ (uintptr_t) ((h + 1) * 0x9E3779B97F4A7C15ull));\n"
            "}\n",
        ),
        (
            "static void * ggml_backend_cuda_reg_get_proc_address(ggml_backend_reg_t reg, const char * name) {\n"
            "    GGML_UNUSED(reg);\n",
            "static void * ggml_backend_cuda_reg_get_proc_address(ggml_backend_reg_t reg, const char * name) {\n"
            "    GGML_UNUSED(reg);\n"
            f"    // {MARK}: the engine asks whether this module is patched, and for which width\n"
            "    if (strcmp(name, \"ggml_backend_cuda_npc_llm_graph_patch\") == 0) {\n"
            f"        return (void *) (uintptr_t) {NPC_LLM_ROUNDED_MAX};\n"
            "    }\n",
        ),
    ],
)

patch(
    "ggml/src/ggml-cuda/common.cuh",
    [
        (
            "                if (time_now - it->second->last_used_time >= 10'000'000) {\n",
            f"                // {MARK}: GGML_CUDA_GRAPH_KEEP_S seconds (default 10) unused before eviction\n"
            "                static const int64_t keep_us = [] {\n"
            "                    const char * s = getenv(\"GGML_CUDA_GRAPH_KEEP_S\");\n"
            "                    const long long v = s ? atoll(s) : 0;\n"
            "                    return (int64_t) (v > 0 ? v : 10) * 1'000'000;\n"
            "                }();\n"
            "                if (time_now - it->second->last_used_time >= keep_us) {\n",
        ),
    ],
)
