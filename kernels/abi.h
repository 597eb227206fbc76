/* Host/device ABI of the engine's CUDA kernels: parameter structs passed by value to kernels
 * and the constants both sides must agree on. bindgen turns this file into src/cuda/abi.rs
 * (build.rs checks the two agree); kernels/abi_check.c asserts the sizes on the C side and
 * exports them for the Rust layout tests. Plain C, fixed-width fields, no padding holes. */
#ifndef ENGINE_ABI_H
#define ENGINE_ABI_H

#include <stdint.h>

#define ENGINE_ABI_VERSION 1
/* NF4: values per block of the flattened weight, and absmax values per nested block. */
#define ENGINE_NF4_BLOCK 64
#define ENGINE_ABSMAX_BLOCK 256

/* Activation/weight storage types (the `_dtype` suffix of a kernel name). */
#define ENGINE_DTYPE_F32 0
#define ENGINE_DTYPE_BF16 1
#define ENGINE_DTYPE_F16 2

/* Causal self-attention over a packed batch: rows are delimited by cu_seqlens[num_rows + 1]. */
typedef struct engine_attention_params {
    int32_t n_heads;
    int32_t n_kv_heads;
    int32_t head_dim;
    int32_t num_rows;
    int32_t total_tokens;
    int32_t max_len;  /* longest row */
    int32_t window;   /* sliding window (keys i - window < j <= i); 0: none */
    float scale;      /* multiplies q.k */
    float softcap;    /* cap * tanh(s / cap) on the scaled logits; 0: none */
    int32_t reserved;
} engine_attention_params;

/* y[m, n] = x[m, k] . W[n, k]^T  (+ lora_scale * h[m, r] . B[n, r]^T)
 * W is dense (weight dtype) or NF4 (packed codes, absmax per ENGINE_NF4_BLOCK of the flattened
 * weight; with double quantisation absmax[b] = code8[q[b]] * absmax2[b / ENGINE_ABSMAX_BLOCK]
 * + absmax_offset). */
typedef struct engine_matmul_params {
    int32_t m;
    int32_t n;
    int32_t k;
    int32_t lora_rank;     /* 0: no LoRA path */
    float lora_scale;
    int32_t double_quant;  /* 0: absmax is f32 per block; 1: nested 8-bit absmax */
    float absmax_offset;
    int32_t reserved;
} engine_matmul_params;

/* RMSNorm of rows of width `hidden`: y = x * rsqrt(mean(x^2) + eps) * (one_plus_weight ? 1 + w : w). */
typedef struct engine_norm_params {
    int32_t rows;
    int32_t hidden;
    float eps;
    int32_t one_plus_weight;
} engine_norm_params;

#ifdef __cplusplus
static_assert(sizeof(engine_attention_params) == 40, "engine_attention_params layout");
static_assert(sizeof(engine_matmul_params) == 32, "engine_matmul_params layout");
static_assert(sizeof(engine_norm_params) == 16, "engine_norm_params layout");
#else
_Static_assert(sizeof(engine_attention_params) == 40, "engine_attention_params layout");
_Static_assert(sizeof(engine_matmul_params) == 32, "engine_matmul_params layout");
_Static_assert(sizeof(engine_norm_params) == 16, "engine_norm_params layout");
#endif

#endif /* ENGINE_ABI_H */
