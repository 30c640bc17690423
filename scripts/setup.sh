#!/usr/bin/env bash
# Creates (or updates) .venv with moebsr and its stack at the locked versions. Idempotent: a second run takes seconds.
# constraints.txt is the lock: every package at the version the whole suite last passed with (scripts/update_lock.sh
# moves it, and only after the suite passes on the new versions). It also pins torch/torchvision, so pip never
# resolves a CUDA build on a CPU machine; on a CPU-only torch, a start-up hook makes the PyPI torchvision (a CUDA
# build) importable for timm.
#   MOEBSR_VENV=DIR          the environment to make (default .venv)
#   MOEBSR_CONSTRAINTS=FILE  install against FILE instead of the lock (scripts/update_lock.sh uses it)
#   MOEBSR_SPEC=SPEC         what to install (default: -e .[dev]; scripts/check_core_install.sh: . alone)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${MOEBSR_VENV:-.venv}
CONSTRAINTS=${MOEBSR_CONSTRAINTS:-constraints.txt}
read -r -a SPEC <<< "${MOEBSR_SPEC:--e .[dev]}"
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
stamp="$VENV/.moebsr-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ "$CONSTRAINTS" -nt "$stamp" ] \
    || [ "$(cat "$stamp")" != "$(realpath "$CONSTRAINTS") ${SPEC[*]}" ]; then
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check -c "$CONSTRAINTS" "${SPEC[@]}"
  echo "$(realpath "$CONSTRAINTS") ${SPEC[*]}" > "$stamp"
fi
site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
cp scripts/cpu_torchvision_fix.py "$site/_moebsr_cpu_torchvision.py"
echo "import _moebsr_cpu_torchvision" > "$site/_moebsr_cpu_torchvision.pth"
"$VENV/bin/python" -c "import timm, accelerate, torch; print(f'moebsr env ok: torch {torch.__version__}, timm {timm.__version__}, accelerate {accelerate.__version__}')"
