#!/usr/bin/env bash
# Creates (or updates) .venv with moebsr and its stack. Idempotent: a second run takes seconds.
# torch/torchvision are pinned through constraints.txt so pip never resolves a CUDA build on a CPU machine;
# on a CPU-only torch, a start-up hook makes the PyPI torchvision (a CUDA build) importable for timm.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${MOEBSR_VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
stamp="$VENV/.moebsr-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ constraints.txt -nt "$stamp" ]; then
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[dev]"
  touch "$stamp"
fi
site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
cp scripts/cpu_torchvision_fix.py "$site/_moebsr_cpu_torchvision.py"
echo "import _moebsr_cpu_torchvision" > "$site/_moebsr_cpu_torchvision.pth"
"$VENV/bin/python" -c "import timm, accelerate, torch; print(f'moebsr env ok: torch {torch.__version__}, timm {timm.__version__}, accelerate {accelerate.__version__}')"
