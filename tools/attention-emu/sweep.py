import sys, itertools
from ref import *
VARIANTS = {
    64: [('fa_d64', 'd64', 'd64'), ('generic', 'generic', 'generic')],
    128: [('fa_d128', 'd128', 'd128'), ('fa_d128', 'd128_s1', 'd128_s1')],
    256: [('fa_d256', 'd256', 'd256'), ('fa_d256_n32', 'd256_n32', 'd256_s1'), ('fa_d256_n32', 'd256_n32_m16', 'd256_m32')],
}
F16_ONLY = {'d128_s1', 'd256_n32_m16', 'd256_m32', 'fa_d256_n32'}
worst = {}
n = 0
cases = []
for D in [64, 128, 256]:
    for (fwd, kv, qk) in VARIANTS[D]:
        for dtype in ['bf16', 'f16']:
            if dtype == 'bf16' and ({fwd, kv, qk} & F16_ONLY): continue
            cases.append((D, fwd, kv, qk, dtype))
sel = sys.argv[1] if len(sys.argv) > 1 else 'quick'
for (D, fwd, kv, qk, dtype) in cases:
    configs = [
        # lens, nh, nkv, cap, window, late
        ([1, 2, 17, 65], 2, 2, None, None, 0),
        ([130, 63], 4, 2, 3.0, None, 1),
        ([100, 64, 0, 5], 4, 1, None, 7, 0),
        ([150], 2, 1, 50.0, 65, 1),
        ([129, 33], 2, 1, None, 1, 1),
    ]
    if sel == 'quick': configs = configs[1:3]
    for (lens, nh, nkv, cap, window, late) in configs:
        n += 1
        scale = D ** -0.5
        got, ref, dt = run_emu(dtype, lens, nh, nkv, D, scale, cap, window, fwd, kv, qk, late=late, seed=n)
        r = report(got, ref, f'{dtype} D{D} {fwd}/{kv}/{qk} lens{lens} h{nh}/{nkv} cap{cap} w{window} late{late} ({dt:.1f}s)')
        for k, v in r.items():
            key = (dtype, k)
            worst[key] = max(worst.get(key, (0, 0)), v) if not isinstance(v, float) else (float('inf'),) * 2
        sys.stdout.flush()
print('WORST', worst)
