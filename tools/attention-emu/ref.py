import numpy as np, os, subprocess, sys, time
HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.environ.get("EMU_OUT", os.path.join(HERE, "..", "..", "target", "attention-emu"))

def round_to(x, dtype):
    x = np.asarray(x, np.float32)
    if dtype == 'f32':
        return x
    if dtype == 'f16':
        return x.astype(np.float16).astype(np.float32)
    # bf16 round to nearest even
    u = x.view(np.uint32).astype(np.uint64)
    r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16
    return r.astype(np.uint32).view(np.float32)

def reference(q, k, v, do, lens, nh, nkv, D, scale, cap, window):
    """f64 attention forward + backward from the definition. Returns out, lse, dq, dk, dv."""
    T = sum(lens)
    q = q.reshape(T, nh, D).astype(np.float64); k = k.reshape(T, nkv, D).astype(np.float64)
    v = v.reshape(T, nkv, D).astype(np.float64); do = do.reshape(T, nh, D).astype(np.float64)
    out = np.zeros_like(q); lse = np.zeros((T, nh)); dq = np.zeros_like(q); dk = np.zeros_like(k); dv = np.zeros_like(v)
    grp = nh // nkv
    s0 = 0
    for L in lens:
        if L == 0: continue
        i = np.arange(L)[:, None]; j = np.arange(L)[None, :]
        vis = j <= i
        if window: vis &= (i - j) < window
        for h in range(nh):
            kh = h // grp
            Q = q[s0:s0+L, h]; K = k[s0:s0+L, kh]; V = v[s0:s0+L, kh]; dO = do[s0:s0+L, h]
            u = Q @ K.T * scale
            if cap: th = np.tanh(u / cap); s = cap * th
            else: s = u
            s = np.where(vis, s, -np.inf)
            m = s.max(1, keepdims=True)
            e = np.exp(s - m); l = e.sum(1, keepdims=True)
            P = e / l
            lse[s0:s0+L, h] = (m + np.log(l))[:, 0]
            O = P @ V
            out[s0:s0+L, h] = O
            dv[s0:s0+L, kh] += P.T @ dO
            dP = dO @ V.T
            Dd = (P * dP).sum(1, keepdims=True)
            dS = P * (dP - Dd)
            if cap: dS = dS * (1 - th**2)
            dS = np.where(vis, dS, 0)
            dq[s0:s0+L, h] = scale * dS @ K
            dk[s0:s0+L, kh] += scale * dS.T @ Q
        s0 += L
    return out.reshape(T, -1), lse, dq.reshape(T, -1), dk.reshape(T, -1), dv.reshape(T, -1)

def rand(n, rng, scale):
    return rng.uniform(-scale, scale, n).astype(np.float32)

def run_emu(dtype, lens, nh, nkv, D, scale, cap, window, fwd, kv, qk, late=0, seed=1, dout_scale=1.0, workdir=None):
    workdir = workdir or os.path.join(OUT, 'case')
    os.makedirs(workdir, exist_ok=True)
    rng = np.random.default_rng(seed)
    T = sum(lens)
    q = round_to(rand(T*nh*D, rng, 2.5), dtype); k = round_to(rand(T*nkv*D, rng, 2.5), dtype)
    v = round_to(rand(T*nkv*D, rng, 1.0), dtype); do = round_to(rand(T*nh*D, rng, dout_scale), dtype)
    for n, a in [('q', q), ('k', k), ('v', v), ('do', do)]:
        a.tofile(f'{workdir}/{n}.f32')
    with open(f'{workdir}/params.txt', 'w') as f:
        f.write(f'{nh} {nkv} {D} {scale!r} {cap or 0.0!r} {window or 0} {late} {seed} {fwd} {kv} {qk} {len(lens)} ' + ' '.join(map(str, lens)) + '\n')
    t0 = time.time()
    r = subprocess.run([os.path.join(OUT, 'emu'), workdir, dtype], capture_output=True, text=True)
    if r.returncode != 0:
        print(r.stderr); raise SystemExit(f'emulator failed rc={r.returncode}')
    got = {n: np.fromfile(f'{workdir}/{n}.f32', np.float32) for n in ['out', 'lse', 'dq', 'dk', 'dv']}
    ref = reference(q, k, v, do, lens, nh, nkv, D, scale, cap, window)
    return got, dict(zip(['out', 'lse', 'dq', 'dk', 'dv'], ref)), time.time() - t0

def report(got, ref, tag):
    res = {}
    for n in ['out', 'lse', 'dq', 'dk', 'dv']:
        g, w = got[n].astype(np.float64), ref[n].ravel()
        if np.isnan(g).any():
            print(f'{tag} {n}: {np.isnan(g).sum()} NaN of {g.size}'); res[n] = np.inf; continue
        err = np.abs(g - w)
        scale = np.abs(w).max() if w.size else 1
        # error relative to the tensor's largest magnitude, and the worst |err| / (|w| + max|w|)
        res[n] = (err.max() / scale if w.size else 0, np.sqrt((err**2).mean()) / (np.sqrt((w**2).mean()) + 1e-30) if w.size else 0)
    print(tag, ' '.join(f'{n}: max {a:.2e} rms {b:.2e}' if not isinstance(v, float) else f'{n}: NaN' for n, v in res.items() for a, b in [v if not isinstance(v, float) else (0, 0)]))
    return res

if __name__ == '__main__':
    got, ref, dt = run_emu('bf16', [17, 70], 2, 1, 64, 0.125, None, None, 'fa_d64', 'd64', 'd64')
    report(got, ref, f'smoke ({dt:.1f}s)')
