"""Two CPU processes (gloo DDP through ``accelerate launch``) train to the result of one with the same global batch."""

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import torch
from run_helpers import launch_command, launch_run_output, short_run_overrides, subprocess_env
from safetensors.torch import load_file

from moebsr.training.checkpoint import list_checkpoints, read_training_state

# Token dropping off: this randomly initialised backbone's CLS attention is near-uniform (kept and dropped tokens
# differ by ~1e-6), so the ~1e-7 rounding differences between one batch of 16 and two of 8 flip which tokens survive
# within a few AdamW steps. That batch-splitting itself is exact with dropping on is tested directly in
# tests/test_model_shared_trunk.py; the balancing loss is tested here (its statistics are summed over processes).
# Task adapters on (blocks 2, 3): their rows of the joint batch, and the adapters of the tasks a step does not draw
# (unused parameters for DDP), go through the same all-reduce as every other trained weight.
SAME_RUN = ["token_drop.enabled=false", "train.checkpoint_every=3", "logging.trackers=[none]", "train.lr=2e-3",
            "adapters.enabled=true", "adapters.blocks=[2,3]"]


# What DDP printed once per process before it was told when to search for unused parameters (issue 24, item 16)
DDP_NOISE = ("FutureWarning", "find_unused_parameters")


def _run(tmp_path, processes: int, batch: int, extra=(), steps: int = 6):
    output = tmp_path / f"p{processes}"
    result = launch_run_output(output, processes, steps, SAME_RUN + [f"train.batch_size={batch}", *extra])
    return output, result


def _assert_same_weights(one: Path, two: Path, steps: int) -> None:
    """The 2-process run's weights are the 1-process run's: each step's gradients were averaged over both ranks."""
    weights_one, weights_two = (load_file(str(run / "model.safetensors")) for run in (one, two))
    gap = max((v - weights_two[k]).abs().max().item() for k, v in weights_one.items())
    assert gap < 1e-4, f"weights differ by {gap:.2e} after {steps} steps"


def test_two_processes_match_one_with_the_same_global_batch(tmp_path):
    """Steps of the quickstart's joint groups leave the other groups' heads, gates and adapters out: DDP searches."""
    (one, _), (two, launched) = _run(tmp_path, 1, 16), _run(tmp_path, 2, 8)
    assert "DDP: searching every step for unused parameters: a step of ['mnist', 'mnist_parity'] leaves " \
        in launched.stdout
    assert not [line for line in launched.stderr.splitlines() if any(noise in line for noise in DDP_NOISE)]
    _assert_same_weights(one, two, 6)
    weights_one, weights_two = (load_file(str(run / "model.safetensors")) for run in (one, two))
    metrics_one, metrics_two = (json.loads((run / "metrics.json").read_text())["metrics"] for run in (one, two))
    assert metrics_one.keys() == metrics_two.keys()
    for task in metrics_one:
        assert metrics_two[task]["examples"] == metrics_one[task]["examples"]  # no sample counted twice
        for name, value in metrics_one[task].items():
            assert abs(metrics_two[task][name] - value) <= 0.0125, (task, name)
    assert torch.isfinite(torch.stack([v.float().abs().max() for v in weights_two.values()])).all()


def test_two_processes_whose_every_step_trains_every_parameter_run_ddp_without_the_search(tmp_path):
    """Two tasks on the same images, one joint group: every step reaches every trained parameter, so DDP neither
    walks each step's graph nor warns that it found nothing; the balancing loss's all-reduce warns no more either."""
    one_task_set = ["tasks=[digits,digits_parity]"]
    (one, _), (two, launched) = _run(tmp_path, 1, 16, one_task_set, 4), _run(tmp_path, 2, 8, one_task_set, 4)
    assert "DDP: no search for unused parameters (every step reaches every trained parameter)" in launched.stdout
    assert not [line for line in launched.stderr.splitlines() if any(noise in line for noise in DDP_NOISE)], \
        launched.stderr[-3000:]
    _assert_same_weights(one, two, 4)


def _launch_two_and_wait(output: Path, **popen: Any) -> subprocess.Popen:
    """A 400-step 2-process run of ``SAME_RUN``, returned once it has logged 4 steps."""
    command = [*launch_command(2), *short_run_overrides(output, 400, SAME_RUN + ["train.batch_size=8"])]
    launcher = subprocess.Popen(command, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, **popen)
    log, deadline = output / "train_log.jsonl", time.time() + 240
    while (not log.is_file() or len(log.read_text().splitlines()) < 4) and time.time() < deadline:
        time.sleep(0.05)
    return launcher


def _assert_one_stop_with_one_collective_checkpoint(stderr: str, output: Path) -> None:
    stops = re.findall(r"^stopped: SIGTERM at step (\d+) of 400: saved (\S+) ", stderr, re.MULTILINE)
    assert len(stops) == 1, stderr[-3000:]  # rank 0 says it, whichever process got the signal
    step, saved = int(stops[0][0]), Path(stops[0][1])
    # the checkpoint is collective: it completes only if both processes stopped at the same step
    assert list_checkpoints(output)[-1] == saved and read_training_state(saved)["step"] == step
    assert {p.name for p in saved.glob("random_states_*.pkl")} == {"random_states_0.pkl", "random_states_1.pkl"}
    assert len((output / "train_log.jsonl").read_text().splitlines()) == step


def test_a_signal_to_one_process_stops_both_at_the_same_step_with_one_complete_checkpoint(tmp_path):
    output = tmp_path / "preempted"
    launcher = _launch_two_and_wait(output)
    workers = subprocess.run(["pgrep", "-P", str(launcher.pid)], capture_output=True, text=True).stdout.split()
    rank_one = next(pid for pid in workers if b"RANK=1" in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"))
    subprocess.run(["kill", "-TERM", rank_one], check=True)  # only rank 1 is told; rank 0 learns it at the agreement
    _, stderr = launcher.communicate(timeout=180)
    _assert_one_stop_with_one_collective_checkpoint(stderr, output)
    assert stderr.count("SIGTERM: finishing this step") == 1  # rank 1's handler


def test_a_preemption_of_the_whole_job_stops_both_processes_at_one_step_with_one_checkpoint(tmp_path):
    """SIGTERM to the job's process group: each worker gets it from the group and again from torchrun's agent (which
    forwards what it got, then waits 30 s before SIGKILL); both are one request, so the checkpoint is still saved."""
    output = tmp_path / "preempted"
    launcher = _launch_two_and_wait(output, start_new_session=True)
    os.killpg(launcher.pid, signal.SIGTERM)
    _, stderr = launcher.communicate(timeout=180)
    assert launcher.returncode == 143 or "SignalException" in stderr, stderr[-3000:]  # accelerate 1.16 / 1.15
    _assert_one_stop_with_one_collective_checkpoint(stderr, output)
    assert stderr.count("SIGTERM: finishing this step") == 2  # each worker's first signal
    assert "exiting now without saving" not in stderr
