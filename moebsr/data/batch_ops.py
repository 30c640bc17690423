"""Batch-wise image work on uint8 tensors: augmentation, channel matching, resize, normalisation.

One indexing op and a few tensor ops per batch replace B PIL round trips; on 2 CPU cores this is what keeps the
loader ahead of the training step (see ``build_task_loader``).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..tasks.spec import BatchAugment
from .image_spec import ImageSpec

_LUMA = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)


def augment_batch(images: torch.Tensor, augment: BatchAugment, generator: torch.Generator) -> torch.Tensor:
    """Random shift (pad then crop back, per image) and horizontal flip of uint8 ``[B, C, H, W]`` images."""
    batch, channels, height, width = images.shape
    if augment.crop_padding > 0:
        pad = augment.crop_padding
        padded = F.pad(images, (pad, pad, pad, pad))
        offsets = torch.randint(0, 2 * pad + 1, (2, batch), generator=generator)
        rows = (offsets[0].view(batch, 1) + torch.arange(height)).view(batch, 1, height, 1)
        cols = (offsets[1].view(batch, 1) + torch.arange(width)).view(batch, 1, 1, width)
        images = padded[torch.arange(batch).view(batch, 1, 1, 1), torch.arange(channels).view(1, channels, 1, 1),
                        rows, cols]
    if augment.hflip:
        flip = torch.rand(batch, generator=generator) < 0.5
        images = torch.where(flip.view(batch, 1, 1, 1), images.flip(-1), images)
    return images


def to_model_batch(images: torch.Tensor, spec: ImageSpec, device: Optional[torch.device] = None) -> torch.Tensor:
    """uint8 ``[B, C, H, W]`` -> float ``[B, in_chans, S, S]``, resized (bilinear, antialiased when shrinking) and
    normalised; grey is repeated to 3 channels, colour becomes luma for a 1-channel model."""
    x = images.to(device=device, dtype=torch.float32).div_(255.0)
    if x.shape[1] == 3 and spec.in_chans == 1:
        x = (x * _LUMA.to(x.device)).sum(dim=1, keepdim=True)
    size = spec.image_size
    if x.shape[-2:] != (size, size):
        shrinking = x.shape[-2] > size or x.shape[-1] > size
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=shrinking)
    if x.shape[1] == 1 and spec.in_chans == 3:
        x = x.expand(-1, 3, -1, -1)
    mean, std = spec.channel_stats()
    mean_t = torch.tensor(mean, device=x.device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, device=x.device).view(1, -1, 1, 1)
    return (x - mean_t) / std_t
