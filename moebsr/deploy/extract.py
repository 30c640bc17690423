"""One task out of a multitask MoE-ViT: its head, its gates, its adapters merged into the weights, the rest gone.

The result is still a :class:`MoEViT` (one head, one gate per MoE layer), so everything that runs a moebsr model
(evaluation, token maps, profiling, prediction) runs it, and for that task it computes exactly what the multitask
model computes.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from ..model import MoEViT
from ..model.adapters import merge_task_adapters


def extract_task(model: MoEViT, task: str) -> MoEViT:
    """A copy of ``model`` that holds only ``task``: its head, its gate in every MoE layer (or the shared gate),
    its task adapters and any shared LoRA merged into the layers they adapt. Frozen, in eval mode.

    The copy keeps the multitask model's split point (where the task streams part), so token dropping with
    ``decision: shared`` keeps the tokens it kept for ``task`` in the multitask model.
    """
    model.check_tasks(task)
    single = copy.deepcopy(model)
    single.origin_split_point = model.task_split_point()
    single.heads = nn.ModuleDict({task: single.heads[task]})
    for layer in single.moe_layers().values():
        router = layer.router
        kept_gate = task if router.per_task else "shared"
        router.gates = nn.ModuleDict({kept_gate: router.gates[kept_gate]})
        layer.last_routing = {}
    merge_task_adapters(single, task)
    merge_lora(single)
    single.requires_grad_(False)
    return single.eval()


def merge_lora(model: nn.Module) -> list[str]:
    """Fold every PEFT LoRA layer into its base linear layer (``W + scale * B A``) and put the plain layer back in
    its place; returns the merged layer names. Exact up to float rounding: at inference LoRA dropout is off."""
    from peft.tuners.lora import LoraLayer

    merged = []
    for name, module in list(model.named_modules()):
        if not isinstance(module, LoraLayer):
            continue
        with torch.no_grad():
            module.merge()
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, module.get_base_layer())
        merged.append(name)
    return merged
