"""``moebsr export`` end to end: the real entry point on a run folder, what the folder holds, and the bad inputs."""

import json
import subprocess
import sys

import pytest
from run_helpers import subprocess_env, write_untrained_run

from moebsr.cli import main


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return write_untrained_run(tmp_path_factory.mktemp("deploy") / "run")


def _cli(capsys, *argv):
    code = main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_export_prune_onnx_through_the_entry_point_then_eval_the_folder(run_dir, tmp_path):
    pytest.importorskip("onnxruntime", reason="the deploy extra is not installed (pip install -e '.[deploy]')")
    pytest.importorskip("onnxscript", reason="the deploy extra is not installed (pip install -e '.[deploy]')")
    out = tmp_path / "digits_onnx"
    command = [sys.executable, "-m", "moebsr", "export", "--run", str(run_dir), "--task", "digits", "--out", str(out),
               "--prune", "--threshold", "0.2", "--format", "onnx"]
    result = subprocess.run(command, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith(f"exported digits to {out}: block 0 ") and "(pruned: share 0.2)" in result.stdout
    assert "onnx: max abs logit diff vs PyTorch" in result.stdout and "reaching every kept expert" in result.stdout
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.onnx", "model.safetensors"]
    document = json.loads((out / "config.json").read_text())
    section = document["export"]
    assert document["config"]["tasks"] == ["digits"] and section["removed_tasks"] == ["digits_parity"]
    for block, experts in section["kept_experts"].items():  # the share rule, applied to what was measured
        shares = section["pruning"]["routing_mass"][block]["share"]
        above = [e for e, share in enumerate(shares) if share >= 0.2]
        assert experts == (above or [shares.index(max(shares))])
    assert section["pruning"]["calibration_images"] == 1438  # the whole training split of digits
    assert section["onnx"]["max_abs_diff"] < 1e-4 and section["onnx"]["reaches_every_kept_expert"]
    assert section["moe_parameters"]["task_model"] < section["moe_parameters"]["multitask"]
    card = (out / "README.md").read_text()
    assert card.startswith("# moebsr task model: digits") and "max abs logit difference of" in card
    evaluated = subprocess.run([sys.executable, "-m", "moebsr", "eval", "--run", str(out), "--json"],
                               env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    assert json.loads(evaluated.stdout.strip().splitlines()[-1])["metrics"] == document["metrics"]


def test_an_unpruned_export_scores_as_the_multitask_model_and_bad_input_is_one_line(run_dir, tmp_path, capsys):
    out = tmp_path / "digits"
    code, printed, _ = _cli(capsys, "export", "--run", run_dir, "--task", "digits", "--out", out, "--json")
    assert code == 0
    report = json.loads(printed)
    assert report["metrics"] == report["export"]["metrics_multitask"]  # the same function of the images
    assert report["metrics"]["examples"] == 359 and report["export"]["pruning"] is None
    saved = {p.name: p.read_bytes() for p in out.iterdir()}

    def refused(*argv, message):
        code, printed, error = _cli(capsys, "export", *argv)
        assert (code, printed, error.splitlines()) == (2, "", [f"error: {message}"])

    refused("--run", run_dir, "--task", "cifar10", "--out", tmp_path / "x",
            message="--task: unknown task 'cifar10'; this run has: digits, digits_parity")
    refused("--run", run_dir, "--task", "digits", "--out", tmp_path / "x", "--format", "tflite",
            message="--format: 'tflite' is invalid; accepted: safetensors, onnx")
    refused("--run", run_dir, "--task", "digits", "--out", out,
            message=f"--out: '{out}' holds another export (model.safetensors, config.json); accepted: a new folder, "
                    "or --overwrite to replace it")
    refused("--run", run_dir, "--task", "digits", "--out", run_dir,
            message=f"--out: '{run_dir}' is the run folder itself; accepted: another folder")
    refused("--run", tmp_path / "nowhere", "--task", "digits", "--out", tmp_path / "x",
            message=f"--run: '{tmp_path / 'nowhere'}' has no config.json; accepted: a run folder written by "
                    "launch/multitask.py (it holds config.json and model.safetensors)")
    refused("--run", run_dir, "--task", "digits", "--out", tmp_path / "x", "--threshold", "0.1",
            message="--criterion/--threshold/--calibration-examples: do nothing without --prune; accepted: add "
                    "--prune, or leave them out")
    refused("--run", out, "--task", "digits", "--out", tmp_path / "x",
            message=f"--run: '{out}' is an exported task model; accepted: the training run it was exported from "
                    f"({run_dir.resolve()})")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == saved  # nothing refused touched the export
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".*export-tmp"))

    # every MoE layer down to one expert: a plain timm ViT, also written in timm's layout
    code, printed, _ = _cli(capsys, "export", "--run", run_dir, "--task", "digits", "--out", out, "--overwrite",
                            "--prune", "--criterion", "coverage", "--threshold", "0")
    assert code == 0 and "block 0 dense (expert" in printed and "timm: backbone.safetensors loads with" in printed
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "backbone.safetensors", "config.json",
                                                     "model.safetensors"]
    card = (out / "README.md").read_text()
    assert "pretrained_cfg_overlay=dict(file='backbone.safetensors', num_classes=10)" in card
    assert "only with token dropping off" in card
    code, printed, _ = _cli(capsys, "eval", "--run", out, "--json")
    assert code == 0 and json.loads(printed)["metrics"] == json.loads((out / "config.json").read_text())["metrics"]


def test_a_budget_export_keeps_that_share_of_the_experts_heaviest_first(run_dir, tmp_path, capsys):
    out = tmp_path / "digits_budget"
    code, printed, _ = _cli(capsys, "export", "--run", run_dir, "--task", "digits", "--out", out, "--prune",
                            "--criterion", "budget", "--threshold", "0.5", "--json")
    assert code == 0
    section = json.loads(printed)["export"]
    kept, total = section["kept_experts"], sum(section["num_experts"].values())
    assert sum(len(experts) for experts in kept.values()) == total // 2 and all(kept.values())
    shares = {block: measured["share"] for block, measured in section["pruning"]["routing_mass"].items()}
    # beyond each layer's heaviest expert, every kept expert carries at least the share of every removed one
    extra = [shares[b][e] for b, experts in kept.items() for e in experts if e != shares[b].index(max(shares[b]))]
    removed = [share for b, experts in kept.items() for e, share in enumerate(shares[b]) if e not in experts]
    assert removed and min(extra, default=1.0) >= max(removed)
    assert section["moe_parameters"]["multitask"] / section["moe_parameters"]["task_model"] >= 2
    card = (out / "README.md").read_text()
    assert "0.5 of all experts, those with the most share of their layer's routing mass" in card


def test_onnx_without_the_deploy_extra_is_refused_in_one_line(run_dir, tmp_path, capsys, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *rest: None if name == "onnxruntime" else
                        find_spec(name, *rest))
    code, printed, error = _cli(capsys, "export", "--run", run_dir, "--task", "digits", "--out", tmp_path / "x",
                                "--format", "onnx")
    assert (code, printed, error) == (2, "", "error: --format onnx needs onnxruntime, not installed; accepted: pip "
                                             "install 'moebsr[deploy]', or --format safetensors\n")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("argv, message", [
    (["eval", "--run", "R", "--keep-rate", "0"], "moebsr eval: argument --keep-rate: 0.0 is invalid; accepted: a "
                                                 "number in (0, 1]"),
    (["eval", "--run", "R", "--batch-size", "0"], "moebsr eval: argument --batch-size: 0 is invalid; accepted: an "
                                                  "integer >= 1"),
    (["predict", "--run", "R", "x.png", "--keep-rate", "1.5"], "moebsr predict: argument --keep-rate: 1.5 is invalid; "
                                                               "accepted: a number in (0, 1]"),
    (["tokens", "--run", "R", "--out", "o.png", "--images", "-2"], "moebsr tokens: argument --images: -2 is invalid; "
                                                                    "accepted: an integer >= 1"),
    (["profile", "--config", "c.yaml", "--steps", "0"], "moebsr profile: argument --steps: 0 is invalid; accepted: an "
                                                         "integer >= 1"),
    (["profile", "--config", "c.yaml", "--steps", "ten"], "moebsr profile: argument --steps: 'ten' is invalid; "
                                                           "accepted: an integer >= 1"),
    (["profile", "--config", "c.yaml", "--warmup", "-1"], "moebsr profile: argument --warmup: -1 is invalid; "
                                                           "accepted: an integer >= 0"),
])
def test_a_bad_flag_value_is_one_line_naming_it_before_anything_runs(capsys, argv, message):
    """`moebsr eval --keep-rate 0` ended in a 19-line traceback and `moebsr profile --steps 0` in a StatisticsError."""
    with pytest.raises(SystemExit) as exited:
        main(argv)
    captured = capsys.readouterr()
    assert exited.value.code == 2 and (captured.out, captured.err) == ("", f"error: {message}\n")
