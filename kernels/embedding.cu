// Embedding gather (+ a constant scale, Gemma's sqrt(hidden) already rounded to T by the host)
// and row gather (the last token of every row). One block per output row; threads stride over
// the hidden dimension. Table dtype W and output dtype T are independent.
#include "common.cuh"

template <typename W, typename T>
__device__ void embed_body(T* __restrict__ y, const W* __restrict__ table, const uint32_t* __restrict__ ids, int hidden, float scale) {
    const long long row = blockIdx.x;
    const W* src = table + (long long)ids[row] * hidden;
    T* dst = y + row * hidden;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) dst[i] = from_f32<T>(to_f32(src[i]) * scale);
}

#define EMBED(W, WN, T, TN)                                                                             \
    extern "C" __global__ void embed_##WN##_##TN(T* y, const W* table, const uint32_t* ids, int hidden, float scale) { \
        embed_body<W, T>(y, table, ids, hidden, scale);                                                 \
    }
#define EMBED_OUT(W, WN) EMBED(W, WN, float, f32) EMBED(W, WN, bf16, bf16) EMBED(W, WN, f16, f16)
EMBED_OUT(float, f32)
EMBED_OUT(bf16, bf16)
EMBED_OUT(f16, f16)

template <typename T>
__device__ void gather_rows_body(T* __restrict__ y, const T* __restrict__ x, const uint32_t* __restrict__ idx, int hidden) {
    const long long row = blockIdx.x;
    const T* src = x + (long long)idx[row] * hidden;
    T* dst = y + row * hidden;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) dst[i] = src[i];
}

#define GATHER(T, N)                                                                                    \
    extern "C" __global__ void gather_rows_##N(T* y, const T* x, const uint32_t* idx, int hidden) {   \
        gather_rows_body(y, x, idx, hidden);                                                            \
    }
ENGINE_FOR_FLOAT_TYPES(GATHER)

// Backward of gather_rows for DISTINCT indices (the launcher checks): dx is zero except row
// idx[r], which receives dy[r]. Launched one block per output row over all `rows` rows; each
// block looks up whether its row was gathered (inverse map built on the host).
template <typename T>
__device__ void scatter_rows_body(T* __restrict__ dx, const T* __restrict__ dy, const int32_t* __restrict__ src_of_row,
                                  int hidden) {
    const long long row = blockIdx.x;
    const int src = src_of_row[row];
    T* dst = dx + row * hidden;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x)
        dst[i] = src < 0 ? from_f32<T>(0.0f) : dy[(long long)src * hidden + i];
}

#define SCATTER(T, N)                                                                                        \
    extern "C" __global__ void scatter_rows_##N(T* dx, const T* dy, const int32_t* src_of_row, int hidden) { \
        scatter_rows_body(dx, dy, src_of_row, hidden);                                                       \
    }
ENGINE_FOR_FLOAT_TYPES(SCATTER)
