#!/usr/bin/env bash
# Full-size inference on the GPU machine, engine vs transformers on the same random model:
#   scripts/device_full.sh OUT [ROWS]
# For gemma-2-9b and llama-3.1-8b: `engine init-model` writes a random bf16 checkpoint
# (tokenizer: the bundled tiny one, whose ids are valid in both vocabularies), ROWS rows of
# ~700 tokens are scored by `engine infer --device cuda --quant nf4`, then by transformers with
# bitsandbytes NF4 (bf16 compute, eager attention, batches of 8 sorted by length) on the same
# token ids, and tokens/s of both go to OUT/full.jsonl.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: device_full.sh OUT [ROWS]}
rows=${2:-64}
work=${WORK:-/tmp/engine-full}
mkdir -p "$work" "$out"
engine=target/release/engine
python3 - "$work/rows.csv" "$rows" <<'PY'
import csv, json, random, sys
random.seed(0)
words = "the model answer question explain reason because however example data result value first second".split()
def text(n):
    return " ".join(random.choice(words) for _ in range(n))
with open(sys.argv[1], "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["id", "prompt", "response_a", "response_b"])
    for i in range(int(sys.argv[2])):
        # ~700 tokens with the tiny tokenizer: one prompt and two answers of different lengths
        w.writerow([i, json.dumps([text(60)]), json.dumps([text(random.randint(150, 330))]), json.dumps([text(random.randint(150, 330))])])
PY
for preset in gemma-2-9b llama-3.1-8b; do
  m="$work/$preset"
  [ -f "$m/config.json" ] || "$engine" init-model --preset "$preset" --out "$m" --tokenizer assets/tiny/tokenizer.json
  "$engine" infer --model "$m" --data "$work/rows.csv" --out "$work/$preset.csv" --device cuda --quant nf4 \
     --max-length 1024 --quiet 2> "$work/$preset.engine.log" || { cat "$work/$preset.engine.log"; continue; }
  cat "$work/$preset.engine.log"
  tps=$(sed -n 's/.* \([0-9]*\) tokens\/s.*/\1/p' "$work/$preset.engine.log" | head -1)
  peak=$(sed -n 's/peak GPU memory \([0-9.]*\) GiB/\1/p' "$work/$preset.engine.log" | head -1)
  echo "{\"model\": \"$preset\", \"impl\": \"engine_nf4\", \"tokens_per_s\": ${tps:-null}, \"peak_gib\": ${peak:-null}}" >> "$out/full.jsonl"
  PYTHONUNBUFFERED=1 python3 - "$m" "$work/rows.csv" "$out/full.jsonl" "$preset" <<'PY'
import csv, json, sys, time
import torch
from transformers import AutoModelForSequenceClassification, BitsAndBytesConfig, PreTrainedTokenizerFast
m, rows_csv, out, preset = sys.argv[1:5]
tok = PreTrainedTokenizerFast(tokenizer_file=f"{m}/tokenizer.json")
cfg = json.load(open(f"{m}/config.json"))
eos = cfg["eos_token_id"][0] if isinstance(cfg["eos_token_id"], list) else cfg["eos_token_id"]
ids = []
for r in csv.DictReader(open(rows_csv)):
    p, a, b = (" ".join(json.loads(r[k])) for k in ("prompt", "response_a", "response_b"))
    ids.append(tok.encode("<prompt>: " + p + "\n\n<response_a>: " + a + "\n\n<response_b>: " + b)[:1023] + [eos])
try:
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
                           llm_int8_skip_modules=["score"])
    kind = "transformers_bnb_nf4"
except Exception:
    q, kind = None, "transformers_bf16"
t0 = time.time()
model = AutoModelForSequenceClassification.from_pretrained(m, num_labels=3, dtype=torch.bfloat16, attn_implementation="eager",
                                                           device_map={"": 0}, quantization_config=q).eval()
load = time.time() - t0
pad = 0
model.config.pad_token_id = pad
order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
torch.cuda.reset_peak_memory_stats()
with torch.inference_mode():
    def run():
        for s in range(0, len(order), 8):
            batch = [ids[i] for i in order[s:s + 8]]
            n = max(map(len, batch))
            x = torch.tensor([b + [pad] * (n - len(b)) for b in batch], device="cuda")
            mask = torch.tensor([[1] * len(b) + [0] * (n - len(b)) for b in batch], device="cuda")
            model(input_ids=x, attention_mask=mask)
    run()
    torch.cuda.synchronize()
    t = time.time()
    run()
    torch.cuda.synchronize()
    sec = time.time() - t
tokens = sum(map(len, ids))
line = {"model": preset, "impl": kind, "tokens_per_s": tokens / sec, "peak_gib": torch.cuda.max_memory_allocated() / 2**30, "load_s": load}
print(line)
open(out, "a").write(json.dumps(line) + "\n")
PY
done
