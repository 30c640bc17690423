"""How much training each unit would help, from a few batches of the user's own data.

The criterion is TinyTrain's Fisher potential (Kwon et al., ICML 2024, after Theis et al. 2018), on activations:
for a unit whose output is ``a`` (tokens x channels) and whose loss gradient there is ``g``, each image contributes
``sum_c (sum_tokens a_c g_c)^2``: the first-order change of the loss if that output's channels were rescaled, i.e.
how much the loss is still asking of that sub-layer. It needs gradients *with respect to activations* only, so no
parameter gradient is ever allocated (``torch.autograd.grad`` on the outputs): the planning pass stores one
micro-batch's activations and the weights, not full fine-tuning's gradients and optimizer state.

Every task counts equally: a task's unit scores are divided by their sum over units before the tasks are added.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Iterable, Iterator, Mapping, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..model import MoEViT
from .costs import Unit, held_bytes, storage_bytes


@dataclass
class Importance:
    """Per-unit scores (summing to the number of tasks) and what computing them cost."""

    scores: dict[Unit, float]
    per_task: dict[str, dict[Unit, float]]
    raw_per_task: dict[str, dict[Unit, float]]  # before normalising: the Fisher potentials themselves
    images_per_task: dict[str, int]
    micro_batch: int
    seconds: float
    peak_bytes: float = 0.0  # the most the pass held: weights, the task's images, one micro-batch's saved tensors
    low_precision: bool = False  # scored with frozen weights in bf16 and the mixtures collapsed (see importance_for)

    @classmethod
    def merged(cls, parts: Sequence["Importance"]) -> "Importance":
        """One importance from passes over disjoint sets of tasks (each task normalised on its own already)."""
        per_task = {task: table for part in parts for task, table in part.per_task.items()}
        units = next(iter(per_task.values()), {})
        return cls({unit: sum(table[unit] for table in per_task.values()) for unit in units}, per_task,
                   {task: table for part in parts for task, table in part.raw_per_task.items()},
                   {task: count for part in parts for task, count in part.images_per_task.items()},
                   parts[0].micro_batch, sum(part.seconds for part in parts),
                   max(part.peak_bytes for part in parts), parts[0].low_precision)


def _unit_outputs(model: MoEViT, units: Sequence[Unit]) -> dict[Unit, list[nn.Module]]:
    """The modules whose outputs stand for each unit: the attention's projection (called on both the fused and the
    token-ranking path), the whole MLP (experts and their combination), both norms, the router's softmax over
    experts (what its gates change; not the renormalised top-k weights: among identical upcycled experts those ask
    for a change of scale no router can make, since they always sum to 1, while the softmax's gradient is zero)."""
    modules: dict[Unit, list[nn.Module]] = {}
    for block_index, sublayer in units:
        block = model.blocks[block_index]
        if sublayer == "attn":
            modules[(block_index, sublayer)] = [block.attn.proj]
        elif sublayer == "mlp":
            modules[(block_index, sublayer)] = [block.mlp]
        elif sublayer == "norm":
            modules[(block_index, sublayer)] = [block.norm1, block.norm2]
        else:
            modules[(block_index, sublayer)] = [block.mlp.router]  # its Routing's probabilities
    return modules


def fisher_potential(model: MoEViT, batches: Mapping[str, Iterable[torch.Tensor]], labels: Mapping[str, Iterable],
                     units: Sequence[Unit], micro_batch: int, on_path: Optional[Sequence[nn.Parameter]] = None
                     ) -> Importance:
    """Scores of ``units`` from ``batches[task]`` (image tensors) and ``labels[task]`` (matching label tensors).

    The model runs in eval mode (no dropout: the scores are a property of the data, not of a random mask) with
    ``on_path`` (default: every parameter) marked trainable for the duration, so that the whole trunk is on the
    autograd path; a stem parameter alone does that and leaves every weight frozen (frozen weights stored in low
    precision need it). The marks are restored afterwards.
    """
    from ..analysis.profiling import counting_saved_tensors
    start = time.perf_counter()
    outputs_of = _unit_outputs(model, units)
    captured: dict[Unit, list[torch.Tensor]] = {unit: [] for unit in units}
    weights, peak = held_bytes(model), 0.0
    per_task: dict[str, dict[Unit, float]] = {}
    raw_per_task: dict[str, dict[Unit, float]] = {}
    images_per_task: dict[str, int] = {}
    with contextlib.ExitStack() as hooked:
        for unit, modules in outputs_of.items():
            for module in modules:
                hooked.callback(module.register_forward_hook(
                    lambda _module, _inputs, output, unit=unit: captured[unit].append(
                        getattr(output, "probabilities", output))).remove)
        hooked.enter_context(_path_opened(model, on_path))
        for task in batches:
            totals = {unit: 0.0 for unit in units}
            count = 0
            loaded = storage_bytes(batches[task])  # the task's images, held meanwhile
            for images, targets in zip(batches[task], labels[task]):
                for chunk in range(0, images.shape[0], micro_batch):
                    for unit in units:
                        captured[unit].clear()
                    rows = min(micro_batch, images.shape[0] - chunk)
                    with counting_saved_tensors(model) as saved:  # the stem saves its input: the chunk's own copy
                        logits = model(images[chunk:chunk + micro_batch].clone(), [task])[task]
                    peak = max(peak, weights + loaded + sum(saved.values()))
                    loss = F.cross_entropy(logits.float(), targets[chunk:chunk + micro_batch], reduction="sum")
                    flat = [(unit, output) for unit in units for output in captured[unit] if output.requires_grad]
                    if units and not flat:  # all scores would read zero: a plan of nothing, silently
                        raise RuntimeError("fisher_potential: no unit's output is on the autograd path; on_path must "
                                           "hold a parameter every block's input depends on (e.g. the patch embedding)")
                    gradients = torch.autograd.grad(loss, [output for _, output in flat], allow_unused=True)
                    for (unit, output), gradient in zip(flat, gradients):
                        if gradient is not None:
                            totals[unit] += _potential(output.detach(), gradient, rows)
                    count += rows
            total = sum(totals.values()) or 1.0
            per_task[task] = {unit: value / total for unit, value in totals.items()}
            raw_per_task[task] = totals
            images_per_task[task] = count
    scores = {unit: sum(task_scores[unit] for task_scores in per_task.values()) for unit in units}
    return Importance(scores, per_task, raw_per_task, images_per_task, micro_batch, time.perf_counter() - start, peak)


@contextlib.contextmanager
def _path_opened(model: MoEViT, on_path: Optional[Sequence[nn.Parameter]]) -> Iterator[None]:
    """The model in eval mode with ``on_path`` (default: every parameter) trainable; all restored afterwards."""
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    was_training = model.training
    for parameter in model.parameters() if on_path is None else on_path:
        parameter.requires_grad_(True)
    model.eval()
    try:
        yield
    finally:
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(requires_grad[name])
        model.train(was_training)


def scoring_bytes(model: MoEViT, images: torch.Tensor, task: str,
                  on_path: Optional[Sequence[nn.Parameter]] = None) -> tuple[float, float]:
    """What :func:`fisher_potential`'s pass saves beyond the weights, ``(per image, per pass)`` (weight copies a
    low-precision layer casts are saved once a pass): read off a forward of one image and one of two, counted
    without being kept, so probing fits wherever the weights do."""
    from ..analysis.profiling import counting_saved_tensors
    sizes = []
    with _path_opened(model, on_path):
        for count in (1, 2):
            with counting_saved_tensors(model, keep=False) as saved:
                model(images[:count].clone(), [task])  # its own storage: the stem saves its input
            sizes.append(float(sum(saved.values())))
    per_image = sizes[1] - sizes[0]
    return per_image, sizes[0] - per_image


def _potential(activation: torch.Tensor, gradient: torch.Tensor, images: int) -> float:
    """``sum over images and channels of (sum over tokens of a * g)^2``. A router's probabilities come flat
    (``[images * tokens, experts]``): they are regrouped per image first."""
    product = (activation.float() * gradient.float())
    product = product.reshape(images, -1, product.shape[-1]).sum(dim=1)
    return float(product.pow(2).sum())

