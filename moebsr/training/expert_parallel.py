"""What the training loop does differently when experts are sharded across processes (tutel backend, W > 1).

Three things break if sharded experts are treated like replicated parameters: DDP would all-reduce (and at
start broadcast) them, one process's gradient-norm clip would differ from another's (each sees only its own
experts) so the replicated weights drift apart, and ``save_state`` would keep only the main process's share of
the optimizer state. Each has one function here; with no sharded parameter they do what accelerate does.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
from accelerate import Accelerator

from ..config import ConfigError
from ..model.tutel_backend import SHARD_ATTR, ExpertShard, gather_along_experts


def shard_of(parameter: torch.Tensor) -> Optional[ExpertShard]:
    return getattr(parameter, SHARD_ATTR, None)


def is_sharded(parameter: torch.Tensor) -> bool:
    return shard_of(parameter) is not None


def sharded_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if is_sharded(p)}


def parameter_count(parameters: Iterable[torch.Tensor]) -> int:
    """Parameters of the whole model, counting every process's experts (``numel`` of a slice times shards)."""
    return sum(p.numel() * (shard.world_size if (shard := shard_of(p)) else 1) for p in parameters)


def exclude_sharded_from_ddp(model: nn.Module) -> list[str]:
    """Keep DDP from broadcasting or all-reducing sharded experts; call before ``accelerator.prepare``."""
    names = list(sharded_parameters(model))
    if names:
        torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, names)
    return names


def check_precision_with_sharding(mixed_precision: str, sharded: Sequence[str], processes: int) -> None:
    """fp16's gradient scaler decides per process whether a step overflowed, and sharded expert gradients skip
    DDP's all-reduce, so one process could skip a step the others take: refused, in one line."""
    if sharded and mixed_precision == "fp16":
        raise ConfigError(f"train.mixed_precision: 'fp16' with experts sharded over {processes} processes "
                          "(moe.backend=tutel) could let one process skip a step the others take; accepted: bf16 "
                          "or no")


def clip_grad_norm_(accelerator: Accelerator, parameters: Iterable[torch.Tensor], max_norm: float) -> torch.Tensor:
    """``accelerator.clip_grad_norm_`` with one global norm when some gradients are sharded: the replicated part
    (identical on every process after DDP) plus the sum over processes of the sharded parts, so every process
    applies the same coefficient, the one a single process with all experts would."""
    parameters = [p for p in parameters if p.grad is not None]
    sharded = [p for p in parameters if is_sharded(p)]
    if not sharded:
        return accelerator.clip_grad_norm_(parameters, max_norm)
    accelerator.unscale_gradients()
    replicated_sq = sum((p.grad.detach().float().pow(2).sum() for p in parameters if not is_sharded(p)),
                        torch.zeros((), device=sharded[0].device))
    sharded_sq = sum(p.grad.detach().float().pow(2).sum() for p in sharded)
    dist.all_reduce(sharded_sq)
    total = (replicated_sq + sharded_sq).sqrt()
    coefficient = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for p in parameters:
        p.grad.detach().mul_(coefficient.to(p.grad.dtype))
    return total


class ShardedOptimizerState:
    """Checkpointed with ``accelerator.register_for_checkpointing``: the optimizer state of the sharded experts,
    gathered to whole tensors on save (every process calls ``save_state``) and sliced again on load.

    accelerate saves the optimizer of the main process only, so without this the other processes would resume
    with the main process's moments on their experts. Loaded after the optimizer, it overwrites those entries.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.parameters = sharded_parameters(model)
        self.optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper holds the torch one

    def state_dict(self) -> dict[str, dict[str, Any]]:
        gathered: dict[str, dict[str, Any]] = {}
        for name, parameter in self.parameters.items():
            state = self.optimizer.state.get(parameter, {})
            gathered[name] = {key: gather_along_experts(value, shard_of(parameter).group).cpu()
                              if _shaped_like(value, parameter.shape) else value for key, value in state.items()}
        return gathered

    def load_state_dict(self, state: dict[str, dict[str, Any]]) -> None:
        for name, parameter in self.parameters.items():
            if name not in state:
                continue
            shard = shard_of(parameter)
            whole = (parameter.shape[0] * shard.world_size, *parameter.shape[1:])  # what state_dict gathered
            self.optimizer.state[parameter] = {
                key: value[shard.experts].to(parameter.device).clone() if _shaped_like(value, whole) else value
                for key, value in state[name].items()}


def _shaped_like(value: Any, shape: Sequence[int]) -> bool:
    """A per-element optimizer state (Adam's moments), as opposed to a scalar such as ``step``."""
    return torch.is_tensor(value) and tuple(value.shape) == tuple(shape)
