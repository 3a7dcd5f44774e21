#!/usr/bin/env bash
# Compiles every kernel the way the build does and checks what can be checked without a GPU:
# - flashmoe.cu (P2P): one cubin, 3 entry points, ptxas must report 0 spill bytes everywhere;
# - flashmoe_nvshmem.cu: -rdc object + device link against libnvshmem_device; the cubin may
#   only leave the driver-provided symbols undefined (vprintf, .nv.reservedSmem.offset0),
#   and no flashmoe function may spill (NVSHMEM's own nvshmemi_quiet is reported, allowed).
# Usage: kernel/check.sh [NVCC] [NVSHMEM_ROOT]   (defaults: the pinned PyPI toolchain)
set -euo pipefail
NV=/tmp/pipwarm/venv/lib/python3.11/site-packages/nvidia
NVCC=${1:-$NV/cu13/bin/nvcc}
SH=${2:-$NV/nvshmem}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
ARCH=-gencode=arch=compute_90a,code=sm_90a

"$NVCC" $ARCH -cubin -O3 -std=c++17 -I"$ROOT/kernel/include" -Xptxas -v \
    "$ROOT/kernel/flashmoe.cu" -o "$OUT/flashmoe.cubin" 2>"$OUT/p2p.log"
python3 "$ROOT/scripts/ptxas_spills.py" --section flashmoe "$OUT/p2p.log"
grep -E "Used [0-9]+ registers" "$OUT/p2p.log" | sort | uniq -c
echo "ok: flashmoe.cu, no spills"
# No local memory (spills, or TileArgs reloaded from a caller's frame) in an mma K loop.
# Needs a cuobjdump (the pinned PyPI toolchain has none): CUOBJDUMP, or on PATH.
CUOBJDUMP=${CUOBJDUMP:-$(command -v cuobjdump || true)}
if [ -n "$CUOBJDUMP" ]; then
    "$CUOBJDUMP" -sass "$OUT/flashmoe.cubin" | python3 "$ROOT/scripts/sass_loop_locals.py" \
        flashmoe_layer_bf16 flashmoe_layer_f16
else
    echo "skip: no cuobjdump (set CUOBJDUMP) for the mma-loop local-memory check"
fi

if [ -d "$SH/include" ]; then
    "$NVCC" -rdc=true $ARCH -O3 -std=c++17 -I"$ROOT/kernel/include" -I"$SH/include" -Xptxas -v \
        -c "$ROOT/kernel/flashmoe_nvshmem.cu" -o "$OUT/nvshmem.o" 2>"$OUT/nvshmem.log"
    "$NVCC" $ARCH -dlink -cubin "$OUT/nvshmem.o" -L"$SH/lib" -lnvshmem_device \
        -o "$OUT/flashmoe_nvshmem.cubin"
    # Spills of the NVSHMEM build, per function (scripts/ptxas_spills.py has the rules). Here
    # every phase and tile is inlined into one 128-register entry point (common.cuh,
    # FM_PHASE: as -rdc calls, the tiles spill 36 to 224 bytes of callee-saved registers
    # each); the entry points spill nothing, as the P2P build's functions. NVSHMEM's own
    # nvshmemi_quiet instantiations spill 8 bytes: allowed.
    python3 "$ROOT/scripts/ptxas_spills.py" --section flashmoe_nvshmem "$OUT/nvshmem.log"
    grep -E "Used [0-9]+ registers" "$OUT/nvshmem.log" | sort | uniq -c
    if [ -n "$CUOBJDUMP" ]; then
        "$NVCC" $ARCH -dlink -cubin "$OUT/nvshmem.o" -L"$SH/lib" -lnvshmem_device -o "$OUT/sass.cubin"
        "$CUOBJDUMP" -sass "$OUT/sass.cubin" | python3 "$ROOT/scripts/sass_loop_locals.py" \
            flashmoe_layer_nvshmem_bf16 flashmoe_layer_nvshmem_f16
    else
        echo "skip: no cuobjdump (set CUOBJDUMP) for the mma-loop local-memory check"
    fi
    python3 - "$OUT/flashmoe_nvshmem.cubin" <<'PY'
import struct, sys
d = open(sys.argv[1], "rb").read()
shoff = struct.unpack_from("<Q", d, 0x28)[0]
shentsize, shnum, _ = struct.unpack_from("<HHH", d, 0x3A)
secs = [struct.unpack_from("<IIQQQQIIQQ", d, shoff + i * shentsize) for i in range(shnum)]
allowed = {"vprintf", ".nv.reservedSmem.offset0"}
bad, entries = [], []
for s in secs:
    if s[1] != 2:
        continue
    strtab = secs[s[6]]
    for i in range(s[5] // s[9]):
        name, info, other, shndx, val, size = struct.unpack_from("<IBBHQQ", d, s[4] + i * s[9])
        at = strtab[4] + name
        nm = d[at:d.index(b"\0", at)].decode()
        if nm and shndx == 0 and nm not in allowed:
            bad.append(nm)
        if nm.startswith("flashmoe_layer_nvshmem_"):
            entries.append(nm)
if bad:
    sys.exit(f"FAIL: undefined symbols in the NVSHMEM cubin: {bad}")
print("ok: flashmoe_nvshmem.cubin links, entry points:", sorted(entries))
PY
else
    echo "skip: no NVSHMEM headers at $SH"
fi
