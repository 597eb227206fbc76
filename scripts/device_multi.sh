#!/usr/bin/env bash
# Issue 6's GPU measurements on the GPU machine (the `multi` stage of scripts/device_check.sh):
#   scripts/device_multi.sh OUT [ROWS]
#
# 1. Sorting: ROWS rows (default 512) whose token lengths follow the estimated arena
#    distribution of scripts/project_t4.py (lognormal, median 460 tokens, σ 0.83, cut at 1536:
#    an estimate from published word counts, not the real data, which that machine does not
#    have) are scored by a random full-size Gemma-2-9B with NF4 weights three times: longest
#    first (the default), in file order (--no-sort), and with --tta. Each run appends a JSON line with per-batch
#    timings to OUT/multi.jsonl (`engine infer --log-file`).
# 2. The projection: scripts/project_t4.py turns the sorted run's per-batch timings into
#    per-token costs by length bucket and projects 25,000 rows on 2×T4 (OUT/projection.json).
# 3. Launched training through NCCL: a tiny-model `engine train` as rank 0 of a one-rank job
#    (torchrun's environment variables: the NCCL bootstrap and the rendezvous run end to end)
#    must give the same adapter as the plain `--device cuda` run.
# The NCCL collectives themselves are tested by the gpu_nccl test binary of the `tests` stage.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: device_multi.sh OUT [ROWS]}
rows=${2:-${ROWS:-512}}
work=${WORK:-/tmp/engine-full}
mkdir -p "$work" "$out"
engine=target/release/engine

# --- 1. sorted vs file order vs TTA, on the same rows --------------------------------------
python3 scripts/project_t4.py make-rows --rows "$rows" --tokenizer assets/tiny/tokenizer.json \
  --out "$work/multi_rows.csv" || exit 1
m="$work/gemma-2-9b"
[ -f "$m/config.json" ] || "$engine" init-model --preset gemma-2-9b --out "$m" --tokenizer assets/tiny/tokenizer.json
for variant in sorted unsorted tta; do
  case $variant in
    sorted) extra=() ;;
    unsorted) extra=(--no-sort) ;;
    tta) extra=(--tta) ;;
  esac
  echo "--- gemma-2-9b nf4, $variant"
  "$engine" infer --model "$m" --data "$work/multi_rows.csv" --out "$work/multi_$variant.csv" \
    --gpus 0 --quant nf4 --max-length 1536 --quiet "${extra[@]}" \
    --log-file "$out/multi.jsonl" 2>&1 | tail -3
done
python3 - "$out/multi.jsonl" <<'PY'
import json, sys
runs = [json.loads(l) for l in open(sys.argv[1])]
base = next((r for r in runs if r["sort"] and not r["tta"]), None)
for r in runs:
    kind = "tta" if r["tta"] else ("sorted" if r["sort"] else "file order")
    ratio = f"  ({base['seconds'] / r['seconds']:.2f}x the sorted run's speed)" if base else ""
    print(f"{kind:>10}: {r['rows']} rows, {r['tokens']} tokens in {r['seconds']:.2f}s: "
          f"{r['rows_per_s']:.1f} rows/s, {r['tokens_per_s']:.0f} tokens/s, "
          f"peak {(r['peak_gpu_bytes'] or 0) / 2**30:.2f} GiB{ratio}")
PY

# --- 2. projection for 25,000 rows on 2×T4 ---------------------------------------------------
python3 scripts/project_t4.py project --metrics "$out/multi.jsonl" --torch "$out/torch.jsonl" \
  --out "$out/projection.json"

# --- 3. one-rank NCCL job through the launcher's environment --------------------------------
demo="$work/demo"
"$engine" demo --out-dir "$demo" > /dev/null 2>&1 || { echo "engine demo failed"; exit 1; }
common=(train --model "$demo/model" --data "$demo/train.csv" --epochs 1 --batch-size 4 --grad-accum 2
        --no-shuffle --checkpoint-every 0 --quiet --max-length 256)
"$engine" "${common[@]}" --device cuda --out "$work/dp_plain" 2> "$work/dp_plain.log" \
  || { echo "plain GPU training failed:"; tail -5 "$work/dp_plain.log"; }
RANK=0 WORLD_SIZE=1 LOCAL_RANK=0 MASTER_ADDR=127.0.0.1 MASTER_PORT=29531 \
  "$engine" "${common[@]}" --device cuda --out "$work/dp_nccl" 2> "$work/dp_nccl.log" \
  || { echo "launched (NCCL) training failed:"; tail -5 "$work/dp_nccl.log"; }
python3 - "$work/dp_plain" "$work/dp_nccl" "$out/multi_dp.json" <<'PY'
import json, sys
from safetensors.numpy import load_file
a_dir, b_dir, out = sys.argv[1:4]
try:
    a = load_file(f"{a_dir}/adapter_model.safetensors")
    b = load_file(f"{b_dir}/adapter_model.safetensors")
except Exception as e:
    print(f"launched training: no adapter to compare ({e})")
    sys.exit(0)
worst = max(float(abs(a[k].astype("float64") - b[k].astype("float64")).max()) for k in a)
same_keys = sorted(a) == sorted(b)
line = {"check": "launched_one_rank_vs_plain", "tensors": len(a), "same_keys": same_keys, "max_abs_diff": worst}
print(f"launched one-rank NCCL job vs plain GPU run: {len(a)} tensors, max |Δ| {worst:.3g}"
      f" ({'identical' if worst == 0 and same_keys else 'DIFFERENT'})")
json.dump(line, open(out, "w"))
PY
