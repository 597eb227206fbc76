// Elementwise kernels: the residual add. y = a + b, computed in f32, rounded once to T.
// Vectorised: each thread moves 16 bytes at a time; the launcher guarantees n % PACK == 0 or
// falls back to the scalar tail handled by the last thread range.
#include "common.cuh"

template <typename T>
__device__ void add_body(T* __restrict__ y, const T* __restrict__ a, const T* __restrict__ b, long long n) {
    constexpr int P = Pack<T>::N;
    const long long packs = n / P;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < packs; i += stride) {
        float va[P], vb[P];
        load_pack(a + i * P, va);
        load_pack(b + i * P, vb);
#pragma unroll
        for (int j = 0; j < P; j++) va[j] += vb[j];
        store_pack(y + i * P, va);
    }
    for (long long i = packs * P + blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += stride) {
        y[i] = from_f32<T>(to_f32(a[i]) + to_f32(b[i]));
    }
}

#define ADD(T, N)                                                                               \
    extern "C" __global__ void add_##N(T* y, const T* a, const T* b, long long n) { add_body(y, a, b, n); }
ENGINE_FOR_FLOAT_TYPES(ADD)

// y = a * b (dropout masks on the GPU).
template <typename T>
__device__ void mul_body(T* __restrict__ y, const T* __restrict__ a, const T* __restrict__ b, long long n) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += stride)
        y[i] = from_f32<T>(to_f32(a[i]) * to_f32(b[i]));
}

// y = a + w * b: gradient accumulation (f32 accumulators).
template <typename T>
__device__ void axpy_body(T* __restrict__ y, const T* __restrict__ a, const T* __restrict__ b, float w, long long n) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += stride)
        y[i] = from_f32<T>(to_f32(a[i]) + w * to_f32(b[i]));
}

#define MUL_AXPY(T, N)                                                                                      \
    extern "C" __global__ void mul_##N(T* y, const T* a, const T* b, long long n) { mul_body(y, a, b, n); } \
    extern "C" __global__ void axpy_##N(T* y, const T* a, const T* b, float w, long long n) {              \
        axpy_body(y, a, b, w, n);                                                                           \
    }
ENGINE_FOR_FLOAT_TYPES(MUL_AXPY)

// Dtype conversion, rounding to nearest even: every (source, destination) pair.
template <typename S, typename D>
__device__ void cast_body(D* __restrict__ y, const S* __restrict__ x, long long n) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += stride) y[i] = from_f32<D>(to_f32(x[i]));
}

#define CAST(S, SN, D, DN)                                                                                  \
    extern "C" __global__ void cast_##SN##_##DN(D* y, const S* x, long long n) { cast_body<S, D>(y, x, n); }
#define CAST_TO(S, SN) CAST(S, SN, float, f32) CAST(S, SN, bf16, bf16) CAST(S, SN, f16, f16)
CAST_TO(float, f32)
CAST_TO(bf16, bf16)
CAST_TO(f16, f16)
