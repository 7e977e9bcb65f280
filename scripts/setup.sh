#!/usr/bin/env bash
# Creates .venv in the repository root (or $HYLA_VENV) if it is missing and installs hyla
# into it, with the exact versions of constraints.txt (the ones CI tested; scripts/lock.sh
# writes it). HYLA_UNPINNED=1 installs the newest releases instead.
#
# torch is installed first, on its own, so that pip never swaps in another build later:
# on a machine without an NVIDIA GPU it must be the CPU build (an unpinned or CUDA torch
# drags in several GB of CUDA packages). Set HYLA_TORCH_INDEX_URL to a PyTorch wheel index
# to choose the build yourself.
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH_VERSION=2.13.0
python=${PYTHON:-python3}
venv=${HYLA_VENV:-.venv}
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check)
pinned=(--constraint constraints.txt)
[ "${HYLA_UNPINNED:-0}" = 1 ] && pinned=()

has_gpu() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }

if ! "$venv/bin/python" -c "import torch" >/dev/null 2>&1; then
  index=()
  [ -n "${HYLA_TORCH_INDEX_URL:-}" ] && index=(--index-url "$HYLA_TORCH_INDEX_URL")
  if ! has_gpu; then
    # Ask pip which build it would pick before downloading anything big.
    picked=$("${pip[@]}" install --dry-run --quiet --no-deps --report - "${index[@]}" \
      "torch==$TORCH_VERSION" | "$venv/bin/python" -c \
      'import json,sys; print(json.load(sys.stdin)["install"][0]["metadata"]["version"])')
    if [[ "$picked" != *+cpu ]]; then
      echo "setup: no NVIDIA GPU here, but pip would install torch $picked (a CUDA build)." >&2
      echo "setup: set HYLA_TORCH_INDEX_URL to PyTorch's CPU wheel index and run again." >&2
      exit 1
    fi
  fi
  "${pip[@]}" install --quiet "${index[@]}" "torch==$TORCH_VERSION"
fi
"${pip[@]}" install --quiet "${pinned[@]}" -e ".[dev]"
if ! has_gpu && "$venv/bin/python" -m pip list 2>/dev/null | grep -qi '^nvidia-'; then
  echo "setup: CUDA packages were installed on a machine without a GPU" >&2
  exit 1
fi
