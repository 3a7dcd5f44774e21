#!/usr/bin/env bash
# Prepares one GPU session: builds, on this (GPU-less) machine, everything the GPU machine
# needs into gpu-carry/ (git-ignored, carried to the device), with run.sh (a copy of
# scripts/gpu-run.sh), which runs the stage checks, every GPU test, compute-sanitizer and a
# bench of every preset in one call, each step within its budget (7 minutes in all), and
# writes its logs under $OUT (at most 8 files; summary.txt first).
#
#   scripts/gpu-carry.sh            # here
#   (device) bash gpu-carry/run.sh  # there, with `gpu-carry` in the carry list
#
# The GPU machine has no cargo: the bench and the test executables are built here (glibc
# >= 2.34 is all they need there) with the kernels embedded (pinned nvcc, sm_90a).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
carry="$repo/gpu-carry"

nvcc="$(scripts/install-cuda-toolchain.sh | sed -n 's/^nvcc: //p' | tail -n 1)"
export FLASHMOE_NVCC="$nvcc" FLASHMOE_REQUIRE_KERNELS=1

cargo build --release --bin flashmoe-bench
# The GPU test executables (test profile), found from cargo's JSON messages.
mapfile -t tests < <(
  cargo test --workspace --no-run --message-format=json \
    --test gpu_abi --test gpu_layer --test gpu_roofline --test gpu_nvshmem --test gpu_model 2>/dev/null |
    python3 -c '
import json, sys
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["test"]:
        print(m["target"]["name"] + " " + m["executable"])
')

rm -rf "$carry"
mkdir -p "$carry/tests"
cp target/release/flashmoe-bench "$carry/"
for entry in "${tests[@]}"; do
  name="${entry%% *}"
  cp "${entry#* }" "$carry/tests/$name"
done
# Debug info is not needed there and the carry is limited to 64 MiB.
strip "$carry/flashmoe-bench" "$carry"/tests/*
cp target/flashmoe-ptxas-report.txt "$carry/ptxas-report.txt"

# The device-side script: every step with its own budget, 7 minutes in all.
cp scripts/gpu-run.sh "$carry/run.sh"
chmod +x "$carry/run.sh"
sum="$(sed -n '/^BUDGETS="/,/^"/p' scripts/gpu-run.sh | awk 'NF == 2 { s += $2 } END { print s }')"
if [ "$sum" -gt 420 ]; then
  echo "error: the step budgets of scripts/gpu-run.sh add up to ${sum}s, over 7 minutes" >&2
  exit 1
fi
du -sh "$carry"
echo "gpu-carry ready (step budgets: ${sum}s): on the device, with carry [\"gpu-carry\"], run 'bash gpu-carry/run.sh' and read \$OUT/summary.txt first"
