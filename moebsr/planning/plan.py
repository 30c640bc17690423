"""``moebsr plan``: from a config, a budget and a few batches of every task, the config that trains the most
important units that fit (see :mod:`.costs`, :mod:`.importance`, :mod:`.search`).

Everything is decided before anything is written: an unreachable budget is one line naming the cheapest plan.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from ..config import BSRConfig, MoEConfig, RunConfig, save_config
from ..errors import importable
from ..model import MoEViT
from ..model.bsr import SUBLAYERS, ResolvedBSRPlan
from .budget import COST_KEYS, Budget, PlanError, format_amount
from .costs import (
    CostModel,
    PlanCost,
    Unit,
    held_bytes,
    hollow_parameters,
    measure_cost_model,
    plan_units,
    synthetic_step_measure,
    unit_parameter_counts,
    units_by_block,
    units_plan,
)
from .importance import Importance, fisher_potential, scoring_bytes
from .search import Choice, best_plan, frontier

OPTIMIZER_STATE_BYTES = {"adamw": 8, "sgd": 4}
MEASURE_BATCH = 4  # images per measured step for memory and FLOPs budgets at most (scaled to the batch; costs.py)
MEASURE_TOKENS = 256  # ... and fewer (2 at least) where that many tokens fill fewer images (DeiT-S: 197 per image)
PRESETS = ("paper", "last_k", "none")


def check_plannable(config: RunConfig) -> None:
    """The planner chooses BSR units of the MoE-ViT itself; parameter-efficient add-ons are other plans."""
    for section in ("lora", "adapters"):
        if getattr(config, section).enabled:
            raise PlanError(f"{section}.enabled: moebsr plan chooses the backbone's own sub-layers; accepted: a "
                             f"config with {section}.enabled=false")


def cost_model_for(config: RunConfig, task_outputs: dict[str, int], step_tasks: list[str], timed_steps: int = 0
                   ) -> CostModel:
    """Measure the cost model on the configured model, its weights random and, without timing, hollow (costs do
    not depend on their values), built as ``moebsr profile`` builds it, at the configured batch and precision; with
    ``timed_steps``, step times too (the configured optimizer included)."""
    base, build, step_measure = _measuring_setup(config, task_outputs, step_tasks, timed_steps)
    moe_blocks = base.moe_blocks
    mixture_params = unit_parameter_counts(base, [(block, name) for block in moe_blocks for name in ("mlp", "router")])
    full = ResolvedBSRPlan(tuple(range(base.depth)), frozenset(SUBLAYERS), True, True)
    costs = measure_cost_model(build, step_measure, OPTIMIZER_STATE_BYTES[config.train.optimizer], full)
    if config.moe.collapse_frozen:  # a unit (b, mlp) of an MoE block trains its experts and router (see with_routers)
        for block in moe_blocks:
            costs.unit_params[(block, "mlp")] = mixture_params[(block, "mlp")] + mixture_params[(block, "router")]
        costs.full = costs.compose_full([unit for unit in costs.units if unit[1] != "router"])
    return costs


def _measuring_setup(config: RunConfig, task_outputs: dict[str, int], step_tasks: list[str], timed_steps: int = 0
                     ) -> tuple[MoEViT, Callable[[ResolvedBSRPlan], MoEViT], Callable[[MoEViT], Any]]:
    """The model measuring sets up plan after plan, its builder and the step measure (see :func:`cost_model_for`)."""
    from ..training.build import model_from_config
    from ..training.optim import build_optimizer
    measured = copy.deepcopy(config)
    measured.model.pretrained, measured.model.checkpoint = False, None
    measured.bsr.frozen_dtype, measured.moe.collapse_frozen = "fp32", False
    torch.manual_seed(config.train.seed)
    base = model_from_config(measured, dict(task_outputs))
    build = plan_builder(base, config.bsr.frozen_dtype, config.moe.collapse_frozen, hollow=not timed_steps)
    batch = config.train.batch_size
    step_measure = synthetic_step_measure({name: task_outputs[name] for name in step_tasks}, batch,
                                          config.train.mixed_precision,
                                          lambda model: build_optimizer(model, config.train), timed_steps,
                                          measure_batch=batch if timed_steps else images_per_measured_step(base, batch))
    return base, build, step_measure


def images_per_measured_step(model: MoEViT, batch: int) -> int:
    """Images per measured step: ``MEASURE_TOKENS`` tokens' worth, 2 to ``MEASURE_BATCH`` images (never more than
    the batch). Bytes and FLOPs are per image but for the weights' cast copies, measured on the line through this
    many images and twice as many; enough tokens reach every expert at both."""
    tokens = model.backbone.patch_embed.num_patches + model.backbone.num_prefix_tokens
    return min(batch, MEASURE_BATCH, max(2, -(-MEASURE_TOKENS // tokens)))


def plan_builder(model: MoEViT, frozen_dtype: str, collapse: bool, hollow: bool) -> Callable[[ResolvedBSRPlan], MoEViT]:
    """``model`` set up, in place, to train a plan as a run of these levers would: measuring builds hundreds of plans,
    and a copy for each would hold the weights twice. With ``hollow`` the blocks' weight matrices are zeros broadcast
    to their shapes (:func:`.costs.hollow_parameters`): the costs read the same (they depend on shapes and dtypes,
    not values) and measuring holds almost no weights. Step times need real ones (a broadcast weight is copied into
    every matmul)."""
    from ..model.frozen_experts import collapse_frozen_experts
    from ..model.frozen_storage import store_frozen_weights
    from ..model.precision import restore_full_precision
    mixtures = {index: block.mlp for index, block in enumerate(model.blocks) if block.is_moe}
    if hollow:
        hollow_parameters(model)

    def build(plan: ResolvedBSRPlan) -> MoEViT:
        for index, mixture in mixtures.items():  # the previous plan's collapsed layers back
            model.blocks[index].mlp = mixture
        model.origin_split_point = None
        restore_full_precision(model)
        model.apply_bsr(with_routers(plan, tuple(mixtures)) if collapse else plan)
        if collapse:  # timed steps update the weights: experts trained in an earlier plan are copies no more
            collapse_frozen_experts(model, require_copies=False)
        store_frozen_weights(model, frozen_dtype)
        if hollow:
            hollow_parameters(model)  # the collapsed layers' dense MLPs
        return model

    return build


def with_routers(plan: ResolvedBSRPlan, moe_blocks: tuple[int, ...]) -> ResolvedBSRPlan:
    """``plan`` with each MoE block's router training wherever its experts do. With ``moe.collapse_frozen`` a block's
    mixture is either wholly frozen (and runs as one dense MLP) or trains its experts with their router: a router
    alone would keep frozen copies that differ in nothing (it scores zero there), so the planner's ``mlp`` unit of an
    MoE block stands for both."""
    per_block = {block: set(plan.sublayers_of(block)) for block in plan.trainable_blocks}
    for block in moe_blocks:
        if "mlp" in per_block.get(block, ()):
            per_block[block].add("router")
    return dataclasses.replace(plan, block_sublayers=tuple((block, frozenset(names))
                                                           for block, names in sorted(per_block.items())))


def trained_units(moe: MoEConfig, units: tuple[Unit, ...], moe_blocks: tuple[int, ...]) -> tuple[Unit, ...]:
    """The units a plan's config (its MoE section ``moe``) trains: with ``moe.collapse_frozen``, an MoE block's
    router with its experts."""
    if not moe.collapse_frozen:
        return units
    plan = with_routers(units_plan(units), moe_blocks)
    return tuple(sorted((block, sublayer) for block in plan.trainable_blocks for sublayer in plan.sublayers_of(block)))


def option_scores(moe: MoEConfig, scores: dict[Unit, float], moe_blocks: tuple[int, ...]) -> dict[Unit, float]:
    """Unit scores as a lever setting's units stand (its MoE section ``moe``): with ``moe.collapse_frozen`` an MoE
    block's ``mlp`` unit is its experts and router together, and scores as both."""
    if not moe.collapse_frozen:
        return scores
    merged = {unit: value for unit, value in scores.items() if unit[1] != "router"}
    for block in moe_blocks:
        merged[(block, "mlp")] += scores[(block, "router")]
    return merged


def preset_units(bsr: BSRConfig, model: CostModel, preset: str) -> tuple[Unit, ...]:
    resolved = dataclasses.replace(bsr, preset=preset, trainable_blocks=None,
                                   block_sublayers=None).plan().resolve(model.depth)
    return tuple(unit for unit in model.units if unit[1] in resolved.sublayers_of(unit[0]))


def planned_config(config: RunConfig, units: tuple[Unit, ...]) -> RunConfig:
    planned = copy.deepcopy(config)
    per_block = units_by_block(units)
    planned.bsr = dataclasses.replace(config.bsr, preset="custom" if per_block else "none",
                                      trainable_blocks=list(per_block) if per_block else None,
                                      block_sublayers=per_block or None, train_final_norm=True,
                                      train_embeddings=False)
    return planned


def importance_for(config: RunConfig, data: Any, batches: int, micro_batch: int,
                   memory_limit: Optional[float] = None) -> Importance:
    """Fisher potential of every unit (routers included, whatever the levers) on the configured model with its real
    weights and ``batches`` batches of every task.

    With ``memory_limit`` the pass is made to fit it: the weights stay fp32 when they leave room for one image's saved
    tensors, else frozen in bf16 with every mixture collapsed to its dense MLP (its router then scores zero: among
    identical experts no gate changes the output); the micro-batch is then the largest that fits (``micro_batch`` at
    most, one at least). What one image costs is probed on the model that scores (:func:`.importance.scoring_bytes`),
    not taken from training's step, whose precision and trainable weights differ. ``Importance.peak_bytes`` says what
    the pass held."""
    batch_size = config.train.batch_size
    low = memory_limit is not None and scoring_weight_bytes(config, data) > memory_limit
    model, on_path = _scoring_model(config, data, low)
    if memory_limit is not None:
        probes = {task: _task_batches(data, task, 1, 2)[0][0] for task in data.tasks}  # two images of each task
        per_image, per_pass = _largest_scoring_bytes(model, probes, on_path)
        probe = next(iter(probes.values()))
        loaded = batches * batch_size * probe[0].numel() * probe.element_size()  # one task's images
        if not low and held_bytes(model) + loaded + per_pass + per_image > memory_limit:  # no room for an image
            low = True
            del model
            model, on_path = _scoring_model(config, data, low)
            per_image, per_pass = _largest_scoring_bytes(model, probes, on_path)
        room = memory_limit - held_bytes(model) - loaded - per_pass
        micro_batch = max(1, min(micro_batch, int(room // per_image) if per_image > 0 else micro_batch))
    parts = []
    for task in data.tasks:  # one task's images loaded at a time
        images, labels = _task_batches(data, task, batches, batch_size)
        parts.append(fisher_potential(model, {task: images}, {task: labels}, plan_units(model), micro_batch,
                                      on_path=on_path))
        del images, labels
    importance = Importance.merged(parts)
    if low and collapsible(config.moe):  # the mixtures ran as their dense MLPs: no router's gate changed anything
        for block in config.moe.resolve_blocks(model.depth):
            for table in (importance.scores, *importance.per_task.values(), *importance.raw_per_task.values()):
                table[(block, "router")] = 0.0
    importance.low_precision = low
    return importance


def _task_batches(data: Any, task: str, batches: int, batch_size: int
                  ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The first ``batches`` batches of ``task``'s training images and their labels, each batch its own tensor."""
    loaded = list(data.eval_loader([task], "train", max_examples=batches * batch_size))
    stacked = torch.cat([batch["images"] for batch in loaded])[:batches * batch_size]
    targets = torch.cat([batch["labels"][task] for batch in loaded])[:batches * batch_size]
    return [images.clone() for images in stacked.split(batch_size)], list(targets.split(batch_size))


def _largest_scoring_bytes(model: MoEViT, images: dict[str, torch.Tensor],
                           on_path: Optional[list[torch.nn.Parameter]]) -> tuple[float, float]:
    """:func:`.importance.scoring_bytes` of the task that saves the most (tasks differ in their heads)."""
    probes = [scoring_bytes(model, task_images, task, on_path) for task, task_images in images.items()]
    return max(per_image for per_image, _ in probes), max(per_pass for _, per_pass in probes)


def _scoring_model(config: RunConfig, data: Any, low: bool) -> tuple[MoEViT, Optional[list[torch.nn.Parameter]]]:
    """The model that scores, on the data's device, and the parameters that open its autograd path (``None``:
    all of them). In ``low`` precision frozen weights are bf16 and the mixtures collapsed, and only the patch
    embedding's weight (every model has one) opens the path."""
    from accelerate import Accelerator

    from ..training.build import image_spec_of, model_from_config
    scored = copy.deepcopy(config)
    scored.bsr.frozen_dtype, scored.moe.collapse_frozen = "fp32", False  # every mixture as it is, routers scored
    if low:
        scored.bsr = dataclasses.replace(scored.bsr, preset="none", trainable_blocks=None, block_sublayers=None,
                                         frozen_dtype="bf16")
        scored.moe.collapse_frozen = collapsible(config.moe)
    torch.manual_seed(config.train.seed)
    model = model_from_config(scored, data.heads())
    data.attach_image_spec(image_spec_of(model), Accelerator(cpu=not torch.cuda.is_available()), build_train=False)
    model.to(data.device)
    return model, [model.backbone.patch_embed.proj.weight] if low else None


def scoring_weight_bytes(config: RunConfig, data: Any) -> float:
    """The fp32 weights of the configured model (scoring's in full precision), counted on a weightless build."""
    from ..training.build import model_from_config
    counted = copy.deepcopy(config)
    counted.model.pretrained, counted.model.checkpoint = False, None
    with torch.device("meta"):
        model = model_from_config(counted, data.heads())
    return float(sum(p.numel() * 4 for p in model.parameters()))


def describe(units: tuple[Unit, ...]) -> str:
    if not units:
        return "heads only"
    return "; ".join(f"block {block}: {'+'.join(names)}" for block, names in units_by_block(units).items())


def cost_row(kind: str, cost: PlanCost, full: PlanCost) -> dict[str, Any]:
    row = dict(memory_bytes=cost.memory_bytes, memory_ratio=cost.memory_bytes / full.memory_bytes,
               flops=cost.flops, flops_ratio=cost.flops / full.flops, saved_bytes=cost.saved_bytes,
               trainable_params=cost.trainable_params, budget_kind=kind)
    if full.step_seconds:
        row.update(step_seconds=cost.step_seconds, step_ratio=cost.step_seconds / full.step_seconds)
    return row


def check_reachable(models: list[CostModel], budget: Budget, limit: float, reference: Optional[PlanCost] = None
                    ) -> None:
    """Refused in one line when not even heads alone fit ``limit`` with any of the lever settings measured
    (``reference``: full fine-tuning the minimum is stated against; default: the first model's)."""
    minimum = min(model.predict(()).value(budget.kind) for model in models)
    if minimum > limit:
        full = (reference or models[0].full).value(budget.kind)
        raise PlanError(f"--budget: {budget.text} ({format_amount(budget.kind, limit)}) is below the cheapest plan, "
                        f"heads only: {format_amount(budget.kind, minimum)} ({minimum / full:.3f}x of full "
                        "fine-tuning); accepted: at least that")


def write_outputs(out: Path, config: RunConfig, model: CostModel, importance: Importance, budget: Budget,
                  limit: float, choice: Choice, reference: Optional[PlanCost] = None) -> dict[str, Any]:
    """The config, the plan's report (``.plan.json``) and the frontier plot (``.frontier.png``) beside it. Ratios are
    to ``reference`` (full fine-tuning of the config as given; default: ``model``'s own)."""
    full = reference or model.full
    out.parent.mkdir(parents=True, exist_ok=True)
    moe_blocks = config.moe.resolve_blocks(model.depth)
    trained = trained_units(config.moe, choice.units, moe_blocks)
    save_config(planned_config(config, trained), out, relative_paths=True)
    scores = option_scores(config.moe, importance.scores, moe_blocks)
    presets = {preset: preset_units(config.bsr, model, preset) for preset in PRESETS}
    points = frontier(model, scores, budget.kind)
    report = dict(
        budget=budget.text, budget_kind=budget.kind, budget_value=limit, plan=describe(trained),
        units=[list(unit) for unit in trained], score=choice.score,
        predicted=cost_row(budget.kind, choice.cost, full),
        full_finetuning=cost_row(budget.kind, full, full),
        presets={name: dict(plan=describe(units), score=sum(scores[u] for u in units),
                            **cost_row(budget.kind, model.predict(units), full))
                 for name, units in presets.items()},
        candidates=[dict(unit=list(unit), score=scores[unit], params=model.unit_params[unit],
                         extra_memory_bytes=model.extra[unit].parameter_bytes + model.extra[unit].saved_bytes
                         + model.unit_params[unit] * model.state_bytes_per_param,
                         extra_flops=model.extra[unit].flops,
                         per_task={task: scores[unit] for task, scores in importance.per_task.items()})
                    for unit in model.units],
        frontier=[dict(plan=describe(p.units), score=p.score, **cost_row(budget.kind, p.cost, full))
                  for p in points],
        criterion="Fisher potential of each unit's output (TinyTrain), each task normalised to sum 1",
        importance_images_per_task=importance.images_per_task, importance_micro_batch=importance.micro_batch,
        importance_seconds=importance.seconds, measure_seconds=model.measure_seconds,
        step_fit=model.step_fit, step_fit_median_relative_error=model.step_fit_error,
        measured_steps=model.measured_steps)
    plan_json = out.with_suffix(".plan.json")
    plan_json.write_text(json.dumps(report, indent=2))
    plot = out.with_suffix(".frontier.png")
    if not importable("matplotlib"):  # the plan and its table are whole without the picture
        print(f"moebsr plan: {plot.name} not drawn: matplotlib is not installed (pip install 'moebsr[plots]')")
    else:
        plot_frontier(plot, report, budget.kind)
    return report


def plot_frontier(path: Path, report: dict[str, Any], kind: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ratio = f"{kind}_ratio"
    figure, axes = plt.subplots(figsize=(6, 4))
    axes.plot([p[ratio] for p in report["frontier"]], [p["score"] for p in report["frontier"]], "o-",
              label="best plan per budget")
    for name, preset in report["presets"].items():
        axes.plot(preset[ratio], preset["score"], "s", label=f"preset {name}")
    axes.plot(report["predicted"][ratio], report["score"], "*", markersize=14, label="this plan")
    full = report["full_finetuning"][COST_KEYS[kind]]
    axes.axvline(report["budget_value"] / full, linestyle=":", color="grey", label="budget")
    axes.set_xlabel(f"predicted training {kind} / full fine-tuning")
    axes.set_ylabel("importance kept (Fisher potential, sum over tasks)")
    axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


TIMED_STEPS = 3  # per measured plan, after one untimed, for a step-time budget


def measure_costs(config: RunConfig, timed: bool = False) -> tuple[Any, CostModel]:
    """The run's tasks (their data checked) and the cost model of the step its sampler draws first (with step times
    when ``timed``)."""
    from ..training.build import check_config_against_model
    from ..training.run_data import RunData
    check_plannable(config)
    check_config_against_model(config)
    data = RunData.from_config(config)
    return data, cost_model_for(config, data.task_outputs(), _step_tasks(config, data), TIMED_STEPS if timed else 0)


def _step_tasks(config: RunConfig, data: Any) -> list[str]:
    from ..training.run_data import group_by_shared_dataset
    if config.train.sampler == "joint":
        return group_by_shared_dataset(data.tasks, config.tasks)[0]
    return [config.tasks[0]]


LEVER_CHOICES = ("auto", "config")


def lever_variants(config: RunConfig, has_experts: bool) -> list[RunConfig]:
    """The config with every other setting of the memory levers: experts recomputed in backward (exact) and frozen
    matmul weights stored in bf16 (see ``bsr.frozen_dtype``), each with the frozen mixtures run as their dense MLP
    where the MoE settings allow it (``moe.collapse_frozen``: exact, and it only removes costs, so it is not tried
    off). The config's own setting comes first and is not repeated."""
    own = tuple(levers_of(config).values())
    collapse = True if has_experts and collapsible(config.moe) else config.moe.collapse_frozen
    settings = itertools.product((False, True) if has_experts else (config.moe.recompute_experts,), ("fp32", "bf16"),
                                 (collapse,))
    variants = []
    for setting in settings:
        if setting != own:
            variant = copy.deepcopy(config)
            variant.moe.recompute_experts, variant.bsr.frozen_dtype, variant.moe.collapse_frozen = setting
            variants.append(variant)
    return variants


def cheapest_levers(config: RunConfig, has_experts: bool, kind: str) -> RunConfig:
    """The lever setting that costs least for every plan under a ``memory`` or ``flops`` budget, so the only other
    one ``--levers auto`` needs to measure besides the config's own (the scores do not depend on the levers; their
    costs are measured, and ``tests/test_planning.py`` checks this order against every setting):

    - memory: experts recomputed (backward keeps a mixture's inputs, not its insides), frozen weights in bf16 (half
      their bytes; under autocast no cast copy is saved either) and frozen mixtures collapsed;
    - FLOPs: experts not recomputed (that runs their forward twice), frozen mixtures collapsed (1/top_k of their
      FLOPs), frozen weights as configured (their dtype changes no FLOP count).

    Where a lever changes nothing for the plan chosen, :func:`without_idle_levers` sets it back."""
    cheapest = copy.deepcopy(config)
    if has_experts and collapsible(config.moe):
        cheapest.moe.collapse_frozen = True
    if kind == "memory":
        cheapest.moe.recompute_experts = has_experts or config.moe.recompute_experts
        cheapest.bsr.frozen_dtype = "bf16" if config.bsr.frozen_dtype == "fp32" else config.bsr.frozen_dtype
    else:
        cheapest.moe.recompute_experts = False
    return cheapest


IDLE_LEVER_CHECKS = ("moe.recompute_experts", "bsr.frozen_dtype")  # collapse only removes costs: never set back


def without_idle_levers(given: RunConfig, chosen: RunConfig, units: tuple[Unit, ...], kind: str,
                        task_outputs: dict[str, int], step_tasks: list[str]) -> tuple[RunConfig, list[str], int]:
    """``chosen`` with each lever it changed from ``given`` set back where the plan ``units`` then costs exactly the
    same (one measured step of the plan with and one without it: e.g. recomputing experts when no mixture the plan
    trains through is left uncollapsed), so the written config changes only what buys something. Returns the config,
    the levers set back and the steps measured."""
    measured = []

    def plan_cost(setting: RunConfig) -> float:  # what differs between two settings of the same plan
        _, build, step_measure = _measuring_setup(setting, task_outputs, step_tasks)
        measure = step_measure(build(units_plan(units)))
        measured.append(measure)
        return measure.flops if kind == "flops" else measure.parameter_bytes + measure.saved_bytes

    reverted: list[str] = []
    cost = None
    given_levers = levers_of(given)
    for key in IDLE_LEVER_CHECKS:
        if levers_of(chosen)[key] == given_levers[key]:
            continue
        trial = copy.deepcopy(chosen)
        section, name = key.split(".")
        setattr(getattr(trial, section), name, given_levers[key])
        cost = plan_cost(chosen) if cost is None else cost
        if plan_cost(trial) == cost:
            chosen, reverted = trial, reverted + [key]
    return chosen, reverted, len(measured)


def collapsible(moe: MoEConfig) -> bool:
    """Whether ``moe.collapse_frozen`` is exact with the MoE settings ``moe`` (its own check, without raising)."""
    try:
        dataclasses.replace(moe.spec(), collapse_frozen=True)._check_collapsible()
    except ValueError:
        return False
    return True


def levers_of(config: RunConfig) -> dict[str, Any]:
    return {"moe.recompute_experts": config.moe.recompute_experts, "bsr.frozen_dtype": config.bsr.frozen_dtype,
            "moe.collapse_frozen": config.moe.collapse_frozen, "train.batch_size": config.train.batch_size,
            "train.grad_accum_steps": config.train.grad_accum_steps}


ACCUMULATION = (2, 4)  # micro-batches per step --accumulate tries


def accumulated_variants(config: RunConfig) -> list[RunConfig]:
    """The config with its batch split into 2 and 4 micro-batches, their gradients accumulated (the same images per
    optimizer step and the same mean loss: accelerate divides each micro-batch's loss by the count), so a step saves
    a micro-batch's activations, not the batch's."""
    variants = []
    for split in ACCUMULATION:
        if config.train.batch_size % split == 0:
            variant = copy.deepcopy(config)
            variant.train.batch_size //= split
            variant.train.grad_accum_steps *= split
            variants.append(variant)
    return variants


def _candidates(options: list[tuple[RunConfig, CostModel]], importance: Importance, budget: Budget,
                limit: float, first_index: int = 0) -> list[tuple]:
    """Each lever setting's best plan, best first: the highest score, then (ties) no more micro-batches than needed,
    then the cheaper plan, then the setting listed first (the config as given, then the fewest levers changed;
    ``first_index`` is the first option's place in that list)."""
    candidates = []
    for index, (option_config, option_costs) in enumerate(options, start=first_index):
        scores = option_scores(option_config.moe, importance.scores,
                               option_config.moe.resolve_blocks(option_costs.depth))
        choice = best_plan(option_costs, scores, budget.kind, limit)
        if choice is not None:
            candidates.append(((choice.score, -option_config.train.grad_accum_steps, -choice.cost.value(budget.kind),
                                -index), option_config, option_costs, choice))
    return sorted(candidates, key=lambda item: item[0], reverse=True)


def run_plan(config: RunConfig, budget: Budget, batches: int, out: Path,
             measured: Optional[tuple[Any, CostModel]] = None, importance: Optional[Importance] = None,
             levers: str = "config", accumulate: bool = False, reference: Optional[PlanCost] = None
             ) -> dict[str, Any]:
    """Plan, then write the config and its report. ``measured`` (:func:`measure_costs`) and ``importance`` may come
    from an earlier call on the same config (a benchmark planning several budgets). ``levers="auto"`` also plans
    with the lever setting that costs least (:func:`cheapest_levers`; for a step budget with every other setting, each
    timed), keeps the setting whose plan scores highest and sets back the levers that change nothing for that plan
    (:func:`without_idle_levers`); relative budgets stay relative to full fine-tuning of the config as given. With
    ``accumulate`` (memory budgets), the best setting is also measured with its batch in 2 and 4 micro-batches
    (:func:`accumulated_variants`): more steps of less memory each, taken only where it buys importance.
    ``reference``: the full fine-tuning relative budgets and ratios are of (default: the config's own; the plans of
    another token dropping are still against the config as given, see :mod:`.candidates`)."""
    if levers not in LEVER_CHOICES:
        raise PlanError(f"--levers: {levers!r} is invalid; accepted: {', '.join(LEVER_CHOICES)}")
    timed = budget.kind == "step"
    data, costs = measured or measure_costs(config, timed=timed)
    reference = reference or costs.full
    limit = budget.resolve(reference.value(budget.kind))
    options = [(config, costs)]
    if levers == "auto":  # a step budget's costs are timed, not ordered: every setting is measured
        has_experts = bool(config.moe.resolve_blocks(costs.depth))
        variants = lever_variants(config, has_experts) if timed else [
            variant for variant in [cheapest_levers(config, has_experts, budget.kind)]
            if levers_of(variant) != levers_of(config)]
        options += [(variant, cost_model_for(variant, data.task_outputs(), _step_tasks(variant, data),
                                             TIMED_STEPS if timed else 0))
                    for variant in variants]
    check_reachable([option_costs for _, option_costs in options], budget, limit, reference)  # before the data
    if importance is None:
        fit = budget.kind == "memory"
        importance = importance_for(config, data, batches, config.train.batch_size, limit if fit else None)
    candidates = _candidates(options, importance, budget, limit)
    if accumulate and budget.kind == "memory":  # a FLOPs or step budget is per optimizer step: splitting saves none
        split = [(variant, cost_model_for(variant, data.task_outputs(), _step_tasks(variant, data)))
                 for variant in accumulated_variants(candidates[0][1])]
        candidates = sorted(candidates + _candidates(split, importance, budget, limit, first_index=len(options)),
                            key=lambda item: item[0], reverse=True)
        options += split
    _, chosen_config, chosen_costs, choice = candidates[0]
    idle: list[str] = []
    idle_check = (0, 0.0)  # steps measured, seconds
    if levers == "auto" and not timed:
        started = time.perf_counter()
        chosen_config, idle, steps = without_idle_levers(config, chosen_config, choice.units, budget.kind,
                                                         data.task_outputs(), _step_tasks(chosen_config, data))
        idle_check = (steps, time.perf_counter() - started)
    report = write_outputs(out, chosen_config, chosen_costs, importance, budget, limit, choice, reference)
    report["levers"] = levers_of(chosen_config)
    report["levers_set_back"] = idle  # changed in the cheapest setting, but they change nothing for this plan
    report["planning_memory_bytes"] = max([importance.peak_bytes,
                                           *(option.planning_peak_bytes for _, option in options)])
    report["planning_memory"] = dict(measuring=max(option.planning_peak_bytes for _, option in options),
                                     scoring=importance.peak_bytes, scoring_low_precision=importance.low_precision)
    report["planning_fits_budget"] = report["planning_memory_bytes"] <= limit if budget.kind == "memory" else None
    report["measured_steps"] = sum(option_costs.measured_steps for _, option_costs in options) + idle_check[0]
    report["measure_seconds"] = sum(option_costs.measure_seconds for _, option_costs in options) + idle_check[1]
    report["lever_options"] = [dict(levers=levers_of(option_config), plan=describe(trained_units(
                                        option_config.moe, option_choice.units, option_config.moe.resolve_blocks(
                                            option_costs.depth))),
                                    score=option_choice.score, predicted=cost_row(budget.kind, option_choice.cost,
                                                                                  reference))
                               for _, option_config, option_costs, option_choice in candidates]
    out.with_suffix(".plan.json").write_text(json.dumps(report, indent=2))
    return report


def format_report(report: dict[str, Any], out: Optional[Path] = None) -> str:
    predicted = report["predicted"]
    lines = [
        f"plan for {report['budget']}: {report['plan']}",
        f"predicted: memory {predicted['memory_bytes'] / 2 ** 20:.2f} MiB ({predicted['memory_ratio']:.3f}x of full "
        f"fine-tuning), {predicted['flops'] / 1e9:.3f} GFLOP per step ({predicted['flops_ratio']:.3f}x), "
        f"{predicted['trainable_params']:,} trainable parameters"
        + (f", step {predicted['step_seconds'] * 1000:.1f} ms ({predicted['step_ratio']:.3f}x)"
           if "step_seconds" in predicted else "") + f"; importance kept {report['score']:.3f}",
        "presets: " + "; ".join(f"{name} {p['memory_ratio']:.3f}x memory, {p['flops_ratio']:.3f}x FLOPs, importance "
                                f"{p['score']:.3f}" for name, p in report["presets"].items()),
        f"levers: {', '.join(f'{key}={value}' for key, value in report.get('levers', {}).items())}"
        + (f" ({', '.join(report['levers_set_back'])} set back: no change for this plan)"
           if report.get("levers_set_back") else ""),
        f"planning pass: {report['planning_memory_bytes'] / 2 ** 20:.2f} MiB at most (measured: weights held + what "
        f"measuring's passes kept alive, or scoring's saved tensors)"
        + ("" if report.get("planning_fits_budget") is None else
                                     "; within the budget" if report["planning_fits_budget"] else
                                     "; MORE than the budget"),
        f"cost: {report['measured_steps']} measured steps in {report['measure_seconds']:.1f} s; importance from "
        f"{sum(report['importance_images_per_task'].values())} images in micro-batches of "
        f"{report['importance_micro_batch']}, {report['importance_seconds']:.1f} s",
    ]
    if out is not None:
        lines.append(f"wrote {out}, {out.with_suffix('.plan.json')}, {out.with_suffix('.frontier.png')}; train it with "
                     f"accelerate launch launch/multitask.py --config {out}")
    return "\n".join(lines)
