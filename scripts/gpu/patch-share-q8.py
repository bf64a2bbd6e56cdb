#!/usr/bin/env python3
"""Patch ggml's CUDA backend (the llama.cpp of llama-cpp-sys-2, before the
CUDA module is built) so that matrix-vector products of the same
activations share one quantisation of them -- on by default since the H100
sittings of session 12 (docs/BENCHMARKS.md: single stream 2-3.5 % faster, no
change beyond the noise from 8 NPCs on, greedy texts identical with and
without); GGML_CUDA_SHARE_Q8_1=0 switches it off at run time.

Why: for 1 to 8 tokens a step llama.cpp multiplies with its matrix-vector
kernels (`mmvq`), and each product first quantises its activations to q8_1
in a kernel of its own. The attention's q, k and v products read the same
activations, and so do the feed-forward's gate and up products (fused into
one kernel only for one token), so a 4- or 8-token step of SmolLM2-135M
launches 725 kernels of which 90 quantise what an earlier kernel of the
step has just quantised (docs/BENCHMARKS.md, session 11). In a replayed
CUDA graph every node costs the device a launch's worth of time however
little it computes.

The change: the plain product (no fusion, no expert ids, main stream, no
concurrent streams) quantises into a buffer of the backend context's own
instead of a pool allocation and remembers which tensor (and data address,
and weight type) it holds; the next such product of the same tensor skips
its quantisation. The memory is forgotten at the start of every graph
evaluation (a reused graph's tensors hold new values each step) and as soon
as a node about to run writes to the remembered tensor's memory. The buffer
has a fixed size (at least 1 MiB, allocated outside graph capture) and is
never reallocated: recorded CUDA graphs hold its address. Nothing computed
changes: the skipped kernel would have written the same bytes.

Usage: patch-share-q8.py LLAMA_CPP_DIR   (fails if the code moved)
"""
import sys

import source_patch

root = sys.argv[1]
MARK = "bevy_npc_llm share-q8 patch"


def patch(path, edits):
    source_patch.patch(root, MARK, path, edits)


patch(
    "ggml/src/ggml-cuda/common.cuh",
    [
        (
            "    explicit ggml_backend_cuda_context(int device) :\n",
            f"    // {MARK}: the q8_1 copy of the activations of the last plain\n"
            "    // matrix-vector product, for the next products of the same tensor\n"
            "    // (on unless GGML_CUDA_SHARE_Q8_1=0). A fixed buffer, never reallocated:\n"
            "    // recorded CUDA graphs hold its address.\n"
            "    const ggml_tensor * share_q8_src1 = nullptr;\n"
            "    const void *        share_q8_data = nullptr;\n"
            "    int                 share_q8_type = -1;\n"
            "    void *              share_q8_buf  = nullptr;\n"
            "    size_t              share_q8_size = 0;\n"
            "\n"
            "    explicit ggml_backend_cuda_context(int device) :\n",
        ),
    ],
)

patch(
    "ggml/src/ggml-cuda/ggml-cuda.cu",
    [
        (
            "    if (copy_event != nullptr) {\n"
            "        CUDA_CHECK(cudaEventDestroy(copy_event));\n"
            "    }\n",
            "    if (copy_event != nullptr) {\n"
            "        CUDA_CHECK(cudaEventDestroy(copy_event));\n"
            "    }\n"
            f"    if (share_q8_buf != nullptr) {{ // {MARK}\n"
            "        ggml_cuda_set_device(device);\n"
            "        CUDA_CHECK(cudaFree(share_q8_buf));\n"
            "    }\n",
        ),
        (
            "    while (!graph_evaluated_or_captured) {\n"
            "        // Only perform the graph execution if CUDA graphs are not enabled, or we are capturing the graph.\n"
            "        // With the use of CUDA graphs, the execution will be performed by the graph launch.\n"
            "        if (!use_cuda_graph || cuda_graph_update_required) {\n"
            "            [[maybe_unused]] int prev_i = 0;\n",
            "    while (!graph_evaluated_or_captured) {\n"
            "        // Only perform the graph execution if CUDA graphs are not enabled, or we are capturing the graph.\n"
            "        // With the use of CUDA graphs, the execution will be performed by the graph launch.\n"
            "        if (!use_cuda_graph || cuda_graph_update_required) {\n"
            "            [[maybe_unused]] int prev_i = 0;\n"
            f"            // {MARK}: a reused graph's tensors hold new values: forget the\n"
            "            // shared quantisation; then forget it when a node about to run\n"
            "            // writes to its tensor's memory (nodes fused into an earlier one\n"
            "            // are checked before the next node runs, ahead of any later reader).\n"
            "            cuda_ctx->share_q8_src1 = nullptr;\n"
            "            int share_q8_checked = 0;\n"
            "            const auto share_q8_forget_written = [&](int upto) {\n"
            "                for (; share_q8_checked <= upto && cuda_ctx->share_q8_src1 != nullptr; ++share_q8_checked) {\n"
            "                    const ggml_tensor * w = cgraph->nodes[share_q8_checked];\n"
            "                    if (ggml_cuda_is_view_or_noop(w) || w->data == nullptr) {\n"
            "                        continue;\n"
            "                    }\n"
            "                    const char * s0 = (const char *) cuda_ctx->share_q8_data;\n"
            "                    const char * s1 = s0 + ggml_nbytes(cuda_ctx->share_q8_src1);\n"
            "                    const char * w0 = (const char *) w->data;\n"
            "                    const char * w1 = w0 + ggml_nbytes(w);\n"
            "                    if (w0 < s1 && s0 < w1) {\n"
            "                        cuda_ctx->share_q8_src1 = nullptr;\n"
            "                    }\n"
            "                }\n"
            "                share_q8_checked = std::max(share_q8_checked, upto + 1);\n"
            "            };\n",
        ),
        (
            "                prev_i = i;\n"
            "\n"
            "                if (ggml_cuda_is_view_or_noop(node)) {\n"
            "                    continue;\n"
            "                }\n",
            "                prev_i = i;\n"
            f"                share_q8_forget_written(i); // {MARK}\n"
            "\n"
            "                if (ggml_cuda_is_view_or_noop(node)) {\n"
            "                    continue;\n"
            "                }\n",
        ),
    ],
)

patch(
    "ggml/src/ggml-cuda/mmvq.cu",
    [
        (
            "    const int64_t ne10_padded = GGML_PAD(ne10, MATRIX_ROW_PADDING);\n"
            "    ggml_cuda_pool_alloc<char> src1_q8_1(ctx.pool(), ne13*ne12 * ne11*ne10_padded * sizeof(block_q8_1)/QK8_1);\n"
            "    {\n"
            "        const int64_t s11 = src1->nb[1] / ts_src1;\n"
            "        const int64_t s12 = src1->nb[2] / ts_src1;\n"
            "        const int64_t s13 = src1->nb[3] / ts_src1;\n"
            "        quantize_row_q8_1_cuda(src1_d, nullptr, src1_q8_1.get(), src0->type, ne10, s11, s12, s13, ne10_padded, ne11, ne12, ne13, stream);\n"
            "    }\n",
            "    const int64_t ne10_padded = GGML_PAD(ne10, MATRIX_ROW_PADDING);\n"
            "    const size_t  q8_size     = ne13*ne12 * ne11*ne10_padded * sizeof(block_q8_1)/QK8_1;\n"
            f"    // {MARK}: a plain product on the main stream quantises into the\n"
            "    // context's buffer and remembers the tensor; the next plain product of the\n"
            "    // same tensor (and weight type) reuses it (see ggml-cuda.cu for when it is forgotten)\n"
            "    static const bool share_q8 = [] {\n"
            "        const char * env = getenv(\"GGML_CUDA_SHARE_Q8_1\");\n"
            "        return env == nullptr || atoi(env) != 0;\n"
            "    }();\n"
            "    const bool shareable = share_q8 && fusion == nullptr && ids == nullptr && ctx.curr_stream_no == 0 &&\n"
            "                           ctx.stream_context().concurrent_events.empty();\n"
            "    if (shareable && ctx.share_q8_buf == nullptr) {\n"
            "        cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;\n"
            "        CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));\n"
            "        if (capture == cudaStreamCaptureStatusNone) {\n"
            "            ctx.share_q8_size = std::max<size_t>(q8_size, 1u << 20);\n"
            "            CUDA_CHECK(cudaMalloc(&ctx.share_q8_buf, ctx.share_q8_size));\n"
            "        }\n"
            "    }\n"
            "    const bool use_shared = shareable && ctx.share_q8_buf != nullptr && q8_size <= ctx.share_q8_size;\n"
            "    const bool reuse = use_shared && ctx.share_q8_src1 == src1 && ctx.share_q8_data == src1->data &&\n"
            "                       ctx.share_q8_type == (int) src0->type;\n"
            "    ggml_cuda_pool_alloc<char> src1_q8_1_pool(ctx.pool());\n"
            "    char * src1_q8_1_ptr = use_shared ? (char *) ctx.share_q8_buf : src1_q8_1_pool.alloc(q8_size);\n"
            "    if (!reuse) {\n"
            "        const int64_t s11 = src1->nb[1] / ts_src1;\n"
            "        const int64_t s12 = src1->nb[2] / ts_src1;\n"
            "        const int64_t s13 = src1->nb[3] / ts_src1;\n"
            "        quantize_row_q8_1_cuda(src1_d, nullptr, src1_q8_1_ptr, src0->type, ne10, s11, s12, s13, ne10_padded, ne11, ne12, ne13, stream);\n"
            "        if (use_shared) {\n"
            "            ctx.share_q8_src1 = src1;\n"
            "            ctx.share_q8_data = src1->data;\n"
            "            ctx.share_q8_type = (int) src0->type;\n"
            "        }\n"
            "    }\n",
        ),
        (
            "    mul_mat_vec_q_switch_type(\n"
            "        src0->data, src0->type, src1_q8_1.get(), ids_d, fusion_local, dst_d, ne00,\n",
            "    mul_mat_vec_q_switch_type(\n"
            "        src0->data, src0->type, src1_q8_1_ptr, ids_d, fusion_local, dst_d, ne00,\n",
        ),
    ],
)
