"""The MoE layer that replaces a block's MLP: per-task routing, grouped expert dispatch, balancing loss."""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn

from .dispatch import dispatch_grouped
from .experts import Experts
from .routing import Routing, TaskRouter, apply_capacity, load_balancing_loss

# Rows of a batch that belong to one task: (task, first row, end row). After the shared trunk the batch
# holds one copy of the images per task, stacked, so each task's rows are contiguous.
TaskRows = Sequence[tuple[str, int, int]]
Dispatcher = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Experts], torch.Tensor]


class MoEMlp(nn.Module):
    """Drop-in replacement for a ViT block's ``mlp``: ``[R, N, C] -> [R, N, C]``, routed per task.

    The balancing loss of the latest forward is kept in ``aux_loss`` (mean over the tasks in the batch) so
    the training loop can add it with its own weight; it is ``None`` before the first forward.
    """

    def __init__(
            self,
            router: TaskRouter,
            experts: Experts,
            capacity_factor: Optional[float] = None,
            dispatcher: Dispatcher = dispatch_grouped,
    ) -> None:
        super().__init__()
        self.router = router
        self.experts = experts
        self.capacity_factor = capacity_factor
        self.dispatcher = dispatcher
        self.aux_loss: Optional[torch.Tensor] = None
        self.last_routing: dict[str, Routing] = {}

    @property
    def num_experts(self) -> int:
        """All experts of the layer (the router's outputs), also when this process holds only some of them."""
        return self.router.num_experts

    def route(self, x: torch.Tensor, task_rows: TaskRows) -> tuple[torch.Tensor, torch.Tensor]:
        """Route every token of ``x`` ``[R, N, C]`` with its rows' task gate; returns flat index/weight."""
        indices, weights, losses = [], [], []
        self.last_routing = {}
        for task, start, end in task_rows:
            tokens = x[start:end].reshape(-1, x.shape[-1])
            routing = self.router(tokens, task)
            if self.capacity_factor is not None:
                routing = apply_capacity(routing, self.num_experts, self.capacity_factor)
            self.last_routing[task] = routing
            indices.append(routing.expert_index)
            weights.append(routing.expert_weight)
            losses.append(load_balancing_loss(routing, self.num_experts))
        self.aux_loss = torch.stack(losses).mean()
        return torch.cat(indices), torch.cat(weights)

    def forward(self, x: torch.Tensor, task_rows: TaskRows) -> torch.Tensor:
        expert_index, expert_weight = self.route(x, task_rows)
        flat = x.reshape(-1, x.shape[-1])
        return self.dispatcher(flat, expert_index, expert_weight, self.experts).reshape(x.shape)
