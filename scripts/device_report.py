"""One table of the device check: our kernels (criterion estimates) against the torch peers
(scripts/device_torch.py) on the same shapes and GPU, plus the GPU test summary.

    python3 scripts/device_report.py OUT_DIR

Ratios are time(ours) / time(peer): below 1 means we are faster. Bandwidth-bound ops are also
given as a fraction of the copy bandwidth measured in the same run, matmul and attention as a
fraction of the measured bf16 matmul rate.
"""
import glob
import json
import os
import re
import sys


def ours(out):
    """criterion full_id -> (mean seconds, throughput dict)."""
    res = {}
    for bj in glob.glob(os.path.join(out, "criterion", "**", "new", "benchmark.json"), recursive=True):
        est = os.path.join(os.path.dirname(bj), "estimates.json")
        if not os.path.exists(est):
            continue
        b = json.load(open(bj))
        e = json.load(open(est))
        res[b["full_id"]] = (e["mean"]["point_estimate"] * 1e-9, b.get("throughput"))
    return res


def torch_rows(out):
    path = os.path.join(out, "torch.jsonl")
    if not os.path.exists(path):
        return []
    return [json.loads(line) for line in open(path) if line.strip()]


def main():
    out = sys.argv[1]
    mine = ours(out)
    peers = torch_rows(out)
    ceil = {r["variant"]: r for r in peers if r["op"] == "ceiling" and r.get("ms")}
    flops_ceiling = ceil.get("bf16_matmul_8192")
    copy_ceiling = ceil.get("copy_1GiB")
    tf_peak = flops_ceiling["flops"] / (flops_ceiling["ms"] * 1e-3) if flops_ceiling else None
    bw_peak = copy_ceiling["bytes"] / (copy_ceiling["ms"] * 1e-3) if copy_ceiling else None

    def peer(op, model, t, variant):
        for r in peers:
            if r["op"] == op and r["model"] == model and r["tokens"] == t and r["variant"] == variant and r.get("ms"):
                return r["ms"] * 1e-3
        return None

    lines = ["# Device check report", ""]
    if tf_peak:
        lines.append(f"Measured ceilings: bf16 matmul {tf_peak / 1e12:.0f} TFLOP/s, copy {bw_peak / 1e12:.2f} TB/s" if bw_peak else "")
    tests = os.path.join(out, "tests.log")
    if os.path.exists(tests):
        text = open(tests).read()
        passed = sum(int(m) for m in re.findall(r"test result: \w+\. (\d+) passed", text))
        failed = sum(int(m) for m in re.findall(r"(\d+) failed", text))
        skipped = text.count("SKIPPED")
        fails = re.findall(r"^test (\S+) \.\.\. FAILED", text, re.M)
        lines.append(f"GPU tests: {passed} passed, {failed} failed, {skipped} skipped" + (f" — failed: {', '.join(fails)}" if fails else ""))
    lines += ["", "| op | model | tokens | ours | peer | ours/peer | ours vs ceiling |", "|---|---|---|---|---|---|---|"]

    for fid, (sec, thr) in sorted(mine.items()):
        parts = fid.split("/")
        group = parts[0]
        row = None
        if group == "cuda_linear" and len(parts) == 5:
            _, model, proj, t, kind = parts
            t = int(t)
            flops = thr.get("Elements") if thr else None
            frac = f"{flops / sec / tf_peak:.0%} of bf16 peak" if flops and tf_peak else ""
            for variant in ([f"{proj}/cublas_bf16"] + [f"{proj}/dequant_then_matmul_bitsandbytes", f"{proj}/dequant_then_matmul_torch"]):
                p = peer("matmul", model, t, variant)
                if p:
                    lines.append(f"| matmul {proj} {kind} | {model} | {t} | {sec * 1e3:.3f} ms | {variant.split('/')[1]} {p * 1e3:.3f} ms | {sec / p:.2f} | {frac} |")
                    row = True
        elif group == "cuda_attention" and len(parts) == 4:
            _, model, mask, t = parts
            t = int(t)
            flops = thr.get("Elements") if thr else None
            frac = f"{flops / sec / 1e12:.0f} TFLOP/s ({flops / sec / tf_peak:.0%})" if flops and tf_peak else ""
            for variant in (f"{mask}/sdpa_nosoftcap", f"{mask}/flex_softcap"):
                p = peer("attention", model, t, variant)
                if p:
                    lines.append(f"| attention {mask} | {model} | {t} | {sec * 1e3:.3f} ms | {variant.split('/')[1]} {p * 1e3:.3f} ms | {sec / p:.2f} | {frac} |")
                    row = True
        elif group == "cuda_rowwise" and len(parts) == 4:
            _, op, model, t = parts
            t = int(t)
            nbytes = thr.get("Bytes") if thr else None
            frac = f"{nbytes / sec / bw_peak:.0%} of copy" if nbytes and bw_peak else ""
            variant = "torch_eager"
            opname = {"norm_add_norm": "rms_norm"}.get(op, op)
            p = peer(opname, model, t, variant) if op != "norm_add_norm" else None
            lines.append(f"| {op} | {model} | {t} | {sec * 1e3:.3f} ms | {f'eager {p * 1e3:.3f} ms' if p else '-'} | {f'{sec / p:.2f}' if p else '-'} | {frac} |")
            row = True
        if not row:
            lines.append(f"| {fid} | | | {sec * 1e3:.3f} ms | - | - | |")
    full = os.path.join(out, "full.jsonl")
    if os.path.exists(full):
        lines += ["", "| full-size inference | impl | tokens/s | peak GiB |", "|---|---|---|---|"]
        for line in open(full):
            r = json.loads(line)
            lines.append(f"| {r['model']} | {r['impl']} | {r.get('tokens_per_s') or '-'} | {r.get('peak_gib') or '-'} |")
    full_train = os.path.join(out, "full_train.jsonl")
    if os.path.exists(full_train):
        lines += ["", "| full-size QLoRA step | impl | ms/step | tokens/s | MFU (4·P·tokens) | peak GiB |", "|---|---|---|---|---|---|"]
        params = {}
        for line in open(full_train):
            r = json.loads(line)
            params.setdefault(r["model"], r.get("params"))
        for line in open(full_train):
            r = json.loads(line)
            p = params.get(r["model"]) or r.get("params")
            mfu = f"{4 * p * r['tokens_per_step'] / (r['ms_per_step'] / 1e3) / tf_peak:.0%}" if p and tf_peak else "-"
            lines.append(f"| {r['model']} | {r['impl']} | {r['ms_per_step']:.0f} | {r['tokens_per_s']:.0f} | {mfu} | {r['peak_gib']:.1f} |")
        # A T4 shows 15,360 MiB to CUDA; the context and cuBLAS-free engine runtime take about
        # 0.5 GiB beside the allocations counted in the peak. f16 on a T4 has bf16's sizes.
        for line in open(full_train):
            r = json.loads(line)
            if r["impl"].startswith("engine") and r.get("peak_gib"):
                need = r["peak_gib"] + 0.5
                lines.append(f"T4 fit ESTIMATE ({r['model']}, {r['impl']}): peak {r['peak_gib']:.1f} GiB + ~0.5 GiB context = "
                             f"{need:.1f} of 15.0 GiB: {'fits' if need <= 15.0 else 'does NOT fit'}")
    multi = os.path.join(out, "multi.jsonl")
    if os.path.exists(multi):
        runs = [json.loads(l) for l in open(multi) if l.strip()]
        base = next((r for r in runs if r["sort"] and not r["tta"]), None)
        lines += ["", "| gemma-2-9b nf4 inference, same rows | rows/s | tokens/s | time vs sorted | peak GiB |", "|---|---|---|---|---|"]
        for r in runs:
            kind = "--tta" if r["tta"] else ("longest first" if r["sort"] else "file order (--no-sort)")
            rel = f"{r['seconds'] / base['seconds']:.2f}×" if base else "-"
            lines.append(f"| {kind} | {r['rows_per_s']:.1f} | {r['tokens_per_s']:.0f} | {rel} | {(r['peak_gpu_bytes'] or 0) / 2**30:.1f} |")
    proj = os.path.join(out, "projection.json")
    if os.path.exists(proj):
        p = json.load(open(proj))
        lines += ["", f"25,000 rows ({p['lengths']}, mean {p['mean_length']:.0f} tokens): "
                  f"{p['measured_gpu_minutes']:.1f} min measured here; PROJECTED 2×T4 "
                  f"{p['projected_2xT4_minutes']:.0f} min (×{p['t4_factor']:.1f} peak ratio), "
                  f"{p['projected_2xT4_minutes_at_2/3_sustained']:.0f} min at 2/3 sustained; target ≤ 80 min."]
    dp = os.path.join(out, "multi_dp.json")
    if os.path.exists(dp):
        d = json.load(open(dp))
        lines.append(f"Launched one-rank NCCL training vs plain GPU run: max |Δ| adapter {d['max_abs_diff']:.3g} over {d['tensors']} tensors.")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
