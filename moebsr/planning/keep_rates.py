"""``moebsr plan --keep-rates``: where tokens drop is priced by cost and decided by the user's own validation data.

The Fisher potential prices what training a unit can gain, not what dropping a token loses: no single score ranks
"train more units on fewer tokens" against "train fewer units on every token". So each keep rate (at the config's
dropping blocks; 1 drops nothing) gets its own plan, its costs measured and its units scored with that dropping in
place, all against the same budget (relative budgets stay relative to full fine-tuning of the config as given).
Then each plan trains for ``validate_steps`` steps on a held-out share of every task's training data (the config's
own recipe, its schedule shortened to that many steps) and the plan whose mean headline metric on that share is
best is written. What that costs (``validate_steps`` steps per keep rate) is in the report and the printout.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

from ..config import RunConfig, load_config
from ..model.spec import check_keep_rate
from .budget import COST_KEYS, Budget, PlanError

VALIDATION_FRACTION = 0.15  # of each task's training examples, held out to compare the keep rates' plans on


def check_keep_rates(config: RunConfig, keep_rates: list[float], validate_steps: Optional[int], depth: int
                     ) -> list[float]:
    """The distinct keep rates, in the order given, each checked; refused in one line before anything runs."""
    rates = []
    for value in keep_rates:
        try:
            rate = check_keep_rate(value, "--keep-rates")
        except ValueError as error:
            raise PlanError(str(error)) from None
        if rate not in rates:
            rates.append(rate)
    if not config.token_drop.resolve_blocks(depth):
        raise PlanError("--keep-rates: token_drop.blocks is [] (no block drops tokens); accepted: a config whose "
                        "token_drop.blocks names the dropping blocks (null: the paper's, scaled to depth)")
    if len(rates) > 1 and not validate_steps:
        raise PlanError(f"--keep-rates: {len(rates)} keep rates are compared by short runs on held-out data, but "
                        "--validate-steps is not set; accepted: --validate-steps N (N >= 1), or one keep rate")
    if len(rates) == 1 and validate_steps:
        raise PlanError(f"--validate-steps: {validate_steps} steps would compare one keep rate with nothing; accepted: "
                        "two or more --keep-rates, or no --validate-steps")
    return rates


def with_keep_rate(config: RunConfig, keep_rate: float) -> RunConfig:
    """``config`` dropping at ``keep_rate`` at its dropping blocks (1: dropping off, its other keys kept)."""
    changed = copy.deepcopy(config)
    changed.token_drop.keep_rate = keep_rate
    changed.token_drop.enabled = keep_rate < 1.0
    return changed


def validation_config(planned: RunConfig, steps: int, output_dir: Path) -> RunConfig:
    """``planned`` trained for ``steps`` steps (warm-up shortened in proportion, so the schedule still leaves it and
    decays) and evaluated on ``VALIDATION_FRACTION`` of every task's training data held out of training."""
    short = copy.deepcopy(planned)
    warmup = planned.train.warmup_steps * steps // planned.train.steps
    short.train.steps, short.train.warmup_steps = steps, min(warmup, steps - 1)
    short.train.output_dir, short.train.resume = str(output_dir), False
    short.train.checkpoint_every, short.eval.every, short.eval.split = 0, 0, "test"
    short.logging.trackers, short.logging.progress = ["none"], False
    for task in short.tasks:
        short.data.task_options[task] = {**short.data.task_options.get(task, {}),
                                         "validation_fraction": VALIDATION_FRACTION}
    return short


def check_validation_split(config: RunConfig) -> None:
    """Every task can hold out a validation share (one line naming the first that cannot), before any planning."""
    from ..errors import is_user_error
    from ..training.run_data import RunData
    try:
        RunData.from_config(validation_config(config, 1, Path(tempfile.gettempdir())), check_data=False)
    except Exception as error:  # a task factory without the option
        if not is_user_error(error):
            raise
        raise PlanError(f"--validate-steps: the tasks cannot all hold out a validation share of their training data "
                        f"({error}); accepted: tasks whose factory takes validation_fraction (the packaged ones), "
                        "or one keep rate") from None


def headline(data: Any, metrics: dict[str, dict[str, float]]) -> float:
    """Mean over tasks of each task's headline metric (its first), negated where lower is better."""
    values = []
    for name, task in data.tasks.items():
        metric = task.metrics[0]
        values.append(metrics[name][metric.name] * (1 if metric.higher_is_better else -1))
    return sum(values) / len(values)


def validate(config_path: Path, steps: int) -> tuple[dict[str, dict[str, float]], float, float]:
    """The written plan at ``config_path`` trained for ``steps`` steps: its held-out metrics, their headline mean and
    the seconds it took."""
    from ..training.loop import train
    from ..training.run_data import RunData
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="moebsr-plan-validate-") as folder:
        config = validation_config(load_config(config_path), steps, Path(folder) / "run")
        with contextlib.redirect_stdout(io.StringIO()):  # the run's recipe and metric tables: the report has them
            result = train(config)
        score = headline(RunData.from_config(config, check_data=False), result.metrics)
    return result.metrics, score, time.perf_counter() - started


def load_depth(config: RunConfig) -> int:
    """The configured model's depth, read off a weightless build."""
    import torch

    from ..training.build import model_from_config
    from ..training.run_data import RunData
    counted = copy.deepcopy(config)
    counted.model.pretrained, counted.model.checkpoint = False, None
    with torch.device("meta"):
        return model_from_config(counted, RunData.from_config(config, check_data=False).heads()).depth


def candidate_path(out: Path, keep_rate: float) -> Path:
    return out.with_name(f"{out.stem}.keep{keep_rate:g}{out.suffix}")


def plan_keep_rates(config: RunConfig, budget: Budget, batches: int, out: Path, keep_rates: list[float],
                    validate_steps: Optional[int], levers: str = "config", accumulate: bool = False
                    ) -> dict[str, Any]:
    """One plan per keep rate (``<out>.keep<r>.yaml`` and its report and frontier beside it), each trained
    ``validate_steps`` steps on held-out data when there are several; the best is written to ``out`` too. Returns
    the chosen plan's report with every keep rate's plan, cost, score and validation figures."""
    from ..training.build import check_config_against_model
    from .plan import TIMED_STEPS, cost_model_for, measure_costs, run_plan
    from .plan import _step_tasks as step_tasks
    timed = budget.kind == "step"
    depth = load_depth(config)
    rates = check_keep_rates(config, keep_rates, validate_steps, depth)
    variants = {rate: with_keep_rate(config, rate) for rate in rates}
    for variant in variants.values():
        check_config_against_model(variant)
    if len(rates) > 1:
        check_validation_split(config)
    data, costs = measure_costs(config, timed=timed)  # the config as given: what relative budgets are of
    reports: dict[float, dict[str, Any]] = {}
    refused: dict[float, str] = {}
    for rate, variant in variants.items():
        if variant.token_drop == config.token_drop:
            measured = (data, costs)
        else:
            measured = (data, cost_model_for(variant, data.task_outputs(), step_tasks(variant, data),
                                             TIMED_STEPS if timed else 0))
        try:
            reports[rate] = run_plan(variant, budget, batches, candidate_path(out, rate), measured=measured,
                                     levers=levers, accumulate=accumulate, reference=costs.full)
        except PlanError as error:  # below this keep rate's cheapest plan: another may fit
            refused[rate] = str(error)
    if not reports:
        raise PlanError(next(iter(refused.values())))
    validated: dict[float, tuple[dict[str, dict[str, float]], float, float]] = {}
    if len(reports) > 1:
        validated = {rate: validate(candidate_path(out, rate), validate_steps) for rate in reports}

    def rank(rate: float) -> tuple:  # best held-out metric, then the cheaper plan, then the rate listed first
        held_out = validated[rate][1] if validated else 0.0
        return held_out, -reports[rate]["predicted"][COST_KEYS[budget.kind]], -rates.index(rate)

    chosen = max(reports, key=rank)
    report = dict(reports[chosen])
    report["keep_rate"] = chosen
    report["validate_steps"] = validate_steps if validated else 0
    report["validation_fraction"] = VALIDATION_FRACTION if validated else 0.0
    report["validation_seconds"] = sum(seconds for _, _, seconds in validated.values())
    report["keep_rate_options"] = [
        dict(keep_rate=rate, config=candidate_path(out, rate).name, plan=reports[rate]["plan"],
             score=reports[rate]["score"], predicted=reports[rate]["predicted"],
             measure_seconds=reports[rate]["measure_seconds"], importance_seconds=reports[rate]["importance_seconds"],
             validation=validated[rate][0] if validated else None,
             validation_headline=validated[rate][1] if validated else None) for rate in reports]
    report["keep_rates_refused"] = {f"{rate:g}": message for rate, message in refused.items()}
    report["keep_rates_planning"] = dict(  # what every keep rate's planning cost together, short runs apart
        measured_steps=sum(option["measured_steps"] for option in reports.values()),
        measure_seconds=sum(option["measure_seconds"] for option in reports.values()),
        importance_seconds=sum(option["importance_seconds"] for option in reports.values()))
    chosen_path = candidate_path(out, chosen)
    shutil.copyfile(chosen_path, out)  # the same folder: its relative paths stay valid
    for suffix in (".frontier.png",):
        if chosen_path.with_suffix(suffix).is_file():
            shutil.copyfile(chosen_path.with_suffix(suffix), out.with_suffix(suffix))
    out.with_suffix(".plan.json").write_text(json.dumps(report, indent=2))
    return report


def format_keep_rates(report: dict[str, Any]) -> str:
    """A line per keep rate: its plan, predicted cost and held-out headline metric; the chosen one marked."""
    kind = report["budget_kind"]
    ratio = f"{kind}_ratio"
    spent = report["keep_rates_planning"]
    lines = [f"keep rates: planned in {spent['measured_steps']} measured steps ({spent['measure_seconds']:.1f} s) and "
             f"scoring ({spent['importance_seconds']:.1f} s); short runs of {report['validate_steps']} steps on a "
             f"{report['validation_fraction']:g} held-out share of each task's training data, "
             f"{report['validation_seconds']:.1f} s:"]
    for option in report["keep_rate_options"]:
        held_out = "" if option["validation_headline"] is None else f", held-out {option['validation_headline']:.4f}"
        mark = "  <- written" if option["keep_rate"] == report["keep_rate"] else ""
        lines.append(f"  {option['keep_rate']:g}: {option['plan']} ({option['predicted'][ratio]:.3f}x {kind}, "
                     f"importance {option['score']:.3f}{held_out}) -> {option['config']}{mark}")
    for rate, message in report["keep_rates_refused"].items():
        lines.append(f"  {rate}: no plan fits ({message})")
    return "\n".join(lines)
