"""The MoE layer that replaces a block's MLP: per-task routing, grouped or padded expert dispatch, balancing loss."""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from .dispatch import dispatch_grouped, dispatch_padded
from .experts import Experts
from .routing import (
    Routing,
    TaskRouter,
    apply_capacity,
    balancing_loss_from_statistics,
    expert_capacity,
    routing_statistics,
)
from .spec import check_dispatch

# Rows of a batch that belong to one task: (task, first row, end row). After the shared trunk the batch
# holds one copy of the images per task, stacked, so each task's rows are contiguous.
TaskRows = Sequence[tuple[str, int, int]]
Dispatcher = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Experts], torch.Tensor]


def sum_over_processes(statistics: torch.Tensor) -> torch.Tensor:
    """Sum over the processes of a job, differentiably, while training (the balancing loss's statistics); as is
    outside a distributed job and without autograd (evaluation needs no balancing loss)."""
    if not (torch.is_grad_enabled() and statistics.requires_grad and dist.is_available() and dist.is_initialized()
            and dist.get_world_size() > 1):
        return statistics
    return _SumOverProcesses.apply(statistics)


class _SumOverProcesses(torch.autograd.Function):
    """All-reduce (sum) with autograd: every process's loss depends on every process's statistics, so the gradient is
    the sum of the processes' gradients, another all-reduce. ``torch.distributed.nn.all_reduce`` did the same and is
    deprecated in torch 2.13 (a FutureWarning per process); written out here, the backward's all-reduce is explicit
    and goes through ``dist.all_reduce`` like every other collective of the run."""

    @staticmethod
    def forward(ctx: Any, statistics: torch.Tensor) -> torch.Tensor:
        summed = statistics.clone()
        dist.all_reduce(summed)
        return summed

    @staticmethod
    def backward(ctx: Any, gradient: torch.Tensor) -> torch.Tensor:
        summed = gradient.clone()
        dist.all_reduce(summed)
        return summed


class MoEMlp(nn.Module):
    """Drop-in replacement for a ViT block's ``mlp``: ``[R, N, C] -> [R, N, C]``, routed per task.

    The balancing loss of the latest forward is kept in ``aux_loss`` (mean over the tasks in the batch) so
    the training loop can add it with its own weight; it is ``None`` before the first forward. In a job of several
    processes its statistics are summed over the processes (one small all-reduce per layer, with autograd), so it
    is the loss of the global batch: P processes with batch B train exactly as one process with batch B*P.

    ``dispatch`` (``moe.dispatch``): ``grouped`` reads the per-expert token counts back from the device once per
    forward; ``padded`` (needs ``capacity_factor``) runs every expert on its full capacity and reads nothing.
    """

    def __init__(
            self,
            router: TaskRouter,
            experts: Experts,
            capacity_factor: Optional[float] = None,
            dispatch: str = "grouped",
    ) -> None:
        super().__init__()
        self.dispatch = check_dispatch(dispatch, capacity_factor)
        self.router = router
        self.experts = experts
        self.capacity_factor = capacity_factor
        self.aux_loss: Optional[torch.Tensor] = None
        self.last_routing: dict[str, Routing] = {}
        self.recompute_experts = False  # MoESpec.recompute_experts

    @property
    def num_experts(self) -> int:
        """All experts of the layer (the router's outputs), also when this process holds only some of them."""
        return self.router.num_experts

    def route(self, x: torch.Tensor, task_rows: TaskRows) -> tuple[torch.Tensor, torch.Tensor]:
        """Route every token of ``x`` ``[R, N, C]`` with its rows' task gate; returns flat index/weight."""
        indices, weights, statistics = [], [], []
        self.last_routing = {}
        for task, start, end in task_rows:
            tokens = x[start:end].reshape(-1, x.shape[-1])
            routing = self.router(tokens, task)
            statistics.append(routing_statistics(routing, self.num_experts))  # before the capacity cut (GShard)
            if self.capacity_factor is not None:
                routing = apply_capacity(routing, self.num_experts, self.capacity_factor)
            self.last_routing[task] = routing
            indices.append(routing.expert_index)
            weights.append(routing.expert_weight)
        per_task = sum_over_processes(torch.stack(statistics))
        self.aux_loss = torch.stack([balancing_loss_from_statistics(s) for s in per_task]).mean()
        return torch.cat(indices), torch.cat(weights)

    def dispatcher(self, task_rows: TaskRows, tokens_per_row: int) -> Dispatcher:
        """The dispatch of this forward; padded with the slots every task's gate may fill, known from shapes alone."""
        if self.dispatch == "grouped":
            return dispatch_grouped
        capacity = sum(expert_capacity((end - start) * tokens_per_row, self.num_experts, self.router.top_k,
                                       self.capacity_factor) for _, start, end in task_rows)
        return functools.partial(dispatch_padded, capacity=capacity)

    def forward(self, x: torch.Tensor, task_rows: TaskRows) -> torch.Tensor:
        expert_index, expert_weight = self.route(x, task_rows)
        flat = x.reshape(-1, x.shape[-1])
        dispatch = self.dispatcher(task_rows, x.shape[1])
        if self.recompute_experts and torch.is_grad_enabled():
            # backward keeps the layer's input, routing and gate weights and runs the experts again
            mixed = checkpoint(dispatch, flat, expert_index, expert_weight, self.experts, use_reentrant=False)
        else:
            mixed = dispatch(flat, expert_index, expert_weight, self.experts)
        return mixed.reshape(x.shape)
