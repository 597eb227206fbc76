// Gated activations of the feed-forward blocks: y = act(gate) * up, act = tanh-GELU (0) or
// SiLU (1), computed in f32. As in transformers (act(gate) is a tensor of T before the
// product), act(gate) is rounded to T, then the product is rounded to T.
#include "common.cuh"

template <typename T>
__device__ void gated_body(T* __restrict__ y, const T* __restrict__ gate, const T* __restrict__ up, long long n, int act) {
    constexpr int P = Pack<T>::N;
    const long long packs = n / P;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < packs; i += stride) {
        float g[P], u[P];
        load_pack(gate + i * P, g);
        load_pack(up + i * P, u);
#pragma unroll
        for (int j = 0; j < P; j++) g[j] = round_to<T>(act == 0 ? gelu_tanh(g[j]) : silu(g[j])) * u[j];
        store_pack(y + i * P, g);
    }
    for (long long i = packs * P + blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += stride) {
        const float g = to_f32(gate[i]);
        y[i] = from_f32<T>(round_to<T>(act == 0 ? gelu_tanh(g) : silu(g)) * to_f32(up[i]));
    }
}

#define GATED(T, N)                                                                              \
    extern "C" __global__ void gated_##N(T* y, const T* gate, const T* up, long long n, int act) { \
        gated_body(y, gate, up, n, act);                                                         \
    }
ENGINE_FOR_FLOAT_TYPES(GATED)

// (d gate, d up) of act(gate) * up, f32 arithmetic:
//   d up = dy * act(gate);  d gate = dy * up * act'(gate)
__device__ __forceinline__ float gelu_tanh_grad(float x) {
    const float k = 0.7978845608028654f;
    const float t = tanhf(k * (x + 0.044715f * x * x * x));
    return 0.5f * (1.0f + t) + 0.5f * x * (1.0f - t * t) * k * (1.0f + 3.0f * 0.044715f * x * x);
}

__device__ __forceinline__ float silu_grad(float x) {
    const float s = 1.0f / (1.0f + expf(-x));
    return s * (1.0f + x * (1.0f - s));
}

template <typename T>
__device__ void gated_backward_body(T* __restrict__ dg, T* __restrict__ du, const T* __restrict__ gate,
                                    const T* __restrict__ up, const T* __restrict__ dy, long long n, int act) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += stride) {
        const float g = to_f32(gate[i]), u = to_f32(up[i]), d = to_f32(dy[i]);
        const float a = act == 0 ? gelu_tanh(g) : silu(g);
        const float da = act == 0 ? gelu_tanh_grad(g) : silu_grad(g);
        dg[i] = from_f32<T>(d * u * da);
        du[i] = from_f32<T>(d * a);
    }
}

#define GATED_BWD(T, N)                                                                                      \
    extern "C" __global__ void gated_backward_##N(T* dg, T* du, const T* gate, const T* up, const T* dy,   \
                                                  long long n, int act) {                                    \
        gated_backward_body(dg, du, gate, up, dy, n, act);                                                   \
    }
ENGINE_FOR_FLOAT_TYPES(GATED_BWD)
