"""The torch side of the device check: the same shapes as the engine's CUDA benches, timed
with CUDA events (median of repeats after warm-up), written as JSON lines.

    python3 scripts/device_torch.py --out torch.jsonl [--skip-flex]

Peers (DESIGN.md §7, issue 3):
- matmul: cuBLAS bf16 `F.linear` on pre-dequantised weights; NF4 dequantise-then-matmul
  (bitsandbytes' CUDA dequantize_4bit + F.linear when bitsandbytes imports, which is what
  Linear4bit does for prefill; else the same in torch ops);
- attention: `scaled_dot_product_attention` (causal, GQA, no softcap) and FlexAttention with a
  tanh softcap score_mod (and a sliding-window mask for Gemma's sliding layers);
- RMSNorm, RoPE, residual add, gated activation: the transformers eager formulas in bf16.
Each line: {"op", "model", "tokens", "variant", "ms", "flops" or "bytes"}.
"""
import argparse
import json
import math
import sys

import torch
import torch.nn.functional as F

MODELS = {
    # name: hidden, q heads, kv heads, head_dim, intermediate, softcap, window
    "gemma2_9b": (3584, 16, 8, 256, 14336, 50.0, 4096),
    "llama31_8b": (4096, 32, 8, 128, 14336, None, None),
}
TOKENS = (1536, 3072, 6144)
ROW = 1536  # attention rows are 1536 tokens long


def bench(fn, reps=20, warmup=5):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    return times[len(times) // 2]


def projections(model):
    """The distinct projection shapes (n, k), named as in benches/cuda_linear.rs."""
    if model == "gemma2_9b":
        return {"q": (4096, 3584), "kv": (2048, 3584), "o": (3584, 4096), "gate_up": (14336, 3584), "down": (3584, 14336)}
    return {"q_o": (4096, 4096), "kv": (1024, 4096), "gate_up": (14336, 4096), "down": (4096, 14336)}


NF4 = torch.tensor([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
                    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
                    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
                    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0])


def nf4_dequant_fn(w):
    """A dequantise(-then-matmul) closure for weight w (bf16, [n, k]): bitsandbytes if present."""
    try:
        import bitsandbytes.functional as bnbF

        q, state = bnbF.quantize_4bit(w, blocksize=64, quant_type="nf4")
        return "bitsandbytes", lambda: bnbF.dequantize_4bit(q, state)
    except Exception:  # noqa: BLE001 - any import/runtime failure means: use torch ops
        flat = w.float().reshape(-1, 64)
        absmax = flat.abs().amax(1)
        codes = torch.bucketize(flat / absmax[:, None], (NF4.cuda()[1:] + NF4.cuda()[:-1]) / 2)
        packed = (codes[:, 0::2] << 4 | codes[:, 1::2]).to(torch.uint8)
        lut = NF4.cuda()

        def deq():
            p = packed.to(torch.int64)
            n = torch.stack([p >> 4, p & 15], -1).reshape(flat.shape[0], 64)
            return (lut[n] * absmax[:, None]).to(torch.bfloat16).reshape(w.shape)

        return "torch", deq


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--skip-flex", action="store_true")
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    dev = torch.device("cuda")
    out = open(args.out, "w")

    def emit(**kw):
        out.write(json.dumps(kw) + "\n")
        out.flush()
        print(json.dumps(kw), flush=True)

    g = torch.Generator(device="cuda").manual_seed(0)
    # Ceilings, measured in this run.
    x = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16, generator=g)
    ms = bench(lambda: x @ x, reps=10)
    emit(op="ceiling", model="-", tokens=0, variant="bf16_matmul_8192", ms=ms, flops=2 * 8192 ** 3)
    buf = torch.empty(2 ** 30, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(buf)
    ms = bench(lambda: dst.copy_(buf), reps=10)
    emit(op="ceiling", model="-", tokens=0, variant="copy_1GiB", ms=ms, bytes=2 * 2 ** 30)
    del x, buf, dst

    for model, (h, nh, nkv, d, inter, cap, window) in MODELS.items():
        projs = projections(model)
        weights = {p: torch.randn(n, k, device=dev, dtype=torch.bfloat16, generator=g) * 0.02 for p, (n, k) in projs.items()}
        deqs = {p: nf4_dequant_fn(w) for p, w in weights.items()}
        for t in TOKENS:
            xs = {k: torch.randn(t, k, device=dev, dtype=torch.bfloat16, generator=g) for k in {k for _, k in projs.values()}}
            for p, (n, k) in projs.items():
                w = weights[p]
                flops = 2 * t * n * k
                emit(op="matmul", model=model, tokens=t, variant=f"{p}/cublas_bf16", ms=bench(lambda: F.linear(xs[k], w)), flops=flops)
                impl, deq = deqs[p]
                emit(op="matmul", model=model, tokens=t, variant=f"{p}/dequant_then_matmul_{impl}",
                     ms=bench(lambda: F.linear(xs[k], deq())), flops=flops)
            # Row-wise ops, eager formulas of transformers in bf16.
            xr = torch.randn(t, h, device=dev, dtype=torch.bfloat16, generator=g)
            ar = torch.randn(t, h, device=dev, dtype=torch.bfloat16, generator=g)
            wn = torch.randn(h, device=dev, dtype=torch.bfloat16, generator=g) * 0.1

            def rms():
                v = xr.float()
                v = v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + 1e-6)
                return (v * (1.0 + wn.float())).to(torch.bfloat16)

            emit(op="rms_norm", model=model, tokens=t, variant="torch_eager", ms=bench(rms), bytes=2 * t * h * 2)
            emit(op="add", model=model, tokens=t, variant="torch_eager", ms=bench(lambda: xr + ar), bytes=3 * t * h * 2)
            q = torch.randn(t, nh, d, device=dev, dtype=torch.bfloat16, generator=g)
            pos = torch.arange(t, device=dev) % ROW
            inv = 1.0 / (10000 ** (torch.arange(0, d, 2, device=dev).float() / d))
            fr = pos[:, None].float() * inv[None]
            emb = torch.cat([fr, fr], -1)
            cos, sin = emb.cos().to(torch.bfloat16)[:, None], emb.sin().to(torch.bfloat16)[:, None]

            def rope():
                x1, x2 = q[..., : d // 2], q[..., d // 2:]
                return q * cos + torch.cat([-x2, x1], -1) * sin

            emit(op="rope", model=model, tokens=t, variant="torch_eager", ms=bench(rope), bytes=2 * t * nh * d * 2 + 2 * t * d // 2 * 4)
            gt = torch.randn(t, inter, device=dev, dtype=torch.bfloat16, generator=g)
            up = torch.randn(t, inter, device=dev, dtype=torch.bfloat16, generator=g)
            act = (lambda v: F.gelu(v, approximate="tanh")) if cap else F.silu
            emit(op="gated", model=model, tokens=t, variant="torch_eager", ms=bench(lambda: act(gt) * up), bytes=3 * t * inter * 2)

            # Attention: rows of ROW tokens, [B, H, L, d].
            b = t // ROW
            qa = torch.randn(b, nh, ROW, d, device=dev, dtype=torch.bfloat16, generator=g)
            ka = torch.randn(b, nkv, ROW, d, device=dev, dtype=torch.bfloat16, generator=g)
            va = torch.randn(b, nkv, ROW, d, device=dev, dtype=torch.bfloat16, generator=g)
            scale = 1.0 / math.sqrt(d)
            for win in ([None, window] if window else [None]):
                visible = sum(min(i + 1, win) if win else i + 1 for i in range(ROW)) * b
                flops = 4 * d * visible * nh
                tag = f"window{win}" if win else "full"
                if win is None:
                    emit(op="attention", model=model, tokens=t, variant=f"{tag}/sdpa_nosoftcap",
                         ms=bench(lambda: F.scaled_dot_product_attention(qa, ka, va, is_causal=True, scale=scale, enable_gqa=True)),
                         flops=flops)
                if args.skip_flex:
                    continue
                try:
                    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

                    def mask(bi, hi, qi, ki, w=win):
                        ok = qi >= ki
                        return ok & (qi - ki < w) if w else ok

                    bm = create_block_mask(mask, None, None, ROW, ROW, device="cuda")
                    c = cap or 50.0

                    def softcap(s, bi, hi, qi, ki):
                        return c * torch.tanh(s / c)

                    flex = torch.compile(flex_attention)
                    fn = lambda: flex(qa, ka, va, score_mod=softcap, block_mask=bm, scale=scale, enable_gqa=True)  # noqa: E731
                    emit(op="attention", model=model, tokens=t, variant=f"{tag}/flex_softcap", ms=bench(fn), flops=flops)
                except Exception as e:  # noqa: BLE001
                    emit(op="attention", model=model, tokens=t, variant=f"{tag}/flex_softcap", ms=None, flops=flops, error=str(e)[:200])
    out.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
