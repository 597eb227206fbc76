// The optimiser family: a fused multi-tensor AdamW step and the global sum of squares of the
// gradients, each one launch over every trainable tensor. All state is f32.
//
// A slot table in device memory lists the tensors: for AdamW five u64 per slot
// (param, grad, m, v, n), for the norm two (grad, n). blockIdx.y selects the slot; blocks along
// x stride over its elements.
//
// AdamW, in the order of torch's single-tensor implementation (g already multiplied by the
// clipping coefficient):
//   p *= 1 - lr*wd;  m += (1-b1)*(g - m);  v = v*b2 + (1-b2)*g*g;
//   p += -(lr/bc1) * m / (sqrt(v)/sqrt(bc2) + eps)
#include "common.cuh"

extern "C" __global__ void adamw_multi(const unsigned long long* __restrict__ table, float decay, float w1, float b2,
                                       float w2, float step_size, float bc2_sqrt, float eps, float clip) {
    const unsigned long long* s = table + 5 * blockIdx.y;
    float* p = reinterpret_cast<float*>(s[0]);
    const float* g = reinterpret_cast<const float*>(s[1]);
    float* m = reinterpret_cast<float*>(s[2]);
    float* v = reinterpret_cast<float*>(s[3]);
    const long long n = (long long)s[4];
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += stride) {
        const float gi = g[i] * clip;
        float pi = p[i] * decay;
        const float mi = m[i] + w1 * (gi - m[i]);
        const float vi = v[i] * b2 + w2 * gi * gi;
        const float denom = sqrtf(vi) / bc2_sqrt + eps;
        pi += -step_size * (mi / denom);
        p[i] = pi;
        m[i] = mi;
        v[i] = vi;
    }
}

// out[slot] += sum of squares of that slot's gradient (f32 partials per block, f64 total).
extern "C" __global__ void sum_squares_multi(const unsigned long long* __restrict__ table, double* __restrict__ out) {
    const unsigned long long* s = table + 2 * blockIdx.y;
    const float* g = reinterpret_cast<const float*>(s[0]);
    const long long n = (long long)s[1];
    const long long stride = (long long)gridDim.x * blockDim.x;
    float acc = 0.0f;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += stride) acc += g[i] * g[i];
    acc = block_sum(acc);
    if (threadIdx.x == 0) atomicAdd(out + blockIdx.y, (double)acc);
}
