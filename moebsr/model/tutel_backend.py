"""``moe.backend: tutel``: tutel's ``moe_layer`` routes, dispatches and, across processes, exchanges tokens
all-to-all; moebsr's own gates and experts hold the weights.

The tutel layer is assembled around the torch backend's modules: the ``wg`` of its per-task gates *are* the
router's gates, and its experts are tutel's ``custom`` expert type running :class:`Experts`. State dicts keep the
torch backend's keys and layout, so weights move between backends (and process counts) unchanged.

Expert parallelism, when the model is built in a job of W processes (``torch.distributed`` initialised, as
``Accelerator()`` does): each process keeps E/W experts, global expert e on rank ``e // (E/W)``.

- Tokens reach their expert's process by all-to-all, so every process must call each MoE layer equally often
  (the same tasks in the same order, which the training loop and evaluation guarantee).
- Expert parameters are left out of DDP's all-reduce: their gradients already hold every process's tokens.
  They are divided by W, so that they equal one process's gradients on the whole batch, as DDP's average
  makes the replicated parameters' gradients.
- ``state_dict()`` gathers all E experts from every process (a collective: call it on every process) and
  ``load_state_dict`` keeps this process's slice, so a checkpoint holds every expert whatever W was.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from .errors import UnsupportedModelError
from .experts import Experts
from .moe import MoEMlp, TaskRows
from .routing import Fp32Gate, TaskRouter
from .tutel_install import TUTEL_INSTALL, TutelBackendError, require_tutel  # noqa: F401 (re-exported)

SHARD_ATTR = "moebsr_expert_shard"  # set on every expert parameter this backend shards, to an ExpertShard


@dataclass(frozen=True)
class ExpertShard:
    """Which slice of a stacked expert tensor (dim 0) this process holds, and with whom it is split."""

    group: Optional[dist.ProcessGroup]
    rank: int
    world_size: int
    experts: slice


def process_group_size(group: Optional[dist.ProcessGroup] = None) -> tuple[int, int]:
    """``(rank, world_size)`` of ``group``, ``(0, 1)`` outside a distributed job."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def gather_along_experts(local: torch.Tensor, group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    """Concatenate every process's expert slice along dim 0, in rank order (= global expert order)."""
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, local.contiguous(), group=group)
    return torch.cat(parts)


class ShardedExperts(Experts):
    """This process's slice of an :class:`Experts` bank; state dicts hold the whole bank (see module doc)."""

    def __init__(self, experts: Experts, group: Optional[dist.ProcessGroup]) -> None:
        rank, world = process_group_size(group)
        local = experts.num_experts // world
        with torch.random.fork_rng(devices=[]):  # the slice is copied in: its init must not move the caller's RNG
            super().__init__(local, experts.dim, experts.hidden_features, experts.act, drop=experts.drop.p)
        self.shard = ExpertShard(group, rank, world, slice(rank * local, (rank + 1) * local))
        with torch.no_grad():
            for name, parameter in self.named_parameters():
                parameter.copy_(getattr(experts, name)[self.shard.experts])
                setattr(parameter, SHARD_ATTR, self.shard)
                parameter.register_hook(self._average_over_processes)
        self.to(experts.fc1_weight.device)
        self.register_state_dict_post_hook(self._gather_state)
        self.register_load_state_dict_pre_hook(self._take_local_slice)

    @property
    def global_num_experts(self) -> int:
        return self.num_experts * self.shard.world_size

    def _average_over_processes(self, grad: torch.Tensor) -> torch.Tensor:
        return grad / self.shard.world_size

    @staticmethod
    def _gather_state(module: "ShardedExperts", state: dict, prefix: str, local_metadata: Any) -> None:
        for name, _ in module.named_parameters(recurse=False):
            key = prefix + name
            state[key] = gather_along_experts(state[key], module.shard.group)

    @staticmethod
    def _take_local_slice(module: "ShardedExperts", state: dict, prefix: str, *args: Any) -> None:
        for name, _ in module.named_parameters(recurse=False):
            key = prefix + name
            if key in state and state[key].shape[0] == module.global_num_experts:
                state[key] = state[key][module.shard.experts]

    def extra_repr(self) -> str:
        experts = self.shard.experts
        return (f"experts {experts.start}..{experts.stop - 1} of {self.global_num_experts} "
                f"(rank {self.shard.rank} of {self.shard.world_size})")


class _TutelExperts(nn.Module):
    """tutel's ``custom`` expert contract: ``forward(slots [E_local, capacity, dim], layer)``."""

    def __init__(self, experts: Experts) -> None:
        super().__init__()
        self.experts = experts

    def forward(self, slots: torch.Tensor, layer: nn.Module) -> torch.Tensor:
        return self.experts.forward_batched(slots)


class TutelMoEMlp(MoEMlp):
    """:class:`MoEMlp` with tutel's routing, dispatch and all-to-all; same parameters, same state dict.

    Routing is computed twice per task: by tutel (which decides the dispatch) and by the router for the balancing
    loss and ``last_routing``, so both backends report the same loss. The gate matmul is ``dim x E`` per token,
    small next to the experts' ``2 x dim x hidden x top_k``.
    """

    def __init__(
            self,
            router: TaskRouter,
            experts: Experts,
            capacity_factor: Optional[float] = None,
            group: Optional[dist.ProcessGroup] = None,
    ) -> None:
        if type(experts) is not Experts:  # ShardedExperts copies fc1/fc2 only: a gate path would be lost
            raise UnsupportedModelError(f"moe.backend: tutel cannot run {type(experts).__name__} (experts upcycled "
                                        "from a gated MLP, EVA-02's SwiGLU); accepted: moe.backend=torch for them")
        tutel_moe = require_tutel()
        _, world = process_group_size(group)
        if experts.num_experts % world:
            raise TutelBackendError(f"moe.num_experts: {experts.num_experts} experts cannot be split over {world} "
                                    f"processes with the tutel backend; accepted: a multiple of {world}")
        if world > 1:
            experts = ShardedExperts(experts, group)
        super().__init__(router, experts, capacity_factor)
        self.group, self.world_size = group, world
        self.gate_index = {name: index for index, name in enumerate(router.gates)}
        # top-1 with renormalisation weights the expert by 1; tutel only renormalises k > 1 (it keeps p_top1)
        self.undo_top1_weight = router.renormalize and router.top_k == 1
        gate = dict(type="top", k=router.top_k, fp32_gate=False, gate_noise=0.0,
                    capacity_factor=capacity_factor if capacity_factor is not None else 0.0)  # 0 = dropless
        with torch.random.fork_rng(devices=[]):  # tutel initialises throw-away gates: keep the caller's RNG
            layer = tutel_moe.moe_layer(
                gate_type=[dict(gate) for _ in router.gates],
                model_dim=experts.dim,
                experts=dict(type="custom", module=self._tutel_expert_module, count_per_node=experts.num_experts),
                group=group,
                is_postscore=True,
                batch_prioritized_routing=False,
                normalize_gate=router.renormalize,
                is_gshard_loss=True,
            )
        for index, name in enumerate(router.gates):
            layer.gates[index].wg = Fp32Gate(router.gates[name])  # routes in fp32, as the router does
        self.__dict__["tutel_layer"] = layer  # not a submodule: its parameters are ours, registered once

    def _tutel_expert_module(self, model_dim: int, local_experts: int, sharded_count: int) -> nn.Module:
        if local_experts != self.experts.num_experts or sharded_count != 1:
            raise ValueError(f"moe: tutel placed {local_experts} expert(s) x {sharded_count} shard(s) per process, "
                             f"expected {self.experts.num_experts} x 1")
        return _TutelExperts(self.experts)

    def forward(self, x: torch.Tensor, task_rows: TaskRows) -> torch.Tensor:
        _, world = process_group_size(self.group)
        if world != self.world_size:
            raise RuntimeError(f"moe: this tutel layer was built for {self.world_size} process(es) but runs in a job "
                               f"of {world}; build the model after torch.distributed is initialised")
        self.route(x, task_rows)  # the router's view: balancing loss and last_routing, as in the torch backend
        layer = self.tutel_layer
        layer.train(self.training)
        outputs, next_row = [], 0
        for task, start, end in task_rows:
            if start != next_row:
                raise ValueError(f"moe: task rows must be contiguous from 0, got {list(task_rows)}")
            gate = self.gate_index[task if self.router.per_task else "shared"]
            rows = layer(x[start:end], gate_index=gate, inequivalent_tokens=self.world_size > 1)
            if self.undo_top1_weight:
                routing = self.last_routing[task]
                top1 = routing.probabilities.gather(-1, routing.expert_index[:, :1]).to(rows.dtype)
                rows = rows / top1.reshape(*rows.shape[:-1], 1)
            outputs.append(rows)
            next_row = end
        if next_row != x.shape[0]:
            raise ValueError(f"moe: task rows {list(task_rows)} do not cover the batch of {x.shape[0]} rows")
        return torch.cat(outputs)

    def extra_repr(self) -> str:
        return f"backend=tutel, processes={self.world_size}"
