"""Atomic, rotated training checkpoints on top of ``accelerator.save_state``.

A checkpoint is written to a hidden temporary folder and renamed into place only once complete (rename is
atomic on one file system), so a run killed mid-save leaves the previous checkpoint untouched and loadable;
``training_state.json`` is written last and its presence marks a checkpoint as complete. Every file is flushed
to disk before the rename and the rename before older checkpoints are rotated out: a machine that goes down
right after a save (a preempted VM) could otherwise come back with the new checkpoint's files empty and the old
ones deleted.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Optional

from accelerate import Accelerator

CHECKPOINT_PATTERN = re.compile(r"^step_(\d+)$")
STATE_FILE = "training_state.json"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the folder and why."""


def checkpoint_dir(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoint_dir(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := CHECKPOINT_PATTERN.match(p.name))
             and (p / STATE_FILE).is_file()]
    return [path for _, path in sorted(found)]


def resolve_resume(resume: str, output_dir: str | os.PathLike) -> Optional[Path]:
    """``latest`` -> newest complete checkpoint of this run (None if there is none yet); else the folder."""
    if resume == "latest":
        checkpoints = list_checkpoints(output_dir)
        return checkpoints[-1] if checkpoints else None
    path = Path(resume)
    if not path.is_dir():
        raise CheckpointError(f"train.resume: no checkpoint folder at {resume!r}; accepted: 'latest' or a folder "
                              f"such as {checkpoint_dir(output_dir) / 'step_00000100'}")
    if not (path / STATE_FILE).is_file():
        raise CheckpointError(f"train.resume: {resume!r} is not a complete checkpoint (no {STATE_FILE})")
    return path


# what the learning-rate schedule is laid over; the scheduler and optimizer state restored from a checkpoint carry it,
# so a resumed run with other values would jump to another point of the schedule or silently keep the old ones
SCHEDULE_KEYS = ("steps", "warmup_steps", "lr", "min_lr", "layer_decay")


def schedule_of(train: Any) -> dict[str, Any]:
    return {key: getattr(train, key) for key in SCHEDULE_KEYS}


def check_same_schedule(state: dict[str, Any], train: Any) -> None:
    """Refuse to resume a checkpoint with another schedule (one line naming each change and the checkpoint's value)."""
    saved = state.get("schedule")
    if saved is None:  # written before schedules were recorded: nothing to compare
        return
    changed = [f"train.{key}={getattr(train, key)!r} (the checkpoint's run: {saved[key]!r})"
               for key in SCHEDULE_KEYS if key in saved and saved[key] != getattr(train, key)]
    if changed:
        raise CheckpointError(f"train.resume: {', '.join(changed)}; the learning-rate schedule is laid over these "
                              "and restored with the checkpoint; accepted: the checkpoint's values to continue it, or "
                              "a new train.output_dir for a new run")


def read_training_state(path: Path) -> dict[str, Any]:
    try:
        return json.loads((path / STATE_FILE).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise CheckpointError(f"checkpoint {path}: unreadable {STATE_FILE}: {error}") from None


def save_checkpoint(accelerator: Accelerator, output_dir: str | os.PathLike, step: int,
                    training_state: dict[str, Any], keep: int) -> Path:
    """Save model/optimizer/scheduler/RNG state and ``training_state`` as ``checkpoints/step_<step>``.

    Every process must call this (accelerate writes one RNG file per process).
    """
    root = checkpoint_dir(output_dir)
    final = root / f"step_{step:08d}"
    temporary = root / f".tmp-step_{step:08d}"
    if accelerator.is_main_process:
        for stale in root.glob(".tmp-step_*"):  # a save cut short (a SIGKILL after the grace period, a crash)
            shutil.rmtree(stale, ignore_errors=True)
        temporary.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(temporary), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        state_path = temporary / STATE_FILE
        with open(state_path, "w") as handle:
            json.dump(training_state, handle)
        sync_to_disk(temporary)
        if final.exists():
            shutil.rmtree(final)
        os.replace(temporary, final)
        _fsync(root)  # the rename itself
        for old in list_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def sync_to_disk(folder: Path) -> None:
    """Flush every file under ``folder`` (whichever process wrote it) and the folder entries themselves."""
    for path in sorted(folder.rglob("*"), reverse=True):  # files before the folders that list them
        _fsync(path)
    _fsync(folder)


def _fsync(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def load_checkpoint(accelerator: Accelerator, path: Path) -> dict[str, Any]:
    """Restore a checkpoint into the prepared objects; refuses unreadable or mismatched ones with a reason."""
    state = read_training_state(path)
    try:
        accelerator.load_state(str(path))
    except Exception as error:
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise CheckpointError(f"checkpoint {path}: cannot be loaded into this model/optimizer "
                              f"(corrupt file or different config?): {first_line[:300]}") from None
    return state
