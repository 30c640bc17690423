"""Per-image transforms for datasets decoded one image at a time (hub datasets, image folders)."""

from __future__ import annotations

from typing import Any, Callable

import torch

from .image_spec import ImageSpec


def default_transform(spec: ImageSpec, train: bool) -> Callable[[Any], torch.Tensor]:
    """timm's ``create_transform`` for the model's size and normalisation: random-resized crop, flip and colour
    jitter for training; resize and centre crop for evaluation."""
    from timm.data import create_transform
    mean, std = spec.channel_stats()
    return create_transform(input_size=(spec.in_chans, spec.image_size, spec.image_size), is_training=train,
                            mean=mean, std=std, interpolation="bilinear")
