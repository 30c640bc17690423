"""What the entry scripts share: one-line errors for bad input, first-use pretraining, a clean exit."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Sequence

from ..config import ConfigError, ModelConfig, load_config
from ..errors import is_user_error
from .interrupt import TrainingInterrupted

REPO_ROOT = Path(__file__).resolve().parents[2]


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def ensure_backbone(model_config: ModelConfig) -> None:
    """Build the local backbone checkpoint with ``model.pretrain_config`` when it is missing (first run)."""
    checkpoint, pretrain = model_config.checkpoint, model_config.pretrain_config
    if checkpoint is None or Path(checkpoint).is_file() or pretrain is None:
        return
    command = [sys.executable, str(REPO_ROOT / "launch" / "multitask.py"), "--config", pretrain]
    if _world_size() > 1:
        raise ConfigError(f"model.checkpoint: {checkpoint!r} does not exist yet; build it once first with: "
                          f"{' '.join(command[1:]).replace(str(REPO_ROOT) + os.sep, '')}")
    print(f"model.checkpoint {checkpoint!r} is missing: pretraining it first with {pretrain}", flush=True)
    subprocess.run(command, check=True)
    if not Path(checkpoint).is_file():
        raise ConfigError(f"model.pretrain_config: {pretrain!r} ran but did not produce {checkpoint!r}; "
                          "its train.output_dir must hold the model.checkpoint file")


def run_training_cli(config_path: str, overrides: Sequence[str]) -> int:
    """Parse, validate, train; bad input exits 2 with one line on stderr; always exits cleanly."""
    exit_code = 0
    try:
        config = load_config(config_path, overrides)
        ensure_backbone(config.model)
        from .loop import train
        train(config)
    except TrainingInterrupted as error:  # a signal: the checkpoint is saved, the message says how to resume
        if int(os.environ.get("RANK", "0")) == 0:  # every process agreed on the step: one line says it
            print(f"stopped: {error}", file=sys.stderr, flush=True)
        exit_code = error.exit_code
    except subprocess.CalledProcessError as error:
        print(f"error: pretraining failed with exit code {error.returncode}", file=sys.stderr, flush=True)
        exit_code = 1
    except Exception as error:
        if not is_user_error(error):
            raise
        print(f"error: {error}", file=sys.stderr, flush=True)
        exit_code = 2
    clean_exit(exit_code)
    return exit_code


def clean_exit(code: int) -> None:
    """Leave without the interpreter-shutdown abort multi-process gloo runs hit ~5-8% of the time:
    synchronise, tear the process group down, flush, and ``os._exit`` (see ENVIRONMENT.md)."""
    try:
        # a run refused before torch was imported has no process group: importing torch here would cost it a second
        dist = sys.modules.get("torch.distributed")
        if dist is not None and dist.is_available() and dist.is_initialized():
            if code == 0:
                dist.barrier()
            dist.destroy_process_group()
    except Exception:  # never turn a finished run into a failed exit
        pass
    sys.stdout.flush()
    sys.stderr.flush()
    if _world_size() > 1 or os.environ.get("MOEBSR_HARD_EXIT") == "1":
        os._exit(code)
