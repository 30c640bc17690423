"""A checkpoint reaches the disk before it replaces anything: a machine lost right after a save keeps one."""

import os
from pathlib import Path

import torch
from accelerate import Accelerator

from moebsr.training import checkpoint
from moebsr.training.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint


def _prepared():
    torch.manual_seed(0)
    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    return accelerator, *accelerator.prepare(model, optimizer)


def test_every_file_is_flushed_before_the_rename_and_the_rename_before_old_checkpoints_go(tmp_path, monkeypatch):
    accelerator, model, optimizer = _prepared()
    save_checkpoint(accelerator, tmp_path, 1, {"step": 1}, keep=1)
    events: list[tuple[str, Path]] = []
    real_fsync, real_replace, real_rmtree = os.fsync, os.replace, checkpoint.shutil.rmtree

    def fsync(descriptor: int) -> None:
        events.append(("fsync", Path(os.readlink(f"/proc/self/fd/{descriptor}"))))
        real_fsync(descriptor)

    def replace(source, target) -> None:
        events.append(("rename", Path(target)))
        real_replace(source, target)

    def rmtree(path, **kwargs) -> None:
        events.append(("remove", Path(path)))
        real_rmtree(path, **kwargs)

    monkeypatch.setattr(checkpoint.os, "fsync", fsync)
    monkeypatch.setattr(checkpoint.os, "replace", replace)
    monkeypatch.setattr(checkpoint.shutil, "rmtree", rmtree)
    final = save_checkpoint(accelerator, tmp_path, 2, {"step": 2}, keep=1)

    renamed = events.index(("rename", final))
    temporary = final.parent / f".tmp-{final.name}"
    synced_before = {path for kind, path in events[:renamed] if kind == "fsync"}
    files = {temporary / path.name for path in final.iterdir()}
    assert {"model.safetensors", "optimizer.bin", "training_state.json"} <= {path.name for path in files}
    assert files | {temporary} <= synced_before
    assert ("fsync", final.parent) in events[renamed:]  # the rename itself is on disk...
    removed = events.index(("remove", final.parent / "step_00000001"))
    assert events.index(("fsync", final.parent), renamed) < removed  # ...before the older checkpoint goes
    assert list_checkpoints(tmp_path) == [final]
    assert load_checkpoint(accelerator, final) == {"step": 2}


def test_a_save_cut_short_leaves_the_newest_checkpoint_and_its_leftovers_go_with_the_next_save(tmp_path):
    accelerator, model, optimizer = _prepared()
    first = save_checkpoint(accelerator, tmp_path, 4, {"step": 4}, keep=2)
    cut_short = first.parent / ".tmp-step_00000006"  # what a SIGKILL mid-save leaves
    cut_short.mkdir()
    (cut_short / "model.safetensors").write_bytes(b"partial")
    assert list_checkpoints(tmp_path) == [first]  # not complete: never a resume candidate
    second = save_checkpoint(accelerator, tmp_path, 8, {"step": 8}, keep=2)
    assert list_checkpoints(tmp_path) == [first, second] and not cut_short.exists()
