#!/usr/bin/env bash
# Installs the pinned CUDA 13.0 compiler (and the NVSHMEM 3.3.24 device library) from PyPI
# into <repo>/.toolchain, a git-ignored Python venv. build.rs finds nvcc there by itself.
#
# Why PyPI and why these exact versions: the target GPU machines run driver 580 (CUDA 13.0),
# whose JIT rejects PTX from nvcc 13.1+, so cubins come from nvcc 13.0; nvcc's own PyPI
# dependencies are unpinned (pip would pair nvcc 13.0 with a newer nvvm/crt), so every
# package is pinned. nvidia-cuda-cccl is needed by cooperative_groups.h.
#
# Idempotent: when the venv already holds exactly these versions nothing is downloaded.
# Environment:
#   FLASHMOE_TOOLCHAIN_DIR  where to put the venv (default: <repo>/.toolchain; build.rs looks
#                           only there, so elsewhere also set FLASHMOE_NVCC to the printed path)
#   PYTHON                  the Python 3 interpreter to build the venv with (default: python3)
# Prints the path of nvcc on its last line (`nvcc: <path>`).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${FLASHMOE_TOOLCHAIN_DIR:-$repo/.toolchain}"
python="${PYTHON:-python3}"

# The pins (build.rs does not depend on them: it finds nvcc wherever it is).
pins=(
  "nvidia-cuda-nvcc==13.0.88"
  "nvidia-cuda-crt==13.0.88"
  "nvidia-nvvm==13.0.88"
  "nvidia-cuda-runtime==13.0.96"
  "nvidia-cuda-cccl==13.0.85"
  "nvidia-nvshmem-cu13==3.3.24"
)

# Prints the pins that are missing or at another version in the venv (nothing if all match).
missing_pins() {
  local py="$venv/bin/python"
  [[ -x "$py" ]] || { printf '%s\n' "${pins[@]}"; return; }
  "$py" - "${pins[@]}" <<'PY'
import sys
from importlib import metadata
for pin in sys.argv[1:]:
    name, want = pin.split("==")
    try:
        have = metadata.version(name)
    except metadata.PackageNotFoundError:
        have = None
    if have != want:
        print(pin)
PY
}

todo="$(missing_pins)"
if [[ -z "$todo" ]]; then
  echo "install-cuda-toolchain: pinned packages already present in $venv"
else
  if [[ ! -x "$venv/bin/python" ]]; then
    echo "install-cuda-toolchain: creating venv $venv"
    "$python" -m venv "$venv"
  fi
  echo "install-cuda-toolchain: installing into $venv:"
  printf '  %s\n' $todo
  # All pins at once, so pip resolves them together and cannot pull a newer nvvm/crt.
  "$venv/bin/python" -m pip install --disable-pip-version-check --no-input "${pins[@]}"
  todo="$(missing_pins)"
  if [[ -n "$todo" ]]; then
    echo "install-cuda-toolchain: error: still not at the pinned versions:" >&2
    printf '  %s\n' $todo >&2
    exit 1
  fi
  # A build made before this install found no nvcc and does not watch .toolchain (cargo
  # would rerun build.rs on every build if it watched a missing path): make it rerun once.
  if [[ -f "$repo/build.rs" ]]; then
    touch "$repo/build.rs"
  fi
fi

site="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
nvcc="$site/nvidia/cu13/bin/nvcc"
if [[ ! -x "$nvcc" ]]; then
  echo "install-cuda-toolchain: error: nvcc not found at $nvcc after installation" >&2
  exit 1
fi
"$nvcc" --version | tail -n 2
if [[ -f "$site/nvidia/nvshmem/lib/libnvshmem_device.a" ]]; then
  echo "nvshmem: $site/nvidia/nvshmem"
fi
echo "nvcc: $nvcc"
