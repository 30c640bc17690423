"""Measurements of one training step: parameters, FLOPs, bytes saved for backward.

FLOPs come from ``torch.utils.flop_counter.FlopCounterMode``, which does not see the fused
``scaled_dot_product_attention`` kernel on CPU, so attention is switched to timm's unfused path while counting
(same arithmetic, every matmul visible).
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Attention
from torch.utils.flop_counter import FlopCounterMode

from .model import MoEViT


@contextlib.contextmanager
def unfused_attention(model: nn.Module) -> Iterator[None]:
    attentions = [m for m in model.modules() if isinstance(m, Attention)]
    previous = [m.fused_attn for m in attentions]
    for module in attentions:
        module.fused_attn = False
    try:
        yield
    finally:
        for module, fused in zip(attentions, previous):
            module.fused_attn = fused


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    parameters = list(model.parameters())
    return sum(p.numel() for p in parameters if p.requires_grad), sum(p.numel() for p in parameters)


def synthetic_labels(model: MoEViT, tasks: Sequence[str], batch: int, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {task: torch.randint(0, model.heads[task].out_features if hasattr(model.heads[task], "out_features")
                                else 2, (batch,), generator=generator) for task in tasks}


def training_loss(model: MoEViT, images: torch.Tensor, labels: dict[str, torch.Tensor],
                  aux_weight: float = 0.01) -> torch.Tensor:
    outputs = model(images, list(labels))
    loss = sum(F.cross_entropy(outputs[task], target) for task, target in labels.items())
    return loss + aux_weight * model.aux_loss()


def training_step_flops(model: MoEViT, images: torch.Tensor, labels: dict[str, torch.Tensor]) -> int:
    """FLOPs of forward + backward of one step (the optimizer's elementwise update is not counted)."""
    with unfused_attention(model), FlopCounterMode(display=False) as counter:
        training_loss(model, images, labels).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def inference_flops(model: MoEViT, images: torch.Tensor, tasks: Union[str, Sequence[str]]) -> int:
    with unfused_attention(model), FlopCounterMode(display=False) as counter, torch.no_grad():
        model(images, tasks)
    return counter.get_total_flops()


def saved_activation_bytes(model: MoEViT, images: torch.Tensor, labels: dict[str, torch.Tensor]) -> int:
    """Bytes of the distinct storages autograd keeps for backward (parameters excluded), for the whole batch."""
    parameter_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameter_storages:
            seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = training_loss(model, images, labels)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(seen.values())
