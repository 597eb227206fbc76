#!/usr/bin/env bash
# Full-size QLoRA training steps on the GPU machine, engine vs transformers + PEFT on the same
# random model and shapes:
#   scripts/device_full_train.sh OUT [STEPS]
# For gemma-2-9b (seq 1536, the gemma2-9b recipe: r 32, alpha 64, all 7 projections, first 2
# layers frozen) and llama-3.1-8b (seq 1280, its recipe: q/k/v/o): STEPS optimiser steps of one
# row each, gradient checkpointing on, NF4 base. transformers side: bitsandbytes NF4 (bf16
# compute) when bitsandbytes imports (carry it: target/fixture-carry), else a bf16 base — the
# line says which; PEFT LoRA with the same targets; gradient checkpointing; torch AdamW.
# Reports ms/step, tokens/s, model-FLOP utilisation (4·params·tokens per step: forward and
# input gradients of the frozen base; LoRA and attention terms ignored) against the bf16
# matmul ceiling measured in the same run, and peak GPU memory, to OUT/full_train.jsonl.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: device_full_train.sh OUT [STEPS]}
steps=${2:-4}
work=${WORK:-/tmp/engine-full}
mkdir -p "$work" "$out"
engine=target/release/engine
for spec in "gemma-2-9b gemma2-9b 1536" "llama-3.1-8b llama3.1-8b 1280"; do
  set -- $spec
  preset=$1 recipe=$2 seq=$3
  m="$work/$preset"
  [ -f "$m/config.json" ] || "$engine" init-model --preset "$preset" --out "$m" --tokenizer assets/tiny/tokenizer.json
  python3 - "$work/train_$seq.csv" "$steps" "$seq" <<'PY'
import csv, json, random, sys
random.seed(0)
path, n, seq = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
words = "the model answer question explain reason because however example data result value".split()
with open(path, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["id", "model_a", "model_b", "prompt", "response_a", "response_b", "winner_model_a", "winner_model_b", "winner_tie"])
    for i in range(n):
        t = lambda k: " ".join(random.choice(words) for _ in range(k))
        # long enough to be cut to `seq` tokens by the turns format
        w.writerow([i, "a", "b", json.dumps([t(seq // 4)]), json.dumps([t(seq)]), json.dumps([t(seq)]), 1, 0, 0])
PY
  "$engine" train --device cuda --quant nf4 --recipe "$recipe" --model "$m" --data "$work/train_$seq.csv" \
    --out "$work/$preset-adapter" --batch-size 1 --epochs 1 --gradient-checkpointing on --no-shuffle \
    --checkpoint-every 0 --log-file "$work/$preset-train.jsonl" --quiet 2> "$work/$preset-train.log" \
    || { cat "$work/$preset-train.log"; continue; }
  python3 - "$work/$preset-train.jsonl" "$out/full_train.jsonl" "$preset" "$m" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
steady = rows[1:] or rows  # the first step pays for module loading
ms = 1000 * sum(r["seconds"] for r in steady) / len(steady)
tok = sum(r["tokens"] for r in steady) / len(steady)
line = {"model": sys.argv[3], "impl": "engine_nf4", "ms_per_step": ms, "tokens_per_step": tok,
        "tokens_per_s": tok / (ms / 1000), "peak_gib": max(r.get("peak_gpu_bytes", 0) for r in rows) / 2**30}
print(line)
open(sys.argv[2], "a").write(json.dumps(line) + "\n")
PY
  PYTHONUNBUFFERED=1 python3 - "$m" "$seq" "$steps" "$recipe" "$out/full_train.jsonl" "$preset" <<'PY'
import json, sys, time
import torch
from transformers import AutoModelForSequenceClassification, BitsAndBytesConfig
from peft import LoraConfig, get_peft_model
m, seq, steps, recipe, out, preset = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5], sys.argv[6]
cfg = json.load(open(f"{m}/config.json"))
try:
    import bitsandbytes  # noqa: F401
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
                           llm_int8_skip_modules=["score"])
    kind = "transformers_peft_bnb_nf4"
except Exception:
    q, kind = None, "transformers_peft_bf16_base"
model = AutoModelForSequenceClassification.from_pretrained(m, num_labels=3, dtype=torch.bfloat16, attn_implementation="eager",
                                                           device_map={"": 0}, quantization_config=q)
model.config.pad_token_id = 0
model.gradient_checkpointing_enable()
model.enable_input_require_grads()
targets = ["q_proj", "k_proj", "v_proj", "o_proj"] + (["gate_proj", "up_proj", "down_proj"] if recipe == "gemma2-9b" else [])
alpha = 64 if recipe == "gemma2-9b" else 32
layers = list(range(2, cfg["num_hidden_layers"]))
model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=32, lora_alpha=alpha, lora_dropout=0.0,
                                         target_modules=targets, layers_to_transform=layers))
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
x = torch.randint(4, 1000, (1, seq), device="cuda")
y = torch.tensor([0], device="cuda")
params = sum(p.numel() for p in model.parameters())
torch.cuda.reset_peak_memory_stats()
times = []
for i in range(steps):
    torch.cuda.synchronize(); t = time.time()
    loss = torch.nn.functional.cross_entropy(model(input_ids=x).logits.float(), y)
    loss.backward(); opt.step(); opt.zero_grad()
    torch.cuda.synchronize(); times.append(time.time() - t)
steady = times[1:] or times
ms = 1000 * sum(steady) / len(steady)
line = {"model": preset, "impl": kind, "ms_per_step": ms, "tokens_per_step": seq, "tokens_per_s": seq / (ms / 1000),
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30, "params": params}
print(line)
open(out, "a").write(json.dumps(line) + "\n")
PY
done
