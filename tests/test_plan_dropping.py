"""moebsr plan --keep-rates/--drop-blocks/--expert-ranks: one plan per candidate, compared by short runs on held-out
training data."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from moebsr.config import load_config
from moebsr.planning.candidates import VALIDATION_FRACTION, validate, validation_config

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "configs" / "quickstart.yaml"
SMALL = ["model.checkpoint=null", "model.depth=4", "model.embed_dim=64", "model.num_heads=2", "moe.num_experts=4"]


def _plan(tmp_path, *args, overrides=()):
    return subprocess.run([sys.executable, "-m", "moebsr", "plan", "--config", str(QUICKSTART), "train.batch_size=8",
                           *overrides, "--batches", "1", *args, "--out", str(tmp_path / "p.yaml")],
                          cwd=ROOT, capture_output=True, text=True)


def test_each_dropping_is_planned_validated_on_held_out_data_and_the_best_written(tmp_path):
    """On a 4-block model dropping at (0, 1, 2): no dropping, and 0.5 there and at later blocks (1, 2): three plans,
    three short runs."""
    done = _plan(tmp_path, "--budget", "memory=0.3x", "--levers", "config", "--keep-rates", "1", "0.5",
                 "--drop-blocks", "0,1,2", "1,2", "--validate-steps", "3", overrides=SMALL)
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "p.plan.json").read_text())
    options = {(option["keep_rate"], tuple(option["drop_blocks"])): option for option in report["candidate_options"]}
    assert list(options) == [(1.0, ()), (0.5, (0, 1, 2)), (0.5, (1, 2))] and report["validate_steps"] == 3
    assert [option["config"] for option in options.values()] == ["p.keep1.yaml", "p.keep0.5.drop0-1-2.yaml",
                                                                 "p.keep0.5.drop1-2.yaml"]
    assert report["validation_fraction"] == VALIDATION_FRACTION and report["validation_seconds"] > 0
    own = {}
    for (rate, blocks), option in options.items():
        written = load_config(tmp_path / option["config"])
        assert written.token_drop.enabled == (rate < 1)
        assert rate == 1 or (written.token_drop.keep_rate, tuple(written.token_drop.blocks)) == (rate, blocks)
        assert option["predicted"]["memory_bytes"] <= report["budget_value"]
        tasks = set(option["validation"])
        assert tasks == {"mnist", "mnist_parity", "digits", "animals"}
        mean_top1 = sum(option["validation"][task]["top1"] for task in tasks) / len(tasks)
        assert option["validation_headline"] == pytest.approx(mean_top1)
        own[rate, blocks] = json.loads((tmp_path / option["config"]).with_suffix(".plan.json").read_text())
        assert own[rate, blocks]["plan"] == option["plan"] and own[rate, blocks]["predicted"] == option["predicted"]
    # all against full fine-tuning of the config as given (it drops at 0.5): one reference, one budget
    assert len({json.dumps(plan["full_finetuning"]) for plan in own.values()}) == 1
    # each measured with its own dropping: the same units (the paper preset) save more the later tokens drop
    saved = [plan["presets"]["paper"]["saved_bytes"] for plan in own.values()]
    assert saved[0] > saved[2] > saved[1], saved
    best = max(options.values(), key=lambda option: (option["validation_headline"],
                                                     -option["predicted"]["memory_bytes"]))
    assert (report["keep_rate"], report["drop_blocks"]) == (best["keep_rate"], best["drop_blocks"])
    assert (tmp_path / "p.yaml").read_text() == (tmp_path / best["config"]).read_text()
    assert report["plan"] == best["plan"]
    assert f"-> {best['config']}  <- written" in done.stdout and "candidates: planned in " in done.stdout
    # the same short run again gives the same held-out figures (seeded, one thread here)
    metrics, headline, _ = validate(tmp_path / best["config"], 3)
    assert metrics == best["validation"] and headline == best["validation_headline"]


def test_expert_ranks_are_candidates_each_measured_with_its_own_experts(tmp_path):
    """Whole-copy experts against rank-2 deltas (moe.expert_rank), at the config's dropping: two plans, each costed
    on its own model, the better held-out one written."""
    done = _plan(tmp_path, "--budget", "memory=0.3x", "--levers", "config", "--expert-ranks", "full", "2",
                 "--validate-steps", "2", overrides=SMALL)
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "p.plan.json").read_text())
    options = report["candidate_options"]
    assert [(option["expert_rank"], option["config"]) for option in options] == [
        (None, "p.keep0.5.rankfull.yaml"), (2, "p.keep0.5.rank2.yaml")]
    assert [load_config(tmp_path / option["config"]).moe.expert_rank for option in options] == [None, 2]
    own = [json.loads((tmp_path / option["config"]).with_suffix(".plan.json").read_text()) for option in options]
    # the same preset trains far fewer numbers with rank-2 experts: less memory, measured on each model
    paper = [plan["presets"]["paper"]["memory_bytes"] for plan in own]
    assert paper[1] < 0.8 * paper[0], paper
    assert all(option["predicted"]["memory_bytes"] <= report["budget_value"] for option in options)
    best = max(options, key=lambda option: (option["validation_headline"], -option["predicted"]["memory_bytes"]))
    assert report["expert_rank"] == best["expert_rank"] and report["plan"] == best["plan"]
    assert (tmp_path / "p.yaml").read_text() == (tmp_path / best["config"]).read_text()
    assert f"rank-2 experts: {options[1]['plan']}" in done.stdout and "whole experts: " in done.stdout


def test_the_short_run_holds_out_a_share_of_training_data_and_shortens_its_schedule(tmp_path):
    from moebsr.training.run_data import RunData
    planned = load_config(QUICKSTART)  # 1,200 steps, 60 of warm-up
    short = validation_config(planned, 100, tmp_path / "run")
    assert (short.train.steps, short.train.warmup_steps) == (100, 5)
    assert validation_config(planned, 1, tmp_path).train.warmup_steps == 0
    assert short.eval.split == "test" and short.train.checkpoint_every == 0 and short.logging.trackers == ["none"]
    assert planned.data.task_options == {} and planned.train.steps == 1200  # the plan itself is left alone
    given, held = (RunData.from_config(config, check_data=False).tasks["digits"] for config in (planned, short))
    train, validation = held.build_dataset("train"), held.build_dataset("test")
    full_train = given.build_dataset("train")
    assert len(validation) == pytest.approx(VALIDATION_FRACTION * len(full_train), abs=10)
    assert len(train) + len(validation) == len(full_train)


@pytest.mark.parametrize("args, message", [
    (["--keep-rates", "0", "0.5", "--validate-steps", "2"],
     "--keep-rates: 0.0 is invalid; accepted: a number in (0, 1]"),
    (["--keep-rates", "1.5"], "--keep-rates: 1.5 is invalid; accepted: a number in (0, 1]"),
    (["--drop-blocks", "1,3", "2,9", "--validate-steps", "2"],
     "--drop-blocks: block index 9 out of range; accepted: 0..5 (depth 6)"),
    (["--drop-blocks", "1;3"],
     "moebsr plan: argument --drop-blocks: '1;3' is invalid; accepted: comma-separated block indices, e.g. 3,6,9"),
    (["--keep-rates", "1", "0.5"], "--keep-rates/--drop-blocks/--expert-ranks: 2 candidates are compared by short "
                                   "runs on held-out data, but --validate-steps is not set; accepted: --validate-steps "
                                   "N (N >= 1), or one keep rate at one set of blocks with one expert rank"),
    (["--keep-rates", "0.5", "--validate-steps", "4"], "--validate-steps: 4 steps would compare one candidate with "
                                                       "nothing; accepted: two or more --keep-rates, --drop-blocks or "
                                                       "--expert-ranks, or no --validate-steps"),
    (["--validate-steps", "4"], "--validate-steps: 4 steps of what? it compares the plans of several candidates; "
                                "accepted: --keep-rates R1 R2 ..., --drop-blocks B1,B2 ... or --expert-ranks R1 R2 ... "
                                "with it, or no --validate-steps"),
    (["--expert-ranks", "full", "0", "--validate-steps", "2"],
     "--expert-ranks: '0' is invalid; accepted: full (whole-copy experts) or an integer >= 1 (rank-r deltas of the "
     "upcycled MLP)"),
    (["moe.blocks=[]", "--expert-ranks", "4"],
     "--expert-ranks: 4 would change no expert: the config has no MoE block (moe.blocks: []); accepted: a config "
     "with MoE blocks, or no --expert-ranks"),
])
def test_bad_dropping_requests_are_one_line_and_write_nothing(tmp_path, capsys, args, message):
    from moebsr.cli import main
    argv = ["plan", "--config", str(QUICKSTART), "--budget", "memory=0.3x", *args, "--out", str(tmp_path / "p.yaml")]
    try:
        code = main(argv)
    except SystemExit as exit:  # argparse's own refusal
        code = exit.code
    assert code == 2 and capsys.readouterr().err == f"error: {message}\n"
    assert not list(tmp_path.iterdir())


def test_keep_rates_need_blocks_that_drop_tokens(tmp_path, capsys):
    from moebsr.cli import main
    assert main(["plan", "--config", str(QUICKSTART), "token_drop.blocks=[]", "--budget", "memory=0.3x",
                 "--keep-rates", "0.5", "--out", str(tmp_path / "p.yaml")]) == 2
    assert capsys.readouterr().err.startswith("error: --keep-rates: 0.5 drops tokens, but token_drop.blocks is [] "
                                              "(no block drops them); accepted: --drop-blocks B1,B2,..., or ")
    assert not list(tmp_path.iterdir())


def test_a_keep_rate_whose_cheapest_plan_exceeds_the_budget_is_left_out_and_said_so(tmp_path):
    """A budget between the heads-only plans of dropping at 0.5 and of not dropping: only 0.5 is planned (nothing
    is left to compare, so nothing is validated) and the printout says why 1 is not."""
    from moebsr.planning.candidates import Candidate, with_candidate
    from moebsr.planning.plan import _step_tasks, cost_model_for, measure_costs
    smaller = [*SMALL, "model.depth=3"]
    config = load_config(QUICKSTART, ["train.batch_size=8", *smaller])
    data, dropping = measure_costs(config)
    every_token = with_candidate(config, Candidate(1.0, ()))
    not_dropping = cost_model_for(every_token, data.task_outputs(), _step_tasks(every_token, data))
    low, high = dropping.predict(()).memory_bytes, not_dropping.predict(()).memory_bytes
    assert low < high
    done = _plan(tmp_path, "--budget", f"memory={(low + high) / 2:.0f}B", "--levers", "config", "--keep-rates", "1",
                 "0.5", "--validate-steps", "2", overrides=smaller)
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "p.plan.json").read_text())
    assert [option["keep_rate"] for option in report["candidate_options"]] == [0.5] and report["keep_rate"] == 0.5
    assert list(report["candidates_refused"]) == ["no dropping"]
    assert "below the cheapest plan" in report["candidates_refused"]["no dropping"]
    assert report["validate_steps"] == 0 and report["candidate_options"][0]["validation"] is None
    assert not (tmp_path / "p.keep1.yaml").exists()
    assert (tmp_path / "p.yaml").read_text() == (tmp_path / "p.keep0.5.yaml").read_text()
    assert "  no dropping: no plan fits (--budget: " in done.stdout
