#!/usr/bin/env python3
"""Patch ggml's CUDA backend (the llama.cpp of llama-cpp-sys-2, before the
CUDA module is built) so that the feed-forward's gate and up products and
their GLU run as one kernel for 2 to 8 tokens too, not only for one token --
switched on at run time with GGML_CUDA_FUSE_MMVQ_COLS=1, off by default (an
experiment to measure).

Why: for 1 to 8 tokens a step llama.cpp multiplies with its matrix-vector
kernels (`mmvq`). For one token it fuses gate, up and the GLU into one
kernel that quantises the activations once; from 2 tokens on
(`ggml_cuda_should_fuse_mul_mat_vec_q`: "we only support fusion for
ncols_dst = 1") the step launches two quantisations, two products and the
GLU instead: a 4- or 8-token step of SmolLM2-135M launches 725 kernels where
a one-token step launches 517 (docs/BENCHMARKS.md, session 11), and in a
replayed CUDA graph every node costs the device a launch's worth of time.
The kernel itself is written for any column count (its gate accumulators,
shared memory and GLU epilogue loop over the columns); only the fused
template instances for more than one column are missing, and the host
check refuses them.

The change, for the plain gate/up/GLU pattern only (no biases, no scales,
no expert ids) and the common weight types (q4_0, q4_1, q8_0, q4_K, q5_K,
q6_K; gate and up of one type and layout): the fused kernel is instantiated
for 2 to 8 columns, and the pattern is fused for those column counts when
the switch is on. 3 launches fewer per layer (one quantisation, one product,
the GLU). Nothing computed changes: the fused kernel accumulates each
product in the same order as the unfused one, and its epilogue applies the
same `ggml_cuda_op_silu_single` (resp. gelu) the GLU kernel applies.

Usage: patch-mmvq-fusion.py LLAMA_CPP_DIR   (fails if the code moved)
"""
import sys

import source_patch

root = sys.argv[1]
MARK = "bevy_npc_llm mmvq-fusion patch"
TYPES = ("GGML_TYPE_Q4_0", "GGML_TYPE_Q4_1", "GGML_TYPE_Q8_0", "GGML_TYPE_Q4_K", "GGML_TYPE_Q5_K", "GGML_TYPE_Q6_K")
TYPE_TEST = " || ".join(f"type == {t}" for t in TYPES)


def patch(path, edits):
    source_patch.patch(root, MARK, path, edits)


patch(
    "ggml/src/ggml-cuda/mmvq.cuh",
    [
        (
            "#define MMVQ_MAX_BATCH_SIZE 8 // Max. batch size for which to use MMVQ kernels.\n",
            "#define MMVQ_MAX_BATCH_SIZE 8 // Max. batch size for which to use MMVQ kernels.\n"
            "\n"
            f"// {MARK}: weight types whose fused gate/up/GLU kernel is instantiated\n"
            "// for 2 to MMVQ_MAX_BATCH_SIZE columns (GGML_CUDA_FUSE_MMVQ_COLS=1).\n"
            "static constexpr __host__ __device__ bool ggml_cuda_mmvq_fuse_cols_type(ggml_type type) {\n"
            f"    return {TYPE_TEST};\n"
            "}\n",
        ),
    ],
)

patch(
    "ggml/src/ggml-cuda/mmvq.cu",
    [
        (
            "    if constexpr (c_ncols_dst == 1) {\n"
            "        if (has_fusion) {\n",
            f"    // {MARK}: fused instances for 2 to 8 columns too (common types)\n"
            "    if constexpr (c_ncols_dst == 1 || ggml_cuda_mmvq_fuse_cols_type(type)) {\n"
            "        if (has_fusion) {\n",
        ),
        (
            "        GGML_ASSERT(  ids || dst->ne[1] == 1);\n",
            f"        // {MARK}: plain gate/up/GLU fusion for up to 8 columns\n"
            "        GGML_ASSERT(  ids || dst->ne[1] == 1 ||\n"
            "                    (dst->ne[1] <= MMVQ_MAX_BATCH_SIZE && ggml_cuda_mmvq_fuse_cols_type(src0->type) &&\n"
            "                     fusion->gate && !fusion->x_bias && !fusion->gate_bias && !fusion->x_scale &&\n"
            "                     !fusion->gate_scale && !fusion->shared_up));\n",
        ),
    ],
)

patch(
    "ggml/src/ggml-cuda/ggml-cuda.cu",
    [
        (
            "static bool ggml_cuda_match_shared_expert(",
            f"// {MARK}: whether the plain gate/up/GLU pattern (UP, GATE: the two\n"
            "// products, no biases or scales) may run as one mmvq kernel for 2 to 8\n"
            "// columns (GGML_CUDA_FUSE_MMVQ_COLS=1; one column is fused as shipped).\n"
            "static bool ggml_cuda_should_fuse_mul_mat_vec_q_cols(const ggml_tensor * up, const ggml_tensor * gate) {\n"
            "    static const bool enabled = [] {\n"
            "        const char * env = getenv(\"GGML_CUDA_FUSE_MMVQ_COLS\");\n"
            "        return env != nullptr && atoi(env) != 0;\n"
            "    }();\n"
            "    if (!enabled || up->op != GGML_OP_MUL_MAT || gate->op != GGML_OP_MUL_MAT || up->src[2] != nullptr) {\n"
            "        return false;\n"
            "    }\n"
            "    const ggml_tensor * src0 = up->src[0];\n"
            "    const ggml_tensor * src1 = up->src[1];\n"
            "    if (up->ne[1] < 2 || up->ne[1] > MMVQ_MAX_BATCH_SIZE || !ggml_cuda_mmvq_fuse_cols_type(src0->type) ||\n"
            "            gate->src[0]->type != src0->type || !ggml_are_same_stride(gate->src[0], src0) ||\n"
            "            gate->src[1] != src1) {\n"
            "        return false;\n"
            "    }\n"
            "    const bool bad_padding_clear = ggml_backend_buffer_get_usage(src0->buffer) == GGML_BACKEND_BUFFER_USAGE_COMPUTE &&\n"
            "                                   ggml_nbytes(src0) != ggml_backend_buffer_get_alloc_size(src0->buffer, src0) &&\n"
            "                                   src0->view_src;\n"
            "    const int cc = ggml_cuda_info().devices[ggml_cuda_get_device()].cc;\n"
            "    return !bad_padding_clear && cc > GGML_CUDA_CC_PASCAL && src1->type == GGML_TYPE_F32 &&\n"
            "           up->type == GGML_TYPE_F32 && gate->type == GGML_TYPE_F32;\n"
            "}\n"
            "\n"
            "static bool ggml_cuda_match_shared_expert(",
        ),
        (
            "            if (ggml_cuda_should_fuse_mul_mat_vec_q(up)) {\n",
            f"            // {MARK}: or 2 to 8 columns, when switched on\n"
            "            if (ggml_cuda_should_fuse_mul_mat_vec_q(up) || ggml_cuda_should_fuse_mul_mat_vec_q_cols(up, gate)) {\n",
        ),
    ],
)
