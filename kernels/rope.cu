// Rotary position embeddings, rotate-half layout: for each head, feature i < d/2 pairs with
// i + d/2. The table kernel forms angles pos * inv_freq in f32 (as transformers does) and their
// cos/sin; the apply kernel rotates every head of x in f32 and rounds once to T.
#include "common.cuh"

extern "C" __global__ void rope_table(float* __restrict__ cos_out, float* __restrict__ sin_out,
                                      const uint32_t* __restrict__ positions, const float* __restrict__ inv_freq,
                                      int tokens, int half) {
    const long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    if (i >= (long long)tokens * half) return;
    const int t = (int)(i / half), f = (int)(i % half);
    const float a = (float)positions[t] * inv_freq[f];
    // Full-precision sincosf (not the fast intrinsics): angles reach thousands of radians.
    float s, c;
    sincosf(a, &s, &c);
    cos_out[i] = c;
    sin_out[i] = s;
}

template <typename T>
__device__ void rope_body(T* __restrict__ y, const T* __restrict__ x, const float* __restrict__ cos_t,
                          const float* __restrict__ sin_t, int tokens, int width, int head_dim) {
    const int half = head_dim / 2;
    const int pairs_per_token = width / 2;
    const long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    if (i >= (long long)tokens * pairs_per_token) return;
    const int t = (int)(i / pairs_per_token);
    const int p = (int)(i % pairs_per_token);
    const int head = p / half, f = p % half;
    const long long base = (long long)t * width + (long long)head * head_dim;
    const float c = cos_t[(long long)t * half + f], s = sin_t[(long long)t * half + f];
    const float a = to_f32(x[base + f]), b = to_f32(x[base + f + half]);
    y[base + f] = from_f32<T>(a * c - b * s);
    y[base + f + half] = from_f32<T>(b * c + a * s);
}

#define ROPE(T, N)                                                                                     \
    extern "C" __global__ void rope_##N(T* y, const T* x, const float* c, const float* s, int tokens,  \
                                        int width, int head_dim) {                                     \
        rope_body(y, x, c, s, tokens, width, head_dim);                                                \
    }
ENGINE_FOR_FLOAT_TYPES(ROPE)

// Backward of rope: rotate by the opposite angle (y_i = a c + b s; y_{i+h} = b c - a s).
template <typename T>
__device__ void rope_backward_body(T* __restrict__ dx, const T* __restrict__ dy, const float* __restrict__ cos_t,
                                   const float* __restrict__ sin_t, int tokens, int width, int head_dim) {
    const int half = head_dim / 2;
    const int pairs_per_token = width / 2;
    const long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    if (i >= (long long)tokens * pairs_per_token) return;
    const int t = (int)(i / pairs_per_token);
    const int p = (int)(i % pairs_per_token);
    const int head = p / half, f = p % half;
    const long long base = (long long)t * width + (long long)head * head_dim;
    const float c = cos_t[(long long)t * half + f], s = sin_t[(long long)t * half + f];
    const float a = to_f32(dy[base + f]), b = to_f32(dy[base + f + half]);
    dx[base + f] = from_f32<T>(a * c + b * s);
    dx[base + f + half] = from_f32<T>(b * c - a * s);
}

#define ROPE_BWD(T, N)                                                                                       \
    extern "C" __global__ void rope_backward_##N(T* dx, const T* dy, const float* c, const float* s,        \
                                                 int tokens, int width, int head_dim) {                      \
        rope_backward_body(dx, dy, c, s, tokens, width, head_dim);                                           \
    }
ENGINE_FOR_FLOAT_TYPES(ROPE_BWD)
