# Build kern.cpp: kernels/common.cuh + kernels/attention.cu compiled as host C++ on the emulator.
import re, sys
import os
HERE = os.path.dirname(os.path.abspath(__file__))
K = os.path.join(HERE, '..', '..', 'kernels') + '/'
OUT = os.environ.get('EMU_OUT', os.path.join(HERE, '..', '..', 'target', 'attention-emu'))
os.makedirs(OUT, exist_ok=True)
common = open(K + 'common.cuh').read()
att = open(K + 'attention.cu').read()
a = att.index('// PTX wrappers')
a = att.rindex('// ----', 0, a)
b = att.index('// The tensor-core kernel.')
b = att.rindex('// ----', 0, b)
wrappers = r'''
inline uint32_t smem_addr(const void* p) { return (uint32_t)((const char*)p - emu::smem); }
inline void copy16(void* dst, const void* src, bool ok) { emu::copy16(dst, src, ok); }
inline void copy_commit() {}
inline void copy_wait_all() { emu::copy_wait_all(); }
inline void ldsm_x4(uint32_t (&r)[4], uint32_t addr) { emu::ldsm(r, addr, false); }
inline void ldsm_x4_trans(uint32_t (&r)[4], uint32_t addr) { emu::ldsm(r, addr, true); }
inline float bf16_bits(uint16_t x) { uint32_t u = (uint32_t)x << 16; float f; memcpy(&f, &u, 4); return f; }
inline float f16_bits(uint16_t x) { __half h; memcpy(&h, &x, 2); return __half2float(h); }
template <typename T> inline void mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);
template <> inline void mma16816<bf16>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) { emu::mma(c, a, b0, b1, bf16_bits); }
template <> inline void mma16816<f16>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) { emu::mma(c, a, b0, b1, f16_bits); }
template <typename T> inline uint32_t pack2(float lo, float hi);
template <> inline uint32_t pack2<bf16>(float lo, float hi) { __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi); uint32_t r; memcpy(&r, &v, 4); return r; }
template <> inline uint32_t pack2<f16>(float lo, float hi) { __half2 v = __floats2half2_rn(lo, hi); uint32_t r; memcpy(&r, &v, 4); return r; }
inline float ex2(float x) { float y = exp2f(x); if (std::fpclassify(y) == FP_SUBNORMAL) y = 0.0f; return y; }
inline float tanh_fast(float x) {
    const float e = ex2(x * 2.8853900817779268f);
    return 1.0f - 2.0f / (e + 1.0f);
}
'''
att = att[:a] + '// emulated PTX wrappers\n' + wrappers + '\n' + att[b:]
att = att.replace('#include "common.cuh"', '')
src = common + '\n' + att
src = src.replace('extern __shared__ uint4 smem_u4[];', 'uint4* smem_u4 = reinterpret_cast<uint4*>(emu::smem);')
assert 'extern __shared__' not in src
src = src.replace('__shared__', 'static')
src = src.replace('#pragma once', '')
prelude = r'''
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include "emu.h"
#undef __device__
#undef __forceinline__
#undef __global__
#undef __launch_bounds__
#define __device__
#define __forceinline__ inline
#define __global__
#define __launch_bounds__(...)
#define __shfl_xor_sync(m, v, o) emu::shfl_xor(v, o)
#define __shfl_sync(m, v, s) emu::shfl(v, s)
#define __syncthreads() emu::syncthreads()
#define __syncwarp() emu::syncwarp()
#define __trap() emu::fail("trap")
#define __fdividef(a, b) ((a) / (b))
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
'''
open(os.path.join(OUT, 'kern.cpp'), 'w').write(prelude + src)
