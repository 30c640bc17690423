"""One folder, one run: a reused output folder is refused before anything is written, overwrite clears it, and
``resume=latest`` with nothing to resume says so and keeps the earlier log."""

import json
import shutil

import pytest
from run_helpers import QUICKSTART, read_losses, short_run_overrides

from moebsr.config import ConfigError, load_config
from moebsr.training.loop import train
from moebsr.training.run_folder import RunFolderError, previous_run
from moebsr.training.runner import run_training_cli

TRAIN = ["logging.trackers=[none]", "train.checkpoint_every=2"]


def snapshot(folder):
    """Every file under ``folder`` with its bytes: equal snapshots mean nothing was written or removed."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 4-step run: checkpoints step 2 and 4, export, metrics."""
    output = tmp_path_factory.mktemp("finished")
    train(load_config(QUICKSTART, short_run_overrides(output, 4, TRAIN)))
    return output


def test_a_folder_holding_another_run_is_refused_in_one_line_and_left_untouched(finished, tmp_path, capsys):
    folder = tmp_path / "reused"
    shutil.copytree(finished, folder)
    before = snapshot(folder)
    assert previous_run(folder) == ["checkpoints/step_00000002", "checkpoints/step_00000004", "model.safetensors",
                                    "metrics.json"]
    with pytest.raises(RunFolderError, match=r"holds another run \(checkpoints/step_00000002, checkpoints/"
                                             r"step_00000004, model.safetensors and 1 more\); accepted: "
                                             r"train.resume=latest .*train.output_dir, or train.overwrite=true"):
        train(load_config(QUICKSTART, short_run_overrides(folder, 2, TRAIN)))
    code = run_training_cli(str(QUICKSTART), short_run_overrides(folder, 2, TRAIN))
    error = capsys.readouterr().err.strip()
    assert code == 2 and len(error.splitlines()) == 1 and error.startswith("error: train.output_dir:")
    assert snapshot(folder) == before  # nothing written, nothing removed


def test_overwrite_clears_the_other_run_first(finished, tmp_path):
    folder = tmp_path / "reused"
    shutil.copytree(finished, folder)
    (folder / "notes.txt").write_text("mine")  # not a run output: kept
    result = train(load_config(QUICKSTART, short_run_overrides(folder, 2, TRAIN + ["train.overwrite=true"])))
    assert result.step == 2
    assert sorted(p.name for p in (folder / "checkpoints").iterdir()) == ["step_00000002"]
    assert [r["step"] for r in read_losses(folder)] == [1, 2]
    assert json.loads((folder / "metrics.json").read_text())["step"] == 2
    assert (folder / "notes.txt").read_text() == "mine"
    assert (folder / "README.md").read_text().startswith("# moebsr run:")  # the new run's card


def test_overwrite_keeps_a_readme_that_is_not_a_model_card(finished, tmp_path):
    folder = tmp_path / "project"
    shutil.copytree(finished, folder)
    (folder / "README.md").write_text("# my project\n")
    (folder / "metrics.json").unlink()
    (folder / "model.safetensors").unlink()
    from moebsr.training.run_folder import clear_run_outputs
    assert clear_run_outputs(folder) == ["checkpoints", "train_log.jsonl"]
    assert (folder / "README.md").read_text() == "# my project\n"


def test_resume_latest_in_a_finished_run_continues_it_not_refused(finished, tmp_path):
    """Not refused as another run's folder; with the same schedule there is nothing left to train (a longer
    train.steps is refused: tests/test_resume.py)."""
    folder = tmp_path / "finished"
    shutil.copytree(finished, folder)
    result = train(load_config(QUICKSTART, short_run_overrides(folder, 4, TRAIN + ["train.resume=latest"])))
    assert result.step == 4 and [r["step"] for r in read_losses(folder)] == [1, 2, 3, 4]


def test_resume_latest_with_nothing_to_resume_says_so_and_keeps_the_earlier_log(tmp_path, capsys):
    folder = tmp_path / "killed_early"
    folder.mkdir()
    earlier = '{"step": 1, "tasks": ["digits"], "loss": 2.0}\n'
    (folder / "train_log.jsonl").write_text(earlier)  # a run killed before its first checkpoint
    train(load_config(QUICKSTART, short_run_overrides(folder, 2, TRAIN + ["train.resume=latest"])))
    out = capsys.readouterr().out
    assert f"train.resume=latest: no checkpoint in {folder / 'checkpoints'}; starting from step 0" in out
    kept = [p for p in folder.glob("train_log.*.jsonl")]
    assert len(kept) == 1 and kept[0].read_text() == earlier and f"was kept as {kept[0].name}" in out
    assert [r["step"] for r in read_losses(folder)] == [1, 2]


def test_overwrite_and_resume_together_are_refused():
    with pytest.raises(ConfigError, match=r"train.overwrite: true would clear the run train.resume='latest'"):
        load_config(QUICKSTART, ["train.overwrite=true", "train.resume=latest"])


def test_tensorboard_gets_every_tasks_loss_at_every_log_step(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    folder = tmp_path / "logged"
    # three task groups in rotation (mnist+mnist_parity joint, digits, animals): every 3rd step draws the same group
    train(load_config(QUICKSTART, short_run_overrides(folder, 6, ["logging.trackers=[tensorboard]",
                                                                  "logging.log_every=3"])))
    events = EventAccumulator(str(folder / "moebsr")).Reload()
    tags = set(events.Tags()["scalars"])
    for tag in ["mnist/loss", "mnist_parity/loss", "digits/loss", "animals/loss", "loss", "aux_loss", "lr",
                "images_per_s"]:
        assert [event.step for event in events.Scalars(tag)] == [3, 6], tag
    losses = read_losses(folder)
    digits = [r["digits/loss"] for r in losses[:3] if "digits/loss" in r]
    assert events.Scalars("digits/loss")[0].value == pytest.approx(sum(digits) / len(digits), rel=1e-6)
    assert {"mnist/top1", "digits/top1"} <= tags  # the final evaluation
