"""What a run says about itself: the model card, and `eval --keep-rate` on a run trained without dropping."""

import re

from run_helpers import REPO, short_run_overrides

from moebsr.config import load_config
from moebsr.training.evaluate import evaluate_run
from moebsr.training.loop import train

FULL = REPO / "configs" / "quickstart_full.yaml"


def test_card_names_explicit_blocks_prints_counts_and_dashes_and_eval_keep_rate_says_where_it_drops(tmp_path, capsys):
    output = tmp_path / "explicit"
    train(load_config(FULL, short_run_overrides(output, 2, ["logging.trackers=[none]", "bsr.preset=paper",
                                                            "bsr.trainable_blocks=[2,3]"])))
    started = capsys.readouterr().out  # the recipe block printed at start
    trains = ("  trains            blocks [2, 3] (`bsr.trainable_blocks`; attn, mlp, router, norm) · "
              "final norm and heads")
    assert trains in started
    assert "  token dropping    off" in started and "  MoE               blocks [0, 2, 3] · 4 experts, top-2" in started
    assert "  tasks             mnist (10 outputs, 4,000 train) · mnist_parity (2 outputs" in started
    card = (output / "README.md").read_text()
    assert "- trainable blocks: [2, 3] (`bsr.trainable_blocks`)" in card and "preset `paper`" not in card
    digits_row = next(line for line in card.splitlines() if line.startswith("| digits |"))
    cells = [cell.strip() for cell in digits_row.strip("|").split("|")]
    assert cells[2] == "160" and cells[-1] == "-"  # examples, then top5 (digits has no top-5): as the console shows
    assert "nan" not in card and "160.0000" not in card
    evaluate_run(str(output), tasks=["digits"], keep_rate=0.5, max_examples=80)
    said = capsys.readouterr().err
    assert re.search(r"--keep-rate 0.5: this run trained without token dropping; it now drops at blocks \[0, 1, 2\] "
                     r"\(the paper's 3/6/9 scaled to depth 4\), keeping 0.5 of the tokens at each", said), said


def test_moebsr_train_from_another_folder_finds_the_configs_own_files(tmp_path):
    """The shipped config names its backbone relative to itself; the output folder is relative to the cwd."""
    import subprocess
    import sys

    from run_helpers import subprocess_env
    command = [sys.executable, "-m", "moebsr", "train", "--config", str(REPO / "configs" / "quickstart.yaml"),
               "train.steps=2", "train.warmup_steps=1", "train.batch_size=8", "eval.max_examples=32",
               "logging.trackers=[none]", "logging.progress=false", "train.output_dir=elsewhere_run"]
    result = subprocess.run(command, cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"weights {REPO / 'backbones' / 'formula_vit_6x128_28px.safetensors'}" in result.stdout
    assert (tmp_path / "elsewhere_run" / "metrics.json").is_file()


def test_class_names_reach_the_export_the_card_and_eval(tmp_path, capsys):
    import json

    from PIL import Image

    from moebsr.cli import main as moebsr
    for label, name in enumerate(["cat", "dog", "owl"]):
        (tmp_path / "pics" / name).mkdir(parents=True)
        for index in range(6):
            Image.new("RGB", (12, 12), (80 * label, 40 * index, 0)).save(tmp_path / "pics" / name / f"{index}.png")
    output = tmp_path / "folder_run"
    train(load_config(FULL, short_run_overrides(output, 2, [
        "logging.trackers=[none]", "tasks=[imagefolder]", f"data.task_options.imagefolder.data_dir={tmp_path / 'pics'}",
        "train.sampler=round_robin", "train.batch_size=4"])))
    assert json.loads((output / "config.json").read_text())["class_names"] == {"imagefolder": ["cat", "dog", "owl"]}
    assert "Classes of `imagefolder`: cat, dog, owl" in (output / "README.md").read_text()
    capsys.readouterr()
    assert moebsr(["eval", "--run", str(output)]) == 0
    assert "classes of imagefolder: cat, dog, owl" in capsys.readouterr().out
    assert moebsr(["eval", "--run", str(output), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["class_names"] == {"imagefolder": ["cat", "dog", "owl"]}
