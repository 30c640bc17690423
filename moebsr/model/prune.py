"""Expert pruning of a single-task model: measure how much routing mass each expert receives from the task's gate,
remove the experts below a threshold (or keep a budget of the heaviest), and make a layer left with one expert a
plain dense MLP.

Routing mass of expert e in a layer: the sum, over the calibration tokens, of the top-k weight the gate gave e
(0 where e was not chosen), as a share of the layer's total. With renormalised gates the shares are the fraction
of the layer's output each expert makes.

What stays exact: the pruned gate keeps the kept experts' rows, and its softmax still normalises over every
original expert (the removed rows stay as ``normalizer`` rows) when the weights are raw probabilities
(``renormalize: false``); with renormalised weights the removed rows cancel out and are dropped. So pruning experts
that no token chose leaves the model's outputs unchanged; pruning chosen experts sends their tokens to the next-best
kept ones. A lone expert's weight is 1 with renormalised gates, so that layer becomes a timm ``Mlp`` with the
expert's weights; with raw probabilities it keeps its gate (its output is scaled by the probability).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping, Optional, Sequence

import torch
import torch.nn as nn

from . import Experts, MoEMlp, MoEViT, Routing, TaskRouter
from .routing import gate_logits

CRITERIA = ("share", "coverage", "budget")
# share / coverage: from bench/deploy.py's sweep on the quickstart's validation runs, the largest share (smallest
# coverage) at which every task stayed within 0.5 point of its unpruned model, with and without the balancing loss.
# budget: half the experts, the ">= 2x fewer MoE-layer parameters" (a size to meet, healed back to accuracy)
DEFAULT_CRITERION = "share"
DEFAULT_THRESHOLDS = {"share": 0.08, "coverage": 0.9, "budget": 0.5}


class PrunedRouter(TaskRouter):
    """A task router over the kept experts; ``normalizer`` holds the removed experts' gate rows when the weights
    are raw softmax probabilities, so those probabilities keep their original denominator."""

    def __init__(self, dim: int, num_experts: int, top_k: int, gate_names: Sequence[str], mode: str,
                 renormalize: bool, num_removed: int) -> None:
        super().__init__(dim, num_experts, top_k, list(gate_names), mode=mode, renormalize=renormalize)
        if mode == "task" and len(gate_names) != 1:
            raise ValueError(f"a pruned router serves one task; got gates {list(gate_names)}")
        self.normalizer = nn.Linear(dim, num_removed, bias=False) if num_removed and not renormalize else None

    def forward(self, tokens: torch.Tensor, task: str) -> Routing:
        if self.normalizer is None:
            return super().forward(tokens, task)
        logits = torch.cat([gate_logits(self.gate_for(task), tokens), gate_logits(self.normalizer, tokens)], dim=-1)
        probabilities = logits.softmax(dim=-1)[:, :self.num_experts]
        weight, index = probabilities.topk(self.top_k, dim=-1)
        return Routing(index, weight.to(tokens.dtype), probabilities)


@dataclass
class RoutingMass:
    """What a calibration pass measured in one MoE layer.

    Attributes:
        share: ``[E]`` each expert's share of the layer's routing mass (sums to 1).
        chosen: ``[E]`` how many tokens chose each expert (any rank of the top-k).
        tokens: calibration tokens that passed the layer.
        images: calibration images.
    """

    share: torch.Tensor
    chosen: torch.Tensor
    tokens: int
    images: int

    def to_dict(self) -> dict:
        return {"share": [round(v, 6) for v in self.share.tolist()], "chosen": self.chosen.tolist(),
                "tokens": self.tokens, "images": self.images}


@torch.no_grad()
def measure_routing_mass(model: MoEViT, task: str, batches: Iterable[torch.Tensor]) -> dict[int, RoutingMass]:
    """Routing mass per expert of every MoE layer, for ``task``'s gate, over the images in ``batches``.

    The model runs as it is deployed (eval mode, its token dropping), so the tokens measured are those it keeps.
    """
    model.eval()
    layers = model.moe_layers()
    mass = {index: torch.zeros(layer.num_experts, dtype=torch.float64) for index, layer in layers.items()}
    chosen = {index: torch.zeros(layer.num_experts, dtype=torch.int64) for index, layer in layers.items()}
    tokens = dict.fromkeys(layers, 0)
    seen = 0
    for images in batches:
        model(images, task)
        seen += images.shape[0]
        for index, layer in layers.items():
            routing = layer.last_routing[task]
            flat_index = routing.expert_index.reshape(-1).cpu()
            flat_weight = routing.expert_weight.reshape(-1).double().cpu()
            mass[index].index_add_(0, flat_index, flat_weight)
            chosen[index].index_add_(0, flat_index[flat_weight > 0], torch.ones_like(flat_index[flat_weight > 0]))
            tokens[index] += routing.expert_index.shape[0]
    if not seen:
        raise ValueError("calibration: no image was given")
    return {index: RoutingMass((mass[index] / mass[index].sum().clamp_min(1e-30)).float(), chosen[index],
                               tokens[index], seen) for index in layers}


def choose_experts(share: torch.Tensor, criterion: str = DEFAULT_CRITERION, threshold: Optional[float] = None
                   ) -> list[int]:
    """The experts a layer keeps, in their original order; always at least the one with the most mass.

    ``share``: keep every expert whose share is at least ``threshold``. ``coverage``: keep the fewest experts, most
    mass first, whose shares add up to at least ``threshold``. (``budget`` spans layers: :func:`choose_layer_experts`.)
    """
    threshold = _checked_threshold(criterion, threshold)
    if criterion == "budget":
        raise ValueError("--criterion budget: chooses across MoE layers; accepted here: share, coverage "
                         "(use choose_layer_experts)")
    order = torch.argsort(share, descending=True, stable=True).tolist()
    if criterion == "share":
        kept = [e for e in order if share[e] >= threshold] or order[:1]
    else:
        cumulative = torch.cumsum(share[order].double(), 0)
        reached = int((cumulative < threshold - 1e-9).sum()) + 1
        kept = order[:min(reached, len(order))]
    return sorted(kept)


def choose_layer_experts(shares: Mapping[int, torch.Tensor], criterion: str = DEFAULT_CRITERION,
                         threshold: Optional[float] = None) -> dict[int, list[int]]:
    """The experts every MoE layer keeps (``{block: original indices}``), by ``criterion`` at ``threshold``.

    ``budget``: keep ``floor(threshold x all experts)`` experts over all layers (at least one per layer), most share
    first: a share threshold common to the layers, lowered until the budget is spent. Shares are each layer's
    fraction of its own output, so a layer the task routes to evenly keeps more experts than one it concentrates on,
    and the kept size is known before calibration (the ``share`` rule's depends on how the task routes).
    """
    threshold = _checked_threshold(criterion, threshold)
    if criterion != "budget":
        return {index: choose_experts(share, criterion, threshold) for index, share in shares.items()}
    kept = {index: [int(share.argmax())] for index, share in shares.items()}  # each layer's heaviest first
    budget = max(int(threshold * sum(share.numel() for share in shares.values()) + 1e-9), len(kept))
    ranked = sorted(((float(share[e]), index, e) for index, share in shares.items() for e in range(share.numel())
                     if e not in kept[index]), key=lambda item: (-item[0], item[1], item[2]))
    for _, index, expert in ranked[:budget - len(kept)]:
        kept[index].append(expert)
    return {index: sorted(experts) for index, experts in kept.items()}


def _checked_threshold(criterion: str, threshold: Optional[float]) -> float:
    if criterion not in CRITERIA:
        raise ValueError(f"--criterion: {criterion!r} is invalid; accepted: {', '.join(CRITERIA)}")
    threshold = DEFAULT_THRESHOLDS[criterion] if threshold is None else float(threshold)
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"--threshold: {threshold!r} is invalid; accepted: a number in [0, 1]")
    return threshold


def prune_experts(model: MoEViT, kept: Mapping[int, Sequence[int]]) -> MoEViT:
    """Keep only the listed experts (original indices) of each named MoE layer, in place; returns ``model``.

    Also how an exported task model is rebuilt before its weights are loaded: the same call on a freshly built
    model gives the same structure.
    """
    layers = model.moe_layers()
    for index, experts in kept.items():
        if index not in layers:
            raise ValueError(f"prune: block {index} has no MoE layer; MoE blocks: {sorted(layers)}")
        experts = sorted(int(e) for e in experts)
        layer = layers[index]
        if not experts or len(set(experts)) != len(experts) or not all(0 <= e < layer.num_experts for e in experts):
            raise ValueError(f"prune: block {index}: experts {experts} are invalid; accepted: distinct indices "
                             f"0..{layer.num_experts - 1}, at least one")
        if len(experts) < layer.num_experts:
            model.blocks[index].mlp = pruned_layer(layer, experts)
    return model


@torch.no_grad()
def pruned_layer(layer: MoEMlp, experts: Sequence[int]) -> nn.Module:
    """``layer`` with only ``experts``: an :class:`MoEMlp` over them, or a timm ``Mlp`` for a lone expert whose
    weight is always 1 (renormalised gates)."""
    router = layer.router
    if not isinstance(layer.experts, Experts) or type(router) not in (TaskRouter, PrunedRouter):
        raise ValueError(f"prune: cannot prune a {type(layer).__name__} with a {type(router).__name__}")
    if isinstance(router, PrunedRouter):
        raise ValueError("prune: this layer is pruned already; prune the task model exported without --prune")
    bank = layer.experts
    index = torch.tensor(list(experts), device=bank.fc1_weight.device)
    if len(experts) == 1 and router.renormalize:
        dense = bank.dense_mlp(experts[0])  # a timm Mlp, or a SwiGLU for experts upcycled from one (EVA-02)
        dense.kept_experts = list(experts)  # which original expert it is (the card, the export section)
        return dense
    kept_bank = bank.select_experts(index)
    removed = [e for e in range(bank.num_experts) if e not in set(experts)]
    gate_names = list(router.gates)
    kept_router = PrunedRouter(bank.dim, len(experts), min(router.top_k, len(experts)), gate_names, router.mode,
                               router.renormalize, len(removed)).to(bank.fc1_weight.device)
    for name in gate_names:
        kept_router.gates[name].weight.copy_(router.gates[name].weight[index])
    if kept_router.normalizer is not None:
        (only_gate,) = gate_names
        kept_router.normalizer.weight.copy_(router.gates[only_gate].weight[torch.tensor(removed, device=index.device)])
    pruned = MoEMlp(kept_router, kept_bank, layer.capacity_factor, layer.dispatch)
    pruned.requires_grad_(False)
    pruned.kept_experts = list(experts)
    return pruned


def moe_parameter_count(model: MoEViT, blocks: Sequence[int]) -> int:
    """Parameters of the MLPs (experts and gates, or a dense MLP) of ``blocks``: the MoE layers' cost."""
    return sum(p.numel() for index in blocks for p in model.blocks[index].mlp.parameters())
