"""Short training runs of the quickstart config for the loop tests: tiny, no pretraining, no trackers."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Iterator, Sequence

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "configs" / "quickstart.yaml"
VENV_BIN = Path(sys.executable).parent

SHORT_RUN = [
    "model.checkpoint=null", "model.depth=4", "model.embed_dim=64", "model.num_heads=2",
    "moe.num_experts=4", "train.batch_size=16", "eval.max_examples=160",
    "eval.batch_size=80", "logging.progress=false",
]


def launch_command(processes: int) -> list[str]:
    """``accelerate launch`` for P CPU processes (gloo DDP), with the flags accelerate 1.15/1.16 need (see
    docs/training.md, "Several processes")."""
    flags = ["--multi_gpu", "--num_processes", str(processes)] if processes > 1 else ["--num_processes", "1"]
    return [str(VENV_BIN / "accelerate"), "launch", "--num_machines", "1", "--mixed_precision", "no",
            "--dynamo_backend", "no", *flags, str(REPO / "launch" / "multitask.py"), "--config", str(QUICKSTART)]


def short_run_overrides(output_dir: Path, steps: int, extra: Sequence[str] = ()) -> list[str]:
    """``SHORT_RUN`` for ``steps`` steps; its warm-up of 2 steps shrinks to fit a shorter run (it must end first)."""
    return SHORT_RUN + [f"train.output_dir={output_dir}", f"train.steps={steps}",
                        f"train.warmup_steps={min(2, steps - 1)}", *extra]


def launch_run(output_dir: Path, processes: int, steps: int, extra: Sequence[str] = ()) -> str:
    """A short quickstart run under ``accelerate launch``; asserts it ended cleanly, returns its stdout."""
    return launch_run_output(output_dir, processes, steps, extra).stdout


def launch_run_output(output_dir: Path, processes: int, steps: int, extra: Sequence[str] = ()
                      ) -> subprocess.CompletedProcess:
    """:func:`launch_run`, returning its stdout and stderr."""
    command = [*launch_command(processes), *short_run_overrides(output_dir, steps, extra)]
    result = subprocess.run(command, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "terminate called" not in result.stderr  # no abort at interpreter exit
    assert f"{processes} process(es)" in result.stdout
    return result


def read_losses(output_dir: Path) -> list[dict]:
    """The logged records without their clocks (which no two runs share)."""
    with open(Path(output_dir) / "train_log.jsonl") as handle:
        return [{k: v for k, v in json.loads(line).items() if k not in ("elapsed_s", "cpu_s")} for line in handle]


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONUNBUFFERED="1",
               OMP_NUM_THREADS="1", PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    env.pop("PYTEST_CURRENT_TEST", None)
    return env


def write_untrained_run(output_dir: Path, tasks: Sequence[str] = ("digits", "digits_parity"),
                        extra: Sequence[str] = ()) -> Path:
    """A run folder as training writes it (config.json, model.safetensors, card), without training: the short run's
    model with distinct experts and gates (upcycled experts are copies, so routing would change nothing)."""
    import torch
    from tiny_models import distinct_experts

    from moebsr.config import load_config
    from moebsr.training.build import model_from_config
    from moebsr.training.export import export_run
    from moebsr.training.run_data import RunData

    config = load_config(QUICKSTART, short_run_overrides(output_dir, 1, [f"tasks=[{','.join(tasks)}]", *extra]))
    data = RunData.from_config(config, check_data=False)
    torch.manual_seed(0)
    model = distinct_experts(model_from_config(config, data.heads()))
    export_run(output_dir, model, config, data.task_outputs(), {}, class_names=data.class_names())
    return output_dir


@contextlib.contextmanager
def isolated_caches(root: Path) -> Iterator[Path]:
    """moebsr's packaged-data cache and the Hugging Face caches under ``root``, the hub offline; all restored after."""
    import datasets
    saved = {k: os.environ.get(k) for k in ("MOEBSR_CACHE", "HF_HOME", "HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")}
    saved_cache = datasets.config.HF_DATASETS_CACHE
    os.environ.update(MOEBSR_CACHE=str(root / "moebsr"), HF_HOME=str(root / "hf"), HF_DATASETS_OFFLINE="1",
                      HF_HUB_OFFLINE="1")
    datasets.config.HF_DATASETS_CACHE = root / "hf" / "datasets"
    try:
        yield root
    finally:
        datasets.config.HF_DATASETS_CACHE = saved_cache
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
