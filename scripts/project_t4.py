#!/usr/bin/env python3
"""Project `engine infer` time for the competition's test set (25,000 rows) on 2×T4 from
per-token costs measured on another GPU.

  project_t4.py make-rows --rows N --tokenizer tokenizer.json --out rows.csv
      Arena rows whose token lengths follow the length distribution below (for measuring).
  project_t4.py project --metrics multi.jsonl [--torch torch.jsonl] [--lengths FILE |
                        --data test.csv --tokenizer tokenizer.json] [--out projection.json]
      Per-token cost by length bucket from the per-batch timings of a sorted `engine infer
      --log-file` run, applied to 25,000 rows of the length distribution, scaled to a T4.

The length distribution. Without --lengths/--data it is an ESTIMATE, not the real data:
lognormal total tokens (prompt + both responses + headers) with median 460 and σ 0.83 (mean
≈ 650; ≈ 7 % of rows over 1536 and cut to it). It comes from published word statistics of the
competition's train.csv (prompt median ~16 / mean ~54 words, each response median ~162 / mean
~205 words), about 1.3 tokens per word for Gemma's and Llama-3's tokenizers on English prose,
and 16 tokens of headers, BOS and EOS; code and non-English text make real rows longer. With
--lengths (one token count per line) or --data (an arena CSV, counted with the model's
tokenizer.json: prompt, A and B tokens plus 16) the projection uses the real lengths.

The scaling to a T4. Nothing here ran on a T4. The factor is the ratio of dense tensor-core
peaks, H200 bf16 989 TFLOP/s to T4 f16 65 TFLOP/s (15.2×; memory bandwidth 4.8 TB/s to
320 GB/s is the same 15×), i.e. it assumes the engine reaches the same fraction of peak on both.
A second line assumes the T4 sustains only two thirds of that (its 70 W cap lowers clocks under
load), 22.8×. Two T4s split the rows evenly (the dynamic hand-out of `engine infer --gpus 0,1`).
"""

import argparse
import bisect
import csv
import json
import math
import random
import sys

MEDIAN, SIGMA, MAX_LEN, TEST_ROWS = 460.0, 0.83, 1536, 25_000
H200_PEAK, T4_PEAK, T4_SUSTAINED = 989e12, 65e12, 2.0 / 3.0
EDGES = [128, 256, 512, 768, 1024, 1280, 1536]


def assumed_lengths(n):
    """n quantiles of the assumed lognormal, cut to MAX_LEN (deterministic)."""
    from statistics import NormalDist

    z = NormalDist()
    return [min(MAX_LEN, max(32, round(MEDIAN * math.exp(SIGMA * z.inv_cdf((i + 0.5) / n))))) for i in range(n)]


def make_rows(a):
    random.seed(0)
    words = ("the model answer question explain reason because however example data result value "
             "first second third number point show simple case").split()
    per_word = 1.3
    try:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(a.tokenizer)
        sample = " ".join(random.choice(words) for _ in range(4000))
        per_word = len(tok.encode(sample, add_special_tokens=False).ids) / 4000
    except Exception as e:  # the ratio only steers the spread of lengths
        print(f"make-rows: no tokenizer ({e}); assuming {per_word} tokens per word", file=sys.stderr)
    lengths = assumed_lengths(a.rows)
    random.shuffle(lengths)  # file order is not length order
    with open(a.out, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "prompt", "response_a", "response_b"])
        for i, n in enumerate(lengths):
            content = max(12, n - 16) / per_word
            p = max(2, round(content * 0.15))
            share = random.uniform(0.3, 0.7)
            ra, rb = max(1, round((content - p) * share)), max(1, round((content - p) * (1 - share)))
            t = lambda k: " ".join(random.choice(words) for _ in range(k))
            w.writerow([i, json.dumps([t(p)]), json.dumps([t(ra)]), json.dumps([t(rb)])])
    print(f"wrote {a.rows} rows to {a.out} ({per_word:.2f} tokens per word)", file=sys.stderr)


def real_lengths(a):
    if a.lengths:
        return [min(MAX_LEN, int(l)) for l in open(a.lengths) if l.strip()], f"lengths from {a.lengths}"
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(a.tokenizer)
    csv.field_size_limit(1 << 30)
    out = []
    for r in csv.DictReader(open(a.data, newline="", encoding="utf-8")):
        n = 16
        for k in ("prompt", "response_a", "response_b"):
            turns = json.loads(r[k])
            n += sum(len(tok.encode(" " + (t or ""), add_special_tokens=False).ids) for t in turns)
        out.append(min(MAX_LEN, n))
    return out, f"token counts of {a.data} ({a.tokenizer})"


def bucket(length):
    return min(bisect.bisect_left(EDGES, length), len(EDGES) - 1)


def project(a):
    runs = [json.loads(l) for l in open(a.metrics) if l.strip()]
    run = next((r for r in runs if r.get("sort") and not r.get("tta")), None)
    if run is None:
        sys.exit(f"{a.metrics}: no sorted, non-TTA run with per-batch timings")
    # The first batch of each worker pays for module loading and allocator growth: left out.
    seen, batches = set(), []
    for worker, rows, tokens, longest, seconds in run["batches"]:
        if worker in seen:
            batches.append((rows, tokens, longest, seconds))
        seen.add(worker)
    sums = [[0.0, 0] for _ in EDGES]
    for rows, tokens, longest, seconds in batches:
        s = sums[bucket(longest)]
        s[0] += seconds
        s[1] += tokens
    measured = {i: s[0] / s[1] for i, s in enumerate(sums) if s[1] > 0}
    if not measured:
        sys.exit(f"{a.metrics}: too few batches to measure")

    def cost(i):  # seconds per token of bucket i; nearest measured bucket where none ran
        if i in measured:
            return measured[i]
        return measured[min(measured, key=lambda j: (abs(j - i), -j))]

    if a.lengths or a.data:
        lengths, source = real_lengths(a)
        lengths = [lengths[i % len(lengths)] for i in range(TEST_ROWS)] if len(lengths) < TEST_ROWS else lengths
        scale_rows = TEST_ROWS / len(lengths)
    else:
        lengths, source, scale_rows = assumed_lengths(TEST_ROWS), (
            f"ESTIMATED lognormal lengths (median {MEDIAN:.0f}, sigma {SIGMA}, cut at {MAX_LEN})"), 1.0
    h200 = sum(l * cost(bucket(l)) for l in lengths) * scale_rows
    tf = None
    if a.torch:
        try:
            for l in open(a.torch):
                r = json.loads(l)
                if r.get("op") == "ceiling" and r.get("variant") == "bf16_matmul_8192" and r.get("ms"):
                    tf = r["flops"] / (r["ms"] * 1e-3)
        except OSError:
            pass
    factor = H200_PEAK / T4_PEAK
    t4_same = h200 * factor / 2 / 60
    t4_slow = h200 * factor / T4_SUSTAINED / 2 / 60
    report = {
        "model": run.get("model"),
        "measured_run": {k: run.get(k) for k in ("rows", "tokens", "seconds", "tokens_per_s", "max_length", "batch_tokens")},
        "buckets": [
            {"up_to": EDGES[i], "tokens": sums[i][1], "us_per_token": 1e6 * sums[i][0] / sums[i][1]}
            for i in range(len(EDGES)) if sums[i][1] > 0
        ],
        "lengths": source,
        "rows": TEST_ROWS,
        "mean_length": sum(lengths) / len(lengths),
        "measured_gpu_minutes": h200 / 60,
        "measured_bf16_matmul_tflops": tf / 1e12 if tf else None,
        "t4_factor": factor,
        "projected_2xT4_minutes": t4_same,
        "projected_2xT4_minutes_at_2/3_sustained": t4_slow,
        "projected_2xT4_minutes_tta": 2 * t4_same,
        "target_minutes": 80,
    }
    print(f"per-token cost by batch length (sorted run of {run['rows']} rows, first batch per worker left out):")
    for b in report["buckets"]:
        print(f"  ≤{b['up_to']:>5} tokens: {b['us_per_token']:.2f} µs/token over {b['tokens']} tokens")
    print(f"25,000 rows, {source}, mean {report['mean_length']:.0f} tokens:")
    print(f"  measured here: {h200 / 60:.1f} min")
    print(f"  PROJECTED 2×T4 (×{factor:.1f}, same fraction of peak): {t4_same:.0f} min;"
          f" at 2/3 sustained: {t4_slow:.0f} min; with --tta about twice that. Target ≤ 80 min.")
    if a.out:
        json.dump(report, open(a.out, "w"), indent=1)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make-rows")
    m.add_argument("--rows", type=int, default=512)
    m.add_argument("--tokenizer", required=True)
    m.add_argument("--out", required=True)
    q = sub.add_parser("project")
    q.add_argument("--metrics", required=True)
    q.add_argument("--torch")
    q.add_argument("--lengths")
    q.add_argument("--data")
    q.add_argument("--tokenizer")
    q.add_argument("--out")
    a = p.parse_args()
    if a.cmd == "make-rows":
        make_rows(a)
    else:
        if a.data and not a.tokenizer:
            p.error("--data needs --tokenizer")
        project(a)


if __name__ == "__main__":
    main()
