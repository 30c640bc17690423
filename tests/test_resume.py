"""Resume continues exactly; checkpoints are complete or ignored; corrupt ones are refused with a reason."""

import shutil

import pytest
from run_helpers import QUICKSTART, short_run_overrides

from moebsr.config import load_config
from moebsr.training.checkpoint import CheckpointError, list_checkpoints, resolve_resume
from moebsr.training.export import load_exported_model
from moebsr.training.loop import train

TRAIN = ["logging.trackers=[none]", "train.keep_checkpoints=5"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    output = tmp_path_factory.mktemp("uninterrupted")
    config = load_config(QUICKSTART, short_run_overrides(output, 8, TRAIN + ["train.checkpoint_every=4"]))
    return train(config)


def test_losses_after_resume_equal_an_uninterrupted_run(uninterrupted, tmp_path):
    checkpoint = tmp_path / "saved"
    shutil.copytree(uninterrupted.output_dir / "checkpoints" / "step_00000004", checkpoint)
    resumed = train(load_config(QUICKSTART, short_run_overrides(tmp_path / "resumed", 8,
                                                                TRAIN + [f"train.resume={checkpoint}"])))
    assert [r["step"] for r in resumed.losses] == [5, 6, 7, 8]
    expected = uninterrupted.losses[4:]
    assert [r["tasks"] for r in resumed.losses] == [r["tasks"] for r in expected]
    assert [r["loss"] for r in resumed.losses] == [r["loss"] for r in expected]  # bit-identical
    assert resumed.metrics == uninterrupted.metrics


def test_resuming_with_another_schedule_is_refused_before_anything_is_written(uninterrupted, tmp_path):
    """A run of 8 steps resumed with train.steps=30 was accepted without a word: the cosine is laid over 8 steps and
    the scheduler restored with the checkpoint, so the new length jumped to another point of it (train.lr was
    silently ignored, the scheduler keeping the saved one)."""
    run = tmp_path / "run"
    shutil.copytree(uninterrupted.output_dir, run)
    before = {path: path.stat().st_mtime_ns for path in run.rglob("*")}
    for overrides, message in (
            (["train.steps=30"], r"train.steps=30 \(the checkpoint's run: 8\)"),
            (["train.steps=30", "train.lr=0.01"], r"train.steps=30 \(the checkpoint's run: 8\), train.lr=0.01 "
                                                  r"\(the checkpoint's run: 0.001\)")):
        config = load_config(QUICKSTART, short_run_overrides(run, 8, TRAIN + ["train.resume=latest", *overrides]))
        with pytest.raises(CheckpointError, match=rf"^train.resume: {message}; the learning-rate schedule is laid "
                                                  r"over these and restored with the checkpoint; accepted: the "
                                                  r"checkpoint's values to continue it, or a new train.output_dir"):
            train(config)
    assert {path: path.stat().st_mtime_ns for path in run.rglob("*")} == before  # nothing written, nothing lost


def test_resume_latest_skips_a_half_written_checkpoint(uninterrupted, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(uninterrupted.output_dir / "checkpoints", run / "checkpoints")
    (run / "checkpoints" / ".tmp-step_00000012").mkdir()  # killed mid-save: never renamed into place
    shutil.copytree(run / "checkpoints" / "step_00000004", run / "checkpoints" / "step_00000010")
    (run / "checkpoints" / "step_00000010" / "training_state.json").unlink()  # incomplete
    assert [p.name for p in list_checkpoints(run)] == ["step_00000004", "step_00000008"]
    assert resolve_resume("latest", run).name == "step_00000008"
    assert resolve_resume("latest", tmp_path / "fresh") is None


def test_a_truncated_checkpoint_is_refused_and_left_in_place(uninterrupted, tmp_path):
    checkpoint = tmp_path / "broken"
    shutil.copytree(uninterrupted.output_dir / "checkpoints" / "step_00000004", checkpoint)
    weights = checkpoint / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    config = load_config(QUICKSTART, short_run_overrides(tmp_path / "again", 8, TRAIN + [f"train.resume={checkpoint}"]))
    with pytest.raises(CheckpointError, match=r"checkpoint .*broken: cannot be loaded"):
        train(config)
    assert weights.stat().st_size == 1000 and (checkpoint / "training_state.json").is_file()


def test_a_checkpoint_of_another_model_config_is_refused(uninterrupted, tmp_path):
    with pytest.raises(CheckpointError, match="does not match the model config"):
        load_exported_model(uninterrupted.output_dir, heads={"mnist": 10, "mnist_parity": 2, "digits": 10,
                                                             "animals": 10, "extra": 3})
    with pytest.raises(CheckpointError, match="train.resume: no checkpoint folder at"):
        resolve_resume(str(tmp_path / "missing"), tmp_path)


def test_the_exported_model_reloads_with_equal_weights(uninterrupted):
    import torch
    from safetensors.torch import load_file
    model, config, document = load_exported_model(uninterrupted.output_dir)
    saved = load_file(str(uninterrupted.output_dir / "model.safetensors"))
    assert all(torch.equal(value, saved[name]) for name, value in model.state_dict().items())
    assert document["task_outputs"] == {"mnist": 10, "mnist_parity": 2, "digits": 10, "animals": 10}


def test_resume_with_task_adapters_equals_an_uninterrupted_run(tmp_path):
    adapters = TRAIN + ["adapters.enabled=true", "adapters.blocks=[2,3]", "train.lr=3e-3"]
    whole = train(load_config(QUICKSTART, short_run_overrides(tmp_path / "whole", 6,
                                                              adapters + ["train.checkpoint_every=3"])))
    resumed = train(load_config(QUICKSTART, short_run_overrides(
        tmp_path / "resumed", 6, adapters + [f"train.resume={whole.output_dir / 'checkpoints' / 'step_00000003'}"])))
    assert [r["loss"] for r in resumed.losses] == [r["loss"] for r in whole.losses[3:]]  # bit-identical
    assert resumed.metrics == whole.metrics
    model, _, _ = load_exported_model(whole.output_dir)
    trained = {name: p for name, p in model.named_parameters() if ".lora_B." in name}
    assert trained and all(p.abs().sum() > 0 for p in trained.values())  # every task's adapter trained
