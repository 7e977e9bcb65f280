#!/usr/bin/env bash
# The one GPU check: on a machine with one NVIDIA GPU and the project's venv (made by
# scripts/setup.sh, which installs the CUDA build of torch where it finds a GPU), with no
# network, in under 8 minutes:
#   1. the tests marked gpu: every compiled Triton kernel (chunk ops on batches and packed
#      sequences, attention with offsets and document masks, fused recurrent decoding),
#      forward and backward, fp32 and bf16, against fp64 references;
#   2. benchmarks/kernels.py on the GPU: the Triton chunk ops and attention against torch's
#      SDPA (causal) at T = 2K..64K, forward and forward+backward, bf16 (JSON and a PNG);
#   3. benchmarks/decode.py on the GPU: decoded tokens/s, fused recurrent against chunk, and
#      the op alone against T (the sweep that sets FUSED_MAX_TOKENS["cuda"], a guess so far).
# Everything lands in OUT (the first argument, default benchmarks/results/gpu-check); one
# summary line per part goes to stdout. The exit status is non-zero if any part failed.
#
#     scripts/gpu-check.sh [OUT]
set -uo pipefail
cd "$(dirname "$0")/.."

OUT=${1:-benchmarks/results/gpu-check}
PY=${PYTHON:-.venv/bin/python}
mkdir -p "$OUT"
failed=0

gpu=$("$PY" -c "import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else '')")
if [ -z "$gpu" ]; then
  echo "gpu-check: no CUDA device visible to $PY: nothing checked" >&2
  exit 2
fi
echo "device: $gpu, torch $("$PY" -c 'import torch; print(torch.__version__)')"

# part NAME SECONDS COMMAND...: run COMMAND with a time limit, its output to OUT/NAME.log;
# print one line: the status, the time taken and the last line the command printed.
part() {
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS rc
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  rc=$?
  [ "$rc" -eq 0 ] || failed=1
  local verdict=ok
  [ "$rc" -eq 0 ] || verdict="FAILED (exit $rc$([ "$rc" -eq 124 ] && echo ", over ${limit}s"))"
  printf '%-8s %s in %ds: %s\n' "$name:" "$verdict" $((SECONDS - start)) \
    "$(grep -v '^\s*$' "$OUT/$name.log" | tail -n 1)"
}

part tests 210 "$PY" -m pytest -m gpu -q -p no:cacheprovider --junitxml="$OUT/tests.xml"
part kernels 150 "$PY" benchmarks/kernels.py --device cuda --out "$OUT/kernels-cuda.json"
part decode 60 "$PY" benchmarks/decode.py --device cuda --out "$OUT/decode-cuda.json"
part sweep 45 "$PY" benchmarks/decode.py --device cuda --sweep 1 8 16 32 64 128 \
  --out "$OUT/decode-sweep-cuda.json"
exit $failed
