#!/usr/bin/env bash
# The device check: every GPU path on a real GPU, in one go.
#
#   scripts/device_check.sh build        # here (no GPU needed): build the engine, the GPU test
#                                        # binaries and the CUDA benches into target/device/
#                                        # (stripped, small enough to carry)
#   scripts/device_check.sh run [OUT]    # on the GPU machine (no network; nvcc, torch,
#                                        # transformers there): GPU tests, benches, the torch
#                                        # peers, then one table of ratios (scripts/device_report.py)
#
# `run` stages (each logs to OUT/<stage>.log; a failing stage does not stop the others):
#   tests    — every gpu_* test binary (kernels vs CPU twins, whole models GPU vs CPU)
#   benches  — criterion: cuda_ops, cuda_linear, cuda_attention (CRITERION_HOME=OUT/criterion)
#   torch    — scripts/device_torch.py: cuBLAS/bitsandbytes/SDPA/FlexAttention/eager peers
#   full     — only with FULL=1: random full-size Gemma-2-9B / Llama-3.1-8B inference, engine vs
#              transformers (needs ~40 GB of disk and several minutes)
#   train    — only with FULL=1: full-size QLoRA training steps (seq 1536 / 1280, the recipes,
#              checkpointing on), engine vs transformers + PEFT (scripts/device_full_train.sh)
#   multi    — only with FULL=1: full-size Gemma-2-9B inference sorted vs file order vs --tta on
#              the same rows, the 25,000-row 2×T4 projection from per-batch costs, and a
#              one-rank torchrun-style training job through NCCL (scripts/device_multi.sh)
# Environment: STAGES="tests benches torch" to choose stages; SKIP_FLEX=1 to skip FlexAttention
# (its compile takes ~30 s); TEST_TIMEOUT / BENCH_TIMEOUT / TORCH_TIMEOUT bound each binary.
# With a short lease, run `STAGES=tests` first (the kernels' correctness), then
# `STAGES="benches torch"` while the machine is still warm.
set -uo pipefail
cd "$(dirname "$0")/.."
mode=${1:-build}
dev_dir=target/device

build() {
  set -e
  scripts/install-cuda-toolchain.sh >/dev/null
  # The device is an H200 (sm_90): building only that target keeps the carry small.
  export ENGINE_REQUIRE_CUDA=1 ENGINE_CUDA_ARCHS=${ENGINE_CUDA_ARCHS:-90}
  rm -rf "$dev_dir" && mkdir -p "$dev_dir"
  cargo build --release --bin engine
  cp target/release/engine "$dev_dir/engine"
  local tests benches
  tests=$(cargo test --release --no-run --message-format=json 2>/dev/null \
    | python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable"):
        t = m["target"]
        if t["name"].startswith("gpu_"):
            print(t["name"], m["executable"])
        elif "lib" in t["kind"]:
            print("lib", m["executable"])  # unit tests, incl. every attention kernel variant')
  benches=$(cargo bench --no-run --message-format=json 2>/dev/null \
    | python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"].startswith("cuda_"):
        print(m["target"]["name"], m["executable"])')
  while read -r name exe; do [ -n "$name" ] && cp "$exe" "$dev_dir/test-$name"; done <<<"$tests"
  while read -r name exe; do [ -n "$name" ] && cp "$exe" "$dev_dir/bench-$name"; done <<<"$benches"
  strip "$dev_dir"/*
  cp target/release/build/engine-*/out/*.ptxas.log "$dev_dir/" 2>/dev/null || true
  ls -la "$dev_dir"
  # Compressed for the trip (the device tool carries at most 64 MiB with the working tree and
  # target/fixture-carry). The binaries share most of their bytes (the same fatbins and
  # library code), so a dictionary that spans them all shrinks 34 MB to about 7 MB.
  tar -C target -cf - device | xz -T2 --lzma2=preset=6,dict=256MiB > target/device.tar.xz
  du -sh "$dev_dir" target/device.tar.xz
}

run() {
  # Results: everything goes to a work folder; OUT receives report.md, tests.log and one
  # archive of the rest (the device tool returns few files, two folders deep at most).
  local ret=${1:-${OUT:-/tmp/device-check-out}}
  local out=/tmp/device-check
  rm -rf "$out" && mkdir -p "$out" "$ret"
  # The test binaries carry the absolute paths of the checkout they were built in (fixtures,
  # the engine binary); make that path resolve here.
  if [ "$(pwd -P)" != /work/main ] && [ ! -e /work/main ]; then
    mkdir -p /work && ln -s "$PWD" /work/main
  fi
  local stages=${STAGES:-tests benches torch}
  [ "${FULL:-0}" = 1 ] && stages="$stages full train multi"
  [ -d "$dev_dir" ] || tar -C target -xJf target/device.tar.xz
  # The test binaries find the engine binary and the fixtures where cargo built them.
  mkdir -p target/release && cp "$dev_dir/engine" target/release/engine
  # bitsandbytes for the torch peers, if it was carried (scripts/gen_fixtures.py's trimmed copy).
  [ -d target/fixture-carry ] && export PYTHONPATH="$PWD/target/fixture-carry${PYTHONPATH:+:$PYTHONPATH}"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv | tee "$out/gpu.txt"
  git rev-parse HEAD 2>/dev/null | tee "$out/commit.txt"
  for stage in $stages; do
    echo "=== $stage ($(date +%T))"
    case $stage in
      tests)
        for t in "$dev_dir"/test-*; do
          echo "--- $t"
          timeout "${TEST_TIMEOUT:-150}" "$t" --test-threads=1 --nocapture 2>&1 | tee -a "$out/tests.log" \
            | grep -E "^test |test result|SKIPPED|panicked|max\||out of tolerance|error" | cut -c1-400
        done ;;
      benches)
        for b in "$dev_dir"/bench-*; do
          echo "--- $b"
          CRITERION_HOME="$out/criterion" timeout "${BENCH_TIMEOUT:-150}" "$b" --bench --noplot 2>&1 \
            | tee -a "$out/benches.log" | grep -E "^[a-z_]+/|time:|thrpt:|SKIPPED|panicked"
        done ;;
      torch)
        PYTHONUNBUFFERED=1 timeout "${TORCH_TIMEOUT:-240}" python3 scripts/device_torch.py --out "$out/torch.jsonl" ${SKIP_FLEX:+--skip-flex} \
          > "$out/torch.log" 2>&1 || echo "torch stage failed: see torch.log"; tail -3 "$out/torch.log" ;;
      full)
        scripts/device_full.sh "$out" 2>&1 | tee "$out/full.log" ;;
      train)
        scripts/device_full_train.sh "$out" 2>&1 | tee "$out/full_train.log" ;;
      multi)
        scripts/device_multi.sh "$out" 2>&1 | tee "$out/multi.log" ;;
    esac
  done
  python3 scripts/device_report.py "$out" | tee "$out/report.md"
  cp "$out/report.md" "$out/tests.log" "$ret/" 2>/dev/null
  tar -C "$(dirname "$out")" -czf "$ret/device-check.tgz" "$(basename "$out")"
}

case $mode in
  build) build ;;
  run) shift; run "$@" ;;
  *) echo "usage: $0 build | run [OUT]" >&2; exit 2 ;;
esac
