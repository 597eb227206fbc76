// Causal self-attention over a packed (varlen) batch, with grouped-query heads, an optional
// logit soft-cap and an optional sliding window. Rows are delimited by cu_seqlens[num_rows + 1]
// (int32 token offsets). For query i and key j of one row:
//   s = (q_i . k_j) * scale;  with a cap: s = cap * tanh(s / cap)
//   visible keys: j <= i, and with a window W also j > i - W
//   out_i = sum_j softmax(s)_j v_j        (query head h reads kv head h / (n_heads / n_kv_heads))
// Arithmetic is f32 throughout; nothing of size tokens x tokens ever reaches global memory.
//
// Two kernel families:
//
// attention_fa_d{64,128,256}[_n32]_{bf16,f16}: the tensor-core kernel (flash-attention-2 style).
//   Grid (query tiles of the longest row, heads, rows); a block of 4 warps owns BM = 64 queries
//   of one (row, head); each warp owns 16 of those queries. blockIdx.x counts tiles from the
//   end of the row, so the heavy (late, many-keys) tiles of a row launch first; blocks whose
//   tile starts past their row's end exit at once (cheaper than a host-built tile map, and the
//   empty blocks cost a few cycles each). The block walks the key tiles of BN keys that its
//   queries can see, from the diagonal tile backwards to the tile holding the oldest key the
//   window allows: tiles fully above the diagonal or left of the window are never touched.
//   Per key tile:
//     S = Q K^T            mma.sync m16n8k16 (f32 accumulators), K fragments by ldmatrix;
//     scale / soft-cap / mask S in registers, online softmax per query row (running max m and
//       sum l, f32, log2 domain), O rescaled by exp2(m_old - m_new);
//     O += P V             P re-packed from the S accumulators to bf16/f16 as the A operand
//                          (no trip through shared memory), V fragments by ldmatrix.trans.
//   Shared memory (dynamic): Q [BM][D], K [BN][D], V [BN][D] of T, each row stored as 16-byte
//   chunks XOR-swizzled (chunk c of row r at chunk c ^ (r & 7)) so ldmatrix and the 16-byte
//   copies are free of bank conflicts without padding. Global->shared copies use cp.async
//   (sm_80+) in the flash-attention-2 pipeline: V of tile t loads while S = Q K_t^T and the
//   softmax run; K of tile t-1 loads while O += P V_t runs. Rows past the end of a row are
//   zero-filled. Q stays in registers for D <= 128 (D/4 registers) and is re-read from shared
//   memory per k-step for D = 256, where the 128 f32 O accumulators need the registers.
//   At the end O / l is staged in the warp's own rows of the Q buffer and stored with 16-byte
//   coalesced writes.
//   Fragment layouts (PTX ISA, mma.m16n8k16, g = lane / 4, t = lane % 4):
//     A (16x16, row-major) regs {a0,a1,a2,a3} = (row g, cols 2t..2t+1), (g+8, 2t..), (g, 2t+8..),
//       (g+8, 2t+8..); B (16x8) regs {b0,b1} = (k 2t..2t+1, col g), (k 2t+8.., col g);
//     C/D (16x8, f32) {c0,c1,c2,c3} = (row g, col 2t), (g, 2t+1), (g+8, 2t), (g+8, 2t+1).
//   So each thread owns query rows g and g+8 of its warp: the row max and row sum of the
//   online softmax reduce over the 4 lanes of a quad (shfl_xor 1, 2), and the S accumulators of
//   key n-tiles 2k, 2k+1 are exactly the A fragment of P for the PV k-step k.
//   Arch: bf16 tensor cores need sm_80. sm_75 (T4) runs the f16 instances with two m16n8k8
//   mma per m16n8k16 (identical fragments) and synchronous 16-byte copies instead of cp.async;
//   its 64 KB shared-memory limit takes the _n32 variant (BN = 32) for D = 256. Instances that
//   cannot run on a target (bf16 on sm_75, the 96 KB d256 tiling on sm_75) compile to a trap
//   there; the launcher never picks them.
//   Registers: per thread, O takes D/2 f32, S BN/2 f32, Q (D <= 128) D/4; the pipeline keeps
//   a few fragments in flight. ptxas: d64 ~160, d128 ~225-235, d256 255 (no spills; the
//   __launch_bounds__ minimum-blocks hint keeps ptxas from capping d64 at 128 and spilling).
//
// attention_generic_{f32,bf16,f16}: the simple kernel for any head_dim <= 256, any dtype and
//   any arch (the tiny test models' head_dims, f32, bf16 on sm_75). One warp per (query, head),
//   4 warps per block, grid (ceil(longest row / 4), heads, rows). The query is staged in
//   shared memory as f32; keys are taken 32 at a time, one per lane (each lane a full dot
//   product), then online softmax over the 32 scores (warp max / sum) and O += p_j v_j with
//   lanes splitting the head dims (up to 8 per lane). Exact expf/tanhf, no rounding of p.
#include "common.cuh"

#include <type_traits>

// ---------------------------------------------------------------------------------------------
// PTX wrappers: shared-memory addresses, cp.async, ldmatrix, mma, ex2.

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
    return (uint32_t)__cvta_generic_to_shared(p);
}

// 16 bytes global -> shared; `ok == false` writes zeros instead (src is not read).
__device__ __forceinline__ void copy16(void* dst, const void* src, bool ok) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
                 "r"(ok ? 16 : 0)
                 : "memory");
#else
    uint4 x = make_uint4(0u, 0u, 0u, 0u);
    if (ok) x = *reinterpret_cast<const uint4*>(src);
    *reinterpret_cast<uint4*>(dst) = x;
#endif
}

__device__ __forceinline__ void copy_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

// Wait for every copy this thread issued (the caller then syncs the block).
__device__ __forceinline__ void copy_wait_all() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile("cp.async.wait_group 0;\n" ::: "memory");
#endif
}

// Four 8x8 b16 matrices; lanes 8i..8i+7 address the rows of matrix i, register i receives it.
// `addr` is a shared-memory address (smem_addr).
__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], uint32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

// As ldsm_x4, each matrix transposed.
__device__ __forceinline__ void ldsm_x4_trans(uint32_t (&r)[4], uint32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

// c += A (16x16) . B (16x8), f32 accumulators.
template <typename T> __device__ __forceinline__ void mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);

template <>
__device__ __forceinline__ void mma16816<bf16>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#else
    __trap();  // no bf16 tensor cores before sm_80; the launcher never gets here
#endif
}

template <>
__device__ __forceinline__ void mma16816<f16>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#else
    // sm_75: k16 = two k8 halves with the same fragments (A regs {a0,a1} and {a2,a3}).
    asm("mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5}, {%6}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(b0));
    asm("mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5}, {%6}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[2]), "r"(a[3]), "r"(b1));
#endif
}

// Two f32 -> one register of two T (lo in the low half: the lower column index).
template <typename T> __device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <> __device__ __forceinline__ uint32_t pack2<bf16>(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
}
template <> __device__ __forceinline__ uint32_t pack2<f16>(float lo, float hi) {
    __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
}

// 2^x (ex2.approx: ~2 ulp; 2^-inf = 0).
__device__ __forceinline__ float ex2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}

// tanh(x) = 1 - 2 / (e^{2x} + 1): absolute error ~1e-7 over the whole range (e^{2x} = inf
// gives 1, 0 gives -1), which is what matters for a logit (cap * tanh). tanh.approx.f32
// (relative error 2^-11, i.e. up to 0.025 on a cap-50 logit) is not accurate enough.
__device__ __forceinline__ float tanh_fast(float x) {
    const float e = ex2(x * 2.8853900817779268f);  // 2 * log2(e)
    return 1.0f - __fdividef(2.0f, e + 1.0f);
}

// ---------------------------------------------------------------------------------------------
// The tensor-core kernel.

namespace fa {

constexpr int WARPS = 4;
constexpr int THREADS = 32 * WARPS;
constexpr int BM = 16 * WARPS;  // queries per block (must match src/ops/attention/cuda.rs)
constexpr float LOG2E = 1.4426950408889634f;

// Element offset of (row r, column c) in a swizzled [rows][D] tile; c's 16-byte chunk moves.
template <int D> __device__ __forceinline__ int swz(int r, int c) {
    return r * D + ((((c >> 3) ^ (r & 7))) << 3) + (c & 7);
}

// Per-lane addresses of an ldmatrix.x4 walk over a swizzled [rows][D] tile of 16-bit elements.
// Lane l addresses row R + r_lane (R a multiple of 8, r_lane & 7 == l & 7) and column
// 16 kk + 8 b (b = 0 or 1). The swizzled chunk is (2 kk + b) ^ (l & 7) = 8 (kk / 4) +
// ((2 (kk % 4)) ^ y) with y = b ^ (l & 7): four per-lane bases (one per kk % 4) plus offsets
// that are compile-time constants once the loops over R and kk unroll. (Computing every
// address in full lets the compiler hoist dozens of them into registers.)
template <int D> struct LdsmWalk {
    uint32_t base[4];
    __device__ __forceinline__ LdsmWalk(const void* tile, int r_lane, int b) {
        const int y = b ^ (r_lane & 7);
#pragma unroll
        for (int x = 0; x < 4; x++) base[x] = smem_addr(tile) + 2 * (r_lane * D + (((2 * x) ^ y) << 3));
    }
    __device__ __forceinline__ uint32_t at(int R, int kk) const { return base[kk & 3] + 2 * (R * D + (kk >> 2) * 64); }
};

// Copy rows [0, ROWS) of a [*, D] slab with row stride `stride` (elements) into a swizzled tile;
// rows >= `valid` are zero-filled. Consecutive threads take consecutive 16-byte chunks; pass i
// covers rows r_t + i RS, whose swizzle (r & 7) is r_t's or (RS = 4) alternates with r_t + 4's.
template <typename T, int D, int ROWS>
__device__ __forceinline__ void load_tile(T* s, const T* __restrict__ g, long long stride, int valid, int tid) {
    constexpr int CPR = D / 8;         // 16-byte chunks per row
    constexpr int RS = THREADS / CPR;  // rows per pass
    static_assert(RS % 4 == 0 && ROWS % RS == 0, "tile copy must split evenly over the block");
    const int r_t = tid / CPR, cc = tid % CPR;
    const int s_even = r_t * D + ((cc ^ (r_t & 7)) << 3);
    const int s_odd = r_t * D + ((cc ^ ((r_t + RS) & 7)) << 3);
    const T* src = g + (long long)r_t * stride + cc * 8;
#pragma unroll
    for (int i = 0; i < ROWS / RS; i++) {
        const bool ok = r_t + i * RS < valid;
        copy16(s + (i & 1 ? s_odd : s_even) + i * RS * D, ok ? src + (long long)i * RS * stride : g, ok);
    }
}

template <typename T, int D, int BN>
__device__ __forceinline__ void attention_body(T* __restrict__ out, const T* __restrict__ q, const T* __restrict__ k,
                                               const T* __restrict__ v, const int* __restrict__ cu_seqlens,
                                               const engine_attention_params p) {
    static_assert(D % 64 == 0 && D <= 256, "head_dim 64, 128 or 256");
    static_assert(BN % 16 == 0 && BN <= 64, "key tile");
    constexpr bool Q_IN_REGS = D <= 128;
    constexpr int NS = BN / 8;  // n8 tiles of S per warp
    constexpr int NO = D / 8;   // n8 tiles of O per warp

    extern __shared__ uint4 smem_u4[];
    T* sQ = reinterpret_cast<T*>(smem_u4);
    T* sK = sQ + BM * D;
    T* sV = sK + BN * D;

    const int row = blockIdx.z, head = blockIdx.y;
    const int mt = gridDim.x - 1 - blockIdx.x;  // late (heavy) tiles first
    const int start = cu_seqlens[row];
    const int len = cu_seqlens[row + 1] - start;
    const int q0 = mt * BM;
    if (q0 >= len) return;  // the whole block: no barrier is reached
    const int q1 = min(q0 + BM, len);

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, t4 = lane & 3;
    const int kvh = head / (p.n_heads / p.n_kv_heads);
    const long long qs = (long long)p.n_heads * D, ks = (long long)p.n_kv_heads * D;
    const T* gq = q + (long long)(start + q0) * qs + head * D;
    const T* gk = k + (long long)start * ks + kvh * D;
    const T* gv = v + (long long)start * ks + kvh * D;
    const int W = p.window;  // 0: no window

    // Key tiles [nt_lo, nt_hi] hold every key some query of [q0, q1) can see.
    const int lo_key = W > 0 ? max(0, q0 - W + 1) : 0;
    const int nt_lo = lo_key / BN, nt_hi = (q1 - 1) / BN;

    load_tile<T, D, BM>(sQ, gq, qs, q1 - q0, tid);
    load_tile<T, D, BN>(sK, gk + (long long)nt_hi * BN * ks, ks, len - nt_hi * BN, tid);
    copy_commit();

    // Logits in log2 units: s2 = post * tanh(dot * pre) with a cap, dot * pre without.
    const bool capped = p.softcap > 0.0f;
    const float pre = capped ? p.scale / p.softcap : p.scale * LOG2E;
    const float post = capped ? p.softcap * LOG2E : 1.0f;

    float o[NO][4];
#pragma unroll
    for (int n = 0; n < NO; n++) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;
    float m[2] = {-INFINITY, -INFINITY};  // running max (log2 units) of rows g, g + 8
    float l[2] = {0.0f, 0.0f};            // this thread's share of the running sums
    uint32_t qf[Q_IN_REGS ? D / 16 : 1][4];
    const LdsmWalk<D> walk_q(sQ, warp * 16 + (lane & 15), lane >> 4);
    const LdsmWalk<D> walk_k(sK, (lane & 7) + ((lane >> 4) << 3), (lane >> 3) & 1);
    const LdsmWalk<D> walk_v(sV, (lane & 7) + ((lane >> 3) & 1) * 8, lane >> 4);

    const int qrow = warp * 16;           // this warp's first row in the tile
    const int i0 = q0 + qrow + g;         // row-local positions of this thread's two queries
    const int i1 = i0 + 8;

    for (int nt = nt_hi; nt >= nt_lo; nt--) {
        const int k0 = nt * BN;
        copy_wait_all();
        __syncthreads();  // K_nt (and Q) landed; every warp is done with V_{nt+1}
        load_tile<T, D, BN>(sV, gv + (long long)k0 * ks, ks, len - k0, tid);
        copy_commit();

        if constexpr (Q_IN_REGS) {
            if (nt == nt_hi) {
#pragma unroll
                for (int kk = 0; kk < D / 16; kk++) ldsm_x4(qf[kk], walk_q.at(0, kk));
            }
        }

        // S = Q K^T
        float s[NS][4];
#pragma unroll
        for (int n = 0; n < NS; n++) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.0f;
#pragma unroll
        for (int kk = 0; kk < D / 16; kk++) {
            uint32_t a[4];
            if constexpr (Q_IN_REGS) {
#pragma unroll
                for (int x = 0; x < 4; x++) a[x] = qf[kk][x];
            } else {
                ldsm_x4(a, walk_q.at(0, kk));
            }
#pragma unroll
            for (int np = 0; np < NS / 2; np++) {
                uint32_t b[4];
                ldsm_x4(b, walk_k.at(np * 16, kk));
                mma16816<T>(s[2 * np], a, b[0], b[1]);
                mma16816<T>(s[2 * np + 1], a, b[2], b[3]);
            }
        }

        // Scale, cap, mask. Masking is needed when some key of the tile lies after the first
        // query (causal) or at/before (last query - W) (window); keys past the row's end are
        // after every valid query, so the causal test covers them.
        const bool need_mask = (k0 + BN - 1 > q0) || (W > 0 && k0 <= q1 - 1 - W);
#pragma unroll
        for (int n = 0; n < NS; n++) {
#pragma unroll
            for (int e = 0; e < 4; e++) {
                float x = s[n][e];
                x = capped ? post * tanh_fast(x * pre) : x * pre;
                if (need_mask) {
                    const int j = k0 + n * 8 + 2 * t4 + (e & 1);
                    const int i = e < 2 ? i0 : i1;
                    if (j > i || (W > 0 && i - j >= W)) x = -INFINITY;
                }
                s[n][e] = x;
            }
        }

        // Online softmax; S becomes P (unnormalised, relative to the new running max).
#pragma unroll
        for (int h = 0; h < 2; h++) {
            float mx = m[h];
#pragma unroll
            for (int n = 0; n < NS; n++) mx = fmaxf(mx, fmaxf(s[n][2 * h], s[n][2 * h + 1]));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
            // A row that has seen no visible key yet keeps m = -inf; subtract 0 instead so no
            // -inf - -inf = NaN appears (its p are all exp2(-inf) = 0).
            const float mu = mx == -INFINITY ? 0.0f : mx;
            const float alpha = ex2(m[h] - mu);  // m = -inf: 0 (O and l are still 0)
            m[h] = mx;
            float sum = 0.0f;
#pragma unroll
            for (int n = 0; n < NS; n++) {
                s[n][2 * h] = ex2(s[n][2 * h] - mu);
                s[n][2 * h + 1] = ex2(s[n][2 * h + 1] - mu);
                sum += s[n][2 * h] + s[n][2 * h + 1];
            }
            l[h] = l[h] * alpha + sum;
#pragma unroll
            for (int n = 0; n < NO; n++) {
                o[n][2 * h] *= alpha;
                o[n][2 * h + 1] *= alpha;
            }
        }

        copy_wait_all();
        __syncthreads();  // V_nt landed; every warp is done with K_nt
        if (nt > nt_lo) {
            load_tile<T, D, BN>(sK, gk + (long long)(k0 - BN) * ks, ks, len - (k0 - BN), tid);
            copy_commit();
        }

        // O += P V
#pragma unroll
        for (int kk = 0; kk < BN / 16; kk++) {
            const uint32_t a[4] = {pack2<T>(s[2 * kk][0], s[2 * kk][1]), pack2<T>(s[2 * kk][2], s[2 * kk][3]),
                                   pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                                   pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
            for (int dp = 0; dp < D / 16; dp++) {
                uint32_t b[4];
                ldsm_x4_trans(b, walk_v.at(kk * 16, dp));
                mma16816<T>(o[2 * dp], a, b[0], b[1]);
                mma16816<T>(o[2 * dp + 1], a, b[2], b[3]);
            }
        }
    }

    // O / l, staged in this warp's own 16 rows of sQ (only this warp ever read them), then
    // written out 16 bytes at a time for the rows inside the sequence.
#pragma unroll
    for (int h = 0; h < 2; h++) {
        float sum = l[h];
        sum += __shfl_xor_sync(0xffffffffu, sum, 1);
        sum += __shfl_xor_sync(0xffffffffu, sum, 2);
        l[h] = sum > 0.0f ? 1.0f / sum : 0.0f;  // sum = 0 only on padding rows (never stored)
    }
    __syncwarp();
#pragma unroll
    for (int n = 0; n < NO; n++) {
#pragma unroll
        for (int h = 0; h < 2; h++) {
            const int r = qrow + g + 8 * h;
            *reinterpret_cast<uint32_t*>(sQ + swz<D>(r, n * 8 + 2 * t4)) =
                pack2<T>(o[n][2 * h] * l[h], o[n][2 * h + 1] * l[h]);
        }
    }
    __syncwarp();
    constexpr int CPR = D / 8;
#pragma unroll
    for (int c = lane; c < 16 * CPR; c += 32) {
        const int r = c / CPR, cc = c % CPR;
        const int i = q0 + qrow + r;
        if (i < len)
            *reinterpret_cast<uint4*>(out + (long long)(start + i) * qs + head * D + cc * 8) =
                *reinterpret_cast<const uint4*>(sQ + swz<D>(qrow + r, cc * 8));
    }
}

#if defined(__CUDA_ARCH__)
constexpr int ARCH = __CUDA_ARCH__;
#else
constexpr int ARCH = 1000;  // host pass: nothing device-side is generated
#endif

// Whether an instance can run on this compilation target: bf16 mma needs sm_80, f16 mma and
// ldmatrix sm_75, and sm_75 has at most 64 KB of shared memory per block. The others compile
// to a trap (the launcher never picks them there).
template <typename T, int D, int BN> struct Runs {
    static constexpr bool value = (std::is_same<T, bf16>::value ? ARCH >= 800 : ARCH >= 750) &&
                                  (ARCH >= 800 || (BM + 2 * BN) * D * 2 <= 64 * 1024);
};

}  // namespace fa

// Entry points: attention_fa_d<D>[_n<BN>]_<dtype>(out, q, k, v, cu_seqlens, params), block of
// fa::THREADS threads, dynamic shared memory (BM + 2 BN) * D * sizeof(T) bytes.
// MINB (blocks per SM for __launch_bounds__) caps the registers: without it ptxas caps the
// d64 instances at 128 registers and spills.
#define ATTENTION_FA(T, D, BN, MINB, NAME)                                                                 \
    extern "C" __global__ void __launch_bounds__(fa::THREADS, MINB)                                        \
        NAME(T* out, const T* q, const T* k, const T* v, const int* cu_seqlens, engine_attention_params p) {  \
        if constexpr (fa::Runs<T, D, BN>::value) {                                                              \
            fa::attention_body<T, D, BN>(out, q, k, v, cu_seqlens, p);                                     \
        } else {                                                                                           \
            __trap();                                                                                      \
        }                                                                                                  \
    }
#define ATTENTION_FA_TYPES(T, N)                        \
    ATTENTION_FA(T, 64, 64, 3, attention_fa_d64_##N)    \
    ATTENTION_FA(T, 128, 64, 2, attention_fa_d128_##N)  \
    ATTENTION_FA(T, 256, 64, 1, attention_fa_d256_##N)
ATTENTION_FA_TYPES(bf16, bf16)
ATTENTION_FA_TYPES(f16, f16)
// sm_75 (64 KB of shared memory per block): head_dim 256 with 32-key tiles, 64 KB in all.
ATTENTION_FA(f16, 256, 32, 1, attention_fa_d256_n32_f16)

// ---------------------------------------------------------------------------------------------
// The generic kernel.

namespace generic {

constexpr int WARPS = 4;  // queries per block (must match src/ops/attention/cuda.rs)
constexpr int MAX_D = 256;
constexpr int PER_LANE = MAX_D / 32;

template <typename T>
__device__ __forceinline__ void attention_body(T* __restrict__ out, const T* __restrict__ q, const T* __restrict__ k,
                                               const T* __restrict__ v, const int* __restrict__ cu_seqlens,
                                               const engine_attention_params p) {
    __shared__ float sq[WARPS][MAX_D];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int row = blockIdx.z, head = blockIdx.y;
    const int start = cu_seqlens[row];
    const int len = cu_seqlens[row + 1] - start;
    const int i = blockIdx.x * WARPS + warp;  // this warp's query (row-local)
    if (i >= len) return;                     // warps are independent: no block barrier below
    const int D = p.head_dim;
    const int kvh = head / (p.n_heads / p.n_kv_heads);
    const long long qs = (long long)p.n_heads * D, ks = (long long)p.n_kv_heads * D;
    const T* qi = q + (long long)(start + i) * qs + (long long)head * D;
    const T* kb = k + (long long)start * ks + (long long)kvh * D;
    const T* vb = v + (long long)start * ks + (long long)kvh * D;
    float* sqw = sq[warp];
    for (int d = lane; d < D; d += 32) sqw[d] = to_f32(qi[d]);
    __syncwarp();

    float o[PER_LANE];
#pragma unroll
    for (int r = 0; r < PER_LANE; r++) o[r] = 0.0f;
    float m = -INFINITY, l = 0.0f;
    const int lo = p.window > 0 ? max(0, i - p.window + 1) : 0;
    for (int j0 = lo; j0 <= i; j0 += 32) {
        const int j = j0 + lane;
        float s = -INFINITY;
        if (j <= i) {
            const T* kj = kb + (long long)j * ks;
            float dot = 0.0f;
            for (int d = 0; d < D; d++) dot += sqw[d] * to_f32(kj[d]);
            s = dot * p.scale;
            if (p.softcap > 0.0f) s = p.softcap * tanhf(s / p.softcap);
        }
        const float m_new = fmaxf(m, warp_max(s));  // finite: key j0 <= i is visible
        const float pj = j <= i ? expf(s - m_new) : 0.0f;
        const float alpha = expf(m - m_new);  // m = -inf on the first chunk: 0
        l = l * alpha + warp_sum(pj);
        m = m_new;
        const int n = min(32, i - j0 + 1);
#pragma unroll
        for (int r = 0; r < PER_LANE; r++) o[r] *= alpha;
        for (int kk = 0; kk < n; kk++) {
            const float pk = __shfl_sync(0xffffffffu, pj, kk);
            const T* vj = vb + (long long)(j0 + kk) * ks;
#pragma unroll
            for (int r = 0; r < PER_LANE; r++) {
                const int d = lane + 32 * r;
                if (d < D) o[r] += pk * to_f32(vj[d]);
            }
        }
    }
    const float inv = 1.0f / l;  // l >= 1: the row max contributes exp(0)
    T* oi = out + (long long)(start + i) * qs + (long long)head * D;
#pragma unroll
    for (int r = 0; r < PER_LANE; r++) {
        const int d = lane + 32 * r;
        if (d < D) oi[d] = from_f32<T>(o[r] * inv);
    }
}

}  // namespace generic

// attention_generic_<dtype>(out, q, k, v, cu_seqlens, params): block of 32 * generic::WARPS
// threads, grid (ceil(max_len / WARPS), n_heads, num_rows).
#define ATTENTION_GENERIC(T, N)                                                                              \
    extern "C" __global__ void __launch_bounds__(32 * generic::WARPS)                                        \
        attention_generic_##N(T* out, const T* q, const T* k, const T* v, const int* cu_seqlens,               \
                              engine_attention_params p) {                                                   \
        generic::attention_body<T>(out, q, k, v, cu_seqlens, p);                                             \
    }
ENGINE_FOR_FLOAT_TYPES(ATTENTION_GENERIC)
