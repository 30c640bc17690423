"""Comparing results that add the same numbers in another order (a joint batch against separate ones, fused
attention against unfused, a sum of per-task gradients against one backward).

float32 rounding of such a sum grows with the magnitude of what it adds up, and which order a BLAS kernel picks
depends on the machine and the batch shape: a fixed ``atol`` that one machine meets fails on another. So the
absolute tolerance is ``rel`` times the largest magnitude in ``expected`` (its scale), and the relative one is
``rel`` too. A real error (a missing task's contribution, a wrong token) is of the order of the scale itself.
"""

from __future__ import annotations

from typing import Optional

import torch

OUTPUTS = 1e-5  # forward outputs: a few hundred products per entry
GRADIENTS = 1e-4  # gradients: sums over every row and token of the batch, and over tasks


def assert_close_at_scale(actual: torch.Tensor, expected: torch.Tensor, rel: float = OUTPUTS,
                          msg: Optional[str] = None) -> None:
    scale = float(expected.detach().abs().max()) if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=rel, atol=rel * scale, msg=msg)
