"""What a task is: its data, its outputs, its head, its loss, its metrics and how much it counts.

A task file builds one :class:`Task` in a factory registered with ``@register_task``; the training loop only ever
calls ``build_dataset``, ``build_head``, ``loss`` and ``metrics``, so a task can change any of them alone.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .errors import TaskError
from .metrics import Metric, MetricLike, resolve_metrics

SPLITS = ("train", "test")

# (image_spec, train) -> per-image transform (PIL image -> float tensor [C, H, W]); e.g. timm's create_transform.
TransformFactory = Callable[[Any, bool], Callable[[Any], torch.Tensor]]


@dataclass(frozen=True)
class BatchAugment:
    """Training augmentation applied batch-wise to uint8 tensor datasets: a random shift of up to ``crop_padding``
    pixels and, where the task's labels survive mirroring, a horizontal flip (digits don't)."""

    crop_padding: int = 0
    hflip: bool = False

    def intersect(self, other: "BatchAugment") -> "BatchAugment":
        """What both tasks tolerate: tasks sharing one image batch get the milder augmentation of the two."""
        return BatchAugment(min(self.crop_padding, other.crop_padding), self.hflip and other.hflip)


@dataclass
class Task:
    """One classification task.

    Args:
        name: Registered name (set by the registry).
        num_outputs: Classes; labels must lie in ``[0, num_outputs)``.
        dataset_fn: ``split -> data`` for ``"train"``/``"test"``: a ``datasets.Dataset`` with an image and a label
            column, a ``TensorImageDataset``, a dict of uint8 ``images`` and ``labels`` arrays, or any indexable of
            ``(image, label)`` pairs. One that takes ``image_column`` and ``label_column`` keywords is given the
            task's (which a config's options may have changed after the factory ran).
        head: ``num_features -> nn.Module``; None gives ``nn.Linear(num_features, num_outputs)``.
        loss_fn: ``(logits, labels) -> loss``; None gives cross-entropy with ``label_smoothing``.
        metrics: Names (``top1``, ``top5``, ``macro_f1``) or metric objects; the first is the headline metric.
        shared_dataset: Tasks with the same key label the same images in the same order, so one image batch can
            serve all of them (the ``joint`` sampler). A promise checked only by sizes: keep the key specific.
        label_fn: Maps the dataset's labels to this task's labels (a derived task on shared images).
        train_transform / eval_transform: Per-image transform factories ``(image_spec, train) -> transform`` for
            datasets decoded image by image; None uses timm's ``create_transform``.
        batch_augment: Training augmentation for uint8 tensor datasets, applied batch-wise.
        size_hint: Shown by ``moebsr tasks`` instead of loading the data to count it (e.g. ``"hub"``).
        image_column / label_column: Columns of a ``datasets.Dataset``; None picks the Image / ClassLabel column.
    """

    name: str
    num_outputs: int
    dataset_fn: Callable[[str], Any]
    head: Optional[Callable[[int], nn.Module]] = None
    loss_fn: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None
    label_smoothing: float = 0.0
    metrics: Sequence[MetricLike] = ("top1",)
    sampling_weight: float = 1.0
    loss_weight: float = 1.0
    shared_dataset: Optional[str] = None
    label_fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
    train_transform: Optional[TransformFactory] = None
    eval_transform: Optional[TransformFactory] = None
    batch_augment: BatchAugment = BatchAugment()
    class_names: Optional[Sequence[str]] = None
    size_hint: Optional[str] = None
    source: str = ""
    image_column: Optional[str] = None
    label_column: Optional[str] = None
    _datasets: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        where = f"task {self.name!r}"
        if not isinstance(self.num_outputs, int) or self.num_outputs < 1:
            raise TaskError(f"{where}: num_outputs={self.num_outputs!r}; expected an integer >= 1")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise TaskError(f"{where}: label_smoothing={self.label_smoothing}; accepted: 0 <= value < 1")
        if self.sampling_weight <= 0 or self.loss_weight < 0:
            raise TaskError(f"{where}: sampling_weight={self.sampling_weight}, loss_weight={self.loss_weight}; "
                            "accepted: sampling_weight > 0, loss_weight >= 0")
        if self.class_names is not None and len(self.class_names) != self.num_outputs:
            raise TaskError(f"{where}: {len(self.class_names)} class_names for num_outputs={self.num_outputs}")
        self.metrics: list[Metric] = resolve_metrics(self.metrics, self.name)

    def build_dataset(self, split: str) -> Any:
        """The split's dataset (``TensorImageDataset`` or ``ItemImageDataset``), labels checked, built once per task.

        Raises:
            TaskError: unknown or empty split, labels outside ``[0, num_outputs)``, unreadable data.
        """
        if split not in SPLITS:
            raise TaskError(f"task {self.name!r}: unknown split {split!r}; accepted: {', '.join(SPLITS)}")
        if split not in self._datasets:
            from ..data.image_datasets import as_image_dataset

            where = f"task {self.name!r}, split {split!r}"
            dataset = as_image_dataset(self._raw_dataset(split), where, self.image_column, self.label_column,
                                       num_outputs=None if self.label_fn is not None else self.num_outputs)
            if self.label_fn is not None:
                dataset = dataset.with_labels(torch.as_tensor(self.label_fn(dataset.labels)).long(), where)
            self._check_labels(dataset.labels, where)
            self._datasets[split] = dataset
        return self._datasets[split]

    def _raw_dataset(self, split: str) -> Any:
        try:
            parameters = inspect.signature(self.dataset_fn).parameters
        except (TypeError, ValueError):  # a callable without a signature: split only
            parameters = {}
        if "image_column" in parameters and "label_column" in parameters:
            return self.dataset_fn(split, image_column=self.image_column, label_column=self.label_column)
        return self.dataset_fn(split)

    def _check_labels(self, labels: torch.Tensor, where: str) -> None:
        if labels.numel() == 0:
            raise TaskError(f"{where}: the split is empty (0 examples)")
        bad = (labels < 0) | (labels >= self.num_outputs)
        if bad.any():
            values = sorted(set(labels[bad].tolist()))
            raise TaskError(f"{where}: {int(bad.sum())} labels outside the task's classes [0, {self.num_outputs}): "
                            f"{values[:5]}{' ...' if len(values) > 5 else ''}")

    def num_examples(self, split: str) -> int:
        return len(self.build_dataset(split))

    def build_head(self, num_features: int) -> nn.Module:
        """This task's head on the backbone's pooled features of width ``num_features``."""
        return self.head(num_features) if self.head is not None else nn.Linear(num_features, self.num_outputs)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.loss_fn is not None:
            return self.loss_fn(logits, labels)
        return F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)

    def compute_metrics(self, logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        """Every metric on accumulated (gathered) logits and labels."""
        return {metric.name: metric.compute(logits, labels) for metric in self.metrics}
