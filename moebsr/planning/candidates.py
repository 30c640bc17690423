"""``moebsr plan --keep-rates/--drop-blocks/--expert-ranks``: settings that change what the model computes (how
many tokens drop, and where; experts as whole copies or low-rank deltas) are priced by measured cost and decided by
the user's own held-out data.

The Fisher potential prices what training a unit can gain, not what dropping a token or a rank-r expert loses: no
single score ranks "train more units on fewer tokens" against "train fewer units on every token", or "more blocks
with low-rank experts" against "fewer with whole ones". So each candidate (a keep rate at a set of blocks, keep rate
1 dropping nothing; and an expert rank, ``full`` for whole copies) gets its own plan, its costs measured and its units
scored with that setting in place, all against the same budget (relative budgets stay relative to full fine-tuning
of the config as given). Then each plan trains for ``validate_steps`` steps on a held-out share of every task's
training data (the config's own recipe, its schedule shortened to that many steps, the same seed) and the plan whose
mean headline metric on that share is best is written. What that costs (``validate_steps`` steps per candidate) is
in the report and the printout.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from ..config import RunConfig, load_config
from ..model.spec import check_block_indices, check_keep_rate
from .budget import COST_KEYS, Budget, PlanError

VALIDATION_FRACTION = 0.15  # of each task's training examples, held out to compare the candidates' plans on
FULL_RANK = "full"  # --expert-ranks' name for whole-copy experts (moe.expert_rank: null)


@dataclass(frozen=True)
class Candidate:
    """A candidate setting: ``keep_rate`` at ``blocks`` (keep rate 1: no dropping, at no block), experts at
    ``expert_rank`` (``None``: whole copies; :mod:`moebsr.model.low_rank_experts`)."""

    keep_rate: float
    blocks: tuple[int, ...]
    expert_rank: Optional[int] = None

    def label(self, with_rank: bool = False) -> str:
        dropping = ("no dropping" if self.keep_rate == 1.0 else
                    f"keep {self.keep_rate:g} at blocks {','.join(map(str, self.blocks))}")
        if not with_rank:
            return dropping
        return f"{dropping}, {'whole' if self.expert_rank is None else f'rank-{self.expert_rank}'} experts"


def parse_expert_rank(text: str) -> Optional[int]:
    """``--expert-ranks`` values: ``full`` (whole-copy experts) or an integer >= 1, else one line."""
    if text == FULL_RANK:
        return None
    try:
        rank = int(text)
    except ValueError:
        rank = 0
    if rank < 1:
        raise PlanError(f"--expert-ranks: {text!r} is invalid; accepted: {FULL_RANK} (whole-copy experts) or an "
                        "integer >= 1 (rank-r deltas of the upcycled MLP)")
    return rank


def candidates_of(config: RunConfig, keep_rates: Optional[list[float]], drop_blocks: Optional[list[list[int]]],
                  validate_steps: Optional[int], depth: int, expert_ranks: Optional[list[str]] = None
                  ) -> list[Candidate]:
    """Every keep rate at every set of dropping blocks (default: the config's own) with every expert rank (default:
    the config's own), distinct, in the order given; refused in one line before anything runs."""
    rates = []
    for value in keep_rates if keep_rates is not None else [config.token_drop.keep_rate]:
        try:
            rates.append(check_keep_rate(value, "--keep-rates"))
        except ValueError as error:
            raise PlanError(str(error)) from None
    block_sets = []
    try:
        for blocks in drop_blocks if drop_blocks is not None else [config.token_drop.resolve_blocks(depth)]:
            block_sets.append(check_block_indices("--drop-blocks", list(blocks), depth))
    except ValueError as error:
        raise PlanError(str(error)) from None
    ranks = [parse_expert_rank(text) for text in expert_ranks] if expert_ranks is not None else [
        config.moe.expert_rank]
    if expert_ranks is not None and not config.moe.resolve_blocks(depth):
        raise PlanError(f"--expert-ranks: {' '.join(expert_ranks)} would change no expert: the config has no MoE "
                        "block (moe.blocks: []); accepted: a config with MoE blocks, or no --expert-ranks")
    candidates: list[Candidate] = []
    for rate in rates:
        for blocks in block_sets if rate < 1.0 else [()]:
            if not blocks and rate < 1.0:
                raise PlanError(f"--keep-rates: {rate:g} drops tokens, but token_drop.blocks is [] (no block drops "
                                "them); accepted: --drop-blocks B1,B2,..., or a config whose token_drop.blocks names "
                                "the dropping blocks (null: the paper's, scaled to depth)")
            for rank in ranks:
                if Candidate(rate, blocks, rank) not in candidates:
                    candidates.append(Candidate(rate, blocks, rank))
    if len(candidates) > 1 and not validate_steps:
        raise PlanError(f"--keep-rates/--drop-blocks/--expert-ranks: {len(candidates)} candidates are compared by "
                        "short runs on held-out data, but --validate-steps is not set; accepted: --validate-steps N "
                        "(N >= 1), or one keep rate at one set of blocks with one expert rank")
    if len(candidates) == 1 and validate_steps:
        raise PlanError(f"--validate-steps: {validate_steps} steps would compare one candidate with nothing; "
                        "accepted: two or more --keep-rates, --drop-blocks or --expert-ranks, or no --validate-steps")
    return candidates


def with_candidate(config: RunConfig, candidate: Candidate) -> RunConfig:
    """``config`` dropping as ``candidate`` says (keep rate 1: dropping off, the other keys kept), with its experts."""
    changed = copy.deepcopy(config)
    changed.token_drop.keep_rate = candidate.keep_rate
    changed.token_drop.enabled = candidate.keep_rate < 1.0
    if candidate.blocks:
        changed.token_drop.blocks = list(candidate.blocks)
    changed.moe.expert_rank = candidate.expert_rank
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
                        "or one candidate") from None


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


def candidate_path(out: Path, candidate: Candidate, name_blocks: bool, name_rank: bool) -> Path:
    """``P.keep<R>.yaml`` beside ``P``, with ``.drop<B1-B2>`` when several sets of blocks are compared and
    ``.rank<r>`` (``.rankfull``) when several expert ranks are."""
    blocks = f".drop{'-'.join(map(str, candidate.blocks))}" if name_blocks and candidate.blocks else ""
    rank = f".rank{FULL_RANK if candidate.expert_rank is None else candidate.expert_rank}" if name_rank else ""
    return out.with_name(f"{out.stem}.keep{candidate.keep_rate:g}{blocks}{rank}{out.suffix}")


def plan_candidates(config: RunConfig, budget: Budget, batches: int, out: Path, keep_rates: Optional[list[float]],
                    drop_blocks: Optional[list[list[int]]], validate_steps: Optional[int], levers: str = "config",
                    accumulate: bool = False, expert_ranks: Optional[list[str]] = None) -> dict[str, Any]:
    """One plan per candidate (every keep rate at every set of blocks with every expert rank;
    :func:`candidate_path`, with its report and frontier beside it), each trained ``validate_steps`` steps on held-out
    data when there are several; the best is written to ``out`` too. Returns the chosen plan's report with every
    candidate's plan, cost, score and validation figures."""
    from ..training.build import backbone_depth, check_config_against_model
    from .plan import TIMED_STEPS, cost_model_for, measure_costs, run_plan
    from .plan import _step_tasks as step_tasks
    timed = budget.kind == "step"
    candidates = candidates_of(config, keep_rates, drop_blocks, validate_steps, backbone_depth(config.model),
                               expert_ranks)
    name_blocks = drop_blocks is not None and len({tuple(blocks) for blocks in drop_blocks}) > 1
    name_rank = len({candidate.expert_rank for candidate in candidates}) > 1
    paths = {candidate: candidate_path(out, candidate, name_blocks, name_rank) for candidate in candidates}
    variants = {candidate: with_candidate(config, candidate) for candidate in candidates}
    for variant in variants.values():
        check_config_against_model(variant)
    if len(candidates) > 1:
        check_validation_split(config)
    data, costs = measure_costs(config, timed=timed)  # the config as given: what relative budgets are of
    reports: dict[Candidate, dict[str, Any]] = {}
    refused: dict[Candidate, str] = {}
    for candidate, variant in variants.items():
        if (variant.token_drop, variant.moe) == (config.token_drop, config.moe):
            measured = (data, costs)
        else:
            measured = (data, cost_model_for(variant, data.task_outputs(), step_tasks(variant, data),
                                             TIMED_STEPS if timed else 0))
        try:
            reports[candidate] = run_plan(variant, budget, batches, paths[candidate], measured=measured,
                                          levers=levers, accumulate=accumulate, reference=costs.full)
        except PlanError as error:  # below this candidate's cheapest plan: another may fit
            refused[candidate] = str(error)
    if not reports:
        raise PlanError(next(iter(refused.values())))
    validated: dict[Candidate, tuple[dict[str, dict[str, float]], float, float]] = {}
    if len(reports) > 1:
        validated = {candidate: validate(paths[candidate], validate_steps) for candidate in reports}

    def rank(candidate: Candidate) -> tuple:  # best held-out metric, then the cheaper plan, then the one listed first
        held_out = validated[candidate][1] if validated else 0.0
        return held_out, -reports[candidate]["predicted"][COST_KEYS[budget.kind]], -candidates.index(candidate)

    chosen = max(reports, key=rank)
    report = dict(reports[chosen])
    report["keep_rate"], report["drop_blocks"] = chosen.keep_rate, list(chosen.blocks)
    report["expert_rank"], report["expert_ranks_compared"] = chosen.expert_rank, name_rank
    report["validate_steps"] = validate_steps if validated else 0
    report["validation_fraction"] = VALIDATION_FRACTION if validated else 0.0
    report["validation_seconds"] = sum(seconds for _, _, seconds in validated.values())
    report["candidate_options"] = [
        dict(keep_rate=candidate.keep_rate, drop_blocks=list(candidate.blocks), expert_rank=candidate.expert_rank,
             config=paths[candidate].name, plan=reports[candidate]["plan"], score=reports[candidate]["score"],
             predicted=reports[candidate]["predicted"], measure_seconds=reports[candidate]["measure_seconds"],
             importance_seconds=reports[candidate]["importance_seconds"],
             validation=validated[candidate][0] if validated else None,
             validation_headline=validated[candidate][1] if validated else None) for candidate in reports]
    report["candidates_refused"] = {candidate.label(name_rank): message for candidate, message in refused.items()}
    report["candidate_planning"] = dict(  # what every candidate's planning cost together, short runs apart
        measured_steps=sum(option["measured_steps"] for option in reports.values()),
        measure_seconds=sum(option["measure_seconds"] for option in reports.values()),
        importance_seconds=sum(option["importance_seconds"] for option in reports.values()))
    shutil.copyfile(paths[chosen], out)  # the same folder: its relative paths stay valid
    if paths[chosen].with_suffix(".frontier.png").is_file():
        shutil.copyfile(paths[chosen].with_suffix(".frontier.png"), out.with_suffix(".frontier.png"))
    out.with_suffix(".plan.json").write_text(json.dumps(report, indent=2))
    return report


def format_candidates(report: dict[str, Any]) -> str:
    """A line per candidate: its plan, predicted cost and held-out headline metric; the written one marked."""
    kind = report["budget_kind"]
    ratio = f"{kind}_ratio"
    spent = report["candidate_planning"]
    lines = [f"candidates: planned in {spent['measured_steps']} measured steps ({spent['measure_seconds']:.1f} s) "
             f"and scoring ({spent['importance_seconds']:.1f} s); short runs of {report['validate_steps']} steps on "
             f"a {report['validation_fraction']:g} held-out share of each task's training data, "
             f"{report['validation_seconds']:.1f} s:"]
    chosen = (report["keep_rate"], report["drop_blocks"], report["expert_rank"])
    for option in report["candidate_options"]:
        candidate = Candidate(option["keep_rate"], tuple(option["drop_blocks"]), option["expert_rank"])
        held_out = "" if option["validation_headline"] is None else f", held-out {option['validation_headline']:.4f}"
        mark = "  <- written" if (option["keep_rate"], option["drop_blocks"], option["expert_rank"]) == chosen else ""
        lines.append(f"  {candidate.label(report['expert_ranks_compared'])}: {option['plan']} "
                     f"({option['predicted'][ratio]:.3f}x {kind}, importance {option['score']:.3f}{held_out}) -> "
                     f"{option['config']}{mark}")
    for label, message in report["candidates_refused"].items():
        lines.append(f"  {label}: no plan fits ({message})")
    return "\n".join(lines)
