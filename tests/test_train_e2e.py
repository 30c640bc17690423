"""The real entry point through ``accelerate launch``, then ``moebsr eval`` on what it saved."""

import json
import re
import subprocess
import sys

from run_helpers import QUICKSTART, REPO, VENV_BIN, read_losses, short_run_overrides, subprocess_env


def test_accelerate_launch_trains_saves_and_evaluates(tmp_path):
    output = tmp_path / "run"
    command = [str(VENV_BIN / "accelerate"), "launch", "--num_processes", "1", "--mixed_precision", "no",
               "--dynamo_backend", "no", str(REPO / "launch" / "multitask.py"), "--config", str(QUICKSTART),
               *short_run_overrides(output, 40, ["train.lr=2e-3", "train.checkpoint_every=20"])]
    result = subprocess.run(command, cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]

    losses = read_losses(output)
    assert [record["step"] for record in losses] == list(range(1, 41))
    first, last = losses[:8], losses[-8:]
    assert sum(r["loss"] for r in last) < 0.9 * sum(r["loss"] for r in first)  # it learns

    for name in ("config.yaml", "config.json", "model.safetensors", "README.md", "metrics.json"):
        assert (output / name).is_file(), name
    assert sorted(p.name for p in (output / "checkpoints").iterdir()) == ["step_00000020", "step_00000040"]
    assert list(output.rglob("events.out.tfevents.*")), "tensorboard logs"
    metrics = json.loads((output / "metrics.json").read_text())["metrics"]
    assert set(metrics) == {"mnist", "mnist_parity", "digits", "animals"}
    assert all(values["examples"] == 160 and 0 <= values["top1"] <= 1 for values in metrics.values())
    assert "| mnist | 10 |" in (output / "README.md").read_text()

    evaluated = subprocess.run([sys.executable, "-m", "moebsr.cli", "eval", "--run", str(output),
                                "--max-examples", "160", "--json"],
                               env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    report = json.loads(evaluated.stdout.strip().splitlines()[-1])
    for task, values in metrics.items():
        for name, value in values.items():
            assert abs(report["metrics"][task][name] - value) < 1e-6, (task, name)

    bad = subprocess.run([sys.executable, "-m", "moebsr.cli", "eval", "--run", str(output), "--task", "cifar10"],
                         env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        "error: --task: unknown task 'cifar10'; this run has: mnist, mnist_parity, digits, animals"]

    picture = tmp_path / "tokens.png"
    drawn = subprocess.run([sys.executable, "-m", "moebsr", "tokens", "--run", str(output), "--task", "digits",
                            "--images", "3", "--out", str(picture)],
                           env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert drawn.returncode == 0, drawn.stderr[-2000:]
    # depth 4: dropping at blocks 0, 1, 2, keeping 50 % of the tokens each time (the fused token is no patch)
    line = rf"wrote {re.escape(str(picture))} \(patches kept: block 0 (\d+)%, block 1 (\d+)%, block 2 (\d+)%\)"
    kept = re.search(line, drawn.stdout)
    assert kept and int(kept[1]) == 50 and 19 <= int(kept[2]) <= 31 and int(kept[3]) < int(kept[2]), drawn.stdout
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and picture.stat().st_size > 10_000
