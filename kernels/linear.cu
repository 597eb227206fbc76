// The matmul family: y[M, N] = x[M, K] . W[N, K]^T (+ s . h[M, r] . B[N, r]^T), where W is a
// frozen base weight (NF4 or dense), h = x . A^T is the LoRA down-projection and s its scale.
// x, h, A, B and y are row-major in the activation type T (bf16 or f16; f32 on the SIMT path);
// all arithmetic accumulates in f32 and y is rounded to T once, at the end.
//
// Kernels (one templated body each, entry points `<name>_<dtype>`):
//   matmul_tc_nf4 / matmul_tc_dense   tensor-core GEMM, NF4 or dense-T weight (bf16: sm_80+;
//                                     f16: sm_80+ m16n8k16, sm_75 two m16n8k8)
//   matmul_simt_nf4 / matmul_simt_dense  the generic fallback: plain f32 FMAs, any shape
//                                     (bf16 on sm_75, x in f32, K not a multiple of 64 for NF4
//                                     or of 8 for dense)
//   matmul_f32w                       dense f32 weight with a small N (the 3-class score head):
//                                     one warp per output element, f32 output
//   splitk_reduce                     y = round_T(sum over splits of the f32 partial sums)
//   nf4_dequantize / nf4_quantize     the whole weight to T / f32, and back (bit-identical to
//                                     bitsandbytes and to src/quant/nf4.rs)
//   linear_bwd_*                      the backward pass (input gradient through the frozen NF4 or
//                                     dense weight, LoRA gradients, the score head): see the
//                                     "Backward" section at the end of this file
//
// NF4 layout (src/quant/nf4.rs, as bitsandbytes): W is flattened row-major (element e = n*K + k)
// and cut into blocks of 64; byte e/2 holds element e in its high nibble when e is even, in the
// low nibble when odd; absmax[e/64] is f32, or with double quantisation
//   absmax[b] = code8[q[b]] * absmax2[b / 256] + offset      (a rounded product, then a sum)
// and the weight value is NF4_CODE[nibble] * absmax[b] in f32. Before it meets x it is rounded
// to T (bitsandbytes dequantises to the compute dtype, then cuBLAS multiplies), so both GEMM
// paths round it: the tensor cores need T anyway, and the SIMT path rounds explicitly.
//
// Tensor-core GEMM (matmul_tc_*): a block computes a 128x128 tile of y with 8 warps (256
// threads) laid out 2 (M) x 4 (N); each warp owns 64x32 = 4x4 mma tiles of 16x8, i.e. 64 f32
// accumulators per thread. The K loop steps by BK = 32:
//   - x tiles (and dense-W tiles) go global -> shared with cp.async, 3 stages deep, so two
//     tiles are in flight while one is multiplied;
//   - NF4 tiles are register-staged: each thread loads 8 packed bytes (16 weights of one row,
//     always inside one 64-block because K % 64 == 0 on this path) plus that block's absmax for
//     tile kt+1 before the MMAs of tile kt, and dequantises them into the second of two shared
//     buffers after them — the weight is never materialised in global memory;
//   - shared tiles are [rows][32] of T (64-byte rows) with the 16-byte chunks XOR-swizzled,
//     chunk' = chunk ^ ((row >> 1) & 3), so that ldmatrix (8 rows x 16 bytes) and the 16-byte
//     stores are bank-conflict free without padding (3 x 8 KiB for x + 3 x 8 KiB (dense) or
//     2 x 8 KiB (NF4) for W: at most 48 KiB of static shared memory, two blocks per SM);
//   - fragments (PTX ISA, mma.m16n8k16.row.col): with g = lane / 4, t = lane % 4,
//       A (16x16, row-major): a0 = (g, 2t..2t+1), a1 = (g+8, 2t..), a2 = (g, 2t+8..), a3 = (g+8, 2t+8..)
//       B (16x8, "col"):      b0 = (k 2t..2t+1, n g), b1 = (k 2t+8.., n g)
//       C (16x8, f32):        c0,c1 = (g, 2t..2t+1), c2,c3 = (g+8, 2t..2t+1)
//     A comes from x's [m][k] tile by ldmatrix.x4 (matrices: rows 0-7/8-15 x cols 0-7/8-15);
//     B comes from W's [n][k] tile by ldmatrix.x4 without transpose, two n8 tiles per load;
//   - LoRA is fused as r extra K steps after the K loop, [x | h] . [W | B]^T, into the same
//     accumulators: acc is divided by s first and multiplied by s after, so y = s.(xW/s + hB)
//     (two f32 roundings, ~1e-7 relative) without rounding s.B to T;
//   - blocks are rasterised in groups of 8 M-tiles so that concurrently running blocks share
//     weight tiles in L2;
//   - split-K (grid.z > 1, used when the tile grid cannot fill the GPU, e.g. the LoRA
//     down-projection with N = r or a handful of tokens): each split writes f32 partial sums
//     and splitk_reduce adds them in a fixed order and rounds once; LoRA runs in split 0.
// Edges: rows of x / W beyond M / N load as zeros and are never stored; K is masked per
// 16-byte chunk (dense K % 8 == 0), so M, N, K need not be multiples of the tile.
//
// SIMT fallback (matmul_simt_*): 64x64 tiles, 256 threads of 4x4 outputs, BK = 16, every
// element bounds-checked and the NF4 weight indexed by its flat position (so 64-blocks may
// straddle rows), the same LoRA and split-K conventions as the tensor-core kernel.
#include "common.cuh"

// ---------------------------------------------------------------------------------------------
// Shared helpers
// ---------------------------------------------------------------------------------------------

// Where the weight and its scales live; unused pointers are null.
struct WeightRef {
    const void* w;            // packed NF4 bytes, or dense W[N, K] of T
    const float* absmax;      // plain: f32 per 64-block
    const uint8_t* absmax_q;  // double quant: u8 index per 64-block ...
    const float* absmax2;     // ... f32 scale per 256 blocks ...
    const float* code8;       // ... into this 256-entry code
};

// 16 floats by value: the NF4 code values (src/quant/nf4.rs NF4_CODE) for the kernels that
// dequantise, or its 15 decision thresholds for the quantiser. The host passes them, so the
// tables have one source of truth.
struct Nf4Table {
    float v[16];
};

__device__ __forceinline__ float nf4_absmax(const WeightRef& w, const engine_matmul_params& p, size_t block) {
    if (p.double_quant) {
        const float a = __fmul_rn(w.code8[w.absmax_q[block]], w.absmax2[block / ENGINE_ABSMAX_BLOCK]);
        return __fadd_rn(a, p.absmax_offset);
    }
    return w.absmax[block];
}

// Copy the code table into shared memory (a warp's 16 distinct indices then hit 16 distinct
// banks). The caller synchronises before the first lookup.
__device__ __forceinline__ void load_code_table(float* s_code, const Nf4Table& code) {
    // Constant indices only: a dynamic index into a kernel parameter would copy it to the stack.
#pragma unroll
    for (int i = 0; i < 16; i++)
        if (threadIdx.x == i) s_code[i] = code.v[i];
}

// Two values rounded to T and packed into 32 bits, `first` at the lower address.
template <typename T> struct Vec2;
template <> struct Vec2<bf16> {
    static __device__ __forceinline__ uint32_t pack(float first, float second) {
        __nv_bfloat162 v = __floats2bfloat162_rn(first, second);
        return *reinterpret_cast<uint32_t*>(&v);
    }
};
template <> struct Vec2<f16> {
    static __device__ __forceinline__ uint32_t pack(float first, float second) {
        __half2 v = __floats2half2_rn(first, second);
        return *reinterpret_cast<uint32_t*>(&v);
    }
};

// Store y[m, n] and y[m, n + 1] (when inside N) in T; a paired 4-byte store when aligned.
template <typename T>
__device__ __forceinline__ void store_pair(T* __restrict__ y, int M, int N, int m, int n, float v0, float v1) {
    if (m >= M) return;
    T* row = y + (size_t)m * N;
    if constexpr (sizeof(T) == 2) {
        if (n + 1 < N && (N & 1) == 0) {
            *reinterpret_cast<uint32_t*>(row + n) = Vec2<T>::pack(v0, v1);
            return;
        }
    }
    if (n < N) row[n] = from_f32<T>(v0);
    if (n + 1 < N) row[n + 1] = from_f32<T>(v1);
}

__device__ __forceinline__ void store_pair_f32(float* __restrict__ y, int M, int N, int m, int n, float v0, float v1) {
    if (m >= M) return;
    float* row = y + (size_t)m * N;
    if (n < N) row[n] = v0;
    if (n + 1 < N) row[n + 1] = v1;
}

// Block index -> (m tile, n tile), grouping GROUP_M consecutive M-tiles so that a wave of
// blocks reuses the same weight tiles from L2.
__device__ __forceinline__ void raster(int tiles_m, int tiles_n, int& tm, int& tn) {
    constexpr int GROUP_M = 8;
    const int pid = blockIdx.x;
    const int per_group = GROUP_M * tiles_n;
    const int first_m = (pid / per_group) * GROUP_M;
    const int group_rows = min(tiles_m - first_m, GROUP_M);
    tm = first_m + (pid % per_group) % group_rows;
    tn = (pid % per_group) / group_rows;
}

// ---------------------------------------------------------------------------------------------
// PTX wrappers: cp.async, ldmatrix, mma
// ---------------------------------------------------------------------------------------------

__device__ __forceinline__ uint32_t smem_addr(const void* p) { return (uint32_t)__cvta_generic_to_shared(p); }

// 16 bytes global -> shared; zero-filled when !pred (then `src` is not read).
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool pred) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src), "r"(pred ? 16 : 0)
                 : "memory");
#else
    // sm_75 has no cp.async: a synchronous copy keeps the same pipeline code correct.
    *reinterpret_cast<uint4*>(dst) = pred ? *reinterpret_cast<const uint4*>(src) : make_uint4(0, 0, 0, 0);
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

// Wait until at most `N` committed groups are still in flight.
template <int N> __device__ __forceinline__ void cp_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(p))
                 : "memory");
}

// d += a . b for one 16x8x16 tile (fragments as in the header comment).
template <typename T> struct Mma;

template <> struct Mma<bf16> {
    static __device__ __forceinline__ void run(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
            "{%0, %1, %2, %3};\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
        __trap();  // no bf16 tensor cores before sm_80: the host never launches this
#endif
    }
};

template <> struct Mma<f16> {
    static __device__ __forceinline__ void run(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
            "{%0, %1, %2, %3};\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
        // sm_75: k16 = two k8 steps; (a0, a1, b0) hold k 0..7, (a2, a3, b1) k 8..15.
        asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5}, {%6}, {%0, %1, %2, %3};\n"
                     : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                     : "r"(a[0]), "r"(a[1]), "r"(b[0]));
        asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5}, {%6}, {%0, %1, %2, %3};\n"
                     : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                     : "r"(a[2]), "r"(a[3]), "r"(b[1]));
#endif
    }
};

// ---------------------------------------------------------------------------------------------
// Tensor-core GEMM
// ---------------------------------------------------------------------------------------------

namespace tc {
constexpr int BM = 128, BN = 128, BK = 32;  // block tile
constexpr int THREADS = 256;                 // 8 warps, 2 (M) x 4 (N)
constexpr int WM = 64, WN = 32;              // warp tile
constexpr int MI = WM / 16, NI = WN / 8;     // mma tiles per warp: 4 x 4
constexpr int STAGES = 3;                    // cp.async depth for x (and dense W)
constexpr int TILE = BM * BK;                // elements of one shared tile (BM == BN)
static_assert(BM == BN, "x and W tiles share the loaders");
static_assert(BK == 32, "the swizzle assumes 64-byte rows of 16-bit elements");

// Element offset of 16-byte chunk `c` (0..3) of row `r` in a swizzled [rows][32] tile.
__device__ __forceinline__ int swz(int r, int c) { return r * BK + ((c ^ ((r >> 1) & 3)) << 3); }

// Rows [row0, row0 + 128) x columns [k0, k0 + 32) of a row-major matrix (leading dimension
// ld) -> a shared tile; rows >= rows_end and columns >= k_end are zero-filled. Two 16-byte
// chunks per thread.
template <typename T>
__device__ __forceinline__ void load_tile_async(T* dst, const T* __restrict__ src, int row0, int rows_end, int ld,
                                                int k0, int k_end) {
#pragma unroll
    for (int i = 0; i < 2; i++) {
        const int id = threadIdx.x + i * THREADS;
        const int r = id >> 2, c = id & 3;
        const int gr = row0 + r, gk = k0 + c * 8;
        const bool ok = gr < rows_end && gk < k_end;
        const T* g = ok ? src + (size_t)gr * ld + gk : src;
        cp_async16(dst + swz(r, c), g, ok);
    }
}

// One thread's share of an NF4 weight tile: 8 packed bytes (16 weights of one row) and the
// absmax of their 64-block.
struct Nf4Regs {
    uint2 bytes;
    float scale;
};

__device__ __forceinline__ Nf4Regs nf4_fetch(const WeightRef& w, const engine_matmul_params& p, int n0, int k0) {
    const int r = threadIdx.x >> 1, half = threadIdx.x & 1;
    const int n = n0 + r;
    Nf4Regs out;
    if (n < p.n) {
        const size_t e = (size_t)n * p.k + k0 + half * 16;  // first of 16 weights, inside one 64-block
        out.bytes = __ldg(reinterpret_cast<const uint2*>(static_cast<const uint8_t*>(w.w) + e / 2));
        out.scale = nf4_absmax(w, p, e / ENGINE_NF4_BLOCK);
    } else {
        out.bytes = make_uint2(0, 0);
        out.scale = 0.0f;
    }
    return out;
}

// Dequantise one thread's 16 weights to T into the shared W tile (two 16-byte chunks).
template <typename T>
__device__ __forceinline__ void nf4_store(T* dst, const Nf4Regs& q, const float* s_code) {
    const int r = threadIdx.x >> 1, half = threadIdx.x & 1;
    uint32_t out[8];
#pragma unroll
    for (int j = 0; j < 8; j++) {
        const uint32_t word = j < 4 ? q.bytes.x : q.bytes.y;  // little-endian: byte j%4 of the word
        const uint32_t byte = (word >> (8 * (j & 3))) & 0xffu;
        const float even = __fmul_rn(s_code[byte >> 4], q.scale);  // high nibble
        const float odd = __fmul_rn(s_code[byte & 0xfu], q.scale);  // low nibble
        out[j] = Vec2<T>::pack(even, odd);
    }
    *reinterpret_cast<uint4*>(dst + swz(r, half * 2)) = make_uint4(out[0], out[1], out[2], out[3]);
    *reinterpret_cast<uint4*>(dst + swz(r, half * 2 + 1)) = make_uint4(out[4], out[5], out[6], out[7]);
}

// Element-wise tile load for the LoRA steps (r is small and need not be a multiple of 8).
template <typename T>
__device__ __forceinline__ void load_tile_scalar(T* dst, const T* __restrict__ src, int row0, int rows_end, int ld,
                                                 int k0, int k_end) {
    for (int id = threadIdx.x; id < TILE; id += THREADS) {
        const int r = id / BK, c = id % BK;
        const int gr = row0 + r, gk = k0 + c;
        dst[swz(r, c >> 3) + (c & 7)] = (gr < rows_end && gk < k_end) ? src[(size_t)gr * ld + gk] : from_f32<T>(0.0f);
    }
}

// acc += A_tile . B_tile^T for one BK step of this warp's 64x32 sub-tile.
template <typename T>
__device__ __forceinline__ void mma_tile(const T* As, const T* Bs, float (&acc)[MI][NI][4], int warp_m, int warp_n) {
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int ks = 0; ks < BK / 16; ks++) {
        uint32_t a[MI][4], b[NI][2];
#pragma unroll
        for (int mi = 0; mi < MI; mi++) {
            const int row = warp_m * WM + mi * 16 + (lane & 15);
            ldmatrix_x4(a[mi], As + swz(row, ks * 2 + (lane >> 4)));
        }
#pragma unroll
        for (int nj = 0; nj < NI / 2; nj++) {
            // matrices: (n 0-7, k 0-7), (n 0-7, k 8-15), (n 8-15, k 0-7), (n 8-15, k 8-15)
            const int row = warp_n * WN + nj * 16 + (lane & 7) + ((lane >> 4) << 3);
            uint32_t r[4];
            ldmatrix_x4(r, Bs + swz(row, ks * 2 + ((lane >> 3) & 1)));
            b[2 * nj][0] = r[0];
            b[2 * nj][1] = r[1];
            b[2 * nj + 1][0] = r[2];
            b[2 * nj + 1][1] = r[3];
        }
#pragma unroll
        for (int mi = 0; mi < MI; mi++)
#pragma unroll
            for (int ni = 0; ni < NI; ni++) Mma<T>::run(acc[mi][ni], a[mi], b[ni]);
    }
}

__device__ __forceinline__ void scale_acc(float (&acc)[MI][NI][4], float s) {
#pragma unroll
    for (int mi = 0; mi < MI; mi++)
#pragma unroll
        for (int ni = 0; ni < NI; ni++)
#pragma unroll
            for (int c = 0; c < 4; c++) acc[mi][ni][c] *= s;
}

// Shared memory: x stages, then W stages (3 dense / 2 NF4), then the NF4 code table.
template <typename T, bool NF4> struct Smem {
    static constexpr int B_STAGES = NF4 ? 2 : STAGES;
    static constexpr int BYTES = (STAGES + B_STAGES) * TILE * (int)sizeof(T) + (NF4 ? 16 * (int)sizeof(float) : 0);
};

template <typename T, bool NF4>
__device__ void gemm_body(T* __restrict__ y, float* __restrict__ partial, const T* __restrict__ x, WeightRef w,
                          const T* __restrict__ lora_h, const T* __restrict__ lora_b, engine_matmul_params p,
                          int k_per_split, const Nf4Table& code) {
    constexpr int B_STAGES = Smem<T, NF4>::B_STAGES;
    __shared__ __align__(128) unsigned char smem[Smem<T, NF4>::BYTES];
    T* As = reinterpret_cast<T*>(smem);
    T* Bs = As + STAGES * TILE;
    float* s_code = reinterpret_cast<float*>(Bs + B_STAGES * TILE);

    const int M = p.m, N = p.n, K = p.k;
    int tm, tn;
    raster((M + BM - 1) / BM, (N + BN - 1) / BN, tm, tn);
    const int m0 = tm * BM, n0 = tn * BN;
    const int split = blockIdx.z;
    const int k_begin = split * k_per_split;
    const int k_end = min(K, k_begin + k_per_split);
    const int nk = k_end > k_begin ? (k_end - k_begin + BK - 1) / BK : 0;
    const int warp = threadIdx.x >> 5, warp_m = warp / 4, warp_n = warp % 4;

    float acc[MI][NI][4];
#pragma unroll
    for (int mi = 0; mi < MI; mi++)
#pragma unroll
        for (int ni = 0; ni < NI; ni++)
#pragma unroll
            for (int c = 0; c < 4; c++) acc[mi][ni][c] = 0.0f;

    const T* wd = static_cast<const T*>(w.w);
    if constexpr (NF4) {
        load_code_table(s_code, code);
        __syncthreads();
    }
    // Prologue: tiles 0 .. STAGES-2 in flight; the first NF4 tile dequantised.
#pragma unroll
    for (int s = 0; s < STAGES - 1; s++) {
        if (s < nk) {
            load_tile_async(As + s * TILE, x, m0, M, K, k_begin + s * BK, k_end);
            if constexpr (!NF4) load_tile_async(Bs + s * TILE, wd, n0, N, K, k_begin + s * BK, k_end);
        }
        cp_async_commit();
    }
    if constexpr (NF4) {
        if (nk > 0) nf4_store<T>(Bs, nf4_fetch(w, p, n0, k_begin), s_code);
    }

    for (int kt = 0; kt < nk; kt++) {
        cp_async_wait<STAGES - 2>();  // tile kt has landed (this thread's copies) ...
        __syncthreads();              // ... everyone's, and everyone is done with tile kt-1
        const int pre = kt + STAGES - 1;
        if (pre < nk) {
            load_tile_async(As + (pre % STAGES) * TILE, x, m0, M, K, k_begin + pre * BK, k_end);
            if constexpr (!NF4) load_tile_async(Bs + (pre % STAGES) * TILE, wd, n0, N, K, k_begin + pre * BK, k_end);
        }
        cp_async_commit();
        if constexpr (NF4) {
            Nf4Regs next;
            const bool more = kt + 1 < nk;
            if (more) next = nf4_fetch(w, p, n0, k_begin + (kt + 1) * BK);  // in flight during the MMAs
            mma_tile<T>(As + (kt % STAGES) * TILE, Bs + (kt & 1) * TILE, acc, warp_m, warp_n);
            if (more) nf4_store<T>(Bs + ((kt + 1) & 1) * TILE, next, s_code);
        } else {
            mma_tile<T>(As + (kt % STAGES) * TILE, Bs + (kt % STAGES) * TILE, acc, warp_m, warp_n);
        }
    }
    cp_async_wait<0>();

    // LoRA: r more K steps over [h | B], in split 0 only.
    if (p.lora_rank > 0 && split == 0) {
        const float s = p.lora_scale;
        scale_acc(acc, 1.0f / s);
        for (int j0 = 0; j0 < p.lora_rank; j0 += BK) {
            __syncthreads();  // the previous tile's readers are done
            load_tile_scalar(As, lora_h, m0, M, p.lora_rank, j0, p.lora_rank);
            load_tile_scalar(Bs, lora_b, n0, N, p.lora_rank, j0, p.lora_rank);
            __syncthreads();
            mma_tile<T>(As, Bs, acc, warp_m, warp_n);
        }
        scale_acc(acc, s);
    }

    const int lane = threadIdx.x & 31, g = lane >> 2, t4 = lane & 3;
#pragma unroll
    for (int mi = 0; mi < MI; mi++)
#pragma unroll
        for (int ni = 0; ni < NI; ni++) {
            const int m = m0 + warp_m * WM + mi * 16 + g;
            const int n = n0 + warp_n * WN + ni * 8 + 2 * t4;
            if (partial) {
                float* part = partial + (size_t)split * M * N;
                store_pair_f32(part, M, N, m, n, acc[mi][ni][0], acc[mi][ni][1]);
                store_pair_f32(part, M, N, m + 8, n, acc[mi][ni][2], acc[mi][ni][3]);
            } else {
                store_pair(y, M, N, m, n, acc[mi][ni][0], acc[mi][ni][1]);
                store_pair(y, M, N, m + 8, n, acc[mi][ni][2], acc[mi][ni][3]);
            }
        }
}
}  // namespace tc

// Entry points. Arguments (all GEMM variants): y (T, unused with split-K), partial (f32
// [splits][M][N] or null), x, the weight (w, absmax, absmax_q, absmax2, code8; unused ones null),
// LoRA h [M, r] and B [N, r] (null when p.lora_rank == 0), params, K elements per split
// (a multiple of 64), the NF4 code values.
#define MATMUL_ARGS(T)                                                                                              \
    T *y, float *partial, const T *x, const void *w, const float *absmax, const uint8_t *absmax_q,                 \
        const float *absmax2, const float *code8, const T *lora_h, const T *lora_b, engine_matmul_params p,        \
        int k_per_split, Nf4Table code
#define MATMUL_FORWARD(NS, T, NF4)                                                                                  \
    NS::gemm_body<T, NF4>(y, partial, x, WeightRef{w, absmax, absmax_q, absmax2, code8}, lora_h, lora_b, p,        \
                          k_per_split, code)
// Two blocks per SM (<= 128 registers) where shared memory allows; T4 (sm_75, 64 KiB per SM)
// holds one block anyway, so there it may use more registers instead of spilling.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#define TC_MIN_BLOCKS 1
#else
#define TC_MIN_BLOCKS 2
#endif
#define MATMUL_TC(T, N)                                                                                             \
    extern "C" __global__ void __launch_bounds__(tc::THREADS, TC_MIN_BLOCKS) matmul_tc_nf4_##N(MATMUL_ARGS(T)) {               \
        MATMUL_FORWARD(tc, T, true);                                                                                \
    }                                                                                                               \
    extern "C" __global__ void __launch_bounds__(tc::THREADS, TC_MIN_BLOCKS) matmul_tc_dense_##N(MATMUL_ARGS(T)) {             \
        MATMUL_FORWARD(tc, T, false);                                                                               \
    }
MATMUL_TC(bf16, bf16)
MATMUL_TC(f16, f16)

// ---------------------------------------------------------------------------------------------
// SIMT fallback GEMM
// ---------------------------------------------------------------------------------------------

namespace simt {
constexpr int BM = 64, BN = 64, BK = 16, THREADS = 256;  // 16 x 16 threads, 4 x 4 outputs each

// W[n, k] as the f32 value of T that the MMA would see.
template <typename T, bool NF4>
__device__ __forceinline__ float weight_at(const WeightRef& w, const engine_matmul_params& p, const float* s_code, int n,
                                           int k) {
    const size_t e = (size_t)n * p.k + k;
    if constexpr (NF4) {
        const uint8_t byte = static_cast<const uint8_t*>(w.w)[e >> 1];
        const int nib = (e & 1) ? (byte & 0xf) : (byte >> 4);
        return round_to<T>(__fmul_rn(s_code[nib], nf4_absmax(w, p, e / ENGINE_NF4_BLOCK)));
    } else {
        return to_f32(static_cast<const T*>(w.w)[e]);
    }
}

template <typename T, bool NF4>
__device__ void gemm_body(T* __restrict__ y, float* __restrict__ partial, const T* __restrict__ x, WeightRef w,
                          const T* __restrict__ lora_h, const T* __restrict__ lora_b, engine_matmul_params p,
                          int k_per_split, const Nf4Table& code) {
    __shared__ float As[BK][BM + 4];  // [k][m]: the inner loop reads along m and n
    __shared__ float Bs[BK][BN + 4];
    __shared__ float s_code[16];
    load_code_table(s_code, code);

    const int M = p.m, N = p.n, K = p.k;
    int tm, tn;
    raster((M + BM - 1) / BM, (N + BN - 1) / BN, tm, tn);
    const int m0 = tm * BM, n0 = tn * BN;
    const int split = blockIdx.z;
    const int k_begin = split * k_per_split;
    const int k_end = min(K, k_begin + k_per_split);
    const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;  // n and m of this thread's outputs

    float acc[4][4] = {};
    auto multiply = [&]() {
#pragma unroll
        for (int kk = 0; kk < BK; kk++) {
            float a[4], b[4];
#pragma unroll
            for (int i = 0; i < 4; i++) a[i] = As[kk][ty + 16 * i];
#pragma unroll
            for (int j = 0; j < 4; j++) b[j] = Bs[kk][tx + 16 * j];
#pragma unroll
            for (int i = 0; i < 4; i++)
#pragma unroll
                for (int j = 0; j < 4; j++) acc[i][j] += a[i] * b[j];
        }
    };

    __syncthreads();  // s_code
    for (int k0 = k_begin; k0 < k_end; k0 += BK) {
#pragma unroll
        for (int l = 0; l < BM * BK / THREADS; l++) {
            const int id = threadIdx.x + l * THREADS;
            const int r = id / BK, c = id % BK;
            const int m = m0 + r, n = n0 + r, k = k0 + c;
            As[c][r] = (m < M && k < k_end) ? to_f32(x[(size_t)m * K + k]) : 0.0f;
            Bs[c][r] = (n < N && k < k_end) ? weight_at<T, NF4>(w, p, s_code, n, k) : 0.0f;
        }
        __syncthreads();
        multiply();
        __syncthreads();
    }

    if (p.lora_rank > 0 && split == 0) {
        const int R = p.lora_rank;
        const float s = p.lora_scale;
#pragma unroll
        for (int i = 0; i < 4; i++)
#pragma unroll
            for (int j = 0; j < 4; j++) acc[i][j] *= 1.0f / s;
        for (int j0 = 0; j0 < R; j0 += BK) {
#pragma unroll
            for (int l = 0; l < BM * BK / THREADS; l++) {
                const int id = threadIdx.x + l * THREADS;
                const int r = id / BK, c = id % BK;
                const int m = m0 + r, n = n0 + r, j = j0 + c;
                As[c][r] = (m < M && j < R) ? to_f32(lora_h[(size_t)m * R + j]) : 0.0f;
                Bs[c][r] = (n < N && j < R) ? to_f32(lora_b[(size_t)n * R + j]) : 0.0f;
            }
            __syncthreads();
            multiply();
            __syncthreads();
        }
#pragma unroll
        for (int i = 0; i < 4; i++)
#pragma unroll
            for (int j = 0; j < 4; j++) acc[i][j] *= s;
    }

#pragma unroll
    for (int i = 0; i < 4; i++) {
        const int m = m0 + ty + 16 * i;
        if (m >= M) continue;
#pragma unroll
        for (int j = 0; j < 4; j++) {
            const int n = n0 + tx + 16 * j;
            if (n >= N) continue;
            if (partial)
                partial[(size_t)split * M * N + (size_t)m * N + n] = acc[i][j];
            else
                y[(size_t)m * N + n] = from_f32<T>(acc[i][j]);
        }
    }
}
}  // namespace simt

#define MATMUL_SIMT(T, N)                                                                                           \
    extern "C" __global__ void __launch_bounds__(simt::THREADS) matmul_simt_nf4_##N(MATMUL_ARGS(T)) {              \
        MATMUL_FORWARD(simt, T, true);                                                                                 \
    }                                                                                                               \
    extern "C" __global__ void __launch_bounds__(simt::THREADS) matmul_simt_dense_##N(MATMUL_ARGS(T)) {            \
        MATMUL_FORWARD(simt, T, false);                                                                                \
    }
ENGINE_FOR_FLOAT_TYPES(MATMUL_SIMT)

// ---------------------------------------------------------------------------------------------
// Split-K reduction, score head
// ---------------------------------------------------------------------------------------------

// y[i] = round_T(partial[0][i] + partial[1][i] + ...), in split order.
template <typename T>
__device__ void splitk_reduce_body(T* __restrict__ y, const float* __restrict__ partial, long long mn, int splits) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < mn; i += (long long)gridDim.x * blockDim.x) {
        float s = 0.0f;
        for (int z = 0; z < splits; z++) s += partial[z * mn + i];
        y[i] = from_f32<T>(s);
    }
}

// y[m, n] (f32) = x[m] . W[n] (+ s . h[m] . B[n]) with an f32 weight: one warp per output.
template <typename T>
__device__ void matmul_f32w_body(float* __restrict__ y, const T* __restrict__ x, const float* __restrict__ w,
                                 const T* __restrict__ lora_h, const T* __restrict__ lora_b, engine_matmul_params p) {
    const long long id = (blockIdx.x * (long long)blockDim.x + threadIdx.x) >> 5;
    const int lane = threadIdx.x & 31;
    if (id >= (long long)p.m * p.n) return;  // whole warps leave together
    const int m = (int)(id / p.n), n = (int)(id % p.n);
    const T* xr = x + (size_t)m * p.k;
    const float* wr = w + (size_t)n * p.k;
    float acc = 0.0f;
    for (int k = lane; k < p.k; k += 32) acc += to_f32(xr[k]) * wr[k];
    acc = warp_sum(acc);
    if (p.lora_rank > 0) {
        float l = 0.0f;
        for (int j = lane; j < p.lora_rank; j += 32)
            l += to_f32(lora_h[(size_t)m * p.lora_rank + j]) * to_f32(lora_b[(size_t)n * p.lora_rank + j]);
        acc += p.lora_scale * warp_sum(l);
    }
    if (lane == 0) y[id] = acc;
}

#define REDUCE_AND_F32W(T, N)                                                                                      \
    extern "C" __global__ void splitk_reduce_##N(T* y, const float* partial, long long mn, int splits) {          \
        splitk_reduce_body(y, partial, mn, splits);                                                                \
    }                                                                                                              \
    extern "C" __global__ void matmul_f32w_##N(float* y, const T* x, const float* w, const T* lora_h,             \
                                               const T* lora_b, engine_matmul_params p) {                         \
        matmul_f32w_body(y, x, w, lora_h, lora_b, p);                                                              \
    }
ENGINE_FOR_FLOAT_TYPES(REDUCE_AND_F32W)

// ---------------------------------------------------------------------------------------------
// NF4 dequantise / quantise
// ---------------------------------------------------------------------------------------------

// The whole weight to T: one thread per packed byte (elements 2i and 2i + 1).
template <typename T>
__device__ void nf4_dequantize_body(T* __restrict__ y, WeightRef w, engine_matmul_params p, long long numel,
                                    const Nf4Table& code) {
    __shared__ float s_code[16];
    load_code_table(s_code, code);
    __syncthreads();
    const uint8_t* packed = static_cast<const uint8_t*>(w.w);
    const long long bytes = (numel + 1) / 2;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < bytes; i += (long long)gridDim.x * blockDim.x) {
        const uint8_t byte = packed[i];
        const float scale = nf4_absmax(w, p, (size_t)(2 * i) / ENGINE_NF4_BLOCK);  // 2i, 2i+1 share a block
        y[2 * i] = from_f32<T>(__fmul_rn(s_code[byte >> 4], scale));
        if (2 * i + 1 < numel) y[2 * i + 1] = from_f32<T>(__fmul_rn(s_code[byte & 0xf], scale));
    }
}

// Quantise: one warp per 64-block, lane j owns elements 2j, 2j + 1 and writes byte j. Exactly
// src/quant/nf4.rs: absmax = max|x| (f32), inv = 1/absmax (IEEE division, inf for a zero
// block), code = number of thresholds below x * inv (NaN -> 0), missing elements are 0.0.
template <typename T>
__device__ void nf4_quantize_body(uint8_t* __restrict__ packed, float* __restrict__ absmax, const T* __restrict__ x,
                                  long long numel, const Nf4Table& th) {
    const long long block = (blockIdx.x * (long long)blockDim.x + threadIdx.x) >> 5;
    const int lane = threadIdx.x & 31;
    const long long blocks = (numel + ENGINE_NF4_BLOCK - 1) / ENGINE_NF4_BLOCK;
    if (block >= blocks) return;  // whole warps leave together
    const long long e = block * ENGINE_NF4_BLOCK + 2 * lane;
    const float v0 = e < numel ? to_f32(x[e]) : 0.0f;
    const float v1 = e + 1 < numel ? to_f32(x[e + 1]) : 0.0f;
    const float m = warp_max(fmaxf(fabsf(v0), fabsf(v1)));
    const float inv = __fdiv_rn(1.0f, m);
    const float s0 = __fmul_rn(v0, inv), s1 = __fmul_rn(v1, inv);
    int c0 = 0, c1 = 0;
#pragma unroll
    for (int i = 0; i < 15; i++) {
        c0 += s0 > th.v[i];
        c1 += s1 > th.v[i];
    }
    if (lane == 0) absmax[block] = m;
    if (e < numel) packed[e / 2] = (uint8_t)((c0 << 4) | c1);
}

#define NF4_CONVERT(T, N)                                                                                          \
    extern "C" __global__ void nf4_dequantize_##N(T* y, const uint8_t* packed, const float* absmax,               \
                                                  const uint8_t* absmax_q, const float* absmax2,                  \
                                                  const float* code8, engine_matmul_params p, long long numel,    \
                                                  Nf4Table code) {                                                 \
        nf4_dequantize_body(y, WeightRef{packed, absmax, absmax_q, absmax2, code8}, p, numel, code);               \
    }                                                                                                              \
    extern "C" __global__ void nf4_quantize_##N(uint8_t* packed, float* absmax, const T* x, long long numel,      \
                                                Nf4Table th) {                                                \
        nf4_quantize_body(packed, absmax, x, numel, th);                                                           \
    }
ENGINE_FOR_FLOAT_TYPES(NF4_CONVERT)

// =============================================================================================
// Backward
// =============================================================================================
//
// Every GEMM of the backward pass has the form C[P, Q] = sum over red of U(p, red) . V[red, q],
// with V row-major [red][Q] (the reduction runs down V's rows) and U either row-major [P][red]
// ("row") or stored transposed as [red][P] ("trans": dy or x read along the token axis). For a
// layer y[M, N] = x[M, K] . W[N, K]^T + s . h . B^T with h = x_l . A^T (x_l = x, or the
// dropped-out LoRA input):
//
//   dx      = dy . W       P = M, red = N, Q = K    U = dy (row)   V = W [N, K], NF4 or dense T
//             (+ dh . A)   r more reduction steps fused into split 0 (dh [M, r], A [r, K], T)
//   dx_lora = dh . A       P = M, red = r, Q = K    U = dh (row)   V = A          (when x_l != x)
//   dh      = s.dy . B     P = M, red = N, Q = r    U = dy (row)   V = B [N, r]
//   dB      = s.dy^T . h   P = N, red = M, Q = r    U = dy (trans) V = h [M, r]
//   dA^T    = x_l^T . dh   P = K, red = M, Q = 2r   U = x_l (trans) V = [dh_hi | dh_lo] [M, 2r]
//
// Kernel parameters: p.m = P, p.n = red, p.k = Q (for dx exactly the layer's M, N, K, so an NF4
// V is indexed like the forward's W), p.lora_rank = r of the fused dh . A steps (0: none).
//
// Precision (all sums in f32): dx is rounded to T once. h is rounded to T as the forward rounds
// it. dh reaches dx's tensor cores rounded to T (as torch holds lora_B's input gradient); for
// dA it is split into dh_hi = round_T(dh) and dh_lo = round_T(dh - dh_hi), multiplied as two
// columns blocks of one GEMM and folded by the reduction, so dA sees dh to ~16 (bf16) or ~22
// (f16) bits instead of 8 or 11 at no measurable cost (those GEMMs are memory-bound). dA and
// dB are f32.
//
// Determinism: no atomics anywhere. A GEMM whose tile grid cannot fill the GPU splits its
// reduction across blocks (grid.z) that write f32 partial sums [split][P][Q]; a reduction
// kernel adds them in split order. The partition depends only on the shapes and the SM count.
//
// Kernels:
//   linear_bwd_tc_{nf4,dense}_T   dx on tensor cores, 128 (M) x 128 (K) tiles, 8 warps 2 x 4
//                                 (warp tile 64 x 32, as the forward), BK = 32 along N: dy
//                                 tiles [128 m][32 n] exactly like the forward's x tiles
//                                 (cp.async, 3 stages, ldmatrix); W tiles [32 n][128 k] (rows of
//                                 W, i.e. the transposed access) with 16-byte chunks swizzled
//                                 chunk' = chunk ^ (row & 7) and read by ldmatrix.trans. NF4:
//                                 each thread fetches 8 packed bytes = 16 consecutive k of one
//                                 row of W (inside one 64-block since K % 16 == 0) plus their
//                                 absmax for tile kt+1 during the MMAs of tile kt and
//                                 dequantises them into the other of two shared buffers after.
//                                 Needs N % 8 == 0 (16-byte dy rows), K % 8 (dense) / K % 16 (NF4).
//   linear_bwd_tc_thin[_t]_T      the LoRA GEMMs (Q = r or 2r <= 64 per tile): 128 (P) x 64 (Q)
//                                 tiles, 8 warps 4 x 2 (warp tile 32 x 32), U row (dh) or trans
//                                 (dB, dA: U tiles [32 red][128 p] by ldmatrix.trans), always
//                                 writing f32 partials. Needs Q % 8 == 0 and 16-byte U rows.
//   linear_bwd_simt_{nf4,dense,dense_t}_T  the fallback for everything else (bf16 on sm_75, f32
//                                 activations, odd shapes): 64 x 64 tiles, f32 FMAs, any shape.
//   linear_bwd_reduce_T           C = scale . sum of the partials, as f32 (optionally
//                                 transposed: dA), as T, and/or as T hi/lo column blocks (dh).
//   linear_bwd_head_{dx,dw}_T     the f32 score head: dx = dy . W (dy f32, dx T), dW = dy^T . x (f32).

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(p))
                 : "memory");
}

namespace tcb {
using tc::BK;
using tc::STAGES;
using tc::THREADS;
constexpr int BP = 128;  // tile rows (P)

// Warp layout of a BP x BQ tile: BQ / 32 warps across Q, the rest across P; each warp owns
// (BP / WARPS_P) x 32 outputs = MI x NI mma tiles of 16 x 8.
template <int BQ> struct Layout {
    static constexpr int WARPS_Q = BQ / 32, WARPS_P = THREADS / 32 / WARPS_Q;
    static constexpr int WM = BP / WARPS_P, MI = WM / 16, NI = 4;
    static_assert(WARPS_P * WARPS_Q * 32 == THREADS && MI >= 1, "tile does not fit 8 warps");
};

// Element offset of 16-byte chunk c of row r in a swizzled [rows][W] tile (W = 64 or 128):
// chunk' = c ^ (r & 7), so the 8 rows an ldmatrix reads at one logical chunk (8 consecutive
// rows) fall in 8 distinct bank groups.
template <int W> __device__ __forceinline__ int swz_rows(int r, int c) { return r * W + ((c ^ (r & 7)) << 3); }

// Rows [r0, r0 + 32) x columns [c0, c0 + W) of a row-major matrix (leading dimension ld) ->
// a [32][W] tile; rows >= r_end and 8-column chunks at or past c_end are zero-filled.
template <typename T, int W>
__device__ __forceinline__ void load_rows_async(T* dst, const T* __restrict__ src, int r0, int r_end, int ld, int c0,
                                                int c_end) {
    constexpr int CH = W / 8;
    static_assert(BK * CH % THREADS == 0, "whole chunks per thread");
#pragma unroll
    for (int i = 0; i < BK * CH / THREADS; i++) {
        const int id = threadIdx.x + i * THREADS;
        const int r = id / CH, c = id % CH;
        const int gr = r0 + r, gc = c0 + c * 8;
        const bool ok = gr < r_end && gc < c_end;
        const T* g = ok ? src + (size_t)gr * ld + gc : src;
        cp_async16(dst + swz_rows<W>(r, c), g, ok);
    }
}

// Element-wise variant for the fused LoRA steps (A [r][K]: r need not be a multiple of 32).
template <typename T, int W>
__device__ __forceinline__ void load_rows_scalar(T* dst, const T* __restrict__ src, int r0, int r_end, int ld, int c0,
                                                 int c_end) {
    for (int id = threadIdx.x; id < BK * W; id += THREADS) {
        const int r = id / W, c = id % W;
        const int gr = r0 + r, gc = c0 + c;
        dst[swz_rows<W>(r, c >> 3) + (c & 7)] =
            (gr < r_end && gc < c_end) ? src[(size_t)gr * ld + gc] : from_f32<T>(0.0f);
    }
}

// One thread's share of an NF4 tile [32 n][128 k] of W: 8 packed bytes = the 16 weights
// W[n, k .. k+15] (row n = red0 + tid / 8, k = q0 + 16 (tid % 8)) and their absmax.
__device__ __forceinline__ tc::Nf4Regs nf4_fetch_rows(const WeightRef& w, const engine_matmul_params& p, int red0,
                                                      int red_end, int q0) {
    const int r = threadIdx.x >> 3, seg = threadIdx.x & 7;
    const int n = red0 + r, k = q0 + seg * 16;
    tc::Nf4Regs out;
    if (n < red_end && k < p.k) {
        const size_t e = (size_t)n * p.k + k;  // a multiple of 16 (K % 16 == 0): one 64-block
        out.bytes = __ldg(reinterpret_cast<const uint2*>(static_cast<const uint8_t*>(w.w) + e / 2));
        out.scale = nf4_absmax(w, p, e / ENGINE_NF4_BLOCK);
    } else {
        out.bytes = make_uint2(0, 0);
        out.scale = 0.0f;
    }
    return out;
}

template <typename T>
__device__ __forceinline__ void nf4_store_rows(T* dst, const tc::Nf4Regs& q, const float* s_code) {
    const int r = threadIdx.x >> 3, seg = threadIdx.x & 7;
    uint32_t out[8];
#pragma unroll
    for (int j = 0; j < 8; j++) {
        const uint32_t word = j < 4 ? q.bytes.x : q.bytes.y;  // little-endian: byte j%4 of the word
        const uint32_t byte = (word >> (8 * (j & 3))) & 0xffu;
        const float even = __fmul_rn(s_code[byte >> 4], q.scale);  // high nibble
        const float odd = __fmul_rn(s_code[byte & 0xfu], q.scale);  // low nibble
        out[j] = Vec2<T>::pack(even, odd);
    }
    *reinterpret_cast<uint4*>(dst + swz_rows<BP>(r, 2 * seg)) = make_uint4(out[0], out[1], out[2], out[3]);
    *reinterpret_cast<uint4*>(dst + swz_rows<BP>(r, 2 * seg + 1)) = make_uint4(out[4], out[5], out[6], out[7]);
}

// acc += U_tile . V_tile for one BK step of this warp's (WM x 32) sub-tile.
//   U row:   [BP p][32 red] tile (the forward's swizzle), A fragments by ldmatrix as the forward.
//   U trans: [32 red][BP p] tile; ldmatrix.trans of the 8x8 blocks (red 0-7 | 8-15) x (p 0-7 |
//            8-15) gives a0..a3 = (p 0-7, red 0-7), (p 8-15, red 0-7), (p 0-7, red 8-15),
//            (p 8-15, red 8-15).
//   V:       [32 red][BQ q] tile; ldmatrix.x4.trans of (red 0-7, q 0-7), (red 8-15, q 0-7),
//            (red 0-7, q 8-15), (red 8-15, q 8-15) gives b0, b1 of two n8 tiles.
template <typename T, bool TRANS_U, int BQ>
__device__ __forceinline__ void mma_step(const T* Us, const T* Vs, float (&acc)[Layout<BQ>::MI][Layout<BQ>::NI][4],
                                         int warp_p, int warp_q) {
    using L = Layout<BQ>;
    const int lane = threadIdx.x & 31, mat = lane >> 3;
#pragma unroll
    for (int ks = 0; ks < BK / 16; ks++) {
        uint32_t a[L::MI][4], b[L::NI][2];
#pragma unroll
        for (int mi = 0; mi < L::MI; mi++) {
            if constexpr (TRANS_U) {
                const int row = ks * 16 + (mat >> 1) * 8 + (lane & 7);
                const int chunk = (warp_p * L::WM + mi * 16) / 8 + (mat & 1);
                ldmatrix_x4_trans(a[mi], Us + swz_rows<BP>(row, chunk));
            } else {
                const int row = warp_p * L::WM + mi * 16 + (lane & 15);
                ldmatrix_x4(a[mi], Us + tc::swz(row, ks * 2 + (lane >> 4)));
            }
        }
#pragma unroll
        for (int nj = 0; nj < L::NI / 2; nj++) {
            const int row = ks * 16 + (mat & 1) * 8 + (lane & 7);
            const int chunk = (warp_q * 32 + nj * 16) / 8 + (mat >> 1);
            uint32_t r[4];
            ldmatrix_x4_trans(r, Vs + swz_rows<BQ>(row, chunk));
            b[2 * nj][0] = r[0];
            b[2 * nj][1] = r[1];
            b[2 * nj + 1][0] = r[2];
            b[2 * nj + 1][1] = r[3];
        }
#pragma unroll
        for (int mi = 0; mi < L::MI; mi++)
#pragma unroll
            for (int ni = 0; ni < L::NI; ni++) Mma<T>::run(acc[mi][ni], a[mi], b[ni]);
    }
}

// Shared memory: U stages, V stages (3 dense / 2 NF4), the NF4 code table.
template <typename T, bool NF4, int BQ> struct Smem {
    static constexpr int U_TILE = BP * BK, V_TILE = BK * BQ;
    static constexpr int V_STAGES = NF4 ? 2 : STAGES;
    static constexpr int BYTES = (STAGES * U_TILE + V_STAGES * V_TILE) * (int)sizeof(T) + (NF4 ? 16 * (int)sizeof(float) : 0);
    static_assert(BYTES <= 48 * 1024, "static shared memory");
};

template <typename T, bool NF4, bool TRANS_U, int BQ>
__device__ void gemm_body(T* __restrict__ out, float* __restrict__ partial, const T* __restrict__ u, WeightRef v,
                          const T* __restrict__ lora_u, const T* __restrict__ lora_v, engine_matmul_params p,
                          int red_per_split, const Nf4Table& code) {
    using L = Layout<BQ>;
    using S = Smem<T, NF4, BQ>;
    static_assert(!NF4 || (BQ == BP && !TRANS_U), "NF4 V only for dx");
    __shared__ __align__(128) unsigned char smem[S::BYTES];
    T* Us = reinterpret_cast<T*>(smem);
    T* Vs = Us + STAGES * S::U_TILE;
    float* s_code = reinterpret_cast<float*>(Vs + S::V_STAGES * S::V_TILE);

    const int P = p.m, RED = p.n, Q = p.k;
    int tp, tq;
    raster((P + BP - 1) / BP, (Q + BQ - 1) / BQ, tp, tq);
    const int p0 = tp * BP, q0 = tq * BQ;
    const int split = blockIdx.z;
    const int r_begin = split * red_per_split;
    const int r_end = min(RED, r_begin + red_per_split);
    const int nk = r_end > r_begin ? (r_end - r_begin + BK - 1) / BK : 0;
    const int warp = threadIdx.x >> 5, warp_p = warp / L::WARPS_Q, warp_q = warp % L::WARPS_Q;

    float acc[L::MI][L::NI][4];
#pragma unroll
    for (int mi = 0; mi < L::MI; mi++)
#pragma unroll
        for (int ni = 0; ni < L::NI; ni++)
#pragma unroll
            for (int c = 0; c < 4; c++) acc[mi][ni][c] = 0.0f;

    const T* vd = static_cast<const T*>(v.w);
    if constexpr (NF4) {
        load_code_table(s_code, code);
        __syncthreads();
    }
    auto load_u = [&](T* dst, int red0) {
        if constexpr (TRANS_U)
            load_rows_async<T, BP>(dst, u, red0, r_end, P, p0, P);
        else
            tc::load_tile_async(dst, u, p0, P, RED, red0, r_end);
    };
    // Prologue: tiles 0 .. STAGES-2 in flight; the first NF4 tile dequantised.
#pragma unroll
    for (int s = 0; s < STAGES - 1; s++) {
        if (s < nk) {
            load_u(Us + s * S::U_TILE, r_begin + s * BK);
            if constexpr (!NF4) load_rows_async<T, BQ>(Vs + s * S::V_TILE, vd, r_begin + s * BK, r_end, Q, q0, Q);
        }
        cp_async_commit();
    }
    if constexpr (NF4) {
        if (nk > 0) nf4_store_rows<T>(Vs, nf4_fetch_rows(v, p, r_begin, r_end, q0), s_code);
    }

    for (int kt = 0; kt < nk; kt++) {
        cp_async_wait<STAGES - 2>();  // tile kt has landed (this thread's copies) ...
        __syncthreads();              // ... everyone's, and everyone is done with tile kt-1
        const int pre = kt + STAGES - 1;
        if (pre < nk) {
            load_u(Us + (pre % STAGES) * S::U_TILE, r_begin + pre * BK);
            if constexpr (!NF4)
                load_rows_async<T, BQ>(Vs + (pre % STAGES) * S::V_TILE, vd, r_begin + pre * BK, r_end, Q, q0, Q);
        }
        cp_async_commit();
        if constexpr (NF4) {
            tc::Nf4Regs next;
            const bool more = kt + 1 < nk;
            if (more) next = nf4_fetch_rows(v, p, r_begin + (kt + 1) * BK, r_end, q0);  // in flight during the MMAs
            mma_step<T, TRANS_U, BQ>(Us + (kt % STAGES) * S::U_TILE, Vs + (kt & 1) * S::V_TILE, acc, warp_p, warp_q);
            if (more) nf4_store_rows<T>(Vs + ((kt + 1) & 1) * S::V_TILE, next, s_code);
        } else {
            mma_step<T, TRANS_U, BQ>(Us + (kt % STAGES) * S::U_TILE, Vs + (kt % STAGES) * S::V_TILE, acc, warp_p,
                                     warp_q);
        }
    }
    cp_async_wait<0>();

    // dx's LoRA term: r more reduction steps over [dh | A], in split 0 only.
    if constexpr (!TRANS_U && BQ == BP) {
        if (p.lora_rank > 0 && split == 0) {
            const int R = p.lora_rank;
            for (int j0 = 0; j0 < R; j0 += BK) {
                __syncthreads();  // the previous tile's readers are done
                tc::load_tile_scalar(Us, lora_u, p0, P, R, j0, R);
                load_rows_scalar<T, BQ>(Vs, lora_v, j0, R, Q, q0, Q);
                __syncthreads();
                mma_step<T, false, BQ>(Us, Vs, acc, warp_p, warp_q);
            }
        }
    }

    const int lane = threadIdx.x & 31, g = lane >> 2, t4 = lane & 3;
#pragma unroll
    for (int mi = 0; mi < L::MI; mi++)
#pragma unroll
        for (int ni = 0; ni < L::NI; ni++) {
            const int pp = p0 + warp_p * L::WM + mi * 16 + g;
            const int qq = q0 + warp_q * 32 + ni * 8 + 2 * t4;
            if (partial) {
                float* part = partial + (size_t)split * P * Q;
                store_pair_f32(part, P, Q, pp, qq, acc[mi][ni][0], acc[mi][ni][1]);
                store_pair_f32(part, P, Q, pp + 8, qq, acc[mi][ni][2], acc[mi][ni][3]);
            } else {
                store_pair(out, P, Q, pp, qq, acc[mi][ni][0], acc[mi][ni][1]);
                store_pair(out, P, Q, pp + 8, qq, acc[mi][ni][2], acc[mi][ni][3]);
            }
        }
}
}  // namespace tcb

// ---------------------------------------------------------------------------------------------
// Backward SIMT fallback
// ---------------------------------------------------------------------------------------------

namespace simtb {
using simt::BK;
using simt::THREADS;
constexpr int BP = 64, BQ = 64;  // 16 x 16 threads, 4 x 4 outputs each

// V[red, q] as the f32 value of T the tensor cores would see (NF4: W[n, k] rounded to T).
template <typename T, bool NF4>
__device__ __forceinline__ float v_at(const WeightRef& v, const engine_matmul_params& p, const float* s_code, int red,
                                      int q) {
    return simt::weight_at<T, NF4>(v, p, s_code, red, q);  // flat index red * p.k + q
}

template <typename T, bool NF4, bool TRANS_U>
__device__ void gemm_body(T* __restrict__ out, float* __restrict__ partial, const T* __restrict__ u, WeightRef v,
                          const T* __restrict__ lora_u, const T* __restrict__ lora_v, engine_matmul_params p,
                          int red_per_split, const Nf4Table& code) {
    __shared__ float Us[BK][BP + 4];  // [red][p]
    __shared__ float Vs[BK][BQ + 4];  // [red][q]
    __shared__ float s_code[16];
    load_code_table(s_code, code);

    const int P = p.m, RED = p.n, Q = p.k;
    int tp, tq;
    raster((P + BP - 1) / BP, (Q + BQ - 1) / BQ, tp, tq);
    const int p0 = tp * BP, q0 = tq * BQ;
    const int split = blockIdx.z;
    const int r_begin = split * red_per_split;
    const int r_end = min(RED, r_begin + red_per_split);
    const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;  // q and p of this thread's outputs

    float acc[4][4] = {};
    auto multiply = [&]() {
#pragma unroll
        for (int kk = 0; kk < BK; kk++) {
            float a[4], b[4];
#pragma unroll
            for (int i = 0; i < 4; i++) a[i] = Us[kk][ty + 16 * i];
#pragma unroll
            for (int j = 0; j < 4; j++) b[j] = Vs[kk][tx + 16 * j];
#pragma unroll
            for (int i = 0; i < 4; i++)
#pragma unroll
                for (int j = 0; j < 4; j++) acc[i][j] += a[i] * b[j];
        }
    };

    __syncthreads();  // s_code
    for (int k0 = r_begin; k0 < r_end; k0 += BK) {
#pragma unroll
        for (int l = 0; l < BP * BK / THREADS; l++) {
            const int id = threadIdx.x + l * THREADS;
            if constexpr (TRANS_U) {  // U[red][P]: consecutive threads read consecutive p
                const int c = id / BP, r = id % BP;
                const int pp = p0 + r, red = k0 + c;
                Us[c][r] = (pp < P && red < r_end) ? to_f32(u[(size_t)red * P + pp]) : 0.0f;
            } else {  // U[P][red]: consecutive threads read consecutive red
                const int r = id / BK, c = id % BK;
                const int pp = p0 + r, red = k0 + c;
                Us[c][r] = (pp < P && red < r_end) ? to_f32(u[(size_t)pp * RED + red]) : 0.0f;
            }
            const int c = id / BQ, qc = id % BQ;
            const int red = k0 + c, qq = q0 + qc;
            Vs[c][qc] = (red < r_end && qq < Q) ? v_at<T, NF4>(v, p, s_code, red, qq) : 0.0f;
        }
        __syncthreads();
        multiply();
        __syncthreads();
    }

    if (lora_u != nullptr && p.lora_rank > 0 && split == 0) {
        const int R = p.lora_rank;
        for (int j0 = 0; j0 < R; j0 += BK) {
#pragma unroll
            for (int l = 0; l < BP * BK / THREADS; l++) {
                const int id = threadIdx.x + l * THREADS;
                {
                    const int r = id / BK, c = id % BK;
                    const int pp = p0 + r, j = j0 + c;
                    Us[c][r] = (pp < P && j < R) ? to_f32(lora_u[(size_t)pp * R + j]) : 0.0f;
                }
                const int c = id / BQ, qc = id % BQ;
                const int j = j0 + c, qq = q0 + qc;
                Vs[c][qc] = (j < R && qq < Q) ? to_f32(lora_v[(size_t)j * Q + qq]) : 0.0f;
            }
            __syncthreads();
            multiply();
            __syncthreads();
        }
    }

#pragma unroll
    for (int i = 0; i < 4; i++) {
        const int pp = p0 + ty + 16 * i;
        if (pp >= P) continue;
#pragma unroll
        for (int j = 0; j < 4; j++) {
            const int qq = q0 + tx + 16 * j;
            if (qq >= Q) continue;
            if (partial)
                partial[(size_t)split * P * Q + (size_t)pp * Q + qq] = acc[i][j];
            else
                out[(size_t)pp * Q + qq] = from_f32<T>(acc[i][j]);
        }
    }
}
}  // namespace simtb

// Entry points. Arguments (all backward GEMMs): out (T [P][Q], unused with partials), partial
// (f32 [splits][P][Q] or null), U, V (v, absmax, absmax_q, absmax2, code8; unused ones null),
// the fused LoRA operands dh [P][r] and A [r][Q] (null when p.lora_rank == 0), params (p.m = P,
// p.n = red, p.k = Q), reduction elements per split (a multiple of 64), the NF4 code values.
#define BWD_ARGS(T)                                                                                                 \
    T *out, float *partial, const T *u, const void *v, const float *absmax, const uint8_t *absmax_q,               \
        const float *absmax2, const float *code8, const T *lora_u, const T *lora_v, engine_matmul_params p,        \
        int red_per_split, Nf4Table code
#define BWD_BODY(NS, ...)                                                                                           \
    NS::gemm_body<__VA_ARGS__>(out, partial, u, WeightRef{v, absmax, absmax_q, absmax2, code8}, lora_u, lora_v, p, \
                               red_per_split, code)
#define LINEAR_BWD_TC(T, N)                                                                                         \
    extern "C" __global__ void __launch_bounds__(tc::THREADS, TC_MIN_BLOCKS) linear_bwd_tc_nf4_##N(BWD_ARGS(T)) {  \
        BWD_BODY(tcb, T, true, false, 128);                                                                         \
    }                                                                                                               \
    extern "C" __global__ void __launch_bounds__(tc::THREADS, TC_MIN_BLOCKS) linear_bwd_tc_dense_##N(BWD_ARGS(T)) { \
        BWD_BODY(tcb, T, false, false, 128);                                                                        \
    }                                                                                                               \
    extern "C" __global__ void __launch_bounds__(tc::THREADS, 2) linear_bwd_tc_thin_##N(BWD_ARGS(T)) {              \
        BWD_BODY(tcb, T, false, false, 64);                                                                         \
    }                                                                                                               \
    extern "C" __global__ void __launch_bounds__(tc::THREADS, 2) linear_bwd_tc_thin_t_##N(BWD_ARGS(T)) {            \
        BWD_BODY(tcb, T, false, true, 64);                                                                          \
    }
LINEAR_BWD_TC(bf16, bf16)
LINEAR_BWD_TC(f16, f16)

#define LINEAR_BWD_SIMT(T, N)                                                                                       \
    extern "C" __global__ void __launch_bounds__(simt::THREADS) linear_bwd_simt_nf4_##N(BWD_ARGS(T)) {             \
        BWD_BODY(simtb, T, true, false);                                                                            \
    }                                                                                                               \
    extern "C" __global__ void __launch_bounds__(simt::THREADS) linear_bwd_simt_dense_##N(BWD_ARGS(T)) {           \
        BWD_BODY(simtb, T, false, false);                                                                           \
    }                                                                                                               \
    extern "C" __global__ void __launch_bounds__(simt::THREADS) linear_bwd_simt_dense_t_##N(BWD_ARGS(T)) {         \
        BWD_BODY(simtb, T, false, true);                                                                            \
    }
ENGINE_FOR_FLOAT_TYPES(LINEAR_BWD_SIMT)

// ---------------------------------------------------------------------------------------------
// Backward reduction, score head
// ---------------------------------------------------------------------------------------------

// C[p, q] = scale . (sum over splits of partial[z][p][q]), z in order, for the P x Q outputs.
// With fold, the partials are [splits][P][2Q] and C[p, q] = scale . (hi + lo), hi and lo the
// split sums of columns q and Q + q (dA from dh's hi/lo blocks). Writes whichever is non-null:
//   out_f32  f32, [P][Q], or [Q][P] with transpose;
//   out_t    T [P][Q];
//   out_hilo T [P][2Q]: round_T(C) in columns 0..Q-1, round_T(C - that) in Q..2Q-1.
template <typename T>
__device__ void bwd_reduce_body(float* __restrict__ out_f32, T* __restrict__ out_t, T* __restrict__ out_hilo,
                                const float* __restrict__ partial, int P, int Q, int splits, float scale, int transpose,
                                int fold) {
    const long long total = (long long)P * Q;
    const int qw = fold ? 2 * Q : Q;
    const long long plane = (long long)P * qw;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total; i += (long long)gridDim.x * blockDim.x) {
        const int pp = transpose ? (int)(i % P) : (int)(i / Q);
        const int qq = transpose ? (int)(i / P) : (int)(i % Q);
        const float* src = partial + (long long)pp * qw + qq;
        float hi = 0.0f, lo = 0.0f;
        for (int z = 0; z < splits; z++) {
            hi += src[z * plane];
            if (fold) lo += src[z * plane + Q];
        }
        const float c = scale * (hi + lo);
        if (out_f32) out_f32[i] = c;  // i is the output-order index in both layouts
        if (out_t) out_t[(long long)pp * Q + qq] = from_f32<T>(c);
        if (out_hilo) {
            const T h = from_f32<T>(c);
            out_hilo[(long long)pp * 2 * Q + qq] = h;
            out_hilo[(long long)pp * 2 * Q + Q + qq] = from_f32<T>(c - to_f32(h));
        }
    }
}

// The score head (dense f32 weight W [N, K], N small): dx[m, k] = sum_n dy[m, n] . W[n, k]
// with dy f32, rounded to T; one thread per element of dx, n in order.
template <typename T>
__device__ void head_dx_body(T* __restrict__ dx, const float* __restrict__ dy, const float* __restrict__ w, int M, int N,
                             int K) {
    const long long total = (long long)M * K;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total; i += (long long)gridDim.x * blockDim.x) {
        const int m = (int)(i / K), k = (int)(i % K);
        float s = 0.0f;
        for (int n = 0; n < N; n++) s += dy[(size_t)m * N + n] * w[(size_t)n * K + k];
        dx[i] = from_f32<T>(s);
    }
}

// dW[n, k] = sum_m dy[m, n] . x[m, k] in f32: one thread per element of dW, m in order (the
// head sees one row per sequence, so M is small).
template <typename T>
__device__ void head_dw_body(float* __restrict__ dw, const float* __restrict__ dy, const T* __restrict__ x, int M, int N,
                             int K) {
    const long long total = (long long)N * K;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total; i += (long long)gridDim.x * blockDim.x) {
        const int n = (int)(i / K), k = (int)(i % K);
        float s = 0.0f;
        for (int m = 0; m < M; m++) s += dy[(size_t)m * N + n] * to_f32(x[(size_t)m * K + k]);
        dw[i] = s;
    }
}

#define LINEAR_BWD_MISC(T, N)                                                                                      \
    extern "C" __global__ void linear_bwd_reduce_##N(float* out_f32, T* out_t, T* out_hilo, const float* partial, \
                                                     int P, int Q, int splits, float scale, int transpose,        \
                                                     int fold) {                                                   \
        bwd_reduce_body(out_f32, out_t, out_hilo, partial, P, Q, splits, scale, transpose, fold);                  \
    }                                                                                                              \
    extern "C" __global__ void linear_bwd_head_dx_##N(T* dx, const float* dy, const float* w, int M, int N_,      \
                                                      int K) {                                                     \
        head_dx_body(dx, dy, w, M, N_, K);                                                                         \
    }                                                                                                              \
    extern "C" __global__ void linear_bwd_head_dw_##N(float* dw, const float* dy, const T* x, int M, int N_,      \
                                                      int K) {                                                     \
        head_dw_body(dw, dy, x, M, N_, K);                                                                         \
    }
ENGINE_FOR_FLOAT_TYPES(LINEAR_BWD_MISC)
