"""CPU inference throughput of transformers (eager attention, f32) on an engine model directory,
for a side-by-side with `engine infer --device cpu` on the same rows and threads.

    python scripts/cpu_throughput.py --model DIR --data rows.csv --max-length 512 --threads 2

Tokenises with the `concat` rule of DESIGN.md §5 (what `engine infer --format concat` does),
then times two ways of running the rows and prints tokens/s for each:
  bs1   one row at a time (no padding);
  bs8   rows sorted by length, batches of 8 right-padded with an attention mask.
Only the forward passes are timed (after one warm-up row). Needs torch and transformers.
"""
import argparse
import csv
import json
import re
import sys
import time

import torch
from transformers import AutoModelForSequenceClassification, PreTrainedTokenizerFast


def turns(cell):
    """A JSON-list cell's turns; null -> "", lone surrogates -> U+FFFD (as the engine reads them)."""
    return [re.sub(r"[\ud800-\udfff]", "\ufffd", t) if t is not None else "" for t in json.loads(cell)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=1, help="score the rows this many times")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    tok = PreTrainedTokenizerFast(tokenizer_file=f"{args.model}/tokenizer.json")
    cfg = json.load(open(f"{args.model}/config.json"))
    eos = cfg["eos_token_id"][0] if isinstance(cfg["eos_token_id"], list) else cfg["eos_token_id"]
    rows = list(csv.DictReader(open(args.data, newline="", encoding="utf-8")))
    ids = []
    for r in rows:
        p, a, b = (" ".join(turns(r[k])) for k in ("prompt", "response_a", "response_b"))
        text = "<prompt>: " + p + "\n\n<response_a>: " + a + "\n\n<response_b>: " + b
        ids.append(tok.encode(text)[: args.max_length - 1] + [eos])
    ids = ids * args.repeat
    tokens = sum(len(x) for x in ids)

    model = AutoModelForSequenceClassification.from_pretrained(
        args.model, num_labels=3, dtype=torch.float32, attn_implementation="eager").eval()
    pad = cfg.get("pad_token_id") or 0
    model.config.pad_token_id = pad
    results = {}
    with torch.inference_mode():
        model(input_ids=torch.tensor([ids[0]]))  # warm-up
        t = time.perf_counter()
        for x in ids:
            model(input_ids=torch.tensor([x]))
        results["bs1"] = time.perf_counter() - t

        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
        t = time.perf_counter()
        for s in range(0, len(order), 8):
            batch = [ids[i] for i in order[s:s + 8]]
            n = max(len(x) for x in batch)
            inp = torch.tensor([x + [pad] * (n - len(x)) for x in batch])
            mask = torch.tensor([[1] * len(x) + [0] * (n - len(x)) for x in batch])
            model(input_ids=inp, attention_mask=mask)
        results["bs8"] = time.perf_counter() - t
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {len(ids)} rows, {tokens} tokens")
    for k, sec in results.items():
        print(f"transformers eager f32 {k}: {sec:.2f}s, {tokens / sec:.0f} tokens/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
