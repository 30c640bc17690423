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


def augment_batch(images: torch.Tensor, augment: BatchAugment, example_seeds: torch.Tensor) -> torch.Tensor:
    """Random shift (pad then crop back, per image) and horizontal flip of uint8 ``[B, C, H, W]`` images.

    Each image's draw comes from its own seed (``EpochBatchSampler.example_seeds``), not from a batch-wide
    generator, so the result does not depend on how examples were grouped into batches or processes.
    """
    batch, channels, height, width = images.shape
    device = images.device  # the images may live on the training device; every index and draw follows them
    example_seeds = example_seeds.to(device)
    if augment.crop_padding > 0:
        pad = augment.crop_padding
        padded = F.pad(images, (pad, pad, pad, pad))
        span = 2 * pad + 1
        offsets = torch.stack([_draw(example_seeds, 1) % span, _draw(example_seeds, 2) % span])
        rows = (offsets[0].view(batch, 1) + torch.arange(height, device=device)).view(batch, 1, height, 1)
        cols = (offsets[1].view(batch, 1) + torch.arange(width, device=device)).view(batch, 1, 1, width)
        images = padded[torch.arange(batch, device=device).view(batch, 1, 1, 1),
                        torch.arange(channels, device=device).view(1, channels, 1, 1), rows, cols]
    if augment.hflip:
        flip = (_draw(example_seeds, 3) & 1).bool()
        images = torch.where(flip.view(batch, 1, 1, 1), images.flip(-1), images)
    return images


def _draw(example_seeds: torch.Tensor, salt: int) -> torch.Tensor:
    """A non-negative pseudo-random int64 per example, independent across salts."""
    from .sampler import mix64
    return mix64(example_seeds + salt) & ((1 << 62) - 1)


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
