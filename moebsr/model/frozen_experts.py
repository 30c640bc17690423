"""Frozen mixtures of identical experts run as the one MLP they all are (``moe.collapse_frozen``).

An MoE layer upcycled from a dense MLP holds ``num_experts`` exact copies of it, and with renormalised top-k gates
and no capacity cap it computes that MLP whatever its router says. While BSR trains neither its experts nor its
router it stays so, and then its copies only cost: ``num_experts`` times the MLP's weights held, ``top_k`` times its
FLOPs per token, and, behind a trainable block, ``top_k`` hidden states per token kept for backward. Collapsed to the
dense MLP, the layer gives the same outputs (up to the rounding of gates that sum to 1) for a fraction of that. The
task streams of a joint batch still split where the uncollapsed model's do (``origin_split_point``), so token
dropping ranks by the same attention: the lever changes costs, not results.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .moevit import MoEViT


def experts_are_copies(experts: nn.Module) -> bool:
    """Every expert's parameters equal expert 0's (each expert parameter has the experts as its first dimension; a
    bank with shared weights says itself, e.g. :meth:`~.low_rank_experts.LowRankExperts.are_copies`)."""
    if hasattr(experts, "are_copies"):
        return experts.are_copies()
    return all(torch.equal(p, p[:1].expand_as(p)) for p in experts.parameters())


def collapse_frozen_experts(model: MoEViT, require_copies: bool = True) -> list[int]:
    """Replace every MoE layer none of whose parameters train by its experts' common dense MLP; returns the blocks.

    Call after everything that decides what trains (BSR, LoRA, adapters) and before frozen weights are stored low.
    Raises a one-line ``ValueError`` for a frozen layer whose experts differ (not upcycled copies: collapsing it
    would change the model), unless ``require_copies`` is off (``moebsr plan`` timing steps, where only the
    structure counts: expert 0 stands for the layer)."""
    split = model.task_split_point()
    collapsed = []
    for index, block in enumerate(model.blocks):
        if not block.is_moe or any(p.requires_grad for p in block.mlp.parameters()):
            continue
        if require_copies and not experts_are_copies(block.mlp.experts):
            raise ValueError(f"moe.collapse_frozen: block {index}'s frozen experts differ, so they are not the dense "
                             "MLP's copies; accepted: experts upcycled from a dense backbone, or "
                             "moe.collapse_frozen=false")
        dense = block.mlp.experts.dense_mlp(0)
        block.mlp = dense.requires_grad_(False)
        collapsed.append(index)
    if collapsed and model.origin_split_point is None:
        model.origin_split_point = split
    return collapsed
