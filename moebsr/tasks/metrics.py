"""Task metrics computed from accumulated logits and labels; each says whether higher is better.

Pure torch (no sklearn) so evaluation can run on gathered tensors without copies; macro-F1 follows sklearn's
definition (mean over the classes present in the labels or the predictions).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence, Union, runtime_checkable

import torch

from .errors import TaskError


@runtime_checkable
class Metric(Protocol):
    name: str
    higher_is_better: bool

    def compute(self, logits: torch.Tensor, labels: torch.Tensor) -> float:
        ...


@dataclass(frozen=True)
class TopK:
    """Share of examples whose label is among the ``k`` highest logits (top-1 is accuracy)."""

    k: int = 1
    higher_is_better: bool = True

    @property
    def name(self) -> str:
        return f"top{self.k}"

    def compute(self, logits: torch.Tensor, labels: torch.Tensor) -> float:
        if labels.numel() == 0:
            return float("nan")
        k = min(self.k, logits.shape[-1])  # top-5 of a 2-class task is trivially 1.0, not an error
        top = logits.topk(k, dim=-1).indices
        return (top == labels.view(-1, 1)).any(dim=-1).float().mean().item()


@dataclass(frozen=True)
class MacroF1:
    """Unweighted mean of per-class F1: a rare class counts as much as a common one."""

    name: str = "macro_f1"
    higher_is_better: bool = True

    def compute(self, logits: torch.Tensor, labels: torch.Tensor) -> float:
        if labels.numel() == 0:
            return float("nan")
        num_classes = logits.shape[-1]
        predictions = logits.argmax(dim=-1)
        labels = labels.long()
        true_positive = torch.bincount(labels[predictions == labels], minlength=num_classes).double()
        predicted = torch.bincount(predictions, minlength=num_classes).double()
        actual = torch.bincount(labels, minlength=num_classes).double()
        present = (predicted + actual) > 0
        f1 = 2 * true_positive / (predicted + actual).clamp_min(1)
        return f1[present].mean().item()


_BY_NAME = {"top1": TopK(1), "top5": TopK(5), "accuracy": TopK(1), "macro_f1": MacroF1()}

MetricLike = Union[str, Metric]


def resolve_metrics(metrics: Sequence[MetricLike], task_name: str) -> list[Metric]:
    """Metric objects from names (``top1``, ``top5``, ``macro_f1``) or objects; the first one is the headline."""
    resolved = []
    for metric in metrics:
        if isinstance(metric, str):
            if metric not in _BY_NAME:
                raise TaskError(f"task {task_name!r}: unknown metric {metric!r}; accepted: {', '.join(_BY_NAME)} "
                                "or an object with .name, .higher_is_better and .compute(logits, labels)")
            metric = _BY_NAME[metric]
        elif not isinstance(metric, Metric):
            raise TaskError(f"task {task_name!r}: metric {metric!r} lacks .name, .higher_is_better or .compute")
        resolved.append(metric)
    if not resolved:
        raise TaskError(f"task {task_name!r}: metrics is empty; give at least one, e.g. ['top1']")
    return resolved
