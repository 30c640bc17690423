"""Runs that get killed, losses that go non-finite, and bad input tried the way a new user would."""

import json
import os
import random
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from run_helpers import QUICKSTART, REPO, read_losses, short_run_overrides, subprocess_env
from safetensors.torch import load_file

from moebsr.config import load_config
from moebsr.tasks import unregister_task
from moebsr.training.checkpoint import list_checkpoints
from moebsr.training.interrupt import TrainingInterrupted
from moebsr.training.loop import TrainingAborted, train
from moebsr.training.runner import run_training_cli

KILL_RUN = ["train.checkpoint_every=2", "logging.trackers=[none]", "train.keep_checkpoints=2"]


def _launch(output: Path, extra=()) -> subprocess.Popen:
    command = [sys.executable, str(REPO / "launch" / "multitask.py"), "--config", str(QUICKSTART),
               *short_run_overrides(output, 12, KILL_RUN + list(extra))]
    return subprocess.Popen(command, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)


def _logged_steps(output: Path) -> int:
    try:
        return len((output / "train_log.jsonl").read_text().splitlines())
    except FileNotFoundError:
        return 0


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    output = tmp_path_factory.mktemp("whole")
    process = _launch(output)
    assert process.wait(timeout=300) == 0, process.stderr.read()[-2000:]
    return output


def test_kill_9_at_random_steps_then_resume_latest_finishes_identically(uninterrupted, tmp_path):
    expected_metrics = json.loads((uninterrupted / "metrics.json").read_text())
    expected_losses = {r["step"]: r["loss"] for r in read_losses(uninterrupted)}
    chooser = random.Random(20261124)
    for trial in range(3):
        output = tmp_path / f"trial{trial}"
        kill_after = chooser.randint(2, 10)  # steps logged before the kill lands (mid-step or mid-save)
        process = _launch(output)
        _wait_for_steps(output, kill_after, process)
        time.sleep(chooser.random() * 0.3)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
        for checkpoint in list_checkpoints(output):  # whatever was complete stays loadable
            assert load_file(str(checkpoint / "model.safetensors"))
        resumed = _launch(output, ["train.resume=latest"])
        assert resumed.wait(timeout=300) == 0, resumed.stderr.read()[-2000:]
        assert json.loads((output / "metrics.json").read_text()) == expected_metrics, f"trial {trial}"
        losses = {r["step"]: r["loss"] for r in read_losses(output)}
        assert losses == expected_losses, f"trial {trial} (killed after {kill_after} steps)"
        assert not list((output / "checkpoints").glob(".tmp-*"))


STOP_LINE = (r"^stopped: SIGTERM at step (\d+) of 12: saved (\S+) (\d+\.\d) s after the signal; continue with the same "
             r"command and train.resume=latest$")


def _wait_for_steps(output: Path, steps: int, process: subprocess.Popen) -> None:
    deadline = time.time() + 240
    while _logged_steps(output) < steps and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)


def _assert_stopped_and_resumes_identically(output: Path, stderr: str, uninterrupted: Path) -> None:
    stopped = re.search(STOP_LINE, stderr, re.MULTILINE)
    assert stopped, stderr[-2000:]
    step = int(stopped[1])
    assert 3 <= step < 12 and Path(stopped[2]) == list_checkpoints(output)[-1] and stopped[2].endswith(f"{step:08d}")
    assert "Traceback" not in stderr and "exiting now without saving" not in stderr
    assert not (output / "metrics.json").exists()
    assert [r["step"] for r in read_losses(output)] == list(range(1, step + 1))
    resumed = _launch(output, ["train.resume=latest", "train.checkpoint_every=5"])
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()[-2000:]
    assert json.loads((output / "metrics.json").read_text()) == json.loads((uninterrupted / "metrics.json").read_text())
    assert read_losses(output) == read_losses(uninterrupted)


def test_sigterm_to_an_accelerate_launch_run_saves_and_resume_latest_equals_uninterrupted(uninterrupted, tmp_path):
    """The installed launcher as a preemption meets it: SIGTERM to the job's process group. accelerate 1.15 lets the
    signal pass (the training process gets it once); 1.16 also forwards it to its children and SIGKILLs them 5 s
    later (twice, with a deadline)."""
    from run_helpers import launch_command
    output = tmp_path / "preempted"
    command = [*launch_command(1), *short_run_overrides(output, 12, KILL_RUN + ["train.checkpoint_every=5"])]
    process = subprocess.Popen(command, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)  # its own group, as a cluster job's
    _wait_for_steps(output, 3, process)
    os.killpg(process.pid, signal.SIGTERM)  # the launcher and the training process, as a preemption does
    stdout, stderr = process.communicate(timeout=120)  # returns once the training process closed the pipes too
    _assert_stopped_and_resumes_identically(output, stderr, uninterrupted)


def test_sigterm_to_the_training_process_alone_under_accelerate_launch_saves(tmp_path):
    """``kill <pid>`` of the training process (accelerate 1.15's pass-through): one signal, the launcher untouched."""
    import psutil
    from run_helpers import launch_command
    output = tmp_path / "told"
    command = [*launch_command(1), *short_run_overrides(output, 400, KILL_RUN)]
    launcher = subprocess.Popen(command, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
    _wait_for_steps(output, 3, launcher)
    training, = psutil.Process(launcher.pid).children()
    training.send_signal(signal.SIGTERM)
    _, stderr = launcher.communicate(timeout=120)
    assert "non-zero exit status 143" in stderr  # the launcher reports its child's 143 as for any failed run
    stopped = re.search(r"^stopped: SIGTERM at step (\d+) of 400: saved (\S+) ", stderr, re.MULTILINE)
    assert stopped and "the same stop request" not in stderr, stderr[-2000:]
    assert Path(stopped[2]) == list_checkpoints(output)[-1] and _logged_steps(output) == int(stopped[1])


def test_a_launcher_that_forwards_the_signal_and_kills_after_5_s_still_gets_its_checkpoint(uninterrupted, tmp_path):
    """What ``accelerate launch`` 1.16 does, whatever version is installed: the group's SIGTERM, the launcher's own
    SIGTERM to its child right after (one request, not "exit now"), and SIGKILL once its 5 s grace is over."""
    output = tmp_path / "forwarded"
    process = subprocess.Popen([sys.executable, str(REPO / "launch" / "multitask.py"), "--config", str(QUICKSTART),
                                *short_run_overrides(output, 12, KILL_RUN + ["train.checkpoint_every=5"])],
                               env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    _wait_for_steps(output, 3, process)
    os.killpg(process.pid, signal.SIGTERM)
    process.send_signal(signal.SIGTERM)  # forwarded
    try:
        process.wait(timeout=5.0)
    except subprocess.TimeoutExpired:
        process.kill()
    stderr = process.stderr.read()
    assert process.wait() == 143, stderr[-2000:]
    _assert_stopped_and_resumes_identically(output, stderr, uninterrupted)


def test_sigint_exits_130_and_signals_close_together_are_one_request(tmp_path):
    output = tmp_path / "twice"
    process = _launch(output, ["train.steps=400"])
    _wait_for_steps(output, 3, process)
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=120) == 130
    stderr = process.stderr.read()
    assert "SIGINT: finishing this step and saving a checkpoint" in stderr and "KeyboardInterrupt" not in stderr
    assert re.search(r"^stopped: SIGINT at step \d+ of 400", stderr, re.MULTILINE)

    again = _launch(output, ["train.steps=400", "train.resume=latest"])
    _wait_for_steps(output, 8, again)
    again.send_signal(signal.SIGINT)  # Ctrl-C in a terminal: SIGINT to the group, then the launcher's SIGTERM
    again.send_signal(signal.SIGTERM)
    assert again.wait(timeout=120) == 130
    stderr = again.stderr.read()
    stopped = re.search(r"^stopped: SIGINT at step (\d+) of 400: saved (\S+) ", stderr, re.MULTILINE)
    assert stopped and "exiting now without saving" not in stderr, stderr[-2000:]
    assert Path(stopped[2]) == list_checkpoints(output)[-1]
    for checkpoint in list_checkpoints(output):
        assert load_file(str(checkpoint / "model.safetensors"))


def test_a_stop_during_a_mid_run_evaluation_abandons_it_and_saves_that_step(tmp_path, monkeypatch, capsys):
    """An evaluation can outlast a launcher's grace period: a stop signal ends it at the next batch."""
    import moebsr.training.loop as training
    evaluations = []

    def evaluate_with_a_signal(*args, **kwargs):
        evaluations.append(kwargs.get("stop_signal"))
        if len(evaluations) == 1:
            signal.raise_signal(signal.SIGTERM)  # lands while the evaluation at step 4 runs
        return evaluate(*args, **kwargs)

    from moebsr.training.evaluate import evaluate
    monkeypatch.setattr(training, "evaluate", evaluate_with_a_signal)
    output = tmp_path / "run"
    config = load_config(QUICKSTART, short_run_overrides(output, 12, [
        "tasks=[digits]", "train.sampler=round_robin", "eval.every=4", "logging.trackers=[none]"]))
    with pytest.raises(TrainingInterrupted, match=r"SIGTERM at step 4 of 12: saved \S+step_00000004 "):
        train(config)
    assert "evaluation at step 4 abandoned: SIGTERM after 0 batch(es)" in capsys.readouterr().out
    assert len(evaluations) == 1 and evaluations[0] is not None
    assert [p.name for p in list_checkpoints(output)] == ["step_00000004"] and _logged_steps(output) == 4
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the run's handler is gone with the run


def test_eval_of_a_run_killed_mid_way_uses_its_newest_checkpoint(tmp_path):
    from moebsr.training.evaluate import evaluate_run
    output = tmp_path / "killed"
    process = _launch(output, ["train.steps=400"])
    deadline = time.time() + 240
    while not list_checkpoints(output) and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    assert not (output / "model.safetensors").exists() and not (output / "metrics.json").exists()
    newest = list_checkpoints(output)[-1]
    metrics = evaluate_run(str(output), tasks=["digits"], max_examples=80)
    assert set(metrics) == {"digits"} and metrics["digits"]["examples"] == 80 and 0 <= metrics["digits"]["top1"] <= 1
    assert metrics == evaluate_run(str(output), tasks=["digits"], max_examples=80,
                                   weights=str(newest / "model.safetensors"))


FLAKY_TASK = textwrap.dedent('''
    import dataclasses, os
    import torch
    from moebsr.tasks import create_task, register_task

    @register_task("flaky_digits")
    def flaky_digits() -> "Task":
        bad_calls = {int(v) for v in os.environ.get("MOEBSR_TEST_NAN_CALLS", "").split(",") if v}
        calls = {"n": 0}

        def loss(logits, labels):
            calls["n"] += 1
            value = torch.nn.functional.cross_entropy(logits, labels)
            return value * float("nan") if calls["n"] in bad_calls else value
        return dataclasses.replace(create_task("digits"), name="flaky_digits", loss_fn=loss)
''')


@pytest.fixture(scope="module")
def flaky_task_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("flaky_tasks")
    (folder / "flaky.py").write_text(FLAKY_TASK)
    yield folder
    unregister_task("flaky_digits")  # the registry is process-wide: leave it as other tests expect it


def _flaky_config(folder, output, steps, extra=()):
    return load_config(QUICKSTART, short_run_overrides(output, steps, [
        "tasks=[flaky_digits]", f"data.task_dirs=[{folder}]", "train.sampler=round_robin",
        "logging.trackers=[none]", *extra]))


def test_a_non_finite_loss_skips_that_step_with_a_warning(flaky_task_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("MOEBSR_TEST_NAN_CALLS", "3")
    with pytest.warns(UserWarning, match=r"non-finite loss for \['flaky_digits'\]; step skipped \(1/5 in a row\)"):
        result = train(_flaky_config(flaky_task_dir, tmp_path / "run", 6))
    assert [r["step"] for r in result.losses] == [1, 2, 3, 4, 5, 6]
    assert all(torch.isfinite(v).all() for v in load_file(str(tmp_path / "run" / "model.safetensors")).values())


def test_repeated_non_finite_losses_abort_without_a_poisoned_checkpoint(flaky_task_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("MOEBSR_TEST_NAN_CALLS", "4,5,6")
    output = tmp_path / "run"
    with pytest.warns(UserWarning), pytest.raises(TrainingAborted, match="3 non-finite losses in a row at step 3"):
        train(_flaky_config(flaky_task_dir, output, 10, ["train.checkpoint_every=2", "train.max_bad_steps=3"]))
    assert [p.name for p in list_checkpoints(output)] == ["step_00000002"]
    saved = load_file(str(output / "checkpoints" / "step_00000002" / "model.safetensors"))
    assert all(torch.isfinite(value).all() for value in saved.values())
    assert not (output / "model.safetensors").exists()


BAD_TASKS = textwrap.dedent('''
    import numpy as np
    from moebsr.tasks import Task, register_task

    def _images(count):
        return np.zeros((count, 8, 8), dtype=np.uint8)

    @register_task("no_outputs")
    def no_outputs():
        return Task(name="no_outputs", dataset_fn=lambda split: None)

    @register_task("labels_too_big")
    def labels_too_big():
        return Task(name="labels_too_big", num_outputs=3,
                    dataset_fn=lambda split: {"images": _images(6), "labels": np.array([0, 1, 2, 3, 7, 1])})

    @register_task("empty_split")
    def empty_split():
        return Task(name="empty_split", num_outputs=2,
                    dataset_fn=lambda split: {"images": _images(0), "labels": np.zeros(0, dtype=np.int64)})

    @register_task("tiny_set")
    def tiny_set():
        return Task(name="tiny_set", num_outputs=2,
                    dataset_fn=lambda split: {"images": _images(3), "labels": np.array([0, 1, 0])})
''')


@pytest.fixture(scope="module")
def bad_task_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad_tasks")
    (folder / "bad.py").write_text(BAD_TASKS)
    yield folder
    for name in ("no_outputs", "labels_too_big", "empty_split", "tiny_set"):
        unregister_task(name)


@pytest.mark.parametrize("overrides, message", [
    (["tasks=[mnist,cifar11]"], r"^error: unknown task 'cifar11'; known tasks: animals, .*mnist"),
    (["tasks=[no_outputs]"], r"^error: task 'no_outputs' \(defined in .*bad.py\): its factory failed: TypeError: "
                             r".*num_outputs"),
    (["tasks=[labels_too_big]"], r"^error: task 'labels_too_big', split 'train': 2 labels outside the task's classes "
                                 r"\[0, 3\): \[3, 7\]"),
    (["tasks=[empty_split]"], r"^error: .*empty_split.*0 examples|^error: .*empty_split.*empty"),
    (["tasks=[tiny_set]", "train.batch_size=8"], r"^error: task\(s\) tiny_set, split 'train': 3 examples over 1 "
                                                 r"process\(es\) give no batch of 8"),
    (["token_drop.keep_rate=0"], r"^error: token_drop.keep_rate: 0.0 is invalid; accepted: a number in \(0, 1\]$"),
    (["token_drop.keep_rate=1.5"], r"^error: token_drop.keep_rate: 1.5 is invalid; accepted: a number in \(0, 1\]$"),
    (["train.batch_size=-4"], r"^error: train.batch_size: -4 is invalid; accepted: an integer >= 1$"),
    (["moe.top_k=9"], r"^error: moe.top_k: 9 is invalid; accepted: 1..moe.num_experts \(4\)$"),
    (["moe.blocks=[1,8]"], r"^error: moe.blocks: block index 8 out of range; accepted: 0..3 \(depth 4\)$"),
    (["bsr.preset=mostly"], r"^error: bsr.preset: unknown preset 'mostly'"),
    (["model.name=resnet50"], r"^error: model.name: 'resnet50' is not a ViT \(it is a timm 'resnet' model\); "
                              r"accepted: a timm ViT/DeiT"),
    (["token_drop.decision=sometimes"], r"^error: token_drop.decision: 'sometimes' is invalid; accepted: shared, "
                                        r"per_task$"),
    (["tasks=[imagefolder]", "data.task_options.imagefolder.data_dir=/nonexistent/photos"],
     r"^error: .*imagefolder.*/nonexistent/photos"),
    (["train.resume=/nonexistent/step_00000004"], r"^error: train.resume: no checkpoint folder at"),
    (["trunk_cache.enabled=true", "bsr.preset=all"], r"^error: trunk_cache.enabled: nothing to cache \(the embeddings "
                                                      r"train\); accepted: a model whose first trainable block"),
    (["moe.task_router_blocks=[1]"], r"^error: moe.task_router_blocks: \[1\] are not MoE blocks; accepted: a "
                                     r"non-empty subset of the MoE blocks \[0, 2, 3\], or null$"),
])
def test_bad_input_gets_one_line_and_keeps_saved_work(overrides, message, bad_task_dir, tmp_path, capsys):
    output = tmp_path / "run"
    saved = output / "checkpoints" / "step_00000004"
    saved.mkdir(parents=True)
    (saved / "training_state.json").write_text('{"step": 4}')
    code = run_training_cli(str(QUICKSTART), short_run_overrides(output, 4, [
        f"data.task_dirs=[{bad_task_dir}]", "logging.trackers=[none]", *overrides]))
    error = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(error) == 1, error
    assert re.search(message, error[0]), error[0]
    assert (saved / "training_state.json").read_text() == '{"step": 4}'  # nothing saved is lost


def test_more_processes_than_samples_is_one_clear_error(bad_task_dir):
    from types import SimpleNamespace

    from moebsr.tasks import TaskError
    from moebsr.training.run_data import RunData
    config = load_config(QUICKSTART, [f"data.task_dirs=[{bad_task_dir}]", "tasks=[tiny_set]", "train.batch_size=1"])
    data = RunData.from_config(config)
    four_processes = SimpleNamespace(device=torch.device("cpu"), process_index=0, num_processes=4)
    with pytest.raises(TaskError, match=r"tiny_set, split 'train': 3 examples over 4 process\(es\) give no batch"):
        data.attach_image_spec(dict(image_size=32, in_chans=3), four_processes)


def test_grey_and_colour_images_are_converted_not_crashed(tmp_path):
    from PIL import Image

    from moebsr.data import ImageSpec, build_task_loader
    from moebsr.tasks import create_task
    for label, mode in enumerate(["L", "RGB", "RGBA", "L"]):
        folder = tmp_path / f"class{label % 2}"
        folder.mkdir(exist_ok=True)
        Image.new(mode, (20 + label, 17)).save(folder / f"{label}.png")
    task = create_task("imagefolder", data_dir=str(tmp_path))
    batch = next(iter(build_task_loader(task, "train", ImageSpec(image_size=32, in_chans=3), 4, train=False)))
    assert batch["images"].shape[1:] == (3, 32, 32)
