#!/bin/sh
# Build the host emulator of kernels/attention.cu (see README.md here) into target/attention-emu.
set -e
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
OUT=${EMU_OUT:-$ROOT/target/attention-emu}
mkdir -p "$OUT"
python3 "$HERE/gen.py"
INC=$(ls -d "$ROOT"/.toolchain/lib/python3*/site-packages/nvidia/cu13/include | head -1)
g++ -std=c++17 -O2 -g -fno-strict-aliasing -I"$INC" -I"$ROOT/kernels" -I"$HERE" -I"$OUT" \
    "$HERE/main.cpp" "$HERE/emu.cpp" -o "$OUT/emu"
echo "built $OUT/emu"
