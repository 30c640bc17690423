"""Expert parallelism with the tutel backend: two CPU processes (gloo, all-to-all) each holding half of the experts
train exactly like one torch-backend process with the same global batch, and resume exactly from a checkpoint.
Skipped when tutel is not installed (it is not on PyPI; see docs/expert-parallel.md)."""

import json
import shutil

import pytest
import torch
from run_helpers import launch_run
from safetensors.torch import load_file

pytest.importorskip("tutel", reason="tutel is not installed (not on PyPI): see docs/expert-parallel.md")

# SGD, not AdamW: Adam's update is nearly blind to a gradient's scale, SGD shows an expert gradient off by W at once
# (gap 1e-2 instead of 2e-8). A clip that always bites: clipping each process by its own norm gives a 3e-4 gap.
SGD = ["train.optimizer=sgd", "train.lr=0.05", "train.grad_clip=0.05", "moe.aux_loss_weight=0",
       "train.checkpoint_every=3", "logging.trackers=[none]"]


def _weights(run):
    return load_file(str(run / "model.safetensors"))


def _largest_gap(first: dict, second: dict) -> float:
    assert first.keys() == second.keys()
    return max((value - second[key]).abs().max().item() for key, value in first.items())


def test_two_processes_with_half_the_experts_each_match_one_torch_process(tmp_path):
    one, two = tmp_path / "torch1", tmp_path / "tutel2"
    launch_run(one, 1, 6, SGD + ["train.batch_size=16"])
    stdout = launch_run(two, 2, 6, SGD + ["train.batch_size=8", "moe.backend=tutel"])
    assert "expert tensors sharded over the processes" in stdout
    # the checkpoint and the export hold all 4 experts, gathered from both processes
    assert _weights(two)["backbone.blocks.3.mlp.experts.fc1_weight"].shape[0] == 4
    moved = _largest_gap(_weights(one), load_file(str(one / "checkpoints" / "step_00000003" / "model.safetensors")))
    gap = _largest_gap(_weights(one), _weights(two))
    assert moved > 1e-3 and gap < 1e-6, f"2-process tutel differs from 1-process torch by {gap:.2e} (moved {moved:.2e})"
    metrics_one, metrics_two = (json.loads((run / "metrics.json").read_text())["metrics"] for run in (one, two))
    assert metrics_one == metrics_two  # every example counted once, same predictions
    assert all(torch.isfinite(v).all() for v in _weights(two).values())


def test_expert_parallel_run_resumes_exactly_including_every_process_optimizer_state(tmp_path):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    adamw = ["train.checkpoint_every=3", "logging.trackers=[none]", "train.lr=2e-3", "train.batch_size=8",
             "moe.backend=tutel"]  # AdamW and the balancing loss: the defaults
    launch_run(full, 2, 6, adamw)
    shutil.copytree(full, resumed)
    for finished in ("model.safetensors", "metrics.json", "checkpoints/step_00000006"):
        target = resumed / finished
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    stdout = launch_run(resumed, 2, 6, adamw + ["train.resume=latest"])
    assert "resumed from" in stdout and "at step 3" in stdout
    assert _largest_gap(_weights(full), _weights(resumed)) == 0.0
    assert json.loads((full / "metrics.json").read_text()) == json.loads((resumed / "metrics.json").read_text())
