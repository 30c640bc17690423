"""Frozen weights stored in bf16/fp16: half the parameter bytes of everything BSR does not train.

Only the matmul weights of frozen layers are cast (``nn.Linear``, the patch embedding's ``nn.Conv2d``, expert banks);
norms, tokens, position embeddings and routers stay fp32 (tiny, and routing is fp32 by design). A cast layer computes
in its weights' dtype: its input is cast down on the way in and, outside autocast, its output back up on the way
out, so the residual stream, the norms and every trainable layer keep their precision.

Under bf16 autocast (``train.mixed_precision: bf16``) this changes no number at all: autocast casts an fp32 weight to
bf16 for every matmul anyway, so storing it in bf16 only skips that copy (tested bit for bit). In fp32 training the
frozen layers' matmuls run in bf16: a stated tolerance, measured on the accuracy benchmark.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn as nn

from .experts import Experts
from .routing import TaskRouter

FROZEN_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def _frozen(module: nn.Module) -> bool:
    parameters = list(module.parameters())
    return bool(parameters) and not any(p.requires_grad for p in parameters)


def _autocasting(tensor: torch.Tensor) -> bool:
    device_type = tensor.device.type
    return device_type in ("cpu", "cuda", "xpu") and torch.is_autocast_enabled(device_type)


def _cast_input(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    """Forward pre-hook: the input in the weights' dtype (remembering its own, for :func:`_cast_output_back`)."""
    dtype = module.weight.dtype
    module.input_dtype = next((arg.dtype for arg in args if torch.is_tensor(arg)), dtype)
    return tuple(arg.to(dtype) if torch.is_tensor(arg) and arg.is_floating_point() else arg for arg in args)


def _cast_output_back(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
    """Forward hook: the output in the input's dtype, except under autocast (which decides dtypes itself)."""
    return output if _autocasting(output) else output.to(module.input_dtype)


def store_frozen_weights(model: nn.Module, dtype_name: str) -> list[str]:
    """Cast the frozen matmul layers of ``model`` to ``dtype_name`` (``bf16``/``fp16``; ``fp32``: nothing).

    Call after everything that decides what trains (BSR, LoRA). Returns the names of the cast modules."""
    if dtype_name not in FROZEN_DTYPES:
        raise ValueError(f"bsr.frozen_dtype: {dtype_name!r} is invalid; accepted: {', '.join(FROZEN_DTYPES)}")
    dtype: Optional[torch.dtype] = FROZEN_DTYPES[dtype_name]
    if dtype is None:
        return []
    routers = {id(m) for router in model.modules() if isinstance(router, TaskRouter) for m in router.modules()}
    cast = []
    for name, module in model.named_modules():
        if id(module) in routers or not _frozen(module):
            continue
        if isinstance(module, Experts):
            module.to(dtype)  # the dispatch casts the tokens to the experts' dtype and their output back
        elif isinstance(module, (nn.Linear, nn.Conv2d)):
            module.to(dtype)
            module.register_forward_pre_hook(_cast_input)
            module.register_forward_hook(_cast_output_back)
        else:
            continue
        cast.append(name)
    return cast
