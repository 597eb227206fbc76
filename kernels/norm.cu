// RMSNorm and its fusions with the residual add, one block per row, f32 arithmetic:
//   rms_norm:       y = norm_w(x)
//   add_rms_norm:   s = x + a;          y = norm_w(s)      (Llama: residual, then next norm)
//   norm_add_norm:  s = x + norm_w1(a); y = norm_w2(s)     (Gemma: post-norm, residual, pre-norm)
// norm_w(v) = v * rsqrt(mean(v^2) + eps) * g with g = 1 + w (Gemma) or w (Llama). Rounding
// points follow transformers in T: Gemma multiplies by (1 + w) in f32 and rounds once; Llama
// rounds the normalised value to T before multiplying by w. Every intermediate a tensor would
// hold (norm_w1(a), s) is rounded to T, so the fused kernels equal the unfused sequence.
#include "common.cuh"

template <typename T>
__device__ __forceinline__ float apply_gain(float v, float r, float w, int one_plus_weight) {
    return one_plus_weight ? (v * r) * (1.0f + w) : w * round_to<T>(v * r);
}

template <typename T>
__device__ __forceinline__ float inv_rms(const T* __restrict__ x, int h, float eps) {
    float ss = 0.0f;
    for (int i = threadIdx.x; i < h; i += blockDim.x) {
        const float v = to_f32(x[i]);
        ss += v * v;
    }
    return rsqrtf(block_sum(ss) / (float)h + eps);
}

template <typename T>
__device__ void rms_norm_body(T* __restrict__ y, const T* __restrict__ x, const float* __restrict__ w, engine_norm_params p) {
    const long long off = (long long)blockIdx.x * p.hidden;
    const T* xr = x + off;
    T* yr = y + off;
    const float r = inv_rms(xr, p.hidden, p.eps);
    for (int i = threadIdx.x; i < p.hidden; i += blockDim.x)
        yr[i] = from_f32<T>(apply_gain<T>(to_f32(xr[i]), r, w[i], p.one_plus_weight));
}

template <typename T>
__device__ void add_rms_norm_body(T* __restrict__ s_out, T* __restrict__ y, const T* __restrict__ x, const T* __restrict__ a,
                                  const float* __restrict__ w, engine_norm_params p) {
    const long long off = (long long)blockIdx.x * p.hidden;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < p.hidden; i += blockDim.x) {
        const float s = round_to<T>(to_f32(x[off + i]) + to_f32(a[off + i]));
        s_out[off + i] = from_f32<T>(s);
        ss += s * s;
    }
    const float r = rsqrtf(block_sum(ss) / (float)p.hidden + p.eps);
    // Each thread re-reads only the elements it wrote itself: no barrier needed.
    for (int i = threadIdx.x; i < p.hidden; i += blockDim.x)
        y[off + i] = from_f32<T>(apply_gain<T>(to_f32(s_out[off + i]), r, w[i], p.one_plus_weight));
}

template <typename T>
__device__ void norm_add_norm_body(T* __restrict__ s_out, T* __restrict__ y, const T* __restrict__ x, const T* __restrict__ a,
                                   const float* __restrict__ w1, const float* __restrict__ w2, engine_norm_params p) {
    const long long off = (long long)blockIdx.x * p.hidden;
    const float r1 = inv_rms(a + off, p.hidden, p.eps);
    float ss = 0.0f;
    for (int i = threadIdx.x; i < p.hidden; i += blockDim.x) {
        const float n1 = round_to<T>(apply_gain<T>(to_f32(a[off + i]), r1, w1[i], p.one_plus_weight));
        const float s = round_to<T>(to_f32(x[off + i]) + n1);
        s_out[off + i] = from_f32<T>(s);
        ss += s * s;
    }
    const float r2 = rsqrtf(block_sum(ss) / (float)p.hidden + p.eps);
    for (int i = threadIdx.x; i < p.hidden; i += blockDim.x)
        y[off + i] = from_f32<T>(apply_gain<T>(to_f32(s_out[off + i]), r2, w2[i], p.one_plus_weight));
}

#define NORMS(T, N)                                                                                         \
    extern "C" __global__ void rms_norm_##N(T* y, const T* x, const float* w, engine_norm_params p) {      \
        rms_norm_body(y, x, w, p);                                                                          \
    }                                                                                                       \
    extern "C" __global__ void add_rms_norm_##N(T* s, T* y, const T* x, const T* a, const float* w,        \
                                                engine_norm_params p) {                                     \
        add_rms_norm_body(s, y, x, a, w, p);                                                                \
    }                                                                                                       \
    extern "C" __global__ void norm_add_norm_##N(T* s, T* y, const T* x, const T* a, const float* w1,      \
                                                 const float* w2, engine_norm_params p) {                   \
        norm_add_norm_body(s, y, x, a, w1, w2, p);                                                          \
    }
ENGINE_FOR_FLOAT_TYPES(NORMS)

// dx of RMSNorm with frozen gains (one block per row, f32 arithmetic):
//   r = rsqrt(mean(x^2) + eps), u = x*r, dx = r*(g*dy') - x*r^3/H * sum(g*dy'*x)
// where for Llama's w*round_T(u) the rounding is treated as identity (its derivative), so
// g = 1 + w (Gemma) or w (Llama) in both cases.
template <typename T>
__device__ void rms_norm_backward_body(T* __restrict__ dx, const T* __restrict__ x, const T* __restrict__ dy,
                                       const float* __restrict__ w, engine_norm_params p) {
    const long long off = (long long)blockIdx.x * p.hidden;
    float ss = 0.0f, dot = 0.0f;
    for (int i = threadIdx.x; i < p.hidden; i += blockDim.x) {
        const float v = to_f32(x[off + i]);
        const float g = p.one_plus_weight ? 1.0f + w[i] : w[i];
        ss += v * v;
        dot += g * to_f32(dy[off + i]) * v;
    }
    ss = block_sum(ss);
    dot = block_sum(dot);
    const float r = rsqrtf(ss / (float)p.hidden + p.eps);
    const float c = r * r * r / (float)p.hidden * dot;
    for (int i = threadIdx.x; i < p.hidden; i += blockDim.x) {
        const float g = p.one_plus_weight ? 1.0f + w[i] : w[i];
        dx[off + i] = from_f32<T>(r * g * to_f32(dy[off + i]) - to_f32(x[off + i]) * c);
    }
}

#define NORM_BWD(T, N)                                                                                       \
    extern "C" __global__ void rms_norm_backward_##N(T* dx, const T* x, const T* dy, const float* w,        \
                                                     engine_norm_params p) {                                 \
        rms_norm_backward_body(dx, x, dy, w, p);                                                             \
    }
ENGINE_FOR_FLOAT_TYPES(NORM_BWD)
