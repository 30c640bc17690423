"""Frozen weights stored in bf16/fp16: half the parameter bytes of everything BSR does not train.

Only the matmul weights of frozen layers are stored low (``nn.Linear``, the patch embedding's ``nn.Conv2d``, expert
banks); their biases, norms, tokens, position embeddings and routers stay fp32 (tiny, and routing is fp32 by design).

A stored weight is used in the precision of the activations it meets:
- under bf16 autocast (``train.mixed_precision: bf16``) autocast casts an fp32 weight to bf16 for every matmul anyway,
  so storing it in bf16 changes no number at all, it only skips that copy (tested bit for bit);
- in fp32 the weight is cast up inside the matmul (:class:`_UpcastLinear`), which keeps only the low-precision weight
  for backward, not an fp32 copy, and computes in fp32 (on a CPU without bf16 units a bf16 matmul is slower than an
  fp32 one). The one change is each frozen weight rounded to bf16 (relative 2^-9): a stated tolerance, measured.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .spec import FROZEN_DTYPE_NAMES

FROZEN_DTYPES = dict(zip(FROZEN_DTYPE_NAMES, (None, torch.bfloat16, torch.float16)))


def _autocasting(tensor: torch.Tensor) -> bool:
    device_type = tensor.device.type
    return device_type in ("cpu", "cuda", "xpu") and torch.is_autocast_enabled(device_type)


class _UpcastLinear(torch.autograd.Function):
    """``F.linear(x, weight.to(x.dtype), bias)`` for a frozen low-precision ``weight``, saving only ``weight`` (a
    parameter, stored anyway) for backward: plain autograd would keep the fp32 copy of every frozen layer that lies
    between trainable ones."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        ctx.save_for_backward(weight)
        return F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[Optional[torch.Tensor], None, None]:
        (weight,) = ctx.saved_tensors
        return grad_output @ weight.to(grad_output.dtype), None, None


def frozen_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.linear`` for a weight that may be stored in lower precision than ``x`` (see the module docstring)."""
    if weight.dtype == x.dtype or _autocasting(x):
        return F.linear(x, weight, bias)
    if weight.requires_grad:
        raise RuntimeError("frozen_linear: the weight trains; only frozen weights are stored in low precision")
    return _UpcastLinear.apply(x, weight, bias)


class _UpcastBatchedLinear(torch.autograd.Function):
    """:func:`frozen_batched_linear` of a frozen low-precision expert bank, saving only ``weight`` for backward (as
    :class:`_UpcastLinear` does): plain autograd would keep the fp32 copy of the whole bank."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(weight)
        ctx.bias_trains = bias.requires_grad
        return torch.baddbmm(bias.to(x.dtype).unsqueeze(1), x, weight.to(x.dtype).transpose(1, 2))

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[Optional[torch.Tensor], None, Optional[torch.Tensor]]:
        (weight,) = ctx.saved_tensors
        grad_x = torch.bmm(grad_output, weight.to(grad_output.dtype)) if ctx.needs_input_grad[0] else None
        return grad_x, None, grad_output.sum(dim=1) if ctx.bias_trains else None


def frozen_batched_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Expert ``e``'s linear layer on row ``e``: ``[E, n, in] -> [E, n, out]`` with ``weight`` ``[E, out, in]`` and
    ``bias`` ``[E, out]``, for a bank that may be stored in lower precision than ``x`` (see :func:`frozen_linear`)."""
    if weight.dtype == x.dtype or _autocasting(x):
        return torch.baddbmm(bias.unsqueeze(1), x, weight.transpose(1, 2))
    if weight.requires_grad:
        raise RuntimeError("frozen_batched_linear: the weight trains; only frozen weights are stored in low precision")
    return _UpcastBatchedLinear.apply(x, weight, bias)


class LowPrecisionLinear(nn.Linear):
    """An ``nn.Linear`` whose frozen weight is stored in bf16/fp16 (same state-dict keys); see :func:`frozen_linear`."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return frozen_linear(input, self.weight, self.bias)


class LowPrecisionConv2d(nn.Conv2d):
    """The patch embedding's convolution with its frozen weight in bf16/fp16. A frozen stem runs without autograd
    (nothing before it trains), so a plain cast up is all it needs."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if _autocasting(input):
            return super().forward(input)
        bias = None if self.bias is None else self.bias.to(input.dtype)
        return self._conv_forward(input, self.weight.to(input.dtype), bias)


def is_broadcast(data: torch.Tensor) -> bool:
    """One value broadcast to a shape (every stride 0), as ``moebsr plan``'s hollow weights are."""
    return data.numel() > 1 and not any(data.stride())


def cast_storage(data: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``data.to(dtype)``; a broadcast value stays one (casting would write out every element)."""
    if is_broadcast(data):
        return data[(0,) * data.dim()].to(dtype).expand(data.shape)
    return data.to(dtype)


def restore_full_precision(model: nn.Module) -> None:
    """Undo :func:`~moebsr.model.frozen_storage.store_frozen_weights`: every parameter in fp32 again and the layers
    plain ``nn.Linear``/``nn.Conv2d`` (``moebsr plan`` sets one model up for plan after plan; the values keep their
    rounding)."""
    for module in model.modules():
        if type(module) is LowPrecisionLinear:
            module.__class__ = nn.Linear
        elif type(module) is LowPrecisionConv2d:
            module.__class__ = nn.Conv2d
    for parameter in model.parameters():
        if parameter.dtype != torch.float32:
            parameter.data = cast_storage(parameter.data, torch.float32)
