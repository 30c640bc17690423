"""What a training plan costs, composed from a few measured steps of the real model.

A *unit* is one sub-layer of one block (``attn``, ``mlp``, ``norm``, ``router``). Costs are not additive over units:
the blocks before the first trainable one run without autograd and store nothing, and neither does the part of that
first block before its first trainable sub-layer; which of its sub-layers train also decides what its own backward
keeps (a router training alone needs the experts' outputs, not their insides). From the first trainable block on,
every block stores what backward needs to pass gradients through it, trained or not, and training a sub-layer there
adds what its weight gradient needs. So a plan ``U`` whose first trainable block is ``f``, training ``S`` there, costs

    q(U) = first(f, S) + sum over units u of U after block f of extra(u)

both read off measured steps, not guessed:

- ``first(f, S)``: block ``f`` trains ``S`` alone, for every block and non-empty subset of its units (7 per block,
  15 with a router) - the heads, final norm, forward of everything and backward down into block ``f``;
- ``extra(u)``: block 0's norms and ``u`` train, less block 0's norms alone (the path is open from the start there,
  so this is what training ``u`` adds: weight gradients' inputs, their FLOPs, the bytes of weights a frozen-weight
  dtype would have shrunk).

Each is one step of ``moebsr profile``'s own measurements (``saved_activation_bytes`` and ``training_step_flops`` on
the same synthetic batch, plus the parameter bytes), so a prediction and a profile of the same plan read the same
instruments. Gradient and optimizer-state bytes follow from the trainable parameter count. Full fine-tuning, the
reference of relative budgets, is composed the same way (block 0 trains everything, every later unit adds its extra,
and the embeddings theirs, measured once): measuring it would hold what a budget of a fraction of it may not.
Saved tensors are counted, not kept, so a measured pass holds a forward's live tensors, not a step's saved ones.
"""

from __future__ import annotations

import contextlib
import itertools
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Mapping, Optional, Sequence

import torch

from ..model import MoEViT
from ..model.bsr import ResolvedBSRPlan, parameters_of
from ..model.precision import is_broadcast

UNIT_SUBLAYERS = ("attn", "mlp", "norm", "router")
Unit = tuple[int, str]  # (block, sub-layer)
QUANTITIES = ("parameter_bytes", "saved_bytes", "flops", "step_seconds")
# A step's time is not composed like the other quantities: a difference of two noisy timings is mostly noise, and
# the fixed forward dominates. It is fitted instead over every measured plan, seconds = a * FLOPs + b * trainable
# parameters (backward and the optimizer's update) + c, and predicted from a plan's composed FLOPs and parameters.


@dataclass(frozen=True)
class Measure:
    """The plan-dependent quantities of one training step (one value per name in ``QUANTITIES``)."""

    parameter_bytes: float = 0.0
    saved_bytes: float = 0.0
    flops: float = 0.0
    step_seconds: float = 0.0  # median time of a whole step, optimizer included; 0 when not timed

    def __add__(self, other: "Measure") -> "Measure":
        return Measure(*(getattr(self, q) + getattr(other, q) for q in QUANTITIES))

    def __sub__(self, other: "Measure") -> "Measure":
        return Measure(*(getattr(self, q) - getattr(other, q) for q in QUANTITIES))


@dataclass(frozen=True)
class PlanCost:
    """A plan's predicted (or measured) step: ``memory_bytes`` is what ``moebsr profile`` calls training memory."""

    parameter_bytes: float
    gradient_bytes: float
    optimizer_state_bytes: float
    saved_bytes: float
    flops: float
    trainable_params: int
    step_seconds: float = 0.0

    @property
    def memory_bytes(self) -> float:
        return self.parameter_bytes + self.gradient_bytes + self.optimizer_state_bytes + self.saved_bytes

    def value(self, kind: str) -> float:
        return {"memory": self.memory_bytes, "flops": self.flops, "step": self.step_seconds}[kind]


@dataclass
class CostModel:
    """Measured pieces of ``q(U)`` (see the module doc) for one model, batch, precision and set of tasks."""

    depth: int
    units: list[Unit]
    unit_params: dict[Unit, int]
    first: dict[tuple[int, frozenset[str]], Measure]  # first(f, S) for every block f and non-empty subset S
    extra: dict[Unit, Measure]
    heads_only: Measure              # no block trains
    base_params: int                 # heads and final norm (they always train)
    state_bytes_per_param: int       # gradient + optimizer state per trainable parameter
    gradient_bytes_per_param: int = 4
    measure_seconds: float = 0.0
    measured_steps: int = 0
    step_fit: Optional[tuple[float, float, float]] = None  # seconds per FLOP, per trainable parameter, fixed
    step_fit_error: Optional[float] = None  # median relative error of the fit over the measured plans
    full: PlanCost = field(default=None)  # full fine-tuning (embeddings too), the reference of relative budgets
    planning_peak_bytes: float = 0.0  # the most measuring held at once: weights and what its passes kept alive
    embeddings_extra: Measure = field(default_factory=Measure)  # what training the embeddings adds to a plan
    full_parameters: tuple[int, float] = (0, 0.0)  # full fine-tuning's trainable parameters and parameter bytes

    def predict(self, units: Iterable[Unit]) -> PlanCost:
        chosen = sorted(set(units))
        measure = self.heads_only
        if chosen:
            block = chosen[0][0]
            measure = self.first[(block, frozenset(sublayer for index, sublayer in chosen if index == block))]
        for unit in chosen:
            if unit[0] != chosen[0][0]:
                measure = measure + self.extra[unit]
        params = self.base_params + sum(self.unit_params[unit] for unit in chosen)
        optimizer = self.state_bytes_per_param - self.gradient_bytes_per_param
        return PlanCost(measure.parameter_bytes, params * self.gradient_bytes_per_param, params * optimizer,
                        measure.saved_bytes, measure.flops, params, self.step_seconds(measure.flops, params))

    def compose_full(self, units: Sequence[Unit]) -> PlanCost:
        """Full fine-tuning, composed as any plan is (block 0 trains all of ``units`` there, every later unit adds
        its extra, the embeddings theirs): measuring it would hold full fine-tuning's weight copies and activations.
        ``units`` are the units as the levers stand (with collapsed mixtures, an MoE block's ``mlp`` is its router
        too, so its ``router`` unit is left out)."""
        measure = self.first[(0, frozenset(sublayer for block, sublayer in units if block == 0))]
        for unit in units:
            if unit[0] > 0:
                measure = measure + self.extra[unit]
        measure = measure + self.embeddings_extra
        params, parameter_bytes = self.full_parameters
        optimizer = self.state_bytes_per_param - self.gradient_bytes_per_param
        return PlanCost(parameter_bytes, params * self.gradient_bytes_per_param, params * optimizer,
                        measure.saved_bytes, measure.flops, params, self.step_seconds(measure.flops, params))

    def step_seconds(self, flops: float, params: int) -> float:
        """The fitted step time (0 when steps were not timed)."""
        if self.step_fit is None:
            return 0.0
        per_flop, per_param, fixed = self.step_fit
        return per_flop * flops + per_param * params + fixed


def plan_units(model: MoEViT) -> list[Unit]:
    """Every unit the model has: a router only where a block's MLP is a mixture of experts."""
    return [(index, sublayer) for index, block in enumerate(model.blocks) for sublayer in UNIT_SUBLAYERS
            if sublayer != "router" or block.is_moe]


def units_by_block(units: Iterable[Unit]) -> dict[int, list[str]]:
    """``{block: [sub-layers]}`` in block order, each block's sub-layers in the order given."""
    per_block: dict[int, list[str]] = {}
    for block, sublayer in units:
        per_block.setdefault(block, []).append(sublayer)
    return dict(sorted(per_block.items()))


def units_plan(units: Iterable[Unit], embeddings: bool = False) -> ResolvedBSRPlan:
    """The BSR plan that trains exactly ``units`` (and the final norm and heads; the embeddings too if asked)."""
    per_block = units_by_block(units)
    return ResolvedBSRPlan(tuple(per_block), frozenset(), True, embeddings,
                           tuple((block, frozenset(names)) for block, names in per_block.items()))


def unit_parameter_counts(model: MoEViT, units: Sequence[Unit]) -> dict[Unit, int]:
    return {(block, sublayer): sum(p.numel() for p in parameters_of(model.blocks[block].sublayer_modules(sublayer)))
            for block, sublayer in units}


def measure_cost_model(build: Callable[[ResolvedBSRPlan], MoEViT], step_measure: Callable[[MoEViT], Measure],
                       optimizer_state_per_param: int, full_plan: ResolvedBSRPlan) -> CostModel:
    """Measure ``first(f, S)``, ``extra(u)`` (module doc) and full fine-tuning.

    Args:
        build: The model training a given plan (the same weights each time; frozen-weight dtypes applied).
        step_measure: One step's :class:`Measure` of a model.
        optimizer_state_per_param: Optimizer-state bytes per trainable parameter (AdamW 8, SGD with momentum 4).
        full_plan: Full fine-tuning, for relative budgets.
    """
    from ..analysis.profiling import count_parameters
    start = time.perf_counter()
    timings: list[tuple[float, int, float]] = []  # (FLOPs, trainable parameters, seconds): the step-time fit's points

    def measure_model(model: MoEViT) -> Measure:
        reading = step_measure(model)
        timings.append((reading.flops, count_parameters(model)[0], reading.step_seconds))
        return reading

    def measure(units: Sequence[Unit]) -> Measure:
        return measure_model(build(units_plan(units)))

    reference = build(units_plan([]))
    units = plan_units(reference)
    depth = reference.depth
    unit_params = unit_parameter_counts(reference, units)
    base_params = count_parameters(reference)[0]
    heads_only = step_measure(reference)  # not a point of the step-time fit
    first = {}
    for block in range(depth):
        own = [sublayer for index, sublayer in units if index == block]
        for size in range(1, len(own) + 1):
            for subset in itertools.combinations(own, size):
                first[(block, frozenset(subset))] = measure([(block, sublayer) for sublayer in subset])
    opened = first[(0, frozenset(["norm"]))]
    extra = {unit: measure([(0, "norm"), unit]) - opened for unit in units if unit[0] > 0}
    for unit in units:  # block 0's own, for the candidate table (a plan never adds them to a later first block)
        if unit[0] == 0:
            with_unit, without = ({"norm", unit[1]}, {"norm"}) if unit[1] != "norm" else ({"norm", "attn"}, {"attn"})
            extra[unit] = first[(0, frozenset(with_unit))] - first[(0, frozenset(without))]
    gradient_bytes = 4
    model = CostModel(depth, units, unit_params, first, extra, heads_only, base_params,
                      gradient_bytes + optimizer_state_per_param, gradient_bytes)
    model.embeddings_extra = measure_model(build(units_plan([(0, "norm")], embeddings=True))) - opened
    full_model = build(full_plan)  # not measured: full fine-tuning's pass would hold what the budget may not
    model.full_parameters = (count_parameters(full_model)[0],
                             sum(p.numel() * p.element_size() for p in full_model.parameters()))
    if all(seconds > 0 for _, _, seconds in timings):
        model.step_fit, model.step_fit_error = fit_step_time(timings)
    model.full = model.compose_full(units)
    model.measured_steps = len(timings) + 1  # and heads only
    model.planning_peak_bytes = getattr(step_measure, "peak_bytes", 0.0)
    model.measure_seconds = time.perf_counter() - start
    return model


def hollow_parameters(model: MoEViT) -> None:
    """Every weight matrix of the blocks (attention, MLPs, experts; not the routers) a zero of its dtype broadcast to
    its shape: the model runs with the real one's shapes, dtypes, FLOPs and saved tensors (a frozen layer's cast copy
    included) and holds almost none of its weights. The stem, norms, biases, routers and heads stay real, so tokens
    still differ from image to image and position to position and are routed across the experts as in a real step
    (under autocast each expert a token reaches is a cast copy saved: all-equal tokens would reach top-k only).
    Already hollow weights are left as they are."""
    from ..model.routing import TaskRouter
    routers = {id(p) for module in model.modules() if isinstance(module, TaskRouter) for p in module.parameters()}
    for parameter in model.blocks.parameters():
        if parameter.dim() < 2 or id(parameter) in routers or is_broadcast(parameter):
            continue
        parameter.data = torch.zeros((), dtype=parameter.dtype, device=parameter.device).expand(parameter.shape)


def storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages ``tensors`` occupy (views of one storage count once)."""
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())


def held_bytes(model: torch.nn.Module) -> int:
    """Bytes of the distinct storages the model's parameters occupy (a hollow parameter's few)."""
    return storage_bytes(model.parameters())


@contextlib.contextmanager
def _gradients_dropped(model: MoEViT) -> Iterator[None]:
    """Each parameter's gradient is freed as soon as backward has accumulated it."""
    handles = [p.register_post_accumulate_grad_hook(lambda parameter: setattr(parameter, "grad", None))
               for p in model.parameters() if p.requires_grad]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def fit_step_time(timings: Sequence[tuple[float, int, float]]) -> tuple[tuple[float, float, float], float]:
    """Least squares ``seconds = a * FLOPs + b * parameters + c`` (relative errors weighed equally), and its median
    relative error over the timings."""
    import numpy as np
    flops, params, seconds = (np.asarray(column, dtype=float) for column in zip(*timings))
    design = np.stack([flops, params, np.ones_like(flops)], axis=1) / seconds[:, None]
    coefficients = np.linalg.lstsq(design, np.ones_like(seconds), rcond=None)[0]
    predicted = design @ coefficients * seconds
    error = float(np.median(np.abs(predicted - seconds) / seconds))
    return (float(coefficients[0]), float(coefficients[1]), float(coefficients[2])), error


def synthetic_step_measure(task_outputs: Mapping[str, int], batch_size: int, precision: str,
                           make_optimizer: Optional[Callable[[MoEViT], torch.optim.Optimizer]] = None,
                           timed_steps: int = 0, measure_batch: Optional[int] = None) -> Callable[[MoEViT], Measure]:
    """A step's measure on the synthetic batch ``moebsr profile`` uses (same seed, images and labels).

    ``measure_batch`` (default ``batch_size``): FLOPs are measured on that many images and scaled to ``batch_size``
    (they are per image); so are bytes saved for backward in fp32, while under autocast each trainable weight's
    low-precision copy is saved once per step whatever the batch: there they are measured on that many images and on
    twice as many and extrapolated along the line through both. Saved tensors are counted, not kept
    (``counting_saved_tensors(keep=False)``) and parameter gradients are dropped as backward produces them, so measuring
    holds the weights and what a forward of a few images keeps alive (``step_measure.peak_bytes``, counted by
    :class:`~moebsr.analysis.profiling.LiveTensorBytes`), not a step's saved activations, gradients or optimizer state.

    With ``timed_steps``, also the median time of that many whole steps (forward, backward, ``make_optimizer``'s
    step) after one untimed: CPU time of this process on CPU (run it with one thread; another job on the machine
    does not inflate it as it does the wall clock), wall time on CUDA."""
    from ..analysis.profiling import (
        LiveTensorBytes,
        saved_activation_bytes,
        synthetic_labels,
        timed_calls,
        training_loss,
        training_step_flops,
    )

    def step_measure(model: MoEViT) -> Measure:
        model.train()
        image_size = int(model.backbone.patch_embed.img_size[0])
        in_chans = int(model.backbone.patch_embed.proj.in_channels)
        device = next(model.parameters()).device
        measured_images = measure_batch or batch_size

        def batch_of(size: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            generator = torch.Generator().manual_seed(0)
            images = torch.randn(size, in_chans, image_size, image_size, generator=generator).to(device)
            return images, {t: v.to(device) for t, v in synthetic_labels(task_outputs, size).items()}

        images, labels = batch_of(measured_images)
        with _gradients_dropped(model), LiveTensorBytes() as live:  # nothing saved is kept: a forward's live tensors
            saved = float(saved_activation_bytes(model, images, labels, precision, keep=False))
            if measured_images != batch_size and precision == "no":  # no weight copies: all per image
                saved *= batch_size / measured_images
            elif measured_images != batch_size:
                twice = saved_activation_bytes(model, *batch_of(2 * measured_images), precision, keep=False)
                per_image = (twice - saved) / measured_images
                saved += per_image * (batch_size - measured_images)
            flops = training_step_flops(model, images, labels, precision, keep=False) * batch_size / measured_images
        parameter_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        step_measure.peak_bytes = max(step_measure.peak_bytes, float(held_bytes(model) + live.peak))
        seconds = 0.0
        if timed_steps:
            optimizer = make_optimizer(model)
            images, labels = batch_of(batch_size)

            def step() -> None:
                training_loss(model, images, labels, precision=precision).backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

            timed = timed_calls(step, device, timed_steps, warmup=1)
            seconds = statistics.median(wall if device.type == "cuda" else cpu for wall, cpu in timed)
            model.zero_grad(set_to_none=True)
        return Measure(float(parameter_bytes), float(saved), float(flops), seconds)

    step_measure.peak_bytes = 0.0  # what measuring held at most: read by measure_cost_model
    return step_measure
