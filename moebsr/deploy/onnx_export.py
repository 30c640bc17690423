"""ONNX export of a single-task model, token dropping included, checked in onnxruntime against PyTorch.

The grouped dispatch sizes its per-expert chunks from counts read on the host, so a trace would freeze the routing
of the trace input into the graph: another input's tokens would go to the experts the trace input chose (the bug
users of other MoE libraries hit). The exported graph instead runs every kept expert on every token and combines
the outputs with the gate's top-k weights (zeros for unchosen experts, ``dispatch_dense_reference``): static
shapes, the same arithmetic, and cheap once pruning has left few experts.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.nn as nn

from ..model import MoEViT, dispatch_dense_reference

OPSET = 18
DEFAULT_TOLERANCE = 1e-4


class TaskLogits(nn.Module):
    """``images -> logits`` of one task: the signature an ONNX graph (and any single-task runtime) wants."""

    def __init__(self, model: MoEViT, task: str) -> None:
        super().__init__()
        self.model = model
        self.task = task

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images, self.task)[self.task]


def static_dispatch(model: MoEViT) -> contextlib.AbstractContextManager:
    """Every MoE layer of ``model`` dispatches with static shapes (every expert on every token) meanwhile."""
    from ..analysis.profiling import attribute_set
    return attribute_set(list(model.moe_layers().values()), "dispatcher", _dense_dispatcher)


def _dense_dispatcher(task_rows: object, tokens_per_row: int) -> object:
    """Stands in for ``MoEMlp.dispatcher`` (which picks a forward's dispatch from ``moe.dispatch``)."""
    return dispatch_dense_reference


def export_onnx(model: MoEViT, task: str, path: str | os.PathLike, example: torch.Tensor) -> None:
    """Write ``model``'s ``task`` as an ONNX graph ``images [batch, C, H, W] -> logits [batch, outputs]``, the batch
    dimension dynamic. ``example`` is only the trace input: its routing does not shape the graph."""
    model.eval()
    wrapper = TaskLogits(model, task).eval()
    if example.shape[0] < 2:  # torch.export makes a batch of 1 a constant, whatever the dynamic dimension says
        example = example.expand(2, *example.shape[1:])
    batch = torch.export.Dim("batch", min=1, max=4096)
    with static_dispatch(model), torch.no_grad(), quiet_exporter():
        program = torch.onnx.export(wrapper, (example,), dynamo=True, opset_version=OPSET, input_names=["images"],
                                    output_names=["logits"], dynamic_shapes={"images": {0: batch}},
                                    verbose=False, optimize=True)
    program.save(os.fspath(path))


@contextlib.contextmanager
def quiet_exporter() -> Iterator[None]:
    """The exporter's warnings and log lines (attributes the model records for inspection, empty attribute lists
    of the ONNX IR) say nothing about the graph's correctness, which :func:`check_onnx` measures."""
    import logging
    import warnings

    loggers = [logging.getLogger(name) for name in ("onnx_ir", "onnxscript", "torch.onnx")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


@dataclass
class OnnxCheck:
    """onnxruntime against PyTorch on the same images."""

    max_abs_diff: float
    tolerance: float
    images: int
    experts_reached: dict[int, list[int]] = field(default_factory=dict)  # per MoE layer, kept experts reached
    experts_kept: dict[int, int] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.tolerance

    @property
    def reaches_every_expert(self) -> bool:
        return all(len(self.experts_reached.get(i, [])) == n for i, n in self.experts_kept.items())

    def to_dict(self) -> dict:
        return {"max_abs_diff": self.max_abs_diff, "tolerance": self.tolerance, "images": self.images,
                "reaches_every_kept_expert": self.reaches_every_expert,
                "experts_reached": {str(k): v for k, v in self.experts_reached.items()},
                "experts_kept": {str(k): v for k, v in self.experts_kept.items()}}


def onnx_logits(path: str | os.PathLike, images: torch.Tensor) -> torch.Tensor:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    session = onnxruntime.InferenceSession(os.fspath(path), options, providers=["CPUExecutionProvider"])
    (output,) = session.run(["logits"], {"images": images.detach().cpu().float().numpy()})
    return torch.from_numpy(output)


@torch.no_grad()
def check_onnx(path: str | os.PathLike, model: MoEViT, task: str, images: torch.Tensor,
               tolerance: float = DEFAULT_TOLERANCE) -> OnnxCheck:
    """Max absolute logit difference between onnxruntime and the PyTorch model (grouped dispatch) on ``images``,
    and which kept experts those images reach."""
    model.eval()
    expected = model(images, task)[task].float().cpu()
    reached = experts_reached(model, task)
    kept = {index: layer.num_experts for index, layer in model.moe_layers().items()}
    difference = (onnx_logits(path, images) - expected).abs().max().item()
    return OnnxCheck(difference, tolerance, images.shape[0], reached, kept)


def experts_reached(model: MoEViT, task: str) -> dict[int, list[int]]:
    """The experts each MoE layer sent some token to in the latest forward (weight above zero)."""
    reached = {}
    for index, layer in model.moe_layers().items():
        routing = layer.last_routing[task]
        chosen = routing.expert_index[routing.expert_weight > 0]
        reached[index] = sorted(set(chosen.tolist()))
    return reached


@torch.no_grad()
def covering_images(model: MoEViT, task: str, candidates: torch.Tensor, count: int) -> torch.Tensor:
    """``count`` images from ``candidates`` chosen greedily so that together their tokens reach every expert
    each MoE layer holds (as far as the candidates allow); the rest are the first of the others."""
    model.eval()
    model(candidates, task)
    per_image: list[set[tuple[int, int]]] = [set() for _ in range(candidates.shape[0])]
    for index, layer in model.moe_layers().items():
        routing = layer.last_routing[task]
        chosen = torch.where(routing.expert_weight > 0, routing.expert_index, -1)
        chosen = chosen.reshape(candidates.shape[0], -1)
        for image, experts in enumerate(chosen.tolist()):
            per_image[image].update((index, e) for e in experts if e >= 0)
    covered: set[tuple[int, int]] = set()
    picked: list[int] = []
    while len(picked) < count:
        gains = [len(experts - covered) if image not in picked else -1 for image, experts in enumerate(per_image)]
        best = max(range(len(gains)), key=gains.__getitem__)
        if gains[best] <= 0:
            break
        picked.append(best)
        covered |= per_image[best]
    rest = [image for image in range(candidates.shape[0]) if image not in picked]
    picked += rest[:max(0, count - len(picked))]
    return candidates[torch.tensor(picked)]
