#include "kern.cpp"
#include <string>
#include <map>

// emu DIR: reads DIR/params.txt and DIR/{q,k,v,do}.f32, writes DIR/{out,lse,dq,dk,dv}.f32
static std::vector<float> readf(const std::string& p, size_t n) {
    std::vector<float> v(n);
    FILE* f = fopen(p.c_str(), "rb");
    if (!f || fread(v.data(), 4, n, f) != n) { fprintf(stderr, "read %s\n", p.c_str()); exit(2); }
    fclose(f);
    return v;
}
static void writef(const std::string& p, const float* x, size_t n) {
    FILE* f = fopen(p.c_str(), "wb"); fwrite(x, 4, n, f); fclose(f);
}
template <typename T> static T cvt(float x) { return from_f32<T>(x); }

struct Meta { int threads, tile, smem; };
template <int D, int KG, int DS, int BM, int ST> Meta kvm() { using C = bwd::Kv<D, KG, DS, BM, ST>; return {C::THREADS, C::BN, C::SMEM}; }
template <int D, int W, int BN, int ST> Meta qm() { using C = bwd::Qt<D, W, BN, ST>; return {C::THREADS, C::BM, C::SMEM}; }

template <typename T> int run(const std::string& dir, int argc, char** argv) {
    // params: nh nkv d scale cap window mode seed fwd kv q nrows lens...
    FILE* pf = fopen((dir + "/params.txt").c_str(), "r");
    int nh, nkv, D, window, late, nrows; unsigned seed; float scale, cap;
    char fwd[64], kvn[64], qn[64];
    if (fscanf(pf, "%d %d %d %f %f %d %d %u %63s %63s %63s %d", &nh, &nkv, &D, &scale, &cap, &window, &late, &seed, fwd, kvn, qn, &nrows) != 12) { fprintf(stderr, "params\n"); return 2; }
    std::vector<int> cu(nrows + 1, 0);
    int max_len = 0;
    for (int r = 0; r < nrows; r++) { int l; if (fscanf(pf, "%d", &l) != 1) return 2; cu[r + 1] = cu[r] + l; max_len = std::max(max_len, l); }
    fclose(pf);
    emu::late_copies = late;
    const int t = cu[nrows];
    const size_t nq = (size_t)t * nh * D, nk = (size_t)t * nkv * D;
    auto up = [&](const std::string& name, size_t n) {
        auto h = readf(dir + "/" + name + ".f32", n);
        T* d = (T*)emu::galloc(std::max<size_t>(n, 1) * sizeof(T));
        for (size_t i = 0; i < n; i++) d[i] = cvt<T>(h[i]);
        return d;
    };
    T* q = up("q", nq); T* k = up("k", nk); T* v = up("v", nk); T* dout = up("do", nq);
    int* cug = (int*)emu::galloc(cu.size() * 4); memcpy(cug, cu.data(), cu.size() * 4);
    T* out = (T*)emu::galloc(std::max<size_t>(nq, 1) * sizeof(T));
    float* lse = (float*)emu::galloc(std::max(t * nh, 1) * 4);
    float2* ld = (float2*)emu::galloc(std::max(t * nh, 1) * 8);
    T* dq = (T*)emu::galloc(std::max<size_t>(nq, 1) * sizeof(T));
    T* dk = (T*)emu::galloc(std::max<size_t>(nk, 1) * sizeof(T));
    T* dv = (T*)emu::galloc(std::max<size_t>(nk, 1) * sizeof(T));
    engine_attention_params p{};
    p.n_heads = nh; p.n_kv_heads = nkv; p.head_dim = D; p.num_rows = nrows; p.total_tokens = t; p.max_len = max_len;
    p.window = (window > 0 && window < max_len) ? window : 0; p.scale = scale; p.softcap = cap;
    auto cdiv = [](int a, int b) { return (a + b - 1) / b; };
    constexpr bool BF = std::is_same<T, bf16>::value;
    constexpr bool F32 = std::is_same<T, float>::value;
#define SEL(bfn, f16n) (BF ? (decltype(&f16n))(void*)&bfn : &f16n)
    // forward
    {
        std::string f = fwd;
        using Fn = void (*)(T*, float*, const T*, const T*, const T*, const int*, engine_attention_params);
        Fn fn = nullptr; int bn = 0;
        if (f == "generic") fn = (Fn)(F32 ? (void*)&attention_generic_f32 : BF ? (void*)&attention_generic_bf16 : (void*)&attention_generic_f16);
        else if (F32) { fprintf(stderr, "f32: generic only\n"); return 2; }
        else if (f == "fa_d64") { fn = (Fn)(BF ? (void*)&attention_fa_d64_bf16 : (void*)&attention_fa_d64_f16); bn = 64; }
        else if (f == "fa_d128") { fn = (Fn)(BF ? (void*)&attention_fa_d128_bf16 : (void*)&attention_fa_d128_f16); bn = 64; }
        else if (f == "fa_d256") { fn = (Fn)(BF ? (void*)&attention_fa_d256_bf16 : (void*)&attention_fa_d256_f16); bn = 64; }
        else if (f == "fa_d256_n32") { fn = (Fn)(void*)&attention_fa_d256_n32_f16; bn = 32; }
        else { fprintf(stderr, "fwd %s\n", fwd); return 2; }
        if (bn) emu::launch(dim3(cdiv(max_len, 64), nh, nrows), dim3(128), (64 + 2 * bn) * D * 2, [&] { fn(out, lse, q, k, v, cug, p); }, seed);
        else emu::launch(dim3(cdiv(max_len, 4), nh, nrows), dim3(128), 0, [&] { fn(out, lse, q, k, v, cug, p); }, seed);
    }
    emu::launch(dim3(cdiv(t * nh, 4)), dim3(128), 0, [&] {
        if constexpr (F32) attention_bwd_prep_f32(ld, lse, out, dout, p); else if constexpr (BF) attention_bwd_prep_bf16(ld, lse, out, dout, p); else attention_bwd_prep_f16(ld, lse, out, dout, p);
    }, seed + 1);
    if (getenv("EMU_DEBUG")) { double s = 0, so = 0; for (size_t i = 0; i < nq; i++) { s += to_f32(dout[i]); so += to_f32(out[i]); } fprintf(stderr, "sum dout %f out %f ld0 %f %f\n", s, so, ld[0].x, ld[0].y); }
    {
        using Fn = void (*)(T*, T*, const T*, const T*, const T*, const T*, const float2*, const int*, engine_attention_params);
        std::string n = kvn; Fn fn = nullptr; Meta m{128, 4, 0};
#define KV(NAME, D_, KG, DS, BM, ST) else if (n == #NAME) { fn = (Fn)(BF ? (void*)&attention_bwd_kv_##NAME##_bf16 : (void*)&attention_bwd_kv_##NAME##_f16); m = kvm<D_, KG, DS, BM, ST>(); }
#define KVH(NAME, D_, KG, DS, BM, ST) else if (n == #NAME) { fn = (Fn)(void*)&attention_bwd_kv_##NAME##_f16; m = kvm<D_, KG, DS, BM, ST>(); }
        if (n == "generic") fn = (Fn)(F32 ? (void*)&attention_bwd_kv_generic_f32 : BF ? (void*)&attention_bwd_kv_generic_bf16 : (void*)&attention_bwd_kv_generic_f16);
        else if (F32) return 2;
        KV(d64, 64, 4, 1, 64, 2) KV(d128, 128, 4, 1, 32, 2) KV(d256, 256, 4, 2, 32, 2) KV(d256_n32, 256, 2, 2, 32, 1)
        KVH(d128_s1, 128, 4, 1, 32, 1) KVH(d256_n32_m16, 256, 2, 2, 16, 1)
        else { fprintf(stderr, "kv %s\n", kvn); return 2; }
        fprintf(stderr, "kv %s: threads %d keys %d smem %d\n", kvn, m.threads, m.tile, m.smem);
        emu::launch(dim3(cdiv(max_len, m.tile), nkv, nrows), dim3(m.threads), m.smem, [&] { fn(dk, dv, q, k, v, dout, ld, cug, p); }, seed + 2);
    }
    {
        using Fn = void (*)(T*, const T*, const T*, const T*, const T*, const float2*, const int*, engine_attention_params);
        std::string n = qn; Fn fn = nullptr; Meta m{128, 4, 0};
#define QQ(NAME, D_, W, BN, ST) else if (n == #NAME) { fn = (Fn)(BF ? (void*)&attention_bwd_q_##NAME##_bf16 : (void*)&attention_bwd_q_##NAME##_f16); m = qm<D_, W, BN, ST>(); }
#define QH(NAME, D_, W, BN, ST) else if (n == #NAME) { fn = (Fn)(void*)&attention_bwd_q_##NAME##_f16; m = qm<D_, W, BN, ST>(); }
        if (n == "generic") fn = (Fn)(F32 ? (void*)&attention_bwd_q_generic_f32 : BF ? (void*)&attention_bwd_q_generic_bf16 : (void*)&attention_bwd_q_generic_f16);
        else if (F32) return 2;
        QQ(d64, 64, 4, 64, 2) QQ(d128, 128, 4, 64, 2) QQ(d256, 256, 4, 32, 2) QQ(d256_s1, 256, 4, 32, 1)
        QH(d128_s1, 128, 4, 64, 1) QH(d256_m32, 256, 2, 16, 1)
        else { fprintf(stderr, "q %s\n", qn); return 2; }
        fprintf(stderr, "q %s: threads %d queries %d smem %d\n", qn, m.threads, m.tile, m.smem);
        emu::launch(dim3(cdiv(max_len, m.tile), nh, nrows), dim3(m.threads), m.smem, [&] { fn(dq, q, k, v, dout, ld, cug, p); }, seed + 3);
    }
    auto down = [&](const std::string& name, const T* d, size_t n) {
        std::vector<float> h(n); for (size_t i = 0; i < n; i++) h[i] = to_f32(d[i]); writef(dir + "/" + name + ".f32", h.data(), n);
    };
    down("out", out, nq); down("dq", dq, nq); down("dk", dk, nk); down("dv", dv, nk);
    writef(dir + "/lse.f32", lse, t * nh);
    writef(dir + "/ld.f32", (float*)ld, 2 * t * nh);
    fprintf(stderr, "yields %lld\n", emu::n_yields);
    return 0;
}

int main(int argc, char** argv) {
    std::string dir = argv[1], dtype = argv[2];
    if (dtype == "bf16") return run<bf16>(dir, argc, argv);
    if (dtype == "f32") return run<float>(dir, argc, argv);
    return run<f16>(dir, argc, argv);
}
