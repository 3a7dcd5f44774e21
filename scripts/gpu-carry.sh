#!/usr/bin/env bash
# Prepares one GPU session: builds, on this (GPU-less) machine, everything the GPU machine
# needs into gpu-carry/ (git-ignored, carried to the device), with run.sh, which runs every
# GPU test and benchmark in one call and writes its logs under $OUT (at most 8 files).
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

cat >"$carry/run.sh" <<'EOF'
#!/usr/bin/env bash
# Runs on the GPU machine from the repository root, in one of two phases so that each fits
# one device call (10 minutes):
#   bash gpu-carry/run.sh tests   every GPU test (FLASHMOE_EXPECT_GPU=1: a skip is a failure)
#   bash gpu-carry/run.sh bench   the layer bench on every preset and emulated world, f32,
#                                 a model bench and a 1-rank NVSHMEM world
# Logs: $OUT/{summary,gpu,tests,bench}.txt.
set -u
phase="${1:-tests}"
OUT="${OUT:-/tmp/flashmoe-out}"
mkdir -p "$OUT"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export FLASHMOE_EXPECT_GPU=1 RUST_BACKTRACE=1
# cuBLAS (roofline peak) and NVSHMEM host library from the image's Python packages.
site="$(python3 -c 'import site; print(site.getsitepackages()[0])' 2>/dev/null || true)"
for d in "$site"/nvidia/*/lib; do LD_LIBRARY_PATH="$d:${LD_LIBRARY_PATH:-}"; done
export LD_LIBRARY_PATH
nv="$(ls "$site"/nvidia/nvshmem/lib/libnvshmem_host.so.3 2>/dev/null | head -n 1)"
[ -n "$nv" ] && export FLASHMOE_NVSHMEM_LIB="$nv"
export NVSHMEM_BOOTSTRAP_UID_SOCK_IFNAME=lo NVSHMEM_REMOTE_TRANSPORT=none NVSHMEM_DISABLE_NCCL=1

{ nvidia-smi; "$here/flashmoe-bench" probe; cat "$here/ptxas-report.txt"; } >"$OUT/gpu.txt" 2>&1
: >"$OUT/summary.txt"
if [ "$phase" = tests ]; then
  # The cheap, telling ones first: the ABI, then the layer tests (provenance first).
  # Seconds per binary: 540 in all, under the 600 s of one device call.
  for spec in gpu_abi:30 gpu_layer:240 gpu_model:120 gpu_nvshmem:90 gpu_roofline:60; do
    t="${spec%%:*}"
    [ -x "$here/tests/$t" ] || continue
    echo "===== $t" >>"$OUT/tests.txt"
    timeout "${spec##*:}" "$here/tests/$t" --test-threads=1 >>"$OUT/tests.txt" 2>&1
    echo "test $t: exit $?" >>"$OUT/summary.txt"
  done
  cat "$OUT/summary.txt"
  exit 0
fi
bench() {
  # Leave the call in time: no new bench after 520 s.
  if [ "$SECONDS" -gt 520 ]; then
    echo "bench $*: not run (time)" >>"$OUT/summary.txt"
    return
  fi
  echo "===== flashmoe-bench $*" >>"$OUT/bench.txt"
  timeout 60 "$here/flashmoe-bench" "$@" >>"$OUT/bench.txt" 2>&1
  echo "bench $*: exit $?" >>"$OUT/summary.txt"
}
for p in tiny flashmoe-paper mixtral-8x7b qwen3-30b-a3b olmoe-1b-7b deepseek-v3; do
  bench layer --backend gpu --preset "$p" --iters 50 --warmup 10
done
for w in 2 4 8; do
  bench layer --backend gpu --preset flashmoe-paper --world "emulated:$w" --iters 50 --warmup 10
done
bench layer --backend gpu --preset flashmoe-paper --dtype f32 --iters 20
bench model --backend gpu --preset qwen3-30b-a3b --layers 4 --tokens 1024 --iters 20
bench layer --nproc 1 --backend gpu --preset tiny
cat "$OUT/summary.txt"
EOF
chmod +x "$carry/run.sh"
du -sh "$carry"
echo "gpu-carry ready: on the device, with carry [\"gpu-carry\"], run 'bash gpu-carry/run.sh tests', then 'bash gpu-carry/run.sh bench'"
