"""Top-k routers: one gate per task (M³ViT multi-gate) or one shared gate, and their balancing loss."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class Routing:
    """The routing decision for a flat batch of tokens.

    Attributes:
        expert_index: ``[tokens, top_k]`` chosen experts, best first.
        expert_weight: ``[tokens, top_k]`` weight of each chosen expert (0 where a capacity cap dropped it).
        probabilities: ``[tokens, num_experts]`` the full softmax, kept for balancing losses and analysis.
    """

    expert_index: torch.Tensor
    expert_weight: torch.Tensor
    probabilities: torch.Tensor


class TaskRouter(nn.Module):
    """Bias-free linear gates ``d -> E``, softmax, top-k.

    In ``task`` mode there is one gate per task, held in ``gates[task]``; in ``shared`` mode a single gate
    ``gates["shared"]`` serves every task. Keeping both modes in one ``ModuleDict`` keeps the state-dict
    layout predictable (``...router.gates.<task>.weight``).
    """

    def __init__(
            self,
            dim: int,
            num_experts: int,
            top_k: int,
            tasks: Sequence[str],
            mode: str = "task",
            renormalize: bool = True,
    ) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.top_k = top_k
        self.mode = mode
        self.renormalize = renormalize
        gate_names = list(tasks) if mode == "task" else ["shared"]
        self.gates = nn.ModuleDict({name: nn.Linear(dim, num_experts, bias=False) for name in gate_names})
        for gate in self.gates.values():
            nn.init.trunc_normal_(gate.weight, std=0.02)

    @property
    def per_task(self) -> bool:
        return self.mode == "task"

    def gate_for(self, task: str) -> nn.Linear:
        if not self.per_task:
            return self.gates["shared"]
        if task not in self.gates:
            raise ValueError(f"router: unknown task {task!r}; accepted: {', '.join(self.gates)}")
        return self.gates[task]

    def forward(self, tokens: torch.Tensor, task: str) -> Routing:
        probabilities = gate_logits(self.gate_for(task), tokens).softmax(dim=-1)
        weight, index = probabilities.topk(self.top_k, dim=-1)
        if self.renormalize:
            weight = weight / weight.sum(dim=-1, keepdim=True)
        return Routing(index, weight.to(tokens.dtype), probabilities)


def gate_logits(gate: nn.Linear, tokens: torch.Tensor) -> torch.Tensor:
    """A gate's logits in fp32 with autocast off, in both backends: under bf16 autocast a bf16 gate rounds near-tied
    logits differently from an fp32 one, and the dispatch, the balancing loss and the recorded routing must all
    see the same top-k."""
    device_type = tokens.device.type
    autocasting = device_type in ("cpu", "cuda", "xpu") and torch.is_autocast_enabled(device_type)
    with torch.autocast(device_type, enabled=False) if autocasting else contextlib.nullcontext():
        return F.linear(tokens.float(), gate.weight.float())


class Fp32Gate(nn.Module):
    """``gate`` computed by :func:`gate_logits`; given to tutel in place of the bare linear layer (its ``wg``)."""

    def __init__(self, gate: nn.Linear) -> None:
        super().__init__()
        self.gate = gate

    @property
    def weight(self) -> torch.Tensor:
        return self.gate.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return gate_logits(self.gate, tokens)


def squared_coefficient_of_variation(values: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """cv^2 = var / mean^2, as M³ViT (and Shazeer et al.) use it; 0 for a single expert."""
    values = values.float()
    if values.numel() <= 1:
        return values.new_zeros(())
    return values.var() / (values.mean() ** 2 + eps)


def routing_statistics(routing: Routing, num_experts: int) -> torch.Tensor:
    """``[2, E]``: each expert's importance and load for one gate's tokens, the sums the balancing loss needs.

    importance: the full softmax probability each expert received, summed over tokens (differentiable). It is
    taken from the whole softmax, as Switch, GShard and V-MoE do, not from the top-k weights: with top-1 and
    renormalisation those are always 1 and the loss would have no gradient at all.
    load: how many assignments each expert received (a count, so it only shifts the value). Take it from the
    routing *before* any capacity cut, or overfull experts look capped and the imbalance is underestimated.
    Both are sums over tokens, so the statistics of a global batch are the sum of its shards' statistics.
    """
    importance = routing.probabilities.float().sum(dim=0)
    flat_index = routing.expert_index.reshape(-1)
    load = importance.new_zeros(num_experts).index_add(0, flat_index, torch.ones_like(flat_index, dtype=torch.float))
    return torch.stack([importance, load])


def balancing_loss_from_statistics(statistics: torch.Tensor) -> torch.Tensor:
    """cv^2(importance) + cv^2(load) from :func:`routing_statistics` (or their sum over processes)."""
    return squared_coefficient_of_variation(statistics[0]) + squared_coefficient_of_variation(statistics[1])


def load_balancing_loss(routing: Routing, num_experts: int) -> torch.Tensor:
    """cv^2(importance) + cv^2(load) for one gate's tokens (M³ViT's loss without noisy gating); see
    :func:`routing_statistics` for what importance and load are."""
    return balancing_loss_from_statistics(routing_statistics(routing, num_experts))


def expert_capacity(num_tokens: int, num_experts: int, top_k: int, capacity_factor: float) -> int:
    """Assignments each expert keeps of ``num_tokens`` tokens routed by one gate: tutel's
    ``top_k * floor(capacity_factor * ceil(tokens / num_experts))``, a number known before any routing."""
    return top_k * int(capacity_factor * -(-num_tokens // num_experts))


def apply_capacity(routing: Routing, num_experts: int, capacity_factor: float) -> Routing:
    """Zero the weight of assignments past each expert's capacity, all first choices before any second.

    Capacity is ``top_k * floor(capacity_factor * ceil(tokens / num_experts))`` slots per expert, tutel's formula,
    so both MoE backends drop the same assignments; within a choice rank earlier tokens win (GShard's order).
    Dropped assignments keep their index but carry weight 0, so the token simply gets less (or no) MoE output
    and passes on through the residual.
    """
    num_tokens, top_k = routing.expert_index.shape
    capacity = expert_capacity(num_tokens, num_experts, top_k, capacity_factor)
    # rank-major order: all tokens' first choice, then all second choices, ...
    rank_major = routing.expert_index.t().reshape(-1)
    # one-hot by comparison: F.one_hot reads the indices' range back from the device (a host sync per layer)
    one_hot = (rank_major[:, None] == torch.arange(num_experts, device=rank_major.device)).long()
    position_in_expert = (one_hot.cumsum(dim=0) * one_hot).sum(dim=-1) - 1
    keep = (position_in_expert < capacity).reshape(top_k, num_tokens).t()
    return Routing(routing.expert_index, routing.expert_weight * keep.to(routing.expert_weight.dtype),
                   routing.probabilities)
