#!/usr/bin/env bash
# Regenerates constraints.txt, the exact versions scripts/setup.sh installs: a throwaway venv
# gets the newest releases of hyla's dependencies (HYLA_UNPINNED=1), and its package list,
# less hyla itself and torch (setup.sh pins torch on its own, per build), becomes the file.
# Run the README's test command in a fresh clone before committing the new file.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=$(mktemp -d)
trap 'rm -rf "$venv"' EXIT
HYLA_UNPINNED=1 HYLA_VENV="$venv" bash scripts/setup.sh
{
  echo "# Written by scripts/lock.sh on $(date -u +%F) with $("$venv/bin/python" -V)."
  echo "# scripts/setup.sh installs exactly these (HYLA_UNPINNED=1 installs the newest instead)."
  "$venv/bin/python" -m pip --disable-pip-version-check freeze --exclude-editable \
    | grep -v -i -E '^(torch|nvidia-[a-z0-9-]+)=='
} > constraints.txt
echo "lock: wrote constraints.txt ($(grep -c '==' constraints.txt) packages)"
