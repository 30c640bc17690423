"""One output folder holds one run: a new run never writes over another run's checkpoints or export.

Checked on every process before anything is written, so a refused start leaves the folder exactly as it was.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Optional

from .checkpoint import CHECKPOINT_PATTERN, checkpoint_dir
from .export import BACKBONE_FILE, CARD_TITLE, MODEL_FILE

LOG_FILE = "train_log.jsonl"
TRUNK_CACHE_FOLDER = "trunk_cache"  # trunk_cache.location=disk: valid only while its run trains
# config.json is written at step 0 (it lets `moebsr eval` read an unfinished run), so alone it marks no saved work
EXPORT_FILES = (MODEL_FILE, "metrics.json")
# what a run writes and a new run would not simply rewrite, removed by ``train.overwrite=true`` (config.yaml and
# config.json are rewritten at start; README.md only when it is a moebsr model card; nothing else is touched)
RUN_OUTPUTS = ("checkpoints", *EXPORT_FILES, BACKBONE_FILE, LOG_FILE, "moebsr", "README.md", TRUNK_CACHE_FOLDER)


class RunFolderError(ValueError):
    """The output folder holds another run; the message says how to continue, move on or clear it."""


def previous_run(output_dir: str | os.PathLike) -> list[str]:
    """What in ``output_dir`` belongs to an earlier run: its checkpoints (complete or not) and export files."""
    folder = Path(output_dir)
    found = []
    checkpoints = checkpoint_dir(folder)
    if checkpoints.is_dir():
        found += sorted(f"checkpoints/{p.name}" for p in checkpoints.iterdir()
                        if CHECKPOINT_PATTERN.match(p.name.removeprefix(".tmp-")))
    found += [name for name in EXPORT_FILES if (folder / name).is_file()]
    return found


def check_output_dir(output_dir: str | os.PathLike, resume: Optional[str], overwrite: bool) -> None:
    """Refuse to start a new run in a folder that holds another run's checkpoints or export."""
    if resume or overwrite:
        return
    found = previous_run(output_dir)
    if found:
        shown = ", ".join(found[:3]) + (f" and {len(found) - 3} more" if len(found) > 3 else "")
        raise RunFolderError(
            f"train.output_dir: {str(output_dir)!r} holds another run ({shown}); accepted: train.resume=latest to "
            "continue it, a new train.output_dir, or train.overwrite=true to clear it first")


def clear_run_outputs(output_dir: str | os.PathLike) -> list[str]:
    """Remove what a run writes (``RUN_OUTPUTS``) from ``output_dir``; returns the names removed."""
    folder = Path(output_dir)
    removed = []
    for name in RUN_OUTPUTS:
        path = folder / name
        if name == "README.md" and path.is_file() and not path.read_text(errors="replace").startswith(CARD_TITLE):
            continue  # someone else's README
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
        else:
            continue
        removed.append(name)
    return removed


def set_aside_log(output_dir: str | os.PathLike) -> Optional[Path]:
    """A run starting from step 0 keeps an earlier log (a run that saved no checkpoint) under another name."""
    log = Path(output_dir) / LOG_FILE
    if not log.is_file() or log.stat().st_size == 0:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    kept, count = log.with_name(f"train_log.{stamp}.jsonl"), 1
    while kept.exists():
        count += 1
        kept = log.with_name(f"train_log.{stamp}-{count}.jsonl")
    os.replace(log, kept)
    return kept
