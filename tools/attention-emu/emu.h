// Host emulation of the CUDA execution model for kernels/attention.cu: one ucontext fiber per
// CUDA thread, blocks run one at a time, warp collectives (shfl, ldmatrix, mma) computed lane by
// lane from the PTX fragment layouts, cp.async applied early (at issue) or late (at wait).
#pragma once
#include <ucontext.h>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <cmath>
#include <vector>
#include <functional>
#include <random>
#include <algorithm>
#include <sys/mman.h>
#include <unistd.h>
#include <vector_types.h>
#include <vector_functions.h>

namespace emu {

struct Fiber {
    ucontext_t ctx;
    std::vector<char> stack;
    bool done = false;
    uint3 tid;
    int lin;     // linear thread id
    unsigned seq = 0;  // collectives issued by this lane
    struct Pending { void* dst; const void* src; bool ok; };
    std::vector<Pending> pending;
};

struct WarpState {
    uint32_t data[2][32][16];
    int arrived[2] = {0, 0};
    unsigned gen[2] = {0, 0};
};

extern Fiber* cur;
extern ucontext_t sched_ctx;
extern uint3 blk, grd, bdim;
extern std::vector<WarpState> warps;
extern int block_arrived;
extern unsigned block_gen;
extern char* smem;            // dynamic shared memory base
extern size_t smem_bytes;
extern bool late_copies;
extern long long n_yields;

inline void yield() { n_yields++; swapcontext(&cur->ctx, &sched_ctx); }

inline void fail(const char* what) { fprintf(stderr, "EMU FAIL: %s (block %u,%u,%u thread %u)\n", what, blk.x, blk.y, blk.z, cur->tid.x); fflush(stderr); abort(); }

inline void syncthreads() {
    // apply nothing here: cp.async completion is only guaranteed by wait_group
    unsigned g = block_gen;
    if (++block_arrived == (int)(bdim.x * bdim.y * bdim.z)) { block_arrived = 0; block_gen++; yield(); }
    else while (block_gen == g) yield();
}

// A warp collective: deposit this lane's words, wait for all 32 lanes, return the slot set.
inline uint32_t (*collective(const uint32_t* words, int n))[16] {
    const int lane = cur->lin & 31;
    WarpState& w = warps[cur->lin >> 5];
    const int k = cur->seq++ & 1;
    for (int i = 0; i < n; i++) w.data[k][lane][i] = words[i];
    unsigned g = w.gen[k];
    if (++w.arrived[k] == 32) { w.arrived[k] = 0; w.gen[k]++; yield(); }
    else while (w.gen[k] == g) yield();
    return w.data[k];
}

inline void syncwarp() { uint32_t z = 0; collective(&z, 1); }

inline float shfl_xor(float v, int m) {
    uint32_t x; memcpy(&x, &v, 4);
    auto d = collective(&x, 1);
    float r; memcpy(&r, &d[(cur->lin & 31) ^ m][0], 4); return r;
}
inline float shfl(float v, int src) {
    uint32_t x; memcpy(&x, &v, 4);
    auto d = collective(&x, 1);
    float r; memcpy(&r, &d[src & 31][0], 4); return r;
}

inline void check_smem(uint32_t addr, int bytes) {
    if ((size_t)addr + bytes > smem_bytes) fail("shared memory access out of bounds");
}

inline void ldsm(uint32_t (&r)[4], uint32_t addr, bool trans) {
    if (addr % 16) fail("ldmatrix row address not 16-byte aligned");
    check_smem(addr, 16);
    auto d = collective(&addr, 1);
    const int t = cur->lin & 31;
    for (int i = 0; i < 4; i++) {
        if (!trans) {
            uint32_t row = d[8 * i + t / 4][0];
            memcpy(&r[i], smem + row + 4 * (t % 4), 4);
        } else {
            uint32_t r0 = d[8 * i + 2 * (t % 4)][0], r1 = d[8 * i + 2 * (t % 4) + 1][0];
            uint16_t lo, hi;
            memcpy(&lo, smem + r0 + 2 * (t / 4), 2);
            memcpy(&hi, smem + r1 + 2 * (t / 4), 2);
            r[i] = (uint32_t)lo | ((uint32_t)hi << 16);
        }
    }
}

// c += A (16x16) B (16x8); conv turns a 16-bit pattern into float.
inline void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, float (*conv)(uint16_t)) {
    uint32_t w[6] = {a[0], a[1], a[2], a[3], b0, b1};
    auto d = collective(w, 6);
    const int lane = cur->lin & 31, g = lane >> 2, t = lane & 3;
    auto A = [&](int r, int k) {
        int gg = r & 7, reg = (r >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0), tt = (k & 7) >> 1;
        uint32_t x = d[4 * gg + tt][reg];
        return conv((k & 1) ? (uint16_t)(x >> 16) : (uint16_t)(x & 0xffff));
    };
    auto B = [&](int k, int n) {
        int tt = (k & 7) >> 1, reg = 4 + (k >= 8 ? 1 : 0);
        uint32_t x = d[4 * n + tt][reg];
        return conv((k & 1) ? (uint16_t)(x >> 16) : (uint16_t)(x & 0xffff));
    };
    for (int e = 0; e < 4; e++) {
        int r = g + (e >= 2 ? 8 : 0), n = 2 * t + (e & 1);
        float acc = c[e];
        for (int k = 0; k < 16; k++) acc += A(r, k) * B(k, n);
        c[e] = acc;
    }
}

inline void copy16(void* dst, const void* src, bool ok) {
    if ((uintptr_t)dst % 16) fail("copy16 dst misaligned");
    if (ok && (uintptr_t)src % 16) fail("copy16 src misaligned");
    check_smem((uint32_t)((char*)dst - smem), 16);
    if (late_copies) { cur->pending.push_back({dst, src, ok}); return; }
    if (ok) memcpy(dst, src, 16); else memset(dst, 0, 16);
}
inline void copy_wait_all() {
    for (auto& p : cur->pending) { if (p.ok) memcpy(p.dst, p.src, 16); else memset(p.dst, 0, 16); }
    cur->pending.clear();
}

// Run fn on a grid: blocks one at a time, fibers resumed in a random order each round.
void launch(dim3 grid, dim3 block, size_t smem_size, const std::function<void()>& fn, unsigned seed);

// Global buffers with a PROT_NONE page right after (reads past the end fault) and before.
void* galloc(size_t bytes);

}  // namespace emu

#define threadIdx (emu::cur->tid)
#define blockIdx (emu::blk)
#define gridDim (emu::grd)
#define blockDim (emu::bdim)
