"""Which weights of a model are stored in bf16/fp16 (:mod:`.precision` says how they are used).

Apart from :mod:`.precision` because it must know the expert banks and routers, whose modules use
:mod:`.precision`'s layers.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from .experts import Experts
from .low_rank_experts import LowRankExperts
from .precision import FROZEN_DTYPES, LowPrecisionConv2d, LowPrecisionLinear, cast_storage
from .routing import TaskRouter


def _frozen(module: nn.Module) -> bool:
    parameters = list(module.parameters())
    return bool(parameters) and not any(p.requires_grad for p in parameters)


def _store_low(parameter: nn.Parameter, dtype: torch.dtype) -> None:
    parameter.data = cast_storage(parameter.data, dtype)


def store_frozen_weights(model: nn.Module, dtype_name: str) -> list[str]:
    """Store the frozen matmul weights of ``model`` in ``dtype_name`` (``bf16``/``fp16``; ``fp32``: nothing).

    Call after everything that decides what trains (BSR, LoRA). Returns the names of the modules changed."""
    if dtype_name not in FROZEN_DTYPES:
        raise ValueError(f"bsr.frozen_dtype: {dtype_name!r} is invalid; accepted: {', '.join(FROZEN_DTYPES)}")
    dtype: Optional[torch.dtype] = FROZEN_DTYPES[dtype_name]
    if dtype is None:
        return []
    routers = {id(m) for router in model.modules() if isinstance(router, TaskRouter) for m in router.modules()}
    changed = []
    for name, module in model.named_modules():
        if isinstance(module, LowRankExperts):  # its shared weights are frozen even while its deltas train
            for parameter_name in module.FROZEN_PARAMETERS:
                _store_low(getattr(module, parameter_name), dtype)
            changed.append(name)
            continue
        if id(module) in routers or not _frozen(module):
            continue
        if isinstance(module, Experts):
            _store_low(module.fc1_weight, dtype)  # forward_expert goes through frozen_linear
            _store_low(module.fc2_weight, dtype)
            if getattr(module, "fc1_gate_weight", None) is not None:  # gated experts (EVA-02's SwiGLU)
                _store_low(module.fc1_gate_weight, dtype)
        elif type(module) in (nn.Linear, nn.Conv2d):
            _store_low(module.weight, dtype)
            module.__class__ = LowPrecisionLinear if type(module) is nn.Linear else LowPrecisionConv2d
        else:
            continue
        changed.append(name)
    return changed
