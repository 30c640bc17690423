"""``--budget KIND=AMOUNT``: an absolute amount (``memory=600MiB``, ``flops=2.5GFLOP``, ``step=80ms``) or one relative
to full fine-tuning of the same model, batch and precision (``memory=0.3x``, ``step=0.4x``)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

BUDGET_KINDS = ("memory", "flops", "step")
MEMORY_UNITS = {"B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "KiB": 2 ** 10, "MiB": 2 ** 20, "GiB": 2 ** 30}
FLOP_UNITS = {"FLOP": 1, "KFLOP": 1e3, "MFLOP": 1e6, "GFLOP": 1e9, "TFLOP": 1e12}
TIME_UNITS = {"s": 1.0, "ms": 1e-3}
UNITS = {"memory": MEMORY_UNITS, "flops": FLOP_UNITS, "step": TIME_UNITS}
COST_KEYS = {"memory": "memory_bytes", "flops": "flops", "step": "step_seconds"}  # a report's cost row, per kind
ACCEPTED = ("accepted: memory=<number><unit> (units B, KB, MB, GB, KiB, MiB, GiB), flops=<number><unit> (units FLOP, "
            "KFLOP, MFLOP, GFLOP, TFLOP; per training step), step=<number><unit> (units s, ms; CPU time on CPU), or "
            "any of them as <number>x of full fine-tuning")


class PlanError(ValueError):
    """A budget or config ``moebsr plan`` cannot plan for: one line, nothing written."""


@dataclass(frozen=True)
class Budget:
    """``amount`` in bytes or FLOPs per step when absolute; a fraction of full fine-tuning when ``relative``."""

    kind: str
    amount: float
    relative: bool
    text: str

    def resolve(self, full_cost: float) -> float:
        return self.amount * full_cost if self.relative else self.amount


def parse_budget(text: str) -> Budget:
    """One-line :class:`PlanError` naming the bad part and what is accepted."""
    kind, separator, value = text.partition("=")
    kind = kind.strip()
    if not separator or kind not in BUDGET_KINDS:
        shown = kind if separator else text
        raise PlanError(f"--budget: unknown budget kind {shown!r} in {text!r}; {ACCEPTED}")
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([A-Za-z]*)\s*", value)
    if match is None:
        raise PlanError(f"--budget: cannot read the amount {value!r} of {text!r}; {ACCEPTED}")
    number, unit = float(match.group(1)), match.group(2)
    if number <= 0:
        raise PlanError(f"--budget: {text!r} is not positive; {ACCEPTED}")
    if unit == "x":
        return Budget(kind, number, True, text)
    scale = _unit_scale(kind, unit)
    if scale is None:
        units = ", ".join(UNITS[kind])
        raise PlanError(f"--budget: unknown {kind} unit {unit or '(none)'!r} in {text!r}; accepted: {units}, or x "
                         "(relative to full fine-tuning)")
    return Budget(kind, number * scale, False, text)


def _unit_scale(kind: str, unit: str) -> Optional[float]:
    return UNITS[kind].get(unit)


def format_amount(kind: str, value: float) -> str:
    if kind == "memory":
        return f"{value / 2 ** 20:.2f} MiB"
    if kind == "step":
        return f"{value * 1000:.1f} ms"
    return f"{value / 1e9:.3f} GFLOP"
