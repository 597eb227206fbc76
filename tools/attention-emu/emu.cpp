#include "emu.h"
namespace emu {
Fiber* cur;
ucontext_t sched_ctx;
uint3 blk, grd, bdim;
std::vector<WarpState> warps;
int block_arrived;
unsigned block_gen;
char* smem;
size_t smem_bytes;
bool late_copies;
long long n_yields;
static const std::function<void()>* body;
static void trampoline() { (*body)(); cur->done = true; swapcontext(&cur->ctx, &sched_ctx); }

void launch(dim3 grid, dim3 block, size_t smem_size, const std::function<void()>& fn, unsigned seed) {
    std::mt19937 rng(seed);
    const int nt = block.x * block.y * block.z;
    static std::vector<Fiber> fibers;
    fibers.resize(nt);
    for (auto& f : fibers) if (f.stack.empty()) f.stack.resize(256 * 1024);
    static std::vector<char> smem_buf;
    smem_buf.assign(smem_size + 64 * 1024 + 16, 0);  // + static __shared__ arrays are separate
    grd = make_uint3(grid.x, grid.y, grid.z);
    bdim = make_uint3(block.x, block.y, block.z);
    body = &fn;
    std::vector<int> order(nt);
    for (unsigned z = 0; z < grid.z; z++)
        for (unsigned y = 0; y < grid.y; y++)
            for (unsigned x = 0; x < grid.x; x++) {
                blk = make_uint3(x, y, z);
                smem = (char*)(((uintptr_t)smem_buf.data() + 15) & ~(uintptr_t)15);
                // garbage in shared memory, as on a GPU
                for (size_t i = 0; i < smem_size; i++) smem[i] = (char)(rng() | 0x80);
                smem_bytes = smem_size;
                warps.assign((nt + 31) / 32, WarpState{});
                block_arrived = 0;
                block_gen = 0;
                for (int i = 0; i < nt; i++) {
                    Fiber& f = fibers[i];
                    f.done = false; f.seq = 0; f.pending.clear();
                    f.lin = i; f.tid = make_uint3(i % block.x, (i / block.x) % block.y, i / (block.x * block.y));
                    getcontext(&f.ctx);
                    f.ctx.uc_stack.ss_sp = f.stack.data();
                    f.ctx.uc_stack.ss_size = f.stack.size();
                    f.ctx.uc_link = nullptr;
                    makecontext(&f.ctx, trampoline, 0);
                    order[i] = i;
                }
                int left = nt;
                while (left > 0) {
                    std::shuffle(order.begin(), order.end(), rng);
                    for (int i : order) {
                        Fiber& f = fibers[i];
                        if (f.done) continue;
                        cur = &f;
                        swapcontext(&sched_ctx, &f.ctx);
                        if (f.done) { left--; if (!f.pending.empty()) { fprintf(stderr, "EMU FAIL: thread exited with copies in flight\n"); abort(); } }
                    }
                }
                if (block_arrived != 0) { fprintf(stderr, "EMU FAIL: block %u,%u,%u ended with threads waiting at a barrier\n", x, y, z); abort(); }
                for (auto& w : warps) if (w.arrived[0] || w.arrived[1]) { fprintf(stderr, "EMU FAIL: warp collective incomplete\n"); abort(); }
            }
}

void* galloc(size_t bytes) {
    const size_t pg = 4096;
    size_t body_pages = (bytes + pg - 1) / pg + 1;
    char* base = (char*)mmap(nullptr, (body_pages + 2) * pg, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    mprotect(base, pg, PROT_NONE);
    mprotect(base + (body_pages + 1) * pg, pg, PROT_NONE);
    char* end = base + (body_pages + 1) * pg;
    char* p = (char*)(((uintptr_t)(end - bytes)) & ~(uintptr_t)15);
    memset(base + pg, 0xff, body_pages * pg);  // NaN poison
    return p;
}
}  // namespace emu
