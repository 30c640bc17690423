#!/usr/bin/env bash
# Moves the lock (constraints.txt) to the newest releases pyproject.toml allows, and writes it only if the whole
# suite passes on them in a fresh environment: taking a new release is a deliberate, tested step.
#   bash scripts/update_lock.sh                      # newest of everything; torch/torchvision stay as locked
#   bash scripts/update_lock.sh accelerate==1.15.0   # the same, with these pins on top (any pip specifiers)
# Then commit constraints.txt; `bash scripts/setup.sh` brings .venv to it.
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
grep -E '^(torch|torchvision)==' constraints.txt > "$work/pins.txt"  # CPU builds: moved by hand, on purpose
for pin in "$@"; do echo "$pin" >> "$work/pins.txt"; done
MOEBSR_VENV="$work/venv" MOEBSR_CONSTRAINTS="$work/pins.txt" bash scripts/setup.sh
"$work/venv/bin/python" -m pip freeze --all --exclude-editable --disable-pip-version-check \
  | grep -v '^pip==' | sed -E 's/\+[A-Za-z0-9.]+$//' | LC_ALL=C sort -f > "$work/resolved.txt"
set +e  # the suite checks the candidate lock too (tests/test_lock.py reads MOEBSR_LOCK)
MOEBSR_LOCK="$work/resolved.txt" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 \
  "$work/venv/bin/python" -m pytest -q -p no:cacheprovider 2>&1 | tee "$work/suite.log"
status=${PIPESTATUS[0]}
set -e
if [ "$status" -ne 0 ]; then
  echo "update_lock: the suite failed on the new versions (exit $status); constraints.txt is unchanged" >&2
  exit 1
fi
summary=$(grep -E '^[0-9]+ passed' "$work/suite.log" | tail -1)
python_version=$("$work/venv/bin/python" -c 'import platform; print(platform.python_version(), platform.machine())')
{
  echo "# The lock: every package at the version the whole suite last passed with. scripts/setup.sh installs it"
  echo "# (pip install -c constraints.txt -e \".[dev]\"); pyproject.toml keeps open ranges for users. Do not edit:"
  echo "# bash scripts/update_lock.sh [PIN ...] resolves the newest releases, runs the suite on them, rewrites this."
  echo "# It pins torch/torchvision too, so pip never swaps in a CUDA build on a CPU machine (a GPU user installs"
  echo "# their own torch first, then installs against this file without its torch and torchvision lines)."
  echo "# $(date -u +%F), Python $python_version, pins: $(paste -sd' ' "$work/pins.txt"); suite: $summary"
  cat "$work/resolved.txt"
} > constraints.txt
echo "update_lock: constraints.txt now pins $(grep -vc '^#' constraints.txt) packages (suite: $summary)"
