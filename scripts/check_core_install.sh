#!/usr/bin/env bash
# The core install, for real: a fresh virtualenv with `pip install .` (no extras, against the lock), then, from an
# empty folder, import moebsr, build the model and train one step on an image-folder task with the built-in
# `imagefolder` task (shipped inside the wheel), check that no extra's package is installed or was imported, and
# that a feature needing an extra refuses in one line naming it. About 2 minutes (pip fetches the stack).
#   bash scripts/check_core_install.sh
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
MOEBSR_VENV="$work/venv" MOEBSR_SPEC="." bash scripts/setup.sh
cd "$work"
HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 OMP_NUM_THREADS=1 "$work/venv/bin/python" - "$repo" <<'PY'
import importlib.util
import subprocess
import sys
from pathlib import Path

from PIL import Image

repo = Path(sys.argv[1])
extras = ["sklearn", "mlxtend", "animal_shape_mnist", "tensorboard", "matplotlib", "onnx", "onnxruntime", "mkdocs",
          "pytest", "ruff"]
installed = [name for name in extras if importlib.util.find_spec(name) is not None]
assert installed == [], f"the core install brought extras' packages: {installed}"
import moebsr  # noqa: E402

assert repo not in Path(moebsr.__file__).resolve().parents, f"moebsr imported from the checkout: {moebsr.__file__}"
for label, name in enumerate(["cat", "dog"]):
    (Path("pics") / name).mkdir(parents=True)
    for index in range(8):
        Image.new("RGB", (12, 12), (120 * label, 30 * index, 0)).save(Path("pics") / name / f"{index}.png")
overrides = ["tasks=[imagefolder]", "data.task_options.imagefolder.data_dir=pics", "model.checkpoint=null",
             "model.depth=4", "model.embed_dim=64", "model.num_heads=2", "moe.num_experts=4", "train.steps=1",
             "train.warmup_steps=0", "train.batch_size=4", "train.sampler=round_robin", "train.output_dir=run",
             "logging.trackers=[none]", "logging.progress=false"]
config = moebsr.load_config(repo / "configs" / "quickstart.yaml", overrides)
result = moebsr.train(config)
loaded = sorted(name for name, module in sys.modules.items() if module is not None and name.split(".")[0] in extras)
assert result.step == 1 and Path("run/model.safetensors").is_file() and loaded == [], (result.step, loaded)
print(f"core install: moebsr {moebsr.__version__} from {Path(moebsr.__file__).parent}; trained step {result.step} "
      f"on imagefolder; extras imported: {loaded}")
refused = subprocess.run([sys.executable, "-m", "moebsr", "train", "--config", str(repo / "configs" / "quickstart.yaml"),
                          *overrides[:-2], "train.output_dir=run2"], capture_output=True, text=True)
errors = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
assert refused.returncode == 2 and len(errors) == 1 and "moebsr[tensorboard]" in errors[0], refused.stderr[-2000:]
print(f"default tracker without the extra: exit 2, {errors[0]}")
PY
