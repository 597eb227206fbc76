#!/usr/bin/env bash
# CPU inference throughput, engine vs transformers (eager, f32), same model, rows and threads.
#   scripts/cpu_side_by_side.sh [THREADS] [PYTHON]
# Models: the tiny and small (~100M) presets of both architectures, random-initialised by
# `engine init-model`; rows: the bundled sample CSV repeated 3× (180 rows) in the `concat`
# format (the one both sides tokenise identically), max length 512.
set -euo pipefail
cd "$(dirname "$0")/.."
threads=${1:-2}
py=${2:-python3}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cargo build --release --quiet
engine=target/release/engine
"$py" - "$work/rows.csv" <<'PY'
import csv, sys
rows = list(csv.DictReader(open("assets/demo/train.csv", newline="", encoding="utf-8")))
with open(sys.argv[1], "w", newline="", encoding="utf-8") as f:
    w = csv.DictWriter(f, fieldnames=rows[0].keys())
    w.writeheader()
    for k in range(3):
        for r in rows:
            w.writerow(dict(r, id=f"{r['id']}{k}"))
PY
printf '%-8s %-7s %12s %14s %14s\n' preset arch engine tf_bs1 tf_bs8
for preset in tiny small; do
  for arch in gemma2 llama; do
    m="$work/$preset-$arch"
    "$engine" init-model --preset "$preset" --arch "$arch" --out "$m" 2>/dev/null
    e=$(RAYON_NUM_THREADS=$threads "$engine" --threads "$threads" infer --model "$m" --data "$work/rows.csv" \
        --out "$work/sub.csv" --format concat --max-length 512 --quiet 2>&1 | sed -n 's/.* \([0-9]*\) tokens\/s.*/\1/p')
    t=$("$py" scripts/cpu_throughput.py --model "$m" --data "$work/rows.csv" --max-length 512 --threads "$threads" 2>/dev/null)
    b1=$(echo "$t" | sed -n 's/.*bs1: .*s, \([0-9]*\) tokens\/s/\1/p')
    b8=$(echo "$t" | sed -n 's/.*bs8: .*s, \([0-9]*\) tokens\/s/\1/p')
    printf '%-8s %-7s %12s %14s %14s   (tokens/s)\n' "$preset" "$arch" "$e" "$b1" "$b8"
  done
done
