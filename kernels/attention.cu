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
//   Both forward kernels optionally (lse != nullptr) write the log-sum-exp of every (token,
//   query head)'s logits, f32, natural log, for the backward.
//
// Backward (flash-attention-2 style: P recomputed from the forward's log-sum-exp, no T x T
// matrix in memory, f32 accumulation, fully masked tiles skipped). With u = scale q.k,
// s = cap tanh(u / cap) (or u), P = softmax(s):
//   dV = P^T dO,  dP = dO V^T,  dS = P (dP - D) with D_i = rowsum(dO_i O_i) = sum_j P_ij dP_ij,
//   dU = dS (1 - tanh^2(u / cap)) (or dS),  dQ = scale dU K,  dK = scale dU^T Q,
// dK and dV summed over the query heads that share a KV head. Three launches:
// attention_bwd_prep_{f32,bf16,f16}: (lse, D) per (token, query head), one warp each, from the
//   forward's lse and output O (D from O as stored, i.e. rounded to T).
// attention_bwd_kv_d{64,128,256}[_variant]_{bf16,f16}: KV-tile-major. Grid (key tiles of the
//   longest row, KV heads, rows); a block owns BN = 16 KG keys of one (row, KV head), keeps K
//   and V in shared memory and dK, dV in registers, and walks every (query head of the group,
//   query tile of BM) pair that sees its keys: from the diagonal tile to the last query the
//   window lets see the tile's last key. Per step (Q, dO and the BM (lse, D) pairs loaded by
//   cp.async, the next step's prefetched when STAGES = 2):
//     S^T = K Q^T, dP^T = V dO^T   (16 keys x BM queries per warp; K, V the A operands by
//                                   ldmatrix, Q, dO the B operands as the forward's K),
//     P^T = 2^(s2 - lse2), dS^T in registers (mask as the forward, a padding query has
//       lse2 = +inf so P = 0),
//     dV += P^T dO, dK += dS^T Q   (P^T and dS^T re-packed from the accumulators as A operands,
//                                   dO and Q by ldmatrix.trans, as the forward's P V).
//   DS = 1 (head_dim 64, 128): one warp per 16 keys computes both S^T and dP^T and owns all
//   head dims of dK, dV (head_dim f32 accumulators per thread). DS = 2 (head_dim 256, whose 256
//   accumulators would not fit): two warps per 16 keys, one computing S^T and the other dP^T,
//   swapped through shared memory (f32, fragment order), each then owning half of the head dims
//   of dK and dV. Outputs are staged through shared memory and written once, 16 bytes at a time.
// attention_bwd_q_d{64,128,256}[_variant]_{bf16,f16}: query-tile-major, the forward's shape:
//   grid (query tiles, heads, rows), each warp 16 queries with dQ in registers; per key tile
//   (K, V prefetched when STAGES = 2) S = Q K^T, dP = dO V^T, dS in registers, dQ += dS K (dS
//   re-packed as the A operand, K by ldmatrix.trans).
//   dQ is not accumulated with atomics from the KV-major kernel: recomputing S and dP here costs
//   two more products (seven instead of five) but leaves no atomics, so the backward is
//   deterministic, and writes dQ once in T.
// attention_bwd_{kv,q}_generic_{f32,bf16,f16}: any head_dim <= 256, any dtype and arch, one warp
//   per key (dK, dV) or query (dQ), scalar f32 as the generic forward, exact expf/tanhf, no
//   rounding of P or dS. Also deterministic.
//   Tilings, shared memory and registers: see the instance list before ATTENTION_BWD_TYPES.
//   ptxas (sm_80/sm_90): kv ~212-255 registers, q ~200-255, none spill.
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
constexpr float LN2 = 0.6931471805599453f;

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
__device__ __forceinline__ void attention_body(T* __restrict__ out, float* __restrict__ lse, const T* __restrict__ q,
                                               const T* __restrict__ k, const T* __restrict__ v,
                                               const int* __restrict__ cu_seqlens, const engine_attention_params p) {
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
        // log-sum-exp of the row's logits (natural log) for the backward: m and sum are in log2
        // units relative to the running max.
        const int i = h ? i1 : i0;
        if (lse != nullptr && t4 == 0 && i < len)
            lse[(long long)(start + i) * p.n_heads + head] = (m[h] + log2f(sum)) * LN2;
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

// Entry points: attention_fa_d<D>[_n<BN>]_<dtype>(out, lse, q, k, v, cu_seqlens, params), block of
// fa::THREADS threads, dynamic shared memory (BM + 2 BN) * D * sizeof(T) bytes.
// MINB (blocks per SM for __launch_bounds__) caps the registers: without it ptxas caps the
// d64 instances at 128 registers and spills.
#define ATTENTION_FA(T, D, BN, MINB, NAME)                                                                 \
    extern "C" __global__ void __launch_bounds__(fa::THREADS, MINB)                                        \
        NAME(T* out, float* lse, const T* q, const T* k, const T* v, const int* cu_seqlens,                     \
             engine_attention_params p) {                                                                  \
        if constexpr (fa::Runs<T, D, BN>::value) {                                                              \
            fa::attention_body<T, D, BN>(out, lse, q, k, v, cu_seqlens, p);                                \
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
__device__ __forceinline__ void attention_body(T* __restrict__ out, float* __restrict__ lse, const T* __restrict__ q,
                                               const T* __restrict__ k, const T* __restrict__ v,
                                               const int* __restrict__ cu_seqlens, const engine_attention_params p) {
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
    if (lse != nullptr && lane == 0) lse[(long long)(start + i) * p.n_heads + head] = m + logf(l);
    T* oi = out + (long long)(start + i) * qs + (long long)head * D;
#pragma unroll
    for (int r = 0; r < PER_LANE; r++) {
        const int d = lane + 32 * r;
        if (d < D) oi[d] = from_f32<T>(o[r] * inv);
    }
}

}  // namespace generic

// attention_generic_<dtype>(out, lse, q, k, v, cu_seqlens, params): block of 32 * generic::WARPS
// threads, grid (ceil(max_len / WARPS), n_heads, num_rows).
#define ATTENTION_GENERIC(T, N)                                                                              \
    extern "C" __global__ void __launch_bounds__(32 * generic::WARPS)                                        \
        attention_generic_##N(T* out, float* lse, const T* q, const T* k, const T* v, const int* cu_seqlens,   \
                              engine_attention_params p) {                                                   \
        generic::attention_body<T>(out, lse, q, k, v, cu_seqlens, p);                                        \
    }
ENGINE_FOR_FLOAT_TYPES(ATTENTION_GENERIC)

// ---------------------------------------------------------------------------------------------
// Backward.

namespace bwd {

using fa::LdsmWalk;
using fa::swz;
constexpr float LOG2E = 1.4426950408889634f;

// Copy rows [0, ROWS) of a [*, D] slab with row stride `stride` (elements) into a swizzled
// [ROWS][D] tile with NT threads; rows >= `valid` are zero-filled.
template <typename T, int D, int ROWS, int NT>
__device__ __forceinline__ void load_rows(T* s, const T* __restrict__ g, long long stride, int valid, int tid) {
    constexpr int CPR = D / 8;       // 16-byte chunks per row
    constexpr int RS = NT / CPR;     // rows per pass; each thread keeps its chunk column
    static_assert(NT % CPR == 0 && ROWS % RS == 0, "tile copy must split evenly over the block");
    const int r_t = tid / CPR, cc = tid % CPR;
    const T* src = g + (long long)r_t * stride + cc * 8;
    const long long step = (long long)RS * stride;
#pragma unroll
    for (int x = 0; x < ROWS / RS; x++) {
        const int r = r_t + x * RS;
        const bool ok = r < valid;
        copy16(s + swz<D>(r, cc * 8), ok ? src : g, ok);
        src += step;
    }
}

// Logits in log2 units as the forward computes them: s2 = post * tanh(x * pre) with a cap
// (th = the tanh, kept for the cap's derivative 1 - th^2), x * pre without.
struct Logit {
    bool capped;
    float pre, post;
    __device__ __forceinline__ explicit Logit(const engine_attention_params& p)
        : capped(p.softcap > 0.0f),
          pre(p.softcap > 0.0f ? p.scale / p.softcap : p.scale * LOG2E),
          post(p.softcap > 0.0f ? p.softcap * LOG2E : 1.0f) {}
    // dS (before `scale`) of one (query, key) pair from its raw dot product x, dP = dO . v,
    // and the query's (lse2, D); `visible == false` gives 0. `pr` receives P.
    __device__ __forceinline__ float grad(float x, float dp, float2 ld, bool visible, float& pr) const {
        const float th = capped ? tanh_fast(x * pre) : 0.0f;
        const float s2 = visible ? (capped ? post * th : x * pre) : -INFINITY;
        pr = ex2(s2 - ld.x);  // -inf (masked, or ld.x = +inf on a padding query): 0
        float ds = pr * (dp - ld.y);
        if (capped) ds *= 1.0f - th * th;
        return ds;
    }
};

// --- dK, dV: one block per (key tile, KV head, row) --------------------------------------------

// Tiling of the dK/dV kernel: KG groups of 16 keys (BN = 16 KG keys per block); DS = 1: one warp
// per key group computes S^T and dP^T and owns all D columns of dK, dV; DS = 2: two warps per
// key group, one computing S^T and the other dP^T (exchanged through shared memory), each owning
// D / 2 columns of dK and dV. BM queries per step, STAGES = 2 prefetches the next step's Q/dO.
template <int D, int KG, int DS, int BM, int STAGES> struct Kv {
    static_assert(DS == 1 || DS == 2, "one or two warps per key group");
    static_assert(BM % 16 == 0 && (D / DS) % 64 == 0 || (DS == 1 && D % 16 == 0), "tile shape");
    static constexpr int WARPS = KG * DS, THREADS = 32 * WARPS, BN = 16 * KG, DH = D / DS;
    static constexpr int TILE_K = BN * D, TILE_Q = BM * D;
    // Bytes of dynamic shared memory (16-bit T): K, V; STAGES x (Q, dO, BM (lse2, D) pairs);
    // with DS = 2 one 16 x BM f32 exchange tile per warp (src/ops/attention/cuda.rs mirrors this).
    static constexpr int SMEM = (2 * TILE_K + 2 * STAGES * TILE_Q) * 2 + STAGES * BM * 8 + (DS == 2 ? WARPS * 16 * BM * 4 : 0);
};

template <typename T, int D, int KG, int DS, int BM, int STAGES>
__device__ __forceinline__ void kv_body(T* __restrict__ dk, T* __restrict__ dv, const T* __restrict__ q,
                                        const T* __restrict__ k, const T* __restrict__ v, const T* __restrict__ dout,
                                        const float2* __restrict__ ld, const int* __restrict__ cu_seqlens,
                                        const engine_attention_params p) {
    using C = Kv<D, KG, DS, BM, STAGES>;
    constexpr int BN = C::BN, DH = C::DH, NT = C::THREADS;
    constexpr int NQ = BM / 8;  // n8 tiles of S^T (queries) per warp
    constexpr int NA = DH / 8;  // n8 tiles of dK, dV (head dims) per warp

    extern __shared__ uint4 smem_u4[];
    T* sK = reinterpret_cast<T*>(smem_u4);
    T* sV = sK + C::TILE_K;
    T* sQ = sV + C::TILE_K;
    T* sO = sQ + STAGES * C::TILE_Q;
    float2* sLD = reinterpret_cast<float2*>(sO + STAGES * C::TILE_Q);
    float* sX = reinterpret_cast<float*>(sLD + STAGES * BM);

    const int row = blockIdx.z, kvh = blockIdx.y;
    const int start = cu_seqlens[row];
    const int len = cu_seqlens[row + 1] - start;
    const int k0 = blockIdx.x * BN;
    if (k0 >= len) return;  // the whole block: no barrier is reached

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, t4 = lane & 3;
    const int dh = warp / KG, kr0 = (warp % KG) * 16;  // this warp's column half and first key
    const int group = p.n_heads / p.n_kv_heads;
    const long long qs = (long long)p.n_heads * D, ks = (long long)p.n_kv_heads * D;
    const int W = p.window;

    // Query tiles [mt_lo, mt_lo + n_mt) hold every query that sees some key of [k0, k0 + BN):
    // from the diagonal to the last query the window lets see the tile's last key.
    const int mt_lo = k0 / BM;
    const int last_q = W > 0 ? min(len - 1, k0 + BN - 2 + W) : len - 1;
    const int n_mt = last_q / BM - mt_lo + 1;
    const int n_it = group * n_mt;  // steps: (query head of the group, query tile)

    load_rows<T, D, BN, NT>(sK, k + (long long)(start + k0) * ks + kvh * D, ks, len - k0, tid);
    load_rows<T, D, BN, NT>(sV, v + (long long)(start + k0) * ks + kvh * D, ks, len - k0, tid);
    // Q, dO and the (lse2, D) pairs of step `it` into stage `st`.
    auto load_step = [&](int it, int st) {
        const int h = kvh * group + it / n_mt, q0 = (mt_lo + it % n_mt) * BM;
        const long long off = (long long)(start + q0) * qs + (long long)h * D;
        load_rows<T, D, BM, NT>(sQ + st * C::TILE_Q, q + off, qs, len - q0, tid);
        load_rows<T, D, BM, NT>(sO + st * C::TILE_Q, dout + off, qs, len - q0, tid);
        if (tid < BM) {
            const int i = q0 + tid;
            float2 x = make_float2(INFINITY, 0.0f);  // padding query: P = 2^-inf = 0
            if (i < len) {
                x = ld[(long long)(start + i) * p.n_heads + h];
                x.x *= LOG2E;
            }
            sLD[st * BM + tid] = x;
        }
    };
    load_step(0, 0);
    copy_commit();

    const Logit logit(p);
    float adv[NA][4], adk[NA][4];
#pragma unroll
    for (int n = 0; n < NA; n++)
#pragma unroll
        for (int e = 0; e < 4; e++) adv[n][e] = adk[n][e] = 0.0f;

    // A operands (16 keys x D, row-major) from sK / sV; B operands from the [BM][D] Q / dO tiles:
    // non-transposed for S^T = K Q^T (B[d][query]), transposed for dV += P^T dO (B[query][d]).
    const int rb = (lane & 7) + ((lane >> 4) << 3), bb = (lane >> 3) & 1;
    const int rt = (lane & 7) + ((lane >> 3) & 1) * 8, bt = lane >> 4;
    const LdsmWalk<D> walk_ka(DS == 2 && dh ? sV : sK, kr0 + (lane & 15), lane >> 4);
    const LdsmWalk<D> walk_va(sV, kr0 + (lane & 15), lane >> 4);
    const LdsmWalk<D> walk_qb(DS == 2 && dh ? sO : sQ, rb, bb);
    const LdsmWalk<D> walk_ob(sO, rb, bb);
    const LdsmWalk<D> walk_qt(sQ, rt, bt), walk_ot(sO, rt, bt);
    // This warp's first column block of dK / dV, as a byte offset: LdsmWalk::at(R, c + 4 m) =
    // at(R, c) + 128 m (4 column blocks are 64 elements and leave the swizzle unchanged).
    const uint32_t col_off = (uint32_t)dh * (DH / 64) * 128;

    for (int it = 0; it < n_it; it++) {
        copy_wait_all();
        __syncthreads();  // step it landed; every warp is done with the other stage
        if (STAGES == 2 && it + 1 < n_it) {
            load_step(it + 1, (it + 1) & 1);
            copy_commit();
        }
        const int st = STAGES == 2 ? (it & 1) : 0;
        const uint32_t qoff = (uint32_t)st * C::TILE_Q * 2;
        const int q0 = (mt_lo + it % n_mt) * BM;

        // S^T = K Q^T and dP^T = V dO^T for this warp's 16 keys x BM queries.
        float s[NQ][4], dp[NQ][4];
        if constexpr (DS == 1) {
#pragma unroll
            for (int n = 0; n < NQ; n++)
#pragma unroll
                for (int e = 0; e < 4; e++) s[n][e] = dp[n][e] = 0.0f;
#pragma unroll
            for (int kk = 0; kk < D / 16; kk++) {
                uint32_t a[4], b[4];
                ldsm_x4(a, walk_ka.at(0, kk));
#pragma unroll
                for (int np = 0; np < BM / 16; np++) {
                    ldsm_x4(b, walk_qb.at(np * 16, kk) + qoff);
                    mma16816<T>(s[2 * np], a, b[0], b[1]);
                    mma16816<T>(s[2 * np + 1], a, b[2], b[3]);
                }
                ldsm_x4(a, walk_va.at(0, kk));
#pragma unroll
                for (int np = 0; np < BM / 16; np++) {
                    ldsm_x4(b, walk_ob.at(np * 16, kk) + qoff);
                    mma16816<T>(dp[2 * np], a, b[0], b[1]);
                    mma16816<T>(dp[2 * np + 1], a, b[2], b[3]);
                }
            }
        } else {
            // Warp dh = 0 computes S^T, its partner (warp ^ KG, dh = 1) dP^T; they swap results.
            float mine[NQ][4];
#pragma unroll
            for (int n = 0; n < NQ; n++)
#pragma unroll
                for (int e = 0; e < 4; e++) mine[n][e] = 0.0f;
#pragma unroll
            for (int kk = 0; kk < D / 16; kk++) {
                uint32_t a[4], b[4];
                ldsm_x4(a, walk_ka.at(0, kk));
#pragma unroll
                for (int np = 0; np < BM / 16; np++) {
                    ldsm_x4(b, walk_qb.at(np * 16, kk) + qoff);
                    mma16816<T>(mine[2 * np], a, b[0], b[1]);
                    mma16816<T>(mine[2 * np + 1], a, b[2], b[3]);
                }
            }
            // Fragment order: both warps' lanes hold the same (key, query) positions. The
            // previous step's reads of these tiles finished before this step's first barrier.
            float* xw = sX + warp * (16 * BM);
#pragma unroll
            for (int n = 0; n < NQ; n++)
#pragma unroll
                for (int e = 0; e < 4; e++) xw[(n * 4 + e) * 32 + lane] = mine[n][e];
            __syncthreads();
            const float* xo = sX + (warp ^ KG) * (16 * BM);
#pragma unroll
            for (int n = 0; n < NQ; n++)
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    const float o = xo[(n * 4 + e) * 32 + lane];
                    s[n][e] = dh ? o : mine[n][e];
                    dp[n][e] = dh ? mine[n][e] : o;
                }
        }

        // P^T and dS^T (before `scale`) in place of S^T and dP^T. Masking is needed when some
        // key lies after some query (causal) or some query is W or more past some key (window).
        const bool need_mask = (k0 + BN - 1 > q0) || (W > 0 && q0 + BM - 1 - k0 >= W);
        const float2* sl = sLD + st * BM;
#pragma unroll
        for (int n = 0; n < NQ; n++) {
            const float2 l0 = sl[n * 8 + 2 * t4], l1 = sl[n * 8 + 2 * t4 + 1];
#pragma unroll
            for (int e = 0; e < 4; e++) {
                bool vis = true;
                if (need_mask) {
                    const int j = k0 + kr0 + g + 8 * (e >> 1);
                    const int i = q0 + n * 8 + 2 * t4 + (e & 1);
                    vis = j <= i && !(W > 0 && i - j >= W);
                }
                float pr;
                dp[n][e] = logit.grad(s[n][e], dp[n][e], (e & 1) ? l1 : l0, vis, pr);
                s[n][e] = pr;
            }
        }

        // dV += P^T dO and dK += dS^T Q over this warp's columns; P^T and dS^T are re-packed
        // from the accumulators as A operands (as the forward does with P).
#pragma unroll
        for (int kk = 0; kk < BM / 16; kk++) {
            const uint32_t ap[4] = {pack2<T>(s[2 * kk][0], s[2 * kk][1]), pack2<T>(s[2 * kk][2], s[2 * kk][3]),
                                    pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                                    pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3])};
            const uint32_t ad[4] = {pack2<T>(dp[2 * kk][0], dp[2 * kk][1]), pack2<T>(dp[2 * kk][2], dp[2 * kk][3]),
                                    pack2<T>(dp[2 * kk + 1][0], dp[2 * kk + 1][1]),
                                    pack2<T>(dp[2 * kk + 1][2], dp[2 * kk + 1][3])};
#pragma unroll
            for (int c = 0; c < DH / 16; c++) {
                uint32_t b[4];
                ldsm_x4_trans(b, walk_ot.at(kk * 16, c) + qoff + col_off);
                mma16816<T>(adv[2 * c], ap, b[0], b[1]);
                mma16816<T>(adv[2 * c + 1], ap, b[2], b[3]);
                ldsm_x4_trans(b, walk_qt.at(kk * 16, c) + qoff + col_off);
                mma16816<T>(adk[2 * c], ad, b[0], b[1]);
                mma16816<T>(adk[2 * c + 1], ad, b[2], b[3]);
            }
        }

        if (STAGES == 1 && it + 1 < n_it) {
            __syncthreads();  // every warp is done with the stage
            load_step(it + 1, 0);
            copy_commit();
        }
    }

    // dV and scale * dK staged in sV and sK (no copy is in flight: the last step issued none),
    // then written out 16 bytes at a time for the keys inside the row.
    __syncthreads();
#pragma unroll
    for (int n = 0; n < NA; n++) {
#pragma unroll
        for (int h = 0; h < 2; h++) {
            const int r = kr0 + g + 8 * h, c = dh * DH + n * 8 + 2 * t4;
            *reinterpret_cast<uint32_t*>(sV + swz<D>(r, c)) = pack2<T>(adv[n][2 * h], adv[n][2 * h + 1]);
            *reinterpret_cast<uint32_t*>(sK + swz<D>(r, c)) =
                pack2<T>(adk[n][2 * h] * p.scale, adk[n][2 * h + 1] * p.scale);
        }
    }
    __syncthreads();
    constexpr int CPR = D / 8;
    for (int c = tid; c < BN * CPR; c += NT) {
        const int r = c / CPR, cc = c % CPR, j = k0 + r;
        if (j < len) {
            const long long o = (long long)(start + j) * ks + (long long)kvh * D + cc * 8;
            *reinterpret_cast<uint4*>(dk + o) = *reinterpret_cast<const uint4*>(sK + swz<D>(r, cc * 8));
            *reinterpret_cast<uint4*>(dv + o) = *reinterpret_cast<const uint4*>(sV + swz<D>(r, cc * 8));
        }
    }
}

// --- dQ: one block per (query tile, head, row) --------------------------------------------------

// Tiling of the dQ kernel: WARPS warps of 16 queries (BM = 16 WARPS), key tiles of BN keys,
// STAGES = 2 prefetches the next key tile.
template <int D, int WARPS, int BN, int STAGES> struct Qt {
    static_assert(BN % 16 == 0 && D % 64 == 0, "tile shape");
    static constexpr int THREADS = 32 * WARPS, BM = 16 * WARPS;
    static constexpr int TILE_Q = BM * D, TILE_K = BN * D;
    // Bytes of dynamic shared memory: Q, dO; STAGES x (K, V) (src/ops/attention/cuda.rs mirrors this).
    static constexpr int SMEM = (2 * TILE_Q + 2 * STAGES * TILE_K) * 2;
};

template <typename T, int D, int WARPS, int BN, int STAGES>
__device__ __forceinline__ void q_body(T* __restrict__ dq, const T* __restrict__ q, const T* __restrict__ k,
                                       const T* __restrict__ v, const T* __restrict__ dout,
                                       const float2* __restrict__ ld, const int* __restrict__ cu_seqlens,
                                       const engine_attention_params p) {
    using C = Qt<D, WARPS, BN, STAGES>;
    constexpr int BM = C::BM, NT = C::THREADS;
    constexpr int NS = BN / 8;  // n8 tiles of S per warp
    constexpr int NO = D / 8;   // n8 tiles of dQ per warp

    extern __shared__ uint4 smem_u4[];
    T* sQ = reinterpret_cast<T*>(smem_u4);
    T* sO = sQ + C::TILE_Q;
    T* sK = sO + C::TILE_Q;
    T* sV = sK + STAGES * C::TILE_K;

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
    const T* gk = k + (long long)start * ks + kvh * D;
    const T* gv = v + (long long)start * ks + kvh * D;
    const int W = p.window;

    // Key tiles [nt_lo, nt_hi] hold every key some query of [q0, q1) can see; walked from the
    // diagonal backwards.
    const int lo_key = W > 0 ? max(0, q0 - W + 1) : 0;
    const int nt_lo = lo_key / BN, nt_hi = (q1 - 1) / BN;
    const int n_it = nt_hi - nt_lo + 1;

    const long long qoff_g = (long long)(start + q0) * qs + (long long)head * D;
    load_rows<T, D, BM, NT>(sQ, q + qoff_g, qs, q1 - q0, tid);
    load_rows<T, D, BM, NT>(sO, dout + qoff_g, qs, q1 - q0, tid);
    auto load_step = [&](int it, int st) {
        const int kb = (nt_hi - it) * BN;
        load_rows<T, D, BN, NT>(sK + st * C::TILE_K, gk + (long long)kb * ks, ks, len - kb, tid);
        load_rows<T, D, BN, NT>(sV + st * C::TILE_K, gv + (long long)kb * ks, ks, len - kb, tid);
    };
    load_step(0, 0);
    copy_commit();

    const int qrow = warp * 16;    // this warp's first row in the tile
    const int i0 = q0 + qrow + g;  // row-local positions of this thread's two queries
    const int i1 = i0 + 8;
    float2 lq[2];  // (lse2, D) of queries i0, i1
#pragma unroll
    for (int h = 0; h < 2; h++) {
        const int i = h ? i1 : i0;
        lq[h] = make_float2(INFINITY, 0.0f);  // padding query: P = 0
        if (i < len) {
            lq[h] = ld[(long long)(start + i) * p.n_heads + head];
            lq[h].x *= LOG2E;
        }
    }

    const Logit logit(p);
    float acc[NO][4];
#pragma unroll
    for (int n = 0; n < NO; n++) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.0f;
    const int rb = (lane & 7) + ((lane >> 4) << 3), bb = (lane >> 3) & 1;
    const LdsmWalk<D> walk_q(sQ, qrow + (lane & 15), lane >> 4);
    const LdsmWalk<D> walk_o(sO, qrow + (lane & 15), lane >> 4);
    const LdsmWalk<D> walk_kb(sK, rb, bb), walk_vb(sV, rb, bb);
    const LdsmWalk<D> walk_kt(sK, (lane & 7) + ((lane >> 3) & 1) * 8, lane >> 4);

    for (int it = 0; it < n_it; it++) {
        copy_wait_all();
        __syncthreads();  // tile it landed; every warp is done with the other stage
        if (STAGES == 2 && it + 1 < n_it) {
            load_step(it + 1, (it + 1) & 1);
            copy_commit();
        }
        const int st = STAGES == 2 ? (it & 1) : 0;
        const uint32_t koff = (uint32_t)st * C::TILE_K * 2;
        const int k0 = (nt_hi - it) * BN;

        // S = Q K^T, dP = dO V^T
        float s[NS][4], dp[NS][4];
#pragma unroll
        for (int n = 0; n < NS; n++)
#pragma unroll
            for (int e = 0; e < 4; e++) s[n][e] = dp[n][e] = 0.0f;
#pragma unroll
        for (int kk = 0; kk < D / 16; kk++) {
            uint32_t a[4], b[4];
            ldsm_x4(a, walk_q.at(0, kk));
#pragma unroll
            for (int np = 0; np < BN / 16; np++) {
                ldsm_x4(b, walk_kb.at(np * 16, kk) + koff);
                mma16816<T>(s[2 * np], a, b[0], b[1]);
                mma16816<T>(s[2 * np + 1], a, b[2], b[3]);
            }
            ldsm_x4(a, walk_o.at(0, kk));
#pragma unroll
            for (int np = 0; np < BN / 16; np++) {
                ldsm_x4(b, walk_vb.at(np * 16, kk) + koff);
                mma16816<T>(dp[2 * np], a, b[0], b[1]);
                mma16816<T>(dp[2 * np + 1], a, b[2], b[3]);
            }
        }

        // dS (before `scale`) in place of S.
        const bool need_mask = (k0 + BN - 1 > q0) || (W > 0 && k0 <= q1 - 1 - W);
#pragma unroll
        for (int n = 0; n < NS; n++) {
#pragma unroll
            for (int e = 0; e < 4; e++) {
                bool vis = true;
                if (need_mask) {
                    const int j = k0 + n * 8 + 2 * t4 + (e & 1);
                    const int i = e < 2 ? i0 : i1;
                    vis = j <= i && !(W > 0 && i - j >= W);
                }
                float pr;
                s[n][e] = logit.grad(s[n][e], dp[n][e], lq[e >> 1], vis, pr);
            }
        }

        // dQ += dS K (K fragments transposed, as V in the forward's O += P V).
#pragma unroll
        for (int kk = 0; kk < BN / 16; kk++) {
            const uint32_t a[4] = {pack2<T>(s[2 * kk][0], s[2 * kk][1]), pack2<T>(s[2 * kk][2], s[2 * kk][3]),
                                   pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                                   pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
            for (int c = 0; c < D / 16; c++) {
                uint32_t b[4];
                ldsm_x4_trans(b, walk_kt.at(kk * 16, c) + koff);
                mma16816<T>(acc[2 * c], a, b[0], b[1]);
                mma16816<T>(acc[2 * c + 1], a, b[2], b[3]);
            }
        }

        if (STAGES == 1 && it + 1 < n_it) {
            __syncthreads();  // every warp is done with the stage
            load_step(it + 1, 0);
            copy_commit();
        }
    }

    // scale * dQ, staged in this warp's own 16 rows of sQ (only this warp ever read them), then
    // written out 16 bytes at a time for the rows inside the sequence.
    __syncwarp();
#pragma unroll
    for (int n = 0; n < NO; n++) {
#pragma unroll
        for (int h = 0; h < 2; h++) {
            const int r = qrow + g + 8 * h;
            *reinterpret_cast<uint32_t*>(sQ + swz<D>(r, n * 8 + 2 * t4)) =
                pack2<T>(acc[n][2 * h] * p.scale, acc[n][2 * h + 1] * p.scale);
        }
    }
    __syncwarp();
    constexpr int CPR = D / 8;
#pragma unroll
    for (int c = lane; c < 16 * CPR; c += 32) {
        const int r = c / CPR, cc = c % CPR;
        const int i = q0 + qrow + r;
        if (i < len)
            *reinterpret_cast<uint4*>(dq + (long long)(start + i) * qs + (long long)head * D + cc * 8) =
                *reinterpret_cast<const uint4*>(sQ + swz<D>(qrow + r, cc * 8));
    }
}

// Whether an instance with SMEM bytes of shared memory can run on this compilation target (as
// fa::Runs): bf16 mma needs sm_80, and sm_75 has at most 64 KB per block.
template <typename T, int SMEM> struct Runs {
    static constexpr bool value =
        (std::is_same<T, bf16>::value ? fa::ARCH >= 800 : fa::ARCH >= 750) && (fa::ARCH >= 800 || SMEM <= 64 * 1024);
};

// --- (lse, D) per (token, head) -----------------------------------------------------------------

constexpr int PREP_WARPS = 4;  // (token, head) pairs per block (must match src/ops/attention/cuda.rs)

// ld[t, h] = (lse[t, h], D[t, h] = sum_d dout[t, h, d] out[t, h, d]); one warp per (token, head).
template <typename T>
__device__ __forceinline__ void prep_body(float2* __restrict__ ld, const float* __restrict__ lse,
                                          const T* __restrict__ out, const T* __restrict__ dout,
                                          const engine_attention_params p) {
    const long long w = (long long)blockIdx.x * PREP_WARPS + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    if (w >= (long long)p.total_tokens * p.n_heads) return;
    const int D = p.head_dim;
    const T* o = out + w * D;
    const T* d = dout + w * D;
    constexpr int N = Pack<T>::N;
    float acc = 0.0f;
    if (D % N == 0) {  // rows are 16-byte aligned: vector loads
        for (int c = lane * N; c < D; c += 32 * N) {
            float a[N], b[N];
            load_pack(o + c, a);
            load_pack(d + c, b);
#pragma unroll
            for (int x = 0; x < N; x++) acc += a[x] * b[x];
        }
    } else {
        for (int c = lane; c < D; c += 32) acc += to_f32(o[c]) * to_f32(d[c]);
    }
    acc = warp_sum(acc);
    if (lane == 0) ld[w] = make_float2(lse[w], acc);
}

// --- The generic kernels: any head_dim <= 256, any dtype, any arch ------------------------------

constexpr int G_WARPS = 4;  // keys / queries per block (must match src/ops/attention/cuda.rs)
constexpr int G_MAX_D = 256;
constexpr int G_PER_LANE = G_MAX_D / 32;

// Exact logit of a raw dot product (natural units, as generic::attention_body), with tanh kept.
__device__ __forceinline__ float generic_grad(float dot, float dp, float2 ld, const engine_attention_params& p) {
    const float u = dot * p.scale;
    float s = u, dcap = 1.0f;
    if (p.softcap > 0.0f) {
        const float th = tanhf(u / p.softcap);
        s = p.softcap * th;
        dcap = 1.0f - th * th;
    }
    const float pr = expf(s - ld.x);
    return pr * (dp - ld.y) * dcap;
}

// dK, dV of one key per warp: queries 32 at a time, one per lane (full dot products against the
// key and value staged in shared memory), then dV += p dO_i and dK += dS q_i with lanes
// splitting the head dims.
template <typename T>
__device__ __forceinline__ void kv_generic_body(T* __restrict__ dk, T* __restrict__ dv, const T* __restrict__ q,
                                                const T* __restrict__ k, const T* __restrict__ v,
                                                const T* __restrict__ dout, const float2* __restrict__ ld,
                                                const int* __restrict__ cu_seqlens, const engine_attention_params p) {
    __shared__ float sk[G_WARPS][G_MAX_D], sv[G_WARPS][G_MAX_D];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int row = blockIdx.z, kvh = blockIdx.y;
    const int start = cu_seqlens[row];
    const int len = cu_seqlens[row + 1] - start;
    const int j = blockIdx.x * G_WARPS + warp;  // this warp's key (row-local)
    if (j >= len) return;                       // warps are independent: no block barrier below
    const int D = p.head_dim;
    const int group = p.n_heads / p.n_kv_heads;
    const long long qs = (long long)p.n_heads * D, ks = (long long)p.n_kv_heads * D;
    const long long kj = (long long)(start + j) * ks + (long long)kvh * D;
    for (int d = lane; d < D; d += 32) {
        sk[warp][d] = to_f32(k[kj + d]);
        sv[warp][d] = to_f32(v[kj + d]);
    }
    __syncwarp();
    float adk[G_PER_LANE], adv[G_PER_LANE];
#pragma unroll
    for (int r = 0; r < G_PER_LANE; r++) adk[r] = adv[r] = 0.0f;
    const int i_end = p.window > 0 ? min(len, j + p.window) : len;  // queries j <= i < i_end see j
    for (int h = kvh * group; h < (kvh + 1) * group; h++) {
        for (int i0 = j; i0 < i_end; i0 += 32) {
            const int i = i0 + lane;
            float pr = 0.0f, ds = 0.0f;
            if (i < i_end) {
                const long long qi = (long long)(start + i) * qs + (long long)h * D;
                float dot = 0.0f, dpv = 0.0f;
                for (int d = 0; d < D; d++) {
                    dot += sk[warp][d] * to_f32(q[qi + d]);
                    dpv += sv[warp][d] * to_f32(dout[qi + d]);
                }
                const float2 l = ld[(long long)(start + i) * p.n_heads + h];
                const float u = dot * p.scale;
                const float s = p.softcap > 0.0f ? p.softcap * tanhf(u / p.softcap) : u;
                pr = expf(s - l.x);
                ds = generic_grad(dot, dpv, l, p);
            }
            const int n = min(32, i_end - i0);
            for (int kk = 0; kk < n; kk++) {
                const float pk = __shfl_sync(0xffffffffu, pr, kk);
                const float dsk = __shfl_sync(0xffffffffu, ds, kk);
                const long long qi = (long long)(start + i0 + kk) * qs + (long long)h * D;
#pragma unroll
                for (int r = 0; r < G_PER_LANE; r++) {
                    const int d = lane + 32 * r;
                    if (d < D) {
                        adv[r] += pk * to_f32(dout[qi + d]);
                        adk[r] += dsk * to_f32(q[qi + d]);
                    }
                }
            }
        }
    }
#pragma unroll
    for (int r = 0; r < G_PER_LANE; r++) {
        const int d = lane + 32 * r;
        if (d < D) {
            dk[kj + d] = from_f32<T>(adk[r] * p.scale);
            dv[kj + d] = from_f32<T>(adv[r]);
        }
    }
}

// dQ of one query per warp: keys 32 at a time, one per lane (dot products against the query and
// dO staged in shared memory), then dQ += dS k_j with lanes splitting the head dims.
template <typename T>
__device__ __forceinline__ void q_generic_body(T* __restrict__ dq, const T* __restrict__ q, const T* __restrict__ k,
                                               const T* __restrict__ v, const T* __restrict__ dout,
                                               const float2* __restrict__ ld, const int* __restrict__ cu_seqlens,
                                               const engine_attention_params p) {
    __shared__ float sq[G_WARPS][G_MAX_D], so[G_WARPS][G_MAX_D];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int row = blockIdx.z, head = blockIdx.y;
    const int start = cu_seqlens[row];
    const int len = cu_seqlens[row + 1] - start;
    const int i = blockIdx.x * G_WARPS + warp;  // this warp's query (row-local)
    if (i >= len) return;                       // warps are independent: no block barrier below
    const int D = p.head_dim;
    const int kvh = head / (p.n_heads / p.n_kv_heads);
    const long long qs = (long long)p.n_heads * D, ks = (long long)p.n_kv_heads * D;
    const long long qi = (long long)(start + i) * qs + (long long)head * D;
    const T* kb = k + (long long)start * ks + (long long)kvh * D;
    const T* vb = v + (long long)start * ks + (long long)kvh * D;
    for (int d = lane; d < D; d += 32) {
        sq[warp][d] = to_f32(q[qi + d]);
        so[warp][d] = to_f32(dout[qi + d]);
    }
    __syncwarp();
    const float2 l = ld[(long long)(start + i) * p.n_heads + head];
    float acc[G_PER_LANE];
#pragma unroll
    for (int r = 0; r < G_PER_LANE; r++) acc[r] = 0.0f;
    const int lo = p.window > 0 ? max(0, i - p.window + 1) : 0;
    for (int j0 = lo; j0 <= i; j0 += 32) {
        const int j = j0 + lane;
        float ds = 0.0f;
        if (j <= i) {
            const T* kj = kb + (long long)j * ks;
            const T* vj = vb + (long long)j * ks;
            float dot = 0.0f, dpv = 0.0f;
            for (int d = 0; d < D; d++) {
                dot += sq[warp][d] * to_f32(kj[d]);
                dpv += so[warp][d] * to_f32(vj[d]);
            }
            ds = generic_grad(dot, dpv, l, p);
        }
        const int n = min(32, i - j0 + 1);
#pragma unroll 1  // unrolled, ptxas spills on sm_90
        for (int kk = 0; kk < n; kk++) {
            const float dsk = __shfl_sync(0xffffffffu, ds, kk);
            const T* kj = kb + (long long)(j0 + kk) * ks;
#pragma unroll
            for (int r = 0; r < G_PER_LANE; r++) {
                const int d = lane + 32 * r;
                if (d < D) acc[r] += dsk * to_f32(kj[d]);
            }
        }
    }
#pragma unroll
    for (int r = 0; r < G_PER_LANE; r++) {
        const int d = lane + 32 * r;
        if (d < D) dq[qi + d] = from_f32<T>(acc[r] * p.scale);
    }
}

}  // namespace bwd

// Entry points of the backward (names and argument orders are mirrored by
// src/ops/attention/cuda.rs):
//   attention_bwd_prep_<dtype>(ld, lse, out, dout, params): block of 32 * bwd::PREP_WARPS,
//     grid ceil(total_tokens * n_heads / PREP_WARPS).
//   attention_bwd_kv_d<D>[_<variant>]_<dtype>(dk, dv, q, k, v, dout, ld, cu_seqlens, params):
//     block of 32 KG DS threads, grid (key tiles of the longest row, n_kv_heads, rows), dynamic
//     shared memory bwd::Kv<...>::SMEM.
//   attention_bwd_q_d<D>[_<variant>]_<dtype>(dq, q, k, v, dout, ld, cu_seqlens, params): block of
//     32 WARPS threads, grid (query tiles of the longest row, n_heads, rows), dynamic shared
//     memory bwd::Qt<...>::SMEM.
//   attention_bwd_{kv,q}_generic_<dtype>(same arguments): block of 32 * bwd::G_WARPS, grid
//     (ceil(longest row / G_WARPS), n_kv_heads resp. n_heads, rows), no dynamic shared memory.
#define ATTENTION_BWD_KV(T, D, KG, DS, BM, ST, MINB, NAME)                                                    \
    extern "C" __global__ void __launch_bounds__(32 * KG * DS, MINB)                                         \
        NAME(T* dk, T* dv, const T* q, const T* k, const T* v, const T* dout, const float2* ld,               \
             const int* cu_seqlens, engine_attention_params p) {                                             \
        if constexpr (bwd::Runs<T, bwd::Kv<D, KG, DS, BM, ST>::SMEM>::value) {                               \
            bwd::kv_body<T, D, KG, DS, BM, ST>(dk, dv, q, k, v, dout, ld, cu_seqlens, p);                    \
        } else {                                                                                             \
            __trap();                                                                                        \
        }                                                                                                    \
    }
#define ATTENTION_BWD_Q(T, D, WARPS, BN, ST, MINB, NAME)                                                      \
    extern "C" __global__ void __launch_bounds__(32 * WARPS, MINB)                                           \
        NAME(T* dq, const T* q, const T* k, const T* v, const T* dout, const float2* ld, const int* cu_seqlens, \
             engine_attention_params p) {                                                                    \
        if constexpr (bwd::Runs<T, bwd::Qt<D, WARPS, BN, ST>::SMEM>::value) {                                \
            bwd::q_body<T, D, WARPS, BN, ST>(dq, q, k, v, dout, ld, cu_seqlens, p);                          \
        } else {                                                                                             \
            __trap();                                                                                        \
        }                                                                                                    \
    }
// The instances, in the launcher's order of preference (largest tiles first; the launcher takes
// the first whose shared memory the device grants):
//   kv d64:  KG 4, DS 1, BM 64, 2 stages   (49 KB)
//   kv d128: KG 4, DS 1, BM 32, 2 stages   (64.5 KB); _s1: 1 stage (48.3 KB, sm_75)
//   kv d256: KG 4, DS 2, BM 32, 2 stages   (144.5 KB, sm_80/sm_90);
//            _n32: KG 2, DS 2, BM 32, 1 stage (72.3 KB, sm_86/sm_89);
//            _n32_m16: KG 2, DS 2, BM 16, 1 stage (52.1 KB, sm_75)
//   q d64:   4 warps, BN 64, 2 stages      (48 KB)
//   q d128:  4 warps, BN 64, 2 stages      (96 KB); _s1: 1 stage (64 KB, sm_75)
//   q d256:  4 warps, BN 32, 2 stages      (128 KB); _s1: 1 stage (96 KB, sm_86/sm_89);
//            _m32: 2 warps, BN 16, 1 stage (48 KB, sm_75)
#define ATTENTION_BWD_TYPES(T, N)                                                  \
    ATTENTION_BWD_KV(T, 64, 4, 1, 64, 2, 2, attention_bwd_kv_d64_##N)              \
    ATTENTION_BWD_KV(T, 128, 4, 1, 32, 2, 1, attention_bwd_kv_d128_##N)            \
    ATTENTION_BWD_KV(T, 256, 4, 2, 32, 2, 1, attention_bwd_kv_d256_##N)            \
    ATTENTION_BWD_KV(T, 256, 2, 2, 32, 1, 1, attention_bwd_kv_d256_n32_##N)        \
    ATTENTION_BWD_Q(T, 64, 4, 64, 2, 2, attention_bwd_q_d64_##N)                   \
    ATTENTION_BWD_Q(T, 128, 4, 64, 2, 1, attention_bwd_q_d128_##N)                 \
    ATTENTION_BWD_Q(T, 256, 4, 32, 2, 1, attention_bwd_q_d256_##N)                 \
    ATTENTION_BWD_Q(T, 256, 4, 32, 1, 1, attention_bwd_q_d256_s1_##N)
ATTENTION_BWD_TYPES(bf16, bf16)
ATTENTION_BWD_TYPES(f16, f16)
// sm_75 (64 KB of shared memory per block, f16 only).
ATTENTION_BWD_KV(f16, 128, 4, 1, 32, 1, 1, attention_bwd_kv_d128_s1_f16)
ATTENTION_BWD_KV(f16, 256, 2, 2, 16, 1, 1, attention_bwd_kv_d256_n32_m16_f16)
ATTENTION_BWD_Q(f16, 128, 4, 64, 1, 1, attention_bwd_q_d128_s1_f16)
ATTENTION_BWD_Q(f16, 256, 2, 16, 1, 1, attention_bwd_q_d256_m32_f16)

#define ATTENTION_BWD_GENERIC(T, N)                                                                            \
    extern "C" __global__ void __launch_bounds__(32 * bwd::PREP_WARPS)                                         \
        attention_bwd_prep_##N(float2* ld, const float* lse, const T* out, const T* dout,                      \
                               engine_attention_params p) {                                                    \
        bwd::prep_body<T>(ld, lse, out, dout, p);                                                              \
    }                                                                                                          \
    extern "C" __global__ void __launch_bounds__(32 * bwd::G_WARPS)                                            \
        attention_bwd_kv_generic_##N(T* dk, T* dv, const T* q, const T* k, const T* v, const T* dout,          \
                                     const float2* ld, const int* cu_seqlens, engine_attention_params p) {     \
        bwd::kv_generic_body<T>(dk, dv, q, k, v, dout, ld, cu_seqlens, p);                                     \
    }                                                                                                          \
    extern "C" __global__ void __launch_bounds__(32 * bwd::G_WARPS)                                            \
        attention_bwd_q_generic_##N(T* dq, const T* q, const T* k, const T* v, const T* dout,                  \
                                    const float2* ld, const int* cu_seqlens, engine_attention_params p) {      \
        bwd::q_generic_body<T>(dq, q, k, v, dout, ld, cu_seqlens, p);                                          \
    }
ENGINE_FOR_FLOAT_TYPES(ATTENTION_BWD_GENERIC)
